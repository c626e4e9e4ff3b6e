"""Learning Plackett-Luce rankers from click logs, many seeds at once (floor 3).

`train_ranker` maximises one of `estimators.OBJECTIVES` (the plain value estimate, [SAFE]'s
risk-penalised one, [PRPO]'s clipped one, or [DRPO]'s hard-filtered imitation) over a ranker's parameters. Each step samples
rankings from the current policy to estimate every query's exposures, takes the objective's
gradient with respect to them, turns it into a gradient of the logits with PL-Rank
(`exposure_objective_gradient`) and back-propagates it through the ranker (one vjp), then takes
an optax step. S seeds run in one vmapped, jitted call through the one training driver
(`saferl_jax.training.driver`), the seed axis sharded over devices; the run is checkpointed after
every chunk of steps and resumes exactly (every step's randomness is fold_in(seed key, step)).

Supervised learning from labels is the same loop with the "value" objective and the true
relevance as rewards (`saferl_jax.cltr.relevance_data`): that is how the logging policy is fitted.

References:
  [SAFE] Gupta, Oosterhuis, de Rijke. Safe Deployment for Counterfactual Learning to Rank with
  Exposure-Based Risk Minimization. SIGIR 2023. https://arxiv.org/abs/2305.01522
  [PRPO] Gupta, Oosterhuis, de Rijke. Practical and Robust Safety Guarantees for Advanced
  Counterfactual Learning to Rank. CIKM 2024. https://arxiv.org/abs/2407.19943
  [PLR] Oosterhuis. Learning-to-Rank at the Speed of Sampling. SIGIR 2022. https://arxiv.org/abs/2204.10872
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

import functools
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.cltr.estimators import OBJECTIVES
from saferl_jax.cltr.learning import (RankingData, ascent_direction, check_ranking_data,
                                      estimated_objective)
from saferl_jax.training import driver
from saferl_jax.training.driver import TrainResult, TrainState


def _step(state: TrainState, data: tuple[RankingData, jax.Array], key: jax.Array,
          step_index: jax.Array, *, apply_fn, optimizer, batch_queries: int | None, options: tuple):
  """One optax step along the objective's gradient; its randomness is fold_in(key, step)."""
  data, rank_weights, num_sessions = data
  num_queries = data.session_counts.shape[0]
  step_key = jax.random.fold_in(key, step_index)
  batch = data
  if batch_queries is not None:
    batch_key, step_key = jax.random.split(step_key)
    # Batches come from the logged queries (n_q > 0): a query without sessions adds nothing to
    # any objective, so drawing it would only waste the step (at small N most queries have none).
    logged = data.session_counts > 0
    num_logged = jnp.sum(logged)
    index = jax.random.choice(batch_key, num_queries, (batch_queries,), replace=False,
                              p=logged / jnp.maximum(num_logged, 1))
    batch = jax.tree_util.tree_map(lambda x: x[index], data)
    # Sums over queries of a mini-batch, scaled to estimate the sums over all logged ones.
    batch = batch._replace(rewards=batch.rewards * (num_logged / batch_queries))
  gradient, value = ascent_direction(apply_fn, state.params, batch, key=step_key,
                                     rank_weights=rank_weights, num_sessions=num_sessions,
                                     **dict(options))
  descent = jax.tree_util.tree_map(jnp.negative, gradient)
  updates, opt_state = optimizer.update(descent, state.opt_state, state.params)
  return TrainState(optax.apply_updates(state.params, updates), opt_state), {"objective": value}


def train_ranker(
    apply_fn: Callable,
    params,
    data: RankingData,
    *,
    key: jax.Array,
    objective: str,
    num_sessions: int,
    rank_weights: ArrayLike,
    steps: int,
    optimizer: optax.GradientTransformation,
    num_samples: int = 32,
    batch_queries: int | None = None,
    delta: float = 0.05,
    clip_low: float = 0.8,
    clip_high: float = 1.2,
    quantile: float = 0.5,
    evaluate: Callable[[Any], dict] | None = None,
    eval_every: int = 10,
    validation: RankingData | None = None,
    validation_sessions: int | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_mismatch: str = "error",
    run_config: dict | None = None,
) -> TrainResult:
  """Maximises a click-log objective over a Plackett-Luce ranker, for S seeds at once.

  Args:
    apply_fn: apply_fn(params, features [Q, D, F]) -> logits [Q, D] (e.g. from `as_functional`
      of a `LinearRanker`).
    params: initial parameters with a leading seed axis [S, ...] (start from the logging
      policy's: PRPO's clipping only holds a policy near where it starts).
    data: a `RankingData`, shared by every seed ([Q, ...] fields) or one per seed (a leading
      seed axis on every field).
    key: [S] PRNG keys; a single key means S = 1 and no seed axis on params (nor on per-seed data).
    objective: one of `cltr.OBJECTIVES` (see `cltr.logged_objective`).
    num_sessions: N, the number of logged sessions.
    rank_weights: [K] the exposure's rank weights (e.g. `dcg_rank_weights(5)`).
    steps: gradient steps, a multiple of eval_every.
    optimizer: an optax optimizer, e.g. optax.adam(0.01); pass the same object again to reuse
      the compiled step.
    num_samples: rankings sampled per query and step (for the exposures and PL-Rank).
    batch_queries: queries per step, drawn without replacement from the queries with sessions
      (None: all queries); at most the number of logged queries.
    delta: [SAFE]'s failure probability.
    clip_low, clip_high: PRPO's clip range.
    quantile: DRPO's fraction of (query, document) pairs discarded by its hard filter.
    evaluate: optional jittable evaluate(params) -> {name: scalar} for one seed, recorded before
      training and every `eval_every` steps.
    eval_every: steps per chunk between evaluations and checkpoints.
    validation: optional held-out logged queries (a `RankingData` like `data`, shared or per
      seed): the objective's estimate on them is recorded as history["validation"] at every
      evaluation, for early stopping (pick the evaluation where it peaks: later steps never
      change earlier ones, so that equals stopping there). Its exposures use
      `num_samples` rankings per query drawn with a fixed key (common random numbers).
    validation_sessions: the number of sessions behind `validation` (its N); required with it.
    checkpoint_path: an orbax checkpoint directory, written after every chunk and resumed from
      when it holds this very run (data, initial parameters, keys, options, optimizer, evaluate,
      steps); another run's checkpoint raises a ValueError naming what differs.
    checkpoint_mismatch: "error", or "new" to checkpoint beside another run's checkpoint.
    run_config: optional JSON dict bound to the checkpoint (e.g. an experiment's whole config).

  Returns:
    A `TrainResult`; history["objective"] is [steps, S] (the objective at each step's estimated
    exposures) and each of evaluate's names is [steps / eval_every + 1, S].
  """
  checks.check_choice("objective", objective, OBJECTIVES)
  driver.check_chunks("steps", steps, eval_every)
  for name, value in (("num_samples", num_samples), ("num_sessions", num_sessions)):
    checks.check_count(name, value)
  if batch_queries is not None:
    checks.check_count("batch_queries", batch_queries)
  checks.check_real("delta", delta, low=0.0, high=1.0, open_low=True, open_high=True)
  checks.check_real("clip_low", clip_low, low=0.0)
  checks.check_real("clip_high", clip_high, low=float(clip_low))
  checks.check_real("quantile", quantile, low=0.0, high=1.0)
  checks.check_choice("checkpoint_mismatch", checkpoint_mismatch, driver.CHECKPOINT_MISMATCH)
  # The rank weights enter every step: a NaN or a negative weight would otherwise surface as a
  # FloatingPointError ("lower the learning rate") many steps later.
  rank_weights = checks.as_float("rank_weights", rank_weights)
  if rank_weights.ndim != 1 or rank_weights.shape[0] == 0:
    raise ValueError(f"rank_weights: expected a non-empty 1-d array [K], got shape "
                     f"{tuple(rank_weights.shape)}")
  checks.check_nonnegative("rank_weights", rank_weights)
  key, params, single_seed = driver.seed_axis(key, params)
  data = RankingData(*(jnp.asarray(x) for x in data))
  check_ranking_data(data)
  per_seed = data.session_counts.ndim == 2
  driver.check_data_seeds(data.session_counts.shape[0] if per_seed else None, key, single_seed)
  num_queries = data.session_counts.shape[-1]
  if batch_queries is not None:
    driver.check_batch_size("batch_queries", batch_queries, num_queries, what="Q")
    fewest_logged = int(jnp.min(jnp.sum(data.session_counts > 0, axis=-1)))
    if batch_queries > fewest_logged:
      raise ValueError(f"batch_queries: {batch_queries} exceeds the {fewest_logged} queries with "
                       "sessions (batches are drawn from the logged queries)")

  evaluate_data, evaluate_data_axes, full_evaluate = None, 0, evaluate
  if validation is not None:
    validation = RankingData(*(jnp.asarray(x) for x in validation))
    check_ranking_data(validation)
    if validation_sessions is None:
      raise ValueError("validation_sessions: required with validation (the held-out log's N)")
    checks.check_count("validation_sessions", validation_sessions)
    validation_per_seed = validation.session_counts.ndim == 2
    driver.check_data_seeds(validation.session_counts.shape[0] if validation_per_seed else None,
                            key, single_seed)
    # N enters as data, not as a static option: runs at another N reuse the compiled evaluation.
    evaluate_data = (validation, jnp.asarray(float(validation_sessions), jnp.float32))
    evaluate_data_axes = (0 if validation_per_seed else None, None)
    full_evaluate = _validated(evaluate, apply_fn, objective=objective,
                               rank_weights=tuple(float(w) for w in rank_weights),
                               num_samples=int(num_samples), delta=float(delta),
                               clip_low=float(clip_low), clip_high=float(clip_high),
                               quantile=float(quantile))

  state = TrainState(params, jax.vmap(optimizer.init)(params))
  options = dict(objective=objective, num_sessions=int(num_sessions), num_samples=int(num_samples),
                 delta=float(delta), clip_low=float(clip_low), clip_high=float(clip_high),
                 quantile=float(quantile))
  # N is data rather than a static option, so runs at several N compile the step once.
  run_data = (data, rank_weights, jnp.asarray(float(num_sessions), jnp.float32))
  # Fingerprinting costs a few eager updates and checksums: only for checkpointed runs.
  fingerprint = None if checkpoint_path is None else driver.fingerprint(
      loop="train_ranker", state=state, data=(run_data, evaluate_data), key=key, num_steps=steps,
      eval_every=eval_every, options={**options, "batch_queries": batch_queries},
      evaluate=evaluate, optimizer=optimizer, run_config=run_config)
  step_fn = driver.step_function(_step, apply_fn=apply_fn, optimizer=optimizer,
                                 batch_queries=batch_queries,
                                 options=tuple(sorted((k, v) for k, v in options.items()
                                                      if k != "num_sessions")))
  state, history, _ = driver.run(
      step_fn, state, run_data, key, num_steps=steps, eval_every=eval_every,
      fingerprint=fingerprint, data_axes=(0 if per_seed else None, None, None),
      evaluate=full_evaluate,
      evaluate_data=evaluate_data, evaluate_data_axes=evaluate_data_axes,
      checkpoint_path=checkpoint_path, checkpoint_mismatch=checkpoint_mismatch,
      description=f"train_ranker ({objective})")
  return driver.finish(state.params, history, single_seed)


@functools.lru_cache(maxsize=32)
def _validated(evaluate, apply_fn, *, rank_weights: tuple, **options):
  """evaluate(params) plus the objective's estimate on held-out logs: f(params, validation);
  one object per configuration, so repeated runs reuse the compiled evaluation."""

  def fn(params, held_out):
    validation, num_sessions = held_out
    metrics = {} if evaluate is None else dict(evaluate(params))
    key = jax.random.key(0)  # common random numbers: every evaluation sees the same samples
    metrics["validation"] = estimated_objective(apply_fn, params, validation, key=key,
                                                rank_weights=jnp.asarray(rank_weights),
                                                num_sessions=num_sessions, **options)
    return metrics

  fn.__name__ = f"validated_{getattr(evaluate, '__name__', 'none')}"
  return fn
