"""The eager path of the estimators: one fused check with one host transfer, then the compiled kernel.

Counted, never timed: `checks.fetch_flags` is the one device-to-host transfer of a validated call,
and the per-argument host checks (np.asarray per check) run only to build the message of a failure.
"""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax import checks
from saferl_jax.ope import rounds as rounds_lib
from saferl_jax.ope import (beta_ips, beta_ips_bias, dm, dr, dr_os, estimate_all,
                            importance_weights, ips, logged_rounds, sg_dr, sg_ips, snips, sndr,
                            switch_dr, weight_diagnostics)

R = np.array([1.0, 0.0, 0.5, 1.0], np.float32)
A = np.array([0, 2, 1, 1], np.int32)
P = np.array([0.5, 0.25, 0.5, 0.2], np.float32)
T = np.array([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5], [0.1, 0.6, 0.3], [0.25, 0.5, 0.25]], np.float32)
Q = np.array([[0.8, 0.1, 0.3], [0.2, 0.4, 0.6], [0.5, 0.5, 0.1], [0.3, 0.9, 0.0]], np.float32)

CALLS = {
    "ips": lambda r, a, p, t, q: ips(r, a, p, t),
    "ips_clip": lambda r, a, p, t, q: ips(r, a, p, t, clip=2.0),
    "snips": lambda r, a, p, t, q: snips(r, a, p, t),
    "beta_ips": lambda r, a, p, t, q: beta_ips(r, a, p, t),
    "beta_ips_cross_fit": lambda r, a, p, t, q: beta_ips(r, a, p, t, baseline="cross_fit"),
    "beta_ips_fixed": lambda r, a, p, t, q: beta_ips(r, a, p, t, baseline=0.5),
    "dm": lambda r, a, p, t, q: dm(t, q),
    "dr": lambda r, a, p, t, q: dr(r, a, p, t, q),
    "sndr": lambda r, a, p, t, q: sndr(r, a, p, t, q),
    "switch_dr": lambda r, a, p, t, q: switch_dr(r, a, p, t, q, tau=2.0),
    "dr_os": lambda r, a, p, t, q: dr_os(r, a, p, t, q, lambda_=1.0),
    "sg_ips": lambda r, a, p, t, q: sg_ips(r, a, p, t, lambda_=0.5),
    "sg_dr": lambda r, a, p, t, q: sg_dr(r, a, p, t, q, lambda_=0.5),
    "beta_ips_bias": lambda r, a, p, t, q: beta_ips_bias(r, a, p, t),
    # A log of 2 slots, both holding the same distributions; positions are checked in the pass.
    "dr_positions": lambda r, a, p, t, q: dr(r, a, p, jnp.stack([t, t], -1), jnp.stack([q, q], -1),
                                             positions=jnp.arange(4) % 2),
    "estimate_all": lambda r, a, p, t, q: estimate_all(r, a, p, t, q),
    "logged_rounds": lambda r, a, p, t, q: logged_rounds(r, a, p, t, q),
    "importance_weights": lambda r, a, p, t, q: importance_weights(a, p, t),
}


@pytest.fixture
def counted(monkeypatch):
  """Counts host transfers of flags; a per-argument host check (np.asarray per check, run only to
  word a failure) fails the test."""
  calls = []
  original = checks.fetch_flags
  monkeypatch.setattr(checks, "fetch_flags", lambda flags: calls.append(1) or original(flags))

  def refuse(spec, x):
    raise AssertionError(f"the host check of {spec.name} ran on valid input")
  monkeypatch.setattr(checks, "_host_check", refuse)
  return calls


def _fresh():
  """New device arrays each time: arrays that already passed a check are not checked again."""
  return tuple(jnp.asarray(x) for x in (R, A, P, T, Q))


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_valid_eager_call_checks_its_values_with_one_host_transfer(name, counted):
  CALLS[name](*_fresh())
  assert len(counted) == 1


def test_numpy_inputs_are_checked_on_every_call(counted):
  ips(R, A, P, T)
  ips(R, A, P, T)
  assert len(counted) == 2


def test_arrays_that_passed_are_not_checked_again(counted):
  r, a, p, t, q = _fresh()
  ips(r, a, p, t)
  snips(r, a, p, t)  # every check already passed: no transfer at all
  assert len(counted) == 1
  dr(r, a, p, t, q)  # only reward_hat is new
  assert len(counted) == 2
  ips(r, a, p, jnp.asarray(T))  # a new target_dist is checked again
  assert len(counted) == 3


def test_a_second_estimator_reuses_the_weights_and_agrees_with_a_fresh_call():
  # Larger than the toy log, so that reusing the weights could change the estimates' float32
  # rounding if it computed them differently; it must not.
  rng = np.random.default_rng(0)
  n, num_actions = 1000, 5
  t = rng.dirichlet(np.ones(num_actions), n).astype(np.float32)
  arrays = (rng.random(n).astype(np.float32), rng.integers(0, num_actions, n).astype(np.int32),
            rng.uniform(0.05, 1.0, n).astype(np.float32), t,
            rng.random((n, num_actions)).astype(np.float32))
  r, a, p, t, q = (jnp.asarray(x) for x in arrays)
  inputs = rounds_lib.prepare_inputs(r, a, p, t, q)
  assert rounds_lib.known_weights(inputs) is None
  ips(r, a, p, t)
  assert rounds_lib.known_weights(inputs) is not None
  for call in (snips, lambda *x: dr(*x, q), lambda *x: sndr(*x, q), lambda *x: switch_dr(*x, q, tau=3.0)):
    reused = call(r, a, p, t)
    fresh = call(*(jnp.asarray(x) for x in arrays[:4]))  # new arrays: weights computed afresh
    for got, want in zip(reused, fresh):
      np.testing.assert_array_equal(got, want)


def test_remembered_weights_are_dropped_with_their_arrays_and_never_kept_for_numpy():
  r, a, p, t, q = _fresh()
  before = len(rounds_lib._WEIGHTS)
  ips(r, a, p, t)
  assert len(rounds_lib._WEIGHTS) == before + 1
  del t  # one of the arrays the weights came from is collected: the entry goes with it
  gc.collect()
  assert len(rounds_lib._WEIGHTS) == before
  ips(R, A, P, T)  # numpy inputs are converted afresh by every call: nothing to key on
  assert len(rounds_lib._WEIGHTS) == before


def test_remembered_weights_do_not_skip_the_checks_of_a_new_argument():
  r, a, p, t, q = _fresh()
  ips(r, a, p, t)
  with pytest.raises(ValueError, match="^rewards"):
    snips(jnp.asarray(R).at[0].set(jnp.nan), a, p, t)
  with pytest.raises(ValueError, match="^reward_hat"):
    dr(r, a, p, t, jnp.asarray(Q).at[0, 0].set(jnp.inf))
  # Under jax.jit nothing is remembered or reused: the traced call computes its own weights (the
  # same float32 operations in another program, so equal to a few ulps).
  kept = len(rounds_lib._WEIGHTS)
  traced = jax.jit(lambda t: snips(r, a, p, t).value)(t * 0.5 + 0.5 / 3)
  assert len(rounds_lib._WEIGHTS) == kept
  np.testing.assert_allclose(traced, snips(r, a, p, jnp.asarray(T) * 0.5 + 0.5 / 3).value, rtol=1e-6)


def test_a_failed_check_is_not_remembered():
  r, a, p, t, q = _fresh()
  bad = jnp.asarray(P).at[1].set(0.0)
  for _ in range(2):
    with pytest.raises(ValueError, match="^logging_probs: every propensity must be in"):
      ips(r, a, bad, t)


def test_weight_diagnostics_one_transfer(counted):
  weight_diagnostics(jnp.array([0.5, 2.0, 1.0]))
  assert len(counted) == 1


@pytest.mark.parametrize("argument,change,message", [
    ("rewards", lambda d: d | {"r": d["r"].at[2].set(jnp.nan)},
     "rewards: contains 1 NaN or infinite value(s)"),
    ("logging_probs", lambda d: d | {"p": d["p"].at[1].set(1.5)},
     "logging_probs: every propensity must be in (0, 1], found 1 outside (e.g. 1.5)"),
    ("actions", lambda d: d | {"a": d["a"].at[0].set(3)},
     "actions: every action must be in [0, 3), found 1 outside (e.g. 3)"),
    ("target_dist", lambda d: d | {"t": d["t"] * 0.9},
     "target_dist: rows must sum to 1, row 0 sums to 0.9 (4 bad rows)"),
    ("target_dist", lambda d: d | {"t": d["t"].at[1, 1].set(jnp.inf)},
     "target_dist: probabilities must be finite and >= 0"),
    ("reward_hat", lambda d: d | {"q": d["q"].at[0, 0].set(-jnp.inf)},
     "reward_hat: contains 1 NaN or infinite value(s)"),
])
def test_failures_keep_their_messages(argument, change, message):
  data = change(dict(zip("raptq", _fresh())))
  with pytest.raises(ValueError) as info:
    dr(data["r"], data["a"], data["p"], data["t"], data["q"])
  assert str(info.value) == message


def test_a_bad_position_fails_the_fused_check():
  r, a, p, t, q = _fresh()
  with pytest.raises(ValueError) as info:
    dr(r, a, p, jnp.stack([t, t], -1), jnp.stack([q, q], -1), positions=jnp.array([0, 1, 2, 0]))
  assert str(info.value) == "positions: every position must be in [0, 2), found 1 outside (e.g. 2)"


def test_the_first_bad_argument_is_reported_in_the_old_order():
  r, a, p, t, q = _fresh()
  with pytest.raises(ValueError, match="^rewards"):  # rewards before logging_probs
    dr(r.at[0].set(jnp.nan), a, p.at[0].set(0.0), t, q)
  with pytest.raises(ValueError, match="^target_dist"):  # target_dist before reward_hat
    dr(r, a, p, t * 2, q.at[0, 0].set(jnp.nan))


@pytest.mark.slow
def test_eager_equals_the_jitted_kernel_traced_inside_jax_jit():
  data = _fresh()
  for name, call in CALLS.items():
    eager, jitted = call(*data), jax.jit(call)(*data)
    for x, y in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7, err_msg=name)


def test_concrete_data_captured_by_an_outer_jit_is_still_checked():
  r, a, p, t, _ = _fresh()
  bad = jnp.asarray(P).at[1].set(0.0)
  with pytest.raises(ValueError, match="logging_probs"):
    jax.jit(lambda: ips(r, a, bad, t).value)()
  np.testing.assert_allclose(jax.jit(lambda: ips(r, a, p, t).value)(), ips(r, a, p, t).value,
                             rtol=1e-6)


def test_traced_options_reuse_the_concrete_checks():
  r, a, p, t, _ = _fresh()
  values = jax.vmap(lambda c: ips(r, a, p, t, clip=c).value)(jnp.array([1.0, 2.0, 100.0]))
  expected = [float(ips(r, a, p, t, clip=c).value) for c in (1.0, 2.0, 100.0)]
  np.testing.assert_allclose(values, expected, rtol=1e-6)
  with pytest.raises(ValueError, match="logging_probs"):
    jax.vmap(lambda c: ips(r, a, jnp.asarray(P).at[0].set(2.0), t, clip=c).value)(jnp.ones(2))


def _summing_to_one_with_a_negative(t):
  """t [n, ..., A] with its last row(s) set to [1.2, -0.2, 0, ...]: every sum stays 1, so only the
  min >= 0 part of the check catches the negative entry."""
  t = np.array(t, np.float32)
  t[-1] = 0.0
  t[-1, ..., 0], t[-1, ..., 1] = 1.2, -0.2
  return t


def _flag_agrees_with_host_check(spec: checks.ValueCheck, x) -> bool:
  """The fused flag of one check says bad exactly when its host check raises."""
  flag = bool(np.asarray(checks.value_flags((spec,), (x,)))[0])
  try:
    checks._host_check(spec, x)
    host_bad = False
  except ValueError:
    host_bad = True
  return flag == host_bad


def test_the_fused_flags_agree_with_the_host_checks_at_the_edges():
  for kind in ("finite", "probability", "nonnegative"):
    for values in ([0.5, 1.0], [1e-30, 1.0], [0.0, 0.5], [-0.0, 0.5], [1.0000001, 0.5],
                   [np.nan, 0.5], [np.inf, 0.5], [-np.inf, 0.5], [-1e-30, 0.5]):
      assert _flag_agrees_with_host_check(checks.ValueCheck("x", kind),
                                          jnp.asarray(values, jnp.float32)), (kind, values)
  rows = checks.ValueCheck("t", "distribution_rows")
  for t in (T, T * 0.9, np.where(T == 0.1, -0.1, T), np.where(T == 0.1, np.nan, T),
            np.where(T == 0.1, np.inf, T), T + 5e-5 / 3, _summing_to_one_with_a_negative(T)):
    assert _flag_agrees_with_host_check(rows, jnp.asarray(t, jnp.float32)), t
  slots = checks.ValueCheck("t", "distribution_slots")
  slotted = np.stack([T, T[::-1]], axis=-1)  # [n, A, L = 2]
  for t in (slotted, np.where(slotted == 0.1, -0.1, slotted), slotted * [1.0, 0.9],
            _summing_to_one_with_a_negative(slotted.transpose(0, 2, 1)).transpose(0, 2, 1),
            np.where(slotted == 0.6, np.nan, slotted)):
    assert _flag_agrees_with_host_check(slots, jnp.asarray(t, jnp.float32)), t


@pytest.mark.parametrize("size", [3, 2**24, 2**24 + 1, 2**31 - 1])
def test_the_fused_index_flag_agrees_with_the_host_check(size):
  # size <= 2^24 takes the float32 path of the fused check, larger sizes the integer one.
  spec = checks.ValueCheck("a", "index", size, "action")
  for values in ([0, size - 1], [0, size], [-1, 0], [-(2**31), 0], [2**31 - 1, 0],
                 [size - 2, size - 1], [size + 1, 0], [2**24 - 1, 0], [2**24 + 1, 0]):
    x = jnp.asarray(np.array(values, np.int64).clip(-(2**31), 2**31 - 1), jnp.int32)
    assert _flag_agrees_with_host_check(spec, x), (size, values)
