"""Optimizer schedule and decay mask, metrics writer, benchmark helpers."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ilm_jax import benchmarking, optim
from ilm_jax.metrics_writer import MetricsWriter, read_metrics


def test_schedule_warmup_then_cosine_by_hand():
  cfg = optim.default_config(lr=2.0, warmup_steps=4, total_steps=14, end_lr_ratio=0.1)
  sched = optim.make_schedule(cfg)
  assert float(sched(0)) == 0.0
  assert float(sched(2)) == pytest.approx(1.0)
  assert float(sched(4)) == pytest.approx(2.0)
  # Cosine over the remaining 10 steps from 2.0 to 0.2: halfway = 0.2 + 0.5 * 1.8.
  assert float(sched(9)) == pytest.approx(0.2 + 0.5 * 1.8 * (1 + math.cos(math.pi * 0.5)))
  assert float(sched(14)) == pytest.approx(0.2)
  with pytest.raises(ValueError, match="must be below the run.s 10 steps"):
    optim.make_schedule(optim.default_config(warmup_steps=20, total_steps=10))
  with pytest.raises(ValueError, match="total_steps is 0"):
    optim.make_schedule(optim.default_config())


class _M(nnx.Module):
  def __init__(self):
    r = nnx.Rngs(0)
    self.dense = nnx.Linear(3, 4, rngs=r)
    self.layer_norm = nnx.LayerNorm(4, rngs=r)
    self.query_tokens = nnx.Param(jnp.ones((2, 4)))
    self.temp = nnx.Param(jnp.ones(()))


def test_decay_mask_and_weight_decay_effect():
  params = nnx.state(_M(), nnx.Param)
  mask = nnx.to_pure_dict(optim.decay_mask(params))
  assert mask == {"dense": {"kernel": True, "bias": False},
                  "layer_norm": {"scale": False, "bias": False},
                  "query_tokens": True, "temp": False}
  # Zero gradients: only decayed params change, by lr * wd * value (AdamW, decoupled).
  cfg = optim.default_config(lr=0.5, warmup_steps=0, total_steps=10, weight_decay=0.1,
                             clip=1.0)
  tx, sched = optim.make_optimizer(cfg)
  grads = jax_zeros_like(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = nnx.to_pure_dict(optax.apply_updates(params, updates))
  old = nnx.to_pure_dict(params)
  np.testing.assert_allclose(new["dense"]["kernel"],
                             old["dense"]["kernel"] * (1 - float(sched(0)) * 0.1), rtol=1e-6)
  np.testing.assert_array_equal(new["temp"], old["temp"])
  np.testing.assert_array_equal(new["dense"]["bias"], old["dense"]["bias"])


def jax_zeros_like(tree):
  import jax  # noqa: PLC0415
  return jax.tree.map(jnp.zeros_like, tree)


def test_metrics_writer_truncates_on_resume(tmp_path):
  w = MetricsWriter(tmp_path, enabled=True)
  assert not (tmp_path / "tb").exists()  # opened by the first write, not by a failed set-up
  for s in range(1, 6):
    w.write(s, {"loss": np.float32(s / 10), "kind": "a"}, prefix="train/")
  w.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "lo')  # a line cut short by a crash
  w = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
  w.truncate_after(3)
  w.write(4, {"loss": 0.5})
  recs = read_metrics(tmp_path)
  assert [r["step"] for r in recs] == [1, 2, 3, 4]
  assert recs[0] == {"step": 1, "loss": pytest.approx(0.1), "kind": "a"}
  assert list((tmp_path / "tb").iterdir())  # TensorBoard event file written
  silent = MetricsWriter(tmp_path / "other", enabled=False)
  silent.write(1, {"loss": 1.0})
  assert not (tmp_path / "other").exists()


def test_matmul_ceiling_and_rss():
  out = benchmarking.measure_matmul_ceiling(n=256, repeats=2)
  assert out["gflops"] > 0 and out["seconds"] > 0
  # Independent check of the FLOP arithmetic.
  assert out["gflops"] == pytest.approx(2 * 256**3 / out["seconds"] / 1e9)
  peak_before = benchmarking.peak_rss_bytes()
  rss_before = benchmarking.current_rss_bytes()
  block = np.ones(peak_before // 8 + 64 * 2**20 // 8)  # touch more than the peak so far
  assert benchmarking.peak_rss_bytes() >= max(peak_before, rss_before + 0.9 * block.nbytes)
  del block


def test_benchmark_json_records_the_machine(tmp_path):
  out = tmp_path / "bench.json"
  benchmarking.write_json(str(out), {"rows": [{"x": 1}]})
  got = json.loads(out.read_text())
  assert got["rows"] == [{"x": 1}] and got["devices"] and len(got["load_after"]) == 3
  benchmarking.write_json("", {"rows": []})   # no --out: nothing written, no error
  assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]
