"""Parsers on tiny fixtures in the real formats (tests/fixtures, see make_fixtures.py)."""

import gzip
import logging
import pathlib
import shutil

import numpy as np
import pytest

from ilm_jax import config_lib
from ilm_jax.data import amazon, filtering, movielens, openp5, sources

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
ML = FIXTURES / "ml1m_tiny"
OP = FIXTURES / "openp5_tiny"


def _seq_ids(ds, u):
  return [str(x) for x in ds.item_ids[ds.sequences[u]]]


def _ratings():
  return [tuple(int(x) for x in line.split("::")) for line in
          (ML / "ratings.dat").read_text().splitlines()]


# ----------------------------------------------------------------------------- MovieLens


def test_movielens_ratings_stable_chronological():
  ds = movielens.load_movielens(ML)
  rows = _ratings()
  # Independent reference: Python's sorted() is stable, so ties keep file order.
  for u, uid in enumerate(ds.user_ids):
    mine = [r for r in rows if r[0] == int(uid)]
    expect = [str(r[1]) for r in sorted(mine, key=lambda r: r[3])]
    assert _seq_ids(ds, u) == expect
  # The fixture's same-second tie: file lists movie 3 before movie 2.
  assert _seq_ids(ds, 0) == ["1", "3", "2", "4", "5", "6", "7"]
  assert ds.user_ids.tolist() == [str(u) for u in range(1, 9)]
  # Only rated movies, in movies.dat order (movie 8 is never rated).
  assert ds.item_ids.tolist() == ["1", "2", "3", "4", "5", "6", "7"]
  assert ds.num_interactions == len(rows)


def test_movielens_item_text_latin1_and_tmdb():
  ds = movielens.load_movielens(ML)
  i = {m: k for k, m in enumerate(ds.item_ids)}
  assert ds.item_titles[i["3"]] == "Misérables, Les (1995)"
  assert ds.item_titles[i["6"]] == "Café au Lait (1993)"
  assert ds.item_text[i["1"]] == ("Toy Story (1995). Genres: Animation, Children's, Comedy. "
                                  "Toys come to life — Woody and Buzz.")
  assert ds.item_text[i["3"]] == "Misérables, Les (1995). Genres: Drama, Musical."  # empty overview
  assert ds.item_text[i["4"]].endswith("Genres: Action, Crime, Thriller. A heist goes wrong.")
  assert ds.item_text[i["5"]] == "Sabrina (1995). Genres: Comedy, Romance."  # no TMDB row
  assert ds.item_attrs["genres"][i["2"]] == ["Adventure", "Children's", "Fantasy"]


def test_movielens_derived_files_match_ratings(tmp_path):
  ref = movielens.load_movielens(ML)
  (tmp_path / "derived").mkdir()
  for f in ("movies.dat", "users.dat"):
    shutil.copy(ML / f, tmp_path / f)
  lines = [f"{u} {' '.join(_seq_ids(ref, k))}" for k, u in enumerate(ref.user_ids)]
  with gzip.open(tmp_path / "derived" / movielens.SEQUENCES_FILE, "wt") as f:
    f.write("\n".join(lines) + "\n")
  ds = movielens.load_movielens(tmp_path)
  assert ds.user_ids.tolist() == ref.user_ids.tolist()
  assert [_seq_ids(ds, u) for u in range(ds.num_users)] == [
      _seq_ids(ref, u) for u in range(ref.num_users)]
  assert ds.item_text[0].startswith("Toy Story (1995). Genres:") and "Woody" not in ds.item_text[0]


def test_movielens_pairs_file_keeps_file_order(tmp_path, caplog):
  (tmp_path / "derived").mkdir()
  shutil.copy(ML / "movies.dat", tmp_path / "movies.dat")
  rows = _ratings()
  with gzip.open(tmp_path / "derived" / movielens.PAIRS_FILE, "wt") as f:
    f.write("".join(f"{u}\t{m}\n" for u, m, _, _ in rows))
  with caplog.at_level(logging.WARNING):
    ds = movielens.load_movielens(tmp_path)
  assert "not chronological" in caplog.text
  assert _seq_ids(ds, 0) == [str(r[1]) for r in rows if r[0] == 1]


def test_load_dataset_movielens_5core():
  ds = sources.load_dataset(config_lib.data_config("movielens", dir=str(ML)))
  assert ds.stats() == {"users": 8, "items": 6, "interactions": 7 * 6 + 5}
  assert "7" not in ds.item_ids.tolist()
  assert sorted(int(t) for t in ds.item_tokens) == list(range(1001, 1007))
  assert ds.user_tokens == [str(u) for u in range(1, 9)]


# ----------------------------------------------------------------------------- OpenP5


def test_openp5_folder_matches_files():
  ds = openp5.load_openp5(OP)
  assert ds.name == "openp5_tiny"
  lines = [line.split() for line in (OP / "user_sequence.txt").read_text().splitlines()]
  assert ds.user_ids.tolist() == [p[0] for p in lines]
  assert [_seq_ids(ds, u) for u in range(ds.num_users)] == [p[1:] for p in lines]
  tok = dict(line.split() for line in (OP / "item_random_indexing.txt").read_text().splitlines())
  assert list(ds.item_tokens) == [tok[i] for i in ds.item_ids]
  utok = dict(line.split() for line in (OP / "user_indexing.txt").read_text().splitlines())
  assert list(ds.user_tokens) == [utok[u] for u in ds.user_ids]
  assert ds.item_text == [""] * ds.num_items


def test_openp5_stale_derived_lines_warn(tmp_path, caplog):
  for f in OP.iterdir():
    shutil.copy(f, tmp_path / f.name)
  derived = tmp_path / openp5.DERIVED_FILE
  good = derived.read_text().splitlines()
  # Clothing's defect: users re-appear at the end with sequences that do not match.
  derived.write_text("\n".join(good + ["2 1001 1002", "6 1003"]) + "\n")
  with caplog.at_level(logging.WARNING):
    ds = openp5.load_openp5(tmp_path)
  assert str(derived) in caplog.text and "lines 7-8" in caplog.text
  assert "duplicate users at lines 7-8" in caplog.text
  assert [_seq_ids(ds, u) for u in range(ds.num_users)] == [  # from user_sequence.txt
      p.split()[1:] for p in (OP / "user_sequence.txt").read_text().splitlines()]
  # A mismatch in the middle is named too.
  derived.write_text("\n".join(good[:2] + ["3 1001"] + good[3:]) + "\n")
  assert openp5.validate_derived(derived, good) == [3]
  caplog.clear()
  derived.write_text("\n".join(good) + "\n")
  with caplog.at_level(logging.WARNING):
    openp5.load_openp5(tmp_path)
  assert "disagree" not in caplog.text


def test_openp5_without_index_files(tmp_path):
  shutil.copy(OP / "user_sequence.txt", tmp_path / "user_sequence.txt")
  ds = sources.load_dataset(config_lib.data_config("openp5", dir=str(tmp_path), name="Mine"))
  assert ds.name == "mine"  # results use lower-case dataset names (SPEC §8)
  assert sorted(int(t) for t in ds.item_tokens) == list(range(1001, 1001 + ds.num_items))
  assert ds.user_tokens == [str(i) for i in range(1, ds.num_users + 1)]


def test_load_dataset_openp5_dir_and_item_meta(tmp_path):
  cfg = config_lib.data_config("openp5", dir=str(OP), item_meta=str(OP / "tiny.item"))
  ds = sources.load_dataset(cfg)
  assert ds.name == "openp5_tiny"
  assert ds.stats() == {"users": 6, "items": 6, "interactions": 33}  # B99 dropped
  assert "B99" not in ds.item_ids.tolist()
  i = {m: k for k, m in enumerate(ds.item_ids)}
  assert ds.item_text[i["B01"]] == "Rose Lip Balm. Brand: Acme. Categories: Beauty, Makeup, Lips."
  assert ds.item_text[i["B02"]] == "Night Cream Vanilla. Categories: Beauty, Women's."
  assert ds.item_titles[i["B03"]] == "" and ds.item_text[i["B03"]] == (
      "Brand: Bolt. Categories: Beauty.")
  assert ds.item_text[i["B06"]] == ""  # not in the .item file
  assert ds.item_attrs["categories"][i["B02"]] == ["Beauty", "Women's"]
  tok = dict(line.split() for line in (OP / "item_random_indexing.txt").read_text().splitlines())
  assert list(ds.item_tokens) == [tok[x] for x in ds.item_ids]


def test_amazon_item_file():
  t = amazon.load_amazon_items(OP / "tiny.item")
  assert list(t.index) == ["B01", "B02", "B03", "B04", "B05"]
  assert t.titles[1] == "Night Cream Vanilla"
  assert t.attrs["brand"][0] == ["Acme"] and t.attrs["brand"][1] == []
  assert amazon.parse_token_seq("'A', \"B's\", 'C, D'") == ["A", "B's", "C, D"]


# ----------------------------------------------------------------------------- k-core


def test_kcore_against_bruteforce():
  rng = np.random.default_rng(0)
  seqs = [rng.choice(30, size=rng.integers(1, 12), replace=False) for _ in range(60)]
  for k in (1, 3, 5):
    keep_u, keep_i = filtering.kcore_masks(seqs, 30, k)
    # Reference: remove violators one round at a time with Python sets.
    users, items = set(range(60)), set(range(30))
    while True:
      ic = {i: sum(i in seqs[u] for u in users) for i in items}
      uc = {u: sum(i in items for i in seqs[u]) for u in users}
      bad_i = {i for i, c in ic.items() if c < k}
      bad_u = {u for u, c in uc.items() if c < k}
      if not bad_i and not bad_u:
        break
      items -= bad_i
      users -= bad_u
    assert set(np.flatnonzero(keep_u)) == users
    assert set(np.flatnonzero(keep_i)) == items


def test_kcore_subset_keeps_fields_aligned():
  from ilm_jax.data import generated
  ds = generated.generate(num_items=60, num_users=80, num_clusters=4, min_len=5, max_len=8)
  f = filtering.kcore(ds, 5)
  assert 0 < f.num_items < ds.num_items and 0 < f.num_users < ds.num_users
  old = {x: k for k, x in enumerate(ds.item_ids)}
  for k, x in enumerate(f.item_ids):
    assert f.item_text[k] == ds.item_text[old[x]]
    assert f.extras["cluster"][k] == ds.extras["cluster"][old[x]]
    assert f.item_attrs["genres"][k] == ds.item_attrs["genres"][old[x]]
  counts = np.bincount(np.concatenate(f.sequences), minlength=f.num_items)
  assert counts.min() >= 5 and min(len(s) for s in f.sequences) >= 5


def test_unknown_source_and_name_list_choices():
  with pytest.raises(ValueError, match="valid: generated, movielens, openp5"):
    sources.load_dataset(config_lib.data_config("netflix"))
  with pytest.raises(ValueError, match="ml1m, beauty, clothing"):
    sources.load_dataset(config_lib.data_config("openp5", name="games"))


def test_generated_rejects_keys_that_do_nothing():
  with pytest.raises(ValueError, match="do nothing"):
    sources.load_dataset(config_lib.data_config("generated", dir="/tmp"))


def test_movielens_item_meta_none_drops_tmdb():
  ds = sources.load_dataset(config_lib.data_config("movielens", dir=str(ML), item_meta="none"))
  assert ds.item_text[0] == "Toy Story (1995). Genres: Animation, Children's, Comedy."
