"""results.json records: schema validation, merge-by-key, atomic writes, table."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from ilm_jax.evals import results


def _rec(**kw):
  r = {"dataset": "ml1m", "split": "test", "task": "straightforward", "template": "seen",
       "method": "mf", "users": 10, "hr@5": 0.1, "ndcg@5": 0.05, "hr@10": 0.2, "ndcg@10": 0.08}
  r.update(kw)
  return r


def test_write_merge_and_read(tmp_path):
  results.write_results(tmp_path, [_rec(), _rec(split="valid")])
  out = results.write_results(tmp_path, [_rec(**{"hr@5": 0.3, "hr@5_se": np.float32(0.01)}),
                                         _rec(method="ilm-it-ii+retrieval")])
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk == out and len(on_disk) == 3
  test_mf = [r for r in on_disk if r["method"] == "mf" and r["split"] == "test"]
  assert len(test_mf) == 1 and test_mf[0]["hr@5"] == 0.3
  assert test_mf[0]["hr@5_se"] == pytest.approx(0.01)
  assert results.read_results(tmp_path) == on_disk
  assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("bad, match", [
    (dict(method="MF"), "method"),
    (dict(method="bpr"), "method"),
    (dict(method="ilm-it+"), "method"),
    (dict(task="seq"), "task"),
    (dict(template="held-out"), "template"),
    (dict(split="train"), "split"),
    (dict(dataset="ML1M"), "dataset"),
    (dict(users=0), "users"),
    (dict(**{"hr@5": 1.5}), "hr@5"),
    (dict(**{"ndcg@10": float("nan")}), "ndcg@10"),
    (dict(**{"Wall_s": 3.0}), "lower case"),
])
def test_bad_records_rejected(tmp_path, bad, match):
  with pytest.raises(results.ResultsError, match=match):
    results.write_results(tmp_path, [_rec(**bad)])
  assert not (tmp_path / "results.json").exists()


def test_missing_field_rejected():
  r = _rec()
  del r["ndcg@5"]
  with pytest.raises(results.ResultsError, match="ndcg@5"):
    results.validate_record(r)


def test_corrupt_file_named(tmp_path):
  (tmp_path / "results.json").write_text("[{")
  with pytest.raises(results.ResultsError, match="results.json"):
    results.write_results(tmp_path, [_rec()])


def test_concurrent_writers_keep_all_records(tmp_path):
  def write(i):
    results.write_results(tmp_path, [_rec(dataset=f"d{i}")])
  threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert sorted(r["dataset"] for r in results.read_results(tmp_path)) == [f"d{i}" for i in range(8)]


def test_format_table():
  table = results.format_table([_rec(**{"hr@5_se": 0.002, "train_s": 1.25})], extras=["train_s"])
  lines = table.splitlines()
  assert lines[0].split() == ["dataset", "split", "task", "template", "method", "users", "hr@5",
                              "ndcg@5", "hr@10", "ndcg@10", "train_s"]
  assert "0.1000±0.0020" in lines[2] and "1.25" in lines[2]
  assert len(results.format_table([]).splitlines()) == 2
