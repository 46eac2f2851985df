"""The prepare job and its config: CLI, cache re-use, validation, real data."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_store import assert_same_dataset

from ilm_jax import config_lib, resources
from ilm_jax.data import sources, store
from ilm_jax.jobs import prepare


def _get_config(arg: str = ""):
  return config_lib.load_config_file(resources.REPO_ROOT / "configs" / "prepare.py", arg)


def test_config_args_and_validation():
  assert _get_config().data.source == "generated"
  tiny = _get_config("tiny")
  assert tiny.data.generated.num_items == 200
  ml = _get_config("ml1m")
  assert (ml.data.source, ml.data.name) == ("openp5", "ml1m")
  assert _get_config("movielens").data.source == "movielens"
  assert _get_config("movielens,download").data.dir.startswith("https://files.grouplens.org/")
  with pytest.raises(config_lib.ConfigError, match="generated, ml1m, beauty, clothing, movielens"):
    _get_config("imdb")
  with pytest.raises(config_lib.ConfigError, match="only applies to movielens"):
    _get_config("beauty,download")


def test_run_writes_workdir_data_and_reuses_it(tmp_path, capsys):
  config = _get_config("tiny")
  first = prepare.run(config, str(tmp_path))
  assert first.built and first.path == tmp_path / "data" / "generated"
  out = capsys.readouterr().out
  expected = sources.load_dataset(config.data)
  s = expected.stats()
  assert f"users {s['users']:,}  items {s['items']:,}  interactions {s['interactions']:,}" in out
  assert_same_dataset(expected, store.load(first.path))

  again = prepare.run(config, str(tmp_path))
  assert not again.built and "re-used" in capsys.readouterr().out

  config.data.generated.seed = 1  # a different catalogue must not be served from the cache
  assert prepare.run(config, str(tmp_path)).built
  config.data_dir = str(tmp_path / "elsewhere")
  assert prepare.run(config, str(tmp_path)).path == tmp_path / "elsewhere"


def test_cli(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "ilm_jax.main", "--config=configs/prepare.py:tiny",
         f"--workdir={tmp_path}", "--config.data.generated.num_users=120"]
  res = subprocess.run(cmd, cwd=resources.REPO_ROOT, env=env, capture_output=True, text=True,
                       timeout=120, check=False)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "prepare: generated prepared in" in res.stdout
  info = store.read_info(tmp_path / "data" / "generated")
  assert info["stats"]["users"] == 120
  assert info["config"]["generated"]["num_users"] == 120
  # Progress lines with counts and percentages.
  assert "generated users: 120/120 (100%)" in res.stderr


def test_unknown_key_is_an_error(tmp_path):
  cmd = [sys.executable, "-m", "ilm_jax.main", "--config=configs/prepare.py:tiny",
         f"--workdir={tmp_path}", "--config.data.nonsense=1"]
  res = subprocess.run(cmd, cwd=resources.REPO_ROOT, capture_output=True, text=True,
                       timeout=120, check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert res.returncode != 0 and "nonsense" in res.stderr
  assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("override, message", [
    ("--config.data.source=foo", "config.data.source='foo' is not a dataset source"),
    ("--config.train.total_steps=4",
     "config.train.optimizer.warmup_steps=10 must be below the run's 4 steps")])
def test_invalid_config_value_is_one_line_error(tmp_path, override, message):
  # Rejected before the job starts: exit 2, the message, no traceback, nothing written.
  cmd = [sys.executable, "-m", "ilm_jax.main", "--config=configs/phase1.py:tiny",
         f"--workdir={tmp_path / 'w'}", override]
  res = subprocess.run(cmd, cwd=resources.REPO_ROOT, capture_output=True, text=True,
                       timeout=120, check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert res.returncode == 2, res.stderr[-2000:]
  assert f"ERROR (ConfigError): {message}" in res.stderr
  assert "Traceback" not in res.stderr
  assert not (tmp_path / "w").exists()


@pytest.mark.realdata
def test_real_ml1m_round_trips_through_the_store(shared_data, tmp_path):
  del shared_data  # the config finds ../shared/data itself
  config = _get_config("ml1m")
  prepared = prepare.run(config, str(tmp_path))
  assert prepared.info["stats"] == {"users": 6040, "items": 3416, "interactions": 999611}
  loaded = store.load(prepared.path)
  assert_same_dataset(sources.load_dataset(config.data), loaded)
