"""The ``chat`` job: scripted / interactive conversations or the HTTP service (configs/chat.py)."""

from __future__ import annotations

import json
import pathlib
import sys
from typing import TextIO

import ml_collections

from ilm_jax.chat import export
from ilm_jax.chat import model as model_lib
from ilm_jax.chat import session as session_lib


def session_config(config: ml_collections.ConfigDict) -> session_lib.SessionConfig:
  return session_lib.SessionConfig(
      k=int(config.k), ranker=str(config.ranker), max_new_tokens=int(config.max_new_tokens),
      temperature=float(config.temperature), intents=bool(config.intents),
      model_tools=bool(config.get("model_tools", True)),
      tool_examples=bool(config.get("tool_examples", True)),
      max_tool_rounds=int(config.get("max_tool_rounds", 2)))


def load_served(config: ml_collections.ConfigDict, workdir: str) -> model_lib.ServedModel:
  """The ServedModel: from ``config.adapter``, else the trained model in the workdir
  (exported to WORKDIR/chat/adapter when ``config.export``)."""
  if config.adapter:
    return export.load(config.adapter)
  from ilm_jax.cf import mf  # noqa: PLC0415
  from ilm_jax.data import sources  # noqa: PLC0415
  from ilm_jax.jobs import prepare  # noqa: PLC0415
  from ilm_jax.models import ilm as ilm_lib  # noqa: PLC0415
  ds = sources.ensure_tokens(
      prepare.prepared_dataset(config.data, workdir, prepare.data_dir(config, workdir)))
  where = ilm_lib.trained_dir(workdir if not config.method else
                              ilm_lib.output_dir(workdir, config.method), None)
  meta = json.loads((where / ilm_lib.META_FILE).read_text())
  llm_model, tok = ilm_lib.load_llm(ml_collections.ConfigDict(meta["llm"]))
  model = ilm_lib.load_trained(where, None, ds, llm_model)
  emb_cfg = mf.load_embeddings(meta["cf_path"]).config
  als = mf.ALSConfig(alpha=float(emb_cfg.get("alpha", 10.0)), reg=float(emb_cfg.get("reg", 1.0)))
  served = model_lib.from_dataset(model, tok, ds, als=als)
  if config.export:
    out = export.save(pathlib.Path(workdir) / "chat" / "adapter", served, meta, dataset=ds.name,
                      item_ids=ds.item_ids, user_ids=ds.user_ids)
    print(f"chat: wrote the adapter export {out}", flush=True)
  return served


def served_from(adapter: str, workdir: str, config_arg: str = "") -> model_lib.ServedModel:
  """``load_served`` for tools and benchmarks: an adapter export, else the trained model in
  ``workdir``; ``configs/chat.py:config_arg`` gives the rest. Never re-exports."""
  from ilm_jax import config_lib, resources  # noqa: PLC0415
  config = config_lib.load_config_file(resources.REPO_ROOT / "configs" / "chat.py", config_arg)
  config.adapter, config.export = adapter or "", False
  return load_served(config, workdir)


def format_turn(text: str, record: dict) -> str:
  """A transcript entry: the person; the model's outputs, each followed by the tool calls
  after it and who made them ('model': parsed from that output; 'fallback': the intent
  layer); the reply."""
  lines = [f"person: {text}"]
  outputs = record["model_text"]
  for n in range(len(outputs) + 1):
    if n:
      lines.append(f"  [model output {n}] {outputs[n - 1]!r}")
    for c in record["tool_calls"]:
      if c.get("after_output", len(outputs)) != n:
        continue
      call = c["call"]
      lines.append(f"  [tool call by {c['by']}] {call['name'] or '?'}"
                   f"({json.dumps(call['arguments'])})")
      if c["error"]:
        lines.append(f"  [tool error] {c['error']}")
      else:
        lines.append("  [tool result] " + "; ".join(
            f"#{it['id']} {it['title']}" for it in c["items"]) + (f" | {c['text']}"
                                                                  if c["text"] else ""))
  lines.append(f"assistant: {record['reply']}")
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str, stdin: TextIO | None = None,
        stdout: TextIO | None = None) -> list[dict]:
  """Runs a scripted / interactive chat or the server; returns the turn records."""
  stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
  served = load_served(config, workdir)
  if config.serve:
    from ilm_jax.chat import server  # noqa: PLC0415
    server.serve(served, session_config(config), host=config.host, port=int(config.port),
                 max_sessions=int(config.max_sessions), ttl_s=float(config.session_ttl_s))
    return []
  user = int(config.user) if int(config.user) >= 0 else None
  sess = session_lib.ChatSession(served, session_config(config), user=user)
  if config.liked:
    sess.like([t.strip() for t in config.liked.split("||") if t.strip()])
  if config.script:
    lines = pathlib.Path(config.script).read_text().splitlines()
  elif config.messages:
    lines = config.messages.split("||")
  else:
    print("Chat about the catalogue; one line per turn, EOF (Ctrl-D) ends.", file=sys.stderr)
    lines = stdin
  out_dir = pathlib.Path(workdir) / "chat"
  out_dir.mkdir(parents=True, exist_ok=True)
  records = []
  with open(out_dir / "transcript.jsonl", "a", encoding="utf-8") as log:
    for line in lines:
      text = line.strip()
      if not text:
        continue
      try:
        rec = sess.send(text)
      except ValueError as e:
        print(f"error: {e}", file=stdout, flush=True)
        continue
      records.append({"person": text, **rec})
      log.write(json.dumps(records[-1], ensure_ascii=False) + "\n")
      print(format_turn(text, rec), file=stdout, flush=True)
  return records
