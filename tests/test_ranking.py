"""Ranking metrics against hand-computed values and a brute-force sort-based reference."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from ilm_jax.data import types
from ilm_jax.evals import ranking


def _reference_rank(scores: np.ndarray, target: int, history) -> int:
  """Sorts the candidates; on ties the target goes last (pessimistic)."""
  history = {int(h) for h in history}
  if target in history:
    return 0
  cands = [j for j in range(len(scores)) if j not in history]
  order = sorted(cands, key=lambda j: (-float(scores[j]), j == target))
  return order.index(target) + 1


def _reference_metrics(ranks, k):
  hr = [1.0 if 0 < r <= k else 0.0 for r in ranks]
  nd = [1.0 / math.log2(r + 1) if 0 < r <= k else 0.0 for r in ranks]
  return np.mean(hr), np.mean(nd)


def test_ranks_from_scores_hand_example():
  scores = jnp.array([[.1, .5, .5, .9], [.1, .5, .5, .9], [.3, .2, .1, .0]])
  exclude = jnp.array([[0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 1, 0]], bool)
  ranks, finite = ranking.ranks_from_scores(scores, jnp.array([1, 1, 2]), exclude)
  # Row 0: item 3 excluded, item 2 ties -> 2. Row 1: 3 and the tie above -> 3.
  # Row 2: target is history -> miss.
  assert np.asarray(ranks).tolist() == [2, 3, ranking.NOT_RANKED]
  assert np.asarray(finite).all()


def test_constant_scores_rank_last():
  ranks, _ = ranking.ranks_from_scores(jnp.zeros((1, 7)), jnp.array([3]),
                                       jnp.zeros((1, 7), bool))
  assert int(ranks[0]) == 7


def test_nan_scores_fail():
  def score_fn(u):
    return jnp.full((u.shape[0], 4), jnp.nan)
  with pytest.raises(ValueError, match="NaN"):
    ranking.rank_users(score_fn, [np.array([0])] * 2, np.array([1, 2]), 4)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_rank_users_matches_brute_force(batch_size):
  rng = np.random.default_rng(0)
  num_users, num_items = 37, 23
  # Integer-valued scores make ties frequent.
  table = rng.integers(0, 6, (num_users, num_items)).astype(np.float32)
  histories = [rng.choice(num_items, rng.integers(0, 8), replace=False) for _ in range(num_users)]
  targets = rng.integers(0, num_items, num_users)
  targets[:3] = [h[0] if len(h) else 0 for h in histories[:3]]  # some targets in history
  ranks = ranking.rank_users(lambda u: jnp.asarray(table)[u], histories, targets, num_items,
                             batch_size=batch_size)
  want = [_reference_rank(table[u], targets[u], histories[u]) for u in range(num_users)]
  assert ranks.tolist() == want
  assert (ranks == 0).sum() >= 1
  # A subset keeps the order of ``users``.
  sub = np.array([5, 2, 30])
  assert ranking.rank_users(lambda u: jnp.asarray(table)[u], histories, targets, num_items,
                            users=sub, batch_size=batch_size).tolist() == [want[i] for i in sub]


def test_rank_users_top_k_is_the_best_candidates_outside_the_history():
  rng = np.random.default_rng(2)
  table = rng.normal(size=(9, 12)).astype(np.float32)  # continuous: no ties
  histories = [rng.choice(12, 4, replace=False) for _ in range(9)]
  targets = rng.integers(0, 12, 9)
  ranks, top = ranking.rank_users(lambda u: jnp.asarray(table)[u], histories, targets, 12,
                                  batch_size=4, top_k=3)
  assert ranks.tolist() == ranking.rank_users(lambda u: jnp.asarray(table)[u], histories,
                                              targets, 12, batch_size=4).tolist()
  for u in range(9):
    want = [i for i in np.argsort(-table[u]) if i not in set(histories[u])][:3]
    assert top[u].tolist() == want
  # Fewer candidates than top_k: the list ends with -1, never a history item.
  _, short = ranking.rank_users(lambda u: jnp.asarray(table)[u, :4], [np.array([0, 2])] * 9,
                                targets % 4, 4, top_k=3)
  assert {tuple(row) for row in short.tolist()} <= {(1, 3, -1), (3, 1, -1)}


def test_distinct_tells_one_list_for_everyone_from_personal_lists():
  ranks = np.array([1, 0, 3])
  same = np.tile([4, 2, 7], (3, 1))
  assert ranking.summarize(ranks, top=same)["distinct@3"] == 3
  own = np.array([[4, 2, 7], [1, 5, 6], [4, 8, -1]])  # -1: a short list, not an item
  assert ranking.summarize(ranks, top=own)["distinct@3"] == 7
  assert "distinct@3" not in ranking.summarize(ranks)
  with pytest.raises(ValueError, match="shape"):
    ranking.summarize(ranks, top=own[:2])


def test_top_of_lists_cleans_as_ranks_from_lists_does():
  ranked = [[-1, 3, 3, 9, 1, 5], [2]]
  histories = [np.array([9]), np.array([], int)]
  top = ranking.top_of_lists(ranked, 3, histories)
  assert top.tolist() == [[3, 1, 5], [2, -1, -1]]
  # The rank of an item is its position in the cleaned list.
  assert ranking.ranks_from_lists(ranked, [5, 2], histories).tolist() == [3, 1]


def test_summarize_against_reference():
  ranks = np.array([1, 2, 5, 6, 10, 11, 0, 3])
  out = ranking.summarize(ranks)
  for k in (5, 10):
    hr, nd = _reference_metrics(ranks, k)
    assert out[f"hr@{k}"] == pytest.approx(hr)
    assert out[f"ndcg@{k}"] == pytest.approx(nd)
  assert out["users"] == 8
  hits5 = np.array([1, 1, 1, 0, 0, 0, 0, 1], float)
  assert out["hr@5_se"] == pytest.approx(hits5.std(ddof=1) / np.sqrt(8))
  assert out["ndcg@5"] == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(6) + 0.5) / 8)


def test_ranks_from_lists():
  ranked = [[4, 2, 7], [-1, 3, 3, 9, 1], [5, 6], [1, 2]]
  histories = [np.array([], int), np.array([9]), np.array([0]), np.array([2])]
  targets = [7, 1, 0, 2]
  ranks = ranking.ranks_from_lists(ranked, targets, histories)
  # -1, repeated 3 and history 9 are dropped -> 1 is second; 0 absent; 2 is history.
  assert ranks.tolist() == [3, 2, 0, 0]
  assert ranking.ranks_from_lists([[3, 1]], [1]).tolist() == [2]


def test_lists_and_scores_agree():
  """A full ranked list from the scores gives the same ranks as the dense scorer."""
  rng = np.random.default_rng(1)
  table = rng.normal(size=(10, 15)).astype(np.float32)  # continuous: no ties
  histories = [rng.choice(15, 3, replace=False) for _ in range(10)]
  targets = rng.integers(0, 15, 10)
  dense = ranking.rank_users(lambda u: jnp.asarray(table)[u], histories, targets, 15)
  lists = ranking.ranks_from_lists([np.argsort(-row) for row in table], targets, histories)
  np.testing.assert_array_equal(dense, lists)


def test_evaluate_scores_uses_history_of_split():
  # One user: sequence 0 1 2 3 -> train [0, 1], valid 2, test 3.
  ds = types.RecDataset(name="toy", item_ids=np.array(list("abcde")), user_ids=np.array(["u"]),
                        sequences=[np.array([0, 1, 2, 3], np.int32)], item_text=[""] * 5,
                        item_titles=[""] * 5)
  split = types.leave_one_out(ds)
  scores = jnp.array([[9., 8., 7., 6., 5.]])
  # valid: candidates {2, 3, 4}, target 2 first; test: candidates {3, 4} (2 is history).
  assert ranking.evaluate_scores(lambda u: scores[u], split, "valid", 5)["hr@5"] == 1.0
  test = ranking.evaluate_scores(lambda u: scores[u], split, "test", 5)
  assert test["ndcg@5"] == 1.0 and test["users"] == 1
