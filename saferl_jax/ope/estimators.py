"""Off-policy value estimators for contextual bandits (floor 1).

Every estimator comes in two forms. The public form takes one logged dataset as
arrays (rewards [n], actions [n], logging_probs [n], target_dist [n, A] and, for
the model-based ones, reward_hat [n, A]); the `*_from_rounds` form takes the
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
by the next estimator. Under jit, vmap or grad (tracers) only shapes are checked
and concrete arguments keep their host checks, as before.

References:
  Dudik, Langford, Li. Doubly Robust Policy Evaluation and Learning. ICML 2011. https://arxiv.org/abs/1103.4601
  Swaminathan, Joachims. The Self-Normalized Estimator for Counterfactual Learning. NeurIPS 2015.
  Bottou et al. Counterfactual Reasoning and Learning Systems. JMLR 2013. https://arxiv.org/abs/1209.2355
  Wang, Agarwal, Dudik. Optimal and Adaptive Off-policy Evaluation in Contextual Bandits. ICML 2017. https://arxiv.org/abs/1612.01205
  Su, Dimakopoulou, Krishnamurthy, Dudik. Doubly Robust Off-policy Evaluation with Shrinkage. ICML 2020. https://arxiv.org/abs/1907.09623
  [OB] Gupta, Jeunen, Oosterhuis, de Rijke. Optimal Baseline Corrections for Off-Policy Contextual Bandits. RecSys 2024. https://arxiv.org/abs/2405.05736
"""

from __future__ import annotations

import functools
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
    per_sample: [n] per-round contributions; their mean is `value`.
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
    return _linear_estimate(_optimal_beta_ips_terms(rewards, weights, scaled))
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


def _optimal_beta_ips_terms(rewards: jax.Array, weights: jax.Array, scaled: jax.Array) -> jax.Array:
  """(r_i - beta*) w_i + beta* per round, without the cancellation of r_i - beta* at large w_i.

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
  return gap_terms + beta


# The public interface on logged arrays.


def ips(rewards: ArrayLike, actions: ArrayLike, logging_probs: ArrayLike,
        target_dist: ArrayLike, *, clip: float | None = None) -> Estimate:
  """Inverse propensity scoring: V = mean_i min(w_i, clip) r_i, w_i = pi(a_i|x_i) / p_i.

  Args:
    rewards: [n] rewards.
    actions: [n] int logged actions in [0, A).
    logging_probs: [n] logging propensities of the logged actions, in (0, 1].
    target_dist: [n, A] target policy distribution per round.
    clip: optional weight cap (OBP's lambda_); None for unbiased IPS.

  Returns:
    An `Estimate`.

  Example:
    >>> import jax.numpy as jnp
    >>> est = ips(jnp.array([1., 0., 1., 1.]), jnp.array([0, 1, 0, 1]),
    ...           jnp.full(4, 0.5), jnp.tile(jnp.array([0.8, 0.2]), (4, 1)))
    >>> round(float(est.value), 4)
    0.9
  """
  return _estimate_one("ips", dict(clip=clip), rewards, actions, logging_probs, target_dist)


def snips(rewards: ArrayLike, actions: ArrayLike, logging_probs: ArrayLike,
          target_dist: ArrayLike) -> Estimate:
  """Self-normalised IPS: V = sum_i w_i r_i / sum_i w_i. Shapes as in `ips`.

  Example:
    >>> import jax.numpy as jnp
    >>> est = snips(jnp.array([1., 0., 1., 1.]), jnp.array([0, 1, 0, 1]),
    ...             jnp.full(4, 0.5), jnp.tile(jnp.array([0.8, 0.2]), (4, 1)))
    >>> round(float(est.value), 4)
    0.9
  """
  return _estimate_one("snips", {}, rewards, actions, logging_probs, target_dist)


def dm(target_dist: ArrayLike, reward_hat: ArrayLike) -> Estimate:
  """Direct method: V = mean_i sum_a pi(a|x_i) qhat(x_i, a).

  Args:
    target_dist: [n, A] target policy distribution per round.
    reward_hat: [n, A] reward model predictions.

  Example:
    >>> import jax.numpy as jnp
    >>> round(float(dm(jnp.array([[0.5, 0.5]]), jnp.array([[1., 0.]])).value), 4)
    0.5
  """
  target_dist = jnp.asarray(target_dist)
  n = target_dist.shape[0] if target_dist.ndim else 0
  placeholders = jnp.zeros((n,)), jnp.zeros((n,), int), jnp.ones((n,))
  return _estimate_one("dm", {}, *placeholders, target_dist, reward_hat)


def dr(rewards: ArrayLike, actions: ArrayLike, logging_probs: ArrayLike, target_dist: ArrayLike,
       reward_hat: ArrayLike, *, clip: float | None = None) -> Estimate:
  """Doubly robust: V = mean_i dm_i + min(w_i, clip) (r_i - qhat(x_i, a_i)).

  Args: as `ips`, plus reward_hat [n, A] reward model predictions.

  Example:
    >>> import jax.numpy as jnp
    >>> est = dr(jnp.array([1., 0.]), jnp.array([0, 1]), jnp.full(2, 0.5),
    ...          jnp.full((2, 2), 0.5), jnp.full((2, 2), 0.5))
    >>> round(float(est.value), 4)
    0.5
  """
  return _estimate_one("dr", dict(clip=clip), rewards, actions, logging_probs, target_dist,
                       reward_hat)


def sndr(rewards: ArrayLike, actions: ArrayLike, logging_probs: ArrayLike, target_dist: ArrayLike,
         reward_hat: ArrayLike) -> Estimate:
  """Self-normalised DR: V = mean_i dm_i + w_i (r_i - qhat(x_i, a_i)) / mean(w). Shapes as `dr`."""
  return _estimate_one("sndr", {}, rewards, actions, logging_probs, target_dist, reward_hat)


def switch_dr(rewards: ArrayLike, actions: ArrayLike, logging_probs: ArrayLike,
              target_dist: ArrayLike, reward_hat: ArrayLike, *, tau: float) -> Estimate:
  """Switch-DR: the DR correction only where w_i <= tau, DM alone elsewhere. Shapes as `dr`."""
  return _estimate_one("switch_dr", dict(tau=tau), rewards, actions, logging_probs, target_dist,
                       reward_hat)


def dr_os(rewards: ArrayLike, actions: ArrayLike, logging_probs: ArrayLike,
          target_dist: ArrayLike, reward_hat: ArrayLike, *, lambda_: float) -> Estimate:
  """DR with optimistic shrinkage: w_i replaced by lambda_ w_i / (w_i^2 + lambda_). Shapes as `dr`."""
  return _estimate_one("dr_os", dict(lambda_=lambda_), rewards, actions, logging_probs,
                       target_dist, reward_hat)


def beta_ips(rewards: ArrayLike, actions: ArrayLike, logging_probs: ArrayLike,
             target_dist: ArrayLike, *, baseline: Baseline = None,
             num_folds: int = 2) -> Estimate:
  """Baseline-corrected IPS [OB]: V = mean_i (r_i - beta) w_i + beta.

  Args: as `ips`, plus
    baseline: None (default) or "optimal" for the plug-in variance-optimal
      beta* = Cov(r w, w) / Var(w); "cross_fit" for beta* cross-fitted over
      `num_folds` folds; or a number for a fixed beta (0 gives IPS).
    num_folds: folds for "cross_fit".

  Example:
    >>> import jax.numpy as jnp
    >>> args = (jnp.array([1., 0., 1., 1.]), jnp.array([0, 1, 0, 1]),
    ...         jnp.full(4, 0.5), jnp.tile(jnp.array([0.8, 0.2]), (4, 1)))
    >>> bool(beta_ips(*args).stderr <= ips(*args).stderr)
    True
  """
  return _estimate_one("beta_ips", dict(baseline=baseline, num_folds=num_folds), rewards, actions,
                       logging_probs, target_dist)


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
}
MODEL_BASED = ("dm", "dr", "sndr", "switch_dr", "dr_os")
REQUIRED_OPTIONS = {"switch_dr": "tau", "dr_os": "lambda_"}


def estimate_all(
    rewards: ArrayLike, actions: ArrayLike, logging_probs: ArrayLike, target_dist: ArrayLike,
    reward_hat: ArrayLike | None = None, *, estimators: tuple[str, ...] | None = None,
    options: dict[str, dict] | None = None,
) -> dict[str, Estimate]:
  """Several estimators sharing one reduction of the [n, A] inputs (one pass over memory).

  Args:
    rewards, actions, logging_probs, target_dist, reward_hat: as in `dr`;
      reward_hat is needed only by the model-based estimators.
    estimators: names from `FROM_ROUNDS`; default ips, snips, beta_ips, plus dm,
      dr and sndr when reward_hat is given.
    options: keyword options per estimator, e.g. {"switch_dr": {"tau": 50.0}}.

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
  unknown = set(estimators) - set(FROM_ROUNDS) or set(options) - set(estimators)
  if unknown:
    raise ValueError(f"estimators/options: unknown or unrequested names {sorted(unknown)}; "
                     f"choose from {sorted(FROM_ROUNDS)}")
  for name, option in REQUIRED_OPTIONS.items():
    if name in estimators and option not in options.get(name, {}):
      raise ValueError(f"options: {name} needs {option!r}, e.g. options={{'{name}': {{'{option}': ...}}}}")
  if reward_hat is None and set(estimators) & set(MODEL_BASED):
    raise ValueError(f"reward_hat: needed by {sorted(set(estimators) & set(MODEL_BASED))}")
  return _estimate(tuple(estimators), options, rewards, actions, logging_probs, target_dist,
                   reward_hat)


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
def _estimates_kernel(inputs: tuple, dynamic: dict, *, requests: tuple,
                      check: tuple[bool, ...] | None) -> tuple[jax.Array | None, dict[str, Estimate]]:
  """One compiled program: the value flags of the inputs (the checks selected by `check`) and
  every requested estimate."""
  rounds = rounds_lib.reduce_inputs(*inputs)
  estimates = {name: FROM_ROUNDS[name](rounds, **dict(static), **dynamic[name])
               for name, static in requests}
  return (None if check is None else rounds_lib.input_flags(inputs, check, rounds)), estimates


def _estimate(estimators: tuple[str, ...], options: dict[str, dict], rewards, actions,
              logging_probs, target_dist, reward_hat=None) -> dict[str, Estimate]:
  """Validates once (shapes while tracing, values in the kernel's single host transfer) and runs
  the compiled estimators."""
  inputs = rounds_lib.prepare_inputs(rewards, actions, logging_probs, target_dist, reward_hat)
  requests, dynamic = [], {}
  for name in estimators:
    opts = options.get(name, {})
    _check_options(name, opts)
    static, dynamic[name] = _split_options(name, opts)
    requests.append((name, static))
  return rounds_lib.run_validated(_estimates_kernel, inputs, dynamic, requests=tuple(requests))


def _estimate_one(name: str, options: dict, *arrays) -> Estimate:
  return _estimate((name,), {name: options}, *arrays)[name]
