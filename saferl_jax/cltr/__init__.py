"""Counterfactual learning to rank from clicks: click models, estimators and safe objectives.

Click models (`position_based`, `trust_bias`, `adversarial`, `misspecified`) are affine in the
relevance probability R = label / 4; `simulate_sessions` turns logged sessions into clicks in one
jitted call sharded over devices, and `simulate_click_log` keeps a whole log as counts per query.
The estimators correct clicks for position and trust bias (affine IPS, DR with a ridge model)
and the safe objectives ([SAFE]'s exposure penalty, PRPO's clipping) keep a learned ranker close
to the logging policy; `train_ranker` optimises any of them over an NNX ranker with PL-Rank.

Floors: clicks.py, estimators.py and reward_model.py are pure maths (1); click_logs.py simulates
logs (2); training.py is the learning loop (3).
"""

from saferl_jax.cltr.click_logs import (ClickLog, aggregate_sessions, estimated_rewards,
                                        simulate_click_log)
from saferl_jax.cltr.clicks import (ClickModel, adversarial, check_click_model, click_model,
                                    click_probabilities, misspecified, position_based,
                                    relevance_at_ranks, simulate_clicks, simulate_sessions,
                                    trust_bias)
from saferl_jax.cltr.estimators import (OBJECTIVES, dr_document_rewards, exposure_divergence,
                                        ips_document_rewards, logged_objective,
                                        policy_aware_propensities, policy_value, propensity_floor,
                                        prpo_objective, query_rewards, safe_objective)
from saferl_jax.cltr.reward_model import RidgeModel, fit_reward_regression, predict_rewards
from saferl_jax.cltr.training import RankingData, relevance_data, train_ranker

__all__ = [
    # Click models and simulation (clicks.py, click_logs.py).
    "ClickModel", "adversarial", "check_click_model", "click_model", "click_probabilities",
    "misspecified", "position_based", "relevance_at_ranks", "simulate_clicks", "simulate_sessions",
    "trust_bias", "ClickLog", "aggregate_sessions", "simulate_click_log",
    # Estimators and objectives (estimators.py, reward_model.py).
    "OBJECTIVES", "dr_document_rewards", "exposure_divergence", "ips_document_rewards",
    "logged_objective", "policy_aware_propensities", "policy_value", "propensity_floor",
    "prpo_objective", "query_rewards", "safe_objective", "estimated_rewards",
    "RidgeModel", "fit_reward_regression", "predict_rewards",
    # Learning (training.py).
    "RankingData", "relevance_data", "train_ranker",
]
