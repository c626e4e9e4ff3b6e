"""Rectified flow (flow matching): its schedule, the SDE step with a log-density, the ODE step, the loss (floor 1).

A rectified flow joins data and noise on a straight line, t in [0, 1] with t = 1 pure noise:

    x_t = (1 - t) x_0 + t eps,   eps ~ N(0, I),

and the network predicts the velocity v(x_t, t, c) ~ eps - x_0 (`flow_matching_loss`). Then
x0hat = x_t - t v, epshat = x_t + (1 - t) v, and the score is -(x_t + (1 - t) v) / t. Sampling runs
backwards in time, from t_max down to t_min, by steps t -> t' = t - h (h > 0):

- ODE (deterministic, for evaluation): x_t' = x_t - h v, Euler on dx = v dt (`flow_ode_step`).
- SDE (Flow-GRPO's, for policy gradients): with the noise level a (`eta`) and
  sigma_t = a sqrt(t / (1 - t)),

      mu     = x_t - h [v + sigma_t^2 / (2 t) (x_t + (1 - t) v)]
             = (1 - h a^2 / (2 (1 - t))) x_t - h (1 + a^2 / 2) v,
      x_t'   = mu + sigma_t sqrt(h) z,   z ~ N(0, I),

  a Gaussian step whose log-density is recorded exactly as for DDIM (`flow_sde_step`,
  `flow_step_log_prob`; the same `Step`, reductions and meaning of a PPO clip range as
  `saferl_jax.diffusion.step`). In continuous time this SDE has the ODE's marginals for every a;
  a = 0 is the Euler step itself. Only mu depends on the network; sigma_t sqrt(h) does not.

The network sees the time as t * time_scale (`FlowSchedule.time_scale`, default 1000, the range of
DDPM's integer steps), so the sinusoidal time embedding of the DDPM denoisers serves both.

Where the chain starts and stops (the defaults of `flow_schedule`):

- t_max = 0.97, not 1. At t = 1, sigma_t is infinite. Just below 1 it is finite, but the step
  multiplies x_t by 1 - h a^2 / (2 (1 - t)), which for a coarse grid is far below 0 (t = 0.999,
  h = 0.05, a = 0.7: -11): the first step overshoots and, propagated exactly on standard-normal
  data, the final variance comes out 23 times too large at 20 steps (1.23 times with t_max = 0.99,
  1.00 with 0.97). The coefficient stays >= 0 when
  num_steps >= a^2 (t_max - t_min) / (2 (1 - t_max)): with 0.97, from 8 steps at a = 0.7 and 17 at
  a = 1, so the 20 steps used elsewhere in this package are stable up to a = 1. The price:
  x ~ N(0, I) stands in for x_{t_max}, whose variance is (1 - t_max)^2 s^2 + t_max^2 for data of
  variance s^2 (0.94 for s = 1), so on fine grids the ODE's samples keep a spread about
  1 / t_max - 1 = 3 % too wide (the SDE's noise forgets part of it); at 20 steps Euler's own
  error, -6 % in the spread of standard-normal data, is larger. Flow-GRPO starts at t = 1 instead
  and there replaces 1 - t by the first step size h, which makes sigma_t depend on the grid;
  starting below 1 keeps one formula for every step. For ODE-only evaluation on fine grids,
  `flow_schedule(t_max=0.999)` removes the start's bias (the ODE has no such limit).
- t_min = 0. The network and sigma_t are only ever evaluated at the start t of a step, and the
  last step starts at t_min + h > 0; the step into t' = 0 is still a proper Gaussian (std
  sigma_t sqrt(h) > 0), so the chain ends at data level, as diffusers' flow-matching scheduler and
  Flow-GRPO do. A t_min > 0 would leave t_min eps of noise in every sample.

Functions act on one example, x of any shape [*shape] and scalar t, t'; batch with `jax.vmap`.

References:
  [RF] Liu, Gong, Liu. Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow. ICLR 2023. https://arxiv.org/abs/2209.03003
  [FM] Lipman, Chen, Ben-Hamu, Nickel, Le. Flow Matching for Generative Modeling. ICLR 2023. https://arxiv.org/abs/2210.02747
  [SD3] Esser et al. Scaling Rectified Flow Transformers for High-Resolution Image Synthesis. ICML 2024. https://arxiv.org/abs/2403.03206
  [Flow-GRPO] Liu et al. Flow-GRPO: Training Flow Matching Models via Online RL. 2025. https://arxiv.org/abs/2505.05470
  [CFG] Ho, Salimans. Classifier-Free Diffusion Guidance. 2022. https://arxiv.org/abs/2207.12598
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.diffusion import conditions as conds
from saferl_jax.diffusion.schedules import SamplingTimesteps
from saferl_jax.diffusion.step import Reduce, Step, _check_pair, _check_reduce, _gaussian_log_prob


class FlowSchedule(NamedTuple):
  """Where a rectified-flow sampler starts and stops, and how the network reads the time.

  Attributes:
    t_max: scalar, the first time, in (t_min, 1): x ~ N(0, I) stands for x_{t_max}.
    t_min: scalar, the last time, in [0, t_max).
    time_scale: scalar > 0: the network sees t * time_scale.
  """
  t_max: jax.Array
  t_min: jax.Array
  time_scale: jax.Array


# Checks, shared with the sampler.


def _check_eta(eta) -> None:
  """eta for a step with a density: a finite scalar > 0 (0 is the ODE step)."""
  checks.check_real("eta", eta)
  if checks.is_concrete(eta) and not float(np.asarray(eta)) > 0:
    raise ValueError(f"eta: must be > 0 for a log-probability to exist (eta = 0 is the "
                     f"deterministic step, flow_ode_step), got {float(np.asarray(eta))}")


def _check_times(t: ArrayLike, t_prev: ArrayLike) -> tuple[jax.Array, jax.Array]:
  t, t_prev = checks.as_float("t", t), checks.as_float("t_prev", t_prev)
  if t.ndim != 0 or t_prev.ndim != 0:
    raise ValueError(f"t/t_prev: must be scalars for one example (vmap to batch), got shapes "
                     f"{tuple(t.shape)} and {tuple(t_prev.shape)}")
  if checks.is_concrete(t, t_prev):
    tv, pv = float(t), float(t_prev)
    if not 0 < tv < 1:  # also catches NaN
      raise ValueError(f"t: must be in (0, 1) (at t = 1, sigma_t = eta sqrt(t / (1 - t)) is "
                       f"infinite; t = 0 is data), got {tv}")
    if not 0 <= pv < tv:
      raise ValueError(f"t_prev: must be in [0, t) = [0, {tv:g}) (sampling runs backwards in "
                       f"time), got {pv}")
  return t, t_prev


def _check_std(eta, t: jax.Array, t_prev: jax.Array, dtype) -> None:
  """The step's std sigma_t sqrt(h) must be a normal, finite number of x's dtype."""
  if not checks.is_concrete(eta, t, t_prev):
    return
  a, tv, pv = float(np.asarray(eta)), float(t), float(t_prev)
  std = a * np.sqrt(tv / (1 - tv)) * np.sqrt(tv - pv)
  info = jnp.finfo(dtype)
  if not float(info.tiny) <= std <= float(info.max):
    raise ValueError(f"eta: the step's std eta sqrt(t / (1 - t)) sqrt(t - t_prev) = {std:g} at "
                     f"eta = {a:g}, t = {tv:g}, t_prev = {pv:g} is outside "
                     f"{np.dtype(dtype).name}'s normal range [{float(info.tiny):g}, "
                     f"{float(info.max):g}]")


def check_flow_schedule(schedule: FlowSchedule, name: str = "schedule") -> None:
  """Raises (naming `name`) unless the schedule holds scalars with 0 <= t_min < t_max < 1 and time_scale > 0.

  Shapes are always checked, values when the schedule is concrete (not traced).

  Args:
    schedule: a `FlowSchedule`.
    name: the argument to name in messages.

  Example:
    >>> check_flow_schedule(flow_schedule())
    >>> check_flow_schedule(FlowSchedule(1.0, 0.0, 1000.0))
    Traceback (most recent call last):
    ...
    ValueError: schedule: t_max must be in (t_min, 1) = (0, 1) (at t = 1, sigma_t is infinite), got 1.0
  """
  if not isinstance(schedule, FlowSchedule):
    raise TypeError(f"{name}: must be a FlowSchedule, got {type(schedule).__name__}")
  for field, value in zip(FlowSchedule._fields, schedule):
    if jnp.ndim(value) != 0:
      raise ValueError(f"{name}: {field} must be a scalar, got shape {jnp.shape(value)}")
    if not jnp.issubdtype(jnp.result_type(value), jnp.floating) and \
        not jnp.issubdtype(jnp.result_type(value), jnp.integer):
      raise TypeError(f"{name}: {field} must be a real number, got dtype {jnp.result_type(value)}")
  if not checks.is_concrete(*schedule):
    return
  t_max, t_min, time_scale = (float(np.asarray(v)) for v in schedule)
  if not (np.isfinite(time_scale) and time_scale > 0):
    raise ValueError(f"{name}: time_scale must be finite and > 0, got {time_scale}")
  if not 0 <= t_min < 1:
    raise ValueError(f"{name}: t_min must be in [0, 1), got {t_min}")
  if not t_min < t_max < 1:
    raise ValueError(f"{name}: t_max must be in (t_min, 1) = ({t_min:g}, 1) (at t = 1, sigma_t is "
                     f"infinite), got {t_max}")


# Kernels: no checks, safe to call under vmap and scan with traced times and eta.


def _flow_mean_std(x_t, velocity, t, t_prev, eta):
  """mu and sigma_t sqrt(h) of the step t -> t_prev; eta = 0 gives the Euler step and std 0."""
  h = t - t_prev
  # sigma_t^2 / (2 t) = a^2 / (2 (1 - t)), and its (1 - t) v term is a^2 / 2 v: the scalar
  # coefficients are formed first, so a = 0 leaves coef_x = 1 and the Euler step x_t - h v.
  eta_sq = jnp.square(eta)
  coef_x = 1 - 0.5 * h / (1 - t) * eta_sq
  coef_v = -h * (1 + 0.5 * eta_sq)
  mean = coef_x * x_t + coef_v * velocity
  # sqrt(t / (1 - t)) sqrt(h), not sqrt(t h / (1 - t)): t h underflows for t, h below 1e-19.
  std = eta * jnp.sqrt(t / (1 - t)) * jnp.sqrt(h)
  return mean, jnp.asarray(std, mean.dtype)


@functools.partial(jax.jit, static_argnames=("reduce",))
def _sde_step_kernel(x_t, velocity, t, t_prev, key, eta, reduce):
  mean, std = _flow_mean_std(x_t, velocity, t, t_prev, eta)
  x_prev = mean + std * jax.random.normal(key, x_t.shape, x_t.dtype)
  return Step(x_prev, _gaussian_log_prob(x_prev, mean, std, reduce), mean, std)


@functools.partial(jax.jit, static_argnames=("reduce",))
def _log_prob_kernel(x_prev, x_t, velocity, t, t_prev, eta, reduce):
  mean, std = _flow_mean_std(x_t, velocity, t, t_prev, eta)
  return _gaussian_log_prob(x_prev, mean, std, reduce)


@jax.jit
def _ode_kernel(x_t, velocity, t, t_prev):
  return x_t - (t - t_prev) * velocity


@functools.partial(jax.jit, static_argnames=("num_steps",))
def _grid_kernel(t_max, t_min, num_steps):
  fraction = jnp.arange(1, num_steps, dtype=t_max.dtype) / num_steps
  # The ends set apart: XLA may fuse the interpolation into a multiply-add that misses them by
  # an ulp.
  return jnp.concatenate([t_max[None], (1 - fraction) * t_max + fraction * t_min, t_min[None]])


# Public functions.


def flow_schedule(*, t_max: float = 0.97, t_min: float = 0.0,
                  time_scale: float = 1000.0) -> FlowSchedule:
  """A rectified-flow sampling schedule: run from t_max down to t_min; the network sees t * time_scale.

  The defaults and why (t_max = 0.97 keeps the SDE's first step stable for >= 8 steps at
  eta = 0.7; t_min = 0 ends at data level) are in the module docstring.

  Args:
    t_max: the first time, in (t_min, 1).
    t_min: the last time, in [0, t_max).
    time_scale: > 0; 1000 matches the range of DDPM's integer steps.

  Returns:
    A `FlowSchedule` of scalars in JAX's default float (float32).

  Example:
    >>> s = flow_schedule()
    >>> round(float(s.t_max), 4), float(s.t_min), float(s.time_scale)
    (0.97, 0.0, 1000.0)

  References:
    Liu et al. Flow-GRPO: Training Flow Matching Models via Online RL. 2025. https://arxiv.org/abs/2505.05470
  """
  values = {"t_max": t_max, "t_min": t_min, "time_scale": time_scale}
  for name, value in values.items():
    checks.check_real(name, value)
  dtype = jnp.result_type(float)
  schedule = FlowSchedule(*(jnp.asarray(v, dtype) for v in values.values()))
  check_flow_schedule(schedule)
  return schedule


def flow_timesteps(schedule: FlowSchedule, num_steps: int) -> SamplingTimesteps:
  """S equal steps from t_max down to t_min: t_i = t_max - i (t_max - t_min) / S, and t'_i = t_{i+1}.

  Computed as (1 - i / S) t_max + (i / S) t_min, so the grid starts at t_max and ends at t_min
  exactly. Jittable with `num_steps` static (the schedule may be traced).

  Args:
    schedule: a `FlowSchedule`.
    num_steps: S >= 1.

  Returns:
    A `SamplingTimesteps` (timesteps [S]: each step's start t_i, previous [S]: its end t_{i+1}), in
    the schedule's float dtype, strictly decreasing.

  Example:
    >>> ts = flow_timesteps(flow_schedule(t_max=0.8, t_min=0.0), 4)
    >>> [round(t, 4) for t in ts.timesteps.tolist()], [round(t, 4) for t in ts.previous.tolist()]
    ([0.8, 0.6, 0.4, 0.2], [0.6, 0.4, 0.2, 0.0])

  References:
    Liu, Gong, Liu. Flow Straight and Fast. ICLR 2023. https://arxiv.org/abs/2209.03003
  """
  check_flow_schedule(schedule)
  num_steps = checks.check_count("num_steps", num_steps)
  dtype = jnp.result_type(float)
  t_max, t_min = jnp.asarray(schedule.t_max, dtype), jnp.asarray(schedule.t_min, dtype)
  grid = _grid_kernel(t_max, t_min, num_steps)
  if checks.is_concrete(grid) and not np.all(np.diff(np.asarray(grid)) < 0):
    raise ValueError(f"num_steps: {num_steps} steps of (t_max - t_min) / num_steps = "
                     f"{(float(t_max) - float(t_min)) / num_steps:g} are below {dtype.name}'s "
                     f"resolution: the grid is not strictly decreasing")
  return SamplingTimesteps(grid[:-1], grid[1:])


def flow_sde_step(x_t: ArrayLike, velocity: ArrayLike, t: ArrayLike, t_prev: ArrayLike, *,
                  key: jax.Array, eta: ArrayLike, reduce: Reduce = "sum") -> Step:
  """Samples x_t' ~ N(mu, sigma_t^2 h I) from one step of Flow-GRPO's SDE and returns its log-density.

  h = t - t', sigma_t = eta sqrt(t / (1 - t)),
  mu = x_t - h [v + sigma_t^2 / (2 t) (x_t + (1 - t) v)];
  log_prob = sum (or mean, see `reduce`) over dimensions of
  -(x_t' - mu)^2 / (2 sigma_t^2 h) - log(sigma_t sqrt(h)) - log(2 pi) / 2.

  Args:
    x_t: [*shape] the current sample.
    velocity: [*shape] the velocity prediction v_theta(x_t, t, c) (guided already, if wanted).
    t: float scalar, the current time, in (0, 1).
    t_prev: float scalar, the time to go to, in [0, t).
    key: a PRNG key for z.
    eta: the noise level a > 0 (Flow-GRPO uses 0.7); every a > 0 keeps the continuous-time
      marginals; for a stable first step see the module docstring.
    reduce: "sum" (the exact log-density) or "mean" (DDPO's per-dimension average); see
      `saferl_jax.diffusion.step` for what a PPO clip range means with each.

  Returns:
    A `Step` (x_prev [*shape], log_prob scalar, mean [*shape], std scalar sigma_t sqrt(h)).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> out = flow_sde_step(jnp.zeros(3), jnp.ones(3), 0.5, 0.3, key=jax.random.key(0), eta=0.7)
    >>> [round(m, 4) for m in out.mean.tolist()], round(float(out.std), 4)  # -0.2 (1 + 0.49 / 2)
    ([-0.249, -0.249, -0.249], 0.313)

  References:
    Liu et al. Flow-GRPO: Training Flow Matching Models via Online RL. 2025. https://arxiv.org/abs/2505.05470
  """
  checks.check_key("key", key)
  x_t, velocity = _check_pair("x_t", x_t, velocity, "velocity")
  t, t_prev = _check_times(t, t_prev)
  _check_eta(eta)
  _check_std(eta, t, t_prev, x_t.dtype)
  _check_reduce(reduce)
  return _sde_step_kernel(x_t, velocity, t, t_prev, key, eta, reduce)


def flow_step_log_prob(x_prev: ArrayLike, x_t: ArrayLike, velocity: ArrayLike, t: ArrayLike,
                       t_prev: ArrayLike, *, eta: ArrayLike, reduce: Reduce = "sum") -> jax.Array:
  """log p(x_t' | x_t) of a stored SDE transition under a (new) velocity prediction.

  The Gaussian of `flow_sde_step`, N(mu(x_t, v), sigma_t^2 h I), evaluated at x_prev; its gradient
  with respect to the parameters behind v is the score used by REINFORCE, PPO and LOOP.

  Args:
    x_prev: [*shape] the stored x_t'.
    x_t: [*shape] the stored x_t.
    velocity: [*shape] the velocity prediction at (x_t, t) under the parameters being evaluated.
    t: float scalar in (0, 1).
    t_prev: float scalar in [0, t).
    eta: the noise level a > 0, as used when sampling.
    reduce: "sum" or "mean", as used when sampling.

  Returns:
    Scalar log-density (or its per-dimension mean).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x, v = jnp.zeros(3), jnp.ones(3)
    >>> out = flow_sde_step(x, v, 0.5, 0.25, key=jax.random.key(0), eta=0.7)
    >>> bool(jnp.allclose(flow_step_log_prob(out.x_prev, x, v, 0.5, 0.25, eta=0.7), out.log_prob))
    True

  References:
    Liu et al. Flow-GRPO: Training Flow Matching Models via Online RL. 2025. https://arxiv.org/abs/2505.05470
  """
  x_t, velocity = _check_pair("x_t", x_t, velocity, "velocity")
  x_prev = checks.as_float("x_prev", x_prev)
  if x_prev.shape != x_t.shape:
    raise ValueError(f"x_prev: must have the shape of x_t {tuple(x_t.shape)}, got "
                     f"{tuple(x_prev.shape)}")
  checks.check_finite("x_prev", x_prev)
  t, t_prev = _check_times(t, t_prev)
  _check_eta(eta)
  _check_std(eta, t, t_prev, x_t.dtype)
  _check_reduce(reduce)
  return _log_prob_kernel(x_prev, x_t, velocity, t, t_prev, eta, reduce)


def flow_ode_step(x_t: ArrayLike, velocity: ArrayLike, t: ArrayLike,
                  t_prev: ArrayLike) -> jax.Array:
  """One deterministic Euler step of the probability-flow ODE: x_t' = x_t - (t - t') v.

  The SDE step with eta = 0; it has no density, so it serves evaluation, not policy gradients.

  Args:
    x_t: [*shape] the current sample.
    velocity: [*shape] the velocity prediction v_theta(x_t, t, c).
    t: float scalar in (0, 1).
    t_prev: float scalar in [0, t).

  Returns:
    [*shape] x_t'.

  Example:
    >>> import jax.numpy as jnp
    >>> flow_ode_step(jnp.array([1.0, 2.0]), jnp.array([2.0, -2.0]), 0.5, 0.25).tolist()
    [0.5, 2.5]

  References:
    Liu, Gong, Liu. Flow Straight and Fast. ICLR 2023. https://arxiv.org/abs/2209.03003
  """
  x_t, velocity = _check_pair("x_t", x_t, velocity, "velocity")
  t, t_prev = _check_times(t, t_prev)
  return _ode_kernel(x_t, velocity, t, t_prev)


def flow_matching_loss(apply_fn: Callable, params: Any, x0: ArrayLike, conditions: Any, *,
                       key: jax.Array, time_scale: float = 1000.0, label_dropout: float = 0.0,
                       null_condition: Any = None) -> jax.Array:
  """Rectified flow's loss mean (v_theta(x_t, t, c') - (eps - x_0))^2 with t, eps and label dropout drawn from `key`.

  t ~ Uniform[0, 1), eps ~ N(0, I), x_t = (1 - t) x_0 + t eps; c' = null_condition with probability
  label_dropout, else c [RF; FM; CFG]. The minimiser is v(x_t, t, c) = E[eps - x_0 | x_t, c].

  Args:
    apply_fn: apply_fn(params, x_t [B, *shape], t * time_scale [B] float32, conditions) ->
      v [B, *shape].
    params: the network's parameters.
    x0: [B, *shape] clean samples.
    conditions: their conditions: an array [B, ...] or a pytree of them (leading axis B).
    key: PRNG key for t, eps and the dropout mask.
    time_scale: > 0, the factor on t in the network's time input (`FlowSchedule.time_scale`).
    label_dropout: probability in [0, 1] of replacing a condition by `null_condition`.
    null_condition: one condition (no batch axis) that stands for "no condition" (for class ids,
      the int num_classes); needed when label_dropout > 0.

  Returns:
    The scalar loss, averaged over the batch and every dimension.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> zero = lambda params, x, t, c: jnp.zeros_like(x)  # loss = mean (eps - x0)^2 = 1 + 1
    >>> loss = flow_matching_loss(zero, None, jnp.ones((1000, 2)), jnp.zeros(1000, jnp.int32),
    ...                           key=jax.random.key(0))
    >>> bool(abs(loss - 2) < 0.2)
    True

  References:
    Liu, Gong, Liu. Flow Straight and Fast. ICLR 2023. https://arxiv.org/abs/2209.03003
    Lipman et al. Flow Matching for Generative Modeling. ICLR 2023. https://arxiv.org/abs/2210.02747
    Ho, Salimans. Classifier-Free Diffusion Guidance. 2022. https://arxiv.org/abs/2207.12598
  """
  checks.check_key("key", key)
  x0 = checks.as_float("x0", x0)
  if x0.ndim < 2:
    raise ValueError(f"x0: expected a batch [B, *shape], got shape {tuple(x0.shape)}")
  checks.check_finite("x0", x0)
  conditions = conds.check("conditions", conditions)
  size = jax.tree_util.tree_leaves(conditions)[0].shape[0]
  if size != x0.shape[0]:
    raise ValueError(f"conditions: expected a leading batch axis of B = {x0.shape[0]} (as x0), got "
                     f"{size}")
  checks.check_real("time_scale", time_scale, low=0.0, open_low=True)
  checks.check_real("label_dropout", label_dropout, low=0.0, high=1.0)
  # Dropout unless label_dropout is known to be 0 (a traced one may be > 0).
  dropout = not (checks.is_concrete(label_dropout) and float(np.asarray(label_dropout)) == 0)
  if dropout or null_condition is not None:
    null_condition = conds.check_null("null_condition", null_condition, conditions)
  batch = x0.shape[0]
  t_key, noise_key, dropout_key = jax.random.split(key, 3)
  t = jax.random.uniform(t_key, (batch,), x0.dtype)
  noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
  t_b = t.reshape((batch,) + (1,) * (x0.ndim - 1))
  x_t = (1 - t_b) * x0 + t_b * noise
  if dropout:
    dropped = jax.random.bernoulli(dropout_key, label_dropout, (batch,))
    conditions = conds.drop(conditions, null_condition, dropped)
  predicted = apply_fn(params, x_t, (t * time_scale).astype(jnp.float32), conditions)
  return jnp.mean(jnp.square(predicted - (noise - x0)))
