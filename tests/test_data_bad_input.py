"""Bad input -> one DataError naming the file, the line and what was expected (issue 2 part 7).

Every case copies a tiny real-format fixture to tmp_path and breaks one thing.
"""

import gzip
import pathlib
import shutil

import pytest

from ilm_jax import config_lib
from ilm_jax.data import amazon, movielens, openp5, sources
from ilm_jax.data.types import DataError

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture
def op(tmp_path):
  d = tmp_path / "op"
  shutil.copytree(FIXTURES / "openp5_tiny", d)
  return d


@pytest.fixture
def ml(tmp_path):
  d = tmp_path / "ml"
  shutil.copytree(FIXTURES / "ml1m_tiny", d)
  return d


def _edit(path, line_no, new):
  """Replaces 1-based line ``line_no`` (None = append) in a text file."""
  lines = path.read_text(encoding="utf-8").splitlines()
  if line_no is None:
    lines.append(new)
  else:
    lines[line_no - 1] = new
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _raises(fn, path, line, *words):
  with pytest.raises(DataError) as e:
    fn()
  err = e.value
  assert err.path == str(path), str(err)
  assert err.line == line, str(err)
  msg = str(err)
  assert msg.startswith(f"{path}:{line}: " if line else f"{path}: "), msg
  for w in words:
    assert w in msg, msg
  return msg


# ----------------------------------------------------------------------------- OpenP5


def test_openp5_malformed_line(op):
  seq = op / "user_sequence.txt"
  _edit(seq, 3, "AU3")
  _raises(lambda: openp5.load_openp5(op), seq, 3, "<user_id> <item_id>", "'AU3'")


def test_openp5_duplicate_user(op):
  seq = op / "user_sequence.txt"
  _edit(seq, 4, "AU2 B01 B02")
  _raises(lambda: openp5.load_openp5(op), seq, 4, "'AU2' appears twice", "line 2")


def test_openp5_unknown_item_id(op):
  seq = op / "user_sequence.txt"
  _edit(seq, 5, "AU5 B02 B04 BNEW B01 B03")
  _raises(lambda: openp5.load_openp5(op), seq, 5, "'BNEW'", "item_random_indexing.txt",
          "unknown id")


def test_openp5_unknown_user_id(op):
  _edit(op / "user_indexing.txt", 6, "AUX 6")
  _raises(lambda: openp5.load_openp5(op), op / "user_sequence.txt", 6, "'AU6'",
          "user_indexing.txt")


def test_openp5_index_wrong_field_count_and_duplicate_token(op):
  idx = op / "item_random_indexing.txt"
  _edit(idx, 2, "B02 1001 extra")
  _raises(lambda: openp5.load_openp5(op), idx, 2, "2 space-separated fields")
  _edit(idx, 2, "B02 1002")  # B01 already has 1002
  _raises(lambda: openp5.load_openp5(op), idx, 2, "token '1002' appears twice", "line 1")


def test_openp5_truncated_sequence_file(op):
  seq = op / "user_sequence.txt"
  seq.write_text("".join(seq.read_text().splitlines(keepends=True)[:4]))
  _raises(lambda: openp5.load_openp5(op), op / "user_indexing.txt", None, "lists 6 users",
          "uses 4", "truncated")


def test_openp5_empty_and_missing_files(op, tmp_path):
  seq = op / "user_sequence.txt"
  seq.write_text("\n")
  _raises(lambda: openp5.load_openp5(op), seq, None, "empty", "<user_id> <item_id>")
  (tmp_path / "nothing").mkdir()
  _raises(lambda: openp5.load_openp5(tmp_path / "nothing"),
          tmp_path / "nothing" / "user_sequence.txt", None, "not found")
  _raises(lambda: openp5.load_openp5(tmp_path / "absent"), tmp_path / "absent", None,
          "not found")


def test_openp5_invalid_utf8(op):
  seq = op / "user_sequence.txt"
  data = seq.read_bytes().split(b"\n")
  data[2] = data[2].replace(b"B06", b"B\xe906")  # Latin-1 'é' in a UTF-8 file
  seq.write_bytes(b"\n".join(data))
  _raises(lambda: openp5.load_openp5(op), seq, 3, "not valid utf-8", "\\xe9")


# ----------------------------------------------------------------------------- MovieLens


def test_ratings_malformed_truncated_and_non_integer(ml):
  r = ml / "ratings.dat"
  good = r.read_text()
  _edit(r, 5, "1::7::1")
  _raises(lambda: movielens.load_movielens(ml), r, 5, "UserID::MovieID::Rating::Timestamp",
          "'1::7::1'")
  r.write_text(good)
  _edit(r, 9, "2::x::3::978302000")
  _raises(lambda: movielens.load_movielens(ml), r, 9, "'2::x::3::978302000'")
  r.write_text(good[:-12])  # cut mid-line, as a truncated download would be
  n = good[:-12].count("\n") + 1
  _raises(lambda: movielens.load_movielens(ml), r, n, "UserID::MovieID::Rating::Timestamp")


def test_ratings_unknown_movie_and_user(ml):
  r = ml / "ratings.dat"
  n = len(r.read_text().splitlines())
  _edit(r, None, "3::99::4::978303100")
  _raises(lambda: movielens.load_movielens(ml), r, n + 1, "MovieID 99", "movies.dat",
          "unknown id")
  _edit(r, n + 1, "42::1::4::978303100")
  _raises(lambda: movielens.load_movielens(ml), r, n + 1, "UserID 42", "users.dat")
  # The derived sequence file names its line too.
  r.unlink()
  (ml / movielens.SEQUENCES_FILE).write_bytes(gzip.compress(b"1 1 2 3\n2 3 77 1\n"))
  _raises(lambda: movielens.load_movielens(ml), ml / movielens.SEQUENCES_FILE, 2, "MovieID 77")


def test_movies_dat_malformed_and_is_latin1(ml):
  m = ml / "movies.dat"
  lines = m.read_bytes().split(b"\n")
  assert b"\xe9" in lines[2]  # the fixture really is ISO-8859-1, invalid as UTF-8
  with pytest.raises(UnicodeDecodeError):
    lines[2].decode("utf-8")
  lines[4] = b"5::Sabrina (1995)"
  m.write_bytes(b"\n".join(lines))
  _raises(lambda: movielens.load_movielens(ml), m, 5, "MovieID::Title (Year)::Genre|Genre")


def test_tmdb_missing_column_and_bad_row(ml):
  t = ml / "extra" / "movies_tmdb_overview.tsv"
  _edit(t, 1, "MovieID\ttmdb_id\ttmdb_title\ttmdb_release_date\tplot")
  _raises(lambda: movielens.load_movielens(ml), t, 1, "overview")
  _edit(t, 1, "MovieID\ttmdb_id\ttmdb_title\ttmdb_release_date\toverview")
  _edit(t, 3, "3\t1\tLes Misérables")
  _raises(lambda: movielens.load_movielens(ml), t, 3, "expected 5 TAB-separated fields", "got 3")


def test_truncated_gzip_derived_file(ml):
  (ml / "ratings.dat").unlink()
  (ml / "derived").mkdir()
  p = ml / "derived" / movielens.SEQUENCES_FILE
  blob = gzip.compress(b"".join(b"%d 1 2 3 4 5 6\n" % u for u in range(1, 9)) * 50)
  p.write_bytes(blob[: len(blob) // 2])
  _raises(lambda: movielens.load_movielens(ml), p, None, "truncated")


def test_no_interaction_file(ml):
  (ml / "ratings.dat").unlink()
  _raises(lambda: movielens.load_movielens(ml), ml, None, "ratings.dat",
          movielens.SEQUENCES_FILE)


# ----------------------------------------------------------------------------- Amazon


def test_amazon_missing_column(op):
  p = op / "tiny.item"
  text = p.read_text().replace("title:token", "name:token", 1)
  p.write_text(text)
  _raises(lambda: amazon.load_amazon_items(p), p, 1, "title:token")


def test_amazon_bad_record_line_counts_quoted_newline(op):
  p = op / "tiny.item"
  lines = p.read_text().splitlines()
  # Physical lines: 1 header, 2 B01, 3-4 B02 (quoted newline), 5 B03, 6 B04, 7 B05.
  lines[5] = "B04\tShampoo\tBeauty"
  p.write_text("\n".join(lines) + "\n")
  _raises(lambda: amazon.load_amazon_items(p), p, 6, "expected 7 TAB-separated fields", "got 3")


def test_amazon_duplicate_id_and_bad_bytes(op):
  p = op / "tiny.item"
  good = p.read_bytes()
  p.write_bytes(good + b"B01\tAgain\t\t\t'Beauty'\t\t\n")
  _raises(lambda: amazon.load_amazon_items(p), p, 8, "'B01' appears twice", "line 2")
  p.write_bytes(good.replace(b"Shampoo", b"Sham\xffpoo"))
  _raises(lambda: amazon.load_amazon_items(p), p, 6, "not valid utf-8")


def test_item_meta_unknown_format(op, tmp_path):
  bad = tmp_path / "meta.json"
  bad.write_text("{}")
  cfg = config_lib.data_config("openp5", dir=str(op), item_meta=str(bad))
  _raises(lambda: sources.load_dataset(cfg), bad, None, ".item", "movies.dat")
