"""What every experiment shares (floor 3): result files, checkpoints, progress, tables, plots."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from saferl_jax import stats

from saferl_jax.training.checkpoints import fingerprint_digest
from saferl_jax.training.driver import progress  # noqa: F401 (re-exported for the experiments)


def to_jsonable(value: Any) -> Any:
  """Turns numpy/JAX scalars and arrays inside dicts and lists into plain Python."""
  if isinstance(value, dict):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if hasattr(value, "tolist"):
    return to_jsonable(np.asarray(value).tolist())
  if isinstance(value, float) and not np.isfinite(value):
    raise ValueError(f"results: refusing to write a non-finite number ({value})")
  return value


def write_json(path: Path, data: Any) -> None:
  """Writes JSON atomically (a crash never leaves a half-written file)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(to_jsonable(data), indent=2))
  os.replace(tmp, path)


class Checkpoint:
  """Finished cells of a long run, saved after each one so a rerun resumes where it stopped.

  Everything is keyed by the run's whole config: the cells live in
  out/checkpoints/<config digest>/cells.json, and `path_for(name)` gives the training loops'
  checkpoint directories beside them. A rerun with another config into the same `out` starts
  its own directory, so it never reports (or overwrites) another config's runs.
  """

  def __init__(self, out: Path, config: dict):
    self.config = to_jsonable(config)
    self.directory = Path(out) / "checkpoints" / fingerprint_digest(self.config)
    self.path = self.directory / "cells.json"
    self.cells: dict[str, Any] = {}
    if self.path.exists():
      try:
        saved = json.loads(self.path.read_text())
      except json.JSONDecodeError as err:
        raise ValueError(f"checkpoint: cannot read {self.path} ({err}); delete it to start again") from err
      if saved.get("config") != self.config:  # a digest collision, or an edited file
        raise ValueError(f"checkpoint: {self.path} holds another config; delete it to start again")
      self.cells = saved["cells"]

  def path_for(self, name: str) -> Path:
    """The checkpoint directory of one training run of this config."""
    return self.directory / name

  def __contains__(self, cell: str) -> bool:
    return cell in self.cells

  def __getitem__(self, cell: str) -> Any:
    return self.cells[cell]

  def save(self, cell: str, result: Any) -> None:
    self.cells[cell] = to_jsonable(result)
    write_json(self.path, {"config": self.config, "cells": self.cells})


def seed_interval(values) -> list[float]:
  """The t interval (95%) of a mean over seeds, [lower, upper]; both the value for one seed."""
  values = np.asarray(values, float)
  if len(values) < 2:
    return [float(values.mean())] * 2
  interval = stats.confidence_interval(values, method="t")
  return [float(interval.lower), float(interval.upper)]


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
  def cell(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def finish(out: Path, results: dict, plot, summary) -> dict:
  """Writes out/results.json, the plots (plot(results, out)) and out/summary.md; returns results."""
  write_json(Path(out) / "results.json", results)
  plot(results, Path(out))
  (Path(out) / "summary.md").write_text(summary(results))
  return results


def plot_curve(axis, x, mean, ci, label: str, **style) -> None:
  """A mean curve with its confidence band ([len(x), 2] lower/upper) shaded."""
  ci = np.asarray(ci, float)
  axis.plot(x, mean, label=label, **style)
  axis.fill_between(x, ci[:, 0], ci[:, 1], alpha=0.15)


def pyplot():
  """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt
