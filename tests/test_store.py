"""Prepared-data storage: TFDS ArrayRecord round trip, atomic writes, caching."""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

from ilm_jax import config_lib
from ilm_jax.data import store
from ilm_jax.data.types import DataError, RecDataset


def _toy(name: str = "toy", **overrides) -> RecDataset:
  fields = dict(
      name=name,
      item_ids=np.array(["B00X1", "0042", "ä-id", "x y"]),
      user_ids=np.array(["A1", "A2", "A3"]),
      sequences=[np.array([0, 1, 2], np.int32), np.array([3, 1, 0, 1, 2], np.int32),
                 np.array([], np.int32)],
      item_text=["Toy Story (1995). Animation|Comedy", "", "Amélie — ünïcödé", "line\nbreak"],
      item_titles=["Toy Story (1995)", "Heat", "", "X"],
      item_attrs={"genres": [["Animation", "Comedy"], [], ["Romance"], ["A", "B", "C"]],
                  "era": [["1990s"], ["1990s"], ["2000s"], []]},
      item_tokens=["1003", "1001", "1004", "1002"],
      user_tokens=["1", "2", "3"],
      extras={"cluster": np.array([2, 0, 1, 2], np.int64),
              "taste": np.arange(6, dtype=np.float32).reshape(3, 2)},
  )
  fields.update(overrides)
  return RecDataset(**fields)


def assert_same_dataset(a: RecDataset, b: RecDataset) -> None:
  assert a.name == b.name
  assert list(a.item_ids) == list(b.item_ids)
  assert list(a.user_ids) == list(b.user_ids)
  assert len(a.sequences) == len(b.sequences)
  for sa, sb in zip(a.sequences, b.sequences, strict=True):
    assert sb.dtype == np.int32
    np.testing.assert_array_equal(sa, sb)
  assert list(a.item_text) == list(b.item_text)
  assert list(a.item_titles) == list(b.item_titles)
  assert a.item_attrs == b.item_attrs
  assert (a.item_tokens is None) == (b.item_tokens is None)
  if a.item_tokens is not None:
    assert list(a.item_tokens) == list(b.item_tokens)
  assert (a.user_tokens is None) == (b.user_tokens is None)
  if a.user_tokens is not None:
    assert list(a.user_tokens) == list(b.user_tokens)
  assert sorted(a.extras) == sorted(b.extras)
  for k in a.extras:
    assert a.extras[k].dtype == b.extras[k].dtype
    np.testing.assert_array_equal(a.extras[k], b.extras[k])


def _leftovers(parent: pathlib.Path) -> list[str]:
  return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_round_trip(tmp_path):
  ds = _toy()
  info = store.write(ds, tmp_path / "toy", fingerprint="abc", progress=False)
  assert info["stats"] == {"users": 3, "items": 4, "interactions": 8}
  assert_same_dataset(ds, store.load(tmp_path / "toy"))
  assert json.loads((tmp_path / "toy" / "info.json").read_text())["fingerprint"] == "abc"
  # TFDS wrote ArrayRecord files, and nothing pulled in TensorFlow.
  assert list((tmp_path / "toy" / "rec_items" / "1.0.0").glob("*.array_record-*"))
  assert "tensorflow" not in sys.modules
  assert _leftovers(tmp_path) == []


def test_round_trip_without_optional_fields(tmp_path):
  ds = _toy(item_attrs={}, item_tokens=None, user_tokens=None, extras={})
  store.write(ds, tmp_path / "d", progress=False)
  assert_same_dataset(ds, store.load(tmp_path / "d"))


def test_data_sources_are_random_access_in_index_order(tmp_path):
  ds = _toy()
  store.write(ds, tmp_path / "d", progress=False)
  src = store.data_sources(tmp_path / "d")
  assert len(src["items"]) == 4 and len(src["users"]) == 3
  assert src["items"][2]["raw_id"].decode() == "ä-id"
  np.testing.assert_array_equal(src["users"][1]["sequence"], [3, 1, 0, 1, 2])


def test_bulk_reader_agrees_with_the_tfds_decoder(tmp_path):
  store.write(_toy(), tmp_path / "d", progress=False)
  ds = store.load(tmp_path / "d")
  src = store.data_sources(tmp_path / "d")
  for i in range(ds.num_items):
    rec = src["items"][i]
    assert int(rec["index"]) == i
    assert rec["raw_id"].decode() == ds.item_ids[i]
    assert rec["title"].decode() == ds.item_titles[i]
    assert rec["text"].decode() == ds.item_text[i]
    assert rec["token"].decode() == ds.item_tokens[i]
    for name in ds.item_attrs:
      assert [v.decode() for v in rec["attrs"][name]] == ds.item_attrs[name][i]
  for u in range(ds.num_users):
    rec = src["users"][u]
    assert rec["raw_id"].decode() == ds.user_ids[u]
    assert rec["token"].decode() == ds.user_tokens[u]
    np.testing.assert_array_equal(rec["sequence"], ds.sequences[u])


def test_grain_reads_the_array_record_source(tmp_path):
  import grain  # noqa: PLC0415
  store.write(_toy(), tmp_path / "d", progress=False)
  users = grain.MapDataset.source(store.data_sources(tmp_path / "d")["users"])
  lengths = list(users.map(lambda r: len(r["sequence"])))
  assert lengths == [3, 5, 0]


def test_progress_lines(tmp_path, caplog):
  import logging  # noqa: PLC0415
  with caplog.at_level(logging.INFO):
    store.write(_toy(), tmp_path / "d", progress=True)
  lines = [r.getMessage() for r in caplog.records]
  assert any("toy items: 4/4 (100%)" in m for m in lines), lines
  assert any("toy users: 3/3 (100%)" in m for m in lines), lines


def test_failure_mid_write_leaves_nothing_half_written(tmp_path, monkeypatch):
  dest = tmp_path / "d"
  good = _toy()

  orig = store._user_examples  # noqa: SLF001

  def broken_users(ds, progress):
    gen = orig(ds, progress)
    yield next(gen)
    raise OSError("disk on fire")

  monkeypatch.setattr(store, "_user_examples", broken_users)
  with pytest.raises(OSError, match="disk on fire"):
    store.write(good, dest, progress=False)
  assert not dest.exists()
  assert _leftovers(tmp_path) == []

  # A previous complete dataset survives a failed rewrite untouched.
  monkeypatch.setattr(store, "_user_examples", orig)
  store.write(good, dest, progress=False)
  monkeypatch.setattr(store, "_user_examples", broken_users)
  with pytest.raises(OSError, match="disk on fire"):
    store.write(_toy(name="other"), dest, progress=False)
  assert_same_dataset(good, store.load(dest))
  assert _leftovers(tmp_path) == []


def test_identical_concurrent_writes_keep_the_first_complete_copy(tmp_path):
  import threading  # noqa: PLC0415
  dest = tmp_path / "d"
  store.write(_toy(), dest, fingerprint="fp", progress=False)
  first_info = (dest / "info.json").stat().st_mtime_ns
  store.write(_toy(), dest, fingerprint="fp", progress=False)  # same dataset: kept as is
  assert (dest / "info.json").stat().st_mtime_ns == first_info

  # Two "processes" preparing the same dataset into a shared folder at once.
  shared = tmp_path / "shared"
  errors = []

  def prepare_one():
    try:
      store.write(_toy(), shared, fingerprint="fp2", progress=False)
    except Exception as e:  # noqa: BLE001
      errors.append(e)

  threads = [threading.Thread(target=prepare_one) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert errors == []
  assert_same_dataset(_toy(), store.load(shared))
  assert _leftovers(tmp_path) == []


def test_inconsistent_dataset_is_rejected_before_writing(tmp_path):
  with pytest.raises(ValueError, match="item_text"):
    store.write(_toy(item_text=["only one"]), tmp_path / "d", progress=False)
  assert not (tmp_path / "d").exists()


def test_load_of_missing_dir_names_it(tmp_path):
  with pytest.raises(DataError, match=r"info\.json missing"):
    store.load(tmp_path / "nothing")


def test_prepare_builds_once_and_rebuilds_when_inputs_or_config_change(tmp_path):
  inputs = tmp_path / "inputs"
  inputs.mkdir()
  (inputs / "user_sequence.txt").write_text("A1 B00X1 0042\n")
  calls = []

  def load_fn(cfg):
    calls.append(cfg.min_core)
    return _toy()

  cfg = config_lib.data_config("openp5", dir=str(inputs))
  dest = tmp_path / "data" / "toy"
  first = store.prepare(cfg, dest, load_fn=load_fn, progress=False)
  assert first.built and calls == [5]
  assert_same_dataset(_toy(), first.load())

  again = store.prepare(cfg, dest, load_fn=load_fn, progress=False)
  assert not again.built and calls == [5]
  assert again.info["fingerprint"] == first.info["fingerprint"]

  (inputs / "user_sequence.txt").write_text("A1 B00X1 0043\n")  # input content changed
  assert store.prepare(cfg, dest, load_fn=load_fn, progress=False).built
  assert len(calls) == 2

  cfg.min_core = 3  # config changed
  assert store.prepare(cfg, dest, load_fn=load_fn, progress=False).built
  assert calls == [5, 5, 3]
  assert store.prepare(cfg, dest, load_fn=load_fn, progress=False, force=True).built
  assert len(calls) == 4


def test_fingerprint_ignores_file_location_but_not_content(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  for d in (a, b):
    d.mkdir()
    (d / "user_sequence.txt").write_text("u1 i1 i2 i3\n")
  cfg = config_lib.data_config("openp5")
  assert store.fingerprint(cfg, [a / "user_sequence.txt"]) == store.fingerprint(
      cfg, [b / "user_sequence.txt"])
  (b / "user_sequence.txt").write_text("u1 i1 i2 i4\n")
  assert store.fingerprint(cfg, [a / "user_sequence.txt"]) != store.fingerprint(
      cfg, [b / "user_sequence.txt"])
