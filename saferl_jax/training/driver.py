"""The one training driver: seeds, sharding, compiled chunks, evaluation, checkpoints (floor 3).

Every training loop in saferl_jax (`opl.train`, `train_ranker`, `finetune`, `pretrain`,
`train_classifier`) is a step function handed to `run`:

  step_fn(state, data, key, step) -> (state, metrics {name: scalar})   for ONE seed,

where `state` is a NamedTuple with a `params` field, `key` the seed's PRNG key and `step` the
step's index (draw the step's randomness from fold_in(key, step), so that a resumed run equals an
uninterrupted one bit for bit). `run` vmaps it over the seed axis, scans it over chunks of
`eval_every` steps inside one jit-compiled call (the seed axis sharded over every device),
evaluates after every chunk, checks every metric is finite, shows progress, and checkpoints after
every chunk with orbax (`checkpoints`), resuming only a checkpoint written by the same run.

With `mesh=` (a `saferl_jax.parallel.device_mesh`), seeds are split over its "seeds" axis and the
seed vmap names that axis (`spmd_axis_name`), so a step function that marks its batch arrays with
`parallel.shard_batch` splits each seed's batch over the "batch" devices as well.

Data is either per seed (a leading seed axis, data_axes=0) or shared by every seed (no seed
axis, data_axes=None: it is never copied S times); a tuple of parts may mix the two.
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

import functools
import json
import os
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from saferl_jax import checks
from saferl_jax.parallel import SEEDS, seed_sharding
from saferl_jax.training import checkpoints

CHECKPOINT_MISMATCH = ("error", "new")


class TrainState(NamedTuple):
  """Parameters and optimizer state, the state of most loops."""
  params: Any
  opt_state: Any


class TrainResult(NamedTuple):
  """Final parameters (leading seed axis unless one key was given) and history {name: [T, S]}."""
  params: Any
  history: dict


def progress(items, description: str, total: int | None = None, initial: int = 0):
  """A console progress bar (disabled when SAFERL_JAX_QUIET is set, as in the tests)."""
  from tqdm.auto import tqdm
  return tqdm(items, desc=description, total=total, initial=initial,
              disable=bool(os.environ.get("SAFERL_JAX_QUIET")), dynamic_ncols=True)


def check_batch_size(name: str, value, n: int, what: str = "N") -> int:
  """A batch size: an int in [1, n]."""
  if checks.check_count(name, value) > n:
    raise ValueError(f"{name}: must be an int in [1, {what}={n}], got {value!r}")
  return int(value)


def check_seed_keys(key) -> None:
  """Checks `key`: one typed PRNG key, or [S] of them (one per seed)."""
  checks.check_key("key", key)
  if key.ndim > 1:
    raise ValueError(f"key: expected one key or [S] keys, got shape {key.shape}")


def check_chunks(name: str, total: int, eval_every: int) -> None:
  """Checks a run's length: positive ints, `total` a multiple of the chunk `eval_every`."""
  checks.check_count(name, total)
  checks.check_count("eval_every", eval_every)
  if total % eval_every:
    raise ValueError(f"{name}: must be a multiple of eval_every={eval_every}, got {total}")


def check_finite_params(params) -> None:
  """Initial parameters must be finite: training from NaN only looks like a learning-rate problem."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) and checks.is_concrete(leaf) and \
       not bool(jnp.all(jnp.isfinite(leaf))):
      raise ValueError(f"params: {jax.tree_util.keystr(path)} contains NaN or infinite values")


def seed_axis(key: jax.Array, params) -> tuple[jax.Array, Any, bool]:
  """(keys [S], params [S, ...], single_seed): checks the keys and the initial parameters (finite)
  and adds the seed axis when one key was given. Every loop calls it first."""
  check_seed_keys(key)
  check_finite_params(params)
  if key.ndim == 0:
    return key[None], jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], params), True
  return key, params, False


def check_data_seeds(data_seeds: int | None, key: jax.Array, single_seed: bool) -> None:
  """Per-seed data (`data_seeds` leading rows; None for shared data) must match the keys."""
  if data_seeds is None:
    return
  if single_seed:
    raise ValueError("data: has a seed axis but one key was given; pass [S] keys")
  if data_seeds != key.shape[0]:
    raise ValueError(f"data: has {data_seeds} seeds but key has {key.shape[0]}")


def one_seed(tree):
  """The first seed's slice of a tree with a leading seed axis."""
  return jax.tree_util.tree_map(lambda x: x[0], tree)


def fingerprint(*, loop: str, state, data, key, num_steps: int, eval_every: int, options: dict,
                evaluate: Callable | None, optimizer=None, run_config: dict | None = None,
                **extra) -> dict:
  """Everything that determines a run, as JSON: what `checkpoints.read` compares.

  Args:
    loop: the loop's name.
    state: the initial state (with a seed axis): its structure and values.
    data, key: the run's data and keys (their checksums).
    num_steps, eval_every: the run's length and chunking.
    options: the loop's options (JSON values).
    evaluate: the evaluation function (its name).
    optimizer: an optax optimizer, fingerprinted by `checkpoints.optimizer_probe` on one seed's
      parameters; None when `options` describe it.
    run_config: anything else the caller wants to bind the checkpoint to (an experiment's config).
    **extra: further JSON fields (e.g. a reward's probe values).
  """
  result = {
      "loop": loop, "num_steps": int(num_steps), "eval_every": int(eval_every),
      "options": options,
      "state_structure": str(jax.tree_util.tree_structure(state)),
      "shapes": [[list(np.shape(x)), str(jnp.result_type(x))] for x in jax.tree_util.tree_leaves(state)],
      "initial_state_sha256": checkpoints.checksum(state),
      "data_sha256": checkpoints.checksum(data), "key_sha256": checkpoints.checksum(key),
      "evaluate": checkpoints.callable_name(evaluate),
      "run_config": run_config,
  }
  if optimizer is not None:
    # The probe reads only one seed's shapes and dtypes (no slice is computed).
    result["optimizer"] = checkpoints.optimizer_probe(optimizer, jax.eval_shape(one_seed, state.params))
  # As it will read back from the checkpoint's JSON (tuples become lists).
  return json.loads(json.dumps({**result, **extra}))


def _put(tree, axes, sharding: NamedSharding):
  """Places per-seed parts (axis 0) with the seed sharding and shared parts (None) replicated."""
  replicated = NamedSharding(sharding.mesh, PartitionSpec())
  if isinstance(axes, tuple):
    return tuple(_put(part, axis, sharding) for part, axis in zip(tree, axes))
  return jax.device_put(tree, sharding if axes == 0 else replicated)


def step_function(fn: Callable, **static) -> Callable:
  """`fn` with its static options bound: one object per (fn, options), so every call of a loop
  with the same configuration reuses the compiled chunk (options must be hashable).

  Example:
    >>> def step(state, data, key, step, *, scale): return state * scale, {}
    >>> step_function(step, scale=2.0) is step_function(step, scale=2.0)
    True
  """
  return _bound(fn, tuple(sorted(static.items())))


@functools.lru_cache(maxsize=128)
def _bound(fn: Callable, static: tuple) -> Callable:
  return functools.partial(fn, **dict(static))


@functools.lru_cache(maxsize=64)
def _compiled_chunk(step_fn: Callable, length: int, data_axes, sharding: NamedSharding):
  """jit(vmap(scan of `length` steps)) for one step function, kept across calls."""
  def chunk(state, data, key, first_step):
    return jax.lax.scan(lambda s, step: step_fn(s, data, key, step), state,
                        first_step + jnp.arange(length))
  # Metrics come out [S, length]; `run` turns them into per-step rows. When the seeds are split,
  # the vmapped axis is the mesh's seed axis: sharding constraints inside step_fn then keep it.
  seeds_axis = SEEDS if sharding.spec else None
  return jax.jit(jax.vmap(chunk, in_axes=(0, data_axes, 0, None), spmd_axis_name=seeds_axis),
                 out_shardings=sharding)


@functools.lru_cache(maxsize=64)
def _compiled_evaluate(evaluate: Callable, data_axes=-1):
  """evaluate vmapped over seeds; data_axes -1: evaluate(params), else evaluate(params, data)."""
  if data_axes == -1:
    return jax.jit(jax.vmap(evaluate))
  return jax.jit(jax.vmap(evaluate, in_axes=(0, data_axes)))


def run(step_fn: Callable, state, data, key: jax.Array, *, num_steps: int, eval_every: int,
        fingerprint: dict | None, data_axes=0, evaluate: Callable | None = None,
        checkpoint_path: str | Path | None = None, checkpoint_mismatch: str = "error",
        description: str = "training", evaluate_state: bool = False,
        evaluate_data=None, evaluate_data_axes=0,
        mesh: Mesh | None = None) -> tuple[Any, dict, bool]:
  """Runs `num_steps` steps of `step_fn` for S seeds: (final state, history, resumed_finished).

  Args:
    step_fn: step_fn(state, data, key, step) -> (state, {name: scalar}) for one seed; a stable
      object (from `step_function`) so that compilation is reused across calls.
    state: the initial state, a NamedTuple with `params`, leading seed axis [S, ...].
    data: the data, per seed or shared (see `data_axes`).
    key: [S] typed PRNG keys.
    num_steps: steps to run, >= 1.
    eval_every: steps per compiled chunk; evaluation and checkpoints follow each chunk (the last
      chunk may be shorter).
    fingerprint: the run's identity (`fingerprint(...)`); needed only with a checkpoint_path.
    data_axes: 0 (per-seed data), None (shared) or a tuple of them for a tuple of parts.
    evaluate: optional jittable evaluate(params) -> {name: scalar} for one seed, recorded before
      training and after every chunk.
    checkpoint_path: an orbax checkpoint directory, written after every chunk and resumed from
      when it holds this run (`checkpoints.read`).
    checkpoint_mismatch: "error" (default) raises when the directory holds another run;
      "new" then checkpoints into the sibling `<path>-<fingerprint digest>` instead.
    description: the progress bar's label and the prefix of error messages.
    evaluate_state: evaluate receives the whole state instead of state.params (to evaluate,
      say, a moving average of the parameters kept in the state).
    evaluate_data: optional data handed to evaluate as its second argument,
      evaluate(params, evaluate_data), e.g. each seed's held-out logs for early stopping; part of
      the run's identity, so put it in the fingerprint's data too.
    evaluate_data_axes: 0 (a leading seed axis on evaluate_data), None (shared), or a tuple.
    mesh: a `parallel.device_mesh` whose "seeds" axis splits the seeds and whose "batch" axis
      step_fn's `shard_batch` constraints use; None: seeds over every device.

  Returns:
    (state, history {name: list of [S] rows}, finished): `finished` is True when a finished
    checkpoint was loaded and nothing was computed.
  """
  checks.check_positive_int("num_steps", num_steps)
  checks.check_positive_int("eval_every", eval_every)
  checks.check_choice("checkpoint_mismatch", checkpoint_mismatch, CHECKPOINT_MISMATCH)
  num_seeds = key.shape[0]
  sharding = seed_sharding(num_seeds, mesh=mesh)
  state, key = jax.device_put((state, key), sharding)
  data = _put(data, data_axes, sharding)
  if evaluate is None:
    evaluate_fn = lambda params: {}  # noqa: E731
  elif evaluate_data is None:
    evaluate_fn = _compiled_evaluate(evaluate)
  else:
    evaluate_data = _put(evaluate_data, evaluate_data_axes, sharding)
    with_data = _compiled_evaluate(evaluate, evaluate_data_axes)
    evaluate_fn = lambda params: with_data(params, evaluate_data)  # noqa: E731
  evaluated = (lambda state: state) if evaluate_state else (lambda state: state.params)
  history = {name: [value] for name, value in evaluate_fn(evaluated(state)).items()}

  start = 0
  if checkpoint_path is not None:
    if fingerprint is None:
      raise ValueError("fingerprint: a checkpointed run needs one (driver.fingerprint)")
    checkpoint_path = Path(checkpoint_path)
    try:
      saved = checkpoints.read(checkpoint_path, fingerprint, state)
    except checkpoints.CheckpointMismatch:
      if checkpoint_mismatch == "error":
        raise
      checkpoint_path = checkpoint_path.with_name(
          f"{checkpoint_path.name}-{checkpoints.fingerprint_digest(fingerprint)}")
      saved = checkpoints.read(checkpoint_path, fingerprint, state)
    if saved is not None:
      state, start, history = jax.device_put(saved.state, sharding), saved.progress, saved.history
      checkpoints.logger.info("%s: resuming from step %d of %d (%s)", description, start,
                              num_steps, checkpoint_path)

  chunk_starts = range(start, num_steps, eval_every)
  for first_step in progress(chunk_starts, description, total=len(range(0, num_steps, eval_every)),
                             initial=len(range(0, start, eval_every))):
    length = min(eval_every, num_steps - first_step)
    state, metrics = _compiled_chunk(step_fn, length, data_axes, sharding)(
        state, data, key, first_step)
    for name, values in metrics.items():
      values = np.asarray(values)
      if not np.all(np.isfinite(values)):
        bad_step = first_step + 1 + int(np.argmin(np.all(np.isfinite(values), axis=0)))
        raise FloatingPointError(
            f"{description}: {name} became non-finite at step {bad_step} of {num_steps}; the "
            "parameters diverged (lower the learning rate) or the inputs produce NaN")
      history.setdefault(name, []).extend(values.T)  # [S, length] -> `length` rows of [S]
    for name, value in evaluate_fn(evaluated(state)).items():
      history[name].append(value)
    if checkpoint_path is not None:
      checkpoints.write(checkpoint_path, fingerprint, state, first_step + length, history)
  return state, history, start == num_steps


def finish(params, history: dict, single_seed: bool) -> TrainResult:
  """Stacks the history lists into [T, S] arrays and drops the seed axis for a single key."""
  history = {name: np.stack([np.asarray(v) for v in rows]) for name, rows in history.items() if rows}
  if single_seed:
    params = one_seed(params)
    history = {name: rows[:, 0] for name, rows in history.items()}
  return TrainResult(params, history)
