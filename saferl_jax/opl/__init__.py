"""Off-policy learning for contextual bandits: objectives, baseline-corrected gradients, policies, training.

`objectives` is floor 1: pure functions of log-probs, or of an apply_fn and params. The NNX
policies (`saferl_jax.models`) and the training loop (`saferl_jax.training.opl`) are re-exported
here lazily.
"""

from saferl_jax._lazy import lazy_exports
from saferl_jax.opl.objectives import (METHODS, LoggedBatch, MethodGradient, baseline_corrected_objective, corrected_gradient,
                                       filtered_likelihood_objective, gradient_optimal_baseline,
                                       gradient_variance, hard_filter, ips_objective,
                                       logged_log_probs, per_example_weight_gradients, policy_weights,
                                       snips_objective, value_optimal_baseline, logged_batch, method_gradient)

__all__ = [
    "LoggedBatch", "METHODS", "MethodGradient", "baseline_corrected_objective", "corrected_gradient",
    "filtered_likelihood_objective", "gradient_optimal_baseline", "gradient_variance",
    "hard_filter", "ips_objective", "logged_batch", "logged_log_probs", "method_gradient",
    "per_example_weight_gradients", "policy_weights", "snips_objective", "value_optimal_baseline",
]

# Floors 2 and 3: NNX policies and the training loop, loaded on first use.
_LAZY = {
    "LinearPolicy": "saferl_jax.models.policies",
    "MLPPolicy": "saferl_jax.models.policies",
    "as_functional": "saferl_jax.models.functional",
    "train": "saferl_jax.training.opl",
    "TrainResult": "saferl_jax.training.driver",
}
__all__ += list(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
