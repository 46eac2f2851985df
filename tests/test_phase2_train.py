"""The phase2 job (tiny config): end to end, loss decreases, saved state, resume.

Shared inputs are built once: prepared tiny catalogue, CF npz, and a Phase 1 hand-off (a
tiny random Q-Former written with ``phase1.save_qformer``, the format the phase1 job
leaves). One 8-step run serves several tests; the resume test deletes its last
checkpoint and reruns, which must reproduce the same trained params bit for bit.
"""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from ilm_jax import checkpoint, config_lib, partition, phase1, resources
from ilm_jax.data import sources, types
from ilm_jax.jobs import phase1 as phase1_job
from ilm_jax.jobs import phase2 as phase2_job
from ilm_jax.jobs import prepare
from ilm_jax.models import ilm as ilm_lib
from ilm_jax.models import qformer as qformer_lib

TOTAL = 8


def _get_config(arg):
  return config_lib.load_config_file(resources.REPO_ROOT / "configs" / "phase2.py", arg)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  try:
    resources.smollm2_gguf()  # the tokenizer
  except resources.MissingResourceError as e:
    pytest.skip(str(e))
  d = tmp_path_factory.mktemp("phase2_shared")
  c = _get_config("tiny")
  ds = prepare.prepared_dataset(c.data, d, d / "data")
  emb = phase1_job.cf_embeddings(c, d, ds, types.leave_one_out(ds))  # ALS -> d/cf/
  qcfg = qformer_lib.QFormerConfig(
      vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
      max_position_embeddings=32, num_query_tokens=2, cf_dim=emb.item_emb.shape[1],
      proj_dim=16, dec_token_id=127)
  phase1.save_qformer(d / "p1", qformer_lib.QFormer(qcfg, rngs=nnx.Rngs(0)))
  return d


def _config(shared, arg="ilm,tiny", **train):
  c = _get_config(arg)
  c.data_dir = str(shared / "data")
  c.cf_path = str(shared / "cf" / "embeddings.npz")
  c.phase1_dir = str(shared / "p1")
  c.prompts.update(dict(max_len=80, max_slots=5, max_history=2))
  c.batching.update(dict(group_by_length=4, pad_multiple=16))  # the ML1M-style batches
  c.eval.update(dict(max_users=8, batch_size=8))
  c.train.update({**dict(total_steps=TOTAL, log_every=1, checkpoint_every=4), **train})
  c.train.optimizer.update(dict(lr=1e-2, warmup_steps=1))
  return c


@pytest.fixture(scope="module")
def run(shared, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("phase2_run")
  lengths = []
  summary = phase2_job.run(_config(shared), str(workdir),
                           on_step=lambda step, batch: lengths.append(
                               (batch["input_ids"].shape[1], _longest_row(batch))))
  summary["batch_lengths"] = lengths
  return workdir, summary


def _longest_row(batch) -> int:
  """Real positions of the batch's longest row (rows are right-padded)."""
  return int(np.asarray(batch["attn_mask"]).sum(axis=1).max())


def _params(model: ilm_lib.ILM, frozen) -> dict:
  _, trainable, _ = partition.split_trainable(model, tuple(frozen))
  return jax.tree.map(np.asarray, nnx.to_pure_dict(trainable))


def test_end_to_end_loss_decreases_and_state_is_saved(run, shared):
  workdir, summary = run
  assert summary["method"] == "ilm-it-ii" and summary["steps"] == TOTAL
  assert summary["soft_tokens"] == 2 and summary["examples"] > 0
  assert "valid_retrieval_hr@10" in summary
  outdir = workdir / "phase2" / "ilm-it-ii"
  recs = [json.loads(line) for line in (outdir / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in recs if "loss" in r]
  assert len(losses) == TOTAL and np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
  # Length-grouped batches, cut to multiples of 16 (at most T = 80).
  # Each batch is cut to its longest real row rounded up to 16 (at most T = 80); that only
  # padding goes is tests/test_pipeline.py's check.
  got = summary["batch_lengths"]
  assert len(got) == TOTAL
  for width, longest in got:
    assert width == min(-(-longest // 16) * 16, 80), got
  assert summary["mean_batch_len"] == pytest.approx(np.mean([w for w, _ in got]))

  # The checkpoint and the saved state hold trainable params only (no LLM, no CF).
  meta = json.loads((outdir / "ilm.json").read_text())
  c = _get_config("tiny")
  ds = sources.ensure_tokens(prepare.prepared_dataset(c.data, shared, shared / "data"))
  model = ilm_lib.load_trained(outdir, None, ds)
  params = _params(model, meta["frozen"])
  assert "llm" not in params and "cf_items" not in params
  assert set(params) == {"encoder", "retrieval"}
  n_saved = sum(x.size for x in jax.tree.leaves(params))
  assert n_saved == summary["trainable_params"]
  # One checkpoint holds the trainable params and their two Adam moments, plus a few
  # scalar counters: no LLM or CF array. Counted from orbax's metadata, not from the bytes
  # on disk, whose OCDBT layout depends on how the writes interleave (one CI run under load
  # wrote 3.4 MB where an idle one writes 1.2 MB for the same arrays).
  step_dir = outdir / "checkpoints" / str(TOTAL) / checkpoint.STATE_ITEM
  saved = jax.tree.leaves(ocp.StandardCheckpointer().metadata(step_dir).item_metadata.tree)
  names = [a.name for a in saved]
  assert not [n for n in names if ".llm." in n or ".cf_" in n], names
  n_ckpt = sum(int(np.prod(a.shape)) for a in saved)
  assert 0 <= n_ckpt - 3 * n_saved < 16, (n_ckpt, n_saved)

  # The LLM of the trained model is the untouched frozen one (bit-identical weights).
  fresh, _ = ilm_lib.load_llm(c.llm)
  jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model.llm)),
               nnx.to_pure_dict(nnx.state(fresh)))
  # The trained encoder differs from the Phase 1 hand-off it started from.
  start = phase1.load_qformer(shared / "p1")
  assert not np.array_equal(np.asarray(model.encoder.qformer.query_tokens[...]),
                            np.asarray(start.query_tokens[...]))
  # Text-only prompts of the trained model still give the base LLM's logits exactly.
  ids = np.arange(3, 19, dtype=np.int32).reshape(2, 8)
  mask = np.ones_like(ids, bool)
  empty = np.full((2, 2), -1, np.int32)
  logits, _ = model(ids, mask, np.zeros_like(empty), empty, empty)
  base, _, _ = fresh(tokens=ids, mask=mask)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(base))


def test_resume_reproduces_the_uninterrupted_run(run, shared):
  workdir, _ = run
  outdir = workdir / "phase2" / "ilm-it-ii"
  meta = json.loads((outdir / "ilm.json").read_text())
  c = _get_config("tiny")
  ds = sources.ensure_tokens(prepare.prepared_dataset(c.data, shared, shared / "data"))
  want = _params(ilm_lib.load_trained(outdir, None, ds), meta["frozen"])
  shutil.rmtree(outdir / "checkpoints" / str(TOTAL))   # as if killed after step 4's save
  shutil.rmtree(outdir / "params")
  cfg = _config(shared)
  cfg.eval.max_users = 0
  summary = phase2_job.run(cfg, str(workdir))
  assert summary["steps"] == TOTAL
  got = _params(ilm_lib.load_trained(workdir, cfg, ds), meta["frozen"])
  jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("arg", ["text,tiny", "rand,tiny"])
def test_baseline_variants_build_and_step(shared, tmp_path, arg):
  c = _config(shared, arg, total_steps=2, checkpoint_every=0)
  c.eval.max_users = 0
  summary = phase2_job.run(c, str(tmp_path))
  assert summary["steps"] == 2
  assert summary["method"] == {"text,tiny": "text-only", "rand,tiny": "ilm-rand"}[arg]
  assert summary["soft_tokens"] == (0 if arg.startswith("text") else c.qformer.num_query_tokens)


def test_small_flag_gives_ilm_rand_the_small_phase1_architecture():
  """``phase2.py:rand,small`` builds ILM-rand from ``phase1.py:small``'s model section (the
  architecture of ILM rows whose Phase 1 ran at that budget); without it, the default."""
  phase1 = resources.REPO_ROOT / "configs" / "phase1.py"
  for arg, p1_arg in (("rand,ml1m,small", "ml1m,small"), ("rand,ml1m", "ml1m")):
    assert _get_config(arg).qformer == config_lib.load_config_file(phase1, p1_arg).model
  assert _get_config("rand,ml1m,small").qformer.init == "random"


@pytest.mark.parametrize("key, value", [("pad_multiple", -1), ("group_by_length", -3),
                                        ("pad_multiple", True)])
def test_bad_batching_values_are_config_errors(key, value):
  c = _get_config("ml1m")
  c.batching[key] = value
  with pytest.raises(config_lib.ConfigError, match=f"config.batching.{key}="):
    config_lib.validate(c)


def test_memorise_benchmark_measures_training_prompts(shared, tmp_path):
  """benchmarks/phase2_memorise.py: its prompts are the training examples minus the answers,
  and it trains and measures before and after."""
  import sys  # noqa: PLC0415

  sys.path.insert(0, str(resources.REPO_ROOT / "benchmarks"))
  import phase2_memorise  # noqa: PLC0415

  overrides = [f"data_dir={shared / 'data'}", f"cf_path={shared / 'cf' / 'embeddings.npz'}",
               f"phase1_dir={shared / 'p1'}", "prompts.max_len=112", "prompts.max_slots=5",
               "prompts.max_history=2", "train.log_every=1", "train.optimizer.warmup_steps=1"]
  config = config_lib.load_config(f"{resources.REPO_ROOT / 'configs' / 'phase2.py'}:ilm,tiny",
                                  overrides)
  ds = sources.ensure_tokens(prepare.prepared_dataset(config.data, shared, shared / "data"))
  split = types.leave_one_out(ds)
  llm_model, tok = ilm_lib.load_llm(config.llm)
  model = ilm_lib.build_ilm(config, shared, ds, llm_model)
  encoder = phase2_job.prompt_encoder(config, tok, ds, model)
  ex, prompts = phase2_memorise.training_prompts(config, ds, split, encoder, 5)
  assert len(ex["input_ids"]) == 5
  np.testing.assert_array_equal(prompts.targets, ex["target_item"])
  for r in range(5):
    n = int(prompts.arrays["prompt_len"][r])
    # The prompt is the training row up to its answer; the answer starts right after it.
    np.testing.assert_array_equal(prompts.arrays["input_ids"][r, :n], ex["input_ids"][r, :n])
    assert ex["loss_mask"][r, n] and not ex["loss_mask"][r, :n].any()
    assert prompts.arrays["attn_mask"][r].sum() == n
    assert prompts.targets[r] not in prompts.histories[r]

  r = phase2_memorise.memorise(f"{resources.REPO_ROOT / 'configs' / 'phase2.py'}:ilm,tiny",
                               str(tmp_path), overrides, examples=8, steps=3, candidates=3,
                               batch_size=2, log=lambda s: None)
  assert [row["step"] for row in r["rows"]] == [0, 3] and r["steps"] == 3
  for row in r["rows"]:
    for scorer in ("generation", "retrieval"):
      assert 1 <= row[f"{scorer}_mean_rank"] <= 3
      assert 0 <= row[f"{scorer}_hr@1"] <= row[f"{scorer}_hr@10"] == 1.0
    assert 0 <= row["beam10_hr@1"] <= row["beam10_hr@10"] <= 1
    assert 1 <= row["rows"] <= 8
  assert r["train"]["loss_lm"] > 0 and 0 <= r["train"]["acc"] <= 1
  assert "step" in phase2_memorise.format_result(r)
