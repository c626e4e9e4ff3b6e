"""The LOOP experiment's many-prompt tasks: the circle task's closed-form optimum, and the results schema."""


import numpy as np
import pytest

from saferl_jax.data import mixture2d
from saferl_jax.experiments import loop_finetuning

PRIOR = mixture2d.default_mixture()


def _reweighted_moments(direction, reward_scale, kl_weight, num_samples, seed):
  """Self-normalised importance estimates under q ∝ p exp(c u . x / beta) from prior samples:
  (estimates [6], standard errors [6]) of the mean [2] and the four component weights."""
  rng = np.random.default_rng(seed)
  weights, means = np.asarray(PRIOR.weights, np.float64), np.asarray(PRIOR.means, np.float64)
  weights /= weights.sum()  # float32 weights, renormalised for numpy
  components = rng.choice(len(weights), size=num_samples, p=weights)
  x = means[components] + 0.4 * rng.standard_normal((num_samples, 2))
  log_w = reward_scale * x @ np.asarray(direction) / kl_weight
  w = np.exp(log_w - log_w.max())
  w /= w.sum()
  features = np.concatenate([x, np.eye(len(weights))[components]], axis=1)  # [n, 6]
  estimates = w @ features
  # Delta-method standard error of a self-normalised estimate: sqrt(sum_i w_i^2 (f_i - mean)^2).
  errors = np.sqrt((w ** 2) @ (features - estimates) ** 2)
  return estimates, errors


def _closed_form(direction, reward_scale, kl_weight):
  optimum = loop_finetuning.circle_optimum(PRIOR, direction, reward_scale=reward_scale,
                                           kl_weight=kl_weight)
  return np.concatenate([np.asarray(mixture2d.mixture_mean(optimum)), np.asarray(optimum.weights)])


@pytest.mark.parametrize("angle", [0.3, 2.0, 4.4])
def test_circle_optimum_matches_monte_carlo_reweighting_of_the_prior(angle):
  """q*(x) ∝ p(x) exp(c u . x / beta): its mean and mode weights equal importance-reweighted prior
  samples within 4 standard errors; the optimum at another temperature is rejected."""
  direction = np.array([np.cos(angle), np.sin(angle)])
  estimates, errors = _reweighted_moments(direction, 1.5, 1.0, 200_000, seed=int(10 * angle))
  exact = _closed_form(direction, 1.5, 1.0)
  np.testing.assert_array_less(np.abs(estimates - exact), 4 * errors)
  # The same tolerance tells the optimum at another temperature (beta 1.3) apart: the test has power.
  wrong = _closed_form(direction, 1.5, 1.3)
  assert np.max(np.abs(estimates - wrong) / errors) > 8


def test_circle_optimum_rejects_a_bad_scale():
  with pytest.raises(ValueError, match="reward_scale"):
    loop_finetuning.circle_optimum(PRIOR, [1.0, 0.0], reward_scale=float("nan"), kl_weight=1.0)
  with pytest.raises(ValueError, match="kl_weight"):
    loop_finetuning.circle_optimum(PRIOR, [1.0, 0.0], reward_scale=1.0, kl_weight=0.0)


# The many-prompt results of a whole run are checked in tests/test_cli.py's demo test (one run
# of the experiment serves both).
