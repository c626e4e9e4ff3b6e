"""Fairness of exposure: the disparity between items' exposure per unit of merit (floor 1).

[PLR] asks that each item's exposure omega(d|pi) = E_{y~pi}[theta_{rank(d|y)}] be proportional to
its merit rho_d (Singh and Joachims' disparate-exposure ideal, omega(d)/rho_d equal for all d), and
measures the violation over every ordered pair of distinct items of a list:

  D(omega) = 1 / (n (n - 1)) sum_{d != d'} (omega(d) rho_{d'} - omega(d') rho_d)^2,

with n the number of valid items. This is the form the paper's code evaluates and optimises
(HarrieO/2021-SIGIR-plackett-luce, utils/evaluate.py `evaluate_fairness` and fairrun.py, with
merit rho = 2^y - 1): the pairs run over all valid items, items of merit 0 included (an item of
merit 0 is penalised for any exposure it takes from an item of merit), and the products avoid a
division by merit. For two items of positive merit the term is rho_d^2 rho_{d'}^2
(omega(d)/rho_d - omega(d')/rho_{d'})^2, so it is the squared gap of exposure per merit,
weighted by both merits. `form="ratio"` gives the unweighted gap, the mean over ordered pairs of
items with merit > 0 of (omega(d)/rho_d - omega(d')/rho_{d'})^2.

The disparity is a function of exposures alone, so `exposure_objective_gradient` optimises it
(its gradient with respect to the logits is PL-Rank with document weights dD/domega), and a
relevance-fairness trade-off is one more objective of exposures, e.g. omega . rho - lam * D(omega).
D is quadratic in omega, so that gradient estimate is unbiased even though it plugs in an
estimated exposure (dD/domega is linear in omega and the exposure and PL-Rank samples are
independent).

One list per call ([D] exposures and merits; leading batch axes broadcast), vmap to batch.
A list with fewer than two valid items (or, for "ratio", two items of positive merit) has
disparity 0, with a zero gradient.

References:
  [PLR] Oosterhuis. Computationally Efficient Optimization of Plackett-Luce Ranking Models for
  Relevance and Fairness. SIGIR 2021. https://arxiv.org/abs/2105.00855
  Singh, Joachims. Fairness of Exposure in Rankings. KDD 2018. https://arxiv.org/abs/1802.07281
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from saferl_jax import checks


def exposure_disparity(exposure: ArrayLike, merit: ArrayLike, *,
                       where: ArrayLike | None = None,
                       form: Literal["paper", "ratio"] = "paper") -> jax.Array:
  """Disparity of exposure per merit: mean_{d != d'} (omega(d) rho_{d'} - omega(d') rho_d)^2.

  Args:
    exposure: [..., D] the items' exposures omega(d|pi) (e.g. `exposure_from_samples`, or the
      estimate `exposure_objective_gradient` hands its objective).
    merit: [..., D] nonnegative merits rho_d ([PLR] uses the gains 2^y - 1 of the labels).
    where: optional bool [..., D], True for valid items; padded items are in no pair.
    form: "paper" (default): the [PLR] form above, over ordered pairs of distinct valid items.
      "ratio": the mean over ordered pairs of distinct valid items with merit > 0 of
      (omega(d)/rho_d - omega(d')/rho_{d'})^2.

  Returns:
    [...] the disparity of each list, >= 0; 0 for a list with fewer than two items in a pair.

  Example:
    >>> import jax.numpy as jnp
    >>> # Exposure 1 and 0.5 for merits 1 and 1: two ordered pairs, each (1 - 0.5)^2.
    >>> float(exposure_disparity(jnp.array([1., .5]), jnp.array([1., 1.])))
    0.25
    >>> # Proportional exposure has no disparity.
    >>> float(exposure_disparity(jnp.array([1., .5, 0.]), jnp.array([2., 1., 0.])))
    0.0

  References:
    [PLR] Oosterhuis. Computationally Efficient Optimization of Plackett-Luce Ranking Models
    for Relevance and Fairness. SIGIR 2021. https://arxiv.org/abs/2105.00855
  """
  if form not in ("paper", "ratio"):
    raise ValueError(f"form: must be 'paper' or 'ratio', got {form!r}")
  exposure = checks.as_float("exposure", exposure)
  merit = checks.as_float("merit", merit)
  if exposure.ndim < 1:
    raise ValueError(f"exposure: expected an array [..., D], got shape {tuple(exposure.shape)}")
  if merit.shape[-1:] != exposure.shape[-1:]:
    raise ValueError(f"merit: item axis {merit.shape[-1:]} does not match exposure "
                     f"{tuple(exposure.shape)}")
  try:
    shape = jnp.broadcast_shapes(exposure.shape, merit.shape)
  except ValueError:
    raise ValueError(f"merit: shape {tuple(merit.shape)} does not broadcast against exposure "
                     f"{tuple(exposure.shape)}") from None
  if where is None:
    valid = jnp.ones(shape, bool)
  else:
    valid = jnp.asarray(where)
    if valid.dtype != jnp.bool_:
      raise ValueError(f"where: must be a bool mask (True = valid item), got dtype {valid.dtype}")
    try:
      shape = jnp.broadcast_shapes(shape, valid.shape)
    except ValueError:
      raise ValueError(f"where: shape {tuple(valid.shape)} does not broadcast against exposure "
                       f"{tuple(exposure.shape)}") from None
    if valid.shape[-1:] != exposure.shape[-1:]:
      raise ValueError(f"where: item axis {valid.shape[-1:]} does not match exposure "
                       f"{tuple(exposure.shape)}")
  exposure, merit, valid = (jnp.broadcast_to(x, shape) for x in (exposure, merit, valid))
  checks.check_finite("exposure", exposure, where=valid)
  checks.check_nonnegative("merit", merit, where=valid)
  # Padding values enter no arithmetic (double where: no NaN in the value or the gradient).
  exposure = jnp.where(valid, exposure, 0.0)
  merit = jnp.where(valid, merit, 0.0)
  if form == "ratio":
    member = valid & (merit > 0)
    per_merit = jnp.where(member, exposure / jnp.where(member, merit, 1.0), 0.0)
    gap = per_merit[..., :, None] - per_merit[..., None, :]
  else:
    member = valid
    gap = (exposure[..., :, None] * merit[..., None, :]
           - exposure[..., None, :] * merit[..., :, None])
  pair = member[..., :, None] & member[..., None, :]   # the diagonal's gap is 0
  count = jnp.sum(member, axis=-1).astype(exposure.dtype)
  num_pairs = count * (count - 1.0)
  total = jnp.sum(jnp.where(pair, gap ** 2, 0.0), axis=(-2, -1))
  return jnp.where(num_pairs > 0, total / jnp.maximum(num_pairs, 1.0), 0.0)
