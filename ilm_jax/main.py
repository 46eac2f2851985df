r"""Entry point for every ilm_jax job.

  python -m ilm_jax.main --config=configs/<job>.py[:arg] [--config.key=value ...] \
      --workdir=DIR

The config's ``job`` field picks what runs (prepare, cf, phase1, phase2, eval, chat,
generate, pipeline). ``--config.key=value`` overrides a leaf; an unknown key is an
error. Each config file's docstring lists its ``:arg`` variants.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ilm_jax import jobs

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Job config file, e.g. configs/cf.py or configs/phase1.py:tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for outputs (data cache, checkpoints, metrics, results.json).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/cf.py")
  job = config.get("job")
  if job not in jobs.JOBS:
    raise app.UsageError(f"config.job={job!r} is not a job; valid: {', '.join(sorted(jobs.JOBS))}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (outputs go there)")
  check_workdir(_WORKDIR.value)
  workdir = os.path.abspath(_WORKDIR.value)  # every path derived from it stays valid later
  from ilm_jax import config_lib, distributed  # noqa: PLC0415  (keeps --help fast)
  try:
    config_lib.validate(config)
    # Multi-host start-up before anything touches a device (see ilm_jax/distributed.py).
    try:
      distributed.maybe_initialize(config)
    except distributed.DistributedConfigError as e:
      raise app.UsageError(str(e)) from e
    logging.info("job %s, workdir %s\n%s", job, workdir, config)
    jobs.job_module(job).run(config, workdir)
  except Exception as e:
    if not _is_named_error(e):
      raise  # a bug: keep the traceback
    logging.debug("%s", e, exc_info=True)
    sys.stderr.write(f"ERROR ({type(e).__name__}): {e}\n"
                     "(run with --verbosity=1 for the traceback)\n")
    sys.exit(2)


def _is_named_error(e: BaseException) -> bool:
  """Errors ilm_jax raises on purpose (bad data, config, files) carry their own message."""
  return any(c.__module__.startswith("ilm_jax.") for c in type(e).__mro__) or isinstance(
      e, (FileNotFoundError, NotADirectoryError, PermissionError))


# Job parts that write the workdir with local file APIs (open/pathlib/os), which would
# turn "gs://b/run" into a local folder "gs:/b/run"; see docs/SCALING.md, "Multi-host".
LOCAL_PATH_WRITERS = (
    "prepare: data/<dataset>", "cf: cf/embeddings.npz, cf/train_log.json",
    "train loop: metrics.jsonl, tb/", "results.json", "phase1: phase1/qformer_config.json",
    "phase2: phase2/<method>/", "eval: eval/<method>/", "chat: chat/",
    "generate: generate.jsonl")


def check_workdir(workdir: str) -> None:
  """Rejects object-store URLs as the workdir (only checkpoints could live there).

  Raises:
    app.UsageError: naming the job parts that need a local or FUSE-mounted path.
  """
  scheme = workdir.split("://", 1)[0] if "://" in workdir else ""
  if scheme:
    raise app.UsageError(
        f"--workdir={workdir}: {scheme}:// is not supported as a workdir; these parts "
        f"write it with local file APIs: {'; '.join(LOCAL_PATH_WRITERS)}. Mount the bucket "
        "(e.g. gcsfuse --implicit-dirs BUCKET /mnt/BUCKET) and pass "
        "--workdir=/mnt/BUCKET/RUN (docs/SCALING.md, 'Multi-host').")


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Parses flags; a bad ``--config.key`` override raises ``flags.Error`` naming the flag.

  (ml_collections raises bare AttributeError/KeyError/TypeError/ValueError for an unknown
  key, a key below a leaf such as ``--config.data.dir.x``, or a malformed key path.)
  """
  try:
    return flag_values(argv)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    key = str(e).strip("\"'")
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    bad = [a for a in overrides if key and key in a.split("=", 1)[0]] or overrides
    raise flags.Error(f"{', '.join(bad) or '--config'}: not an override of an existing config "
                      f"field ({type(e).__name__}: {e})") from e


def _parse_flags_with_usage(argv: list[str]) -> list[str]:
  try:
    return parse_flags(argv)
  except flags.Error as e:
    sys.stderr.write(f"FATAL Flags parsing error: {e}\n"
                     "Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


def entry() -> None:
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=_parse_flags_with_usage)


if __name__ == "__main__":
  sys.exit(entry())
