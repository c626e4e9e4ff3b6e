"""Timing helpers shared by the benchmark scripts (run them as `python benchmarks/bench_*.py`)."""

from __future__ import annotations

import json
import os
import platform
import statistics
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


RESULTS = Path(__file__).parent / "results"


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
