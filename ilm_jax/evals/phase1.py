"""Phase 1 evaluation: does the item encoder put items where their text and neighbours are?

All metrics rank by the ITC score family used in training (SPEC §4): an item is K query
vectors, a text is one CLS vector, and item-text similarity is the max over queries;
item-item similarity is the max over the K×K query pairs.

Metrics (items are evaluated against held-out material only, see ``phase1_eval``):
  * item→text / text→item recall@{1,5,10}: can the item's own text be found among all
    item texts (and vice versa)?
  * item-item recall@10 on held-out pairs: for (a, b) consumed consecutively at the
    validation/test positions (never in any training pair), is b in a's top 10?
  * cluster precision@10 (generated catalogue only): fraction of an item's 10 nearest
    items in the same hidden co-consumption cluster. The text never reveals the
    cluster, so this measures how much CF-only signal the encoder keeps (IT-II should
    beat IT here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ilm_jax.evals import ranking

KS = (1, 5, 10)


@jax.jit
def item_text_scores(item_feats: jax.Array, text_feats: jax.Array) -> jax.Array:
  """float32[N, K, E] x float32[M, E] -> float32[N, M], max over queries."""
  return jnp.einsum("nke,me->nmk", item_feats, text_feats).max(-1)


@jax.jit
def item_item_scores(a_feats: jax.Array, b_feats: jax.Array) -> jax.Array:
  """float32[N, K, E] x float32[M, K, E] -> float32[N, M], max over K×K query pairs."""
  return jnp.einsum("nke,mle->nmkl", a_feats, b_feats).max((-1, -2))


def _ranks_of_targets(scores, targets: np.ndarray,
                      exclude: np.ndarray | None = None) -> np.ndarray:
  """1-based rank of ``targets[i]`` in row i, ties against the target (``ranking``'s rule)."""
  scores = jnp.asarray(scores, jnp.float32)
  if exclude is None:
    exclude = np.zeros(scores.shape, bool)
  ranks, finite = ranking.ranks_from_scores(scores, jnp.asarray(targets, jnp.int32),
                                            jnp.asarray(exclude))
  if not bool(np.all(finite)):
    raise FloatingPointError("NaN item scores in Phase 1 evaluation")
  return np.asarray(ranks)


def recall_at(ranks: np.ndarray, ks=KS) -> dict[str, float]:
  return {f"recall@{k}": float((ranks <= k).mean()) for k in ks}


def retrieval_metrics(item_feats: np.ndarray, text_feats: np.ndarray,
                      ks=KS) -> dict[str, float]:
  """Item i's text is text i; recall of the matching partner in both directions.

  Args:
    item_feats: float32[N, K, E] L2-normalised query features.
    text_feats: float32[N, E] L2-normalised text CLS features.
  """
  s = np.asarray(item_text_scores(jnp.asarray(item_feats), jnp.asarray(text_feats)))
  idx = np.arange(len(s))
  out = {f"i2t_{k}": v for k, v in recall_at(_ranks_of_targets(s, idx), ks).items()}
  out |= {f"t2i_{k}": v for k, v in recall_at(_ranks_of_targets(s.T, idx), ks).items()}
  return out


def heldout_pair_recall(item_feats: np.ndarray, pairs: np.ndarray, k: int = 10) -> float:
  """Recall@k of b given a over all items except a itself.

  Args:
    item_feats: float32[N, K, E] features of every item.
    pairs: int[P, 2] held-out (a, b) pairs with a != b.
  """
  feats = jnp.asarray(item_feats)
  s = np.asarray(item_item_scores(feats[pairs[:, 0]], feats))
  exclude = np.zeros_like(s, bool)
  exclude[np.arange(len(pairs)), pairs[:, 0]] = True
  return float((_ranks_of_targets(s, pairs[:, 1], exclude) <= k).mean())


def cluster_precision(item_feats: np.ndarray, cluster: np.ndarray, k: int = 10,
                      max_items: int = 2000) -> float:
  """Mean fraction of each item's k nearest items (itself excluded) in its cluster."""
  n = min(len(cluster), max_items)
  feats = jnp.asarray(item_feats)
  s = np.array(item_item_scores(feats[:n], feats))
  s[np.arange(n), np.arange(n)] = -np.inf
  top = np.argsort(-s, axis=1)[:, :k]
  return float((cluster[top] == cluster[:n, None]).mean())


def heldout_pairs(valid: np.ndarray, test: np.ndarray) -> np.ndarray:
  """(validation item, test item) per user: consecutive, and in no training pair's source.

  These are held out by construction: training pairs come from ``Split.train`` only.
  Pairs with a == b are dropped.
  """
  pairs = np.stack([valid, test], 1).astype(np.int32)
  return pairs[pairs[:, 0] != pairs[:, 1]]
