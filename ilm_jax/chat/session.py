"""A multi-turn conversation with a served ILM: item tokens, tools, grounded answers.

One turn (``ChatSession.send``):

1. **Mentions**: titles the person typed are resolved against the catalogue (exact
   normalised titles anywhere in the message; a quoted "..." title fuzzily), and so are
   references to the last list shown ("the second one", "number 3", "the last one";
   "that one" / "about it" = the first item of the last reply). An ambiguous quoted
   title is asked back ("Did you mean: A or B?") and the turn ends there. Resolved items
   enter the user turn as ``title`` + item tokens; unless the person asks *about* them
   they join the session's history (what the person likes).
2. **The model first**: the system prompt offers the tools in SmolLM2's function-calling
   style (``tools.system_prompt``) and the LLM writes on the spliced embeddings. When its
   output holds tool calls they are executed -- a malformed one gets an error tool turn
   it can recover from -- and it writes again, up to ``max_tool_rounds``. Failed calls
   and their errors leave the conversation when the turn ends.
3. **Fallback intent layer** (deterministic, ``intents``): when the model made no call
   that succeeded and the message asks for something -- "recommend / suggest / what
   should I watch" -> ``recommend``; "find / search / looking for / any ..." ->
   ``search_items`` with the request phrasing stripped (``search_query``); "tell me about
   / describe" with a mentioned item -> ``item_details`` -- the model's call-less answer
   is dropped, the calls are written into the conversation exactly as a model call would
   be, and the model answers on their results. Every call records who made it (``by``:
   'model' or 'fallback'). A question about a named item gets that item's
   ``item_details`` even when the model's own calls looked up something else.
   ``recommend`` never returns what the session already
   recommended ("3 more" means new ones).
4. **Grounding post-check**: the items the reply names are found in the catalogue; when a
   tool produced items the reply does not name, a line listing them is appended
   (``grounded`` marks it), so every answer that recommends names real catalogue items.
   A reply naming a "Title (year)" the catalogue does not have is replaced by that list
   (``invented`` names what was made up).

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
# The reply when the model wrote nothing usable (only calls, echoes) and no tool found items.
NO_ANSWER = ("Sorry, I have no answer to that. Ask me to recommend something, to find items "
             "(a genre, a mood) or about a title.")
_RECOMMEND = re.compile(r"\b(recommend\w*|suggest\w*|what should i|what (else )?(to|can i) "
                        r"(watch|read|buy|try)|something (else )?like|similar to|more like)\b",
                        re.I)
_SEARCH = re.compile(r"\b(?:find|search(?:\s+for)?|look(?:ing)?\s+for|show\s+me|got\s+any|"
                     r"do\s+you\s+have|in\s+the\s+mood\s+for|i\s+want|i'd\s+like|any)\b"
                     r"\s*(.*)", re.I | re.S)
_DETAILS = re.compile(r"\b(tell me (more )?about|describe|details|what is|what's)\b", re.I)
_QUOTED = re.compile(r"[\"\u201c]([^\"\u201d]{2,120})[\"\u201d]")
_COUNT = re.compile(r"\b(\d{1,2})\b")

# Words that phrase a request rather than say what is wanted ("find ME SOMETHING WITH A
# dark tone"): dropped from search queries. Content words (genres, moods) never are.
_FILLER = frozenset("""
a an the some any me us my for please pls can could would will you your i i'm im i'd id
am is are was be been being do does did have has had having got get give show find
search look looking see want wanted need like likes liked mood something anything
everything stuff thing things one ones kind sort type types of with without that which
who whose what where when to in on at by from and or but also just really very more
new good great nice cool best top maybe perhaps there here it its this these those
movie movies film films show shows item items title titles book books product products
watch watching read reading buy buying try trying catalogue catalog recommendation
recommendations pick picks suggestion suggestions feature features featuring about
lot lots bit little
""".split())
_WORD = re.compile(r"[\w'][\w'\-]*", re.U)


def search_query(text: str) -> str:
  """The words of a search request without its phrasing: "Can you find me something with a
  dark tone?" -> 'dark tone', "I'm looking for 3 funny movies" -> 'funny'.

  The part after the request verb ("find", "search for", "looking for", "any", ...) is
  kept (the whole message when there is none); filler words and counts are dropped.
  Returns '' when nothing is left.
  """
  m = _SEARCH.search(text)
  rest = m.group(1) if m else text
  words = [w.strip("'-") for w in _WORD.findall(rest.lower())]
  return " ".join(w for w in words if w and w not in _FILLER and not w.isdigit())


_ORDINALS = {"first": 0, "1st": 0, "second": 1, "2nd": 1, "third": 2, "3rd": 2,
             "fourth": 3, "4th": 3, "fifth": 4, "5th": 4, "sixth": 5, "6th": 5,
             "seventh": 6, "7th": 6, "eighth": 7, "8th": 7, "ninth": 8, "9th": 8,
             "tenth": 9, "10th": 9, "last": -1}
_NOUN = r"(?:one|item|movie|film|title|book|product|pick|suggestion|recommendation|result)s?"
_ORD = "|".join(_ORDINALS)
# "the second (one)", "second one", "number 2", "#2"; not "the first time".
_ORDINAL_REF = re.compile(
    rf"\bthe\s+({_ORD})\b(?!\s+(?:time|place|thing)\b)|\b({_ORD})\s+{_NOUN}\b|"
    rf"(?:\bnumber\s+|\bno\.\s*|#)(\d{{1,2}})\b", re.I)
_THAT_REF = re.compile(rf"\b(?:that|this)\s+{_NOUN}\b|\babout\s+it\b", re.I)


@dataclasses.dataclass
class SessionConfig:
  """Knobs of a session (``configs/chat.py`` sets them).

  Attributes:
    intents: the fallback intent layer (calls tools when the model did not).
    model_tools: execute tool calls the model writes.
    tool_examples: show the model ``tools.EXAMPLES`` (request -> call exchanges) after
      the system prompt: the untrained SmolLM2-135M writes a correct call for 11 of 24
      scripted requests with them, 0 without (benchmarks/chat_tools.py).
  """

  k: int = 5
  ranker: str = "cf"
  max_new_tokens: int = 48
  temperature: float = 0.0
  max_tool_rounds: int = 2
  max_prompt_tokens: int = 1024
  intents: bool = True
  model_tools: bool = True
  tool_examples: bool = True


_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


# "Some Title (1970s)" / "Some Title (1995)": how catalogue items are displayed.
_TITLE_YEAR = re.compile(r"([A-Z][^()\n.;:!?]{0,80}?)\s*\((\d{4}s?)\)")
# The reply that replaces one naming items the catalogue does not have.
FOUND = "Here is what I found in the catalogue."


def invented_titles(reply: str, named_displays: Sequence[str]) -> list[str]:
  """The "Title (year)" phrases in ``reply`` that are none of ``named_displays`` (the
  catalogue items found in it): items the model made up."""
  low = reply.lower()
  known = [(d.lower(), m.start()) for d in named_displays for m in
           re.finditer(re.escape(d.lower()), low)]
  out = []
  for m in _TITLE_YEAR.finditer(reply):
    if not any(start <= m.end() - 1 < start + len(d) for d, start in known):
      out.append(m.group(0).strip())
  return out


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
    # What the person last saw: the items of the last reply, and of the last reply that
    # listed several (what "the second one" points into).
    self.last_items: list[int] = []
    self.last_list: list[int] = []
    self._failed: list[int] = []   # this turn's failed calls (message positions)
    # Items recommended in earlier turns: "3 more" means new ones.
    self.recommended: list[int] = []
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

  def references(self, text: str) -> list[int]:
    """Items ``text`` points at in what was shown: ordinals ("the first one", "the
    second", "number 3", "the last one") index the last list of several items; "that
    one" / "this movie" / "about it" is the first item of the last reply."""
    out: list[int] = []
    for m in _ORDINAL_REF.finditer(text):
      word = (m.group(1) or m.group(2) or "").lower()
      n = _ORDINALS[word] if word else int(m.group(3)) - 1
      lst = self.last_list or self.last_items
      if lst and -len(lst) <= n < len(lst):
        out.append(lst[n])
    if self.last_items and _THAT_REF.search(text):
      out.append(self.last_items[0])
    return list(dict.fromkeys(out))

  def _mentions(self, text: str) -> tuple[list[int], catalogue_lib.Resolution | None]:
    items = list(self.catalogue.find_mentions(text))
    for q in _QUOTED.findall(text):
      res = self.catalogue.resolve(q)
      if res.ambiguous:
        return items, res
      if res.item is not None and res.item not in items:
        items.append(res.item)
    items += [i for i in self.references(text) if i not in items]
    return items, None

  def _shown(self, items: Sequence[int]) -> None:
    self.last_items = [int(i) for i in items]
    if len(items) > 1:
      self.last_list = list(self.last_items)

  def _prompt(self) -> list[tuple[str, tuple]]:
    """System + as many recent messages as fit ``max_prompt_tokens``."""
    msgs = list(self.messages)
    head = [("system", (self.system,))]
    if self.c.tool_examples:
      for ask, call in tools_lib.EXAMPLES:
        head += [("user", (ask,)), ("assistant", (call,))]
    while True:
      out = head + msgs
      ids, _ = self.served.render(out)
      if len(ids) <= self.c.max_prompt_tokens or len(msgs) <= 1:
        return out
      msgs = msgs[1:]

  def _call(self, call: tools_lib.ToolCall, record: dict, by: str) -> tools_lib.ToolResult:
    result = self.tools.run(call, self.history, exclude=self.recommended)
    if result.error:   # the call and its error leave the history when the turn ends
      self._failed.append(len(self.messages))
    self.messages.append(("assistant", (tools_lib.format_call(call.name, call.arguments)
                                        if not call.error else f"<tool_call>{call.raw}"
                                        "</tool_call>",)))
    self.messages.append((tools_lib.TOOL_ROLE, self.tools.result_parts(result)))
    # after_output: how many model outputs came before the call (the transcript's order).
    record["tool_calls"].append({"by": by, "after_output": len(record["model_text"]),
                                 **result.to_json(self.catalogue)})
    return result

  def _intents(self, text: str, mentioned: list[int]) -> list[tools_lib.ToolCall]:
    """The fallback layer's calls for ``text`` ([] when it asks for nothing)."""
    m = _COUNT.search(_ORDINAL_REF.sub(" ", text))
    k = min(max(int(m.group(1)), 1), tools_lib.MAX_K) if m else self.c.k
    recommend = tools_lib.ToolCall("recommend", {"history": [int(i) for i in self.history],
                                                 "k": k})
    if _RECOMMEND.search(text):
      return [recommend]
    if _DETAILS.search(text) and mentioned:
      return [tools_lib.ToolCall("item_details", {"id": int(i)}) for i in mentioned[:3]]
    if _SEARCH.search(text):
      q = search_query(text)
      # "find me something" says nothing to search for: what the person would like.
      return [tools_lib.ToolCall("search_items", {"query": q, "k": k}) if q else recommend]
    return []

  def _generate(self, record: dict) -> str:
    out = self.served.generate(self._prompt(), max_new_tokens=self.c.max_new_tokens,
                               temperature=self.c.temperature)
    record["model_text"].append(out)
    return out

  def send(self, text: str) -> dict[str, Any]:
    """One person turn -> the reply record.

    Returns:
      {'reply': str, 'items': [item details named/recommended], 'tool_calls': [...]
       (each {'by': 'model' | 'fallback', 'after_output', 'call', 'items', 'text',
       'error'}),
       'model_text': [raw generations], 'mentioned': [...], 'ask_back': bool,
       'grounded': bool, 'invented': ["Title (year)"s the model made up; the reply then
       lists the tools' catalogue items instead]}.
    """
    self.last_used = time.monotonic()
    if not isinstance(text, str) or not text.strip():
      raise ValueError("message must be a non-empty string")
    if len(text) > MAX_MESSAGE_CHARS:
      raise ValueError(f"message is {len(text)} characters; the limit is {MAX_MESSAGE_CHARS}")
    record: dict[str, Any] = {"tool_calls": [], "model_text": [], "ask_back": False,
                              "grounded": False, "invented": []}
    mentioned, ambiguous = self._mentions(text)
    record["mentioned"] = [self.catalogue.details(i) for i in mentioned]
    if ambiguous is not None:
      reply = catalogue_lib.ask_back(self.catalogue, ambiguous)
      self.messages += [("user", (text,)), ("assistant", (reply,))]
      record.update(reply=reply, items=[self.catalogue.details(i) for i in ambiguous.items],
                    ask_back=True)
      self._shown(ambiguous.items)
      return record
    names = [P.item_name(self.catalogue.display(i), "") for i in mentioned]
    self.messages.append(("user", P.with_items(text, names, mentioned)))
    if not _DETAILS.search(text):
      self.history += [i for i in mentioned if i not in self.history]

    tool_items: list[int] = []
    facts: dict[int, str] = {}
    ok = False
    self._failed = []

    def run(call, by):
      nonlocal ok
      res = self._call(call, record, by)
      # A call that found nothing ("nothing matches 'something'") did not help either.
      ok |= not res.error and bool(res.items)
      tool_items.extend(res.items)
      if res.call.name == "item_details" and res.items and res.text:
        facts[res.items[0]] = res.text

    # The model first: its own calls, their results (or errors) fed back, up to
    # max_tool_rounds; then the fallback layer if none of its calls succeeded.
    out = self._generate(record)
    for _ in range(self.c.max_tool_rounds):
      calls = tools_lib.parse_tool_calls(out) if self.c.model_tools else []
      if not calls:
        break
      for call in calls[:3]:
        run(call, "model")
      out = self._generate(record)
    if self.c.intents:
      fallback = self._intents(text, mentioned)
      if ok:
        # The model's calls worked, but a question about a named item is answered from
        # that item's details whatever else the model looked up.
        described = {str(c["call"]["arguments"].get("id")) for c in record["tool_calls"]
                     if c["call"]["name"] == "item_details" and c["items"]}
        fallback = [c for c in fallback
                    if c.name == "item_details" and str(c.arguments["id"]) not in described]
      for call in fallback:
        run(call, "fallback")
      if fallback:
        out = self._generate(record)
    reply = dedupe_sentences(tools_lib.strip_tool_calls(out))
    named = self.catalogue.find_mentions(reply, min_words=1)
    record["invented"] = invented_titles(reply, [self.catalogue.display(i) for i in named])
    if record["invented"]:
      # A small model makes up "Title (1970s)"s: show only what the catalogue holds.
      reply, named = (FOUND if tool_items else ""), []
    model_reply = reply
    missing = [i for i in dict.fromkeys(tool_items) if i not in named]
    lines = [f"{self.catalogue.display(i)}: {facts[i]}" for i in facts if facts[i] not in reply]
    if missing and len(missing) > len(facts):
      lines.append("From the catalogue: " + "; ".join(
          self.catalogue.display(i) for i in missing))
    if lines:
      reply = "\n".join(([reply] if reply else []) + lines)
      record["grounded"] = True
    elif not reply:
      reply = NO_ANSWER
    # The history keeps the model's own words: the grounding lines are for the person
    # (the tool turn already gave the model those items), and a small model would parrot them.
    self.messages.append(("assistant", (model_reply,)))
    # Failed calls were answered within the turn (the model could retry); later turns
    # need not see them (a small model echoes old errors).
    for j in reversed(self._failed):
      del self.messages[j:j + 2]
    for c in record["tool_calls"]:
      if c["call"]["name"] == "recommend":
        self.recommended += [it["id"] for it in c["items"] if it["id"] not in self.recommended]
    items = list(dict.fromkeys(named + missing))
    if items:
      self._shown(items)
    record.update(reply=reply, items=[self.catalogue.details(i) for i in items])
    return record
