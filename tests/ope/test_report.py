"""Tests for saferl_jax.ope.report: evaluate (one log, many estimators) and score_estimators."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax import ope
from saferl_jax.ope import logged_rounds, weight_diagnostics
from saferl_jax.ope.report import Report, evaluate, evaluate_from_rounds, score_estimators
from saferl_jax.ope.tuning import tune

R = np.array([1.0, 0.0, 0.5, 1.0, 0.0, 1.0])
A = np.array([0, 2, 1, 1, 0, 2])
P = np.array([0.5, 0.25, 0.5, 0.2, 0.4, 0.1])
T = np.array([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5], [0.1, 0.6, 0.3],
              [0.25, 0.5, 0.25], [0.7, 0.2, 0.1], [0.3, 0.3, 0.4]])
Q = np.array([[0.8, 0.1, 0.3], [0.2, 0.4, 0.6], [0.5, 0.5, 0.1],
              [0.3, 0.9, 0.0], [0.4, 0.4, 0.4], [0.6, 0.2, 0.7]])
Z95 = 1.959963984540054

INDIVIDUAL = {
    "ips": lambda: ope.ips(R, A, P, T),
    "snips": lambda: ope.snips(R, A, P, T),
    "beta_ips": lambda: ope.beta_ips(R, A, P, T),
    "dm": lambda: ope.dm(T, Q),
    "dr": lambda: ope.dr(R, A, P, T, Q, clip=2.0),
    "sndr": lambda: ope.sndr(R, A, P, T, Q),
    "switch_dr": lambda: ope.switch_dr(R, A, P, T, Q, tau=3.0),
    "dr_os": lambda: ope.dr_os(R, A, P, T, Q, lambda_=4.0),
}
OPTIONS = {"dr": {"clip": 2.0}, "switch_dr": {"tau": 3.0}, "dr_os": {"lambda_": 4.0}}


@pytest.mark.slow
def test_evaluate_matches_the_individual_estimators():
  report = evaluate(R, A, P, T, Q, estimators=tuple(INDIVIDUAL), options=OPTIONS)
  assert isinstance(report, Report) and report.names == tuple(INDIVIDUAL)
  assert report.num_rounds == 6
  for i, name in enumerate(INDIVIDUAL):
    single = INDIVIDUAL[name]()
    np.testing.assert_allclose(report.values[i], single.value, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(report.stderrs[i], single.stderr, rtol=1e-6, err_msg=name)
  half = Z95 * np.asarray(report.stderrs)
  np.testing.assert_allclose(report.interval.lower, report.values - half, atol=1e-6)
  np.testing.assert_allclose(report.interval.upper, report.values + half, atol=1e-6)
  np.testing.assert_allclose(report.logging_value, R.mean(), rtol=1e-6)
  expected = weight_diagnostics(logged_rounds(R, A, P, T).weights)
  for got, want in zip(report.diagnostics, expected):
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_self_normalised_intervals_use_the_delta_method():
  report = evaluate(R, A, P, T, estimators=("snips",), delta=0.1)
  w = T[np.arange(6), A] / P
  value = np.sum(w * R) / np.sum(w)
  stderr = np.sqrt(np.sum(w**2 * (R - value)**2)) / np.sum(w)
  np.testing.assert_allclose(report.values[0], value, rtol=1e-6)
  np.testing.assert_allclose(report.stderrs[0], stderr, rtol=1e-5)
  z90 = 1.6448536269514722
  np.testing.assert_allclose(report.interval.upper[0] - report.interval.lower[0], 2 * z90 * stderr,
                             rtol=1e-5)
  np.testing.assert_allclose(report.delta, 0.1)


@pytest.mark.slow
def test_default_estimators_follow_estimate_all():
  assert evaluate(R, A, P, T).names == ("ips", "snips", "beta_ips")
  assert evaluate(R, A, P, T, Q).names == ("ips", "snips", "beta_ips", "dm", "dr", "sndr")


def test_bad_requests_are_refused_by_name():
  with pytest.raises(ValueError, match="reward_hat"):
    evaluate(R, A, P, T, estimators=("ips", "dr"))
  with pytest.raises(ValueError, match="reward_hat"):
    evaluate(R, A, P, T, estimators=("dm",))
  with pytest.raises(ValueError, match="options.*tau"):
    evaluate(R, A, P, T, Q, estimators=("switch_dr",))
  with pytest.raises(ValueError, match="unknown"):
    evaluate(R, A, P, T, estimators=("ipps",))
  with pytest.raises(ValueError, match="at most once"):
    evaluate(R, A, P, T, estimators=("ips", "ips"))
  with pytest.raises(ValueError, match="not requested"):
    evaluate(R, A, P, T, estimators=("ips",), options={"snips": {}})
  with pytest.raises(TypeError, match="tuple"):
    evaluate(R, A, P, T, estimators="ips")
  with pytest.raises(ValueError, match="clip"):
    evaluate(R, A, P, T, estimators=("ips",), options={"ips": {"clip": -1.0}})
  with pytest.raises(ValueError, match="delta"):
    evaluate(R, A, P, T, delta=0.0)
  with pytest.raises(ValueError, match="logging_probs"):
    evaluate(R, A, np.where(P > 0.3, P, 0.0), T)


@pytest.mark.slow
def test_a_tuned_value_and_a_traced_option_give_the_same_report():
  tuned = tune(R, A, P, T, Q, estimator="dr", grid=[1.0, 2.0, np.inf])
  report = evaluate(R, A, P, T, Q, estimators=("dr",), options={"dr": {"clip": tuned.best}})
  np.testing.assert_allclose(report.values[0], tuned.estimate.value, rtol=1e-6)
  rounds = logged_rounds(R, A, P, T, Q)
  by_clip = jax.vmap(lambda c: evaluate_from_rounds(rounds, estimators=("dr",),
                                                    options={"dr": {"clip": c}}))
  batched = by_clip(jnp.array([1.0, 2.0]))
  np.testing.assert_allclose(batched.values[:, 0], tuned.values[:2], rtol=1e-6)


@pytest.mark.slow
def test_jit_equals_eager_and_vmap_over_logs_equals_a_loop():
  keys = jax.random.split(jax.random.key(0), 3)

  def log(key):
    k1, k2 = jax.random.split(key)
    actions = jax.random.randint(k1, (40,), 0, 3)
    rewards = jax.random.bernoulli(k2, 0.4, (40,)).astype(jnp.float32)
    return rewards, actions, jnp.full(40, 1 / 3), jnp.tile(jnp.array([0.6, 0.3, 0.1]), (40, 1))

  run = lambda key: evaluate(*log(key), estimators=("ips", "snips", "beta_ips"))
  batched = jax.vmap(run)(keys)
  assert batched.names == ("ips", "snips", "beta_ips") and batched.values.shape == (3, 3)
  assert batched.diagnostics.effective_sample_size.shape == (3,)
  for b in range(3):
    eager = run(keys[b])
    for got, want in zip(jax.tree.leaves(jax.tree.map(lambda x: x[b], batched)),
                         jax.tree.leaves(eager)):
      np.testing.assert_allclose(got, want, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(jax.jit(run)(keys[b])), jax.tree.leaves(eager)):
      np.testing.assert_allclose(got, want, rtol=1e-5)


def test_one_round_gives_infinite_intervals_not_nan():
  report = evaluate(R[:1], A[:1], P[:1], T[:1], estimators=("ips", "snips"))
  assert np.all(np.isinf(report.stderrs)) and not np.any(np.isnan(report.values))
  assert np.all(report.interval.lower == -np.inf) and np.all(report.interval.upper == np.inf)


def test_positions_are_passed_to_logged_rounds():
  if "positions" not in inspect.signature(logged_rounds).parameters:
    pytest.skip("logged_rounds takes no positions in this version")
  slots = np.stack([T, T[::-1]], axis=-1)  # [n, A, L = 2]
  models = np.stack([Q, Q[::-1]], axis=-1)
  positions = np.array([0, 1, 1, 0, 1, 0])
  chosen = slots[np.arange(6), :, positions]
  report = evaluate(R, A, P, slots, models, positions=positions)
  flat = evaluate(R, A, P, chosen, models[np.arange(6), :, positions])
  np.testing.assert_allclose(report.values, flat.values, rtol=1e-6)


# score_estimators.


def test_scores_against_numpy():
  rng = np.random.default_rng(0)
  estimates = rng.normal(0.5, 0.1, size=(50, 3))
  truth = 0.52
  scores = score_estimators(estimates, truth)
  errors = estimates - truth
  rel = np.abs(errors) / truth
  np.testing.assert_allclose(scores.bias, errors.mean(0), rtol=1e-5)
  np.testing.assert_allclose(scores.bias_stderr, errors.std(0, ddof=1) / np.sqrt(50), rtol=1e-5)
  np.testing.assert_allclose(scores.variance, estimates.var(0), rtol=1e-4)
  np.testing.assert_allclose(scores.mse, (errors**2).mean(0), rtol=1e-5)
  np.testing.assert_allclose(scores.mse_stderr, (errors**2).std(0, ddof=1) / np.sqrt(50), rtol=1e-5)
  np.testing.assert_allclose(scores.rmse, np.sqrt((errors**2).mean(0)), rtol=1e-5)
  np.testing.assert_allclose(scores.rmse_stderr, scores.mse_stderr / (2 * scores.rmse), rtol=1e-6)
  np.testing.assert_allclose(scores.relative_error, rel.mean(0), rtol=1e-5)
  np.testing.assert_allclose(scores.relative_error_stderr, rel.std(0, ddof=1) / np.sqrt(50),
                             rtol=1e-5)
  np.testing.assert_allclose(scores.mse, scores.bias**2 + scores.variance, rtol=1e-5)


def test_scores_in_float64_under_x64():
  rng = np.random.default_rng(1)
  estimates = rng.normal(0.5, 0.1, size=(40, 2))
  with jax.enable_x64(True):
    scores = score_estimators(estimates, 0.5)
    assert scores.mse.dtype == jnp.float64
    np.testing.assert_allclose(scores.mse, ((estimates - 0.5)**2).mean(0), rtol=1e-13)
    np.testing.assert_allclose(scores.variance, estimates.var(0), rtol=1e-12)


def test_scores_with_one_truth_per_log_and_edge_cases():
  estimates = np.array([[1.0, 2.0], [3.0, 3.0]])
  scores = score_estimators(estimates, np.array([1.0, 2.0]))  # errors [[0, 1], [1, 1]]
  np.testing.assert_allclose(scores.bias, [0.5, 1.0])
  np.testing.assert_allclose(scores.relative_error, [0.25, 0.75])
  one = score_estimators(np.array([0.4]), 0.5)  # [S] estimates, one log
  assert one.mse.shape == () and np.isinf(one.mse_stderr)
  zero_truth = score_estimators(np.array([0.1, -0.1]), 0.0)
  assert np.isinf(zero_truth.relative_error) and np.isfinite(zero_truth.mse)
  exact = score_estimators(np.array([0.5, 0.5]), 0.5)
  assert float(exact.rmse) == 0.0 and float(exact.rmse_stderr) == 0.0
  with pytest.raises(ValueError, match="true_value"):
    score_estimators(estimates, np.ones(3))
  with pytest.raises(ValueError, match="estimates"):
    score_estimators(np.ones((2, 2, 2)), 1.0)
  with pytest.raises(ValueError, match="estimates"):
    score_estimators(np.array([np.nan, 1.0]), 1.0)


@pytest.mark.slow
def test_score_estimators_of_vmapped_reports():
  # The sibling use: estimates over many simulated logs, a [S, E] array from a vmapped report.
  keys = jax.random.split(jax.random.key(1), 200)
  target = jnp.array([0.6, 0.3, 0.1])
  true_value = float(target @ jnp.array([0.2, 0.5, 0.8]))

  def report(key):
    k1, k2 = jax.random.split(key)
    actions = jax.random.randint(k1, (100,), 0, 3)
    rewards = jax.random.bernoulli(k2, jnp.array([0.2, 0.5, 0.8])[actions]).astype(jnp.float32)
    return evaluate(rewards, actions, jnp.full(100, 1 / 3), jnp.tile(target, (100, 1)),
                    estimators=("ips", "snips"))

  values = jax.vmap(report)(keys).values
  scores = score_estimators(values, true_value)
  # IPS is unbiased: its bias is within 4 standard errors of 0 (fixed keys, deterministic).
  assert abs(float(scores.bias[0])) < 4 * float(scores.bias_stderr[0])
  assert np.all(np.asarray(scores.relative_error) > 0)
