"""Running one function over many seeds, sharded across every device (floor 1 utility).

`map_over_seeds(fn, keys)` is `jax.vmap(fn)(keys)` under `jax.jit`, with the seed
axis split over all devices by a `NamedSharding`. On one CPU it is a plain
vmapped call; on 8 GPUs (or with
XLA_FLAGS=--xla_force_host_platform_device_count=8 on CPU) each device simulates
its share of the seeds, and the results stay sharded the same way.

Data parallelism inside one seed: `device_mesh(batch_devices=b)` arranges the devices as a 2-D
mesh ("seeds", "batch") of shape (devices / b, b). Seeds are split over the first axis (as
`seed_sharding(num_seeds, mesh=mesh)`), and within a seed the batch axis of its arrays over the
b devices of the second: the step function marks its batch arrays with `shard_batch` (a
`with_sharding_constraint`, which under the seed vmap's `spmd_axis_name="seeds"` becomes
("seeds", "batch")), and XLA partitions the computation and reduces the gradients across
the batch devices. Parameters stay replicated over "batch". Sums over the batch are then added
in another order: results equal an unsharded run to float precision, not bit for bit.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from saferl_jax import checks


SEEDS, BATCH = "seeds", "batch"  # the mesh axes of `device_mesh`


def device_mesh(*, batch_devices: int = 1) -> Mesh:
  """Every device in a 2-D mesh ("seeds", "batch") of shape (device count / batch_devices, batch_devices).

  Args:
    batch_devices: devices that share one seed's batch, >= 1, dividing the device count.

  Returns:
    The `Mesh`; batch_devices=1 shards seeds only, batch_devices=device count batches only.

  Example:
    >>> mesh = device_mesh(batch_devices=1)
    >>> mesh.axis_names, mesh.shape[BATCH]
    (('seeds', 'batch'), 1)
  """
  devices = jax.devices()
  if isinstance(batch_devices, (bool, np.bool_)) or not isinstance(batch_devices, (int, np.integer)):
    raise TypeError(f"batch_devices: must be an int, got {type(batch_devices).__name__} "
                    f"{batch_devices!r}")
  if batch_devices < 1 or len(devices) % batch_devices:
    raise ValueError(f"batch_devices: must be >= 1 and divide the {len(devices)} devices, got "
                     f"{batch_devices}")
  return _device_mesh(tuple(devices), int(batch_devices))


@functools.lru_cache(maxsize=16)  # one Mesh object per layout: compiled functions keyed on it are reused
def _device_mesh(devices: tuple, batch_devices: int) -> Mesh:
  return Mesh(np.array(devices).reshape(-1, batch_devices), (SEEDS, BATCH))


def batch_devices(mesh: Mesh | None) -> int:
  """How many devices share one seed's batch in `mesh` (1 without a mesh or a "batch" axis)."""
  return 1 if mesh is None else dict(mesh.shape).get(BATCH, 1)


def shard_batch(tree, mesh: Mesh | None, *, axis: int = 0):
  """Constrains axis `axis` of every leaf of `tree` to be split over the mesh's "batch" devices.

  For use inside a jitted (and seed-vmapped) function; the identity without a mesh or with one
  batch device, so unsharded runs compile exactly as before. The axis must divide by the number
  of batch devices.

  Args:
    tree: a pytree of arrays, each with the batch on `axis` (e.g. states [S + 1, B, ...]: axis=1);
      leaves without that axis (scalars) are left as they are.
    mesh: a `device_mesh`, or None.
    axis: the batch axis of every leaf.

  Returns:
    `tree`, its leaves constrained to PartitionSpec(None, ..., "batch").

  Example:
    >>> import jax.numpy as jnp
    >>> shard_batch(jnp.ones((4, 2)), None).shape
    (4, 2)
  """
  if batch_devices(mesh) == 1:
    return tree
  sharding = NamedSharding(mesh, PartitionSpec(*([None] * axis), BATCH))
  return jax.tree_util.tree_map(
      lambda leaf: leaf if jnp.ndim(leaf) <= axis else jax.lax.with_sharding_constraint(leaf, sharding),
      tree)


def batch_sharded(apply_fn: Callable, mesh: Mesh | None) -> Callable:
  """apply_fn(params, *batch) with every input and output leaf of `batch` split on its axis 0.

  Wraps a network so that each evaluation, wherever it runs (inside a sampler's scan, under a
  gradient), computes on the batch split over the mesh's "batch" devices. The same object is
  returned for the same (apply_fn, mesh), so compiled functions keyed on it are reused; apply_fn
  itself without a mesh or with one batch device.

  Example:
    >>> f = lambda params, x: params * x
    >>> batch_sharded(f, None) is f
    True
  """
  return apply_fn if batch_devices(mesh) == 1 else _batch_sharded(apply_fn, mesh)


@functools.lru_cache(maxsize=64)
def _batch_sharded(apply_fn: Callable, mesh: Mesh) -> Callable:
  def sharded_apply(params, *batch):
    return shard_batch(apply_fn(params, *shard_batch(batch, mesh)), mesh)
  return sharded_apply


def seed_sharding(num_seeds: int, *, mesh: Mesh | None = None) -> NamedSharding:
  """A sharding of a leading seed axis over all devices (replicated if they do not divide it).

  With a `device_mesh`, over its "seeds" axis (and replicated over "batch").
  """
  if isinstance(num_seeds, (bool, np.bool_)) or not isinstance(num_seeds, (int, np.integer)):
    if isinstance(num_seeds, (float, np.floating)):
      raise ValueError(f"num_seeds: must be a whole number >= 1, got {num_seeds!r}")
    raise TypeError(f"num_seeds: must be an int, got {type(num_seeds).__name__} {num_seeds!r}")
  if num_seeds < 1:
    raise ValueError(f"num_seeds: must be >= 1, got {num_seeds}")
  if mesh is None:
    mesh = Mesh(np.array(jax.devices()), (SEEDS,))
  if num_seeds % mesh.shape[SEEDS]:
    return NamedSharding(mesh, PartitionSpec())
  return NamedSharding(mesh, PartitionSpec(SEEDS))


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
