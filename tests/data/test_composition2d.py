"""The exact composition on a grid (saferl_jax.data.composition2d), against closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax.data import composition2d as c2d
from saferl_jax.data.mixture2d import default_mixture, make_mixture, mixture_mmd, sample_mixture
from saferl_jax.diffusion.schedules import linear_schedule

GRID = c2d.make_grid(num_points=201)
# Two Gaussians N(m_i, s_i^2 I): q_1^mu_1 q_2^mu_2 ∝ N(mbar, I / tau), tau = sum mu_i / s_i^2,
# mbar = sum (mu_i / s_i^2) m_i / tau.
MEANS, STDS = np.array([[-1.0, 0.0], [1.0, 0.5]]), np.array([1.0, 0.5])
GAUSSIANS = c2d.stack_mixtures([make_mixture([1.0], [m], stds=s) for m, s in zip(MEANS, STDS)])


def closed_form(mu):
  """(KL(p_mu || q_i) [2], log Z(mu)) for the two Gaussians, in float64."""
  precisions = mu / STDS ** 2
  tau = precisions.sum()
  mbar = precisions @ MEANS / tau
  variance_ratio = 1.0 / (tau * STDS ** 2)
  kls = (variance_ratio - 1 - np.log(variance_ratio)) + np.sum((mbar - MEANS) ** 2, 1) / (2 * STDS ** 2)
  # log Z = -sum mu_i log(2 pi s_i^2) - (sum mu_i |m_i|^2 / s_i^2 - tau |mbar|^2) / 2 + log(2 pi / tau)
  log_z = (-np.sum(mu * np.log(2 * np.pi * STDS ** 2))
           - 0.5 * (np.sum(precisions * np.sum(MEANS ** 2, 1)) - tau * mbar @ mbar)
           + np.log(2 * np.pi / tau))
  return kls, log_z


def closed_form_optimum():
  """mu* equalises the two KLs (each is monotone in mu_1 here): bisection on KL_1 - KL_2."""
  low, high = 0.0, 1.0
  for _ in range(60):
    mid = (low + high) / 2
    kls, _ = closed_form(np.array([mid, 1 - mid]))
    low, high = (mid, high) if kls[0] > kls[1] else (low, mid)
  return np.array([low, 1 - low])


LOG_Q = c2d.grid_log_densities(GAUSSIANS, GRID)


def test_grid_kls_and_normaliser_match_the_product_of_gaussians():
  for mu in ([0.3, 0.7], [0.8, 0.2]):
    got = c2d.compose_on_grid(LOG_Q, jnp.array(mu), cell_area=GRID.cell_area)
    kls, log_z = closed_form(np.array(mu))
    # The grid (spacing 0.05, smooth integrands vanishing at +-5) is exact to float32 rounding of
    # sums over 4e4 points: 1e-4 absolute.
    np.testing.assert_allclose(got.kls, kls, atol=1e-4)
    np.testing.assert_allclose(got.log_normalizer, log_z, atol=1e-4)


@pytest.mark.slow
def test_optimal_weights_match_the_closed_form_optimum_with_equal_kls():
  best = c2d.optimal_weights(LOG_Q, cell_area=GRID.cell_area)
  mu_star = closed_form_optimum()
  kls, log_z = closed_form(mu_star)
  np.testing.assert_allclose(best.weights, mu_star, atol=1e-3)
  np.testing.assert_allclose(best.kls, kls, atol=1e-3)
  np.testing.assert_allclose(best.dual_value, -log_z, atol=1e-4)
  assert abs(float(best.kls[0] - best.kls[1])) < 1e-3  # equal on the support (both weights > 0)
  assert 0.05 < mu_star[0] < 0.95  # the reference is an interior point, not a corner


def test_dual_gradient_is_the_kls_up_to_a_shared_constant():
  # dD/dmu_i = -E_p[log q_i] = KL_i + c(mu): the ascent direction's sign, checked by autodiff.
  mu = jnp.array([0.4, 0.6])
  grad = jax.grad(lambda w: -c2d.compose_on_grid(LOG_Q, w, cell_area=GRID.cell_area)
                  .log_normalizer)(mu)
  kls = c2d.compose_on_grid(LOG_Q, mu, cell_area=GRID.cell_area).kls
  np.testing.assert_allclose(grad[0] - grad[1], kls[0] - kls[1], atol=1e-4)


def shifted_mixtures():
  base = default_mixture()
  shifted = base._replace(means=base.means + jnp.array([1.0, 0.0]),
                          weights=base.weights[::-1])
  return c2d.stack_mixtures([base, shifted, base._replace(weights=jnp.full(4, 0.25))])


@pytest.mark.slow  # ~3.6 s on 2 cores (a 221^2 grid, 200 ascent steps)
def test_mixture_optimum_has_equal_kls_on_its_support_and_no_larger_off_it():
  grid = c2d.make_grid(low=-5.0, high=6.0, num_points=221)
  log_q = c2d.grid_log_densities(shifted_mixtures(), grid)
  best = c2d.optimal_weights(log_q, cell_area=grid.cell_area, num_iterations=200)
  support = np.asarray(best.weights) > 1e-4
  kls = np.asarray(best.kls)
  assert kls[support].max() - kls[support].min() < 2e-3
  assert np.all(kls[~support] <= kls[support].max() + 2e-3)
  # The dual value is the optimal worst-case KL: no grid point of the simplex does better.
  for mu in ([1, 0, 0], [0, 1, 0], [0, 0, 1], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0]):
    worst = c2d.compose_on_grid(log_q, jnp.array(mu, jnp.float32), cell_area=grid.cell_area).kls.max()
    assert float(worst) >= float(best.dual_value) - 1e-4


@pytest.mark.slow
def test_grid_discretisation_error_of_the_normaliser():
  mixtures = shifted_mixtures()
  mu = jnp.array([0.3, 0.5, 0.2])
  values = [float(c2d.compose_on_grid(c2d.grid_log_densities(mixtures, g), mu,
                                      cell_area=g.cell_area).log_normalizer)
            for g in (c2d.make_grid(low=-5.0, high=6.0, num_points=n) for n in (221, 441))]
  # The Riemann sums differ by 1e-7 in float64 (spectral convergence); float32 rounding of the
  # logsumexp over 5e4 / 2e5 points is ~1e-6.
  assert abs(values[0] - values[1]) < 1e-5


@pytest.mark.slow
def test_grid_mmd_matches_the_closed_form_mixture_mmd():
  mixture = default_mixture()
  x = sample_mixture(mixture, key=jax.random.key(0), num_samples=400)
  log_q = c2d.grid_log_densities(c2d.stack_mixtures([mixture]), GRID)[0]
  for shift in (0.0, 0.7):
    np.testing.assert_allclose(c2d.grid_mmd(x + shift, log_q, GRID), mixture_mmd(x + shift, mixture),
                               atol=1e-4)  # the grid's Riemann sums, float32


def test_sample_grid_draws_the_grid_density():
  log_q = c2d.grid_log_densities(GAUSSIANS, GRID)[1]
  x = c2d.sample_grid(log_q, GRID, key=jax.random.key(0), num_samples=4000)
  # N((1, 0.5), 0.25 I): the mean's standard error is 0.5 / sqrt(4000) ~ 0.008; 5 of them.
  np.testing.assert_allclose(x.mean(0), MEANS[1], atol=0.04)
  np.testing.assert_allclose(x.std(0), STDS[1], atol=0.02)


@pytest.mark.slow
def test_mixture_eps_is_the_exact_gaussian_noise_prediction():
  schedule = linear_schedule(100)
  score = c2d.MixtureScore(GAUSSIANS._replace(weights=GAUSSIANS.weights[1],
                                              means=GAUSSIANS.means[1],
                                              covariances=GAUSSIANS.covariances[1]),
                           schedule.alphas_cumprod)
  x, t = jnp.array([[0.3, -0.2], [2.0, 1.0]]), jnp.array([5, 80])
  a = schedule.alphas_cumprod[t][:, None]
  # q = N(m, s^2 I): q_t = N(sqrt(a) m, (a s^2 + 1 - a) I), eps = sqrt(1 - a)(x - sqrt(a) m)/var.
  want = jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * MEANS[1]) / (a * STDS[1] ** 2 + 1 - a)
  np.testing.assert_allclose(c2d.mixture_eps_apply(score, x, t), want, rtol=1e-4, atol=1e-6)


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="log_densities"):
    c2d.compose_on_grid(jnp.zeros((3, 3)), jnp.ones(1), cell_area=1.0)
  with pytest.raises(ValueError, match="weights"):
    c2d.compose_on_grid(LOG_Q, jnp.ones(3) / 3, cell_area=GRID.cell_area)
  with pytest.raises(ValueError, match="high"):
    c2d.make_grid(low=1.0, high=0.0)
  with pytest.raises(ValueError, match="samples"):
    c2d.grid_mmd(jnp.zeros((5, 3)), LOG_Q[0], GRID)
