"""Item encoders that turn one CF vector into K soft tokens of the LLM's width.

Both share one call contract, which ``models.ilm.ILM`` relies on::

  encoder(cf_vecs: float[B, d_cf]) -> float32[B, K, D]     # D = the LLM's width

* ``QFormerAdaptor`` (ILM, ILM-rand): the Q-Former's query-only pass over the CF memory
  tokens (its text branch is unused in Phase 2), then a linear ``llm_proj`` H -> D.
* ``MlpAdaptor`` (the MLP baseline of SPEC §5): CF vector -> 2-layer MLP -> K * D,
  reshaped into K soft tokens. It sees Phase 2 only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ilm_jax.models import layers
from ilm_jax.models import qformer as qformer_lib


class QFormerAdaptor(nnx.Module):
  """Q-Former query outputs projected to the LLM's input-embedding width.

  Attributes:
    qformer: ``models.qformer.QFormer`` (from Phase 1, or freshly initialised for ILM-rand).
    llm_proj: Linear H -> D (the BLIP-2 "language projection").
    num_tokens: K (= the Q-Former's query count).
  """

  def __init__(self, qformer: qformer_lib.QFormer, llm_dim: int, *, rngs: nnx.Rngs,
               init_std: float = 0.02):
    self.qformer = qformer
    self.num_tokens = qformer.cfg.num_query_tokens
    self.llm_proj = layers.dense(qformer.cfg.hidden_size, llm_dim, ("embed", None), rngs=rngs,
                                 init_std=init_std)

  def __call__(self, cf_vecs: jax.Array) -> jax.Array:
    """float[B, d_cf] -> float32[B, K, D]."""
    return self.llm_proj(self.qformer.encode_items(cf_vecs)).astype(jnp.float32)


class MlpAdaptor(nnx.Module):
  """CF vector -> Linear -> GELU -> Linear -> K soft tokens.

  Attributes:
    hidden, out: the two layers (d_cf -> hidden -> K * D).
    num_tokens: K.
  """

  def __init__(self, cf_dim: int, hidden_dim: int, num_tokens: int, llm_dim: int, *,
               rngs: nnx.Rngs, init_std: float = 0.02):
    self.num_tokens = int(num_tokens)
    self.llm_dim = int(llm_dim)
    self.hidden = layers.dense(cf_dim, hidden_dim, ("cf", "mlp"), rngs=rngs, init_std=init_std)
    self.out = layers.dense(hidden_dim, self.num_tokens * self.llm_dim, ("mlp", None),
                            rngs=rngs, init_std=init_std)

  def __call__(self, cf_vecs: jax.Array) -> jax.Array:
    """float[B, d_cf] -> float32[B, K, D]."""
    h = jax.nn.gelu(self.hidden(cf_vecs.astype(jnp.float32)), approximate=False)
    out = self.out(h).astype(jnp.float32)
    return out.reshape(*cf_vecs.shape[:-1], self.num_tokens, self.llm_dim)
