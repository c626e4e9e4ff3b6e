"""Tests for saferl_jax.ope.baseline: the variance-optimal baseline beta* [OB]."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax.ope import (beta_ips, cross_fitted_baselines, logged_rounds, optimal_baseline,
                            snips)


def sample(seed, n=40):
  rng = np.random.default_rng(seed)
  w = rng.lognormal(0.0, 0.8, size=n)
  r = rng.binomial(1, 0.3 + 0.1 * (w > 1)).astype(float)
  return r, w


def beta_ips_variance(r, w, beta):
  return np.var((r - beta) * w + beta, ddof=1)


def test_docstring_example():
  assert float(optimal_baseline(jnp.array([1., 0., 1.]), jnp.array([2., 0., 1.]))) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_is_the_least_squares_slope(seed):
  r, w = sample(seed)
  slope = np.cov(r * w, w)[0, 1] / np.var(w, ddof=1)
  np.testing.assert_allclose(optimal_baseline(r, w), slope, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_minimises_the_beta_ips_variance(seed):
  r, w = sample(seed)
  beta = float(optimal_baseline(r, w))
  best = beta_ips_variance(r, w, beta)
  for offset in np.linspace(-1.0, 1.0, 21):
    if offset != 0:
      assert best < beta_ips_variance(r, w, beta + offset)
  # The variance is a parabola in beta with curvature Var(w): check the minimum's depth.
  np.testing.assert_allclose(beta_ips_variance(r, w, beta + 0.5) - best,
                             0.25 * np.var(w, ddof=1), rtol=1e-4)


@pytest.mark.parametrize("weights", [np.ones(5), np.full(5, 2.5), np.zeros(5)])
@pytest.mark.slow
def test_constant_weights_give_zero_without_nan(weights):
  r = np.array([1., 0., 1., 1., 0.])
  assert float(optimal_baseline(r, weights)) == 0.0
  grad_w, grad_r = jax.grad(lambda w, r: optimal_baseline(r, w), argnums=(0, 1))(
      jnp.asarray(weights, jnp.float32), jnp.asarray(r, jnp.float32))
  assert np.all(np.isfinite(grad_w)) and np.all(np.isfinite(grad_r))


@pytest.mark.slow
def test_gradient_matches_finite_differences():
  r, w = sample(3, n=12)
  direction = np.random.default_rng(4).normal(size=w.shape)
  with jax.enable_x64(True):
    f = lambda w: optimal_baseline(r, w)
    fd = (f(w + 1e-6 * direction) - f(w - 1e-6 * direction)) / 2e-6
    analytic = jnp.vdot(jax.grad(f)(jnp.asarray(w)), direction)
  np.testing.assert_allclose(analytic, fd, rtol=1e-6)


@pytest.mark.slow
def test_where_equals_the_subset():
  r, w = sample(5, n=30)
  mask = np.random.default_rng(6).random(30) < 0.6
  np.testing.assert_allclose(optimal_baseline(r, w, where=mask),
                             optimal_baseline(r[mask], w[mask]), rtol=1e-5)


@pytest.mark.slow
def test_where_ignores_masked_out_values():
  r, w = sample(5, n=30)
  mask = np.arange(30) < 20
  w_junk = np.where(mask, w, 1e6)
  r_junk = np.where(mask, r, -3.0)
  np.testing.assert_allclose(optimal_baseline(r_junk, w_junk, where=mask),
                             optimal_baseline(r[:20], w[:20]), rtol=1e-5)


@pytest.mark.slow
def test_all_masked_gives_zero_without_nan():
  r, w = sample(7, n=6)
  mask = np.zeros(6, bool)
  assert float(optimal_baseline(r, w, where=mask)) == 0.0
  grad = jax.grad(lambda w: optimal_baseline(r, w, where=mask))(jnp.asarray(w, jnp.float32))
  assert np.all(np.isfinite(grad))


@pytest.mark.slow
def test_jit_and_vmap():
  r, w = sample(8, n=20)
  np.testing.assert_allclose(jax.jit(optimal_baseline)(r, w), optimal_baseline(r, w), rtol=1e-6)
  batch = [sample(s, n=20) for s in range(4)]
  rs, ws = (np.stack(x) for x in zip(*batch))
  batched = jax.vmap(optimal_baseline)(rs, ws)
  for b in range(4):
    np.testing.assert_allclose(batched[b], optimal_baseline(rs[b], ws[b]), rtol=1e-5)


@pytest.mark.parametrize("num_folds", [2, 3, 5])
@pytest.mark.slow
def test_cross_fitted_baselines_use_the_other_folds(num_folds):
  r, w = sample(9, n=23)
  betas = cross_fitted_baselines(r, w, num_folds=num_folds)
  assert betas.shape == (23,)
  folds = np.arange(23) % num_folds
  for i in range(23):
    others = folds != folds[i]
    rw, wo = r[others] * w[others], w[others]
    slope = np.cov(rw, wo)[0, 1] / np.var(wo, ddof=1)
    np.testing.assert_allclose(betas[i], slope, rtol=1e-5)
  # Different folds give different baselines on generic data.
  assert len(np.unique(np.asarray(betas))) == num_folds


@pytest.mark.slow
def test_cross_fitted_baselines_are_independent_of_the_own_fold():
  r, w = sample(10, n=20)
  betas = cross_fitted_baselines(r, w)
  r2 = np.where(np.arange(20) % 2 == 0, 1.0 - r, r)  # change only fold 0's rewards
  betas2 = cross_fitted_baselines(r2, w)
  np.testing.assert_allclose(betas[0::2], betas2[0::2], rtol=1e-6)
  assert not np.allclose(betas[1::2], betas2[1::2])


@pytest.mark.slow
def test_cross_fitted_baselines_jit_and_vmap():
  r, w = sample(11, n=12)
  f = lambda r, w: cross_fitted_baselines(r, w, num_folds=3)
  np.testing.assert_allclose(jax.jit(f)(r, w), f(r, w), rtol=1e-6)
  rs = np.stack([sample(s, n=12)[0] for s in range(3)])
  ws = np.stack([sample(s, n=12)[1] for s in range(3)])
  batched = jax.vmap(f)(rs, ws)
  for b in range(3):
    np.testing.assert_allclose(batched[b], f(rs[b], ws[b]), rtol=1e-5)


@pytest.mark.parametrize("num_folds", [1, 0, -2])
def test_cross_fitted_baselines_need_two_folds(num_folds):
  r, w = sample(12, n=10)
  with pytest.raises(ValueError, match="num_folds"):
    cross_fitted_baselines(r, w, num_folds=num_folds)


# The variance identity of SPEC.md section 1, by exact enumeration. A bandit with
# rational probabilities (quarters) has a population that 32 equally likely logged
# rounds reproduce exactly, so the library's plug-in quantities on those 32 rounds
# are the population quantities: E[w] = 1 exactly, beta-hat = beta*, and so on.

PI_0 = np.array([[0.25, 0.75], [0.5, 0.5]])  # logging policy, 2 contexts x 2 actions
PI = np.array([[0.75, 0.25], [0.25, 0.75]])  # target policy
Q = np.array([[0.5, 0.25], [0.75, 0.25]])  # P(r = 1 | x, a)


def population_rounds():
  rows = []
  for x in range(2):
    for a in range(2):
      ones = int(round(32 * 0.5 * PI_0[x, a] * Q[x, a]))
      zeros = int(round(32 * 0.5 * PI_0[x, a] * (1 - Q[x, a])))
      rows += [(x, a, 1.0)] * ones + [(x, a, 0.0)] * zeros
  x, a, r = (np.array(c) for c in zip(*rows))
  return r, a, PI_0[x, a], PI[x]


def test_population_rounds_are_exact():
  r, a, p, t = population_rounds()
  assert len(r) == 32
  w = np.asarray(logged_rounds(r, a, p, t).weights)
  np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-6)
  v = np.sum(PI * Q) / 2
  np.testing.assert_allclose(np.mean(w * r), v, rtol=1e-6)


@pytest.mark.slow
def test_variance_identity_by_enumeration():
  r, a, p, t = population_rounds()
  n = len(r)
  with jax.enable_x64(True):
    w = np.asarray(logged_rounds(r, a, p, t).weights)
    v = float(snips(r, a, p, t).value)
    beta = float(optimal_baseline(r, w))
    # n Var_SNIPS = E[w^2 (r - V)^2]: the delta method stderr, as sum w = n exactly.
    n_var_snips = n * float(snips(r, a, p, t).stderr)**2
    # n Var_beta* = Var(r w - beta* w): the stderr uses ddof=1, undo it.
    n_var_beta = float(beta_ips(r, a, p, t).stderr)**2 * n * (n - 1) / n
  var_w = np.var(w)
  np.testing.assert_allclose(v, np.sum(PI * Q) / 2, rtol=1e-12)
  np.testing.assert_allclose(beta, np.mean(r * (w**2 - w)) / np.mean(w**2 - w), rtol=1e-12)
  np.testing.assert_allclose(n_var_snips - n_var_beta, var_w * (v - beta)**2, rtol=1e-10)
  assert var_w * (v - beta)**2 > 1e-3  # the identity is not 0 = 0 here
  # Minimum variance: Var(r w)(1 - rho^2), rho = corr(r w, w).
  rho = np.corrcoef(r * w, w)[0, 1]
  np.testing.assert_allclose(n_var_beta, np.var(r * w) * (1 - rho**2), rtol=1e-10)
