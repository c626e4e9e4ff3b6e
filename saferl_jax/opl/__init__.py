"""Off-policy learning for contextual bandits: objectives, baseline-corrected gradients, policies, training.

Floor 1 (`objectives`): pure functions of log-probs, or of an apply_fn and params.
Floor 2 (`policies`): Flax NNX softmax policies. Floor 3 (`training`): the optax training loop.
"""

from saferl_jax.opl.objectives import (LoggedBatch, baseline_corrected_objective, corrected_gradient,
                                       filtered_likelihood_objective, gradient_optimal_baseline,
                                       gradient_variance, hard_filter, ips_objective,
                                       logged_log_probs, per_example_weight_gradients, policy_weights,
                                       snips_objective, value_optimal_baseline)
from saferl_jax.opl.policies import LinearPolicy, MLPPolicy, as_functional
from saferl_jax.opl.training import (METHODS, TrainResult, TrainState, logged_batch, method_gradient,
                                     train)

__all__ = [
    "LinearPolicy", "LoggedBatch", "METHODS", "MLPPolicy", "TrainResult", "TrainState",
    "as_functional", "baseline_corrected_objective", "corrected_gradient",
    "filtered_likelihood_objective", "gradient_optimal_baseline", "hard_filter", "gradient_variance", "ips_objective", "logged_batch",
    "logged_log_probs", "method_gradient", "per_example_weight_gradients", "policy_weights",
    "snips_objective", "train", "value_optimal_baseline",
]
