"""Benchmark: Plackett-Luce sampling and log-probabilities against TensorFlow Probability,
and click logging against numpy.

    python benchmarks/bench_ranking.py [--quick] [--repeats 5] [--sections sampling clicks]

Measured in one process on the same arrays (1e5 lists of D = 100 items, float32 logits):
  - top-5 sampling: saferl_jax `sample_rankings(k=5)` (Gumbel noise + `lax.top_k`) with its
    default "hash" generator and with threefry, against tfp.substrates.jax PlackettLuce,
    which has no top-k and sorts the whole list (its samples are sliced to 5);
  - full-ranking sampling: the same, both sides sorting the whole list;
  - full-ranking log-probabilities: saferl_jax `ranking_log_prob` (stable: max-shifted
    tail sums as one triangular matrix product, exact log-space path when a list's
    logits spread over more than ~60 nats) against tfp's `log_prob` (tail sums by a
    plain cumsum of exp(logits), no shift), and saferl_jax's exact path on its own
    (logits spread over 200 nats);
  - the machine's memory bandwidth, and the fraction of it each log-prob reaches;
  - click logging (1e6 sessions: query, logger's top-5, trust-bias clicks, counts per query)
    in one jitted call, against the same simulation in vectorised numpy.
Every function is jitted (tfp too: its sample and log_prob inside `jax.jit`); timings are
medians of repeated calls after a warm-up (compilation excluded). Results go to
benchmarks/results/ranking_<platform>.json and .md. `main()` runs a list of sections; add
a section as a function of (args, results) that returns a dict and list it in SECTIONS.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from tensorflow_probability.substrates.jax import distributions as tfd

from saferl_jax.ranking import ranking_log_prob, sample_rankings
from timing import median_time, memory_bandwidth, platform_description, write_results

NUM_ITEMS = 100
TOP_K = 5


def make_logits(num_lists: int, scale: float = 1.0, seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (num_lists, NUM_ITEMS)) * scale


# Jitted functions under test.

_hash_top_k = jax.jit(lambda key, m: sample_rankings(m, key=key, k=TOP_K))
_threefry_top_k = jax.jit(lambda key, m: sample_rankings(m, key=key, k=TOP_K, generator="threefry"))
_tfp_top_k = jax.jit(lambda key, m: tfd.PlackettLuce(scores=jnp.exp(m)).sample(seed=key)[..., :TOP_K])
_hash_full = jax.jit(lambda key, m: sample_rankings(m, key=key))
_threefry_full = jax.jit(lambda key, m: sample_rankings(m, key=key, generator="threefry"))
_tfp_full = jax.jit(lambda key, m: tfd.PlackettLuce(scores=jnp.exp(m)).sample(seed=key))
_log_prob = jax.jit(ranking_log_prob)
_tfp_log_prob = jax.jit(lambda m, y: tfd.PlackettLuce(scores=jnp.exp(m)).log_prob(y))


def _time_sampler(fn, logits, repeats):
  keys = iter(jax.random.split(jax.random.key(1), repeats + 2))
  return median_time(lambda: jax.block_until_ready(fn(next(keys), logits)), repeats)


def section_sampling(args, results) -> dict:
  """Top-5 and full-ranking sampling, and full-ranking log-probs, against tfp."""
  n = args.num_lists
  logits = make_logits(n)
  out = {"num_lists": n, "num_items": NUM_ITEMS, "k": TOP_K}

  top = {"saferl_jax_hash_s": _time_sampler(_hash_top_k, logits, args.repeats),
         "saferl_jax_threefry_s": _time_sampler(_threefry_top_k, logits, args.repeats),
         "tfp_s": _time_sampler(_tfp_top_k, logits, args.repeats)}
  top["speedup_hash_vs_tfp"] = top["tfp_s"] / top["saferl_jax_hash_s"]
  top["speedup_threefry_vs_tfp"] = top["tfp_s"] / top["saferl_jax_threefry_s"]
  top["lists_per_s_hash"] = n / top["saferl_jax_hash_s"]
  out["top_k_sampling"] = top
  print("top-5 sampling", json.dumps(top, indent=1), flush=True)

  full = {"saferl_jax_hash_s": _time_sampler(_hash_full, logits, args.repeats),
          "saferl_jax_threefry_s": _time_sampler(_threefry_full, logits, args.repeats),
          "tfp_s": _time_sampler(_tfp_full, logits, args.repeats)}
  full["speedup_hash_vs_tfp"] = full["tfp_s"] / full["saferl_jax_hash_s"]
  full["speedup_threefry_vs_tfp"] = full["tfp_s"] / full["saferl_jax_threefry_s"]
  out["full_sampling"] = full
  print("full sampling", json.dumps(full, indent=1), flush=True)

  rankings = _hash_full(jax.random.key(2), logits)
  spread = make_logits(n, scale=100.0, seed=3)  # ~200-nat spread: the exact path
  spread_rankings = _hash_full(jax.random.key(4), spread)
  peak = max(results["bandwidth"]["copy_GBps"], results["bandwidth"]["read_GBps"])
  nbytes = 8 * n * NUM_ITEMS  # float32 logits + int32 rankings
  lp = {"saferl_jax_s": median_time(lambda: _log_prob(logits, rankings).block_until_ready(),
                                    args.repeats),
        "saferl_jax_exact_path_s": median_time(
            lambda: _log_prob(spread, spread_rankings).block_until_ready(), args.repeats),
        "tfp_s": median_time(lambda: _tfp_log_prob(logits, rankings).block_until_ready(),
                             args.repeats)}
  lp["speedup_vs_tfp"] = lp["tfp_s"] / lp["saferl_jax_s"]
  lp["bandwidth_fraction"] = {"saferl_jax": nbytes / lp["saferl_jax_s"] / 1e9 / peak,
                              "tfp": nbytes / lp["tfp_s"] / 1e9 / peak}
  ours = np.asarray(_log_prob(logits, rankings), np.float64)
  theirs = np.asarray(_tfp_log_prob(logits, rankings), np.float64)
  lp["max_abs_diff_vs_tfp"] = float(np.max(np.abs(ours - theirs)))
  lp["tfp_nonfinite_on_spread_logits"] = int(np.sum(~np.isfinite(
      np.asarray(_tfp_log_prob(spread, spread_rankings)))))
  out["log_prob"] = lp
  print("full-ranking log-prob", json.dumps(lp, indent=1), flush=True)
  return out


def _numpy_click_log(rng, logging_logits, labels, alpha, beta, num_sessions):
  """The same simulation as `simulate_click_log`, written as a numpy user would (vectorised)."""
  num_queries, num_docs = logging_logits.shape
  k = alpha.shape[0]
  query_ids = rng.integers(0, num_queries, num_sessions)
  scores = logging_logits[query_ids] + rng.gumbel(size=(num_sessions, num_docs)).astype(np.float32)
  top = np.argpartition(-scores, k, axis=1)[:, :k]
  order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
  rankings = np.take_along_axis(top, order, axis=1)
  relevance = labels[query_ids[:, None], rankings] / 4.0
  clicks = rng.random((num_sessions, k)) < alpha * relevance + beta
  session_counts = np.bincount(query_ids, minlength=num_queries)
  click_counts = np.zeros((num_queries, num_docs))
  np.add.at(click_counts, (query_ids[:, None], rankings), clicks)
  return session_counts, click_counts


def section_clicks(args, results) -> dict:
  """Logging sessions: sample the logger's top-5, click under trust bias, count per query."""
  from saferl_jax.cltr import trust_bias
  from saferl_jax.data.click_logs import aggregate_sessions
  from saferl_jax.cltr.clicks import simulate_sessions
  num_queries, num_docs, n = 1000, 20, args.num_sessions
  logits = jax.random.normal(jax.random.key(5), (num_queries, num_docs))
  labels = jax.random.randint(jax.random.key(6), (num_queries, num_docs), 0, 5)
  model = trust_bias(TOP_K)

  @jax.jit
  def log_sessions(key):
    query_key, ranking_key, click_key = jax.random.split(key, 3)
    query_ids = jax.random.randint(query_key, (n,), 0, num_queries)
    rankings = sample_rankings(logits[query_ids], key=ranking_key, k=TOP_K)
    clicks = simulate_sessions(model, query_ids, rankings, labels, key=click_key)
    return aggregate_sessions(query_ids, rankings, clicks, num_queries=num_queries,
                              num_docs=num_docs)

  keys = iter(jax.random.split(jax.random.key(7), args.repeats + 2))
  ours = median_time(lambda: jax.block_until_ready(log_sessions(next(keys))), args.repeats)
  rng = np.random.default_rng(0)
  logits_np, labels_np = np.asarray(logits), np.asarray(labels)
  alpha, beta = np.asarray(model.alpha), np.asarray(model.beta)
  theirs = median_time(lambda: _numpy_click_log(rng, logits_np, labels_np, alpha, beta, n),
                       max(1, args.repeats // 2))
  # Same model, same counts in expectation: compare the click-through rates per rank.
  ours_clicks = float(np.asarray(log_sessions(jax.random.key(8))[1]).sum()) / n
  theirs_clicks = float(_numpy_click_log(rng, logits_np, labels_np, alpha, beta, n)[1].sum()) / n
  out = {"num_sessions": n, "num_queries": num_queries, "num_docs": num_docs, "k": TOP_K,
         "saferl_jax_s": ours, "numpy_s": theirs, "speedup_vs_numpy": theirs / ours,
         "sessions_per_s": n / ours, "numpy_sessions_per_s": n / theirs,
         "clicks_per_session": {"saferl_jax": ours_clicks, "numpy": theirs_clicks}}
  print("click logging", json.dumps(out, indent=1), flush=True)
  return out


SECTIONS = {"sampling": section_sampling, "clicks": section_clicks}


def markdown(results: dict) -> str:
  lines = [f"# Ranking benchmark on {results['platform']}", "",
           f"Memory bandwidth: copy {results['bandwidth']['copy_GBps']:.1f} GB/s, "
           f"read {results['bandwidth']['read_GBps']:.1f} GB/s.", ""]
  s = results.get("sampling")
  if s:
    n, d = s["num_lists"], s["num_items"]
    lines += [f"Plackett-Luce, {n:.0e} lists of {d} items, all jitted (median seconds; "
              "speed-up over tfp.substrates.jax PlackettLuce in brackets):", "",
              "| task | saferl_jax (hash) | saferl_jax (threefry) | tfp |",
              "|---|---|---|---|"]
    for name, key in [(f"top-{s['k']} sampling", "top_k_sampling"),
                      ("full-ranking sampling", "full_sampling")]:
      r = s[key]
      lines.append(f"| {name} | {r['saferl_jax_hash_s']:.4f} ({r['speedup_hash_vs_tfp']:.1f}x) | "
                   f"{r['saferl_jax_threefry_s']:.4f} ({r['speedup_threefry_vs_tfp']:.1f}x) | "
                   f"{r['tfp_s']:.4f} |")
    lp = s["log_prob"]
    frac = lp["bandwidth_fraction"]
    lines += ["", "Full-ranking log-probabilities (median seconds; fraction of memory bandwidth "
              "in brackets):", "",
              "| saferl_jax | saferl_jax, exact path (200-nat spread) | tfp | vs tfp | "
              "max abs diff | tfp non-finite on the spread logits |",
              "|---|---|---|---|---|---|",
              f"| {lp['saferl_jax_s']:.4f} ({frac['saferl_jax']:.0%}) | "
              f"{lp['saferl_jax_exact_path_s']:.4f} | {lp['tfp_s']:.4f} ({frac['tfp']:.0%}) | "
              f"{lp['speedup_vs_tfp']:.1f}x | {lp['max_abs_diff_vs_tfp']:.1e} | "
              f"{lp['tfp_nonfinite_on_spread_logits']} of {n} |"]
  c = results.get("clicks")
  if c:
    lines += ["", f"Logging {c['num_sessions']:.0e} sessions (query drawn, top-{c['k']} of "
              f"{c['num_docs']} sampled from a PL logger, trust-bias clicks, counts per query for "
              f"{c['num_queries']} queries), jitted, against the same in vectorised numpy:", "",
              "| saferl_jax | numpy | speed-up | sessions per second | clicks per session (ours, numpy) |",
              "|---|---|---|---|---|",
              f"| {c['saferl_jax_s']:.4f} s | {c['numpy_s']:.4f} s | {c['speedup_vs_numpy']:.1f}x | "
              f"{c['sessions_per_s']:.3g} | {c['clicks_per_session']['saferl_jax']:.4f}, "
              f"{c['clicks_per_session']['numpy']:.4f} |"]
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="1e4 lists, 3 repeats")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--num-lists", type=int, default=100_000)
  parser.add_argument("--num-sessions", type=int, default=1_000_000)
  parser.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=list(SECTIONS))
  args = parser.parse_args()
  if args.quick:
    args.repeats, args.num_lists, args.num_sessions = 3, 10_000, 100_000
  results = {"platform": platform_description(),
             "bandwidth": memory_bandwidth()}
  for name in args.sections:
    results[name] = SECTIONS[name](args, results)
  write_results("ranking", results, markdown(results))


if __name__ == "__main__":
  sys.exit(main())
