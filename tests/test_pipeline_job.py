"""The pipeline job: stages share one workdir and run in pipeline order."""

import json

import pytest

from ilm_jax import config_lib, resources
from ilm_jax.jobs import pipeline


def _config(arg):
  return config_lib.load_config_file(resources.REPO_ROOT / "configs" / "pipeline.py", arg)


def test_every_stage_has_a_config_and_a_scripted_chat():
  c = _config("tiny")
  assert c.stages.split(",") == list(pipeline.STAGES)
  assert c.chat.messages.count("||") >= 1  # multi-turn, never waits on stdin


def test_stages_share_data_and_run_in_pipeline_order(tmp_path, capsys):
  c = _config("tiny")
  c.stages = "cf,prepare"  # given out of order
  c.data.generated.seed = 3  # the shared data section reaches every stage
  pipeline.run(c, str(tmp_path))
  out = capsys.readouterr().out
  assert out.index("stage 1/2: prepare") < out.index("stage 2/2: cf")
  info = json.loads((tmp_path / "data" / "generated" / "info.json").read_text())
  assert info["config"]["generated"]["seed"] == 3
  records = json.loads((tmp_path / "results.json").read_text())
  assert {r["method"] for r in records} == {"mf"}


def test_unknown_stage_lists_valid_ones(tmp_path):
  c = _config("tiny")
  c.stages = "prepare,bogus"
  with pytest.raises(config_lib.ConfigError, match="bogus.*valid stages: prepare, cf"):
    pipeline.run(c, str(tmp_path))
