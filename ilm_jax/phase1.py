"""Phase 1 model wrapper and loss functions (SPEC §4): ITC + ITM + ITG, II, UI.

``Phase1Model`` holds the Q-Former (trainable) and the CF tables as ``CFTable``
variables: not ``nnx.Param``, so ``partition.trainable_filter`` leaves them frozen — no
gradient, no optimizer state, not in checkpoints (they are reloaded from the CF npz).

Loss functions follow ``steps.LossFn``: ``(model, batch, rng) -> (loss, metrics)``, one per
batch kind of ``data.pipeline`` (``item_text``, ``item_item``, ``user_item``):

  item_text_loss   loss_itc + loss_itm + loss_itg (LAVIS ``Blip2Qformer.forward``)
  item_item_loss   weight * II symmetric InfoNCE, max over K x K query pairs
  user_item_loss   weight * UI symmetric InfoNCE (user CF vector through the same encoder)

Batches are global arrays under ``jax.jit`` (data-parallel sharding), so every in-batch
softmax spans the global batch, as LAVIS's all-gather does.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ilm_jax import checkpoint, losses, masks
from ilm_jax.models import qformer as qformer_lib

PARAMS_DIR = "phase1/params"
CONFIG_FILE = "phase1/qformer_config.json"
# The variants (SPEC §4): the pair batches each adds between the item-text batches, and the
# method name its records carry (as does the Phase 2 ILM built on its Q-Former).
VARIANTS = {"it": None, "it_ii": "item_item", "it_ui": "user_item"}
METHODS = {"it": "ilm-it", "it_ii": "ilm-it-ii", "it_ui": "ilm-it-ui"}


class CFTable(nnx.Variable):
  """A frozen CF embedding table (never a parameter: not trained, not checkpointed)."""


class Phase1Model(nnx.Module):
  """Q-Former + frozen CF tables.

  Attributes:
    qformer: the item encoder (``models.qformer.QFormer``).
    cf_items: CFTable float32[N, d_cf].
    cf_users: CFTable float32[U, d_cf].
  """

  def __init__(self, qformer: qformer_lib.QFormer, item_emb: np.ndarray,
               user_emb: np.ndarray):
    self.qformer = qformer
    self.cf_items = CFTable(jnp.asarray(item_emb, jnp.float32))
    self.cf_users = CFTable(jnp.asarray(user_emb, jnp.float32))

  def item_memory(self, items: jax.Array) -> jax.Array:
    """int32[B] item indices -> float[B, M, D_mem] CF memory tokens."""
    return self.qformer.memory(self.cf_items[...][items])

  def user_memory(self, users: jax.Array) -> jax.Array:
    """int32[B] user indices -> float[B, M, D_mem] CF memory tokens."""
    return self.qformer.memory(self.cf_users[...][users])

  def feats_from_memory(self, memory: jax.Array) -> jax.Array:
    """float[B, M, D_mem] -> float32[B, K, P] L2-normalised item_proj of the query outputs."""
    q = self.qformer.query_pass(memory)
    return qformer_lib.l2_normalize(self.qformer.item_proj(q))

  def item_feats(self, items: jax.Array) -> jax.Array:
    """int32[B] -> float32[B, K, P]."""
    return self.feats_from_memory(self.item_memory(items))


# ------------------------------------------------------------------------------ losses

def item_text_loss(model: Phase1Model, batch: Mapping[str, jax.Array], rng: jax.Array, *,
                   itc_weight: float = 1.0, itm_weight: float = 1.0, itg_weight: float = 1.0,
                   label_smoothing: float = 0.1, itg_rows: int = 0
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ITC + ITM + ITG on an item-text batch.

  Args:
    model: Phase1Model.
    batch: item int32[B], input_ids int32[B, L] (starting with [CLS]), input_mask bool[B, L].
    rng: PRNG key (ITM hard-negative sampling).
    itc_weight, itm_weight, itg_weight: loss weights.
    label_smoothing: ITC and ITG label smoothing (LAVIS BLIP-2 uses 0.1 for both).
    itg_rows: ITG on the first ``itg_rows`` examples only (0 = all, as LAVIS). A CPU
      budget knob: the tied 30k-vocabulary LM head is most of the step's FLOPs, and a
      row subset is an unbiased estimate of the same loss. ``itg_weight == 0`` skips ITG.

  Returns:
    (loss, {'loss_itc', 'loss_itm', 'loss_itg', accuracies}).
  """
  qf = model.qformer
  items, text_ids, text_valid = batch["item"], batch["input_ids"], batch["input_mask"]
  memory = model.item_memory(items)                             # [B, M, D]
  item_feats = model.feats_from_memory(memory)                  # [B, K, P]
  text_feats = qf.text_feats(text_ids, text_valid)              # [B, P]
  sim_i2t = losses.itc_logits(item_feats, text_feats, qf.temperature())
  # One record per item, but a global batch may still repeat an item across epochs'
  # boundaries in odd configurations; same-item columns are false negatives.
  fn_mask = masks.false_negative_mask(items, items)
  loss_itc, m_itc = losses.itc_loss(sim_i2t, fn_mask, label_smoothing)

  pairs = losses.sample_itm_negatives(rng, sim_i2t, fn_mask)
  itm_logits = qf.itm_logits_from_memory(memory[pairs.item_idx], text_ids[pairs.text_idx],
                                         text_valid[pairs.text_idx])
  loss_itm, m_itm = losses.itm_loss(itm_logits, pairs.labels, pairs.weights)

  if itg_weight:
    r = itg_rows or text_ids.shape[0]
    h = qf.itg_pass(memory[:r], qf.to_decoder_ids(text_ids[:r]), text_valid[:r])
    logits = qf.lm_logits(h[:, qf.cfg.num_query_tokens:])
    loss_itg, m_itg = losses.itg_loss(logits, text_ids[:r], text_valid[:r], label_smoothing)
  else:
    loss_itg, m_itg = jnp.zeros((), jnp.float32), {}

  loss = itc_weight * loss_itc + itm_weight * loss_itm + itg_weight * loss_itg
  return loss, {"loss_itc": loss_itc, "loss_itm": loss_itm, "loss_itg": loss_itg,
                "temp": qf.temperature(), **m_itc, **m_itm, **m_itg}


PairLogQ = tuple[np.ndarray, np.ndarray]  # log q of each id on the pairs' first, second side


def sampling_log_q(pairs: np.ndarray, sizes: tuple[int, int]) -> PairLogQ:
  """Per side of the training pairs, the log-probability that a batch row holds each id.

  Args:
    pairs: int[P, 2] the pair stream's rows (item_a, item_b) or (user, item).
    sizes: number of ids on each side.

  Returns:
    (float32[sizes[0]], float32[sizes[1]]); an id never on a side gets log(1 / P).
  """
  pairs = np.asarray(pairs).reshape(-1, 2)
  n = max(len(pairs), 1)
  return tuple(np.log(np.maximum(np.bincount(pairs[:, s], minlength=sizes[s]), 1) / n
                      ).astype(np.float32) for s in (0, 1))


def item_item_loss(model: Phase1Model, batch: Mapping[str, jax.Array], rng: jax.Array, *,
                   weight: float = 1.0, log_q: PairLogQ | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """II: items consumed close together score higher than in-batch others.

  Args:
    model: Phase1Model.
    batch: item_a int32[B], item_b int32[B].
    rng: unused (the II step is deterministic).
    weight: loss weight.
    log_q: ``sampling_log_q`` of the training pairs: logQ-corrected softmax; None = plain.
  """
  del rng
  a, b = batch["item_a"], batch["item_b"]
  sim = losses.pair_logits(model.item_feats(a), model.item_feats(b),
                           model.qformer.pair_temperature())
  loss, metrics = losses.pair_loss(sim, masks.false_negative_mask(a, b, shared_id_space=True),
                                   name="ii", log_q=_batch_log_q(log_q, a, b))
  return weight * loss, {"loss_ii": loss, **metrics}


def user_item_loss(model: Phase1Model, batch: Mapping[str, jax.Array], rng: jax.Array, *,
                   weight: float = 1.0, log_q: PairLogQ | None = None
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """UI: a user's CF vector (through the same encoder) finds the items it consumed.

  Args:
    model: Phase1Model.
    batch: user int32[B], item int32[B].
    rng: unused.
    weight: loss weight.
    log_q: as ``item_item_loss`` (sides: users, items).
  """
  del rng
  u, i = batch["user"], batch["item"]
  user_feats = model.feats_from_memory(model.user_memory(u))
  sim = losses.pair_logits(user_feats, model.item_feats(i), model.qformer.pair_temperature())
  loss, metrics = losses.pair_loss(sim, masks.false_negative_mask(u, i), name="ui",
                                   log_q=_batch_log_q(log_q, u, i))
  return weight * loss, {"loss_ui": loss, **metrics}


def _batch_log_q(log_q: PairLogQ | None, rows: jax.Array, cols: jax.Array
                 ) -> tuple[jax.Array, jax.Array] | None:
  if log_q is None:
    return None
  return jnp.asarray(log_q[0])[rows], jnp.asarray(log_q[1])[cols]


def loss_fns(pair_kind: str | None, *, pair_weight: float = 1.0,
             pair_log_q: PairLogQ | None = None, **item_text_kw: Any) -> dict[str, Any]:
  """Batch kind -> loss function for a variant (``pair_kind`` None = IT only).

  ``pair_log_q``: the pair loss's logQ correction (``sampling_log_q(...)``); None = off.
  """
  fns = {"item_text": functools.partial(item_text_loss, **item_text_kw)}
  if pair_kind == "item_item":
    fns["item_item"] = functools.partial(item_item_loss, weight=pair_weight,
                                         log_q=pair_log_q)
  elif pair_kind == "user_item":
    fns["user_item"] = functools.partial(user_item_loss, weight=pair_weight,
                                         log_q=pair_log_q)
  elif pair_kind is not None:
    raise ValueError(f"pair_kind={pair_kind!r}; valid: None, item_item, user_item")
  return fns


# ------------------------------------------------------------------------ Phase 2 hand-off

def save_qformer(workdir: str | os.PathLike, qformer: qformer_lib.QFormer) -> pathlib.Path:
  """Writes the Q-Former's params (orbax) and its config (JSON) under ``workdir/phase1``.

  Phase 2 loads them with ``load_qformer(workdir)``.
  """
  workdir = pathlib.Path(workdir).absolute()
  path = workdir / PARAMS_DIR
  cfg_path = workdir / CONFIG_FILE
  cfg_path.parent.mkdir(parents=True, exist_ok=True)
  cfg_path.write_text(json.dumps(_config_dict(qformer.cfg), indent=1))
  state = jax.device_get(nnx.to_pure_dict(nnx.state(qformer, nnx.Param)))
  return checkpoint.save_pytree(path, state)


def _config_dict(cfg: qformer_lib.QFormerConfig) -> dict[str, Any]:
  import dataclasses  # noqa: PLC0415
  return dataclasses.asdict(cfg)


def load_qformer(workdir: str | os.PathLike, **overrides: Any) -> qformer_lib.QFormer:
  """The Phase 1 Q-Former saved by the phase1 job in ``workdir`` (host arrays).

  Args:
    workdir: the phase1 job's workdir (holds ``phase1/params`` and
      ``phase1/qformer_config.json``).
    **overrides: QFormerConfig fields to change (e.g. dtype); shapes must not change.

  Returns:
    The QFormer with the trained params.
  """
  workdir = pathlib.Path(workdir).absolute()
  cfg_path = workdir / CONFIG_FILE
  if not cfg_path.exists():
    raise FileNotFoundError(f"{cfg_path}: no Phase 1 Q-Former here; run the phase1 job first")
  fields = json.loads(cfg_path.read_text())
  fields.update(overrides)
  cfg = qformer_lib.QFormerConfig(**fields)
  model = qformer_lib.QFormer(cfg, rngs=nnx.Rngs(0))  # small: random init, then replaced
  params = nnx.state(model, nnx.Param)
  target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nnx.to_pure_dict(params))
  restored = checkpoint.restore_pytree(workdir / PARAMS_DIR, target)
  nnx.replace_by_pure_dict(params, restored)
  nnx.update(model, params)
  return model
