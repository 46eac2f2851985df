"""Test set-up: 8 CPU devices for mesh tests, float32 matmuls, and skips for absent data."""

from __future__ import annotations

import os
import pathlib

# Must happen before jax creates its backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "float32")

from ilm_jax import llm_tokenizer, resources  # noqa: E402


@pytest.fixture(scope="session")
def reference_dir() -> pathlib.Path:
  """ILM_REFERENCE_DIR (SPEC §8); tests skip cleanly when it is absent."""
  d = resources.reference_dir()
  if not d.is_dir():
    pytest.skip(f"reference fixtures not found at {d} (set ILM_REFERENCE_DIR)")
  return d


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """../shared/data (or ILM_DATA_DIR); tests skip cleanly when it is absent."""
  d = resources.shared_data_dir()
  if not d.is_dir():
    pytest.skip(f"real datasets not found at {d} (set ILM_DATA_DIR)")
  return d


@pytest.fixture(scope="session")
def smollm2_tok() -> llm_tokenizer.LlmTokenizer:
  """SmolLM2's tokenizer from its GGUF; tests skip cleanly when the package is absent."""
  try:
    return llm_tokenizer.LlmTokenizer.from_gguf(resources.smollm2_gguf())
  except resources.MissingResourceError as e:
    pytest.skip(str(e))
