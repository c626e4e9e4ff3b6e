"""The Open Bandit Dataset loader: OBD's layout, the shipped sample, agreement with OBP, the
shared context vocabulary, item features, timestamps and the split in time, malformed files.

Damaged files are made from copies of the shipped sample: truncated, bit-flipped, a cell
replaced. Every damage must surface as a ValueError naming the file (and the line and column
where there is one), never as gzip's, zlib's or the codec's own exception.
"""

import functools
import gzip
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from saferl_jax.data import OBDVocabulary, load_obd, obd, sample_path, split_by_time

FIXTURES = Path(__file__).parents[1] / "fixtures"
ROW_FIELDS = ("actions", "positions", "rewards", "logging_probs", "contexts", "user_item_affinity",
              "timestamps")  # the OBDLog fields with a row per round


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


@functools.cache
def _sample(policy: str = "bts", vocabulary_from: str | None = None):
  vocabulary = None if vocabulary_from is None else _sample(vocabulary_from).vocabulary
  return load_obd(behavior_policy=policy, vocabulary=vocabulary)


# OBD's layout.

def test_sample_is_in_obds_layout():
  assert sample_path("random") == obd.SAMPLE_DIR / "random" / "all"
  assert sorted(p.name for p in sample_path("bts").iterdir()) == ["all.csv.gz", "item_context.csv"]
  with pytest.raises(ValueError, match="campaign: no shipped sample bts/men"):
    load_obd(campaign="men")
  with pytest.raises(ValueError, match="campaign: must be one of .*'kids'"):
    load_obd(campaign="kids")


def test_root_may_be_obds_folder_a_log_folder_or_a_file(tmp_path):
  expected = _sample("random")
  # The full dataset's layout, a campaign other than "all", an uncompressed file.
  folder = tmp_path / "open_bandit_dataset" / "random" / "men"
  folder.mkdir(parents=True)
  (folder / "men.csv").write_bytes(gzip.decompress((sample_path("random") / "all.csv.gz").read_bytes()))
  shutil.copy(sample_path("random") / "item_context.csv", folder)
  for root, options in ((tmp_path / "open_bandit_dataset", {}), (folder, {}),
                        (folder / "men.csv", {"behavior_policy": "bts"})):
    log = load_obd(root, **{"behavior_policy": "random", "campaign": "men", **options})
    for name in ROW_FIELDS + ("item_features",):
      np.testing.assert_array_equal(getattr(log, name), getattr(expected, name), err_msg=name)
    assert log.vocabulary == expected.vocabulary
  np.testing.assert_array_equal(load_obd(obd.SAMPLE_DIR, behavior_policy="random").actions,
                                expected.actions)
  with pytest.raises(ValueError, match="root: neither .*bts/men nor .* holds men.csv or men.csv.gz"):
    load_obd(tmp_path, campaign="men")


def test_fields_dtypes_and_shapes():
  log = _sample()
  n = 10_000
  assert log.actions.dtype == log.positions.dtype == np.int64
  assert log.rewards.dtype == log.logging_probs.dtype == np.float64
  assert log.contexts.dtype == log.user_item_affinity.dtype == log.item_features.dtype == np.float32
  assert log.contexts.shape == (n, sum(len(c) for c in log.vocabulary.categories)) == (n, 26)
  assert log.user_item_affinity.shape == (n, 80) and log.item_features.shape == (80, 41)
  assert log.timestamps.shape == (n,) and log.timestamps.dtype == np.dtype("datetime64[ns]")


def test_timestamps_are_the_files_in_utc():
  log = _sample()
  assert log.timestamps[0] == np.datetime64("2019-11-24T00:00:17.004101")  # +00:00 in the file
  assert log.timestamps[-1] == np.datetime64("2019-11-30T23:58:22.421681")
  assert np.all(np.diff(log.timestamps) >= np.timedelta64(0))  # OBD's files are in time order


# The context vocabulary.

def _decode(log, feature: int) -> np.ndarray:
  """Each round's value of one user feature, read back from its one-hot block ('' if none)."""
  sizes = [len(c) for c in log.vocabulary.categories]
  start = sum(sizes[:feature])
  block = log.contexts[:, start:start + sizes[feature]]
  values = np.array(log.vocabulary.categories[feature] + ("",), dtype=object)
  return values[np.where(block.any(1), block.argmax(1), sizes[feature])]


def test_vocabulary_is_each_columns_sorted_values():
  bts, random_log = _sample(), _sample("random")
  assert bts.vocabulary.columns == obd.USER_FEATURES
  assert [len(c) for c in bts.vocabulary.categories] == [3, 5, 9, 9]
  assert [len(c) for c in random_log.vocabulary.categories] == [3, 5, 8, 8]  # fewer values seen
  for values in bts.vocabulary.categories:
    assert list(values) == sorted(values)
  assert bts.vocabulary.as_dict()["user_feature_0"] == bts.vocabulary.categories[0]
  text = gzip.decompress((sample_path() / "all.csv.gz").read_bytes()).decode().splitlines()
  cells = [line.split(",")[6:10] for line in text[1:]]
  for feature in range(4):
    np.testing.assert_array_equal(_decode(bts, feature), [row[feature] for row in cells])


def test_a_shared_vocabulary_gives_both_logs_one_encoding():
  bts = _sample()
  random_log, random_own = _sample("random", "bts"), _sample("random")
  assert random_log.vocabulary == bts.vocabulary
  assert random_log.contexts.shape[1] == bts.contexts.shape[1] == 26
  assert np.all(random_log.contexts.sum(1) == 4)  # every random value is in the BTS vocabulary
  for feature in range(4):  # the same value, the same column, whichever log it came from
    np.testing.assert_array_equal(_decode(random_log, feature), _decode(random_own, feature))
  # A row of each log with the same user features has the same context row.
  row = np.flatnonzero((random_log.contexts == bts.contexts[0]).all(1))
  assert row.size and all(_decode(random_log, f)[row[0]] == _decode(bts, f)[0] for f in range(4))


def test_values_missing_from_the_vocabulary_leave_their_block_zero():
  bts = _sample()
  dropped = bts.vocabulary.categories[2][0]
  categories = list(bts.vocabulary.categories)
  categories[2] = categories[2][1:]
  log = load_obd(vocabulary=bts.vocabulary._replace(categories=tuple(categories)))
  assert log.contexts.shape == (10_000, 25)
  unseen = _decode(bts, 2) == dropped
  assert unseen.any() and not log.contexts[unseen, 8:16].any()
  np.testing.assert_array_equal(log.contexts.sum(1), np.where(unseen, 3, 4))
  np.testing.assert_array_equal(_decode(log, 3), _decode(bts, 3))


def test_bad_vocabularies_are_refused():
  bts = _sample()
  with pytest.raises(ValueError, match="vocabulary: expected an OBDVocabulary"):
    load_obd(vocabulary=bts.vocabulary.as_dict())
  with pytest.raises(ValueError, match="vocabulary: columns"):
    load_obd(vocabulary=OBDVocabulary(("user_feature_0",), bts.vocabulary.categories[:1]))
  repeated = (bts.vocabulary.categories[0] * 2,) + bts.vocabulary.categories[1:]
  with pytest.raises(ValueError, match="vocabulary: the categories of user_feature_0"):
    load_obd(vocabulary=bts.vocabulary._replace(categories=repeated))


# Item features.

def test_item_features_are_numbers_then_one_hot_categories():
  bts = _sample()
  context = [line.split(",") for line in (sample_path() / "item_context.csv").read_text().splitlines()]
  assert context[0] == ["", "item_id", "item_feature_0", "item_feature_1", "item_feature_2",
                        "item_feature_3"]
  rows = {int(r[1]): r for r in context[1:]}
  np.testing.assert_allclose(bts.item_features[:, 0], [float(rows[a][2]) for a in range(80)],
                             rtol=1e-6)
  sizes = [len({rows[a][c] for a in range(80)}) for c in (3, 4, 5)]
  assert sizes == [12, 21, 7] and bts.item_features.shape == (80, 1 + sum(sizes))
  start = 1
  for column, size in zip((3, 4, 5), sizes):
    block = bts.item_features[:, start:start + size]
    assert np.all(block.sum(1) == 1)
    codes = block.argmax(1)
    for a in range(80):  # the same code exactly for the same value
      for b in range(80):
        assert (codes[a] == codes[b]) == (rows[a][column] == rows[b][column])
    assert codes[0] == 0 and np.all(np.diff(np.maximum.accumulate(codes)) <= 1)  # first seen
    start += size


def test_item_features_agree_across_files_whose_hashes_differ():
  # OBD hashes item features per file: the BTS and random files spell them differently.
  bts, random_log = _sample(), _sample("random")
  assert (sample_path("bts") / "item_context.csv").read_text() != (
      sample_path("random") / "item_context.csv").read_text()
  np.testing.assert_array_equal(bts.item_features, random_log.item_features)


def test_without_item_context_there_are_no_item_features(tmp_path):
  log = load_obd(_write_log(tmp_path, list(_sample_lines()[1:6])))
  assert log.item_features.shape == (80, 0)


def _with_item_context(folder: Path, edit) -> Path:
  lines = (sample_path() / "item_context.csv").read_text().splitlines()
  _write(folder, _sample_csv(5).encode())
  (folder / "item_context.csv").write_text("\n".join(edit(lines)) + "\n")
  return folder / "item_context.csv"


def _set(lines, line: int, column: int, value: str) -> list[str]:
  fields = lines[line - 1].split(",")
  fields[column] = value
  return lines[:line - 1] + [",".join(fields)] + lines[line:]


@pytest.mark.parametrize("edit, message", [
    (lambda lines: _set(lines, 5, 1, "2"), "line 5, column item_id: item 2 appears again "
                                           r"\(first on line 4\)"),
    (lambda lines: lines[:-1], r"no row for items \[79\]"),
    (lambda lines: _set(lines, 7, 1, "x"), "line 7, column item_id: not a number"),
    (lambda lines: _set(lines, 7, 1, "80"), "line 7, column item_id: '80' is not an item id"),
    (lambda lines: _set(lines, 9, 2, "inf"), "line 9, column item_feature_0: 'inf' is not finite"),
    (lambda lines: lines[:1], "no data rows"),
    (lambda lines: _set(lines, 3, 3, "a,b"), "line 3 has 7 fields, the header has 6"),
])
def test_damaged_item_context_names_line_and_column(tmp_path, edit, message):
  file = _with_item_context(tmp_path, edit)
  _raises(tmp_path, file, message)


# The split in time.

def test_split_by_time_keeps_order_sizes_and_shared_parts():
  log = _sample()
  train, test = split_by_time(log, test_fraction=0.3)
  assert (len(train.rewards), len(test.rewards)) == (7_000, 3_000)
  assert train.timestamps.max() < test.timestamps.min()
  for name in ROW_FIELDS:  # the log's rows, in order, cut once
    np.testing.assert_array_equal(np.concatenate([getattr(train, name), getattr(test, name)]),
                                  getattr(log, name), err_msg=name)
  for part in (train, test):
    assert part.vocabulary == log.vocabulary and part.num_actions == log.num_actions == 80
    assert part.num_positions == 3 and part.item_features is log.item_features
    assert np.all(np.diff(part.timestamps) >= np.timedelta64(0))
  assert np.shares_memory(train.user_item_affinity, log.user_item_affinity)  # in order: views


def test_split_by_time_sorts_and_keeps_an_instant_on_one_side():
  log = _sample()
  n = len(log.rewards)
  order = np.random.default_rng(0).permutation(n)
  times = log.timestamps.copy()
  times[6_990:7_010] = times[6_990]  # twenty rounds at one instant, across the 70% rank
  shuffled = log._replace(**{name: getattr(log, name)[order] for name in ROW_FIELDS})
  shuffled = shuffled._replace(timestamps=times[order])
  train, test = split_by_time(shuffled, test_fraction=0.3)
  assert (len(train.rewards), len(test.rewards)) == (6_990, 3_010)
  assert train.timestamps.max() < test.timestamps.min() == times[6_990]
  for part in (train, test):
    assert np.all(np.diff(part.timestamps) >= np.timedelta64(0))
  rows = order[np.argsort(times[order], kind="stable")]
  np.testing.assert_array_equal(np.concatenate([train.actions, test.actions]), log.actions[rows])
  assert not np.shares_memory(train.actions, shuffled.actions)


def test_split_by_time_refuses_bad_fractions_and_empty_parts():
  log = _sample()
  for fraction in (0.0, 1.0, -0.1, 1.5, float("nan")):
    with pytest.raises(ValueError, match="test_fraction"):
      split_by_time(log, test_fraction=fraction)
  one_instant = log._replace(timestamps=np.full(10_000, log.timestamps[0]))
  with pytest.raises(ValueError, match="test_fraction: .* leaves an empty part"):
    split_by_time(one_instant)


@pytest.mark.slow
def test_loading_never_imports_pandas():
  # pyarrow's to_numpy and pa.array import pandas where it is installed; the loader avoids both.
  code = ("import sys; from saferl_jax.data import load_obd, split_by_time; "
          "split_by_time(load_obd(behavior_policy='random')); print('pandas' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


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
  with pytest.raises(ValueError, match="neither .* holds all.csv or all.csv.gz"):
    load_obd(tmp_path)
  with pytest.raises(ValueError, match="behavior_policy"):
    load_obd(behavior_policy="greedy")


# Damage, one class at a time.

SAMPLE_GZ = sample_path() / "all.csv.gz"


@functools.cache
def _sample_lines() -> tuple[str, ...]:
  return tuple(gzip.decompress(SAMPLE_GZ.read_bytes()).decode().splitlines())


def _write(folder: Path, data: bytes, name: str = "all.csv") -> Path:
  folder.mkdir(parents=True, exist_ok=True)
  (folder / name).write_bytes(data)
  return folder / name


def _sample_csv(num_rows: int = 20) -> str:
  return "\n".join(_sample_lines()[:num_rows + 1]) + "\n"


def _with_cell(row: int, name: str, value: str, num_rows: int = 20) -> str:
  """The first rows of the sample with one cell replaced; data row `row` is on line row + 2."""
  lines = list(_sample_lines()[:num_rows + 1])
  fields = lines[row + 1].split(",")
  fields[lines[0].split(",").index(name)] = value
  lines[row + 1] = ",".join(fields)
  return "\n".join(lines) + "\n"


def _raises(folder: Path, file: Path, match: str) -> ValueError:
  with pytest.raises(ValueError, match=match) as info:
    load_obd(folder)
  assert str(file) in str(info.value)
  return info.value


def _truncated(data: bytes) -> list[bytes]:
  return [data[:n] for n in (5, 10, 100, len(data) // 2, len(data) - 9, len(data) - 4, len(data) - 1)]


def _flipped(data: bytes) -> list[bytes]:
  # Offsets in the magic number, the deflate stream, the CRC-32 and the length trailer: a flip in
  # the header's timestamp would go unseen, which is gzip's business, not the loader's.
  out = []
  for offset in (0, 1, 2, 30, 1000, len(data) // 3, len(data) // 2, len(data) - 20, len(data) - 6,
                 len(data) - 2):
    for bit in (0, 7):
      damaged = bytearray(data)
      damaged[offset] ^= 1 << bit
      out.append(bytes(damaged))
  return out


@pytest.mark.parametrize("damage", ["truncated", "flipped", "garbage"])
def test_damaged_gzip_names_the_file(tmp_path, damage):
  data = SAMPLE_GZ.read_bytes()
  cases = {"truncated": _truncated, "flipped": _flipped,
           "garbage": lambda _: [np.random.default_rng(0).bytes(4096)]}[damage](data)
  for i, damaged in enumerate(cases):
    file = _write(tmp_path / str(i), damaged, "all.csv.gz")
    error = _raises(tmp_path / str(i), file, "not a readable gzip file")
    assert isinstance(error.__cause__, (OSError, EOFError, zlib.error))  # chained, not lost


def test_empty_files_name_the_file(tmp_path):
  for name, data in (("all.csv", b""), ("all.csv.gz", b""), ("all.csv.gz", gzip.compress(b""))):
    folder = tmp_path / str(len(list(tmp_path.iterdir())))
    _raises(folder, _write(folder, data, name), "is empty")
  header_only = _write(tmp_path / "header", _sample_csv(0).encode())
  _raises(tmp_path / "header", header_only, "no data rows")


def test_bytes_that_are_not_utf8_name_line_and_byte(tmp_path):
  file = _write(tmp_path / "garbage", np.random.default_rng(0).bytes(4096))
  error = _raises(tmp_path / "garbage", file, "line [0-9]+, byte [0-9]+: not UTF-8")
  assert isinstance(error.__cause__, UnicodeDecodeError)
  text = _sample_csv().encode()
  start = text.index(b"\n", text.index(b"\n") + 1) + 1  # line 3
  for name in ("all.csv", "all.csv.gz"):  # a stray byte inside a compressed file too
    damaged = text[:start + 4] + b"\xff" + text[start + 5:]
    folder = tmp_path / name
    _raises(folder, _write(folder, gzip.compress(damaged) if name.endswith("gz") else damaged, name),
            "line 3, byte 5: not UTF-8")


def test_truncated_text_names_the_line(tmp_path):
  text = _sample_csv()
  cut = text.index("\n", len(text) // 2) - 200  # 200 characters before the end of a row
  line = text[:cut].count("\n") + 1
  _raises(tmp_path, _write(tmp_path, text[:cut].encode()), f"line {line} has [0-9]+ fields")


def test_wrong_column_count_names_the_line(tmp_path):
  lines = _sample_csv().splitlines()
  for i, damaged in enumerate((lines[5] + ",0.0", lines[5].replace(",", "", 1), "")):
    folder = tmp_path / str(i)
    text = "\n".join(lines[:5] + [damaged] + lines[6:]) + "\n"
    _raises(folder, _write(folder, text.encode()), "line 6 has [0-9]+ fields, the header has 90")


@pytest.mark.parametrize("name, value, message", [
    ("click", "x", "not a number"),
    ("click", "", "not a number"),
    ("click", "5", "'5' is not a click, 0 or 1"),
    ("click", "-1", "not a click"),
    ("click", "0.5", "not a click"),
    ("click", "nan", "not a click"),
    ("item_id", "-1", "not an item id, an integer in 0..79"),
    ("item_id", "2.7", "not an item id"),
    ("item_id", "80", "not an item id"),  # the sample has 80 affinity columns, one per item
    ("item_id", "1e12", "not an item id"),
    ("item_id", "nan", "not an item id"),
    ("item_id", "inf", "not an item id"),
    ("item_id", "7?", "not a number"),
    ("position", "1.5", "not a 1-based position"),
    ("position", "0", "not a 1-based position"),
    ("position", "-inf", "not a 1-based position"),
    ("position", "1e9", "not a 1-based position"),
    ("propensity_score", "0", r"outside \(0, 1\]"),
    ("propensity_score", "-0.1", "outside"),
    ("propensity_score", "1.0001", "outside"),
    ("propensity_score", "nan", "outside"),
    ("propensity_score", "inf", "outside"),
    ("user-item_affinity_3", "inf", "not finite"),
    ("user-item_affinity_79", "nan", "not finite"),
    ("user-item_affinity_0", "abc", "not a number"),
    ("timestamp", "2019-11-24 00:00:17", "not a timestamp with a zone offset"),
    ("timestamp", "yesterday", "not a timestamp"),
    ("user_feature_2", "", None),  # an empty category is a category
])
def test_values_out_of_domain_name_line_and_column(tmp_path, name, value, message):
  file = _write(tmp_path, _with_cell(7, name, value).encode())
  if message is None:
    assert load_obd(tmp_path).contexts.shape[0] == 20
  else:
    _raises(tmp_path, file, f"line 9, column {name}: .*{message}")


def test_first_bad_affinity_in_file_order_is_named(tmp_path):
  text = _with_cell(4, "user-item_affinity_50", "inf")
  lines = text.splitlines()
  fields = lines[3].split(",")  # an earlier row, a later column
  fields[-1] = "nan"
  lines[3] = ",".join(fields)
  _raises(tmp_path, _write(tmp_path, ("\n".join(lines) + "\n").encode()),
          "line 4, column user-item_affinity_79: 'nan' is not finite")


def test_integral_spellings_still_load(tmp_path):
  text = _with_cell(2, "click", "1.0")
  text = text.replace(text.splitlines()[5], _with_cell(4, "item_id", "3.0").splitlines()[5])
  log = load_obd(_write(tmp_path, text.encode()).parent)
  assert log.rewards[2] == 1.0 and log.actions[4] == 3 and log.actions.dtype == np.int64


def test_damaged_header_names_line_1(tmp_path):
  lines = _sample_csv().splitlines()
  cases = {
      "stray": lines[0].replace("user-item_affinity_12", "user-item_affinity_1x"),
      "gap": lines[0].replace("user-item_affinity_79", "user-item_affinity_80"),
      "repeat": lines[0].replace("user-item_affinity_12", "user-item_affinity_13"),
  }
  for case, header in cases.items():
    folder = tmp_path / case
    _raises(folder, _write(folder, ("\n".join([header] + lines[1:]) + "\n").encode()), "line 1: ")
  folder = tmp_path / "missing"
  header = lines[0].replace("propensity_score", "propensity")
  _raises(folder, _write(folder, ("\n".join([header] + lines[1:]) + "\n").encode()),
          r"line 1: missing columns \['propensity_score'\]")


def test_item_ids_are_bounded_without_affinity_columns(tmp_path):
  # num_actions would size a [n, num_actions] affinity array: a damaged id must not reach it.
  rows = [line.split(",")[:10] for line in _sample_csv().splitlines()]
  rows[3][2] = str(obd.MAX_ACTIONS)
  text = "\n".join(",".join(row) for row in rows) + "\n"
  _raises(tmp_path, _write(tmp_path, text.encode()),
          f"line 4, column item_id: .*0..{obd.MAX_ACTIONS - 1}")
  rows[3][2] = "79"
  log = load_obd(_write(tmp_path, ("\n".join(",".join(row) for row in rows) + "\n").encode()).parent)
  assert log.num_actions == 80 and log.user_item_affinity.shape == (20, 80)


def test_a_damaged_copy_of_the_shipped_gzip_is_named_by_its_path(tmp_path):
  # The same damage, caught in a full copy of the shipped file rather than a rebuilt one.
  shutil.copy(SAMPLE_GZ, tmp_path / "all.csv.gz")
  text = gzip.decompress((tmp_path / "all.csv.gz").read_bytes()).decode()
  lines = text.splitlines()
  fields = lines[9_000].split(",")
  fields[lines[0].split(",").index("user-item_affinity_0")] = "inf"
  lines[9_000] = ",".join(fields)
  (tmp_path / "all.csv.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
  _raises(tmp_path, tmp_path / "all.csv.gz", "line 9001, column user-item_affinity_0: 'inf'")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(gz=st.booleans(), cut=st.integers(0, 100_000), flips=st.lists(
    st.tuples(st.integers(0, 100_000), st.integers(1, 255)), max_size=3))
def test_any_damage_is_a_value_error_naming_the_file(tmp_path, gz, cut, flips):
  text = _sample_csv(10).encode()
  data = bytearray(gzip.compress(text, mtime=0) if gz else text)
  for offset, mask in flips:
    data[offset % len(data)] ^= mask
  for old in tmp_path.iterdir():
    old.unlink()
  file = _write(tmp_path, bytes(data[:cut % (len(data) + 1)]), "all.csv.gz" if gz else "all.csv")
  try:
    load_obd(tmp_path)  # some damage leaves a valid file (a flipped letter in a user hash)
  except ValueError as err:
    assert str(file) in str(err)
