"""Listwise ranking losses from rax in this library's convention (floor 1).

Logits [..., D], labels [..., D] and an optional bool mask `where` [..., D] (True = valid item),
one loss per list [...]: rax's `softmax_loss` and `listmle_loss` with `reduce_fn=None`, so the
caller chooses how to combine them with the safe objectives (a mean over queries, a weighted
sum). The maths is rax's and is not rewritten here; these wrappers only fix the argument
convention, check inputs and keep an all-masked list at loss 0 with a zero (not NaN) gradient.

ListMLE is the negative Plackett-Luce log-likelihood of the ranking that sorts the labels
(`-ranking_log_prob(logits, label-sorted ranking)`), which ties rax to this package's PL maths.

References:
  Jagerman, Qin, Wang, Bendersky, Najork. Rax: Composable Learning-to-Rank using JAX. SIGIR 2022.
  https://github.com/google/rax
  Cao, Qin, Liu, Tsai, Li. Learning to Rank: From Pairwise Approach to Listwise Approach. ICML 2007.
  Xia, Liu, Wang, Zhang, Li. Listwise Approach to Learning to Rank: Theory and Algorithm. ICML 2008.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import rax
from jax.typing import ArrayLike

from saferl_jax import checks


def _check(logits: ArrayLike, labels: ArrayLike,
           where: ArrayLike | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(logits, labels, valid), all [..., D], with padded entries set to 0."""
  logits = checks.as_float("logits", logits)
  labels = checks.as_float("labels", labels)
  if logits.ndim < 1:
    raise ValueError(f"logits: expected an array [..., D], got shape {tuple(logits.shape)}")
  if labels.shape != logits.shape:
    raise ValueError(f"labels: expected shape {tuple(logits.shape)} like logits, "
                     f"got {tuple(labels.shape)}")
  if where is None:
    valid = jnp.ones(logits.shape, bool)
  else:
    valid = jnp.asarray(where)
    if valid.dtype != jnp.bool_:
      raise ValueError(f"where: must be a bool mask (True = valid item), got dtype {valid.dtype}")
    if valid.ndim > logits.ndim or valid.shape[-1:] != logits.shape[-1:]:
      raise ValueError(f"where: shape {tuple(valid.shape)} does not match logits "
                       f"{tuple(logits.shape)}")
    try:
      valid = jnp.broadcast_to(valid, logits.shape)
    except ValueError:
      raise ValueError(f"where: shape {tuple(valid.shape)} does not broadcast against logits "
                       f"{tuple(logits.shape)}") from None
  checks.check_finite("logits", logits, where=valid)
  checks.check_finite("labels", labels, where=valid)
  # Padding values never reach rax's arithmetic (no NaN from them, in value or gradient). A list
  # with no valid item is handed to rax as fully valid with zero logits and labels, so that its
  # log-softmax is finite; its loss is then set to 0.
  logits = jnp.where(valid, logits, 0.0)
  labels = jnp.where(valid, labels, 0.0)
  return logits, labels, valid


def _rax_where(valid: jax.Array) -> jax.Array:
  """The mask handed to rax: an all-masked list counts as fully valid (zero logits, labels)."""
  return valid | ~jnp.any(valid, axis=-1, keepdims=True)


def _zero_if_empty(loss: jax.Array, valid: jax.Array) -> jax.Array:
  return jnp.where(jnp.any(valid, axis=-1), loss, 0.0)


def softmax_loss(logits: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None,
                 normalize: bool = False) -> jax.Array:
  """Softmax cross-entropy of a list, from `rax.softmax_loss`: -sum_d y_d log softmax(m)_d.

  With `normalize`, the labels are first divided by their sum over the valid items
  (`rax.utils.normalize_probabilities`), the ListNet form; without it (rax's default) they weigh
  the log-probabilities as given.

  Args:
    logits: [..., D] the ranker's scores m.
    labels: [..., D] graded relevance labels (or any nonnegative item weights).
    where: optional bool [..., D], True for valid items; padded items are left out of the
      softmax and the sum.
    normalize: divide the labels by their sum over the list.

  Returns:
    [...] the loss of each list; 0 for an all-masked list.

  Example:
    >>> import jax.numpy as jnp
    >>> # -log softmax(0, 0)_0 = log 2.
    >>> round(float(softmax_loss(jnp.zeros(2), jnp.array([1., 0.]))), 4)
    0.6931

  References:
    Cao et al. Learning to Rank: From Pairwise Approach to Listwise Approach. ICML 2007.
    Rax: https://github.com/google/rax (rax.softmax_loss).
  """
  logits, labels, valid = _check(logits, labels, where)
  label_fn = rax.utils.normalize_probabilities if normalize else (lambda a, where: a)
  loss = rax.softmax_loss(logits, labels, where=_rax_where(valid), label_fn=label_fn,
                          reduce_fn=None)
  return _zero_if_empty(loss, valid)


def listmle_loss(logits: ArrayLike, labels: ArrayLike, *, where: ArrayLike | None = None,
                 key: jax.Array | None = None) -> jax.Array:
  """ListMLE, from `rax.listmle_loss`: -log pi_PL(y*) for the ranking y* that sorts the labels.

    -log pi(y*) = -sum_{r} [m(y*_r) - log sum_{j >= r} exp(m(y*_j))],

  the Plackett-Luce negative log-likelihood of the label order over the valid items. Equal labels
  keep their index order (rax's stable sort); with `key` they are broken at random instead.

  Args:
    logits: [..., D] the ranker's scores m.
    labels: [..., D] graded relevance labels.
    where: optional bool [..., D], True for valid items; padded items are left out.
    key: optional PRNG key for random tie-breaking among equal labels.

  Returns:
    [...] the loss of each list; 0 for an all-masked list.

  Example:
    >>> import jax.numpy as jnp
    >>> # Uniform logits: every order of 3 items has probability 1/6.
    >>> round(float(listmle_loss(jnp.zeros(3), jnp.array([2., 1., 0.]))), 4)
    1.7918

  References:
    Xia et al. Listwise Approach to Learning to Rank: Theory and Algorithm. ICML 2008.
    Rax: https://github.com/google/rax (rax.listmle_loss).
  """
  if key is not None:
    checks.check_key("key", key)
  logits, labels, valid = _check(logits, labels, where)
  loss = rax.listmle_loss(logits, labels, where=_rax_where(valid), key=key, reduce_fn=None)
  return _zero_if_empty(loss, valid)
