"""Constrained alignment: dual updates, Lagrangian rewards and the closed-form tilted optimum.

Floor 1 (pure functions of arrays): `duals` (the multipliers' optax-style updates: projected dual
descent, nu-PI, projected descent on the simplex for composition; the Lagrangian reward) and
`tilt` (the KL-regularised Lagrangian's maximiser for a finite action set, its dual function and
the dual's minimiser). The constrained fine-tuning loop is `saferl_jax.training.finetuning.finetune`
with `constraints=` (re-exported lazily here).
"""

from saferl_jax._lazy import lazy_exports
from saferl_jax.constrained.duals import (DualOptimizer, DualState, dual_descent, lagrangian_reward,
                                          nu_pi, project_simplex, simplex_descent)
from saferl_jax.constrained.tilt import DualValue, minimize_dual, tilt_dual, tilted_log_policy

__all__ = [
    "DualOptimizer", "DualState", "dual_descent", "lagrangian_reward", "nu_pi", "project_simplex",
    "simplex_descent", "DualValue", "minimize_dual", "tilt_dual", "tilted_log_policy",
]

# Floor 3: the constrained fine-tuning loop, loaded on first use.
_LAZY = {
    "Constraints": "saferl_jax.training.finetuning",
    "finetune": "saferl_jax.training.finetuning",
}
__all__ += list(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
