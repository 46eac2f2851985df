"""Derived training sets for Phase 1: item-text records, item-item and user-item pairs.

Leakage rule (SPEC §1): interaction-derived sets (item-item, user-item) take ``Split.train``
only, never ``RecDataset.sequences``; a validation/test interaction reaches none of them.
Item-text records cover every item that has text, held-out ones included: an item's text
is catalogue content, not an interaction, and the recommender must be able to read any
item it ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tokenizers

from ilm_jax.data import filtering, tokenization
from ilm_jax.data.types import RecDataset


def item_text_records(ds: RecDataset, tokenizer: tokenizers.Tokenizer | None = None,
                      max_len: int = 64, include_empty: bool = False) -> dict[str, np.ndarray]:
  """One tokenised text record per item.

  Args:
    ds: the dataset.
    tokenizer: default ``tokenization.text_tokenizer()`` (MiniLM + [DEC]).
    max_len: L, static token length.
    include_empty: also emit items whose text is '' (just [CLS] [SEP]); off by default
      because an empty text teaches ITC/ITG nothing (Clothing has no text at all).

  Returns:
    {'item': int32[R] item index, 'input_ids': int32[R, L], 'input_mask': bool[R, L]},
    rows in item order.
  """
  items = np.array([i for i, t in enumerate(ds.item_text) if include_empty or t.strip()],
                   np.int32)
  ids, mask = tokenization.encode_batch([ds.item_text[i] for i in items], max_len, tokenizer)
  return {"item": items, "input_ids": ids.reshape(len(items), max_len),
          "input_mask": mask.reshape(len(items), max_len)}


def item_item_pairs(train_seqs: Sequence[np.ndarray], window: int = 3,
                    dedup: bool = True) -> np.ndarray:
  """Items consumed within ``window`` steps of each other in one user's train sequence.

  Args:
    train_seqs: ``Split.train`` (U int arrays of item indices).
    window: positions t and t+d with 1 <= d <= window form a pair.
    dedup: keep each distinct pair once (True), or once per co-occurrence (False), so that
      sampling follows how often items are consumed together.

  Returns:
    int32[P, 2], canonical (a < b; self-pairs from repeats dropped), sorted
    lexicographically. Pipelines emit both directions through the symmetric II loss, and
    shuffle.
  """
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  users, items = filtering.flatten(train_seqs)
  chunks = [np.zeros((0, 2), np.int32)]
  for d in range(1, window + 1):
    same_user = users[d:] == users[:-d]
    a, b = items[:-d][same_user], items[d:][same_user]
    chunks.append(np.stack([np.minimum(a, b), np.maximum(a, b)], 1))
  pairs = np.concatenate(chunks)
  pairs = pairs[pairs[:, 0] != pairs[:, 1]]
  if dedup:
    return _unique_rows(pairs)
  return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))].astype(np.int32)


def user_item_pairs(train_seqs: Sequence[np.ndarray]) -> np.ndarray:
  """(user, item) for every train interaction.

  Args:
    train_seqs: ``Split.train``.

  Returns:
    int32[P, 2] (user index, item index), deduplicated, sorted by user then item.
  """
  users, items = filtering.flatten(train_seqs)
  return _unique_rows(np.stack([users, items], 1))


def _unique_rows(pairs: np.ndarray) -> np.ndarray:
  """Sorted unique rows of non-negative int[P, 2] (1-D keys: much faster than axis=0)."""
  pairs = pairs.astype(np.int64).reshape(-1, 2)
  base = int(pairs[:, 1].max()) + 1 if len(pairs) else 1
  keys = np.unique(pairs[:, 0] * base + pairs[:, 1])
  return np.stack([keys // base, keys % base], 1).astype(np.int32)
