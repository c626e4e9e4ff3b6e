"""The shared policy-gradient pieces: the leave-one-out baseline (REINFORCE over rankings, LOOP),
its unbiasedness by Monte Carlo, and the clipped surrogate (PPO, LOOP, PRPO)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax.policy_gradient import clipped_surrogate, leave_one_out_baseline


def test_definition_against_a_loop():
  values = np.array([0.5, -1.0, 2.0, 4.0, 0.0], np.float32)
  expected = [np.mean(np.delete(values, i)) for i in range(len(values))]
  np.testing.assert_allclose(leave_one_out_baseline(values), expected, rtol=1e-6)
  # x_i - b_i = N / (N - 1) (x_i - mean(x)), and the advantages sum to 0.
  advantages = values - leave_one_out_baseline(values)
  np.testing.assert_allclose(advantages, 5 / 4 * (values - values.mean()), rtol=1e-5, atol=1e-6)
  assert abs(float(jnp.sum(advantages))) < 1e-5


@pytest.mark.slow
def test_axis_and_batches():
  values = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)
  along_1 = leave_one_out_baseline(values, axis=1)
  for row in range(3):
    np.testing.assert_allclose(along_1[row], leave_one_out_baseline(values[row]), rtol=1e-5)
  np.testing.assert_allclose(leave_one_out_baseline(values, axis=0),
                             leave_one_out_baseline(values.T, axis=1).T, rtol=1e-5)
  np.testing.assert_allclose(jax.vmap(leave_one_out_baseline)(values), along_1, rtol=1e-5)
  np.testing.assert_allclose(jax.jit(leave_one_out_baseline)(values[0]),
                             leave_one_out_baseline(values[0]), rtol=1e-6)


def test_needs_two_samples():
  with pytest.raises(ValueError, match="values"):
    leave_one_out_baseline(jnp.array([1.0]))
  with pytest.raises(ValueError, match="values"):
    leave_one_out_baseline(jnp.ones((3, 1)), axis=1)


# A softmax policy over 3 actions with rewards r: the exact gradient of E[r] w.r.t. the logits is
# pi * (r - E[r]). The score-function estimator (1/N) sum_i (r_{a_i} - b_i) grad log pi(a_i), with
# N = 2 draws per estimate, is averaged over many keys.
LOGITS = jnp.array([0.2, -0.4, 0.7])
REWARDS = jnp.array([4.0, 6.0, 2.5])  # far from 0, where a baseline pays
NUM_KEYS, N = 20000, 2


def score_function_estimates(baseline_fn):
  def one(key):
    actions = jax.random.categorical(key, LOGITS, shape=(N,))
    rewards = REWARDS[actions]
    scores = jax.nn.one_hot(actions, 3) - jax.nn.softmax(LOGITS)
    return jnp.mean((rewards - baseline_fn(rewards))[:, None] * scores, axis=0)
  keys = jax.random.split(jax.random.key(0), NUM_KEYS)
  return np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)


def within_stderr(samples, expected, num_se=4.0):
  stderr = samples.std(0, ddof=1) / np.sqrt(samples.shape[0])
  return np.all(np.abs(samples.mean(0) - expected) <= num_se * stderr)


@pytest.mark.slow
def test_leave_one_out_baselined_estimator_is_unbiased():
  probs = np.asarray(jax.nn.softmax(LOGITS), np.float64)
  exact = probs * (np.asarray(REWARDS) - probs @ np.asarray(REWARDS))
  loo = score_function_estimates(leave_one_out_baseline)
  assert within_stderr(loo, exact)
  # The baseline that includes sample i itself (the plain mean) is biased: with N = 2 it halves
  # the expected gradient, and the same test sees it.
  self_inclusive = score_function_estimates(lambda r: jnp.full_like(r, jnp.mean(r)))
  assert not within_stderr(self_inclusive, exact)
  assert within_stderr(self_inclusive, exact * (N - 1) / N)
  # With rewards far from 0, the baseline lowers the variance of the plain estimator.
  plain = score_function_estimates(jnp.zeros_like)
  assert within_stderr(plain, exact)
  assert loo.var(0).sum() < plain.var(0).sum()

def test_clipped_surrogate_closed_form_and_zero_gradient_outside():
  ratio = jnp.array([0.5, 0.9, 1.5, 0.5, 1.5])
  advantage = jnp.array([1.0, 1.0, 1.0, -1.0, -1.0])
  value = clipped_surrogate(ratio, advantage, clip_low=0.8, clip_high=1.2)
  np.testing.assert_allclose(value, [0.5, 0.9, 1.2, -0.8, -1.5])
  grad = jax.grad(lambda r: clipped_surrogate(r, advantage, clip_low=0.8, clip_high=1.2).sum())(ratio)
  # Clipped where the advantage would push the ratio further out: 1.5 with A > 0, 0.5 with A < 0.
  np.testing.assert_allclose(grad, [1.0, 1.0, 0.0, 0.0, -1.0])


def test_clipped_surrogate_rejects_an_empty_range():
  with pytest.raises(ValueError, match="clip_low"):
    clipped_surrogate(1.0, 1.0, clip_low=1.2, clip_high=0.8)
