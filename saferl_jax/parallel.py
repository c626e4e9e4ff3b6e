"""Running one function over many seeds, sharded across every device (floor 1 utility).

`map_over_seeds(fn, keys)` is `jax.vmap(fn)(keys)` under `jax.jit`, with the seed
axis split over all devices by a `NamedSharding`. On one CPU it is a plain
vmapped call; on 8 GPUs (or with
XLA_FLAGS=--xla_force_host_platform_device_count=8 on CPU) each device simulates
its share of the seeds, and the results stay sharded the same way.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from saferl_jax import checks


def seed_sharding(num_seeds: int) -> NamedSharding:
  """A sharding of a leading seed axis over all devices (replicated if they do not divide it)."""
  if isinstance(num_seeds, (bool, np.bool_)) or not isinstance(num_seeds, (int, np.integer)):
    if isinstance(num_seeds, (float, np.floating)):
      raise ValueError(f"num_seeds: must be a whole number >= 1, got {num_seeds!r}")
    raise TypeError(f"num_seeds: must be an int, got {type(num_seeds).__name__} {num_seeds!r}")
  if num_seeds < 1:
    raise ValueError(f"num_seeds: must be >= 1, got {num_seeds}")
  devices = jax.devices()
  mesh = Mesh(np.array(devices), ("seeds",))
  if num_seeds % len(devices):
    return NamedSharding(mesh, PartitionSpec())
  return NamedSharding(mesh, PartitionSpec("seeds"))


def map_over_seeds(fn: Callable, keys: jax.Array, *args, **kwargs):
  """jax.vmap(fn) over `keys` [S], sharded over devices; `args` and `kwargs` are shared.

  Args:
    fn: fn(key, *args, **kwargs) -> pytree, for one seed. Keyword arguments are
      static (closed over), positional ones traced.
    keys: [S] PRNG keys, one per seed.

  Returns:
    fn's outputs stacked over the leading seed axis, sharded over devices.

  Example:
    >>> import jax
    >>> out = map_over_seeds(lambda k: jax.random.uniform(k), jax.random.split(jax.random.key(0), 4))
    >>> out.shape
    (4,)
  """
  checks.check_key("keys", keys)
  sharding = seed_sharding(keys.shape[0])
  batched = _compiled(fn, tuple(sorted(kwargs.items())), len(args), sharding)
  return batched(jax.device_put(keys, sharding), *args)


@functools.lru_cache(maxsize=64)
def _compiled(fn: Callable, static_kwargs: tuple, num_args: int, sharding: NamedSharding):
  """One jitted, vmapped function per (fn, static options), so repeated calls do not recompile."""
  kwargs = dict(static_kwargs)
  return jax.jit(jax.vmap(lambda key, *a: fn(key, *a, **kwargs), in_axes=(0,) + (None,) * num_args),
                 out_shardings=sharding)
