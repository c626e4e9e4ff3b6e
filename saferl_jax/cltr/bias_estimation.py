"""Estimating the affine trust-bias parameters alpha, beta from click logs by EM (floor 1).

The affine click model (`clicks.ClickModel`) says P(click | d at rank k) = alpha_k R_d + beta_k.
Here R_qd is unknown: EM treats the relevance of each impression as a latent binary variable,
relevant with probability gamma_qd; a relevant document at rank k is clicked with probability
alpha_k + beta_k, a non-relevant one with probability beta_k (Agarwal et al.'s trust bias, with
examination and trust folded into the two per-rank numbers). The clicks of a log are then fully
described by the counts per (query, document, rank) in `RankCounts`: impressions n_qdk and clicks
c_qdk, and EM runs on those [Q, D, K] arrays, whatever the number of sessions.

Identifiability comes from the logging policy's randomisation: the same document must be shown at
several ranks, so that its relevance and the ranks' bias can be told apart. Even then the model
is only identified up to an affine map of the relevance: R' = a R + b with alpha' = alpha / a and
beta' = beta - alpha b / a give the same click probabilities, hence the same likelihood.
`estimate_bias` fixes the map by a normalisation (the documents with at least `min_impressions`
impressions span relevance [0, 1]); the affine-corrected estimators do not depend on that choice
for ranking (see `estimate_bias`).

This follows the EM of HarrieO/2022-doubly-robust-LTR, utils/bias_estimation.py
(`EM_estimate_bias`: posteriors P(r | click) per (document, rank), then alpha + beta and beta as
the click rates of relevant and non-relevant impressions), with one difference: the relevance
there is a regression network on the features, refitted at every step, while here it is one
free parameter gamma_qd per document with a closed-form M step (no features, no optimiser).

References:
  Agarwal, Zaitsev, Wang, Li, Najork, Joachims. Estimating Position Bias without Intrusive
  Interventions. WSDM 2019 (trust bias). https://arxiv.org/abs/1812.05161
  Wang, Golbandi, Bendersky, Metzler, Najork. Position Bias Estimation for Unbiased Learning to
  Rank in Personal Search. WSDM 2018 (regression EM). https://research.google/pubs/pub46485/
  [DR-LTR] Oosterhuis. Doubly-Robust Estimation for Correcting Position-Bias in Click Feedback
  for Unbiased Learning to Rank. TOIS 2023. https://arxiv.org/abs/2203.17118
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.cltr.clicks import ClickModel


class RankCounts(NamedTuple):
  """Sufficient statistics of a click log for the affine model, per (query, document, rank).

  Attributes:
    impressions: [Q, D, K] n_qdk, sessions of query q that showed document d at rank k.
    clicks: [Q, D, K] c_qdk, the clicks among those impressions.
  """
  impressions: jax.Array
  clicks: jax.Array


class BiasEstimate(NamedTuple):
  """The EM fit of the affine click model, after the normalisation of `estimate_bias`.

  Attributes:
    alpha: [K] estimated slope of P(click) in the relevance, per rank.
    beta: [K] estimated click probability of a non-relevant document, per rank.
    relevance: [Q, D] estimated relevance probabilities, clipped to [0, 1]; 0 for masked
      documents and documents never shown.
    num_iterations: the number of EM steps taken.
    log_likelihood: sum over (q, d, k) of c log p + (n - c) log(1 - p), p = alpha_k R_qd + beta_k,
      at the returned parameters (binomial coefficients left out; invariant to the normalisation).
  """
  alpha: jax.Array
  beta: jax.Array
  relevance: jax.Array
  num_iterations: jax.Array
  log_likelihood: jax.Array

  @property
  def click_model(self) -> ClickModel:
    """The estimate as an honest affine `ClickModel`, for `policy_aware_propensities` and the logs."""
    return ClickModel(self.alpha, self.beta, 0.0)


def rank_counts(query_ids: ArrayLike, rankings: ArrayLike, clicks: ArrayLike, *,
                num_queries: int, num_docs: int) -> RankCounts:
  """Impressions and clicks per (query, document, rank) from N logged sessions.

  n_qdk = sum_i 1[q_i = q, y_i(k) = d],  c_qdk = sum_i 1[q_i = q, y_i(k) = d] c_i(k).

  Args:
    query_ids: [N] int query of each session, in [0, Q).
    rankings: [N, K] int displayed documents (indices in [0, D)), rank 0 first.
    clicks: [N, K] clicks (0 or 1) at each displayed rank.
    num_queries: Q.
    num_docs: D.

  Returns:
    `RankCounts` with impressions and clicks of shape [Q, D, K] (floats). Jittable with
    `num_queries` and `num_docs` static; index ranges are checked on concrete input only.

  Example:
    >>> import jax.numpy as jnp
    >>> counts = rank_counts(jnp.array([0, 0]), jnp.array([[0, 1], [1, 0]]),
    ...                      jnp.array([[1., 0.], [1., 1.]]), num_queries=1, num_docs=2)
    >>> counts.impressions[0].tolist(), counts.clicks[0].tolist()
    ([[1.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 0.0]])
  """
  num_queries = checks.check_count("num_queries", num_queries)
  num_docs = checks.check_count("num_docs", num_docs)
  query_ids = checks.as_index("query_ids", query_ids, num_queries, what="query id")
  rankings = checks.as_index("rankings", rankings, num_docs, what="document index")
  clicks = checks.as_float("clicks", clicks)
  if query_ids.ndim != 1:
    raise ValueError(f"query_ids: expected [N], got shape {tuple(query_ids.shape)}")
  if rankings.ndim != 2 or rankings.shape[0] != query_ids.shape[0] or rankings.shape[1] == 0:
    raise ValueError(f"rankings: expected [N, K] with N = {query_ids.shape[0]} sessions and K >= 1, "
                     f"got shape {tuple(rankings.shape)}")
  if clicks.shape != rankings.shape:
    raise ValueError(f"clicks: expected the shape of rankings {tuple(rankings.shape)}, got "
                     f"{tuple(clicks.shape)}")
  checks.check_nonnegative("clicks", clicks, upper=1.0)
  return _rank_counts(query_ids, rankings, clicks, num_queries, num_docs)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _rank_counts(query_ids, rankings, clicks, num_queries, num_docs):
  k = rankings.shape[1]
  index = (query_ids[:, None], rankings, jnp.arange(k)[None, :])
  zeros = jnp.zeros((num_queries, num_docs, k), clicks.dtype)
  return RankCounts(zeros.at[index].add(1.0), zeros.at[index].add(clicks))


def _safe_divide(numerator, denominator):
  """numerator / denominator, 0 where the denominator is 0 (no NaN value or gradient)."""
  positive = denominator > 0
  return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def _log_likelihood(impressions, clicks, alpha, beta, gamma):
  tiny = jnp.finfo(impressions.dtype).tiny
  p = jnp.clip(alpha * gamma[..., None] + beta, 0.0, 1.0)
  click_term = jnp.where(clicks > 0, clicks * jnp.log(jnp.maximum(p, tiny)), 0.0)
  skips = impressions - clicks
  skip_term = jnp.where(skips > 0, skips * jnp.log(jnp.maximum(1.0 - p, tiny)), 0.0)
  return jnp.sum(click_term + skip_term)


def _em_step(impressions, clicks, alpha, beta, gamma):
  """One EM step: posteriors of relevance per (q, d, k) and click outcome, then closed-form M."""
  g = gamma[..., None]
  p = jnp.clip(alpha * g + beta, 0.0, 1.0)
  # Posteriors are probabilities; clipping keeps float error near p = 0 or 1 (degenerate fits
  # on small logs) from pushing a count above the impressions and a rate outside [0, 1].
  relevant_if_click = jnp.clip(_safe_divide((alpha + beta) * g, p), 0.0, 1.0)       # P(r=1|c=1)
  relevant_if_skip = jnp.clip(_safe_divide((1.0 - alpha - beta) * g, 1.0 - p), 0.0, 1.0)  # P(r=1|c=0)
  relevant_clicks = clicks * relevant_if_click
  relevant = relevant_clicks + (impressions - clicks) * relevant_if_skip   # E[# relevant]
  per_doc = jnp.sum(impressions, axis=-1)
  gamma = jnp.where(per_doc > 0, _safe_divide(jnp.sum(relevant, axis=-1), per_doc), gamma)
  relevant_k = jnp.sum(relevant, axis=(0, 1))
  irrelevant_k = jnp.sum(impressions - relevant, axis=(0, 1))
  click_if_relevant = jnp.where(relevant_k > 0, _safe_divide(
      jnp.sum(relevant_clicks, axis=(0, 1)), relevant_k), alpha + beta)
  beta = jnp.where(irrelevant_k > 0, _safe_divide(
      jnp.sum(clicks - relevant_clicks, axis=(0, 1)), irrelevant_k), beta)
  click_if_relevant, beta = jnp.clip(click_if_relevant, 0.0, 1.0), jnp.clip(beta, 0.0, 1.0)
  return click_if_relevant - beta, beta, jnp.clip(gamma, 0.0, 1.0)


@jax.jit
def _fit(impressions, clicks, where, max_iterations, tolerance, min_impressions):
  impressions = jnp.where(where[..., None], impressions, 0.0)
  clicks = jnp.where(where[..., None], clicks, 0.0)
  num_ranks = impressions.shape[-1]
  per_doc = jnp.sum(impressions, axis=-1)
  # Start: relevance = the document's click rate, a bias that fits no rank in particular.
  gamma = jnp.clip(_safe_divide(jnp.sum(clicks, axis=-1), per_doc), 0.05, 0.95)
  alpha = jnp.full(num_ranks, 0.5, impressions.dtype)
  beta = jnp.full(num_ranks, 0.25, impressions.dtype)

  def cond(state):
    i, _, _, _, change = state
    return (i < max_iterations) & (change > tolerance)

  def body(state):
    i, alpha, beta, gamma, _ = state
    new_alpha, new_beta, new_gamma = _em_step(impressions, clicks, alpha, beta, gamma)
    change = jnp.maximum(jnp.max(jnp.abs(new_alpha - alpha)), jnp.max(jnp.abs(new_beta - beta)))
    return i + 1, new_alpha, new_beta, new_gamma, change

  state = (jnp.asarray(0), alpha, beta, gamma, jnp.asarray(jnp.inf, impressions.dtype))
  num_iterations, alpha, beta, gamma, _ = jax.lax.while_loop(cond, body, state)
  log_likelihood = _log_likelihood(impressions, clicks, alpha, beta, gamma)

  # Normalisation: the well-shown documents' relevances span [0, 1], oriented so that a relevant
  # document draws more clicks (sum_k alpha_k >= 0).
  shown = where & (per_doc > 0) & (per_doc >= min_impressions)
  low = jnp.min(jnp.where(shown, gamma, jnp.inf))
  high = jnp.max(jnp.where(shown, gamma, -jnp.inf))
  spread = high - low
  usable = jnp.any(shown) & (spread > 0)
  low, high = jnp.where(jnp.sum(alpha) >= 0, low, high), jnp.where(jnp.sum(alpha) >= 0, high, low)
  scale, low = jnp.where(usable, high - low, 1.0), jnp.where(usable, low, 0.0)
  beta = beta + alpha * low
  alpha = alpha * scale
  relevance = jnp.where(where & (per_doc > 0), jnp.clip((gamma - low) / scale, 0.0, 1.0), 0.0)
  return BiasEstimate(alpha, beta, relevance, num_iterations, log_likelihood)


def estimate_bias(counts: RankCounts, *, where: ArrayLike | None = None, max_iterations: int = 2000,
                  tolerance: float = 1e-6, min_impressions: float = 100.0) -> BiasEstimate:
  """alpha [K], beta [K] and relevances [Q, D] of the affine click model, by EM on rank counts.

  Model: each impression of document d of query q is relevant with probability gamma_qd; at rank
  k a relevant one is clicked with probability alpha_k + beta_k and a non-relevant one with
  probability beta_k, so P(click) = alpha_k gamma_qd + beta_k. With p = alpha_k gamma_qd + beta_k,

    E step:  P(r = 1 | c = 1) = (alpha_k + beta_k) gamma_qd / p,
             P(r = 1 | c = 0) = (1 - alpha_k - beta_k) gamma_qd / (1 - p);
    M step:  gamma_qd = sum_k E[relevant impressions] / sum_k n_qdk,
             alpha_k + beta_k = E[relevant clicks at k] / E[relevant impressions at k],
             beta_k = E[non-relevant clicks at k] / E[non-relevant impressions at k].

  Each step cannot decrease the likelihood; it stops when alpha and beta change by at most
  `tolerance` (max abs) or after `max_iterations` steps.

  Normalisation. The likelihood is unchanged by R' = a R + b, alpha' = alpha / a,
  beta' = beta - alpha b / a, so the fit picks one member of that family: the affine map (a > 0
  orientated so that sum_k alpha_k >= 0) under which the relevances of the documents with at
  least `min_impressions` impressions span exactly [0, 1]. That recovers the true alpha, beta
  when such documents include a perfectly relevant and a perfectly irrelevant one (as with labels
  0..4 and R = y / 4); otherwise alpha and beta are those of a rescaled relevance. A ranking
  learned with the affine-corrected estimators does not depend on the choice: IPS's per-session
  estimate (c - betabar') / rho' becomes a Rhat + b (rho' = rho / a, betabar' = betabar - rho b / a;
  exactly so without propensity clipping), and sum_d omega(d|pi) (a Rhat(d) + b) =
  a U(pi) + b sum_d omega(d|pi), where the total exposure sum_d omega(d|pi) is the same for
  every ranking policy of the D >= K documents: the argmax policy is unchanged (tested).

  Args:
    counts: `RankCounts` with impressions and clicks [Q, D, K] (see `rank_counts`).
    where: optional [Q, D] bool document mask (True = real document); masked documents' counts
      are ignored.
    max_iterations: the most EM steps (may be traced).
    tolerance: stop once max |change| of alpha and beta in one step is at most this.
    min_impressions: documents with fewer impressions do not set the normalisation (their noisy
      relevance would stretch it); with no such document the fit is left unnormalised.

  Returns:
    A `BiasEstimate`; `.click_model` gives the estimated affine `ClickModel`.

  Example:
    >>> import jax.numpy as jnp
    >>> alpha, beta, gamma = jnp.array([0.6, 0.3]), jnp.array([0.2, 0.1]), jnp.array([[1.0, 0.0]])
    >>> impressions = jnp.full((1, 2, 2), 1e4)   # both documents shown 1e4 times at each rank
    >>> clicks = impressions * (alpha * gamma[..., None] + beta)   # their expected clicks
    >>> fit = estimate_bias(RankCounts(impressions, clicks))
    >>> [round(float(a), 3) for a in fit.alpha], [round(float(b), 3) for b in fit.beta]
    ([0.6, 0.3], [0.2, 0.1])
  """
  if not isinstance(counts, RankCounts):
    raise ValueError(f"counts: must be a RankCounts (see rank_counts), got {type(counts).__name__}")
  impressions = checks.as_float("counts.impressions", counts.impressions)
  clicks = checks.as_float("counts.clicks", counts.clicks)
  if impressions.ndim != 3 or 0 in impressions.shape:
    raise ValueError(f"counts.impressions: expected a non-empty [Q, D, K] array, got shape "
                     f"{tuple(impressions.shape)}")
  if clicks.shape != impressions.shape:
    raise ValueError(f"counts.clicks: expected the shape of counts.impressions "
                     f"{tuple(impressions.shape)}, got {tuple(clicks.shape)}")
  valid = jnp.ones(impressions.shape[:2], bool) if where is None else jnp.asarray(where, bool)
  if valid.shape != impressions.shape[:2]:
    raise ValueError(f"where: expected shape {tuple(impressions.shape[:2])} ([Q, D] of counts), "
                     f"got {tuple(valid.shape)}")
  if not isinstance(max_iterations, jax.core.Tracer):
    checks.check_count("max_iterations", max_iterations)
  checks.check_real("tolerance", tolerance, low=0.0)
  checks.check_real("min_impressions", min_impressions, low=0.0)
  if checks.is_concrete(impressions, clicks, valid):
    mask = np.broadcast_to(np.asarray(valid)[..., None], impressions.shape)
    n, c = np.asarray(impressions)[mask], np.asarray(clicks)[mask]
    checks.check_nonnegative("counts.impressions", n)
    checks.check_nonnegative("counts.clicks", c)
    if np.any(c > n):
      raise ValueError(f"counts.clicks: exceed counts.impressions in {int(np.sum(c > n))} cells "
                       "(a document cannot be clicked more often than it was shown)")
    if not np.any(n > 0):
      raise ValueError("counts: there are no impressions (of unmasked documents) to estimate from")
  return _fit(impressions, clicks, valid, jnp.asarray(max_iterations),
              jnp.asarray(tolerance, impressions.dtype), jnp.asarray(min_impressions, impressions.dtype))
