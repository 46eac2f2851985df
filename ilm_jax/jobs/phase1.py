"""The ``phase1`` job: train the Q-Former item encoder on item-text and pair batches.

Steps: prepared dataset -> leave-one-out split (everything trained sees ``Split.train``)
-> frozen CF embeddings (npz, or weighted ALS trained here) -> a seeded fraction of items
held out of item-text training -> Grain pipeline (item-text batches alternating 1:1 with
item-item / user-item batches; IT: the same item-text batches alone) -> Q-Former (MiniLM
text tower by default) -> ``train.train`` on a data-parallel mesh over all devices ->
periodic and final Phase 1 evaluation -> ``results.json`` records (task ``phase1``) and
the trained Q-Former in ``WORKDIR/phase1`` for Phase 2 (``ilm_jax.phase1.load_qformer``).

Evaluation (``Phase1Evaluator``; nothing is measured on text that trained):
  i2t/t2i_recall@{1,5,10}        held-out items vs held-out texts (BLIP-style square)
  i2t/t2i_full_recall@{1,5,10}   held-out items/texts ranked among all texts/items
                                 (capped at ``eval.max_candidates``, seeded sample)
  ii_recall@10                   held-out (validation item, test item) pairs, all items
  cluster_p@10                   generated catalogue: share of an item's 10 nearest items
                                 (Q-Former max-over-K×K score) in its hidden cluster
  itg_loss_heldout               ITG token CE (no smoothing) on held-out items' texts
  cf_ii_recall@10, cf_cluster_p@10   the same two with raw CF cosine (what CF alone gives)
  untrained_<metric>             the summary metrics of the init, before any update
                                 (``eval.untrained``): what training added or lost
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from ilm_jax import losses, partition, phase1, resources, train
from ilm_jax.cf import mf
from ilm_jax.data import pipeline, tokenization, types
from ilm_jax.evals import phase1 as phase1_eval
from ilm_jax.evals import results
from ilm_jax.jobs import cf as cf_job
from ilm_jax.jobs import prepare
from ilm_jax.models import bert_loading
from ilm_jax.models import qformer as qformer_lib

# ==== Inputs =============================================================================

def cf_embeddings(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                  ds: types.RecDataset, split: types.Split) -> mf.Embeddings:
  """``config.cf_path``, else ``WORKDIR/cf/embeddings.npz``, else ALS trained (and saved) here."""
  path = pathlib.Path(config.cf_path) if config.cf_path else cf_job.embeddings_path(workdir)
  if path.exists():
    emb = mf.load_embeddings(path)
    emb.check_matches(ds)
    logging.info("phase1: CF embeddings from %s", path)
    return emb
  if config.cf_path:
    raise FileNotFoundError(f"config.cf_path={config.cf_path}: no such file")
  cfg = mf.ALSConfig.from_mapping(config.mf.to_dict())
  res = mf.train_als(split.train, ds.num_items, cfg, progress=logging.info)
  mf.save_embeddings(path, res.user_emb, res.item_emb, ds.user_ids, ds.item_ids,
                     {"dataset": ds.name, "stats": ds.stats(), "mf": config.mf.to_dict(),
                      "trained_on": "train split (seq[:-2])", "by": "phase1 job"})
  logging.info("phase1: trained ALS in %.1fs, saved %s", res.train_seconds, path)
  return mf.load_embeddings(path)


def heldout_items(item_text: Mapping[str, np.ndarray], fraction: float, seed: int) -> np.ndarray:
  """A fixed, seeded sample (sorted int32) of the items that have text records."""
  items = np.asarray(item_text["item"])
  n = int(round(fraction * len(items)))
  if not 0 <= n < len(items):
    raise ValueError(f"heldout_fraction={fraction} leaves no item-text training data")
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(items, n, replace=False)).astype(np.int32)


def select_rows(records: Mapping[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
  """Rows ``keep`` (bool[R]) of every array in ``records``."""
  return {k: np.asarray(v)[keep] for k, v in records.items()}


def build_qformer(model_cfg: ml_collections.ConfigDict, cf_dim: int) -> qformer_lib.QFormer:
  """The Q-Former ``model_cfg`` describes (``configs/phase1.py`` ``model`` section)."""
  rngs = nnx.Rngs(int(model_cfg.seed))
  common = dict(num_query_tokens=int(model_cfg.num_query_tokens), cf_dim=cf_dim,
                num_memory_tokens=int(model_cfg.num_memory_tokens),
                cross_attention_frequency=int(model_cfg.cross_attention_frequency),
                proj_dim=int(model_cfg.proj_dim),
                cross_attention_init_std=float(model_cfg.cross_init_std) or None)
  init = model_cfg.init
  if init == "random":
    cfg = qformer_lib.QFormerConfig(
        vocab_size=tokenization.vocab_size(), hidden_size=int(model_cfg.hidden_size),
        num_layers=int(model_cfg.num_layers) or 6, num_heads=int(model_cfg.num_heads),
        intermediate_size=int(model_cfg.intermediate_size),
        dec_token_id=tokenization.dec_token_id(), **common)
    return qformer_lib.QFormer(cfg, rngs=rngs)
  model_dir = resources.minilm_dir() if init == "minilm" else pathlib.Path(init)
  model, _ = bert_loading.qformer_from_bert_dir(
      model_dir, rngs=rngs, num_layers=int(model_cfg.num_layers) or None, **common)
  if model.cfg.dec_token_id != tokenization.dec_token_id():
    raise ValueError(f"{model_dir}: [DEC] id {model.cfg.dec_token_id} differs from the "
                     f"tokenizer's {tokenization.dec_token_id()} (vocab mismatch)")
  return model


# ==== Evaluation =========================================================================

@functools.partial(jax.jit, static_argnums=0)
def _item_feats(graphdef, state, items):
  return nnx.merge(graphdef, state).item_feats(items)


@functools.partial(jax.jit, static_argnums=0)
def _text_feats(graphdef, state, ids, valid):
  return nnx.merge(graphdef, state).qformer.text_feats(ids, valid)


@functools.partial(jax.jit, static_argnums=0)
def _itg_sums(graphdef, state, items, ids, valid):
  model = nnx.merge(graphdef, state)
  qf = model.qformer
  h = qf.itg_pass(model.item_memory(items), qf.to_decoder_ids(ids), valid)
  logits = qf.lm_logits(h[:, qf.cfg.num_query_tokens:])
  loss, m = losses.itg_loss(logits, ids, valid)
  return loss * m["itg_tokens"], m["itg_tokens"]


def _batched(fn: Callable[..., Any], batch_size: int, *arrays: np.ndarray) -> list[Any]:
  """``fn`` over fixed-size chunks of ``arrays`` (last chunk padded by repeating row 0,
  so one compiled shape serves every chunk); returns per-chunk outputs with the padding
  rows removed from array outputs of leading dim ``batch_size``."""
  n = len(arrays[0])
  outs = []
  for start in range(0, n, batch_size):
    chunk = [a[start:start + batch_size] for a in arrays]
    m = len(chunk[0])
    if m < batch_size:
      chunk = [np.concatenate([c, np.repeat(c[:1], batch_size - m, 0)]) for c in chunk]
    outs.append((fn(*chunk), m))
  return outs


class Phase1Evaluator:
  """Phase 1 metrics of a ``Phase1Model`` (see the module docstring)."""

  def __init__(self, ds: types.RecDataset, split: types.Split,
               all_text: Mapping[str, np.ndarray], heldout: np.ndarray,
               cf_items: np.ndarray, eval_cfg: ml_collections.ConfigDict):
    self.batch = int(eval_cfg.batch_size)
    rng = np.random.default_rng(int(eval_cfg.seed))
    rows = np.flatnonzero(np.isin(all_text["item"], heldout))
    self.heldout = select_rows(all_text, np.isin(np.arange(len(all_text["item"])), rows))
    others = np.setdiff1d(np.arange(len(all_text["item"])), rows)
    room = max(0, int(eval_cfg.max_candidates) - len(rows))
    if room < len(others):
      others = np.sort(rng.choice(others, room, replace=False))
    cand_rows = np.concatenate([rows, others])  # held-out texts first: target j = row j
    self.candidates = {k: np.asarray(v)[cand_rows] for k, v in all_text.items()}
    self.num_items = ds.num_items
    pairs = phase1_eval.heldout_pairs(split.valid, split.test)
    if len(pairs) > int(eval_cfg.max_pairs):
      pairs = pairs[np.sort(rng.choice(len(pairs), int(eval_cfg.max_pairs), replace=False))]
    self.pairs = pairs
    self.cluster = ds.extras.get("cluster")
    self.max_cluster_items = int(eval_cfg.max_cluster_items)
    cf = cf_items / np.maximum(np.linalg.norm(cf_items, axis=-1, keepdims=True), 1e-12)
    self.reference = {"cf_" + k: v for k, v in self._item_metrics(cf[:, None, :]).items()}

  def _item_metrics(self, feats: np.ndarray) -> dict[str, float]:
    out = {}
    if len(self.pairs):
      recalls = _batched(lambda p: phase1_eval.heldout_pair_recall(feats, p, k=10),
                         self.batch, self.pairs)
      out["ii_recall@10"] = float(sum(r * m for r, m in recalls) / len(self.pairs))
    if self.cluster is not None:
      out["cluster_p@10"] = phase1_eval.cluster_precision(
          feats, np.asarray(self.cluster), k=10, max_items=self.max_cluster_items)
    return out

  def __call__(self, model: phase1.Phase1Model, step: int) -> dict[str, float]:
    del step
    graphdef, state = nnx.split(model)
    b = self.batch

    def cat(outs):
      return np.concatenate([np.asarray(o)[:m] for o, m in outs])

    item_feats = cat(_batched(functools.partial(_item_feats, graphdef, state), b,
                              np.arange(self.num_items, dtype=np.int32)))
    cand = self.candidates
    text_feats = cat(_batched(functools.partial(_text_feats, graphdef, state), b,
                              cand["input_ids"], cand["input_mask"]))
    h = len(self.heldout["item"])
    out: dict[str, float] = {"heldout_items": float(h), "candidates": float(len(text_feats))}
    if h:
      # Square: held-out items vs held-out texts.
      out |= phase1_eval.retrieval_metrics(item_feats[self.heldout["item"]], text_feats[:h])
      # Full: held-out queries ranked among every candidate (targets are rows 0..h-1).
      s = np.asarray(phase1_eval.item_text_scores(jnp.asarray(item_feats[cand["item"]]),
                                                  jnp.asarray(text_feats)))
      idx = np.arange(h)
      for name, scores in (("i2t_full", s[:h]), ("t2i_full", s[:, :h].T)):
        ranks = phase1_eval._ranks_of_targets(scores, idx)  # noqa: SLF001  (shared helper)
        out |= {f"{name}_{k}": v for k, v in phase1_eval.recall_at(ranks).items()}
      out["itg_loss_heldout"] = _itg_mean(graphdef, state, self.heldout, b)
    out |= self._item_metrics(item_feats)
    return out


def _itg_mean(graphdef, state, records: Mapping[str, np.ndarray], batch: int) -> float:
  """Mean ITG token CE (no label smoothing) over ``records`` (the last chunk is smaller:
  one more compiled shape, but no padding rows in the mean)."""
  total, tokens = 0.0, 0.0
  for start in range(0, len(records["item"]), batch):
    sl = slice(start, start + batch)
    loss_sum, count = _itg_sums(graphdef, state, records["item"][sl],
                                records["input_ids"][sl], records["input_mask"][sl])
    total, tokens = total + float(loss_sum), tokens + float(count)
  return total / max(tokens, 1.0)


# ==== The job ============================================================================

@dataclasses.dataclass
class TrainingData:
  """What Phase 1 trains and evaluates on (train split only for everything trained)."""
  ds: types.RecDataset
  split: types.Split
  emb: Any                             # cf_embeddings(): .item_emb, .user_emb
  all_text: dict[str, np.ndarray]      # every item's text records (held-out ones included)
  heldout: np.ndarray                  # item ids whose text is never trained on
  data: Any                            # the batch iterator (item-text, alternating pairs)
  pairs: np.ndarray                    # int[P, 2] the pair stream's rows (empty for IT)


def training_data(config: ml_collections.ConfigDict, workdir: str | os.PathLike
                  ) -> TrainingData:
  """The prepared dataset, CF embeddings, held-out items and the seeded batch iterator."""
  variant = config.variant
  if variant not in phase1.METHODS:
    raise ValueError(f"config.variant={variant!r}; valid: {', '.join(phase1.METHODS)}")
  pair_kind = phase1.VARIANTS[variant]
  ds = prepare.prepared_dataset(config.data, workdir, prepare.data_dir(config, workdir))
  split = types.leave_one_out(ds)
  emb = cf_embeddings(config, workdir, ds, split)
  pc = config.pipeline
  sets = pipeline.phase1_sets(ds, split, pair_kind=pair_kind or "item_item",
                              window=int(pc.window),
                              dedup_pairs=bool(pc.dedup_pairs),
                              max_len=int(pc.text_max_len))
  all_text = dict(sets.item_text)
  if not len(all_text["item"]):
    raise types.DataError(
        f"phase1: {ds.name} has no item text (no item of its {ds.num_items} has a title, "
        "brand, categories or description; OpenP5's Clothing is such a set, see "
        "../shared/data/README.md). Phase 1 trains item-text losses on every variant "
        f"({', '.join(phase1.METHODS)}), so it cannot run. Give the items text with "
        "--config.data.item_meta=FILE, or use the Phase 2 models that need no Phase 1: "
        f"configs/phase2.py:rand|mlp|text,{ds.name}")
  heldout = heldout_items(all_text, float(config.heldout_fraction), int(config.heldout_seed))
  sets = dataclasses.replace(
      sets, item_text=select_rows(all_text, ~np.isin(all_text["item"], heldout)))
  print(f"phase1: {ds.name} {ds.stats()}; variant {variant}; "
        f"{len(sets.item_text['item'])} item-text records for training, {len(heldout)} held "
        f"out; {len(sets.pairs) if pair_kind else 0} {pair_kind or 'no'} pairs", flush=True)
  if pair_kind is None:
    # The very item-text stream phase1_dataset would interleave (stream 0, same seed).
    data_ds = pipeline.batches(sets.item_text, "item_text", global_batch=int(pc.text_batch),
                               seed=pipeline.stream_seed(int(pc.seed), 0))
  else:
    data_ds = pipeline.phase1_dataset(sets, text_batch=int(pc.text_batch),
                                      pair_batch=int(pc.pair_batch), seed=int(pc.seed))
  return TrainingData(ds, split, emb, all_text, heldout, pipeline.to_iterator(data_ds),
                      np.asarray(sets.pairs) if pair_kind else np.zeros((0, 2), np.int64))


def run(config: ml_collections.ConfigDict, workdir: str,
        on_step: Callable[[int, Mapping[str, Any]], None] | None = None) -> list[dict[str, Any]]:
  """Trains, evaluates and saves; returns the results records written.

  Args:
    config: ``configs/phase1.py``.
    workdir: run folder (checkpoints, metrics, results.json, phase1/).
    on_step: test hook passed to ``train.train``.
  """
  wall0 = time.perf_counter()
  d = training_data(config, workdir)
  ds, split, emb, all_text, heldout, data = (d.ds, d.split, d.emb, d.all_text, d.heldout,
                                             d.data)
  variant, pc = config.variant, config.pipeline
  pair_kind = phase1.VARIANTS[variant]

  # ---- model ----
  item_emb, user_emb = emb.item_emb, emb.user_emb

  def model_fn() -> phase1.Phase1Model:
    return phase1.Phase1Model(build_qformer(config.model, item_emb.shape[1]), item_emb,
                              user_emb)

  lc = config.loss
  log_q = None
  if pair_kind and lc.get("pair_logq", False):
    sides = (ds.num_users if pair_kind == "user_item" else ds.num_items, ds.num_items)
    log_q = phase1.sampling_log_q(d.pairs, sides)
  loss_fns = phase1.loss_fns(pair_kind, pair_weight=float(lc.pair), pair_log_q=log_q,
                             itc_weight=float(lc.itc),
                             itm_weight=float(lc.itm), itg_weight=float(lc.itg),
                             label_smoothing=float(lc.label_smoothing),
                             itg_rows=int(lc.itg_rows))
  evaluator = Phase1Evaluator(ds, split, all_text, heldout, item_emb, config.eval)
  mesh = partition.make_mesh()
  # The init's metrics beside the trained ones: a random Q-Former already passes much of the
  # CF geometry through (docs/PHASE1.md, "What the item-item metrics measure").
  untrained = {}
  if config.eval.get("untrained", False):
    untrained = {f"untrained_{k}": float(v) for k, v in evaluator(model_fn(), 0).items()
                 if k in SUMMARY_KEYS}

  # ---- train (resumes from WORKDIR/checkpoints) ----
  t0 = time.perf_counter()
  result = train.train(config.train, workdir, model_fn=model_fn, losses=loss_fns, data=data,
                       mesh=mesh, eval_fn=evaluator, on_step=on_step)
  train_s = time.perf_counter() - t0
  if result.stopped_by_signal:
    print(f"phase1: stopped by a signal at step {result.step}; rerun to resume", flush=True)
    return []
  metrics = dict(result.eval_metrics) or dict(evaluator(result.model(), result.step))

  # ---- outputs ----
  model = result.model()
  phase1.save_qformer(workdir, model.qformer)
  qcfg = model.qformer.cfg
  record = dict(
      dataset=ds.name, split="test", task="phase1", template="seen", method=phase1.METHODS[variant],
      users=max(1, len(evaluator.pairs)), steps=int(result.step), train_s=round(train_s, 1),
      devices=len(jax.devices()), init=str(config.model.init), k=qcfg.num_query_tokens,
      layers=qcfg.num_layers, hidden=qcfg.hidden_size, memory_tokens=qcfg.num_memory_tokens,
      text_batch=int(pc.text_batch), pair_batch=int(pc.pair_batch),
      heldout_fraction=float(config.heldout_fraction), seed=int(config.train.seed),
      itg_rows=int(config.loss.itg_rows),
      **{k: float(v) for k, v in metrics.items() if k != "eval_seconds"},
      **untrained, **evaluator.reference)
  results.write_results(workdir, [record])
  _print_summary(record)
  print(f"phase1: wrote {pathlib.Path(workdir) / phase1.PARAMS_DIR} and results.json "
        f"({time.perf_counter() - wall0:.1f}s)", flush=True)
  return [record]


SUMMARY_KEYS = ("i2t_recall@10", "t2i_recall@10", "i2t_full_recall@10", "t2i_full_recall@10",
                "ii_recall@10", "cluster_p@10", "itg_loss_heldout", "cf_ii_recall@10",
                "cf_cluster_p@10")


def _print_summary(record: Mapping[str, Any]) -> None:
  parts = [f"{k} {record[k]:.4f}" for k in SUMMARY_KEYS if k in record]
  print(f"phase1 {record['dataset']} {record['method']} step {record['steps']}: "
        + ", ".join(parts), flush=True)
  init = [f"{k} {record['untrained_' + k]:.4f}" for k in SUMMARY_KEYS
          if "untrained_" + k in record]
  if init:
    print("phase1 untrained encoder (the init, no update): " + ", ".join(init), flush=True)
