"""Simulators and loaders (floor 2): synthetic contextual bandits, the Open Bandit Dataset (its
folder layout, a context vocabulary two logs share, a split in time), learning-to-rank data (a
synthetic generator, a LETOR/SVMlight loader; split by query with ltr.split), click logs simulated
from a logging ranker (`click_logs`), the 2-D mixture and the 8x8 digits."""

from saferl_jax.data.click_logs import (ClickLog, SessionCounts, aggregate_sessions, estimated_rewards,
                                        simulate_click_log, with_click_model)
from saferl_jax.data.ltr import LTRData, load_letor, make_ltr_dataset
from saferl_jax.data.obd import (OBDLog, OBDSplit, OBDVocabulary, load_obd, sample_path, split_by_time,
                                 take_rounds)
from saferl_jax.data.synthetic_bandit import (BanditLog, BanditProblem, EstimatorInputs, estimator_inputs,
                                              make_problem, policy_value, simulate_log, simulate_logs, softmax_policy)

__all__ = [
    "ClickLog", "SessionCounts", "aggregate_sessions", "estimated_rewards", "simulate_click_log",
    "with_click_model", "BanditLog", "BanditProblem", "EstimatorInputs", "LTRData", "OBDLog", "OBDSplit", "OBDVocabulary",
    "estimator_inputs", "load_letor", "load_obd", "make_ltr_dataset", "make_problem",
    "policy_value", "sample_path", "simulate_log", "simulate_logs", "softmax_policy", "split_by_time",
    "take_rounds",
]
