"""Reward fine-tuning of a diffusion or flow model: REINFORCE, PPO (DDPO), GRPO, LOOP or reward backprop (floor 3).

One round: draw P prompts from `prompt_fn` (uniform class ids by default), sample K trajectories
per prompt with the current ("old") parameters, score the B = P K final samples (B reward queries),
compute advantages, then update:

  "reinforce"  one gradient step on -(1/B) sum_b A_b sum_t log p_theta, A the leave-one-out
               advantage of the same K samples (REINFORCE with a baseline, on-policy);
  "ppo"        DDPO-IS as ddpo-pytorch runs it: A from DDPO's per-prompt tracker (the last
               `tracker_buffer` rewards of each prompt id, the batch's statistics below
               `tracker_min_count` of them or for prompts without an id), clipped to [-5, 5];
               `epochs` passes of `minibatches` steps on PPO's clipped loss with the stored
               log-probs as the old ones;
  "grpo"       the group's standardised rewards (`grpo_advantages`) in the same clipped loss;
  "loop"       LOOP: the leave-one-out advantage in the same clipped loss and updates;
  "draft"      reward backpropagation (DRaFT-K, AlignProp): one step on -mean r(x_0), the gradient
               taken through the last `backprop_steps` sampling steps (rematerialised); needs a
               differentiable reward.

The schedule picks the process: a `NoiseSchedule` samples DDIM steps, a `FlowSchedule` the
Flow-GRPO SDE steps of a rectified flow; everything else is shared. An optional KL term, beta times
the per-step Gaussian KL ||mu_theta - mu_ref||^2 / (2 sigma_t^2) reduced over steps as the policy
loss is (summed for REINFORCE, averaged for the clipped loss), keeps the model near the reference
(initial) parameters: the objective is then E[r] - beta KL(path), whose optimum tilts the
reference by exp(r / beta) (with standardised advantages, by exp(r / (beta std r))). The path KL
to the reference is logged every round, with or without the term.

With `frozen_params` (LoRA: `saferl_jax.models.lora.lora_functional`), only `params` (the
adapters) are trained and kept per seed; the network is apply_fn((params, frozen_params), ...),
the frozen weights are shared by every seed, and the KL reference is the initial adapters (for
fresh LoRA adapters, the base network): no second copy of the weights.

S seeds run in one vmapped, jitted call through the one training driver
(`saferl_jax.training.driver`, seed axis sharded over devices); the run is checkpointed every
`eval_every` rounds and resumes exactly (round r uses fold_in(seed key, r)). Sample efficiency is
counted in reward queries: B per round.

Constrained (primal-dual) fine-tuning, `constraints=Constraints(...)` (SPEC section 6): maximise
E[r_0] - beta KL subject to E[r_i] >= b_i. reward_fn is the primary r_0; each round's policy step
(any method but "draft") trains on the Lagrangian reward r_0 + sum_i lambda_i (r_i - b_i)
(`saferl_jax.constrained.lagrangian_reward`) with the current multipliers, and after it, every
`dual_every` rounds, the dual optimizer (`constrained.dual_descent`, `nu_pi`) takes one step on
the slacks rbar_i - b_i of the same on-policy samples. The multipliers live in the state (per
seed, checkpointed, resumed exactly) and are logged every round with the constraints and slacks.
(PPO's tracker then tracks the Lagrangian reward, whose scale moves with lambda.)

One denoising step dominates REINFORCE. A step's score is (x_t' - mu) / sigma_t^2 times
d mu / d theta, whose size grows like 1 / sigma_t, and the step into t' = 1 (from 1 + T/S, at
eta = 1) has a sigma_t far below the others (alphabar_1 is nearly 1, so little noise is left to
add): on the digits model (10 steps) the per-step gradient norms of REINFORCE's loss were 38 to 85
for nine steps and 1093 for the step 101 -> 1, so after the whole update's global-norm clip every
update followed that one step's noise, and REINFORCE fell below the pretrained model. The cure is
`max_step_grad_norm`: each step's gradient is clipped to that global norm before the steps are
summed (the steps' gradients are taken one at a time anyway, `stepwise_value_and_grad`), so no
single step can dominate; steps below the bound are untouched. On that model, over 40 rounds of
3 seeds (P = 8, K = 4, adam(2e-4) after a global-norm clip of 1), REINFORCE's mean reward of the
last 10 rounds against the first 5 went from -1.67, -2.18, -2.18 to -5.45, -3.23, -1.61 without
the per-step clip (two seeds fell) and from -1.72, -2.23, -1.88 to -1.48, -1.96, -1.25 with it
(all three rose). It is on by default for REINFORCE (1.0) and available to every method (the
clipped methods bound each step's ratio instead, which already keeps that step in check).

References:
  [DDPO] Black, Janner, Du, Kostrikov, Levine. Training Diffusion Models with Reinforcement
  Learning. ICLR 2024. https://arxiv.org/abs/2305.13301
  [LOOP] Gupta et al. A Simple and Effective Reinforcement Learning Method for Text-to-Image
  Diffusion Models. 2025. https://arxiv.org/abs/2503.00897
  [Flow-GRPO] Liu et al. Flow-GRPO: Training Flow Matching Models via Online RL. 2025.
  https://arxiv.org/abs/2505.05470
  [DRaFT] Clark, Vicol, Swersky, Fleet. Directly Fine-Tuning Diffusion Models on Differentiable
  Rewards. ICLR 2024. https://arxiv.org/abs/2309.17400
  [AlignProp] Prabhudesai, Goyal, Pathak, Fragkiadaki. Aligning Text-to-Image Diffusion Models with
  Reward Backpropagation. 2023. https://arxiv.org/abs/2310.03739
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saferl_jax import checks, parallel
from saferl_jax.constrained.duals import DualOptimizer, DualState, lagrangian_reward
from saferl_jax.training import checkpoints, driver
from saferl_jax.diffusion import conditions as conds
from saferl_jax.diffusion.composition import path_kl
from saferl_jax.diffusion.losses import (grpo_advantages, loop_advantages, ppo_loss, prompt_tracker,
                                         reinforce_loss)
from saferl_jax.diffusion.sampler import (_check_num_steps, _check_process, differentiable_sample,
                                          sample, select_samples,
                                          stepwise_value_and_grad, trajectory_transitions)
from saferl_jax.diffusion.step import step_kl

METHODS = ("reinforce", "ppo", "grpo", "loop", "draft")
_CLIPPED = ("ppo", "grpo", "loop")  # the methods of PPO's clipped loss and minibatch updates
_ADVANTAGE_CLIP = 5.0  # DDPO clips its tracker's advantages to [-5, 5]


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How trajectories are sampled and scored (static: it shapes the compiled round)."""
  shape: tuple[int, ...]           # one sample's shape, e.g. (8, 8, 1)
  prompts_per_round: int           # P
  samples_per_prompt: int          # K
  num_classes: int | None = None   # default prompts: class ids drawn uniformly from 0..num_classes-1
  num_steps: int = 20              # S, sampling steps
  eta: float = 1.0                 # DDIM's eta in (0, 1], or a flow's noise level a > 0
  reduce: str = "sum"              # how step log-probs are reduced (see diffusion.step)
  guidance_scale: float | None = None
  null_condition: Any = None       # one condition's null (for class ids, the int num_classes)
  num_prompt_ids: int | None = None  # PPO's tracker size: prompt ids in [0, num_prompt_ids)


class Prompts(NamedTuple):
  """What a prompt_fn returns when its prompts have ids (for PPO's per-prompt tracker).

  Attributes:
    conditions: [P, ...] the prompts' conditions (any pytree with leading axis P).
    ids: int [P] prompt ids in [0, Sampling.num_prompt_ids), or -1 for a prompt without one
      (continuous prompts: the tracker then uses the batch's statistics).
  """
  conditions: Any
  ids: jax.Array


def class_prompts(num_classes: int, num_prompts: int) -> Callable[[jax.Array], Prompts]:
  """The default prompt_fn: num_prompts class ids drawn uniformly from [0, num_classes), ids = classes."""
  checks.check_count("num_classes", num_classes)
  checks.check_count("num_prompts", num_prompts)
  return _class_prompts(int(num_classes), int(num_prompts))


@functools.lru_cache(maxsize=64)  # one object per configuration: compiled rounds are reused
def _class_prompts(num_classes: int, num_prompts: int):
  def prompt_fn(key):
    ids = jax.random.randint(key, (num_prompts,), 0, num_classes)
    return Prompts(ids, ids)
  return prompt_fn


def _draw_prompts(prompt_fn, key, num_prompts: int) -> Prompts:
  """prompt_fn's prompts as `Prompts` (ids -1 when it returns bare conditions), checked."""
  prompts = prompt_fn(key)
  if not isinstance(prompts, Prompts):
    prompts = Prompts(prompts, jnp.full((num_prompts,), -1, jnp.int32))
  conditions = conds.check("prompt_fn", prompts.conditions)
  size = jax.tree_util.tree_leaves(conditions)[0].shape[0]
  ids = jnp.asarray(prompts.ids)
  if size != num_prompts or ids.shape != (num_prompts,):
    raise ValueError(f"prompt_fn: must return sampling.prompts_per_round = {num_prompts} prompts "
                     f"(and as many ids), got {size} conditions and ids of shape {ids.shape}")
  if not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"prompt_fn: prompt ids must be integers, got dtype {ids.dtype}")
  return Prompts(conditions, ids.astype(jnp.int32))


def _check_sampling(sampling) -> None:
  """The scalar fields of `Sampling`, named as `sampling.<field>` (the user's argument)."""
  if not isinstance(sampling, Sampling):
    raise TypeError(f"sampling: must be a Sampling, got {type(sampling).__name__}")
  for field in ("prompts_per_round", "samples_per_prompt", "num_steps"):
    checks.check_count(f"sampling.{field}", getattr(sampling, field))
  for field in ("num_classes", "num_prompt_ids"):
    if getattr(sampling, field) is not None:
      checks.check_count(f"sampling.{field}", getattr(sampling, field))
  checks.check_real("sampling.eta", sampling.eta, low=0.0, open_low=True)
  if sampling.guidance_scale is not None:
    checks.check_real("sampling.guidance_scale", sampling.guidance_scale, low=0.0)
    if sampling.null_condition is None:
      raise ValueError("sampling.null_condition: guidance (sampling.guidance_scale) needs the "
                       "condition that stands for 'no condition'")


class FinetuneState(NamedTuple):
  """One seed's fine-tuning state.

  Attributes:
    params: the trained parameters (the adapters, with frozen_params).
    opt_state: the optimizer's state.
    tracker: PPO's per-prompt reward buffers (`prompt_tracker`), unused by other methods.
    ema_params: the exponential moving average of params (params itself without ema_decay).
    duals: the constraints' multipliers and dual state (`DualState` of [m]); None without
      constraints (an empty pytree: orbax cannot save zero-size arrays).
  """
  params: Any
  opt_state: Any
  tracker: Any
  ema_params: Any
  duals: DualState | None


class Constraints(NamedTuple):
  """Constraints E_p[r_i] >= b_i of a primal-dual fine-tune (`finetune(constraints=...)`).

  Attributes:
    rewards: {name: reward_fn(x0 [B, ...], conditions) -> r_i [B]}, jittable; the order of the
      names is the order of the multipliers.
    thresholds: {name: b_i}, the same names, finite.
    dual_optimizer: a `saferl_jax.constrained.DualOptimizer`, e.g. `dual_descent(0.5)`.
    initial_multipliers: {name: lambda_i >= 0} at the start; None: zeros.
    dual_every: N_d >= 1, one dual step every N_d rounds (after rounds N_d, 2 N_d, ...).
  """
  rewards: Mapping[str, Callable]
  thresholds: Mapping[str, float]
  dual_optimizer: DualOptimizer
  initial_multipliers: Mapping[str, float] | None = None
  dual_every: int = 1


class FinetuneResult(NamedTuple):
  """Final parameters, their moving average and the history (leading seed axis unless one key).

  Attributes:
    params: the final parameters.
    history: {name: [rounds, S]} (see `finetune`).
    ema_params: the moving average of the parameters (equal to params without ema_decay).
  """
  params: Any
  history: dict
  ema_params: Any


def _network(params, frozen_params):
  """What apply_fn receives: the parameters, or (trained, frozen) with frozen_params."""
  return params if frozen_params is None else (params, frozen_params)


def _transitions(apply_fn, params, trajectory, schedule, null_condition, sampling: Sampling):
  return trajectory_transitions(apply_fn, params, trajectory, schedule=schedule, eta=sampling.eta,
                                guidance_scale=sampling.guidance_scale,
                                null_condition=null_condition, reduce=sampling.reduce)


def _advantages(family, clipped_method, rewards, prompts, tracker_state, *, sampling,
                tracker_options, normalize_advantages, grpo_global_std):
  """(advantages [B], the tracker's new state) of one round: REINFORCE's leave-one-out baseline,
  or for the clipped family the advantages of _CLIPPED[clipped_method] (an int array)."""
  k = sampling.samples_per_prompt

  def ppo():
    ids = jnp.repeat(prompts.ids, k)
    tracked = prompt_tracker(tracker_options[0], buffer_size=tracker_options[1],
                             min_count=tracker_options[2]).update(tracker_state, ids, rewards)
    return jnp.clip(tracked.advantages, -_ADVANTAGE_CLIP, _ADVANTAGE_CLIP), tracked.state

  def grpo():
    return grpo_advantages(rewards, samples_per_condition=k, global_std=grpo_global_std), tracker_state

  def loop():
    return loop_advantages(rewards, samples_per_condition=k, normalize=normalize_advantages), tracker_state
  if family == "reinforce":
    return loop()
  return jax.lax.switch(clipped_method, [ppo, grpo, loop])


def _round(state: FinetuneState, data: tuple, key: jax.Array, round_index: jax.Array, *,
           apply_fn, reward_fn, prompt_fn, optimizer, family: str, sampling: Sampling,
           epochs: int, minibatches: int, kl_weight: float,
           normalize_advantages: bool, grpo_global_std: bool, tracker_options: tuple,
           timestep_fraction: float, max_step_grad_norm: float | None, backprop_steps: int,
           ema_decay: float | None, batch_mesh=None, constraint_options=None):
  """One sampling round and its updates; returns the new state and the round's diagnostics.

  With `constraint_options` (names, reward fns, thresholds, dual optimizer, dual_every: the
  static form of `Constraints`), the policy step trains on the Lagrangian reward with the
  current multipliers and the multipliers then take their dual step (every dual_every rounds).

  With `batch_mesh` (finetune's batch_devices), the B samples' arrays are split over its "batch"
  devices (apply_fn arrives wrapped by `parallel.batch_sharded`).

  `family` is "draft", "reinforce" or "clipped"; which clipped method's advantages a clipped round
  uses is data, as is the clip range, so that PPO, GRPO and LOOP with the same other options,
  and a sweep over clip ranges, share one compiled round.

  `data` is (this seed's reference parameters, then shared by every seed: the schedule, the null
  condition, the frozen parameters, the clipped method's index in _CLIPPED and the clip range).
  """
  reference_params, schedule, null_condition, frozen_params, clipped_method, clip_range = data
  round_key = jax.random.fold_in(key, round_index)
  prompt_key, sample_key, shuffle_key, steps_key = jax.random.split(round_key, 4)
  prompts = _draw_prompts(prompt_fn, prompt_key, sampling.prompts_per_round)
  sample_options = dict(schedule=schedule, num_steps=sampling.num_steps, eta=sampling.eta,
                        samples_per_condition=sampling.samples_per_prompt, shape=sampling.shape,
                        guidance_scale=sampling.guidance_scale, null_condition=null_condition)
  old_params = jax.lax.stop_gradient(state.params)

  if family == "draft":
    def draft_loss(params):
      trajectory = differentiable_sample(
          apply_fn, _network(params, frozen_params), prompts.conditions, key=sample_key,
          backprop_steps=backprop_steps, reduce=sampling.reduce, **sample_options)
      rewards, parts = _score(reward_fn, trajectory)
      return -jnp.mean(rewards), (rewards, parts, jax.lax.stop_gradient(trajectory))
    (_, (rewards, parts, trajectory)), grads = jax.value_and_grad(draft_loss, has_aux=True)(
        state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    approx_kl = clip_fraction = jnp.zeros(())
    tracker = state.tracker
  else:
    trajectory = sample(apply_fn, _network(old_params, frozen_params), prompts.conditions,
                        key=sample_key, reduce=sampling.reduce, **sample_options)
    trajectory = _shard_trajectory(trajectory, batch_mesh)
    rewards, parts = _score(reward_fn, trajectory)
    rewards = parallel.shard_batch(rewards, batch_mesh)
    trained_rewards = rewards
    if constraint_options is not None:
      _, constraint_fns, thresholds, _, _ = constraint_options
      constraint_values = parallel.shard_batch(jnp.stack(
          [fn(trajectory.x0, trajectory.conditions) for fn in constraint_fns], axis=-1), batch_mesh)
      thresholds = jnp.asarray(thresholds, constraint_values.dtype)
      trained_rewards = lagrangian_reward(rewards, constraint_values, state.duals.multipliers,
                                          thresholds=thresholds)
    advantages, tracker = _advantages(
        family, clipped_method, trained_rewards, prompts, state.tracker, sampling=sampling,
        tracker_options=tracker_options,
        normalize_advantages=normalize_advantages, grpo_global_std=grpo_global_std)
    params, opt_state, approx_kl, clip_fraction = _policy_gradient_updates(
        state, trajectory, advantages, reference_params, schedule, null_condition, frozen_params,
        shuffle_key, steps_key, apply_fn=apply_fn, optimizer=optimizer, family=family,
        sampling=sampling, epochs=epochs, minibatches=minibatches, clip_range=clip_range,
        kl_weight=kl_weight, timestep_fraction=timestep_fraction,
        max_step_grad_norm=max_step_grad_norm, batch_mesh=batch_mesh)

  # The path KL of the sampling (old) parameters to the reference, on this round's trajectories.
  path_kls = path_kl(apply_fn, _network(old_params, frozen_params),
                     _network(reference_params, frozen_params), trajectory, schedule=schedule,
                     eta=sampling.eta, guidance_scale=sampling.guidance_scale,
                     null_condition=null_condition, reduce=sampling.reduce)
  ema_params = params if ema_decay is None else optax.incremental_update(
      params, state.ema_params, 1.0 - ema_decay)
  diagnostics = {"reward": jnp.mean(rewards), "approx_kl": approx_kl, "clip_fraction": clip_fraction,
                 "kl_to_reference": jnp.mean(path_kls)}
  for name, values in parts.items():
    diagnostics[f"reward/{name}"] = jnp.mean(jax.lax.stop_gradient(values))
  duals = state.duals
  if constraint_options is not None:
    names, _, _, dual_optimizer, dual_every = constraint_options
    means = jnp.mean(constraint_values, axis=0)
    slacks = means - thresholds
    # The dual step from this round's on-policy samples, taken after rounds N_d, 2 N_d, ...
    stepped = dual_optimizer.update(duals, slacks)
    take = (round_index + 1) % dual_every == 0
    duals = jax.tree_util.tree_map(lambda new, old: jnp.where(take, new, old), stepped, duals)
    diagnostics["lagrangian"] = jnp.mean(trained_rewards)
    for i, name in enumerate(names):
      diagnostics[f"constraint/{name}"] = means[i]
      diagnostics[f"slack/{name}"] = slacks[i]
      diagnostics[f"lambda/{name}"] = duals.multipliers[i]
  return FinetuneState(params, opt_state, tracker, ema_params, duals), diagnostics


def _score(reward_fn, trajectory):
  """(rewards [B], {name: [B]}): a combined reward's total and parts from one evaluation, or the
  reward and no parts."""
  components = getattr(reward_fn, "components", None)
  if components is None:
    return reward_fn(trajectory.x0, trajectory.conditions), {}
  scored = components(trajectory.x0, trajectory.conditions)
  return scored.total, scored.by_name


def _policy_gradient_updates(state, trajectory, advantages, reference_params, schedule,
                             null_condition, frozen_params, shuffle_key, steps_key, *, apply_fn,
                             optimizer, family, sampling, epochs, minibatches, clip_range,
                             kl_weight, timestep_fraction, max_step_grad_norm, batch_mesh=None):
  """REINFORCE's one step, or the clipped loss's epochs x minibatches steps, on one round's samples."""
  num_steps = sampling.num_steps
  num_trained = max(1, math.ceil(timestep_fraction * num_steps))
  # Every loss below is a sum over denoising steps, so its gradient is taken one step at a time
  # (`stepwise_value_and_grad`): REINFORCE sums its per-step terms (rescaled by S / trained steps
  # when a fraction is trained, so the estimate stays unbiased), the clipped loss averages them,
  # and the KL is weighted as the policy loss is, so that kl_weight is the beta of
  # E[r] - beta KL(path).
  step_weight = num_steps / num_trained if family == "reinforce" else 1.0 / num_trained

  def step_loss(params, step, step_advantages):
    new = _transitions(apply_fn, _network(params, frozen_params), step, schedule, null_condition,
                       sampling)
    if family == "reinforce":
      loss, approx_kl, clip_fraction = reinforce_loss(new.log_probs, step_advantages), 0.0, 0.0
    else:
      loss, approx_kl, clip_fraction = ppo_loss(new.log_probs, step.log_probs, step_advantages,
                                                clip_range=clip_range)
    if kl_weight:
      reference = _transitions(apply_fn, _network(reference_params, frozen_params), step, schedule,
                               null_condition, sampling)
      kl = jax.vmap(lambda m, r: step_kl(m, r, new.stds[0], reduce=sampling.reduce))(
          new.means[0], jax.lax.stop_gradient(reference.means[0]))
      loss = loss + kl_weight * jnp.mean(kl)
    return step_weight * loss, (jnp.asarray(approx_kl), jnp.asarray(clip_fraction))

  batch_size = advantages.shape[0]
  if family == "reinforce":  # on-policy: one step on the whole batch
    orders = jnp.arange(batch_size)[None, None]
  else:
    orders = jax.vmap(lambda k: jax.random.permutation(k, batch_size))(
        jax.random.split(shuffle_key, epochs)).reshape(epochs, minibatches, -1)
  orders = orders.reshape(-1, orders.shape[-1])
  update_keys = jax.random.split(steps_key, orders.shape[0])

  def update(carry, inputs):
    params, opt_state = carry
    index, update_key = inputs
    # DDPO's timestep_fraction: the steps trained in this update, a random subset shared by the
    # minibatch (all of them when the fraction is 1).
    trained_steps = (jnp.arange(num_steps) if num_trained == num_steps else
                     jax.random.permutation(update_key, num_steps)[:num_trained])
    batch = _shard_trajectory(select_samples(trajectory, index), batch_mesh)
    batch_advantages = parallel.shard_batch(advantages[index], batch_mesh)
    (_, diagnostics), grads = stepwise_value_and_grad(
        lambda p, step: step_loss(p, step, batch_advantages), params, batch,
        steps=trained_steps, max_step_norm=max_step_grad_norm)
    diagnostics = jax.tree_util.tree_map(jnp.mean, diagnostics)  # averaged over steps
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), diagnostics

  (params, opt_state), (approx_kl, clip_fraction) = jax.lax.scan(
      update, (state.params, state.opt_state), (orders, update_keys))
  return params, opt_state, jnp.mean(approx_kl), jnp.mean(clip_fraction)


def finetune(
    apply_fn: Callable,
    params,
    reward_fn: Callable[[jax.Array, Any], jax.Array],
    *,
    key: jax.Array,
    method: str,
    rounds: int,
    schedule,
    sampling: Sampling,
    optimizer: optax.GradientTransformation,
    prompt_fn: Callable[[jax.Array], Any] | None = None,
    frozen_params: Any = None,
    epochs: int = 2,
    minibatches: int = 2,
    clip_range: float = 0.2,
    kl_weight: float = 0.0,
    normalize_advantages: bool = False,
    grpo_global_std: bool = False,
    tracker_buffer: int = 16,
    tracker_min_count: int = 16,
    timestep_fraction: float = 1.0,
    max_step_grad_norm: float | None | str = "auto",
    backprop_steps: int = 1,
    ema_decay: float | None = None,
    batch_devices: int | str | None = None,
    evaluate: Callable[[Any], dict] | None = None,
    eval_every: int = 5,
    checkpoint_path: str | Path | None = None,
    checkpoint_mismatch: str = "error",
    run_config: dict | None = None,
    constraints: Constraints | None = None,
) -> FinetuneResult:
  """Fine-tunes a denoiser (or flow) on a reward with REINFORCE, PPO, GRPO, LOOP or DRaFT, for S seeds at once.

  Args:
    apply_fn: apply_fn(params, x_t [B, *shape], t [B], conditions [B, ...]) -> eps (or velocity)
      [B, *shape]; with frozen_params it receives (params, frozen_params) as its parameters.
    params: the initial trainable parameters with a leading seed axis [S, ...] (also the KL
      reference).
    reward_fn: jittable reward_fn(x0 [B, *shape], conditions [B, ...]) -> rewards [B] (for
      "draft", differentiable). A `combine_rewards` reward also logs each of its parts.
    key: [S] PRNG keys; a single key means S = 1 and no seed axis on params.
    method: one of METHODS.
    rounds: sampling rounds; each makes P K reward queries. A multiple of eval_every.
    schedule: the pretraining `NoiseSchedule` (DDIM steps) or a `FlowSchedule` (flow SDE steps).
    sampling: a `Sampling` (shape, P, K, steps, eta, reduction, guidance).
    optimizer: an optax optimizer, e.g. optax.adam(1e-4); pass the same object to reuse
      compilation.
    prompt_fn: prompt_fn(key) -> conditions [P, ...] (any pytree), or `Prompts(conditions, ids)`
      when prompts have ids for PPO's tracker; a stable object (compilation is reused per object).
      Default: `class_prompts(sampling.num_classes, P)`.
    frozen_params: parameters shared by every seed and never trained (LoRA's base weights).
    epochs, minibatches: passes of the clipped loss over each round's samples, and steps per pass
      (B must divide into minibatches); REINFORCE and DRaFT take one step per round.
    clip_range: PPO's e (0.1 to 0.3 goes with reduce="sum"; DDPO's 1e-4 with "mean").
    kl_weight: weight of the KL to the initial parameters (0: none; not with "draft").
    normalize_advantages: REINFORCE and LOOP divide each prompt's leave-one-out advantages by the
      std of its K rewards (`loop_advantages(normalize=True)`).
    grpo_global_std: GRPO divides by the std of the whole batch instead of the group's.
    tracker_buffer, tracker_min_count: DDPO's per-prompt tracker for "ppo" (ddpo-pytorch: 16, 16);
      prompt ids come from `Prompts.ids` (class ids by default), in [0, sampling.num_prompt_ids or
      num_classes).
    timestep_fraction: the fraction of each trajectory's steps trained in each update (DDPO's
      timestep_fraction), a random subset per update; in (0, 1].
    max_step_grad_norm: each step's gradient is clipped to this global norm before the steps are
      summed (module docstring); None: no clip; "auto": 1.0 for REINFORCE, None otherwise.
    backprop_steps: for "draft", K, the last sampling steps the gradient flows through.
    ema_decay: keep an exponential moving average of the parameters with this decay per round
      (evaluated instead of the parameters, returned as ema_params); None: none.
    batch_devices: data parallelism within a seed: the B = P K samples of a round (noise, states,
      conditions, rewards, advantages, every network evaluation) are split over this many devices,
      and the seeds over the others (`parallel.device_mesh`); gradients are reduced by XLA. An
      int dividing the device count, B and each minibatch, or "all"; None: seeds only. Results
      equal an unsharded run to float precision (sums are added in another order).
    evaluate: optional jittable evaluate(params) -> {name: scalar} for one seed (the trainable
      params; close over frozen ones), recorded before training and every `eval_every` rounds.
    eval_every: rounds per chunk between evaluations and checkpoints.
    checkpoint_path: an orbax checkpoint directory, written after every chunk and resumed from
      when it holds this very run: the same parameters, keys, schedule, options, optimizer (its
      first updates), prompts and reward (their names and values on fixed probes), evaluate and
      rounds. Another run's checkpoint raises a ValueError naming what differs.
    checkpoint_mismatch: "error", or "new" to checkpoint beside another run's checkpoint.
    run_config: optional JSON dict bound to the checkpoint (e.g. an experiment's whole config).
    constraints: a `Constraints` for primal-dual training (module docstring): reward_fn is then
      the primary reward r_0 (it may return zeros), the policy step of every method but "draft"
      trains on the Lagrangian reward r_0 + sum_i lambda_i (r_i - b_i) with the current
      multipliers, and every dual_every rounds the dual optimizer steps on the slacks (batch
      means of r_i) - b_i of the same samples. The multipliers are per seed, checkpointed and
      fingerprinted (names, thresholds, initial multipliers, dual_every, the constraint rewards'
      names and probe values, the dual optimizer's update on a probe).

  Returns:
    A `FinetuneResult`; history["reward"], ["approx_kl"], ["clip_fraction"],
    ["kl_to_reference"] (the mean path KL of the sampling parameters to the reference) are
    [rounds, S]; a combined reward adds ["reward/<name>"]; history["reward_queries"] is [rounds]
    (cumulative queries after each round); evaluate's names are [rounds / eval_every + 1, S].
    With constraints, history["reward"] is the mean primary r_0 and, per constraint name,
    ["constraint/<name>"] the mean r_i, ["slack/<name>"] the mean r_i - b_i,
    ["lambda/<name>"] the multiplier after the round's (possible) dual step, and
    ["lagrangian"] the mean Lagrangian reward trained on, all [rounds, S].

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> from saferl_jax.models.denoisers import MLPDenoiser, VectorEncoder
    >>> from saferl_jax.models.functional import as_functional
    >>> from saferl_jax.diffusion.schedules import linear_schedule
    >>> rngs = nnx.Rngs(0)
    >>> model = MLPDenoiser(2, condition_encoder=VectorEncoder(2, features=16, rngs=rngs),
    ...                     hidden=(16, 16), rngs=rngs)
    >>> apply_fn, params = as_functional(model)
    >>> def directions(key):  # continuous prompts: unit vectors u
    ...   angle = jax.random.uniform(key, (4,), maxval=2 * jnp.pi)
    ...   return jnp.stack([jnp.cos(angle), jnp.sin(angle)], -1)
    >>> result = finetune(apply_fn, params, lambda x, u: jnp.sum(x * u, -1), key=jax.random.key(0),
    ...                   method="grpo", rounds=2, eval_every=2, schedule=linear_schedule(100),
    ...                   sampling=Sampling(shape=(2,), prompts_per_round=4, samples_per_prompt=4,
    ...                                     num_steps=5), optimizer=optax.adam(1e-3),
    ...                   prompt_fn=directions)
    >>> result.history["reward"].shape, result.history["reward_queries"].tolist()
    ((2,), [16, 32])
  """
  checks.check_choice("method", method, METHODS)
  driver.check_chunks("rounds", rounds, eval_every)
  for name, value in (("epochs", epochs), ("minibatches", minibatches),
                      ("tracker_buffer", tracker_buffer), ("backprop_steps", backprop_steps)):
    checks.check_count(name, value)
  checks.check_count("tracker_min_count", tracker_min_count, low=0)
  _check_sampling(sampling)
  _check_schedule_and_steps(schedule, sampling)
  checks.check_real("clip_range", clip_range, low=0.0, open_low=True)
  checks.check_real("kl_weight", kl_weight, low=0.0)
  checks.check_real("timestep_fraction", timestep_fraction, low=0.0, high=1.0, open_low=True)
  if ema_decay is not None:
    checks.check_real("ema_decay", ema_decay, low=0.0, high=1.0, open_high=True)
  if max_step_grad_norm == "auto":
    max_step_grad_norm = 1.0 if method == "reinforce" else None
  if max_step_grad_norm is not None:
    checks.check_real("max_step_grad_norm", max_step_grad_norm, low=0.0, open_low=True)
  checks.check_choice("checkpoint_mismatch", checkpoint_mismatch, driver.CHECKPOINT_MISMATCH)
  k = sampling.samples_per_prompt
  if k < 2 and method in ("reinforce", "grpo", "loop"):
    raise ValueError(f"sampling.samples_per_prompt: {method} needs K >= 2 for its group baseline, "
                     f"got {k}")
  batch_size = sampling.prompts_per_round * k
  if method in _CLIPPED and batch_size % minibatches:
    raise ValueError(f"minibatches: {minibatches} does not divide the {batch_size} samples of a round")
  for name, value in (("normalize_advantages", normalize_advantages),
                      ("grpo_global_std", grpo_global_std)):
    if value not in (True, False):
      raise ValueError(f"{name}: must be True or False, got {value!r}")
  if normalize_advantages and method not in ("reinforce", "loop"):
    raise ValueError(f"normalize_advantages: only reinforce and loop take this option ({method} "
                     "standardises its advantages already)")
  if grpo_global_std and method != "grpo":
    raise ValueError(f"grpo_global_std: only grpo takes this option, not {method}")
  if method == "draft" and kl_weight:
    raise ValueError("kl_weight: reward backpropagation (draft) has no KL term; use 0")
  if method == "draft" and backprop_steps > sampling.num_steps:
    raise ValueError(f"backprop_steps: must be <= sampling.num_steps = {sampling.num_steps}, got "
                     f"{backprop_steps}")
  if constraints is not None and method == "draft":
    raise ValueError("constraints: primal-dual training needs a policy-gradient method; reward "
                     "backpropagation (draft) is not supported")
  if prompt_fn is None:
    if sampling.num_classes is None:
      raise ValueError("prompt_fn: give a prompt_fn, or sampling.num_classes for uniform class ids")
    prompt_fn = class_prompts(sampling.num_classes, sampling.prompts_per_round)
  elif not callable(prompt_fn):
    raise TypeError(f"prompt_fn: must be callable, prompt_fn(key) -> conditions, got "
                    f"{type(prompt_fn).__name__}")
  example = _draw_prompts(prompt_fn, jax.random.key(0), sampling.prompts_per_round)
  constraint_options, initial_duals = _check_constraints(constraints, sampling, example)
  null_condition = (None if sampling.guidance_scale is None else
                    conds.check_null("sampling.null_condition", sampling.null_condition,
                                     example.conditions))
  num_prompt_ids = sampling.num_prompt_ids or sampling.num_classes or 1
  if method == "ppo" and tracker_min_count > tracker_buffer:
    raise ValueError(f"tracker_min_count: must be <= tracker_buffer = {tracker_buffer}, got "
                     f"{tracker_min_count}")
  batch_mesh = _batch_mesh(batch_devices, batch_size,
                           batch_size // minibatches if method in _CLIPPED else batch_size)
  key, params, single_seed = driver.seed_axis(key, params)
  num_seeds = key.shape[0]

  # Only PPO reads the tracker (its min_count was checked above); other methods carry one unused.
  min_count = min(int(tracker_min_count), int(tracker_buffer))
  tracker = prompt_tracker(num_prompt_ids, buffer_size=tracker_buffer, min_count=min_count)
  trackers = jax.vmap(lambda _: tracker.init())(jnp.arange(num_seeds))
  duals = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (num_seeds, *x.shape)), initial_duals)
  state = FinetuneState(params, jax.vmap(optimizer.init)(params), trackers, params, duals)
  options = dict(method=method, epochs=int(epochs), minibatches=int(minibatches),
                 clip_range=float(clip_range), kl_weight=float(kl_weight),
                 normalize_advantages=bool(normalize_advantages),
                 grpo_global_std=bool(grpo_global_std),
                 tracker_options=(num_prompt_ids, int(tracker_buffer), min_count),
                 timestep_fraction=float(timestep_fraction),
                 max_step_grad_norm=None if max_step_grad_norm is None else float(max_step_grad_norm),
                 backprop_steps=int(backprop_steps),
                 ema_decay=None if ema_decay is None else float(ema_decay))
  # The reference (per seed), then shared by every seed: the schedule, the null condition, the
  # frozen weights (never copied per seed), which clipped method's advantages a clipped round uses
  # and the clip range (data, so that PPO, GRPO and LOOP, and every clip range, share one
  # compiled round).
  # The clip range takes JAX's default float, as the log-probabilities do (float64 under x64).
  clipped_method = jnp.asarray(_CLIPPED.index(method) if method in _CLIPPED else 0, jnp.int32)
  data = (params, schedule, null_condition, frozen_params, clipped_method,
          jnp.asarray(options["clip_range"]))
  # The null condition travels as data (it may be an array), so the static Sampling holds none.
  static_sampling = dataclasses.replace(sampling, null_condition=None)
  # Fingerprinting costs a few eager updates and checksums: only for checkpointed runs.
  fingerprint = None if checkpoint_path is None else driver.fingerprint(
      loop="finetune", state=state, data=data, key=key, num_steps=rounds, eval_every=eval_every,
      options={**options, "sampling": _jsonable(dataclasses.asdict(static_sampling))},
      evaluate=evaluate, optimizer=optimizer, run_config=run_config,
      reward=_reward_fingerprint(reward_fn, sampling, example),
      prompts={"name": checkpoints.callable_name(prompt_fn),
               "probe": _probe_values(example.conditions)},
      constraints=_constraints_fingerprint(constraints, constraint_options, initial_duals,
                                           sampling, example))
  # Without constraints the round is the unconstrained one (constraint_options=None).
  if constraint_options is not None:
    options["constraint_options"] = constraint_options
  # The round's static options: the method's family only (method and clip range travel as data).
  step_options = {name: value for name, value in options.items()
                  if name not in ("method", "clip_range")}
  step_options["family"] = "clipped" if method in _CLIPPED else method
  step_fn = driver.step_function(_round, apply_fn=parallel.batch_sharded(apply_fn, batch_mesh),
                                 reward_fn=reward_fn, prompt_fn=prompt_fn, optimizer=optimizer,
                                 sampling=static_sampling, batch_mesh=batch_mesh, **step_options)
  evaluate_ema = None if evaluate is None else _evaluate_ema(evaluate, ema_decay is not None)
  state, history, _ = driver.run(
      step_fn, state, data, key, num_steps=rounds, eval_every=eval_every, fingerprint=fingerprint,
      data_axes=(0, None, None, None, None, None), evaluate=evaluate_ema, checkpoint_path=checkpoint_path,
      checkpoint_mismatch=checkpoint_mismatch, description=f"finetune ({method})",
      evaluate_state=True, mesh=batch_mesh)
  result = driver.finish(state.params, history, single_seed)
  result.history["reward_queries"] = batch_size * np.arange(1, rounds + 1)
  ema_params = driver.one_seed(state.ema_params) if single_seed else state.ema_params
  return FinetuneResult(result.params, result.history, ema_params)


def _batch_mesh(batch_devices, batch_size: int, minibatch_size: int):
  """finetune's batch_devices as a `parallel.device_mesh`, or None when the batch is not split."""
  if batch_devices is None:
    return None
  if batch_devices == "all":
    batch_devices = jax.device_count()
  elif isinstance(batch_devices, str):
    raise ValueError(f"batch_devices: must be None, an int or 'all', got {batch_devices!r}")
  mesh = parallel.device_mesh(batch_devices=batch_devices)
  for what, size in (("the B = P K samples of a round", batch_size),
                     ("each minibatch (B / minibatches)", minibatch_size)):
    if size % batch_devices:
      raise ValueError(f"batch_devices: {what}, {size}, must divide evenly over the "
                       f"{batch_devices} batch devices")
  return None if batch_devices == 1 else mesh


def _shard_trajectory(trajectory, mesh):
  """A trajectory's per-sample arrays split over the mesh's batch devices (samples are axis 1 of
  states and log-probs, axis 0 of x0 and conditions)."""
  if parallel.batch_devices(mesh) == 1:
    return trajectory
  return trajectory._replace(
      x0=parallel.shard_batch(trajectory.x0, mesh),
      states=parallel.shard_batch(trajectory.states, mesh, axis=1),
      log_probs=parallel.shard_batch(trajectory.log_probs, mesh, axis=1),
      conditions=parallel.shard_batch(trajectory.conditions, mesh))


@functools.lru_cache(maxsize=64)
def _evaluate_ema(evaluate, use_ema: bool):
  """evaluate(state): the user's evaluate of the parameters, or of their average with ema_decay."""
  def evaluate_state(state):
    return evaluate(state.ema_params if use_ema else state.params)
  return evaluate_state


def _check_schedule_and_steps(schedule, sampling: Sampling) -> None:
  """The schedule (DDIM or flow) and the number of steps it allows, named as the caller's fields."""
  try:
    _check_process(schedule, sampling.eta)
  except ValueError as error:
    if str(error).startswith("eta:"):
      raise ValueError(f"sampling.{error}") from None
    raise
  try:
    _check_num_steps(sampling.num_steps, schedule)
  except ValueError as error:
    raise ValueError(f"sampling.{error}") from None


def _jsonable(value):
  """A dataclass dict for the fingerprint: tuples as lists, everything else as is."""
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (tuple, list)):
    return [_jsonable(v) for v in value]
  return value


def _probe_values(tree) -> list:
  """A pytree's values as a flat list of floats (non-finite ones as strings), for fingerprints."""
  values = np.concatenate([np.ravel(np.asarray(leaf, np.float64))
                           for leaf in jax.tree_util.tree_leaves(tree)] or [np.zeros(0)])
  return [float(v) if np.isfinite(v) else str(v) for v in values]


def _reward_fingerprint(reward_fn, sampling: Sampling, example: Prompts) -> dict:
  """The reward's identity: its name, and its values on 4 fixed probe samples (so a changed
  closure or weight shows even under the same name)."""
  probe = jax.random.normal(jax.random.key(0), (4, *sampling.shape))
  conditions = conds.take(example.conditions, jnp.arange(4) % sampling.prompts_per_round)
  # A reward that is NaN on noise (legitimately) still fingerprints by its finite values' pattern.
  return {"name": checkpoints.callable_name(reward_fn), "probe": _probe_values(reward_fn(probe, conditions))}


def _check_constraints(constraints, sampling: Sampling, example: Prompts):
  """(the static constraint options, the initial `DualState` [m]), checked; (None, None) without."""
  if constraints is None:
    return None, None
  if not isinstance(constraints, Constraints):
    raise TypeError(f"constraints: must be a Constraints, got {type(constraints).__name__}")
  for field in ("rewards", "thresholds"):
    if not isinstance(getattr(constraints, field), Mapping) or not getattr(constraints, field):
      raise TypeError(f"constraints.{field}: must be a non-empty mapping {{name: ...}}, got "
                      f"{getattr(constraints, field)!r}")
  names = tuple(constraints.rewards)
  for name in names:
    if not isinstance(name, str):
      raise TypeError(f"constraints.rewards: names must be strings, got {name!r}")
  if set(constraints.thresholds) != set(names):
    raise ValueError(f"constraints.thresholds: must name the constraints of constraints.rewards "
                     f"{sorted(names)}, got {sorted(map(str, constraints.thresholds))}")
  thresholds = tuple(float(checks.check_real(f"constraints.thresholds[{name!r}]",
                                             constraints.thresholds[name])) for name in names)
  fns = tuple(constraints.rewards[name] for name in names)
  probe = jax.random.normal(jax.random.key(0), (4, *sampling.shape))
  conditions = conds.take(example.conditions, jnp.arange(4) % sampling.prompts_per_round)
  for name, fn in zip(names, fns):
    if not callable(fn):
      raise TypeError(f"constraints.rewards[{name!r}]: must be callable, reward_fn(x0, "
                      f"conditions) -> [B], got {type(fn).__name__}")
    shape = jax.eval_shape(fn, probe, conditions).shape
    if shape != (4,):
      raise ValueError(f"constraints.rewards[{name!r}]: must return one reward per sample, shape "
                       f"(4,) for 4 samples, got {shape}")
  if not isinstance(constraints.dual_optimizer, DualOptimizer):
    raise TypeError(f"constraints.dual_optimizer: must be a DualOptimizer (e.g. "
                    f"constrained.dual_descent(0.5)), got {type(constraints.dual_optimizer).__name__}")
  checks.check_count("constraints.dual_every", constraints.dual_every)
  initial = constraints.initial_multipliers
  if initial is None:
    initial = dict.fromkeys(names, 0.0)
  elif not isinstance(initial, Mapping) or set(initial) != set(names):
    raise ValueError(f"constraints.initial_multipliers: must be None or map the constraints "
                     f"{sorted(names)} to multipliers >= 0, got {initial!r}")
  values = [float(checks.check_real(f"constraints.initial_multipliers[{name!r}]", initial[name],
                                    low=0.0)) for name in names]
  try:
    duals = constraints.dual_optimizer.init(jnp.asarray(values, jnp.float32))
  except ValueError as error:
    raise ValueError(f"constraints.initial_multipliers: {error}") from None
  static = (names, fns, thresholds, constraints.dual_optimizer, int(constraints.dual_every))
  return static, duals


def _constraints_fingerprint(constraints, static, duals, sampling: Sampling, example: Prompts):
  """The constraints' identity for the checkpoint: names, thresholds, initial multipliers,
  dual_every, each reward's name and probe values, and the dual optimizer's update on a probe."""
  if constraints is None:
    return None
  names, fns, thresholds, dual_optimizer, dual_every = static
  return {"names": list(names), "thresholds": list(thresholds),
          "initial_multipliers": _probe_values(duals), "dual_every": dual_every,
          "rewards": [_reward_fingerprint(fn, sampling, example) for fn in fns],
          "dual_optimizer": checkpoints.dual_optimizer_probe(dual_optimizer, duals.multipliers)}
