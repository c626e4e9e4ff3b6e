"""Streaming estimation over a log generated chunk by chunk, against the in-memory estimators.

`python benchmarks/bench_streaming.py` streams a 1e8-round synthetic log (A = 10 actions, chunks
of 1e6 rounds, each simulated on the device, checked and folded into the running moments of
IPS, SNIPS, DR, SNDR and beta*-IPS) and reports rounds per second and the process's peak memory.
The alternative measured in the same run is `ope.estimate_all` on one in-memory log (1e7 rounds
by default): its rounds per second and peak memory. Peaks are measured in fresh processes (RSS
growth during the call); the in-memory time is that of a second, compiled call, the streamed time
includes compiling its chunk shape once. The generation alone is timed too, so that the estimation's
share is visible. `--quick`: 1e7 streamed rounds against 1e6 in memory.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from timing import measure_in_fresh_process, platform_description, write_results  # noqa: E402

NAMES = ("ips", "snips", "dr", "sndr", "beta_ips")
KEYS = ("rewards", "actions", "logging_probs", "target_dist", "reward_hat")


def _chunk_maker(num_actions: int, chunk_rounds: int):
  import jax
  from saferl_jax.data import synthetic_bandit as sb
  problem = sb.make_problem(jax.random.key(0), num_actions=num_actions, num_contexts=1000)

  @jax.jit
  def make(key):
    log = sb.simulate_log(problem, key=key, num_rounds=chunk_rounds)
    return dict(sb.estimator_inputs(problem, log)._asdict())
  return make


def stream_log(num_rounds: int, chunk_rounds: int, num_actions: int, estimate: bool = True) -> float:
  """Generates the log chunk by chunk and (if `estimate`) streams it; returns the IPS value."""
  import jax
  from saferl_jax import ope
  make = _chunk_maker(num_actions, chunk_rounds)
  stream = ope.stream_estimators(NAMES)
  state = stream.init()
  for i in range(num_rounds // chunk_rounds):
    chunk = make(jax.random.fold_in(jax.random.key(1), i))
    if estimate:
      state = stream.update(state, chunk)
    else:
      jax.block_until_ready(chunk)
  if not estimate:
    return 0.0
  return float(stream.finalize(state).estimates["ips"].value)


def in_memory(num_rounds: int, num_actions: int) -> float:
  """One log of num_rounds generated at once, then `ope.estimate_all`; returns the IPS value."""
  import jax
  from saferl_jax import ope
  inputs = _chunk_maker(num_actions, num_rounds)(jax.random.key(1))
  out = ope.estimate_all(*(inputs[k] for k in KEYS), estimators=NAMES)
  return float(out["ips"].value)


IMPORTS = "sys.path.insert(0, 'benchmarks')\nfrom bench_streaming import stream_log, in_memory"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=100_000_000)
  parser.add_argument("--chunk", type=int, default=1_000_000)
  parser.add_argument("--in-memory-rounds", type=int, default=10_000_000)
  parser.add_argument("--actions", type=int, default=10)
  parser.add_argument("--quick", action="store_true", help="1e7 streamed rounds, 1e6 in memory")
  args = parser.parse_args()
  if args.quick:
    args.rounds, args.in_memory_rounds = 10_000_000, 1_000_000
  rounds = args.rounds - args.rounds % args.chunk
  call = "value = stream_log(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), {})"
  streamed = measure_in_fresh_process(IMPORTS, call.format(True), "0", rounds, args.chunk, args.actions)
  generated = measure_in_fresh_process(IMPORTS, call.format(False), "0", rounds, args.chunk,
                                       args.actions)
  memory = measure_in_fresh_process(IMPORTS, "value = in_memory(int(sys.argv[1]), int(sys.argv[2]))",
                                    "0", args.in_memory_rounds, args.actions)
  # In memory, the fresh process's time includes compiling for its one shape: time a second call
  # here instead (the streamed side compiles once for 1e2 chunks: its share is small at 1e8).
  import time
  in_memory(args.in_memory_rounds, args.actions)
  start = time.perf_counter()
  in_memory(args.in_memory_rounds, args.actions)
  memory["seconds"] = time.perf_counter() - start
  results = {
      "platform": platform_description(),
      "actions": args.actions, "chunk_rounds": args.chunk,
      "streamed": dict(streamed, rounds=rounds, rounds_per_s=rounds / streamed["seconds"]),
      "generation_only": dict(generated, rounds=rounds, rounds_per_s=rounds / generated["seconds"]),
      "in_memory": dict(memory, rounds=args.in_memory_rounds,
                        rounds_per_s=args.in_memory_rounds / memory["seconds"]),
  }
  estimation_s = max(streamed["seconds"] - generated["seconds"], 1e-9)
  results["streamed"]["estimation_rounds_per_s"] = rounds / estimation_s
  write_results("streaming", results, markdown(results))


def markdown(results: dict) -> str:
  s, g, m = results["streamed"], results["generation_only"], results["in_memory"]
  gib = 2**30
  rows = [
      f"| streamed, chunks of {results['chunk_rounds']:.0e} | {s['rounds']:.0e} | {s['seconds']:.1f} | "
      f"{s['rounds_per_s']:.3g} | {s['peak_bytes'] / gib:.2f} |",
      f"| generation alone (same chunks) | {g['rounds']:.0e} | {g['seconds']:.1f} | "
      f"{g['rounds_per_s']:.3g} | {g['peak_bytes'] / gib:.2f} |",
      f"| in memory (`ope.estimate_all`) | {m['rounds']:.0e} | {m['seconds']:.1f} | "
      f"{m['rounds_per_s']:.3g} | {m['peak_bytes'] / gib:.2f} |",
  ]
  return (f"Streaming estimation ({', '.join(NAMES)}), A = {results['actions']}; "
          f"{results['platform']}\n\n"
          "| run | rounds | seconds | rounds/s | peak GiB |\n|---|---|---|---|---|\n" + "\n".join(rows) +
          f"\n\nEstimation alone (streamed minus generation): {s['estimation_rounds_per_s']:.3g} "
          f"rounds/s. Peak memory, streamed vs in memory: {s['peak_bytes'] / max(m['peak_bytes'], 1):.2f}x "
          f"for {s['rounds'] / m['rounds']:.0f}x the rounds.\n")


if __name__ == "__main__":
  main()
