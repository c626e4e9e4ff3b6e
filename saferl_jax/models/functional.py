"""Turning a Flax NNX module into a pure function of its parameters (floor 2, shared).

Floor-1 code takes `apply_fn(params, inputs)`; `as_functional` splits any NNX module (a
policy, a ranker, a denoiser) into that pair, so parameters can be vmapped over seeds,
differentiated and optimised with optax.
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

from typing import Any, Callable, NamedTuple

from flax import nnx


class Functional(NamedTuple):
  """A module as a pure function: apply_fn(params, *inputs) = model(*inputs)."""
  apply_fn: Callable[..., Any]
  params: nnx.State


def as_functional(model: nnx.Module) -> Functional:
  """(apply_fn, params) with apply_fn(params, *inputs) = model(*inputs), a pure function of params."""
  graphdef, params = nnx.split(model)

  def apply_fn(params, *inputs):
    return nnx.merge(graphdef, params)(*inputs)
  return Functional(apply_fn, params)
