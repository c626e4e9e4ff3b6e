"""An on-disk cache of trained parameters, keyed by a fingerprint of the run (floor 2, I/O only).

Pretraining a denoiser (`saferl_jax.training.pretraining`) and training the reward classifier
(`saferl_jax.diffusion.rewards`) are deterministic functions of their configuration, data and
key, so their results are cached in one .npz file each: `fingerprint` hashes a JSON config with
SHA-256 (`tree_checksum` turns arrays, data and PRNG keys into a digest first), `save` writes the
parameters' leaves with the fingerprint atomically (a temporary file, then os.replace, so a crash
never leaves half a file), and `load` returns them only when the stored fingerprint matches and
the parameter tree has the same structure and leaf shapes, else None.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from saferl_jax.training.driver import checksum as tree_checksum  # noqa: F401 (re-exported)


def fingerprint(config: dict) -> str:
  """SHA-256 of the config as canonical JSON (sorted keys); values must be JSON-serialisable.

  Example:
    >>> fingerprint({"steps": 10, "lr": 0.1}) == fingerprint({"lr": 0.1, "steps": 10})
    True
  """
  return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def save(path: str | Path, key: str, tree: Any, **extras: np.ndarray) -> None:
  """Writes the leaves of `tree` (and named extra arrays) with the fingerprint `key`, atomically.

  Args:
    path: the .npz file; parent folders are created.
    key: the run's fingerprint.
    tree: a pytree of arrays (e.g. an `nnx.State`).
    **extras: further arrays to keep beside the tree (e.g. a loss history).

  Example:
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...   save(Path(folder) / "params.npz", "abc", {"w": np.ones(2)})
    ...   print(load(Path(folder) / "params.npz", "abc", {"w": np.zeros(2)})[0]["w"].tolist())
    [1.0, 1.0]
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  leaves = jax.tree_util.tree_leaves(tree)
  arrays = {f"leaf_{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}
  arrays.update({f"extra_{name}": np.asarray(value) for name, value in extras.items()})
  tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
  np.savez(tmp, fingerprint=np.array(key), **arrays)
  os.replace(tmp, path)


def load(path: str | Path, key: str, template: Any) -> tuple[Any, dict[str, np.ndarray]] | None:
  """(tree, extras) from `path` when it exists, has fingerprint `key` and fits `template`, else None.

  Args:
    path: the .npz file written by `save`.
    key: the fingerprint the caller expects.
    template: a pytree with the structure, leaf shapes and dtypes to restore into.

  Returns:
    (a pytree like `template` holding the stored arrays, {name: extra array}), or None on a miss
    (no file, another fingerprint, another structure, or an unreadable file).
  """
  path = Path(path)
  if not path.exists():
    return None
  try:
    with np.load(path) as saved:
      if str(saved["fingerprint"]) != key:
        return None
      template_leaves, treedef = jax.tree_util.tree_flatten(template)
      leaves = []
      for i, like in enumerate(template_leaves):
        name = f"leaf_{i}"
        if name not in saved.files:
          return None
        stored = saved[name]
        if stored.shape != np.shape(like) or stored.dtype != np.asarray(like).dtype:
          return None
        leaves.append(jnp.asarray(stored))
      if f"leaf_{len(template_leaves)}" in saved.files:
        return None
      extras = {name[len("extra_"):]: saved[name] for name in saved.files if name.startswith("extra_")}
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
    return None
  return jax.tree_util.tree_unflatten(treedef, leaves), extras
