"""The trust-region ranker: its exposure-ratio guarantee, checked by enumerating rankings."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax.models import TrustRegionRanker, trust_region_radius


def exact_exposure(logits, rank_weights):
  """omega(d) = sum over every top-K prefix y of P(y) theta_{rank(d|y)}, in float64."""
  logits = np.asarray(logits, np.float64)
  exposure = np.zeros_like(logits)
  for prefix in itertools.permutations(range(len(logits)), len(rank_weights)):
    left, probability = list(range(len(logits))), 1.0
    for item in prefix:
      probability *= np.exp(logits[item]) / np.exp(logits[left]).sum()
      left.remove(item)
    for rank, item in enumerate(prefix):
      exposure[item] += probability * rank_weights[rank]
  return exposure


@pytest.mark.parametrize("seed", range(3))
def test_every_exposure_keeps_the_guaranteed_ratio(seed):
  """Adversarial inner scores (+-large, so tanh saturates) on 5 documents, K = 3: every
  exposure ratio to the base policy stays >= e^{-2 radius K} = 0.8. The bound is conservative
  (the worst corner reaches 0.93-0.95 on these seeds) but the region does cut exposure."""
  k, radius = 3, trust_region_radius(0.8, k=3)
  rank_weights = 1 / np.log2(np.arange(k) + 2)
  base_logits = jax.random.normal(jax.random.key(seed), (5,)) * 2
  ranker = TrustRegionRanker(lambda p, x: base_logits, None, lambda p, x: p, radius)
  base = exact_exposure(base_logits, rank_weights)
  worst = np.inf
  for signs in itertools.product([-50.0, 50.0], repeat=5):  # every corner of the region
    exposure = exact_exposure(ranker.apply(jnp.array(signs), None), rank_weights)
    worst = min(worst, (exposure / base).min())
  assert worst >= 0.8 - 1e-9
  assert worst < 1.0


def test_the_radius_and_bad_input():
  assert np.isclose(np.exp(-2 * trust_region_radius(0.5, k=4) * 4), 0.5)
  with pytest.raises(ValueError, match="min_exposure_ratio"):
    trust_region_radius(1.0, k=5)
  with pytest.raises(ValueError, match="k"):
    trust_region_radius(0.8, k=0)
