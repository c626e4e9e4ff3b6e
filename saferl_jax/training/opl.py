"""Learning softmax policies from logged bandit feedback, many seeds at once (floor 3).

`train` runs jit-compiled optax epochs (mini-batch or full-batch) for S seeds in one vmapped
call through the one training driver (`saferl_jax.training.driver`), the seed axis sharded over
all devices, and checkpoints after every epoch so a stopped run resumes with nothing lost: each
epoch's shuffling key is fold_in(seed key, epoch), so a resumed run equals an uninterrupted one
bit for bit.

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

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from saferl_jax import checks
from saferl_jax.opl import objectives as obj
from saferl_jax.opl.objectives import METHODS, logged_batch, method_gradient  # noqa: F401
from saferl_jax.training import driver
from saferl_jax.training.driver import TrainResult, TrainState



def _epoch(state: TrainState, data: obj.LoggedBatch, key: jax.Array, epoch: jax.Array, *, apply_fn,
           optimizer, method: str, batch_size: int, banditnet_lambda: float):
  """One pass over a seed's data in shuffled mini-batches (lax.scan over batches).

  The shuffle depends only on (key, epoch), so a resumed run repeats an uninterrupted one.
  """
  n = data.rewards.shape[0]
  num_batches = n // batch_size
  order = jax.random.permutation(jax.random.fold_in(key, epoch), n)[: num_batches * batch_size]
  order = order.reshape(num_batches, batch_size)

  def step(state, indices):
    batch = jax.tree_util.tree_map(lambda x: x[indices], data)
    grads, baseline = method_gradient(method, apply_fn, state.params, batch,
                                      banditnet_lambda=banditnet_lambda)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), opt_state), baseline

  state, baselines = jax.lax.scan(step, state, order)
  return state, {"baseline": jnp.mean(baselines)}


def train(
    apply_fn: Callable,
    params,
    data: obj.LoggedBatch,
    *,
    key: jax.Array,
    method: str,
    epochs: int,
    optimizer: optax.GradientTransformation,
    batch_size: int | None = None,
    banditnet_lambda: float = 0.0,
    evaluate: Callable[[Any], dict] | None = None,
    checkpoint_path: str | Path | None = None,
    checkpoint_mismatch: str = "error",
    run_config: dict | None = None,
) -> TrainResult:
  """Trains a softmax policy on logged feedback, for S seeds at once.

  Args:
    apply_fn: apply_fn(params, contexts [n, d]) -> logits [n, A].
    params: initial parameters with a leading seed axis [S, ...].
    data: a `LoggedBatch` (see `logged_batch`), shared by every seed ([n, d] and [n]) or one
      per seed ([S, n, d] and [S, n]).
    key: [S] PRNG keys (one per seed) for shuffling; a single key means S = 1 and no seed
      axis on params (nor on per-seed data).
    method: one of METHODS.
    epochs: passes over the data.
    optimizer: an optax optimizer, e.g. optax.adam(0.05); pass the same object again to reuse
      the compiled epoch.
    batch_size: mini-batch size; None for full-batch gradient steps.
    banditnet_lambda: the baseline for "banditnet".
    evaluate: optional jittable evaluate(params) -> {name: scalar} for one seed, recorded before
      training and after every epoch (e.g. the true policy value in a simulator).
    checkpoint_path: an orbax checkpoint directory, written after every epoch and resumed from
      when it holds this very run: the same data, initial parameters, keys, method, options,
      optimizer (its first updates), evaluate and number of epochs. Another run's checkpoint
      raises a ValueError naming what differs.
    checkpoint_mismatch: "error", or "new" to checkpoint beside another run's checkpoint.
    run_config: optional JSON dict bound to the checkpoint (e.g. an experiment's whole config).

  Returns:
    A `TrainResult`. history["baseline"] is [epochs, S] (mean baseline per epoch); each of
    evaluate's names is [epochs + 1, S] (before training, then after each epoch).
  """
  checks.check_choice("method", method, METHODS)
  checks.check_count("epochs", epochs)
  if batch_size is not None:
    checks.check_count("batch_size", batch_size)
  checks.check_real("banditnet_lambda", banditnet_lambda)
  checks.check_choice("checkpoint_mismatch", checkpoint_mismatch, driver.CHECKPOINT_MISMATCH)
  key, params, single_seed = driver.seed_axis(key, params)
  data = logged_batch(*data)
  per_seed = data.rewards.ndim == 2
  driver.check_data_seeds(data.rewards.shape[0] if per_seed else None, key, single_seed)
  n = data.rewards.shape[-1]
  batch_size = n if batch_size is None else batch_size
  batch_size = driver.check_batch_size("batch_size", batch_size, n, what="n")
  one_seed_params = driver.one_seed(params)
  one_seed_contexts = data.contexts[0, :1] if per_seed else data.contexts[:1]
  num_actions = jax.eval_shape(apply_fn, one_seed_params, one_seed_contexts).shape[-1]
  checks.check_indices("actions", data.actions, num_actions, what="action")

  state = TrainState(params, jax.vmap(optimizer.init)(params))
  options = {"method": method, "batch_size": batch_size, "banditnet_lambda": float(banditnet_lambda)}
  # Fingerprinting costs a few eager updates and checksums: only for checkpointed runs.
  fingerprint = None if checkpoint_path is None else driver.fingerprint(
      loop="opl.train", state=state, data=data, key=key, num_steps=epochs, eval_every=1,
      options=options, evaluate=evaluate, optimizer=optimizer, run_config=run_config)
  state, history, _ = driver.run(
      driver.step_function(_epoch, apply_fn=apply_fn, optimizer=optimizer, method=method,
                           batch_size=batch_size, banditnet_lambda=float(banditnet_lambda)),
      state, data, key,
      num_steps=epochs, eval_every=1, fingerprint=fingerprint, data_axes=0 if per_seed else None,
      evaluate=evaluate, checkpoint_path=checkpoint_path, checkpoint_mismatch=checkpoint_mismatch,
      description=f"opl.train ({method})")
  return driver.finish(state.params, history, single_seed)
