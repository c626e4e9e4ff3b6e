"""The Gaussian-mixture prior: densities, sampling, the closed-form tilted optimum (checked by grid
integration of p(x) exp(a^T x / beta)) and the closed-form MMD (checked by Monte Carlo)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from saferl_jax.data import mixture2d as mx


@pytest.fixture(scope="module")
def anisotropic():
  """Three modes with full, correlated covariances and unequal weights."""
  covariances = [[[0.3, 0.1], [0.1, 0.2]], [[0.15, -0.05], [-0.05, 0.4]], [[0.25, 0.0], [0.0, 0.25]]]
  return mx.make_mixture([0.5, 0.3, 0.2], [[-1.0, 0.5], [1.0, -0.5], [0.0, 1.5]],
                         covariances=covariances)


def _grid(low=-7.0, high=7.0, step=0.025):
  axis = np.arange(low, high + step / 2, step)
  xx, yy = np.meshgrid(axis, axis, indexing="ij")
  return np.stack([xx, yy], -1), step ** 2


@pytest.mark.slow
def test_make_mixture_from_stds():
  mixture = mx.make_mixture([0.25, 0.75], [[0.0, 0.0], [1.0, 1.0]], stds=[0.5, 2.0])
  np.testing.assert_allclose(mixture.covariances, [np.eye(2) * 0.25, np.eye(2) * 4.0])
  assert mixture.num_components == 2 and mixture.dim == 2


@pytest.mark.parametrize("kwargs, match", [
    (dict(weights=[0.5, 0.6], means=[[0, 0], [1, 1]], stds=1.0), "weights:"),
    (dict(weights=[0.5, 0.5], means=[[0, 0]], stds=1.0), "means:"),
    (dict(weights=[1.0], means=[[0, 0]]), "covariances:"),
    (dict(weights=[1.0], means=[[0, 0]], stds=1.0, covariances=[np.eye(2)]), "covariances:"),
    (dict(weights=[1.0], means=[[0, 0]], covariances=[[[1.0, 2.0], [2.0, 1.0]]]), "positive definite"),
    (dict(weights=[1.0], means=[[0, 0]], covariances=[[[1.0, 0.5], [0.0, 1.0]]]), "symmetric"),
    (dict(weights=[1.0], means=[[0, 0]], stds=0.0), "stds:"),
])
def test_make_mixture_rejects_bad_inputs(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mx.make_mixture(kwargs.pop("weights"), kwargs.pop("means"), **kwargs)


@pytest.mark.slow
def test_log_density_matches_scipy(anisotropic):
  x = jax.random.normal(jax.random.key(0), (50, 2)) * 2
  expected = np.log(sum(w * stats.multivariate_normal(m, c).pdf(np.asarray(x)) for w, m, c in
                        zip(np.asarray(anisotropic.weights), np.asarray(anisotropic.means),
                            np.asarray(anisotropic.covariances))))
  np.testing.assert_allclose(mx.mixture_log_density(anisotropic, x), expected, rtol=1e-5, atol=1e-5)
  # Any leading shape, and jit equals eager.
  np.testing.assert_allclose(mx.mixture_log_density(anisotropic, x.reshape(5, 10, 2)),
                             expected.reshape(5, 10), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(mx.mixture_log_density)(anisotropic, x), expected, rtol=1e-5,
                             atol=1e-5)


def test_log_density_integrates_to_one(anisotropic):
  grid, cell = _grid()
  total = np.exp(np.asarray(mx.mixture_log_density(anisotropic, grid), np.float64)).sum() * cell
  assert abs(total - 1) < 1e-4  # the midpoint rule's error on a smooth density at step 0.025


def test_far_points_stay_finite():
  log_density = mx.mixture_log_density(mx.default_mixture(), jnp.array([[1e3, -1e3]]))
  assert np.isfinite(log_density).all() and float(log_density[0]) < -1e6


@pytest.mark.slow
def test_sample_moments_and_quadrant_frequencies():
  mixture = mx.default_mixture()
  n = 40_000
  x = np.asarray(mx.sample_mixture(mixture, key=jax.random.key(1), num_samples=n), np.float64)
  mean = np.asarray(mx.mixture_mean(mixture))
  second = sum(w * (c + np.outer(m, m)) for w, m, c in zip(np.asarray(mixture.weights),
                                                            np.asarray(mixture.means),
                                                            np.asarray(mixture.covariances)))
  covariance = second - np.outer(mean, mean)
  standard_error = np.sqrt(np.diag(covariance) / n)
  assert np.all(np.abs(x.mean(0) - mean) < 4 * standard_error)
  # Exact quadrant probabilities: each isotropic mode's mass in a quadrant is a product of normal CDFs.
  for sx in (-1, 1):
    for sy in (-1, 1):
      exact = sum(w * stats.norm.cdf(sx * m[0] / 0.4) * stats.norm.cdf(sy * m[1] / 0.4)
                  for w, m in zip(np.asarray(mixture.weights), np.asarray(mixture.means)))
      observed = np.mean((np.sign(x[:, 0]) == sx) & (np.sign(x[:, 1]) == sy))
      assert abs(observed - exact) < 4 * np.sqrt(exact * (1 - exact) / n)


@pytest.mark.slow
def test_sampling_is_deterministic_and_checks_num_samples():
  mixture = mx.default_mixture()
  np.testing.assert_array_equal(mx.sample_mixture(mixture, key=jax.random.key(2), num_samples=7),
                                mx.sample_mixture(mixture, key=jax.random.key(2), num_samples=7))
  with pytest.raises(ValueError, match="num_samples:"):
    mx.sample_mixture(mixture, key=jax.random.key(0), num_samples=0)


@pytest.mark.parametrize("direction, beta", [((1.0, 0.5), 1.0), ((-0.5, 2.0), 2.5), ((1.0, 1.0), 0.7)])
@pytest.mark.slow
def test_tilted_mixture_against_grid_integration(anisotropic, direction, beta):
  """q*(x) = p(x) exp(a^T x / beta) / Z on a grid: density, mean and per-mode mass all match."""
  grid, cell = _grid()
  a = np.asarray(direction)
  tilted = mx.tilted_mixture(anisotropic, a, kl_weight=beta)
  # Per-component unnormalised tilted mass on the grid, in float64.
  components = np.stack([w * stats.multivariate_normal(m, c).pdf(grid) for w, m, c in
                         zip(np.asarray(anisotropic.weights), np.asarray(anisotropic.means),
                             np.asarray(anisotropic.covariances))]) * np.exp(grid @ a / beta)
  normaliser = components.sum() * cell
  target = components.sum(0) / normaliser
  np.testing.assert_allclose(np.exp(np.asarray(mx.mixture_log_density(tilted, grid), np.float64)),
                             target, atol=1e-4 * target.max())
  grid_mean = (target[..., None] * grid).sum((0, 1)) * cell
  np.testing.assert_allclose(mx.mixture_mean(tilted), grid_mean, atol=1e-4)
  grid_weights = components.sum((1, 2)) * cell / normaliser
  np.testing.assert_allclose(tilted.weights, grid_weights, atol=1e-4)
  np.testing.assert_allclose(tilted.covariances, anisotropic.covariances)


@pytest.mark.slow
def test_tilted_mixture_limits():
  prior = mx.default_mixture()
  # A negligible tilt is the prior; a strong tilt towards (1, 1) puts the mass on the mode at (1.5, 1.5).
  weak = mx.tilted_mixture(prior, jnp.array([1.0, 1.0]), kl_weight=1e6)
  np.testing.assert_allclose(weak.weights, prior.weights, atol=1e-5)
  np.testing.assert_allclose(weak.means, prior.means, atol=1e-5)
  strong = mx.tilted_mixture(prior, jnp.array([1.0, 1.0]), kl_weight=0.1)
  assert float(strong.weights[3]) > 0.999 and np.isfinite(strong.weights).all()
  with pytest.raises(ValueError, match="kl_weight:"):
    mx.tilted_mixture(prior, jnp.array([1.0, 1.0]), kl_weight=0.0)
  with pytest.raises(ValueError, match="direction:"):
    mx.tilted_mixture(prior, jnp.array([1.0, 1.0, 0.0]), kl_weight=1.0)


def _cross(a, b, bandwidth):
  """E k(x, y), x ~ a, y ~ b, for mixtures (weights, means, covariances), from Gaussian integrals."""
  total = 0.0
  for wa, ma, ca in zip(*(np.asarray(v, np.float64) for v in a)):
    for wb, mb, cb in zip(*(np.asarray(v, np.float64) for v in b)):
      total += wa * wb * stats.multivariate_normal(mb, ca + cb + bandwidth ** 2 * np.eye(2)).pdf(ma)
  return 2 * np.pi * bandwidth ** 2 * total


def _exact_mmd(p, q, bandwidth):
  """MMD^2 between two mixtures from Gaussian integrals, written with scipy (an independent check)."""
  return _cross(p, p, bandwidth) - 2 * _cross(p, q, bandwidth) + _cross(q, q, bandwidth)


@pytest.mark.slow
def test_mmd_cross_term_against_monte_carlo(anisotropic):
  """E_{y~p} k(x, y) in closed form equals a Monte Carlo average over 200k draws."""
  x = jnp.array([[0.3, -0.2], [2.0, 1.0]])
  closed = jax.jit(mx._kernel_against_gaussians)(x, anisotropic.means, anisotropic.covariances, 0.5) @ anisotropic.weights
  y = mx.sample_mixture(anisotropic, key=jax.random.key(5), num_samples=200_000)
  kernel = np.exp(-np.sum((np.asarray(x)[:, None] - np.asarray(y)[None]) ** 2, -1) / (2 * 0.25))
  standard_error = kernel.std(1) / np.sqrt(kernel.shape[1])
  assert np.all(np.abs(np.asarray(closed) - kernel.mean(1)) < 4 * standard_error)


@pytest.mark.slow
def test_mmd_is_unbiased_over_seeds(anisotropic):
  """The mean of the U-statistic over 200 sample sets is the exact MMD^2 (within 4 standard errors)."""
  keys = jax.random.split(jax.random.key(7), 200)
  many = jax.jit(jax.vmap(lambda k, sampled: mx.mixture_mmd(mx.sample_mixture(sampled, key=k,
                                                                              num_samples=100), anisotropic),
                          in_axes=(0, None)))
  for shift in (0.0, 0.5):
    shifted = anisotropic._replace(means=anisotropic.means + shift)
    values = np.asarray(many(keys, shifted))
    exact = _exact_mmd(anisotropic, shifted, 0.5)
    standard_error = values.std() / np.sqrt(values.size)
    assert abs(values.mean() - exact) < 4 * standard_error
    if shift:
      assert exact > 10 * standard_error  # the test can tell the shift apart


@pytest.mark.slow
def test_mmd_v_statistic_relation_and_checks():
  prior = mx.default_mixture()
  n = 100
  x = mx.sample_mixture(prior, key=jax.random.key(0), num_samples=n)
  u = float(mx.mixture_mmd(x, prior))
  v = float(mx.mixture_mmd(x, prior, unbiased=False))
  # V = U + (1 - mean off-diagonal kernel) / n.
  gram = np.exp(-np.sum((np.asarray(x)[:, None] - np.asarray(x)[None]) ** 2, -1) / (2 * 0.25))
  off_diagonal = (gram.sum() - n) / (n * (n - 1))
  np.testing.assert_allclose(v, u + (1 - off_diagonal) / n, rtol=1e-4, atol=1e-6)
  # V is the exact MMD^2 between the samples' empirical measure and the prior (float64, scipy).
  # Tolerance: float32 sums of n^2 = 1e4 kernel values <= 1, relative error ~ sqrt(1e4) * 6e-8.
  points = (np.full(n, 1 / n), np.asarray(x, np.float64), np.zeros((n, 2, 2)))
  exact_v = gram.mean() - 2 * _cross(points, prior, 0.5) + _cross(prior, prior, 0.5)
  np.testing.assert_allclose(v, exact_v, atol=1e-5)
  np.testing.assert_allclose(jax.jit(mx.mixture_mmd)(x, prior), u, atol=1e-6)  # float32 cancellation
  with pytest.raises(ValueError, match="samples:"):
    mx.mixture_mmd(x[:1], prior)
  with pytest.raises(ValueError, match="bandwidth:"):
    mx.mixture_mmd(x, prior, bandwidth=0.0)


# The constrained optimum: max E_q[a_0 . x] - beta KL(q || p) s.t. E_q[a_i . x] >= b_i.
PRIMARY = np.array([1.0, 0.0])
PROBLEMS = {  # (constraint directions A, thresholds b, beta)
    "one active": ([[0.0, 1.0]], [0.5], 1.0),
    "two active": ([[0.0, 1.0], [-1.0, 0.0]], [0.5, 0.0], 0.5),
    "one inactive": ([[0.0, 1.0], [-1.0, 0.0]], [0.5, -5.0], 1.0),
}


def _dual_float64(multipliers, mixture, directions, thresholds, beta):
  """g(lambda) and its gradient in float64 numpy, straight from the formula (no jax)."""
  weights, means = np.asarray(mixture.weights, np.float64), np.asarray(mixture.means, np.float64)
  covariances = np.asarray(mixture.covariances, np.float64)
  direction = PRIMARY + multipliers @ directions
  theta = direction / beta
  logits = np.log(weights) + means @ theta + 0.5 * np.einsum("i,kij,j->k", theta, covariances, theta)
  top = logits.max()
  log_partition = top + np.log(np.sum(np.exp(logits - top)))
  tilted_weights = np.exp(logits - log_partition)
  tilted_mean = tilted_weights @ (means + np.einsum("kij,j->ki", covariances, theta))
  return beta * log_partition - multipliers @ thresholds, directions @ tilted_mean - thresholds


@pytest.mark.slow  # compiles the projected-gradient minimiser (~1 s, several on a loaded machine)
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_constrained_optimum_against_scipy_and_kkt(problem):
  from scipy import optimize
  directions, thresholds, beta = (np.asarray(v, np.float64) if i < 2 else v
                                  for i, v in enumerate(PROBLEMS[problem]))
  prior = mx.default_mixture()
  optimum = mx.constrained_optimum(prior, primary_direction=PRIMARY, constraint_directions=directions,
                                   thresholds=thresholds, kl_weight=beta)
  m = len(thresholds)
  reference = optimize.minimize(_dual_float64, np.ones(m), args=(prior, directions, thresholds, beta),
                                jac=True, method="L-BFGS-B", bounds=[(0, None)] * m,
                                options=dict(ftol=1e-15, gtol=1e-12))
  assert reference.success, reference.message
  # g's curvature along lambda is Var_q(a_i . x) / beta >= ~0.3 here, and our float32 dual's
  # gradient is exact to ~1e-6, so lambda* is good to ~1e-5: 1e-4 leaves room.
  np.testing.assert_allclose(optimum.multipliers, reference.x, atol=1e-4)
  # KKT: the optimum meets every constraint (slack >= 0 up to float32), and complementary
  # slackness lambda_i slack_i = 0; an active constraint (lambda_i > 0) holds with equality.
  slacks = directions @ np.asarray(mx.mixture_mean(optimum.tilted), np.float64) - thresholds
  assert np.all(slacks > -1e-5), slacks
  np.testing.assert_allclose(np.asarray(optimum.multipliers) * slacks, 0.0, atol=1e-5)
  active = np.asarray(optimum.multipliers) > 1e-3
  assert active.sum() == (1 if problem == "one active" else 2 if problem == "two active" else 1)
  # The optimum is the prior tilted by a_0 + A^T lambda*, the dual's gradient its slacks.
  dual = mx.mixture_tilt_dual(prior, optimum.multipliers, primary_direction=PRIMARY,
                              constraint_directions=directions, thresholds=thresholds,
                              kl_weight=beta)
  np.testing.assert_allclose(dual.gradient, slacks, atol=1e-5)
  np.testing.assert_allclose(dual.value, reference.fun, rtol=1e-5, atol=1e-5)


def test_tilt_dual_gradient_is_the_derivative_of_its_value():
  prior = mx.default_mixture()
  directions, thresholds, beta = PROBLEMS["two active"]
  options = dict(primary_direction=PRIMARY, constraint_directions=jnp.asarray(directions),
                 thresholds=jnp.asarray(thresholds), kl_weight=beta)
  value_grad = jax.jit(jax.grad(lambda l: mx.mixture_tilt_dual(prior, l, **options).value))
  for multipliers in ([0.0, 0.0], [0.3, 1.2], [2.0, 0.1]):
    multipliers = jnp.asarray(multipliers)
    dual = mx.mixture_tilt_dual(prior, multipliers, **options)
    autodiff = value_grad(multipliers)
    # Two float32 routes to the same derivative (tilted mean vs autodiff of the logsumexp).
    np.testing.assert_allclose(dual.gradient, autodiff, rtol=1e-5, atol=1e-5)
    value, gradient = _dual_float64(np.asarray(multipliers, np.float64), prior,
                                    np.asarray(directions), np.asarray(thresholds), beta)
    np.testing.assert_allclose(dual.value, value, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dual.gradient, gradient, rtol=1e-5, atol=1e-5)


def test_tilt_dual_checks_its_inputs():
  prior = mx.default_mixture()
  options = dict(primary_direction=PRIMARY, constraint_directions=jnp.array([[0.0, 1.0]]),
                 thresholds=jnp.array([0.5]), kl_weight=1.0)
  for name, bad in (("primary_direction", jnp.zeros(3)),
                    ("constraint_directions", jnp.zeros(2)),
                    ("constraint_directions", jnp.zeros((0, 2))),
                    ("thresholds", jnp.zeros(2)),
                    ("kl_weight", 0.0)):
    with pytest.raises(ValueError, match=f"^{name}:"):
      mx.mixture_tilt_dual(prior, jnp.zeros(1), **(options | {name: bad}))
    with pytest.raises(ValueError, match=f"^{name}:"):
      mx.constrained_optimum(prior, **(options | {name: bad}))
  with pytest.raises(ValueError, match="^multipliers:"):
    mx.mixture_tilt_dual(prior, jnp.zeros(2), **options)
