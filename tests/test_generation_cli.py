"""The generate job: one-shot generation and the multi-turn chat REPL (tiny model)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from configs import generate as generate_config
from ilm_jax import resources
from ilm_jax.jobs import generate as generate_job


@pytest.fixture(scope="module", autouse=True)
def _needs_smollm2():
  try:
    resources.smollm2_gguf()
  except resources.MissingResourceError as e:
    pytest.skip(str(e))


def test_chat_repl_multi_turn(tmp_path, monkeypatch):
  config = generate_config.get_config("chat,tiny")
  config.max_new_tokens = 4
  seen = []
  real_reply = generate_job.Generator.reply

  def spy(self, prompt_ids):
    seen.append(self.tok.decode(prompt_ids))
    return real_reply(self, prompt_ids)

  monkeypatch.setattr(generate_job.Generator, "reply", spy)
  out = io.StringIO()
  generate_job.run(config, str(tmp_path), stdin=io.StringIO("Hello there\n\nSecond turn\n"),
                   stdout=out)
  replies = [line for line in out.getvalue().splitlines() if line.startswith("assistant:")]
  assert len(replies) == 2  # the blank line is not a turn; EOF ends the session
  records = [json.loads(x) for x in (tmp_path / "generate.jsonl").read_text().splitlines()]
  assert [r["user"] for r in records] == ["Hello there", "Second turn"]
  # The second prompt carries the whole conversation, including the first reply.
  assert "Hello there" in seen[1] and "Second turn" in seen[1]
  assert seen[1].count("<|im_start|>assistant") == 2
  assert records[1]["prompt_tokens"] > records[0]["prompt_tokens"]
  assert all(1 <= len(r["ids"]) <= 4 for r in records)


def test_cli_prints_a_generation(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "ilm_jax.main", "--config=configs/generate.py:tiny",
       "--config.prompt=Name a fruit.", "--config.max_new_tokens=3", f"--workdir={tmp_path}"],
      capture_output=True, text=True, timeout=300, cwd=resources.REPO_ROOT,
      env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin",
           "HOME": str(tmp_path), "PYTHONPATH": str(resources.REPO_ROOT)})
  assert proc.returncode == 0, proc.stderr[-2000:]
  (record,) = [json.loads(x) for x in (tmp_path / "generate.jsonl").read_text().splitlines()]
  assert record["prompt"] == "Name a fruit." and 1 <= len(record["ids"]) <= 3
  assert proc.stdout.strip() == record["text"].strip()
