r"""Hyper-parameter sweep for weighted-ALS MF on the **validation** split (never test).

  .venv/bin/python benchmarks/cf.py --dataset=beauty \
      --grid="reg=1,10,100 alpha=5,20,50 dim=64 iters=12" --eval_every=2 [--out=sweep.json]

Each grid point trains once; validation HR/NDCG (OpenP5 protocol) is read every
``eval_every`` iterations and the best iteration is reported. Prints a table sorted by
validation NDCG@10; ``--out`` writes the same rows as JSON. The chosen values go into
``configs/cf.py`` (``DATASET_DEFAULTS``).
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np

from ilm_jax import benchmarking, config_lib
from ilm_jax.cf import mf
from ilm_jax.data import sources, types
from ilm_jax.evals import ranking


def _parse_grid(text: str) -> dict[str, list]:
  grid = {}
  for part in text.split():
    key, _, values = part.partition("=")
    cast = int if key in ("dim", "iters", "seed") else float
    grid[key] = [cast(v) for v in values.split(",")]
  return grid


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dataset", default="generated", help="generated | ml1m | beauty | clothing")
  p.add_argument("--grid", default="reg=1,10 alpha=5,20 dim=64 iters=10")
  p.add_argument("--eval_every", type=int, default=2)
  p.add_argument("--out", default="")
  args = p.parse_args()

  data = (config_lib.data_config("generated") if args.dataset == "generated"
          else config_lib.data_config("openp5", name=args.dataset))
  ds = sources.load_dataset(data)
  split = types.leave_one_out(ds)
  print(f"{ds.name}: {ds.stats()}")

  def valid_fn(x, y):
    return ranking.evaluate_scores(mf.score_fn(x, y), split, "valid", ds.num_items)

  grid = _parse_grid(args.grid)
  rows = []
  for values in itertools.product(*grid.values()):
    point = dict(zip(grid, values, strict=True))
    cfg = mf.ALSConfig.from_mapping(dict(point, eval_every=args.eval_every))
    t0 = time.perf_counter()
    res = mf.train_als(split.train, ds.num_items, cfg, valid_fn=valid_fn, progress=lambda _: None)
    evals = [e for e in res.log if "valid_ndcg@10" in e]
    best = max(evals, key=lambda e: e["valid_ndcg@10"])
    row = dict(point, best_iter=best["iter"], train_s=round(res.train_seconds, 2),
               wall_s=round(time.perf_counter() - t0, 2),
               **{k.removeprefix("valid_"): round(v, 5) for k, v in best.items()
                  if k.startswith("valid_") and not k.endswith("_se")})
    rows.append(row)
    print(row, flush=True)

  rows.sort(key=lambda r: -r["ndcg@10"])
  cols = list(rows[0])
  print("\nvalidation split, sorted by ndcg@10")
  print("  ".join(f"{c:>9}" for c in cols))
  for r in rows:
    print("  ".join(f"{r[c]:>9.4g}" if isinstance(r[c], float | np.floating) else f"{r[c]:>9}"
                    for c in cols))
  benchmarking.write_json(args.out, {"dataset": ds.name, "split": "valid", "rows": rows})


if __name__ == "__main__":
  main()
