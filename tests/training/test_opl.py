"""Tests for saferl_jax.training.opl: input checks, the seed axis, learning on a simulated problem,
checkpoint/resume equal to an uninterrupted run bit for bit, and each method's gradient."""

import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from saferl_jax.data import make_problem, policy_value, simulate_logs
from saferl_jax.opl import (METHODS, LinearPolicy, as_functional, corrected_gradient,
                            gradient_optimal_baseline, logged_batch, logged_log_probs,
                            method_gradient, per_example_weight_gradients, snips_objective, train,
                            value_optimal_baseline)
from saferl_jax.training import opl as training

D, NA = 3, 4
OPTIMIZER = optax.adam(0.05)

# The problem, the policy and the logs are built on first use, not when xdist's workers import the
# file (building them compiles).


@functools.cache
def problem():
  return make_problem(jax.random.key(0), num_actions=NA, dim_context=D, num_contexts=50)


@functools.cache
def _policy_apply():
  return as_functional(LinearPolicy(D, NA, rngs=nnx.Rngs(0)))[0]


def apply_fn(params, contexts):
  """The linear policy's logits."""
  return _policy_apply()(params, contexts)


def init_params(seed):
  return as_functional(LinearPolicy(D, NA, rngs=nnx.Rngs(seed)))[1]


def stacked_params(seeds):
  return jax.tree_util.tree_map(lambda *x: jnp.stack(x), *[init_params(s) for s in seeds])


def simulated_data(seed, num_seeds, n):
  """A LoggedBatch [num_seeds, n, ...] from the problem's logging policy."""
  log = simulate_logs(problem(), keys=jax.random.split(jax.random.key(seed), num_seeds), num_rounds=n)
  return logged_batch(problem().contexts[log.context_ids], log.actions, log.rewards,
                      log.logging_probs)


def seed_slice(tree, s):
  return jax.tree_util.tree_map(lambda x: x[s], tree)


def evaluate(params):
  return {"value": policy_value(jax.nn.softmax(apply_fn(params, problem().contexts), axis=-1),
                                problem().expected_rewards)}


def assert_same_result(got, expected, exact=True):
  assert set(got.history) == set(expected.history)
  compare = (np.testing.assert_array_equal if exact
             else lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6))
  for name in expected.history:
    compare(got.history[name], expected.history[name])
  assert jax.tree_util.tree_structure(got.params) == jax.tree_util.tree_structure(expected.params)
  for x, y in zip(jax.tree_util.tree_leaves(got.params), jax.tree_util.tree_leaves(expected.params)):
    compare(x, y)


@functools.cache
def one_seed_data():
  """One seed's data for the cheap tests."""
  return seed_slice(simulated_data(1, 1, 16), 0)


# Input checks.

@functools.cache
def good():
  data = one_seed_data()
  return dict(contexts=np.asarray(data.contexts), actions=np.asarray(data.actions),
              rewards=np.asarray(data.rewards), logging_probs=np.asarray(data.logging_probs))


def changed(name, index, value):
  """good -> {name: good[name] with [index] set to value}."""
  def change(good):
    x = good[name].copy()
    x[index] = value
    return {name: x}
  return change


BAD_BATCHES = [
    ("logging_probs", changed("logging_probs", 2, 0.0)),
    ("logging_probs", changed("logging_probs", 2, 1.5)),
    ("logging_probs", changed("logging_probs", 2, np.nan)),
    ("rewards", changed("rewards", 3, np.nan)),
    ("rewards", changed("rewards", 3, np.inf)),
    ("contexts", changed("contexts", (1, 0), np.nan)),
    ("shapes", lambda good: {"rewards": good["rewards"][:-1]}),
    ("shapes", lambda good: {"actions": good["actions"][:, None]}),
    ("shapes", lambda good: {"contexts": good["contexts"][:-2]}),
    ("actions", lambda good: {"actions": good["actions"].astype(float)}),
    ("actions", changed("actions", 0, -1)),
]


@pytest.mark.parametrize("match,change", BAD_BATCHES,
                         ids=[f"{m}-{i}" for i, (m, _) in enumerate(BAD_BATCHES)])
def test_logged_batch_rejects_bad_inputs(match, change):
  with pytest.raises(ValueError, match=match):
    logged_batch(**(good() | change(good())))


def test_logged_batch_accepts_a_seed_axis():
  batch = logged_batch(*(np.stack([x, x]) for x in good().values()))
  assert batch.contexts.shape == (2, 16, D) and batch.actions.shape == (2, 16)
  assert jnp.issubdtype(batch.actions.dtype, jnp.integer)


@pytest.mark.parametrize("option,match", [
    (dict(method="dr"), "method"),
    (dict(epochs=0), "epochs"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=17), "batch_size"),
])
def test_train_rejects_bad_options(option, match):
  kwargs = dict(key=jax.random.key(0), method="ips", epochs=1, optimizer=OPTIMIZER) | option
  with pytest.raises(ValueError, match=match):
    train(apply_fn, init_params(0), one_seed_data(), **kwargs)


def test_method_gradient_rejects_an_unknown_method():
  with pytest.raises(ValueError, match="method"):
    method_gradient("dr", apply_fn, init_params(0), one_seed_data())


def test_train_rejects_an_action_beyond_the_policy():
  data = one_seed_data()
  data = data._replace(actions=data.actions.at[0].set(NA))
  with pytest.raises(ValueError, match="actions"):
    train(apply_fn, init_params(0), data, key=jax.random.key(0), method="ips", epochs=1,
          optimizer=OPTIMIZER)


# The seed axis.


@pytest.mark.slow
def test_single_key_and_three_seeds_equal_separate_runs():
  data = simulated_data(2, 3, 16)
  params = stacked_params([0, 1, 2])
  keys = jax.random.split(jax.random.key(3), 3)
  options = dict(method="beta_grad", epochs=3, batch_size=8, evaluate=evaluate, optimizer=OPTIMIZER)
  together = train(apply_fn, params, data, key=keys, **options)
  for s in range(3):
    single = train(apply_fn, seed_slice(params, s), seed_slice(data, s), key=keys[s], **options)
    # No seed axis with a single key.
    for x, y in zip(jax.tree_util.tree_leaves(single.params),
                    jax.tree_util.tree_leaves(init_params(s))):
      assert x.shape == y.shape
    assert single.history["value"].shape == (4,)
    assert single.history["baseline"].shape == (3,)
    expected = training.TrainResult(seed_slice(together.params, s),
                                    {k: v[:, s] for k, v in together.history.items()})
    assert_same_result(single, expected, exact=False)
  assert together.history["value"].shape == (4, 3)
  assert together.history["baseline"].shape == (3, 3)
  # The seeds differ (different data, initial parameters and keys).
  assert not np.allclose(together.history["value"][-1, 0], together.history["value"][-1, 1])


# Learning.


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_method_improves_the_true_value(method):
  data = simulated_data(4, 2, 200)
  result = train(apply_fn, stacked_params([5, 6]), data, key=jax.random.split(jax.random.key(7), 2),
                 method=method, epochs=15, banditnet_lambda=0.5, evaluate=evaluate,
                 optimizer=OPTIMIZER)
  value = result.history["value"]
  assert value.shape == (16, 2)
  assert np.all(value[-1] > value[0] + 0.01), value[[0, -1]]
  assert np.all(np.isfinite(result.history["baseline"]))


# Checkpoint and resume (the general cases for every loop are in test_checkpoints.py).

@functools.cache
def resume_data():
  return simulated_data(8, 2, 24)


@functools.cache
def resume_params():
  return stacked_params([9, 10])


def resume_options():
  return dict(key=jax.random.split(jax.random.key(11), 2), method="beta_grad",
              batch_size=8, evaluate=evaluate, optimizer=OPTIMIZER)


def resume_run(path, epochs=6, data=None, **changes):
  data = resume_data() if data is None else data
  return train(apply_fn, resume_params(), data, epochs=epochs, checkpoint_path=path,
               **(resume_options() | changes))


@pytest.fixture(scope="module")
def six_epochs(tmp_path_factory):
  """An uninterrupted 6-epoch run and its checkpoint."""
  path = tmp_path_factory.mktemp("six") / "run"
  return resume_run(path), path


@pytest.fixture
def saved_epochs(interrupt_checkpoints):
  """The epoch of every checkpoint written."""
  return interrupt_checkpoints.saved


@pytest.mark.slow
def test_resume_after_an_interrupt_equals_the_uninterrupted_run(six_epochs, tmp_path,
                                                                interrupt_checkpoints):
  reference, _ = six_epochs
  path = tmp_path / "interrupted"
  interrupt_checkpoints.at = 3
  with pytest.raises(KeyboardInterrupt):
    resume_run(path)
  resumed = resume_run(path)
  assert interrupt_checkpoints.saved == [1, 2, 3, 4, 5, 6]  # resumed after epoch 3
  assert_same_result(resumed, reference)
  assert resumed.history["value"].shape == (7, 2)
  assert resumed.history["baseline"].shape == (6, 2)


@pytest.mark.slow
def test_a_finished_checkpoint_is_returned_without_training(six_epochs, tmp_path, saved_epochs):
  reference, six_path = six_epochs
  path = tmp_path / "copy"
  shutil.copytree(six_path, path)
  assert_same_result(resume_run(path), reference)
  assert saved_epochs == []


@pytest.mark.parametrize("change,field", [
    ("method", "options"), ("data", "data_sha256"), ("params", "initial_state_sha256"),
    ("lambda", "options"), ("epochs", "num_steps"), ("permuted", "data_sha256"),
    ("evaluate", "evaluate")])
@pytest.mark.slow
def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(six_epochs, tmp_path,
                                                                    saved_epochs, change, field):
  _, six_path = six_epochs
  path = tmp_path / "other"
  shutil.copytree(six_path, path)
  rewards = np.asarray(resume_data().rewards).copy()
  i, j = np.argmax(rewards[0] == 1.0), np.argmax(rewards[0] == 0.0)
  rewards[0, [i, j]] = rewards[0, [j, i]]  # the same rewards in another order
  runs = {
      "method": lambda: resume_run(path, method="beta_value"),
      "data": lambda: resume_run(path, data=resume_data()._replace(
          rewards=resume_data().rewards.at[0, 0].add(0.5))),
      "params": lambda: train(apply_fn, stacked_params([9, 12]), resume_data(), epochs=6,
                              checkpoint_path=path, **resume_options()),
      "lambda": lambda: resume_run(path, method="banditnet", banditnet_lambda=0.25),
      "epochs": lambda: resume_run(path, epochs=3),  # a shorter run never overwrites a longer one
      "permuted": lambda: resume_run(path, data=resume_data()._replace(rewards=jnp.asarray(rewards))),
      "evaluate": lambda: resume_run(path, evaluate=None),
  }
  with pytest.raises(ValueError, match=f"holds a different run.*{field}"):
    runs[change]()
  assert saved_epochs == []


# Each method's gradient.


@pytest.fixture(scope="module")
def batch_and_params():
  return one_seed_data(), jax.tree_util.tree_map(lambda x: x + 0.3, init_params(1))


def flat(tree):
  return np.asarray(ravel_pytree(tree)[0])


@pytest.mark.slow
def test_method_gradient_beta_grad(batch_and_params):
  batch, params = batch_and_params
  grads, baseline = method_gradient("beta_grad", apply_fn, params, batch)
  per_example = per_example_weight_gradients(apply_fn, params, batch)
  beta = gradient_optimal_baseline(batch.rewards, per_example)
  np.testing.assert_allclose(baseline, beta, rtol=1e-6)
  np.testing.assert_allclose(flat(grads), -flat(corrected_gradient(batch.rewards, per_example, beta)),
                             rtol=1e-5, atol=1e-7)
  assert np.abs(flat(grads)).max() > 1e-3


@pytest.mark.slow
def test_method_gradient_banditnet(batch_and_params):
  batch, params = batch_and_params
  ips_grads, ips_baseline = method_gradient("ips", apply_fn, params, batch)
  zero_grads, zero_baseline = method_gradient("banditnet", apply_fn, params, batch,
                                              banditnet_lambda=0.0)
  np.testing.assert_array_equal(flat(zero_grads), flat(ips_grads))
  assert float(ips_baseline) == 0.0 and float(zero_baseline) == 0.0
  # A non-zero lambda: the negated corrected gradient with that fixed baseline.
  grads, baseline = method_gradient("banditnet", apply_fn, params, batch, banditnet_lambda=0.3)
  per_example = per_example_weight_gradients(apply_fn, params, batch)
  np.testing.assert_allclose(baseline, 0.3, rtol=1e-7)
  np.testing.assert_allclose(flat(grads), -flat(corrected_gradient(batch.rewards, per_example, 0.3)),
                             rtol=1e-5, atol=1e-7)
  assert not np.allclose(flat(grads), flat(ips_grads))


@pytest.mark.slow
def test_method_gradient_beta_value_and_snips(batch_and_params):
  batch, params = batch_and_params
  log_probs = logged_log_probs(apply_fn, params, batch.contexts, batch.actions)
  beta = value_optimal_baseline(log_probs, batch.rewards, batch.logging_probs)
  grads, baseline = method_gradient("beta_value", apply_fn, params, batch)
  np.testing.assert_allclose(baseline, beta, rtol=1e-6)
  per_example = per_example_weight_gradients(apply_fn, params, batch)
  np.testing.assert_allclose(flat(grads), -flat(corrected_gradient(batch.rewards, per_example, beta)),
                             rtol=1e-5, atol=1e-7)

  def snips(p):
    lp = logged_log_probs(apply_fn, p, batch.contexts, batch.actions)
    return snips_objective(lp, batch.rewards, batch.logging_probs)
  grads, baseline = method_gradient("snips", apply_fn, params, batch)
  np.testing.assert_allclose(flat(grads), -flat(jax.grad(snips)(params)), rtol=1e-6, atol=1e-8)
  assert float(baseline) == 0.0


# Mini-batches.


@pytest.mark.parametrize("method", ["beta_grad", "snips"])
@pytest.mark.slow
def test_one_epoch_with_batch_size_n_is_one_full_batch_step(method):
  params = init_params(2)
  optimizer = optax.adam(0.05)
  grads, baseline = method_gradient(method, apply_fn, params, one_seed_data())
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  expected = optax.apply_updates(params, updates)
  n = one_seed_data().rewards.shape[0]
  for batch_size in [n, None]:
    result = train(apply_fn, params, one_seed_data(), key=jax.random.key(13), method=method, epochs=1,
                   batch_size=batch_size, optimizer=optimizer)
    np.testing.assert_allclose(flat(result.params), flat(expected), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.history["baseline"], [baseline], rtol=1e-5, atol=1e-7)
    assert not np.allclose(flat(result.params), flat(params))
