"""Simulators and loaders (floor 2): synthetic contextual bandits, the Open Bandit Dataset (its
folder layout, a context vocabulary two logs share, a split in time, a file read in chunks),
learning-to-rank data (a synthetic generator, a LETOR/SVMlight loader with the datasets' folds,
clipping, query-level normalisation and a candidate cap in `letor`; split by query with ltr.split),
click logs simulated from a logging ranker (`click_logs`), the 2-D mixture and the 8x8 digits."""

from saferl_jax.data.click_logs import (ClickLog, SessionCounts, aggregate_sessions, estimated_rewards,
                                        simulate_click_log, with_click_model)
from saferl_jax.data import letor
from saferl_jax.data.letor import load_letor_fold, prepare_letor
from saferl_jax.data.ltr import LetorRows, LTRData, load_letor, make_ltr_dataset, pad_queries, read_letor_rows
from saferl_jax.data.obd import (OBDLog, OBDSplit, OBDVocabulary, iter_obd, load_obd, sample_path,
                                 split_by_time, take_rounds)
from saferl_jax.data.synthetic_bandit import (BanditLog, BanditProblem, EstimatorInputs, estimator_inputs,
                                              make_problem, policy_value, simulate_log, simulate_logs, softmax_policy)

__all__ = [
    "ClickLog", "SessionCounts", "aggregate_sessions", "estimated_rewards", "simulate_click_log",
    "with_click_model", "BanditLog", "BanditProblem", "EstimatorInputs", "LTRData", "OBDLog", "OBDSplit", "OBDVocabulary",
    "estimator_inputs", "iter_obd", "LetorRows", "letor", "load_letor", "load_letor_fold", "pad_queries",
    "prepare_letor", "read_letor_rows", "load_obd", "make_ltr_dataset", "make_problem",
    "policy_value", "sample_path", "simulate_log", "simulate_logs", "softmax_policy", "split_by_time",
    "take_rounds",
]
