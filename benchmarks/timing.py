"""Timing helpers shared by the benchmark scripts (run them as `python benchmarks/bench_*.py`)."""

from __future__ import annotations

import statistics
import time

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
