"""Bad scalar options for every public function of the bootstrap, ranking, sampler, schedules, rewards,
models, simulators and training loops.

One TABLE row per function: a builder of a small valid call (keyword arguments) and the domain of
each scalar option ("count", "level", "positive", ...). Hypothesis (derandomised by the profile in
tests/conftest.py) picks one option at a time and puts a bad value of its domain into it (0, -1,
2.5 for counts, NaN, inf, True, a string); the call must raise a ValueError or a TypeError whose
message names that option, and never fall back to a default. The arrays these functions take are
covered by tests/test_bad_inputs.py; this file is about the options.
"""

import functools
import re
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from saferl_jax import ope, parallel, ranking, stats
from saferl_jax.cltr import clicks
from saferl_jax.cltr.learning import relevance_data
from saferl_jax.data import click_logs, mixture2d, synthetic_bandit
from saferl_jax.data.ltr import make_ltr_dataset
from saferl_jax.diffusion import rewards, sampler, schedules
from saferl_jax.models import classifier, denoisers, policies, rankers
from saferl_jax.models.functional import as_functional
from saferl_jax.opl.objectives import logged_batch
from saferl_jax.training import classifier as train_classifier, finetuning, opl as train_opl
from saferl_jax.training import pretraining, ranker as train_ranker

KEY = jax.random.key(0)
F32 = np.float32
NAN, INF = float("nan"), float("inf")

# Bad values per domain. Every one must be refused; valid extremes (0 for a non-negative option,
# a negative inverse temperature) are not listed.
_TYPES = {"bool": True, "string": "x"}
BAD = {
    "count": {"zero": 0, "negative": -1, "fraction": 2.5, "nan": NAN, **_TYPES},
    "count>=2": {"one": 1, "zero": 0, "fraction": 2.5, "nan": NAN, **_TYPES},
    "level": {"zero": 0.0, "one": 1.0, "negative": -0.5, "nan": NAN, **_TYPES},
    "positive": {"zero": 0.0, "negative": -1.0, "nan": NAN, "inf": INF, **_TYPES},
    "nonnegative": {"negative": -1.0, "nan": NAN, "inf": INF, **_TYPES},
    "finite": {"nan": NAN, "inf": INF, "-inf": -INF, **_TYPES},
    "unit": {"negative": -0.1, "above 1": 1.5, "nan": NAN, **_TYPES},
    "open unit": {"zero": 0.0, "one": 1.0, "negative": -0.1, "nan": NAN, **_TYPES},
    "eta": {"zero": 0.0, "negative": -1.0, "above 1": 1.5, "nan": NAN, **_TYPES},
    "step index": {"negative": -1, "too large": 2, "fraction": 1.5, **_TYPES},
    "zlib level": {"negative": -1, "above 9": 10, "fraction": 2.5, "nan": NAN, **_TYPES},
}


class Row(NamedTuple):
  """fn(**make()) is a valid call; options maps option names to a key of BAD."""
  fn: Callable
  make: Callable
  options: dict
  run_valid: bool = True  # False where the valid call trains a model (too slow for this file)


# Small valid inputs.

def _logits():
  return dict(logits=np.array([0.5, -0.2, 1.0, 0.0], F32))


def _ranking_list(**extra):
  def make():
    return dict(logits=np.array([0.5, -0.2, 1.0], F32), relevance=np.array([1.0, 0.0, 2.0], F32),
                rank_weights=np.array([1.0, 0.5], F32), key=KEY, num_samples=4, **extra)
  return make


def _rounds():
  rounds = ope.logged_rounds(np.array([1.0, 0.0, 1.0, 0.0], F32), np.array([0, 1, 0, 1], np.int32),
                             np.full(4, 0.5, F32), np.full((4, 2), 0.5, F32))
  return ope.LoggedRounds(*(np.asarray(x) for x in rounds))  # numpy leaves, as users pass them


SCHEDULE = schedules.linear_schedule(20)


def _zeros_eps(params, x, t, c):
  del params, t, c
  return jnp.zeros_like(x)


def _sample(**extra):
  def make():
    return dict(apply_fn=_zeros_eps, params=None, conditions=np.array([0, 1], np.int32), key=KEY,
                schedule=SCHEDULE, num_steps=2, eta=1.0, shape=(2,), **extra)
  return make


# The shared inputs below are built on first use, not at import: every xdist worker imports every
# test file, and building them compiles.

@functools.cache
def _trajectory():
  return sampler.sample(_zeros_eps, None, np.array([0, 1], np.int32), key=KEY, schedule=SCHEDULE,
                        num_steps=2, eta=1.0, shape=(2,))


def _transitions(**extra):
  def make():
    return dict(apply_fn=_zeros_eps, params=None, trajectory=_trajectory(), schedule=SCHEDULE, eta=1.0,
                **extra)
  return make


@functools.cache
def _problem():
  return synthetic_bandit.make_problem(KEY, num_actions=3, dim_context=2, num_contexts=5)


@functools.cache
def _ltr():
  return make_ltr_dataset(KEY, num_queries=3, max_docs=4, min_docs=3, num_features=2)


CLICK_MODEL = clicks.position_based(2)


@functools.cache
def _simulated_click_log():
  return click_logs.simulate_click_log(np.zeros((2, 3), F32), np.array([[0, 1, 4], [2, 0, 1]]),
                                       CLICK_MODEL, key=KEY, num_sessions=8, propensity_samples=8)


def _click_log():
  return dict(logging_logits=np.zeros((2, 3), F32), labels=np.array([[0, 1, 4], [2, 0, 1]]),
              click_model=CLICK_MODEL, key=KEY, num_sessions=8, propensity_samples=8)


def _train_classifier():
  return dict(images=np.zeros((4, 8, 8, 1), F32), labels=np.array([0, 1, 2, 3]), key=KEY, steps=1,
              batch_size=2)


@functools.cache
def _mlp():
  """(apply_fn, params) of a small denoiser."""
  return as_functional(denoisers.MLPDenoiser(2, num_classes=2, hidden=(4,), rngs=nnx.Rngs(0)))


def _pretrain():
  return dict(model=denoisers.MLPDenoiser(2, num_classes=2, hidden=(4,), rngs=nnx.Rngs(0)),
              images=np.zeros((4, 2), F32), conditions=np.array([0, 1, 0, 1]), key=KEY,
              alphas_cumprod=np.asarray(SCHEDULE.alphas_cumprod), steps=1, batch_size=2,
              learning_rate=1e-3)


@functools.cache
def _policy():
  return as_functional(policies.LinearPolicy(2, 3, rngs=nnx.Rngs(0)))


def _train_opl():
  rng = np.random.default_rng(0)
  data = logged_batch(rng.normal(size=(6, 2)).astype(F32), rng.integers(0, 3, 6).astype(np.int32),
                      rng.uniform(size=6).astype(F32), np.full(6, 0.5, F32))
  apply_fn, params = _policy()
  return dict(apply_fn=apply_fn, params=params, data=data, key=KEY, method="ips", epochs=1,
              optimizer=optax.sgd(0.1))


@functools.cache
def _ranker():
  return as_functional(rankers.LinearRanker(2, rngs=nnx.Rngs(0)))


def _train_ranker():
  ltr, (apply_fn, params) = _ltr(), _ranker()
  data, num_sessions = relevance_data(ltr.features, ltr.labels, ltr.where)
  return dict(apply_fn=apply_fn, params=params, data=data, key=KEY, objective="value",
              num_sessions=num_sessions, rank_weights=ranking.dcg_rank_weights(2), steps=1,
              eval_every=1, optimizer=optax.sgd(0.1), num_samples=2)


def _finetune():
  apply_fn, params = _mlp()
  return dict(apply_fn=apply_fn, params=params, reward_fn=lambda x0, c: x0[:, 0], key=KEY,
              method="loop", rounds=1, eval_every=1, schedule=SCHEDULE, optimizer=optax.sgd(0.1),
              sampling=finetuning.Sampling(shape=(2,), num_classes=2, prompts_per_round=1,
                                           samples_per_prompt=2, num_steps=2))


def _module(cls, *args, **kwargs):
  """A row calling a module's constructor; the options are its keyword arguments."""
  return lambda **options: cls(*args, rngs=nnx.Rngs(0), **options)


def _with_positional(fn, *names):
  """fn(*[options.pop(name) for name in names], **options): options that are positional."""
  def call(**options):
    positional = [options.pop(name) for name in names]
    return fn(*positional, **options)
  return call


TABLE = {
    # stats and ope: the bootstrap.
    "stats.resample_indices": Row(_with_positional(stats.bootstrap.resample_indices, "key"),
                                  lambda: dict(key=KEY, num_resamples=2, num_rows=3),
                                  {"num_resamples": "count", "num_rows": "count"}),
    "stats.bootstrap_replicates": Row(stats.bootstrap_replicates,
                                      lambda: dict(statistic=jnp.mean, data=np.arange(5.0), key=KEY,
                                                   num_resamples=4, batch_size=2),
                                      {"num_resamples": "count", "batch_size": "count"}),
    "stats.bootstrap_interval": Row(stats.bootstrap_interval,
                                    lambda: dict(statistic=jnp.mean, data=np.arange(5.0), key=KEY,
                                                 num_resamples=4, batch_size=2),
                                    {"num_resamples": "count", "batch_size": "count", "delta": "level"}),
    "stats.percentile_interval": Row(stats.percentile_interval,
                                     lambda: dict(replicates=np.arange(5.0)), {"delta": "level"}),
    "ope.estimator_bootstrap_interval": Row(
        ope.estimator_bootstrap_interval,
        lambda: dict(estimator_from_rounds=ope.snips_from_rounds, rounds=_rounds(), key=KEY,
                     num_resamples=4, batch_size=2),
        {"num_resamples": "count", "batch_size": "count", "delta": "level"}),
    "ope.improves_on_logging": Row(
        ope.improves_on_logging,
        lambda: dict(estimate=ope.ips(np.array([1.0, 0.0, 1.0], F32), np.array([0, 1, 0]),
                                      np.full(3, 0.5, F32), np.full((3, 2), 0.5, F32)),
                     logged_rewards=np.array([1.0, 0.0, 0.0], F32)),
        {"delta": "level"}),
    # ranking.
    "ranking.sample_rankings": Row(ranking.sample_rankings, lambda: dict(_logits(), key=KEY, k=2,
                                                                         sample_shape=3),
                                   {"k": "count", "sample_shape": "count"}),
    "ranking.PlackettLuce.sample": Row(
        lambda **o: ranking.PlackettLuce(_logits()["logits"]).sample(**o),
        lambda: dict(key=KEY, sample_shape=2), {"sample_shape": "count"}),
    "ranking.PlackettLuce.sample_top_k": Row(
        lambda **o: ranking.PlackettLuce(_logits()["logits"]).sample_top_k(**o),
        lambda: dict(key=KEY, k=2), {"k": "count"}),
    "ranking.dcg_rank_weights": Row(ranking.dcg_rank_weights, lambda: dict(k=3), {"k": "count"}),
    "ranking.dcg_at_k": Row(ranking.dcg_at_k, lambda: dict(labels=np.array([2.0, 1.0, 0.0], F32),
                                                           rankings=np.array([0, 2, 1]), k=2),
                            {"k": "count"}),
    "ranking.ndcg_at_k": Row(ranking.ndcg_at_k, lambda: dict(labels=np.array([2.0, 1.0, 0.0], F32),
                                                             rankings=np.array([0, 2, 1]), k=2),
                             {"k": "count"}),
    "ranking.exposure_from_samples": Row(
        ranking.exposure_from_samples,
        lambda: dict(rankings=np.array([[0, 1, 2], [1, 0, 2]]), rank_weights=np.array([1.0, 0.5], F32),
                     num_items=3),
        {"num_items": "count"}),
    "ranking.expected_metric_from_samples": Row(
        ranking.expected_metric_from_samples,
        lambda: dict(logits=np.zeros(3, F32), labels=np.array([1.0, 0.0, 2.0], F32), key=KEY, k=2,
                     num_samples=4),
        {"k": "count", "num_samples": "count"}),
    "ranking.pl_rank_gradient": Row(ranking.pl_rank_gradient, _ranking_list(),
                                    {"num_samples": "count"}),
    "ranking.pl_rank_1_gradient": Row(ranking.pl_rank_1_gradient, _ranking_list(),
                                      {"num_samples": "count"}),
    "ranking.reinforce_gradient": Row(ranking.reinforce_gradient, _ranking_list(),
                                      {"num_samples": "count>=2"}),
    "ranking.exposure_objective_gradient": Row(
        ranking.exposure_objective_gradient,
        lambda: dict(logits=np.zeros(3, F32), objective=lambda e: e @ jnp.array([1.0, 0.0, 0.0]),
                     rank_weights=np.ones(2, F32), key=KEY, num_samples=4, num_exposure_samples=4),
        {"num_samples": "count", "num_exposure_samples": "count"}),
    # diffusion: schedules, the sampler and the rewards.
    "diffusion.linear_schedule": Row(schedules.linear_schedule,
                                     lambda: dict(num_train_steps=10, beta_start=1e-4, beta_end=0.02),
                                     {"num_train_steps": "count>=2", "beta_start": "open unit",
                                      "beta_end": "open unit"}),
    "diffusion.cosine_schedule": Row(schedules.cosine_schedule, lambda: dict(num_train_steps=10, s=0.008),
                                     {"num_train_steps": "count>=2", "s": "nonnegative"}),
    "diffusion.sampling_timesteps": Row(schedules.sampling_timesteps,
                                        lambda: dict(num_train_steps=10, num_sampling_steps=3),
                                        {"num_train_steps": "count>=2", "num_sampling_steps": "count"}),
    "diffusion.sample": Row(sampler.sample, _sample(samples_per_condition=2),
                            {"num_steps": "count", "samples_per_condition": "count", "eta": "eta"}),
    "diffusion.sample[guided]": Row(sampler.sample, _sample(guidance_scale=2.0, null_condition=2),
                                    {"guidance_scale": "nonnegative"}),
    "diffusion.trajectory_transitions": Row(sampler.trajectory_transitions,
                                            _transitions(guidance_scale=2.0, null_condition=2),
                                            {"eta": "eta", "guidance_scale": "nonnegative"}),
    "diffusion.trajectory_log_probs": Row(sampler.trajectory_log_probs,
                                          _transitions(guidance_scale=2.0, null_condition=2),
                                          {"eta": "eta", "guidance_scale": "nonnegative"}),
    "diffusion.compressibility_reward": Row(rewards.compressibility_reward,
                                            lambda: dict(x0=np.zeros((2, 4), F32), level=6),
                                            {"level": "zlib level"}),
    # models: the sizes of every module.
    "models.LinearPolicy": Row(_module(policies.LinearPolicy), lambda: dict(dim_context=2, num_actions=3),
                               {"dim_context": "count", "num_actions": "count"}),
    "models.MLPPolicy": Row(_module(policies.MLPPolicy), lambda: dict(dim_context=2, num_actions=3),
                            {"dim_context": "count", "num_actions": "count"}),
    "models.LinearRanker": Row(_module(rankers.LinearRanker), lambda: dict(num_features=2),
                               {"num_features": "count"}),
    "models.MLPRanker": Row(_module(rankers.MLPRanker), lambda: dict(num_features=2, hidden=(4,)),
                            {"num_features": "count"}),
    "models.MLPDenoiser": Row(_module(denoisers.MLPDenoiser),
                              lambda: dict(data_dim=2, num_classes=2, hidden=(4,), time_embedding_dim=4),
                              {"data_dim": "count", "num_classes": "count",
                               "time_embedding_dim": "count"}),
    # Building the U-Net takes seconds; tests/models builds it.
    "models.ConvDenoiser": Row(_module(denoisers.ConvDenoiser), lambda: dict(num_classes=2, channels=8),
                               {"num_classes": "count", "channels": "count"}, run_valid=False),
    "models.PatchConv": Row(_module(denoisers.PatchConv),
                            lambda: dict(in_features=1, out_features=2, kernel_size=3, stride=1),
                            {"in_features": "count", "out_features": "count", "kernel_size": "count",
                             "stride": "count"}),
    "models.DigitClassifier": Row(_module(classifier.DigitClassifier),
                                  lambda: dict(num_classes=3, hidden=(4,)), {"num_classes": "count>=2"}),
    "models.sinusoidal_embedding": Row(denoisers.sinusoidal_embedding,
                                       lambda: dict(t=np.array([0, 5]), dim=4, max_period=100.0),
                                       {"dim": "count>=2", "max_period": "positive"}),
    # data: simulators.
    "data.make_problem": Row(_with_positional(synthetic_bandit.make_problem, "key"),
                             lambda: dict(key=KEY, num_actions=3, dim_context=2, num_contexts=5),
                             {"num_actions": "count", "dim_context": "count", "num_contexts": "count",
                              "logger_inverse_temperature": "finite",
                              "target_inverse_temperature": "finite",
                              "reward_model_noise": "nonnegative"}),
    "data.softmax_policy": Row(synthetic_bandit.softmax_policy,
                               lambda: dict(expected_rewards=np.ones((2, 3), F32), inverse_temperature=1.0),
                               {"inverse_temperature": "finite"}),
    "data.simulate_log": Row(synthetic_bandit.simulate_log,
                             lambda: dict(problem=_problem(), key=KEY, num_rounds=4), {"num_rounds": "count"}),
    "data.simulate_logs": Row(synthetic_bandit.simulate_logs,
                              lambda: dict(problem=_problem(), keys=jax.random.split(KEY, 2), num_rounds=4),
                              {"num_rounds": "count"}),
    "data.sample_mixture": Row(mixture2d.sample_mixture,
                               lambda: dict(mixture=mixture2d.default_mixture(), key=KEY, num_samples=4),
                               {"num_samples": "count"}),
    "data.tilted_mixture": Row(mixture2d.tilted_mixture,
                               lambda: dict(mixture=mixture2d.default_mixture(), direction=[1.0, 0.0],
                                            kl_weight=1.0),
                               {"kl_weight": "positive"}),
    "data.mixture_mmd": Row(mixture2d.mixture_mmd,
                            lambda: dict(samples=np.zeros((4, 2), F32), mixture=mixture2d.default_mixture(),
                                         bandwidth=0.5),
                            {"bandwidth": "positive"}),
    "data.simulate_click_log": Row(click_logs.simulate_click_log, _click_log,
                                   {"num_sessions": "count", "propensity_samples": "count",
                                    "chunk_size": "count", "max_label": "count"}),
    "data.aggregate_sessions": Row(click_logs.aggregate_sessions,
                                   lambda: dict(query_ids=np.array([0, 1, 1]),
                                                rankings=np.array([[0, 1], [2, 0], [1, 2]]),
                                                clicks=np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], F32),
                                                num_queries=2, num_docs=3),
                                   {"num_queries": "count", "num_docs": "count"}),
    "diffusion.select_step": Row(sampler.select_step, lambda: dict(trajectory=_trajectory(), index=1),
                                 {"index": "step index"}),
    "data.estimated_rewards": Row(click_logs.estimated_rewards,
                                  lambda: dict(log=_simulated_click_log(), estimator="ips", min_propensity=0.1, l2=1.0),
                                  {"min_propensity": "unit", "l2": "nonnegative"}),
    "parallel.seed_sharding": Row(parallel.seed_sharding, lambda: dict(num_seeds=2), {"num_seeds": "count"}),
    # training: every option is checked before anything is compiled.
    "training.train_classifier": Row(train_classifier.train_classifier, _train_classifier,
                                     {"steps": "count", "batch_size": "count", "learning_rate": "positive",
                                      "num_classes": "count>=2"}, run_valid=False),
    "training.pretrain": Row(pretraining.pretrain, _pretrain,
                             {"steps": "count", "batch_size": "count", "learning_rate": "positive",
                              "label_dropout": "unit"}, run_valid=False),
    "training.opl.train": Row(train_opl.train, _train_opl,
                              {"epochs": "count", "batch_size": "count", "banditnet_lambda": "finite"},
                              run_valid=False),
    "training.train_ranker": Row(train_ranker.train_ranker, _train_ranker,
                                 {"steps": "count", "eval_every": "count", "num_samples": "count",
                                  "num_sessions": "count", "batch_queries": "count", "delta": "level",
                                  "clip_low": "nonnegative", "quantile": "unit"}, run_valid=False),
    "training.finetune": Row(finetuning.finetune, _finetune,
                             {"rounds": "count", "eval_every": "count", "epochs": "count",
                              "minibatches": "count", "clip_range": "positive",
                              "kl_weight": "nonnegative"}, run_valid=False),
}


def _names_option(message: str, name: str) -> bool:
  return re.search(rf"(^|[^\w]){re.escape(name)}\b", message) is not None


def _bad_cases(row: Row) -> list:
  return [(option, kind) for option, domain in row.options.items() for kind in BAD[domain]]


def _check_refused(name: str, option: str, kind: str) -> None:
  row = TABLE[name]
  args = row.make()
  args[option] = BAD[row.options[option]][kind]
  with pytest.raises((ValueError, TypeError)) as raised:
    row.fn(**args)
  assert _names_option(str(raised.value), option), (name, option, kind, str(raised.value))
  if kind in _TYPES:  # a bool or a string is the wrong type, not a wrong value
    assert isinstance(raised.value, TypeError), (name, option, kind, repr(raised.value))


VALID_ROWS = sorted(name for name, row in TABLE.items() if row.run_valid)


@pytest.mark.parametrize("name", VALID_ROWS)
@pytest.mark.slow
def test_valid_call_runs(name):
  """Every row's baseline call is valid, so a refusal below is the bad option's doing."""
  row = TABLE[name]
  row.fn(**row.make())


@pytest.mark.parametrize("name", sorted(TABLE))
@settings(max_examples=6)
@given(data=st.data())
def test_bad_option_raises_naming_it(name, data):
  option, kind = data.draw(st.sampled_from(_bad_cases(TABLE[name])), label="option, bad value")
  _check_refused(name, option, kind)


def test_every_bad_value_of_every_option_is_refused():
  """The hypothesis test samples; here every (option, bad value) pair of every row, in full (each
  is refused before any work, so the sweep is cheap)."""
  for name in sorted(TABLE):
    for option, kind in _bad_cases(TABLE[name]):
      _check_refused(name, option, kind)


def test_zero_exposure_samples_do_not_fall_back_to_num_samples():
  with pytest.raises(ValueError, match="num_exposure_samples"):
    ranking.exposure_objective_gradient(np.zeros(3, F32), jnp.sum, np.ones(2, F32), key=KEY,
                                        num_samples=4, num_exposure_samples=0)


def test_the_bootstrap_takes_numpy_data():
  """numpy leaves cannot be indexed by traced indices; they are converted, not refused."""
  interval = stats.bootstrap_interval(jnp.mean, np.arange(10.0), key=KEY, num_resamples=20)
  assert interval.lower <= 4.5 <= interval.upper
  interval = ope.estimator_bootstrap_interval(ope.snips_from_rounds, _rounds(), key=KEY,
                                              num_resamples=20)
  assert 0.0 <= interval.lower <= interval.upper <= 1.0


def test_the_bootstrap_names_the_rounds_not_its_internal_data():
  rounds = _rounds()._replace(weights=np.ones(3, F32))
  with pytest.raises(ValueError, match="^rounds: "):
    ope.estimator_bootstrap_interval(ope.snips_from_rounds, rounds, key=KEY, num_resamples=4)


@pytest.mark.parametrize("bad", [np.nan, -0.5, np.inf])
def test_train_ranker_checks_rank_weights_up_front(bad):
  args = _train_ranker()
  args["rank_weights"] = np.array([1.0, bad], F32)
  with pytest.raises(ValueError, match="^rank_weights: "):
    train_ranker.train_ranker(**args)


@pytest.mark.parametrize("loop, make", [(train_ranker.train_ranker, _train_ranker),
                                        (train_opl.train, _train_opl),
                                        (finetuning.finetune, _finetune)])
def test_nan_initial_params_are_a_value_error_not_a_learning_rate_problem(loop, make):
  args = make()
  args["params"] = jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), args["params"])
  with pytest.raises(ValueError, match="^params: "):
    loop(**args)


@pytest.mark.parametrize("field, value", [("num_steps", 0), ("prompts_per_round", 2.5),
                                          ("eta", np.nan), ("guidance_scale", np.nan)])
def test_finetune_names_the_sampling_field(field, value):
  args = _finetune()
  sampling = args["sampling"]
  args["sampling"] = finetuning.Sampling(**{**sampling.__dict__, field: value, "null_condition": 2})
  with pytest.raises(ValueError, match=rf"^sampling\.{field}: "):
    finetuning.finetune(**args)


def test_messages_name_the_callers_arguments_not_internal_ones():
  """k beyond the list names k (not `rankings`, which expected_metric_from_samples draws itself); a
  NaN gradient of the objective names `objective` (not PL-Rank's `relevance`)."""
  with pytest.raises(ValueError, match="^k: must be <= the 3 items of logits"):
    ranking.expected_metric_from_samples(np.zeros(3, F32), np.ones(3, F32), key=KEY, k=4, num_samples=2)
  with pytest.raises(ValueError, match="^objective: "):
    ranking.exposure_objective_gradient(np.zeros(3, F32), lambda e: jnp.sqrt(e[0] - 10.0),
                                        np.ones(2, F32), key=KEY, num_samples=4)
  args = _finetune()
  args["sampling"] = args["sampling"].__class__(**{**args["sampling"].__dict__, "num_steps": 20})
  with pytest.raises(ValueError, match=r"^sampling\.num_steps: "):
    finetuning.finetune(**args)
