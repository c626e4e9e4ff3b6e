"""Reward fine-tuning of diffusion models: REINFORCE, PPO (DDPO-IS) and LOOP, after [LOOP] (floor 3).

Task 1, class-conditional digits: a small convolutional DDPM pretrained on scikit-learn's 8x8
digits (cached on disk: a second run loads it), the class as the prompt, and the reward
log p(prompted class | x_0) from a classifier trained on the same digits (prompt alignment).
Every method starts from the pretrained model and draws the same P prompts x K samples per round,
so curves are compared at equal reward queries; several seeds give confidence intervals.

Task 2, a 2-D Gaussian mixture prior with reward r(x) = a^T x and a KL penalty of weight beta to
the pretrained model: the optimum is the tilted mixture p(x) exp(a^T x / beta) / Z, known in
closed form, so the squared MMD of the fine-tuned samples to it measures how close each method
gets.

Claim checked: at equal reward queries LOOP reaches a higher reward than PPO and REINFORCE with
the same K.

LOOP's own regime, many prompts each seen about once (`results["many_prompts"]`, issue 13):

Task 3, "circle": a prompt is a unit vector u = (cos theta, sin theta), theta ~ U[0, 2 pi), and
the reward is r(x, u) = c u . x. The prior does not depend on u: a vector-conditioned MLP is
pretrained on the same mixture with random u as its conditions, so it learns to ignore them. With
a KL penalty of weight beta the optimum for each u is the prior tilted by exp(c u . x / beta),
again a Gaussian mixture (`circle_optimum`), so the distance to it is exact per prompt: we report
the mean over held-out prompts (evenly spaced angles) of the squared MMD of the model's samples
to that prompt's optimum. That is the optimum of what REINFORCE and LOOP optimise (their
advantages are raw leave-one-out differences of r). PPO and GRPO standardise their advantages,
A = (r - mean) / std, so their fixed point is the prior tilted by exp(c u . x / (beta std r)),
with std r the batch's (PPO) or the group's (GRPO) reward spread: a different temperature, so
their distance measures a different trade-off (reported, not a verdict on them).

Task 4, "digits_ink": a prompt is a digit and a stroke-intensity target, {"digit": d, "ink": s}
with d uniform in 0..9 and s ~ U[0.2, 0.8]; ink(x) is the image's mean intensity rescaled so
that the data's 5th and 95th percentiles map to 0 and 1. The denoiser (a `DictEncoder` of a class
and a vector encoder) is pretrained on the digits with their own ink as condition, and the reward
is log p(d | x_0) - lambda (ink(x_0) - s)^2.

Prompts never repeat, so PPO runs as DDPO does for unseen prompts: its per-prompt tracker has no
history for any prompt (ids -1), and every advantage is standardised by the batch's statistics.
REINFORCE (the same K, leave-one-out baseline), PPO, GRPO and LOOP draw the same prompts and
samples per round (P K reward queries), seeds vmapped in one call. A sweep over clip ranges and
learning rates on the circle task shows how the approx KL per update and the reward depend on
both (`results["many_prompts_sweep"]`).

References:
  [LOOP] Gupta et al. A Simple and Effective Reinforcement Learning Method for Text-to-Image
  Diffusion Models. 2025. https://arxiv.org/abs/2503.00897
  [DDPO] Black, Janner, Du, Kostrikov, Levine. Training Diffusion Models with Reinforcement
  Learning. ICLR 2024. https://arxiv.org/abs/2305.13301
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from saferl_jax import checks
from saferl_jax.data import digits as digits_data
from saferl_jax.data import mixture2d
from saferl_jax.models.denoisers import (ClassEncoder, ConvDenoiser, DictEncoder, MLPDenoiser,
                                         VectorEncoder)
from saferl_jax.training.finetuning import Sampling, finetune
from saferl_jax.training.pretraining import pretrain
from saferl_jax.diffusion.rewards import combine_rewards, prompt_alignment_reward, tilt_reward
from saferl_jax.training.classifier import train_classifier
from saferl_jax.diffusion.sampler import sample
from saferl_jax.diffusion.schedules import linear_schedule
from saferl_jax.experiments.common import (Checkpoint, finish, markdown_table, plot_curve,
                                           progress, pyplot, seed_interval)
from saferl_jax.models.functional import as_functional

# The digits and 2-D mixture tasks compare these three (their results keys since issue 5).
COMPARED = ("reinforce", "ppo", "loop")
# The many-prompt tasks add GRPO.
MANY_PROMPT_METHODS = ("reinforce", "ppo", "grpo", "loop")
LABELS = {"reinforce": "REINFORCE (LOO baseline)", "ppo": "PPO (DDPO-IS)", "grpo": "GRPO",
          "loop": "LOOP"}


@dataclasses.dataclass(frozen=True)
class Config:
  train_steps: int = 1000          # T of the noise schedule
  sampling_steps: int = 10         # S
  channels: int = 16
  pretrain_steps: int = 1000
  pretrain_batch: int = 128
  classifier_steps: int = 600
  prompts_per_round: int = 8       # P
  samples_per_prompt: int = 4      # K
  rounds: int = 40
  eval_every: int = 10
  learning_rate: float = 2e-4      # Adam after clipping the gradient norm to 1, as DDPO
  epochs: int = 2                  # PPO/LOOP passes over a round's samples
  minibatches: int = 2
  clip_range: float = 0.2          # with the exact (summed) log-density
  num_seeds: int = 3
  # The 2-D task.
  mixture_pretrain_steps: int = 3000
  mixture_rounds: int = 30
  tilt: tuple[float, float] = (1.0, 1.0)
  kl_weight: float = 1.0
  mixture_learning_rate: float = 1e-3
  # The many-prompt tasks (module docstring). They reuse the sizes above: the circle task
  # pretrains for mixture_pretrain_steps and runs mixture_rounds, digits x ink pretrains for
  # pretrain_steps and runs rounds, both with P, K, epochs, minibatches and seeds as above.
  many_prompt_tasks: tuple[str, ...] = ("circle", "digits_ink")  # which many-prompt tasks run
  many_prompt_seeds: int | None = None  # None: num_seeds
  circle_rounds: int | None = None      # None: mixture_rounds
  ink_rounds: int | None = None         # None: rounds
  ink_pretrain_steps: int | None = None # None: pretrain_steps
  circle_reward_scale: float = 1.0      # c in r = c u . x
  circle_kl_weight: float = 1.0         # beta
  circle_hidden: tuple[int, ...] = (128, 128, 128)
  circle_learning_rate: float = 5e-4    # mean approx KL ~0.015 per update (see the sweep)
  circle_eval_prompts: int = 8          # held-out directions, evenly spaced
  circle_eval_samples: int = 256        # samples per held-out direction for the MMD
  ink_weight: float = 5.0               # lambda
  ink_targets: tuple[float, float] = (0.2, 0.8)
  ink_learning_rate: float = 2e-5
  many_prompts_clip_range: float = 0.2  # with reduce="sum"
  # The sensitivity sweep on the circle task: every clip range x learning rate, sweep_rounds each.
  sweep_methods: tuple[str, ...] = ("loop",)
  sweep_clip_ranges: tuple[float, ...] = (0.2,)
  sweep_learning_rates: tuple[float, ...] = (2e-4,)
  sweep_rounds: int = 10
  seed: int = 0


# The many-prompt tasks are a smoke run in quick mode (the demo): the circle task only (digits x
# ink pretrains and compiles a conv net per method, minutes on 2 cores), few seeds and rounds,
# and a sweep of two learning rates.
QUICK = Config(many_prompt_tasks=("circle",), many_prompt_seeds=2, circle_rounds=20,
               sweep_clip_ranges=(0.2,), sweep_learning_rates=(1e-4, 1e-3))
# The same digits model and reward for longer, over more seeds. A larger model (32 channels,
# 10,000 pretraining steps, 20 steps) starts at a reward of -0.05, where no method has room to
# differ.
# The many-prompt tasks at the size this session's CPU time allowed (docs/results.md).
FULL = Config(rounds=200, num_seeds=5, mixture_pretrain_steps=10_000, mixture_rounds=100,
              many_prompt_seeds=3, circle_rounds=60, ink_rounds=40,
              sweep_clip_ranges=(0.1, 0.2, 0.3), sweep_learning_rates=(1e-4, 3e-4, 1e-3),
              sweep_rounds=20)


@functools.cache
def _optimizer(learning_rate: float) -> optax.GradientTransformation:
  # One object per learning rate: finetune calls that share their optimizer (and options) share
  # one compiled round.
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate))




def _curves(rewards: np.ndarray, queries: np.ndarray) -> dict:
  """rewards [rounds, S] -> mean and CI per round, against cumulative reward queries."""
  return {"reward_queries": queries.tolist(), "reward_mean": rewards.mean(axis=1).tolist(),
          "reward_ci": [seed_interval(row) for row in rewards]}


def _digits(out: Path, config: Config, checkpoint: Checkpoint) -> dict:
  schedule = linear_schedule(config.train_steps)
  data = digits_data.load_digits()
  key = jax.random.key(config.seed)
  model = ConvDenoiser(channels=config.channels, rngs=nnx.Rngs(config.seed))
  pretrained = pretrain(model, data.images, data.labels, key=jax.random.fold_in(key, 1),
                        alphas_cumprod=schedule.alphas_cumprod, steps=config.pretrain_steps,
                        batch_size=config.pretrain_batch, learning_rate=2e-3,
                        checkpoint_path=checkpoint.path_for("digits_denoiser"))
  classifier = _classifier(config, checkpoint)
  apply_fn, params = as_functional(model)

  def reward_fn(x0, conditions):
    return prompt_alignment_reward(classifier.apply_fn, classifier.params, x0, conditions)

  sampling = Sampling(shape=(8, 8, 1), num_classes=10, prompts_per_round=config.prompts_per_round,
                      samples_per_prompt=config.samples_per_prompt, num_steps=config.sampling_steps)
  optimizer = _optimizer(config.learning_rate)
  seeds = config.num_seeds
  seed_params = jax.tree_util.tree_map(lambda x: jnp.stack([x] * seeds), params)
  keys = jax.random.split(jax.random.fold_in(key, 3), seeds)
  finals = {}
  for method in progress(COMPARED, "digits fine-tuning"):
    # A finished run returns from its checkpoint at once; its parameters draw the image grid.
    result = finetune(apply_fn, seed_params, reward_fn, key=keys, method=method,
                      rounds=config.rounds, schedule=schedule, sampling=sampling,
                      optimizer=optimizer, epochs=config.epochs, minibatches=config.minibatches,
                      clip_range=config.clip_range, eval_every=config.eval_every,
                      checkpoint_path=checkpoint.path_for(f"digits_{method}"))
    checkpoint.save(f"digits/{method}", {"reward": result.history["reward"],
                                         "queries": result.history["reward_queries"],
                                         "approx_kl": result.history["approx_kl"].mean(),
                                         "clip_fraction": result.history["clip_fraction"].mean()})
    finals[method] = jax.tree_util.tree_map(lambda x: x[0], result.params)
  # The pretrained model's reward: the same number of samples as a round, from every seed's keys.
  initial = jax.vmap(lambda k: jnp.mean(reward_fn(*_sample_x0(
      apply_fn, params, k, schedule, sampling))))(keys)
  methods = {}
  for method in COMPARED:
    saved = checkpoint[f"digits/{method}"]
    rewards = np.asarray(saved["reward"])
    methods[method] = {**_curves(rewards, np.asarray(saved["queries"])),
                       "last_rounds_reward_per_seed": rewards[-config.eval_every:].mean(0).tolist(),
                       "mean_approx_kl": saved["approx_kl"],
                       "mean_clip_fraction": saved["clip_fraction"]}
  _image_grid(out, apply_fn, {"pretrained": params, **finals}, schedule, sampling)
  return {"task": "digits", "initial_reward": float(initial.mean()), "methods": methods,
          "pretrain_from_cache": bool(pretrained.from_cache),
          "pretrain_final_loss": float(np.mean(pretrained.losses[-100:]))}


def _sample_x0(apply_fn, params, key, schedule, sampling, prompts=None):
  if prompts is None:
    prompts = jax.random.randint(key, (sampling.prompts_per_round,), 0, sampling.num_classes)
  trajectory = sample(apply_fn, params, prompts, key=key, schedule=schedule,
                      num_steps=sampling.num_steps, eta=sampling.eta,
                      samples_per_condition=sampling.samples_per_prompt, shape=sampling.shape)
  return trajectory.x0, trajectory.conditions


def _image_grid(out: Path, apply_fn, models: dict, schedule, sampling) -> None:
  """One row of samples per model, one column per prompt (digits 0..9)."""
  plt = pyplot()
  grid = dataclasses.replace(sampling, samples_per_prompt=1)
  fig, axes = plt.subplots(len(models), 10, figsize=(10, 1.1 * len(models) + 0.3))
  for row, (name, params) in enumerate(models.items()):
    x0, _ = _sample_x0(apply_fn, params, jax.random.key(99), schedule, grid, prompts=jnp.arange(10))
    for column in range(10):
      axis = axes[row, column]
      axis.imshow(np.asarray(x0[column, ..., 0]), cmap="gray_r", vmin=-1, vmax=1)
      axis.set_xticks([])
      axis.set_yticks([])
      if column == 0:
        axis.set_ylabel(name, fontsize=7)
  fig.tight_layout()
  fig.savefig(out / "digits_samples.png", dpi=120)
  plt.close(fig)


def _mixture(out: Path, config: Config, checkpoint: Checkpoint) -> dict:
  schedule = linear_schedule(config.train_steps)
  prior = mixture2d.default_mixture()
  key = jax.random.key(config.seed + 10)
  points = mixture2d.sample_mixture(prior, key=jax.random.fold_in(key, 0), num_samples=20_000)
  model = MLPDenoiser(2, num_classes=1, rngs=nnx.Rngs(config.seed))
  pretrain(model, points, None, key=jax.random.fold_in(key, 1),
           alphas_cumprod=schedule.alphas_cumprod, steps=config.mixture_pretrain_steps,
           batch_size=256, learning_rate=2e-3, checkpoint_path=checkpoint.path_for("mixture_denoiser"))
  apply_fn, params = as_functional(model)
  direction = jnp.asarray(config.tilt)
  target = mixture2d.tilted_mixture(prior, direction, kl_weight=config.kl_weight)

  def reward_fn(x0, conditions):
    del conditions
    return x0 @ direction

  # The unconditional model's only condition is its null token (1).
  sampling = Sampling(shape=(2,), num_classes=1, prompts_per_round=config.prompts_per_round,
                      samples_per_prompt=config.samples_per_prompt, num_steps=config.sampling_steps)
  seeds = config.num_seeds
  keys = jax.random.split(jax.random.fold_in(key, 2), seeds)
  seed_params = jax.tree_util.tree_map(lambda x: jnp.stack([x] * seeds), params)

  def null_apply(p, x, t, c):
    return apply_fn(p, x, t, jnp.ones_like(c))  # every sample is unconditional

  def distance(p, k):
    x0, _ = _sample_x0(null_apply, p, k, schedule, dataclasses.replace(
        sampling, prompts_per_round=1, samples_per_prompt=2000))
    return mixture2d.mixture_mmd(x0, target)

  optimizer = _optimizer(config.mixture_learning_rate)
  methods = {}
  for method in COMPARED:
    cell = f"mixture/{method}"
    if cell not in checkpoint:
      result = finetune(null_apply, seed_params, reward_fn, key=keys, method=method,
                        rounds=config.mixture_rounds, schedule=schedule, sampling=sampling,
                        optimizer=optimizer, epochs=config.epochs, minibatches=config.minibatches,
                        clip_range=config.clip_range, kl_weight=config.kl_weight,
                        eval_every=config.eval_every,
                        checkpoint_path=checkpoint.path_for(f"mixture_{method}"))
      mmd = jax.vmap(distance)(result.params, keys)
      checkpoint.save(cell, {"reward": result.history["reward"],
                             "queries": result.history["reward_queries"], "mmd": mmd})
    saved = checkpoint[cell]
    mmd = np.asarray(saved["mmd"])
    methods[method] = {**_curves(np.asarray(saved["reward"]), np.asarray(saved["queries"])),
                       "mmd_to_optimum": float(mmd.mean()), "mmd_to_optimum_ci": seed_interval(mmd)}
  initial_mmd = np.asarray(jax.vmap(distance)(seed_params, keys))
  return {"task": "mixture2d", "tilt": list(config.tilt), "kl_weight": config.kl_weight,
          "optimal_reward": float(mixture2d.mixture_mean(target) @ direction),
          "initial_reward": float(mixture2d.mixture_mean(prior) @ direction),
          "initial_mmd_to_optimum": float(initial_mmd.mean()), "methods": methods}


# LOOP's regime: many prompts, each seen about once (issue 13, part 8).


def circle_optimum(prior: mixture2d.GaussianMixture, direction, *, reward_scale: float,
                   kl_weight: float) -> mixture2d.GaussianMixture:
  """The circle task's optimum for one prompt u: q*(x) ∝ p(x) exp(c u . x / beta), a Gaussian mixture.

  max_q E_q[c u . x] - beta KL(q || p) is solved by the prior tilted by exp(c u . x / beta)
  (`mixture2d.tilted_mixture` with a = c u): each component's mean moves by Sigma_k c u / beta
  and its weight is multiplied by exp(c u . mu_k / beta + c^2 u^T Sigma_k u / (2 beta^2)).

  Args:
    prior: the prior p, a `GaussianMixture` with means [M, D].
    direction: [D] the prompt u (a unit vector in the task; any vector is accepted).
    reward_scale: c, the reward's scale.
    kl_weight: beta > 0, the weight of the KL penalty.

  Returns:
    The optimum q* for this prompt, a `GaussianMixture`.

  Example:
    >>> prior = mixture2d.make_mixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.0]], stds=1.0)
    >>> optimum = circle_optimum(prior, [1.0, 0.0], reward_scale=2.0, kl_weight=2.0)
    >>> optimum.means.tolist(), round(float(optimum.weights[1]), 4)  # sigmoid(2)
    ([[0.0, 0.0], [2.0, 0.0]], 0.8808)

  References:
    Korbak, Perez, Buckley. RL with KL penalties is better viewed as Bayesian inference. 2022.
    https://arxiv.org/abs/2205.11275
  """
  checks.check_real("reward_scale", reward_scale)
  return mixture2d.tilted_mixture(prior, reward_scale * checks.as_float("direction", direction),
                                  kl_weight=kl_weight)


def _directions(angles: jax.Array) -> jax.Array:
  return jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def _stack_seeds(params, seeds: int):
  return jax.tree_util.tree_map(lambda x: jnp.stack([x] * seeds), params)


def _per_seed_last_rounds(rewards: np.ndarray, eval_every: int) -> np.ndarray:
  """rewards [rounds, S] -> [S], each seed's mean training reward over the last eval_every rounds."""
  return rewards[-eval_every:].mean(axis=0)


class _CircleTask:
  """The circle task's model, prompts, reward and exact per-prompt distance (built once per run)."""

  def __init__(self, config: Config, checkpoint: Checkpoint):
    self.config = config
    self.schedule = linear_schedule(config.train_steps)
    self.prior = mixture2d.default_mixture()
    key = jax.random.key(config.seed + 20)
    points = mixture2d.sample_mixture(self.prior, key=jax.random.fold_in(key, 0), num_samples=20_000)
    # Random directions as conditions: the data do not depend on them, so the model learns to
    # ignore u and its prior is the same mixture for every prompt.
    angles = jax.random.uniform(jax.random.fold_in(key, 1), (points.shape[0],), maxval=2 * jnp.pi)
    rngs = nnx.Rngs(config.seed)
    hidden = tuple(config.circle_hidden)
    model = MLPDenoiser(2, condition_encoder=VectorEncoder(2, features=hidden[0], rngs=rngs),
                        hidden=hidden, rngs=rngs)
    pretrained = pretrain(model, points, _directions(angles), key=jax.random.fold_in(key, 2),
                          alphas_cumprod=self.schedule.alphas_cumprod,
                          steps=config.mixture_pretrain_steps, batch_size=256, learning_rate=2e-3,
                          checkpoint_path=checkpoint.path_for("circle_denoiser"))
    self.pretrain_final_loss = float(np.mean(pretrained.losses[-100:]))
    self.apply_fn, self.params = as_functional(model)
    self.sampling = Sampling(shape=(2,), prompts_per_round=config.prompts_per_round,
                             samples_per_prompt=config.samples_per_prompt,
                             num_steps=config.sampling_steps)
    self.num_seeds = config.many_prompt_seeds or config.num_seeds
    self.keys = jax.random.split(jax.random.fold_in(key, 3), self.num_seeds)
    # Held-out prompts: evenly spaced angles, offset so that none is an axis of the prior.
    num_eval = config.circle_eval_prompts
    self.eval_directions = _directions(2 * jnp.pi * (jnp.arange(num_eval) + 0.5) / num_eval)
    optima = [circle_optimum(self.prior, u, reward_scale=config.circle_reward_scale,
                             kl_weight=config.circle_kl_weight) for u in self.eval_directions]
    self.optima = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *optima)
    self.optimal_reward = float(np.mean([
        config.circle_reward_scale * mixture2d.mixture_mean(q) @ u
        for q, u in zip(optima, self.eval_directions)]))
    self.eval_key = jax.random.fold_in(key, 4)
    # One object per task: finetune reuses its compiled rounds for every method's prompts.
    self.prompt_fn = self._prompts
    self.reward_fn = self._reward
    self.evaluate = self._evaluate

  def _prompts(self, key):
    # Bare conditions, no ids: PPO's tracker has no history for them (DDPO's unseen prompts).
    return _directions(jax.random.uniform(key, (self.config.prompts_per_round,), maxval=2 * jnp.pi))

  def _reward(self, x0, directions):
    return self.config.circle_reward_scale * tilt_reward(x0, directions)

  def _evaluate(self, params) -> dict:
    """Mean over held-out prompts of the squared MMD to each prompt's optimum, and their reward."""
    n = self.config.circle_eval_samples
    trajectory = sample(self.apply_fn, params, self.eval_directions, key=self.eval_key,
                        schedule=self.schedule, num_steps=self.sampling.num_steps,
                        eta=self.sampling.eta, samples_per_condition=n, shape=(2,))
    x0 = trajectory.x0.reshape(len(self.eval_directions), n, 2)  # conditions repeat contiguously
    distances = jax.vmap(lambda x, q: mixture2d.mixture_mmd(x, q))(x0, self.optima)
    rewards = self.config.circle_reward_scale * jnp.einsum("pnd,pd->pn", x0, self.eval_directions)
    return {"distance_to_optimum": jnp.mean(distances), "eval_reward": jnp.mean(rewards)}

  def finetune(self, method: str, *, rounds: int, learning_rate: float, clip_range: float):
    return finetune(self.apply_fn, _stack_seeds(self.params, self.num_seeds), self.reward_fn,
                    key=self.keys, method=method, rounds=rounds, schedule=self.schedule,
                    sampling=self.sampling, optimizer=_optimizer(learning_rate),
                    prompt_fn=self.prompt_fn, epochs=self.config.epochs,
                    minibatches=self.config.minibatches, clip_range=clip_range,
                    kl_weight=self.config.circle_kl_weight, evaluate=self.evaluate,
                    eval_every=self.config.eval_every)


def _many_prompt_curves(history: dict, eval_every: int) -> dict:
  rewards = np.asarray(history["reward"])
  return {**_curves(rewards, np.asarray(history["reward_queries"])),
          "approx_kl": np.asarray(history["approx_kl"]).mean(axis=1).tolist(),
          "clip_fraction": np.asarray(history["clip_fraction"]).mean(axis=1).tolist(),
          "last_rounds_reward_per_seed": _per_seed_last_rounds(rewards, eval_every).tolist()}


def _circle(task: _CircleTask, checkpoint: Checkpoint) -> dict:
  config = task.config
  batch = config.prompts_per_round * config.samples_per_prompt
  methods = {}
  for method in progress(MANY_PROMPT_METHODS, "circle (many prompts)"):
    cell = f"circle/{method}"
    if cell not in checkpoint:
      result = task.finetune(method, rounds=config.circle_rounds or config.mixture_rounds,
                             learning_rate=config.circle_learning_rate,
                             clip_range=config.many_prompts_clip_range)
      history = result.history
      distance = np.asarray(history["distance_to_optimum"])  # [evaluations, S]
      checkpoint.save(cell, {
          **_many_prompt_curves(history, config.eval_every),
          "distance_to_optimum": distance.mean(axis=1),
          "distance_ci": [seed_interval(row) for row in distance],
          "distance_queries": batch * config.eval_every * np.arange(distance.shape[0]),
          "final_distance_per_seed": distance[-1],
          "kl_to_reference": np.asarray(history["kl_to_reference"]).mean(axis=1),
          # Before training (the same pretrained model, prompts and keys for every method).
          "initial_eval": {"reward": float(np.mean(history["eval_reward"][0])),
                           "distance": float(distance[0].mean())}})
    methods[method] = checkpoint[cell]
  initial = methods[MANY_PROMPT_METHODS[0]]["initial_eval"]
  return {"task": "circle", "reward_scale": config.circle_reward_scale,
          "kl_weight": config.circle_kl_weight, "initial_reward": initial["reward"],
          "initial_distance_to_optimum": initial["distance"],
          "optimal_reward": task.optimal_reward, "pretrain_final_loss": task.pretrain_final_loss,
          "methods": methods, "claims": _many_prompt_claims(methods)}


def _many_prompt_claims(methods: dict) -> dict:
  """LOOP against each other method, seed by seed (seeds share prompts and keys across methods)."""
  per_seed = {m: np.asarray(c["last_rounds_reward_per_seed"]) for m, c in methods.items()}
  margins = {}
  for other in (m for m in methods if m != "loop"):
    difference = per_seed["loop"] - per_seed[other]
    interval = seed_interval(difference)
    margins[other] = {"mean": float(difference.mean()), "ci": interval,
                      "loop_higher": bool(interval[0] > 0) if len(difference) > 1 else None}
  last = {m: float(v.mean()) for m, v in per_seed.items()}
  worst = {m: float(v.min()) for m, v in per_seed.items()}
  return {"last_rounds_reward": last, "worst_seed_last_rounds_reward": worst,
          "loop_minus_other_last_rounds": margins,
          "loop_highest_last_rounds_reward": max(last, key=last.get) == "loop",
          "loop_highest_worst_seed": max(worst, key=worst.get) == "loop"}




def _classifier(config: Config, checkpoint: Checkpoint):
  """The digits classifier (trained once per config, then loaded from its checkpoint)."""
  data = digits_data.load_digits()
  return train_classifier(data.images, data.labels,
                          key=jax.random.fold_in(jax.random.key(config.seed), 2),
                          steps=config.classifier_steps,
                          checkpoint_path=checkpoint.path_for("digits_classifier"))


def _digits_ink(config: Config, checkpoint: Checkpoint) -> dict:
  schedule = linear_schedule(config.train_steps)
  data = digits_data.load_digits()
  key = jax.random.key(config.seed + 30)
  # ink(x): mean intensity rescaled so that the data's 5th and 95th percentiles are 0 and 1.
  intensities = np.asarray(digits_data.mean_intensity(data.images))
  low, high = (float(v) for v in np.percentile(intensities, [5, 95]))

  def ink(images):
    return (digits_data.mean_intensity(images) - low) / (high - low)

  rngs = nnx.Rngs(config.seed)
  features = 4 * config.channels  # ConvDenoiser's embedding width
  encoder = DictEncoder({"digit": ClassEncoder(10, features=features, rngs=rngs),
                         "ink": VectorEncoder(1, features=features, rngs=rngs)})
  model = ConvDenoiser(channels=config.channels, condition_encoder=encoder, rngs=rngs)
  pretrained = pretrain(model, data.images, {"digit": data.labels, "ink": ink(data.images)[:, None]},
                        key=jax.random.fold_in(key, 1), alphas_cumprod=schedule.alphas_cumprod,
                        steps=config.ink_pretrain_steps or config.pretrain_steps,
                        batch_size=config.pretrain_batch, learning_rate=2e-3,
                        checkpoint_path=checkpoint.path_for("digits_ink_denoiser"))
  classifier = _classifier(config, checkpoint)
  apply_fn, params = as_functional(model)
  lowest, highest = config.ink_targets

  def prompt_fn(prompt_key):
    digit_key, ink_key = jax.random.split(prompt_key)
    p = config.prompts_per_round
    return {"digit": jax.random.randint(digit_key, (p,), 0, 10),
            "ink": jax.random.uniform(ink_key, (p, 1), minval=lowest, maxval=highest)}

  def alignment(x0, conditions):
    return prompt_alignment_reward(classifier.apply_fn, classifier.params, x0, conditions["digit"])

  def ink_error(x0, conditions):
    return -(ink(x0) - conditions["ink"][:, 0]) ** 2

  reward_fn = combine_rewards({"alignment": alignment, "ink": ink_error},
                              {"alignment": 1.0, "ink": config.ink_weight})
  sampling = Sampling(shape=(8, 8, 1), prompts_per_round=config.prompts_per_round,
                      samples_per_prompt=config.samples_per_prompt, num_steps=config.sampling_steps)
  seeds = config.many_prompt_seeds or config.num_seeds
  keys = jax.random.split(jax.random.fold_in(key, 2), seeds)
  optimizer = _optimizer(config.ink_learning_rate)
  methods = {}
  for method in progress(MANY_PROMPT_METHODS, "digits x ink (many prompts)"):
    cell = f"digits_ink/{method}"
    if cell not in checkpoint:
      result = finetune(apply_fn, _stack_seeds(params, seeds), reward_fn, key=keys, method=method,
                        rounds=config.ink_rounds or config.rounds, schedule=schedule,
                        sampling=sampling, optimizer=optimizer, prompt_fn=prompt_fn, epochs=config.epochs,
                        minibatches=config.minibatches, clip_range=config.many_prompts_clip_range,
                        eval_every=config.eval_every)  # resumed per method by the cells
      history = result.history
      checkpoint.save(cell, {
          **_many_prompt_curves(history, config.eval_every),
          "alignment_mean": np.asarray(history["reward/alignment"]).mean(axis=1),
          "ink_squared_error_mean": -np.asarray(history["reward/ink"]).mean(axis=1)})
    methods[method] = checkpoint[cell]

  # The pretrained model on a round's worth of prompts, for every seed's first-round keys.
  def initial(seed_key):
    prompts = prompt_fn(seed_key)
    x0, conditions = _sample_x0(apply_fn, params, seed_key, schedule, sampling, prompts=prompts)
    parts = reward_fn.components(x0, conditions)
    return parts.total.mean(), parts.by_name["alignment"].mean(), -parts.by_name["ink"].mean()
  total, aligned, ink_squared_error = (float(v.mean()) for v in jax.vmap(initial)(keys))
  return {"task": "digits_ink", "initial_reward": total, "initial_alignment": aligned,
          "initial_ink_squared_error": ink_squared_error, "ink_weight": config.ink_weight,
          "ink_targets": list(config.ink_targets), "ink_scale": [low, high],
          "pretrain_from_cache": bool(pretrained.from_cache),
          "pretrain_final_loss": float(np.mean(pretrained.losses[-100:])),
          "methods": methods, "claims": _many_prompt_claims(methods)}


def _sweep(task: _CircleTask, checkpoint: Checkpoint) -> dict:
  """Every clip range x learning rate on the circle task, sweep_rounds rounds each."""
  config = task.config
  grid = [(m, lr, clip) for m in config.sweep_methods for lr in config.sweep_learning_rates
          for clip in config.sweep_clip_ranges]
  for method, learning_rate, clip_range in progress(grid, "circle sweep"):
    cell = f"sweep/{method}/{learning_rate:g}/{clip_range:g}"
    if cell not in checkpoint:
      history = task.finetune(method, rounds=config.sweep_rounds, learning_rate=learning_rate,
                              clip_range=clip_range).history
      checkpoint.save(cell, {
          "last_rounds_reward": float(np.mean(history["reward"][-config.eval_every:])),
          "approx_kl": float(np.mean(history["approx_kl"])),
          "max_approx_kl": float(np.max(np.mean(history["approx_kl"], axis=1))),
          "clip_fraction": float(np.mean(history["clip_fraction"])),
          "distance_to_optimum": float(np.mean(history["distance_to_optimum"][-1]))})
  fields = ("last_rounds_reward", "approx_kl", "max_approx_kl", "clip_fraction",
            "distance_to_optimum")
  methods = {}
  for method in config.sweep_methods:
    # [learning rate][clip range] tables, one per field.
    methods[method] = {field: [[checkpoint[f"sweep/{method}/{lr:g}/{clip:g}"][field]
                                for clip in config.sweep_clip_ranges]
                               for lr in config.sweep_learning_rates] for field in fields}
  return {"task": "circle", "rounds": config.sweep_rounds,
          "learning_rates": list(config.sweep_learning_rates),
          "clip_ranges": list(config.sweep_clip_ranges), "methods": methods}


def run(out: Path, config: Config = QUICK, *, many_prompts_only: bool = False) -> dict:
  """Runs every task and the sweep; writes DIR/results.json, loop.png, many_prompts.png,
  digits_samples.png and summary.md (with many_prompts_only: the many-prompt tasks and the sweep,
  many_prompts.png and their summary)."""
  out = Path(out)
  unknown = set(config.many_prompt_tasks) - {"circle", "digits_ink"}
  if unknown or "circle" not in config.many_prompt_tasks:
    raise ValueError(f"config.many_prompt_tasks: must hold 'circle' and optionally 'digits_ink', "
                     f"got {config.many_prompt_tasks!r}")
  checkpoint = Checkpoint(out, dataclasses.asdict(config))
  if many_prompts_only:
    results = {"config": dataclasses.asdict(config)}
  else:
    results = _digits(out, config, checkpoint)
    results["config"] = dataclasses.asdict(config)
    results["mixture2d"] = _mixture(out, config, checkpoint)
    results["claims"] = _claims(results)
  circle = _CircleTask(config, checkpoint)
  results["many_prompts"] = {"circle": _circle(circle, checkpoint)}
  if "digits_ink" in config.many_prompt_tasks:
    results["many_prompts"]["digits_ink"] = _digits_ink(config, checkpoint)
  results["many_prompts_sweep"] = _sweep(circle, checkpoint)
  if many_prompts_only:
    return finish(out, results, _plot_many_prompts, many_prompts_summary)
  return finish(out, results, _plot, summary)


def _last_rounds(curve: dict, config: dict) -> float:
  """The mean reward over the last `eval_every` rounds: one round's batch is too noisy to rank by."""
  return float(np.mean(curve["reward_mean"][-config["eval_every"]:]))


def _claims(results: dict) -> dict:
  last = {m: _last_rounds(results["methods"][m], results["config"]) for m in COMPARED}
  area = {m: float(np.mean(results["methods"][m]["reward_mean"])) for m in COMPARED}
  mixture = {m: results["mixture2d"]["methods"][m]["mmd_to_optimum"] for m in COMPARED}
  # Seeds share their keys across methods (the same prompts in round 0 and the same pretrained
  # model), so LOOP's margin over each method is compared seed by seed.
  per_seed = {m: np.asarray(results["methods"][m]["last_rounds_reward_per_seed"]) for m in COMPARED}
  margins = {}
  for other in ("reinforce", "ppo"):
    difference = per_seed["loop"] - per_seed[other]
    interval = seed_interval(difference)
    margins[other] = {"mean": float(difference.mean()), "ci": interval,
                      "loop_higher": bool(interval[0] > 0) if len(difference) > 1 else None}
  return {"last_rounds_reward": last, "mean_reward_over_rounds": area,
          "loop_minus_other_last_rounds": margins,
          "loop_highest_last_rounds_reward": max(last, key=last.get) == "loop",
          "loop_highest_mean_reward": max(area, key=area.get) == "loop",
          "any_method_above_pretrained": any(v > results["initial_reward"] for v in last.values()),
          "mixture_closest_to_optimum": min(mixture, key=mixture.get)}


def _plot(results: dict, out: Path) -> None:
  plt = pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
  for axis, task in ((left, results), (right, results["mixture2d"])):
    for method, curve in task["methods"].items():
      plot_curve(axis, curve["reward_queries"], curve["reward_mean"], curve["reward_ci"],
                 LABELS[method])
    axis.axhline(task["initial_reward"], color="gray", linestyle="--", label="pretrained")
    axis.set_xlabel("reward queries")
  left.set_ylabel("log p(prompt | x0)")
  left.set_title("digits: prompt alignment")
  right.axhline(results["mixture2d"]["optimal_reward"], color="black", linestyle=":",
                label="KL-regularised optimum")
  right.set_ylabel("a . x0")
  right.set_title("2-D mixture: tilt")
  left.legend(fontsize=7)
  right.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / "loop.png", dpi=120)
  plt.close(fig)
  _plot_many_prompts(results, out)


def _plot_many_prompts(results: dict, out: Path) -> None:
  """many_prompts.png: both tasks' rewards, the circle's distance, and the sweep's approx KL."""
  plt = pyplot()
  circle, ink = results["many_prompts"]["circle"], results["many_prompts"].get("digits_ink")
  sweep = results["many_prompts_sweep"]
  fig, axes = plt.subplots(1, 4, figsize=(19, 3.8))
  for axis, task in ((axes[0], circle), (axes[2], ink)):
    if task is None:
      axis.set_title("digits x ink: not run (quick mode)")
      continue
    for method, curve in task["methods"].items():
      plot_curve(axis, curve["reward_queries"], curve["reward_mean"], curve["reward_ci"],
                 LABELS[method])
    axis.axhline(task["initial_reward"], color="gray", linestyle="--", label="pretrained")
    axis.set_xlabel("reward queries")
  axes[0].axhline(circle["optimal_reward"], color="black", linestyle=":",
                  label="KL-regularised optimum")
  axes[0].set_title("circle: reward c u . x (a new u per prompt)")
  for method, curve in circle["methods"].items():
    plot_curve(axes[1], curve["distance_queries"], curve["distance_to_optimum"],
               curve["distance_ci"], LABELS[method], marker="o")
  axes[1].set_xlabel("reward queries")
  axes[1].set_title("circle: MMD^2 to each prompt's optimum")
  axes[2].set_title("digits x ink: log p(d | x0) - lambda (ink - s)^2")
  for method, table in sweep["methods"].items():
    kl = np.asarray(table["approx_kl"])  # [learning rate, clip range]
    for column, clip in enumerate(sweep["clip_ranges"]):
      axes[3].plot(sweep["learning_rates"], kl[:, column], marker="o",
                   label=f"{LABELS[method]}, clip {clip:g}")
  axes[3].axhspan(0.01, 0.05, color="green", alpha=0.1, label="0.01-0.05")
  axes[3].set_xscale("log")
  axes[3].set_yscale("log")
  axes[3].set_xlabel("learning rate")
  axes[3].set_title(f"circle sweep: approx KL per update ({sweep['rounds']} rounds)")
  for axis in axes:
    axis.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(out / "many_prompts.png", dpi=120)
  plt.close(fig)


def summary(results: dict) -> str:
  config = results["config"]
  batch = config["prompts_per_round"] * config["samples_per_prompt"]
  rows = []
  for method, curve in results["methods"].items():
    rows.append([LABELS[method], f"{results['claims']['last_rounds_reward'][method]:.3f}",
                 f"{results['claims']['mean_reward_over_rounds'][method]:.3f}",
                 f"{curve['mean_approx_kl']:.2e}", f"{curve['mean_clip_fraction']:.3f}"])
  mixture = results["mixture2d"]
  mixture_rows = [[LABELS[m], f"{c['reward_mean'][-1]:.3f}",
                   f"{c['mmd_to_optimum']:.4f} [{c['mmd_to_optimum_ci'][0]:.4f}, "
                   f"{c['mmd_to_optimum_ci'][1]:.4f}]"] for m, c in mixture["methods"].items()]
  claims = results["claims"]
  return (f"## Diffusion fine-tuning ({config['num_seeds']} seeds, {config['rounds']} rounds of "
          f"{batch} reward queries, K = {config['samples_per_prompt']})\n\n"
          f"Digits, reward log p(prompt | x0); pretrained model {results['initial_reward']:.3f}.\n\n"
          + markdown_table(["method", f"reward, last {config['eval_every']} rounds",
                            "mean over rounds", "approx KL", "clip fraction"], rows)
          + f"\n\nLOOP has the highest reward over the last rounds: "
          f"{claims['loop_highest_last_rounds_reward']}; the highest mean over rounds: "
          f"{claims['loop_highest_mean_reward']}. Some method ends above the pretrained model: "
          f"{claims['any_method_above_pretrained']}.\n\n"
          + "".join(f"LOOP minus {LABELS[other]}, per seed: {m['mean']:+.3f} (95% CI "
                    f"[{m['ci'][0]:+.3f}, {m['ci'][1]:+.3f}]).\n"
                    for other, m in claims["loop_minus_other_last_rounds"].items()) + "\n"
          f"2-D mixture, reward a . x with a = {tuple(mixture['tilt'])}, KL weight "
          f"{mixture['kl_weight']:g}: pretrained reward {mixture['initial_reward']:.3f}, optimum "
          f"{mixture['optimal_reward']:.3f}; squared MMD to the optimum, pretrained "
          f"{mixture['initial_mmd_to_optimum']:.4f}.\n\n"
          + markdown_table(["method", "final reward", "MMD^2 to the optimum (95% CI)"],
                           mixture_rows)
          + f"\n\nClosest to the optimum: {LABELS[claims['mixture_closest_to_optimum']]}.\n\n"
          + many_prompts_summary(results))


def many_prompts_summary(results: dict) -> str:
  """The many-prompt tasks and the sweep as markdown (the tables of docs/results.md)."""
  config = results["config"]
  circle, ink = results["many_prompts"]["circle"], results["many_prompts"].get("digits_ink")
  seeds = config["many_prompt_seeds"] or config["num_seeds"]
  parts = [f"### Many prompts, each seen once (LOOP's regime; {seeds} seeds, "
           f"{config['prompts_per_round']} prompts x K = {config['samples_per_prompt']} per round; "
           "PPO's tracker never sees a prompt twice, so it standardises by the batch's "
           "statistics)\n"]
  for name, task in (("circle", circle), ("digits x ink", ink)):
    if task is None:
      parts.append("digits x ink: not run (quick mode runs the circle task only).\n")
      continue
    claims = task["claims"]
    rows = []
    for method, curve in task["methods"].items():
      per_seed = ", ".join(f"{v:.3f}" for v in curve["last_rounds_reward_per_seed"])
      row = [LABELS[method], f"{claims['last_rounds_reward'][method]:.3f}", per_seed,
             f"{claims['worst_seed_last_rounds_reward'][method]:.3f}",
             f"{np.mean(curve['approx_kl']):.3g}", f"{np.mean(curve['clip_fraction']):.3f}"]
      if "distance_to_optimum" in curve:
        row.append(f"{curve['distance_to_optimum'][-1]:.4f} [{curve['distance_ci'][-1][0]:.4f}, "
                   f"{curve['distance_ci'][-1][1]:.4f}]")
      rows.append(row)
    headers = ["method", f"reward, last {config['eval_every']} rounds", "per seed", "worst seed",
               "approx KL", "clip fraction"]
    if name == "circle":
      headers.append("MMD^2 to the optimum (95% CI)")
    parts.append(f"{name}: pretrained reward {task['initial_reward']:.3f}"
                 + (f", optimum {task['optimal_reward']:.3f}, pretrained MMD^2 "
                    f"{task['initial_distance_to_optimum']:.4f}" if name == "circle" else "")
                 + ".\n\n" + markdown_table(headers, rows) + "\n\n"
                 + "".join(f"LOOP minus {LABELS[other]}, per seed: {m['mean']:+.3f} (95% CI "
                           f"[{m['ci'][0]:+.3f}, {m['ci'][1]:+.3f}]).\n"
                           for other, m in claims["loop_minus_other_last_rounds"].items()))
  sweep = results["many_prompts_sweep"]
  for method, table in sweep["methods"].items():
    rows = [[f"{lr:g}"] + [f"{table['last_rounds_reward'][i][j]:.3f} / "
                           f"{table['approx_kl'][i][j]:.3g} / {table['clip_fraction'][i][j]:.2f}"
                           for j in range(len(sweep["clip_ranges"]))]
            for i, lr in enumerate(sweep["learning_rates"])]
    parts.append(f"Sweep, {LABELS[method]} on the circle task ({sweep['rounds']} rounds): reward / "
                 "approx KL per update / clip fraction.\n\n"
                 + markdown_table(["learning rate"] + [f"clip {c:g}" for c in sweep["clip_ranges"]],
                                  rows) + "\n")
  return "\n".join(parts)
