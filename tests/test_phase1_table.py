"""benchmarks/phase1_table.py: mean ± standard error over seeds, against numpy."""

import json
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
import phase1_table  # noqa: E402


def test_mean_se_matches_numpy():
  vals = [0.185, 0.838, 0.5]
  mean, se = phase1_table.mean_se(vals)
  assert mean == pytest.approx(np.mean(vals))
  assert se == pytest.approx(np.std(vals, ddof=1) / np.sqrt(3))
  assert np.isnan(phase1_table.mean_se([0.3])[1])


def test_table_averages_matching_workdirs(tmp_path, capsys):
  for seed, p in enumerate((0.2, 0.6)):
    d = tmp_path / f"gen_it_s{seed}"
    d.mkdir()
    recs = [{"task": "straightforward", "method": "mf"},
            {"task": "phase1", "cluster_p@10": p, "train_s": 10.0 + seed,
             "untrained_cluster_p@10": 0.9 + 0.02 * seed}]
    (d / "results.json").write_text(json.dumps(recs))
  (tmp_path / "gen_it_s9").mkdir()  # unfinished run: no results.json, ignored
  phase1_table.main([f"IT={tmp_path}/gen_it_s*", "--metrics=cluster_p@10"])
  out = capsys.readouterr().out.splitlines()
  assert [ln for ln in out if ln.startswith("| IT |")] == ["| IT | 2 | 0.400 ± 0.200 | 10/11 |"]
  assert [ln for ln in out if ln.startswith("| IT, untrained init |")] == [
      "| IT, untrained init | 2 | 0.910 ± 0.010 | – |"]
