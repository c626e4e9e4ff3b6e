"""Simulators and loaders (floor 2): synthetic contextual bandits and the Open Bandit Dataset."""

from saferl_jax.data.obd import OBDLog, load_obd, sample_path
from saferl_jax.data.synthetic_bandit import (BanditLog, BanditProblem, estimator_inputs, make_problem,
                                              policy_value, simulate_log, simulate_logs, softmax_policy)

__all__ = [
    "BanditLog", "BanditProblem", "OBDLog", "estimator_inputs", "load_obd", "make_problem",
    "policy_value", "sample_path", "simulate_log", "simulate_logs", "softmax_policy",
]
