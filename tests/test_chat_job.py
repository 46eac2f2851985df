"""The chat job end to end: an adapter export, a scripted conversation, the transcript."""

from __future__ import annotations

import io
import json

from configs import chat as chat_cfg
from ilm_jax.chat import export
from ilm_jax.jobs import chat
from tests import _chat_tiny as T


def test_scripted_chat_from_an_adapter_export(tmp_path):
  ds = T.dataset()
  served = T.shared_served()
  adapter = export.save(tmp_path / "adapter", served, dict(T.META), dataset=ds.name,
                        item_ids=ds.item_ids, user_ids=ds.user_ids)
  c = chat_cfg.get_config("tiny")
  c.adapter = str(adapter)
  c.max_new_tokens = 4
  a, b = ds.item_titles[3], ds.item_titles[10]
  script = tmp_path / "script.txt"
  script.write_text(f"I loved {a} and {b}\n\nrecommend 3 more\ntell me about {b}\n")
  c.script = str(script)
  out = io.StringIO()
  records = chat.run(c, str(tmp_path / "wd"), stdout=out)
  assert [r["person"] for r in records] == [f"I loved {a} and {b}", "recommend 3 more",
                                            f"tell me about {b}"]
  text = out.getvalue()
  want = [i for i, _ in served.recommend([3, 10], 3)]
  assert '[tool call by intent] recommend({"history": [3, 10], "k": 3})' in text
  assert "[tool result] " + "; ".join(f"#{i} {ds.item_titles[i]}" for i in want) in text
  assert "[tool call by intent] item_details" in text
  logged = [json.loads(x) for x in (tmp_path / "wd/chat/transcript.jsonl").read_text()
            .splitlines()]
  assert [x["person"] for x in logged] == [r["person"] for r in records]
  # A user's history seeds the session; bad liked titles are a clear error.
  c.script, c.messages, c.user = "", "recommend 2", 4
  rec = chat.run(c, str(tmp_path / "wd2"), stdout=io.StringIO())[0]
  call = rec["tool_calls"][0]["call"]
  assert call["arguments"]["history"] == [int(i) for i in served.histories[4]]
