"""Checkpoints: trainable state, optimizer, step, rng and data-iterator positions.

One orbax ``CheckpointManager`` per run directory. Each step directory holds composite
items: ``state`` (a pytree of arrays: trainable params, optimizer state, step, rng key
data; saved with ``StandardSave``, restored into abstract ``ShapeDtypeStruct`` skeletons
that carry the target shardings) and one ``data_<name>`` item per Grain iterator (Grain's
own orbax handler: a JSON state per process). Frozen weights are never saved: the model
constructor reloads them from their source.

Restore order (why it matters): the newest step is tried first; a step whose files fail
their manifest check, or whose restore raises, is moved to ``<dir>/corrupt/`` with a
warning and the next older step is tried. Only when every step fails is it an error.

Multi-host: every process calls ``save``/``restore``; orbax coordinates the array writes.
The extra integrity manifest is written by process 0 only, after orbax has committed the
step, and read by all.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

MANIFEST = "ilm_manifest.json"
STATE_ITEM = "state"
DATA_PREFIX = "data_"


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or no stored checkpoint could be read."""


def _is_disk_full(e: BaseException) -> bool:
  seen = set()
  stack = [e]
  while stack:
    x = stack.pop()
    if x is None or id(x) in seen:
      continue
    seen.add(id(x))
    if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(x):
      return True
    stack += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]
  return False


def _files(step_dir: epath.Path) -> list[epath.Path]:
  out = []
  for p in sorted(step_dir.iterdir()):
    if p.is_dir():
      out += _files(p)
    elif p.name != MANIFEST:
      out.append(p)
  return out


def _digest(p: epath.Path) -> str:
  h = hashlib.sha256()
  with p.open("rb") as f:
    while chunk := f.read(1 << 20):
      h.update(chunk)
  return h.hexdigest()


def write_manifest(step_dir: epath.PathLike) -> None:
  """Records size and sha256 of every file in a committed step directory."""
  step_dir = epath.Path(step_dir)
  entries = {str(p.relative_to(step_dir)): [p.stat().length, _digest(p)]
             for p in _files(step_dir)}
  tmp = step_dir / (MANIFEST + ".tmp")
  tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
  tmp.rename(step_dir / MANIFEST)


def verify_manifest(step_dir: epath.PathLike) -> str | None:
  """Checks a step against its manifest; returns a problem description or None if intact.

  A step without a manifest (written by another tool, or a crash between orbax's commit
  and the manifest) is not rejected here: orbax's own commit marker vouches for it and
  the restore itself is the remaining check.
  """
  step_dir = epath.Path(step_dir)
  manifest = step_dir / MANIFEST
  if not manifest.exists():
    return None
  try:
    entries = json.loads(manifest.read_text())
  except (OSError, ValueError) as e:
    return f"unreadable manifest {manifest}: {e}"
  for rel, (size, digest) in entries.items():
    p = step_dir / rel
    if not p.exists():
      return f"missing file {p}"
    actual = p.stat().length
    if actual != size:
      return f"{p} has {actual} bytes, manifest says {size} (truncated?)"
    if _digest(p) != digest:
      return f"{p} content differs from its manifest checksum"
  return None


class Checkpointer:
  """Saves and restores training state plus Grain iterator positions in ``directory``.

  Args:
    directory: checkpoint root (local path or ``gs://``).
    max_to_keep: newest steps kept; older ones are deleted by orbax after a save.
    async_save: write arrays in a background thread (orbax async). Errors then surface
      at the next ``save``/``wait``/``close``.
    verify: write and check per-step sha256 manifests (detects truncated or altered
      files that orbax itself would read without complaint).
  """

  def __init__(self, directory: str | epath.PathLike, *, max_to_keep: int = 3,
               async_save: bool = False, verify: bool = True):
    # orbax wants absolute paths (a relative --workdir fails deep inside its writers).
    self.directory = epath.Path(directory).absolute()
    self.verify = verify
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=self._options)
    self._unmanifested: list[int] = []

  # -- queries -------------------------------------------------------------------------
  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  # -- save ----------------------------------------------------------------------------
  def save(self, step: int, state: Any, data: Mapping[str, Any] | None = None) -> bool:
    """Saves ``state`` (pytree of arrays) and iterator positions as ``step``.

    Args:
      step: training step the state belongs to (the number of updates applied).
      state: pytree of ``jax.Array``/numpy leaves (``nnx.State`` is fine).
      data: name -> Grain ``DatasetIterator`` (or ``DataLoaderIterator``).

    Returns:
      False when ``step`` is already stored (nothing written), True otherwise.

    Raises:
      CheckpointError: the save failed (disk full is named as such); earlier steps are
        left as they were.
    """
    if step in self._manager.all_steps():
      return False
    self._finish_pending()
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
    for name, it in (data or {}).items():
      items[DATA_PREFIX + name] = grain.checkpoint.CheckpointSave(it)
    try:
      self._manager.save(step, args=ocp.args.Composite(**items), force=True)
      if not self._options.enable_async_checkpointing:
        self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001  (re-raised with the step and directory)
      raise self._save_error(step, e) from e
    self._unmanifested.append(step)
    if not self._options.enable_async_checkpointing:
      self._finish_pending()
    return True

  def _save_error(self, step: int, e: BaseException) -> CheckpointError:
    prev = [s for s in self._manager.all_steps() if s != step]
    kept = f"step {max(prev)} is intact" if prev else "no earlier checkpoint exists"
    what = "disk full" if _is_disk_full(e) else f"{type(e).__name__}: {e}"
    return CheckpointError(
        f"saving checkpoint step {step} to {self.directory} failed ({what}); {kept}. "
        "Free space / fix the cause and rerun: training resumes from the last good step.")

  def _finish_pending(self) -> None:
    """Waits for async saves and writes their manifests (process 0)."""
    if not self._unmanifested:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._save_error(self._unmanifested[-1], e) from e
    if self.verify and jax.process_index() == 0:
      for step in self._unmanifested:
        d = self.step_dir(step)
        if d.exists():  # may already be garbage-collected by max_to_keep
          write_manifest(d)
    self._unmanifested = []

  def wait(self) -> None:
    """Blocks until pending saves are committed (and manifested)."""
    self._finish_pending()

  def close(self) -> None:
    self._finish_pending()
    self._manager.close()

  # -- restore -------------------------------------------------------------------------
  def restore(self, abstract_state: Any, data: Mapping[str, Any] | None = None,
              step: int | None = None) -> tuple[int, Any] | None:
    """Restores the newest intact step (or ``step``) into ``abstract_state``'s layout.

    Args:
      abstract_state: pytree of ``jax.ShapeDtypeStruct`` (with ``sharding``) of the same
        structure as the saved ``state``.
      data: name -> iterator; each is set to its saved position in place.
      step: a specific step (no fallback); None = newest intact.

    Returns:
      (step, state) or None when the directory holds no checkpoint.

    Raises:
      CheckpointError: checkpoints exist but none could be restored (each failure named).
    """
    self._finish_pending()
    steps = [step] if step is not None else sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    failures = []
    for s in steps:
      problem = verify_manifest(self.step_dir(s)) if self.verify else None
      if problem is None:
        try:
          items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
          for name, it in (data or {}).items():
            items[DATA_PREFIX + name] = grain.checkpoint.CheckpointRestore(it)
          restored = self._manager.restore(s, args=ocp.args.Composite(**items))
          if failures:
            self._quarantine([f[0] for f in failures])
          return s, restored[STATE_ITEM]
        except Exception as e:  # noqa: BLE001  (any unreadable step: try an older one)
          problem = f"{type(e).__name__}: {e}"
      logging.warning("checkpoint step %d in %s is unusable (%s); trying an older one",
                      s, self.directory, problem)
      failures.append((s, problem))
    raise CheckpointError(
        f"no usable checkpoint in {self.directory}: "
        + "; ".join(f"step {s}: {p}" for s, p in failures))

  def _quarantine(self, steps: list[int]) -> None:
    """Moves unusable steps to ``<dir>/corrupt/`` so new saves can reuse their numbers."""
    if jax.process_index() == 0:
      bad = self.directory / "corrupt"
      bad.mkdir(parents=True, exist_ok=True)
      for s in steps:
        target = bad / str(s)
        if target.exists():
          target.rmtree()
        self.step_dir(s).rename(target)
        logging.warning("moved unusable checkpoint step %d to %s", s, target)
    ocp.multihost.sync_global_processes(f"ilm_jax_quarantine_{'_'.join(map(str, steps))}")
    self._manager.reload()


def abstract_like(tree: Any) -> Any:
  """Restore target for a pytree of arrays: ``ShapeDtypeStruct`` (shape, dtype, sharding)
  for ``jax.Array`` leaves; numpy leaves stay numpy (restored as host arrays)."""
  def one(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
  return jax.tree.map(one, tree)


def save_pytree(path: str | os.PathLike, tree: Any) -> pathlib.Path:
  """Writes a pytree of host arrays (trained params for hand-off between jobs) with orbax."""
  path = pathlib.Path(path).absolute()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, tree, force=True)
  return path


def restore_pytree(path: str | os.PathLike, target: Any) -> Any:
  """Reads what ``save_pytree`` wrote into the structure and shapes of ``target``."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(pathlib.Path(path).absolute(), target)
