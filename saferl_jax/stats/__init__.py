"""Statistics shared by every domain: confidence bounds, the bootstrap, safe-improvement tests."""

from saferl_jax.stats.bootstrap import (bootstrap_interval, bootstrap_replicates, percentile_interval,
                                        resample_indices)
from saferl_jax.stats.bounds import (ImprovementTest, Interval, confidence_interval, lower_bound,
                                     safe_improvement_test, upper_bound)

__all__ = [
    "ImprovementTest", "Interval", "bootstrap_interval", "bootstrap_replicates",
    "confidence_interval", "lower_bound", "percentile_interval", "resample_indices",
    "safe_improvement_test", "upper_bound",
]
