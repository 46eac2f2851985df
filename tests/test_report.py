"""scripts/make_report.py on fake run folders: tables, missing runs, JSON rows, plots."""

from __future__ import annotations

import importlib.util
import json

import pytest

from ilm_jax import resources
from ilm_jax.evals import results

pytest.importorskip("matplotlib")


def _report_module():
  spec = importlib.util.spec_from_file_location(
      "make_report", resources.REPO_ROOT / "scripts" / "make_report.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _rec(method, hr5, users=100, task="sequential", template="seen", dataset="ml1m", **kw):
  return dict(dataset=dataset, split="test", task=task, template=template, method=method,
              users=users, **{"hr@5": hr5, "ndcg@5": hr5 / 2, "hr@10": hr5 * 1.5,
                              "ndcg@10": hr5 / 1.5, "hr@5_se": 0.01}, **kw)


@pytest.fixture
def runs(tmp_path):
  a, b = tmp_path / "run_a", tmp_path / "run_b"
  results.write_results(a, [
      _rec("ilm-it-ii", 0.30, steps=2000, wall_s=12.5, command="python -m ilm_jax.main x"),
      _rec("ilm-it-ii+retrieval", 0.25, steps=2000, **{"distinct@10": 37}),
      _rec("ilm-rand", 0.20), _rec("mlp", 0.10),
      _rec("mf", 0.05, task="straightforward", iters=10,
           **{"popularity_hr@5": 0.02, "popularity_hr@5_se": 0.004, "popularity_ndcg@5": 0.01,
              "popularity_hr@10": 0.03, "popularity_ndcg@10": 0.015,
              "popularity_distinct@10": 11}),
      dict(dataset="ml1m", split="test", task="language", template="seen", method="mlp",
           users=20, semantic_consistency=0.61, semantic_consistency_se=0.02,
           loglik_per_token=-2.5, loglik_per_token_se=0.1),
      dict(dataset="ml1m", split="test", task="preservation", template="seen",
           method="mlp", users=4, equal=True, max_abs_diff=0.0, tokens=90)])
  (a / "phase2" / "mlp").mkdir(parents=True)
  (a / "phase2" / "mlp" / "metrics.jsonl").write_text(
      "\n".join(json.dumps({"step": s, "loss": 5.0 / s}) for s in range(1, 6))
      + '\n{"step": 5, "steps_per_sec": 1.0}\n')
  (a / "phase2" / "mlp" / "summary.json").write_text(json.dumps(
      {"dataset": "ml1m", "method": "mlp", "steps": 2000, "batch_size": 8, "train_s": 99.5,
       "examples": 60400, "max_len": 320, "soft_tokens": 4, "trainable_params": 1234,
       "device_kind": "NVIDIA H200", "command": "python -m ilm_jax.main --config=p2"}))
  # A second run with a larger evaluation of the same key replaces the first.
  results.write_results(b, [_rec("mlp", 0.12, users=500),
                            _rec("ilm-rand", 0.6, users=50, dataset="beauty")])
  return [a, b]


def test_report_tables_missing_and_json(runs, tmp_path):
  mod = _report_module()
  out = tmp_path / "docs"
  notes = tmp_path / "notes.md"
  notes.write_text("Ran on **one GPU**; Beauty was not run.\n")
  md = mod.make_report(runs, out, notes=notes).read_text()
  assert "## How these runs were made\n\nRan on **one GPU**; Beauty was not run." in md
  # Present numbers with std errors; the larger MLP evaluation (run 2) wins.
  assert "| ILM-IT-II | beam search (10) | 0.3000 ± 0.0100 | 0.1500 |" in md
  assert "| ILM-IT-II | retrieval head | 0.2500 ± 0.0100 |" in md
  assert "| MLP | beam search (10) | 0.1200 ± 0.0100 |" in md and "| 500 |" in md
  assert "0.1000 ± 0.0100" not in md.split("## Beauty")[0]
  # Missing methods and datasets are said to be missing, not invented.
  assert "| ILM-IT | — | **missing** (not run) |" in md
  assert "| text-only | — | **missing** (not run) |" in md
  assert "**missing**: no run in this report evaluated Clothing" in md
  # Published numbers beside ours; the ordering check reads the records.
  assert "| *published: OpenP5 random ids (T5-small)* | | 0.1098 | 0.0734 | 0.1575 | 0.0888" in md
  assert ("Ordering ILM > ILM-rand > MLP (ML1M sequential, seen template, HR@5, beam search):"
          " holds, with non-overlapping") in md
  assert "| MF | dot product | 0.0500 ± 0.0100 |" in md
  # The popularity baseline from the MF record: one row in each of ML1M's four tables.
  pop_row = ("| *popularity (train counts)* | — | 0.0200 ± 0.0040 | 0.0100 | 0.0300 | 0.0150 "
             "| 11 | 100 | | | R1 |")
  assert md.split("## Beauty")[0].count(pop_row) == 4
  # distinct@10 where the record counts it, blank where it does not.
  assert "| ILM-IT-II | retrieval head | 0.2500 ± 0.0100 | 0.1250 | 0.3750 | 0.1667 | 37 | 100 |" in md
  assert "| ILM-rand | beam search (10) | 0.2000 ± 0.0100 | 0.1000 | 0.3000 | 0.1333 |  | 100 |" in md
  # Every row of a ranking table has the header's number of cells.
  for table in md.split("\n| method | scorer |")[1:]:
    rows = ("| method | scorer |" + table).split("\n\n")[0].splitlines()
    assert {r.count("|") for r in rows} == {12}, rows
  assert "`python -m ilm_jax.main x`" in md
  assert ("| R1 | `phase2/mlp` | ml1m | mlp | 2000 | 8 | 99.5 | NVIDIA H200 | 60400 | 320 | 4 "
          "| 1234 | `python -m ilm_jax.main --config=p2` |") in md
  # The retrieval head gets its own ordering line; run_a has no ILM-rand/MLP retrieval rows.
  assert ("Ordering ILM > ILM-rand > MLP (ML1M sequential, seen, HR@5, retrieval head): "
          "**not evaluated** -- records present for ilm-it-ii of") in md
  assert "| ml1m | MLP | 0.610 ± 0.020 | -2.500 ± 0.100 | 20 |" in md
  assert "| ml1m | MLP | yes (bit-identical) |" in md
  rows = json.loads((out / "results" / "ml1m.json").read_text())
  keys = {(r["task"], r["method"], r["users"]) for r in rows}
  assert ("sequential", "mlp", 500) in keys and ("sequential", "mlp", 100) not in keys
  assert ("language", "mlp", 20) in keys and ("straightforward", "mf", 100) in keys
  for r in rows:
    results.validate_record(r)
    assert not any(k.startswith("_") for k in r)
  assert json.loads((out / "results" / "beauty.json").read_text())[0]["hr@5"] == 0.6
  for png in ("results_ml1m.png", "results_beauty.png", "training_R1_run_a.png"):
    assert (out / "results" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "![R1 training curves](results/training_R1_run_a.png)" in md
  assert not (out / "results" / "training_R2_run_b.png").exists()


def test_ordering_check_reports_failure_and_missing():
  mod = _report_module()
  best = {("ml1m", "test", "sequential", "seen", r["method"]): r for r in
          [_rec("ilm-it", 0.1), _rec("ilm-rand", 0.2), _rec("mlp", 0.05)]}
  assert "does **not** hold" in mod.ordering_check(best)
  del best[("ml1m", "test", "sequential", "seen", "mlp")]
  assert "**not evaluated**" in mod.ordering_check(best)
  retrieval = {("ml1m", "test", "sequential", "seen", r["method"]): r for r in
               [_rec("ilm-it-ii+retrieval", 0.3), _rec("ilm-rand+retrieval", 0.2),
                _rec("mlp+retrieval", 0.1), _rec("mlp", 0.9)]}
  line = mod.ordering_check(retrieval, scorer="retrieval")
  assert "retrieval head): holds, with non-overlapping" in line and "ILM-IT-II 0.3000" in line
  # The best ILM variant stands for ILM; the line names the pair whose intervals overlap.
  retrieval[("ml1m", "test", "sequential", "seen", "mlp+retrieval")] = _rec("mlp+retrieval", 0.19)
  retrieval.update({("ml1m", "test", "sequential", "seen", "ilm-it+retrieval"):
                    _rec("ilm-it+retrieval", 0.5)})
  line = mod.ordering_check(retrieval, scorer="retrieval")
  assert "overlap for ILM-rand vs MLP: ILM-IT 0.5000" in line, line


def test_main_rejects_missing_folder(tmp_path):
  mod = _report_module()
  with pytest.raises(SystemExit, match="no such folder"):
    mod.main(["--runs", str(tmp_path / "nope"), "--out-dir", str(tmp_path)])


def test_archive_regenerates_the_report(runs, tmp_path):
  """The report archives its runs' small files; the archive alone regenerates the tables."""
  mod = _report_module()
  out = tmp_path / "docs"
  (runs[0] / "phase2" / "mlp" / "checkpoints").mkdir()
  (runs[0] / "phase2" / "mlp" / "checkpoints" / "big.bin").write_bytes(b"0" * 1000)
  first = mod.make_report(runs, out).read_text()
  arch = out / "results" / "archive"
  a = arch / "run_a"
  assert sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()) == [
      "archive.json", "phase2/mlp/metrics.jsonl", "phase2/mlp/summary.json", "results.json"]
  assert json.loads((a / "archive.json").read_text())["origin"] == str(runs[0].resolve())
  # The header's command names the archived copies; the Runs table still the origin.
  assert f"--runs {arch.resolve() / 'run_a'} {arch.resolve() / 'run_b'} --out-dir {out}" in first
  assert f"| R1 | `{runs[0].resolve()}` (`run_a`) |" in first
  for run in runs:  # the run folders go away, as they do with the machines that held them
    for p in sorted(run.rglob("*"), reverse=True):
      p.unlink() if p.is_file() else p.rmdir()
    run.rmdir()
  again = mod.make_report([arch / "run_a", arch / "run_b"], out).read_text()
  body = lambda md: md.split("\n", 3)[3]  # noqa: E731  (after the dated header line)
  assert body(again) == body(first)
  assert (out / "results" / "training_R1_run_a.png").exists()


def test_archive_keeps_a_lost_runs_plot_and_refuses_name_clashes(runs, tmp_path):
  mod = _report_module()
  out = tmp_path / "docs"
  (runs[1] / "training_curves.png").write_bytes(b"\x89PNG\r\n\x1a\nold plot")
  (out / "results").mkdir(parents=True)
  (out / "results" / "training_R9_gone.png").write_bytes(b"stale")
  md = mod.make_report(runs, out).read_text()
  assert "R2: the plot made when the run was first reported" in md
  assert "![R2 training curves](results/archive/run_b/training_curves.png)" in md
  assert (out / "results" / "archive" / "run_b" / "training_curves.png").read_bytes().endswith(
      b"old plot")
  assert not (out / "results" / "training_R9_gone.png").exists()
  other = tmp_path / "elsewhere" / "run_a"
  results.write_results(other, [_rec("mlp", 0.1)])
  for clash in ([runs[0], other], [other, out / "results" / "archive" / "run_a"]):
    with pytest.raises(SystemExit, match="which holds the copy of"):
      mod.make_report(clash, out)


def test_training_curves_one_line_per_batch_kind(tmp_path):
  mod = _report_module()
  (tmp_path / "p1").mkdir()
  (tmp_path / "p1" / "metrics.jsonl").write_text("\n".join(json.dumps(
      {"step": s, "kind": "item_text" if s % 2 else "item_item", "loss": 9.0 if s % 2 else 1.0})
      for s in range(1, 7)) + "\n")
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "kind": "phase2", "loss": 5.0}\n')
  assert mod.training_curves(tmp_path) == {
      "phase1": [(1, 5.0)], "p1 item_text": [(1, 9.0), (3, 9.0), (5, 9.0)],
      "p1 item_item": [(2, 1.0), (4, 1.0), (6, 1.0)]}


def test_clothing_ilm_it_rows_say_why_they_cannot_exist(tmp_path):
  # Clothing has no item text, so no Phase 1: its ILM-IT* rows are not "not run" but n/a.
  mod = _report_module()
  run = tmp_path / "run"
  results.write_results(run, [_rec("ilm-rand", 0.02, dataset="clothing"),
                              _rec("mlp", 0.03, dataset="beauty")])
  md = mod.make_report([run], tmp_path / "docs").read_text()
  clothing = md.split("\n## Clothing\n")[1]
  for name in ("ILM-IT", "ILM-IT-II", "ILM-IT-UI"):
    assert f"| {name} | — | n/a: the dataset has no item text, so no Phase 1 |" in clothing
  assert "| MLP | — | **missing** (not run) |" in clothing
  # Beauty has item text: its ILM-IT rows are runs not made.
  beauty = md.split("\n## Beauty\n")[1].split("\n## Clothing\n")[0]
  assert "| ILM-IT | — | **missing** (not run) |" in beauty
  # The paper's ordering is checked on every dataset where ILM can exist, not on Clothing.
  assert ("Ordering ILM > ILM-rand > MLP (Beauty sequential, seen, HR@5, beam search): "
          "**not evaluated** -- records present for mlp of") in beauty
  assert "Ordering" not in clothing
