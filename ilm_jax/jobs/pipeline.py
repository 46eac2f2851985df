"""The ``pipeline`` job: runs every stage's job in order on one workdir.

Stages share the workdir, so each finds what the previous one left (prepared data,
``cf/embeddings.npz``, the Phase 1 checkpoint, ...), and every evaluation merges its
records into ``DIR/results.json``. At the end the whole results table is printed.
"""

from __future__ import annotations

import time

import ml_collections

from ilm_jax import config_lib, jobs
from ilm_jax.evals import results

# Each stage is a job of the same name reading what the previous ones left in the workdir.
STAGES = ("prepare", "cf", "phase1", "phase2", "eval", "chat")


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  stages = [s.strip() for s in config.stages.split(",") if s.strip()]
  known = [s for s in STAGES if s in config]
  unknown = [s for s in stages if s not in known]
  if unknown:
    raise config_lib.ConfigError(f"config.stages names {', '.join(unknown)}; valid stages: {', '.join(known)}")
  stages = [s for s in known if s in stages]  # always in pipeline order
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
