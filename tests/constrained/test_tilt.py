"""Tests for saferl_jax.constrained.tilt: the closed-form tilt against brute-force maximisation of
the KL-regularised Lagrangian; the dual's value and gradient against jax.grad and a float64 numpy
implementation; convexity; the dual's minimiser against L-BFGS-B with KKT and strong-duality
checks on a problem with one active and one inactive constraint; bad inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize
from scipy.special import logsumexp, softmax

from saferl_jax.constrained import DualValue, minimize_dual, tilt_dual, tilted_log_policy


def random_problem(seed, shape=(3,), num_actions=4, m=2):
  """log pi_ref [*shape, A], q_0 [*shape, A] and q [*shape, A, m] as float64 numpy arrays."""
  rng = np.random.default_rng(seed)
  log_ref = np.log(rng.dirichlet(np.ones(num_actions), size=shape))
  return log_ref, rng.normal(size=(*shape, num_actions)), rng.normal(size=(*shape, num_actions, m))


def np_dual(log_ref, q0, q, lam, b, beta):
  """(g(lambda), its gradient) by a loop over the contexts, in float64."""
  contexts = list(np.ndindex(log_ref.shape[:-1]))
  value, gradient = 0.0, np.zeros(len(lam))
  for x in contexts:
    logits = log_ref[x] + (q0[x] + q[x] @ lam) / beta
    value += beta * logsumexp(logits) / len(contexts)
    gradient += softmax(logits) @ q[x] / len(contexts)
  return value - lam @ b, gradient - b


def lagrangian(pi, log_ref, q0, q, lam, beta):
  """E_pi[q_0 + lambda . q] - beta KL(pi || pi_ref) for one context, pi [A] (b left out)."""
  support = pi > 0
  kl = np.sum(pi[support] * (np.log(pi[support]) - log_ref[support]))
  return pi @ (q0 + q @ lam) - beta * kl


# ---------------------------------------------------------------------------- the tilt


def test_tilt_maximises_the_lagrangian_over_a_fine_grid_for_two_actions():
  log_ref, q0, q = random_problem(0, shape=(), num_actions=2, m=2)
  lam, beta = np.array([0.7, 1.3]), 0.6
  grid = np.linspace(0.0, 1.0, 200_001)  # pi(a=0); spacing 5e-6
  pis = np.stack([grid, 1 - grid], axis=-1)
  with np.errstate(divide="ignore", invalid="ignore"):
    values = np.sum(pis * (q0 + q @ lam), -1) - beta * np.sum(
        np.where(pis > 0, pis * (np.log(pis) - log_ref), 0.0), -1)
  best = pis[np.argmax(values)]
  with jax.enable_x64(True):
    pi = np.exp(tilted_log_policy(log_ref, q0, q, lam, kl_weight=beta))
    dual = tilt_dual(log_ref, q0, q, lam, thresholds=np.zeros(2), kl_weight=beta)
  np.testing.assert_allclose(pi.sum(), 1.0, atol=1e-12)
  np.testing.assert_allclose(pi, best, rtol=0, atol=1e-5)  # within a grid step
  # The maximum of the Lagrangian (b = 0) is g(lambda): the grid's best is below it by
  # ~curvature * step^2, far under 1e-8.
  assert values.max() <= float(dual.value) + 1e-12
  np.testing.assert_allclose(values.max(), dual.value, rtol=0, atol=1e-8)
  assert lagrangian(pi, log_ref, q0, q, lam, beta) == pytest.approx(float(dual.value), abs=1e-12)


def test_tilt_maximises_the_lagrangian_against_a_numerical_optimiser():
  log_ref, q0, q = random_problem(1, shape=(3,), num_actions=4, m=2)
  lam, beta = np.array([0.4, 2.0]), 0.8
  with jax.enable_x64(True):
    pi = np.exp(tilted_log_policy(log_ref, q0, q, lam, kl_weight=beta))
  assert pi.shape == (3, 4)
  for x in range(3):
    def negative(logits, x=x):
      p = softmax(logits)
      # d/dp of the Lagrangian, then through the softmax: p * (g - p . g).
      g = q0[x] + q[x] @ lam - beta * (np.log(p) - log_ref[x] + 1.0)
      return -lagrangian(p, log_ref[x], q0[x], q[x], lam, beta), -p * (g - p @ g)
    result = optimize.minimize(negative, np.zeros(4), jac=True, method="BFGS",
                               options={"gtol": 1e-12, "maxiter": 1000})
    # Gradient 1e-12 in the logits: the maximiser to ~1e-10 (curvature beta / pi >= 0.8).
    np.testing.assert_allclose(pi[x], softmax(result.x), rtol=0, atol=1e-7)
    assert -result.fun <= lagrangian(pi[x], log_ref[x], q0[x], q[x], lam, beta) + 1e-12


def test_tilt_keeps_the_reference_support_and_zero_multipliers_give_the_primary_tilt():
  log_ref = np.array([np.log(0.5), -np.inf, np.log(0.5)])  # pi_ref never takes action 1
  q0, q = np.array([0.0, 5.0, 1.0]), np.array([[0.0], [9.0], [1.0]])
  log_pi = np.asarray(tilted_log_policy(log_ref, q0, q, np.array([1.0]), kl_weight=1.0),
                      np.float64)
  pi = np.exp(log_pi)
  assert pi[1] == 0.0 and np.isfinite(log_pi[[0, 2]]).all()
  np.testing.assert_allclose(pi[[0, 2]], softmax([0.0, 2.0]), rtol=1e-6)
  dual = tilt_dual(log_ref, q0, q, np.array([1.0]), thresholds=np.array([0.5]), kl_weight=1.0)
  assert np.isfinite(dual.value) and np.isfinite(dual.gradient).all()
  np.testing.assert_allclose(dual.gradient, [softmax([0.0, 2.0])[1] - 0.5], rtol=1e-6)
  # lambda = 0: the tilt by q_0 alone.
  log_ref, q0, q = random_problem(2, shape=(2,), num_actions=3, m=2)
  pi = np.exp(np.asarray(tilted_log_policy(log_ref, q0, q, np.zeros(2), kl_weight=0.5), np.float64))
  np.testing.assert_allclose(pi, softmax(log_ref + q0 / 0.5, axis=-1), rtol=1e-5)


# ---------------------------------------------------------------------------- the dual


def test_dual_value_and_gradient_against_numpy_and_autodiff():
  log_ref, q0, q = random_problem(3, shape=(2, 3), num_actions=5, m=3)  # two leading axes
  b, beta = np.array([0.2, -0.1, 0.4]), 0.7
  with jax.enable_x64(True):
    value_fn = jax.jit(lambda lam: tilt_dual(log_ref, q0, q, lam, thresholds=b, kl_weight=beta))
    for lam in [np.zeros(3), np.array([0.5, 1.5, 0.1]), np.array([3.0, 0.0, 2.0])]:
      dual = value_fn(lam)
      assert isinstance(dual, DualValue) and dual.value.shape == () and dual.gradient.shape == (3,)
      expected_value, expected_gradient = np_dual(log_ref, q0, q, lam, b, beta)
      # float64 throughout: agreement to rounding (~1e-15 relative).
      np.testing.assert_allclose(dual.value, expected_value, rtol=1e-12)
      np.testing.assert_allclose(dual.gradient, expected_gradient, rtol=1e-10, atol=1e-12)
      autodiff = jax.grad(lambda l: value_fn(l).value)(jnp.asarray(lam))
      np.testing.assert_allclose(dual.gradient, autodiff, rtol=1e-10, atol=1e-12)


def test_dual_is_convex_along_random_segments():
  log_ref, q0, q = random_problem(4, shape=(4,), num_actions=3, m=2)
  b = np.array([0.3, -0.2])
  rng = np.random.default_rng(5)
  starts, ends = rng.uniform(0, 3, size=(2, 200, 2))
  with jax.enable_x64(True):
    value = jax.jit(jax.vmap(
        lambda lam: tilt_dual(log_ref, q0, q, lam, thresholds=b, kl_weight=0.4).value))
    start, end, middle = np.asarray(value(jnp.asarray(
        np.concatenate([starts, ends, (starts + ends) / 2])))).reshape(3, -1)
  chord = (start + end) / 2
  gap = chord - middle
  # Convexity: g(mid) <= chord, up to float64 rounding of values of size ~10.
  assert gap.min() >= -1e-12
  assert gap.max() > 1e-3  # strictly convex here: the check is not vacuous


def active_inactive_problem():
  """A problem with m = 2 whose constraint 1 is active at the optimum and constraint 2 inactive.

  b_1 lies halfway between E[q_1] under the lambda = 0 tilt and the best achievable mean_x max_a
  q_1 (strictly feasible, and violated at lambda = 0, so lambda*_1 > 0); b_2 lies below every
  q_2, so any policy meets it strictly and lambda*_2 = 0.
  """
  log_ref, q0, q = random_problem(6, shape=(3,), num_actions=4, m=2)
  beta = 0.5
  unconstrained = softmax(log_ref + q0 / beta, axis=-1)
  free_mean = np.mean(np.sum(unconstrained * q[..., 0], -1))
  b = np.array([free_mean + 0.5 * (q[..., 0].max(-1).mean() - free_mean), q[..., 1].min() - 0.5])
  return log_ref, q0, q, b, beta


@functools.lru_cache(maxsize=1)
def float64_minimiser():
  """minimize_dual's lambda* of `active_inactive_problem` in float64 (computed once)."""
  log_ref, q0, q, b, beta = active_inactive_problem()
  with jax.enable_x64(True):
    dual_fn = lambda lam: tilt_dual(log_ref, q0, q, lam, thresholds=b, kl_weight=beta)
    return np.asarray(minimize_dual(dual_fn, jnp.ones(2), num_iterations=2000, tolerance=1e-12))


@pytest.mark.slow
def test_minimize_dual_matches_lbfgsb_with_kkt_and_strong_duality():
  log_ref, q0, q, b, beta = active_inactive_problem()
  lam_star = float64_minimiser()
  result = optimize.minimize(lambda lam: np_dual(log_ref, q0, q, lam, b, beta), np.ones(2),
                             jac=True, method="L-BFGS-B", bounds=[(0, None)] * 2,
                             options={"ftol": 1e-15, "gtol": 1e-11, "maxiter": 1000})
  assert result.success
  with jax.enable_x64(True):
    dual_fn = lambda lam: tilt_dual(log_ref, q0, q, lam, thresholds=b, kl_weight=beta)
    dual = dual_fn(lam_star)
    pi = np.exp(np.asarray(tilted_log_policy(log_ref, q0, q, lam_star, kl_weight=beta)))
  assert lam_star[0] > 0.1 and lam_star[1] == 0.0  # one active, one inactive (projected to 0)
  # The curvature of g along lambda_1 at lambda*, mean_x Var_pi[q_1] / beta, is 0.88: L-BFGS-B's
  # projected-gradient tolerance 1e-11 means a lambda error ~1e-11; 1e-7 allows a wide margin.
  variance = np.mean(np.sum(pi * q[..., 0] ** 2, -1) - np.sum(pi * q[..., 0], -1) ** 2)
  assert variance / beta > 0.5
  np.testing.assert_allclose(lam_star, result.x, rtol=0, atol=1e-7)
  # KKT: zero gradient where lambda > 0, non-negative where lambda = 0.
  assert abs(float(dual.gradient[0])) < 1e-9
  assert float(dual.gradient[1]) > 0.1
  # Strong duality: the tilted policy at lambda* is feasible, complementary slack, and its
  # primal objective equals g(lambda*).
  slack = np.mean(np.einsum("xa,xam->xm", pi, q), 0) - b
  np.testing.assert_allclose(slack, dual.gradient, rtol=1e-10, atol=1e-12)
  assert (slack >= -1e-9).all()
  assert np.abs(lam_star * slack).max() < 1e-9
  primal = np.mean([lagrangian(pi[x], log_ref[x], q0[x], q[x], np.zeros(2), beta)
                    for x in range(3)])
  np.testing.assert_allclose(primal, dual.value, rtol=0, atol=1e-9)


@pytest.mark.slow
def test_minimize_dual_in_float32_is_close_to_the_float64_minimiser():
  log_ref, q0, q, b, beta = active_inactive_problem()
  exact = float64_minimiser()
  lam32 = minimize_dual(lambda lam: tilt_dual(log_ref, q0, q, lam, thresholds=b, kl_weight=beta),
                        jnp.zeros(2, jnp.float32))
  assert lam32.dtype == jnp.float32
  # float32 gradients carry ~1e-6 error; over the curvature 0.88 that is ~1e-6 in lambda (the
  # Newton steps' stop at a relative step 1e-5 leaves about its square): 1e-4 leaves a wide
  # margin and still fails a wrong minimiser (lambda*_1 = 1.08).
  np.testing.assert_allclose(lam32, exact, rtol=0, atol=1e-4)


def test_minimize_dual_vmaps_over_thresholds_at_a_small_kl_weight():
  # beta = 0.05 (a sharply curved dual) with m = 3: all three constraints active for one set of
  # thresholds, one inactive for the other.
  log_ref, q0, q = random_problem(7, shape=(5,), num_actions=6, m=3)
  beta = 0.05
  free_mean = np.mean(np.einsum("xa,xam->xm", softmax(log_ref + q0 / beta, axis=-1), q), 0)
  best = q.max(-2).mean(0)
  thresholds = free_mean + np.array([[0.3, 0.4, 0.2], [0.3, -0.5, 0.4]]) * (best - free_mean)

  @jax.jit
  @jax.vmap
  def solve(b):
    return minimize_dual(lambda lam: tilt_dual(log_ref, q0, q, lam, thresholds=b, kl_weight=beta),
                         jnp.zeros(3))

  batched = np.asarray(solve(jnp.asarray(thresholds, jnp.float32)))
  for b, lam in zip(thresholds, batched):
    result = optimize.minimize(lambda l, b=b: np_dual(log_ref, q0, q, l, b, beta), np.ones(3),
                               jac=True, method="L-BFGS-B", bounds=[(0, None)] * 3,
                               options={"ftol": 1e-15, "gtol": 1e-11, "maxiter": 1000})
    assert result.success
    # float32 gradients (~1e-7 relative) over the curvature Var[q] / beta: errors of a few 1e-6
    # (seen up to 3e-6 on such problems); 1e-4 still fails a wrong active set or a stalled solve.
    np.testing.assert_allclose(lam, result.x, rtol=0, atol=1e-4)
  assert (batched[0] > 0.01).all() and batched[1][1] == 0.0 and (batched[1][[0, 2]] > 0.01).all()


# ---------------------------------------------------------------------------- bad inputs


LOG_REF, Q0, Q = (np.log(np.full((2, 3), 1 / 3)), np.zeros((2, 3)), np.zeros((2, 3, 2)))


@pytest.mark.parametrize("change,error,name", [
    ({"kl_weight": 0.0}, ValueError, "kl_weight"),
    ({"kl_weight": -1.0}, ValueError, "kl_weight"),
    ({"kl_weight": None}, TypeError, "kl_weight"),
    ({"reference_log_probs": np.float64(0.0)}, ValueError, "reference_log_probs"),
    ({"primary": np.zeros((2, 4))}, ValueError, "primary"),
    ({"constraints": np.zeros((2, 3, 3))}, ValueError, "constraints"),
    ({"constraints": np.zeros((2, 3))}, ValueError, "constraints"),
    ({"multipliers": np.zeros((1, 2))}, ValueError, "multipliers"),
    ({"thresholds": np.zeros(3)}, ValueError, "thresholds"),
])
def test_bad_tilt_inputs_name_the_argument(change, error, name):
  arguments = {"reference_log_probs": LOG_REF, "primary": Q0, "constraints": Q,
               "multipliers": np.zeros(2), "thresholds": np.zeros(2), "kl_weight": 1.0}
  arguments.update(change)
  with pytest.raises(error, match=name):
    tilt_dual(**arguments)
  if name != "thresholds":
    del arguments["thresholds"]
    with pytest.raises(error, match=name):
      tilted_log_policy(**arguments)


def quadratic(lam):
  return DualValue(0.5 * jnp.sum(lam ** 2), lam)


@pytest.mark.parametrize("call,error,name", [
    (lambda: minimize_dual(quadratic, jnp.zeros((1, 2))), ValueError, "initial"),
    (lambda: minimize_dual(quadratic, jnp.zeros(2), num_iterations=0), ValueError,
     "num_iterations"),
    (lambda: minimize_dual(quadratic, jnp.zeros(2), tolerance=-1.0), ValueError, "tolerance"),
    (lambda: minimize_dual("g", jnp.zeros(2)), TypeError, "dual_fn"),
])
def test_bad_minimize_dual_inputs_name_the_argument(call, error, name):
  with pytest.raises(error, match=name):
    call()
