"""Fixtures shared across the test folders."""

from hypothesis import settings
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("ci")

import json
import os
import subprocess
import sys

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
  # The session's flags (../conftest.py's optimisation level) plus the device count.
  flags = (f"{os.environ.get('XLA_FLAGS', '')} "
           f"--xla_force_host_platform_device_count={num_devices}").strip()
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
