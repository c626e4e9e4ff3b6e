"""Primal-dual constrained off-policy learning: the dual step by hand, fixed multipliers, the
history's names and shapes, resume equal to an uninterrupted run, bad inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saferl_jax.constrained import dual_descent
from saferl_jax.data import constrained_bandit as cb
from saferl_jax.opl.constrained import constrained_objective
from saferl_jax.training.constrained_opl import train_constrained

# The problem and its logs are built on first use, not when xdist's workers import the file.

@functools.cache
def problem():
  return cb.two_reward_problem(jax.random.key(0), num_actions=4, dim_context=3, num_contexts=30)


@functools.cache
def logged_data():
  """Two seeds' logs of 200 rounds."""
  return cb.constrained_batch(problem(), cb.simulate_logs(problem(), keys=KEYS, num_rounds=200))


KEYS = jax.random.split(jax.random.key(1), 2)
PARAMS = jnp.zeros((2, 3, 4))  # the uniform policy, two seeds
OPTIMIZER = optax.adam(0.1)
DUAL = dual_descent(2.0)
THRESHOLD = 0.6


def apply_fn(params, contexts):
  return contexts @ params


def evaluate(params):
  values = cb.policy_values(jax.nn.softmax(apply_fn(params, problem().contexts), axis=-1), problem())
  return {"true/primary": values[0], "true/safety": values[1]}


def run(num_steps=4, **changes):
  options = dict(key=KEYS, thresholds=[THRESHOLD], num_steps=num_steps, optimizer=OPTIMIZER,
                 dual=DUAL, names=["safety"], estimator="dr", eval_every=2,
                 evaluate=evaluate) | changes
  return train_constrained(apply_fn, PARAMS, logged_data(), **options)


@pytest.fixture(scope="module")
def four_steps():
  return run()


@pytest.mark.slow
def test_the_history_has_every_name_and_shape(four_steps):
  history = four_steps.history
  for name in ("value/primary", "lagrangian", "estimate/safety", "lcb/safety", "slack/safety",
               "lambda/safety"):
    assert history[name].shape == (4, 2), name
  assert history["true/safety"].shape == (3, 2)  # before training, then every 2 steps
  np.testing.assert_allclose(history["slack/safety"], history["lcb/safety"] - THRESHOLD, atol=1e-6)
  assert np.all(history["lambda/safety"] >= 0)


@pytest.mark.slow
def test_the_first_dual_step_is_projected_descent_on_the_initial_slack(four_steps):
  # Step 0 sees the initial (uniform) policy and lambda = 0: its slack is the objective's there,
  # and lambda_1 = max(0, 0 - eta * slack).
  uniform, data = jnp.full((200, 4), 0.25), logged_data()
  for s in range(2):
    expected = constrained_objective(
        uniform, data.actions[s], data.rewards[s], data.logging_probs[s], jnp.zeros(1),
        thresholds=jnp.array([THRESHOLD]), estimator="dr", reward_hat=data.reward_hat[s])
    history = four_steps.history
    np.testing.assert_allclose(history["slack/safety"][0, s], expected.slacks[0], atol=1e-5)
    np.testing.assert_allclose(history["lambda/safety"][0, s],
                               max(0.0, -2.0 * float(expected.slacks[0])), atol=1e-5)
  # Later steps: lambda_{t+1} = max(0, lambda_t - eta slack_t), from the recorded slacks.
  lam, slack = four_steps.history["lambda/safety"], four_steps.history["slack/safety"]
  np.testing.assert_allclose(lam[1:], np.maximum(lam[:-1] - 2.0 * slack[1:], 0.0), atol=1e-5)


@pytest.mark.slow
def test_dual_every_holds_the_multipliers_between_dual_steps():
  history = run(dual_every=2).history["lambda/safety"]
  np.testing.assert_array_equal(history[0], 0.0)  # step 1 of 2: no dual step yet
  np.testing.assert_array_equal(history[1], history[2])


def test_without_a_dual_the_multipliers_stay_fixed_per_seed():
  result = run(dual=None, multipliers=jnp.array([[0.0], [3.0]]), penalty="estimate")
  np.testing.assert_array_equal(result.history["lambda/safety"], [[0.0, 3.0]] * 4)
  np.testing.assert_allclose(result.history["slack/safety"],
                             result.history["estimate/safety"] - THRESHOLD, atol=1e-6)


@pytest.mark.slow
def test_a_single_key_runs_one_seed_like_the_first_of_two(four_steps):
  one = train_constrained(apply_fn, PARAMS[0], jax.tree_util.tree_map(lambda x: x[0], logged_data()),
                          key=KEYS[0], thresholds=[THRESHOLD], num_steps=4, optimizer=OPTIMIZER,
                          dual=DUAL, names=["safety"], estimator="dr", eval_every=2,
                          evaluate=evaluate)
  np.testing.assert_allclose(one.history["lambda/safety"],
                             four_steps.history["lambda/safety"][:, 0], atol=1e-5)


@pytest.mark.slow
def test_resume_after_an_interrupt_equals_the_uninterrupted_run(four_steps, tmp_path,
                                                                interrupt_checkpoints):
  reference = four_steps
  interrupt_checkpoints.at = 2
  path = tmp_path / "interrupted"
  with pytest.raises(KeyboardInterrupt):
    run(checkpoint_path=path)
  resumed = run(checkpoint_path=path)
  assert interrupt_checkpoints.saved == [2, 4]  # stopped after step 2, resumed from it
  np.testing.assert_array_equal(resumed.params, reference.params)
  assert resumed.history.keys() == reference.history.keys()
  for name in reference.history:
    np.testing.assert_array_equal(resumed.history[name], reference.history[name], err_msg=name)
  with pytest.raises(ValueError, match="threshold"):  # another run's checkpoint is refused
    run(checkpoint_path=path, thresholds=[0.5])


@pytest.mark.parametrize("change, error, match", [
    (dict(thresholds=[0.5, 0.6], names=["a", "b"]), ValueError, "columns"),
    (dict(thresholds=[]), ValueError, "thresholds"),
    (dict(names=["a", "b"]), ValueError, "names"),
    (dict(multipliers=jnp.array([-1.0])), ValueError, "multipliers"),
    (dict(multipliers=jnp.zeros((3, 1))), ValueError, "multipliers"),
    (dict(dual="descent"), TypeError, "dual"),
    (dict(estimator="ips"), ValueError, "estimator"),
    (dict(bound="magic"), ValueError, "bound"),
    (dict(delta=0.0), ValueError, "delta"),
    (dict(num_steps=0), ValueError, "num_steps"),
    (dict(dual_every=0), ValueError, "dual_every"),
    (dict(key=jax.random.split(jax.random.key(0), 3)), ValueError, "seeds"),
])
def test_bad_inputs_raise_naming_the_argument(change, error, match):
  with pytest.raises(error, match=match):
    run(**change)


def test_actions_beyond_the_policy_are_refused():
  data = logged_data()
  data = data._replace(actions=data.actions.at[0, 0].set(4))
  with pytest.raises(ValueError, match="action"):
    train_constrained(apply_fn, PARAMS, data, key=KEYS, thresholds=[0.5], num_steps=1,
                      optimizer=OPTIMIZER, dual=DUAL)
