"""Benchmark: constrained alignment's exact multipliers and the cost of constraints in fine-tuning.

    python benchmarks/bench_constrained.py [--quick]

1. Exact multipliers of many finite-action problems: lambda* = argmin_{lambda >= 0} g(lambda) for
   N problems (100 contexts, 10 actions, m = 2 constraints, beta = 0.2), saferl_jax's
   `minimize_dual` on `tilt_dual` jitted and vmapped over the N problems, against SciPy's
   L-BFGS-B (float64 numpy dual and gradient, the same formula) called once per problem, as a
   researcher without a batched solver would. Both solutions are compared (max |difference|).
2. What constraints cost a fine-tuning round: `finetune` of a 2-D MLP denoiser (P K = 32
   samples, 10 steps, LOOP, 4 seeds) with two constraints and a dual step every round, against
   the same run without constraints (the Lagrangian reward, the constraint rewards and the dual
   update are the only extra work). Seconds per round after compilation.

Results go to benchmarks/results/constrained_<platform>.json and .md.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize
from flax import nnx

from saferl_jax import constrained
from saferl_jax.diffusion.schedules import linear_schedule
from saferl_jax.models.denoisers import MLPDenoiser
from saferl_jax.models.functional import as_functional
from saferl_jax.training.finetuning import Constraints, Sampling, finetune
from timing import median_time, platform_description, write_results

CONTEXTS, ACTIONS, M, BETA = 100, 10, 2, 0.2


def problems(num_problems: int):
  key = jax.random.key(0)
  k1, k2, k3 = jax.random.split(key, 3)
  reference = jax.nn.log_softmax(jax.random.normal(k1, (num_problems, CONTEXTS, ACTIONS)), -1)
  primary = jax.random.uniform(k2, (num_problems, CONTEXTS, ACTIONS))
  secondary = jax.random.uniform(k3, (num_problems, CONTEXTS, ACTIONS, M))
  # Thresholds between the reference's value and the best achievable: the constraints bind.
  reference_value = jnp.einsum("nca,ncam->nm", jnp.exp(reference), secondary) / CONTEXTS
  best = jnp.max(secondary, axis=2).mean(axis=1)
  thresholds = reference_value + 0.5 * (best - reference_value)
  return reference, primary, secondary, thresholds


@jax.jit
@jax.vmap
def saferl_solve(reference, primary, secondary, thresholds):
  """lambda* of each problem, jitted once and vmapped over the problems."""
  dual = lambda lam: constrained.tilt_dual(reference, primary, secondary, lam,
                                           thresholds=thresholds, kl_weight=BETA)
  return constrained.minimize_dual(dual, jnp.zeros(M))


def scipy_solve(reference, primary, secondary, thresholds):
  reference, primary, secondary, thresholds = (np.asarray(x, np.float64) for x in
                                               (reference, primary, secondary, thresholds))
  solutions = []
  for ref, q0, q, b in zip(reference, primary, secondary, thresholds):
    def dual(lam):
      logits = ref + (q0 + q @ lam) / BETA
      top = logits.max(-1, keepdims=True)
      log_partition = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
      tilted = np.exp(logits - log_partition[:, None])
      value = BETA * log_partition.mean() - lam @ b
      gradient = np.einsum("ca,cam->m", tilted, q) / len(ref) - b
      return value, gradient
    result = scipy.optimize.minimize(dual, np.zeros(M), jac=True, method="L-BFGS-B",
                                     bounds=[(0, None)] * M, options={"gtol": 1e-9, "ftol": 1e-12})
    solutions.append(result.x)
  return np.stack(solutions)


def finetune_seconds_per_round(with_constraints: bool, rounds: int) -> float:
  rngs = nnx.Rngs(0)
  apply_fn, params = as_functional(MLPDenoiser(2, num_classes=1, hidden=(64, 64), rngs=rngs))
  seeds = 4
  seed_params = jax.tree_util.tree_map(lambda x: jnp.stack([x] * seeds), params)
  keys = jax.random.split(jax.random.key(1), seeds)
  sampling = Sampling(shape=(2,), num_classes=1, prompts_per_round=8, samples_per_prompt=4,
                      num_steps=10)
  constraints = Constraints(
      rewards={"up": lambda x, c: x[:, 1], "left": lambda x, c: -x[:, 0]},
      thresholds={"up": 0.5, "left": 0.0},
      dual_optimizer=constrained.dual_descent(0.5)) if with_constraints else None
  optimizer = optax.adam(1e-3)

  def run():
    start = time.perf_counter()
    result = finetune(apply_fn, seed_params, lambda x, c: x[:, 0], key=keys, method="loop",
                      rounds=rounds, eval_every=rounds, schedule=linear_schedule(100),
                      sampling=sampling, optimizer=optimizer, constraints=constraints)
    jax.block_until_ready(result.params)
    return time.perf_counter() - start

  run()  # compile
  return median_time(run, 3) / rounds


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  num_problems = 100 if args.quick else 1000
  inputs = problems(num_problems)
  ours = np.asarray(saferl_solve(*inputs))
  theirs = scipy_solve(*inputs)
  difference = float(np.max(np.abs(ours - theirs)))
  active = float(np.mean(theirs > 1e-6))
  saferl_s = median_time(lambda: jax.block_until_ready(saferl_solve(*inputs)), 3)
  scipy_s = median_time(lambda: scipy_solve(*inputs), 1)
  rounds = 10 if args.quick else 30
  unconstrained = finetune_seconds_per_round(False, rounds)
  with_constraints = finetune_seconds_per_round(True, rounds)
  results = {"platform": platform_description(), "num_problems": num_problems,
             "exact_multipliers": {"saferl_jax_s": saferl_s, "scipy_lbfgsb_s": scipy_s,
                                   "speedup": scipy_s / saferl_s,
                                   "max_abs_difference": difference,
                                   "fraction_active": active},
             "finetune_round": {"unconstrained_s": unconstrained, "constrained_s": with_constraints,
                                "overhead": with_constraints / unconstrained}}
  text = (f"Platform: {results['platform']}\n\n"
          f"| what | saferl_jax | alternative | ratio |\n|---|---|---|---|\n"
          f"| lambda* of {num_problems} problems (s) | {saferl_s:.4f} (jit+vmap minimize_dual) | "
          f"{scipy_s:.4f} (SciPy L-BFGS-B, a loop) | {scipy_s / saferl_s:.1f}x faster |\n"
          f"| finetune round, 4 seeds (s) | {with_constraints:.4f} (2 constraints) | "
          f"{unconstrained:.4f} (no constraints) | {with_constraints / unconstrained:.2f}x the "
          f"time |\n\nmax |lambda*_saferl - lambda*_scipy| = {difference:.2e}; "
          f"{100 * active:.0f}% of the multipliers active.\n")
  write_results("constrained", results, text)


if __name__ == "__main__":
  main()
