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
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

SAMPLE_DIR = Path(__file__).parent / "obd_sample"
REQUIRED_COLUMNS = ("item_id", "position", "click", "propensity_score")
USER_FEATURES = ("user_feature_0", "user_feature_1", "user_feature_2", "user_feature_3")
AFFINITY_PREFIX = "user-item_affinity_"
# Bounds for files that set none themselves, so that a damaged cell cannot size a huge array.
MAX_ACTIONS = 100_000  # item ids, when there are no affinity columns (else their number)
MAX_POSITIONS = 1_000


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


def _decode(csv_path: Path, raw: bytes) -> str:
  """The file's text; damaged gzip or non-UTF-8 bytes become a ValueError naming the file."""
  if csv_path.suffix == ".gz":
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
      raise ValueError(f"{csv_path}: not a readable gzip file, truncated or corrupted ({err})") from err
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as err:
    line = raw.count(b"\n", 0, err.start) + 1
    byte = err.start - raw.rfind(b"\n", 0, err.start)
    raise ValueError(f"{csv_path}: line {line}, byte {byte}: not UTF-8 text ({err.reason})") from err


def _read_rows(path: Path) -> tuple[Path, list[str], list[list[str]], list[int]]:
  """The file read, its header, its rows and each row's line number in the file."""
  csv_path = path / "all.csv"
  if not csv_path.exists():
    csv_path = csv_path.with_suffix(".csv.gz")
    if not csv_path.exists():
      raise ValueError(f"path: {path} has neither all.csv nor all.csv.gz")
  reader = csv.reader(io.StringIO(_decode(csv_path, csv_path.read_bytes())))
  rows, lines = [], []
  try:
    header = next(reader, None)
    if header is None:
      raise ValueError(f"path: {csv_path} is empty")
    for row in reader:
      if len(row) != len(header):
        raise ValueError(f"{csv_path}: line {reader.line_num} has {len(row)} fields, the header has "
                         f"{len(header)}")
      rows.append(row)
      lines.append(reader.line_num)  # a quoted field may span lines
  except csv.Error as err:  # e.g. a field over csv's size limit, from garbage with a stray quote
    raise ValueError(f"{csv_path}: line {reader.line_num}: {err}") from err
  if not rows:
    raise ValueError(f"{csv_path}: has a header but no data rows")
  return csv_path, header, rows, lines


def _affinity_columns(csv_path: Path, header: list[str]) -> list[str]:
  """The user-item_affinity_a columns in order of a, which must run 0..A-1 (a column per item)."""
  columns = [c for c in header if c.startswith(AFFINITY_PREFIX)]
  numbers = {str(a) for a in range(len(columns))}  # columns are distinct, so no strays means all
  strays = [c for c in columns if c[len(AFFINITY_PREFIX):] not in numbers]
  if strays:
    raise ValueError(f"{csv_path}: line 1: the {AFFINITY_PREFIX}a columns must number a from 0 "
                     f"to {len(columns) - 1}, found {strays}")
  return sorted(columns, key=lambda c: int(c[len(AFFINITY_PREFIX):]))


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
    ValueError: naming the file, and the line and column where there is one, when the file is
      damaged (a truncated or corrupted gzip stream, bytes that are not UTF-8, a wrong number
      of fields, no rows) or a value is out of its domain: item ids must be integers in
      0..A-1 for A user-item_affinity columns (0..MAX_ACTIONS-1 without them), positions
      integers in 1..MAX_POSITIONS, clicks 0 or 1, propensity scores in (0, 1], affinities
      finite.

  Example:
    >>> log = load_obd(behavior_policy="random")
    >>> log.num_actions, log.num_positions, log.rewards.shape
    (80, 3, (10000,))
  """
  path = sample_path(behavior_policy, campaign) if path is None else Path(path)
  csv_path, header, rows, lines = _read_rows(path)
  missing = [c for c in REQUIRED_COLUMNS + USER_FEATURES if c not in header]
  if missing:
    raise ValueError(f"{csv_path}: line 1: missing columns {missing}")
  repeated = sorted({c for c in header if header.count(c) > 1})
  if repeated:
    raise ValueError(f"{csv_path}: line 1: columns {repeated} appear more than once")
  affinity_columns = _affinity_columns(csv_path, header)
  table = np.array(rows, dtype=object).reshape(len(rows), len(header))
  column = {name: table[:, i] for i, name in enumerate(header)}

  def numeric(name: str) -> np.ndarray:
    try:
      return column[name].astype(np.float64)
    except ValueError as err:
      bad = next((i for i, v in enumerate(column[name]) if not _is_number(v)), 0)
      raise ValueError(f"{csv_path}: line {lines[bad]}, column {name}: not a number "
                       f"({column[name][bad]!r})") from err

  def require(name: str, ok: np.ndarray, problem: str):
    bad = np.flatnonzero(~ok)  # NaN fails every comparison, so it lands here too
    if bad.size:
      raise ValueError(f"{csv_path}: line {lines[bad[0]]}, column {name}: {column[name][bad[0]]!r} "
                       f"{problem}")

  def integers(name: str, low: int, high: int, what: str) -> np.ndarray:
    values = numeric(name)
    require(name, (values == np.round(values)) & (values >= low) & (values <= high),
            f"is not {what}, an integer in {low}..{high}")
    return values.astype(np.int64)

  # Without affinity columns nothing bounds the item ids, and num_actions sizes the affinity array.
  actions = integers("item_id", 0, (len(affinity_columns) or MAX_ACTIONS) - 1, "an item id")
  positions = integers("position", 1, MAX_POSITIONS, "a 1-based position")
  rewards = numeric("click")
  require("click", (rewards == 0) | (rewards == 1), "is not a click, 0 or 1")
  logging_probs = numeric("propensity_score")
  require("propensity_score", (logging_probs > 0) & (logging_probs <= 1), "is outside (0, 1]")
  num_actions = max(int(actions.max()) + 1, len(affinity_columns))
  if affinity_columns:
    affinity = np.stack([numeric(c) for c in affinity_columns], axis=1)
    finite = np.isfinite(affinity)
    if not finite.all():
      col = np.argwhere(~finite)[0, 1]  # the column of the first bad cell in file order
      require(affinity_columns[col], finite[:, col], "is not finite")
  else:
    affinity = np.zeros((len(rows), num_actions))
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
