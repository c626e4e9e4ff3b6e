"""Confidence intervals, lower bounds and the safe-improvement test (floor 1).

These act on per-sample contributions X_i whose mean is an estimate (an
`Estimate.per_sample`), so every domain (bandits, ranking, diffusion) shares
them. Hoeffding and empirical Bernstein need X in [0, max_value]; importance
weighted contributions are unbounded, so high-confidence OPE truncates them at
max_value first (`truncate=True`), which can only lower the mean and so keeps a
lower bound valid. One sample per call; vmap to batch.

References:
  Thomas, Theocharous, Ghavamzadeh. High Confidence Off-Policy Evaluation. AAAI 2015.
  Maurer, Pontil. Empirical Bernstein Bounds and Sample Variance Penalization. COLT 2009. https://arxiv.org/abs/0907.3740
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from tensorflow_probability.substrates import jax as tfp

from saferl_jax import checks

Method = Literal["normal", "t", "hoeffding", "bernstein"]
METHODS = ("normal", "t", "hoeffding", "bernstein")


class Interval(NamedTuple):
  """A two-sided confidence interval [lower, upper] around a mean."""
  lower: jax.Array
  upper: jax.Array


class ImprovementTest(NamedTuple):
  """Outcome of a safe policy improvement test: deploy only if lower_bound > baseline_value."""
  deploy: jax.Array
  lower_bound: jax.Array
  baseline_value: jax.Array


def _prepare(samples: ArrayLike, method: str, max_value, truncate: bool) -> jax.Array:
  samples = checks.as_float("samples", samples)
  checks.check_ndim("samples", samples, 1)
  checks.check_choice("method", method, METHODS)
  if samples.shape[0] < 2:
    raise ValueError(f"samples: a confidence bound needs at least 2 samples, got {samples.shape[0]}")
  checks.check_finite("samples", samples)
  if method in ("hoeffding", "bernstein"):
    if max_value is None:
      raise ValueError(f"max_value: the {method} bound needs samples in [0, max_value]; pass max_value")
    checks.check_nonnegative_option("max_value", max_value, strictly_positive=True)
    if truncate:
      samples = jnp.clip(samples, 0.0, max_value)
    elif checks.is_concrete(samples, max_value):
      values = np.asarray(samples)
      if values.min() < 0 or values.max() > float(max_value):
        raise ValueError(
            f"samples: must lie in [0, max_value={max_value}] for the {method} bound, found "
            f"[{values.min():.6g}, {values.max():.6g}]; pass truncate=True to truncate them")
  return samples


@functools.lru_cache(maxsize=256)
def _host_quantile(distribution: str, df: float, q: float) -> float:
  from tensorflow_probability.substrates import numpy as tfp_numpy
  with np.errstate(all="ignore"):  # tfp's numpy quantile evaluates unused branches of a where
    return _host_quantile_value(tfp_numpy, distribution, df, q)


def _host_quantile_value(tfp_numpy, distribution: str, df: float, q: float) -> float:
  dist = (tfp_numpy.distributions.Normal(0.0, 1.0) if distribution == "normal"
          else tfp_numpy.distributions.StudentT(df, 0.0, 1.0))
  return float(dist.quantile(q))


def _quantile(distribution: str, df, q) -> jax.Array:
  """A standard normal or Student-t quantile; on the host when q and df are concrete (fast eagerly)."""
  if checks.is_concrete(q, df):
    return jnp.asarray(_host_quantile(distribution, float(df), float(q)))
  dist = (tfp.distributions.Normal(0.0, 1.0) if distribution == "normal"
          else tfp.distributions.StudentT(jnp.asarray(df, jnp.result_type(float)), 0.0, 1.0))
  return dist.quantile(q)


def _half_width(samples: jax.Array, delta, method: str, max_value) -> jax.Array:
  """Width of a one-sided bound at level 1 - delta."""
  # std on samples / max|X|: the squares of importance-weighted contributions near 1e20 (a
  # propensity of 1e-20) overflow float32, their std does not.
  scale = jax.lax.stop_gradient(jnp.max(jnp.abs(samples)))
  scale = jnp.where(scale > 0, scale, 1.0)
  std = scale * jnp.std(samples / scale, ddof=1)
  return half_width(std, samples.shape[0], delta, method, max_value)


def half_width(std, num_samples, delta, method: str, max_value=None) -> jax.Array:
  """Width of a one-sided 1 - delta bound from the samples' std (ddof=1) and count alone.

  normal / t: z (or t_{n-1}) s / sqrt(n); hoeffding: b sqrt(ln(1/delta) / (2n));
  bernstein: sqrt(2 ln(2/delta) s^2 / n) + 7 b ln(2/delta) / (3 (n - 1)). The bounds of
  `lower_bound` use it, and so do the streaming estimators, which keep only these moments.

  Args:
    std: the samples' standard deviation (ddof=1), scalar.
    num_samples: n, an int or int scalar array (traced under jit).
    delta: the one-sided miss probability.
    method: "normal", "t", "hoeffding" or "bernstein".
    max_value: b, for hoeffding and bernstein.

  Example:
    >>> round(float(half_width(1.0, 100, 0.05, "normal")), 4)  # 1.645 / 10
    0.1645
  """
  std = jnp.asarray(std, jnp.result_type(float))
  n = jnp.asarray(num_samples, std.dtype) if not isinstance(num_samples, int) else num_samples
  if method in ("normal", "t"):
    quantile = _quantile(method, n - 1, 1.0 - delta)
    return quantile.astype(std.dtype) * std / jnp.sqrt(n)
  log_term = jnp.log(1.0 / delta) if method == "hoeffding" else jnp.log(2.0 / delta)
  if method == "hoeffding":
    return max_value * jnp.sqrt(log_term / (2.0 * n))
  return jnp.sqrt(2.0 * log_term / n) * std + 7.0 * max_value * log_term / (3.0 * (n - 1))


def lower_bound(
    samples: ArrayLike, *, delta: float = 0.05, method: Method = "t",
    max_value: float | None = None, truncate: bool = False,
) -> jax.Array:
  """A 1 - delta lower confidence bound on E[X] from samples X_1..X_n.

  normal / t: mean - z (or t_{n-1}) * s / sqrt(n), asymptotic.
  hoeffding: mean - b sqrt(ln(1/delta) / (2n)), for X in [0, b].
  bernstein: mean - sqrt(2 ln(2/delta) s^2 / n) - 7 b ln(2/delta) / (3 (n - 1)).

  Args:
    samples: [n] per-sample contributions.
    delta: allowed failure probability.
    method: "normal", "t", "hoeffding" or "bernstein".
    max_value: b, the upper end of the samples' range; needed by hoeffding and
      bernstein.
    truncate: truncate samples to [0, max_value] first (high-confidence OPE).

  Returns:
    The scalar lower bound.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([0., 1., 0., 1.])
    >>> round(float(lower_bound(x, method="hoeffding", max_value=1.0)), 4)
    -0.1119
  """
  checks.check_level_option("delta", delta)
  samples = _prepare(samples, method, max_value, truncate)
  return jnp.mean(samples) - _half_width(samples, delta, method, max_value)


def upper_bound(
    samples: ArrayLike, *, delta: float = 0.05, method: Method = "t",
    max_value: float | None = None, truncate: bool = False,
) -> jax.Array:
  """A 1 - delta upper confidence bound on E[X]: mean + the same width as `lower_bound`."""
  checks.check_level_option("delta", delta)
  samples = _prepare(samples, method, max_value, truncate)
  return jnp.mean(samples) + _half_width(samples, delta, method, max_value)


def confidence_interval(
    samples: ArrayLike, *, delta: float = 0.05, method: Method = "t",
    max_value: float | None = None, truncate: bool = False,
) -> Interval:
  """A two-sided 1 - delta interval on E[X]: the one-sided bound at delta / 2 on each side.

  Args: as `lower_bound`, with delta the total miss probability (both sides together).

  Example:
    >>> import jax.numpy as jnp
    >>> ci = confidence_interval(jnp.array([0., 1., 0., 1.]), method="normal")
    >>> round(float(ci.lower), 3), round(float(ci.upper), 3)
    (-0.066, 1.066)
  """
  checks.check_level_option("delta", delta)
  samples = _prepare(samples, method, max_value, truncate)
  mean = jnp.mean(samples)
  half = _half_width(samples, delta / 2, method, max_value)
  return Interval(mean - half, mean + half)


def safe_improvement_test(
    samples: ArrayLike, baseline_value: ArrayLike, *, delta: float = 0.05,
    method: Method = "t", max_value: float | None = None, truncate: bool = False,
) -> ImprovementTest:
  """Deploy a new policy only if its 1 - delta lower bound beats the baseline's value.

  Args:
    samples: [n] per-sample contributions of the new policy's estimate.
    baseline_value: the value to beat, e.g. the logging policy's on-policy mean reward.
    delta, method, max_value, truncate: as in `lower_bound`.

  Returns:
    An `ImprovementTest` (deploy is a bool array, usable under jit).
  """
  checks.check_scalar("baseline_value", baseline_value)
  bound = lower_bound(samples, delta=delta, method=method, max_value=max_value, truncate=truncate)
  baseline_value = jnp.asarray(baseline_value, bound.dtype)
  return ImprovementTest(bound > baseline_value, bound, baseline_value)
