"""Noise schedules and DDIM sampling timesteps (floor 1).

A schedule stores alphabar_t, the fraction of signal left at training step t = 0, ..., T-1:

    x_t = sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) eps,    eps ~ N(0, I),

with alphabar strictly decreasing in (0, 1). The linear schedule of DDPM sets
beta_t = linspace(beta_start, beta_end, T) and alphabar_t = prod_{s <= t} (1 - beta_s); the cosine
schedule of Nichol & Dhariwal sets alphabar_t = f(t + 1) / f(0) with
f(u) = cos^2((u / T + s) / (1 + s) * pi / 2), through betas clipped at 0.999 (the same numbers as
diffusers' `squaredcos_cap_v2`). Both are computed in float64 and stored in JAX's default float.

Sampling visits S < T of the training steps in descending order. `sampling_timesteps` uses
diffusers' "leading" spacing with `steps_offset=1`, the setting of Stable Diffusion that DDPO
fine-tunes: t_i = (S - 1 - i) * (T // S) + 1, so T = 1000, S = 50 gives 981, 961, ..., 21, 1, and
each step goes to the next one, the last from t = 1 to t' = 0. The chain therefore ends at the
lowest training noise level alphabar_0 (1 - 1e-4 for the linear schedule), exactly as diffusers'
DDIM scheduler with `set_alpha_to_one=False` does, and never at clean data. That is deliberate: a
step into alphabar' = 1 has sigma_t = eta sqrt((1 - alphabar') / (1 - alphabar_t)) ... = 0 for every
eta, so it is deterministic and has no log-probability; ending at alphabar_0 < 1 keeps every one of
the S steps a proper Gaussian (see `saferl_jax.diffusion.step`). `alphabar` still reads t < 0 as
clean data (alphabar = 1) for code that wants a final noise-free denoising step outside the
policy.

References:
  [DDPM] Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020. https://arxiv.org/abs/2006.11239
  Nichol, Dhariwal. Improved Denoising Diffusion Probabilistic Models. ICML 2021. https://arxiv.org/abs/2102.09672
  [DDIM] Song, Meng, Ermon. Denoising Diffusion Implicit Models. ICLR 2021. https://arxiv.org/abs/2010.02502
  [DDPO] Black, Janner, Du, Kostrikov, Levine. Training Diffusion Models with Reinforcement Learning. ICLR 2024. https://arxiv.org/abs/2305.13301
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from saferl_jax import checks


class NoiseSchedule(NamedTuple):
  """A diffusion noise schedule.

  Attributes:
    alphas_cumprod: [T] alphabar_t for training steps t = 0, ..., T-1, strictly decreasing in (0, 1).
  """
  alphas_cumprod: jax.Array


class SamplingTimesteps(NamedTuple):
  """The training steps a sampler visits, and where each step goes.

  Attributes:
    timesteps: int32 [S], descending: step i starts from noise level t_i.
    previous: int32 [S]: step i ends at noise level t'_i = t_{i+1} (the last at 0).
  """
  timesteps: jax.Array
  previous: jax.Array


def _check_num_steps(name: str, value, low: int, high: int | None = None) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    checks.check_count(name, value, low=low)  # raises: an int, never a bool or a float
  if value < low or (high is not None and value > high):
    upper = "" if high is None else f", {high}"
    raise ValueError(f"{name}: must be in [{low}{upper}], got {value}")
  return int(value)


def _from_alphas_cumprod(alphas_cumprod: np.ndarray) -> NoiseSchedule:
  return NoiseSchedule(jnp.asarray(alphas_cumprod, dtype=jnp.result_type(float)))


def linear_schedule(num_train_steps: int = 1000, *, beta_start: float = 1e-4,
                    beta_end: float = 0.02) -> NoiseSchedule:
  """DDPM's linear schedule: beta_t = linspace(beta_start, beta_end, T), alphabar_t = prod_{s<=t} (1 - beta_s).

  Args:
    num_train_steps: T >= 2.
    beta_start: beta_0, in (0, 1).
    beta_end: beta_{T-1}, in [beta_start, 1).

  Returns:
    A `NoiseSchedule` with alphas_cumprod [T].

  Example:
    >>> s = linear_schedule(1000)
    >>> s.alphas_cumprod.shape, round(float(s.alphas_cumprod[0]), 6)
    ((1000,), 0.9999)

  References:
    Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020. https://arxiv.org/abs/2006.11239
  """
  num_train_steps = _check_num_steps("num_train_steps", num_train_steps, 2)
  checks.check_real("beta_start", beta_start)
  checks.check_real("beta_end", beta_end)
  if not 0 < beta_start < 1:
    raise ValueError(f"beta_start: must be in (0, 1), got {beta_start}")
  if not beta_start <= beta_end < 1:
    raise ValueError(f"beta_end: must be in [beta_start, 1) = [{beta_start}, 1), got {beta_end}")
  betas = np.linspace(beta_start, beta_end, num_train_steps, dtype=np.float64)
  return _from_alphas_cumprod(np.cumprod(1.0 - betas))


def cosine_schedule(num_train_steps: int = 1000, *, s: float = 0.008) -> NoiseSchedule:
  """Nichol & Dhariwal's cosine schedule: alphabar_t = f(t + 1) / f(0), f(u) = cos^2((u/T + s)/(1 + s) pi/2).

  Built, as in the paper and diffusers' `squaredcos_cap_v2`, through
  beta_t = min(1 - f(t + 1) / f(t), 0.999) and alphabar_t = prod_{s<=t} (1 - beta_s), so the last
  step keeps alphabar_{T-1} > 0.

  Args:
    num_train_steps: T >= 2.
    s: the small offset that keeps beta_0 from vanishing, >= 0.

  Returns:
    A `NoiseSchedule` with alphas_cumprod [T].

  Example:
    >>> a = cosine_schedule(1000).alphas_cumprod
    >>> bool(a[0] > 0.9999), bool(0 < a[-1] < 1e-6)
    (True, True)

  References:
    Nichol, Dhariwal. Improved Denoising Diffusion Probabilistic Models. ICML 2021. https://arxiv.org/abs/2102.09672
  """
  num_train_steps = _check_num_steps("num_train_steps", num_train_steps, 2)
  checks.check_real("s", s, low=0.0)
  u = np.arange(num_train_steps + 1, dtype=np.float64) / num_train_steps
  f = np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
  betas = np.minimum(1.0 - f[1:] / f[:-1], 0.999)
  return _from_alphas_cumprod(np.cumprod(1.0 - betas))


def check_schedule(schedule: NoiseSchedule, *, name: str = "schedule") -> None:
  """Raises a ValueError (naming `name`) unless alphas_cumprod is 1-d, finite, in (0, 1) and strictly decreasing.

  The shape is always checked; values only when the schedule is concrete (not traced). The one
  validator of schedules: sampling, pretraining and the epsilon loss all use it.

  Args:
    schedule: a `NoiseSchedule`.
    name: the argument to name in messages (pretraining passes "alphas_cumprod").

  Example:
    >>> import jax.numpy as jnp
    >>> check_schedule(linear_schedule(10))
    >>> check_schedule(NoiseSchedule(jnp.array([0.9, 0.95])))
    Traceback (most recent call last):
    ...
    ValueError: schedule: alphas_cumprod must be strictly decreasing, but alphas_cumprod[1] = 0.95 >= alphas_cumprod[0] = 0.9
  """
  if not isinstance(schedule, NoiseSchedule):
    raise ValueError(f"{name}: must be a NoiseSchedule, got {type(schedule).__name__}")
  a = jnp.asarray(schedule.alphas_cumprod)
  if a.ndim != 1 or a.shape[0] < 2:
    raise ValueError(f"{name}: alphas_cumprod must be a 1-d array [T] with T >= 2, got shape "
                     f"{tuple(a.shape)}")
  if not checks.is_concrete(a):
    return
  values = np.asarray(a, np.float64)
  if not np.all(np.isfinite(values)):
    raise ValueError(f"{name}: alphas_cumprod contains {int(np.sum(~np.isfinite(values)))} "
                     "NaN or infinite value(s)")
  outside = ~((values > 0) & (values < 1))
  if np.any(outside):
    i = int(np.argmax(outside))
    raise ValueError(f"{name}: alphas_cumprod must lie in (0, 1), but alphas_cumprod[{i}] = "
                     f"{values[i]:.6g}")
  rising = values[1:] >= values[:-1]
  if np.any(rising):
    i = int(np.argmax(rising)) + 1
    raise ValueError(f"{name}: alphas_cumprod must be strictly decreasing, but alphas_cumprod[{i}] "
                     f"= {values[i]:.6g} >= alphas_cumprod[{i - 1}] = {values[i - 1]:.6g}")


def sampling_timesteps(num_train_steps: int, num_sampling_steps: int) -> SamplingTimesteps:
  """DDIM's sub-sequence of S training steps, descending, with leading spacing and offset 1.

  t_i = (S - 1 - i) * (T // S) + 1 and t'_i = t_{i+1}, with t'_{S-1} = 0 (see the module docstring
  for why the chain ends at alphabar_0 and not at clean data).

  Args:
    num_train_steps: T >= 2.
    num_sampling_steps: S in [1, T - 1] (there are T - 1 gaps between T noise levels).

  Returns:
    A `SamplingTimesteps` (timesteps [S], previous [S], int32).

  Example:
    >>> ts = sampling_timesteps(1000, 50)
    >>> ts.timesteps[:3].tolist(), ts.timesteps[-1].item(), ts.previous[-2:].tolist()
    ([981, 961, 941], 1, [1, 0])
  """
  num_train_steps = _check_num_steps("num_train_steps", num_train_steps, 2)
  num_sampling_steps = _check_num_steps("num_sampling_steps", num_sampling_steps, 1,
                                        num_train_steps - 1)
  ratio = num_train_steps // num_sampling_steps
  timesteps = np.arange(num_sampling_steps - 1, -1, -1) * ratio + 1
  previous = np.append(timesteps[1:], 0)
  return SamplingTimesteps(jnp.asarray(timesteps, jnp.int32), jnp.asarray(previous, jnp.int32))


def alphabar(schedule: NoiseSchedule, t: ArrayLike) -> jax.Array:
  """alphabar_t from the schedule, and 1 (clean data) for t < 0.

  Args:
    schedule: a `NoiseSchedule` with alphas_cumprod [T].
    t: integer training steps in [-1, T - 1] (or below -1, also clean data), any shape.

  Returns:
    alphabar_t, with t's shape, in the schedule's dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> s = linear_schedule(1000)
    >>> [round(v, 4) for v in alphabar(s, jnp.array([-1, 0, 999])).tolist()]
    [1.0, 0.9999, 0.0]
  """
  a = jnp.asarray(schedule.alphas_cumprod)
  t = jnp.asarray(t)
  if not jnp.issubdtype(t.dtype, jnp.integer):
    raise ValueError(f"t: must be integer training steps, got dtype {t.dtype}")
  if checks.is_concrete(t) and np.any(np.asarray(t) >= a.shape[0]):
    raise ValueError(f"t: every step must be < T = {a.shape[0]}, got max {int(np.max(np.asarray(t)))}")
  return jnp.where(t >= 0, a[jnp.clip(t, 0, a.shape[0] - 1)], jnp.ones((), a.dtype))
