"""Benchmark: the OPE estimator suite and the bootstrap against Open Bandit Pipeline and numpy.

    python benchmarks/bench_ope.py [--obp-python /work/obp-venv/bin/python] [--quick] [--eager-only]

Measured in one run on the same arrays (A = 20 actions):
  - the machine's memory bandwidth (numpy copy and a jitted JAX sum over 512 MB);
  - IPS + SNIPS + DR on n = 1e6 and 1e7 rounds: saferl_jax jitted (`estimate_all`, one pass,
    float32, data already on the device), plain numpy (float32 and float64), and OBP 0.5.7
    (float64, its own venv, in a subprocess through benchmarks/obp_side.py; n = 1e6 only);
    with the fraction of the memory bandwidth each reaches;
  - the same three estimators called as the README calls them, eagerly: `ips`, `snips` and `dr`
    one after the other on concrete device arrays, values checked (a fresh copy of the arrays for
    every repeat, so no check is skipped as already passed), against the same three calls inside
    one `jax.jit` and against OBP, as ratios;
  - the percentile bootstrap of IPS, 1000 resamples of n = 1e5: saferl_jax (hash and threefry
    index generators), a numpy loop in OBP's style, and OBP's own `estimate_interval`.
Timings are medians of repeated calls after a warm-up (compilation excluded). Results go to
benchmarks/results/ope_<platform>.json and .md. OBP installs only in a separate venv; without
--obp-python its columns are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from saferl_jax import ope
from timing import median_time, memory_bandwidth, platform_description, write_results

N_ACTIONS = 20


def make_data(n: int, seed: int = 0) -> dict:
  """Logged data with a softmax logger and target over A actions (numpy float64)."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, N_ACTIONS))
  logging = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  target = np.exp(-logits) / np.exp(-logits).sum(1, keepdims=True)
  u = rng.random((n, 1))
  actions = np.minimum((logging.cumsum(1) < u).sum(1), N_ACTIONS - 1)
  logging_probs = logging[np.arange(n), actions]
  reward_hat = rng.random((n, N_ACTIONS)) * 0.5
  rewards = (rng.random(n) < reward_hat[np.arange(n), actions]).astype(np.float64)
  return dict(rewards=rewards, actions=actions.astype(np.int64), logging_probs=logging_probs,
              target_dist=target, reward_hat=reward_hat)


def numpy_suite(rewards, actions, logging_probs, target_dist, reward_hat):
  """IPS, SNIPS and DR in plain vectorised numpy (what a careful user would write)."""
  rows = np.arange(len(rewards))
  weights = target_dist[rows, actions] / logging_probs
  ips = np.mean(weights * rewards)
  snips = np.sum(weights * rewards) / np.sum(weights)
  dm_terms = np.einsum("ij,ij->i", target_dist, reward_hat)
  dr = np.mean(dm_terms + weights * (rewards - reward_hat[rows, actions]))
  return ips, snips, dr


def readme_calls(rewards, actions, logging_probs, target_dist, reward_hat):
  """IPS, SNIPS and DR as the README calls them: three public calls on one logged dataset."""
  return (ope.ips(rewards, actions, logging_probs, target_dist).value,
          ope.snips(rewards, actions, logging_probs, target_dist).value,
          ope.dr(rewards, actions, logging_probs, target_dist, reward_hat).value)


jitted_readme_calls = jax.jit(readme_calls)


def eager_time(data: dict, repeats: int) -> float:
  """Median seconds of the three eager calls, each repeat on fresh device copies of the arrays
  (copied outside the timed region): every value check runs, none is skipped as already passed."""
  times = []
  for _ in range(repeats + 1):  # the first one compiles the kernels
    fresh = {k: jnp.array(v, copy=True) for k, v in data.items()}
    jax.block_until_ready(fresh)
    start = time.perf_counter()
    jax.block_until_ready(readme_calls(**fresh))
    times.append(time.perf_counter() - start)
    del fresh
  return statistics.median(times[1:])


def bench_eager(n: int, repeats: int, obp_python: str | None) -> dict:
  """Eager IPS + SNIPS + DR (validated) against the same calls inside jax.jit and OBP."""
  raw = make_data(n)
  data = {k: jnp.asarray(v) for k, v in raw.items()}
  out = {"n": n, "n_actions": N_ACTIONS}
  out["jit_s"] = median_time(lambda: jax.block_until_ready(jitted_readme_calls(**data)), repeats)
  out["eager_s"] = eager_time(data, repeats)
  out["eager_checks_passed_s"] = median_time(  # the same arrays again: their checks are skipped
      lambda: jax.block_until_ready(readme_calls(**data)), repeats)
  out["eager_over_jit"] = out["eager_s"] / out["jit_s"]
  if obp_python:
    obp = run_obp(obp_python, raw, repeats)
    out["obp_s"] = obp["timings"]["ips_snips_dr"]["median_s"]
    out["eager_speedup_vs_obp"] = out["obp_s"] / out["eager_s"]
    out["jit_speedup_vs_obp"] = out["obp_s"] / out["jit_s"]
  return out


def eager_summary(e: dict) -> str:
  """One line of ratios: eager against jit and OBP."""
  line = (f"IPS+SNIPS+DR n={e['n']:.0e} A={e['n_actions']}: eager {1e3 * e['eager_s']:.1f} ms, "
          f"jit {1e3 * e['jit_s']:.1f} ms, eager/jit {e['eager_over_jit']:.2f}x")
  if "obp_s" in e:
    line += (f"; OBP {1e3 * e['obp_s']:.1f} ms: eager {e['eager_speedup_vs_obp']:.1f}x faster, "
             f"jit {e['jit_speedup_vs_obp']:.1f}x faster")
  return line


@jax.jit
def jax_suite(rewards, actions, logging_probs, target_dist, reward_hat):
  estimates = ope.estimate_all(rewards, actions, logging_probs, target_dist, reward_hat,
                               estimators=("ips", "snips", "dr"))
  return {name: e.value for name, e in estimates.items()}


def bench_suite(n: int, repeats: int, obp_python: str | None, bandwidth: dict) -> dict:
  data = make_data(n)
  bytes_f32 = 4 * (2 * n * N_ACTIONS + 3 * n)  # target_dist, reward_hat, three [n] arrays
  bytes_f64 = 2 * bytes_f32
  out = {"n": n, "n_actions": N_ACTIONS}
  device = {k: jnp.asarray(v) for k, v in data.items()}
  out["saferl_jax_s"] = median_time(
      lambda: jax.block_until_ready(jax_suite(**device)), repeats)
  out["saferl_jax_values"] = {k: float(v) for k, v in jax_suite(**device).items()}
  out["saferl_jax_eager_validated_s"] = median_time(
      lambda: jax.block_until_ready(ope.estimate_all(**device, estimators=("ips", "snips", "dr"))), 3)
  data32 = {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in data.items()}
  out["numpy_f32_s"] = median_time(lambda: numpy_suite(**data32), repeats)
  out["numpy_f64_s"] = median_time(lambda: numpy_suite(**data), repeats)
  peak = max(bandwidth["copy_GBps"], bandwidth["read_GBps"])
  out["bandwidth_fraction"] = {
      "saferl_jax": bytes_f32 / out["saferl_jax_s"] / 1e9 / peak,
      "numpy_f32": bytes_f32 / out["numpy_f32_s"] / 1e9 / peak,
      "numpy_f64": bytes_f64 / out["numpy_f64_s"] / 1e9 / peak,
  }
  out["bandwidth_bound_s"] = bytes_f32 / peak / 1e9
  if obp_python:
    obp = run_obp(obp_python, data, repeats)
    out["obp_s"] = obp["timings"]["ips_snips_dr"]["median_s"]
    out["obp_values"] = obp["values"]
    out["bandwidth_fraction"]["obp"] = bytes_f64 / out["obp_s"] / 1e9 / peak
    out["speedup_vs_obp"] = out["obp_s"] / out["saferl_jax_s"]
    out["bandwidth_limited_speedup_vs_obp"] = out["obp_s"] / out["bandwidth_bound_s"]
  out["speedup_vs_numpy_f64"] = out["numpy_f64_s"] / out["saferl_jax_s"]
  return out


def run_obp(obp_python: str, data: dict, repeats: int, bootstrap_data: dict | None = None) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    np.savez(Path(tmp) / "in.npz", **data)
    cmd = [obp_python, str(Path(__file__).parent / "obp_side.py"), "--input", f"{tmp}/in.npz",
           "--output", f"{tmp}/out.json", "--repeats", str(repeats)]
    if bootstrap_data is not None:
      np.savez(Path(tmp) / "boot.npz", **bootstrap_data)
      cmd += ["--bootstrap-input", f"{tmp}/boot.npz"]
    subprocess.run(cmd, check=True)
    return json.loads((Path(tmp) / "out.json").read_text())


def bench_bootstrap(n: int, num_resamples: int, repeats: int, obp_python: str | None) -> dict:
  data = make_data(n, seed=1)
  rounds = ope.logged_rounds(data["rewards"], data["actions"], data["logging_probs"],
                             data["target_dist"])
  out = {"n": n, "num_resamples": num_resamples}
  for generator in ("hash", "threefry"):
    interval = jax.jit(lambda key, r, g=generator: ope.estimator_bootstrap_interval(
        ope.ips_from_rounds, r, key=key, num_resamples=num_resamples, generator=g))
    keys = iter(jax.random.split(jax.random.key(0), repeats + 2))
    out[f"saferl_jax_{generator}_s"] = median_time(
        lambda: jax.block_until_ready(interval(next(keys), rounds)), repeats)

  contributions = np.asarray(rounds.weights * rounds.rewards, np.float64)

  def numpy_loop():  # OBP's algorithm: a RandomState.choice per resample
    rng = np.random.RandomState(0)
    means = [rng.choice(contributions, size=n, replace=True).mean() for _ in range(num_resamples)]
    return np.percentile(means, [2.5, 97.5])
  out["numpy_loop_s"] = median_time(numpy_loop, repeats)
  if obp_python:
    small = make_data(1000)
    obp = run_obp(obp_python, small, 1, bootstrap_data=data)
    out["obp_s"] = obp["timings"]["bootstrap_ips_1000"]["median_s"]
    out["speedup_vs_obp"] = out["obp_s"] / out["saferl_jax_hash_s"]
  out["speedup_vs_numpy_loop"] = out["numpy_loop_s"] / out["saferl_jax_hash_s"]
  return out


def markdown(results: dict) -> str:
  lines = [f"# OPE benchmark on {results['platform']}", "",
           f"Memory bandwidth: copy {results['bandwidth']['copy_GBps']:.1f} GB/s, "
           f"read {results['bandwidth']['read_GBps']:.1f} GB/s.", "",
           "IPS + SNIPS + DR, A = 20 (median seconds; fraction of memory bandwidth in brackets):", "",
           "| n | saferl_jax (f32, jit) | numpy f32 | numpy f64 | OBP 0.5.7 (f64) | vs OBP | "
           "bandwidth-limited vs OBP | vs numpy f64 |",
           "|---|---|---|---|---|---|---|---|"]
  for s in results["suite"]:
    frac = s["bandwidth_fraction"]
    obp = (f"{s['obp_s']:.4f} ({frac['obp']:.0%})" if "obp_s" in s else "n/a")
    vs_obp = f"{s['speedup_vs_obp']:.1f}x" if "obp_s" in s else "n/a"
    bound = f"{s['bandwidth_limited_speedup_vs_obp']:.1f}x" if "obp_s" in s else "n/a"
    lines.append(f"| {s['n']:.0e} | {s['saferl_jax_s']:.4f} ({frac['saferl_jax']:.0%}) | "
                 f"{s['numpy_f32_s']:.4f} ({frac['numpy_f32']:.0%}) | "
                 f"{s['numpy_f64_s']:.4f} ({frac['numpy_f64']:.0%}) | {obp} | {vs_obp} | {bound} | "
                 f"{s['speedup_vs_numpy_f64']:.1f}x |")
  e = results["eager"]
  obp = lambda key: f"{e[key]:.1f}x" if key in e else "n/a"
  lines += ["", f"IPS + SNIPS + DR called as the README calls them (`ips`, `snips`, `dr` on concrete "
            f"arrays), n = {e['n']:.0e}, A = {e['n_actions']} (median milliseconds):", "",
            "| eager, values checked | eager, checks already passed | the three calls in jax.jit | "
            "OBP 0.5.7 | eager / jit | OBP / eager | OBP / jit |",
            "|---|---|---|---|---|---|---|",
            f"| {1e3 * e['eager_s']:.1f} | {1e3 * e['eager_checks_passed_s']:.1f} | "
            f"{1e3 * e['jit_s']:.1f} | " + (f"{1e3 * e['obp_s']:.1f}" if "obp_s" in e else "n/a")
            + f" | {e['eager_over_jit']:.2f}x | {obp('eager_speedup_vs_obp')} | "
            f"{obp('jit_speedup_vs_obp')} |"]
  b = results["bootstrap"]
  lines += ["", f"Percentile bootstrap of IPS, {b['num_resamples']} resamples of n = {b['n']:.0e} "
            "(median seconds):", "",
            "| saferl_jax (hash) | saferl_jax (threefry) | numpy loop (OBP's method) | OBP 0.5.7 | vs OBP |",
            "|---|---|---|---|---|",
            f"| {b['saferl_jax_hash_s']:.3f} | {b['saferl_jax_threefry_s']:.3f} | {b['numpy_loop_s']:.3f} | "
            + (f"{b['obp_s']:.3f} | {b['speedup_vs_obp']:.1f}x |" if "obp_s" in b else "n/a | n/a |")]
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--obp-python", default=os.environ.get("OBP_PYTHON"))
  parser.add_argument("--quick", action="store_true", help="n = 1e6 only, fewer repeats")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--eager-only", action="store_true",
                      help="only eager vs jit vs OBP at n = 1e6; prints, writes no results file")
  args = parser.parse_args()
  repeats = 3 if args.quick else args.repeats
  if args.eager_only:
    eager = bench_eager(1_000_000, repeats, args.obp_python)
    print(json.dumps(eager, indent=1))
    print(eager_summary(eager))
    return
  results = {"platform": platform_description(),
             "bandwidth": memory_bandwidth(), "suite": []}
  for n in (1_000_000,) if args.quick else (1_000_000, 10_000_000):
    # OBP at 1e7 needs several 1.6 GB float64 copies; it is measured at 1e6 only.
    obp = args.obp_python if n == 1_000_000 else None
    results["suite"].append(bench_suite(n, repeats, obp, results["bandwidth"]))
    print(json.dumps(results["suite"][-1], indent=1), flush=True)
  results["eager"] = bench_eager(1_000_000, repeats, args.obp_python)
  print(json.dumps(results["eager"], indent=1), flush=True)
  print(eager_summary(results["eager"]), flush=True)
  results["bootstrap"] = bench_bootstrap(100_000, 1000, repeats, args.obp_python)
  print(json.dumps(results["bootstrap"], indent=1))
  write_results("ope", results, markdown(results))


if __name__ == "__main__":
  sys.exit(main())
