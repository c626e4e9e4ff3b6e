"""Tests for saferl_jax.stats.bounds: closed forms, input checks and coverage by Monte Carlo."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax.stats import confidence_interval, lower_bound, safe_improvement_test

X = np.array([0.2, 0.9, 0.4, 0.7, 0.1, 0.8, 0.5, 0.6])  # n = 8, in [0, 1]
MEAN, STD, N = X.mean(), X.std(ddof=1), len(X)

# Quantiles (scipy.stats, hard-coded so the tests need no scipy).
Z_95, Z_975 = 1.6448536269514722, 1.959963984540054
T7_95, T7_975 = 1.8945786050900062, 2.364624251592784
T3_975 = 3.1824463052837078
T199_975, T199_90 = 1.9719565442517533, 1.2858202092594093

# The t quantile (tensorflow_probability) is slow eagerly; jit the calls used more than once.
lower_bound_jit = jax.jit(lower_bound, static_argnames=("method", "truncate"))
interval_jit = jax.jit(confidence_interval, static_argnames=("method", "truncate"))


@pytest.mark.parametrize("method,half_width", [
    ("normal", Z_95 * STD / math.sqrt(N)),
    ("t", T7_95 * STD / math.sqrt(N)),
    ("hoeffding", 1.0 * math.sqrt(math.log(1 / 0.05) / (2 * N))),
    ("bernstein", math.sqrt(2 * math.log(2 / 0.05) * STD**2 / N)
     + 7 * 1.0 * math.log(2 / 0.05) / (3 * (N - 1))),
], ids=["normal", "t", "hoeffding", "bernstein"])
@pytest.mark.slow
def test_lower_bound_closed_form(method, half_width):
  bound = lower_bound_jit(X, delta=0.05, method=method, max_value=1.0)
  np.testing.assert_allclose(bound, MEAN - half_width, rtol=1e-5)


@pytest.mark.parametrize("method,half_width", [
    ("normal", Z_975 * STD / math.sqrt(N)),
    ("t", T7_975 * STD / math.sqrt(N)),
    ("hoeffding", 2.0 * math.sqrt(math.log(2 / 0.05) / (2 * N))),
    ("bernstein", math.sqrt(2 * math.log(4 / 0.05) * STD**2 / N)
     + 7 * 2.0 * math.log(4 / 0.05) / (3 * (N - 1))),
], ids=["normal", "t", "hoeffding", "bernstein"])
@pytest.mark.slow
def test_confidence_interval_closed_form(method, half_width):
  ci = interval_jit(X, delta=0.05, method=method, max_value=2.0)
  np.testing.assert_allclose(ci.lower, MEAN - half_width, rtol=1e-5)
  np.testing.assert_allclose(ci.upper, MEAN + half_width, rtol=1e-5)


@pytest.mark.slow
def test_t_interval_with_three_degrees_of_freedom():
  x = np.array([1.0, 3.0, 2.0, 6.0])
  ci = interval_jit(x, delta=0.05, method="t")
  half = T3_975 * x.std(ddof=1) / 2.0
  np.testing.assert_allclose(ci.lower, x.mean() - half, rtol=1e-5)
  np.testing.assert_allclose(ci.upper, x.mean() + half, rtol=1e-5)


@pytest.mark.slow
def test_docstring_examples():
  x = jnp.array([0., 1., 0., 1.])
  np.testing.assert_allclose(lower_bound(x, method="hoeffding", max_value=1.0),
                             0.5 - math.sqrt(math.log(20) / 8), rtol=1e-5)


@pytest.mark.slow
def test_smaller_delta_gives_a_lower_bound():
  bounds = [float(lower_bound(X, delta=d, method="bernstein", max_value=1.0))
            for d in (0.2, 0.05, 0.01)]
  assert bounds[0] > bounds[1] > bounds[2]


@pytest.mark.parametrize("method", ["hoeffding", "bernstein"])
def test_bounded_methods_need_max_value(method):
  with pytest.raises(ValueError, match="max_value"):
    lower_bound(X, method=method)
  with pytest.raises(ValueError, match="max_value"):
    confidence_interval(X, method=method)
  with pytest.raises(ValueError, match="max_value"):
    lower_bound(X, method=method, max_value=0.0)


@pytest.mark.parametrize("method", ["hoeffding", "bernstein"])
def test_samples_outside_the_range_raise_unless_truncated(method):
  x = np.array([0.5, 1.5, -0.2, 0.3])
  with pytest.raises(ValueError, match="samples"):
    lower_bound(x, method=method, max_value=1.0)
  with pytest.raises(ValueError, match="samples"):
    confidence_interval(x, method=method, max_value=1.0)
  truncated = lower_bound(x, method=method, max_value=1.0, truncate=True)
  np.testing.assert_allclose(truncated, lower_bound(np.clip(x, 0, 1), method=method,
                                                    max_value=1.0), rtol=1e-6)


def test_normal_and_t_need_no_range():
  x = np.array([-3.0, 5.0, 2.0, 10.0])
  assert np.isfinite(lower_bound(x, method="normal"))


@pytest.mark.parametrize("kwargs,argument", [
    (dict(samples=X, method="wald"), "method"),
    (dict(samples=X[:1]), "samples"),
    (dict(samples=X.reshape(2, 4)), "samples"),
    (dict(samples=np.array([0.1, np.nan, 0.3])), "samples"),
    (dict(samples=np.array([0.1, np.inf, 0.3]), method="normal"), "samples"),
    (dict(samples=X, delta=0.0), "delta"),
    (dict(samples=X, delta=-0.1), "delta"),
])
def test_lower_bound_bad_inputs(kwargs, argument):
  samples = kwargs.pop("samples")
  with pytest.raises(ValueError, match=argument):
    lower_bound(samples, **kwargs)


def test_confidence_interval_bad_delta():
  with pytest.raises(ValueError, match="delta"):
    confidence_interval(X, delta=0.0)


def test_delta_of_one_or_more_raises():
  with pytest.raises(ValueError, match="delta"):
    lower_bound(X, delta=1.5, method="normal")


@pytest.mark.slow
def test_jit_and_vmap_equal_eager():
  xs = np.random.default_rng(0).uniform(size=(3, 20))
  for method in ("normal", "hoeffding", "bernstein"):
    f = functools.partial(lower_bound, method=method, max_value=1.0)
    batched = jax.vmap(f)(xs)
    for b in range(3):
      np.testing.assert_allclose(batched[b], f(xs[b]), rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(jax.jit(f)(xs[b]), f(xs[b]), rtol=1e-5, atol=1e-6)


# Coverage by Monte Carlo: Bernoulli(0.3) samples of n = 200, 2000 trials (vmapped).

P_TRUE, N_MC, TRIALS = 0.3, 200, 2000


@pytest.fixture(scope="module")
def bernoulli_samples():
  keys = jax.random.split(jax.random.key(0), TRIALS)
  return jax.vmap(lambda k: jax.random.bernoulli(k, P_TRUE, (N_MC,)).astype(jnp.float32))(keys)


def binomial_pmf(k, n, p):
  return math.comb(n, k) * p**k * (1 - p)**(n - k)


def exact_t_miss(quantile, two_sided):
  """Exact miss probability of the t bound for Binomial(200, 0.3), summing over k."""
  miss = 0.0
  for k in range(N_MC + 1):
    m = k / N_MC
    s = math.sqrt(m * (1 - m) * N_MC / (N_MC - 1))
    error = abs(m - P_TRUE) if two_sided else m - P_TRUE
    if error > quantile * s / math.sqrt(N_MC):
      miss += binomial_pmf(k, N_MC, P_TRUE)
  return miss


@pytest.mark.slow
def test_t_interval_coverage(bernoulli_samples):
  ci = jax.vmap(functools.partial(confidence_interval, delta=0.05, method="t"))(
      bernoulli_samples)
  covered = np.mean((np.asarray(ci.lower) <= P_TRUE) & (P_TRUE <= np.asarray(ci.upper)))
  exact = 1.0 - exact_t_miss(T199_975, two_sided=True)
  assert abs(exact - 0.95) < 0.01  # the t interval is nearly exact at n = 200
  assert abs(covered - exact) <= 4 * math.sqrt(exact * (1 - exact) / TRIALS)


@pytest.mark.parametrize("method", ["hoeffding", "bernstein"])
@pytest.mark.slow
def test_high_confidence_lower_bound_fails_at_most_delta(bernoulli_samples, method):
  delta = 0.05
  bounds = jax.vmap(functools.partial(lower_bound, delta=delta, method=method, max_value=1.0))(
      bernoulli_samples)
  failures = np.mean(np.asarray(bounds) > P_TRUE)
  assert failures <= delta + 4 * math.sqrt(delta * (1 - delta) / TRIALS)
  # Not vacuous: the bound is informative (above 0) on average.
  assert np.mean(np.asarray(bounds)) > 0.1


def test_t_lower_bound_fails_about_delta(bernoulli_samples):
  delta = 0.1
  bounds = jax.vmap(functools.partial(lower_bound, delta=delta, method="t"))(bernoulli_samples)
  failures = np.mean(np.asarray(bounds) > P_TRUE)
  exact = exact_t_miss(T199_90, two_sided=False)
  assert abs(exact - delta) < 0.02  # asymptotic: about delta, not far less
  assert abs(failures - exact) <= 4 * math.sqrt(exact * (1 - exact) / TRIALS)


# The safe improvement test.


@pytest.mark.slow
def test_safe_improvement_test_under_jit():
  x = np.random.default_rng(1).uniform(0.4, 1.0, size=50)
  f = jax.jit(functools.partial(safe_improvement_test, delta=0.05, method="hoeffding",
                                max_value=1.0))
  for baseline, deploy in ((0.3, True), (0.6, False)):
    out = f(x, baseline)
    assert out.deploy.dtype == jnp.bool_
    assert bool(out.deploy) is deploy
    eager = safe_improvement_test(x, baseline, delta=0.05, method="hoeffding", max_value=1.0)
    np.testing.assert_allclose(out.lower_bound, eager.lower_bound, rtol=1e-6)
    np.testing.assert_allclose(out.baseline_value, baseline, rtol=1e-6)
  # The bound itself: mean - sqrt(ln(20) / 100).
  np.testing.assert_allclose(f(x, 0.0).lower_bound, x.mean() - math.sqrt(math.log(20) / 100),
                             rtol=1e-5)


@pytest.mark.slow
def test_safe_improvement_test_vmapped_baselines():
  x = jnp.asarray(np.random.default_rng(2).normal(1.0, 0.5, size=40), jnp.float32)
  baselines = jnp.array([0.0, 0.5, 1.0, 2.0])
  out = jax.vmap(lambda b: safe_improvement_test(x, b, method="normal"))(baselines)
  bound = float(lower_bound(x, method="normal"))
  np.testing.assert_array_equal(out.deploy, np.asarray(baselines) < bound)


def test_contributions_near_1e20_give_finite_bounds():
  # A propensity of 1e-20 makes a contribution near 1e20; its square overflows float32, the
  # std computed on samples / max|X| does not.
  samples = jnp.array([8e19, 0.0, 1.6, 0.4], jnp.float32)
  for method in ("normal", "t"):
    interval = confidence_interval(samples, method=method)
    assert np.isfinite(float(interval.lower)) and np.isfinite(float(interval.upper))
    assert float(interval.lower) < float(jnp.mean(samples)) < float(interval.upper)
  assert np.isfinite(float(lower_bound(samples, method="bernstein", max_value=1e20)))
  with pytest.raises(ValueError, match="^baseline_value:"):
    safe_improvement_test(samples, jnp.nan)
