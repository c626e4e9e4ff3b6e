"""Fixtures shared across the test folders."""

from hypothesis import settings
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("ci")

import json
import os
import subprocess
import sys

# The suite compiles a few thousand small programs that each run for milliseconds, so LLVM's
# optimisation passes are much of its time. Tests compile at LLVM -O0 (XLA's own HLO passes still
# run; results agree to rounding); the subprocesses the tests start inherit the flag. XLA reads
# XLA_FLAGS when the CPU backend starts, which is after this (no array exists yet).
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax
import pytest

from saferl_jax.training import checkpoints


@pytest.fixture(autouse=True, scope="module")
def release_compiled_code():
  """Drops JAX's compiled executables after each test module.

  The suite compiles thousands of functions in one process; each keeps memory mappings for its
  code, and past the kernel's vm.max_map_count (65530) XLA's CPU compiler crashes with a
  segmentation fault (seen at 98% of the suite). Nothing is shared between modules anyway.
  """
  yield
  jax.clear_caches()


@pytest.fixture
def interrupt_checkpoints(monkeypatch):
  """Records the progress of every checkpoint written, and raises KeyboardInterrupt right after
  the first one written at `interrupt.at` (set it before training): a run stopped mid-way."""

  class Interrupt:
    at = None
    saved: list = []

  interrupt = Interrupt()
  interrupt.saved = []
  real = checkpoints.write

  def save(path, fingerprint, state, progress, history):
    real(path, fingerprint, state, progress, history)
    interrupt.saved.append(progress)
    if progress == interrupt.at and interrupt.saved.count(progress) == 1:
      raise KeyboardInterrupt
  monkeypatch.setattr(checkpoints, "write", save)
  return interrupt


def _run_on_cpu_devices(script: str, num_devices: int = 8) -> dict:
  """Runs `script` in a fresh Python with `num_devices` forced CPU devices (XLA reads the flag
  once, at start-up) and returns the JSON object its last printed line holds."""
  flags = f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={num_devices}"
  env = dict(os.environ, XLA_FLAGS=flags,
             JAX_PLATFORMS="cpu", SAFERL_JAX_QUIET="1")
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def run_on_cpu_devices():
  """run_on_cpu_devices(script, num_devices=8) -> the JSON of the script's last line, run with
  that many forced CPU devices."""
  return _run_on_cpu_devices


# Files measured at 40 s or more on CI's 2 cores (tests/test_cli.py's demo alone is minutes). They
# are handed to the workers first, so that the two workers finish together; pyproject.toml turns
# off xdist's own order (most tests first), which put the demo last and left one worker idle.
LONGEST_FIRST = ("tests/test_cli.py", "tests/test_notebooks.py", "tests/ope/test_estimators.py",
                 "tests/experiments/test_constrained_mixture2d.py", "tests/test_readme.py",
                 "tests/training/test_finetune.py", "tests/models/test_reward_models.py",
                 "tests/training/test_batch_sharding.py", "tests/training/test_finetune_beyond.py")


def pytest_collection_modifyitems(config, items):
  """Longest files first, then the other files by their number of tests (xdist's own order)."""
  del config
  def file_of(item):
    return item.nodeid.split("::")[0]
  counts = {}
  for item in items:
    counts[file_of(item)] = counts.get(file_of(item), 0) + 1
  rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: (rank.get(file_of(item), len(rank)), -counts[file_of(item)]))
