"""The command line: demo writes every experiment's results and a summary."""

import json

import pytest

from saferl_jax import cli
from saferl_jax.experiments import opl_learning, ope_variance

TINY = ope_variance.Config(logger_inverse_temperatures=(-1.0,), n_actions=(5,), sample_sizes=(50, 100),
                           n_seeds=8, n_contexts=20)
TINY_OPL = opl_learning.Config(n_actions=5, n_contexts=20, n_train=200, n_validation=100, epochs=2,
                               batch_size=100, banditnet_lambdas=(0.5,), n_seeds=2)


def test_demo_runs_every_experiment(tmp_path, monkeypatch):
  monkeypatch.setattr(ope_variance, "QUICK", TINY)
  monkeypatch.setattr(opl_learning, "QUICK", TINY_OPL)
  cli.main(["demo", "--out", str(tmp_path)])
  for name in cli.EXPERIMENTS:
    assert json.loads((tmp_path / name / "results.json").read_text())
  summary = (tmp_path / "summary.md").read_text()
  assert "Off-policy evaluation" in summary and "Open Bandit" in summary
  assert "Off-policy learning" in summary


def test_ope_variance_command(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(ope_variance, "QUICK", TINY)
  cli.main(["ope-variance", "--quick", "--out", str(tmp_path)])
  assert "MSE" in capsys.readouterr().out
  assert (tmp_path / "results.json").exists()


def test_opl_command(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(opl_learning, "QUICK", TINY_OPL)
  cli.main(["opl", "--quick", "--out", str(tmp_path)])
  assert "Off-policy learning" in capsys.readouterr().out
  assert json.loads((tmp_path / "results.json").read_text())["methods"]


def test_unknown_command_exits_with_usage():
  with pytest.raises(SystemExit):
    cli.main(["frobnicate"])
