"""The eval job end to end on a saved (untrained) tiny Phase 2 model: records, names,
subsample, preservation failure, missing models."""

from __future__ import annotations

import json
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from flax import nnx

from ilm_jax import config_lib, resources
from ilm_jax.cf import mf
from ilm_jax.data import sources
from ilm_jax.evals import language, openp5, results
from ilm_jax.jobs import evaluate, prepare
from ilm_jax.models import adaptors
from ilm_jax.models import ilm as ilm_lib


def _get_config(arg):
  return config_lib.load_config_file(resources.REPO_ROOT / "configs" / "eval.py", arg)


def test_config_args():
  c = _get_config("ml1m,sequential,unseen,retrieval,ilm-it-ii,nolanguage")
  assert (c.data.name, c.tasks, c.templates, c.scorers, c.methods) == (
      "ml1m", "sequential", "unseen", "retrieval", "ilm-it-ii")
  assert c.language.count == 0 and c.max_users == 0 and c.prompts.max_history == 20
  c = _get_config("tiny")
  assert c.tasks == "sequential,straightforward" and c.scorers == "generation,retrieval"
  assert c.max_users == 16 and c.methods == ""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir with a prepared tiny catalogue and one saved MLP Phase 2 model."""
  try:
    resources.smollm2_gguf()
  except resources.MissingResourceError as e:
    pytest.skip(str(e))
  wd = tmp_path_factory.mktemp("evalrun")
  c = _get_config("tiny")
  ds = sources.ensure_tokens(prepare.prepared_dataset(c.data, wd, prepare.data_dir(c, wd)))
  rng = np.random.default_rng(0)
  items = rng.normal(size=(ds.num_items, 8)).astype(np.float32)
  users = rng.normal(size=(ds.num_users, 8)).astype(np.float32)
  cf = mf.save_embeddings(wd / "cf" / "embeddings.npz", users, items, ds.user_ids,
                          ds.item_ids, {"dataset": ds.name})
  llm_cfg = dict(source="", tiny=True, dtype="float32", seed=0)
  base, _ = ilm_lib.load_llm(ml_collections.ConfigDict(llm_cfg))
  enc = adaptors.MlpAdaptor(8, 16, 2, base.config.dim, rngs=nnx.Rngs(2))
  model = ilm_lib.ILM(base, enc, items, users, retrieval_dim=16, rngs=nnx.Rngs(0))
  meta = dict(variant="mlp", seed=0, retrieval_dim=16, llm=llm_cfg, frozen=["^llm/"],
              mlp_hidden=16, mlp_tokens=2, method="mlp", cf_path=str(cf))
  out = ilm_lib.save_trained(ilm_lib.output_dir(wd, "mlp"), model, meta, ("^llm/",))
  (out / "summary.json").write_text(json.dumps({"steps": 7, "train_s": 1.5}))
  return wd


def test_eval_job_writes_records(workdir):
  c = _get_config("tiny,sequential")
  with c.unlocked():
    c.max_users = 5
    c.batch_size = 4
    c.language.count = 1
    c.language.tasks = "attributes"
    c.language.max_new_tokens = 4
  written = evaluate.run(c, str(workdir))
  recs = results.read_results(workdir)
  by = {(r["task"], r["template"], r["method"]): r for r in recs}
  for template in ("seen", "unseen"):
    for method in ("mlp", "mlp+retrieval"):
      r = by[("sequential", template, method)]
      assert r["users"] == 5 and r["subsample"] and r["split"] == "test"
      assert r["steps"] == 7 and r["train_s"] == 1.5 and "command" in r
      assert 0 <= r["hr@5"] <= r["hr@10"] <= 1 and "hr@5_se" in r
  assert by[("preservation", "seen", "mlp")]["equal"] is True
  lang = by[("language", "seen", "mlp")]
  assert lang["users"] == 1 and lang["loglik_per_token"] < 0
  rows = (workdir / "eval" / "mlp" / "language_samples.jsonl").read_text().splitlines()
  assert len(rows) == 1 and json.loads(rows[0])["task"] == "attributes"
  assert {r["method"] for r in written} == {"mlp", "mlp+retrieval"}
  assert not any(r["task"] == "straightforward" for r in recs)


def test_language_only(workdir):
  """Empty tasks and scorers (configs/eval.py's docstring): only the language record."""
  c = _get_config("tiny")
  with c.unlocked():
    c.tasks = c.scorers = ""
    c.preservation = False
    c.language.update(dict(count=1, tasks="attributes", max_new_tokens=2))
  written = evaluate.run(c, str(workdir))
  assert [(r["task"], r["method"], r["users"]) for r in written] == [("language", "mlp", 1)]


def test_preservation_failure_fails_the_job(workdir, monkeypatch):
  monkeypatch.setattr(language, "preservation", lambda model, tok: {
      "prompts": 1, "tokens": 3, "max_abs_diff": 0.5, "equal": False})
  c = _get_config("tiny,nolanguage")
  with c.unlocked():
    c.scorers = ""
  with pytest.raises(evaluate.PreservationError, match="mlp"):
    evaluate.run(c, str(workdir))
  rec = [r for r in results.read_results(workdir) if r["task"] == "preservation"]
  assert rec and rec[0]["equal"] is False


def test_missing_models(workdir, tmp_path):
  c = _get_config("tiny,ilm-it-ii")
  with pytest.raises(FileNotFoundError, match=r"ilm-it-ii.*found: \['mlp'\]"):
    evaluate.run(c, str(workdir))
  assert evaluate.trained_models(tmp_path, []) == {}


def test_generation_probe_ranks_among_candidates(workdir, tmp_path):
  script = resources.REPO_ROOT / "benchmarks" / "generation_probe.py"
  config = f"{resources.REPO_ROOT / 'configs' / 'eval.py'}:tiny,sequential,seen"
  out = tmp_path / "probe.json"
  cmd = [sys.executable, str(script), f"--workdir={workdir}", f"--config={config}",
         "--set", "max_users=5", "--candidates=4", "--batch=2", f"--out={out}"]
  text = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
  rows = json.loads(out.read_text())["rows"]
  assert [(r["method"], r["scorer"]) for r in rows] == [
      ("popularity", "train counts"), ("mlp", "generation"), ("mlp", "retrieval")]
  ds, split = evaluate.eval_data(_get_config("tiny"), str(workdir))
  counts = np.bincount(np.concatenate(split.train), minlength=ds.num_items)
  users = openp5.eval_users(ds.num_users, 5, 0)
  pop = []
  for u in users:  # the probe's candidates, ranked by hand (ties count above)
    hist, target = np.asarray(split.history("test")[u], np.int64), int(split.test[u])
    pool = np.setdiff1d(np.arange(ds.num_items), np.append(hist, target))
    c = np.append(np.random.default_rng([0, int(u)]).choice(pool, 3, False), target)
    pop.append(int((counts[c] >= counts[target]).sum()))
  assert rows[0]["mean_rank"] == pytest.approx(np.mean(pop))
  for r in rows:
    assert r["users"] == 5 and r["candidates"] == 4 and r["chance_mean_rank"] == 2.5
    assert 1 <= r["mean_rank"] <= 4 and r["hr@1"] <= r["hr@5"] == r["hr@10"] == 1.0
  assert "chance with 4 candidates: HR@1 0.250" in text
  bad = subprocess.run(cmd[:3] + ["--set", "no_such_key=1"], capture_output=True, text=True,
                       timeout=600)
  assert bad.returncode != 0 and "no key 'no_such_key'" in bad.stderr


def test_answer_nats_reads_an_item_answer_run(workdir, tmp_path):
  script = resources.REPO_ROOT / "benchmarks" / "answer_nats.py"
  run = tmp_path / "phase2" / "ilm-it"
  run.mkdir(parents=True)
  (run / "summary.json").write_text(json.dumps({"batch_size": 2}))

  def write_metrics(retrieval_rows):
    steps = [dict(step=s, kind="phase2", loss_lm=1.5 if s < 3 else 1.0, tokens=6.0,
                  acc=0.5, retrieval_rows=retrieval_rows(s)) for s in range(1, 6)]
    lines = [json.dumps(r) for r in steps] + [json.dumps({"step": 5, "steps_per_sec": 2.0})]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")

  c = _get_config("tiny")
  data_dir = prepare.data_dir(c, workdir)
  out = tmp_path / "nats.json"
  cmd = [sys.executable, str(script), f"--run={run}",
         f"--config={resources.REPO_ROOT / 'configs' / 'eval.py'}:tiny",
         "--set", f"data_dir={data_dir}", "--windows=1,3", f"--out={out}"]
  write_metrics(lambda s: 2.0)
  text = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
  got = json.loads(out.read_text())
  # loss per answer token x 6 answer tokens / 2 rows = nats per answer.
  assert [(w["from"], w["to"], w["steps"]) for w in got["windows"]] == [(1, 2, 2), (3, 5, 3)]
  assert [w["nats"] for w in got["windows"]] == pytest.approx([4.5, 3.0])
  assert got["windows"][0]["tokens_per_answer"] == 3.0
  ds, split = evaluate.eval_data(c, str(workdir))
  targets = np.concatenate([np.asarray(s[1:]) for s in split.train])
  p = np.unique(targets, return_counts=True)[1] / len(targets)
  assert got["references"]["uniform"] == pytest.approx(np.log(ds.num_items))
  assert got["references"]["popularity"] == pytest.approx(-(p * np.log(p)).sum())
  assert got["references"]["popularity"] < got["references"]["uniform"]
  assert "uniform" in text and "popularity" in text
  write_metrics(lambda s: 1.0 if s == 4 else 2.0)  # a row with no item target
  bad = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0 and "step 4 (and 0 more) had rows without an item target" in bad.stderr
  lines = [json.dumps(dict(step=1, kind="phase2", loss_lm=1.0, tokens=6.0, acc=0.5))]
  (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")  # retrieval.weight=0 logs no rows
  bad = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0 and "logs no retrieval_rows" in bad.stderr
