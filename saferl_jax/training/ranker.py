"""Learning Plackett-Luce rankers from click logs, many seeds at once (floor 3).

`train_ranker` maximises one of `estimators.OBJECTIVES` (the plain value estimate, [SAFE]'s
risk-penalised one, [PRPO]'s clipped one, or [DRPO]'s hard-filtered imitation) over a ranker's parameters. Each step samples
rankings from the current policy to estimate every query's exposures, takes the objective's
gradient with respect to them, turns it into a gradient of the logits with PL-Rank
(`exposure_objective_gradient`) and back-propagates it through the ranker (one vjp), then takes
an optax step. S seeds run in one vmapped, jitted call with the seed axis sharded over devices;
the run is checkpointed after every chunk of steps and resumes exactly (every step's randomness
is fold_in(seed key, step)).

Supervised learning from labels is the same loop with the "value" objective and the true
relevance as rewards (`relevance_data`): that is how the logging policy is fitted.

References:
  [SAFE] Gupta, Oosterhuis, de Rijke. Safe Deployment for Counterfactual Learning to Rank with
  Exposure-Based Risk Minimization. SIGIR 2023. https://arxiv.org/abs/2305.01522
  [PRPO] Gupta, Oosterhuis, de Rijke. Practical and Robust Safety Guarantees for Advanced
  Counterfactual Learning to Rank. CIKM 2024. https://arxiv.org/abs/2407.19943
  [PLR] Oosterhuis. Learning-to-Rank at the Speed of Sampling. SIGIR 2022. https://arxiv.org/abs/2204.10872
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from saferl_jax import checks
from saferl_jax.training import driver as training_runs
from saferl_jax.training.driver import TrainResult, TrainState
from saferl_jax.cltr.estimators import OBJECTIVES, logged_objective
from saferl_jax.parallel import seed_sharding
from saferl_jax.cltr.learning import RankingData, _check_data, ascent_direction, relevance_data


def _chunk(state: TrainState, data: RankingData, key: jax.Array, first_step: jax.Array, *,
           apply_fn, optimizer, num_steps: int, batch_queries: int | None, **options):
  """`num_steps` optax steps (lax.scan); step s uses fold_in(key, s), so chunks can be resumed."""
  num_queries = data.session_counts.shape[0]

  def step(state, step_index):
    step_key = jax.random.fold_in(key, step_index)
    batch = data
    if batch_queries is not None:
      batch_key, step_key = jax.random.split(step_key)
      index = jax.random.choice(batch_key, num_queries, (batch_queries,), replace=False)
      batch = jax.tree_util.tree_map(lambda x: x[index], data)
      # Sums over queries of a mini-batch, scaled to estimate the sums over all of them.
      batch = batch._replace(rewards=batch.rewards * (num_queries / batch_queries))
    gradient, value = ascent_direction(apply_fn, state.params, batch, key=step_key, **options)
    descent = jax.tree_util.tree_map(jnp.negative, gradient)
    updates, opt_state = optimizer.update(descent, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), opt_state), value

  state, values = jax.lax.scan(step, state, first_step + jnp.arange(num_steps))
  return state, jnp.mean(values)


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
    optimizer: optax.GradientTransformation | None = None,
    num_samples: int = 32,
    batch_queries: int | None = None,
    delta: float = 0.05,
    clip_low: float = 0.8,
    clip_high: float = 1.2,
    quantile: float = 0.5,
    evaluate: Callable[[Any], dict] | None = None,
    eval_every: int = 10,
    checkpoint_path: str | Path | None = None,
) -> TrainResult:
  """Maximises a click-log objective over a Plackett-Luce ranker, for S seeds at once.

  Args:
    apply_fn: apply_fn(params, features [Q, D, F]) -> logits [Q, D] (e.g. from `as_functional`
      of a `LinearRanker`).
    params: initial parameters with a leading seed axis [S, ...] (start from the logging
      policy's: PRPO's clipping only holds a policy near where it starts).
    data: a `RankingData` with a leading seed axis on every field.
    key: [S] PRNG keys; a single key means S = 1 and no seed axis on params and data.
    objective: "value", "safe" or "prpo" (see `estimators.logged_objective`).
    num_sessions: N, the number of logged sessions.
    rank_weights: [K] the exposure's rank weights (e.g. `dcg_rank_weights(5)`).
    steps: gradient steps, a multiple of eval_every.
    optimizer: optax optimizer (default adam(0.01)); pass the same object again to reuse the
      compiled step.
    num_samples: rankings sampled per query and step (for the exposures and PL-Rank).
    batch_queries: queries per step (None: all of them).
    delta: [SAFE]'s failure probability.
    clip_low, clip_high: PRPO's clip range.
    quantile: DRPO's fraction of (query, document) pairs discarded by its hard filter.
    evaluate: optional jittable evaluate(params) -> {name: scalar} for one seed, recorded before
      training and every `eval_every` steps.
    eval_every: steps per chunk between evaluations and checkpoints.
    checkpoint_path: a .npz file, written after every chunk and resumed from when it was
      written by the same configuration, data and initial parameters.

  Returns:
    A `TrainResult`; history["objective"] is [steps / eval_every, S] (the objective's mean over
    each chunk) and each of evaluate's names is [steps / eval_every + 1, S].
  """
  checks.check_choice("objective", objective, OBJECTIVES)
  training_runs.check_chunks("steps", steps, eval_every)
  for name, value in (("num_samples", num_samples), ("num_sessions", num_sessions)):
    checks.check_positive_int(name, value)
  checks.check_level_option("delta", delta)
  training_runs.check_seed_keys(key)
  data = RankingData(*(jnp.asarray(x) for x in data))
  _check_data(data)
  single_seed = key.ndim == 0
  if single_seed:
    key, params, data = key[None], *training_runs.add_seed_axis((params, data))
  num_seeds, num_queries = data.session_counts.shape
  if batch_queries is not None and not 1 <= batch_queries <= num_queries:
    raise ValueError(f"batch_queries: must be in [1, {num_queries}], got {batch_queries}")
  rank_weights = checks.as_float("rank_weights", rank_weights)
  optimizer = optax.adam(0.01) if optimizer is None else optimizer
  one_seed_params = jax.tree_util.tree_map(lambda x: x[0], params)
  evaluate_names = sorted(jax.eval_shape(evaluate, one_seed_params)) if evaluate else []

  sharding = seed_sharding(num_seeds)
  params, data, key = jax.device_put((params, data, key), sharding)
  state = jax.device_put(TrainState(params, jax.vmap(optimizer.init)(params)), sharding)
  options = dict(objective=objective, num_sessions=int(num_sessions), num_samples=int(num_samples),
                 delta=float(delta), clip_low=float(clip_low), clip_high=float(clip_high),
                 quantile=float(quantile))
  chunk_fn = _compiled_chunk(apply_fn, optimizer, int(eval_every), batch_queries,
                             tuple(sorted(options.items())), sharding)
  evaluate_fn = _compiled_evaluate(evaluate) if evaluate else (lambda params: {})

  fingerprint = json.dumps({**options, "eval_every": eval_every, "batch_queries": batch_queries,
                            "seeds": num_seeds, "tree": str(jax.tree_util.tree_structure(state)),
                            "evaluate": evaluate_names,
                            "sha256": training_runs.checksum((data, params, key, rank_weights))})
  history = {"objective": [], **{k: [v] for k, v in evaluate_fn(params).items()}}
  state, start, history = training_runs.resume(checkpoint_path, fingerprint, state, history, steps,
                                               sharding)

  for first_step in range(start, steps, eval_every):
    state, value = chunk_fn(state, data, key, first_step, rank_weights)
    if not bool(jnp.all(jnp.isfinite(value))):
      raise FloatingPointError(f"{objective}: non-finite objective at step {first_step + eval_every}; "
                               "lower the learning rate")
    history["objective"].append(value)
    for name, result in evaluate_fn(state.params).items():
      history[name].append(result)
    if checkpoint_path is not None:
      training_runs.save(checkpoint_path, fingerprint, state, first_step + eval_every, history)

  return training_runs.finish(state.params, history, num_seeds, single_seed)



@functools.lru_cache(maxsize=32)
def _compiled_chunk(apply_fn, optimizer, num_steps, batch_queries, options, sharding):
  """The jitted, seed-vmapped chunk of steps, kept across calls so they do not recompile."""
  options = dict(options)

  def chunk(state, data, key, first_step, rank_weights):
    return _chunk(state, data, key, first_step, apply_fn=apply_fn, optimizer=optimizer,
                  num_steps=num_steps, batch_queries=batch_queries, rank_weights=rank_weights,
                  **options)
  return jax.jit(jax.vmap(chunk, in_axes=(0, 0, 0, None, None)), out_shardings=sharding)


@functools.lru_cache(maxsize=32)
def _compiled_evaluate(evaluate):
  return jax.jit(jax.vmap(evaluate))
