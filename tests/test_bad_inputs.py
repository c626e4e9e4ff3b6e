"""Bad and extreme inputs for every public floor-1 function of the estimators, objectives and losses.

One TABLE row per function: a builder of small valid keyword arguments and the domain of each
argument that carries data ("probability", "finite", "index<A", ...). Hypothesis (derandomised by
the profile in tests/conftest.py) picks one argument at a time and puts a bad value of its domain
into it (0, a negative, NaN, inf, an out-of-range or int64-wrapping index, a wrong dtype); the call
must raise a ValueError or TypeError whose message names that argument. Extreme but valid values of
the same domains (propensities of 1e-20, zero exposures, a std of 1e-20) must give finite outputs.
"""

import re
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from saferl_jax import ope
from saferl_jax.cltr import clicks, estimators as cltr, learning as cltr_learning, reward_model
from saferl_jax.diffusion import flow, losses, step
from saferl_jax.diffusion.schedules import linear_schedule
from saferl_jax.opl import objectives as opl
from saferl_jax.stats import bounds

N, A = 5, 3  # rounds, actions
D, Q = 4, 2  # documents per list, queries
S, B = 2, 4  # denoising steps, samples
SCHEDULE = linear_schedule(100)
F32 = np.float32

# Bad values per domain: a function of the valid value (an array or a scalar) -> the bad one.
_NAN, _INF = F32(np.nan), F32(np.inf)
_STRINGS = lambda x: np.full(np.shape(x), "x")


def _at0(value):
  """Puts `value` at the first entry of an array (or replaces a scalar)."""
  def put(x):
    if np.ndim(x) == 0:
      return value
    y = np.array(x, copy=True)
    if np.issubdtype(y.dtype, np.integer) and not isinstance(value, (int, np.integer)):
      y = y.astype(np.asarray(value).dtype)
    y.reshape(-1)[0] = value
    return y
  return put


def _index_bad(size):
  return {"negative": _at0(-1), "too large": _at0(size),
          "wraps in int32": lambda x: np.asarray(x, np.int64) + np.int64(2**32),
          "float dtype": lambda x: np.asarray(x, F32)}


BAD = {
    "probability": {"zero": _at0(F32(0)), "negative": _at0(F32(-0.5)), "above 1": _at0(F32(1.5)),
                    "nan": _at0(_NAN), "inf": _at0(_INF), "strings": _STRINGS},
    "finite": {"nan": _at0(_NAN), "inf": _at0(_INF), "-inf": _at0(-_INF), "strings": _STRINGS},
    "nonnegative": {"negative": _at0(F32(-1)), "nan": _at0(_NAN), "inf": _at0(_INF),
                    "strings": _STRINGS},
    "unit": {"negative": _at0(F32(-0.1)), "above 1": _at0(F32(1.5)), "nan": _at0(_NAN)},
    "positive": {"zero": _at0(F32(0)), "negative": _at0(F32(-1)), "nan": _at0(_NAN),
                 "inf": _at0(_INF)},
    "count": {"zero": lambda x: 0, "negative": lambda x: -3, "nan": lambda x: float("nan"),
              "float": lambda x: 2.5},
    # A clip range of inf is valid: no clipping at all.
    "clip": {"zero": lambda x: 0.0, "negative": lambda x: -0.2, "nan": lambda x: float("nan")},
    "log_prob": {"nan": _at0(_NAN), "positive": _at0(F32(1.0)), "+inf": _at0(_INF),
                 "strings": _STRINGS},
    "distribution": {"nan": _at0(_NAN), "negative": _at0(F32(-0.5))},
    "level": {"zero": lambda x: 0.0, "one": lambda x: 1.0, "nan": lambda x: float("nan")},
    "eta": {"zero": lambda x: 0.0, "negative": lambda x: -0.5, "nan": lambda x: float("nan"),
            "underflows": lambda x: 1e-40},
}
for _size, _name in ((A, "index<A"), (Q, "index<Q"), (D, "index<D"), (2, "index<P"),
                     (5, "index<C")):
  BAD[_name] = _index_bad(_size)

# Extreme but valid values per domain: the output must stay finite.
EXTREME = {
    "probability": {"1e-20": _at0(F32(1e-20)), "all 1e-20": lambda x: np.full_like(x, 1e-20)},
    "nonnegative": {"zero": _at0(F32(0)), "1e-20": _at0(F32(1e-20))},
    "positive": {"1e-20": lambda x: F32(1e-20) if np.ndim(x) == 0 else _at0(F32(1e-20))(x)},
    "log_prob": {"-1e4": _at0(F32(-1e4)), "-inf": _at0(-_INF)},
    "eta": {"1e-20": lambda x: 1e-20, "1e-30": lambda x: 1e-30},
}


class Row(NamedTuple):
  """fn(**make(rng)) is a valid call; domains maps argument names to a key of BAD (and EXTREME)."""
  fn: Callable
  make: Callable
  domains: dict
  no_extreme: tuple = ()  # arguments whose extremes have a documented non-finite limit here


def _rng():
  return np.random.default_rng(0)


def _bandit(model=False):
  def make():
    rng = _rng()
    args = dict(rewards=rng.binomial(1, 0.5, N).astype(F32), actions=rng.integers(0, A, N).astype(np.int32),
                logging_probs=rng.uniform(0.2, 1.0, N).astype(F32),
                target_dist=rng.dirichlet(np.ones(A), N).astype(F32))
    if model:
      args["reward_hat"] = rng.uniform(0, 1, (N, A)).astype(F32)
    return args
  return make


def _bandit_slots():
  """A log of 2 slots: target_dist and reward_hat [N, A, 2] with positions [N] in [0, 2)."""
  args = _bandit(True)()
  rng = _rng()
  args["target_dist"] = np.stack([args["target_dist"], rng.dirichlet(np.ones(A), N).astype(F32)], -1)
  args["reward_hat"] = np.stack([args["reward_hat"], rng.uniform(0, 1, (N, A)).astype(F32)], -1)
  args["positions"] = rng.integers(0, 2, N).astype(np.int32)
  return args


BANDIT = {"rewards": "finite", "actions": "index<A", "logging_probs": "probability",
          "target_dist": "distribution"}
MODEL = dict(BANDIT, reward_hat="finite")


def _opl():
  rng = _rng()
  return dict(log_probs=np.log(rng.uniform(0.1, 1.0, N)).astype(F32),
              rewards=rng.uniform(0, 1, N).astype(F32), logging_probs=rng.uniform(0.2, 1.0, N).astype(F32))


OPL = {"log_probs": "log_prob", "rewards": "finite", "logging_probs": "probability"}


def _linear_policy(params, contexts):
  return contexts @ params


def _session(reward_hat=False):
  def make():
    rng = _rng()
    args = dict(clicks=rng.binomial(1, 0.5, D).astype(F32), rho=rng.uniform(0.1, 1, D).astype(F32),
                betabar=rng.uniform(0, 0.2, D).astype(F32))
    if reward_hat:
      args["reward_hat"] = rng.uniform(0, 1, D).astype(F32)
    return args
  return make


def _exposures():
  rng = _rng()
  return dict(exposure=rng.dirichlet(np.ones(D)).astype(F32),
              logging_exposure=rng.dirichlet(np.ones(D)).astype(F32))


def _logged_objective(objective):
  def make():
    rng = _rng()
    return dict(exposure=rng.dirichlet(np.ones(D), Q).astype(F32),
                logging_exposure=rng.dirichlet(np.ones(D), Q).astype(F32),
                rewards=rng.normal(size=(Q, D)).astype(F32), session_counts=np.array([3.0, 2.0], F32),
                objective=objective, num_sessions=5)
  return make


LOGGED = {"exposure": "nonnegative", "logging_exposure": "nonnegative", "rewards": "finite",
          "session_counts": "nonnegative", "num_sessions": "positive", "delta": "level"}


def _diffusion_pair(*names):
  def make():
    rng = _rng()
    return {name: rng.normal(size=3).astype(F32) for name in names}
  return make


def _ppo():
  rng = _rng()
  return dict(log_probs=rng.normal(size=(S, B)).astype(F32), old_log_probs=rng.normal(size=(S, B)).astype(F32),
              advantages=rng.normal(size=B).astype(F32), clip_range=0.2)


def _ppo_advantages():
  prompts, rewards = np.array([0, 0, 1, 1], np.int32), np.array([1, 3, 5, 6], F32)
  state = losses.reward_stats().update(losses.reward_stats().init(2), prompts, rewards)
  return dict(stats_state=state, prompts=prompts, rewards=rewards)


def _step(with_prev):
  def make():
    rng = _rng()
    args = dict(x_t=rng.normal(size=3).astype(F32), eps=rng.normal(size=3).astype(F32), t=50, t_prev=40,
                schedule=SCHEDULE, eta=1.0)
    if with_prev:
      args["x_prev"] = rng.normal(size=3).astype(F32)
    else:
      args["key"] = jax.random.key(0)
    return args
  return make


def _regression():
  rng = _rng()
  return dict(features=rng.normal(size=(Q, D, 2)).astype(F32), targets=rng.uniform(size=(Q, D)).astype(F32),
              weights=rng.integers(1, 4, (Q, D)).astype(F32))


def _sessions():
  rng = _rng()
  return dict(query_ids=np.array([0, 1, 1], np.int32),
              rankings=np.stack([rng.permutation(D) for _ in range(3)]).astype(np.int32),
              labels=rng.integers(0, 5, (Q, D)).astype(np.int32))


def _epsilon_loss():
  rng = _rng()
  return dict(apply_fn=lambda p, x, t, c: jnp.zeros_like(x), params=None,
              x0=rng.normal(size=(4, 2)).astype(F32), condition=np.array([0, 1, 2, 4], np.int32),
              key=jax.random.key(0), alphas_cumprod=np.linspace(0.99, 0.01, 10).astype(F32),
              label_dropout=0.1, null_condition=4)


def _flow_step(with_prev):
  def make():
    rng = _rng()
    args = dict(x_t=rng.normal(size=3).astype(F32), velocity=rng.normal(size=3).astype(F32), t=0.5,
                t_prev=0.4)
    if with_prev is not None:
      args["eta"] = 0.7
    if with_prev:
      args["x_prev"] = rng.normal(size=3).astype(F32)
    elif with_prev is False:
      args["key"] = jax.random.key(0)
    return args
  return make


def _flow_matching_loss():
  rng = _rng()
  return dict(apply_fn=lambda p, x, t, c: jnp.zeros_like(x), params=None,
              x0=rng.normal(size=(4, 2)).astype(F32), conditions=rng.normal(size=(4, 3)).astype(F32),
              key=jax.random.key(0), label_dropout=0.1, null_condition=np.zeros(3, F32))


TABLE = {
    # ope: estimators on logged arrays.
    "ope.ips": Row(ope.ips, _bandit(), BANDIT),
    "ope.snips": Row(ope.snips, _bandit(), BANDIT),
    "ope.beta_ips": Row(ope.beta_ips, _bandit(), BANDIT),
    "ope.dm": Row(lambda **a: ope.dm(a["target_dist"], a["reward_hat"]),
                  lambda: {k: v for k, v in _bandit(True)().items() if k in ("target_dist", "reward_hat")},
                  {"target_dist": "distribution", "reward_hat": "finite"}),
    "ope.dr": Row(ope.dr, _bandit(True), MODEL),
    "ope.sndr": Row(ope.sndr, _bandit(True), MODEL),
    "ope.switch_dr": Row(ope.switch_dr, lambda: dict(_bandit(True)(), tau=10.0), MODEL),
    "ope.dr_os": Row(ope.dr_os, lambda: dict(_bandit(True)(), lambda_=1.0), MODEL),
    "ope.sg_ips": Row(ope.sg_ips, lambda: dict(_bandit()(), lambda_=0.5), dict(BANDIT, lambda_="unit")),
    "ope.sg_dr": Row(ope.sg_dr, lambda: dict(_bandit(True)(), lambda_=0.5), dict(MODEL, lambda_="unit")),
    "ope.beta_ips_bias": Row(ope.beta_ips_bias, _bandit(), BANDIT),
    "ope.dr[positions]": Row(ope.dr, _bandit_slots,
                             dict(MODEL, target_dist="distribution", positions="index<P")),
    "ope.importance_weights": Row(
        ope.importance_weights, lambda: {k: v for k, v in _bandit()().items() if k != "rewards"},
        {"actions": "index<A", "logging_probs": "probability", "target_dist": "distribution"}),
    "ope.estimate_all": Row(ope.estimate_all, _bandit(True), MODEL),
    "ope.weight_diagnostics": Row(ope.weight_diagnostics, lambda: dict(weights=np.array([0.5, 2.0, 1.0], F32)),
                                  {"weights": "nonnegative"}),
    # stats: bounds on per-sample contributions.
    "stats.lower_bound": Row(bounds.lower_bound, lambda: dict(samples=np.array([0.1, 0.9, 0.4, 0.7], F32)),
                             {"samples": "finite", "delta": "level"}),
    "stats.confidence_interval": Row(
        bounds.confidence_interval, lambda: dict(samples=np.array([0.1, 0.9, 0.4, 0.7], F32)),
        {"samples": "finite", "delta": "level"}),
    "stats.safe_improvement_test": Row(
        bounds.safe_improvement_test,
        lambda: dict(samples=np.array([0.1, 0.9, 0.4, 0.7], F32), baseline_value=0.3),
        {"samples": "finite", "baseline_value": "finite"}),
    # opl: learning objectives.
    "opl.policy_weights": Row(opl.policy_weights,
                              lambda: {k: v for k, v in _opl().items() if k != "rewards"},
                              {"log_probs": "log_prob", "logging_probs": "probability"}),
    "opl.ips_objective": Row(opl.ips_objective, _opl, OPL),
    "opl.snips_objective": Row(opl.snips_objective, _opl, OPL),
    "opl.baseline_corrected_objective": Row(opl.baseline_corrected_objective,
                                            lambda: dict(_opl(), baseline=0.5),
                                            dict(OPL, baseline="finite")),
    "opl.value_optimal_baseline": Row(opl.value_optimal_baseline, _opl, OPL),
    "opl.filtered_likelihood_objective": Row(
        opl.filtered_likelihood_objective,
        lambda: dict({k: v for k, v in _opl().items() if k != "logging_probs"}, quantile=0.5),
        {"log_probs": "log_prob", "rewards": "finite"},
        no_extreme=("log_probs",)),  # a kept action of probability 0 has log-likelihood -inf
    "opl.logged_log_probs": Row(
        opl.logged_log_probs,
        lambda: dict(apply_fn=_linear_policy, params=np.ones((2, A), F32),
                     contexts=_rng().normal(size=(N, 2)).astype(F32),
                     actions=_rng().integers(0, A, N).astype(np.int32)),
        {"actions": "index<A"}),
    "opl.gradient_optimal_baseline": Row(
        opl.gradient_optimal_baseline,
        lambda: dict(rewards=_opl()["rewards"], per_example_grads={"w": _rng().normal(size=(N, 2)).astype(F32)}),
        {"rewards": "finite"}),
    "opl.corrected_gradient": Row(
        opl.corrected_gradient,
        lambda: dict(rewards=_opl()["rewards"], per_example_grads={"w": _rng().normal(size=(N, 2)).astype(F32)},
                     baseline=0.5),
        {"rewards": "finite", "baseline": "finite"}),
    "opl.gradient_variance": Row(
        opl.gradient_variance,
        lambda: dict(rewards=_opl()["rewards"], per_example_grads={"w": _rng().normal(size=(N, 2)).astype(F32)},
                     baseline=0.5),
        {"rewards": "finite", "baseline": "finite"}),
    "opl.logged_batch": Row(
        opl.logged_batch,
        lambda: dict(contexts=_rng().normal(size=(N, 2)).astype(F32), actions=_bandit()()["actions"],
                     rewards=_opl()["rewards"], logging_probs=_opl()["logging_probs"]),
        {"contexts": "finite", "rewards": "finite", "logging_probs": "probability"}),
    # cltr: click-based estimators and objectives.
    "cltr.ips_document_rewards": Row(cltr.ips_document_rewards, _session(),
                                     {"clicks": "nonnegative", "rho": "unit", "betabar": "unit"}),
    "cltr.dr_document_rewards": Row(cltr.dr_document_rewards, _session(True),
                                    {"clicks": "nonnegative", "rho": "unit", "betabar": "unit",
                                     "reward_hat": "finite"}),
    "cltr.query_rewards": Row(
        cltr.query_rewards,
        lambda: dict(session_count=F32(3.0), click_count=np.array([2, 0, 1, 3], F32),
                     rho=_session()()["rho"], betabar=_session()()["betabar"]),
        {"session_count": "nonnegative", "click_count": "nonnegative", "rho": "unit", "betabar": "unit"}),
    "cltr.policy_value": Row(cltr.policy_value,
                             lambda: dict(exposure=_exposures()["exposure"],
                                          document_rewards=_rng().normal(size=D).astype(F32)),
                             {"exposure": "nonnegative", "document_rewards": "finite"}),
    "cltr.exposure_divergence": Row(cltr.exposure_divergence, _exposures,
                                    {"exposure": "nonnegative", "logging_exposure": "nonnegative"}),
    "cltr.prpo_objective": Row(cltr.prpo_objective,
                               lambda: dict(_exposures(), document_rewards=_rng().normal(size=D).astype(F32)),
                               {"exposure": "nonnegative", "logging_exposure": "nonnegative",
                                "document_rewards": "finite"}),
    "cltr.safe_objective": Row(cltr.safe_objective,
                               lambda: dict(value_estimate=0.5, divergence=1.2, num_sessions=100),
                               {"value_estimate": "finite", "divergence": "nonnegative",
                                "num_sessions": "positive", "delta": "level"}),
    "cltr.propensity_floor": Row(cltr.propensity_floor, lambda: dict(num_sessions=100),
                                 {"num_sessions": "positive"}),
    "cltr.logged_objective[value]": Row(cltr.logged_objective, _logged_objective("value"), LOGGED),
    "cltr.logged_objective[safe]": Row(cltr.logged_objective, _logged_objective("safe"), LOGGED),
    "cltr.logged_objective[prpo]": Row(cltr.logged_objective, _logged_objective("prpo"), LOGGED),
    "cltr.fit_reward_regression": Row(reward_model.fit_reward_regression, _regression,
                                      {"features": "finite", "targets": "finite",
                                       "weights": "nonnegative"}),
    "cltr.predict_rewards": Row(
        reward_model.predict_rewards,
        lambda: dict(model=reward_model.RidgeModel(jnp.ones(2), jnp.zeros(())),
                     features=_regression()["features"]),
        {"features": "finite"}),
    "cltr.policy_aware_propensities": Row(
        lambda **a: cltr.policy_aware_propensities(click_model=clicks.position_based(2), key=jax.random.key(0),
                                                   **a),
        lambda: dict(logging_logits=_rng().normal(size=D).astype(F32), num_samples=8),
        {"logging_logits": "finite", "num_samples": "count"}),
    "cltr.click_model": Row(clicks.click_model,
                            lambda: dict(alpha=np.array([0.5, 0.25], F32), beta=np.array([0.1, 0.1], F32)),
                            {"alpha": "finite", "beta": "unit"}),
    "cltr.relevance_data": Row(
        lambda **a: cltr_learning.relevance_data(**a).data,
        lambda: dict(features=_regression()["features"], labels=_sessions()["labels"].astype(F32),
                     where=np.ones((Q, D), bool)),
        {"features": "finite", "labels": "nonnegative"}),
    "cltr.relevance_at_ranks": Row(clicks.relevance_at_ranks, _sessions,
                                   {"query_ids": "index<Q", "rankings": "index<D"}),
    "cltr.simulate_sessions": Row(
        lambda **a: clicks.simulate_sessions(clicks.position_based(2), **a, key=jax.random.key(0)),
        _sessions, {"query_ids": "index<Q", "rankings": "index<D"}),
    "cltr.click_probabilities": Row(
        lambda **a: clicks.click_probabilities(clicks.position_based(D), **a),
        lambda: dict(relevance_at_ranks=np.array([1.0, 0.5, 0.0, 0.25], F32)),
        {"relevance_at_ranks": "unit"}),
    # diffusion: fine-tuning losses and the DDIM step.
    "diffusion.reinforce_loss": Row(
        losses.reinforce_loss, lambda: {k: v for k, v in _ppo().items() if k in ("log_probs", "advantages")},
        {"log_probs": "finite", "advantages": "finite"}),
    "diffusion.ppo_loss": Row(losses.ppo_loss, _ppo,
                              {"log_probs": "finite", "old_log_probs": "finite", "advantages": "finite",
                               "clip_range": "clip"}),
    "diffusion.loop_advantages": Row(
        losses.loop_advantages, lambda: dict(rewards=np.array([[1, 2], [3, 5]], F32)), {"rewards": "finite"}),
    "diffusion.ppo_advantages": Row(losses.ppo_advantages, _ppo_advantages,
                                    {"prompts": "index<P", "rewards": "finite", "clip": "clip"}),
    "diffusion.reward_stats.update": Row(
        lambda **a: losses.reward_stats().update(losses.reward_stats().init(2), **a),
        lambda: {k: v for k, v in _ppo_advantages().items() if k != "stats_state"},
        {"prompts": "index<P", "rewards": "finite"}),
    "diffusion.epsilon_loss": Row(losses.epsilon_loss, _epsilon_loss,
                                  {"x0": "finite", "condition": "index<C"}),
    "diffusion.guided_eps": Row(
        step.guided_eps, lambda: dict(_diffusion_pair("eps_uncond", "eps_cond")(), guidance_scale=3.0),
        {"eps_uncond": "finite", "eps_cond": "finite", "guidance_scale": "finite"}),
    "diffusion.step_kl": Row(
        step.step_kl, lambda: dict(mean=np.ones(3, F32), reference_mean=np.ones(3, F32), std=F32(0.5)),
        {"mean": "finite", "reference_mean": "finite", "std": "positive"}),
    "diffusion.ddim_step": Row(step.ddim_step, _step(False), {"x_t": "finite", "eps": "finite", "eta": "eta"}),
    # A stored x_prev some distance from the mean has log-density -inf as sigma_t -> 0 (documented).
    "diffusion.step_log_prob": Row(step.step_log_prob, _step(True),
                                   {"x_prev": "finite", "x_t": "finite", "eps": "finite", "eta": "eta"},
                                   no_extreme=("eta",)),
    "diffusion.grpo_advantages": Row(
        losses.grpo_advantages, lambda: dict(rewards=np.array([[1, 2], [3, 5]], F32)), {"rewards": "finite"}),
    "diffusion.prompt_tracker.update": Row(
        lambda **a: losses.prompt_tracker(2, buffer_size=3, min_count=2).update(
            losses.prompt_tracker(2, buffer_size=3, min_count=2).init(), **a),
        lambda: dict(prompt_ids=np.array([0, 0, 1, -1], np.int32), rewards=np.array([1, 3, 5, 6], F32)),
        {"rewards": "finite"}),
    # flow: the rectified flow's SDE step (its eta is a noise level with no upper bound), its ODE
    # step and its loss.
    "diffusion.flow_sde_step": Row(flow.flow_sde_step, _flow_step(False),
                                   {"x_t": "finite", "velocity": "finite", "eta": "eta"}),
    "diffusion.flow_step_log_prob": Row(flow.flow_step_log_prob, _flow_step(True),
                                        {"x_prev": "finite", "x_t": "finite", "velocity": "finite",
                                         "eta": "eta"}, no_extreme=("eta",)),
    "diffusion.flow_ode_step": Row(flow.flow_ode_step, _flow_step(None),
                                   {"x_t": "finite", "velocity": "finite"}),
    "diffusion.flow_matching_loss": Row(flow.flow_matching_loss, _flow_matching_loss,
                                        {"x0": "finite", "conditions": "finite"}),
}


def _leaves_finite(out) -> bool:
  return all(np.all(np.isfinite(np.asarray(leaf, np.float64)))
             for leaf in jax.tree_util.tree_leaves(out) if not jax.dtypes.issubdtype(
                 jnp.result_type(leaf), jax.dtypes.prng_key))


def _names_argument(message: str, name: str) -> bool:
  return re.search(rf"(^|[^\w]){re.escape(name)}\b", message) is not None


def _bad_cases(row: Row) -> list:
  return [(arg, kind) for arg, domain in row.domains.items() for kind in BAD[domain]]


@pytest.mark.parametrize("name", sorted(TABLE))
@pytest.mark.slow
def test_valid_call_is_finite(name):
  row = TABLE[name]
  assert _leaves_finite(row.fn(**row.make()))


@pytest.mark.parametrize("name", sorted(TABLE))
@settings(max_examples=8)
@given(data=st.data())
def test_bad_value_raises_naming_the_argument(name, data):
  row = TABLE[name]
  arg, kind = data.draw(st.sampled_from(_bad_cases(row)), label="argument, bad value")
  args = row.make()
  args[arg] = BAD[row.domains[arg]][kind](args.get(arg))
  with pytest.raises((ValueError, TypeError)) as raised:
    row.fn(**args)
  assert _names_argument(str(raised.value), arg), (arg, kind, str(raised.value))


def _extreme_cases(row: Row) -> list:
  return [(arg, kind) for arg, domain in row.domains.items() if arg not in row.no_extreme
          for kind in EXTREME.get(domain, {})]


EXTREME_ROWS = sorted(name for name, row in TABLE.items() if _extreme_cases(row))


@pytest.mark.parametrize("name", EXTREME_ROWS)
def test_extreme_valid_values_give_finite_outputs(name):
  row = TABLE[name]
  for arg, kind in _extreme_cases(row):
    args = row.make()
    args[arg] = EXTREME[row.domains[arg]][kind](args.get(arg))
    assert _leaves_finite(row.fn(**args)), (arg, kind)


def test_every_bad_case_of_a_row_is_refused():
  """The hypothesis test samples; here every (argument, bad value) pair of a few rows, in full."""
  for name in ("ope.ips", "opl.ips_objective", "cltr.exposure_divergence", "diffusion.step_kl"):
    row = TABLE[name]
    for arg, kind in _bad_cases(row):
      args = row.make()
      args[arg] = BAD[row.domains[arg]][kind](args.get(arg))
      with pytest.raises((ValueError, TypeError)) as raised:
        row.fn(**args)
      assert _names_argument(str(raised.value), arg), (name, arg, kind, str(raised.value))
