"""Config building blocks shared by ``configs/*.py``, and validation.

Configs are ml_collections ConfigDicts, locked by ``main`` so an unknown
``--config.key`` is an error. ``validate`` checks values (dataset names, ranges) and
lists the valid choices when one is wrong.
"""

from __future__ import annotations

import ml_collections

DATA_SOURCES = ("generated", "movielens", "openp5")


class ConfigError(ValueError):
  """A config value is invalid; the message says which key and what is allowed."""


def data_config(source: str = "generated", **overrides) -> ml_collections.ConfigDict:
  """The ``config.data`` section every job shares.

  Keys:
    source: generated | movielens | openp5.
    dir: input folder (movielens: ratings.dat/movies.dat or the derived files; openp5:
      user_sequence.txt + index files). '' = the copy in ../shared/data for known names.
    name: dataset name used in results; '' = derived ('generated', 'ml1m', folder name).
    item_meta: optional item-text file (RecBole .item TSV for Amazon; TMDB overview TSV
      for MovieLens). '' = the shared copy when one exists.
    min_core: k-core filter applied before splitting (OpenP5 uses 5).
    generated: size and seed of the generated catalogue.
  """
  c = ml_collections.ConfigDict()
  c.source = source
  c.dir = ""
  c.name = ""
  c.item_meta = ""
  c.min_core = 5
  c.generated = ml_collections.ConfigDict(dict(
      seed=0, num_items=1000, num_users=2000, num_clusters=40, min_len=8, max_len=40))
  c.update(overrides)
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for values no job can use."""
  if "data" in config:
    src = config.data.source
    if src not in DATA_SOURCES:
      raise ConfigError(
          f"config.data.source={src!r} is not a dataset source; valid: {', '.join(DATA_SOURCES)}")
    if src == "openp5" and not config.data.dir and not config.data.name:
      raise ConfigError(
          "config.data.source='openp5' needs --config.data.dir=PATH (an OpenP5-format folder) "
          "or --config.data.name=ml1m|beauty|clothing for the shared copies")
