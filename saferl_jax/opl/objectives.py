"""Off-policy learning objectives and baseline-corrected policy gradients (floor 1).

A policy pi_theta(a|x) gives the logged actions log-probabilities log pi_theta(a_i|x_i);
with the logging propensities p_i the importance weights are w_i(theta) = pi_theta(a_i|x_i) / p_i.
Objectives (to maximise; use their negation as an optax loss) take those log-probs, so they
never learn what model produced them:

  IPS:                mean_i r_i w_i(theta)
  SNIPS:              sum_i r_i w_i(theta) / sum_i w_i(theta)
  baseline-corrected: mean_i (r_i - beta) w_i(theta)   (BanditNet's lambda is such a beta)

The corrected gradient mean_i (r_i - beta) grad w_i is unbiased for every fixed beta because
E[grad w] = grad E[w] = 0. Its variance is smallest at the gradient-variance-optimal baseline

  beta*_grad = E[r ||grad w||^2] / E[||grad w||^2],

computed per mini-batch from per-example gradients (jax.vmap of jax.grad). The functions
that need gradients take an `apply_fn(params, contexts) -> logits [n, A]`. One dataset (or
mini-batch) per call; vmap over seeds or datasets.

References:
  [OB] Gupta, Jeunen, Oosterhuis, de Rijke. Optimal Baseline Corrections for Off-Policy
  Contextual Bandits. RecSys 2024. https://arxiv.org/abs/2405.05736
  Joachims, Swaminathan, de Rijke. Deep Learning with Logged Bandit Feedback. ICLR 2018.
  Swaminathan, Joachims. The Self-Normalized Estimator for Counterfactual Learning. NeurIPS 2015.
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.ope.baseline import optimal_baseline
from saferl_jax.policy_gradient import hard_filter  # re-exported: DRPO for bandit rounds


class LoggedBatch(NamedTuple):
  """Logged bandit feedback for learning: contexts [n, d], actions [n], rewards [n], logging_probs [n]."""
  contexts: jax.Array
  actions: jax.Array
  rewards: jax.Array
  logging_probs: jax.Array


def _rounds(log_probs: ArrayLike, logging_probs: ArrayLike,
            rewards: ArrayLike | None = None) -> tuple[jax.Array, ...]:
  """Checks the per-round arrays of one batch: [n] each, log-probs <= 0, propensities in (0, 1],
  finite rewards (values on concrete input only)."""
  arrays = {"log_probs": checks.as_float("log_probs", log_probs),
            "logging_probs": checks.as_float("logging_probs", logging_probs)}
  if rewards is not None:
    arrays["rewards"] = checks.as_float("rewards", rewards)
  for name, x in arrays.items():
    checks.check_ndim(name, x, 1)
  checks.check_same_length(**arrays)
  checks.check_log_probs("log_probs", arrays["log_probs"])
  checks.check_probabilities("logging_probs", arrays["logging_probs"])
  if rewards is not None:
    checks.check_finite("rewards", arrays["rewards"])
  return tuple(arrays.values())


def _weights(log_probs: jax.Array, logging_probs: jax.Array) -> jax.Array:
  return jnp.exp(log_probs - jnp.log(logging_probs))


def logged_log_probs(apply_fn: Callable, params, contexts: jax.Array, actions: jax.Array) -> jax.Array:
  """log pi_theta(a_i|x_i) for a softmax policy with logits apply_fn(params, contexts) [n, A].

  Actions are checked to lie in [0, A) on concrete input (a gather would clamp them).
  """
  logits = apply_fn(params, contexts)
  actions = checks.as_index("actions", actions, jnp.shape(logits)[-1], what="action")
  log_policy = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(log_policy, actions[:, None], axis=-1)[:, 0]


def policy_weights(log_probs: ArrayLike, logging_probs: ArrayLike) -> jax.Array:
  """w_i(theta) = exp(log pi_theta(a_i|x_i)) / p_i, computed in log space."""
  log_probs, logging_probs = checks.as_float("log_probs", log_probs), \
      checks.as_float("logging_probs", logging_probs)
  checks.check_log_probs("log_probs", log_probs)
  checks.check_probabilities("logging_probs", logging_probs)
  return _weights(log_probs, logging_probs)


def ips_objective(log_probs: ArrayLike, rewards: ArrayLike, logging_probs: ArrayLike) -> jax.Array:
  """mean_i r_i w_i(theta).

  Example:
    >>> import jax.numpy as jnp
    >>> float(ips_objective(jnp.log(jnp.array([0.5, 0.5])), jnp.array([1., 0.]), jnp.array([0.25, 0.5])))
    1.0
  """
  log_probs, logging_probs, rewards = _rounds(log_probs, logging_probs, rewards)
  return jnp.mean(rewards * _weights(log_probs, logging_probs))


def snips_objective(log_probs: ArrayLike, rewards: ArrayLike, logging_probs: ArrayLike) -> jax.Array:
  """sum_i r_i w_i(theta) / sum_i w_i(theta) (0, with no NaN gradient, when all weights vanish)."""
  log_probs, logging_probs, rewards = _rounds(log_probs, logging_probs, rewards)
  weights = _weights(log_probs, logging_probs)
  total = jnp.sum(weights)
  safe_total = jnp.where(total > 0, total, 1.0)
  return jnp.where(total > 0, jnp.sum(rewards * weights) / safe_total, 0.0)


def baseline_corrected_objective(log_probs: ArrayLike, rewards: ArrayLike, logging_probs: ArrayLike,
                                 baseline: ArrayLike) -> jax.Array:
  """mean_i (r_i - beta) w_i(theta); beta is held fixed (no gradient flows into it)."""
  log_probs, logging_probs, rewards = _rounds(log_probs, logging_probs, rewards)
  checks.check_scalar("baseline", baseline)
  baseline = jax.lax.stop_gradient(jnp.asarray(baseline))
  return jnp.mean((rewards - baseline) * _weights(log_probs, logging_probs))


def value_optimal_baseline(log_probs: ArrayLike, rewards: ArrayLike, logging_probs: ArrayLike) -> jax.Array:
  """beta* = Cov(r w, w) / Var(w) at the current theta: the evaluation-variance-optimal baseline.

  beta* does not change when every w is scaled, so it is fitted on w / max(w): the squares of
  weights near 1e20 (a propensity of 1e-20) would overflow float32.
  """
  log_probs, logging_probs, rewards = _rounds(log_probs, logging_probs, rewards)
  weights = jax.lax.stop_gradient(_weights(log_probs, logging_probs))
  scale = jnp.max(weights)
  scale = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)
  return optimal_baseline(rewards, weights / scale)


def per_example_weight_gradients(apply_fn: Callable, params, batch: LoggedBatch):
  """grad_theta w_i(theta) for every example: a pytree like params with a leading [n] axis."""
  def weight(p, context, action, logging_prob):
    log_prob = logged_log_probs(apply_fn, p, context[None], action[None])[0]
    return _weights(log_prob, logging_prob)
  return jax.vmap(jax.grad(weight), in_axes=(None, 0, 0, 0))(
      params, batch.contexts, batch.actions, batch.logging_probs)


def _squared_norms(per_example_grads) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(per_example_grads)
  return sum(jnp.sum(leaf.reshape(leaf.shape[0], -1) ** 2, axis=1) for leaf in leaves)


def gradient_optimal_baseline(rewards: ArrayLike, per_example_grads) -> jax.Array:
  """beta*_grad = sum_i r_i ||g_i||^2 / sum_i ||g_i||^2 from per-example gradients g_i of w_i.

  Returns 0 (and no NaN) when every gradient is zero.
  """
  rewards = _check_rewards_grads(rewards, per_example_grads)
  norms = _squared_norms(per_example_grads)
  # Squared norms of gradients near 1e20 overflow; beta*_grad is a ratio, so scale them first.
  scale = jax.lax.stop_gradient(jnp.max(norms))
  scale = jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)
  norms = norms / scale
  total = jnp.sum(norms)
  safe_total = jnp.where(total > 0, total, 1.0)
  return jnp.where(total > 0, jnp.sum(rewards * norms) / safe_total, 0.0)


def _check_rewards_grads(rewards: ArrayLike, per_example_grads) -> jax.Array:
  """rewards [n], finite, and per-example gradients with a leading [n] axis, finite."""
  rewards = checks.as_float("rewards", rewards)
  checks.check_ndim("rewards", rewards, 1)
  checks.check_same_length(rewards=rewards)
  checks.check_finite("rewards", rewards)
  leaves = jax.tree_util.tree_leaves(per_example_grads)
  if not leaves:
    raise ValueError("per_example_grads: is an empty pytree; it needs one gradient per example")
  for leaf in leaves:
    if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != rewards.shape[0]:
      raise ValueError(f"per_example_grads: every leaf needs a leading axis of {rewards.shape[0]} "
                       f"examples like rewards, got shape {tuple(jnp.shape(leaf))}")
    checks.check_finite("per_example_grads", leaf)
  return rewards


def corrected_gradient(rewards: ArrayLike, per_example_grads, baseline: ArrayLike):
  """mean_i (r_i - beta) g_i: the baseline-corrected policy gradient (ascent direction)."""
  rewards = _check_rewards_grads(rewards, per_example_grads)
  checks.check_scalar("baseline", baseline)
  coefficients = rewards - baseline
  return jax.tree_util.tree_map(
      lambda g: jnp.tensordot(coefficients, g, axes=1) / g.shape[0], per_example_grads)


def gradient_variance(rewards: ArrayLike, per_example_grads, baseline: ArrayLike) -> jax.Array:
  """Variance of the corrected gradient estimator: trace Cov_i((r_i - beta) g_i) / n.

  The sum over parameters of the per-example terms' sample variance, divided by the batch
  size: the expected squared distance of the mini-batch gradient from its mean. On a finite
  batch the beta minimising this centred variance differs slightly from beta*_grad, which
  minimises the uncentred second moment; the two agree in expectation since E[grad w] = 0.
  """
  rewards = _check_rewards_grads(rewards, per_example_grads)
  checks.check_scalar("baseline", baseline)
  if rewards.shape[0] < 2:
    raise ValueError(f"rewards: a variance needs at least 2 examples, got {rewards.shape[0]}")
  coefficients = rewards - baseline
  total = 0.0
  for leaf in jax.tree_util.tree_leaves(per_example_grads):
    terms = coefficients[:, None] * leaf.reshape(leaf.shape[0], -1)
    total = total + jnp.sum(jnp.var(terms, axis=0, ddof=1))
  return total / coefficients.shape[0]


def filtered_likelihood_objective(log_probs: ArrayLike, rewards: ArrayLike, *,
                                  quantile: float) -> jax.Array:
  """[DRPO] Mean log-likelihood of the logged actions whose reward passes `hard_filter`.

  Optimistic distributionally robust policy optimisation reduces to this hard filtering: with
  logs that mix good and bad behaviour, negative-advantage updates can blow up the logits
  off-policy, so the rounds below the threshold are discarded and the rest are imitated.

  Args:
    log_probs: [n] log pi_theta(a_i|x_i) of the logged actions.
    rewards: [n] (estimated) rewards of the logged rounds.
    quantile: the fraction of rounds to discard, in [0, 1).

  Reference:
    [DRPO] Jiang et al. Optimistic Distributionally Robust Policy Optimization for Off-Policy
    Generative Recommendation. https://arxiv.org/abs/2602.10430

  Example:
    >>> import jax.numpy as jnp
    >>> float(filtered_likelihood_objective(jnp.log(jnp.array([0.5, 0.25, 1.0, 0.5])),
    ...                                     jnp.array([1., 0., 1., 0.]), quantile=0.5))
    -0.3465735912322998
  """
  log_probs, rewards = checks.as_float("log_probs", log_probs), checks.as_float("rewards", rewards)
  checks.check_ndim("log_probs", log_probs, 1)
  checks.check_ndim("rewards", rewards, 1)
  checks.check_same_length(log_probs=log_probs, rewards=rewards)
  checks.check_log_probs("log_probs", log_probs)
  checks.check_finite("rewards", rewards)
  checks.check_scalar("quantile", quantile)
  kept = hard_filter(rewards, quantile=quantile)
  return jnp.sum(jnp.where(kept, log_probs, 0.0)) / jnp.maximum(jnp.sum(kept), 1)


METHODS = ("ips", "snips", "banditnet", "beta_value", "beta_grad")


def logged_batch(contexts, actions, rewards, logging_probs) -> LoggedBatch:
  """Validates logged feedback (any leading seed axes) and packs it into a `LoggedBatch`."""
  contexts = checks.as_float("contexts", contexts)
  actions = checks.as_int("actions", actions)
  rewards = checks.as_float("rewards", rewards)
  logging_probs = checks.as_float("logging_probs", logging_probs)
  if contexts.shape[:-1] != actions.shape or actions.shape != rewards.shape or \
     rewards.shape != logging_probs.shape:
    raise ValueError(
        f"contexts/actions/rewards/logging_probs: shapes {contexts.shape}, {actions.shape}, "
        f"{rewards.shape}, {logging_probs.shape} do not match ([..., n, d] and [..., n])")
  checks.check_finite("contexts", contexts)
  checks.check_finite("rewards", rewards)
  checks.check_probabilities("logging_probs", logging_probs)
  if checks.is_concrete(actions) and actions.size and int(jnp.min(actions)) < 0:
    raise ValueError("actions: must be >= 0 (their upper end, the number of actions, is checked "
                     "against the policy's logits by `logged_log_probs`)")
  return LoggedBatch(contexts, actions, rewards, logging_probs)


class MethodGradient(NamedTuple):
  """`method_gradient`'s result: the descent direction and the baseline it used (0 without one)."""
  grads: Any
  baseline: jax.Array


def method_gradient(method: str, apply_fn: Callable, params, batch: LoggedBatch, *,
                    banditnet_lambda: float = 0.0):
  """The descent direction (negated policy gradient) of `method` on one batch, and its baseline."""
  checks.check_choice("method", method, METHODS)
  checks.check_scalar("banditnet_lambda", banditnet_lambda)
  if method == "beta_grad":
    # Per-example gradients serve only beta*_grad's norms; the corrected gradient itself comes
    # from one backward pass (3 times faster for an MLP than summing per-example gradients).
    per_example = per_example_weight_gradients(apply_fn, params, batch)
    gradient_baseline = gradient_optimal_baseline(batch.rewards, per_example)

  def loss(p):
    log_probs = logged_log_probs(apply_fn, p, batch.contexts, batch.actions)
    if method == "ips":
      return -ips_objective(log_probs, batch.rewards, batch.logging_probs), 0.0
    if method == "snips":
      return -snips_objective(log_probs, batch.rewards, batch.logging_probs), 0.0
    if method == "banditnet":
      baseline = jnp.asarray(banditnet_lambda, log_probs.dtype)
    elif method == "beta_value":
      baseline = value_optimal_baseline(log_probs, batch.rewards, batch.logging_probs)
    elif method == "beta_grad":
      baseline = gradient_baseline
    else:
      raise ValueError(f"method: must be one of {METHODS}, got {method!r}")
    return -baseline_corrected_objective(log_probs, batch.rewards, batch.logging_probs,
                                             baseline), baseline
  grads, baseline = jax.grad(loss, has_aux=True)(params)
  return MethodGradient(grads, jnp.asarray(baseline))
