r"""Prepare job: load a dataset, k-core filter it and store it as TFDS ArrayRecord.

  python -m ilm_jax.main --config=configs/prepare.py[:ARG] --workdir=DIR

ARG (comma-separated, optional):
  generated (default) | ml1m | beauty | clothing | movielens   the dataset:
      generated   the embedded catalogue (no files);
      ml1m, beauty, clothing   OpenP5's folders in ../shared/data/openp5 (any other
                  OpenP5 folder: ``--config.data.source=openp5 --config.data.dir=PATH``);
      movielens   MovieLens-1M raw files: ../shared/data/ml-1m, or
                  ``--config.data.dir=`` a folder, a local ``ml-1m.zip``, a ``file://`` or
                  ``https://`` URL (downloaded, size + sha256 checked, extracted).
  download   with movielens: fetch ``ml-1m.zip`` from GroupLens (needs a network).
  tiny       a small generated catalogue (tests); no effect on file datasets.

Writes DIR/data/<name> (or ``--config.data_dir``); re-running with unchanged inputs,
config and data code re-uses it.
"""

from __future__ import annotations

import ml_collections

from ilm_jax import config_lib

DATASETS = ("generated", "ml1m", "beauty", "clothing", "movielens")
GROUPLENS_ML1M = "https://files.grouplens.org/datasets/movielens/ml-1m.zip"


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The prepare job's config; ``arg`` as in the module docstring."""
  dataset, parts = config_lib.parse_config_arg(arg, config_file="configs/prepare.py",
                                               flags=("tiny", "download"), datasets=DATASETS)
  if "download" in parts and dataset != "movielens":
    raise config_lib.ConfigError(
        f"configs/prepare.py:{arg}: 'download' only applies to movielens (GroupLens ml-1m.zip)")

  c = ml_collections.ConfigDict()
  c.job = "prepare"
  if dataset == "generated":
    c.data = config_lib.data_config("generated")
  elif dataset == "movielens":
    c.data = config_lib.data_config("movielens")
    if "download" in parts:
      c.data.dir = GROUPLENS_ML1M
  else:
    c.data = config_lib.data_config("openp5", name=dataset)
  c.data_dir = ""     # '' = WORKDIR/data/<name>
  c.force = False     # rebuild even when the cached copy is up to date
  c.progress = True   # log counts / % while writing

  if "tiny" in parts and dataset == "generated":
    c.data.generated.update(dict(num_items=200, num_users=300, num_clusters=10))
  return c
