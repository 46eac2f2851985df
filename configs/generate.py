r"""Text generation and a multi-turn chat REPL with the frozen LLM (no item tokens).

  python -m ilm_jax.main --config=configs/generate.py --config.prompt="Hi!" --workdir=DIR
  python -m ilm_jax.main --config=configs/generate.py:chat --workdir=DIR   # stdin REPL

ARG (comma-separated, optional):
  chat   multi-turn REPL: each stdin line is a user turn, EOF ends the session.
  tiny   a random 2-layer model with SmolLM2's tokenizer (runs in seconds; tests).

Keys: model ('' = packaged SmolLM2-135M-Instruct GGUF; else a .gguf file or a Hugging
Face folder), prompt, system (optional system message), template (wrap the prompt in
the chat template), max_new_tokens, temperature (0 = greedy), top_k, top_p, beam_size
(> 1: beam search, greedy scoring), seed, dtype. The job prints each reply and writes
DIR/generate.jsonl (one record per reply).
"""

from __future__ import annotations

import ml_collections

from ilm_jax import config_lib


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  """The generate job's config; ``arg`` as in the module docstring."""
  parts = [p.strip().lower() for p in (arg or "").split(",") if p.strip()]
  unknown = [p for p in parts if p not in ("chat", "tiny")]
  if unknown:
    raise config_lib.ConfigError(f"configs/generate.py:{arg}: unknown {unknown}; valid: chat, tiny")
  c = ml_collections.ConfigDict()
  c.job = "generate"
  c.model = ""
  c.tiny = "tiny" in parts
  c.chat = "chat" in parts
  c.prompt = "" if c.chat else "Give me a short list of three fruits."
  c.system = ""
  c.template = True
  c.max_new_tokens = 16 if c.tiny else 128
  c.temperature = 0.0
  c.top_k = 0
  c.top_p = 1.0
  c.beam_size = 1
  c.seed = 0
  c.dtype = "float32"
  return c
