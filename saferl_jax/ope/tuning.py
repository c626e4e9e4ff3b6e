"""Data-driven choice of an estimator's hyperparameter from a grid (floor 1).

Clipped IPS and DR (`clip`), Switch-DR (`tau`), DRos and the SubGaussian estimators (`lambda_`)
trade bias for variance through one hyperparameter h. `tune` evaluates the estimator at every
candidate of a grid at once (`jax.vmap` over the grid: the `*_from_rounds` estimators take h as
a traced value) and picks one of them from the data, by one of two rules:

- SLOPE (Su, Srinath, Krishnamurthy 2020): order the candidates by decreasing confidence width
  c_h; accept them in that order while the new estimate V_h satisfies
  |V_h - V_j| <= c_h + (sqrt(6) - 1) c_j for every accepted j; return the last accepted.
- Estimated MSE (OBP's "mse", after Su et al. 2020's shrinkage paper): bias_h = |V_h - V_0|
  against the estimator's unbiased setting V_0 (IPS or DR), optionally raised by a
  high-probability bound on the mean of the per-round differences; MSE_h = bias_h^2 + stderr_h^2;
  return the argmin.

Both rules are loop-free, so a whole tuning (grid evaluation and selection) is one compiled
program that runs under `jax.jit` and batches over logs with `jax.vmap`. SLOPE's sequential
acceptance is vectorised: with the candidates in width order, candidate k passes when it is
compatible with every earlier candidate (a [G, G] comparison); the accepted set is the prefix
before the first candidate that fails (a cumulative product), because acceptance stops there.
Each call tunes one logged dataset.

References:
  Su, Srinath, Krishnamurthy. Adaptive Estimator Selection for Off-Policy Evaluation. ICML 2020. https://arxiv.org/abs/2002.07729
  Su, Dimakopoulou, Krishnamurthy, Dudik. Doubly Robust Off-policy Evaluation with Shrinkage. ICML 2020. https://arxiv.org/abs/1907.09623
  Saito, Aihara, Matsutani, Narita. Open Bandit Dataset and Pipeline. NeurIPS 2021 Datasets and Benchmarks. https://arxiv.org/abs/2008.07146
  Metelli, Russo, Restelli. Subgaussian and Differentiable Importance Sampling for Off-Policy Evaluation and Learning. NeurIPS 2021.
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

import functools
import math
from typing import Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.ope import estimators as estimators_lib
from saferl_jax.ope import rounds as rounds_lib
from saferl_jax.ope.estimators import Estimate
from saferl_jax.ope.rounds import LoggedRounds

SLOPE_CONSTANT = math.sqrt(6.0) - 1.0
METHODS = ("slope", "mse")
# Weight caps of the default grid: quantiles 1 - 2^-k (k = 1..10) of the positive weights, then
# infinity (no cap: the unbiased estimator).
_DEFAULT_LEVELS = tuple(1.0 - 2.0**-k for k in range(1, 11))


class Tunable(NamedTuple):
  """How one estimator's hyperparameter is tuned.

  Attributes:
    option: the estimator's keyword (clip, tau, lambda_).
    low, high: the range of valid values; `low_open` excludes low itself.
    from_cap: maps a weight cap c (a weight above c is the one that gets shrunk; c = inf
      shrinks nothing) to the option value with about that effect. It builds the default
      grid, and from_cap(inf) is the unbiased setting that the MSE rule measures bias against.
    model_based: the estimator needs reward_hat.
    low_open: whether `low` itself is excluded.
  """
  option: str
  low: float
  high: float
  from_cap: Callable[[jax.Array], jax.Array]
  model_based: bool
  low_open: bool = False


def _cap(cap: jax.Array) -> jax.Array:
  return cap


def _squared_cap(cap: jax.Array) -> jax.Array:
  # lambda_ w / (w^2 + lambda_) is about w for w << sqrt(lambda_) and shrinks the weights above.
  return jnp.square(cap)


def _inverse_cap(cap: jax.Array) -> jax.Array:
  # w / ((1 - lambda_) + lambda_ w) tends to 1 / lambda_ for large w; cap inf gives 0 (plain IPS).
  return jnp.minimum(1.0, 1.0 / cap)


TUNABLE = {
    "ips": Tunable("clip", 0.0, math.inf, _cap, model_based=False, low_open=True),
    "dr": Tunable("clip", 0.0, math.inf, _cap, model_based=True, low_open=True),
    "switch_dr": Tunable("tau", 0.0, math.inf, _cap, model_based=True),
    "dr_os": Tunable("lambda_", 0.0, math.inf, _squared_cap, model_based=True),
    "sg_ips": Tunable("lambda_", 0.0, 1.0, _inverse_cap, model_based=False),
    "sg_dr": Tunable("lambda_", 0.0, 1.0, _inverse_cap, model_based=True),
}


class Tuned(NamedTuple):
  """A hyperparameter chosen from a grid, and everything the choice was made from.

  Attributes:
    estimate: the `Estimate` at the chosen value (per_sample [n]).
    best: the chosen grid value (scalar).
    index: its position in `grid` (int scalar).
    grid: [G] the candidates.
    values: [G] the estimate at every candidate.
    stderrs: [G] their standard errors.
    scores: [G] "mse": the estimated MSE of every candidate (the argmin is chosen); "slope":
      the confidence widths c_h that order the candidates.
    accepted: [G] bool; "slope": the candidates SLOPE accepted (the chosen one is the last in
      width order); "mse": the chosen candidate alone.
  """
  estimate: Estimate
  best: jax.Array
  index: jax.Array
  grid: jax.Array
  values: jax.Array
  stderrs: jax.Array
  scores: jax.Array
  accepted: jax.Array


class SlopeSelection(NamedTuple):
  """SLOPE's choice: the index of the last accepted candidate and the accepted mask ([G] bool)."""
  index: jax.Array
  accepted: jax.Array


def slope_selection(values: ArrayLike, widths: ArrayLike) -> SlopeSelection:
  """SLOPE (Lepski's principle): the last candidate, in decreasing width, compatible with all before.

  With the candidates ordered by decreasing width c (ties keep grid order), candidate h is
  accepted while |V_h - V_j| <= c_h + (sqrt(6) - 1) c_j for every accepted j; the choice is the
  last accepted. Loop-free: a [G, G] comparison and a cumulative product (jit and vmap safe).

  Args:
    values: [G] estimates V_h, one per candidate.
    widths: [G] confidence widths c_h >= 0 (e.g. standard errors).

  Returns:
    A `SlopeSelection` (index into the candidates, and the [G] accepted mask).

  Example:
    >>> import jax.numpy as jnp
    >>> sel = slope_selection(jnp.array([1.0, 1.1, 2.0]), jnp.array([0.5, 0.2, 0.01]))
    >>> int(sel.index), sel.accepted.tolist()
    (1, [True, True, False])

  References:
    Su, Srinath, Krishnamurthy. Adaptive Estimator Selection for Off-Policy Evaluation.
    ICML 2020. https://arxiv.org/abs/2002.07729
  """
  values = checks.as_float("values", values)
  widths = checks.as_float("widths", widths)
  checks.check_ndim("values", values, 1)
  checks.check_ndim("widths", widths, 1)
  checks.check_same_length(values=values, widths=widths)
  if values.shape[0] == 0:
    raise ValueError("values: SLOPE needs at least one candidate")
  return _slope(values, widths)


@jax.jit
def _slope(values: jax.Array, widths: jax.Array) -> SlopeSelection:
  order = jnp.argsort(widths, descending=True, stable=True)
  v, c = values[order], widths[order]
  compatible = jnp.abs(v[:, None] - v[None, :]) <= c[:, None] + SLOPE_CONSTANT * c[None, :]
  size = v.shape[0]
  earlier = jnp.arange(size)[None, :] < jnp.arange(size)[:, None]  # [k, j]: j before k
  passes = jnp.all(compatible | ~earlier, axis=1)
  accepted_in_order = jnp.cumprod(passes.astype(jnp.int32)).astype(bool)
  last = jnp.sum(accepted_in_order) - 1  # candidate 0 always passes
  accepted = jnp.zeros(size, bool).at[order].set(accepted_in_order)
  return SlopeSelection(order[last], accepted)


def estimated_mse(values: ArrayLike, stderrs: ArrayLike, reference: ArrayLike, *,
                  slack: ArrayLike = 0.0) -> jax.Array:
  """Estimated MSE of each candidate: (|V_h - V_0| + slack)^2 + stderr_h^2.

  V_0 is the unbiased estimate (IPS, DR) that bias is measured against; `slack` raises every
  bias to a high-probability bound (see `tune`'s bias_bound).

  Args:
    values: [G] estimates V_h.
    stderrs: [G] their standard errors.
    reference: scalar V_0.
    slack: scalar >= 0 added to every |V_h - V_0|.

  Returns:
    [G] estimated MSEs.

  Example:
    >>> import jax.numpy as jnp
    >>> [round(x, 4) for x in estimated_mse(jnp.array([1.0, 1.5]), jnp.array([0.1, 0.4]),
    ...                                     1.0).tolist()]
    [0.01, 0.41]
  """
  values = checks.as_float("values", values)
  stderrs = checks.as_float("stderrs", stderrs)
  checks.check_ndim("values", values, 1)
  checks.check_same_length(values=values, stderrs=stderrs)
  checks.check_scalar("reference", reference)
  checks.check_scalar("slack", slack, low=0.0)
  return jnp.square(jnp.abs(values - reference) + slack) + jnp.square(stderrs)


def _bias_slack(weights: jax.Array, delta) -> jax.Array:
  """OBP's high-probability term: sqrt(2 mean(w^2) ln(2/delta) / n) + 2 max(w) ln(2/delta) / (3n).

  mean(w^2) comes from the estimators' overflow-safe norm, so weights near 1e20 do not overflow float32.
  """
  n = weights.shape[0]
  log_term = jnp.log(2.0 / delta)
  rms = estimators_lib._norm(weights) / jnp.sqrt(n)
  return rms * jnp.sqrt(2.0 * log_term / n) + 2.0 * jnp.max(weights) * log_term / (3.0 * n)


def _default_grid(weights: jax.Array, tunable: Tunable) -> jax.Array:
  positive = jnp.where(weights > 0, weights, jnp.nan)
  caps = jnp.nanquantile(positive, jnp.asarray(_DEFAULT_LEVELS, weights.dtype))
  caps = jnp.where(jnp.isnan(caps), 1.0, caps)  # no positive weight: any cap does the same
  caps = jnp.concatenate([caps, jnp.full((1,), jnp.inf, weights.dtype)])
  return tunable.from_cap(caps).astype(weights.dtype)


@functools.partial(jax.jit, static_argnames=("estimator", "method", "bias_bound"))
def _tune_kernel(rounds: LoggedRounds, grid: jax.Array | None, delta, width_scale, *,
                 estimator: str, method: str, bias_bound: bool) -> Tuned:
  tunable = TUNABLE[estimator]
  estimate_at = functools.partial(estimators_lib.FROM_ROUNDS[estimator], rounds)
  if grid is None:
    grid = _default_grid(rounds.weights, tunable)
  grid = grid.astype(rounds.weights.dtype)
  at_grid = jax.vmap(lambda h: estimate_at(**{tunable.option: h}))(grid)
  values, stderrs = at_grid.value, at_grid.stderr
  if method == "slope":
    scores = width_scale * stderrs
    index, accepted = _slope(values, scores)
  else:
    unbiased = tunable.from_cap(jnp.asarray(jnp.inf, grid.dtype))
    reference = estimate_at(**{tunable.option: unbiased}).value
    slack = _bias_slack(rounds.weights, delta) if bias_bound else 0.0
    bias = jnp.abs(values - reference) + slack
    scores = jnp.square(bias) + jnp.square(stderrs)
    index = jnp.argmin(jnp.hypot(bias, stderrs))  # the same order, without overflow
    accepted = jnp.arange(grid.shape[0]) == index
  chosen = jax.tree.map(lambda x: x[index], at_grid)
  return Tuned(chosen, grid[index], index, grid, values, stderrs, scores, accepted)


def _check_grid(grid, tunable: Tunable) -> jax.Array | None:
  if grid is None:
    return None
  grid = checks.as_float("grid", grid)
  checks.check_ndim("grid", grid, 1)
  if grid.shape[0] == 0:
    raise ValueError("grid: needs at least one candidate")
  if checks.is_concrete(grid):
    host = np.asarray(grid)
    low_ok = host > tunable.low if tunable.low_open else host >= tunable.low
    bad = np.isnan(host) | ~low_ok | (host > tunable.high)
    if bad.any():
      span = (f"{'(' if tunable.low_open else '['}{tunable.low:g}, {tunable.high:g}"
              f"{')' if math.isinf(tunable.high) else ']'}")
      raise ValueError(f"grid: every {tunable.option} must be in {span}, got {host[bad][0]}")
  return grid


def tune_from_rounds(
    rounds: LoggedRounds, *, estimator: str = "dr", grid: ArrayLike | None = None,
    method: Literal["slope", "mse"] = "slope", delta: float = 0.05, bias_bound: bool = True,
    width_scale: float = 1.0,
) -> Tuned:
  """`tune` on a `LoggedRounds` (see `ope.logged_rounds`); jit and vmap safe.

  Args: as `tune`, with rounds in place of the logged arrays.

  Returns:
    A `Tuned`.

  Example:
    >>> import jax.numpy as jnp
    >>> from saferl_jax.ope import logged_rounds
    >>> rounds = logged_rounds(jnp.array([1., 0., 1., 0.]), jnp.array([0, 1, 0, 1]),
    ...                        jnp.array([0.5, 0.5, 0.25, 0.5]), jnp.full((4, 2), 0.5))
    >>> tuned = tune_from_rounds(rounds, estimator="ips", grid=jnp.array([1.0, jnp.inf]))
    >>> tuned.values.tolist()
    [0.5, 0.75]
  """
  if not isinstance(rounds, LoggedRounds):
    raise TypeError(f"rounds: must be a LoggedRounds (see ope.logged_rounds), got "
                    f"{type(rounds).__name__}")
  if estimator not in TUNABLE:
    raise ValueError(f"estimator: must be one of {tuple(TUNABLE)} (the estimators with one "
                     f"tunable hyperparameter), got {estimator!r}")
  if estimator not in estimators_lib.FROM_ROUNDS:
    raise ValueError(f"estimator: {estimator!r} is not in ope.FROM_ROUNDS in this version")
  checks.check_choice("method", method, METHODS)
  if not isinstance(bias_bound, bool):
    raise TypeError(f"bias_bound: must be a bool, got {type(bias_bound).__name__}")
  checks.check_level_option("delta", delta)
  checks.check_real("width_scale", width_scale, low=0.0, open_low=True)
  grid = _check_grid(grid, TUNABLE[estimator])
  if rounds.weights.ndim != 1 or rounds.weights.shape[0] < 2:
    raise ValueError(f"rounds: tuning needs at least 2 rounds (a standard error), got shape "
                     f"{rounds.weights.shape}")
  return _tune_kernel(rounds, grid, delta, width_scale, estimator=estimator, method=method,
                      bias_bound=bias_bound)


def tune(
    rewards: ArrayLike, actions: ArrayLike, logging_probs: ArrayLike, target_dist: ArrayLike,
    reward_hat: ArrayLike | None = None, *, estimator: str = "dr", grid: ArrayLike | None = None,
    method: Literal["slope", "mse"] = "slope", delta: float = 0.05, bias_bound: bool = True,
    width_scale: float = 1.0, positions: ArrayLike | None = None,
) -> Tuned:
  """Chooses clip, tau or lambda_ from a grid by SLOPE or by estimated MSE, and estimates with it.

  slope: with c_h = width_scale * stderr_h, visit the candidates by decreasing c_h and accept
  each while |V_h - V_j| <= c_h + (sqrt(6) - 1) c_j for every accepted j; choose the last.
  mse: bias_h = |V_h - V_0| (+ sqrt(2 mean(w^2) ln(2/delta) / n) + 2 max(w) ln(2/delta) / (3n)
  with bias_bound), MSE_h = bias_h^2 + stderr_h^2; choose the argmin. V_0 is the estimator's
  unbiased setting: clip = tau = lambda_ = inf for ips, dr, switch_dr, dr_os, lambda_ = 0 for
  sg_ips, sg_dr. Every candidate is evaluated at once (vmap over the grid), in one compiled
  program with the selection.

  Ties: SLOPE visits candidates of equal width in grid order; the MSE rule takes the first
  minimiser. Candidates that act alike on this log (every clip above the largest weight) give the
  same estimate, so a tie changes `best` but not the estimate.

  Args:
    rewards: [n] rewards.
    actions: [n] int logged actions in [0, A).
    logging_probs: [n] logging propensities in (0, 1].
    target_dist: [n, A] target policy per round (with positions: [n, A, L]).
    reward_hat: [n, A] reward model; needed by dr, switch_dr, dr_os, sg_dr.
    estimator: one of "ips", "dr" (clip), "switch_dr" (tau), "dr_os", "sg_ips", "sg_dr"
      (lambda_); it must be in `ope.FROM_ROUNDS`.
    grid: [G] candidate values. Default: the weight caps c = the quantiles 1 - 2^-k
      (k = 1..10) of the positive weights and inf, as the option (clip = tau = c,
      dr_os lambda_ = c^2, SubGaussian lambda_ = min(1, 1/c)).
    method: "slope" or "mse".
    delta: miss probability of the bias bound (method "mse" with bias_bound).
    bias_bound: raise every bias estimate to OBP's high-probability bound (method "mse").
    width_scale: SLOPE's c_h in standard errors (1: the spec's width; OBP uses
      t_{n-1}(1 - delta), about 1.645 at delta = 0.05).
    positions: [n] slots (OBP's convention), passed to `logged_rounds` when given.

  Returns:
    A `Tuned`: the estimate at the chosen value, the value and its index, the grid, the
    estimate, standard error and score of every candidate, and SLOPE's accepted set.

  Example:
    >>> import jax.numpy as jnp
    >>> args = (jnp.array([1., 0., 1., 0.]), jnp.array([0, 1, 0, 1]),
    ...         jnp.array([0.5, 0.5, 0.25, 0.5]), jnp.full((4, 2), 0.5))
    >>> tuned = tune(*args, estimator="ips", grid=jnp.array([1.0, 2.0]), method="mse",
    ...              bias_bound=False)
    >>> float(tuned.best), round(float(tuned.estimate.value), 4)  # clipping at 1 pays
    (1.0, 0.5)
    >>> [round(x, 4) for x in tuned.scores.tolist()]  # 0.25^2 + 0.2887^2, 0 + 0.4787^2
    [0.1458, 0.2292]

  References:
    Su, Srinath, Krishnamurthy. Adaptive Estimator Selection for Off-Policy Evaluation.
    ICML 2020. https://arxiv.org/abs/2002.07729
    Su, Dimakopoulou, Krishnamurthy, Dudik. Doubly Robust Off-policy Evaluation with
    Shrinkage. ICML 2020. https://arxiv.org/abs/1907.09623
  """
  if estimator in TUNABLE and TUNABLE[estimator].model_based and reward_hat is None:
    raise ValueError(f"reward_hat: {estimator} needs a reward model; pass reward_hat [n, A]")
  extra = {} if positions is None else {"positions": positions}
  rounds = rounds_lib.logged_rounds(rewards, actions, logging_probs, target_dist, reward_hat,
                                    **extra)
  return tune_from_rounds(rounds, estimator=estimator, grid=grid, method=method, delta=delta,
                          bias_bound=bias_bound, width_scale=width_scale)
