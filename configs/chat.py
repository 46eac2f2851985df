r"""Chat job: conversational recommendation with a trained ILM (item tokens + tools).

  python -m ilm_jax.main --config=configs/chat.py[:ARG] --workdir=DIR [--config.x=...]

DIR holds a trained Phase 2 model (``DIR/phase2/<method>``, from the phase2 job) and its
prepared dataset, or set ``--config.adapter=EXPORT_DIR`` (an adapter export). The job
loads it, computes the catalogue's item tokens once and (``export``, default on) writes
the adapter export to DIR/chat/adapter, then:

  * ``script`` (a file, one person message per line) or ``messages`` ('||'-separated):
    a scripted conversation, printed as a transcript (tool calls shown) and written to
    DIR/chat/transcript.jsonl;
  * ``serve``: the HTTP service + web page on host:port (``ilm_jax.chat.server``);
  * otherwise a REPL on stdin (one line per turn; EOF ends).

ARG (comma-separated, optional): a dataset (generated (default) | ml1m | beauty |
clothing), ``tiny`` (the tiny catalogue; the phase2 ``:tiny`` run) and ``serve``.

Keys: method ('' = the only one under DIR/phase2), user (a user index whose history
seeds the session; -1 none), liked ('||'-separated titles the person likes), ranker
(cf | retrieval | blend, see ``chat.model``), k, max_new_tokens, temperature,
model_tools (execute the tool calls the LLM writes; it is offered the tools in its system
prompt), tool_examples (show it a few request -> call exchanges first), intents (the
deterministic fallback layer that calls tools when the LLM made no call that worked, see
``chat.session``), max_tool_rounds, host, port, max_sessions, session_ttl_s.
"""

from __future__ import annotations

import ml_collections

from ilm_jax import config_lib

DATASETS = ("generated", "ml1m", "beauty", "clothing")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The chat job's config; ``arg`` as in the module docstring."""
  dataset, parts = config_lib.parse_config_arg(arg, config_file="configs/chat.py",
                                               flags=("tiny", "serve"), datasets=DATASETS)
  tiny = "tiny" in parts
  c = ml_collections.ConfigDict()
  c.job = "chat"
  c.data = config_lib.dataset_config(dataset, tiny=tiny)
  c.data_dir = ""          # '' = WORKDIR/data/<dataset>
  c.method = ""            # '' = the only trained model under WORKDIR/phase2
  c.adapter = ""           # an adapter export folder instead of WORKDIR/phase2/<method>
  c.export = True          # write WORKDIR/chat/adapter
  c.script = ""
  c.messages = ""
  c.user = -1
  c.liked = ""
  c.ranker = "cf"
  c.k = 5
  c.max_new_tokens = 16 if tiny else 64
  c.temperature = 0.0
  c.model_tools = True
  c.tool_examples = True
  c.intents = True
  c.max_tool_rounds = 2
  c.serve = "serve" in parts
  c.host = "127.0.0.1"
  c.port = 8765
  c.max_sessions = 256
  c.session_ttl_s = 1800.0
  return c
