"""Rectified flow: the SDE step's mean, std and log-density against Flow-GRPO's formula written
independently in float64 numpy; sampled chains on linear-Gaussian data against the exact float64
propagation of their Gaussian marginals, which approach the continuous marginals as the steps
shrink, for the SDE and the ODE alike; the schedule and its grid; the flow-matching loss against
its closed-form minimum; jit/vmap, gradients, extreme times and input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax.diffusion.flow import (FlowSchedule, _flow_mean_std, check_flow_schedule,
                                       flow_matching_loss, flow_ode_step, flow_schedule,
                                       flow_sde_step, flow_step_log_prob, flow_timesteps)

RNG = np.random.default_rng(0)
X_T = RNG.normal(size=(2, 3))
V = RNG.normal(size=(2, 3))
F32_EPS = float(np.finfo(np.float32).eps)

# Linear-Gaussian data x_0 ~ N(M, S^2 I): x_t = (1 - t) x_0 + t eps is Gaussian with mean
# mu_t = (1 - t) M and variance V_t = (1 - t)^2 S^2 + t^2, and the exact velocity
# E[eps - x_0 | x_t] = k_t (x_t - mu_t) - M with k_t = Cov(eps - x_0, x_t) / V_t
# = (t - (1 - t) S^2) / V_t is affine in x_t, so every step maps a Gaussian to a Gaussian.
M = np.array([1.0, -0.5])
S = 0.5


def marginal(t):
  """The continuous marginal of x_t: mean [2], variance (float64)."""
  return (1 - t) * M, (1 - t) ** 2 * S**2 + t**2


def exact_velocity(x, t, xp=np):
  mean, var = marginal(t)
  k = (t - (1 - t) * S**2) / var
  return k * (x - xp.asarray(mean, x.dtype)) - xp.asarray(M, x.dtype)


def np_step(x_t, v, t, t_prev, a):
  """Flow-GRPO's SDE step as SPEC section 4 writes it, float64."""
  t, t_prev = float(t), float(t_prev)
  h = t - t_prev
  sigma = a * np.sqrt(t / (1 - t))
  mu = x_t - h * (v + sigma**2 / (2 * t) * (x_t + (1 - t) * v))
  return mu, sigma * np.sqrt(h)


def np_log_density(x, mu, std):
  return np.sum(-0.5 * ((x - mu) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi))


def f32(value):
  """A time as the library holds it, so that the float64 reference sees the same number."""
  return float(np.float32(value))


CASES = [(0.97, 0.92, 0.7), (0.5, 0.45, 1.0), (0.05, 0.0, 0.7), (0.999, 0.99, 0.3),
         (0.3, 0.1, 2.0)]


@pytest.mark.parametrize("t, t_prev, eta", CASES)
def test_against_the_flow_grpo_formula(t, t_prev, eta):
  t, t_prev = f32(t), f32(t_prev)
  mu, std = np_step(X_T, V, t, t_prev, eta)
  out = flow_sde_step(X_T, V, t, t_prev, key=jax.random.key(1), eta=eta)
  # A few float32 operations on each number: a relative error of a few eps.
  tol = 8 * F32_EPS
  np.testing.assert_allclose(out.std, std, rtol=tol)
  scale = np.abs(X_T) + np.abs(V)
  np.testing.assert_array_less(np.abs(out.mean - mu), tol * (np.abs(mu) + 2 * scale))
  # The returned log-prob is the Gaussian density of the returned sample; its error is what the
  # float32 mean and std errors above move it by:
  # sum_j |z_j| |d mu_j| / std + (z_j^2 + 1) |d std| / std.
  x_prev = np.asarray(out.x_prev, np.float64)
  z = (x_prev - mu) / std
  bound = np.sum(np.abs(z) * tol * (np.abs(mu) + 2 * scale) / std + (z**2 + 1) * tol) + 1e-6
  assert abs(float(out.log_prob) - np_log_density(x_prev, mu, std)) < bound
  by_scipy = jnp.sum(jax.scipy.stats.norm.logpdf(out.x_prev, out.mean, out.std))
  np.testing.assert_allclose(out.log_prob, by_scipy, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(flow_step_log_prob(out.x_prev, X_T, V, t, t_prev, eta=eta),
                             out.log_prob, rtol=1e-6)


def test_eta_zero_is_the_euler_step_with_std_zero():
  for t, t_prev in [(0.97, 0.8), (0.3, 0.0)]:
    mean, std = jax.jit(_flow_mean_std)(jnp.asarray(X_T, jnp.float32), jnp.asarray(V, jnp.float32),
                                        t, t_prev, 0.0)
    assert float(std) == 0.0
    # Equal up to the rounding of one fused multiply-add (XLA may fuse either).
    np.testing.assert_allclose(mean, flow_ode_step(X_T, V, t, t_prev), rtol=0, atol=4 * F32_EPS)
    np.testing.assert_allclose(mean, X_T - (t - t_prev) * V, rtol=0, atol=4 * F32_EPS)


def test_reduce_mean_is_one_over_d_of_sum():
  key = jax.random.key(2)
  total = flow_sde_step(X_T, V, 0.6, 0.5, key=key, eta=0.7, reduce="sum")
  mean = flow_sde_step(X_T, V, 0.6, 0.5, key=key, eta=0.7, reduce="mean")
  np.testing.assert_array_equal(total.x_prev, mean.x_prev)
  np.testing.assert_allclose(mean.log_prob, total.log_prob / X_T.size, rtol=1e-6)
  np.testing.assert_allclose(
      flow_step_log_prob(total.x_prev, X_T, V, 0.6, 0.5, eta=0.7, reduce="mean"), mean.log_prob,
      rtol=1e-6)


def test_gradient_with_respect_to_the_velocity():
  # d/dv log N(x'; mu, std^2) = (x' - mu) / std^2 * d mu / dv, with d mu / dv = -h (1 + a^2 / 2).
  t, t_prev, eta = f32(0.8), f32(0.7), 0.9
  x_prev = RNG.normal(size=(2, 3))
  mu, std = np_step(X_T, V, t, t_prev, eta)
  expected = (x_prev - mu) / std**2 * (-(t - t_prev) * (1 + eta**2 / 2))
  grad = jax.grad(lambda v: flow_step_log_prob(x_prev, X_T, v, t, t_prev, eta=eta))(
      jnp.asarray(V, jnp.float32))
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)


def test_jit_and_vmap_equal_eager_and_a_loop():
  b = 4
  xs = jnp.asarray(RNG.normal(size=(b, 2, 3)), jnp.float32)
  vs = jnp.asarray(RNG.normal(size=(b, 2, 3)), jnp.float32)
  ts = jnp.array([0.97, 0.5, 0.2, 0.05])
  prevs = jnp.array([0.9, 0.4, 0.0, 0.0])
  keys = jax.random.split(jax.random.key(3), b)
  step = lambda x, v, t, tp, k: flow_sde_step(x, v, t, tp, key=k, eta=0.7)
  batched = jax.vmap(step)(xs, vs, ts, prevs, keys)
  jitted_step = jax.jit(step)
  for i in range(b):
    one = step(xs[i], vs[i], float(ts[i]), float(prevs[i]), keys[i])
    jitted = jitted_step(xs[i], vs[i], ts[i], prevs[i], keys[i])
    for field in range(4):
      np.testing.assert_allclose(batched[field][i], one[field], rtol=1e-6, atol=1e-6)
      np.testing.assert_allclose(jitted[field], one[field], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(flow_ode_step)(xs[i], vs[i], ts[i], prevs[i]),
                               flow_ode_step(xs[i], vs[i], float(ts[i]), float(prevs[i])),
                               rtol=1e-6)
  lp = jax.vmap(lambda xp, x, v, t, tp: flow_step_log_prob(xp, x, v, t, tp, eta=0.7))(
      batched.x_prev, xs, vs, ts, prevs)
  np.testing.assert_allclose(lp, batched.log_prob, rtol=1e-6)


# Whole chains on linear-Gaussian data.


def chain_coefficients(schedule, steps, eta):
  """Each step's map of the library, x -> A x + B + std z (A, B [S, 2], std [S]), read off the
  library's own kernel with the exact velocity (the step is affine in x), in float64; for several
  grids at once (one compilation): a list, one (A, B, std, timesteps) per number of steps."""
  grids = [flow_timesteps(schedule, num_steps) for num_steps in steps]
  t = jnp.concatenate([g.timesteps for g in grids])
  t_prev = jnp.concatenate([g.previous for g in grids])

  @jax.jit
  def coefficients(t, t_prev, eta):
    def one(t, t_prev):
      x = jnp.stack([jnp.zeros(2), jnp.ones(2)])
      step = lambda x: _flow_mean_std(x, exact_velocity(x, t, jnp), t, t_prev, eta)
      mean, std = jax.vmap(step)(x)
      return mean[1] - mean[0], mean[0], std[0]
    return jax.vmap(one)(t, t_prev)
  a, b, std = (np.asarray(v, np.float64) for v in coefficients(t, t_prev, jnp.float32(eta)))
  bounds = np.cumsum([0] + list(steps))
  return [(a[i:j], b[i:j], std[i:j], np.asarray(t[i:j], np.float64))
          for i, j in zip(bounds[:-1], bounds[1:])]


def propagate(a, b, std, mean, var):
  """The marginal after each step: the mean and variance of x -> A x + B + std z, exactly."""
  means, variances = [], []
  for i in range(len(std)):
    mean, var = a[i] * mean + b[i], a[i] ** 2 * var + std[i] ** 2
    means.append(mean)
    variances.append(var)
  return np.array(means), np.array(variances)


def run_chain(schedule, num_steps, eta, x, key):
  """Samples the chain with the public steps, from x [N, 2] at t_max, under one jit."""
  ts = flow_timesteps(schedule, num_steps)

  @jax.jit
  def body(x, inputs):
    t, t_prev, key = inputs
    v = exact_velocity(x, t, jnp)
    if eta == 0:
      return jax.vmap(lambda x, v: flow_ode_step(x, v, t, t_prev))(x, v), None
    keys = jax.random.split(key, x.shape[0])
    step = jax.vmap(lambda x, v, k: flow_sde_step(x, v, t, t_prev, key=k, eta=eta).x_prev)
    return step(x, v, keys), None
  x, _ = jax.lax.scan(body, x, (ts.timesteps, ts.previous, jax.random.split(key, num_steps)))
  return np.asarray(x, np.float64)


def np_chain(schedule, num_steps, eta):
  """The same propagation from the float64 formula alone (independent of the library's kernel)."""
  grid = np.linspace(float(schedule.t_max), float(schedule.t_min), num_steps + 1)
  grid[0], grid[-1] = float(schedule.t_max), float(schedule.t_min)
  a, b, std = [], [], []
  for t, t_prev in zip(grid[:-1], grid[1:]):
    at = lambda x: np_step(x, exact_velocity(x, t), t, t_prev, eta)
    (mean0, s), (mean1, _) = at(np.zeros(2)), at(np.ones(2))
    a.append(mean1 - mean0)
    b.append(mean0)
    std.append(s)
  return np.array(a), np.array(b), np.array(std)


@pytest.mark.parametrize("eta, num_steps", [(0.7, 10), (1.0, 20)])
@pytest.mark.slow
def test_sampled_sde_chain_has_the_exact_discrete_marginal(eta, num_steps):
  # x ~ N(0, I) at t_max = 0.97: every step is Gaussian, so the final marginal is the float64
  # propagation of N(0, 1); 20000 samples against it, 4 standard errors.
  n, schedule = 20000, flow_schedule()
  key_x, key_z = jax.random.split(jax.random.key(4))
  x = run_chain(schedule, num_steps, eta, jax.random.normal(key_x, (n, 2)), key_z)
  a, b, std = np_chain(schedule, num_steps, eta)
  means, variances = propagate(a, b, std, np.zeros(2), 1.0)
  mean, var = means[-1], variances[-1]
  se_var = var * np.sqrt(2 / (n - 1))
  np.testing.assert_array_less(np.abs(x.mean(0) - mean), 4 * np.sqrt(var / n))
  np.testing.assert_array_less(np.abs(x.var(0, ddof=1) - var), 4 * se_var)
  # Power: a step whose std were 10 % too large would miss the variance by over 8 standard errors.
  _, wrong = propagate(a, b, 1.1 * std, np.zeros(2), 1.0)
  assert np.all(np.abs(wrong[-1] - var) > 8 * se_var)


def test_ode_chain_is_the_exact_affine_map():
  # Deterministic: each final point is x_T pushed through the product of the steps' affine maps.
  schedule = flow_schedule()
  x_T = jax.random.normal(jax.random.key(5), (64, 2))
  x = run_chain(schedule, 10, 0.0, x_T, jax.random.key(0))
  a, b, std = np_chain(schedule, 10, 0.0)
  assert np.all(std == 0)
  expected = np.asarray(x_T, np.float64)
  for i in range(10):
    expected = a[i] * expected + b[i]
  # 10 steps of a few float32 operations on numbers of size ~3.
  np.testing.assert_allclose(x, expected, rtol=0, atol=10 * 8 * F32_EPS * 4)


def test_the_library_kernel_propagates_as_the_float64_formula():
  for eta in (0.0, 0.7):
    [(a, b, std, _)] = chain_coefficients(flow_schedule(), [10], eta)
    a64, b64, std64 = np_chain(flow_schedule(), 10, eta)
    np.testing.assert_allclose(a, a64, rtol=0, atol=16 * F32_EPS)
    np.testing.assert_allclose(b, b64, rtol=0, atol=16 * F32_EPS)
    np.testing.assert_allclose(std, std64, rtol=16 * F32_EPS, atol=0)


def test_discrete_marginals_approach_the_continuous_ones_for_sde_and_ode():
  # Started from the exact marginal at t_max, the chain's marginal at every grid time tends to the
  # continuous one N((1 - t) M, ((1 - t)^2 S^2 + t^2) I) as h -> 0, for the SDE and for the ODE:
  # both have the same marginals (Flow-GRPO's claim), up to an error of first order in h.
  schedule = flow_schedule()
  mean0, var0 = marginal(float(schedule.t_max))
  errors = {}
  for eta in (0.7, 0.0):
    grids = chain_coefficients(schedule, [10, 40, 160, 640], eta)
    for steps, (a, b, std, ts) in zip((10, 40, 160, 640), grids):
      means, variances = propagate(a, b, std, mean0, var0)
      t_next = np.append(ts[1:], float(schedule.t_min))
      exact_means = np.array([marginal(t)[0] for t in t_next])
      exact_vars = np.array([marginal(t)[1] for t in t_next])
      errors[eta, steps] = max(np.max(np.abs(means - exact_means)),
                               np.max(np.abs(variances - exact_vars[:, None])))
  for eta in (0.7, 0.0):
    series = [errors[eta, s] for s in (10, 40, 160, 640)]
    # First order: the error shrinks about 4x when h does; at least 2x each time.
    assert all(late < early / 2 for early, late in zip(series, series[1:])), series
    # The float32 coefficients (relative error ~1e-7 per step, 640 steps) are far below this.
    assert series[-1] < 0.01, series
  # SDE and ODE agree with each other to the same order.
  assert errors[0.7, 640] + errors[0.0, 640] < (errors[0.7, 10] + errors[0.0, 10]) / 16


# The schedule and its grid.


def test_schedule_defaults_and_grid():
  s = flow_schedule()
  assert len(jax.tree_util.tree_leaves(s)) == 3  # a pytree of three scalars
  assert s.t_max.dtype == jnp.float32 and s.t_max.shape == ()
  ts = flow_timesteps(s, 5)
  expected = np.float32(0.97) * (1 - np.arange(6) / 5)
  np.testing.assert_allclose(ts.timesteps, expected[:-1], rtol=1e-6)
  np.testing.assert_allclose(ts.previous, expected[1:], rtol=1e-6, atol=1e-7)
  assert ts.timesteps.dtype == jnp.float32 and ts.timesteps.shape == (5,)
  assert float(ts.timesteps[0]) == float(s.t_max) and float(ts.previous[-1]) == float(s.t_min)
  np.testing.assert_array_equal(ts.timesteps[1:], ts.previous[:-1])
  other = flow_schedule(t_max=0.9, t_min=0.1, time_scale=1.0)
  ts = flow_timesteps(other, 1)
  assert ts.timesteps.tolist() == [np.float32(0.9)] and ts.previous.tolist() == [np.float32(0.1)]
  # Jittable with num_steps static and the schedule traced: the ends exact, the interior up to
  # the rounding of a fused multiply-add.
  jitted = jax.jit(flow_timesteps, static_argnums=1)(other, 7)
  eager = flow_timesteps(other, 7)
  np.testing.assert_allclose(jitted.timesteps, eager.timesteps, rtol=2 * F32_EPS)
  np.testing.assert_allclose(jitted.previous, eager.previous, rtol=2 * F32_EPS)
  assert float(jitted.timesteps[0]) == float(other.t_max)
  assert float(jitted.previous[-1]) == float(other.t_min)


def test_bad_schedules():
  with pytest.raises(ValueError, match=r"^schedule: t_max must be in \(t_min, 1\)"):
    flow_schedule(t_max=1.0)
  with pytest.raises(ValueError, match=r"^schedule: t_max must be in \(t_min, 1\)"):
    flow_schedule(t_max=0.99999999)  # rounds to 1 in float32
  with pytest.raises(ValueError, match=r"^schedule: t_max"):
    flow_schedule(t_max=0.5, t_min=0.5)
  with pytest.raises(ValueError, match=r"^schedule: t_min must be in \[0, 1\)"):
    flow_schedule(t_min=-0.1)
  with pytest.raises(ValueError, match=r"^schedule: time_scale"):
    flow_schedule(time_scale=0.0)
  with pytest.raises(ValueError, match=r"^t_max:"):
    flow_schedule(t_max=float("nan"))
  with pytest.raises(TypeError, match=r"^t_min:"):
    flow_schedule(t_min="0")
  with pytest.raises(TypeError, match=r"^schedule: must be a FlowSchedule"):
    check_flow_schedule((0.9, 0.0, 1000.0))
  with pytest.raises(ValueError, match=r"^sched: t_max must be a scalar"):
    check_flow_schedule(FlowSchedule(jnp.ones(2), 0.0, 1.0), name="sched")
  with pytest.raises(ValueError, match=r"^num_steps:"):
    flow_timesteps(flow_schedule(), 0)
  with pytest.raises(ValueError, match=r"^num_steps:"):
    flow_timesteps(flow_schedule(), 2.0)
  with pytest.raises(TypeError, match=r"^num_steps:"):
    flow_timesteps(flow_schedule(), True)
  with pytest.raises(ValueError, match=r"^num_steps:.*resolution"):
    flow_timesteps(flow_schedule(t_max=0.5, t_min=0.4999), 10000)


# Input checks and extremes of the steps.


@pytest.mark.parametrize("eta", [0.0, -0.5, float("nan")])
def test_eta_without_a_density_is_refused(eta):
  with pytest.raises(ValueError, match="^eta:"):
    flow_sde_step(X_T, V, 0.5, 0.4, key=jax.random.key(0), eta=eta)
  with pytest.raises(ValueError, match="^eta:"):
    flow_step_log_prob(X_T, X_T, V, 0.5, 0.4, eta=eta)


def test_bad_arguments():
  key = jax.random.key(0)
  sde = lambda **kw: flow_sde_step(**{**dict(x_t=X_T, velocity=V, t=0.5, t_prev=0.4, key=key,
                                             eta=0.7), **kw})
  for t in (0.0, 1.0, 1.5, -0.1, float("nan")):
    with pytest.raises(ValueError, match=r"^t: must be in \(0, 1\)"):
      sde(t=t, t_prev=0.0)
    with pytest.raises(ValueError, match=r"^t: must be in \(0, 1\)"):
      flow_ode_step(X_T, V, t, 0.0)
  for t_prev in (0.5, 0.6, -0.1):
    with pytest.raises(ValueError, match=r"^t_prev: must be in \[0, t\)"):
      sde(t_prev=t_prev)
    with pytest.raises(ValueError, match=r"^t_prev:"):
      flow_step_log_prob(X_T, X_T, V, 0.5, t_prev, eta=0.7)
  with pytest.raises(ValueError, match=r"^t/t_prev: must be scalars"):
    sde(t=jnp.array([0.5, 0.6]))
  with pytest.raises(ValueError, match="^velocity:"):
    sde(velocity=V[0])
  with pytest.raises(ValueError, match="^velocity:"):
    flow_ode_step(X_T, V[:, :2], 0.5, 0.4)
  with pytest.raises(ValueError, match="^x_prev:"):
    flow_step_log_prob(X_T[0], X_T, V, 0.5, 0.4, eta=0.7)
  with pytest.raises(ValueError, match="^x_prev:"):
    flow_step_log_prob(np.full_like(X_T, np.inf), X_T, V, 0.5, 0.4, eta=0.7)
  with pytest.raises(ValueError, match="^velocity:"):
    sde(velocity=np.full_like(V, np.nan))
  with pytest.raises(ValueError, match="^reduce:"):
    sde(reduce="max")
  with pytest.raises(ValueError, match="^key:"):
    sde(key=jax.random.PRNGKey(0))
  with pytest.raises(TypeError, match="^eta:"):
    sde(eta="0.7")
  with pytest.raises(ValueError, match="^eta:.*normal range"):
    sde(eta=1e-39)


def test_extreme_inputs_stay_finite():
  big = jnp.full((4,), 1e3)
  cases = [(1 - 2.0**-20, 1 - 2.0**-20 - 0.05, 0.7),  # 1 - t ~ 1e-6: coefficient of x_t ~ -1e4
           (1e-6, 0.0, 0.7),                          # the last step, std ~ 7e-7
           (0.5, 0.5 - 2.0**-24, 5.0),                # the smallest step float32 holds at 0.5
           (0.9, 0.0, 1e-30)]                         # an almost deterministic step
  for t, t_prev, eta in cases:
    out = flow_sde_step(big, -big, t, t_prev, key=jax.random.key(0), eta=eta)
    assert np.all(np.isfinite(out.x_prev)) and np.isfinite(out.log_prob) and float(out.std) > 0
    grad = jax.grad(lambda v: flow_step_log_prob(out.x_prev, big, v, t, t_prev, eta=eta))(-big)
    assert np.all(np.isfinite(grad))
    assert np.all(np.isfinite(flow_ode_step(big, -big, t, t_prev)))


# The flow-matching loss.


def loss_moments(num_dims):
  """The loss of the exact velocity, E[mean_j r_j^2], and the variance of one sample's mean_j r_j^2.

  Given t, each residual r_j = (eps - x_0)_j - v_j(x_t) ~ N(0, c(t)) with
  c(t) = Var(eps - x_0) - Cov(eps - x_0, x_t)^2 / Var(x_t) = 1 + S^2 - (t - (1 - t) S^2)^2 / V_t,
  so mean_j r_j^2 has mean c(t) and variance 2 c(t)^2 / d; t ~ U(0, 1) by a fine midpoint rule.
  """
  t = (np.arange(200000) + 0.5) / 200000
  var_t = (1 - t) ** 2 * S**2 + t**2
  c = 1 + S**2 - (t - (1 - t) * S**2) ** 2 / var_t
  mean = c.mean()
  return mean, np.mean(2 * c**2 / num_dims) + c.var()


# One batch shape for every loss test: eager calls compile each random draw once per shape.
N_LOSS = 20000
X0 = jnp.asarray(M + S * RNG.normal(size=(N_LOSS, 2)), jnp.float32)
LABELS = jnp.arange(N_LOSS) % 3


def test_flow_matching_loss_of_the_exact_velocity_is_its_closed_form():
  n, x0 = N_LOSS, X0
  times = []

  def apply_fn(params, x_t, time, conditions):
    times.append(time)
    return exact_velocity(x_t, (time / 1000.0)[:, None], jnp)

  loss = flow_matching_loss(apply_fn, None, x0, LABELS, key=jax.random.key(6))
  expected, var = loss_moments(2)
  # x0 is itself a sample: its sampling noise adds to the loss's; both are in var (x_0 random).
  assert abs(float(loss) - expected) < 4 * np.sqrt(var / n)
  time = times[0]
  assert time.dtype == jnp.float32 and time.shape == (n,)
  assert 0 <= float(time.min()) and float(time.max()) < 1000 and float(time.max()) > 990
  # Power: the exact velocity of the other time convention (t = 1 data) is detected.
  flipped = lambda p, x, tm, c: exact_velocity(x, 1 - (tm / 1000.0)[:, None], jnp)
  wrong = flow_matching_loss(flipped, None, x0, LABELS, key=jax.random.key(6))
  assert float(wrong) - expected > 8 * np.sqrt(var / n)


def test_label_dropout_replaces_conditions_by_the_null_condition():
  n, x0 = N_LOSS, X0
  conditions = {"u": jnp.ones((n, 2)), "id": LABELS}
  null = {"u": jnp.zeros(2), "id": 3}
  seen = []

  def apply_fn(params, x_t, time, conditions):
    seen.append(conditions)
    return jnp.zeros_like(x_t)

  for dropout in (0.0, 0.5, 1.0):
    seen.clear()
    flow_matching_loss(apply_fn, None, x0, conditions, key=jax.random.key(7),
                       label_dropout=dropout, null_condition=null)
    got = seen[0]
    dropped = np.asarray(got["id"]) == 3
    np.testing.assert_array_equal(np.all(np.asarray(got["u"]) == 0, axis=1), dropped)
    np.testing.assert_array_equal(np.asarray(got["id"])[~dropped],
                                  np.asarray(conditions["id"])[~dropped])
    assert abs(dropped.mean() - dropout) <= 4 * np.sqrt(dropout * (1 - dropout) / n)
  seen.clear()
  flow_matching_loss(apply_fn, None, x0, conditions, key=jax.random.key(7))  # no null needed
  assert not np.any(np.asarray(seen[0]["id"]) == 3)


def test_flow_matching_loss_jit_equals_eager():
  apply_fn = lambda params, x, t, c: params * x + (t / 1000.0)[:, None] + c[:, None]
  loss = lambda p, d, k: flow_matching_loss(apply_fn, p, X0, LABELS, key=k, label_dropout=d,
                                            null_condition=3)
  eager = loss(0.5, 0.3, jax.random.key(8))
  jitted = jax.jit(loss)(0.5, 0.3, jax.random.key(8))  # label_dropout traced
  np.testing.assert_allclose(jitted, eager, rtol=1e-6)
  grad = jax.grad(loss)(0.5, 0.3, jax.random.key(8))
  assert np.isfinite(grad)


def test_flow_matching_loss_bad_inputs():
  key, x0, labels = jax.random.key(0), jnp.zeros((4, 2)), jnp.zeros(4, jnp.int32)
  zero = lambda params, x, t, c: jnp.zeros_like(x)
  loss = lambda **kw: flow_matching_loss(**{**dict(apply_fn=zero, params=None, x0=x0,
                                                   conditions=labels, key=key), **kw})
  with pytest.raises(ValueError, match="^null_condition:"):
    loss(label_dropout=0.1)
  with pytest.raises(ValueError, match="^null_condition:"):
    loss(label_dropout=0.1, null_condition=jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="^label_dropout:"):
    loss(label_dropout=1.5, null_condition=3)
  with pytest.raises(ValueError, match="^x0:"):
    loss(x0=jnp.zeros(4))
  with pytest.raises(ValueError, match="^x0:"):
    loss(x0=x0.at[0, 0].set(jnp.nan))
  with pytest.raises(ValueError, match="^conditions:"):
    loss(conditions=jnp.zeros(3, jnp.int32))
  with pytest.raises(ValueError, match="^time_scale:"):
    loss(time_scale=0.0)
  with pytest.raises(ValueError, match="^key:"):
    loss(key=jax.random.PRNGKey(0))
