"""The Q-Former's text tokenizer: MiniLM's BERT uncased WordPiece plus a ``[DEC]`` token.

``[DEC]`` replaces ``[CLS]`` as the BOS of ITG (image/item-grounded text generation, BLIP-2):
it is appended to the vocabulary, so its id is 30522 (the MiniLM vocab size) and the word
embedding table must grow by one row.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import tokenizers

from ilm_jax import resources

DEC_TOKEN = "[DEC]"
PAD_ID = 0


@functools.cache
def text_tokenizer() -> tokenizers.Tokenizer:
  """MiniLM's tokenizer with ``[DEC]`` added; padding/truncation off (see ``encode_batch``).

  Do not mutate the returned (shared) object.
  """
  tok = tokenizers.Tokenizer.from_file(str(resources.minilm_dir() / "tokenizer.json"))
  tok.no_padding()
  tok.no_truncation()
  tok.add_special_tokens([DEC_TOKEN])
  return tok


_FIXED: dict[tuple[int, int], tuple[tokenizers.Tokenizer, tokenizers.Tokenizer]] = {}


def _fixed_length(base: tokenizers.Tokenizer, max_len: int) -> tokenizers.Tokenizer:
  # A private copy per (tokenizer, length), so callers never race on padding/truncation
  # settings; ``base`` is kept in the value so its id cannot be reused while cached.
  key = (id(base), max_len)
  if key not in _FIXED:
    tok = tokenizers.Tokenizer.from_str(base.to_str())
    tok.enable_truncation(max_len)
    tok.enable_padding(length=max_len, pad_id=PAD_ID, pad_token="[PAD]")
    _FIXED[key] = (base, tok)
  return _FIXED[key][1]


def vocab_size() -> int:
  """Vocabulary size including ``[DEC]`` (30523 for MiniLM)."""
  return text_tokenizer().get_vocab_size(with_added_tokens=True)


def dec_token_id() -> int:
  return text_tokenizer().token_to_id(DEC_TOKEN)


def encode_batch(texts: Sequence[str], max_len: int,
                 tokenizer: tokenizers.Tokenizer | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Tokenises ``[CLS] text [SEP]``, truncated/padded to exactly ``max_len``.

  Args:
    texts: B strings.
    max_len: L, static sequence length (truncation keeps the final ``[SEP]``).
    tokenizer: default ``text_tokenizer()``; any BERT-style ``tokenizers.Tokenizer``.

  Returns:
    (ids int32[B, L], mask bool[B, L]) with mask False on padding.
  """
  if max_len < 2:
    raise ValueError(f"max_len must be >= 2 for [CLS] ... [SEP], got {max_len}")
  encs = _fixed_length(tokenizer or text_tokenizer(), max_len).encode_batch(list(texts))
  ids = np.array([e.ids for e in encs], np.int32).reshape(len(encs), max_len)
  mask = np.array([e.attention_mask for e in encs], bool).reshape(len(encs), max_len)
  return ids, mask
