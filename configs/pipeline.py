r"""The whole pipeline in one job: prepare -> CF -> Phase 1 -> Phase 2 -> eval -> a chat.

  python -m ilm_jax.main --config=configs/pipeline.py[:ARG] --workdir=DIR

ARG (comma-separated, optional): a dataset (generated (default) | ml1m | beauty |
clothing | movielens) and ``tiny`` (seconds-scale settings used by the tests).

Each stage is the same job you can run alone with ``configs/<stage>.py``; its settings
live under ``config.<stage>`` (e.g. ``--config.cf.mf.iters=5``). ``config.data`` is shared:
it replaces every stage's own data section. Stages whose job is not available yet are
listed by ``--config.stages`` and skipped with a message.
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

from ilm_jax import config_lib

STAGES = ("prepare", "cf", "phase1", "phase2", "eval", "chat")
_HERE = pathlib.Path(__file__).resolve().parent


def _stage_config(stage: str, arg: str) -> ml_collections.ConfigDict | None:
  path = _HERE / f"{stage}.py"
  if not path.exists():
    return None
  spec = importlib.util.spec_from_file_location(f"ilm_configs_{stage}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  dataset, flags = config_lib.parse_config_arg(arg, config_file="configs/pipeline.py")
  stage_arg = ",".join([dataset, *sorted(flags)])
  c = ml_collections.ConfigDict()
  c.job = "pipeline"
  c.data = config_lib.dataset_config(dataset, tiny="tiny" in flags)
  present = []
  for stage in STAGES:
    sub = _stage_config(stage, stage_arg)
    if sub is not None:
      c[stage] = sub
      present.append(stage)
  c.stages = ",".join(present)
  return c
