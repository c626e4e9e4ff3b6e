"""AND-composition's weighted score and path KLs (saferl_jax.diffusion.composition)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax.diffusion.composition import check_weights, path_kl, path_kls, weighted_apply
from saferl_jax.diffusion.sampler import sample
from saferl_jax.diffusion.schedules import linear_schedule

SCHEDULE = linear_schedule(100)


def toy_apply(params, x, t, conditions):
  """A nonlinear toy noise predictor: tanh(a x) + b t / 100 (params = (a, b))."""
  del conditions
  a, b = params
  return jnp.tanh(a * x) + b * t[:, None] / 100.0


MODELS = (jnp.array([0.5, 1.5, -1.0]), jnp.array([0.0, 1.0, 2.0]))  # n = 3 stacked models


def test_weighted_apply_equals_the_hand_sum():
  x, t = jax.random.normal(jax.random.key(0), (4, 2)), jnp.array([3, 10, 50, 99])
  weights = jnp.array([0.2, 0.5, 0.3])
  composed = weighted_apply(toy_apply)((MODELS, weights), x, t, None)
  by_hand = sum(weights[i] * toy_apply((MODELS[0][i], MODELS[1][i]), x, t, None) for i in range(3))
  np.testing.assert_allclose(composed, by_hand, rtol=1e-6, atol=1e-6)  # float32 rounding only
  assert weighted_apply(toy_apply) is weighted_apply(toy_apply)


def _trajectory(params, apply_fn=None, samples=6):
  return sample(apply_fn or weighted_apply(toy_apply), params, jnp.array([0]),
                key=jax.random.key(1), schedule=SCHEDULE, num_steps=8, eta=1.0,
                samples_per_condition=samples, shape=(2,))


@pytest.mark.slow
def test_path_kls_match_path_kl_per_model_and_the_step_kls_by_hand():
  weights = jnp.array([0.2, 0.5, 0.3])
  composed = weighted_apply(toy_apply)
  traj = _trajectory((MODELS, weights))
  kls = path_kls(composed, (MODELS, weights), toy_apply, MODELS, traj, schedule=SCHEDULE, eta=1.0)
  assert kls.shape == (3, 6)
  for i in range(3):
    model = (MODELS[0][i], MODELS[1][i])
    one = path_kl(composed, (MODELS, weights), model, traj, schedule=SCHEDULE, eta=1.0,
                  reference_apply_fn=toy_apply)
    np.testing.assert_allclose(kls[i], one, rtol=1e-5)
  # By hand: the means of a DDIM step are affine in eps, so the composed mean is the weighted mean
  # of the models' means, and each step's KL is ||sum_j w_j m_j - m_i||^2 / (2 sigma^2).
  from saferl_jax.diffusion.sampler import trajectory_transitions
  means = jnp.stack([trajectory_transitions(toy_apply, (MODELS[0][i], MODELS[1][i]), traj,
                                            schedule=SCHEDULE, eta=1.0).means for i in range(3)])
  stds = trajectory_transitions(toy_apply, (MODELS[0][0], MODELS[1][0]), traj, schedule=SCHEDULE,
                                eta=1.0).stds
  mixed = jnp.tensordot(weights, means, axes=1)
  by_hand = jnp.sum(jnp.sum((mixed - means) ** 2, -1) / (2 * stds[None, :, None] ** 2), axis=1)
  np.testing.assert_allclose(kls, by_hand, rtol=1e-3, atol=1e-6)  # float32 means differenced
  assert bool(jnp.all(kls >= 0))


def test_one_model_is_at_path_kl_zero_from_itself():
  one = jax.tree_util.tree_map(lambda x: x[:1], MODELS)
  composed = weighted_apply(toy_apply)
  traj = _trajectory((one, jnp.ones(1)))
  kls = path_kls(composed, (one, jnp.ones(1)), toy_apply, one, traj, schedule=SCHEDULE, eta=1.0)
  np.testing.assert_allclose(kls, 0.0, atol=1e-8)


@pytest.mark.slow
def test_path_kl_is_differentiable_and_zero_gradient_at_equality():
  traj = _trajectory((0.5, 0.0), apply_fn=toy_apply)
  grad = jax.grad(lambda a: jnp.mean(path_kl(toy_apply, (a, 0.0), (0.5, 0.0), traj,
                                             schedule=SCHEDULE, eta=1.0)))(0.5)
  assert float(grad) == 0.0  # the KL is quadratic in the mean gap, which is 0 here
  grad_away = jax.grad(lambda a: jnp.mean(path_kl(toy_apply, (a, 0.0), (0.5, 0.0), traj,
                                                  schedule=SCHEDULE, eta=1.0)))(0.8)
  assert float(grad_away) > 0  # moving a further from 0.5 increases the KL


def test_bad_inputs_are_named():
  with pytest.raises(TypeError, match="apply_fn"):
    weighted_apply(3)
  with pytest.raises(ValueError, match="weights"):
    check_weights("weights", [0.5, 0.6])
  with pytest.raises(ValueError, match="weights"):
    check_weights("weights", [0.5, 0.5], num_models=3)
