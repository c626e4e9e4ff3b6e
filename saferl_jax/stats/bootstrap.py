"""The percentile bootstrap, all resamples at once (floor 1).

`bootstrap_replicates` resamples the rows of any pytree of [n, ...] arrays with
replacement and recomputes a statistic on every resample, vmapped in batches of
resamples (no Python loop). For a bandit estimator, pass it the estimator's
`*_from_rounds` form and the `LoggedRounds`, so a self-normalised estimator or
beta* is refitted on every resample.

Resampling is bound by random-number generation: 1000 resamples of 1e5 rows need
1e8 indices. Threefry produces them more slowly on CPU (docs/benchmarks.md) than
this module's generator, a counter-based integer hash (the "lowbias32" finaliser):
index j of resample b is hash(hash(j) xor s_b) mod n, where the per-resample seeds
s_b come from `jax.random.bits(key)`. Its modulo bias is at most n / 2^32.
`generator="threefry"` uses JAX's own generator instead.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.fast_random import Generator, check_generator, hash32
from saferl_jax.stats.bounds import Interval





def _check_options(*, num_resamples, batch_size=1, generator="hash", delta=None) -> None:
  """Checks the scalar options of the bootstrap up front, before any resample is drawn."""
  checks.check_count("num_resamples", num_resamples)
  checks.check_count("batch_size", batch_size)
  if not isinstance(generator, str):
    raise TypeError(f"generator: must be 'hash' or 'threefry', got {type(generator).__name__}")
  check_generator(generator)
  if delta is not None:
    if isinstance(delta, (bool, np.bool_, str, bytes)):
      raise TypeError(f"delta: must be a number in (0, 1), got {delta!r}")
    checks.check_level_option("delta", delta)


def _rows(name: str, data):
  """`data` with every leaf a JAX array (numpy leaves cannot be indexed by traced indices), and
  its number of rows n, checked to be shared by every leaf and >= 1; messages name `name`."""
  try:
    data = jax.tree_util.tree_map(jnp.asarray, data)
  except (TypeError, ValueError) as err:
    raise TypeError(f"{name}: every leaf must be an array ({err})") from err
  leaves = jax.tree_util.tree_leaves(data)
  if not leaves:
    raise ValueError(f"{name}: needs at least one array")
  for leaf in leaves:
    if leaf.ndim == 0:
      raise ValueError(f"{name}: every array needs a leading axis of rows, got a scalar")
  n = leaves[0].shape[0]
  for leaf in leaves:
    if leaf.shape[0] != n:
      raise ValueError(f"{name}: every array must have the same leading length, got "
                       f"{leaf.shape[0]} and {n}")
  if n < 1:
    raise ValueError(f"{name}: needs at least one row to resample, got n={n}")
  return data, n


def _index_sampler(key: jax.Array, num_resamples: int, n: int, generator: str):
  """Per-resample inputs, and the function that turns one of them into [n] row indices."""
  if generator == "threefry":
    return jax.random.split(key, num_resamples), lambda k: jax.random.randint(k, (n,), 0, n)
  check_generator(generator)
  seeds = jax.random.bits(key, (num_resamples,), jnp.uint32)
  hashed_positions = hash32(jnp.arange(n, dtype=jnp.uint32))
  return seeds, lambda s: (hash32(hashed_positions ^ s) % jnp.uint32(n)).astype(jnp.int32)


def resample_indices(
    key: jax.Array, *, num_resamples: int, num_rows: int, generator: Generator = "hash"
) -> jax.Array:
  """[num_resamples, num_rows] row indices drawn uniformly with replacement from [0, num_rows).

  The key comes first: there is no data, only a shape (as in `jax.random`).

  Example:
    >>> import jax
    >>> resample_indices(jax.random.key(0), num_resamples=2, num_rows=5).shape
    (2, 5)
  """
  checks.check_key("key", key)
  _check_options(num_resamples=num_resamples, generator=generator)
  num_rows = checks.check_count("num_rows", num_rows)
  per_resample, to_indices = _index_sampler(key, num_resamples, num_rows, generator)
  return jax.vmap(to_indices)(per_resample)


def bootstrap_replicates(
    statistic: Callable[..., jax.Array],
    data,
    *,
    key: jax.Array,
    num_resamples: int = 1000,
    batch_size: int = 10,
    generator: Generator = "hash",
) -> jax.Array:
  """The statistic recomputed on `num_resamples` resamples of the rows of `data`.

  Args:
    statistic: maps a pytree shaped like `data` to a scalar.
    data: a pytree of arrays sharing the leading length n (the rows resampled).
    key: PRNG key; the same key gives the same replicates.
    num_resamples: number of bootstrap resamples B.
    batch_size: resamples vmapped together; bounds memory at batch_size * n rows.
    generator: "hash" (fast on CPU, see the module docstring) or "threefry".

  Returns:
    [B] replicates of the statistic.
  """
  checks.check_key("key", key)
  if not callable(statistic):
    raise TypeError(f"statistic: must be a callable, got {type(statistic).__name__}")
  _check_options(num_resamples=num_resamples, batch_size=batch_size, generator=generator)
  data, n = _rows("data", data)

  def on_resample(indices):
    # The barrier makes XLA compute the indices once; otherwise it fuses the hash into
    # the gather of every array and recomputes it per array (2-3 times slower).
    indices = jax.lax.optimization_barrier(indices)
    return statistic(jax.tree_util.tree_map(lambda x: x[indices], data))

  per_resample, to_indices = _index_sampler(key, num_resamples, n, generator)
  return jax.lax.map(lambda x: on_resample(to_indices(x)), per_resample,
                     batch_size=min(batch_size, num_resamples))


def percentile_interval(replicates: ArrayLike, *, delta: float = 0.05) -> Interval:
  """The delta/2 and 1 - delta/2 quantiles of bootstrap replicates (linear interpolation)."""
  if isinstance(delta, (bool, np.bool_, str, bytes)):
    raise TypeError(f"delta: must be a number in (0, 1), got {delta!r}")
  checks.check_level_option("delta", delta)
  replicates = checks.as_float("replicates", replicates)
  checks.check_ndim("replicates", replicates, 1)
  if replicates.shape[0] == 0:
    raise ValueError("replicates: is empty; at least one replicate is needed")
  lower, upper = jnp.quantile(replicates, jnp.array([delta / 2, 1 - delta / 2]))
  return Interval(lower, upper)


def bootstrap_interval(
    statistic: Callable[..., jax.Array],
    data,
    *,
    key: jax.Array,
    num_resamples: int = 1000,
    delta: float = 0.05,
    batch_size: int = 10,
    generator: Generator = "hash",
) -> Interval:
  """Percentile bootstrap 1 - delta interval of `statistic` on `data` (delta: miss probability).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jnp.arange(100.0)
    >>> ci = bootstrap_interval(jnp.mean, x, key=jax.random.key(0))
    >>> bool(ci.lower < 49.5 < ci.upper)
    True
  """
  _check_options(num_resamples=num_resamples, batch_size=batch_size, generator=generator,
                delta=delta)
  replicates = bootstrap_replicates(statistic, data, key=key, num_resamples=num_resamples,
                                    batch_size=batch_size, generator=generator)
  return percentile_interval(replicates, delta=delta)
