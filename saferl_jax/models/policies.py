"""Softmax policies over actions given a context, as Flax NNX modules (floor 2).

pi_theta(a|x) = softmax(f_theta(x)), with f_theta linear or an MLP returning logits [n, A].
The floor-1 objectives take an `apply_fn(params, contexts)`; `saferl_jax.models.functional.as_functional`
(re-exported here) splits a module into that pair, so parameters can be vmapped over seeds and optimised with optax.
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from saferl_jax import checks
from saferl_jax.models.functional import _check_sizes
from saferl_jax.models.functional import as_functional  # noqa: F401  (re-exported for opl users)


class LinearPolicy(nnx.Module):
  """Logits x W + b: one linear score per action."""

  def __init__(self, dim_context: int, num_actions: int, *, rngs: nnx.Rngs):
    checks.check_count("dim_context", dim_context)
    checks.check_count("num_actions", num_actions)
    self.linear = nnx.Linear(dim_context, num_actions, rngs=rngs)

  def __call__(self, contexts: jax.Array) -> jax.Array:
    return self.linear(contexts)


class MLPPolicy(nnx.Module):
  """Logits from an MLP with ReLU hidden layers."""

  def __init__(self, dim_context: int, num_actions: int, *, hidden: Sequence[int] = (64,),
               rngs: nnx.Rngs):
    checks.check_count("dim_context", dim_context)
    checks.check_count("num_actions", num_actions)
    sizes = [dim_context, *_check_sizes("hidden", hidden)]
    self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.out = nnx.Linear(sizes[-1], num_actions, rngs=rngs)

  def __call__(self, contexts: jax.Array) -> jax.Array:
    x = contexts
    for layer in self.hidden:
      x = jax.nn.relu(layer(x))
    return self.out(x)
