r"""HF transformers' BLIP-2 Q-Former forward+backward time (PyTorch; benchmark only).

  PYTHON_WITH_TORCH benchmarks/phase1_step_torch.py --size=default [--batch=32]
      [--text_len=48] [--repeats=3] [--threads=N]

Prints one JSON line. Never imported by ilm_jax: PyTorch is not a dependency. Run it in a
separate environment that has ``torch`` and ``transformers`` (benchmarks/phase1_step.py calls it
with ``--torch_python``).

The timed computation matches ``phase1_step.bench_encoder`` (our Q-Former's joint pass):
word + position embeddings of ``text_len`` tokens after K learned query tokens, the
``Blip2QFormerModel`` encoder (LayerNorm, self-attention over all K+L positions,
cross-attention of the K queries to one memory token every 2nd layer, query FFN for the
queries and text FFN for the text: ``use_qformer_text_input=True``, ``query_length=K``),
loss = sum of the last hidden state, backward into every parameter. float32, no dropout
(ours has none), the default attention implementation, ``torch.set_num_threads(threads)``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel

# Same shapes as phase1_step.SIZES (kept in sync by hand: this file cannot import ilm_jax,
# whose environment has no torch, and ilm_jax must not depend on torch).
SIZES = {
    "tiny": dict(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128,
                 num_query_tokens=4),
    "default": dict(num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536,
                    num_query_tokens=4),
    "paper": dict(num_layers=8, hidden_size=768, num_heads=12, intermediate_size=3072,
                  num_query_tokens=32),
}
VOCAB = 30522 + 1  # BERT uncased + [DEC], as ours


class HFQFormer(nn.Module):
  """Query tokens + BERT embeddings in front of HF's ``Blip2QFormerModel``."""

  def __init__(self, s: dict, max_len: int = 512):
    super().__init__()
    cfg = Blip2QFormerConfig(
        vocab_size=VOCAB, hidden_size=s["hidden_size"], num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_heads"], intermediate_size=s["intermediate_size"],
        encoder_hidden_size=s["hidden_size"], cross_attention_frequency=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        use_qformer_text_input=True)
    self.k = s["num_query_tokens"]
    self.query_tokens = nn.Parameter(0.02 * torch.randn(1, self.k, s["hidden_size"]))
    self.word = nn.Embedding(VOCAB, s["hidden_size"])
    self.pos = nn.Embedding(max_len, s["hidden_size"])
    self.encoder = Blip2QFormerModel(cfg)

  def forward(self, ids: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    b, length = ids.shape
    text = self.word(ids) + self.pos(torch.arange(length))[None]
    x = torch.cat([self.query_tokens.expand(b, -1, -1), text], dim=1)
    return self.encoder(query_embeds=x, query_length=self.k,
                        encoder_hidden_states=memory).last_hidden_state


def bench(size: str, batch: int, text_len: int, repeats: int, threads: int) -> dict:
  """Median seconds of one forward+backward of ``HFQFormer`` at ``size``."""
  torch.manual_seed(0)
  torch.set_num_threads(threads)
  s = SIZES[size]
  model = HFQFormer(s)
  model.train()
  ids = torch.randint(1000, 29000, (batch, text_len))
  memory = torch.randn(batch, 1, s["hidden_size"])

  def fwd_bwd():
    model.zero_grad(set_to_none=True)
    out = model(ids, memory)
    out.sum().backward()

  fwd_bwd()  # warm-up (allocator, oneDNN primitive cache)
  times, cpu = [], []
  for _ in range(repeats):
    c0, t0 = time.process_time(), time.perf_counter()
    fwd_bwd()
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)  # all threads; includes OpenMP spin-waiting
  seconds = float(np.median(times))
  return {"size": size, "batch": batch, "text_len": text_len, "threads": threads,
          "hf_params": sum(p.numel() for p in model.parameters()),
          "hf_fwd_bwd_s": seconds, "hf_examples_per_s": batch / seconds,
          "hf_cpu_s": float(np.mean(cpu)),
          "hf_times": times, "torch": torch.__version__,
          "attn_implementation": getattr(model.encoder.config, "_attn_implementation", "")}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="default", choices=sorted(SIZES))
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--text_len", type=int, default=48)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  args = p.parse_args(argv)
  print(json.dumps(bench(args.size, args.batch, args.text_len, args.repeats, args.threads)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
