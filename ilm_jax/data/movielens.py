"""MovieLens-1M raw files (GroupLens ``ml-1m.zip`` layout) and the derived copies.

Interactions, first found wins:
  ratings.dat            ``UserID::MovieID::Rating::Timestamp``; each user's items sorted by
                         timestamp with a stable sort (same-second ties keep file order).
  derived/user_sequences_chrono.txt.gz
                         ``UserID MovieID ...`` already chronological, one user a line (the
                         shared copy, which has no ratings.dat).
  derived/ratings_pairs_fileorder.tsv.gz
                         ``UserID<TAB>MovieID`` in ratings.dat line order; NOT chronological
                         (a warning says so).
Item text: ``movies.dat`` (``MovieID::Title (Year)::Genre|Genre``, ISO-8859-1, required) and,
when found, the TMDB overview TSV (``MovieID<TAB>tmdb_id<TAB>tmdb_title<TAB>
tmdb_release_date<TAB>overview``, UTF-8, header row) in ``extra/`` or beside movies.dat.
Text = "Title (Year). Genres: A, B. <overview>"; title = "Title (Year)"; attrs 'genres'.
``users.dat`` (``UserID::Gender::Age::Occupation::Zip``), when present, must list every user.

Users keep order of first appearance; items follow movies.dat order (rated movies only).
"""

from __future__ import annotations

import logging
import pathlib

import numpy as np

from ilm_jax.data import fileio
from ilm_jax.data.types import DataError, RecDataset

TMDB_FILE = "movies_tmdb_overview.tsv"
SEQUENCES_FILE = "user_sequences_chrono.txt.gz"
PAIRS_FILE = "ratings_pairs_fileorder.tsv.gz"
TMDB_COLUMNS = ("MovieID", "overview")

log = logging.getLogger(__name__)


def find_tmdb(directory: pathlib.Path) -> pathlib.Path | None:
  """The TMDB overview TSV in ``directory/extra`` or ``directory``, if any."""
  for p in (directory / "extra" / TMDB_FILE, directory / TMDB_FILE):
    if p.exists():
      return p
  return None


def _find(directory: pathlib.Path, name: str) -> pathlib.Path | None:
  for p in (directory / name, directory / "derived" / name):
    if p.exists():
      return p
  return None


def _is_int64(s: str) -> bool:
  """An ASCII decimal integer that fits int64 (``'²'.isdigit()`` is True, ``int('²')`` fails)."""
  s = s.strip()
  digits = s[1:] if s.startswith("-") else s
  return digits.isascii() and digits.isdigit() and -2**63 <= int(s) < 2**63


def load_tmdb(path: pathlib.Path | str) -> dict[str, str]:
  """MovieID -> overview ('' where TMDB had none) from the TMDB TSV."""
  path = pathlib.Path(path)
  lines = fileio.read_lines(path, "a TSV with header MovieID, tmdb_id, tmdb_title, "
                                  "tmdb_release_date, overview")
  header = lines[0].split("\t")
  missing = [c for c in TMDB_COLUMNS if c not in header]
  if missing:
    raise DataError(f"header lacks column(s) {', '.join(missing)}; found {header}",
                    path=str(path), line=1)
  c_id, c_ov = header.index("MovieID"), header.index("overview")
  out = {}
  for n, line in enumerate(lines[1:], 2):
    fields = line.split("\t")
    if len(fields) != len(header):
      raise DataError(f"expected {len(header)} TAB-separated fields ({', '.join(header)}), got "
                      f"{len(fields)}", path=str(path), line=n)
    if not fields[c_id].strip().isdigit():
      raise DataError(f"MovieID must be an integer, got {fields[c_id]!r}", path=str(path), line=n)
    out[fields[c_id].strip()] = " ".join(fields[c_ov].split())
  return out


def load_movie_meta(path: pathlib.Path | str,
                    tmdb: pathlib.Path | str | None = None) -> fileio.ItemTable:
  """Reads ``movies.dat`` (ISO-8859-1) and, optionally, the TMDB overviews.

  Args:
    path: movies.dat.
    tmdb: the TMDB overview TSV, or None.

  Returns:
    An ItemTable keyed by MovieID (a string), in file order, with attrs 'genres'.
  """
  path = pathlib.Path(path)
  # ISO-8859-1 as GroupLens ships it: e.g. b'Mis\xe9rables' is not valid UTF-8.
  lines = fileio.read_lines(path, "lines 'MovieID::Title (Year)::Genre|Genre'", "iso-8859-1")
  overviews = load_tmdb(tmdb) if tmdb is not None else {}
  index, text, titles, genres = {}, [], [], []
  for n, line in enumerate(lines, 1):
    fields = line.split("::")
    if len(fields) != 3 or not fields[0].strip().isdigit() or not _is_int64(fields[0]):
      raise DataError(f"expected 'MovieID::Title (Year)::Genre|Genre', got {line[:80]!r}",
                      path=str(path), line=n)
    mid, title = fields[0].strip(), fields[1].strip()
    if mid in index:
      raise DataError(f"MovieID {mid} appears twice (first on line {index[mid] + 1})",
                      path=str(path), line=n)
    g = [x for x in fields[2].strip().split("|") if x]
    body = f"{title}. Genres: {', '.join(g)}." if g else f"{title}."
    if overviews.get(mid):
      body += " " + overviews[mid]
    index[mid] = len(text)
    text.append(body)
    titles.append(title)
    genres.append(g)
  return fileio.ItemTable(index=index, text=text, titles=titles, attrs={"genres": genres})


def _bad_line(path, lines, sep: str, nfields: int, what: str):
  """Finds the first malformed line after a fast parse failed and raises for it."""
  for n, line in enumerate(lines, 1):
    fields = line.split(sep)
    if len(fields) != nfields or not all(_is_int64(f) for f in fields):
      raise DataError(f"expected {what}, got {line[:80]!r}", path=str(path), line=n)
  raise DataError(f"could not parse; expected {what}", path=str(path))


def _int_table(path: pathlib.Path, sep: str, nfields: int, what: str) -> np.ndarray:
  """Parses lines of ``nfields`` integers joined by ``sep`` -> int64[L, nfields], fast."""
  text = fileio.read_text(path, what, "ascii" if path.suffix != ".gz" else "utf-8")
  lines = text.split("\n")
  if lines[-1] == "":
    lines.pop()
  flat = text.replace(sep, " ").split()
  try:
    if len(flat) != nfields * len(lines):
      raise ValueError
    return np.array(flat, dtype=np.int64).reshape(-1, nfields)
  except (ValueError, OverflowError):
    _bad_line(path, lines, sep, nfields, what)
    raise  # unreachable: _bad_line raises


def _sequences_from_pairs(users: np.ndarray, items: np.ndarray, order: np.ndarray):
  """Groups interactions by user; within a user they follow ``order`` (a permutation).

  Returns (user ids int64[U] by first appearance in file order, U item-id arrays).
  """
  uniq, first, inv = np.unique(users, return_index=True, return_inverse=True)
  by_first = np.argsort(first, kind="stable")
  rank = np.empty(len(uniq), np.int64)
  rank[by_first] = np.arange(len(uniq))
  user_rank = rank[inv]
  grouped = order[np.argsort(user_rank[order], kind="stable")]
  counts = np.bincount(user_rank, minlength=len(uniq))
  return uniq[by_first], np.split(items[grouped], np.cumsum(counts)[:-1])


def load_movielens(directory: pathlib.Path | str, name: str = "ml1m",
                   tmdb: pathlib.Path | str | None = None, use_tmdb: bool = True) -> RecDataset:
  """Loads MovieLens-1M from its raw or derived files.

  Args:
    directory: folder with movies.dat and ratings.dat (or the derived files, directly or
      under ``derived/``).
    name: dataset name for results.
    tmdb: the TMDB overview TSV; None = look for it (see ``find_tmdb``).
    use_tmdb: False = titles and genres only (the paper-faithful ML1M text).

  Returns:
    A RecDataset of every rated movie with text from movies.dat (+ TMDB); not k-core
    filtered (5-core gives 6,040 users / 3,416 items / 999,611 interactions).

  Raises:
    DataError: missing, empty, malformed files or ids missing from movies.dat/users.dat.
  """
  d = pathlib.Path(directory)
  if not d.is_dir():
    raise DataError("MovieLens folder not found", path=str(d))
  movies = d / "movies.dat"
  if use_tmdb and tmdb is None:
    tmdb = find_tmdb(d)
  table = load_movie_meta(movies, tmdb if use_tmdb else None)

  ratings = d / "ratings.dat"
  if ratings.exists():
    src = ratings
    arr = _int_table(ratings, "::", 4, "'UserID::MovieID::Rating::Timestamp'")
    users, items, ts = arr[:, 0], arr[:, 1], arr[:, 3]
    # Stable: same-second ratings keep ratings.dat order.
    user_order, seqs = _sequences_from_pairs(users, items, np.argsort(ts, kind="stable"))
    lines = np.arange(1, len(arr) + 1)
  elif (p := _find(d, SEQUENCES_FILE)) is not None:
    src = p
    user_order, seqs, line_of_user = [], [], {}
    for n, line in enumerate(fileio.read_lines(p, "lines 'UserID MovieID MovieID ...'"), 1):
      try:
        row = np.array(line.split(), dtype=np.int64)
      except (ValueError, OverflowError):
        row = np.zeros(0, np.int64)
      if len(row) < 2:
        raise DataError(f"expected 'UserID MovieID [MovieID ...]' integers, got {line[:80]!r}",
                        path=str(p), line=n)
      if row[0] in line_of_user:
        raise DataError(f"UserID {row[0]} appears twice (first on line {line_of_user[row[0]]})",
                        path=str(p), line=n)
      line_of_user[row[0]] = n
      user_order.append(row[0])
      seqs.append(row[1:])
    user_order = np.array(user_order)
    lengths = [len(x) for x in seqs]
    users = np.repeat(user_order, lengths)
    items = np.concatenate(seqs)
    lines = np.repeat(np.arange(1, len(seqs) + 1), lengths)
  elif (p := _find(d, PAIRS_FILE)) is not None:
    src = p
    log.warning("%s: no ratings.dat or %s; using %s, whose per-user order is file order, not "
                "chronological", d, SEQUENCES_FILE, p.name)
    arr = _int_table(p, "\t", 2, "'UserID<TAB>MovieID'")
    users, items, lines = arr[:, 0], arr[:, 1], np.arange(1, len(arr) + 1)
    user_order, seqs = _sequences_from_pairs(users, items, np.arange(len(arr)))
  else:
    raise DataError(f"no interactions: expected ratings.dat, {SEQUENCES_FILE} or {PAIRS_FILE} "
                    "(directly or under derived/)", path=str(d))

  # Items: movies.dat order, rated movies only; an unknown MovieID is an error.
  movie_ids = np.array([int(m) for m in table.index], np.int64)
  rated = np.unique(items)
  _check_known(items, movie_ids, lines, src, "MovieID", movies)
  keep = np.isin(movie_ids, rated)
  item_ids = movie_ids[keep]
  # Sorted search, not a dense MovieID-indexed table: ids may be huge.
  by_id = np.argsort(item_ids)
  sequences = [by_id[np.searchsorted(item_ids, s, sorter=by_id)].astype(np.int32) for s in seqs]

  users_dat = d / "users.dat"
  if users_dat.exists():
    _check_known(users, _user_ids(users_dat), lines, src, "UserID", users_dat)

  rows = [table.index[str(m)] for m in item_ids]
  return RecDataset(
      name=name,
      item_ids=np.array([str(m) for m in item_ids]),
      user_ids=np.array([str(u) for u in user_order]),
      sequences=sequences,
      item_text=[table.text[r] for r in rows],
      item_titles=[table.titles[r] for r in rows],
      item_attrs={k: [list(v[r]) for r in rows] for k, v in table.attrs.items()},
  )


def _check_known(ids: np.ndarray, known: np.ndarray, lines: np.ndarray, src: pathlib.Path,
                 kind: str, index_file: pathlib.Path) -> None:
  """Raises for the first line of ``src`` whose id is missing from ``index_file``."""
  bad = np.flatnonzero(~np.isin(ids, known))
  if len(bad):
    others = len(np.unique(ids[bad])) - 1
    raise DataError(f"{kind} {ids[bad[0]]} is not in {index_file} (unknown id"
                    + (f"; {others} other unknown {kind}s)" if others else ")"),
                    path=str(src), line=int(lines[bad[0]]))


def _user_ids(path: pathlib.Path) -> np.ndarray:
  """UserIDs from users.dat (other fields are not integers, so parse the first only)."""
  out = []
  for n, line in enumerate(fileio.read_lines(path, "lines 'UserID::Gender::Age::Occupation::Zip'",
                                             "iso-8859-1"), 1):
    fields = line.split("::")
    if len(fields) != 5 or not _is_int64(fields[0]) or fields[0] != fields[0].strip():
      raise DataError(f"expected 'UserID::Gender::Age::Occupation::Zip-code', got {line[:80]!r}",
                      path=str(path), line=n)
    out.append(int(fields[0]))
  return np.array(out, np.int64)
