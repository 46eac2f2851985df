"""The model a conversation or the HTTP service uses: an ILM with its item tokens cached.

``ServedModel`` holds the frozen LLM, the catalogue's projected soft tokens
(``item_token_table``, float32[N, K, D], computed once at construction or read from an
export -- serving never runs the Q-Former / MLP per request), the retrieval head's item
keys (float32[N, R], also cached), the frozen CF tables and the catalogue.

Chat prompts are lists of messages whose content interleaves text and item slots
(``prompts.Slot``); ``render`` turns them into ids with K placeholder positions per slot
(the chat template of the LLM, as in Phase 2), ``embeds`` splices the cached tokens in.

Ranking (``recommend``), ``ranker``:
  'cf'         the person's CF vector (a known user's row, or ALS fold-in of the history
               against the frozen item table) dotted with every item's CF vector;
  'retrieval'  the Phase 2 retrieval head on the OpenP5 sequential prompt of the history;
  'blend'      the sum of both, each z-scored over the catalogue.
History items are always excluded.

New items (``add_item``): from a CF vector, or folded in from the users who consumed it
(one ALS half-step against the frozen user table); its soft tokens and retrieval key are
computed once, there and then, and it is rankable and describable at once. No training.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ilm_jax import generation, llm_tokenizer
from ilm_jax.cf import mf
from ilm_jax.chat import catalogue as catalogue_lib
from ilm_jax.data import prompts as P
from ilm_jax.models import ilm as ilm_lib
from ilm_jax.models import llm as llm_lib

RANKERS = ("cf", "retrieval", "blend")
MAX_HISTORY = 20  # OpenP5 shows the last 20 items
# Prompts are left-padded to a multiple of this so growing chats reuse compilations.
PROMPT_BUCKET = 64
_MARK = "\ue000"

Part = str | P.Slot
Message = tuple[str, tuple[Part, ...]]   # (role, content parts)


@jax.jit
def _hidden_last(graphdef, state, embeds, mask):
  model = nnx.merge(graphdef, state)
  _, hidden, _ = model(input_embeds=embeds, mask=mask, compute_logits=False)
  return hidden[:, -1]


class ServedModel:
  """An ILM ready to serve (see the module docstring).

  Attributes:
    ilm: the ``models.ilm.ILM`` (its encoder runs only in ``add_item``).
    tokenizer: the LLM tokenizer (chat template).
    catalogue: ``chat.catalogue.Catalogue`` (grows with ``add_item``).
    item_tokens: float32[N, K, D] cached soft tokens.
    item_keys: float32[N, R] cached retrieval keys.
    cf_items: float32[N, d]; cf_users: float32[U, d] (frozen).
    histories: U int32 arrays, a known user's visible history (train split).
    label: the dataset name as prompts write it ('Generated', 'ML1M').
    user_tokens: U OpenP5 user tokens.
    als: ``mf.ALSConfig`` for fold-in (alpha, reg).
  """

  def __init__(self, ilm: ilm_lib.ILM, tokenizer: llm_tokenizer.LlmTokenizer,
               catalogue: catalogue_lib.Catalogue, *, histories: Sequence[np.ndarray],
               label: str, user_tokens: Sequence[str], item_tokens: np.ndarray | None = None,
               item_keys: np.ndarray | None = None, als: mf.ALSConfig | None = None):
    self.ilm = ilm
    self.llm = ilm.llm
    self.tokenizer = tokenizer
    self.catalogue = catalogue
    self.k = int(ilm.num_soft_tokens)
    self.histories = [np.asarray(h, np.int32) for h in histories]
    self.label = label
    self.user_tokens = [str(t) for t in user_tokens]
    self.als = als or mf.ALSConfig()
    self.cf_items = np.asarray(ilm.cf_items[...], np.float32)
    self.cf_users = np.asarray(ilm.cf_users[...], np.float32)
    if item_tokens is None:   # computed once for the whole catalogue
      item_tokens = np.asarray(jax.jit(lambda m: m.item_token_table())(ilm))
    if item_keys is None:
      item_keys = np.asarray(ilm.retrieval_item_keys(item_tokens=jnp.asarray(item_tokens)))
    self.item_tokens = np.asarray(item_tokens, np.float32)
    self.item_keys = np.asarray(item_keys, np.float32)
    if len(self.item_tokens) != len(catalogue) or len(self.cf_items) != len(catalogue):
      raise ValueError(f"catalogue has {len(catalogue)} items, item tokens "
                       f"{len(self.item_tokens)}, CF table {len(self.cf_items)}")
    self._word_emb = self.llm.embedding[...]
    self._graphdef, self._state = nnx.split(self.llm)
    self.stop_ids = tuple(dict.fromkeys(tuple(tokenizer.stop_ids) + self.llm.config.eos_ids))
    # One model call at a time: JAX on CPU gains nothing from concurrency and the item
    # tables may grow (add_item) between calls.
    self.lock = threading.RLock()

  @property
  def num_items(self) -> int:
    return len(self.item_tokens)

  # ------------------------------------------------------------------ prompts

  def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True
             ) -> tuple[list[int], list[tuple[int, int]]]:
    """Chat messages -> (ids, [(position, item)]): K placeholder ids per item slot.

    The whole conversation is rendered once with the chat template (a private-use mark
    per slot), split at the marks, and each piece is tokenised on its own.
    """
    texts, items = [], []
    for role, parts in messages:
      out = []
      for p in parts:
        if isinstance(p, str):
          out.append(p.replace(_MARK, ""))
        elif p.kind == P.ITEM and self.k:
          out.append(_MARK)
          items.append(int(p.index))
      texts.append({"role": role, "content": "".join(out)})
    text = self.tokenizer.apply_chat_template(texts, add_generation_prompt=add_generation_prompt)
    pieces = text.split(_MARK)
    ids: list[int] = []
    slots: list[tuple[int, int]] = []
    for j, piece in enumerate(pieces):
      if piece:
        ids += self.tokenizer.encode(piece)
      if j < len(items):
        slots.append((len(ids), items[j]))
        ids += [self.tokenizer.pad_id] * self.k
    return ids, slots

  def embeds(self, ids: Sequence[int], slots: Sequence[tuple[int, int]]
             ) -> tuple[jax.Array, jax.Array]:
    """(float[1, T, D] embeddings with the cached item tokens spliced in, bool[1, T] mask).

    Left-padded to a multiple of ``PROMPT_BUCKET``. Uses only the cached table.
    """
    tokens, mask = generation.pad_prompts([list(ids)], self.tokenizer.pad_id,
                                          multiple=PROMPT_BUCKET)
    shift = tokens.shape[1] - len(ids)
    emb = jnp.take(self._word_emb, jnp.asarray(tokens), axis=0).astype(
        jnp.dtype(self.llm.config.dtype))
    if slots and self.k:
      soft = self.item_tokens[[i for _, i in slots]].reshape(1, -1, self.item_tokens.shape[-1])
      pos = np.array([[p + shift + j for p, _ in slots for j in range(self.k)]], np.int32)
      emb = llm_lib.splice_embeddings(emb, jnp.asarray(soft), jnp.asarray(pos))
    return emb, jnp.asarray(mask)

  def generate(self, messages: Sequence[Message], *, max_new_tokens: int = 64,
               temperature: float = 0.0, seed: int = 0) -> str:
    """The assistant's next message (greedy by default), special tokens removed."""
    with self.lock:
      ids, slots = self.render(messages)
      emb, mask = self.embeds(ids, slots)
      out = generation.generate(self.llm, input_embeds=emb, mask=mask,
                                max_new_tokens=max_new_tokens, temperature=temperature,
                                stop_ids=self.stop_ids, pad_id=self.tokenizer.pad_id,
                                rng=jax.random.key(seed))
      n = int(out.lengths[0])
      toks = [int(t) for t in np.asarray(out.tokens[0, :n]) if int(t) not in self.stop_ids]
    return self.tokenizer.decode(toks, skip_special_tokens=True).strip()

  # ------------------------------------------------------------------ ranking

  def user_history(self, user: int) -> np.ndarray:
    if not 0 <= user < len(self.histories):
      raise KeyError(f"unknown user {user} (valid: 0..{len(self.histories) - 1})")
    return self.histories[user]

  def _cf_scores(self, history: Sequence[int], user: int | None) -> np.ndarray:
    if user is not None and not len(history):
      vec = self.cf_users[user]
    else:
      vec = mf.fold_in(self.cf_items, [np.asarray(history, np.int32)], self.als)[0]
    return self.cf_items @ np.asarray(vec, np.float32)

  def sequential_prompt(self, history: Sequence[int], user: int | None = None
                        ) -> list[Message]:
    """The OpenP5 seen sequential prompt of ``history`` (the retrieval head's training)."""
    tok = self.user_tokens[user] if user is not None else "0"
    sample = P.openp5_sample("sequential", P.SEEN, label=self.label, user=user or 0,
                             user_token=tok, history=(), target=-1, target_token="",
                             user_soft_tokens=False)
    parts: list[Part] = []
    for p in sample.turns[0].content:
      if isinstance(p, P.History):
        for n, i in enumerate(list(history)[-MAX_HISTORY:]):
          parts += [(" ," if n else "") + f" item_{self.catalogue.tokens[i]}", P.Slot(P.ITEM, i)]
      else:
        parts.append(p)
    return [("user", tuple(parts))]

  def _retrieval_scores(self, history: Sequence[int], user: int | None) -> np.ndarray:
    ids, slots = self.render(self.sequential_prompt(history, user))
    emb, mask = self.embeds(ids, slots)
    h = _hidden_last(self._graphdef, self._state, emb, mask)
    return np.asarray(self.ilm.retrieval_scores(h, item_keys=jnp.asarray(self.item_keys)))[0]

  def recommend(self, history: Sequence[int] = (), k: int = 5, *, user: int | None = None,
                ranker: str = "cf", exclude: Sequence[int] = ()) -> list[tuple[int, float]]:
    """[(item, score)] best first, the history (and ``exclude``) excluded.

    Args:
      history: items the person consumed/likes, oldest first.
      k: how many.
      user: a known user (dense index): their history is prepended.
      ranker: one of ``RANKERS``.
      exclude: more items never to return.
    """
    if ranker not in RANKERS:
      raise ValueError(f"ranker={ranker!r}; valid: {', '.join(RANKERS)}")
    with self.lock:
      n = self.num_items
      history = [int(i) for i in history]
      bad = [i for i in history + list(exclude) if not 0 <= i < n]
      if bad:
        raise KeyError(f"unknown item ids {bad[:5]} (valid: 0..{n - 1})")
      full = (list(self.user_history(user)) if user is not None else []) + history
      if not full and user is None:
        scores = np.zeros(n, np.float32) - np.arange(n) * 1e-6  # no signal: catalogue order
        if len(self.cf_items):
          scores = np.linalg.norm(self.cf_items, axis=1)  # popular items have big vectors
      elif ranker == "cf":
        scores = self._cf_scores(full, user if not history else None)
      elif ranker == "retrieval":
        scores = self._retrieval_scores(full, user)
      else:
        a, b = self._cf_scores(full, user if not history else None), \
            self._retrieval_scores(full, user)
        scores = (a - a.mean()) / (a.std() + 1e-9) + (b - b.mean()) / (b.std() + 1e-9)
      scores = np.asarray(scores, np.float64).copy()
      scores[np.asarray(full + list(exclude), np.int64)] = -np.inf
      order = np.argsort(-scores, kind="stable")[:max(int(k), 0)]
      return [(int(i), float(scores[i])) for i in order if np.isfinite(scores[i])]

  # ------------------------------------------------------------------ new items

  def add_item(self, title: str, text: str = "", *, cf_vector: np.ndarray | None = None,
               users: Sequence[int] | None = None, attributes: Sequence[str] = ()) -> int:
    """Adds an item without training; returns its index (usable at once).

    Args:
      title, text, attributes: what the catalogue shows.
      cf_vector: float[d] its CF vector, or
      users: the known users who consumed it: its vector is folded in (one ALS half-step
        against the frozen user table).
    """
    if (cf_vector is None) == (users is None):
      raise ValueError("give exactly one of cf_vector or users")
    if users is not None:
      users = np.asarray(sorted(set(int(u) for u in users)), np.int32)
      if not len(users) or users.min() < 0 or users.max() >= len(self.cf_users):
        raise KeyError(f"users must be known user indices 0..{len(self.cf_users) - 1}")
      cf_vector = mf.fold_in(self.cf_users, [users], self.als)[0]
    vec = np.asarray(cf_vector, np.float32).reshape(-1)
    if vec.shape[0] != self.cf_items.shape[1]:
      raise ValueError(f"cf_vector has {vec.shape[0]} dims; the CF table has "
                       f"{self.cf_items.shape[1]}")
    with self.lock:
      # The only encoder call outside construction: once per new item.
      if self.ilm.encoder is not None:
        toks = np.asarray(self.ilm.encoder(jnp.asarray(vec[None])), np.float32)
      else:
        toks = np.zeros((1, 0, self.item_tokens.shape[-1]), np.float32)
      if self.ilm.retrieval.item_table is None:
        key = np.asarray(ilm_lib._normalize(self.ilm.retrieval.item_proj(toks.mean(axis=1))))
      else:  # text-only: no tokens; a new item gets the mean learned representation's key
        rep = jnp.asarray(self.ilm.retrieval.item_table[...]).mean(axis=0, keepdims=True)
        key = np.asarray(ilm_lib._normalize(self.ilm.retrieval.item_proj(rep)))
      self.cf_items = np.concatenate([self.cf_items, vec[None]])
      self.item_tokens = np.concatenate([self.item_tokens, toks])
      self.item_keys = np.concatenate([self.item_keys, key.astype(np.float32)])
      return self.catalogue.add(title, text, attributes=attributes)


def from_dataset(ilm: ilm_lib.ILM, tokenizer: llm_tokenizer.LlmTokenizer, ds,
                 als: mf.ALSConfig | None = None) -> ServedModel:
  """A ServedModel over ``ds`` (known users' histories = the train split)."""
  from ilm_jax.data import types  # noqa: PLC0415
  split = types.leave_one_out(ds)
  return ServedModel(ilm, tokenizer, catalogue_lib.Catalogue.from_dataset(ds),
                     histories=split.history("test"), label=P.dataset_label(ds.name),
                     user_tokens=ds.user_tokens, als=als)
