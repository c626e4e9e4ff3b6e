"""Models (floor 2): Flax NNX softmax policies, rankers, denoisers and the digit classifier, and
cross-fitted reward and propensity models for off-policy evaluation (pure JAX/optax functions).

`lora` adds low-rank adapters to the denoisers for parameter-efficient fine-tuning.

Floor-1 code takes `apply_fn(params, inputs)`; `as_functional` splits any of these modules into
that pair, so parameters can be vmapped over seeds, differentiated and optimised with optax.
"""

from saferl_jax.models.classifier import DigitClassifier
from saferl_jax.models.denoisers import (ClassEncoder, ConvDenoiser, DictEncoder, MLPDenoiser,
                                         PatchConv, SequenceEncoder, VectorEncoder)
from saferl_jax.models.functional import Functional, as_functional
from saferl_jax.models.lora import (LoRAFunctional, ParameterCounts, add_lora, count_parameters,
                                    disable_adapters, lora_functional, merge_lora,
                                    parameter_counts)
from saferl_jax.models.policies import LinearPolicy, MLPPolicy
from saferl_jax.models.rankers import (LinearRanker, MLPRanker, TrustRegionRanker,
                                       trust_region_radius)
from saferl_jax.models.reward_models import (PropensityFit, RewardModelFit, cross_fit_propensities,
                                             cross_fit_reward_model, fitting_weights)

__all__ = ["ClassEncoder", "ConvDenoiser", "DictEncoder", "DigitClassifier", "Functional",
           "LoRAFunctional", "ParameterCounts", "add_lora", "count_parameters", "disable_adapters",
           "lora_functional", "merge_lora", "parameter_counts", "LinearPolicy", "LinearRanker", "MLPDenoiser", "MLPPolicy", "MLPRanker", "PatchConv", "TrustRegionRanker", "trust_region_radius",
           "PropensityFit", "RewardModelFit", "SequenceEncoder", "VectorEncoder", "as_functional",
           "cross_fit_propensities", "cross_fit_reward_model", "fitting_weights"]
