"""The OBD evaluation: schema, agreement with OBP's IPS of the uniform policy, honest intervals."""

import json
from pathlib import Path

import numpy as np
import pytest

from saferl_jax.data import load_obd, take_rounds
from saferl_jax.experiments import obd_evaluation

FIXTURES = Path(__file__).parents[1] / "fixtures"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp("obd")
  obd_evaluation.run(out, num_resamples=200)
  return json.loads((out / "results.json").read_text()), out


@pytest.mark.slow
def test_schema_and_files(results):
  data, out = results
  assert data["truth"]["value"] == pytest.approx(0.0038)
  assert set(data["estimates"]) == set(obd_evaluation.UNTUNED + obd_evaluation.TUNED +
                                       ("beta_ips_cross_fit",))
  for name, est in data["estimates"].items():
    assert est["ci_bootstrap"][0] <= est["value"] <= est["ci_bootstrap"][1], name
    assert est["ci_normal"][0] < est["value"] < est["ci_normal"][1], name
  for name, tuned in data["tuned"].items():
    assert tuned["value"][0] in tuned["grid"], name
  model = data["reward_model"]
  assert model["chosen_l2"] in obd_evaluation.L2_GRID
  assert model["out_of_fold_log_loss"][str(model["chosen_l2"])] == min(
      model["out_of_fold_log_loss"].values())
  assert (out / "obd_estimates.png").stat().st_size > 0
  assert "uniform random" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_uniform_ips_matches_obp(results):
  data, _ = results
  obp = json.loads((FIXTURES / "obp_obd_bts.json").read_text())
  assert data["estimates"]["ips"]["value"] == pytest.approx(obp["uniform_ips_from_bts"], rel=1e-5)
  assert data["truth"]["value"] == pytest.approx(obp["random_all_mean_click"], rel=1e-9)


@pytest.mark.slow
def test_bts_is_estimated_from_the_random_log(tmp_path):
  """The reverse direction: the target is BTS's per-slot item frequency, the truth its mean click.

  Same sizes and resamples as the fixture's run, so the compiled programs are reused."""
  data = obd_evaluation.run(tmp_path, behavior_policy="random", num_resamples=200)
  bts, random_log = load_obd(behavior_policy="bts"), load_obd(behavior_policy="random")
  assert data["truth"]["value"] == pytest.approx(np.mean(bts.rewards))
  # IPS with the frequency target, by hand: w_i = freq(a_i | l_i) / p_i.
  counts = np.zeros((80, 3))
  np.add.at(counts, (bts.actions, bts.positions), 1.0)
  freq = counts / counts.sum(0)
  weights = freq[random_log.actions, random_log.positions] / random_log.logging_probs
  assert data["estimates"]["ips"]["value"] == pytest.approx(
      np.mean(weights * random_log.rewards), rel=1e-5)


def test_max_rounds_keeps_the_first_rounds_in_time_order():
  log = load_obd(behavior_policy="random")
  shuffled = take_rounds(log, slice(None, None, -1))
  first = obd_evaluation._first(shuffled, 100)
  order = np.argsort(log.timestamps, kind="stable")[:100]
  np.testing.assert_array_equal(np.sort(first.timestamps), np.sort(log.timestamps[order]))
  assert len(first.rewards) == 100 and first.contexts.shape == (100, log.contexts.shape[1])
  assert obd_evaluation._first(log, None) is log


def test_an_unknown_logger_is_refused(tmp_path):
  with pytest.raises(ValueError, match="behavior_policy: must be 'bts' or 'random'"):
    obd_evaluation.run(tmp_path, behavior_policy="eps_greedy")
