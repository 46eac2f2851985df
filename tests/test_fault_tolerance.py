"""Fault tolerance through the real Phase 1 job: ``python -m ilm_jax.main`` subprocesses.

One sequence, three faults, two job runs (each run compiles the step and, at the end, the
evaluation, so every extra run costs tens of seconds on 2 CPU cores):

  1. SIGTERM mid-run -> the job saves a checkpoint at the step boundary it reached and
     exits 0 (no results written: it did not finish).
  2. The newest checkpoint (the one SIGTERM wrote) is truncated -> the rerun warns, moves
     it to ``checkpoints/corrupt/``, resumes from the step before and finishes.
  3. The finished run's results.json and final checkpoint exist.

Covered elsewhere, not repeated here (each needs one or two more job runs):
  - SIGKILL then resume == uninterrupted, bit for bit (params and data position):
    ``tests/test_train.py`` (a real SIGKILL of ``tests/_train_tiny.py``, the same
    ``train.train`` loop the job calls) and ``tests/test_phase1_job.py`` (the Phase 1 job's
    own interrupted-and-resumed run vs an uninterrupted one, in process).
  - Disk full while saving -> clear error, previous checkpoint intact:
    ``tests/test_checkpoint.py`` (the ``Checkpointer`` the job uses).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from ilm_jax import checkpoint, resources
from ilm_jax.evals import results

REPO = resources.REPO_ROOT
TOTAL = 12
TIMEOUT_S = 900  # hang guard per job run (a run takes ~1 min of CPU; crowded machines: more)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  sys.path.insert(0, str(REPO / "tests"))
  import _multihost_worker  # noqa: PLC0415
  tmp = tmp_path_factory.mktemp("fault")
  c = _multihost_worker.prepare_shared(tmp / "shared", TOTAL)
  flags = _multihost_worker.override_flags(c) + [
      "--config.train.checkpoint_every=1", "--config.train.log_every=1",
      "--config.train.keep_checkpoints=3",
      # evaluation stays on (it is part of the job) but small
      "--config.eval.batch_size=32", "--config.eval.max_candidates=64",
      "--config.eval.max_pairs=64", "--config.eval.max_cluster_items=64"]
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))}
  # The rerun loads the step the first run compiled (JAX's persistent cache, CPU too).
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2",
             JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
             PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
  argv = [sys.executable, "-m", "ilm_jax.main", "--config=configs/phase1.py:tiny,it",
          f"--workdir={tmp / 'run'}", *flags]
  return tmp, argv, env


def _start(argv, env, log: pathlib.Path) -> subprocess.Popen:
  with open(log, "w") as f:
    return subprocess.Popen(argv, env=env, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, log: pathlib.Path) -> str:
  try:
    proc.wait(timeout=TIMEOUT_S)
  finally:
    if proc.poll() is None:
      proc.kill()
      with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
  return log.read_text()


def _committed_steps(ckpt_dir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit()
                and (p / checkpoint.MANIFEST).exists())


def test_sigterm_checkpoints_then_corrupt_latest_falls_back_and_finishes(setup):
  tmp, argv, env = setup
  ckpt_dir = tmp / "run" / "checkpoints"

  # ---- 1. SIGTERM once step 2's checkpoint is complete ----
  log1 = tmp / "run1.log"
  proc = _start(argv, env, log1)
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while 2 not in _committed_steps(ckpt_dir) and proc.poll() is None:
      if time.monotonic() > deadline:
        pytest.fail(f"no checkpoint after {TIMEOUT_S}s:\n{log1.read_text()[-3000:]}")
      time.sleep(0.1)
    assert proc.poll() is None, f"job ended early:\n{log1.read_text()[-3000:]}"
    proc.send_signal(signal.SIGTERM)
  finally:
    out1 = _wait(proc, log1)
  assert proc.returncode == 0, out1[-3000:]
  stopped = [line for line in out1.splitlines() if "stopped by a signal at step" in line]
  assert stopped, out1[-3000:]
  step = int(stopped[0].split("at step ")[1].split(";")[0])
  assert 2 <= step < TOTAL
  assert max(_committed_steps(ckpt_dir)) == step  # saved where it stopped
  assert not results.read_results(tmp / "run")   # an unfinished run reports nothing

  # ---- 2. truncate the newest checkpoint's largest file ----
  victim = max((p for p in (ckpt_dir / str(step)).rglob("*") if p.is_file()
                and p.name != checkpoint.MANIFEST), key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])

  # ---- 3. rerun: falls back to step - 1 with a warning, finishes ----
  log2 = tmp / "run2.log"
  out2 = _wait(_start(argv, env, log2), log2)
  assert "truncated?" in out2 and f"checkpoint step {step} in" in out2, out2[-3000:]
  assert f"moved unusable checkpoint step {step}" in out2
  assert f"resumed from checkpoint step {step - 1}" in out2
  assert (ckpt_dir / "corrupt" / str(step)).is_dir()
  assert TOTAL in _committed_steps(ckpt_dir)
  (record,) = [r for r in results.read_results(tmp / "run") if r["task"] == "phase1"]
  assert record["steps"] == TOTAL
