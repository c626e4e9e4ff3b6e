"""`iter_obd`: an OBD log read in chunks equals `load_obd`'s log, shares its items, slots and
vocabulary across chunks, names damaged lines counting from the file's start, and streams into
`ope.estimate_streaming`.

Damaged files are copies of the shipped sample's first rows with one cell replaced; a small
pyarrow block size makes the streaming reader meet the damage only after earlier chunks have
been delivered.
"""

import functools
import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from saferl_jax import ope
from saferl_jax.data import iter_obd, load_obd, obd, sample_path

ROUND_FIELDS = obd.ROUND_FIELDS
SAMPLE_GZ = sample_path() / "all.csv.gz"


@functools.cache
def _sample_lines() -> tuple[str, ...]:
  return tuple(gzip.decompress(SAMPLE_GZ.read_bytes()).decode().splitlines())


@functools.cache
def _whole(policy: str = "bts", vocabulary_from: str | None = None):
  vocabulary = None if vocabulary_from is None else _whole(vocabulary_from).vocabulary
  return load_obd(behavior_policy=policy, vocabulary=vocabulary)


def _assert_chunks_are(chunks: list, whole, sizes: list[int]) -> None:
  assert [len(c.rewards) for c in chunks] == sizes
  for name in ROUND_FIELDS:
    joined = np.concatenate([getattr(c, name) for c in chunks])
    assert joined.dtype == getattr(whole, name).dtype, name
    np.testing.assert_array_equal(joined, getattr(whole, name), err_msg=name)
  for chunk in chunks:  # what the whole log shares, in every chunk
    assert (chunk.num_actions, chunk.num_positions) == (whole.num_actions, whole.num_positions)
    assert chunk.vocabulary == whole.vocabulary
    np.testing.assert_array_equal(chunk.item_features, whole.item_features)


def test_chunks_of_the_shipped_csv_gz_concatenate_to_load_obds_log():
  _assert_chunks_are(list(iter_obd(chunk_rounds=3000)), _whole(), [3000, 3000, 3000, 1000])


def test_a_plain_csv_with_a_given_vocabulary(tmp_path):
  # The random logger's file uncompressed, encoded with the BTS log's vocabulary (no first pass
  # over the user features).
  shutil.copy(sample_path("random") / "item_context.csv", tmp_path)
  (tmp_path / "all.csv").write_bytes(gzip.decompress((sample_path("random") / "all.csv.gz").read_bytes()))
  vocabulary = _whole().vocabulary
  chunks = list(iter_obd(tmp_path, chunk_rounds=4000, vocabulary=vocabulary))
  _assert_chunks_are(chunks, _whole("random", vocabulary_from="bts"), [4000, 4000, 2000])
  assert chunks[0].vocabulary == vocabulary and chunks[0].vocabulary != _whole("random").vocabulary


def test_one_chunk_when_chunk_rounds_exceeds_the_log():
  _assert_chunks_are(list(iter_obd(behavior_policy="random", chunk_rounds=10**6)), _whole("random"),
                     [10_000])


def _write_rows(folder: Path, edit=None, *, num_rows: int = 40, drop_affinity: bool = False) -> Path:
  """The sample's first rows in <folder>/all.csv; edit(header, rows of fields) changes cells."""
  folder.mkdir(parents=True, exist_ok=True)
  lines = [line.split(",") for line in _sample_lines()[:num_rows + 1]]
  header, rows = lines[0], lines[1:]
  if edit is not None:
    edit(header, rows)
  keep = [i for i, name in enumerate(header)
          if not (drop_affinity and name.startswith(obd.AFFINITY_PREFIX))]
  text = "\n".join(",".join(fields[i] for i in keep) for fields in [header] + rows) + "\n"
  (folder / "all.csv").write_text(text)
  return folder / "all.csv"


def _set(row: int, name: str, value: str):
  def edit(header, rows):
    rows[row][header.index(name)] = value
  return edit


@pytest.fixture
def small_blocks(monkeypatch):
  # ~12 rows of text a block: the reader reaches data row 25 only after chunks 1 and 2 (rows
  # 0..19) are out, so a failure found in its block must still count lines from the file's start.
  monkeypatch.setattr(obd, "_BLOCK_SIZE", 8192)


@pytest.mark.parametrize("name, value, message, in_domain_check", [
    ("click", "2", "line 27, column click: '2' is not a click", True),
    ("propensity_score", "0", r"line 27, column propensity_score: '0' is outside \(0, 1\]", True),
    ("user-item_affinity_7", "inf", "line 27, column user-item_affinity_7: 'inf' is not finite", True),
    ("propensity_score", "abc", "line 27, column propensity_score: not a number", False),
    ("timestamp", "yesterday", "line 27, column timestamp: not a timestamp", False),
])
def test_a_damaged_cell_in_the_third_chunk_names_its_line(tmp_path, small_blocks, name, value,
                                                           message, in_domain_check):
  path = _write_rows(tmp_path, _set(25, name, value))  # data row 25: line 27, chunk 3 of 10 rows
  with pytest.raises(ValueError, match=message) as whole:
    load_obd(tmp_path)
  delivered = []
  with pytest.raises(ValueError, match=message) as streamed:
    for chunk in iter_obd(tmp_path, chunk_rounds=10):
      delivered.append(chunk)
  assert str(streamed.value) == str(whole.value) and str(path) in str(streamed.value)
  # A value out of its domain is found by the third chunk's checks; a cell that does not parse
  # by the reader, which may parse a block or two ahead of the chunks delivered.
  sizes = [len(c.rewards) for c in delivered]
  assert sizes == [10, 10] if in_domain_check else sizes in ([], [10], [10, 10])


def test_damage_in_the_first_pass_raises_at_the_call(tmp_path, small_blocks):
  # position is read by the first pass: the call raises, before any chunk, load_obd's message.
  _write_rows(tmp_path, _set(25, "position", "x"))
  with pytest.raises(ValueError, match="line 27, column position: not a number") as whole:
    load_obd(tmp_path)
  with pytest.raises(ValueError, match="line 27, column position: not a number") as streamed:
    iter_obd(tmp_path, chunk_rounds=10)
  assert str(streamed.value) == str(whole.value)
  # An out-of-domain position is left to its chunk, so that problems come in file order.
  _write_rows(tmp_path, lambda header, rows: (_set(25, "position", "1001")(header, rows),
                                              _set(5, "click", "7")(header, rows)))
  with pytest.raises(ValueError, match="line 7, column click: '7' is not a click"):
    list(iter_obd(tmp_path, chunk_rounds=10))


def test_slots_and_items_are_the_whole_logs_in_every_chunk(tmp_path):
  # Without affinity columns and item_context.csv the log's items are its largest id + 1; the
  # largest id (50) and the only third slot are both in the last chunk.
  def edit(header, rows):
    for i, fields in enumerate(rows):
      fields[header.index("item_id")] = str(i % 10)
      fields[header.index("position")] = "1"
    rows[-1][header.index("item_id")] = "50"
    rows[-1][header.index("position")] = "3"
  _write_rows(tmp_path, edit, num_rows=30, drop_affinity=True)
  whole = load_obd(tmp_path)
  assert (whole.num_actions, whole.num_positions) == (51, 3)
  chunks = list(iter_obd(tmp_path, chunk_rounds=7))
  _assert_chunks_are(chunks, whole, [7, 7, 7, 7, 2])
  assert all(c.user_item_affinity.shape == (len(c.rewards), 51) for c in chunks)


def test_a_huge_damaged_item_id_does_not_size_the_chunks(tmp_path):
  # Without affinity columns an id of 1e12 would make [n, 1e12] affinities; the first pass
  # bounds it as load_obd does, and the chunk holding it reports it.
  _write_rows(tmp_path, _set(25, "item_id", "1000000000000"), drop_affinity=True)
  chunks = iter_obd(tmp_path, chunk_rounds=10)
  assert next(chunks).num_actions <= obd.MAX_ACTIONS
  with pytest.raises(ValueError, match="line 27, column item_id: '1000000000000' is not an item id"):
    list(chunks)


def test_header_only_and_bad_chunk_rounds_are_refused(tmp_path):
  _write_rows(tmp_path, num_rows=0)
  with pytest.raises(ValueError, match="has a header but no data rows"):
    iter_obd(tmp_path)
  for bad, error in ((0, ValueError), (2.5, ValueError), (True, TypeError), ("10", TypeError)):
    with pytest.raises(error, match="chunk_rounds"):
      iter_obd(chunk_rounds=bad)


def _rounds(log) -> dict:
  """The uniform target policy at every slot, [m, A, L], with the log's positions."""
  shape = (len(log.rewards), log.num_actions, log.num_positions)
  return dict(rewards=log.rewards, actions=log.actions, logging_probs=log.logging_probs,
              positions=log.positions, target_dist=np.full(shape, 1 / log.num_actions))


@pytest.mark.slow
def test_streamed_ips_of_the_sample_equals_ips_of_the_loaded_log():
  # 3000-round chunks (the last, of 1000, padded and masked by estimate_streaming). Exact but for
  # float32 rounding of the running moments: 1e-5 relative, as ope.streaming documents.
  streamed = ope.estimate_streaming(map(_rounds, iter_obd(chunk_rounds=3000)),
                                    estimators=("ips", "snips"))
  whole = _rounds(_whole())
  for name, estimator in (("ips", ope.ips), ("snips", ope.snips)):
    expected = estimator(**whole)
    np.testing.assert_allclose(streamed[name].value, expected.value, rtol=1e-5)
    np.testing.assert_allclose(streamed[name].stderr, expected.stderr, rtol=1e-5)
  assert float(streamed["ips"].value) > 0  # the sample has clicks: not 0 == 0
