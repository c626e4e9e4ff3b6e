"""Fixtures shared across the test folders."""

from hypothesis import settings
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("ci")

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
