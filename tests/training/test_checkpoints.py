"""Checkpoints that cannot lie, through the one driver: another optimizer, a shorter run, another
reward, a damaged directory, 'new' beside a mismatch, and the resume message."""

import functools
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from saferl_jax.models import LinearPolicy, as_functional
from saferl_jax.opl import logged_batch
from saferl_jax.training import checkpoints
from saferl_jax.training.opl import train

D, NA, N = 3, 4, 16
FAST, SLOW = optax.adam(0.05), optax.adam(1e-6)

# The policy and its data are built on first use, not when xdist's workers import the file.


@functools.cache
def policy():
  """(apply_fn, params) of the linear policy."""
  return as_functional(LinearPolicy(D, NA, rngs=nnx.Rngs(0)))


@functools.cache
def logged_data():
  keys = jax.random.split(jax.random.key(1), 3)
  return logged_batch(jax.random.normal(keys[0], (N, D)), jax.random.randint(keys[1], (N,), 0, NA),
                      jax.random.bernoulli(keys[2], 0.5, (N,)).astype(jnp.float32),
                      jnp.full((N,), 1 / NA))


def run(path, optimizer=FAST, epochs=3, **options):
  apply_fn, params = policy()
  return train(apply_fn, params, logged_data(), key=jax.random.key(2), method="ips", epochs=epochs,
               optimizer=optimizer, checkpoint_path=path, **options)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  path = tmp_path_factory.mktemp("finished") / "run"
  return run(path), path


def copy(finished, tmp_path):
  path = tmp_path / "copy"
  shutil.copytree(finished[1], path)
  return path


def test_another_learning_rate_is_refused_not_returned(finished, tmp_path):
  # The case: adam(0.05) then adam(1e-6) into the same path returned the first run.
  path = copy(finished, tmp_path)
  with pytest.raises(ValueError, match=r"holds a different run.*optimizer"):
    run(path, optimizer=SLOW)
  # The same rate written by another object is the same run (the probe, not the identity).
  result = run(path, optimizer=optax.adam(0.05))
  np.testing.assert_array_equal(result.history["baseline"], finished[0].history["baseline"])


def test_another_momentum_and_an_injected_hyperparameter_are_refused(finished, tmp_path):
  path = copy(finished, tmp_path)
  with pytest.raises(ValueError, match="optimizer"):
    run(path, optimizer=optax.adam(0.05, b1=0.5))
  injected = tmp_path / "injected"
  run(injected, optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))
  with pytest.raises(ValueError, match="optimizer"):
    run(injected, optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=0.2))


def test_a_shorter_or_longer_run_never_overwrites(finished, tmp_path, interrupt_checkpoints):
  path = copy(finished, tmp_path)
  before = sorted(p.name for p in path.rglob("*"))
  for epochs in (2, 4):
    with pytest.raises(ValueError, match=r"num_steps \(checkpoint: 3, now: " + str(epochs)):
      run(path, epochs=epochs)
  assert interrupt_checkpoints.saved == []
  assert sorted(p.name for p in path.rglob("*")) == before


def test_mismatch_new_trains_beside_and_finds_it_again(finished, tmp_path, interrupt_checkpoints):
  path = copy(finished, tmp_path)
  slow = run(path, optimizer=SLOW, checkpoint_mismatch="new")
  assert interrupt_checkpoints.saved == [1, 2, 3]
  siblings = [p for p in tmp_path.iterdir() if p.name.startswith("copy-")]
  assert len(siblings) == 1
  # The slow run moved the parameters far less than the fast one (which is still at `path`).
  moved = lambda result: float(jnp.abs(result.params["linear"]["kernel"][...] -
                                       policy()[1]["linear"]["kernel"][...]).max())
  assert moved(slow) < 1e-3 < moved(finished[0])
  interrupt_checkpoints.saved.clear()
  again = run(path, optimizer=SLOW, checkpoint_mismatch="new")
  assert interrupt_checkpoints.saved == []  # found the sibling, finished
  np.testing.assert_array_equal(again.history["baseline"], slow.history["baseline"])
  with pytest.raises(ValueError, match="checkpoint_mismatch"):
    run(path, checkpoint_mismatch="overwrite")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty_step", "file"])
def test_a_damaged_checkpoint_raises_naming_the_path(finished, tmp_path, damage):
  path = copy(finished, tmp_path)
  if damage == "file":
    shutil.rmtree(path)
    path.write_bytes(b"\x00not a checkpoint")
    match = "is a file"
  else:
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.stat().st_size > 0)
    assert files
    for f in files:
      if damage == "truncate":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
      elif damage == "garbage":
        f.write_bytes(b"garbage" * 7)
      else:
        f.unlink()
    match = "cannot read the checkpoint"
  with pytest.raises(ValueError, match=match) as error:
    run(path)
  assert str(path) in str(error.value)


def test_resuming_is_logged_with_the_step(finished, tmp_path, caplog, interrupt_checkpoints):
  path = tmp_path / "interrupted"
  interrupt_checkpoints.at = 1
  with pytest.raises(KeyboardInterrupt):
    run(path)
  with caplog.at_level(logging.INFO, logger="saferl_jax.training"):
    resumed = run(path)
  assert "resuming from step 1 of 3" in caplog.text
  np.testing.assert_array_equal(resumed.history["baseline"], finished[0].history["baseline"])
  for a, b in zip(jax.tree_util.tree_leaves(resumed.params), jax.tree_util.tree_leaves(finished[0].params)):
    np.testing.assert_array_equal(a, b)


def test_non_finite_initial_parameters_are_a_value_error():
  bad = jax.tree_util.tree_map(lambda x: x.at[0].set(jnp.nan) if x.ndim == 1 else x, policy()[1])
  with pytest.raises(ValueError, match="params:.*NaN"):
    train(policy()[0], bad, logged_data(), key=jax.random.key(2), method="ips", epochs=1, optimizer=FAST)


def test_differences_compare_probes_with_a_tolerance():
  saved = {"optimizer": [1.0, 2.0], "options": {"a": 1}}
  assert checkpoints.differences(saved, {"optimizer": [1.0 + 1e-7, 2.0], "options": {"a": 1}}) == []
  assert [d.split(" ")[0] for d in checkpoints.differences(
      saved, {"optimizer": [1.1, 2.0], "options": {"a": 2}})] == ["optimizer", "options.a"]
