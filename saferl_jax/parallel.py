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

# No `from __future__ import annotations`: pdoc evaluates the NamedTuple fields outside this module.

import functools
from typing import Any, Callable, NamedTuple

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


def map_over_seeds(fn: Callable, keys: jax.Array, *args, batch_size: int | None = None, **kwargs):
  """jax.vmap(fn) over `keys` [S], sharded over devices; `args` and `kwargs` are shared.

  With `batch_size`, each device runs its share of the seeds in sequential batches of at most
  batch_size seeds (a `lax.map` over batches of the vmapped fn, inside the same jitted, sharded
  call), so a sweep holds only batch_size seeds' intermediates per device at once, whatever S.
  Each seed sees the same key and the same computation as without batching, so the results are
  the same draws (equal to the unbatched call). batch_size need not divide S: the batches are
  balanced (ceil(S / (devices * batch_size)) steps of equal size) and the keys padded by at most
  devices x steps - 1 seeds whose outputs are dropped.

  Args:
    fn: fn(key, *args, **kwargs) -> pytree, for one seed. Keyword arguments are
      static (closed over), positional ones traced. `batch_size` is reserved: fn cannot
      receive a keyword argument of that name through map_over_seeds.
    keys: [S] PRNG keys, one per seed.
    batch_size: optional int >= 1, the most seeds each device computes at once; None (the
      default) vmaps all S seeds at once.

  Returns:
    fn's outputs stacked over the leading seed axis, sharded over devices.

  Raises:
    ValueError: batch_size below 1 or a float; TypeError: batch_size not a number.

  Example:
    >>> import jax
    >>> keys = jax.random.split(jax.random.key(0), 5)
    >>> out = map_over_seeds(lambda k: jax.random.uniform(k), keys)
    >>> out.shape
    (5,)
    >>> bool((map_over_seeds(lambda k: jax.random.uniform(k), keys, batch_size=2) == out).all())
    True
  """
  checks.check_key("keys", keys)
  if batch_size is not None:
    batch_size = checks.check_count("batch_size", batch_size)
  sharding = seed_sharding(keys.shape[0])
  batched = _compiled(fn, tuple(sorted(kwargs.items())), len(args), sharding, batch_size)
  # The key data, not the typed keys, is put: JAX refuses typed keys on another process's devices.
  keys = jax.random.wrap_key_data(jax.device_put(jax.random.key_data(keys), sharding),
                                  impl=jax.random.key_impl(keys))
  return batched(keys, *args)


def _batch_layout(num_seeds: int, num_devices: int, batch_size: int) -> tuple[int, int]:
  """(steps, seeds per device per step): the fewest steps of at most batch_size seeds per device,
  balanced so that padding to steps * devices * per_step seeds adds fewer than devices * steps."""
  steps = -(-num_seeds // (num_devices * batch_size))
  return steps, -(-num_seeds // (num_devices * steps))


@functools.lru_cache(maxsize=64)
def _compiled(fn: Callable, static_kwargs: tuple, num_args: int, sharding: NamedSharding,
              batch_size: int | None = None):
  """One jitted, vmapped function per (fn, static options, batch size), so repeated calls do not
  recompile.

  With batch_size the S keys are padded to steps * D * b (D devices, b seeds per device per
  step, `_batch_layout`) and laid out as [steps, D * b] so that device d's column block holds
  its own contiguous share of the seeds (as the P("seeds") sharding of [S] places them); a
  `lax.map` over the steps runs the vmapped fn on one [D * b] slice at a time, sharded over the
  devices, and the outputs are laid back out as [S] without moving data between devices.
  """
  kwargs = dict(static_kwargs)
  vmapped = jax.vmap(lambda key, *a: fn(key, *a, **kwargs), in_axes=(0,) + (None,) * num_args)
  if batch_size is None:
    return jax.jit(vmapped, out_shardings=sharding)
  mesh = sharding.mesh
  num_devices = mesh.shape[SEEDS]
  step_sharding = NamedSharding(mesh, PartitionSpec(SEEDS))
  constrain = lambda tree: jax.tree_util.tree_map(
      lambda leaf: jax.lax.with_sharding_constraint(leaf, step_sharding), tree)

  def batched(keys, *args):
    num_seeds = keys.shape[0]
    steps, per_step = _batch_layout(num_seeds, num_devices, batch_size)
    padded = steps * num_devices * per_step
    if padded > num_seeds:  # padding seeds reuse the first keys; their outputs are dropped
      keys = jnp.concatenate([keys, keys[jnp.arange(padded - num_seeds) % num_seeds]])
    # [D * steps * b] -> [D, steps, b] -> [steps, D, b] -> [steps, D * b]
    by_step = jnp.swapaxes(constrain(keys).reshape(num_devices, steps, per_step), 0, 1)
    by_step = by_step.reshape(steps, num_devices * per_step)
    outputs = jax.lax.map(lambda step_keys: constrain(vmapped(constrain(step_keys), *args)),
                          by_step)

    def unstep(leaf):  # [steps, D * b, ...] -> [steps, D, b, ...] -> [D, steps, b, ...] -> [S, ...]
      leaf = jnp.swapaxes(leaf.reshape((steps, num_devices, per_step) + leaf.shape[2:]), 0, 1)
      return leaf.reshape((padded,) + leaf.shape[3:])[:num_seeds]

    return jax.tree_util.tree_map(unstep, outputs)

  return jax.jit(batched, out_shardings=sharding)


def pad_rows(tree, size: int):
  """Every leaf's axis 0 padded to `size` rows by repeating its last row (valid values, to be masked).

  Example:
    >>> import jax.numpy as jnp
    >>> pad_rows({"x": jnp.array([1., 2.])}, 4)["x"].tolist()
    [1.0, 2.0, 2.0, 2.0]
  """
  def pad(leaf):
    # Host arrays stay numpy: their values (an int64 id past int32, say) are checked by whoever
    # converts them, not wrapped here.
    xp = jnp if isinstance(leaf, jax.Array) else np
    leaf = xp.asarray(leaf)
    missing = size - leaf.shape[0]
    if missing < 0:
      raise ValueError(f"size: {size} is below the {leaf.shape[0]} rows to pad")
    return leaf if missing == 0 else xp.concatenate([leaf, xp.repeat(leaf[-1:], missing, axis=0)])
  return jax.tree_util.tree_map(pad, tree)


class ShardedRounds(NamedTuple):
  """A log split along its rounds over devices: `data` padded to a multiple of the device count.

  Attributes:
    data: the pytree of arrays, each [N, ...] with N the padded round count, axis 0 split over
      the devices.
    where: [N] bool, True for the real rounds (False for the repeated last rows of the padding).
  """
  data: Any
  where: jax.Array


def shard_rounds(data, *, mesh: Mesh | None = None) -> ShardedRounds:
  """Places a log's rounds (axis 0 of every leaf) split over every device, padded and masked.

  Sums over the rounds of the placed arrays, in a jitted function, become partial sums on each
  device added across devices: the streaming estimators (`saferl_jax.ope.streaming`, which take
  `where`) then estimate one log larger than one device's memory. The rounds are padded to a
  multiple of the device count by repeating the last round, and `where` masks the copies.

  With several processes (`saferl_jax.distributed.initialize`) `data` is this process's own
  rounds: processes may hold different counts; each is padded to the largest (rounded up to a
  multiple of its local devices) and the global arrays are assembled from every process's rows
  with `jax.make_array_from_process_local_data`.

  Args:
    data: a pytree (e.g. the dict of a chunk) of arrays with the same length n on axis 0, n >= 1.
    mesh: a `device_mesh`: rounds split over its "batch" axis and replicated over "seeds";
      default every device on "batch".

  Returns:
    A `ShardedRounds(data, where)`.

  Example:
    >>> import jax.numpy as jnp
    >>> sharded = shard_rounds({"rewards": jnp.ones(3)})
    >>> int(sharded.where.sum()), sharded.data["rewards"].shape[0] % jax.device_count()
    (3, 0)
  """
  leaves = jax.tree_util.tree_leaves(data)
  if not leaves:
    raise ValueError("data: has no arrays to shard")
  lengths = {int(np.shape(leaf)[0]) if np.ndim(leaf) else 0 for leaf in leaves}
  if len(lengths) != 1 or 0 in lengths:
    raise ValueError(f"data: every array needs the same number of rounds n >= 1 on axis 0, got "
                     f"lengths {sorted(lengths)}")
  if mesh is None:
    mesh = device_mesh(batch_devices=jax.device_count())
  sharding = NamedSharding(mesh, PartitionSpec(BATCH))
  length = lengths.pop()
  if jax.process_count() == 1:
    size = -(-length // batch_devices(mesh)) * batch_devices(mesh)
    padded = (pad_rows(data, size), np.arange(size) < length)
    return ShardedRounds(*jax.device_put(padded, sharding))
  from jax.experimental import multihost_utils  # only multi-process runs need it
  local_devices = batch_devices(mesh) // jax.process_count()
  longest = int(np.max(multihost_utils.process_allgather(np.asarray(length))))
  size = -(-longest // local_devices) * local_devices
  padded = (pad_rows(data, size), np.arange(size) < length)
  return ShardedRounds(*jax.tree_util.tree_map(
      lambda leaf: jax.make_array_from_process_local_data(sharding, np.asarray(leaf)), padded))
