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
  assert '[tool call by fallback] recommend({"history": [3, 10], "k": 3})' in text
  assert "[tool result] " + "; ".join(f"#{i} {ds.item_titles[i]}" for i in want) in text
  assert "[tool call by fallback] item_details" in text
  # Each call is shown after the model output it followed: the fallback's recommend
  # after the model's first (call-less) output, before the answer written on its result.
  turn2 = text.split("person: recommend 3 more")[1].split("person:")[0]
  assert turn2.index("[model output 1]") < turn2.index("[tool call by fallback] recommend") \
      < turn2.index("[model output 2]") < turn2.index("assistant:")
  logged = [json.loads(x) for x in (tmp_path / "wd/chat/transcript.jsonl").read_text()
            .splitlines()]
  assert [x["person"] for x in logged] == [r["person"] for r in records]
  # A user's history seeds the session; bad liked titles are a clear error.
  c.script, c.messages, c.user = "", "recommend 2", 4
  rec = chat.run(c, str(tmp_path / "wd2"), stdout=io.StringIO())[0]
  call = rec["tool_calls"][0]["call"]
  assert call["arguments"]["history"] == [int(i) for i in served.histories[4]]


def test_chat_job_loads_the_trained_model_from_the_workdir(tmp_path):
  """The phase2 job's layout (WORKDIR/phase2/<method>/ilm.json + params, CF npz, prepared
  data): the job loads it, exports the adapter and chats."""
  from ilm_jax.cf import mf
  from ilm_jax.jobs import cf as cf_job
  from ilm_jax.models import ilm as ilm_lib
  ds = T.dataset()
  wd = tmp_path / "wd"
  items, users = T.cf_tables()
  cf = mf.save_embeddings(cf_job.embeddings_path(wd), users, items, ds.user_ids, ds.item_ids,
                          {"dataset": ds.name, "alpha": T.ALS.alpha, "reg": T.ALS.reg})
  meta = {**T.META, "method": "mlp", "cf_path": str(cf)}
  ilm_lib.save_trained(ilm_lib.output_dir(wd, "mlp"), T.ilm(), meta, meta["frozen"])
  c = chat_cfg.get_config("tiny")
  c.max_new_tokens = 4
  c.messages = f"I loved {ds.item_titles[3]}||recommend 2"
  records = chat.run(c, str(wd), stdout=io.StringIO())
  want = [i for i, _ in T.shared_served().recommend([3], 2)]
  assert [it["id"] for it in records[1]["tool_calls"][0]["items"]] == want
  loaded = export.load(wd / "chat" / "adapter", *T.llm_and_tokenizer())
  assert loaded.manifest["dataset"]["name"] == ds.name
  assert loaded.item_tokens.shape == T.shared_served().item_tokens.shape
