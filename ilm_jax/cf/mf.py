"""Matrix factorisation by weighted ALS for implicit feedback (Hu, Koren & Volinsky 2008).

Objective over all (user u, item i) cells, with r_ui = how often u consumed i in the
**train** split, p_ui = [r_ui > 0] and confidence c_ui = 1 + alpha * r_ui:

  L(X, Y) = sum_ui c_ui (p_ui - x_u . y_i)^2 + reg (|X|^2 + |Y|^2)

Each half-step is closed form. For user u with items I_u (the "YtY trick": only the
observed cells differ from c = 1, so the dense part is shared):

  A_u = Y^T Y + sum_{i in I_u} alpha r_ui y_i y_i^T + reg I
  b_u = sum_{i in I_u} (1 + alpha r_ui) y_i,          x_u = A_u^{-1} b_u

and symmetrically for items. Rows are bucketed by interaction count (padded to a power of
two) and solved in fixed-shape chunks with a batched Cholesky, so a handful of shapes
compile once and no chunk materialises more than ``chunk_floats`` floats.

An iteration solves items, then users. The objective is read off the user half-step for
free (the gathered rows and the solution are at hand), which gives a per-iteration loss
that ALS must never increase.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ALSConfig:
  """Hyper-parameters (chosen on the validation split; see configs/cf.py).

  Attributes:
    dim: embedding width d.
    reg: L2 weight on both tables.
    alpha: confidence slope, c = 1 + alpha * count.
    iters: maximum ALS iterations (one user + one item half-step each).
    seed: initial user table ~ N(0, init_scale^2), from ``jax.random.key(seed)`` (the
      first half-step solves the items against it).
    init_scale: std of the initial tables.
    eval_every: validate every this many iterations (0 = never, needs ``valid_fn``).
    patience: stop after this many validations without a better validation NDCG@10 and
      keep the best tables (0 = run all ``iters``, keep the last).
    chunk_floats: cap on floats per gathered chunk (memory knob, results unchanged).
  """

  dim: int = 64
  reg: float = 1.0
  alpha: float = 10.0
  iters: int = 15
  seed: int = 0
  init_scale: float = 0.01
  eval_every: int = 1
  patience: int = 0
  chunk_floats: int = 1 << 23

  @classmethod
  def from_mapping(cls, m: Mapping[str, Any]) -> ALSConfig:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(m) - fields)
    if unknown:
      raise ValueError(f"unknown MF settings {unknown}; valid: {sorted(fields)}")
    return cls(**dict(m))


# ---------------------------------------------------------------------------------------
# Interactions -> padded, bucketed chunks.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Interactions:
  """Deduplicated train interactions as coordinate lists (r = repeat count).

  Attributes:
    rows: int32[P] user index.
    cols: int32[P] item index.
    counts: float32[P] r_ui >= 1.
    num_users, num_items: table sizes.
  """

  rows: np.ndarray
  cols: np.ndarray
  counts: np.ndarray
  num_users: int
  num_items: int

  @classmethod
  def from_sequences(cls, train: Sequence[np.ndarray], num_items: int) -> Interactions:
    """From per-user item sequences (``Split.train``; users without items are fine)."""
    lens = np.array([len(s) for s in train], np.int64)
    rows = np.repeat(np.arange(len(train), dtype=np.int64), lens)
    cols = (np.concatenate([np.asarray(s, np.int64) for s in train]) if lens.sum()
            else np.zeros(0, np.int64))
    if cols.size and (cols.min() < 0 or cols.max() >= num_items):
      raise ValueError(f"item index out of range [0, {num_items}): {cols.min()}..{cols.max()}")
    keys, counts = np.unique(rows * num_items + cols, return_counts=True)
    return cls(rows=(keys // num_items).astype(np.int32), cols=(keys % num_items).astype(np.int32),
               counts=counts.astype(np.float32), num_users=len(train), num_items=num_items)

  def transpose(self) -> Interactions:
    order = np.lexsort((self.rows, self.cols))
    return Interactions(rows=self.cols[order], cols=self.rows[order], counts=self.counts[order],
                        num_users=self.num_items, num_items=self.num_users)


@dataclasses.dataclass(frozen=True)
class _Chunk:
  rows: jax.Array    # int32[B] row being solved; == num_rows for padding (dropped)
  cols: jax.Array    # int32[B, L] the other side's indices (0 where padded)
  counts: jax.Array  # float32[B, L] r, 0 where padded


_MAX_CHUNK_ROWS = 1024
_SOLVE_BATCH = 64


def _bucket(n: np.ndarray) -> np.ndarray:
  return np.maximum(8, 2 ** np.ceil(np.log2(np.maximum(n, 1)))).astype(np.int64)


def _plan(inter: Interactions, dim: int, chunk_floats: int) -> list[_Chunk]:
  """Chunks covering every row of ``inter`` (rows sorted by user index within a row)."""
  order = np.argsort(inter.rows, kind="stable")
  rows_sorted, cols, counts = inter.rows[order], inter.cols[order], inter.counts[order]
  n = inter.num_users
  lens = np.bincount(rows_sorted, minlength=n)
  starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
  buckets = _bucket(lens)
  chunks = []
  for length in np.unique(buckets):
    members = np.flatnonzero(buckets == length)
    # B is a power of two in [_SOLVE_BATCH, _MAX_CHUNK_ROWS] (memory permitting): few
    # distinct shapes to compile, little padding for small buckets.
    per_row = length * dim + dim * dim  # gathered rows + the d x d system
    b = int(2 ** np.floor(np.log2(max(1, chunk_floats // per_row))))
    fit = int(2 ** np.ceil(np.log2(max(len(members), _SOLVE_BATCH))))
    b = max(1, min(b, _MAX_CHUNK_ROWS, fit))
    for s in range(0, len(members), b):
      ids = members[s:s + b]
      pad = b - len(ids)
      pos = starts[ids][:, None] + np.arange(length)[None, :]
      valid = np.arange(length)[None, :] < lens[ids][:, None]
      pos = np.where(valid, pos, 0)
      c = np.where(valid, cols[pos] if len(cols) else 0, 0)
      r = np.where(valid, counts[pos] if len(counts) else 0, 0)
      chunks.append(_Chunk(
          rows=jnp.asarray(np.concatenate([ids, np.full(pad, n)]).astype(np.int32)),
          cols=jnp.asarray(np.pad(c, ((0, pad), (0, 0))).astype(np.int32)),
          counts=jnp.asarray(np.pad(r, ((0, pad), (0, 0))).astype(np.float32))))
  return chunks


# ---------------------------------------------------------------------------------------
# The closed-form half-step.
# ---------------------------------------------------------------------------------------


@jax.jit
def _normal_equations(table: jax.Array, gram: jax.Array, cols: jax.Array, counts: jax.Array,
                      alpha: jax.Array, reg: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A and b of one chunk (module docstring) against the fixed ``table``.

  Args:
    table: float32[M, d] the fixed side (Y when solving users).
    gram: float32[d, d] table^T table.
    cols: int32[B, L] indices into ``table`` (0 where padded).
    counts: float32[B, L] r (0 where padded).
    alpha, reg: float32 scalars.

  Returns:
    a: float32[B, d, d]; rhs: float32[B, d]; csum: sum of c over observed cells.
  """
  d = table.shape[1]
  mask = counts > 0
  y = table[cols]                                      # [B, L, d]
  conf = alpha * counts                                # c - 1, 0 where padded
  a = gram + jnp.einsum("bld,ble->bde", y * conf[..., None], y) + reg * jnp.eye(d)
  c_obs = jnp.where(mask, 1.0 + conf, 0.0)
  return a, jnp.einsum("bl,bld->bd", c_obs, y), jnp.sum(c_obs)


@jax.jit
def _cholesky_solve(a: jax.Array, rhs: jax.Array, reg: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x = a^-1 rhs for float32[B, d, d], float32[B, d]; and the chunk's objective share.

  With p = 1 and c on observed cells, x^T a x = x^T rhs at the solution, so the chunk's
  sum_i c_ui (p_ui - x.y_i)^2 over *all* cells (the YtY trick again) collapses to
  sum_obs c - x^T rhs - reg |x|^2; the caller adds sum_obs c.
  """
  b, d = rhs.shape
  sub = min(b, _SOLVE_BATCH)  # both powers of two

  def solve(ar):
    chol = jnp.linalg.cholesky(ar[0])
    return jax.scipy.linalg.cho_solve((chol, True), ar[1][..., None])[..., 0]

  # Batched CPU Cholesky slows down superlinearly past ~100 matrices (measured: ~20 us per
  # 64x64 system in groups of 64, 150-300 us in one batch of 1024), hence the map.
  x = jax.lax.map(solve, (a.reshape(b // sub, sub, d, d), rhs.reshape(b // sub, sub, d)))
  x = x.reshape(b, d)
  return x, -jnp.sum(x * rhs) - reg * jnp.sum(x * x)


@jax.jit
def _scatter_rows(out: jax.Array, rows: jax.Array, x: jax.Array) -> jax.Array:
  return out.at[rows].set(x, mode="drop")  # padding rows point past the end


def _half_step(table: jax.Array, out: jax.Array, chunks: Sequence[_Chunk], alpha: float,
               reg: float) -> tuple[jax.Array, jax.Array]:
  """Solves every row of ``out`` against ``table``; returns (out, objective w/o reg terms).

  Three small jitted kernels rather than one so that the Cholesky compiles once per chunk
  height B, not once per (B, L) bucket (compilation dominated small runs otherwise).
  """
  gram = table.T @ table
  alpha, reg = jnp.float32(alpha), jnp.float32(reg)
  loss = jnp.float32(0)
  for c in chunks:
    a, rhs, csum = _normal_equations(table, gram, c.cols, c.counts, alpha, reg)
    x, part = _cholesky_solve(a, rhs, reg)
    out = _scatter_rows(out, c.rows, x)
    loss = loss + csum + part
  return out, loss


def als_half_step(fixed: np.ndarray | jax.Array, inter: Interactions, alpha: float, reg: float,
                  chunk_floats: int = 1 << 23) -> np.ndarray:
  """One closed-form half-step: the rows of ``inter`` solved against ``fixed``.

  Args:
    fixed: float32[M, d] the other side's table (items when ``inter`` is user-major).
    inter: interactions whose ``rows`` are being solved and ``cols`` index ``fixed``.
    alpha, reg: see module docstring.
    chunk_floats: memory knob.

  Returns:
    float32[R, d] the solved table (rows without interactions are 0).
  """
  fixed = jnp.asarray(fixed, jnp.float32)
  chunks = _plan(inter, fixed.shape[1], chunk_floats)
  out = jnp.zeros((inter.num_users, fixed.shape[1]), jnp.float32)
  return np.asarray(_half_step(fixed, out, chunks, alpha, reg)[0])


# ---------------------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class MFResult:
  """Trained tables and the training log.

  Attributes:
    user_emb: float32[U, d].
    item_emb: float32[N, d].
    log: one dict per iteration: iter, loss, seconds, and valid metrics when evaluated.
    best_iter: the iteration whose tables are returned.
    train_seconds: wall time of training (validation excluded).
  """

  user_emb: np.ndarray
  item_emb: np.ndarray
  log: list[dict[str, float]]
  best_iter: int
  train_seconds: float


def train_als(train: Sequence[np.ndarray], num_items: int, cfg: ALSConfig, *,
              valid_fn: Callable[[jax.Array, jax.Array], Mapping[str, float]] | None = None,
              progress: Callable[[str], None] | None = None) -> MFResult:
  """Weighted ALS on train sequences.

  Args:
    train: per-user train item sequences (``Split.train``: never validation/test items).
    num_items: N.
    cfg: hyper-parameters.
    valid_fn: (user_emb float32[U, d], item_emb float32[N, d]) -> metrics with 'ndcg@10'
      (and 'hr@10'); called every ``cfg.eval_every`` iterations; drives early stopping.
    progress: receives one line per iteration (default: logging.info).

  Returns:
    MFResult; deterministic for a given ``cfg.seed`` and input.
  """
  progress = progress or log.info
  inter = Interactions.from_sequences(train, num_items)
  user_chunks = _plan(inter, cfg.dim, cfg.chunk_floats)
  item_chunks = _plan(inter.transpose(), cfg.dim, cfg.chunk_floats)
  x = cfg.init_scale * jax.random.normal(jax.random.key(cfg.seed), (inter.num_users, cfg.dim),
                                         jnp.float32)
  y = jnp.zeros((num_items, cfg.dim), jnp.float32)  # overwritten by the first half-step
  history: list[dict[str, float]] = []
  best = (-np.inf, 0, None, None)
  since_best, train_s = 0, 0.0
  for it in range(1, cfg.iters + 1):
    t0 = time.perf_counter()
    # Items first, users last: the returned user vectors are then exactly the fold-in of
    # the train histories against the returned items (no stale half of the pair).
    y, _ = _half_step(x, y, item_chunks, cfg.alpha, cfg.reg)
    x, loss = _half_step(y, x, user_chunks, cfg.alpha, cfg.reg)
    loss = float(loss + cfg.reg * (jnp.sum(x * x) + jnp.sum(y * y)))
    dt = time.perf_counter() - t0
    train_s += dt
    if not np.isfinite(loss):
      raise FloatingPointError(f"ALS loss is {loss} at iteration {it}; lower alpha or raise reg")
    entry = {"iter": it, "loss": loss, "seconds": dt}
    line = f"als iter {it:3d}  loss/nnz {loss / max(1, len(inter.rows)):.5f}  {dt:.2f}s"
    if valid_fn is not None and cfg.eval_every and it % cfg.eval_every == 0:
      metrics = dict(valid_fn(x, y))
      entry.update({f"valid_{k}": float(v) for k, v in metrics.items() if k != "users"})
      line += f"  valid hr@10 {metrics['hr@10']:.4f} ndcg@10 {metrics['ndcg@10']:.4f}"
      if metrics["ndcg@10"] > best[0]:
        best, since_best = (metrics["ndcg@10"], it, np.array(x), np.array(y)), 0
      else:
        since_best += 1
    history.append(entry)
    progress(line)
    if cfg.patience and since_best >= cfg.patience:
      progress(f"early stop: no better valid ndcg@10 for {cfg.patience} evaluations; "
               f"keeping iteration {best[1]}")
      break
  if cfg.patience and best[1] > 0:
    return MFResult(best[2], best[3], history, best[1], train_s)
  return MFResult(np.asarray(x), np.asarray(y), history, history[-1]["iter"], train_s)


def fold_in(item_emb: np.ndarray, histories: Sequence[np.ndarray], cfg: ALSConfig) -> np.ndarray:
  """User vectors solved from ``histories`` against fixed items (one user half-step).

  Used to score users whose visible history grew after training (the validation item
  is history when predicting test) without retraining; uses no target.

  Returns:
    float32[U, d].
  """
  inter = Interactions.from_sequences(histories, len(item_emb))
  return als_half_step(item_emb, inter, cfg.alpha, cfg.reg, cfg.chunk_floats)


@jax.jit
def _dot_scores(users: jax.Array, user_emb: jax.Array, item_emb: jax.Array) -> jax.Array:
  return user_emb[users] @ item_emb.T


def score_fn(user_emb: np.ndarray | jax.Array,
             item_emb: np.ndarray | jax.Array) -> Callable[[jax.Array], jax.Array]:
  """int32[B] users -> float32[B, N] dot-product scores, for ``ranking.rank_users``."""
  u, v = jnp.asarray(user_emb), jnp.asarray(item_emb)
  return lambda users: _dot_scores(users, u, v)


def popularity_score_fn(train: Sequence[np.ndarray], num_items: int
                        ) -> Callable[[jax.Array], jax.Array]:
  """int32[B] users -> float32[B, N]: each item's number of training interactions, the same
  for every user (the popularity baseline; ``ranking`` counts ties against the target)."""
  seen = [np.asarray(t, np.int64) for t in train if len(t)]
  counts = np.bincount(np.concatenate(seen), minlength=num_items) if seen else np.zeros(num_items)
  c = jnp.asarray(counts[:num_items], jnp.float32)
  return lambda users: jnp.broadcast_to(c, (users.shape[0], num_items))


# ---------------------------------------------------------------------------------------
# Saving and loading.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Embeddings:
  """Frozen CF tables with their id maps, as saved by ``save_embeddings``.

  Attributes:
    user_emb: float32[U, d]; row u = internal user index u.
    item_emb: float32[N, d]; row i = internal item index i.
    user_ids: str[U] raw user ids.
    item_ids: str[N] raw item ids.
    config: what produced them (dataset, hyper-parameters, metrics).
  """

  user_emb: np.ndarray
  item_emb: np.ndarray
  user_ids: np.ndarray
  item_ids: np.ndarray
  config: dict[str, Any]

  def check_matches(self, ds) -> None:
    """Raises ValueError unless the id maps equal ``ds``'s (a ``types.RecDataset``)."""
    for what, mine, theirs in (("item", self.item_ids, ds.item_ids),
                               ("user", self.user_ids, ds.user_ids)):
      theirs = np.asarray(theirs).astype(str)
      if mine.shape != theirs.shape or not np.array_equal(mine, theirs):
        raise ValueError(
            f"CF embeddings were trained on other {what}s ({len(mine)} vs {len(theirs)} in "
            f"dataset {ds.name!r}, config {self.config.get('dataset')!r}); rerun the cf job")


def save_embeddings(path: str | os.PathLike, user_emb: np.ndarray, item_emb: np.ndarray,
                    user_ids: Sequence[str], item_ids: Sequence[str],
                    config: Mapping[str, Any]) -> pathlib.Path:
  """Writes an npz (user_emb, item_emb, user_ids, item_ids, config as JSON) atomically."""
  path = pathlib.Path(path)
  user_emb = np.asarray(user_emb, np.float32)
  item_emb = np.asarray(item_emb, np.float32)
  if len(user_emb) != len(user_ids) or len(item_emb) != len(item_ids):
    raise ValueError(f"tables {user_emb.shape}/{item_emb.shape} do not match "
                     f"{len(user_ids)} user ids / {len(item_ids)} item ids")
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, user_emb=user_emb, item_emb=item_emb,
               user_ids=np.asarray(user_ids).astype(str), item_ids=np.asarray(item_ids).astype(str),
               config=np.array(json.dumps(dict(config), sort_keys=True, default=str)))
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def load_embeddings(path: str | os.PathLike) -> Embeddings:
  """Reads what ``save_embeddings`` wrote (no pickles)."""
  with np.load(path, allow_pickle=False) as z:
    missing = {"user_emb", "item_emb", "user_ids", "item_ids", "config"} - set(z.files)
    if missing:
      raise ValueError(f"{path}: not a CF embeddings file (missing {sorted(missing)})")
    return Embeddings(user_emb=z["user_emb"], item_emb=z["item_emb"], user_ids=z["user_ids"],
                      item_ids=z["item_ids"], config=json.loads(str(z["config"])))
