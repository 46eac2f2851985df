"""Fetching raw dataset files: GroupLens MovieLens-1M, or any URL / local archive.

``fetch_dataset(src, cache_dir)`` turns ``src`` into a local folder of raw files:

* a local folder                          -> used as is (nothing is copied);
* a local ``.zip`` / ``file://`` URL      -> extracted into the cache;
* an ``http(s)://`` URL                   -> downloaded, verified, extracted into the cache.

Downloads stream into a temp file beside the destination while a sha256 and a byte count
are computed, are checked against the expected size and checksum (known for GroupLens
``ml-1m.zip``; from the server's Content-Length otherwise), then renamed into place.
Archives are extracted into a temp folder that is renamed into place, so an interrupted
fetch leaves nothing a later run could mistake for complete data. Progress is logged
(bytes and %).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib

from absl import logging

from ilm_jax.data.types import DataError

ML1M_URL = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
_COMPLETE = ".complete"  # marker written last inside an extracted folder


@dataclasses.dataclass(frozen=True)
class Expected:
  """What a download must be; None = not checked."""

  size: int | None = None
  sha256: str | None = None


# GroupLens' published archive (size and sha256 as recorded in TFDS's url checksums; the
# md5 GroupLens publishes, c4d9eecfca2ab87c1945afe126590906, matches the same file).
KNOWN: dict[str, Expected] = {
    ML1M_URL: Expected(5917549, "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20"),
    ML1M_URL.replace("https:", "http:"): Expected(
        5917549, "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20"),
}


def is_url(src: str) -> bool:
  """True for http(s):// and file:// sources."""
  return urllib.parse.urlparse(str(src)).scheme in ("http", "https", "file")


def needs_fetch(src: str) -> bool:
  """True when ``src`` is a URL or an archive (i.e. not a folder to read directly)."""
  return is_url(src) or str(src).endswith(".zip")


def _local_path(src: str) -> pathlib.Path:
  parsed = urllib.parse.urlparse(str(src))
  if parsed.scheme == "file":
    return pathlib.Path(urllib.request.url2pathname(parsed.path))
  return pathlib.Path(src)


class _Progress:

  def __init__(self, what: str, total: int | None, enabled: bool):
    self.what, self.total, self.enabled = what, total, enabled
    self.next_mark = 10 if total else 8 << 20
    self.start = time.monotonic()

  def update(self, n: int, done: bool = False) -> None:
    if not self.enabled:
      return
    if self.total:
      pct = 100 * n // self.total
      if pct >= self.next_mark or done:
        logging.info("%s: %.1f/%.1f MB (%d%%) %.1fs", self.what, n / 1e6, self.total / 1e6,
                     pct, time.monotonic() - self.start)
        self.next_mark = (pct // 10 + 1) * 10
    elif n >= self.next_mark or done:
      logging.info("%s: %.1f MB %.1fs", self.what, n / 1e6, time.monotonic() - self.start)
      self.next_mark = n + (8 << 20)


def fetch(url: str, dest: str | os.PathLike, *, expected: Expected | None = None,
          progress: bool = True, timeout: float = 60.0) -> pathlib.Path:
  """Copies ``url`` (http, https, file or a local path) to ``dest`` atomically.

  Args:
    url: where the file is.
    dest: the local file to create (replaced if present).
    expected: size/sha256 to check; default ``KNOWN.get(url)``.
    progress: log progress lines.
    timeout: socket timeout in seconds for remote URLs.

  Returns:
    ``dest``.

  Raises:
    DataError: unreachable URL, HTTP error, truncated transfer, size or checksum mismatch
      (the message names the URL); ``dest`` is then left untouched.
  """
  dest = pathlib.Path(dest)
  expected = expected or KNOWN.get(url) or Expected()
  dest.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.part-", dir=dest.parent)
  tmp = pathlib.Path(tmp_name)
  h, n = hashlib.sha256(), 0
  try:
    with os.fdopen(fd, "wb") as out:
      try:
        if is_url(url) and urllib.parse.urlparse(url).scheme != "file":
          resp = urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (http(s) only)
          length = resp.headers.get("Content-Length")
          announced = int(length) if length and length.isdigit() else None
        else:
          path = _local_path(url)
          resp = open(path, "rb")  # noqa: SIM115 (closed below)
          announced = path.stat().st_size
      except (urllib.error.URLError, OSError, ValueError) as e:
        raise DataError(f"cannot open {url}: {e}", path=str(url)) from e
      bar = _Progress(f"fetching {url}", expected.size or announced, progress)
      with resp:
        try:
          while chunk := resp.read(1 << 20):
            out.write(chunk)
            h.update(chunk)
            n += len(chunk)
            bar.update(n)
        except (OSError, urllib.error.URLError) as e:
          raise DataError(f"transfer of {url} failed after {n} bytes: {e}", path=str(url)) from e
      bar.update(n, done=True)
    if announced is not None and n != announced:
      raise DataError(f"truncated transfer: got {n} bytes, the source announced {announced}",
                      path=str(url))
    if expected.size is not None and n != expected.size:
      raise DataError(f"size mismatch: got {n} bytes, expected {expected.size}", path=str(url))
    if expected.sha256 is not None and h.hexdigest() != expected.sha256.lower():
      raise DataError(f"sha256 mismatch: got {h.hexdigest()}, expected {expected.sha256}",
                      path=str(url))
    os.replace(tmp, dest)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return dest


def verify(path: str | os.PathLike, expected: Expected, what: str | None = None) -> None:
  """Checks a local file's size and sha256; raises DataError naming ``what`` (or the path)."""
  path = pathlib.Path(path)
  what = what or str(path)
  n = path.stat().st_size
  if expected.size is not None and n != expected.size:
    raise DataError(f"size mismatch: got {n} bytes, expected {expected.size}", path=what)
  if expected.sha256 is not None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
      while chunk := f.read(1 << 20):
        h.update(chunk)
    if h.hexdigest() != expected.sha256.lower():
      raise DataError(f"sha256 mismatch: got {h.hexdigest()}, expected {expected.sha256}",
                      path=what)


def extract_zip(archive: str | os.PathLike, dest: str | os.PathLike,
                marker: str | None = None) -> pathlib.Path:
  """Extracts ``archive`` into the folder ``dest`` atomically (replacing it).

  Args:
    archive: a zip file.
    dest: the folder to create.
    marker: text of the completion marker (default: the archive path); ``fetch_dataset``
      compares it with its source to decide whether the folder can be re-used.

  Returns:
    ``dest``, or its single top-level sub-folder when the archive has one (``ml-1m/``).

  Raises:
    DataError: not a zip, corrupt, or a member path escaping the folder.
  """
  archive, dest = pathlib.Path(archive), pathlib.Path(dest)
  dest.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
  try:
    try:
      with zipfile.ZipFile(archive) as z:
        for name in z.namelist():
          p = pathlib.PurePosixPath(name)
          if p.is_absolute() or ".." in p.parts:
            raise DataError(f"zip member {name!r} would escape the folder", path=str(archive))
        bad = z.testzip()
        if bad is not None:
          raise DataError(f"corrupt zip member {bad!r} (CRC mismatch)", path=str(archive))
        z.extractall(tmp)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, NotImplementedError,
            RuntimeError, ValueError) as e:
      # A corrupt archive surfaces as any of these (bad deflate data, unknown compression
      # method, encryption, ...); DataError (a ValueError) keeps its own message.
      if isinstance(e, DataError):
        raise
      raise DataError(f"not a valid zip archive: {e}", path=str(archive)) from e
    except OSError as e:
      raise DataError(f"cannot read or extract the zip archive ({e})", path=str(archive)) from e
    (tmp / _COMPLETE).write_text((marker or str(archive)) + "\n")
    if dest.exists():
      shutil.rmtree(dest)
    os.rename(tmp, dest)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return _content_root(dest)


def _content_root(folder: pathlib.Path) -> pathlib.Path:
  entries = [p for p in folder.iterdir() if p.name != _COMPLETE and not p.name.startswith("__")]
  if len(entries) == 1 and entries[0].is_dir():
    return entries[0]
  return folder


def fetch_dataset(src: str, cache_dir: str | os.PathLike, *, expected: Expected | None = None,
                  progress: bool = True) -> pathlib.Path:
  """A local folder holding the raw files ``src`` names.

  Args:
    src: a folder, a ``.zip`` path, or an http(s)/file URL of a folder or a zip.
    cache_dir: where downloads and extracted archives go (re-used when complete).
    expected: size/sha256 of the archive; default ``KNOWN.get(src)``.
    progress: log progress lines.

  Returns:
    The folder with the files (for ``ml-1m.zip``: the one holding ratings.dat, movies.dat).

  Raises:
    DataError: missing file, failed or unverifiable download, bad archive.
  """
  if not needs_fetch(src):
    return pathlib.Path(src)
  local = _local_path(src)
  remote = urllib.parse.urlparse(str(src)).scheme in ("http", "https")
  if not remote and local.is_dir():  # file:///some/folder
    return local
  cache_dir = pathlib.Path(cache_dir)
  name = pathlib.PurePosixPath(urllib.parse.urlparse(str(src)).path).name or "download.zip"
  out = cache_dir / (name[:-4] if name.endswith(".zip") else name)
  marker = out / _COMPLETE
  if marker.is_file() and marker.read_text().strip() == str(src):
    logging.info("using %s (already fetched from %s)", out, src)
    return _content_root(out)
  expected = expected or KNOWN.get(str(src))
  if remote:
    archive = fetch(src, cache_dir / name, expected=expected, progress=progress)
  else:
    if not local.is_file():
      raise DataError("no such file or folder", path=str(local))
    archive = local
    if expected is not None:
      verify(local, expected, str(src))
  try:
    root = extract_zip(archive, out, marker=str(src))
  finally:
    if remote:
      archive.unlink(missing_ok=True)  # the extracted folder is what we keep
  logging.info("extracted %s to %s", src, root)
  return root
