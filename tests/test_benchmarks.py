"""Benchmark scripts still run (their numbers live in docs/; here only that they work)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from ilm_jax import resources


def test_phase2_step_prints_a_row_per_length():
  try:
    resources.smollm2_gguf()  # the tiny LLM uses SmolLM2's tokenizer
  except resources.MissingResourceError as e:
    pytest.skip(str(e))
  out = subprocess.run(
      [sys.executable, str(resources.REPO_ROOT / "benchmarks" / "phase2_step.py"), "--tiny",
       "--len", "48,64", "--steps", "1", "--answer", "8"],
      capture_output=True, text=True, timeout=600, check=True).stdout
  rows = re.findall(r"^\| tiny \| float32 \| 8 x (\d+) \|.*\|$", out, re.MULTILINE)
  assert rows == ["48", "64"], out
  loss = float(re.search(r"^loss (\S+);", out, re.MULTILINE).group(1))
  assert 0 < loss < 100  # a cross-entropy, finite
