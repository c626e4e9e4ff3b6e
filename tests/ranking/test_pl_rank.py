"""Tests for saferl_jax.ranking.pl_rank: PL-Rank-3, PL-Rank-1 and REINFORCE against the exact
gradient by enumerating every ranking of a small list, their variances, masking, jit/vmap and
input checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saferl_jax.ranking.pl_rank import (exact_gradient, exact_objective, pl_rank_1_gradient,
                                        pl_rank_gradient, reinforce_gradient)

ESTIMATORS = [pl_rank_gradient, pl_rank_1_gradient, reinforce_gradient]
IDS = ["pl_rank_3", "pl_rank_1", "reinforce"]

# A small list: D = 5 items, K = 3 ranks with DCG weights.
LOGITS = jnp.array([0.3, -0.5, 1.0, 0.1, -1.2])
RELEVANCE = jnp.array([1.0, 0.0, 2.0, 0.5, 1.5])
RANK_WEIGHTS = 1.0 / jnp.log2(jnp.arange(3) + 2.0)
MASKS = {
    "none": None,
    "one_masked": jnp.array([True, True, False, True, True]),
    "fewer_valid_than_K": jnp.array([True, False, False, True, False]),
}
NUM_KEYS, NUM_SAMPLES = 2000, 10


@functools.lru_cache(maxsize=None)
def batched(estimator, num_samples):
  """estimator over a batch of keys, jitted once per estimator and sample count (and shape)."""
  return jax.jit(jax.vmap(
      lambda k, m, r, t, w: estimator(m, r, t, key=k, num_samples=num_samples, where=w),
      in_axes=(0, None, None, None, None)))


def estimates(estimator, logits, relevance, rank_weights, *, where=None, num_keys=NUM_KEYS,
              num_samples=NUM_SAMPLES, seed=0):
  """[num_keys, D] estimates, one per key."""
  keys = jax.random.split(jax.random.key(seed), num_keys)
  where = jnp.ones(jnp.shape(logits), bool) if where is None else where
  fn = batched(estimator, num_samples)
  return np.asarray(fn(keys, logits, relevance, rank_weights, where), np.float64)


def assert_mean_within_stderr(samples, expected, num_se=4.0):
  """Each coordinate's mean over keys within num_se standard errors of `expected`."""
  mean = samples.mean(0)
  stderr = samples.std(0, ddof=1) / np.sqrt(samples.shape[0])
  # A coordinate with no spread (a masked item, or a constant) must match to float precision.
  tolerance = num_se * stderr + 1e-6
  assert np.all(np.abs(mean - np.asarray(expected)) <= tolerance), (mean, expected, stderr)


# Exact values by enumeration.


@pytest.mark.slow
def test_exact_objective_closed_forms():
  # One rank, two items: R = sigma(m0 - m1) rho0 + sigma(m1 - m0) rho1.
  m = jnp.array([0.7, -0.2])
  p0 = 1 / (1 + np.exp(-0.9))
  np.testing.assert_allclose(exact_objective(m, jnp.array([2.0, 1.0]), jnp.ones(1)),
                             2 * p0 + (1 - p0), rtol=1e-6)
  # Every valid item ranked with weight 1: R = sum of valid relevance, whatever the logits.
  where = jnp.array([True, True, False, True, True])
  np.testing.assert_allclose(exact_objective(LOGITS, RELEVANCE, jnp.ones(5), where=where),
                             float(jnp.sum(jnp.where(where, RELEVANCE, 0.0))), rtol=1e-6)
  np.testing.assert_allclose(exact_gradient(LOGITS, RELEVANCE, jnp.ones(5)), 0.0, atol=1e-5)
  # Uniform logits: each item's expected rank weight is mean(theta) * K / D.
  np.testing.assert_allclose(exact_objective(jnp.zeros(5), RELEVANCE, RANK_WEIGHTS),
                             float(jnp.sum(RELEVANCE) * jnp.sum(RANK_WEIGHTS) / 5), rtol=1e-6)


@pytest.mark.slow
def test_exact_gradient_matches_finite_differences():
  eps = 1e-2
  for where in MASKS.values():
    grad = exact_gradient(LOGITS, RELEVANCE, RANK_WEIGHTS, where=where)
    basis = np.eye(5, dtype=np.float32)
    numeric = [(exact_objective(LOGITS + eps * e, RELEVANCE, RANK_WEIGHTS, where=where)
                - exact_objective(LOGITS - eps * e, RELEVANCE, RANK_WEIGHTS, where=where))
               / (2 * eps) for e in basis]
    np.testing.assert_allclose(grad, numeric, atol=2e-4)


@pytest.mark.slow
def test_exact_masking_equals_removing_the_item():
  where = MASKS["one_masked"]
  keep = np.flatnonzero(np.asarray(where))
  full = exact_gradient(LOGITS, RELEVANCE, RANK_WEIGHTS, where=where)
  reduced = exact_gradient(LOGITS[keep], RELEVANCE[keep], RANK_WEIGHTS)
  np.testing.assert_allclose(full[keep], reduced, atol=1e-6)
  assert float(full[2]) == 0.0


# Unbiasedness: the mean over many keys against the exact gradient.


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=IDS)
@pytest.mark.slow
def test_unbiased_against_enumeration(estimator, mask_name):
  where = MASKS[mask_name]
  exact = exact_gradient(LOGITS, RELEVANCE, RANK_WEIGHTS, where=where)
  samples = estimates(estimator, LOGITS, RELEVANCE, RANK_WEIGHTS, where=where)
  assert_mean_within_stderr(samples, exact)


@pytest.mark.slow
def test_unbiasedness_test_detects_a_wrong_gradient():
  # The same check rejects a wrong target: the exact gradient under other relevance labels.
  wrong = exact_gradient(LOGITS, RELEVANCE[::-1], RANK_WEIGHTS)
  samples = estimates(pl_rank_gradient, LOGITS, RELEVANCE, RANK_WEIGHTS)
  with pytest.raises(AssertionError):
    assert_mean_within_stderr(samples, wrong)


@pytest.mark.slow
def test_gradient_sums_to_zero():
  # PL is invariant to adding a constant to every logit, so the gradient sums to 0: exactly for
  # the exact gradient, in expectation for PL-Rank-3 (a single estimate need not).
  for where in MASKS.values():
    assert abs(float(jnp.sum(exact_gradient(LOGITS, RELEVANCE, RANK_WEIGHTS, where=where)))) < 1e-6
  totals = estimates(pl_rank_gradient, LOGITS, RELEVANCE, RANK_WEIGHTS).sum(1, keepdims=True)
  assert_mean_within_stderr(totals, [0.0])


# Variance.


def total_variance(estimator, logits, relevance, rank_weights, num_keys=500, num_samples=10):
  return estimates(estimator, logits, relevance, rank_weights, num_keys=num_keys,
                   num_samples=num_samples, seed=1).var(0, ddof=1).sum()


def ltr_list(num_items=20, cutoff=5, seed=0):
  """A list as in learning to rank: sparse graded relevance, a near-uniform initial policy."""
  rng = np.random.default_rng(seed)
  relevance = rng.integers(0, 5, num_items) * (rng.random(num_items) < 0.3)
  return (jnp.asarray(0.5 * rng.normal(size=num_items), jnp.float32),
          jnp.asarray(relevance, jnp.float32), 1.0 / jnp.log2(jnp.arange(cutoff) + 2.0))


@pytest.mark.slow
def test_pl_rank_3_has_lower_variance_than_reinforce_and_pl_rank_1():
  logits, relevance, rank_weights = ltr_list()
  var3 = total_variance(pl_rank_gradient, logits, relevance, rank_weights)
  var1 = total_variance(pl_rank_1_gradient, logits, relevance, rank_weights)
  var_reinforce = total_variance(reinforce_gradient, logits, relevance, rank_weights)
  # Measured: about 0.44, 0.72 and 1.12; 500 keys put the variances within about +-10%.
  assert var3 < 0.8 * var1
  assert var3 < 0.6 * var_reinforce


@pytest.mark.slow
def test_pl_rank_3_never_worse_than_pl_rank_1_on_the_small_list():
  # PL-Rank-3 replaces PL-Rank-1's sampled own-rank reward by its conditional expectation.
  for relevance in (RELEVANCE, jnp.array([0.0, 0.0, 1.0, 0.0, 3.0])):
    assert (total_variance(pl_rank_gradient, LOGITS, relevance, RANK_WEIGHTS)
            < total_variance(pl_rank_1_gradient, LOGITS, relevance, RANK_WEIGHTS))


@pytest.mark.slow
def test_leave_one_out_reinforce_wins_on_a_short_list_with_dense_relevance():
  # PL-Rank has no baseline: when every item is relevant, REINFORCE's leave-one-out baseline
  # removes the common reward level and wins (measured 0.07 against 0.16 at N = 10).
  assert (total_variance(reinforce_gradient, LOGITS, RELEVANCE, RANK_WEIGHTS)
          < total_variance(pl_rank_gradient, LOGITS, RELEVANCE, RANK_WEIGHTS))


# Masks, extremes, determinism, jit and vmap.


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=IDS)
@pytest.mark.slow
def test_masked_items_get_zero_gradient_and_their_logits_do_not_matter(estimator):
  where = MASKS["one_masked"]
  key = jax.random.key(3)
  grad = estimator(LOGITS, RELEVANCE, RANK_WEIGHTS, key=key, num_samples=4, where=where)
  assert float(grad[2]) == 0.0
  for masked_logit in (1e30, jnp.nan, -jnp.inf):
    other = estimator(LOGITS.at[2].set(masked_logit), RELEVANCE, RANK_WEIGHTS, key=key,
                      num_samples=4, where=where)
    np.testing.assert_allclose(other, grad, atol=1e-6)


@pytest.mark.parametrize("estimator", ESTIMATORS + [None], ids=IDS + ["exact"])
@pytest.mark.slow
def test_all_masked_gives_zeros_without_nan(estimator):
  where = jnp.zeros(5, bool)
  if estimator is None:
    grad = exact_gradient(LOGITS, RELEVANCE, RANK_WEIGHTS, where=where)
    assert float(exact_objective(LOGITS, RELEVANCE, RANK_WEIGHTS, where=where)) == 0.0
  else:
    grad = estimator(LOGITS, RELEVANCE, RANK_WEIGHTS, key=jax.random.key(0), num_samples=4,
                     where=where)
  np.testing.assert_array_equal(grad, np.zeros(5))


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=IDS)
def test_huge_logits_stay_finite(estimator):
  logits = jnp.array([1e4, -1e4, 300.0, -300.0, 80.0])
  grad = estimator(logits, RELEVANCE, RANK_WEIGHTS, key=jax.random.key(0), num_samples=4)
  assert np.all(np.isfinite(grad))
  # A deterministic policy: every sample is the same ranking, the gradient vanishes.
  np.testing.assert_allclose(estimator(100 * LOGITS, RELEVANCE, RANK_WEIGHTS,
                                       key=jax.random.key(0), num_samples=4), 0.0, atol=1e-5)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=IDS)
@pytest.mark.slow
def test_same_key_same_result_and_jit_equals_eager(estimator):
  key = jax.random.key(7)
  where = MASKS["one_masked"]
  eager = estimator(LOGITS, RELEVANCE, RANK_WEIGHTS, key=key, num_samples=4, where=where)
  again = estimator(LOGITS, RELEVANCE, RANK_WEIGHTS, key=key, num_samples=4, where=where)
  jitted = jax.jit(lambda m, r, t, k, w: estimator(m, r, t, key=k, num_samples=4, where=w))(
      LOGITS, RELEVANCE, RANK_WEIGHTS, key, where)
  np.testing.assert_array_equal(eager, again)
  np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-6)
  other = estimator(LOGITS, RELEVANCE, RANK_WEIGHTS, key=jax.random.key(8), num_samples=4,
                    where=where)
  assert not np.allclose(other, eager)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=IDS)
@pytest.mark.slow
def test_vmap_over_queries_equals_a_loop(estimator):
  rng = np.random.default_rng(0)
  batch = 4
  logits = jnp.asarray(rng.normal(size=(batch, 5)), jnp.float32)
  relevance = jnp.asarray(rng.integers(0, 3, size=(batch, 5)), jnp.float32)
  where = jnp.asarray(rng.random((batch, 5)) < 0.8).at[:, 0].set(True)
  keys = jax.random.split(jax.random.key(0), batch)
  batched = jax.vmap(lambda m, r, k, w: estimator(m, r, RANK_WEIGHTS, key=k, num_samples=4,
                                                  where=w))(logits, relevance, keys, where)
  looped = [estimator(logits[i], relevance[i], RANK_WEIGHTS, key=keys[i], num_samples=4,
                      where=where[i]) for i in range(batch)]
  np.testing.assert_allclose(batched, np.stack(looped), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=IDS)
@pytest.mark.slow
def test_leading_batch_axes_equal_a_loop_with_split_keys(estimator):
  # Lists [2, 3, D] in one call: list i of the flattened batch uses split(key, 6)[i].
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 3, 5)), jnp.float32)
  relevance = jnp.asarray(rng.integers(0, 3, size=(2, 3, 5)), jnp.float32)
  where = jnp.asarray(rng.random((2, 3, 5)) < 0.8).at[..., 0].set(True)
  key = jax.random.key(3)
  batched = estimator(logits, relevance, RANK_WEIGHTS, key=key, num_samples=4, where=where)
  assert batched.shape == (2, 3, 5)
  keys = jax.random.split(key, 6)
  looped = [estimator(m, r, RANK_WEIGHTS, key=k, num_samples=4, where=w) for m, r, k, w in
            zip(logits.reshape(6, 5), relevance.reshape(6, 5), keys, where.reshape(6, 5))]
  np.testing.assert_allclose(batched, np.stack(looped).reshape(2, 3, 5), rtol=1e-5, atol=1e-6)
  # A mask [D] is shared by every list; jit of the batched call equals eager.
  shared = estimator(logits, relevance, RANK_WEIGHTS, key=key, num_samples=4, where=where[0, 0])
  np.testing.assert_allclose(
      shared, estimator(logits, relevance, RANK_WEIGHTS, key=key, num_samples=4,
                        where=jnp.broadcast_to(where[0, 0], logits.shape)), rtol=1e-6)
  jitted = jax.jit(lambda m, r, k: estimator(m, r, RANK_WEIGHTS, key=k, num_samples=4,
                                             where=where))(logits, relevance, key)
  np.testing.assert_allclose(jitted, batched, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_exact_functions_take_leading_batch_axes():
  logits = jnp.stack([jnp.stack([LOGITS, -LOGITS]), jnp.stack([2 * LOGITS, LOGITS[::-1]])])
  relevance = jnp.broadcast_to(RELEVANCE, logits.shape)
  where = jnp.array([True, True, False, True, True])
  values = exact_objective(logits, relevance, RANK_WEIGHTS, where=where)
  grads = exact_gradient(logits, relevance, RANK_WEIGHTS, where=where)
  assert values.shape == (2, 2) and grads.shape == (2, 2, 5)
  for i in range(2):
    for j in range(2):
      np.testing.assert_allclose(values[i, j], exact_objective(logits[i, j], RELEVANCE, RANK_WEIGHTS,
                                                               where=where), rtol=1e-6)
      np.testing.assert_allclose(grads[i, j], exact_gradient(logits[i, j], RELEVANCE, RANK_WEIGHTS,
                                                             where=where), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_exact_gradient_vmaps_and_jits():
  logits = jnp.stack([LOGITS, -LOGITS])
  batched = jax.jit(jax.vmap(lambda m: exact_gradient(m, RELEVANCE, RANK_WEIGHTS)))(logits)
  for i in range(2):
    np.testing.assert_allclose(batched[i], exact_gradient(logits[i], RELEVANCE, RANK_WEIGHTS),
                               rtol=1e-5, atol=1e-6)


@settings(max_examples=15)
@given(data=st.data())
@pytest.mark.slow
def test_property_masks_and_finiteness(data):
  # The list shape is fixed (D = 5, K = 3) so that every example reuses one compilation; the
  # mask, the logits' scale and the values vary. Other shapes are covered by the tests above.
  mask = np.array(data.draw(st.lists(st.booleans(), min_size=5, max_size=5)))
  scale = data.draw(st.sampled_from([0.0, 1.0, 10.0, 1e3]))
  seed = data.draw(st.integers(0, 2**16))
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(scale * rng.normal(size=5), jnp.float32)
  relevance = jnp.asarray(rng.random(5) - 0.3, jnp.float32)
  rank_weights = jnp.asarray(rng.random(3), jnp.float32)
  where = jnp.asarray(mask)
  for estimator in ESTIMATORS:
    grad = batched(estimator, 4)(jax.random.key(seed)[None], logits, relevance, rank_weights,
                                 where)[0]
    assert grad.shape == (5,)
    assert np.all(np.isfinite(grad))
    assert np.all(np.asarray(grad)[~mask] == 0.0)
  exact = exact_gradient(logits, relevance, rank_weights, where=where)
  assert np.all(np.isfinite(exact)) and np.all(np.asarray(exact)[~mask] == 0.0)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=IDS)
@pytest.mark.slow
def test_single_item_list(estimator):
  grad = estimator(jnp.array([0.3]), jnp.array([1.0]), jnp.array([1.0]), key=jax.random.key(0),
                   num_samples=2)
  np.testing.assert_array_equal(grad, [0.0])
  np.testing.assert_array_equal(exact_gradient(jnp.array([0.3]), jnp.array([1.0]), jnp.ones(1)),
                                [0.0])


# Bad inputs.


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=IDS)
def test_bad_inputs_raise_value_error(estimator):
  key = jax.random.key(0)
  ok = dict(key=key, num_samples=4)
  with pytest.raises(ValueError, match="rank_weights"):  # K > D
    estimator(LOGITS, RELEVANCE, jnp.ones(6), **ok)
  with pytest.raises(ValueError, match="rank_weights"):
    estimator(LOGITS, RELEVANCE, jnp.ones((3, 1)), **ok)
  with pytest.raises(ValueError, match="relevance"):
    estimator(LOGITS, RELEVANCE[:4], RANK_WEIGHTS, **ok)
  with pytest.raises(ValueError, match="logits"):  # a scalar is not a list
    estimator(LOGITS[0], RELEVANCE[0], RANK_WEIGHTS, **ok)
  with pytest.raises(ValueError, match="relevance"):  # batch axes must agree
    estimator(jnp.stack([LOGITS] * 2), jnp.stack([RELEVANCE] * 3), RANK_WEIGHTS, **ok)
  with pytest.raises(ValueError, match="key: expected a typed PRNG key"):
    estimator(LOGITS, RELEVANCE, RANK_WEIGHTS, key=jax.random.PRNGKey(0), num_samples=4)
  with pytest.raises(ValueError, match="where"):
    estimator(LOGITS, RELEVANCE, RANK_WEIGHTS, where=jnp.ones(4, bool), **ok)
  with pytest.raises(ValueError, match="where"):
    estimator(LOGITS, RELEVANCE, RANK_WEIGHTS, where=jnp.ones(5), **ok)
  with pytest.raises(ValueError, match="relevance"):
    estimator(LOGITS, RELEVANCE.at[0].set(jnp.nan), RANK_WEIGHTS, **ok)
  with pytest.raises(ValueError, match="logits"):
    estimator(LOGITS.at[0].set(jnp.inf), RELEVANCE, RANK_WEIGHTS, **ok)
  for bad in (0, -1, 2.0):
    with pytest.raises(ValueError, match="num_samples"):
      estimator(LOGITS, RELEVANCE, RANK_WEIGHTS, key=key, num_samples=bad)


@pytest.mark.slow
def test_reinforce_needs_two_samples_for_its_baseline():
  with pytest.raises(ValueError, match="num_samples.*leave-one-out"):
    reinforce_gradient(LOGITS, RELEVANCE, RANK_WEIGHTS, key=jax.random.key(0), num_samples=1)
  # The PL-Rank estimators work from a single sample.
  for estimator in (pl_rank_gradient, pl_rank_1_gradient):
    grad = estimator(LOGITS, RELEVANCE, RANK_WEIGHTS, key=jax.random.key(0), num_samples=1)
    assert grad.shape == (5,)


def test_exact_refuses_long_lists_and_long_cutoffs():
  with pytest.raises(ValueError, match="D <= 8"):
    exact_objective(jnp.zeros(9), jnp.zeros(9), jnp.ones(2))
  with pytest.raises(ValueError, match="rank_weights"):
    exact_gradient(LOGITS, RELEVANCE, jnp.ones(6))
