"""The bandit task of the constrained experiment: the contract's schema, finite values, the exact
reference meeting its threshold, and a rerun that reads the saved cells instead of training."""

import dataclasses
import json

import numpy as np
import pytest

from saferl_jax import cli
from saferl_jax.experiments import constrained_bandit
from saferl_jax.training import driver

# conflict 0.9 with 5 actions: on this 50-context pool the primary-greedy policy's V1 (0.43) is
# below the logger's (0.61), so the threshold between them binds.
TINY = dataclasses.replace(constrained_bandit.QUICK, num_actions=5, num_contexts=50, conflict=0.9,
                           num_train=300, num_safety=300, num_steps=20, eval_every=10,
                           fixed_weights=(0.5, 1.0), num_seeds=3, estimators=("beta_ips",))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """`saferl-jax constrained --quick --task bandit` at the TINY size: (the task's folder, its
  results as the command wrote them). The command's own files are checked below."""
  out = tmp_path_factory.mktemp("constrained")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(constrained_bandit, "QUICK", TINY)
    cli.main(["constrained", "--quick", "--task", "bandit", "--out", str(out)])
  return out / "bandit", json.loads((out / "results.json").read_text())["tasks"]["bandit"]


def finite(value) -> bool:
  return bool(np.all(np.isfinite(np.asarray(value, float))))


@pytest.mark.slow
def test_the_result_has_the_contracts_schema_and_finite_values(finished):
  out, result = finished
  name = constrained_bandit.NAME
  assert result["names"] == [name]
  assert np.shape(result["lambda"]) == (TINY.num_steps, 1)
  assert np.shape(result["lambda_per_seed"]) == (TINY.num_seeds, 1)
  assert len(result["lambda_exact"]) == 1 and result["lambda_exact"][0] >= 0
  assert len(result["slack"][name]) == len(result["reward"]) == TINY.num_steps
  assert len(result["kl"]) == TINY.num_steps // TINY.eval_every + 1
  assert len(result["final_slack_per_seed"][name]) == TINY.num_seeds
  fixed = result["fixed_weights"]
  assert fixed["weights"] in TINY.fixed_weights
  assert len(fixed["final_slack_per_seed"][name]) == TINY.num_seeds
  for key in ("lambda", "lambda_per_seed", "lambda_exact", "reward", "kl"):
    assert finite(result[key]), key
  assert finite(result["slack"][name]) and finite(fixed["reward"])
  for claim in result["claims"].values():
    assert set(claim) == {"holds", "value", "tolerance", "detail"}
    assert isinstance(claim["holds"], bool)
  assert set(result["estimators"]) == set(TINY.estimators)
  for summary in result["estimators"].values():
    low, high = summary["deployed_meets"]["wilson_95"]
    assert 0 <= low <= summary["deployed_meets"]["fraction"] <= high <= 1
  assert (out / "samples.png").exists()


@pytest.mark.slow
def test_the_threshold_binds_and_the_exact_tilt_meets_it(finished):
  _, result = finished
  values, b = result["reference_values"], result["thresholds"][constrained_bandit.NAME]
  # b lies between the primary-greedy policy's V1 and the logging policy's (a safe fallback).
  assert values["primary_greedy"][1] < b <= values["logging"][1] < values["max_secondary"]
  assert result["claims"]["threshold_binds"]["holds"]
  # lambda* > 0 (the constraint is active), so the tilt meets b with equality up to the dual
  # solver's tolerance (1e-7 in lambda; dV1/dlambda is O(1 / beta) = 100 here).
  assert result["exact"]["lambda"] > 0
  assert abs(result["exact"][constrained_bandit.NAME] - b) < 1e-4


@pytest.mark.slow
def test_a_rerun_reads_the_saved_cells_instead_of_training(finished, monkeypatch):
  out, first = finished

  def no_training(*args, **kwargs):
    raise AssertionError("a training chunk ran although every cell was saved")
  monkeypatch.setattr(driver, "_compiled_chunk", no_training)
  second = constrained_bandit.run_task(out, TINY)
  assert json.dumps(second, sort_keys=True) == json.dumps(first, sort_keys=True)


def test_the_wilson_interval_matches_its_formula():
  # 8 of 10 at z = 1.96: centre (0.8 + 0.19208) / 1.38415,
  # half-width 1.96 sqrt(0.016 + 0.0009604) / 1.38415
  low, high = constrained_bandit.wilson_interval(8, 10)
  np.testing.assert_allclose([low, high], [0.4902, 0.9433], atol=1e-4)
  assert constrained_bandit.wilson_interval(10, 10)[1] == pytest.approx(1.0)


@pytest.mark.slow
def test_the_command_writes_the_results_plot_and_claims_table(finished):
  """The command's own files; the task's results in them are checked above."""
  out = finished[0].parent
  results = json.loads((out / "results.json").read_text())
  assert results["mode"] == "quick" and set(results["tasks"]) == {"bandit"}
  assert (out / "constrained.png").exists()
  summary = (out / "summary.md").read_text()
  assert "Constrained alignment" in summary and "| bandit |" in summary
