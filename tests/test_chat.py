"""Chat: cached item tokens, tools (incl. malformed calls), new items, export, sessions."""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pytest
from flax import nnx

from ilm_jax.chat import export, session, tools
from ilm_jax.data import types
from ilm_jax.models import ilm as ilm_lib
from tests import _chat_tiny as T

CFG = session.SessionConfig(max_new_tokens=4, k=5)


@pytest.fixture(scope="module")
def served():
  T.shared_served()   # computes the item tokens once for every test module
  return T.served()   # this module adds items: its own catalogue and tables


@pytest.fixture
def no_encoder(monkeypatch, served):
  """Serving must not run the item encoder: any call raises."""
  def boom(*a, **kw):
    raise AssertionError("the item encoder ran while serving")
  monkeypatch.setattr(type(served.ilm.encoder), "__call__", boom)


def test_item_token_cache_equals_the_encoder_output(served):
  want = np.asarray(served.ilm.encoder(served.ilm.cf_items[...]))
  np.testing.assert_allclose(served.item_tokens[:len(want)], want, rtol=1e-5, atol=1e-6)
  assert served.item_tokens.shape[1:] == (2, served.llm.config.dim)


def test_render_puts_k_placeholders_per_item_slot(served):
  from ilm_jax.data import prompts as P
  ids, slots = served.render([("user", ("I like", " X", P.Slot(P.ITEM, 7), " and",
                                        P.Slot(P.ITEM, 9)))])
  assert [i for _, i in slots] == [7, 9]
  pad = served.tokenizer.pad_id
  for p, _ in slots:
    assert ids[p:p + 2] == [pad, pad]
  emb, mask = served.embeds(ids, slots)
  shift = emb.shape[1] - len(ids)
  np.testing.assert_allclose(np.asarray(emb[0, shift + slots[1][0] + 1]),
                             served.item_tokens[9, 1], rtol=1e-6)
  assert np.asarray(mask[0]).tolist() == [False] * shift + [True] * len(ids)


def test_session_uses_tools_and_names_catalogue_items_without_the_encoder(served, no_encoder):
  ds = T.dataset()
  cs = session.ChatSession(served, CFG)
  a, b = ds.item_titles[3], ds.item_titles[10]
  r1 = cs.send(f"I loved {a} and {b}.")
  assert [m["id"] for m in r1["mentioned"]] == [3, 10] and cs.history == [3, 10]
  r2 = cs.send("Can you recommend 3 more?")
  call = r2["tool_calls"][0]
  assert call["by"] == "fallback"   # a random tiny LLM writes no calls of its own
  assert call["call"] == {"name": "recommend", "arguments": {"history": [3, 10], "k": 3}}
  want = [i for i, _ in served.recommend([3, 10], 3)]
  assert [it["id"] for it in call["items"]] == want and not set(want) & {3, 10}
  for i in want:   # every recommended item is named in the reply, by its title
    assert served.catalogue.display(i) in r2["reply"]
  r3 = cs.send(f"Tell me about {b}")
  assert r3["tool_calls"][0]["call"]["name"] == "item_details"
  assert b in r3["reply"]
  # The prompt carried the items as soft tokens: the tool turns hold slots.
  ids, slots = served.render(cs._prompt())
  assert {3, 10} <= {i for _, i in slots} and set(want) <= {i for _, i in slots}


def test_ambiguous_title_is_asked_back(served):
  cs = session.ChatSession(served, CFG)
  cat = served.catalogue
  j = cat.add("Heat (1995)", "x")
  k = cat.add("Heat (2003)", "y")
  try:
    r = cs.send('I liked "heat"')
    assert r["ask_back"] and {it["id"] for it in r["items"]} == {j, k}
    assert r["reply"] == "Did you mean: Heat (1995) or Heat (2003)?"
  finally:   # undo: the shared catalogue must match the model's tables
    del cat.titles[j:], cat.texts[j:], cat.tokens[j:], cat.attrs[j:]
    cat._rebuild()


@pytest.mark.parametrize("text,error", [
    ("<tool_call>{not json</tool_call>", "not valid JSON"),
    ('<tool_call>{"name": "fly", "arguments": {}}</tool_call>', "unknown tool 'fly'"),
    ('<tool_call>{"name": "search_items", "arguments": {"query": 3}}</tool_call>',
     "non-empty string"),
    ('<tool_call>{"name": "recommend", "arguments": {"k": "many"}}</tool_call>', "integer"),
    ('<tool_call>{"name": "recommend", "arguments": {"history": ["zzqx qqq"]}}</tool_call>',
     "no catalogue item"),
    ('<tool_call>{"name": "item_details", "arguments": {"id": 99999}}</tool_call>', "no item"),
    ('<tool_call>{"name": "item_details", "arguments": {"id": 1, "x": 2}}</tool_call>',
     "not ['x']"),
    ('<tool_call>["a"]</tool_call>', "JSON object"),
    ('<tool_call>{"name": "recommend", "arguments": [1]}', "must be a JSON object"),
])
def test_malformed_tool_calls_get_an_error_message_not_a_crash(served, text, error):
  calls = tools.parse_tool_calls(text)
  assert len(calls) == 1
  res = tools.Toolbox(served).run(calls[0], history=[1])
  assert error in res.error and not res.items
  assert "error:" in tools.Toolbox(served).result_parts(res)[0]


def test_model_emitted_tool_calls_are_executed_and_errors_fed_back(served, monkeypatch):
  outs = iter(['<tool_call>{"name": "nope"}</tool_call>',
               '<tool_call>{"name": "search_items", "arguments": {"query": "harbor"}}'
               '</tool_call>', "Here you go."])
  monkeypatch.setattr(served, "generate", lambda *a, **kw: next(outs))
  cs = session.ChatSession(served, session.SessionConfig(intents=False))
  r = cs.send("hello")
  assert [c["by"] for c in r["tool_calls"]] == ["model", "model"]
  assert "unknown tool" in r["tool_calls"][0]["error"]
  hits = [i for i, _ in served.catalogue.search("harbor", 5)]
  assert [it["id"] for it in r["tool_calls"][1]["items"]] == hits
  assert r["reply"].startswith("Here you go.") and r["grounded"] == bool(hits)
  roles = [m[0] for m in cs.messages]
  tool = tools.TOOL_ROLE
  # The failed call and its error left the history; the working one stays, its result a
  # <tool_response> block carrying the items' slots.
  assert roles == ["user", "assistant", tool, "assistant"]
  assert "search_items" in cs.messages[1][1][0]
  slots = [p.index for p in cs.messages[2][1] if not isinstance(p, str)]
  assert slots == hits and cs.messages[2][1][-1] == "\n</tool_response>"


def test_new_item_is_recommended_and_described_without_training(served, no_encoder,
                                                                monkeypatch):
  ds = T.dataset()
  split = types.leave_one_out(ds)
  # The new item is consumed by the users who consumed item 5: CF neighbours.
  fans = [u for u, s in enumerate(split.train) if 5 in s][:12]
  before = {k: np.asarray(v).copy() for k, v in
            nnx.to_pure_dict(nnx.state(served.ilm, nnx.Param)).items()
            if not isinstance(v, dict)}
  n0 = served.num_items
  monkeypatch.undo()   # the encoder runs once, here, for the new item's tokens
  new = served.add_item("Quantum Lighthouse", "a keeper hears a signal from the sea",
                        users=fans)
  assert new == n0 and served.item_tokens.shape[0] == n0 + 1
  def rank(u):
    return [i for i, _ in served.recommend(k=served.num_items, user=u)].index(new)
  fan_ranks = [rank(u) for u in fans]
  others = [u for u, s in enumerate(split.train) if 5 not in s][:24]
  other_ranks = [rank(u) for u in others]
  # Recommended (top 10) to several fans, and ranked far higher for fans than for others.
  hits = [u for u, r in zip(fans, fan_ranks, strict=True) if r < 10]
  assert len(hits) >= 3, fan_ranks
  assert np.median(fan_ranks) * 3 < np.median(other_ranks), (fan_ranks, other_ranks)
  assert served.catalogue.resolve("quantum lighthouse").item == new
  cs = session.ChatSession(served, CFG, user=hits[0])
  r = cs.send("Tell me about Quantum Lighthouse")
  assert "a keeper hears a signal" in r["reply"]
  r = cs.send("What should I watch next? Recommend 10")
  assert "Quantum Lighthouse" in r["reply"]
  after = {k: np.asarray(v) for k, v in nnx.to_pure_dict(nnx.state(served.ilm, nnx.Param)).items()
           if not isinstance(v, dict)}
  for k in before:   # no training step: params untouched
    np.testing.assert_array_equal(before[k], after[k])


def test_export_round_trip_and_llm_check(served, tmp_path, monkeypatch):
  ds = T.dataset()
  out = export.save(tmp_path / "adapter", served, dict(T.META), dataset=ds.name,
                    item_ids=ds.item_ids, user_ids=ds.user_ids)
  man = json.loads((out / "manifest.json").read_text())
  assert man["dims"]["soft_tokens"] == 2 and man["dims"]["num_items"] == served.num_items
  assert len(man["llm"]["weights_sha256"]) == 64 and man["llm"]["file_sha256"]
  assert not list(tmp_path.glob("adapter.tmp-*"))

  def boom(*a, **kw):
    raise AssertionError("the item encoder ran while loading")
  llm_model, tok = T.llm_and_tokenizer()
  with monkeypatch.context() as m:
    m.setattr(type(served.ilm.encoder), "__call__", boom)
    loaded = export.load(out, llm_model, tok)
  np.testing.assert_array_equal(loaded.item_tokens, served.item_tokens)
  np.testing.assert_array_equal(loaded.item_keys, served.item_keys)
  assert loaded.catalogue.titles == served.catalogue.titles
  hist = [3, 10, 20]
  for ranker in ("cf", "retrieval"):
    assert loaded.recommend(hist, 5, ranker=ranker) == served.recommend(hist, 5, ranker=ranker)
  # Encoder params were restored, not re-initialised.
  np.testing.assert_allclose(np.asarray(loaded.ilm.encoder(loaded.ilm.cf_items[:4])),
                             served.item_tokens[:4], rtol=1e-5, atol=1e-6)
  other, _ = ilm_lib.load_llm(ml_collections.ConfigDict(dict(T.LLM_CFG, seed=1)))
  with pytest.raises(export.LlmMismatchError, match="weights sha256"):
    export.load(out, other, tok)
  with pytest.raises(FileNotFoundError, match="manifest.json"):
    export.load(tmp_path / "nothing", llm_model, tok)


def test_dedupe_sentences_cuts_greedy_loops():
  assert session.dedupe_sentences(
      "I'm glad you liked X. I'm glad you liked X. Try Y!\nTry Y! I'm glad") == \
      "I'm glad you liked X. Try Y!"
  assert session.dedupe_sentences("") == ""
