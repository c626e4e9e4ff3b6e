"""The safe-CLTR experiment: non-affine users, estimated bias, the trust region, the paper protocol."""

import dataclasses
import json

import numpy as np
import pytest

from saferl_jax import cli
from saferl_jax.experiments import cltr_safety

TINY = dict(num_queries=40, max_docs=8, min_docs=4, num_features=4, logger_fraction=0.1,
            sessions=(100, 1000), num_seeds=2, num_samples=4, eval_samples=8)


@pytest.mark.slow
def test_every_user_and_the_estimated_bias_reach_the_results(tmp_path):
  config = dataclasses.replace(cltr_safety.QUICK, logger_steps=10, steps=10,
                               estimated_bias=("trust_bias",), **{**TINY, "sessions": (300,)})
  results = cltr_safety.run(tmp_path, config)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert set(saved["click_models"]) == {"trust_bias", "adversarial", "cascade", "dcm", "dbn",
                                        "trust_bias_estimated_bias"}
  for cell in saved["click_models"].values():
    assert set(cell["methods"]) == set(cltr_safety.METHODS)
    for curve in cell["methods"].values():
      assert np.all(np.isfinite(curve["ndcg_per_seed"]))
  fit = saved["estimated_bias"]
  assert len(fit["alpha"]) == len(fit["true_alpha"]) == config.displayed
  assert np.allclose(fit["true_alpha"], np.asarray(cltr_safety.trust_bias(5).alpha))
  answer = saved["prpo_adversarial"]
  assert answer["worst_drop"] == results["claims"]["adversarial_worst_drop"]["prpo"]
  assert "trust region" in answer["explanation"] or "radius" in answer["explanation"]
  # The trust region's guarantee: no seed, user or N falls further than 1 - 0.8 of the logger.
  for cell in saved["click_models"].values():
    worst = min(min(s) for s in cell["methods"]["prpo_trust_region"]["ndcg_per_seed"])
    assert saved["logging_ndcg"] - worst <= answer["trust_region_guaranteed_drop"]
  assert "cascade_never_below_logging" in saved["claims"]
  assert "cascade clicks" in (tmp_path / "summary.md").read_text()
  assert (tmp_path / "cltr.png").exists()


@pytest.mark.slow
def test_the_paper_protocol_runs_from_the_command_line(tmp_path, monkeypatch, capsys):
  tiny = dataclasses.replace(cltr_safety.PAPER_QUICK, epochs=2, learning_rates=(1e-3,),
                             dr_steps=10, hidden=(8,), click_models=("cascade",),
                             estimated_bias=(), methods=("dr", "safe_dr", "prpo"),
                             **{**TINY, "sessions": (300,)})
  monkeypatch.setattr(cltr_safety, "PAPER_QUICK", tiny)
  cli.main(["cltr", "--quick", "--protocol", "paper", "--out", str(tmp_path)])
  assert "paper protocol" in capsys.readouterr().out
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["protocol"] == "paper" and saved["config"]["clip_range"] == [0.1, 10.0]
  assert set(saved["click_models"]) == {"cascade"}
  assert set(saved["click_models"]["cascade"]["methods"]) == {"dr", "safe_dr", "prpo"}


def test_early_stopping_keeps_the_best_held_out_evaluation():
  """Patience 2: seed 0 peaks at evaluation 1 and stops after 2 worse ones (the later, higher
  estimate at evaluation 4 is never seen); seed 1 keeps improving to the end."""
  history = {"validation": np.array([[0.0, 0.0], [1.0, 1.0], [0.5, 2.0], [0.7, 3.0], [9.0, 4.0]]),
             "ndcg": np.array([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3], [0.4, 0.4], [0.5, 0.5]])}
  np.testing.assert_allclose(cltr_safety._early_stopped(history, 2), [0.2, 0.5])
  np.testing.assert_allclose(cltr_safety._early_stopped(history, None), [0.5, 0.5])


def test_bad_configs_are_named():
  for field, value in (("protocol", "mine"), ("ranker", "tree"), ("dr_model", "forest"),
                       ("click_models", ("psychic",)), ("methods", ("magic",))):
    with pytest.raises(ValueError, match=field.split("_")[0]):
      cltr_safety._check_config(dataclasses.replace(cltr_safety.QUICK, **{field: value}))
  with pytest.raises(ValueError, match="learning_rates"):
    cltr_safety._check_config(dataclasses.replace(cltr_safety.QUICK, learning_rates=(0.1,)))
  with pytest.raises(ValueError, match="validation_fraction"):
    cltr_safety._check_config(dataclasses.replace(cltr_safety.QUICK, patience=3))
