"""Fault tolerance through the real Phase 1 job: ``python -m ilm_jax.main`` subprocesses.

One chain of faults on one run directory, compared with an uninterrupted run U of the
same config:

  1. SIGTERM mid-run -> the job saves a checkpoint at the step boundary it reached and
     exits 0 (no results written: it did not finish).
  2. That newest checkpoint is truncated -> the rerun warns, moves it to
     ``checkpoints/corrupt/`` and resumes from the step before ...
  3. ... and is SIGKILLed a few checkpoints later.
  4. The last rerun resumes from the newest checkpoint and finishes: its trained params
     and data-iterator position equal U's bit for bit, its results.json holds the record.

Every run shares JAX's persistent compilation cache: U compiles the step and the
evaluation, the four later runs load them (each run otherwise costs tens of seconds of
compilation on 2 CPU cores). Same compiled code is also what makes "bit for bit" a
fair demand across processes.

Covered elsewhere, not repeated here: disk full while saving -> clear error, previous
checkpoint intact (``tests/test_checkpoint.py``, the ``Checkpointer`` the job uses).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ilm_jax import checkpoint, resources
from ilm_jax.evals import results

REPO = resources.REPO_ROOT
TOTAL = 16
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
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2",
             JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
             PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))

  def argv(workdir):
    return [sys.executable, "-m", "ilm_jax.main", "--config=configs/phase1.py:tiny,it",
            f"--workdir={workdir}", *flags]
  return tmp, argv, env, _multihost_worker


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


def _signal_after(proc, log, ckpt_dir, step: int, sig: int) -> str:
  """Sends ``sig`` once checkpoint ``step`` is committed; returns the run's output."""
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while proc.poll() is None and not [s for s in _committed_steps(ckpt_dir) if s >= step]:
      if time.monotonic() > deadline:
        pytest.fail(f"no checkpoint {step} after {TIMEOUT_S}s:\n{log.read_text()[-3000:]}")
      time.sleep(0.05)
    assert proc.poll() is None, f"the job ended before step {step}:\n{log.read_text()[-3000:]}"
    proc.send_signal(sig)
  finally:
    out = _wait(proc, log)
  return out


def test_sigterm_corrupt_sigkill_resume_ends_like_uninterrupted(setup):
  tmp, argv, env, worker = setup
  run, ref = tmp / "run", tmp / "uninterrupted"
  ckpt_dir = run / "checkpoints"

  # ---- 0. the reference: uninterrupted (fills the compilation cache) ----
  out = _wait(_start(argv(ref), env, tmp / "ref.log"), tmp / "ref.log")
  assert f"step {TOTAL}:" in out, out[-3000:]

  # ---- 1. SIGTERM once step 2's checkpoint is complete ----
  proc = _start(argv(run), env, tmp / "run1.log")
  out = _signal_after(proc, tmp / "run1.log", ckpt_dir, 2, signal.SIGTERM)
  assert proc.returncode == 0, out[-3000:]
  stopped = [line for line in out.splitlines() if "stopped by a signal at step" in line]
  assert stopped, out[-3000:]
  step = int(stopped[0].split("at step ")[1].split(";")[0])
  assert 2 <= step < TOTAL - 4
  assert max(_committed_steps(ckpt_dir)) == step  # saved where it stopped
  assert not results.read_results(run)            # an unfinished run reports nothing

  # ---- 2. truncate the newest checkpoint's largest file ----
  victim = max((p for p in (ckpt_dir / str(step)).rglob("*") if p.is_file()
                and p.name != checkpoint.MANIFEST), key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])

  # ---- 3. rerun: falls back to step - 1 with a warning; SIGKILL it 2 steps on ----
  proc = _start(argv(run), env, tmp / "run2.log")
  out = _signal_after(proc, tmp / "run2.log", ckpt_dir, step + 2, signal.SIGKILL)
  assert proc.returncode == -signal.SIGKILL, out[-3000:]
  assert "truncated?" in out and f"checkpoint step {step} in" in out, out[-3000:]
  assert f"moved unusable checkpoint step {step}" in out
  assert f"resumed from checkpoint step {step - 1}" in out
  assert (ckpt_dir / "corrupt" / str(step)).is_dir()

  # ---- 4. resume after SIGKILL: finishes ----
  last = max(_committed_steps(ckpt_dir))
  out = _wait(_start(argv(run), env, tmp / "run3.log"), tmp / "run3.log")
  assert "resumed from checkpoint step " in out, out[-3000:]
  # >= : a step orbax committed just before the kill may still lack our manifest
  assert int(out.split("resumed from checkpoint step ")[1].split()[0]) >= last
  assert TOTAL in _committed_steps(ckpt_dir)
  (record,) = [r for r in results.read_results(run) if r["task"] == "phase1"]
  assert record["steps"] == TOTAL

  # ---- bit-identical to the uninterrupted run: params and data position ----
  got, want = worker.flat_params(run), worker.flat_params(ref)
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  data_state = pathlib.Path("checkpoints", str(TOTAL), "data_train", "process_0-of-1.json")
  assert json.loads((run / data_state).read_text()) == json.loads((ref / data_state).read_text())
