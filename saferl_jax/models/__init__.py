"""Flax NNX modules (floor 2): softmax policies, rankers, denoisers and the digit classifier.

Floor-1 code takes `apply_fn(params, inputs)`; `as_functional` splits any of these modules into
that pair, so parameters can be vmapped over seeds, differentiated and optimised with optax.
"""

from saferl_jax.models.classifier import DigitClassifier
from saferl_jax.models.denoisers import ConvDenoiser, MLPDenoiser, PatchConv
from saferl_jax.models.functional import Functional, as_functional
from saferl_jax.models.policies import LinearPolicy, MLPPolicy
from saferl_jax.models.rankers import LinearRanker, MLPRanker

__all__ = ["ConvDenoiser", "DigitClassifier", "Functional", "LinearPolicy", "LinearRanker", "MLPDenoiser",
           "MLPPolicy", "MLPRanker", "PatchConv", "as_functional"]
