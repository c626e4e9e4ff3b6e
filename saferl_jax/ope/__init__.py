"""Off-policy evaluation for contextual bandits: estimators, the optimal baseline, diagnostics, intervals.

Functions take one logged dataset: rewards [n], actions [n], logging_probs [n],
target_dist [n, A] and, for the model-based estimators, reward_hat [n, A].
Batch datasets with `jax.vmap`; every function works under `jax.jit`.
"""

from saferl_jax.ope.baseline import cross_fitted_baselines, optimal_baseline
from saferl_jax.ope.confidence import estimator_bootstrap_interval, improves_on_logging
from saferl_jax.ope.estimators import (FROM_ROUNDS, BetaIPSBias, Estimate, beta_ips,
                                       beta_ips_bias, beta_ips_bias_from_rounds,
                                       beta_ips_from_rounds, dm, dm_from_rounds, dr,
                                       dr_from_rounds, dr_os, dr_os_from_rounds, estimate_all, ips,
                                       ips_from_rounds, sg_dr, sg_dr_from_rounds, sg_ips,
                                       sg_ips_from_rounds, snips, snips_from_rounds, sndr,
                                       sndr_from_rounds, switch_dr, switch_dr_from_rounds)
from saferl_jax.ope.rounds import (LoggedRounds, WeightDiagnostics, importance_weights,
                                   logged_rounds, weight_diagnostics)

__all__ = [
    "BetaIPSBias", "Estimate", "FROM_ROUNDS", "LoggedRounds", "WeightDiagnostics", "beta_ips",
    "beta_ips_bias", "beta_ips_bias_from_rounds", "beta_ips_from_rounds",
    "cross_fitted_baselines", "dm", "dm_from_rounds", "dr",
    "dr_from_rounds", "dr_os", "dr_os_from_rounds", "estimate_all",
    "estimator_bootstrap_interval", "importance_weights", "improves_on_logging", "ips",
    "ips_from_rounds", "logged_rounds", "optimal_baseline", "sg_dr", "sg_dr_from_rounds", "sg_ips",
    "sg_ips_from_rounds", "snips", "snips_from_rounds", "sndr",
    "sndr_from_rounds", "switch_dr", "switch_dr_from_rounds", "weight_diagnostics",
]
