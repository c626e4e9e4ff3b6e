"""Tests for saferl_jax.opl.objectives: closed forms, gradients against finite differences and
against per-example loops, the gradient-variance-optimal baseline [OB], and unbiasedness of the
baseline-corrected gradient by Monte Carlo against the exact gradient of a small bandit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from saferl_jax.ope import optimal_baseline
from saferl_jax.opl import (LinearPolicy, LoggedBatch, as_functional, baseline_corrected_objective,
                            corrected_gradient, gradient_optimal_baseline, gradient_variance,
                            ips_objective, logged_log_probs, per_example_weight_gradients,
                            policy_weights, snips_objective, value_optimal_baseline)

# Hand-made log-probs: pi(a_i|x_i) = 0.5, 0.25, 0.2, 0.1 and propensities giving w = 2, .5, .5, .5.
LOG_PROBS = np.log(np.array([0.5, 0.25, 0.2, 0.1]))
PROPS = np.array([0.25, 0.5, 0.4, 0.2])
REWARDS = np.array([1.0, 0.0, 1.0, 0.5])
WEIGHTS = np.array([2.0, 0.5, 0.5, 0.5])

# A tiny linear-policy problem: d = 3, A = 4, n = 6.
D, NA, N = 3, 4, 6
CONTEXTS = np.random.default_rng(0).normal(size=(N, D))
ACTIONS = np.array([0, 3, 1, 2, 1, 0])
LOGGING_PROBS = np.array([0.5, 0.2, 0.3, 0.25, 0.4, 0.1])
LOGGED_REWARDS = np.array([1.0, 0.0, 0.5, 1.0, 0.0, 1.0])


def tiny_policy(seed=0):
  """(apply_fn, params) of a LinearPolicy(3, 4) in float64 with a non-zero bias.

  Call inside `jax.enable_x64(True)`.
  """
  apply_fn, params = as_functional(LinearPolicy(D, NA, rngs=nnx.Rngs(seed)))
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params)
  flat, unravel = ravel_pytree(params)
  noise = np.random.default_rng(seed + 100).normal(size=flat.shape)
  return apply_fn, unravel(flat + 0.5 * noise)


def tiny_batch():
  return LoggedBatch(jnp.asarray(CONTEXTS), jnp.asarray(ACTIONS), jnp.asarray(LOGGED_REWARDS),
                     jnp.asarray(LOGGING_PROBS))


def np_softmax(logits):
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def np_linear_policy(params):
  """(kernel [D, A], bias [A]) as float64 numpy arrays."""
  return np.asarray(params["linear"]["kernel"][...]), np.asarray(params["linear"]["bias"][...])


def flat_per_example(per_example):
  """[n, P]: each example's gradient flattened in the same leaf order as ravel_pytree."""
  leaves = jax.tree_util.tree_leaves(per_example)
  return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in leaves], axis=1)


def central_differences(f, flat, eps=1e-6):
  flat = np.asarray(flat)
  grad = np.zeros_like(flat)
  for j in range(flat.size):
    step = np.zeros_like(flat)
    step[j] = eps
    grad[j] = (float(f(flat + step)) - float(f(flat - step))) / (2 * eps)
  return grad


# Closed forms.


def test_policy_weights_closed_form():
  np.testing.assert_allclose(policy_weights(LOG_PROBS, PROPS), WEIGHTS, rtol=1e-6)


def test_ips_closed_form():
  # (2 * 1 + 0.5 * 0 + 0.5 * 1 + 0.5 * 0.5) / 4.
  np.testing.assert_allclose(ips_objective(LOG_PROBS, REWARDS, PROPS), 2.75 / 4, rtol=1e-6)


def test_docstring_example():
  assert float(ips_objective(jnp.log(jnp.array([0.5, 0.5])), jnp.array([1., 0.]),
                             jnp.array([0.25, 0.5]))) == 1.0


def test_snips_closed_form():
  # sum r w / sum w = 2.75 / 3.5.
  np.testing.assert_allclose(snips_objective(LOG_PROBS, REWARDS, PROPS), 2.75 / 3.5, rtol=1e-6)


def test_baseline_corrected_closed_form():
  # (0.5 * 2 - 0.5 * 0.5 + 0.5 * 0.5 + 0 * 0.5) / 4 = 0.25 = IPS - beta mean(w) = 0.6875 - 0.4375.
  np.testing.assert_allclose(baseline_corrected_objective(LOG_PROBS, REWARDS, PROPS, 0.5), 0.25,
                             rtol=1e-6)
  for beta in [-1.0, 0.3, 2.0]:
    np.testing.assert_allclose(baseline_corrected_objective(LOG_PROBS, REWARDS, PROPS, beta),
                               np.mean((REWARDS - beta) * WEIGHTS), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_baseline_zero_is_ips():
  np.testing.assert_allclose(baseline_corrected_objective(LOG_PROBS, REWARDS, PROPS, 0.0),
                             ips_objective(LOG_PROBS, REWARDS, PROPS), rtol=1e-7)
  with jax.enable_x64(True):
    apply_fn, params = tiny_policy()
    batch = tiny_batch()

    def objective(fn, p, *extra):
      log_probs = logged_log_probs(apply_fn, p, batch.contexts, batch.actions)
      return fn(log_probs, batch.rewards, batch.logging_probs, *extra)
    g_ips = ravel_pytree(jax.grad(lambda p: objective(ips_objective, p))(params))[0]
    g_zero = ravel_pytree(jax.grad(lambda p: objective(baseline_corrected_objective, p, 0.0))(
        params))[0]
    np.testing.assert_allclose(g_zero, g_ips, rtol=1e-12, atol=1e-14)


def test_logged_log_probs_closed_form():
  logits = np.array([[0.0, 1.0, 2.0], [3.0, -1.0, 0.5]])
  apply_fn = lambda params, contexts: contexts @ params
  actions = np.array([2, 1])
  expected = np.log(np_softmax(logits))[np.arange(2), actions]
  np.testing.assert_allclose(logged_log_probs(apply_fn, jnp.eye(3), jnp.asarray(logits),
                                              jnp.asarray(actions)), expected, rtol=1e-6)


@pytest.mark.slow
def test_logged_log_probs_of_a_linear_policy():
  with jax.enable_x64(True):
    apply_fn, params = tiny_policy()
    kernel, bias = np_linear_policy(params)
    expected = np.log(np_softmax(CONTEXTS @ kernel + bias))[np.arange(N), ACTIONS]
    np.testing.assert_allclose(logged_log_probs(apply_fn, params, jnp.asarray(CONTEXTS),
                                                jnp.asarray(ACTIONS)), expected, rtol=1e-12)


@pytest.mark.slow
def test_value_optimal_baseline_is_ope_optimal_baseline():
  np.testing.assert_allclose(value_optimal_baseline(LOG_PROBS, REWARDS, PROPS),
                             optimal_baseline(REWARDS, WEIGHTS), rtol=1e-6)
  with jax.enable_x64(True):
    apply_fn, params = tiny_policy()
    log_probs = logged_log_probs(apply_fn, params, jnp.asarray(CONTEXTS), jnp.asarray(ACTIONS))
    w = np.exp(np.asarray(log_probs)) / LOGGING_PROBS
    np.testing.assert_allclose(value_optimal_baseline(log_probs, LOGGED_REWARDS, LOGGING_PROBS),
                               optimal_baseline(LOGGED_REWARDS, w), rtol=1e-12)
    np.testing.assert_allclose(value_optimal_baseline(log_probs, LOGGED_REWARDS, LOGGING_PROBS),
                               np.cov(LOGGED_REWARDS * w, w)[0, 1] / np.var(w, ddof=1), rtol=1e-10)


@pytest.mark.slow
def test_jit_and_vmap_of_the_objectives():
  rng = np.random.default_rng(1)
  log_probs = np.log(rng.uniform(0.05, 1.0, size=(5, 4)))
  rewards = rng.binomial(1, 0.5, size=(5, 4)).astype(float)
  props = rng.uniform(0.05, 1.0, size=(5, 4))
  fns = [ips_objective, snips_objective, value_optimal_baseline,
         lambda l, r, p: baseline_corrected_objective(l, r, p, 0.3)]
  for fn in fns:
    batched = jax.vmap(fn)(log_probs, rewards, props)
    for b in range(5):
      eager = fn(log_probs[b], rewards[b], props[b])
      np.testing.assert_allclose(batched[b], eager, rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(jax.jit(fn)(log_probs[b], rewards[b], props[b]), eager,
                                 rtol=1e-6, atol=1e-7)


# Gradients against central finite differences (float64).

OBJECTIVES = {
    "ips": lambda l, r, p: ips_objective(l, r, p),
    "snips": lambda l, r, p: snips_objective(l, r, p),
    "corrected_0.4": lambda l, r, p: baseline_corrected_objective(l, r, p, 0.4),
    "corrected_-1": lambda l, r, p: baseline_corrected_objective(l, r, p, -1.0),
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
@pytest.mark.slow
def test_gradient_matches_finite_differences(name):
  objective = OBJECTIVES[name]
  with jax.enable_x64(True):
    apply_fn, params = tiny_policy()
    flat, unravel = ravel_pytree(params)
    assert flat.dtype == jnp.float64 and flat.size == D * NA + NA

    def f(flat_params):
      log_probs = logged_log_probs(apply_fn, unravel(jnp.asarray(flat_params)),
                                   jnp.asarray(CONTEXTS), jnp.asarray(ACTIONS))
      return objective(log_probs, jnp.asarray(LOGGED_REWARDS), jnp.asarray(LOGGING_PROBS))
    analytic = jax.grad(f)(flat)
    numeric = central_differences(jax.jit(f), flat)
    assert np.max(np.abs(numeric)) > 1e-3  # not a vacuous comparison
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_no_gradient_flows_into_the_baseline():
  g = jax.grad(baseline_corrected_objective, argnums=3)(
      jnp.asarray(LOG_PROBS, jnp.float32), REWARDS, PROPS, jnp.float32(0.7))
  assert float(g) == 0.0
  # ... even when the baseline is computed from the same log-probs.
  def through_value_baseline(log_probs):
    beta = value_optimal_baseline(log_probs, REWARDS, PROPS)
    return baseline_corrected_objective(log_probs, REWARDS, PROPS, beta)
  beta = value_optimal_baseline(LOG_PROBS, REWARDS, PROPS)
  fixed = jax.grad(lambda l: baseline_corrected_objective(l, REWARDS, PROPS, beta))(
      jnp.asarray(LOG_PROBS, jnp.float32))
  np.testing.assert_allclose(jax.grad(through_value_baseline)(jnp.asarray(LOG_PROBS, jnp.float32)),
                             fixed, rtol=1e-6)


# Per-example gradients and the corrected gradient.


@pytest.mark.slow
def test_per_example_weight_gradients_equal_a_loop_of_grads():
  with jax.enable_x64(True):
    apply_fn, params = tiny_policy()
    batch = tiny_batch()
    per_example = per_example_weight_gradients(apply_fn, params, batch)
    assert jax.tree_util.tree_structure(per_example) == jax.tree_util.tree_structure(params)
    for leaf, param in zip(jax.tree_util.tree_leaves(per_example), jax.tree_util.tree_leaves(params)):
      assert leaf.shape == (N, *param.shape)
    for i in range(N):
      def weight_i(p, i=i):
        log_probs = logged_log_probs(apply_fn, p, batch.contexts, batch.actions)
        return policy_weights(log_probs, batch.logging_probs)[i]
      expected = ravel_pytree(jax.grad(weight_i)(params))[0]
      got = ravel_pytree(jax.tree_util.tree_map(lambda x, i=i: x[i], per_example))[0]
      np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.slow
def test_per_example_weight_gradients_closed_form_for_a_linear_policy():
  # w = pi(a|x) / p, so grad_kernel w = w x (e_a - pi(.|x))^T and grad_bias w = w (e_a - pi(.|x)).
  with jax.enable_x64(True):
    apply_fn, params = tiny_policy()
    kernel, bias = np_linear_policy(params)
    pi = np_softmax(CONTEXTS @ kernel + bias)
    w = pi[np.arange(N), ACTIONS] / LOGGING_PROBS
    residual = np.eye(NA)[ACTIONS] - pi
    per_example = per_example_weight_gradients(apply_fn, params, tiny_batch())
    np.testing.assert_allclose(per_example["linear"]["kernel"][...],
                               w[:, None, None] * CONTEXTS[:, :, None] * residual[:, None, :],
                               rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(per_example["linear"]["bias"][...], w[:, None] * residual,
                               rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("beta", [0.0, 0.4, -1.3])
@pytest.mark.slow
def test_corrected_gradient_is_the_gradient_of_the_corrected_objective(beta):
  with jax.enable_x64(True):
    apply_fn, params = tiny_policy()
    batch = tiny_batch()
    per_example = per_example_weight_gradients(apply_fn, params, batch)
    ascent = corrected_gradient(batch.rewards, per_example, beta)
    assert jax.tree_util.tree_structure(ascent) == jax.tree_util.tree_structure(params)

    def objective(p):
      log_probs = logged_log_probs(apply_fn, p, batch.contexts, batch.actions)
      return baseline_corrected_objective(log_probs, batch.rewards, batch.logging_probs, beta)
    np.testing.assert_allclose(ravel_pytree(ascent)[0], ravel_pytree(jax.grad(objective)(params))[0],
                               rtol=1e-12, atol=1e-15)


@pytest.mark.slow
def test_gradient_optimal_baseline_by_hand():
  with jax.enable_x64(True):
    apply_fn, params = tiny_policy()
    per_example = per_example_weight_gradients(apply_fn, params, tiny_batch())
    g = flat_per_example(per_example)
    norms = (g**2).sum(1)
    expected = (LOGGED_REWARDS * norms).sum() / norms.sum()
    np.testing.assert_allclose(gradient_optimal_baseline(LOGGED_REWARDS, per_example), expected,
                               rtol=1e-12)
    # A weighted mean of the rewards: inside their range.
    assert LOGGED_REWARDS.min() <= expected <= LOGGED_REWARDS.max()


@pytest.mark.slow
def test_gradient_optimal_baseline_all_zero_gradients():
  zeros = {"kernel": jnp.zeros((N, D, NA)), "bias": jnp.zeros((N, NA))}
  r = jnp.asarray(LOGGED_REWARDS, jnp.float32)
  beta = gradient_optimal_baseline(r, zeros)
  assert float(beta) == 0.0
  grads = jax.grad(lambda g, r: gradient_optimal_baseline(r, g), argnums=(0, 1))(zeros, r)
  for leaf in jax.tree_util.tree_leaves(grads):
    assert np.all(np.isfinite(leaf))
  # And the corrected gradient with it is zero (not NaN).
  for leaf in jax.tree_util.tree_leaves(corrected_gradient(r, zeros, beta)):
    np.testing.assert_array_equal(leaf, 0.0)


@pytest.mark.slow
def test_gradient_optimal_baseline_saturated_policy_is_finite():
  # A policy so confident in the logged actions that every weight gradient underflows to 0.
  apply_fn = lambda params, contexts: params * contexts
  contexts = jnp.asarray(np.eye(NA)[ACTIONS] * 1e4, jnp.float32)
  batch = LoggedBatch(contexts, jnp.asarray(ACTIONS), jnp.asarray(LOGGED_REWARDS, jnp.float32),
                      jnp.asarray(LOGGING_PROBS, jnp.float32))
  per_example = per_example_weight_gradients(apply_fn, jnp.float32(1.0), batch)
  np.testing.assert_array_equal(per_example, 0.0)
  assert float(gradient_optimal_baseline(batch.rewards, per_example)) == 0.0


# The gradient variance.


def np_gradient_variance(r, g, beta):
  terms = (r - beta)[:, None] * g
  return np.trace(np.cov(terms, rowvar=False, ddof=1)) / len(r)


def np_variance_minimiser(r, g):
  """argmin_beta of sum_j var_i((r_i - beta) g_ij): sum_j cov(r g_j, g_j) / sum_j var(g_j)."""
  rg = r[:, None] * g
  cov = ((rg - rg.mean(0)) * (g - g.mean(0))).sum()
  return cov / ((g - g.mean(0))**2).sum()


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.7])
@pytest.mark.slow
def test_gradient_variance_is_the_trace_of_the_sample_covariance_over_n(beta):
  with jax.enable_x64(True):
    apply_fn, params = tiny_policy()
    per_example = per_example_weight_gradients(apply_fn, params, tiny_batch())
    g = flat_per_example(per_example)
    np.testing.assert_allclose(gradient_variance(LOGGED_REWARDS, per_example, beta),
                               np_gradient_variance(LOGGED_REWARDS, g, beta), rtol=1e-10)


@pytest.mark.slow
def test_gradient_variance_is_minimised_at_the_optimal_baseline_when_mean_gradient_is_zero():
  # E[grad w] = 0 under the logging policy; on a batch whose per-example gradients have sample
  # mean exactly 0 (pairs g, -g) the variance's minimiser is exactly beta*_grad.
  rng = np.random.default_rng(2)
  half = {"kernel": rng.normal(size=(4, D, NA)), "bias": rng.normal(size=(4, NA))}
  per_example = jax.tree_util.tree_map(lambda x: np.concatenate([x, -x]), half)
  r = rng.binomial(1, 0.5, size=8).astype(float)
  r[:2] = [0.0, 1.0]
  with jax.enable_x64(True):
    beta_star = float(gradient_optimal_baseline(r, per_example))
    np.testing.assert_allclose(beta_star, np_variance_minimiser(r, flat_per_example(per_example)),
                               rtol=1e-12)
    best = float(gradient_variance(r, per_example, beta_star))
    for offset in np.linspace(-1.0, 1.0, 41):
      if offset != 0:
        assert best < float(gradient_variance(r, per_example, beta_star + offset))


def test_gradient_variance_as_a_function_of_beta():
  with jax.enable_x64(True):
    apply_fn, params = tiny_policy()
    per_example = per_example_weight_gradients(apply_fn, params, tiny_batch())
    g = flat_per_example(per_example)
    r = LOGGED_REWARDS
    variance = jax.jit(jax.vmap(lambda b: gradient_variance(r, per_example, b)))
    grid = np.linspace(-2.0, 3.0, 5001)
    values = np.asarray(variance(grid))
    # A parabola: its grid argmin is the closed-form minimiser (to the grid step).
    minimiser = np_variance_minimiser(r, g)
    assert abs(grid[np.argmin(values)] - minimiser) <= grid[1] - grid[0]
    assert float(variance(np.array([minimiser]))[0]) <= values.min() + 1e-12
    # beta*_grad minimises the uncentred second moment mean_i (r_i - beta)^2 ||g_i||^2 exactly ...
    beta_star = float(gradient_optimal_baseline(r, per_example))
    second_moment = lambda b: np.mean((r - b)**2 * (g**2).sum(1))
    assert all(second_moment(beta_star) < second_moment(b) for b in grid if abs(b - beta_star) > 1e-9)
    # ... and, on this fixed batch, gives a lower gradient variance than no baseline.
    assert float(gradient_variance(r, per_example, beta_star)) < float(
        gradient_variance(r, per_example, 0.0))
    # The sample variance's minimiser centres the gradients, so it is not exactly beta*_grad on a
    # finite batch (the two agree when the batch mean of g is 0, the population case); the excess
    # variance at beta*_grad is the parabola's curvature times the squared distance.
    curvature = ((g - g.mean(0))**2).sum() / (N - 1) / N
    at_minimiser = float(variance(np.array([minimiser]))[0])
    assert abs(beta_star - minimiser) > 1e-3
    np.testing.assert_allclose(float(gradient_variance(r, per_example, beta_star)) - at_minimiser,
                               curvature * (beta_star - minimiser)**2, rtol=1e-8)


# Unbiasedness by Monte Carlo on a small discrete bandit.

MC_Q = np.array([[0.9, 0.2, 0.5],
                 [0.1, 0.6, 0.3],
                 [0.4, 0.4, 0.8],
                 [0.7, 0.1, 0.2]])
MC_LOGGING = np_softmax(np.array([[0.0, 0.5, -0.5],
                                  [1.0, 0.0, 0.0],
                                  [-0.5, 0.0, 0.5],
                                  [0.2, -0.2, 0.0]]))
MC_DATASETS, MC_ROUNDS = 20000, 20


def mc_policy():
  apply_fn, params = as_functional(LinearPolicy(4, 3, rngs=nnx.Rngs(3)))
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params)
  flat, unravel = ravel_pytree(params)
  return apply_fn, unravel(flat + 0.5 * np.random.default_rng(3).normal(size=flat.shape))


def mc_gradients():
  """(exact gradient [P], {name: [M, P] estimates}) of V(theta) = mean_x sum_a pi(a|x) q(x, a)."""
  apply_fn, params = mc_policy()
  eye = jnp.eye(4)
  q = jnp.asarray(MC_Q)
  logging = jnp.asarray(MC_LOGGING)

  def value(p):
    return jnp.mean(jnp.sum(jax.nn.softmax(apply_fn(p, eye), axis=-1) * q, axis=-1))
  exact = ravel_pytree(jax.grad(value)(params))[0]

  def one_dataset(key):
    context_key, action_key, reward_key = jax.random.split(key, 3)
    x = jax.random.randint(context_key, (MC_ROUNDS,), 0, 4)
    a = jax.random.categorical(action_key, jnp.log(logging[x]))
    r = jax.random.bernoulli(reward_key, q[x, a]).astype(jnp.float64)
    batch = LoggedBatch(eye[x], a, r, logging[x, a])
    per_example = per_example_weight_gradients(apply_fn, params, batch)
    beta_star = gradient_optimal_baseline(r, per_example)
    return {name: ravel_pytree(corrected_gradient(r, per_example, beta))[0]
            for name, beta in [("0", 0.0), ("0.4", 0.4), ("star", beta_star)]}
  keys = jax.random.split(jax.random.key(2024), MC_DATASETS)
  return np.asarray(exact), {k: np.asarray(v) for k, v in jax.jit(jax.vmap(one_dataset))(keys).items()}


@pytest.fixture(scope="module")
def monte_carlo():
  with jax.enable_x64(True):
    return mc_gradients()


@pytest.mark.parametrize("beta", ["0", "0.4"])
@pytest.mark.slow
def test_corrected_gradient_is_unbiased(monte_carlo, beta):
  exact, estimates = monte_carlo
  g = estimates[beta]
  assert g.shape == (MC_DATASETS, 4 * 3 + 3)
  stderr = g.std(0, ddof=1) / np.sqrt(MC_DATASETS)
  # The test has power: the tolerance is small against the gradient itself.
  assert 4 * stderr.max() < 0.2 * np.abs(exact).max()
  np.testing.assert_array_less(np.abs(g.mean(0) - exact), 4 * stderr)


@pytest.mark.slow
def test_optimal_gradient_baseline_lowers_the_mse(monte_carlo):
  exact, estimates = monte_carlo
  squared_error = {k: ((g - exact)**2).sum(1) for k, g in estimates.items()}
  diff = squared_error["0"] - squared_error["star"]
  # Lower MSE than beta = 0 by more than 4 standard errors of the paired difference.
  assert diff.mean() > 4 * diff.std(ddof=1) / np.sqrt(MC_DATASETS)
  assert squared_error["star"].mean() < squared_error["0.4"].mean()


# Extreme inputs.


@pytest.mark.slow
def test_snips_no_nan_gradient_when_every_weight_underflows():
  log_probs = jnp.full(4, -1e4, jnp.float32)
  assert np.all(np.asarray(policy_weights(log_probs, PROPS)) == 0.0)
  assert float(snips_objective(log_probs, REWARDS, PROPS)) == 0.0
  g = jax.grad(snips_objective)(log_probs, REWARDS, PROPS)
  assert np.all(np.isfinite(g))
  # Through a policy whose logits make every logged action impossible in float32.
  apply_fn = lambda params, contexts: params * contexts
  contexts = jnp.asarray(-1e4 * np.eye(NA)[ACTIONS], jnp.float32)

  def objective(p):
    lp = logged_log_probs(apply_fn, p, contexts, jnp.asarray(ACTIONS))
    return snips_objective(lp, LOGGED_REWARDS, LOGGING_PROBS)
  assert float(objective(jnp.float32(1.0))) == 0.0
  assert np.isfinite(float(jax.grad(objective)(jnp.float32(1.0))))


@pytest.mark.slow
def test_tiny_propensities_and_huge_logits_stay_finite():
  apply_fn = lambda params, contexts: params * contexts
  contexts = jnp.asarray(1e4 * np.eye(NA)[ACTIONS] - 1e4 * np.eye(NA)[(ACTIONS + 1) % NA],
                         jnp.float32)
  props = np.full(N, 1e-8)
  batch = LoggedBatch(contexts, jnp.asarray(ACTIONS), jnp.asarray(LOGGED_REWARDS, jnp.float32),
                      jnp.asarray(props, jnp.float32))
  for fn in [ips_objective, snips_objective,
             lambda l, r, p: baseline_corrected_objective(l, r, p, 0.5)]:
    def objective(p):
      lp = logged_log_probs(apply_fn, p, batch.contexts, batch.actions)
      return fn(lp, batch.rewards, batch.logging_probs)
    assert np.isfinite(float(objective(jnp.float32(1.0))))
    assert np.isfinite(float(jax.grad(objective)(jnp.float32(1.0))))
  per_example = per_example_weight_gradients(apply_fn, jnp.float32(1.0), batch)
  assert np.all(np.isfinite(per_example))
  assert np.isfinite(float(gradient_optimal_baseline(batch.rewards, per_example)))
  assert np.isfinite(float(gradient_variance(batch.rewards, per_example, 0.5)))


def test_drpo_hard_filter_keeps_the_top_rounds_and_imitates_them():
  from saferl_jax.opl import filtered_likelihood_objective, hard_filter
  rewards = jnp.array([0.1, 0.9, 0.5, 0.7])
  np.testing.assert_array_equal(hard_filter(rewards, quantile=0.5), [False, True, False, True])
  log_probs = jnp.log(jnp.array([0.2, 0.4, 0.3, 0.8]))
  expected = (np.log(0.4) + np.log(0.8)) / 2
  assert float(filtered_likelihood_objective(log_probs, rewards, quantile=0.5)) == pytest.approx(expected)
  # Discarded rounds get no gradient, kept ones a likelihood gradient of 1 / (number kept).
  grad = jax.grad(lambda lp: filtered_likelihood_objective(lp, rewards, quantile=0.5))(log_probs)
  np.testing.assert_allclose(grad, [0.0, 0.5, 0.0, 0.5])
  with pytest.raises(ValueError, match="quantile"):
    hard_filter(rewards, quantile=1.0)


def test_bad_values_are_refused_by_name_and_tiny_propensities_stay_finite():
  from saferl_jax.opl import objectives
  log_probs, rewards = jnp.log(jnp.array([0.5, 0.25, 0.25])), jnp.array([1.0, 0.0, 1.0])
  probs = jnp.array([0.5, 0.5, 0.5])
  with pytest.raises(ValueError, match="^logging_probs:"):
    objectives.ips_objective(log_probs, rewards, probs.at[0].set(0.0))
  with pytest.raises(ValueError, match="^rewards:"):
    objectives.snips_objective(log_probs, rewards.at[1].set(jnp.nan), probs)
  with pytest.raises(ValueError, match="^log_probs:"):
    objectives.baseline_corrected_objective(log_probs.at[0].set(0.5), rewards, probs, 0.5)
  with pytest.raises(ValueError, match="^actions:"):
    objectives.logged_log_probs(lambda p, x: x @ p, jnp.ones((2, 3)), jnp.ones((3, 2)),
                                jnp.array([0, 1, 3]))  # a gather would clamp 3 to 2
  tiny = probs.at[0].set(1e-20)
  for fn in (objectives.ips_objective, objectives.snips_objective,
             objectives.value_optimal_baseline):
    assert np.isfinite(float(fn(log_probs, rewards, tiny)))
