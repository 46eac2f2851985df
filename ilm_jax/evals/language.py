"""Language evaluation of a Phase 2 model (SPEC §6): conversations and preservation.

* ``semantic_consistency``: the model answers held-out conversational prompts (describe
  an item, its genres/categories, compare two items, summarise a taste, recommend with a
  reason) greedily; the score is the cosine between the MiniLM sentence embeddings
  (all-MiniLM-L6-v2, ``models.minilm``) of the generated answer and of the reference
  answer, averaged over examples (± standard error).
* ``reference_loglik``: mean log-likelihood per answer token of the reference answers
  under the model (teacher forcing, the same label positions the training loss uses).
* ``preservation``: on text-only prompts (no slots) the model's logits must equal the
  frozen base LLM's exactly -- adding item tokens must not change the LLM.

Held-out conversations (``heldout_samples``): the same generators as training
(``data.phase2.conversational_samples``) applied to each user's *validation and test*
items instead of their train sequence, with another seed: describe/attributes use the
validation item, compare the (validation, test) pair, reason recommends the test item
after the validation item, taste summarises both. These (user, item) pairs never appear in
the training mixture; an item's own text may (when it is in someone's train history), so
``describe`` measures recall of trained facts as much as generalisation.

The model has the ILM interface (``models.ilm.ILM``): ``llm``, ``prompt_embeds`` and
``__call__(input_ids, attn_mask, slot_ids, slot_kind, slot_pos) -> (logits, hidden)``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ilm_jax import generation
from ilm_jax.data import phase2
from ilm_jax.data import prompts as P
from ilm_jax.data.types import RecDataset, Split

TASKS = ("describe", "attributes", "compare", "taste", "reason")


# ============================================================================ samples


def heldout_samples(ds: RecDataset, split: Split, *, count: int, tasks: Sequence[str] = TASKS,
                    seed: int = 1234) -> list[P.Sample]:
  """``count`` held-out conversational samples per task (module docstring); [] without text.

  Args:
    ds, split: dataset and its leave-one-out split.
    count: samples per task.
    tasks: conversational task names (``prompts.CONVERSATIONAL_TASKS``).
    seed: sampling seed (keep it different from the training seed).
  """
  bad = [t for t in tasks if t not in P.CONVERSATIONAL_TASKS]
  if bad:
    raise ValueError(f"language tasks {bad}; valid: {', '.join(P.CONVERSATIONAL_TASKS)}")
  if count <= 0 or not phase2.has_conversational_data(ds):
    return []
  # The generators read ``split.train`` only; give them each user's (valid, test) items.
  held = dataclasses.replace(split, train=[np.array([v, t], np.int32) for v, t in
                                           zip(split.valid, split.test, strict=True)])
  out: list[P.Sample] = []
  for task in tasks:
    out += phase2.conversational_samples(ds, held, task, count, seed=seed)
  return out


def reference_text(sample: P.Sample) -> str:
  """The last assistant turn's text (conversation answers have no slots)."""
  turn = sample.turns[-1]
  if turn.role != "assistant":
    raise ValueError(f"{sample.task} sample does not end with an answer")
  return "".join(p for p in turn.content if isinstance(p, str)).strip()


# ============================================================================ model calls


def _rows(n: int, batch_size: int):
  for start in range(0, n, batch_size):
    rows = np.arange(start, min(n, start + batch_size))
    m = len(rows)
    yield np.concatenate([rows, np.full(batch_size - m, rows[0])]), m


_KEYS = ("input_ids", "attn_mask", "slot_ids", "slot_kind", "slot_pos")


@functools.partial(jax.jit, static_argnums=0)
def _answer_logprob(graphdef, state, input_ids, attn_mask, slot_ids, slot_kind, slot_pos,
                    loss_mask):
  model = nnx.merge(graphdef, state)
  logits, _ = model(input_ids, attn_mask, slot_ids, slot_kind, slot_pos)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  lp = jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
  mask = loss_mask[:, 1:]
  return jnp.sum(jnp.where(mask, lp, 0.0), axis=1), jnp.sum(mask, axis=1)


@functools.partial(jax.jit, static_argnums=0)
def _embeds(graphdef, state, input_ids, slot_ids, slot_kind, slot_pos):
  return nnx.merge(graphdef, state).prompt_embeds(input_ids, slot_ids, slot_kind, slot_pos)


def reference_loglik(model: nnx.Module, samples: Sequence[P.Sample],
                     encoder: phase2.PromptEncoder, *, batch_size: int = 4
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Log-likelihood of each sample's answer tokens (teacher forcing).

  Returns:
    (sum of answer-token log-probs float64[R], answer tokens int[R]) for the R samples
    that fit the encoder (the rest are dropped, as in training).
  """
  ex, _ = phase2.encode_examples(list(samples), encoder)
  n = len(ex["input_ids"])
  if n == 0:
    return np.zeros(0), np.zeros(0, np.int64)
  ex = phase2.cut_padding(ex, phase2.example_lengths(ex))
  graphdef, state = nnx.split(model)
  lp_sum, count = np.zeros(n), np.zeros(n, np.int64)
  for rows, m in _rows(n, min(batch_size, n)):
    args = [jnp.asarray(ex[k][rows]) for k in _KEYS + ("loss_mask",)]
    s, c = _answer_logprob(graphdef, state, *args)
    lp_sum[rows[:m]] = np.asarray(s)[:m]
    count[rows[:m]] = np.asarray(c)[:m]
  return lp_sum, count


def generate_answers(model: nnx.Module, samples: Sequence[P.Sample],
                     encoder: phase2.PromptEncoder, *, max_new_tokens: int = 64,
                     batch_size: int = 8) -> list[str]:
  """Greedy answers to each sample's prompt (the conversation without its last answer)."""
  if not samples:
    return []
  arrays = phase2.encode_prompts(list(samples), encoder)
  arrays = phase2.cut_padding(arrays, arrays["prompt_len"])
  tok = encoder.tokenizer
  stop_ids = tuple(dict.fromkeys(tuple(tok.stop_ids) + tuple(model.llm.config.eos_ids)))
  graphdef, state = nnx.split(model)
  n = len(samples)
  out: list[str] = [""] * n
  for rows, m in _rows(n, min(batch_size, n)):
    x = {k: jnp.asarray(arrays[k][rows]) for k in _KEYS}
    emb = _embeds(graphdef, state, x["input_ids"], x["slot_ids"], x["slot_kind"], x["slot_pos"])
    res = generation.generate(model.llm, input_embeds=emb, mask=x["attn_mask"],
                              max_new_tokens=max_new_tokens, stop_ids=stop_ids,
                              pad_id=int(tok.pad_id))
    toks, lens = np.asarray(res.tokens), np.asarray(res.lengths)
    for j in range(m):
      ids = [int(i) for i in toks[j, :lens[j]] if int(i) not in stop_ids]
      out[rows[j]] = tok.decode(ids, skip_special_tokens=True).strip()
  return out


def _mean_se(v: np.ndarray) -> tuple[float, float]:
  v = np.asarray(v, np.float64)
  if len(v) == 0:
    return float("nan"), float("nan")
  se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0
  return float(v.mean()), se


def evaluate(model: nnx.Module, ds: RecDataset, split: Split, encoder: phase2.PromptEncoder, *,
             method: str, count: int = 16, tasks: Sequence[str] = TASKS,
             max_new_tokens: int = 64, batch_size: int = 8, seed: int = 1234,
             embed_fn: Callable[[Sequence[str]], np.ndarray] | None = None,
             log: Callable[[str], None] | None = None
             ) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
  """Semantic consistency and reference log-likelihood on held-out conversations.

  Args:
    model: the Phase 2 model.
    ds, split: dataset and split.
    encoder: the model's PromptEncoder.
    method: results method name.
    count: held-out samples per task.
    tasks: conversational tasks.
    max_new_tokens: generation budget per answer.
    batch_size: rows per call.
    seed: held-out sampling seed.
    embed_fn: texts -> float[N, E] L2-normalised sentence embeddings (default MiniLM).
    log: printer (default print).

  Returns:
    (the results record (task 'language') or None when the dataset has no item text,
    per-example rows {task, prompt, reference, generated, cosine, loglik, tokens}).
  """
  log = log or (lambda s: print(s, flush=True))
  samples = heldout_samples(ds, split, count=count, tasks=tasks, seed=seed)
  if not samples:
    log(f"language {ds.name} {method}: no item text; skipped")
    return None, []
  if embed_fn is None:
    from ilm_jax.models import minilm  # noqa: PLC0415
    embed_fn = minilm.sentence_embed
  t0 = time.perf_counter()
  # Samples whose prompt does not fit are dropped for both metrics alike.
  fits = [s for s in samples if encoder.render(s) is not None]
  if not fits:
    log(f"language {ds.name} {method}: none of {len(samples)} held-out samples fits "
        f"max_len={encoder.max_len}; skipped")
    return None, []
  refs = [reference_text(s) for s in fits]
  gens = generate_answers(model, fits, encoder, max_new_tokens=max_new_tokens,
                          batch_size=batch_size)
  emb_g, emb_r = np.asarray(embed_fn(gens)), np.asarray(embed_fn(refs))
  cos = np.sum(emb_g * emb_r, axis=1)
  lp_sum, count_tok = reference_loglik(model, fits, encoder, batch_size=max(1, batch_size // 2))
  wall = time.perf_counter() - t0
  per_ex = lp_sum / np.maximum(count_tok, 1)
  sc, sc_se = _mean_se(cos)
  _, ll_se = _mean_se(per_ex)
  rec: dict[str, Any] = dict(
      dataset=ds.name, split="test", task="language", template="seen", method=method,
      users=len(fits), semantic_consistency=sc, semantic_consistency_se=sc_se,
      loglik_per_token=float(lp_sum.sum() / max(count_tok.sum(), 1)), loglik_per_token_se=ll_se,
      answer_tokens=int(count_tok.sum()), max_new_tokens=max_new_tokens,
      dropped=len(samples) - len(fits), wall_s=round(wall, 2))
  tasks_of = np.array([s.task for s in fits])
  for task in tasks:
    sel = tasks_of == task
    if sel.any():
      rec[f"semantic_consistency_{task}"] = float(cos[sel].mean())
      rec[f"loglik_per_token_{task}"] = float(lp_sum[sel].sum() / max(count_tok[sel].sum(), 1))
  rows = [dict(task=s.task, prompt=P.render_text(s, item_tokens=ds.item_tokens),
               reference=r, generated=g, cosine=float(c), loglik=float(lp), tokens=int(n))
          for s, r, g, c, lp, n in zip(fits, refs, gens, cos, lp_sum, count_tok, strict=True)]
  log(f"language {ds.name} {method}: {len(fits)} examples, semantic consistency {sc:.3f}"
      f"±{sc_se:.3f}, log-lik/token {rec['loglik_per_token']:.3f} ({wall:.0f}s)")
  return rec, rows


# ============================================================================ preservation


PRESERVATION_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a recommender system does in one sentence.",
    "List three fruits that are red.",
)


@functools.partial(jax.jit, static_argnums=0)
def _both_logits(graphdef, state, tokens, mask):
  model = nnx.merge(graphdef, state)
  b = tokens.shape[0]
  empty = jnp.full((b, 1), -1, jnp.int32)
  ilm_logits, _ = model(tokens, mask, jnp.zeros((b, 1), jnp.int32), empty, empty)
  base_logits, _, _ = model.llm(tokens=tokens, mask=mask)
  return ilm_logits, base_logits


def preservation(model: nnx.Module, tokenizer, prompts: Sequence[str] = PRESERVATION_PROMPTS
                 ) -> dict[str, Any]:
  """Compares the model's logits on text-only chat prompts with the base LLM's.

  Args:
    model: the Phase 2 model (its ``llm`` is the frozen base).
    tokenizer: the LLM tokenizer (chat template).
    prompts: user messages.

  Returns:
    {'prompts', 'tokens', 'max_abs_diff', 'equal', 'backend', 'passed'}: ``equal`` is True
    iff every logit at every real position is bit-identical; ``passed`` is the verdict
    (``preservation_passed``).
  """
  ids = [tokenizer.encode_chat([{"role": "user", "content": p}], add_generation_prompt=True)
         for p in prompts]
  tokens, mask = generation.pad_prompts(ids, int(tokenizer.pad_id), side="right")
  graphdef, state = nnx.split(model)
  backend = jax.default_backend()
  # Accelerators run f32 matmuls at reduced precision by default (TF32 on NVIDIA GPUs);
  # the two graphs fuse differently, so that noise would swamp the comparison.
  with jax.default_matmul_precision("highest" if backend != "cpu" else None):
    a, b = _both_logits(graphdef, state, jnp.asarray(tokens), jnp.asarray(mask))
  a, b = np.asarray(a)[mask], np.asarray(b)[mask]
  diff = float(np.max(np.abs(a - b)))
  equal = bool(np.array_equal(a, b))
  return {"prompts": len(prompts), "tokens": int(mask.sum()), "max_abs_diff": diff,
          "equal": equal, "backend": backend,
          "passed": preservation_passed(equal, diff, float(np.max(np.abs(b))), backend)}


# Accelerators: allowed max |logit diff| relative to the largest |base logit|.
PRESERVATION_RTOL = 1e-4


def preservation_passed(equal: bool, max_abs_diff: float, logit_scale: float,
                        backend: str) -> bool:
  """The preservation verdict: bit-identical on CPU (where XLA's f32 arithmetic is
  reproducible across the two graphs, and the tests hold it to that); on GPU/TPU, equal up
  to float reassociation (``PRESERVATION_RTOL`` x the largest |logit|), because the ILM's
  graph (embeddings + splice) and the base LLM's fuse differently there. Measured on an
  H200 at default (TF32) matmul precision: max |diff| 0.111, hence the highest precision
  for this check; an ILM that changed the LLM would differ by far more.
  """
  if backend == "cpu":
    return equal
  return equal or max_abs_diff <= PRESERVATION_RTOL * max(logit_scale, 1.0)
