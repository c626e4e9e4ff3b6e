"""Constrained alignment, end to end: `saferl-jax constrained [--quick] --out DIR` (floor 3).

Four tasks, each in its own module (`constrained_<task>.py`, with QUICK and FULL configs and
`run_task(out, config)`), each run into DIR/<task>/ and resumable from its cells:

  mixture2d    primal-dual fine-tuning of a 2-D diffusion model with linear rewards, where the
               multipliers lambda* and the tilted optimum are known in closed form;
  composition  AND-composition of 2-D diffusion models (min_p max_i KL(p || q_i)): the weights
               mu against mu* computed on a fine grid;
  digits       prompt alignment subject to the quality staying at the pretrained model's;
  bandit       off-policy learning with a high-confidence constraint on a secondary value.

DIR/results.json is {"tasks": {task: {...}}}, each task with its multipliers per round
("lambda", and "lambda_exact" where known), constraint slacks ("slack"), primary reward and KL
per round, the best fixed-weight sum ("fixed_weights") and the claims checked ("claims", each
with "holds", the value and the tolerance). DIR/constrained.png plots the multipliers and slacks
over rounds; each task may add DIR/<task>/samples.png.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from saferl_jax.experiments.common import finish, markdown_table, pyplot

TASKS = ("mixture2d", "composition", "digits", "bandit")


def task_module(name: str):
  """The module of one task, `saferl_jax.experiments.constrained_<name>`."""
  return importlib.import_module(f"saferl_jax.experiments.constrained_{name}")


def run(out: Path, quick: bool = True, *, tasks: tuple[str, ...] = TASKS) -> dict:
  """Runs the tasks (QUICK or FULL configs) into out/<task>/; writes results.json,
  constrained.png and summary.md."""
  out = Path(out)
  unknown = set(tasks) - set(TASKS)
  if unknown or not tasks:
    raise ValueError(f"tasks: must be a non-empty subset of {list(TASKS)}, got {list(tasks)}")
  results = {"mode": "quick" if quick else "full", "tasks": {}}
  for name in tasks:
    module = task_module(name)
    print(f"  constrained/{name}", flush=True)
    results["tasks"][name] = module.run_task(out / name, module.QUICK if quick else module.FULL)
  return finish(out, results, _plot, summary)


def _plot(results: dict, out: Path) -> None:
  plt = pyplot()
  tasks = results["tasks"]
  fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 2.6 * len(tasks)), squeeze=False)
  for row, (name, task) in enumerate(tasks.items()):
    multipliers = np.asarray(task["lambda"], float)  # [rounds, m]
    rounds = np.arange(1, len(multipliers) + 1)
    axis = axes[row, 0]
    for index, constraint in enumerate(task["names"]):
      line, = axis.plot(rounds, multipliers[:, index], label=f"{constraint}")
      if task.get("lambda_exact") is not None:
        axis.axhline(task["lambda_exact"][index], color=line.get_color(), linestyle="--",
                     linewidth=1)
    exact = " (dashed: exact)" if task.get("lambda_exact") is not None else ""
    axis.set_title(f"{name}: {'weights mu' if name == 'composition' else 'multipliers'}{exact}",
                   fontsize=9)
    axis.set_xlabel("round")
    axis.legend(fontsize=7)
    axis = axes[row, 1]
    for constraint, values in task["slack"].items():
      axis.plot(np.arange(1, len(values) + 1), values, label=constraint)
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_title(f"{name}: {'KL per model' if name == 'composition' else 'slack E[r] - b'}",
                   fontsize=9)
    axis.set_xlabel("round")
    axis.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out / "constrained.png", dpi=110)
  plt.close(fig)


def summary(results: dict) -> str:
  """The claims of every task as one markdown table."""
  def shown(value) -> str:  # per-seed lists as rounded lists, numbers to 4 significant digits
    if value is None:
      return ""
    if isinstance(value, (list, tuple)):
      return "[" + ", ".join(shown(v) for v in value) + "]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      return str(value)
    return f"{value:.4g}"

  rows = []
  for name, task in results["tasks"].items():
    for claim, check in task["claims"].items():
      rows.append([name, claim, "yes" if check["holds"] else "NO", shown(check.get("value")),
                   shown(check.get("tolerance")),
                   check.get("detail", "").replace("|", "\\|")])  # |x| would split the cell
  lines = [f"## Constrained alignment ({results['mode']} mode)\n",
           markdown_table(["task", "claim", "holds", "value", "tolerance", "how"], rows), ""]
  for name, task in results["tasks"].items():
    final = np.asarray(task["lambda"], float)[-1]
    exact = task.get("lambda_exact")
    lines.append(f"- {name}: final multipliers {np.round(final, 3).tolist()}"
                 + (f" (exact {np.round(np.asarray(exact, float), 3).tolist()})" if exact is not None
                    else ""))
  return "\n".join(lines) + "\n"
