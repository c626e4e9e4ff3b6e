"""Bias, variance and MSE of the bandit estimators over sample sizes and loggers (floor 3).

For each setting (logger inverse temperature, number of actions) one synthetic
problem is drawn; for each sample size n, `num_seeds` independent logs are
simulated in one vmapped, device-sharded call (in batches of seeds that bound its memory), every
estimator is applied to every log, and its errors against the exact policy
value give bias, variance and MSE (`ope.report.score_estimators`, in float64). The [OB] claim checked: beta*-IPS has the
lowest MSE among IPS, SNIPS and beta*-IPS, or is within 5% of it, in most cells.
Each finished (setting, n) cell is checkpointed, so an interrupted run resumes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np

from saferl_jax import ope
from saferl_jax.data import synthetic_bandit as sb
from saferl_jax.experiments.common import Checkpoint, markdown_table, progress, pyplot, write_json
from saferl_jax.ope.report import score_estimators
from saferl_jax.parallel import map_over_seeds

ESTIMATORS = {
    "ips": {},
    "snips": {},
    "dm": {},
    "dr": {},
    "sndr": {},
    "switch_dr": {"tau": 50.0},
    "dr_os": {"lambda_": 100.0},
    "beta_ips": {},
    "beta_ips_cross_fit": {"baseline": "cross_fit"},
}
CLAIM_ESTIMATORS = ("ips", "snips", "beta_ips")
# Seeds x rounds simulated at once (map_over_seeds' batch_size = this // n): the O(n) simulation
# holds some 100 bytes per round, so about 0.4 GB of intermediates.
MAX_ROWS_PER_BATCH = 4_000_000


@dataclasses.dataclass(frozen=True)
class Config:
  logger_inverse_temperatures: tuple[float, ...] = (-5.0, -1.0, 1.0, 5.0)
  num_actions: tuple[int, ...] = (25,)
  sample_sizes: tuple[int, ...] = (100, 1_000, 10_000, 100_000)
  num_seeds: int = 200
  dim_context: int = 5
  num_contexts: int = 1000
  target_inverse_temperature: float = 10.0
  reward_model_noise: float = 0.1
  seed: int = 0


QUICK = Config()
FULL = Config(num_actions=(25, 50, 100), sample_sizes=(100, 1_000, 10_000, 100_000, 1_000_000),
              num_seeds=500)


def _estimates_for_seed(key, problem, n):
  """Every estimator's value on one simulated log of n rounds."""
  log = sb.simulate_log(problem, key=key, num_rounds=n)
  rounds = sb.logged_rounds(problem, log)  # gathered per context: no [n, A] rows
  values = {}
  for name, options in ESTIMATORS.items():
    estimator = ope.FROM_ROUNDS["beta_ips" if name.startswith("beta_ips") else name]
    values[name] = estimator(rounds, **options).value
  return values


def _cell(problem, n: int, num_seeds: int, key) -> dict:
  """Bias, variance and MSE of every estimator over num_seeds logs of n rounds."""
  true_value = float(sb.policy_value(problem.target_dist, problem.expected_rewards))
  keys = jax.random.split(key, num_seeds)
  estimates = map_over_seeds(_estimates_for_seed, keys, problem, n=n,
                             batch_size=max(1, MAX_ROWS_PER_BATCH // n))
  columns = []
  for name in ESTIMATORS:
    values = np.asarray(estimates[name], np.float64)
    if not np.all(np.isfinite(values)):
      raise FloatingPointError(f"{name}: non-finite estimate at n={n}")
    columns.append(values)
  with jax.enable_x64(True):  # the scores in float64, as the estimates were gathered
    scores = jax.tree.map(np.asarray, score_estimators(np.stack(columns, axis=1), true_value))
  return {name: {"bias": scores.bias[i], "variance": scores.variance[i], "mse": scores.mse[i],
                 "mse_stderr": scores.mse_stderr[i]}
          for i, name in enumerate(ESTIMATORS)}


def run(out: Path, config: Config = QUICK) -> dict:
  """Runs the study, writes DIR/results.json, plots and summary.md, and returns the results."""
  out = Path(out)
  checkpoint = Checkpoint(out, dataclasses.asdict(config))
  cells = [(t, a, n) for t in config.logger_inverse_temperatures for a in config.num_actions
           for n in config.sample_sizes]
  settings = []
  base_key = jax.random.key(config.seed)
  for setting_index, (temperature, num_actions) in enumerate(
      (t, a) for t in config.logger_inverse_temperatures for a in config.num_actions):
    problem_key, data_key = jax.random.split(jax.random.fold_in(base_key, setting_index))
    problem = sb.make_problem(
        problem_key, num_actions=num_actions, dim_context=config.dim_context,
        num_contexts=config.num_contexts, logger_inverse_temperature=temperature,
        target_inverse_temperature=config.target_inverse_temperature,
        reward_model_noise=config.reward_model_noise)
    settings.append({
        "logger_inverse_temperature": temperature,
        "num_actions": num_actions,
        "true_value": float(sb.policy_value(problem.target_dist, problem.expected_rewards)),
        "logging_value": float(sb.policy_value(problem.logging_dist, problem.expected_rewards)),
        "n": list(config.sample_sizes),
        "_problem": problem,
        "_key": data_key,
    })

  bar = progress(cells, "ope-variance cells", total=len(cells))
  for setting in settings:
    for size_index, n in enumerate(config.sample_sizes):
      name = f"beta0={setting['logger_inverse_temperature']}|A={setting['num_actions']}|n={n}"
      if name not in checkpoint:
        key = jax.random.fold_in(setting["_key"], size_index)
        checkpoint.save(name, _cell(setting["_problem"], n, config.num_seeds, key))
      bar.update(1)
      setting.setdefault("_cells", []).append(checkpoint[name])
  bar.close()

  for setting in settings:
    cells_of_setting = setting.pop("_cells")
    setting.pop("_problem")
    setting.pop("_key")
    setting["estimators"] = {
        est: {stat: [c[est][stat] for c in cells_of_setting]
              for stat in ("bias", "variance", "mse", "mse_stderr")}
        for est in ESTIMATORS}
  results = {"config": dataclasses.asdict(config), "settings": settings,
             "claims": {"beta_ips_lowest_mse": _claim(settings)}}
  write_json(out / "results.json", results)
  _plot(settings, out)
  (out / "summary.md").write_text(summary(results))
  return results


def _claim(settings: list[dict]) -> dict:
  """Cells where beta*-IPS's MSE is the lowest of IPS, SNIPS, beta*-IPS or within 5% of it."""
  held = total = 0
  for setting in settings:
    mse = {e: np.asarray(setting["estimators"][e]["mse"]) for e in CLAIM_ESTIMATORS}
    best = np.min(np.stack(list(mse.values())), axis=0)
    held += int(np.sum(mse["beta_ips"] <= 1.05 * best))
    total += len(best)
  return {"cells_where_it_holds": held, "cells": total, "holds_in_most_cells": held > total / 2}


def _plot(settings: list[dict], out: Path) -> None:
  plt = pyplot()
  n_panels = len(settings)
  cols = min(4, n_panels)
  rows = -(-n_panels // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), squeeze=False)
  for ax, setting in zip(axes.ravel(), settings):
    _plot_setting(ax, setting)
  for ax in axes.ravel()[n_panels:]:
    ax.axis("off")
  handles, labels = axes[0, 0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="center right", fontsize=8)
  fig.tight_layout(rect=(0, 0, 0.86, 1))
  fig.savefig(out / "mse.png", dpi=120)
  plt.close(fig)
  for setting in settings:
    fig, ax = plt.subplots(figsize=(5.8, 3.6))
    _plot_setting(ax, setting)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(out / f"mse_beta0_{setting['logger_inverse_temperature']:g}_A{setting['num_actions']}.png",
                dpi=120)
    plt.close(fig)


def _plot_setting(ax, setting: dict) -> None:
  for name, stats in setting["estimators"].items():
    style = "-" if name in CLAIM_ESTIMATORS else ":"
    ax.loglog(setting["n"], stats["mse"], style, marker="o", markersize=3, label=name)
  ax.set_title(f"logger beta0={setting['logger_inverse_temperature']:g}, A={setting['num_actions']}",
               fontsize=9)
  ax.set_xlabel("logged rounds n")
  ax.set_ylabel("MSE")


def summary(results: dict) -> str:
  """A markdown table of MSE at the largest n, relative to IPS, per setting."""
  names = list(ESTIMATORS)
  rows = []
  for setting in results["settings"]:
    ips_mse = setting["estimators"]["ips"]["mse"][-1]
    rows.append([f"{setting['logger_inverse_temperature']:g}", setting["num_actions"]] +
                [setting["estimators"][e]["mse"][-1] / ips_mse for e in names])
  claim = results["claims"]["beta_ips_lowest_mse"]
  n_max = results["settings"][0]["n"][-1]
  return (f"## Off-policy evaluation: MSE at n = {n_max:,} relative to IPS "
          f"({results['config']['num_seeds']} seeds; lower is better)\n\n" +
          markdown_table(["logger beta0", "A"] + names, rows) +
          f"\n\nbeta*-IPS has the lowest MSE of IPS, SNIPS and beta*-IPS, or within 5% of it, in "
          f"{claim['cells_where_it_holds']} of {claim['cells']} (setting, n) cells.\n")
