r"""Phase 2 throughput on CPU: training examples/s, evaluation users/s, peak memory.

  .venv/bin/python benchmarks/phase2.py [--llm=smollm2|tiny] [--encoder=qformer,mlp]
      [--batch=8] [--max_len=128] [--max_history=5] [--eval_batch=16] [--repeats=2]
      [--out=FILE]

For each encoder, on the generated catalogue (1000 items, 2000 users; prompts rendered as
the Phase 2 job renders them, ``--max_len`` / ``--max_history``):

  train     one jitted Phase 2 step (answer-token LM loss + retrieval head, gradients
            through the frozen LLM into the encoder, AdamW) on ``--batch`` examples of the
            training mixture -> examples/s
  beam      OpenP5 generation ranking (``evals.openp5.rank_generation``: prompt embeds +
            trie-constrained beam search, beam 10, history items disallowed) on
            ``--eval_batch`` users -> users/s
  retrieval the retrieval head (``evals.openp5.rank_retrieval``: one LLM pass, every item
            scored, history excluded) on the same users -> users/s, with the item side
            (every item through the encoder, ``retrieval_item_keys``) computed once per
            model and reported separately (``item_keys_s``)

Times are medians over ``--repeats`` after a warm-up call (compilation excluded; compile
seconds are reported separately). Peak memory is the process's peak RSS after the row
(it includes earlier rows). LLM: ``smollm2`` = SmolLM2-135M-Instruct (the default
Phase 2 LLM), ``tiny`` = a random 2-layer Llama with its tokenizer. The Q-Former is the
Phase 1 default shape (6 layers, 384 wide, K=4; random weights: shapes are what matter).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ilm_jax import benchmarking, optim, partition, phase2, steps  # noqa: E402
from ilm_jax.data import phase2 as data_phase2  # noqa: E402
from ilm_jax.data import sources, tokenization, types  # noqa: E402
from ilm_jax.evals import openp5  # noqa: E402
from ilm_jax.models import adaptors  # noqa: E402
from ilm_jax.models import ilm as ilm_lib  # noqa: E402
from ilm_jax.models import qformer as qformer_lib  # noqa: E402

CF_DIM, K = 64, 4
FROZEN = {"qformer": ("^llm/", ilm_lib.QFORMER_UNUSED), "mlp": ("^llm/",)}  # configs/phase2.py


def build(encoder: str, llm_model, ds) -> ilm_lib.ILM:
  rng = np.random.default_rng(0)
  items = rng.normal(size=(ds.num_items, CF_DIM)).astype(np.float32)
  users = rng.normal(size=(ds.num_users, CF_DIM)).astype(np.float32)
  d = llm_model.config.dim
  if encoder == "qformer":
    cfg = qformer_lib.QFormerConfig(
        vocab_size=tokenization.vocab_size(), hidden_size=384, num_layers=6, num_heads=12,
        intermediate_size=1536, num_query_tokens=K, cf_dim=CF_DIM, proj_dim=256,
        dec_token_id=tokenization.dec_token_id())
    enc = adaptors.QFormerAdaptor(qformer_lib.QFormer(cfg, rngs=nnx.Rngs(1)), d,
                                  rngs=nnx.Rngs(2))
  elif encoder == "mlp":
    enc = adaptors.MlpAdaptor(CF_DIM, 512, K, d, rngs=nnx.Rngs(2))
  else:
    raise SystemExit(f"--encoder {encoder!r}; valid: qformer, mlp")
  return ilm_lib.ILM(llm_model, enc, items, users, retrieval_dim=256, rngs=nnx.Rngs(3))


def bench_train(model, encoder: str, examples, batch: int, repeats: int) -> dict:
  graphdef, trainable, frozen = partition.split_trainable(model, FROZEN[encoder])
  tx, _ = optim.make_optimizer(optim.default_config(warmup_steps=1), 1000)
  opt_state = tx.init(trainable)
  b = {k: jnp.asarray(v[:batch]) for k, v in examples.items()
       if k in data_phase2.EXAMPLE_KEYS}
  loss = functools.partial(phase2.phase2_loss,
                           max_answer_tokens=phase2.max_answer_tokens(examples))
  step = jax.jit(steps.make_train_step(graphdef, loss, tx))
  key = jax.random.key(0)
  t0 = time.perf_counter()
  compiled = step.lower(trainable, frozen, opt_state, b, key).compile()
  compile_s = time.perf_counter() - t0
  s = benchmarking.time_fn(lambda: compiled(trainable, frozen, opt_state, b, key), warmup=1,
                           repeats=repeats)
  counts = partition.param_counts(trainable, frozen)
  return {"train_step_s": s, "train_examples_per_s": batch / s, "train_compile_s": compile_s,
          "trainable_params": counts["trainable"]}


def bench_eval(model, ds, split, encoder, users, eval_batch: int, repeats: int,
               max_history: int) -> dict:
  prompts = openp5.build_prompts(ds, split, "test", "sequential", "seen", encoder, users,
                                 max_history=max_history)
  trie = openp5.item_trie(ds, encoder)
  out = {"prompt_len": int(prompts.arrays["input_ids"].shape[1]), "trie_depth": trie.depth}
  keys = openp5.retrieval_item_keys(model)  # compiled here
  out["item_keys_s"] = benchmarking.time_fn(lambda: openp5.retrieval_item_keys(model),
                                            warmup=0, repeats=repeats)
  for name, fn in (
      ("beam", lambda: openp5.rank_generation(model, prompts, trie, batch_size=eval_batch)),
      ("retrieval", lambda: openp5.rank_retrieval(model, prompts, ds.num_items,
                                                  batch_size=eval_batch, item_keys=keys))):
    t0 = time.perf_counter()
    fn()
    out[f"{name}_first_call_s"] = time.perf_counter() - t0  # includes compilation
    s = benchmarking.time_fn(fn, warmup=0, repeats=repeats)
    out[f"{name}_users_per_s"] = len(users) / s
  return out


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--llm", default="smollm2", choices=("smollm2", "tiny"))
  p.add_argument("--encoder", default="qformer,mlp")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--max_len", type=int, default=128)
  p.add_argument("--max_history", type=int, default=5)
  p.add_argument("--eval_batch", type=int, default=16)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--out", default="")
  args = p.parse_args(argv)

  load = os.getloadavg()
  print(f"devices {jax.devices()}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on "
        f"{os.cpu_count()} cpus", flush=True)
  llm_model, tok = ilm_lib.load_llm(ml_collections.ConfigDict(dict(
      source="", tiny=args.llm == "tiny", dtype="float32", seed=0)))
  ds = sources.load_dataset(ml_collections.ConfigDict(dict(
      source="generated", min_core=5, generated=dict(seed=0, num_items=1000, num_users=2000,
                                                     num_clusters=40, min_len=8, max_len=40))))
  split = types.leave_one_out(ds)
  samples = data_phase2.train_samples(ds, split, seed=0, examples_per_user=1,
                                      max_history=args.max_history)
  users = openp5.eval_users(ds.num_users, args.eval_batch, seed=0)
  rows = []
  for encoder in args.encoder.split(","):
    model = build(encoder, llm_model, ds)
    enc = data_phase2.PromptEncoder(tok, ds, soft_tokens=model.num_soft_tokens,
                                    max_len=args.max_len, max_slots=args.max_history + 2)
    examples, _ = data_phase2.encode_examples(samples[:max(64, args.batch)], enc)
    r = {"llm": args.llm, "encoder": encoder, "batch": args.batch, "max_len": args.max_len,
         "eval_users": len(users), "beam_size": openp5.BEAM_SIZE}
    r |= bench_train(model, encoder, examples, args.batch, args.repeats)
    r |= bench_eval(model, ds, split, enc, users, args.eval_batch, args.repeats,
                    args.max_history)
    r["peak_rss_gib"] = benchmarking.peak_rss_bytes() / 2**30
    rows.append(r)
  head = ("encoder", "train ex/s", "step s", "beam users/s", "retrieval users/s",
          "item keys s", "prompt T", "compile s", "peak RSS GiB")
  print(f"\nPhase 2 on CPU, LLM {args.llm} ({llm_model.config.layers} layers x "
        f"{llm_model.config.dim}), batch {args.batch}, T={args.max_len}, beam 10 over "
        f"{ds.num_items} items")
  print(" | ".join(head))
  for r in rows:
    print(" | ".join([r["encoder"], f"{r['train_examples_per_s']:.2f}", f"{r['train_step_s']:.2f}",
                      f"{r['beam_users_per_s']:.2f}", f"{r['retrieval_users_per_s']:.2f}",
                      f"{r['item_keys_s']:.2f}",
                      str(r["prompt_len"]), f"{r['train_compile_s']:.0f}",
                      f"{r['peak_rss_gib']:.2f}"]))
  benchmarking.write_json(args.out, {"load_before": load, "rows": rows})
  return 0


if __name__ == "__main__":
  sys.exit(main())
