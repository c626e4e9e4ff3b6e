"""The clipped surrogate shared by PPO, LOOP and PRPO."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax.policy_gradient import clipped_surrogate


def test_clipped_surrogate_closed_form_and_zero_gradient_outside():
  ratio = jnp.array([0.5, 0.9, 1.5, 0.5, 1.5])
  advantage = jnp.array([1.0, 1.0, 1.0, -1.0, -1.0])
  value = clipped_surrogate(ratio, advantage, clip_low=0.8, clip_high=1.2)
  np.testing.assert_allclose(value, [0.5, 0.9, 1.2, -0.8, -1.5])
  grad = jax.grad(lambda r: clipped_surrogate(r, advantage, clip_low=0.8, clip_high=1.2).sum())(ratio)
  # Clipped where the advantage would push the ratio further out: 1.5 with A > 0, 0.5 with A < 0.
  np.testing.assert_allclose(grad, [1.0, 1.0, 0.0, 0.0, -1.0])


def test_clipped_surrogate_rejects_an_empty_range():
  with pytest.raises(ValueError, match="clip_low"):
    clipped_surrogate(1.0, 1.0, clip_low=1.2, clip_high=0.8)
