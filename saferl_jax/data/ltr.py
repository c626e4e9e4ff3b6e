"""Learning-to-rank data: a synthetic generator and a LETOR/SVMlight loader (floor 2).

Both give an `LTRData`: per query a padded list of D documents with feature
vectors, graded labels 0..4 and a bool mask `where` (True = real document), the layout that
`saferl_jax.cltr` and the rankers consume. The relevance probability of a
document is R = label / 4.

`make_ltr_dataset` draws queries from a hidden nonlinear scorer (a random
two-layer tanh network of the features) plus Gaussian noise, cut into graded
labels at fixed thresholds of the standardised score so that, as in real LTR
data (MSLR-WEB30K, Yahoo! LTR), label 0 is the most common and 4 the rarest.
`load_letor` reads the text files that real LTR data comes in
("label qid:Q 1:v 2:v ... # comment"); they cannot be downloaded here, so it
reads a local path: dense files in feature order (MSLR-WEB30K, Istella) through pyarrow's CSV
reader, anything else through an exact line parser. `read_letor_rows` gives the unpadded rows
(grouped by query) that `saferl_jax.data.letor` prepares -- query-level normalisation, clipping,
a candidate cap, folds -- before `pad_queries` pads them. `split` divides a dataset by query.

References:
  Qin, Liu. Introducing LETOR 4.0 Datasets. 2013. https://arxiv.org/abs/1306.2597
  [SAFE] Gupta, Oosterhuis, de Rijke. Safe Deployment for Counterfactual Learning to Rank with
  Exposure-Based Risk Minimization. SIGIR 2023. https://arxiv.org/abs/2305.01522
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

import functools
import gzip
import re
import zlib
from pathlib import Path
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from saferl_jax import checks

# Thresholds on the standardised noisy score (unit variance): labels 0..4 with
# probabilities about 0.50, 0.30, 0.13, 0.05, 0.02 when the score is Gaussian.
LABEL_THRESHOLDS = (0.0, 0.85, 1.5, 2.05)
HIDDEN_UNITS = 32
QUERY_FEATURE_SCALE = 0.5  # std of a per-query shift shared by its documents' features
# The largest feature index `load_letor` reads without num_features (MSLR-WEB30K has 136, Yahoo!
# LTR 700): features are dense, so the bound keeps a damaged index from sizing a huge array.
MAX_FEATURES = 100_000


class LTRData(NamedTuple):
  """Queries with padded candidate lists.

  Attributes:
    features: [Q, D, F] float32 document features (0 for padding).
    labels: [Q, D] int32 graded relevance in 0..max_label (0 for padding).
    where: [Q, D] bool, True for a real document.
    query_ids: [Q] numpy array of the original query ids (ints, or strings
      when a file's ids are not integers).
  """
  features: jax.Array
  labels: jax.Array
  where: jax.Array
  query_ids: np.ndarray

  @property
  def num_queries(self) -> int:
    return int(self.labels.shape[0])

  @property
  def num_docs(self) -> np.ndarray:
    """[Q] number of real documents per query."""
    return np.asarray(self.where).sum(axis=1)


def _normals(key: jax.Array, *shapes: tuple[int, ...]) -> list[jax.Array]:
  """Standard normal arrays of the given shapes from one draw (one random kernel to compile)."""
  sizes = [int(np.prod(shape)) for shape in shapes]
  flat = jax.random.normal(key, (sum(sizes),))
  offsets = np.cumsum([0] + sizes)
  return [flat[offsets[i]:offsets[i + 1]].reshape(shape) for i, shape in enumerate(shapes)]


def _features(docs: jax.Array, query_normals: jax.Array) -> jax.Array:
  """x = z + s_q: per-document normals [Q, D, F] plus a per-query shift [Q, 1, F]."""
  return docs + QUERY_FEATURE_SCALE * query_normals


def _hidden_scorer(key: jax.Array, num_features: int):
  """A random two-layer tanh network, standardised on a reference sample so scores have unit scale."""
  w1, b1, w2, ref_docs, ref_queries = _normals(
      key, (num_features, HIDDEN_UNITS), (HIDDEN_UNITS,), (HIDDEN_UNITS,), (512, 16, num_features),
      (512, 1, num_features))
  w1 = w1 * (1.5 / np.sqrt(num_features))
  b1 = 0.5 * b1
  w2 = w2 / np.sqrt(HIDDEN_UNITS)

  def raw(x):
    return jnp.tanh(x @ w1 + b1) @ w2

  reference = raw(_features(ref_docs, ref_queries)).ravel()
  mean, std = jnp.mean(reference), jnp.std(reference)
  return lambda x: (raw(x) - mean) / std


def make_ltr_dataset(
    key: jax.Array,
    *,
    num_queries: int = 1000,
    max_docs: int = 20,
    min_docs: int = 5,
    num_features: int = 16,
    noise: float = 0.5,
) -> LTRData:
  """Draws a synthetic LTR dataset with a hidden nonlinear relevance function.

  Features x = z + s_q (z ~ N(0, I) per document, s_q ~ N(0, 0.25 I) per query);
  score = (f(x) + noise * n) / sqrt(1 + noise^2), f a random tanh network
  standardised to unit variance, n ~ N(0, 1); label = number of thresholds in
  `LABEL_THRESHOLDS` below the score. The hidden function depends only on `key`
  and `num_features`, so datasets drawn with the same key share it.

  Args:
    key: PRNG key; same key, same dataset.
    num_queries: Q.
    max_docs: D, the padded list length.
    min_docs: shortest list; lengths are uniform in [min_docs, max_docs].
    num_features: F.
    noise: standard deviation of the label noise relative to the hidden score.

  Returns:
    An `LTRData` with query_ids 0..Q-1.

  Example:
    >>> import jax
    >>> data = make_ltr_dataset(jax.random.key(0), num_queries=8, max_docs=6, min_docs=3, num_features=4)
    >>> data.features.shape, data.labels.shape, bool(data.where[:, :3].all())
    ((8, 6, 4), (8, 6), True)
  """
  checks.check_key("key", key)
  for name, value in (("num_queries", num_queries), ("max_docs", max_docs), ("min_docs", min_docs),
                      ("num_features", num_features)):
    checks.check_positive_int(name, value)
  if min_docs > max_docs:
    raise ValueError(f"min_docs: {min_docs} is larger than max_docs {max_docs}")
  if not np.isfinite(noise) or noise < 0:
    raise ValueError(f"noise: must be finite and >= 0, got {noise!r}")
  features, labels, where = _generate(key, num_queries, max_docs, min_docs, num_features, float(noise))
  return LTRData(features, labels, where, np.arange(num_queries))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _generate(key, num_queries, max_docs, min_docs, num_features, noise):
  scorer_key, data_key, length_key = jax.random.split(key, 3)
  scorer = _hidden_scorer(scorer_key, num_features)
  docs, query_normals, label_noise = _normals(
      data_key, (num_queries, max_docs, num_features), (num_queries, 1, num_features), (num_queries, max_docs))
  features = _features(docs, query_normals)
  lengths = jax.random.randint(length_key, (num_queries,), min_docs, max_docs + 1)
  valid = jnp.arange(max_docs)[None, :] < lengths[:, None]
  score = scorer(features) + noise * label_noise
  score = score / jnp.sqrt(1.0 + noise**2)
  labels = jnp.sum(score[..., None] > jnp.asarray(LABEL_THRESHOLDS), axis=-1)
  return (jnp.where(valid[..., None], features, 0.0).astype(jnp.float32),
          jnp.where(valid, labels, 0).astype(jnp.int32), valid)


def take_queries(data: LTRData, index: np.ndarray) -> LTRData:
  """The queries at `index` (an int array or a bool mask over queries)."""
  return LTRData(data.features[index], data.labels[index], data.where[index], data.query_ids[index])


def split(data: LTRData, fractions: Sequence[float] = (0.6, 0.2, 0.2), *,
          key: jax.Array) -> tuple[LTRData, ...]:
  """Splits the queries at random into parts of the given fractions (train, validation, test).

  Part sizes are round(Q * cumulative fraction) differences, so every query
  lands in exactly one part.

  Args:
    data: an `LTRData` of Q queries.
    fractions: non-negative fractions summing to 1, one per part.
    key: PRNG key for the permutation.

  Returns:
    A tuple of `LTRData`, one per fraction, queries in random order (a plain tuple: its parts
    are of one type and their number is the caller's).

  Example:
    >>> import jax
    >>> data = make_ltr_dataset(jax.random.key(0), num_queries=10, max_docs=5, num_features=3)
    >>> [part.num_queries for part in split(data, key=jax.random.key(1))]
    [6, 2, 2]
  """
  checks.check_key("key", key)
  fractions = np.asarray(fractions, dtype=np.float64)
  if fractions.ndim != 1 or fractions.size == 0:
    raise ValueError(f"fractions: expected a non-empty sequence, got {fractions.tolist()!r}")
  if np.any(~np.isfinite(fractions)) or np.any(fractions < 0) or abs(fractions.sum() - 1) > 1e-6:
    raise ValueError(f"fractions: must be >= 0 and sum to 1, got {fractions.tolist()}")
  num_queries = data.num_queries
  order = np.asarray(jax.random.permutation(key, num_queries))
  bounds = np.round(np.cumsum(fractions) * num_queries).astype(int)
  bounds[-1] = num_queries
  starts = np.concatenate([[0], bounds[:-1]])
  return tuple(take_queries(data, order[start:stop]) for start, stop in zip(starts, bounds))


def _read_lines(path: Path) -> list[str]:
  if not path.is_file():
    raise ValueError(f"path: {path} is not a file")
  raw = path.read_bytes()
  if path.suffix == ".gz":
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
      raise ValueError(f"{path}: not a readable gzip file, truncated or corrupted ({err})") from err
  # Split the bytes, not the text: str.splitlines also breaks at \x1c, \x85, ..., which would
  # shift the line numbers of errors. Bad bytes become U+FFFD: fine in comments, an error elsewhere.
  return [line.decode("utf-8", errors="replace") for line in raw.splitlines()]


def _parse_features(where: str, tokens: list[str], bound: int,
                    bound_name: str) -> tuple[np.ndarray, np.ndarray]:
  """Feature indices (0-based) and values of one line's "i:v" tokens, indices at most `bound`."""
  try:
    pairs = [token.split(":") for token in tokens]
    if any(len(pair) != 2 for pair in pairs):
      raise ValueError
    indices = np.array([pair[0] for pair in pairs], dtype=np.int64)
    values = np.array([pair[1] for pair in pairs], dtype=np.float64)
    ok = np.isfinite(values).all() and (not indices.size or (
        indices.min() >= 1 and indices.max() <= bound and np.unique(indices).size == indices.size))
  except (ValueError, OverflowError):  # OverflowError: an index beyond int64
    ok = False
  if not ok:
    _raise_bad_feature(where, tokens, bound, bound_name)
  return indices - 1, values


def _raise_bad_feature(where: str, tokens: list[str], bound: int, bound_name: str):
  """Names the first bad token of a line, token by token (the slow path, taken only on errors)."""
  seen = set()
  for field, token in enumerate(tokens, start=3):  # fields 1 and 2 are the label and qid
    parts = token.split(":")
    try:
      if len(parts) != 2:
        raise ValueError
      index, value = int(parts[0]), float(parts[1])
    except ValueError:
      raise ValueError(f"{where}: bad feature token {token!r} (field {field}), "
                       "expected index:value") from None
    if index < 1:
      raise ValueError(f"{where}: feature indices start at 1, found {index} (field {field})")
    if index > bound:
      raise ValueError(f"{where}: feature index {index} (field {field}) exceeds {bound_name}")
    if index in seen:
      raise ValueError(f"{where}: a feature index appears twice, {index} (field {field})")
    if not np.isfinite(value):
      raise ValueError(f"{where}: feature values must be finite, feature {index} is {parts[1]!r} "
                       f"(field {field})")
    seen.add(index)
  raise ValueError(f"{where}: malformed features")  # unreachable while both paths agree


class LetorRows(NamedTuple):
  """A ranking file's documents grouped by query, unpadded: the layout before a candidate cap.

  Rows are grouped by query (queries in the order of their first line, each query's documents in
  the order of their lines), as in HarrieO/2022-doubly-robust-LTR's `DataFoldSplit`
  (utils/dataset.py: one feature matrix and `doclist_ranges`). Padding to [Q, D, F] happens only
  in `pad_queries`, after any cap: MSLR-WEB30K has queries of more than 1,000 documents, and its
  2.3 million training lines padded to the longest list would take ~13 GB.

  Attributes:
    features: [N, F] float32 numpy array, one row per document (0 for a missing sparse feature).
    labels: [N] int32 graded relevance.
    lengths: [Q] int64 number of documents of each query (all >= 1).
    query_ids: [Q] numpy array of the file's query ids (int64 when all are integers, else strings).
  """
  features: np.ndarray
  labels: np.ndarray
  lengths: np.ndarray
  query_ids: np.ndarray

  @property
  def starts(self) -> np.ndarray:
    """[Q] index of each query's first row."""
    return np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)

  @property
  def query_index(self) -> np.ndarray:
    """[N] the query (0..Q-1) of each row."""
    return np.repeat(np.arange(len(self.lengths)), self.lengths)


def _rows_from_groups(docs_of_query: dict, num_features: int) -> LetorRows:
  """LetorRows from {qid: [(label, indices, values), ...]} (the exact parser's result)."""
  lengths = np.array([len(docs) for docs in docs_of_query.values()], np.int64)
  features = np.zeros((int(lengths.sum()), num_features), np.float32)
  labels = np.zeros(len(features), np.int32)
  row = 0
  for docs in docs_of_query.values():
    for label, indices, values in docs:
      features[row, indices] = values
      labels[row] = label
      row += 1
  return LetorRows(features, labels, lengths, _query_id_array(list(docs_of_query)))


def _query_id_array(ids: list[str]) -> np.ndarray:
  """int64 ids when every id is an integer (as Python's int() reads it), the strings otherwise."""
  try:
    return np.array([int(i) for i in ids], dtype=np.int64)
  except ValueError:
    return np.array(ids)


def _read_exact(path: Path, bound: int, bound_name: str, max_label: int,
                num_features: int | None) -> LetorRows:
  """The exact line-by-line parser: any sparse, unordered file, and every error message."""
  docs_of_query: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
  largest_index = 0
  for line_number, line in enumerate(_read_lines(path), start=1):
    body = line.split("#", 1)[0].strip()
    if not body:
      continue
    where = f"{path}: line {line_number}"
    if "\ufffd" in body:
      column = body.index("\ufffd") + 1
      raise ValueError(f"{where}: bytes that are not UTF-8 text at character {column}")
    tokens = body.split()
    try:
      label_value = float(tokens[0])
    except ValueError:
      raise ValueError(f"{where}: the label {tokens[0]!r} is not a number") from None
    if not np.isfinite(label_value) or label_value != int(label_value):
      raise ValueError(f"{where}: the label {tokens[0]!r} is not an integer grade")
    label = int(label_value)
    if not 0 <= label <= max_label:
      raise ValueError(f"{where}: label {label} is outside 0..{max_label} (see max_label)")
    if len(tokens) < 2 or not tokens[1].startswith("qid:") or len(tokens[1]) == 4:
      raise ValueError(f"{where}: missing qid (expected 'label qid:Q i:v ...')")
    qid = tokens[1][4:]
    indices, values = _parse_features(where, tokens[2:], bound, bound_name)
    if indices.size:
      largest_index = max(largest_index, int(indices.max()) + 1)
    docs_of_query.setdefault(qid, []).append((label, indices, values))
  if not docs_of_query:
    raise ValueError(f"path: {path} holds no data lines")
  num_features = largest_index if num_features is None else num_features
  return _rows_from_groups(docs_of_query, max(num_features, 1))


# The dense fast path. A block of lines is accepted only if it is plainly "label qid:Q 1:v 2:v ... F:v"
# on every line (after comments, CR and repeated blanks are removed); anything else -- sparse or
# unordered features, damage of any kind -- makes `_read_dense` return None and the exact parser
# reads the whole file, so results and error messages are the exact parser's.
_BLOCK_BYTES = 32 * 2**20
_COMMENT = re.compile(rb"#[^\n]*")
_PLAIN = bytes(range(0x21, 0x7F)) + b" \n"  # printable ASCII, blank and newline: all a dense line needs


class _NotDense(Exception):
  """The file is not a plain dense LETOR file: read it with the exact parser."""


def _clean_block(block: bytes) -> bytes:
  """Comments, CR, tabs and repeated or edge blanks removed, so that a ' ' separates the tokens."""
  if b"#" in block:
    block = _COMMENT.sub(b"", block.replace(b"\r", b"\n"))  # a comment ends at \r or \n, as in splitlines
  block = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\t", b" ")
  while b"  " in block:
    block = block.replace(b"  ", b" ")
  block = block.replace(b" \n", b"\n").replace(b"\n ", b"\n")
  block = block[1:] if block.startswith(b" ") else block
  if block.translate(None, _PLAIN):  # other whitespace or non-ASCII bytes: the exact parser decides
    raise _NotDense
  return block


def _blocks(path: Path):
  """The file's bytes in blocks of whole lines (decompressing .gz), each ending in a newline."""
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as stream:
    rest = b""
    while True:
      data = stream.read(_BLOCK_BYTES)
      if not data:
        break
      data = rest + data
      cut = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
      if cut == 0:
        rest = data
        continue
      rest = data[cut:]
      yield data[:cut]
    if rest:
      yield rest + b"\n"


def _parse_block(block: bytes, num_columns: int, max_label: int):
  """Labels [n], qid strings (pyarrow) and float64 feature columns of one cleaned block."""
  names = [f"c{i}" for i in range(num_columns)]
  table = pa_csv.read_csv(
      pa.py_buffer(block),
      read_options=pa_csv.ReadOptions(column_names=names, use_threads=True),
      parse_options=pa_csv.ParseOptions(delimiter=" ", quote_char=False, escape_char=False,
                                        ignore_empty_lines=True),
      convert_options=pa_csv.ConvertOptions(
          column_types={name: (pa.float64() if i == 0 else pa.string()) for i, name in enumerate(names)},
          null_values=[], strings_can_be_null=False, quoted_strings_can_be_null=False))
  labels = table.column(0).to_numpy()
  if not (np.isfinite(labels).all() and (labels == np.round(labels)).all()
          and labels.min(initial=0) >= 0 and labels.max(initial=0) <= max_label):
    raise _NotDense
  qids = table.column(1)
  if not (pc.all(pc.starts_with(qids, "qid:")).as_py() and pc.min(pc.binary_length(qids)).as_py() > 4):
    raise _NotDense
  columns = []
  for j in range(1, num_columns - 1):  # feature j sits in column j + 1 as "j:value"
    prefix = f"{j}:"
    column = table.column(j + 1)
    if not pc.all(pc.starts_with(column, prefix)).as_py():
      raise _NotDense
    values = pc.cast(pc.utf8_slice_codeunits(column, len(prefix)), pa.float64()).to_numpy()
    if not np.isfinite(values).all():
      raise _NotDense
    columns.append(values)
  return labels.astype(np.int32), pc.utf8_slice_codeunits(qids, 4), columns


def _read_dense(path: Path, bound: int, max_label: int, num_features: int | None) -> LetorRows | None:
  """The fast reader of dense, in-order files (MSLR-WEB30K, Istella); None when the file is not one.

  Reads blocks of lines with pyarrow's CSV reader (space-separated, every token a string), checks
  that column j + 1 of every line starts with "j:" and converts the rest; features go into one
  [N, F] float32 buffer grown in place (ndarray.resize: realloc, no copy of what is written), so the
  peak stays near the returned arrays plus one block.
  """
  try:
    features = labels = None
    qid_chunks, rows, num_columns = [], 0, None
    for block in _blocks(path):
      block = _clean_block(block)
      if not block.strip(b"\n"):
        continue
      if num_columns is None:
        first = block.lstrip(b"\n").split(b"\n", 1)[0]
        num_columns = first.count(b" ") + 1
        width = num_columns - 2
        if width < 1 or width > bound:
          return None
        capacity = max(1024, 2 * block.count(b"\n"))
        features = np.zeros((capacity, num_features or width), np.float32)
        labels = np.zeros(capacity, np.int32)
      block_labels, qids, columns = _parse_block(block, num_columns, max_label)
      n = len(block_labels)
      if rows + n > len(labels):
        capacity = max(rows + n, int(1.5 * len(labels)))
        features.resize((capacity, features.shape[1]), refcheck=False)
        labels.resize(capacity, refcheck=False)
      for j, values in enumerate(columns):
        features[rows:rows + n, j] = values
      labels[rows:rows + n] = block_labels
      qid_chunks.append(qids)
      rows += n
  except (_NotDense, pa.ArrowInvalid, OSError, EOFError, zlib.error):
    return None  # BadGzipFile is an OSError; the exact parser names the problem
  if not rows:
    return None
  features.resize((rows, features.shape[1]), refcheck=False)
  labels.resize(rows, refcheck=False)
  encoded = pc.dictionary_encode(pa.chunked_array(qid_chunks))  # one dictionary, first-seen order
  index = np.concatenate([chunk.indices.to_numpy() for chunk in encoded.chunks]).astype(np.int64)
  ids = encoded.chunks[0].dictionary.to_pylist()
  if np.any(np.diff(index) < 0):  # a query's lines are not contiguous: group them (a copy)
    order = np.argsort(index, kind="stable")
    features, labels, index = features[order], labels[order], index[order]
  lengths = np.bincount(index, minlength=len(ids)).astype(np.int64)
  return LetorRows(features, labels, lengths, _query_id_array(ids))


def _check_load_options(max_docs, num_features, max_label):
  if max_docs is not None and (not isinstance(max_docs, (int, np.integer)) or max_docs < 1):
    raise ValueError(f"max_docs: must be a positive int or None, got {max_docs!r}")
  if num_features is not None and (not isinstance(num_features, (int, np.integer)) or num_features < 1):
    raise ValueError(f"num_features: must be a positive int or None, got {num_features!r}")
  if not isinstance(max_label, (int, np.integer)) or max_label < 1:
    raise ValueError(f"max_label: must be a positive int, got {max_label!r}")


def read_letor_rows(path: str | Path, *, num_features: int | None = None, max_label: int = 4,
                    fast: bool = True) -> LetorRows:
  """Reads a LETOR/SVMlight ranking file into unpadded rows grouped by query (see `load_letor`).

  Dense files whose lines list features 1..F in order (MSLR-WEB30K, Istella) take a fast path:
  pyarrow's CSV reader on space-separated tokens, with the "j:" prefixes checked and stripped
  column by column. Any other file -- sparse or unordered features, or damage -- is read by the
  exact line parser, which also gives every error message; both give the same rows.

  Args:
    path: the text file (.gz is decompressed).
    num_features: F; defaults to the largest feature index (at most `MAX_FEATURES`).
    max_label: the largest allowed label.
    fast: False forces the exact parser (for tests and comparisons).

  Returns:
    A `LetorRows`.

  Raises:
    ValueError: as `load_letor`.

  Example:
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "train.txt"
    >>> _ = path.write_text("2 qid:7 1:0.5 2:1\\n1 qid:9 1:0.2 2:0\\n0 qid:7 1:1 2:3\\n")
    >>> rows = read_letor_rows(path)
    >>> rows.features.shape, rows.labels.tolist(), rows.lengths.tolist(), rows.query_ids.tolist()
    ((3, 2), [2, 0, 1], [2, 1], [7, 9])
  """
  path = Path(path)
  _check_load_options(None, num_features, max_label)
  if not path.is_file():
    raise ValueError(f"path: {path} is not a file")
  # Bound the indices before allocating: one damaged "99999999999:1" would ask for terabytes.
  if num_features is None:
    bound, bound_name = MAX_FEATURES, f"MAX_FEATURES={MAX_FEATURES} (pass num_features to read more)"
  else:
    bound, bound_name = num_features, f"num_features={num_features}"
  rows = _read_dense(path, bound, max_label, num_features) if fast else None
  return rows if rows is not None else _read_exact(path, bound, bound_name, max_label, num_features)


def pad_queries(rows: LetorRows, *, max_docs: int | None = None) -> LTRData:
  """Pads (or truncates, keeping each query's first documents) rows to an `LTRData` of [Q, D, F].

  Args:
    rows: a `LetorRows`.
    max_docs: D; defaults to the longest query. Apply a candidate cap first
      (`saferl_jax.data.letor.prepare_letor`) on files with long lists.

  Returns:
    An `LTRData`.

  Example:
    >>> rows = LetorRows(np.ones((3, 2), np.float32), np.array([1, 0, 2]), np.array([2, 1]), np.array([5, 6]))
    >>> pad_queries(rows).labels.tolist()
    [[1, 0], [2, 0]]
  """
  if max_docs is not None and (not isinstance(max_docs, (int, np.integer)) or max_docs < 1):
    raise ValueError(f"max_docs: must be a positive int or None, got {max_docs!r}")
  lengths = np.asarray(rows.lengths, np.int64)
  num_docs = int(lengths.max(initial=1)) if max_docs is None else int(max_docs)
  position = np.arange(len(rows.labels)) - np.repeat(rows.starts, lengths)
  query = np.repeat(np.arange(len(lengths)), lengths)
  keep = position < num_docs
  if not keep.all():
    position, query = position[keep], query[keep]
  features = np.zeros((len(lengths), num_docs, rows.features.shape[1]), np.float32)
  labels = np.zeros((len(lengths), num_docs), np.int32)
  where = np.zeros((len(lengths), num_docs), bool)
  if keep.all():
    features[query, position] = rows.features
    labels[query, position] = rows.labels
  else:
    features[query, position] = rows.features[keep]
    labels[query, position] = np.asarray(rows.labels)[keep]
  where[query, position] = True
  return LTRData(jnp.asarray(features), jnp.asarray(labels), jnp.asarray(where), rows.query_ids)


def load_letor(path: str | Path, *, max_docs: int | None = None, num_features: int | None = None,
               max_label: int = 4) -> LTRData:
  """Reads a LETOR/SVMlight ranking file ("label qid:Q 1:v 2:v ... # comment").

  Features may be sparse (missing ones are 0) and in any order; indices are
  1-based. Text after "#" and blank lines are ignored. A query's lines need not
  be contiguous: queries keep the order of their first line, documents the
  order of their lines. Files ending in .gz are decompressed. Dense files in
  feature order are read by a fast path (see `read_letor_rows`); for
  preparation (query-level normalisation, clipping, a candidate cap, folds) see
  `saferl_jax.data.letor`.

  Args:
    path: the text file.
    max_docs: if given, every list is padded or truncated (keeping its first
      documents) to exactly this length, so several files share one shape;
      otherwise lists are padded to the longest.
    num_features: F; defaults to the largest feature index in the file, which
      may then be at most `MAX_FEATURES` (100,000). An index above the bound is
      an error, raised before any array is allocated.
    max_label: the largest allowed label (4 for MSLR-WEB30K and Yahoo! LTR).

  Returns:
    An `LTRData`; query_ids holds the file's ids (int64 when they are all
    integers, strings otherwise).

  Raises:
    ValueError: naming the file, and the line (and field) where there is one:
      a truncated or corrupted .gz file, bytes that are not UTF-8 outside a
      comment, a label that is not an integer in 0..max_label, a missing qid, a
      bad feature token, a feature index below 1, above the bound or repeated,
      a feature value that is not finite, or a file with no data lines.

  Example:
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "train.txt"
    >>> _ = path.write_text("2 qid:7 1:0.5 3:1 # doc a\\n0 qid:7 2:1\\n1 qid:9 1:0.2\\n")
    >>> data = load_letor(path)
    >>> data.features.shape, data.labels.tolist(), data.query_ids.tolist()
    ((2, 2, 3), [[2, 0], [1, 0]], [7, 9])
  """
  _check_load_options(max_docs, num_features, max_label)
  rows = read_letor_rows(path, num_features=num_features, max_label=max_label)
  return pad_queries(rows, max_docs=max_docs)
