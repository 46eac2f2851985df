r"""The whole pipeline in one job: prepare -> CF -> Phase 1 -> Phase 2 -> eval -> a chat.

  python -m ilm_jax.main --config=configs/pipeline.py[:ARG] --workdir=DIR

ARG (comma-separated, optional): a dataset (generated (default) | ml1m | beauty |
clothing) and ``tiny`` (seconds-scale settings used by the tests).

Each stage is the same job you can run alone with ``configs/<stage>.py``; its settings
live under ``config.<stage>`` (e.g. ``--config.cf.mf.iters=5``). ``config.data`` is shared:
it replaces every stage's own data section. ``--config.stages=cf,phase1`` runs a subset
(in pipeline order). The chat stage plays ``SAMPLE_CONVERSATION`` (a scripted multi-turn
conversation with item tokens and tool calls, printed as a transcript); replace it with
``--config.chat.messages='first message||second message'``.
"""

from __future__ import annotations

import pathlib

import ml_collections

from ilm_jax import config_lib
from ilm_jax.jobs.pipeline import STAGES

_HERE = pathlib.Path(__file__).resolve().parent

# Phase 1 at its default size (MiniLM-initialised, 600 item-text steps) takes hours on two
# CPU cores; the pipeline runs its CPU-budget size (docs/PHASE1.md) so the whole pipeline
# stays around 15 minutes. Run configs/phase1.py alone for the real thing.
# Every stage takes these (the movielens raw files: run prepare/cf with them instead).
DATASETS = ("generated", "ml1m", "beauty", "clothing")

CPU_BUDGET_ARGS = {"phase1": ("small",)}

# Turns are '||'-separated (configs/chat.py ``messages``).
SAMPLE_CONVERSATION = "||".join([
    "Hi! Can you recommend something for me?",
    "Find me something with a dark tone",
    "Tell me more about the first one",
])


def _stage_config(stage: str, arg: str) -> ml_collections.ConfigDict | None:
  path = _HERE / f"{stage}.py"
  if not path.exists():
    return None
  return config_lib.load_config_file(path, arg)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  dataset, flags = config_lib.parse_config_arg(arg, config_file="configs/pipeline.py",
                                               datasets=DATASETS)
  stage_arg = ",".join([dataset, *sorted(flags)])
  c = ml_collections.ConfigDict()
  c.job = "pipeline"
  c.data = config_lib.dataset_config(dataset, tiny="tiny" in flags)
  present = []
  for stage in STAGES:
    arg_words = [stage_arg] if "tiny" in flags else [stage_arg, *CPU_BUDGET_ARGS.get(stage, ())]
    sub = _stage_config(stage, ",".join(arg_words))
    if sub is not None:
      c[stage] = sub
      present.append(stage)
  c.stages = ",".join(present)
  if "chat" in c:
    c.chat.messages = SAMPLE_CONVERSATION
    c.chat.user = 0  # the first user's history seeds the sample session
  return c
