"""Timing helpers shared by the benchmark scripts (run them as `python benchmarks/bench_*.py`)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def median_time(fn, repeats: int) -> float:
  """Median seconds of `repeats` calls of fn, after one warm-up call (compilation, caches)."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def memory_bandwidth() -> dict:
  """Copy bandwidth (numpy, read + write) and read bandwidth (jitted JAX sum), in GB/s."""
  src = np.ones(128 * 2**20, np.float32)  # 512 MB
  dst = np.empty_like(src)
  copy_s = median_time(lambda: np.copyto(dst, src), 5)
  device_src = jnp.asarray(src)
  read_sum = jax.jit(jnp.sum)
  read_s = median_time(lambda: read_sum(device_src).block_until_ready(), 5)
  return {"copy_GBps": 2 * src.nbytes / copy_s / 1e9, "read_GBps": src.nbytes / read_s / 1e9}


# benchmarks/results, or the folder named by SAFERL_BENCH_RESULTS: run_all.py gives each benchmark
# its own folder, so that quick runs never overwrite the full results kept in benchmarks/results.
RESULTS = Path(os.environ.get("SAFERL_BENCH_RESULTS") or Path(__file__).parent / "results")


def platform_description(extra: str = "") -> str:
  """Backend, device, cores and versions, recorded with every result."""
  return (f"{jax.default_backend()} ({jax.devices()[0].device_kind}), {os.cpu_count()} cores, "
          f"jax {jax.__version__}{extra}, python {platform.python_version()}")


def write_results(name: str, results: dict, markdown_text: str) -> None:
  """Writes benchmarks/results/<name>_<backend>.json and .md, and prints the markdown."""
  RESULTS.mkdir(exist_ok=True)
  stem = f"{name}_{jax.default_backend()}"
  (RESULTS / f"{stem}.json").write_text(json.dumps(results, indent=2))
  (RESULTS / f"{stem}.md").write_text(markdown_text)
  print(markdown_text)


# One call in a fresh Python process: its wall and CPU seconds, peak RSS growth and bytes returned.
PEAK_SCRIPT = """
import gc, json, re, resource, sys, time
{imports}

def kib(field):
  return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))

gc.collect()
try:  # Linux: reset the peak RSS (VmHWM) to the current RSS, so the imports' own peak is forgotten
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  before, peak = kib("VmRSS"), lambda: kib("VmHWM")
except OSError:  # ru_maxrss instead (KiB on Linux): the call's peak if it exceeds the imports'
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
{call}
seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
print(json.dumps({{"peak_bytes": (peak() - before) * 1024, "returned_bytes": int({returned}),
                  "seconds": seconds, "cpu_seconds": cpu}}))
"""


def measure_in_fresh_process(imports: str, call: str, returned: str, *args: str) -> dict:
  """Runs `call` (after `imports`) in a fresh process with sys.argv[1:] = args: {"seconds",
  "cpu_seconds", "peak_bytes" (RSS growth during the call), "returned_bytes" (`returned`)}."""
  script = PEAK_SCRIPT.format(imports=imports, call=call, returned=returned)
  out = subprocess.run([sys.executable, "-c", script, *map(str, args)], check=True,
                       capture_output=True, text=True, cwd=Path(__file__).parents[1])
  return json.loads(out.stdout.splitlines()[-1])
