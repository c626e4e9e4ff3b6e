"""CLTR estimators: unbiasedness by Monte Carlo under an affine click model, the safe objective."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax.cltr import estimators as est

LOGITS = np.array([1.0, 0.3, -0.5, 0.0])
RELEVANCE = np.array([0.9, 0.5, 0.1, 0.25])
ALPHA = np.array([0.6, 0.3])  # two displayed ranks
BETA = np.array([0.2, 0.05])
K = 2


def exact_propensities():
  """rho(d) and betabar(d) by enumerating every top-K prefix of the Plackett-Luce logger."""
  weights = np.exp(LOGITS)
  rho, betabar = np.zeros(4), np.zeros(4)
  for prefix in itertools.permutations(range(4), K):
    remaining, prob = list(range(4)), 1.0
    for d in prefix:
      prob *= weights[d] / weights[remaining].sum()
      remaining.remove(d)
    for rank, d in enumerate(prefix):
      rho[d] += prob * ALPHA[rank]
      betabar[d] += prob * BETA[rank]
  return rho, betabar


def simulate_session_clicks(key, num_sessions):
  """Clicks per document [N, 4]: y ~ PL(LOGITS) by Gumbel top-K, then affine clicks on the top K."""
  rank_key, click_key = jax.random.split(key)
  gumbel = jax.random.gumbel(rank_key, (num_sessions, 4))
  top = jnp.argsort(-(LOGITS + gumbel), axis=1)[:, :K]
  click_prob = ALPHA * RELEVANCE[top] + BETA
  clicked = jax.random.bernoulli(click_key, click_prob).astype(jnp.float32)
  clicks = jnp.zeros((num_sessions, 4)).at[jnp.arange(num_sessions)[:, None], top].set(clicked)
  return clicks


def test_exact_propensities_are_exposures():
  rho, betabar = exact_propensities()
  assert rho.sum() == pytest.approx(ALPHA.sum()) and betabar.sum() == pytest.approx(BETA.sum())


@pytest.mark.parametrize("estimator", ["ips", "dr"])
@pytest.mark.slow
def test_document_rewards_are_unbiased(estimator):
  rho, betabar = exact_propensities()
  reward_hat = np.array([0.5, 0.5, 0.5, 0.5])  # a poor regression model: DR must still be unbiased
  clicks = simulate_session_clicks(jax.random.key(0), 400_000)
  if estimator == "ips":
    rewards = jax.vmap(lambda c: est.ips_document_rewards(c, rho, betabar))(clicks)
  else:
    rewards = jax.vmap(lambda c: est.dr_document_rewards(c, rho, betabar, reward_hat))(clicks)
  mean = np.asarray(rewards.mean(0), np.float64)
  stderr = np.asarray(rewards.std(0), np.float64) / np.sqrt(clicks.shape[0])
  np.testing.assert_array_less(np.abs(mean - RELEVANCE), 4 * stderr)
  # The value of any target exposure is then unbiased too: it is linear in the rewards.
  exposure = np.array([0.7, 0.2, 0.4, 0.1])
  values = jax.vmap(lambda r: est.policy_value(exposure, r))(rewards)
  truth = float(exposure @ RELEVANCE)
  assert abs(float(values.mean()) - truth) < 4 * float(values.std()) / np.sqrt(clicks.shape[0])


@pytest.mark.slow
def test_without_clipping_dr_equals_ips():
  rho, betabar = exact_propensities()
  clicks = simulate_session_clicks(jax.random.key(1), 1_000)
  ips = jax.vmap(lambda c: est.ips_document_rewards(c, rho, betabar))(clicks)
  dr = jax.vmap(lambda c: est.dr_document_rewards(c, rho, betabar, np.full(4, 0.3)))(clicks)
  np.testing.assert_allclose(dr, ips, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_with_clipping_dr_has_less_bias_than_ips_when_the_model_is_good():
  rho, betabar = exact_propensities()
  floor = 0.3  # above the smallest propensities: IPS is biased low there
  assert np.any(rho < floor)
  clicks = simulate_session_clicks(jax.random.key(2), 200_000)
  good_model = RELEVANCE + 0.05
  ips = jax.vmap(lambda c: est.ips_document_rewards(c, rho, betabar, min_propensity=floor))(clicks)
  dr = jax.vmap(lambda c: est.dr_document_rewards(c, rho, betabar, good_model,
                                                  min_propensity=floor))(clicks)
  clipped = np.maximum(rho, floor)
  # The expected values follow from the formulas: E[c - betabar] = rho R.
  def stderr(x):
    return np.asarray(x.std(0)) / np.sqrt(x.shape[0])
  ips_expected = rho / clipped * RELEVANCE
  np.testing.assert_array_less(np.abs(ips_expected - np.asarray(ips.mean(0))), 4 * stderr(ips))
  dr_expected = good_model + rho * (RELEVANCE - good_model) / clipped
  np.testing.assert_array_less(np.abs(dr_expected - np.asarray(dr.mean(0))), 4 * stderr(dr))
  assert np.all(np.abs(dr_expected - RELEVANCE) <= np.abs(rho / clipped * RELEVANCE - RELEVANCE))


@pytest.mark.slow
def test_unexposed_documents_give_no_nan():
  rho = jnp.array([0.5, 0.0])
  betabar = jnp.array([0.1, 0.0])
  rewards = est.ips_document_rewards(jnp.array([1.0, 0.0]), rho, betabar)
  assert rewards.tolist()[1] == 0.0
  grad = jax.grad(lambda r: est.ips_document_rewards(jnp.array([1.0, 0.0]), r, betabar).sum())(rho)
  assert np.all(np.isfinite(grad))
  dr = est.dr_document_rewards(jnp.array([1.0, 0.0]), rho, betabar, jnp.array([0.3, 0.4]))
  assert float(dr[1]) == pytest.approx(0.4)


def test_propensity_floor_and_clipping():
  assert est.propensity_floor(10_000) == pytest.approx(0.1)
  assert est.propensity_floor(4) == 1.0
  rewards = est.ips_document_rewards(jnp.array([1.0, 1.0, 0.0]), jnp.array([0.5, 0.01, 0.0]),
                                     jnp.zeros(3), min_propensity=0.1)
  np.testing.assert_allclose(rewards, [2.0, 10.0, 0.0])


@pytest.mark.slow
def test_exposure_divergence():
  exposure = jnp.array([0.5, 0.3, 0.2])
  assert float(est.exposure_divergence(exposure, exposure)) == pytest.approx(1.0)
  assert float(est.exposure_divergence(exposure, 2 * exposure)) == pytest.approx(1.0)  # normalised
  other = jnp.array([0.2, 0.3, 0.5])
  expected = float(np.sum((np.array([0.5, 0.3, 0.2]) ** 2) / np.array([0.2, 0.3, 0.5])))
  assert float(est.exposure_divergence(exposure, other)) == pytest.approx(expected, rel=1e-6)
  masked = est.exposure_divergence(jnp.array([0.5, 0.5, 9.0]), jnp.array([0.5, 0.5, 0.0]),
                                   where=jnp.array([True, True, False]))
  assert float(masked) == pytest.approx(1.0)
  assert float(est.exposure_divergence(jnp.zeros(3), jnp.zeros(3))) == 0.0


def test_safe_objective_penalty_vanishes_with_data():
  values = [float(est.safe_objective(0.5, 2.0, n)) for n in (10, 1_000, 100_000, 10_000_000)]
  assert values == sorted(values) and values[-1] == pytest.approx(0.5, abs=3e-3)
  assert float(est.safe_objective(0.5, 1.0, 100, delta=0.2)) == pytest.approx(0.3)
  with pytest.raises(ValueError, match="delta"):
    est.safe_objective(0.5, 1.0, 100, delta=1.5)


@pytest.mark.slow
def test_prpo_gradient_vanishes_outside_the_clip_range():
  logging_exposure = jnp.array([0.5, 0.5, 0.4])
  rewards = jnp.array([1.0, -1.0, 0.5])

  def objective(exposure):
    return est.prpo_objective(exposure, logging_exposure, rewards, clip_low=0.8, clip_high=1.2)
  # Ratios 1.4 (positive reward, above the range) and 0.6 (negative reward, below it): clipped.
  grad = jax.grad(objective)(jnp.array([0.7, 0.3, 0.4]))
  np.testing.assert_allclose(grad[:2], [0.0, 0.0])
  assert float(grad[2]) == pytest.approx(0.5)  # ratio 1 inside the range: d/d omega = Rhat
  # Inside the range it is the plain importance-weighted objective sum_d omega(d) Rhat(d).
  inside = jnp.array([0.55, 0.45, 0.4])
  assert float(objective(inside)) == pytest.approx(float(inside @ rewards), rel=1e-6)


@pytest.mark.slow
def test_prpo_ignores_documents_the_logger_never_exposes():
  value = est.prpo_objective(jnp.array([0.5, 0.5]), jnp.array([0.5, 0.0]), jnp.array([1.0, 5.0]))
  assert float(value) == pytest.approx(0.5)
  grad = jax.grad(lambda e: est.prpo_objective(e, jnp.array([0.5, 0.0]), jnp.array([1.0, 5.0])))(
      jnp.array([0.5, 0.5]))
  assert np.all(np.isfinite(grad)) and float(grad[1]) == 0.0


@pytest.mark.slow
def test_policy_aware_propensities_match_enumeration():
  from saferl_jax.cltr.clicks import ClickModel
  model = ClickModel(alpha=jnp.asarray(ALPHA, jnp.float32), beta=jnp.asarray(BETA, jnp.float32),
                     flip_probability=0.0)
  num_samples = 100_000
  rho, betabar = est.policy_aware_propensities(LOGITS, model, key=jax.random.key(5),
                                               num_samples=num_samples)
  exact_rho, exact_betabar = exact_propensities()
  # Each estimate is a mean of per-sample weights bounded by max(alpha): SE <= max(alpha) / 2 / sqrt(N).
  tolerance = 4 * ALPHA.max() / 2 / np.sqrt(num_samples)
  np.testing.assert_allclose(rho, exact_rho, atol=tolerance)
  np.testing.assert_allclose(betabar, exact_betabar, atol=tolerance)
  masked_rho, _ = est.policy_aware_propensities(LOGITS, model, key=jax.random.key(5),
                                                num_samples=1000,
                                                where=jnp.array([True, True, True, False]))
  assert float(masked_rho[3]) == 0.0


def test_bad_values_are_refused_by_name():
  exposure = jnp.array([0.5, 0.3, 0.2])
  with pytest.raises(ValueError, match="^exposure:"):
    est.exposure_divergence(exposure.at[0].set(jnp.nan), exposure)  # was 0.0
  with pytest.raises(ValueError, match="^logging_exposure:"):
    est.prpo_objective(exposure, exposure.at[1].set(-0.1), jnp.ones(3))
  with pytest.raises(ValueError, match="^num_sessions:"):
    est.propensity_floor(0)  # was a ZeroDivisionError
  with pytest.raises(ValueError, match="^num_sessions:"):
    est.safe_objective(0.5, 1.0, 0)
  with pytest.raises(ValueError, match="^session_count:"):
    est.query_rewards(-2.0, jnp.ones(3), jnp.full(3, 0.5), jnp.zeros(3))
  with pytest.raises(ValueError, match="^rho:"):
    est.ips_document_rewards(jnp.ones(3), jnp.array([0.5, -0.5, 0.5]), jnp.zeros(3))
  # Masked documents may hold anything: only the valid ones are checked.
  where = jnp.array([True, True, False])
  value = est.policy_value(exposure, jnp.array([1.0, 2.0, jnp.nan]), where=where)
  np.testing.assert_allclose(value, 1.1, rtol=1e-6)


def test_policy_aware_propensities_names_the_callers_arguments():
  from saferl_jax.cltr.clicks import ClickModel, position_based
  with pytest.raises(ValueError, match="^logging_logits:"):
    est.policy_aware_propensities(jnp.array([0.0, jnp.nan]), position_based(2), key=jax.random.key(0))
  with pytest.raises(ValueError, match="^click_model.alpha:"):
    est.policy_aware_propensities(jnp.zeros(3), ClickModel(jnp.zeros(0), jnp.zeros(0)),
                                  key=jax.random.key(0))


def test_session_ids_out_of_range_are_refused_not_clamped():
  from saferl_jax.cltr.clicks import relevance_at_ranks
  labels = jnp.array([[4, 0], [0, 4]])
  with pytest.raises(ValueError, match="^query_ids:"):
    relevance_at_ranks(jnp.array([0, 2]), jnp.array([[0, 1], [1, 0]]), labels)
  with pytest.raises(ValueError, match="^rankings:"):
    relevance_at_ranks(jnp.array([0, 1]), jnp.array([[0, -1], [1, 0]]), labels)
  with pytest.raises(ValueError, match="^query_ids:.*wrap"):
    relevance_at_ranks(np.array([0, 2**32], np.int64), jnp.array([[0, 1], [1, 0]]), labels)
