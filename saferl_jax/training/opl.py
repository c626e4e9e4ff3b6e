"""Learning softmax policies from logged bandit feedback, many seeds at once (floor 3).

`train` runs jit-compiled optax epochs (mini-batch or full-batch) for S seeds in one vmapped
call, the seed axis sharded over all devices, and checkpoints after every epoch so a stopped
run resumes with nothing lost: each epoch's shuffling key is fold_in(seed key, epoch), so a
resumed run equals an uninterrupted one bit for bit.

Methods (the gradient each mini-batch follows):
  "ips":        grad of mean r w(theta)
  "snips":      grad of sum r w / sum w
  "banditnet":  grad of mean (r - lambda) w, a fixed baseline lambda (chosen on a grid by the caller)
  "beta_value": the same with beta* = Cov(r w, w) / Var(w), the value-variance-optimal baseline
  "beta_grad":  the same with beta*_grad = E[r ||grad w||^2] / E[||grad w||^2] from per-example
                gradients, the gradient-variance-optimal baseline [OB]

References:
  [OB] Gupta, Jeunen, Oosterhuis, de Rijke. Optimal Baseline Corrections for Off-Policy
  Contextual Bandits. RecSys 2024. https://arxiv.org/abs/2405.05736
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from saferl_jax import checks
from saferl_jax.training import driver as training_runs
from saferl_jax.training.driver import TrainResult, TrainState
from saferl_jax.opl import objectives as obj
from saferl_jax.parallel import seed_sharding

from saferl_jax.opl.objectives import METHODS, logged_batch, method_gradient



def _epoch(state: TrainState, data: obj.LoggedBatch, key: jax.Array, epoch: jax.Array, *, apply_fn,
           optimizer, method: str, batch_size: int, banditnet_lambda: float):
  """One pass over a seed's data in shuffled mini-batches (lax.scan over batches).

  The shuffle depends only on (key, epoch), so a resumed run repeats an uninterrupted one.
  """
  n = data.rewards.shape[0]
  num_batches = n // batch_size
  order = jax.random.permutation(jax.random.fold_in(key, epoch), n)[: num_batches * batch_size].reshape(num_batches, batch_size)

  def step(state, indices):
    batch = jax.tree_util.tree_map(lambda x: x[indices], data)
    grads, baseline = method_gradient(method, apply_fn, state.params, batch,
                                      banditnet_lambda=banditnet_lambda)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), opt_state), baseline

  state, baselines = jax.lax.scan(step, state, order)
  return state, jnp.mean(baselines)


def train(
    apply_fn: Callable,
    params,
    data: obj.LoggedBatch,
    *,
    key: jax.Array,
    method: str,
    epochs: int,
    optimizer: optax.GradientTransformation | None = None,
    batch_size: int | None = None,
    banditnet_lambda: float = 0.0,
    evaluate: Callable[[Any], dict] | None = None,
    checkpoint_path: str | Path | None = None,
) -> TrainResult:
  """Trains a softmax policy on logged feedback, for S seeds at once.

  Args:
    apply_fn: apply_fn(params, contexts [n, d]) -> logits [n, A].
    params: initial parameters with a leading seed axis [S, ...].
    data: a `LoggedBatch` with a leading seed axis ([S, n, d] and [S, n]) (see `logged_batch`).
    key: [S] PRNG keys (one per seed) for shuffling; a single key means S = 1 and no seed
      axis on params and data.
    method: one of METHODS.
    epochs: passes over the data.
    optimizer: an optax optimizer (default adam(0.05)).
    batch_size: mini-batch size; None for full-batch gradient steps.
    banditnet_lambda: the baseline for "banditnet".
    evaluate: optional jittable evaluate(params) -> {name: scalar} for one seed, recorded before
      training and after every epoch (e.g. the true policy value in a simulator).
    (Compilation is cached across calls that pass the same apply_fn and optimizer objects and
    options, so create the optimizer once when calling `train` repeatedly.)
    checkpoint_path: a .npz file; written after every epoch and resumed from when it exists
      and was written by the same run configuration (same method, options, data shape and
      parameter structure, the same data and initial parameters, and no more epochs than asked
      for now). The optimizer's settings are not recorded: use one path per run.

  Returns:
    A `TrainResult`. history["baseline"] is [epochs, S] (mean baseline per epoch); each of
    evaluate's names is [epochs + 1, S] (before training, then after each epoch).
  """
  checks.check_choice("method", method, METHODS)
  if epochs < 1:
    raise ValueError(f"epochs: must be >= 1, got {epochs}")
  training_runs.check_seed_keys(key)
  single_seed = key.ndim == 0
  if single_seed:
    key, params, data = key[None], *training_runs.add_seed_axis((params, data))
  num_seeds, n = data.rewards.shape[:2]
  batch_size = n if batch_size is None else batch_size
  if not 1 <= batch_size <= n:
    raise ValueError(f"batch_size: must be in [1, n={n}], got {batch_size}")
  optimizer = optax.adam(0.05) if optimizer is None else optimizer
  one_seed_params = jax.tree_util.tree_map(lambda x: x[0], params)
  n_actions = jax.eval_shape(apply_fn, one_seed_params, data.contexts[0, :1]).shape[-1]
  if checks.is_concrete(data.actions) and int(jnp.max(data.actions)) >= n_actions:
    raise ValueError(f"actions: the policy scores {n_actions} actions, but the data has action "
                     f"{int(jnp.max(data.actions))}")
  evaluate_names = (sorted(jax.eval_shape(evaluate, one_seed_params)) if evaluate is not None else [])

  sharding = seed_sharding(num_seeds)
  # Inputs and outputs share one sharding, so the second epoch reuses the first's compilation.
  params, data, key = jax.device_put((params, data, key), sharding)
  state = jax.device_put(TrainState(params, jax.vmap(optimizer.init)(params)), sharding)
  epoch_fn = _compiled_epoch(apply_fn, optimizer, method, batch_size, banditnet_lambda, sharding)
  evaluate_fn = _compiled_evaluate(evaluate) if evaluate is not None else (lambda params: {})

  # The run's identity, without `epochs`: a finished run can be extended by asking for more.
  fingerprint = json.dumps({"method": method, "batch_size": batch_size,
                            "lambda": banditnet_lambda, "seeds": num_seeds, "n": n,
                            "tree": str(jax.tree_util.tree_structure(state)),
                            "evaluate": evaluate_names,
                            "data_and_init_sha256": training_runs.checksum((data, params, key))})
  history = {"baseline": [], **{k: [v] for k, v in evaluate_fn(params).items()}}
  state, start, history = training_runs.resume(checkpoint_path, fingerprint, state, history, epochs,
                                               sharding)

  for epoch in range(start, epochs):
    state, baseline = epoch_fn(state, data, key, epoch)
    if not bool(jnp.all(jnp.isfinite(baseline))):
      raise FloatingPointError(f"{method}: non-finite baseline at epoch {epoch + 1}; lower the learning rate")
    history["baseline"].append(baseline)
    for name, value in evaluate_fn(state.params).items():
      history[name].append(value)
    if checkpoint_path is not None:
      training_runs.save(checkpoint_path, fingerprint, state, epoch + 1, history)

  return training_runs.finish(state.params, history, num_seeds, single_seed)


@functools.lru_cache(maxsize=32)
def _compiled_epoch(apply_fn, optimizer, method, batch_size, banditnet_lambda, sharding):
  """The jitted, seed-vmapped epoch, kept across `train` calls so they do not recompile."""
  return jax.jit(jax.vmap(functools.partial(
      _epoch, apply_fn=apply_fn, optimizer=optimizer, method=method, batch_size=batch_size,
      banditnet_lambda=banditnet_lambda), in_axes=(0, 0, 0, None)), out_shardings=sharding)


@functools.lru_cache(maxsize=32)
def _compiled_evaluate(evaluate):
  return jax.jit(jax.vmap(evaluate))

