"""The PRPO drift study: the share of exposure ratios outside the clip range grows in training.

(The trust region's bound is tested by enumeration in tests/models/test_trust_region.py and on
every seed of the experiment in tests/experiments/test_cltr_safety.py.)"""

import dataclasses

import pytest

from saferl_jax.experiments import cltr_safety, prpo_drift


@pytest.mark.slow
def test_prpo_drifts_out_of_its_clip_range(tmp_path):
  base = dataclasses.replace(cltr_safety.QUICK, num_queries=60, max_docs=8, min_docs=4,
                             num_features=4, logger_fraction=0.1, logger_steps=20, num_seeds=2,
                             num_samples=8, eval_samples=16)
  config = prpo_drift.Config(base=base, num_sessions=10_000, rankers=("linear",),
                             clip_ranges=((0.8, 1.2),), learning_rates=(0.05,), steps=20,
                             eval_every=10, exposure_samples=500, trust_region=False)
  results = prpo_drift.run(tmp_path, config)
  plain = results["runs"]["linear clip=[0.8, 1.2] lr=0.05"]
  assert len(plain["worst_seed_ndcg"]) == len(plain["mean_outside"]) == 3
  # Adversarial rewards push PRPO's ratios out of the range as it trains, and NDCG falls.
  assert plain["mean_outside"][-1] > plain["mean_outside"][0] + 0.2
  assert plain["worst_drop"] > 0
  assert "clip range" in (tmp_path / "summary.md").read_text()
