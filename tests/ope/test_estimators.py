"""Tests for saferl_jax.ope.estimators: closed forms, jit/vmap, float64, input checks,
extreme inputs, agreement with Open Bandit Pipeline, unbiasedness by Monte Carlo, and the
plug-in beta*-IPS's jackknife bias (against a leave-one-out loop and the Monte Carlo bias)."""

import functools
import json
import pathlib

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from saferl_jax.ope import (FROM_ROUNDS, BetaIPSBias, Estimate, LoggedRounds, beta_ips,
                            beta_ips_bias, beta_ips_bias_from_rounds, dm, dr, dr_os, estimate_all,
                            ips, logged_rounds, sg_dr, sg_ips, snips, sndr, switch_dr)

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"

# A tiny hand-made dataset: 4 rounds, 3 actions.
R = np.array([1.0, 0.0, 0.5, 1.0])
A = np.array([0, 2, 1, 1])
P = np.array([0.5, 0.25, 0.5, 0.2])
T = np.array([[0.5, 0.25, 0.25],
              [0.2, 0.3, 0.5],
              [0.1, 0.6, 0.3],
              [0.25, 0.5, 0.25]])
Q = np.array([[0.8, 0.1, 0.3],
              [0.2, 0.4, 0.6],
              [0.5, 0.5, 0.1],
              [0.3, 0.9, 0.0]])
W = np.array([1.0, 2.0, 1.2, 2.5])  # T[i, A[i]] / P[i], by hand.


# Reference implementations in numpy float64, straight from SPEC.md section 1.


def np_terms(r, a, p, t, q):
  idx = np.arange(len(r))
  w = t[idx, a] / p
  return w, q[idx, a], (t * q).sum(1)


def np_linear(per):
  return per.mean(), per, per.std(ddof=1) / np.sqrt(len(per))


def np_beta(r, w):
  return np.cov(r * w, w, ddof=0)[0, 1] / np.var(w)


def np_estimate(name, r, a, p, t, q=None, **opt):
  q = np.zeros_like(t) if q is None else q
  w, qa, dmv = np_terms(r, a, p, t, q)
  if name == "ips":
    return np_linear(np.minimum(w, opt.get("clip", np.inf)) * r)
  if name == "snips":
    value = (w * r).sum() / w.sum()
    return value, w * r / w.mean(), np.sqrt((w**2 * (r - value)**2).sum()) / w.sum()
  if name == "dm":
    return np_linear(dmv)
  if name == "dr":
    return np_linear(dmv + np.minimum(w, opt.get("clip", np.inf)) * (r - qa))
  if name == "sndr":
    e = r - qa
    corr = (w * e).sum() / w.sum()
    influence = dmv - dmv.mean() + (w * e - corr * w) / w.mean()
    per = dmv + w * e / w.mean()
    return per.mean(), per, np.sqrt((influence**2).sum()) / len(r)
  if name == "switch_dr":
    return np_linear(dmv + np.where(w <= opt["tau"], w, 0.0) * (r - qa))
  if name == "dr_os":
    lam = opt["lambda_"]
    shrunk = w if np.isinf(lam) else lam * w / (w**2 + lam)
    return np_linear(dmv + shrunk * (r - qa))
  if name in ("sg_ips", "sg_dr"):  # Metelli et al. 2021, as OBP writes it
    lam = opt["lambda_"]
    denominator = (1 - lam) + lam * w
    shrunk = np.where(denominator > 0, w / np.where(denominator > 0, denominator, 1.0), 0.0)
    return np_linear(shrunk * r if name == "sg_ips" else dmv + shrunk * (r - qa))
  if name == "beta_ips":
    baseline = opt.get("baseline")
    if baseline is None or baseline == "optimal":
      beta = np_beta(r, w)
    elif baseline == "cross_fit":
      k = opt.get("num_folds", 2)
      folds = np.arange(len(r)) % k
      beta = np.array([np_beta(r[folds != f], w[folds != f]) for f in folds])
    else:
      beta = baseline
    return np_linear((r - beta) * w + beta)
  raise KeyError(name)


# (name, public function, needs reward_hat, options)
CASES = [
    ("ips", ips, False, {}),
    ("ips", ips, False, {"clip": 1.5}),
    ("snips", snips, False, {}),
    ("dr", dr, True, {}),
    ("dr", dr, True, {"clip": 1.5}),
    ("sndr", sndr, True, {}),
    ("switch_dr", switch_dr, True, {"tau": 2.0}),
    ("dr_os", dr_os, True, {"lambda_": 3.0}),
    ("beta_ips", beta_ips, False, {"baseline": 0.4}),
    ("beta_ips", beta_ips, False, {}),
    ("beta_ips", beta_ips, False, {"baseline": "cross_fit"}),
    ("sg_ips", sg_ips, False, {"lambda_": 0.3}),
    ("sg_dr", sg_dr, True, {"lambda_": 0.3}),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in opt.items()) for name, _, _, opt in CASES]


def call(fn, needs_q, r, a, p, t, q, **opt):
  return fn(r, a, p, t, q, **opt) if needs_q else fn(r, a, p, t, **opt)


def assert_estimate(est, expected, rtol=2e-6, atol=1e-6):
  value, per, stderr = expected
  np.testing.assert_allclose(est.per_sample, per, rtol=rtol, atol=atol)
  np.testing.assert_allclose(est.value, value, rtol=rtol, atol=atol)
  np.testing.assert_allclose(est.stderr, stderr, rtol=rtol, atol=atol)


def test_weights_of_the_hand_made_data():
  np.testing.assert_allclose(logged_rounds(R, A, P, T).weights, W, rtol=1e-6)


@pytest.mark.parametrize("name,fn,needs_q,opt", CASES, ids=IDS)
def test_closed_form(name, fn, needs_q, opt):
  est = call(fn, needs_q, R, A, P, T, Q, **opt)
  assert isinstance(est, Estimate)
  assert_estimate(est, np_estimate(name, R, A, P, T, Q if needs_q else None, **opt))
  np.testing.assert_allclose(jnp.mean(est.per_sample), est.value, rtol=1e-6)


def test_dm_closed_form():
  assert_estimate(dm(T, Q), np_estimate("dm", R, A, P, T, Q))


def test_hand_computed_values():
  # IPS: (1*1 + 2*0 + 1.2*0.5 + 2.5*1) / 4; clipped at 1.5: (1 + 0 + 0.6 + 1.5) / 4.
  np.testing.assert_allclose(ips(R, A, P, T).value, 1.025, rtol=1e-6)
  np.testing.assert_allclose(ips(R, A, P, T, clip=1.5).value, 0.775, rtol=1e-6)
  # SNIPS: 4.1 / 6.7.
  np.testing.assert_allclose(snips(R, A, P, T).value, 4.1 / 6.7, rtol=1e-6)
  # DM terms: 0.4 + 0.025 + 0.075, 0.04 + 0.12 + 0.3, 0.05 + 0.3 + 0.03, 0.075 + 0.45.
  np.testing.assert_allclose(dm(T, Q).per_sample, [0.5, 0.46, 0.38, 0.525], rtol=1e-6)
  # DR corrections w (r - qhat(a)): 1 * 0.2, 2 * -0.6, 1.2 * 0, 2.5 * 0.1.
  np.testing.assert_allclose(dr(R, A, P, T, Q).per_sample,
                             [0.7, -0.74, 0.38, 0.775], rtol=1e-6, atol=1e-7)


def test_clip_above_every_weight_is_unclipped():
  assert_estimate(ips(R, A, P, T, clip=10.0), np_estimate("ips", R, A, P, T))
  assert_estimate(dr(R, A, P, T, Q, clip=10.0), np_estimate("dr", R, A, P, T, Q))


def test_switch_dr_keeps_the_correction_at_weight_equal_to_tau():
  # Round 1 has w = 2 exactly (0.5 / 0.25). OBP keeps the correction when w <= tau.
  at_tau = switch_dr(R, A, P, T, Q, tau=2.0).per_sample
  below = switch_dr(R, A, P, T, Q, tau=1.99).per_sample
  d = dr(R, A, P, T, Q).per_sample
  dmv = dm(T, Q).per_sample
  np.testing.assert_allclose(at_tau[1], d[1], rtol=1e-6)
  np.testing.assert_allclose(below[1], dmv[1], rtol=1e-6)
  # w = 2.5 > tau: DM alone; w = 1 <= tau: DR.
  np.testing.assert_allclose(at_tau[3], dmv[3], rtol=1e-6)
  np.testing.assert_allclose(at_tau[0], d[0], rtol=1e-6)


def test_switch_dr_extremes():
  assert_estimate(switch_dr(R, A, P, T, Q, tau=np.inf), np_estimate("dr", R, A, P, T, Q))
  assert_estimate(switch_dr(R, A, P, T, Q, tau=0.0), np_estimate("dm", R, A, P, T, Q))


def test_dr_os_limits():
  assert_estimate(dr_os(R, A, P, T, Q, lambda_=0.0), np_estimate("dm", R, A, P, T, Q))
  assert_estimate(dr_os(R, A, P, T, Q, lambda_=np.inf), np_estimate("dr", R, A, P, T, Q))
  # A huge finite lambda_ approaches DR, continuously.
  np.testing.assert_allclose(dr_os(R, A, P, T, Q, lambda_=1e6).value, dr(R, A, P, T, Q).value,
                             rtol=1e-4)


def test_subgaussian_by_hand():
  # W = (1, 2, 1.2, 2.5); at lambda_ = 0.5 the weights are w / (0.5 + 0.5 w) = 2 w / (1 + w):
  # (1, 4/3, 12/11, 10/7); SG-IPS = (1 + 0 + 0.5 * 12/11 + 10/7) / 4.
  expected = (1 + 0.5 * 12 / 11 + 10 / 7) / 4
  np.testing.assert_allclose(sg_ips(R, A, P, T, lambda_=0.5).value, expected, rtol=1e-6)
  # SG-DR: dm_i + w_lam (r_i - qhat(x_i, a_i)) with the DR residuals (0.2, -0.6, 0, 0.1).
  dr_terms = np.array([0.5, 0.46, 0.38, 0.525]) + np.array([1, 4 / 3, 12 / 11, 10 / 7]) * np.array(
      [0.2, -0.6, 0.0, 0.1])
  np.testing.assert_allclose(sg_dr(R, A, P, T, Q, lambda_=0.5).per_sample, dr_terms, rtol=1e-6)


@pytest.mark.slow
def test_subgaussian_limits():
  # lambda_ = 0 is IPS / DR; lambda_ = 1 sets every positive weight to 1.
  assert_estimate(sg_ips(R, A, P, T, lambda_=0.0), np_estimate("ips", R, A, P, T))
  assert_estimate(sg_dr(R, A, P, T, Q, lambda_=0.0), np_estimate("dr", R, A, P, T, Q))
  np.testing.assert_allclose(sg_ips(R, A, P, T, lambda_=1.0).per_sample, R, rtol=1e-6)
  # A weight of 0 stays 0 at lambda_ = 1 (0 / 0 in the formula): the limit of every lambda_ < 1.
  data = zero_target_mass_data()
  assert float(jnp.abs(sg_ips(*data[:4], lambda_=1.0).per_sample).max()) == 0.0
  np.testing.assert_allclose(sg_dr(*data, lambda_=1.0).value, dm(data[3], data[4]).value,
                             rtol=1e-6)
  grad = jax.grad(lambda t: sg_dr(data[0], data[1], data[2], t, data[4], lambda_=1.0).value)(
      jnp.asarray(data[3]))
  assert np.all(np.isfinite(grad))
  # Shrinking more never raises a nonnegative-reward estimate: w_lam decreases in lambda_.
  values = [float(sg_ips(R, A, P, T, lambda_=lam).value) for lam in (0.0, 0.1, 0.5, 0.9)]
  assert values == sorted(values, reverse=True)


@pytest.mark.slow
def test_subgaussian_is_differentiable_in_lambda_and_vmaps_over_a_grid():
  grid = jnp.array([0.0, 0.2, 0.7, 1.0])
  batched = jax.vmap(lambda lam: sg_dr(R, A, P, T, Q, lambda_=lam).value)(grid)
  np.testing.assert_allclose(batched, [float(sg_dr(R, A, P, T, Q, lambda_=float(x)).value)
                                       for x in grid], rtol=1e-6)
  f = lambda lam: sg_ips(R, A, P, T, lambda_=lam).value
  with jax.enable_x64(True):
    lam = jnp.asarray(0.3, jnp.float64)
    fd = (f(lam + 1e-6) - f(lam - 1e-6)) / 2e-6
    np.testing.assert_allclose(jax.grad(f)(lam), fd, rtol=1e-6)


def test_beta_ips_zero_is_ips_and_constant_model_dr_is_beta_ips():
  assert_estimate(beta_ips(R, A, P, T, baseline=0.0), np_estimate("ips", R, A, P, T))
  beta = 0.3
  # DR with qhat == beta everywhere is beta-IPS (SPEC.md section 1).
  const = np.full_like(Q, beta)
  np.testing.assert_allclose(dr(R, A, P, T, const).per_sample,
                             beta_ips(R, A, P, T, baseline=beta).per_sample, rtol=1e-6)


@pytest.mark.slow
def test_beta_ips_optimal_is_the_default_and_matches_the_variance_minimiser():
  default = beta_ips(R, A, P, T)
  optimal = beta_ips(R, A, P, T, baseline="optimal")
  np.testing.assert_allclose(default.value, optimal.value)
  beta = np_beta(R, W)
  assert_estimate(optimal, np_estimate("beta_ips", R, A, P, T, baseline=beta))
  # No fixed baseline on a grid has a smaller standard error.
  grid = beta + np.linspace(-2, 2, 41)
  grid_stderr = [float(beta_ips(R, A, P, T, baseline=b).stderr) for b in grid]
  assert float(optimal.stderr) <= min(grid_stderr) + 1e-6


@pytest.mark.slow
def test_beta_ips_cross_fit_three_folds():
  r = np.array([1.0, 0.0, 0.5, 1.0, 0.0, 1.0, 0.2])
  a = np.array([0, 2, 1, 1, 0, 2, 1])
  p = np.array([0.5, 0.25, 0.5, 0.2, 0.4, 0.1, 0.3])
  t = np.tile(np.array([[0.5, 0.2, 0.3]]), (7, 1))
  est = beta_ips(r, a, p, t, baseline="cross_fit", num_folds=3)
  assert_estimate(est, np_estimate("beta_ips", r, a, p, t, baseline="cross_fit", num_folds=3))


def test_beta_ips_cross_fit_needs_two_folds():
  with pytest.raises(ValueError, match="num_folds"):
    beta_ips(R, A, P, T, baseline="cross_fit", num_folds=1)


# jit and vmap.


def random_datasets(seed, batch, n=6, num_actions=3):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch, n, num_actions))
  t = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  a = rng.integers(0, num_actions, size=(batch, n))
  p = rng.uniform(0.05, 1.0, size=(batch, n))
  r = rng.binomial(1, 0.4, size=(batch, n)).astype(float)
  q = rng.uniform(0, 1, size=(batch, n, num_actions))
  return r, a, p, t, q


@pytest.mark.parametrize("name,fn,needs_q,opt", CASES, ids=IDS)
def test_jit_equals_eager(name, fn, needs_q, opt):
  del name
  f = functools.partial(call, fn, needs_q, **opt)
  eager = f(R, A, P, T, Q)
  jitted = jax.jit(f)(R, A, P, T, Q)
  for x, y in zip(eager, jitted):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_dm_jit_and_vmap():
  np.testing.assert_allclose(jax.jit(dm)(T, Q).value, dm(T, Q).value, rtol=1e-6)
  _, _, _, t, q = random_datasets(3, batch=4)
  batched = jax.vmap(dm)(t, q)
  for b in range(4):
    np.testing.assert_allclose(batched.per_sample[b], dm(t[b], q[b]).per_sample, rtol=1e-6)
    np.testing.assert_allclose(batched.stderr[b], dm(t[b], q[b]).stderr, rtol=1e-5)


@pytest.mark.parametrize("name,fn,needs_q,opt", CASES, ids=IDS)
@pytest.mark.slow
def test_vmap_equals_loop(name, fn, needs_q, opt):
  del name
  f = functools.partial(call, fn, needs_q, **opt)
  data = random_datasets(1, batch=4)
  batched = jax.vmap(f)(*data)
  for b in range(4):
    single = f(*(x[b] for x in data))
    for x, y in zip(single, batched):
      np.testing.assert_allclose(y[b], x, rtol=1e-5, atol=1e-6)


# float64.


@pytest.mark.parametrize("name,fn,needs_q,opt", CASES + [("dm", None, True, {})],
                         ids=IDS + ["dm"])
@pytest.mark.slow
def test_float64(name, fn, needs_q, opt):
  r, a, p, t, q = (x[0] for x in random_datasets(2, batch=1, n=9))
  with jax.enable_x64(True):
    est = dm(t, q) if fn is None else call(fn, needs_q, r, a, p, t, q, **opt)
    for x in est:
      assert x.dtype == jnp.float64
    assert_estimate(est, np_estimate(name, r, a, p, t, q if needs_q else None, **opt),
                    rtol=1e-12, atol=1e-12)


# Bad inputs.

BAD_INPUTS = [
    ("logging_probs", dict(p=np.array([0.5, 0.0, 0.5, 0.2]))),
    ("logging_probs", dict(p=np.array([0.5, 1.5, 0.5, 0.2]))),
    ("logging_probs", dict(p=np.array([0.5, np.nan, 0.5, 0.2]))),
    ("logging_probs", dict(p=np.array([0.5, -0.25, 0.5, 0.2]))),
    ("rewards", dict(r=np.array([1.0, np.nan, 0.5, 1.0]))),
    ("rewards", dict(r=np.array([1.0, np.inf, 0.5, 1.0]))),
    ("actions", dict(a=np.array([0, 3, 1, 1]))),
    ("actions", dict(a=np.array([0, -1, 1, 1]))),
    ("actions", dict(a=np.array([0.0, 2.0, 1.0, 1.0]))),
    ("target_dist", dict(t=T * 0.9)),
    ("target_dist", dict(t=np.where(T == 0.1, -0.1, T))),
    ("target_dist", dict(t=np.where(T == 0.1, np.nan, T))),
    ("target_dist", dict(t=T[0])),
    ("rewards", dict(r=R[:, None])),
    ("actions", dict(a=A[:3])),
    ("logging_probs", dict(p=P[:3])),
    ("rewards", dict(r=np.zeros(0), a=np.zeros(0, int), p=np.zeros(0), t=np.zeros((0, 3)))),
]


@pytest.mark.parametrize("argument,change", BAD_INPUTS,
                         ids=[f"{arg}-{i}" for i, (arg, _) in enumerate(BAD_INPUTS)])
@pytest.mark.parametrize("fn", [ips, snips, beta_ips])
def test_bad_inputs_name_the_argument(argument, change, fn):
  data = dict(r=R, a=A, p=P, t=T) | change
  with pytest.raises(ValueError, match=argument):
    fn(data["r"], data["a"], data["p"], data["t"])


@pytest.mark.parametrize("argument,q", [
    ("reward_hat", np.where(Q == 0.0, np.nan, Q)),
    ("reward_hat", Q[:, :2]),
    ("reward_hat", Q[0]),
    ("reward_hat", Q[:3]),
])
@pytest.mark.parametrize("fn", [dr, sndr])
def test_bad_reward_hat(argument, q, fn):
  with pytest.raises(ValueError, match=argument):
    fn(R, A, P, T, q)


def test_dm_bad_inputs():
  with pytest.raises(ValueError, match="reward_hat"):
    dm(T, np.where(Q == 0.0, np.inf, Q))
  with pytest.raises(ValueError, match="target_dist"):
    dm(T * 2, Q)


@pytest.mark.parametrize("call_bad,argument", [
    (lambda: ips(R, A, P, T, clip=0.0), "clip"),
    (lambda: ips(R, A, P, T, clip=-1.0), "clip"),
    (lambda: dr(R, A, P, T, Q, clip=0.0), "clip"),
    (lambda: switch_dr(R, A, P, T, Q, tau=-1.0), "tau"),
    (lambda: dr_os(R, A, P, T, Q, lambda_=-1.0), "lambda_"),
    (lambda: dr_os(R, A, P, T, Q, lambda_=np.nan), "lambda_"),
    (lambda: beta_ips(R, A, P, T, baseline="median"), "baseline"),
    (lambda: beta_ips(R, A, P, T, baseline=np.nan), "baseline"),
    (lambda: sg_ips(R, A, P, T, lambda_=-0.1), "lambda_"),
    (lambda: sg_ips(R, A, P, T, lambda_=1.5), "lambda_"),
    (lambda: sg_ips(R, A, P, T, lambda_=np.nan), "lambda_"),
    (lambda: sg_dr(R, A, P, T, Q, lambda_=np.inf), "lambda_"),
    (lambda: estimate_all(R, A, P, T, Q, estimators=("sg_dr",),
                          options={"sg_dr": {"lambda_": 2.0}}), "lambda_"),
    (lambda: beta_ips_bias(R[:1], A[:1], P[:1], T[:1]), "rewards"),
])
def test_bad_options(call_bad, argument):
  with pytest.raises(ValueError, match=argument):
    call_bad()


@st.composite
def datasets(draw):
  # Few distinct shapes: each new shape recompiles every op, and values matter more.
  n = draw(st.sampled_from([2, 7]))
  num_actions = draw(st.sampled_from([1, 3]))
  r = draw(hnp.arrays(np.float64, n, elements=st.floats(-5, 5)))
  a = draw(hnp.arrays(np.int64, n, elements=st.integers(0, num_actions - 1)))
  p = draw(hnp.arrays(np.float64, n, elements=st.floats(1e-8, 1.0)))
  mass = draw(hnp.arrays(np.float64, (n, num_actions),
                         elements=st.one_of(st.just(0.0), st.floats(1e-3, 1.0))))
  mass[:, 0] += mass.sum(1) == 0  # every row needs some mass
  q = draw(hnp.arrays(np.float64, (n, num_actions), elements=st.floats(-1, 1)))
  return r, a, p, mass / mass.sum(1, keepdims=True), q


@settings(max_examples=20)
@given(datasets())
@pytest.mark.slow
def test_property_valid_data_never_nan(data):
  r, a, p, t, q = data
  for _, fn, needs_q, opt in CASES:
    est = call(fn, needs_q, r, a, p, t, q, **opt)
    assert np.isfinite(est.value) and np.isfinite(est.stderr)
    assert np.all(np.isfinite(est.per_sample))
    scale = 1.0 + float(np.max(np.abs(est.per_sample)))
    np.testing.assert_allclose(np.mean(np.asarray(est.per_sample, np.float64)), est.value,
                               atol=1e-5 * scale)


@settings(max_examples=30)
@given(datasets(), st.data())
@pytest.mark.slow
def test_property_invalid_propensity_raises(data, draw):
  r, a, p, t, _ = data
  i = draw.draw(st.integers(0, len(p) - 1))
  # Above 1.001 so float32 cannot round the value back to 1.
  p[i] = draw.draw(st.one_of(st.floats(min_value=-1e30, max_value=0.0),
                             st.floats(min_value=1.001, max_value=1e30),
                             st.sampled_from([np.nan, np.inf, -np.inf])))
  with pytest.raises(ValueError, match="logging_probs"):
    ips(r, a, p, t)


# Extreme inputs.

EXTREME = [
    ("ips", lambda *d: ips(*d[:4])),
    ("ips_clip", lambda *d: ips(*d[:4], clip=100.0)),
    ("snips", lambda *d: snips(*d[:4])),
    ("dm", lambda *d: dm(d[3], d[4])),
    ("dr", lambda *d: dr(*d)),
    ("dr_clip", lambda *d: dr(*d, clip=100.0)),
    ("sndr", lambda *d: sndr(*d)),
    ("switch_dr", lambda *d: switch_dr(*d, tau=100.0)),
    ("dr_os", lambda *d: dr_os(*d, lambda_=100.0)),
    ("dr_os_inf", lambda *d: dr_os(*d, lambda_=np.inf)),
    ("dr_os_0", lambda *d: dr_os(*d, lambda_=0.0)),
    ("beta_ips", lambda *d: beta_ips(*d[:4])),
    ("beta_ips_fixed", lambda *d: beta_ips(*d[:4], baseline=0.5)),
    ("beta_ips_cross_fit", lambda *d: beta_ips(*d[:4], baseline="cross_fit")),
    ("beta_ips_bias", lambda *d: beta_ips_bias(*d[:4])),
    ("sg_ips", lambda *d: sg_ips(*d[:4], lambda_=0.1)),
    ("sg_ips_1", lambda *d: sg_ips(*d[:4], lambda_=1.0)),
    ("sg_dr", lambda *d: sg_dr(*d, lambda_=0.1)),
]


def tiny_propensity_data():
  p = np.array([1e-8, 0.5, 1e-8, 0.3, 1.0])
  t = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
  return (np.array([1.0, 0.0, 1.0, 1.0, 0.0]), np.array([0, 1, 1, 0, 1]), p, t,
          np.full((5, 2), 0.5))


def zero_target_mass_data():
  t = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
  return (np.array([1.0, 0.0, 1.0, 1.0]), np.array([0, 1, 0, 1]), np.full(4, 0.5), t,
          np.full((4, 2), 0.25))


@pytest.mark.parametrize("name,f", EXTREME, ids=[e[0] for e in EXTREME])
@pytest.mark.parametrize("make", [tiny_propensity_data, zero_target_mass_data],
                         ids=["tiny_propensity", "zero_target_mass"])
@pytest.mark.slow
def test_extreme_inputs_stay_finite(name, f, make):
  del name
  est = f(*make())
  assert all(np.all(np.isfinite(x)) for x in est), est


@pytest.mark.slow
def test_zero_target_mass_values():
  data = zero_target_mass_data()
  assert float(ips(*data[:4]).value) == 0.0
  assert float(snips(*data[:4]).value) == 0.0
  assert float(snips(*data[:4]).stderr) == 0.0
  # With every weight 0 the baseline can be anything; the estimate is then beta itself.
  np.testing.assert_allclose(beta_ips(*data[:4], baseline=0.7).value, 0.7, rtol=1e-6)
  np.testing.assert_allclose(sndr(*data).value, dm(data[3], data[4]).value, rtol=1e-6)


@pytest.mark.parametrize("f", [
    lambda t, d: snips(d[0], d[1], d[2], t).value,
    lambda t, d: sndr(d[0], d[1], d[2], t, d[4]).value,
    lambda t, d: beta_ips(d[0], d[1], d[2], t).value,
    lambda t, d: beta_ips(d[0], d[1], d[2], t, baseline="cross_fit").value,
    lambda t, d: dr_os(d[0], d[1], d[2], t, d[4], lambda_=0.0).value,
], ids=["snips", "sndr", "beta_ips", "beta_ips_cross_fit", "dr_os_0"])
@pytest.mark.slow
def test_gradients_without_weight_mass_have_no_nan(f):
  data = zero_target_mass_data()
  grad = jax.grad(f)(jnp.asarray(data[3]), data)
  assert np.all(np.isfinite(grad))


@pytest.mark.slow
def test_snips_gradient_matches_finite_differences():
  direction = np.random.default_rng(0).normal(size=T.shape)
  direction -= direction.mean(1, keepdims=True)  # keeps rows summing to 1
  f = lambda t: snips(R, A, P, t).value
  with jax.enable_x64(True):
    fd = (f(T + 1e-6 * direction) - f(T - 1e-6 * direction)) / 2e-6
    analytic = jnp.vdot(jax.grad(f)(jnp.asarray(T)), direction)
  np.testing.assert_allclose(analytic, fd, rtol=1e-6)


@pytest.mark.slow
def test_dr_os_infinite_lambda_gradient_has_no_nan():
  f_inf = lambda t: dr_os(R, A, P, t, Q, lambda_=np.inf).value
  f_dr = lambda t: dr(R, A, P, t, Q).value
  grad = jax.grad(f_inf)(jnp.asarray(T))
  np.testing.assert_allclose(grad, jax.grad(f_dr)(jnp.asarray(T)), rtol=1e-6)


@pytest.mark.parametrize("fn", [snips, lambda r, a, p, t: sndr(r, a, p, t, Q[:1])],
                         ids=["snips", "sndr"])
def test_self_normalised_stderr_of_one_round_is_not_zero(fn):
  est = fn(R[:1], A[:1], P[:1], T[:1])
  assert float(ips(R[:1], A[:1], P[:1], T[:1]).stderr) == np.inf
  assert float(est.stderr) > 0


# Agreement with Open Bandit Pipeline 0.5.7 on the shipped OBD sample.

OBP_CASES = {
    "ips": lambda d: ips(*d[:4]),
    "ips_clip100": lambda d: ips(*d[:4], clip=100.0),
    "ips_clip10": lambda d: ips(*d[:4], clip=10.0),
    "snips": lambda d: snips(*d[:4]),
    "dm": lambda d: dm(d[3], d[4]),
    "dr": lambda d: dr(*d),
    "dr_clip100": lambda d: dr(*d, clip=100.0),
    "sndr": lambda d: sndr(*d),
    "switch_dr_tau50": lambda d: switch_dr(*d, tau=50.0),
    "dr_os_lambda200": lambda d: dr_os(*d, lambda_=200.0),
}


@pytest.fixture(scope="module")
def obp():
  arrays = np.load(FIXTURES / "obp_obd_bts.npz")
  reference = json.loads((FIXTURES / "obp_obd_bts.json").read_text())["estimates"]
  i = np.arange(len(arrays["actions"]))
  group, pos = i % 7, arrays["positions"]
  target = arrays["target_softmax_table"][group, :, pos]
  reward_hat = arrays["reward_hat_table"][group, :, pos]
  data = (arrays["rewards"], arrays["actions"], arrays["pscores"], target, reward_hat)
  return data, reference


@pytest.mark.parametrize("key", sorted(OBP_CASES))
@pytest.mark.slow
def test_agrees_with_open_bandit_pipeline(obp, key):
  data, reference = obp
  assert data[3].shape == (10000, 80)
  with jax.enable_x64(True):
    value = float(OBP_CASES[key](data).value)
  np.testing.assert_allclose(value, reference[key], rtol=1e-5)


@pytest.mark.slow
def test_agrees_with_open_bandit_pipeline_in_float32(obp):
  # Default precision too, with a tolerance for float32 sums over 1e4 rounds;
  # dr and sndr cancel to near zero, so they are compared on the scale of dm.
  data, reference = obp
  for key in ("ips", "snips", "dm", "ips_clip10", "switch_dr_tau50"):
    np.testing.assert_allclose(float(OBP_CASES[key](data).value), reference[key], rtol=1e-4)
  for key in ("dr", "sndr", "dr_clip100"):
    np.testing.assert_allclose(float(OBP_CASES[key](data).value), reference[key],
                               atol=1e-4 * reference["dm"])


# estimate_all.


@pytest.mark.slow
def test_estimate_all_matches_the_individual_estimators():
  options = {"ips": {"clip": 1.5}, "switch_dr": {"tau": 2.0}, "dr_os": {"lambda_": 3.0},
             "beta_ips": {"baseline": "cross_fit"}, "dr": {"clip": 2.2}, "sg_ips": {"lambda_": 0.2},
             "sg_dr": {"lambda_": 0.6}}
  out = estimate_all(R, A, P, T, Q, estimators=tuple(FROM_ROUNDS), options=options)
  assert sorted(out) == sorted(FROM_ROUNDS)
  expected = {
      "ips": ips(R, A, P, T, clip=1.5), "snips": snips(R, A, P, T), "dm": dm(T, Q),
      "dr": dr(R, A, P, T, Q, clip=2.2), "sndr": sndr(R, A, P, T, Q),
      "switch_dr": switch_dr(R, A, P, T, Q, tau=2.0),
      "dr_os": dr_os(R, A, P, T, Q, lambda_=3.0),
      "beta_ips": beta_ips(R, A, P, T, baseline="cross_fit"),
      "sg_ips": sg_ips(R, A, P, T, lambda_=0.2), "sg_dr": sg_dr(R, A, P, T, Q, lambda_=0.6),
  }
  for name, est in expected.items():
    for x, y in zip(out[name], est):
      np.testing.assert_allclose(x, y, rtol=1e-6, err_msg=name)


@pytest.mark.slow
def test_estimate_all_defaults():
  assert sorted(estimate_all(R, A, P, T)) == ["beta_ips", "ips", "snips"]
  with_model = estimate_all(R, A, P, T, Q)
  assert sorted(with_model) == ["beta_ips", "dm", "dr", "ips", "sndr", "snips"]
  np.testing.assert_allclose(with_model["beta_ips"].value, beta_ips(R, A, P, T).value)


def test_estimate_all_errors():
  with pytest.raises(ValueError, match="unknown"):
    estimate_all(R, A, P, T, estimators=("ips", "magic"))
  with pytest.raises(ValueError, match="unknown"):
    estimate_all(R, A, P, T, estimators=("ips",), options={"snips": {}})
  with pytest.raises(ValueError, match="reward_hat"):
    estimate_all(R, A, P, T, estimators=("ips", "dr"))
  with pytest.raises(ValueError, match="reward_hat"):
    estimate_all(R, A, P, T, estimators=("dm",))
  with pytest.raises(ValueError, match="logging_probs"):
    estimate_all(R, A, np.zeros(4), T)


def test_estimate_all_missing_required_option_names_it():
  with pytest.raises(ValueError, match="tau"):
    estimate_all(R, A, P, T, Q, estimators=("switch_dr",))
  with pytest.raises(ValueError, match="lambda_"):
    estimate_all(R, A, P, T, estimators=("sg_ips",))
  with pytest.raises(ValueError, match="reward_hat"):
    estimate_all(R, A, P, T, estimators=("sg_dr",), options={"sg_dr": {"lambda_": 0.5}})


def test_estimate_all_under_jit():
  f = jax.jit(lambda *d: estimate_all(*d, estimators=("snips", "dr"))["dr"].value)
  np.testing.assert_allclose(f(R, A, P, T, Q), dr(R, A, P, T, Q).value, rtol=1e-6)


# Monte Carlo: unbiasedness on a small discrete bandit.

# M = 20000 datasets (not 2000) so that the plug-in beta*'s O(1/n) bias, about -0.008 at
# n = 50, is many standard errors wide: the unbiasedness test could then catch a
# cross-fitted baseline that leaked its own fold. It still runs in about a second.
NUM_CONTEXTS, NUM_ACTIONS, N, M = 5, 4, 50, 20000
Q_TRUE = np.array([[0.1, 0.5, 0.9, 0.3],
                   [0.7, 0.2, 0.4, 0.6],
                   [0.3, 0.8, 0.1, 0.5],
                   [0.9, 0.4, 0.6, 0.2],
                   [0.5, 0.5, 0.2, 0.8]])
LOGITS_0 = np.array([[1.0, 0.0, -1.0, 0.5],
                     [0.0, 1.0, 0.5, -1.0],
                     [0.5, -0.5, 1.0, 0.0],
                     [-1.0, 0.5, 0.0, 1.0],
                     [0.0, 0.0, 1.0, -0.5]])


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


PI_0 = softmax(LOGITS_0)
PI = softmax(3.0 * Q_TRUE)  # a target that prefers good actions
Q_HAT = 0.6 * Q_TRUE + 0.15  # imperfect reward model
V_TRUE = float(np.mean(np.sum(PI * Q_TRUE, axis=1)))


def simulate(key):
  kx, ka, kr = jax.random.split(key, 3)
  x = jax.random.randint(kx, (N,), 0, NUM_CONTEXTS)
  a = jax.random.categorical(ka, jnp.log(jnp.asarray(PI_0, jnp.float32))[x])
  r = jax.random.bernoulli(kr, jnp.asarray(Q_TRUE, jnp.float32)[x, a]).astype(jnp.float32)
  p = jnp.asarray(PI_0, jnp.float32)[x, a]
  return r, a, p, jnp.asarray(PI, jnp.float32)[x], jnp.asarray(Q_HAT, jnp.float32)[x]


def population_moments():
  """Exact E over (x, a, r) of w, w^2, w r, w^2 r and their covariances, by enumeration."""
  prob, z = [], []
  for x in range(NUM_CONTEXTS):
    for a in range(NUM_ACTIONS):
      w = PI[x, a] / PI_0[x, a]
      for r, pr in ((1.0, Q_TRUE[x, a]), (0.0, 1 - Q_TRUE[x, a])):
        prob.append(PI_0[x, a] * pr / NUM_CONTEXTS)
        z.append([w, w**2, w * r, w**2 * r])
  prob, z = np.array(prob), np.array(z)
  mean = prob @ z
  cov = (z - mean).T @ ((z - mean) * prob[:, None])
  return mean, cov


@pytest.fixture(scope="module")
def monte_carlo():
  data = jax.vmap(simulate)(jax.random.split(jax.random.key(0), M))

  def estimates(r, a, p, t, q):
    return {
        "ips": ips(r, a, p, t).value,
        "dr": dr(r, a, p, t, q).value,
        "beta_ips_fixed": beta_ips(r, a, p, t, baseline=0.3).value,
        "beta_ips_cross_fit": beta_ips(r, a, p, t, baseline="cross_fit").value,
        "beta_ips_plug_in": beta_ips(r, a, p, t).value,
        "snips": snips(r, a, p, t).value,
        "sg_ips": sg_ips(r, a, p, t, lambda_=SG_LAMBDA).value,
        "sg_dr": sg_dr(r, a, p, t, q, lambda_=SG_LAMBDA).value,
    }

  return jax.tree.map(lambda x: np.asarray(x, np.float64), jax.jit(jax.vmap(estimates))(*data))


def test_monte_carlo_setup_is_exact():
  mean, _ = population_moments()
  assert abs(mean[0] - 1.0) < 1e-12  # E[w] = 1 under full support
  np.testing.assert_allclose(mean[2], V_TRUE, rtol=1e-12)  # E[w r] = V


SG_LAMBDA = 0.3


def subgaussian_expectations():
  """E[SG-IPS] and E[SG-DR] exactly, by enumerating contexts and actions: the mean of
  E_{a ~ pi0}[w_lam q] (and of dm + E[w_lam (q - qhat)]) over the uniform contexts."""
  w = PI / PI_0
  w_lam = w / ((1 - SG_LAMBDA) + SG_LAMBDA * w)
  sg_ips_mean = np.mean(np.sum(PI_0 * w_lam * Q_TRUE, axis=1))
  dm_term = np.sum(PI * Q_HAT, axis=1)
  sg_dr_mean = np.mean(dm_term + np.sum(PI_0 * w_lam * (Q_TRUE - Q_HAT), axis=1))
  return {"sg_ips": sg_ips_mean, "sg_dr": sg_dr_mean}


@pytest.mark.parametrize("name", ["sg_ips", "sg_dr"])
@pytest.mark.slow
def test_subgaussian_means_match_their_exact_expectations(monte_carlo, name):
  # Biased (w_lam <= w), but by an amount known exactly: the Monte Carlo mean must match it,
  # and the check has the power to see the bias.
  values = monte_carlo[name]
  standard_error = values.std(ddof=1) / np.sqrt(M)
  expected = subgaussian_expectations()[name]
  assert abs(values.mean() - expected) <= 4 * standard_error
  assert abs(expected - V_TRUE) > 8 * standard_error


@pytest.mark.parametrize("name", ["ips", "dr", "beta_ips_fixed", "beta_ips_cross_fit"])
@pytest.mark.slow
def test_unbiased_by_monte_carlo(monte_carlo, name):
  values = monte_carlo[name]
  standard_error = values.std(ddof=1) / np.sqrt(M)
  assert abs(values.mean() - V_TRUE) <= 4 * standard_error


def first_order_bias(statistic):
  """Delta-method O(1/n) bias of statistic(mean of z) - V, with z = (w, w^2, w r, w^2 r).

  For g(zbar) the bias is (1/2) tr(H Cov(z)) / n with H the Hessian of g at E[z].
  """
  mean, cov = population_moments()
  with jax.enable_x64(True):
    hessian = np.asarray(jax.hessian(statistic)(jnp.asarray(mean)))
  return 0.5 * np.sum(hessian * cov) / N


def snips_statistic(m):
  return m[2] / m[0]


def beta_ips_statistic(m):
  beta = (m[3] - m[2] * m[0]) / (m[1] - m[0]**2)
  return m[2] - beta * (m[0] - 1.0)


@pytest.mark.slow
def test_plug_in_bias_is_detectable(monte_carlo):
  # The power check for test_unbiased_by_monte_carlo: the same test rejects the
  # plug-in beta* and SNIPS, whose O(1/n) bias is known to be nonzero here.
  for name in ("beta_ips_plug_in", "snips"):
    values = monte_carlo[name]
    assert abs(values.mean() - V_TRUE) > 4 * values.std(ddof=1) / np.sqrt(M), name


@pytest.mark.slow
def test_snips_bias_matches_the_delta_method(monte_carlo):
  # E[SNIPS] = V + b/n + O(1/n^2); the remainder is O(1/n) relative to b/n, so
  # at n = 50 allow a quarter of it. An unbiased SNIPS would fail by |b/n|.
  values = monte_carlo["snips"]
  standard_error = values.std(ddof=1) / np.sqrt(M)
  bias = first_order_bias(snips_statistic)
  assert abs(bias) > 8 * standard_error  # the check below has power
  assert abs(values.mean() - (V_TRUE + bias)) <= 4 * standard_error + 0.25 * abs(bias)


@pytest.mark.slow
def test_plug_in_beta_ips_bias_is_first_order(monte_carlo):
  # beta* is itself a ratio with heavy-tailed terms (w^2 r), so its second-order
  # term is not small at n = 50: allow the remainder up to the first-order term.
  values = monte_carlo["beta_ips_plug_in"]
  standard_error = values.std(ddof=1) / np.sqrt(M)
  bias = first_order_bias(beta_ips_statistic)
  assert bias < 0
  assert abs(values.mean() - (V_TRUE + bias)) <= 4 * standard_error + abs(bias)


def _one_huge_weight(seed, n):
  """A float32 dataset whose round 0 has propensity 1e-6: an importance weight near 1e6."""
  rng = np.random.default_rng(seed)
  rewards = rng.uniform(0, 1, n).astype(np.float32)
  actions = rng.integers(0, 3, n).astype(np.int32)
  probs = rng.uniform(0.1, 1, n).astype(np.float32)
  probs[0] = 1e-6
  target = rng.dirichlet(np.ones(3), n).astype(np.float32)
  return rewards, actions, probs, target


def _beta_ips_float64(rewards, actions, probs, target):
  w = target[np.arange(len(actions)), actions].astype(np.float64) / probs.astype(np.float64)
  r = rewards.astype(np.float64)
  c = w - w.mean()
  beta = np.sum(c * (r * w - np.mean(r * w))) / np.sum(c * c)
  return np.mean((r - beta) * w + beta)


@pytest.mark.parametrize("seed,n", [(6, 23), (21, 17), (3, 5)])
@pytest.mark.slow
def test_beta_ips_with_a_weight_near_1e6_is_stable_in_float32(seed, n):
  # r_m - beta* at the dominant weight is O(1 / w_m): subtracting it lost every digit (eager and
  # jit differed by up to 20%); the pivoted form keeps float32 within 1e-5 of float64.
  data = _one_huge_weight(seed, n)
  eager = float(beta_ips(*data).value)
  jitted = float(jax.jit(lambda *a: beta_ips(*a).value)(*data))
  exact = _beta_ips_float64(*data)
  np.testing.assert_allclose(eager, exact, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jitted, exact, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_propensity_of_1e_20_gives_finite_estimates_and_stderrs():
  args = (jnp.array([1., 0., 1., 1.]), jnp.array([0, 1, 0, 1]), jnp.array([1e-20, 0.5, 0.5, 0.5]),
          jnp.tile(jnp.array([0.8, 0.2]), (4, 1)))
  reward_hat = jnp.full((4, 2), 0.5)
  for estimate in (ips(*args), snips(*args), beta_ips(*args), beta_ips(*args, baseline="cross_fit"),
                   dr(*args, reward_hat), sndr(*args, reward_hat)):
    assert np.all(np.isfinite(np.asarray(estimate.value)))
    assert np.isfinite(float(estimate.stderr))
  # beta* follows the dominant round's reward, so beta-IPS stays in the rewards' range here.
  assert 0 <= float(beta_ips(*args).value) <= 1


def test_int64_actions_above_2_31_are_refused_not_wrapped():
  rewards, target = jnp.ones(2), jnp.full((2, 2), 0.5)
  actions = np.array([0, 2**32 + 1], np.int64)  # would wrap to 1, a valid action
  with pytest.raises(ValueError, match="^actions:.*wrap"):
    ips(rewards, actions, jnp.full(2, 0.5), target)


# The plug-in beta*-IPS's jackknife bias.


def _plug_in_float64(r, w):
  """The plug-in beta*-IPS in float64, beta* = 0 when the weights do not vary."""
  c = w - w.mean()
  variance = np.sum(c * c)
  beta = np.sum(c * (r * w - np.mean(r * w))) / variance if variance > 0 else 0.0
  return np.mean((r - beta) * w + beta), beta


def _jackknife_float64(r, w):
  """(n - 1) (mean_i V_{-i} - V) by a loop over the n leave-one-out samples."""
  n = len(r)
  value = _plug_in_float64(r, w)[0]
  loo = np.array([_plug_in_float64(np.delete(r, i), np.delete(w, i))[0] for i in range(n)])
  return (n - 1) * np.mean(loo - value)


def _bias_data(seed, n, tiny=None):
  rng = np.random.default_rng(seed)
  r = rng.uniform(0, 1, n)
  a = rng.integers(0, 3, n)
  p = rng.uniform(0.02, 1, n)
  if tiny is not None:
    p[0] = tiny
  t = rng.dirichlet(np.ones(3), n)
  return r, a, p, t


@pytest.mark.parametrize("seed,n", [(0, 2), (1, 3), (2, 5), (3, 12), (4, 40)])
@pytest.mark.slow
def test_jackknife_bias_equals_a_leave_one_out_loop(seed, n):
  r, a, p, t = _bias_data(seed, n)
  w = t[np.arange(n), a] / p
  with jax.enable_x64(True):
    out = beta_ips_bias(r, a, p, t)
    assert isinstance(out, BetaIPSBias)
    value, beta = _plug_in_float64(r, w)
    np.testing.assert_allclose(out.bias, _jackknife_float64(r, w), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out.value, value, rtol=1e-12)
    np.testing.assert_allclose(out.baseline, beta, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out.value, beta_ips(r, a, p, t).value, rtol=1e-12)


@pytest.mark.parametrize("seed,n,tiny", [(5, 30, 1e-3), (6, 200, 1e-4), (7, 1000, 1e-2)])
@pytest.mark.slow
def test_jackknife_bias_in_float32_with_a_dominant_weight(seed, n, tiny):
  # A weight 1e2 to 1e4 times the others: without care the leave-one-out sums without the
  # dominant round cancel in float32. The reference loop gets the float32 inputs exactly.
  r, a, p, t = (x.astype(np.float32) if x.dtype.kind == "f" else x.astype(np.int32)
                for x in _bias_data(seed, n, tiny))
  w = (t[np.arange(n), a] / p).astype(np.float64)
  expected = _jackknife_float64(r.astype(np.float64), w)
  for out in (beta_ips_bias(r, a, p, t), jax.jit(beta_ips_bias)(r, a, p, t)):
    assert out.bias.dtype == jnp.float32
    np.testing.assert_allclose(out.bias, expected, rtol=1e-3)


@pytest.mark.slow
def test_jackknife_bias_special_cases():
  # Constant weights: every beta gives the same estimate, beta* = 0 and nothing to correct.
  constant = beta_ips_bias(R, np.zeros(4, int), np.full(4, 0.5), np.tile([0.5, 0.5], (4, 1)))
  assert float(constant.bias) == 0.0 and float(constant.baseline) == 0.0
  # Two rounds: each leave-one-out sample has one weight (beta*_{-i} = 0), V_{-i} = r_j w_j.
  r, w = np.array([0.3, 0.9]), np.array([2.0, 0.5])
  out = beta_ips_bias_from_rounds(LoggedRounds(r, w, np.zeros(2), np.zeros(2)))
  value = _plug_in_float64(r, w)[0]
  np.testing.assert_allclose(out.bias, np.mean(r * w) - value, rtol=1e-6)  # (n-1)(mean - V)


@pytest.mark.slow
def test_jackknife_bias_jit_vmap_and_gradient():
  data = random_datasets(5, batch=3, n=8)[:4]
  batched = jax.vmap(beta_ips_bias)(*data)
  for b in range(3):
    single = beta_ips_bias(*(x[b] for x in data))
    for x, y in zip(single, batched):
      np.testing.assert_allclose(y[b], x, rtol=1e-5, atol=1e-6)
  grad = jax.grad(lambda t: beta_ips_bias(R, A, P, t).bias)(jnp.asarray(T))
  assert np.all(np.isfinite(grad))


# A heavy-tailed logger: it avoids the actions that the target prefers, so the largest weight is
# 534 and E[w^2] = 144. At n = 400 (a few times E[w^2]) the plug-in's bias is a sizeable part
# of its stderr and the O(1/n) expansion the jackknife relies on holds; at much smaller n (or
# heavier tails) the jackknife underestimates the bias, as any O(1/n) correction does.
HT_CONTEXTS, HT_ACTIONS, HT_N, HT_M = 4, 8, 400, 10_000
HT_Q = np.random.default_rng(0).uniform(0.05, 0.95, (HT_CONTEXTS, HT_ACTIONS))
HT_PI_0 = softmax(-8.0 * HT_Q)
HT_PI = softmax(4.0 * HT_Q)
HT_V = float(np.mean(np.sum(HT_PI * HT_Q, axis=1)))


def _heavy_tailed_logs(seed):
  """HT_M logs of HT_N rounds, drawn with numpy (fixed seed) by inverse CDFs."""
  rng = np.random.default_rng(seed)
  x = rng.integers(0, HT_CONTEXTS, (HT_M, HT_N))
  a = np.sum(rng.random((HT_M, HT_N, 1)) > np.cumsum(HT_PI_0, axis=1)[x], axis=-1)
  a = np.minimum(a, HT_ACTIONS - 1)  # float rounding of the last cumulative probability
  r = (rng.random((HT_M, HT_N)) < HT_Q[x, a]).astype(np.float32)
  w = (HT_PI[x, a] / HT_PI_0[x, a]).astype(np.float32)
  return r, w


@pytest.mark.slow
def test_jackknife_has_the_sign_and_size_of_the_plug_in_bias():
  r, w = _heavy_tailed_logs(3)
  assert float(w.max()) > 100  # heavy-tailed
  # The reward model's fields are unused by beta*-IPS; r fills them.
  out = jax.jit(jax.vmap(lambda r, w: beta_ips_bias_from_rounds(LoggedRounds(r, w, r, r))))(
      r, w)
  values, biases = np.asarray(out.value, np.float64), np.asarray(out.bias, np.float64)
  se_values = values.std(ddof=1) / np.sqrt(HT_M)
  true_bias = values.mean() - HT_V
  # The plug-in's bias is real here (the check below has power) and the jackknife sees its sign.
  assert true_bias < -4 * se_values
  assert biases.mean() < -4 * biases.std(ddof=1) / np.sqrt(HT_M)
  # Its size: the corrected estimate value - bias is unbiased to O(1/n^2). Allow 4 standard
  # errors of the paired difference and a quarter of the bias for the remainder; an estimate of
  # 0 or of twice the bias fails.
  corrected = values - biases
  se_corrected = corrected.std(ddof=1) / np.sqrt(HT_M)
  assert abs(corrected.mean() - HT_V) <= 4 * se_corrected + 0.25 * abs(true_bias)
  assert 4 * se_corrected + 0.25 * abs(true_bias) < abs(true_bias)
