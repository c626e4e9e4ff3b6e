"""AND-composition loops (saferl_jax.training.composition): training-free and primal-dual."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saferl_jax.constrained.duals import simplex_descent
from saferl_jax.data import composition2d as c2d
from saferl_jax.data.mixture2d import make_mixture
from saferl_jax.diffusion.schedules import linear_schedule
from saferl_jax.training.composition import CompositionSampling, compose, compose_train

SCHEDULE = linear_schedule(100)
SAMPLING = CompositionSampling(shape=(2,), num_samples=32, num_steps=8)
# Two Gaussians N(+-(1, 0), 0.25 I) with their exact noise predictions, parameterised by the means
# (stacked [2, 1, 2]). With equal variances the weighted score sum_i mu_i eps_i is exactly the
# noised score of prod_i q_i^{mu_i} = N(sum_i mu_i m_i, 0.25 I), so the composed chain is the
# composition at every t, and by symmetry mu* = (1/2, 1/2), where p = N(0, 0.25 I).
BASE = make_mixture([1.0], [[0.0, 0.0]], stds=0.5)
MEANS = jnp.array([[[-1.0, 0.0]], [[1.0, 0.0]]])


def gaussian_apply(means, x, t, conditions):
  return c2d.mixture_eps_apply(c2d.MixtureScore(BASE._replace(means=means), SCHEDULE.alphas_cumprod),
                               x, t, conditions)


@pytest.mark.slow  # ~2.6 s on 2 cores
def test_compose_moves_the_weights_to_the_optimum():
  result = compose(gaussian_apply, MEANS, key=jax.random.split(jax.random.key(0), 2), rounds=20,
                   schedule=SCHEDULE, sampling=SAMPLING, dual_optimizer=simplex_descent(0.02),
                   initial_weights=[0.9, 0.1], eval_every=20)
  weights = result.history["weights/0"]
  assert weights.shape == (20, 2)
  np.testing.assert_allclose(weights[0], 0.9)
  # Here the per-sample path KLs do not depend on the sample (the models' means differ by a
  # constant), so the dual ascent is deterministic: the distance to 1/2 halves about every round
  # from 0.4 (4e-6 after 20 rounds, observed); 1e-3 leaves room for float32 only.
  np.testing.assert_allclose(result.weights, 0.5, atol=1e-3)
  np.testing.assert_allclose(result.history["kl/0"][-1], result.history["kl/1"][-1], rtol=1e-3)
  assert np.all(np.diff(np.abs(weights[:, 0] - 0.5)) <= 1e-6)  # monotone approach


@pytest.mark.slow  # ~3.4 s on 2 cores
def test_compose_train_learns_the_composition_and_balances_the_kls():
  result = compose_train(gaussian_apply, MEANS, key=jax.random.key(1), rounds=40, schedule=SCHEDULE,
                         sampling=SAMPLING, optimizer=optax.sgd(0.02),
                         dual_optimizer=simplex_descent(0.002), eval_every=40)
  # Starts at model 0 (mean (-1, 0)); the composition's mean is (0, 0). The path KLs are ~37 at the
  # start, so the dual step must be small (0.002): with 0.02 the weights jump to a corner and the
  # primal-dual pair oscillates (adam(0.05) too). The dynamics are noise-free here (as above);
  # observed after 40 rounds: mean 0.003, weights 0.497; the tolerances leave 10x room.
  np.testing.assert_allclose(result.params[0], [0.0, 0.0], atol=0.05)
  np.testing.assert_allclose(result.weights, 0.5, atol=0.03)
  assert result.history["kl_max"][-1] < 0.3 * result.history["kl_max"][0]


def toy_apply(params, x, t, conditions):
  del t, conditions
  return jnp.tanh(params * x)


@pytest.mark.slow  # ~6.7 s on 2 cores: both loops, each run three times
def test_resume_after_an_interrupt_equals_the_uninterrupted_run(tmp_path, interrupt_checkpoints):
  keys = jax.random.split(jax.random.key(2), 2)
  models = jnp.array([0.3, 0.8, 1.2])
  for loop, extra in ((compose, {}), (compose_train, {"optimizer": optax.adam(1e-2)})):
    options = dict(key=keys, rounds=4, schedule=SCHEDULE, sampling=SAMPLING, eval_every=2,
                   dual_optimizer=simplex_descent(0.01), **extra)
    reference = loop(toy_apply, models, **options)
    path = tmp_path / loop.__name__
    interrupt_checkpoints.saved.clear()
    interrupt_checkpoints.at = 2
    with pytest.raises(KeyboardInterrupt):
      loop(toy_apply, models, checkpoint_path=path, **options)
    resumed = loop(toy_apply, models, checkpoint_path=path, **options)
    assert interrupt_checkpoints.saved == [2, 4]
    np.testing.assert_array_equal(resumed.weights, reference.weights)
    for name in reference.history:
      np.testing.assert_array_equal(resumed.history[name], reference.history[name])
    if loop is compose_train:
      np.testing.assert_array_equal(resumed.params, reference.params)
  # Another dual step size is another run: its checkpoint is refused.
  options = {name: value for name, value in options.items() if name != "optimizer"}
  with pytest.raises(ValueError, match="dual"):
    compose(toy_apply, models, checkpoint_path=tmp_path / "compose",
            **{**options, "dual_optimizer": simplex_descent(0.5)})


def test_bad_options_are_named():
  options = dict(key=jax.random.key(0), rounds=2, schedule=SCHEDULE, sampling=SAMPLING, eval_every=2)
  with pytest.raises(ValueError, match="initial_weights"):
    compose(toy_apply, jnp.array([0.3, 0.8]), initial_weights=[0.5, 0.6], **options)
  with pytest.raises(ValueError, match="rounds"):
    compose(toy_apply, jnp.array([0.3, 0.8]), **{**options, "rounds": 3})
  with pytest.raises(TypeError, match="dual_optimizer"):
    compose(toy_apply, jnp.array([0.3, 0.8]), dual_optimizer=optax.sgd(0.1), **options)
  with pytest.raises(TypeError, match="optimizer"):
    compose_train(toy_apply, jnp.array([0.3, 0.8]), optimizer=None, **options)
  with pytest.raises(ValueError, match="model_params"):
    compose(toy_apply, (jnp.zeros(2), jnp.zeros(3)), **options)
