"""One process of a multi-process run for tests/test_distributed.py (a script, not a test module).

Every process runs this same script (JAX's multi-controller model):

    python tests/distributed_worker.py --out OUT.npz --devices 2 \\
        --coordinator 127.0.0.1:PORT --num-processes 2 --process-id {0,1}

and the single-process reference is `run()` in one process (or this script with
--num-processes 1). Two parts:

- the seed axis: a synthetic bandit simulated and estimated per seed (ips, snips, dr, beta_ips),
  the seeds split over every device of every process by `parallel.map_over_seeds`;
- the rounds axis: one log made of all seeds' rounds, of which each process holds only its own
  rows as numpy arrays (as it would hold its part of a file), joined into global arrays with
  `jax.make_array_from_process_local_data` and estimated under `jax.jit` by the in-memory
  estimators, and placed by `parallel.shard_rounds` and estimated by the streaming ones
  (`ope.stream_estimators`).

Everything is gathered with `distributed.to_host`, and process 0 writes it to an .npz.
Importing this module touches no device, so `distributed.initialize` can still come first.
"""

import argparse
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from saferl_jax import distributed, ope, parallel
from saferl_jax.data import synthetic_bandit

SEEDS, ROUNDS = 8, 256  # the seed sweep; the rounds axis is all seeds' rounds in one log


def _problem() -> synthetic_bandit.BanditProblem:
  make = jax.jit(synthetic_bandit.make_problem, static_argnames=("num_actions", "num_contexts"))
  return make(jax.random.key(0), num_actions=5, num_contexts=50)  # one compiled call, not ~20 ops


def _estimates(inputs: synthetic_bandit.EstimatorInputs) -> dict:
  """Four estimators' values on one log (traced or concrete)."""
  return {"ips": ope.ips(*inputs[:4]).value, "snips": ope.snips(*inputs[:4]).value,
          "dr": ope.dr(*inputs).value, "beta_ips": ope.beta_ips(*inputs[:4]).value}


def _one_seed(key, problem) -> dict:
  """One seed: a log of ROUNDS rounds, its estimator inputs, and the estimates on it."""
  inputs = synthetic_bandit.estimator_inputs(
      problem, synthetic_bandit.simulate_log(problem, key=key, num_rounds=ROUNDS))
  return {"inputs": inputs, "estimates": _estimates(inputs)}


def seed_axis(keys) -> dict:
  """The seed sweep over `keys` [S]: global arrays, the seed axis split over every device."""
  return parallel.map_over_seeds(_one_seed, keys, _problem())


def local_rows(inputs: synthetic_bandit.EstimatorInputs) -> synthetic_bandit.EstimatorInputs:
  """The rounds of this process's seeds of `inputs` [S, n, ...], as numpy rows [S_local * n, ...].

  The seed axis must be split (not replicated) over the devices, so that each seed lives on one
  process; a process's seeds are contiguous, so the processes' rows in process order are the
  rows of the whole [S * n] log.
  """
  def rows(leaf):
    starts = sorted({shard.index[0].start or 0: shard for shard in leaf.addressable_shards}.items())
    data = np.concatenate([np.asarray(shard.data) for _, shard in starts])
    return data.reshape((-1,) + data.shape[2:])
  return jax.tree_util.tree_map(rows, inputs)


def rounds_axis(local: synthetic_bandit.EstimatorInputs) -> dict:
  """The estimates on one log whose rounds are split between the processes, under `jax.jit`.

  Args:
    local: this process's rounds (numpy arrays), every process holding the same number.

  Returns:
    The estimates on the global log, the rounds of every process together.
  """
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ("rounds",)), PartitionSpec("rounds"))
  inputs = jax.tree_util.tree_map(
      lambda rows: jax.make_array_from_process_local_data(sharding, rows), local)
  return jax.jit(_estimates)(inputs)


def streamed(local: synthetic_bandit.EstimatorInputs) -> dict:
  """The same log's estimates by the streaming estimators, over `parallel.shard_rounds`.

  Each process hands shard_rounds its own rows; one `update` folds the whole global log in.
  """
  sharded = parallel.shard_rounds(local._asdict())
  stream = ope.stream_estimators(("ips", "snips", "dr", "beta_ips"))
  state = stream.update(stream.init(), sharded.data, where=sharded.where)
  return {name: estimate.value for name, estimate in stream.finalize(state).estimates.items()}


def run() -> dict:
  """Both parts on every device of every process, gathered: numpy arrays, the same on every process.

  In one process this is the reference that every multi-process run must equal.
  """
  keys = jax.random.split(jax.random.key(1), SEEDS)  # the same keys on every process
  sweep = seed_axis(keys)
  local = local_rows(sweep["inputs"])
  rounds = rounds_axis(local)
  out = distributed.to_host({**{f"log_{k}": v for k, v in sweep["inputs"]._asdict().items()},
                             **{f"seeds_{k}": v for k, v in sweep["estimates"].items()},
                             **{f"rounds_{k}": v for k, v in rounds.items()},
                             **{f"streamed_{k}": v for k, v in streamed(local).items()}})
  # What the run looked like: this process's rows of the rounds axis, processes and devices.
  out.update(local_rewards=local.rewards, process_count=np.array(jax.process_count()),
             device_count=np.array(jax.device_count()))
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="the .npz that process 0 writes")
  parser.add_argument("--devices", type=int, default=1, help="CPU devices per process")
  parser.add_argument("--coordinator", default=None, help="host:port of process 0")
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--timeout", type=int, default=60, help="seconds to wait for the others")
  args = parser.parse_args(argv)
  jax.config.update("jax_platforms", "cpu")
  # Before anything touches a device: join the run, with forced CPU devices.
  distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                         process_id=args.process_id, local_device_count=args.devices,
                         initialization_timeout=args.timeout)
  if (jax.process_count(), jax.device_count()) != (args.num_processes,
                                                   args.num_processes * args.devices):
    raise SystemExit(f"expected {args.num_processes} processes x {args.devices} devices, got "
                     f"{jax.process_count()} processes and devices {jax.devices()}")
  results = run()
  if jax.process_index() == 0:
    np.savez(args.out, **results)
  print(f"process {jax.process_index()} of {jax.process_count()}: done", file=sys.stderr)


if __name__ == "__main__":
  main()
