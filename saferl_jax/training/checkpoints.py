"""Checkpoints that cannot lie: orbax state plus the fingerprint of the run that wrote it (floor 3).

A checkpoint is a directory managed by orbax-checkpoint (one step kept, written atomically: a
crash never leaves a half-written step). Beside the state it stores, as JSON, the run's
fingerprint (everything that determines the run: data, initial parameters, options, the
optimizer's behaviour, the reward's identity, the number of steps), the steps done and the
history so far. A run resumes from it only when the fingerprints agree; otherwise `read` raises
a ValueError naming every field that differs, so a checkpoint is never reused for, nor
overwritten by, another run. A directory that orbax cannot read raises a ValueError naming it.
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger("saferl_jax.training")

# Probe values (optimizer updates, rewards) agree to this relative tolerance across resumes:
# float32 arithmetic repeated on the same inputs, possibly in another process or on other
# hardware, differs in the last few bits, far below any change of a hyperparameter.
PROBE_RTOL = 1e-4


def checksum(tree) -> str:
  """SHA-256 over every leaf's dtype, shape and bytes (typed PRNG keys through their key data).

  Example:
    >>> checksum(np.zeros(2)) == checksum(np.zeros(2)) != checksum(np.zeros(3))
    True
  """
  digest = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(tree):
    if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    leaf = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f"{leaf.dtype.str}{leaf.shape}".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def fingerprint_digest(fingerprint: dict) -> str:
  """A short hash of a fingerprint, for naming a run's files."""
  return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]


def callable_name(fn) -> str:
  """A callable's identity as text: module.qualname, with a partial's arguments checksummed."""
  if fn is None:
    return "None"
  if isinstance(fn, functools.partial):
    arguments = checksum((list(fn.args), sorted(fn.keywords.items())))[:16]
    return f"partial({callable_name(fn.func)}, {arguments})"
  return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def optimizer_probe(optimizer, params) -> list[float]:
  """What an optax optimizer does, as numbers: three updates on fixed pseudo-random gradients.

  For each step the global norm of the update and its inner product with the gradient. Any
  change of learning rate, momentum, weight decay or optimizer shows in them (a schedule that
  differs only after step 3 does not: pass it in the run config). The updates run on a stand-in
  for `params`: the same tree (so masks apply as they would), ranks and dtypes, every leaf
  2 x ... x 2 with fixed values, so the eager updates compile a few programs per rank, shared by
  every model, not one per leaf shape (seconds on the first run of a conv net). Shape-dependent
  choices (Adafactor's factoring of large matrices) are therefore not probed. `params` may hold
  arrays or `jax.ShapeDtypeStruct`s: only the tree, ranks and dtypes are read.
  """
  rng = np.random.default_rng(0)
  leaves, treedef = jax.tree_util.tree_flatten(params)

  def draw():
    return [rng.standard_normal((2,) * np.ndim(leaf)).astype(jnp.result_type(leaf)) for leaf in leaves]
  stand_in = jax.tree_util.tree_unflatten(treedef, draw())
  state = optimizer.init(stand_in)
  probe = []
  for _ in range(3):
    flat_grads = draw()
    updates, state = optimizer.update(jax.tree_util.tree_unflatten(treedef, flat_grads), state,
                                      stand_in)
    flat_updates = [np.asarray(u, np.float64) for u in jax.tree_util.tree_leaves(updates)]
    norm = sum(float(np.sum(np.square(u))) for u in flat_updates) ** 0.5
    inner = sum(float(np.sum(u * g)) for u, g in zip(flat_updates, flat_grads))
    probe += [norm, inner]
  return probe


def dual_optimizer_probe(dual_optimizer, multipliers) -> list[list[float]]:
  """What a `constrained.DualOptimizer` does, as numbers: two updates from `multipliers` [m] (a
  valid start: >= 0, or on the simplex) on fixed slacks of both signs, the second also reading
  the first's controller memory (nu-PI's smoothed error). Any change of step size, gains or
  update shows in them."""
  multipliers = jnp.asarray(multipliers, jnp.float32)
  slacks = jnp.linspace(-1.0, 0.5, multipliers.shape[0])
  first = dual_optimizer.update(dual_optimizer.init(multipliers), slacks)
  second = dual_optimizer.update(first, -slacks)
  return [np.asarray(state.multipliers).round(7).tolist() for state in (first, second)]


def _same(saved, current) -> bool:
  if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current) and \
     all(isinstance(v, (int, float)) for v in saved + current):
    return bool(np.allclose(saved, current, rtol=PROBE_RTOL, atol=0.0))
  return saved == current


def differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
  """The fields of two fingerprints that differ, each as 'name (checkpoint: a, now: b)'; nested
  dicts are compared field by field ('options.method')."""
  def short(value):
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
  found = []
  for name in sorted(set(saved) | set(current)):
    a, b = saved.get(name), current.get(name)
    if isinstance(a, dict) and isinstance(b, dict):
      found += differences(a, b, f"{prefix}{name}.")
    elif not _same(a, b):
      found.append(f"{prefix}{name} (checkpoint: {short(a)}, now: {short(b)})")
  return found


class CheckpointMismatch(ValueError):
  """The checkpoint directory holds another run's checkpoint."""


class Saved(NamedTuple):
  """A checkpoint's contents: the state, steps done, and history {name: [rows]}."""
  state: Any
  progress: int
  history: dict


def _manager(path: Path):
  import orbax.checkpoint as ocp
  options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False,
                                         create=True)
  return ocp.CheckpointManager(path.absolute(), options=options)


def _damaged(path: Path, err: Exception) -> ValueError:
  return ValueError(f"checkpoint_path: cannot read the checkpoint at {path} ({type(err).__name__}: "
                    f"{err}); it is damaged or not a saferl_jax checkpoint: delete it to start again")


def read(path, fingerprint: dict, template: Any) -> Saved | None:
  """The checkpoint at `path` if it was written by the run `fingerprint` describes, else an error.

  Returns None when there is no checkpoint yet. Raises CheckpointMismatch (a ValueError) when
  the directory holds another run's checkpoint, naming what differs, and ValueError naming the
  path when it cannot be read.
  `template` gives the state's structure, shapes and shardings.
  """
  import orbax.checkpoint as ocp
  path = Path(path)
  if not path.exists():
    return None
  if not path.is_dir():
    raise ValueError(f"checkpoint_path: {path} is a file, not a checkpoint directory (checkpoints "
                     "are orbax directories); choose another path or delete the file")
  try:
    manager = _manager(path)
    step = manager.latest_step()
    if step is None:
      if any(path.iterdir()):
        raise ValueError("no finished checkpoint step in the directory")
      return None
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  except Exception as err:  # orbax raises many types for damaged files; all mean the same here
    raise _damaged(path, err) from err
  if not isinstance(meta, dict) or "fingerprint" not in meta:
    raise _damaged(path, KeyError("fingerprint"))
  differ = differences(meta["fingerprint"], fingerprint)
  if differ:
    raise CheckpointMismatch(
        f"checkpoint_path: {path} holds a different run, so it is not resumed; these differ: "
        + "; ".join(differ) + ". Use another path, delete it, or pass checkpoint_mismatch='new' "
        "to start a fresh run beside it.")
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(template)))["state"]
  except Exception as err:
    raise _damaged(path, err) from err
  # Rows come back in their own dtype (float32 rows through JSON's doubles are exact).
  history = {name: [np.asarray(row, dtype=saved["dtype"]) for row in saved["rows"]]
             for name, saved in meta["history"].items()}
  return Saved(restored, int(meta["progress"]), history)


def write(path, fingerprint: dict, state: Any, progress: int, history: dict) -> None:
  """Writes the state, the fingerprint, the steps done and the history (atomically, one step kept)."""
  import orbax.checkpoint as ocp
  path = Path(path)
  meta = {"fingerprint": fingerprint, "progress": int(progress),
          "history": {name: {"dtype": np.asarray(rows[0]).dtype.str if rows else "<f4",
                             "rows": [np.asarray(row).tolist() for row in rows]}
                      for name, rows in history.items()}}
  manager = _manager(path)
  manager.save(int(progress), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
  manager.wait_until_finished()
  manager.close()
