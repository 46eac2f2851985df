"""Metrics to ``workdir/metrics.jsonl`` and TensorBoard; only process 0 writes.

One JSON object per line: ``{"step": int, ...metrics}``. On resume the loop calls
``truncate_after(step)`` so lines written after the restored checkpoint (by the run that
was interrupted) do not appear twice.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

JSONL = "metrics.jsonl"


def _plain(v: Any) -> Any:
  if isinstance(v, np.generic | np.ndarray | jax.Array):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()
  return v


class MetricsWriter:
  """Appends metric records to JSONL and TensorBoard scalars.

  Args:
    workdir: run directory; ``metrics.jsonl`` and ``tb/`` go there.
    enabled: write at all (default: only on process 0, so multi-host runs write once).
    tensorboard: also write TensorBoard event files (tensorboardX).
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None,
               tensorboard: bool = True):
    self.workdir = os.fspath(workdir)
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(self.workdir, JSONL)
    self._tensorboard = tensorboard
    self._tb = None  # opened by the first write: a run that fails in set-up leaves no tb/
    if self.enabled:
      os.makedirs(self.workdir, exist_ok=True)

  def truncate_after(self, step: int) -> None:
    """Drops records with ``step`` > the given step (a resumed run rewrites them)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = f.readlines()
    keep = []
    for line in lines:
      try:
        rec = json.loads(line)
      except ValueError:
        continue  # a line cut short by the crash we are resuming from
      if rec.get("step", 0) <= step:
        keep.append(json.dumps(rec) + "\n")
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, self.path)

  def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
    """Writes one record; TensorBoard gets every finite scalar as ``prefix + name``.

    Args:
      step: training step the values belong to.
      metrics: name -> number (numpy/jax scalars allowed) or string.
      prefix: TensorBoard tag prefix, e.g. ``'train/'``.
    """
    if not self.enabled:
      return
    rec = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(rec) + "\n")
    if self._tensorboard and self._tb is None:
      from tensorboardX import SummaryWriter  # noqa: PLC0415  (slow import)
      self._tb = SummaryWriter(logdir=os.path.join(self.workdir, "tb"))
    if self._tb is not None:
      for k, v in rec.items():
        if k != "step" and isinstance(v, int | float) and math.isfinite(v):
          self._tb.add_scalar(prefix + k, v, step)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    self._tensorboard = False  # a write after close goes to the JSONL only


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """All records of ``workdir/metrics.jsonl`` (for tests and reports)."""
  path = os.path.join(os.fspath(workdir), JSONL)
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
