"""The constrained off-policy objective: values by hand, gradients against finite differences and
the beta-corrected formula, bad inputs."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from saferl_jax.opl.constrained import constrained_objective

N, A = 8, 3


@functools.cache
def logged() -> types.SimpleNamespace:
  """A small log with two rewards (built on first use, not when xdist's workers import the file)."""
  keys = jax.random.split(jax.random.key(0), 5)
  logging = jax.nn.softmax(jax.random.normal(keys[1], (N, A)), axis=-1)
  actions = jax.random.categorical(keys[2], jnp.log(logging))
  return types.SimpleNamespace(
      logits=jax.random.normal(keys[0], (N, A)), logging=logging, actions=actions,
      propensities=logging[jnp.arange(N), actions],
      rewards=jax.random.bernoulli(keys[3], 0.5, (N, 2)).astype(jnp.float32),
      reward_hat=jax.random.uniform(keys[4], (N, A, 2)))


def objective(logits, multipliers=(1.5,), **options):
  log = logged()
  options = {"thresholds": jnp.array([0.3]), "estimator": "dr", "reward_hat": log.reward_hat} | options
  return constrained_objective(jax.nn.softmax(logits, axis=-1), log.actions, log.rewards, log.propensities,
                               jnp.asarray(multipliers), **options)


@pytest.mark.slow
def test_on_the_logging_policy_the_values_are_the_means_and_the_bound_is_students_t():
  # pi = pi_0: every weight is 1, beta-IPS is the plain mean whatever beta*, and the t bound is
  # mean - t_{n-1, 0.95} s / sqrt(n) with the sample std s.
  out = objective(jnp.log(logged().logging), estimator="beta_ips", reward_hat=None)
  rewards = np.asarray(logged().rewards, float)
  np.testing.assert_allclose(out.estimates, rewards.mean(axis=0), atol=1e-6)  # float32 rounding
  t = scipy_stats.t.ppf(0.95, N - 1)
  lcb = rewards[:, 1].mean() - t * rewards[:, 1].std(ddof=1) / np.sqrt(N)
  np.testing.assert_allclose(out.lower_bounds, [lcb], atol=1e-5)
  np.testing.assert_allclose(out.slacks, [lcb - 0.3], atol=1e-5)
  np.testing.assert_allclose(out.lagrangian, rewards[:, 0].mean() + 1.5 * (lcb - 0.3), atol=1e-5)


@pytest.mark.slow
def test_penalty_estimate_uses_the_estimate_in_the_slack():
  out = objective(logged().logits, penalty="estimate")
  np.testing.assert_allclose(out.slacks, out.estimates[1:] - 0.3, atol=1e-6)
  np.testing.assert_allclose(out.lagrangian, out.estimates[0] + 1.5 * out.slacks[0], atol=1e-6)


@pytest.mark.slow
def test_dr_gradient_matches_central_finite_differences():
  # In float64 a central difference with h = 1e-5 is accurate to O(h^2) ~ 1e-10 plus rounding
  # ~1e-16 / h ~ 1e-11; 1e-7 leaves room for the objective's curvature.
  with jax.enable_x64(True):
    logits = logged().logits.astype(jnp.float64)
    f = lambda x: objective(x).lagrangian
    grad = np.asarray(jax.jit(jax.grad(f))(logits))
    h = 1e-5
    steps = h * jnp.eye(N * A).reshape(N * A, N, A)  # one coordinate per row
    values = jax.jit(jax.vmap(f))(jnp.concatenate([logits + steps, logits - steps]))
    numeric = np.asarray((values[:N * A] - values[N * A:]) / (2 * h)).reshape(N, A)
  np.testing.assert_allclose(grad, numeric, atol=1e-7)


@pytest.mark.slow
def test_beta_ips_gradient_is_the_beta_corrected_one_with_beta_held_fixed():
  # grad of V0hat = mean_i (r_i - beta*) grad w_i, beta* = Cov(r w, w) / Var(w) at the current w.
  with jax.enable_x64(True):
    logits = logged().logits.astype(jnp.float64)
    p = logged().propensities.astype(jnp.float64)
    rewards = logged().rewards[:, 0].astype(jnp.float64)
    weights = jax.nn.softmax(logits, axis=-1)[jnp.arange(N), logged().actions] / p
    c = weights - weights.mean()
    c, rw = np.asarray(c), np.asarray(rewards * weights)
    beta = float(np.sum(c * rw) / np.sum(c * c))

    def corrected(x):
      w = jax.nn.softmax(x, axis=-1)[jnp.arange(N), logged().actions] / p
      return jnp.mean((rewards - beta) * w)
    got = jax.jit(jax.grad(
        lambda x: objective(x, multipliers=(0.0,), estimator="beta_ips").lagrangian))(logits)
    np.testing.assert_allclose(got, jax.jit(jax.grad(corrected))(logits), atol=1e-12)


def test_no_gradient_flows_into_the_multipliers():
  grad = jax.grad(lambda lam: objective(logged().logits, multipliers=lam).lagrangian)(jnp.array([1.0]))
  assert float(grad[0]) == 0.0


@pytest.mark.parametrize("change, match", [
    (dict(estimator="ips"), "estimator"),
    (dict(bound="magic"), "bound"),
    (dict(penalty="mean"), "penalty"),
    (dict(delta=1.5), "delta"),
    (dict(reward_hat=None), "reward_hat"),
    (dict(reward_hat=jnp.zeros((N, A, 3))), "reward_hat"),
    (dict(thresholds=jnp.array([0.3, 0.4])), "thresholds"),
    (dict(multipliers=(1.0, 2.0)), "rewards"),
    (dict(multipliers=()), "multipliers"),
])
def test_bad_inputs_raise_naming_the_argument(change, match):
  multipliers = change.pop("multipliers", (1.5,))
  with pytest.raises(ValueError, match=match):
    objective(logged().logits, multipliers=multipliers, **change)


def test_an_action_beyond_the_policy_is_refused():
  with pytest.raises(ValueError, match="actions"):
    constrained_objective(jnp.full((2, 2), 0.5), jnp.array([0, 2]), jnp.zeros((2, 2)),
                          jnp.full(2, 0.5), jnp.ones(1), thresholds=jnp.zeros(1))
