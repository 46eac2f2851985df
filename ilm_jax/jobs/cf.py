"""The ``cf`` job: MF embeddings on train interactions, evaluated as a recommender.

Steps: load the dataset (k-core) -> leave-one-out split -> weighted ALS on ``Split.train``
(validation HR/NDCG printed per iteration) -> full-ranking evaluation of validation and
test (OpenP5 protocol, ``evals.ranking``) -> table on stdout -> ``cf/embeddings.npz``,
``cf/train_log.json`` and ``results.json`` records in the workdir.

Results records: MF is a straightforward recommender (user -> item, no prompt), so its
records use task ``straightforward``; it has no template, and its numbers are filed under
``seen`` (the same numbers would hold for ``unseen``). Validation records are written too
(split ``valid``), with the settings and training time as extras, and the popularity
baseline's numbers on the same users as ``popularity_<metric>`` (items ranked by their
training interactions, the same list for every user minus their history).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Any

import ml_collections
import numpy as np

from ilm_jax.cf import mf
from ilm_jax.data import sources, types
from ilm_jax.evals import ranking, results

log = logging.getLogger(__name__)

EMBEDDINGS = "cf/embeddings.npz"


def embeddings_path(workdir: str | os.PathLike) -> pathlib.Path:
  """Where the cf job leaves the embeddings (later phases read them from here)."""
  return pathlib.Path(workdir) / EMBEDDINGS


def _eval_users(num_users: int, max_users: int, seed: int) -> np.ndarray | None:
  if not max_users or max_users >= num_users:
    return None
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num_users, max_users, replace=False))


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """Trains, evaluates and saves; returns the records written to results.json."""
  wall0 = time.perf_counter()
  ds = sources.load_dataset(config.data)
  split = types.leave_one_out(ds)
  print(f"cf: dataset {ds.name} {ds.stats()}", flush=True)
  cfg = mf.ALSConfig.from_mapping(config.mf.to_dict())
  users = _eval_users(ds.num_users, config.eval.max_users, config.eval.seed)

  def evaluate(user_emb, item_emb, which):
    return ranking.evaluate_scores(mf.score_fn(user_emb, item_emb), split, which, ds.num_items,
                                   users=users, batch_size=config.eval.batch_size)

  res = mf.train_als(split.train, ds.num_items, cfg,
                     valid_fn=lambda x, y: evaluate(x, y, "valid"),
                     progress=lambda line: print(line, flush=True))
  print(f"cf: trained in {res.train_seconds:.1f}s (iteration {res.best_iter} kept)", flush=True)

  metrics = {"valid": evaluate(res.user_emb, res.item_emb, "valid")}
  test_users = res.user_emb
  if config.eval.fold_in:
    test_users = mf.fold_in(res.item_emb, split.history("test"), cfg)
  metrics["test"] = evaluate(test_users, res.item_emb, "test")

  extras = {"train_s": round(res.train_seconds, 2), "iters": len(res.log),
            "best_iter": res.best_iter, "dim": cfg.dim, "reg": cfg.reg, "alpha": cfg.alpha,
            "seed": cfg.seed, "fold_in": bool(config.eval.fold_in),
            "subsample": users is not None, "command": results.command_line()}
  # The popularity baseline (train counts), filed beside MF as popularity_<metric>: the
  # floor any recommender here should clear (SPEC §8 has no method name for it).
  popularity = {which: ranking.evaluate_scores(
      mf.popularity_score_fn(split.train, ds.num_items), split, which, ds.num_items,
      users=users, batch_size=config.eval.batch_size) for which in metrics}
  records = [dict(dataset=ds.name, split=which, task="straightforward", template="seen",
                  method="mf", **m, **extras,
                  **{f"popularity_{k}": v for k, v in popularity[which].items() if k != "users"})
             for which, m in metrics.items()]

  out = pathlib.Path(workdir)
  mf.save_embeddings(
      embeddings_path(out), res.user_emb, res.item_emb, ds.user_ids, ds.item_ids,
      {"dataset": ds.name, "stats": ds.stats(), "data": config.data.to_dict(),
       "mf": config.mf.to_dict(), "trained_on": "train split (seq[:-2])",
       "best_iter": res.best_iter, "train_s": res.train_seconds,
       "metrics": {k: {m: v for m, v in d.items()} for k, d in metrics.items()}})
  log_path = out / "cf" / "train_log.json"
  tmp = log_path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(res.log, indent=1))
  os.replace(tmp, log_path)
  results.write_results(out, records)

  print(results.format_table(records, extras=["train_s"]), flush=True)
  pop = popularity["test"]
  print(f"cf: popularity baseline (train counts), test: HR@5 {pop['hr@5']:.4f} ± "
        f"{pop['hr@5_se']:.4f}, NDCG@5 {pop['ndcg@5']:.4f}, HR@10 {pop['hr@10']:.4f}, "
        f"NDCG@10 {pop['ndcg@10']:.4f}, distinct@10 {pop['distinct@10']}", flush=True)
  print(f"cf: wrote {embeddings_path(out)} and {out / results.FILENAME} "
        f"({time.perf_counter() - wall0:.1f}s)", flush=True)
  return records
