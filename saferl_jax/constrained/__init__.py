"""Constrained alignment: dual updates, Lagrangian rewards and the closed-form tilted optimum.

Floor 1 (pure functions of arrays): `duals` (the multipliers' optax-style updates: projected dual
descent, nu-PI, projected descent on the simplex for composition; the Lagrangian reward) and
`tilt` (the KL-regularised Lagrangian's maximiser for a finite action set, its dual function and
the dual's minimiser). Built on them, and re-exported here (floor 1 eagerly, floors 2 and 3 lazily):

- constrained diffusion fine-tuning: `finetune(constraints=Constraints(...))`
  (`saferl_jax.training.finetuning`);
- AND-composition of diffusion models: the weighted score and path KLs
  (`saferl_jax.diffusion.composition`), the training-free `compose` and the primal-dual
  `compose_train` (`saferl_jax.training.composition`), the exact 2-D answer on a grid
  (`saferl_jax.data.composition2d`);
- constrained off-policy learning for bandits: `constrained_objective` (`saferl_jax.opl.constrained`,
  a lower confidence bound on the secondary values) and `train_constrained`
  (`saferl_jax.training.constrained_opl`).
"""

from saferl_jax._lazy import lazy_exports
from saferl_jax.constrained.duals import (DualOptimizer, DualState, dual_descent, lagrangian_reward,
                                          nu_pi, project_simplex, simplex_descent)
from saferl_jax.constrained.tilt import DualValue, minimize_dual, tilt_dual, tilted_log_policy
from saferl_jax.diffusion.composition import path_kl, path_kls, weighted_apply
from saferl_jax.opl.constrained import ConstrainedBatch, ConstrainedObjective, constrained_objective

__all__ = [
    "DualOptimizer", "DualState", "dual_descent", "lagrangian_reward", "nu_pi", "project_simplex",
    "simplex_descent", "DualValue", "minimize_dual", "tilt_dual", "tilted_log_policy",
    "path_kl", "path_kls", "weighted_apply", "ConstrainedBatch", "ConstrainedObjective",
    "constrained_objective",
]

# Floors 2 and 3: the loops and the exact 2-D composition, loaded on first use.
_LAZY = {
    "Constraints": "saferl_jax.training.finetuning",
    "finetune": "saferl_jax.training.finetuning",
    "compose": "saferl_jax.training.composition",
    "compose_train": "saferl_jax.training.composition",
    "CompositionSampling": "saferl_jax.training.composition",
    "train_constrained": "saferl_jax.training.constrained_opl",
}
__all__ += list(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
