"""Tests for saferl_jax.ope.tuning: SLOPE, the estimated-MSE rule, the grid vmap, OBP agreement."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax.ope import FROM_ROUNDS, logged_rounds
from saferl_jax.ope.tuning import (TUNABLE, estimated_mse, slope_selection, tune,
                                   tune_from_rounds)

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
C = math.sqrt(6) - 1


def slope_reference(values, widths):
  """SLOPE as a plain loop (OBP's, with ties in width kept in grid order)."""
  order = sorted(range(len(values)), key=lambda i: -widths[i])  # sorted() is stable
  accepted = []
  for i in order:
    if all(abs(values[i] - values[j]) <= widths[i] + C * widths[j] for j in accepted):
      accepted.append(i)
    else:
      break
  return accepted[-1], sorted(accepted)


def small_log(key, n=200, num_actions=4, heavy=False):
  k1, k2, k3, k4 = jax.random.split(key, 4)
  logits = jax.random.normal(k1, (n, num_actions)) * (4.0 if heavy else 1.0)
  logging = jax.nn.softmax(logits)
  actions = jax.random.categorical(k2, logits)
  probs = logging[jnp.arange(n), actions]
  target = jax.nn.softmax(jax.random.normal(k3, (n, num_actions)))
  rewards = jax.random.bernoulli(k4, 0.3 + 0.1 * actions / num_actions).astype(jnp.float32)
  reward_hat = jnp.full((n, num_actions), 0.35)
  return rewards, actions, probs, target, reward_hat


# SLOPE's selection rule.


def test_slope_on_hand_made_estimates():
  # Widths 0.5 > 0.2 > 0.01: 1.1 is within 0.2 + C 0.5 of 1.0; 2.0 is far from both.
  sel = slope_selection(jnp.array([1.0, 1.1, 2.0]), jnp.array([0.5, 0.2, 0.01]))
  assert int(sel.index) == 1 and sel.accepted.tolist() == [True, True, False]
  # All compatible: the narrowest is chosen.
  sel = slope_selection(jnp.array([1.0, 1.05, 1.06]), jnp.array([0.5, 0.2, 0.1]))
  assert int(sel.index) == 2 and sel.accepted.all()
  # The first (widest) candidate is always accepted, whatever follows.
  sel = slope_selection(jnp.array([0.0, 10.0, 10.0]), jnp.array([1.0, 0.1, 0.01]))
  assert int(sel.index) == 0 and sel.accepted.tolist() == [True, False, False]
  # Order is by width, not grid position; acceptance stops at the first failure even if a
  # later candidate would pass (index 3 is compatible with 0 and 2 but comes after 1).
  values = jnp.array([1.0, 5.0, 1.1, 1.05])
  widths = jnp.array([0.5, 0.3, 0.6, 0.1])
  sel = slope_selection(values, widths)
  assert int(sel.index) == 0 and sel.accepted.tolist() == [True, False, True, False]


def test_slope_boundary_uses_the_sqrt6_constant():
  # |V_1 - V_0| = c_1 + (sqrt(6) - 1) c_0 exactly passes; a hair more fails.
  gap = 0.25 + C * 1.0
  assert int(slope_selection(jnp.array([0.0, gap - 1e-6]), jnp.array([1.0, 0.25])).index) == 1
  assert int(slope_selection(jnp.array([0.0, gap + 1e-5]), jnp.array([1.0, 0.25])).index) == 0


def test_slope_matches_a_python_loop_on_random_candidates():
  rng = np.random.default_rng(0)
  for trial in range(300):
    size = int(rng.integers(1, 9))
    widths = np.round(rng.exponential(1.0, size), 1) + 0.01  # rounding makes ties
    values = rng.normal(0.0, 1.0, size) * rng.choice([0.1, 1.0, 3.0])
    index, accepted = slope_reference(values.tolist(), widths.tolist())
    sel = slope_selection(values, widths)
    assert int(sel.index) == index, (trial, values, widths)
    assert np.flatnonzero(np.asarray(sel.accepted)).tolist() == accepted


def test_slope_under_jit_and_vmap_equals_a_loop():
  rng = np.random.default_rng(1)
  values = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
  widths = jnp.asarray(rng.exponential(size=(16, 6)), jnp.float32)
  batched = jax.jit(jax.vmap(slope_selection))(values, widths)
  for b in range(16):
    assert int(batched.index[b]) == slope_reference(values[b].tolist(), widths[b].tolist())[0]


# The estimated-MSE rule.


def test_estimated_mse_by_hand():
  scores = estimated_mse(jnp.array([0.5, 0.7, 0.75]), jnp.array([0.1, 0.2, 0.4]), 0.75, slack=0.05)
  np.testing.assert_allclose(scores, [0.3**2 + 0.01, 0.1**2 + 0.04, 0.05**2 + 0.16], rtol=1e-6)


@pytest.mark.slow
def test_mse_selection_against_a_hand_computation():
  rewards, actions, probs, target, _ = small_log(jax.random.key(2), n=300, heavy=True)
  grid = np.array([0.5, 1.0, 2.0, 4.0, 8.0, np.inf])
  rounds = logged_rounds(rewards, actions, probs, target)
  w, r = np.asarray(rounds.weights, np.float64), np.asarray(rewards, np.float64)
  n, delta = len(r), 0.05
  for bias_bound in (False, True):
    tuned = tune(rewards, actions, probs, target, estimator="ips", grid=grid, method="mse",
                 bias_bound=bias_bound, delta=delta)
    per = np.minimum(w[None, :], grid[:, None]) * r  # [G, n]
    values, stderrs = per.mean(1), per.std(1, ddof=1) / np.sqrt(n)
    slack = (np.sqrt(2 * np.mean(w**2) * np.log(2 / delta) / n)
             + 2 * w.max() * np.log(2 / delta) / (3 * n)) if bias_bound else 0.0
    scores = (np.abs(values - (w * r).mean()) + slack)**2 + stderrs**2
    np.testing.assert_allclose(tuned.values, values, rtol=1e-5)
    np.testing.assert_allclose(tuned.scores, scores, rtol=1e-4)
    assert int(tuned.index) == int(np.argmin(scores))
    assert tuned.accepted.tolist() == [i == int(np.argmin(scores)) for i in range(len(grid))]
    assert float(tuned.best) == grid[int(np.argmin(scores))]
    np.testing.assert_allclose(tuned.estimate.value, values[int(tuned.index)], rtol=1e-5)


@pytest.mark.slow
def test_slope_in_tune_uses_width_scale_times_stderr():
  args = small_log(jax.random.key(3), heavy=True)
  grid = jnp.array([0.5, 1.0, 2.0, 5.0, jnp.inf])
  for scale in (1.0, 1.645, 3.0):
    tuned = tune(*args, estimator="dr", grid=grid, width_scale=scale)
    np.testing.assert_allclose(tuned.scores, scale * tuned.stderrs, rtol=1e-6)
    index, accepted = slope_reference(tuned.values.tolist(), tuned.scores.tolist())
    assert int(tuned.index) == index
    assert np.flatnonzero(np.asarray(tuned.accepted)).tolist() == accepted


# The grid: vmapped evaluation, defaults, checks.


@pytest.mark.slow
@pytest.mark.parametrize("estimator", sorted(TUNABLE))
def test_the_vmap_over_the_grid_equals_calling_the_estimator_per_value(estimator):
  if estimator not in FROM_ROUNDS:
    pytest.skip(f"{estimator} is not in ope.FROM_ROUNDS in this version")
  rounds = logged_rounds(*small_log(jax.random.key(4)))
  tunable = TUNABLE[estimator]
  grid = ([0.0, 0.1, 0.5, 1.0] if tunable.high == 1.0 else [0.5, 1.0, 3.0, np.inf])
  for method in ("slope", "mse"):
    tuned = tune_from_rounds(rounds, estimator=estimator, grid=grid, method=method)
    for h, value, stderr in zip(grid, tuned.values, tuned.stderrs):
      single = FROM_ROUNDS[estimator](rounds, **{tunable.option: h})
      np.testing.assert_allclose(value, single.value, rtol=1e-5, atol=1e-7)
      np.testing.assert_allclose(stderr, single.stderr, rtol=1e-5, atol=1e-7)
    chosen = FROM_ROUNDS[estimator](rounds, **{tunable.option: grid[int(tuned.index)]})
    np.testing.assert_allclose(tuned.estimate.per_sample, chosen.per_sample, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(tuned.estimate.value, tuned.estimate.per_sample.mean(), rtol=1e-5)
    assert float(tuned.best) == pytest.approx(grid[int(tuned.index)])


@pytest.mark.slow
@pytest.mark.parametrize("estimator", sorted(TUNABLE))
def test_default_grid_is_valid_and_ends_unbiased(estimator):
  if estimator not in FROM_ROUNDS:
    pytest.skip(f"{estimator} is not in ope.FROM_ROUNDS in this version")
  rounds = logged_rounds(*small_log(jax.random.key(5), heavy=True))
  tuned = tune_from_rounds(rounds, estimator=estimator, method="mse")
  grid = np.asarray(tuned.grid)
  tunable = TUNABLE[estimator]
  assert grid.shape == (11,)
  assert np.all(grid > tunable.low if tunable.low_open else grid >= tunable.low)
  assert np.all(grid <= tunable.high)
  assert grid[-1] == float(tunable.from_cap(jnp.inf))  # inf for clip/tau/dr_os, 0 for sg
  unbiased = FROM_ROUNDS[estimator](rounds, **{tunable.option: grid[-1]}).value
  np.testing.assert_allclose(tuned.values[-1], unbiased, rtol=1e-6)
  # The caps are increasing quantiles of the positive weights, so the options are monotone
  # (increasing for clip, tau and dr_os's lambda_, decreasing for the SubGaussian lambda_).
  assert np.all(np.diff(grid) >= 0) or np.all(np.diff(grid) <= 0)


@pytest.mark.slow
def test_jit_equals_eager_and_vmap_over_logs_equals_a_loop():
  keys = jax.random.split(jax.random.key(6), 4)
  logs = jax.vmap(lambda k: small_log(k, n=100, heavy=True))(keys)
  grid = jnp.array([0.5, 1.0, 2.0, 5.0, jnp.inf])
  run = lambda *log: tune(*log, estimator="dr", grid=grid, method="slope")
  batched = jax.vmap(run)(*logs)
  jitted = jax.jit(run)
  for b in range(4):
    log = [x[b] for x in logs]
    eager = run(*log)
    for field in ("index", "values", "stderrs", "scores", "accepted"):
      np.testing.assert_allclose(getattr(batched, field)[b], getattr(eager, field), rtol=1e-5)
      np.testing.assert_allclose(getattr(jitted(*log), field), getattr(eager, field), rtol=1e-5)


@pytest.mark.slow
def test_extreme_weights_stay_finite():
  rewards, actions, probs, target, reward_hat = small_log(jax.random.key(7), n=50)
  probs = probs.at[3].set(1e-20)  # w near 1e20: squares overflow float32
  for method in ("slope", "mse"):
    tuned = tune(rewards, actions, probs, target, reward_hat, estimator="dr",
                 grid=jnp.array([1.0, 10.0, jnp.inf]), method=method)
    assert 0 <= int(tuned.index) < 3
    assert np.isfinite(float(tuned.estimate.value)) and np.all(np.isfinite(tuned.stderrs))
    assert np.all(np.isfinite(tuned.values)) and not np.any(np.isnan(tuned.scores))


def test_bad_inputs_are_refused_by_name():
  args = small_log(jax.random.key(8), n=20)
  with pytest.raises(ValueError, match="estimator"):
    tune(*args, estimator="snips")
  with pytest.raises(ValueError, match="method"):
    tune(*args, estimator="dr", method="lepski")
  with pytest.raises(ValueError, match="grid.*clip"):
    tune(*args, estimator="ips", grid=[0.0, 1.0])  # clip must be > 0
  with pytest.raises(ValueError, match="grid"):
    tune(*args, estimator="ips", grid=[np.nan, 1.0])
  with pytest.raises(ValueError, match="grid"):
    tune(*args, estimator="ips", grid=[])
  with pytest.raises(ValueError, match="grid"):
    tune(*args, estimator="dr_os", grid=[-1.0])
  # lambda_ of the SubGaussian estimators lies in [0, 1] (before they land: a clear refusal).
  with pytest.raises(ValueError, match="grid.*lambda_" if "sg_ips" in FROM_ROUNDS else "sg_ips"):
    tune(*args, estimator="sg_ips", grid=[0.5, 1.5])
  with pytest.raises(ValueError, match="reward_hat"):
    tune(*args[:4], estimator="dr")
  with pytest.raises(ValueError, match="delta"):
    tune(*args, estimator="dr", method="mse", delta=1.5)
  with pytest.raises(ValueError, match="width_scale"):
    tune(*args, estimator="dr", width_scale=0.0)
  with pytest.raises(TypeError, match="bias_bound"):
    tune(*args, estimator="dr", bias_bound="yes")
  with pytest.raises(TypeError, match="rounds"):
    tune_from_rounds(args, estimator="dr")
  with pytest.raises(ValueError, match="rounds"):
    tune_from_rounds(logged_rounds(*[x[:1] for x in args]), estimator="dr")


# Agreement with Open Bandit Pipeline 0.5.7's *Tuning estimators on the shipped OBD sample.


@pytest.fixture(scope="module")
def obp_tuning():
  arrays = np.load(FIXTURES / "obp_obd_bts.npz")
  reference = json.loads((FIXTURES / "obp_tuning.json").read_text())
  i = np.arange(len(arrays["actions"]))
  group, pos = i % 7, arrays["positions"]
  data = (arrays["rewards"], arrays["actions"], arrays["pscores"],
          arrays["target_softmax_table"][group, :, pos], arrays["reward_hat_table"][group, :, pos])
  return data, reference


@pytest.mark.slow
def test_agrees_with_open_bandit_pipeline_tuning(obp_tuning):
  data, reference = obp_tuning
  checked = 0
  with jax.enable_x64(True):
    rounds = logged_rounds(*data)
    for case in reference["cases"]:
      name = case["estimator"]
      if name not in FROM_ROUNDS:
        continue
      grid = np.asarray(reference["grids"][name], np.float64)
      tuned = tune_from_rounds(rounds, estimator=name, grid=grid, method=case["method"],
                               bias_bound=case["bias_bound"], delta=reference["delta"],
                               width_scale=reference["slope_width_scale"])
      label = f"{name} {case['method']} bias_bound={case['bias_bound']}"
      # OBP breaks ties in its own sorted order, so compare the estimate, and the chosen value
      # wherever it is not tied with another candidate giving the same estimate.
      np.testing.assert_allclose(float(tuned.estimate.value), case["value"], rtol=1e-9,
                                 atol=1e-12, err_msg=label)
      obp_index = int(np.flatnonzero(grid == case["best"])[0])
      np.testing.assert_allclose(tuned.values[obp_index], tuned.estimate.value, rtol=1e-12,
                                 err_msg=label)
      if "scores" in case:  # OBP's variance is ddof 0, stderr^2 here is ddof 1: n / (n - 1)
        np.testing.assert_allclose(tuned.scores, case["scores"], rtol=1.5e-4, err_msg=label)
      checked += 1
  assert checked >= 12
