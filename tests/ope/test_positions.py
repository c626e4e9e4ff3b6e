"""Positions (Open Bandit Pipeline's convention): target_dist and reward_hat [n, A, L] with
positions [n], round i using slot positions[i]. Every estimator on the slots equals the same
estimator on the selected [n, A] slice; jit, vmap, bad inputs; agreement with OBP 0.5.7's values
computed with positions on the shipped OBD sample."""

import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax import checks, ope

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"

# 6 rounds, 3 actions, 2 slots; every slot of every round is a distribution.
N, A, L = 6, 3, 2
_RNG = np.random.default_rng(7)
R = _RNG.binomial(1, 0.5, N).astype(np.float32)
ACTIONS = _RNG.integers(0, A, N).astype(np.int32)
P = _RNG.uniform(0.1, 1.0, N).astype(np.float32)
T = np.moveaxis(_RNG.dirichlet(np.ones(A), (N, L)), -1, 1).astype(np.float32)  # [N, A, L]
Q = _RNG.uniform(0, 1, (N, A, L)).astype(np.float32)
POS = np.array([0, 1, 1, 0, 1, 0], np.int32)


def selected(x, positions=POS):
  """x[i, :, positions[i]], the [n, A] slice that round i uses."""
  return np.asarray(x)[np.arange(len(positions)), :, positions]


# name -> f(r, a, p, t, q, positions) with positions=None for [n, A] inputs.
CALLS = {
    "ips": lambda r, a, p, t, q, pos: ope.ips(r, a, p, t, positions=pos),
    "ips_clip": lambda r, a, p, t, q, pos: ope.ips(r, a, p, t, clip=1.5, positions=pos),
    "snips": lambda r, a, p, t, q, pos: ope.snips(r, a, p, t, positions=pos),
    "dm": lambda r, a, p, t, q, pos: ope.dm(t, q, positions=pos),
    "dr": lambda r, a, p, t, q, pos: ope.dr(r, a, p, t, q, positions=pos),
    "dr_clip": lambda r, a, p, t, q, pos: ope.dr(r, a, p, t, q, clip=1.5, positions=pos),
    "sndr": lambda r, a, p, t, q, pos: ope.sndr(r, a, p, t, q, positions=pos),
    "switch_dr": lambda r, a, p, t, q, pos: ope.switch_dr(r, a, p, t, q, tau=2.0, positions=pos),
    "dr_os": lambda r, a, p, t, q, pos: ope.dr_os(r, a, p, t, q, lambda_=3.0, positions=pos),
    "sg_ips": lambda r, a, p, t, q, pos: ope.sg_ips(r, a, p, t, lambda_=0.3, positions=pos),
    "sg_dr": lambda r, a, p, t, q, pos: ope.sg_dr(r, a, p, t, q, lambda_=0.3, positions=pos),
    "beta_ips": lambda r, a, p, t, q, pos: ope.beta_ips(r, a, p, t, positions=pos),
    "beta_ips_cross_fit": lambda r, a, p, t, q, pos: ope.beta_ips(r, a, p, t, baseline="cross_fit",
                                                                  positions=pos),
    "beta_ips_fixed": lambda r, a, p, t, q, pos: ope.beta_ips(r, a, p, t, baseline=0.4,
                                                              positions=pos),
    "beta_ips_bias": lambda r, a, p, t, q, pos: ope.beta_ips_bias(r, a, p, t, positions=pos),
    "estimate_all": lambda r, a, p, t, q, pos: ope.estimate_all(
        r, a, p, t, q, estimators=tuple(ope.FROM_ROUNDS),
        options={"switch_dr": {"tau": 2.0}, "dr_os": {"lambda_": 3.0}, "sg_ips": {"lambda_": 0.3},
                 "sg_dr": {"lambda_": 0.3}}, positions=pos),
    "logged_rounds": lambda r, a, p, t, q, pos: ope.logged_rounds(r, a, p, t, q, positions=pos),
    "importance_weights": lambda r, a, p, t, q, pos: ope.importance_weights(a, p, t, positions=pos),
}


def assert_trees_close(x, y, **tolerance):
  for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
    np.testing.assert_allclose(u, v, **tolerance)


@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.slow
def test_slots_with_positions_equal_the_selected_slice(name):
  with_slots = CALLS[name](R, ACTIONS, P, T, Q, POS)
  on_slice = CALLS[name](R, ACTIONS, P, selected(T), selected(Q), None)
  assert_trees_close(with_slots, on_slice, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_each_round_reads_only_its_own_slot():
  # Changing the slots that no round uses changes nothing (they stay distributions).
  other = np.where(np.arange(L)[None, None, :] == POS[:, None, None], T, T[:, ::-1, :])
  other_q = np.where(np.arange(L)[None, None, :] == POS[:, None, None], Q, -Q)
  for name in ("dr", "sg_dr", "beta_ips"):
    assert_trees_close(CALLS[name](R, ACTIONS, P, other, other_q, POS),
                       CALLS[name](R, ACTIONS, P, T, Q, POS), rtol=1e-6, atol=1e-7)
  # And the weights are the logged action's probability at the logged slot, by hand.
  expected = T[np.arange(N), ACTIONS, POS] / P
  np.testing.assert_allclose(ope.importance_weights(ACTIONS, P, T, positions=POS), expected,
                             rtol=1e-6)


@pytest.mark.slow
def test_a_single_slot_equals_no_positions():
  for name in ("ips", "dr", "sndr", "sg_dr"):
    assert_trees_close(CALLS[name](R, ACTIONS, P, T[:, :, :1], Q[:, :, :1], np.zeros(N, np.int32)),
                       CALLS[name](R, ACTIONS, P, T[:, :, 0], Q[:, :, 0], None), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_jit_equals_eager_with_positions(name):
  f = CALLS[name]
  eager = f(R, ACTIONS, P, T, Q, POS)
  jitted = jax.jit(f)(R, ACTIONS, P, T, Q, POS)
  assert_trees_close(eager, jitted, rtol=1e-6, atol=1e-7)


def _batch(seed, batch=3):
  rng = np.random.default_rng(seed)
  return (rng.binomial(1, 0.5, (batch, N)).astype(np.float32),
          rng.integers(0, A, (batch, N)).astype(np.int32),
          rng.uniform(0.1, 1.0, (batch, N)).astype(np.float32),
          np.moveaxis(rng.dirichlet(np.ones(A), (batch, N, L)), -1, 2).astype(np.float32),
          rng.uniform(0, 1, (batch, N, A, L)).astype(np.float32),
          rng.integers(0, L, (batch, N)).astype(np.int32))


@pytest.mark.parametrize("name", ["ips", "dr", "sndr", "sg_ips", "sg_dr", "beta_ips",
                                  "beta_ips_bias", "logged_rounds"])
def test_vmap_equals_a_loop_with_positions(name):
  data = _batch(1)
  batched = jax.vmap(CALLS[name])(*data)
  for b in range(3):
    single = CALLS[name](*(x[b] for x in data))
    assert_trees_close(jax.tree.map(lambda x: x[b], batched), single, rtol=1e-5, atol=1e-6)


def test_positions_extreme_propensities_stay_finite():
  p = np.full(N, 1e-8, np.float32)
  for name in ("ips", "snips", "dr", "sndr", "sg_ips", "sg_dr", "beta_ips", "beta_ips_bias"):
    out = CALLS[name](R, ACTIONS, p, T, Q, POS)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(out)), name


def test_one_fused_check_with_positions(monkeypatch):
  calls = []
  original = checks.fetch_flags
  monkeypatch.setattr(checks, "fetch_flags", lambda flags: calls.append(1) or original(flags))
  data = [jnp.asarray(x) for x in (R, ACTIONS, P, T, Q, POS)]
  ope.dr(*data[:5], positions=data[5])
  assert len(calls) == 1
  ope.sndr(*data[:5], positions=data[5])  # every array already passed: no transfer
  assert len(calls) == 1


# Bad inputs name the argument.

BAD = [
    ("positions", dict(pos=None), "needed with a \\[n, A, L\\] target_dist"),
    ("positions", dict(t=selected(T), q=selected(Q)), "given, but target_dist is \\[n, A\\]"),
    ("positions", dict(pos=np.where(np.arange(N) == 2, L, POS)),
     "every position must be in \\[0, 2\\), found 1 outside \\(e.g. 2\\)"),
    ("positions", dict(pos=np.where(np.arange(N) == 2, -1, POS)), "every position must be in"),
    ("positions", dict(pos=POS[:4]), "has 4 rounds"),
    ("positions", dict(pos=POS.astype(np.float32)), "integer"),
    ("positions", dict(pos=POS[:, None]), "1-d"),
    ("positions", dict(pos=POS.astype(np.int64) + 2**32), "wrap"),
    ("reward_hat", dict(q=Q[:, :, :1]), "has 1 slots \\(L\\) but target_dist has 2"),
    ("reward_hat", dict(q=selected(Q)), "\\[n, A, L\\] like target_dist"),
    ("reward_hat", dict(q=Q[:, :2]), "has 2 actions"),
    ("reward_hat", dict(q=np.where(np.arange(L) != POS[:, None, None], np.nan, Q)),
     "NaN or infinite"),  # a NaN in a slot that no round uses is still refused
    ("target_dist", dict(t=T * np.array([1.0, 0.5], np.float32)),
     "target_dist\\[0, :, 1\\] sums to"),  # a slot that is not a distribution, used or not
    ("target_dist", dict(t=np.where(T == T.max(), -T, T)), "finite and >= 0"),
    ("target_dist", dict(t=T[..., None]), "expected a 2-d array \\[n, A\\] \\(or \\[n, A, L\\]"),
]


@pytest.mark.parametrize("argument,change,message", BAD,
                         ids=[f"{arg}-{i}" for i, (arg, _, _) in enumerate(BAD)])
def test_bad_inputs_name_the_argument(argument, change, message):
  data = dict(r=R, a=ACTIONS, p=P, t=T, q=Q, pos=POS) | change
  with pytest.raises(ValueError, match=f"^{argument}: .*{message}"):
    ope.dr(data["r"], data["a"], data["p"], data["t"], data["q"], positions=data["pos"])


def test_reward_hat_with_slots_needs_positions():
  with pytest.raises(ValueError, match="^reward_hat: expected a 2-d array"):
    ope.dr(R, ACTIONS, P, selected(T), Q)


@pytest.mark.parametrize("fn", [
    lambda **d: ope.ips(d["r"], d["a"], d["p"], d["t"], positions=d["pos"]),
    lambda **d: ope.dm(d["t"], d["q"], positions=d["pos"]),
    lambda **d: ope.sg_ips(d["r"], d["a"], d["p"], d["t"], lambda_=0.5, positions=d["pos"]),
    lambda **d: ope.beta_ips_bias(d["r"], d["a"], d["p"], d["t"], positions=d["pos"]),
    lambda **d: ope.estimate_all(d["r"], d["a"], d["p"], d["t"], positions=d["pos"]),
    lambda **d: ope.logged_rounds(d["r"], d["a"], d["p"], d["t"], positions=d["pos"]),
    lambda **d: ope.importance_weights(d["a"], d["p"], d["t"], positions=d["pos"]),
], ids=["ips", "dm", "sg_ips", "beta_ips_bias", "estimate_all", "logged_rounds",
        "importance_weights"])
def test_every_entry_checks_positions(fn):
  good = dict(r=R, a=ACTIONS, p=P, t=T, q=Q, pos=POS)
  fn(**good)
  with pytest.raises(ValueError, match="^positions"):
    fn(**(good | {"pos": np.full(N, L, np.int32)}))
  with pytest.raises(ValueError, match="^positions"):
    fn(**(good | {"pos": None}))


# Agreement with Open Bandit Pipeline 0.5.7, computed WITH positions (its action_dist [n, 80, 3]
# and position) on the shipped OBD sample (tests/fixtures/make_obp_fixtures.py).

OBP_CASES = {
    "ips": lambda d, q, pos: ope.ips(*d, positions=pos),
    "ips_clip100": lambda d, q, pos: ope.ips(*d, clip=100.0, positions=pos),
    "ips_clip10": lambda d, q, pos: ope.ips(*d, clip=10.0, positions=pos),
    "snips": lambda d, q, pos: ope.snips(*d, positions=pos),
    "dm": lambda d, q, pos: ope.dm(d[3], q, positions=pos),
    "dr": lambda d, q, pos: ope.dr(*d, q, positions=pos),
    "dr_clip100": lambda d, q, pos: ope.dr(*d, q, clip=100.0, positions=pos),
    "sndr": lambda d, q, pos: ope.sndr(*d, q, positions=pos),
    "switch_dr_tau50": lambda d, q, pos: ope.switch_dr(*d, q, tau=50.0, positions=pos),
    "dr_os_lambda200": lambda d, q, pos: ope.dr_os(*d, q, lambda_=200.0, positions=pos),
}
for _lam in ("0.01", "0.1", "0.5"):
  OBP_CASES[f"sg_ips_lambda{_lam}"] = functools.partial(
      lambda d, q, pos, lam: ope.sg_ips(*d, lambda_=lam, positions=pos), lam=float(_lam))
  OBP_CASES[f"sg_dr_lambda{_lam}"] = functools.partial(
      lambda d, q, pos, lam: ope.sg_dr(*d, q, lambda_=lam, positions=pos), lam=float(_lam))


@pytest.fixture(scope="module")
def obp():
  arrays = np.load(FIXTURES / "obp_obd_bts.npz")
  meta = json.loads((FIXTURES / "obp_obd_bts.json").read_text())
  group = np.arange(len(arrays["actions"])) % meta["n_groups"]
  target = arrays["target_softmax_table"][group]  # [n, 80, 3], float64
  reward_hat = arrays["reward_hat_table"][group]
  data = (arrays["rewards"], arrays["actions"], arrays["pscores"], target)
  return data, reward_hat, arrays["positions"], meta


def rounding_tolerance(estimate, n, num_actions, eps):
  """A bound on the rounding error of a mean of n per-round terms, each from a few roundings
  of its inputs and (DM) a sum over the actions: (8 + ceil(log2 A) + ceil(log2 n)) eps
  mean|x_i|, with eps the unit roundoff. XLA and numpy reduce in trees (error growing like
  log2 of the length, not the length); 8 covers the roundings of one term (the inputs, the
  division by the propensity, the product and, for the self-normalised ones, the ratio of two
  means). OBP's own float64 rounding is below this at eps = 2^-53."""
  terms = np.mean(np.abs(np.asarray(estimate.per_sample, np.float64)))
  return (8 + math.ceil(math.log2(num_actions)) + math.ceil(math.log2(n))) * eps * terms


def test_obp_fixtures_hold_every_case(obp):
  assert set(obp[3]["estimates"]) >= set(OBP_CASES)
  assert obp[0][3].shape == (10_000, 80, 3) and set(np.unique(obp[2])) == {0, 1, 2}


@pytest.mark.parametrize("key", sorted(OBP_CASES))
@pytest.mark.slow
def test_agrees_with_open_bandit_pipeline_with_positions(obp, key):
  data, reward_hat, positions, meta = obp
  reference = meta["estimates"][key]
  n, num_actions = meta["n_rounds"], meta["n_actions"]
  with jax.enable_x64(True):
    exact = OBP_CASES[key](data, reward_hat, positions)
    assert exact.value.dtype == jnp.float64
    tolerance = rounding_tolerance(exact, n, num_actions, 2.0**-53)
    assert abs(float(exact.value) - reference) <= tolerance, (float(exact.value), reference)
  # Default float32: the inputs are rounded to float32 first, then the same bound at 2^-24.
  single = OBP_CASES[key](data, reward_hat, positions)
  assert single.value.dtype == jnp.float32
  tolerance = rounding_tolerance(exact, n, num_actions, 2.0**-24)
  assert abs(float(single.value) - reference) <= tolerance, (float(single.value), reference)
