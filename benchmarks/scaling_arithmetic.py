r"""Memory arithmetic for Phase 2 / evaluation with a frozen 1B-8B Llama LLM (docs/SCALING.md).

  .venv/bin/python benchmarks/scaling_arithmetic.py [--seq 256] [--answer 8] [--out FILE]

Pure arithmetic from the published model configs (no JAX, no devices): parameter counts,
per-chip bytes for FSDP-sharded frozen bf16 weights, Phase 2 activations with and without
per-block rematerialisation, the trainable Q-Former + projection with AdamW, the beam-search
KV cache, and the largest per-chip batch that fits each chip count. The formulas are in
docs/SCALING.md; every term is one function here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib

GB = 1e9  # decimal GB, as HBM sizes are quoted
# Fraction of HBM left for our buffers after the runtime, XLA's scratch and fragmentation.
USABLE = 0.9
# XLA's autodiff keeps more than the minimum below (e.g. f32 copies around norms and the
# softmax, SiLU(gate) next to gate): `--measure` compiles a small model's Phase 2 backward
# on CPU and finds 2.0x (float32) to 2.4x (bfloat16) the minimum; the tables use the larger
# factor on the block activations. Check a real configuration with
# `compiled.memory_analysis()` on the target chip.
XLA_FACTOR = 2.4
QFORMER_PARAMS = 31_841_215  # QFormer(QFormerConfig()) with K=8, counted with nnx.eval_shape
QFORMER_LAYERS, QFORMER_WIDTH, QUERIES = 6, 384, 8


@dataclasses.dataclass(frozen=True)
class Llm:
  """A Llama-family architecture (Hugging Face config.json field in brackets)."""

  name: str
  d: int        # hidden_size
  layers: int   # num_hidden_layers
  h: int        # num_attention_heads
  kv: int       # num_key_value_heads
  hd: int       # head_dim
  ffn: int      # intermediate_size
  vocab: int    # vocab_size
  tie: bool     # tie_word_embeddings

  def block_params(self) -> int:
    attn = self.d * self.h * self.hd * 2 + self.d * self.kv * self.hd * 2  # q, o + k, v
    return attn + 3 * self.d * self.ffn + 2 * self.d  # SwiGLU + two RMSNorm scales

  def params(self) -> int:
    emb = self.vocab * self.d
    return self.layers * self.block_params() + emb * (1 if self.tie else 2) + self.d


MODELS = (
    Llm("SmolLM2-135M (default)", 576, 30, 9, 3, 64, 1536, 49152, True),
    Llm("Llama-3.2-1B", 2048, 16, 32, 8, 64, 8192, 128256, True),
    Llm("Llama-3.2-3B", 3072, 28, 24, 8, 128, 8192, 128256, True),
    Llm("Llama-3.1-8B", 4096, 32, 32, 8, 128, 14336, 128256, False),
)
# (name, HBM bytes per chip, chip counts to tabulate)
HARDWARE = (
    ("TPU v5e", 16 * GB, (1, 4, 8, 16, 32)),
    ("TPU v5p", 95 * GB, (1, 4, 8, 16)),
    ("H100", 80 * GB, (1, 8, 16)),
)


def weights_per_chip(m: Llm, n: int) -> float:
  """Frozen bf16 weights, FSDP-sharded over n chips: 2P/n (no grads, no optimizer state)."""
  return 2 * m.params() / n


def gather_transient(m: Llm, n: int) -> float:
  """Weights all-gathered for compute: two blocks in flight + one full embedding/LM head."""
  if n == 1:
    return 0.0
  return 2 * (2 * m.block_params()) + 2 * m.vocab * m.d


def trainable_state(m: Llm) -> float:
  """Q-Former + projection (384 -> d, + bias) in fp32 with AdamW: params, grads, m, v."""
  return 16 * (QFORMER_PARAMS + QFORMER_WIDTH * m.d + m.d)


def act_per_token_layer(m: Llm) -> float:
  """Bytes saved per token per block for the backward pass (no remat, bf16, frozen weights).

  Frozen weights: a matmul's backward w.r.t. its input needs only the weight, so matmul
  inputs are not saved. Saved: both RMSNorm inputs (2d), q, k, v for attention (h+2kv)hd,
  the attention output h*hd, SwiGLU's gate and up (2F).
  """
  return 2 * (2 * m.d + (m.h + 2 * m.kv) * m.hd + m.h * m.hd + 2 * m.ffn)


def attn_probs_per_seq_layer(m: Llm, t: int) -> float:
  """Materialised attention probabilities (llm.py's einsum attention): f32 + bf16 copy."""
  return 6 * m.h * t * t


def qformer_act_per_seq(slots: int) -> float:
  """Q-Former over K queries per item/user slot, f32, ~17 H values per token per layer."""
  return slots * QUERIES * QFORMER_LAYERS * 17 * QFORMER_WIDTH * 4


def logits_per_seq(m: Llm, answer: int) -> float:
  """f32 logits + their gradient at the answer positions only."""
  return 2 * 4 * answer * m.vocab


def act_per_seq(m: Llm, t: int, answer: int, slots: int, remat: bool) -> float:
  """Activation bytes per training sequence of t tokens."""
  full_layer = XLA_FACTOR * (act_per_token_layer(m) * t + attn_probs_per_seq_layer(m, t))
  if remat:
    # Saved: each block's bf16 input; during backward one block's activations are live.
    kept = m.layers * 2 * m.d * t + full_layer
  else:
    kept = m.layers * full_layer
  return kept + qformer_act_per_seq(slots) + logits_per_seq(m, answer)


def kv_per_token(m: Llm) -> float:
  """bf16 K and V for every layer."""
  return 2 * 2 * m.layers * m.kv * m.hd


def max_batch(hbm: float, fixed: float, per_item: float) -> int:
  return max(0, math.floor((USABLE * hbm - fixed) / per_item))


def rows(t: int, answer: int, beams: int, target: int) -> dict:
  slots = 22  # configs/phase2.py max_slots: 20 history items, the user, one spare
  out = {"models": [], "train": [], "eval": []}
  for m in MODELS:
    out["models"].append({
        "model": m.name, "params": m.params(), "bf16_gb": 2 * m.params() / GB,
        "block_params": m.block_params(), "trainable_params": QFORMER_PARAMS + 384 * m.d + m.d,
        "adamw_gb": trainable_state(m) / GB,
        "act_token_layer_kb": act_per_token_layer(m) / 1e3,
        "act_seq_gb": act_per_seq(m, t, answer, slots, False) / GB,
        "act_seq_remat_gb": act_per_seq(m, t, answer, slots, True) / GB,
        "kv_token_kb": kv_per_token(m) / 1e3,
        "kv_user_mb": beams * (t + target) * kv_per_token(m) / 1e6})
    for hw, hbm, chips in HARDWARE:
      for n in chips:
        fixed = weights_per_chip(m, n) + gather_transient(m, n) + trainable_state(m)
        b = max_batch(hbm, fixed, act_per_seq(m, t, answer, slots, False))
        b_remat = max_batch(hbm, fixed, act_per_seq(m, t, answer, slots, True))
        out["train"].append({"model": m.name, "hw": hw, "chips": n,
                             "fixed_gb": fixed / GB, "batch": b, "batch_remat": b_remat})
        # Eval: weights sharded the same way; per user: beams x (prompt + target) KV, plus
        # the step's f32 logits for every beam.
        fixed_e = weights_per_chip(m, n) + gather_transient(m, n)
        per_user = beams * (t + target) * kv_per_token(m) + beams * m.vocab * 4
        out["eval"].append({"model": m.name, "hw": hw, "chips": n,
                            "users": max_batch(hbm, fixed_e, per_user)})
  return out


def measure(batch: int = 4, t: int = 256) -> None:
  """Compiles grad(loss w.r.t. input embeddings) of a small frozen Llm on this backend and
  compares XLA's temp memory per block with the minimum formula."""
  import sys  # noqa: PLC0415

  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415

  from ilm_jax.models import llm  # noqa: PLC0415

  print(f"backend {jax.default_backend()}, B={batch}, T={t}, d=512, h=8, kv=2, hd=64, F=1408")
  print("| dtype | temp bytes / block (measured) | minimum formula | ratio |\n|---|---|---|---|")
  for dt in ("float32", "bfloat16"):
    temps = []
    for layers in (2, 4):
      c = llm.LlmConfig(vocab=1000, dim=512, layers=layers, heads=8, kv_heads=2, head_dim=64,
                        ffn=1408, dtype=dt, param_dtype=dt)
      graphdef, params = nnx.split(nnx.eval_shape(lambda c=c: llm.Llm(c, rngs=nnx.Rngs(0))))

      def loss(emb, params, graphdef=graphdef):
        _, hidden, _ = nnx.merge(graphdef, params)(input_embeds=emb, compute_logits=False)
        return jnp.sum(hidden[:, -8:].astype(jnp.float32) ** 2)

      emb = jax.ShapeDtypeStruct((batch, t, 512), jnp.dtype(dt))
      compiled = jax.jit(jax.grad(loss)).lower(emb, params).compile()
      temps.append(compiled.memory_analysis().temp_size_in_bytes)
    per_block = (temps[1] - temps[0]) / 2
    m = Llm("probe", 512, 1, 8, 2, 64, 1408, 1000, True)
    elem = 2 if dt == "bfloat16" else 4
    minimum = (act_per_token_layer(m) / 2 * elem * batch * t
               + (attn_probs_per_seq_layer(m, t) if dt == "bfloat16" else 4 * 8 * t * t) * batch)
    print(f"| {dt} | {per_block / 1e6:.1f} MB | {minimum / 1e6:.1f} MB | "
          f"{per_block / minimum:.2f} |")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seq", type=int, default=320,
                 help="Phase 2 tokens per sequence (configs/phase2.py prompts.max_len)")
  p.add_argument("--answer", type=int, default=8, help="answer tokens per sequence")
  p.add_argument("--beams", type=int, default=10)
  p.add_argument("--out", default="")
  p.add_argument("--measure", action="store_true",
                 help="compile a small model's backward and compare with the formula")
  a = p.parse_args()
  if a.measure:
    measure()
    return
  r = rows(a.seq, a.answer, a.beams, a.answer)
  print(f"T={a.seq} tokens/sequence, {a.answer} answer tokens, beam {a.beams}, "
        f"{USABLE:.0%} of HBM usable\n")
  print("| model | params | bf16 weights | trainable (AdamW fp32) | act/token/layer | "
        "act/seq (no remat) | act/seq (remat) | KV/token | KV/user (beam) |")
  print("|---|---|---|---|---|---|---|---|---|")
  for x in r["models"]:
    print(f"| {x['model']} | {x['params'] / 1e9:.3f} B | {x['bf16_gb']:.2f} GB | "
          f"{x['trainable_params'] / 1e6:.1f} M = {x['adamw_gb']:.2f} GB | "
          f"{x['act_token_layer_kb']:.1f} KB | {x['act_seq_gb']:.3f} GB | "
          f"{x['act_seq_remat_gb']:.3f} GB | {x['kv_token_kb']:.1f} KB | "
          f"{x['kv_user_mb']:.0f} MB |")
  print("\nPer-chip Phase 2 batch (sequences) that fits: no remat / remat "
        "(0 = does not fit); fixed = weights/chip + gather transient + trainable state\n")
  for hw, _, chips in HARDWARE:
    print(f"| {hw} | " + " | ".join(f"{n} chip{'s' if n > 1 else ''}" for n in chips) + " |")
    print("|---|" + "---|" * len(chips))
    for m in MODELS:
      cells = [x for x in r["train"] if x["model"] == m.name and x["hw"] == hw]
      print(f"| {m.name} | " + " | ".join(
          f"{c['batch']} / {c['batch_remat']} ({c['fixed_gb']:.1f} GB)" for c in cells) + " |")
    print()
  print("Users per chip in one beam-search batch (eval, same sharding)\n")
  for hw, _, chips in HARDWARE:
    print(f"| {hw} | " + " | ".join(f"{n} chip{'s' if n > 1 else ''}" for n in chips) + " |")
    print("|---|" + "---|" * len(chips))
    for m in MODELS:
      cells = [x for x in r["eval"] if x["model"] == m.name and x["hw"] == hw]
      print(f"| {m.name} | " + " | ".join(str(c["users"]) for c in cells) + " |")
    print()
  if a.out:
    pathlib.Path(a.out).write_text(json.dumps({"args": vars(a), **r}, indent=2) + "\n")


if __name__ == "__main__":
  main()
