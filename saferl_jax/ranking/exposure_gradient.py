"""Gradients of any objective of exposures with respect to a Plackett-Luce policy's logits (floor 1).

Safe LTR objectives are functions F(omega) of the exposures omega(d|pi) = E_{y~pi}[theta_{rank(d|y)}]:
the plain estimate sum_d omega(d) Rhat(d), [SAFE]'s Uhat - lam sqrt(d2(omega) / N), PRPO's clipped
surrogate of omega / omega0. By the chain rule,

  dF/dm = sum_d (dF/domega(d)) domega(d)/dm,

and PL-Rank estimates d/dm sum_d omega(d) rho_d for fixed document weights rho. So the gradient
is PL-Rank with rho = dF/domega evaluated at the current exposures, which are estimated from
samples (jax.grad of F gives the weights). For a linear F this is exactly PL-Rank; for a
nonlinear F the exposure estimate's noise adds an O(1/num_exposure_samples) bias.

References:
  [SAFE] Gupta, Oosterhuis, de Rijke. Safe Deployment for Counterfactual Learning to Rank with
  Exposure-Based Risk Minimization. SIGIR 2023. https://arxiv.org/abs/2305.01522
  [PLR] Oosterhuis. Learning-to-Rank at the Speed of Sampling. SIGIR 2022. https://arxiv.org/abs/2204.10872
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.ranking.metrics import exposure_from_samples
from saferl_jax.ranking.pl_rank import pl_rank_gradient
from saferl_jax.ranking.plackett_luce import sample_rankings


class ExposureGradient(NamedTuple):
  """dF/dm [..., D] and the exposure estimate [..., D] it was taken at."""
  gradient: jax.Array
  exposure: jax.Array


def exposure_objective_gradient(
    logits: ArrayLike,
    objective: Callable[[jax.Array], jax.Array],
    rank_weights: ArrayLike,
    *,
    key: jax.Array,
    num_samples: int,
    num_exposure_samples: int | None = None,
    where: ArrayLike | None = None,
) -> ExposureGradient:
  """(dF/dm [..., D], the estimated exposures [..., D]) for an objective F of the exposures.

  F may couple lists (the [SAFE] penalty is a square root of a mean over queries), so it takes
  every list's exposure at once; PL-Rank then runs on each list with its own document weights
  dF/domega and independent samples.

  Args:
    logits: [..., D] the policy's logits m, one row per list.
    objective: F(exposure [..., D]) -> scalar, differentiable (e.g. a safe or PRPO objective).
    rank_weights: [K] theta, the weights of the first K ranks defining the exposure.
    key: PRNG key.
    num_samples: rankings per list for the PL-Rank estimate.
    num_exposure_samples: rankings per list for the exposure estimate (default num_samples);
      more reduces the bias for a nonlinear F.
    where: optional [..., D] bool mask of real documents.

  Returns:
    An `ExposureGradient`: the gradient estimate and the exposure estimate it used.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> relevance = jnp.array([1., 0., 0.])
    >>> grad, exposure = exposure_objective_gradient(
    ...     jnp.zeros(3), lambda e: e @ relevance, jnp.ones(1), key=jax.random.key(0), num_samples=100)
    >>> bool(grad[0] > 0)
    True
  """
  checks.check_key("key", key)
  checks.check_count("num_samples", num_samples)
  if num_exposure_samples is None:
    num_exposure_samples = num_samples
  checks.check_count("num_exposure_samples", num_exposure_samples)
  if not callable(objective):
    raise TypeError(f"objective: must be a callable F(exposure) -> scalar, got "
                    f"{type(objective).__name__}")
  logits = jnp.asarray(logits)
  rank_weights = jnp.asarray(rank_weights)
  exposure_key, gradient_key = jax.random.split(key)
  num_items = logits.shape[-1]
  k = min(rank_weights.shape[0], num_items)
  rankings = sample_rankings(logits, key=exposure_key, where=where, k=k,
                             sample_shape=num_exposure_samples)
  exposure = exposure_from_samples(rankings, rank_weights[:k], num_items, where=where)
  document_weights = jax.grad(objective)(exposure)
  valid = jnp.ones(logits.shape, bool) if where is None else jnp.broadcast_to(where, logits.shape)
  document_weights = jnp.where(valid, document_weights, 0.0)
  if checks.is_concrete(document_weights) and not bool(jnp.all(jnp.isfinite(document_weights))):
    # PL-Rank would name its own `relevance`, which the caller never passed.
    raise ValueError("objective: its gradient at the estimated exposure contains NaN or infinite "
                     "values (more num_exposure_samples may keep a square root away from 0)")
  batch_shape = logits.shape[:-1]
  num_lists = int(np.prod(batch_shape, dtype=int))
  keys = jax.random.split(gradient_key, num_lists)
  gradient = jax.vmap(lambda m, rho, w, kk: pl_rank_gradient(
      m, rho, rank_weights[:k], key=kk, num_samples=num_samples, where=w))(
          logits.reshape(num_lists, num_items), document_weights.reshape(num_lists, num_items),
          valid.reshape(num_lists, num_items), keys)
  return ExposureGradient(gradient.reshape(logits.shape), exposure)
