"""Phase 2 data: task samples from the train split, static-shape tokenisation, Grain batches.

Pipeline (everything host-side numpy, built once; ``build`` runs the first three):

  train_samples(ds, split, ...)      list[prompts.Sample], train split only: OpenP5
                                     sequential/straightforward (10 templates each, never
                                     the held-out one) + conversational tasks, mixed by
                                     ``weights``
  PromptEncoder(tokenizer, ds, ...)  chat template + slots -> ids; caches the ids of
                                     repeated strings ("item_1234", template pieces)
  encode_examples(samples, encoder)  dict of static arrays (below)
  phase2_dataset(examples, ...)      Grain MapDataset of shuffled batches, optionally of
                                     similar lengths with the padding cut to a multiple
                                     (``pipeline.length_grouped_batches``: seeded, repeat,
                                     per-process blocks, resumable via ``to_iterator``)

Example arrays (T = ``max_len``, S = ``max_slots``, K = ``soft_tokens``):
  input_ids int32[T]  token ids, right-padded; each slot's K positions hold ``pad_id``
  attn_mask bool[T]   True on real positions (tokens and slot placeholders)
  loss_mask bool[T]   True where ``input_ids[t]`` is an answer token (assistant content
                      plus the end-of-turn token that closes it). Convention: the mask
                      marks LABEL positions, so the loss is
                      ``masked_lm_loss(logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:])``
                      (as ``losses.itg_loss``); ``loss_mask[0]`` is always False
  slot_ids int32[S]   entity index (item or user), 0 where empty
  slot_kind int32[S]  ``SLOT_ITEM`` 0, ``SLOT_USER`` 1, ``SLOT_EMPTY`` -1
  slot_pos int32[S]   first of the slot's K consecutive positions; -1 where empty
  target_item int32[], user int32[], task int32[] (``prompts.TASK_ID``),
  template int32[] (OpenP5 template index, ``prompts.UNSEEN`` = held out, -1 otherwise)

Eval prompts (``render_eval_prompt`` / ``encode_prompts``) are the same arrays without the
answer: the chat template's generation prompt ends them, ``prompt_len`` int32[] gives the
real length. They are right-padded: ``generation.*`` takes ``mask`` (= attn_mask) and
counts real positions, so right padding works; to left-pad instead, roll each row by
``T - prompt_len`` (and shift ``slot_pos`` by the same amount).

Truncation: when a sample does not fit T (or S), its history loses its oldest items until
it fits (at least one item stays); answers are never cut. Training samples that cannot fit
even so are dropped (``encode_examples`` returns their number and logs it); eval prompts
that cannot fit raise.

Soft tokens off (``soft_tokens=0``) is the text-only baseline: no placeholders, items are
named by id or title only. ``user_soft_tokens=False`` drops user slots only.
"""

from __future__ import annotations

import collections
import itertools
import logging
import re
from collections.abc import Mapping, Sequence

import grain
import ml_collections
import numpy as np

from ilm_jax.chat import tools as chat_tools
from ilm_jax.data import pipeline
from ilm_jax.data import prompts as P
from ilm_jax.data.types import RecDataset, Split
from ilm_jax.llm_tokenizer import LlmTokenizer

log = logging.getLogger(__name__)

SLOT_ITEM, SLOT_USER, SLOT_EMPTY = 0, 1, -1
_KIND = {P.ITEM: SLOT_ITEM, P.USER: SLOT_USER}
MAX_HISTORY = 20  # OpenP5: last 20 items
DEFAULT_WEIGHTS = {"sequential": 1.0, "straightforward": 0.5, "describe": 0.1,
                   "attributes": 0.1, "compare": 0.1, "taste": 0.1, "reason": 0.1,
                   "multiturn": 0.1, "tool_call": 0.02}
EXAMPLE_KEYS = ("input_ids", "attn_mask", "loss_mask", "slot_ids", "slot_kind", "slot_pos",
                "target_item", "user", "task", "template")
TIME_KEYS = ("input_ids", "attn_mask", "loss_mask")  # the [R, T] arrays


# ============================================================================ encoder


class PromptEncoder:
  """Renders ``prompts.Sample``s with the chat template into token ids and slot positions.

  Attributes:
    tokenizer: the LLM tokenizer.
    soft_tokens: K placeholder positions per slot (0 = text-only baseline).
    user_soft_tokens: whether user slots get placeholders.
    max_len: T; max_slots: S.
    pad_id: filler id for padding and slot placeholders.
    end_id: the end-of-turn id that closes every answer (in the loss; the trie's end id).
  """

  def __init__(self, tokenizer: LlmTokenizer, ds: RecDataset, *, soft_tokens: int = 4,
               user_soft_tokens: bool = True, max_len: int = 320,
               max_slots: int = MAX_HISTORY + 2, system: str | None = None):
    """Args:
      tokenizer: the LLM tokenizer (must have a chat template).
      ds: the dataset (item tokens and titles are pre-encoded).
      soft_tokens: K.
      user_soft_tokens: place K soft tokens after "user_<u>".
      max_len: T.
      max_slots: S.
      system: a system message for every sample; None = the chat template's default.
    """
    if soft_tokens < 0 or max_len < 8 or max_slots < 1:
      raise ValueError(f"soft_tokens={soft_tokens}, max_len={max_len}, max_slots={max_slots}: "
                       "need K >= 0, T >= 8, S >= 1")
    if ds.item_tokens is None or ds.user_tokens is None:
      raise ValueError("dataset has no item/user tokens; load it with sources.load_dataset "
                       "(or sources.ensure_tokens)")
    self.tokenizer = tokenizer
    self.soft_tokens = int(soft_tokens)
    self.user_soft_tokens = bool(user_soft_tokens)
    self.max_len, self.max_slots = int(max_len), int(max_slots)
    self.pad_id = int(tokenizer.pad_id)
    self.system = system
    self._cache: dict[str, list[int]] = {}
    self._skeletons: dict[tuple, list[list[int]]] = {}
    self._stop = set(tokenizer.stop_ids)
    self._pads = [self.pad_id] * self.soft_tokens
    tok = list(ds.item_tokens)
    titles = [P.item_name(t, "") if t.strip() else "" for t in ds.item_titles]
    self.prefetch([f" item_{t}" for t in tok] + [f" {t}" for t in titles if t] + [" ,"])
    self._item_id = [self._cache[f" item_{t}"] for t in tok]
    self._item_title = [self._cache[f" {t}"] if t else self._item_id[i]
                        for i, t in enumerate(titles)]
    self._sep = self._cache[" ,"]
    probe = self._skeleton(("user", "assistant"), False)[2]
    if not probe or probe[0] not in self._stop:
      raise ValueError("the chat template does not close an assistant turn with an "
                       f"end-of-turn token ({tokenizer.stop_ids}); cannot mark answers")
    self.end_id = int(probe[0])

  # -------------------------------------------------------------- strings

  def prefetch(self, texts) -> None:
    """Encodes (batched) every string not cached yet."""
    todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
    if todo:
      for t, ids in zip(todo, self.tokenizer.encode_batch(todo), strict=True):
        self._cache[t] = ids

  def encode_text(self, text: str) -> list[int]:
    ids = self._cache.get(text)
    if ids is None:
      ids = self._cache[text] = self.tokenizer.encode(text)
    return ids

  def _skeleton(self, roles: tuple[str, ...], add_generation_prompt: bool) -> list[list[int]]:
    """Ids of the chat template's text around the turns' contents: len(roles) + 1 pieces."""
    key = (roles, add_generation_prompt)
    if key not in self._skeletons:
      marks = [f"\ue000{i}\ue001" for i in range(len(roles))]
      text = self.tokenizer.apply_chat_template(
          [{"role": r, "content": m} for r, m in zip(roles, marks, strict=True)],
          add_generation_prompt=add_generation_prompt)
      pieces = re.split("\ue000\\d+\ue001", text)
      if len(pieces) != len(roles) + 1 or any(m not in text for m in marks):
        raise ValueError(f"chat template did not render each of the turns {roles} once")
      self._skeletons[key] = [self.encode_text(p) for p in pieces]
    return self._skeletons[key]

  # -------------------------------------------------------------- rendering

  def _slot_len(self, kind: str) -> int:
    if kind == P.USER and not self.user_soft_tokens:
      return 0
    return self.soft_tokens

  def _render(self, sample: P.Sample, prompt_only: bool, drop: int):
    """(ids, answer ranges [(start, end)], slots [(pos, kind, index)], shortenable history).

    The history is returned as (item-name ids per kept item) so ``render`` can compute
    how many of its oldest items to drop.
    """
    turns = sample.turns
    if self.system is not None and turns[0].role != "system":
      turns = (P.Turn("system", (self.system,)),) + turns
    if prompt_only:
      if turns[-1].role != "assistant":
        raise ValueError(f"{sample.task} sample does not end with an answer turn")
      turns = turns[:-1]
    skel = self._skeleton(tuple(t.role for t in turns), prompt_only)
    ids: list[int] = []
    answers: list[tuple[int, int]] = []
    slots: list[tuple[int, int, int]] = []
    hist: list[list[int]] = []
    k_item = self.soft_tokens
    for j, turn in enumerate(turns):
      ids += skel[j]
      start = len(ids)
      for p in turn.content:
        if isinstance(p, str):
          ids += self.encode_text(p)
        elif isinstance(p, P.Slot):
          k = self._slot_len(p.kind)
          if k:
            slots.append((len(ids), _KIND[p.kind], p.index))
            ids += [self.pad_id] * k
        else:
          names = self._item_id if p.style == "id" else self._item_title
          items = p.items[drop:] if p.truncatable else p.items
          if p.truncatable:
            hist = [names[i] for i in items]
          # Hot loop (every sequential example): no per-token work.
          sep, pad = self._sep, self._pads
          for n, i in enumerate(items):
            if n:
              ids += sep
            ids += names[i]
            if k_item:
              slots.append((len(ids), SLOT_ITEM, i))
              ids += pad
      if turn.role == "assistant":
        # The end-of-turn token that the template puts right after the answer is part
        # of the answer: the model must learn to stop (and the trie ends with it).
        nxt = skel[j + 1]
        end = len(ids) + (1 if nxt and nxt[0] in self._stop else 0)
        answers.append((start, end))
    ids += skel[-1]
    return ids, answers, slots, hist

  def render(self, sample: P.Sample, prompt_only: bool = False):
    """Renders one sample, truncating its history (oldest first) to fit T and S.

    At least one history item is kept; answers are never cut.

    Returns:
      (ids list[int], answer ranges [(start, end)], slots [(pos, kind, index)]), or None
      when the sample cannot fit.
    """
    drop = 0
    while True:
      ids, answers, slots, hist = self._render(sample, prompt_only, drop)
      over_t, over_s = len(ids) - self.max_len, len(slots) - self.max_slots
      if over_t <= 0 and over_s <= 0:
        return ids, answers, slots
      if len(hist) <= 1:
        return None
      # Dropping item j saves its name, its K placeholders and one separator.
      cost = np.cumsum([len(h) + self.soft_tokens + len(self._sep) for h in hist[:-1]])
      d = max(int(np.searchsorted(cost, over_t)) + 1, over_s * (self.soft_tokens > 0), 1)
      drop += min(d, len(hist) - 1)


# ============================================================================ arrays


def _empty(n: int, t: int, s: int, pad_id: int, with_loss: bool) -> dict[str, np.ndarray]:
  out = {"input_ids": np.full((n, t), pad_id, np.int32), "attn_mask": np.zeros((n, t), bool),
         "slot_ids": np.zeros((n, s), np.int32), "slot_kind": np.full((n, s), SLOT_EMPTY, np.int32),
         "slot_pos": np.full((n, s), -1, np.int32), "target_item": np.zeros(n, np.int32),
         "user": np.zeros(n, np.int32), "task": np.zeros(n, np.int32),
         "template": np.zeros(n, np.int32)}
  if with_loss:
    out["loss_mask"] = np.zeros((n, t), bool)
  else:
    out["prompt_len"] = np.zeros(n, np.int32)
  return out


def _prefetch_samples(samples: Sequence[P.Sample], encoder: PromptEncoder) -> None:
  texts = set()
  for s in samples:
    for turn in s.turns:
      for p in turn.content:
        if isinstance(p, str):
          texts.add(p)
  if encoder.system is not None:
    texts.add(encoder.system)
  encoder.prefetch(sorted(texts))


def _encode(samples: Sequence[P.Sample], encoder: PromptEncoder, prompt_only: bool):
  _prefetch_samples(samples, encoder)
  rendered = [encoder.render(s, prompt_only) for s in samples]
  keep = [i for i, r in enumerate(rendered) if r is not None]
  n = len(keep)
  out = _empty(n, encoder.max_len, encoder.max_slots, encoder.pad_id, not prompt_only)
  # Scatter all rows at once (a python loop of row assignments costs ~10x more).
  lens = np.array([len(rendered[i][0]) for i in keep], np.int64)
  rows = np.repeat(np.arange(n), lens)
  cols = np.arange(rows.size) - np.repeat(np.cumsum(lens) - lens, lens)
  out["input_ids"][rows, cols] = np.fromiter(
      itertools.chain.from_iterable(rendered[i][0] for i in keep), np.int32, rows.size)
  out["attn_mask"][rows, cols] = True
  if prompt_only:
    out["prompt_len"][:] = lens
  else:
    spans = np.array([(r, a, b) for r, i in enumerate(keep) for a, b in rendered[i][1]],
                     np.int64).reshape(-1, 3)
    width = spans[:, 2] - spans[:, 1]
    r = np.repeat(spans[:, 0], width)
    c = np.repeat(spans[:, 1], width) + np.arange(r.size) - np.repeat(np.cumsum(width) - width,
                                                                       width)
    out["loss_mask"][r, c] = True
  slots = np.array([(r, j, pos, kind, idx) for r, i in enumerate(keep)
                    for j, (pos, kind, idx) in enumerate(rendered[i][2])],
                   np.int64).reshape(-1, 5)
  out["slot_pos"][slots[:, 0], slots[:, 1]] = slots[:, 2]
  out["slot_kind"][slots[:, 0], slots[:, 1]] = slots[:, 3]
  out["slot_ids"][slots[:, 0], slots[:, 1]] = slots[:, 4]
  kept = [samples[i] for i in keep]
  out["target_item"][:] = [s.target_item for s in kept]
  out["user"][:] = [s.user for s in kept]
  out["task"][:] = [P.TASK_ID[s.task] for s in kept]
  out["template"][:] = [s.template for s in kept]
  return out, len(samples) - n


def encode_examples(samples: Sequence[P.Sample], encoder: PromptEncoder
                    ) -> tuple[dict[str, np.ndarray], int]:
  """Tokenises training (or validation-loss) samples into static arrays.

  Args:
    samples: from ``train_samples`` / ``eval_samples``.
    encoder: the PromptEncoder (fixes T, S, K).

  Returns:
    (examples: {key in EXAMPLE_KEYS: array[R, ...]} (module doc), dropped: the number of
    samples that could not fit T/S even with their history truncated).
  """
  out, dropped = _encode(samples, encoder, prompt_only=False)
  if dropped:
    log.warning("phase2: %d of %d samples do not fit max_len=%d/max_slots=%d; dropped",
                dropped, len(samples), encoder.max_len, encoder.max_slots)
  return out, dropped


def encode_prompts(samples: Sequence[P.Sample], encoder: PromptEncoder) -> dict[str, np.ndarray]:
  """Eval prompts (no answer; ends with the generation prompt) as static right-padded arrays.

  Returns:
    The example arrays without ``loss_mask``, plus ``prompt_len`` int32[R].

  Raises:
    ValueError: a prompt cannot fit T even with its history truncated to one item.
  """
  out, dropped = _encode(samples, encoder, prompt_only=True)
  if dropped:
    raise ValueError(f"{dropped} eval prompts do not fit max_len={encoder.max_len}")
  return out


def render_eval_prompt(sample: P.Sample, encoder: PromptEncoder) -> dict[str, np.ndarray]:
  """One eval prompt (``encode_prompts`` for a single sample, leading dim removed)."""
  return {k: v[0] for k, v in encode_prompts([sample], encoder).items()}


# ============================================================================ candidates


def item_strings(ds: RecDataset, tokenizer: LlmTokenizer) -> tuple[list[str], list[list[int]]]:
  """The exact OpenP5 target string of every item and its token ids (no end token).

  Build the ranking trie with ``generation.ItemTrie.build(ids, end_id=encoder.end_id)``:
  every training answer is these ids followed by the end-of-turn id, and ids of
  "item_1001" are a prefix of "item_10010"'s, so the end id is needed.

  Returns:
    (strings: N "{dataset} item_{tok}", ids: N lists of token ids), in item index order.
  """
  label = P.dataset_label(ds.name)
  strings = [P.target_string(label, t) for t in ds.item_tokens]
  return strings, tokenizer.encode_batch(strings)


# ============================================================================ samples


def _rng(seed: int, stream: str) -> np.random.Generator:
  return np.random.default_rng([seed, P.TASK_ID.get(stream, 99)])


def _openp5(ds: RecDataset, label: str, task: str, template: int, user: int, history,
            target: int, max_history: int, user_soft_tokens: bool) -> P.Sample:
  hist = history[max(0, len(history) - max_history):].tolist() if task == "sequential" else ()
  return P.openp5_sample(
      task, template, label=label, user=user, user_token=ds.user_tokens[user], history=hist,
      target=target, target_token=ds.item_tokens[target] if target >= 0 else "",
      user_soft_tokens=user_soft_tokens)


def openp5_train_samples(ds: RecDataset, split: Split, task: str, *, seed: int,
                         examples_per_user: int = 10, max_history: int = MAX_HISTORY,
                         user_soft_tokens: bool = True) -> list[P.Sample]:
  """OpenP5 training samples from ``split.train`` only, templates drawn from the 10 seen.

  sequential: per user, up to ``examples_per_user`` positions t >= 1 of the train
  sequence (a seeded choice; all when fewer): target = item t, history = the (last
  ``max_history``) items before t. straightforward: per user, up to
  ``examples_per_user`` distinct train items as targets.

  Returns:
    Samples in user order.
  """
  if task not in P.OPENP5_TASKS:
    raise ValueError(f"task {task!r}; valid: {P.OPENP5_TASKS}")
  rng = _rng(seed, task)
  label = P.dataset_label(ds.name)
  out = []
  first = 1 if task == "sequential" else 0
  for u, seq in enumerate(split.train):
    n = len(seq) - first
    if n <= 0:
      continue
    pos = np.arange(first, len(seq))
    if n > examples_per_user:
      pos = np.sort(rng.choice(pos, examples_per_user, replace=False))
    templates = rng.integers(P.NUM_TRAIN_TEMPLATES, size=len(pos))
    for t, tmpl in zip(pos, templates, strict=True):
      out.append(_openp5(ds, label, task, int(tmpl), u, seq[:t], int(seq[t]), max_history,
                         user_soft_tokens))
  return out


def eval_samples(ds: RecDataset, split: Split, which: str, task: str, template: str = "seen",
                 *, users: Sequence[int] | None = None, max_history: int = MAX_HISTORY,
                 user_soft_tokens: bool = True) -> list[P.Sample]:
  """One OpenP5 sample per user for evaluation on ``which`` ('valid' or 'test').

  target = ``split.targets(which)``, history = ``split.history(which)`` (train, or
  train + valid for test); ``template`` 'seen' (index 0, also trained on) or 'unseen'
  (held out).
  """
  tmpl = {"seen": P.SEEN, "unseen": P.UNSEEN}.get(template)
  if tmpl is None:
    raise ValueError(f"template {template!r}; valid: seen, unseen")
  hist, targets = split.history(which), split.targets(which)
  users = range(len(targets)) if users is None else users
  label = P.dataset_label(ds.name)
  return [_openp5(ds, label, task, tmpl, int(u), np.asarray(hist[u]), int(targets[u]),
                  max_history, user_soft_tokens) for u in users]


# -------------------------------------------------------------------- conversational


class _Facts:
  """Per-item descriptors from ``item_attrs`` for grounded answers."""

  def __init__(self, ds: RecDataset):
    keys = list(ds.item_attrs)
    self.main = next((k for k in ("genres", "categories") if k in keys), keys[0] if keys else "")
    self.keys = [self.main] + [k for k in keys if k != self.main]
    n = max(1, ds.num_items)
    # Values most items share ('Beauty' in every Amazon Beauty category list) say nothing.
    self.values: dict[str, list[list[str]]] = {}
    for k in self.keys:
      counts = collections.Counter(v for vs in ds.item_attrs[k] for v in set(vs))
      common = {v for v, c in counts.items() if c > n / 2}
      self.values[k] = [[v for v in vs if v not in common][:4] for vs in ds.item_attrs[k]]
    self.noun = "movie" if "genres" in keys else "item"

  def of(self, i: int) -> list[str]:
    return [v for k in self.keys for v in self.values[k][i]]


def has_conversational_data(ds: RecDataset) -> bool:
  """Conversational tasks need item text (Clothing has none: OpenP5 tasks only)."""
  return any(t for t in ds.item_text) and bool(ds.item_attrs)


def _title(ds: RecDataset, i: int) -> str:
  return P.item_name(ds.item_titles[i], ds.item_tokens[i])


def _short(text: str, max_words: int) -> str:
  words = text.split()
  if len(words) <= max_words:
    return " ".join(words)
  cut = " ".join(words[:max_words])
  end = cut.rfind(". ")
  return cut[:end + 1] if end > len(cut) // 2 else cut + " ..."


def _turns_describe(ds, f, rng, i, max_words):
  ask = ("Tell me about", "What is", "Can you describe")[rng.integers(3)]
  q = (ask,) + P.item_ref(ds.item_titles[i], ds.item_tokens[i], i) + (
      "?" if ask != "Tell me about" else ".",)
  return [P.Turn("user", q), P.Turn("assistant", (_short(ds.item_text[i], max_words),))]


def _turns_attributes(ds, f, rng, i):
  vals = f.values[f.main][i] if f.main else []
  if not vals:
    vals = f.of(i)[:3]
  key = f.main or "attributes"
  q = (f"Which {key} does",) + P.item_ref(ds.item_titles[i], ds.item_tokens[i], i) + (
      " belong to?",)
  a = f"{_title(ds, i)}: {P.join_list(vals)}." if vals else f"I know no {key} of {_title(ds, i)}."
  return [P.Turn("user", q), P.Turn("assistant", (a,))]


def _turns_compare(ds, f, rng, a, b):
  fa, fb = f.of(a), f.of(b)
  shared = [v for v in fa if v in fb]
  only_a = [v for v in fa if v not in fb][:3]
  only_b = [v for v in fb if v not in fa][:3]
  q = ("How do",) + P.item_ref(ds.item_titles[a], ds.item_tokens[a], a) + (" and",) + (
      P.item_ref(ds.item_titles[b], ds.item_tokens[b], b)) + (" compare?",)
  ta, tb = _title(ds, a), _title(ds, b)
  parts = [f"Both are {P.join_list(shared)}." if shared else "They have little in common."]
  if only_a or only_b:
    parts.append(f"{ta} is {P.join_list(only_a) or 'otherwise similar'}, while {tb} is "
                 f"{P.join_list(only_b) or 'otherwise similar'}.")
  return [P.Turn("user", q), P.Turn("assistant", (" ".join(parts),))]


def _turns_taste(ds, f, hist):
  q = ("I have enjoyed", P.History(tuple(int(i) for i in hist), "title", truncatable=False),
       ". How would you describe my taste?")
  n = len(hist)
  lines = []
  for k in f.keys[:3]:
    c = collections.Counter(v for i in hist for v in f.values[k][i])
    if not c:
      continue
    top = c.most_common(3 if k == f.main else 1)
    lines.append(f"Most common {k}: " + P.join_list([f"{v} ({m} of {n})" for v, m in top]) + ".")
  a = " ".join(lines) or "Your history is too varied to summarise."
  return [P.Turn("user", q), P.Turn("assistant", (a,))]


def _turns_reason(ds, f, hist, target):
  ft = f.of(target)
  best, shared = -1, []
  for h in reversed(hist):  # most recent first
    s = [v for v in f.of(int(h)) if v in ft]
    if len(s) > len(shared):
      best, shared = int(h), s
  q = ("I liked", P.History(tuple(int(i) for i in hist), "title", truncatable=False),
       f". Which {f.noun} should I try next, and why?")
  tt = _title(ds, target)
  if best >= 0:
    a = f"Try {tt}. Like {_title(ds, best)}, it is {P.join_list(shared[:3])}."
  else:
    a = f"Try {tt}: it is {P.join_list(ft[:3]) or 'something new'}, a change from your usual."
  return [P.Turn("user", q), P.Turn("assistant", (a,))]


_TOOL_RECOMMEND = ("Can you recommend something for me?", "What should I watch next?",
                   "Recommend {n} more.", "Suggest {n} more like these.",
                   "What else would I enjoy?")
_TOOL_SEARCH = ("Find me something {v}.", "Search for {v}.", "I'm looking for something {v}.",
                "Do you have anything {v}?", "Show me {v} {noun}s.")
_TOOL_DETAILS = ("Can you look up {t}?", "Give me the details of {t}.",
                 "Look up {t} in the catalogue.")


def _turns_tool_call(ds, f, rng, liked, label):
  """A person who liked ``liked`` (train items, shown as the chat session shows mentions:
  "(items: title + soft tokens)") asks for something; the answer is the tool call, in the
  chat session's format (``chat.tools``: its system prompt, ``format_call``):
  recommend ("recommend 3 more" -> k), search_items (an attribute value of a liked item
  as the query) or item_details (a liked item by its short title)."""
  names = [P.item_name(ds.item_titles[i], ds.item_tokens[i]) for i in liked]
  if sum(len(n.split()) for n in names) > 12:   # long (Amazon) titles: one, to fit T
    liked, names = liked[-1:], names[-1:]
  kind = ("recommend", "search_items", "item_details")[rng.choice(3, p=[0.4, 0.35, 0.25])]
  values = [v for k in f.keys for v in f.values[k][liked[-1]]]
  if kind == "search_items" and not values:
    kind = "recommend"
  if kind == "recommend":
    n = int(rng.integers(2, 8))
    ask = _TOOL_RECOMMEND[rng.integers(len(_TOOL_RECOMMEND))]
    args = {"k": n} if "{n}" in ask else {}
    ask = f"I liked {P.join_list(names)}. " + ask.format(n=n)
  elif kind == "search_items":
    v = re.sub(r"^(a|an|the)\s+", "", values[rng.integers(len(values))].lower())
    ask = f"I liked {P.join_list(names)}. " + _TOOL_SEARCH[
        rng.integers(len(_TOOL_SEARCH))].format(v=v, noun=f.noun)
    args = {"query": v}
  else:
    ask = _TOOL_DETAILS[rng.integers(len(_TOOL_DETAILS))].format(t=names[-1])
    liked, names = liked[-1:], names[-1:]
    args = {"id": names[0]}
  q = P.with_items(ask, names, liked)
  return [P.Turn("system", (chat_tools.system_prompt(label),)), P.Turn("user", q),
          P.Turn("assistant", (chat_tools.format_call(kind, args),))]


def conversational_samples(ds: RecDataset, split: Split, task: str, count: int, *, seed: int,
                           max_history: int = 10, max_words: int = 48) -> list[P.Sample]:
  """``count`` grounded chat samples of ``task`` from train sequences only.

  Items are drawn from users' train sequences (validation/test items never appear);
  answers are computed from ``item_text``/``item_attrs``:
    describe: the item's text (first ``max_words`` words);
    attributes: its genres/categories;
    compare: two consecutive train items, shared and differing attributes;
    taste: the most frequent attributes of the last ``max_history`` train items;
    reason: target = train item t, history = the ``max_history`` items before it, the
      reason = the attributes it shares with the most similar recent history item;
    multiturn: describe/attributes of an item, then a comparison with the next one
      (2-3 turns; every assistant turn is an answer);
    tool_call: with the chat session's tools system prompt, a request about one or two
      liked train items answered by a tool call (``_turns_tool_call``).
  """
  if task not in P.CONVERSATIONAL_TASKS:
    raise ValueError(f"task {task!r}; valid: {P.CONVERSATIONAL_TASKS}")
  if count <= 0 or not has_conversational_data(ds):
    return []
  f = _Facts(ds)
  rng = _rng(seed, task)
  users = [u for u, s in enumerate(split.train) if len(s) >= 2]
  out = []
  for u in rng.choice(users, count, replace=True):
    seq = split.train[u]
    t = int(rng.integers(1, len(seq)))
    a, b = int(seq[t - 1]), int(seq[t])
    target = -1
    if task == "describe":
      turns = _turns_describe(ds, f, rng, a, max_words)
    elif task == "attributes":
      turns = _turns_attributes(ds, f, rng, a)
    elif task == "compare":
      turns = _turns_compare(ds, f, rng, a, b)
    elif task == "taste":
      turns = _turns_taste(ds, f, seq[max(0, t + 1 - max_history):t + 1])
    elif task == "reason":
      target = b
      turns = _turns_reason(ds, f, seq[max(0, t - max_history):t], b)
    elif task == "tool_call":
      turns = _turns_tool_call(ds, f, rng, [int(i) for i in seq[max(0, t - 1):t + 1]],
                               P.dataset_label(ds.name))
    else:
      first = (_turns_describe(ds, f, rng, a, max_words) if rng.random() < 0.5
               else _turns_attributes(ds, f, rng, a))
      turns = first + _turns_compare(ds, f, rng, a, b)
      if rng.random() < 0.5:
        turns += _turns_attributes(ds, f, rng, b)
    out.append(P.Sample(task, tuple(turns), target_item=target, user=int(u)))
  return out


def train_samples(ds: RecDataset, split: Split, *, seed: int = 0, examples_per_user: int = 10,
                  weights: Mapping[str, float] | None = None, max_history: int = MAX_HISTORY,
                  user_soft_tokens: bool = True) -> list[P.Sample]:
  """The Phase 2 multitask training mixture (train split only), in a fixed order.

  Mixture: the sequential pool (``openp5_train_samples``, ``examples_per_user`` per user)
  fixes the scale; every other task t gets ``round(n_seq * w_t / w_sequential)`` samples
  (straightforward: drawn per user up to ``examples_per_user``, then cut). Datasets
  without item text get the OpenP5 tasks only. Shuffling is the pipeline's job.

  Args:
    weights: task -> weight (``DEFAULT_WEIGHTS``); 0 or missing = task off.
  """
  weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
  unknown = set(weights) - set(P.TASKS)
  if unknown:
    raise ValueError(f"unknown task weights {sorted(unknown)}; valid: {P.TASKS}")
  w_seq = float(weights.get("sequential", 0.0))
  seq = openp5_train_samples(ds, split, "sequential", seed=seed,
                             examples_per_user=examples_per_user, max_history=max_history,
                             user_soft_tokens=user_soft_tokens)
  scale = len(seq) / w_seq if w_seq > 0 else float(
      sum(min(examples_per_user, max(0, len(s) - 1)) for s in split.train))
  out = seq if w_seq > 0 else []
  w = float(weights.get("straightforward", 0.0))
  if w > 0:
    sf = openp5_train_samples(ds, split, "straightforward", seed=seed,
                              examples_per_user=examples_per_user, max_history=max_history,
                              user_soft_tokens=user_soft_tokens)
    n = round(scale * w)
    if n < len(sf):
      sf = [sf[i] for i in np.sort(_rng(seed, "straightforward").choice(len(sf), n, False))]
    out += sf
  for task in P.CONVERSATIONAL_TASKS:
    w = float(weights.get(task, 0.0))
    if w > 0:
      out += conversational_samples(ds, split, task, round(scale * w), seed=seed)
  return out


# ============================================================================ one call


def default_config() -> ml_collections.ConfigDict:
  """``config.phase2_data``: the knobs of ``build`` (suggested; the trainer may embed it).

  Keys:
    soft_tokens: K placeholder positions per slot (0 = text-only baseline).
    user_soft_tokens: soft tokens after "user_<u>" too.
    max_len, max_slots: T and S of the static arrays.
    max_history: OpenP5 history length (last 20 items).
    examples_per_user: cap of sequential (and straightforward) samples per user.
    weights: task mixture (see ``train_samples``); 0 turns a task off.
    seed: sample selection seed (the pipeline's shuffle seed is separate).
    system: system message for every sample; '' = the chat template's default.
  """
  c = ml_collections.ConfigDict()
  c.soft_tokens = 4
  c.user_soft_tokens = True
  c.max_len = 320
  c.max_slots = MAX_HISTORY + 2
  c.max_history = MAX_HISTORY
  c.examples_per_user = 10
  c.weights = ml_collections.ConfigDict(dict(DEFAULT_WEIGHTS))
  c.seed = 0
  c.system = ""
  return c


def build(ds: RecDataset, split: Split, tokenizer: LlmTokenizer,
          config: Mapping | None = None) -> tuple[PromptEncoder, dict[str, np.ndarray]]:
  """Training examples for Phase 2 in one call (train split only).

  Args:
    ds, split: the dataset and its leave-one-out split.
    tokenizer: the LLM tokenizer.
    config: ``default_config()`` (or a mapping with its keys); None = defaults.

  Returns:
    (encoder -- reuse it for eval prompts so K/T/S agree, examples -- arrays of
    ``EXAMPLE_KEYS``, R rows).
  """
  c = default_config()
  if config is not None:
    c.update(dict(config))
  encoder = PromptEncoder(tokenizer, ds, soft_tokens=c.soft_tokens,
                          user_soft_tokens=c.user_soft_tokens, max_len=c.max_len,
                          max_slots=c.max_slots, system=c.system or None)
  samples = train_samples(ds, split, seed=c.seed, examples_per_user=c.examples_per_user,
                          weights=dict(c.weights), max_history=c.max_history,
                          user_soft_tokens=c.user_soft_tokens)
  examples, dropped = encode_examples(samples, encoder)
  counts = collections.Counter(examples["task"].tolist())
  log.info("phase2 %s: %d examples (%s), %d dropped, mean length %.0f of %d", ds.name,
           len(examples["task"]), ", ".join(f"{P.TASKS[t]} {n}" for t, n in sorted(counts.items())),
           dropped, examples["attn_mask"].sum(1).mean() if len(samples) else 0, c.max_len)
  return encoder, examples


# ============================================================================ pipeline


def phase2_dataset(examples: Mapping[str, np.ndarray], *, global_batch: int, seed: int,
                   group_by_length: int = 0, pad_multiple: int = 0,
                   process_index: int | None = None, process_count: int | None = None
                   ) -> grain.MapDataset:
  """Infinite shuffled batches of Phase 2 examples (``pipeline.length_grouped_batches``).

  Args:
    examples: ``encode_examples(...)[0]``.
    global_batch: B over all processes; each epoch's last partial batch is dropped.
    seed: shuffle seed.
    group_by_length: batch rows of similar length together, in windows of this many
      batches (0 = plain shuffle, ``pipeline.batches``' order).
    pad_multiple: cut each batch's ``input_ids``/``attn_mask``/``loss_mask`` to its longest
      row rounded up to this (0 = keep T: static [B, T] batches).
    process_index: this process (default ``jax.process_index()``).
    process_count: number of processes (default ``jax.process_count()``).

  Returns:
    MapDataset of {'kind': 'phase2', key: array[B / process_count, ...]}; iterate with
    ``pipeline.to_iterator`` (resumable ``get_state``/``set_state``).
  """
  records = {k: examples[k] for k in EXAMPLE_KEYS}
  return pipeline.length_grouped_batches(
      records, "phase2", lengths=example_lengths(examples), time_keys=TIME_KEYS,
      global_batch=global_batch, seed=pipeline.stream_seed(seed, 2),
      group_by_length=group_by_length, pad_multiple=pad_multiple,
      process_index=process_index, process_count=process_count)


def cut_padding(arrays: Mapping[str, np.ndarray], lengths: np.ndarray, multiple: int = 32
                ) -> dict[str, np.ndarray]:
  """``arrays`` with their ``TIME_KEYS`` cut to the longest of ``lengths`` (rounded up to
  ``multiple``): the right padding no row uses. Other keys are shared, not copied."""
  lengths = np.asarray(lengths)
  limit = np.asarray(arrays["input_ids"]).shape[1]
  t = pipeline.padded_length(int(lengths.max()) if lengths.size else 1, multiple, limit)
  out = dict(arrays)
  for key in TIME_KEYS:
    if key in out:
      out[key] = np.ascontiguousarray(out[key][:, :t])
  return out


def example_lengths(examples: Mapping[str, np.ndarray]) -> np.ndarray:
  """int64[R]: one past each row's last real position (``attn_mask``; rows are right-padded)."""
  mask = np.asarray(examples["attn_mask"], bool)
  last = mask.shape[1] - np.argmax(mask[:, ::-1], axis=1)
  return np.where(mask.any(axis=1), last, 0).astype(np.int64)
