"""A 2-D Gaussian mixture prior, its reward-tilted optimum in closed form, and an exact distance (floor 2).

The toy diffusion task: a denoiser is pretrained on samples of a Gaussian mixture
p(x) = sum_k w_k N(x; mu_k, Sigma_k) and fine-tuned to maximise the linear reward r(x) = a^T x
with a KL penalty to the prior,

  max_q  E_q[a^T x] - beta KL(q || p),

whose optimum is q*(x) ∝ p(x) exp(a^T x / beta). Completing the square in each component,
N(x; mu_k, Sigma_k) exp(a^T x / beta) = N(x; mu_k + Sigma_k a / beta, Sigma_k)
exp(a^T mu_k / beta + a^T Sigma_k a / (2 beta^2)), so q* is again a Gaussian mixture with

  means      mu_k' = mu_k + Sigma_k a / beta     (covariances unchanged)
  weights    w_k' ∝ w_k exp(a^T mu_k / beta + a^T Sigma_k a / (2 beta^2)),

computed in log space (`tilted_mixture`). Everything here works in any dimension D; the task uses
D = 2 (`default_mixture`).

Distance between a sample set and a mixture: the squared maximum mean discrepancy (MMD) with the
RBF kernel k(x, y) = exp(-||x - y||^2 / (2 h^2)), `mixture_mmd`. The kernel is (2 pi h^2)^{D/2}
times a Gaussian density in y, so its expectations under a Gaussian mixture are closed-form
Gaussian integrals:

  E_{y~p} k(x, y)      = c sum_k w_k N(x; mu_k, Sigma_k + h^2 I)
  E_{y,y'~p} k(y, y')  = c sum_{j,k} w_j w_k N(mu_j; mu_k, Sigma_j + Sigma_k + h^2 I),  c = (2 pi h^2)^{D/2}.

Only the sample-sample term is estimated, by the U-statistic over pairs i != j, so the returned
MMD^2 is unbiased (exact in expectation: its mean over sample sets equals the true MMD^2 between
the sampler's distribution and the mixture). Why this distance: the RBF kernel is characteristic,
so MMD is a metric on distributions (zero iff they are equal), unlike a log-density gap
E_p[log p] - E_q[log p] which can vanish or go negative for different distributions; and unlike
the 2-Wasserstein distance between moment-fitted Gaussians it sees mode weights and mode
collapse, the failure a reward-tilted sampler is most prone to. Its cost is O(n^2 + n M + M^2).

Constrained optimum (SPEC section 6): maximise E_q[a_0^T x] - beta KL(q || p) subject to
E_q[a_i^T x] >= b_i, i = 1..m. For multipliers lambda >= 0 the Lagrangian's maximiser is the tilt
by theta = (a_0 + sum_i lambda_i a_i) / beta, and the dual is explicit,

  g(lambda) = beta logsumexp_k(log w_k + theta^T mu_k + theta^T Sigma_k theta / 2) - lambda . b,

convex, with gradient A E_{q_lambda}[x] - b, the tilted mixture's constraint values minus the
thresholds (`mixture_tilt_dual`); lambda* = argmin_{lambda >= 0} g and the constrained optimum
q_{lambda*} (`constrained_optimum`).

References:
  Gretton, Borgwardt, Rasch, Schölkopf, Smola. A Kernel Two-Sample Test. JMLR 2012.
  https://jmlr.org/papers/v13/gretton12a.html
  Korbak, Perez, Buckley. RL with KL penalties is better viewed as Bayesian inference. 2022
  (the tilted optimum p exp(r / beta)). https://arxiv.org/abs/2205.11275
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.constrained.tilt import DualValue, minimize_dual


class GaussianMixture(NamedTuple):
  """p(x) = sum_k weights[k] N(x; means[k], covariances[k]).

  Attributes:
    weights: [M] mixture weights, >= 0, summing to 1.
    means: [M, D] component means.
    covariances: [M, D, D] symmetric positive-definite component covariances.
  """
  weights: jax.Array
  means: jax.Array
  covariances: jax.Array

  @property
  def num_components(self) -> int:
    return int(self.weights.shape[0])

  @property
  def dim(self) -> int:
    return int(self.means.shape[-1])


def make_mixture(weights: ArrayLike, means: ArrayLike, *, covariances: ArrayLike | None = None,
                 stds: ArrayLike | None = None) -> GaussianMixture:
  """A validated `GaussianMixture` from full covariances or isotropic standard deviations.

  Args:
    weights: [M] mixture weights, >= 0, summing to 1.
    means: [M, D] component means.
    covariances: [M, D, D] symmetric positive-definite covariances; or give `stds`.
    stds: [M] (or a scalar) isotropic standard deviations, Sigma_k = stds[k]^2 I.

  Returns:
    A `GaussianMixture`.

  Example:
    >>> mixture = make_mixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.0]], stds=0.5)
    >>> mixture.covariances[0].tolist()
    [[0.25, 0.0], [0.0, 0.25]]
  """
  weights = checks.as_float("weights", weights)
  means = checks.as_float("means", means)
  if weights.ndim != 1 or weights.shape[0] == 0:
    raise ValueError(f"weights: expected a non-empty [M] array, got shape {tuple(weights.shape)}")
  num_components = weights.shape[0]
  if means.ndim != 2 or means.shape[0] != num_components:
    raise ValueError(f"means: expected shape [M={num_components}, D], got {tuple(means.shape)}")
  dim = means.shape[1]
  if (covariances is None) == (stds is None):
    raise ValueError("covariances: give exactly one of covariances [M, D, D] and stds [M]")
  if stds is not None:
    stds = jnp.broadcast_to(checks.as_float("stds", stds), (num_components,))
    if checks.is_concrete(stds) and not bool(jnp.all(stds > 0)):
      raise ValueError(f"stds: must be > 0, got {np.asarray(stds).tolist()}")
    covariances = stds[:, None, None] ** 2 * jnp.eye(dim, dtype=means.dtype)
  covariances = checks.as_float("covariances", covariances)
  if covariances.shape != (num_components, dim, dim):
    raise ValueError(f"covariances: expected shape [M={num_components}, D={dim}, D={dim}], got "
                     f"{tuple(covariances.shape)}")
  checks.check_distribution_rows("weights", weights)
  checks.check_finite("means", means)
  checks.check_finite("covariances", covariances)
  if checks.is_concrete(covariances):
    values = np.asarray(covariances, np.float64)
    if not np.allclose(values, np.swapaxes(values, -1, -2), atol=1e-6):
      raise ValueError("covariances: must be symmetric")
    if np.any(np.linalg.eigvalsh(values) <= 0):
      raise ValueError("covariances: must be positive definite")
  return GaussianMixture(weights, means, covariances)


def default_mixture() -> GaussianMixture:
  """The task's prior: four isotropic modes (std 0.4) at (+-1.5, +-1.5) with unequal weights.

  Weights 0.4, 0.3, 0.2, 0.1 for the modes at (-1.5, -1.5), (-1.5, 1.5), (1.5, -1.5) and
  (1.5, 1.5): a tilt towards a = (1, 1) must move mass from the heaviest mode to the lightest.

  Returns:
    A 2-D `GaussianMixture` with M = 4.

  Example:
    >>> default_mixture().means.shape
    (4, 2)
  """
  return make_mixture([0.4, 0.3, 0.2, 0.1],
                      [[-1.5, -1.5], [-1.5, 1.5], [1.5, -1.5], [1.5, 1.5]], stds=0.4)


def sample_mixture(mixture: GaussianMixture, *, key: jax.Array, num_samples: int) -> jax.Array:
  """n independent draws: a component k ~ weights, then x = mu_k + L_k z with L_k L_k^T = Sigma_k.

  Args:
    mixture: a `GaussianMixture` with means [M, D].
    key: PRNG key.
    num_samples: n, the number of samples (static).

  Returns:
    [n, D] samples.

  Example:
    >>> import jax
    >>> sample_mixture(default_mixture(), key=jax.random.key(0), num_samples=5).shape
    (5, 2)
  """
  checks.check_key("key", key)
  checks.check_count("num_samples", num_samples)
  return _sample(key, mixture, num_samples)


@functools.partial(jax.jit, static_argnums=2)
def _sample(key: jax.Array, mixture: GaussianMixture, n: int) -> jax.Array:
  component_key, noise_key = jax.random.split(key)
  log_weights = jnp.log(mixture.weights)
  components = jax.random.categorical(component_key, log_weights, shape=(n,))
  noise = jax.random.normal(noise_key, (n, mixture.dim), mixture.means.dtype)
  cholesky = jnp.linalg.cholesky(mixture.covariances)
  return mixture.means[components] + jnp.einsum("nij,nj->ni", cholesky[components], noise)


def _gaussian_log_density(x: jax.Array, mean: jax.Array, covariance: jax.Array) -> jax.Array:
  """log N(x; mean, covariance) for x [..., D], one Gaussian (mean [D], covariance [D, D])."""
  cholesky = jnp.linalg.cholesky(covariance)
  diff = x - mean
  flat = diff.reshape(-1, diff.shape[-1])
  solved = jax.scipy.linalg.solve_triangular(cholesky, flat.T, lower=True).T.reshape(diff.shape)
  dim = x.shape[-1]
  return (-0.5 * jnp.sum(solved ** 2, axis=-1) - jnp.sum(jnp.log(jnp.diagonal(cholesky)))
          - 0.5 * dim * jnp.log(2 * jnp.pi))


def mixture_log_density(mixture: GaussianMixture, x: ArrayLike) -> jax.Array:
  """log p(x) = logsumexp_k (log w_k + log N(x; mu_k, Sigma_k)).

  Args:
    mixture: a `GaussianMixture` with means [M, D].
    x: [..., D] points.

  Returns:
    [...] log-densities.

  Example:
    >>> mixture = make_mixture([1.0], [[0.0, 0.0]], stds=1.0)
    >>> round(float(mixture_log_density(mixture, [0.0, 0.0])), 4)  # -log(2 pi)
    -1.8379
  """
  x = checks.as_float("x", x)
  if x.ndim < 1 or x.shape[-1] != mixture.dim:
    raise ValueError(f"x: expected shape [..., D={mixture.dim}], got {tuple(x.shape)}")
  return _log_density(mixture, x)


@jax.jit
def _log_density(mixture: GaussianMixture, x: jax.Array) -> jax.Array:
  per_component = jax.vmap(_gaussian_log_density, in_axes=(None, 0, 0), out_axes=-1)(
      x, mixture.means, mixture.covariances)
  return jax.nn.logsumexp(per_component + jnp.log(mixture.weights), axis=-1)


def mixture_mean(mixture: GaussianMixture) -> jax.Array:
  """E_p[x] = sum_k w_k mu_k, [D] (so E_p[a^T x] = a^T mixture_mean(p)).

  Example:
    >>> mixture_mean(make_mixture([0.25, 0.75], [[-1.0, 0.0], [1.0, 2.0]], stds=1.0)).tolist()
    [0.5, 1.5]
  """
  return mixture.weights @ mixture.means


def tilted_mixture(mixture: GaussianMixture, direction: ArrayLike, *, kl_weight: float) -> GaussianMixture:
  """The optimum of max_q E_q[a^T x] - beta KL(q || p): q* ∝ p exp(a^T x / beta), again a mixture.

  means mu_k + Sigma_k a / beta, same covariances, weights
  ∝ w_k exp(a^T mu_k / beta + a^T Sigma_k a / (2 beta^2)) (normalised in log space).

  Args:
    mixture: the prior p, a `GaussianMixture` with means [M, D].
    direction: [D] the reward direction a of r(x) = a^T x.
    kl_weight: beta > 0, the weight of the KL penalty (small beta: a strong tilt).

  Returns:
    The tilted `GaussianMixture` q*.

  Example:
    >>> prior = make_mixture([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.0]], stds=1.0)
    >>> tilted = tilted_mixture(prior, [1.0, 0.0], kl_weight=1.0)
    >>> tilted.means.tolist(), round(float(tilted.weights[1]), 4)  # sigmoid(2)
    ([[0.0, 0.0], [2.0, 0.0]], 0.8808)
  """
  direction = checks.as_float("direction", direction)
  if direction.shape != (mixture.dim,):
    raise ValueError(f"direction: expected shape [D={mixture.dim}], got {tuple(direction.shape)}")
  checks.check_real("kl_weight", kl_weight, low=0.0, open_low=True)
  shift = jnp.einsum("kij,j->ki", mixture.covariances, direction) / kl_weight  # Sigma_k a / beta
  log_weights = (jnp.log(mixture.weights) + mixture.means @ direction / kl_weight
                 + 0.5 * (shift @ direction) / kl_weight)
  return GaussianMixture(jax.nn.softmax(log_weights), mixture.means + shift, mixture.covariances)


def _kernel_against_gaussians(x: jax.Array, means: jax.Array, covariances: jax.Array,
                              bandwidth: float) -> jax.Array:
  """E_{y~N(mu_k, S_k)} exp(-||x - y||^2 / (2 h^2)) = (2 pi h^2)^{D/2} N(x; mu_k, S_k + h^2 I), [..., M]."""
  dim = means.shape[-1]
  widened = covariances + bandwidth ** 2 * jnp.eye(dim, dtype=covariances.dtype)
  log_density = jax.vmap(_gaussian_log_density, in_axes=(None, 0, 0), out_axes=-1)(x, means, widened)
  return jnp.exp(log_density + 0.5 * dim * jnp.log(2 * jnp.pi * bandwidth ** 2))


def mixture_mmd(samples: ArrayLike, mixture: GaussianMixture, *, bandwidth: float = 0.5,
                unbiased: bool = True) -> jax.Array:
  """Squared MMD between a sample set and a mixture, RBF kernel exp(-||x - y||^2 / (2 h^2)).

  MMD^2 = E k(x, x') - 2 E k(x, y) + E k(y, y'), x ~ samples, y ~ mixture; the two terms with the
  mixture are exact Gaussian integrals (module docstring), the sample-sample term is the
  U-statistic over pairs i != j (`unbiased=True`: unbiased, can be slightly negative) or the
  V-statistic over all pairs (`unbiased=False`: >= 0, biased upwards by O(1/n)).

  Args:
    samples: [n, D] samples (n >= 2).
    mixture: a `GaussianMixture` with means [M, D].
    bandwidth: h > 0, the kernel length scale (about a mode's width; 0.5 for `default_mixture`).
    unbiased: U-statistic (True) or V-statistic (False).

  Returns:
    The scalar MMD^2.

  Example:
    >>> import jax
    >>> prior = default_mixture()
    >>> near = mixture_mmd(sample_mixture(prior, key=jax.random.key(0), num_samples=500), prior)
    >>> far = mixture_mmd(sample_mixture(prior, key=jax.random.key(0), num_samples=500) + 1.0, prior)
    >>> bool(abs(near) < 0.01 < far)
    True
  """
  samples = checks.as_float("samples", samples)
  if samples.ndim != 2 or samples.shape[1] != mixture.dim:
    raise ValueError(f"samples: expected shape [n, D={mixture.dim}], got {tuple(samples.shape)}")
  n = samples.shape[0]
  if n < 2:
    raise ValueError(f"samples: need at least 2 samples, got {n}")
  checks.check_real("bandwidth", bandwidth, low=0.0, open_low=True)
  if not isinstance(unbiased, (bool, np.bool_)):
    raise TypeError(f"unbiased: must be True or False, got {unbiased!r}")
  checks.check_finite("samples", samples)
  return _mmd(samples, mixture, bandwidth, unbiased)


@functools.partial(jax.jit, static_argnums=3)
def _mmd(samples: jax.Array, mixture: GaussianMixture, bandwidth: jax.Array, unbiased: bool) -> jax.Array:
  n = samples.shape[0]
  squared_norms = jnp.sum(samples ** 2, axis=-1)
  squared_distances = jnp.maximum(
      squared_norms[:, None] + squared_norms[None, :] - 2 * samples @ samples.T, 0.0)
  gram = jnp.exp(-squared_distances / (2 * bandwidth ** 2))
  if unbiased:
    sample_term = (jnp.sum(gram) - jnp.sum(jnp.diagonal(gram))) / (n * (n - 1))
  else:
    sample_term = jnp.mean(gram)
  cross_term = jnp.mean(_kernel_against_gaussians(samples, mixture.means, mixture.covariances,
                                                  bandwidth) @ mixture.weights)
  # E k(y, y') with y ~ N(mu_j, S_j), y' ~ N(mu_k, S_k): y - y' ~ N(mu_j - mu_k, S_j + S_k).
  pair_kernel = jax.vmap(
      lambda mean, covariance: _kernel_against_gaussians(
          mean, mixture.means, mixture.covariances + covariance, bandwidth))(
              mixture.means, mixture.covariances)  # [M, M]
  mixture_term = mixture.weights @ pair_kernel @ mixture.weights
  return sample_term - 2 * cross_term + mixture_term


class ConstrainedOptimum(NamedTuple):
  """The constrained optimum of a linear-reward problem on a mixture prior.

  Attributes:
    multipliers: [m] lambda* = argmin_{lambda >= 0} g(lambda).
    tilted: the optimum q_{lambda*}, the prior tilted by (a_0 + sum_i lambda*_i a_i) / beta.
  """
  multipliers: jax.Array
  tilted: GaussianMixture


def _check_linear_constraints(mixture, primary_direction, constraint_directions, thresholds,
                              kl_weight):
  primary_direction = checks.as_float("primary_direction", primary_direction)
  constraint_directions = checks.as_float("constraint_directions", constraint_directions)
  thresholds = checks.as_float("thresholds", thresholds)
  if primary_direction.shape != (mixture.dim,):
    raise ValueError(f"primary_direction: expected shape [D={mixture.dim}], got "
                     f"{tuple(primary_direction.shape)}")
  if constraint_directions.ndim != 2 or constraint_directions.shape[1] != mixture.dim \
     or constraint_directions.shape[0] == 0:
    raise ValueError(f"constraint_directions: expected shape [m >= 1, D={mixture.dim}], got "
                     f"{tuple(constraint_directions.shape)}")
  m = constraint_directions.shape[0]
  if thresholds.shape != (m,):
    raise ValueError(f"thresholds: expected shape [m={m}], got {tuple(thresholds.shape)}")
  checks.check_real("kl_weight", kl_weight, low=0.0, open_low=True)
  return primary_direction, constraint_directions, thresholds


@jax.jit
def _tilt_dual(mixture, multipliers, primary_direction, constraint_directions, thresholds,
               kl_weight):
  direction = primary_direction + multipliers @ constraint_directions  # a_0 + A^T lambda
  theta = direction / kl_weight
  log_partition = jax.nn.logsumexp(
      jnp.log(mixture.weights) + mixture.means @ theta
      + 0.5 * jnp.einsum("i,kij,j->k", theta, mixture.covariances, theta))
  tilted = tilted_mixture(mixture, direction, kl_weight=kl_weight)
  value = kl_weight * log_partition - multipliers @ thresholds
  return DualValue(value, constraint_directions @ mixture_mean(tilted) - thresholds)


def mixture_tilt_dual(mixture: GaussianMixture, multipliers: ArrayLike, *,
                      primary_direction: ArrayLike, constraint_directions: ArrayLike,
                      thresholds: ArrayLike, kl_weight: float) -> DualValue:
  """The dual g(lambda) of max_q E_q[a_0^T x] - beta KL(q || p) s.t. E_q[a_i^T x] >= b_i, in closed form.

  g(lambda) = beta logsumexp_k(log w_k + theta^T mu_k + theta^T Sigma_k theta / 2) - lambda . b,
  theta = (a_0 + A^T lambda) / beta; its gradient is A E_{q_lambda}[x] - b with q_lambda the
  tilted mixture (`tilted_mixture` with direction a_0 + A^T lambda): the constraints' slacks
  under the Lagrangian's maximiser.

  Args:
    mixture: the prior p, a `GaussianMixture` with means [M, D].
    multipliers: [m] lambda >= 0.
    primary_direction: [D] a_0 (zeros: stay closest to p while meeting the constraints).
    constraint_directions: [m, D] A, the rows a_i of r_i(x) = a_i^T x.
    thresholds: [m] b.
    kl_weight: beta > 0.

  Returns:
    `constrained.DualValue(value, gradient [m])`.

  Example:
    >>> prior = make_mixture([1.0], [[0.0, 0.0]], stds=1.0)  # N(0, I): E_{q_lambda}[x] = theta
    >>> dual = mixture_tilt_dual(prior, jnp.array([1.0]), primary_direction=jnp.zeros(2),
    ...                          constraint_directions=jnp.array([[1.0, 0.0]]),
    ...                          thresholds=jnp.array([2.0]), kl_weight=1.0)
    >>> round(float(dual.value), 4), [round(v, 4) for v in dual.gradient.tolist()]  # 1/2 - 2, 1 - 2
    (-1.5, [-1.0])

  References:
    Khalafi, Hounie, Ding, Ribeiro. NeurIPS 2025. https://arxiv.org/abs/2508.19104
  """
  primary_direction, constraint_directions, thresholds = _check_linear_constraints(
      mixture, primary_direction, constraint_directions, thresholds, kl_weight)
  multipliers = checks.as_float("multipliers", multipliers)
  if multipliers.shape != thresholds.shape:
    raise ValueError(f"multipliers: expected shape {tuple(thresholds.shape)} (one per "
                     f"constraint), got {tuple(multipliers.shape)}")
  return _tilt_dual(mixture, multipliers, primary_direction, constraint_directions, thresholds,
                    kl_weight)


def constrained_optimum(mixture: GaussianMixture, *, primary_direction: ArrayLike,
                        constraint_directions: ArrayLike, thresholds: ArrayLike,
                        kl_weight: float) -> ConstrainedOptimum:
  """lambda* = argmin_{lambda >= 0} g(lambda) (`mixture_tilt_dual`) and the constrained optimum q_{lambda*}.

  Minimised by `constrained.minimize_dual` (projected gradient with backtracking) from lambda = 0.
  When the constraints are feasible (some tilt meets them) the optimum meets every active one
  with equality and lambda*_i (E_{q*}[a_i^T x] - b_i) = 0 (complementary slackness).

  Args:
    mixture: the prior p.
    primary_direction: [D] a_0.
    constraint_directions: [m, D] A.
    thresholds: [m] b.
    kl_weight: beta > 0.

  Returns:
    `ConstrainedOptimum(multipliers [m], tilted)`.

  Example:
    >>> prior = make_mixture([1.0], [[0.0, 0.0]], stds=1.0)
    >>> # max E[x_1] - KL s.t. E[x_2] >= 1.5: theta = (1, lambda) with lambda* = 1.5
    >>> optimum = constrained_optimum(prior, primary_direction=jnp.array([1.0, 0.0]),
    ...                               constraint_directions=jnp.array([[0.0, 1.0]]),
    ...                               thresholds=jnp.array([1.5]), kl_weight=1.0)
    >>> [round(v, 3) for v in optimum.multipliers.tolist()]
    [1.5]
  """
  primary_direction, constraint_directions, thresholds = _check_linear_constraints(
      mixture, primary_direction, constraint_directions, thresholds, kl_weight)
  multipliers = _minimize_tilt_dual(mixture, primary_direction, constraint_directions, thresholds,
                                    jnp.asarray(kl_weight, primary_direction.dtype))
  tilted = tilted_mixture(mixture, primary_direction + multipliers @ constraint_directions,
                          kl_weight=kl_weight)
  return ConstrainedOptimum(multipliers, tilted)


@jax.jit
def _minimize_tilt_dual(mixture, primary_direction, constraint_directions, thresholds, kl_weight):
  def dual_fn(multipliers):
    return _tilt_dual(mixture, multipliers, primary_direction, constraint_directions, thresholds,
                      kl_weight)
  return minimize_dual(dual_fn, jnp.zeros_like(thresholds), num_iterations=2000, tolerance=1e-7)
