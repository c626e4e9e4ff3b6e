"""The closed-form maximiser of a KL-regularised Lagrangian, its dual, and the dual's minimiser (floor 1).

For a fixed lambda >= 0 the maximiser of E_p[r_0 + lambda . (r - b)] - beta KL(p || p_ref) is the
tilt p_lambda ∝ p_ref exp((r_0 + lambda . r) / beta); for a finite action set with context x,

  pi_lambda(a|x) = softmax_a(log pi_ref(a|x) + (q_0 + lambda . q)(x, a) / beta),

and the dual function, averaged over the contexts, is

  g(lambda) = beta mean_x log sum_a pi_ref(a|x) exp((q_0 + lambda . q)(x, a) / beta) - lambda . b,

convex, with gradient mean_x E_{pi_lambda}[q] - b (`tilt_dual`). The constrained optimum is
pi_lambda* with lambda* = argmin_{lambda >= 0} g (`minimize_dual`, projected Newton steps;
it takes any dual of this form, e.g. the 2-D mixture's closed form in
`saferl_jax.data.mixture2d`).

References:
  Zhang et al. NeurIPS 2025. https://arxiv.org/abs/2505.19387 (the closed-form tilt and its dual).
  Khalafi, Hounie, Ding, Ribeiro. NeurIPS 2025. https://arxiv.org/abs/2508.19104
  Bertsekas. Projected Newton methods for optimization problems with simple constraints. 1982.
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from saferl_jax import checks


class DualValue(NamedTuple):
  """The dual function and its gradient at one lambda.

  Attributes:
    value: scalar g(lambda).
    gradient: [m] dg / dlambda = E_{p_lambda}[r] - b (the constraints' slacks under p_lambda).
  """
  value: jax.Array
  gradient: jax.Array


def _check_tilt_inputs(reference_log_probs, primary, constraints, multipliers, kl_weight):
  reference_log_probs = checks.as_float("reference_log_probs", reference_log_probs)
  primary = checks.as_float("primary", primary)
  constraints = checks.as_float("constraints", constraints)
  multipliers = checks.as_float("multipliers", multipliers)
  checks.check_real("kl_weight", kl_weight, low=0.0, open_low=True)
  if reference_log_probs.ndim == 0:
    raise ValueError("reference_log_probs: expected [..., A], got a scalar")
  if primary.shape != reference_log_probs.shape:
    raise ValueError(f"primary: expected the shape of reference_log_probs "
                     f"{tuple(reference_log_probs.shape)}, got {tuple(primary.shape)}")
  if multipliers.ndim != 1:
    raise ValueError(f"multipliers: expected [m], got shape {tuple(multipliers.shape)}")
  if constraints.shape != (*primary.shape, multipliers.shape[0]):
    raise ValueError(f"constraints: expected shape {(*primary.shape, multipliers.shape[0])} "
                     f"([..., A, m]), got {tuple(constraints.shape)}")
  return reference_log_probs, primary, constraints, multipliers


def _tilted_logits(reference_log_probs, primary, constraints, multipliers, kl_weight):
  return reference_log_probs + (primary + constraints @ multipliers) / kl_weight


def tilted_log_policy(reference_log_probs: ArrayLike, primary: ArrayLike, constraints: ArrayLike,
                      multipliers: ArrayLike, *, kl_weight: float) -> jax.Array:
  """log pi_lambda(a|x) = log softmax_a(log pi_ref(a|x) + (q_0 + lambda . q)(x, a) / beta).

  Args:
    reference_log_probs: [..., A] log pi_ref(a|x); any leading axes (contexts), the same for
      primary and constraints.
    primary: [..., A] q_0(x, a).
    constraints: [..., A, m] q_i(x, a).
    multipliers: [m] lambda >= 0.
    kl_weight: beta > 0.

  Returns:
    [..., A] the tilted policy's log-probabilities.

  Example:
    >>> log_pi = tilted_log_policy(jnp.log(jnp.array([0.5, 0.5])), jnp.array([0.0, 0.0]),
    ...                            jnp.array([[0.0], [1.0]]), jnp.array([1.0]), kl_weight=1.0)
    >>> [round(v, 4) for v in jnp.exp(log_pi).tolist()]  # [1, e] / (1 + e)
    [0.2689, 0.7311]
  """
  inputs = _check_tilt_inputs(reference_log_probs, primary, constraints, multipliers, kl_weight)
  return jax.nn.log_softmax(_tilted_logits(*inputs, kl_weight), axis=-1)


def tilt_dual(reference_log_probs: ArrayLike, primary: ArrayLike, constraints: ArrayLike,
              multipliers: ArrayLike, *, thresholds: ArrayLike, kl_weight: float) -> DualValue:
  """The dual g(lambda) = beta mean_x logsumexp_a(log pi_ref + (q_0 + lambda . q) / beta) - lambda . b.

  The mean is over every leading axis of the inputs (contexts drawn uniformly, as from a
  pool); the gradient is mean_x E_{pi_lambda}[q] - b, in closed form.

  Args:
    reference_log_probs: [..., A] log pi_ref(a|x).
    primary: [..., A] q_0(x, a).
    constraints: [..., A, m] q_i(x, a).
    multipliers: [m] lambda >= 0.
    thresholds: [m] b.
    kl_weight: beta > 0.

  Returns:
    `DualValue(value, gradient [m])`.

  Example:
    >>> dual = tilt_dual(jnp.log(jnp.array([0.5, 0.5])), jnp.zeros(2), jnp.array([[0.0], [1.0]]),
    ...                  jnp.array([0.0]), thresholds=jnp.array([0.8]), kl_weight=1.0)
    >>> round(float(dual.value), 4), [round(v, 4) for v in dual.gradient.tolist()]  # E_ref[q] - b = 0.5 - 0.8
    (0.0, [-0.3])
  """
  reference_log_probs, primary, constraints, multipliers = _check_tilt_inputs(
      reference_log_probs, primary, constraints, multipliers, kl_weight)
  thresholds = checks.as_float("thresholds", thresholds)
  if thresholds.shape != multipliers.shape:
    raise ValueError(f"thresholds: expected shape {tuple(multipliers.shape)} (one per "
                     f"multiplier), got {tuple(thresholds.shape)}")
  logits = _tilted_logits(reference_log_probs, primary, constraints, multipliers, kl_weight)
  log_partition = jax.nn.logsumexp(logits, axis=-1)
  tilted = jnp.exp(logits - log_partition[..., None])
  expected = jnp.sum(tilted[..., None] * constraints, axis=-2)  # [..., m]
  batch_axes = tuple(range(log_partition.ndim))
  value = kl_weight * jnp.mean(log_partition) - multipliers @ thresholds
  gradient = jnp.mean(expected, axis=batch_axes) - thresholds
  return DualValue(value, gradient)


def minimize_dual(dual_fn: Callable[[jax.Array], DualValue], initial: ArrayLike, *,
                  num_iterations: int = 100, tolerance: float = 1e-5) -> jax.Array:
  """lambda* = argmin_{lambda >= 0} g(lambda) for a convex, smooth dual g, by projected Newton steps.

  Bertsekas' projected Newton method: the coordinates at the bound that the gradient pushes
  outwards (lambda_i = 0 and dg/dlambda_i > 0) are held at 0; on the others, the Newton direction
  d = H^{-1} grad g, with H the Hessian (the Jacobian of dual_fn's gradient, by forward-mode
  autodiff; the dual of a tilt has H = Cov_{p_lambda}[r] / beta), then lambda+ = max(0, lambda -
  t d) with t halved from 1 until g decreases by at least 1e-4 grad g . (lambda - lambda+) (Armijo).
  Near lambda* the steps converge quadratically: a few dozen iterations reach float precision for
  the small m of constrained alignment. It stops after `num_iterations`, when a step moves lambda
  by less than `tolerance` (relative: |step| / (1 + |lambda|)), or when no step decreases g beyond
  rounding. Jittable and vmappable (`lax.while_loop`).

  Args:
    dual_fn: dual_fn(lambda [m]) -> `DualValue` (value and gradient), jittable and
      differentiable by JAX (its gradient is differentiated for the Hessian).
    initial: [m] the starting multipliers (negative entries are projected to 0).
    num_iterations: the most Newton steps.
    tolerance: the relative step length |step| / (1 + |lambda|) below which lambda counts as
      converged (near lambda* a Newton step's error is about the square of the previous step's
      length, so 1e-5 leaves errors near float32 rounding, not 1e-5).

  Returns:
    [m] the minimiser.

  Example:
    >>> # g(l) = |l - c|^2 / 2 with c = (2, -1): the minimiser over l >= 0 is (2, 0)
    >>> centre = jnp.array([2.0, -1.0])
    >>> dual_fn = lambda l: DualValue(0.5 * jnp.sum((l - centre) ** 2), l - centre)
    >>> [round(v, 4) for v in minimize_dual(dual_fn, jnp.zeros(2)).tolist()]
    [2.0, 0.0]

  References:
    Bertsekas. Projected Newton methods for optimization problems with simple constraints. SIAM
    J. Control and Optimization 20(2), 1982.
  """
  initial = checks.as_float("initial", initial)
  if initial.ndim != 1:
    raise ValueError(f"initial: expected [m], got shape {tuple(initial.shape)}")
  checks.check_count("num_iterations", num_iterations)
  checks.check_real("tolerance", tolerance, low=0.0)
  if not callable(dual_fn):
    raise TypeError(f"dual_fn: must be callable, dual_fn(lambda) -> DualValue, got "
                    f"{type(dual_fn).__name__}")
  hessian_fn = jax.jacfwd(lambda multipliers: dual_fn(multipliers).gradient)
  m = initial.shape[0]

  def newton_step(carry):
    iteration, multipliers, _ = carry
    current = dual_fn(multipliers)
    gradient = current.gradient
    # Coordinates held at the bound: at 0 (up to rounding) and pushed outwards by the gradient.
    held = (multipliers <= 1e-12) & (gradient > 0)
    free = (~held).astype(multipliers.dtype)
    hessian = hessian_fn(multipliers)
    # The free block of H (a unit diagonal for the held coordinates), ridged by a tiny fraction
    # of its scale so that a constraint the tilt cannot move still gives a finite step.
    block = hessian * free[:, None] * free[None, :] + jnp.diag(1.0 - free)
    scale = jnp.maximum(jnp.max(jnp.abs(jnp.diag(hessian))), 1e-30)
    block = block + 1e-9 * scale * jnp.eye(m, dtype=multipliers.dtype)
    direction = jnp.linalg.solve(block, gradient * free) + gradient * (1.0 - free)

    def candidate(step):
      return jnp.maximum(multipliers - step * direction, 0.0)

    def too_long(step):
      new = candidate(step)
      decrease = gradient @ (multipliers - new)
      return (dual_fn(new).value > current.value - 1e-4 * decrease
              + 1e-7 * (1 + jnp.abs(current.value))) & (step > 1e-10)

    step = jax.lax.while_loop(too_long, lambda step: step / 2, jnp.ones((), multipliers.dtype))
    # No step decreases g beyond rounding: lambda is as good as this precision allows.
    stalled = step <= 1e-10
    new = jnp.where(stalled, multipliers, candidate(step))
    moved = jnp.sqrt(jnp.sum((new - multipliers) ** 2)) / (1.0 + jnp.sqrt(jnp.sum(new ** 2)))
    return iteration + 1, new, moved

  def not_done(carry):
    iteration, _, moved = carry
    return (iteration < num_iterations) & (moved > tolerance)

  start = (jnp.zeros((), jnp.int32), jnp.maximum(initial, 0.0), jnp.full((), jnp.inf, initial.dtype))
  return jax.lax.while_loop(not_done, newton_step, start)[1]
