"""The OBD evaluation: schema, agreement with OBP's IPS of the uniform policy, honest intervals."""

import json
from pathlib import Path

import numpy as np
import pytest

from saferl_jax.data import load_obd
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
  for name, est in data["estimates"].items():
    assert est["ci_bootstrap"][0] <= est["value"] <= est["ci_bootstrap"][1], name
    assert est["ci_t"][0] < est["value"] < est["ci_t"][1], name
  assert (out / "obd_estimates.png").stat().st_size > 0
  assert "uniform policy" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_uniform_ips_matches_obp(results):
  data, _ = results
  obp = json.loads((FIXTURES / "obp_obd_bts.json").read_text())
  assert data["estimates"]["ips"]["value"] == pytest.approx(obp["uniform_ips_from_bts"], rel=1e-5)
  assert data["truth"]["value"] == pytest.approx(obp["random_all_mean_click"], rel=1e-9)


@pytest.mark.slow
def test_reward_model_is_cross_fitted():
  log = load_obd()
  reward_hat = obd_evaluation.cross_fitted_reward_hat(log)
  assert reward_hat.shape == (10_000, 80)
  assert np.all((reward_hat >= 0) & (reward_hat <= 1))
  # Changing one click of fold 0 changes only fold 1's predictions.
  changed = log._replace(rewards=log.rewards.copy())
  changed.rewards[0] = 1 - changed.rewards[0]
  other = obd_evaluation.cross_fitted_reward_hat(changed)
  np.testing.assert_array_equal(other[0::2], reward_hat[0::2])
  assert not np.array_equal(other[1::2], reward_hat[1::2])
