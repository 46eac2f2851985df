r"""Does the LLM call the chat tools itself? Scripted requests against a ServedModel.

  python benchmarks/chat_tools.py [--adapter=DIR | --workdir=DIR [--config_arg=ARG]]
      [--variant=text|mlp] [--max_new_tokens=48] [--tool_examples=0|1]
      [--limit=N] [--conversation] [--out=FILE]

Without --adapter/--workdir the model is the real SmolLM2-135M-Instruct GGUF with NO
training, on the tiny generated catalogue (CF tables: a quick ALS): ``--variant=text``
(default) shows items by title only, ``mlp`` adds an untrained MLP adaptor's soft tokens
(noise to the LLM). Each scripted request (recommend / search / details phrasings) runs
in a fresh session whose person likes two catalogue items; the model's first output is
classified:

  correct    parses as a tool call of the expected tool whose arguments execute
             (search: a non-empty query; details: the mentioned item)
  wrong      parses, executes, but is another tool (or details of another item)
  malformed  a call attempt that fails (bad JSON, unknown tool, bad arguments)
  none       no call (plain text)

and ``strict`` counts calls inside ``<tool_call>`` tags. The full session (model first,
fallback intent layer after) is what the person gets; the table also shows which source
made the turn's calls. ``--conversation`` prints a scripted multi-turn transcript too.

Measured (untrained SmolLM2-135M, text variant, 24 requests, greedy): with the tool
demonstrations (default) 11 correct, 3 wrong tool, 10 failing calls, 0 without a call;
``--tool_examples=0`` (system prompt only): 0 calls in 24.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def build(args):
  """The ServedModel (an export / a trained workdir / untrained SmolLM2 stand-in)."""
  if args.adapter or args.workdir:
    from ilm_jax.jobs import chat  # noqa: PLC0415
    return chat.served_from(args.adapter, args.workdir, args.config_arg)
  import ml_collections  # noqa: PLC0415

  from ilm_jax.chat import model as model_lib  # noqa: PLC0415
  from ilm_jax.models import ilm as ilm_lib  # noqa: PLC0415
  from tests import _chat_tiny as T  # noqa: PLC0415
  llm_model, tok = ilm_lib.load_llm(ml_collections.ConfigDict(
      dict(source="", tiny=False, dtype="float32", seed=0)))
  items, users = T.cf_tables()
  meta = dict(T.META, variant=args.variant)
  return model_lib.from_dataset(ilm_lib._build(meta, llm_model, items, users), tok,
                                T.dataset(), als=T.ALS)


def requests(served):
  """[(liked item ids, message, expected tool, expected item or None)]."""
  cat = served.catalogue
  a, b, c, d = 3, 10, 7, 21
  ta, tc, td = (cat.display(i) for i in (a, c, d))
  rec = ["Can you recommend something for me?", "What should I watch next?",
         "Suggest 3 more like these.", "Recommend me 5 movies.",
         "Any recommendations based on what I liked?", "Give me 4 recommendations.",
         "What else would I enjoy? Please recommend.", "I need something new to watch. "
         "What do you recommend?"]
  search = ["Find me something with a dark tone.", "Search for horror movies.",
            "I'm looking for a lighthearted mystery.", "Show me movies set in a royal court.",
            "Do you have any westerns?", "Find a movie about a family secret.",
            "Search the catalogue for science fiction.", "Find me something whimsical."]
  details = [f"Tell me about {tc}.", f"What is {td} about?", f"Describe {tc}.",
             f"Can you give me the details of {td}?", f"Tell me more about {ta}.",
             f'What is "{tc}"?', f"I want details on {td}.", f"Describe {ta} please."]
  out = [((a, b), m, "recommend", None) for m in rec]
  out += [((a, b), m, "search_items", None) for m in search]
  out += [((a, b), m, "item_details", i) for m, i in zip(details, [c, d, c, d, a, c, d, a],
                                                         strict=True)]
  return out


def classify(served, toolbox, out: str, tool: str, item) -> tuple[str, bool]:
  from ilm_jax.chat import tools  # noqa: PLC0415
  calls = tools.parse_tool_calls(out)
  strict = "<tool_call>" in out
  if not calls:
    return "none", strict
  res = toolbox.run(calls[0], history=[3, 10])
  if res.error:
    return "malformed", strict
  if calls[0].name != tool or (item is not None and res.items != [item]):
    return "wrong", strict
  return "correct", strict


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--adapter", default="")
  p.add_argument("--workdir", default="")
  p.add_argument("--config_arg", default="tiny")
  p.add_argument("--variant", default="text", choices=("text", "mlp"))
  p.add_argument("--max_new_tokens", type=int, default=48)
  p.add_argument("--tool_examples", type=int, default=1, choices=(0, 1),
                 help="SessionConfig.tool_examples: demonstrations before the conversation")
  p.add_argument("--limit", type=int, default=0, help="first N requests only")
  p.add_argument("--conversation", action="store_true")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)

  from ilm_jax.chat import session, tools  # noqa: PLC0415
  from ilm_jax.jobs import chat as chat_job  # noqa: PLC0415
  t0 = time.perf_counter()
  served = build(args)
  print(f"model ready in {time.perf_counter() - t0:.0f}s "
        f"(LLM dim {served.llm.config.dim}, K={served.k})", flush=True)
  toolbox = tools.Toolbox(served)
  cfg = session.SessionConfig(max_new_tokens=args.max_new_tokens,
                              tool_examples=bool(args.tool_examples))
  reqs = requests(served)[:args.limit or None]
  rows, outcome, by = [], collections.Counter(), collections.Counter()
  per_tool = collections.defaultdict(collections.Counter)
  t0 = time.perf_counter()
  for liked, msg, tool, item in reqs:
    sess = session.ChatSession(served, cfg, liked=liked)
    rec = sess.send(msg)
    first = rec["model_text"][0]
    kind, strict = classify(served, toolbox, first, tool, item)
    src = "+".join(dict.fromkeys(c["by"] for c in rec["tool_calls"])) or "no call"
    outcome[kind] += 1
    outcome["strict"] += strict
    per_tool[tool][kind] += 1
    by[src] += 1
    rows.append({"message": msg, "expected": tool, "outcome": kind, "strict": strict,
                 "calls_by": src, "model_first_output": first})
    print(f"[{kind:9s}] {msg!r} -> {first[:100]!r} (calls by {src})", flush=True)
  dt = time.perf_counter() - t0
  n = len(reqs)
  print(f"\n{n} requests, {dt / max(n, 1):.1f}s each")
  print(f"{'tool':14s} {'correct':>8s} {'wrong':>6s} {'malformed':>10s} {'none':>5s}")
  for tool, c in per_tool.items():
    print(f"{tool:14s} {c['correct']:8d} {c['wrong']:6d} {c['malformed']:10d} {c['none']:5d}")
  print(f"{'all':14s} {outcome['correct']:8d} {outcome['wrong']:6d} "
        f"{outcome['malformed']:10d} {outcome['none']:5d}   (inside <tool_call> tags: "
        f"{outcome['strict']})")
  print("turn's calls made by: " + ", ".join(f"{k} {v}" for k, v in by.most_common()))
  result = {"requests": n, "outcome": dict(outcome), "per_tool": {k: dict(v) for k, v in
                                                                  per_tool.items()},
            "calls_by": dict(by), "rows": rows}
  if args.conversation:
    cat = served.catalogue
    script = [f"I loved {cat.display(3)} and {cat.display(10)}.",
              "Can you recommend 3 more?", "Tell me about the second one.",
              "Find me something with a dark tone.", "I like that one. Recommend 2 more like it."]
    sess = session.ChatSession(served, cfg)
    print("\n--- scripted conversation ---")
    turns = []
    for line in script:
      rec = sess.send(line)
      turns.append({"person": line, **rec})
      print(chat_job.format_turn(line, rec), flush=True)
    result["conversation"] = turns
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1, default=str))
  return result


if __name__ == "__main__":
  main()
