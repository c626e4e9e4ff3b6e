"""Rewards for fine-tuning the toy diffusion models, (floor 1: pure functions of samples).

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

The classifier itself is `saferl_jax.models.DigitClassifier`, fitted by
`saferl_jax.training.train_classifier`.

References:
  [DDPO] Black, Janner, Du, Kostrikov, Levine. Training Diffusion Models with Reinforcement
  Learning. ICLR 2024. https://arxiv.org/abs/2305.13301
  [LOOP] Gupta et al. A Simple and Effective Reinforcement Learning Method for Text-to-Image
  Diffusion Models. 2025. https://arxiv.org/abs/2503.00897
"""

from __future__ import annotations

import functools
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from saferl_jax import checks


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
  if isinstance(level, (bool, np.bool_)) or not isinstance(level, (int, np.integer)):
    if isinstance(level, (float, np.floating)):
      raise ValueError(f"level: must be an int in 0..9, got {level!r}")
    raise TypeError(f"level: must be an int in 0..9, got {type(level).__name__} {level!r}")
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
