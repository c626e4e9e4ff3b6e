"""DDIM sampling with per-step log-probabilities, and their recomputation under new parameters (floor 1).

The denoiser arrives as a pure function (for a Flax NNX module, `saferl_jax.models.functional.as_functional`):

    apply_fn(params, x_t [B, *shape], t [B] int32, conditions [B, ...]) -> eps [B, *shape].

Conditions may be class ids (int [B]), vectors (float [B, C]), sequences of embeddings or any pytree
of arrays with leading axis B (`saferl_jax.diffusion.conditions`); guidance's null condition has
the structure of one condition.

`sample` draws x_T ~ N(0, I) and runs the S stochastic DDIM steps of `sampling_timesteps` in one
`lax.scan`, each step the Gaussian of `saferl_jax.diffusion.step`:

    x_t' = mu_theta(x_t, t, c) + sigma_t z,   log p_theta(x_t' | x_t, c) = log N(x_t'; mu_theta, sigma_t^2 I),

for P conditions ("prompts") with K samples each, the K samples of one condition contiguous
(conditions are `jnp.repeat`-ed, so sample b has prompt b // K). With classifier-free guidance the
network runs once on a doubled batch (null condition, then the prompt) and
eps = eps_u + w (eps_c - eps_u). It returns the `Trajectory`: every state x_T, ..., x_0, every
step's log-probability, the timesteps and the conditions. Randomness comes only from `key`.

The step is a swappable piece, chosen by the schedule: a `NoiseSchedule` gives DDIM's step (the
network predicts eps, its time input is the integer training step), a `FlowSchedule` gives
Flow-GRPO's SDE step of a rectified flow (the network predicts the velocity, its time input is
t * time_scale; `saferl_jax.diffusion.flow`). Both are Gaussian steps with recorded log-densities,
so everything downstream (recomputation, losses, fine-tuning) is shared.

`generate` is the evaluation path: the deterministic DDIM chain (eta = 0) or the flow's ODE,
returning samples only. `differentiable_sample` is reward backpropagation's sampler (DRaFT-K,
AlignProp): its samples carry the gradient of the last K steps.

`trajectory_transitions` recomputes, for stored trajectories, every step's mean and log-probability
under other parameters (the policy being trained, or a frozen reference for a KL term): the same
Gaussians with the new mu, one `lax.scan` over steps, differentiable with respect to params. It runs
on any subset of the samples: take one with `select_samples` (the sample axis is axis 1 of `states`
and `log_probs`, axis 0 of `x0` and `conditions`, and the timesteps are shared). With the parameters
that sampled, it reproduces `Trajectory.log_probs` up to float rounding.

Policy-gradient losses sum over steps, so `stepwise_value_and_grad` differentiates them one step at
a time (`select_step` cuts out one step): the memory of one step's activations instead of S, as
DDPO's loop calling backward per step.

The final state is at the lowest training noise level alphabar_0 < 1, not at clean data, so every
step has a density (see `saferl_jax.diffusion.schedules`). The reduction over dimensions ("sum":
exact log-density, "mean": DDPO's average, whose log-ratios are d times smaller, so the PPO clip
range means something else) must be the same for sampling, recomputation and the loss (see
`saferl_jax.diffusion.step`).

References:
  [DDIM] Song, Meng, Ermon. Denoising Diffusion Implicit Models. ICLR 2021. https://arxiv.org/abs/2010.02502
  [DDPO] Black, Janner, Du, Kostrikov, Levine. Training Diffusion Models with Reinforcement Learning. ICLR 2024. https://arxiv.org/abs/2305.13301
  [CFG] Ho, Salimans. Classifier-Free Diffusion Guidance. 2022. https://arxiv.org/abs/2207.12598
  [LOOP] Gupta et al. A Simple and Effective Reinforcement Learning Method for Text-to-Image Diffusion Models. 2025. https://arxiv.org/abs/2503.00897
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.diffusion import conditions as conds
from saferl_jax.diffusion import flow
from saferl_jax.diffusion.schedules import (NoiseSchedule, SamplingTimesteps, check_schedule,
                                            sampling_timesteps)
from saferl_jax.diffusion.step import (Reduce, _check_eta, _check_reduce, _gaussian_log_prob,
                                       _mean_std)

ApplyFn = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]
Schedule = NoiseSchedule | flow.FlowSchedule


class Trajectory(NamedTuple):
  """Sampled trajectories of B = P * K samples (K per condition, contiguous).

  Attributes:
    x0: [B, *shape] the final samples (states[-1]).
    states: [S + 1, B, *shape] x_T first, ..., x_0 last.
    log_probs: [S, B] log p(states[i + 1] | states[i], c) of step i.
    timesteps: [S] the time t_i each step starts from (int32 training steps for DDIM, float32
      times in (0, 1) for a flow).
    conditions: each sample's condition: an array [B, ...] or a pytree of them.
    previous_timesteps: [S] the time t'_i each step goes to.
  """
  x0: jax.Array
  states: jax.Array
  log_probs: jax.Array
  timesteps: jax.Array
  conditions: Any
  previous_timesteps: jax.Array


class Transitions(NamedTuple):
  """Each stored step's Gaussian recomputed under some parameters.

  Attributes:
    log_probs: [S, B] log p_theta(states[i + 1] | states[i], c).
    means: [S, B, *shape] mu_theta of each step.
    stds: [S] sigma_t of each step (the same for every sample and every theta).
  """
  log_probs: jax.Array
  means: jax.Array
  stds: jax.Array


# The step: the only place that knows which process (DDIM on a NoiseSchedule, or a rectified flow on
# a FlowSchedule) is being sampled. Everything else in this module is shared.


def _check_process(schedule, eta, *, stochastic: bool = True) -> None:
  """The schedule, and eta when a log-probability is wanted (eta > 0)."""
  if isinstance(schedule, flow.FlowSchedule):
    flow.check_flow_schedule(schedule)
    if stochastic:
      flow._check_eta(eta)
    return
  if not isinstance(schedule, NoiseSchedule):
    raise TypeError(f"schedule: must be a NoiseSchedule (DDIM) or a FlowSchedule (rectified "
                    f"flow), got {type(schedule).__name__}")
  check_schedule(schedule)
  if stochastic:
    checks.check_real("eta", eta)
    _check_eta(eta)


def _max_steps(schedule) -> int | None:
  """The most sampling steps the schedule allows (None: any number)."""
  if isinstance(schedule, flow.FlowSchedule):
    return None
  return schedule.alphas_cumprod.shape[0] - 1


def _timesteps(schedule, num_steps: int) -> SamplingTimesteps:
  if isinstance(schedule, flow.FlowSchedule):
    return flow.flow_timesteps(schedule, num_steps)
  return sampling_timesteps(schedule.alphas_cumprod.shape[0], num_steps)


def _model_time(schedule, t, batch: int) -> jax.Array:
  """The network's time input [B]: DDIM's integer training step, or a flow's t * time_scale."""
  if isinstance(schedule, flow.FlowSchedule):
    return jnp.full((batch,), t * schedule.time_scale, jnp.float32)
  return jnp.full((batch,), t, jnp.int32)


def _step_mean_std(schedule, x, prediction, t, t_prev, eta):
  """The step's Gaussian: mean and std (std = 0 and the deterministic step when eta = 0)."""
  if isinstance(schedule, flow.FlowSchedule):
    return flow._flow_mean_std(x, prediction, t, t_prev, eta)
  return _mean_std(x, prediction, t, t_prev, schedule.alphas_cumprod, eta)


def _dtype(schedule):
  if isinstance(schedule, flow.FlowSchedule):
    return jnp.float32
  return schedule.alphas_cumprod.dtype


# Checks.


def _check_guidance(guidance_scale, null_condition, conditions) -> tuple[bool, Any]:
  """(guided, the null condition checked against `conditions`' structure)."""
  if guidance_scale is None:
    return False, None
  checks.check_real("guidance_scale", guidance_scale, low=0.0)  # 0: unconditional, 1: conditional
  return True, conds.check_null("null_condition", null_condition, conditions)


def _check_num_steps(num_steps, schedule) -> int:
  limit = _max_steps(schedule)
  checks.check_count("num_steps", num_steps)
  if limit is not None and not num_steps <= limit:
    raise ValueError(f"num_steps: must be an int in [1, {limit}] for a schedule of {limit + 1} "
                     f"steps, got {num_steps!r}")
  return int(num_steps)


def _check_shape(shape) -> tuple[int, ...]:
  if isinstance(shape, (int, np.integer)):
    shape = (shape,)
  try:
    shape = tuple(shape)
  except TypeError:
    raise ValueError(f"shape: must be a tuple of ints (one sample's shape), got {shape!r}") from None
  if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0 for d in shape):
    raise ValueError(f"shape: must be a tuple of positive ints (one sample's shape), got {shape!r}")
  return tuple(int(d) for d in shape)


def _check_trajectory(trajectory: Trajectory) -> None:
  if not isinstance(trajectory, Trajectory):
    raise ValueError(f"trajectory: must be a Trajectory, got {type(trajectory).__name__}")
  states, log_probs = trajectory.states, trajectory.log_probs
  if states.ndim < 2 or log_probs.ndim != 2:
    raise ValueError(f"trajectory: expected states [S + 1, B, *shape] and log_probs [S, B], got "
                     f"shapes {tuple(states.shape)} and {tuple(log_probs.shape)}")
  num_steps, batch = log_probs.shape
  expected = {"states": (num_steps + 1, batch) + tuple(states.shape[2:]),
              "x0": (batch,) + tuple(states.shape[2:]), "timesteps": (num_steps,),
              "previous_timesteps": (num_steps,)}
  for name, want in expected.items():
    got = tuple(jnp.shape(getattr(trajectory, name)))
    if got != want:
      raise ValueError(f"trajectory: {name} has shape {got}, expected {want} for {num_steps} steps "
                       f"of {batch} samples (slice samples with select_samples)")
  sizes = {jnp.shape(leaf)[:1] for leaf in jax.tree_util.tree_leaves(trajectory.conditions)}
  if sizes != {(batch,)}:
    raise ValueError(f"trajectory: conditions must have a leading axis of {batch} samples in every "
                     f"leaf, got leading shapes {sorted(sizes)}")


def _check_times(trajectory: Trajectory, schedule) -> None:
  if not checks.is_concrete(trajectory.timesteps, trajectory.previous_timesteps):
    return
  t, t_prev = np.asarray(trajectory.timesteps), np.asarray(trajectory.previous_timesteps)
  high = 1 if isinstance(schedule, flow.FlowSchedule) else schedule.alphas_cumprod.shape[0]
  if np.any(t >= high) or np.any(t_prev < 0) or np.any(t_prev >= t):
    raise ValueError(f"trajectory: timesteps must satisfy 0 <= previous_timesteps < timesteps < "
                     f"{high}")


# The network's prediction (eps for DDIM, the velocity for a flow).


def _predict(apply_fn, params, schedule, x, t, conditions, guidance_scale, null_condition, guided):
  batch = x.shape[0]
  time = _model_time(schedule, t, batch)
  if guided:
    nulls = conds.broadcast_null(null_condition, batch)
    both = apply_fn(params, jnp.concatenate([x, x]), jnp.concatenate([time, time]),
                    conds.concatenate(nulls, conditions))
    _check_prediction(both, (2 * batch,) + x.shape[1:])
    uncond, cond = both[:batch], both[batch:]
    prediction = uncond + guidance_scale * (cond - uncond)
  else:
    prediction = apply_fn(params, x, time, conditions)
    _check_prediction(prediction, x.shape)
  return prediction.astype(x.dtype)


def _check_prediction(prediction, want) -> None:
  if tuple(jnp.shape(prediction)) != tuple(want):
    raise ValueError(f"apply_fn: must return a prediction with the shape of x_t {tuple(want)}, got "
                     f"{tuple(jnp.shape(prediction))}")


def _guidance_args(schedule, guided, guidance_scale, null_condition, conditions):
  """guidance_scale and null_condition as the jitted functions take them (dummies when unguided)."""
  scale = jnp.asarray(guidance_scale if guided else 0.0, _dtype(schedule))
  # Unguided, no null condition is read: None (an empty pytree) costs no device work.
  return scale, (null_condition if guided else None)


# Sampling.


def sample(apply_fn: ApplyFn, params: Any, conditions: Any, *, key: jax.Array,
           schedule: Schedule, num_steps: int, eta: ArrayLike, samples_per_condition: int = 1,
           shape: Sequence[int], guidance_scale: ArrayLike | None = None,
           null_condition: Any = None, reduce: Reduce = "sum") -> Trajectory:
  """Samples K trajectories per condition with S stochastic steps and records each step's log-prob.

  x_T ~ N(0, I); for i = 0..S-1: eps = eps_theta(x_{t_i}, t_i, c) (guided: eps_u + w (eps_c - eps_u)),
  x_{t'_i} = mu + sigma_{t_i} z, log_probs[i] = log N(x_{t'_i}; mu, sigma_{t_i}^2 I). The noise of
  all steps is drawn from `key` up front, an array the size of `states`.

  Args:
    apply_fn: apply_fn(params, x_t [B, *shape], t [B], conditions [B, ...]) -> eps [B, *shape].
    params: the denoiser's parameters (any pytree).
    conditions: the P conditions ("prompts"): int [P] class ids, float [P, C] vectors, or any
      pytree of arrays with leading axis P.
    key: a PRNG key, the only source of randomness.
    schedule: the `NoiseSchedule` the denoiser was trained with (T steps): DDIM steps; or a
      `FlowSchedule` for a velocity model: Flow-GRPO's SDE steps (`saferl_jax.diffusion.flow`).
    num_steps: S, the number of sampling steps, in [1, T - 1] for DDIM (static).
    eta: DDIM: scalar in (0, 1], 1 is DDPM's ancestral sampler, as in DDPO and LOOP; a flow: the
      noise level a > 0 of sigma_t = a sqrt(t / (1 - t)) (Flow-GRPO: 0.7).
    samples_per_condition: K >= 1 (static).
    shape: one sample's shape, a tuple of ints (static).
    guidance_scale: None for no guidance, else the classifier-free guidance weight w >= 0, finite.
    null_condition: the condition of "no condition", shaped as one condition (for class ids, the
      int num_classes); needed with guidance_scale, ignored without.
    reduce: "sum" (exact log-density) or "mean" (DDPO's); see `saferl_jax.diffusion.step`.

  Returns:
    A `Trajectory` with x0 [P*K, *shape], states [S+1, P*K, *shape], log_probs [S, P*K],
    timesteps [S], conditions [P*K, ...], previous_timesteps [S].

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from saferl_jax.diffusion.schedules import linear_schedule
    >>> apply_fn = lambda params, x, t, c: params * x  # a toy noise predictor
    >>> traj = sample(apply_fn, 0.5, jnp.array([0, 1]), key=jax.random.key(0),
    ...               schedule=linear_schedule(100), num_steps=10, eta=1.0,
    ...               samples_per_condition=3, shape=(2,))
    >>> traj.states.shape, traj.log_probs.shape, traj.conditions.tolist()
    ((11, 6, 2), (10, 6), [0, 0, 0, 1, 1, 1])

  References:
    Song, Meng, Ermon. Denoising Diffusion Implicit Models. ICLR 2021. https://arxiv.org/abs/2010.02502
    Black et al. Training Diffusion Models with Reinforcement Learning. ICLR 2024. https://arxiv.org/abs/2305.13301
  """
  return _checked_sample(apply_fn, params, conditions, key, schedule, num_steps, eta,
                         samples_per_condition, shape, guidance_scale, null_condition, reduce)


def _checked_sample(apply_fn, params, conditions, key, schedule, num_steps, eta,
                    samples_per_condition, shape, guidance_scale, null_condition, reduce,
                    backprop_steps=None) -> Trajectory:
  """`sample`'s and `differentiable_sample`'s checks, then the compiled sampler."""
  checks.check_key("key", key)
  conditions = conds.check("conditions", conditions)
  _check_process(schedule, eta)
  num_steps = _check_num_steps(num_steps, schedule)
  if backprop_steps is not None:
    if not 1 <= checks.check_count("backprop_steps", backprop_steps) <= num_steps:
      raise ValueError(f"backprop_steps: must be in [1, num_steps = {num_steps}], got "
                       f"{backprop_steps}")
    backprop_steps = int(backprop_steps)
  checks.check_count("samples_per_condition", samples_per_condition)
  shape = _check_shape(shape)
  _check_reduce(reduce)
  guided, null = _check_guidance(guidance_scale, null_condition, conditions)
  scale, null = _guidance_args(schedule, guided, guidance_scale, null, conditions)
  return _sample(apply_fn, params, conditions, key, schedule, jnp.asarray(eta, _dtype(schedule)),
                 scale, null, num_steps=num_steps, samples_per_condition=int(samples_per_condition),
                 shape=shape, guided=guided, reduce=reduce, backprop_steps=backprop_steps)


@functools.partial(jax.jit, static_argnames=("apply_fn", "num_steps", "samples_per_condition",
                                               "shape", "guided", "reduce", "backprop_steps"))
def _sample(apply_fn, params, conditions, key, schedule, eta, guidance_scale, null_condition, *,
            num_steps, samples_per_condition, shape, guided, reduce, backprop_steps=None):
  conditions = conds.repeat(conditions, samples_per_condition)
  batch = jax.tree_util.tree_leaves(conditions)[0].shape[0]
  steps = _timesteps(schedule, num_steps)
  # All the noise at once, x_T first: one generator call compiles and runs faster than one per
  # step, for a transient array the size of `states`.
  noise = jax.random.normal(key, (num_steps + 1, batch) + shape, _dtype(schedule))
  log_prob = jax.vmap(_gaussian_log_prob, in_axes=(0, 0, None, None))

  def one_step(params, x, inputs):
    t, t_prev, z = inputs
    prediction = _predict(apply_fn, params, schedule, x, t, conditions, guidance_scale,
                          null_condition, guided)
    mean, std = _step_mean_std(schedule, x, prediction, t, t_prev, eta)
    x_prev = mean + std * z
    return x_prev, (x_prev, log_prob(x_prev, mean, std, reduce))

  inputs = (steps.timesteps, steps.previous, noise[1:])
  if backprop_steps is None:  # sampling: no gradient is wanted through the chain
    x0, (xs, log_probs) = jax.lax.scan(functools.partial(one_step, params), noise[0], inputs)
  else:  # reward backprop: constants for S - K steps, then K rematerialised steps with gradient
    split = num_steps - backprop_steps
    head, tail = (jax.tree_util.tree_map(lambda v: v[:split], inputs),
                  jax.tree_util.tree_map(lambda v: v[split:], inputs))
    frozen = jax.lax.stop_gradient(params)
    x_mid, (xs_head, lp_head) = jax.lax.scan(functools.partial(one_step, frozen), noise[0], head)
    x_mid = jax.lax.stop_gradient(x_mid)
    x0, (xs_tail, lp_tail) = jax.lax.scan(
        jax.checkpoint(functools.partial(one_step, params)), x_mid, tail)
    xs, log_probs = jnp.concatenate([xs_head, xs_tail]), jnp.concatenate([lp_head, lp_tail])
  states = jnp.concatenate([noise[:1], xs])
  return Trajectory(x0, states, log_probs, steps.timesteps, conditions, steps.previous)


def generate(apply_fn: ApplyFn, params: Any, conditions: Any, *, key: jax.Array, schedule: Schedule,
             num_steps: int, samples_per_condition: int = 1, shape: Sequence[int],
             guidance_scale: ArrayLike | None = None, null_condition: Any = None) -> jax.Array:
  """Deterministic samples for evaluation: DDIM with eta = 0 (or a flow's ODE) from x_T ~ N(0, I); no log-probs.

  DDIM: x_{t'} = sqrt(alphabar_t') x0hat + sqrt(1 - alphabar_t') eps for each of the S steps, the
  probability-flow sampler; a `FlowSchedule`: Euler steps x_{t'} = x_t - (t - t') v. The only
  randomness is x_T. It is the evaluation path; the policy-gradient path (`sample`) needs eta > 0,
  because a deterministic step has no density.

  Args:
    apply_fn, params, conditions, key, schedule, num_steps, samples_per_condition, shape,
      guidance_scale, null_condition: as for `sample`.

  Returns:
    [P*K, *shape] the final samples, the K of each condition contiguous.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from saferl_jax.diffusion.schedules import linear_schedule
    >>> x0 = generate(lambda p, x, t, c: 0.5 * x, None, jnp.array([0, 1]), key=jax.random.key(0),
    ...               schedule=linear_schedule(100), num_steps=10, samples_per_condition=2, shape=(3,))
    >>> x0.shape
    (4, 3)

  References:
    Song, Meng, Ermon. Denoising Diffusion Implicit Models. ICLR 2021. https://arxiv.org/abs/2010.02502
  """
  checks.check_key("key", key)
  conditions = conds.check("conditions", conditions)
  _check_process(schedule, None, stochastic=False)
  num_steps = _check_num_steps(num_steps, schedule)
  checks.check_count("samples_per_condition", samples_per_condition)
  shape = _check_shape(shape)
  guided, null = _check_guidance(guidance_scale, null_condition, conditions)
  scale, null = _guidance_args(schedule, guided, guidance_scale, null, conditions)
  return _generate(apply_fn, params, conditions, key, schedule, scale, null, num_steps=num_steps,
                   samples_per_condition=int(samples_per_condition), shape=shape, guided=guided)


@functools.partial(jax.jit, static_argnames=("apply_fn", "num_steps", "samples_per_condition",
                                               "shape", "guided"))
def _generate(apply_fn, params, conditions, key, schedule, guidance_scale, null_condition, *,
              num_steps, samples_per_condition, shape, guided):
  conditions = conds.repeat(conditions, samples_per_condition)
  batch = jax.tree_util.tree_leaves(conditions)[0].shape[0]
  steps = _timesteps(schedule, num_steps)
  zero = jnp.zeros((), _dtype(schedule))

  def one_step(x, inputs):
    t, t_prev = inputs
    prediction = _predict(apply_fn, params, schedule, x, t, conditions, guidance_scale,
                          null_condition, guided)
    mean, _ = _step_mean_std(schedule, x, prediction, t, t_prev, zero)
    return mean, None

  x_start = jax.random.normal(key, (batch,) + shape, _dtype(schedule))
  x0, _ = jax.lax.scan(one_step, x_start, (steps.timesteps, steps.previous))
  return x0


# Recomputation under new parameters.


def trajectory_transitions(apply_fn: ApplyFn, params: Any, trajectory: Trajectory, *,
                           schedule: Schedule, eta: ArrayLike,
                           guidance_scale: ArrayLike | None = None, null_condition: Any = None,
                           reduce: Reduce = "sum") -> Transitions:
  """Every stored step's mean mu_theta and log p_theta(x_t' | x_t, c) under `params`.

  For step i: eps = eps_theta(states[i], t_i, c) (guided as when sampling), mu = mu(states[i], eps),
  log_probs[i] = log N(states[i + 1]; mu, sigma_{t_i}^2 I). Differentiable with respect to params.
  Use the same eta, guidance and reduction as when sampling. For a KL penalty to a reference model,
  call it twice (params, reference params) and apply `step_kl` per step and sample.

  Args:
    apply_fn: apply_fn(params, x_t [B, *shape], t [B], conditions [B, ...]) -> eps [B, *shape].
    params: the parameters to evaluate.
    trajectory: a `Trajectory` from `sample`, or a subset of its samples from `select_samples`.
    schedule: the schedule used to sample (`NoiseSchedule` or `FlowSchedule`).
    eta: as used to sample.
    guidance_scale: as used to sample (None for no guidance).
    null_condition: as used to sample.
    reduce: "sum" or "mean", as used to sample.

  Returns:
    A `Transitions` with log_probs [S, B], means [S, B, *shape] and stds [S].

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from saferl_jax.diffusion.schedules import linear_schedule
    >>> from saferl_jax.diffusion.step import step_kl
    >>> apply_fn, s = (lambda params, x, t, c: params * x), linear_schedule(100)
    >>> traj = sample(apply_fn, 0.5, jnp.array([0]), key=jax.random.key(0), schedule=s,
    ...               num_steps=10, eta=1.0, samples_per_condition=4, shape=(2,))
    >>> new = trajectory_transitions(apply_fn, 0.6, traj, schedule=s, eta=1.0)
    >>> ref = trajectory_transitions(apply_fn, 0.5, traj, schedule=s, eta=1.0)
    >>> kl = jax.vmap(jax.vmap(step_kl, (0, 0, None)))(new.means, ref.means, new.stds)
    >>> new.log_probs.shape, kl.shape, bool(jnp.allclose(ref.log_probs, traj.log_probs, atol=1e-4))
    ((10, 4), (10, 4), True)
  """
  _check_trajectory(trajectory)
  _check_process(schedule, eta)
  _check_reduce(reduce)
  guided, null = _check_guidance(guidance_scale, null_condition, trajectory.conditions)
  _check_times(trajectory, schedule)
  scale, null = _guidance_args(schedule, guided, guidance_scale, null, trajectory.conditions)
  return _transitions(apply_fn, params, trajectory, schedule, jnp.asarray(eta, _dtype(schedule)),
                      scale, null, guided=guided, reduce=reduce)


@functools.partial(jax.jit, static_argnames=("apply_fn", "guided", "reduce"))
def _transitions(apply_fn, params, trajectory, schedule, eta, guidance_scale, null_condition, *,
                 guided, reduce):
  conditions = trajectory.conditions
  log_prob = jax.vmap(_gaussian_log_prob, in_axes=(0, 0, None, None))

  def one_step(carry, inputs):
    x, x_prev, t, t_prev = inputs
    prediction = _predict(apply_fn, params, schedule, x, t, conditions, guidance_scale,
                          null_condition, guided)
    mean, std = _step_mean_std(schedule, x, prediction, t, t_prev, eta)
    return carry, (log_prob(x_prev, mean, std, reduce), mean, std)

  states = trajectory.states.astype(_dtype(schedule))
  _, (log_probs, means, stds) = jax.lax.scan(
      one_step, None, (states[:-1], states[1:], trajectory.timesteps, trajectory.previous_timesteps))
  return Transitions(log_probs, means, stds)


def trajectory_log_probs(apply_fn: ApplyFn, params: Any, trajectory: Trajectory, *,
                         schedule: Schedule, eta: ArrayLike,
                         guidance_scale: ArrayLike | None = None, null_condition: Any = None,
                         reduce: Reduce = "sum") -> jax.Array:
  """log p_theta(x_t' | x_t, c) of every stored step under `params`: `trajectory_transitions(...).log_probs`.

  The new log-probabilities of PPO's ratio rho_t = exp(log p_theta - log p_theta_old), with
  `Trajectory.log_probs` as the old ones; differentiable with respect to params. Under `jax.jit` the
  unused means are never materialised.

  Args:
    apply_fn, params, trajectory, schedule, eta, guidance_scale, null_condition, reduce: as for
      `trajectory_transitions`.

  Returns:
    [S, B] log-probabilities.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from saferl_jax.diffusion.schedules import linear_schedule
    >>> apply_fn, s = (lambda params, x, t, c: params * x), linear_schedule(100)
    >>> traj = sample(apply_fn, 0.5, jnp.array([0, 1]), key=jax.random.key(0), schedule=s,
    ...               num_steps=10, eta=1.0, samples_per_condition=4, shape=(2,))
    >>> half = select_samples(traj, jnp.arange(4))  # a minibatch: the samples of condition 0
    >>> lp = trajectory_log_probs(apply_fn, 0.5, half, schedule=s, eta=1.0)
    >>> lp.shape, bool(jnp.allclose(lp, traj.log_probs[:, :4], atol=1e-4))
    ((10, 4), True)
  """
  return trajectory_transitions(apply_fn, params, trajectory, schedule=schedule, eta=eta,
                                guidance_scale=guidance_scale, null_condition=null_condition,
                                reduce=reduce).log_probs


def select_samples(trajectory: Trajectory, index: ArrayLike | slice) -> Trajectory:
  """The trajectories of some samples (a minibatch), indexing each field along its sample axis.

  Args:
    trajectory: a `Trajectory` of B samples.
    index: int indices [M] into the B samples, a bool mask [B], or a slice.

  Returns:
    A `Trajectory` of the selected samples; timesteps are shared and kept whole.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from saferl_jax.diffusion.schedules import linear_schedule
    >>> traj = sample(lambda p, x, t, c: 0 * x, None, jnp.array([7, 8]), key=jax.random.key(0),
    ...               schedule=linear_schedule(100), num_steps=5, eta=1.0, samples_per_condition=2,
    ...               shape=(3,))
    >>> sub = select_samples(traj, jnp.array([3, 0]))
    >>> sub.states.shape, sub.conditions.tolist()
    ((6, 2, 3), [8, 7])
  """
  _check_trajectory(trajectory)
  return Trajectory(x0=trajectory.x0[index], states=trajectory.states[:, index],
                    log_probs=trajectory.log_probs[:, index], timesteps=trajectory.timesteps,
                    conditions=conds.take(trajectory.conditions, index),
                    previous_timesteps=trajectory.previous_timesteps)


def select_step(trajectory: Trajectory, index: ArrayLike) -> Trajectory:
  """The one-step trajectory of step `index`: states[index], states[index + 1] and that step's data.

  `index` may be traced (a `lax.scan` counter), so this is how a loss that sums over steps visits
  them one at a time (`stepwise_value_and_grad`).

  Args:
    trajectory: a `Trajectory` of S steps.
    index: int scalar in [0, S) (not checked when traced; dynamic slicing clamps it).

  Returns:
    A `Trajectory` with states [2, B, *shape], log_probs [1, B], timesteps and
    previous_timesteps [1]; x0 and conditions unchanged.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from saferl_jax.diffusion.schedules import linear_schedule
    >>> traj = sample(lambda p, x, t, c: 0 * x, None, jnp.array([0]), key=jax.random.key(0),
    ...               schedule=linear_schedule(100), num_steps=5, eta=1.0, samples_per_condition=2,
    ...               shape=(3,))
    >>> one = select_step(traj, 4)
    >>> one.states.shape, bool(jnp.array_equal(one.states[1], traj.x0))
    ((2, 2, 3), True)
  """
  _check_trajectory(trajectory)
  num_steps = trajectory.log_probs.shape[0]
  if isinstance(index, (bool, np.bool_, str, bytes)) or not jnp.issubdtype(jnp.result_type(index),
                                                                           jnp.integer):
    raise TypeError(f"index: must be an integer scalar, got {index!r}")
  if jnp.ndim(index) != 0:
    raise ValueError(f"index: must be a scalar, got shape {jnp.shape(index)}")
  if checks.is_concrete(index) and not 0 <= int(index) < num_steps:
    raise ValueError(f"index: must be in [0, {num_steps}), got {int(index)}")

  def rows(values, count):
    return jax.lax.dynamic_slice_in_dim(values, index, count, axis=0)

  return trajectory._replace(states=rows(trajectory.states, 2), log_probs=rows(trajectory.log_probs, 1),
                             timesteps=rows(trajectory.timesteps, 1),
                             previous_timesteps=rows(trajectory.previous_timesteps, 1))


def stepwise_value_and_grad(step_loss: Callable[[Any, Trajectory], tuple[jax.Array, Any]], params: Any,
                            trajectory: Trajectory, *, steps: ArrayLike | None = None,
                            max_step_norm: float | None = None) -> tuple[tuple[jax.Array, Any], Any]:
  """Value and gradient of sum_i step_loss(params, select_step(trajectory, i)), one step at a time.

  Every policy-gradient loss over a trajectory (REINFORCE's sum over steps, PPO's per-step clipped
  ratio, a per-step KL) is a sum over steps, so its gradient is the sum of the steps' gradients.
  A `lax.scan` computes each step's gradient and adds it up, as DDPO's loop calls backward per step:
  only one step's activations are alive, where differentiating the whole S-step recomputation keeps
  all S. For the digits U-Net on CPU it is also faster (docs/benchmarks.md).

  With `max_step_norm` = c each step's gradient g_i is scaled to min(1, c / ||g_i||) g_i (global
  norm over params) before the sum: no single step can dominate the update (see
  `saferl_jax.training.finetuning` on REINFORCE's last step).

  Args:
    step_loss: step_loss(params, one_step_trajectory) -> (scalar loss, aux pytree); build the step's
      log-probs with `trajectory_log_probs` or `trajectory_transitions` on the one-step trajectory.
    params: the parameters to differentiate.
    trajectory: a `Trajectory` of S steps (or a minibatch of it, from `select_samples`).
    steps: optional int [M] indices of the steps to visit (default: all S, in order); DDPO's
      timestep_fraction trains a random subset.
    max_step_norm: optional bound c > 0 on each step's gradient norm.

  Returns:
    ((loss, aux), grads): the loss summed over the visited steps, aux stacked over them [M, ...],
    and the gradient, shaped as params.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from saferl_jax.diffusion.schedules import linear_schedule
    >>> s = linear_schedule(100)
    >>> apply_fn = lambda params, x, t, c: params * x
    >>> traj = sample(apply_fn, 0.5, jnp.array([0]), key=jax.random.key(0), schedule=s,
    ...               num_steps=10, eta=1.0, samples_per_condition=4, shape=(2,))
    >>> def step_loss(params, one):
    ...   log_probs = trajectory_log_probs(apply_fn, params, one, schedule=s, eta=1.0)
    ...   return -jnp.sum(log_probs), None
    >>> (loss, _), grad = stepwise_value_and_grad(step_loss, 0.6, traj)
    >>> whole = lambda p: -jnp.sum(trajectory_log_probs(apply_fn, p, traj, schedule=s, eta=1.0))
    >>> bool(jnp.allclose(grad, jax.grad(whole)(0.6), rtol=1e-4))
    True
  """
  _check_trajectory(trajectory)
  num_steps = trajectory.log_probs.shape[0]
  if steps is None:
    steps = jnp.arange(num_steps)
  else:
    steps = checks.as_int("steps", steps)
    if steps.ndim != 1 or steps.shape[0] == 0:
      raise ValueError(f"steps: expected a non-empty 1-d array of step indices, got shape "
                       f"{tuple(steps.shape)}")
    if checks.is_concrete(steps):
      checks.check_indices("steps", steps, num_steps, what="step index")
  if max_step_norm is not None:
    checks.check_real("max_step_norm", max_step_norm, low=0.0, open_low=True)
  gradient = jax.value_and_grad(step_loss, has_aux=True)

  def one_step(total, index):
    (loss, aux), grads = gradient(params, select_step(trajectory, index))
    if max_step_norm is not None:
      norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)))
      scale = jnp.minimum(1.0, max_step_norm / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
      grads = jax.tree_util.tree_map(lambda g: g * scale.astype(g.dtype), grads)
    return jax.tree_util.tree_map(jnp.add, total, grads), (loss, aux)

  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  grads, (losses, aux) = jax.lax.scan(one_step, zeros, steps)
  return (jnp.sum(losses), aux), grads


# Reward backpropagation.


def differentiable_sample(apply_fn: ApplyFn, params: Any, conditions: Any, *, key: jax.Array,
                          schedule: Schedule, num_steps: int, eta: ArrayLike,
                          samples_per_condition: int = 1, shape: Sequence[int], backprop_steps: int,
                          guidance_scale: ArrayLike | None = None, null_condition: Any = None,
                          reduce: Reduce = "sum") -> Trajectory:
  """`sample`, differentiable with respect to params through its last K steps (DRaFT-K, AlignProp).

  The first S - K steps run with stop_gradient(params) (their states are constants); the last K
  carry the gradient of x_0 with respect to params, each step rematerialised (`jax.checkpoint`) so
  that the backward pass stores K states, not every activation. With the same key it returns the
  same trajectory as `sample`. Reward backpropagation maximises r(x_0) by jax.grad of
  -mean r(trajectory.x0): the baseline for differentiable rewards.

  Args:
    apply_fn, params, conditions, key, schedule, num_steps, eta, samples_per_condition, shape,
      guidance_scale, null_condition, reduce: as for `sample`.
    backprop_steps: K in [1, num_steps], the last steps the gradient flows through.

  Returns:
    A `Trajectory`, as `sample`'s.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from saferl_jax.diffusion.schedules import linear_schedule
    >>> apply_fn = lambda params, x, t, c: params * x
    >>> def loss(params):
    ...   traj = differentiable_sample(apply_fn, params, jnp.array([0]), key=jax.random.key(0),
    ...                                schedule=linear_schedule(100), num_steps=10, eta=1.0,
    ...                                samples_per_condition=4, shape=(2,), backprop_steps=3)
    ...   return -jnp.mean(traj.x0[:, 0])
    >>> bool(jnp.isfinite(jax.grad(loss)(0.5)))
    True

  References:
    Clark, Vicol, Swersky, Fleet. Directly Fine-Tuning Diffusion Models on Differentiable Rewards. ICLR 2024. https://arxiv.org/abs/2309.17400
    Prabhudesai, Goyal, Pathak, Fragkiadaki. Aligning Text-to-Image Diffusion Models with Reward Backpropagation. 2023. https://arxiv.org/abs/2310.03739
  """
  return _checked_sample(apply_fn, params, conditions, key, schedule, num_steps, eta,
                         samples_per_condition, shape, guidance_scale, null_condition, reduce,
                         backprop_steps)
