"""The ``prepare`` job: dataset -> k-core -> TFDS ArrayRecord data dir (cached).

Later jobs can call ``prepared_dataset(config.data, workdir)`` to read the same cached copy
(building it first if needed) instead of re-parsing the raw files.
"""

from __future__ import annotations

import os
import pathlib
import time

import ml_collections

from ilm_jax.data import store
from ilm_jax.data.types import RecDataset


def dataset_dir_name(data_config: ml_collections.ConfigDict) -> str:
  """Folder name under WORKDIR/data: the dataset name, or one derived from the source."""
  name = (data_config.get("name") or "").strip()
  if name:
    return name.lower()
  if data_config.source == "openp5" and data_config.dir:
    return pathlib.Path(data_config.dir).name.lower()
  return data_config.source


def data_dir(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> pathlib.Path:
  """``config.data_dir`` if set, else WORKDIR/data/<name>."""
  explicit = config.get("data_dir") or ""
  if explicit:
    return pathlib.Path(explicit)
  return pathlib.Path(workdir) / "data" / dataset_dir_name(config.data)


def prepared_dataset(data_config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                     directory: str | os.PathLike | None = None) -> RecDataset:
  """The dataset ``data_config`` names, via the prepared (cached) copy in the workdir."""
  d = (pathlib.Path(directory) if directory
       else pathlib.Path(workdir) / "data" / dataset_dir_name(data_config))
  return store.prepare(data_config, d).load()


def run(config: ml_collections.ConfigDict, workdir: str) -> store.Prepared:
  """Prepares (or re-uses) the dataset and prints its statistics."""
  start = time.monotonic()
  out = data_dir(config, workdir)
  prepared = store.prepare(config.data, out, progress=config.get("progress", True),
                           force=config.get("force", False))
  s = prepared.info["stats"]
  what = "prepared" if prepared.built else "up to date (re-used)"
  print(f"prepare: {prepared.info['name']} {what} in {out} ({time.monotonic() - start:.1f}s)\n"
        f"  users {s['users']:,}  items {s['items']:,}  interactions {s['interactions']:,}",
        flush=True)
  return prepared
