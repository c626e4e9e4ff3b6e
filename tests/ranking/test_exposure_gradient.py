"""Gradients of objectives of exposures: against exact gradients by enumeration."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax.cltr import estimators as cltr
from saferl_jax.ranking.exposure_gradient import exposure_objective_gradient
from saferl_jax.ranking.pl_rank import exact_objective

LOGITS = jnp.array([0.5, -0.2, 0.1, 0.8, -1.0])
RANK_WEIGHTS = jnp.array([1.0, 0.6, 0.3])
REWARDS = jnp.array([0.9, -0.3, 0.4, 0.1, 0.6])


def exact_exposure(logits):
  """omega(d) by enumeration: the gradient of sum_d omega(d) rho_d with respect to rho."""
  return jax.grad(lambda rho: exact_objective(logits, rho, RANK_WEIGHTS))(jnp.zeros(5))


def check_against_exact(objective, num_keys=1000, num_samples=20, num_exposure_samples=4000):
  """Mean estimate within 4 standard errors of the exact gradient. For a nonlinear objective the
  exposure estimate adds an O(1 / num_exposure_samples) bias; at 4000 samples it is below that."""
  exact = jax.grad(lambda m: objective(exact_exposure(m)))(LOGITS)
  estimate = jax.jit(jax.vmap(lambda k: exposure_objective_gradient(
      LOGITS, objective, RANK_WEIGHTS, key=k, num_samples=num_samples,
      num_exposure_samples=num_exposure_samples)[0]))(jax.random.split(jax.random.key(0), num_keys))
  stderr = np.asarray(estimate.std(0)) / np.sqrt(num_keys)
  tolerance = 4 * stderr
  np.testing.assert_array_less(np.abs(np.asarray(estimate.mean(0)) - np.asarray(exact)), tolerance)
  return exact, tolerance


def test_exact_exposure_sums_to_the_rank_weights():
  np.testing.assert_allclose(exact_exposure(LOGITS).sum(), RANK_WEIGHTS.sum(), rtol=1e-5)


@pytest.mark.slow
def test_linear_objective_matches_the_exact_gradient():
  exact, tolerance = check_against_exact(lambda e: e @ REWARDS)
  assert np.all(np.abs(exact).max() > 2 * tolerance)  # non-trivial, so the check can fail


@pytest.mark.slow
def test_safe_objective_matches_the_exact_gradient():
  logging_exposure = exact_exposure(jnp.zeros(5))
  objective = lambda e: cltr.safe_objective(  # noqa: E731
      e @ REWARDS, cltr.exposure_divergence(e, logging_exposure), num_sessions=10, delta=0.1)
  exact, tolerance = check_against_exact(objective)
  # The penalty pulls towards the logger: the gradient differs from the plain one by more than
  # the check's tolerance, so an implementation that ignored the penalty would fail it.
  plain = jax.grad(lambda m: exact_exposure(m) @ REWARDS)(LOGITS)
  assert np.any(np.abs(np.asarray(exact - plain)) > 2 * tolerance)


@pytest.mark.slow
def test_prpo_objective_matches_the_exact_gradient():
  logging_exposure = exact_exposure(LOGITS + jnp.array([0.3, 0.0, -0.3, 0.0, 0.2]))
  objective = functools.partial(cltr.prpo_objective, logging_exposure=logging_exposure,
                                document_rewards=REWARDS, clip_low=0.9, clip_high=1.1)
  exact, tolerance = check_against_exact(objective)
  plain = jax.grad(lambda m: exact_exposure(m) @ REWARDS)(LOGITS)
  assert np.any(np.abs(np.asarray(exact - plain)) > 2 * tolerance)  # clipping bites somewhere


@pytest.mark.slow
def test_masked_documents_get_no_gradient():
  where = jnp.array([True, True, True, False, True])
  grad, exposure = exposure_objective_gradient(LOGITS, lambda e: e @ REWARDS, RANK_WEIGHTS,
                                               key=jax.random.key(1), num_samples=50, where=where)
  assert float(grad[3]) == 0.0 and float(exposure[3]) == 0.0
  assert np.all(np.isfinite(grad))


@pytest.mark.slow
def test_an_objective_coupling_two_lists_matches_the_exact_gradient():
  """[SAFE]'s penalty is a square root of the mean divergence over queries: not separable."""
  logits = jnp.stack([LOGITS, -LOGITS])
  rewards = jnp.stack([REWARDS, REWARDS[::-1]])
  logging_exposure = jnp.stack([exact_exposure(jnp.zeros(5))] * 2)

  def objective(exposure):
    value = jnp.sum(exposure * rewards)
    divergence = jnp.mean(jax.vmap(cltr.exposure_divergence)(exposure, logging_exposure))
    return cltr.safe_objective(value, divergence, num_sessions=10, delta=0.1)

  exact = jax.grad(lambda m: objective(jax.vmap(exact_exposure)(m)))(logits)
  num_keys = 1000
  estimate = jax.jit(jax.vmap(lambda k: exposure_objective_gradient(
      logits, objective, RANK_WEIGHTS, key=k, num_samples=20, num_exposure_samples=4000)[0]))(
          jax.random.split(jax.random.key(1), num_keys))
  tolerance = 4 * np.asarray(estimate.std(0)) / np.sqrt(num_keys)
  np.testing.assert_array_less(np.abs(np.asarray(estimate.mean(0)) - np.asarray(exact)), tolerance)
  assert np.abs(exact).max() > 2 * tolerance.max()
