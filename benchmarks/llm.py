r"""SmolLM2-135M on CPU: prefill tokens/s, decode ms/token, peak memory, f32 matmul ceiling.

  python benchmarks/llm.py [--prompt_len 128] [--new_tokens 32] [--batches 1,8] [--out FILE]

Prefill = one jitted forward over B x T prompt tokens (KV cache written, logits only at
the last position, as ``generation`` does). Decode = the jitted while-loop of
``generation.generate`` (greedy, no early stop): (time for N+1 new tokens - time for 1)
/ N per step; a step yields B tokens. The ceiling is the GFLOP/s of a large float32
``jnp.dot`` on the same machine; "model GFLOP/s" counts 2 x matmul parameters per token
(+ attention) so the two can be compared. If torch + transformers are importable, the
same GGUF is timed there too and the ratios are printed; otherwise that part is skipped.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ilm_jax import benchmarking, generation, resources  # noqa: E402
from ilm_jax.models import llm_loading  # noqa: E402


def _best(fn, reps: int) -> float:
  """Minimum wall time of ``fn()`` over reps (after one warm-up call)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return min(times)


def matmul_ceiling(n: int = 2048, reps: int = 5) -> float:
  """GFLOP/s of an n x n x n float32 jnp.dot."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  return 2 * n**3 / _best(lambda: dot(a, b), reps) / 1e9


def flops_per_token(c, context: int) -> float:
  mm = c.dim * (c.heads + 2 * c.kv_heads) * c.head_dim + c.heads * c.head_dim * c.dim
  mm += 3 * c.dim * c.ffn
  per_layer = 2 * mm + 4 * c.heads * c.head_dim * context  # QK^T and PV
  return c.layers * per_layer + 2 * c.dim * c.vocab


def bench_jax(model, batches, prompt_len, new_tokens, reps):
  graphdef, state = nnx.split(model)
  c = model.config

  @jax.jit
  def prefill(state, tokens):
    m = nnx.merge(graphdef, state)
    logits, cache = generation._prefill(m, tokens, None, None, prompt_len + 1)
    return logits, cache.k[0]

  rows = []
  for b in batches:
    tokens = jax.random.randint(jax.random.key(b), (b, prompt_len), 3, c.vocab)
    t_pre = _best(lambda tokens=tokens: prefill(state, tokens), reps)

    def gen(n, tokens=tokens):
      return generation.generate(model, tokens=tokens, max_new_tokens=n, stop_ids=()).tokens

    t1 = _best(lambda gen=gen: gen(1), reps)
    tn = _best(lambda gen=gen: gen(new_tokens + 1), max(1, reps // 2))
    step = (tn - t1) / new_tokens
    ctx = prompt_len + new_tokens // 2
    rows.append({
        "batch": b, "prompt_len": prompt_len, "prefill_s": t_pre,
        "prefill_tok_s": b * prompt_len / t_pre,
        "prefill_gflop_s": b * prompt_len * flops_per_token(c, prompt_len // 2) / t_pre / 1e9,
        "decode_ms_per_step": 1e3 * step, "decode_ms_per_token": 1e3 * step / b,
        "decode_tok_s": b / step, "decode_gflop_s": b * flops_per_token(c, ctx) / step / 1e9,
    })
  return rows


_KW = dict(do_sample=False, eos_token_id=None, pad_token_id=0)


def bench_torch(path, batches, prompt_len, new_tokens, reps):
  """Same measurements with transformers (only if torch + transformers are importable)."""
  try:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count() or 1)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, torch_dtype=torch.float32).eval()
  rows = []
  with torch.no_grad():
    for b in batches:
      ids = torch.randint(3, model.config.vocab_size, (b, prompt_len))

      def timed(fn, n):
        fn()
        out = []
        for _ in range(n):
          t = time.perf_counter()
          fn()
          out.append(time.perf_counter() - t)
        return min(out)

      t_pre = timed(lambda ids=ids: model(ids, use_cache=True), reps)
      t1 = timed(lambda ids=ids: model.generate(ids, max_new_tokens=1, min_new_tokens=1, **_KW),
                 reps)
      tn = timed(lambda ids=ids: model.generate(ids, max_new_tokens=new_tokens + 1,
                                                min_new_tokens=new_tokens + 1, **_KW),
                 max(1, reps // 2))
      step = (tn - t1) / new_tokens
      rows.append({"batch": b, "prefill_tok_s": b * prompt_len / t_pre,
                   "decode_ms_per_token": 1e3 * step / b, "decode_tok_s": b / step})
  return rows


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", default="", help=".gguf or HF folder ('' = packaged SmolLM2)")
  p.add_argument("--prompt_len", type=int, default=128)
  p.add_argument("--new_tokens", type=int, default=32)
  p.add_argument("--batches", default="1,8")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--out", default="", help="also write the numbers as JSON")
  args = p.parse_args(argv)
  batches = [int(x) for x in args.batches.split(",")]

  t = time.perf_counter()
  path = args.model or str(resources.smollm2_gguf())
  model, _ = llm_loading.load(path)
  load_s = time.perf_counter() - t
  ceiling = matmul_ceiling()
  rows = bench_jax(model, batches, args.prompt_len, args.new_tokens, args.reps)
  import pathlib  # noqa: PLC0415
  torch_rows = bench_torch(pathlib.Path(path), batches, args.prompt_len, args.new_tokens,
                           args.reps) if path.endswith(".gguf") else None
  peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

  print(f"SmolLM2-135M f32 on {jax.devices()[0].device_kind} ({os.cpu_count()} cpus, "
        f"load avg {os.getloadavg()[0]:.1f}); load {load_s:.1f}s; "
        f"f32 matmul ceiling {ceiling:.1f} GFLOP/s; peak RSS {peak_rss_mb:.0f} MB")
  hdr = (f"{'batch':>5} {'prefill tok/s':>14} {'prefill GFLOP/s':>16} {'decode ms/tok':>14} "
         f"{'decode ms/step':>15} {'decode tok/s':>13} {'decode GFLOP/s':>15}")
  print(hdr)
  for r in rows:
    print(f"{r['batch']:>5} {r['prefill_tok_s']:>14.0f} {r['prefill_gflop_s']:>16.1f} "
          f"{r['decode_ms_per_token']:>14.2f} {r['decode_ms_per_step']:>15.2f} "
          f"{r['decode_tok_s']:>13.1f} {r['decode_gflop_s']:>15.1f}")
  if torch_rows is None:
    print("torch + transformers not importable: PyTorch comparison skipped")
  else:
    for r, tr in zip(rows, torch_rows, strict=True):
      print(f"torch batch {tr['batch']}: prefill {tr['prefill_tok_s']:.0f} tok/s "
            f"(jax/torch {r['prefill_tok_s'] / tr['prefill_tok_s']:.2f}x), decode "
            f"{tr['decode_tok_s']:.1f} tok/s (jax/torch {r['decode_tok_s'] / tr['decode_tok_s']:.2f}x)")
  benchmarking.write_json(args.out, {
      "model": path, "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(),
      "load_avg": os.getloadavg()[0], "load_s": load_s, "matmul_ceiling_gflop_s": ceiling,
      "peak_rss_mb": peak_rss_mb, "prompt_len": args.prompt_len,
      "new_tokens": args.new_tokens, "jax": rows, "torch": torch_rows})


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
