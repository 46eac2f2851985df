"""Llama-family decoder (SmolLM2, Llama 2/3, Mistral, Qwen2) as Flax NNX modules.

The model is frozen everywhere in ilm_jax; this file only defines the computation.
Weights come from ``llm_loading`` (GGUF or Hugging Face checkpoints).

Forward contract (Phase 2 and generation build on it)::

  logits, hidden, cache = model(tokens=ids)                      # text only
  embeds = splice_embeddings(model.embed(ids), soft, soft_pos)   # soft tokens
  logits, hidden, cache = model(input_embeds=embeds, mask=mask, positions=pos)

* ``mask: bool[B, T]`` marks real tokens (False = padding, left or right); padded
  keys are never attended to. Padded query rows produce finite garbage; ignore them.
* ``positions: int[B, T]`` are RoPE positions; the default counts real tokens only
  (``cumsum(mask) - 1``) so left padding does not shift a prompt.
* ``segment_ids: int[B, T]`` (optional) restricts attention to equal segments, for
  packed sequences (pass positions that restart per segment).
* With a ``KVCache`` the T new tokens are written at slots ``[cache.index,
  cache.index + T)``; a query at slot i sees the valid cached keys at slots <= i.
* ``compute_logits=False`` skips the [B, T, V] float32 logits (1.6 GB for B=32, T=256
  with SmolLM2's 49152 tokens); take ``model.logits(hidden[answer positions])`` instead.
  ``LlmConfig.remat`` recomputes blocks in the backward pass (soft-token gradients).

Linear kernels are stored ``[in, out]`` (split per head for attention) and carry
logical axis names for FSDP: 'vocab', 'embed', 'heads' (query and kv heads), 'kv'
(per-head width), 'mlp' -- the names ``ilm_jax.partition`` has rules for.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

# Large finite negative instead of -inf: a fully masked row (a padding query) then
# softmaxes to a uniform distribution instead of NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class LlmConfig:
  """Architecture of a Llama-family decoder.

  Attributes:
    vocab: vocabulary size V.
    dim: model width D.
    layers: number of decoder blocks.
    heads: query heads H.
    kv_heads: key/value heads (GQA: query head h uses kv head h // (H // kv_heads)).
    head_dim: per-head width.
    ffn: SwiGLU hidden width F.
    rope_theta: RoPE base.
    rope_scaling: None, or a dict like Hugging Face's ``rope_scaling`` (only
      ``rope_type`` 'llama3' and 'linear' are supported).
    norm_eps: RMSNorm epsilon.
    tie: the LM head is the transposed token embedding.
    qkv_bias: q/k/v projections have a bias (Qwen2).
    bos_id, eos_ids: special ids (eos_ids holds every id that ends a turn).
    pad_id: id used to fill padded positions.
    max_len: maximum context length (informational; caches are sized by callers).
    dtype: compute dtype ('float32' or 'bfloat16'); norms, softmax and logits stay f32.
    param_dtype: storage dtype of the weights.
    remat: recompute each block in the backward pass (gradients w.r.t. soft tokens
      through the frozen LLM in Phase 2 then keep one block's activations at a time).
  """
  vocab: int = 49152
  dim: int = 576
  layers: int = 30
  heads: int = 9
  kv_heads: int = 3
  head_dim: int = 64
  ffn: int = 1536
  rope_theta: float = 100000.0
  rope_scaling: Any = None
  norm_eps: float = 1e-5
  tie: bool = True
  qkv_bias: bool = False
  bos_id: int = 1
  eos_ids: tuple[int, ...] = (2,)
  pad_id: int = 2
  max_len: int = 8192
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    if self.heads % self.kv_heads:
      raise ValueError(f"heads={self.heads} is not a multiple of kv_heads={self.kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    # Hashable, because the config is static data inside the model's graphdef (jit key).
    if isinstance(self.rope_scaling, dict):
      items = tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                           for k, v in self.rope_scaling.items()))
      object.__setattr__(self, "rope_scaling", items)
    object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))

  def replace(self, **kw) -> LlmConfig:
    return dataclasses.replace(self, **kw)

  @classmethod
  def tiny(cls, **kw) -> LlmConfig:
    """A 2-layer model for tests (random weights)."""
    base = dict(vocab=256, dim=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128,
                rope_theta=10000.0, max_len=512, bos_id=1, eos_ids=(2,), pad_id=0)
    base.update(kw)
    return cls(**base)


# ------------------------------------------------------------------ helpers


def rope_inv_freq(config: LlmConfig) -> jax.Array:
  """float32[head_dim // 2] inverse frequencies, with Llama-3 / linear scaling applied."""
  d = config.head_dim
  inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  scaling = config.rope_scaling
  if not scaling:
    return inv_freq
  scaling = dict(scaling)
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if kind == "default":
    return inv_freq
  if kind == "linear":
    return inv_freq / float(scaling["factor"])
  if kind == "llama3":
    # Same piecewise rule as transformers' _compute_llama3_parameters.
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)
  raise NotImplementedError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Half-split ("NeoX") rotary embedding.

  Args:
    x: [B, T, N, Dh] queries or keys.
    positions: int[B, T].
    inv_freq: float32[Dh // 2].

  Returns:
    [B, T, N, Dh] in x's dtype (angles computed in float32).
  """
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, Dh/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def default_positions(mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
  """int32[B, T] RoPE positions that count real tokens only.

  Example: mask [[F, T, T], [T, T, F]] -> [[0, 0, 1], [0, 1, 2]] (offset 0); padding
  slots get harmless positions because they are masked out anyway.
  """
  pos = jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1
  return jnp.maximum(pos, 0) + offset


def attention_mask(q_valid: jax.Array, k_valid: jax.Array, q_slot: jax.Array,
                   k_slot: jax.Array, q_segment: jax.Array | None = None,
                   k_segment: jax.Array | None = None) -> jax.Array:
  """bool[B, Tq, Tk]: causal over slots, valid keys, same segment.

  Example (one row, no cache): k_valid = [F, T, T], slots 0..2 ->
  [[F, F, F], [F, T, F], [F, T, T]].

  Args:
    q_valid: bool[B, Tq] (only used to keep the doc symmetric; padded queries still
      see keys so their softmax stays finite).
    k_valid: bool[B, Tk].
    q_slot: int[Tq] slot index of each query (cache position).
    k_slot: int[Tk] slot index of each key.
    q_segment, k_segment: optional int[B, Tq] / int[B, Tk] segment ids.
  """
  del q_valid
  causal = q_slot[:, None] >= k_slot[None, :]
  mask = causal[None] & k_valid[:, None, :]
  if q_segment is not None:
    mask &= q_segment[:, :, None] == k_segment[:, None, :]
  return mask


def splice_embeddings(embeds: jax.Array, soft: jax.Array, positions: jax.Array) -> jax.Array:
  """Writes soft tokens into a sequence of embeddings.

  Args:
    embeds: float[B, T, D] token embeddings (e.g. ``model.embed(tokens)``).
    soft: float[B, S, D] soft tokens.
    positions: int[B, S] target positions in [0, T); a negative position drops that
      soft token (lets callers pad S).

  Returns:
    float[B, T, D] with ``out[b, positions[b, s]] = soft[b, s]``.
  """
  b, t, _ = embeds.shape
  valid = positions >= 0
  # Dropped soft tokens go to an out-of-range slot that scatter mode='drop' ignores.
  pos = jnp.where(valid, positions, t)
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], pos.shape)
  return embeds.at[rows, pos].set(soft.astype(embeds.dtype), mode="drop")


@flax.struct.dataclass
class KVCache:
  """Preallocated key/value cache with static shapes.

  Attributes:
    k, v: per layer [B, S, kv_heads, head_dim] (S = maximum length).
    valid: bool[B, S] slots that hold a real token.
    index: int32[] next free slot (shared by the batch). Callers size the cache: writing
      past ``max_len`` inside jit cannot raise (XLA clamps the write), so ``generation``
      allocates prompt length + new tokens.
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid: jax.Array
  index: jax.Array

  @classmethod
  def create(cls, config: LlmConfig, batch: int, max_len: int) -> KVCache:
    shape = (batch, max_len, config.kv_heads, config.head_dim)
    dt = jnp.dtype(config.dtype)
    return cls(k=tuple(jnp.zeros(shape, dt) for _ in range(config.layers)),
               v=tuple(jnp.zeros(shape, dt) for _ in range(config.layers)),
               valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

  @property
  def max_len(self) -> int:
    return self.valid.shape[1]

  def gather(self, idx: jax.Array, start: int = 0) -> KVCache:
    """Reorders the batch axis (beam search); slots before ``start`` are kept as is.

    Args:
      idx: int[B] source row for each row.
      start: static slot from which to reorder; rows must already agree before it
        (e.g. the shared prompt), which saves copying the prompt every step.
    """
    take = lambda a: a.at[:, start:].set(a[idx, start:])  # noqa: E731
    return self.replace(k=tuple(map(take, self.k)), v=tuple(map(take, self.v)),
                        valid=take(self.valid))

  def repeat(self, n: int) -> KVCache:
    """Repeats every row n times (row b -> rows b*n .. b*n+n-1)."""
    rep = lambda a: jnp.repeat(a, n, axis=0)  # noqa: E731
    return self.replace(k=tuple(map(rep, self.k)), v=tuple(map(rep, self.v)),
                        valid=rep(self.valid))


# ------------------------------------------------------------------ modules


def _param(rngs: nnx.Rngs, shape, axes, dtype, scale: float | None = None, ones=False):
  if ones:
    value = jnp.ones(shape, dtype)
  else:
    fan_in = shape[0] if scale is None else scale
    value = jax.random.normal(rngs.params(), shape, dtype) / math.sqrt(fan_in)
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
  """``x * rsqrt(mean(x^2) + eps) * weight``, computed in float32."""

  def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
    self.eps = eps
    self.weight = _param(rngs, (dim,), ("embed",), param_dtype, ones=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return y * self.weight[...].astype(jnp.float32)


class Attention(nnx.Module):
  """Grouped-query self-attention with RoPE and an optional KV cache."""

  def __init__(self, c: LlmConfig, *, rngs: nnx.Rngs):
    self.c = c
    pd = jnp.dtype(c.param_dtype)
    self.q_kernel = _param(rngs, (c.dim, c.heads, c.head_dim), ("embed", "heads", "kv"), pd)
    self.k_kernel = _param(rngs, (c.dim, c.kv_heads, c.head_dim), ("embed", "heads", "kv"), pd)
    self.v_kernel = _param(rngs, (c.dim, c.kv_heads, c.head_dim), ("embed", "heads", "kv"), pd)
    self.o_kernel = _param(rngs, (c.heads, c.head_dim, c.dim), ("heads", "kv", "embed"), pd,
                           scale=c.heads * c.head_dim)
    if c.qkv_bias:
      self.q_bias = nnx.Param(jnp.zeros((c.heads, c.head_dim), pd),
                              out_sharding=("heads", "kv"), eager_sharding=False)
      self.k_bias = nnx.Param(jnp.zeros((c.kv_heads, c.head_dim), pd),
                              out_sharding=("heads", "kv"), eager_sharding=False)
      self.v_bias = nnx.Param(jnp.zeros((c.kv_heads, c.head_dim), pd),
                              out_sharding=("heads", "kv"), eager_sharding=False)

  def __call__(self, x, positions, mask, slots, inv_freq, kv=None, index=None):
    """x: [B, T, D]; mask: bool[B, T, S]; slots: int[T]; kv: (k, v) cache or None."""
    c, dt = self.c, jnp.dtype(self.c.dtype)
    w = lambda p: p[...].astype(dt)  # noqa: E731
    q = jnp.einsum("btd,dhk->bthk", x, w(self.q_kernel))
    k = jnp.einsum("btd,dhk->bthk", x, w(self.k_kernel))
    v = jnp.einsum("btd,dhk->bthk", x, w(self.v_kernel))
    if c.qkv_bias:
      q, k, v = q + w(self.q_bias), k + w(self.k_bias), v + w(self.v_bias)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    if kv is not None:
      k_cache, v_cache = kv
      k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, axis=1)
      new_kv = (k, v)
    else:
      new_kv = None
    b, t = x.shape[:2]
    groups = c.heads // c.kv_heads
    q = q.reshape(b, t, c.kv_heads, groups, c.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(dt)).astype(jnp.float32)
    scores = scores / math.sqrt(c.head_dim)
    scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(dt))
    out = out.reshape(b, t, c.heads, c.head_dim)
    return jnp.einsum("bthk,hkd->btd", out, w(self.o_kernel)), new_kv


class Mlp(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, c: LlmConfig, *, rngs: nnx.Rngs):
    self.dtype = jnp.dtype(c.dtype)
    pd = jnp.dtype(c.param_dtype)
    self.gate_kernel = _param(rngs, (c.dim, c.ffn), ("embed", "mlp"), pd)
    self.up_kernel = _param(rngs, (c.dim, c.ffn), ("embed", "mlp"), pd)
    self.down_kernel = _param(rngs, (c.ffn, c.dim), ("mlp", "embed"), pd)

  def __call__(self, x):
    w = lambda p: p[...].astype(self.dtype)  # noqa: E731
    h = jax.nn.silu(x @ w(self.gate_kernel)) * (x @ w(self.up_kernel))
    return h @ w(self.down_kernel)


class Block(nnx.Module):
  """Pre-norm decoder block."""

  def __init__(self, c: LlmConfig, *, rngs: nnx.Rngs):
    pd = jnp.dtype(c.param_dtype)
    self.dtype = jnp.dtype(c.dtype)
    self.attn_norm = RMSNorm(c.dim, c.norm_eps, param_dtype=pd, rngs=rngs)
    self.attn = Attention(c, rngs=rngs)
    self.mlp_norm = RMSNorm(c.dim, c.norm_eps, param_dtype=pd, rngs=rngs)
    self.mlp = Mlp(c, rngs=rngs)

  def __call__(self, h, positions, mask, slots, inv_freq, kv=None, index=None):
    a, new_kv = self.attn(self.attn_norm(h).astype(self.dtype), positions, mask, slots,
                          inv_freq, kv, index)
    h = h + a.astype(h.dtype)
    h = h + self.mlp(self.mlp_norm(h).astype(self.dtype)).astype(h.dtype)
    return h, new_kv


def _run_block(block: Block, remat: bool, *args):
  if not remat:
    return block(*args)
  # Pure jax.checkpoint over the block's state: nothing inside mutates it.
  graphdef, state = nnx.split(block)
  return jax.checkpoint(lambda st, *a: nnx.merge(graphdef, st)(*a))(state, *args)


class Llm(nnx.Module):
  """Llama-family causal LM. See the module docstring for the forward contract."""

  def __init__(self, config: LlmConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    pd = jnp.dtype(c.param_dtype)
    self.embedding = _param(rngs, (c.vocab, c.dim), ("vocab", "embed"), pd, scale=c.dim)
    self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(c.layers)])
    self.final_norm = RMSNorm(c.dim, c.norm_eps, param_dtype=pd, rngs=rngs)
    if not c.tie:
      self.lm_head = _param(rngs, (c.dim, c.vocab), ("embed", "vocab"), pd)

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    """An empty KVCache for ``batch`` rows of up to ``max_len`` tokens."""
    return KVCache.create(self.config, batch, max_len)

  def embed(self, tokens: jax.Array) -> jax.Array:
    """float[B, T, D] input embeddings (compute dtype) of int[B, T] tokens."""
    return jnp.take(self.embedding[...], tokens, axis=0).astype(jnp.dtype(self.config.dtype))

  def logits(self, hidden: jax.Array) -> jax.Array:
    """float32[..., V] logits of float[..., D] final hidden states (after the final norm)."""
    dt = jnp.dtype(self.config.dtype)
    h = hidden.astype(dt)
    if self.config.tie:
      out = jnp.einsum("...d,vd->...v", h, self.embedding[...].astype(dt))
    else:
      out = h @ self.lm_head[...].astype(dt)
    return out.astype(jnp.float32)

  def __call__(self, input_embeds: jax.Array | None = None, *, tokens: jax.Array | None = None,
               mask: jax.Array | None = None, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache: KVCache | None = None,
               compute_logits: bool = True):
    """Runs the decoder.

    Args:
      input_embeds: float[B, T, D] (e.g. with soft tokens spliced in); or
      tokens: int[B, T] (exactly one of the two).
      mask: bool[B, T] real tokens; default all True.
      positions: int[B, T] RoPE positions; default ``default_positions(mask)`` plus,
        with a cache, the number of real tokens already cached per row.
      segment_ids: optional int[B, T] for packed sequences (no cache).
      cache: optional KVCache; the new tokens are appended at ``cache.index``.
      compute_logits: False returns None for logits (saves the V-wide matmul).

    Returns:
      (logits float32[B, T, V] or None, final_hidden float32[B, T, D] after the final
      norm, new cache or None).
    """
    if (input_embeds is None) == (tokens is None):
      raise ValueError("pass exactly one of input_embeds or tokens")
    c = self.config
    h = self.embed(tokens) if input_embeds is None else input_embeds.astype(jnp.dtype(c.dtype))
    b, t = h.shape[:2]
    if mask is None:
      mask = jnp.ones((b, t), bool)
    mask = mask.astype(bool)
    # Residual stream in float32 so bf16 compute only affects the matmuls.
    h = h.astype(jnp.float32) if c.dtype == "float32" else h
    inv_freq = rope_inv_freq(c)
    if cache is None:
      if positions is None:
        positions = default_positions(mask)
      slots = jnp.arange(t)
      attn_mask = attention_mask(mask, mask, slots, slots, segment_ids, segment_ids)
      index = None
    else:
      if segment_ids is not None:
        raise ValueError("segment_ids is not supported with a KV cache")
      if t > cache.max_len:
        raise ValueError(f"{t} tokens do not fit a KV cache of {cache.max_len} slots")
      index = cache.index
      if positions is None:
        already = jnp.sum(cache.valid, axis=-1, keepdims=True).astype(jnp.int32)
        positions = default_positions(mask, already)
      valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, mask, index, axis=1)
      slots = index + jnp.arange(t)
      attn_mask = attention_mask(mask, valid, slots, jnp.arange(cache.max_len))
    new_k, new_v = [], []
    for i, block in enumerate(self.blocks):
      kv = None if cache is None else (cache.k[i], cache.v[i])
      h, nkv = _run_block(block, c.remat, h, positions, attn_mask, slots, inv_freq, kv, index)
      if nkv is not None:
        new_k.append(nkv[0])
        new_v.append(nkv[1])
    hidden = self.final_norm(h)
    new_cache = None
    if cache is not None:
      new_cache = KVCache(k=tuple(new_k), v=tuple(new_v), valid=valid, index=index + t)
    logits = self.logits(hidden) if compute_logits else None
    return logits, hidden, new_cache
