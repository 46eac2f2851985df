"""The ``phase2`` job: train the ILM (or a baseline) on the multitask Phase 2 mixture.

Steps: prepared dataset -> leave-one-out split (training sees ``Split.train`` only) ->
frozen LLM + tokenizer -> the model (``models.ilm.build_ilm``: Phase 1 Q-Former, ILM-rand,
MLP or text-only; CF tables from the Phase 1 dir) -> prompts with K placeholders per slot
(``data.phase2``) -> Grain batches -> ``train.train`` (answer-token LM loss + retrieval
head, ``ilm_jax.phase2``) in ``WORKDIR/phase2/<method>`` (checkpoints, resume, metrics) ->
the trained state where ``models.ilm.load_trained`` finds it, and ``summary.json``.

The OpenP5 evaluation (beam search and retrieval head on the test split) is the eval job's;
this job only runs the cheap retrieval-head validation hook (``config.eval``).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from ilm_jax import partition, phase2, train
from ilm_jax.data import phase2 as data_phase2
from ilm_jax.data import pipeline, sources, types
from ilm_jax.evals import results
from ilm_jax.jobs import prepare
from ilm_jax.models import ilm as ilm_lib


def examples_for(config: ml_collections.ConfigDict, ds: types.RecDataset, split: types.Split,
                 encoder: data_phase2.PromptEncoder) -> tuple[dict[str, np.ndarray], int]:
  """The encoded Phase 2 training mixture (``data.phase2.train_samples``) and drops."""
  pc = config.prompts
  samples = data_phase2.train_samples(
      ds, split, seed=int(pc.seed), examples_per_user=int(pc.examples_per_user),
      weights=pc.weights.to_dict(), max_history=int(pc.max_history),
      user_soft_tokens=bool(pc.user_soft_tokens))
  return data_phase2.encode_examples(samples, encoder)


def prompt_encoder(config: ml_collections.ConfigDict, tokenizer, ds: types.RecDataset,
                   model: ilm_lib.ILM) -> data_phase2.PromptEncoder:
  """The PromptEncoder matching ``model`` (K placeholders per slot; 0 for text-only)."""
  pc = config.prompts
  return data_phase2.PromptEncoder(
      tokenizer, ds, soft_tokens=model.num_soft_tokens,
      user_soft_tokens=bool(pc.user_soft_tokens), max_len=int(pc.max_len),
      max_slots=int(pc.max_slots))


def training_loss(config: ml_collections.ConfigDict, examples: Mapping[str, np.ndarray]
                  ) -> functools.partial:
  """``phase2.phase2_loss`` with the config's retrieval and LM-loss settings; answer
  positions per row = ``config.loss.max_answer_tokens`` (-1: the longest in ``examples``)."""
  max_answer = int(config.loss.max_answer_tokens)
  if max_answer < 0:
    max_answer = phase2.max_answer_tokens(examples)
  return functools.partial(
      phase2.phase2_loss, retrieval_weight=float(config.retrieval.weight),
      candidates=str(config.retrieval.candidates),
      num_negatives=int(config.retrieval.num_negatives), max_answer_tokens=max_answer,
      label_smoothing=float(config.loss.label_smoothing),
      retrieval_detach=bool(config.retrieval.detach))


def run(config: ml_collections.ConfigDict, workdir: str,
        on_step: Callable[[int, Mapping[str, Any]], None] | None = None) -> dict[str, Any]:
  """Trains and saves one Phase 2 model; returns the summary written.

  Args:
    config: ``configs/phase2.py``.
    workdir: the run folder shared with the earlier stages (data, cf, Phase 1).
    on_step: test hook passed to ``train.train``.
  """
  wall0 = time.perf_counter()
  # ---- data and model ----
  ds = sources.ensure_tokens(
      prepare.prepared_dataset(config.data, workdir, prepare.data_dir(config, workdir)))
  split = types.leave_one_out(ds)
  llm_model, tokenizer = ilm_lib.load_llm(config.llm)
  model = ilm_lib.build_ilm(config, workdir, ds, llm_model)
  meta = ilm_lib.build_meta(config, workdir, model)
  method = meta["method"]
  outdir = ilm_lib.output_dir(workdir, method)
  encoder = prompt_encoder(config, tokenizer, ds, model)
  examples, dropped = examples_for(config, ds, split, encoder)
  n = len(examples["input_ids"])
  loss_fn = training_loss(config, examples)
  max_answer = loss_fn.keywords["max_answer_tokens"]
  bc = config.batching
  batching = (f"batches cut to multiples of {bc.pad_multiple}" if bc.pad_multiple
              else "batches padded to T")
  if bc.group_by_length:
    batching += f", rows grouped by length in windows of {bc.group_by_length} batches"
  print(f"phase2: {ds.name} {method}: {n} training examples ({dropped} too long, dropped), "
        f"T={encoder.max_len} (mean length "
        f"{data_phase2.example_lengths(examples).mean() if n else 0:.0f}; {batching}), "
        f"K={model.num_soft_tokens}, answer tokens <= {max_answer}; "
        f"LLM {llm_model.config.layers} layers x {llm_model.config.dim}", flush=True)
  data = pipeline.to_iterator(data_phase2.phase2_dataset(
      examples, global_batch=int(config.batch_size), seed=int(config.prompts.seed),
      group_by_length=int(config.batching.group_by_length),
      pad_multiple=int(config.batching.pad_multiple)))
  padded: list[int] = []  # each step's batch length (T after the padding cut)

  def count_step(step: int, batch: Mapping[str, Any]) -> None:
    padded.append(int(batch["input_ids"].shape[1]))
    if on_step is not None:
      on_step(step, batch)

  evaluator = None
  if int(config.eval.max_users) > 0:
    evaluator = phase2.RetrievalValidation(
        ds, split, encoder, max_users=int(config.eval.max_users),
        batch_size=int(config.eval.batch_size), max_history=int(config.prompts.max_history),
        seed=int(config.eval.seed))

  # ---- train (resumes from WORKDIR/phase2/<method>/checkpoints) ----
  t0 = time.perf_counter()
  result = train.train(config.train, outdir, model_fn=lambda: model, losses={"phase2": loss_fn},
                       data=data, mesh=partition.make_mesh(), eval_fn=evaluator,
                       on_step=count_step)
  train_s = time.perf_counter() - t0
  if result.stopped_by_signal:
    print(f"phase2: stopped by a signal at step {result.step}; rerun to resume", flush=True)
    return {}

  # ---- outputs ----
  ilm_lib.save_trained(outdir, result.model(), meta, tuple(config.train.frozen))
  counts = partition.param_counts(result.trainable, result.frozen)
  # Steady-state rate: the loop's last logged window (excludes compilation when
  # log_every < total_steps).
  rates = [json.loads(line).get("steps_per_sec") for line in
           (outdir / "metrics.jsonl").read_text().splitlines() if "steps_per_sec" in line]
  steps_per_s = float(rates[-1]) if rates else 0.0
  # This process's steps (a resumed run counts from the restart).
  mean_len = float(np.mean(padded)) if padded else float(encoder.max_len)
  summary = dict(
      dataset=ds.name, method=method, variant=config.variant, steps=int(result.step),
      train_s=round(train_s, 1), examples=n, dropped=dropped, batch_size=int(config.batch_size),
      max_len=encoder.max_len, soft_tokens=model.num_soft_tokens,
      trainable_params=counts["trainable"], frozen_values=counts["frozen"],
      stopped_by_time=result.stopped_by_time,
      steps_per_s=round(steps_per_s, 4), mean_batch_len=round(mean_len, 1),
      padded_tokens_per_s=round(steps_per_s * int(config.batch_size) * mean_len, 1),
      devices=len(jax.devices()), device_kind=jax.devices()[0].device_kind,
      command=results.command_line(),
      **{k: float(v) for k, v in result.eval_metrics.items()})
  (outdir / "summary.json").write_text(json.dumps(summary, indent=1))
  logging.info("phase2 summary: %s", summary)
  metrics = {k: v for k, v in summary.items() if k.startswith("valid_retrieval_hr")}
  print(f"phase2: {method} trained {result.step} steps in {train_s:.1f}s "
        f"(last window {summary['padded_tokens_per_s']:.0f} padded tokens/s); "
        f"{counts['trainable']:,} trainable params; {metrics}; wrote {outdir} "
        f"({time.perf_counter() - wall0:.1f}s)", flush=True)
  return summary
