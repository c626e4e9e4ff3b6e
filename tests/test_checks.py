"""Tests for saferl_jax.checks.check_key and its use at every public function that takes a key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import saferl_jax as sj
from saferl_jax import checks, fast_random, parallel
from saferl_jax.data import digits, ltr, mixture2d

MESSAGE = ("key: expected a typed PRNG key from jax.random.key, got an array of dtype uint32; "
           "wrap legacy keys with jax.random.wrap_key_data")
LEGACY = jax.random.PRNGKey(0)


def test_check_key_accepts_typed_keys_and_refuses_the_rest():
  checks.check_key("key", jax.random.key(0))
  checks.check_key("keys", jax.random.split(jax.random.key(0), 3))
  checks.check_key("key", jax.random.wrap_key_data(LEGACY))
  jax.jit(lambda k: checks.check_key("key", k))(jax.random.key(0))  # tracers carry the dtype
  with pytest.raises(ValueError) as info:
    checks.check_key("key", LEGACY)
  assert str(info.value) == MESSAGE
  with pytest.raises(ValueError, match="seed: expected a typed PRNG key.*dtype int32"):
    checks.check_key("seed", jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="key: expected a typed PRNG key"):
    checks.check_key("key", 0)


def _problem():
  return sj.data.make_problem(jax.random.key(0), num_actions=3, num_contexts=4)


def _ltr():
  return ltr.make_ltr_dataset(jax.random.key(0), num_queries=4, max_docs=3, min_docs=2, num_features=2)


LOGITS, LABELS = jnp.zeros((2, 3)), jnp.zeros((2, 3), int)
RULES = sj.diffusion.linear_schedule(10)

# Every public function outside training/ that takes a key, called with a legacy one.
CALLS = {
    "make_problem": lambda key: sj.data.make_problem(key),
    "simulate_log": lambda key: sj.data.simulate_log(_problem(), key=key, num_rounds=2),
    "simulate_logs": lambda key: sj.data.simulate_logs(_problem(), keys=key[None], num_rounds=2),
    "make_ltr_dataset": lambda key: ltr.make_ltr_dataset(key, num_queries=2),
    "ltr.split": lambda key: ltr.split(_ltr(), key=key),
    "digits.split": lambda key: digits.split(digits.Digits(jnp.zeros((4, 8, 8, 1)), jnp.zeros(4, int)),
                                             key=key),
    "sample_mixture": lambda key: mixture2d.sample_mixture(mixture2d.default_mixture(), key=key,
                                                           num_samples=2),
    "simulate_click_log": lambda key: sj.cltr.simulate_click_log(
        LOGITS, LABELS, sj.cltr.position_based(2), key=key, num_sessions=2),
    "simulate_clicks": lambda key: sj.cltr.simulate_clicks(sj.cltr.position_based(2), jnp.ones(2),
                                                           key=key),
    "simulate_sessions": lambda key: sj.cltr.simulate_sessions(
        sj.cltr.position_based(2), jnp.zeros(1, int), jnp.zeros((1, 3), int).at[0].set(jnp.arange(3)),
        LABELS, key=key),
    "policy_aware_propensities": lambda key: sj.cltr.policy_aware_propensities(
        LOGITS[0], sj.cltr.position_based(2), key=key),
    "ascent_direction": lambda key: sj.cltr.ascent_direction(
        None, None, None, key=key, objective="value", num_sessions=1, rank_weights=jnp.ones(1),
        num_samples=1, delta=0.1, clip_low=0.8, clip_high=1.2),
    "sample_rankings": lambda key: sj.ranking.sample_rankings(LOGITS, key=key),
    "PlackettLuce.sample": lambda key: sj.ranking.PlackettLuce(LOGITS).sample(seed=key),
    "PlackettLuce.sample_top_k": lambda key: sj.ranking.PlackettLuce(LOGITS).sample_top_k(k=1, key=key),
    "pl_rank_gradient": lambda key: sj.ranking.pl_rank_gradient(
        LOGITS, LOGITS, jnp.ones(1), key=key, num_samples=2),
    "pl_rank_1_gradient": lambda key: sj.ranking.pl_rank_1_gradient(
        LOGITS, LOGITS, jnp.ones(1), key=key, num_samples=2),
    "reinforce_gradient": lambda key: sj.ranking.reinforce_gradient(
        LOGITS, LOGITS, jnp.ones(1), key=key, num_samples=2),
    "exposure_objective_gradient": lambda key: sj.ranking.exposure_objective_gradient(
        LOGITS, jnp.sum, jnp.ones(1), key=key, num_samples=2),
    "expected_metric_from_samples": lambda key: sj.ranking.expected_metric_from_samples(
        LOGITS, LABELS, key=key, k=1, num_samples=2),
    "resample_indices": lambda key: sj.stats.resample_indices(key, num_resamples=2, num_rows=3),
    "bootstrap_replicates": lambda key: sj.stats.bootstrap_replicates(jnp.mean, jnp.ones(3), key=key),
    "bootstrap_interval": lambda key: sj.stats.bootstrap_interval(jnp.mean, jnp.ones(3), key=key),
    "estimator_bootstrap_interval": lambda key: sj.ope.estimator_bootstrap_interval(
        sj.ope.ips_from_rounds, sj.ope.logged_rounds(jnp.ones(2), jnp.zeros(2, int), jnp.ones(2),
                                                     jnp.ones((2, 1))), key=key),
    "diffusion.sample": lambda key: sj.diffusion.sample(
        lambda p, x, t, c: 0 * x, None, jnp.zeros(1, int), key=key, schedule=RULES, num_steps=2,
        eta=1.0, shape=(2,)),
    "ddim_step": lambda key: sj.diffusion.ddim_step(jnp.zeros(2), jnp.zeros(2), 5, 3, RULES, key=key,
                                                    eta=1.0),
    "gumbel": lambda key: fast_random.gumbel(key, (2,)),
    "map_over_seeds": lambda key: parallel.map_over_seeds(lambda k: k, key[None]),
}


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.slow
def test_every_public_function_refuses_legacy_keys(name):
  with pytest.raises(ValueError, match="expected a typed PRNG key from jax.random.key.*wrap_key_data"):
    CALLS[name](LEGACY)


@pytest.mark.parametrize("name", ["simulate_log", "sample_rankings", "pl_rank_gradient", "gumbel",
                                  "resample_indices"])
@pytest.mark.slow
def test_wrapped_legacy_keys_are_accepted(name):
  out = CALLS[name](jax.random.wrap_key_data(LEGACY))
  assert all(np.all(np.isfinite(np.asarray(x, float))) for x in jax.tree_util.tree_leaves(out))


def test_as_int_refuses_int64_values_that_would_wrap():
  assert checks.as_int("ids", np.array([0, 2**31 - 1], np.int64)).tolist() == [0, 2**31 - 1]
  with pytest.raises(ValueError, match="^ids:.*wrap"):
    checks.as_int("ids", np.array([2**32 + 1], np.int64))  # jnp.asarray would give 1
  with pytest.raises(ValueError, match="^ids:.*wrap"):
    checks.as_int("ids", -(2**40))
  with pytest.raises(ValueError, match="^ids: every item must be in \\[0, 3\\)"):
    checks.as_index("ids", np.array([0, 3]), 3, what="item")


def test_value_check_helpers_name_the_argument():
  with pytest.raises(ValueError, match="^counts: every value must be >= 0"):
    checks.check_nonnegative("counts", jnp.array([1.0, -1.0]))
  with pytest.raises(ValueError, match="^counts: contains 1 NaN"):
    checks.check_nonnegative("counts", jnp.array([1.0, jnp.nan]))
  checks.check_nonnegative("counts", jnp.array([1.0, jnp.nan]), where=jnp.array([True, False]))
  with pytest.raises(ValueError, match="^log_probs: log-probabilities must be <= 0"):
    checks.check_log_probs("log_probs", jnp.array([-1.0, 0.5]))
  checks.check_log_probs("log_probs", jnp.array([-jnp.inf, 0.0]))
  with pytest.raises(ValueError, match="^num_sessions: must be > 0"):
    checks.check_scalar("num_sessions", 0, low=0.0, strict_low=True)
  # Inside jit the caller answers for its data: no check, no error.
  jax.jit(lambda x: checks.check_nonnegative("counts", x) or x)(jnp.array([-1.0]))
