r"""Can a Phase 2 model learn to *generate* item ids at all? A memorisation check.

Trains a Phase 2 model (``--config``, as the phase2 job builds it) on only the first
``--examples`` sequential training examples (one per user, the job's sampling) for ``--steps``
steps -- many passes over them -- and measures, on those same training prompts, before and
after: each target's rank among ``--candidates`` candidates (the target + seeded random items
outside the prompt's history) by its exact generation log-prob and by the retrieval head
(``evals.openp5.rank_candidates``), and beam-10 HR@1/10 over every item (the OpenP5
protocol's scorer). Deliberately on training data: it asks whether the soft tokens can steer
the frozen LLM to spell a given id when generalisation is not needed, not how well the model
recommends.

  python benchmarks/phase2_memorise.py --workdir=/tmp/mem \
      --config=configs/phase2.py:ilm --set phase1_dir=R --set cf_path=R/cf/embeddings.npz \
      --set data_dir=R/data/generated [--examples=64] [--steps=200] \
      [--set train.optimizer.lr=3e-4] [--set retrieval.weight=0] [--candidates=100] [--out=FILE]

Prints a table (step 0 and the last step) and the training metrics averaged over the last 20
steps (LM loss per answer token, answer-token accuracy, retrieval accuracy). Training writes
``WORKDIR/checkpoints`` and ``metrics.jsonl``; use a fresh WORKDIR (a non-empty one resumes).
Cost on two CPU cores with SmolLM2-135M, 64 examples, C = 100: ~4 s per train step and
~4.5 minutes per measurement.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from ilm_jax import benchmarking, config_lib, partition, train  # noqa: E402
from ilm_jax.data import phase2 as data_phase2  # noqa: E402
from ilm_jax.data import pipeline  # noqa: E402
from ilm_jax.data import prompts as P  # noqa: E402
from ilm_jax.evals import openp5, results  # noqa: E402
from ilm_jax.jobs import evaluate  # noqa: E402
from ilm_jax.jobs import phase2 as phase2_job  # noqa: E402
from ilm_jax.models import ilm as ilm_lib  # noqa: E402

KS = (1, 10)


def _history(sample: P.Sample) -> np.ndarray:
  """The items of a sample's History parts (candidates avoid them; a prompt cut to fit T
  may show fewer)."""
  items = [i for turn in sample.turns for part in turn.content if isinstance(part, P.History)
           for i in part.items]
  return np.asarray(items, np.int64)


def training_prompts(config, ds, split, encoder, n: int
                     ) -> tuple[dict[str, np.ndarray], openp5.Prompts]:
  """The first ``n`` sequential training examples (one per user, the job's sampling) and the
  same rows cut before their answers, as eval prompts: exactly the tokens trained on."""
  pc = config.prompts
  samples = data_phase2.openp5_train_samples(
      ds, split, "sequential", seed=int(pc.seed), examples_per_user=1,
      max_history=int(pc.max_history), user_soft_tokens=bool(pc.user_soft_tokens))[:n]
  if len(samples) < n:
    raise ValueError(f"--examples={n}: the dataset has only {len(samples)} sequential samples")
  ex, dropped = data_phase2.encode_examples(samples, encoder)
  if dropped:
    raise ValueError(f"{dropped} of the {n} examples do not fit max_len={encoder.max_len}; "
                     "raise --set prompts.max_len")
  lens = np.argmax(ex["loss_mask"], axis=1).astype(np.int32)  # the answer's first position
  before = np.arange(ex["input_ids"].shape[1])[None, :] < lens[:, None]
  arrays = {k: ex[k] for k in ("slot_ids", "slot_kind", "slot_pos")}
  arrays.update(input_ids=np.where(before, ex["input_ids"], encoder.pad_id).astype(np.int32),
                attn_mask=ex["attn_mask"] & before, prompt_len=lens)
  arrays = data_phase2.cut_padding(arrays, lens)
  return ex, openp5.Prompts(
      arrays=arrays, users=np.array([s.user for s in samples]),
      targets=np.asarray(ex["target_item"], np.int32),
      histories=[_history(s) for s in samples])


def measure(model, prompts: openp5.Prompts, cands: np.ndarray, trie, batch_size: int) -> dict:
  """HR@k and mean rank among the candidates (generation, retrieval) + beam-10 HR@k.

  Every number is over the same rows: those whose target is not in the prompt's history
  (the others are NOT_RANKED by every scorer); ``rows`` says how many.
  """
  # The target is NOT_RANKED exactly when it is in the history, whichever the scorer.
  rankable = np.array([t not in h for t, h in zip(prompts.targets, prompts.histories,
                                                   strict=True)])
  out = dict(rows=int(rankable.sum()))
  keys = openp5.retrieval_item_keys(model)
  for scorer in openp5.SCORERS:
    ranks = openp5.rank_candidates(model, prompts, cands, scorer=scorer, trie=trie,
                                   item_keys=keys, batch_size=batch_size)[rankable]
    out[f"{scorer}_mean_rank"] = float(ranks.mean())
    for k in KS:
      out[f"{scorer}_hr@{k}"] = float((ranks <= k).mean())
  ranks, _ = openp5.rank_generation(model, prompts, trie, batch_size=batch_size)
  ranks = ranks[rankable]
  for k in KS:
    out[f"beam10_hr@{k}"] = float(((ranks >= 1) & (ranks <= k)).mean())
  return out


def memorise(config_arg: str, workdir: str, overrides=(), examples: int = 64, steps: int = 200,
             candidates: int = 100, batch_size: int = 4, log=print) -> dict:
  """{'rows': [step 0, step N], 'train': last-20-step means, ...}."""
  config = config_lib.load_config(config_arg, overrides)
  config.train.update(dict(total_steps=steps, checkpoint_every=0, eval_every=0))
  if examples < int(config.batch_size):
    raise ValueError(f"--examples={examples} cannot fill one batch of {config.batch_size} "
                     "(--set batch_size=...)")
  ds, split = evaluate.eval_data(config, workdir)
  llm_model, tok = ilm_lib.load_llm(config.llm)
  model = ilm_lib.build_ilm(config, workdir, ds, llm_model)
  encoder = phase2_job.prompt_encoder(config, tok, ds, model)
  ex, prompts = training_prompts(config, ds, split, encoder, examples)
  cands = openp5.sample_candidates(prompts, ds.num_items, candidates, seed=0)
  trie = openp5.item_trie(ds, encoder)
  t0 = time.perf_counter()
  rows = [dict(step=0, **measure(model, prompts, cands, trie, batch_size))]
  log(f"memorise: step 0 measured in {time.perf_counter() - t0:.0f}s: {rows[0]}")
  data = pipeline.to_iterator(data_phase2.phase2_dataset(
      ex, global_batch=int(config.batch_size), seed=int(config.prompts.seed)))
  t0 = time.perf_counter()
  result = train.train(config.train, workdir, model_fn=lambda: model,
                       losses={"phase2": phase2_job.training_loss(config, ex)}, data=data,
                       mesh=partition.make_mesh())
  train_s = time.perf_counter() - t0
  rows.append(dict(step=int(result.step), **measure(result.model(), prompts, cands, trie,
                                                    batch_size)))
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  metrics = [m for m in map(json.loads, lines) if "loss_lm" in m]
  last = [m for m in metrics if m["step"] > int(result.step) - 20]
  tail = {k: float(np.mean([m[k] for m in last if k in m]))
          for k in ("loss_lm", "acc", "retrieval_acc") if any(k in m for m in last)}
  return dict(rows=rows, train=tail, train_s=round(train_s, 1), examples=examples,
              candidates=candidates, steps=int(result.step),
              lr=float(config.train.optimizer.lr), retrieval_weight=float(config.retrieval.weight))


def format_result(r: dict) -> str:
  c = r["candidates"]
  head = (f"{'step':>5s} | among {c}: generation HR@1 HR@10 mean rank | retrieval HR@1 HR@10 "
          f"mean rank | beam-10 over all items HR@1 HR@10")
  lines = [head]
  for row in r["rows"]:
    lines.append(
        f"{row['step']:5d} | {row['generation_hr@1']:.3f} {row['generation_hr@10']:.3f} "
        f"{row['generation_mean_rank']:6.1f} | {row['retrieval_hr@1']:.3f} "
        f"{row['retrieval_hr@10']:.3f} {row['retrieval_mean_rank']:6.1f} | "
        f"{row['beam10_hr@1']:.3f} {row['beam10_hr@10']:.3f}")
  lines.append(f"chance among {c}: HR@1 {1 / c:.3f}, HR@10 {min(1.0, 10 / c):.3f}, mean rank "
               f"{(c + 1) / 2:.1f}; over the {r['rows'][-1]['rows']} rows whose target is not "
               "in the prompt's history")
  t = r["train"]
  lines.append(f"{r['examples']} examples, {r['steps']} steps ({r['train_s']:.0f}s), lr "
               f"{r['lr']:g}, retrieval weight {r['retrieval_weight']:g}; last 20 steps: " +
               ", ".join(f"{k} {v:.3f}" for k, v in t.items()))
  return "\n".join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="training output (use a fresh folder)")
  parser.add_argument("--config", default=f"{REPO / 'configs' / 'phase2.py'}:ilm")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="phase2 config override, e.g. phase1_dir=R (repeatable)")
  parser.add_argument("--examples", type=int, default=64)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--candidates", type=int, default=100, help="C, the target included")
  parser.add_argument("--batch", type=int, default=4, help="prompts per measuring call")
  parser.add_argument("--out", default="", help="write the result here (JSON)")
  args = parser.parse_args()
  if args.examples < 1 or args.steps < 1 or args.candidates < 2:
    parser.error("--examples and --steps must be >= 1, --candidates >= 2")
  try:
    r = memorise(args.config, args.workdir, args.set, args.examples, args.steps,
                 args.candidates, args.batch)
  except (config_lib.ConfigError, FileNotFoundError, ValueError) as e:
    raise SystemExit(f"phase2_memorise: {e}") from None
  print(format_result(r))
  benchmarking.write_json(args.out, dict(r, config=args.config, overrides=args.set,
                                         command=results.command_line()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
