"""Every boolean mask in ilm_jax, built in one place.

Conventions: masks are ``bool``; True means "allowed" (attend / valid / usable) unless a
function says otherwise. Attention masks have shape ``[B, Sq, Sk]`` or ``[B, 1, Sk]``
(broadcast over query rows); attention layers add the head axis. Q-Former sequences are
``[K queries ; L text tokens]``; the CF memory is a separate key set of M tokens seen only
through cross-attention, by query positions only.

Tiny picture (K=2 queries q, L=3 text tokens t0 t1 t2, t2 is padding), row = who looks,
column = who is seen (1 = may attend):

  joint (ITM, bidirectional)        unilm (ITG)
        q q t0 t1 t2                      q q t0 t1 t2
    q   1 1 1  1  0                   q   1 1 0  0  0
    q   1 1 1  1  0                   q   1 1 0  0  0
    t0  1 1 1  1  0                   t0  1 1 1  0  0
    t1  1 1 1  1  0                   t1  1 1 1  1  0
    t2  1 1 1  1  0                   t2  1 1 1  1  0
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def padding_mask(lengths: jax.Array, max_len: int) -> jax.Array:
  """bool[B, max_len]: True at the first ``lengths[b]`` positions.

  Example: padding_mask(jnp.array([1, 3]), 3)
  [[T, F, F], [T, T, T]]
  """
  return jnp.arange(max_len)[None, :] < jnp.asarray(lengths)[:, None]


def key_mask(valid: jax.Array) -> jax.Array:
  """bool[B, 1, Sk] attention mask from a per-key validity mask bool[B, Sk].

  Masks keys only: padded query rows are still computed (they attend to the real keys),
  exactly like BERT/BLIP-2's 2-D ``attention_mask``.

  Example: key_mask(jnp.array([[1, 1, 0]], bool))
  [[[T, T, F]]]
  """
  return jnp.asarray(valid, bool)[:, None, :]


def text_mask(text_valid: jax.Array) -> jax.Array:
  """bool[B, 1, L]: the unimodal text pass (ITC text side): text sees non-padded text."""
  return key_mask(text_valid)


def query_mask(batch: int, num_queries: int) -> jax.Array:
  """bool[B, 1, K]: the unimodal query pass (ITC item side): queries see all queries.

  (They see the memory too, through cross-attention; see ``memory_mask``.)
  """
  return jnp.ones((batch, 1, num_queries), bool)


def memory_mask(memory_valid: jax.Array | None, batch: int, num_memory: int) -> jax.Array:
  """bool[B, 1, M]: which CF-memory tokens the queries' cross-attention may see.

  Args:
    memory_valid: bool[B, M] or None (= all M tokens valid).
    batch: B.
    num_memory: M.
  """
  if memory_valid is None:
    return jnp.ones((batch, 1, num_memory), bool)
  return key_mask(memory_valid)


def joint_mask(num_queries: int, text_valid: jax.Array) -> jax.Array:
  """bool[B, 1, K+L]: the bidirectional ITM mask over ``[queries ; text]``.

  Every position sees all queries and every non-padded text token.

  Example: joint_mask(1, jnp.array([[1, 0]], bool))
  [[[T, T, F]]]
  """
  text_valid = jnp.asarray(text_valid, bool)
  q = jnp.ones((text_valid.shape[0], num_queries), bool)
  return key_mask(jnp.concatenate([q, text_valid], axis=1))


def causal_mask(length: int) -> jax.Array:
  """bool[L, L]: ``[i, j]`` True iff ``j <= i``.

  Example: causal_mask(2)
  [[T, F], [T, T]]
  """
  return jnp.tril(jnp.ones((length, length), bool))


def unilm_mask(num_queries: int, text_valid: jax.Array) -> jax.Array:
  """bool[B, K+L, K+L]: the ITG (UniLM) mask over ``[queries ; text]``.

  Queries see all queries and no text (so query outputs equal the query-only pass); text
  token i sees every query and the non-padded text tokens j <= i. The text never sees
  the memory directly: everything it learns about the item flows through the queries.

  Example: unilm_mask(1, jnp.array([[1, 1]], bool))[0]
  [[T, F, F],
   [T, T, F],
   [T, T, T]]
  """
  text_valid = jnp.asarray(text_valid, bool)
  b, length = text_valid.shape
  k = num_queries
  q_rows = jnp.concatenate(
      [jnp.ones((b, k, k), bool), jnp.zeros((b, k, length), bool)], axis=2)
  t_rows = jnp.concatenate(
      [jnp.ones((b, length, k), bool),
       causal_mask(length)[None] & text_valid[:, None, :]], axis=2)
  return jnp.concatenate([q_rows, t_rows], axis=1)


def same_id_mask(row_ids: jax.Array, col_ids: jax.Array) -> jax.Array:
  """bool[Br, Bc]: ``[i, j]`` True iff ``row_ids[i] == col_ids[j]``."""
  return jnp.asarray(row_ids)[:, None] == jnp.asarray(col_ids)[None, :]


def false_negative_mask(row_ids: jax.Array, col_ids: jax.Array, *,
                        shared_id_space: bool = False) -> jax.Array:
  """bool[B, B]: True where in-batch pair (row i, column j), j != i, is NOT a negative.

  Row i's positive is column i (pair i = ``(row_ids[i], col_ids[i])``). Column j is a false
  negative for row i when it repeats row i's pair partner (``col_ids[j] == col_ids[i]``:
  same item) or belongs to the same row entity (``row_ids[j] == row_ids[i]``: e.g. the same
  user, whose other item is also a positive). With ``shared_id_space`` (item-item pairs)
  column j also is excluded when it is row i's own item (``col_ids[j] == row_ids[i]``).
  The diagonal is always False (it is the positive, handled by the loss).

  The mask is built so that its transpose is the right mask for the reverse direction
  (t2i / b->a), so one mask serves a symmetric InfoNCE.

  Example: false_negative_mask(jnp.array([7, 7, 8]), jnp.array([1, 2, 3]))
  [[F, T, F],
   [T, F, F],
   [F, F, F]]
  """
  row_ids = jnp.asarray(row_ids)
  col_ids = jnp.asarray(col_ids)
  m = same_id_mask(row_ids, row_ids) | same_id_mask(col_ids, col_ids)
  if shared_id_space:
    m = m | same_id_mask(row_ids, col_ids)
  return m & ~jnp.eye(row_ids.shape[0], dtype=bool)
