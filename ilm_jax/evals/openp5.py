"""OpenP5 ranking evaluation of a Phase 2 model (SPEC §6): beam search and retrieval head.

Two scorers over the same prompts (``data.phase2.eval_samples`` rendered by a
``PromptEncoder``: the seen or unseen test template of the sequential or straightforward
task, soft tokens spliced into the LLM's input embeddings):

* ``rank_generation``: OpenP5's protocol. Trie-constrained beam search (beam 10) over the
  tokenised target strings "{dataset} item_{id}" (+ the end-of-turn id the answers were
  trained with); per user the trie allows every item except the user's history, so a
  beam can never name a history item or a string that is not an item. The K finished
  beams, best first, are the ranked list (``ranking.ranks_from_lists``).
* ``rank_retrieval``: the retrieval head. One LLM pass over the prompt; the final hidden
  state at the last prompt position scores every item (``model.retrieval_scores``); full
  ranking with the history excluded (``ranking.rank_users``).

Both return per-user ranks; ``ranking.summarize`` turns them into HR/NDCG@5/10 with
standard errors. ``evaluate`` runs one (task, template, scorer) and returns a results
record (SPEC §8) with timing extras.

A diagnostic beside them, never a reported metric (``benchmarks/generation_probe.py``):
``rank_candidates`` ranks each target among a few sampled candidates
(``sample_candidates``) by its exact generation log-prob or by the retrieval head. It shows
whether generation is learning before the target reaches beam 10's top 10.

The model is anything with the Phase 2 ILM interface (``ilm_jax.models.ilm.ILM``):
``llm`` (an ``llm.Llm``), ``prompt_embeds(input_ids, slot_ids, slot_kind, slot_pos)`` ->
float32[B, T, D] and ``retrieval_scores(hidden_last float32[B, D])`` -> float32[B, N].

Batches have static shapes: every batch holds ``batch_size`` users (the last one is padded
with copies of its first row, whose outputs are dropped) and every prompt is padded to one
length per evaluation, so each scorer compiles once.
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
from ilm_jax.data.types import RecDataset, Split
from ilm_jax.evals import ranking

BEAM_SIZE = 10
SCORERS = ("generation", "retrieval")


# ============================================================================ prompts


def eval_users(num_users: int, max_users: int = 0, seed: int = 0) -> np.ndarray:
  """Users to evaluate: all (``max_users`` 0 or >= U), else a fixed seeded sorted sample.

  The same (U, max_users, seed) always gives the same users, so every method is scored on
  the same subsample.
  """
  if not max_users or max_users >= num_users:
    return np.arange(num_users)
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(num_users, max_users, replace=False))


@dataclasses.dataclass(frozen=True)
class Prompts:
  """Encoded eval prompts of one (split, task, template), one row per user.

  Attributes:
    arrays: ``phase2.encode_prompts`` output cut to a common length T (a multiple of 32):
      input_ids int32[U, T], attn_mask bool[U, T], slot_* int32[U, S], prompt_len ...
    users: int[U] dense user indices, row order.
    targets: int32[U] target items.
    histories: U arrays: each user's history (excluded from the candidates).
  """
  arrays: dict[str, np.ndarray]
  users: np.ndarray
  targets: np.ndarray
  histories: list[np.ndarray]


def build_prompts(ds: RecDataset, split: Split, which: str, task: str, template: str,
                  encoder: phase2.PromptEncoder, users: Sequence[int] | None = None,
                  max_history: int = phase2.MAX_HISTORY) -> Prompts:
  """Renders and encodes one eval prompt per user (``phase2.eval_samples``).

  Args:
    ds, split: the dataset and its leave-one-out split.
    which: 'valid' or 'test' (targets and histories from ``split``).
    task: 'sequential' or 'straightforward'.
    template: 'seen' or 'unseen'.
    encoder: the PromptEncoder the model was trained with (K, user slots, T).
    users: dense user indices (default: all).
    max_history: the most recent history items shown (OpenP5: 20; truncated further
      when the prompt does not fit the encoder's T / S).

  Returns:
    Prompts.
  """
  users = np.arange(ds.num_users) if users is None else np.asarray(users, np.int64)
  samples = phase2.eval_samples(ds, split, which, task, template, users=users.tolist(),
                                max_history=max_history,
                                user_soft_tokens=encoder.user_soft_tokens)
  arrays = phase2.encode_prompts(samples, encoder)
  arrays = phase2.cut_padding(arrays, arrays["prompt_len"])
  hist = split.history(which)
  return Prompts(arrays=arrays, users=users,
                 targets=np.asarray(split.targets(which), np.int32)[users],
                 histories=[np.asarray(hist[u]) for u in users])


def _batches(n: int, batch_size: int):
  """(rows int[batch_size] padded with the batch's first row, number of real rows)."""
  for start in range(0, n, batch_size):
    rows = np.arange(start, min(n, start + batch_size))
    m = len(rows)
    if m < batch_size:
      rows = np.concatenate([rows, np.full(batch_size - m, rows[0])])
    yield rows, m


class Progress:
  """Prints users done, users/s and ETA at most every ``every_s`` seconds (and at the end)."""

  def __init__(self, total: int, label: str, every_s: float = 10.0,
               out: Callable[[str], None] | None = None):
    self.total, self.label, self.every_s = total, label, every_s
    self.out = out or (lambda s: print(s, flush=True))
    self.t0 = self.last = time.perf_counter()
    self.done = 0

  def update(self, n: int) -> None:
    self.done += n
    now = time.perf_counter()
    if now - self.last >= self.every_s or self.done >= self.total:
      self.last = now
      rate = self.done / max(now - self.t0, 1e-9)
      eta = (self.total - self.done) / max(rate, 1e-9)
      self.out(f"{self.label}: {self.done}/{self.total} users, {rate:.2f} users/s, "
               f"ETA {eta:.0f}s")

  @property
  def seconds(self) -> float:
    return time.perf_counter() - self.t0


# ============================================================================ model calls


@functools.partial(jax.jit, static_argnums=0)
def _prompt_embeds(graphdef, state, input_ids, slot_ids, slot_kind, slot_pos):
  return nnx.merge(graphdef, state).prompt_embeds(input_ids, slot_ids, slot_kind, slot_pos)


@functools.partial(jax.jit, static_argnums=0)
def _retrieval(graphdef, state, input_ids, attn_mask, slot_ids, slot_kind, slot_pos, keys):
  model = nnx.merge(graphdef, state)
  embeds = model.prompt_embeds(input_ids, slot_ids, slot_kind, slot_pos)
  _, hidden, _ = model.llm(embeds, mask=attn_mask, compute_logits=False)
  t = attn_mask.shape[1]
  last = jnp.max(jnp.where(attn_mask, jnp.arange(t), -1), axis=1)
  h_last = hidden[jnp.arange(hidden.shape[0]), last]
  if keys is None:
    return model.retrieval_scores(h_last)
  return model.retrieval_scores(h_last, keys)


@functools.partial(jax.jit, static_argnums=0)
def _item_keys(graphdef, state):
  return nnx.merge(graphdef, state).retrieval_item_keys()


def retrieval_item_keys(model: nnx.Module) -> jax.Array | None:
  """The retrieval head's item side (float32[N, R]) computed once, or None when the model
  does not expose it (``retrieval_scores`` then computes it per call).

  Encoding every item through the Q-Former is the expensive part of the retrieval head
  (N items x K queries x all layers) and does not depend on the prompt: compute it once
  per model and pass it to ``rank_retrieval`` / ``evaluate``.
  """
  if not hasattr(model, "retrieval_item_keys"):
    return None
  graphdef, state = nnx.split(model)
  return _item_keys(graphdef, state)


def _inputs(arrays: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, jax.Array]:
  keys = ("input_ids", "attn_mask", "slot_ids", "slot_kind", "slot_pos")
  return {k: jnp.asarray(arrays[k][rows]) for k in keys}


def prompt_embeds(model: nnx.Module, arrays: dict[str, np.ndarray], rows: np.ndarray,
                  split_model=None) -> tuple[jax.Array, jax.Array]:
  """(float32[B, T, D] input embeddings with soft tokens, bool[B, T] mask) of ``rows``."""
  graphdef, state = split_model or nnx.split(model)
  x = _inputs(arrays, rows)
  emb = _prompt_embeds(graphdef, state, x["input_ids"], x["slot_ids"], x["slot_kind"],
                       x["slot_pos"])
  return emb, x["attn_mask"]


# ============================================================================ scorers


def item_trie(ds: RecDataset, encoder: phase2.PromptEncoder) -> generation.ItemTrie:
  """Trie over every item's target string ids + the end-of-turn id (``phase2.item_strings``)."""
  _, ids = phase2.item_strings(ds, encoder.tokenizer)
  return generation.ItemTrie.build(ids, end_id=encoder.end_id)


def rank_generation(model: nnx.Module, prompts: Prompts, trie: generation.ItemTrie, *,
                    beam_size: int = BEAM_SIZE, batch_size: int = 16,
                    progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
  """OpenP5 generation ranking: trie-constrained beam search, history items disallowed.

  Args:
    model: the Phase 2 model (module docstring).
    prompts: from ``build_prompts``.
    trie: ``item_trie(ds, encoder)``.
    beam_size: K beams = the length of each ranked list.
    batch_size: users per beam search call.
    progress: optional progress printer.

  Returns:
    (ranks int32[U] (``ranking.NOT_RANKED`` = miss), ranked items int32[U, K], -1 where
    fewer than K allowed items were found).
  """
  n = len(prompts.users)
  batch_size = max(1, min(batch_size, n))
  split_model = nnx.split(model)
  allowed_all = ~ranking.history_mask(prompts.histories, trie.num_items)
  out = np.full((n, beam_size), -1, np.int32)
  for rows, m in _batches(n, batch_size):
    emb, mask = prompt_embeds(model, prompts.arrays, rows, split_model)
    res = generation.constrained_beam_search(
        model.llm, trie, input_embeds=emb, mask=mask, allowed=jnp.asarray(allowed_all[rows]),
        beam_size=beam_size, pad_id=_pad_id(model))
    out[rows[:m]] = np.asarray(res.items)[:m]
    if progress is not None:
      progress.update(m)
  ranks = ranking.ranks_from_lists(out, prompts.targets, prompts.histories)
  return ranks, out


def _pad_id(model: nnx.Module) -> int:
  """The LLM's pad id (filler after a finished beam)."""
  return int(model.llm.config.pad_id)


def rank_retrieval(model: nnx.Module, prompts: Prompts, num_items: int, *,
                   batch_size: int = 32, progress: Progress | None = None,
                   item_keys: jax.Array | None = None,
                   top_k: int = 0) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """Retrieval-head ranking: one LLM pass per prompt, every item scored, history excluded.

  Args:
    model: the Phase 2 model.
    prompts: from ``build_prompts``.
    num_items: N.
    batch_size: prompts per call.
    progress: optional progress printer.
    item_keys: ``retrieval_item_keys(model)`` computed earlier (computed here if None).
    top_k: if > 0, also return each prompt's top_k items (``ranking.rank_users``).

  Returns:
    int32[U] ranks (``ranking.NOT_RANKED`` = target in the history); with ``top_k``, the
    pair (ranks, int32[U, top_k] items best first).
  """
  n = len(prompts.users)
  graphdef, state = nnx.split(model)
  keys = item_keys if item_keys is not None else retrieval_item_keys(model)
  row_of = {int(u): i for i, u in enumerate(prompts.users)}
  # rank_users works in user ids; map them back to prompt rows (padding uses user 0,
  # which may not be in the subsample: any row then does, its output is dropped).
  histories = {int(u): h for u, h in zip(prompts.users, prompts.histories, strict=True)}
  all_hist = [histories.get(u, np.zeros(0, np.int64)) for u in range(int(prompts.users.max()) + 1)]
  targets = np.zeros(len(all_hist), np.int32)
  targets[prompts.users] = prompts.targets

  def score_fn(user_ids: jax.Array) -> jax.Array:
    rows = np.array([row_of.get(int(u), 0) for u in np.asarray(user_ids)])
    x = _inputs(prompts.arrays, rows)
    scores = _retrieval(graphdef, state, x["input_ids"], x["attn_mask"], x["slot_ids"],
                        x["slot_kind"], x["slot_pos"], keys)
    if progress is not None:
      progress.update(min(len(rows), n - progress.done))
    return scores

  return ranking.rank_users(score_fn, all_hist, targets, num_items, users=prompts.users,
                            batch_size=max(1, min(batch_size, n)), top_k=top_k)


# ============================================================================ diagnostics


def sample_candidates(prompts: Prompts, num_items: int, num_candidates: int,
                      seed: int = 0) -> np.ndarray:
  """bool[U, N]: each prompt's target plus ``num_candidates - 1`` random other items.

  For ``rank_candidates``, a diagnostic: the OpenP5 protocol ranks every item. The others
  are drawn uniformly, without replacement, from the items outside the user's history
  (and other than the target), with ``default_rng([seed, user])``: every model and scorer
  sees the same sets.

  Raises:
    ValueError: a user has fewer than ``num_candidates - 1`` such items.
  """
  out = np.zeros((len(prompts.users), num_items), bool)
  rows = zip(prompts.users, prompts.targets, prompts.histories, strict=True)
  for i, (u, t, h) in enumerate(rows):
    pool = np.setdiff1d(np.arange(num_items), np.append(np.asarray(h, np.int64), t))
    if len(pool) < num_candidates - 1:
      raise ValueError(f"user {u} has {len(pool)} items outside their history and target; "
                       f"{num_candidates} candidates need {num_candidates - 1}")
    out[i, np.random.default_rng([seed, int(u)]).choice(pool, num_candidates - 1, False)] = True
    out[i, t] = True
  return out


def rank_candidates(model: nnx.Module, prompts: Prompts, candidates: np.ndarray, *,
                    scorer: str, trie: generation.ItemTrie | None = None,
                    item_keys: jax.Array | None = None, batch_size: int = 4,
                    progress: Progress | None = None) -> np.ndarray:
  """1-based rank of each target among its candidates (``sample_candidates``): a diagnostic.

  Beam-10 HR over every item stays at 0 until a target's id enters the top 10 beams, so it
  cannot show a model that is learning but not there yet. Here:

  * 'generation': the exact log-prob of each candidate's target string + end id. One
    trie-constrained beam search per row, restricted to the C candidates with a beam of C,
    keeps every prefix (no pruning), so it returns all C scored.
  * 'retrieval': the retrieval head's scores.

  Ties count against the target (``ranking.ranks_from_scores``); a target in the history is
  ``ranking.NOT_RANKED``, as in the protocol. Chance: HR@k = k / C, mean rank (C + 1) / 2.

  Args:
    model: the Phase 2 model.
    prompts: from ``build_prompts``.
    candidates: bool[U, N] from ``sample_candidates``.
    scorer: 'generation' or 'retrieval'.
    trie: ``item_trie(ds, encoder)`` (generation).
    item_keys: ``retrieval_item_keys(model)`` (retrieval; computed if None).
    batch_size: users per call (generation keeps C beams per user: memory grows with
      batch_size x C x the prompt's KV cache).
    progress: optional progress printer.

  Returns:
    int32[U] ranks.

  Raises:
    ValueError: unknown scorer, a generation call without a trie, or NaN scores.
    RuntimeError: the beam search missed a candidate (it must not).
  """
  if scorer not in SCORERS:
    raise ValueError(f"scorer={scorer!r}; valid: {', '.join(SCORERS)}")
  if scorer == "generation" and trie is None:
    raise ValueError("rank_candidates(scorer='generation') needs the item trie")
  n, num_items = candidates.shape
  exclude_all = ~candidates | ranking.history_mask(prompts.histories, num_items)
  counts = candidates.sum(axis=1)
  split_model = nnx.split(model)
  if scorer == "retrieval" and item_keys is None:
    item_keys = retrieval_item_keys(model)
  out = np.zeros(n, np.int32)
  for rows, m in _batches(n, max(1, min(batch_size, n))):
    if scorer == "generation":
      emb, mask = prompt_embeds(model, prompts.arrays, rows, split_model)
      res = generation.constrained_beam_search(
          model.llm, trie, input_embeds=emb, mask=mask, allowed=jnp.asarray(candidates[rows]),
          beam_size=int(counts.max()), pad_id=_pad_id(model))
      items, beam_scores = np.asarray(res.items), np.asarray(res.scores)
      scores = np.full((len(rows), num_items), -np.inf, np.float32)
      for j in range(m):
        got = items[j][items[j] >= 0]
        if len(got) != counts[rows[j]]:
          raise RuntimeError(f"beam search scored {len(got)} of {counts[rows[j]]} candidates "
                             f"of prompt {rows[j]}")
        scores[j, got] = beam_scores[j][items[j] >= 0]
    else:
      x = _inputs(prompts.arrays, rows)
      scores = _retrieval(*split_model, x["input_ids"], x["attn_mask"], x["slot_ids"],
                          x["slot_kind"], x["slot_pos"], item_keys)
    ranks, finite = ranking.ranks_from_scores(
        jnp.asarray(scores), jnp.asarray(prompts.targets[rows]), jnp.asarray(exclude_all[rows]))
    if not np.asarray(finite)[:m].all():
      raise ValueError(f"NaN {scorer} scores in prompts {rows[:m].tolist()}")
    out[rows[:m]] = np.asarray(ranks)[:m]
    if progress is not None:
      progress.update(m)
  return out


# ============================================================================ records


def evaluate(model: nnx.Module, ds: RecDataset, split: Split, encoder: phase2.PromptEncoder, *,
             method: str, which: str = "test", task: str = "sequential",
             template: str = "seen", scorer: str = "generation",
             users: Sequence[int] | None = None, batch_size: int = 16,
             beam_size: int = BEAM_SIZE, trie: generation.ItemTrie | None = None,
             prompts: Prompts | None = None, max_history: int = phase2.MAX_HISTORY,
             item_keys: jax.Array | None = None, progress_every_s: float = 10.0,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
  """One results record (SPEC §8): HR/NDCG@5/10 ± std errors of ``method`` with ``scorer``.

  Args:
    model: the Phase 2 model.
    ds, split: dataset and leave-one-out split.
    encoder: the model's PromptEncoder.
    method: base method name ('ilm-it-ii', ...); the retrieval scorer appends
      '+retrieval'.
    which, task, template: what to evaluate.
    scorer: 'generation' (beam search) or 'retrieval' (retrieval head).
    users: dense user indices (default all; ``eval_users`` for a subsample).
    batch_size: users per call.
    beam_size: beams (generation).
    trie: prebuilt ``item_trie`` (built here if None).
    prompts: prebuilt ``build_prompts`` output for these arguments (built if None).
    max_history: history items shown (``build_prompts``).
    item_keys: precomputed ``retrieval_item_keys(model)`` (retrieval; computed if None).
    progress_every_s: seconds between progress lines.
    log: progress printer (default print).

  Returns:
    The record, with extras: std errors, distinct@10 (different items in the users' top 10;
    ``ranking.summarize``), wall_s (scoring only), users_per_s, scorer, beam_size,
    subsample (bool).
  """
  if scorer not in SCORERS:
    raise ValueError(f"scorer={scorer!r}; valid: {', '.join(SCORERS)}")
  if prompts is None:
    prompts = build_prompts(ds, split, which, task, template, encoder, users, max_history)
  n = len(prompts.users)
  label = f"eval {ds.name} {which} {task}/{template} {method} {scorer}"
  progress = Progress(n, label, every_s=progress_every_s, out=log)
  if scorer == "generation":
    trie = trie if trie is not None else item_trie(ds, encoder)
    ranks, lists = rank_generation(model, prompts, trie, beam_size=beam_size,
                                   batch_size=batch_size, progress=progress)
    top = ranking.top_of_lists(lists, max(ranking.KS), prompts.histories)
    name = method
  else:
    ranks, top = rank_retrieval(model, prompts, ds.num_items, batch_size=batch_size,
                                progress=progress, item_keys=item_keys, top_k=max(ranking.KS))
    name = f"{method}+retrieval"
  wall = progress.seconds
  rec = dict(dataset=ds.name, split=which, task=task, template=template, method=name,
             **ranking.summarize(ranks, top=top))
  rec.update(scorer=scorer, wall_s=round(wall, 2), users_per_s=round(n / max(wall, 1e-9), 3),
             subsample=bool(n < ds.num_users), num_items=ds.num_items)
  if scorer == "generation":
    rec["beam_size"] = beam_size
  return rec
