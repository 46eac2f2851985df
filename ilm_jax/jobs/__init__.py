"""One module per job, each with ``run(config, workdir)``; ``config.job`` picks one."""

from __future__ import annotations

import importlib
from types import ModuleType

# Imported lazily so that `--help` and light jobs stay fast.
JOBS = {
    "prepare": "ilm_jax.jobs.prepare",
    "cf": "ilm_jax.jobs.cf",
    "phase1": "ilm_jax.jobs.phase1",
    "phase2": "ilm_jax.jobs.phase2",
    "eval": "ilm_jax.jobs.evaluate",
    "generate": "ilm_jax.jobs.generate",
    "chat": "ilm_jax.jobs.chat",
    "pipeline": "ilm_jax.jobs.pipeline",
}


def job_module(job: str) -> ModuleType:
  """The module that runs ``job``; ValueError listing the jobs for an unknown name."""
  if job not in JOBS:
    raise ValueError(f"config.job={job!r} is not a job; valid: {', '.join(sorted(JOBS))}")
  return importlib.import_module(JOBS[job])
