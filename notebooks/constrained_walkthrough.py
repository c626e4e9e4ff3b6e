# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Constrained fine-tuning of a diffusion model, with the exact answer to check against
#
# Maximise one reward while another must stay above a threshold:
#
#   max_p E_p[r_0] - beta KL(p || p_ref)   subject to   E_p[r_1] >= b.
#
# Primal-dual training alternates a policy-gradient step on the Lagrangian reward
# r_0 + lambda (r_1 - b) with a dual step lambda <- max(0, lambda - eta (rbar_1 - b)) from the same
# samples. On a 2-D Gaussian mixture with linear rewards r_i(x) = a_i . x, the optimum is the prior
# tilted by exp((a_0 + lambda* a_1) . x / beta), and lambda* minimises a convex dual in closed form:
# we can watch the learned multiplier find it. `SAFERL_JAX_NOTEBOOK_QUICK=1` shrinks the run.

# %%
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from saferl_jax import constrained
from saferl_jax.data import mixture2d
from saferl_jax.diffusion.sampler import sample
from saferl_jax.diffusion.schedules import linear_schedule
from saferl_jax.experiments.common import pyplot
from saferl_jax.models.denoisers import MLPDenoiser
from saferl_jax.models.functional import as_functional
from saferl_jax.training.finetuning import Constraints, Sampling, finetune
from saferl_jax.training.pretraining import pretrain

QUICK = bool(os.environ.get("SAFERL_JAX_NOTEBOOK_QUICK"))


def rounded(values, digits: int = 3) -> list[float]:
  return [round(float(v), digits) for v in np.ravel(np.asarray(values))]

# %% [markdown]
# ## 1. The prior, the problem and its exact solution
#
# The prior has four modes with weights 0.4, 0.3, 0.2, 0.1. We ask for as much x_1 as possible
# (a_0 = (1, 0)) while the mean of x_2 stays at least b = 0.5 (a_1 = (0, 1)): the prior's mean of
# x_2 is below that, so the constraint binds and lambda* > 0.

# %%
prior = mixture2d.default_mixture()
primary_direction = jnp.array([1.0, 0.0])
constraint_directions = jnp.array([[0.0, 1.0]])
thresholds = jnp.array([0.5])
kl_weight = 1.0
optimum = mixture2d.constrained_optimum(prior, primary_direction=primary_direction,
                                        constraint_directions=constraint_directions,
                                        thresholds=thresholds, kl_weight=kl_weight)
exact_multiplier = float(optimum.multipliers[0])
print(f"prior mean {rounded(mixture2d.mixture_mean(prior))}; lambda* = {exact_multiplier:.3f}; "
      f"optimum's mean {rounded(mixture2d.mixture_mean(optimum.tilted))}")

# %% [markdown]
# ## 2. Pretraining a denoiser on the prior
#
# Checkpointed: running the cell again loads the finished run.

# %%
schedule = linear_schedule(100 if QUICK else 1000)
points = mixture2d.sample_mixture(prior, key=jax.random.key(0), num_samples=20_000)
model = MLPDenoiser(2, num_classes=1, hidden=(64, 64) if QUICK else (128, 128, 128),
                    rngs=nnx.Rngs(0))
pretrained = pretrain(model, points, None, key=jax.random.key(1),
                      alphas_cumprod=schedule.alphas_cumprod, steps=300 if QUICK else 3000,
                      batch_size=256, learning_rate=2e-3,
                      checkpoint_path="checkpoints/constrained_denoiser", checkpoint_mismatch="new")
conditional_apply, params = as_functional(model)


def apply_fn(params, x, t, conditions):
  # Pretrained without conditions, the model knows only its null token (1): every sample uses it.
  return conditional_apply(params, x, t, jnp.ones_like(conditions))


print(f"pretraining loss {pretrained.losses[:50].mean():.3f} -> {pretrained.losses[-50:].mean():.3f}")

# %% [markdown]
# ## 3. Primal-dual fine-tuning
#
# `finetune(constraints=...)` takes the constraint rewards, their thresholds and a dual optimizer
# (`dual_descent`, or the damped `nu_pi`). reward_fn is the primary reward. The multiplier lives in
# the training state: it is vmapped over seeds, checkpointed and resumed with the parameters.

# %%
num_seeds = 2 if QUICK else 4
rounds = 10 if QUICK else 60
sampling = Sampling(shape=(2,), num_classes=1, prompts_per_round=8, samples_per_prompt=4,
                    num_steps=5 if QUICK else 10)


def primary(x0, conditions):
  return x0 @ primary_direction


def up(x0, conditions):
  return x0 @ constraint_directions[0]


constraints = Constraints(rewards={"up": up}, thresholds={"up": float(thresholds[0])},
                          dual_optimizer=constrained.dual_descent(0.5))
seed_params = jax.tree_util.tree_map(lambda x: jnp.stack([x] * num_seeds), params)
keys = jax.random.split(jax.random.key(2), num_seeds)
result = finetune(apply_fn, seed_params, primary, key=keys, method="reinforce", rounds=rounds,
                  eval_every=5, schedule=schedule, sampling=sampling,
                  optimizer=optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
                  kl_weight=kl_weight, constraints=constraints,
                  checkpoint_path="checkpoints/constrained_finetune", checkpoint_mismatch="new")
history = result.history
print("lambda per round (mean over seeds):", rounded(history["lambda/up"].mean(1), 2))
print("slack per round:", rounded(history["slack/up"].mean(1), 2))

# %% [markdown]
# ## 4. Against the exact answer
#
# The multiplier per round against lambda*, the slack against 0, and the final samples against the
# tilted optimum (MMD^2, unbiased: near 0 means the same distribution).

# %%
def final_samples(params, key):
  trajectory = sample(apply_fn, params, jnp.zeros((1,), jnp.int32), key=key, schedule=schedule,
                      num_steps=sampling.num_steps, eta=1.0, samples_per_condition=1000,
                      shape=(2,))
  return trajectory.x0


samples = jax.vmap(final_samples)(result.params, keys)
pretrained_samples = final_samples(params, jax.random.key(3))
mmd = [float(mixture2d.mixture_mmd(s, optimum.tilted)) for s in samples]
print(f"MMD^2 to the optimum: pretrained {float(mixture2d.mixture_mmd(pretrained_samples, optimum.tilted)):.4f}, "
      f"fine-tuned per seed {rounded(mmd, 4)}")
print(f"final mean of x_2 per seed: {rounded(samples[..., 1].mean(-1))} (b = 0.5)")

plt = pyplot()
fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
axes[0].plot(history["lambda/up"])
axes[0].axhline(exact_multiplier, color="black", linestyle="--", label="lambda*")
axes[0].set_title("multiplier per round")
axes[0].legend()
axes[1].plot(history["slack/up"])
axes[1].axhline(0.0, color="black")
axes[1].set_title("slack E[a_1 . x] - b")
optimum_points = mixture2d.sample_mixture(optimum.tilted, key=jax.random.key(4), num_samples=1000)
axes[2].scatter(*np.asarray(optimum_points).T, s=2, alpha=0.3, label="exact optimum")
axes[2].scatter(*np.asarray(samples[0]).T, s=2, alpha=0.3, label="fine-tuned (seed 0)")
axes[2].legend(markerscale=5)
fig.tight_layout()
fig.savefig("constrained_walkthrough.png", dpi=100)

# %% [markdown]
# ## 5. The same tilt for a finite action set
#
# For a bandit the Lagrangian's maximiser is a closed-form tilt of the reference policy,
# pi_lambda(a|x) ∝ pi_ref(a|x) exp((q_0 + lambda q_1)(x, a) / beta), and lambda* minimises the
# dual `tilt_dual` (`minimize_dual`, projected Newton steps).

# %%
key_q0, key_q1 = jax.random.split(jax.random.key(5))
reference = jnp.full((20, 5), jnp.log(0.2))        # 20 contexts, 5 actions, uniform reference
q0 = jax.random.uniform(key_q0, (20, 5))
q1 = jax.random.uniform(key_q1, (20, 5, 1))
b = jnp.array([0.7])
dual = lambda lam: constrained.tilt_dual(reference, q0, q1, lam, thresholds=b, kl_weight=0.1)
lam_star = constrained.minimize_dual(dual, jnp.zeros(1))
policy = jnp.exp(constrained.tilted_log_policy(reference, q0, q1, lam_star, kl_weight=0.1))
print(f"lambda* = {float(lam_star[0]):.3f}; E[q_1] under the tilt = "
      f"{float(jnp.mean(jnp.sum(policy * q1[..., 0], -1))):.4f} (b = 0.7); "
      f"E[q_0] = {float(jnp.mean(jnp.sum(policy * q0, -1))):.4f}")
