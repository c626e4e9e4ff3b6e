"""Pretraining a denoiser with DDPM's epsilon loss and label dropout, cached on disk (floor 3).

The loss of one minibatch is DDPM's with classifier-free label dropout,
`saferl_jax.diffusion.epsilon_loss` (floor 1), or, given a `FlowSchedule`, the rectified flow's
velocity loss `saferl_jax.diffusion.flow.flow_matching_loss`.

`pretrain` minimises it with Adam (gradients clipped to global norm 1, the learning rate decayed
by a cosine to a tenth over the run), minibatches drawn with replacement, through the one
training driver (`saferl_jax.training.driver`): jit-compiled `lax.scan` chunks of CHUNK_STEPS,
compiled once per model structure and batch size (the run length, learning rate and dropout are
traced data, so changing them does not recompile). Step s uses the key fold_in(key, s), so a run
is a deterministic function of its configuration. With `checkpoint_path` the run is
checkpointed every chunk under the fingerprint of everything that determines it (model class,
parameter shapes and initial values, data, schedule, key, steps, batch size, learning rate,
label dropout, optimizer); a finished checkpoint is loaded instead of training.

References:
  [DDPM] Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020.
  https://arxiv.org/abs/2006.11239
  [CFG] Ho, Salimans. Classifier-Free Diffusion Guidance. 2022. https://arxiv.org/abs/2207.12598
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.diffusion import conditions as conds
from saferl_jax.diffusion.flow import FlowSchedule, check_flow_schedule, flow_matching_loss
from saferl_jax.diffusion.losses import check_probability, epsilon_loss
from saferl_jax.diffusion.schedules import NoiseSchedule, check_schedule
from saferl_jax.training import driver

CHUNK_STEPS = 100  # optimisation steps per compiled chunk (one progress tick, one checkpoint)
# Part of the checkpoint fingerprint: change it whenever the optimiser or the loss changes.
OPTIMIZER = "adam, clip_by_global_norm(1), cosine decay to 0.1 lr; batches with replacement; v1"


class PretrainResult(NamedTuple):
  """Pretrained parameters and how they were obtained.

  Attributes:
    params: the trained `nnx.State` (the model passed to `pretrain` holds it too).
    losses: [steps] float32 minibatch losses, one per optimisation step.
    from_cache: True when a finished checkpoint at `checkpoint_path` was loaded without training.
  """
  params: Any
  losses: np.ndarray
  from_cache: bool


def _optimizer(learning_rate, steps) -> optax.GradientTransformation:
  """Adam after clipping to global norm 1; lr(s) = lr (0.1 + 0.9 (1 + cos(pi min(s, steps) / steps)) / 2).

  The schedule is written out (not optax.cosine_decay_schedule) so that `learning_rate` and
  `steps` may be traced values: one compilation serves every run length and learning rate.
  """
  def schedule(count):
    progress = jnp.minimum(count, steps) / steps
    return learning_rate * (0.1 + 0.9 * 0.5 * (1 + jnp.cos(jnp.pi * progress)))
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def _step(state: driver.TrainState, data: tuple, key: jax.Array, step: jax.Array, *, graphdef,
          batch_size: int):
  """One optimisation step; data = (images, conditions, null_condition, schedule (a NoiseSchedule
  or a FlowSchedule), learning_rate, steps, label_dropout), shared and traced so one compilation
  serves every run length and rate."""
  (images, conditions, null_condition, schedule, learning_rate, total_steps,
   label_dropout) = data
  optimizer = _optimizer(learning_rate, total_steps)

  def apply_fn(params, *inputs):
    return nnx.merge(graphdef, params)(*inputs)

  batch_key, loss_key = jax.random.split(jax.random.fold_in(key, step))
  indices = jax.random.randint(batch_key, (batch_size,), 0, images.shape[0])
  batch = images[indices], conds.take(conditions, indices)

  def loss_fn(params):
    if isinstance(schedule, FlowSchedule):
      return flow_matching_loss(apply_fn, params, *batch, key=loss_key,
                                time_scale=schedule.time_scale, label_dropout=label_dropout,
                                null_condition=null_condition)
    return epsilon_loss(apply_fn, params, *batch, key=loss_key,
                        alphas_cumprod=schedule.alphas_cumprod, label_dropout=label_dropout,
                        null_condition=null_condition)
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  return driver.TrainState(optax.apply_updates(state.params, updates), opt_state), {"loss": loss}


def _parameter_shapes(params) -> list:
  return [[jax.tree_util.keystr(path), list(np.shape(leaf)), str(np.asarray(leaf).dtype)]
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]]


def pretrain(model: nnx.Module, images: ArrayLike, conditions: Any = None, *,
             key: jax.Array, alphas_cumprod: ArrayLike | None = None,
             schedule: NoiseSchedule | FlowSchedule | None = None, steps: int, batch_size: int,
             learning_rate: float, label_dropout: float = 0.1,
             checkpoint_path: str | Path | None = None,
             checkpoint_mismatch: str = "error") -> PretrainResult:
  """Trains a denoiser on (images, conditions) with `epsilon_loss` (or a flow with `flow_matching_loss`), or loads it.

  The model is updated in place (nnx.update) and its parameters returned. Its class, parameter
  shapes and initial values are part of the checkpoint's fingerprint, so build it from a fixed
  seed.

  Args:
    model: a denoiser (`MLPDenoiser`, `ConvDenoiser`) with a `null_condition()` method (for a
      class-id model, its `num_classes`).
    images: [N, *shape] training samples (images or 2-D points).
    conditions: each sample's condition, an array [N, ...] or a pytree of them: int classes in
      [0, num_classes) for a class-id model, vectors or embeddings for other condition encoders;
      None trains an unconditional model (every condition is the null condition, label dropout is
      moot).
    key: PRNG key for the minibatches, timesteps, noise and dropout.
    alphas_cumprod: [T] alphabar_t of the training schedule (DDPM's epsilon loss).
    schedule: instead of alphas_cumprod, a `NoiseSchedule` (the same), or a `FlowSchedule`: the
      model is then a rectified flow's velocity, trained with `flow_matching_loss` (its time
      input t * schedule.time_scale).
    steps: optimisation steps, >= 1.
    batch_size: minibatch size, in [1, N].
    learning_rate: Adam's initial learning rate (cosine-decayed to a tenth).
    label_dropout: probability of the null condition for each example, in [0, 1].
    checkpoint_path: an orbax checkpoint directory, written every CHUNK_STEPS steps; a finished
      checkpoint of this very configuration is loaded without training, an unfinished one
      resumed, another configuration's refused with a ValueError naming what differs.
    checkpoint_mismatch: "error", or "new" to checkpoint beside another run's checkpoint.

  Returns:
    A `PretrainResult` (params, per-step losses, from_cache).
  """
  checks.check_count("steps", steps)
  checks.check_count("batch_size", batch_size)
  checks.check_real("learning_rate", learning_rate, low=0.0, open_low=True)
  checks.check_real("label_dropout", label_dropout, low=0.0, high=1.0)
  check_probability("label_dropout", label_dropout)
  checks.check_choice("checkpoint_mismatch", checkpoint_mismatch, driver.CHECKPOINT_MISMATCH)
  driver.check_seed_keys(key)
  if key.ndim:
    raise ValueError(f"key: expected one key, got shape {key.shape}")
  if not callable(getattr(model, "null_condition", None)):
    raise ValueError("model: must have a null_condition() method (the condition of 'no "
                     "condition'), as the denoisers of saferl_jax.models.denoisers do")
  null = model.null_condition()
  images = checks.as_float("images", images)
  if images.ndim < 2:
    raise ValueError(f"images: expected [N, *shape], got shape {images.shape}")
  n = images.shape[0]
  checks.check_finite("images", images)
  if conditions is None:
    conditions = conds.broadcast_null(null, n)
  else:
    conditions = conds.check("conditions", conditions)
    if conds.batch_size("conditions", conditions) != n:
      raise ValueError(f"conditions: expected a leading axis of N={n} samples, got "
                       f"{conds.batch_size('conditions', conditions)}")
    if model.num_classes is not None:
      checks.check_indices("conditions", checks.as_int("conditions", conditions), model.num_classes,
                           what="class")
  null = conds.check_null("model.null_condition()", null, conditions)
  batch_size = driver.check_batch_size("batch_size", batch_size, n)
  if (alphas_cumprod is None) == (schedule is None):
    raise ValueError("schedule: give either alphas_cumprod (or a NoiseSchedule) for DDPM's loss, or "
                     "a FlowSchedule for flow matching, not both or neither")
  if schedule is None:
    schedule = NoiseSchedule(checks.as_float("alphas_cumprod", alphas_cumprod))
    check_schedule(schedule, name="alphas_cumprod")
  elif isinstance(schedule, FlowSchedule):
    check_flow_schedule(schedule)
  elif isinstance(schedule, NoiseSchedule):
    check_schedule(schedule)
  else:
    raise TypeError(f"schedule: must be a NoiseSchedule or a FlowSchedule, got "
                    f"{type(schedule).__name__}")

  graphdef, params = nnx.split(model)
  keys, params, _ = driver.seed_axis(key, params)
  optimizer = _optimizer(float(learning_rate), int(steps))
  state = driver.TrainState(params, jax.vmap(optimizer.init)(params))
  data = (images, conditions, null, schedule, jnp.float32(learning_rate), jnp.int32(steps),
          jnp.float32(label_dropout))
  options = {"optimizer": OPTIMIZER, "model": f"{type(model).__module__}.{type(model).__qualname__}",
             "parameters": _parameter_shapes(params), "num_classes": model.num_classes,
             "batch_size": int(batch_size), "learning_rate": float(learning_rate),
             "label_dropout": float(label_dropout)}
  # Fingerprinting costs a few eager updates and checksums: only for checkpointed runs.
  fingerprint = None if checkpoint_path is None else driver.fingerprint(loop="pretrain", state=state, data=data, key=keys,
                                   num_steps=steps, eval_every=CHUNK_STEPS, options=options,
                                   evaluate=None)
  state, history, finished = driver.run(
      driver.step_function(_step, graphdef=graphdef, batch_size=int(batch_size)),
      state, data, keys, num_steps=steps,
      eval_every=CHUNK_STEPS, fingerprint=fingerprint, data_axes=None,
      checkpoint_path=checkpoint_path, checkpoint_mismatch=checkpoint_mismatch,
      description=f"pretraining {type(model).__name__}")
  result = driver.finish(state.params, history, single_seed=True)
  nnx.update(model, result.params)
  return PretrainResult(result.params, np.asarray(result.history["loss"], np.float32), finished)
