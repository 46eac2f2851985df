"""Phase 2 prompts: conversations whose text interleaves item/user slots (SPEC §5).

A prompt is a ``Sample``: a task name plus chat turns; each turn's content is a tuple of
parts:

  str              literal text
  Slot(kind, i)    an entity slot: K soft-token positions (kind 'item' or 'user', dense
                   index i) whose input embeddings Phase 2 replaces with projected
                   Q-Former outputs; the text naming the entity ("item_1234", a title)
                   is a separate ``str`` part just before it
  History(items)   a user's history, most recent last: expands to
                   ``"item_<tok>" Slot , "item_<tok>" Slot , ...`` (style 'id') or
                   ``"<title>" Slot , ...`` (style 'title'); the only part truncation may
                   shorten (oldest first)

Every sample is rendered with the LLM's chat template (``phase2.PromptEncoder``): user
turns are prompt, assistant turns are answers (the loss covers them). OpenP5 tasks are a
single user turn answered by the target string ``"{dataset} item_{tok}"``.

Tokenisation boundary rule (why the spaces sit where they do): parts are encoded one by
one and their ids concatenated, so the ids of repeated parts ("item_1234", template
pieces) are computed once. A part that follows another starts with a space and no part
ends with one, so the concatenation equals the tokenisation of the whole string -- exactly
so for every OpenP5 prompt (tested); in conversations punctuation may follow a title
("... (1995)?") and is then tokenised on its own, as it must be when a slot sits there.

Dataset names in prompts (``dataset_label``) follow OpenP5's spelling: ml1m -> 'ML1M',
beauty -> 'Beauty', clothing -> 'Clothing', generated -> 'Generated'; any other name is
used with its first letter upper-cased ('yelp' -> 'Yelp').
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence

# ---------------------------------------------------------------------------- parts

ITEM, USER = "item", "user"


@dataclasses.dataclass(frozen=True)
class Slot:
  """K soft-token positions for one entity: ``kind`` 'item' or 'user', dense ``index``."""

  kind: str
  index: int


@dataclasses.dataclass(frozen=True)
class History:
  """A user's items, oldest first; 'id' style names them "item_<tok>", 'title' by title.

  ``truncatable=False`` when the answer depends on every item shown (a taste summary):
  such a sample is dropped rather than shortened when it does not fit.
  """

  items: tuple[int, ...]
  style: str = "id"
  truncatable: bool = True


Part = str | Slot | History


@dataclasses.dataclass(frozen=True)
class Turn:
  """One chat message: ``role`` in {system, user, assistant}; assistant turns are answers."""

  role: str
  content: tuple[Part, ...]


@dataclasses.dataclass(frozen=True)
class Sample:
  """One Phase 2 example before tokenisation.

  Attributes:
    task: a name in ``TASKS``.
    turns: the conversation; the last turn is the assistant's answer (training) --
      ``phase2.render_eval_prompt`` drops it for generation.
    target_item: the item the answer names (OpenP5 target, recommended item) or -1.
    user: dense user index or -1.
    template: OpenP5 template index (``UNSEEN`` = the held-out one) or -1.
  """

  task: str
  turns: tuple[Turn, ...]
  target_item: int = -1
  user: int = -1
  template: int = -1


# Append only: a task's id (its index) is stored in built examples and seeds its sampler.
TASKS = ("sequential", "straightforward", "describe", "attributes", "compare", "taste",
         "reason", "multiturn", "tool_call")
OPENP5_TASKS = TASKS[:2]
CONVERSATIONAL_TASKS = TASKS[2:]
TASK_ID = {t: i for i, t in enumerate(TASKS)}

# ---------------------------------------------------------------------------- dataset names

_LABELS = {"ml1m": "ML1M", "ml100k": "ML100K", "beauty": "Beauty", "clothing": "Clothing",
           "sports": "Sports", "toys": "Toys", "lastfm": "LastFM", "cds": "CDs",
           "yelp": "Yelp", "taobao": "Taobao", "generated": "Generated"}


def dataset_label(name: str) -> str:
  """The dataset name as OpenP5 writes it in prompts ('ml1m' -> 'ML1M'; see module doc)."""
  if not name or any(c.isspace() for c in name):
    raise ValueError(f"dataset name {name!r} must be a non-empty word (it is part of every "
                     "prompt and target string)")
  return _LABELS.get(name.lower(), name[:1].upper() + name[1:])


def target_string(label: str, item_token: str) -> str:
  """The OpenP5 answer / candidate string of an item: ``"{dataset} item_{tok}"``."""
  return f"{label} item_{item_token}"


# ---------------------------------------------------------------------------- OpenP5 templates
# Index 0 of each list is the seen test template (SPEC §5) and is also trained on; UNSEEN
# (index 10) is the held-out one and never appears in training. Placeholders: {dataset},
# {user} ("user_<u>" + the user's soft tokens), {history}; {user} and {history} are always
# preceded by a space (see the boundary rule in the module doc).

SEQUENTIAL_TEMPLATES = (
    "Considering {dataset} {user} has interacted with {dataset} items {history} . What is "
    "the next recommendation for the user ?",
    "Here is the purchase history of {dataset} {user} : {dataset} item {history} . What to "
    "recommend next for the user ?",
    "{dataset} {user} has interacted with {dataset} items {history} . What is the next item "
    "to recommend to the user ?",
    "Given the following interaction history of {dataset} {user} : {history} . What is the "
    "next item the user would interact with ?",
    "Based on the history {history} of {dataset} {user} , predict the next {dataset} item .",
    "{dataset} {user} has recently interacted with {dataset} items {history} . Which "
    "{dataset} item should be recommended next ?",
    "According to what {dataset} {user} has interacted with : {history} , can you recommend "
    "the next {dataset} item ?",
    "I find the interaction history of {dataset} {user} : {history} . I wonder what is the "
    "next item to recommend to the user . Can you help me decide ?",
    "Here is the item interaction history of {dataset} {user} : {history} . What to "
    "recommend next ?",
    "Please predict the next {dataset} item for {dataset} {user} , given the items "
    "{history} .",
    # UNSEEN (held out):
    "What is the top recommended item for {dataset} {user} who interacted with {dataset} "
    "item {history} ?",
)

STRAIGHTFORWARD_TEMPLATES = (
    "What should we recommend for {dataset} {user} ?",
    "{dataset} {user} is looking for a new {dataset} item . What would you recommend ?",
    "Which {dataset} item would {dataset} {user} like ?",
    "Recommend a {dataset} item for {dataset} {user} .",
    "What {dataset} item should be recommended to {dataset} {user} ?",
    "Can you pick a {dataset} item that {dataset} {user} would enjoy ?",
    "Please recommend an item to {dataset} {user} .",
    "What is a good {dataset} item for {dataset} {user} ?",
    "Suggest the next {dataset} item for {dataset} {user} .",
    "Which item should {dataset} {user} interact with ?",
    # UNSEEN (held out):
    "What is the top recommendation for {dataset} {user} ?",
)

TEMPLATES = {"sequential": SEQUENTIAL_TEMPLATES, "straightforward": STRAIGHTFORWARD_TEMPLATES}
SEEN, UNSEEN = 0, 10
NUM_TRAIN_TEMPLATES = 10

_PLACEHOLDER = re.compile(r" ?\{(user|history)\}")


@functools.lru_cache(maxsize=256)
def _parsed(task: str, template: int, label: str) -> tuple[tuple[str, str], ...]:
  """Template -> (kind, text) pieces: ('text', s), ('user', lead), ('history', lead)."""
  text = TEMPLATES[task][template].replace("{dataset}", label)
  out, pos = [], 0
  for m in _PLACEHOLDER.finditer(text):
    if m.start() > pos:
      out.append(("text", text[pos:m.start()]))
    out.append((m.group(1), " " if m.group(0).startswith(" ") else ""))
    pos = m.end()
  if pos < len(text):
    out.append(("text", text[pos:]))
  return tuple(out)


def openp5_sample(task: str, template: int, *, label: str, user: int, user_token: str,
                  history: Sequence[int], target: int, target_token: str,
                  user_soft_tokens: bool = True) -> Sample:
  """One OpenP5 prompt (a user turn) and its answer ``"{dataset} item_{tok}"``.

  Args:
    task: 'sequential' or 'straightforward'.
    template: index into ``TEMPLATES[task]`` (``SEEN``, ..., ``UNSEEN``).
    label: ``dataset_label(ds.name)``.
    user: dense user index; ``user_token`` its OpenP5 token ('12').
    history: dense item indices, oldest first (the caller keeps the last 20); ignored by
      straightforward templates.
    target: dense target item (-1 for none); ``target_token`` its OpenP5 token.
    user_soft_tokens: put a user slot after "user_<u>".

  Returns:
    The Sample (``template`` recorded, ``UNSEEN`` for the held-out one).
  """
  parts: list[Part] = []
  for kind, text in _parsed(task, template, label):
    if kind == "text":
      parts.append(text)
    elif kind == "user":
      parts.append(f"{text}user_{user_token}")
      if user_soft_tokens:
        parts.append(Slot(USER, user))
    else:
      parts.append(History(tuple(map(int, history)), "id"))
  answer = (target_string(label, target_token),) if target >= 0 else ()
  return Sample(task, (Turn("user", tuple(parts)), Turn("assistant", answer)),
                target_item=int(target), user=int(user), template=int(template))


# ---------------------------------------------------------------------------- conversations


TITLE_WORDS = 8
_DANGLING = {"", "and", "with", "by", "for", "of", "the", "a", "an", "in", "to", "or"}


def with_items(text: str, names: Sequence[str], items: Sequence[int]) -> tuple:
  """A person's message followed by the items it mentions, as the chat session shows them
  to the model: ``text (items: name <item tokens>, name <item tokens>)``."""
  parts: list = [text]
  if items:
    parts.append(" (items:")
    for n, (name, i) in enumerate(zip(names, items, strict=True)):
      parts += [("," if n else "") + " " + name, Slot(ITEM, int(i))]
    parts.append(")")
  return tuple(parts)


def item_name(title: str, item_token: str) -> str:
  """How a conversation names an item: its title cut to ``TITLE_WORDS`` words (Amazon
  titles run to 270 tokens), else "item_<tok>"."""
  words = title.split()
  if not words:
    return f"item_{item_token}"
  if len(words) > TITLE_WORDS:
    words = words[:TITLE_WORDS]
    # A cut title should not end mid-phrase ("Hand and", "Set with Pouch,").
    while len(words) > 1 and words[-1].lower().strip(",;:-(&/") in _DANGLING:
      words.pop()
    words[-1] = words[-1].rstrip(",;:-(&/") or words[-1]
  return " ".join(words)


def item_ref(title: str, item_token: str, index: int) -> tuple[Part, ...]:
  """An item in a conversation prompt: its name (``item_name``) and its slot.

  The leading space follows the boundary rule; callers put it after text that does not
  end in a space.
  """
  return (" " + item_name(title, item_token), Slot(ITEM, index))


def join_list(values: Sequence[str]) -> str:
  """'a', 'a and b', 'a, b and c'."""
  values = list(values)
  if len(values) <= 1:
    return "".join(values)
  return ", ".join(values[:-1]) + " and " + values[-1]


def render_text(sample: Sample, *, item_tokens: Sequence[str] | None = None,
                item_titles: Sequence[str] | None = None, slot_text: str = "") -> str:
  """Debug/inspection view of a sample: turns as 'role: text', slots as ``slot_text``."""
  lines = []
  for turn in sample.turns:
    out = []
    for p in turn.content:
      if isinstance(p, str):
        out.append(p)
      elif isinstance(p, Slot):
        out.append(slot_text)
      else:
        names = []
        for i in p.items:
          if p.style == "title" and item_titles is not None and item_titles[i]:
            names.append(item_name(item_titles[i], ""))
          else:
            names.append(f"item_{item_tokens[i] if item_tokens is not None else i}")
        out.append(" " + " , ".join(n + slot_text for n in names))
    lines.append(f"{turn.role}: {''.join(out)}")
  return "\n".join(lines)
