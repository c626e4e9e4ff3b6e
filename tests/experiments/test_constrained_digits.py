"""The digits task of `saferl-jax constrained`: schema, finiteness and resume at a tiny size."""

import dataclasses

import numpy as np
import pytest

from saferl_jax.experiments import constrained_digits as task

TINY = dataclasses.replace(task.QUICK, train_steps=100, sampling_steps=3, hidden=(32,),
                           pretrain_steps=20, classifier_steps=20, prompts_per_round=2,
                           samples_per_prompt=2, rounds=2, eval_every=2, num_seeds=2,
                           fixed_weights=(0.0, 1.0), eval_samples_per_digit=2)


@pytest.mark.slow
def test_tiny_run_schema_finiteness_and_resume(tmp_path, monkeypatch):
  results = task.run_task(tmp_path, TINY)
  rounds, seeds = TINY.rounds, TINY.num_seeds
  assert results["names"] == ["quality"] and results["thresholds"] == {"quality": 0.0}
  assert np.shape(results["lambda"]) == (rounds, 1)
  assert np.shape(results["lambda_per_seed"]) == (seeds, 1)
  assert results["lambda_exact"] is None
  for curve in (results["slack"]["quality"], results["reward"], results["kl"]):
    assert len(curve) == rounds and np.all(np.isfinite(curve))
  # The first round's dual step: lambda_1 = max(0, 0 - eta * slack_1), per seed, averaged.
  assert np.all(np.asarray(results["lambda"]) >= 0)
  assert len(results["final_slack_per_seed"]["quality"]) == seeds
  fixed = results["fixed_weights"]
  assert fixed["weights"]["quality"] in TINY.fixed_weights
  assert set(fixed["grid"]) == {"0", "1"}
  # The tuned weight has the grid's best alignment.
  best = max(fixed["grid"].values(), key=lambda cell: cell["primary"])
  assert fixed["reward"] == best["primary"]
  for claim in results["claims"].values():
    assert isinstance(claim["holds"], bool) and {"value", "tolerance", "detail"} <= set(claim)
  # The pretrained model is the threshold's reference: its mean standardised quality is near 0
  # (it is estimated on other samples than the threshold, so not exactly 0).
  assert np.all(np.abs(results["pretrained"]["slack"]) < 1.0)
  assert (tmp_path / "samples.png").exists()

  def no_training(*args, **kwargs):
    raise AssertionError("a finished cell was recomputed")
  monkeypatch.setattr(task, "finetune", no_training)
  again = task.run_task(tmp_path, TINY)
  assert again["lambda"] == results["lambda"] and again["claims"] == results["claims"]
