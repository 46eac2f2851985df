r"""Phase 1 train-step throughput: examples/s, step time, FLOP/s vs the machine's matmul ceiling.

  .venv/bin/python benchmarks/phase1_step.py [--sizes=tiny,default,paper] [--batch=N]
      [--text_len=48] [--repeats=3] [--out=FILE]

Sizes (random-init weights; shapes are what matter):
  tiny     2 layers, 64 wide, 4 heads, K=4            (configs/phase1.py:tiny)
  default  6 layers, 384 wide, 12 heads, K=4          (all-MiniLM-L6-v2 shape; the default)
  paper    8 layers, 768 wide, 12 heads, K=32         (paper: 8 layers of BERT-base)

For each size, one jitted item-text step (ITC+ITM+ITG) and one item-item step are timed
(Phase 1 alternates them 1:1); a "pair" of steps processes ``batch`` item-text examples
and ``batch`` item-item pairs. FLOPs come from XLA's ``cost_analysis()`` of the compiled
steps; the ceiling is ``benchmarking.measure_matmul_ceiling()`` (float32, same process),
measured before the first size and again after each one; the fraction uses the highest
ceiling seen so far (a loaded machine otherwise gives fractions above 100%).
Peak memory is the process's peak RSS after the size ran (CPU) — it includes earlier sizes.

If PyTorch and transformers are importable, HF BLIP-2's Q-Former forward+backward is timed
at the same size (text + query tokens); otherwise that column says why it was skipped.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ilm_jax import benchmarking, optim, partition, phase1, steps  # noqa: E402
from ilm_jax.data import tokenization  # noqa: E402
from ilm_jax.models import qformer as qformer_lib  # noqa: E402

SIZES = {
    "tiny": dict(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128,
                 num_query_tokens=4, proj_dim=32),
    "default": dict(num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536,
                    num_query_tokens=4, proj_dim=256),
    "paper": dict(num_layers=8, hidden_size=768, num_heads=12, intermediate_size=3072,
                  num_query_tokens=32, proj_dim=256),
}
NUM_ITEMS, CF_DIM = 1000, 64


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def bench_size(name: str, batch: int, text_len: int, repeats: int) -> dict:
  """Times one item-text + one item-item train step of size ``name``."""
  cfg = qformer_lib.QFormerConfig(vocab_size=tokenization.vocab_size(), cf_dim=CF_DIM,
                                  dec_token_id=tokenization.dec_token_id(), **SIZES[name])
  rng = np.random.default_rng(0)
  model = phase1.Phase1Model(qformer_lib.QFormer(cfg, rngs=nnx.Rngs(0)),
                             rng.normal(size=(NUM_ITEMS, CF_DIM)).astype(np.float32),
                             rng.normal(size=(100, CF_DIM)).astype(np.float32))
  graphdef, trainable, frozen = partition.split_trainable(model)
  tx, _ = optim.make_optimizer(optim.default_config(warmup_steps=1), 1000)
  opt_state = tx.init(trainable)
  ids = rng.integers(1000, 29000, size=(batch, text_len)).astype(np.int32)
  ids[:, 0] = qformer_lib.BERT_CLS_ID
  text_batch = {"item": jnp.arange(batch, dtype=jnp.int32), "input_ids": jnp.asarray(ids),
                "input_mask": jnp.ones((batch, text_len), bool)}
  pair_batch = {"item_a": jnp.arange(batch, dtype=jnp.int32),
                "item_b": jnp.arange(batch, 2 * batch, dtype=jnp.int32)}
  key = jax.random.key(0)
  out = {"size": name, "batch": batch, "text_len": text_len,
         "params": partition.param_counts(trainable, frozen)["trainable"]}
  total_s, total_flops = 0.0, 0.0
  for kind, fn, b in (("item_text", phase1.item_text_loss, text_batch),
                      ("item_item", phase1.item_item_loss, pair_batch)):
    # Not donated: the same state is fed to every timed call.
    step = jax.jit(steps.make_train_step(graphdef, fn, tx))
    t0 = time.perf_counter()
    compiled = step.lower(trainable, frozen, opt_state, b, key).compile()
    out[f"{kind}_compile_s"] = time.perf_counter() - t0
    flops = _flops(compiled)
    run = functools.partial(compiled, trainable, frozen, opt_state, b, key)
    seconds = benchmarking.time_fn(run, warmup=1, repeats=repeats)
    out[f"{kind}_step_s"] = seconds
    out[f"{kind}_gflop"] = flops / 1e9
    out[f"{kind}_gflops"] = flops / seconds / 1e9
    total_s += seconds
    total_flops += flops
  out["pair_step_s"] = total_s
  out["examples_per_s"] = 2 * batch / total_s  # item-text examples + item-item pairs
  out["gflops"] = total_flops / total_s / 1e9
  out["peak_rss_gib"] = benchmarking.peak_rss_bytes() / 2**30
  return out


def bench_hf_blip2(name: str, batch: int, text_len: int, repeats: int) -> dict:
  """HF BLIP-2 Q-Former forward+backward at the same size, if torch is installed."""
  try:
    import torch  # noqa: PLC0415  (benchmark-only, never a runtime dependency)
    from transformers import Blip2QFormerConfig, Blip2QFormerModel  # noqa: PLC0415
  except ImportError as e:
    return {"hf_skipped": f"{type(e).__name__}: {e}"}
  s = SIZES[name]
  cfg = Blip2QFormerConfig(hidden_size=s["hidden_size"], num_hidden_layers=s["num_layers"],
                           num_attention_heads=s["num_heads"],
                           intermediate_size=s["intermediate_size"],
                           encoder_hidden_size=s["hidden_size"])
  model = Blip2QFormerModel(cfg)
  query = torch.randn(batch, s["num_query_tokens"] + text_len, s["hidden_size"],
                      requires_grad=True)
  memory = torch.randn(batch, 1, s["hidden_size"])

  def fwd_bwd():
    out = model(query_embeds=query, encoder_hidden_states=memory).last_hidden_state
    out.sum().backward()

  fwd_bwd()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fwd_bwd()
    times.append(time.perf_counter() - t0)
  return {"hf_fwd_bwd_s": float(np.median(times))}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="tiny,default,paper")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--text_len", type=int, default=48)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--ceiling_n", type=int, default=2048)
  p.add_argument("--out", default="")
  args = p.parse_args(argv)

  load = os.getloadavg()
  ceiling = benchmarking.measure_matmul_ceiling(n=args.ceiling_n)
  print(f"devices {jax.devices()}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
        f"on {os.cpu_count()} cpus; matmul ceiling {ceiling['gflops']:.1f} GFLOP/s "
        f"(f32 {args.ceiling_n}^2)", flush=True)
  rows = []
  for name in args.sizes.split(","):
    r = bench_size(name, args.batch, args.text_len, args.repeats)
    r |= bench_hf_blip2(name, args.batch, args.text_len, args.repeats)
    # On a shared machine the ceiling moves with the load: measure it again right after the
    # size and compare with the larger of the two (the conservative fraction).
    again = benchmarking.measure_matmul_ceiling(n=args.ceiling_n)
    ceiling = max(ceiling, again, key=lambda c: c["gflops"])
    r["ceiling_gflops"] = ceiling["gflops"]
    r["ceiling_fraction"] = r["gflops"] / ceiling["gflops"]
    rows.append(r)
    print(f"{name:8s} params {r['params'] / 1e6:6.1f}M  item_text {r['item_text_step_s']:.3f}s "
          f"({r['item_text_gflops']:.1f} GFLOP/s)  item_item {r['item_item_step_s']:.3f}s  "
          f"examples/s {r['examples_per_s']:.1f}  {r['gflops']:.1f} GFLOP/s = "
          f"{100 * r['ceiling_fraction']:.0f}% of ceiling  peak RSS {r['peak_rss_gib']:.2f} GiB"
          + (f"  HF BLIP-2 fwd+bwd {r['hf_fwd_bwd_s']:.3f}s" if "hf_fwd_bwd_s" in r
             else f"  (HF skipped: {r.get('hf_skipped', '')})"), flush=True)
  load_after = os.getloadavg()
  result = {"ceiling": ceiling, "load_before": load, "load_after": load_after,
            "devices": [str(d) for d in jax.devices()], "rows": rows}
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
