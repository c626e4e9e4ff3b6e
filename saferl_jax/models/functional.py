"""Turning a Flax NNX module into a pure function of its parameters (floor 2, shared).

Floor-1 code takes `apply_fn(params, inputs)`; `as_functional` splits any NNX module (a
policy, a ranker, a denoiser) into that pair, so parameters can be vmapped over seeds,
differentiated and optimised with optax.
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

from typing import Any, Callable, NamedTuple

from flax import nnx

from saferl_jax import checks


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




def _check_sizes(name: str, sizes, *, length: int | None = None, allow_empty: bool = True) -> tuple:
  """A sequence of sizes (hidden widths, an image shape), each an int >= 1."""
  if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
    raise TypeError(f"{name}: must be a sequence of ints, got {type(sizes).__name__} {sizes!r}")
  sizes = tuple(sizes)
  if length is not None and len(sizes) != length:
    raise ValueError(f"{name}: expected {length} sizes, got {sizes!r}")
  if not sizes and not allow_empty:
    raise ValueError(f"{name}: expected at least one size, got {sizes!r}")
  for size in sizes:
    checks.check_count(name, size)
  return tuple(int(size) for size in sizes)
