"""A stand-in Phase 2 model for evaluation tests: a tiny random Llama + random soft tokens.

Implements the ILM interface the evaluators use (``ilm_jax.models.ilm.ILM``): ``llm``,
``soft_tokens``, ``prompt_embeds``, ``__call__``, ``item_token_table`` and
``retrieval_scores``. Soft tokens are rows of fixed random tables, so the tests do not
depend on the Q-Former.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ilm_jax.models import llm as llm_lib


class StubILM(nnx.Module):
  """Soft tokens from random item/user tables spliced into a frozen tiny Llama."""

  def __init__(self, llm: llm_lib.Llm, num_items: int, num_users: int, k: int, seed: int = 0,
               fixed_scores: np.ndarray | None = None):
    self.llm = llm
    self.k = k
    d = llm.config.dim
    r = np.random.default_rng(seed)
    self.item_table = nnx.Param(jnp.asarray(r.normal(size=(num_items, k, d)), jnp.float32))
    self.user_table = nnx.Param(jnp.asarray(r.normal(size=(num_users, k, d)), jnp.float32))
    # When set, retrieval_scores returns these float32[N] for every row (known rankings).
    self.fixed_scores = None if fixed_scores is None else nnx.Variable(
        jnp.asarray(fixed_scores, jnp.float32))

  def soft_tokens(self, slot_ids, slot_kind):
    items = self.item_table[...][jnp.clip(slot_ids, 0, self.item_table.shape[0] - 1)]
    users = self.user_table[...][jnp.clip(slot_ids, 0, self.user_table.shape[0] - 1)]
    out = jnp.where((slot_kind == 1)[..., None, None], users, items)
    return jnp.where((slot_kind >= 0)[..., None, None], out, 0.0)

  def prompt_embeds(self, input_ids, slot_ids, slot_kind, slot_pos):
    b, s = slot_ids.shape
    soft = self.soft_tokens(slot_ids, slot_kind).reshape(b, s * self.k, -1)
    pos = slot_pos[..., None] + jnp.arange(self.k)
    pos = jnp.where(slot_pos[..., None] >= 0, pos, -1).reshape(b, s * self.k)
    return llm_lib.splice_embeddings(self.llm.embed(input_ids), soft, pos)

  def __call__(self, input_ids, attn_mask, slot_ids, slot_kind, slot_pos):
    logits, hidden, _ = self.llm(self.prompt_embeds(input_ids, slot_ids, slot_kind, slot_pos),
                                 mask=attn_mask)
    return logits, hidden

  def item_token_table(self):
    return self.item_table[...]

  def retrieval_scores(self, hidden_last):
    if self.fixed_scores is not None:
      return jnp.broadcast_to(self.fixed_scores[...], (hidden_last.shape[0],
                                                       self.fixed_scores.shape[0]))
    return hidden_last @ self.item_table[...].mean(axis=1).T


def tiny_llm(tok, seed: int = 0, dim: int = 32) -> llm_lib.Llm:
  """A 2-layer random Llama over the tokenizer's vocabulary."""
  cfg = llm_lib.LlmConfig.tiny(vocab=tok.vocab_size, dim=dim, heads=2, kv_heads=1, head_dim=16,
                               ffn=64, bos_id=tok.bos_id or 0, eos_ids=tuple(tok.stop_ids),
                               pad_id=tok.pad_id)
  return llm_lib.Llm(cfg, rngs=nnx.Rngs(seed))
