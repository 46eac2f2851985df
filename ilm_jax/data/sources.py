"""Dataset registry: ``config.data`` -> a k-core-filtered ``RecDataset`` ready to split.

Sources (``config.data.source``):
  generated: the embedded catalogue (``generated.py``), no files.
  movielens: MovieLens-1M raw files (``ratings.dat`` or the derived sequence files) in
    ``dir`` ('' = ``shared/data/ml-1m``).
  openp5: an OpenP5-format folder in ``dir``; with ``dir`` empty, ``name`` in
    {ml1m, beauty, clothing} selects ``shared/data/openp5/{ML1M,Beauty,Clothing}``.

Item text (``config.data.item_meta``):
  openp5: a RecBole ``.item`` file (Amazon), a MovieLens ``movies.dat`` (titles/genres,
    plus the TMDB overview TSV found beside it or in ``extra/``), or a folder holding
    ``movies.dat``; '' = ``default_item_meta`` (shared copies for beauty and ml1m).
  movielens: text always comes from ``dir/movies.dat``; item_meta is the TMDB overview
    TSV ('' = the one found beside movies.dat or in ``extra/``).
  ``'none'`` = no item text (openp5) / no TMDB overviews (movielens).

Every dataset leaves here with OpenP5 item tokens ('1001'...) and user tokens ('1'...):
sources that have none get them from ``assign_random_item_tokens``.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Mapping

import numpy as np

from ilm_jax import resources
from ilm_jax.data import filtering, generated
from ilm_jax.data.types import DataError, RecDataset

SOURCES = ("generated", "movielens", "openp5")
SHARED_OPENP5 = {"ml1m": "ML1M", "beauty": "Beauty", "clothing": "Clothing"}
# Item text for the shared OpenP5 sets, relative to the shared data folder; a set missing
# here has none (Clothing), so no Phase 1 and no ILM-IT* model can be trained on it.
SHARED_ITEM_META = {"beauty": "amazon-beauty/Amazon_Beauty.item", "ml1m": "ml-1m/movies.dat"}
_GENERATED_KEYS = ("seed", "num_items", "num_users", "num_clusters", "min_len", "max_len")

log = logging.getLogger(__name__)


def load_dataset(data_config: Mapping) -> RecDataset:
  """Loads, joins item text, k-core filters (``min_core``) and assigns tokens.

  Args:
    data_config: ``config.data`` (see ``config_lib.data_config``): source, dir, name,
      item_meta, min_core, generated.*.

  Returns:
    A RecDataset whose every user has >= min_core interactions (ready for
    ``types.leave_one_out``), with ``item_tokens`` and ``user_tokens`` set.

  Raises:
    DataError: unreadable or inconsistent files (names file and line).
    ValueError: unknown source or dataset name (lists the valid choices).
  """
  source = data_config["source"]
  name = (data_config.get("name") or "").strip()
  directory = (data_config.get("dir") or "").strip()
  item_meta = (data_config.get("item_meta") or "").strip()
  if source == "generated":
    if directory or item_meta:
      raise ValueError("config.data.dir / config.data.item_meta do nothing for "
                       "source='generated' (it reads no files); leave them empty")
    g = data_config.get("generated") or {}
    ds = generated.generate(**{k: g[k] for k in _GENERATED_KEYS if k in g},
                            name=name or "generated")
  elif source == "movielens":
    from ilm_jax.data import movielens
    d = pathlib.Path(directory) if directory else resources.shared_data_dir() / "ml-1m"
    ds = movielens.load_movielens(d, name=name or "ml1m", tmdb=item_meta or None,
                                  use_tmdb=item_meta.lower() != "none")
    item_meta = "none"  # movies.dat (+ TMDB) already joined by the loader
  elif source == "openp5":
    from ilm_jax.data import openp5
    if directory:
      d = pathlib.Path(directory)
      name = name or d.name.lower()
    else:
      if name not in SHARED_OPENP5:
        raise ValueError(f"config.data.name={name!r} has no shared OpenP5 copy; valid: "
                         f"{', '.join(SHARED_OPENP5)} (or give --config.data.dir=PATH)")
      d = resources.shared_data_dir() / "openp5" / SHARED_OPENP5[name]
    ds = openp5.load_openp5(d, name=name)
  else:
    raise ValueError(f"data source {source!r} is unknown; valid: {', '.join(SOURCES)}")

  if source != "generated" and item_meta.lower() != "none":
    meta = pathlib.Path(item_meta) if item_meta else default_item_meta(ds.name)
    if meta is not None:
      ds = attach_item_meta(ds, meta)
  before = ds.stats()
  ds = filtering.kcore(ds, int(data_config.get("min_core", 0) or 0))
  log.info("dataset %s: %s -> %d-core %s", ds.name, before, data_config.get("min_core", 0),
           ds.stats())
  if ds.name != ds.name.lower():
    ds = dataclasses.replace(ds, name=ds.name.lower())  # results use lower case (SPEC §8)
  return ensure_tokens(ds)


def default_item_meta(name: str) -> pathlib.Path | None:
  """The shared item-text file for a known dataset name, or None (no text, e.g. clothing).

  beauty -> ``amazon-beauty/Amazon_Beauty.item``; ml1m -> ``ml-1m/movies.dat`` (the TMDB
  overviews in ``ml-1m/extra`` are picked up beside it).
  """
  rel = SHARED_ITEM_META.get(name.lower())
  path = None if rel is None else resources.shared_data_dir() / rel
  if path is None or not path.exists():
    return None
  return path


def attach_item_meta(ds: RecDataset, meta: pathlib.Path | str) -> RecDataset:
  """Joins item text/titles/attributes from ``meta`` by raw item id.

  Args:
    ds: the dataset (item ids are ASINs or MovieIDs as strings).
    meta: a RecBole ``.item`` TSV, a ``movies.dat``, or a folder containing ``movies.dat``.

  Returns:
    The dataset with item_text, item_titles and item_attrs filled ('' for items the file
    does not cover; a warning says how many).
  """
  meta = pathlib.Path(meta)
  if meta.is_dir():
    meta = meta / "movies.dat"
  if not meta.exists():
    raise DataError("item metadata file not found", path=str(meta))
  if meta.suffix == ".item":
    from ilm_jax.data import amazon
    table = amazon.load_amazon_items(meta)
  elif meta.name.endswith(".dat"):
    from ilm_jax.data import movielens
    table = movielens.load_movie_meta(meta, tmdb=movielens.find_tmdb(meta.parent))
  else:
    raise DataError("unknown item metadata format; expected a RecBole '.item' TSV or a "
                    "MovieLens 'movies.dat'", path=str(meta))
  return join_item_table(ds, table, str(meta))


def join_item_table(ds: RecDataset, table, source: str) -> RecDataset:
  """Joins an ``ItemTable`` (raw id -> text, title, attrs) onto ``ds`` by raw item id."""
  rows = [table.index.get(str(i), -1) for i in ds.item_ids]
  missing = sum(r < 0 for r in rows)
  if missing:
    log.warning("%s: %d of %d items have no metadata; their text is empty", source, missing,
                len(rows))
  text = [table.text[r] if r >= 0 else "" for r in rows]
  titles = [table.titles[r] if r >= 0 else "" for r in rows]
  attrs = dict(ds.item_attrs)
  for k, v in table.attrs.items():
    attrs[k] = [list(v[r]) if r >= 0 else [] for r in rows]
  return dataclasses.replace(ds, item_text=text, item_titles=titles, item_attrs=attrs)


def assign_random_item_tokens(num_items: int, seed: int = 0) -> list[str]:
  """OpenP5-style random indexing: a seeded permutation of '1001'..str(1000 + N)."""
  perm = np.random.default_rng(seed).permutation(num_items)
  return [str(1001 + int(p)) for p in perm]


def ensure_tokens(ds: RecDataset, seed: int = 0) -> RecDataset:
  """Fills missing item tokens (random indexing) and user tokens ('1'..'U' in order)."""
  changes = {}
  if ds.item_tokens is None:
    changes["item_tokens"] = assign_random_item_tokens(ds.num_items, seed)
  if ds.user_tokens is None:
    changes["user_tokens"] = [str(i + 1) for i in range(ds.num_users)]
  return dataclasses.replace(ds, **changes) if changes else ds
