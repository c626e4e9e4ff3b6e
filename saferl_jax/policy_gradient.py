"""Policy-gradient pieces shared by every domain (floor 1).

The clipped surrogate of PPO is the same function whether the ratio is a diffusion step's
likelihood ratio (DDPO, LOOP) or a document's exposure ratio (PRPO); the leave-one-out
baseline is the same whether the K samples are rankings (REINFORCE for PL policies) or images
(LOOP). Ranking, CLTR and diffusion code import them from here.

References:
  Schulman et al. Proximal Policy Optimization Algorithms. 2017. https://arxiv.org/abs/1707.06347
  [PRPO] Gupta, Oosterhuis, de Rijke. Practical and Robust Safety Guarantees for Advanced
  Counterfactual Learning to Rank. CIKM 2024. https://arxiv.org/abs/2407.19943
  [LOOP] Gupta et al. A Simple and Effective Reinforcement Learning Method for Text-to-Image
  Diffusion Models. 2025. https://arxiv.org/abs/2503.00897
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from saferl_jax import checks


def clipped_surrogate(ratio: ArrayLike, advantage: ArrayLike, *, clip_low: float,
                      clip_high: float) -> jax.Array:
  """min(ratio * A, clip(ratio, clip_low, clip_high) * A), elementwise (to maximise).

  Once the ratio leaves [clip_low, clip_high] in the direction the advantage favours, the
  clipped term is the smaller one and has no gradient, so nothing pushes the ratio further.

  Args:
    ratio: new / old probability (or exposure) ratios, any shape.
    advantage: advantages (or estimated rewards), broadcastable to ratio.
    clip_low: lower end, e.g. 1 - epsilon (a float or a scalar array, traced under jit).
    clip_high: upper end, e.g. 1 + epsilon.

  Returns:
    The surrogate, elementwise.

  Example:
    >>> import jax.numpy as jnp
    >>> clipped_surrogate(jnp.array([0.5, 1.0, 2.0]), 1.0, clip_low=0.8, clip_high=1.2).tolist()
    [0.5, 1.0, 1.2000000476837158]
  """
  if checks.is_concrete(clip_low, clip_high) and not float(clip_low) <= float(clip_high):
    raise ValueError(f"clip_low/clip_high: need clip_low <= clip_high, got {clip_low}, {clip_high}")
  ratio, advantage = jnp.asarray(ratio), jnp.asarray(advantage)
  return jnp.minimum(ratio * advantage, jnp.clip(ratio, clip_low, clip_high) * advantage)


def leave_one_out_baseline(values: ArrayLike, axis: int = 0) -> jax.Array:
  """b_i = (sum_j values_j - values_i) / (K - 1): the mean of the other K - 1 samples.

  Independent of sample i, so values_i - b_i keeps the score-function estimator unbiased.

  Example:
    >>> import jax.numpy as jnp
    >>> leave_one_out_baseline(jnp.array([1., 2., 3.])).tolist()
    [2.5, 2.0, 1.5]
  """
  values = jnp.asarray(values)
  count = values.shape[axis]
  if count < 2:
    raise ValueError(f"values: a leave-one-out baseline needs at least 2 samples along axis {axis}, "
                     f"got {count}")
  return (jnp.sum(values, axis=axis, keepdims=True) - values) / (count - 1)


def hard_filter(rewards: ArrayLike, *, quantile: float, where: ArrayLike | None = None) -> jax.Array:
  """[DRPO] The samples worth learning from: reward >= the `quantile`-th quantile, as a bool mask.

  Optimistic distributionally robust policy optimisation reduces to this hard filtering: from
  logs mixing good and bad behaviour, learn only from the samples above the threshold (with a
  plain likelihood-style update) and discard the rest, whose negative-advantage updates can blow
  the policy up off-policy. Bandit rounds (`opl`) and ranked documents (`cltr`) both use it.

  Args:
    rewards: (estimated) rewards, any shape.
    quantile: the fraction to discard, in [0, 1).
    where: optional bool mask of the samples that count (the quantile is over these only;
      the others are never kept).

  Reference:
    [DRPO] Jiang et al. Optimistic Distributionally Robust Policy Optimization for Off-Policy
    Generative Recommendation. https://arxiv.org/abs/2602.10430

  Example:
    >>> import jax.numpy as jnp
    >>> hard_filter(jnp.array([3., 1., 2., 9.]), quantile=0.5, where=jnp.array([1, 1, 1, 0], bool)).tolist()
    [True, False, True, False]
  """
  if not 0 <= quantile < 1:
    raise ValueError(f"quantile: must be in [0, 1), got {quantile}")
  rewards = jnp.asarray(rewards)
  if where is None:
    return rewards >= jnp.quantile(rewards, quantile)
  where = jnp.asarray(where, bool)
  threshold = jnp.nanquantile(jnp.where(where, rewards, jnp.nan), quantile)
  return where & (rewards >= threshold)
