"""The composition task of `saferl-jax constrained` in a tiny config: schema, finiteness, resume."""

import dataclasses
import json

import numpy as np
import pytest

from saferl_jax.experiments import constrained_composition as task

TINY = dataclasses.replace(task.QUICK, pretrain_steps=200, rounds=4, eval_every=2, train_rounds=4,
                           num_samples=32, num_seeds=2, eval_samples=64, last_rounds=2,
                           grid_points=131, hidden=(16, 16), sampling_steps=4)


@pytest.mark.slow  # ~31 s on 2 cores: two pretrainings, both loops and their evaluations compile
def test_tiny_run_has_the_contract_schema_and_resumes_from_its_cells(tmp_path, monkeypatch):
  result = task.run_task(tmp_path, TINY)
  json.dumps(result)  # JSON-able
  for field in ("lambda", "lambda_per_seed", "lambda_exact", "names", "thresholds", "slack",
                "final_slack_per_seed", "reward", "kl", "fixed_weights", "claims"):
    assert field in result, field
  assert np.asarray(result["lambda"]).shape == (TINY.rounds, 2)
  assert np.asarray(result["lambda_per_seed"]).shape == (TINY.num_seeds, 2)
  np.testing.assert_allclose(np.sum(result["lambda"], axis=1), 1.0, atol=1e-5)  # on the simplex
  assert abs(sum(result["lambda_exact"]) - 1.0) < 1e-5
  assert set(result["slack"]) == set(result["names"]) == {"q1", "q2"}
  assert all(len(v) == TINY.num_seeds for v in result["final_slack_per_seed"].values())
  for claim in result["claims"].values():
    assert isinstance(claim["holds"], bool) and np.isfinite(claim["value"])
  numbers = np.concatenate([np.ravel(np.asarray(result[name], float))
                            for name in ("lambda", "reward", "kl")])
  assert np.all(np.isfinite(numbers))
  assert (tmp_path / "samples.png").exists()

  # A second run reads every saved cell: no loop runs again.
  def refuse(*args, **kwargs):
    raise AssertionError("a finished cell was recomputed")
  monkeypatch.setattr(task, "compose", refuse)
  monkeypatch.setattr(task, "compose_train", refuse)
  again = task.run_task(tmp_path, TINY)
  assert again["lambda"] == result["lambda"] and again["claims"] == result["claims"]
