"""Phase 2 loss (SPEC §5) and a cheap retrieval-head validation hook.

``phase2_loss`` follows ``steps.LossFn`` (``(model, batch, rng) -> (loss, metrics)``) on
``data.phase2`` batches (``input_ids, attn_mask, loss_mask, slot_*, target_item, task``):

  loss = loss_lm + retrieval_weight * loss_retrieval

* ``loss_lm``: next-token CE on answer tokens only. ``loss_mask`` marks label positions,
  so hidden state t predicts ``input_ids[t + 1]`` where ``loss_mask[t + 1]``. The V-wide
  LM head runs only on the (at most ``max_answer_tokens``) answer positions of a row, not
  on all T: on SmolLM2 the head is ~20% of a full-sequence step.
* ``loss_retrieval``: on recommendation rows (OpenP5 sequential / straightforward), CE of
  the target item under ``ILM.retrieval_scores`` of the hidden state at the last prompt
  position (the one that predicts the first answer token -- at evaluation the last token
  of the generation prompt, ``prompt_len - 1``). Candidates 'full' = every item (the
  item encoder runs on the whole catalogue each step; gradients reach it through both
  the soft tokens and the item keys) or 'batch' = the batch's targets plus
  ``num_negatives`` uniformly sampled items (sampled softmax; repeats of a row's target
  are masked as false negatives). On CPU 'full' costs: the Q-Former's pass over 1000
  items is ~half the FLOPs of SmolLM2 on a batch of 8 x 128 tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ilm_jax import losses
from ilm_jax.data import prompts as P
from ilm_jax.models import ilm as ilm_lib

REC_TASKS = tuple(P.TASK_ID[t] for t in P.OPENP5_TASKS)
CANDIDATES = ("full", "batch")


def answer_positions(label_mask: jax.Array, max_tokens: int) -> tuple[jax.Array, jax.Array]:
  """The first ``max_tokens`` True columns of each row, in order.

  Example: label_mask [[F, T, F, T]], max_tokens 3 -> idx [[1, 3, 0]], valid [[T, T, F]].

  Args:
    label_mask: bool[B, L].
    max_tokens: A (static).

  Returns:
    (idx int32[B, A], valid bool[B, A]).
  """
  order = jnp.argsort(~label_mask, axis=1, stable=True)[:, :max_tokens]
  valid = jnp.take_along_axis(label_mask, order, axis=1)
  return jnp.where(valid, order, 0).astype(jnp.int32), valid


def last_prompt_positions(loss_mask: jax.Array) -> jax.Array:
  """int32[B]: the position before each row's first answer token (0 if none)."""
  first = jnp.argmax(loss_mask, axis=1)
  return jnp.maximum(first - 1, 0).astype(jnp.int32)


def phase2_loss(model: ilm_lib.ILM, batch: Mapping[str, jax.Array], rng: jax.Array, *,
                retrieval_weight: float = 1.0, candidates: str = "full",
                num_negatives: int = 0, max_answer_tokens: int = 0,
                label_smoothing: float = 0.0, retrieval_detach: bool = False
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Answer-token LM loss + retrieval-head CE (module docstring).

  Args:
    model: the ILM.
    batch: ``data.phase2`` example arrays with a leading batch dim.
    rng: PRNG key (sampled negatives of 'batch').
    retrieval_weight: 0 = no retrieval loss (the head then does not train).
    candidates: 'full' or 'batch'.
    num_negatives: 'batch' only: this many uniformly sampled items join the batch's
      targets as candidates (0 = pure in-batch softmax).
    max_answer_tokens: A answer positions per row get logits; 0 = all T - 1. Rows with
      more answer tokens lose the rest (counted in ``answer_tokens_cut``).
    label_smoothing: of the LM loss.
    retrieval_detach: the retrieval loss trains only the head (its projections and
      temperature, text-only's item table): none of its gradient reaches the item encoder,
      through the item keys or through the LLM's hidden state, so the soft tokens are shaped
      by the LM loss alone.

  Returns:
    (loss, metrics {'loss_lm', 'loss_retrieval', 'acc', 'tokens', 'retrieval_acc',
    'answer_tokens_cut'}).
  """
  if candidates not in CANDIDATES:
    raise ValueError(f"candidates={candidates!r}; valid: {CANDIDATES}")
  ids, loss_mask = batch["input_ids"], batch["loss_mask"]
  _, hidden = model(ids, batch["attn_mask"], batch["slot_ids"], batch["slot_kind"],
                    batch["slot_pos"], compute_logits=False)

  # ---- LM loss on answer tokens (labels shifted by one) ----
  h, targets, label_mask = hidden[:, :-1], ids[:, 1:], loss_mask[:, 1:]
  a = int(max_answer_tokens) or h.shape[1]
  a = min(a, h.shape[1])
  idx, valid = answer_positions(label_mask, a)
  h_sel = jnp.take_along_axis(h, idx[..., None], axis=1)
  t_sel = jnp.take_along_axis(targets, idx, axis=1)
  logits = model.llm.logits(h_sel)                                   # [B, A, V]
  loss_lm, m_lm = losses.masked_lm_loss(logits, t_sel, valid, label_smoothing)
  cut = label_mask.sum() - valid.sum()
  metrics = {"loss_lm": loss_lm, "acc": m_lm["acc"], "tokens": m_lm["tokens"],
             "answer_tokens_cut": cut.astype(jnp.float32)}
  if not retrieval_weight:
    return loss_lm, metrics

  # ---- retrieval head on recommendation rows ----
  rec = jnp.isin(batch["task"], jnp.asarray(REC_TASKS)) & (batch["target_item"] >= 0)
  h_last = ilm_lib.last_prompt_hidden(hidden, last_prompt_positions(loss_mask))
  if retrieval_detach:
    h_last = jax.lax.stop_gradient(h_last)
  target = jnp.maximum(batch["target_item"], 0)
  if candidates == "full":
    keys = model.retrieval_item_keys(detach=retrieval_detach)        # [N, R]
    scores = model.retrieval_scores(h_last, item_keys=keys)           # [B, N]
    labels = target
  else:
    b = target.shape[0]
    cands = target
    cand_ok = rec
    if num_negatives:
      extra = jax.random.randint(rng, (num_negatives,), 0, model.num_items, jnp.int32)
      cands = jnp.concatenate([target, extra])
      cand_ok = jnp.concatenate([rec, jnp.ones((num_negatives,), bool)])
    keys = model.retrieval_item_keys(items=cands, detach=retrieval_detach)  # [C, R]
    scores = model.retrieval_scores(h_last, item_keys=keys)           # [B, C]
    labels = jnp.arange(b)
    # Columns other than my own that hold my target (repeats, sampled negatives), and
    # non-recommendation rows' columns, are not negatives.
    own = jnp.arange(cands.shape[0])[None, :] == labels[:, None]
    dup = (cands[None, :] == target[:, None]) & ~own
    scores = jnp.where(dup | ~cand_ok[None, :], -1e30, scores)
  logp = jax.nn.log_softmax(scores.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
  w = rec.astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  loss_ret = (nll * w).sum() / n
  acc = ((scores.argmax(-1) == labels) * w).sum() / n
  metrics |= {"loss_retrieval": loss_ret, "retrieval_acc": acc, "retrieval_rows": w.sum()}
  return loss_lm + retrieval_weight * loss_ret, metrics


def max_answer_tokens(examples: Mapping[str, np.ndarray], multiple: int = 8) -> int:
  """The longest answer (label positions) of any example, rounded up to ``multiple``:
  ``phase2_loss(max_answer_tokens=...)`` then cuts nothing."""
  longest = int(np.asarray(examples["loss_mask"])[:, 1:].sum(axis=1).max(initial=1))
  return -(-longest // multiple) * multiple


# ==== Validation: retrieval head on held-out targets =====================================

@jax.jit
def _retrieval_scores(graphdef, state, batch):
  model = nnx.merge(graphdef, state)
  _, hidden = model(batch["input_ids"], batch["attn_mask"], batch["slot_ids"],
                    batch["slot_kind"], batch["slot_pos"], compute_logits=False)
  h_last = ilm_lib.last_prompt_hidden(hidden, batch["prompt_len"] - 1)
  return model.retrieval_scores(h_last)


def retrieval_score_fn(model: ilm_lib.ILM, prompts: Mapping[str, np.ndarray],
                       users: np.ndarray):
  """A ``evals.ranking.rank_users`` score function from encoded eval prompts.

  Args:
    model: the ILM.
    prompts: ``data.phase2.encode_prompts`` arrays, row i = ``users[i]``'s prompt.
    users: int[M] the users of those rows.

  Returns:
    ``score_fn(int32[B] users) -> float32[B, N]``.
  """
  graphdef, state = nnx.split(model)
  row_of = {int(u): i for i, u in enumerate(users)}
  keys = ("input_ids", "attn_mask", "slot_ids", "slot_kind", "slot_pos", "prompt_len")

  def score_fn(batch_users: jax.Array) -> jax.Array:
    rows = np.asarray([row_of.get(int(u), 0) for u in np.asarray(batch_users)])
    return _retrieval_scores(graphdef, state,
                             {k: jnp.asarray(np.asarray(prompts[k])[rows]) for k in keys})

  return score_fn


class RetrievalValidation:
  """``train`` eval hook: retrieval-head HR/NDCG@5,10 on validation targets (seen template).

  A fixed, seeded user subsample keeps it cheap; the full OpenP5 evaluation (generation
  and retrieval, test split) is the eval job's.
  """

  def __init__(self, ds, split, encoder, *, task: str = "sequential", max_users: int = 64,
               batch_size: int = 16, max_history: int = 20, seed: int = 0):
    from ilm_jax.data import phase2 as data_phase2  # noqa: PLC0415
    rng = np.random.default_rng(seed)
    users = np.arange(ds.num_users)
    if 0 < max_users < len(users):
      users = np.sort(rng.choice(users, max_users, replace=False))
    self.users = users
    samples = data_phase2.eval_samples(ds, split, "valid", task, "seen", users=users.tolist(),
                                       max_history=max_history,
                                       user_soft_tokens=encoder.user_soft_tokens)
    prompts = data_phase2.encode_prompts(samples, encoder)
    self.prompts = data_phase2.cut_padding(prompts, prompts["prompt_len"])
    self.split, self.num_items = split, ds.num_items
    self.batch_size = batch_size

  def __call__(self, model: ilm_lib.ILM, step: int) -> dict[str, Any]:
    from ilm_jax.evals import ranking  # noqa: PLC0415
    del step
    out = ranking.evaluate_scores(retrieval_score_fn(model, self.prompts, self.users),
                                  self.split, "valid", self.num_items, users=self.users,
                                  batch_size=self.batch_size)
    return {f"valid_retrieval_{k}": v for k, v in out.items()}
