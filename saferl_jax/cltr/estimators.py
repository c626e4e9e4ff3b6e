"""Counterfactual LTR estimators from logged clicks, and the safe objectives (floor 1).

All functions take per-document arrays for one query list of D documents (vmap over queries
or sessions). The click model is affine: P(click on d at rank k) = alpha_k R_d + beta_k. With
a stochastic logging policy pi0, the policy-aware propensities are

  rho(d) = E_{y~pi0}[alpha_{rank(d|y)}],   betabar(d) = E_{y~pi0}[beta_{rank(d|y)}]

(0 outside the displayed top K), i.e. exposures of d under pi0 with rank weights alpha and beta.
Per logged session i with clicks c_i(d) (0 for documents not displayed):

  IPS (affine correction):  Rhat_i(d) = (c_i(d) - betabar(d)) / rhoc(d)
  DR [DR-LTR]:              Rhat_i(d) = Rhat(d) + (c_i(d) - betabar(d) - rho(d) Rhat(d)) / rhoc(d)

where rhoc = max(rho, min_propensity) is the clipped propensity (10 / sqrt(N) in practice) and
Rhat a regression model of relevance. The value of a policy pi is
Uhat(pi) = mean_i sum_d omega(d|q_i, pi) Rhat_i(d), omega the expected rank weight (exposure) of d
under pi. Without clipping the two coincide (the model term cancels); clipping bounds the
variance but biases IPS by -(1 - rho/rhoc) R(d), while DR's bias is -(1 - rho/rhoc) (R(d) - Rhat(d)):
small when the model is good. That is what DR buys in this setting.

Safe deployment [SAFE]: with normalised exposures omegabar(d|pi) = omega(d|pi) / sum_d' omega(d'|pi),
the exposure divergence d2(pi||pi0) = sum_d omegabar(d|pi)^2 / omegabar(d|pi0) (averaged over
queries) gives the objective Uhat(pi) - lam sqrt(d2 / N), lam = sqrt((1 - delta) / delta).
PRPO [PRPO]: mean_i sum_d omega0(d) min(r(d) Rhat_i(d), clip(r(d), eps-, eps+) Rhat_i(d)) with
r(d) = omega(d|pi) / omega(d|pi0): the clipped surrogate shared with PPO and LOOP.

References:
  [DR-LTR] Oosterhuis. Doubly-Robust Estimation for Correcting Position-Bias in Click Feedback
  for Unbiased Learning to Rank. TOIS 2023. https://arxiv.org/abs/2203.17118
  [SAFE] Gupta, Oosterhuis, de Rijke. Safe Deployment for Counterfactual Learning to Rank with
  Exposure-Based Risk Minimization. SIGIR 2023. https://arxiv.org/abs/2305.01522
  [PRPO] Gupta, Oosterhuis, de Rijke. Practical and Robust Safety Guarantees for Advanced
  Counterfactual Learning to Rank. CIKM 2024. https://arxiv.org/abs/2407.19943
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.cltr.clicks import ClickModel, check_click_model
from saferl_jax.policy_gradient import clipped_surrogate, hard_filter
from saferl_jax.ranking.metrics import exposure_from_samples
from saferl_jax.ranking.plackett_luce import sample_rankings


def _safe_divide(numerator, denominator):
  """numerator / denominator, 0 where the denominator is 0 (no NaN value or gradient)."""
  positive = denominator > 0
  return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def _nonnegative(name: str, x: ArrayLike, where=None, upper: float | None = None) -> jax.Array:
  """A float array of finite values >= 0 (checked where `where` is True, on concrete input)."""
  x = checks.as_float(name, x)
  checks.check_nonnegative(name, x, where=where, upper=upper)
  return x


def _finite(name: str, x: ArrayLike, where=None) -> jax.Array:
  x = checks.as_float(name, x)
  checks.check_finite(name, x, where=where)
  return x


def _same_shape(**arrays) -> None:
  (first, x), *rest = arrays.items()
  for name, y in rest:
    if y is not None and jnp.shape(y) != jnp.shape(x):
      raise ValueError(f"{name}: expected the shape of {first} {tuple(jnp.shape(x))}, got "
                       f"{tuple(jnp.shape(y))}")


def _check_min_propensity(min_propensity) -> None:
  checks.check_scalar("min_propensity", min_propensity, low=0.0, high=1.0)


def _check_num_sessions(num_sessions) -> None:
  """N, a count of logged sessions: a finite number > 0 (a zero would divide by zero)."""
  if isinstance(num_sessions, bool):
    raise ValueError(f"num_sessions: must be a number > 0, got {num_sessions!r}")
  checks.check_scalar("num_sessions", num_sessions, low=0.0, strict_low=True)


def _check_clip_range(clip_low, clip_high) -> None:
  checks.check_scalar("clip_low", clip_low, low=0.0)
  checks.check_scalar("clip_high", clip_high, low=0.0)
  if checks.is_concrete(clip_low, clip_high) and not float(clip_low) <= float(clip_high):
    raise ValueError(f"clip_low: must be <= clip_high, got {clip_low} > {clip_high}")


class Propensities(NamedTuple):
  """Policy-aware propensities of each document, [..., D]."""
  rho: jax.Array
  betabar: jax.Array


def policy_aware_propensities(logging_logits: ArrayLike, click_model: ClickModel, *,
                              key: jax.Array, num_samples: int = 1000,
                              where: ArrayLike | None = None) -> Propensities:
  """(rho, betabar) [D]: the expected alpha and beta of each document's rank under pi0.

  Monte Carlo over `num_samples` top-K rankings of the Plackett-Luce logging policy, K the click
  model's number of displayed ranks; documents ranked below K get 0 (they are never displayed).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from saferl_jax.cltr.clicks import position_based
    >>> rho, _ = policy_aware_propensities(jnp.zeros(3), position_based(2), key=jax.random.key(0))
    >>> [round(v, 1) for v in rho.tolist()]
    [0.5, 0.5, 0.5]
  """
  checks.check_key("key", key)
  check_click_model(click_model, name="click_model")
  checks.check_positive_int("num_samples", num_samples)
  logging_logits = checks.as_float("logging_logits", logging_logits)
  if logging_logits.ndim == 0 or logging_logits.shape[-1] == 0:
    raise ValueError(f"logging_logits: expected a non-empty list [..., D], got shape "
                     f"{tuple(logging_logits.shape)}")
  if where is not None:
    where = jnp.asarray(where, bool)
    if where.shape != logging_logits.shape:
      raise ValueError(f"where: expected the shape of logging_logits {tuple(logging_logits.shape)}, "
                       f"got {tuple(where.shape)}")
  checks.check_finite("logging_logits", logging_logits, where=where)
  displayed = click_model.alpha.shape[0]
  k = min(displayed, logging_logits.shape[-1])
  rankings = sample_rankings(logging_logits, key=key, where=where, sample_shape=num_samples, k=k)
  num_items = logging_logits.shape[-1]
  rho = exposure_from_samples(rankings, click_model.alpha[:k], num_items, where=where)
  betabar = exposure_from_samples(rankings, click_model.beta[:k], num_items, where=where)
  return Propensities(rho, betabar)


def propensity_floor(num_sessions: int, *, scale: float = 10.0) -> float:
  """The usual clipping threshold for propensities: min(1, scale / sqrt(N))."""
  _check_num_sessions(num_sessions)
  checks.check_scalar("scale", scale, low=0.0, strict_low=True)
  return min(1.0, scale / float(num_sessions) ** 0.5)


def _clipped(rho: jax.Array, min_propensity: float) -> jax.Array:
  """max(rho, min_propensity) where rho > 0; documents never exposed keep rho = 0."""
  return jnp.where(rho > 0, jnp.maximum(rho, min_propensity), 0.0)


def ips_document_rewards(clicks: ArrayLike, rho: ArrayLike, betabar: ArrayLike, *,
                         min_propensity: float = 0.0) -> jax.Array:
  """Rhat_i(d) = (c_i(d) - betabar(d)) / max(rho(d), min_propensity) for one session.

  Documents never exposed (rho = 0) get 0.

  Args:
    clicks: [D] clicks of the session per document (0 where not displayed).
    rho: [D] policy-aware alpha propensities.
    betabar: [D] policy-aware beta propensities.
    min_propensity: the clipping threshold (see `propensity_floor`).

  Example:
    >>> import jax.numpy as jnp
    >>> rewards = ips_document_rewards(jnp.array([1., 0.]), jnp.array([0.5, 0.25]), jnp.array([0.1, 0.05]))
    >>> [round(v, 4) for v in rewards.tolist()]
    [1.8, -0.2]
  """
  clicks, rho, betabar = _check_session(clicks, rho, betabar, min_propensity)
  return _safe_divide(clicks - betabar, _clipped(rho, min_propensity))


def _check_session(clicks, rho, betabar, min_propensity, reward_hat=None):
  """clicks >= 0, rho and betabar propensities in [0, 1], all [D] alike (values when concrete)."""
  clicks = _nonnegative("clicks", clicks)
  rho, betabar = _nonnegative("rho", rho, upper=1.0), _nonnegative("betabar", betabar, upper=1.0)
  _same_shape(clicks=clicks, rho=rho, betabar=betabar, reward_hat=reward_hat)
  _check_min_propensity(min_propensity)
  return clicks, rho, betabar


def dr_document_rewards(clicks: ArrayLike, rho: ArrayLike, betabar: ArrayLike,
                        reward_hat: ArrayLike, *, min_propensity: float = 0.0) -> jax.Array:
  """Rhat_i(d) = Rhat(d) + (c_i(d) - betabar(d) - rho(d) Rhat(d)) / max(rho(d), min_propensity).

  Documents never exposed (rho = 0) keep the regression estimate Rhat(d). Args as
  `ips_document_rewards`, plus reward_hat [D], the regression model's relevance estimates.
  """
  reward_hat = _finite("reward_hat", reward_hat)
  clicks, rho, betabar = _check_session(clicks, rho, betabar, min_propensity, reward_hat)
  return reward_hat + _safe_divide(clicks - betabar - rho * reward_hat, _clipped(rho, min_propensity))


def policy_value(exposure: ArrayLike, document_rewards: ArrayLike, *,
                 where: ArrayLike | None = None) -> jax.Array:
  """sum_d omega(d|pi) Rhat(d) for one query (mean this over sessions for Uhat(pi))."""
  exposure = _nonnegative("exposure", exposure, where)
  document_rewards = _finite("document_rewards", document_rewards, where)
  product = exposure * document_rewards
  if where is not None:
    product = jnp.where(where, product, 0.0)
  return jnp.sum(product, axis=-1)


def exposure_divergence(exposure: ArrayLike, logging_exposure: ArrayLike, *,
                        where: ArrayLike | None = None) -> jax.Array:
  """d2(pi||pi0) = sum_d omegabar(d|pi)^2 / omegabar(d|pi0) for one query (>= 1, = 1 iff equal).

  Documents the logging policy never exposes contribute nothing (their ratio is undefined);
  keep the target's exposure on exposed documents for the bound to hold.
  """
  exposure = _nonnegative("exposure", exposure, where)
  logging_exposure = _nonnegative("logging_exposure", logging_exposure, where)
  _same_shape(exposure=exposure, logging_exposure=logging_exposure)
  if where is not None:
    exposure = jnp.where(where, exposure, 0.0)
    logging_exposure = jnp.where(where, logging_exposure, 0.0)
  normalised = _safe_divide(exposure, jnp.sum(exposure, axis=-1, keepdims=True))
  logging_normalised = _safe_divide(logging_exposure, jnp.sum(logging_exposure, axis=-1, keepdims=True))
  return jnp.sum(_safe_divide(normalised**2, logging_normalised), axis=-1)


def safe_objective(value_estimate: ArrayLike, divergence: ArrayLike, num_sessions: int, *,
                   delta: float = 0.05) -> jax.Array:
  """[SAFE]: Uhat(pi) - lam sqrt(d2 / N), lam = sqrt((1 - delta) / delta).

  Args:
    value_estimate: Uhat(pi), the IPS or DR estimate.
    divergence: d2(pi||pi0) averaged over queries.
    num_sessions: N, the number of logged sessions.
    delta: the allowed failure probability.

  Example:
    >>> round(float(safe_objective(0.5, 1.0, 100, delta=0.2)), 4)
    0.3
  """
  if delta is None:
    raise ValueError("delta: must be in (0, 1), got None")
  checks.check_level_option("delta", delta)
  _check_num_sessions(num_sessions)
  value_estimate = _finite("value_estimate", value_estimate)
  divergence = _nonnegative("divergence", divergence)
  penalty = jnp.sqrt((1 - delta) / delta) * jnp.sqrt(divergence / num_sessions)
  return value_estimate - penalty


def prpo_objective(exposure: ArrayLike, logging_exposure: ArrayLike, document_rewards: ArrayLike, *,
                   clip_low: float = 0.8, clip_high: float = 1.2,
                   where: ArrayLike | None = None) -> jax.Array:
  """[PRPO]: sum_d omega0(d) min(r(d) Rhat(d), clip(r(d), clip_low, clip_high) Rhat(d)), one query.

  r(d) = omega(d|pi) / omega(d|pi0). Beyond the clip range no gradient pushes a ratio further,
  whatever the clicks say, so the learned policy stays near the logging policy without any
  assumption on user behaviour. Documents the logger never exposes contribute nothing.

  Args:
    exposure: [D] omega(d|pi) of the policy being learned.
    logging_exposure: [D] omega(d|pi0).
    document_rewards: [D] estimated rewards Rhat(d) (e.g. IPS or DR, averaged over sessions).
    clip_low, clip_high: the clip range of the exposure ratio.
    where: optional [D] mask of real documents.

  Example:
    >>> import jax.numpy as jnp
    >>> round(float(prpo_objective(jnp.array([0.9, 0.1]), jnp.array([0.5, 0.5]), jnp.array([1., 0.]))), 4)
    0.6
  """
  exposure = _nonnegative("exposure", exposure, where)
  logging_exposure = _nonnegative("logging_exposure", logging_exposure, where)
  document_rewards = _finite("document_rewards", document_rewards, where)
  _same_shape(exposure=exposure, logging_exposure=logging_exposure,
              document_rewards=document_rewards)
  _check_clip_range(clip_low, clip_high)
  ratio = _safe_divide(exposure, logging_exposure)
  surrogate = clipped_surrogate(ratio, document_rewards, clip_low=clip_low, clip_high=clip_high)
  valid = logging_exposure > 0 if where is None else (logging_exposure > 0) & jnp.asarray(where)
  return jnp.sum(jnp.where(valid, logging_exposure * surrogate, 0.0), axis=-1)


# Whole click logs: per-query sums of the per-session estimates, and the objectives over queries.


def query_rewards(session_count: ArrayLike, click_count: ArrayLike, rho: ArrayLike,
                  betabar: ArrayLike, *, reward_hat: ArrayLike | None = None,
                  min_propensity: float = 0.0) -> jax.Array:
  """sum_{i: q_i = q} Rhat_i(d) [D] for one query: its sessions' IPS (or DR) rewards, summed.

  Both estimates are affine in the clicks, so the sum over the query's n_q sessions is n_q times
  the estimate at the mean clicks c_q(d) / n_q: the log need only keep click counts per document.
  Divided by the total number of sessions N and summed over queries with the exposures, this is
  Uhat(pi) = (1/N) sum_i sum_d omega(d|q_i, pi) Rhat_i(d) (see `logged_objective`).

  Args:
    session_count: n_q, the number of logged sessions of the query.
    click_count: [D] clicks per document summed over those sessions.
    rho, betabar: [D] the logger's policy-aware propensities.
    reward_hat: optional [D] regression estimates; given, the DR estimate, else IPS.
    min_propensity: the clipping threshold (see `propensity_floor`).

  Example:
    >>> import jax.numpy as jnp
    >>> rewards = query_rewards(2., jnp.array([1., 0.]), jnp.array([0.5, 0.25]), jnp.array([0.1, 0.05]))
    >>> [round(v, 4) for v in rewards.tolist()]  # 2 sessions, 1 click: 2 (0.5 - 0.1) / 0.5, ...
    [1.6, -0.4]
  """
  session_count = _nonnegative("session_count", session_count)
  if session_count.ndim != 0:
    raise ValueError(f"session_count: must be a scalar n_q for one query, got shape "
                     f"{tuple(session_count.shape)}")
  click_count = _nonnegative("click_count", click_count)
  mean_clicks = _safe_divide(click_count, session_count)
  if reward_hat is None:
    per_session = ips_document_rewards(mean_clicks, rho, betabar, min_propensity=min_propensity)
  else:
    per_session = dr_document_rewards(mean_clicks, rho, betabar, reward_hat,
                                      min_propensity=min_propensity)
  return session_count * per_session


OBJECTIVES = ("value", "safe", "prpo", "drpo")


def logged_objective(exposure: ArrayLike, logging_exposure: ArrayLike, rewards: ArrayLike,
                     session_counts: ArrayLike, *, objective: str, num_sessions: int,
                     delta: float = 0.05, clip_low: float = 0.8, clip_high: float = 1.2,
                     quantile: float = 0.5, where: ArrayLike | None = None) -> jax.Array:
  """The objective of a ranking policy over all logged queries, from per-query summed rewards.

  With R_q(d) = sum_{i: q_i = q} Rhat_i(d) (`query_rewards`) and N sessions:
    "value": Uhat(pi) = (1/N) sum_q sum_d omega(d|q, pi) R_q(d);
    "safe":  [SAFE]'s Uhat(pi) - lam sqrt(d2 / N), d2 the exposure divergence averaged over
             queries with weights n_q (the logged query distribution);
    "prpo":  [PRPO]'s clipped surrogate, (1/N) sum_q `prpo_objective`(omega_q, omega0_q, R_q);
    "drpo":  [DRPO]'s hard filtering for mixed-quality logs: (1/N) sum_q n_q sum_d omega(d|q, pi)
             1[R_q(d) / n_q passes `hard_filter`], imitating the displayed documents whose mean
             estimated reward is in the top (1 - quantile) and ignoring the rest (no negative
             rewards to push exposures away with).

  Args:
    exposure: [Q, D] omega(d|q, pi) of the policy being learned.
    logging_exposure: [Q, D] omega(d|q, pi0) of the logging policy (same rank weights).
    rewards: [Q, D] R_q(d), the summed per-session reward estimates.
    session_counts: [Q] n_q.
    objective: one of OBJECTIVES.
    num_sessions: N (static; queries may be a mini-batch, so it is not sum n_q).
    delta: [SAFE]'s failure probability.
    clip_low, clip_high: PRPO's clip range of the exposure ratio.
    quantile: DRPO's fraction of (query, document) pairs to discard.
    where: optional [Q, D] mask of real documents.

  Example:
    >>> import jax.numpy as jnp
    >>> exposure = jnp.array([[1., 0.5]])
    >>> float(logged_objective(exposure, exposure, jnp.array([[4., 2.]]), jnp.array([4.]),
    ...                        objective="value", num_sessions=4))
    1.25
  """
  checks.check_choice("objective", objective, OBJECTIVES)
  _check_num_sessions(num_sessions)
  checks.check_level_option("delta", delta)
  _check_clip_range(clip_low, clip_high)
  checks.check_scalar("quantile", quantile, low=0.0)
  if where is not None:
    where = jnp.asarray(where, bool)
  exposure = _nonnegative("exposure", exposure, where)
  logging_exposure = _nonnegative("logging_exposure", logging_exposure, where)
  rewards = _finite("rewards", rewards, where)
  session_counts = _nonnegative("session_counts", session_counts)
  _same_shape(exposure=exposure, logging_exposure=logging_exposure, rewards=rewards, where=where)
  if exposure.ndim != 2 or session_counts.shape != exposure.shape[:1]:
    raise ValueError(f"session_counts: expected [Q] for exposure [Q, D] {tuple(exposure.shape)}, "
                     f"got {tuple(session_counts.shape)}")
  if where is None:
    where = jnp.ones(exposure.shape, bool)
  if objective == "prpo":
    per_query = jax.vmap(lambda e, e0, r, w: prpo_objective(
        e, e0, r, clip_low=clip_low, clip_high=clip_high, where=w))(
            exposure, logging_exposure, rewards, where)
    return jnp.sum(per_query) / num_sessions
  if objective == "drpo":
    # Pairs the log says something about: displayed to some session of the query.
    logged = where & (session_counts[:, None] > 0) & (logging_exposure > 0)
    kept = hard_filter(_safe_divide(rewards, session_counts[:, None]), quantile=quantile,
                       where=logged)
    return jnp.sum(jnp.where(kept, exposure * session_counts[:, None], 0.0)) / num_sessions
  value = jnp.sum(jax.vmap(lambda e, r, w: policy_value(e, r, where=w))(exposure, rewards, where))
  value = value / num_sessions
  if objective == "value":
    return value
  divergences = jax.vmap(lambda e, e0, w: exposure_divergence(e, e0, where=w))(
      exposure, logging_exposure, where)
  divergence = _safe_divide(jnp.sum(session_counts * divergences), jnp.sum(session_counts))
  return safe_objective(value, divergence, num_sessions, delta=delta)
