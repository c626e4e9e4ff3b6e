"""Diffusion policy-gradient losses: per-prompt reward statistics against numpy, LOOP advantages
against their definition, unbiasedness of the leave-one-out score-function gradient by Monte Carlo
on a tiny Gaussian policy (and the bias of a baseline that includes the sample, which the test
must detect), PPO clipping gradients, extreme ratios, jit, and input checks. GRPO advantages
against Flow-GRPO's tracker and LOOP's identity; DDPO's per-prompt tracker against a plain-Python
copy of ddpo-pytorch's; DDPM's loss with conditions of any structure."""

from collections import deque

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from saferl_jax.diffusion.losses import (PPOLoss, PromptTrackerState, RewardStatsState, TrackedAdvantages,
                                         epsilon_loss, grpo_advantages, loop_advantages, ppo_advantages,
                                         ppo_loss, prompt_tracker, reinforce_loss, reward_stats)

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
  # The clip range may be traced: vmapped over e, each row equals the call with that float.
  swept = jax.vmap(lambda e: ppo_loss(old + log_ratio, old, adv, clip_range=e))(jnp.array([0.2, 0.6]))
  for i, e in enumerate((0.2, 0.6)):
    for x, y in zip(swept, ppo_loss(old + log_ratio, old, adv, clip_range=e)):
      np.testing.assert_allclose(x[i], y, rtol=1e-6)
  assert swept.clip_fraction[1] < swept.clip_fraction[0]  # 1.5 and 0.5 lie inside 1 +- 0.6


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


# GRPO advantages.

F32_EPS = float(np.finfo(np.float32).eps)


def flow_grpo_advantages(prompts, rewards, *, global_std, eps):
  """Flow-GRPO's PerPromptStatTracker.update(type='grpo') (flow_grpo/stat_tracking.py), cleared
  every round as its training script does, in float64."""
  prompts, rewards = np.asarray(prompts), np.asarray(rewards, np.float64)
  advantages = np.empty_like(rewards)
  for prompt in np.unique(prompts):
    group = rewards[prompts == prompt]
    std = (np.std(rewards) if global_std else np.std(group)) + eps
    advantages[prompts == prompt] = (group - np.mean(group)) / std
  return advantages


def test_grpo_advantages_against_flow_grpo():
  rng = np.random.default_rng(3)
  num_prompts, k = 4, 3
  # Prompts on different scales, so the group and the global std differ.
  rewards = (rng.normal(size=(num_prompts, k)) * np.array([[0.1], [1.0], [3.0], [10.0]]) + 5).astype(np.float32)
  prompts = np.repeat(np.arange(num_prompts), k)
  for global_std in (False, True):
    for eps in (1e-4, 1e-6):  # Flow-GRPO's, and the default (DDPO's and LOOP's)
      expected = flow_grpo_advantages(prompts, rewards.reshape(-1), global_std=global_std, eps=eps)
      flat = grpo_advantages(rewards.reshape(-1), samples_per_condition=k, global_std=global_std, eps=eps)
      grouped = grpo_advantages(rewards, global_std=global_std, eps=eps)
      # float32 inputs: the shifted sums of K <= 12 terms lose at most 12 ulps of max |r - r_0|,
      # which is at most 2 sqrt(12) stds of the statistics used: 12 * 7 ulps of |A| + 1.
      tolerance = 12 * 7 * F32_EPS * (1 + np.abs(expected))
      np.testing.assert_array_less(np.abs(np.asarray(flat, np.float64) - expected), tolerance)
      np.testing.assert_array_equal(grouped.reshape(-1), flat)
  # The global std shrinks the low-variance prompt's advantages and grows the high-variance one's.
  local, pooled = grpo_advantages(rewards), grpo_advantages(rewards, global_std=True)
  assert np.abs(pooled[0]).max() < 0.1 * np.abs(local[0]).max()
  assert np.abs(pooled[3]).max() > 1.5 * np.abs(local[3]).max()


def test_loop_normalised_is_k_over_k_minus_1_times_grpo():
  rng = np.random.default_rng(4)
  for k in (2, 5):
    for offset in (0.0, 1e3, -1e5):
      rewards = (offset + rng.normal(size=(4, k))).astype(np.float32)
      loop = np.asarray(loop_advantages(rewards, normalize=True), np.float64)
      grpo = np.asarray(grpo_advantages(rewards), np.float64)
      # Same std (ddof = 0) and eps (1e-6): equal up to float32 rounding. Both work on deviations
      # from the group's first reward (exact by Sterbenz's lemma at these offsets, else half an ulp
      # of each), whose sums of K terms lose K ulps of max |d| <= 2 sqrt(K) std each: about
      # 4 K^1.5 ulps of (1 + |A|), twice over.
      tolerance = 8 * k ** 1.5 * F32_EPS * (1 + np.abs(grpo))
      np.testing.assert_array_less(np.abs(loop - k / (k - 1) * grpo), tolerance)
      assert np.abs(grpo).max() > 0.5  # not vacuous


@pytest.mark.slow
def test_grpo_constant_groups_extremes_jit_and_vmap():
  # Constant groups give exactly 0 (the mean of 0.1 three times is not 0.1 in float32; the shifted
  # statistics never form it), also when the whole batch is constant and the std is global.
  rewards = jnp.array([0.1, 0.1, 0.1, 1000.1, 1000.1, 1000.1, -3e7, -3e7, -3e7])
  for global_std in (False, True):
    np.testing.assert_array_equal(grpo_advantages(rewards, samples_per_condition=3, global_std=global_std), 0.0)
  np.testing.assert_array_equal(loop_advantages(rewards, samples_per_condition=3, normalize=True), 0.0)
  # Advantages do not depend on the rewards' scale (up to eps / std): rewards near 1e30 (whose
  # squares overflow float32) and 1e-30 (far below eps) stay finite.
  base = jax.random.normal(jax.random.key(0), (6, 4))
  for global_std in (False, True):
    unit = grpo_advantages(base, global_std=global_std)
    huge = grpo_advantages(1e30 * base, global_std=global_std)
    assert np.all(np.isfinite(huge))
    # 1e30 * base rounds each entry by half an ulp; the stats lose about K ulps more.
    np.testing.assert_allclose(huge, unit, rtol=0, atol=64 * F32_EPS * float(1 + jnp.abs(unit).max()))
    tiny = grpo_advantages(1e-30 * base, global_std=global_std)
    assert np.all(np.isfinite(tiny)) and float(jnp.abs(tiny).max()) < 1e-20
  # jit equals eager; vmap over batches (seeds) equals a loop, with the global std per batch.
  batches = jax.random.normal(jax.random.key(1), (3, 8))
  for global_std in (False, True):
    fn = lambda r: grpo_advantages(r, samples_per_condition=2, global_std=global_std)
    looped = np.stack([fn(b) for b in batches])
    np.testing.assert_allclose(jax.jit(jax.vmap(fn))(batches), looped, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(fn)(batches[0]), looped[0], rtol=1e-6, atol=1e-6)


def test_grpo_bad_arguments():
  with pytest.raises(ValueError, match="^samples_per_condition:"):
    grpo_advantages(jnp.ones(6))
  with pytest.raises(ValueError, match="^samples_per_condition:"):
    grpo_advantages(jnp.ones(6), samples_per_condition=1)
  with pytest.raises(ValueError, match="^rewards:"):
    grpo_advantages(jnp.ones(5), samples_per_condition=2)
  with pytest.raises(ValueError, match="^rewards:"):
    grpo_advantages(jnp.array([[1.0, jnp.nan]]))
  with pytest.raises(ValueError, match="^rewards:.*K >= 2"):
    grpo_advantages(jnp.ones((4, 1)))
  with pytest.raises(ValueError, match="^eps:"):
    grpo_advantages(jnp.ones((2, 2)), eps=0.0)
  with pytest.raises(ValueError, match="^eps:"):
    grpo_advantages(jnp.ones((2, 2)), eps=float("nan"))
  with pytest.raises(TypeError, match="^global_std:"):
    grpo_advantages(jnp.ones((2, 2)), global_std="yes")


# DDPO's per-prompt tracker.


class DDPOTracker:
  """ddpo-pytorch's PerPromptStatTracker (ddpo_pytorch/stat_tracking.py) in float64, with prompt
  id -1 never stored and always standardised by the batch."""

  def __init__(self, buffer_size, min_count):
    self.buffer_size, self.min_count, self.stats = buffer_size, min_count, {}

  def update(self, prompts, rewards):
    """(advantages, max |v - v_0| / std of the statistics each sample used)."""
    prompts, rewards = np.asarray(prompts), np.asarray(rewards, np.float64)
    advantages, spread = np.empty_like(rewards), np.empty_like(rewards)
    for prompt in np.unique(prompts):
      prompt_rewards = rewards[prompts == prompt]
      values = rewards
      if prompt != -1:
        if prompt not in self.stats:
          self.stats[prompt] = deque(maxlen=self.buffer_size)
        self.stats[prompt].extend(prompt_rewards)
        if len(self.stats[prompt]) >= self.min_count:
          values = np.asarray(self.stats[prompt])
      mean, std = np.mean(values), np.std(values) + 1e-6
      advantages[prompts == prompt] = (prompt_rewards - mean) / std
      spread[prompts == prompt] = np.abs(values - values[0]).max() / std
    return advantages, spread


def _tracker_batches(seed, num_batches=8, batch=7, num_prompts=5):
  rng = np.random.default_rng(seed)
  ids = rng.integers(-1, num_prompts, size=(num_batches, batch))
  ids[2] = [2, 2, 2, 2, 2, 2, 0]  # prompt 2 six times in one batch: only its last 4 are kept
  ids[5] = -1  # a batch without ids
  rewards = (rng.normal(size=(num_batches, batch)) * (1 + ids % 3) + ids).astype(np.float32)
  return ids.astype(np.int32), rewards


@pytest.mark.slow
def test_prompt_tracker_against_ddpo():
  buffer_size, min_count, num_prompts = 4, 3, 5
  tracker = prompt_tracker(num_prompts, buffer_size=buffer_size, min_count=min_count)
  update = jax.jit(tracker.update)
  reference = DDPOTracker(buffer_size, min_count)
  eager, jitted = tracker.init(), tracker.init()
  ids, rewards = _tracker_batches(0)
  for batch_ids, batch_rewards in zip(ids, rewards):
    expected, spread = reference.update(batch_ids, batch_rewards)
    out = tracker.update(eager, batch_ids, batch_rewards)
    assert isinstance(out, TrackedAdvantages) and isinstance(out.state, PromptTrackerState)
    # float32 statistics of n <= 7 values shifted by the first: sums lose n ulps of max |v - v_0|,
    # which `spread` gives in stds.
    tolerance = 4 * 7 * F32_EPS * (1 + spread) * (1 + np.abs(expected))
    np.testing.assert_array_less(np.abs(np.asarray(out.advantages, np.float64) - expected), tolerance)
    again = update(jitted, jnp.asarray(batch_ids), jnp.asarray(batch_rewards))
    np.testing.assert_allclose(again.advantages, out.advantages, rtol=1e-6, atol=1e-6)
    eager, jitted = out.state, again.state
    # The state is the reference's deques: count, and the buffer's contents as a multiset.
    for prompt in range(num_prompts):
      kept = list(reference.stats.get(prompt, []))
      count = int(eager.count[prompt])
      assert min(count, buffer_size) == len(kept)
      np.testing.assert_allclose(np.sort(np.asarray(eager.rewards[prompt, :len(kept)])), np.sort(kept))
  # Prompt 2's six rewards of batch 2 went in order: its buffer holds the last four of them.
  assert int(eager.count[2]) >= 6
  # The fallback applied (ids -1 and young prompts) and the buffers too: both branches were tested.
  assert reference.stats and any(len(d) >= min_count for d in reference.stats.values())


@pytest.mark.slow
def test_prompt_tracker_ring_buffer_fallback_and_vmap():
  tracker = prompt_tracker(3, buffer_size=4, min_count=4)
  rewards = jnp.arange(1.0, 7.0)
  out = tracker.update(tracker.init(), jnp.array([1, 1, 1, 1, 1, 1]), rewards)
  # The last four of six, in ring order (slots 0, 1 hold rewards 5, 6; slots 2, 3 rewards 3, 4).
  np.testing.assert_array_equal(out.state.rewards[1], [5.0, 6.0, 3.0, 4.0])
  np.testing.assert_array_equal(out.state.count, [0, 6, 0])
  np.testing.assert_array_equal(np.asarray(out.state.rewards)[[0, 2]], 0.0)
  window = np.array([3.0, 4.0, 5.0, 6.0])
  np.testing.assert_allclose(out.advantages, (np.arange(1, 7) - window.mean()) / (window.std() + 1e-6), rtol=1e-6)
  # Below min_count: the batch's statistics (mean and std of every reward, the id-less one included).
  out = tracker.update(out.state, jnp.array([0, 1, -1]), jnp.array([2.0, 4.0, 9.0]))
  batch = np.array([2.0, 4.0, 9.0])
  expected = (batch - batch.mean()) / (batch.std() + 1e-6)
  window = np.array([5.0, 6.0, 4.0, 4.0])  # prompt 1 wrote its 7th reward into slot 2
  expected[1] = (4.0 - window.mean()) / (window.std() + 1e-6)
  np.testing.assert_allclose(out.advantages, expected, rtol=1e-6)
  # Constant rewards give exactly 0 (the shifted statistics), with no NaN.
  constant = tracker.update(tracker.init(), jnp.array([0, 0, 0, 0, 2, -1]), jnp.full(6, 0.1))
  np.testing.assert_array_equal(constant.advantages, 0.0)
  # Rewards near 1e30 (squares overflow float32) and batch size 1 stay finite.
  huge = tracker.update(tracker.init(), jnp.array([0, 0, 0, 0, 2, -1]), 1e30 * jnp.arange(6.0))
  assert np.all(np.isfinite(huge.advantages)) and np.abs(huge.advantages).max() > 0.5
  np.testing.assert_array_equal(tracker.update(tracker.init(), jnp.array([2]), jnp.array([5.0])).advantages, 0.0)
  # vmap over seeds (stacked states and batches) equals a loop.
  rng = np.random.default_rng(1)
  ids = rng.integers(-1, 3, size=(3, 2, 6)).astype(np.int32)  # [round, seed, B]
  values = rng.normal(size=(3, 2, 6)).astype(np.float32)
  states = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), tracker.init())
  singles = [tracker.init(), tracker.init()]
  for r in range(3):
    batched = jax.vmap(tracker.update)(states, ids[r], values[r])
    for seed in range(2):
      one = tracker.update(singles[seed], ids[r, seed], values[r, seed])
      np.testing.assert_allclose(batched.advantages[seed], one.advantages, rtol=1e-6, atol=1e-6)
      np.testing.assert_array_equal(batched.state.count[seed], one.state.count)
      singles[seed] = one.state
    states = batched.state


def test_prompt_tracker_bad_arguments():
  with pytest.raises(ValueError, match="^num_prompts:"):
    prompt_tracker(0, buffer_size=4, min_count=2)
  with pytest.raises(ValueError, match="^buffer_size:"):
    prompt_tracker(3, buffer_size=0, min_count=0)
  with pytest.raises(ValueError, match="^min_count:"):
    prompt_tracker(3, buffer_size=4, min_count=5)
  with pytest.raises(ValueError, match="^min_count:"):
    prompt_tracker(3, buffer_size=4, min_count=-1)
  with pytest.raises(TypeError, match="^buffer_size:"):
    prompt_tracker(3, buffer_size="4", min_count=2)
  tracker = prompt_tracker(3, buffer_size=4, min_count=2)
  state = tracker.init()
  with pytest.raises(ValueError, match="^prompt_ids:"):
    tracker.update(state, jnp.array([0, 3]), jnp.array([1.0, 2.0]))
  with pytest.raises(ValueError, match="^prompt_ids:"):
    tracker.update(state, jnp.array([0, -2]), jnp.array([1.0, 2.0]))
  with pytest.raises(ValueError, match="^prompt_ids:"):
    tracker.update(state, jnp.array([0.0, 1.0]), jnp.array([1.0, 2.0]))
  with pytest.raises(ValueError, match="^rewards:"):
    tracker.update(state, jnp.array([0, 1]), jnp.array([1.0, jnp.inf]))
  with pytest.raises(ValueError, match="^rewards:"):
    tracker.update(state, jnp.array([0, 1]), jnp.array([1.0]))
  with pytest.raises(ValueError, match="^state:"):
    tracker.update(prompt_tracker(2, buffer_size=4, min_count=2).init(), jnp.array([0]), jnp.array([1.0]))
  with pytest.raises(ValueError, match="^state:"):
    tracker.update((state.rewards, state.count), jnp.array([0]), jnp.array([1.0]))


# DDPM's loss with conditions of any structure.

ALPHAS = jnp.linspace(0.99, 0.01, 20)


def _spy():
  seen = {}

  def apply_fn(params, x, t, condition):
    seen.update(t=t, condition=condition)
    return params * x
  return seen, apply_fn


@pytest.mark.slow
def test_epsilon_loss_pytree_conditions():
  n, p = 2000, 0.25
  key = jax.random.key(2)
  x0 = jax.random.normal(jax.random.key(0), (n, 2))
  condition = {"u": jax.random.normal(jax.random.key(1), (n, 3)), "label": jnp.arange(n) % 7,
               "tokens": jnp.ones((n, 2, 4))}
  null = {"u": jnp.zeros(3), "label": 7, "tokens": -jnp.ones((2, 4))}
  seen, apply_fn = _spy()
  loss = epsilon_loss(apply_fn, 0.5, x0, condition, key=key, alphas_cumprod=ALPHAS, label_dropout=p,
                      null_condition=null)
  got = seen["condition"]
  dropped = np.asarray(got["label"] == 7)
  assert abs(dropped.mean() - p) < 4 * np.sqrt(p * (1 - p) / n)
  # A dropped example has every leaf of the null; the others keep theirs.
  np.testing.assert_array_equal(np.asarray(got["u"])[dropped], 0.0)
  np.testing.assert_array_equal(np.asarray(got["tokens"])[dropped], -1.0)
  np.testing.assert_array_equal(np.asarray(got["u"])[~dropped], np.asarray(condition["u"])[~dropped])
  np.testing.assert_array_equal(np.asarray(got["tokens"])[~dropped], 1.0)
  assert got["label"].dtype == jnp.int32 and got["u"].dtype == jnp.float32
  # The same key draws the same t, noise and dropout mask as with class ids: equal losses.
  seen_ids, apply_ids = _spy()
  ids_loss = epsilon_loss(apply_ids, 0.5, x0, condition["label"], key=key, alphas_cumprod=ALPHAS,
                          label_dropout=p, null_condition=7)
  assert float(ids_loss) == float(loss)
  np.testing.assert_array_equal(seen_ids["condition"] == 7, dropped)
  # jit equals eager, for a float array condition with its null vector.
  fn = lambda params, c: epsilon_loss(lambda q, x, t, c: q * x + c[:, :2], params, x0, c, key=key,
                                      alphas_cumprod=ALPHAS, label_dropout=p, null_condition=jnp.zeros(3))
  np.testing.assert_allclose(jax.jit(fn)(0.5, condition["u"]), fn(0.5, condition["u"]), rtol=1e-6)


@pytest.mark.slow
def test_epsilon_loss_condition_checks():
  zero = lambda params, x, t, c: jnp.zeros_like(x)
  x0 = jnp.zeros((4, 2))
  call = lambda condition, null: epsilon_loss(zero, None, x0, condition, key=jax.random.key(0),
                                              alphas_cumprod=ALPHAS, label_dropout=0.1, null_condition=null)
  call({"u": jnp.ones((4, 3))}, {"u": jnp.zeros(3)})  # valid
  with pytest.raises(ValueError, match="^null_condition:"):
    call({"u": jnp.ones((4, 3))}, {"v": jnp.zeros(3)})
  with pytest.raises(ValueError, match="^null_condition:"):
    call(jnp.ones((4, 3)), jnp.zeros(2))
  with pytest.raises(ValueError, match="^null_condition:"):
    call(jnp.ones((4, 3)), None)
  with pytest.raises(ValueError, match="^null_condition:"):
    call(jnp.arange(4), -1)
  with pytest.raises(ValueError, match="^condition:"):
    call(jnp.ones((3, 3)), jnp.zeros(3))
  with pytest.raises(ValueError, match="^condition:"):
    call({"u": jnp.ones((4, 3)), "label": jnp.arange(3)}, {"u": jnp.zeros(3), "label": 5})
  with pytest.raises(ValueError, match="^condition:"):
    call(jnp.array([[0.0], [jnp.nan], [1.0], [2.0]]), jnp.zeros(1))
  # Class ids with the int null: integers in [0, null].
  call(jnp.array([0, 1, 2, 3]), 3)
  with pytest.raises(ValueError, match="^condition:"):
    call(jnp.array([0, 1, 2, 4]), 3)
  with pytest.raises(ValueError, match="^condition:"):
    call(jnp.array([0.0, 1.0, 2.0, 3.0]), 3)
