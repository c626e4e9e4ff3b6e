"""Policy-gradient losses and advantages for reward fine-tuning of diffusion models, and DDPM's pretraining loss (floor 1).

Sampling is an S-step decision process whose actions are the denoising steps x_t -> x_t', with
per-step log-probabilities log p_theta(x_t' | x_t, c) [S, B] (`saferl_jax.diffusion.sampler`), and a
reward r(x_0, c) at the end. With advantages A [B]:

- REINFORCE (DDPO-SF): minimise -(1/B) sum_b A_b sum_t log p_theta(x^b_t' | x^b_t, c_b).
- PPO (DDPO-IS): A = (r - mean_c) / (std_c + 1e-6) with per-prompt statistics, either DDPO's
  ring buffer of each prompt's last rewards with its fall-back to the batch's statistics
  (`prompt_tracker`) or a running mean and variance that never forgets (`reward_stats`,
  `ppo_advantages`), clipped to [-5, 5]; with rho = exp(log p_theta - log p_old) per step,
  minimise mean_{t, b} max(-A rho, -A clip(rho, 1 - e, 1 + e)); several minibatch updates per
  sampling round.
- LOOP: K >= 2 samples per prompt, A_i = r_i - (1/(K-1)) sum_{j != i} r_j (`loop_advantages`),
  optionally divided by the group's std, fed to the same clipped objective (`ppo_loss`): REINFORCE's
  variance reduction inside PPO's clipping and importance sampling. There is no separate LOOP loss.
- GRPO (Flow-GRPO): A_i = (r_i - group mean) / (group or batch std + eps) (`grpo_advantages`),
  (K - 1) / K times LOOP's std-normalised advantage, with the same clipped objective.

Advantages are computed per batch of P prompts times K samples, the K samples of a prompt
contiguous (as the sampler returns them); `jax.vmap` batches them over seeds.

The clipped surrogate and the leave-one-out baseline are the shared ones of
`saferl_jax.policy_gradient`. What the clip range e means depends on how log-probabilities were
reduced over the d dimensions of x: with DDPO's per-dimension mean, e bounds the exact log-ratio at
about +-d e (DDPO: e = 1e-4 with d = 16384, about +-1.6); with the exact (summed) log-density, e
bounds the exact ratio, and PPO's usual 0.1 to 0.3 applies (see `saferl_jax.diffusion.step`).

Advantages and old log-probabilities are data: the losses stop their gradients.

References:
  Williams. Simple Statistical Gradient-Following Algorithms for Connectionist Reinforcement Learning. Machine Learning 1992.
  Schulman et al. Proximal Policy Optimization Algorithms. 2017. https://arxiv.org/abs/1707.06347
  [DDPO] Black, Janner, Du, Kostrikov, Levine. Training Diffusion Models with Reinforcement Learning. ICLR 2024. https://arxiv.org/abs/2305.13301
  [LOOP] Gupta et al. A Simple and Effective Reinforcement Learning Method for Text-to-Image Diffusion Models. 2025. https://arxiv.org/abs/2503.00897
  Chan, Golub, LeVeque. Updating Formulae and a Pairwise Algorithm for Computing Sample Variances. 1979 (the batched Welford merge).
  [DDPM] Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020. https://arxiv.org/abs/2006.11239
  [CFG] Ho, Salimans. Classifier-Free Diffusion Guidance. 2022. https://arxiv.org/abs/2207.12598
  [GRPO] Shao et al. DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models. 2024. https://arxiv.org/abs/2402.03300
  [Flow-GRPO] Liu et al. Flow-GRPO: Training Flow Matching Models via Online RL. 2025. https://arxiv.org/abs/2505.05470
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.diffusion import conditions
from saferl_jax.diffusion.conditions import Conditions
from saferl_jax.diffusion.schedules import NoiseSchedule, check_schedule
from saferl_jax.policy_gradient import clipped_surrogate, leave_one_out_baseline

# exp(60) ~ 1e26 is finite in float32; a larger log-ratio would overflow to inf, and the clipped branch's
# zero gradient times inf is NaN. Log-ratios above it are capped (their gradient is then 0).
_MAX_LOG_RATIO = 60.0
_STD_EPS = 1e-6


# Per-prompt running reward statistics (optax-style: pure init/update and an explicit state).


class RewardStatsState(NamedTuple):
  """Running reward statistics of P prompts (Welford).

  Attributes:
    count: int [P] rewards seen per prompt.
    mean: [P] their mean.
    m2: [P] the sum of squared deviations from the mean; the variance is m2 / count.
  """
  count: jax.Array
  mean: jax.Array
  m2: jax.Array


class RewardStats(NamedTuple):
  """Pure functions that keep per-prompt reward statistics, as optax keeps optimiser state.

  Attributes:
    init: init(num_prompts) -> RewardStatsState of zeros.
    update: update(state, prompts [B] int, rewards [B]) -> RewardStatsState with the batch added.
  """
  init: Callable[[int], RewardStatsState]
  update: Callable[[RewardStatsState, ArrayLike, ArrayLike], RewardStatsState]


def _check_prompts_rewards(prompts: ArrayLike, rewards: ArrayLike,
                           num_prompts: int) -> tuple[jax.Array, jax.Array]:
  prompts, rewards = checks.as_int("prompts", prompts), checks.as_float("rewards", rewards)
  if prompts.ndim != 1 or rewards.ndim != 1:
    raise ValueError(f"prompts/rewards: expected 1-d arrays [B], got shapes {tuple(prompts.shape)} "
                     f"and {tuple(rewards.shape)}")
  checks.check_same_length(prompts=prompts, rewards=rewards)
  checks.check_indices("prompts", prompts, num_prompts, what="prompt id")
  checks.check_finite("rewards", rewards)
  return prompts, rewards


def _check_state(state: RewardStatsState, name: str = "state") -> int:
  if not isinstance(state, RewardStatsState):
    raise ValueError(f"{name}: must be a RewardStatsState, got {type(state).__name__}")
  if jnp.ndim(state.mean) != 1 or jnp.shape(state.count) != jnp.shape(state.mean) \
      or jnp.shape(state.m2) != jnp.shape(state.mean):
    raise ValueError(f"{name}: count, mean and m2 must be 1-d arrays [P] of the same shape")
  checks.check_nonnegative(f"{name}.count", state.count)
  checks.check_finite(f"{name}.mean", state.mean)
  checks.check_nonnegative(f"{name}.m2", state.m2)
  return jnp.shape(state.mean)[0]


@jax.jit
def _update_kernel(state, prompts, rewards):
  num_prompts = state.mean.shape[0]
  segment_sum = lambda v: jax.ops.segment_sum(v, prompts, num_segments=num_prompts)
  count_b = segment_sum(jnp.ones_like(rewards))
  mean_b = segment_sum(rewards) / jnp.maximum(count_b, 1)
  m2_b = segment_sum(jnp.square(rewards - mean_b[prompts]))
  count_a = state.count.astype(rewards.dtype)
  count = count_a + count_b
  delta = mean_b - state.mean
  share_b = count_b / jnp.maximum(count, 1)
  mean = state.mean + delta * share_b
  m2 = state.m2 + m2_b + jnp.square(delta) * count_a * share_b
  return RewardStatsState(state.count + count_b.astype(state.count.dtype), mean, m2)


def reward_stats() -> RewardStats:
  """Per-prompt running mean and variance of rewards (DDPO's per-prompt stat tracking), as init/update.

  update merges a batch into each prompt's statistics exactly (Chan et al.'s pairwise form of
  Welford): with n_a, mean_a, M2_a before and n_b, mean_b, M2_b of the batch's rewards of that prompt,
  n = n_a + n_b, delta = mean_b - mean_a, mean = mean_a + delta n_b / n,
  M2 = M2_a + M2_b + delta^2 n_a n_b / n. The history is never forgotten (DDPO's code keeps the last
  16 to 32 rewards per prompt instead).

  Returns:
    A `RewardStats` (init, update).

  Example:
    >>> import jax.numpy as jnp
    >>> stats = reward_stats()
    >>> state = stats.init(2)
    >>> state = stats.update(state, jnp.array([0, 0, 1]), jnp.array([1.0, 3.0, 5.0]))
    >>> state.count.tolist(), state.mean.tolist(), state.m2.tolist()
    ([2, 1], [2.0, 5.0], [2.0, 0.0])
  """

  def init(num_prompts: int) -> RewardStatsState:
    if not isinstance(num_prompts, (int, np.integer)) or isinstance(num_prompts, bool) \
        or num_prompts < 1:
      raise ValueError(f"num_prompts: must be an int >= 1, got {num_prompts!r}")
    zeros = jnp.zeros((int(num_prompts),), jnp.result_type(float))
    return RewardStatsState(jnp.zeros((int(num_prompts),), jnp.int32), zeros, zeros)

  def update(state: RewardStatsState, prompts: ArrayLike, rewards: ArrayLike) -> RewardStatsState:
    num_prompts = _check_state(state)
    prompts, rewards = _check_prompts_rewards(prompts, rewards, num_prompts)
    return _update_kernel(state, prompts, rewards)

  return RewardStats(init, update)


def ppo_advantages(stats_state: RewardStatsState, prompts: ArrayLike, rewards: ArrayLike, *,
                   clip: float = 5.0) -> jax.Array:
  """DDPO's advantages: A_i = clip((r_i - mean_{c_i}) / (std_{c_i} + 1e-6), -clip, clip).

  std is the population standard deviation sqrt(M2 / count) of each prompt's rewards so far (as
  numpy's default, and DDPO's tracker). Update the statistics with this batch first, as DDPO does;
  a prompt seen once has std 0 and advantage 0.

  Args:
    stats_state: a `RewardStatsState` [P] (after `update` with this batch).
    prompts: int [B] prompt ids in [0, P).
    rewards: [B] rewards.
    clip: the advantage bound, > 0.

  Returns:
    [B] advantages.

  Example:
    >>> import jax.numpy as jnp
    >>> stats = reward_stats()
    >>> prompts, rewards = jnp.array([0, 0, 1, 1]), jnp.array([1.0, 3.0, 5.0, 5.0])
    >>> state = stats.update(stats.init(2), prompts, rewards)
    >>> [round(a, 4) for a in ppo_advantages(state, prompts, rewards).tolist()]
    [-1.0, 1.0, 0.0, 0.0]

  References:
    Black et al. Training Diffusion Models with Reinforcement Learning. ICLR 2024. https://arxiv.org/abs/2305.13301
  """
  num_prompts = _check_state(stats_state, "stats_state")
  prompts, rewards = _check_prompts_rewards(prompts, rewards, num_prompts)
  checks.check_nonnegative_option("clip", clip, strictly_positive=True)
  return _ppo_advantages_kernel(stats_state, prompts, rewards, clip)


@jax.jit
def _ppo_advantages_kernel(stats_state, prompts, rewards, clip):
  count = jnp.maximum(stats_state.count, 1).astype(rewards.dtype)
  std = jnp.sqrt(jnp.maximum(stats_state.m2, 0.0) / count)
  advantages = (rewards - stats_state.mean[prompts]) / (std[prompts] + _STD_EPS)
  return jnp.clip(advantages, -clip, clip)


def _reward_groups(rewards: ArrayLike, samples_per_condition: int | None) -> jax.Array:
  """Rewards [P, K], or [P * K] with the K samples of a prompt contiguous, checked, as groups [P, K]."""
  rewards = checks.as_float("rewards", rewards)
  checks.check_finite("rewards", rewards)
  k = samples_per_condition
  if k is not None and (not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 2):
    raise ValueError(f"samples_per_condition: must be an int >= 2 (a group of one has no baseline), "
                     f"got {k!r}")
  if rewards.ndim == 1:
    if k is None:
      raise ValueError("samples_per_condition: needed for 1-d rewards [P * K] (the group size K)")
    if rewards.shape[0] == 0 or rewards.shape[0] % k:
      raise ValueError(f"rewards: length {rewards.shape[0]} is not a positive multiple of "
                       f"samples_per_condition = {k}")
    return rewards.reshape(-1, k)
  if rewards.ndim == 2:
    if k is not None and rewards.shape[1] != k:
      raise ValueError(f"samples_per_condition: is {k} but rewards [P, K] has K = {rewards.shape[1]}")
    if rewards.shape[0] == 0:
      raise ValueError("rewards: expected at least one prompt, got shape (0, K)")
    if rewards.shape[1] < 2:
      raise ValueError(f"rewards: a group baseline needs K >= 2 samples per prompt, got "
                       f"K = {rewards.shape[1]}")
    return rewards
  raise ValueError(f"rewards: expected [P, K] or [P * K], got shape {tuple(rewards.shape)}")


def _shifted_moments(values: jax.Array, valid: jax.Array | None = None):
  """(shift, mean - shift, std) of `values` over the last axis (only where `valid`), keepdims.

  The std is the population one (ddof = 0, as numpy's default and DDPO's and Flow-GRPO's code).
  Values are shifted by their first entry (which must be valid) and divided by max |values - shift|
  before squaring: a constant group gives exactly (value, 0, 0), so its advantages are exactly 0,
  and rewards near 1e20 or above do not overflow float32 in the squares.
  """
  shift = values[..., :1]
  if valid is None:
    valid = jnp.ones(values.shape, bool)
  deviations = jnp.where(valid, values - shift, 0.0)
  count = jnp.maximum(jnp.sum(valid, axis=-1, keepdims=True), 1).astype(values.dtype)
  scale = jax.lax.stop_gradient(jnp.max(jnp.abs(deviations), axis=-1, keepdims=True))
  scale = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)
  scaled = deviations / scale
  mean = jnp.sum(scaled, axis=-1, keepdims=True) / count
  variance = jnp.sum(jnp.where(valid, jnp.square(scaled - mean), 0.0), axis=-1, keepdims=True) / count
  return shift, scale * mean, scale * jnp.sqrt(variance)


def loop_advantages(rewards: ArrayLike, *, samples_per_condition: int | None = None,
                    normalize: bool = False) -> jax.Array:
  """LOOP's advantages: A_i = r_i - (1/(K-1)) sum_{j != i} r_j within each prompt's group of K.

  The leave-one-out baseline does not depend on sample i, so the REINFORCE / PPO gradient stays
  unbiased; A_i = K / (K - 1) (r_i - mean of the group). With `normalize=True` A is divided by the
  group's population std (ddof = 0) + 1e-6, which rescales each prompt's gradient and is no longer
  exactly unbiased (the std depends on r_i); it is then K / (K - 1) times `grpo_advantages`.

  Args:
    rewards: [P, K] rewards, or [P * K] with the K samples of a prompt contiguous (as `sample`
      returns them) and `samples_per_condition=K`.
    samples_per_condition: K >= 2; needed for 1-d rewards, checked against [P, K] ones.
    normalize: divide by the group std.

  Returns:
    Advantages with the shape of rewards.

  Example:
    >>> import jax.numpy as jnp
    >>> loop_advantages(jnp.array([1.0, 2.0, 3.0, 5.0, 5.0, 8.0]), samples_per_condition=3).tolist()
    [-1.5, 0.0, 1.5, -1.5, -1.5, 3.0]

  References:
    Gupta et al. A Simple and Effective Reinforcement Learning Method for Text-to-Image Diffusion Models. 2025. https://arxiv.org/abs/2503.00897
  """
  groups = _reward_groups(rewards, samples_per_condition)
  if not isinstance(normalize, (bool, np.bool_)):
    raise TypeError(f"normalize: must be a bool, got {type(normalize).__name__} {normalize!r}")
  return _loop_kernel(groups, bool(normalize)).reshape(jnp.shape(rewards))


@functools.partial(jax.jit, static_argnames=("normalize",))
def _loop_kernel(groups, normalize):
  # A is shift-invariant; shifting by the group's first reward makes a constant group exactly 0
  # (its mean, formed in float, need not equal its value) and keeps digits of rewards near 1e3.
  deviations = groups - groups[:, :1]
  advantages = deviations - leave_one_out_baseline(deviations, axis=1)
  if normalize:
    advantages = advantages / (_shifted_moments(groups)[2] + _STD_EPS)
  return advantages


def grpo_advantages(rewards: ArrayLike, *, samples_per_condition: int | None = None,
                    global_std: bool = False, eps: float = _STD_EPS) -> jax.Array:
  """GRPO's advantages: A_i = (r_i - mean of its group) / (std + eps), the std of the group or of the batch.

  With K samples per prompt, mean and std are over the K rewards of sample i's prompt; with
  `global_std=True` the std is over all P * K rewards of the batch (the mean stays the group's),
  as Flow-GRPO's default configuration does, so that prompts whose K rewards barely differ are not
  blown up to unit scale. Both stds are population stds (ddof = 0), as in Flow-GRPO's
  `PerPromptStatTracker` (numpy's np.std). Flow-GRPO adds eps = 1e-4; the default 1e-6 here is
  DDPO's and LOOP's, so that `loop_advantages(r, normalize=True) = K / (K - 1) grpo_advantages(r)`
  exactly. A constant group gets 0. Dr. GRPO drops the division altogether: that is
  (K - 1) / K `loop_advantages(r)`, r_i minus the group mean.

  Args:
    rewards: [P, K] rewards, or [P * K] with the K samples of a prompt contiguous (as `sample`
      returns them) and `samples_per_condition=K`.
    samples_per_condition: K >= 2; needed for 1-d rewards, checked against [P, K] ones.
    global_std: divide by the std of the whole batch instead of the group's.
    eps: > 0, added to the std.

  Returns:
    Advantages with the shape of rewards.

  Example:
    >>> import jax.numpy as jnp
    >>> rewards = jnp.array([1.0, 3.0, 5.0, 5.0])  # two prompts, K = 2
    >>> [round(a, 4) for a in grpo_advantages(rewards, samples_per_condition=2).tolist()]
    [-1.0, 1.0, 0.0, 0.0]
    >>> global_std = grpo_advantages(rewards, samples_per_condition=2, global_std=True)
    >>> [round(a, 4) for a in global_std.tolist()]  # divided by the batch's std, 1.658
    [-0.603, 0.603, 0.0, 0.0]

  References:
    [GRPO] Shao et al. DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models. 2024. https://arxiv.org/abs/2402.03300
    [Flow-GRPO] Liu et al. Flow-GRPO: Training Flow Matching Models via Online RL. 2025. https://arxiv.org/abs/2505.05470
    [Dr. GRPO] Liu et al. Understanding R1-Zero-Like Training: A Critical Perspective. 2025. https://arxiv.org/abs/2503.20783
  """
  groups = _reward_groups(rewards, samples_per_condition)
  if not isinstance(global_std, (bool, np.bool_)):
    raise TypeError(f"global_std: must be a bool, got {type(global_std).__name__} {global_std!r}")
  checks.check_real("eps", eps, low=0.0, open_low=True)
  return _grpo_kernel(groups, jnp.asarray(eps, groups.dtype), bool(global_std)).reshape(
      jnp.shape(rewards))


@functools.partial(jax.jit, static_argnames=("global_std",))
def _grpo_kernel(groups, eps, global_std):
  shift, mean, std = _shifted_moments(groups)
  if global_std:
    std = _shifted_moments(groups.reshape(1, -1))[2]
  return ((groups - shift) - mean) / (std + eps)


# DDPO's per-prompt tracker: a ring buffer of each prompt's last rewards (optax-style).


class PromptTrackerState(NamedTuple):
  """The last `buffer_size` rewards of each of P prompts.

  Attributes:
    rewards: [P, buffer_size] ring buffers; prompt p's reward number n (from 0) sits in slot
      n % buffer_size, so the buffer holds slots [0, min(count, buffer_size)).
    count: int32 [P] rewards ever added per prompt.
  """
  rewards: jax.Array
  count: jax.Array


class TrackedAdvantages(NamedTuple):
  """What `PromptTracker.update` returns: this batch's advantages and the tracker after it.

  Attributes:
    advantages: [B] advantages of the batch's samples.
    state: the `PromptTrackerState` with the batch added.
  """
  advantages: jax.Array
  state: PromptTrackerState


class PromptTracker(NamedTuple):
  """DDPO's per-prompt reward statistics as pure functions, as optax keeps optimiser state.

  Attributes:
    init: init() -> PromptTrackerState of empty buffers.
    update: update(state, prompt_ids [B] int, rewards [B]) -> TrackedAdvantages(advantages,
      state): adds the batch to each prompt's buffer, then standardises each reward.
  """
  init: Callable[[], PromptTrackerState]
  update: Callable[[PromptTrackerState, ArrayLike, ArrayLike], TrackedAdvantages]


def prompt_tracker(num_prompts: int, *, buffer_size: int, min_count: int) -> PromptTracker:
  """DDPO's per-prompt advantages: A = (r - mean) / (std + 1e-6) over the prompt's last `buffer_size` rewards.

  update(state, prompt_ids, rewards) first appends the batch's rewards to their prompts' ring
  buffers, in batch order (a prompt with more than `buffer_size` samples in one batch keeps its
  last `buffer_size`), then for each sample i with prompt p:
    A_i = (r_i - mean(buffer_p)) / (std(buffer_p) + 1e-6)   if buffer_p holds >= min_count rewards,
    A_i = (r_i - mean(r)) / (std(r) + 1e-6)                   otherwise,
  where mean(r), std(r) are over all B rewards of the batch (every prompt's, id or not). Prompt id
  -1 means "no id" (continuous prompts, which never repeat): such samples are not stored and always
  take the batch statistics. Stds are population stds (ddof = 0). This is ddpo-pytorch's
  `PerPromptStatTracker` (buffer_size = min_count = 16 in its configuration); its training
  script then clips the advantages to [-5, 5] (`jnp.clip(advantages, -5, 5)`). `reward_stats`
  with `ppo_advantages` is the variant that never forgets. update is jittable and vmappable
  (fixed shapes: a sort for each sample's rank within its prompt, a scatter into the buffers).

  Args:
    num_prompts: P >= 1, the number of prompt ids.
    buffer_size: rewards kept per prompt, >= 1.
    min_count: rewards a prompt's buffer needs before its own statistics replace the batch's,
      0 <= min_count <= buffer_size.

  Returns:
    A `PromptTracker` (init, update).

  Example:
    >>> import jax.numpy as jnp
    >>> tracker = prompt_tracker(2, buffer_size=3, min_count=2)
    >>> state = tracker.init()
    >>> # Prompt 0 has 2 rewards (its own statistics: mean 2, std 1); prompt 1 and the id-less
    >>> # sample use the batch's (mean 3, std 1.41).
    >>> out = tracker.update(state, jnp.array([0, 0, 1, -1]), jnp.array([1.0, 3.0, 5.0, 3.0]))
    >>> [round(a, 3) for a in out.advantages.tolist()]
    [-1.0, 1.0, 1.414, 0.0]
    >>> out.state.count.tolist(), out.state.rewards.tolist()
    ([2, 1], [[1.0, 3.0, 0.0], [5.0, 0.0, 0.0]])

  References:
    [DDPO] Black, Janner, Du, Kostrikov, Levine. Training Diffusion Models with Reinforcement Learning. ICLR 2024. https://arxiv.org/abs/2305.13301
  """
  num_prompts = checks.check_count("num_prompts", num_prompts)
  buffer_size = checks.check_count("buffer_size", buffer_size)
  min_count = checks.check_count("min_count", min_count, low=0)
  if min_count > buffer_size:
    raise ValueError(f"min_count: must be <= buffer_size = {buffer_size} (a buffer never holds "
                     f"more, so every prompt would take the batch statistics), got {min_count}")

  def init() -> PromptTrackerState:
    return PromptTrackerState(jnp.zeros((num_prompts, buffer_size), jnp.result_type(float)),
                              jnp.zeros((num_prompts,), jnp.int32))

  def update(state: PromptTrackerState, prompt_ids: ArrayLike,
             rewards: ArrayLike) -> TrackedAdvantages:
    _check_tracker_state(state, num_prompts, buffer_size)
    prompt_ids, rewards = checks.as_int("prompt_ids", prompt_ids), checks.as_float("rewards", rewards)
    if prompt_ids.ndim != 1 or rewards.ndim != 1:
      raise ValueError(f"prompt_ids/rewards: expected 1-d arrays [B], got shapes "
                       f"{tuple(prompt_ids.shape)} and {tuple(rewards.shape)}")
    checks.check_same_length(prompt_ids=prompt_ids, rewards=rewards)
    if checks.is_concrete(prompt_ids):
      ids = np.asarray(prompt_ids)
      bad = (ids < -1) | (ids >= num_prompts)
      if np.any(bad):
        raise ValueError(f"prompt_ids: every prompt id must be in [0, {num_prompts}) or -1 (no id), "
                         f"found {int(bad.sum())} outside (e.g. {ids[bad][0]})")
    checks.check_finite("rewards", rewards)
    return _tracker_kernel(state, prompt_ids, rewards.astype(state.rewards.dtype),
                           min_count=min_count)

  return PromptTracker(init, update)


def _check_tracker_state(state, num_prompts: int, buffer_size: int) -> None:
  if not isinstance(state, PromptTrackerState):
    raise ValueError(f"state: must be a PromptTrackerState, got {type(state).__name__}")
  if jnp.shape(state.rewards) != (num_prompts, buffer_size) or jnp.shape(state.count) != (num_prompts,):
    raise ValueError(f"state: expected rewards [{num_prompts}, {buffer_size}] and count "
                     f"[{num_prompts}] (this tracker's num_prompts and buffer_size), got "
                     f"{jnp.shape(state.rewards)} and {jnp.shape(state.count)}")
  if not jnp.issubdtype(jnp.result_type(state.count), jnp.integer):
    raise ValueError(f"state: count must be an integer array, got {jnp.result_type(state.count)}")


@functools.partial(jax.jit, static_argnames=("min_count",))
def _tracker_kernel(state, prompt_ids, rewards, *, min_count):
  num_prompts, buffer_size = state.rewards.shape
  has_id = prompt_ids >= 0
  row = jnp.where(has_id, prompt_ids, num_prompts)  # id-less samples: past the end, dropped
  # Each sample's rank among the batch's samples of its prompt, in batch order.
  order = jnp.argsort(row, stable=True)
  sorted_rows = row[order]
  rank_sorted = jnp.arange(row.shape[0]) - jnp.searchsorted(sorted_rows, sorted_rows, side="left")
  rank = jnp.zeros_like(row).at[order].set(rank_sorted.astype(row.dtype))
  in_batch = jnp.zeros((num_prompts,), jnp.int32).at[row].add(1, mode="drop")
  gather = jnp.where(has_id, prompt_ids, 0)
  # Only a prompt's last buffer_size samples of the batch are written, so no two writes share a slot.
  written = has_id & (rank >= in_batch[gather] - buffer_size)
  slot = (state.count[gather] + rank) % buffer_size
  buffers = state.rewards.at[jnp.where(written, row, num_prompts), slot].set(rewards, mode="drop")
  count = state.count + in_batch

  filled = jnp.minimum(count[gather], buffer_size)
  valid = jnp.arange(buffer_size)[None, :] < filled[:, None]
  shift, mean, std = (m[:, 0] for m in _shifted_moments(buffers[gather], valid))
  own = ((rewards - shift) - mean) / (std + _STD_EPS)
  batch_shift, batch_mean, batch_std = _shifted_moments(rewards)
  pooled = ((rewards - batch_shift) - batch_mean) / (batch_std + _STD_EPS)
  advantages = jnp.where(has_id & (filled >= min_count), own, pooled)
  return TrackedAdvantages(advantages, PromptTrackerState(buffers, count))


def _check_log_probs(log_probs: ArrayLike, advantages: ArrayLike,
                     old_log_probs: ArrayLike | None = None):
  log_probs = checks.as_float("log_probs", log_probs)
  advantages = checks.as_float("advantages", advantages)
  if log_probs.ndim != 2:
    raise ValueError(f"log_probs: expected [S, B] (steps, samples), got shape {tuple(log_probs.shape)}")
  if advantages.shape != log_probs.shape[1:]:
    raise ValueError(f"advantages: expected [B] = {log_probs.shape[1:]} like log_probs [S, B], got "
                     f"{tuple(advantages.shape)}")
  checks.check_finite("log_probs", log_probs)
  checks.check_finite("advantages", advantages)
  if old_log_probs is None:
    return log_probs, advantages
  old_log_probs = checks.as_float("old_log_probs", old_log_probs)
  if old_log_probs.shape != log_probs.shape:
    raise ValueError(f"old_log_probs: expected the shape of log_probs {tuple(log_probs.shape)}, got "
                     f"{tuple(old_log_probs.shape)}")
  checks.check_finite("old_log_probs", old_log_probs)
  return log_probs, advantages, old_log_probs


def reinforce_loss(log_probs: ArrayLike, advantages: ArrayLike) -> jax.Array:
  """REINFORCE (DDPO-SF): -(1/B) sum_b A_b sum_t log p_theta(x^b_t' | x^b_t, c_b).

  Its gradient is minus the score-function estimate of grad E[r]; unbiased with a baseline that
  does not depend on the sample (e.g. `loop_advantages`).

  Args:
    log_probs: [S, B] per-step log-probabilities under the current parameters (differentiable).
    advantages: [B] advantages (gradient stopped).

  Returns:
    Scalar loss.

  Example:
    >>> import jax.numpy as jnp
    >>> reinforce_loss(jnp.array([[-1.0, -2.0], [-1.0, 0.0]]), jnp.array([2.0, 0.0])).item()
    2.0

  References:
    Black et al. Training Diffusion Models with Reinforcement Learning. ICLR 2024. https://arxiv.org/abs/2305.13301
  """
  log_probs, advantages = _check_log_probs(log_probs, advantages)
  return _reinforce_kernel(log_probs, advantages)


@jax.jit
def _reinforce_kernel(log_probs, advantages):
  return -jnp.mean(jnp.sum(log_probs, axis=0) * jax.lax.stop_gradient(advantages))


class PPOLoss(NamedTuple):
  """A PPO loss and its diagnostics.

  Attributes:
    loss: scalar mean_{t, b} -min(rho A, clip(rho, 1 - e, 1 + e) A).
    approx_kl: scalar mean of (log rho)^2 / 2, DDPO's estimate of the KL between old and new policy.
    clip_fraction: scalar fraction of (t, b) with |rho - 1| > e.
  """
  loss: jax.Array
  approx_kl: jax.Array
  clip_fraction: jax.Array


def ppo_loss(log_probs: ArrayLike, old_log_probs: ArrayLike, advantages: ArrayLike, *,
             clip_range: float) -> PPOLoss:
  """PPO's clipped loss per denoising step (DDPO-IS; LOOP with `loop_advantages`).

  rho_{t,b} = exp(log p_theta - log p_old); loss = mean_{t,b} -min(rho A_b, clip(rho, 1-e, 1+e) A_b),
  via `saferl_jax.policy_gradient.clipped_surrogate`. Once rho leaves [1 - e, 1 + e] in the
  direction A favours, that term has zero gradient. Log-ratios above 60 are capped so rho stays
  finite in float32. With `reduce="sum"` log-probabilities e bounds the exact ratio (PPO's usual
  0.1 to 0.3); with DDPO's `reduce="mean"` it bounds the exact log-ratio at about +-d e for d
  dimensions (DDPO's e = 1e-4; see `saferl_jax.diffusion.step`).

  Args:
    log_probs: [S, B] per-step log-probabilities under the current parameters (differentiable).
    old_log_probs: [S, B] those recorded when sampling (`Trajectory.log_probs`; gradient stopped).
    advantages: [B] advantages: `ppo_advantages` for DDPO, `loop_advantages` for LOOP (gradient
      stopped).
    clip_range: e > 0, a float or a scalar array (traced: a new value reuses the compiled loss,
      and a sweep over e under jit or vmap compiles once).

  Returns:
    A `PPOLoss` (loss, approx_kl, clip_fraction); only loss carries a gradient.

  Example:
    >>> import jax.numpy as jnp
    >>> out = ppo_loss(jnp.log(jnp.array([[1.0, 2.0]])), jnp.zeros((1, 2)), jnp.array([1.0, 1.0]),
    ...                clip_range=0.2)
    >>> round(out.loss.item(), 4), out.clip_fraction.item()
    (-1.1, 0.5)

  References:
    Schulman et al. Proximal Policy Optimization Algorithms. 2017. https://arxiv.org/abs/1707.06347
    Gupta et al. A Simple and Effective Reinforcement Learning Method for Text-to-Image Diffusion Models. 2025. https://arxiv.org/abs/2503.00897
  """
  log_probs, advantages, old_log_probs = _check_log_probs(log_probs, advantages, old_log_probs)
  checks.check_nonnegative_option("clip_range", clip_range, strictly_positive=True)
  return _ppo_kernel(log_probs, old_log_probs, advantages, jnp.asarray(clip_range, log_probs.dtype))


@jax.jit
def _ppo_kernel(log_probs, old_log_probs, advantages, clip_range):
  log_ratio = log_probs - jax.lax.stop_gradient(old_log_probs)
  ratio = jnp.exp(jnp.minimum(log_ratio, _MAX_LOG_RATIO))
  surrogate = clipped_surrogate(ratio, jax.lax.stop_gradient(advantages)[None, :],
                                clip_low=1 - clip_range, clip_high=1 + clip_range)
  log_ratio, ratio = jax.lax.stop_gradient(log_ratio), jax.lax.stop_gradient(ratio)
  return PPOLoss(loss=-jnp.mean(surrogate), approx_kl=jnp.mean(0.5 * jnp.square(log_ratio)),
                 clip_fraction=jnp.mean((jnp.abs(ratio - 1) > clip_range).astype(ratio.dtype)))


# DDPM's training loss (pretraining), beside the fine-tuning losses above.


def check_probability(name: str, value) -> None:
  """Checks a probability option such as label dropout: it must lie in [0, 1]."""
  if checks.is_concrete(value) and not 0 <= float(np.asarray(value)) <= 1:
    raise ValueError(f"{name}: must be in [0, 1], got {value}")


def _is_class_id(null_condition) -> bool:
  """True for an integer scalar null condition: the conditions are then class ids [B]."""
  if isinstance(null_condition, (bool, np.bool_)):
    return False
  if isinstance(null_condition, (int, np.integer)):
    return True
  return (isinstance(null_condition, (np.ndarray, jax.Array)) and np.ndim(null_condition) == 0
          and jnp.issubdtype(null_condition.dtype, jnp.integer))


def epsilon_loss(apply_fn: Callable, params: Any, x0: ArrayLike, condition: Conditions, *,
                 key: jax.Array, alphas_cumprod: ArrayLike, label_dropout: float,
                 null_condition: Any) -> jax.Array:
  """DDPM's simple loss mean (eps_theta(x_t, t, c') - eps)^2 with t, eps and label dropout drawn from `key`.

  t ~ Uniform{0, ..., T-1},  eps ~ N(0, I),  x_t = sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) eps,
  c' = null_condition with probability label_dropout, else c [DDPM, Algorithm 1; CFG].

  The condition may be any pytree of arrays with leading axis B (class ids, continuous vectors,
  embedding sequences; `saferl_jax.diffusion.conditions`), and the null condition the matching
  pytree of one condition. Class ids int [B] go with the int null `num_classes` and must lie in
  [0, num_classes] (a gather would silently clamp an id out of range).

  Args:
    apply_fn: apply_fn(params, x_t [B, *shape], t [B] int32, condition) -> eps [B, *shape], with
      condition a pytree of the structure of `condition` (int leaves as int32).
    params: the denoiser's parameters.
    x0: [B, *shape] clean samples.
    condition: int [B] class ids, or any pytree of arrays [B, ...] (float leaves finite).
    key: PRNG key for t, eps and the dropout mask.
    alphas_cumprod: [T] alphabar_t of the training schedule (the caller passes the schedule's array).
    label_dropout: probability in [0, 1] of replacing a condition by `null_condition`.
    null_condition: the null (unconditional) condition: for class ids the int `num_classes`,
      else a pytree of one condition (each leaf the shape of the batch's without its first axis).

  Returns:
    The scalar loss, averaged over the batch and every dimension.

  Example:
    >>> zero = lambda params, x, t, c: jnp.zeros_like(x)  # loss = mean eps^2, about 1
    >>> loss = epsilon_loss(zero, None, jnp.ones((1000, 2)), jnp.zeros(1000, jnp.int32),
    ...                     key=jax.random.key(0), alphas_cumprod=jnp.linspace(0.99, 0.01, 50),
    ...                     label_dropout=0.1, null_condition=1)
    >>> bool(abs(loss - 1) < 0.1)
    True
    >>> directions = jnp.ones((1000, 3))  # continuous conditions; the null is the zero vector
    >>> loss = epsilon_loss(zero, None, jnp.ones((1000, 2)), directions, key=jax.random.key(0),
    ...                     alphas_cumprod=jnp.linspace(0.99, 0.01, 50), label_dropout=0.1,
    ...                     null_condition=jnp.zeros(3))
    >>> bool(abs(loss - 1) < 0.1)
    True

  References:
    [DDPM] Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020. https://arxiv.org/abs/2006.11239
    [CFG] Ho, Salimans. Classifier-Free Diffusion Guidance. 2022. https://arxiv.org/abs/2207.12598
  """
  checks.check_key("key", key)
  x0 = checks.as_float("x0", x0)
  alphas_cumprod = checks.as_float("alphas_cumprod", alphas_cumprod)
  if x0.ndim < 2:
    raise ValueError(f"x0: expected a batch [B, *shape], got shape {x0.shape}")
  class_ids = _is_class_id(null_condition)
  if class_ids:
    condition = checks.as_int("condition", condition)
    if condition.shape != x0.shape[:1]:
      raise ValueError(f"condition: expected class ids of shape [B={x0.shape[0]}] (the null "
                       f"condition is an int), got {condition.shape}")
    if checks.is_concrete(null_condition) \
        and not 0 <= int(null_condition) <= np.iinfo(np.int32).max:
      raise ValueError(f"null_condition: must be an int >= 0 (the denoiser's num_classes), got "
                       f"{null_condition!r}")
    null_condition = jnp.asarray(null_condition, jnp.int32)
  else:
    condition = conditions.check("condition", condition)
    batch = jax.tree_util.tree_leaves(condition)[0].shape[0]
    if batch != x0.shape[0]:
      raise ValueError(f"condition: expected a leading batch axis B = {x0.shape[0]} like x0, got "
                       f"{batch}")
    null_condition = conditions.check_null("null_condition", null_condition, condition)
  check_schedule(NoiseSchedule(alphas_cumprod), name="alphas_cumprod")
  check_probability("label_dropout", label_dropout)
  checks.check_finite("x0", x0)
  if class_ids and checks.is_concrete(null_condition):
    # Class ids: the denoiser's embedding gathers with them, and a gather clamps out-of-range ids.
    # They lie in [0, num_classes); the null token is num_classes itself.
    checks.check_indices("condition", condition, int(null_condition) + 1, what="class id")
  batch = x0.shape[0]
  t_key, noise_key, dropout_key = jax.random.split(key, 3)
  t = jax.random.randint(t_key, (batch,), 0, alphas_cumprod.shape[0])
  noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
  alphabar = alphas_cumprod[t].reshape((batch,) + (1,) * (x0.ndim - 1))
  x_t = jnp.sqrt(alphabar) * x0 + jnp.sqrt(1 - alphabar) * noise
  dropped = jax.random.bernoulli(dropout_key, label_dropout, (batch,))
  predicted = apply_fn(params, x_t, t.astype(jnp.int32),
                       conditions.drop(condition, null_condition, dropped))
  return jnp.mean((predicted - noise) ** 2)
