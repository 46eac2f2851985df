"""The cf job end to end (tiny config), MF vs popularity/random on the generated catalogue,
and the OpenP5 BPR-MF comparator on real data (skips without ../shared/data)."""

from __future__ import annotations

import collections
import json

import jax.numpy as jnp
import numpy as np
import pytest

from ilm_jax import config_lib, resources
from ilm_jax.cf import mf
from ilm_jax.data import sources, types
from ilm_jax.evals import ranking, results
from ilm_jax.jobs import cf as cf_job


def _get_config(arg):
  return config_lib.load_config_file(resources.REPO_ROOT / "configs" / "cf.py", arg)


def test_config_args():
  assert _get_config("").data.source == "generated"
  c = _get_config("beauty,tiny")
  assert (c.data.source, c.data.name, c.mf.iters) == ("openp5", "beauty", 3)
  with pytest.raises(config_lib.ConfigError, match="ml1m"):
    _get_config("movielens100k")
  with pytest.raises(ValueError, match="valid"):
    mf.ALSConfig.from_mapping({**_get_config("tiny").mf.to_dict(), "learning_rate": 1.0})


def test_tiny_job_writes_records_and_embeddings(tmp_path):
  config = _get_config("tiny")
  records = cf_job.run(config, str(tmp_path))
  on_disk = results.read_results(tmp_path)
  assert on_disk == [results.validate_record(r) for r in records]
  assert {(r["split"], r["method"], r["task"], r["template"]) for r in on_disk} == {
      ("valid", "mf", "straightforward", "seen"), ("test", "mf", "straightforward", "seen")}
  ds = sources.load_dataset(config.data)
  assert all(r["users"] == ds.num_users and r["dataset"] == "generated" for r in on_disk)
  # The popularity baseline rides along, on the same users: items by training count.
  split = types.leave_one_out(ds)
  counts = collections.Counter(int(i) for seq in split.train for i in seq)
  for r in on_disk:
    hist, target = split.history(r["split"]), split.targets(r["split"])
    ranks = []
    for h, t in zip(hist, target, strict=True):
      seen = set(h.tolist())
      ranks.append(np.inf if int(t) in seen else 1 + sum(  # ties count against the target
          1 for i in range(ds.num_items)
          if i != t and i not in seen and counts[i] >= counts[int(t)]))
    assert r["popularity_hr@10"] == pytest.approx(np.mean(np.asarray(ranks) <= 10))
    assert 0 < r["popularity_hr@10"] < r["hr@10"]
  emb = mf.load_embeddings(cf_job.embeddings_path(tmp_path))
  emb.check_matches(ds)
  assert emb.item_emb.shape == (ds.num_items, config.mf.dim)
  assert emb.config["mf"]["iters"] == config.mf.iters
  log = json.loads((tmp_path / "cf" / "train_log.json").read_text())
  assert [e["iter"] for e in log] == list(range(1, config.mf.iters + 1))
  # Re-running replaces the records instead of duplicating them.
  cf_job.run(config, str(tmp_path))
  assert len(results.read_results(tmp_path)) == 2


def test_mf_beats_popularity_and_random_on_generated():
  ds = sources.load_dataset(config_lib.data_config("generated"))
  split = types.leave_one_out(ds)
  n = ds.num_items
  res = mf.train_als(split.train, n, mf.ALSConfig(dim=32, reg=1.0, alpha=10.0, iters=5),
                     progress=lambda _: None)
  got = ranking.evaluate_scores(mf.score_fn(res.user_emb, res.item_emb), split, "valid", n)
  popular = ranking.evaluate_scores(mf.popularity_score_fn(split.train, n), split, "valid", n)
  table = jnp.asarray(np.random.default_rng(0).random((ds.num_users, n)), jnp.float32)
  rand = ranking.evaluate_scores(lambda u: table[u], split, "valid", n)
  assert rand["hr@10"] < 0.03  # ~10 / 1000 candidates
  for k in ("hr@10", "ndcg@10"):
    assert got[k] > 2 * popular[k] and got[k] > 5 * rand[k], (k, got, popular, rand)


@pytest.mark.realdata
def test_mf_beats_openp5_bpr_mf_on_ml1m(shared_data):
  """OpenP5 prints BPR-MF straightforward HR@5 .0141 on ML1M (SPEC §7)."""
  ds = sources.load_dataset(config_lib.data_config("openp5", name="ml1m"))
  assert ds.stats() == {"users": 6040, "items": 3416, "interactions": 999611}
  split = types.leave_one_out(ds)
  cfg = mf.ALSConfig(dim=32, reg=1.0, alpha=10.0, iters=3)
  res = mf.train_als(split.train, ds.num_items, cfg, progress=lambda _: None)
  users = mf.fold_in(res.item_emb, split.history("test"), cfg)
  test = ranking.evaluate_scores(mf.score_fn(users, res.item_emb), split, "test", ds.num_items)
  assert test["users"] == 6040
  assert test["hr@5"] > 0.0141 and test["ndcg@5"] > 0.0141, test
