"""OpenP5-format folders: ``user_sequence.txt`` plus optional index files.

Files (space-separated, one record a line, UTF-8):
  user_sequence.txt            ``<raw_user> <raw_item> <raw_item> ...`` chronological
                               (required; for the shared ML1M copy, which lacks it,
                               ``user_sequence.RECONSTRUCTED.txt`` is used with a log line)
  user_indexing.txt            ``<raw_user> <user_token>`` (optional; else '1'..'U')
  item_random_indexing.txt     ``<raw_item> <item_token>`` (optional; OpenP5 random ids 1001...)
  user_sequence_random_indexing.txt
                               derived from the above; never used, only validated: a line
                               that disagrees (e.g. Clothing's 20 stale duplicate users at
                               lines 39,388-39,407) gets a warning naming the lines, and the
                               sequences come from user_sequence.txt + item_random_indexing.txt.

Users keep file order; items are indexed by first appearance in the sequence file.
Item text is not part of the format (see ``sources.attach_item_meta``).
"""

from __future__ import annotations

import logging
import pathlib

import numpy as np

from ilm_jax.data import fileio
from ilm_jax.data.types import DataError, RecDataset

SEQUENCE_FILE = "user_sequence.txt"
RECONSTRUCTED_FILE = "user_sequence.RECONSTRUCTED.txt"
USER_INDEX_FILE = "user_indexing.txt"
ITEM_INDEX_FILE = "item_random_indexing.txt"
DERIVED_FILE = "user_sequence_random_indexing.txt"

log = logging.getLogger(__name__)


def _ranges(lines: list[int]) -> str:
  """[3, 4, 5, 9] -> '3-5, 9'."""
  out, start, prev = [], None, None
  for n in [*lines, None]:
    if start is not None and (n is None or n != prev + 1):
      out.append(f"{start}-{prev}" if prev != start else f"{start}")
      start = None
    if n is not None and start is None:
      start = n
    prev = n
  return ", ".join(out)


def read_sequences(path: pathlib.Path) -> tuple[list[str], list[list[str]]]:
  """Parses ``<user> <item> ...`` lines into (raw user ids, raw item id lists)."""
  users, seqs, seen = [], [], {}
  for n, line in enumerate(fileio.read_lines(path, "lines '<user_id> <item_id> <item_id> ...'"),
                           1):
    parts = line.split()
    if len(parts) < 2:
      raise DataError(f"expected '<user_id> <item_id> [<item_id> ...]' (a user and at least "
                      f"one item), got {line[:80]!r}", path=str(path), line=n)
    if parts[0] in seen:
      raise DataError(f"user {parts[0]!r} appears twice (first on line {seen[parts[0]]})",
                      path=str(path), line=n)
    seen[parts[0]] = n
    users.append(parts[0])
    seqs.append(parts[1:])
  return users, seqs


def read_index(path: pathlib.Path) -> dict[str, str]:
  """Parses ``<raw_id> <token>`` lines; duplicate ids or tokens are errors."""
  index, lines_of_token, line_of_id = {}, {}, {}
  for n, line in enumerate(fileio.read_lines(path, "lines '<raw_id> <token>'"), 1):
    parts = line.split()
    if len(parts) != 2:
      raise DataError(f"expected 2 space-separated fields '<raw_id> <token>', got {len(parts)}: "
                      f"{line[:80]!r}", path=str(path), line=n)
    raw, tok = parts
    if raw in line_of_id:
      raise DataError(f"id {raw!r} appears twice (first on line {line_of_id[raw]})",
                      path=str(path), line=n)
    if tok in lines_of_token:
      raise DataError(f"token {tok!r} appears twice (first on line {lines_of_token[tok]})",
                      path=str(path), line=n)
    line_of_id[raw], lines_of_token[tok] = n, n
    index[raw] = tok
  return index


def _check_cover(index: dict[str, str], index_path: pathlib.Path, used: dict[str, int],
                 seq_path: pathlib.Path, kind: str) -> None:
  """Every id used in the sequences is in the index, and the index has no extra ids."""
  for raw, line in used.items():
    if raw not in index:
      raise DataError(f"{kind} {raw!r} is not in {index_path.name} (unknown id)",
                      path=str(seq_path), line=line)
  if len(index) != len(used):
    extra = next(r for r in index if r not in used)
    raise DataError(f"lists {len(index)} {kind}s but {seq_path.name} uses {len(used)} (e.g. "
                    f"{extra!r} is never used): is {seq_path.name} truncated or from another "
                    f"dataset?", path=str(index_path))


def validate_derived(path: pathlib.Path, expected: list[str]) -> list[int]:
  """Compares ``user_sequence_random_indexing.txt`` with the regenerated lines.

  Args:
    path: the derived file.
    expected: the lines it should hold, '<user_token> <item_token> ...'.

  Returns:
    1-based numbers of the lines that are wrong (mismatched, duplicate user or extra);
    empty when the file is exact. A warning names the file and the lines.
  """
  lines = fileio.read_lines(path, "lines '<user_token> <item_token> ...'")
  bad, first_line_of_user, dups = [], {}, []
  for n, line in enumerate(lines, 1):
    parts = line.split()
    user = parts[0] if parts else ""
    if user in first_line_of_user:
      dups.append(n)
    else:
      first_line_of_user[user] = n
    if n > len(expected) or " ".join(parts) != expected[n - 1]:
      bad.append(n)
  if len(lines) < len(expected):
    bad.extend(range(len(lines) + 1, len(expected) + 1))
  if bad:
    log.warning(
        "%s: %d line(s) disagree with %s + %s (lines %s%s; %d lines, expected %d). Ignoring "
        "the file and regenerating it from user_sequence.txt and the index files.",
        path, len(bad), SEQUENCE_FILE, ITEM_INDEX_FILE, _ranges(bad),
        f"; duplicate users at lines {_ranges(dups)}" if dups else "", len(lines),
        len(expected))
  return bad


def load_openp5(directory: pathlib.Path | str, name: str | None = None) -> RecDataset:
  """Loads an OpenP5-format folder.

  Args:
    directory: the folder (see the module docstring for its files).
    name: dataset name for results; default the lower-cased folder name.

  Returns:
    A RecDataset without item text, with item_tokens / user_tokens from the index files
    when present (None otherwise). Not k-core filtered.

  Raises:
    DataError: a missing, empty, malformed or inconsistent file (names file and line).
  """
  d = pathlib.Path(directory)
  if not d.is_dir():
    raise DataError("OpenP5 dataset folder not found", path=str(d))
  seq_path = d / SEQUENCE_FILE
  if not seq_path.exists() and (d / RECONSTRUCTED_FILE).exists():
    seq_path = d / RECONSTRUCTED_FILE
    log.warning("%s: %s is absent; using %s (a reconstruction whose same-timestamp order "
                "differs from OpenP5's file; see shared/data/README.md)", d, SEQUENCE_FILE,
                RECONSTRUCTED_FILE)
  raw_users, raw_seqs = read_sequences(seq_path)

  item_index: dict[str, int] = {}
  first_line: dict[str, int] = {}
  sequences = []
  for n, seq in enumerate(raw_seqs, 1):
    for it in seq:
      if it not in item_index:
        item_index[it] = len(item_index)
        first_line[it] = n
    sequences.append(np.fromiter((item_index[it] for it in seq), np.int32, count=len(seq)))
  item_ids = np.array(list(item_index))

  user_tokens = item_tokens = None
  if (d / USER_INDEX_FILE).exists():
    uindex = read_index(d / USER_INDEX_FILE)
    _check_cover(uindex, d / USER_INDEX_FILE, {u: n for n, u in enumerate(raw_users, 1)},
                 seq_path, "user")
    user_tokens = [uindex[u] for u in raw_users]
  if (d / ITEM_INDEX_FILE).exists():
    iindex = read_index(d / ITEM_INDEX_FILE)
    _check_cover(iindex, d / ITEM_INDEX_FILE, first_line, seq_path, "item")
    item_tokens = [iindex[i] for i in item_ids]
    if (d / DERIVED_FILE).exists():
      utoks = user_tokens or [str(i + 1) for i in range(len(raw_users))]
      tok = np.array(item_tokens)
      expected = [f"{u} {' '.join(tok[s])}" for u, s in zip(utoks, sequences, strict=True)]
      validate_derived(d / DERIVED_FILE, expected)

  n_items = len(item_ids)
  return RecDataset(
      name=(name or d.name).lower(),
      item_ids=item_ids,
      user_ids=np.array(raw_users),
      sequences=sequences,
      item_text=[""] * n_items,
      item_titles=[""] * n_items,
      item_tokens=item_tokens,
      user_tokens=user_tokens,
  )
