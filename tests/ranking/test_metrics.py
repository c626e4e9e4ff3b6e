"""Tests for saferl_jax.ranking.metrics: DCG/NDCG closed forms, masking, jit/vmap, exposure
and expected metrics from samples against exact enumeration, and input checks."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax.ranking import (dcg_at_k, dcg_rank_weights, expected_metric_from_samples,
                                exposure_from_samples, ndcg_at_k, ranking_log_prob,
                                sample_rankings)

LABELS = np.array([3.0, 0.0, 2.0, 1.0])  # gains 7, 0, 3, 1
RANKING = np.array([1, 2, 0, 3])
LOGITS = np.array([0.5, -1.0, 2.0, 0.3])
PERMS = np.array(list(itertools.permutations(range(4))))


def exact_perm_probs(logits):
  return np.exp(np.asarray(ranking_log_prob(logits, PERMS), np.float64))


def test_rank_weights_closed_form():
  np.testing.assert_allclose(dcg_rank_weights(4), [1.0, 1 / np.log2(3), 0.5, 1 / np.log2(5)],
                             rtol=1e-6)


def test_dcg_and_ndcg_closed_forms():
  dcg3 = 0.0 + 3 / np.log2(3) + 7 / 2
  ideal3 = 7 + 3 / np.log2(3) + 1 / 2
  np.testing.assert_allclose(dcg_at_k(LABELS, RANKING, k=3), dcg3, rtol=1e-6)
  np.testing.assert_allclose(ndcg_at_k(LABELS, RANKING, k=3), dcg3 / ideal3, rtol=1e-6)
  np.testing.assert_allclose(dcg_at_k(LABELS, RANKING, k=1), 0.0)
  np.testing.assert_allclose(ndcg_at_k(LABELS, np.array([0, 2, 3, 1]), k=4), 1.0, rtol=1e-6)
  # A top-2 prefix is enough for k = 2.
  np.testing.assert_allclose(dcg_at_k(LABELS, np.array([2, 0]), k=2), 3 + 7 / np.log2(3),
                             rtol=1e-6)


def test_masked_items_have_no_gain_and_leave_the_ideal():
  where = np.array([False, True, True, True])  # the best item, 0, is padding
  dcg = 0.0 + 3 / np.log2(3) + 0 / 2
  ideal = 3 + 1 / np.log2(3)
  np.testing.assert_allclose(dcg_at_k(LABELS, RANKING, k=3, where=where), dcg, rtol=1e-6)
  np.testing.assert_allclose(ndcg_at_k(LABELS, RANKING, k=3, where=where), dcg / ideal, rtol=1e-6)


@pytest.mark.slow
def test_no_relevant_item_gives_zero_ndcg_and_no_nan_gradient():
  for labels, where in [(np.zeros(4), None), (LABELS, np.zeros(4, bool))]:
    value, grad = jax.value_and_grad(lambda y: ndcg_at_k(y, RANKING, k=2, where=where))(
        jnp.asarray(labels))
    assert float(value) == 0.0
    assert np.all(np.isfinite(grad))


@pytest.mark.slow
def test_jit_equals_eager_and_vmap_equals_a_loop():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 5, size=(6, 5)).astype(np.float32)
  where = rng.random((6, 5)) < 0.8
  rankings = np.stack([rng.permutation(5) for _ in range(6)])
  for fn in (dcg_at_k, ndcg_at_k):
    looped = [fn(y, r, k=3, where=w) for y, r, w in zip(labels, rankings, where)]
    batched = jax.vmap(lambda y, r, w, fn=fn: fn(y, r, k=3, where=w))(labels, rankings, where)
    np.testing.assert_allclose(batched, looped, rtol=1e-6)
    np.testing.assert_allclose(fn(labels, rankings, k=3, where=where), looped, rtol=1e-6)
    jitted = jax.jit(lambda y, r, w, fn=fn: fn(y, r, k=3, where=w))(labels, rankings, where)
    np.testing.assert_allclose(jitted, looped, rtol=1e-6)


def test_top_k_samples_are_prefixes_of_full_samples_from_the_same_key():
  key = jax.random.key(11)
  full = sample_rankings(LOGITS, key=key, sample_shape=200)
  np.testing.assert_array_equal(sample_rankings(LOGITS, key=key, sample_shape=200, k=2), full[:, :2])


def test_exposure_closed_form_and_mass():
  rankings = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
  weights = np.array([1.0, 0.5, 0.25])
  np.testing.assert_allclose(exposure_from_samples(rankings, weights, 4),
                             [0.5, 0.375, 0.375, 0.5])
  # Weights past the sampled prefix are ignored; items past the weights get 0.
  np.testing.assert_allclose(exposure_from_samples(rankings[:, :2], weights, 4),
                             [0.5, 0.25, 0.25, 0.5])
  masked = exposure_from_samples(rankings, weights, 4, where=np.array([True, True, True, False]))
  np.testing.assert_allclose(masked, [0.5, 0.375, 0.375, 0.0])


@pytest.mark.parametrize("k", [None, 2])
@pytest.mark.slow
def test_exposure_from_samples_matches_enumeration(k):
  weights = np.asarray(dcg_rank_weights(3), np.float64)
  probs = exact_perm_probs(LOGITS)
  per_perm = np.zeros((24, 4))  # exposure of each item under each permutation
  for i, perm in enumerate(PERMS):
    per_perm[i, perm[:3]] = weights
  exact = probs @ per_perm
  variance = probs @ per_perm**2 - exact**2
  n = 20_000
  samples = sample_rankings(LOGITS, key=jax.random.key(3), sample_shape=n, k=k)
  estimate = np.asarray(exposure_from_samples(samples, weights, 4))
  if k == 2:  # only two weighted ranks observed
    per_perm[:, :] = 0
    for i, perm in enumerate(PERMS):
      per_perm[i, perm[:2]] = weights[:2]
    exact = probs @ per_perm
    variance = probs @ per_perm**2 - exact**2
  stderr = np.sqrt(variance / n)
  assert np.all(np.abs(estimate - exact) < 5 * stderr + 1e-6)
  np.testing.assert_allclose(estimate.sum(), weights[: (3 if k is None else 2)].sum(), rtol=1e-5)


@pytest.mark.slow
def test_exposure_batched_lists():
  logits = np.stack([LOGITS, -LOGITS])
  samples = sample_rankings(logits, key=jax.random.key(0), sample_shape=100)
  batched = exposure_from_samples(samples, dcg_rank_weights(2), 4)
  assert batched.shape == (2, 4)
  for b in range(2):
    np.testing.assert_allclose(batched[b], exposure_from_samples(samples[:, b], dcg_rank_weights(2), 4),
                               rtol=1e-6)


@pytest.mark.parametrize("metric", ["dcg", "ndcg"])
@pytest.mark.slow
def test_expected_metric_matches_enumeration(metric):
  fn = dcg_at_k if metric == "dcg" else ndcg_at_k
  where = np.array([True, True, False, True])
  # Exact expectation over rankings of the valid items only (item 2 is padding).
  valid_perms = list(itertools.permutations([0, 1, 3]))
  sub_logits = LOGITS[[0, 1, 3]]
  to_sub = {0: 0, 1: 1, 3: 2}
  sub_probs = np.exp([float(ranking_log_prob(sub_logits, np.array([to_sub[i] for i in p])))
                      for p in valid_perms])
  values = np.array([float(fn(LABELS, np.array(list(p) + [2]), k=2, where=where))
                     for p in valid_perms])
  exact = sub_probs @ values
  est = expected_metric_from_samples(LOGITS, LABELS, key=jax.random.key(5), k=2,
                                     num_samples=20_000, metric=metric, where=where)
  assert est.per_sample.shape == (20_000,)
  assert float(est.stderr) > 0
  assert abs(float(est.value) - exact) < 5 * float(est.stderr)


@pytest.mark.slow
def test_expected_metric_batched_and_jitted():
  logits = np.stack([LOGITS, -LOGITS, np.zeros(4)])
  labels = np.stack([LABELS, LABELS, np.zeros(4)])
  key = jax.random.key(0)
  est = expected_metric_from_samples(logits, labels, key=key, k=2, num_samples=64)
  assert est.value.shape == (3,) and est.per_sample.shape == (64, 3)
  assert float(est.value[2]) == 0.0 and float(est.stderr[2]) == 0.0
  jitted = jax.jit(lambda m, y, key: expected_metric_from_samples(
      m, y, key=key, k=2, num_samples=64))(logits, labels, key)
  np.testing.assert_allclose(jitted.value, est.value, rtol=1e-6)


def test_bad_inputs_raise_value_errors_naming_the_argument():
  with pytest.raises(ValueError, match="rankings"):
    dcg_at_k(LABELS, np.array([0, 1, 5, 2]), k=2)
  with pytest.raises(ValueError, match="rankings"):
    ndcg_at_k(LABELS, np.array([0, 1]), k=3)
  with pytest.raises(ValueError, match="k"):
    ndcg_at_k(LABELS, RANKING, k=0)
  with pytest.raises(ValueError, match="where"):
    ndcg_at_k(LABELS, RANKING, k=2, where=np.ones(3, bool))
  with pytest.raises(ValueError, match="where"):
    dcg_at_k(LABELS, RANKING, k=2, where=np.ones(4))
  with pytest.raises(ValueError, match="labels"):
    dcg_at_k(np.array([1.0, np.nan, 0.0, 0.0]), RANKING, k=2)
  with pytest.raises(ValueError, match="rankings"):
    exposure_from_samples(np.array([[0, 4]]), dcg_rank_weights(2), 4)
  with pytest.raises(ValueError, match="rank_weights"):
    exposure_from_samples(np.array([[0, 1]]), np.ones((2, 2)), 4)
  with pytest.raises(ValueError, match="where"):
    exposure_from_samples(np.array([[0, 1]]), dcg_rank_weights(2), 4, where=np.ones(3, bool))
  with pytest.raises(ValueError, match="metric"):
    expected_metric_from_samples(LOGITS, LABELS, key=jax.random.key(0), k=2, num_samples=4,
                                 metric="map")
  with pytest.raises(ValueError, match="num_samples"):
    expected_metric_from_samples(LOGITS, LABELS, key=jax.random.key(0), k=2, num_samples=0)
  with pytest.raises(ValueError, match="k"):
    dcg_rank_weights(0)


def test_linear_gains_score_each_sample_with_the_labels_themselves():
  """gain="linear": each sampled ranking's NDCG uses gains = labels (not 2^y - 1), per sample."""
  labels = np.array([3.0, 1.0, 0.0, 2.0])
  est = expected_metric_from_samples(LOGITS, labels, key=jax.random.key(2), k=2, num_samples=16,
                                     gain="linear")
  rankings = sample_rankings(LOGITS, key=jax.random.key(2), sample_shape=(16,), k=2)
  ideal = 3.0 + 2.0 / np.log2(3)
  manual = [(labels[r[0]] + labels[r[1]] / np.log2(3)) / ideal for r in np.asarray(rankings)]
  np.testing.assert_allclose(est.per_sample, manual, rtol=1e-5)
  exponential = expected_metric_from_samples(LOGITS, labels, key=jax.random.key(2), k=2,
                                             num_samples=16)
  assert not np.allclose(exponential.per_sample, est.per_sample)
  with pytest.raises(ValueError, match="gain"):
    expected_metric_from_samples(LOGITS, labels, key=jax.random.key(2), k=2, num_samples=2,
                                 gain="log")
