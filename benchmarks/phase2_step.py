r"""Phase 2 train-step throughput: frozen LLM fwd+bwd into the soft tokens, on this host.

  .venv/bin/python benchmarks/phase2_step.py [--batch 8] [--len 128[,T2,...]] [--steps 3] [--tiny]

Builds the ILM on the packaged SmolLM2-135M-Instruct (``--tiny``: the random test Llama)
with a Q-Former of the default Phase 1 shape (random weights; the query-only pass is
cheap next to the LLM), random CF tables, and a synthetic batch shaped like the
``:generated`` prompts (B x T tokens, 6 item slots of K=4 soft tokens -- fewer where T is
too short -- and 16 answer tokens per row), retrieval loss over ``--candidates``. Prints
compile time, seconds per step, padded tokens/s, examples/s, process CPU seconds per step
(on a shared, loaded host the wall time overstates the cost; CPU seconds / cores is the
unloaded estimate), peak RSS. Several ``--len`` values give one row each (the Phase 2 job's
length-grouped batches run at multiples of ``config.batching.pad_multiple``; a row per
length prices that mix). ``--dtype bfloat16`` runs the frozen LLM in bfloat16.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ilm_jax import optim, partition, phase2, steps
from ilm_jax.models import adaptors, qformer
from ilm_jax.models import ilm as ilm_lib


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--len", default="128", help="T, or comma-separated T values (a row each)")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--items", type=int, default=1000)
  p.add_argument("--answer", type=int, default=16)
  p.add_argument("--candidates", default="batch", choices=phase2.CANDIDATES)
  p.add_argument("--negatives", type=int, default=120)
  p.add_argument("--tiny", action="store_true")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="the frozen LLM's compute dtype (config.llm.dtype)")
  a = p.parse_args()

  t0 = time.perf_counter()
  llm_model, _ = ilm_lib.load_llm(ml_collections.ConfigDict(
      dict(source="", tiny=a.tiny, dtype=a.dtype, seed=0)))
  load_s = time.perf_counter() - t0
  k = 4
  qcfg = qformer.QFormerConfig(num_query_tokens=k, cf_dim=64)
  enc = adaptors.QFormerAdaptor(qformer.QFormer(qcfg, rngs=nnx.Rngs(0)), llm_model.config.dim,
                                rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  model = ilm_lib.ILM(llm_model, enc, rng.normal(size=(a.items, 64)).astype(np.float32),
                      rng.normal(size=(2000, 64)).astype(np.float32), rngs=nnx.Rngs(2))
  frozen = ("^llm/", ilm_lib.QFORMER_UNUSED)
  graphdef, trainable, rest = partition.split_trainable(model, frozen)
  counts = partition.param_counts(trainable, rest)

  tx, _ = optim.make_optimizer(optim.default_config(warmup_steps=1), 100)
  loss_fn = functools.partial(phase2.phase2_loss, max_answer_tokens=a.answer,
                              candidates=a.candidates, num_negatives=a.negatives)
  step = jax.jit(steps.make_train_step(graphdef, loss_fn, tx), donate_argnums=(0, 2))
  print("| LLM | dtype | B x T | load s | compile+1st step s | s/step | tokens/s | examples/s | "
        "CPU s/step | trainable | frozen | peak RSS GB | load avg |")
  print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  for t in (int(x) for x in a.len.split(",")):
    batch = _batch(rng, a, t, k, llm_model.config.vocab)
    opt_state = tx.init(trainable)
    t0 = time.perf_counter()
    trainable, opt_state, m = step(trainable, rest, opt_state, batch, jax.random.key(0))
    jax.block_until_ready(m)
    first_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(a.steps):
      trainable, opt_state, m = step(trainable, rest, opt_state, batch, jax.random.key(i))
    jax.block_until_ready(m)
    per_step = (time.perf_counter() - t0) / a.steps
    cpu_step = (time.process_time() - c0) / a.steps
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"| {'tiny' if a.tiny else 'SmolLM2-135M'} | {a.dtype} | {a.batch} x {t} | "
          f"{load_s:.1f} | {first_s:.1f} | {per_step:.2f} | {a.batch * t / per_step:.0f} | "
          f"{a.batch / per_step:.2f} | {cpu_step:.2f} | {counts['trainable']:,} | "
          f"{counts['frozen']:,} | {rss_gb:.2f} | {os.getloadavg()[0]:.1f} |", flush=True)
  print(f"loss {float(m['loss']):.3f}; retrieval candidates {a.candidates} "
        f"(+{a.negatives} sampled); devices {jax.devices()}")


def _batch(rng: np.random.Generator, a: argparse.Namespace, t: int, k: int, vocab: int
           ) -> dict[str, jax.Array]:
  """A [batch, t] batch: up to 6 item slots of k soft tokens (as many as fit before the
  ``a.answer`` answer tokens that end each row)."""
  b, s = a.batch, 6
  used = min(s, (t - 8 - a.answer) // (k + 3))
  if used < 1:
    raise SystemExit(f"--len {t} is too short for one slot of {k} tokens and --answer "
                     f"{a.answer}; use at least {8 + k + 3 + a.answer}")
  ids = rng.integers(10, vocab, size=(b, t)).astype(np.int32)
  slot_pos = np.where(np.arange(s) < used, 8 + (k + 3) * np.arange(s), -1)
  loss_mask = np.zeros((b, t), bool)
  loss_mask[:, t - a.answer:] = True
  batch = {"input_ids": ids, "attn_mask": np.ones((b, t), bool), "loss_mask": loss_mask,
           "slot_ids": rng.integers(0, a.items, size=(b, s)).astype(np.int32),
           "slot_kind": np.tile(np.where(np.arange(s) < used, 0, -1), (b, 1)).astype(np.int32),
           "slot_pos": np.tile(slot_pos, (b, 1)).astype(np.int32),
           "target_item": rng.integers(0, a.items, size=b).astype(np.int32),
           "task": np.zeros(b, np.int32)}
  return jax.tree.map(jnp.asarray, batch)


if __name__ == "__main__":
  main()
