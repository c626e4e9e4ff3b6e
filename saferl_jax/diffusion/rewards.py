"""Rewards for fine-tuning the toy diffusion models, and the digit classifier behind one (floor 2).

Every reward scores a batch of final samples x_0 [B, *shape] and returns [B]; all run under
jit and vmap.

- `prompt_alignment_reward`: log p(prompted class | x_0) under a classifier (log-softmax of its
  logits), the digits task's stand-in for the text-image alignment rewards of DDPO. At most 0;
  log(1/10) is chance.
- `quality_reward`: minus the root-mean-square pixel distance from x_0 to its nearest reference
  (training) image, -min_j sqrt(mean((x_0 - r_j)^2)). A distance to the data manifold, sampled by
  the 1797 digits: 0 on a training image, about -0.5 for a blurred or noisy digit, below -1 for
  noise. Chosen over a range penalty (which any image in [-1, 1] satisfies) because it also
  penalises off-manifold images inside the range; being a nearest-neighbour score, it is
  maximised by copying a training image, so read it beside the alignment reward, not alone.
- `compressibility_reward`: minus the DEFLATE-compressed size of the image quantised to uint8,
  as a fraction of the raw size: -len(deflate(uint8(x_0))) / x_0.size. Computed by zlib on the
  host through `jax.pure_callback`, so it has no gradient: the black-box reward that only
  policy-gradient methods can use (DDPO's JPEG compressibility in miniature). -0.094 (6 bytes)
  for a constant 8x8 image, about -0.8 for a digit, -1.08 (a stored block of 69 bytes) for noise.
- `tilt_reward`: r(x) = a^T x for the 2-D mixture task, whose KL-regularised optimum is known in
  closed form (`saferl_jax.data.mixture2d.tilted_mixture`).

`DigitClassifier` is a small MLP on 8x8x1 images in [-1, 1]; `train_classifier` fits it with
AdamW on cross-entropy, cached on disk like pretraining (`saferl_jax.diffusion.cache`).

References:
  [DDPO] Black, Janner, Du, Kostrikov, Levine. Training Diffusion Models with Reinforcement
  Learning. ICLR 2024. https://arxiv.org/abs/2305.13301
  [LOOP] Gupta et al. A Simple and Effective Reinforcement Learning Method for Text-to-Image
  Diffusion Models. 2025. https://arxiv.org/abs/2503.00897
"""

from __future__ import annotations

import functools
import zlib
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.diffusion import cache

# Part of the classifier's cache fingerprint: change it whenever the training recipe changes.
CLASSIFIER_OPTIMIZER = "adamw(lr, weight_decay=1e-4), batches with replacement; v1"


class DigitClassifier(nnx.Module):
  """Logits [B, num_classes] of images [B, H, W, C]: an MLP with SiLU on the flattened pixels.

  An MLP rather than a CNN: on the 8x8 digits it reaches about 99% held-out accuracy, and it
  trains in a fraction of a second on a CPU (XLA:CPU's convolution gradients are slow inside
  lax.scan, see `saferl_jax.diffusion.denoisers`).

  Args:
    num_classes: number of classes (10 digits).
    hidden: hidden layer sizes.
    image_shape: (H, W, C) of the images.
    rngs: `nnx.Rngs` for the initial parameters.

  Example:
    >>> DigitClassifier(rngs=nnx.Rngs(0))(jnp.zeros((3, 8, 8, 1))).shape
    (3, 10)
  """

  def __init__(self, *, num_classes: int = 10, hidden: Sequence[int] = (128, 128),
               image_shape: tuple[int, int, int] = (8, 8, 1), rngs: nnx.Rngs):
    if num_classes < 2:
      raise ValueError(f"num_classes: must be >= 2, got {num_classes}")
    self.num_classes = num_classes
    self.image_shape = tuple(image_shape)
    sizes = [int(np.prod(image_shape)), *hidden]
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.out = nnx.Linear(sizes[-1], num_classes, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    if images.ndim != 4 or images.shape[1:] != self.image_shape:
      raise ValueError(f"images: expected [B, {', '.join(map(str, self.image_shape))}], got shape "
                       f"{images.shape}")
    h = images.reshape(images.shape[0], -1)
    for layer in self.hidden:
      h = nnx.silu(layer(h))
    return self.out(h)


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


def prompt_alignment_reward(classifier_apply_fn: Callable, classifier_params: Any, x0: ArrayLike,
                            prompts: ArrayLike) -> jax.Array:
  """log p(prompt | x_0) = log_softmax(classifier logits)[prompt], one per sample.

  Args:
    classifier_apply_fn: apply_fn(params, images [B, H, W, C]) -> logits [B, num_classes].
    classifier_params: the classifier's parameters.
    x0: [B, H, W, C] generated images.
    prompts: [B] int prompted classes in [0, num_classes).

  Returns:
    [B] log-probabilities (<= 0).

  Example:
    >>> logits_fn = lambda params, x: jnp.stack([jnp.zeros(len(x)), jnp.log(3.0) * jnp.ones(len(x))], -1)
    >>> reward = prompt_alignment_reward(logits_fn, None, jnp.zeros((1, 8, 8, 1)), jnp.array([1]))
    >>> round(float(reward[0]), 4)  # log(3 / 4)
    -0.2877
  """
  x0 = checks.as_float("x0", x0)
  prompts = checks.as_int("prompts", prompts)
  if prompts.shape != x0.shape[:1]:
    raise ValueError(f"prompts: expected shape [B={x0.shape[0]}], got {prompts.shape}")
  log_probs = jax.nn.log_softmax(classifier_apply_fn(classifier_params, x0), axis=-1)
  checks.check_indices("prompts", prompts, log_probs.shape[-1], what="class")
  return jnp.take_along_axis(log_probs, prompts[:, None], axis=-1)[:, 0]


def quality_reward(x0: ArrayLike, reference_images: ArrayLike) -> jax.Array:
  """Minus the RMS pixel distance to the nearest reference image, -min_j sqrt(mean((x_0 - r_j)^2)).

  Args:
    x0: [B, *shape] generated samples.
    reference_images: [N, *shape] the data (e.g. the training digits).

  Returns:
    [B] rewards (<= 0; 0 exactly on a reference image).

  Example:
    >>> refs = jnp.stack([jnp.zeros((8, 8, 1)), jnp.ones((8, 8, 1))])
    >>> quality_reward(jnp.stack([refs[1], 0.5 * refs[1]]), refs).tolist()
    [0.0, -0.5]
  """
  x0 = checks.as_float("x0", x0)
  reference_images = checks.as_float("reference_images", reference_images)
  if x0.ndim < 2 or reference_images.shape[1:] != x0.shape[1:] or reference_images.shape[0] == 0:
    raise ValueError(f"reference_images: expected [N, {', '.join(map(str, x0.shape[1:]))}] to match "
                     f"x0 {x0.shape}, got {reference_images.shape}")
  return _nearest_rms_distance(x0, reference_images)


@jax.jit
def _nearest_rms_distance(x0: jax.Array, reference_images: jax.Array) -> jax.Array:
  x = x0.reshape(x0.shape[0], -1)
  refs = reference_images.reshape(reference_images.shape[0], -1)
  squared = (jnp.sum(x ** 2, -1)[:, None] - 2 * x @ refs.T + jnp.sum(refs ** 2, -1)[None, :])
  nearest = jnp.maximum(jnp.min(squared, axis=-1), 0.0) / x.shape[-1]
  return 0.0 - jnp.sqrt(nearest)  # 0.0, not -0.0, on a reference image


def _compressed_fractions(x: np.ndarray, sample_ndim: int, level: int) -> np.ndarray:
  """Host side: len(deflate(uint8 image)) / size for each sample in x [..., *sample_shape]."""
  x = np.asarray(x)
  batch_shape = x.shape[:x.ndim - sample_ndim]
  flat = x.reshape((-1,) + x.shape[x.ndim - sample_ndim:])
  pixels = np.round((np.clip(flat, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
  size = pixels[0].size if pixels.shape[0] else 1
  sizes = [len(zlib.compress(image.tobytes(), level, wbits=-15)) for image in pixels]
  return (np.asarray(sizes, np.float32) / size).reshape(batch_shape)


def compressibility_reward(x0: ArrayLike, *, level: int = 9) -> jax.Array:
  """Minus the DEFLATE size of uint8(round((x_0 + 1) 127.5)) as a fraction of the raw size.

  Runs zlib on the host through `jax.pure_callback` (vmap_method="expand_dims": the callback
  receives a whole vmapped batch at once), so it works under jit and vmap but has no gradient.

  Args:
    x0: [B, *shape] samples in [-1, 1] (clipped before quantisation).
    level: zlib's compression level, 0..9.

  Returns:
    [B] rewards, -compressed bytes / pixels (a raw DEFLATE stream, no zlib header).

  Example:
    >>> compressibility_reward(jnp.full((1, 8, 8, 1), -1.0)).tolist()  # 64 zero bytes -> 6 bytes
    [-0.09375]
  """
  x0 = checks.as_float("x0", x0)
  if x0.ndim < 2:
    raise ValueError(f"x0: expected a batch [B, *shape], got shape {x0.shape}")
  if not 0 <= level <= 9:
    raise ValueError(f"level: must be in 0..9, got {level}")
  callback = functools.partial(_compressed_fractions, sample_ndim=x0.ndim - 1, level=level)
  result = jax.ShapeDtypeStruct(x0.shape[:1], jnp.float32)
  return -jax.pure_callback(callback, result, x0, vmap_method="expand_dims")


def tilt_reward(x: ArrayLike, direction: ArrayLike) -> jax.Array:
  """r(x) = a^T x, the linear reward of the 2-D mixture task.

  Args:
    x: [..., D] samples.
    direction: [D] the direction a.

  Returns:
    [...] rewards.

  Example:
    >>> tilt_reward(jnp.array([[1.0, 2.0], [3.0, -1.0]]), jnp.array([1.0, 1.0])).tolist()
    [3.0, 2.0]
  """
  x = checks.as_float("x", x)
  direction = checks.as_float("direction", direction)
  if direction.ndim != 1 or x.ndim < 1 or x.shape[-1] != direction.shape[0]:
    raise ValueError(f"direction: expected shape [D] with D = x.shape[-1], got {direction.shape} for "
                     f"x {x.shape}")
  return x @ direction
