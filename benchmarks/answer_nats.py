r"""Is Phase 2 generation learning which item comes next? Nats per answer beside two references.

A Phase 2 run trained on item-id answers alone (the sequential task, every other task's
``--config.prompts.weights.<task>=0``) that makes less than one pass over its rows meets each
row once, so its training LM loss is a held-out measure. The loss is a mean per answer
token; times the batch's answer tokens over its rows, it reads in nats per answer, beside

  uniform     log(number of items): every valid id equally likely, what a model that learned
              the answer's format and the set of ids, but nothing about which item, scores;
  popularity  the entropy of the training targets' item frequencies (every position t >= 1
              of the train sequences: the sequential pool's targets), what a model that
              learned only how popular each item is scores on those targets.

A run below uniform has learned something about which items come next; one above it has
not yet learned the set of ids. Answers must all be item ids: the script refuses a run with
rows that have no item target (the conversational tasks).

  python benchmarks/answer_nats.py --run=W/phase2/ilm-it-ui --config=configs/eval.py:ml1m \
      [--set data_dir=D] [--windows=1,100,300,600,1000,1500,2000] [--out=FILE]

``--run`` is a phase2 job's output folder (``metrics.jsonl``, ``summary.json``); the dataset
is the eval config's, read as ``configs/eval.py`` does. The last window runs to the last step.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from ilm_jax import benchmarking, config_lib  # noqa: E402
from ilm_jax.evals import results  # noqa: E402
from ilm_jax.jobs import evaluate  # noqa: E402


def references(train: list[np.ndarray], num_items: int) -> dict[str, float]:
  """Nats per answer of the uniform and popularity references (module doc)."""
  targets = np.concatenate([np.asarray(s[1:], np.int64) for s in train])
  counts = np.bincount(targets, minlength=num_items).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return {"uniform": math.log(num_items), "popularity": float(-(p * np.log(p)).sum()),
          "targets": int(targets.size)}


def answer_windows(rows: list[dict], batch_size: int, bounds: list[int]) -> list[dict]:
  """Mean nats per answer and answer-token accuracy over steps [a, b) of each window.

  Raises:
    ValueError: no steps, no ``retrieval_rows`` logged, or a step had rows without an item
      target.
  """
  steps = [r for r in rows if r.get("kind") == "phase2"]
  if not steps:
    raise ValueError("no training steps in metrics.jsonl")
  if "retrieval_rows" not in steps[0]:
    raise ValueError("metrics.jsonl logs no retrieval_rows (a run with retrieval.weight=0), so "
                     "rows with an item target cannot be told from the others; train with the "
                     "retrieval loss on (detach=True leaves the LM loss alone to shape the encoder)")
  mixed = [r["step"] for r in steps if int(r["retrieval_rows"]) != batch_size]
  if mixed:
    raise ValueError(f"step {mixed[0]} (and {len(mixed) - 1} more) had rows without an item "
                     "target: train on item-id answers alone (--config.prompts.weights.<task>=0 "
                     "for every conversational task) for nats per answer to mean anything")
  last = steps[-1]["step"] + 1
  edges = sorted({b for b in bounds if b < last} | {last})
  out = []
  for a, b in zip(edges[:-1], edges[1:], strict=True):
    w = [r for r in steps if a <= r["step"] < b]
    if w:
      nats = [r["loss_lm"] * r["tokens"] / batch_size for r in w]
      out.append({"from": a, "to": b - 1, "steps": len(w), "nats": float(np.mean(nats)),
                  "acc": float(np.mean([r["acc"] for r in w])),
                  "tokens_per_answer": float(np.mean([r["tokens"] for r in w])) / batch_size})
  return out


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--run", required=True, help="a phase2 job's output folder (WORKDIR/phase2/M)")
  ap.add_argument("--config", default="configs/eval.py:ml1m", help="eval config naming the data")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="config override (repeatable), e.g. data_dir=D")
  ap.add_argument("--windows", default="1,100,300,600,1000,1500,2000",
                  help="comma-separated first steps of the windows")
  ap.add_argument("--out", default="", help="also write the table as JSON here")
  args = ap.parse_args(argv)
  run = pathlib.Path(args.run)
  for name in ("metrics.jsonl", "summary.json"):
    if not (run / name).is_file():
      sys.exit(f"answer_nats: {run / name} not found: --run must be a phase2 job's output folder")
  summary = json.loads((run / "summary.json").read_text())
  rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
  try:
    bounds = [int(x) for x in args.windows.split(",") if x.strip()]
    config = config_lib.load_config(args.config, args.set)
    windows = answer_windows(rows, int(summary["batch_size"]), bounds)
  except (config_lib.ConfigError, ValueError, KeyError) as e:
    sys.exit(f"answer_nats: {e}")
  ds, split = evaluate.eval_data(config, str(run.parent.parent))
  ref = references(split.train, ds.num_items)
  print(f"{'steps':>11s} {'nats/answer':>11s} {'token acc':>9s} {'tokens/answer':>13s}")
  for w in windows:
    print(f"{str(w['from']) + '-' + str(w['to']):>11s} {w['nats']:11.3f} {w['acc']:9.3f} "
          f"{w['tokens_per_answer']:13.1f}")
  print(f"references ({ds.name}, {ds.num_items} items, {ref['targets']} train targets): "
        f"uniform {ref['uniform']:.3f}, popularity {ref['popularity']:.3f} nats per answer")
  benchmarking.write_json(args.out, dict(run=str(run), dataset=ds.name, items=ds.num_items,
                                         references=ref, windows=windows,
                                         command=results.command_line()))


if __name__ == "__main__":
  main()
