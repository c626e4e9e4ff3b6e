"""Tests for saferl_jax.stats.bootstrap: the index generators and the vmapped bootstrap."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax.stats import (bootstrap_interval, bootstrap_replicates, percentile_interval,
                              resample_indices)

GENERATORS = ["hash", "threefry"]


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.slow
def test_resample_indices_shape_range_and_reproducibility(generator):
  idx = resample_indices(jax.random.key(0), num_resamples=7, num_rows=13, generator=generator)
  assert idx.shape == (7, 13)
  assert jnp.issubdtype(idx.dtype, jnp.integer)
  assert int(idx.min()) >= 0 and int(idx.max()) < 13
  np.testing.assert_array_equal(idx, resample_indices(jax.random.key(0), num_resamples=7,
                                                      num_rows=13, generator=generator))
  other = resample_indices(jax.random.key(1), num_resamples=7, num_rows=13, generator=generator)
  assert np.mean(np.asarray(idx) != np.asarray(other)) > 0.5


@pytest.mark.slow
def test_resample_indices_default_is_hash_and_differs_from_threefry():
  key = jax.random.key(3)
  np.testing.assert_array_equal(resample_indices(key, num_resamples=4, num_rows=50),
                                resample_indices(key, num_resamples=4, num_rows=50,
                                                 generator="hash"))
  assert not np.array_equal(resample_indices(key, num_resamples=4, num_rows=50,
                                             generator="threefry"),
                            resample_indices(key, num_resamples=4, num_rows=50, generator="hash"))


@pytest.mark.slow
def test_resample_indices_refuse_legacy_keys_and_take_them_wrapped():
  with pytest.raises(ValueError, match="key: expected a typed PRNG key.*wrap_key_data"):
    resample_indices(jax.random.PRNGKey(0), num_resamples=3, num_rows=20)
  idx = resample_indices(jax.random.wrap_key_data(jax.random.PRNGKey(0)), num_resamples=3,
                         num_rows=20)
  np.testing.assert_array_equal(idx, resample_indices(jax.random.key(0), num_resamples=3,
                                                      num_rows=20))


@pytest.mark.slow
def test_resample_indices_of_one_row():
  np.testing.assert_array_equal(resample_indices(jax.random.key(0), num_resamples=3, num_rows=1),
                                np.zeros((3, 1)))


def test_resample_indices_unknown_generator():
  with pytest.raises(ValueError, match="generator"):
    resample_indices(jax.random.key(0), num_resamples=2, num_rows=5, generator="mersenne")


def test_resample_indices_negative_count_raises_value_error():
  with pytest.raises(ValueError, match="num_resamples"):
    resample_indices(jax.random.key(0), num_resamples=-1, num_rows=5)


# Statistical quality of the indices: 200 resamples of n = 1000.

B_Q, N_Q = 200, 1000


@pytest.fixture(scope="module", params=GENERATORS)
def indices(request):
  return np.asarray(resample_indices(jax.random.key(42), num_resamples=B_Q, num_rows=N_Q,
                                     generator=request.param))


@pytest.mark.slow
def test_indices_are_uniform(indices):
  # Pearson chi-square over all 200 000 indices; under uniformity chi2 has mean df
  # and standard deviation sqrt(2 df).
  counts = np.bincount(indices.ravel(), minlength=N_Q)
  expected = B_Q
  chi2 = np.sum((counts - expected)**2 / expected)
  df = N_Q - 1
  assert abs(chi2 - df) <= 5 * math.sqrt(2 * df)


@pytest.mark.slow
def test_per_resample_counts_have_multinomial_variance(indices):
  # Within one resample the counts are Multinomial(n, 1/n): each has variance 1 - 1/n.
  counts = np.stack([np.bincount(row, minlength=N_Q) for row in indices])
  per_resample = counts.var(axis=1)  # mean count is exactly 1
  standard_error = per_resample.std(ddof=1) / math.sqrt(B_Q)
  assert abs(per_resample.mean() - (1 - 1 / N_Q)) <= 4 * standard_error


@pytest.mark.slow
def test_resamples_are_uncorrelated(indices):
  # Counts of different resamples are independent: correlation 0, standard
  # deviation about 1/sqrt(n) per pair.
  counts = np.stack([np.bincount(row, minlength=N_Q) for row in indices]).astype(float)
  corr = np.corrcoef(counts)
  consecutive = np.diag(corr, k=1)
  assert abs(consecutive.mean()) <= 4 / math.sqrt(N_Q * len(consecutive))
  # No pair stands out: P(|Z| > 6) * 19900 pairs is about 4e-5 under independence.
  off_diagonal = corr[np.triu_indices(B_Q, k=1)]
  assert np.abs(off_diagonal).max() < 6 / math.sqrt(N_Q)


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("n", [1000, 1024])
@pytest.mark.slow
def test_number_of_distinct_rows_varies_as_for_a_multinomial(generator, n):
  # The number of rows left out of a resample, E = sum_j 1{count_j = 0}, has
  # Var(E) = n (n-1) (1-2/n)^n + n (1-1/n)^n - n^2 (1-1/n)^(2n). Its sample variance
  # over B resamples has relative standard error about sqrt(2 / (B - 1)). (A
  # generator that permuted one fixed multiset of counts, as (hash(j) xor s) mod n
  # does for n a power of two, would give variance 0.)
  idx = np.asarray(resample_indices(jax.random.key(7), num_resamples=B_Q, num_rows=n,
                                    generator=generator))
  left_out = np.array([n - len(np.unique(row)) for row in idx])
  variance = n * (n - 1) * (1 - 2 / n)**n + n * (1 - 1 / n)**n - n**2 * (1 - 1 / n)**(2 * n)
  np.testing.assert_allclose(left_out.mean(), n * (1 - 1 / n)**n,
                             atol=4 * math.sqrt(variance / B_Q))
  assert abs(left_out.var(ddof=1) / variance - 1) <= 4 * math.sqrt(2 / (B_Q - 1))


def test_consecutive_positions_are_uncorrelated(indices):
  # Lag-1 correlation of the index sequence within resamples.
  x = indices.astype(float)
  lag = np.corrcoef(x[:, :-1].ravel(), x[:, 1:].ravel())[0, 1]
  assert abs(lag) <= 4 / math.sqrt(x[:, 1:].size)


# bootstrap_replicates and the intervals.


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.slow
def test_bootstrap_std_of_the_mean(generator):
  # The bootstrap variance of the mean is exactly var(x, ddof=0) / n; with B
  # resamples, the sample std of the replicates has relative error about 1/sqrt(2(B-1)).
  x = np.random.default_rng(0).exponential(size=100)
  num_resamples = 2000
  replicates = bootstrap_replicates(jnp.mean, jnp.asarray(x, jnp.float32),
                                    key=jax.random.key(1), num_resamples=num_resamples,
                                    generator=generator)
  assert replicates.shape == (num_resamples,)
  target = x.std() / math.sqrt(len(x))
  relative_error = 1 / math.sqrt(2 * (num_resamples - 1))
  assert abs(float(np.std(replicates, ddof=1)) / target - 1) <= 4 * relative_error
  # And the replicates centre on the sample mean.
  assert abs(float(np.mean(replicates)) - x.mean()) <= 4 * target / math.sqrt(num_resamples)


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.slow
def test_bootstrap_replicates_equal_a_loop_over_resample_indices(generator):
  rng = np.random.default_rng(2)
  data = {"x": jnp.asarray(rng.normal(size=(30,)), jnp.float32),
          "y": jnp.asarray(rng.normal(size=(30, 2)), jnp.float32)}
  statistic = lambda d: jnp.sum(d["x"] * d["y"][:, 0]) / jnp.sum(d["y"][:, 1] ** 2)
  key = jax.random.key(3)
  # 7 resamples in batches of 3: the last batch is partial.
  replicates = bootstrap_replicates(statistic, data, key=key, num_resamples=7, batch_size=3,
                                    generator=generator)
  x, y = np.asarray(data["x"]), np.asarray(data["y"])
  expected = [np.sum(x[i] * y[i, 0]) / np.sum(y[i, 1]**2)
              for i in np.asarray(resample_indices(key, num_resamples=7, num_rows=30,
                                                   generator=generator))]
  np.testing.assert_allclose(replicates, expected, rtol=1e-5)


@pytest.mark.slow
def test_bootstrap_replicates_do_not_depend_on_batch_size():
  x = jnp.arange(20.0)
  f = lambda b: bootstrap_replicates(jnp.mean, x, key=jax.random.key(4), num_resamples=12,
                                     batch_size=b)
  np.testing.assert_allclose(f(5), f(100), rtol=1e-6)


@pytest.mark.slow
def test_bootstrap_replicates_under_jit():
  x = jnp.asarray(np.random.default_rng(5).normal(size=40), jnp.float32)
  f = lambda x, key: bootstrap_replicates(jnp.median, x, key=key, num_resamples=16)
  np.testing.assert_allclose(jax.jit(f)(x, jax.random.key(6)), f(x, jax.random.key(6)),
                             rtol=1e-6)


@pytest.mark.parametrize("kwargs,argument", [
    (dict(num_resamples=0), "num_resamples"),
    (dict(num_resamples=-3), "num_resamples"),
    (dict(generator="pcg"), "generator"),
])
def test_bootstrap_replicates_bad_arguments(kwargs, argument):
  with pytest.raises(ValueError, match=argument):
    bootstrap_replicates(jnp.mean, jnp.arange(5.0), key=jax.random.key(0), **kwargs)


def test_bootstrap_replicates_bad_data():
  with pytest.raises(ValueError, match="data"):
    bootstrap_replicates(lambda d: d[0].mean(), (jnp.ones(5), jnp.ones(4)),
                         key=jax.random.key(0))
  with pytest.raises(ValueError, match="data"):
    bootstrap_replicates(lambda d: 0.0, {}, key=jax.random.key(0))


def test_bootstrap_replicates_empty_data_raises():
  with pytest.raises(ValueError, match="data"):
    bootstrap_replicates(jnp.mean, jnp.zeros(0), key=jax.random.key(0), num_resamples=4)


def test_percentile_interval_closed_form():
  ci = percentile_interval(jnp.arange(101.0), delta=0.1)
  np.testing.assert_allclose(ci, [5.0, 95.0], rtol=1e-6)
  ci = percentile_interval(jnp.array([3.0, 1.0, 2.0]), delta=0.5)  # linear interpolation
  np.testing.assert_allclose(ci, [1.5, 2.5], rtol=1e-6)


def test_percentile_interval_bad_inputs():
  with pytest.raises(ValueError, match="delta"):
    percentile_interval(jnp.arange(5.0), delta=0.0)
  with pytest.raises(ValueError, match="replicates"):
    percentile_interval(jnp.ones((2, 2)))


def test_percentile_interval_delta_above_one_raises():
  with pytest.raises(ValueError, match="delta"):
    percentile_interval(jnp.arange(5.0), delta=1.5)


@pytest.mark.slow
def test_bootstrap_interval_is_the_percentile_of_the_replicates():
  x = jnp.asarray(np.random.default_rng(7).normal(2.0, 1.0, size=60), jnp.float32)
  key = jax.random.key(8)
  ci = bootstrap_interval(jnp.mean, x, key=key, num_resamples=500, delta=0.1)
  replicates = bootstrap_replicates(jnp.mean, x, key=key, num_resamples=500)
  np.testing.assert_allclose(ci, np.quantile(np.asarray(replicates), [0.05, 0.95]), rtol=1e-5)
  # Close to the normal interval mean +- 1.645 s / sqrt(n). A 5% quantile of B = 500 replicates has
  # Monte Carlo standard error sqrt(0.05 * 0.95 / B) / phi(1.645) * s / sqrt(n) = 0.058 half-widths.
  half = 1.6448536 * float(jnp.std(x)) / math.sqrt(60)
  quantile_se = math.sqrt(0.05 * 0.95 / 500) / 0.10314 * float(jnp.std(x)) / math.sqrt(60)
  np.testing.assert_allclose(ci, [float(x.mean()) - half, float(x.mean()) + half], atol=4 * quantile_se)
