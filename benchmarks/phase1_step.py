r"""Phase 1 train-step throughput: examples/s, step time, FLOP/s vs the machine's matmul ceiling.

  .venv/bin/python benchmarks/phase1_step.py [--sizes=tiny,default,paper] [--batch=N]
      [--text_len=48] [--repeats=3] [--parts=step,encoder,hf] [--torch_python=PY] [--out=FILE]
      [--no-hugepages]

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

``encoder`` part: our Q-Former's joint pass (``[K queries ; text]``, cross-attention to one
memory token every 2nd layer) forward+backward into every parameter, no heads or optimizer.
``hf`` part: the same computation in Hugging Face transformers' ``Blip2QFormerModel``
(``benchmarks/phase1_step_torch.py``), run in a separate process with PyTorch — the current
python if it has torch, else ``--torch_python=PATH`` (a separate environment: torch is never a
dependency of ilm_jax) — after our timings, with the same thread count; otherwise the row
says why it was skipped. Both report examples/s = batch / (forward+backward seconds) and the
ratio ours/HF. The script re-executes itself with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``
(``HUGEPAGE_TUNABLE``; ``--no-hugepages`` runs as launched), which both sides inherit. To
compare at one thread each: ``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1" ... --hf_threads=1``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import subprocess
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
# glibc malloc asks the kernel for transparent huge pages on the memory it maps. XLA CPU maps
# a fresh temp buffer per call (0.44 GB at the default size, ~2 GB at paper) and first-touches
# it in 4 KiB pages (~140k minor faults, ~1.7 us each, per default-size joint pass: ~10% of
# its CPU time). With the tunable: ~15k faults. Read at process start only, hence the re-exec.
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"


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


def bench_encoder(name: str, batch: int, text_len: int, repeats: int) -> dict:
  """Our Q-Former's joint pass forward+backward: the computation HF BLIP-2 is timed on.

  ``[K queries ; text]`` through every layer (queries cross-attend to one memory token every
  2nd layer), loss = sum of the last hidden state float[B, K+L, H], gradients of every
  Q-Former parameter (word embeddings included). No heads, no optimizer: see
  ``benchmarks/phase1_step_torch.py`` for the matching HF module.
  """
  cfg = qformer_lib.QFormerConfig(vocab_size=tokenization.vocab_size(), cf_dim=CF_DIM,
                                  dec_token_id=tokenization.dec_token_id(), **SIZES[name])
  graphdef, params, rest = nnx.split(qformer_lib.QFormer(cfg, rngs=nnx.Rngs(0)), nnx.Param,
                                     ...)
  rng = np.random.default_rng(0)
  ids = rng.integers(1000, 29000, size=(batch, text_len)).astype(np.int32)
  memory = jnp.asarray(rng.normal(size=(batch, 1, cfg.hidden_size)).astype(np.float32))
  valid = jnp.ones((batch, text_len), bool)

  def loss(params, rest, memory, ids, valid):
    return nnx.merge(graphdef, params, rest).joint_pass(memory, ids, valid).sum()

  step = jax.jit(jax.value_and_grad(loss))
  compiled = step.lower(params, rest, memory, jnp.asarray(ids), valid).compile()
  flops = _flops(compiled)
  run = functools.partial(compiled, params, rest, memory, jnp.asarray(ids), valid)
  jax.block_until_ready(run())  # warm-up
  # CPU seconds (all threads) per call: the work done, whatever else shares the cores.
  cpu0 = time.process_time()
  seconds = benchmarking.time_fn(run, warmup=0, repeats=repeats)
  cpu = (time.process_time() - cpu0) / repeats
  return {"enc_fwd_bwd_s": seconds, "enc_examples_per_s": batch / seconds, "enc_cpu_s": cpu,
          "enc_gflop": flops / 1e9, "enc_gflops": flops / seconds / 1e9}


def bench_hf_blip2(name: str, batch: int, text_len: int, repeats: int,
                   torch_python: str, threads: list[int]) -> dict:
  """HF BLIP-2 Q-Former forward+backward (``phase1_step_torch.py``) in ``torch_python``.

  A separate process per thread count (PyTorch is never imported next to ilm_jax), run
  after our timings, never concurrently with them. The fastest thread count is reported
  (the conservative comparison: PyTorch's OpenMP pool slows down badly when the cores are
  shared with other jobs, XLA's pool much less); every count's result is kept under
  ``hf_by_threads``.
  """
  if not torch_python:
    if importlib.util.find_spec("torch") is None:
      return {"hf_skipped": "torch is not importable here and --torch_python is not set"}
    torch_python = sys.executable
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "phase1_step_torch.py")
  results = []
  for t in threads:
    cmd = [torch_python, script, f"--size={name}", f"--batch={batch}",
           f"--text_len={text_len}", f"--repeats={repeats}", f"--threads={t}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      return {"hf_skipped": f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}"}
    results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  best = min(results, key=lambda r: r["hf_fwd_bwd_s"])
  return best | {"hf_by_threads": {r["threads"]: r["hf_fwd_bwd_s"] for r in results}}


def _reexec_with_hugepages() -> None:
  """Restarts this script with ``HUGEPAGE_TUNABLE`` in ``GLIBC_TUNABLES`` (if not set yet).

  The HF subprocess inherits it too, so both sides run with the same allocator setting.
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if HUGEPAGE_TUNABLE.split("=")[0] in tunables or not sys.platform.startswith("linux"):
    return
  env = dict(os.environ, GLIBC_TUNABLES=":".join(t for t in (tunables, HUGEPAGE_TUNABLE) if t))
  sys.stdout.flush()
  os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--hugepages", action=argparse.BooleanOptionalAction, default=True,
                 help=f"run with GLIBC_TUNABLES={HUGEPAGE_TUNABLE} (re-executes this script "
                      "when it is not set; --no-hugepages: as launched)")
  p.add_argument("--sizes", default="tiny,default,paper")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--text_len", type=int, default=48)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--ceiling_n", type=int, default=2048)
  p.add_argument("--parts", default="step,encoder,hf",
                  help="step: the two train steps; encoder: our joint pass fwd+bwd; hf: HF "
                       "BLIP-2's (needs torch here or --torch_python)")
  p.add_argument("--torch_python", default="",
                 help="a python with torch + transformers for the hf part (not our venv)")
  p.add_argument("--hf_threads", default=str(os.cpu_count()),
                 help="comma-separated torch thread counts to try; the fastest is reported")
  p.add_argument("--rounds", type=int, default=1,
                 help="alternate the encoder and hf parts this often; keep each one's best")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  if args.hugepages and argv is None:
    _reexec_with_hugepages()
  parts = set(args.parts.split(","))

  load = os.getloadavg()
  ceiling = benchmarking.measure_matmul_ceiling(n=args.ceiling_n)
  print(f"devices {jax.devices()}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
        f"on {os.cpu_count()} cpus; matmul ceiling {ceiling['gflops']:.1f} GFLOP/s "
        f"(f32 {args.ceiling_n}^2); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}", flush=True)
  rows = []
  for name in args.sizes.split(","):
    r = {"size": name, "load_before": os.getloadavg()}
    if "step" in parts:
      r |= bench_size(name, args.batch, args.text_len, args.repeats)
    # encoder and hf alternate for --rounds rounds (each the median of --repeats calls); the
    # best round of each is kept: on a shared machine the minimum is the least disturbed.
    enc_rounds, hf_rounds = [], []
    for _ in range(args.rounds if "encoder" in parts else 0):
      enc_rounds.append(bench_encoder(name, args.batch, args.text_len, args.repeats))
      if "hf" in parts and args.rounds > 1:
        hf_rounds.append(bench_hf_blip2(name, args.batch, args.text_len, args.repeats,
                                        args.torch_python,
                                        [int(t) for t in args.hf_threads.split(",")]))
    if enc_rounds:
      r |= min(enc_rounds, key=lambda e: e["enc_fwd_bwd_s"])
      r["enc_rounds_s"] = [e["enc_fwd_bwd_s"] for e in enc_rounds]
    # On a shared machine the ceiling moves with the load: measure it again right after the
    # size and compare with the larger of the two (the conservative fraction).
    again = benchmarking.measure_matmul_ceiling(n=args.ceiling_n)
    ceiling = max(ceiling, again, key=lambda c: c["gflops"])
    r["ceiling_gflops"] = ceiling["gflops"]
    if "hf" in parts and not hf_rounds:  # after our timings, never concurrently with them
      hf_rounds.append(bench_hf_blip2(name, args.batch, args.text_len, args.repeats,
                                      args.torch_python,
                                      [int(t) for t in args.hf_threads.split(",")]))
    if hf_rounds:
      r |= min(hf_rounds, key=lambda h: h.get("hf_fwd_bwd_s", float("inf")))
      r["hf_rounds_s"] = [h.get("hf_fwd_bwd_s") for h in hf_rounds]
    r["load_after"] = os.getloadavg()
    rows.append(r)
    line = [f"{name:8s} load {r['load_before'][0]:.1f}->{r['load_after'][0]:.1f}"]
    if "step" in parts:
      r["ceiling_fraction"] = r["gflops"] / ceiling["gflops"]
      line.append(
          f"params {r['params'] / 1e6:.1f}M  item_text {r['item_text_step_s']:.3f}s "
          f"({r['item_text_gflops']:.1f} GFLOP/s)  item_item {r['item_item_step_s']:.3f}s  "
          f"examples/s {r['examples_per_s']:.1f}  {r['gflops']:.1f} GFLOP/s = "
          f"{100 * r['ceiling_fraction']:.0f}% of ceiling  peak RSS {r['peak_rss_gib']:.2f} GiB")
    if "encoder" in parts:
      r["enc_ceiling_fraction"] = r["enc_gflops"] / ceiling["gflops"]
      line.append(f"joint pass fwd+bwd: ours {r['enc_fwd_bwd_s']:.3f}s (cpu {r['enc_cpu_s']:.3f}s) "
                  f"= {r['enc_examples_per_s']:.1f} examples/s ({r['enc_gflops']:.1f} GFLOP/s "
                  f"= {100 * r['enc_ceiling_fraction']:.0f}% of ceiling)")
    if "hf_fwd_bwd_s" in r:
      line.append(f"HF BLIP-2 {r['hf_fwd_bwd_s']:.3f}s (cpu {r.get('hf_cpu_s', float('nan')):.3f}s) "
                  f"= {r['hf_examples_per_s']:.1f} examples/s "
                  f"({r['threads']} threads; by threads {r['hf_by_threads']})")
      if "enc_fwd_bwd_s" in r:
        r["speedup_vs_hf"] = r["hf_fwd_bwd_s"] / r["enc_fwd_bwd_s"]
        line.append(f"ours/HF throughput {r['speedup_vs_hf']:.2f}x")
    elif "hf" in parts:
      line.append(f"(HF skipped: {r.get('hf_skipped', '')})")
    print("  ".join(line), flush=True)
  benchmarking.write_json(args.out, {"xla_flags": os.environ.get("XLA_FLAGS", ""),
                                     "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                                     "ceiling": ceiling, "load_before": load, "rows": rows})
  return 0


if __name__ == "__main__":
  sys.exit(main())
