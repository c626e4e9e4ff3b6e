"""EM for the affine trust-bias parameters: recovery of the simulator's alpha, beta, monotone
likelihood, masks, bad inputs, jit, and the affine invariance of the IPS ranking objective."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax.cltr import bias_estimation as be
from saferl_jax.cltr.clicks import ClickModel, check_click_model, click_model, trust_bias
from saferl_jax.data import click_logs

TRUE = trust_bias(5)


def _synthetic_counts(seed=0, num_queries=4, num_docs=5, k=3):
  """Rank counts drawn directly from the model: impressions fixed, clicks ~ Binomial(n, p)."""
  rng = np.random.default_rng(seed)
  model = trust_bias(k)
  relevance = rng.integers(0, 5, (num_queries, num_docs)) / 4
  relevance[:, 0], relevance[:, 1] = 0.0, 1.0
  impressions = rng.integers(50, 400, (num_queries, num_docs, k)).astype(np.float32)
  p = np.asarray(model.alpha) * relevance[..., None] + np.asarray(model.beta)
  clicks = rng.binomial(impressions.astype(int), p).astype(np.float32)
  return be.RankCounts(jnp.asarray(impressions), jnp.asarray(clicks))


def _log_likelihood(counts, fit):
  """The observed-data log-likelihood in float64, written independently of the module."""
  n, c = np.asarray(counts.impressions, np.float64), np.asarray(counts.clicks, np.float64)
  p = np.asarray(fit.alpha, np.float64) * np.asarray(fit.relevance, np.float64)[..., None] + \
      np.asarray(fit.beta, np.float64)
  return float(np.sum(c * np.log(p) + (n - c) * np.log1p(-p)))


def test_rank_counts_match_a_loop_and_jit():
  query_ids = jnp.array([0, 1, 0, 0])
  rankings = jnp.array([[0, 1], [2, 0], [1, 0], [0, 2]])
  clicks = jnp.array([[1., 0.], [1., 1.], [0., 1.], [1., 1.]])
  counts = be.rank_counts(query_ids, rankings, clicks, num_queries=2, num_docs=3)
  impressions, expected = np.zeros((2, 3, 2)), np.zeros((2, 3, 2))
  for q, shown, c in zip(query_ids.tolist(), rankings.tolist(), clicks.tolist()):
    for rank, (d, clicked) in enumerate(zip(shown, c)):
      impressions[q, d, rank] += 1
      expected[q, d, rank] += clicked
  np.testing.assert_array_equal(counts.impressions, impressions)
  np.testing.assert_array_equal(counts.clicks, expected)
  jitted = jax.jit(lambda q, y, c: be.rank_counts(q, y, c, num_queries=2, num_docs=3))(
      query_ids, rankings, clicks)
  for x, y in zip(jitted, counts):
    np.testing.assert_array_equal(x, y)


def _mapped(fit, relevance_true):
  """alpha, beta after the affine map R_fit ~ s R + i (least squares over the documents) that
  best expresses the fitted relevances in the true ones: alpha s, beta + alpha i."""
  slope, intercept = np.polyfit(relevance_true.ravel(), np.asarray(fit.relevance).ravel(), 1)
  alpha = np.asarray(fit.alpha, np.float64)
  return alpha * slope, np.asarray(fit.beta, np.float64) + alpha * intercept


@pytest.mark.slow
def test_em_recovers_the_simulators_trust_bias():
  """300k sessions of a PL logger (each document seen at every rank) under trust_bias(5).

  Tolerance, from repeated draws: given the logged rankings, the summed clicks of each
  (query, document, rank) cell are exactly Binomial(n_qdk, alpha_k R_qd + beta_k), so redrawing
  them B = 20 times from the true model and refitting gives the estimator's sampling
  distribution (what repeated seeds of the click simulation would give, at the cost of a [Q, D, K]
  draw). Its mean minus the truth is the estimator's bias; it is real for the normalised fit: the
  smallest of 16 noisy relevances of label-0 documents is mapped to 0 (and the largest of the
  label-4 ones to 1), and the extremes of noisy estimates lie beyond the true ones, so beta comes
  out low and alpha high by about two of their sds. The check: |fit - truth| <= |bias| + 4 sd
  sqrt(1 + 1/B) per rank (4 standard errors; the sqrt for the noise of the estimated bias).
  Up to the best affine map (regressing the fitted relevances on the true R = y / 4 over all 80
  documents, no extremes involved) the fit must be unbiased: |mapped - truth| <= 4 sd_mapped
  sqrt(1 + 1/B), sd_mapped and the replicates' mean error likewise from the B refits.
  """
  num_queries, num_docs, k = 10, 8, 5
  labels = np.tile(np.arange(num_docs) % 5, (num_queries, 1))
  labels = np.asarray(jax.random.permutation(jax.random.key(1), labels, axis=1, independent=True))
  logits = 0.5 * labels + np.asarray(jax.random.normal(jax.random.key(2), labels.shape))
  log = click_logs.simulate_click_log(logits, labels, TRUE, key=jax.random.key(0),
                                      num_sessions=300_000, propensity_samples=10, rank_counts=True)
  counts = log.rank_counts
  assert counts.impressions.shape == (num_queries, num_docs, k)
  # Every document is shown at every rank (the randomisation EM needs), hundreds of times.
  assert float(counts.impressions.min()) > 0
  assert float(counts.impressions.sum(-1).min()) > 1000
  fit = be.estimate_bias(counts)
  assert int(fit.num_iterations) < 2000  # converged by the tolerance, not the cap

  relevance_true = labels / 4
  p_true = TRUE.alpha * relevance_true[..., None] + TRUE.beta
  draws = 20
  redrawn = jax.vmap(lambda key: jax.random.binomial(key, counts.impressions, p_true))(
      jax.random.split(jax.random.key(3), draws))
  refits = jax.jit(jax.vmap(lambda c: be.estimate_bias(be.RankCounts(counts.impressions, c))))(
      redrawn)
  inflate = np.sqrt(1 + 1 / draws)
  for name, estimate, truth, replicates in (("alpha", fit.alpha, TRUE.alpha, refits.alpha),
                                            ("beta", fit.beta, TRUE.beta, refits.beta)):
    estimate, truth, replicates = (np.asarray(x, np.float64) for x in (estimate, truth, replicates))
    sd = replicates.std(axis=0, ddof=1)
    bias = replicates.mean(axis=0) - truth
    assert np.all(sd < 0.01) and np.all(np.abs(bias) < 0.03), (name, sd, bias)
    assert np.all(np.abs(estimate - truth) <= np.abs(bias) + 4 * sd * inflate), (
        name, estimate, truth, bias, sd)

  mapped = np.array([_mapped(be.BiasEstimate(*(x[b] for x in refits)), relevance_true)
                     for b in range(draws)])                          # [B, 2, K]
  sd_mapped = mapped.std(axis=0, ddof=1)
  for estimate, truth, sd, replicates in zip(_mapped(fit, relevance_true), (TRUE.alpha, TRUE.beta),
                                              sd_mapped, mapped.transpose(1, 0, 2)):
    truth = np.asarray(truth, np.float64)
    assert np.all(np.abs(estimate - truth) <= 4 * sd * inflate), (estimate, truth, sd)
    # The replicates' mean error: within 4 standard errors of the mean (sd / sqrt(B)) of zero.
    assert np.all(np.abs(replicates.mean(axis=0) - truth) <= 4 * sd / np.sqrt(draws))
  assert np.corrcoef(np.asarray(fit.relevance).ravel(), labels.ravel())[0, 1] > 0.99
  check_click_model(fit.click_model)


def test_a_perfect_fit_on_expected_counts():
  """Expected (noise-free) clicks: EM reaches the true parameters, up to its tolerance."""
  rng = np.random.default_rng(1)
  relevance = np.array([[0.0, 1.0, 0.25, 0.5], [0.75, 0.5, 0.0, 1.0]])
  impressions = rng.integers(100, 1000, (2, 4, 3)).astype(np.float32)
  model = trust_bias(3)
  clicks = impressions * (np.asarray(model.alpha) * relevance[..., None] + np.asarray(model.beta))
  fit = be.estimate_bias(be.RankCounts(impressions, clicks), tolerance=1e-7)
  np.testing.assert_allclose(fit.alpha, model.alpha, atol=2e-3)
  np.testing.assert_allclose(fit.beta, model.beta, atol=2e-3)
  np.testing.assert_allclose(fit.relevance, relevance, atol=5e-3)


def test_log_likelihood_never_decreases():
  counts = _synthetic_counts()
  values = []
  for steps in range(1, 41):
    fit = be.estimate_bias(counts, max_iterations=steps, tolerance=0.0, min_impressions=0.0)
    assert int(fit.num_iterations) == steps
    independent = _log_likelihood(counts, fit)
    # The module's float32 sum agrees with the float64 one (and is invariant to the normalisation).
    assert abs(float(fit.log_likelihood) - independent) <= 1e-5 * abs(independent)
    values.append(independent)
  values = np.array(values)
  # EM is monotone in exact arithmetic; float32 steps may wobble by rounding only (1e-7 relative).
  assert np.all(np.diff(values) >= -1e-7 * np.abs(values[1:])), np.diff(values)
  assert values[-1] - values[0] > 1.0  # and it does climb


@pytest.mark.slow
def test_masked_documents_are_ignored_and_all_masked_is_finite():
  counts = _synthetic_counts(num_docs=5)
  padded = be.RankCounts(
      jnp.concatenate([counts.impressions, jnp.full((4, 2, 3), jnp.nan)], axis=1),
      jnp.concatenate([counts.clicks, jnp.full((4, 2, 3), 7.0)], axis=1))
  where = jnp.arange(7)[None, :].repeat(4, 0) < 5
  fit, masked = be.estimate_bias(counts), be.estimate_bias(padded, where=where)
  np.testing.assert_allclose(masked.alpha, fit.alpha, rtol=1e-5)
  np.testing.assert_allclose(masked.beta, fit.beta, rtol=1e-5)
  np.testing.assert_allclose(masked.relevance[:, :5], fit.relevance, atol=1e-5)
  np.testing.assert_array_equal(masked.relevance[:, 5:], 0.0)
  np.testing.assert_allclose(masked.log_likelihood, fit.log_likelihood, rtol=1e-5)
  nothing = jax.jit(lambda n, c, w: be.estimate_bias(be.RankCounts(n, c), where=w))(
      *counts, jnp.zeros((4, 5), bool))
  for field in nothing:
    assert np.all(np.isfinite(field))
  np.testing.assert_array_equal(nothing.relevance, 0.0)


def test_jit_equals_eager():
  counts = _synthetic_counts(seed=2)
  eager = be.estimate_bias(counts, min_impressions=10.0)
  jitted = jax.jit(lambda n, c, steps: be.estimate_bias(
      be.RankCounts(n, c), max_iterations=steps, min_impressions=10.0))(*counts, 2000)
  for x, y in zip(jitted, eager):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_affine_reparametrisation_leaves_the_ips_ranking_unchanged():
  """The docstring's claim: under R' = a R + b (alpha' = alpha / a, beta' = beta - alpha b / a)
  IPS's summed rewards become a R_q(d) + b n_q, so every ranking's value is a V + b n_q sum_k w_k
  and the best ranking is the same."""
  a, b = 1.25, -0.1
  model = trust_bias(3)
  other = click_model(model.alpha / a, model.beta - model.alpha * b / a)
  logits = jnp.array([[0.5, 0.0, -0.3, 0.2], [1.0, -1.0, 0.0, 0.4]])
  rng = np.random.default_rng(0)
  sessions = jnp.array([40.0, 25.0])
  log = click_logs.ClickLog(sessions, jnp.asarray(rng.integers(0, 20, (2, 4)), jnp.float32),
                            jnp.ones((2, 4)), jnp.zeros((2, 4)))
  key = jax.random.key(5)
  first = click_logs.with_click_model(log, logits, model, key=key, propensity_samples=2000)
  second = click_logs.with_click_model(log, logits, other, key=key, propensity_samples=2000)
  rewards = click_logs.estimated_rewards(first, estimator="ips", min_propensity=0.0)
  rewards_other = click_logs.estimated_rewards(second, estimator="ips", min_propensity=0.0)
  expected = a * rewards + b * sessions[:, None]
  np.testing.assert_allclose(rewards_other, expected, rtol=1e-4, atol=1e-3)
  assert np.max(np.abs(rewards_other - rewards)) > 1.0  # the estimates themselves do change
  weights = 1.0 / np.log2(np.arange(3) + 2.0)
  for q in range(2):
    rankings = list(itertools.permutations(range(4), 3))
    values = np.array([weights @ np.asarray(rewards[q])[list(y)] for y in rankings])
    values_other = np.array([weights @ np.asarray(rewards_other[q])[list(y)] for y in rankings])
    np.testing.assert_allclose(values_other, a * values + b * float(sessions[q]) * weights.sum(),
                               rtol=1e-4, atol=1e-3)
    assert rankings[int(np.argmax(values_other))] == rankings[int(np.argmax(values))]


def test_click_model_of_the_estimate():
  fit = be.estimate_bias(_synthetic_counts(seed=3))
  model = fit.click_model
  assert isinstance(model, ClickModel)
  check_click_model(model)
  np.testing.assert_array_equal(model.alpha, fit.alpha)
  assert float(model.flip_probability) == 0.0


@pytest.mark.parametrize("change, name", [
    (lambda c: dict(counts=tuple(c)), "counts"),
    (lambda c: dict(counts=be.RankCounts(c.impressions[0], c.clicks[0])), "counts.impressions"),
    (lambda c: dict(counts=be.RankCounts(c.impressions, c.clicks[:, :, :2])), "counts.clicks"),
    (lambda c: dict(counts=be.RankCounts(c.impressions, c.impressions + 1)), "counts.clicks"),
    (lambda c: dict(counts=be.RankCounts(-c.impressions, c.clicks)), "counts.impressions"),
    (lambda c: dict(counts=be.RankCounts(c.impressions * 0, c.clicks * 0)), "counts"),
    (lambda c: dict(counts=c, where=jnp.ones((4, 4), bool)), "where"),
    (lambda c: dict(counts=c, max_iterations=0), "max_iterations"),
    (lambda c: dict(counts=c, tolerance=-1.0), "tolerance"),
    (lambda c: dict(counts=c, min_impressions=float("nan")), "min_impressions"),
])
def test_estimate_bias_rejects_bad_input(change, name):
  with pytest.raises(ValueError, match=rf"^{name}\b"):
    be.estimate_bias(**change(_synthetic_counts()))


@pytest.mark.parametrize("args, name", [
    ((jnp.array([0, 2]), jnp.array([[0, 1], [1, 0]]), jnp.ones((2, 2))), "query_ids"),
    ((jnp.array([0, 1]), jnp.array([[0, 3], [1, 0]]), jnp.ones((2, 2))), "rankings"),
    ((jnp.array([0, 1]), jnp.array([[0, 1], [1, 0]]), jnp.ones((2, 3))), "clicks"),
    ((jnp.array([0, 1]), jnp.array([[0, 1], [1, 0]]), 2 * jnp.ones((2, 2))), "clicks"),
])
def test_rank_counts_rejects_bad_input(args, name):
  with pytest.raises(ValueError, match=rf"^{name}\b"):
    be.rank_counts(*args, num_queries=2, num_docs=3)


def test_small_logs_still_give_a_valid_click_model():
  """On tiny logs EM drifts towards degenerate fits (probabilities at 0 or 1); the fit must still
  be a valid click model (every P(click) in [0, 1]), or the estimators cannot use it. Random
  sparse counts of 6 queries x 5 documents x 5 ranks, 40 draws."""
  rng = np.random.default_rng(0)
  for _ in range(40):
    impressions = rng.integers(0, 4, size=(6, 5, 5)).astype(float)
    clicks = rng.binomial(impressions.astype(int), rng.uniform(0, 1, size=(6, 5, 5))).astype(float)
    fit = be.estimate_bias(be.RankCounts(jnp.asarray(impressions), jnp.asarray(clicks)),
                           max_iterations=300)
    check_click_model(fit.click_model)
