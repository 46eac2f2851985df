"""Generate text with the frozen LLM, once or as a multi-turn chat REPL on stdin."""

from __future__ import annotations

import itertools
import json
import os
import sys
from typing import TextIO

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from ilm_jax import generation, llm_tokenizer, resources
from ilm_jax.models import llm, llm_loading

# Prompts are padded to a multiple of this, so a growing chat reuses compilations.
_PROMPT_BUCKET = 64


def load_model(config: ml_collections.ConfigDict):
  """(model, tokenizer) for ``config.model`` / ``config.tiny``."""
  if config.tiny:
    tok = llm_tokenizer.LlmTokenizer.from_gguf(resources.smollm2_gguf())
    cfg = llm.LlmConfig.tiny(vocab=tok.vocab_size, bos_id=tok.bos_id or 0,
                             eos_ids=(tok.eos_id,), pad_id=tok.pad_id, dtype=config.dtype)
    return llm.Llm(cfg, rngs=nnx.Rngs(config.seed)), tok
  return llm_loading.load(config.model or None, dtype=config.dtype)


class Generator:
  """Turns a list of chat messages (or raw text) into a reply."""

  def __init__(self, model, tokenizer: llm_tokenizer.LlmTokenizer,
               config: ml_collections.ConfigDict):
    self.model, self.tok, self.c = model, tokenizer, config
    self.stop_ids = tuple(dict.fromkeys(tokenizer.stop_ids + model.config.eos_ids))
    self.rng = jax.random.key(config.seed)

  def reply(self, prompt_ids: list[int]) -> dict:
    c = self.c
    tokens, mask = generation.pad_prompts([prompt_ids], self.tok.pad_id, multiple=_PROMPT_BUCKET)
    if c.beam_size > 1:
      out = generation.beam_search(self.model, tokens=tokens, mask=mask, beam_size=c.beam_size,
                                   max_new_tokens=c.max_new_tokens, stop_ids=self.stop_ids,
                                   pad_id=self.tok.pad_id)
      ids, n, score = out.tokens[0, 0], int(out.lengths[0, 0]), float(out.scores[0, 0])
    else:
      self.rng, sub = jax.random.split(self.rng)
      out = generation.generate(self.model, tokens=tokens, mask=mask,
                                max_new_tokens=c.max_new_tokens, temperature=c.temperature,
                                top_k=c.top_k, top_p=c.top_p, stop_ids=self.stop_ids,
                                pad_id=self.tok.pad_id, rng=sub)
      ids, n, score = out.tokens[0], int(out.lengths[0]), float(out.logprobs[0])
    ids = np.asarray(ids[:n]).tolist()
    text = self.tok.decode([i for i in ids if i not in self.stop_ids], skip_special_tokens=True)
    return {"prompt_tokens": len(prompt_ids), "ids": ids, "text": text, "logprob": score}

  def messages_prompt(self, messages: list[dict[str, str]]) -> list[int]:
    return self.tok.encode_chat(messages, add_generation_prompt=True)


def run(config: ml_collections.ConfigDict, workdir: str,
        stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
  stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
  os.makedirs(workdir, exist_ok=True)
  model, tok = load_model(config)
  gen = Generator(model, tok, config)
  log_path = os.path.join(workdir, "generate.jsonl")
  with open(log_path, "a", encoding="utf-8") as log:

    def emit(record):
      log.write(json.dumps(record, ensure_ascii=False) + "\n")
      log.flush()

    messages = [{"role": "system", "content": config.system}] if config.system else []
    if not config.chat:
      if config.template:
        ids = gen.messages_prompt(messages + [{"role": "user", "content": config.prompt}])
      else:
        ids = tok.encode(config.prompt)
      result = gen.reply(ids)
      print(result["text"], file=stdout, flush=True)
      emit({"prompt": config.prompt, **result})
      return
    print("Chat with the model; one line per turn, EOF (Ctrl-D) ends.", file=sys.stderr)
    # An optional first turn from the command line; stdin is read lazily (interactive).
    lines = itertools.chain([config.prompt] if config.prompt else [], stdin)
    for line in lines:
      user = line.rstrip("\n")
      if not user.strip():
        continue
      messages.append({"role": "user", "content": user})
      result = gen.reply(gen.messages_prompt(messages))
      messages.append({"role": "assistant", "content": result["text"]})
      print(f"assistant: {result['text']}", file=stdout, flush=True)
      emit({"turn": len(messages) // 2, "user": user, **result})
  logging.info("wrote %s", log_path)
