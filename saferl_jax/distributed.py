"""Running the same script on one process or many, over JAX's distributed runtime (floor 1 utility).

JAX's multi-controller model: every process runs the same script, calls `initialize` once
before any computation, and then `jax.devices()` lists the devices of every process. The
functions of `saferl_jax.parallel` shard over `jax.devices()`, so a seed sweep
(`parallel.map_over_seeds`) spreads over all processes unchanged: each process computes its
share of the seeds, and the result is one global array. `to_host` turns such results into
numpy arrays on every process (for printing or saving), gathering the shards that live on
other processes.

    from saferl_jax import distributed, parallel
    distributed.initialize()              # before any JAX computation; a no-op on one process
    out = parallel.map_over_seeds(fn, keys)   # same keys on every process
    values = distributed.to_host(out)     # numpy on every process
    if jax.process_index() == 0:
      save(values)

On CPU the processes talk over gloo collectives (`jax_cpu_collectives_implementation`);
on GPU over NCCL and on TPU over ICI/DCN, which JAX picks by itself. docs/scaling.md gives
the commands for a multi-GPU host, a TPU pod slice, SLURM, and two CPU processes on one
machine.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from saferl_jax import checks


def _check_int(name: str, value, *, low: int) -> None:
  if value is None:
    return
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name}: must be an int, got {type(value).__name__} {value!r}")
  if value < low:
    raise ValueError(f"{name}: must be >= {low}, got {value}")


def _check_address(coordinator_address) -> None:
  if coordinator_address is None:
    return
  if not isinstance(coordinator_address, str):
    raise TypeError(f"coordinator_address: must be a 'host:port' string, got "
                    f"{type(coordinator_address).__name__} {coordinator_address!r}")
  host, _, port = coordinator_address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"coordinator_address: must be 'host:port' with a port in [1, 65535], got "
                     f"{coordinator_address!r}")


def initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_count: int | None = None,
    initialization_timeout: int = 300,
) -> None:
  """Joins this process to a multi-process JAX run; a no-op when there is one process.

  Call it once, first thing, on every process, before any JAX computation. It sets gloo as the
  CPU collectives (unless another implementation was chosen) and calls
  `jax.distributed.initialize`. Arguments left as None are read from the environment variables
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, else detected by JAX in a
  SLURM, Open MPI, Cloud TPU or Kubernetes job. With none of them given or detectable, or with
  num_processes=1, the process runs alone and nothing is initialised, so a script that calls
  `initialize()` runs unchanged on a laptop.

  Args:
    coordinator_address: 'host:port' of process 0, where it serves the coordinator (the same
      on every process); None to detect it.
    num_processes: how many processes take part, >= 1; None to detect it.
    process_id: this process's index in [0, num_processes); None to detect it.
    local_device_count: CPU devices to create in this process (as
      XLA_FLAGS=--xla_force_host_platform_device_count does; sets `jax_num_cpu_devices`);
      None leaves it as it is. Accelerators are not affected.
    initialization_timeout: seconds to wait for every process to join before raising.

  Returns:
    None; afterwards `jax.process_index()`, `jax.process_count()` and `jax.devices()` describe
    the whole run.

  Example:
    >>> initialize(num_processes=1)   # one process: nothing to join
    >>> jax.process_count()
    1
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = _from_environment("num_processes", num_processes, "JAX_NUM_PROCESSES")
  process_id = _from_environment("process_id", process_id, "JAX_PROCESS_ID")
  _check_address(coordinator_address)
  _check_int("num_processes", num_processes, low=1)
  _check_int("process_id", process_id, low=0)
  _check_int("local_device_count", local_device_count, low=1)
  checks.check_count("initialization_timeout", initialization_timeout)
  if num_processes is not None and process_id is not None and process_id >= num_processes:
    raise ValueError(f"process_id: must be in [0, num_processes = {num_processes}), got "
                     f"{process_id}")
  if jax.distributed.is_initialized():
    raise RuntimeError("initialize: this process has already joined a distributed run "
                       "(call it once per process)")
  if local_device_count is not None:
    jax.config.update("jax_num_cpu_devices", int(local_device_count))
  if num_processes == 1:
    return
  if None in (coordinator_address, num_processes, process_id) and not _cluster_detected():
    if (coordinator_address, num_processes, process_id) == (None, None, None):
      return  # nothing given, nothing to detect: this process runs alone
    missing = [name for name, value in (("coordinator_address", coordinator_address),
                                        ("num_processes", num_processes),
                                        ("process_id", process_id)) if value is None]
    raise ValueError(f"{', '.join(missing)}: needed (as arguments or JAX_* environment "
                     f"variables) outside a SLURM, Open MPI, Cloud TPU or Kubernetes job")
  if not jax.config.jax_cpu_collectives_implementation:  # None in older JAX; keep "mpi" if chosen
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id,
                             initialization_timeout=int(initialization_timeout))


def _from_environment(name: str, value, variable: str):
  """`value`, or the int in environment variable `variable` when value is None and it is set."""
  text = os.environ.get(variable, "").strip()
  if value is not None or not text:
    return value
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"{name}: environment variable {variable} must be an int, got "
                     f"{text!r}") from None


def _cluster_detected() -> bool:
  """Whether `jax.distributed.initialize()` would find a SLURM, Open MPI, Cloud TPU or Kubernetes
  job to read the missing arguments from (JAX's own detection)."""
  try:  # private, but the same classes since jax 0.4; mpi4py is opt-in only
    from jax._src.clusters import ClusterEnv
    return any(not env.opt_in_only_method and env.is_env_present()
               for env in ClusterEnv._cluster_types)
  except Exception:  # moved in a later JAX: let jax.distributed.initialize decide
    return True


def to_host(tree):
  """A numpy copy of every leaf of `tree` on every process, gathering shards held elsewhere.

  A leaf that is a `jax.Array` split over devices of several processes (a `map_over_seeds`
  result in a multi-process run) is gathered with
  `jax.experimental.multihost_utils.process_allgather(tiled=True)`: every process receives the
  whole global array. Any other leaf (a fully addressable or replicated array, a numpy array,
  a Python number) is copied with `np.asarray`. PRNG key arrays become their raw key data.
  In a multi-process run it is a collective: call it on every process with the same tree.

  Args:
    tree: a pytree of arrays.

  Returns:
    The same pytree with `np.ndarray` leaves of the global shapes.

  Example:
    >>> import jax.numpy as jnp
    >>> out = to_host({"value": jnp.arange(3.0)})
    >>> type(out["value"]).__name__, out["value"].tolist()
    ('ndarray', [0.0, 1.0, 2.0])
  """
  return jax.tree_util.tree_map(_leaf_to_host, tree)


def _leaf_to_host(leaf) -> np.ndarray:
  if isinstance(leaf, jax.Array):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    if not leaf.is_fully_addressable and not leaf.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
  return np.asarray(leaf)
