"""The Open Bandit Dataset loader: the shipped sample, agreement with OBP, malformed files."""

import gzip
from pathlib import Path

import numpy as np
import pytest

from saferl_jax.data import load_obd, sample_path

FIXTURES = Path(__file__).parents[1] / "fixtures"


@pytest.mark.slow
def test_shipped_samples_load():
  for policy in ("bts", "random"):
    log = load_obd(behavior_policy=policy)
    assert log.actions.shape == (10_000,)
    assert log.num_actions == 80 and log.num_positions == 3
    assert set(np.unique(log.positions)) == {0, 1, 2}
    assert np.all((log.logging_probs > 0) & (log.logging_probs <= 1))
    assert log.contexts.shape[0] == 10_000 and set(np.unique(log.contexts)) <= {0.0, 1.0}
    assert np.all(log.contexts.reshape(10_000, -1).sum(1) == 4)  # one hot per user feature
  random_log = load_obd(behavior_policy="random")
  np.testing.assert_allclose(random_log.logging_probs, 1 / 80, rtol=1e-4)


def test_loader_matches_what_obp_loaded():
  log = load_obd()
  obp = np.load(FIXTURES / "obp_obd_bts.npz")
  np.testing.assert_array_equal(log.actions, obp["actions"])
  np.testing.assert_array_equal(log.positions, obp["positions"])
  np.testing.assert_array_equal(log.rewards, obp["rewards"])
  # pandas' fast float parser (used by OBP) is not correctly rounded: last-bit differences.
  np.testing.assert_allclose(log.logging_probs, obp["pscores"], rtol=1e-12)


def _write_log(folder: Path, lines: list[str]) -> Path:
  folder.mkdir(parents=True, exist_ok=True)
  text = gzip.decompress((sample_path() / "all.csv.gz").read_bytes()).decode().splitlines()
  (folder / "all.csv").write_text("\n".join(text[:1] + lines) + "\n")
  return folder


def test_plain_csv_folder_loads(tmp_path):
  rows = gzip.decompress((sample_path() / "all.csv.gz").read_bytes()).decode().splitlines()[1:6]
  log = load_obd(_write_log(tmp_path / "ok", rows))
  assert log.actions.shape == (5,)


def test_malformed_files_name_the_line(tmp_path):
  rows = gzip.decompress((sample_path() / "all.csv.gz").read_bytes()).decode().splitlines()[1:4]
  short = rows[:1] + [rows[1].rsplit(",", 3)[0]] + rows[2:]
  with pytest.raises(ValueError, match="line 3"):
    load_obd(_write_log(tmp_path / "short", short))
  fields = rows[2].split(",")
  fields[5] = "0"  # propensity_score
  with pytest.raises(ValueError, match="line 4, column propensity_score"):
    load_obd(_write_log(tmp_path / "zero", rows[:2] + [",".join(fields)]))
  fields[5] = "abc"
  with pytest.raises(ValueError, match="line 4, column propensity_score: not a number"):
    load_obd(_write_log(tmp_path / "text", rows[:2] + [",".join(fields)]))
  with pytest.raises(ValueError, match="neither all.csv"):
    load_obd(tmp_path)
  with pytest.raises(ValueError, match="behavior_policy"):
    load_obd(behavior_policy="greedy")
