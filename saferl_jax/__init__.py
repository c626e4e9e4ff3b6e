"""saferl_jax: safe, sample-efficient off-policy RL in JAX.

Floors (imports only go down):
  1. core maths, pure functions of arrays: `checks`, `stats`, `ope`, `parallel`.
  2. models, simulators and data: `data`.
  3. experiments and the command line: `experiments`, `cli`.
"""

__version__ = "0.1.0"
