"""Simulated click logs of a Plackett-Luce logging policy, kept as counts per query (floor 2).

Every estimator in `estimators.py` is affine in the clicks, so a log of N sessions is fully
described, for learning, by n_q (sessions per query), the click counts per (query, document)
and the logger's policy-aware propensities: [Q] + 3 [Q, D] numbers whatever N is. That lets a
run with 1e7 sessions train as fast as one with 1e2. Sessions are simulated in chunks (query
drawn uniformly, a top-K ranking sampled from the logger, clicks from the click model), so
memory stays bounded.

With `rank_counts=True` the log also keeps impressions and clicks per (query, document, rank),
the sufficient statistics from which `bias_estimation.estimate_bias` fits alpha and beta; the
propensities can come from a model other than the users' (`assumed_model`: what the estimator
believes), and `with_click_model` recomputes them under another (e.g. estimated) model.
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.cltr.bias_estimation import RankCounts, rank_counts as count_ranks
from saferl_jax.cltr.clicks import ClickModel, check_click_model, simulate_sessions
from saferl_jax.cltr.estimators import policy_aware_propensities, propensity_floor, query_rewards
from saferl_jax.cltr.reward_model import fit_reward_regression, predict_rewards
from saferl_jax.ranking.plackett_luce import sample_rankings


class ClickLog(NamedTuple):
  """N logged sessions, aggregated per query.

  Attributes:
    session_counts: [Q] n_q, sessions of each query.
    click_counts: [Q, D] clicks on each document, summed over the query's sessions.
    rho: [Q, D] the logger's policy-aware alpha propensities.
    betabar: [Q, D] the logger's policy-aware beta propensities.
    rank_counts: optional `RankCounts`, impressions and clicks [Q, D, K] per rank (for
      `estimate_bias`); None unless the log was simulated with `rank_counts=True`.
  """
  session_counts: jax.Array
  click_counts: jax.Array
  rho: jax.Array
  betabar: jax.Array
  rank_counts: RankCounts | None = None

  @property
  def num_sessions(self) -> int:
    return int(np.asarray(self.session_counts).sum())


class SessionCounts(NamedTuple):
  """Sessions aggregated per query: session_counts [Q] and click_counts [Q, D]."""
  session_counts: jax.Array
  click_counts: jax.Array


def aggregate_sessions(query_ids: ArrayLike, rankings: ArrayLike, clicks: ArrayLike, *,
                       num_queries: int, num_docs: int) -> SessionCounts:
  """(session_counts [Q], click_counts [Q, D]) from sessions (q_i [N], displayed [N, K], clicks [N, K])."""
  num_queries = checks.check_count("num_queries", num_queries)
  num_docs = checks.check_count("num_docs", num_docs)
  query_ids = checks.as_index("query_ids", query_ids, num_queries, what="query")
  rankings = checks.as_index("rankings", rankings, num_docs, what="document")
  clicks = jnp.asarray(clicks)
  session_counts = jnp.zeros(num_queries, clicks.dtype).at[query_ids].add(1.0)
  click_counts = jnp.zeros((num_queries, num_docs), clicks.dtype).at[
      query_ids[:, None], rankings].add(clicks)
  return SessionCounts(session_counts, click_counts)


def simulate_click_log(logging_logits: ArrayLike, labels: ArrayLike, click_model, *,
                       key: jax.Array, num_sessions: int,
                       where: ArrayLike | None = None, propensity_samples: int = 10_000,
                       chunk_size: int = 1_000_000, max_label: int = 4,
                       assumed_model: ClickModel | None = None,
                       rank_counts: bool = False) -> ClickLog:
  """Logs `num_sessions` sessions of the PL logging policy under `click_model`, aggregated.

  The propensities are computed from the alpha and beta of `assumed_model`, the estimator's
  belief about the users, by default the click model itself (its flip probability is what an
  honest estimator cannot know: adversarial clicks stay unexplained, as in [PRPO]). A click
  model that is not an affine `ClickModel` (one that `simulate_sessions` accepts, such as a
  cascade) needs an `assumed_model`.

  Args:
    logging_logits: [Q, D] the logger's logits per query.
    labels: [Q, D] graded labels 0..max_label (the simulated users' relevance).
    click_model: the users' click model, given to `simulate_sessions`.
    key: PRNG key; the same key and `chunk_size` give the same log. Each chunk draws from its
      own key, so another `chunk_size` gives another log from the same distribution (the
      propensities, drawn before chunking from `jax.random.split(key)[0]`, do not change).
    num_sessions: N >= 1.
    where: optional [Q, D] document mask.
    propensity_samples: logger rankings per query for the propensities.
    chunk_size: sessions simulated per call (bounds memory; part of what fixes the draw).
    max_label: the label with relevance probability 1.
    assumed_model: the affine `ClickModel` the propensities are computed with; its number of
      ranks K (capped at D) is the displayed list length. Default: `click_model`.
    rank_counts: also keep the `RankCounts` [Q, D, K] in the log (for `estimate_bias`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from saferl_jax.cltr.clicks import position_based
    >>> log = simulate_click_log(jnp.zeros((3, 4)), jnp.zeros((3, 4), int), position_based(2),
    ...                          key=jax.random.key(0), num_sessions=100)
    >>> log.num_sessions, log.click_counts.shape, float(log.click_counts.sum())
    (100, (3, 4), 0.0)
  """
  checks.check_key("key", key)
  if assumed_model is None:
    if not isinstance(click_model, ClickModel):
      raise ValueError(f"assumed_model: required when click_model is not an affine ClickModel "
                       f"(got a {type(click_model).__name__}): the propensities need the alpha "
                       "and beta an estimator assumes")
    check_click_model(click_model, name="click_model")
    assumed_model = click_model
  else:
    check_click_model(assumed_model, name="assumed_model")
    if isinstance(click_model, ClickModel):
      check_click_model(click_model, name="click_model")
  if not isinstance(rank_counts, (bool, np.bool_)):
    raise TypeError(f"rank_counts: must be a bool, got {type(rank_counts).__name__} {rank_counts!r}")
  logging_logits = checks.as_float("logging_logits", logging_logits)
  labels = checks.as_int("labels", labels)
  checks.check_ndim("logging_logits", logging_logits, 2)
  if labels.shape != logging_logits.shape:
    raise ValueError(f"labels: expected shape {tuple(logging_logits.shape)} like logging_logits, "
                     f"got {tuple(labels.shape)}")
  for name, value in (("num_sessions", num_sessions), ("propensity_samples", propensity_samples),
                      ("chunk_size", chunk_size), ("max_label", max_label)):
    checks.check_count(name, value)
  num_queries, num_docs = logging_logits.shape
  k = min(int(jnp.shape(assumed_model.alpha)[0]), num_docs)
  valid = jnp.ones(labels.shape, bool) if where is None else jnp.asarray(where, bool)
  propensity_key, session_key = jax.random.split(key)
  rho, betabar = _propensities(propensity_key, logging_logits, assumed_model, valid,
                               int(propensity_samples))
  session_counts = jnp.zeros(num_queries)
  click_counts = jnp.zeros((num_queries, num_docs))
  ranks = RankCounts(jnp.zeros((num_queries, num_docs, k)), jnp.zeros((num_queries, num_docs, k)))
  for start in range(0, num_sessions, chunk_size):
    size = min(chunk_size, num_sessions - start)
    chunk_key = jax.random.fold_in(session_key, start // chunk_size)
    query_key, ranking_key, click_key = jax.random.split(chunk_key, 3)
    query_ids = jax.random.randint(query_key, (size,), 0, num_queries)
    rankings = sample_rankings(logging_logits[query_ids], key=ranking_key, where=valid[query_ids],
                               k=k)
    clicks = simulate_sessions(click_model, query_ids, rankings, labels, key=click_key, k=k,
                               where=valid, max_label=max_label)
    counts, chunk_clicks = _aggregate(query_ids, rankings, clicks, num_queries, num_docs)
    session_counts, click_counts = session_counts + counts, click_counts + chunk_clicks
    if rank_counts:
      chunk_ranks = count_ranks(query_ids, rankings, clicks, num_queries=num_queries,
                                num_docs=num_docs)
      ranks = RankCounts(ranks.impressions + chunk_ranks.impressions,
                         ranks.clicks + chunk_ranks.clicks)
  return ClickLog(session_counts, click_counts, rho, betabar, ranks if rank_counts else None)


def with_click_model(log: ClickLog, logging_logits: ArrayLike, model: ClickModel, *,
                     key: jax.Array, where: ArrayLike | None = None,
                     propensity_samples: int = 10_000) -> ClickLog:
  """The same log with rho and betabar recomputed under another affine click model.

  The clicks stay; only the estimator's belief changes, e.g. to the `.click_model` of an
  `estimate_bias` fit. With `key = jax.random.split(k)[0]` (and the same `where` and
  `propensity_samples`) the propensities equal those of `simulate_click_log(..., key=k,
  assumed_model=model)`.

  Args:
    log: a `ClickLog` of the PL logging policy with logits `logging_logits`.
    logging_logits: [Q, D] the logger's logits per query.
    model: the affine `ClickModel` to compute the propensities with.
    key: PRNG key of the logger rankings sampled for the propensities.
    where: optional [Q, D] document mask.
    propensity_samples: logger rankings per query for the propensities.

  Returns:
    A `ClickLog` with new rho and betabar [Q, D] and every other field unchanged.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from saferl_jax.cltr.clicks import position_based
    >>> log = ClickLog(jnp.array([10.0, 5.0]), jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.zeros((2, 3)))
    >>> pbm = with_click_model(log, jnp.zeros((2, 3)), position_based(2), key=jax.random.key(1))
    >>> [round(v, 1) for v in pbm.rho[0].tolist()]  # (1 + 1/2) / 3 at each of 3 equal documents
    [0.5, 0.5, 0.5]
  """
  if not isinstance(log, ClickLog):
    raise ValueError(f"log: must be a ClickLog, got {type(log).__name__}")
  checks.check_key("key", key)
  check_click_model(model, name="model")
  checks.check_count("propensity_samples", propensity_samples)
  logging_logits = checks.as_float("logging_logits", logging_logits)
  checks.check_ndim("logging_logits", logging_logits, 2)
  if logging_logits.shape != jnp.shape(log.click_counts):
    raise ValueError(f"logging_logits: expected shape {tuple(jnp.shape(log.click_counts))} like the "
                     f"log's click_counts, got {tuple(logging_logits.shape)}")
  valid = jnp.ones(logging_logits.shape, bool) if where is None else jnp.asarray(where, bool)
  if valid.shape != logging_logits.shape:
    raise ValueError(f"where: expected shape {tuple(logging_logits.shape)}, got {tuple(valid.shape)}")
  rho, betabar = _propensities(key, logging_logits, model, valid, int(propensity_samples))
  return log._replace(rho=rho, betabar=betabar)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _aggregate(query_ids, rankings, clicks, num_queries, num_docs):
  return aggregate_sessions(query_ids, rankings, clicks, num_queries=num_queries, num_docs=num_docs)


@functools.partial(jax.jit, static_argnums=(4,))
def _propensities(key, logging_logits, click_model, valid, num_samples):
  keys = jax.random.split(key, logging_logits.shape[0])
  return jax.lax.map(lambda args: policy_aware_propensities(
      args[1], click_model, key=args[0], num_samples=num_samples, where=args[2]),
      (keys, logging_logits, valid), batch_size=16)


def estimated_rewards(log: ClickLog, *, estimator: str, features: ArrayLike | None = None,
                      where: ArrayLike | None = None, min_propensity: float | None = None,
                      l2: float = 1.0, reward_hat: ArrayLike | None = None) -> jax.Array:
  """R_q(d) [Q, D], the summed per-session IPS or DR rewards of every query (see `query_rewards`).

  Args:
    log: a `ClickLog`.
    estimator: "ips", or "dr" (then `features` [Q, D, F] fit the regression model: ridge on the
      clipped IPS estimates, weighted by sessions; see `reward_model`).
    where: optional [Q, D] document mask.
    min_propensity: clipping threshold; default `propensity_floor(N)` = min(1, 10 / sqrt(N)).
    l2: the ridge penalty of DR's regression model.
    reward_hat: optional [Q, D] predictions of another regression model for DR (e.g. the
      network of `training.reward_network`, fitted to `ips_regression_targets`); then no ridge
      model is fitted and `features` is not needed.
  """
  if estimator not in ("ips", "dr"):
    raise ValueError(f"estimator: must be 'ips' or 'dr', got {estimator!r}")
  if min_propensity is not None:
    checks.check_real("min_propensity", min_propensity, low=0.0, high=1.0)
  checks.check_real("l2", l2, low=0.0)
  if min_propensity is None:
    if log.num_sessions < 1:  # no silent floor of propensity_floor(1) = 1 for an empty log
      raise ValueError("log: has no sessions, so the default min_propensity = propensity_floor(N) "
                       "is undefined; pass min_propensity or a log with sessions")
    min_propensity = propensity_floor(log.num_sessions)
  fields = (log.session_counts, log.click_counts, log.rho, log.betabar)
  ips = jax.vmap(lambda n, c, r, b: query_rewards(n, c, r, b, min_propensity=min_propensity))(
      *fields)
  if estimator == "ips":
    return ips
  if reward_hat is not None:
    reward_hat = checks.as_float("reward_hat", reward_hat)
    if reward_hat.shape != ips.shape:
      raise ValueError(f"reward_hat: expected shape {tuple(ips.shape)} like the log's click "
                       f"counts, got {tuple(reward_hat.shape)}")
    checks.check_finite("reward_hat", reward_hat)
    return jax.vmap(lambda n, c, r, b, rh: query_rewards(
        n, c, r, b, reward_hat=rh, min_propensity=min_propensity))(*fields, reward_hat)
  if features is None:
    raise ValueError("features: DR needs the documents' features for its regression model")
  weights = log.session_counts[:, None] * (log.rho > 0)
  if where is not None:
    weights = jnp.where(where, weights, 0.0)
  mean_ips = ips / jnp.maximum(log.session_counts, 1.0)[:, None]
  model = fit_reward_regression(features, mean_ips, weights, l2=l2)
  reward_hat = predict_rewards(model, features, where=where)
  return jax.vmap(lambda n, c, r, b, rh: query_rewards(
      n, c, r, b, reward_hat=rh, min_propensity=min_propensity))(*fields, reward_hat)


class RegressionTargets(NamedTuple):
  """`ips_regression_targets`' result, per (query, document) [Q, D]."""
  ips_targets: jax.Array
  propensity_ratios: jax.Array
  weights: jax.Array


def ips_regression_targets(log: ClickLog, *, where: ArrayLike | None = None,
                           min_propensity: float | None = None) -> RegressionTargets:
  """What a DR regression model learns from: rt = (cbar - betabar) / rho_c, a = rho / rho_c, and
  weights 1 for every displayed document of a logged query (each query counts once, as in the
  [PRPO] authors' code), 0 elsewhere. See `cltr.counterfactual_cross_entropy`.

  Example:
    >>> import jax.numpy as jnp
    >>> log = ClickLog(jnp.array([4.0]), jnp.array([[2.0, 0.0]]), jnp.array([[0.5, 0.0]]),
    ...                jnp.array([[0.1, 0.0]]))
    >>> targets = ips_regression_targets(log, min_propensity=0.0)
    >>> [round(v, 3) for v in targets.ips_targets[0].tolist()], targets.weights.tolist()
    ([0.8, 0.0], [[1.0, 0.0]])
  """
  if min_propensity is None:
    min_propensity = propensity_floor(max(log.num_sessions, 1))
  checks.check_real("min_propensity", min_propensity, low=0.0, high=1.0)
  clipped = jnp.maximum(log.rho, min_propensity)
  shown = (log.rho > 0) & (log.session_counts[:, None] > 0)
  if where is not None:
    shown = shown & jnp.asarray(where, bool)
  mean_clicks = log.click_counts / jnp.maximum(log.session_counts, 1.0)[:, None]
  safe = jnp.where(shown, clipped, 1.0)
  return RegressionTargets(jnp.where(shown, (mean_clicks - log.betabar) / safe, 0.0),
                           jnp.where(shown, log.rho / safe, 0.0), shown.astype(log.rho.dtype))
