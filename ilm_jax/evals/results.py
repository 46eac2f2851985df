"""``DIR/results.json``: the records every evaluation writes (SPEC §8), and a table view.

A record is a flat JSON object::

  {"dataset": "ml1m", "split": "test", "task": "straightforward", "template": "seen",
   "method": "mf", "users": 6040, "hr@5": ..., "ndcg@5": ..., "hr@10": ..., "ndcg@10": ...,
   ...extras (standard errors "hr@5_se", wall time, steps, ...)}

Records are keyed by (dataset, split, task, template, method): writing a record with a
key already in the file replaces it, others are kept, so jobs can write in any order.
Writes are atomic (temp file + rename) and serialised with a lock file, so concurrent
jobs sharing a workdir do not lose each other's records.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import pathlib
import re
import shlex
import sys
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

FILENAME = "results.json"
KEY_FIELDS = ("dataset", "split", "task", "template", "method")
METRIC_FIELDS = ("hr@5", "ndcg@5", "hr@10", "ndcg@10")
REQUIRED = KEY_FIELDS + ("users",) + METRIC_FIELDS
SPLITS = ("valid", "test")
TASKS = ("sequential", "straightforward", "phase1", "language", "preservation")
# Phase 1 records (item encoder retrieval metrics, ``jobs/phase1``) carry recall@K etc.
# instead of HR/NDCG, and the eval job's ``language`` (semantic consistency, reference
# log-likelihood) and ``preservation`` (text-only logits == base LLM's) records carry their
# own fields; for them the ranking metrics are optional.
METRIC_FREE_TASKS = ("phase1", "language", "preservation")
TEMPLATES = ("seen", "unseen")
METHODS = ("mf", "text-only", "mlp", "ilm-rand", "ilm-it", "ilm-it-ii", "ilm-it-ui")
_SUFFIX = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_DATASET = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")

Record = dict[str, Any]


class ResultsError(ValueError):
  """A record does not follow the results.json schema (SPEC §8)."""


def command_line() -> str:
  """The command that runs this process (recorded with every result and summary)."""
  argv = list(sys.argv)
  if argv and argv[0].endswith(("ilm_jax/main.py", "ilm_jax.main")):
    argv[0] = "python -m ilm_jax.main"
  return " ".join(shlex.quote(a) if i else a for i, a in enumerate(argv))


def _check_method(method: str) -> None:
  base, plus, scorer = method.partition("+")
  if base not in METHODS or (plus and not _SUFFIX.match(scorer)):
    raise ResultsError(
        f"method {method!r} is not one of {', '.join(METHODS)}, optionally followed by "
        "'+scorer' (lower case, e.g. 'ilm-it-ii+retrieval')")


def validate_record(record: Record) -> Record:
  """Checks names and values; returns the record (a copy, with plain Python numbers).

  Raises:
    ResultsError: naming the field and the allowed values.
  """
  required = (REQUIRED if record.get("task") not in METRIC_FREE_TASKS
              else KEY_FIELDS + ("users",))
  missing = [k for k in required if k not in record]
  if missing:
    raise ResultsError(f"record {record!r} lacks {missing}; required: {list(REQUIRED)}")
  rec = dict(record)
  for field, allowed in (("split", SPLITS), ("task", TASKS), ("template", TEMPLATES)):
    if rec[field] not in allowed:
      raise ResultsError(f"{field}={rec[field]!r} is not one of {', '.join(allowed)}")
  _check_method(rec["method"])
  if not isinstance(rec["dataset"], str) or not _DATASET.match(rec["dataset"]):
    raise ResultsError(f"dataset={rec['dataset']!r} must be a lower-case name "
                       "(ml1m, beauty, clothing, generated or an OpenP5 folder name)")
  users = rec["users"]
  if isinstance(users, bool) or int(users) != users or users < 1:
    raise ResultsError(f"users={users!r} must be a positive integer")
  rec["users"] = int(users)
  for k in METRIC_FIELDS:
    if k not in rec:
      continue
    v = float(rec[k])
    if not (math.isfinite(v) and 0.0 <= v <= 1.0):
      raise ResultsError(f"{k}={rec[k]!r} must be a number in [0, 1]")
    rec[k] = v
  for k, v in rec.items():
    if k != k.lower():
      raise ResultsError(f"field {k!r} must be lower case")
    if hasattr(v, "item") and not isinstance(v, str | bytes):  # numpy / jax scalars
      rec[k] = v.item()
  json.dumps(rec)  # fails here, not half way through a write
  return rec


def _key(rec: Record) -> tuple:
  return tuple(rec[k] for k in KEY_FIELDS)


def read_results(workdir: str | os.PathLike) -> list[Record]:
  """The records in ``workdir/results.json`` ([] when absent)."""
  path = pathlib.Path(workdir) / FILENAME
  if not path.exists():
    return []
  try:
    records = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ResultsError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
  if not isinstance(records, list):
    raise ResultsError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
  return records


def _process_index() -> int:
  """``jax.process_index()`` if jax is already imported (0 otherwise: nothing to share)."""
  jax = sys.modules.get("jax")
  return jax.process_index() if jax is not None else 0


@contextlib.contextmanager
def _locked(workdir: pathlib.Path):
  with open(workdir / (FILENAME + ".lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def write_results(workdir: str | os.PathLike, records: Iterable[Record]) -> list[Record]:
  """Merges ``records`` into ``workdir/results.json`` atomically.

  Args:
    workdir: the job's output folder (created if needed).
    records: records to add; one with the key (dataset, split, task, template, method)
      of an existing record replaces it.

  Returns:
    All records now in the file (on a multi-host run's other processes, which do not
    write: ``records`` merged with what the file holds).
  """
  new = [validate_record(r) for r in records]
  if _process_index() != 0:  # multi-host: process 0 writes the one shared file
    merged = {_key(r): r for r in read_results(workdir)}
    merged |= {_key(r): r for r in new}
    return list(merged.values())
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with _locked(workdir):
    merged = {_key(r): r for r in read_results(workdir)}
    for r in new:
      merged[_key(r)] = r
    out = list(merged.values())
    fd, tmp = tempfile.mkstemp(dir=workdir, prefix=FILENAME + ".", suffix=".tmp")
    try:
      with os.fdopen(fd, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
      os.replace(tmp, workdir / FILENAME)
    except BaseException:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
      raise
  return out


def format_table(records: Sequence[Record], extras: Sequence[str] = ()) -> str:
  """A fixed-width table: key fields, users, the four metrics (± std error when present).

  Args:
    records: results records.
    extras: further fields to show as columns (e.g. 'train_s').
  """
  head = list(KEY_FIELDS) + ["users"] + list(METRIC_FIELDS) + list(extras)
  rows = []
  for r in records:
    row = [str(r.get(k, "")) for k in KEY_FIELDS] + [str(r.get("users", ""))]
    for k in METRIC_FIELDS:
      v = r.get(k)
      se = r.get(k + "_se")
      row.append("" if v is None else f"{v:.4f}" + ("" if se is None else f"±{se:.4f}"))
    for k in extras:
      v = r.get(k, "")
      row.append(f"{v:.4g}" if isinstance(v, float) else str(v))
    rows.append(row)
  widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(head)]
  lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
  lines.append("  ".join("-" * w for w in widths))
  lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
  return "\n".join(lines)
