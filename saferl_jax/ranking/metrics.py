"""Ranking metrics and exposure: DCG@k, NDCG@k, MRR@k, ERR@k, P@k, Monte Carlo exposure and
expected metrics (floor 1).

Gain 2^y - 1 for a graded label y, discount 1 / log2(k + 2) at the 0-based rank k:

    DCG@k(y) = sum_{r<k} (2^label(y_r) - 1) / log2(r + 2),   NDCG@k = DCG@k / ideal DCG@k.

The exposure of item d under a ranking policy pi and rank weights theta is
omega(d | pi) = E_{y~pi}[theta_{rank(d|y)}] (0 past the last weighted rank),
estimated here from sampled rankings. One list per call ([D] labels, [K]
ranking; leading batch axes broadcast), vmap to batch. Padded items (`where`
False) have zero gain and zero exposure; a list with no relevant item has
NDCG 0, not NaN.

The metrics take rankings (permutations or top-k prefixes, e.g. sampled from a PL
policy), where rax's take scores: for scores s, the ranking `np.lexsort((-s, ~where))`
(valid items first, ties in index order, as rax's stable sort) gives rax's values,
which tests/ranking/test_rax_agreement.py checks. MRR and precision count an item as
relevant when its label is >= `threshold` (default 1, rax's rule).

References:
  Jarvelin, Kekalainen. Cumulated Gain-Based Evaluation of IR Techniques. TOIS 2002.
  Chapelle, Metzler, Zhang, Grinspan. Expected Reciprocal Rank for Graded Relevance. CIKM 2009.
  [PLR] Oosterhuis. Computationally Efficient Optimization of Plackett-Luce Ranking Models for Relevance and Fairness. SIGIR 2021. https://arxiv.org/abs/2105.00855
  [SAFE] Gupta, Oosterhuis, de Rijke. Safe Deployment for Counterfactual Learning to Rank with Exposure-Based Risk Minimization. SIGIR 2023. https://arxiv.org/abs/2305.01522
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.ranking.plackett_luce import (Generator, _check_rankings,
                                              sample_rankings)


class MetricEstimate(NamedTuple):
  """A Monte Carlo estimate of an expected ranking metric.

  Attributes:
    value: [...] the mean metric over the sampled rankings.
    per_sample: [num_samples, ...] the metric of each sampled ranking.
    stderr: [...] sample std / sqrt(num_samples).
  """
  value: jax.Array
  per_sample: jax.Array
  stderr: jax.Array


def _check_k(k: int, length: int, *, of: str = "rankings") -> None:
  checks.check_count("k", k)
  if k > length:
    if of == "rankings":
      raise ValueError(f"k: rankings need at least k={k} positions, got {length}")
    raise ValueError(f"k: must be <= the {length} items of {of}, got {k}")


def _check_labels(labels: ArrayLike, where: ArrayLike | None) -> tuple[jax.Array, jax.Array]:
  labels = checks.as_float("labels", labels)
  if labels.ndim < 1:
    raise ValueError(f"labels: expected an array [..., D], got shape {tuple(labels.shape)}")
  if where is None:
    return labels, jnp.ones(labels.shape, bool)
  where = jnp.asarray(where)
  if where.dtype != jnp.bool_:
    raise ValueError(f"where: must be a bool mask (True = valid), got dtype {where.dtype}")
  if where.ndim > labels.ndim or where.shape[-1] != labels.shape[-1]:
    raise ValueError(
        f"where: shape {tuple(where.shape)} must match the item axis of labels {tuple(labels.shape)}")
  try:
    where = jnp.broadcast_to(where, jnp.broadcast_shapes(where.shape, labels.shape))
  except ValueError:
    raise ValueError(f"where: shape {tuple(where.shape)} does not broadcast against labels "
                     f"{tuple(labels.shape)}") from None
  return labels, where


def _gains(labels: jax.Array, where: jax.Array) -> jax.Array:
  """2^label - 1 on valid items, 0 on padded ones (no NaN from padding values)."""
  checks.check_finite("labels", jnp.where(where, labels, 0.0))
  return jnp.where(where, jnp.exp2(jnp.where(where, labels, 0.0)) - 1.0, 0.0)


def dcg_rank_weights(k: int) -> jax.Array:
  """The DCG discounts of the first k ranks: theta_r = 1 / log2(r + 2), r = 0..k-1.

  Args:
    k: number of ranks.

  Returns:
    [k] float weights.

  Example:
    >>> [round(float(w), 4) for w in dcg_rank_weights(3)]
    [1.0, 0.6309, 0.5]
  """
  k = checks.check_count("k", k)
  ranks = jnp.arange(k, dtype=jnp.result_type(float))
  return 1.0 / jnp.log2(ranks + 2.0)


def _dcg_from_gains(gains: jax.Array, rankings: jax.Array, k: int) -> jax.Array:
  batch = jnp.broadcast_shapes(gains.shape[:-1], rankings.shape[:-1])
  gains = jnp.broadcast_to(gains, batch + gains.shape[-1:])
  top = jnp.broadcast_to(rankings[..., :k], batch + (k,))
  return jnp.sum(jnp.take_along_axis(gains, top, axis=-1) * dcg_rank_weights(k), axis=-1)


def _ideal_dcg(gains: jax.Array, k: int) -> jax.Array:
  top_gains = jax.lax.top_k(gains, min(k, gains.shape[-1]))[0]
  return jnp.sum(top_gains * dcg_rank_weights(top_gains.shape[-1]), axis=-1)


def dcg_at_k(labels: ArrayLike, rankings: ArrayLike, *, k: int,
             where: ArrayLike | None = None) -> jax.Array:
  """Discounted cumulative gain of the top k: sum_{r<k} (2^label(y_r) - 1) / log2(r + 2).

  Args:
    labels: [..., D] graded relevance labels.
    rankings: int [..., K] item indices in ranked order, K >= k.
    k: the cut-off.
    where: optional bool [..., D], True for valid items; padded items gain 0.

  Returns:
    [...] DCG@k.

  Example:
    >>> import jax.numpy as jnp
    >>> # gains 3, 1, 0: 3 / log2(2) + 0 / log2(3) = 3.
    >>> float(dcg_at_k(jnp.array([2., 1., 0.]), jnp.array([0, 2, 1]), k=2))
    3.0

  References:
    Jarvelin, Kekalainen. Cumulated Gain-Based Evaluation of IR Techniques. TOIS 2002.
  """
  labels, where = _check_labels(labels, where)
  rankings = _check_rankings(rankings, labels.shape[-1])
  _check_k(k, rankings.shape[-1])
  return _dcg_from_gains(_gains(labels, where), rankings, k)


def ndcg_at_k(labels: ArrayLike, rankings: ArrayLike, *, k: int,
              where: ArrayLike | None = None) -> jax.Array:
  """Normalised DCG: DCG@k(y) / DCG@k(ideal ranking), 0 when no valid item is relevant.

  Args:
    labels: [..., D] graded relevance labels.
    rankings: int [..., K] item indices in ranked order, K >= k.
    k: the cut-off.
    where: optional bool [..., D], True for valid items.

  Returns:
    [...] NDCG@k in [0, 1].

  Example:
    >>> import jax.numpy as jnp
    >>> # DCG 3 + 1 / log2(3) reached by the ideal order (0, 1, ...), 3 by (0, 2, ...).
    >>> round(float(ndcg_at_k(jnp.array([2., 1., 0.]), jnp.array([0, 2, 1]), k=2)), 4)
    0.8262

  References:
    Jarvelin, Kekalainen. Cumulated Gain-Based Evaluation of IR Techniques. TOIS 2002.
  """
  labels, where = _check_labels(labels, where)
  rankings = _check_rankings(rankings, labels.shape[-1])
  _check_k(k, rankings.shape[-1])
  gains = _gains(labels, where)
  dcg = _dcg_from_gains(gains, rankings, k)
  ideal = _ideal_dcg(gains, k)
  positive = ideal > 0
  return jnp.where(positive, dcg / jnp.where(positive, ideal, 1.0), 0.0)


def _top_k(labels: jax.Array, where: jax.Array, rankings: jax.Array,
           k: int) -> tuple[jax.Array, jax.Array]:
  """The labels [..., k] and validity [..., k] of the items at ranks 0..k-1."""
  batch = jnp.broadcast_shapes(labels.shape[:-1], rankings.shape[:-1])
  top = jnp.broadcast_to(rankings[..., :k], batch + (k,))
  labels = jnp.broadcast_to(labels, batch + labels.shape[-1:])
  where = jnp.broadcast_to(where, batch + where.shape[-1:])
  return (jnp.take_along_axis(labels, top, axis=-1), jnp.take_along_axis(where, top, axis=-1))


def _check_threshold(threshold) -> float:
  return float(checks.check_real("threshold", threshold))


def mrr_at_k(labels: ArrayLike, rankings: ArrayLike, *, k: int, threshold: float = 1.0,
             where: ArrayLike | None = None) -> jax.Array:
  """Reciprocal rank of the first relevant item in the top k: 1 / (r + 1), 0 if there is none.

  An item is relevant when it is valid and its label is >= `threshold` (default 1: on graded
  labels 0..4 every label above 0, as in rax's `mrr_metric`). Ranks count positions of the given
  ranking, so rank r is 0-based and the first position scores 1.

  Args:
    labels: [..., D] graded relevance labels.
    rankings: int [..., K] item indices in ranked order, K >= k.
    k: the cut-off.
    threshold: the smallest label that counts as relevant.
    where: optional bool [..., D], True for valid items; padded items are never relevant.

  Returns:
    [...] MRR@k in [0, 1] (the mean over lists is left to the caller).

  Example:
    >>> import jax.numpy as jnp
    >>> # Item 2 (label 1) is the first relevant one, at rank 1.
    >>> float(mrr_at_k(jnp.array([2., 0., 1.]), jnp.array([1, 2, 0]), k=3))
    0.5

  References:
    Voorhees. The TREC-8 Question Answering Track Report. TREC 1999.
  """
  relevant, _ = _relevant_in_top_k(labels, rankings, k, threshold, where)
  reciprocal = 1.0 / jnp.arange(1, k + 1, dtype=relevant.dtype)
  return jnp.max(jnp.where(relevant > 0, reciprocal, 0.0), axis=-1)


def _relevant_in_top_k(labels, rankings, k: int, threshold, where) -> tuple[jax.Array, jax.Array]:
  """(relevant, valid) [..., k] as floats: the top k items with label >= threshold, and the
  valid ones among them; checks the inputs (MRR and precision share it)."""
  labels, where = _check_labels(labels, where)
  rankings = _check_rankings(rankings, labels.shape[-1])
  _check_k(k, rankings.shape[-1])
  threshold = _check_threshold(threshold)
  checks.check_finite("labels", jnp.where(where, labels, 0.0))
  top_labels, top_valid = _top_k(labels, where, rankings, k)
  relevant = top_valid & (top_labels >= threshold)
  return relevant.astype(top_labels.dtype), top_valid.astype(top_labels.dtype)


def precision_at_k(labels: ArrayLike, rankings: ArrayLike, *, k: int, threshold: float = 1.0,
                   where: ArrayLike | None = None) -> jax.Array:
  """Fraction of the valid items in the top k that are relevant (label >= threshold).

    P@k = #{r < k : y_r valid and label(y_r) >= threshold} / #{r < k : y_r valid},

  0 when the top k holds no valid item. The denominator is the number of valid items shown,
  min(k, number of valid items) for a ranking that puts padding last (as rax's
  `precision_metric` does), not k as in trec_eval: a list of 3 valid, relevant items has P@5 = 1.

  Args:
    labels: [..., D] graded relevance labels.
    rankings: int [..., K] item indices in ranked order, K >= k.
    k: the cut-off.
    threshold: the smallest label that counts as relevant (default 1, as in rax).
    where: optional bool [..., D], True for valid items.

  Returns:
    [...] P@k in [0, 1].

  Example:
    >>> import jax.numpy as jnp
    >>> float(precision_at_k(jnp.array([2., 0., 1., 0.]), jnp.array([1, 2, 0, 3]), k=2))
    0.5

  References:
    Manning, Raghavan, Schuetze. Introduction to Information Retrieval, section 8.4. 2008.
  """
  relevant, valid = _relevant_in_top_k(labels, rankings, k, threshold, where)
  hits, shown = jnp.sum(relevant, axis=-1), jnp.sum(valid, axis=-1)
  return jnp.where(shown > 0, hits / jnp.maximum(shown, 1), 0.0)


def err_at_k(labels: ArrayLike, rankings: ArrayLike, *, k: int, max_label: float,
             where: ArrayLike | None = None) -> jax.Array:
  """Expected reciprocal rank of the top k (cascade user, Chapelle et al. 2009).

    ERR@k = sum_{r<k} (1 / (r + 1)) R_r prod_{i<r} (1 - R_i),   R = (2^label - 1) / 2^max_label,

  the probability that the user stops at rank r (satisfied with probability R), weighted by
  1 / (r + 1). Padded items have R = 0. rax 0.4 has no ERR metric to compare with.

  Args:
    labels: [..., D] graded relevance labels in [0, max_label].
    rankings: int [..., K] item indices in ranked order, K >= k.
    k: the cut-off.
    max_label: the top grade of the label scale (4 for the 0..4 LETOR grades, 1 for binary
      labels), a property of the scale, not of the list.
    where: optional bool [..., D], True for valid items.

  Returns:
    [...] ERR@k in [0, 1).

  Example:
    >>> import jax.numpy as jnp
    >>> # R = 3/4 at rank 0, then 1/4 at rank 1: 3/4 + (1/2)(1/4)(1/4) = 0.78125.
    >>> float(err_at_k(jnp.array([2., 1., 0.]), jnp.array([0, 1, 2]), k=2, max_label=2))
    0.78125

  References:
    Chapelle, Metzler, Zhang, Grinspan. Expected Reciprocal Rank for Graded Relevance. CIKM 2009.
  """
  labels, where = _check_labels(labels, where)
  rankings = _check_rankings(rankings, labels.shape[-1])
  _check_k(k, rankings.shape[-1])
  max_label = float(checks.check_real("max_label", max_label, low=0.0, open_low=True))
  checks.check_nonnegative("labels", labels, where=where, upper=max_label)
  top_labels, top_valid = _top_k(labels, where, rankings, k)
  stop = jnp.where(top_valid, jnp.exp2(jnp.where(top_valid, top_labels, 0.0)) - 1.0, 0.0)
  stop = stop / 2.0 ** max_label
  reach = jnp.cumprod(1.0 - stop, axis=-1)
  reach = jnp.concatenate([jnp.ones_like(reach[..., :1]), reach[..., :-1]], axis=-1)
  reciprocal = 1.0 / jnp.arange(1, k + 1, dtype=stop.dtype)
  return jnp.sum(reciprocal * stop * reach, axis=-1)


def exposure_from_samples(rankings: ArrayLike, rank_weights: ArrayLike, num_items: int, *,
                          where: ArrayLike | None = None) -> jax.Array:
  """Monte Carlo exposure: omega(d) = mean_i theta_{rank(d | y_i)}, 0 past len(theta).

  Args:
    rankings: int [N, ..., K] N sampled rankings (full, K = D, or top-K prefixes).
    rank_weights: [R] weights theta of the first R ranks (e.g. `dcg_rank_weights`).
    num_items: D, the number of items per list.
    where: optional bool [..., D]; padded items get exposure 0.

  Returns:
    [..., D] estimated exposure of every item.

  Example:
    >>> import jax.numpy as jnp
    >>> exposure_from_samples(jnp.array([[0, 1, 2], [1, 0, 2]]), jnp.array([1., .5]), 3).tolist()
    [0.75, 0.75, 0.0]

  References:
    [SAFE] Gupta, Oosterhuis, de Rijke. Safe Deployment for Counterfactual Learning to Rank with
    Exposure-Based Risk Minimization. SIGIR 2023. https://arxiv.org/abs/2305.01522
  """
  num_items = checks.check_count("num_items", num_items)
  rankings = _check_rankings(rankings, num_items)
  if rankings.ndim < 2:
    raise ValueError(f"rankings: expected [N, ..., K] sampled rankings, got shape {tuple(rankings.shape)}")
  rank_weights = checks.as_float("rank_weights", rank_weights)
  if rank_weights.ndim != 1:
    raise ValueError(f"rank_weights: expected a 1-d array [R], got shape {tuple(rank_weights.shape)}")
  checks.check_finite("rank_weights", rank_weights)
  used = min(rankings.shape[-1], rank_weights.shape[0])
  top = rankings[..., :used]
  flat = top.reshape(-1, used)
  per_sample = jax.vmap(
      lambda r: jnp.zeros(num_items, rank_weights.dtype).at[r].set(rank_weights[:used]))(flat)
  exposure = jnp.mean(per_sample.reshape(top.shape[:-1] + (num_items,)), axis=0)
  if where is not None:
    where = jnp.asarray(where)
    if where.dtype != jnp.bool_ or where.shape[-1] != num_items:
      raise ValueError(f"where: expected a bool mask [..., {num_items}], got {where.dtype} "
                       f"{tuple(where.shape)}")
    exposure = jnp.where(where, exposure, 0.0)
  return exposure


def expected_metric_from_samples(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    key: jax.Array,
    k: int,
    num_samples: int,
    metric: Literal["ndcg", "dcg"] = "ndcg",
    where: ArrayLike | None = None,
    generator: Generator = "hash",
    gain: Literal["exponential", "linear"] = "exponential",
) -> MetricEstimate:
  """Expected DCG@k or NDCG@k of a Plackett-Luce policy, E_{y~pi}[metric(y)], from samples.

  Draws `num_samples` top-k prefixes with `sample_rankings` (only the first k
  ranks matter to the metric) and averages their metric.

  Args:
    logits: [..., D] the policy's item logits.
    labels: [..., D] graded relevance labels.
    key: PRNG key for the samples.
    k: the metric's cut-off, 1 <= k <= D.
    num_samples: N, the number of sampled rankings.
    metric: "ndcg" (default) or "dcg".
    where: optional bool [..., D], True for valid items.
    generator: the Gumbel noise generator, see `sample_rankings`.
    gain: "exponential" (2^label - 1, the default everywhere here) or "linear" (the label
      itself, as the safe-CLTR authors' code evaluates NDCG@5 with gains label / 4).

  Returns:
    A `MetricEstimate` with value [...], per_sample [N, ...] and stderr [...].

  Example:
    >>> import jax, jax.numpy as jnp
    >>> est = expected_metric_from_samples(jnp.array([5., 0., 0.]), jnp.array([1., 0., 0.]),
    ...                                    key=jax.random.key(0), k=1, num_samples=1000)
    >>> bool(abs(est.value - 0.9867) < 4 * est.stderr)  # exact: e^5 / (e^5 + 2)
    True

  References:
    [PLR] Oosterhuis. Computationally Efficient Optimization of Plackett-Luce Ranking Models for
    Relevance and Fairness. SIGIR 2021. https://arxiv.org/abs/2105.00855
  """
  checks.check_key("key", key)
  if metric not in ("ndcg", "dcg"):
    raise ValueError(f"metric: must be 'ndcg' or 'dcg', got {metric!r}")
  if gain not in ("exponential", "linear"):
    raise ValueError(f"gain: must be 'exponential' or 'linear', got {gain!r}")
  checks.check_count("num_samples", num_samples)
  labels, valid = _check_labels(labels, where)
  logits = checks.as_float("logits", logits)
  if logits.shape[-1:] != labels.shape[-1:]:
    raise ValueError(f"labels: item axis {labels.shape[-1]} does not match logits {logits.shape[-1]}")
  _check_k(k, logits.shape[-1], of="logits")
  rankings = sample_rankings(logits, key=key, where=where, sample_shape=(num_samples,), k=k,
                             generator=generator)
  gains = _gains(labels, valid) if gain == "exponential" else jnp.where(valid, labels, 0.0)
  per_sample = _dcg_from_gains(gains, rankings, k)
  if metric == "ndcg":
    ideal = _ideal_dcg(gains, k)
    positive = ideal > 0
    per_sample = jnp.where(positive, per_sample / jnp.where(positive, ideal, 1.0), 0.0)
  stderr = (jnp.std(per_sample, axis=0, ddof=1) / np.sqrt(num_samples) if num_samples > 1
            else jnp.full(per_sample.shape[1:], jnp.inf, per_sample.dtype))
  return MetricEstimate(jnp.mean(per_sample, axis=0), per_sample, stderr)
