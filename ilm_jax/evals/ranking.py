"""Full-ranking metrics with the OpenP5 protocol (SPEC §6), shared by every recommender.

Protocol: every item is a candidate except the user's history (``Split.history(split)``:
train items when predicting validation, train + validation items when predicting test).
The target's 1-based rank among the candidates gives

  HR@K   = [rank <= K]
  NDCG@K = [rank <= K] / log2(rank + 1)      (one relevant item, so IDCG = 1)

averaged over users, with the standard error of the mean (sample std / sqrt(users)).

Conventions (one place for them):
  * Ties are pessimistic: every candidate scoring >= the target ranks above it, so a
    constant scorer gets rank = number of candidates, never a lucky rank 1.
  * A target that is itself in the history is not a candidate (OpenP5's trie holds all
    items minus the history), so it is a miss: rank ``NOT_RANKED`` (0).
  * A ranked list (generation output) may contain ids < 0 (strings that are not items),
    history items and repeats; those are dropped before the target's position is read.

Beside HR/NDCG, ``summarize`` can count ``distinct@K``: how many different items appear in
the users' top-K lists. It tells a personalised ranking from one list shown to everyone
(K items plus those standing in for each user's history items, as popularity gives), which
HR alone cannot.

Two entry points: ``rank_users`` for models that score every item (MF, the retrieval
head), batched over users through a jitted kernel; ``ranks_from_lists`` for models that
emit ranked lists (beam search). Both feed ``summarize``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

KS = (5, 10)
NOT_RANKED = 0  # rank of a target that no candidate list contains


@jax.jit
def ranks_from_scores(scores: jax.Array, targets: jax.Array,
                      exclude: jax.Array) -> tuple[jax.Array, jax.Array]:
  """1-based rank of each row's target among the non-excluded columns.

  Example: scores [[.1, .5, .5, .9]], target 1, exclude [[F, F, F, T]] -> rank 2
  (item 3 is history; item 2 ties with the target and counts above it).

  Args:
    scores: float32[B, N] a score per item (higher = better).
    targets: int32[B] target item per row.
    exclude: bool[B, N] True for items that are not candidates (the history).

  Returns:
    ranks: int32[B], ``NOT_RANKED`` where the target is excluded.
    finite: bool[B], False where a candidate's score is NaN (that row's rank is
      meaningless; callers must fail).
  """
  n = scores.shape[1]
  rows = jnp.arange(scores.shape[0])
  target_score = scores[rows, targets]
  is_target = jnp.arange(n)[None, :] == targets[:, None]
  above = (scores >= target_score[:, None]) & ~exclude & ~is_target
  ranks = 1 + above.sum(axis=1, dtype=jnp.int32)
  ranks = jnp.where(exclude[rows, targets], NOT_RANKED, ranks)
  # NaN compares False both ways, which would silently give optimistic ranks.
  finite = jnp.all(~jnp.isnan(scores) | exclude, axis=1)
  return ranks, finite


@functools.partial(jax.jit, static_argnames="k")
def top_candidates(scores: jax.Array, exclude: jax.Array, k: int) -> jax.Array:
  """int32[B, k]: each row's k best non-excluded items, best first (ties: lower index);
  -1 where a row has fewer than k candidates."""
  values, items = jax.lax.top_k(jnp.where(exclude, -jnp.inf, scores), k)
  return jnp.where(values > -jnp.inf, items, -1).astype(jnp.int32)


def history_mask(histories: Sequence[np.ndarray], num_items: int) -> np.ndarray:
  """bool[B, N]: True at every (row, item) in that row's history."""
  mask = np.zeros((len(histories), num_items), bool)
  lens = [len(h) for h in histories]
  if sum(lens):
    rows = np.repeat(np.arange(len(histories)), lens)
    mask[rows, np.concatenate(histories).astype(np.int64)] = True
  return mask


def rank_users(score_fn: Callable[[jax.Array], jax.Array],
               histories: Sequence[np.ndarray], targets: np.ndarray, num_items: int, *,
               users: np.ndarray | None = None, batch_size: int = 1024,
               top_k: int = 0) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
  """Ranks every user's target with a model that scores all items.

  Args:
    score_fn: int32[B] user indices -> float32[B, N] scores for all items. Called with
      a fixed B (the last batch is padded with user 0) so it compiles once.
    histories: per-user arrays of history item indices, indexed by user
      (``split.history(split)``).
    targets: int32[U] target item per user (``split.targets(split)``).
    num_items: N.
    users: optional int[M] subset of users to evaluate (default: all).
    batch_size: users per scoring call.
    top_k: if > 0, also return each user's top_k candidates (``top_candidates``).

  Returns:
    int32[M] ranks (``NOT_RANKED`` = target in history), in the order of ``users``; with
    ``top_k``, the pair (ranks, int32[M, top_k] top candidates).

  Raises:
    ValueError: a candidate score is NaN, or ``score_fn`` returns the wrong shape.
  """
  users = np.arange(len(targets)) if users is None else np.asarray(users)
  targets = np.asarray(targets, np.int32)
  batch_size = max(1, min(batch_size, len(users)))
  out = np.zeros(len(users), np.int32)
  top = np.full((len(users), top_k), -1, np.int32)  # -1 past the last item
  for start in range(0, len(users), batch_size):
    batch = users[start:start + batch_size]
    m = len(batch)
    padded = np.zeros(batch_size, np.int32)
    padded[:m] = batch
    scores = score_fn(jnp.asarray(padded))
    if scores.shape != (batch_size, num_items):
      raise ValueError(f"score_fn returned shape {scores.shape}, expected "
                       f"{(batch_size, num_items)}")
    exclude = jnp.asarray(history_mask([histories[u] for u in padded], num_items))
    ranks, finite = ranks_from_scores(scores, jnp.asarray(targets[padded]), exclude)
    ranks, finite = np.asarray(ranks)[:m], np.asarray(finite)[:m]
    if not finite.all():
      raise ValueError(f"score_fn gave NaN scores for user {batch[~finite][0]}")
    out[start:start + m] = ranks
    if top_k:
      k = min(top_k, num_items)
      top[start:start + m, :k] = np.asarray(top_candidates(scores, exclude, k))[:m]
  return (out, top) if top_k else out


def ranks_from_lists(ranked: Sequence[Sequence[int]], targets: Sequence[int],
                     histories: Sequence[np.ndarray] | None = None) -> np.ndarray:
  """1-based rank of each target in a ranked list of item indices (best first).

  Ids < 0 (outputs that are not items), history items and repeats are dropped first, so
  a generator that wastes beams on them is not credited for later positions.

  Args:
    ranked: per user, item indices best first (beam outputs, say).
    targets: int[U] target per user.
    histories: optional per-user history arrays to drop from the lists.

  Returns:
    int32[U] ranks, ``NOT_RANKED`` when the target is absent or in the history.
  """
  out = np.zeros(len(targets), np.int32)
  for u, (items, target) in enumerate(zip(ranked, targets, strict=True)):
    # A target in the history is never yielded, so it stays NOT_RANKED.
    for pos, item in enumerate(_clean(items, () if histories is None else histories[u]), 1):
      if item == target:
        out[u] = pos
        break
  return out


def top_of_lists(ranked: Sequence[Sequence[int]], k: int,
                 histories: Sequence[np.ndarray] | None = None) -> np.ndarray:
  """int32[U, k]: each ranked list's first k items once cleaned as ``ranks_from_lists``
  cleans them (ids < 0, history items and repeats dropped); -1 pads short lists."""
  out = np.full((len(ranked), k), -1, np.int32)
  for u, items in enumerate(ranked):
    kept = list(itertools.islice(_clean(items, () if histories is None else histories[u]), k))
    out[u, :len(kept)] = kept
  return out


def _clean(items: Iterable[int], history: Iterable[int]) -> Iterator[int]:
  """Yields the items of a ranked list that are real, new and not in the history."""
  seen = {int(i) for i in history}
  for item in items:
    item = int(item)
    if item >= 0 and item not in seen:
      seen.add(item)
      yield item


def summarize(ranks: np.ndarray, ks: Sequence[int] = KS,
              top: np.ndarray | None = None) -> dict[str, float | int]:
  """HR@K and NDCG@K means and standard errors over users.

  Args:
    ranks: int[U] 1-based ranks, ``NOT_RANKED`` = miss.
    ks: cut-offs.
    top: optional int[U, K] each user's top-K items (-1 = none), which adds
      ``distinct@K``, the number of different items among them.

  Returns:
    {'users', 'hr@K', 'ndcg@K', 'hr@K_se', 'ndcg@K_se' for each K} (+ 'distinct@K'). The
    standard error is the sample std (ddof=1) / sqrt(users); 0 for a single user.
  """
  ranks = np.asarray(ranks, np.int64)
  n = len(ranks)
  if n == 0:
    raise ValueError("no users to summarize")
  out: dict[str, float | int] = {"users": n}
  hit_rank = np.where(ranks == NOT_RANKED, np.iinfo(np.int64).max, ranks)
  for k in ks:
    hit = hit_rank <= k
    gain = np.where(hit, 1.0 / np.log2(np.minimum(hit_rank, k) + 1.0), 0.0)
    for name, v in (("hr", hit.astype(np.float64)), ("ndcg", gain)):
      out[f"{name}@{k}"] = float(v.mean())
      out[f"{name}@{k}_se"] = float(v.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
  if top is not None:
    top = np.asarray(top)
    if top.ndim != 2 or len(top) != n:
      raise ValueError(f"top has shape {top.shape}; expected ({n}, K)")
    out[f"distinct@{top.shape[1]}"] = int(len(np.unique(top[top >= 0])))
  return out


def evaluate_scores(score_fn: Callable[[jax.Array], jax.Array], split, which: str,
                    num_items: int, *, users: np.ndarray | None = None,
                    batch_size: int = 1024, ks: Sequence[int] = KS) -> dict[str, float | int]:
  """``summarize(rank_users(...))`` on ``split`` ('valid' or 'test') of a ``types.Split``,
  with ``distinct@max(ks)``."""
  ranks, top = rank_users(score_fn, split.history(which), split.targets(which), num_items,
                          users=users, batch_size=batch_size, top_k=max(ks))
  return summarize(ranks, ks, top)
