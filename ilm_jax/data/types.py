"""The one in-memory representation every dataset source produces.

Items and users get dense internal indices (0..N-1) in the order the source lists
them; raw ids are kept for display and for writing results. Every training set is
derived from ``Split.train`` only (SPEC §1); leakage is a bug.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


class DataError(ValueError):
  """Bad input data. The message names the file, the line and what was expected."""

  def __init__(self, message: str, *, path: str | None = None, line: int | None = None):
    where = ""
    if path is not None:
      where = f"{path}:{line}: " if line is not None else f"{path}: "
    super().__init__(where + message)
    self.path = path
    self.line = line


@dataclasses.dataclass(frozen=True)
class RecDataset:
  """Items (with optional text), users and chronological interaction sequences.

  Attributes:
    name: lower-case dataset name used in results (``ml1m``, ``beauty``, ``generated``...).
    item_ids: str[N] raw item ids (MovieID, ASIN, ...), index = internal item index.
    user_ids: str[U] raw user ids, index = internal user index.
    sequences: U int32 arrays of internal item indices in chronological order.
    item_text: N strings, '' where the item has no text (Clothing has none).
    item_titles: N short display names ('' where unknown); used in prompts and chat.
    item_attrs: named per-item string lists, e.g. {'genres': [['Comedy', ...], ...]}.
    item_tokens: N OpenP5 item tokens ('1001', ...) from random indexing; None -> assign
      with ``sources.ensure_tokens``.
    user_tokens: U OpenP5 user tokens ('1', ...); None -> 1..U in order.
    extras: hidden ground truth a source knows (the generated catalogue's co-consumption
      cluster per item, say); never used for training.
  """

  name: str
  item_ids: np.ndarray
  user_ids: np.ndarray
  sequences: Sequence[np.ndarray]
  item_text: Sequence[str]
  item_titles: Sequence[str]
  item_attrs: dict[str, list[list[str]]] = dataclasses.field(default_factory=dict)
  item_tokens: Sequence[str] | None = None
  user_tokens: Sequence[str] | None = None
  extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  @property
  def num_items(self) -> int:
    return len(self.item_ids)

  @property
  def num_users(self) -> int:
    return len(self.user_ids)

  @property
  def num_interactions(self) -> int:
    return int(sum(len(s) for s in self.sequences))

  def stats(self) -> dict[str, int]:
    return {"users": self.num_users, "items": self.num_items,
            "interactions": self.num_interactions}


@dataclasses.dataclass(frozen=True)
class Split:
  """OpenP5 leave-one-out: last item = test, second-to-last = validation, rest = train.

  Attributes:
    train: U int32 arrays, ``seq[:-2]``.
    valid: int32[U], ``seq[-2]``.
    test: int32[U], ``seq[-1]``.
  """

  train: Sequence[np.ndarray]
  valid: np.ndarray
  test: np.ndarray

  def history(self, split: str) -> Sequence[np.ndarray]:
    """What a model may see when predicting ``split``: train, or train + valid for test."""
    if split == "valid":
      return self.train
    if split == "test":
      return [np.append(t, v).astype(np.int32) for t, v in zip(self.train, self.valid, strict=True)]
    raise ValueError(f"split must be 'valid' or 'test', got {split!r}")

  def targets(self, split: str) -> np.ndarray:
    if split == "valid":
      return self.valid
    if split == "test":
      return self.test
    raise ValueError(f"split must be 'valid' or 'test', got {split!r}")


def leave_one_out(ds: RecDataset) -> Split:
  """Splits every user's sequence; each needs at least 3 interactions."""
  short = [i for i, s in enumerate(ds.sequences) if len(s) < 3]
  if short:
    raise DataError(
        f"{len(short)} users have fewer than 3 interactions (first: user "
        f"{ds.user_ids[short[0]]!r}); leave-one-out needs >= 3. Apply k-core filtering first.")
  train = [np.asarray(s[:-2], np.int32) for s in ds.sequences]
  valid = np.array([s[-2] for s in ds.sequences], np.int32)
  test = np.array([s[-1] for s in ds.sequences], np.int32)
  return Split(train=train, valid=valid, test=test)
