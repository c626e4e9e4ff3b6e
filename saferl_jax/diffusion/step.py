"""One stochastic DDIM step, with the log-density of the transition (floor 1).

Given x_t at training step t and the network's noise prediction eps = eps_theta(x_t, t, c), the
step to t' < t of DDIM is the Gaussian

    x0hat   = (x_t - sqrt(1 - alphabar_t) eps) / sqrt(alphabar_t)
    sigma_t = eta sqrt((1 - alphabar_t') / (1 - alphabar_t)) sqrt(1 - alphabar_t / alphabar_t')
    mu      = sqrt(alphabar_t') x0hat + sqrt(1 - alphabar_t' - sigma_t^2) eps
    x_t'    = mu + sigma_t z,   z ~ N(0, I),

so log p(x_t' | x_t, c) = sum_j [-(x_t',j - mu_j)^2 / (2 sigma_t^2) - log sigma_t - log(2 pi) / 2].
eta = 1 is DDPM's ancestral step (sigma_t^2 is the posterior variance), eta = 0 the deterministic
DDIM step, which has no density: eta must lie in (0, 1] (above 1, 1 - alphabar_t' - sigma_t^2 can be
negative). mu is computed as sqrt(alphabar_t' / alphabar_t) x_t + (sqrt(1 - alphabar_t' - sigma_t^2) -
sqrt(alphabar_t' (1 - alphabar_t) / alphabar_t)) eps, the same number with the scalar coefficients
formed first. Recomputing the log-density of a stored transition under new parameters is the same
Gaussian with the new eps (`step_log_prob`); only mu depends on the parameters, sigma_t does not.

Two reductions over the dimensions of x, d of them. `reduce="sum"` is the exact log-density.
`reduce="mean"` averages over dimensions, as DDPO's code does; it is not a log-density (it is 1/d of
one), so every log-ratio between two policies is d times smaller. The PPO clip range e therefore
means different things. With "sum", e bounds the exact per-step likelihood ratio, and the usual PPO
range of 0.1 to 0.3 applies; a mean shift of delta sigma_t in every coordinate moves the exact
log-ratio by about sqrt(d) delta (its spread under the old policy). With "mean", e bounds the exact
log-ratio at about +-d e: DDPO's e = 1e-4 on Stable Diffusion's 4 x 64 x 64 latents allows about
+-1.6, looser than PPO's usual range, while the same 1e-4 on 2-d points (+-2e-4) or 8 x 8 images
(+-6.4e-3) is far tighter. To carry DDPO's trust region to other sizes, keep d e fixed with "mean",
or use "sum" with e = d e_DDPO while that is small (above about 0.3 the lower end 1 - e of the clip
stops meaning a log-ratio bound). Use one reduction for a whole run: sampler, recomputation and
loss.

Functions act on one example, x of any shape [*shape] and scalar t, t'; batch with `jax.vmap`.
Classifier-free guidance mixes two noise predictions before the step (`guided_eps`).

References:
  [DDIM] Song, Meng, Ermon. Denoising Diffusion Implicit Models. ICLR 2021. https://arxiv.org/abs/2010.02502
  [DDPO] Black, Janner, Du, Kostrikov, Levine. Training Diffusion Models with Reinforcement Learning. ICLR 2024. https://arxiv.org/abs/2305.13301
  [CFG] Ho, Salimans. Classifier-Free Diffusion Guidance. 2022. https://arxiv.org/abs/2207.12598
"""

from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.diffusion.schedules import NoiseSchedule, alphabar, check_schedule

Reduce = Literal["sum", "mean"]
REDUCTIONS = ("sum", "mean")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_MIN_ETA = 1e-30  # the smallest eta whose sigma_t stays a normal float32 on usual schedules


class Step(NamedTuple):
  """One DDIM step.

  Attributes:
    x_prev: [*shape] the sample x_t'.
    log_prob: scalar log p(x_t' | x_t), reduced over dimensions as asked.
    mean: [*shape] mu, the Gaussian's mean.
    std: scalar sigma_t, the Gaussian's standard deviation.
  """
  x_prev: jax.Array
  log_prob: jax.Array
  mean: jax.Array
  std: jax.Array


# Option checks, shared with the sampler.


def _check_eta(eta) -> None:
  if not checks.is_concrete(eta):
    return
  if np.ndim(eta) != 0:
    raise ValueError(f"eta: must be a scalar, got shape {np.shape(eta)}")
  value = float(np.asarray(eta))
  if not value > 0:  # also catches NaN
    raise ValueError(f"eta: must be > 0 for a log-probability to exist, got {value}")
  if value < _MIN_ETA:
    raise ValueError(f"eta: must be >= {_MIN_ETA:g} (below it sigma_t underflows to 0 in float32 "
                     f"and the step has no log-probability), got {value}")
  if value > 1:
    raise ValueError(f"eta: must be <= 1 (above it 1 - alphabar_t' - sigma_t^2 can be negative), "
                     f"got {value}")


def _check_reduce(reduce) -> None:
  checks.check_choice("reduce", reduce, REDUCTIONS)


def _check_steps(t: jax.Array, t_prev: jax.Array, num_train_steps: int) -> tuple[jax.Array, jax.Array]:
  t, t_prev = checks.as_int("t", t), checks.as_int("t_prev", t_prev)
  if t.ndim != 0 or t_prev.ndim != 0:
    raise ValueError(f"t/t_prev: must be scalars for one example (vmap to batch), got shapes "
                     f"{tuple(t.shape)} and {tuple(t_prev.shape)}")
  if checks.is_concrete(t, t_prev):
    tv, pv = int(t), int(t_prev)
    if not 0 < tv < num_train_steps:
      raise ValueError(f"t: must be in [1, {num_train_steps - 1}], got {tv}")
    if not 0 <= pv < tv:
      raise ValueError(f"t_prev: must be in [0, t) = [0, {tv}) (a step into clean data, t_prev < 0, "
                       f"has sigma_t = 0 and no log-probability), got {pv}")
  return t, t_prev


def _check_pair(x_name: str, x: ArrayLike, eps: ArrayLike,
                eps_name: str = "eps") -> tuple[jax.Array, jax.Array]:
  x, eps = checks.as_float(x_name, x), checks.as_float(eps_name, eps)
  if x.shape != eps.shape:
    raise ValueError(f"{eps_name}: must have the shape of {x_name} {tuple(x.shape)}, got "
                     f"{tuple(eps.shape)}")
  checks.check_finite(x_name, x)
  checks.check_finite(eps_name, eps)
  return x, eps


# Kernels: no checks, safe to call under vmap and scan with traced steps.


def _mean_std(x_t, eps, t, t_prev, alphas_cumprod, eta):
  schedule = NoiseSchedule(alphas_cumprod)
  a, a_prev = alphabar(schedule, t), alphabar(schedule, t_prev)
  # sigma_t = eta sqrt(...), not sqrt(eta^2 ...): eta^2 underflows to 0 for eta below about 1e-19
  # in float32, and a zero std gave NaN log-probabilities.
  std = eta * jnp.sqrt((1 - a_prev) / (1 - a) * ((a_prev - a) / a_prev))
  direction = jnp.sqrt(jnp.maximum(1 - a_prev - jnp.square(std), 0.0))
  coef_x = jnp.sqrt(a_prev / a)
  coef_eps = direction - jnp.sqrt(a_prev * (1 - a) / a)
  mean = coef_x * x_t + coef_eps * eps
  return mean, std.astype(mean.dtype)


def _reduce(values, reduce):
  return jnp.sum(values) if reduce == "sum" else jnp.mean(values)


def _gaussian_log_prob(x, mean, std, reduce):
  # Finite for every std > 0 that float32 holds (eta down to about 1e-30); a stored x_prev more
  # than about 1e19 stds from the mean gives z^2 = inf and log_prob = -inf, the Gaussian's limit.
  z = (x - mean) / std
  per_dim = jnp.log(std) + _HALF_LOG_2PI  # the normalising constant of one dimension
  if reduce == "sum":
    return -0.5 * jnp.sum(jnp.square(z)) - z.size * per_dim
  return -0.5 * jnp.mean(jnp.square(z)) - per_dim


@functools.partial(jax.jit, static_argnames=("reduce",))
def _step_kernel(x_t, eps, t, t_prev, alphas_cumprod, key, eta, reduce):
  mean, std = _mean_std(x_t, eps, t, t_prev, alphas_cumprod, eta)
  x_prev = mean + std * jax.random.normal(key, x_t.shape, x_t.dtype)
  return Step(x_prev, _gaussian_log_prob(x_prev, mean, std, reduce), mean, std)


@functools.partial(jax.jit, static_argnames=("reduce",))
def _log_prob_kernel(x_prev, x_t, eps, t, t_prev, alphas_cumprod, eta, reduce):
  mean, std = _mean_std(x_t, eps, t, t_prev, alphas_cumprod, eta)
  return _gaussian_log_prob(x_prev, mean, std, reduce)


# Public functions.


def guided_eps(eps_uncond: ArrayLike, eps_cond: ArrayLike, guidance_scale: ArrayLike) -> jax.Array:
  """Classifier-free guidance: eps = eps_u + w (eps_c - eps_u).

  w = 1 is the conditional prediction, w = 0 the unconditional one, w > 1 extrapolates.

  Args:
    eps_uncond: [*shape] the prediction under the null condition.
    eps_cond: [*shape] the prediction under the prompt's condition.
    guidance_scale: scalar w.

  Returns:
    [*shape] the guided noise prediction.

  Example:
    >>> import jax.numpy as jnp
    >>> guided_eps(jnp.array([0.0, 1.0]), jnp.array([1.0, 1.0]), 3.0).tolist()
    [3.0, 1.0]

  References:
    Ho, Salimans. Classifier-Free Diffusion Guidance. 2022. https://arxiv.org/abs/2207.12598
  """
  eps_uncond, eps_cond = _check_pair("eps_uncond", eps_uncond, eps_cond, "eps_cond")
  if jnp.ndim(guidance_scale) != 0:
    raise ValueError(f"guidance_scale: must be a scalar, got shape {jnp.shape(guidance_scale)}")
  checks.check_scalar("guidance_scale", guidance_scale)
  return eps_uncond + jnp.asarray(guidance_scale, eps_uncond.dtype) * (eps_cond - eps_uncond)


def ddim_step(x_t: ArrayLike, eps: ArrayLike, t: ArrayLike, t_prev: ArrayLike,
              schedule: NoiseSchedule, *, key: jax.Array, eta: ArrayLike,
              reduce: Reduce = "sum") -> Step:
  """Samples x_t' ~ N(mu, sigma_t^2 I) from one stochastic DDIM step and returns its log-density.

  mu and sigma_t as in the module docstring; log_prob = sum (or mean, see `reduce`) over dimensions
  of -(x_t' - mu)^2 / (2 sigma_t^2) - log sigma_t - log(2 pi) / 2.

  Args:
    x_t: [*shape] the current sample.
    eps: [*shape] the noise prediction eps_theta(x_t, t, c) (guided already, if wanted).
    t: int scalar, the current training step, in [1, T - 1].
    t_prev: int scalar, the step to go to, in [0, t).
    schedule: the `NoiseSchedule`.
    key: a PRNG key for z.
    eta: scalar in [1e-30, 1]; 1 is DDPM's ancestral sampler (below 1e-30 sigma_t underflows).
    reduce: "sum" (the exact log-density) or "mean" (DDPO's per-dimension average); see the module
      docstring for what a PPO clip range means with each.

  Returns:
    A `Step` (x_prev [*shape], log_prob scalar, mean [*shape], std scalar).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from saferl_jax.diffusion.schedules import linear_schedule
    >>> out = ddim_step(jnp.zeros(3), jnp.ones(3), 981, 961, linear_schedule(), key=jax.random.key(0),
    ...                 eta=1.0)
    >>> out.x_prev.shape, round(float(out.std), 4)
    ((3,), 0.57)

  References:
    Song, Meng, Ermon. Denoising Diffusion Implicit Models. ICLR 2021. https://arxiv.org/abs/2010.02502
  """
  checks.check_key("key", key)
  x_t, eps = _check_pair("x_t", x_t, eps)
  check_schedule(schedule)
  t, t_prev = _check_steps(t, t_prev, schedule.alphas_cumprod.shape[0])
  _check_eta(eta)
  _check_reduce(reduce)
  return _step_kernel(x_t, eps, t, t_prev, schedule.alphas_cumprod, key, eta, reduce)


def step_log_prob(x_prev: ArrayLike, x_t: ArrayLike, eps: ArrayLike, t: ArrayLike, t_prev: ArrayLike,
                  schedule: NoiseSchedule, *, eta: ArrayLike, reduce: Reduce = "sum") -> jax.Array:
  """log p(x_t' | x_t) of a stored transition under a (new) noise prediction eps.

  The same Gaussian as `ddim_step`, N(mu(x_t, eps), sigma_t^2 I), evaluated at x_prev; its gradient
  with respect to the parameters behind eps is the score used by REINFORCE, PPO and LOOP.

  Args:
    x_prev: [*shape] the stored x_t'.
    x_t: [*shape] the stored x_t.
    eps: [*shape] the noise prediction at (x_t, t) under the parameters being evaluated.
    t: int scalar, in [1, T - 1].
    t_prev: int scalar, in [0, t).
    schedule: the `NoiseSchedule`.
    eta: scalar in (0, 1], as used when sampling.
    reduce: "sum" or "mean", as used when sampling.

  Returns:
    Scalar log-density (or its per-dimension mean).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from saferl_jax.diffusion.schedules import linear_schedule
    >>> s, x, e = linear_schedule(), jnp.zeros(3), jnp.ones(3)
    >>> out = ddim_step(x, e, 981, 961, s, key=jax.random.key(0), eta=1.0)
    >>> bool(jnp.allclose(step_log_prob(out.x_prev, x, e, 981, 961, s, eta=1.0), out.log_prob))
    True
  """
  x_t, eps = _check_pair("x_t", x_t, eps)
  x_prev = checks.as_float("x_prev", x_prev)
  if x_prev.shape != x_t.shape:
    raise ValueError(f"x_prev: must have the shape of x_t {tuple(x_t.shape)}, got "
                     f"{tuple(x_prev.shape)}")
  checks.check_finite("x_prev", x_prev)
  check_schedule(schedule)
  t, t_prev = _check_steps(t, t_prev, schedule.alphas_cumprod.shape[0])
  _check_eta(eta)
  _check_reduce(reduce)
  return _log_prob_kernel(x_prev, x_t, eps, t, t_prev, schedule.alphas_cumprod, eta, reduce)


def step_kl(mean: ArrayLike, reference_mean: ArrayLike, std: ArrayLike, *,
            reduce: Reduce = "sum") -> jax.Array:
  """KL(N(mu, sigma^2 I) || N(mu_ref, sigma^2 I)) = ||mu - mu_ref||^2 / (2 sigma^2), for one step.

  Both policies share sigma_t (it depends only on the schedule and eta), so the per-step KL to a
  reference (pre-trained) model is a scaled squared distance between means. `reduce="mean"` divides
  by the number of dimensions, matching `reduce="mean"` log-probabilities.

  Args:
    mean: [*shape] mu under the current parameters.
    reference_mean: [*shape] mu under the reference parameters.
    std: scalar sigma_t > 0 (`Step.std`), at least the dtype's smallest normal number.
    reduce: "sum" or "mean" over dimensions.

  Returns:
    Scalar KL (or its per-dimension mean), >= 0.

  Example:
    >>> import jax.numpy as jnp
    >>> step_kl(jnp.array([1.0, 0.0]), jnp.zeros(2), 0.5).item()
    2.0
  """
  mean, reference_mean = _check_pair("mean", mean, reference_mean, "reference_mean")
  _check_reduce(reduce)
  std = checks.as_float("std", std)
  if std.ndim != 0:
    raise ValueError(f"std: must be a scalar for one step, got shape {tuple(std.shape)}")
  if checks.is_concrete(std):
    value, tiny = float(std), float(jnp.finfo(std.dtype).tiny)
    if not (value > 0 and np.isfinite(value)):
      raise ValueError(f"std: must be finite and > 0, got {value}")
    if value < tiny:
      raise ValueError(f"std: must be >= {tiny:g}, the smallest normal {std.dtype} (a subnormal "
                       f"std flushes to 0 in XLA's arithmetic), got {value:g}")
  # Divide before squaring: sigma^2 underflows to 0 for sigma below about 1e-19 in float32, and
  # equal means then gave 0 / 0 = NaN. The KL is 0 for equal means at any sigma > 0, and +inf
  # (its float32 limit) once ||mu - mu_ref|| / sigma exceeds about 1e19.
  return 0.5 * _reduce(jnp.square((mean - reference_mean) / std), reduce)
