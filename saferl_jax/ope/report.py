"""Several estimators on one log, with intervals and diagnostics; scoring them against a truth (floor 1).

`evaluate` runs a chosen set of estimators (names of `ope.FROM_ROUNDS`) on one logged dataset and
returns a `Report`: the estimator names and, stacked in that order, each estimate, its standard
error and its normal interval, with the log's weight diagnostics. The arrays are stacked so a
report is a pytree of arrays (the names ride along as static data): `evaluate_from_rounds`
runs under `jax.jit` and batches over logs with `jax.vmap`. `score_estimators` turns estimates
over many simulated logs and the true value into bias, variance, MSE, RMSE and relative error,
each with a standard error over the logs. Rendering (markdown, plots) lives on the experiments
floor, in `saferl_jax.experiments.ope_report`.

References:
  Saito, Aihara, Matsutani, Narita. Open Bandit Dataset and Pipeline. NeurIPS 2021 Datasets and Benchmarks. https://arxiv.org/abs/2008.07146
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.ope import estimators as estimators_lib
from saferl_jax.ope import rounds as rounds_lib
from saferl_jax.ope.rounds import LoggedRounds, WeightDiagnostics
from saferl_jax.stats import Interval


class Report(NamedTuple):
  """Estimates of one target policy's value from one log, one entry per estimator.

  A pytree whose leaves are the arrays (`names` and `num_rounds` are static), so reports come
  out of `jax.jit` and stack under `jax.vmap` (every array then gains a leading log axis).

  Attributes:
    names: the estimators, in the order of the arrays.
    values: [E] estimates.
    stderrs: [E] standard errors (the delta method for snips and sndr, as `Estimate.stderr`).
    interval: `Interval` of [E] arrays: value -/+ z_{1 - delta/2} stderr, two-sided 1 - delta.
    diagnostics: the log's `WeightDiagnostics` (ESS, max and mean of the weights w_i, which
      every estimator here reweights).
    logging_value: the mean logged reward, the logging policy's on-policy value.
    delta: the intervals' miss probability.
    num_rounds: n, the rounds in the log.
  """
  names: tuple[str, ...]
  values: jax.Array
  stderrs: jax.Array
  interval: Interval
  diagnostics: WeightDiagnostics
  logging_value: jax.Array
  delta: jax.Array
  num_rounds: int


def _flatten_report(report: Report):
  return ((report.values, report.stderrs, report.interval, report.diagnostics,
           report.logging_value, report.delta), (report.names, report.num_rounds))


def _unflatten_report(static, children) -> Report:
  names, num_rounds = static
  values, stderrs, interval, diagnostics, logging_value, delta = children
  return Report(names, values, stderrs, interval, diagnostics, logging_value, delta, num_rounds)


jax.tree_util.register_pytree_node(Report, _flatten_report, _unflatten_report)


class Scores(NamedTuple):
  """Accuracy of E estimators over S simulated logs with a known true value; every field [E].

  Attributes:
    bias: mean of V_hat - V.
    bias_stderr: its standard error, std(V_hat - V) / sqrt(S).
    variance: the variance of V_hat - V over the logs (ddof 0, so mse = bias^2 + variance).
    mse: mean of (V_hat - V)^2.
    mse_stderr: std((V_hat - V)^2) / sqrt(S).
    rmse: sqrt(mse).
    rmse_stderr: mse_stderr / (2 rmse), the delta method (0 where rmse is 0).
    relative_error: mean of |V_hat - V| / |V| (OBP's "relative-ee"; inf where V = 0).
    relative_error_stderr: std(|V_hat - V| / |V|) / sqrt(S).
  """
  bias: jax.Array
  bias_stderr: jax.Array
  variance: jax.Array
  mse: jax.Array
  mse_stderr: jax.Array
  rmse: jax.Array
  rmse_stderr: jax.Array
  relative_error: jax.Array
  relative_error_stderr: jax.Array


def _default_estimators(with_model: bool) -> tuple[str, ...]:
  return ("ips", "snips", "beta_ips") + (("dm", "dr", "sndr") if with_model else ())


def _requests(estimators, options) -> tuple[tuple, list[dict]]:
  """Checks the names and options, and splits each estimator's options into static ones
  (strings, None, Python and concrete scalar numbers: compiled in, so the estimator's own checks
  run on them) and traced ones (arrays that are not concrete scalars)."""
  if isinstance(estimators, str):
    raise TypeError(f"estimators: must be a tuple of names, got the string {estimators!r}")
  estimators = tuple(estimators)
  options = dict(options or {})
  registry = estimators_lib.FROM_ROUNDS
  unknown = sorted(set(estimators) - set(registry))
  if unknown:
    raise ValueError(f"estimators: unknown names {unknown}; choose from {sorted(registry)}")
  if len(set(estimators)) != len(estimators):
    raise ValueError(f"estimators: each name at most once, got {list(estimators)}")
  if not estimators:
    raise ValueError("estimators: choose at least one")
  unrequested = sorted(set(options) - set(estimators))
  if unrequested:
    raise ValueError(f"options: given for estimators not requested: {unrequested}")
  for name, option in getattr(estimators_lib, "REQUIRED_OPTIONS", {}).items():
    if name in estimators and option not in options.get(name, {}):
      raise ValueError(
          f"options: {name} needs {option!r}, e.g. options={{'{name}': {{'{option}': ...}}}}")
  requests, dynamic = [], []
  for name in estimators:
    static, traced = [], {}
    for key, value in options.get(name, {}).items():
      if value is None or isinstance(value, (str, bool, int, float)):
        static.append((key, value))
      elif checks.is_concrete(value) and np.ndim(value) == 0:
        static.append((key, np.asarray(value).item()))
      else:
        traced[key] = value
    requests.append((name, tuple(sorted(static))))
    dynamic.append(traced)
  return tuple(requests), dynamic


@functools.partial(jax.jit, static_argnames="requests")
def _report_kernel(rounds: LoggedRounds, dynamic: list[dict], delta, *, requests: tuple):
  estimates = [estimators_lib.FROM_ROUNDS[name](rounds, **dict(static), **traced)
               for (name, static), traced in zip(requests, dynamic)]
  values = jnp.stack([e.value for e in estimates])
  stderrs = jnp.stack([e.stderr for e in estimates])
  z = jax.scipy.special.ndtri(1.0 - jnp.asarray(delta, values.dtype) / 2.0)
  half = z * stderrs
  diagnostics = rounds_lib.weight_diagnostics(rounds.weights)
  return (values, stderrs, Interval(values - half, values + half), diagnostics,
          jnp.mean(rounds.rewards), jnp.asarray(delta, values.dtype))


def evaluate_from_rounds(
    rounds: LoggedRounds, *, estimators: tuple[str, ...] = ("ips", "snips", "beta_ips"),
    options: dict[str, dict] | None = None, delta: float = 0.05,
) -> Report:
  """`evaluate` on a `LoggedRounds`; jit and vmap safe.

  The rounds do not say whether a reward model was given (without one, their qhat terms are
  0), so the reward_hat check is `evaluate`'s: here DR without a model is DR with qhat = 0.

  Args:
    rounds: the `LoggedRounds` of one log (`ope.logged_rounds`).
    estimators, options, delta: as in `evaluate`.

  Returns:
    A `Report`.

  Example:
    >>> import jax.numpy as jnp
    >>> from saferl_jax.ope import logged_rounds
    >>> rounds = logged_rounds(jnp.array([1., 0., 1., 0.]), jnp.array([0, 1, 0, 1]),
    ...                        jnp.full(4, 0.5), jnp.full((4, 2), 0.5))
    >>> evaluate_from_rounds(rounds, estimators=("ips", "snips")).values.tolist()
    [0.5, 0.5]
  """
  if not isinstance(rounds, LoggedRounds):
    raise TypeError(f"rounds: must be a LoggedRounds (see ope.logged_rounds), got "
                    f"{type(rounds).__name__}")
  checks.check_level_option("delta", delta)
  requests, dynamic = _requests(estimators, options)
  arrays = _report_kernel(rounds, dynamic, delta, requests=requests)
  return Report(tuple(name for name, _ in requests), *arrays,
                num_rounds=int(rounds.weights.shape[-1]))


def evaluate(
    rewards: ArrayLike, actions: ArrayLike, logging_probs: ArrayLike, target_dist: ArrayLike,
    reward_hat: ArrayLike | None = None, *, estimators: tuple[str, ...] | None = None,
    options: dict[str, dict] | None = None, delta: float = 0.05,
    positions: ArrayLike | None = None,
) -> Report:
  """Runs several estimators on one log: estimates, standard errors, 1 - delta intervals, weights.

  Interval: V_hat -/+ z_{1 - delta/2} stderr (normal; the delta-method stderr for the
  self-normalised snips and sndr). Diagnostics: n_eff = (sum w)^2 / sum w^2, max w, mean w.
  The log is validated and reduced once (`logged_rounds`), then every estimator and the
  diagnostics run in one compiled program.

  Args:
    rewards: [n] rewards.
    actions: [n] int logged actions in [0, A).
    logging_probs: [n] logging propensities in (0, 1].
    target_dist: [n, A] target policy per round ([n, A, L] with positions).
    reward_hat: [n, A] reward model ([n, A, L] with positions); needed by the model-based
      estimators (dm, dr, sndr, switch_dr, dr_os, sg_dr).
    estimators: names from `ope.FROM_ROUNDS`, each at most once; default ips, snips, beta_ips,
      plus dm, dr and sndr when reward_hat is given.
    options: keyword options per estimator, as in `estimate_all`, e.g.
      {"switch_dr": {"tau": 50.0}}; a value chosen by `ope.tune` fits here.
    delta: the intervals' miss probability (two-sided).
    positions: [n] slot per round, passed to `logged_rounds` when given.

  Returns:
    A `Report`.

  Raises:
    ValueError: an unknown or repeated name, a missing required option, or a model-based
      estimator without reward_hat (the message names reward_hat).

  Example:
    >>> import jax.numpy as jnp
    >>> report = evaluate(jnp.array([1., 0., 1., 1.]), jnp.array([0, 1, 0, 1]),
    ...                   jnp.full(4, 0.5), jnp.tile(jnp.array([0.8, 0.2]), (4, 1)),
    ...                   estimators=("ips", "snips"))
    >>> report.names, [round(v, 4) for v in report.values.tolist()]
    (('ips', 'snips'), [0.9, 0.9])
    >>> float(report.diagnostics.max_weight)
    1.600000023841858
  """
  if estimators is None:
    estimators = _default_estimators(reward_hat is not None)
  model_based = set(getattr(estimators_lib, "MODEL_BASED", ())) & set(estimators)
  if reward_hat is None and model_based:
    raise ValueError(f"reward_hat: needed by {sorted(model_based)}; pass a reward model "
                     "[n, A] or leave those estimators out")
  requests, _ = _requests(estimators, options)  # name errors before the data is read
  extra = {} if positions is None else {"positions": positions}
  rounds = rounds_lib.logged_rounds(rewards, actions, logging_probs, target_dist, reward_hat,
                                    **extra)
  return evaluate_from_rounds(rounds, estimators=tuple(estimators), options=options, delta=delta)


def score_estimators(estimates: ArrayLike, true_value: ArrayLike) -> Scores:
  """Bias, variance, MSE, RMSE and relative error of estimators over simulated logs, with SEs.

  With errors e_s = V_hat_s - V over S logs: bias = mean e, variance = mean (e - bias)^2,
  mse = mean e^2, rmse = sqrt(mse), relative error = mean |e| / |V|; each standard error is
  std over the logs / sqrt(S) (the delta method for rmse). Computed in the dtype of
  `estimates` (float64 under `jax.enable_x64`).

  Args:
    estimates: [S, E] estimates of E estimators on S logs ([S] for one estimator).
    true_value: the true value, a scalar or [S] (one per log).

  Returns:
    `Scores` with [E] fields ([] for [S] estimates). With S = 1 the standard errors are inf.

  Example:
    >>> import jax.numpy as jnp
    >>> scores = score_estimators(jnp.array([[0.9, 1.0], [1.1, 1.0]]), 1.0)
    >>> [round(x, 4) for x in scores.mse.tolist()], [round(x, 4) for x in scores.bias.tolist()]
    ([0.01, 0.0], [0.0, 0.0])

  References:
    Saito et al. Open Bandit Dataset and Pipeline (evaluate_performance_of_estimators).
    https://arxiv.org/abs/2008.07146
  """
  estimates = checks.as_float("estimates", estimates)
  if estimates.ndim not in (1, 2):
    raise ValueError(f"estimates: must be [S] or [S, E], got shape {estimates.shape}")
  num_logs = estimates.shape[0]
  if num_logs == 0:
    raise ValueError("estimates: needs at least one log")
  true_value = jnp.asarray(checks.as_float("true_value", true_value), estimates.dtype)
  if true_value.ndim == 1:
    checks.check_same_length(estimates=estimates, true_value=true_value)
  elif true_value.ndim != 0:
    raise ValueError(f"true_value: must be a scalar or [S], got shape {true_value.shape}")
  checks.check_finite("true_value", true_value)
  checks.check_finite("estimates", estimates)
  truth = true_value.reshape(true_value.shape + (1,) * (estimates.ndim - 1))
  return _scores(estimates, truth)


@jax.jit
def _scores(estimates: jax.Array, truth: jax.Array) -> Scores:
  num_logs = estimates.shape[0]
  errors = estimates - truth
  squared = jnp.square(errors)
  nonzero = truth != 0
  relative = jnp.where(nonzero, jnp.abs(errors) / jnp.where(nonzero, jnp.abs(truth), 1.0),
                       jnp.inf)

  def stderr(x):
    if num_logs < 2:
      return jnp.full(x.shape[1:], jnp.inf, x.dtype)
    return jnp.std(x, axis=0, ddof=1) / jnp.sqrt(num_logs)

  mse = jnp.mean(squared, axis=0)
  mse_stderr = stderr(squared)
  rmse = jnp.sqrt(mse)
  positive = rmse > 0
  rmse_stderr = jnp.where(positive, mse_stderr / (2.0 * jnp.where(positive, rmse, 1.0)), 0.0)
  return Scores(bias=jnp.mean(errors, axis=0), bias_stderr=stderr(errors),
                variance=jnp.var(errors, axis=0), mse=mse, mse_stderr=mse_stderr, rmse=rmse,
                rmse_stderr=rmse_stderr, relative_error=jnp.mean(relative, axis=0),
                relative_error_stderr=stderr(relative))
