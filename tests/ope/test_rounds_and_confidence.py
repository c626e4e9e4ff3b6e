"""Tests for saferl_jax.ope.rounds and saferl_jax.ope.confidence."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax.ope import (LoggedRounds, estimator_bootstrap_interval, importance_weights,
                            improves_on_logging, ips, ips_from_rounds, logged_rounds,
                            snips_from_rounds, weight_diagnostics)
from saferl_jax.stats import percentile_interval, resample_indices

R = np.array([1.0, 0.0, 0.5, 1.0])
A = np.array([0, 2, 1, 1])
P = np.array([0.5, 0.25, 0.5, 0.2])
T = np.array([[0.5, 0.25, 0.25],
              [0.2, 0.3, 0.5],
              [0.1, 0.6, 0.3],
              [0.25, 0.5, 0.25]])
Q = np.array([[0.8, 0.1, 0.3],
              [0.2, 0.4, 0.6],
              [0.5, 0.5, 0.1],
              [0.3, 0.9, 0.0]])


def test_logged_rounds_fields():
  rounds = logged_rounds(R, A, P, T, Q)
  assert isinstance(rounds, LoggedRounds)
  np.testing.assert_allclose(rounds.rewards, R)
  np.testing.assert_allclose(rounds.weights, [1.0, 2.0, 1.2, 2.5], rtol=1e-6)
  np.testing.assert_allclose(rounds.reward_hat_logged, [0.8, 0.6, 0.5, 0.9], rtol=1e-6)
  np.testing.assert_allclose(rounds.dm, [0.5, 0.46, 0.38, 0.525], rtol=1e-6)
  for x in rounds:
    assert x.shape == (4,) and x.dtype == jnp.float32


def test_logged_rounds_with_positions_by_hand():
  # Slot 1 holds the target of T reversed over actions, and a reward model shifted by 1.
  slots, models = np.stack([T, T[:, ::-1]], -1), np.stack([Q, Q + 1.0], -1)
  positions = np.array([0, 1, 1, 0])
  rounds = logged_rounds(R, A, P, slots, models, positions=positions)
  # Round 1 (action 2, slot 1): T[1, 0] / P[1] = 0.2 / 0.25; round 2 (action 1): T[2, 1] / P[2].
  np.testing.assert_allclose(rounds.weights, [1.0, 0.8, 1.2, 2.5], rtol=1e-6)
  np.testing.assert_allclose(rounds.reward_hat_logged, [0.8, 1.6, 1.5, 0.9], rtol=1e-6)
  # dm of round 1 at slot 1: (0.5, 0.3, 0.2) . (1.2, 1.4, 1.6) = 1.34.
  np.testing.assert_allclose(rounds.dm[1], 1.34, rtol=1e-6)


def test_logged_rounds_without_reward_model_has_zero_model_terms():
  rounds = logged_rounds(R, A, P, T)
  assert float(jnp.abs(rounds.reward_hat_logged).max()) == 0.0
  assert float(jnp.abs(rounds.dm).max()) == 0.0


def test_logged_rounds_jit_and_vmap():
  jitted = jax.jit(logged_rounds)(R, A, P, T, Q)
  for x, y in zip(jitted, logged_rounds(R, A, P, T, Q)):
    np.testing.assert_allclose(x, y, rtol=1e-6)
  batched = jax.vmap(logged_rounds)(*(np.stack([x, x[::-1]]) for x in (R, A, P, T, Q)))
  reversed_rounds = logged_rounds(R[::-1], A[::-1], P[::-1], T[::-1], Q[::-1])
  for x, y in zip(batched, reversed_rounds):
    np.testing.assert_allclose(x[1], y, rtol=1e-6)


def test_importance_weights():
  np.testing.assert_allclose(importance_weights(A, P, T), [1.0, 2.0, 1.2, 2.5], rtol=1e-6)
  with pytest.raises(ValueError, match="logging_probs"):
    importance_weights(A, np.zeros(4), T)
  with pytest.raises(ValueError, match="actions"):
    importance_weights(A + 1, P, T)


def test_importance_weights_have_unit_mean_under_the_logging_policy():
  # E_pi0[w] = sum_a pi0(a) pi(a) / pi0(a) = 1, enumerated over every action.
  pi0 = np.array([0.1, 0.2, 0.3, 0.4])
  pi = np.array([0.4, 0.3, 0.2, 0.1])
  w = importance_weights(np.arange(4), pi0, np.tile(pi, (4, 1)))
  np.testing.assert_allclose(jnp.sum(pi0 * w), 1.0, rtol=1e-6)


@pytest.mark.parametrize("n", [1, 5, 100])
def test_equal_weights_have_full_effective_sample_size(n):
  diag = weight_diagnostics(jnp.full(n, 0.7))
  np.testing.assert_allclose(diag.effective_sample_size, n, rtol=1e-5)
  np.testing.assert_allclose(diag.max_weight, 0.7)
  np.testing.assert_allclose(diag.mean_weight, 0.7, rtol=1e-6)


def test_weight_diagnostics_closed_form():
  diag = weight_diagnostics(jnp.array([1.0, 2.0, 3.0, 0.0]))
  np.testing.assert_allclose(diag.effective_sample_size, 36.0 / 14.0, rtol=1e-6)
  assert float(diag.max_weight) == 3.0
  assert float(diag.mean_weight) == 1.5


@pytest.mark.slow
def test_weight_diagnostics_zero_weights_and_grad():
  diag = weight_diagnostics(jnp.zeros(4))
  assert float(diag.effective_sample_size) == 0.0
  grad = jax.grad(lambda w: weight_diagnostics(w).effective_sample_size)(jnp.zeros(4))
  assert np.all(np.isfinite(grad))


@pytest.mark.slow
def test_weight_diagnostics_jit_and_vmap():
  w = jnp.asarray(np.random.default_rng(0).lognormal(size=(3, 10)), jnp.float32)
  batched = jax.vmap(weight_diagnostics)(w)
  for b in range(3):
    single = jax.jit(weight_diagnostics)(w[b])
    for x, y in zip(batched, single):
      np.testing.assert_allclose(x[b], y, rtol=1e-5)


def test_weight_diagnostics_bad_shape():
  with pytest.raises(ValueError, match="weights"):
    weight_diagnostics(jnp.ones((2, 2)))


def test_weight_diagnostics_rejects_nan():
  with pytest.raises(ValueError, match="weights"):
    weight_diagnostics(jnp.array([1.0, np.nan, 2.0]))


# A simulated dataset for the intervals: 3 contexts, 3 actions, Bernoulli rewards.

Q_TRUE = np.array([[0.2, 0.5, 0.8], [0.6, 0.3, 0.4], [0.1, 0.9, 0.5]])
PI_0 = np.array([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3], [0.4, 0.2, 0.4]])


@functools.partial(jax.jit, static_argnums=2)
def simulate(key, target, n):
  kx, ka, kr = jax.random.split(key, 3)
  x = jax.random.randint(kx, (n,), 0, 3)
  a = jax.random.categorical(ka, jnp.log(jnp.asarray(PI_0, jnp.float32))[x])
  r = jax.random.bernoulli(kr, jnp.asarray(Q_TRUE, jnp.float32)[x, a]).astype(jnp.float32)
  return r, a, jnp.asarray(PI_0, jnp.float32)[x, a], jnp.asarray(target, jnp.float32)[x]


GOOD = np.array([[0.05, 0.05, 0.9], [0.9, 0.05, 0.05], [0.05, 0.9, 0.05]])  # near-best actions
BAD = np.array([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.9, 0.05, 0.05]])  # near-worst actions


def value(policy):
  return float(np.mean(np.sum(policy * Q_TRUE, axis=1)))


@pytest.mark.slow
def test_bootstrap_interval_covers_the_true_value():
  rounds = logged_rounds(*simulate(jax.random.key(1), GOOD, 400))
  for estimator in (ips_from_rounds, snips_from_rounds):
    ci = estimator_bootstrap_interval(estimator, rounds, key=jax.random.key(2),
                                      num_resamples=400)
    assert float(ci.lower) < value(GOOD) < float(ci.upper)
    # Nearly 2 * 1.96 standard errors wide.
    width = float(ci.upper - ci.lower)
    stderr = float(estimator(rounds).stderr)
    assert 3.0 * stderr < width < 5.0 * stderr


@pytest.mark.slow
def test_bootstrap_interval_is_the_percentile_of_refitted_estimates():
  rounds = logged_rounds(*simulate(jax.random.key(3), GOOD, 50))
  key = jax.random.key(4)
  ci = estimator_bootstrap_interval(ips_from_rounds, rounds, key=key, num_resamples=64, delta=0.1,
                                    clip=3.0)
  indices = np.asarray(resample_indices(key, num_resamples=64, num_rows=50))
  w, r = np.asarray(rounds.weights), np.asarray(rounds.rewards)
  replicates = np.mean(np.minimum(w[indices], 3.0) * r[indices], axis=1)
  np.testing.assert_allclose(ci, np.quantile(replicates, [0.05, 0.95]), rtol=1e-5)
  expected = percentile_interval(jnp.asarray(replicates), delta=0.1)
  np.testing.assert_allclose(ci, expected, rtol=1e-5)


@pytest.mark.slow
def test_bootstrap_interval_reproducible_and_key_dependent():
  rounds = logged_rounds(*simulate(jax.random.key(5), GOOD, 100))
  f = lambda key: estimator_bootstrap_interval(snips_from_rounds, rounds, key=key,
                                               num_resamples=200)
  first = f(jax.random.key(6))
  np.testing.assert_array_equal(first, f(jax.random.key(6)))
  assert not np.allclose(first, f(jax.random.key(7)))


# The deployment logic does not depend on the bound; the normal one is cheap (the t
# quantile from tensorflow_probability costs about a second per eager call).
improves_on_logging_normal = functools.partial(improves_on_logging, method="normal")


@pytest.mark.slow
def test_improves_on_logging_deploys_a_clearly_better_target():
  r, a, p, t = simulate(jax.random.key(8), GOOD, 1000)
  logged_rewards = simulate(jax.random.key(9), PI_0, 1000)[0]  # on-policy logs
  assert value(GOOD) > value(PI_0) + 0.2
  test = improves_on_logging_normal(ips(r, a, p, t), logged_rewards)
  assert bool(test.deploy)
  # delta = 0.05 is split: a 97.5% lower bound on the target, a 97.5% upper bound on the logger.
  z_quantile = 1.959963984540054  # standard normal, 0.975
  logged = np.asarray(logged_rewards, np.float64)
  np.testing.assert_allclose(test.baseline_value,
                             logged.mean() + z_quantile * logged.std(ddof=1) / np.sqrt(1000), rtol=1e-5)
  x = np.asarray(ips(r, a, p, t).per_sample, np.float64)
  np.testing.assert_allclose(test.lower_bound,
                             x.mean() - z_quantile * x.std(ddof=1) / np.sqrt(1000), rtol=1e-5)


@pytest.mark.slow
def test_improves_on_logging_refuses_a_worse_target():
  logged_rewards = simulate(jax.random.key(9), PI_0, 1000)[0]
  assert value(BAD) < value(PI_0) - 0.1
  r, a, p, t = simulate(jax.random.key(10), BAD, 1000)
  assert not bool(improves_on_logging_normal(ips(r, a, p, t), logged_rewards).deploy)


@pytest.mark.slow
def test_improves_on_logging_refuses_the_logging_policy_itself():
  # Evaluated on its own logs, the logging policy's IPS contributions are its
  # rewards: the lower bound sits below their mean, so it never deploys.
  r, a, p, t = simulate(jax.random.key(11), PI_0, 1000)  # target = logging policy, w = 1
  est = ips(r, a, p, t)
  np.testing.assert_allclose(est.per_sample, r)
  test = improves_on_logging_normal(est, r)
  assert not bool(test.deploy)
  assert float(test.lower_bound) < float(test.baseline_value)


@pytest.mark.slow
def test_improves_on_logging_false_deploy_rate_is_at_most_delta():
  # A target equal to the logger, evaluated on separate logs of the same size: it is not
  # better, so deploying is an error. Its rate over 2000 trials must stay below delta = 0.05
  # (comparing with the logged mean as if exact gives about 0.12).
  def trial(key):
    eval_key, log_key = jax.random.split(key)
    r, a, p, t = simulate(eval_key, PI_0, 500)
    logged = simulate(log_key, PI_0, 500)[0]
    return improves_on_logging(ips(r, a, p, t), logged, method="normal").deploy
  deploys = jax.jit(jax.vmap(trial))(jax.random.split(jax.random.key(12), 2000))
  rate = float(jnp.mean(deploys))
  assert rate <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / 2000), rate


@pytest.mark.slow
def test_improves_on_logging_high_confidence_truncated():
  r, a, p, t = simulate(jax.random.key(8), GOOD, 1000)
  logged_rewards = simulate(jax.random.key(9), PI_0, 1000)[0]
  est = ips(r, a, p, t)
  test = improves_on_logging(est, logged_rewards, method="hoeffding", max_value=5.0,
                             truncate=True)
  truncated = np.clip(np.asarray(est.per_sample), 0.0, 5.0)
  np.testing.assert_allclose(test.lower_bound,
                             truncated.mean() - 5.0 * np.sqrt(np.log(40.0) / 2000), rtol=1e-5)
  with pytest.raises(ValueError, match="samples"):
    improves_on_logging(est, logged_rewards, method="hoeffding", max_value=1.0)
  with pytest.raises(ValueError, match="logged_rewards"):
    improves_on_logging(est, jnp.array([1.0, jnp.nan]))
