"""The ``eval`` job: every trained Phase 2 model in a workdir, evaluated (SPEC §6).

Steps: prepared dataset -> leave-one-out split -> the trained models under
``WORKDIR/phase2/<method>`` (``models.ilm.load_trained``; one frozen LLM shared by all) ->
per model: preservation check (text-only logits == the base LLM's), OpenP5 ranking per
task x template with trie-constrained beam search (method ``<m>``) and the retrieval head
(``<m>+retrieval``) on the same fixed users (``evals.openp5``), language metrics on
held-out conversations (``evals.language``) -> each record merged into
``WORKDIR/results.json`` as soon as it exists -> the table on stdout.

Every record carries, besides SPEC §8's fields: std errors (``hr@5_se`` ...), ``wall_s``
(scoring time), ``users_per_s``, ``steps`` / ``train_s`` (from the model's
``summary.json``), ``subsample`` / ``seed`` (the user sample) and ``command`` (the command
line that produced it). MF records come from the cf job, not from here.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import ml_collections

from ilm_jax.data import phase2 as data_phase2
from ilm_jax.data import prompts as P
from ilm_jax.data import sources, types
from ilm_jax.evals import language, openp5, results
from ilm_jax.jobs import prepare
from ilm_jax.models import ilm as ilm_lib


class PreservationError(AssertionError):
  """A Phase 2 model changed the base LLM's logits on a text-only prompt."""


def csv_choices(value: str, valid: tuple[str, ...], key: str) -> list[str]:
  """The comma-separated choices in ``value``; ValueError naming ``config.<key>`` and the
  valid ones when one is unknown."""
  out = [v.strip() for v in str(value).split(",") if v.strip()]
  bad = [v for v in out if v not in valid]
  if bad:
    raise ValueError(f"config.{key}={value!r}: unknown {bad}; valid: {', '.join(valid)}")
  return out


def trained_models(workdir: str | pathlib.Path, methods: list[str]) -> dict[str, pathlib.Path]:
  """{method: folder with ilm.json} under WORKDIR/phase2, in a stable order.

  Raises:
    FileNotFoundError: a requested method has no trained model (names what is there).
  """
  root = pathlib.Path(workdir) / ilm_lib.PHASE2_DIR
  found = {}
  for meta in sorted(root.glob(f"*/{ilm_lib.META_FILE}")) if root.exists() else []:
    name = json.loads(meta.read_text()).get("method") or meta.parent.name
    found[name] = meta.parent
  if methods:
    missing = [m for m in methods if m not in found]
    if missing:
      raise FileNotFoundError(f"no trained Phase 2 model for {missing} under {root} "
                              f"(found: {sorted(found) or 'none'}); run the phase2 job first")
    return {m: found[m] for m in methods}
  order = {m: i for i, m in enumerate(results.METHODS)}
  return dict(sorted(found.items(), key=lambda kv: order.get(kv[0], len(order))))


def _summary(folder: pathlib.Path) -> dict[str, Any]:
  path = folder / "summary.json"
  return json.loads(path.read_text()) if path.exists() else {}


class Llms:
  """One frozen LLM (and tokenizer) per distinct ``ilm.json`` LLM section."""

  def __init__(self):
    self._cache: dict[str, tuple] = {}

  def get(self, folder: pathlib.Path):
    meta = json.loads((folder / ilm_lib.META_FILE).read_text())
    key = json.dumps(meta["llm"], sort_keys=True)
    if key not in self._cache:
      self._cache[key] = ilm_lib.load_llm(ml_collections.ConfigDict(meta["llm"]))
    return self._cache[key]


def eval_data(config: ml_collections.ConfigDict, workdir: str
              ) -> tuple[types.RecDataset, types.Split]:
  """The prepared dataset of ``config.data`` (item tokens ensured) and its leave-one-out split."""
  ds = sources.ensure_tokens(
      prepare.prepared_dataset(config.data, workdir, prepare.data_dir(config, workdir)))
  return ds, types.leave_one_out(ds)


def load_model(folder: pathlib.Path, ds: types.RecDataset, llms: Llms,
               prompts_config: ml_collections.ConfigDict
               ) -> tuple[ilm_lib.ILM, data_phase2.PromptEncoder]:
  """A trained Phase 2 model (its frozen LLM from ``llms``) and the PromptEncoder its
  prompts need (K from the model; user slots, T and S from ``prompts_config``)."""
  llm_model, tok = llms.get(folder)
  model = ilm_lib.load_trained(folder, None, ds, llm_model)
  pc = prompts_config
  encoder = data_phase2.PromptEncoder(
      tok, ds, soft_tokens=model.num_soft_tokens, user_soft_tokens=bool(pc.user_soft_tokens),
      max_len=int(pc.max_len), max_slots=int(pc.max_slots))
  return model, encoder


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
  """Evaluates every requested trained model; returns the records written."""
  wall0 = time.perf_counter()
  tasks = csv_choices(config.tasks, P.OPENP5_TASKS, "tasks")
  templates = csv_choices(config.templates, ("seen", "unseen"), "templates")
  scorers = csv_choices(config.scorers, openp5.SCORERS, "scorers")
  lang_tasks = csv_choices(config.language.tasks, language.TASKS, "language.tasks")
  which = config.split
  if which not in results.SPLITS:
    raise ValueError(f"config.split={which!r}; valid: {', '.join(results.SPLITS)}")
  ds, split = eval_data(config, workdir)
  models = trained_models(workdir, csv_choices(config.methods, results.METHODS, "methods"))
  if not models:
    print(f"eval: no trained Phase 2 model under {pathlib.Path(workdir) / 'phase2'}; "
          "nothing to evaluate (run the phase2 job first)", flush=True)
    return []
  users = openp5.eval_users(ds.num_users, int(config.max_users), int(config.seed))
  print(f"eval: {ds.name} {ds.stats()}; {which} split, {len(users)} users"
        f"{' (seeded subsample)' if len(users) < ds.num_users else ''}; models: "
        f"{', '.join(models)}", flush=True)
  pc = config.prompts
  cmd = results.command_line()
  llms = Llms()
  tries: dict[tuple, Any] = {}
  written: list[dict[str, Any]] = []
  failures: list[str] = []

  def log(line: str) -> None:
    print(line, flush=True)

  def emit(rec: dict[str, Any], extras: dict[str, Any]) -> None:
    rec = {**rec, **extras}
    results.write_results(workdir, [rec])
    written.append(rec)

  for method, folder in models.items():
    t_load = time.perf_counter()
    model, encoder = load_model(folder, ds, llms, pc)
    tok = encoder.tokenizer
    summ = _summary(folder)
    extras = dict(steps=summ.get("steps"), train_s=summ.get("train_s"), seed=int(config.seed),
                  command=cmd, model_dir=str(folder))
    extras = {k: v for k, v in extras.items() if v is not None}
    log(f"eval: {method} from {folder} (K={model.num_soft_tokens}, "
        f"{summ.get('steps', '?')} steps; loaded in {time.perf_counter() - t_load:.1f}s)")

    if config.preservation:
      p = language.preservation(model, tok)
      emit(dict(dataset=ds.name, split=which, task="preservation", template="seen",
                method=method, users=p["prompts"], **p), extras)
      passed = p.get("passed", p["equal"])
      verdict = "exact" if p["equal"] else "within tolerance" if passed else "DIFFERS"
      log(f"eval: {method} preservation: {verdict} "
          f"(max |logit diff| {p['max_abs_diff']:.3g} over {p['tokens']} tokens)")
      if not passed:
        failures.append(f"{method}: max |logit diff| {p['max_abs_diff']}")

    if "generation" in scorers:
      key = (id(tok), encoder.end_id)
      if key not in tries:
        tries[key] = openp5.item_trie(ds, encoder)
    item_keys = None
    if "retrieval" in scorers:
      t_keys = time.perf_counter()
      item_keys = openp5.retrieval_item_keys(model)
      log(f"eval: {method} retrieval item keys in {time.perf_counter() - t_keys:.1f}s")
    for task in tasks:
      for template in templates:
        prompts = openp5.build_prompts(ds, split, which, task, template, encoder, users,
                                       max_history=int(pc.max_history))
        for scorer in scorers:
          rec = openp5.evaluate(
              model, ds, split, encoder, method=method, which=which, task=task,
              template=template, scorer=scorer, batch_size=int(config.batch_size),
              beam_size=int(config.beam_size), trie=tries.get((id(tok), encoder.end_id)),
              prompts=prompts, item_keys=item_keys,
              progress_every_s=float(config.progress_every_s), log=log)
          emit(rec, extras)
          log(f"eval: {rec['method']} {task}/{template}: HR@5 {rec['hr@5']:.4f}"
              f"±{rec['hr@5_se']:.4f} NDCG@10 {rec['ndcg@10']:.4f} distinct@10 "
              f"{rec['distinct@10']} ({rec['users']} users, {rec['users_per_s']:.2f} users/s)")

    if int(config.language.count) > 0:
      rec, rows = language.evaluate(
          model, ds, split, encoder, method=method, count=int(config.language.count),
          tasks=lang_tasks, max_new_tokens=int(config.language.max_new_tokens),
          batch_size=int(config.language.batch_size), seed=int(config.language.seed), log=log)
      if rec is not None:
        emit(rec, extras)
        out = pathlib.Path(workdir) / "eval" / method
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "language_samples.jsonl", "w", encoding="utf-8") as f:
          for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

  ranking_recs = [r for r in written if r["task"] in P.OPENP5_TASKS]
  print(results.format_table(ranking_recs, extras=["users_per_s", "wall_s"]), flush=True)
  lang = [r for r in written if r["task"] == "language"]
  for r in lang:
    print(f"language {r['method']}: semantic consistency {r['semantic_consistency']:.3f}"
          f"±{r['semantic_consistency_se']:.3f}, log-likelihood/token "
          f"{r['loglik_per_token']:.3f}±{r['loglik_per_token_se']:.3f} ({r['users']} examples)")
  print(f"eval: wrote {len(written)} records to {pathlib.Path(workdir) / results.FILENAME} "
        f"({time.perf_counter() - wall0:.1f}s)", flush=True)
  if failures:
    raise PreservationError("text-only logits differ from the base LLM's: " + "; ".join(failures))
  return written
