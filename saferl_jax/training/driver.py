"""What every training loop over seeds shares (floor 3): the seed axis, results, checkpoints.

The loops (`opl.train`, `cltr.train_ranker`, diffusion fine-tuning) take parameters and data
with a leading seed axis and one PRNG key per seed, or a single key for one seed
(`add_seed_axis` then adds the axis and `finish` removes it), and return a `TrainResult`.

A checkpoint is one .npz file holding the leaves of a training state, the number of finished
steps (or epochs), the history so far and a fingerprint of the run's configuration; a run
resumes from it only when the fingerprint matches, so a checkpoint is never reused for other
data, options or initial parameters. Files are written atomically (a temporary file, then
os.replace), so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from saferl_jax import checks


def progress(items, description: str, total: int | None = None, initial: int = 0):
  """A console progress bar (disabled when SAFERL_JAX_QUIET is set, as in the tests)."""
  from tqdm.auto import tqdm
  return tqdm(items, desc=description, total=total, initial=initial,
              disable=bool(os.environ.get("SAFERL_JAX_QUIET")), dynamic_ncols=True)


class TrainState(NamedTuple):
  params: Any
  opt_state: Any


class TrainResult(NamedTuple):
  """Final parameters (leading seed axis unless one key was given) and history {name: [T, S]}."""
  params: Any
  history: dict


def check_seed_keys(key: jax.Array) -> None:
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    raise ValueError("key: expected typed PRNG keys from jax.random.key (one per seed), got an "
                     f"array of dtype {key.dtype}; wrap legacy keys with jax.random.wrap_key_data")


def check_chunks(name: str, total: int, eval_every: int) -> None:
  """Checks a run's length: positive ints, `total` a multiple of the chunk `eval_every`."""
  checks.check_positive_int(name, total)
  checks.check_positive_int("eval_every", eval_every)
  if total % eval_every:
    raise ValueError(f"{name}: must be a multiple of eval_every={eval_every}, got {total}")


def add_seed_axis(tree):
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], tree)


def finish(params, history: dict, num_seeds: int, single_seed: bool) -> TrainResult:
  """Stacks the history lists into [T, S] arrays and drops the seed axis for a single key."""
  history = {k: np.stack([np.asarray(v) for v in values]) if values else np.zeros((0, num_seeds))
             for k, values in history.items()}
  if single_seed:
    params = jax.tree_util.tree_map(lambda x: x[0], params)
    history = {k: v[:, 0] for k, v in history.items()}
  return TrainResult(params, history)


def resume(checkpoint_path, fingerprint: str, state: Any, history: dict, total: int, sharding):
  """(state, progress, history): from the checkpoint when it matches and has at most `total`
  steps done, else the fresh (state, 0, history) given."""
  if checkpoint_path is not None:
    restored = load(checkpoint_path, fingerprint, state)
    if restored is not None and restored[1] <= total:
      restored_state, progress, restored_history = restored
      return jax.device_put(restored_state, sharding), progress, restored_history
  return state, 0, history


def checksum(tree) -> str:
  """SHA-256 over every leaf's dtype, shape and bytes (typed PRNG keys through their key data).

  Fingerprints checkpoints here and cached pretrained parameters (`diffusion.cache`).

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


def save(path, fingerprint: str, state: Any, progress: int, history: dict) -> None:
  """Writes the state's leaves, the progress count and the history {name: [values]}."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  leaves = jax.tree_util.tree_leaves(state)
  arrays = {f"state_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
  for name, values in history.items():
    arrays[f"history_{name}"] = np.stack([np.asarray(v) for v in values]) if values else np.zeros(0)
  tmp = path.with_name(path.name + ".tmp.npz")
  np.savez(tmp, fingerprint=np.array(fingerprint), progress=np.array(progress), **arrays)
  os.replace(tmp, path)


def load(path, fingerprint: str, template: Any):
  """(state, progress, history) from a checkpoint with this fingerprint, else None.

  `template` gives the state's tree structure (its leaves are not used).
  """
  path = Path(path)
  if not path.exists():
    return None
  with np.load(path) as saved:
    if str(saved["fingerprint"]) != fingerprint:
      return None
    treedef = jax.tree_util.tree_structure(template)
    leaves = [jnp.asarray(saved[f"state_{i}"]) for i in range(treedef.num_leaves)]
    history = {key[len("history_"):]: list(saved[key]) for key in saved.files
               if key.startswith("history_")}
    return jax.tree_util.tree_unflatten(treedef, leaves), int(saved["progress"]), history
