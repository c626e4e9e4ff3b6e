"""Fixtures shared across the test folders."""

import pytest

from saferl_jax import training_runs


@pytest.fixture
def interrupt_checkpoints(monkeypatch):
  """Records the progress of every checkpoint written, and raises KeyboardInterrupt right after
  the first one written at `interrupt.at` (set it before training): a run stopped mid-way."""

  class Interrupt:
    at = None
    saved: list = []

  interrupt = Interrupt()
  interrupt.saved = []
  real = training_runs.save

  def save(path, fingerprint, state, progress, history):
    real(path, fingerprint, state, progress, history)
    interrupt.saved.append(progress)
    if progress == interrupt.at and interrupt.saved.count(progress) == 1:
      raise KeyboardInterrupt
  monkeypatch.setattr(training_runs, "save", save)
  return interrupt
