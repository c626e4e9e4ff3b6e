"""Tests for saferl_jax.ranking.plackett_luce: exact enumeration of every ranking of a
small list, sampling frequencies, masking, extreme logits, jit/vmap, the distrax class
against TensorFlow Probability, and input checks."""

import itertools
import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from tensorflow_probability.substrates.jax import distributions as tfd

from saferl_jax.ranking import PlackettLuce, ranking_log_prob, sample_rankings

LOGITS = np.array([0.5, -1.0, 2.0, 0.3])
PERMS = list(itertools.permutations(range(4)))


def np_log_prob(logits, ranking, where=None):
  """Plackett-Luce log-probability of a ranking (or prefix) in float64, by the definition."""
  logits = np.asarray(logits, np.float64)
  valid = np.ones(len(logits), bool) if where is None else np.asarray(where)
  remaining = set(np.flatnonzero(valid))
  total = 0.0
  for item in ranking:
    if not valid[item]:
      continue
    rest = np.array(sorted(remaining))
    top = logits[rest].max()
    total += logits[item] - (top + np.log(np.exp(logits[rest] - top).sum()))
    remaining.discard(item)
  return total


def chi_square_threshold(dof):
  """Mean + 6 std of a chi-square with `dof` degrees of freedom: a fixed-key test that
  only fails for a real discrepancy (the Pearson statistic has mean dof, variance 2 dof)."""
  return dof + 6 * math.sqrt(2 * dof)


def chi_square(counts, probs):
  n = counts.sum()
  return float(((counts - n * probs) ** 2 / (n * probs)).sum())


# Exact enumeration.


def test_full_rankings_enumerate_to_one_and_match_the_definition():
  log_probs = np.asarray(ranking_log_prob(LOGITS, np.array(PERMS)))
  assert log_probs.shape == (24,)
  np.testing.assert_allclose(np.exp(log_probs).sum(), 1.0, atol=1e-5)
  expected = [np_log_prob(LOGITS, p) for p in PERMS]
  np.testing.assert_allclose(log_probs, expected, atol=1e-5)


@pytest.mark.slow
def test_hand_products():
  w = np.exp(LOGITS)
  # Ranking (2, 0, 3, 1): w2/(all) * w0/(w0+w1+w3) * w3/(w1+w3) * 1.
  full = w[2] / w.sum() * w[0] / (w[0] + w[1] + w[3]) * w[3] / (w[1] + w[3])
  np.testing.assert_allclose(np.exp(ranking_log_prob(LOGITS, np.array([2, 0, 3, 1]))), full,
                             rtol=1e-5)
  # Prefix (1, 3): w1/(all) * w3/(w0+w2+w3).
  top2 = w[1] / w.sum() * w[3] / (w[0] + w[2] + w[3])
  np.testing.assert_allclose(np.exp(ranking_log_prob(LOGITS, np.array([1, 3]))), top2, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.slow
def test_prefix_log_prob_is_the_marginal_of_full_rankings(k):
  full = np.exp(np.asarray(ranking_log_prob(LOGITS, np.array(PERMS))))
  prefixes = sorted({p[:k] for p in PERMS})
  marginal = [sum(f for p, f in zip(PERMS, full) if p[:k] == prefix) for prefix in prefixes]
  got = np.exp(np.asarray(ranking_log_prob(LOGITS, np.array(prefixes))))
  np.testing.assert_allclose(got, marginal, rtol=1e-5)
  np.testing.assert_allclose(got.sum(), 1.0, atol=1e-5)


@pytest.mark.slow
def test_gradient_matches_the_exact_score_function():
  """d log pi(y)/dm_d = 1{d in prefix} - sum_k softmax over the items left at step k."""
  y = np.array([3, 0])
  grad = np.asarray(jax.grad(lambda m: ranking_log_prob(m, y))(jnp.asarray(LOGITS)))
  expected = np.zeros(4)
  remaining = [0, 1, 2, 3]
  for item in y:
    p = np.exp(LOGITS[remaining]) / np.exp(LOGITS[remaining]).sum()
    expected[remaining] -= p
    expected[item] += 1
    remaining.remove(item)
  np.testing.assert_allclose(grad, expected, atol=1e-5)


# Sampling frequencies.


@pytest.mark.parametrize("generator", ["hash", "threefry"])
@pytest.mark.slow
def test_full_ranking_frequencies_match_probabilities(generator):
  n = 100_000
  samples = np.asarray(sample_rankings(LOGITS, key=jax.random.key(0), sample_shape=n,
                                       generator=generator))
  assert samples.shape == (n, 4) and samples.dtype == np.int32
  codes = samples @ np.array([64, 16, 4, 1])
  perm_codes = np.array(PERMS) @ np.array([64, 16, 4, 1])
  counts = np.array([(codes == c).sum() for c in perm_codes])
  assert counts.sum() == n  # every sample is a permutation
  probs = np.exp([np_log_prob(LOGITS, p) for p in PERMS])
  assert chi_square(counts, probs) < chi_square_threshold(23)


@pytest.mark.parametrize("generator", ["hash", "threefry"])
@pytest.mark.slow
def test_top_k_frequencies_match_prefix_probabilities(generator):
  n = 100_000
  samples = np.asarray(sample_rankings(LOGITS, key=jax.random.key(1), sample_shape=n, k=2,
                                       generator=generator))
  assert samples.shape == (n, 2)
  prefixes = list(itertools.permutations(range(4), 2))
  counts = np.array([np.sum((samples[:, 0] == a) & (samples[:, 1] == b)) for a, b in prefixes])
  assert counts.sum() == n
  probs = np.exp([np_log_prob(LOGITS, p) for p in prefixes])
  assert chi_square(counts, probs) < chi_square_threshold(11)


def test_chi_square_detects_a_wrong_distribution():
  """The frequency test can fail: samples from other logits are rejected."""
  samples = np.asarray(sample_rankings(LOGITS * 1.1, key=jax.random.key(0), sample_shape=100_000))
  codes = samples @ np.array([64, 16, 4, 1])
  counts = np.array([(codes == c).sum() for c in np.array(PERMS) @ np.array([64, 16, 4, 1])])
  probs = np.exp([np_log_prob(LOGITS, p) for p in PERMS])
  assert chi_square(counts, probs) > chi_square_threshold(23)


def test_same_key_same_samples_and_different_keys_differ():
  a = sample_rankings(LOGITS, key=jax.random.key(3), sample_shape=50)
  b = sample_rankings(LOGITS, key=jax.random.key(3), sample_shape=50)
  c = sample_rankings(LOGITS, key=jax.random.key(4), sample_shape=50)
  np.testing.assert_array_equal(a, b)
  assert np.any(np.asarray(a) != np.asarray(c))


# Masking.

MASKED_LOGITS = np.array([0.1, 9.0, -0.5, 8.0, 0.7, 1.2])  # padded items 1 and 3 have the largest logits
WHERE = np.array([True, False, True, False, True, True])


@pytest.mark.parametrize("k", [None, 3, 5])
def test_padded_items_are_never_ranked_above_valid_ones(k):
  samples = np.asarray(sample_rankings(MASKED_LOGITS, key=jax.random.key(2), where=WHERE,
                                       sample_shape=10_000, k=k))
  valid_positions = samples[:, :4]
  assert np.all(WHERE[valid_positions])
  if k is None:
    np.testing.assert_array_equal(samples[:, 4:], np.tile([1, 3], (10_000, 1)))
  if k == 5:
    assert np.all(~WHERE[samples[:, 4]])


@pytest.mark.slow
def test_masked_log_prob_equals_the_log_prob_of_the_valid_sublist():
  sub = MASKED_LOGITS[WHERE]  # items 0, 2, 4, 5 become 0, 1, 2, 3
  to_sub = {0: 0, 2: 1, 4: 2, 5: 3}
  for ranking in [(5, 0, 4, 2, 1, 3), (1, 5, 3, 0, 4, 2), (2, 4)]:
    got = ranking_log_prob(MASKED_LOGITS, np.array(ranking), where=WHERE)
    expected = np_log_prob(sub, [to_sub[i] for i in ranking if WHERE[i]])
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.slow
def test_all_masked_list_has_log_prob_zero_and_no_nan_gradient():
  where = np.zeros(4, bool)
  for ranking in [np.array([2, 0, 3, 1]), np.array([1, 2])]:
    value, grad = jax.value_and_grad(lambda m: ranking_log_prob(m, ranking, where=where))(
        jnp.asarray(LOGITS))
    assert float(value) == 0.0
    np.testing.assert_array_equal(grad, np.zeros(4))
  samples = sample_rankings(LOGITS, key=jax.random.key(0), where=where, sample_shape=3)
  np.testing.assert_array_equal(samples, np.tile(np.arange(4), (3, 1)))


@pytest.mark.slow
def test_partially_masked_gradient_is_finite_and_zero_on_padding():
  grad = jax.grad(lambda m: ranking_log_prob(m, np.array([5, 1, 0, 3, 2, 4]), where=WHERE))(
      jnp.asarray(MASKED_LOGITS))
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(np.asarray(grad)[~WHERE], 0.0)


# Extreme logits.


@pytest.mark.parametrize("scale", [1e2, 1e4])
@pytest.mark.slow
def test_huge_logits_stay_finite_and_exact(scale):
  """A spread of 100 or 1e4 nats takes the exact (log-space) path; values match float64."""
  logits = np.array([1.0, 0.0, -1.0, 0.5]) * scale
  for ranking in [(0, 3, 1, 2), (2, 1, 3, 0), (1, 2), (0,)]:
    value, grad = jax.value_and_grad(lambda m: ranking_log_prob(m, np.array(ranking)))(
        jnp.asarray(logits, jnp.float32))
    expected = np_log_prob(logits, ranking)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-3)
  samples = np.asarray(sample_rankings(logits, key=jax.random.key(0), sample_shape=100))
  np.testing.assert_array_equal(samples, np.tile([0, 3, 1, 2], (100, 1)))
  # With padding (item 3 masked) the exact path gives the sub-list's log-prob.
  where = np.array([True, True, True, False])
  for ranking in [(2, 3, 1, 0), (1, 3)]:
    value, grad = jax.value_and_grad(lambda m: ranking_log_prob(m, np.array(ranking), where=where))(
        jnp.asarray(logits, jnp.float32))
    assert np.all(np.isfinite(grad)) and float(grad[3]) == 0.0
    np.testing.assert_allclose(value, np_log_prob(logits, ranking, where), rtol=1e-5, atol=1e-3)


@pytest.mark.slow
def test_fast_and_exact_paths_agree_at_the_switch():
  """Spreads just below and above the switch to the exact path give the same log-probs."""
  for spread in [55.0, 65.0]:
    logits = np.array([0.0, -spread, 1.0, -spread / 2, 2.0])
    for ranking in [(4, 2, 0, 3, 1), (1, 3, 0, 2, 4), (3, 1)]:
      np.testing.assert_allclose(ranking_log_prob(logits, np.array(ranking)),
                                 np_log_prob(logits, ranking), rtol=1e-5, atol=1e-4)


# jit, vmap, shapes.


@pytest.mark.slow
def test_jit_equals_eager():
  y = np.array(PERMS[:7])
  np.testing.assert_allclose(jax.jit(ranking_log_prob)(LOGITS, y), ranking_log_prob(LOGITS, y),
                             rtol=1e-6)
  jit_where = jax.jit(lambda m, r, w: ranking_log_prob(m, r, where=w))
  np.testing.assert_allclose(jit_where(MASKED_LOGITS, np.array([5, 0]), WHERE),
                             ranking_log_prob(MASKED_LOGITS, np.array([5, 0]), where=WHERE),
                             rtol=1e-6)
  sample = jax.jit(lambda key, m: sample_rankings(m, key=key, sample_shape=20, k=2))
  np.testing.assert_array_equal(sample(jax.random.key(5), LOGITS),
                                sample_rankings(LOGITS, key=jax.random.key(5), sample_shape=20, k=2))


@pytest.mark.slow
def test_vmap_over_lists_equals_a_loop():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 6)) * 3
  where = rng.random((5, 6)) < 0.7
  rankings = np.stack([rng.permutation(6) for _ in range(5)])
  batched = jax.vmap(lambda m, r, w: ranking_log_prob(m, r, where=w))(logits, rankings, where)
  looped = [ranking_log_prob(m, r, where=w) for m, r, w in zip(logits, rankings, where)]
  np.testing.assert_allclose(batched, looped, rtol=1e-5, atol=1e-6)
  # Leading batch axes without vmap give the same.
  np.testing.assert_allclose(ranking_log_prob(logits, rankings, where=where), looped, rtol=1e-5,
                             atol=1e-6)
  keys = jax.random.split(jax.random.key(0), 5)
  sampled = jax.vmap(lambda key, m, w: sample_rankings(m, key=key, where=w, k=3))(keys, logits, where)
  for key, m, w, s in zip(keys, logits, where, sampled):
    np.testing.assert_array_equal(s, sample_rankings(m, key=key, where=w, k=3))


@settings(max_examples=12)
@given(num_items=st.integers(1, 6), batch=st.integers(1, 2), data=st.data())
@pytest.mark.slow
def test_shapes_permutations_and_bounds(num_items, batch, data):
  k = data.draw(st.one_of(st.none(), st.integers(1, num_items)))
  seed = data.draw(st.integers(0, 2**16))
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch, num_items)) * 5
  where = rng.random((batch, num_items)) < 0.6
  samples = np.asarray(sample_rankings(logits, key=jax.random.key(seed), where=where,
                                       sample_shape=(2,), k=k))
  assert samples.shape == (2, batch, num_items if k is None else k)
  for s, w in zip(samples.reshape(-1, samples.shape[-1]), np.tile(where, (2, 1))):
    assert len(set(s.tolist())) == len(s)
    flags = w[s]
    assert not np.any(~flags[:-1] & flags[1:])  # no padded item before a valid one
  log_probs = np.asarray(ranking_log_prob(logits, samples, where=where))
  assert log_probs.shape == (2, batch)
  assert np.all(np.isfinite(log_probs)) and np.all(log_probs <= 1e-6)


# The distrax class and TensorFlow Probability.


@pytest.mark.slow
def test_distribution_agrees_with_functions_and_tfp():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
  rankings = np.stack([rng.permutation(5) for _ in range(3)])
  pl = PlackettLuce(logits)
  assert pl.event_shape == (5,) and pl.batch_shape == (3,)
  tfp_pl = tfd.PlackettLuce(scores=jnp.exp(logits))
  np.testing.assert_allclose(pl.log_prob(rankings), ranking_log_prob(logits, rankings), rtol=1e-6)
  np.testing.assert_allclose(pl.log_prob(rankings), tfp_pl.log_prob(rankings), rtol=1e-5)
  np.testing.assert_allclose(pl.prob(rankings), np.exp(tfp_pl.log_prob(rankings)), rtol=1e-5)

  key = jax.random.key(7)
  samples = pl.sample(seed=key, sample_shape=(4,))
  assert samples.shape == (4, 3, 5)
  np.testing.assert_array_equal(samples, sample_rankings(logits, key=key, sample_shape=(4,)))
  s2, lp = pl.sample_and_log_prob(seed=key, sample_shape=(4,))
  np.testing.assert_array_equal(s2, samples)
  np.testing.assert_allclose(lp, tfp_pl.log_prob(samples), rtol=1e-5)

  top = pl.sample_top_k(k=2, sample_shape=6, key=key)
  assert top.shape == (6, 3, 2)
  np.testing.assert_allclose(pl.log_prob_top_k(top), ranking_log_prob(logits, top), rtol=1e-6)
  np.testing.assert_allclose(pl[1].log_prob(rankings[1]), pl.log_prob(rankings)[1], rtol=1e-6)


@pytest.mark.slow
def test_distribution_under_jit_and_vmap():
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(4, 5)), jnp.float32)
  where = jnp.asarray(np.arange(5) < np.array([[5], [3], [4], [1]]))
  pl = PlackettLuce(logits, where=where)
  key = jax.random.key(0)
  jitted = jax.jit(lambda d, key: d.sample_and_log_prob(seed=key, sample_shape=3))(pl, key)
  eager = pl.sample_and_log_prob(seed=key, sample_shape=3)
  np.testing.assert_array_equal(jitted[0], eager[0])
  np.testing.assert_allclose(jitted[1], eager[1], rtol=1e-6)
  y = eager[0][0]
  per_list = jax.vmap(lambda m, w, r: PlackettLuce(m, where=w).log_prob(r))(logits, where, y)
  np.testing.assert_allclose(per_list, pl.log_prob(y), rtol=1e-6)


@pytest.mark.slow
def test_distribution_takes_the_key_as_key_or_seed():
  pl = PlackettLuce(jnp.asarray(np.random.default_rng(3).normal(size=(2, 5)), jnp.float32))
  key = jax.random.key(11)
  np.testing.assert_array_equal(pl.sample(key=key, sample_shape=4), pl.sample(seed=key, sample_shape=4))
  by_key, by_seed = (pl.sample_and_log_prob(key=key, sample_shape=2),
                     pl.sample_and_log_prob(seed=key, sample_shape=2))
  np.testing.assert_array_equal(by_key[0], by_seed[0])
  np.testing.assert_array_equal(by_key[1], by_seed[1])
  np.testing.assert_array_equal(pl.sample_top_k(k=2, key=key), pl.sample_top_k(k=2, seed=key))
  np.testing.assert_array_equal(pl.sample_top_k(k=2, key=key),
                                sample_rankings(pl.logits, key=key, k=2))
  with pytest.raises(ValueError, match="key"):
    pl.sample(key=key, seed=key)
  with pytest.raises(ValueError, match="key"):
    pl.sample_top_k(k=2)
  with pytest.raises(ValueError, match="key: expected a typed PRNG key"):
    pl.sample(seed=jax.random.PRNGKey(0))


# Bad inputs.


def test_bad_inputs_raise_value_errors_naming_the_argument():
  with pytest.raises(ValueError, match="rankings"):
    ranking_log_prob(LOGITS, np.array([0, 1, 4, 2]))
  with pytest.raises(ValueError, match="rankings"):
    ranking_log_prob(LOGITS, np.array([0, -1]))
  with pytest.raises(ValueError, match="rankings"):
    ranking_log_prob(LOGITS, np.array([0, 1, 1, 2]))
  with pytest.raises(ValueError, match="rankings"):
    ranking_log_prob(LOGITS, np.array([0.0, 1.0]))
  with pytest.raises(ValueError, match="rankings"):
    ranking_log_prob(LOGITS, np.arange(5))
  with pytest.raises(ValueError, match="where"):
    ranking_log_prob(LOGITS, np.array([0, 1]), where=np.ones(3, bool))
  with pytest.raises(ValueError, match="where"):
    sample_rankings(LOGITS, key=jax.random.key(0), where=np.ones((2, 5), bool))
  with pytest.raises(ValueError, match="where"):
    sample_rankings(LOGITS, key=jax.random.key(0), where=np.ones(4))
  with pytest.raises(ValueError, match="logits"):
    ranking_log_prob(np.array([0.0, np.nan]), np.array([0, 1]))
  with pytest.raises(ValueError, match="logits"):
    sample_rankings(np.array([0.0, -np.inf]), key=jax.random.key(0))
  with pytest.raises(ValueError, match="k"):
    sample_rankings(LOGITS, key=jax.random.key(0), k=5)
  with pytest.raises(ValueError, match="generator"):
    sample_rankings(LOGITS, key=jax.random.key(0), generator="mt19937")
  with pytest.raises(ValueError, match="key: expected a typed PRNG key"):
    sample_rankings(LOGITS, key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="value"):
    PlackettLuce(LOGITS).log_prob(np.array([0, 1]))
  # Padding may hold anything, even NaN, when it is masked.
  assert np.isfinite(ranking_log_prob(np.array([0.0, np.nan]), np.array([0, 1]),
                                      where=np.array([True, False])))


@pytest.mark.slow
def test_indexing_selects_batch_lists():
  logits = jnp.array([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
  where = jnp.array([[True, True, False], [True, True, True]])
  dist = PlackettLuce(logits, where=where)
  ranking = jnp.array([1, 0, 2])
  np.testing.assert_allclose(dist[0].log_prob(ranking),
                             PlackettLuce(logits[0], where=where[0]).log_prob(ranking))
  assert dist[1:].batch_shape == (1,)
  with pytest.raises(ValueError, match="index"):
    dist[..., 0]
