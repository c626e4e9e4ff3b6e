"""Noise schedules against their closed forms (DDPM, Nichol & Dhariwal), the DDIM timestep
sub-sequence against diffusers' leading spacing with steps_offset=1, and input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax.diffusion.schedules import (NoiseSchedule, alphabar, check_schedule, cosine_schedule,
                                            linear_schedule, sampling_timesteps)


def test_linear_schedule_closed_form():
  a = np.asarray(linear_schedule(1000).alphas_cumprod, np.float64)
  betas = 1e-4 + (0.02 - 1e-4) * np.arange(1000) / 999
  expected = np.exp(np.cumsum(np.log1p(-betas)))
  np.testing.assert_allclose(a, expected, rtol=1e-5)
  # Values often quoted for DDPM's schedule.
  assert abs(a[0] - 0.9999) < 1e-7
  assert 3e-5 < a[-1] < 5e-5
  check_schedule(linear_schedule(1000))


def test_cosine_schedule_closed_form():
  T, s = 1000, 0.008
  a = np.asarray(cosine_schedule(T, s=s).alphas_cumprod, np.float64)
  f = lambda u: np.cos((u / T + s) / (1 + s) * np.pi / 2) ** 2
  t = np.arange(T)
  # Where no beta was clipped, alphabar_t = f(t + 1) / f(0) exactly; only the last step is clipped.
  np.testing.assert_allclose(a[:-1], f(t[:-1] + 1) / f(0), rtol=2e-5, atol=1e-9)
  assert 1 - f(T) / f(T - 1) > 0.999  # the unclipped last beta would be ~1
  np.testing.assert_allclose(a[-1], a[-2] * (1 - 0.999), rtol=1e-5)
  check_schedule(cosine_schedule(T))
  check_schedule(cosine_schedule(50))


def test_schedules_are_strictly_decreasing_in_float32():
  for schedule in (linear_schedule(4000), cosine_schedule(4000), linear_schedule(2)):
    a = np.asarray(schedule.alphas_cumprod)
    assert a.dtype == np.float32
    assert np.all(np.diff(a) < 0) and np.all((a > 0) & (a < 1))


def test_sampling_timesteps_leading_with_offset():
  ts = sampling_timesteps(1000, 50)
  assert ts.timesteps.dtype == jnp.int32 and ts.previous.dtype == jnp.int32
  np.testing.assert_array_equal(ts.timesteps, np.arange(981, 0, -20))
  np.testing.assert_array_equal(ts.previous, np.append(np.arange(961, 0, -20), 0))
  # diffusers' DDIMScheduler(steps_offset=1).set_timesteps(10) on T = 1000: 901, 801, ..., 1.
  np.testing.assert_array_equal(sampling_timesteps(1000, 10).timesteps, np.arange(901, 0, -100))
  # Every S up to T - 1 gives a valid strictly descending chain ending at level 0.
  for T, S in [(10, 9), (10, 6), (10, 1), (7, 3), (1000, 999), (1000, 333)]:
    t, prev = (np.asarray(v) for v in sampling_timesteps(T, S))
    assert t.shape == (S,) and t.max() <= T - 1 and t[-1] == 1
    assert np.all(prev < t) and prev[-1] == 0 and np.all(prev[:-1] == t[1:])


@pytest.mark.slow
def test_alphabar_lookup_and_clean_data():
  s = linear_schedule(100)
  t = jnp.array([[-1, 0], [50, 99]])
  out = alphabar(s, t)
  assert out.shape == (2, 2)
  np.testing.assert_allclose(out, [[1.0, s.alphas_cumprod[0]], [s.alphas_cumprod[50], s.alphas_cumprod[99]]])
  jitted = jax.jit(alphabar)(s, t)
  np.testing.assert_array_equal(jitted, out)
  np.testing.assert_array_equal(jax.vmap(alphabar, (None, 0))(s, t), out)


@pytest.mark.parametrize("values, match", [
    (np.array([0.9, 0.95, 0.5]), "strictly decreasing"),
    (np.array([0.9, 0.9, 0.5]), "strictly decreasing"),
    (np.array([1.0, 0.5]), r"\(0, 1\)"),
    (np.array([0.9, 0.0]), r"\(0, 1\)"),
    (np.array([0.9, np.nan]), "NaN"),
    (np.ones((2, 2)) * 0.5, "1-d"),
    (np.array([0.5]), "T >= 2"),
])
def test_check_schedule_rejects(values, match):
  with pytest.raises(ValueError, match="^schedule: .*" + match):
    check_schedule(NoiseSchedule(jnp.asarray(values, jnp.float32)))


def test_bad_arguments():
  with pytest.raises(ValueError, match="^schedule:"):
    check_schedule(jnp.array([0.9, 0.5]))
  with pytest.raises(ValueError, match="^num_sampling_steps:"):
    sampling_timesteps(1000, 1000)
  with pytest.raises(ValueError, match="^num_sampling_steps:"):
    sampling_timesteps(1000, 0)
  with pytest.raises(ValueError, match="^num_train_steps:"):
    sampling_timesteps(1, 1)
  with pytest.raises(ValueError, match="^num_train_steps:"):
    linear_schedule(10.0)
  with pytest.raises(ValueError, match="^beta_end:"):
    linear_schedule(10, beta_start=0.1, beta_end=0.01)
  with pytest.raises(ValueError, match="^beta_start:"):
    linear_schedule(10, beta_start=0.0)
  with pytest.raises(ValueError, match="^s:"):
    cosine_schedule(10, s=-0.1)
  with pytest.raises(ValueError, match="^t:"):
    alphabar(linear_schedule(10), 10)
  with pytest.raises(ValueError, match="^t:"):
    alphabar(linear_schedule(10), 1.0)
