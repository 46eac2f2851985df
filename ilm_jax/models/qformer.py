"""The Q-Former item encoder (BLIP-2 / LAVIS semantics, SPEC §3).

A BERT-style encoder over ``[K learned query tokens ; L text tokens]``:

* the embedding LayerNorm normalises the whole input (queries get no position embedding;
  text positions are 0..L-1 even in the joint pass);
* query positions cross-attend to the CF "memory" in layers 0, f, 2f, ... (f =
  ``cross_attention_frequency``); text never sees the memory directly;
* query positions use their own FFN (``ffn_query``, initialised as a copy of the text FFN
  when loading a text checkpoint), text positions the text FFN (``ffn``).

The CF memory is ``CFMemory(cf_vec)``: a learned expansion of the CF vector into M tokens
(M = 1 by default: with one key, cross-attention softmax is the constant 1, so each layer
just adds a projection of the memory; M > 1 makes it a real attention).

Passes (one method each, masks from ``ilm_jax.masks``):
  ``query_pass``  queries + memory                (ITC item side, II/UI, Phase 2 soft tokens)
  ``text_pass``   text only                       (ITC text side)
  ``joint_pass``  bidirectional queries + text    (ITM)
  ``itg_pass``    UniLM mask, ``[DEC]`` BOS       (ITG)

Parameter tree (reference ``Blip2QFormerModel`` name in brackets, see ``bert_loading``):
  query_tokens [query_tokens], embeddings.{word,position} [embeddings.*],
  embed_norm [qformer.layernorm], layers[i].{self_attention, cross_attention (every f-th),
  ffn [intermediate/output], ffn_query [intermediate_query/output_query]},
  memory.{proj, norm} (new), item_proj [vision_projection], text_proj [text_projection],
  itm_head [itm_head], lm_head (BERT ``cls.predictions`` transform + bias, decoder tied to
  ``embeddings.word``), temp / temp_pair (learnable temperatures).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ilm_jax import masks
from ilm_jax.models import layers
from ilm_jax.partition import logical_param

# BERT uncased special ids (all-MiniLM-L6-v2 / bert-base-uncased vocab).
BERT_PAD_ID = 0
BERT_CLS_ID = 101
BERT_SEP_ID = 102
BERT_VOCAB_SIZE = 30522
DEC_TOKEN = "[DEC]"


@dataclasses.dataclass(frozen=True)
class QFormerConfig:
  """Q-Former size and options. Defaults: the MiniLM-initialised default model.

  Attributes:
    vocab_size: text vocabulary incl. the added ``[DEC]`` token (BERT 30522 + 1).
    hidden_size: H.
    num_layers: number of Q-Former layers.
    num_heads: attention heads.
    intermediate_size: FFN width.
    max_position_embeddings: longest text.
    layer_norm_eps: LayerNorm epsilon (1e-12 for BERT).
    cross_attention_frequency: layers ``i % f == 0`` cross-attend to the memory.
    num_query_tokens: K.
    cf_dim: width of the CF vectors fed to ``CFMemory``.
    memory_dim: width of a memory token (cross-attention key/value input); None = H.
    num_memory_tokens: M memory tokens made from one CF vector.
    proj_dim: width of the contrastive space (item_proj / text_proj).
    initializer_range: stddev of the normal init of new weights.
    cross_attention_init_std: stddev of the cross-attention layers' init; None =
      ``initializer_range`` (BLIP-2). With one memory token and BERT's 0.02 the item's
      share of a query output at init is ~5% at H=128 (different items' features have
      cosine 0.998), so ITC starts on a plateau; ~1/sqrt(H) lifts it (docs/PHASE1.md).
    temp_init: initial value of the learnable temperatures.
    dec_token_id: id of ``[DEC]`` (the ITG BOS); None = no decoder token.
    cls_token_id: id of ``[CLS]``.
    pad_token_id: id of ``[PAD]``.
    dtype: compute dtype name ('float32' or 'bfloat16'); params stay float32.
    remat: recompute each layer's activations in the backward pass (less memory, ~1/3
      more compute).
  """

  vocab_size: int = BERT_VOCAB_SIZE + 1
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  layer_norm_eps: float = 1e-12
  cross_attention_frequency: int = 2
  num_query_tokens: int = 8
  cf_dim: int = 64
  memory_dim: int | None = None
  num_memory_tokens: int = 1
  proj_dim: int = 256
  initializer_range: float = 0.02
  cross_attention_init_std: float | None = None
  temp_init: float = 0.07
  dec_token_id: int | None = BERT_VOCAB_SIZE
  cls_token_id: int = BERT_CLS_ID
  pad_token_id: int = BERT_PAD_ID
  dtype: str = "float32"
  remat: bool = False

  @property
  def mem_dim(self) -> int:
    return self.hidden_size if self.memory_dim is None else self.memory_dim

  def has_cross_attention(self, layer: int) -> bool:
    return layer % self.cross_attention_frequency == 0

  @classmethod
  def from_blip2_json(cls, path: str | pathlib.Path, **overrides: Any) -> QFormerConfig:
    """The config of a transformers ``Blip2Config`` ``config.json`` (reference fixture).

    The HF model has no ``[DEC]`` token and feeds ``encoder_hidden_states`` directly,
    so ``memory_dim`` = ``encoder_hidden_size`` and ``cf_dim`` defaults to it too.
    """
    path = pathlib.Path(path)
    try:
      top = json.loads(path.read_text())
      q = top["qformer_config"]
      if q.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act {q['hidden_act']!r} (only exact 'gelu' is supported)")
      fields = dict(
          vocab_size=q["vocab_size"], hidden_size=q["hidden_size"],
          num_layers=q["num_hidden_layers"], num_heads=q["num_attention_heads"],
          intermediate_size=q["intermediate_size"],
          max_position_embeddings=q["max_position_embeddings"],
          layer_norm_eps=q["layer_norm_eps"],
          cross_attention_frequency=q["cross_attention_frequency"],
          num_query_tokens=top["num_query_tokens"], memory_dim=q["encoder_hidden_size"],
          cf_dim=q["encoder_hidden_size"], proj_dim=top["image_text_hidden_size"],
          initializer_range=q.get("initializer_range", 0.02), dec_token_id=None,
          pad_token_id=q.get("pad_token_id", 0))
    except (KeyError, ValueError, json.JSONDecodeError) as e:
      raise ValueError(f"{path}: not a usable Blip2Config config.json: {e}") from e
    fields.update(overrides)
    return cls(**fields)


def _dtype(cfg: QFormerConfig):
  return jnp.dtype(cfg.dtype)


class CFMemory(nnx.Module):
  """CF vector float[B, d_cf] -> memory tokens float[B, M, D_mem] (learned expansion + LN)."""

  def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
    self.num_tokens = cfg.num_memory_tokens
    self.dim = cfg.mem_dim
    self.proj = layers.dense(cfg.cf_dim, cfg.num_memory_tokens * cfg.mem_dim, ("cf", "embed"),
                             rngs=rngs, init_std=cfg.initializer_range, dtype=_dtype(cfg))
    self.norm = layers.layer_norm(cfg.mem_dim, cfg.layer_norm_eps, rngs=rngs, dtype=_dtype(cfg))

  def __call__(self, cf_vecs: jax.Array) -> jax.Array:
    b = cf_vecs.shape[0]
    return self.norm(self.proj(cf_vecs).reshape(b, self.num_tokens, self.dim))


class QFormerLayer(nnx.Module):
  """Self-attention over all positions; cross-attention (queries only); split FFN."""

  def __init__(self, cfg: QFormerConfig, index: int, *, rngs: nnx.Rngs):
    kw = dict(eps=cfg.layer_norm_eps, init_std=cfg.initializer_range, dtype=_dtype(cfg),
              rngs=rngs)
    h = cfg.hidden_size
    self.self_attention = layers.Attention(h, cfg.num_heads, **kw)
    cross_std = cfg.cross_attention_init_std or cfg.initializer_range
    self.cross_attention = (
        layers.Attention(h, cfg.num_heads, kv_dim=cfg.mem_dim, **{**kw, "init_std": cross_std})
        if cfg.has_cross_attention(index) else None)
    self.ffn = layers.FeedForward(h, cfg.intermediate_size, **kw)
    self.ffn_query = layers.FeedForward(h, cfg.intermediate_size, **kw)
    self.reset_query_ffn()

  def reset_query_ffn(self) -> None:
    """Query FFN := a copy of the text FFN (LAVIS's init; loaders call it again after
    overwriting the text FFN).

    The copy gets its own buffers: training donates the state, and one buffer donated
    twice is an XLA error on backends that honour donation (GPU, TPU, CPU from jax 0.11).
    Assigning ``a[...] = b[...]`` or ``nnx.clone`` would share them.
    """
    nnx.update(self.ffn_query,
               jax.tree.map(lambda x: jnp.array(x, copy=True), nnx.state(self.ffn)))

  def __call__(self, x: jax.Array, *, num_queries: int, mask: jax.Array | None,
               memory: jax.Array | None, memory_mask: jax.Array | None) -> jax.Array:
    """One layer.

    Args:
      x: float[B, K+L, H]; the first ``num_queries`` positions are queries.
      num_queries: K (static; 0 for the text-only pass).
      mask: bool[B, K+L|1, K+L] self-attention mask, or None.
      memory: float[B, M, D_mem] (required when K > 0 and this layer cross-attends).
      memory_mask: bool[B, 1, M] or None.

    Returns:
      float[B, K+L, H].
    """
    a = self.self_attention(x, mask=mask)
    if num_queries == 0:
      return self.ffn(a)
    q = a[:, :num_queries]
    if self.cross_attention is not None:
      if memory is None:
        raise ValueError("query positions need the CF memory in a cross-attention layer")
      q = self.cross_attention(q, memory, mask=memory_mask)
    q = self.ffn_query(q)
    if a.shape[1] == num_queries:
      return q
    return jnp.concatenate([q, self.ffn(a[:, num_queries:])], axis=1)


class QFormer(nnx.Module):
  """The item encoder. See the module docstring for the parameter tree and passes."""

  def __init__(self, cfg: QFormerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    h = cfg.hidden_size
    std = cfg.initializer_range
    dt = _dtype(cfg)
    self.query_tokens = logical_param(
        layers.normal_init(std)(rngs.params(), (cfg.num_query_tokens, h), jnp.float32),
        ("queries", "embed"))
    self.embeddings = layers.TextEmbeddings(cfg.vocab_size, h, cfg.max_position_embeddings,
                                            init_std=std, dtype=dt, rngs=rngs)
    self.embed_norm = layers.layer_norm(h, cfg.layer_norm_eps, rngs=rngs, dtype=dt)
    self.layers = nnx.List([QFormerLayer(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
    self.memory = CFMemory(cfg, rngs=rngs)
    self.item_proj = layers.dense(h, cfg.proj_dim, ("embed", None), rngs=rngs, init_std=std,
                                  dtype=dt)
    self.text_proj = layers.dense(h, cfg.proj_dim, ("embed", None), rngs=rngs, init_std=std,
                                  dtype=dt)
    self.itm_head = layers.dense(h, 2, ("embed", None), rngs=rngs, init_std=std, dtype=dt)
    self.lm_head = layers.LMHead(h, cfg.vocab_size, eps=cfg.layer_norm_eps, init_std=std,
                                 dtype=dt, rngs=rngs)
    self.temp = nnx.Param(jnp.asarray(cfg.temp_init, jnp.float32))
    self.temp_pair = nnx.Param(jnp.asarray(cfg.temp_init, jnp.float32))

  # ------------------------------------------------------------------ core
  def encode(self, *, batch: int, text_ids: jax.Array | None = None, with_queries: bool,
             mask: jax.Array | None, memory: jax.Array | None = None,
             memory_mask: jax.Array | None = None,
             return_hidden_states: bool = False) -> jax.Array | tuple[jax.Array, list]:
    """Runs the encoder over ``[queries? ; text?]``.

    Args:
      batch: B.
      text_ids: int[B, L] or None.
      with_queries: prepend the K query tokens.
      mask: bool[B, S|1, S] self-attention mask (S = K+L) or None.
      memory: float[B, M, D_mem] memory tokens (needed when ``with_queries``).
      memory_mask: bool[B, 1, M] or None.
      return_hidden_states: also return ``[embed_norm output, layer 0 out, ...]``.

    Returns:
      float[B, S, H] last hidden state (and the list of per-layer states).
    """
    if text_ids is None and not with_queries:
      raise ValueError("encode needs queries, text or both")
    parts = []
    k = 0
    if with_queries:
      q = self.query_tokens[...]
      k = q.shape[0]
      parts.append(jnp.broadcast_to(q[None], (batch, *q.shape)).astype(_dtype(self.cfg)))
    if text_ids is not None:
      parts.append(self.embeddings(text_ids).astype(_dtype(self.cfg)))
    x = self.embed_norm(jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0])
    states = [x]

    def apply(layer, x, mask, memory, memory_mask):
      return layer(x, num_queries=k, mask=mask, memory=memory, memory_mask=memory_mask)

    if self.cfg.remat:
      apply = nnx.remat(apply)
    for layer in self.layers:
      x = apply(layer, x, mask, memory, memory_mask)
      states.append(x)
    return (x, states) if return_hidden_states else x

  def _memory_mask(self, memory: jax.Array, memory_valid: jax.Array | None) -> jax.Array:
    return masks.memory_mask(memory_valid, memory.shape[0], memory.shape[1])

  # ------------------------------------------------------------------ passes
  def query_pass(self, memory: jax.Array, memory_valid: jax.Array | None = None,
                 return_hidden_states: bool = False):
    """Queries + memory only (unimodal): float[B, M, D_mem] -> float[B, K, H]."""
    b = memory.shape[0]
    return self.encode(batch=b, with_queries=True,
                       mask=masks.query_mask(b, self.cfg.num_query_tokens), memory=memory,
                       memory_mask=self._memory_mask(memory, memory_valid),
                       return_hidden_states=return_hidden_states)

  def text_pass(self, text_ids: jax.Array, text_valid: jax.Array,
                return_hidden_states: bool = False):
    """Text only (unimodal): int[B, L], bool[B, L] -> float[B, L, H]."""
    return self.encode(batch=text_ids.shape[0], text_ids=text_ids, with_queries=False,
                       mask=masks.text_mask(text_valid),
                       return_hidden_states=return_hidden_states)

  def joint_pass(self, memory: jax.Array, text_ids: jax.Array, text_valid: jax.Array,
                 memory_valid: jax.Array | None = None, return_hidden_states: bool = False):
    """Bidirectional queries + text with memory (ITM): -> float[B, K+L, H]."""
    return self.encode(batch=text_ids.shape[0], text_ids=text_ids, with_queries=True,
                       mask=masks.joint_mask(self.cfg.num_query_tokens, text_valid),
                       memory=memory, memory_mask=self._memory_mask(memory, memory_valid),
                       return_hidden_states=return_hidden_states)

  def itg_pass(self, memory: jax.Array, dec_ids: jax.Array, text_valid: jax.Array,
               memory_valid: jax.Array | None = None) -> jax.Array:
    """UniLM-masked queries + text (ITG decoder): -> float[B, K+L, H].

    ``dec_ids`` already start with the ``[DEC]`` BOS (see ``to_decoder_ids``).
    """
    return self.encode(batch=dec_ids.shape[0], text_ids=dec_ids, with_queries=True,
                       mask=masks.unilm_mask(self.cfg.num_query_tokens, text_valid),
                       memory=memory, memory_mask=self._memory_mask(memory, memory_valid))

  # ------------------------------------------------------------------ heads
  def to_decoder_ids(self, text_ids: jax.Array) -> jax.Array:
    """int[B, L]: ``text_ids`` with the first token ([CLS]) replaced by ``[DEC]``."""
    if self.cfg.dec_token_id is None:
      raise ValueError("this QFormerConfig has no [DEC] token (dec_token_id=None)")
    return text_ids.at[:, 0].set(self.cfg.dec_token_id)

  def encode_items(self, cf_vecs: jax.Array) -> jax.Array:
    """float[B, d_cf] CF vectors -> float[B, K, H] query outputs (query-only pass)."""
    return self.query_pass(self.memory(cf_vecs))

  def item_feats(self, cf_vecs: jax.Array) -> jax.Array:
    """float[B, d_cf] -> float32[B, K, P]: L2-normalised ``item_proj`` of the query outputs."""
    return l2_normalize(self.item_proj(self.encode_items(cf_vecs)))

  def text_feats(self, text_ids: jax.Array, text_valid: jax.Array) -> jax.Array:
    """int[B, L], bool[B, L] -> float32[B, P]: L2-normalised ``text_proj`` of [CLS]."""
    return l2_normalize(self.text_proj(self.text_pass(text_ids, text_valid)[:, 0]))

  def itm_logits_from_memory(self, memory: jax.Array, text_ids: jax.Array,
                             text_valid: jax.Array,
                             memory_valid: jax.Array | None = None) -> jax.Array:
    """float32[B, 2] (column 1 = match): ``itm_head`` averaged over the K query outputs."""
    h = self.joint_pass(memory, text_ids, text_valid, memory_valid)
    k = self.cfg.num_query_tokens
    return self.itm_head(h[:, :k]).astype(jnp.float32).mean(axis=1)

  def itm_logits(self, cf_vecs: jax.Array, text_ids: jax.Array,
                 text_valid: jax.Array) -> jax.Array:
    """float[B, d_cf], int[B, L], bool[B, L] -> float32[B, 2] ITM logits."""
    return self.itm_logits_from_memory(self.memory(cf_vecs), text_ids, text_valid)

  def itg_logits(self, cf_vecs: jax.Array, text_ids: jax.Array,
                 text_valid: jax.Array) -> jax.Array:
    """float32[B, L, V]: next-token logits at every text position of the ITG pass.

    Position t predicts token t+1 of ``text_ids`` (feed them to ``losses.itg_loss``).
    ``text_ids`` start with [CLS]; it is replaced by ``[DEC]`` here.
    """
    h = self.itg_pass(self.memory(cf_vecs), self.to_decoder_ids(text_ids), text_valid)
    return self.lm_logits(h[:, self.cfg.num_query_tokens:])

  def lm_logits(self, h: jax.Array) -> jax.Array:
    """float[B, L, H] -> float32[B, L, V] via the LM head tied to the word embeddings."""
    return self.lm_head(h, self.embeddings.word.embedding[...])

  def temperature(self) -> jax.Array:
    """ITC temperature, clamped to [0.001, 0.5] as LAVIS does."""
    return jnp.clip(self.temp[...], 0.001, 0.5)

  def pair_temperature(self) -> jax.Array:
    """Item-item / user-item temperature, clamped to [0.001, 0.5]."""
    return jnp.clip(self.temp_pair[...], 0.001, 0.5)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``x / max(||x||, eps)`` over the last axis, in float32 (torch ``F.normalize``).

  Written as ``sqrt(max(||x||^2, eps^2))`` so that a zero vector has a zero gradient, not
  NaN (``d||x||/dx`` is 0/0 at 0): the MLP adaptor maps an item without CF interactions
  (an all-zero CF row) to all-zero soft tokens, whose retrieval key is such a vector.
  """
  x = x.astype(jnp.float32)
  return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def param_count(model: nnx.Module) -> int:
  """Number of parameter values in ``model``."""
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
