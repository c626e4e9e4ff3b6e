"""NNX rankers: one logit per document, independent of padding, usable functionally."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from saferl_jax.models.functional import as_functional
from saferl_jax.models.rankers import LinearRanker, MLPRanker


@pytest.mark.slow
def test_rankers_score_each_document_independently_of_padding():
  features = jax.random.normal(jax.random.key(0), (2, 5, 3))
  padded = jnp.concatenate([features, jnp.full((2, 3, 3), 1e3)], axis=1)
  for ranker in (LinearRanker(3, rngs=nnx.Rngs(0)), MLPRanker(3, hidden=(8,), rngs=nnx.Rngs(0))):
    logits = ranker(features)
    assert logits.shape == (2, 5)
    np.testing.assert_allclose(ranker(padded)[:, :5], logits, rtol=1e-6)
    apply_fn, params = as_functional(ranker)
    np.testing.assert_allclose(jax.jit(apply_fn)(params, features), logits, rtol=1e-6)


@pytest.mark.slow
def test_linear_ranker_is_linear():
  ranker = LinearRanker(2, rngs=nnx.Rngs(0))
  x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  logits = ranker(x)
  assert float(logits[2] - logits[0] - logits[1] + ranker(jnp.zeros((1, 2)))[0]) == 0.0
