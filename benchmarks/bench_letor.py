"""Benchmark: `data.load_letor` against sklearn's `load_svmlight_file(..., query_id=True)` on one MSLR-shaped file.

    python benchmarks/bench_letor.py [--lines 2300000] [--features 136] [--docs 120] [--repeats 1]

Writes a synthetic file shaped like MSLR-WEB30K's Fold1/train.txt (default 2.3 million lines of
136 dense features "label qid:Q 1:v ... 136:v ", a trailing blank as MSLR has; lists of uniform
length in [docs/2, 3 docs/2], ~120 on average; labels 0..4 with MSLR's frequencies; features a
mix of counts, heavy-tailed floats and zeros, ~1 KB a line as in MSLR) to a temporary folder,
deleted afterwards, then measures in the same run:
each reader runs `repeats` times, the readers taking turns, every call in a fresh Python process
(the file read once beforehand, so all read it from the page cache), which records
  - time: the call's wall and CPU seconds (medians over the repeats);
  - peak memory: its peak resident set size during the call minus its resident set size before
    it (VmHWM after a reset through /proc/self/clear_refs; elsewhere ru_maxrss), the largest over
    the repeats, and the bytes of what it returns.
The readers' agreement is checked first on the file's first 20,000 lines.
load_letor returns padded [Q, D, F] float32 features (D = the longest list, 180 here: MSLR's
real lists need a cap first, `data.letor`); sklearn returns a float64 CSR matrix, labels and qids.
Also times `read_letor_rows` (the unpadded rows `data.letor` prepares). Results go to
benchmarks/results/letor_<platform>.json and .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from timing import measure_in_fresh_process, platform_description, write_results

LABEL_SHARES = (0.52, 0.32, 0.13, 0.02, 0.01)  # MSLR-WEB30K's grades 0..4, roughly


def write_file(path: Path, num_lines: int, num_features: int, docs: int, *, seed: int = 0) -> int:
  """A dense MSLR-shaped LETOR file of num_lines lines; returns the number of queries."""
  rng = np.random.default_rng(seed)
  lengths = []
  while sum(lengths) < num_lines:
    lengths.append(int(rng.integers(docs // 2, 3 * docs // 2 + 1)))
  lengths[-1] -= sum(lengths) - num_lines
  qids = np.repeat(np.arange(1, len(lengths) + 1), lengths)
  kinds = np.arange(num_features) % 3  # 0: counts, 1: heavy-tailed floats, 2: mostly zero
  with open(path, "wb") as out:
    for start in range(0, num_lines, 50_000):
      n = min(50_000, num_lines - start)
      columns = [pa.array(rng.choice(5, n, p=LABEL_SHARES).astype(str)),
                 pc.binary_join_element_wise("qid:", pa.array(qids[start:start + n].astype(str)), "")]
      for f in range(num_features):
        if kinds[f] == 0:
          values = rng.geometric(0.3, n) - 1.0
        elif kinds[f] == 1:
          values = np.round(rng.lognormal(0.0, 1.5, n), 3)
        else:
          values = np.where(rng.random(n) < 0.8, 0.0, np.round(rng.random(n), 4))
        text = pc.cast(pa.array(values), pa.string())
        text = pc.replace_substring_regex(text, r"\.0$", "")  # "3" rather than "3.0", as MSLR writes
        columns.append(pc.binary_join_element_wise(f"{f + 1}:", text, ""))
      columns.append(pa.array([""] * n))  # the trailing blank of MSLR's lines
      lines = pc.binary_join_element_wise(*columns, " ")
      out.write("\n".join(lines.to_pylist()).encode() + b"\n")
  return len(lengths)



READERS = {
    "load_letor": dict(
        imports="import numpy as np\nfrom saferl_jax.data import load_letor",
        call="result = load_letor(sys.argv[1])",
        returned="sum(np.asarray(v).nbytes for v in result)"),
    "read_letor_rows": dict(
        imports="import numpy as np\nfrom saferl_jax.data.ltr import read_letor_rows",
        call="result = read_letor_rows(sys.argv[1])",
        returned="sum(np.asarray(v).nbytes for v in result)"),
    "sklearn": dict(
        imports="from sklearn.datasets import load_svmlight_file",
        call="result = load_svmlight_file(sys.argv[1], query_id=True)",
        returned="result[0].data.nbytes + result[0].indices.nbytes + result[0].indptr.nbytes"
                 " + result[1].nbytes + result[2].nbytes"),
}


def run_reader(reader: str, path: Path) -> dict:
  """One call in a fresh process: its wall and CPU seconds, peak RSS growth, bytes returned."""
  spec = READERS[reader]
  return measure_in_fresh_process(spec["imports"], spec["call"], spec["returned"], path)


def check_agreement(path: Path) -> None:
  """load_letor and sklearn read the same labels, query ids and float32 features."""
  from sklearn.datasets import load_svmlight_file

  from saferl_jax.data import load_letor
  data = load_letor(path)
  x, y, qid = load_svmlight_file(str(path), query_id=True)
  where = np.asarray(data.where)
  np.testing.assert_array_equal(np.asarray(data.labels)[where], y.astype(np.int32))
  np.testing.assert_array_equal(np.repeat(data.query_ids, where.sum(1)), qid)
  np.testing.assert_array_equal(np.asarray(data.features)[where], x.toarray().astype(np.float32))


def markdown(results: dict) -> str:
  t, c, m = results["time_s"], results["cpu_s"], results["memory"]
  lines = [
      f"# LETOR loader ({results['platform']})", "",
      f"{results['lines']:,} lines, {results['queries']:,} queries, {results['features']} dense "
      f"features, {results['file_bytes'] / 1e9:.2f} GB of text; {results['repeats']} call(s) "
      f"each, taking turns, each in a fresh process, file in the page cache. "
      f"{results['cpu_count']} cores, load average {results['load_average'][0]:.1f} before, "
      f"{results['load_average'][1]:.1f} after.", "",
      "| reader | time (s) | CPU time (s) | peak memory (GB) | returned (GB) | peak / returned |",
      "|---|---|---|---|---|---|",
  ]
  for name in READERS:
    lines.append(f"| {name} | {t[name]:.1f} | {c[name]:.1f} | {m[name]['peak_bytes'] / 1e9:.2f} | "
                 f"{m[name]['returned_bytes'] / 1e9:.2f} | "
                 f"{m[name]['peak_bytes'] / m[name]['returned_bytes']:.2f} |")
  lines += ["",
            f"- time: load_letor / sklearn = {results['time_ratio']:.2f} "
            f"(read_letor_rows / sklearn = {results['rows_time_ratio']:.2f}).",
            f"- peak memory: load_letor / sklearn = {results['memory_ratio']:.2f}.", ""]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lines", type=int, default=2_300_000)
  parser.add_argument("--features", type=int, default=136)
  parser.add_argument("--docs", type=int, default=120, help="mean documents per query")
  parser.add_argument("--repeats", type=int, default=1)
  args = parser.parse_args()
  import sklearn  # the benchmark's alternative, not a dependency of the library

  with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "train.txt"
    start = time.perf_counter()
    num_queries = write_file(path, args.lines, args.features, args.docs)
    print(f"wrote {path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s", flush=True)
    prefix = Path(tmp) / "prefix.txt"
    with open(path, "rb") as f, open(prefix, "wb") as out:
      out.writelines(line for _, line in zip(range(20_000), f))
    check_agreement(prefix)
    with open(path, "rb") as f:  # warm the page cache
      while f.read(2**26):
        pass
    load_before = os.getloadavg()[0]
    runs = {name: [] for name in READERS}
    for _ in range(args.repeats):
      for name in READERS:
        runs[name].append(run_reader(name, path))
        print(name, runs[name][-1], flush=True)
    load_after = os.getloadavg()[0]
    times = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    cpu_times = {name: statistics.median(r["cpu_seconds"] for r in rs) for name, rs in runs.items()}
    memory = {name: max(rs, key=lambda r: r["peak_bytes"]) for name, rs in runs.items()}
    results = {
        "platform": platform_description(f", sklearn {sklearn.__version__}, pyarrow {pa.__version__}"),
        "lines": args.lines, "queries": num_queries, "features": args.features,
        "file_bytes": path.stat().st_size, "repeats": args.repeats, "time_s": times,
        "cpu_s": cpu_times, "memory": memory, "runs": runs, "load_average": [load_before, load_after],
        "cpu_count": os.cpu_count(),
        "time_ratio": times["load_letor"] / times["sklearn"],
        "rows_time_ratio": times["read_letor_rows"] / times["sklearn"],
        "memory_ratio": memory["load_letor"]["peak_bytes"] / memory["sklearn"]["peak_bytes"],
    }
  write_results("letor", results, markdown(results))


if __name__ == "__main__":
  sys.exit(main())
