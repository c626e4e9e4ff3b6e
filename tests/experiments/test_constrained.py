"""The constrained experiment's runner: task selection, the plot and the claims table of several
tasks (each task's own run is tested in tests/experiments/test_constrained_<task>.py)."""

import pytest

from saferl_jax.experiments import constrained


def _task(names, rounds, exact):
  return {"names": names, "lambda": [[0.1 * r] * len(names) for r in range(rounds)],
          "lambda_exact": exact, "slack": {name: [0.0] * rounds for name in names},
          "reward": [0.0] * rounds, "kl": [0.0] * rounds, "fixed_weights": {},
          "claims": {"meets": {"holds": True, "value": [0.5, -0.25], "tolerance": 0.1,
                               "detail": "|slack| within 3 SE"},
                     "exact": {"holds": False, "value": None, "tolerance": None, "detail": ""}}}


def test_plot_and_summary_of_several_tasks(tmp_path):
  results = {"mode": "full", "tasks": {
      "mixture2d": _task(["up"], 5, [0.4]), "composition": _task(["q1", "q2"], 3, [0.7, 0.3]),
      "digits": _task(["quality"], 4, None)}}
  constrained._plot(results, tmp_path)
  assert (tmp_path / "constrained.png").stat().st_size > 0
  summary = constrained.summary(results)
  lines = [line for line in summary.splitlines() if line.startswith("| ")][1:]  # rows only
  assert len(lines) == 6
  # A pipe inside a cell would split it: every row has the table's 6 cells.
  assert all(line.replace("\\|", "").count("|") == 7 for line in lines)
  assert "[0.5, -0.25]" in summary and "| NO |" in summary
  assert "final multipliers [0.4] (exact [0.4])" in summary  # mixture2d: 0.1 * 4 rounds
  assert "digits: final multipliers [0.3]\n" in summary


def test_unknown_or_no_tasks_are_refused(tmp_path):
  with pytest.raises(ValueError, match="tasks"):
    constrained.run(tmp_path, tasks=("mixture", "bandit"))
  with pytest.raises(ValueError, match="tasks"):
    constrained.run(tmp_path, tasks=())
