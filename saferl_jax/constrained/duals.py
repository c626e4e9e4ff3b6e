"""Dual updates for constrained alignment: multipliers lambda >= 0, or weights on the simplex (floor 1).

The problem (SPEC section 6): maximise E_p[r_0] - beta KL(p || p_ref) subject to E_p[r_i] >= b_i,
i = 1..m. Its Lagrangian is L(p, lambda) = E_p[r_0 + sum_i lambda_i (r_i - b_i)] - beta KL(p || p_ref)
with lambda >= 0, and primal-dual training alternates a policy step on the Lagrangian reward
(`lagrangian_reward`) with a dual step on lambda from the same on-policy samples. Every dual
update here reads the constraints' slacks, s_i = rbar_i - b_i (>= 0: met), and moves the
multipliers against them (a violated constraint, s_i < 0, gains weight):

  dual_descent     lambda <- max(0, lambda - eta s)          projected descent on the dual g
  nu_pi            e = -s;  xi' = nu xi + (1 - nu) e;
                   lambda <- max(0, lambda + k_I e + k_P (xi' - xi))   (nu-PI controller)
  simplex_descent  mu <- Proj_simplex(mu - eta s)            weights on the probability simplex

For AND-composition (min_p max_i KL(p || q_i)) the weights mu live on the simplex and the slacks
are s_i = -KLhat_i: mu <- Proj(mu + eta KLhat) moves weight to the model the sample is furthest
from (a constant added to every s_i leaves the projection unchanged, so the epigraph variable of
the max never enters).

Each constructor returns a `DualOptimizer`, an optax-style pair of pure functions
init(multipliers [m]) -> DualState and update(state, slacks [m]) -> DualState, jittable and
vmappable over seeds.

References:
  Khalafi, Hounie, Ding, Ribeiro. Constrained Diffusion Models via Dual Training / composition by
  primal-dual training. NeurIPS 2025. https://arxiv.org/abs/2508.19104
  Zhang et al. Alignment of language models under constraints via dual optimisation (closed-form
  tilt of the reference policy). NeurIPS 2025. https://arxiv.org/abs/2505.19387
  Sohrabi, Ramirez, Zhang, Lacoste-Julien, Gallego. On PI Controllers for Updating Lagrange
  Multipliers in Constrained Optimization (nu-PI). ICML 2024. https://arxiv.org/abs/2406.04558
  Duchi, Shalev-Shwartz, Singer, Chandra. Efficient Projections onto the l1-Ball for Learning in
  High Dimensions. ICML 2008 (the simplex projection).
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from saferl_jax import checks


class DualState(NamedTuple):
  """The dual variables and a controller's memory.

  Attributes:
    multipliers: [m] lambda >= 0 (or mu on the simplex for `simplex_descent`).
    error_average: [m] nu-PI's smoothed error xi (zeros for the other updates).
  """
  multipliers: jax.Array
  error_average: jax.Array


class DualOptimizer(NamedTuple):
  """An optax-style pair of pure functions over the dual variables.

  Attributes:
    init: init(multipliers [m]) -> `DualState`, the starting multipliers checked (>= 0, or on
      the simplex for `simplex_descent`).
    update: update(state, slacks [m]) -> `DualState`, slacks s_i = rbar_i - b_i.
  """
  init: Callable[[ArrayLike], DualState]
  update: Callable[[DualState, ArrayLike], DualState]


def _as_vector(name: str, x: ArrayLike) -> jax.Array:
  x = checks.as_float(name, x)
  if x.ndim != 1 or x.shape[0] == 0:
    raise ValueError(f"{name}: expected a 1-d array [m] with m >= 1, got shape {tuple(x.shape)}")
  return x


def _init(multipliers: ArrayLike, *, on_simplex: bool) -> DualState:
  multipliers = _as_vector("multipliers", multipliers)
  checks.check_finite("multipliers", multipliers)
  if checks.is_concrete(multipliers):
    if bool(jnp.any(multipliers < 0)):
      raise ValueError(f"multipliers: must be >= 0, got {multipliers.tolist()}")
    if on_simplex and abs(float(jnp.sum(multipliers)) - 1.0) > 1e-5:
      raise ValueError(f"multipliers: weights on the simplex must sum to 1, got sum "
                       f"{float(jnp.sum(multipliers)):.6g}")
  return DualState(multipliers, jnp.zeros_like(multipliers))


def _check_update(state: DualState, slacks: ArrayLike) -> jax.Array:
  if not isinstance(state, DualState):
    raise TypeError(f"state: must be a DualState (from init), got {type(state).__name__}")
  slacks = checks.as_float("slacks", slacks)
  if slacks.shape != state.multipliers.shape[-1:]:
    raise ValueError(f"slacks: expected shape {tuple(state.multipliers.shape[-1:])} (one per "
                     f"multiplier), got {tuple(slacks.shape)}")
  return slacks


def dual_descent(learning_rate: float) -> DualOptimizer:
  """Projected dual descent: lambda <- max(0, lambda - eta (rbar - b)).

  The dual function g(lambda) of the Lagrangian is convex with gradient E_{p_lambda}[r] - b, so
  this is projected gradient descent on g with the batch means as the gradient's estimate.

  Args:
    learning_rate: eta > 0 (in the units of 1 / reward; standardised rewards make 0.1 to 1 a
      sensible range).

  Returns:
    A `DualOptimizer`.

  Example:
    >>> dual = dual_descent(0.5)
    >>> state = dual.init(jnp.array([0.0, 1.0]))
    >>> # constraint 0 violated by 0.4 (its multiplier grows), constraint 1 met by 4 (clipped at 0)
    >>> [round(v, 4) for v in dual.update(state, jnp.array([-0.4, 4.0])).multipliers.tolist()]
    [0.2, 0.0]

  References:
    Khalafi, Hounie, Ding, Ribeiro. NeurIPS 2025. https://arxiv.org/abs/2508.19104
  """
  checks.check_real("learning_rate", learning_rate, low=0.0, open_low=True)
  return _dual_descent(float(learning_rate))


@functools.lru_cache(maxsize=64)  # one object per configuration: compiled loops are reused
def _dual_descent(learning_rate: float) -> DualOptimizer:
  def update(state: DualState, slacks: ArrayLike) -> DualState:
    slacks = _check_update(state, slacks)
    return DualState(jnp.maximum(state.multipliers - learning_rate * slacks, 0.0),
                     state.error_average)
  return DualOptimizer(functools.partial(_init, on_simplex=False), update)


def nu_pi(*, integral_gain: float, proportional_gain: float, nu: float) -> DualOptimizer:
  """The nu-PI controller on the constraint error e = b - rbar (= -slack).

    xi'     = nu xi + (1 - nu) e
    lambda' = max(0, lambda + k_I e + k_P (xi' - xi))

  With k_P = 0 it is `dual_descent` with eta = k_I; the proportional term damps the oscillation
  of the multipliers that pure integral (gradient) control shows when the constraint's response
  lags the multiplier.

  Args:
    integral_gain: k_I > 0.
    proportional_gain: k_P >= 0.
    nu: the smoothing of the error in [0, 1) (0: xi is the last error).

  Returns:
    A `DualOptimizer`.

  Example:
    >>> dual = nu_pi(integral_gain=0.5, proportional_gain=1.0, nu=0.5)
    >>> state = dual.update(dual.init(jnp.array([0.0])), jnp.array([-0.4]))  # e = 0.4
    >>> # xi: 0 -> 0.2; lambda: 0 + 0.5 * 0.4 + 1.0 * 0.2
    >>> [round(v, 6) for v in state.multipliers.tolist()], [round(v, 6) for v in state.error_average.tolist()]
    ([0.4], [0.2])

  References:
    Sohrabi et al. On PI Controllers for Updating Lagrange Multipliers in Constrained
    Optimization. ICML 2024. https://arxiv.org/abs/2406.04558
  """
  checks.check_real("integral_gain", integral_gain, low=0.0, open_low=True)
  checks.check_real("proportional_gain", proportional_gain, low=0.0)
  checks.check_real("nu", nu, low=0.0, high=1.0, open_high=True)
  return _nu_pi(float(integral_gain), float(proportional_gain), float(nu))


@functools.lru_cache(maxsize=64)
def _nu_pi(integral_gain: float, proportional_gain: float, nu: float) -> DualOptimizer:
  def update(state: DualState, slacks: ArrayLike) -> DualState:
    error = -_check_update(state, slacks)
    error_average = nu * state.error_average + (1.0 - nu) * error
    multipliers = (state.multipliers + integral_gain * error
                   + proportional_gain * (error_average - state.error_average))
    return DualState(jnp.maximum(multipliers, 0.0), error_average)
  return DualOptimizer(functools.partial(_init, on_simplex=False), update)


def project_simplex(values: ArrayLike) -> jax.Array:
  """The Euclidean projection onto the probability simplex: argmin_{mu >= 0, sum mu = 1} ||mu - v||.

  mu_i = max(v_i - tau, 0) with tau chosen so that the mu sum to 1 (sort-based, exact).

  Args:
    values: [..., m] points; leading axes broadcast (each row is projected).

  Returns:
    [..., m] the projections.

  Example:
    >>> project_simplex(jnp.array([0.5, 1.5, -1.0])).tolist()
    [0.0, 1.0, 0.0]
    >>> [round(v, 4) for v in project_simplex(jnp.array([0.2, 0.3, 0.1])).tolist()]
    [0.3333, 0.4333, 0.2333]

  References:
    Duchi, Shalev-Shwartz, Singer, Chandra. ICML 2008.
  """
  values = checks.as_float("values", values)
  if values.ndim == 0 or values.shape[-1] == 0:
    raise ValueError(f"values: expected [..., m] with m >= 1, got shape {tuple(values.shape)}")
  return _project_simplex(values)


def _project_simplex(values: jax.Array) -> jax.Array:
  sorted_values = -jnp.sort(-values, axis=-1)  # descending
  cumulative = jnp.cumsum(sorted_values, axis=-1) - 1.0
  ranks = jnp.arange(1, values.shape[-1] + 1, dtype=values.dtype)
  # The last rank k whose sorted value stays above its threshold (cumsum_k - 1) / k.
  active = sorted_values - cumulative / ranks > 0
  count = jnp.sum(active, axis=-1, keepdims=True)
  tau = jnp.take_along_axis(cumulative, count - 1, axis=-1) / count.astype(values.dtype)
  return jnp.maximum(values - tau, 0.0)


def simplex_descent(learning_rate: float) -> DualOptimizer:
  """Projected descent on the simplex: mu <- Proj_simplex(mu - eta s); AND-composition's weights.

  With slacks s_i = -KLhat(p_mu || q_i) it is the dual ascent of SPEC section 6's composition,
  mu <- Proj(mu + eta KLhat): weight moves to the models the composed samples are furthest from.

  Args:
    learning_rate: eta > 0.

  Returns:
    A `DualOptimizer` whose init wants weights on the simplex.

  Example:
    >>> dual = simplex_descent(0.1)
    >>> state = dual.init(jnp.array([0.5, 0.5]))
    >>> [round(v, 4) for v in dual.update(state, -jnp.array([2.0, 1.0])).multipliers.tolist()]  # KLs 2 and 1
    [0.55, 0.45]

  References:
    Khalafi, Hounie, Ding, Ribeiro. NeurIPS 2025. https://arxiv.org/abs/2508.19104
  """
  checks.check_real("learning_rate", learning_rate, low=0.0, open_low=True)
  return _simplex_descent(float(learning_rate))


@functools.lru_cache(maxsize=64)
def _simplex_descent(learning_rate: float) -> DualOptimizer:
  def update(state: DualState, slacks: ArrayLike) -> DualState:
    slacks = _check_update(state, slacks)
    return DualState(_project_simplex(state.multipliers - learning_rate * slacks),
                     state.error_average)
  return DualOptimizer(functools.partial(_init, on_simplex=True), update)


def lagrangian_reward(primary: ArrayLike, constraints: ArrayLike, multipliers: ArrayLike, *,
                      thresholds: ArrayLike) -> jax.Array:
  """The Lagrangian reward r_0 + sum_i lambda_i (r_i - b_i) of each sample.

  Args:
    primary: [...] r_0 per sample (zeros for "stay close to the reference while meeting the
      constraints").
    constraints: [..., m] r_i per sample.
    multipliers: [m] lambda >= 0.
    thresholds: [m] b.

  Returns:
    [...] the Lagrangian reward per sample.

  Example:
    >>> lagrangian_reward(jnp.array([1.0, 2.0]), jnp.array([[0.5], [1.5]]), jnp.array([2.0]),
    ...                   thresholds=jnp.array([1.0])).tolist()
    [0.0, 3.0]
  """
  primary = checks.as_float("primary", primary)
  constraints = checks.as_float("constraints", constraints)
  multipliers = _as_vector("multipliers", multipliers)
  thresholds = _as_vector("thresholds", thresholds)
  m = multipliers.shape[0]
  if thresholds.shape != (m,) or constraints.shape != (*primary.shape, m):
    raise ValueError(f"constraints/thresholds: expected constraints of shape {(*primary.shape, m)} "
                     f"and thresholds ({m},) for primary {tuple(primary.shape)} and {m} "
                     f"multipliers, got {tuple(constraints.shape)} and {tuple(thresholds.shape)}")
  return primary + (constraints - thresholds) @ multipliers
