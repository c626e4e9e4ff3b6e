"""Intervals and deployment decisions for bandit estimates (floor 1).

Thin bridges from an `Estimate` or `LoggedRounds` to the shared bounds in
`saferl_jax.stats`: the bootstrap recomputes the chosen estimator on each
resample of the rounds, and the improvement test compares a lower bound on the
target policy's value with an upper bound on the logging policy's.
"""

from __future__ import annotations

from typing import Callable

import jax
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.ope.estimators import Estimate
from saferl_jax.ope.rounds import LoggedRounds
from saferl_jax.stats.bootstrap import _check_options, _rows
from saferl_jax.stats import (ImprovementTest, Interval, bootstrap_interval, safe_improvement_test,
                              upper_bound)


def estimator_bootstrap_interval(
    estimator_from_rounds: Callable[..., Estimate], rounds: LoggedRounds, *, key: jax.Array,
    num_resamples: int = 1000, delta: float = 0.05, batch_size: int = 10,
    generator: str = "hash", **estimator_options,
) -> Interval:
  """Percentile bootstrap interval of an estimator, refitted on every resample of the rounds.

  Args:
    estimator_from_rounds: e.g. `snips_from_rounds` or `beta_ips_from_rounds`.
    rounds: the `LoggedRounds` of the dataset.
    key: PRNG key.
    num_resamples, delta, batch_size, generator: as in `stats.bootstrap_interval`.
    **estimator_options: passed to the estimator (clip, tau, baseline, ...).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from saferl_jax.ope import logged_rounds, snips_from_rounds
    >>> rounds = logged_rounds(jnp.array([1., 0., 1., 0.]), jnp.array([0, 1, 0, 1]),
    ...                        jnp.full(4, 0.5), jnp.full((4, 2), 0.5))
    >>> ci = estimator_bootstrap_interval(snips_from_rounds, rounds, key=jax.random.key(0))
    >>> bool(ci.lower <= 0.5 <= ci.upper)
    True
  """
  checks.check_key("key", key)
  if not callable(estimator_from_rounds):
    raise TypeError(f"estimator_from_rounds: must be a callable such as snips_from_rounds, got "
                    f"{type(estimator_from_rounds).__name__}")
  if not isinstance(rounds, LoggedRounds):
    raise TypeError(f"rounds: must be a LoggedRounds (see ope.logged_rounds), got "
                    f"{type(rounds).__name__}")
  _check_options(num_resamples=num_resamples, batch_size=batch_size, generator=generator,
                 delta=delta)
  rounds, _ = _rows("rounds", rounds)
  return bootstrap_interval(
      lambda resampled: estimator_from_rounds(resampled, **estimator_options).value,
      rounds, key=key, num_resamples=num_resamples, delta=delta, batch_size=batch_size,
      generator=generator)


def improves_on_logging(
    estimate: Estimate, logged_rewards: ArrayLike, *, delta: float = 0.05, method: str = "t",
    max_value: float | None = None, truncate: bool = False,
) -> ImprovementTest:
  """Safe policy improvement: deploy if a lower bound on the target's value beats an upper
  bound on the logging policy's.

  The logging policy's value, the mean of its logged rewards, is an estimate too: comparing
  with it as if it were exact deploys an equally good policy about 12% of the time at
  delta = 0.05. Here delta is split between the two bounds (delta / 2 each), so the test
  deploys a policy no better than the logger with probability at most delta.

  Args:
    estimate: the target policy's `Estimate` on held-out logs.
    logged_rewards: [n] rewards of the logging policy.
    delta: the allowed probability of deploying a policy that is not better.
    method, max_value, truncate: as in `stats.lower_bound` (max_value also bounds the rewards
      for hoeffding and bernstein).

  Returns:
    An `ImprovementTest`; its baseline_value is the logging policy's upper bound.
  """
  _check_options(num_resamples=1, delta=delta)
  logged_rewards = checks.as_float("logged_rewards", logged_rewards)
  checks.check_finite("logged_rewards", logged_rewards)
  logging_upper = upper_bound(logged_rewards, delta=delta / 2, method=method, max_value=max_value,
                              truncate=truncate)
  return safe_improvement_test(estimate.per_sample, logging_upper, delta=delta / 2,
                               method=method, max_value=max_value, truncate=truncate)
