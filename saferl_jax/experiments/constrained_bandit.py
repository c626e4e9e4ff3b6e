"""The bandit task of `saferl-jax constrained`: OPL with a high-confidence constraint (floor 3).

One two-reward synthetic bandit (`saferl_jax.data.constrained_bandit`: the primary reward of
`synthetic_bandit` and a secondary reward that conflicts with it, exact values over the context
pool). Each seed logs its own data with the logging policy pi_0 and splits it in two:

  candidate  a linear softmax policy trained on the first part by primal-dual steps on
             V0hat + lambda (LCB_delta(V1hat) - b_train) (`train_constrained`, beta*-IPS or DR,
             Student-t bound), b_train = b + `candidate_margin`;
  deployed   the candidate if its LCB_delta(V1hat) on the held-out part is >= b (a safety test
             on data the candidate never saw, as in high-confidence policy improvement), else
             pi_0, whose true V1 is >= b by the choice of b.

The held-out bound is a (t-asymptotic) 1 - delta bound for a fixed policy, so the deployed policy
violates the constraint in truth with probability about delta at most; the in-sample bound the
candidate was optimised on is optimistic (the optimiser's curse), which the candidate's own
violation rate shows (the ablation "in_sample_only": margin 0, no safety test). The threshold
b lies between the primary-greedy policy's V1 and pi_0's V1 (fraction `threshold_fraction`),
so the constraint binds and pi_0 is a safe fallback.

Compared against: the unconstrained learner (lambda = 0, max V0hat), the fixed-weight sum
V0hat + w V1hat with w the smallest on a grid whose mean true V1 over seeds meets b (tuned, in
truth, for the primary value), and the exact reference: the tilt pi_lambda* of the uniform
policy by (q_0 + lambda* q_1) / beta with the true q and a small beta (`kl_weight`), lambda* from
`tilt_dual` + `minimize_dual` (the KL-regularised problem's optimum over all policies, not only
linear ones).

References:
  Thomas, Theocharous, Ghavamzadeh. High Confidence Policy Improvement. ICML 2015.
  [OB] Gupta, Jeunen, Oosterhuis, de Rijke. RecSys 2024. https://arxiv.org/abs/2405.05736
  Zhang et al. NeurIPS 2025. https://arxiv.org/abs/2505.19387
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saferl_jax.constrained import dual_descent, minimize_dual, tilt_dual, tilted_log_policy
from saferl_jax.data import constrained_bandit as cb
from saferl_jax.experiments.common import Checkpoint, pyplot, to_jsonable
from saferl_jax.opl.constrained import constrained_objective
from saferl_jax.training.constrained_opl import train_constrained

NAME = "secondary"


@dataclasses.dataclass(frozen=True)
class Config:
  num_actions: int = 10
  dim_context: int = 5
  num_contexts: int = 1000
  conflict: float = 0.5
  logger_inverse_temperature: float = 1.0
  num_train: int = 5000
  num_safety: int = 5000
  num_steps: int = 200
  eval_every: int = 50
  learning_rate: float = 0.05
  dual_learning_rate: float = 2.0
  delta: float = 0.05
  bound: str = "t"
  threshold_fraction: float = 0.6
  candidate_margin: float = 0.03
  estimators: tuple[str, ...] = ("beta_ips", "dr")
  fixed_weights: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 13))
  kl_weight: float = 0.01
  num_seeds: int = 10
  seed: int = 0


QUICK = Config()
FULL = Config(num_steps=400, eval_every=50, num_seeds=40)


def wilson_interval(successes: int, trials: int, *, delta: float = 0.05) -> list[float]:
  """The Wilson score interval of a binomial proportion at level 1 - delta (two-sided)."""
  z = {0.05: 1.959964, 0.1: 1.644854, 0.01: 2.575829}.get(delta)
  if z is None:
    from statistics import NormalDist
    z = NormalDist().inv_cdf(1 - delta / 2)
  p = successes / trials
  centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
  half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
  return [max(0.0, centre - half), min(1.0, centre + half)]


def _apply(params, contexts):
  return contexts @ params["w"] + params["b"]


def _fraction(meets: np.ndarray) -> dict:
  count = int(np.sum(meets))
  return {"fraction": count / meets.size, "count": count, "seeds": int(meets.size),
          "wilson_95": wilson_interval(count, int(meets.size))}


def run_task(out: Path, config: Config = QUICK) -> dict:
  """Runs the bandit task (resuming finished cells from out/checkpoints); returns its results."""
  out = Path(out)
  checkpoint = Checkpoint(out, dataclasses.asdict(config))
  problem_key, data_key, train_key = jax.random.split(jax.random.key(config.seed), 3)
  problem = cb.two_reward_problem(
      problem_key, num_actions=config.num_actions, dim_context=config.dim_context,
      num_contexts=config.num_contexts, conflict=config.conflict,
      logger_inverse_temperature=config.logger_inverse_temperature)
  q = problem.expected_rewards
  num_actions, seeds = config.num_actions, config.num_seeds

  # The threshold: between the primary-greedy policy's V1 and the logging policy's V1.
  greedy = jax.nn.one_hot(jnp.argmax(q[..., 0], axis=-1), num_actions)
  greedy_values = np.asarray(cb.policy_values(greedy, problem))
  logging_values = np.asarray(cb.policy_values(problem.logging_dist, problem))
  max_secondary = float(jnp.mean(jnp.max(q[..., 1], axis=-1)))
  b = float(greedy_values[1] + config.threshold_fraction * (logging_values[1] - greedy_values[1]))

  # The exact reference: the uniform policy tilted by (q0 + lambda* q1) / beta.
  log_uniform = jnp.full(q.shape[:2], -math.log(num_actions))
  thresholds = jnp.array([b])

  def dual_fn(multipliers):
    return tilt_dual(log_uniform, q[..., 0], q[..., 1:], multipliers, thresholds=thresholds,
                     kl_weight=config.kl_weight)
  lambda_exact = minimize_dual(dual_fn, jnp.zeros(1), num_iterations=2000)
  tilted = jnp.exp(tilted_log_policy(log_uniform, q[..., 0], q[..., 1:], lambda_exact,
                                     kl_weight=config.kl_weight))
  exact_values = np.asarray(cb.policy_values(tilted, problem))

  train_keys, safety_keys = jnp.split(jax.random.split(data_key, 2 * seeds), 2)
  train = cb.constrained_batch(problem, cb.simulate_logs(problem, keys=train_keys,
                                                         num_rounds=config.num_train))
  safety = cb.constrained_batch(problem, cb.simulate_logs(problem, keys=safety_keys,
                                                          num_rounds=config.num_safety))
  init = {"w": jnp.zeros((seeds, config.dim_context, num_actions)),
          "b": jnp.zeros((seeds, num_actions))}  # the uniform policy
  run_keys = jax.random.split(train_key, seeds)
  log_logging = jnp.log(problem.logging_dist)

  def evaluate(params):
    log_pi = jax.nn.log_softmax(_apply(params, problem.contexts), axis=-1)
    values = cb.policy_values(jnp.exp(log_pi), problem)
    kl = jnp.mean(jnp.sum(jnp.exp(log_pi) * (log_pi - log_logging), axis=-1))
    return {"true/primary": values[0], f"true/{NAME}": values[1], "kl/logging": kl}

  def held_out(params, estimator):
    """Per seed: the candidate's held-out LCB of V1 and its exact values."""
    def one(p, batch):
      pi = jax.nn.softmax(_apply(p, batch.contexts), axis=-1)
      return constrained_objective(pi, batch.actions, batch.rewards, batch.logging_probs,
                                   jnp.zeros(1), thresholds=thresholds, estimator=estimator,
                                   reward_hat=batch.reward_hat, delta=config.delta,
                                   bound=config.bound).lower_bounds[0]
    return np.asarray(jax.vmap(one)(params, safety))

  def fit(name, estimator, *, dual, multipliers, penalty, train_threshold, copies=1):
    """One run of S seeds; `copies` > 1 repeats each seed's data for per-copy multipliers."""
    tile = lambda tree: jax.tree_util.tree_map(
        lambda x: jnp.concatenate([x] * copies, axis=0), tree)
    return train_constrained(
        _apply, tile(init), tile(train), key=tile(run_keys), thresholds=[train_threshold],
        num_steps=config.num_steps, optimizer=optax.adam(config.learning_rate), dual=dual,
        multipliers=multipliers, names=[NAME], estimator=estimator, delta=config.delta,
        bound=config.bound, penalty=penalty, eval_every=config.eval_every, evaluate=evaluate,
        checkpoint_path=checkpoint.path_for(name), run_config=dataclasses.asdict(config))

  def summarise(result, estimator, train_threshold):
    h = result.history
    true_secondary = np.asarray(h[f"true/{NAME}"][-1], float)
    true_primary = np.asarray(h["true/primary"][-1], float)
    safety_lcb = held_out(result.params, estimator)
    passes = safety_lcb >= b
    deployed_secondary = np.where(passes, true_secondary, logging_values[1])
    deployed_primary = np.where(passes, true_primary, logging_values[0])
    return {
        "lambda": np.asarray(h[f"lambda/{NAME}"]).mean(axis=1)[:, None],
        "lambda_per_seed": np.asarray(h[f"lambda/{NAME}"][-1])[:, None],
        # in-sample slack against the deployment threshold b (training used b + margin)
        "slack": (np.asarray(h[f"lcb/{NAME}"]) - b).mean(axis=1),
        "reward": np.asarray(h["value/primary"]).mean(axis=1),
        "kl": np.asarray(h["kl/logging"]).mean(axis=1),
        "true_primary_curve": np.asarray(h["true/primary"]).mean(axis=1),
        "true_secondary_curve": np.asarray(h[f"true/{NAME}"]).mean(axis=1),
        "candidate_true": {"primary": true_primary, NAME: true_secondary},
        "candidate_in_sample_lcb": np.asarray(h[f"lcb/{NAME}"][-1]),
        "candidate_estimate": np.asarray(h[f"estimate/{NAME}"][-1]),
        "safety_lcb": safety_lcb, "passes_safety_test": passes,
        "deployed_true": {"primary": deployed_primary, NAME: deployed_secondary},
        "final_slack_per_seed": {NAME: deployed_secondary - b},
        "train_threshold": train_threshold,
    }

  runs = {}
  for estimator in config.estimators:
    cell = f"primal_dual/{estimator}"
    if cell not in checkpoint:
      result = fit(cell.replace("/", "_"), estimator, dual=dual_descent(config.dual_learning_rate),
                   multipliers=None, penalty="lower_bound",
                   train_threshold=b + config.candidate_margin)
      checkpoint.save(cell, summarise(result, estimator, b + config.candidate_margin))
    runs[estimator] = checkpoint[cell]
  # Ablation: the candidate of the in-sample bound alone (margin 0, no safety test), deployed as
  # it is; the optimiser's curse biases its in-sample estimate upwards.
  cell = f"in_sample_only/{config.estimators[0]}"
  if cell not in checkpoint:
    result = fit("in_sample_only", config.estimators[0],
                 dual=dual_descent(config.dual_learning_rate), multipliers=None,
                 penalty="lower_bound", train_threshold=b)
    checkpoint.save(cell, summarise(result, config.estimators[0], b))
  in_sample_only = checkpoint[cell]
  in_sample_meets = _fraction(np.asarray(in_sample_only["candidate_true"][NAME]) >= b)

  # The unconstrained learner (w = 0) and the fixed-weight sums V0hat + w V1hat: one run, each
  # weight a copy of every seed.
  estimator = config.estimators[0]
  weights = (0.0, *config.fixed_weights)
  if not all(f"fixed/{w:g}" in checkpoint for w in weights):
    multipliers = jnp.repeat(jnp.asarray(weights), seeds)[:, None]  # [G * S, 1]
    result = fit("fixed", estimator, dual=None, multipliers=multipliers, penalty="estimate",
                 train_threshold=b, copies=len(weights))
    for g, weight in enumerate(weights):
      part = slice(g * seeds, (g + 1) * seeds)
      one = result._replace(
          params=jax.tree_util.tree_map(lambda x: x[part], result.params),
          history={k: v[:, part] for k, v in result.history.items()})
      checkpoint.save(f"fixed/{weight:g}", summarise(one, estimator, b))
  unconstrained = checkpoint["fixed/0"]
  fixed = {w: checkpoint[f"fixed/{w:g}"] for w in config.fixed_weights}

  # The fixed weight tuned for the primary value: the smallest whose mean true V1 meets b.
  meeting = [w for w in config.fixed_weights if np.mean(fixed[w]["candidate_true"][NAME]) >= b]
  tuned_weight = min(meeting) if meeting else max(config.fixed_weights)
  tuned = fixed[tuned_weight]
  tuned_meets = np.asarray(tuned["candidate_true"][NAME]) >= b

  main = runs[config.estimators[0]]
  per_estimator = {}
  for est, r in runs.items():
    deployed_meets = np.asarray(r["deployed_true"][NAME]) >= b
    candidate_meets = np.asarray(r["candidate_true"][NAME]) >= b
    per_estimator[est] = {
        **r,
        "deployed_meets": _fraction(deployed_meets),
        "candidate_meets": _fraction(candidate_meets),
        "pass_rate": float(np.mean(r["passes_safety_test"])),
        "deployed_primary_mean": float(np.mean(r["deployed_true"]["primary"])),
        "candidate_primary_mean": float(np.mean(r["candidate_true"]["primary"])),
        "candidate_in_sample_optimism": float(np.mean(np.asarray(r["candidate_estimate"])
                                                      - np.asarray(r["candidate_true"][NAME]))),
    }
  unconstrained_violates = np.asarray(unconstrained["candidate_true"][NAME]) < b

  claims = {}
  for est, r in per_estimator.items():
    met = r["deployed_meets"]
    claims[f"deployed_meets_constraint_{est}"] = {
        "holds": met["fraction"] >= 1 - config.delta, "value": met["fraction"],
        "tolerance": 1 - config.delta,
        "detail": (f"{met['count']}/{met['seeds']} seeds' deployed policies have true V1 >= b = "
                   f"{b:.4f} (Wilson 95% interval {met['wilson_95'][0]:.3f}..."
                   f"{met['wilson_95'][1]:.3f}); the target is a fraction >= 1 - delta; "
                   f"{r['pass_rate']:.2f} of the candidates passed the held-out test")}
  unconstrained_fraction = _fraction(unconstrained_violates)
  claims["unconstrained_violates"] = {
      "holds": unconstrained_fraction["fraction"] > 0.5,
      "value": unconstrained_fraction["fraction"], "tolerance": 0.5,
      "detail": (f"{unconstrained_fraction['count']}/{seeds} seeds' unconstrained policies "
                 f"(lambda = 0) have true V1 < b (Wilson 95% "
                 f"{unconstrained_fraction['wilson_95'][0]:.3f}..."
                 f"{unconstrained_fraction['wilson_95'][1]:.3f}); 'most' = more than half")}
  tuned_fraction = _fraction(~tuned_meets)
  claims["fixed_weight_violates"] = {
      "holds": tuned_fraction["count"] > 0 and (
          tuned_fraction["fraction"] > config.delta),
      "value": tuned_fraction["fraction"], "tolerance": config.delta,
      "detail": (f"the fixed weight w = {tuned_weight:g} (the smallest on the grid whose mean true "
                 f"V1 over seeds meets b) violates b in {tuned_fraction['count']}/{seeds} seeds, "
                 f"more than delta = {config.delta} of them when this holds")}
  claims["threshold_binds"] = {
      "holds": bool(greedy_values[1] < b <= logging_values[1]),
      "value": b, "tolerance": [float(greedy_values[1]), float(logging_values[1])],
      "detail": ("b lies above the primary-greedy policy's true V1 (the constraint binds) and at "
                 "or below the logging policy's (the fallback of a failed safety test meets it)")}
  claims["deployed_not_above_exact"] = {
      "holds": bool(per_estimator[config.estimators[0]]["deployed_primary_mean"]
                    <= exact_values[0] + 1e-6),
      "value": per_estimator[config.estimators[0]]["deployed_primary_mean"],
      "tolerance": float(exact_values[0]),
      "detail": ("the deployed policies' mean true V0 stays below the exact constrained optimum's "
                 "(the tilt with beta = kl_weight is feasible and near-optimal over all policies)")}

  result = {
      "lambda": main["lambda"],
      "lambda_per_seed": main["lambda_per_seed"],
      "lambda_exact": [float(v) for v in np.asarray(lambda_exact)],
      "lambda_exact_note": ("the multiplier of the KL-regularised problem over all policies "
                            f"(beta = {config.kl_weight}, uniform reference); the learned "
                            "multipliers of a linear policy with an LCB constraint at b + margin "
                            "need not approach it"),
      "names": [NAME],
      "thresholds": {NAME: b},
      "slack": {NAME: main["slack"]},
      "final_slack_per_seed": main["final_slack_per_seed"],
      "reward": main["reward"],
      "kl": main["kl"],
      "kl_note": f"KL(pi_theta || pi_0) over the pool, every {config.eval_every} steps",
      "fixed_weights": {
          "weights": tuned_weight,
          "reward": float(np.mean(tuned["candidate_true"]["primary"])),
          "final_slack_per_seed": {NAME: np.asarray(tuned["candidate_true"][NAME]) - b},
          "kl": float(tuned["kl"][-1]),
          "meets": _fraction(tuned_meets),
          "grid": {f"{w:g}": {
              "true_primary_mean": float(np.mean(fixed[w]["candidate_true"]["primary"])),
              "true_secondary_mean": float(np.mean(fixed[w]["candidate_true"][NAME]))}
              for w in config.fixed_weights},
      },
      "claims": claims,
      "estimators": per_estimator,
      "unconstrained": {**unconstrained, "violates": unconstrained_fraction},
      "in_sample_only": {
          "estimator": config.estimators[0], "meets": in_sample_meets,
          "true_primary_mean": float(np.mean(in_sample_only["candidate_true"]["primary"])),
          "in_sample_optimism": float(np.mean(
              np.asarray(in_sample_only["candidate_estimate"])
              - np.asarray(in_sample_only["candidate_true"][NAME]))),
          "note": ("trained on LCB >= b (no margin) and deployed without the held-out test; the "
                   "in-sample bound of an optimised policy carries no 1 - delta guarantee (its "
                   "in-sample optimism, estimate minus true V1, is measured here)")},
      "exact": {"primary": float(exact_values[0]), NAME: float(exact_values[1]),
                "lambda": float(lambda_exact[0]), "kl_weight": config.kl_weight,
                "reference": "uniform"},
      "reference_values": {"logging": logging_values.tolist(),
                           "primary_greedy": greedy_values.tolist(),
                           "max_secondary": max_secondary, "threshold": b},
      "bound": config.bound,
      "bound_note": ("Student-t: the per-round importance-weighted terms are unbounded, so "
                     "Bernstein would need truncation at a cap c and pays 7 c ln(2/delta) / (3 n); "
                     "t is asymptotic, sound at n in the thousands with weights of moderate tail"),
  }
  result = to_jsonable(result)
  _plot(result, out)
  return result


def _plot(result: dict, out: Path) -> None:
  plt = pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
  for est, r in result["estimators"].items():
    left.plot(np.asarray(r["lambda"])[:, 0], label=f"lambda ({est})")
    right.plot(np.asarray(r["slack"]), label=f"in-sample LCB - b ({est})")
  left.axhline(result["lambda_exact"][0], color="k", ls=":", label="lambda* (tilt)")
  right.axhline(0.0, color="k", ls=":")
  left.set_xlabel("step")
  right.set_xlabel("step")
  left.legend(fontsize=7)
  right.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(Path(out) / "samples.png", dpi=110)
  plt.close(fig)
