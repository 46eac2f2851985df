"""OpenP5 ranking evaluation (generation with a constrained trie, retrieval head) on a stub ILM."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _eval_stub import StubILM, tiny_llm

from ilm_jax import config_lib
from ilm_jax.data import phase2, sources, types
from ilm_jax.evals import openp5, ranking, results

K = 2


@pytest.fixture(scope="module")
def setup(smollm2_tok):
  c = config_lib.data_config("generated")
  # 12 items and histories of >= 4: at most 8 candidates per user, so beam 10 is exhaustive.
  c.generated.update(num_items=12, num_users=20, num_clusters=3, min_len=6, max_len=8)
  ds = sources.load_dataset(c)
  split = types.leave_one_out(ds)
  enc = phase2.PromptEncoder(smollm2_tok, ds, soft_tokens=K, max_len=160)
  model = StubILM(tiny_llm(smollm2_tok), ds.num_items, ds.num_users, K, seed=1)
  return ds, split, enc, model


def _brute_force_scores(model, prompts, row, item_ids, end_id):
  """Teacher-forced log p(item string + end id | prompt) of every item (no cache, no trie)."""
  emb, _ = openp5.prompt_embeds(model, prompts.arrays, np.array([row]))
  n = int(prompts.arrays["prompt_len"][row])
  seqs = [list(ids) + [end_id] for ids in item_ids]
  width = max(map(len, seqs))
  toks = np.array([s + [0] * (width - len(s)) for s in seqs], np.int32)
  valid = np.array([[t < len(s) for t in range(width)] for s in seqs])
  x = jnp.concatenate([jnp.repeat(emb[:, :n], len(seqs), 0), model.llm.embed(toks)], axis=1)
  logits, _, _ = model.llm(x)
  logp = jax.nn.log_softmax(logits[:, n - 1:n - 1 + width])
  lp = np.take_along_axis(np.asarray(logp), toks[..., None], axis=-1)[..., 0]
  return (lp * valid).sum(axis=1)


def test_generation_ranking_is_the_exhaustive_constrained_ranking(setup):
  ds, split, enc, model = setup
  users = openp5.eval_users(ds.num_users, 11, seed=0)  # subsample; 11 = 8 + a padded 3
  prompts = openp5.build_prompts(ds, split, "test", "sequential", "seen", enc, users)
  trie = openp5.item_trie(ds, enc)
  ranks, items = openp5.rank_generation(model, prompts, trie, batch_size=8)
  _, item_ids = phase2.item_strings(ds, enc.tokenizer)
  assert items.shape == (len(users), openp5.BEAM_SIZE)
  for i, u in enumerate(users):
    hist = set(split.history("test")[u].tolist())
    found = [int(j) for j in items[i] if j >= 0]
    # Never a history item, never a non-item, never a repeat; every candidate is ranked.
    assert not hist & set(found)
    assert sorted(found) == sorted(set(range(ds.num_items)) - hist)
    assert all(j == -1 for j in items[i, len(found):])
    if i < 2:  # the order is the model's: sorted by teacher-forced sequence log-prob
      ref = _brute_force_scores(model, prompts, i, item_ids, enc.end_id)
      np.testing.assert_array_less(np.diff(ref[found]), 1e-3)
  expected = ranking.ranks_from_lists(items, prompts.targets, prompts.histories)
  np.testing.assert_array_equal(ranks, expected)


def test_retrieval_ranking_known_scores_and_history_exclusion(setup):
  ds, split, enc, model = setup
  n = ds.num_items
  # Item j scores -j for every user: the target's rank is 1 + #candidates below its index.
  stub = StubILM(model.llm, n, ds.num_users, K, fixed_scores=-np.arange(n, dtype=np.float32))
  users = openp5.eval_users(ds.num_users, 13, seed=2)
  rec = openp5.evaluate(stub, ds, split, enc, method="ilm-it-ii", which="valid",
                        task="straightforward", template="unseen", scorer="retrieval",
                        users=users, batch_size=4, log=lambda s: None)
  hist, targets = split.history("valid"), split.targets("valid")
  want = []
  for u in users:
    h = set(hist[u].tolist())
    t = int(targets[u])
    want.append(0 if t in h else 1 + sum(1 for j in range(t) if j not in h))
  want = np.array(want)
  hit5, hit10 = (want >= 1) & (want <= 5), (want >= 1) & (want <= 10)
  ndcg = lambda k: np.where((want >= 1) & (want <= k), 1 / np.log2(np.maximum(want, 1) + 1), 0)  # noqa: E731
  assert rec["method"] == "ilm-it-ii+retrieval" and rec["users"] == 13 and rec["subsample"]
  assert rec["hr@5"] == pytest.approx(hit5.mean())
  assert rec["hr@10"] == pytest.approx(hit10.mean())
  assert rec["ndcg@5"] == pytest.approx(ndcg(5).mean())
  assert rec["ndcg@10"] == pytest.approx(ndcg(10).mean())
  assert rec["hr@5_se"] == pytest.approx(hit5.std(ddof=1) / np.sqrt(13))
  # One ordering for everyone: the top 10s differ only by the history they skip.
  tops = [[j for j in range(n) if j not in set(hist[u].tolist())][:10] for u in users]
  assert rec["distinct@10"] == len(set().union(*tops))
  results.validate_record(rec)


def test_retrieval_excludes_history_even_when_history_scores_best(setup):
  ds, split, enc, model = setup
  hist = split.history("test")
  users = np.arange(ds.num_users)
  prompts = openp5.build_prompts(ds, split, "test", "straightforward", "seen", enc, users)
  # Stub scores: the learned head, then the history items of user 0 lifted to the top.
  base = StubILM(model.llm, ds.num_items, ds.num_users, K, seed=3)
  scores = np.zeros(ds.num_items, np.float32)
  scores[hist[0]] = 100.0
  scores[split.targets("test")[0]] = 50.0
  stub = StubILM(model.llm, ds.num_items, ds.num_users, K, fixed_scores=scores)
  ranks = openp5.rank_retrieval(stub, prompts, ds.num_items, batch_size=8)
  assert ranks[0] == 1  # history items above it are not candidates
  ranks_base = openp5.rank_retrieval(base, prompts, ds.num_items, batch_size=8)
  assert ranks_base.min() >= 1 and ranks_base.max() <= ds.num_items - min(map(len, hist))


def test_generation_record(setup):
  ds, split, enc, model = setup
  lines = []
  # Same shapes as the test above (reuses its compilation).
  rec = openp5.evaluate(model, ds, split, enc, method="ilm-rand", task="sequential",
                        template="seen", users=openp5.eval_users(ds.num_users, 8),
                        batch_size=8, log=lines.append)
  assert rec["method"] == "ilm-rand" and rec["users"] == 8 and rec["beam_size"] == 10
  assert 1 <= rec["distinct@10"] <= min(8 * 10, ds.num_items)
  assert rec["wall_s"] > 0 and rec["users_per_s"] > 0
  assert lines and "users/s" in lines[-1] and "8/8" in lines[-1]
  results.validate_record(rec)


def test_eval_users_fixed_and_sorted():
  a = openp5.eval_users(100, 10, seed=0)
  np.testing.assert_array_equal(a, openp5.eval_users(100, 10, seed=0))
  assert len(set(a.tolist())) == 10 and np.all(np.diff(a) > 0)
  np.testing.assert_array_equal(openp5.eval_users(5, 0), np.arange(5))
  np.testing.assert_array_equal(openp5.eval_users(5, 9), np.arange(5))


# ---------------------------------------------------------------------------- diagnostics


def test_sample_candidates_are_seeded_and_outside_the_history(setup):
  ds, split, enc, _ = setup
  prompts = openp5.build_prompts(ds, split, "test", "sequential", "seen", enc)
  cands = openp5.sample_candidates(prompts, ds.num_items, 4, seed=3)
  assert cands.shape == (ds.num_users, ds.num_items)
  assert (cands.sum(axis=1) == 4).all()
  for i in range(ds.num_users):
    assert cands[i, prompts.targets[i]]
    others = set(np.flatnonzero(cands[i]).tolist()) - {int(prompts.targets[i])}
    assert not others & set(prompts.histories[i].tolist())
  np.testing.assert_array_equal(cands, openp5.sample_candidates(prompts, ds.num_items, 4, 3))
  assert (cands != openp5.sample_candidates(prompts, ds.num_items, 4, seed=4)).any()
  with pytest.raises(ValueError, match="items outside their history"):
    openp5.sample_candidates(prompts, ds.num_items, ds.num_items, seed=0)


def test_rank_candidates_generation_is_the_exact_log_prob_rank(setup):
  ds, split, enc, model = setup
  users = openp5.eval_users(ds.num_users, 6, seed=1)
  prompts = openp5.build_prompts(ds, split, "test", "sequential", "seen", enc, users)
  cands = openp5.sample_candidates(prompts, ds.num_items, 5, seed=0)
  trie = openp5.item_trie(ds, enc)
  ranks = openp5.rank_candidates(model, prompts, cands, scorer="generation", trie=trie,
                                 batch_size=4)
  _, item_ids = phase2.item_strings(ds, enc.tokenizer)
  for i in range(len(users)):
    ref = _brute_force_scores(model, prompts, i, item_ids, enc.end_id)
    others = np.flatnonzero(cands[i] & (np.arange(ds.num_items) != prompts.targets[i]))
    t, o = ref[prompts.targets[i]], ref[others]
    # The beam's summed log-probs round differently from one teacher-forced pass: a
    # candidate within 1e-3 of the target may fall on either side.
    assert 1 + (o > t + 1e-3).sum() <= ranks[i] <= 1 + (o >= t - 1e-3).sum()
  assert ranks.min() >= 1 and ranks.max() <= 5
  with pytest.raises(ValueError, match="needs the item trie"):
    openp5.rank_candidates(model, prompts, cands, scorer="generation")


def test_rank_candidates_retrieval_counts_only_candidates(setup):
  ds, split, enc, model = setup
  n = ds.num_items
  stub = StubILM(model.llm, n, ds.num_users, K, fixed_scores=-np.arange(n, dtype=np.float32))
  users = openp5.eval_users(ds.num_users, 7, seed=2)
  prompts = openp5.build_prompts(ds, split, "test", "straightforward", "seen", enc, users)
  cands = openp5.sample_candidates(prompts, n, 3, seed=5)
  ranks = openp5.rank_candidates(stub, prompts, cands, scorer="retrieval", batch_size=4)
  # Item j scores -j: the rank is 1 + the candidates with a lower index than the target.
  want = [1 + int((np.flatnonzero(cands[i]) < prompts.targets[i]).sum()) for i in range(7)]
  np.testing.assert_array_equal(ranks, want)
