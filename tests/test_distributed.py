"""saferl_jax.distributed: two local processes equal one, and initialize's checks.

The two-process test starts tests/distributed_worker.py twice (2 processes x 2 forced CPU
devices, gloo collectives, a free local port) and compares what process 0 wrote with the same
computation run in this process. A deadline kills both processes, so a hung collective fails
the test instead of hanging CI; a failure shows both processes' stderr.
"""

import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax import distributed

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = WORKER.parent.parent
DEADLINE_S = 240  # both processes together; a normal run takes about 10 s on 2 cores


def _worker_module():
  spec = importlib.util.spec_from_file_location("distributed_worker", WORKER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _environment() -> dict:
  """The workers' environment: CPU only, no forced device count of ours, no proxy for localhost."""
  env = {k: v for k, v in os.environ.items()
         if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "grpc_proxy")
         and not k.startswith(("JAX_", "XLA_FLAGS"))}
  env.update(JAX_PLATFORMS="cpu", SAFERL_JAX_QUIET="1",
             PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
  return env


def start_processes(out: Path, *, num_processes: int = 2, devices: int = 2) -> list:
  """Starts the worker as `num_processes` processes on a free local port: [(process, stderr log)]."""
  address = f"127.0.0.1:{_free_port()}"
  started = []
  try:
    for i in range(num_processes):
      log = out.with_name(f"{out.stem}.{i}.stderr")
      with open(log, "w") as stderr:
        started.append((subprocess.Popen(
            [sys.executable, str(WORKER), "--out", str(out), "--devices", str(devices),
             "--coordinator", address, "--num-processes", str(num_processes),
             "--process-id", str(i), "--timeout", "60"],
            cwd=ROOT, env=_environment(), stdout=subprocess.DEVNULL, stderr=stderr), log))
  except BaseException:
    stop(started)
    raise
  return started


def stop(started: list) -> list[int]:
  """Kills the processes still running; returns their indices."""
  hung = [i for i, (proc, _) in enumerate(started) if proc.poll() is None]
  for i in hung:
    started[i][0].kill()
    started[i][0].wait()
  return hung


def wait_for(started: list, out: Path) -> None:
  """Waits for every process (at most DEADLINE_S); raises with every stderr if one fails or hangs."""
  procs = [proc for proc, _ in started]
  deadline = time.monotonic() + DEADLINE_S
  try:
    # One process failing leaves the others waiting on a collective: stop at the first failure.
    while (any(p.poll() is None for p in procs) and not any(p.poll() for p in procs)
           and time.monotonic() < deadline):
      time.sleep(0.1)
  finally:
    hung = stop(started)
  codes = [p.returncode for p in procs]
  if hung or any(codes) or not out.exists():
    timed_out = time.monotonic() >= deadline
    what = f"exit codes {codes}" + (
        f"; process(es) {hung} killed, still running " + (
            f"after the {DEADLINE_S} s deadline" if timed_out else "after another failed")
        if hung else "")
    report = "\n".join(f"--- process {i} stderr (last 3000 characters) ---\n"
                       f"{log.read_text()[-3000:]}" for i, (_, log) in enumerate(started))
    pytest.fail(f"the {len(procs)}-process run failed: {what}\n{report}")


# What JAX 0.10 says when parallel.map_over_seeds device_puts typed PRNG keys onto devices of
# other processes.
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(two processes' results, this process's results): the reference runs while the others do."""
  out = tmp_path_factory.mktemp("distributed") / "two.npz"
  started = start_processes(out)
  try:
    one = _worker_module().run()
  except BaseException:
    stop(started)
    raise
  wait_for(started, out)
  return dict(np.load(out)), one


@pytest.mark.slow
def test_two_processes_ran_as_one_run_of_four_devices(runs):
  two_processes, one_process = runs
  assert int(two_processes["process_count"]) == 2
  assert int(two_processes["device_count"]) == 4
  # Process 0 held only its own half of the rounds axis: the first half of the whole log.
  half = one_process["log_rewards"].size // 2
  np.testing.assert_array_equal(two_processes["local_rewards"],
                                one_process["log_rewards"].reshape(-1)[:half])


@pytest.mark.slow
def test_two_processes_equal_one(runs):
  two_processes, one_process = runs
  assert set(two_processes) - {"process_count", "device_count", "local_rewards"} == (
      set(one_process) - {"process_count", "device_count", "local_rewards"})
  for name, expected in one_process.items():
    if name in ("process_count", "device_count", "local_rewards"):
      continue
    got = two_processes[name]
    assert got.shape == expected.shape and got.dtype == expected.dtype, name
    if name.startswith("log_") and np.issubdtype(expected.dtype, np.integer):
      # Simulation is per seed and elementwise: the same draws bit for bit.
      np.testing.assert_array_equal(got, expected, err_msg=name)
    elif name.startswith("log_"):
      # Float fields are gathered from the problem (sigmoid of a d = 5 dot product, then a
      # softmax at inverse temperature 10 over A = 5 actions), compiled in each process by its
      # own XLA (the reference has 1 CPU device, the workers 2), which may round differently:
      # a logit off by (d + 2) ulp becomes a relative error 10 (d + 2) ulp after exp, and the
      # normaliser adds A + 2: (10 * 7 + 7) ulp bounds it (measured: 8 ulp), far below what a
      # wrong shard or a lost round would change.
      np.testing.assert_allclose(got, expected, rtol=77 * np.finfo(np.float32).eps, err_msg=name)
    elif name.startswith("streamed_"):
      # The streaming estimators against the in-memory ones on the same log: Chan's merge of
      # two-pass moments, float rounding only (tests/ope/test_streaming.py checks 1e-5 relative).
      np.testing.assert_allclose(got, one_process[name.replace("streamed_", "rounds_")],
                                 rtol=1e-5, err_msg=name)
      np.testing.assert_allclose(got, expected, rtol=2048 * np.finfo(np.float32).eps,
                                 err_msg=name)
    else:
      # Estimates are sums over 256 (seeds) or 2048 (rounds) float32 terms, added in another
      # order when split over 4 devices; a reordered sum of n terms differs by at most about
      # n * eps * sum|terms|, so rtol = 2048 * eps(float32) ~ 2.4e-4 bounds it (measured: 1 ulp).
      np.testing.assert_allclose(got, expected, rtol=2048 * np.finfo(np.float32).eps,
                                 err_msg=name)


def test_initialize_alone_is_a_no_op(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(distributed, "_cluster_detected", lambda: False)
  called = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: called.append(kwargs))
  distributed.initialize()
  distributed.initialize(num_processes=1, process_id=0)
  assert called == [] and jax.process_count() == 1


@pytest.fixture
def no_cpu_collectives():
  """jax_cpu_collectives_implementation unset (as in JAX before 0.5) for one test."""
  previous = jax.config.jax_cpu_collectives_implementation
  jax.config.update("jax_cpu_collectives_implementation", None)
  yield
  jax.config.update("jax_cpu_collectives_implementation", previous)


def test_initialize_passes_arguments_and_environment(monkeypatch, no_cpu_collectives):
  called = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: called.append(kwargs))
  monkeypatch.setattr(distributed, "_cluster_detected", lambda: False)
  distributed.initialize(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
                         initialization_timeout=7)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host:99")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  distributed.initialize()
  assert called == [
      dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
           initialization_timeout=7),
      dict(coordinator_address="host:99", num_processes=2, process_id=1,
           initialization_timeout=300)]
  assert jax.config.jax_cpu_collectives_implementation == "gloo"


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(coordinator_address="localhost"), ValueError, "coordinator_address"),
    (dict(coordinator_address="host:0"), ValueError, "coordinator_address"),
    (dict(coordinator_address=1234), TypeError, "coordinator_address"),
    (dict(num_processes=0), ValueError, "num_processes"),
    (dict(num_processes=2.0), TypeError, "num_processes"),
    (dict(num_processes=2, process_id=2), ValueError, "process_id"),
    (dict(num_processes=1, process_id=1), ValueError, "process_id"),
    (dict(process_id=-1), ValueError, "process_id"),
    (dict(local_device_count=0), ValueError, "local_device_count"),
    (dict(local_device_count=True), TypeError, "local_device_count"),
    (dict(num_processes=2, process_id=0), ValueError, "coordinator_address"),
])
def test_initialize_refuses_bad_arguments(monkeypatch, kwargs, error, match):
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(distributed, "_cluster_detected", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: pytest.fail("initialized"))
  with pytest.raises(error, match=match):
    distributed.initialize(**kwargs)


def test_initialize_refuses_a_bad_environment_variable(monkeypatch):
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="num_processes: environment variable JAX_NUM_PROCESSES"):
    distributed.initialize()


def test_to_host_copies_every_leaf_to_numpy():
  keys = jax.random.split(jax.random.key(0), 3)
  tree = {"array": jnp.arange(4.0), "numpy": np.ones(2), "number": 3, "keys": keys,
          "nested": (jnp.zeros((2, 3), jnp.int32),)}
  out = distributed.to_host(tree)
  assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree_util.tree_leaves(out))
  np.testing.assert_array_equal(out["array"], np.arange(4.0))
  np.testing.assert_array_equal(out["keys"], np.asarray(jax.random.key_data(keys)))
  assert out["nested"][0].shape == (2, 3) and out["nested"][0].dtype == np.int32
  assert out["number"] == 3
