"""The variance-optimal baseline correction for importance sampling [OB] (floor 1).

beta-IPS contributes (r_i - beta) w_i + beta per round: unbiased for every fixed
beta because E[w - 1] = 0. Its empirical variance, as a function of beta, is the
variance of r w - beta (w - 1), minimised at the regression slope

  beta* = Cov(r w, w) / Var(w)   (= E[r (w^2 - w)] / E[w^2 - w] when E[w] = 1).

The plug-in estimate uses the same sample (an O(1/n) bias); the cross-fitted one
uses, for the rounds of fold k, a beta* computed on the other folds, so each
contribution stays exactly unbiased. Functions act on one dataset; vmap to batch.

References:
  [OB] Gupta, Jeunen, Oosterhuis, de Rijke. Optimal Baseline Corrections for
  Off-Policy Contextual Bandits. RecSys 2024. https://arxiv.org/abs/2405.05736
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def optimal_baseline(
    rewards: ArrayLike, weights: ArrayLike, *, where: ArrayLike | None = None
) -> jax.Array:
  """beta* = Cov(r w, w) / Var(w) over the rounds selected by `where`.

  This is the beta that minimises the empirical variance of the beta-IPS
  contributions (r_i - beta) w_i + beta. When the weights do not vary (e.g. on
  policy) every beta gives the same estimate and 0 is returned.

  Args:
    rewards: [n] rewards.
    weights: [n] importance weights.
    where: optional [n] bool mask of the rounds to use (True = used).

  Returns:
    The scalar beta*.

  Example:
    >>> import jax.numpy as jnp
    >>> float(optimal_baseline(jnp.array([1., 0., 1.]), jnp.array([2., 0., 1.])))
    1.0
  """
  rewards = jnp.asarray(rewards)
  weights = jnp.asarray(weights)
  mask = jnp.ones(weights.shape, bool) if where is None else jnp.asarray(where, bool)
  count = jnp.maximum(jnp.sum(mask), 1)
  weighted_rewards = rewards * weights
  mean_w = jnp.sum(jnp.where(mask, weights, 0.0)) / count
  mean_rw = jnp.sum(jnp.where(mask, weighted_rewards, 0.0)) / count
  centred_w = jnp.where(mask, weights - mean_w, 0.0)
  covariance = jnp.sum(centred_w * (weighted_rewards - mean_rw))
  variance = jnp.sum(centred_w**2)
  # Double where: no NaN value or gradient when the weights are constant.
  safe_variance = jnp.where(variance > 0, variance, 1.0)
  return jnp.where(variance > 0, covariance / safe_variance, 0.0)


def cross_fitted_baselines(
    rewards: ArrayLike, weights: ArrayLike, *, num_folds: int = 2
) -> jax.Array:
  """Per-round beta*, each computed without the round's own fold.

  Round i belongs to fold i mod num_folds, so the split needs no key and is the
  same under jit and vmap.

  Args:
    rewards: [n] rewards.
    weights: [n] importance weights.
    num_folds: number of folds K >= 2.

  Returns:
    [n] baselines; entry i is beta* fitted on the folds other than i's.
  """
  if num_folds < 2:
    raise ValueError(f"num_folds: must be at least 2, got {num_folds}")
  n = jnp.shape(weights)[0]
  folds = jnp.arange(n) % num_folds
  fold_betas = jax.vmap(
      lambda k: optimal_baseline(rewards, weights, where=folds != k))(jnp.arange(num_folds))
  return fold_betas[folds]
