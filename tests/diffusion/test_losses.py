"""Diffusion policy-gradient losses: per-prompt reward statistics against numpy, LOOP advantages
against their definition, unbiasedness of the leave-one-out score-function gradient by Monte Carlo
on a tiny Gaussian policy (and the bias of a baseline that includes the sample, which the test
must detect), PPO clipping gradients, extreme ratios, jit, and input checks."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from saferl_jax.diffusion.losses import (PPOLoss, RewardStatsState, loop_advantages, ppo_advantages,
                                         ppo_loss, reinforce_loss, reward_stats)

# Reward statistics.


@pytest.mark.slow
def test_reward_stats_against_numpy():
  stats = reward_stats()
  rng = np.random.default_rng(0)
  num_prompts = 4
  state = stats.init(num_prompts)
  update = jax.jit(stats.update)
  seen = {p: [] for p in range(num_prompts)}
  for batch in range(6):
    # Prompt 3 never appears; prompt 2 only from the third batch on; rewards far from 0 (where a
    # naive sum-of-squares variance would lose digits).
    prompts = rng.choice(3 if batch >= 2 else 2, size=9)
    rewards = 1000.0 + rng.normal(size=9) * (1 + prompts)
    state = update(state, jnp.asarray(prompts), jnp.asarray(rewards, jnp.float32))
    for p, r in zip(prompts, np.asarray(rewards, np.float32)):
      seen[int(p)].append(float(r))
    for p in range(3):
      values = np.asarray(seen[p], np.float64)
      assert int(state.count[p]) == len(values)
      if len(values):
        np.testing.assert_allclose(state.mean[p], values.mean(), rtol=1e-6)
        np.testing.assert_allclose(np.sqrt(state.m2[p] / len(values)), values.std(), rtol=2e-3, atol=1e-3)
  assert int(state.count[3]) == 0 and float(state.mean[3]) == 0 and float(state.m2[3]) == 0
  # One big batch gives the same statistics as the six small ones.
  all_prompts = np.concatenate([[p] * len(v) for p, v in seen.items()]).astype(int)
  all_rewards = np.concatenate([v for v in seen.values()])
  once = stats.update(stats.init(num_prompts), all_prompts, jnp.asarray(all_rewards, jnp.float32))
  np.testing.assert_allclose(once.mean, state.mean, rtol=1e-6)
  np.testing.assert_allclose(once.m2, state.m2, rtol=2e-3, atol=1e-2)


@pytest.mark.slow
def test_ppo_advantages_formula_and_clip():
  stats = reward_stats()
  prompts = jnp.array([0, 0, 0, 1, 1, 1, 1, 1])
  rewards = jnp.array([1.0, 2.0, 6.0, 0.0, 0.0, 0.0, 0.0, 100.0])
  state = stats.update(stats.init(2), prompts, rewards)
  r = np.asarray(rewards, np.float64)
  expected = np.empty(8)
  for p in (0, 1):
    group = r[np.asarray(prompts) == p]
    expected[np.asarray(prompts) == p] = (group - group.mean()) / (group.std() + 1e-6)
  np.testing.assert_allclose(ppo_advantages(state, prompts, rewards, clip=100.0), expected, rtol=1e-5)
  clipped = ppo_advantages(state, prompts, rewards)  # clip = 5: (100 - 20) / 40 = 2 stays, nothing else moves
  np.testing.assert_allclose(clipped, np.clip(expected, -5, 5), rtol=1e-5)
  tight = ppo_advantages(state, prompts, rewards, clip=1.0)
  np.testing.assert_allclose(tight, np.clip(expected, -1, 1), rtol=1e-5)
  assert np.max(np.abs(expected)) > 1  # so the clip above did something
  # A prompt seen once has advantage 0; an unseen prompt's advantage is clipped, not infinite.
  single = stats.update(stats.init(2), jnp.array([0]), jnp.array([3.0]))
  np.testing.assert_allclose(ppo_advantages(single, jnp.array([0, 1]), jnp.array([3.0, 2.0])), [0.0, 5.0])


# LOOP advantages.


@pytest.mark.slow
def test_loop_advantages_against_the_definition():
  rng = np.random.default_rng(1)
  rewards = rng.normal(size=(3, 4)) * 3 + 10
  expected = np.array([[r[i] - np.mean(np.delete(r, i)) for i in range(4)] for r in rewards])
  np.testing.assert_allclose(loop_advantages(rewards), expected, rtol=1e-5, atol=1e-5)
  flat = loop_advantages(rewards.reshape(-1), samples_per_condition=4)
  np.testing.assert_allclose(flat, expected.reshape(-1), rtol=1e-5, atol=1e-5)
  normalized = loop_advantages(rewards, normalize=True)
  np.testing.assert_allclose(normalized, expected / (rewards.std(1, keepdims=True) + 1e-6), rtol=1e-4)
  # A group of equal rewards gets zero advantages, not NaN, also when normalised.
  np.testing.assert_array_equal(loop_advantages(jnp.full((1, 3), 2.0), normalize=True), 0.0)
  # jit and vmap over prompts equal the batched call.
  np.testing.assert_allclose(jax.jit(loop_advantages)(rewards), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.vmap(lambda r: loop_advantages(r[None])[0])(jnp.asarray(rewards)),
                             expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=15)
@given(st.integers(1, 4), st.integers(2, 5), st.integers(0, 2**31 - 1), st.floats(-1e3, 1e3))
@pytest.mark.slow
def test_loop_advantages_properties(num_prompts, k, seed, offset):
  rewards = offset + np.random.default_rng(seed).normal(size=(num_prompts, k)).astype(np.float32)
  adv = np.asarray(loop_advantages(rewards), np.float64)
  # Each group's advantages sum to 0, equal K / (K - 1) (r - group mean), and ignore a shared offset.
  # Tolerance: float32 near |offset| <= 1e3 has an ulp of 6.1e-5; the group mean and the K <= 5
  # differences lose a few ulps each, times K / (K - 1) <= 2: under 1e-3.
  np.testing.assert_allclose(adv.sum(1), 0.0, atol=1e-3)
  centred = rewards - rewards.mean(1, keepdims=True)
  np.testing.assert_allclose(adv, k / (k - 1) * centred, atol=1e-3)
  flat = loop_advantages(rewards.reshape(-1), samples_per_condition=k)
  np.testing.assert_allclose(flat, adv.reshape(-1).astype(np.float32), rtol=1e-6, atol=1e-6)


# Unbiasedness of the leave-one-out score-function gradient on a Gaussian policy x ~ N(theta, I)
# in 2 dimensions, with K = 2 samples per prompt and reward r(x) = 20 + a.x - |x|^2 / 2. Exact:
# E[r] = 20 + a.theta - (|theta|^2 + 2) / 2, so grad = a - theta. The log-prob of one "trajectory" is
# split over S = 2 steps, one per coordinate, to exercise the [S, B] layout.
THETA = jnp.array([0.3, -0.7])
A_VEC = jnp.array([1.0, 0.5])
EXACT = np.asarray(A_VEC - THETA, np.float64)
NUM_KEYS, K = 20000, 2


def reward(x):
  return 20.0 + x @ A_VEC - 0.5 * jnp.sum(jnp.square(x), -1)


def estimates(advantage_fn):
  def one(key):
    x = THETA + jax.random.normal(key, (K, 2))
    adv = advantage_fn(reward(x))

    def loss(theta):
      log_probs = (-0.5 * jnp.square(x - theta)).T  # [S = 2, B = K], up to constants
      return reinforce_loss(log_probs, adv)
    return -jax.grad(loss)(THETA)
  keys = jax.random.split(jax.random.key(0), NUM_KEYS)
  return np.asarray(jax.jit(jax.vmap(one))(keys), np.float64)


@pytest.mark.slow
def test_leave_one_out_gradient_is_unbiased():
  loo = estimates(lambda r: loop_advantages(r, samples_per_condition=K))
  stderr = loo.std(0, ddof=1) / np.sqrt(NUM_KEYS)
  np.testing.assert_array_less(np.abs(loo.mean(0) - EXACT), 4 * stderr)
  # The test can tell a biased baseline: the group mean includes the sample itself and shrinks the
  # gradient by (K - 1) / K = 1/2.
  with_self = estimates(lambda r: r - r.mean())
  assert np.all(np.abs(with_self.mean(0) - EXACT) > 8 * stderr)
  np.testing.assert_allclose(with_self.mean(0), EXACT / 2, atol=4 * stderr.max())
  # And the baseline pays: no baseline is unbiased too but has a much larger variance.
  plain = estimates(lambda r: r)
  plain_stderr = plain.std(0, ddof=1) / np.sqrt(NUM_KEYS)
  np.testing.assert_array_less(np.abs(plain.mean(0) - EXACT), 4 * plain_stderr)
  assert np.all(plain.var(0) > 4 * loo.var(0))


# PPO.


def test_ppo_loss_values_and_diagnostics():
  log_ratio = jnp.array([[0.0, np.log(1.5)], [np.log(0.5), np.log(1.1)]])
  old = jnp.array([[-1.0, -2.0], [-3.0, -4.0]])
  adv = jnp.array([2.0, -1.0])
  out = ppo_loss(old + log_ratio, old, adv, clip_range=0.2)
  assert isinstance(out, PPOLoss)
  ratio = np.exp(np.asarray(log_ratio, np.float64))
  a = np.array([2.0, -1.0])[None, :]
  surrogate = np.minimum(ratio * a, np.clip(ratio, 0.8, 1.2) * a)
  np.testing.assert_allclose(out.loss, -surrogate.mean(), rtol=1e-5)
  np.testing.assert_allclose(out.approx_kl, np.mean(0.5 * np.asarray(log_ratio) ** 2), rtol=1e-5)
  np.testing.assert_allclose(out.clip_fraction, 0.5)
  # jit equals eager.
  jitted = jax.jit(lambda lp, o, a: ppo_loss(lp, o, a, clip_range=0.2))(old + log_ratio, old, adv)
  for x, y in zip(jitted, out):
    np.testing.assert_allclose(x, y, rtol=1e-6)


@pytest.mark.slow
def test_ppo_clipping_gradients():
  e = 0.2
  # Columns: ratio 1.5 with A > 0 (clipped: no push further up), ratio 0.5 with A < 0 (clipped: no
  # push further down), ratio 1.5 with A < 0 (unclipped: pulled down), ratio 0.5 with A > 0
  # (unclipped: pushed up), ratio 1.1 with A > 0 (inside the range).
  ratio = np.array([1.5, 0.5, 1.5, 0.5, 1.1])
  adv = jnp.array([1.0, -1.0, -2.0, 3.0, 0.5])
  old = jnp.zeros((1, 5))
  grad = jax.grad(lambda lp: ppo_loss(lp, old, adv, clip_range=e).loss)(jnp.log(ratio)[None, :])
  # d loss / d log rho = -rho A / (S B) where the unclipped term is the active one, 0 elsewhere.
  expected = -ratio * np.asarray(adv) / 5 * np.array([0, 0, 1, 1, 1])
  np.testing.assert_allclose(grad[0], expected, rtol=1e-5, atol=1e-12)
  assert np.all(grad[0, :2] == 0)
  # No gradient flows into the old log-probs or the advantages.
  g_old, g_adv = jax.grad(lambda o, a: ppo_loss(jnp.log(ratio)[None, :], o, a, clip_range=e).loss,
                          argnums=(0, 1))(old, adv)
  np.testing.assert_array_equal(g_old, 0.0)
  np.testing.assert_array_equal(g_adv, 0.0)


@pytest.mark.slow
def test_on_policy_ppo_gradient_is_reinforce_per_step():
  # At rho = 1 (the first minibatch of a round) PPO's gradient is REINFORCE's divided by S: LOOP's
  # first step is REINFORCE with the leave-one-out baseline.
  rng = np.random.default_rng(2)
  lp = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  adv = loop_advantages(jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)).reshape(-1)
  g_ppo = jax.grad(lambda l: ppo_loss(l, lp, adv, clip_range=1e-4).loss)(lp)
  g_reinforce = jax.grad(lambda l: reinforce_loss(l, adv))(lp)
  np.testing.assert_allclose(g_ppo, g_reinforce / 3, rtol=1e-5, atol=1e-7)


def test_extreme_log_ratios_stay_finite():
  old = jnp.zeros((2, 2))
  lp = jnp.array([[1000.0, -1000.0], [200.0, 0.0]])
  for adv in (jnp.array([1.0, -1.0]), jnp.array([-1.0, 1.0])):
    out, grad = jax.value_and_grad(lambda l: ppo_loss(l, old, adv, clip_range=0.2).loss)(lp)
    assert np.isfinite(out) and np.all(np.isfinite(grad))
    diag = ppo_loss(lp, old, adv, clip_range=0.2)
    assert np.isfinite(diag.approx_kl) and float(diag.clip_fraction) == 0.75


def test_reinforce_loss_closed_form_and_stopped_advantages():
  lp = jnp.array([[-1.0, -2.0, 0.5], [0.0, -1.0, 1.5]])
  adv = jnp.array([1.0, -2.0, 0.5])
  np.testing.assert_allclose(reinforce_loss(lp, adv), -np.mean(np.array([-1.0, -3.0, 2.0]) * [1.0, -2.0, 0.5]))
  np.testing.assert_array_equal(jax.grad(reinforce_loss, argnums=1)(lp, adv), 0.0)
  np.testing.assert_allclose(jax.grad(reinforce_loss)(lp, adv), -np.broadcast_to(adv, (2, 3)) / 3)


def test_bad_arguments():
  stats = reward_stats()
  state = stats.init(2)
  with pytest.raises(ValueError, match="^num_prompts:"):
    stats.init(0)
  with pytest.raises(ValueError, match="^prompts:"):
    stats.update(state, jnp.array([0, 2]), jnp.array([1.0, 2.0]))
  with pytest.raises(ValueError, match="^prompts:"):
    stats.update(state, jnp.array([0.0, 1.0]), jnp.array([1.0, 2.0]))
  with pytest.raises(ValueError, match="^rewards:"):
    stats.update(state, jnp.array([0, 1]), jnp.array([1.0, jnp.nan]))
  with pytest.raises(ValueError, match="^rewards:"):
    stats.update(state, jnp.array([0, 1]), jnp.array([1.0]))
  with pytest.raises(ValueError, match="^state:"):
    stats.update((1, 2, 3), jnp.array([0]), jnp.array([1.0]))
  with pytest.raises(ValueError, match="^clip:"):
    ppo_advantages(state, jnp.array([0]), jnp.array([1.0]), clip=0.0)
  with pytest.raises(ValueError, match="^samples_per_condition:"):
    loop_advantages(jnp.ones(6))
  with pytest.raises(ValueError, match="^samples_per_condition:"):
    loop_advantages(jnp.ones(6), samples_per_condition=1)
  with pytest.raises(ValueError, match="^samples_per_condition:"):
    loop_advantages(jnp.ones((2, 3)), samples_per_condition=2)
  with pytest.raises(ValueError, match="^rewards:"):
    loop_advantages(jnp.ones(7), samples_per_condition=2)
  with pytest.raises(ValueError, match="^rewards:.*K >= 2"):
    loop_advantages(jnp.ones((3, 1)))
  with pytest.raises(ValueError, match="^rewards:"):
    loop_advantages(jnp.ones((2, 2, 2)))
  with pytest.raises(ValueError, match="^clip_range:"):
    ppo_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(3), clip_range=0.0)
  with pytest.raises(ValueError, match="^old_log_probs:"):
    ppo_loss(jnp.zeros((2, 3)), jnp.zeros((3, 2)), jnp.zeros(3), clip_range=0.1)
  with pytest.raises(ValueError, match="^advantages:"):
    ppo_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros(2), clip_range=0.1)
  with pytest.raises(ValueError, match="^log_probs:"):
    reinforce_loss(jnp.zeros(3), jnp.zeros(3))
  with pytest.raises(ValueError, match="^advantages:"):
    reinforce_loss(jnp.zeros((2, 3)), jnp.array([0.0, jnp.inf, 0.0]))
  assert isinstance(state, RewardStatsState)
