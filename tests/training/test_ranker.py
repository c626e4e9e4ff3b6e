"""Learning rankers from click logs: the gradient against enumeration, learning, PRPO, resuming."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from saferl_jax import cltr
from saferl_jax.training import ranker as training
from saferl_jax.cltr.estimators import exposure_divergence
from saferl_jax.data.ltr import make_ltr_dataset
from saferl_jax.models.functional import as_functional
from saferl_jax.ranking import LinearRanker, dcg_rank_weights, exact_objective

RANK_WEIGHTS = dcg_rank_weights(3)


# The dataset and the ranker are built on first use, not when xdist's workers import the file.

@functools.cache
def ltr_data():
  return make_ltr_dataset(jax.random.key(0), num_queries=12, max_docs=5, min_docs=3, num_features=3)


@functools.cache
def _ranker():
  return as_functional(LinearRanker(3, rngs=nnx.Rngs(0)))


def apply_fn(params, *inputs):
  return _ranker()[0](params, *inputs)


def initial_params():
  return _ranker()[1]


OPTIMIZER = optax.adam(0.05)


def exact_exposure(logits, where):
  return jax.grad(lambda rho: exact_objective(logits, rho, RANK_WEIGHTS, where=where))(
      jnp.zeros_like(logits))


def supervised():
  ltr = ltr_data()
  return cltr.relevance_data(ltr.features, ltr.labels, ltr.where)


@pytest.mark.slow
def test_the_ascent_direction_matches_the_exact_gradient():
  """Mean over keys of the sampled parameter gradient = the gradient by enumerating rankings."""
  data, num_sessions = supervised()
  ltr = ltr_data()
  data = data._replace(logging_exposure=jax.vmap(exact_exposure)(
      jnp.zeros(ltr.where.shape), ltr.where))
  for objective in ("value", "safe"):
    def exact_fn(params):
      exposure = jax.vmap(exact_exposure)(apply_fn(params, ltr.features), ltr.where)
      return cltr.logged_objective(exposure, data.logging_exposure, data.rewards,
                                   data.session_counts, objective=objective,
                                   num_sessions=num_sessions, where=ltr.where)
    exact = ravel_pytree(jax.grad(exact_fn)(initial_params()))[0]
    estimates = jax.jit(jax.vmap(lambda k: ravel_pytree(cltr.ascent_direction(
        apply_fn, initial_params(), data, key=k, objective=objective, num_sessions=num_sessions,
        rank_weights=RANK_WEIGHTS, num_samples=16, delta=0.05, clip_low=0.8, clip_high=1.2)[0])[0]))(
            jax.random.split(jax.random.key(1), 2000))
    # 4 standard errors of the Monte Carlo mean, plus float32 rounding where the estimate has no
    # variance (the bias: PL is shift-invariant, so its gradient is a sum of Q D = 60 logit
    # gradients that cancel exactly; each rounds by at most eps times the largest gradient).
    rounding = ltr.where.size * np.finfo(np.float32).eps * np.abs(np.asarray(exact)).max()
    tolerance = 4 * np.asarray(estimates.std(0)) / np.sqrt(2000) + rounding
    np.testing.assert_array_less(np.abs(np.asarray(estimates.mean(0)) - np.asarray(exact)), tolerance)
    assert np.abs(np.asarray(exact)).max() > 5 * tolerance.max()


def expected_value(params):
  data, num_sessions = supervised()
  ltr = ltr_data()
  exposure = jax.vmap(exact_exposure)(apply_fn(params, ltr.features), ltr.where)
  return float(jnp.sum(exposure * data.rewards) / num_sessions)


@pytest.mark.slow
def test_supervised_learning_raises_the_exact_value():
  data, num_sessions = supervised()
  result = training.train_ranker(apply_fn, initial_params(), data, key=jax.random.key(2), objective="value",
                                 num_sessions=num_sessions, rank_weights=RANK_WEIGHTS, steps=60,
                                 optimizer=OPTIMIZER, eval_every=20,
                                 evaluate=lambda p: {"w": jnp.sum(p["linear"]["kernel"][...])})
  before, after = expected_value(initial_params()), expected_value(result.params)
  assert after > before + 0.1, (before, after)
  assert result.history["objective"].shape == (60,) and result.history["w"].shape == (4,)


@pytest.mark.slow
def test_seeds_run_together_equal_seeds_run_alone():
  data, num_sessions = supervised()
  keys = jax.random.split(jax.random.key(3), 2)
  stacked = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), (initial_params(), data))
  options = dict(objective="value", num_sessions=num_sessions, rank_weights=RANK_WEIGHTS, steps=10,
                 optimizer=OPTIMIZER, eval_every=10)
  together = training.train_ranker(apply_fn, stacked[0], stacked[1], key=keys, **options)
  for seed in range(2):
    alone = training.train_ranker(apply_fn, initial_params(), data, key=keys[seed], **options)
    np.testing.assert_allclose(ravel_pytree(jax.tree_util.tree_map(lambda x: x[seed], together.params))[0],
                               ravel_pytree(alone.params)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_prpo_keeps_exposures_near_the_logging_policy():
  """With rewards that favour reversing the logger, the plain objective moves exposures far.
  PRPO's clipping stops each document's own push once its ratio leaves [0.8, 1.2], but the
  ranker's shared parameters still move with the documents inside the range, so ratios do leave
  it (measured: 0.45 to 4.6, against 0.003 to 10 for the plain objective)."""
  ltr = ltr_data()
  logits = apply_fn(initial_params(), ltr.features)
  logging_exposure = jax.vmap(exact_exposure)(logits, ltr.where)
  rewards = jnp.where(ltr.where, -jax.nn.softmax(jnp.where(ltr.where, logits, -1e9)), 0.0)
  data = cltr.RankingData(ltr.features, ltr.where, rewards, jnp.ones(12), logging_exposure)
  divergence = {}
  for objective in ("value", "prpo"):
    result = training.train_ranker(apply_fn, initial_params(), data, key=jax.random.key(4), objective=objective,
                                   num_sessions=12, rank_weights=RANK_WEIGHTS, steps=100,
                                   optimizer=OPTIMIZER, num_samples=64, eval_every=50)
    exposure = jax.vmap(exact_exposure)(apply_fn(result.params, ltr.features), ltr.where)
    ratio = np.asarray(exposure / jnp.where(logging_exposure > 0, logging_exposure, 1.0))[np.asarray(ltr.where)]
    divergence[objective] = (ratio.min(), ratio.max(), float(jnp.mean(jax.vmap(exposure_divergence)(
        exposure, logging_exposure))))
  assert divergence["value"][0] < 0.01 and divergence["prpo"][0] > 0.3, divergence
  assert divergence["prpo"][1] < 0.6 * divergence["value"][1], divergence
  assert divergence["prpo"][2] < 0.6 * divergence["value"][2], divergence


@pytest.mark.slow
def test_resume_after_an_interrupt_equals_the_uninterrupted_run(tmp_path, interrupt_checkpoints):
  data, num_sessions = supervised()
  options = dict(key=jax.random.key(5), objective="safe", num_sessions=num_sessions,
                 rank_weights=RANK_WEIGHTS, steps=30, optimizer=OPTIMIZER, eval_every=10,
                 evaluate=lambda p: {"w": jnp.sum(p["linear"]["kernel"][...])})
  reference = training.train_ranker(apply_fn, initial_params(), data, **options)
  path = tmp_path / "run"
  interrupt_checkpoints.at = 20
  calls = interrupt_checkpoints.saved
  with pytest.raises(KeyboardInterrupt):
    training.train_ranker(apply_fn, initial_params(), data, checkpoint_path=path, **options)
  resumed = training.train_ranker(apply_fn, initial_params(), data, checkpoint_path=path, **options)
  assert calls == [10, 20, 30]  # the resumed run did only the last chunk
  np.testing.assert_array_equal(ravel_pytree(resumed.params)[0], ravel_pytree(reference.params)[0])
  for name in reference.history:
    np.testing.assert_array_equal(resumed.history[name], reference.history[name])
  # Other data or another learning rate: the checkpoint is refused, naming what differs.
  other = data._replace(rewards=data.rewards[::-1])
  with pytest.raises(ValueError, match="data_sha256"):
    training.train_ranker(apply_fn, initial_params(), other, checkpoint_path=path, **options)
  with pytest.raises(ValueError, match="optimizer"):
    training.train_ranker(apply_fn, initial_params(), data, checkpoint_path=path,
                          **(options | dict(optimizer=optax.adam(1e-5))))
  assert calls == [10, 20, 30]


def test_bad_input_is_named():
  data, num_sessions = supervised()
  options = dict(key=jax.random.key(0), num_sessions=num_sessions, rank_weights=RANK_WEIGHTS,
                 optimizer=OPTIMIZER)
  with pytest.raises(ValueError, match="objective"):
    training.train_ranker(apply_fn, initial_params(), data, objective="ips", steps=10, **options)
  with pytest.raises(ValueError, match="steps"):
    training.train_ranker(apply_fn, initial_params(), data, objective="value", steps=15, eval_every=10, **options)
  with pytest.raises(ValueError, match="data.rewards"):
    training.train_ranker(apply_fn, initial_params(), data._replace(rewards=data.rewards[:, :2]),
                          objective="value", steps=10, **options)
  with pytest.raises(ValueError, match="data.rewards"):
    training.train_ranker(apply_fn, initial_params(), data._replace(rewards=data.rewards.at[0, 0].set(jnp.nan)),
                          objective="value", steps=10, **options)
  with pytest.raises(ValueError, match="batch_queries"):
    training.train_ranker(apply_fn, initial_params(), data, objective="value", steps=10, batch_queries=13,
                          **options)


@pytest.mark.slow
def test_mini_batches_of_queries_also_learn():
  data, num_sessions = supervised()
  result = training.train_ranker(apply_fn, initial_params(), data, key=jax.random.key(6), objective="value",
                                 num_sessions=num_sessions, rank_weights=RANK_WEIGHTS, steps=60,
                                 optimizer=OPTIMIZER, batch_queries=4, eval_every=20)
  assert expected_value(result.params) > expected_value(initial_params()) + 0.1


@pytest.mark.slow
def test_validation_history_is_the_held_out_estimate_per_seed():
  """history["validation"] records, per seed and evaluation, the objective on that seed's
  held-out logs; it equals `estimated_objective` recomputed on the final parameters."""
  data, num_sessions = supervised()
  # Two seeds with different held-out "logs": the second's rewards are the first's reversed.
  held_out = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), data)
  held_out = held_out._replace(rewards=held_out.rewards.at[1].set(1.0 - held_out.rewards[1]))
  keys = jax.random.split(jax.random.key(3), 2)
  params = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), initial_params())
  result = training.train_ranker(apply_fn, params, data, key=keys, objective="value",
                                 num_sessions=num_sessions, rank_weights=RANK_WEIGHTS, steps=20,
                                 optimizer=OPTIMIZER, eval_every=10, validation=held_out,
                                 validation_sessions=num_sessions)
  history = result.history["validation"]
  assert history.shape == (3, 2)
  for seed in range(2):
    one = jax.tree_util.tree_map(lambda x: x[seed], held_out)
    final = jax.tree_util.tree_map(lambda x: x[seed], result.params)
    expected = cltr.estimated_objective(
        apply_fn, final, one, key=jax.random.key(0), objective="value", num_sessions=num_sessions,
        rank_weights=RANK_WEIGHTS, num_samples=32, delta=0.05, clip_low=0.8, clip_high=1.2)
    np.testing.assert_allclose(history[-1, seed], expected, rtol=1e-5)
  # Learning on the labels raises the first seed's held-out value and lowers the reversed one's.
  assert history[-1, 0] > history[0, 0] and history[-1, 1] < history[0, 1]
  with pytest.raises(ValueError, match="validation_sessions"):
    training.train_ranker(apply_fn, initial_params(), data, key=jax.random.key(0), objective="value",
                          num_sessions=num_sessions, rank_weights=RANK_WEIGHTS, steps=10,
                          optimizer=OPTIMIZER, validation=data)
