"""The ``pipeline`` job: runs every stage's job in order on one workdir.

Stages share the workdir, so each finds what the previous one left (prepared data,
``cf/embeddings.npz``, the Phase 1 checkpoint, ...), and every evaluation merges its
records into ``DIR/results.json``. At the end the whole results table is printed.
"""

from __future__ import annotations

import time

import ml_collections

from ilm_jax import jobs
from ilm_jax.evals import results


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  stages = [s for s in config.stages.split(",") if s]
  t0 = time.perf_counter()
  for i, stage in enumerate(stages, 1):
    sub = config[stage]
    if "data" in sub:
      with sub.unlocked():
        sub.data = config.data
    print(f"\n=== pipeline stage {i}/{len(stages)}: {stage} "
          f"({time.perf_counter() - t0:.0f}s elapsed) ===", flush=True)
    jobs.job_module(sub.job).run(sub, workdir)
  records = results.read_results(workdir)
  print(f"\n=== pipeline done in {time.perf_counter() - t0:.0f}s; results ({workdir}/results.json)"
        " ===")
  print(results.format_table(records))
