"""scikit-learn's bundled 8x8 handwritten digits, as images for the diffusion task (floor 2).

The 1797 images (UCI optical digits, pixel values 0..16) ship inside scikit-learn, so
nothing is downloaded. `load_digits` scales them to [-1, 1] (x = v / 8 - 1), the range a
DDPM is trained on, with a trailing channel axis: images [1797, 8, 8, 1]. The class (0..9)
is the "prompt" of class-conditional sampling. `split` divides the images at random,
stratified by class so every part keeps the class balance.

References:
  Alpaydin, Kaynak. Optical Recognition of Handwritten Digits. UCI Machine Learning
  Repository, 1998. https://doi.org/10.24432/C50P49
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from saferl_jax import checks

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
MAX_PIXEL = 16.0  # scikit-learn's digits take the values 0..16


class Digits(NamedTuple):
  """Images and their classes.

  Attributes:
    images: [N, 8, 8, 1] float32 in [-1, 1] (-1 is the background).
    labels: [N] int32 classes 0..9.
  """
  images: jax.Array
  labels: jax.Array

  @property
  def num_images(self) -> int:
    return int(self.labels.shape[0])


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
  from sklearn import datasets
  bunch = datasets.load_digits()
  return np.asarray(bunch.images, np.float32), np.asarray(bunch.target, np.int32)


def load_digits() -> Digits:
  """The 1797 digits, scaled to [-1, 1] as x = v / 8 - 1 with a channel axis.

  Returns:
    A `Digits` with images [1797, 8, 8, 1] float32 and labels [1797] int32.

  Example:
    >>> data = load_digits()
    >>> data.images.shape, data.labels.shape, float(data.images.min()), float(data.images.max())
    ((1797, 8, 8, 1), (1797,), -1.0, 1.0)
  """
  pixels, labels = _raw_digits()
  images = pixels[..., None] * (2.0 / MAX_PIXEL) - 1.0
  return Digits(jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32))


def mean_intensity(images: jax.Array) -> jax.Array:
  """Mean pixel intensity in [0, 1] of images in [-1, 1]: [B, H, W, C] -> [B] (the ink of a digit).

  Example:
    >>> mean_intensity(jnp.array([[[[-1.0], [1.0]]]])).tolist()  # one 1x2 image: black and white
    [0.5]
  """
  return jnp.mean((images + 1.0) / 2.0, axis=tuple(range(1, images.ndim)))


def split(data: Digits, fractions: Sequence[float] = (0.8, 0.2), *, key: jax.Array) -> tuple[Digits, ...]:
  """Splits the images at random into parts of the given fractions, stratified by class.

  Within each class the images are permuted and cut at round(n_class * cumulative fraction),
  so every image lands in exactly one part and each part keeps the class proportions.

  Args:
    data: a `Digits` of N images.
    fractions: non-negative fractions summing to 1, one per part (e.g. train, test).
    key: PRNG key for the permutations.

  Returns:
    A tuple of `Digits`, one per fraction, images in random order (a plain tuple: its parts are
    of one type and their number is the caller's).

  Example:
    >>> import jax
    >>> train, test = split(load_digits(), (0.8, 0.2), key=jax.random.key(0))
    >>> train.num_images + test.num_images, test.num_images
    (1797, 359)
  """
  checks.check_key("key", key)
  if isinstance(fractions, (str, bytes)):
    raise TypeError(f"fractions: must be a sequence of numbers, got {fractions!r}")
  try:
    raw = np.asarray(fractions)
  except (TypeError, ValueError) as err:
    raise TypeError(f"fractions: must be a sequence of numbers ({err})") from err
  if raw.dtype.kind not in "iuf":
    raise TypeError(f"fractions: must be a sequence of numbers, got dtype {raw.dtype}")
  fractions = raw.astype(np.float64)
  if fractions.ndim != 1 or fractions.size == 0:
    raise ValueError(f"fractions: expected a non-empty sequence, got {fractions.tolist()!r}")
  if np.any(~np.isfinite(fractions)) or np.any(fractions < 0) or abs(fractions.sum() - 1) > 1e-6:
    raise ValueError(f"fractions: must be >= 0 and sum to 1, got {fractions.tolist()}")
  labels = np.asarray(data.labels)
  n = labels.size
  cumulative = np.cumsum(fractions)
  # Two permutations of all N images (one compilation): the first orders each class's members,
  # the second gives every image a random rank that orders the parts.
  order_key, rank_key = jax.random.split(key)
  order = np.asarray(jax.random.permutation(order_key, n))
  rank = np.asarray(jax.random.permutation(rank_key, n))
  parts: list[list[np.ndarray]] = [[] for _ in fractions]
  for label in np.unique(labels):
    members = order[labels[order] == label]
    bounds = np.round(cumulative * members.size).astype(int)
    bounds[-1] = members.size
    for part, (start, stop) in enumerate(zip(np.concatenate([[0], bounds[:-1]]), bounds)):
      parts[part].append(members[start:stop])
  result = []
  for pieces in parts:
    indices = np.concatenate(pieces)
    indices = indices[np.argsort(rank[indices], kind="stable")]
    result.append(Digits(data.images[indices], data.labels[indices]))
  return tuple(result)
