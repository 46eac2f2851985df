"""LLM tokenizer and chat template, from GGUF metadata or a tokenizer.json (no PyTorch).

GGUF ``tokenizer.ggml.model == 'gpt2'`` (SmolLM2, Llama 3, Qwen2) is GPT-2 style
byte-level BPE: we rebuild it with ``tokenizers`` (vocab, merges, control tokens as
special tokens matched literally before BPE). The chat template is rendered with jinja2
the way transformers does (sandboxed, ``trim_blocks``/``lstrip_blocks``).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user defined, 6 byte.
_CONTROL, _USER_DEFINED = 3, 4
# Only GGUFs at least this big get a cached tokenizer: small files parse quickly anyway,
# and this keeps throw-away test files out of the cache.
_CACHE_MIN_BYTES = 16 << 20
# Ends of a turn across common chat formats; only those present in the vocab are used.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>", "</s>")


class TokenizerError(ValueError):
  """A tokenizer cannot be built from the given metadata/file."""


def _render(template: str, messages: Sequence[dict[str, str]], add_generation_prompt: bool,
            **extra: Any) -> str:
  def raise_exception(msg):
    raise jinja2.exceptions.TemplateError(msg)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  env.filters["tojson"] = lambda x, indent=None: json.dumps(x, indent=indent, ensure_ascii=False)
  return env.from_string(template).render(
      messages=list(messages), add_generation_prompt=add_generation_prompt, **extra)


def _named_errors(source: str, build):
  """Runs ``build()``; any failure becomes a TokenizerError whose message names ``source``.

  ``tokenizers`` raises bare ``Exception`` for a malformed tokenizer.json, json/gguf raise
  ValueError/IndexError/KeyError/TypeError for malformed metadata.
  """
  from ilm_jax.models import llm_loading  # noqa: PLC0415

  try:
    return build()
  except (TokenizerError, llm_loading.LoadError) as e:
    if source in str(e):
      raise
    raise TokenizerError(f"{source}: {e}") from e
  except Exception as e:  # noqa: BLE001  (see the docstring)
    raise TokenizerError(f"{source}: cannot build the tokenizer ({type(e).__name__}: {e})") from e


class LlmTokenizer:
  """Text <-> ids for the LLM, plus its chat template.

  Attributes:
    tokenizer: the underlying ``tokenizers.Tokenizer``.
    chat_template: Jinja source, or None.
    bos_id, eos_id, pad_id: special ids.
    stop_ids: ids that end a generated turn (eos + end-of-turn tokens in the vocab).
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, chat_template: str | None,
               bos_id: int | None, eos_id: int, pad_id: int | None = None,
               special_tokens: dict[str, str] | None = None):
    self.tokenizer = tokenizer
    self.chat_template = chat_template
    self.bos_id, self.eos_id = bos_id, eos_id
    self.pad_id = eos_id if pad_id is None else pad_id
    self.special_tokens = dict(special_tokens or {})
    stops = [eos_id] + [tokenizer.token_to_id(t) for t in _END_OF_TURN]
    self.stop_ids = tuple(dict.fromkeys(i for i in stops if i is not None))

  # ---------------------------------------------------------------- builders

  @classmethod
  def from_gguf(cls, path_or_reader) -> LlmTokenizer:
    """Builds the tokenizer from a GGUF file's ``tokenizer.*`` metadata.

    Raises:
      TokenizerError: (or llm_loading.LoadError for an unreadable file) naming the file.
    """
    source = str(path_or_reader) if isinstance(path_or_reader, (str, os.PathLike)) else "GGUF"
    return _named_errors(source, lambda: cls._from_gguf(path_or_reader))

  @classmethod
  def _from_gguf(cls, path_or_reader) -> LlmTokenizer:
    """A path is cached as JSON beside the converted weights (parsing a GGUF takes seconds)."""
    from ilm_jax.models import llm_loading  # noqa: PLC0415

    if not isinstance(path_or_reader, (str, os.PathLike)):
      return cls._from_gguf_reader(path_or_reader)
    path = pathlib.Path(path_or_reader)
    cache = None
    if path.exists() and path.stat().st_size >= _CACHE_MIN_BYTES:
      cache = llm_loading.cache_path(path, "tokenizer", ".json")
    if cache is not None and cache.exists():
      try:
        return cls._from_json(cache.read_text(encoding="utf-8"))
      except Exception:  # noqa: BLE001  (a damaged cache is rebuilt, never trusted)
        cache.unlink(missing_ok=True)
    tok = cls._from_gguf_reader(llm_loading.gguf_reader(path))
    if cache is not None:
      try:
        llm_loading.atomic_write_text(cache, tok._to_json())
      except OSError:
        pass  # a read-only cache dir only costs start-up time
    return tok

  def _to_json(self) -> str:
    return json.dumps({"tokenizer": self.tokenizer.to_str(), "chat_template": self.chat_template,
                       "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                       "special_tokens": self.special_tokens})

  @classmethod
  def _from_json(cls, text: str) -> LlmTokenizer:
    d = json.loads(text)
    return cls(tokenizers.Tokenizer.from_str(d["tokenizer"]), chat_template=d["chat_template"],
               bos_id=d["bos_id"], eos_id=d["eos_id"], pad_id=d["pad_id"],
               special_tokens=d["special_tokens"])

  @classmethod
  def _from_gguf_reader(cls, reader) -> LlmTokenizer:
    from ilm_jax.models import llm_loading  # noqa: PLC0415

    get = lambda k, d=None: llm_loading._field(reader, k, d)  # noqa: E731
    kind = get("tokenizer.ggml.model")
    if kind != "gpt2":
      raise TokenizerError(f"tokenizer.ggml.model={kind!r} is not supported (only 'gpt2' "
                           "byte-level BPE); use the model's tokenizer.json instead")
    tokens = list(get("tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in get("tokenizer.ggml.merges")]
    types = list(get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
    tok = tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = [tokenizers.AddedToken(t, special=True, normalized=False)
                for t, ty in zip(tokens, types, strict=True) if ty == _CONTROL]
    users = [tokenizers.AddedToken(t, special=False, normalized=False)
             for t, ty in zip(tokens, types, strict=True) if ty == _USER_DEFINED]
    tok.add_special_tokens(specials)
    if users:
      tok.add_tokens(users)
    bos = get("tokenizer.ggml.bos_token_id")
    eos = get("tokenizer.ggml.eos_token_id")
    pad = get("tokenizer.ggml.padding_token_id")
    names = {"bos_token": tokens[bos] if bos is not None else "",
             "eos_token": tokens[eos] if eos is not None else ""}
    return cls(tok, chat_template=get("tokenizer.chat_template"), bos_id=bos,
               eos_id=int(eos if eos is not None else 0), pad_id=pad, special_tokens=names)

  @classmethod
  def from_hf(cls, folder: str | os.PathLike) -> LlmTokenizer:
    """From a Hugging Face folder: tokenizer.json (+ tokenizer_config.json if present).

    Raises:
      TokenizerError: a missing or malformed file, naming the folder.
    """
    return _named_errors(str(folder), lambda: cls._from_hf(folder))

  @classmethod
  def _from_hf(cls, folder: str | os.PathLike) -> LlmTokenizer:
    folder = pathlib.Path(folder)
    path = folder / "tokenizer.json"
    if not path.exists():
      raise TokenizerError(f"{folder}: tokenizer.json not found")
    tok = tokenizers.Tokenizer.from_file(str(path))
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    model_cfg_path = folder / "config.json"
    model_cfg = json.loads(model_cfg_path.read_text()) if model_cfg_path.exists() else {}

    def token_name(key):
      v = cfg.get(key)
      return v.get("content") if isinstance(v, dict) else v

    def token_id(key, cfg_key):
      name = token_name(key)
      if name is not None and tok.token_to_id(name) is not None:
        return tok.token_to_id(name)
      v = model_cfg.get(cfg_key)
      return v[0] if isinstance(v, list) else v

    eos = token_id("eos_token", "eos_token_id")
    if eos is None:
      raise TokenizerError(f"{folder}: no eos token in tokenizer_config.json or config.json")
    names = {k: token_name(k) or "" for k in ("bos_token", "eos_token")}
    template = cfg.get("chat_template")
    tmpl_file = folder / "chat_template.jinja"
    if template is None and tmpl_file.exists():
      template = tmpl_file.read_text()
    return cls(tok, chat_template=template, bos_id=token_id("bos_token", "bos_token_id"),
               eos_id=eos, pad_id=token_id("pad_token", "pad_token_id"), special_tokens=names)

  # ---------------------------------------------------------------- API

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text`` (special tokens in the text are matched literally; no BOS)."""
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def id_to_token(self, i: int) -> str | None:
    return self.tokenizer.id_to_token(int(i))

  def apply_chat_template(self, messages: Sequence[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """The rendered chat prompt (string), as transformers' apply_chat_template(tokenize=False)."""
    if not self.chat_template:
      raise TokenizerError("this tokenizer has no chat template")
    return _render(self.chat_template, messages, add_generation_prompt, **self.special_tokens)

  def encode_chat(self, messages: Sequence[dict[str, str]],
                  add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered chat prompt."""
    return self.encode(self.apply_chat_template(messages, add_generation_prompt))
