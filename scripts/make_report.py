r"""Regenerates docs/RESULTS.md, docs/results/*.json and the PNG plots from run folders.

  .venv/bin/python scripts/make_report.py --runs DIR [DIR ...] [--out-dir docs]

Each DIR is a workdir of the jobs (``DIR/results.json``, ``DIR/**/metrics.jsonl``,
``DIR/phase2/<method>/summary.json``) or an archived copy of one. Writes:

  OUT/RESULTS.md                 tables for ML1M, Beauty, Clothing (then any other dataset
                                 found): MF, text-only, MLP, ILM-rand, ILM-IT, ILM-IT-II,
                                 ILM-IT-UI (+ retrieval head) per task x template, ± std
                                 errors, the published numbers of SPEC §7 beside them,
                                 users, steps, wall time, the commands that made them;
                                 language and preservation tables; the ML1M ordering check
  OUT/results/<dataset>.json     the records reported (SPEC §8), one file per dataset
  OUT/results/results_<dataset>.png   HR@5 / NDCG@10 bars with ±1 std error
  OUT/results/training_<run>.png      training curves (loss vs step) per run folder
  OUT/results/archive/<name>/    a copy of the small files above of every run (``name`` =
                                 the folder's name; ``archive.json`` says where it came from)

Run folders hold checkpoints and live outside the repository, and they do not outlive the
machine that made them. The archive does: the report records the command that regenerates
it from ``OUT/results/archive`` alone, and new runs can be added beside the archived ones.
An archived run whose ``metrics.jsonl`` files were lost before archiving may hold the plot
made from them instead (``training_curves.png``); the report shows that plot as it is.

A method without a record is reported as missing; nothing is filled in. When several
runs hold the same (dataset, split, task, template, method), the one with more users wins
(then the later ``--runs`` entry). Only the test split is tabulated.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ilm_jax.data import sources  # noqa: E402
from ilm_jax.evals import results  # noqa: E402

MAIN_DATASETS = ("ml1m", "beauty", "clothing")
DATASET_NAMES = {"ml1m": "ML1M", "beauty": "Beauty", "clothing": "Clothing",
                 "generated": "Generated catalogue"}
METHOD_NAMES = {"mf": "MF", "text-only": "text-only", "mlp": "MLP", "ilm-rand": "ILM-rand",
                "ilm-it": "ILM-IT", "ilm-it-ii": "ILM-IT-II", "ilm-it-ui": "ILM-IT-UI"}
TASKS = ("sequential", "straightforward")
TEMPLATES = ("seen", "unseen")
METRICS = results.METRIC_FIELDS
DISTINCT = "distinct@10"  # different items in the users' top 10s (evals/ranking.summarize)
# SPEC §7: full ranking, leave-one-out; (label, HR@5, NDCG@5, HR@10, NDCG@10), None = not
# given. The SPEC does not say which template; they are shown beside the seen one.
PUBLISHED = {
    ("ml1m", "sequential"): [
        ("OpenP5 random ids (T5-small)", .1098, .0734, .1575, .0888),
        ("OpenP5 collaborative ids", .2066, .1400, .2945, .1683),
        ("SASRec (as printed by OpenP5)", .1078, .0681, .1810, .0918)],
    ("beauty", "sequential"): [("OpenP5 best", .0457, .0336, None, None)],
    ("clothing", "sequential"): [("OpenP5 best", .0082, None, None, None)],
    ("ml1m", "straightforward"): [("OpenP5 best", .0347, None, None, None),
                                  ("BPR-MF (OpenP5)", .0141, None, None, None)],
}


# ============================================================================ reading


def load_runs(runs: Sequence[str | pathlib.Path]) -> list[dict[str, Any]]:
  """All records of every run, each tagged with ``_run`` (the folder) and its position."""
  out = []
  for i, run in enumerate(runs):
    for r in results.read_results(run):
      out.append({**r, "_run": str(run), "_order": i})
  return out


def best_records(records: Iterable[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
  """One record per key (more users wins, then the later run)."""
  best: dict[tuple, dict[str, Any]] = {}
  for r in records:
    key = tuple(r[k] for k in results.KEY_FIELDS)
    old = best.get(key)
    if old is None or (r["users"], r["_order"]) >= (old["users"], old["_order"]):
      best[key] = r
  return best


def trained_models(run: pathlib.Path) -> list[dict[str, Any]]:
  """The Phase 2 jobs' ``summary.json`` of every model under ``run/phase2``."""
  out = []
  for path in sorted(run.glob("phase2/*/summary.json")):
    try:
      out.append({"folder": path.parent.relative_to(run).as_posix(),
                  **json.loads(path.read_text())})
    except json.JSONDecodeError:
      out.append({"folder": path.parent.relative_to(run).as_posix(), "error": "bad json"})
  return out


def training_curves(run: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  """{relative folder: [(step, loss)]} from every metrics.jsonl under ``run``.

  A file whose rows name several batch kinds (Phase 1 alternates item-text and pair
  batches, whose losses differ in scale) gives one curve per kind, "<folder> <kind>".
  """
  curves = {}
  for path in sorted(run.rglob("metrics.jsonl")):
    by_kind: dict[str, list[tuple[int, float]]] = {}
    for line in path.read_text().splitlines():
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if "loss" in row and "step" in row and isinstance(row["loss"], int | float):
        by_kind.setdefault(str(row.get("kind", "")), []).append(
            (int(row["step"]), float(row["loss"])))
    rel = path.parent.relative_to(run).as_posix()
    rel = "phase1" if rel == "." else rel
    for kind, pts in by_kind.items():
      curves[f"{rel} {kind}" if len(by_kind) > 1 else rel] = pts
  return curves


# ============================================================================ archive

ARCHIVE_INFO = "archive.json"
CURVES_PNG = "training_curves.png"  # an archived run's plot whose metrics were lost


def _archived_files(run: pathlib.Path) -> list[pathlib.Path]:
  """The files of ``run`` the report reads (relative paths)."""
  keep = [pathlib.Path(p) for p in (results.FILENAME, CURVES_PNG) if (run / p).is_file()]
  keep += sorted(p.relative_to(run) for p in run.glob("phase2/*/summary.json"))
  keep += sorted(p.relative_to(run) for p in run.rglob("metrics.jsonl"))
  return keep


def archive_runs(runs: Sequence[pathlib.Path], archive: pathlib.Path) -> list[pathlib.Path]:
  """Copies each run's report inputs to ``archive/<folder name>``; returns the copies.

  A run already inside ``archive`` is used as it is. Each copy is written beside its place
  and renamed into it, so a failure leaves the previous copy whole. A folder whose name an
  archived copy of another folder already has is refused (rename it).
  """
  archive = archive.resolve()
  out, origins = [], {}
  for run in runs:
    run = run.resolve()
    if run.parent == archive:
      out.append(run)
      continue
    origin = _origin(run)
    dest = archive / run.name
    if dest.exists() and run.name not in origins:
      origins[run.name] = _origin(dest)
    if origins.setdefault(run.name, origin) != origin:
      raise SystemExit(f"make_report: --runs {origin} would be archived as {dest}, which holds "
                       f"the copy of {origins[run.name]}; rename the folder")
    archive.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{run.name}.", dir=archive))
    try:
      for rel in _archived_files(run):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(run / rel, tmp / rel)
      info = {"origin": origin, "archived": datetime.date.today().isoformat()}
      (tmp / ARCHIVE_INFO).write_text(json.dumps(info, indent=1) + "\n")
      if dest.exists():
        old = dest.with_name(f".{run.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old)
      else:
        tmp.rename(dest)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    out.append(dest)
  return out


def _origin(run: pathlib.Path) -> str:
  """Where an archived run came from (the folder itself if it is not archived)."""
  info = run / ARCHIVE_INFO
  return json.loads(info.read_text()).get("origin", str(run)) if info.is_file() else str(run)


# ============================================================================ tables


def _fmt(r: dict[str, Any] | None, k: str) -> str:
  if r is None or k not in r:
    return ""
  se = r.get(k + "_se")
  return f"{r[k]:.4f}" + (f" ± {se:.4f}" if se is not None else "")


def _num(v: Any, fmt: str = "{:.0f}") -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return ""
  return fmt.format(v) if isinstance(v, int | float) else str(v)


def _run_label(r: dict[str, Any], runs: list[str]) -> str:
  return f"R{runs.index(r['_run']) + 1}"


def ranking_table(best: dict, dataset: str, task: str, template: str,
                  runs: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
  """Markdown lines of one table, and the records it shows."""
  lines = ["| method | scorer | HR@5 | NDCG@5 | HR@10 | NDCG@10 | distinct@10 | users | steps | "
           "eval wall s | run |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  shown = []
  for m in results.METHODS:
    name = METHOD_NAMES[m]
    if m == "mf":
      if task != "straightforward":
        lines.append(f"| {name} | — | n/a: MF has no prompt (see straightforward) "
                     "| | | | | | | | |")
        continue
      if template == "unseen":
        r = best.get((dataset, "test", task, "seen", m))
        if r is not None:
          lines.append(f"| {name} | dot product | same as seen (no template) | | | | | "
                       f"{r['users']} | | | {_run_label(r, runs)} |")
          continue
    variants = [(m, "beam search (10)"), (m + "+retrieval", "retrieval head")]
    if m == "mf":
      variants = [(m, "dot product")]
    found = False
    for method, scorer in variants:
      r = best.get((dataset, "test", task, template, method))
      if r is None:
        continue
      found = True
      shown.append(r)
      steps = r.get("steps", r.get("iters"))
      wall = r.get("wall_s")
      lines.append(f"| {name} | {scorer} | " + " | ".join(_fmt(r, k) for k in METRICS)
                   + f" | {_num(r.get(DISTINCT))}"
                   + f" | {r['users']}{' (sample)' if r.get('subsample') else ''} | "
                   f"{_num(steps)} | {_num(wall, '{:.1f}')} | {_run_label(r, runs)} |")
    if not found:
      lines.append(f"| {name} | — | {_missing_why(dataset, m)} | | | | | | | | |")
  lines += _popularity_row(best, dataset, runs)
  if template == "seen":
    for label, *vals in PUBLISHED.get((dataset, task), []):
      cells = ["" if v is None else f"{v:.4f}" for v in vals]
      lines.append(f"| *published: {label}* | | " + " | ".join(cells) + " | | | | | SPEC §7 |")
  return lines, shown


def _has_item_text(dataset: str) -> bool:
  """False for a shared OpenP5 set without item text (Clothing): no Phase 1, no ILM-IT*."""
  return dataset not in sources.SHARED_OPENP5 or dataset in sources.SHARED_ITEM_META


def _missing_why(dataset: str, method: str) -> str:
  """Why a table has no row for ``method``: it cannot exist, or it was not run."""
  if method.startswith("ilm-it") and not _has_item_text(dataset):
    return "n/a: the dataset has no item text, so no Phase 1"
  return "**missing** (not run)"


def _popularity_row(best: dict, dataset: str, runs: list[str]) -> list[str]:
  """The popularity baseline the cf job files in its MF record (one item list for every
  user, so the same row in every table of the dataset); none if the record lacks it."""
  r = best.get((dataset, "test", "straightforward", "seen", "mf"))
  if r is None or "popularity_hr@5" not in r:
    return []
  pop = {k[len("popularity_"):]: v for k, v in r.items() if k.startswith("popularity_")}
  return ["| *popularity (train counts)* | — | " + " | ".join(_fmt(pop, k) for k in METRICS)
          + f" | {_num(pop.get(DISTINCT))}"
          + f" | {r['users']}{' (sample)' if r.get('subsample') else ''} | | | "
          f"{_run_label(r, runs)} |"]


def ordering_check(best: dict, dataset: str = "ml1m", task: str = "sequential",
                   template: str = "seen", metric: str = "hr@5", scorer: str = "") -> str:
  """The paper's ordering ILM > ILM-rand > MLP on ``metric``, with ±1 std error.

  ``scorer`` '' = beam search (the paper's protocol), 'retrieval' = the retrieval head.
  """
  suffix = f"+{scorer}" if scorer else ""
  how = "retrieval head" if scorer else "beam search"

  def get(m):
    rec = best.get((dataset, "test", task, template, m + suffix))
    return None if rec is None else {**rec, "method": m}
  ilm = [r for r in (get(m) for m in ("ilm-it", "ilm-it-ii", "ilm-it-ui")) if r is not None]
  rand, mlp = get("ilm-rand"), get("mlp")
  if not ilm or rand is None or mlp is None:
    have = [m for m in ("ilm-it", "ilm-it-ii", "ilm-it-ui", "ilm-rand", "mlp") if get(m)]
    return (f"Ordering ILM > ILM-rand > MLP ({DATASET_NAMES.get(dataset, dataset)} {task}, "
            f"{template}, {metric.upper()}, {how}): **not evaluated** -- records present for "
            f"{', '.join(have) or 'none'} of ILM-IT*, ILM-rand, MLP.")
  top = max(ilm, key=lambda r: r[metric])
  se = lambda r: r.get(metric + "_se", 0.0)  # noqa: E731
  clear = lambda a, b: a[metric] - se(a) > b[metric] + se(b)  # noqa: E731
  val = lambda r: f"{METHOD_NAMES[r['method']]} {r[metric]:.4f} ± {se(r):.4f}"  # noqa: E731
  ordered = top[metric] > rand[metric] > mlp[metric]
  overlap = [name for name, a, b in (("ILM vs ILM-rand", top, rand), ("ILM-rand vs MLP", rand, mlp))
             if not clear(a, b)]
  if not ordered:
    verdict = "does **not** hold"
  elif overlap:
    verdict = f"holds on the means, but the ±1 std error intervals overlap for {' and '.join(overlap)}"
  else:
    verdict = "holds, with non-overlapping ±1 std error intervals"
  return (f"Ordering ILM > ILM-rand > MLP ({DATASET_NAMES.get(dataset, dataset)} {task}, "
          f"{template} template, {metric.upper()}, {how}): {verdict}: {val(top)}; "
          f"{val(rand)}; {val(mlp)}.")


def language_table(best: dict, datasets: Sequence[str]) -> tuple[list[str], list[dict]]:
  lines = ["| dataset | method | semantic consistency | log-likelihood / token | examples "
           "| run |", "|---|---|---|---|---|---|"]
  shown = []
  for r in best.values():
    if r["task"] == "language" and r["dataset"] in datasets:
      shown.append(r)
  shown.sort(key=lambda r: (datasets.index(r["dataset"]), _method_order(r["method"])))
  for r in shown:
    lines.append(f"| {r['dataset']} | {METHOD_NAMES.get(r['method'], r['method'])} | "
                 f"{r['semantic_consistency']:.3f} ± {r.get('semantic_consistency_se', 0):.3f}"
                 f" | {r['loglik_per_token']:.3f} ± {r.get('loglik_per_token_se', 0):.3f} | "
                 f"{r['users']} | {r['_run_label']} |")
  return lines, shown


def preservation_table(best: dict, datasets: Sequence[str]) -> tuple[list[str], list[dict]]:
  lines = ["| dataset | method | text-only logits == base LLM | max abs diff | tokens | run |",
           "|---|---|---|---|---|---|"]
  shown = sorted((r for r in best.values() if r["task"] == "preservation"
                  and r["dataset"] in datasets),
                 key=lambda r: (datasets.index(r["dataset"]), _method_order(r["method"])))
  for r in shown:
    lines.append(f"| {r['dataset']} | {METHOD_NAMES.get(r['method'], r['method'])} | "
                 f"{'yes (bit-identical)' if r.get('equal') else '**NO**'} | "
                 f"{r.get('max_abs_diff', '')} | {r.get('tokens', '')} | {r['_run_label']} |")
  return lines, shown


def _method_order(method: str) -> int:
  base = method.split("+")[0]
  return results.METHODS.index(base) * 2 + ("+" in method) if base in results.METHODS else 99


# ============================================================================ plots


def _plt():
  try:
    import matplotlib  # noqa: PLC0415
  except ImportError as e:
    raise SystemExit("make_report: matplotlib is needed for the plots; install the test "
                     "extras: .venv/bin/pip install -e '.[test]'") from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def plot_results(records: list[dict], dataset: str, path: pathlib.Path) -> bool:
  """HR@5 and NDCG@10 bars (±1 std error) of one dataset's OpenP5 records."""
  rows = [r for r in records if r["task"] in TASKS]
  if not rows:
    return False
  plt = _plt()
  groups = [(t, tm) for t in TASKS for tm in TEMPLATES
            if any(r["task"] == t and r["template"] == tm for r in rows)]
  methods = sorted({r["method"] for r in rows}, key=_method_order)
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), squeeze=False)
  width = 0.8 / max(1, len(methods))
  for ax, metric in zip(axes[0], ("hr@5", "ndcg@10"), strict=True):
    for j, m in enumerate(methods):
      xs, ys, es = [], [], []
      for g, (t, tm) in enumerate(groups):
        r = next((r for r in rows if (r["task"], r["template"], r["method"]) == (t, tm, m)),
                 None)
        if r is not None:
          xs.append(g + (j - (len(methods) - 1) / 2) * width)
          ys.append(r[metric])
          es.append(r.get(metric + "_se", 0.0))
      ax.bar(xs, ys, width, yerr=es, capsize=2, label=METHOD_NAMES.get(m.split("+")[0], m)
             + (" +retrieval" if "+" in m else ""))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{t}\n{tm}" for t, tm in groups])
    ax.set_ylabel(metric.upper())
    ax.set_title(f"{DATASET_NAMES.get(dataset, dataset)}: {metric.upper()} (test, ±1 s.e.)")
  axes[0][1].legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return True


def plot_curves(curves: dict[str, list[tuple[int, float]]], title: str,
                path: pathlib.Path) -> bool:
  """Training loss vs step, one line per metrics.jsonl (Phase 1, each Phase 2 model)."""
  if not curves:
    return False
  plt = _plt()
  phase1 = {k: v for k, v in curves.items() if not k.startswith("phase2")}
  phase2 = {k: v for k, v in curves.items() if k.startswith("phase2")}
  panels = [(n, c) for n, c in (("Phase 1", phase1), ("Phase 2", phase2)) if c]
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
  for ax, (name, group) in zip(axes[0], panels, strict=True):
    for label, pts in group.items():
      ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{title}: {name}")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return True


# ============================================================================ report


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9_.-]+", "_", text.lower()).strip("_") or "run"


def _shown_path(path: str | pathlib.Path) -> str:
  """``path`` relative to the repository if it is inside it (as a command would name it)."""
  path = pathlib.Path(path).resolve()
  return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)


def make_report(runs: Sequence[str | pathlib.Path], out_dir: str | pathlib.Path,
                notes: str | pathlib.Path = "") -> pathlib.Path:
  """Writes RESULTS.md, results/*.json, the plots and the runs' archive under ``out_dir``.

  ``notes``: a markdown file copied in first (how the runs were made), if given.
  Returns the path of RESULTS.md.
  """
  out_dir = pathlib.Path(out_dir)
  res_dir = out_dir / "results"
  res_dir.mkdir(parents=True, exist_ok=True)
  for run in runs:
    if not pathlib.Path(run).is_dir():
      raise SystemExit(f"make_report: --runs {run}: no such folder")
  run_list = [str(r) for r in archive_runs([pathlib.Path(r) for r in runs], res_dir / "archive")]
  records = load_runs(run_list)
  best = best_records(records)
  for r in best.values():
    r["_run_label"] = _run_label(r, run_list)
  found = sorted({r["dataset"] for r in best.values()})
  datasets = list(MAIN_DATASETS) + [d for d in found if d not in MAIN_DATASETS]
  command = "python scripts/make_report.py --runs " + " ".join(_shown_path(r) for r in run_list)
  if out_dir.resolve() != (REPO / "docs").resolve():
    command += f" --out-dir {_shown_path(out_dir)}"
  if notes:
    command += f" --notes {_shown_path(notes)}"

  md = ["# Results", "",
        f"Generated on {datetime.date.today().isoformat()} by `{command}`, which regenerates "
        "it from the archived copies of the runs (`results/archive/`); do not edit by "
        "hand. Every number is read from the runs' `results.json`; a method without a "
        "record is shown as **missing** (*n/a* where it cannot exist: ILM-IT* on a dataset "
        "without item text). Test split, full ranking over all items minus the "
        "user's history (OpenP5 protocol, SPEC §6); ± is one standard error of the mean over "
        "users. *beam search (10)* = trie-constrained generation (the paper's protocol), "
        "*retrieval head* = one LLM pass scoring every item (beyond the paper). *steps* = "
        "Phase 2 training steps (MF: ALS iterations); *eval wall s* = scoring time of that "
        "row (compilation included); *distinct@10* = how many different items the users' "
        "top-10 lists hold together: one list shown to everyone gives 10 plus the items that "
        "stand in for each user's history items (the popularity row is such a list), a "
        "personal ranking many more; blank for records made before it was counted. "
        "Machine-readable rows: `results/<dataset>.json`.", ""]
  if notes:
    md += ["## How these runs were made", "", pathlib.Path(notes).read_text().strip(), ""]
  md += ["## Runs", "",
        "| run | folder (archived as) | datasets | commands |", "|---|---|---|---|"]
  for i, run in enumerate(run_list, 1):
    rr = [r for r in records if r["_run"] == run]
    cmds = sorted({r["command"] for r in rr if r.get("command")})
    where = f"`{_origin(pathlib.Path(run))}` (`{pathlib.Path(run).name}`)"
    md.append(f"| R{i} | {where} | {', '.join(sorted({r['dataset'] for r in rr})) or '—'} | "
              + ("<br>".join(f"`{c}`" for c in cmds) or "(no command recorded)") + " |")
  md.append("")
  models = [(i, m) for i, run in enumerate(run_list, 1)
            for m in trained_models(pathlib.Path(run))]
  if models:
    md += ["Trained Phase 2 models (each folder's `summary.json`):", "",
           "| run | folder | dataset | method | steps | batch | train s | device | training "
           "examples | T | K | trainable params | command |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, m in models:
      cells = [m.get(k, "") for k in ("dataset", "method", "steps", "batch_size", "train_s",
                                       "device_kind", "examples", "max_len", "soft_tokens",
                                       "trainable_params")]
      cmd = f"`{m['command']}`" if m.get("command") else "(not recorded)"
      md.append(f"| R{i} | `{m['folder']}` | " + " | ".join(str(c) for c in cells)
                + f" | {cmd} |")
    md.append("")

  for d in datasets:
    name = DATASET_NAMES.get(d, d)
    shown: list[dict] = []
    md += [f"## {name}", ""]
    if not any(r["dataset"] == d for r in best.values()):
      md += [f"**missing**: no run in this report evaluated {name} (every method: "
             f"{', '.join(METHOD_NAMES.values())})."]
      for (pd, task), pubs in PUBLISHED.items():
        if pd == d:
          md += ["", f"Published ({task}, SPEC §7): " + "; ".join(
              f"{label} HR@5 {vals[0]:.4f}" + (f", NDCG@5 {vals[1]:.4f}" if vals[1] else "")
              for label, *vals in pubs) + "."]
      md.append("")
      continue
    for task in TASKS:
      for template in TEMPLATES:
        lines, rows = ranking_table(best, d, task, template, run_list)
        shown += rows
        md += [f"### {name} — {task}, {template} template", ""] + lines + [""]
    if _has_item_text(d):
      md += [f"- {ordering_check(best, d, scorer=sc)}" for sc in ("", "retrieval")] + [""]
    extra = [r for r in best.values() if r["dataset"] == d
             and r["task"] not in TASKS and r["split"] == "test"]
    shown += extra
    if shown:
      clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in shown]
      (res_dir / f"{_slug(d)}.json").write_text(json.dumps(clean, indent=1) + "\n")
      png = res_dir / f"results_{_slug(d)}.png"
      if plot_results(shown, d, png):
        md += [f"![{name} results](results/{png.name})", ""]

  lines, _ = language_table(best, datasets)
  md += ["## Language (held-out conversations)", "",
         "Semantic consistency = cosine of MiniLM sentence embeddings of the generated and "
         "the reference answer (greedy decoding); log-likelihood per reference answer token "
         "(teacher forcing). See `ilm_jax/evals/language.py` for how held-out samples are "
         "drawn. Text-only has no soft tokens, so its row is the frozen LLM's own on the "
         "text prompts (its training does not touch generation).", ""]
  md += (lines if len(lines) > 2 else ["**missing**: no language records."]) + [""]
  lines, _ = preservation_table(best, datasets)
  md += ["## Preservation", "", "Text-only prompts through the ILM vs the frozen base LLM.", ""]
  md += (lines if len(lines) > 2 else ["**missing**: no preservation records."]) + [""]

  md += ["## Training curves", ""]
  pngs = set()
  for i, run in enumerate(map(pathlib.Path, run_list), 1):
    png = res_dir / f"training_R{i}_{_slug(run.name)}.png"
    if plot_curves(training_curves(run), f"R{i}", png):
      md += [f"![R{i} training curves](results/{png.name})", ""]
      pngs.add(png)
    elif (run / CURVES_PNG).is_file():  # archived runs live under res_dir
      md += [f"R{i}: the plot made when the run was first reported; its `metrics.jsonl` files "
             "were not archived.", "",
             f"![R{i} training curves]({(run / CURVES_PNG).relative_to(out_dir.resolve())})",
             ""]
      pngs.add(run / CURVES_PNG)
  for stale in set(res_dir.glob("training_R*.png")) - pngs:
    stale.unlink()
  if not pngs:
    md += ["**missing**: no metrics.jsonl in the runs.", ""]
  path = out_dir / "RESULTS.md"
  path.write_text("\n".join(md).rstrip() + "\n")
  return path


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--runs", nargs="+", required=True,
                      help="run folders (workdirs) or their archived copies "
                           "(docs/results/archive/NAME); the order gives the labels R1, R2, ...")
  parser.add_argument("--out-dir", default=str(REPO / "docs"),
                      help="where RESULTS.md and results/ go (default: docs/)")
  parser.add_argument("--notes", default="",
                      help="a markdown file shown first, under 'How these runs were made' "
                           "(hardware, environment, what was not run and why)")
  args = parser.parse_args(argv)
  path = make_report(args.runs, args.out_dir, notes=args.notes)
  print(f"make_report: wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
