"""Benchmark: `data.load_obd` and `data.iter_obd` against `pandas.read_csv` of one OBD file.

    python benchmarks/bench_obd_loader.py [--rows 2000000] [--repeats 3] [--gzip]
                                          [--chunk-rounds 50000]

Writes a log in OBD's exact format (the shipped BTS sample's header and columns, its rows drawn
with replacement and kept in time order, a fresh index column) to a temporary folder in OBD's
layout, <tmp>/bts/all/all.csv (all.csv.gz with --gzip) beside the sample's item_context.csv,
then measures in one run:
  - time: the median of `repeats` calls of load_obd(<tmp>), of a loop over every chunk of
    iter_obd(<tmp>, chunk_rounds=...) (its first pass included) and of pandas.read_csv(<file>)
    (its default C engine and type inference: what a user would call), after one warm-up call
    each (so all read the file from the page cache), taking turns so that a change in the
    machine's load falls on all; with each call's CPU time (all threads), which other work on a
    shared machine disturbs less than wall time;
  - peak memory: each reader once in a fresh Python process, its peak resident set size during
    the call minus its resident set size before it (Linux: VmHWM after resetting it through
    /proc/self/clear_refs; elsewhere ru_maxrss minus its value after the imports); tracemalloc
    would miss pyarrow's allocations.
Prints the time ratio and each reader's peak over the bytes it returns (the OBDLog's arrays; the
DataFrame's deep memory usage; for iter_obd the largest chunk's arrays, the loop holding one
chunk while the next is built, as a `for chunk in iter_obd(...)` loop does), and whether the
loader's goals are met: at most 2x pandas' time, peak at most 3x the arrays returned. Results go to benchmarks/results/obd_loader_<platform>.json
and .md. pandas is needed only here (pip install pandas); the library never imports it.
"""

from __future__ import annotations

import argparse
import gzip
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from saferl_jax.data import iter_obd, load_obd, sample_path
from timing import measure_in_fresh_process, platform_description, write_results

TIME_GOAL = 2.0  # load_obd's time over pandas.read_csv's
MEMORY_GOAL = 3.0  # load_obd's peak memory over the bytes of the arrays it returns


def write_log(folder: Path, num_rows: int, *, compress: bool, seed: int = 0) -> Path:
  """An OBD log of num_rows rows resampled from the shipped BTS sample, in OBD's layout."""
  sample = sample_path("bts", "all")
  lines = gzip.decompress((sample / "all.csv.gz").read_bytes()).decode().splitlines()
  header, rows = lines[0], [line.split(",", 1)[1] for line in lines[1:]]  # drop the index
  # Sorted draws keep the timestamps in order, as OBD's files are.
  draws = np.sort(np.random.default_rng(seed).integers(0, len(rows), num_rows))
  log_dir = folder / "bts" / "all"
  log_dir.mkdir(parents=True)
  shutil.copy(sample / "item_context.csv", log_dir / "item_context.csv")
  path = log_dir / ("all.csv.gz" if compress else "all.csv")
  with (gzip.open(path, "wt", compresslevel=1) if compress else open(path, "w")) as out:
    out.write(header + "\n")
    for start in range(0, num_rows, 100_000):
      chunk = draws[start:start + 100_000]
      out.write("".join(f"{start + i},{rows[r]}\n" for i, r in enumerate(chunk)))
  return path


def interleaved_times(calls: dict, repeats: int) -> tuple[dict, dict]:
  """Median wall and CPU seconds of each call, after a warm-up, the calls taking turns."""
  wall, cpu = {name: [] for name in calls}, {name: [] for name in calls}
  for name, call in calls.items():
    call()
  for _ in range(repeats):
    for name, call in calls.items():
      usage = resource.getrusage(resource.RUSAGE_SELF)
      start = time.perf_counter()
      call()
      wall[name].append(time.perf_counter() - start)
      after = resource.getrusage(resource.RUSAGE_SELF)
      cpu[name].append(after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime)
  return ({name: statistics.median(v) for name, v in wall.items()},
          {name: statistics.median(v) for name, v in cpu.items()})


def log_bytes(log) -> int:
  """Bytes of the numpy arrays an OBDLog holds."""
  return sum(value.nbytes for value in log if isinstance(value, np.ndarray))



def consume_chunks(root: Path, chunk_rounds: int) -> int:
  """Reads every chunk of iter_obd(root); returns the rounds read."""
  return sum(len(chunk.rewards) for chunk in iter_obd(root, chunk_rounds=chunk_rounds))


# In a fresh process: sys.argv[1:] = the root folder, the file, chunk_rounds.
READERS = {
    "load_obd": dict(
        imports="import numpy as np\nfrom saferl_jax.data import load_obd",
        call="result = load_obd(sys.argv[1])",
        returned="sum(v.nbytes for v in result if isinstance(v, np.ndarray))"),
    "iter_obd": dict(
        imports="import numpy as np\nfrom saferl_jax.data import iter_obd",
        call=("result = 0\n"
              "for chunk in iter_obd(sys.argv[1], chunk_rounds=int(sys.argv[3])):\n"
              "  result = max(result, sum(v.nbytes for v in chunk if isinstance(v, np.ndarray)))"),
        returned="result"),
    "pandas.read_csv": dict(
        imports="import pandas",
        call="result = pandas.read_csv(sys.argv[2])",
        returned="result.memory_usage(deep=True).sum()"),
}


def peak_memory(reader: str, root: Path, path: Path, chunk_rounds: int) -> dict:
  """Peak RSS growth during one call in a fresh process, and the bytes it returned."""
  spec = READERS[reader]
  return measure_in_fresh_process(spec["imports"], spec["call"], spec["returned"], root, path,
                                  chunk_rounds)


def markdown(results: dict) -> str:
  t, c, m = results["time_s"], results["cpu_s"], results["memory"]
  time_ratio = results["time_ratio"]
  lines = [
      f"# OBD loader ({results['platform']})", "",
      f"{results['rows']:,} rows, {results['file_bytes'] / 1e6:,.0f} MB ({results['file']}), "
      f"median of {results['repeats']} calls each (taking turns) after a warm-up; peak memory in a "
      f"fresh process. {results['cpu_count']} cores; load average "
      f"{results['load_average'][0]:.1f} before the timings, {results['load_average'][1]:.1f} after. "
      f"iter_obd reads chunks of {results['chunk_rounds']:,} rounds; its 'returned' is the "
      f"largest chunk's arrays.",
      "",
      "| reader | time (s) | CPU time (s) | peak memory (MB) | returned (MB) | peak / returned |",
      "|---|---|---|---|---|---|",
  ]
  for name in READERS:
    lines.append(f"| {name} | {t[name]:.2f} | {c[name]:.2f} | {m[name]['peak_bytes'] / 1e6:,.0f} | "
                 f"{m[name]['returned_bytes'] / 1e6:,.0f} | {m[name]['ratio']:.2f} |")
  lines += [
      "",
      f"- time: load_obd / pandas.read_csv = {time_ratio:.2f} (goal <= {TIME_GOAL}: "
      f"{'met' if time_ratio <= TIME_GOAL else 'NOT met'}).",
      f"- peak memory / bytes of the arrays returned = {m['load_obd']['ratio']:.2f} (goal <= "
      f"{MEMORY_GOAL}: {'met' if m['load_obd']['ratio'] <= MEMORY_GOAL else 'NOT met'}).",
      f"- iter_obd: peak {m['iter_obd']['peak_bytes'] / 1e6:,.0f} MB = "
      f"{m['iter_obd']['peak_bytes'] / m['load_obd']['returned_bytes']:.3f} x the whole log's "
      f"arrays, {m['iter_obd']['ratio']:.2f} x one chunk's; time "
      f"{t['iter_obd'] / t['load_obd']:.2f} x load_obd's (it reads the file twice).",
      "",
  ]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=2_000_000)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--gzip", action="store_true", help="write and read all.csv.gz")
  parser.add_argument("--chunk-rounds", type=int, default=50_000, help="iter_obd's chunk_rounds")
  args = parser.parse_args()
  import pandas  # the benchmark's alternative, not a dependency of the library

  with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp)
    path = write_log(root, args.rows, compress=args.gzip)
    log = load_obd(root)
    assert len(log.rewards) == args.rows and log.num_actions == 80, "unexpected log"
    returned = log_bytes(log)
    del log
    load_before = os.getloadavg()[0]
    assert consume_chunks(root, args.chunk_rounds) == args.rows, "unexpected chunks"
    times, cpu_times = interleaved_times(
        {"load_obd": lambda: load_obd(root),
         "iter_obd": lambda: consume_chunks(root, args.chunk_rounds),
         "pandas.read_csv": lambda: pandas.read_csv(path)},
        args.repeats)
    load_after = os.getloadavg()[0]
    memory = {name: peak_memory(name, root, path, args.chunk_rounds) for name in READERS}
    for entry in memory.values():
      entry["ratio"] = entry["peak_bytes"] / entry["returned_bytes"]
    results = {
        "platform": platform_description(f", pandas {pandas.__version__}, "
                                         f"pyarrow {__import__('pyarrow').__version__}"),
        "rows": args.rows, "file": path.name, "file_bytes": path.stat().st_size,
        "repeats": args.repeats, "chunk_rounds": args.chunk_rounds, "time_s": times, "cpu_s": cpu_times, "memory": memory,
        "load_average": [load_before, load_after], "cpu_count": os.cpu_count(),
        "time_ratio": times["load_obd"] / times["pandas.read_csv"],
        "returned_bytes": returned,
        "goals": {"time_ratio_at_most": TIME_GOAL, "memory_ratio_at_most": MEMORY_GOAL},
    }
  results["time_goal_met"] = results["time_ratio"] <= TIME_GOAL
  results["memory_goal_met"] = memory["load_obd"]["ratio"] <= MEMORY_GOAL
  name = "obd_loader_gzip" if args.gzip else "obd_loader"
  write_results(name, results, markdown(results))


if __name__ == "__main__":
  sys.exit(main())
