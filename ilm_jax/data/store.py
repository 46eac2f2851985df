"""Prepared datasets on disk: TFDS builders in ArrayRecord format, written atomically.

Layout of a prepared data dir (one dataset)::

  DIR/info.json                       name, stats, fingerprint, config (written last)
  DIR/rec_items/1.0.0/*.array_record  one record per item, record i = item index i
  DIR/rec_users/1.0.0/*.array_record  one record per user, record u = user index u
  DIR/extras.npz                      RecDataset.extras (hidden ground truth), if any

No TensorFlow is needed (nor imported): TFDS's ``GeneratorBasedBuilder`` writes
ArrayRecord with numpy-only feature encoding when ``file_format='array_record'``, and
``tfds.data_source`` reads it back through its read-only builder (``features.json``
describes the records, so readers need no builder class). Two things keep TFDS off the
network and away from TF: the builders skip TFDS's registry (``skip_registration``, so
``tfds.data_source`` finds them by directory) and build their ``DatasetInfo`` directly
(``dataset_info_from_configs`` would look for package metadata files); dataset
statistics, which need TF, are skipped.

Atomicity: everything is written to a sibling temp dir that is renamed into place, and
``info.json`` is the last file written, so a data dir either holds a complete dataset or
does not exist; a failure mid-write leaves the previous dataset (if any) untouched.

Caching: ``prepare`` fingerprints the data config, the content of every input file and
the data-loading code; an existing dir with the same fingerprint is reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from tensorflow_datasets.proto import tf_example_pb2

from ilm_jax.data import download
from ilm_jax.data.types import DataError, RecDataset

FORMAT_VERSION = 1
INFO_FILE = "info.json"
EXTRAS_FILE = "extras.npz"
ITEMS = "rec_items"
USERS = "rec_users"
_TFDS_VERSION = "1.0.0"
_SPLIT = "train"


# ----------------------------------------------------------------------------------------
# TFDS builders.


class _Progress:
  """Logs 'what: n/total (p%)' about every 10%, and at the end."""

  def __init__(self, what: str, total: int, enabled: bool):
    self.what, self.total, self.enabled = what, total, enabled
    self.next_pct = 10
    self.start = time.monotonic()

  def update(self, n: int) -> None:
    if not self.enabled or self.total == 0:
      return
    pct = 100 * n // self.total
    if pct >= self.next_pct or n == self.total:
      logging.info("%s: %d/%d (%d%%) %.1fs", self.what, n, self.total, pct,
                   time.monotonic() - self.start)
      self.next_pct = (pct // 10 + 1) * 10


class _RecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes a sequence of examples (one split, order kept) with the given features."""

  VERSION = tfds.core.Version(_TFDS_VERSION)
  # TFDS locates a builder's source file to look for download checksums; for a class
  # inside a package that needs the `importlib_resources` backport. We download nothing.
  code_path = None

  def __init__(self, *, features: tfds.features.FeaturesDict,
               examples: Callable[[], Iterator[dict[str, Any]]], description: str, **kwargs):
    # _info() runs inside super().__init__, so these must be set first.
    self._rec_features = features
    self._rec_examples = examples
    self._rec_description = description
    super().__init__(file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # disable_shuffling keeps generation order: record i is index i.
    return tfds.core.DatasetInfo(builder=self, description=self._rec_description,
                                 features=self._rec_features, disable_shuffling=True)

  # TFDS prints "Downloading and preparing dataset ..." to stdout; we download nothing and
  # log our own progress lines.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _split_generators(self, dl_manager):
    del dl_manager
    return {_SPLIT: self._generate_examples()}

  def _generate_examples(self):
    yield from enumerate(self._rec_examples())


class _ItemsBuilder(_RecordsBuilder, skip_registration=True):
  name = ITEMS


class _UsersBuilder(_RecordsBuilder, skip_registration=True):
  name = USERS


def _item_features(attr_names: Sequence[str]) -> tfds.features.FeaturesDict:
  f = {
      "index": tfds.features.Scalar(np.int32),
      "raw_id": tfds.features.Text(),
      "title": tfds.features.Text(),
      "text": tfds.features.Text(),
      "token": tfds.features.Text(),
  }
  if attr_names:
    f["attrs"] = tfds.features.FeaturesDict(
        {name: tfds.features.Sequence(tfds.features.Text()) for name in attr_names})
  return tfds.features.FeaturesDict(f)


def _user_features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "index": tfds.features.Scalar(np.int32),
      "raw_id": tfds.features.Text(),
      "token": tfds.features.Text(),
      "sequence": tfds.features.Tensor(shape=(None,), dtype=np.int32),
  })


def _item_examples(ds: RecDataset, progress: _Progress) -> Iterator[dict[str, Any]]:
  tokens = ds.item_tokens if ds.item_tokens is not None else [""] * ds.num_items
  for i in range(ds.num_items):
    ex = {"index": i, "raw_id": str(ds.item_ids[i]), "title": ds.item_titles[i],
          "text": ds.item_text[i], "token": str(tokens[i])}
    if ds.item_attrs:
      ex["attrs"] = {name: list(values[i]) for name, values in ds.item_attrs.items()}
    yield ex
    progress.update(i + 1)


def _user_examples(ds: RecDataset, progress: _Progress) -> Iterator[dict[str, Any]]:
  tokens = ds.user_tokens if ds.user_tokens is not None else [""] * ds.num_users
  for u in range(ds.num_users):
    yield {"index": u, "raw_id": str(ds.user_ids[u]), "token": str(tokens[u]),
           "sequence": np.asarray(ds.sequences[u], np.int32)}
    progress.update(u + 1)


def _check_dataset(ds: RecDataset) -> None:
  n, u = ds.num_items, ds.num_users
  if n == 0 or u == 0:
    # TFDS cannot write an empty split (it fails with a bare AssertionError).
    raise ValueError(f"RecDataset {ds.name!r} has {n} items and {u} users; nothing to store "
                     "(did the k-core filter, config.data.min_core, remove everything?)")
  lengths = {"item_text": len(ds.item_text), "item_titles": len(ds.item_titles),
             "sequences": len(ds.sequences)}
  lengths |= {f"item_attrs[{k!r}]": len(v) for k, v in ds.item_attrs.items()}
  if ds.item_tokens is not None:
    lengths["item_tokens"] = len(ds.item_tokens)
  if ds.user_tokens is not None:
    lengths["user_tokens"] = len(ds.user_tokens)
  bad_names = [k for k in ds.item_attrs if not k or "/" in k]
  if bad_names:
    raise ValueError(f"item_attrs names {bad_names} cannot be feature names (empty or '/')")
  expected = {k: (u if k in ("sequences", "user_tokens") else n) for k in lengths}
  bad = {k: (v, expected[k]) for k, v in lengths.items() if v != expected[k]}
  if bad:
    raise ValueError(f"RecDataset {ds.name!r} is inconsistent (field: got, expected): {bad}")


def _write_tfds(builder_cls, data_dir: pathlib.Path, features, examples, description) -> None:
  builder = builder_cls(data_dir=os.fspath(data_dir), features=features, examples=examples,
                        description=description)
  builder.download_and_prepare(
      download_dir=os.fspath(data_dir / "_downloads"),
      download_config=tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP))
  # The download manager's (empty) folders are not part of the dataset.
  shutil.rmtree(data_dir / "_downloads", ignore_errors=True)


# ----------------------------------------------------------------------------------------
# Write / read.


def write(ds: RecDataset, data_dir: str | os.PathLike, *, fingerprint: str = "",
          config: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
  """Writes ``ds`` to ``data_dir`` atomically (replacing what is there).

  Args:
    ds: the dataset (k-core applied, full sequences; splits are derived on load).
    data_dir: destination folder for this one dataset.
    fingerprint: cache key stored in ``info.json`` (see ``fingerprint``).
    config: the data config, stored for the record.
    progress: log counts and percentages while writing.

  Returns:
    The ``info.json`` contents.
  """
  _check_dataset(ds)
  data_dir = pathlib.Path(data_dir)
  data_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.tmp-", dir=data_dir.parent))
  try:
    tfds.display_progress_bar(False)  # we log our own progress lines instead of tqdm bars
    start = time.monotonic()
    attr_names = sorted(ds.item_attrs)
    _write_tfds(_ItemsBuilder, tmp, _item_features(attr_names),
                lambda: _item_examples(ds, _Progress(f"{ds.name} items", ds.num_items, progress)),
                f"{ds.name} items")
    _write_tfds(_UsersBuilder, tmp, _user_features(),
                lambda: _user_examples(ds, _Progress(f"{ds.name} users", ds.num_users, progress)),
                f"{ds.name} users")
    if ds.extras:
      np.savez(tmp / EXTRAS_FILE, **{k: np.asarray(v) for k, v in ds.extras.items()})
    info = {
        "format_version": FORMAT_VERSION,
        "name": ds.name,
        "stats": ds.stats(),
        "fingerprint": fingerprint,
        "attr_names": attr_names,
        "has_item_tokens": ds.item_tokens is not None,
        "has_user_tokens": ds.user_tokens is not None,
        "extras": sorted(ds.extras),
        "config": config or {},
        "seconds": round(time.monotonic() - start, 3),
    }
    # info.json last: its presence marks a complete dataset.
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    _replace_dir(tmp, data_dir, fingerprint)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return info


def _replace_dir(new: pathlib.Path, dest: pathlib.Path, fingerprint: str) -> None:
  """Renames ``new`` to ``dest``; an existing ``dest`` is moved aside first, then deleted.

  Several processes may prepare the same dataset into a shared folder at once (multi-host
  jobs): a ``dest`` that already holds a complete dataset with the same non-empty
  fingerprint is kept and ``new`` discarded, so readers of it are never disturbed.
  """

  def same_as_ours() -> bool:
    try:
      info = read_info(dest)
    except DataError:
      return False
    return bool(fingerprint) and info is not None and info.get("fingerprint") == fingerprint

  if same_as_ours():
    shutil.rmtree(new)
    return
  old = None
  if dest.exists():
    old = pathlib.Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    os.rename(dest, old / dest.name)
  try:
    os.rename(new, dest)
  except OSError:
    if old is not None and not dest.exists():  # put the previous dataset back
      os.rename(old / dest.name, dest)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
    if same_as_ours():  # another process finished the same dataset first
      shutil.rmtree(new)
      return
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def read_info(data_dir: str | os.PathLike) -> dict[str, Any] | None:
  """``info.json`` of a complete prepared dir, or None when there is none."""
  p = pathlib.Path(data_dir) / INFO_FILE
  if not p.is_file():
    return None
  try:
    info = json.loads(p.read_text(encoding="utf-8"))
  except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or bad UTF-8
    raise DataError(f"unreadable prepared-data info ({e}); delete the folder to rebuild",
                    path=os.fspath(p)) from e
  if not isinstance(info, dict):
    raise DataError(f"prepared-data info is a JSON {type(info).__name__}, not an object; "
                    "delete the folder to rebuild", path=os.fspath(p))
  return info


def data_sources(data_dir: str | os.PathLike) -> dict[str, Any]:
  """Random-access ArrayRecord sources of a prepared dir (usable as Grain sources).

  Returns:
    {'items': source, 'users': source}; ``source[i]`` is the record of index ``i``
    (text fields as bytes, as TFDS decodes them).
  """
  data_dir = pathlib.Path(data_dir)
  if read_info(data_dir) is None:
    raise DataError("no prepared dataset here (info.json missing); run the prepare job",
                    path=os.fspath(data_dir))
  return {
      key: tfds.data_source(name, data_dir=os.fspath(data_dir), split=_SPLIT, download=False)
      for key, name in (("items", ITEMS), ("users", USERS))
  }


def _raw_records(data_dir: pathlib.Path, name: str) -> list[bytes]:
  src = tfds.data_source(name, data_dir=os.fspath(data_dir), split=_SPLIT, download=False,
                         deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  return list(src.__getitems__(list(range(len(src))))) if len(src) else []


class _Record:
  """One serialised record's fields, parsed without TFDS's per-feature decoder.

  ``tfds.data_source`` decoding costs ~150 us a record (Clothing: 9 s for 62k records);
  parsing the same ``tf.train.Example`` bytes with TFDS's own TF-free proto module and
  reading our fixed schema directly takes a few us. The round-trip tests pin the two
  decoders together.
  """

  def __init__(self, raw: bytes):
    self._f = tf_example_pb2.Example.FromString(raw).features.feature

  def text(self, key: str) -> str:
    values = self._f[key].bytes_list.value if key in self._f else []
    return values[0].decode("utf-8") if values else ""

  def texts(self, key: str) -> list[str]:
    return [v.decode("utf-8") for v in self._f[key].bytes_list.value] if key in self._f else []

  def ints(self, key: str) -> np.ndarray:
    if key not in self._f:
      return np.zeros(0, np.int32)
    return np.asarray(self._f[key].int64_list.value, np.int64).astype(np.int32)


def load(data_dir: str | os.PathLike) -> RecDataset:
  """Reads a prepared dir back into exactly the RecDataset that was written.

  Args:
    data_dir: a folder written by ``write``/``prepare``.

  Returns:
    The RecDataset (item/user ids as numpy str arrays, sequences int32).

  Raises:
    DataError: no prepared dataset there, or a damaged one (names the folder).
  """
  try:
    return _load(pathlib.Path(data_dir))
  except DataError:
    raise
  except Exception as e:  # noqa: BLE001  (tfds, array_record, numpy, json: many types)
    raise DataError(f"prepared data is damaged ({type(e).__name__}: {e}); delete the folder "
                    "to rebuild", path=os.fspath(data_dir)) from e


def _load(data_dir: pathlib.Path) -> RecDataset:
  info = read_info(data_dir)
  if info is None:
    raise DataError("no prepared dataset here (info.json missing); run the prepare job",
                    path=os.fspath(data_dir))
  if info.get("format_version") != FORMAT_VERSION:
    raise DataError(f"prepared with format {info.get('format_version')}, this code reads "
                    f"{FORMAT_VERSION}; delete the folder to rebuild", path=os.fspath(data_dir))
  items = [_Record(r) for r in _raw_records(data_dir, ITEMS)]
  users = [_Record(r) for r in _raw_records(data_dir, USERS)]
  for what, recs in (("items", items), ("users", users)):
    idx = [int(r.ints("index")[0]) for r in recs]
    if idx != list(range(len(recs))) or len(recs) != info["stats"][what]:
      raise DataError(f"{what} records are not 0..{info['stats'][what] - 1} in order; the "
                      "folder is corrupt, delete it to rebuild", path=os.fspath(data_dir))
  extras = {}
  if info["extras"]:
    with np.load(data_dir / EXTRAS_FILE, allow_pickle=False) as z:
      extras = {k: z[k] for k in info["extras"]}
  return RecDataset(
      name=info["name"],
      item_ids=np.array([r.text("raw_id") for r in items], dtype=str),
      user_ids=np.array([r.text("raw_id") for r in users], dtype=str),
      sequences=[r.ints("sequence") for r in users],
      item_text=[r.text("text") for r in items],
      item_titles=[r.text("title") for r in items],
      item_attrs={name: [r.texts(f"attrs/{name}") for r in items]
                  for name in info["attr_names"]},
      item_tokens=[r.text("token") for r in items] if info["has_item_tokens"] else None,
      user_tokens=[r.text("token") for r in users] if info["has_user_tokens"] else None,
      extras=extras,
  )


# ----------------------------------------------------------------------------------------
# Cache: prepare once, reuse while the fingerprint matches.


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A prepared data dir.

  Attributes:
    path: the folder.
    info: its ``info.json`` (name, stats, fingerprint, config).
    built: True when this call wrote it, False when an existing one was reused.
  """

  path: pathlib.Path
  info: dict[str, Any]
  built: bool

  def load(self) -> RecDataset:
    return load(self.path)


def _hash_file(h, path: pathlib.Path) -> None:
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      h.update(chunk)


def input_files(data_config: ml_collections.ConfigDict) -> list[pathlib.Path]:
  """Files a data config reads (their content goes into the fingerprint).

  Mirrors the path resolution of ``sources.load_dataset``: ``dir`` (or the shared copy a
  known name stands for) and the item metadata file with the folder around it (the
  MovieLens loader picks up the TMDB overviews beside ``movies.dat``).
  """
  from ilm_jax import resources  # noqa: PLC0415
  from ilm_jax.data import sources  # noqa: PLC0415
  if data_config.source == "generated":
    return []
  roots: list[pathlib.Path] = []
  name = (data_config.get("name") or "").strip()
  if data_config.dir:
    roots.append(pathlib.Path(data_config.dir))
    name = name or pathlib.Path(data_config.dir).name.lower()
  elif data_config.source == "movielens":
    roots.append(resources.shared_data_dir() / "ml-1m")
  elif name in sources.SHARED_OPENP5:
    roots.append(resources.shared_data_dir() / "openp5" / sources.SHARED_OPENP5[name])
  meta = (data_config.get("item_meta") or "").strip()
  if meta.lower() != "none":
    meta_path = pathlib.Path(meta) if meta else sources.default_item_meta(
        name or ("ml1m" if data_config.source == "movielens" else ""))
    if meta_path is not None:
      roots.append(meta_path.parent if meta_path.suffix == ".dat" else meta_path)
  files: set[pathlib.Path] = set()
  for r in roots:
    files |= {p for p in r.rglob("*") if p.is_file()} if r.is_dir() else {r}
  return sorted(files)


def _code_files() -> list[pathlib.Path]:
  """The data-loading code: a change to a parser invalidates prepared data."""
  here = pathlib.Path(__file__).resolve().parent
  skip = ("pipeline.py", "pairs.py", "tokenization.py", "download.py")
  return sorted(p for p in here.glob("*.py") if p.name not in skip)


def fingerprint(data_config: ml_collections.ConfigDict,
                files: Sequence[os.PathLike] | None = None) -> str:
  """sha256 over the data config, the inputs' content and the data code.

  Args:
    data_config: the ``config.data`` section.
    files: input files; default ``input_files(data_config)``.

  Returns:
    A hex digest.
  """
  h = hashlib.sha256()
  cfg = data_config.to_dict() if hasattr(data_config, "to_dict") else dict(data_config)
  h.update(json.dumps({"format": FORMAT_VERSION, "config": cfg}, sort_keys=True,
                      default=str).encode())
  files = input_files(data_config) if files is None else [pathlib.Path(f) for f in files]
  for p in list(files) + _code_files():
    h.update(f"\0{p.name}\0".encode())
    if p.is_file():
      _hash_file(h, p)
    else:
      h.update(b"<missing>")
  return h.hexdigest()


def prepare(data_config: ml_collections.ConfigDict, data_dir: str | os.PathLike, *,
            progress: bool = True, force: bool = False,
            load_fn: Callable[[ml_collections.ConfigDict], RecDataset] | None = None,
            files: Sequence[os.PathLike] | None = None) -> Prepared:
  """Loads the dataset a config names and writes it to ``data_dir``, unless cached.

  Args:
    data_config: the ``config.data`` section (``config_lib.data_config``).
    data_dir: folder for this dataset.
    progress: log progress lines.
    force: rebuild even when the fingerprint matches.
    load_fn: ``data_config -> RecDataset`` (k-core applied); default
      ``ilm_jax.data.sources.load_dataset``.
    files: input files for the fingerprint; default ``input_files(data_config)``.

  Returns:
    The Prepared dir (``.built`` says whether it was written now).
  """
  data_dir = pathlib.Path(data_dir)
  cfg = data_config.to_dict() if hasattr(data_config, "to_dict") else dict(data_config)
  if download.needs_fetch(data_config.get("dir") or ""):
    # A URL or archive: fetch/extract it (cached beside the data dirs) and read that folder.
    local = download.fetch_dataset(data_config.dir, data_dir.parent / "_downloads",
                                   progress=progress)
    data_config = ml_collections.ConfigDict(cfg)
    data_config.dir = str(local)
    if files is None:
      files = input_files(data_config)
  fp = fingerprint(ml_collections.ConfigDict(cfg), files)
  info = read_info(data_dir)
  if info is not None and not force and info.get("fingerprint") == fp:
    logging.info("prepared data %s is up to date (%s); reusing it", data_dir, info["stats"])
    return Prepared(data_dir, info, built=False)
  if info is not None:
    logging.info("prepared data %s is stale (inputs, config or code changed); rebuilding",
                 data_dir)
  if load_fn is None:
    from ilm_jax.data import sources  # noqa: PLC0415  (heavy parsers load on demand)
    load_fn = sources.load_dataset
  start = time.monotonic()
  ds = load_fn(data_config)
  logging.info("loaded %s in %.1fs: %s", ds.name, time.monotonic() - start, ds.stats())
  info = write(ds, data_dir, fingerprint=fp, config=cfg, progress=progress)
  logging.info("wrote %s to %s in %.1fs", ds.name, data_dir, info["seconds"])
  return Prepared(data_dir, info, built=True)
