"""Config building blocks shared by ``configs/*.py``, and validation.

Configs are ml_collections ConfigDicts, locked by ``main`` so an unknown
``--config.key`` is an error. ``validate`` checks values (dataset names, ranges) and
lists the valid choices when one is wrong.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import pathlib
from collections.abc import Sequence

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
    min_core = config.data.get("min_core", 0)
    if isinstance(min_core, bool) or not isinstance(min_core, int) or min_core < 0:
      raise ConfigError(f"config.data.min_core={min_core!r} must be an integer >= 0")
  batching = config.get("batching")
  for key in ("group_by_length", "pad_multiple") if batching is not None else ():
    value = batching.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ConfigError(f"config.batching.{key}={value!r} must be an integer >= 0 (0 = off)")
  train = config.get("train")
  if train is not None and train.get("optimizer") is not None:
    opt = train.optimizer
    total = int(opt.get("total_steps", 0) or train.get("total_steps", 0) or 0)
    warmup = int(opt.get("warmup_steps", 0) or 0)
    if total > 0 and warmup >= total:
      raise ConfigError(
          f"config.train.optimizer.warmup_steps={warmup} must be below the run's {total} steps "
          f"(config.train.total_steps); for a run this short pass e.g. "
          f"--config.train.optimizer.warmup_steps={total // 10}")


# Datasets every job config accepts by name in its ``:arg``.
DATASET_ARGS = ("generated", "ml1m", "beauty", "clothing", "movielens")


def parse_config_arg(arg: str | None, *, config_file: str, flags: tuple[str, ...] = ("tiny",),
                     datasets: tuple[str, ...] = DATASET_ARGS,
                     default_dataset: str = "generated") -> tuple[str, set[str]]:
  """Parses a config ``:arg`` like ``ml1m,tiny`` into (dataset, flags).

  Args:
    arg: the text after ``configs/<job>.py:`` (comma-separated, case-insensitive).
    config_file: shown in errors, e.g. 'configs/phase1.py'.
    flags: words allowed besides one dataset name.
    datasets: dataset names allowed.
    default_dataset: used when no dataset is named.
  Returns:
    (dataset name, set of flags given).
  Raises:
    ConfigError: an unknown word or two datasets; the message lists the valid words.
  """
  parts = [p.strip().lower() for p in (arg or "").split(",") if p.strip()]
  names = [p for p in parts if p not in flags]
  bad = [p for p in names if p not in datasets]
  if bad or len(names) > 1:
    raise ConfigError(
        f"{config_file}:{arg} — {'unknown ' + ', '.join(bad) if bad else 'two datasets'}; "
        f"valid: one dataset of {', '.join(datasets)}"
        + (f", plus any of {', '.join(flags)}" if flags else ""))
  return (names[0] if names else default_dataset), {p for p in parts if p in flags}


def dataset_config(dataset: str, tiny: bool = False) -> ml_collections.ConfigDict:
  """``config.data`` for a dataset named in a config arg (see DATASET_ARGS).

  generated -> the embedded catalogue (tiny: 200 items, 300 users); ml1m/beauty/clothing ->
  the OpenP5 shared copies; movielens -> MovieLens-1M raw files from the shared copy.
  """
  if dataset == "generated":
    c = data_config("generated")
    if tiny:
      c.generated.update(dict(num_items=200, num_users=300, num_clusters=10))
    return c
  if dataset == "movielens":
    return data_config("movielens")
  return data_config("openp5", name=dataset)


def pick_one(flags: set[str], options, default: str, *, config_file: str, what: str) -> str:
  """The one word of ``options`` in ``flags`` (``default`` when none); ConfigError for two."""
  chosen = [o for o in options if o in flags]
  if len(chosen) > 1:
    raise ConfigError(f"{config_file}: give at most one {what} of {', '.join(options)}; "
                      f"got {', '.join(chosen)}")
  return chosen[0] if chosen else default


def load_config_file(path: str | os.PathLike, arg: str = "") -> ml_collections.ConfigDict:
  """``get_config(arg)`` of a config file given by path (how configs reuse each other).

  Args:
    path: a ``configs/<job>.py`` file.
    arg: what would follow ``:`` on the command line.
  """
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f"ilm_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def load_config(config_arg: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """A config from ``"configs/<job>.py[:ARG]"`` plus ``KEY=VALUE`` overrides (for scripts).

  Values are Python literals where they parse (``0.088``, ``True``, ``'a,b'``), else plain
  strings, as ``--config.KEY=VALUE`` on the command line.

  Raises:
    ConfigError: an override names no key of the config.
  """
  path, _, arg = config_arg.partition(":")
  config = load_config_file(path, arg)
  known = set(_flat_keys(config))
  for item in overrides:
    key, _, value = item.partition("=")
    if key not in known:
      raise ConfigError(f"{item!r}: {config_arg} has no key {key!r}")
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a plain string
    config.update_from_flattened_dict({key: value})
  return config


def _flat_keys(config, prefix: str = "") -> list[str]:
  """Dotted paths of every leaf of a ConfigDict."""
  keys = []
  for k, v in config.items():
    keys += _flat_keys(v, f"{prefix}{k}.") if hasattr(v, "items") else [prefix + k]
  return keys
