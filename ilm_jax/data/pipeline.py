"""Grain input pipelines: Phase 1 item-text and pair batches (1:1), Phase 2 prompt batches.

One ``grain.MapDataset`` per stream, all index arithmetic, so an iterator's whole state is
the index of the next batch (``get_state()`` -> ``{'next_index': n}``) and a restored
iterator continues with exactly the batch it would have produced:

  _BatchIndices(N, B, seed)        this process's rows of global batch b of epoch e: a slice
                                   of a fresh seeded permutation per epoch; static shape,
                                   each epoch's last partial batch dropped
  -> map(gather + kind)            int64[B_local] -> {'kind', arrays[B_local, ...]}
  -> repeat()                      infinite
  select_from_datasets(round robin)  item_text, pairs, item_text, pairs, ...

``length_grouped_batches`` is the variant for right-padded sequences (Phase 2 prompts): the
same per-epoch permutation, windows of it sorted by length, and each batch cut to its
longest row, so little of a step is padding.

Global batches do not depend on the number of processes: global batch ``b`` of an epoch is
rows ``[b * B, (b + 1) * B)`` of that epoch's permutation, and process ``p`` of ``P`` feeds
its contiguous block ``[p * B / P, (p + 1) * B / P)``. ``partition.shard_batch`` then
assembles the blocks (``jax.make_array_from_process_local_data``) in the order the mesh lists
the processes' devices: process order for a mesh over ``jax.devices()`` on CPU/GPU, so the
global array equals the single-process batch and a 2-process run sees the same data as a
1-process run (a topology-reordered TPU mesh may permute the blocks, which in-batch
contrastive losses do not notice).

Batch kinds (the trainer dispatches on ``batch['kind']`` to one jitted step per kind):
  item_text: item int32[B], input_ids int32[B, L], input_mask bool[B, L]
  item_item: item_a int32[B], item_b int32[B]   (a < b; the II loss is symmetric)
  user_item: user int32[B], item int32[B]
Within a batch the same item may appear twice (popular items pair with many others); the
losses mask such in-batch false negatives by comparing item ids.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
import tokenizers

from ilm_jax import partition
from ilm_jax.data import pairs as pairs_lib
from ilm_jax.data.types import RecDataset, Split

KINDS = ("item_text", "item_item", "user_item")
PAIR_KEYS = {"item_item": ("item_a", "item_b"), "user_item": ("user", "item")}


@dataclasses.dataclass(frozen=True)
class Phase1Sets:
  """Phase 1 training sets (train split only; see ``ilm_jax.data.pairs``).

  Attributes:
    item_text: {'item': int32[R], 'input_ids': int32[R, L], 'input_mask': bool[R, L]}.
    pairs: int32[P, 2]: (item, item) or (user, item) rows.
    pair_kind: 'item_item' or 'user_item'.
  """

  item_text: Mapping[str, np.ndarray]
  pairs: np.ndarray
  pair_kind: str


def phase1_sets(ds: RecDataset, split: Split, *, pair_kind: str = "item_item",
                window: int = 3, dedup_pairs: bool = True, max_len: int = 64,
                tokenizer: tokenizers.Tokenizer | None = None) -> Phase1Sets:
  """Derives item-text records and the pairs of ``pair_kind`` from the train split.

  Args:
    ds: the dataset (item text).
    split: its leave-one-out split; pairs come from ``split.train`` only.
    pair_kind: 'item_item' (window pairs) or 'user_item'.
    window: item-item window (steps).
    dedup_pairs: item-item pairs once each (True) or once per co-occurrence
      (``pairs.item_item_pairs``).
    max_len: L, token length of item texts.
    tokenizer: default MiniLM + [DEC].

  Returns:
    The Phase1Sets.
  """
  if pair_kind == "item_item":
    pairs = pairs_lib.item_item_pairs(split.train, window, dedup=dedup_pairs)
  elif pair_kind == "user_item":
    pairs = pairs_lib.user_item_pairs(split.train)
  else:
    raise ValueError(f"pair_kind={pair_kind!r}; valid: item_item, user_item")
  return Phase1Sets(pairs_lib.item_text_records(ds, tokenizer, max_len), pairs, pair_kind)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  p = jax.process_index() if process_index is None else process_index
  k = jax.process_count() if process_count is None else process_count
  if not 0 <= p < k:
    raise ValueError(f"process_index {p} is not in [0, {k})")
  return p, k


def stream_seed(seed: int, stream: int) -> int:
  """Independent 32-bit shuffle seed for stream ``stream`` of a pipeline seeded ``seed``."""
  return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


class _BatchIndices(grain.MapDataset):
  """Record indices of this process's block of each global batch, epoch by epoch.

  Element ``i`` (epoch ``e, b = divmod(i, batches_per_epoch)``) is
  ``perm_e[b * B + p * B_local : b * B + (p + 1) * B_local]`` with ``perm_e`` a seeded
  permutation of ``range(N)`` drawn for epoch ``e``. Indices past one epoch continue into
  the next (Grain's convention for ``repeat``). We draw whole permutations with numpy
  rather than use ``MapDataset.shuffle``: its per-element ``index_shuffle`` costs ~4 us
  at N = 1e6 but ~0.4 ms at N = 100 and ~4 ms at N = 10, per element.
  """

  def __init__(self, num_records: int, global_batch: int, seed: int, process_index: int,
               process_count: int):
    super().__init__()
    self._n = num_records
    self._global = global_batch
    self._local = partition.local_batch_size(global_batch, process_count)
    self._offset = process_index * self._local
    self._seed = seed
    self._batches = num_records // global_batch
    if self._batches == 0:
      raise ValueError(f"{num_records} records cannot fill one global batch of {global_batch}")
    self._cache: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return self._batches

  def __str__(self) -> str:
    return (f"_BatchIndices(n={self._n}, global_batch={self._global}, "
            f"rows=[{self._offset}:{self._offset + self._local}])")

  def _perm(self, epoch: int) -> np.ndarray:
    perm = self._cache.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self._seed, epoch]).permutation(self._n)
      self._cache = {epoch: perm}  # one epoch at a time; replaced, never mutated in place
    return perm

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, b = divmod(index, self._batches)
    start = b * self._global + self._offset
    return self._perm(epoch)[start:start + self._local]


class _LengthGroupedIndices(_BatchIndices):
  """``_BatchIndices`` with length-grouped epochs; elements are (indices, batch length).

  See ``length_grouped_batches``. The epoch order is a function of (seed, epoch) only, so
  element ``i`` is the same batch whatever was read before (resumable, like the base).
  """

  def __init__(self, lengths: np.ndarray, global_batch: int, seed: int, process_index: int,
               process_count: int, *, group: int, pad_multiple: int, max_len: int):
    super().__init__(len(lengths), global_batch, seed, process_index, process_count)
    self._lengths = lengths
    self._group, self._multiple, self._max_len = group, pad_multiple, max_len

  def _perm(self, epoch: int) -> np.ndarray:
    perm = self._cache.get(epoch)
    if perm is not None or not self._group:
      return perm if perm is not None else super()._perm(epoch)
    rng = np.random.default_rng([self._seed, epoch])
    g = self._global
    used = rng.permutation(self._n)[:self._batches * g]
    window = g * self._group
    for start in range(0, len(used), window):
      part = used[start:start + window]
      used[start:start + window] = part[np.argsort(-self._lengths[part], kind="stable")]
    order = rng.permutation(self._batches)
    if epoch == 0:  # the longest batch first: a shape that does not fit fails at step 1
      longest = int(np.argmax(self._lengths[used].reshape(-1, g).max(axis=1)))
      order = np.concatenate([[longest], order[order != longest]])
    perm = used.reshape(-1, g)[order].reshape(-1)
    self._cache = {epoch: perm}
    return perm

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, b = divmod(index, self._batches)
    rows = self._perm(epoch)[b * self._global:(b + 1) * self._global]
    length = padded_length(int(self._lengths[rows].max()), self._multiple, self._max_len)
    return rows[self._offset:self._offset + self._local], length


class _RoundRobin(grain.transforms.DatasetSelectionMap):
  """Element i -> (stream i % k, element i // k of it): strict 1:1(:1...) alternation."""

  def __init__(self, num_streams: int):
    self._k = num_streams

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, index: int) -> tuple[int, int]:
    return index % self._k, index // self._k


def _gather(indices: np.ndarray, *, records: Mapping[str, np.ndarray], kind: str
            ) -> dict[str, Any]:
  out: dict[str, Any] = {"kind": kind}
  for key, value in records.items():
    out[key] = value[indices]
  return out


def _gather_cut(element: tuple[np.ndarray, int], *, records: Mapping[str, np.ndarray],
                kind: str, time_keys: tuple[str, ...]) -> dict[str, Any]:
  indices, length = element
  out = _gather(indices, records=records, kind=kind)
  for key in time_keys:
    out[key] = np.ascontiguousarray(out[key][:, :length])
  return out


def _as_records(records: Mapping[str, np.ndarray], kind: str
                ) -> tuple[dict[str, np.ndarray], int]:
  """(records as numpy arrays, their common leading dim N)."""
  records = {key: np.asarray(v) for key, v in records.items()}
  sizes = {v.shape[0] for v in records.values()}
  if len(sizes) != 1:
    raise ValueError(f"records of kind {kind!r} have different lengths: "
                     f"{ {key: v.shape[0] for key, v in records.items()} }")
  return records, sizes.pop()


def batches(records: Mapping[str, np.ndarray], kind: str, *, global_batch: int, seed: int,
            process_index: int | None = None, process_count: int | None = None
            ) -> grain.MapDataset:
  """An infinite, shuffled stream of this process's fixed-shape batches of ``records``.

  Epoch ``e`` visits every record once in a permutation seeded by (``seed``, e), in
  ``N // global_batch`` batches (the rest of that epoch's permutation is dropped).

  Args:
    records: name -> array with a common leading dim N (one row per record).
    kind: the batch's ``kind`` value.
    global_batch: B, rows per global batch (over all processes); each epoch's last
      incomplete batch is dropped.
    seed: shuffle seed (epoch e uses a permutation seeded from ``seed`` and e).
    process_index: this process (default ``jax.process_index()``).
    process_count: number of processes (default ``jax.process_count()``).

  Returns:
    MapDataset of {'kind': kind, name: array[B / process_count, ...]}.
  """
  p, k = _process(process_index, process_count)
  records, n = _as_records(records, kind)
  ds = _BatchIndices(n, global_batch, seed, p, k)
  return ds.map(functools.partial(_gather, records=records, kind=kind)).repeat()


def length_grouped_batches(records: Mapping[str, np.ndarray], kind: str, *,
                           lengths: np.ndarray, time_keys: Sequence[str], global_batch: int,
                           seed: int, group_by_length: int, pad_multiple: int,
                           process_index: int | None = None, process_count: int | None = None
                           ) -> grain.MapDataset:
  """``batches`` for right-padded sequences: similar lengths batched, padding trimmed.

  Each epoch draws the same kind of seeded permutation as ``batches``, cuts it into
  windows of ``group_by_length`` global batches, sorts each window by length (longest
  first) and cuts it into batches, then shuffles the order of the epoch's batches
  (Hugging Face's ``group_by_length`` sampler, with the batch order shuffled). The one
  exception: epoch 0 starts with its longest batch, so an out-of-memory shape fails at the
  first step. Every batch's ``time_keys`` arrays are cut to its longest row rounded up to
  ``pad_multiple`` (at most the arrays' length), the same length on every process, so a
  run compiles at most ``ceil(T / pad_multiple)`` step shapes. A causal model never
  attends to the right padding, so cutting it changes no result (``tests/test_ilm.py``).

  Args:
    records: as ``batches``; the ``time_keys`` arrays are [N, T], right-padded.
    kind: the batch's ``kind`` value.
    lengths: int[N] real length of each row (positions past it are padding).
    time_keys: the records cut along axis 1.
    global_batch: B over all processes.
    seed: shuffle seed.
    group_by_length: window size in global batches (0 = no grouping: ``batches``' order,
      padding still cut per batch).
    pad_multiple: batch lengths are multiples of this (capped at T); 0 = always T.
    process_index: this process (default ``jax.process_index()``).
    process_count: number of processes (default ``jax.process_count()``).

  Returns:
    MapDataset of {'kind': kind, name: array[B / process_count, ...]}.
  """
  p, k = _process(process_index, process_count)
  records, n = _as_records(records, kind)
  lengths = np.asarray(lengths, np.int64)
  widths = {records[key].shape[1] for key in time_keys}
  if lengths.shape != (n,) or len(widths) != 1:
    raise ValueError(f"lengths {lengths.shape} must be ({n},) and the time_keys {time_keys} "
                     f"must share one length (got {sorted(widths)})")
  if group_by_length < 0 or pad_multiple < 0:
    raise ValueError(f"group_by_length={group_by_length}, pad_multiple={pad_multiple}: "
                     "must be >= 0")
  (width,) = widths
  ds = _LengthGroupedIndices(lengths, global_batch, seed, p, k, group=group_by_length,
                             pad_multiple=pad_multiple or width, max_len=width)
  return ds.map(functools.partial(_gather_cut, records=records, kind=kind,
                                  time_keys=tuple(time_keys))).repeat()


def padded_length(longest: int, multiple: int, limit: int) -> int:
  """``longest`` (at least 1) rounded up to a multiple of ``multiple``, at most ``limit``;
  ``multiple`` 0 = ``limit``. Few distinct lengths = few compilations."""
  if not multiple:
    return limit
  return min(-(-max(longest, 1) // multiple) * multiple, limit)


def pair_records(pairs: np.ndarray, kind: str) -> dict[str, np.ndarray]:
  """int32[P, 2] pairs -> the named columns of a batch of ``kind``."""
  if kind not in PAIR_KEYS:
    raise ValueError(f"pair kind {kind!r}; valid: {', '.join(PAIR_KEYS)}")
  pairs = np.asarray(pairs, np.int32).reshape(-1, 2)
  a, b = PAIR_KEYS[kind]
  return {a: np.ascontiguousarray(pairs[:, 0]), b: np.ascontiguousarray(pairs[:, 1])}


def alternate(streams: Sequence[grain.MapDataset]) -> grain.MapDataset:
  """Interleaves infinite streams one element each, in order (1:1 for two streams)."""
  return grain.MapDataset.select_from_datasets(list(streams), _RoundRobin(len(streams)))


def phase1_dataset(sets: Phase1Sets, *, text_batch: int, pair_batch: int, seed: int,
                   process_index: int | None = None, process_count: int | None = None
                   ) -> grain.MapDataset:
  """Item-text and pair batches alternating 1:1, starting with item-text.

  Args:
    sets: the Phase 1 training sets.
    text_batch: global batch size of item-text batches.
    pair_batch: global batch size of pair batches.
    seed: pipeline seed (each stream gets its own derived seed).
    process_index: this process (default ``jax.process_index()``).
    process_count: number of processes (default ``jax.process_count()``).

  Returns:
    An infinite MapDataset; element 2i is item-text batch i, element 2i+1 pair batch i.
  """
  text = batches(sets.item_text, "item_text", global_batch=text_batch,
                 seed=stream_seed(seed, 0), process_index=process_index,
                 process_count=process_count)
  pair = batches(pair_records(sets.pairs, sets.pair_kind), sets.pair_kind,
                 global_batch=pair_batch, seed=stream_seed(seed, 1),
                 process_index=process_index, process_count=process_count)
  return alternate([text, pair])


def to_iterator(dataset: grain.MapDataset, *, mesh: jax.sharding.Mesh | None = None,
                read_options: grain.ReadOptions | None = None) -> grain.DatasetIterator:
  """A checkpointable iterator over ``dataset``, placing batches on ``mesh`` if given.

  Args:
    dataset: e.g. ``phase1_dataset(...)``.
    mesh: place array leaves as global, batch-sharded ``jax.Array``s
      (``partition.shard_batch``); None keeps host numpy.
    read_options: Grain read threads/prefetch; default no threads (in-memory data: threads
      only contend for the GIL).

  Returns:
    A ``grain.DatasetIterator``; ``get_state()``/``set_state()`` save and restore the
    position (``ilm_jax.checkpoint`` stores it with the model).
  """
  read_options = read_options or grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  it_ds = dataset.to_iter_dataset(read_options)
  if mesh is not None:
    it_ds = it_ds.map(functools.partial(partition.shard_batch, mesh=mesh))
  return iter(it_ds)


def steps_per_epoch(num_records: int, global_batch: int) -> int:
  """Batches per epoch of a stream (the remainder is dropped)."""
  return num_records // global_batch
