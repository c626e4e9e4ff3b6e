"""Fitting the digit classifier behind the prompt-alignment reward, cached on disk (floor 3).

`train_classifier` fits a `DigitClassifier` with AdamW on cross-entropy in one compiled
lax.scan chunk of the one training driver, checkpointed like every loop.
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.models.classifier import DigitClassifier
from saferl_jax.training import driver

# Part of the classifier's checkpoint fingerprint: change it whenever the training recipe changes.
CLASSIFIER_OPTIMIZER = "adamw(lr, weight_decay=1e-4), batches with replacement; v1"

class TrainedClassifier(NamedTuple):
  """A trained classifier as a pure function of its parameters.

  Attributes:
    apply_fn: apply_fn(params, images [B, H, W, C]) -> logits [B, num_classes].
    params: the trained parameters (an `nnx.State`).
    losses: [steps] float32 minibatch cross-entropies.
    from_cache: True when a finished checkpoint was loaded without training.
  """
  apply_fn: Callable
  params: Any
  losses: np.ndarray
  from_cache: bool


def _step(state: driver.TrainState, data: tuple, key: jax.Array, step: jax.Array, *, graphdef,
          batch_size: int, learning_rate: float):
  images, labels = data
  optimizer = optax.adamw(learning_rate, weight_decay=1e-4)

  def loss_fn(params, batch_images, batch_labels):
    logits = nnx.merge(graphdef, params)(batch_images)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels))

  indices = jax.random.randint(jax.random.fold_in(key, step), (batch_size,), 0, images.shape[0])
  loss, grads = jax.value_and_grad(loss_fn)(state.params, images[indices], labels[indices])
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  return driver.TrainState(optax.apply_updates(state.params, updates), opt_state), {"loss": loss}


def train_classifier(images: ArrayLike, labels: ArrayLike, *, key: jax.Array, steps: int,
                     batch_size: int = 128, learning_rate: float = 3e-3, num_classes: int = 10,
                     checkpoint_path: str | Path | None = None,
                     checkpoint_mismatch: str = "error") -> TrainedClassifier:
  """Fits a `DigitClassifier` (initialised from `key`) by AdamW on cross-entropy.

  Args:
    images: [N, H, W, C] training images in [-1, 1].
    labels: [N] int classes in [0, num_classes).
    key: PRNG key for the initial parameters and the minibatches.
    steps: optimisation steps, >= 1 (all run in one compiled chunk).
    batch_size: minibatch size, in [1, N] (drawn with replacement).
    learning_rate: AdamW's learning rate (weight decay 1e-4).
    num_classes: number of classes.
    checkpoint_path: an orbax checkpoint directory; a finished checkpoint of this very
      configuration (data, key, steps, batch size, learning rate, architecture) is loaded without
      training, another configuration's refused with a ValueError naming what differs.
    checkpoint_mismatch: "error", or "new" to checkpoint beside another run's checkpoint.

  Returns:
    A `TrainedClassifier` (apply_fn, params, losses, from_cache).
  """
  checks.check_count("steps", steps)
  checks.check_count("batch_size", batch_size)
  checks.check_real("learning_rate", learning_rate, low=0.0, open_low=True)
  checks.check_count("num_classes", num_classes, low=2)
  checks.check_choice("checkpoint_mismatch", checkpoint_mismatch, driver.CHECKPOINT_MISMATCH)
  driver.check_seed_keys(key)
  if key.ndim:
    raise ValueError(f"key: expected one key, got shape {key.shape}")
  images = checks.as_float("images", images)
  labels = checks.as_int("labels", labels).astype(jnp.int32)
  if images.ndim != 4:
    raise ValueError(f"images: expected [N, H, W, C], got shape {images.shape}")
  n = images.shape[0]
  if labels.shape != (n,):
    raise ValueError(f"labels: expected shape [N={n}], got {labels.shape}")
  batch_size = driver.check_batch_size("batch_size", batch_size, n)
  checks.check_finite("images", images)
  checks.check_indices("labels", labels, num_classes, what="class")

  init_key, train_key = jax.random.split(key)
  model = DigitClassifier(num_classes=num_classes, image_shape=tuple(images.shape[1:]),
                          rngs=nnx.Rngs(params=init_key))
  graphdef, params = nnx.split(model)

  def apply_fn(params, *inputs):
    return nnx.merge(graphdef, params)(*inputs)

  keys, params, _ = driver.seed_axis(train_key, params)
  optimizer = optax.adamw(float(learning_rate), weight_decay=1e-4)
  state = driver.TrainState(params, jax.vmap(optimizer.init)(params))
  options = {"optimizer": CLASSIFIER_OPTIMIZER, "num_classes": int(num_classes),
             "batch_size": int(batch_size), "learning_rate": float(learning_rate),
             "model": f"{DigitClassifier.__module__}.{DigitClassifier.__qualname__}"}
  # Fingerprinting costs a few eager updates and checksums: only for checkpointed runs.
  fingerprint = None if checkpoint_path is None else driver.fingerprint(loop="train_classifier", state=state, data=(images, labels),
                                   key=keys, num_steps=steps, eval_every=steps, options=options,
                                   evaluate=None)
  state, history, finished = driver.run(
      driver.step_function(_step, graphdef=graphdef, batch_size=int(batch_size),
                           learning_rate=float(learning_rate)),
      state, (images, labels), keys,
      num_steps=steps, eval_every=steps, fingerprint=fingerprint, data_axes=None,
      checkpoint_path=checkpoint_path, checkpoint_mismatch=checkpoint_mismatch,
      description="train_classifier")
  result = driver.finish(state.params, history, single_seed=True)
  return TrainedClassifier(apply_fn, result.params, np.asarray(result.history["loss"], np.float32),
                           finished)
