"""Tools the chat model may call, the call syntax, and a robust executor.

The GGUF chat template of SmolLM2-135M-Instruct has no tool support (it renders any role
as ``<|im_start|>ROLE\\n...<|im_end|>``), but SmolLM2 was trained on function calling in
one fixed style, which ``system_prompt`` follows: the system message lists the tools as
JSON schemas inside ``<tools>...</tools>`` and asks for calls as a JSON list

  <tool_call>[{"name": "recommend", "arguments": {"k": 3}}]</tool_call>

(``[]`` when no tool is needed); results come back in a ``TOOL_ROLE`` turn wrapped in
``<tool_response>...</tool_response>`` (``response_parts``), listing items by title,
each followed by its K item tokens. The Phase 2 ``tool_call`` task trains on exactly
these strings (``data.phase2``), so ``system_prompt`` and ``format_call`` are the one
definition of the format.

Every malformed call -- bad JSON, unknown tool, wrong or missing arguments, unknown
items -- is answered with an error message in the tool turn (``ToolResult.error``) that
names what was wrong and the valid form, so the model can retry; nothing here raises on
model output.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Any

from ilm_jax.data import prompts as P

# name -> description and {argument: type}. Kept short: the system prompt carrying them
# is part of every Phase 2 tool_call sample (T = 320 tokens).
TOOLS: dict[str, dict[str, Any]] = {
    "search_items": {"description": "Search items by words", "arguments": {"query": "str",
                                                                           "k": "int"}},
    "recommend": {"description": "Recommend items for the liked ones",
                  "arguments": {"k": "int", "history": "list"}},
    "item_details": {"description": "Describe an item", "arguments": {"id": "str"}},
}
MAX_K = 20
# The role of the turn that carries results. SmolLM2's tool convention puts them in a user
# turn; with that, the untrained 135M model echoed the last <tool_response> instead of
# answering in every later turn of a conversation, and with a 'tool' turn (the GGUF
# template renders any role) it answered after them and went on calling tools
# (benchmarks/chat_tools.py --conversation).
TOOL_ROLE = "tool"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>\n", "\n</tool_response>"
# Demonstrations a session may put before the conversation (``SessionConfig.tool_examples``):
# an untrained 135M model follows shown calls far more often than described ones.
EXAMPLES: tuple[tuple[str, str], ...] = (
    ("Find me something funny set at sea.",
     '<tool_call>[{"name": "search_items", "arguments": {"query": "funny sea"}}]</tool_call>'),
    ("Tell me about Night Harbor.",
     '<tool_call>[{"name": "item_details", "arguments": {"id": "Night Harbor"}}]'
     "</tool_call>"),
    ("Do you have any quiet dramas?",
     '<tool_call>[{"name": "search_items", "arguments": {"query": "quiet dramas"}}]'
     "</tool_call>"),
    ("What should I try next? Give me 3.",
     '<tool_call>[{"name": "recommend", "arguments": {"k": 3}}]</tool_call>'),
)
_ECHO = re.compile(r"<tool_response>.*?(?:</tool_response>|$)|</tool_response>", re.S)
_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
# A 135M model sometimes drops the tags: a reply that *starts* with a call object/list.
_BARE = re.compile(r'^\s*(?:```(?:json)?\s*)?(\[\s*\{\s*"name"|\{\s*"name")', re.S)


def tool_schemas() -> list[dict[str, Any]]:
  """The tools as function schemas, APIGen style (what ``<tools>`` lists)."""
  return [{"name": n, "description": s["description"],
           "parameters": {a: {"type": t} for a, t in s["arguments"].items()}}
          for n, s in TOOLS.items()]


def system_prompt(label: str) -> str:
  """The system message: role, item-token convention, tools and call syntax (SmolLM2's
  function-calling style; identical in Phase 2 training and serving)."""
  return (f"You recommend {label} items. You have access to these tools:\n<tools>" +
          json.dumps(tool_schemas()) + "</tools>\nTo call tools, output only "
          '<tool_call>[{"name": "func_name", "arguments": {"arg": "value"}}]</tool_call>'
          "\nIf no tool is needed, answer directly.")


@dataclasses.dataclass
class ToolCall:
  """A parsed call: ``name``/``arguments``, or ``error`` (the call was malformed)."""

  name: str
  arguments: dict[str, Any]
  raw: str = ""
  error: str = ""

  def to_json(self) -> dict[str, Any]:
    out = {"name": self.name, "arguments": self.arguments}
    if self.error:
      out["error"] = self.error
    return out


@dataclasses.dataclass
class ToolResult:
  """What a call returned: items (best first), a text summary, or an error."""

  call: ToolCall
  items: list[int] = dataclasses.field(default_factory=list)
  text: str = ""
  error: str = ""

  def to_json(self, catalogue) -> dict[str, Any]:
    return {"call": self.call.to_json(), "items": [catalogue.details(i) for i in self.items],
            "text": self.text, "error": self.error}


def format_calls(calls: Sequence[tuple[str, dict[str, Any]]]) -> str:
  """``<tool_call>[{"name": ..., "arguments": {...}}, ...]</tool_call>`` (SmolLM2 style)."""
  body = ", ".join(json.dumps({"name": n, "arguments": a}) for n, a in calls)
  return f"<tool_call>[{body}]</tool_call>"


def format_call(name: str, arguments: dict[str, Any]) -> str:
  return format_calls([(name, arguments)])


_FORM = '{"name": ..., "arguments": {...}}'


def _one_call(obj: Any, raw: str) -> ToolCall:
  if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
    return ToolCall("", {}, raw, f'a tool call is a JSON object {_FORM} with a "name" string '
                                 'and an "arguments" object')
  args = obj.get("arguments", obj.get("parameters", {}))
  if isinstance(args, str):   # OpenAI style: arguments as a JSON string
    try:
      args = json.loads(args)
    except json.JSONDecodeError:
      pass
  if args is None:
    args = {}
  if not isinstance(args, dict):
    return ToolCall(obj["name"], {}, raw, '"arguments" must be a JSON object')
  return ToolCall(obj["name"], args, raw)


def _decode(raw: str) -> tuple[list[ToolCall], int]:
  """Calls in the JSON value that ``raw`` starts with (an object or a list of objects) and
  where that value ends; trailing text after it is ignored."""
  body = raw.strip()
  fence = re.match(r"```(?:json)?\s*", body)
  if fence:
    body = body[fence.end():]
  try:
    obj, end = json.JSONDecoder().raw_decode(body)
  except json.JSONDecodeError as e:
    return [ToolCall("", {}, raw, f"the tool call is not valid JSON ({e.msg} at char {e.pos});"
                                  f" write [{_FORM}]")], len(raw)
  end += len(raw) - len(raw.lstrip()) + (fence.end() if fence else 0)
  if isinstance(obj, list):
    return [_one_call(o, raw) for o in obj], end
  return [_one_call(obj, raw)], end


def parse_tool_calls(text: str) -> list[ToolCall]:
  """Every call in ``text``: each ``<tool_call>...`` block (an unterminated last one too)
  holds one call object or a list of them (``[]`` = no call); without any tag, a reply
  that starts with a call object or list counts too. Malformed calls come back with
  ``error`` set; plain text gives []."""
  calls: list[ToolCall] = []
  blocks = [m.group(1) for m in _CALL.finditer(text)]
  if not blocks and _BARE.match(text):
    blocks = [text]
  for raw in blocks:
    calls += _decode(raw.strip())[0]
  return calls


def strip_tool_calls(text: str) -> str:
  """``text`` without its tool calls (tagged blocks, or a leading bare call) and without
  echoed ``<tool_response>`` blocks (a small model copies the tool turn as its answer; the
  session shows the items itself)."""
  if "<tool_call>" not in text and _BARE.match(text):
    _, end = _decode(text)
    text = text[end:].lstrip().removeprefix("```")
  text = re.sub(r"[ \t]{2,}", " ", _ECHO.sub(" ", _CALL.sub("", text)))
  return re.sub(r"</?(?:tool_\w*>?)?$", "", text.strip()).strip()   # a cut-off tag


def response_parts(name: str, items: Sequence[tuple[str, int]] = (), text: str = "",
                   error: str = "") -> tuple:
  """The content of the turn that answers a call: ``<tool_response>`` + "NAME result:"
  and the items, each its display name followed by its item slot (K soft tokens), then
  ``text`` -- or the error message.

  Args:
    name: the tool called ('' for an unparseable call).
    items: (display name, item index) best first.
    text: facts (item_details) or a note ("nothing matches").
    error: what was wrong with the call (then ``items``/``text`` are ignored).
  """
  if error:
    return (f"{RESPONSE_OPEN}error: {error}{RESPONSE_CLOSE}",)
  parts: list = [f"{RESPONSE_OPEN}{name or 'tool'} result:"]
  for n, (title, i) in enumerate(items):
    parts += [("," if n else "") + " " + title, P.Slot(P.ITEM, i)]
  if text:
    parts.append(" " + text)
  parts.append(RESPONSE_CLOSE)
  return tuple(parts)


class Toolbox:
  """Runs tools against a ``chat.model.ServedModel``."""

  def __init__(self, served, ranker: str = "cf"):
    self.served = served
    self.ranker = ranker

  @property
  def catalogue(self):
    return self.served.catalogue

  def _k(self, args: dict[str, Any]) -> int:
    k = args.get("k", 5)
    if isinstance(k, str) and k.strip().isdigit():   # "3": a small model's quoting
      k = int(k)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
      raise ValueError(f'"k" must be an integer in 1..{MAX_K}, got {k!r}')
    return k

  def item_ref(self, ref: Any) -> int:
    """An item id (int or digit string) or a title -> the item; ValueError otherwise."""
    cat = self.catalogue
    if isinstance(ref, bool):
      raise ValueError(f"not an item: {ref!r}")
    if isinstance(ref, int) or (isinstance(ref, str) and ref.strip().isdigit()):
      i = int(ref)
      if 0 <= i < len(cat):
        return i
      raise ValueError(f"no item with id {i} (ids are 0..{len(cat) - 1})")
    if isinstance(ref, str) and ref.strip():
      res = cat.resolve(ref)
      if res.item is not None:
        return res.item
      if res.ambiguous:
        names = " or ".join(cat.display(i) for i in res.items)
        raise ValueError(f"{ref!r} is ambiguous: {names}")
      raise ValueError(f"no catalogue item is called {ref!r}; try search_items")
    raise ValueError(f"an item is an id or a title, got {ref!r}")

  def run(self, call: ToolCall, history: Sequence[int] = (), exclude: Sequence[int] = ()
          ) -> ToolResult:
    """Executes ``call``; any problem is a ToolResult with ``error`` (never raises).

    Args:
      call: the parsed call.
      history: the conversation's liked items (``recommend``'s default history).
      exclude: items ``recommend`` must not return (already recommended: "3 more").
    """
    if call.error:
      return ToolResult(call, error=call.error)
    if call.name not in TOOLS:
      return ToolResult(call, error=f"unknown tool {call.name!r}; tools: {', '.join(TOOLS)}")
    args = call.arguments
    unknown = sorted(set(args) - set(TOOLS[call.name]["arguments"]))
    try:
      if unknown:
        raise ValueError(f"{call.name} takes {list(TOOLS[call.name]['arguments'])}, "
                         f"not {unknown}")
      if call.name == "search_items":
        q = args.get("query")
        if not isinstance(q, str) or not q.strip():
          raise ValueError('search_items needs "query": a non-empty string')
        hits = self.catalogue.search(q, self._k(args))
        items = [i for i, _ in hits]
        return ToolResult(call, items, "" if items else f"nothing matches {q!r}")
      if call.name == "recommend":
        hist = args.get("history")
        if hist is None:
          hist = list(history)
        elif not isinstance(hist, list):
          raise ValueError('"history" must be a list of titles or item ids')
        else:
          hist = [self.item_ref(h) for h in hist]
        recs = self.served.recommend(hist, self._k(args), ranker=self.ranker,
                                     exclude=[i for i in exclude if i not in hist])
        return ToolResult(call, [i for i, _ in recs])
      if "id" not in args:
        raise ValueError('item_details needs "id": an item title or id')
      i = self.item_ref(args["id"])
      d = self.catalogue.details(i)
      facts = "; ".join(x for x in (d["text"], ", ".join(d["attributes"])) if x)
      return ToolResult(call, [i], facts)
    except (ValueError, KeyError, TypeError) as e:
      msg = e.args[0] if e.args else str(e)
      return ToolResult(call, error=f"{call.name}: {msg}")

  def result_parts(self, result: ToolResult) -> tuple:
    """The tool turn's content (``response_parts``) for ``result``."""
    cat = self.catalogue
    return response_parts(result.call.name,
                          [(P.item_name(cat.display(i), ""), i) for i in result.items],
                          result.text, result.error)
