"""Conditions ("prompts") of any structure: batches of arrays or pytrees with a leading batch axis (floor 1).

A diffusion model is conditioned on c, which may be a class id (int [B]), a continuous vector
(float [B, C]), a sequence of embeddings (float [B, L, E]) or any pytree of such arrays, every leaf
with the same leading batch axis B. Classifier-free guidance and label dropout replace c by the
null condition: a pytree of the same structure for ONE example (each leaf shaped as the batch's
leaf without its first axis; for class ids, the int scalar `num_classes`). The sampler, the
pretraining losses and fine-tuning handle conditions only through these functions.

Example:
  >>> import jax.numpy as jnp
  >>> c = {"direction": jnp.ones((2, 3)), "label": jnp.array([4, 7])}
  >>> batch_size("conditions", c)
  2
  >>> repeat(c, 2)["label"].tolist()
  [4, 4, 7, 7]
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from saferl_jax import checks

Conditions = Any  # an array [B, ...] or a pytree of them, one leading batch axis


def _leaves(name: str, conditions) -> tuple[list, Any]:
  leaves, treedef = jax.tree_util.tree_flatten(conditions)
  if not leaves:
    raise ValueError(f"{name}: expected an array [B, ...] or a pytree of arrays, got an empty "
                     f"structure {conditions!r}")
  out = []
  for leaf in leaves:
    if isinstance(leaf, (str, bytes)) or leaf is None:
      raise TypeError(f"{name}: leaves must be arrays, got {type(leaf).__name__} {leaf!r}")
    if isinstance(leaf, (np.ndarray, np.integer, int)) and np.asarray(leaf).dtype.kind in "iu" \
        and np.size(leaf) and (np.max(leaf) > np.iinfo(np.int32).max or
                               np.min(leaf) < np.iinfo(np.int32).min):
      # jnp.asarray would wrap them silently without 64-bit mode.
      raise ValueError(f"{name}: integer leaves must fit in int32 (they are cast to it), got values "
                       f"outside [{np.iinfo(np.int32).min}, {np.iinfo(np.int32).max}]")
    try:
      array = jnp.asarray(leaf)
    except TypeError:  # strings, objects: not array data
      raise TypeError(f"{name}: leaves must be integer or float arrays, got "
                      f"{type(leaf).__name__} of dtype {getattr(leaf, 'dtype', '?')}") from None
    if array.dtype == jnp.bool_ or not (jnp.issubdtype(array.dtype, jnp.integer)
                                        or jnp.issubdtype(array.dtype, jnp.floating)):
      raise TypeError(f"{name}: leaves must be integer or float arrays, got dtype {array.dtype}")
    out.append(array)
  return out, treedef


def check(name: str, conditions: Conditions) -> Conditions:
  """Conditions as jnp arrays (ints as int32), every leaf with the same leading axis B >= 1.

  Float leaves must be finite when concrete. Raises ValueError/TypeError naming `name`.
  """
  leaves, treedef = _leaves(name, conditions)
  sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
  if None in sizes:
    raise ValueError(f"{name}: every leaf needs a leading batch axis [B, ...], got a scalar "
                     f"(a single class id is jnp.array([c]))")
  if len(sizes) != 1:
    raise ValueError(f"{name}: every leaf must have the same leading batch size, got "
                     f"{sorted(sizes)}")
  if 0 in sizes:
    raise ValueError(f"{name}: expected a non-empty batch, got B = 0")
  out = []
  for leaf in leaves:
    if jnp.issubdtype(leaf.dtype, jnp.integer):
      leaf = leaf.astype(jnp.int32)
    elif checks.is_concrete(leaf) and not np.all(np.isfinite(np.asarray(leaf))):
      raise ValueError(f"{name}: float leaves must be finite (no NaN or inf)")
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


def batch_size(name: str, conditions: Conditions) -> int:
  """B, the leading axis shared by every leaf (checked)."""
  return jax.tree_util.tree_leaves(check(name, conditions))[0].shape[0]


def check_null(name: str, null_condition, conditions: Conditions):
  """The null condition for one example: `conditions`' structure, each leaf without its batch axis.

  Integer leaves stay integer and float leaves float (as the batch's leaves), so that one
  network input path serves both.
  """
  if null_condition is None:
    raise ValueError(f"{name}: classifier-free guidance and label dropout need the condition that "
                     f"stands for 'no condition' (for class ids, the int num_classes)")
  null_leaves, null_tree = _leaves(name, null_condition)
  leaves, treedef = jax.tree_util.tree_flatten(conditions)
  if null_tree != treedef:
    raise ValueError(f"{name}: must have the structure of one condition ({treedef}), got "
                     f"{null_tree}")
  out = []
  for null, leaf in zip(null_leaves, leaves):
    if null.shape != leaf.shape[1:]:
      raise ValueError(f"{name}: a leaf has shape {null.shape}, expected {leaf.shape[1:]} (one "
                       f"condition's shape, without the batch axis)")
    if jnp.issubdtype(null.dtype, jnp.integer) != jnp.issubdtype(leaf.dtype, jnp.integer):
      raise ValueError(f"{name}: a leaf has dtype {null.dtype} where the conditions have "
                       f"{leaf.dtype} (both integer or both float)")
    out.append(null.astype(leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def repeat(conditions: Conditions, repeats: int) -> Conditions:
  """Each condition `repeats` times, contiguous: [P, ...] -> [P * repeats, ...] (jnp.repeat)."""
  return jax.tree_util.tree_map(lambda leaf: jnp.repeat(leaf, repeats, axis=0), conditions)


def take(conditions: Conditions, index: ArrayLike | slice) -> Conditions:
  """The conditions of some examples: every leaf indexed along its batch axis."""
  return jax.tree_util.tree_map(lambda leaf: leaf[index], conditions)


def broadcast_null(null_condition, size: int) -> Conditions:
  """A batch [size, ...] of null conditions."""
  return jax.tree_util.tree_map(
      lambda leaf: jnp.broadcast_to(leaf, (size,) + jnp.shape(leaf)), null_condition)


def concatenate(first: Conditions, second: Conditions) -> Conditions:
  """Two batches of the same structure, one after the other along the batch axis."""
  return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), first, second)


def drop(conditions: Conditions, null_condition, dropped: jax.Array) -> Conditions:
  """Label dropout: example b's condition replaced by the null condition where dropped[b] (bool [B])."""

  def one_leaf(leaf, null):
    mask = dropped.reshape(dropped.shape + (1,) * (leaf.ndim - 1))
    return jnp.where(mask, jnp.asarray(null, leaf.dtype), leaf)
  return jax.tree_util.tree_map(one_leaf, conditions, null_condition)
