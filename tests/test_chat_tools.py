"""Chat tool use: SmolLM2-style calls from the model, the fallback layer, references to the
last list shown, search-query extraction, and the Phase 2 tool_call samples."""

from __future__ import annotations

import json
import re

import pytest

from ilm_jax.chat import session, tools
from ilm_jax.data import phase2, types
from ilm_jax.data import prompts as P
from tests import _chat_tiny as T

CFG = session.SessionConfig(max_new_tokens=4, k=4)


@pytest.fixture(scope="module")
def served():
  return T.shared_served()


def _scripted(served, monkeypatch, outputs):
  """The LLM writes ``outputs`` in turn (then an empty reply); returns the prompts seen."""
  seen, outs = [], iter(outputs)
  def generate(messages, **kw):
    seen.append(list(messages))
    return next(outs, "")
  monkeypatch.setattr(served, "generate", generate)
  return seen


# ------------------------------------------------------------------------- call syntax


@pytest.mark.parametrize("text,want", [
    ('<tool_call>[{"name": "recommend", "arguments": {"k": 3}}]</tool_call>',
     [("recommend", {"k": 3})]),
    ('<tool_call>[{"name": "search_items", "arguments": {"query": "dark"}}, '
     '{"name": "item_details", "arguments": {"id": "7"}}]</tool_call>',
     [("search_items", {"query": "dark"}), ("item_details", {"id": "7"})]),
    ('<tool_call>{"name": "recommend", "arguments": {}}</tool_call>', [("recommend", {})]),
    ("<tool_call>[]</tool_call>", []),
    ("Sure! Here are some.", []),
    # A small model's variations: no tags, arguments as a JSON string, fenced, trailing
    # text, an unterminated tag, "parameters" for "arguments".
    ('[{"name": "recommend", "arguments": "{\\"k\\": 2}"}] and more',
     [("recommend", {"k": 2})]),
    ('```json\n{"name": "search_items", "arguments": {"query": "x"}}\n```',
     [("search_items", {"query": "x"})]),
    ('<tool_call>[{"name": "recommend", "parameters": {"k": 4}}] Let me check',
     [("recommend", {"k": 4})]),
])
def test_parse_tool_calls(text, want):
  calls = tools.parse_tool_calls(text)
  assert [(c.name, c.arguments) for c in calls] == want
  assert not any(c.error for c in calls)
  assert "tool_call" not in tools.strip_tool_calls(text) and '"name"' not in \
      tools.strip_tool_calls(text)


def test_replies_lose_echoed_tool_response_tags():
  assert tools.strip_tool_calls("<tool_response>\nA, B\n</tool_response> Enjoy") == "Enjoy"
  assert tools.strip_tool_calls("Sure. <tool_response>\nerror: x\n</") == "Sure."
  assert tools.strip_tool_calls("Sure.</tool_response> Bye </tool_") == "Sure. Bye"


def test_system_prompt_lists_the_tools_in_smollm2_style():
  s = tools.system_prompt("ML1M")
  listed = json.loads(re.search(r"<tools>(.*)</tools>", s, re.S).group(1))
  assert [t["name"] for t in listed] == list(tools.TOOLS) == \
      ["search_items", "recommend", "item_details"]
  assert listed[0]["parameters"] == {"query": {"type": "str"}, "k": {"type": "int"}}
  # The format the prompt shows is itself a call the parser reads.
  example = re.search(r"<tool_call>.*?</tool_call>", s).group(0)
  assert [c.name for c in tools.parse_tool_calls(example)] == ["func_name"]
  assert tools.format_call("recommend", {"k": 2}) == \
      '<tool_call>[{"name": "recommend", "arguments": {"k": 2}}]</tool_call>'


# ------------------------------------------------------------------ model vs fallback


def test_a_call_the_model_writes_is_used_and_the_fallback_stays_off(served, monkeypatch):
  seen = _scripted(served, monkeypatch, [
      '<tool_call>[{"name": "recommend", "arguments": {"k": 2}}]</tool_call>', "Enjoy!"])
  cs = session.ChatSession(served, CFG, liked=[3, 10])
  r = cs.send("Can you recommend 4 more?")   # the fallback would have asked for k=4
  assert [(c["by"], c["call"]) for c in r["tool_calls"]] == \
      [("model", {"name": "recommend", "arguments": {"k": 2}})]
  want = [i for i, _ in served.recommend([3, 10], 2)]
  assert [it["id"] for it in r["items"]] == want and r["reply"].startswith("Enjoy!")
  # The model saw the tools in its system prompt, then the result as a tool response.
  assert seen[0][0] == ("system", (tools.system_prompt(served.label),))
  role, parts = seen[1][-1]
  assert role == tools.TOOL_ROLE and parts[0] == "<tool_response>\nrecommend result:"
  assert [p.index for p in parts if isinstance(p, P.Slot)] == want


def test_fallback_runs_when_the_model_writes_no_call(served, monkeypatch):
  _scripted(served, monkeypatch, ["I am a chatbot.", "Here you go."])
  cs = session.ChatSession(served, CFG, liked=[3, 10])
  r = cs.send("What should I watch next?")
  assert [c["by"] for c in r["tool_calls"]] == ["fallback"]
  assert r["model_text"] == ["I am a chatbot.", "Here you go."]
  # The call-less first answer is dropped from the conversation.
  assert [m[0] for m in cs.messages] == ["user", "assistant", tools.TOOL_ROLE, "assistant"]
  assert cs.messages[-1][1] == ("Here you go.",)


def test_a_failed_model_call_is_answered_then_the_fallback_helps(served, monkeypatch):
  seen = _scripted(served, monkeypatch, ['<tool_call>[{"name": "recommend", "arguments": '
                                         '{"k": 99}}]</tool_call>', "Sorry.", "Try these."])
  cs = session.ChatSession(served, CFG, liked=[3])
  r = cs.send("recommend something")
  assert [c["by"] for c in r["tool_calls"]] == ["model", "fallback"]
  assert "1..20" in r["tool_calls"][0]["error"] and r["tool_calls"][1]["items"]
  # The model saw the error (it could have retried) ...
  role, (err,) = seen[1][-1]
  assert role == tools.TOOL_ROLE and err.startswith("<tool_response>\nerror: recommend:")
  assert "1..20" in err and "recommend" in seen[1][-2][1][0]
  # ... but the failed attempt leaves the history once the turn is over.
  assert [m[0] for m in cs.messages] == ["user", "assistant", tools.TOOL_ROLE, "assistant"]
  assert '"k": 4' in cs.messages[1][1][0] and cs.messages[-1][1] == ("Try these.",)


def test_tool_examples_come_before_the_conversation_only_in_the_prompt(served, monkeypatch):
  seen = _scripted(served, monkeypatch, ["Hello!"])
  cs = session.ChatSession(served, session.SessionConfig(tool_examples=True, intents=False))
  cs.send("hi")
  roles = [m[0] for m in seen[0]]
  n = len(tools.EXAMPLES)
  assert roles == ["system"] + ["user", "assistant"] * n + ["user"]
  for (ask, call), (u, a) in zip(tools.EXAMPLES, zip(seen[0][1:-1:2], seen[0][2::2],
                                                      strict=True), strict=True):
    assert u[1] == (ask,) and a[1] == (call,)
    assert not tools.parse_tool_calls(call)[0].error
  assert seen[0][-1][1] == ("hi",) and [m[0] for m in cs.messages] == ["user", "assistant"]


def test_model_tools_off_ignores_calls(served, monkeypatch):
  _scripted(served, monkeypatch, ['<tool_call>[{"name": "recommend"}]</tool_call>'])
  cs = session.ChatSession(served, session.SessionConfig(model_tools=False, intents=False))
  r = cs.send("hello")
  assert r["tool_calls"] == [] and r["reply"] == session.NO_ANSWER


def test_more_recommendations_are_new_ones(served, monkeypatch):
  _scripted(served, monkeypatch, [])
  cs = session.ChatSession(served, CFG, liked=[3, 10])
  first = [c["id"] for c in cs.send("Recommend 3")["tool_calls"][0]["items"]]
  assert first == [i for i, _ in served.recommend([3, 10], 3)]
  more = [c["id"] for c in cs.send("Can you recommend 3 more?")["tool_calls"][0]["items"]]
  assert more == [i for i, _ in served.recommend([3, 10], 3, exclude=first)]
  assert len(more) == 3 and not set(more) & set(first)


# --------------------------------------------------------------------------- references


def test_ordinals_and_that_one_refer_to_the_last_list(served, monkeypatch):
  _scripted(served, monkeypatch, [])
  cs = session.ChatSession(served, CFG, liked=[3, 10])
  shown = [it["id"] for it in cs.send("Recommend 4 please")["items"]]
  want = [i for i, _ in served.recommend([3, 10], 4)]
  assert shown == want
  r = cs.send("Tell me about the second one")
  assert [m["id"] for m in r["mentioned"]] == [want[1]]
  assert r["tool_calls"][0]["call"] == {"name": "item_details", "arguments": {"id": want[1]}}
  # The last reply showed one item; ordinals still index the last list of several.
  assert cs.references("the first one and number 3") == [want[0], want[2]]
  assert cs.references("what about the last?") == [want[-1]]
  assert cs.references("tell me more about that one") == [want[1]]   # the last reply's
  assert cs.references("the first time I saw it") == []
  assert cs.references("the 9th one") == []                         # no such entry
  r = cs.send("I liked the fourth one")
  assert cs.history == [3, 10, want[3]]


def test_the_second_one_after_an_ask_back(monkeypatch):
  served = T.served()   # own catalogue: this test adds items
  _scripted(served, monkeypatch, [])
  cat = served.catalogue
  j, k = cat.add("Heat (1995)", "x"), cat.add("Heat (2003)", "y")
  cs = session.ChatSession(served, CFG)
  assert cs.send('I liked "heat"')["reply"] == "Did you mean: Heat (1995) or Heat (2003)?"
  r = cs.send("the second one")
  assert [m["id"] for m in r["mentioned"]] == [k] and cs.history == [k]
  assert cs.references("that one") == [j]   # nothing shown since: the ask-back's first


# --------------------------------------------------------------------------- search


@pytest.mark.parametrize("text,query", [
    ("find me something with a dark tone", "dark tone"),
    ("Can you find me something with a dark tone?", "dark tone"),
    ("I'm looking for 3 funny movies", "funny"),
    ("search for horror", "horror"),
    ("Do you have any sci-fi films about the sea?", "sci-fi sea"),
    ("show me a movie about a family secret please", "family secret"),
    ("Any lighthearted mysteries?", "lighthearted mysteries"),
    ("I want a good romantic comedy set in a coastal village", "romantic comedy set coastal "
                                                               "village"),
    ("find me something", ""),
])
def test_search_query_strips_request_phrasing(text, query):
  assert session.search_query(text) == query


def test_fallback_search_uses_the_stripped_query(served, monkeypatch):
  _scripted(served, monkeypatch, [])
  cs = session.ChatSession(served, CFG)
  r = cs.send("Could you find me something with a dark tone, please?")
  call = r["tool_calls"][0]
  assert call["by"] == "fallback"
  assert call["call"] == {"name": "search_items", "arguments": {"query": "dark tone", "k": 4}}
  want = [i for i, _ in served.catalogue.search("dark tone", 4)]
  assert [it["id"] for it in call["items"]] == want and want
  assert all("dark" in served.catalogue.texts[i].lower() for i in want[:2])
  # Nothing to search for: what the person would like instead.
  r = cs.send("find me something")
  assert r["tool_calls"][0]["call"]["name"] == "recommend"


# ------------------------------------------------------------------ Phase 2 tool_call data


def test_phase2_tool_call_samples_are_calls_the_session_executes(served):
  ds = T.dataset()
  split = types.leave_one_out(ds)
  samples = phase2.conversational_samples(ds, split, "tool_call", 60, seed=0)
  box = tools.Toolbox(served)
  kinds = set()
  for s in samples:
    system, user, answer = s.turns
    assert system.content == (tools.system_prompt(served.label),)
    liked = [p.index for p in user.content if isinstance(p, P.Slot)]
    assert set(liked) <= set(split.train[s.user].tolist())   # train items only
    (call,) = tools.parse_tool_calls(answer.content[0])
    res = box.run(call, history=liked)
    assert not res.error and res.items, (answer, res.error)
    kinds.add(call.name)
    if call.name == "item_details":
      assert res.items == liked[-1:]
    if call.name == "search_items":   # the query is one of the liked item's attributes
      assert call.arguments["query"] in " ".join(served.catalogue.attrs[liked[-1]]).lower()
  assert kinds == set(tools.TOOLS)


def test_phase2_tool_call_task_leaves_the_other_tasks_unchanged():
  ds = T.dataset()
  split = types.leave_one_out(ds)
  off = dict(phase2.DEFAULT_WEIGHTS, tool_call=0.0)
  base = phase2.train_samples(ds, split, seed=5, examples_per_user=2, weights=off)
  full = phase2.train_samples(ds, split, seed=5, examples_per_user=2)
  assert full[:len(base)] == base
  extra = full[len(base):]
  n_seq = sum(s.task == "sequential" for s in base)
  assert {s.task for s in extra} == {"tool_call"}
  assert len(extra) == round(n_seq * phase2.DEFAULT_WEIGHTS["tool_call"]) > 0


def test_invented_titles_are_found():
  shown = ["The Silent Tower (1960s)"]
  assert session.invented_titles("Try The Silent Tower (1960s)!", shown) == []
  assert session.invented_titles(
      "You can find a Golden Dream (2010s) in the island of Ai (2010s)", []) == [
          "You can find a Golden Dream (2010s)", "Ai (2010s)"]
  # A real title next to a made-up one: only the made-up one is reported.
  assert session.invented_titles("The Silent Tower (1960s) or Moon Song (1999)", shown) == [
      "Moon Song (1999)"]


def test_a_reply_with_made_up_items_is_replaced_by_the_catalogue_items(served, monkeypatch):
  _scripted(served, monkeypatch, [
      '<tool_call>[{"name": "recommend", "arguments": {"k": 2}}]</tool_call>',
      "You will love Golden Dream (2010s)."])
  cs = session.ChatSession(served, CFG, liked=[3, 10])
  r = cs.send("recommend something")
  want = [i for i, _ in served.recommend([3, 10], 2)]
  assert r["invented"] == ["You will love Golden Dream (2010s)"]
  assert "Golden Dream" not in r["reply"] and r["reply"].startswith(session.FOUND)
  assert [it["id"] for it in r["items"]] == want
  assert all(served.catalogue.display(i) in r["reply"] for i in want)
  # The made-up text does not enter the conversation either.
  assert "Golden Dream" not in str(cs.messages)


def test_a_search_that_finds_nothing_lets_the_fallback_recommend(served, monkeypatch):
  _scripted(served, monkeypatch, [
      '<tool_call>[{"name": "search_items", "arguments": {"query": "zzzz"}}]</tool_call>',
      "", "Here you go."])
  cs = session.ChatSession(served, CFG, liked=[3, 10])
  r = cs.send("Can you recommend something for me?")
  assert [c["by"] for c in r["tool_calls"]] == ["model", "fallback"]
  assert not r["tool_calls"][0]["items"] and r["tool_calls"][1]["items"]


def test_a_question_about_a_listed_item_gets_its_details_even_after_other_calls(
    served, monkeypatch):
  want = [i for i, _ in served.recommend([3, 10], 4)]
  query = served.catalogue.display(want[1])     # a search that finds something else
  _scripted(served, monkeypatch, [
      "", "Here.",  # turn 1: no call (the fallback recommends), then the answer
      tools.format_call("search_items", {"query": query}), "It is a story.",
      "It is a story."])
  cs = session.ChatSession(served, CFG, liked=[3, 10])
  assert [it["id"] for it in cs.send("Recommend 4 please")["items"]] == want
  r = cs.send("Tell me more about the first one")
  calls = [(c["by"], c["call"]["name"]) for c in r["tool_calls"]]
  assert calls[0] == ("model", "search_items") and r["tool_calls"][0]["items"]
  assert ("fallback", "item_details") in calls
  details = [c for c in r["tool_calls"] if c["call"]["name"] == "item_details"]
  assert details[0]["call"]["arguments"] == {"id": want[0]}
  assert served.catalogue.display(want[0]) in r["reply"]
