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

References:
  [LOOP] Gupta et al. A Simple and Effective Reinforcement Learning Method for Text-to-Image
  Diffusion Models. 2025. https://arxiv.org/abs/2503.00897
  [DDPO] Black, Janner, Du, Kostrikov, Levine. Training Diffusion Models with Reinforcement
  Learning. ICLR 2024. https://arxiv.org/abs/2305.13301
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from saferl_jax import stats
from saferl_jax.data import digits as digits_data
from saferl_jax.data import mixture2d
from saferl_jax.models.denoisers import ConvDenoiser, MLPDenoiser
from saferl_jax.training.finetuning import METHODS, Sampling, finetune
from saferl_jax.training.pretraining import pretrain
from saferl_jax.diffusion.rewards import prompt_alignment_reward
from saferl_jax.training.classifier import train_classifier
from saferl_jax.diffusion.sampler import sample
from saferl_jax.diffusion.schedules import linear_schedule
from saferl_jax.experiments.common import (Checkpoint, finish, markdown_table, plot_curve,
                                           progress, pyplot)
from saferl_jax.models.functional import as_functional

LABELS = {"reinforce": "REINFORCE (LOO baseline)", "ppo": "PPO (DDPO-IS)", "loop": "LOOP"}


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
  seed: int = 0


QUICK = Config()
# The same digits model and reward for longer, over more seeds. A larger model (32 channels,
# 10,000 pretraining steps, 20 steps) starts at a reward of -0.05, where no method has room to
# differ.
FULL = Config(rounds=200, num_seeds=5, mixture_pretrain_steps=10_000, mixture_rounds=100)


def _optimizer(learning_rate: float) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate))


def _ci(values: np.ndarray) -> list[float]:
  if len(values) < 2:
    return [float(values.mean())] * 2
  interval = stats.confidence_interval(values, method="t")
  return [float(interval.lower), float(interval.upper)]


def _curves(rewards: np.ndarray, queries: np.ndarray) -> dict:
  """rewards [rounds, S] -> mean and CI per round, against cumulative reward queries."""
  return {"reward_queries": queries.tolist(), "reward_mean": rewards.mean(axis=1).tolist(),
          "reward_ci": [_ci(row) for row in rewards]}


def _digits(out: Path, config: Config, checkpoint: Checkpoint) -> dict:
  schedule = linear_schedule(config.train_steps)
  data = digits_data.load_digits()
  key = jax.random.key(config.seed)
  model = ConvDenoiser(channels=config.channels, rngs=nnx.Rngs(config.seed))
  pretrained = pretrain(model, data.images, data.labels, key=jax.random.fold_in(key, 1),
                        alphas_cumprod=schedule.alphas_cumprod, steps=config.pretrain_steps,
                        batch_size=config.pretrain_batch, learning_rate=2e-3,
                        checkpoint_path=checkpoint.path_for("digits_denoiser"))
  classifier = train_classifier(data.images, data.labels, key=jax.random.fold_in(key, 2),
                                steps=config.classifier_steps,
                                checkpoint_path=checkpoint.path_for("digits_classifier"))
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
  for method in progress(METHODS, "digits fine-tuning"):
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
  for method in METHODS:
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
  for method in METHODS:
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
                       "mmd_to_optimum": float(mmd.mean()), "mmd_to_optimum_ci": _ci(mmd)}
  initial_mmd = np.asarray(jax.vmap(distance)(seed_params, keys))
  return {"task": "mixture2d", "tilt": list(config.tilt), "kl_weight": config.kl_weight,
          "optimal_reward": float(mixture2d.mixture_mean(target) @ direction),
          "initial_reward": float(mixture2d.mixture_mean(prior) @ direction),
          "initial_mmd_to_optimum": float(initial_mmd.mean()), "methods": methods}


def run(out: Path, config: Config = QUICK) -> dict:
  """Runs both tasks, writes DIR/results.json, loop.png, digits_samples.png and summary.md."""
  out = Path(out)
  checkpoint = Checkpoint(out, dataclasses.asdict(config))
  results = _digits(out, config, checkpoint)
  results["config"] = dataclasses.asdict(config)
  results["mixture2d"] = _mixture(out, config, checkpoint)
  results["claims"] = _claims(results)
  return finish(out, results, _plot, summary)


def _last_rounds(curve: dict, config: dict) -> float:
  """The mean reward over the last `eval_every` rounds: one round's batch is too noisy to rank by."""
  return float(np.mean(curve["reward_mean"][-config["eval_every"]:]))


def _claims(results: dict) -> dict:
  last = {m: _last_rounds(results["methods"][m], results["config"]) for m in METHODS}
  area = {m: float(np.mean(results["methods"][m]["reward_mean"])) for m in METHODS}
  mixture = {m: results["mixture2d"]["methods"][m]["mmd_to_optimum"] for m in METHODS}
  # Seeds share their keys across methods (the same prompts in round 0 and the same pretrained
  # model), so LOOP's margin over each method is compared seed by seed.
  per_seed = {m: np.asarray(results["methods"][m]["last_rounds_reward_per_seed"]) for m in METHODS}
  margins = {}
  for other in ("reinforce", "ppo"):
    difference = per_seed["loop"] - per_seed[other]
    interval = _ci(difference)
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
          + f"\n\nClosest to the optimum: {LABELS[claims['mixture_closest_to_optimum']]}.\n")
