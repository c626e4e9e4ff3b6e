"""The DR network relevance model: the counterfactual loss's minimiser and per-seed training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saferl_jax.cltr import counterfactual_cross_entropy
from saferl_jax.training.reward_network import ClickRegressionData, train_reward_network


def tabular(params, features):
  """One free logit per (query, document): the loss's minimiser is then visible directly."""
  del features
  return params


@pytest.mark.slow
def test_the_minimiser_is_the_ips_target_over_the_propensity_ratio():
  """-[rt log s + (a - rt) log(1 - s)] is minimised at s = rt / a; a weight of 0 leaves a
  document untouched; the loss is the weighted sum."""
  targets = jnp.array([[0.1, 0.45, 0.3, 0.7]])
  ratios = jnp.array([[1.0, 0.9, 0.5, 1.0]])
  weights = jnp.array([[1.0, 2.0, 1.0, 0.0]])
  data = ClickRegressionData(jnp.zeros((1, 4, 1)), targets, ratios, weights)
  fit = train_reward_network(tabular, jnp.zeros((1, 4)), data, key=jax.random.key(0), steps=2000,
                             optimizer=optax.adam(0.05))
  s = jax.nn.sigmoid(fit.params)
  np.testing.assert_allclose(s[0, :3], (targets / ratios)[0, :3], atol=2e-3)
  assert float(fit.params[0, 3]) == 0.0  # weight 0: no gradient
  loss = counterfactual_cross_entropy(fit.params, targets, ratios, weights)
  manual = -sum(float(w * (t * np.log(p) + (a - t) * np.log(1 - p)))
                for w, t, a, p in zip(weights[0], targets[0], ratios[0], s[0]))
  np.testing.assert_allclose(float(loss), manual, rtol=1e-5)


@pytest.mark.slow
def test_seeds_run_together_equal_seeds_run_alone():
  features = jax.random.normal(jax.random.key(1), (3, 4, 2))
  targets = jax.random.uniform(jax.random.key(2), (2, 3, 4))
  data = ClickRegressionData(jnp.stack([features] * 2), targets, jnp.ones((2, 3, 4)),
                             jnp.ones((2, 3, 4)))
  linear = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731
  params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
  keys = jax.random.split(jax.random.key(0), 2)
  together = train_reward_network(linear, params, data, key=keys, steps=50,
                                  optimizer=optax.adam(0.1))
  for seed in range(2):
    alone = train_reward_network(linear, jax.tree_util.tree_map(lambda x: x[seed], params),
                                 jax.tree_util.tree_map(lambda x: x[seed], data), key=keys[seed],
                                 steps=50, optimizer=optax.adam(0.1))
    np.testing.assert_allclose(together.params["w"][seed], alone.params["w"], rtol=1e-5, atol=1e-6)
  # The two seeds had different targets, so they learned different models.
  assert not np.allclose(together.params["w"][0], together.params["w"][1])
