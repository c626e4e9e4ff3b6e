"""The regression model of relevance that DR needs, fitted to clicks (floor 1).

DR [DR-LTR] corrects a model Rhat(d) with clicks; any model works (the estimate stays unbiased
without clipping), and the better it is the smaller the bias clipping leaves. Here it is ridge
regression of the per-document IPS estimates on the documents' features, each document weighted
by its number of logged sessions, predictions clipped to [0, 1] (relevance is a probability).

References:
  [DR-LTR] Oosterhuis. Doubly-Robust Estimation for Correcting Position-Bias in Click Feedback
  for Unbiased Learning to Rank. TOIS 2023. https://arxiv.org/abs/2203.17118
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from saferl_jax import checks


class RidgeModel(NamedTuple):
  """Rhat(x) = clip(x . coef + intercept, 0, 1)."""
  coef: jax.Array
  intercept: jax.Array


def fit_reward_regression(features: ArrayLike, targets: ArrayLike, weights: ArrayLike, *,
                          l2: float = 1.0) -> RidgeModel:
  """Weighted ridge regression: argmin sum_j w_j (x_j . b + c - t_j)^2 + l2 ||b||^2.

  Args:
    features: [..., F] document features (any leading axes, e.g. [Q, D, F]).
    targets: [...] per-document targets (e.g. mean IPS rewards of each query's sessions).
    weights: [...] non-negative weights (e.g. sessions per query; 0 for padding or documents
      never displayed).
    l2: the ridge penalty (the intercept is not penalised).

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0.], [1.], [2.]])
    >>> model = fit_reward_regression(x, jnp.array([0.1, 0.3, 0.5]), jnp.ones(3), l2=0.0)
    >>> [round(v, 3) for v in (float(model.coef[0]), float(model.intercept))]
    [0.2, 0.1]
  """
  features = checks.as_float("features", features)
  targets, weights = checks.as_float("targets", targets), checks.as_float("weights", weights)
  if features.shape[:-1] != targets.shape or targets.shape != weights.shape:
    raise ValueError(f"features/targets/weights: shapes {features.shape}, {targets.shape}, "
                     f"{weights.shape} do not match ([..., F], [...], [...])")
  checks.check_scalar("l2", l2, low=0.0)
  if targets.size == 0:
    raise ValueError("targets: is empty; the regression needs at least one document")
  checks.check_nonnegative("weights", weights)
  # Padding (weight 0) may hold anything finite-or-not: only weighted rows enter the fit.
  checks.check_finite("features", features, where=(weights > 0)[..., None])
  checks.check_finite("targets", targets, where=weights > 0)
  features = jnp.where((weights > 0)[..., None], features, 0.0)
  num_features = features.shape[-1]
  design = jnp.concatenate([features.reshape(-1, num_features),
                            jnp.ones((targets.size, 1), features.dtype)], axis=1)
  w = weights.reshape(-1)
  # Weighted least squares with zero targets where the weight is 0 (padding may hold NaN-free 0s).
  t = jnp.where(w > 0, targets.reshape(-1), 0.0)
  gram = design.T @ (w[:, None] * design)
  penalty = l2 * jnp.diag(jnp.concatenate([jnp.ones(num_features), jnp.zeros(1)]))
  # A tiny jitter keeps the solve finite when no document has weight (the model is then 0).
  solution = jnp.linalg.solve(gram + penalty + 1e-6 * jnp.eye(num_features + 1), design.T @ (w * t))
  return RidgeModel(solution[:-1], solution[-1])


def predict_rewards(model: RidgeModel, features: ArrayLike, *,
                    where: ArrayLike | None = None) -> jax.Array:
  """Rhat [...] = clip(features . coef + intercept, 0, 1); 0 where `where` is False."""
  if not isinstance(model, RidgeModel):
    raise ValueError(f"model: must be a RidgeModel, got {type(model).__name__}")
  features = checks.as_float("features", features)
  if features.ndim == 0 or features.shape[-1] != jnp.shape(model.coef)[0]:
    raise ValueError(f"features: expected [..., F] with F = {jnp.shape(model.coef)[0]} like "
                     f"model.coef, got shape {tuple(features.shape)}")
  checks.check_finite("model.coef", model.coef)
  checks.check_finite("model.intercept", model.intercept)
  checks.check_finite("features", features,
                      where=None if where is None else jnp.asarray(where, bool)[..., None])
  prediction = jnp.clip(features @ model.coef + model.intercept, 0.0, 1.0)
  return prediction if where is None else jnp.where(where, prediction, 0.0)


def counterfactual_cross_entropy(logits: ArrayLike, ips_targets: ArrayLike,
                                 propensity_ratios: ArrayLike, weights: ArrayLike) -> jax.Array:
  """The DR regression model's counterfactual loss, as in the [PRPO] and [DR-LTR] code.

  L = -sum_j w_j [rt_j log s_j + (a_j - rt_j) log(1 - s_j)],  s = sigmoid(logits),

  with rt = (cbar - betabar) / rho_c the (clipped) IPS estimate of a document's relevance and
  a = rho / rho_c (1 unless the propensity was clipped). In expectation over clicks rt = a R,
  so L is a cross-entropy whose minimiser is s = R: an unbiased regression target from clicks
  (shashankg7/cikm-safeultr src/utils/click_trainer.py `trainer_regression`;
  HarrieO/2022-doubly-robust-LTR utils/optimization.py).

  Args:
    logits: [...] the model's outputs before the sigmoid.
    ips_targets: [...] rt, the mean clipped IPS estimates.
    propensity_ratios: [...] a = rho / rho_c in [0, 1].
    weights: [...] non-negative weights (0 for padding and documents never displayed).

  Returns:
    The scalar loss (a weighted sum).

  Example:
    >>> import jax.numpy as jnp
    >>> round(float(counterfactual_cross_entropy(jnp.zeros(1), jnp.array([0.5]), jnp.ones(1),
    ...                                          jnp.ones(1))), 4)  # log 2
    0.6931
  """
  logits = jnp.asarray(logits)
  log_s, log_not_s = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
  terms = ips_targets * log_s + (propensity_ratios - ips_targets) * log_not_s
  return -jnp.sum(jnp.where(jnp.asarray(weights) > 0, weights * terms, 0.0))
