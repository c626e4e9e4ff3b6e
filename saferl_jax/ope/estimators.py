"""Off-policy value estimators for contextual bandits (floor 1).

Every estimator comes in two forms. The public form takes one logged dataset as
arrays (rewards [n], actions [n], logging_probs [n], target_dist [n, A] and, for
the model-based ones, reward_hat [n, A]; or, for a log of L slots, target_dist and
reward_hat [n, A, L] with the keyword `positions` [n], round i using slot
positions[i] as in Open Bandit Pipeline); the `*_from_rounds` form takes the
`LoggedRounds` that `logged_rounds` reduces them to, so the bootstrap can
resample rounds and recompute any estimator cheaply. Both return an `Estimate`
whose `per_sample` contributions average to `value`. One dataset per call:
batch datasets with `jax.vmap`. Clip, tau and lambda_ follow Open Bandit
Pipeline's conventions.

Eager calls on concrete arrays are a first-class path: the public form checks
shapes in Python, then runs one module-level jitted kernel that computes the
estimates and the value checks' flags together (min, max and row-sum
reductions); the flags come back in one host transfer and a failed one raises a
ValueError naming the argument. Device arrays that passed are not checked again
by the next estimator, and the importance weights computed from the same
actions, logging_probs and target_dist (device arrays) are reused rather than
gathered again from [n, A] (kept until one of those arrays is collected). Under
jit, vmap or grad (tracers) only shapes are checked and concrete arguments keep
their host checks, as before.

References:
  Dudik, Langford, Li. Doubly Robust Policy Evaluation and Learning. ICML 2011. https://arxiv.org/abs/1103.4601
  Swaminathan, Joachims. The Self-Normalized Estimator for Counterfactual Learning. NeurIPS 2015.
  Bottou et al. Counterfactual Reasoning and Learning Systems. JMLR 2013. https://arxiv.org/abs/1209.2355
  Wang, Agarwal, Dudik. Optimal and Adaptive Off-policy Evaluation in Contextual Bandits. ICML 2017. https://arxiv.org/abs/1612.01205
  Su, Dimakopoulou, Krishnamurthy, Dudik. Doubly Robust Off-policy Evaluation with Shrinkage. ICML 2020. https://arxiv.org/abs/1907.09623
  Metelli, Russo, Restelli. Subgaussian and Differentiable Importance Sampling for Off-Policy Evaluation and Learning. NeurIPS 2021. https://proceedings.neurips.cc/paper/2021/hash/4476b929e30dd0c4e8bdbcc82c6ba23a-Abstract.html
  [OB] Gupta, Jeunen, Oosterhuis, de Rijke. Optimal Baseline Corrections for Off-Policy Contextual Bandits. RecSys 2024. https://arxiv.org/abs/2405.05736
"""

from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.ope.baseline import cross_fitted_baselines
from saferl_jax.ope import rounds as rounds_lib
from saferl_jax.ope.rounds import LoggedRounds


class Estimate(NamedTuple):
  """An off-policy estimate.

  Attributes:
    value: scalar estimate of the target policy's value.
    per_sample: [n] per-round contributions; their mean is `value` (None from the streaming
      estimators, which keep no per-round array).
    stderr: scalar standard error (sample std / sqrt(n) for the linear
      estimators, the delta method for the self-normalised ones).
  """
  value: jax.Array
  per_sample: jax.Array
  stderr: jax.Array


def _scale(x: jax.Array) -> jax.Array:
  """max |x| (1 where that is 0 or not finite), a constant to divide by before squaring."""
  scale = jax.lax.stop_gradient(jnp.max(jnp.abs(x)))
  return jnp.where((scale > 0) & jnp.isfinite(scale), scale, 1.0)


def _std(x: jax.Array) -> jax.Array:
  """The sample std (ddof=1) computed on x / max|x|: squares of contributions near 1e20 (a
  propensity of 1e-20) would overflow float32, their std does not."""
  scale = _scale(x)
  return scale * jnp.std(x / scale, ddof=1)


def _norm(x: jax.Array) -> jax.Array:
  """sqrt(sum x^2) without overflow in the squares."""
  scale = _scale(x)
  return scale * jnp.sqrt(jnp.sum(jnp.square(x / scale)))


def _linear_estimate(per_sample: jax.Array) -> Estimate:
  n = per_sample.shape[0]
  if n < 2:  # A standard error needs two rounds; say so rather than return NaN.
    return Estimate(jnp.mean(per_sample), per_sample, jnp.asarray(jnp.inf, per_sample.dtype))
  return Estimate(jnp.mean(per_sample), per_sample, _std(per_sample) / jnp.sqrt(n))


def _self_normalised(numerators: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-round numerators / mean(w), whose mean is sum(numerators) / sum(w), and
  the delta-method influence terms of that ratio.

  With no weight mass at all (the target never takes a logged action) the ratio
  is undefined; it is 0 here, with no NaN in values or gradients.
  """
  mean_weight = jnp.mean(weights)
  nonzero = mean_weight != 0
  safe_mean = jnp.where(nonzero, mean_weight, 1.0)
  scaled = jnp.where(nonzero, numerators / safe_mean, 0.0)
  influence = (numerators - jnp.mean(scaled) * weights) / safe_mean
  return scaled, influence


def _delta_method_estimate(per_sample: jax.Array, influence: jax.Array) -> Estimate:
  n = per_sample.shape[0]
  if n < 2:  # As for the linear estimators: one round gives no standard error.
    return Estimate(jnp.mean(per_sample), per_sample, jnp.asarray(jnp.inf, per_sample.dtype))
  return Estimate(jnp.mean(per_sample), per_sample, _norm(influence) / n)


def _clipped(weights: jax.Array, clip) -> jax.Array:
  checks.check_nonnegative_option("clip", clip, strictly_positive=True)
  return weights if clip is None else jnp.minimum(weights, clip)


# Estimators on LoggedRounds.


def ips_from_rounds(rounds: LoggedRounds, *, clip: float | None = None) -> Estimate:
  """IPS: mean of w_i r_i; with `clip`, mean of min(w_i, clip) r_i (biased low, lower variance)."""
  return _linear_estimate(_clipped(rounds.weights, clip) * rounds.rewards)


def snips_from_rounds(rounds: LoggedRounds) -> Estimate:
  """SNIPS: sum w_i r_i / sum w_i; per-round w_i r_i / mean(w)."""
  scaled, influence = _self_normalised(rounds.weights * rounds.rewards, rounds.weights)
  return _delta_method_estimate(scaled, influence)


def dm_from_rounds(rounds: LoggedRounds) -> Estimate:
  """DM: mean of sum_a pi(a|x_i) qhat(x_i, a); its stderr covers context sampling only."""
  return _linear_estimate(rounds.dm)


def dr_from_rounds(rounds: LoggedRounds, *, clip: float | None = None) -> Estimate:
  """DR: dm_i + w_i (r_i - qhat(x_i, a_i)); `clip` replaces w_i by min(w_i, clip)."""
  residuals = rounds.rewards - rounds.reward_hat_logged
  return _linear_estimate(rounds.dm + _clipped(rounds.weights, clip) * residuals)


def sndr_from_rounds(rounds: LoggedRounds) -> Estimate:
  """SNDR: dm_i + w_i (r_i - qhat(x_i, a_i)) / mean(w)."""
  residuals = rounds.rewards - rounds.reward_hat_logged
  scaled, influence = _self_normalised(rounds.weights * residuals, rounds.weights)
  return _delta_method_estimate(rounds.dm + scaled, rounds.dm - jnp.mean(rounds.dm) + influence)


def switch_dr_from_rounds(rounds: LoggedRounds, *, tau: float) -> Estimate:
  """Switch-DR (OBP's form): dm_i + 1{w_i <= tau} w_i (r_i - qhat(x_i, a_i))."""
  checks.check_nonnegative_option("tau", tau)
  residuals = rounds.rewards - rounds.reward_hat_logged
  kept = jnp.where(rounds.weights <= tau, rounds.weights, 0.0)
  return _linear_estimate(rounds.dm + kept * residuals)


def dr_os_from_rounds(rounds: LoggedRounds, *, lambda_: float) -> Estimate:
  """DRos: dm_i + lambda_ w_i / (w_i^2 + lambda_) (r_i - qhat(x_i, a_i)).

  lambda_ = 0 gives DM, lambda_ = inf gives DR.
  """
  checks.check_nonnegative_option("lambda_", lambda_)
  weights = rounds.weights
  lambda_ = jnp.asarray(lambda_, weights.dtype)
  infinite = jnp.isinf(lambda_)
  finite_lambda = jnp.where(infinite, 1.0, lambda_)  # double where: no inf / inf, no NaN gradient
  denominator = weights**2 + finite_lambda
  safe_denominator = jnp.where(denominator > 0, denominator, 1.0)
  shrunk = jnp.where(denominator > 0, finite_lambda * weights / safe_denominator, 0.0)
  shrunk = jnp.where(infinite, weights, shrunk)
  residuals = rounds.rewards - rounds.reward_hat_logged
  return _linear_estimate(rounds.dm + shrunk * residuals)


def _subgaussian_weights(weights: jax.Array, lambda_) -> jax.Array:
  """w / ((1 - lambda_) + lambda_ w); 0 where the denominator is 0 (lambda_ = 1 and w = 0,
  a round the target never takes: the limit of every lambda_ < 1), with no NaN gradient."""
  checks.check_scalar("lambda_", lambda_, low=0.0, high=1.0)
  lambda_ = jnp.asarray(lambda_, weights.dtype)
  denominator = (1.0 - lambda_) + lambda_ * weights
  positive = denominator > 0
  return jnp.where(positive, weights / jnp.where(positive, denominator, 1.0), 0.0)


def sg_ips_from_rounds(rounds: LoggedRounds, *, lambda_: float) -> Estimate:
  """SubGaussian IPS: mean of w_i r_i / ((1 - lambda_) + lambda_ w_i), lambda_ in [0, 1].

  lambda_ = 0 gives IPS; the weights are bounded by 1 / lambda_.
  """
  return _linear_estimate(_subgaussian_weights(rounds.weights, lambda_) * rounds.rewards)


def sg_dr_from_rounds(rounds: LoggedRounds, *, lambda_: float) -> Estimate:
  """SubGaussian DR: dm_i + w_i / ((1 - lambda_) + lambda_ w_i) (r_i - qhat(x_i, a_i)).

  lambda_ = 0 gives DR.
  """
  residuals = rounds.rewards - rounds.reward_hat_logged
  return _linear_estimate(rounds.dm + _subgaussian_weights(rounds.weights, lambda_) * residuals)


Baseline = float | jax.Array | Literal["optimal", "cross_fit"] | None


def beta_ips_from_rounds(
    rounds: LoggedRounds, *, baseline: Baseline = None, num_folds: int = 2
) -> Estimate:
  """beta-IPS [OB]: (r_i - beta) w_i + beta.

  Args:
    rounds: the logged rounds.
    baseline: None or "optimal" for the plug-in variance-optimal beta*
      (`optimal_baseline`, O(1/n) bias); "cross_fit" for beta* cross-fitted over
      `num_folds` folds (unbiased); a number for that fixed beta (unbiased;
      0 gives IPS).
    num_folds: folds for "cross_fit".
  """
  rewards, weights = rounds.rewards, rounds.weights
  # beta* = Cov(r w, w) / Var(w) does not change when w is scaled: fitting it on w / max(w) keeps
  # w^2 finite for weights up to float32's largest (a propensity of 1e-20 gives w near 1e20).
  scaled = weights / _scale(weights)
  if baseline is None or (isinstance(baseline, str) and baseline == "optimal"):
    beta, residual_terms = _plug_in_beta(rewards, weights, scaled)
    return _linear_estimate(residual_terms + beta)
  if isinstance(baseline, str) and baseline == "cross_fit":
    checks.check_positive_int("num_folds", num_folds)
    beta = cross_fitted_baselines(rewards, scaled, num_folds=num_folds)
  elif isinstance(baseline, str):
    raise ValueError(
        f"baseline: must be None, 'optimal', 'cross_fit' or a number, got {baseline!r}")
  else:
    checks.check_scalar("baseline", baseline)
    beta = jnp.asarray(baseline, weights.dtype)
  return _linear_estimate((rewards - beta) * weights + beta)


def _plug_in_beta(rewards: jax.Array, weights: jax.Array, scaled: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """The plug-in beta* and the terms (r_i - beta*) w_i, without the cancellation of r_i - beta*
  at large w_i (the beta-IPS contributions are these terms plus beta*).

  With one dominant weight w_m, beta* is within O(1 / w_m) of r_m, so r_m - beta* formed by
  subtraction loses every digit that w_m then multiplies back (eager and jit differed by 20% in
  float32 at w near 1e6). Instead, with the pivot r_m of the largest weight,
  r_m - beta* = sum_j c_j w_j (r_m - r_j) / sum_j c_j^2 (c = w - mean w), in which the dominant
  round contributes exactly 0, and (r_i - beta*) w_i = (r_i - r_m) w_i + (r_m - beta*) w_i.
  beta* is 0 when the weights do not vary, as in `optimal_baseline`.
  """
  pivot = rewards[jnp.argmax(scaled)]
  centred = scaled - jnp.mean(scaled)
  variance = jnp.sum(jnp.square(centred))
  varies = variance > 0
  safe_variance = jnp.where(varies, variance, 1.0)
  pivot_gap = jnp.where(varies, jnp.sum(centred * scaled * (pivot - rewards)) / safe_variance, 0.0)
  beta = jnp.where(varies, pivot - pivot_gap, 0.0)
  gap_terms = jnp.where(varies, (rewards - pivot) * weights + pivot_gap * weights, rewards * weights)
  return beta, gap_terms


class BetaIPSBias(NamedTuple):
  """The plug-in beta*-IPS estimate with a jackknife estimate of its O(1/n) bias.

  Attributes:
    value: the plug-in beta*-IPS estimate (`beta_ips` with the default baseline).
    bias: the delete-one jackknife estimate of E[value] - V; `value - bias` is the
      jackknife-corrected estimate, whose bias is O(1/n^2).
    baseline: the plug-in beta* = Cov(r w, w) / Var(w) that `value` used.
  """
  value: jax.Array
  bias: jax.Array
  baseline: jax.Array


def _exclusive_sums(x: jax.Array) -> jax.Array:
  """sum_{j != i} x_j for every i, from prefix and suffix sums: no total minus x_i, which would
  cancel when x_i dominates the total."""
  zero = jnp.zeros((1,), x.dtype)
  before = jnp.concatenate([zero, jnp.cumsum(x)[:-1]])
  after = jnp.concatenate([jnp.cumsum(x[::-1])[::-1][1:], zero])
  return before + after


def beta_ips_bias_from_rounds(rounds: LoggedRounds) -> BetaIPSBias:
  """The delete-one jackknife bias of the plug-in beta*-IPS, in O(n) from sums.

  With c_i = w_i - mean(w), u_i = (r_i w_i - mean(r w)) - beta* c_i (the residual of the
  regression of r w on w, so sum_i c_i u_i = 0), the leave-one-out mean weight
  m_{-i} = mean(w) - c_i / (n - 1) and D_{-i} = sum_{j != i} (w_j - m_{-i})^2,

    bias = (n - 1) (mean_i V_{-i} - V) = sum_i c_i u_i (m_{-i} - 1) / D_{-i}.

  Derivation: V(beta) = mean(r w) - beta (mean(w) - 1), so
  V_{-i} - V = -u_i / (n - 1) - (beta*_{-i} - beta*) (m_{-i} - 1), and the first term
  averages to 0 over i. Removing round i changes the co-moment of (w, r w - beta* w)
  from 0 to -n/(n-1) c_i u_i, so beta*_{-i} - beta* = -n/(n-1) c_i u_i / D_{-i}. A
  leave-one-out sample with constant weights (D_{-i} = 0) has beta*_{-i} = 0, as
  `optimal_baseline` defines it: its term is (n-1)/n beta* (m_{-i} - 1).

  The sums without round i come from prefix and suffix sums about the mean of the
  other weights, not from totals minus round i's term, so a dominant weight does not
  cancel them away. In float32 the bias then agrees with a float64 leave-one-out loop
  to about 1e-6 relative on heavy-tailed (lognormal, Pareto) weights and to 1e-4 to 1e-3
  with one weight 1e5 times the others, but only to a few percent for a weight near 1e6
  in a log of a few dozen rounds: use jax.enable_x64 for such logs.

  Args:
    rounds: the `LoggedRounds` of at least 2 rounds (only rewards and weights are used).

  Returns:
    A `BetaIPSBias(value, bias, baseline)`, as `beta_ips_bias` returns it.

  Example:
    >>> import jax.numpy as jnp
    >>> r, w = jnp.array([0.3, 0.9]), jnp.array([2.0, 0.5])
    >>> out = beta_ips_bias_from_rounds(LoggedRounds(r, w, jnp.zeros(2), jnp.zeros(2)))
    >>> # V = 0.5; without either round beta* = 0 and V_{-i} = r_j w_j: (0.45, 0.6).
    >>> round(float(out.bias), 4)  # (2 - 1) * (0.525 - 0.5)
    0.025
  """
  rewards, weights = rounds.rewards, rounds.weights
  n = weights.shape[0]
  if n < 2:
    raise ValueError(f"rewards: the jackknife needs at least 2 rounds, got {n}")
  scale = _scale(weights)
  scaled = weights / scale
  beta, residual_terms = _plug_in_beta(rewards, weights, scaled)
  centred = scaled - jnp.mean(scaled)
  residuals = (residual_terms - jnp.mean(residual_terms)) / scale  # u_i, in units of w / scale
  # m_{-i} and D_{-i} from sums about the mean of the weights other than the largest: without
  # that round (the one whose removal matters most) the shift is exactly the remaining mean, and
  # with it the remaining spread dwarfs the shift's offset, so nothing below cancels (mean(w) -
  # c_i / (n - 1) would, at i = the largest weight).
  largest = jnp.argmax(scaled)
  others = jnp.arange(n) != largest
  shift = jnp.sum(jnp.where(others, scaled, 0.0)) / (n - 1)
  shifted = scaled - shift
  loo_sums = _exclusive_sums(shifted)
  loo_mean = scale * (shift + loo_sums / (n - 1))
  loo_squares = _exclusive_sums(shifted**2)
  loo_spread = loo_squares - loo_sums**2 / (n - 1)
  # Constant weights without round i give a spread of 0 up to the rounding of the sums (an FMA
  # can leave 1e-17 where 0 is exact): below that, beta*_{-i} = 0 as for exactly constant weights.
  rounding = (8 + 2 * math.log2(n)) * jnp.finfo(loo_spread.dtype).eps
  varies = loo_spread > rounding * loo_squares
  safe_spread = jnp.where(varies, loo_spread, 1.0)
  # sum_i c_i u_i = 0 (u is the residual of the least-squares fit): the largest round's c_i u_i
  # is minus the others'. Formed directly, its u_i (small, since that round's residual is what
  # the fit absorbs) would be a difference of two O(1) terms with few digits left in float32.
  products = centred * residuals
  products = jnp.where(others, products, -jnp.sum(jnp.where(others, products, 0.0)))
  terms = jnp.where(varies, products * (loo_mean - 1.0) / safe_spread,
                    (n - 1) / n * beta * (loo_mean - 1.0))
  return BetaIPSBias(jnp.mean(residual_terms) + beta, jnp.sum(terms), beta)


# The public interface on logged arrays.


def ips(rewards: ArrayLike, actions: ArrayLike, logging_probs: ArrayLike,
        target_dist: ArrayLike, *, clip: float | None = None,
        positions: ArrayLike | None = None) -> Estimate:
  """Inverse propensity scoring: V = mean_i min(w_i, clip) r_i, w_i = pi(a_i|x_i) / p_i.

  Args:
    rewards: [n] rewards.
    actions: [n] int logged actions in [0, A).
    logging_probs: [n] logging propensities of the logged actions, in (0, 1].
    target_dist: [n, A] target policy distribution per round; or [n, A, L], one
      distribution per slot, with `positions`.
    clip: optional weight cap (OBP's lambda_); None for unbiased IPS.
    positions: optional [n] ints in [0, L), the slot of each round (OBP's
      `position`): round i uses target_dist[i, :, positions[i]] (and
      reward_hat[i, :, positions[i]] for the model-based estimators). Every
      estimator takes it.

  Returns:
    An `Estimate`.

  Example:
    >>> import jax.numpy as jnp
    >>> est = ips(jnp.array([1., 0., 1., 1.]), jnp.array([0, 1, 0, 1]),
    ...           jnp.full(4, 0.5), jnp.tile(jnp.array([0.8, 0.2]), (4, 1)))
    >>> round(float(est.value), 4)
    0.9
    >>> slots = jnp.stack([jnp.tile(jnp.array([0.8, 0.2]), (4, 1)),
    ...                    jnp.full((4, 2), 0.5)], axis=-1)  # [n, A, L = 2]
    >>> est = ips(jnp.array([1., 0., 1., 1.]), jnp.array([0, 1, 0, 1]), jnp.full(4, 0.5),
    ...           slots, positions=jnp.array([0, 0, 0, 0]))
    >>> round(float(est.value), 4)
    0.9
  """
  return _estimate_one("ips", dict(clip=clip), rewards, actions, logging_probs, target_dist,
                       positions=positions)


def snips(rewards: ArrayLike, actions: ArrayLike, logging_probs: ArrayLike,
          target_dist: ArrayLike, *, positions: ArrayLike | None = None) -> Estimate:
  """Self-normalised IPS: V = sum_i w_i r_i / sum_i w_i. Shapes and positions as in `ips`.

  Example:
    >>> import jax.numpy as jnp
    >>> est = snips(jnp.array([1., 0., 1., 1.]), jnp.array([0, 1, 0, 1]),
    ...             jnp.full(4, 0.5), jnp.tile(jnp.array([0.8, 0.2]), (4, 1)))
    >>> round(float(est.value), 4)
    0.9
  """
  return _estimate_one("snips", {}, rewards, actions, logging_probs, target_dist,
                       positions=positions)


def dm(target_dist: ArrayLike, reward_hat: ArrayLike, *,
       positions: ArrayLike | None = None) -> Estimate:
  """Direct method: V = mean_i sum_a pi(a|x_i) qhat(x_i, a).

  Args:
    target_dist: [n, A] target policy distribution per round ([n, A, L] with
      `positions`).
    reward_hat: [n, A] reward model predictions ([n, A, L] with `positions`).
    positions: optional [n] slot per round, as in `ips`.

  Example:
    >>> import jax.numpy as jnp
    >>> round(float(dm(jnp.array([[0.5, 0.5]]), jnp.array([[1., 0.]])).value), 4)
    0.5
  """
  target_dist = jnp.asarray(target_dist)
  n = target_dist.shape[0] if target_dist.ndim else 0
  placeholders = jnp.zeros((n,)), jnp.zeros((n,), int), jnp.ones((n,))
  return _estimate_one("dm", {}, *placeholders, target_dist, reward_hat, positions=positions)


def dr(rewards: ArrayLike, actions: ArrayLike, logging_probs: ArrayLike, target_dist: ArrayLike,
       reward_hat: ArrayLike, *, clip: float | None = None,
       positions: ArrayLike | None = None) -> Estimate:
  """Doubly robust: V = mean_i dm_i + min(w_i, clip) (r_i - qhat(x_i, a_i)).

  Args: as `ips`, plus reward_hat [n, A] reward model predictions ([n, A, L]
  with `positions`, the same L as target_dist).

  Example:
    >>> import jax.numpy as jnp
    >>> est = dr(jnp.array([1., 0.]), jnp.array([0, 1]), jnp.full(2, 0.5),
    ...          jnp.full((2, 2), 0.5), jnp.full((2, 2), 0.5))
    >>> round(float(est.value), 4)
    0.5
  """
  return _estimate_one("dr", dict(clip=clip), rewards, actions, logging_probs, target_dist,
                       reward_hat, positions=positions)


def sndr(rewards: ArrayLike, actions: ArrayLike, logging_probs: ArrayLike, target_dist: ArrayLike,
         reward_hat: ArrayLike, *, positions: ArrayLike | None = None) -> Estimate:
  """Self-normalised DR: V = mean_i dm_i + w_i (r_i - qhat(x_i, a_i)) / mean(w). Shapes as `dr`."""
  return _estimate_one("sndr", {}, rewards, actions, logging_probs, target_dist, reward_hat,
                       positions=positions)


def switch_dr(rewards: ArrayLike, actions: ArrayLike, logging_probs: ArrayLike,
              target_dist: ArrayLike, reward_hat: ArrayLike, *, tau: float,
              positions: ArrayLike | None = None) -> Estimate:
  """Switch-DR: the DR correction only where w_i <= tau, DM alone elsewhere. Shapes as `dr`."""
  return _estimate_one("switch_dr", dict(tau=tau), rewards, actions, logging_probs, target_dist,
                       reward_hat, positions=positions)


def dr_os(rewards: ArrayLike, actions: ArrayLike, logging_probs: ArrayLike,
          target_dist: ArrayLike, reward_hat: ArrayLike, *, lambda_: float,
          positions: ArrayLike | None = None) -> Estimate:
  """DR with optimistic shrinkage: w_i replaced by lambda_ w_i / (w_i^2 + lambda_). Shapes as `dr`."""
  return _estimate_one("dr_os", dict(lambda_=lambda_), rewards, actions, logging_probs,
                       target_dist, reward_hat, positions=positions)


def sg_ips(rewards: ArrayLike, actions: ArrayLike, logging_probs: ArrayLike,
           target_dist: ArrayLike, *, lambda_: float,
           positions: ArrayLike | None = None) -> Estimate:
  """SubGaussian IPS: V = mean_i w_lam,i r_i, w_lam = w / ((1 - lambda_) + lambda_ w).

  The power-mean correction of Metelli et al. (2021): each weight is shrunk towards
  1 / lambda_ (its bound), which trades a downward bias (w_lam <= w) for a
  subgaussian concentration, and stays differentiable in the target policy
  (unlike clipping). lambda_ = 0 gives IPS; lambda_ = 1 gives w_lam = 1 wherever
  w > 0 (and 0 where w = 0). Choose lambda_ on a grid: the function is jit- and
  vmap-friendly in lambda_. This is Open Bandit Pipeline's
  `SubGaussianInverseProbabilityWeighting(lambda_)`.

  Args:
    rewards, actions, logging_probs, target_dist, positions: as in `ips`.
    lambda_: the shrinkage, in [0, 1].

  Returns:
    An `Estimate`; its stderr is the sample std of the contributions / sqrt(n).

  Example:
    >>> import jax.numpy as jnp
    >>> args = (jnp.array([1., 0., 1., 1.]), jnp.array([0, 1, 0, 1]),
    ...         jnp.full(4, 0.5), jnp.tile(jnp.array([0.8, 0.2]), (4, 1)))
    >>> round(float(sg_ips(*args, lambda_=0.0).value), 4)  # IPS
    0.9
    >>> # w = 1.6 on rounds 0, 2 -> 1.6 / (0.5 + 0.8) = 1.2308; w = 0.4 on round 3 -> 0.5714
    >>> round(float(sg_ips(*args, lambda_=0.5).value), 4)
    0.7582

  References:
    Metelli, Russo, Restelli. Subgaussian and Differentiable Importance Sampling
    for Off-Policy Evaluation and Learning. NeurIPS 2021.
    https://proceedings.neurips.cc/paper/2021/hash/4476b929e30dd0c4e8bdbcc82c6ba23a-Abstract.html
  """
  return _estimate_one("sg_ips", dict(lambda_=lambda_), rewards, actions, logging_probs,
                       target_dist, positions=positions)


def sg_dr(rewards: ArrayLike, actions: ArrayLike, logging_probs: ArrayLike,
          target_dist: ArrayLike, reward_hat: ArrayLike, *, lambda_: float,
          positions: ArrayLike | None = None) -> Estimate:
  """SubGaussian DR: V = mean_i dm_i + w_lam,i (r_i - qhat(x_i, a_i)).

  w_lam = w / ((1 - lambda_) + lambda_ w) as in `sg_ips`; lambda_ = 0 gives DR.
  Open Bandit Pipeline's `SubGaussianDoublyRobust(lambda_)`.

  Args:
    rewards, actions, logging_probs, target_dist, reward_hat, positions: as in
      `dr`.
    lambda_: the shrinkage, in [0, 1].

  Returns:
    An `Estimate`; its stderr is the sample std of the contributions / sqrt(n).

  Example:
    >>> import jax.numpy as jnp
    >>> # w = (1.6, 0.4); w_lam at lambda_ = 0.5: (1.2308, 0.5714); dm_i = 0.5
    >>> est = sg_dr(jnp.array([1., 0.]), jnp.array([0, 1]), jnp.full(2, 0.5),
    ...             jnp.tile(jnp.array([0.8, 0.2]), (2, 1)), jnp.full((2, 2), 0.5),
    ...             lambda_=0.5)
    >>> round(float(est.value), 4)  # 0.5 + (1.2308 * 0.5 - 0.5714 * 0.5) / 2
    0.6648

  References:
    Metelli, Russo, Restelli. Subgaussian and Differentiable Importance Sampling
    for Off-Policy Evaluation and Learning. NeurIPS 2021.
    https://proceedings.neurips.cc/paper/2021/hash/4476b929e30dd0c4e8bdbcc82c6ba23a-Abstract.html
  """
  return _estimate_one("sg_dr", dict(lambda_=lambda_), rewards, actions, logging_probs,
                       target_dist, reward_hat, positions=positions)


def beta_ips(rewards: ArrayLike, actions: ArrayLike, logging_probs: ArrayLike,
             target_dist: ArrayLike, *, baseline: Baseline = None,
             num_folds: int = 2, positions: ArrayLike | None = None) -> Estimate:
  """Baseline-corrected IPS [OB]: V = mean_i (r_i - beta) w_i + beta.

  Args: as `ips`, plus
    baseline: None (default) or "optimal" for the plug-in variance-optimal
      beta* = Cov(r w, w) / Var(w); "cross_fit" for beta* cross-fitted over
      `num_folds` folds; or a number for a fixed beta (0 gives IPS).
    num_folds: folds for "cross_fit".

  The plug-in beta* has an O(1/n) bias that grows with the weights' tail;
  `beta_ips_bias` estimates it (and says when to prefer the cross-fitted beta*).

  Example:
    >>> import jax.numpy as jnp
    >>> args = (jnp.array([1., 0., 1., 1.]), jnp.array([0, 1, 0, 1]),
    ...         jnp.full(4, 0.5), jnp.tile(jnp.array([0.8, 0.2]), (4, 1)))
    >>> bool(beta_ips(*args).stderr <= ips(*args).stderr)
    True
  """
  return _estimate_one("beta_ips", dict(baseline=baseline, num_folds=num_folds), rewards, actions,
                       logging_probs, target_dist, positions=positions)


def beta_ips_bias(rewards: ArrayLike, actions: ArrayLike, logging_probs: ArrayLike,
                  target_dist: ArrayLike, *, positions: ArrayLike | None = None) -> BetaIPSBias:
  """The plug-in beta*-IPS with a delete-one jackknife estimate of its O(1/n) bias.

  beta* fitted on the same rounds that it corrects makes the plug-in estimate
  biased by about -Cov(beta*, mean(w)) = -E[c^2 u] / (n Var(w)) (c = w - E w,
  u = r w - E[r w] - beta* c), which grows with the weights' tail. The jackknife

    bias = (n - 1) (mean_i V_{-i} - V)

  (V_{-i}: the plug-in estimate without round i) estimates it to O(1/n^2); it is
  computed in O(n) from prefix and suffix sums (see `beta_ips_bias_from_rounds`),
  with no loop over the rounds.

  Plug-in or cross-fitted beta*: the plug-in has the smaller variance; the
  cross-fitted one (`beta_ips(..., baseline="cross_fit")`) is unbiased but fits
  each fold's beta* on fewer rounds, which costs variance when the weights are
  heavy-tailed. Prefer the plug-in when bias^2 + its stderr^2 is below the
  cross-fitted stderr^2 (|bias| well under its stderr: moderate weights, large
  n). Prefer the cross-fitted one when |bias| is comparable to the stderr
  (heavy-tailed weights, small n) and wherever an interval or a safe deployment
  test needs an unbiased estimate; `value - bias` is a middle way, bias O(1/n^2)
  at the plug-in's variance to first order.

  The jackknife is itself an O(1/n) expansion: it needs n large next to E[w^2].
  On a logger whose largest weight is 534 (E[w^2] = 144) it matched the Monte Carlo
  bias at n = 400 (-0.027 against -0.024); with the largest weight 13,500
  (E[w^2] = 2,850) at n = 200 it found a sixth of it (-0.024 against -0.144). Where
  a few rounds carry most of the weight (a small effective sample size, see
  `weight_diagnostics`), read a small |bias| as a lower bound and compare with the
  cross-fitted estimate.

  Args:
    rewards, actions, logging_probs, target_dist, positions: as in `ips`; at
      least 2 rounds.

  Returns:
    A `BetaIPSBias(value, bias, baseline)`: the plug-in estimate (as
    `beta_ips(...).value`), the jackknife bias and the plug-in beta*.

  Example:
    >>> import jax.numpy as jnp
    >>> out = beta_ips_bias(jnp.array([1., 0., 1., 0., 1.]), jnp.array([0, 1, 0, 1, 0]),
    ...                     jnp.array([0.5, 0.5, 0.1, 0.9, 0.5]),
    ...                     jnp.tile(jnp.array([0.8, 0.2]), (5, 1)))
    >>> round(float(out.value), 4), round(float(out.bias), 4)  # value: beta_ips(...).value
    (0.8339, 0.0236)

  References:
    [OB] Gupta, Jeunen, Oosterhuis, de Rijke. Optimal Baseline Corrections for
    Off-Policy Contextual Bandits. RecSys 2024. https://arxiv.org/abs/2405.05736
    Efron, Stein. The jackknife estimate of variance. Annals of Statistics 1981.
  """
  return _estimate_one("beta_ips_bias", {}, rewards, actions, logging_probs, target_dist,
                       positions=positions)


# Several estimators from one pass over the data.

FROM_ROUNDS = {
    "ips": ips_from_rounds,
    "snips": snips_from_rounds,
    "dm": dm_from_rounds,
    "dr": dr_from_rounds,
    "sndr": sndr_from_rounds,
    "switch_dr": switch_dr_from_rounds,
    "dr_os": dr_os_from_rounds,
    "beta_ips": beta_ips_from_rounds,
    "sg_ips": sg_ips_from_rounds,
    "sg_dr": sg_dr_from_rounds,
}
MODEL_BASED = ("dm", "dr", "sndr", "switch_dr", "dr_os", "sg_dr")
REQUIRED_OPTIONS = {"switch_dr": "tau", "dr_os": "lambda_", "sg_ips": "lambda_", "sg_dr": "lambda_"}
# What the compiled kernel can compute: the estimators and the plug-in beta*'s jackknife bias.
_KERNEL_FUNCTIONS = dict(FROM_ROUNDS, beta_ips_bias=beta_ips_bias_from_rounds)


def estimate_all(
    rewards: ArrayLike, actions: ArrayLike, logging_probs: ArrayLike, target_dist: ArrayLike,
    reward_hat: ArrayLike | None = None, *, estimators: tuple[str, ...] | None = None,
    options: dict[str, dict] | None = None, positions: ArrayLike | None = None,
) -> dict[str, Estimate]:
  """Several estimators sharing one reduction of the [n, A] inputs (one pass over memory).

  Args:
    rewards, actions, logging_probs, target_dist, reward_hat, positions: as in
      `dr`; reward_hat is needed only by the model-based estimators.
    estimators: names from `FROM_ROUNDS`; default ips, snips, beta_ips, plus dm,
      dr and sndr when reward_hat is given.
    options: keyword options per estimator, e.g. {"switch_dr": {"tau": 50.0}};
      switch_dr needs tau, and dr_os, sg_ips and sg_dr need lambda_.

  Returns:
    A dict from estimator name to `Estimate`.

  Example:
    >>> import jax.numpy as jnp
    >>> out = estimate_all(jnp.array([1., 0.]), jnp.array([0, 1]), jnp.full(2, 0.5),
    ...                    jnp.full((2, 2), 0.5))
    >>> sorted(out)
    ['beta_ips', 'ips', 'snips']
  """
  if estimators is None:
    estimators = ("ips", "snips", "beta_ips") + (("dm", "dr", "sndr") if reward_hat is not None else ())
  options = options or {}
  check_requests(estimators, options)
  if reward_hat is None and set(estimators) & set(MODEL_BASED):
    raise ValueError(f"reward_hat: needed by {sorted(set(estimators) & set(MODEL_BASED))}")
  return _estimate(tuple(estimators), options, rewards, actions, logging_probs, target_dist,
                   reward_hat, positions)


def check_requests(estimators, options: dict) -> None:
  """Estimator names known, options only for requested ones, and each required option given."""
  unknown = set(estimators) - set(FROM_ROUNDS) or set(options) - set(estimators)
  if unknown:
    raise ValueError(f"estimators/options: unknown or unrequested names {sorted(unknown)}; "
                     f"choose from {sorted(FROM_ROUNDS)}")
  for name, option in REQUIRED_OPTIONS.items():
    if name in estimators and option not in options.get(name, {}):
      raise ValueError(f"options: {name} needs {option!r}, e.g. options={{'{name}': {{'{option}': ...}}}}")


# The compiled path shared by every public estimator.


def _check_options(name: str, options: dict) -> None:
  """The option checks of FROM_ROUNDS[name], on the host before the kernel (where the options
  are traced and their checks would be skipped)."""
  if "clip" in options:
    checks.check_nonnegative_option("clip", options["clip"], strictly_positive=True)
  if "tau" in options:
    checks.check_nonnegative_option("tau", options["tau"])
  if "lambda_" in options:
    checks.check_nonnegative_option("lambda_", options["lambda_"])
    if name in ("sg_ips", "sg_dr"):
      checks.check_scalar("lambda_", options["lambda_"], low=0.0, high=1.0)
  if name == "beta_ips":
    baseline = options.get("baseline")
    if isinstance(baseline, str) and baseline not in ("optimal", "cross_fit"):
      raise ValueError(
          f"baseline: must be None, 'optimal', 'cross_fit' or a number, got {baseline!r}")
    if isinstance(baseline, str) and baseline == "cross_fit":
      checks.check_positive_int("num_folds", options.get("num_folds", 2))
    elif baseline is not None and not isinstance(baseline, str):
      checks.check_scalar("baseline", baseline)


def _split_options(name: str, options: dict) -> tuple[tuple, dict]:
  """(static, dynamic): strings, None and num_folds select code and are compiled in; numbers
  and arrays (clip, tau, lambda_, a numeric baseline) are traced, so a new value reuses the
  compiled kernel."""
  static, dynamic = [], {}
  for key, value in options.items():
    if key == "num_folds":
      if options.get("baseline") == "cross_fit":
        static.append((key, value))  # num_folds sets the folds; unused otherwise
    elif value is None or isinstance(value, str):
      static.append((key, value))
    else:
      dynamic[key] = value
  return tuple(sorted(static)), dynamic


@functools.partial(jax.jit, static_argnames=("requests", "check"))
def _estimates_kernel(inputs: tuple, dynamic: dict, weights: jax.Array | None, *, requests: tuple,
                      check: tuple[bool, ...] | None) -> tuple:
  """One compiled program: the value flags of the inputs (the checks selected by `check`), every
  requested estimate, and the importance weights (None when they were given)."""
  rounds = rounds_lib.reduce_inputs(*inputs, weights=weights)
  estimates = {name: _KERNEL_FUNCTIONS[name](rounds, **dict(static), **dynamic[name])
               for name, static in requests}
  flags = None if check is None else rounds_lib.input_flags(inputs, check, rounds)
  return flags, (estimates, rounds.weights if weights is None else None)


def _estimate(estimators: tuple[str, ...], options: dict[str, dict], rewards, actions,
              logging_probs, target_dist, reward_hat=None, positions=None) -> dict[str, Estimate]:
  """Validates once (shapes while tracing, values in the kernel's single host transfer) and runs
  the compiled estimators."""
  inputs = rounds_lib.prepare_inputs(rewards, actions, logging_probs, target_dist, reward_hat,
                                     positions)
  requests, dynamic = [], {}
  for name in estimators:
    opts = options.get(name, {})
    _check_options(name, opts)
    static, dynamic[name] = _split_options(name, opts)
    requests.append((name, static))
  weights = rounds_lib.known_weights(inputs)  # a second estimator on the same log skips the gather
  estimates, new_weights = rounds_lib.run_validated(_estimates_kernel, inputs, dynamic, weights,
                                                    requests=tuple(requests))
  if weights is None:
    rounds_lib.remember_weights(inputs, new_weights)
  return estimates


def _estimate_one(name: str, options: dict, *arrays, positions=None) -> Estimate:
  return _estimate((name,), {name: options}, *arrays, positions=positions)[name]
