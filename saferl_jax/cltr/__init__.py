"""Counterfactual learning to rank from clicks: click models, estimators and safe objectives.

Click models (`position_based`, `trust_bias`, `adversarial`, `misspecified`) are affine in the
relevance probability R = label / 4; `simulate_sessions` turns logged sessions into clicks in one
jitted call sharded over devices. The estimators correct clicks for position and trust bias
(affine IPS, DR) and the safe objectives ([SAFE]'s exposure penalty, PRPO's clipping) keep a
learned ranker close to the logging policy.
"""

from saferl_jax.cltr.clicks import (ClickModel, adversarial, check_click_model, click_model,
                                    click_probabilities, misspecified, position_based,
                                    relevance_at_ranks, simulate_clicks, simulate_sessions,
                                    trust_bias)
from saferl_jax.cltr.estimators import (dr_document_rewards, exposure_divergence,
                                        ips_document_rewards, policy_aware_propensities,
                                        policy_value, propensity_floor, prpo_objective,
                                        safe_objective)

__all__ = [
    "ClickModel", "adversarial", "check_click_model", "click_model", "click_probabilities",
    "dr_document_rewards", "exposure_divergence", "ips_document_rewards", "misspecified",
    "policy_aware_propensities",
    "policy_value", "position_based", "propensity_floor", "prpo_objective", "relevance_at_ranks",
    "safe_objective", "simulate_clicks", "simulate_sessions", "trust_bias",
]
