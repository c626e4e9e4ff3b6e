"""saferl_jax: safe, sample-efficient off-policy RL in JAX.

    import saferl_jax as sj
    sj.ope.ips(...); sj.ranking.PlackettLuce(...); sj.diffusion.finetune(...)

Three floors, and imports only go down (tests/test_layout.py holds them):

1. Core maths, pure functions of arrays (no Flax, optax, I/O or plotting): `ope`, `stats`,
   `ranking`, `cltr`, `diffusion`, `opl`, `constrained`, `policy_gradient`, `parallel`,
   `distributed`, `checks`, `fast_random`.
2. Models, simulators and data: `models` (every Flax NNX module), `data` (simulators, loaders).
3. Training, experiments and the command line: `training` (the one driver, checkpoints and every
   loop), `experiments`, `cli`.

Each domain package (`ope`, `opl`, `ranking`, `cltr`, `diffusion`) also re-exports, lazily, the
models and loops of its domain from the floors above, so `sj.diffusion.finetune` works without
`saferl_jax.diffusion.sampler` ever loading Flax. Subpackages load on first use.
"""

from saferl_jax._lazy import lazy_exports

__version__ = "0.1.0"

_SUBPACKAGES = ("checks", "cltr", "constrained", "data", "diffusion", "distributed", "experiments",
                "fast_random", "models", "ope", "opl", "parallel", "policy_gradient", "ranking", "stats",
                "training")
__all__ = list(_SUBPACKAGES)
__getattr__, __dir__ = lazy_exports(__name__, {name: f"saferl_jax.{name}" for name in _SUBPACKAGES},
                                    ["__version__", *__all__])
