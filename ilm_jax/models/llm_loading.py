"""Load Llama-family weights into ``llm.Llm``: GGUF files and Hugging Face folders.

Both sources are first turned into a Hugging Face style state dict (numpy, PyTorch
``[out, in]`` layout, names like ``model.layers.0.self_attn.q_proj.weight``); one
converter (``hf_to_params``) then maps it onto the model and checks that every
checkpoint tensor is used and every parameter is filled.

GGUF tensors are dequantised with ``gguf.quants.dequantize`` (Q4_0/Q4_1/Q8_0/F16/BF16/
F32 and the other types that function supports) and llama.cpp's q/k row permutation is
undone. The converted state dict is cached under ``resources.cache_dir()`` keyed by the
source file's path, size and mtime, so later start-ups skip dequantisation.

  model, tokenizer = load("path/to/model.gguf")   # or an HF folder; None = SmolLM2
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ilm_jax import resources
from ilm_jax.models import llm

# Bump when the converted layout changes, so stale cache files are not reused.
_CACHE_VERSION = 1

GGUF_ARCHITECTURES = ("llama", "qwen2")
HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class LoadError(ValueError):
  """A checkpoint cannot be loaded; the message names the file/tensor and the reason."""


# ------------------------------------------------------------------ HF -> params


def _hf_layer_map(c: llm.LlmConfig, i: int) -> dict[str, tuple[tuple, Any]]:
  """HF tensor name -> (param path, fn from HF array to param array) for block i."""
  p = f"model.layers.{i}."
  d, h, kv, hd, = c.dim, c.heads, c.kv_heads, c.head_dim
  m = {
      p + "input_layernorm.weight": (("blocks", i, "attn_norm", "weight"), lambda w: w),
      p + "post_attention_layernorm.weight": (("blocks", i, "mlp_norm", "weight"), lambda w: w),
      p + "self_attn.q_proj.weight": (("blocks", i, "attn", "q_kernel"),
                                      lambda w: w.T.reshape(d, h, hd)),
      p + "self_attn.k_proj.weight": (("blocks", i, "attn", "k_kernel"),
                                      lambda w: w.T.reshape(d, kv, hd)),
      p + "self_attn.v_proj.weight": (("blocks", i, "attn", "v_kernel"),
                                      lambda w: w.T.reshape(d, kv, hd)),
      p + "self_attn.o_proj.weight": (("blocks", i, "attn", "o_kernel"),
                                      lambda w: w.T.reshape(h, hd, d)),
      p + "mlp.gate_proj.weight": (("blocks", i, "mlp", "gate_kernel"), lambda w: w.T),
      p + "mlp.up_proj.weight": (("blocks", i, "mlp", "up_kernel"), lambda w: w.T),
      p + "mlp.down_proj.weight": (("blocks", i, "mlp", "down_kernel"), lambda w: w.T),
  }
  if c.qkv_bias:
    m[p + "self_attn.q_proj.bias"] = (("blocks", i, "attn", "q_bias"), lambda b: b.reshape(h, hd))
    m[p + "self_attn.k_proj.bias"] = (("blocks", i, "attn", "k_bias"), lambda b: b.reshape(kv, hd))
    m[p + "self_attn.v_proj.bias"] = (("blocks", i, "attn", "v_bias"), lambda b: b.reshape(kv, hd))
  return m


def hf_name_map(c: llm.LlmConfig) -> dict[str, tuple[tuple, Any]]:
  """Every HF tensor name the model needs -> (param path, layout transform)."""
  m = {
      "model.embed_tokens.weight": (("embedding",), lambda w: w),
      "model.norm.weight": (("final_norm", "weight"), lambda w: w),
  }
  if not c.tie:
    m["lm_head.weight"] = (("lm_head",), lambda w: w.T)
  for i in range(c.layers):
    m.update(_hf_layer_map(c, i))
  return m


# Tensors some checkpoints carry that the computation does not need.
_IGNORED = re.compile(r"(.*rotary_emb\.inv_freq$)")


def hf_to_params(state_dict: Mapping[str, np.ndarray], config: llm.LlmConfig,
                 source: str = "checkpoint") -> dict[tuple, np.ndarray]:
  """Maps an HF-style state dict onto ``Llm`` parameter paths.

  Args:
    state_dict: HF name -> array in PyTorch layout.
    config: the architecture (decides tie / bias / layer count).
    source: file name used in error messages.

  Returns:
    param path tuple -> numpy array in the model's layout.

  Raises:
    LoadError: listing missing and unexpected tensors, or a shape mismatch.
  """
  names = hf_name_map(config)
  extra = [k for k in state_dict if k not in names and not _IGNORED.match(k)]
  if config.tie and "lm_head.weight" in extra:
    # Tied checkpoints sometimes store the head too; it must equal the embedding.
    if not np.array_equal(state_dict["lm_head.weight"], state_dict.get("model.embed_tokens.weight")):
      raise LoadError(f"{source}: tie_word_embeddings=True but lm_head.weight differs from "
                      "model.embed_tokens.weight")
    extra.remove("lm_head.weight")
  missing = [k for k in names if k not in state_dict]
  if missing or extra:
    raise LoadError(f"{source}: checkpoint does not match the {config.layers}-layer model.\n"
                    f"  missing tensors ({len(missing)}): {missing[:20]}\n"
                    f"  unexpected tensors ({len(extra)}): {extra[:20]}")
  return {path: np.asarray(fn(np.asarray(state_dict[name]))) for name, (path, fn) in names.items()}


def build_model(config: llm.LlmConfig, params: Mapping[tuple, np.ndarray],
                source: str = "checkpoint") -> llm.Llm:
  """Creates an ``Llm`` whose every parameter comes from ``params`` (no random init)."""
  abstract = nnx.eval_shape(lambda: llm.Llm(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  missing = [p for p in flat if p not in params]
  extra = [p for p in params if p not in flat]
  if missing or extra:
    raise LoadError(f"{source}: parameters not filled: {missing[:20]}; unknown: {extra[:20]}")
  pd = jnp.dtype(config.param_dtype)
  for path, var in flat.items():
    value = params[path]
    if tuple(value.shape) != tuple(var.shape):
      raise LoadError(f"{source}: parameter {'.'.join(map(str, path))} has shape "
                      f"{tuple(value.shape)}, the model expects {tuple(var.shape)}")
    var.set_value(jnp.asarray(value, dtype=pd))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ------------------------------------------------------------------ HF folders


def config_from_hf(cfg: Mapping[str, Any], source: str = "config.json") -> llm.LlmConfig:
  """LlmConfig from a Hugging Face config.json dict.

  Raises:
    LoadError: unsupported architecture, a missing key or a value of the wrong type/range.
  """
  if not isinstance(cfg, Mapping):
    raise LoadError(f"{source}: expected a JSON object, got {type(cfg).__name__}")
  try:
    return _check_config(_config_from_hf(cfg, source), source)
  except LoadError:
    raise
  except KeyError as e:
    raise LoadError(f"{source}: required key {e} is missing") from e
  except (TypeError, ValueError, AttributeError, IndexError, OverflowError,
          ZeroDivisionError) as e:
    raise LoadError(f"{source}: bad value ({type(e).__name__}: {e})") from e


def _check_config(c: llm.LlmConfig, source: str) -> llm.LlmConfig:
  """Sizes are positive ints (``LlmConfig`` itself checks that kv heads divide heads)."""
  for name in ("vocab", "dim", "layers", "heads", "kv_heads", "head_dim", "ffn"):
    v = getattr(c, name)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
      raise LoadError(f"{source}: {name}={v!r} must be a positive integer")
  return c


def _config_from_hf(cfg: Mapping[str, Any], source: str) -> llm.LlmConfig:
  archs = cfg.get("architectures") or [cfg.get("architecture", "")]
  arch = archs[0] if archs else ""
  if arch not in HF_ARCHITECTURES:
    raise LoadError(f"{source}: architecture {arch!r} is not supported; "
                    f"supported: {', '.join(HF_ARCHITECTURES)}")
  if cfg.get("hidden_act", "silu") != "silu":
    raise LoadError(f"{source}: hidden_act={cfg['hidden_act']!r}; only silu is supported")
  if cfg.get("mlp_bias"):
    raise LoadError(f"{source}: mlp_bias=True is not supported")
  rope = dict(cfg.get("rope_parameters") or {})
  scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default"
                                         else None)
  theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
  heads = cfg["num_attention_heads"]
  eos = cfg.get("eos_token_id", 2)
  eos_ids = tuple(eos) if isinstance(eos, list) else (eos,)
  pad = cfg.get("pad_token_id")
  return llm.LlmConfig(
      vocab=cfg["vocab_size"], dim=cfg["hidden_size"], layers=cfg["num_hidden_layers"],
      heads=heads, kv_heads=cfg.get("num_key_value_heads", heads),
      head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
      ffn=cfg["intermediate_size"], rope_theta=float(theta), rope_scaling=scaling,
      norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
      tie=bool(cfg.get("tie_word_embeddings", False)),
      qkv_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
      bos_id=int(cfg.get("bos_token_id") or 0), eos_ids=tuple(int(e) for e in eos_ids),
      pad_id=int(pad if pad is not None else eos_ids[0]),
      max_len=int(cfg.get("max_position_embeddings", 8192)))


def read_hf_state_dict(folder: pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of ``model.safetensors`` or the shards listed in its index."""
  from safetensors.numpy import load_file  # noqa: PLC0415

  index = folder / "model.safetensors.index.json"
  single = folder / "model.safetensors"
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
  elif single.exists():
    weight_map, shards = None, ["model.safetensors"]
  else:
    raise LoadError(f"{folder}: neither model.safetensors nor model.safetensors.index.json found")
  out: dict[str, np.ndarray] = {}
  for shard in shards:
    path = folder / shard
    if not path.exists():
      raise LoadError(f"{index}: shard {shard} is listed but {path} does not exist")
    for name, arr in load_file(str(path)).items():
      if weight_map is not None and weight_map.get(name) != shard:
        raise LoadError(f"{path}: tensor {name} is not listed for this shard in {index.name}")
      out[name] = arr.astype(np.float32) if arr.dtype != np.float32 else arr
  if weight_map is not None:
    absent = sorted(set(weight_map) - set(out))
    if absent:
      raise LoadError(f"{index}: tensors listed but not found in any shard: {absent[:20]}")
  return out


def load_hf(folder: str | os.PathLike, *, dtype: str = "float32",
            param_dtype: str = "float32") -> llm.Llm:
  """Loads a local Hugging Face Llama-family folder (config.json + safetensors)."""
  folder = pathlib.Path(folder)
  cfg_path = folder / "config.json"
  if not cfg_path.exists():
    raise LoadError(f"{folder}: config.json not found (expected a Hugging Face model folder)")
  try:
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise LoadError(f"{cfg_path}: not valid UTF-8 JSON ({e})") from e
  config = config_from_hf(cfg, str(cfg_path))
  config = config.replace(dtype=dtype, param_dtype=param_dtype)
  params = hf_to_params(read_hf_state_dict(folder), config, str(folder))
  return build_model(config, params, str(folder))


# ------------------------------------------------------------------ GGUF


def _field(reader, key: str, default: Any = None) -> Any:
  f = reader.fields.get(key)
  if f is None:
    return default
  return f.contents()


def config_from_gguf(reader, source: str = "gguf") -> llm.LlmConfig:
  """LlmConfig from GGUF metadata (``{arch}.*`` and ``tokenizer.ggml.*`` keys)."""
  arch = _field(reader, "general.architecture")
  if arch not in GGUF_ARCHITECTURES:
    raise LoadError(f"{source}: GGUF architecture {arch!r} is not supported; "
                    f"supported: {', '.join(GGUF_ARCHITECTURES)}")

  def need(key):
    v = _field(reader, f"{arch}.{key}")
    if v is None:
      raise LoadError(f"{source}: GGUF metadata key {arch}.{key} is missing")
    return v

  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names:
    raise LoadError(f"{source}: tensor rope_freqs.weight (Llama-3 rope scaling in GGUF) is "
                    "not supported; load the Hugging Face checkpoint instead")
  dim, heads = int(need("embedding_length")), int(need("attention.head_count"))
  tokens = _field(reader, "tokenizer.ggml.tokens")
  vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens) if tokens else None)
  if vocab is None:
    raise LoadError(f"{source}: cannot tell the vocabulary size ({arch}.vocab_size missing)")
  eos = _field(reader, "tokenizer.ggml.eos_token_id", 2)
  eot = _field(reader, "tokenizer.ggml.eot_token_id")
  eos_ids = tuple(dict.fromkeys(int(e) for e in (eos, eot) if e is not None))
  scaling = None
  stype = _field(reader, f"{arch}.rope.scaling.type")
  if stype == "linear":
    scaling = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
  elif stype not in (None, "none"):
    raise LoadError(f"{source}: {arch}.rope.scaling.type={stype!r} is not supported")
  pad = _field(reader, "tokenizer.ggml.padding_token_id")
  return llm.LlmConfig(
      vocab=int(vocab), dim=dim, layers=int(need("block_count")), heads=heads,
      kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
      head_dim=int(_field(reader, f"{arch}.attention.key_length", dim // heads)),
      ffn=int(need("feed_forward_length")),
      rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)), rope_scaling=scaling,
      norm_eps=float(need("attention.layer_norm_rms_epsilon")),
      tie="output.weight" not in names, qkv_bias="blk.0.attn_q.bias" in names,
      bos_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 1)), eos_ids=eos_ids,
      pad_id=int(pad if pad is not None else eos_ids[0]),
      max_len=int(_field(reader, f"{arch}.context_length", 8192)))


_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's per-head row interleave of attn_q/attn_k (weights or biases).

  llama.cpp stores rows as ``w.reshape(n_head, 2, hd/2, ...).swapaxes(1, 2)`` so that its
  RoPE can rotate adjacent pairs; our RoPE rotates half-split pairs.
  """
  rest = w.shape[1:]
  hd = w.shape[0] // n_head
  return w.reshape(n_head, hd // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _dequantize(tensor, source: str) -> np.ndarray:
  from gguf import quants  # noqa: PLC0415

  kind = tensor.tensor_type
  try:
    arr = quants.dequantize(tensor.data, kind)
  except NotImplementedError as e:
    raise LoadError(f"{source}: tensor {tensor.name} has quantisation type {kind.name}, "
                    f"which gguf.quants.dequantize does not support ({e})") from e
  shape = tuple(int(n) for n in reversed(tensor.shape))
  return np.ascontiguousarray(np.asarray(arr, dtype=np.float32).reshape(shape))


def gguf_state_dict(reader, config: llm.LlmConfig, source: str = "gguf") -> dict[str, np.ndarray]:
  """Dequantised GGUF tensors under Hugging Face names (q/k rows un-permuted)."""
  arch = _field(reader, "general.architecture")
  permute = arch == "llama"
  out = {}
  for t in reader.tensors:
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
    if m and m.group(2) in _GGUF_BLOCK:
      name = f"model.layers.{m.group(1)}.{_GGUF_BLOCK[m.group(2)]}"
    elif t.name in _GGUF_TO_HF:
      name = _GGUF_TO_HF[t.name]
    else:
      raise LoadError(f"{source}: tensor {t.name} has no mapping for architecture {arch!r}")
    w = _dequantize(t, source)
    if permute and m and m.group(2).startswith("attn_q."):
      w = unpermute_qk(w, config.heads)
    elif permute and m and m.group(2).startswith("attn_k."):
      w = unpermute_qk(w, config.kv_heads)
    out[name] = w
  return out


# Files up to this size are keyed by a content hash too (~0.25 s per 100 MB): a rewrite
# within the filesystem's timestamp granularity keeps size and mtime.
_HASH_LIMIT = 1 << 30


def cache_path(src: pathlib.Path, tag: str, suffix: str = ".safetensors") -> pathlib.Path:
  """Cache file for something derived from ``src``.

  Keyed by the resolved path, size, mtime and (for files up to 1 GiB) a sha256 of the
  content, plus the converter version.
  """
  st = src.stat()
  content = ""
  if st.st_size <= _HASH_LIMIT:
    with open(src, "rb") as f:
      content = hashlib.file_digest(f, "sha256").hexdigest()
  key = f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}|{content}|{_CACHE_VERSION}"
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  return resources.cache_dir() / f"{src.stem}.{tag}.{digest}{suffix}"


def atomic_write_text(path: pathlib.Path, text: str) -> None:
  """Writes a text file via a temporary file + rename (readers never see a partial file)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _atomic_save(tensors: dict[str, np.ndarray], path: pathlib.Path, meta: dict[str, str]) -> None:
  from safetensors.numpy import save_file  # noqa: PLC0415

  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
  os.close(fd)
  try:
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def gguf_reader(path: str | os.PathLike):
  """A ``gguf.GGUFReader`` with a clear error for a missing file."""
  import gguf  # noqa: PLC0415

  path = pathlib.Path(path)
  if not path.exists():
    raise LoadError(f"GGUF file {path} does not exist")
  try:
    return gguf.GGUFReader(str(path))
  except Exception as e:  # noqa: BLE001  (gguf raises ValueError, IndexError, ... on bad bytes)
    raise LoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def load_gguf_state_dict(path: str | os.PathLike, use_cache: bool = True,
                         reader=None) -> tuple[llm.LlmConfig, dict[str, np.ndarray]]:
  """(config, HF-style float32 state dict) of a GGUF file, via the converted-weight cache."""
  from safetensors import safe_open  # noqa: PLC0415
  from safetensors.numpy import load_file  # noqa: PLC0415

  path = pathlib.Path(path)
  if not path.exists():
    raise LoadError(f"GGUF file {path} does not exist")
  cache = cache_path(path, "f32")
  if use_cache and cache.exists():
    try:
      with safe_open(str(cache), framework="numpy") as f:
        meta = f.metadata()
      config = llm.LlmConfig(**_config_from_json(meta["llm_config"]))
      return config, load_file(str(cache))
    except Exception:  # noqa: BLE001  (a corrupt cache is rebuilt, never trusted)
      cache.unlink(missing_ok=True)
  reader = reader or gguf_reader(path)
  try:
    config = _check_config(config_from_gguf(reader, str(path)), str(path))
    sd = gguf_state_dict(reader, config, str(path))
  except LoadError:
    raise
  except (ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError,
          ZeroDivisionError) as e:  # a corrupt field or tensor that the reader let through
    raise LoadError(f"{path}: corrupt or inconsistent GGUF ({type(e).__name__}: {e})") from e
  if use_cache:
    try:
      _atomic_save(sd, cache, {"llm_config": _config_to_json(config), "source": str(path)})
    except OSError:
      pass  # a read-only cache dir only costs start-up time
  return config, sd


def _config_to_json(c: llm.LlmConfig) -> str:
  d = {f: getattr(c, f) for f in c.__dataclass_fields__}
  if d["rope_scaling"] is not None:
    d["rope_scaling"] = dict(d["rope_scaling"])
  return json.dumps(d)


def _config_from_json(s: str) -> dict:
  d = json.loads(s)
  d["eos_ids"] = tuple(d["eos_ids"])
  return d


def load_gguf(path: str | os.PathLike | None = None, *, dtype: str = "float32",
              param_dtype: str = "float32", use_cache: bool = True) -> llm.Llm:
  """Loads a GGUF file (default: the packaged SmolLM2-135M-Instruct Q4_1)."""
  path = pathlib.Path(path) if path else resources.smollm2_gguf()
  config, sd = load_gguf_state_dict(path, use_cache=use_cache)
  config = config.replace(dtype=dtype, param_dtype=param_dtype)
  return build_model(config, hf_to_params(sd, config, str(path)), str(path))


def load(source: str | os.PathLike | None = None, *, dtype: str = "float32",
         param_dtype: str = "float32"):
  """(model, tokenizer) from a .gguf file or an HF folder; None = packaged SmolLM2."""
  from ilm_jax import llm_tokenizer  # noqa: PLC0415

  path = pathlib.Path(source) if source else resources.smollm2_gguf()
  if path.is_dir():
    model = load_hf(path, dtype=dtype, param_dtype=param_dtype)
    tok = llm_tokenizer.LlmTokenizer.from_hf(path)
  elif path.suffix == ".gguf":
    model = load_gguf(path, dtype=dtype, param_dtype=param_dtype)
    tok = llm_tokenizer.LlmTokenizer.from_gguf(path)
  else:
    raise LoadError(f"{path}: expected a .gguf file or a Hugging Face model folder")
  return model, tok


def param_count(model: llm.Llm) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
