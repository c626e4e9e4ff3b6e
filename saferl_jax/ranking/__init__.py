"""Plackett-Luce ranking policies: sampling, log-probabilities, metrics, exposure, PL-Rank
gradients, fairness of exposure and rax's listwise losses (floor 1); the NNX rankers of
`saferl_jax.models` are re-exported lazily.

Functions take one list of D items (logits [D], labels [D], a ranking [K]) with an
optional bool mask `where` for padded items. Every one of them also takes leading batch
axes [..., D] (the PL-Rank estimators give list i of the flattened batch the key
`jax.random.split(key, num_lists)[i]`), and `jax.vmap` batches any of them. Everything
works under `jax.jit`.
"""

from saferl_jax._lazy import lazy_exports
from saferl_jax.ranking.exposure_gradient import ExposureGradient, exposure_objective_gradient
from saferl_jax.ranking.fairness import exposure_disparity
from saferl_jax.ranking.losses import listmle_loss, softmax_loss
from saferl_jax.ranking.metrics import (MetricEstimate, dcg_at_k, dcg_rank_weights, err_at_k,
                                        expected_metric_from_samples, exposure_from_samples,
                                        mrr_at_k, ndcg_at_k, precision_at_k)
from saferl_jax.ranking.pl_rank import (exact_gradient, exact_objective, pl_rank_1_gradient,
                                        pl_rank_gradient, reinforce_gradient)
from saferl_jax.ranking.plackett_luce import PlackettLuce, ranking_log_prob, sample_rankings

__all__ = [
    # Plackett-Luce sampling and log-probabilities (plackett_luce.py).
    "PlackettLuce",
    "ranking_log_prob",
    "sample_rankings",
    # Metrics and exposure (metrics.py).
    "MetricEstimate",
    "dcg_at_k",
    "dcg_rank_weights",
    "err_at_k",
    "expected_metric_from_samples",
    "exposure_from_samples",
    "mrr_at_k",
    "ndcg_at_k",
    "precision_at_k",
    # Listwise losses from rax, in this package's convention (losses.py).
    "listmle_loss",
    "softmax_loss",
    # Fairness of exposure, an objective of exposures (fairness.py).
    "exposure_disparity",
    # Gradients of any objective of exposures: safe and PRPO objectives (exposure_gradient.py).
    "ExposureGradient",
    "exposure_objective_gradient",
    # PL-Rank gradient estimators and exact references (pl_rank.py).
    "exact_gradient",
    "exact_objective",
    "pl_rank_1_gradient",
    "pl_rank_gradient",
    "reinforce_gradient",
]

# Floor 2: NNX rankers, loaded on first use.
_LAZY = {
    "LinearRanker": "saferl_jax.models.rankers",
    "MLPRanker": "saferl_jax.models.rankers",
}
__all__ += list(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
