"""Fitting the digit classifier behind the prompt-alignment reward, cached on disk (floor 3).

`train_classifier` fits a `DigitClassifier` with AdamW on cross-entropy in one compiled
lax.scan, cached on disk like pretraining (`saferl_jax.training.cache`).
"""

from __future__ import annotations

import functools
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
from saferl_jax.training import cache

# Part of the classifier's cache fingerprint: change it whenever the training recipe changes.
CLASSIFIER_OPTIMIZER = "adamw(lr, weight_decay=1e-4), batches with replacement; v1"

class TrainedClassifier(NamedTuple):
  """A trained classifier as a pure function of its parameters.

  Attributes:
    apply_fn: apply_fn(params, images [B, H, W, C]) -> logits [B, num_classes].
    params: the trained parameters (an `nnx.State`).
    losses: [steps] float32 minibatch cross-entropies.
    from_cache: True when the parameters were loaded from `cache_path` without training.
  """
  apply_fn: Callable
  params: Any
  losses: np.ndarray
  from_cache: bool


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "batch_size", "learning_rate"))
def _train_classifier(params, images, labels, key, *, graphdef, steps, batch_size, learning_rate):
  optimizer = optax.adamw(learning_rate, weight_decay=1e-4)

  def loss_fn(params, batch_images, batch_labels):
    logits = nnx.merge(graphdef, params)(batch_images)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels))

  def step(state, index):
    params, opt_state = state
    indices = jax.random.randint(jax.random.fold_in(key, index), (batch_size,), 0, images.shape[0])
    loss, grads = jax.value_and_grad(loss_fn)(params, images[indices], labels[indices])
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(steps))
  return params, losses


def train_classifier(images: ArrayLike, labels: ArrayLike, *, key: jax.Array, steps: int,
                     batch_size: int = 128, learning_rate: float = 3e-3, num_classes: int = 10,
                     cache_path: str | Path | None = None) -> TrainedClassifier:
  """Fits a `DigitClassifier` (initialised from `key`) by Adam on cross-entropy, or loads it from `cache_path`.

  Args:
    images: [N, H, W, C] training images in [-1, 1].
    labels: [N] int classes in [0, num_classes).
    key: PRNG key for the initial parameters and the minibatches.
    steps: optimisation steps, >= 1 (all run in one compiled lax.scan).
    batch_size: minibatch size, in [1, N] (drawn with replacement).
    learning_rate: AdamW's learning rate (weight decay 1e-4).
    num_classes: number of classes.
    cache_path: an .npz file; loaded when it holds the same configuration's result (same data,
      key, steps, batch size, learning rate, architecture), else written atomically after training.

  Returns:
    A `TrainedClassifier` (apply_fn, params, losses, from_cache).
  """
  if steps < 1:
    raise ValueError(f"steps: must be >= 1, got {steps}")
  if not learning_rate > 0:
    raise ValueError(f"learning_rate: must be > 0, got {learning_rate}")
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    raise ValueError("key: expected a typed PRNG key from jax.random.key, got an array of dtype "
                     f"{key.dtype}; wrap legacy keys with jax.random.wrap_key_data")
  images = checks.as_float("images", images)
  labels = checks.as_int("labels", labels).astype(jnp.int32)
  if images.ndim != 4:
    raise ValueError(f"images: expected [N, H, W, C], got shape {images.shape}")
  n = images.shape[0]
  if labels.shape != (n,):
    raise ValueError(f"labels: expected shape [N={n}], got {labels.shape}")
  if not 1 <= batch_size <= n:
    raise ValueError(f"batch_size: must be in [1, N={n}], got {batch_size}")
  checks.check_finite("images", images)
  checks.check_indices("labels", labels, num_classes, what="class")

  init_key, train_key = jax.random.split(key)
  model = DigitClassifier(num_classes=num_classes, image_shape=tuple(images.shape[1:]),
                          rngs=nnx.Rngs(params=init_key))
  graphdef, params = nnx.split(model)

  def apply_fn(params, *inputs):
    return nnx.merge(graphdef, params)(*inputs)

  config = {
      "task": "diffusion.train_classifier", "optimizer": CLASSIFIER_OPTIMIZER,
      "model": f"{DigitClassifier.__module__}.{DigitClassifier.__qualname__}",
      "init_sha256": cache.tree_checksum(params), "num_classes": int(num_classes),
      "steps": int(steps), "batch_size": int(batch_size), "learning_rate": float(learning_rate),
      "data_sha256": cache.tree_checksum((images, labels)), "key_sha256": cache.tree_checksum(key),
  }
  fingerprint = cache.fingerprint(config)
  if cache_path is not None:
    cached = cache.load(cache_path, fingerprint, params)
    if cached is not None:
      params, extras = cached
      return TrainedClassifier(apply_fn, params, extras["losses"], True)
  params, losses = _train_classifier(params, images, labels, train_key, graphdef=graphdef,
                                     steps=int(steps), batch_size=int(batch_size),
                                     learning_rate=float(learning_rate))
  losses = np.asarray(losses, np.float32)
  if not np.all(np.isfinite(losses)):
    raise FloatingPointError("learning_rate: the classifier's loss became non-finite; lower it")
  if cache_path is not None:
    cache.save(cache_path, fingerprint, params, losses=losses)
  return TrainedClassifier(apply_fn, params, losses, False)
