r"""Long fuzz run of every file parser and of config parsing; prints a table.

  .venv/bin/python benchmarks/fuzz.py [--cases 2000] [--targets a,b] [--seed 0] [--out FILE]

Same targets and contract as ``tests/test_fuzz.py`` (see ``tests/_fuzz_targets.py``), with
many more cases and without stopping at the first failure: every contract violation is
counted, and the distinct ones (by exception type and message head) are listed. Exit
status 1 when any case failed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import logging
import pathlib
import sys
import time
import warnings

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import _fuzz_targets as F  # noqa: E402, N812
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

CONFIG = "config/main-flags+validate"
WRITER = "store/write"
GENERATED = "sources/generated"


def _run(name: str, strategy, check, cases: int, rng_seed: int) -> dict:
  outcomes = collections.Counter()
  failures = collections.Counter()
  examples = {}

  @seed(rng_seed)
  @settings(max_examples=cases, database=None, deadline=None, derandomize=False,
            suppress_health_check=list(HealthCheck))
  @given(strategy)
  def body(x):
    try:
      # TFDS prints a TensorFlow banner to stdout on some damaged folders; keep the table clean.
      with contextlib.redirect_stdout(io.StringIO()):
        outcomes[check(x)] += 1
    except F.ContractViolation as e:
      key = str(e).splitlines()[0][:160]
      failures[key] += 1
      examples.setdefault(key, repr(x)[:300])
      outcomes["fail"] += 1

  start = time.monotonic()
  body()
  return {"parser": name, "cases": sum(outcomes.values()), "ok": outcomes["ok"],
          "named_errors": outcomes["error"], "failures": outcomes["fail"],
          "seconds": round(time.monotonic() - start, 1),
          "distinct_failures": [{"failure": k, "count": v, "example": examples[k]}
                                for k, v in failures.most_common()]}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--cases", type=int, default=2000, help="cases per parser")
  p.add_argument("--targets", default="", help="comma-separated subset (default: all)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="", help="also write the results as JSON here")
  args = p.parse_args()
  logging.disable(logging.WARNING)  # parsers warn about stale files; we only count outcomes
  warnings.simplefilter("ignore")
  from absl import logging as absl_logging  # noqa: PLC0415
  absl_logging.set_verbosity(absl_logging.ERROR)

  targets = F.targets()
  extra = (CONFIG, WRITER, GENERATED)
  names = [*targets, *extra]
  if args.targets:
    names = [n for n in args.targets.split(",") if n]
    unknown = sorted(set(names) - set(targets) - set(extra))
    if unknown:
      p.error(f"unknown targets {unknown}; valid: {', '.join([*targets, *extra])}")
  rows = []
  for name in names:
    if name == CONFIG:
      strategy = F.config_argv(sorted(F.CONFIGS.glob("*.py")))
      rows.append(_run(name, strategy, F.check_config_case, args.cases, args.seed))
    elif name == GENERATED:
      rows.append(_run(name, F.generated_configs(), F.check_generated_case, args.cases,
                       args.seed))
    elif name == WRITER:  # ~0.2 s a case (two TFDS writes): a tenth of the cases
      rows.append(_run(name, F.rec_datasets(), F.check_writer_case, max(1, args.cases // 10),
                       args.seed))
    else:
      t = targets[name]
      rows.append(_run(name, F.case(t), lambda files, t=t: F.check_case(t, files), args.cases,
                       args.seed))
    r = rows[-1]
    print(f"  {name}: {r['cases']} cases, {r['failures']} failures, {r['seconds']}s",
          file=sys.stderr, flush=True)

  print(f"\n{'parser':30s} {'cases':>7s} {'ok':>7s} {'named err':>9s} {'failures':>8s} "
        f"{'seconds':>8s}")
  for r in rows:
    print(f"{r['parser']:30s} {r['cases']:7d} {r['ok']:7d} {r['named_errors']:9d} "
          f"{r['failures']:8d} {r['seconds']:8.1f}")
  total = sum(r["cases"] for r in rows)
  bad = sum(r["failures"] for r in rows)
  print(f"{'total':30s} {total:7d} {'':7s} {'':9s} {bad:8d}")
  for r in rows:
    for f in r["distinct_failures"]:
      print(f"\n[{r['parser']}] x{f['count']}: {f['failure']}\n  e.g. {f['example']}")
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps({"seed": args.seed, "cases_per_parser":
                                                  args.cases, "results": rows}, indent=2) + "\n")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
