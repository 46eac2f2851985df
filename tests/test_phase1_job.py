"""The phase1 job (tiny config): end to end, resume == uninterrupted, gradients, recall.

One uninterrupted tiny IT-II run (module fixture) serves several tests; prepared data and
CF embeddings are built once and shared through ``data_dir`` / ``cf_path``.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src import compilation_cache  # reset_cache has no public alias

from ilm_jax import config_lib, optim, partition, phase1, resources, steps
from ilm_jax.data import pipeline, types
from ilm_jax.evals import results
from ilm_jax.jobs import phase1 as phase1_job
from ilm_jax.jobs import prepare
from ilm_jax.models import qformer as qformer_lib

TOTAL = 24  # 12 item-text + 12 item-item updates


def _get_config(arg):
  return config_lib.load_config_file(resources.REPO_ROOT / "configs" / "phase1.py", arg)


def _config(shared, variant="it_ii", **train):
  c = _get_config(f"{variant},tiny")
  c.data_dir = str(shared / "data")
  c.cf_path = str(shared / "cf/embeddings.npz")
  c.pipeline.update(dict(text_max_len=16, pair_batch=32))
  c.train.update(dict(total_steps=TOTAL, checkpoint_every=4, log_every=4, **train))
  c.train.optimizer.update(dict(lr=2e-3, warmup_steps=2))
  return c


def _kind(batch):
  """The batch kind (the trainer pops 'kind' before ``on_step`` sees the batch)."""
  return "item_text" if "input_ids" in batch else "item_item" if "item_a" in batch else "?"


@pytest.fixture(scope="module", autouse=True)
def persistent_compilation_cache(tmp_path_factory):
  """The three tiny runs compile the same steps: share them through a persistent cache."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update(names[1], 0.0)
  jax.config.update(names[2], 0)
  compilation_cache.reset_cache()  # earlier compiles in this process checked "no cache"
  yield
  for n, v in old.items():
    jax.config.update(n, v)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  d = tmp_path_factory.mktemp("phase1_shared")
  c = _get_config("tiny")
  ds = prepare.prepared_dataset(c.data, d, d / "data")
  split = types.leave_one_out(ds)
  phase1_job.cf_embeddings(c, d, ds, split)  # trains ALS, saves d/cf/embeddings.npz
  return d


@pytest.fixture(scope="module")
def uninterrupted(shared, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("phase1_full")
  seen = []
  records = phase1_job.run(_config(shared), str(workdir),
                           on_step=lambda s, b: seen.append((s, b)))
  return workdir, records, seen


def _final_params(workdir):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(
      nnx.state(phase1.load_qformer(workdir), nnx.Param)))


def test_config_args():
  assert _get_config("").variant == "it_ii"
  c = _get_config("beauty,it_ui,tiny")
  assert (c.variant, c.data.name, c.model.init) == ("it_ui", "beauty", "random")
  assert _get_config("it").train.total_steps * 2 == _get_config("it_ii").train.total_steps
  with pytest.raises(config_lib.ConfigError, match="unknown"):
    _get_config("it,ml100k")


def test_tiny_job_writes_results_and_checkpoint(uninterrupted):
  workdir, records, seen = uninterrupted
  on_disk = [r for r in results.read_results(workdir) if r["task"] == "phase1"]
  assert [r["method"] for r in on_disk] == ["ilm-it-ii"] and on_disk[0] == records[0]
  r = on_disk[0]
  assert r["steps"] == TOTAL and r["dataset"] == "generated"
  for key in ("i2t_recall@1", "t2i_recall@10", "i2t_full_recall@5", "ii_recall@10",
              "cluster_p@10", "itg_loss_heldout", "cf_cluster_p@10",
              "untrained_ii_recall@10", "untrained_itg_loss_heldout"):
    assert np.isfinite(r[key]), key
  # The init has not seen a text: its held-out ITG loss is near log(vocabulary) and above the
  # trained one.
  assert r["untrained_itg_loss_heldout"] > np.log(30522) - 0.5
  assert r["itg_loss_heldout"] < r["untrained_itg_loss_heldout"] - 0.5
  # Alternation 1:1, starting with item-text; held-out items never in item-text batches.
  kinds = [_kind(b) for _, b in seen]
  assert kinds[:4] == ["item_text", "item_item"] * 2
  assert (workdir / "checkpoints").is_dir() and (workdir / "phase1/params").is_dir()
  q = phase1.load_qformer(workdir)
  assert q.cfg.num_query_tokens == 4 and q.cfg.hidden_size == 64


def test_sampling_log_q_counts_each_side():
  pairs = np.array([[0, 2], [0, 3], [1, 3], [0, 3]])
  lq_a, lq_b = phase1.sampling_log_q(pairs, (3, 4))
  np.testing.assert_allclose(np.exp(lq_a), [3 / 4, 1 / 4, 1 / 4])  # id 2 never first: 1/P
  np.testing.assert_allclose(np.exp(lq_b), [1 / 4, 1 / 4, 1 / 4, 3 / 4])


def test_pair_logq_config_reaches_the_item_item_loss(shared, uninterrupted, tmp_path):
  # Warm-up makes step 1's lr 0, so step 2 (the first II step) sees the init in both runs:
  # its II loss differs only by the correction.
  c = _config(shared)
  c.train.update(dict(total_steps=4, checkpoint_every=0, log_every=1))
  c.loss.pair_logq = True
  c.eval.untrained = False
  phase1_job.run(c, str(tmp_path))
  def ii_loss(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss_ii"] for r in rows if r.get("step") == 2 and "loss_ii" in r)
  plain, corrected = ii_loss(uninterrupted[0]), ii_loss(tmp_path)
  assert np.isfinite(corrected) and abs(corrected - plain) > 1e-3, (plain, corrected)


def test_dataset_without_item_text_is_a_clear_error(shared, tmp_path, monkeypatch):
  """OpenP5's Clothing has no item text: the job says so and what to do, before training."""
  real = prepare.prepared_dataset

  def without_text(*args):
    ds = real(*args)
    return dataclasses.replace(ds, item_text=[""] * ds.num_items)

  monkeypatch.setattr(prepare, "prepared_dataset", without_text)
  with pytest.raises(types.DataError, match=r"has no item text .*configs/phase2\.py:rand\|mlp\|text"):
    phase1_job.training_data(_config(shared), str(tmp_path))


def test_heldout_items_never_in_item_text_batches(shared, uninterrupted):
  _, _, seen = uninterrupted
  c = _config(shared)
  ds = prepare.prepared_dataset(c.data, shared, shared / "data")
  sets = pipeline.phase1_sets(ds, types.leave_one_out(ds), max_len=16)
  heldout = phase1_job.heldout_items(sets.item_text, c.heldout_fraction, c.heldout_seed)
  assert len(heldout) == round(c.heldout_fraction * len(sets.item_text["item"]))
  trained = np.concatenate([b["item"] for _, b in seen if _kind(b) == "item_text"])
  assert not np.isin(trained, heldout).any()


def test_resumed_run_equals_uninterrupted(shared, uninterrupted, tmp_path):
  full_dir, _, full_seen = uninterrupted

  class Crash(Exception):
    pass

  def crash_at_7(step, batch):
    del batch
    if step == 7:  # checkpoints at 4; steps 5..7 are lost and must be redone identically
      raise Crash

  with pytest.raises(Crash):
    phase1_job.run(_config(shared), str(tmp_path), on_step=crash_at_7)
  resumed_seen = []
  phase1_job.run(_config(shared), str(tmp_path),
                 on_step=lambda s, b: resumed_seen.append((s, b)))
  assert resumed_seen[0][0] == 5
  # Same next batch after the restore ...
  for (s1, b1), (s2, b2) in zip(full_seen[4:], resumed_seen, strict=True):
    assert s1 == s2 and b1.keys() == b2.keys()
    for k in b1:
      np.testing.assert_array_equal(b1[k], b2[k])
  # ... same losses, and bit-identical final parameters.
  loss = {}
  for d in (full_dir, tmp_path):
    lines = (d / "metrics.jsonl").read_text().splitlines()
    loss[d] = [line for line in lines if '"loss"' in line]
  assert loss[full_dir] == loss[tmp_path]
  full, res = _final_params(full_dir), _final_params(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, full, res)


def test_heldout_recall_far_above_chance(uninterrupted):
  """After 12 II updates, held-out (valid, test) pairs are found far above chance.

  Chance recall@10 over 200 items is 10/199 ~ 0.05; the hidden clusters (10 of them) give
  chance precision ~ 0.1. A broken encoder (ignoring the CF memory, or collapsed) stays
  at those levels. The random init passes too (a random encoder keeps the CF geometry;
  docs/PHASE1.md), so this checks that training does not destroy it, not that it learns.
  """
  r = uninterrupted[1][0]
  assert r["ii_recall@10"] > 3 * 10 / 199, r
  assert r["cluster_p@10"] > 3 * 0.1, r
  assert r["untrained_cluster_p@10"] > 3 * 0.1, r


def _tiny_model():
  # A 200-word vocabulary keeps the three compiles below fast; shapes are what matter.
  cfg = qformer_lib.QFormerConfig(vocab_size=200, hidden_size=32, num_layers=2, num_heads=4,
                                  intermediate_size=64, num_query_tokens=3, cf_dim=8,
                                  proj_dim=16, dec_token_id=199, max_position_embeddings=16)
  rng = np.random.default_rng(0)
  return phase1.Phase1Model(qformer_lib.QFormer(cfg, rngs=nnx.Rngs(0)),
                            rng.normal(size=(20, 8)).astype(np.float32),
                            rng.normal(size=(10, 8)).astype(np.float32))


def test_item_text_step_gradients_reach_only_trainable_params():
  model = _tiny_model()
  graphdef, trainable, frozen = partition.split_trainable(model)
  paths = [partition.path_str(p) for p, _ in nnx.to_flat_state(trainable)]
  assert not any("cf_" in p for p in paths)  # CF tables: not params, no grads/opt/ckpt
  frozen_paths = [partition.path_str(p) for p, _ in nnx.to_flat_state(frozen)]
  assert sorted(frozen_paths) == ["cf_items", "cf_users"]
  ids = np.full((8, 8), 110, np.int32)
  ids[:, 0] = 101
  ids += np.arange(8, dtype=np.int32)[:, None]
  batch = {"item": jnp.arange(8, dtype=jnp.int32), "input_ids": jnp.asarray(ids),
           "input_mask": jnp.ones((8, 8), bool)}

  def grads_of(fn, b):
    def loss(t):
      return fn(nnx.merge(graphdef, t, frozen, copy=True), b, jax.random.key(0))[0]
    return dict(nnx.to_flat_state(jax.grad(loss)(trainable)))

  g = {partition.path_str(p).removeprefix("qformer/"): np.abs(np.asarray(v.get_value())).max()
       for p, v in grads_of(phase1.item_text_loss, batch).items()}
  # Every head and both towers learn from ITC+ITM+ITG; only the pair temperature does not.
  for name in ("query_tokens", "memory/proj/kernel", "item_proj/kernel", "text_proj/kernel",
               "itm_head/kernel", "lm_head/bias", "temp", "embeddings/word/embedding",
               "layers/0/cross_attention/value/kernel"):
    hits = [v for p, v in g.items() if p.startswith(name)]
    assert hits and max(hits) > 0, name
  assert g["temp_pair"] == 0
  # One memory token: the cross-attention softmax over one key is the constant 1, so its
  # query/key projections get exactly no gradient (SPEC §3) — the value path carries it.
  assert g["layers/0/cross_attention/query/kernel"] == 0
  gi = {partition.path_str(p).removeprefix("qformer/"): np.abs(np.asarray(v.get_value())).max()
        for p, v in grads_of(phase1.item_item_loss,
                             {"item_a": jnp.arange(8, dtype=jnp.int32),
                              "item_b": jnp.arange(8, 16, dtype=jnp.int32)}).items()}
  assert gi["temp_pair"] > 0 and gi["temp"] == 0 and gi["itm_head/kernel"] == 0

  # A real train step leaves the frozen CF tables bit-identical.
  tx, _ = optim.make_optimizer(optim.default_config(lr=1e-2, warmup_steps=0), 10)
  step = jax.jit(steps.make_train_step(graphdef, phase1.item_text_loss, tx))
  new_trainable, _, metrics = step(trainable, frozen, tx.init(trainable), batch,
                                   jax.random.key(1))
  assert np.isfinite(float(metrics["loss"]))
  assert float(optax_diff(new_trainable, trainable)) > 0
  merged = nnx.merge(graphdef, new_trainable, frozen)
  np.testing.assert_array_equal(np.asarray(merged.cf_items[...]),
                                np.asarray(model.cf_items[...]))


def test_item_text_gradient_matches_central_differences():
  """The backward pass of ITC / ITM / ITG and their sum agrees with the loss itself.

  On an H200 the first Phase 1 step had the CPU's losses but a 3.6x larger gradient norm
  (#4); this is the check that catches that on whichever backend runs it.
  """
  model = _tiny_model()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  ids = np.random.default_rng(1).integers(110, 190, size=(8, 8)).astype(np.int32)
  ids[:, 0] = 101
  mask = np.arange(8)[None, :] < np.array([8, 8, 7, 6, 8, 5, 8, 4])[:, None]  # some padding
  batch = {"item": jnp.arange(8, dtype=jnp.int32), "input_ids": jnp.asarray(ids),
           "input_mask": jnp.asarray(mask)}
  # ITC alone: its gradient is ~1% of the others', so the sum would hide an error in it.
  for weights in ((1, 0, 0), (1, 1, 1)):
    fn = functools.partial(phase1.item_text_loss, itc_weight=weights[0],
                           itm_weight=weights[1], itg_weight=weights[2])

    @jax.jit
    def loss_of(p, fn=fn):
      return fn(nnx.merge(graphdef, p, rest, copy=True), batch, jax.random.key(3))[0]

    _, c = steps.gradient_check(loss_of, params, eps=1e-2)
    assert c["norm"] > 1e-3, (weights, c)
    assert c["rel_err"] < 0.05, (weights, c)


def optax_diff(a, b):
  return sum(jnp.abs(x - y).max() for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                   strict=True))
