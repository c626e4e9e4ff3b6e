"""A loader for logged data in the Open Bandit Dataset's CSV layout (floor 2).

A log folder holds all.csv (or all.csv.gz) with the columns
(index), timestamp, item_id, position, click, propensity_score,
user_feature_0..3, user-item_affinity_0..{A-1}; and item_context.csv. The
package ships a small sample (10,000 rounds each of the Bernoulli Thompson
Sampling and uniform random loggers, "all" campaign), from the Open Bandit
Dataset by ZOZO, Inc., licensed CC BY 4.0; see saferl_jax/data/obd_sample/README.md.

References:
  Saito, Aihara, Matsutani, Narita. Open Bandit Dataset and Pipeline: Towards Realistic and
  Reproducible Off-Policy Evaluation. NeurIPS 2021 Datasets and Benchmarks. https://arxiv.org/abs/2008.07146
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

import csv
import gzip
import io
from pathlib import Path
from typing import NamedTuple

import numpy as np

SAMPLE_DIR = Path(__file__).parent / "obd_sample"
REQUIRED_COLUMNS = ("item_id", "position", "click", "propensity_score")
USER_FEATURES = ("user_feature_0", "user_feature_1", "user_feature_2", "user_feature_3")


class OBDLog(NamedTuple):
  """One OBD log as numpy arrays (host data; convert with jnp.asarray where needed).

  Attributes:
    actions: [n] item ids in [0, num_actions).
    positions: [n] 0-based slot of the displayed item.
    rewards: [n] clicks (0 or 1).
    logging_probs: [n] the logger's probability of the item at that slot.
    contexts: [n, d] one-hot encoded user features.
    user_item_affinity: [n, num_actions].
    num_actions: number of items.
    num_positions: number of slots.
  """
  actions: np.ndarray
  positions: np.ndarray
  rewards: np.ndarray
  logging_probs: np.ndarray
  contexts: np.ndarray
  user_item_affinity: np.ndarray
  num_actions: int
  num_positions: int


def sample_path(behavior_policy: str = "bts", campaign: str = "all") -> Path:
  """The folder of the shipped sample for a logger ("bts" or "random") and campaign ("all")."""
  path = SAMPLE_DIR / f"{behavior_policy}_{campaign}"
  if not path.is_dir():
    available = sorted(p.name for p in SAMPLE_DIR.iterdir() if p.is_dir())
    raise ValueError(f"behavior_policy/campaign: no shipped sample {path.name}; available: {available}")
  return path


def _read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
  csv_path = path / "all.csv"
  if csv_path.exists():
    text = csv_path.read_text()
  elif csv_path.with_suffix(".csv.gz").exists():
    csv_path = csv_path.with_suffix(".csv.gz")
    text = gzip.decompress(csv_path.read_bytes()).decode()
  else:
    raise ValueError(f"path: {path} has neither all.csv nor all.csv.gz")
  reader = csv.reader(io.StringIO(text))
  header = next(reader, None)
  if header is None:
    raise ValueError(f"path: {csv_path} is empty")
  rows = list(reader)
  for line_number, row in enumerate(rows, start=2):
    if len(row) != len(header):
      raise ValueError(f"{csv_path}: line {line_number} has {len(row)} fields, the header has {len(header)}")
  return header, rows


def _one_hot(codes: np.ndarray) -> np.ndarray:
  _, index = np.unique(codes, return_inverse=True)
  return np.eye(index.max() + 1, dtype=np.float32)[index]


def load_obd(path: str | Path | None = None, *, behavior_policy: str = "bts",
             campaign: str = "all") -> OBDLog:
  """Loads an OBD log folder; with no path, the shipped sample of that logger and campaign.

  Rows keep the file's order (OBD files are already sorted by timestamp).

  Args:
    path: a folder holding all.csv or all.csv.gz in OBD's layout.
    behavior_policy: "bts" or "random", for the shipped sample.
    campaign: "all", for the shipped sample.

  Returns:
    An `OBDLog`.

  Raises:
    ValueError: naming the file and line or column when the data is malformed.

  Example:
    >>> log = load_obd(behavior_policy="random")
    >>> log.num_actions, log.num_positions, log.rewards.shape
    (80, 3, (10000,))
  """
  path = sample_path(behavior_policy, campaign) if path is None else Path(path)
  header, rows = _read_rows(path)
  missing = [c for c in REQUIRED_COLUMNS + USER_FEATURES if c not in header]
  if missing:
    raise ValueError(f"{path}/all.csv: missing columns {missing}")
  table = np.array(rows, dtype=object).reshape(len(rows), len(header))
  column = {name: table[:, i] for i, name in enumerate(header)}

  def numeric(name: str, dtype) -> np.ndarray:
    try:
      return column[name].astype(np.float64).astype(dtype)
    except ValueError as err:
      bad = next(i for i, v in enumerate(column[name]) if not _is_number(v))
      raise ValueError(f"{path}/all.csv: line {bad + 2}, column {name}: not a number "
                       f"({column[name][bad]!r})") from err

  actions = numeric("item_id", np.int64)
  positions = numeric("position", np.int64)
  rewards = numeric("click", np.float64)
  logging_probs = numeric("propensity_score", np.float64)
  affinity_columns = sorted((c for c in header if c.startswith("user-item_affinity_")),
                            key=lambda c: int(c.rsplit("_", 1)[1]))
  num_actions = max(int(actions.max()) + 1, len(affinity_columns))
  if positions.min() < 1:
    raise ValueError(f"{path}/all.csv: positions must start at 1, found {positions.min()}")
  bad = np.flatnonzero(~((logging_probs > 0) & (logging_probs <= 1)))
  if bad.size:
    raise ValueError(f"{path}/all.csv: line {bad[0] + 2}, column propensity_score: "
                     f"{logging_probs[bad[0]]} is outside (0, 1]")
  affinity = (np.stack([column[c].astype(np.float64) for c in affinity_columns], axis=1)
              if affinity_columns else np.zeros((len(rows), num_actions)))
  contexts = np.concatenate([_one_hot(column[c]) for c in USER_FEATURES], axis=1)
  return OBDLog(actions=actions, positions=positions - 1, rewards=rewards,
                logging_probs=logging_probs, contexts=contexts,
                user_item_affinity=affinity.astype(np.float32), num_actions=num_actions,
                num_positions=int(positions.max()))


def _is_number(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False
