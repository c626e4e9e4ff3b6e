"""Click logs kept as counts per query, the estimates built on them, and DR's regression model."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax.cltr import estimators, reward_model
from saferl_jax.data import click_logs
from saferl_jax.cltr.clicks import click_model, trust_bias
from saferl_jax.data.ltr import make_ltr_dataset

LOGITS = jnp.array([[1.0, 0.3, -0.5, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
LABELS = jnp.array([[4, 2, 0, 1, 3], [0, 4, 1, 0, 0]])
MASK = jnp.array([[True] * 5, [True, True, True, True, False]])
MODEL = click_model(jnp.array([0.7, 0.4, 0.2]), jnp.array([0.2, 0.1, 0.05]))


@pytest.mark.slow
def test_aggregate_sessions_matches_a_loop():
  query_ids = jnp.array([0, 1, 0, 0])
  rankings = jnp.array([[0, 1], [2, 0], [1, 0], [0, 2]])
  clicks = jnp.array([[1., 0.], [1., 1.], [0., 1.], [1., 1.]])
  counts, click_counts = click_logs.aggregate_sessions(query_ids, rankings, clicks, num_queries=2,
                                                       num_docs=3)
  expected = np.zeros((2, 3))
  for q, shown, c in zip(query_ids.tolist(), rankings.tolist(), clicks.tolist()):
    for d, clicked in zip(shown, c):
      expected[q, d] += clicked
  np.testing.assert_array_equal(counts, [3, 1])
  np.testing.assert_array_equal(click_counts, expected)


@pytest.mark.slow
def test_key_and_chunk_size_fix_the_log():
  """As documented: same key and chunk_size, same log; another chunk_size draws other sessions
  from the same distribution, with the same propensities (drawn before chunking)."""
  run = lambda key, chunk_size: click_logs.simulate_click_log(
      LOGITS, LABELS, MODEL, key=key, num_sessions=300, where=MASK, propensity_samples=500,
      chunk_size=chunk_size)
  a, b = run(jax.random.key(3), 100), run(jax.random.key(3), 100)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  other_chunks, other_key = run(jax.random.key(3), 300), run(jax.random.key(4), 100)
  np.testing.assert_array_equal(other_chunks.rho, a.rho)
  np.testing.assert_array_equal(other_chunks.betabar, a.betabar)
  assert other_chunks.num_sessions == a.num_sessions == 300
  assert not np.array_equal(other_chunks.session_counts, a.session_counts)
  assert not np.array_equal(other_key.session_counts, a.session_counts)


@pytest.mark.slow
def test_click_frequencies_match_the_click_model():
  """E[clicks on d] / n_q = rho(d) R(d) + betabar(d), within 4 standard errors."""
  log = click_logs.simulate_click_log(LOGITS, LABELS, MODEL, key=jax.random.key(0),
                                      num_sessions=200_000, where=MASK, chunk_size=60_000)
  assert log.num_sessions == 200_000
  rho, betabar = jax.vmap(lambda k, m, w: estimators.policy_aware_propensities(
      m, MODEL, key=k, num_samples=400_000, where=w))(
          jax.random.split(jax.random.key(1), 2), LOGITS, MASK)
  expected = np.asarray(rho * LABELS / 4 + betabar)
  counts = np.asarray(log.session_counts)[:, None]
  frequency = np.asarray(log.click_counts) / counts
  stderr = np.sqrt(expected * (1 - expected) / counts) + 1e-3  # + the propensities' own MC error
  np.testing.assert_array_less(np.abs(frequency - expected), 4 * stderr)
  assert frequency[1, 4] == 0  # padding is never shown
  # The log's propensities average alpha at each document's rank (in [0, 0.7]) over 10k rankings:
  # standard error at most 0.35 / sqrt(1e4) (Popoviciu), and 0.35 / sqrt(4e5) for the reference.
  np.testing.assert_allclose(log.rho, rho, atol=4 * 0.35 * (1 / np.sqrt(10_000) + 1 / np.sqrt(400_000)))


@pytest.mark.slow
def test_query_rewards_are_the_sum_of_the_sessions_estimates():
  clicks = jnp.array([[1., 0., 1.], [0., 0., 1.], [1., 1., 0.]])
  rho, betabar = jnp.array([0.6, 0.3, 0.1]), jnp.array([0.1, 0.05, 0.02])
  reward_hat = jnp.array([0.5, 0.2, 0.9])
  for kwargs, per_session in (
      ({}, lambda c: estimators.ips_document_rewards(c, rho, betabar, min_propensity=0.2)),
      ({"reward_hat": reward_hat}, lambda c: estimators.dr_document_rewards(
          c, rho, betabar, reward_hat, min_propensity=0.2))):
    summed = estimators.query_rewards(3.0, clicks.sum(0), rho, betabar, min_propensity=0.2, **kwargs)
    np.testing.assert_allclose(summed, sum(per_session(c) for c in clicks), rtol=1e-5)


@pytest.mark.slow
def test_a_query_without_sessions_contributes_nothing():
  rewards = estimators.query_rewards(0.0, jnp.zeros(3), jnp.array([0.5, 0.2, 0.]), jnp.zeros(3),
                                     reward_hat=jnp.ones(3))
  np.testing.assert_array_equal(rewards, 0.0)


@pytest.fixture(scope="module")
def ltr_log():
  data = make_ltr_dataset(jax.random.key(3), num_queries=40, max_docs=8, min_docs=4, num_features=5)
  logits = 30.0 * data.features[..., 0]  # a near-deterministic logger: some documents never shown
  log = click_logs.simulate_click_log(logits, data.labels, trust_bias(4), key=jax.random.key(4),
                                      num_sessions=5_000, where=data.where)
  return data, log


@pytest.mark.slow
def test_unclipped_dr_equals_ips_where_the_logger_exposes(ltr_log):
  data, log = ltr_log
  ips = click_logs.estimated_rewards(log, estimator="ips", min_propensity=0.0)
  dr = click_logs.estimated_rewards(log, estimator="dr", features=data.features, where=data.where,
                                    min_propensity=0.0)
  exposed = np.asarray(log.rho > 0)
  assert exposed.sum() > 50 and (~exposed & np.asarray(data.where)).sum() > 10
  np.testing.assert_allclose(np.asarray(dr)[exposed], np.asarray(ips)[exposed], rtol=1e-4, atol=1e-3)
  # Documents never displayed get the regression model's estimate, n_q Rhat(d), not 0.
  unexposed = ~exposed & np.asarray(data.where) & (np.asarray(log.session_counts)[:, None] > 0)
  assert np.all(np.asarray(dr)[unexposed] >= 0) and np.any(np.asarray(dr)[unexposed] > 0)
  np.testing.assert_array_equal(np.asarray(ips)[unexposed], 0.0)


@pytest.mark.slow
def test_estimated_rewards_reject_bad_options(ltr_log):
  _, log = ltr_log
  with pytest.raises(ValueError, match="estimator"):
    click_logs.estimated_rewards(log, estimator="snips")
  with pytest.raises(ValueError, match="features"):
    click_logs.estimated_rewards(log, estimator="dr")
  empty = log._replace(session_counts=jnp.zeros_like(log.session_counts),
                       click_counts=jnp.zeros_like(log.click_counts))
  with pytest.raises(ValueError, match="^log: has no sessions"):  # no floor of propensity_floor(1)
    click_logs.estimated_rewards(empty, estimator="ips")
  with pytest.raises(ValueError, match="^min_propensity: "):
    click_logs.estimated_rewards(log, estimator="ips", min_propensity=float("nan"))
  with pytest.raises(TypeError, match="^l2: "):
    click_logs.estimated_rewards(log, estimator="ips", l2="1")


def test_simulate_click_log_rejects_bad_input():
  with pytest.raises(ValueError, match="num_sessions"):
    click_logs.simulate_click_log(LOGITS, LABELS, MODEL, key=jax.random.key(0), num_sessions=0)
  with pytest.raises(ValueError, match="labels"):
    click_logs.simulate_click_log(LOGITS, LABELS[:1], MODEL, key=jax.random.key(0), num_sessions=5)


@pytest.mark.slow
def test_ridge_recovers_a_linear_relevance_and_ignores_zero_weights():
  x = jax.random.normal(jax.random.key(0), (50, 3))
  target = x @ jnp.array([0.1, -0.2, 0.05]) + 0.4
  weights = jnp.ones(50).at[:5].set(0.0)
  target = target.at[:5].set(100.0)  # outliers with weight 0 must not matter
  model = reward_model.fit_reward_regression(x, target, weights, l2=0.0)
  np.testing.assert_allclose(model.coef, [0.1, -0.2, 0.05], atol=1e-4)
  np.testing.assert_allclose(model.intercept, 0.4, atol=1e-4)
  prediction = reward_model.predict_rewards(model, jnp.array([[100., 0., 0.], [-100., 0., 0.]]))
  np.testing.assert_array_equal(prediction, [1.0, 0.0])  # clipped to probabilities


@pytest.mark.slow
def test_ridge_with_no_weight_predicts_zero_not_nan():
  model = reward_model.fit_reward_regression(jnp.ones((4, 2)), jnp.ones(4), jnp.zeros(4))
  assert np.all(np.isfinite(model.coef)) and float(model.intercept) == 0.0


@pytest.mark.slow
def test_logged_objective_matches_its_formula():
  exposure = jnp.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
  logging_exposure = jnp.array([[0.4, 0.4, 0.2], [0.3, 0.3, 0.4]])
  rewards = jnp.array([[3., -1., 0.5], [0.2, 2., 1.]])
  counts = jnp.array([5., 3.])
  value = float(jnp.sum(exposure * rewards)) / 8
  got = estimators.logged_objective(exposure, logging_exposure, rewards, counts, objective="value",
                                    num_sessions=8)
  np.testing.assert_allclose(got, value, rtol=1e-6)
  divergence = (5 * estimators.exposure_divergence(exposure[0], logging_exposure[0])
                + 3 * estimators.exposure_divergence(exposure[1], logging_exposure[1])) / 8
  safe = estimators.logged_objective(exposure, logging_exposure, rewards, counts, objective="safe",
                                     num_sessions=8, delta=0.1)
  np.testing.assert_allclose(safe, value - 3.0 * np.sqrt(divergence / 8), rtol=1e-5)
  prpo = estimators.logged_objective(exposure, logging_exposure, rewards, counts, objective="prpo",
                                     num_sessions=8)
  manual = sum(estimators.prpo_objective(e, e0, r) for e, e0, r in
               zip(exposure, logging_exposure, rewards)) / 8
  np.testing.assert_allclose(prpo, manual, rtol=1e-6)
  with pytest.raises(ValueError, match="objective"):
    estimators.logged_objective(exposure, logging_exposure, rewards, counts, objective="ips",
                                num_sessions=8)


@pytest.mark.slow
def test_the_safe_objective_tends_to_the_value_as_sessions_grow():
  exposure = jnp.array([[0.6, 0.3, 0.1]])
  logging_exposure = jnp.array([[0.2, 0.3, 0.5]])
  gaps = []
  for n in (10**2, 10**4, 10**6):
    rewards = jnp.array([[0.5, 0.2, 0.1]]) * n  # the same per-session rewards
    args = (exposure, logging_exposure, rewards, jnp.array([float(n)]))
    value = estimators.logged_objective(*args, objective="value", num_sessions=n)
    safe = estimators.logged_objective(*args, objective="safe", num_sessions=n)
    gaps.append(float(value - safe))
  assert gaps[0] > gaps[1] > gaps[2] > 0
  np.testing.assert_allclose(gaps[0] / gaps[2], 100, rtol=1e-3)  # the penalty falls as 1 / sqrt(N)


@pytest.mark.slow
def test_drpo_imitates_only_the_documents_above_the_quantile():
  """Its gradient pushes exposure towards the kept documents and ignores the rest entirely."""
  exposure = jnp.array([[0.5, 0.3, 0.2, 0.0]])
  logging_exposure = jnp.array([[0.4, 0.3, 0.3, 0.0]])  # the last document was never shown
  counts = jnp.array([10.0])
  rewards = jnp.array([[-30.0, 8.0, 1.0, 50.0]])  # summed over 10 sessions: means -3, 0.8, 0.1, 5
  grad = jax.grad(lambda e: estimators.logged_objective(
      e, logging_exposure, rewards, counts, objective="drpo", num_sessions=10, quantile=0.5))(exposure)
  # Of the three logged documents, the quantile keeps 0.8 and 0.1 (median 0.1); never-shown 5 is ignored.
  np.testing.assert_allclose(grad, [[0.0, 1.0, 1.0, 0.0]])


@pytest.mark.slow
def test_rank_counts_in_the_log_agree_with_its_counts():
  """rank_counts=True: impressions summed over ranks and documents are K n_q (every session shows
  K of the query's documents), clicks summed over ranks are click_counts; the other fields and
  the estimates built on them are those of the log without rank counts."""
  run = lambda ranks: click_logs.simulate_click_log(
      LOGITS, LABELS, MODEL, key=jax.random.key(7), num_sessions=500, where=MASK,
      propensity_samples=200, chunk_size=200, rank_counts=ranks)
  log, plain = run(True), run(False)
  assert plain.rank_counts is None
  impressions, clicks = log.rank_counts
  assert impressions.shape == (2, 5, 3)
  np.testing.assert_array_equal(impressions.sum(axis=(1, 2)), 3 * log.session_counts)
  np.testing.assert_array_equal(clicks.sum(axis=2), log.click_counts)
  assert float(clicks[1, 4].sum()) == 0.0  # the masked document is never clicked
  for x, y in zip(log[:4], plain):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(click_logs.estimated_rewards(log, estimator="ips"),
                                click_logs.estimated_rewards(plain, estimator="ips"))


@pytest.mark.slow
def test_assumed_model_sets_the_propensities_not_the_clicks():
  assumed = click_model(jnp.array([0.5, 0.5, 0.5]), jnp.array([0.3, 0.3, 0.3]))
  run = lambda users, **extra: click_logs.simulate_click_log(
      LOGITS, LABELS, users, key=jax.random.key(8), num_sessions=300, where=MASK,
      propensity_samples=200, **extra)
  log = run(MODEL, assumed_model=assumed)
  same_clicks, same_propensities = run(MODEL), run(assumed)
  np.testing.assert_array_equal(log.click_counts, same_clicks.click_counts)
  np.testing.assert_array_equal(log.rho, same_propensities.rho)
  np.testing.assert_array_equal(log.betabar, same_propensities.betabar)
  assert not np.allclose(log.rho, same_clicks.rho)
  # with_click_model recomputes them: with the log key's first half, exactly the same numbers.
  recomputed = click_logs.with_click_model(same_clicks, LOGITS, assumed,
                                           key=jax.random.split(jax.random.key(8))[0], where=MASK,
                                           propensity_samples=200)
  np.testing.assert_array_equal(recomputed.rho, log.rho)
  np.testing.assert_array_equal(recomputed.betabar, log.betabar)
  np.testing.assert_array_equal(recomputed.click_counts, same_clicks.click_counts)


def test_a_non_affine_click_model_needs_an_assumed_model():
  class Cascade(NamedTuple):  # stands for any click model that is not an affine ClickModel
    continue_after_skip: jax.Array

  with pytest.raises(ValueError, match="assumed_model"):
    click_logs.simulate_click_log(LOGITS, LABELS, Cascade(jnp.ones(3)), key=jax.random.key(0),
                                  num_sessions=5)
  with pytest.raises(ValueError, match="^assumed_model"):
    click_logs.simulate_click_log(LOGITS, LABELS, MODEL, key=jax.random.key(0), num_sessions=5,
                                  assumed_model=MODEL._replace(beta=jnp.array([2.0, 0.0, 0.0])))
  with pytest.raises(TypeError, match="rank_counts"):
    click_logs.simulate_click_log(LOGITS, LABELS, MODEL, key=jax.random.key(0), num_sessions=5,
                                  rank_counts="yes")


def test_with_click_model_rejects_bad_input():
  log = click_logs.ClickLog(jnp.ones(2), jnp.zeros((2, 5)), jnp.ones((2, 5)), jnp.zeros((2, 5)))
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="^log"):
    click_logs.with_click_model(tuple(log), LOGITS, MODEL, key=key)
  with pytest.raises(ValueError, match="^logging_logits"):
    click_logs.with_click_model(log, LOGITS[:, :4], MODEL, key=key)
  with pytest.raises(ValueError, match="^model"):
    click_logs.with_click_model(log, LOGITS, (MODEL.alpha, MODEL.beta), key=key)
  with pytest.raises(ValueError, match="^where"):
    click_logs.with_click_model(log, LOGITS, MODEL, key=key, where=MASK[:, :3])
