"""The gradient of a click-log objective through a Plackett-Luce ranker (floor 1).

`ascent_direction` estimates every query's exposures from rankings sampled from the ranker's
policy, takes the objective's gradient with respect to them, turns it into a gradient of the
logits with PL-Rank (`exposure_objective_gradient`) and back-propagates it through the ranker
(one vjp). `saferl_jax.training.train_ranker` takes optax steps along it.

References:
  [PLR] Oosterhuis. Learning-to-Rank at the Speed of Sampling. SIGIR 2022. https://arxiv.org/abs/2204.10872
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.cltr.estimators import logged_objective
from saferl_jax.ranking.exposure_gradient import exposure_objective_gradient
from saferl_jax.ranking.metrics import exposure_from_samples
from saferl_jax.ranking.plackett_luce import sample_rankings


class RankingData(NamedTuple):
  """What a ranker learns from, per query (add a leading seed axis to train several seeds).

  Attributes:
    features: [Q, D, F] document features.
    where: [Q, D] bool, True for real documents.
    rewards: [Q, D] R_q(d): the summed per-session reward estimates (`click_logs.estimated_rewards`).
    session_counts: [Q] n_q, sessions per query.
    logging_exposure: [Q, D] the logging policy's exposures (same rank weights as training).
  """
  features: jax.Array
  where: jax.Array
  rewards: jax.Array
  session_counts: jax.Array
  logging_exposure: jax.Array

class SupervisedData(NamedTuple):
  """`relevance_data`'s result: the `RankingData` and the number of sessions it stands for."""
  data: RankingData
  num_sessions: int


class AscentDirection(NamedTuple):
  """`ascent_direction`'s result: the gradient w.r.t. params and the objective it ascends."""
  gradient: Any
  objective: jax.Array


def relevance_data(features: ArrayLike, labels: ArrayLike, where: ArrayLike, *,
                   max_label: int = 4) -> SupervisedData:
  """(data, num_sessions) for supervised learning: one session per query with rewards label / max_label.

  With the "value" objective this maximises the mean over queries of sum_d omega(d) R(d), the
  expected DCG-like metric of the rank weights.

  Args:
    features: [Q, D, F] document features.
    labels: [Q, D] graded labels 0..max_label.
    where: [Q, D] bool, True for real documents.
    max_label: the label with relevance 1.
  """
  if isinstance(max_label, bool) or not isinstance(max_label, (int, np.integer)) or max_label < 1:
    raise ValueError(f"max_label: must be a positive int, got {max_label!r}")
  features, where = checks.as_float("features", features), jnp.asarray(where, bool)
  labels = checks.as_float("labels", labels)
  if features.ndim != 3 or labels.shape != features.shape[:2] or where.shape != labels.shape:
    raise ValueError(f"features/labels/where: expected [Q, D, F], [Q, D], [Q, D], got shapes "
                     f"{tuple(features.shape)}, {tuple(labels.shape)}, {tuple(where.shape)}")
  checks.check_finite("features", features, where=where[..., None])
  checks.check_nonnegative("labels", labels, where=where, upper=max_label)
  relevance = jnp.where(where, labels / max_label, 0.0)
  num_queries = relevance.shape[0]
  data = RankingData(features, where, relevance, jnp.ones(num_queries), jnp.zeros_like(relevance))
  return SupervisedData(data, num_queries)


def check_ranking_data(data: RankingData) -> None:
  features, where = data.features, data.where
  if features.ndim < 3:
    raise ValueError(f"data.features: expected [..., Q, D, F], got shape {tuple(features.shape)}")
  lists = features.shape[:-1]
  for name in ("where", "rewards", "logging_exposure"):
    if getattr(data, name).shape != lists:
      raise ValueError(f"data.{name}: expected shape {lists} like the features' lists, "
                       f"got {tuple(getattr(data, name).shape)}")
  if data.session_counts.shape != lists[:-1]:
    raise ValueError(f"data.session_counts: expected shape {lists[:-1]}, got "
                     f"{tuple(data.session_counts.shape)}")
  if where.dtype != jnp.bool_:
    raise ValueError(f"data.where: must be bool, got {where.dtype}")
  for name in ("features", "rewards"):
    checks.check_finite(f"data.{name}", getattr(data, name))
  for name in ("session_counts", "logging_exposure"):
    checks.check_nonnegative(f"data.{name}", getattr(data, name))


def estimated_objective(apply_fn: Callable, params, data: RankingData, *, key: jax.Array,
                        objective: str, num_sessions: int, rank_weights: jax.Array,
                        num_samples: int, delta: float, clip_low: float, clip_high: float,
                        quantile: float = 0.5) -> jax.Array:
  """The objective (`logged_objective`) of the ranker's policy at exposures from `num_samples`
  sampled rankings per query; on held-out logged queries, the estimate early stopping watches."""
  checks.check_key("key", key)
  check_ranking_data(data)
  checks.check_positive_int("num_samples", num_samples)
  logits = apply_fn(params, data.features)
  k = min(rank_weights.shape[0], logits.shape[-1])
  rankings = sample_rankings(logits, key=key, where=data.where, sample_shape=num_samples, k=k)
  exposure = exposure_from_samples(rankings, rank_weights[:k], logits.shape[-1], where=data.where)
  return logged_objective(exposure, data.logging_exposure, data.rewards, data.session_counts,
                          objective=objective, num_sessions=num_sessions, delta=delta,
                          clip_low=clip_low, clip_high=clip_high, quantile=quantile,
                          where=data.where)


def ascent_direction(apply_fn: Callable, params, data: RankingData, *, key: jax.Array,
                     objective: str, num_sessions: int, rank_weights: jax.Array, num_samples: int,
                     delta: float, clip_low: float, clip_high: float,
                     quantile: float = 0.5) -> AscentDirection:
  """(gradient of the objective w.r.t. params, the objective at the estimated exposures)."""
  checks.check_key("key", key)
  check_ranking_data(data)
  checks.check_positive_int("num_samples", num_samples)
  logits, pullback = jax.vjp(lambda p: apply_fn(p, data.features), params)

  def objective_fn(exposure):
    return logged_objective(exposure, data.logging_exposure, data.rewards, data.session_counts,
                            objective=objective, num_sessions=num_sessions, delta=delta,
                            clip_low=clip_low, clip_high=clip_high, quantile=quantile,
                            where=data.where)

  logit_gradient, exposure = exposure_objective_gradient(
      logits, objective_fn, rank_weights, key=key, num_samples=num_samples, where=data.where)
  (gradient,) = pullback(logit_gradient)
  return AscentDirection(gradient, objective_fn(exposure))
