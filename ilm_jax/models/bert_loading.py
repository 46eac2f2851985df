"""Loading PyTorch-named BERT / BLIP-2 weights (safetensors) into our NNX modules.

Three sources:
* ``load_blip2_qformer``: a transformers ``Blip2ForImageTextRetrieval`` / ``Blip2QFormerModel``
  state dict (the reference fixture ``reference/qformer/weights.safetensors``);
* ``init_text_tower_from_bert``: a BERT checkpoint (all-MiniLM-L6-v2, or a local
  bert-base folder: first N layers) into the Q-Former's text tower, query FFNs copied from
  the text FFNs, a ``[DEC]`` row added to the vocabulary;
* ``load_bert_encoder``: the same checkpoint into a plain ``minilm.BertEncoder``.

PyTorch ``Linear`` weights are ``[out, in]``; our kernels are ``[in, out]``. Every copy
checks shapes and names the tensor when they disagree. Only safetensors are read (no
PyTorch at run time).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

from ilm_jax.models import layers

Weights = Mapping[str, np.ndarray]


class WeightLoadError(ValueError):
  """A checkpoint does not fit the module (missing tensor, wrong shape, unused tensors)."""


def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of a ``.safetensors`` file (or of ``model.safetensors`` in a folder)."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "model.safetensors"
  if not path.exists():
    raise WeightLoadError(f"{path}: no such safetensors file (only safetensors are supported)")
  return load_file(str(path))


class _Reader:
  """Takes tensors by name, checks shapes, remembers what was used."""

  def __init__(self, weights: Weights, source: str, prefix: str = ""):
    self.w = weights
    self.source = source
    self.prefix = prefix
    self.used: set[str] = set()

  def get(self, name: str) -> np.ndarray:
    full = self.prefix + name
    if full not in self.w:
      raise WeightLoadError(f"{self.source}: tensor {full!r} missing")
    self.used.add(full)
    return np.asarray(self.w[full], np.float32)

  def has(self, name: str) -> bool:
    return self.prefix + name in self.w

  def unused(self, ignore_prefixes: tuple[str, ...] = ()) -> list[str]:
    return sorted(k for k in self.w if k not in self.used
                  and not any(k.startswith(p) for p in ignore_prefixes))


def _assign(var: nnx.Variable, value: np.ndarray, what: str) -> None:
  if tuple(var.shape) != tuple(value.shape):
    raise WeightLoadError(f"{what}: checkpoint shape {tuple(value.shape)} does not fit our "
                          f"parameter shape {tuple(var.shape)}")
  var[...] = jnp.asarray(value, var.dtype)


def _linear(mod: nnx.Linear, r: _Reader, name: str) -> None:
  _assign(mod.kernel, r.get(name + ".weight").T, r.prefix + name + ".weight")
  _assign(mod.bias, r.get(name + ".bias"), r.prefix + name + ".bias")


def _norm(mod: nnx.LayerNorm, r: _Reader, name: str) -> None:
  _assign(mod.scale, r.get(name + ".weight"), r.prefix + name + ".weight")
  _assign(mod.bias, r.get(name + ".bias"), r.prefix + name + ".bias")


def _attention(mod: layers.Attention, r: _Reader, qkv: str, out: str) -> None:
  """``qkv`` = prefix of query/key/value, ``out`` = prefix of output.{dense,LayerNorm}."""
  _linear(mod.query, r, qkv + ".query")
  _linear(mod.key, r, qkv + ".key")
  _linear(mod.value, r, qkv + ".value")
  _linear(mod.out, r, out + ".dense")
  _norm(mod.norm, r, out + ".LayerNorm")


def _ffn(mod: layers.FeedForward, r: _Reader, up: str, down: str) -> None:
  _linear(mod.up, r, up + ".dense")
  _linear(mod.down, r, down + ".dense")
  _norm(mod.norm, r, down + ".LayerNorm")


# ---------------------------------------------------------------- BLIP-2 (reference)

def load_blip2_qformer(model, weights: Weights, source: str = "blip2 weights") -> list[str]:
  """Copies a transformers BLIP-2 Q-Former state dict into ``model`` (a ``QFormer``).

  Names: ``query_tokens``, ``embeddings.*``, ``qformer.layernorm``, ``qformer.encoder.layer.i``
  (``attention``, ``crossattention``, ``intermediate[_query]``, ``output[_query]``),
  ``vision_projection`` -> item_proj, ``text_projection``, ``itm_head``.

  Returns:
    Our parameters the checkpoint does not provide (left as initialised): the CF-memory
    projection, the LM head transform/bias, the temperatures.

  Raises:
    WeightLoadError: a tensor is missing or misshaped, or a Q-Former tensor is unused.
  """
  cfg = model.cfg
  r = _Reader(weights, source)
  qt = r.get("query_tokens")
  _assign(model.query_tokens, qt.reshape(qt.shape[-2:]), "query_tokens")
  _assign(model.embeddings.word.embedding, r.get("embeddings.word_embeddings.weight"),
          "embeddings.word_embeddings.weight")
  _assign(model.embeddings.position.embedding, r.get("embeddings.position_embeddings.weight"),
          "embeddings.position_embeddings.weight")
  _norm(model.embed_norm, r, "qformer.layernorm")
  for i, layer in enumerate(model.layers):
    p = f"qformer.encoder.layer.{i}."
    _attention(layer.self_attention, r, p + "attention.attention", p + "attention.output")
    if layer.cross_attention is not None:
      _attention(layer.cross_attention, r, p + "crossattention.attention",
                 p + "crossattention.output")
    elif r.has(p + "crossattention.attention.query.weight"):
      raise WeightLoadError(f"{source}: layer {i} has cross-attention but our config "
                            f"(cross_attention_frequency={cfg.cross_attention_frequency}) "
                            "has none there")
    _ffn(layer.ffn, r, p + "intermediate", p + "output")
    _ffn(layer.ffn_query, r, p + "intermediate_query", p + "output_query")
  _linear(model.item_proj, r, "vision_projection")
  _linear(model.text_proj, r, "text_projection")
  _linear(model.itm_head, r, "itm_head")
  unused = r.unused(ignore_prefixes=("vision_model.", "language_model.", "language_projection."))
  if unused:
    raise WeightLoadError(f"{source}: tensors not used by our Q-Former "
                          f"(config mismatch?): {unused[:8]}{' ...' if len(unused) > 8 else ''}")
  return ["memory.*", "lm_head.*", "temp", "temp_pair"]


# ---------------------------------------------------------------- BERT checkpoints

def _bert_prefix(weights: Weights, source: str) -> str:
  for p in ("", "bert.", "model.bert.", "model."):
    if p + "embeddings.word_embeddings.weight" in weights:
      return p
  raise WeightLoadError(f"{source}: no 'embeddings.word_embeddings.weight' (is it a BERT "
                        "checkpoint?)")


def _bert_num_layers(weights: Weights, prefix: str) -> int:
  n = 0
  while f"{prefix}encoder.layer.{n}.attention.self.query.weight" in weights:
    n += 1
  return n


def _load_bert_embeddings(emb: layers.TextEmbeddings, norm: nnx.LayerNorm, r: _Reader,
                          extra_rows_from: int | None) -> None:
  """Word/position tables and embedding LayerNorm. Token type 0 folds into positions.

  ``extra_rows_from``: when our vocab is larger than the checkpoint's, the extra rows
  (``[DEC]``) start as a copy of this row ([CLS]: also a sequence-start token).
  """
  word = r.get("embeddings.word_embeddings.weight")
  ours = emb.word.embedding
  if ours.shape[0] > word.shape[0]:
    if extra_rows_from is None:
      raise WeightLoadError(f"{r.source}: vocab {word.shape[0]} < ours {ours.shape[0]}")
    extra = np.repeat(word[extra_rows_from][None], ours.shape[0] - word.shape[0], axis=0)
    word = np.concatenate([word, extra], axis=0)
  _assign(ours, word, r.prefix + "embeddings.word_embeddings.weight")
  pos = r.get("embeddings.position_embeddings.weight")
  if r.has("embeddings.token_type_embeddings.weight"):
    pos = pos + r.get("embeddings.token_type_embeddings.weight")[0][None]
  npos = emb.position.embedding.shape[0]
  if npos > pos.shape[0]:
    raise WeightLoadError(f"{r.source}: checkpoint has {pos.shape[0]} positions, we need {npos}")
  _assign(emb.position.embedding, pos[:npos], r.prefix + "embeddings.position_embeddings.weight")
  _norm(norm, r, "embeddings.LayerNorm")


def _load_bert_layer(attn: layers.Attention, ffn: layers.FeedForward, r: _Reader, i: int):
  p = f"encoder.layer.{i}."
  _attention(attn, r, p + "attention.self", p + "attention.output")
  _ffn(ffn, r, p + "intermediate", p + "output")


def init_text_tower_from_bert(model, weights: Weights, source: str = "bert checkpoint") -> dict:
  """Initialises a ``QFormer``'s text tower from BERT weights (MiniLM or bert-base).

  Copies: word embeddings (+ ``[DEC]`` rows = copy of [CLS]), positions (+ token type 0),
  embedding LayerNorm, per layer self-attention and the text FFN from the first
  ``cfg.num_layers`` checkpoint layers; the query FFNs start as copies of the text FFNs; the
  LM-head transform comes from ``cls.predictions`` when the checkpoint has it. New (left
  random): query tokens, cross-attention, CF memory, projections, ITM head.

  Returns:
    ``{'layers_used': N, 'checkpoint_layers': n, 'lm_head': bool}``.
  """
  cfg = model.cfg
  prefix = _bert_prefix(weights, source)
  n = _bert_num_layers(weights, prefix)
  if cfg.num_layers > n:
    raise WeightLoadError(f"{source}: has {n} layers, the Q-Former config wants "
                          f"{cfg.num_layers}")
  r = _Reader(weights, source, prefix)
  _load_bert_embeddings(model.embeddings, model.embed_norm, r, cfg.cls_token_id)
  for i, layer in enumerate(model.layers):
    _load_bert_layer(layer.self_attention, layer.ffn, r, i)
    layer.reset_query_ffn()
  has_lm = "cls.predictions.transform.dense.weight" in weights
  if has_lm:
    rc = _Reader(weights, source, "cls.predictions.")
    _linear(model.lm_head.transform, rc, "transform.dense")
    _norm(model.lm_head.norm, rc, "transform.LayerNorm")
    bias = rc.get("bias")
    v = model.lm_head.bias.shape[0]
    if v > bias.shape[0]:
      bias = np.concatenate([bias, np.zeros(v - bias.shape[0], np.float32)])
    _assign(model.lm_head.bias, bias, "cls.predictions.bias")
  return {"layers_used": cfg.num_layers, "checkpoint_layers": n, "lm_head": has_lm}


def load_bert_encoder(model, weights: Weights, source: str = "bert checkpoint") -> None:
  """Loads a BERT checkpoint into a ``minilm.BertEncoder`` (all of its layers)."""
  prefix = _bert_prefix(weights, source)
  n = _bert_num_layers(weights, prefix)
  if len(model.layers) != n:
    raise WeightLoadError(f"{source}: has {n} layers, the encoder has {len(model.layers)}")
  r = _Reader(weights, source, prefix)
  _load_bert_embeddings(model.embeddings, model.embed_norm, r, None)
  for i, layer in enumerate(model.layers):
    _load_bert_layer(layer.self_attention, layer.ffn, r, i)


def bert_config_fields(weights: Weights, source: str = "bert checkpoint") -> dict:
  """Shape facts of a BERT checkpoint: vocab, hidden, layers, intermediate, positions."""
  prefix = _bert_prefix(weights, source)
  vocab, hidden = weights[prefix + "embeddings.word_embeddings.weight"].shape
  return dict(
      vocab_size=int(vocab), hidden_size=int(hidden),
      num_layers=_bert_num_layers(weights, prefix),
      intermediate_size=int(weights[prefix + "encoder.layer.0.intermediate.dense.weight"].shape[0]),
      max_position_embeddings=int(weights[prefix + "embeddings.position_embeddings.weight"].shape[0]))


def read_bert_config(model_dir: str | pathlib.Path) -> dict:
  """``config.json`` of a BERT checkpoint folder (HF layout) as a dict."""
  path = pathlib.Path(model_dir) / "config.json"
  if not path.exists():
    raise WeightLoadError(f"{path}: missing (need the BERT config for the number of heads)")
  c = json.loads(path.read_text())
  if c.get("hidden_act", "gelu") != "gelu":
    raise WeightLoadError(f"{path}: hidden_act {c.get('hidden_act')!r}; only exact 'gelu'")
  return c


def qformer_from_bert_dir(model_dir: str | pathlib.Path, *, rngs: nnx.Rngs,
                          num_layers: int | None = None, **overrides):
  """A ``QFormer`` whose text tower starts from the BERT checkpoint in ``model_dir``.

  Args:
    model_dir: folder with ``model.safetensors`` and ``config.json`` (all-MiniLM-L6-v2:
      ``resources.minilm_dir()``; or a local bert-base folder).
    rngs: for the new weights.
    num_layers: take the first N layers (default: all of them).
    **overrides: other ``QFormerConfig`` fields (num_query_tokens, cf_dim, ...).

  Returns:
    ``(model, info)``; ``info`` as ``init_text_tower_from_bert``.
  """
  from ilm_jax.models import qformer  # noqa: PLC0415  (qformer does not import us)

  bert = read_bert_config(model_dir)
  weights = read_safetensors(model_dir)
  fields = bert_config_fields(weights, str(model_dir))
  cfg = qformer.QFormerConfig(**{
      "vocab_size": fields["vocab_size"] + 1,
      "hidden_size": fields["hidden_size"],
      "num_layers": fields["num_layers"] if num_layers is None else num_layers,
      "num_heads": bert["num_attention_heads"],
      "intermediate_size": fields["intermediate_size"],
      "max_position_embeddings": fields["max_position_embeddings"],
      "layer_norm_eps": bert.get("layer_norm_eps", 1e-12),
      "dec_token_id": fields["vocab_size"],
      **overrides})
  model = qformer.QFormer(cfg, rngs=rngs)
  info = init_text_tower_from_bert(model, weights, str(model_dir))
  return model, info
