"""Tests for saferl_jax.constrained.duals: dual descent, nu-PI and simplex descent against steps
computed by hand and by independent float64 numpy loops; the projection at 0; nu-PI with k_P = 0
is dual descent; jit and vmap over seeds equal a loop; the simplex projection against bisection on
its threshold and a generic constrained solver; the Lagrangian reward; bad inputs."""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra import numpy as hnp
from scipy import optimize

from saferl_jax.constrained import (DualOptimizer, DualState, dual_descent, lagrangian_reward,
                                    nu_pi, project_simplex, simplex_descent)

# Four rounds of slacks s = rbar - b for m = 3 constraints (rows: rounds).
SLACKS = np.array([[-0.4, 4.0, 0.3], [0.1, -2.0, -0.5], [0.6, 0.5, -1.0], [-0.2, -0.1, 0.05]])
START = np.array([0.0, 1.0, 0.2])
# float32 arithmetic on numbers of order 1 over a few steps: a few ulps (1.2e-7 each).
F32_TOL = 1e-6


def run(dual: DualOptimizer, start, slacks):
  """The multipliers and smoothed errors after each update, eagerly, as float64 arrays."""
  state = dual.init(jnp.asarray(start))
  multipliers, errors = [], []
  for s in slacks:
    state = dual.update(state, jnp.asarray(s))
    multipliers.append(np.asarray(state.multipliers, np.float64))
    errors.append(np.asarray(state.error_average, np.float64))
  return np.array(multipliers), np.array(errors)


def np_dual_descent(start, slacks, eta):
  lam, out = np.array(start, np.float64), []
  for s in slacks:
    lam = np.maximum(lam - eta * s, 0.0)
    out.append(lam)
  return np.array(out)


def np_nu_pi(start, slacks, k_i, k_p, nu):
  lam, xi, out = np.array(start, np.float64), np.zeros(len(start)), []
  for s in slacks:
    e = -s
    xi_new = nu * xi + (1 - nu) * e
    lam = np.maximum(lam + k_i * e + k_p * (xi_new - xi), 0.0)
    xi = xi_new
    out.append(lam)
  return np.array(out)


def np_project_simplex(v):
  """Bisection on tau in sum_i max(v_i - tau, 0) = 1 (decreasing in tau), in float64."""
  v = np.asarray(v, np.float64)
  low, high = v.min() - 1.0, v.max()  # the sum is >= 1 at low, 0 at high
  for _ in range(200):
    mid = 0.5 * (low + high)
    if np.maximum(v - mid, 0.0).sum() > 1.0:
      low = mid
    else:
      high = mid
  return np.maximum(v - 0.5 * (low + high), 0.0)


# ---------------------------------------------------------------------------- dual descent


def test_dual_descent_steps_by_hand():
  multipliers, errors = run(dual_descent(0.5), START, SLACKS)
  # lambda <- max(0, lambda - 0.5 s), by hand:
  # [0, 1, .2] -> [.2, 0, .05] -> [.15, 1, .3] -> [0, .75, .8] -> [.1, .8, .775]
  expected = [[0.2, 0.0, 0.05], [0.15, 1.0, 0.3], [0.0, 0.75, 0.8], [0.1, 0.8, 0.775]]
  np.testing.assert_allclose(multipliers, expected, rtol=0, atol=F32_TOL)
  np.testing.assert_array_equal(errors, 0.0)


def test_dual_descent_matches_numpy_over_many_rounds():
  slacks = np.random.default_rng(1).normal(size=(30, 3))
  multipliers, _ = run(dual_descent(0.3), START, slacks)
  # 30 float32 steps, each |lambda| <= ~5: rounding accumulates to a few 1e-6 at most.
  np.testing.assert_allclose(multipliers, np_dual_descent(START, slacks, 0.3), rtol=0, atol=1e-5)


def test_dual_descent_projects_at_zero():
  dual = dual_descent(0.5)
  state = dual.update(dual.init(jnp.array([0.1])), jnp.array([1.0]))  # 0.1 - 0.5 clipped to 0
  assert state.multipliers.tolist() == [0.0]
  # The next violated step grows from 0, not from the unprojected -0.4.
  state = dual.update(state, jnp.array([-0.2]))
  np.testing.assert_allclose(state.multipliers, [0.1], rtol=1e-6)
  # A met constraint keeps a zero multiplier at zero (never negative).
  assert dual.update(state, jnp.array([10.0])).multipliers.tolist() == [0.0]


# ---------------------------------------------------------------------------- nu-PI


def test_nu_pi_steps_by_hand():
  multipliers, errors = run(nu_pi(integral_gain=0.5, proportional_gain=1.0, nu=0.5), START, SLACKS)
  # e = -s; xi' = (xi + e) / 2; lambda <- max(0, lambda + e / 2 + (xi' - xi)), by hand:
  # round 1: e = [.4, -4, -.3], xi' = [.2, -2, -.15], lambda = [.4, max(0, -3), max(0, -.1)]
  # round 2: e = [-.1, 2, .5], xi' = [.05, 0, .175], lambda = [.2, 3, .575]
  # round 3: e = [-.6, -.5, 1], xi' = [-.275, -.25, .5875], lambda = [max(0, -.425), 2.5, 1.4875]
  # round 4: e = [.2, .1, -.05], xi' = [-.0375, -.075, .26875], lambda = [.3375, 2.725, 1.14375]
  expected_multipliers = [[0.4, 0.0, 0.0], [0.2, 3.0, 0.575], [0.0, 2.5, 1.4875],
                          [0.3375, 2.725, 1.14375]]
  expected_errors = [[0.2, -2.0, -0.15], [0.05, 0.0, 0.175], [-0.275, -0.25, 0.5875],
                     [-0.0375, -0.075, 0.26875]]
  np.testing.assert_allclose(multipliers, expected_multipliers, rtol=0, atol=F32_TOL)
  np.testing.assert_allclose(errors, expected_errors, rtol=0, atol=F32_TOL)


@pytest.mark.parametrize("k_i,k_p,nu", [(0.3, 0.7, 0.0), (0.2, 2.0, 0.9)])
def test_nu_pi_matches_numpy_over_many_rounds(k_i, k_p, nu):
  slacks = np.random.default_rng(2).normal(size=(30, 3))
  multipliers, _ = run(nu_pi(integral_gain=k_i, proportional_gain=k_p, nu=nu), START, slacks)
  np.testing.assert_allclose(multipliers, np_nu_pi(START, slacks, k_i, k_p, nu), rtol=0, atol=1e-5)


@pytest.mark.parametrize("nu", [0.0, 0.6])
def test_nu_pi_without_proportional_gain_is_dual_descent(nu):
  slacks = np.random.default_rng(3).normal(size=(20, 3))
  pi, _ = run(nu_pi(integral_gain=0.4, proportional_gain=0.0, nu=nu), START, slacks)
  descent, _ = run(dual_descent(0.4), START, slacks)
  # lambda + 0.4 (-s) + 0 (...) and lambda - 0.4 s are the same float operations.
  np.testing.assert_array_equal(pi, descent)


# ---------------------------------------------------------------------------- simplex descent


def test_simplex_descent_steps_by_hand():
  dual = simplex_descent(0.1)
  state = dual.init(jnp.array([0.5, 0.3, 0.2]))
  # KLs 2, 1, .5 (s = -KL): v = [.7, .4, .25] sums to 1.35, all stay active, tau = .35 / 3.
  state = dual.update(state, jnp.array([-2.0, -1.0, -0.5]))
  np.testing.assert_allclose(state.multipliers, np.array([0.7, 0.4, 0.25]) - 0.35 / 3, atol=F32_TOL)
  # From [.5, .3, .2] with s = [-5, 1, 2]: v = [1, .2, 0]; the last leaves the support
  # (0 < (1.2 - 1) / 3), tau = (1.2 - 1) / 2 = .1: [.9, .1, 0].
  state = dual.update(dual.init(jnp.array([0.5, 0.3, 0.2])), jnp.array([-5.0, 1.0, 2.0]))
  np.testing.assert_allclose(state.multipliers, [0.9, 0.1, 0.0], rtol=0, atol=F32_TOL)
  np.testing.assert_array_equal(state.error_average, 0.0)


def test_simplex_descent_matches_numpy_over_many_rounds():
  slacks = np.random.default_rng(4).normal(size=(30, 4))
  start = np.array([0.1, 0.2, 0.3, 0.4])
  multipliers, _ = run(simplex_descent(0.3), start, slacks)
  expected, mu = [], start
  for s in slacks:
    mu = np_project_simplex(mu - 0.3 * s)
    expected.append(mu)
  np.testing.assert_allclose(multipliers, expected, rtol=0, atol=1e-5)
  np.testing.assert_allclose(multipliers.sum(-1), 1.0, atol=1e-5)
  assert (multipliers >= 0).all()


def test_simplex_descent_ignores_a_constant_added_to_every_slack():
  dual = simplex_descent(0.2)
  state = dual.init(jnp.array([0.25, 0.25, 0.5]))
  slacks = jnp.array([-1.0, 0.5, 0.3])
  np.testing.assert_allclose(dual.update(state, slacks + 7.0).multipliers,
                             dual.update(state, slacks).multipliers, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- jit and vmap


@pytest.mark.parametrize("make,start", [
    (lambda: dual_descent(0.3), START),
    (lambda: nu_pi(integral_gain=0.3, proportional_gain=0.8, nu=0.5), START),
    (lambda: simplex_descent(0.3), np.array([0.2, 0.3, 0.5])),
])
def test_jit_and_vmap_over_seeds_equal_a_loop(make, start):
  dual = make()
  slacks = np.random.default_rng(5).normal(size=(4, 12, 3))  # 4 seeds x 12 rounds

  @jax.jit
  def run_all(starts, all_slacks):
    def one_seed(start, seed_slacks):
      final, history = jax.lax.scan(lambda state, s: (dual.update(state, s),) * 2,
                                    dual.init(start), seed_slacks)
      return final, history
    return jax.vmap(one_seed)(starts, all_slacks)

  starts = jnp.tile(jnp.asarray(start, jnp.float32), (4, 1))
  final, history = run_all(starts, jnp.asarray(slacks, jnp.float32))
  for seed in range(4):
    multipliers, errors = run(dual, start, slacks[seed])
    # The same float32 operations compiled (fused) or eager: rounding may differ by an ulp.
    np.testing.assert_allclose(history.multipliers[seed], multipliers, rtol=0, atol=F32_TOL)
    np.testing.assert_allclose(history.error_average[seed], errors, rtol=0, atol=F32_TOL)
    np.testing.assert_allclose(final.multipliers[seed], multipliers[-1], rtol=0, atol=F32_TOL)
  assert isinstance(final, DualState)


# ---------------------------------------------------------------------------- simplex projection


def test_project_simplex_matches_a_generic_constrained_solver():
  v = np.array([0.8, -0.3, 0.6, 1.1, 0.05])
  result = optimize.minimize(lambda mu: 0.5 * np.sum((mu - v) ** 2), np.full(5, 0.2),
                             jac=lambda mu: mu - v, method="SLSQP", bounds=[(0, None)] * 5,
                             constraints=[{"type": "eq", "fun": lambda mu: mu.sum() - 1.0,
                                           "jac": lambda mu: np.ones(5)}],
                             options={"ftol": 1e-14, "maxiter": 200})
  assert result.success
  # SLSQP's ftol 1e-14 on a quadratic with unit curvature: mu to ~1e-7; float32 to ~1e-7.
  np.testing.assert_allclose(project_simplex(jnp.asarray(v)), result.x, rtol=0, atol=1e-5)
  np.testing.assert_allclose(np_project_simplex(v), result.x, rtol=0, atol=1e-6)


# In float64 the sort, cumsum and threshold of <= 6 numbers of size <= 10 lose ~1e-14; the
# bisection reference is exact to ~1e-15.
X64_TOL = 1e-12
VALUES = hnp.arrays(np.float64, st.integers(1, 6),
                    elements=st.floats(-5, 5, allow_nan=False, allow_subnormal=False))


project_simplex_jit = jax.jit(project_simplex)  # one compilation per shape, not one per op


@settings(max_examples=25)
@given(values=VALUES, shift=st.floats(-3, 3, allow_subnormal=False))
def test_project_simplex_properties(values, shift):
  with jax.enable_x64(True):
    projected = np.asarray(project_simplex_jit(jnp.asarray(values)))
    assert projected.dtype == np.float64
    assert (projected >= 0).all()
    np.testing.assert_allclose(projected.sum(), 1.0, atol=X64_TOL)
    np.testing.assert_allclose(projected, np_project_simplex(values), rtol=0, atol=X64_TOL)
    np.testing.assert_allclose(project_simplex_jit(jnp.asarray(projected)), projected, rtol=0,
                               atol=X64_TOL)  # idempotent
    np.testing.assert_allclose(project_simplex_jit(jnp.asarray(values + shift)), projected, rtol=0,
                               atol=X64_TOL)  # invariant to a constant


def test_project_simplex_over_leading_axes_projects_each_row():
  values = np.random.default_rng(6).normal(scale=2.0, size=(2, 3, 4))
  projected = np.asarray(project_simplex(jnp.asarray(values, jnp.float32)))
  assert projected.shape == (2, 3, 4)
  expected = np.array([[np_project_simplex(row) for row in block] for block in values])
  np.testing.assert_allclose(projected, expected, rtol=0, atol=1e-6)  # float32, values ~ 2


def test_project_simplex_keeps_points_on_the_simplex_and_handles_ties():
  np.testing.assert_array_equal(project_simplex(jnp.array([0.0, 1.0, 0.0])), [0.0, 1.0, 0.0])
  np.testing.assert_allclose(project_simplex(jnp.full(4, 3.0)), np.full(4, 0.25), atol=1e-7)
  np.testing.assert_array_equal(project_simplex(jnp.array([-2.0])), [1.0])


# ---------------------------------------------------------------------------- Lagrangian reward


def test_lagrangian_reward_by_hand():
  primary = np.array([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
  constraints = np.arange(12, dtype=np.float64).reshape(2, 3, 2) / 4  # [2, 3, m = 2]
  multipliers, thresholds = np.array([2.0, 0.5]), np.array([1.0, -1.0])
  reward = lagrangian_reward(jnp.asarray(primary), jnp.asarray(constraints),
                             jnp.asarray(multipliers), thresholds=jnp.asarray(thresholds))
  assert reward.shape == (2, 3)
  # Sample [0, 0]: r = (0, .25): 1 + 2 (0 - 1) + .5 (.25 + 1) = -0.375.
  # Sample [1, 2]: r = (2.5, 2.75): 0 + 2 (2.5 - 1) + .5 (2.75 + 1) = 4.875.
  assert float(reward[0, 0]) == pytest.approx(-0.375, abs=1e-6)
  assert float(reward[1, 2]) == pytest.approx(4.875, abs=1e-6)
  expected = np.zeros((2, 3))
  for index in np.ndindex(2, 3):
    expected[index] = primary[index] + sum(multipliers[i] * (constraints[index][i] - thresholds[i])
                                           for i in range(2))
  np.testing.assert_allclose(reward, expected, rtol=1e-6)  # float32, values of order 1


def test_lagrangian_reward_with_zero_multipliers_is_the_primary_reward():
  primary = jnp.array([0.3, -1.2])
  reward = lagrangian_reward(primary, jnp.ones((2, 3)), jnp.zeros(3), thresholds=jnp.full(3, 5.0))
  np.testing.assert_array_equal(reward, primary)


# ---------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("build,error,name", [
    (lambda: dual_descent(0.0), ValueError, "learning_rate"),
    (lambda: dual_descent(-0.1), ValueError, "learning_rate"),
    (lambda: dual_descent(float("nan")), ValueError, "learning_rate"),
    (lambda: dual_descent(True), TypeError, "learning_rate"),
    (lambda: dual_descent("0.1"), TypeError, "learning_rate"),
    (lambda: simplex_descent(0.0), ValueError, "learning_rate"),
    (lambda: nu_pi(integral_gain=0.0, proportional_gain=1.0, nu=0.5), ValueError, "integral_gain"),
    (lambda: nu_pi(integral_gain=0.1, proportional_gain=-1.0, nu=0.5), ValueError,
     "proportional_gain"),
    (lambda: nu_pi(integral_gain=0.1, proportional_gain=1.0, nu=1.0), ValueError, "nu"),
    (lambda: nu_pi(integral_gain=0.1, proportional_gain=1.0, nu=-0.1), ValueError, "nu"),
])
def test_bad_options_name_the_argument(build, error, name):
  with pytest.raises(error, match=name):
    build()


@pytest.mark.parametrize("dual", [dual_descent(0.1),
                                  nu_pi(integral_gain=0.1, proportional_gain=0.1, nu=0.5),
                                  simplex_descent(0.1)], ids=["descent", "nu_pi", "simplex"])
@pytest.mark.parametrize("multipliers", [[0.5, -0.5], [[0.5, 0.5]], [], [float("nan"), 1.0], 0.5],
                         ids=["negative", "2d", "empty", "nan", "scalar"])
def test_bad_initial_multipliers_name_the_argument(dual, multipliers):
  with pytest.raises(ValueError, match="multipliers"):
    dual.init(np.asarray(multipliers, np.float64))


def test_simplex_init_wants_weights_summing_to_one():
  with pytest.raises(ValueError, match="multipliers.*sum to 1"):
    simplex_descent(0.1).init(jnp.array([0.5, 0.4]))
  with pytest.raises(ValueError, match="multipliers.*sum to 1"):
    simplex_descent(0.1).init(jnp.array([0.0, 0.0]))
  dual_descent(0.1).init(jnp.array([0.5, 0.4]))  # any lambda >= 0 is fine off the simplex


def test_bad_updates_name_the_argument():
  dual = dual_descent(0.1)
  state = dual.init(jnp.zeros(2))
  with pytest.raises(ValueError, match="slacks"):
    dual.update(state, jnp.zeros(3))
  with pytest.raises(ValueError, match="slacks"):
    dual.update(state, jnp.zeros((1, 2)))
  with pytest.raises(TypeError, match="state"):
    dual.update((jnp.zeros(2), jnp.zeros(2)), jnp.zeros(2))


def test_bad_projection_inputs_name_the_argument():
  with pytest.raises(ValueError, match="values"):
    project_simplex(jnp.float32(1.0))
  with pytest.raises(ValueError, match="values"):
    project_simplex(jnp.zeros((2, 0)))


@pytest.mark.parametrize("primary,constraints,multipliers,thresholds,name", [
    (np.zeros(3), np.zeros((3, 2)), np.zeros(2), np.zeros(3), "thresholds"),
    (np.zeros(3), np.zeros((3, 3)), np.zeros(2), np.zeros(2), "constraints"),
    (np.zeros(3), np.zeros((4, 2)), np.zeros(2), np.zeros(2), "constraints"),
    (np.zeros(3), np.zeros((3, 2)), np.zeros((1, 2)), np.zeros(2), "multipliers"),
    (np.zeros(3), np.zeros((3, 2)), np.zeros(2), np.zeros((2, 1)), "thresholds"),
    (np.zeros(3), np.zeros((3, 0)), np.zeros(0), np.zeros(0), "multipliers"),
])
def test_bad_lagrangian_inputs_name_the_argument(primary, constraints, multipliers, thresholds,
                                                 name):
  with pytest.raises(ValueError, match=name):
    lagrangian_reward(primary, constraints, multipliers, thresholds=thresholds)
