"""The training loop: resume == uninterrupted (bit for bit), signals, NaN guard, frozen
weights, and a step over the 8-device CPU mesh (devices from conftest)."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import _train_tiny as tiny
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache

from ilm_jax import checkpoint, optim, partition, steps, train
from ilm_jax.metrics_writer import read_metrics

TOTAL = 6


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
  """Every train() call re-jits the same steps; a persistent cache avoids recompiling."""
  old = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  compilation_cache.reset_cache()
  yield
  jax.config.update("jax_compilation_cache_dir", old)
  compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
  """An uninterrupted TOTAL-step run with checkpoints every 2 steps."""
  workdir = tmp_path_factory.mktemp("baseline")
  probe = tiny.make_iter(99).__next__()
  calls = []

  def eval_fn(model, step):
    calls.append(step)
    return {"mse": float(np.mean((np.asarray(model(probe["ids"])) - probe["y"]) ** 2))}

  result = tiny.run(workdir, TOTAL, eval_fn=eval_fn, eval_every=4)
  assert calls == [4, TOTAL]  # every eval_every steps, and once at the end
  return workdir, result


def test_metrics_jsonl_has_steps_evals_and_rates(baseline):
  workdir, result = baseline
  recs = read_metrics(workdir)
  evals = [r for r in recs if "eval/mse" in r]
  assert [r["step"] for r in evals] == [4, TOTAL]
  assert evals[-1]["eval/mse"] == result.eval_metrics["mse"]
  assert all(r["steps_per_sec"] > 0 for r in recs if "steps_per_sec" in r)
  lrs = [r["learning_rate"] for r in recs if "loss" in r]
  assert lrs[0] == 0.0 and lrs[2] == pytest.approx(1e-2)  # warm-up of 2 steps, then peak
  assert list((pathlib.Path(workdir) / "tb").iterdir())


def _leaves(state):
  return [np.asarray(x) for x in jax.tree.leaves(state)]


def _step_records(workdir):
  recs = [r for r in read_metrics(workdir) if "loss" in r]
  return {r["step"]: r for r in recs}, [r["step"] for r in recs]


def test_interrupted_runs_resume_bit_identical(baseline, tmp_path):
  """SIGTERM at step 3 (checkpoint + clean return), then a resume to the end. (A crash
  with no final save is the SIGKILL test below.)"""
  base_dir, base = baseline
  workdir = tmp_path / "run"

  def sigterm_at_3(step, batch):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  r1 = tiny.run(workdir, TOTAL, on_step=sigterm_at_3)
  assert r1.stopped_by_signal and r1.step == 3
  assert checkpoint.Checkpointer(workdir / "checkpoints").latest_step() == 3

  r3 = tiny.run(workdir, TOTAL)
  assert r3.restored_step == 3 and r3.step == TOTAL and not r3.stopped_by_signal

  for a, b in zip(_leaves(base.trainable), _leaves(r3.trainable), strict=True):
    np.testing.assert_array_equal(a, b)  # bit-identical, not allclose
  for a, b in zip(_leaves(base.opt_state), _leaves(r3.opt_state), strict=True):
    np.testing.assert_array_equal(a, b)
  # Same batches (fingerprint) and same losses at every step; each step logged once.
  base_recs, _ = _step_records(base_dir)
  recs, order = _step_records(workdir)
  assert order == list(range(1, TOTAL + 1))
  for s in range(1, TOTAL + 1):
    assert recs[s]["batch_sum"] == base_recs[s]["batch_sum"]
    assert recs[s]["loss"] == base_recs[s]["loss"]
    assert recs[s]["kind"] == "ab"[(s - 1) % 2]


def test_frozen_weights_untouched_unoptimized_and_not_checkpointed(baseline):
  workdir, result = baseline
  fresh = tiny.model_fn()
  trained = result.model()
  np.testing.assert_array_equal(np.asarray(trained.table.embedding.get_value()),
                                np.asarray(fresh.table.embedding.get_value()))
  # ...while the trainable ones moved.
  assert not np.array_equal(np.asarray(trained.l1.kernel.get_value()),
                            np.asarray(fresh.l1.kernel.get_value()))
  opt_paths = [jax.tree_util.keystr(p)
               for p, _ in jax.tree_util.tree_flatten_with_path(result.opt_state)[0]]
  assert opt_paths and not any("table" in p for p in opt_paths)
  assert any("l1" in p for p in opt_paths)
  # The checkpoint's tree has no 'table', and its bytes are far fewer than the table's
  # (random float32 does not compress): the frozen table is not stored.
  step_dir = pathlib.Path(workdir) / "checkpoints" / str(TOTAL)
  meta = ocp.StandardCheckpointer().metadata(step_dir / checkpoint.STATE_ITEM)
  meta_paths = [jax.tree_util.keystr(p) for p, _ in
                jax.tree_util.tree_flatten_with_path(meta.item_metadata.tree)[0]]
  assert meta_paths and not any("table" in p for p in meta_paths)
  assert any("l1" in p for p in meta_paths)
  total = sum(f.stat().st_size for f in step_dir.rglob("*") if f.is_file())
  table_bytes = tiny.VOCAB * tiny.DIN * 4
  assert total < table_bytes, (total, table_bytes)


def test_max_seconds_ends_the_run_normally_at_a_log_step(tmp_path):
  """A spent wall-clock budget ends the loop at the next logged step: final checkpoint,
  final eval and a normal return, and a rerun resumes towards total_steps."""
  calls = []
  cfg = tiny.config(total_steps=TOTAL, checkpoint_every=0, max_seconds=1e-9)
  cfg.log_every = 2
  r = train.train(cfg, tmp_path, model_fn=tiny.model_fn,
                  losses=tiny.LOSSES, data=tiny.make_data(), mesh=tiny.mesh(),
                  eval_fn=lambda model, step: calls.append(step) or {"x": 0.0})
  assert r.step == 2 and r.stopped_by_time and not r.stopped_by_signal
  assert calls == [2]
  assert checkpoint.Checkpointer(tmp_path / "checkpoints").latest_step() == 2
  cfg.max_seconds = 0.0
  r2 = train.train(cfg, tmp_path, model_fn=tiny.model_fn,
                   losses=tiny.LOSSES, data=tiny.make_data(), mesh=tiny.mesh())
  assert r2.restored_step == 2 and r2.step == TOTAL and not r2.stopped_by_time


def test_non_finite_loss_names_the_step(tmp_path):
  # Single iterator whose batches carry 'kind'; example 5 of the shuffled stream is NaN.
  nan_example = 5
  order = [int(i) for i in tiny.grain.MapDataset.range(64).shuffle(seed=7)]
  bad_step = order.index(nan_example) // tiny.BATCH + 1
  cfg = tiny.config(total_steps=bad_step + 2, checkpoint_every=1)
  with pytest.raises(train.NonFiniteLossError, match=rf"non-finite .* at step {bad_step} "):
    train.train(cfg, tmp_path, model_fn=tiny.model_fn, losses={"a": tiny.regression_loss},
                data=tiny.make_iter(7, nan_at=nan_example, kind="a"), mesh=tiny.mesh())
  # Nothing from the bad step onwards was checkpointed.
  assert checkpoint.Checkpointer(tmp_path / "checkpoints").latest_step() == bad_step - 1


def test_sharded_step_matches_single_device():
  """The jitted step over a 2x4 mesh with a data-sharded batch equals a 1-device step."""
  model = tiny.model_fn()
  graphdef, trainable, frozen = partition.split_trainable(model, tiny.FROZEN)
  tx, _ = optim.make_optimizer(optim.default_config(lr=1e-2, warmup_steps=0), 10)
  step = jax.jit(steps.make_train_step(graphdef, tiny.regression_loss, tx))
  batch = next(tiny.make_iter(3))
  rng = jax.random.key(0)

  ref_tr, _, ref_m = step(trainable, frozen, tx.init(trainable), batch, rng)

  mesh = tiny.mesh()
  sh_model = partition.place_state(tiny.model_fn(), mesh)
  _, s_tr, s_fr = partition.split_trainable(sh_model, tiny.FROZEN)
  s_batch = partition.shard_batch(batch, mesh)
  assert s_batch["ids"].sharding.spec == jax.P(("data", "fsdp"))
  assert len(s_batch["ids"].sharding.device_set) == 8
  out_tr, _, out_m = step(s_tr, s_fr, jax.jit(tx.init)(s_tr), s_batch, rng)
  assert out_tr["l1"]["kernel"].get_value().sharding.is_equivalent_to(
      jax.sharding.NamedSharding(mesh, jax.P("fsdp", None)), 2)
  np.testing.assert_allclose(float(out_m["loss"]), float(ref_m["loss"]), rtol=1e-6)
  for a, b in zip(_leaves(ref_tr), _leaves(out_tr), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _start_tiny(*args) -> subprocess.Popen:
  script = pathlib.Path(__file__).with_name("_train_tiny.py")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parent.parent),
                                                      os.environ.get("PYTHONPATH", "")]),
         # Share this module's compilation cache: the child compiles the same steps.
         "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  return subprocess.Popen([sys.executable, str(script), *map(str, args)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def test_sigkill_then_resume_is_bit_identical(baseline, tmp_path):
  """SIGKILL (no handler can run) after step 5; the last checkpoint is step 4; resuming in
  a new process-like call ends bit-identical to the uninterrupted run."""
  base_dir, base = baseline
  proc = _start_tiny(tmp_path, TOTAL, 2, 5)
  try:
    for line in proc.stdout:
      if line.startswith("STEP 5"):
        proc.send_signal(signal.SIGKILL)
        break
    assert proc.wait(timeout=120) == -signal.SIGKILL
  finally:
    if proc.poll() is None:
      proc.kill()
  result = tiny.run(tmp_path, TOTAL)
  assert result.restored_step == 4 and result.step == TOTAL
  for a, b in zip(_leaves(base.trainable), _leaves(result.trainable), strict=True):
    np.testing.assert_array_equal(a, b)
  base_recs, _ = _step_records(base_dir)
  recs, order = _step_records(tmp_path)
  assert order == list(range(1, TOTAL + 1))  # each step logged once
  assert [recs[s]["loss"] for s in order] == [base_recs[s]["loss"] for s in order]


def test_sigterm_from_outside_saves_and_exits_zero(tmp_path):
  """A real SIGTERM to a training process: it checkpoints, finishes cleanly, exits 0."""
  proc = _start_tiny(tmp_path, 100000, 0)
  try:
    for line in proc.stdout:
      if line.startswith("STEP 2"):
        proc.send_signal(signal.SIGTERM)
        break
    out = proc.stdout.read()
    rc = proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert rc == 0, out
  done = [ln for ln in out.splitlines() if ln.startswith("DONE")]
  assert done and done[0].endswith("signal=True"), out
  stopped_at = int(done[0].split()[1])
  assert checkpoint.Checkpointer(tmp_path / "checkpoints").latest_step() == stopped_at
  assert max(r["step"] for r in read_metrics(tmp_path)) == stopped_at


def test_param_count_and_unknown_kind_are_loud(tmp_path):
  model = tiny.model_fn()
  _, tr, fr = partition.split_trainable(model, tiny.FROZEN)
  assert partition.param_counts(tr, fr) == {
      "trainable": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))
                       ) - tiny.VOCAB * tiny.DIN,
      "frozen": tiny.VOCAB * tiny.DIN}
  with pytest.raises(TypeError, match="'a' .*cannot be checkpointed"):
    train.train(tiny.config(2), tmp_path, model_fn=tiny.model_fn, losses=tiny.LOSSES,
                data={"a": iter([])}, mesh=tiny.mesh())
  with pytest.raises(ValueError, match="data kinds \\['c'\\] have no loss"):
    train.train(tiny.config(2), tmp_path, model_fn=tiny.model_fn, losses=tiny.LOSSES,
                data={"c": tiny.make_iter(1)}, mesh=tiny.mesh())
