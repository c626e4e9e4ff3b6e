"""One DDIM step: its mean, std and log-density against the formulas of the DDIM and DDPM papers
written independently in float64 numpy, its samples against that Gaussian, the two reductions,
the KL, jit/vmap, gradients, extreme steps and input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax.diffusion.schedules import cosine_schedule, linear_schedule, sampling_timesteps
from saferl_jax.diffusion.step import ddim_step, guided_eps, step_kl, step_log_prob

T = 1000
SCHEDULE = linear_schedule(T)
BETAS = np.linspace(1e-4, 0.02, T)  # float64, independent of the library
ABAR = np.cumprod(1 - BETAS)
RNG = np.random.default_rng(0)
X_T = RNG.normal(size=(2, 3))
EPS = RNG.normal(size=(2, 3))
STEPS = [(981, 961), (501, 481), (21, 1), (1, 0), (700, 699)]


def np_ddim(x_t, eps, t, t_prev, eta):
  """The DDIM step as the paper writes it (through x0hat), float64."""
  a, a_prev = ABAR[t], ABAR[t_prev]
  x0hat = (x_t - np.sqrt(1 - a) * eps) / np.sqrt(a)
  sigma = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
  mu = np.sqrt(a_prev) * x0hat + np.sqrt(1 - a_prev - sigma**2) * eps
  return mu, sigma


def np_log_density(x, mu, sigma):
  return np.sum(-0.5 * ((x - mu) / sigma) ** 2 - np.log(sigma) - 0.5 * np.log(2 * np.pi))


@pytest.mark.parametrize("t, t_prev", STEPS)
@pytest.mark.parametrize("eta", [1.0, 0.5, 0.1])
@pytest.mark.slow
def test_against_the_ddim_formulas(t, t_prev, eta):
  mu, sigma = np_ddim(X_T, EPS, t, t_prev, eta)
  out = ddim_step(X_T, EPS, t, t_prev, SCHEDULE, key=jax.random.key(t), eta=eta)
  np.testing.assert_allclose(out.std, sigma, rtol=2e-3)  # float32 alphabar_t' - alphabar_t near 1
  np.testing.assert_allclose(out.mean, mu, rtol=1e-4, atol=1e-5)
  # The returned log-prob is the Gaussian density of the returned sample (float64 here).
  x_prev = np.asarray(out.x_prev, np.float64)
  expected = np_log_density(x_prev, mu, sigma)
  np.testing.assert_allclose(out.log_prob, expected, rtol=1e-4, atol=2e-2 * (sigma < 0.05) + 1e-3)
  # The same number from jax.scipy and from the library's own recomputation.
  by_scipy = jnp.sum(jax.scipy.stats.norm.logpdf(out.x_prev, out.mean, out.std))
  np.testing.assert_allclose(out.log_prob, by_scipy, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(step_log_prob(out.x_prev, X_T, EPS, t, t_prev, SCHEDULE, eta=eta),
                             out.log_prob, rtol=1e-6)


@pytest.mark.slow
def test_eta_one_is_the_ddpm_posterior():
  # Ho et al. 2020, eq. 11 and the posterior variance beta-tilde: for consecutive steps t -> t - 1,
  # mu = (x_t - beta_t / sqrt(1 - alphabar_t) eps) / sqrt(alpha_t), sigma^2 = (1 - abar_{t-1}) / (1 - abar_t) beta_t.
  for t in (2, 100, 900):
    mu = (X_T - BETAS[t] / np.sqrt(1 - ABAR[t]) * EPS) / np.sqrt(1 - BETAS[t])
    var = (1 - ABAR[t - 1]) / (1 - ABAR[t]) * BETAS[t]
    out = ddim_step(X_T, EPS, t, t - 1, SCHEDULE, key=jax.random.key(0), eta=1.0)
    np.testing.assert_allclose(out.mean, mu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.std, np.sqrt(var), rtol=5e-3)


@pytest.mark.slow
def test_samples_follow_the_gaussian():
  t, t_prev, n = 501, 481, 20000
  keys = jax.random.split(jax.random.key(1), n)
  out = jax.vmap(lambda k: ddim_step(X_T, EPS, t, t_prev, SCHEDULE, key=k, eta=1.0))(keys)
  samples = np.asarray(out.x_prev, np.float64)
  mu, sigma = np_ddim(X_T, EPS, t, t_prev, 1.0)
  se_mean = sigma / np.sqrt(n)
  np.testing.assert_array_less(np.abs(samples.mean(0) - mu), 4 * se_mean)
  se_std = sigma / np.sqrt(2 * (n - 1))
  np.testing.assert_array_less(np.abs(samples.std(0, ddof=1) - sigma), 4 * se_std)
  # Each sample's log-prob: the sum over 6 dims of -z^2/2 - log sigma - log(2 pi)/2, whose mean is
  # -6 (1/2 + log sigma + log(2 pi)/2) with per-sample sd sqrt(6 / 2).
  lp = np.asarray(out.log_prob, np.float64)
  expected = -6 * (0.5 + np.log(sigma) + 0.5 * np.log(2 * np.pi))
  assert abs(lp.mean() - expected) < 4 * np.sqrt(3.0 / n)


@pytest.mark.slow
def test_mean_reduction_is_the_sum_over_dimensions():
  key = jax.random.key(2)
  total = ddim_step(X_T, EPS, 501, 481, SCHEDULE, key=key, eta=1.0, reduce="sum")
  mean = ddim_step(X_T, EPS, 501, 481, SCHEDULE, key=key, eta=1.0, reduce="mean")
  np.testing.assert_array_equal(total.x_prev, mean.x_prev)
  np.testing.assert_allclose(mean.log_prob, total.log_prob / X_T.size, rtol=1e-5)
  np.testing.assert_allclose(step_log_prob(total.x_prev, X_T, EPS, 501, 481, SCHEDULE, eta=1.0, reduce="mean"),
                             mean.log_prob, rtol=1e-6)


@pytest.mark.slow
def test_any_shape_including_scalars():
  for shape in [(), (5,), (2, 2, 3)]:
    x, e = jnp.ones(shape), jnp.zeros(shape)
    out = ddim_step(x, e, 101, 81, SCHEDULE, key=jax.random.key(0), eta=1.0)
    assert out.x_prev.shape == shape and out.mean.shape == shape
    assert out.log_prob.shape == () and out.std.shape == ()


@pytest.mark.slow
def test_jit_and_vmap_equal_eager_and_a_loop():
  b = 4
  rng = np.random.default_rng(6)
  xs = jnp.asarray(rng.normal(size=(b, 2, 3)), jnp.float32)
  es = jnp.asarray(rng.normal(size=(b, 2, 3)), jnp.float32)
  ts = jnp.array([981, 501, 21, 1])
  prevs = jnp.array([961, 481, 1, 0])
  keys = jax.random.split(jax.random.key(3), b)
  step = lambda x, e, t, tp, k: ddim_step(x, e, t, tp, SCHEDULE, key=k, eta=0.7)
  batched = jax.vmap(step)(xs, es, ts, prevs, keys)
  jitted_step = jax.jit(step)
  for i in range(b):
    one = step(xs[i], es[i], int(ts[i]), int(prevs[i]), keys[i])
    jitted = jitted_step(xs[i], es[i], ts[i], prevs[i], keys[i])
    for field in range(4):
      np.testing.assert_allclose(batched[field][i], one[field], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(jitted[field], one[field], rtol=1e-5, atol=1e-6)
  lp = jax.vmap(lambda xp, x, e, t, tp: step_log_prob(xp, x, e, t, tp, SCHEDULE, eta=0.7))(
      batched.x_prev, xs, es, ts, prevs)
  np.testing.assert_allclose(lp, batched.log_prob, rtol=1e-6)


def test_gradient_with_respect_to_eps():
  # d/d eps log N(x'; mu, sigma^2) = (x' - mu) / sigma^2 * d mu / d eps, with
  # d mu / d eps = sqrt(1 - abar' - sigma^2) - sqrt(abar' (1 - abar) / abar).
  t, t_prev, eta = 501, 481, 0.8
  x_prev = np.random.default_rng(7).normal(size=(2, 3))
  mu, sigma = np_ddim(X_T, EPS, t, t_prev, eta)
  a, a_prev = ABAR[t], ABAR[t_prev]
  dmu = np.sqrt(1 - a_prev - sigma**2) - np.sqrt(a_prev * (1 - a) / a)
  expected = (x_prev - mu) / sigma**2 * dmu
  grad = jax.grad(lambda e: step_log_prob(x_prev, X_T, e, t, t_prev, SCHEDULE, eta=eta))(
      jnp.asarray(EPS, jnp.float32))
  np.testing.assert_allclose(grad, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_step_kl_closed_form_and_monte_carlo():
  mean, ref = jnp.array([1.0, -2.0, 0.5]), jnp.array([0.0, -1.0, 0.5])
  assert float(step_kl(mean, ref, 2.0)) == pytest.approx(2.0 / 8.0)
  assert float(step_kl(mean, ref, 2.0, reduce="mean")) == pytest.approx(2.0 / 24.0)
  # E_{x ~ p}[log p(x) - log q(x)] with p, q the step's Gaussians under two noise predictions.
  t, t_prev, n = 501, 481, 20000
  eps_q = EPS + 0.5 * np.random.default_rng(5).normal(size=EPS.shape)
  keys = jax.random.split(jax.random.key(4), n)
  p = jax.vmap(lambda k: ddim_step(X_T, EPS, t, t_prev, SCHEDULE, key=k, eta=1.0))(keys)
  log_q = jax.vmap(lambda x: step_log_prob(x, X_T, eps_q, t, t_prev, SCHEDULE, eta=1.0))(p.x_prev)
  diff = np.asarray(p.log_prob - log_q, np.float64)
  q_mean = ddim_step(X_T, eps_q, t, t_prev, SCHEDULE, key=keys[0], eta=1.0).mean
  kl = float(step_kl(p.mean[0], q_mean, p.std[0]))
  assert kl > 0.1  # a detectable KL, so the comparison has power
  assert abs(diff.mean() - kl) < 4 * diff.std(ddof=1) / np.sqrt(n)


def test_guided_eps():
  u, c = jnp.array([0.0, 1.0, -2.0]), jnp.array([1.0, 1.0, 2.0])
  np.testing.assert_allclose(guided_eps(u, c, 0.0), u)
  np.testing.assert_allclose(guided_eps(u, c, 1.0), c)
  np.testing.assert_allclose(guided_eps(u, c, 7.5), u + 7.5 * (c - u))
  with pytest.raises(ValueError, match="^eps_cond:"):
    guided_eps(u, c[:2], 1.0)
  with pytest.raises(ValueError, match="^guidance_scale:"):
    guided_eps(u, c, jnp.ones(3))


@pytest.mark.slow
def test_extreme_steps_stay_finite():
  schedule = cosine_schedule(T)  # alphabar_999 ~ 2e-9: x0hat amplifies eps by ~2e4
  t, prev = sampling_timesteps(T, 50)
  x = jnp.full((4,), 3.0)
  for ti, pi in [(999, 979), (int(t[0]), int(prev[0])), (1, 0)]:
    out = ddim_step(x, -x, ti, pi, schedule, key=jax.random.key(0), eta=1.0)
    assert np.all(np.isfinite(out.x_prev)) and np.isfinite(out.log_prob) and float(out.std) > 0
    grad = jax.grad(lambda e: step_log_prob(out.x_prev, x, e, ti, pi, schedule, eta=1.0))(-x)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("eta", [0.0, -0.5, float("nan")])
def test_eta_without_a_density_is_refused(eta):
  with pytest.raises(ValueError, match="^eta: must be > 0 for a log-probability to exist"):
    ddim_step(X_T, EPS, 501, 481, SCHEDULE, key=jax.random.key(0), eta=eta)
  with pytest.raises(ValueError, match="^eta:"):
    step_log_prob(X_T, X_T, EPS, 501, 481, SCHEDULE, eta=eta)


def test_bad_arguments():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="^eta: must be <= 1"):
    ddim_step(X_T, EPS, 501, 481, SCHEDULE, key=key, eta=1.5)
  with pytest.raises(ValueError, match="^reduce:"):
    ddim_step(X_T, EPS, 501, 481, SCHEDULE, key=key, eta=1.0, reduce="max")
  with pytest.raises(ValueError, match="^reduce:"):
    step_kl(X_T, EPS, 1.0, reduce="none")
  with pytest.raises(ValueError, match="^t_prev:.*clean data"):
    ddim_step(X_T, EPS, 1, -1, SCHEDULE, key=key, eta=1.0)
  with pytest.raises(ValueError, match="^t_prev:"):
    ddim_step(X_T, EPS, 500, 500, SCHEDULE, key=key, eta=1.0)
  with pytest.raises(ValueError, match="^t:"):
    ddim_step(X_T, EPS, 1000, 980, SCHEDULE, key=key, eta=1.0)
  with pytest.raises(ValueError, match="^t/t_prev:"):
    ddim_step(X_T, EPS, jnp.array([5, 6]), 4, SCHEDULE, key=key, eta=1.0)
  with pytest.raises(ValueError, match="^t:"):
    ddim_step(X_T, EPS, 5.0, 4, SCHEDULE, key=key, eta=1.0)
  with pytest.raises(ValueError, match="^eps:"):
    ddim_step(X_T, EPS[0], 501, 481, SCHEDULE, key=key, eta=1.0)
  with pytest.raises(ValueError, match="^x_prev:"):
    step_log_prob(X_T[0], X_T, EPS, 501, 481, SCHEDULE, eta=1.0)
  with pytest.raises(ValueError, match="^schedule:"):
    ddim_step(X_T, EPS, 501, 481, ABAR, key=key, eta=1.0)
  with pytest.raises(ValueError, match="^std:"):
    step_kl(X_T, EPS, 0.0)


def test_step_kl_of_equal_means_is_zero_at_any_tiny_std():
  # sigma^2 underflows to 0 in float32 below about 1e-19: dividing first keeps 0 / 0 out.
  for std in (1e-20, 1e-30, 1.2e-38):
    assert float(step_kl(jnp.ones(3), jnp.ones(3), std)) == 0.0
  with pytest.raises(ValueError, match="^std:.*subnormal"):
    step_kl(jnp.ones(3), jnp.ones(3), 1e-39)
  # The documented limit: a KL beyond float32's range is +inf, not NaN.
  assert float(step_kl(jnp.ones(3), jnp.zeros(3), 1e-30)) == np.inf


@pytest.mark.slow
def test_tiny_eta_gives_finite_log_probabilities_and_below_1e_30_is_refused():
  schedule = linear_schedule()
  x, e = jnp.zeros(3), jnp.ones(3)
  for eta in (1e-20, 1e-30):
    out = ddim_step(x, e, 981, 961, schedule, key=jax.random.key(0), eta=eta)
    assert float(out.std) > 0 and np.isfinite(float(out.log_prob))
    np.testing.assert_allclose(step_log_prob(out.x_prev, x, e, 981, 961, schedule, eta=eta),
                               out.log_prob, rtol=1e-6)
  with pytest.raises(ValueError, match="^eta:.*underflows"):
    ddim_step(x, e, 981, 961, schedule, key=jax.random.key(0), eta=1e-40)


def test_non_finite_inputs_are_refused_by_name():
  schedule = linear_schedule()
  x, e = jnp.zeros(3), jnp.ones(3)
  with pytest.raises(ValueError, match="^eps:"):
    ddim_step(x, e.at[0].set(jnp.nan), 981, 961, schedule, key=jax.random.key(0), eta=1.0)
  with pytest.raises(ValueError, match="^x_prev:"):
    step_log_prob(x.at[1].set(jnp.inf), x, e, 981, 961, schedule, eta=1.0)
  with pytest.raises(ValueError, match="^reference_mean:"):
    step_kl(x, e[:2], 1.0)
  with pytest.raises(ValueError, match="^t:.*wrap"):
    ddim_step(x, e, np.int64(2**32 + 981), 961, schedule, key=jax.random.key(0), eta=1.0)
