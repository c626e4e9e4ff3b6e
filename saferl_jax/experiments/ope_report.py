"""A bandit evaluation `Report` as a markdown table and a plot of its intervals (floor 3).

`saferl_jax.ope.evaluate` computes the report (floor 1, arrays only); this module renders one:
`report_markdown` gives a table with a row per estimator (estimate, standard error, interval,
ratio to the logging policy's value and, when the true value is known, the error), and
`plot_report` draws each estimator's interval as a horizontal bar with the true value as a
vertical line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from saferl_jax.experiments.common import markdown_table, pyplot
from saferl_jax.ope.report import Report


def _single(report: Report) -> dict:
  """The report's arrays on the host, refusing a batched (vmapped) report."""
  if not isinstance(report, Report):
    raise TypeError(f"report: must be an ope.report.Report (see ope.evaluate), got "
                    f"{type(report).__name__}")
  values = np.asarray(report.values, np.float64)
  if values.shape != (len(report.names),):
    raise ValueError(f"report: must hold one log (values [E]), got values of shape "
                     f"{values.shape}; render report[i] of a batch one at a time")
  return {
      "values": values,
      "stderrs": np.asarray(report.stderrs, np.float64),
      "lower": np.asarray(report.interval.lower, np.float64),
      "upper": np.asarray(report.interval.upper, np.float64),
      "level": 1.0 - float(report.delta),
      "logging_value": float(report.logging_value),
      "ess": float(report.diagnostics.effective_sample_size),
      "max_weight": float(report.diagnostics.max_weight),
      "mean_weight": float(report.diagnostics.mean_weight),
  }


def _check_true_value(true_value) -> float | None:
  if true_value is None:
    return None
  value = float(true_value)
  if not np.isfinite(value):
    raise ValueError(f"true_value: must be finite, got {true_value}")
  return value


def report_markdown(report: Report, *, true_value: float | None = None) -> str:
  """A markdown table of a report: one row per estimator, then the weight diagnostics.

  Columns: estimator, estimate, stderr, the (1 - delta) interval, estimate / logging policy's
  value and, with `true_value`, the error and the relative error (estimate / truth - 1).

  Args:
    report: an `ope.report.Report` of one log.
    true_value: the target policy's true value, when known.

  Returns:
    The markdown text.
  """
  data = _single(report)
  truth = _check_true_value(true_value)
  level = f"{100 * data['level']:.4g}%"
  headers = ["estimator", "estimate", "stderr", f"{level} interval", "vs logging"]
  if truth is not None:
    headers += ["error", "relative error"]
  rows = []
  for i, name in enumerate(report.names):
    value = float(data["values"][i])
    ratio = value / data["logging_value"] if data["logging_value"] != 0 else float("nan")
    row = [name, value, float(data["stderrs"][i]),
           f"[{data['lower'][i]:.4g}, {data['upper'][i]:.4g}]", ratio]
    if truth is not None:
      row += [value - truth, value / truth - 1 if truth != 0 else float("inf")]
    rows.append(row)
  lines = [markdown_table(headers, rows), "",
           f"Logging policy's value (mean logged reward): {data['logging_value']:.4g}. "
           f"Weights: effective sample size {data['ess']:.4g} of {report.num_rounds} rounds, "
           f"max {data['max_weight']:.4g}, mean {data['mean_weight']:.4g}."]
  if truth is not None:
    lines.append(f"True value: {truth:.4g}.")
  return "\n".join(lines) + "\n"


def plot_report(report: Report, path: str | Path, *, true_value: float | None = None,
                title: str | None = None) -> Path:
  """Draws each estimator's estimate and (1 - delta) interval as a horizontal bar; writes a PNG.

  The true value, when given, is a vertical line; the logging policy's value a dotted one.

  Args:
    report: an `ope.report.Report` of one log.
    path: the PNG to write (its folder is created).
    true_value: the target policy's true value, when known.
    title: the figure's title.

  Returns:
    The path written.
  """
  data = _single(report)
  truth = _check_true_value(true_value)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  plt = pyplot()
  names = list(report.names)
  fig, ax = plt.subplots(figsize=(6.4, 0.9 + 0.42 * len(names)))
  y = np.arange(len(names))[::-1]
  finite = np.isfinite(data["lower"]) & np.isfinite(data["upper"])
  errors = np.stack([data["values"] - data["lower"], data["upper"] - data["values"]])
  errors = np.where(finite, errors, 0.0)  # an infinite interval (n < 2) is drawn as a point
  ax.errorbar(data["values"], y, xerr=errors, fmt="o", color="tab:blue", capsize=3,
              label=f"estimate, {100 * data['level']:.4g}% interval")
  ax.axvline(data["logging_value"], color="tab:gray", linestyle=":",
             label="logging policy (on-policy)")
  if truth is not None:
    ax.axvline(truth, color="tab:green", label="true value")
  ax.set_yticks(y, names, fontsize=8)
  ax.set_xlabel("policy value")
  ax.set_title(title or f"Off-policy estimates ({report.num_rounds} rounds)", fontsize=9)
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
