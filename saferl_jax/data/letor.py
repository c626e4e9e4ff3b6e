"""Real LETOR data prepared as the papers ran it: clipping, query-level normalisation, a candidate cap, folds (floor 2).

Works on the unpadded rows of `saferl_jax.data.ltr.read_letor_rows` and pads only at the end, so
a file of MSLR-WEB30K's size (2.3 million lines of 136 features, lists of more than 1,000
documents) never becomes a [Q, longest, F] array. `prepare_letor` applies, in this order:

1. dropping queries without a relevant document (label > 0), where asked -- as
   HarrieO/2022-doubly-robust-LTR purges its test set (utils/dataset.py, `purge_test_set`): their
   NDCG is undefined;
2. clipping each feature to [low_f, high_f], bounds that `clip_bounds` takes as percentiles of the
   training split (neither paper's code clips; it keeps one outlier from squashing a query's
   other documents to 0 under query-level normalisation);
3. normalisation: "query_minmax", x' = (x - min_q) / (max_q - min_q) per query and feature (0 where
   the feature is constant within the query), over all of the query's documents before the cap --
   HarrieO/2022-doubly-robust-LTR's `_normalize_feat` (utils/dataset.py) and LETOR's QueryLevelNorm;
   "log", x' = sign(x) log(1 + |x|), shashankg7/cikm-safeultr's optional transform
   (src/data/data_loader.py, `__log_transform`); or None;
4. the candidate cap: at most `max_docs` documents per query, chosen by `keep`:
   "random" (default) -- a uniform subset without replacement, as shashankg7/cikm-safeultr caps
   MSLR at max_cand_size = 120 (config/config.yaml; `x.sample(max_cand_size)` in
   src/data/data_loader.py): it leaves the label distribution, and so NDCG's scale, unbiased;
   "relevant" -- all relevant documents first, then random others (easier lists: more relevant
   documents than the data holds, use it only for a reason); "first" -- the first in file order
   (what `load_letor(max_docs=...)` does);
5. padding to [Q, D, F], D = max_docs (or the longest list left).

`load_letor_fold` reads the train, validation and test files of one fold in the layout of
MSLR-WEB10K/30K (Fold{i}/train.txt, vali.txt, test.txt), Yahoo! LTR (set{i}.train.txt,
set{i}.valid.txt, set{i}.test.txt) or Istella (train.txt, optional vali.txt, test.txt); the
clipping bounds come from the training file only. `summary` describes a split.

References:
  Qin, Liu. Introducing LETOR 4.0 Datasets. 2013. https://arxiv.org/abs/1306.2597
  Oosterhuis. Doubly-Robust Estimation for Correcting Position-Bias in Click Feedback for
  Unbiased Learning to Rank. TOIS 2023. https://arxiv.org/abs/2203.17118
  [SAFE] Gupta, Oosterhuis, de Rijke. Safe Deployment for Counterfactual Learning to Rank with
  Exposure-Based Risk Minimization. SIGIR 2023. https://arxiv.org/abs/2305.01522
"""

# No `from __future__ import annotations`: pdoc evaluates NamedTuple fields outside this module.

from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from saferl_jax import checks
from saferl_jax.data.ltr import LetorRows, LTRData, pad_queries, read_letor_rows

NORMALIZATIONS = ("query_minmax", "log", None)
KEEP_RULES = ("random", "relevant", "first")
SPLITS = ("train", "validation", "test")


class ClipBounds(NamedTuple):
  """Per-feature clipping bounds.

  Attributes:
    low: [F] lower bounds.
    high: [F] upper bounds (>= low).
  """
  low: np.ndarray
  high: np.ndarray


class LetorFold(NamedTuple):
  """One fold's prepared splits.

  Attributes:
    train: `LTRData` of the training file.
    validation: `LTRData` of the validation file, None when the layout has none (Istella).
    test: `LTRData` of the test file.
    bounds: the `ClipBounds` taken from the training file, or None without clipping.
  """
  train: LTRData
  validation: LTRData | None
  test: LTRData
  bounds: ClipBounds | None


class LetorSummary(NamedTuple):
  """What a split holds.

  Attributes:
    num_queries: Q.
    num_documents: N, all documents (before any cap).
    num_features: F.
    docs_mean: mean documents per query.
    docs_median: median documents per query.
    docs_max: most documents of one query.
    label_counts: [max_label + 1] documents per label.
    no_relevant_share: share of queries without a document of label > 0.
    capped_share: share of queries with more than max_docs documents (0 without a cap).
    dropped_share: share of documents a cap of max_docs leaves out (0 without a cap).
  """
  num_queries: int
  num_documents: int
  num_features: int
  docs_mean: float
  docs_median: float
  docs_max: int
  label_counts: np.ndarray
  no_relevant_share: float
  capped_share: float
  dropped_share: float


def _as_rows(data: LetorRows | LTRData) -> LetorRows:
  if isinstance(data, LetorRows):
    return data
  where = np.asarray(data.where)
  order = np.argsort(~where, axis=1, kind="stable")  # real documents first, in their order
  take = np.take_along_axis(where, order, 1)
  features = np.take_along_axis(np.asarray(data.features), order[..., None], 1)[take]
  labels = np.take_along_axis(np.asarray(data.labels), order, 1)[take]
  return LetorRows(features, labels, where.sum(1).astype(np.int64), np.asarray(data.query_ids))


def summary(data: LetorRows | LTRData, *, max_docs: int | None = None, max_label: int = 4) -> LetorSummary:
  """Counts of a split: queries, documents per query, labels, and what a cap of max_docs would cut.

  Args:
    data: `LetorRows` (before a cap) or an `LTRData` (its real documents).
    max_docs: a candidate cap to report on (capped_share, dropped_share); None for none.
    max_label: the largest label counted.

  Returns:
    A `LetorSummary`.

  Example:
    >>> rows = LetorRows(np.zeros((5, 2), np.float32), np.array([0, 2, 0, 0, 1]), np.array([3, 2]),
    ...                  np.array([1, 2]))
    >>> s = summary(rows, max_docs=2)
    >>> s.docs_mean, s.label_counts.tolist(), s.capped_share, s.dropped_share
    (2.5, [3, 1, 1, 0, 0], 0.5, 0.2)
  """
  rows = _as_rows(data)
  lengths = np.asarray(rows.lengths, np.int64)
  labels = np.asarray(rows.labels)
  if lengths.size == 0:
    raise ValueError("data: holds no queries")
  relevant = np.add.reduceat((labels > 0).astype(np.int64), rows.starts) if labels.size else lengths * 0
  if max_docs is None:
    capped = dropped = 0.0
  else:
    checks.check_positive_int("max_docs", max_docs)
    capped = float(np.mean(lengths > max_docs))
    dropped = float(np.maximum(lengths - max_docs, 0).sum() / lengths.sum())
  return LetorSummary(
      num_queries=int(lengths.size), num_documents=int(lengths.sum()),
      num_features=int(rows.features.shape[1]), docs_mean=float(lengths.mean()),
      docs_median=float(np.median(lengths)), docs_max=int(lengths.max()),
      label_counts=np.bincount(labels, minlength=max_label + 1)[:max_label + 1],
      no_relevant_share=float(np.mean(relevant == 0)), capped_share=capped, dropped_share=dropped)


def clip_bounds(rows: LetorRows, percentile: float) -> ClipBounds:
  """Per-feature bounds at the (100 - p)-th and p-th percentiles of a (training) split's documents.

  low_f = percentile_{100-p}(x_f), high_f = percentile_p(x_f) over all N documents (linear
  interpolation, numpy's default); computed one feature at a time, so the only copy is one column.

  Args:
    rows: the training split's `LetorRows`.
    percentile: p in [50, 100]; 100 gives the observed minimum and maximum (no clipping).

  Returns:
    A `ClipBounds` of [F] arrays.

  Example:
    >>> rows = LetorRows(np.arange(101, dtype=np.float32)[:, None], np.zeros(101, np.int32),
    ...                  np.array([101]), np.array([1]))
    >>> [b.tolist() for b in clip_bounds(rows, 99.0)]
    [[1.0], [99.0]]
  """
  p = float(checks.check_real("percentile", percentile, low=50.0, high=100.0))
  features = np.asarray(rows.features)
  if not features.shape[0]:
    raise ValueError("rows: holds no documents")
  bounds = np.array([np.percentile(features[:, f], [100.0 - p, p]) for f in range(features.shape[1])],
                    np.float32).reshape(features.shape[1], 2)
  return ClipBounds(bounds[:, 0], bounds[:, 1])


def _chosen_rows(rows: LetorRows, max_docs: int | None, keep: str, key) -> np.ndarray | None:
  """Row indices of the documents the cap keeps (each query's in file order), None to keep all."""
  lengths = np.asarray(rows.lengths, np.int64)
  if max_docs is None or lengths.max(initial=0) <= max_docs:
    return None
  starts = rows.starts
  position = np.arange(lengths.sum()) - np.repeat(starts, lengths)
  if keep == "first":
    return np.flatnonzero(position < max_docs)
  if key is None:
    raise ValueError(f"key: keep={keep!r} draws documents at random; pass a PRNG key")
  checks.check_key("key", key)
  draw = np.asarray(jax.random.uniform(key, (int(lengths.sum()),)))
  query = np.repeat(np.arange(lengths.size), lengths)
  # Within a query, rank documents by (not relevant, uniform draw) for "relevant", by the draw alone
  # for "random"; keep the max_docs best ranks.
  priority = draw + (np.asarray(rows.labels) <= 0) if keep == "relevant" else draw
  order = np.lexsort((priority, query))
  rank = np.empty_like(order)
  rank[order] = np.arange(order.size) - np.repeat(starts, lengths)
  return np.flatnonzero(rank < max_docs)


def prepare_letor(rows: LetorRows, *, bounds: ClipBounds | None = None,
                  normalization: str | None = "query_minmax", max_docs: int | None = None,
                  keep: str = "random", key: jax.Array | None = None,
                  drop_no_relevant: bool = False) -> LTRData:
  """Clips, normalises per query, caps and pads one split (see the module docstring for the order).

  x <- clip(x, low, high); "query_minmax": x <- (x - min_q x) / (max_q x - min_q x) (0 where
  max = min), min and max over all of query q's documents (before the cap); "log": x <- sign(x)
  log(1 + |x|); then at most max_docs documents per query, chosen by `keep`, in file order.

  Args:
    rows: a split's `LetorRows` (`saferl_jax.data.ltr.read_letor_rows`); not modified.
    bounds: `ClipBounds` from the training split (`clip_bounds`), or None for no clipping.
    normalization: "query_minmax", "log" or None.
    max_docs: the candidate cap D, or None for none (lists padded to the longest).
    keep: which documents a capped query keeps: "random", "relevant" or "first".
    key: PRNG key for "random" and "relevant"; needed only when some query is capped.
    drop_no_relevant: drop queries without a document of label > 0.

  Returns:
    An `LTRData` of [Q', D, F] (Q' = Q unless queries were dropped).

  Example:
    >>> rows = LetorRows(np.array([[1.], [3.], [2.], [5.]], np.float32), np.array([1, 0, 0, 0]),
    ...                  np.array([2, 2]), np.array([7, 8]))
    >>> data = prepare_letor(rows, drop_no_relevant=True)
    >>> data.features[..., 0].tolist(), data.query_ids.tolist()
    ([[0.0, 1.0]], [7])
  """
  checks.check_choice("normalization", normalization, NORMALIZATIONS)
  checks.check_choice("keep", keep, KEEP_RULES)
  if max_docs is not None:
    checks.check_positive_int("max_docs", max_docs)
  num_features = rows.features.shape[1]
  if bounds is not None:
    low, high = (np.asarray(b, np.float32) for b in bounds)
    if low.shape != (num_features,) or high.shape != (num_features,) or np.any(low > high):
      raise ValueError(f"bounds: expected [F={num_features}] arrays with low <= high, got shapes "
                       f"{low.shape}, {high.shape}")
  if drop_no_relevant:
    relevant = np.add.reduceat((np.asarray(rows.labels) > 0).astype(np.int64), rows.starts)
    if not relevant.all():
      keep_query = relevant > 0
      if not keep_query.any():
        raise ValueError("drop_no_relevant: no query has a relevant document")
      row_mask = np.repeat(keep_query, rows.lengths)
      rows = LetorRows(rows.features[row_mask], np.asarray(rows.labels)[row_mask],
                       np.asarray(rows.lengths)[keep_query], np.asarray(rows.query_ids)[keep_query])
  if normalization == "query_minmax":
    # min(clip(x)) = clip(min(x)) (clipping is monotone): the per-query extremes come from the
    # uncapped rows without a clipped copy of them.
    low_q = np.minimum.reduceat(rows.features, rows.starts, axis=0)
    high_q = np.maximum.reduceat(rows.features, rows.starts, axis=0)
    if bounds is not None:
      low_q, high_q = np.clip(low_q, low, high), np.clip(high_q, low, high)
  chosen = _chosen_rows(rows, max_docs, keep, key)
  if chosen is None:
    features, labels, lengths = rows.features.copy(), np.asarray(rows.labels), np.asarray(rows.lengths)
  else:
    features, labels = rows.features[chosen], np.asarray(rows.labels)[chosen]
    lengths = np.minimum(np.asarray(rows.lengths), max_docs)
  if bounds is not None:
    np.clip(features, low, high, out=features)
  if normalization == "query_minmax":
    spread = high_q - low_q
    spread[spread == 0] = 1.0  # a feature constant within the query becomes 0, as in _normalize_feat
    features -= np.repeat(low_q, lengths, axis=0)
    features /= np.repeat(spread, lengths, axis=0)
  elif normalization == "log":
    np.copysign(np.log1p(np.abs(features)), features, out=features)
  return pad_queries(LetorRows(features, labels, lengths, rows.query_ids), max_docs=max_docs)


_GZ = ("", ".gz")


def _first_file(directory: Path, *names: str) -> Path | None:
  for name in names:
    for suffix in _GZ:
      if (directory / (name + suffix)).is_file():
        return directory / (name + suffix)
  return None


def fold_files(directory: str | Path, fold: int = 1) -> tuple[Path, Path | None, Path]:
  """The (train, validation, test) files of one fold, from whichever dataset layout `directory` has.

  Layouts (each file may also end in .gz): MSLR-WEB10K/30K, <directory>/Fold{fold}/train.txt,
  vali.txt, test.txt (or `directory` is that Fold folder, fold 1 only); Yahoo! LTR,
  set{fold}.train.txt, set{fold}.valid.txt, set{fold}.test.txt; Istella, train.txt, test.txt and
  an optional vali.txt (one fold).

  Args:
    directory: the dataset's folder.
    fold: the fold number (1..5 for MSLR, 1 or 2 for Yahoo!'s sets, 1 for Istella).

  Returns:
    The three paths; validation is None when the layout has no validation file.

  Example:
    >>> import pathlib, tempfile
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("set1.train.txt", "set1.valid.txt", "set1.test.txt"):
    ...   _ = (root / name).write_text("1 qid:1 1:0\\n")
    >>> [p.name for p in fold_files(root)]
    ['set1.train.txt', 'set1.valid.txt', 'set1.test.txt']
  """
  directory = Path(directory)
  checks.check_positive_int("fold", fold)
  if not directory.is_dir():
    raise ValueError(f"directory: {directory} is not a folder")
  fold_dir = directory / f"Fold{fold}"
  for folder in (fold_dir, directory if fold == 1 else None):  # MSLR, or a Fold folder itself
    if folder is None or not folder.is_dir():
      continue
    files = [_first_file(folder, name) for name in ("train.txt", "vali.txt", "test.txt")]
    if all(files):
      return files[0], files[1], files[2]
  yahoo = [_first_file(directory, f"set{fold}.{name}.txt") for name in ("train", "valid", "test")]
  if all(yahoo):
    return yahoo[0], yahoo[1], yahoo[2]
  istella = [_first_file(directory, name) for name in ("train.txt", "vali.txt", "test.txt")]
  if istella[0] and istella[2] and fold == 1:
    return istella[0], istella[1], istella[2]
  raise ValueError(
      f"directory: {directory} holds no fold {fold} in a known layout: MSLR (Fold{fold}/train.txt, "
      f"vali.txt, test.txt), Yahoo! LTR (set{fold}.train.txt, set{fold}.valid.txt, "
      f"set{fold}.test.txt) or Istella (train.txt, [vali.txt,] test.txt; fold 1 only)")


def load_letor_fold(directory: str | Path, fold: int = 1, *, percentile: float | None = None,
                    normalization: str | None = "query_minmax", max_docs: int | None = None,
                    keep: str = "random", key: jax.Array | None = None,
                    drop_no_relevant: tuple[str, ...] = (), num_features: int | None = None,
                    max_label: int = 4) -> LetorFold:
  """Reads and prepares one fold's train, validation and test files (layouts: `fold_files`).

  Each split goes through `prepare_letor` with the same options; clipping bounds are the
  `percentile` bounds of the training file (`clip_bounds`), applied to all three; the cap applies
  to all three, as shashankg7/cikm-safeultr caps its train, validation and test loaders alike.
  Every split has the training file's F (num_features defaults to it).

  Args:
    directory: the dataset's folder.
    fold: the fold number.
    percentile: clip at this percentile (and 100 - percentile) of the training file; None: no clipping.
    normalization: as `prepare_letor`.
    max_docs: the candidate cap, or None.
    keep: as `prepare_letor`.
    key: PRNG key for a random cap (split i uses fold_in(key, i)).
    drop_no_relevant: names of the splits ("train", "validation", "test") whose queries without a
      relevant document are dropped; HarrieO/2022-doubly-robust-LTR drops them from "test" only.
    num_features: F, or None for the training file's.
    max_label: the largest allowed label.

  Returns:
    A `LetorFold`.

  Example:
    >>> import pathlib, tempfile
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> for name in ("train.txt", "test.txt"):
    ...   _ = (root / name).write_text("1 qid:1 1:0 2:4\\n0 qid:1 1:2 2:4\\n")
    >>> fold = load_letor_fold(root)
    >>> fold.validation is None, fold.train.features[0, :, 0].tolist()
    (True, [0.0, 1.0])
  """
  bad = set(drop_no_relevant) - set(SPLITS)
  if isinstance(drop_no_relevant, str) or bad:
    raise ValueError(f"drop_no_relevant: expected split names among {SPLITS}, got {drop_no_relevant!r}")
  paths = fold_files(directory, fold)
  train_rows = read_letor_rows(paths[0], num_features=num_features, max_label=max_label)
  bounds = None if percentile is None else clip_bounds(train_rows, percentile)
  num_features = train_rows.features.shape[1]
  prepared = []
  for i, (name, path) in enumerate(zip(SPLITS, paths)):
    if path is None:
      prepared.append(None)
      continue
    rows = train_rows if i == 0 else read_letor_rows(path, num_features=num_features, max_label=max_label)
    split_key = None if key is None else jax.random.fold_in(key, i)
    prepared.append(prepare_letor(rows, bounds=bounds, normalization=normalization, max_docs=max_docs,
                                  keep=keep, key=split_key, drop_no_relevant=name in drop_no_relevant))
    rows = train_rows = None  # free each split's rows before reading the next
  return LetorFold(prepared[0], prepared[1], prepared[2], bounds)
