# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Fine-tuning a diffusion model on a reward with LOOP
#
# A diffusion sampler is a policy: each denoising step x_t -> x_t' is a Gaussian action whose
# log-probability we can compute, and the reward arrives at the end. We pretrain a small
# class-conditional model on scikit-learn's 8x8 digits, score its samples with a classifier
# (log p(prompted class | x_0): does the image show the digit we asked for?), and fine-tune it
# with LOOP: K samples per prompt, the leave-one-out baseline, inside PPO's clipped objective.
# `SAFERL_JAX_NOTEBOOK_QUICK=1` shrinks the run.

# %%
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from saferl_jax.data.digits import load_digits
from saferl_jax.models.denoisers import ConvDenoiser
from saferl_jax.training.finetuning import Sampling, finetune
from saferl_jax.diffusion.losses import loop_advantages
from saferl_jax.training.pretraining import pretrain
from saferl_jax.diffusion.rewards import compressibility_reward, prompt_alignment_reward
from saferl_jax.training.classifier import train_classifier
from saferl_jax.diffusion.sampler import sample
from saferl_jax.diffusion.schedules import linear_schedule
from saferl_jax.experiments.common import pyplot
from saferl_jax.models.functional import as_functional

QUICK = bool(os.environ.get("SAFERL_JAX_NOTEBOOK_QUICK"))

# %% [markdown]
# ## 1. Pretraining, and the reward
#
# The denoiser predicts the noise eps from (x_t, t, class); 10% of the time the class is replaced
# by a null token, which makes classifier-free guidance possible. Training is checkpointed: running
# this cell again loads the finished run, and another configuration (here, QUICK or not) trains
# beside it rather than reusing or overwriting it.

# %%
schedule = linear_schedule(1000)
digits = load_digits()
model = ConvDenoiser(channels=8 if QUICK else 16, rngs=nnx.Rngs(0))
pretrained = pretrain(model, digits.images, digits.labels, key=jax.random.key(1),
                      alphas_cumprod=schedule.alphas_cumprod, steps=100 if QUICK else 1000,
                      batch_size=128, learning_rate=2e-3,
                      checkpoint_path="checkpoints/notebook_denoiser", checkpoint_mismatch="new")
print(f"pretraining loss {pretrained.losses[:50].mean():.3f} -> {pretrained.losses[-50:].mean():.3f}"
      f" (loaded from its checkpoint: {pretrained.from_cache})")
classifier = train_classifier(digits.images, digits.labels, key=jax.random.key(2),
                              steps=100 if QUICK else 600, checkpoint_path="checkpoints/notebook_classifier",
                              checkpoint_mismatch="new")
apply_fn, params = as_functional(model)


def reward_fn(x0, prompts):
  return prompt_alignment_reward(classifier.apply_fn, classifier.params, x0, prompts)

# %% [markdown]
# ## 2. Sampling with log-probabilities
#
# `sample` runs the DDIM steps in one `lax.scan` and returns every state and every step's
# Gaussian log-density. Four samples for each of the prompts 3 and 7, and their rewards and
# leave-one-out advantages: within each prompt, A_i = r_i - mean of the other three.

# %%
steps = 4 if QUICK else 10
trajectory = sample(apply_fn, params, jnp.array([3, 7]), key=jax.random.key(3), schedule=schedule,
                    num_steps=steps, eta=1.0, samples_per_condition=4, shape=(8, 8, 1))
rewards = reward_fn(trajectory.x0, trajectory.conditions)
print("log-probs per step and sample:", trajectory.log_probs.shape)
print("rewards:   ", np.round(np.asarray(rewards), 2))
print("advantages:", np.round(np.asarray(loop_advantages(rewards, samples_per_condition=4)), 2))

# %% [markdown]
# ## 3. Fine-tuning with LOOP
#
# Each round draws 8 prompts with 4 samples each (32 reward queries), then takes PPO steps on
# the clipped objective with the leave-one-out advantages. The reward of the sampled batch is
# recorded before each round's update.

# %%
sampling = Sampling(shape=(8, 8, 1), num_classes=10, prompts_per_round=8, samples_per_prompt=4,
                    num_steps=steps)
result = finetune(apply_fn, params, reward_fn, key=jax.random.key(4), method="loop",
                  rounds=4 if QUICK else 30, eval_every=2 if QUICK else 10, schedule=schedule,
                  sampling=sampling, optimizer=optax.chain(optax.clip_by_global_norm(1.0),
                                                           optax.adam(2e-4)))
curve = result.history["reward"]
print(f"reward of the first round {curve[0]:.3f}, of the last {curve[-1]:.3f} "
      f"after {result.history['reward_queries'][-1]} reward queries")
print(f"approx KL per update {result.history['approx_kl'].mean():.2e}, "
      f"clip fraction {result.history['clip_fraction'].mean():.3f}")

# %% [markdown]
# ## 4. The images, before and after
#
# One sample per digit from the same noise, with the pretrained and the fine-tuned parameters.

# %%
plt = pyplot()
fig, axes = plt.subplots(2, 10, figsize=(10, 2.4))
for row, (name, p) in enumerate((("pretrained", params), ("LOOP", result.params))):
  images = sample(apply_fn, p, jnp.arange(10), key=jax.random.key(5), schedule=schedule,
                  num_steps=steps, eta=1.0, shape=(8, 8, 1)).x0
  for column in range(10):
    axes[row, column].imshow(np.asarray(images[column, ..., 0]), cmap="gray_r", vmin=-1, vmax=1)
    axes[row, column].set_xticks([])
    axes[row, column].set_yticks([])
  axes[row, 0].set_ylabel(name, fontsize=8)
fig.tight_layout()
fig.savefig("loop_samples.png", dpi=100)
print("saved loop_samples.png")

# %% [markdown]
# ## 5. A black-box reward
#
# Policy gradients need only the reward's values. `compressibility_reward` runs zlib on the host
# (through `jax.pure_callback`, so it has no gradient at all) and returns minus the compressed
# bytes per pixel: the same loop raises it.

# %%
def compressibility(x0, prompts):
  del prompts
  return compressibility_reward(x0)


compressed = finetune(apply_fn, params, compressibility, key=jax.random.key(6), method="loop",
                      rounds=2 if QUICK else 20, eval_every=2 if QUICK else 10, schedule=schedule,
                      sampling=sampling, optimizer=optax.chain(optax.clip_by_global_norm(1.0),
                                                               optax.adam(2e-4)))
curve = compressed.history["reward"]
print(f"compressibility of the first round {curve[0]:.3f}, of the last {curve[-1]:.3f}")

# %% [markdown]
# `saferl-jax loop --quick --out DIR` compares LOOP with REINFORCE and PPO (DDPO-IS) at equal
# reward queries over several seeds, and adds the 2-D task whose KL-regularised optimum is known.
#
# References: [LOOP] Gupta et al. 2025, https://arxiv.org/abs/2503.00897; [DDPO] Black et al.,
# ICLR 2024, https://arxiv.org/abs/2305.13301.
