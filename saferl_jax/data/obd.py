"""A loader for logged data in the Open Bandit Dataset's layout (floor 2).

OBD keeps each log at `<root>/<behavior_policy>/<campaign>/<campaign>.csv`, with
behavior_policy "bts" (Bernoulli Thompson Sampling) or "random" (uniform) and campaign "all",
"men" or "women", and the items' features beside it in `item_context.csv`. A log file has the
columns (index), timestamp, item_id, position, click, propensity_score, user_feature_0..3,
user-item_affinity_0..{A-1}. `load_obd` reads that layout (a `.csv.gz` works too), a folder
holding `<campaign>.csv`, or one CSV file; with no root, the shipped sample: 10,000 rounds each
of the BTS and uniform random loggers, "all" campaign, from the Open Bandit Dataset by ZOZO,
Inc., licensed CC BY 4.0 (saferl_jax/data/obd_sample/README.md), in the same layout.

The CSV is read with pyarrow.csv rather than pandas: multi-threaded and columnar, no pandas
dependency, numeric columns become numpy arrays without a conversion copy, and no Python object
is made per row. Memory follows the arrays returned (about 460 bytes a round with 80 items, so
5.6 GB for the full BTS log's 12 million rounds): at 2 million rounds the peak was under 2x
their bytes, and under half of pandas.read_csv's peak on the same file
(benchmarks/bench_obd_loader.py measures time and memory against pandas.read_csv).

`iter_obd` reads the same file in chunks of rounds with pyarrow's streaming reader
(pyarrow.csv.open_csv), for a log larger than memory: memory of one chunk, the chunks together
equal to load_obd's log, each with the whole log's items, slots and vocabulary; a chunk's
per-round arrays feed `ope.estimate_streaming` directly. Both convert a table of rows to an
`OBDLog` through one function (`_to_log`), so their parsing, checks and messages are the same.

User features are categorical (hashed strings): contexts one-hot encode them with an
`OBDVocabulary`, the sorted values of each column, which the log carries so that another file
can be encoded the same way (`load_obd(..., vocabulary=log.vocabulary)`). `split_by_time`
splits a log into an earlier training part and a later test part.

References:
  Saito, Aihara, Matsutani, Narita. Open Bandit Dataset and Pipeline: Towards Realistic and
  Reproducible Off-Policy Evaluation. NeurIPS 2021 Datasets and Benchmarks. https://arxiv.org/abs/2008.07146
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

import gzip
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from saferl_jax import checks

SAMPLE_DIR = Path(__file__).parent / "obd_sample"
BEHAVIOR_POLICIES = ("bts", "random")
CAMPAIGNS = ("all", "men", "women")
ITEM_CONTEXT = "item_context.csv"
REQUIRED_COLUMNS = ("timestamp", "item_id", "position", "click", "propensity_score")
USER_FEATURES = ("user_feature_0", "user_feature_1", "user_feature_2", "user_feature_3")
AFFINITY_PREFIX = "user-item_affinity_"
# Bounds for files that set none themselves, so that a damaged cell cannot size a huge array.
MAX_ACTIONS = 100_000  # item ids, when there are no affinity columns (else their number)
MAX_POSITIONS = 1_000
TIMESTAMP = pa.timestamp("ns", tz="UTC")  # OBD writes 2019-11-24 00:00:17.004101+00:00
_BLOCK_SIZE = 1 << 20  # bytes of CSV text per parallel block (and per record batch)
_HEADER_LIMIT = 1 << 20  # longest header line read


class OBDVocabulary(NamedTuple):
  """The category values of each user-feature column: how contexts are one-hot encoded.

  contexts hold one block per column, in the order of `columns`; column j's block has
  len(categories[j]) entries, entry k being 1 when the round's value is categories[j][k].

  Attributes:
    columns: the user-feature column names, ("user_feature_0", ..., "user_feature_3").
    categories: per column, its values (the cells' text), sorted.
  """
  columns: tuple[str, ...]
  categories: tuple[tuple[str, ...], ...]

  def as_dict(self) -> dict[str, tuple[str, ...]]:
    """{column: its categories}."""
    return dict(zip(self.columns, self.categories))


class OBDLog(NamedTuple):
  """One OBD log as numpy arrays (host data; convert with jnp.asarray where needed).

  Attributes:
    actions: [n] int64 item ids in [0, num_actions).
    positions: [n] int64 0-based slot of the displayed item.
    rewards: [n] float64 clicks (0 or 1).
    logging_probs: [n] float64 the logger's probability of the item at that slot.
    contexts: [n, d] float32 one-hot user features, encoded with `vocabulary` (d is the
      total number of its categories); a value the vocabulary lacks leaves its block zero.
    user_item_affinity: [n, num_actions] float32.
    num_actions: number of items.
    num_positions: number of slots.
    timestamps: [n] datetime64[ns] (UTC) of each round.
    item_features: [num_actions, F] float32 from item_context.csv (row a is item a): numeric
      columns as they are, then the other (categorical) columns one-hot, each column's
      values in order of first appearance by item id; [num_actions, 0] without the file.
    vocabulary: the `OBDVocabulary` that encoded contexts.
  """
  actions: np.ndarray
  positions: np.ndarray
  rewards: np.ndarray
  logging_probs: np.ndarray
  contexts: np.ndarray
  user_item_affinity: np.ndarray
  num_actions: int
  num_positions: int
  timestamps: np.ndarray
  item_features: np.ndarray
  vocabulary: OBDVocabulary


class OBDSplit(NamedTuple):
  """A log split in time: `train` holds the earlier rounds, `test` the later ones."""
  train: OBDLog
  test: OBDLog


def sample_path(behavior_policy: str = "bts", campaign: str = "all") -> Path:
  """The folder of the shipped sample for a logger ("bts" or "random") and campaign ("all").

  Args:
    behavior_policy: "bts" or "random".
    campaign: "all" (the only campaign shipped).

  Returns:
    obd_sample/<behavior_policy>/<campaign>, holding <campaign>.csv.gz and item_context.csv.

  Example:
    >>> sample_path("random").relative_to(SAMPLE_DIR).as_posix()
    'random/all'
  """
  checks.check_choice("behavior_policy", behavior_policy, BEHAVIOR_POLICIES)
  checks.check_choice("campaign", campaign, CAMPAIGNS)
  path = SAMPLE_DIR / behavior_policy / campaign
  if not path.is_dir():
    shipped = sorted(p.relative_to(SAMPLE_DIR).as_posix() for p in SAMPLE_DIR.glob("*/*") if p.is_dir())
    raise ValueError(f"campaign: no shipped sample {behavior_policy}/{campaign}; shipped: {shipped} "
                     f"(pass root= for the full dataset)")
  return path


def _log_file(root, behavior_policy: str, campaign: str) -> Path:
  """The CSV file that `load_obd`'s arguments name."""
  checks.check_choice("behavior_policy", behavior_policy, BEHAVIOR_POLICIES)
  checks.check_choice("campaign", campaign, CAMPAIGNS)
  if root is None:
    folders = [sample_path(behavior_policy, campaign)]
  else:
    root = Path(root)
    if root.is_file():
      return root
    folders = [root / behavior_policy / campaign, root]
  for folder in folders:
    for name in (f"{campaign}.csv", f"{campaign}.csv.gz"):
      if (folder / name).is_file():
        return folder / name
  raise ValueError(f"root: neither {folders[0]} nor {folders[-1]} holds {campaign}.csv or "
                   f"{campaign}.csv.gz")


def _gz(path: Path) -> bool:
  return path.name.endswith(".gz")


def _open_bytes(path: Path):
  return gzip.open(path, "rb") if _gz(path) else open(path, "rb")


def _gzip_error(path: Path, err: Exception) -> ValueError:
  return ValueError(f"{path}: not a readable gzip file, truncated or corrupted ({err})")


class _Csv(NamedTuple):
  """A CSV file, its header, and whether `"` quotes fields (item_context.csv) or is text (logs)."""
  path: Path
  header: list[str]
  quoted: bool


def _read_header(path: Path, *, quoted: bool) -> _Csv:
  """The column names on line 1; damaged gzip or non-UTF-8 bytes become a ValueError naming the file."""
  try:
    with _open_bytes(path) as stream:
      line = stream.readline(_HEADER_LIMIT)
  except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
    if not _gz(path):
      raise
    raise _gzip_error(path, err) from err
  if not line:
    raise ValueError(f"path: {path} is empty")
  try:
    text = line.decode("utf-8")
  except UnicodeDecodeError as err:
    raise ValueError(f"{path}: line 1, byte {err.start + 1}: not UTF-8 text ({err.reason})") from err
  return _Csv(path, text.rstrip("\r\n").split(","), quoted)


def _check_gzip(path: Path) -> None:
  """Decompresses the whole file, so a damaged stream raises a ValueError naming it."""
  try:
    with gzip.open(path, "rb") as stream:
      while stream.read(1 << 24):
        pass
  except (OSError, EOFError, zlib.error) as err:
    raise _gzip_error(path, err) from err


def _check_lines(csv: _Csv) -> None:
  """Every line is UTF-8 and has as many fields as the header; else a ValueError naming it."""
  number, num_fields = 0, len(csv.header)
  with _open_bytes(csv.path) as stream:
    for number, line in enumerate(stream, 1):
      try:
        line.decode("utf-8")
      except UnicodeDecodeError as err:
        raise ValueError(f"{csv.path}: line {number}, byte {err.start + 1}: not UTF-8 text "
                         f"({err.reason})") from err
      if number > 1 and not (csv.quoted and b'"' in line):  # a quoted field may hold commas
        fields = line.count(b",") + 1 if line.rstrip(b"\r\n") else 0
        if fields != num_fields:
          raise ValueError(f"{csv.path}: line {number} has {fields} fields, the header has "
                           f"{num_fields}")
  if number < 2:
    raise ValueError(f"{csv.path}: has a header but no data rows")


def _options(csv: _Csv, types: dict, include: list[str], *, use_threads: bool = True):
  read = pa_csv.ReadOptions(column_names=csv.header, skip_rows=1, use_threads=use_threads,
                            block_size=_BLOCK_SIZE)
  # An empty line is a row (with too few fields), not nothing; an empty cell is not a number.
  # OBD's logs quote nothing: reading `"` as text spares the tokenizer a tenth of its work.
  parse = pa_csv.ParseOptions(ignore_empty_lines=False, quote_char='"' if csv.quoted else False)
  convert = pa_csv.ConvertOptions(column_types=types, include_columns=include, null_values=[],
                                  strings_can_be_null=False, quoted_strings_can_be_null=False)
  return dict(read_options=read, parse_options=parse, convert_options=convert)


def _first_failure(cells: pa.Array, type_: pa.DataType) -> int | None:
  """The index of the first cell that does not convert to type_, or None (bisection, C speed)."""
  try:
    pc.cast(cells, type_)
    return None
  except pa.ArrowInvalid:
    pass
  low, high = 0, len(cells)  # the first failure lies in [low, high)
  while high - low > 1:
    middle = (low + high) // 2
    try:
      pc.cast(cells.slice(low, middle - low), type_)
      low = middle
    except pa.ArrowInvalid:
      high = middle
  return low


def _problem(type_: pa.DataType) -> str:
  if pa.types.is_timestamp(type_):
    return "not a timestamp with a zone offset (like 2019-11-24 00:00:17.004101+00:00)"
  return "not a number"


def _first_bad_value(csv: _Csv, types: dict) -> None:
  """Raises a ValueError naming the line and column of the first cell that fails its type."""
  checked = {name: t for name, t in types.items() if not pa.types.is_dictionary(t)}
  options = _options(csv, {name: pa.string() for name in checked}, list(checked), use_threads=False)
  first_row = 0
  for batch in pa_csv.open_csv(csv.path, **options):
    found = []
    for name, type_ in checked.items():
      row = _first_failure(batch.column(name), type_)
      if row is not None:
        found.append((row, csv.header.index(name), name))
    if found:
      row, _, name = min(found)  # first in the file: earliest row, then leftmost column
      raise ValueError(f"{csv.path}: line {first_row + row + 2}, column {name}: "
                       f"{_problem(types[name])} ({batch.column(name)[row].as_py()!r})")
    first_row += batch.num_rows


def _read_table(csv: _Csv, types: dict, include: list[str]) -> pa.Table:
  """The columns in include (typed by types, the others inferred), read in parallel.

  Reading stops at the first problem pyarrow meets, in whatever block a thread held: the
  diagnosis then reads the file again in order to name its first damaged line (and column).
  """
  try:
    return pa_csv.read_csv(csv.path, **_options(csv, types, include))
  except _READ_ERRORS as err:
    raise _read_error(csv, types, err) from err


# What a read of a damaged file raises: pyarrow's errors, and gzip's and zlib's for a .gz.
_READ_ERRORS = (pa.ArrowException, OSError, EOFError, zlib.error)


def _read_error(csv: _Csv, types: dict, err: Exception) -> ValueError:
  """Diagnoses a failed read: raises the ValueError naming the file's first damaged line (and
  column), reading it again from its start; returns one naming the file where none is found."""
  if _gz(csv.path):
    _check_gzip(csv.path)
  _check_lines(csv)
  try:
    _first_bad_value(csv, types)
  except pa.ArrowException:  # damage the checks above cannot see: name the file and say what
    pass
  return ValueError(f"{csv.path}: {err}")


def _cell_text(csv: _Csv, row: int, name: str) -> str:
  """The text of one cell (data row `row`, 0-based), for an error message."""
  for batch in pa_csv.open_csv(csv.path, **_options(csv, {name: pa.string()}, [name], use_threads=False)):
    if row < batch.num_rows:
      return batch.column(name)[row].as_py()
    row -= batch.num_rows
  raise AssertionError("row past the end of the file")  # pragma: no cover


class _Problems:
  """The first out-of-domain cell in file order (earliest row, then leftmost column).

  row_offset: the data rows of the file before the table checked (iter_obd's earlier chunks).
  """

  def __init__(self, csv: _Csv, row_offset: int = 0):
    self.csv, self.first, self.row_offset = csv, None, row_offset

  def check(self, names: str | list[str], ok: np.ndarray, problem: str, row_offset: int = 0) -> None:
    """ok: [n] bool for column `names`, or [n, k] for the k columns `names`; False where bad."""
    bad = ~ok  # NaN fails every comparison, so it lands here too
    if not bad.any():
      return
    if bad.ndim == 1:
      row, index = int(np.argmax(bad)), self.csv.header.index(names)
    else:
      row = int(np.argmax(bad.any(axis=1)))
      index = min(self.csv.header.index(names[c]) for c in np.flatnonzero(bad[row]))
    candidate = (row + row_offset + self.row_offset, index, problem)
    if self.first is None or candidate[:2] < self.first[:2]:
      self.first = candidate

  def raise_first(self) -> None:
    if self.first is not None:
      row, index, problem = self.first
      name = self.csv.header[index]
      raise ValueError(f"{self.csv.path}: line {row + 2}, column {name}: "
                       f"{_cell_text(self.csv, row, name)!r} {problem}")


_DTYPES = {pa.float64(): np.float64, pa.float32(): np.float32, pa.int64(): np.int64,
           pa.int32(): np.int32}


def _view(chunk: pa.Array) -> np.ndarray:
  """A numeric chunk without nulls as a numpy view of its buffer: no copy, and no pandas import
  (pyarrow's to_numpy imports pandas where it is installed)."""
  assert chunk.null_count == 0, "null_values=[] leaves no nulls"
  dtype = np.dtype(_DTYPES[chunk.type])
  return np.frombuffer(chunk.buffers()[1], dtype, len(chunk), chunk.offset * dtype.itemsize)


def _numpy(column: pa.ChunkedArray) -> np.ndarray:
  """A numeric column as one numpy array (one copy, its chunks concatenated)."""
  return np.concatenate([_view(c) for c in column.chunks]) if column.chunks else np.zeros(0)


def _integers(problems: _Problems, name: str, values: np.ndarray, low: int, high: int,
              what: str) -> np.ndarray:
  problems.check(name, (values == np.round(values)) & (values >= low) & (values <= high),
                 f"is not {what}, an integer in {low}..{high}")
  return np.where((values >= low) & (values <= high), values, low).astype(np.int64)


def _check_header(csv: _Csv, required: tuple[str, ...]) -> list[str]:
  """The header's affinity columns in order; missing, repeated or misnumbered columns raise."""
  path, header = csv.path, csv.header
  missing = [c for c in required if c not in header]
  if missing:
    raise ValueError(f"{path}: line 1: missing columns {missing}")
  repeated = sorted({c for c in header if header.count(c) > 1})
  if repeated:
    raise ValueError(f"{path}: line 1: columns {repeated} appear more than once")
  columns = [c for c in header if c.startswith(AFFINITY_PREFIX)]
  numbers = {str(a) for a in range(len(columns))}  # columns are distinct, so no strays means all
  strays = [c for c in columns if c[len(AFFINITY_PREFIX):] not in numbers]
  if strays:
    raise ValueError(f"{path}: line 1: the {AFFINITY_PREFIX}a columns must number a from 0 "
                     f"to {len(columns) - 1}, found {strays}")
  return sorted(columns, key=lambda c: int(c[len(AFFINITY_PREFIX):]))


def _vocabulary(path: Path, values: dict | None, vocabulary) -> OBDVocabulary:
  """The given vocabulary, checked, or the sorted values of each user-feature column.

  values: {user-feature column: the values it holds (repeats allowed)}; None with a vocabulary.
  """
  if vocabulary is None:
    return OBDVocabulary(columns=USER_FEATURES, categories=tuple(
        tuple(sorted(set(values[name]))) for name in USER_FEATURES))
  if not isinstance(vocabulary, OBDVocabulary):
    raise ValueError(f"vocabulary: expected an OBDVocabulary (a log's .vocabulary), got "
                     f"{type(vocabulary).__name__}")
  if tuple(vocabulary.columns) != USER_FEATURES or len(vocabulary.categories) != len(USER_FEATURES):
    raise ValueError(f"vocabulary: columns {tuple(vocabulary.columns)} with "
                     f"{len(vocabulary.categories)} category lists, but {path} has {USER_FEATURES}")
  for name, values in zip(USER_FEATURES, vocabulary.categories):
    if len(set(values)) != len(values) or not all(isinstance(v, str) for v in values):
      raise ValueError(f"vocabulary: the categories of {name} must be distinct strings")
  return OBDVocabulary(tuple(vocabulary.columns), tuple(tuple(v) for v in vocabulary.categories))


def _encode(columns: dict, n: int, vocabulary: OBDVocabulary) -> np.ndarray:
  """[n, d] float32 one-hot contexts; values the vocabulary lacks leave their block zero.

  columns: each user feature as a DictionaryArray (one dictionary for the whole column).
  """
  width = sum(len(c) for c in vocabulary.categories)
  contexts = np.zeros((n, width), np.float32)
  flat = contexts.reshape(-1)
  offset = 0
  for name, categories in zip(vocabulary.columns, vocabulary.categories):
    index = {value: k for k, value in enumerate(categories)}
    lookup = np.array([index.get(v, -1) for v in columns[name].dictionary.to_pylist()] + [-1])
    codes = lookup[_view(columns[name].indices)]
    rows = np.flatnonzero(codes >= 0)
    flat[rows * width + (offset + codes[rows])] = 1.0
    offset += len(categories)
  return contexts


def _item_context(folder: Path):
  """item_context.csv read (as `_Csv`, table), or None when the folder has none."""
  path = folder / ITEM_CONTEXT
  if not path.is_file():
    return None
  csv = _read_header(path, quoted=True)
  _check_header(csv, ("item_id",))
  # Item ids as numbers (then checked to be integers); the others typed by pyarrow: a column of
  # numbers is numeric, any other categorical. The unnamed first column is the file's row index.
  table = _read_table(csv, {"item_id": pa.float64()}, [c for c in csv.header if c])
  if table.num_rows == 0:
    raise ValueError(f"{path}: has a header but no data rows")
  return csv, table


def _item_ids(context, high: int) -> np.ndarray | None:
  """item_context.csv's item ids, checked to be integers in 0..high."""
  if context is None:
    return None
  csv, table = context
  problems = _Problems(csv)
  ids = _integers(problems, "item_id", _numpy(table.column("item_id")), 0, high, "an item id")
  problems.raise_first()
  return ids


def _item_features(context, ids, num_actions: int) -> np.ndarray:
  """[num_actions, F] float32: numeric columns, then the others one-hot (first appearance order)."""
  if context is None:
    return np.zeros((num_actions, 0), np.float32)
  csv, table = context
  order = np.argsort(ids, kind="stable")
  repeats = np.flatnonzero(ids[order][1:] == ids[order][:-1])
  if repeats.size:
    first, again = sorted(order[repeats[0]:repeats[0] + 2])
    raise ValueError(f"{csv.path}: line {again + 2}, column item_id: item {ids[again]} appears again "
                     f"(first on line {first + 2})")
  rows = np.full(num_actions, -1)
  rows[ids] = np.arange(len(ids))  # rows[a]: the row of item a
  if (rows < 0).any():
    raise ValueError(f"{csv.path}: no row for items {np.flatnonzero(rows < 0)[:10].tolist()} (it "
                     f"must list every item 0..{num_actions - 1} once)")
  problems = _Problems(csv)
  numeric, categorical = [], []
  for name in table.column_names:
    column = table.column(name)
    if name == "item_id":
      continue
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
      values = _numpy(column.cast(pa.float64()))  # in file order
      problems.check(name, np.isfinite(values), "is not finite")
      numeric.append(values[rows])
    else:
      values = np.asarray(column.cast(pa.string()).to_pylist(), dtype=object)[rows]
      # Order of first appearance by item id: OBD hashes item features per file, and this order
      # gives two files describing the same items the same encoding.
      _, first, codes = np.unique(values, return_index=True, return_inverse=True)
      rank = np.argsort(np.argsort(first))
      categorical.append(np.eye(len(first), dtype=np.float32)[rank[codes]])
  problems.raise_first()
  numeric = [np.stack(numeric, axis=1).astype(np.float32)] if numeric else []
  return np.concatenate(numeric + categorical + [np.zeros((num_actions, 0), np.float32)], axis=1)


class _LogWide(NamedTuple):
  """What every chunk of one log shares: its items, slots and context encoding."""
  num_actions: int
  num_positions: int
  item_features: np.ndarray
  vocabulary: OBDVocabulary


class _LogFile(NamedTuple):
  """A log file opened for reading: its header, affinity columns, item_context.csv and the
  types its columns are read with."""
  csv: _Csv
  affinity_columns: list[str]
  context: tuple | None
  types: dict


def _open_log(root, behavior_policy: str, campaign: str) -> _LogFile:
  """The log file that load_obd's arguments name, its header checked and its item context read."""
  csv = _read_header(_log_file(root, behavior_policy, campaign), quoted=False)
  affinity_columns = _check_header(csv, REQUIRED_COLUMNS + USER_FEATURES)
  context = _item_context(csv.path.parent)
  types = {"timestamp": TIMESTAMP, **{c: pa.float64() for c in REQUIRED_COLUMNS[1:]},
           **{c: pa.dictionary(pa.int32(), pa.string()) for c in USER_FEATURES},
           **{c: pa.float32() for c in affinity_columns}}
  return _LogFile(csv, affinity_columns, context, types)


def _highest_item(affinity_columns: list[str]) -> int:
  # Without affinity columns nothing bounds the item ids, and num_actions sizes the affinity array.
  return (len(affinity_columns) or MAX_ACTIONS) - 1


def _log_wide(log_file: _LogFile, *, max_action: int, max_position: int, user_values: dict | None,
              vocabulary) -> _LogWide:
  """The items (item_context.csv checked), slots and vocabulary of a log whose rounds' largest
  item id and 1-based position are max_action and max_position."""
  item_ids = _item_ids(log_file.context, _highest_item(log_file.affinity_columns))
  num_actions = max(max_action + 1, len(log_file.affinity_columns),
                    0 if item_ids is None else int(item_ids.max()) + 1)
  vocabulary = _vocabulary(log_file.csv.path, user_values, vocabulary)
  return _LogWide(num_actions, max_position, _item_features(log_file.context, item_ids, num_actions),
                  vocabulary)


def _to_log(log_file: _LogFile, table: pa.Table, *, row_offset: int = 0,
            log_wide: _LogWide | None = None, vocabulary=None) -> OBDLog:
  """A table of the log's rows as an `OBDLog`, every value checked (load_obd's and iter_obd's).

  row_offset: the file's data rows before the table (for the line numbers of errors). log_wide:
  what the whole log shares (iter_obd's first pass), or None to take it from this table (and
  `vocabulary`, None to build one), as load_obd does.
  """
  csv, affinity_columns = log_file.csv, log_file.affinity_columns
  n = table.num_rows
  if n == 0:
    raise ValueError(f"{csv.path}: has a header but no data rows")
  problems = _Problems(csv, row_offset)
  high = _highest_item(affinity_columns)
  actions = _integers(problems, "item_id", _numpy(table.column("item_id")), 0, high, "an item id")
  positions = _integers(problems, "position", _numpy(table.column("position")), 1, MAX_POSITIONS,
                        "a 1-based position")
  rewards = _numpy(table.column("click"))
  problems.check("click", (rewards == 0) | (rewards == 1), "is not a click, 0 or 1")
  logging_probs = _numpy(table.column("propensity_score"))
  problems.check("propensity_score", (logging_probs > 0) & (logging_probs <= 1), "is outside (0, 1]")
  timestamps = _numpy(table.column("timestamp").cast(pa.int64())).view("datetime64[ns]")
  user_features = {c: table.column(c).unify_dictionaries().combine_chunks() for c in USER_FEATURES}
  table = table.select(affinity_columns)
  if affinity_columns:  # copied batch by batch, each batch's buffers freed once copied
    affinity = np.empty((n, len(affinity_columns)), np.float32)
    batches, table = table.to_batches(), None
    start = 0
    for i in range(len(batches)):
      block = np.asarray(batches[i].to_tensor(row_major=True))
      batches[i] = None
      affinity[start:start + len(block)] = block
      problems.check(affinity_columns, np.isfinite(block), "is not finite", row_offset=start)
      start += len(block)
  problems.raise_first()

  if log_wide is None:
    log_wide = _log_wide(log_file, max_action=int(actions.max()), max_position=int(positions.max()),
                         user_values={c: user_features[c].dictionary.to_pylist() for c in USER_FEATURES},
                         vocabulary=vocabulary)
  if not affinity_columns:
    affinity = np.zeros((n, log_wide.num_actions), np.float32)
  return OBDLog(actions=actions, positions=positions - 1, rewards=rewards, logging_probs=logging_probs,
                contexts=_encode(user_features, n, log_wide.vocabulary), user_item_affinity=affinity,
                num_actions=log_wide.num_actions, num_positions=log_wide.num_positions,
                timestamps=timestamps, item_features=log_wide.item_features,
                vocabulary=log_wide.vocabulary)


def load_obd(root: str | Path | None = None, *, behavior_policy: str = "bts", campaign: str = "all",
             vocabulary: OBDVocabulary | None = None) -> OBDLog:
  """Loads one OBD log: `<root>/<behavior_policy>/<campaign>/<campaign>.csv` and its item_context.csv.

  root may be OBD's top folder (as downloaded and unzipped), a folder holding
  `<campaign>.csv` (or `.csv.gz`) itself, or the CSV file; item_context.csv is read from the
  log file's folder (without it, item_features has no columns). With root None, the shipped
  sample. Rows keep the file's order (OBD files are sorted by timestamp).

  Args:
    root: OBD's folder, a log's folder, a log file, or None for the shipped sample.
    behavior_policy: "bts" or "random".
    campaign: "all", "men" or "women" (only "all" is shipped).
    vocabulary: encode contexts with this `OBDVocabulary`, usually another log's, so both
      logs' contexts have the same columns; a value it lacks leaves that feature's block
      zero (what a model fitted on the other log expects of a value it never saw). None
      builds one from this file: each column's values, sorted.

  Returns:
    An `OBDLog` with n rounds: actions, positions, rewards, logging_probs and timestamps
    [n], contexts [n, d], user_item_affinity [n, num_actions], item_features
    [num_actions, F], and its vocabulary.

  Raises:
    ValueError: naming the file, and the line and column where there is one, when the file is
      damaged (a truncated or corrupted gzip stream, bytes that are not UTF-8, a wrong number
      of fields, no rows) or a value is out of its domain: item ids must be integers in
      0..A-1 for A user-item_affinity columns (0..MAX_ACTIONS-1 without them), positions
      integers in 1..MAX_POSITIONS, clicks 0 or 1, propensity scores in (0, 1], affinities
      and numeric item features finite, timestamps ISO 8601 with a zone offset;
      item_context.csv must list each item once. Line numbers count the header as line 1;
      in a log file `"` is text, not a quote (OBD quotes nothing), so each row is one line.

  Example:
    >>> log = load_obd(behavior_policy="random")
    >>> log.num_actions, log.num_positions, log.rewards.shape, log.item_features.shape
    (80, 3, (10000,), (80, 41))
    >>> bts = load_obd(behavior_policy="bts", vocabulary=log.vocabulary)
    >>> bts.contexts.shape == log.contexts.shape
    True
  """
  log_file = _open_log(root, behavior_policy, campaign)
  # The table is not named here: _to_log frees its columns as it converts them.
  return _to_log(log_file, _read_table(log_file.csv, log_file.types, list(log_file.types)),
                 vocabulary=vocabulary)


def iter_obd(root: str | Path | None = None, *, chunk_rounds: int = 1_000_000,
             behavior_policy: str = "bts", campaign: str = "all",
             vocabulary: OBDVocabulary | None = None) -> Iterator[OBDLog]:
  """Reads one OBD log in chunks of at most chunk_rounds rounds: a file larger than memory.

  The chunks, concatenated, are `load_obd`'s log field by field (same arguments, same checks,
  same error messages, line numbers counted from the file's start); each chunk is an `OBDLog`
  with the whole log's num_actions, num_positions, item_features and vocabulary, so that
  chunks fit together (one one-hot encoding, one [A, L] shape of a target policy).

  The file is read twice, each time by pyarrow's streaming CSV reader (pyarrow.csv.open_csv),
  which holds a block of text at a time: memory is that of one chunk, whatever the file's
  length. A first pass, when iter_obd is called, reads only the columns that every chunk
  needs in advance: the user features (to build the vocabulary, unless one is given; each
  column's values, sorted, as load_obd builds it), the positions (num_positions) and, in a
  file without user-item_affinity columns, the item ids (num_actions). The second pass, as
  the chunks are consumed, reads every column, chunk by chunk.

  A damaged file raises as the chunks are read: a value out of its domain with the chunk that
  holds it (the chunks before it delivered), a cell that does not parse (or a damaged gzip
  stream) when the reader parses its block, which may be a block or two ahead of the chunks
  delivered, or at the call where the first pass reads it. With several problems in one
  file, the one raised may differ from load_obd's: iter_obd stops at the first chunk holding
  any, load_obd reports a cell that does not parse anywhere in the file before a value out of
  its domain.

  Args:
    root: OBD's folder, a log's folder, a log file, or None for the shipped sample (as in
      `load_obd`).
    chunk_rounds: the most rounds in one chunk (the last one may hold fewer).
    behavior_policy: "bts" or "random".
    campaign: "all", "men" or "women" (only "all" is shipped).
    vocabulary: encode contexts with this `OBDVocabulary` (as in `load_obd`); None builds
      one in the first pass.

  Returns:
    An iterator of `OBDLog`s, in the file's order, each of at most chunk_rounds rounds; it
    reads the file once (call iter_obd again for another pass).

  Raises:
    ValueError: as `load_obd`, and for a chunk_rounds that is not an int >= 1.

  Example:
    IPS of the uniform policy over the shipped sample, one chunk of 4,000 rounds at a time,
    equals IPS over the whole log:

    >>> import numpy as np
    >>> from saferl_jax import ope
    >>> def rounds(log):  # the uniform target policy at every slot: target_dist [m, A, L]
    ...   shape = (len(log.rewards), log.num_actions, log.num_positions)
    ...   return dict(rewards=log.rewards, actions=log.actions, logging_probs=log.logging_probs,
    ...               positions=log.positions, target_dist=np.full(shape, 1 / log.num_actions))
    >>> streamed = ope.estimate_streaming(map(rounds, iter_obd(chunk_rounds=4000)),
    ...                                   estimators=("ips",))["ips"]
    >>> whole = ope.ips(**rounds(load_obd()))
    >>> round(float(streamed.value), 5), bool(np.isclose(streamed.value, whole.value, rtol=1e-5))
    (0.00236, True)
  """
  checks.check_count("chunk_rounds", chunk_rounds)
  log_file = _open_log(root, behavior_policy, campaign)
  log_wide = _first_pass(log_file, vocabulary)
  return _chunks(log_file, log_wide, int(chunk_rounds))


def _first_pass(log_file: _LogFile, vocabulary) -> _LogWide:
  """What every chunk shares, from a streaming read of only the columns that decide it."""
  csv = log_file.csv
  names = (["position"] + ([] if log_file.affinity_columns else ["item_id"])
           + (list(USER_FEATURES) if vocabulary is None else []))
  options = _options(csv, {name: log_file.types[name] for name in names}, names)
  problems = _Problems(csv)  # ignored: the chunk holding a problem reports it, in file order
  high = _highest_item(log_file.affinity_columns)
  num_rows, max_action, max_position = 0, 0, 0
  values = {name: set() for name in USER_FEATURES}
  try:
    for batch in pa_csv.open_csv(csv.path, **options):
      if not batch.num_rows:
        continue
      num_rows += batch.num_rows
      # Out-of-domain values count as in-domain ones (as `_integers` leaves them): a damaged id
      # must not size num_actions before its chunk reports it.
      positions = _integers(problems, "position", _view(batch.column("position")), 1,
                            MAX_POSITIONS, "a 1-based position")
      max_position = max(max_position, int(positions.max()))
      if not log_file.affinity_columns:
        actions = _integers(problems, "item_id", _view(batch.column("item_id")), 0, high,
                            "an item id")
        max_action = max(max_action, int(actions.max()))
      if vocabulary is None:
        for name in USER_FEATURES:
          values[name].update(batch.column(name).dictionary.to_pylist())
  except _READ_ERRORS as err:
    raise _read_error(csv, log_file.types, err) from err
  if num_rows == 0:
    raise ValueError(f"{csv.path}: has a header but no data rows")
  return _log_wide(log_file, max_action=max_action, max_position=max_position,
                   user_values=None if vocabulary is not None else values, vocabulary=vocabulary)


def _chunks(log_file: _LogFile, log_wide: _LogWide, chunk_rounds: int) -> Iterator[OBDLog]:
  """The log's rows, chunk_rounds at a time, as `OBDLog`s (the streaming read of every column)."""
  csv, types = log_file.csv, log_file.types
  pending, num_pending, start = [], 0, 0  # record batches read and not yet delivered
  batches = None
  while True:
    try:
      if batches is None:
        batches = iter(pa_csv.open_csv(csv.path, **_options(csv, types, list(types))))
      batch = next(batches, None)
    except _READ_ERRORS as err:
      raise _read_error(csv, types, err) from err
    if batch is not None:
      pending.append(batch)
      num_pending += batch.num_rows
    while num_pending >= chunk_rounds or (batch is None and num_pending):
      table = pa.Table.from_batches(pending)
      size = min(chunk_rounds, num_pending)
      chunk, pending = table.slice(0, size), table.slice(size).to_batches()
      table = None
      num_pending -= size
      yield _to_log(log_file, chunk, row_offset=start, log_wide=log_wide)
      chunk = None
      start += size
    if batch is None:
      return


def split_by_time(log: OBDLog, *, test_fraction: float = 0.3) -> OBDSplit:
  """Splits a log in time: the rounds before a timestamp quantile train, the rest test.

  Rounds are ordered by timestamp (stably); the cut is the timestamp of the round at rank
  round(n (1 - test_fraction)), and rounds at the cut's time all go to test, so no instant is
  in both parts. Both parts keep the log's num_actions, num_positions, item_features and
  vocabulary; their arrays are views of the log's when it is already in time order (OBD's
  files are), copies otherwise.

  Args:
    log: an `OBDLog` with n rounds.
    test_fraction: the share of rounds to put in the later part, in (0, 1).

  Returns:
    `OBDSplit(train, test)`, two `OBDLog`s, each in time order.

  Raises:
    ValueError: when test_fraction is outside (0, 1) or a part would be empty.

  Example:
    >>> train, test = split_by_time(load_obd(), test_fraction=0.3)
    >>> len(train.rewards), len(test.rewards), bool(train.timestamps[-1] < test.timestamps[0])
    (7000, 3000, True)
  """
  if not 0 < test_fraction < 1:
    raise ValueError(f"test_fraction: {test_fraction} is not in (0, 1)")
  timestamps = log.timestamps
  n = len(timestamps)
  in_order = bool(np.all(timestamps[1:] >= timestamps[:-1]))
  order = None if in_order else np.argsort(timestamps, kind="stable")
  times = timestamps if in_order else timestamps[order]
  rank = min(max(int(round(n * (1 - test_fraction))), 0), n - 1) if n else 0
  cut = int(np.searchsorted(times, times[rank], side="left")) if n else 0
  if cut == 0 or cut == n:
    raise ValueError(f"test_fraction: splitting {n} rounds at {test_fraction} leaves an empty part "
                     f"({cut} before the cut)")

  def part(rows: slice) -> OBDLog:
    return take_rounds(log, rows if in_order else order[rows])

  return OBDSplit(train=part(slice(0, cut)), test=part(slice(cut, n)))


# The fields of an `OBDLog` with one entry per round (the rest describe the items or the encoding).
ROUND_FIELDS = ("actions", "positions", "rewards", "logging_probs", "contexts",
                "user_item_affinity", "timestamps")


def take_rounds(log: OBDLog, rows) -> OBDLog:
  """The log restricted to `rows` (a slice, int indices or a bool mask over its n rounds).

  Args:
    log: an `OBDLog`.
    rows: which rounds to keep, in the order given.

  Returns:
    An `OBDLog` with the same items, slots and vocabulary.

  Example:
    >>> len(take_rounds(load_obd(), slice(0, 100)).rewards)
    100
  """
  return log._replace(**{name: getattr(log, name)[rows] for name in ROUND_FIELDS})
