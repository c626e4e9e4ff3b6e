"""Off-policy evaluation for contextual bandits: estimators, the optimal baseline, diagnostics, intervals.

Functions take one logged dataset: rewards [n], actions [n], logging_probs [n],
target_dist [n, A] and, for the model-based estimators, reward_hat [n, A]; with
`positions` [n] (a log that shows L slots) target_dist and reward_hat are [n, A, L].
Batch datasets with `jax.vmap`; every function works under `jax.jit`. `tune` picks
clip/tau/lambda_ from a grid, `evaluate` runs many estimators on one log;
`estimate_streaming` (and `stream_estimators`' init/update/finalize) estimate a log delivered
in chunks or sharded over devices. The
cross-fitted reward and propensity models (floor 2, optax) are re-exported lazily.
"""

from saferl_jax._lazy import lazy_exports

from saferl_jax.ope.baseline import cross_fitted_baselines, optimal_baseline
from saferl_jax.ope.confidence import estimator_bootstrap_interval, improves_on_logging
from saferl_jax.ope.estimators import (FROM_ROUNDS, BetaIPSBias, Estimate, beta_ips,
                                       beta_ips_bias, beta_ips_bias_from_rounds,
                                       beta_ips_from_rounds, dm, dm_from_rounds, dr,
                                       dr_from_rounds, dr_os, dr_os_from_rounds, estimate_all, ips,
                                       ips_from_rounds, sg_dr, sg_dr_from_rounds, sg_ips,
                                       sg_ips_from_rounds, snips, snips_from_rounds, sndr,
                                       sndr_from_rounds, switch_dr, switch_dr_from_rounds)
from saferl_jax.ope.report import Report, Scores, evaluate, evaluate_from_rounds, score_estimators
from saferl_jax.ope.tuning import (TUNABLE, SlopeSelection, Tunable, Tuned, estimated_mse,
                                   slope_selection, tune, tune_from_rounds)
from saferl_jax.ope.streaming import (StreamedEstimates, StreamingEstimator, StreamState,
                                      estimate_streaming, stream_estimators)
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
__all__ += ["Report", "Scores", "SlopeSelection", "TUNABLE", "Tunable", "Tuned", "estimated_mse",
            "evaluate", "evaluate_from_rounds", "score_estimators", "slope_selection", "tune",
            "tune_from_rounds"]
__all__ += ["StreamState", "StreamedEstimates", "StreamingEstimator", "estimate_streaming",
            "stream_estimators"]

# Floor 2: cross-fitted reward and propensity models, loaded on first use.
_LAZY = {
    "PropensityFit": "saferl_jax.models.reward_models",
    "RewardModelFit": "saferl_jax.models.reward_models",
    "cross_fit_propensities": "saferl_jax.models.reward_models",
    "cross_fit_reward_model": "saferl_jax.models.reward_models",
    "fitting_weights": "saferl_jax.models.reward_models",
}
__all__ += list(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
