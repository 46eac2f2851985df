r"""Markdown table of Phase 1 results: mean ± standard error over runs (seeds) per group.

  .venv/bin/python benchmarks/phase1_table.py LABEL=GLOB [LABEL=GLOB ...] [--metrics=a,b]

Each GLOB matches Phase 1 workdirs (their results.json, task ``phase1``); the runs of one group
are averaged. The standard error is the sample standard deviation (ddof=1) over sqrt(n), so it
measures seed-to-seed spread only (not the finite held-out set's sampling error); n=1 shows the
single value. Runs that evaluated their init (``untrained_<metric>``) get a second row,
"LABEL, untrained init".
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys

DEFAULT_METRICS = ("cluster_p@10", "ii_recall@10", "i2t_recall@10", "t2i_recall@10",
                   "i2t_full_recall@10", "t2i_full_recall@10", "itg_loss_heldout")


def load_runs(pattern: str) -> list[dict]:
  """The phase1 records of every workdir matching ``pattern`` (sorted by path)."""
  runs = []
  for d in sorted(glob.glob(pattern)):
    path = os.path.join(d, "results.json")
    if not os.path.isfile(path):
      continue
    with open(path) as f:
      recs = [r for r in json.load(f) if r.get("task") == "phase1"]
    if len(recs) != 1:
      raise ValueError(f"{path}: expected one phase1 record, found {len(recs)}")
    runs.append(recs[0] | {"workdir": d})
  return runs


def mean_se(values: list[float]) -> tuple[float, float]:
  """Mean and standard error (ddof=1; nan for a single value)."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, float("nan")
  var = sum((v - mean) ** 2 for v in values) / (n - 1)
  return mean, math.sqrt(var / n)


def _cells(runs: list[dict], metrics: list[str], prefix: str = "") -> list[str]:
  """One table cell per metric: mean ± standard error of ``prefix + metric`` over runs."""
  cells = []
  for m in metrics:
    vals = [float(r[prefix + m]) for r in runs if prefix + m in r]
    if not vals:
      cells.append("–")
      continue
    mean, se = mean_se(vals)
    cells.append(f"{mean:.3f}" if math.isnan(se) else f"{mean:.3f} ± {se:.3f}")
  return cells


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("groups", nargs="+", help="LABEL=GLOB")
  p.add_argument("--metrics", default=",".join(DEFAULT_METRICS))
  args = p.parse_args(argv)
  metrics = args.metrics.split(",")
  print("| run | n | " + " | ".join(metrics) + " | train s |")
  print("|---" * (len(metrics) + 3) + "|")
  for group in args.groups:
    label, _, pattern = group.partition("=")
    runs = load_runs(pattern)
    if not runs:
      print(f"{label}: no finished runs match {pattern}", file=sys.stderr)
      continue
    secs = "/".join(f"{r['train_s']:.0f}" for r in runs)
    print(f"| {label} | {len(runs)} | " + " | ".join(_cells(runs, metrics)) + f" | {secs} |")
    if any(k.startswith("untrained_") for k in runs[0]):  # the init of the same runs
      print(f"| {label}, untrained init | {len(runs)} | "
            + " | ".join(_cells(runs, metrics, "untrained_")) + " | – |")
    for r in runs:
      print(f"  {label}: {r['workdir']}: " + ", ".join(
          f"{m} {r[m]:.4f}" for m in metrics if m in r), file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
