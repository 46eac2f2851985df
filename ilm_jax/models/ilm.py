"""The Item-Language Model (SPEC §5): CF item/user slots as soft tokens in a frozen LLM.

Contract (the evaluation, chat and serving code use these names; keep them stable)::

  ilm = build_ilm(config, workdir, ds)          # configs/phase2.py; Phase 1 Q-Former or not
  ilm = load_trained(workdir_or_dir, config, ds) # the trained Phase 2 state on a fresh LLM
  ilm.soft_tokens(slot_ids, slot_kind)           # float32[B, S, K, D]
  ilm.prompt_embeds(input_ids, slot_ids, slot_kind, slot_pos)       # float[B, T, D]
  logits, hidden = ilm(input_ids, attn_mask, slot_ids, slot_kind, slot_pos)
  ilm.item_token_table()                         # float32[N, K, D] (cacheable)
  ilm.retrieval_scores(hidden_last)              # float32[B, N] (retrieval head)

Additions beyond the agreed contract (all optional):
  ``ilm(..., compute_logits=False)`` returns (None, hidden); ``ilm.num_soft_tokens`` = K
  to give ``data.phase2.PromptEncoder(soft_tokens=...)`` (0 for text-only);
  ``retrieval_scores(hidden_last, item_keys=ilm.retrieval_item_keys())`` with cached keys;
  ``last_prompt_hidden(hidden, prompt_len - 1)`` picks the hidden state the head scores;
  ``load_llm(config.llm)`` -> (Llm, tokenizer); ``method_name`` / ``output_dir`` locate a
  run's ``WORKDIR/phase2/<method>``. ``ilm_jax.phase2.retrieval_score_fn`` wraps the head
  for ``evals.ranking.rank_users``.

Slots follow ``data.phase2``: ``slot_kind`` 0 = item, 1 = user, -1 = empty; slot s
occupies the K positions ``slot_pos[s] .. slot_pos[s] + K - 1`` (the prompt holds
placeholder ids there); ``slot_ids`` index the dataset's items / users.

Encoders (``ILM.encoder``, call contract in ``models.adaptors``):
  'qformer'  Q-Former query-only pass over the CF vector + ``llm_proj`` (ILM-IT/-II/-UI
             from a Phase 1 checkpoint; ILM-rand from Phase 1's *starting* weights)
  'mlp'      CF vector -> 2-layer MLP -> K soft tokens (Phase 2 only)
  None       text-only: no soft tokens (K = 0); the prompts name items by id/title

Frozen vs trainable: the LLM and the CF tables never train. The CF tables are
``phase1.CFTable`` variables (not params, so no filter can train them); the LLM is frozen
by the ``'^llm/'`` pattern of ``config.train.frozen`` through ``partition.trainable_filter``
-- the one filter that decides gradients, optimizer state and checkpoint contents. The
Q-Former's text branch (word embeddings, text/item projections, ITM/LM heads,
temperatures) is unused in Phase 2 and frozen the same way, so it carries no optimizer
state either. Gradients reach the encoder *through* the frozen LLM (the frozen state is
an input of the jitted step; only the trainable state is differentiated).

Retrieval head (beyond the paper): ``retrieval_scores`` compares the LLM's final hidden
state at the last prompt position (``normalize(query_proj(h))``) with every item's key
``normalize(item_proj(mean_k item_token_table()[i]))``, divided by a learned temperature.
Text-only has no item tokens; its keys come from a learned item table instead. Trained in
Phase 2 jointly with the LM loss (``ilm_jax.phase2``): full ranking in one LLM pass.

Saved state (``save_trained`` / ``load_trained``): ``DIR/phase2/<method>/params`` (orbax,
trainable params only) and ``DIR/phase2/<method>/ilm.json`` (what rebuilds the skeleton:
variant, Q-Former / MLP shapes, LLM source, CF npz path, frozen patterns).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ilm_jax import checkpoint, llm_tokenizer, partition, phase1
from ilm_jax.models import adaptors, layers, llm
from ilm_jax.models import qformer as qformer_lib
from ilm_jax.phase1 import CFTable

SLOT_ITEM, SLOT_USER, SLOT_EMPTY = 0, 1, -1  # == ilm_jax.data.phase2 (checked in tests)
VARIANTS = ("ilm", "rand", "mlp", "text")
PHASE2_DIR = "phase2"
META_FILE = "ilm.json"
PARAMS_DIR = "params"
# The Q-Former's text branch: unused in Phase 2 (queries-only pass), so frozen.
QFORMER_UNUSED = r"^encoder/qformer/(embeddings|text_proj|item_proj|itm_head|lm_head|temp)"


def _normalize(x: jax.Array) -> jax.Array:
  return qformer_lib.l2_normalize(x)


class RetrievalHead(nnx.Module):
  """Scores items from a hidden state: cosine of projected query and item keys / temp.

  Attributes:
    query_proj: Linear D -> R on the LLM's last-prompt hidden state.
    item_proj: Linear D -> R on an item's mean soft token.
    item_table: Param float32[N, D] item representations (text-only only; else None).
    temp: learned temperature, clamped to [0.01, 0.5].
  """

  def __init__(self, llm_dim: int, dim: int, *, num_items: int | None, rngs: nnx.Rngs,
               temp_init: float = 0.07):
    self.query_proj = layers.dense(llm_dim, dim, ("embed", None), rngs=rngs)
    self.item_proj = layers.dense(llm_dim, dim, ("embed", None), rngs=rngs)
    if num_items is not None:
      self.item_table = partition.logical_param(
          layers.normal_init(0.02)(rngs.params(), (num_items, llm_dim), jnp.float32),
          (None, "embed"))
    else:
      self.item_table = None
    self.temp = nnx.Param(jnp.asarray(temp_init, jnp.float32))

  def temperature(self) -> jax.Array:
    return jnp.clip(self.temp[...], 0.01, 0.5)


class ILM(nnx.Module):
  """Frozen LLM + item encoder + retrieval head (see the module docstring).

  Attributes:
    llm: the frozen ``models.llm.Llm``.
    encoder: ``adaptors.QFormerAdaptor`` | ``adaptors.MlpAdaptor`` | None (text-only).
    encoder_kind: 'qformer' | 'mlp' | None.
    num_soft_tokens: K (0 for text-only).
    cf_items: CFTable float32[N, d_cf]; cf_users: CFTable float32[U, d_cf].
    retrieval: RetrievalHead.
  """

  def __init__(self, llm_model: llm.Llm, encoder: nnx.Module | None, item_emb: np.ndarray,
               user_emb: np.ndarray, *, retrieval_dim: int = 256, rngs: nnx.Rngs):
    self.llm = llm_model
    self.encoder = encoder
    if encoder is None:
      self.encoder_kind = None
    elif isinstance(encoder, adaptors.QFormerAdaptor):
      self.encoder_kind = "qformer"
    elif isinstance(encoder, adaptors.MlpAdaptor):
      self.encoder_kind = "mlp"
    else:
      raise TypeError(f"unknown item encoder {type(encoder).__name__}")
    self.num_soft_tokens = 0 if encoder is None else int(encoder.num_tokens)
    self.cf_items = CFTable(jnp.asarray(item_emb, jnp.float32))
    self.cf_users = CFTable(jnp.asarray(user_emb, jnp.float32))
    self.retrieval = RetrievalHead(
        llm_model.config.dim, retrieval_dim,
        num_items=int(item_emb.shape[0]) if encoder is None else None, rngs=rngs)

  @property
  def num_items(self) -> int:
    return int(self.cf_items.shape[0])

  # ------------------------------------------------------------------ soft tokens
  def soft_tokens(self, slot_ids: jax.Array, slot_kind: jax.Array) -> jax.Array:
    """int32[B, S] ids, int32[B, S] kinds -> float32[B, S, K, D] (K = 0 for text-only).

    Empty slots get the tokens of item 0 (finite; ``prompt_embeds`` drops them).
    """
    b, s = slot_ids.shape
    d = self.llm.config.dim
    if self.encoder is None:
      return jnp.zeros((b, s, 0, d), jnp.float32)
    items = self.cf_items[...]
    users = self.cf_users[...]
    item_vec = items[jnp.clip(slot_ids, 0, items.shape[0] - 1)]
    user_vec = users[jnp.clip(slot_ids, 0, users.shape[0] - 1)]
    cf = jnp.where((slot_kind == SLOT_USER)[..., None], user_vec, item_vec)
    out = self.encoder(cf.reshape(b * s, -1))
    return out.reshape(b, s, self.num_soft_tokens, d)

  def prompt_embeds(self, input_ids: jax.Array, slot_ids: jax.Array, slot_kind: jax.Array,
                    slot_pos: jax.Array) -> jax.Array:
    """float[B, T, D]: word embeddings with each slot's K soft tokens at ``slot_pos + k``.

    Args:
      input_ids: int32[B, T].
      slot_ids, slot_kind, slot_pos: int32[B, S] (``data.phase2`` arrays).
    """
    embeds = self.llm.embed(input_ids)
    k = self.num_soft_tokens
    if k == 0:
      return embeds
    b, s = slot_ids.shape
    soft = self.soft_tokens(slot_ids, slot_kind)                       # [B, S, K, D]
    used = (slot_kind != SLOT_EMPTY) & (slot_pos >= 0)
    pos = jnp.where(used[..., None], slot_pos[..., None] + jnp.arange(k), -1)  # [B, S, K]
    return llm.splice_embeddings(embeds, soft.reshape(b, s * k, -1), pos.reshape(b, s * k))

  def __call__(self, input_ids: jax.Array, attn_mask: jax.Array, slot_ids: jax.Array,
               slot_kind: jax.Array, slot_pos: jax.Array, *, compute_logits: bool = True
               ) -> tuple[jax.Array | None, jax.Array]:
    """Runs the frozen LLM on the spliced prompt.

    Args:
      input_ids: int32[B, T]; attn_mask: bool[B, T] real positions.
      slot_ids, slot_kind, slot_pos: int32[B, S].
      compute_logits: False returns None for logits (the loss computes them only at
        answer positions).

    Returns:
      (logits float32[B, T, V] or None, hidden float32[B, T, D] after the final norm).
    """
    embeds = self.prompt_embeds(input_ids, slot_ids, slot_kind, slot_pos)
    logits, hidden, _ = self.llm(input_embeds=embeds, mask=attn_mask,
                                 compute_logits=compute_logits)
    return logits, hidden

  # ------------------------------------------------------------------ items
  def item_token_table(self) -> jax.Array:
    """float32[N, K, D]: every item's soft tokens (K = 0 for text-only)."""
    if self.encoder is None:
      return jnp.zeros((self.num_items, 0, self.llm.config.dim), jnp.float32)
    return self.encoder(self.cf_items[...])

  def retrieval_item_keys(self, item_tokens: jax.Array | None = None,
                          items: jax.Array | None = None, detach: bool = False) -> jax.Array:
    """float32[N, R] (or [B, R] for ``items``) L2-normalised item keys of the retrieval head.

    Args:
      item_tokens: a cached ``item_token_table()`` (serving); None = computed here.
      items: int32[B] only these items' keys (in-batch softmax); None = all items.
      detach: no gradient flows from the keys into the item encoder (the head's own
        parameters still get theirs).
    """
    head = self.retrieval
    if head.item_table is not None:
      reps = head.item_table[...]
      reps = reps if items is None else reps[items]
    elif items is not None:
      reps = self.encoder(self.cf_items[...][items]).mean(axis=1)
    else:
      table = self.item_token_table() if item_tokens is None else item_tokens
      reps = table.mean(axis=1)
    if detach and head.item_table is None:
      reps = jax.lax.stop_gradient(reps)
    return _normalize(head.item_proj(reps))

  def retrieval_scores(self, hidden_last: jax.Array, item_keys: jax.Array | None = None
                       ) -> jax.Array:
    """float32[B, D] last-prompt hidden states -> float32[B, N] item scores.

    Args:
      hidden_last: the LLM's final hidden state at each prompt's last position.
      item_keys: cached ``retrieval_item_keys()``; None = computed here.
    """
    keys = self.retrieval_item_keys() if item_keys is None else item_keys
    q = _normalize(self.retrieval.query_proj(hidden_last))
    return (q @ keys.T) / self.retrieval.temperature()


def last_prompt_hidden(hidden: jax.Array, last_pos: jax.Array) -> jax.Array:
  """float[B, T, D], int[B] positions -> float[B, D] (``hidden[b, last_pos[b]]``)."""
  return jnp.take_along_axis(hidden, last_pos[:, None, None].astype(jnp.int32), axis=1)[:, 0]


# ==== Construction =======================================================================

def load_llm(llm_cfg: ml_collections.ConfigDict) -> tuple[llm.Llm, llm_tokenizer.LlmTokenizer]:
  """(frozen LLM, tokenizer) for ``config.llm``.

  ``llm_cfg.tiny``: a random ``LlmConfig.tiny`` Llama (seeded: rebuilding it gives the
  same weights) with SmolLM2's tokenizer; else ``llm_loading.load(source)`` ('' = the
  packaged SmolLM2-135M-Instruct GGUF).
  """
  from ilm_jax import resources  # noqa: PLC0415
  from ilm_jax.models import llm_loading  # noqa: PLC0415
  if llm_cfg.tiny:
    path = llm_cfg.source or resources.smollm2_gguf()
    tok = (llm_tokenizer.LlmTokenizer.from_hf(path) if pathlib.Path(path).is_dir()
           else llm_tokenizer.LlmTokenizer.from_gguf(path))
    cfg = llm.LlmConfig.tiny(vocab=tok.vocab_size, bos_id=tok.bos_id or 0,
                             eos_ids=(tok.eos_id,), pad_id=tok.pad_id, dtype=llm_cfg.dtype)
    return llm.Llm(cfg, rngs=nnx.Rngs(int(llm_cfg.seed))), tok
  return llm_loading.load(llm_cfg.source or None, dtype=llm_cfg.dtype)


def phase1_dir(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> pathlib.Path:
  """``config.phase1_dir`` or the workdir (where the phase1 job leaves its Q-Former)."""
  return pathlib.Path(config.phase1_dir or workdir)


def method_name(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> str:
  """The SPEC §8 method of this run: ``config.method`` if set; else text-only / mlp /
  ilm-rand by variant, and for 'ilm' the Phase 1 variant recorded in the Phase 1 dir's
  ``results.json`` (one phase1 method there), falling back to ``config.phase1_variant``.
  """
  if config.get("method"):
    return str(config.method)
  fixed = {"text": "text-only", "mlp": "mlp", "rand": "ilm-rand"}
  if config.variant in fixed:
    return fixed[config.variant]
  from ilm_jax.evals import results  # noqa: PLC0415
  try:
    recs = results.read_results(phase1_dir(config, workdir))
  except (OSError, ValueError):
    recs = []
  found = sorted({r["method"] for r in recs if r.get("task") == "phase1"})
  if len(found) == 1:
    return found[0]
  return phase1.METHODS[config.phase1_variant]


def output_dir(workdir: str | os.PathLike, method: str) -> pathlib.Path:
  """``WORKDIR/phase2/<method>``: training checkpoints, metrics and the trained state."""
  return pathlib.Path(workdir) / PHASE2_DIR / method


def cf_path(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> pathlib.Path:
  """The CF npz this run uses.

  The Q-Former was trained on one CF table; Phase 2 must feed it the same one, so for
  'ilm' the default is the Phase 1 dir's ``cf/embeddings.npz`` (else the workdir's);
  ``config.cf_path`` overrides.
  """
  from ilm_jax.jobs import cf as cf_job  # noqa: PLC0415
  if config.cf_path:
    return pathlib.Path(config.cf_path).absolute()
  base = phase1_dir(config, workdir) if config.variant == "ilm" else pathlib.Path(workdir)
  return cf_job.embeddings_path(base).absolute()


def cf_tables(config: ml_collections.ConfigDict, workdir: str | os.PathLike, ds
              ) -> tuple[np.ndarray, np.ndarray]:
  """(item_emb float32[N, d], user_emb float32[U, d]) from ``cf_path`` (absent: weighted ALS
  is trained on the train split and saved there, as the phase1 job does)."""
  from ilm_jax.data import types  # noqa: PLC0415
  from ilm_jax.jobs import phase1 as phase1_job  # noqa: PLC0415
  base = phase1_dir(config, workdir) if config.variant == "ilm" else pathlib.Path(workdir)
  sub = ml_collections.ConfigDict({"cf_path": config.cf_path, "mf": config.mf.to_dict()})
  emb = phase1_job.cf_embeddings(sub, base, ds, types.leave_one_out(ds))
  return np.asarray(emb.item_emb, np.float32), np.asarray(emb.user_emb, np.float32)


def _build(meta: dict[str, Any], llm_model: llm.Llm, item_emb: np.ndarray,
           user_emb: np.ndarray, qformer: qformer_lib.QFormer | None = None) -> ILM:
  """The ILM skeleton ``meta`` describes; ``qformer`` (with weights) replaces a random one."""
  rngs = nnx.Rngs(int(meta["seed"]))
  d = llm_model.config.dim
  variant = meta["variant"]
  if variant in ("ilm", "rand"):
    if qformer is None:
      qformer = qformer_lib.QFormer(qformer_lib.QFormerConfig(**meta["qformer"]), rngs=rngs)
    encoder = adaptors.QFormerAdaptor(qformer, d, rngs=rngs)
  elif variant == "mlp":
    encoder = adaptors.MlpAdaptor(item_emb.shape[1], int(meta["mlp_hidden"]),
                                  int(meta["mlp_tokens"]), d, rngs=rngs)
  elif variant == "text":
    encoder = None
  else:
    raise ValueError(f"variant {variant!r}; valid: {', '.join(VARIANTS)}")
  return ILM(llm_model, encoder, item_emb, user_emb, retrieval_dim=int(meta["retrieval_dim"]),
             rngs=rngs)


def build_ilm(config: ml_collections.ConfigDict, workdir: str | os.PathLike, ds,
              llm_model: llm.Llm | None = None) -> ILM:
  """The untrained Phase 2 model ``config`` (configs/phase2.py) describes.

  'ilm' loads the Phase 1 Q-Former from ``phase1_dir`` (``phase1.load_qformer``); 'rand'
  builds the Phase 1 architecture from ``config.qformer`` with Phase 1's starting weights
  (``jobs.phase1.build_qformer``); 'mlp' / 'text' need no Phase 1.

  Args:
    config: the phase2 config.
    workdir: the run folder (Phase 1 dir and CF embeddings default to it).
    ds: the dataset (``RecDataset``; CF tables must match it).
    llm_model: an already loaded frozen LLM (default: ``load_llm(config.llm)``).

  Returns:
    The ILM (host arrays).
  """
  variant = config.variant
  if variant not in VARIANTS:
    raise ValueError(f"config.variant={variant!r}; valid: {', '.join(VARIANTS)}")
  item_emb, user_emb = cf_tables(config, workdir, ds)
  qformer = None
  if variant == "ilm":
    from ilm_jax import phase1  # noqa: PLC0415
    qformer = phase1.load_qformer(phase1_dir(config, workdir))
  elif variant == "rand":
    from ilm_jax.jobs import phase1 as phase1_job  # noqa: PLC0415
    qformer = phase1_job.build_qformer(config.qformer, item_emb.shape[1])
  if qformer is not None and qformer.cfg.cf_dim != item_emb.shape[1]:
    raise ValueError(f"the Q-Former takes {qformer.cfg.cf_dim}-d CF vectors but "
                     f"{cf_path(config, workdir)} holds {item_emb.shape[1]}-d ones")
  if llm_model is None:
    llm_model, _ = load_llm(config.llm)
  meta = _meta(config, qformer)
  return _build(meta, llm_model, item_emb, user_emb, qformer)


def _meta(config: ml_collections.ConfigDict, qformer: qformer_lib.QFormer | None
          ) -> dict[str, Any]:
  import dataclasses  # noqa: PLC0415
  meta: dict[str, Any] = dict(
      variant=config.variant, seed=int(config.seed), retrieval_dim=int(config.retrieval.dim),
      llm=config.llm.to_dict(), frozen=list(config.train.frozen),
      mlp_hidden=int(config.mlp.hidden), mlp_tokens=int(config.mlp.num_tokens))
  if qformer is not None:
    meta["qformer"] = dataclasses.asdict(qformer.cfg)
  return meta


def build_meta(config: ml_collections.ConfigDict, workdir: str | os.PathLike, model: ILM
               ) -> dict[str, Any]:
  """What ``load_trained`` needs to rebuild ``model``'s skeleton (saved as ``ilm.json``)."""
  qformer = model.encoder.qformer if model.encoder_kind == "qformer" else None
  return {**_meta(config, qformer), "method": method_name(config, workdir),
          "cf_path": str(cf_path(config, workdir))}


# ==== Saving / loading the trained state =================================================

def save_trained(directory: str | os.PathLike, model: ILM, meta: dict[str, Any],
                 frozen: Sequence[str]) -> pathlib.Path:
  """Writes the trainable params (orbax) and ``meta`` (+ CF path) under ``directory``."""
  directory = pathlib.Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  _, trainable, _ = partition.split_trainable(model, tuple(frozen))
  state = jax.device_get(nnx.to_pure_dict(trainable))
  checkpoint.save_pytree(directory / PARAMS_DIR, state)
  (directory / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
  return directory


def trained_dir(workdir_or_dir: str | os.PathLike, config: ml_collections.ConfigDict | None
                ) -> pathlib.Path:
  """The folder holding ``ilm.json``: the path itself, or ``PATH/phase2/<method>``."""
  p = pathlib.Path(workdir_or_dir)
  if (p / META_FILE).exists():
    return p
  root = p / PHASE2_DIR
  if config is not None:
    d = output_dir(p, method_name(config, p))
    if (d / META_FILE).exists():
      return d
  found = sorted(q.parent for q in root.glob(f"*/{META_FILE}")) if root.exists() else []
  if len(found) == 1:
    return found[0]
  raise FileNotFoundError(
      f"{p}: no trained Phase 2 model ({META_FILE}) here or under {root}"
      + (f"; several: {[q.name for q in found]} (pass one folder)" if found else ""))


def load_trained(workdir_or_ckpt: str | os.PathLike, config: ml_collections.ConfigDict | None,
                 ds, llm_model: llm.Llm | None = None) -> ILM:
  """The trained Phase 2 model: fresh frozen LLM + CF tables, trained params restored.

  Args:
    workdir_or_ckpt: a folder with ``ilm.json`` (``WORKDIR/phase2/<method>``) or the
      workdir (the method comes from ``config``, or the only one there).
    config: the phase2 config (may be None when the folder is given); the skeleton is
      rebuilt from the saved ``ilm.json``, not from the config.
    ds: the dataset (its size must match the saved CF tables).
    llm_model: an already loaded frozen LLM (must be the one ``ilm.json`` names).

  Returns:
    The ILM with the trained params (host arrays). Params frozen in Phase 2 other than
    the LLM (the Q-Former's unused text branch) are not saved and come back randomly
    initialised: use the Phase 1 checkpoint for Phase 1 style text retrieval.
  """
  from ilm_jax.cf import mf  # noqa: PLC0415
  directory = trained_dir(workdir_or_ckpt, config).absolute()
  meta = json.loads((directory / META_FILE).read_text())
  if llm_model is None:
    llm_model, _ = load_llm(ml_collections.ConfigDict(meta["llm"]))
  emb = mf.load_embeddings(meta["cf_path"])
  emb.check_matches(ds)
  model = _build(meta, llm_model, np.asarray(emb.item_emb, np.float32),
                 np.asarray(emb.user_emb, np.float32))
  _, trainable, _ = partition.split_trainable(model, tuple(meta["frozen"]))
  target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), nnx.to_pure_dict(trainable))
  restored = checkpoint.restore_pytree(directory / PARAMS_DIR, target)
  nnx.replace_by_pure_dict(trainable, restored)
  nnx.update(model, trainable)
  return model
