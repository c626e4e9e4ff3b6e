"""Rankers that score a padded list of documents, as Flax NNX modules (floor 2).

A ranker maps features [..., D, F] to one logit per document [..., D]; a Plackett-Luce policy
over those logits (with the list's mask as `where`) ranks the documents. Scores are computed per
document, so padding never changes a real document's score. `TrustRegionRanker` keeps a ranker
within a fixed distance of a base (logging) ranker's logits, which bounds how much worse than the
base policy it can ever be.
"""

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from saferl_jax import checks
from saferl_jax.models.functional import _check_sizes


class LinearRanker(nnx.Module):
  """Logit x . w + b per document."""

  def __init__(self, num_features: int, *, rngs: nnx.Rngs):
    checks.check_count("num_features", num_features)
    self.linear = nnx.Linear(num_features, 1, rngs=rngs)

  def __call__(self, features: jax.Array) -> jax.Array:
    return self.linear(features)[..., 0]


class MLPRanker(nnx.Module):
  """Logit from an MLP with ReLU hidden layers, applied to each document."""

  def __init__(self, num_features: int, *, hidden: Sequence[int] = (32, 32), rngs: nnx.Rngs):
    checks.check_count("num_features", num_features)
    sizes = [num_features, *_check_sizes("hidden", hidden)]
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.out = nnx.Linear(sizes[-1], 1, rngs=rngs)

  def __call__(self, features: jax.Array) -> jax.Array:
    x = features
    for layer in self.hidden:
      x = jax.nn.relu(layer(x))
    return self.out(x)[..., 0]


class TrustRegionRanker(NamedTuple):
  """logits(x) = base_logits(x) + radius tanh(inner(x)): every logit within `radius` of the base.

  A per-document trust region on the ranker's output. Each factor
  exp(m(y_k)) / sum_{d left} exp(m(d)) of a Plackett-Luce prefix probability then moves by at
  most a factor e^{+-2 radius}, so every top-K prefix's probability, every document's
  probability at each rank and hence its exposure keep a ratio to the base policy's of at least
  e^{-2 radius K}. Whatever users click, the policy's expected DCG (any non-negative gains and
  rank weights over the top K) is then at least e^{-2 radius K} times the base policy's: the
  bound [PRPO]'s per-document clipping aims at, enforced by construction instead of by a
  vanishing gradient. `trust_region_radius` turns a ratio bound into the radius.

  Use `apply` as the apply_fn of the trained parameters (those of `inner`); the base's
  parameters stay fixed.

  Example:
    >>> import jax.numpy as jnp
    >>> ranker = TrustRegionRanker(lambda p, x: x[..., 0], None, lambda p, x: p * x[..., 0], 0.1)
    >>> [round(float(v), 3) for v in ranker.apply(100.0, jnp.array([[1.0], [-2.0]]))]
    [1.1, -2.1]
  """
  base_apply: Callable
  base_params: Any
  inner_apply: Callable
  radius: float

  def apply(self, params, features: jax.Array) -> jax.Array:
    base = jax.lax.stop_gradient(self.base_apply(self.base_params, features))
    return base + self.radius * jnp.tanh(self.inner_apply(params, features))


def trust_region_radius(min_exposure_ratio: float, *, k: int) -> float:
  """The radius whose `TrustRegionRanker` keeps every exposure ratio >= min_exposure_ratio.

  radius = -ln(min_exposure_ratio) / (2 K), K the number of ranks with exposure.

  Example:
    >>> round(trust_region_radius(0.8, k=5), 4)
    0.0223
  """
  checks.check_count("k", k)
  if not 0 < min_exposure_ratio < 1:
    raise ValueError(f"min_exposure_ratio: must be in (0, 1), got {min_exposure_ratio!r}")
  return float(-np.log(min_exposure_ratio) / (2 * k))
