"""Fetching raw data: a local HTTP server on 127.0.0.1 and file URLs; never the network."""

from __future__ import annotations

import hashlib
import http.server
import io
import pathlib
import threading
import zipfile

import numpy as np
import pytest

from ilm_jax import config_lib
from ilm_jax.data import download, store
from ilm_jax.data.types import DataError

# A miniature ml-1m.zip in GroupLens' layout and formats (movies.dat is ISO-8859-1).
RATINGS = """1::10::5::978300760
1::20::3::978300100
1::30::4::978300500
2::20::4::978200000
2::10::2::978200001
2::40::5::978200002
3::30::1::978100000
3::10::5::978100003
3::20::4::978100002
"""
MOVIES = "10::Toy Story (1995)::Animation|Children's|Comedy\n20::Heat (1995)::Action|Crime\n" \
         "30::Amélie (2001)::Comedy|Romance\n40::Sabrina (1995)::Comedy|Romance\n" \
         "50::Unrated (1999)::Drama\n"
USERS = "1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n"


def _ml1m_zip() -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    z.writestr("ml-1m/ratings.dat", RATINGS)
    z.writestr("ml-1m/movies.dat", MOVIES.encode("iso-8859-1"))
    z.writestr("ml-1m/users.dat", USERS)
    z.writestr("ml-1m/README", "tiny\n")
  return buf.getvalue()


class _Server:
  """Serves ``files`` (name -> bytes) on 127.0.0.1; '/short/<name>' lies about its length."""

  def __init__(self, files: dict[str, bytes]):
    self.files = files
    self.requests: list[str] = []
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def do_GET(self):  # noqa: N802  (http.server's name)
        outer.requests.append(self.path)
        name = self.path.rsplit("/", 1)[-1]
        body = outer.files.get(name)
        if body is None:
          self.send_error(404)
          return
        self.send_response(200)
        short = self.path.startswith("/short/")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 2] if short else body)

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server():
  with _Server({"ml-1m.zip": _ml1m_zip(), "junk.zip": b"not a zip at all"}) as s:
    yield s


def _expected(data: bytes) -> download.Expected:
  return download.Expected(len(data), hashlib.sha256(data).hexdigest())


def _no_partials(d: pathlib.Path) -> None:
  assert not [p for p in d.rglob("*") if ".part-" in p.name or ".tmp-" in p.name]


def test_http_download_verifies_extracts_and_is_reused(server, tmp_path, caplog):
  import logging  # noqa: PLC0415
  url = f"{server.url}/ml-1m.zip"
  with caplog.at_level(logging.INFO):
    folder = download.fetch_dataset(url, tmp_path, expected=_expected(_ml1m_zip()))
  assert any(f"fetching {url}" in r.getMessage() and "(100%)" in r.getMessage()
             for r in caplog.records)
  assert folder == tmp_path / "ml-1m" / "ml-1m"
  assert (folder / "ratings.dat").read_text() == RATINGS
  assert (folder / "movies.dat").read_bytes() == MOVIES.encode("iso-8859-1")
  assert not (tmp_path / "ml-1m.zip").exists()  # the archive is not kept
  _no_partials(tmp_path)
  assert download.fetch_dataset(url, tmp_path) == folder
  assert server.requests == ["/ml-1m.zip"]  # second call used the cache


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
  bad = download.Expected(len(_ml1m_zip()), "0" * 64)
  with pytest.raises(DataError, match="sha256 mismatch") as e:
    download.fetch_dataset(f"{server.url}/ml-1m.zip", tmp_path, expected=bad)
  assert server.url in str(e.value)
  assert list(tmp_path.iterdir()) == []


def test_size_mismatch_truncation_404_and_bad_zip(server, tmp_path):
  with pytest.raises(DataError, match="size mismatch"):
    download.fetch_dataset(f"{server.url}/ml-1m.zip", tmp_path,
                           expected=download.Expected(size=123))
  with pytest.raises(DataError, match="truncated|failed"):
    download.fetch_dataset(f"{server.url}/short/ml-1m.zip", tmp_path)
  with pytest.raises(DataError, match="404"):
    download.fetch_dataset(f"{server.url}/missing.zip", tmp_path)
  with pytest.raises(DataError, match="not a valid zip"):
    download.fetch_dataset(f"{server.url}/junk.zip", tmp_path)
  assert list(tmp_path.iterdir()) == []


def test_known_url_has_the_grouplens_checksum():
  exp = download.KNOWN[download.ML1M_URL]
  assert exp.size == 5917549 and len(exp.sha256) == 64


def test_file_url_local_zip_and_folder(tmp_path):
  archive = tmp_path / "src" / "ml-1m.zip"
  archive.parent.mkdir()
  archive.write_bytes(_ml1m_zip())
  cache = tmp_path / "cache"
  via_url = download.fetch_dataset(archive.as_uri(), cache)
  assert (via_url / "users.dat").read_text() == USERS
  via_path = download.fetch_dataset(str(archive), tmp_path / "cache2",
                                    expected=_expected(_ml1m_zip()))
  assert (via_path / "ratings.dat").read_text() == RATINGS
  assert download.fetch_dataset(str(via_path), cache) == via_path  # folders are used in place
  assert download.fetch_dataset(via_path.as_uri(), cache) == via_path
  with pytest.raises(DataError, match="sha256 mismatch"):
    download.fetch_dataset(str(archive), tmp_path / "cache3",
                           expected=download.Expected(sha256="1" * 64))
  with pytest.raises(DataError, match="no such file"):
    download.fetch_dataset(str(tmp_path / "nope.zip"), cache)


def test_zip_members_cannot_escape(tmp_path):
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    z.writestr("../evil.txt", "x")
  (tmp_path / "evil.zip").write_bytes(buf.getvalue())
  with pytest.raises(DataError, match="escape"):
    download.fetch_dataset(str(tmp_path / "evil.zip"), tmp_path / "cache")
  assert not (tmp_path / "evil.txt").exists()


def test_prepare_from_a_url_loads_movielens_ratings(server, tmp_path):
  cfg = config_lib.data_config("movielens", dir=f"{server.url}/ml-1m.zip", min_core=0,
                               item_meta="none")
  prepared = store.prepare(cfg, tmp_path / "data" / "ml1m", progress=False)
  assert prepared.built
  ds = prepared.load()
  # Hand-computed from RATINGS: users in first-appearance order, each user's items by
  # timestamp; movie 50 is never rated so it is not an item.
  assert list(ds.user_ids) == ["1", "2", "3"]
  assert sorted(ds.item_ids.tolist()) == ["10", "20", "30", "40"]
  by_id = {m: i for i, m in enumerate(ds.item_ids)}
  expected = {"1": ["20", "30", "10"], "2": ["20", "10", "40"], "3": ["30", "20", "10"]}
  for u, seq in zip(ds.user_ids, ds.sequences, strict=True):
    np.testing.assert_array_equal(seq, [by_id[m] for m in expected[u]])
  assert ds.item_titles[by_id["30"]] == "Amélie (2001)"
  assert prepared.info["config"]["dir"] == f"{server.url}/ml-1m.zip"
  # Same URL again: nothing downloaded, nothing rebuilt.
  assert not store.prepare(cfg, tmp_path / "data" / "ml1m", progress=False).built
  assert server.requests == ["/ml-1m.zip"]
