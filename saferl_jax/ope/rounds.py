"""Per-round quantities that every bandit estimator is built from (floor 1).

All the estimators of SPEC.md section 1 depend on a logged round only through
four numbers: the reward r_i, the importance weight w_i = pi(a_i|x_i) / p_i, the
reward model's prediction for the logged action qhat(x_i, a_i), and the direct
method term dm_i = sum_a pi(a|x_i) qhat(x_i, a). `logged_rounds` reduces the
[n, A] inputs to these four [n] arrays once; the estimators in `estimators.py`
and the bootstrap resample and combine them. Functions here act on one logged
dataset; batch several with `jax.vmap`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from saferl_jax import checks


class LoggedRounds(NamedTuple):
  """The per-round terms of a logged bandit dataset, each of shape [n].

  Attributes:
    rewards: r_i, the logged reward.
    weights: w_i = pi(a_i|x_i) / pi0(a_i|x_i), the importance weight.
    reward_hat_logged: qhat(x_i, a_i), the reward model at the logged action
      (zeros when no reward model was given).
    dm: sum_a pi(a|x_i) qhat(x_i, a), the direct-method term (zeros likewise).
  """
  rewards: jax.Array
  weights: jax.Array
  reward_hat_logged: jax.Array
  dm: jax.Array


class WeightDiagnostics(NamedTuple):
  """Health of the importance weights: a mean far from 1 or a tiny ESS warns of poor overlap."""
  effective_sample_size: jax.Array
  max_weight: jax.Array
  mean_weight: jax.Array


def _logged_action_values(values: jax.Array, actions: jax.Array) -> jax.Array:
  return jnp.take_along_axis(values, actions[:, None], axis=1)[:, 0]


def logged_rounds(
    rewards: ArrayLike,
    actions: ArrayLike,
    logging_probs: ArrayLike,
    target_dist: ArrayLike,
    reward_hat: ArrayLike | None = None,
) -> LoggedRounds:
  """Validates one logged dataset and reduces it to its per-round terms.

  Args:
    rewards: [n] float rewards.
    actions: [n] int logged actions in [0, A).
    logging_probs: [n] probability of the logged action under the logging
      policy, in (0, 1].
    target_dist: [n, A] the target policy's distribution over actions per round.
    reward_hat: optional [n, A] reward model predictions.

  Returns:
    A `LoggedRounds` of four [n] arrays.

  Raises:
    ValueError: on mismatched shapes, and (for concrete inputs) on a propensity
      outside (0, 1], a non-finite reward, an action outside [0, A), or target
      rows that do not sum to 1.

  Example:
    >>> import jax.numpy as jnp
    >>> rounds = logged_rounds(jnp.array([1., 0.]), jnp.array([0, 1]),
    ...                        jnp.array([0.5, 0.5]), jnp.array([[1., 0.], [1., 0.]]))
    >>> rounds.weights.tolist()
    [2.0, 0.0]
  """
  rewards = checks.as_float("rewards", rewards)
  actions = checks.as_int("actions", actions)
  logging_probs = checks.as_float("logging_probs", logging_probs)
  target_dist = checks.as_float("target_dist", target_dist)
  checks.check_ndim("rewards", rewards, 1)
  checks.check_ndim("actions", actions, 1)
  checks.check_ndim("logging_probs", logging_probs, 1)
  checks.check_ndim("target_dist", target_dist, 2)
  arrays = dict(rewards=rewards, actions=actions, logging_probs=logging_probs,
                target_dist=target_dist)
  if reward_hat is not None:
    reward_hat = checks.as_float("reward_hat", reward_hat)
    checks.check_ndim("reward_hat", reward_hat, 2)
    arrays["reward_hat"] = reward_hat
    if reward_hat.shape[1] != target_dist.shape[1]:
      raise ValueError(
          f"reward_hat: has {reward_hat.shape[1]} actions but target_dist has "
          f"{target_dist.shape[1]}")
  checks.check_same_length(**arrays)
  checks.check_finite("rewards", rewards)
  checks.check_probabilities("logging_probs", logging_probs)
  checks.check_indices("actions", actions, target_dist.shape[1], what="action")
  checks.check_distribution_rows("target_dist", target_dist)

  weights = _logged_action_values(target_dist, actions) / logging_probs
  if reward_hat is None:
    zeros = jnp.zeros_like(rewards)
    return LoggedRounds(rewards, weights, zeros, zeros)
  checks.check_finite("reward_hat", reward_hat)
  return LoggedRounds(
      rewards=rewards,
      weights=weights,
      reward_hat_logged=_logged_action_values(reward_hat, actions),
      dm=jnp.sum(target_dist * reward_hat, axis=1),
  )


def importance_weights(
    actions: ArrayLike, logging_probs: ArrayLike, target_dist: ArrayLike
) -> jax.Array:
  """w_i = pi(a_i|x_i) / pi0(a_i|x_i), shape [n]; E_pi0[w] = 1 under full support."""
  actions = checks.as_int("actions", actions)  # before any jnp.asarray: int64 ids must not wrap
  return logged_rounds(jnp.zeros(actions.shape), actions, logging_probs, target_dist).weights


def weight_diagnostics(weights: ArrayLike) -> WeightDiagnostics:
  """Effective sample size (sum w)^2 / sum w^2, the largest weight and the mean weight.

  Example:
    >>> weight_diagnostics(jnp.array([1., 1., 1., 1.])).effective_sample_size.item()
    4.0
  """
  weights = checks.as_float("weights", weights)
  checks.check_ndim("weights", weights, 1)
  checks.check_same_length(weights=weights)
  checks.check_nonnegative("weights", weights)
  sum_sq = jnp.sum(weights**2)
  safe_sum_sq = jnp.where(sum_sq > 0, sum_sq, 1.0)
  ess = jnp.where(sum_sq > 0, jnp.sum(weights)**2 / safe_sum_sq, 0.0)
  return WeightDiagnostics(ess, jnp.max(weights), jnp.mean(weights))
