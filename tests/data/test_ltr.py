"""LTR data: the synthetic generator (shapes, masks, labels, determinism), splits by query,
and the LETOR/SVMlight loader on small files, including malformed lines."""

import gzip
import zlib

import hypothesis.strategies as st
import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from saferl_jax.data import ltr


@pytest.fixture(scope="module")
def data():
  return ltr.make_ltr_dataset(jax.random.key(0), num_queries=400, max_docs=12, min_docs=3,
                              num_features=6)


@pytest.mark.slow
def test_shapes_and_dtypes(data):
  assert data.features.shape == (400, 12, 6) and data.features.dtype == np.float32
  assert data.labels.shape == (400, 12) and data.labels.dtype == np.int32
  assert data.where.shape == (400, 12) and data.where.dtype == bool
  np.testing.assert_array_equal(data.query_ids, np.arange(400))
  assert data.num_queries == 400


@pytest.mark.slow
def test_masks_are_prefixes_with_lengths_in_range(data):
  mask = np.asarray(data.where)
  lengths = mask.sum(1)
  np.testing.assert_array_equal(mask, np.arange(12)[None, :] < lengths[:, None])
  assert lengths.min() >= 3 and lengths.max() <= 12
  assert len(np.unique(lengths)) == 10  # every length in [3, 12] occurs among 400 queries
  # Padding carries no features and label 0.
  assert np.all(np.asarray(data.features)[~mask] == 0)
  assert np.all(np.asarray(data.labels)[~mask] == 0)


@pytest.mark.slow
def test_label_range_and_distribution(data):
  labels = np.asarray(data.labels)[np.asarray(data.where)]
  assert labels.min() >= 0 and labels.max() <= 4
  counts = np.bincount(labels, minlength=5)
  assert np.all(counts > 0)
  assert np.all(np.diff(counts) < 0)  # 0 most common, then 1, ..., 4 rarest
  assert 0.35 < counts[0] / labels.size < 0.65


@pytest.mark.slow
def test_labels_follow_the_features():
  # Without noise the labels are a function of the features: equal features, equal labels,
  # and a regression on the features explains a good share of the label variance.
  data = ltr.make_ltr_dataset(jax.random.key(1), num_queries=300, noise=0.0)
  mask = np.asarray(data.where)
  x, y = np.asarray(data.features)[mask], np.asarray(data.labels)[mask]
  design = np.c_[x, np.ones(len(x))]
  residual = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
  assert 1 - residual.var() / y.var() > 0.3
  noisy = ltr.make_ltr_dataset(jax.random.key(1), num_queries=300, noise=2.0)
  np.testing.assert_array_equal(noisy.features, data.features)  # same key: same documents
  assert not np.array_equal(noisy.labels, data.labels)


@pytest.mark.slow
def test_same_key_same_data_other_key_other_data():
  a = ltr.make_ltr_dataset(jax.random.key(5), num_queries=20)
  b = ltr.make_ltr_dataset(jax.random.key(5), num_queries=20)
  c = ltr.make_ltr_dataset(jax.random.key(6), num_queries=20)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a.features, c.features)


def test_bad_generator_arguments_raise():
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="num_queries"):
    ltr.make_ltr_dataset(key, num_queries=0)
  with pytest.raises(ValueError, match="min_docs"):
    ltr.make_ltr_dataset(key, min_docs=10, max_docs=5)
  with pytest.raises(ValueError, match="noise"):
    ltr.make_ltr_dataset(key, noise=-1.0)


@pytest.mark.slow
def test_split_is_disjoint_and_covering(data):
  parts = ltr.split(data, key=jax.random.key(2))
  assert [p.num_queries for p in parts] == [240, 80, 80]
  ids = np.concatenate([p.query_ids for p in parts])
  assert sorted(ids.tolist()) == list(range(400))
  for part in parts:  # rows travel with their query
    np.testing.assert_array_equal(part.labels, np.asarray(data.labels)[part.query_ids])
    np.testing.assert_array_equal(part.features, np.asarray(data.features)[part.query_ids])
  again = ltr.split(data, key=jax.random.key(2))
  np.testing.assert_array_equal(again[0].query_ids, parts[0].query_ids)
  other = ltr.split(data, key=jax.random.key(3))
  assert not np.array_equal(other[0].query_ids, parts[0].query_ids)


@settings(max_examples=15)
@given(n=st.integers(1, 12), weights=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4),
       seed=st.integers(0, 1000))
@pytest.mark.slow
def test_split_covers_for_any_fractions(n, weights, seed):
  weights = np.asarray(weights)
  if weights.sum() == 0:
    weights = np.ones_like(weights)
  fractions = weights / weights.sum()
  data = ltr.LTRData(np.zeros((n, 2, 1), np.float32), np.zeros((n, 2), np.int32),
                     np.ones((n, 2), bool), np.arange(n) + 100)
  parts = ltr.split(data, fractions, key=jax.random.key(seed))
  assert len(parts) == len(fractions)
  ids = np.concatenate([p.query_ids for p in parts])
  assert sorted(ids.tolist()) == list(range(100, 100 + n))
  for part, fraction in zip(parts, fractions):
    # A part is round(n * cumulative fraction) minus the previous one: two roundings of at most 1/2
    # each. 1e-9 * n covers float64's error in fraction * n (a few ulps of 2.2e-16 * n).
    assert abs(part.num_queries - fraction * n) <= 1 + 1e-9 * n


def test_split_rejects_bad_fractions(data):
  with pytest.raises(ValueError, match="fractions"):
    ltr.split(data, (0.5, 0.6), key=jax.random.key(0))
  with pytest.raises(ValueError, match="fractions"):
    ltr.split(data, (1.5, -0.5), key=jax.random.key(0))


# The loader.

SAMPLE = """\
# a header comment
2 qid:10 3:0.5 1:1.5 # doc A, features out of order
0 qid:10 2:-1

1 qid:3 1:0.25 4:2 # query 3, first line
4 qid:10 1:1e-1 2:2 3:3 4:4
0 qid:3
3 qid:7 2:0.75
"""


def write(tmp_path, text, name="data.txt"):
  path = tmp_path / name
  path.write_text(text)
  return path


def test_loader_reads_sparse_unordered_non_contiguous_queries(tmp_path):
  data = ltr.load_letor(write(tmp_path, SAMPLE))
  np.testing.assert_array_equal(data.query_ids, [10, 3, 7])  # order of first appearance
  assert data.features.shape == (3, 3, 4)
  np.testing.assert_array_equal(data.labels, [[2, 0, 4], [1, 0, 0], [3, 0, 0]])
  np.testing.assert_array_equal(data.where, [[True, True, True], [True, True, False],
                                            [True, False, False]])
  features = np.asarray(data.features)
  np.testing.assert_allclose(features[0, 0], [1.5, 0.0, 0.5, 0.0])
  np.testing.assert_allclose(features[0, 1], [0.0, -1.0, 0.0, 0.0])
  np.testing.assert_allclose(features[0, 2], [0.1, 2.0, 3.0, 4.0])
  np.testing.assert_allclose(features[1, 0], [0.25, 0.0, 0.0, 2.0])
  np.testing.assert_allclose(features[1, 1], np.zeros(4))  # a document with no features
  np.testing.assert_allclose(features[2, 0], [0.0, 0.75, 0.0, 0.0])
  np.testing.assert_array_equal(features[1, 2], np.zeros(4))  # padding


def test_loader_truncates_and_pads_to_max_docs(tmp_path):
  path = write(tmp_path, SAMPLE)
  short = ltr.load_letor(path, max_docs=2)
  assert short.labels.shape == (3, 2)
  np.testing.assert_array_equal(short.labels, [[2, 0], [1, 0], [3, 0]])  # first documents kept
  long = ltr.load_letor(path, max_docs=5, num_features=6)
  assert long.features.shape == (3, 5, 6)
  assert int(np.asarray(long.where).sum()) == 6


def test_loader_string_query_ids_gzip_and_max_label(tmp_path):
  path = tmp_path / "yahoo.txt.gz"
  path.write_bytes(gzip.compress(b"7 qid:abc 1:1\n3 qid:def 2:1\n"))
  with pytest.raises(ValueError, match="line 1"):
    ltr.load_letor(path)  # 7 is above the default max_label 4
  data = ltr.load_letor(path, max_label=7)
  np.testing.assert_array_equal(data.query_ids, ["abc", "def"])
  np.testing.assert_array_equal(data.labels, [[7], [3]])


@pytest.mark.slow
def test_loader_output_feeds_the_click_simulator(tmp_path):
  from saferl_jax import cltr
  data = ltr.load_letor(write(tmp_path, SAMPLE))
  rankings = np.tile(np.arange(3), (4, 1)).astype(np.int32)
  clicks = cltr.simulate_sessions(cltr.position_based(3), np.array([0, 1, 2, 0]), rankings,
                                  data.labels, key=jax.random.key(0), where=data.where)
  assert clicks.shape == (4, 3)
  assert float(clicks[2, 1]) == 0.0 and float(clicks[1, 2]) == 0.0  # padded slots


@pytest.mark.parametrize("line, message", [
    ("x qid:1 1:0.5", "not a number"),
    ("2.5 qid:1 1:0.5", "not an integer"),
    ("5 qid:1 1:0.5", "outside 0..4"),
    ("-1 qid:1 1:0.5", "outside 0..4"),
    ("2 1:0.5 2:0.1", "missing qid"),
    ("2", "missing qid"),
    ("2 qid: 1:0.5", "missing qid"),
    ("2 qid:1 1:0.5 2", "bad feature token '2'"),
    ("2 qid:1 1:0.5 a:1", "bad feature token 'a:1'"),
    ("2 qid:1 1:x", "bad feature token '1:x'"),
    ("2 qid:1 1:2:3", "bad feature token"),
    ("2 qid:1 0:1.0", "start at 1"),
    ("2 qid:1 1:1 1:2", "appears twice"),
    ("2 qid:1 1:nan", "finite"),
    # Damage of every kind names the line, and the field when a feature is at fault.
    ("nan qid:1 1:0.5", "not an integer"),
    ("inf qid:1 1:0.5", "not an integer"),
    ("1e999 qid:1 1:0.5", "not an integer"),
    ("2 qid1 1:0.5", "missing qid"),
    ("2 qid:1 1:0.5 a:1", r"bad feature token 'a:1' \(field 4\)"),
    ("2 qid:1 1.5:1", r"bad feature token '1.5:1' \(field 3\)"),
    ("2 qid:1 :1", "bad feature token"),
    ("2 qid:1 1:", "bad feature token"),
    ("2 qid:1 1:0.5 -3:1", r"start at 1, found -3 \(field 4\)"),
    ("2 qid:1 1:0.5 2:1 1:2", r"appears twice, 1 \(field 5\)"),
    ("2 qid:1 1:inf", "finite, feature 1 is 'inf'"),
    ("2 qid:1 2:0.5 1:-inf", r"finite, feature 1 is '-inf' \(field 4\)"),
    ("2 qid:1 1:1e999", "finite"),
    ("2 qid:1 99999999999:1.0", r"index 99999999999 \(field 3\) exceeds MAX_FEATURES=100000"),
    ("2 qid:1 1:1 100001:1.0", "exceeds MAX_FEATURES"),
    ("2 qid:1 99999999999999999999999:1.0", "exceeds MAX_FEATURES"),  # beyond int64
])
def test_malformed_lines_name_the_line(tmp_path, line, message):
  path = write(tmp_path, f"# comment\n1 qid:1 1:0.1\n\n{line} # trailing comment\n0 qid:1 2:1\n")
  with pytest.raises(ValueError, match=f"line 4: .*{message}") as info:
    ltr.load_letor(path)
  assert str(path) in str(info.value)


def test_loader_rejects_bad_files_and_options(tmp_path):
  with pytest.raises(ValueError, match="no data"):
    ltr.load_letor(write(tmp_path, "# only a comment\n\n"))
  with pytest.raises(ValueError, match="not a file"):
    ltr.load_letor(tmp_path / "missing.txt")
  path = write(tmp_path, SAMPLE)
  with pytest.raises(ValueError, match="line 5: .*num_features=3"):
    ltr.load_letor(path, num_features=3)
  with pytest.raises(ValueError, match="max_docs"):
    ltr.load_letor(path, max_docs=0)


def test_feature_index_bound_is_checked_before_allocating(tmp_path):
  # Without the bound, this line asks for a [1, 2, 99999999999] float32 array: 800 GB.
  path = write(tmp_path, "1 qid:1 1:0.5\n0 qid:1 99999999999:1.0\n")
  with pytest.raises(ValueError, match="line 2: .*exceeds num_features=10"):
    ltr.load_letor(path, num_features=10)
  with pytest.raises(ValueError, match="line 2: .*pass num_features"):
    ltr.load_letor(path)
  data = ltr.load_letor(write(tmp_path, f"1 qid:1 {ltr.MAX_FEATURES}:1\n"))  # the bound is inclusive
  assert data.features.shape == (1, 1, ltr.MAX_FEATURES)
  wide = ltr.load_letor(write(tmp_path, "1 qid:1 200000:1\n"), num_features=200_000)
  assert wide.features.shape == (1, 1, 200_000)  # num_features lifts the bound


def _gz_cases(data: bytes) -> dict[str, bytes]:
  cases = {f"cut at {n}": data[:n] for n in (3, 10, len(data) // 2, len(data) - 4, len(data) - 1)}
  for offset in (0, 2, len(data) // 2, len(data) - 6, len(data) - 2):  # magic, stream, CRC, length
    damaged = bytearray(data)
    damaged[offset] ^= 0x10
    cases[f"flip at {offset}"] = bytes(damaged)
  cases["garbage"] = np.random.default_rng(0).bytes(512)
  return cases


def test_damaged_gzip_names_the_file(tmp_path):
  for name, damaged in _gz_cases(gzip.compress(SAMPLE.encode(), mtime=0)).items():
    path = tmp_path / "data.txt.gz"
    path.write_bytes(damaged)
    with pytest.raises(ValueError, match="not a readable gzip file") as info:
      ltr.load_letor(path)
    assert str(path) in str(info.value), name
    assert isinstance(info.value.__cause__, (OSError, EOFError, zlib.error)), name
  path.write_bytes(b"")
  with pytest.raises(ValueError, match="no data lines"):
    ltr.load_letor(path)


def test_bytes_that_are_not_utf8_name_the_line(tmp_path):
  path = tmp_path / "data.txt"
  path.write_bytes(b"1 qid:1 1:0.1 # caf\xe9, latin-1 in a comment is fine\n2 qid:\xff7 1:1\n")
  with pytest.raises(ValueError, match="line 2: bytes that are not UTF-8 text at character 7"):
    ltr.load_letor(path)
  path.write_bytes(np.random.default_rng(0).bytes(512))
  with pytest.raises(ValueError, match="line [0-9]+: ") as info:
    ltr.load_letor(path)
  assert str(path) in str(info.value)


def test_line_numbers_count_only_line_breaks(tmp_path):
  # str.splitlines would also break at \x1c or \x85 and push the error to line 3.
  path = tmp_path / "data.txt"
  path.write_bytes("1 qid:1 1:0.1 # a \x1c b \x85 c\r\n2 qid:1 1:x\r\n".encode())
  with pytest.raises(ValueError, match="line 2: bad feature token '1:x'"):
    ltr.load_letor(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(gz=st.booleans(), cut=st.integers(0, 10_000), flips=st.lists(st.tuples(st.integers(0, 10_000),
       st.integers(1, 255)), max_size=3))
@pytest.mark.slow
def test_any_damage_is_a_value_error_naming_the_file(tmp_path, gz, cut, flips):
  data = bytearray(gzip.compress(SAMPLE.encode(), mtime=0) if gz else SAMPLE.encode())
  for offset, mask in flips:
    data[offset % len(data)] ^= mask
  path = tmp_path / ("data.txt.gz" if gz else "data.txt")
  path.write_bytes(bytes(data[:cut % (len(data) + 1)]))
  try:
    ltr.load_letor(path)  # some damage leaves a valid file
  except ValueError as err:
    assert str(path) in str(err)


# The dense fast path (pyarrow) against the exact parser.

def _dense_text(rng, *, num_lines, num_features, string_ids, comments, shuffle, crlf, blanks):
  """A random dense file: features 1..F in order, optional comments, string ids, interleaved queries."""
  qids = rng.integers(0, max(1, num_lines // 4), num_lines)
  if not shuffle:
    qids = np.sort(qids)
  lines = []
  for q in qids:
    values = rng.choice([0.0, 1.0, -2.5, 1e-7, 3.25e5, 0.1], num_features) * rng.random(num_features)
    qid = f"q{q}x" if string_ids else str(q)
    tokens = [str(rng.integers(0, 5)), f"qid:{qid}"] + [f"{j + 1}:{float(v)!r}" for j, v in enumerate(values)]
    line = " ".join(tokens) + (" " if blanks else "")
    if comments and rng.random() < 0.5:
      line += f" # docid = {rng.integers(1000)} caf\u00e9"
    lines.append(line)
    if comments and rng.random() < 0.1:
      lines.append("# a comment line")
    if blanks and rng.random() < 0.1:
      lines.append("   ")
  return ("\r\n" if crlf else "\n").join(lines) + "\n"


def _assert_same_rows(a, b):
  np.testing.assert_array_equal(a.features, b.features)
  assert a.features.dtype == b.features.dtype == np.float32
  np.testing.assert_array_equal(a.labels, b.labels)
  np.testing.assert_array_equal(a.lengths, b.lengths)
  np.testing.assert_array_equal(a.query_ids, b.query_ids)
  assert a.query_ids.dtype == b.query_ids.dtype


@pytest.mark.parametrize("case", range(8))
def test_dense_fast_path_equals_the_exact_parser(tmp_path, monkeypatch, case):
  rng = np.random.default_rng(case)
  flags = dict(string_ids=case % 2 == 1, comments=case in (2, 3, 6), shuffle=case >= 4,
               crlf=case in (3, 5), blanks=case in (1, 6, 7))
  text = _dense_text(rng, num_lines=int(rng.integers(1, 60)), num_features=int(rng.integers(1, 7)), **flags)
  name = "data.txt.gz" if case in (2, 7) else "data.txt"
  path = tmp_path / name
  path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
  exact = ltr.read_letor_rows(path, fast=False)
  monkeypatch.setattr(ltr, "_read_exact", lambda *args: pytest.fail("the fast path fell back"))
  fast = ltr.read_letor_rows(path)
  _assert_same_rows(fast, exact)
  monkeypatch.undo()
  padded = ltr.load_letor(path)  # and the padded layout equals the exact parser's, padded
  np.testing.assert_array_equal(padded.features, ltr.pad_queries(exact).features)


def test_dense_fast_path_reads_blocks_and_wider_num_features(tmp_path, monkeypatch):
  # Blocks of a few hundred bytes: lines cut across block ends, the buffer grows many times.
  monkeypatch.setattr(ltr, "_BLOCK_BYTES", 300)
  rng = np.random.default_rng(9)
  path = write(tmp_path, _dense_text(rng, num_lines=200, num_features=5, string_ids=False, comments=True,
                                     shuffle=True, crlf=False, blanks=True))
  exact = ltr.read_letor_rows(path, fast=False, num_features=8)
  assert ltr._read_dense(path, 8, 4, 8) is not None
  _assert_same_rows(ltr.read_letor_rows(path, num_features=8), exact)
  assert exact.features.shape == (200, 8) and not exact.features[:, 5:].any()


@pytest.mark.parametrize("text", [
    SAMPLE,  # sparse and unordered
    "1 qid:1 1:0.5 2:1\n0 qid:1 2:1 1:0.5\n",  # out of order
    "1 qid:1 1:0.5 2:1\n0 qid:1 1:1\n",  # a missing feature
    "1 qid:1 1:1_0 2:1\n",  # Python reads 1_0 as 10, pyarrow does not
    "1 qid:7\u00a0 1:1\n",  # a no-break space separates tokens in str.split, not in pyarrow
    "1.0 qid:001 1:+1 2:1e-3\n",  # both read these alike, but the exact path must agree
])
def test_files_that_are_not_plain_dense_give_the_exact_result(tmp_path, text):
  path = write(tmp_path, text)
  _assert_same_rows(ltr.read_letor_rows(path), ltr.read_letor_rows(path, fast=False))


def test_damaged_dense_file_gives_the_exact_parsers_error(tmp_path):
  good = "".join(f"{i % 3} qid:{i // 4} 1:{i} 2:0.5\n" for i in range(40))
  path = write(tmp_path, good + "2 qid:11 1:0.5 2:nan\n" + good)
  with pytest.raises(ValueError, match="line 41: .*finite"):
    ltr.load_letor(path)
  path = write(tmp_path, good + "9 qid:11 1:0.5 2:1\n")
  with pytest.raises(ValueError, match="line 41: label 9 is outside 0..4"):
    ltr.load_letor(path)
