"""A multi-turn conversation with a served ILM: item tokens, tools, grounded answers.

One turn (``ChatSession.send``):

1. **Mentions**: titles the person typed are resolved against the catalogue (exact
   normalised titles anywhere in the message; a quoted "..." title fuzzily). An
   ambiguous quoted title is asked back ("Did you mean: A or B?") and the turn ends there.
   Resolved items enter the user turn as ``title`` + item tokens; unless the person asks
   *about* them they join the session's history (what the person likes).
2. **Intent layer** (deterministic orchestration, not the model): "recommend / suggest /
   what should I watch" calls ``recommend``; "find / search / looking for" calls
   ``search_items``; "tell me about / describe / details" with a mentioned item calls
   ``item_details``. Each call is written into the conversation exactly as a model call
   would be (an assistant turn with ``<tool_call>...``, then a ``tool`` turn with titles +
   item tokens), so the model conditions on catalogue items.
3. **Generation**: the LLM writes the reply on the spliced embeddings. If it emits tool
   calls itself they are executed (malformed ones get an error tool turn) and it writes
   again, up to ``max_tool_rounds``.
4. **Grounding post-check**: the items the reply names are found in the catalogue; when a
   tool produced items the reply does not name, a line listing them is appended
   (``grounded`` marks it), so every answer that recommends names real catalogue items.

The reply record shows everything: model text, tool calls and results, items.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

from ilm_jax.chat import catalogue as catalogue_lib
from ilm_jax.chat import tools as tools_lib
from ilm_jax.data import prompts as P

MAX_MESSAGE_CHARS = 2000
_RECOMMEND = re.compile(r"\b(recommend\w*|suggest\w*|what should i|what (else )?(to|can i) "
                        r"(watch|read|buy|try)|something (else )?like|similar to|more like)\b",
                        re.I)
_SEARCH = re.compile(r"\b(?:find|search(?: for)?|look(?:ing)? for|any)\b\s+(.+)", re.I)
_DETAILS = re.compile(r"\b(tell me (more )?about|describe|details|what is|what's)\b", re.I)
_QUOTED = re.compile(r"[\"\u201c]([^\"\u201d]{2,120})[\"\u201d]")
_COUNT = re.compile(r"\b(\d{1,2})\b")


@dataclasses.dataclass
class SessionConfig:
  """Knobs of a session (``configs/chat.py`` sets them)."""

  k: int = 5
  ranker: str = "cf"
  max_new_tokens: int = 48
  temperature: float = 0.0
  max_tool_rounds: int = 2
  max_prompt_tokens: int = 1024
  intents: bool = True
  model_tools: bool = True


_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


def dedupe_sentences(text: str) -> str:
  """Drops repeated sentences (greedy decoding of a small model loops: "I'm glad ... I'm
  glad ...") and a trailing unfinished repeat of an earlier sentence's start."""
  out, seen = [], set()
  for sent in _SENTENCE.split(text.strip()):
    key = " ".join(sent.lower().split())
    if not key or key in seen or any(k.startswith(key) for k in seen):
      continue
    seen.add(key)
    out.append(sent.strip())
  return " ".join(out)


class ChatSession:
  """One person's conversation (history of liked items + chat turns)."""

  def __init__(self, served, config: SessionConfig | None = None, *,
               user: int | None = None, liked: Sequence[int] = ()):
    self.served = served
    self.c = config or SessionConfig()
    self.tools = tools_lib.Toolbox(served, self.c.ranker)
    self.user = user
    self.history: list[int] = list(served.user_history(user)) if user is not None else []
    self.history += [int(i) for i in liked]
    self.messages: list[tuple[str, tuple]] = []
    self.system = tools_lib.system_prompt(served.label)
    self.last_used = time.monotonic()
    # Two requests on one session id must not interleave their turns.
    self.lock = threading.Lock()

  @property
  def catalogue(self) -> catalogue_lib.Catalogue:
    return self.served.catalogue

  def like(self, titles_or_ids: Sequence[Any]) -> list[int]:
    """Adds items (ids or titles) to the history; ValueError names the first bad one."""
    items = [self.tools.item_ref(t) for t in titles_or_ids]
    self.history += [i for i in items if i not in self.history]
    return items

  # ------------------------------------------------------------------ one turn

  def _mentions(self, text: str) -> tuple[list[int], catalogue_lib.Resolution | None]:
    items = list(self.catalogue.find_mentions(text))
    for q in _QUOTED.findall(text):
      res = self.catalogue.resolve(q)
      if res.ambiguous:
        return items, res
      if res.item is not None and res.item not in items:
        items.append(res.item)
    return items, None

  def _prompt(self) -> list[tuple[str, tuple]]:
    """System + as many recent messages as fit ``max_prompt_tokens``."""
    msgs = list(self.messages)
    while True:
      out = [("system", (self.system,))] + msgs
      ids, _ = self.served.render(out)
      if len(ids) <= self.c.max_prompt_tokens or len(msgs) <= 1:
        return out
      msgs = msgs[1:]

  def _call(self, call: tools_lib.ToolCall, record: dict, by: str) -> tools_lib.ToolResult:
    result = self.tools.run(call, self.history)
    self.messages.append(("assistant", (tools_lib.format_call(call.name, call.arguments)
                                        if not call.error else f"<tool_call>{call.raw}"
                                        "</tool_call>",)))
    self.messages.append(("tool", self.tools.result_parts(result)))
    record["tool_calls"].append({"by": by, **result.to_json(self.catalogue)})
    return result

  def _intents(self, text: str, mentioned: list[int]) -> list[tools_lib.ToolCall]:
    m = _COUNT.search(text)
    k = min(max(int(m.group(1)), 1), tools_lib.MAX_K) if m else self.c.k
    if _RECOMMEND.search(text):
      return [tools_lib.ToolCall("recommend", {"history": [int(i) for i in self.history],
                                               "k": k})]
    if _DETAILS.search(text) and mentioned:
      return [tools_lib.ToolCall("item_details", {"id": int(i)}) for i in mentioned[:3]]
    s = _SEARCH.search(text)
    if s:
      return [tools_lib.ToolCall("search_items", {"query": s.group(1).strip(" ?.!"), "k": k})]
    return []

  def send(self, text: str) -> dict[str, Any]:
    """One person turn -> the reply record.

    Returns:
      {'reply': str, 'items': [item details named/recommended], 'tool_calls': [...],
       'model_text': [raw generations], 'mentioned': [...], 'ask_back': bool,
       'grounded': bool}.
    """
    self.last_used = time.monotonic()
    if not isinstance(text, str) or not text.strip():
      raise ValueError("message must be a non-empty string")
    if len(text) > MAX_MESSAGE_CHARS:
      raise ValueError(f"message is {len(text)} characters; the limit is {MAX_MESSAGE_CHARS}")
    record: dict[str, Any] = {"tool_calls": [], "model_text": [], "ask_back": False,
                              "grounded": False}
    mentioned, ambiguous = self._mentions(text)
    record["mentioned"] = [self.catalogue.details(i) for i in mentioned]
    if ambiguous is not None:
      reply = catalogue_lib.ask_back(self.catalogue, ambiguous)
      self.messages += [("user", (text,)), ("assistant", (reply,))]
      record.update(reply=reply, items=[self.catalogue.details(i) for i in ambiguous.items],
                    ask_back=True)
      return record
    parts: list = [text]
    if mentioned:
      parts.append(" (items:")
      for n, i in enumerate(mentioned):
        parts += [("," if n else "") + " " + P.item_name(self.catalogue.display(i), ""),
                  P.Slot(P.ITEM, i)]
      parts.append(")")
    self.messages.append(("user", tuple(parts)))
    if not _DETAILS.search(text):
      self.history += [i for i in mentioned if i not in self.history]

    tool_items: list[int] = []
    facts: dict[int, str] = {}

    def run(call, by):
      res = self._call(call, record, by)
      tool_items.extend(res.items)
      if res.call.name == "item_details" and res.items and res.text:
        facts[res.items[0]] = res.text

    if self.c.intents:
      for call in self._intents(text, mentioned):
        run(call, "intent")
    reply = ""
    for _ in range(self.c.max_tool_rounds + 1):
      out = self.served.generate(self._prompt(), max_new_tokens=self.c.max_new_tokens,
                                 temperature=self.c.temperature)
      record["model_text"].append(out)
      calls = tools_lib.parse_tool_calls(out) if self.c.model_tools else []
      if not calls:
        reply = out
        break
      for call in calls[:3]:
        run(call, "model")
    else:
      reply = tools_lib.strip_tool_calls(out)
    reply = dedupe_sentences(tools_lib.strip_tool_calls(reply))
    model_reply = reply
    named = self.catalogue.find_mentions(reply, min_words=1)
    missing = [i for i in dict.fromkeys(tool_items) if i not in named]
    lines = [f"{self.catalogue.display(i)}: {facts[i]}" for i in facts if facts[i] not in reply]
    if missing and len(missing) > len(facts):
      lines.append("From the catalogue: " + "; ".join(
          self.catalogue.display(i) for i in missing))
    if lines:
      reply = "\n".join(([reply] if reply else []) + lines)
      record["grounded"] = True
    # The history keeps the model's own words: the grounding lines are for the person
    # (the tool turn already gave the model those items), and a small model would parrot them.
    self.messages.append(("assistant", (model_reply,)))
    items = list(dict.fromkeys(named + missing))
    record.update(reply=reply, items=[self.catalogue.details(i) for i in items])
    return record
