r"""Has a Phase 2 model's generation learned anything? Exact ranks among sampled candidates.

The OpenP5 protocol (beam 10 over every item) reads 0 until the target's id reaches the top
10 beams, so it cannot tell a model that is learning from one that is not. This ranks each
evaluated user's target among C candidates (the target + C - 1 seeded random items outside
the history, ``evals.openp5.sample_candidates``) by

  generation  the exact log-prob of each candidate's "{dataset} item_{id}" + end id (one
              trie-constrained beam search with a beam of C over the C candidates: nothing
              is pruned; ``evals.openp5.rank_candidates``)
  retrieval   the retrieval head's scores

and prints HR@1/5/10 and the mean rank (± std errors) beside chance (k / C and (C + 1) / 2)
and beside a reference row, 'popularity', that ranks the same candidates by their items'
training interactions (what knowing only how popular each item is gives). A
diagnostic: sampled-candidate numbers are not comparable with the full-ranking ones in
docs/RESULTS.md.

  python benchmarks/generation_probe.py --workdir=W \
      [--config=configs/eval.py:generated,sequential,seen] [--set max_users=200 ...] \
      [--candidates=100] [--batch=4] [--out=FILE]

The models, users, prompts, tasks and templates are the eval job's (``--config`` and
``--set KEY=VALUE``, as ``--config.KEY=VALUE``), read from W as ``configs/eval.py`` does.
Cost: a generation call keeps ``--batch`` x C beams with the prompt's KV cache; with
SmolLM2-135M and C = 100, about 3.5 s per user on two CPU cores.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ilm_jax import benchmarking, config_lib  # noqa: E402
from ilm_jax.cf import mf  # noqa: E402
from ilm_jax.data import prompts as P  # noqa: E402
from ilm_jax.evals import openp5, ranking, results  # noqa: E402
from ilm_jax.jobs import evaluate  # noqa: E402

KS = (1, 5, 10)


def probe(config_arg: str, workdir: str, overrides=(), candidates: int = 100,
          batch_size: int = 4, log=print) -> list[dict]:
  """One row per (method, task, template, scorer): HR@k, mean rank, chance."""
  config = config_lib.load_config(config_arg, overrides)
  ds, split = evaluate.eval_data(config, workdir)
  choice = evaluate.csv_choices
  tasks = choice(config.tasks, P.OPENP5_TASKS, "tasks")
  templates = choice(config.templates, ("seen", "unseen"), "templates")
  scorers = choice(config.scorers, openp5.SCORERS, "scorers")
  models = evaluate.trained_models(workdir, choice(config.methods, results.METHODS, "methods"))
  if not models:
    raise FileNotFoundError(f"no trained Phase 2 model under {workdir}/phase2")
  users = openp5.eval_users(ds.num_users, int(config.max_users), int(config.seed))
  llms = evaluate.Llms()
  rows, referenced = [], set()
  for method, folder in models.items():
    model, encoder = evaluate.load_model(folder, ds, llms, config.prompts)
    trie = openp5.item_trie(ds, encoder)
    keys = openp5.retrieval_item_keys(model)
    for task in tasks:
      for template in templates:
        prompts = openp5.build_prompts(ds, split, config.split, task, template, encoder, users,
                                       max_history=int(config.prompts.max_history))
        cands = openp5.sample_candidates(prompts, ds.num_items, candidates, int(config.seed))
        if (task, template) not in referenced:  # the same users and candidates for every model
          referenced.add((task, template))
          rows.append(_row("popularity", task, template, "train counts", candidates,
                           popularity_ranks(split.train, prompts, cands), 0.0))
        for scorer in scorers:
          progress = openp5.Progress(len(users), f"probe {method} {task}/{template} {scorer}",
                                     out=log)
          ranks = openp5.rank_candidates(model, prompts, cands, scorer=scorer, trie=trie,
                                         item_keys=keys, batch_size=batch_size,
                                         progress=progress)
          rows.append(_row(method, task, template, scorer, candidates, ranks,
                           progress.seconds))
  return rows


def popularity_ranks(train, prompts, candidates: np.ndarray) -> np.ndarray:
  """The targets' ranks among the same candidates by their items' training counts (ties
  against the target, as ``rank_candidates``): what knowing only popularity gives."""
  score = mf.popularity_score_fn(train, candidates.shape[1])
  exclude = ~candidates | ranking.history_mask(prompts.histories, candidates.shape[1])
  scores = score(jnp.arange(len(prompts.targets), dtype=jnp.int32))
  ranks, _ = ranking.ranks_from_scores(scores, jnp.asarray(prompts.targets), jnp.asarray(exclude))
  return np.asarray(ranks)


def _row(method: str, task: str, template: str, scorer: str, candidates: int,
         ranks: np.ndarray, seconds: float) -> dict:
  """HR@k (± std error), mean rank and their chance values over the ranked users."""
  ranked = ranks[ranks > 0]
  row = dict(method=method, task=task, template=template, scorer=scorer,
             users=int(len(ranked)), candidates=candidates, mean_rank=float(ranked.mean()),
             mean_rank_se=float(ranked.std(ddof=1) / np.sqrt(len(ranked))) if len(ranked) > 1
             else 0.0, chance_mean_rank=(candidates + 1) / 2, seconds=round(seconds, 1))
  for k in KS:
    hit = (ranked <= k).astype(np.float64)
    row[f"hr@{k}"] = float(hit.mean())
    row[f"hr@{k}_se"] = float(hit.std(ddof=1) / np.sqrt(len(hit))) if len(hit) > 1 else 0.0
    row[f"chance_hr@{k}"] = k / candidates
  return row


def format_rows(rows: list[dict]) -> str:
  head = (f"{'method':12s} {'task/template':24s} {'scorer':12s} {'users':>5s} "
          + " ".join(f"{'HR@' + str(k):>13s}" for k in KS) + f" {'mean rank':>11s} {'chance':>6s}")
  lines = [head]
  for r in rows:
    hrs = " ".join(f"{r[f'hr@{k}']:6.3f}±{r[f'hr@{k}_se']:.3f}" for k in KS)
    lines.append(f"{r['method']:12s} {r['task'] + '/' + r['template']:24s} {r['scorer']:12s} "
                 f"{r['users']:5d} {hrs} {r['mean_rank']:5.1f}±{r['mean_rank_se']:<4.1f} "
                 f"{r['chance_mean_rank']:6.1f}")
  c = rows[0]["candidates"] if rows else 0
  lines.append(f"chance with {c} candidates: " + ", ".join(
      f"HR@{k} {k / max(c, 1):.3f}" for k in KS))
  return "\n".join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="folder with phase2/<method> models")
  parser.add_argument("--config",
                      default=f"{REPO / 'configs' / 'eval.py'}:generated,sequential,seen")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="eval config override, e.g. max_users=200 (repeatable)")
  parser.add_argument("--candidates", type=int, default=100, help="C, the target included")
  parser.add_argument("--batch", type=int, default=4, help="users per call")
  parser.add_argument("--out", default="", help="write the rows here (JSON)")
  args = parser.parse_args()
  if args.candidates < 2:
    parser.error("--candidates must be at least 2")
  t0 = time.perf_counter()
  try:
    rows = probe(args.config, args.workdir, args.set, args.candidates, args.batch)
  except (config_lib.ConfigError, FileNotFoundError, ValueError) as e:
    raise SystemExit(f"generation_probe: {e}") from None
  print(format_rows(rows))
  benchmarking.write_json(args.out, dict(rows=rows, workdir=args.workdir, config=args.config,
                                         overrides=args.set, seconds=time.perf_counter() - t0,
                                         command=results.command_line()))
  return 0


if __name__ == "__main__":
  sys.exit(main())
