"""Reward fine-tuning of a diffusion model with REINFORCE, PPO (DDPO) or LOOP, many seeds at once (floor 3).

One round: draw P prompts, sample K trajectories per prompt with the current ("old") parameters,
score the B = P K final samples (B reward queries), compute advantages, then update:

  "reinforce"  one gradient step on -(1/B) sum_b A_b sum_t log p_theta, A the leave-one-out
               advantage of the same K samples (REINFORCE with a baseline, on-policy);
  "ppo"        DDPO-IS: A from per-prompt running reward statistics, clipped; `epochs` passes of
               `minibatches` steps on PPO's clipped loss with the stored log-probs as the old ones;
  "loop"       LOOP: the leave-one-out advantage inside the same clipped loss and updates.

An optional KL term, beta times the per-step Gaussian KL ||mu_theta - mu_ref||^2 / (2 sigma_t^2)
reduced over steps as the policy loss is (summed for REINFORCE, averaged for PPO's per-step
loss), keeps the model near the reference (pretrained) parameters: the objective is then
E[r] - beta KL(path), whose optimum tilts the reference by exp(r / beta) (with PPO's normalised
advantages, by exp(r / (beta std r))). S seeds run in one vmapped, jitted call through the one
training driver (`saferl_jax.training.driver`, seed axis sharded over devices); the run is
checkpointed every `eval_every` rounds and resumes exactly (round r uses fold_in(seed key, r)). Sample efficiency is counted in reward queries: B per round.

References:
  [DDPO] Black, Janner, Du, Kostrikov, Levine. Training Diffusion Models with Reinforcement
  Learning. ICLR 2024. https://arxiv.org/abs/2305.13301
  [LOOP] Gupta et al. A Simple and Effective Reinforcement Learning Method for Text-to-Image
  Diffusion Models. 2025. https://arxiv.org/abs/2503.00897
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

import dataclasses
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saferl_jax import checks
from saferl_jax.training import checkpoints, driver
from saferl_jax.diffusion.losses import (RewardStatsState, loop_advantages, ppo_advantages, ppo_loss,
                                         reinforce_loss, reward_stats)
from saferl_jax.diffusion.sampler import (sample, select_samples, stepwise_value_and_grad,
                                          trajectory_transitions)
from saferl_jax.diffusion.schedules import NoiseSchedule, check_schedule
from saferl_jax.diffusion.step import step_kl

METHODS = ("reinforce", "ppo", "loop")


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How trajectories are sampled and scored (static: it shapes the compiled round)."""
  shape: tuple[int, ...]           # one sample's shape, e.g. (8, 8, 1)
  num_classes: int                 # prompts are drawn uniformly from 0..num_classes-1
  prompts_per_round: int           # P
  samples_per_prompt: int          # K
  num_steps: int = 20              # S, DDIM steps
  eta: float = 1.0
  reduce: str = "sum"              # how step log-probs are reduced (see diffusion.step)
  guidance_scale: float | None = None
  null_condition: int | None = None


def _check_sampling(sampling) -> None:
  """The scalar fields of `Sampling`, named as `sampling.<field>` (the user's argument)."""
  if not isinstance(sampling, Sampling):
    raise TypeError(f"sampling: must be a Sampling, got {type(sampling).__name__}")
  for field in ("num_classes", "prompts_per_round", "samples_per_prompt", "num_steps"):
    checks.check_count(f"sampling.{field}", getattr(sampling, field))
  checks.check_real("sampling.eta", sampling.eta, low=0.0, high=1.0, open_low=True)
  if sampling.guidance_scale is not None:
    checks.check_real("sampling.guidance_scale", sampling.guidance_scale, low=0.0)
    if sampling.null_condition is None:
      raise ValueError("sampling.null_condition: guidance (sampling.guidance_scale) needs the "
                       "condition id that stands for 'no condition'")
    checks.check_count("sampling.null_condition", sampling.null_condition, low=0)


class FinetuneState(NamedTuple):
  params: Any
  opt_state: Any
  reward_stats: RewardStatsState


def _transitions(apply_fn, params, trajectory, schedule, sampling: Sampling):
  return trajectory_transitions(apply_fn, params, trajectory, schedule=schedule, eta=sampling.eta,
                                guidance_scale=sampling.guidance_scale,
                                null_condition=sampling.null_condition, reduce=sampling.reduce)


def _round(state: FinetuneState, data: tuple[Any, NoiseSchedule], key: jax.Array,
           round_index: jax.Array, *, apply_fn, reward_fn, optimizer, method: str, sampling: Sampling, epochs: int,
           minibatches: int, clip_range: float, kl_weight: float, normalize_advantages: bool):
  """One sampling round and its updates; returns the new state and the round's diagnostics.

  `data` is (the reference parameters of this seed, the noise schedule shared by every seed).
  """
  reference_params, schedule = data
  round_key = jax.random.fold_in(key, round_index)
  prompt_key, sample_key, shuffle_key = jax.random.split(round_key, 3)
  prompts = jax.random.randint(prompt_key, (sampling.prompts_per_round,), 0, sampling.num_classes)
  trajectory = sample(apply_fn, jax.lax.stop_gradient(state.params), prompts, key=sample_key,
                      schedule=schedule, num_steps=sampling.num_steps, eta=sampling.eta,
                      samples_per_condition=sampling.samples_per_prompt, shape=sampling.shape,
                      guidance_scale=sampling.guidance_scale, null_condition=sampling.null_condition,
                      reduce=sampling.reduce)
  rewards = reward_fn(trajectory.x0, trajectory.conditions)
  stats = state.reward_stats
  if method == "ppo":
    stats = reward_stats().update(stats, trajectory.conditions, rewards)
    advantages = ppo_advantages(stats, trajectory.conditions, rewards)
  else:
    advantages = loop_advantages(rewards, samples_per_condition=sampling.samples_per_prompt,
                                 normalize=normalize_advantages)

  # Every loss below is a sum over denoising steps, so its gradient is taken one step at a time
  # (`stepwise_value_and_grad`): REINFORCE sums its per-step terms, PPO averages them, and the KL
  # is weighted as the policy loss is, so that kl_weight is the beta of E[r] - beta KL(path).
  step_weight = 1.0 if method == "reinforce" else 1.0 / sampling.num_steps

  def step_loss(params, step, step_advantages):
    new = _transitions(apply_fn, params, step, schedule, sampling)
    if method == "reinforce":
      loss, approx_kl, clip_fraction = reinforce_loss(new.log_probs, step_advantages), 0.0, 0.0
    else:
      loss, approx_kl, clip_fraction = ppo_loss(new.log_probs, step.log_probs, step_advantages,
                                                clip_range=clip_range)
    if kl_weight:
      reference = _transitions(apply_fn, reference_params, step, schedule, sampling)
      kl = jax.vmap(lambda m, r: step_kl(m, r, new.stds[0], reduce=sampling.reduce))(
          new.means[0], jax.lax.stop_gradient(reference.means[0]))
      loss = loss + kl_weight * jnp.mean(kl)
    return step_weight * loss, (jnp.asarray(approx_kl), jnp.asarray(clip_fraction))

  batch_size = trajectory.conditions.shape[0]
  if method == "reinforce":  # on-policy: one step on the whole batch
    orders = jnp.arange(batch_size)[None, None]
  else:
    orders = jax.vmap(lambda k: jax.random.permutation(k, batch_size))(
        jax.random.split(shuffle_key, epochs)).reshape(epochs, minibatches, -1)

  def update(carry, index):
    params, opt_state = carry
    batch = select_samples(trajectory, index)
    (_, diagnostics), grads = stepwise_value_and_grad(
        lambda p, step: step_loss(p, step, advantages[index]), params, batch)
    diagnostics = jax.tree_util.tree_map(jnp.mean, diagnostics)  # averaged over steps
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), diagnostics

  (params, opt_state), (approx_kl, clip_fraction) = jax.lax.scan(
      update, (state.params, state.opt_state), orders.reshape(-1, orders.shape[-1]))
  diagnostics = {"reward": jnp.mean(rewards), "approx_kl": jnp.mean(approx_kl),
                 "clip_fraction": jnp.mean(clip_fraction)}
  return FinetuneState(params, opt_state, stats), diagnostics


def finetune(
    apply_fn: Callable,
    params,
    reward_fn: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    key: jax.Array,
    method: str,
    rounds: int,
    schedule: NoiseSchedule,
    sampling: Sampling,
    optimizer: optax.GradientTransformation,
    epochs: int = 2,
    minibatches: int = 2,
    clip_range: float = 0.2,
    kl_weight: float = 0.0,
    normalize_advantages: bool = False,
    evaluate: Callable[[Any], dict] | None = None,
    eval_every: int = 5,
    checkpoint_path: str | Path | None = None,
    checkpoint_mismatch: str = "error",
    run_config: dict | None = None,
) -> driver.TrainResult:
  """Fine-tunes a denoiser on a reward with REINFORCE, PPO or LOOP, for S seeds at once.

  Args:
    apply_fn: apply_fn(params, x_t [B, *shape], t [B], condition [B]) -> eps [B, *shape].
    params: the pretrained parameters with a leading seed axis [S, ...] (also the KL reference).
    reward_fn: jittable reward_fn(x0 [B, *shape], conditions [B]) -> rewards [B].
    key: [S] PRNG keys; a single key means S = 1 and no seed axis on params.
    method: one of METHODS.
    rounds: sampling rounds; each makes P K reward queries. A multiple of eval_every.
    schedule: the pretraining noise schedule.
    sampling: a `Sampling` (shape, prompts, K, steps, eta, reduction, guidance).
    optimizer: an optax optimizer, e.g. optax.adam(1e-4); pass the same object to reuse
      compilation.
    epochs, minibatches: PPO/LOOP passes over each round's samples, and steps per pass
      (B must divide into minibatches); ignored by REINFORCE (one step per round).
    clip_range: PPO's e (0.1 to 0.3 goes with reduce="sum"; DDPO's 1e-4 with "mean").
    kl_weight: weight of the KL to the initial parameters (0: none).
    normalize_advantages: REINFORCE and LOOP divide each prompt's leave-one-out advantages by the
      std of its K rewards (`loop_advantages(normalize=True)`); PPO always normalises by its
      running statistics, so it must stay False for "ppo".
    evaluate: optional jittable evaluate(params) -> {name: scalar} for one seed, recorded before
      training and every `eval_every` rounds.
    eval_every: rounds per chunk between evaluations and checkpoints.
    checkpoint_path: an orbax checkpoint directory, written after every chunk and resumed from
      when it holds this very run: the same parameters, keys, schedule, options, optimizer (its
      first updates), reward (its name and its values on fixed probe samples), evaluate and
      rounds. Another run's checkpoint raises a ValueError naming what differs.
    checkpoint_mismatch: "error", or "new" to checkpoint beside another run's checkpoint.
    run_config: optional JSON dict bound to the checkpoint (e.g. an experiment's whole config).

  Returns:
    A `TrainResult`; history["reward"], ["approx_kl"], ["clip_fraction"] are [rounds, S] (the
    sampled batch's mean reward before each round's update, and that round's diagnostics);
    history["reward_queries"] is [rounds] (cumulative queries after each round); evaluate's
    names are [rounds / eval_every + 1, S].
  """
  checks.check_choice("method", method, METHODS)
  driver.check_chunks("rounds", rounds, eval_every)
  for name, value in (("epochs", epochs), ("minibatches", minibatches)):
    checks.check_count(name, value)
  _check_sampling(sampling)
  check_schedule(schedule)
  num_train_steps = schedule.alphas_cumprod.shape[0]
  if sampling.num_steps >= num_train_steps:
    raise ValueError(f"sampling.num_steps: must be in [1, {num_train_steps - 1}] for a schedule of "
                     f"{num_train_steps} steps, got {sampling.num_steps}")
  checks.check_real("clip_range", clip_range, low=0.0, open_low=True)
  checks.check_real("kl_weight", kl_weight, low=0.0)
  checks.check_choice("checkpoint_mismatch", checkpoint_mismatch, driver.CHECKPOINT_MISMATCH)
  if sampling.samples_per_prompt < 2 and method != "ppo":
    raise ValueError(f"sampling.samples_per_prompt: {method} needs K >= 2 for its leave-one-out "
                     f"baseline, got {sampling.samples_per_prompt}")
  batch_size = sampling.prompts_per_round * sampling.samples_per_prompt
  if method != "reinforce" and batch_size % minibatches:
    raise ValueError(f"minibatches: {minibatches} does not divide the {batch_size} samples of a round")
  if not clip_range > 0:
    raise ValueError(f"clip_range: must be > 0, got {clip_range}")
  if normalize_advantages not in (True, False):
    raise ValueError(f"normalize_advantages: must be True or False, got {normalize_advantages!r}")
  if normalize_advantages and method == "ppo":
    raise ValueError("normalize_advantages: PPO normalises by its running per-prompt statistics; "
                     "only reinforce and loop take this option")
  if not kl_weight >= 0:
    raise ValueError(f"kl_weight: must be >= 0, got {kl_weight}")
  key, params, single_seed = driver.seed_axis(key, params)
  num_seeds = key.shape[0]

  stats = jax.vmap(lambda _: reward_stats().init(sampling.num_classes))(jnp.arange(num_seeds))
  state = FinetuneState(params, jax.vmap(optimizer.init)(params), stats)
  options = dict(method=method, epochs=int(epochs), minibatches=int(minibatches),
                 clip_range=float(clip_range), kl_weight=float(kl_weight),
                 normalize_advantages=bool(normalize_advantages))
  data = (params, schedule)  # the KL reference (per seed) and the schedule (shared)
  # Fingerprinting costs a few eager updates and checksums: only for checkpointed runs.
  fingerprint = None if checkpoint_path is None else driver.fingerprint(
      loop="finetune", state=state, data=data, key=key, num_steps=rounds, eval_every=eval_every,
      options={**options, "sampling": dataclasses.asdict(sampling)}, evaluate=evaluate,
      optimizer=optimizer, run_config=run_config, reward=_reward_fingerprint(reward_fn, sampling))
  step_fn = driver.step_function(_round, apply_fn=apply_fn, reward_fn=reward_fn, optimizer=optimizer,
                                 sampling=sampling, **options)
  state, history, _ = driver.run(
      step_fn, state, data, key, num_steps=rounds, eval_every=eval_every, fingerprint=fingerprint,
      data_axes=(0, None), evaluate=evaluate, checkpoint_path=checkpoint_path,
      checkpoint_mismatch=checkpoint_mismatch, description=f"finetune ({method})")
  result = driver.finish(state.params, history, single_seed)
  result.history["reward_queries"] = batch_size * np.arange(1, rounds + 1)
  return result


def _reward_fingerprint(reward_fn, sampling: Sampling) -> dict:
  """The reward's identity: its name, and its values on 4 fixed probe samples (so a changed
  closure or weight shows even under the same name)."""
  probe = jax.random.normal(jax.random.key(0), (4, *sampling.shape))
  conditions = jnp.arange(4) % sampling.num_classes
  values = np.asarray(reward_fn(probe, conditions), np.float64)
  # A reward that is NaN on noise (legitimately) still fingerprints by its finite values' pattern.
  return {"name": checkpoints.callable_name(reward_fn),
          "probe": [float(v) if np.isfinite(v) else str(v) for v in values]}


