"""Rendering an ope Report: the markdown table and the PNG of intervals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saferl_jax.experiments.ope_report import plot_report, report_markdown
from saferl_jax.ope.report import evaluate

R = np.array([1.0, 0.0, 0.5, 1.0, 0.0, 1.0])
A = np.array([0, 2, 1, 1, 0, 2])
P = np.array([0.5, 0.25, 0.5, 0.2, 0.4, 0.1])
T = np.tile(np.array([0.5, 0.2, 0.3]), (6, 1))
Q = np.full((6, 3), 0.5)


@pytest.fixture(scope="module")
def report():
  return evaluate(R, A, P, T, Q, estimators=("ips", "snips", "dr", "switch_dr"),
                  options={"switch_dr": {"tau": 2.0}})


def _rows(text):
  return [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]


def test_markdown_has_one_row_per_estimator_with_its_numbers(report):
  text = report_markdown(report)
  rows = _rows(text)
  assert [row.split("|")[1].strip() for row in rows] == list(report.names)
  for i, row in enumerate(rows):
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1] == f"{float(report.values[i]):.4g}"
    assert cells[2] == f"{float(report.stderrs[i]):.4g}"
    assert cells[3] == (f"[{float(report.interval.lower[i]):.4g}, "
                        f"{float(report.interval.upper[i]):.4g}]")
    assert cells[4] == f"{float(report.values[i]) / R.mean():.4g}"
  assert "95% interval" in text
  assert "effective sample size" in text and f"{report.num_rounds} rounds" in text
  assert "error" not in text.splitlines()[0]


def test_markdown_with_a_true_value_adds_the_errors(report):
  text = report_markdown(report, true_value=0.5)
  header = text.splitlines()[0]
  assert "| error | relative error |" in header
  for i, row in enumerate(_rows(text)):
    cells = [c.strip() for c in row.split("|")[1:-1]]
    value = float(report.values[i])
    assert cells[5] == f"{value - 0.5:.4g}" and cells[6] == f"{value / 0.5 - 1:.4g}"
  assert "True value: 0.5" in text
  with pytest.raises(ValueError, match="true_value"):
    report_markdown(report, true_value=float("nan"))


def test_plot_writes_a_png(report, tmp_path):
  path = plot_report(report, tmp_path / "sub" / "report.png", true_value=0.5)
  data = path.read_bytes()
  assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
  bare = plot_report(report, tmp_path / "bare.png")
  assert bare.stat().st_size > 0


def test_renderers_refuse_a_batched_report(tmp_path):
  batched = jax.vmap(lambda r: evaluate(r, A, P, T, estimators=("ips",)))(jnp.stack([R, R]))
  with pytest.raises(ValueError, match="one log"):
    report_markdown(batched)
  with pytest.raises(ValueError, match="one log"):
    plot_report(batched, tmp_path / "x.png")
  with pytest.raises(TypeError, match="Report"):
    report_markdown({"values": [1.0]})


def test_an_infinite_interval_renders(tmp_path):
  one_round = evaluate(R[:1], A[:1], P[:1], T[:1], estimators=("ips", "snips"))
  assert "[-inf, inf]" in report_markdown(one_round)
  assert plot_report(one_round, tmp_path / "one.png").stat().st_size > 0
