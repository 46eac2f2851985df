"""Phase 1 retrieval metrics against brute-force loops."""

import numpy as np

from ilm_jax.evals import phase1


def _norm(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_retrieval_metrics_match_loops():
  rng = np.random.default_rng(0)
  items = _norm(rng.normal(size=(30, 3, 8))).astype(np.float32)
  texts = _norm(rng.normal(size=(30, 8))).astype(np.float32)
  got = phase1.retrieval_metrics(items, texts)
  s = np.array([[max(items[i, k] @ texts[j] for k in range(3)) for j in range(30)]
                for i in range(30)])
  for k in (1, 5, 10):
    i2t = np.mean([np.sum(s[i] >= s[i, i]) <= k for i in range(30)])
    t2i = np.mean([np.sum(s[:, j] >= s[j, j]) <= k for j in range(30)])
    assert np.isclose(got[f"i2t_recall@{k}"], i2t)
    assert np.isclose(got[f"t2i_recall@{k}"], t2i)


def test_perfect_alignment_has_recall_one():
  texts = np.eye(12, dtype=np.float32)
  items = np.repeat(texts[:, None], 2, axis=1)
  got = phase1.retrieval_metrics(items, texts)
  assert got["i2t_recall@1"] == 1.0 and got["t2i_recall@1"] == 1.0


def test_heldout_pair_recall_excludes_source_item():
  feats = np.eye(4, dtype=np.float32)[:, None, :]  # each item orthogonal to all others
  feats[1, 0] = _norm(np.array([1.0, 1.0, 0, 0]))  # item 1 is item 0's nearest neighbour
  # Without excluding a itself, item 0 would rank first for query 0 and push 1 to rank 2.
  assert phase1.heldout_pair_recall(feats, np.array([[0, 1]]), k=1) == 1.0
  assert phase1.heldout_pair_recall(feats, np.array([[0, 2]]), k=1) == 0.0


def test_cluster_precision():
  feats = np.zeros((6, 1, 2), np.float32)
  feats[:3, 0, 0] = 1.0
  feats[3:, 0, 1] = 1.0
  cluster = np.array([0, 0, 0, 1, 1, 1])
  assert phase1.cluster_precision(feats, cluster, k=2) == 1.0
  assert phase1.cluster_precision(feats, np.array([0, 1, 2, 0, 1, 2]), k=2) == 0.0


def test_heldout_pairs_drop_self_pairs():
  pairs = phase1.heldout_pairs(np.array([1, 2, 3]), np.array([1, 5, 6]))
  assert pairs.tolist() == [[2, 5], [3, 6]]
