"""Grain pipelines: determinism, 1:1 alternation, epochs, resume, sharding, length grouping."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from ilm_jax import partition
from ilm_jax.data import pipeline
from ilm_jax.data.types import RecDataset, leave_one_out

L = 5


def _sets(num_items: int = 12, num_pairs: int = 9, kind: str = "item_item"
          ) -> pipeline.Phase1Sets:
  items = np.arange(num_items, dtype=np.int32)
  # Row r of input_ids encodes its item so a test can check rows stay aligned.
  ids = (items[:, None] * 100 + np.arange(L)[None]).astype(np.int32)
  mask = (np.arange(L)[None] <= items[:, None] % L)
  pairs = np.stack([np.arange(num_pairs), np.arange(num_pairs) + 1000], 1).astype(np.int32)
  return pipeline.Phase1Sets({"item": items, "input_ids": ids, "input_mask": mask}, pairs, kind)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    assert x["kind"] == y["kind"]
    for k in x:
      if k != "kind":
        np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]))


def _iter(sets=None, seed=0, text_batch=4, pair_batch=3, **kw):
  ds = pipeline.phase1_dataset(sets or _sets(), text_batch=text_batch, pair_batch=pair_batch,
                               seed=seed, **kw)
  return pipeline.to_iterator(ds)


def test_alternates_one_to_one_with_static_shapes():
  batches = _take(_iter(), 20)  # spans several epochs of both streams
  assert [b["kind"] for b in batches] == ["item_text", "item_item"] * 10
  for b in batches[::2]:
    assert b["item"].shape == (4,) and b["item"].dtype == np.int32
    assert b["input_ids"].shape == (4, L) and b["input_ids"].dtype == np.int32
    assert b["input_mask"].shape == (4, L) and b["input_mask"].dtype == bool
    # rows were gathered consistently across the record arrays
    np.testing.assert_array_equal(b["input_ids"][:, 0], b["item"] * 100)
  for b in batches[1::2]:
    assert set(b) == {"kind", "item_a", "item_b"}
    assert b["item_a"].shape == (3,) and b["item_b"].shape == (3,)
    np.testing.assert_array_equal(b["item_b"], b["item_a"] + 1000)


def test_user_item_batches_are_named_user_and_item():
  b = _take(_iter(_sets(kind="user_item")), 2)[1]
  assert b["kind"] == "user_item" and set(b) == {"kind", "user", "item"}


def test_epochs_cover_every_record_once_then_reshuffle():
  # 12 items, batch 4 -> 3 batches an epoch; 9 pairs, batch 3 -> 3 batches.
  batches = _take(_iter(), 12)
  text = [b["item"] for b in batches[::2]]
  epoch0, epoch1 = np.concatenate(text[:3]), np.concatenate(text[3:])
  assert sorted(epoch0.tolist()) == list(range(12))
  assert sorted(epoch1.tolist()) == list(range(12))
  assert epoch0.tolist() != epoch1.tolist()  # a new permutation each epoch
  assert epoch0.tolist() != list(range(12))  # shuffled at all
  pairs0 = np.concatenate([b["item_a"] for b in batches[1:6:2]])
  assert sorted(pairs0.tolist()) == list(range(9))


def test_drop_remainder_per_epoch():
  # 10 items, batch 4: 2 batches an epoch, 2 items of each epoch's permutation dropped.
  batches = _take(_iter(_sets(num_items=10)), 8)
  text = [b["item"] for b in batches[::2]]
  for epoch in (text[:2], text[2:]):
    seen = np.concatenate(epoch)
    assert len(set(seen.tolist())) == 8  # no repeats within an epoch


def test_same_seed_same_batches_other_seed_differs():
  _assert_batches_equal(_take(_iter(seed=3), 10), _take(_iter(seed=3), 10))
  a = np.concatenate([b["item"] for b in _take(_iter(seed=3), 10)[::2]])
  b = np.concatenate([b["item"] for b in _take(_iter(seed=4), 10)[::2]])
  assert a.tolist() != b.tolist()


@pytest.mark.parametrize("n", [0, 1, 7])
def test_resume_gives_the_exact_next_batches(n):
  it = _iter(seed=1)
  _take(it, n)
  state = json.loads(json.dumps(it.get_state()))  # as the checkpoint stores it
  expected = _take(it, 9)
  fresh = _iter(seed=1)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 9), expected)


def test_resume_with_read_threads():
  import grain  # noqa: PLC0415
  opts = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
  ds = pipeline.phase1_dataset(_sets(), text_batch=4, pair_batch=3, seed=2)
  it = pipeline.to_iterator(ds, read_options=opts)
  _take(it, 5)
  state = it.get_state()
  expected = _take(it, 6)
  fresh = pipeline.to_iterator(ds, read_options=opts)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 6), expected)
  _assert_batches_equal(expected, _take(_iter(seed=2), 11)[5:])  # threads change nothing


def test_two_processes_feed_disjoint_blocks_of_the_same_global_batches():
  sets = _sets(num_items=13, num_pairs=10)  # remainders: 1 item, 2 pairs per epoch dropped
  kw = dict(seed=5, text_batch=4, pair_batch=4)
  whole = _take(_iter(sets, process_index=0, process_count=1, **kw), 12)
  p0 = _take(_iter(sets, process_index=0, process_count=2, **kw), 12)
  p1 = _take(_iter(sets, process_index=1, process_count=2, **kw), 12)
  for w, a, b in zip(whole, p0, p1, strict=True):
    assert w["kind"] == a["kind"] == b["kind"]
    for k in w:
      if k != "kind":
        assert a[k].shape[0] == w[k].shape[0] // 2
        np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), w[k])
  # Within an epoch (3 text batches) the two processes' items are disjoint and together
  # cover 12 of the 13 items.
  e0 = np.concatenate([x["item"] for x in p0[:6:2]])
  e1 = np.concatenate([x["item"] for x in p1[:6:2]])
  assert not set(e0.tolist()) & set(e1.tolist())
  assert len(set(e0.tolist()) | set(e1.tolist())) == 12


# ---------------------------------------------------------------- length-grouped batches

T_MAX = 40


def _sequences(n: int = 203, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Right-padded rows of two length populations (short 3-12, long 25-40); row r's real
  tokens are r + 1 and its padding 0, so a test can tell real from cut positions."""
  rng = np.random.default_rng(seed)
  lengths = np.where(rng.random(n) < 0.5, rng.integers(3, 13, n), rng.integers(25, 41, n))
  valid = np.arange(T_MAX)[None] < lengths[:, None]
  ids = np.where(valid, np.arange(n)[:, None] + 1, 0).astype(np.int32)
  return {"row": np.arange(n, dtype=np.int32), "input_ids": ids, "mask": valid}, lengths


def _grouped(records, lengths, *, group=50, multiple=8, batch=4, seed=0, **kw):
  return pipeline.length_grouped_batches(
      records, "seq", lengths=lengths, time_keys=("input_ids", "mask"), global_batch=batch,
      seed=seed, group_by_length=group, pad_multiple=multiple, **kw)


def test_length_grouped_epochs_cover_every_row_once_and_cut_only_padding():
  records, lengths = _sequences()
  ds = _grouped(records, lengths)
  per_epoch = 203 // 4  # 50 batches, 3 rows dropped per epoch
  batches = [ds[i] for i in range(2 * per_epoch)]
  for epoch in (batches[:per_epoch], batches[per_epoch:]):
    rows = np.concatenate([b["row"] for b in epoch])
    assert len(rows) == len(set(rows.tolist())) == 200
  for b in batches:
    t = b["input_ids"].shape[1]
    longest = lengths[b["row"]].max()
    assert t == min(-(-longest // 8) * 8, T_MAX) and b["mask"].shape == (4, t)
    np.testing.assert_array_equal(b["input_ids"], records["input_ids"][b["row"], :t])
    assert not records["mask"][b["row"], t:].any()  # only padding was cut
  # Grouping puts the two populations in separate batches: far less padding than
  # plain shuffling (which still cuts, but a mixed batch pads to its long row).
  plain = _grouped(records, lengths, group=0)
  mean_t = np.mean([b["input_ids"].shape[1] for b in batches[:per_epoch]])
  mean_plain = np.mean([plain[i]["input_ids"].shape[1] for i in range(per_epoch)])
  assert mean_t < 0.8 * mean_plain, (mean_t, mean_plain)
  # Epoch 0 starts with its longest batch; the batch order is shuffled, not sorted.
  assert batches[0]["input_ids"].shape[1] == T_MAX
  shapes = [b["input_ids"].shape[1] for b in batches[1:per_epoch]]
  assert shapes != sorted(shapes) and shapes != sorted(shapes, reverse=True)


def test_length_grouping_off_is_the_plain_pipeline():
  records, lengths = _sequences(n=40)
  plain = pipeline.batches(records, "seq", global_batch=4, seed=3)
  same = _grouped(records, lengths, group=0, multiple=0, seed=3)
  _assert_batches_equal([same[i] for i in range(25)], [plain[i] for i in range(25)])


def test_length_grouped_batches_resume_and_split_over_processes():
  records, lengths = _sequences()
  it = pipeline.to_iterator(_grouped(records, lengths, seed=7))
  _take(it, 30)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 40)  # crosses into epoch 1
  fresh = pipeline.to_iterator(_grouped(records, lengths, seed=7))
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 40), expected)
  whole = _grouped(records, lengths, seed=7, process_index=0, process_count=1)
  halves = [_grouped(records, lengths, seed=7, process_index=p, process_count=2) for p in (0, 1)]
  for i in range(0, 100, 7):
    # Every process gets the global batch's length, not its own block's longest row.
    _assert_batches_equal(
        [{k: np.concatenate([halves[0][i][k], halves[1][i][k]]) if k != "kind" else "seq"
          for k in whole[i]}], [whole[i]])


def test_length_grouped_batches_reject_bad_arguments():
  records, lengths = _sequences(n=20)
  with pytest.raises(ValueError, match="lengths"):
    _grouped(records, lengths[:-1])
  with pytest.raises(ValueError, match="must be >= 0"):
    _grouped(records, lengths, group=-1)


def test_bad_batch_sizes_fail_clearly():
  with pytest.raises(ValueError, match="not divisible"):
    _iter(text_batch=5, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="cannot fill one global batch"):
    _iter(text_batch=64)


def test_batches_placed_on_an_8_device_mesh():
  assert jax.device_count() == 8
  mesh = partition.make_mesh(data=4, fsdp=2)
  ds = pipeline.phase1_dataset(_sets(num_items=24, num_pairs=16), text_batch=8, pair_batch=8,
                               seed=0)
  host = _take(pipeline.to_iterator(ds), 4)
  placed = _take(pipeline.to_iterator(ds, mesh=mesh), 4)
  _assert_batches_equal(host, placed)
  b = placed[0]
  assert isinstance(b["input_ids"], jax.Array)
  assert b["input_ids"].shape == (8, L)
  assert b["input_ids"].sharding.spec == PartitionSpec(("data", "fsdp"), None)
  assert b["item"].sharding.spec == PartitionSpec(("data", "fsdp"))
  shards = b["input_ids"].addressable_shards
  assert len(shards) == 8 and all(s.data.shape == (1, L) for s in shards)
  assert placed[1]["kind"] == "item_item"


def test_mesh_iterator_resumes_through_the_checkpointer(tmp_path):
  from ilm_jax.checkpoint import Checkpointer  # noqa: PLC0415
  mesh = partition.make_mesh(data=8)
  ds = pipeline.phase1_dataset(_sets(num_items=24, num_pairs=16), text_batch=8, pair_batch=8,
                               seed=7)
  it = pipeline.to_iterator(ds, mesh=mesh)
  _take(it, 5)
  state = {"w": np.arange(3.0, dtype=np.float32)}
  ckpt = Checkpointer(tmp_path / "ckpt")
  ckpt.save(5, state, data={"train": it})
  expected = _take(it, 6)
  fresh = pipeline.to_iterator(ds, mesh=mesh)
  abstract = {"w": jax.ShapeDtypeStruct((3,), np.float32)}
  step, _ = Checkpointer(tmp_path / "ckpt").restore(abstract, data={"train": fresh})
  assert step == 5
  _assert_batches_equal(_take(fresh, 6), expected)


def test_make_mesh_axes_are_explicit_auto():
  mesh = partition.make_mesh(fsdp=2)
  assert mesh.axis_names == ("data", "fsdp") and mesh.devices.shape == (4, 2)
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ValueError, match="divide"):
    partition.make_mesh(fsdp=3)


def test_phase1_sets_take_pairs_from_the_train_split_only():
  # 3 users; last two items of each sequence are validation/test.
  ds = RecDataset(
      name="t", item_ids=np.array([str(i) for i in range(8)]),
      user_ids=np.array(["u0", "u1", "u2"]),
      sequences=[np.array([0, 1, 2, 6, 7], np.int32), np.array([1, 2, 3, 6, 7], np.int32),
                 np.array([0, 2, 3, 4, 5], np.int32)],
      item_text=[f"item number {i}" for i in range(8)], item_titles=[""] * 8)
  split = leave_one_out(ds)
  sets = pipeline.phase1_sets(ds, split, pair_kind="item_item", window=1, max_len=8)
  assert sorted(map(tuple, sets.pairs.tolist())) == [(0, 1), (0, 2), (1, 2), (2, 3)]
  ui = pipeline.phase1_sets(ds, split, pair_kind="user_item", max_len=8)
  assert sorted(map(tuple, ui.pairs.tolist())) == [
      (0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (1, 3), (2, 0), (2, 2), (2, 3)]
  assert sets.item_text["input_ids"].shape == (8, 8)
  with pytest.raises(ValueError, match="pair_kind"):
    pipeline.phase1_sets(ds, split, pair_kind="item_user")
