"""The opl experiment: result schema, claims bookkeeping, resuming from its training checkpoints."""

import dataclasses
import json

import numpy as np
import pytest

from saferl_jax.experiments import opl_learning
from saferl_jax.training import driver

TINY = opl_learning.Config(num_actions=8, num_contexts=50, num_train=400, num_validation=200, epochs=3,
                           batch_size=100, banditnet_lambdas=(0.0, 0.5), num_seeds=2)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("opl")
  return out, opl_learning.run(out, TINY)


@pytest.mark.slow
def test_results_file_has_the_documented_schema(finished_run):
  tmp_path, _ = finished_run
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["logging_value"] < results["optimal_value"]
  assert set(results["methods"]) == {"ips", "snips", "banditnet", "beta_value", "beta_grad"}
  for name, method in results["methods"].items():
    assert len(method["value_curve"]) == TINY.epochs + 1, name
    lo, hi = method["final_value_ci"]
    assert lo <= method["final_value"] <= hi
    assert method["grad_variance"] > 0
    # The fraction of seeds whose policy passed the deployment test: a multiple of 1 / num_seeds.
    deployed = method["deploy_rate"] * TINY.num_seeds
    assert deployed == round(deployed) and 0 <= deployed <= TINY.num_seeds
  assert results["methods"]["banditnet"]["lambda"] in TINY.banditnet_lambdas
  claims = results["claims"]
  assert claims["fastest_learner"] in results["methods"]
  assert claims["lowest_gradient_variance"] == min(
      results["methods"], key=lambda m: results["methods"][m]["grad_variance"])
  assert (tmp_path / "opl.png").stat().st_size > 0
  assert "Off-policy learning" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow
def test_gradient_optimal_baseline_has_lower_variance_than_ips(finished_run):
  _, results = finished_run
  variances = {m: results["methods"][m]["grad_variance"] for m in results["methods"]}
  assert variances["beta_grad"] <= variances["ips"]
  assert variances["beta_grad"] <= variances["beta_value"] * (1 + 1e-5)


@pytest.mark.slow
def test_a_rerun_resumes_from_checkpoints_and_changes_nothing(finished_run, monkeypatch):
  tmp_path, first = finished_run
  (config_directory,) = (tmp_path / "checkpoints").iterdir()  # one config, one directory
  checkpoints = sorted(p.name for p in config_directory.iterdir())
  assert "beta_grad" in checkpoints and "banditnet_0.5" in checkpoints

  def no_training(*args, **kwargs):
    def epoch(*a):
      raise AssertionError("an epoch ran although every run was checkpointed as finished")
    return epoch
  monkeypatch.setattr(driver, "_compiled_chunk", no_training)
  second = opl_learning.run(tmp_path, TINY)
  for name in first["methods"]:
    np.testing.assert_array_equal(first["methods"][name]["value_curve"],
                                  second["methods"][name]["value_curve"])


@pytest.mark.slow
def test_a_rerun_with_another_config_into_the_same_directory_reports_its_own_runs(finished_run):
  tmp_path, first = finished_run
  changed = dataclasses.replace(TINY, learning_rate=TINY.learning_rate / 10)
  second = opl_learning.run(tmp_path, changed)
  assert len(list((tmp_path / "checkpoints").iterdir())) == 2  # one directory per config
  for name in first["methods"]:
    assert not np.array_equal(first["methods"][name]["value_curve"],
                              second["methods"][name]["value_curve"]), name
