"""Phase 1 and Phase 2 losses as pure functions (SPEC §4; LAVIS ``blip2_qformer`` names).

Every loss returns ``(loss: float32[], metrics: dict[str, float32[]])``. Contrastive
losses take features that are already gathered over the global batch (under pjit a
sharded batch is just a global array), so the B x B similarity covers every in-batch
negative. False-negative masks come from ``masks.false_negative_mask``.

  itc_logits + itc_loss       ITC: max over K query outputs of cos(query, text CLS) / temp
  sample_itm_negatives        ITM hard negatives from the ITC softmax -> 3B pairs
  itm_loss                    ITM 2-way CE over the 3B pairs
  itg_loss                    ITG next-token CE, padding ignored
  pair_logits + pair_loss     item-item / user-item: max over K x K query pairs
  masked_lm_loss              token CE on a loss mask (Phase 2: answer tokens only)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]

_NEG = -1e30  # finite "minus infinity": keeps log-softmax and its gradient NaN-free


# ---------------------------------------------------------------- similarities

def max_over(x: jax.Array, num_axes: int = 1) -> jax.Array:
  """Max over the last ``num_axes`` axes, its gradient all on one arg-max (``torch.max(dim)``).

  LAVIS takes ``sim_q2t.max(-1)``, whose backward scatters to the returned index (here the
  first arg-max). ``jnp.max`` instead splits the gradient over the elements equal to the max,
  found by comparing each with the result and dividing by their count. On a GPU, XLA can
  compute the max and that comparison from two fusions of ``x`` that differ in the last bits;
  then no element equals the max and the gradient is 0/0 = NaN (seen on an H200 in the ITC
  backward at ``model.cross_init_std=0.088``, where Phase 1 also stopped at step 1 on a NaN
  gradient). A gathered arg-max has no such comparison.

  Args:
    x: float[..., n_1, ..., n_num_axes].
    num_axes: how many trailing axes to reduce.

  Returns:
    float[...], the max over those axes.
  """
  flat = x.reshape(*x.shape[:x.ndim - num_axes], -1)
  idx = jnp.argmax(flat, axis=-1, keepdims=True)
  return jnp.take_along_axis(flat, idx, axis=-1)[..., 0]


def itc_sim_per_query(item_feats: jax.Array, text_feats: jax.Array) -> jax.Array:
  """float32[Bi, Bt, K]: ``[i, j, q] = item_feats[i, q] . text_feats[j]`` (LAVIS ``sim_q2t``)."""
  return jnp.einsum("iqd,jd->ijq", item_feats, text_feats,
                    preferred_element_type=jnp.float32)


def itc_logits(item_feats: jax.Array, text_feats: jax.Array, temp: jax.Array | float) -> jax.Array:
  """ITC scores ``sim_i2t`` float32[Bi, Bt] = max over queries of the cosine / ``temp``.

  Args:
    item_feats: float[Bi, K, D] L2-normalised query features (``QFormer.item_feats``).
    text_feats: float[Bt, D] L2-normalised text [CLS] features (``QFormer.text_feats``).
    temp: temperature (scalar).

  Returns:
    ``sim_i2t``; its transpose is ``sim_t2i``.
  """
  return max_over(itc_sim_per_query(item_feats, text_feats)) / temp


def pair_logits(feats_a: jax.Array, feats_b: jax.Array, temp: jax.Array | float) -> jax.Array:
  """Item-item / user-item scores float32[Ba, Bb] = max over K x K query pairs of cos / temp.

  Args:
    feats_a: float[Ba, Ka, D] L2-normalised query features of the anchors.
    feats_b: float[Bb, Kb, D] L2-normalised query features of the partners.
    temp: temperature.
  """
  sim = jnp.einsum("ikd,jld->ijkl", feats_a, feats_b, preferred_element_type=jnp.float32)
  return max_over(sim, num_axes=2) / temp


# ---------------------------------------------------------------- InfoNCE

def _cross_entropy_diag(logits: jax.Array, fn_mask: jax.Array | None,
                        label_smoothing: float) -> tuple[jax.Array, jax.Array]:
  """Row-wise CE with target = the diagonal; masked columns are removed from the softmax.

  Returns (per-row loss float32[B], per-row correct bool[B]).
  """
  b = logits.shape[0]
  eye = jnp.eye(b, logits.shape[1], dtype=bool)
  valid = ~fn_mask if fn_mask is not None else jnp.ones(logits.shape, bool)
  valid = valid | eye
  x = jnp.where(valid, logits.astype(jnp.float32), _NEG)
  logp = jax.nn.log_softmax(x, axis=-1)
  n_valid = valid.sum(axis=-1, keepdims=True)
  target = (1.0 - label_smoothing) * eye + label_smoothing * valid / n_valid
  loss = -(target * jnp.where(valid, logp, 0.0)).sum(axis=-1)
  correct = x.argmax(axis=-1) == jnp.arange(b)
  return loss, correct


def symmetric_infonce(logits: jax.Array, fn_mask: jax.Array | None = None,
                      label_smoothing: float = 0.0, prefix: str = "",
                      log_q: tuple[jax.Array, jax.Array] | None = None
                      ) -> tuple[jax.Array, Metrics]:
  """``(CE(logits) + CE(logits.T)) / 2`` with diagonal targets.

  Args:
    logits: float[B, B], ``[i, j]`` = score of row i against column j; pair i is (i, i).
    fn_mask: bool[B, B] True where (i, j) is a false negative (left out of row i's
      softmax, and ``fn_mask.T`` out of the transposed direction); None = none.
    label_smoothing: LAVIS BLIP-2 uses 0.1 for ITC; spread over the valid columns.
    prefix: metric-name prefix.
    log_q: optional (float[B] per row, float[B] per column) log-probability that the
      row's / column's entity is drawn into a batch; each direction's softmax subtracts its
      candidates' log q from their logits (the logQ correction of in-batch sampling, Yi et
      al. 2019), so frequent items are not over-punished for being frequent negatives.

  Returns:
    loss, ``{prefix+'acc_a2b', prefix+'acc_b2a'}`` (top-1 accuracy of each direction).
  """
  fn_t = None if fn_mask is None else fn_mask.T
  logits_ab, logits_ba = logits, logits.T
  if log_q is not None:
    logits_ab = logits_ab - log_q[1][None, :]
    logits_ba = logits_ba - log_q[0][None, :]
  l_ab, c_ab = _cross_entropy_diag(logits_ab, fn_mask, label_smoothing)
  l_ba, c_ba = _cross_entropy_diag(logits_ba, fn_t, label_smoothing)
  loss = (l_ab.mean() + l_ba.mean()) / 2
  return loss, {prefix + "acc_a2b": c_ab.mean(), prefix + "acc_b2a": c_ba.mean()}


def itc_loss(sim_i2t: jax.Array, fn_mask: jax.Array | None = None,
             label_smoothing: float = 0.0) -> tuple[jax.Array, Metrics]:
  """Symmetric InfoNCE on ``sim_i2t`` (from ``itc_logits``).

  Returns:
    loss_itc, ``{'itc_acc_i2t', 'itc_acc_t2i'}``.
  """
  loss, m = symmetric_infonce(sim_i2t, fn_mask, label_smoothing)
  return loss, {"itc_acc_i2t": m["acc_a2b"], "itc_acc_t2i": m["acc_b2a"]}


def pair_loss(sim: jax.Array, fn_mask: jax.Array | None = None, label_smoothing: float = 0.0,
              name: str = "ii", log_q: tuple[jax.Array, jax.Array] | None = None
              ) -> tuple[jax.Array, Metrics]:
  """Item-item (``name='ii'``) or user-item (``'ui'``) symmetric InfoNCE on ``pair_logits``.

  ``log_q``: optional logQ correction, as ``symmetric_infonce``.

  Returns:
    loss, ``{name+'_acc_a2b', name+'_acc_b2a'}``.
  """
  return symmetric_infonce(sim, fn_mask, label_smoothing, prefix=name + "_", log_q=log_q)


# ---------------------------------------------------------------- ITM

class ItmPairs(NamedTuple):
  """The 3B ITM pairs: positives, (negative item, text), (item, negative text).

  Attributes:
    item_idx: int32[3B] row of the item (CF vector) of each pair.
    text_idx: int32[3B] row of the text of each pair.
    labels: int32[3B] 1 = match (first B), 0 = the 2B negatives.
    weights: float32[3B] 0 for a negative slot whose row had no usable negative.
  """
  item_idx: jax.Array
  text_idx: jax.Array
  labels: jax.Array
  weights: jax.Array


def _sample_negative(rng: jax.Array, sim: jax.Array, excluded: jax.Array):
  # LAVIS: weights = softmax(sim) + 1e-4, excluded entries zeroed, multinomial per row.
  w = jax.nn.softmax(sim.astype(jnp.float32), axis=-1) + 1e-4
  logits = jnp.where(excluded, -jnp.inf, jnp.log(w))
  idx = jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
  has_negative = (~excluded).any(axis=-1)
  return jnp.where(has_negative, idx, 0), has_negative


def sample_itm_negatives(rng: jax.Array, sim_i2t: jax.Array,
                         fn_mask: jax.Array | None = None) -> ItmPairs:
  """Draws one hard negative item per text and one hard negative text per item.

  A negative is drawn with probability proportional to ``softmax(sim)[j] + 1e-4`` over the
  columns that are neither the positive (diagonal) nor a false negative (LAVIS
  ``weights_t2i`` / ``weights_i2t``). No gradient flows through the sampling.

  Args:
    rng: PRNG key.
    sim_i2t: float[B, B] ITC scores (``itc_logits``).
    fn_mask: bool[B, B] false negatives (``masks.false_negative_mask``) or None.

  Returns:
    ItmPairs (pair order as LAVIS: B positives, B with a negative item, B with a negative
    text).
  """
  sim_i2t = jax.lax.stop_gradient(sim_i2t)
  b = sim_i2t.shape[0]
  excluded = jnp.eye(b, dtype=bool)
  if fn_mask is not None:
    excluded = excluded | fn_mask
  k_item, k_text = jax.random.split(rng)
  neg_item, ok_item = _sample_negative(k_item, sim_i2t.T, excluded.T)  # per text
  neg_text, ok_text = _sample_negative(k_text, sim_i2t, excluded)  # per item
  ar = jnp.arange(b, dtype=jnp.int32)
  ones = jnp.ones((b,), jnp.float32)
  return ItmPairs(
      item_idx=jnp.concatenate([ar, neg_item, ar]),
      text_idx=jnp.concatenate([ar, ar, neg_text]),
      labels=jnp.concatenate([jnp.ones((b,), jnp.int32), jnp.zeros((2 * b,), jnp.int32)]),
      weights=jnp.concatenate([ones, ok_item.astype(jnp.float32), ok_text.astype(jnp.float32)]))


def itm_loss(logits: jax.Array, labels: jax.Array,
             weights: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
  """Weighted 2-way cross-entropy.

  Args:
    logits: float[N, 2] (column 1 = match), e.g. ``QFormer.itm_logits`` on the 3B pairs.
    labels: int[N] in {0, 1}.
    weights: float[N] or None (= ones).

  Returns:
    loss_itm, ``{'itm_acc'}`` (weighted accuracy).
  """
  w = jnp.ones(labels.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
  denom = jnp.maximum(w.sum(), 1.0)
  acc = ((logits.argmax(-1) == labels) * w).sum() / denom
  return (nll * w).sum() / denom, {"itm_acc": acc}


# ---------------------------------------------------------------- token losses

def masked_lm_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array,
                   label_smoothing: float = 0.0) -> tuple[jax.Array, Metrics]:
  """Mean token cross-entropy over positions where ``loss_mask`` is True.

  Args:
    logits: float[B, T, V]; position t predicts ``targets[:, t]``.
    targets: int[B, T].
    loss_mask: bool[B, T] (Phase 2: True on answer tokens only; ITG: non-padding).
    label_smoothing: mass spread uniformly over the vocabulary (LAVIS ITG uses 0.1).

  Returns:
    loss, ``{'acc', 'tokens'}`` (top-1 accuracy on masked positions, their count).
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  if label_smoothing:
    nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(axis=-1)
  m = loss_mask.astype(jnp.float32)
  n = m.sum()
  denom = jnp.maximum(n, 1.0)
  acc = ((logits.argmax(-1) == targets) * m).sum() / denom
  return (nll * m).sum() / denom, {"acc": acc, "tokens": n}


def itg_loss(logits: jax.Array, text_ids: jax.Array, text_valid: jax.Array,
             label_smoothing: float = 0.0) -> tuple[jax.Array, Metrics]:
  """ITG next-token loss: position t predicts ``text_ids[:, t+1]``; padding is ignored.

  Args:
    logits: float[B, L, V] from ``QFormer.itg_logits`` (text positions of the ITG pass).
    text_ids: int[B, L] the original text ids (position 0 is the BOS, never a target).
    text_valid: bool[B, L].
    label_smoothing: see ``masked_lm_loss``.

  Returns:
    loss_itg, ``{'itg_acc', 'itg_tokens'}``.
  """
  loss, m = masked_lm_loss(logits[:, :-1], text_ids[:, 1:], text_valid[:, 1:], label_smoothing)
  return loss, {"itg_acc": m["acc"], "itg_tokens": m["tokens"]}
