"""Adapter export: what a served ILM needs besides the frozen LLM, in one folder.

  DIR/adapter.safetensors   trainable params (item encoder + projection + retrieval head,
                            keys 'params/<path>'), the item-token cache 'cache/item_tokens'
                            float32[N, K, D], retrieval keys 'cache/item_keys' float32[N, R],
                            frozen CF tables 'cf/items' [N, d] and 'cf/users' [U, d]
  DIR/manifest.json         format, the LLM (config, name, sha256 of its file and of its
                            weights), dims (D, K, d, R, N, U), the dataset (name, label,
                            sha256 of item ids), the ILM skeleton (``models.ilm`` meta)
  DIR/catalogue.json        item ids/tokens/titles/texts/attributes, user tokens,
                            known users' histories (new items included)

``load`` rebuilds the skeleton on a frozen LLM and refuses (``LlmMismatchError``) an LLM
whose weights hash differs from the manifest's. Writes are atomic: everything goes to a
temporary sibling folder that replaces DIR in one rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import jax
import ml_collections
import numpy as np
import safetensors.numpy
from flax import nnx

from ilm_jax import partition
from ilm_jax.cf import mf
from ilm_jax.chat import catalogue as catalogue_lib
from ilm_jax.chat import model as model_lib
from ilm_jax.models import ilm as ilm_lib

FORMAT = "ilm_jax.adapter/1"
WEIGHTS, MANIFEST, CATALOGUE = "adapter.safetensors", "manifest.json", "catalogue.json"


class LlmMismatchError(ValueError):
  """The LLM given to ``load`` is not the one the adapter was trained on."""


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict):
      out.update(_flatten(v, key))
    else:
      out[key] = np.asarray(v)
  return out


def _unflatten_into(target: dict, flat: dict[str, np.ndarray], prefix: str, where: str) -> None:
  for k in list(target):
    key = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(target[k], dict):
      _unflatten_into(target[k], flat, key, where)
    else:
      if key not in flat:
        raise ValueError(f"{where}: missing tensor {key!r}")
      shape = tuple(np.shape(target[k]))
      if not shape and flat[key].shape == (1,):   # safetensors stores scalars as [1]
        flat[key] = flat[key].reshape(())
      if tuple(flat[key].shape) != shape:
        raise ValueError(f"{where}: {key!r} has shape {flat[key].shape}, the model expects "
                         f"{np.shape(target[k])}")
      target[k] = flat[key]


def llm_fingerprint(llm_model) -> str:
  """sha256 over the LLM's weights (paths, shapes, dtypes and bytes), in path order."""
  h = hashlib.sha256()
  flat = _flatten(nnx.to_pure_dict(nnx.state(llm_model, nnx.Param)))
  for k in sorted(flat):
    a = np.ascontiguousarray(flat[k])
    h.update(f"{k}:{a.shape}:{a.dtype};".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      h.update(chunk)
  return h.hexdigest()


def _llm_file(llm_cfg: dict[str, Any]) -> str | None:
  from ilm_jax import resources  # noqa: PLC0415
  src = llm_cfg.get("source") or str(resources.smollm2_gguf())
  return src if pathlib.Path(src).is_file() else None


def _ids_sha(ids) -> str:
  return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()


def save(directory: str | os.PathLike, served: model_lib.ServedModel, meta: dict[str, Any], *,
         dataset: str, item_ids, user_ids) -> pathlib.Path:
  """Writes the export of ``served`` (atomically); returns the folder.

  Args:
    directory: the export folder (replaced if present).
    served: the ServedModel (its current catalogue, new items included).
    meta: the ILM skeleton (``ilm.json`` of the trained model: variant, dims, LLM config).
    dataset: the dataset name; item_ids, user_ids: raw ids (new items get 'new:<i>').
  """
  directory = pathlib.Path(directory).absolute()
  ilm = served.ilm
  _, trainable, _ = partition.split_trainable(ilm, tuple(meta["frozen"]))
  tensors = {f"params/{k}": v for k, v in
             _flatten(jax.device_get(nnx.to_pure_dict(trainable))).items()}
  tensors.update({"cache/item_tokens": served.item_tokens, "cache/item_keys": served.item_keys,
                  "cf/items": served.cf_items, "cf/users": served.cf_users})
  tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  cat = served.catalogue
  item_ids = [str(i) for i in item_ids] + [f"new:{i}" for i in range(len(item_ids), len(cat))]
  llm_file = _llm_file(meta["llm"])
  manifest = {
      "format": FORMAT,
      "llm": {"config": meta["llm"], "name": pathlib.Path(llm_file).name if llm_file else
              meta["llm"].get("source", ""),
              "file_sha256": file_sha256(llm_file) if llm_file else None,
              "weights_sha256": llm_fingerprint(served.llm),
              "layers": served.llm.config.layers, "dim": served.llm.config.dim},
      "dims": {"llm_dim": int(served.item_tokens.shape[-1]), "soft_tokens": served.k,
               "cf_dim": int(served.cf_items.shape[1]),
               "retrieval_dim": int(served.item_keys.shape[1]),
               "num_items": len(cat), "num_users": int(len(served.cf_users))},
      "dataset": {"name": dataset, "label": served.label, "item_ids_sha256": _ids_sha(item_ids),
                  "num_items": len(cat)},
      "ilm": meta,
      "als": {"alpha": served.als.alpha, "reg": served.als.reg},
  }
  catalogue = {"item_ids": item_ids, "user_ids": [str(u) for u in user_ids],
               "tokens": cat.tokens, "titles": cat.titles, "texts": cat.texts,
               "attributes": cat.attrs, "user_tokens": served.user_tokens,
               "histories": [h.tolist() for h in served.histories]}
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=directory.parent, prefix=directory.name + ".tmp-"))
  try:
    safetensors.numpy.save_file(tensors, str(tmp / WEIGHTS))
    (tmp / CATALOGUE).write_text(json.dumps(catalogue))
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    old = None
    if directory.exists():
      old = directory.with_name(directory.name + ".old-" + tmp.name.rsplit("-", 1)[-1])
      os.replace(directory, old)
    os.replace(tmp, directory)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
  path = pathlib.Path(directory) / MANIFEST
  if not path.is_file():
    raise FileNotFoundError(f"{directory}: no adapter export ({MANIFEST} missing)")
  manifest = json.loads(path.read_text())
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
  return manifest


def load(directory: str | os.PathLike, llm_model=None, tokenizer=None
         ) -> model_lib.ServedModel:
  """The ServedModel of an export (item tokens from the cache: no encoder call).

  Args:
    directory: what ``save`` wrote.
    llm_model, tokenizer: the frozen LLM (default: loaded as the manifest says).

  Raises:
    LlmMismatchError: ``llm_model``'s weights are not the adapter's LLM.
  """
  directory = pathlib.Path(directory)
  manifest = read_manifest(directory)
  meta = manifest["ilm"]
  if llm_model is None or tokenizer is None:
    loaded, tok = ilm_lib.load_llm(ml_collections.ConfigDict(meta["llm"]))
    llm_model = llm_model or loaded
    tokenizer = tokenizer or tok
  want = manifest["llm"]["weights_sha256"]
  got = llm_fingerprint(llm_model)
  if got != want:
    raise LlmMismatchError(
        f"{directory}: the adapter was trained on LLM {manifest['llm']['name']!r} "
        f"({manifest['llm']['layers']} layers x {manifest['llm']['dim']}, weights sha256 "
        f"{want[:12]}...), but the given LLM ({llm_model.config.layers} layers x "
        f"{llm_model.config.dim}) has weights sha256 {got[:12]}...")
  flat = safetensors.numpy.load_file(str(directory / WEIGHTS))
  cat_json = json.loads((directory / CATALOGUE).read_text())
  model = ilm_lib._build(meta, llm_model, flat["cf/items"], flat["cf/users"])
  _, trainable, _ = partition.split_trainable(model, tuple(meta["frozen"]))
  target = nnx.to_pure_dict(trainable)
  _unflatten_into(target, {k[len("params/"):]: v for k, v in flat.items()
                           if k.startswith("params/")}, "", str(directory / WEIGHTS))
  nnx.replace_by_pure_dict(trainable, target)
  nnx.update(model, trainable)
  cat = catalogue_lib.Catalogue(cat_json["titles"], cat_json["texts"], cat_json["tokens"],
                                cat_json["attributes"])
  als = mf.ALSConfig(alpha=float(manifest["als"]["alpha"]), reg=float(manifest["als"]["reg"]))
  served = model_lib.ServedModel(
      model, tokenizer, cat, histories=[np.asarray(h, np.int32) for h in cat_json["histories"]],
      label=manifest["dataset"]["label"], user_tokens=cat_json["user_tokens"],
      item_tokens=flat["cache/item_tokens"], item_keys=flat["cache/item_keys"], als=als)
  served.manifest = manifest
  served.item_ids = cat_json["item_ids"]
  served.user_ids = cat_json["user_ids"]
  return served
