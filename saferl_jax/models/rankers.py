"""Rankers that score a padded list of documents, as Flax NNX modules (floor 2).

A ranker maps features [..., D, F] to one logit per document [..., D]; a Plackett-Luce policy
over those logits (with the list's mask as `where`) ranks the documents. Scores are computed per
document, so padding never changes a real document's score.
"""

from __future__ import annotations

from typing import Sequence

import jax
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
