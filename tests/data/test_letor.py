"""LETOR preparation: clipping bounds, query-level normalisation, the candidate cap, folds in the
datasets' layouts and the summary, on tiny hand-made files with known answers."""

import gzip

import jax
import numpy as np
import pytest

from saferl_jax.data import letor, ltr

# Two queries: q1 has 4 documents (labels 0, 2, 0, 1), q2 has 2 (both 0). Two features.
TRAIN = """\
0 qid:1 1:1 2:10
2 qid:1 1:3 2:10
0 qid:1 1:5 2:10
1 qid:1 1:100 2:10
0 qid:2 1:2 2:0
0 qid:2 1:4 2:8
"""


def rows_of(text, tmp_path, name="train.txt"):
  path = tmp_path / name
  path.write_text(text)
  return ltr.read_letor_rows(path)


def test_rows_group_queries_and_pad_after(tmp_path):
  rows = rows_of(TRAIN + "1 qid:1 1:7 2:10\n", tmp_path)  # q1 again after q2: grouped
  np.testing.assert_array_equal(rows.lengths, [5, 2])
  np.testing.assert_array_equal(rows.labels, [0, 2, 0, 1, 1, 0, 0])
  np.testing.assert_array_equal(rows.features[:, 0], [1, 3, 5, 100, 7, 2, 4])
  np.testing.assert_array_equal(rows.starts, [0, 5])
  padded = ltr.pad_queries(rows, max_docs=3)
  np.testing.assert_array_equal(padded.labels, [[0, 2, 0], [0, 0, 0]])
  np.testing.assert_array_equal(padded.where, [[True] * 3, [True, True, False]])


def test_query_minmax_normalisation(tmp_path):
  data = letor.prepare_letor(rows_of(TRAIN, tmp_path))
  # q1 feature 1: (x - 1) / 99; feature 2 constant within q1 -> 0 (as _normalize_feat).
  np.testing.assert_allclose(data.features[0, :, 0], [0, 2 / 99, 4 / 99, 1], rtol=1e-6)
  np.testing.assert_array_equal(data.features[0, :, 1], [0, 0, 0, 0])
  np.testing.assert_allclose(data.features[1, :2], [[0, 0], [1, 1]])
  np.testing.assert_array_equal(data.features[1, 2:], 0)  # padding stays 0
  np.testing.assert_array_equal(data.labels, [[0, 2, 0, 1], [0, 0, 0, 0]])


def test_clipping_before_normalisation_keeps_the_outlier_from_squashing(tmp_path):
  rows = rows_of(TRAIN, tmp_path)
  bounds = letor.clip_bounds(rows, 80.0)
  # Feature 1 over all 6 documents: 1, 2, 3, 4, 5, 100; the 20th and 80th percentiles (linear) are
  # 2 and 5; feature 2: 0, 8, 10, 10, 10, 10 -> 8 and 10.
  np.testing.assert_allclose(bounds.low, [2, 8])
  np.testing.assert_allclose(bounds.high, [5, 10])
  data = letor.prepare_letor(rows, bounds=bounds)
  # q1 feature 1 clipped to 2, 3, 5, 5, then (x - 2) / 3.
  np.testing.assert_allclose(data.features[0, :, 0], [0, 1 / 3, 1, 1], rtol=1e-6)
  raw = letor.prepare_letor(rows, bounds=bounds, normalization=None)
  np.testing.assert_array_equal(raw.features[0, :, 0], [2, 3, 5, 5])
  np.testing.assert_array_equal(raw.features[1, :2, 1], [8, 8])
  logged = letor.prepare_letor(rows, normalization="log")
  np.testing.assert_allclose(logged.features[0, :, 0], np.log1p([1, 3, 5, 100]), rtol=1e-6)
  np.testing.assert_array_equal(rows.features[:, 0], [1, 3, 5, 100, 2, 4])  # input untouched


def test_normalisation_uses_the_whole_list_before_the_cap(tmp_path):
  rows = rows_of(TRAIN, tmp_path)
  data = letor.prepare_letor(rows, max_docs=2, keep="first")
  np.testing.assert_allclose(data.features[0, :, 0], [0, 2 / 99], rtol=1e-6)  # not [0, 1]
  assert data.features.shape == (2, 2, 2)


def test_cap_rules(tmp_path):
  rows = rows_of(TRAIN, tmp_path)
  first = letor.prepare_letor(rows, normalization=None, max_docs=2, keep="first")
  np.testing.assert_array_equal(first.features[0, :, 0], [1, 3])
  with pytest.raises(ValueError, match="key"):
    letor.prepare_letor(rows, max_docs=2)
  # "relevant": both relevant documents of q1 (x = 3 and 100), in file order, for every key.
  for seed in range(5):
    kept = letor.prepare_letor(rows, normalization=None, max_docs=2, keep="relevant",
                               key=jax.random.key(seed))
    np.testing.assert_array_equal(kept.features[0, :, 0], [3, 100])
    np.testing.assert_array_equal(kept.labels[0], [2, 1])
  # "random": a uniform pair of q1's 4 documents, kept in file order; q2 (2 documents) untouched.
  # Each of the 6 pairs has probability 1/6; over 300 keys a count has sd sqrt(300 * 1/6 * 5/6)
  # ~ 6.5, so 50 +- 28 (4.3 sd) holds unless the draw is not uniform.
  counts = {}
  for seed in range(300):
    kept = letor.prepare_letor(rows, normalization=None, max_docs=2, key=jax.random.key(seed))
    pair = tuple(np.asarray(kept.features[0, :, 0]).tolist())
    assert pair[0] < pair[1]
    counts[pair] = counts.get(pair, 0) + 1
    np.testing.assert_array_equal(kept.features[1, :, 0], [2, 4])
  assert len(counts) == 6 and all(22 <= c <= 78 for c in counts.values()), counts
  again = letor.prepare_letor(rows, normalization=None, max_docs=2, key=jax.random.key(3))
  same = letor.prepare_letor(rows, normalization=None, max_docs=2, key=jax.random.key(3))
  np.testing.assert_array_equal(again.features, same.features)


def test_drop_queries_without_relevant_documents(tmp_path):
  rows = rows_of(TRAIN, tmp_path)
  data = letor.prepare_letor(rows, drop_no_relevant=True)
  np.testing.assert_array_equal(data.query_ids, [1])
  assert data.features.shape == (1, 4, 2)
  with pytest.raises(ValueError, match="drop_no_relevant"):
    letor.prepare_letor(rows_of("0 qid:1 1:1\n", tmp_path), drop_no_relevant=True)


def test_summary_values(tmp_path):
  rows = rows_of(TRAIN, tmp_path)
  s = letor.summary(rows, max_docs=3)
  assert (s.num_queries, s.num_documents, s.num_features) == (2, 6, 2)
  assert (s.docs_mean, s.docs_median, s.docs_max) == (3.0, 3.0, 4)
  np.testing.assert_array_equal(s.label_counts, [4, 1, 1, 0, 0])
  assert s.no_relevant_share == 0.5 and s.capped_share == 0.5 and s.dropped_share == pytest.approx(1 / 6)
  padded = letor.summary(ltr.pad_queries(rows))  # an LTRData: its real documents
  assert padded._replace(label_counts=None) == s._replace(label_counts=None, capped_share=0.0,
                                                         dropped_share=0.0)


def write_layout(root, names, text=TRAIN):
  for name in names:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".gz"):
      path.write_bytes(gzip.compress(text.encode()))
    else:
      path.write_text(text)


def test_fold_layouts(tmp_path):
  mslr = tmp_path / "mslr"
  write_layout(mslr, [f"Fold{i}/{n}" for i in (1, 2) for n in ("train.txt", "vali.txt", "test.txt")])
  assert letor.fold_files(mslr, 2) == (mslr / "Fold2/train.txt", mslr / "Fold2/vali.txt",
                                       mslr / "Fold2/test.txt")
  assert letor.fold_files(mslr / "Fold2")[0] == mslr / "Fold2/train.txt"  # a Fold folder itself
  yahoo = tmp_path / "yahoo"
  write_layout(yahoo, ["set1.train.txt.gz", "set1.valid.txt", "set1.test.txt"])
  assert [p.name for p in letor.fold_files(yahoo)] == ["set1.train.txt.gz", "set1.valid.txt",
                                                       "set1.test.txt"]
  istella = tmp_path / "istella"
  write_layout(istella, ["train.txt", "test.txt"])
  assert letor.fold_files(istella) == (istella / "train.txt", None, istella / "test.txt")
  for directory, fold in ((mslr, 3), (istella, 2), (tmp_path / "empty", 1)):
    directory.mkdir(exist_ok=True)
    with pytest.raises(ValueError, match=f"directory: {directory}"):
      letor.fold_files(directory, fold)
  with pytest.raises(ValueError, match="not a folder"):
    letor.fold_files(tmp_path / "missing")


def test_load_fold_takes_clipping_from_train_only(tmp_path):
  # The test file holds a huge value; the bounds come from train, so it is clipped to train's 80th
  # percentile (5) and normalised with it.
  write_layout(tmp_path, ["Fold1/train.txt", "Fold1/vali.txt"])
  write_layout(tmp_path, ["Fold1/test.txt"], "1 qid:9 1:1e9 2:0\n0 qid:9 1:3 2:0\n0 qid:10 1:1 2:1\n")
  fold = letor.load_letor_fold(tmp_path, percentile=80.0, normalization=None,
                               drop_no_relevant=("test",))
  np.testing.assert_allclose(fold.bounds.high, [5, 10])
  np.testing.assert_array_equal(fold.test.features[..., 0], [[5, 3]])  # q10 dropped, 1e9 clipped
  np.testing.assert_array_equal(fold.test.query_ids, [9])
  np.testing.assert_array_equal(fold.validation.features, fold.train.features)
  assert fold.train.num_queries == 2  # not dropped in train
  with pytest.raises(ValueError, match="drop_no_relevant"):
    letor.load_letor_fold(tmp_path, drop_no_relevant="test")
  capped = letor.load_letor_fold(tmp_path, max_docs=2, key=jax.random.key(0))
  assert capped.train.features.shape == (2, 2, 2) and capped.bounds is None
