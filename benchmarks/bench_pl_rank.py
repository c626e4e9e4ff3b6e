"""Benchmark: PL-Rank-3 against PL-Rank-1 and leave-one-out REINFORCE at equal gradient variance.

    python benchmarks/bench_pl_rank.py [--quick]

One query with D = 100 items, K = 10 ranks (DCG weights 1/log2(k + 2)), sparse graded relevance
(about 30% of the items relevant, labels 1..4) and a near-uniform initial policy (logits
0.5 N(0, 1)), as at the start of learning to rank. Measured in one run:
  - the gradient variance of each estimator as a function of the number of sampled rankings N:
    the mean squared distance of its estimate to a reference (PL-Rank-3 from 2e6 rankings),
    over `--repeats` keys;
  - the N each estimator needs to reach PL-Rank-3's variance at N = 100 (from the variance
    constant N * variance, fitted over the grid, then checked by measuring at that N);
  - the wall time of one jitted gradient at that N (median after a warm-up, compilation
    excluded), and the time ratio to PL-Rank-3 at equal gradient variance;
  - how the time per gradient at N = 100 grows with D and K (where O(N K D) starts to show).
PL-Rank-1 is written as in its paper, with the [N, K, D] table of placement probabilities
(O(N K D)); PL-Rank-3 and REINFORCE compute the placement sums in O(N (D + K)) after a Gumbel
top-K. Results go to benchmarks/results/pl_rank_<platform>.json and .md.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from saferl_jax.ranking.pl_rank import pl_rank_1_gradient, pl_rank_gradient, reinforce_gradient
from timing import median_time, platform_description, write_results

NUM_ITEMS, CUTOFF = 100, 10
TARGET_N = 100
ESTIMATORS = {"pl_rank_3": pl_rank_gradient, "pl_rank_1": pl_rank_1_gradient,
              "reinforce_loo": reinforce_gradient}


def make_query(seed: int = 0):
  rng = np.random.default_rng(seed)
  relevance = rng.integers(1, 5, NUM_ITEMS) * (rng.random(NUM_ITEMS) < 0.3)
  logits = 0.5 * rng.normal(size=NUM_ITEMS)
  rank_weights = 1.0 / np.log2(np.arange(CUTOFF) + 2.0)
  return (jnp.asarray(logits, jnp.float32), jnp.asarray(relevance, jnp.float32),
          jnp.asarray(rank_weights, jnp.float32))


def estimates_over_keys(estimator, query, num_samples: int, keys) -> jax.Array:
  """[len(keys), D] estimates, in batches so that large N fits in memory."""
  logits, relevance, rank_weights = query
  batch = max(1, min(len(keys), 200_000 // num_samples))
  fn = jax.jit(lambda ks: jax.lax.map(
      lambda k: estimator(logits, relevance, rank_weights, key=k, num_samples=num_samples),
      ks, batch_size=batch))
  return fn(keys)


def reference_gradient(query, num_keys: int, num_samples: int) -> jax.Array:
  keys = jax.random.split(jax.random.key(12345), num_keys)
  return jnp.mean(estimates_over_keys(pl_rank_gradient, query, num_samples, keys), axis=0)


def variance(estimator, query, num_samples: int, reference, repeats: int, seed: int) -> float:
  """mean over keys of ||g - reference||^2."""
  keys = jax.random.split(jax.random.key(seed), repeats)
  grads = estimates_over_keys(estimator, query, num_samples, keys)
  return float(jnp.mean(jnp.sum((grads - reference) ** 2, axis=1)))


def time_gradient(estimator, query, num_samples: int, repeats: int) -> float:
  logits, relevance, rank_weights = query
  fn = jax.jit(lambda k: estimator(logits, relevance, rank_weights, key=k,
                                   num_samples=num_samples))
  keys = iter(jax.random.split(jax.random.key(7), repeats + 2))
  return median_time(lambda: fn(next(keys)).block_until_ready(), repeats)


SCALING = [(100, 10), (1000, 10), (1000, 100), (4000, 50)]


def scaling(time_repeats: int, quick: bool) -> list[dict]:
  rows = []
  for num_items, cutoff in SCALING[:2] if quick else SCALING:
    rng = np.random.default_rng(1)
    relevance = rng.integers(0, 5, num_items) * (rng.random(num_items) < 0.3)
    query = (jnp.asarray(0.5 * rng.normal(size=num_items), jnp.float32),
             jnp.asarray(relevance, jnp.float32),
             jnp.asarray(1.0 / np.log2(np.arange(cutoff) + 2.0), jnp.float32))
    row = {"num_items": num_items, "cutoff": cutoff, "num_samples": TARGET_N}
    for name, estimator in ESTIMATORS.items():
      row[f"{name}_s"] = time_gradient(estimator, query, TARGET_N, time_repeats)
    print(row, flush=True)
    rows.append(row)
  return rows


def run(quick: bool, repeats: int, time_repeats: int) -> dict:
  query = make_query()
  ref_keys, ref_n = (50, 4000) if quick else (200, 10_000)
  reference = reference_gradient(query, ref_keys, ref_n)
  grid = [2, 10, 30, 100, 300] if quick else [2, 5, 10, 20, 50, 100, 200, 500, 1000]
  out = {"num_items": NUM_ITEMS, "cutoff": CUTOFF, "reference_rankings": ref_keys * ref_n,
         "repeats": repeats, "grid": grid, "variance": {}, "variance_constant": {}}
  for name, estimator in ESTIMATORS.items():
    out["variance"][name] = [variance(estimator, query, n, reference, repeats, seed=n)
                             for n in grid]
    # Variance ~ c / N: c from the grid points with N >= 10 (REINFORCE's baseline costs a
    # little at very small N).
    out["variance_constant"][name] = float(np.median(
        [n * v for n, v in zip(grid, out["variance"][name]) if n >= 10]))
    print(name, dict(zip(grid, np.round(out["variance"][name], 5))), flush=True)
  target = variance(pl_rank_gradient, query, TARGET_N, reference, repeats, seed=999)
  out["target_variance"] = target
  out["equal_variance"] = {}
  base_time = None
  for name, estimator in ESTIMATORS.items():
    needed = TARGET_N if name == "pl_rank_3" else max(
        2, int(round(out["variance_constant"][name] / target)))
    measured = target if name == "pl_rank_3" else variance(estimator, query, needed, reference,
                                                           repeats, seed=needed + 1)
    seconds = time_gradient(estimator, query, needed, time_repeats)
    base_time = seconds if name == "pl_rank_3" else base_time
    out["equal_variance"][name] = {
        "num_samples": needed, "variance": measured, "seconds": seconds,
        "time_ratio_to_pl_rank_3": seconds / base_time,
        "seconds_at_same_n": time_gradient(estimator, query, TARGET_N, time_repeats)}
    print(name, out["equal_variance"][name], flush=True)
  return out


def markdown(results: dict) -> str:
  r = results["run"]
  lines = [f"# PL-Rank benchmark on {results['platform']}", "",
           f"One query: D = {r['num_items']} items, K = {r['cutoff']} ranks (DCG weights), sparse "
           "graded relevance, near-uniform policy. Variance = mean squared distance to a "
           f"PL-Rank-3 reference from {r['reference_rankings']:.0e} rankings, over "
           f"{r['repeats']} keys.", "",
           "Gradient variance by number of sampled rankings N:", "",
           "| N | " + " | ".join(ESTIMATORS) + " |",
           "|---|" + "---|" * len(ESTIMATORS)]
  for i, n in enumerate(r["grid"]):
    lines.append(f"| {n} | " + " | ".join(f"{r['variance'][k][i]:.4g}" for k in ESTIMATORS) + " |")
  lines += ["", "N * variance (the variance constant): " + ", ".join(
      f"{k} {v:.3g}" for k, v in r["variance_constant"].items()), "",
      f"At equal gradient variance (PL-Rank-3's at N = {TARGET_N}: "
      f"{r['target_variance']:.4g}); jitted, median seconds per gradient:", "",
      "| estimator | N needed | variance measured there | seconds | time ratio to PL-Rank-3 | "
      f"seconds at N = {TARGET_N} |", "|---|---|---|---|---|---|"]
  for k, e in r["equal_variance"].items():
    lines.append(f"| {k} | {e['num_samples']} | {e['variance']:.4g} | {e['seconds']:.2e} | "
                 f"{e['time_ratio_to_pl_rank_3']:.2f}x | {e['seconds_at_same_n']:.2e} |")
  lines += ["", f"Seconds per gradient at N = {TARGET_N} as D and K grow:", "",
            "| D | K | " + " | ".join(ESTIMATORS) + " | pl_rank_1 / pl_rank_3 |",
            "|---|---|" + "---|" * (len(ESTIMATORS) + 1)]
  for row in results["scaling"]:
    lines.append(f"| {row['num_items']} | {row['cutoff']} | "
                 + " | ".join(f"{row[k + '_s']:.2e}" for k in ESTIMATORS)
                 + f" | {row['pl_rank_1_s'] / row['pl_rank_3_s']:.1f}x |")
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="a shorter grid, fewer keys")
  parser.add_argument("--repeats", type=int, default=None, help="keys per variance estimate")
  parser.add_argument("--time-repeats", type=int, default=21)
  args = parser.parse_args()
  repeats = args.repeats or (100 if args.quick else 400)
  results = {"platform": platform_description(),
             "run": run(args.quick, repeats, args.time_repeats),
             "scaling": scaling(args.time_repeats, args.quick)}
  write_results("pl_rank", results, markdown(results))
  for k, e in results["run"]["equal_variance"].items():
    print(f"time ratio at equal gradient variance, {k} / pl_rank_3: "
          f"{e['time_ratio_to_pl_rank_3']:.2f}x (N = {e['num_samples']})")


if __name__ == "__main__":
  sys.exit(main())
