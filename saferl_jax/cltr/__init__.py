"""Counterfactual learning to rank from clicks: click models, estimators and safe objectives.

Click models (`position_based`, `trust_bias`, `adversarial`, `misspecified`) are affine in the
relevance probability R = label / 4; `cascade`, `dcm` and `dbn` are not (users who scan down and
stop), which the affine estimators cannot model; `estimate_bias` fits the affine alpha, beta from
logs by EM; `simulate_sessions` turns logged sessions into clicks in one
jitted call sharded over devices, and `simulate_click_log` keeps a whole log as counts per query.
The estimators correct clicks for position and trust bias (affine IPS, DR with a ridge model)
and the safe objectives ([SAFE]'s exposure penalty, PRPO's clipping) keep a learned ranker close
to the logging policy; `train_ranker` optimises any of them over an NNX ranker with PL-Rank.

Floors: clicks.py, estimators.py, reward_model.py and learning.py are pure maths (1); click logs
(`saferl_jax.data.click_logs`, floor 2) and `train_ranker` (`saferl_jax.training.ranker`, floor 3)
are re-exported here lazily.
"""

from saferl_jax._lazy import lazy_exports
from saferl_jax.cltr.bias_estimation import BiasEstimate, RankCounts, estimate_bias, rank_counts
from saferl_jax.cltr.click_chains import (ChainClickModel, cascade, chain_click_model,
                                          chain_click_probabilities, check_chain_click_model, dbn,
                                          dcm, simulate_chain_clicks)
from saferl_jax.cltr.clicks import (ClickModel, adversarial, check_click_model, click_model,
                                    click_probabilities, misspecified, position_based,
                                    relevance_at_ranks, simulate_clicks, simulate_sessions,
                                    trust_bias)
from saferl_jax.cltr.estimators import (OBJECTIVES, dr_document_rewards, exposure_divergence,
                                        Propensities, ips_document_rewards, logged_objective,
                                        policy_aware_propensities, policy_value, propensity_floor,
                                        prpo_objective, query_rewards, safe_objective)
from saferl_jax.cltr.reward_model import (RidgeModel, counterfactual_cross_entropy,
                                          fit_reward_regression, predict_rewards)
from saferl_jax.cltr.learning import (AscentDirection, RankingData, SupervisedData, ascent_direction,
                                      estimated_objective, relevance_data)

__all__ = [
    # Click models and simulation (clicks.py, click_logs.py).
    "ClickModel", "adversarial", "check_click_model", "click_model", "click_probabilities",
    "misspecified", "position_based", "relevance_at_ranks", "simulate_clicks", "simulate_sessions",
    "trust_bias",
    # Users the affine estimators cannot model: cascade, DCM, DBN (click_chains.py).
    "ChainClickModel", "cascade", "chain_click_model", "chain_click_probabilities",
    "check_chain_click_model", "dbn", "dcm", "simulate_chain_clicks",
    # Estimating the affine bias from logs (bias_estimation.py).
    "BiasEstimate", "RankCounts", "estimate_bias", "rank_counts",
    # Estimators and objectives (estimators.py, reward_model.py).
    "OBJECTIVES", "dr_document_rewards", "exposure_divergence", "ips_document_rewards",
    "logged_objective", "policy_aware_propensities", "policy_value", "propensity_floor",
    "Propensities", "prpo_objective", "query_rewards", "safe_objective",
    "RidgeModel", "counterfactual_cross_entropy", "fit_reward_regression", "predict_rewards",
    # The gradient through a ranker (learning.py).
    "AscentDirection", "RankingData", "SupervisedData", "ascent_direction", "estimated_objective",
    "relevance_data",
]

# Floors 2 and 3: click-log simulation and the training loop, loaded on first use.
_LAZY = {
    "ClickLog": "saferl_jax.data.click_logs",
    "SessionCounts": "saferl_jax.data.click_logs",
    "aggregate_sessions": "saferl_jax.data.click_logs",
    "simulate_click_log": "saferl_jax.data.click_logs",
    "ips_regression_targets": "saferl_jax.data.click_logs",
    "with_click_model": "saferl_jax.data.click_logs",
    "estimated_rewards": "saferl_jax.data.click_logs",
    "train_ranker": "saferl_jax.training.ranker",
    "TrainResult": "saferl_jax.training.driver",
}
__all__ += list(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
