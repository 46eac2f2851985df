"""Derived training sets: train-only pairs (leakage), item-text records, the tokenizer."""

import numpy as np
import pytest

from ilm_jax import resources
from ilm_jax.data import pairs, tokenization, types


def _dataset(seqs, texts=None):
  n = 1 + max(int(x) for s in seqs for x in s)
  return types.RecDataset(
      name="toy", item_ids=np.array([f"i{i}" for i in range(n)]),
      user_ids=np.array([f"u{u}" for u in range(len(seqs))]),
      sequences=[np.asarray(s, np.int32) for s in seqs],
      item_text=texts or [f"item number {i}" for i in range(n)], item_titles=[""] * n)


def _brute_item_item(seqs, window):
  out = set()
  for s in seqs:
    for i in range(len(s)):
      for j in range(i + 1, min(len(s), i + window + 1)):
        if s[i] != s[j]:
          out.add((min(s[i], s[j]), max(s[i], s[j])))
  return sorted(out)


def test_window_hand_computed():
  got = pairs.item_item_pairs([np.array([0, 1, 2, 3, 4])], window=2).tolist()
  assert got == [[0, 1], [0, 2], [1, 2], [1, 3], [2, 3], [2, 4], [3, 4]]
  # Users are not joined: the last item of one user and the first of the next never pair.
  got = pairs.item_item_pairs([np.array([5, 6]), np.array([7, 8])], window=3).tolist()
  assert got == [[5, 6], [7, 8]]
  # Repeats give no self-pair; reversed duplicates collapse to one canonical row.
  assert pairs.item_item_pairs([np.array([3, 3, 1, 3])], window=1).tolist() == [[1, 3]]


def test_pairs_with_multiplicity():
  # Without dedup every co-occurrence is a row: (0, 1) three times, (1, 2) once.
  seqs = [np.array([0, 1, 0, 1]), np.array([2, 1, 1])]
  got = pairs.item_item_pairs(seqs, window=1, dedup=False).tolist()
  assert got == [[0, 1], [0, 1], [0, 1], [1, 2]]
  assert pairs.item_item_pairs(seqs, window=1).tolist() == [[0, 1], [1, 2]]
  rng = np.random.default_rng(2)
  seqs = [rng.integers(0, 20, size=rng.integers(2, 12)) for _ in range(40)]
  counted = [(min(s[i], s[j]), max(s[i], s[j])) for s in seqs for i in range(len(s))
             for j in range(i + 1, min(len(s), i + 4)) if s[i] != s[j]]
  got = pairs.item_item_pairs(seqs, window=3, dedup=False)
  assert got.dtype == np.int32 and got.tolist() == [list(p) for p in sorted(counted)]


def test_pairs_match_bruteforce_on_train_split():
  rng = np.random.default_rng(0)
  seqs = [rng.integers(0, 40, size=rng.integers(3, 15)) for _ in range(50)]
  split = types.leave_one_out(_dataset(seqs))
  for window in (1, 3):
    got = pairs.item_item_pairs(split.train, window).tolist()
    assert got == [list(p) for p in _brute_item_item([s[:-2] for s in seqs], window)]
  ui = pairs.user_item_pairs(split.train)
  assert ui.dtype == np.int32 and ui.shape[1] == 2
  assert ui.tolist() == [list(p) for p in sorted({(u, int(x)) for u, s in enumerate(seqs)
                                                  for x in s[:-2]})]


def test_no_validation_or_test_interaction_reaches_any_pair_set():
  # Train items are 0..9; user u's validation item is 100+u and test item 200+u, which
  # appear nowhere in any train sequence.
  rng = np.random.default_rng(1)
  seqs = [np.concatenate([rng.choice(10, size=rng.integers(1, 8), replace=False),
                          [100 + u, 200 + u]]) for u in range(30)]
  ds = _dataset(seqs)
  split = types.leave_one_out(ds)
  held_out = set(split.valid.tolist()) | set(split.test.tolist())
  assert held_out == set(range(100, 130)) | set(range(200, 230))
  ii = pairs.item_item_pairs(split.train, window=3)
  ui = pairs.user_item_pairs(split.train)
  assert len(ii) and len(ui)
  assert not held_out & set(ii.ravel().tolist())
  assert not held_out & set(ui[:, 1].tolist())
  # The check has teeth: the same functions on the full sequences do see held-out items.
  assert held_out & set(pairs.item_item_pairs(ds.sequences, window=3).ravel().tolist())
  assert held_out & set(pairs.user_item_pairs(ds.sequences)[:, 1].tolist())
  # Item text is catalogue content, not an interaction: every item with text gets a record,
  # held-out ones included (documented in pairs.py).
  rec = pairs.item_text_records(ds, max_len=16)
  assert set(rec["item"].tolist()) == set(range(ds.num_items))


def test_item_text_records_shapes_and_empty_text():
  ds = _dataset([[0, 1, 2, 3]], texts=["Toy Story (1995). Genres: Comedy.", "", "x " * 200, "b"])
  rec = pairs.item_text_records(ds, max_len=12)
  assert rec["item"].tolist() == [0, 2, 3] and rec["item"].dtype == np.int32
  assert rec["input_ids"].shape == (3, 12) and rec["input_ids"].dtype == np.int32
  assert rec["input_mask"].shape == (3, 12) and rec["input_mask"].dtype == bool
  assert rec["input_mask"][1].all() and rec["input_ids"][1, -1] == 102  # truncated, ends [SEP]
  full = pairs.item_text_records(ds, max_len=12, include_empty=True)
  assert full["item"].tolist() == [0, 1, 2, 3] and full["input_mask"][1].sum() == 2


def test_tokenizer_matches_vocab_file_and_has_dec():
  vocab = (resources.minilm_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines()
  wid = {w: i for i, w in enumerate(vocab)}
  assert tokenization.vocab_size() == len(vocab) + 1 == 30523
  assert tokenization.dec_token_id() == len(vocab) == 30522
  ids, mask = tokenization.encode_batch(["Hello WORLD", "toy story"], max_len=6)
  assert ids.tolist() == [
      [wid["[CLS]"], wid["hello"], wid["world"], wid["[SEP]"], wid["[PAD]"], wid["[PAD]"]],
      [wid["[CLS]"], wid["toy"], wid["story"], wid["[SEP]"], wid["[PAD]"], wid["[PAD]"]]]
  assert mask.tolist() == [[True] * 4 + [False] * 2] * 2
  ids, _ = tokenization.encode_batch(["[DEC] hello"], max_len=4)
  assert ids[0, 1] == 30522  # the added special token is recognised in text
  # The shared tokenizer stays unpadded: fixed-length copies do not leak settings into it.
  assert len(tokenization.text_tokenizer().encode("hello").ids) == 3
  with pytest.raises(ValueError):
    tokenization.encode_batch(["x"], max_len=1)
