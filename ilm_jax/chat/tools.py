"""Tools the chat model may call, the call syntax, and a robust executor.

SmolLM2's chat template has no tool support, so the convention is spelled out in the
system prompt (``system_prompt``): the assistant writes

  <tool_call>{"name": "recommend", "arguments": {"history": ["Heat"], "k": 3}}</tool_call>

and the result comes back as a ``tool`` turn (the template renders any role) listing
items by title, each followed by its K item tokens. Every malformed call -- bad JSON,
unknown tool, wrong or missing arguments, unknown items -- is answered with an error
message in the tool turn (``ToolResult.error``) that names what was wrong and the valid
form, so the model can retry; nothing here raises on model output.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from typing import Any

from ilm_jax.data import prompts as P

TOOLS: dict[str, dict[str, Any]] = {
    "search_items": {
        "description": "text search over catalogue titles and descriptions",
        "arguments": {"query": "string", "k": "integer 1-20 (optional, default 5)"}},
    "recommend": {
        "description": "items to recommend after a history (history items excluded)",
        "arguments": {"history": "list of titles or item ids (optional: the conversation's)",
                      "k": "integer 1-20 (optional, default 5)"}},
    "item_details": {
        "description": "title, description and attributes of one item",
        "arguments": {"id": "an item id or title"}},
}
MAX_K = 20
_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)


def system_prompt(label: str) -> str:
  """The system message: role, item-token convention and the tool-call syntax."""
  specs = "\n".join(f"- {n}({', '.join(f'{a}: {t}' for a, t in s['arguments'].items())}): "
                    f"{s['description']}" for n, s in TOOLS.items())
  return (f"You are a helpful recommender for the {label} catalogue. Items appear as a title "
          "followed by its item tokens. Only recommend catalogue items. To use a tool, write "
          '<tool_call>{"name": NAME, "arguments": {...}}</tool_call>; the result comes back '
          f"in a tool message. Tools:\n{specs}")


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


def format_call(name: str, arguments: dict[str, Any]) -> str:
  return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def parse_tool_calls(text: str) -> list[ToolCall]:
  """Every ``<tool_call>...`` in ``text`` (an unterminated last one too); malformed ones
  come back with ``error`` set."""
  calls = []
  for m in _CALL.finditer(text):
    raw = m.group(1).strip()
    try:
      obj = json.loads(raw)
    except json.JSONDecodeError as e:
      calls.append(ToolCall("", {}, raw, f"the tool call is not valid JSON ({e.msg} at "
                                          f"char {e.pos}); write "
                                          '{"name": ..., "arguments": {...}}'))
      continue
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
      calls.append(ToolCall("", {}, raw, 'a tool call is a JSON object with a "name" string '
                                         'and an "arguments" object'))
      continue
    args = obj.get("arguments", {})
    if not isinstance(args, dict):
      calls.append(ToolCall(obj["name"], {}, raw, '"arguments" must be a JSON object'))
      continue
    calls.append(ToolCall(obj["name"], args, raw))
  return calls


def strip_tool_calls(text: str) -> str:
  return _CALL.sub("", text).strip()


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

  def run(self, call: ToolCall, history: Sequence[int] = ()) -> ToolResult:
    """Executes ``call``; any problem is a ToolResult with ``error`` (never raises)."""
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
        recs = self.served.recommend(hist, self._k(args), ranker=self.ranker)
        return ToolResult(call, [i for i, _ in recs])
      i = self.item_ref(args.get("id"))
      d = self.catalogue.details(i)
      facts = "; ".join(x for x in (d["text"], ", ".join(d["attributes"])) if x)
      return ToolResult(call, [i], facts)
    except (ValueError, KeyError, TypeError) as e:
      msg = e.args[0] if e.args else str(e)
      return ToolResult(call, error=f"{call.name}: {msg}")

  def result_parts(self, result: ToolResult) -> tuple:
    """The tool turn's content: titles each followed by an item slot (their tokens)."""
    name = result.call.name or "tool"
    if result.error:
      return (f"error: {result.error}",)
    parts: list = [f"{name} result:"]
    for n, i in enumerate(result.items):
      parts += [("," if n else "") + " " + P.item_name(self.catalogue.display(i), ""),
                P.Slot(P.ITEM, i)]
    if result.text:
      parts.append(" " + result.text)
    return tuple(parts)
