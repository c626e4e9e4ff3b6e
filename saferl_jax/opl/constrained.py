"""Constrained off-policy learning: the Lagrangian of a policy from logged rewards (floor 1).

From one log of a logging policy pi_0 with a primary reward r_0 and m secondary rewards r_i
(rewards [n, 1 + m]), a policy pi_theta is learned that maximises the estimated primary value
subject to high-confidence constraints on the secondary values (SPEC sections 1 and 6):

  max_theta V0hat(pi_theta)   s.t.   LCB_delta(Vihat(pi_theta)) >= b_i,  i = 1..m,

by primal-dual steps on the Lagrangian

  L(theta, lambda) = V0hat(pi_theta) + sum_i lambda_i (LCB_delta(Vihat(pi_theta)) - b_i),

ascent on theta, and projected descent lambda <- max(0, lambda - eta slack) on the multipliers
(`saferl_jax.constrained.dual_descent`) with slack_i = LCB_delta(Vihat) - b_i. Every value is the
library's own estimator on the policy's importance weights w_i = pi_theta(a_i|x_i) / p_i:

  "beta_ips": (r_i - beta) w_i + beta, beta* = Cov(r w, w) / Var(w) fitted at the current
              weights and held fixed in the gradient (stop_gradient), so the gradient is the
              beta-corrected one, mean (r_i - beta*) grad w_i [OB];
  "dr":       dm_i + w_i (r_i - qhat(x_i, a_i)), dm_i = sum_a pi_theta(a|x_i) qhat(x_i, a).

LCB_delta is `saferl_jax.stats.lower_bound` on the estimator's per-sample terms; its width
(std / sqrt(n) times a quantile) is differentiable, so the Lagrangian pays for the variance a
policy's weights bring. With `penalty="estimate"` the constraint term uses Vihat itself (the
plain weighted sum V0hat + lambda . Vihat for fixed multipliers).

References:
  [OB] Gupta, Jeunen, Oosterhuis, de Rijke. Optimal Baseline Corrections for Off-Policy
  Contextual Bandits. RecSys 2024. https://arxiv.org/abs/2405.05736
  Dudik, Langford, Li. Doubly Robust Policy Evaluation and Learning. ICML 2011.
  Thomas, Theocharous, Ghavamzadeh. High Confidence Policy Improvement. ICML 2015.
  Zhang et al. Alignment under constraints via dual optimisation. NeurIPS 2025.
  https://arxiv.org/abs/2505.19387
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.ope.baseline import optimal_baseline
from saferl_jax.ope.estimators import beta_ips_from_rounds, dr_from_rounds
from saferl_jax.ope.rounds import LoggedRounds
from saferl_jax.stats.bounds import METHODS as BOUNDS
from saferl_jax.stats.bounds import lower_bound

ESTIMATORS = ("beta_ips", "dr")
PENALTIES = ("lower_bound", "estimate")


class ConstrainedBatch(NamedTuple):
  """Logged feedback with several rewards, for constrained learning (any leading seed axes).

  Attributes:
    contexts: [n, d] the logged contexts.
    actions: [n] the logged actions.
    rewards: [n, 1 + m] the primary reward (column 0) and the m secondary rewards.
    logging_probs: [n] pi_0(a_i|x_i).
    reward_hat: [n, A, 1 + m] reward models of every reward (for "dr"; zeros for "beta_ips").
  """
  contexts: jax.Array
  actions: jax.Array
  rewards: jax.Array
  logging_probs: jax.Array
  reward_hat: jax.Array


class ConstrainedObjective(NamedTuple):
  """The Lagrangian of a policy on one log and its parts.

  Attributes:
    lagrangian: scalar V0hat + lambda . slacks (to maximise in theta).
    estimates: [1 + m] the estimated values Vhat_j of every reward (primary first).
    lower_bounds: [m] LCB_delta(Vihat) of the secondary values.
    slacks: [m] LCB_delta(Vihat) - b_i (Vihat - b_i with penalty="estimate"); >= 0: met.
  """
  lagrangian: jax.Array
  estimates: jax.Array
  lower_bounds: jax.Array
  slacks: jax.Array


def _check_objective_inputs(policy_dist, actions, rewards, logging_probs, multipliers, thresholds,
                            reward_hat):
  policy_dist = checks.as_float("policy_dist", policy_dist)
  rewards = checks.as_float("rewards", rewards)
  logging_probs = checks.as_float("logging_probs", logging_probs)
  multipliers = checks.as_float("multipliers", multipliers)
  thresholds = checks.as_float("thresholds", thresholds)
  checks.check_ndim("policy_dist", policy_dist, 2)
  checks.check_ndim("rewards", rewards, 2)
  checks.check_ndim("logging_probs", logging_probs, 1)
  checks.check_ndim("multipliers", multipliers, 1)
  n, num_actions = policy_dist.shape
  m = multipliers.shape[0]
  if m == 0:
    raise ValueError("multipliers: expected [m] with m >= 1 constraints, got shape (0,)")
  if rewards.shape != (n, 1 + m):
    raise ValueError(f"rewards: expected shape {(n, 1 + m)} ([n, 1 + m]: the primary reward, then "
                     f"one column per multiplier), got {tuple(rewards.shape)}")
  if thresholds.shape != (m,):
    raise ValueError(f"thresholds: expected shape {(m,)} (one per multiplier), got "
                     f"{tuple(thresholds.shape)}")
  actions = checks.as_index("actions", actions, num_actions, what="action")
  checks.check_same_length(policy_dist=policy_dist, actions=actions, logging_probs=logging_probs)
  checks.check_probabilities("logging_probs", logging_probs)
  checks.check_finite("rewards", rewards)
  checks.check_finite("multipliers", multipliers)
  if reward_hat is not None:
    reward_hat = checks.as_float("reward_hat", reward_hat)
    if reward_hat.shape != (n, num_actions, 1 + m):
      raise ValueError(f"reward_hat: expected shape {(n, num_actions, 1 + m)} ([n, A, 1 + m]), "
                       f"got {tuple(reward_hat.shape)}")
    checks.check_finite("reward_hat", reward_hat)
  return policy_dist, actions, rewards, logging_probs, multipliers, thresholds, reward_hat


def constrained_objective(policy_dist: ArrayLike, actions: ArrayLike, rewards: ArrayLike,
                          logging_probs: ArrayLike, multipliers: ArrayLike, *,
                          thresholds: ArrayLike, estimator: str = "beta_ips",
                          reward_hat: ArrayLike | None = None, delta: float = 0.05,
                          bound: str = "t", max_value: float | None = None,
                          penalty: str = "lower_bound") -> ConstrainedObjective:
  """The Lagrangian V0hat(pi) + sum_i lambda_i (LCB_delta(Vihat(pi)) - b_i) of a policy on one log.

  The multipliers are held fixed (no gradient flows into them), and so is beta* of "beta_ips";
  jax.grad of `.lagrangian` in the policy's parameters is the primal ascent direction.

  Args:
    policy_dist: [n, A] pi_theta(.|x_i) of the policy being learned, per logged round.
    actions: [n] the logged actions in [0, A).
    rewards: [n, 1 + m] the logged primary reward (column 0) and the m secondary rewards.
    logging_probs: [n] pi_0(a_i|x_i) in (0, 1].
    multipliers: [m] lambda >= 0.
    thresholds: [m] b.
    estimator: "beta_ips" or "dr".
    reward_hat: [n, A, 1 + m] reward models qhat_j(x_i, a); needed by "dr".
    delta: the lower bounds' miss probability (each constraint's).
    bound: the `stats.lower_bound` method ("t", "normal", "hoeffding", "bernstein").
    max_value: the range's upper end for "hoeffding" and "bernstein" (the terms are truncated
      to [0, max_value] first, which can only lower the bound).
    penalty: "lower_bound" (the slacks use LCB_delta) or "estimate" (they use Vihat).

  Returns:
    A `ConstrainedObjective`.

  Example:
    >>> import jax.numpy as jnp
    >>> # Two rounds, two actions; the policy copies the logger (w = 1): Vhat = the means.
    >>> pi = jnp.full((2, 2), 0.5)
    >>> out = constrained_objective(pi, jnp.array([0, 1]), jnp.array([[1., 0.], [0., 1.]]),
    ...                             jnp.full(2, 0.5), jnp.array([2.0]), thresholds=jnp.array([0.5]),
    ...                             penalty="estimate")
    >>> out.estimates.tolist(), out.slacks.tolist(), float(out.lagrangian)  # 0.5 + 2 * 0
    ([0.5, 0.5], [0.0], 0.5)

  References:
    [OB] Gupta, Jeunen, Oosterhuis, de Rijke. RecSys 2024. https://arxiv.org/abs/2405.05736
  """
  checks.check_choice("estimator", estimator, ESTIMATORS)
  checks.check_choice("bound", bound, BOUNDS)
  checks.check_choice("penalty", penalty, PENALTIES)
  checks.check_level_option("delta", delta)
  if estimator == "dr" and reward_hat is None:
    raise ValueError("reward_hat: the 'dr' estimator needs reward models [n, A, 1 + m]")
  policy_dist, actions, rewards, logging_probs, multipliers, thresholds, reward_hat = \
      _check_objective_inputs(policy_dist, actions, rewards, logging_probs, multipliers,
                              thresholds, reward_hat)
  per_sample = _per_sample_values(policy_dist, actions, rewards, logging_probs,
                                 estimator=estimator, reward_hat=reward_hat)
  estimates = jnp.mean(per_sample, axis=0)
  truncate = bound in ("hoeffding", "bernstein")
  lower_bounds = jnp.stack([
      lower_bound(per_sample[:, j], delta=delta, method=bound, max_value=max_value,
                  truncate=truncate) for j in range(1, per_sample.shape[1])])
  constrained = lower_bounds if penalty == "lower_bound" else estimates[1:]
  slacks = constrained - thresholds
  lagrangian = estimates[0] + jax.lax.stop_gradient(multipliers) @ slacks
  return ConstrainedObjective(lagrangian, estimates, lower_bounds, slacks)


def _per_sample_values(policy_dist: jax.Array, actions: jax.Array, rewards: jax.Array,
                      logging_probs: jax.Array, *, estimator: str,
                      reward_hat: jax.Array | None = None) -> jax.Array:
  """[n, 1 + m] the estimator's per-round terms of every reward (column means: Vhat_j).

  Inputs as `constrained_objective` (checked there); beta* of "beta_ips" is fitted per reward
  at the current weights and held fixed (stop_gradient).
  """
  weights = jnp.take_along_axis(policy_dist, actions[:, None], axis=1)[:, 0] / logging_probs
  fixed_weights = jax.lax.stop_gradient(weights)
  scale = jnp.max(fixed_weights)
  scale = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)
  columns = []
  for j in range(rewards.shape[1]):
    if estimator == "beta_ips":
      # beta* = Cov(r w, w) / Var(w) is invariant to scaling w; fitted on w / max(w).
      baseline = optimal_baseline(rewards[:, j], fixed_weights / scale)
      zeros = jnp.zeros_like(weights)
      terms = beta_ips_from_rounds(LoggedRounds(rewards[:, j], weights, zeros, zeros),
                                   baseline=jax.lax.stop_gradient(baseline)).per_sample
    else:
      logged_hat = jnp.take_along_axis(reward_hat[..., j], actions[:, None], axis=1)[:, 0]
      dm = jnp.sum(policy_dist * reward_hat[..., j], axis=1)
      terms = dr_from_rounds(LoggedRounds(rewards[:, j], weights, logged_hat, dm)).per_sample
    columns.append(terms)
  return jnp.stack(columns, axis=1)
