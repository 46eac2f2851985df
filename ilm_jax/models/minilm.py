"""all-MiniLM-L6-v2: the BERT uncased tokenizer (+ ``[DEC]``) and sentence embeddings.

``sentence_embed(texts)`` is the sentence-transformers recipe for this model (BERT ->
attention-masked mean pooling -> L2 normalisation); Phase 2's semantic-consistency metric
uses it. ``BertEncoder`` is a plain BERT made from the same blocks as the Q-Former.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx

from ilm_jax import masks, resources
from ilm_jax.models import bert_loading, layers

SENTENCE_MAX_LEN = 256  # sentence-transformers max_seq_length for all-MiniLM-L6-v2


def load_tokenizer(model_dir: str | pathlib.Path | None = None, *,
                   max_length: int | None = SENTENCE_MAX_LEN) -> tokenizers.Tokenizer:
  """The BERT uncased WordPiece tokenizer of ``model_dir`` (default: MiniLM's), for
  sentence embeddings. (The Q-Former's tokenizer, with ``[DEC]``, is
  ``data.tokenization.text_tokenizer``.)

  The packaged tokenizer.json pads/truncates to 128; we switch padding off (use
  ``encode_batch``) and truncate at ``max_length`` (None = no truncation).
  """
  d = pathlib.Path(model_dir) if model_dir is not None else resources.minilm_dir()
  tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
  tok.no_padding()
  if max_length is None:
    tok.no_truncation()
  else:
    tok.enable_truncation(max_length)
  return tok


def encode_batch(tok: tokenizers.Tokenizer, texts: Sequence[str],
                 pad_to: int | None = None, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Tokenises ``texts`` -> (int32[N, L] ids, bool[N, L] valid), right-padded with ``pad_id``.

  L = ``pad_to`` or the longest encoding (texts longer than ``pad_to`` are an error: set
  the tokenizer's truncation instead).
  """
  encs = tok.encode_batch(list(texts))
  longest = max((len(e.ids) for e in encs), default=0)
  length = longest if pad_to is None else pad_to
  if longest > length:
    raise ValueError(f"a text has {longest} tokens > pad_to={length}; enable truncation")
  ids = np.full((len(encs), length), pad_id, np.int32)
  for i, e in enumerate(encs):
    ids[i, :len(e.ids)] = e.ids
  valid = np.asarray(masks.padding_mask(np.array([len(e.ids) for e in encs]), length))
  return ids, valid


class BertEncoder(nnx.Module):
  """Plain BERT encoder (embeddings, embedding LayerNorm, layers); no pooler."""

  def __init__(self, *, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
               intermediate_size: int, max_position_embeddings: int = 512,
               layer_norm_eps: float = 1e-12, rngs: nnx.Rngs):
    self.embeddings = layers.TextEmbeddings(vocab_size, hidden_size, max_position_embeddings,
                                            rngs=rngs)
    self.embed_norm = layers.layer_norm(hidden_size, layer_norm_eps, rngs=rngs)
    self.layers = nnx.List([
        layers.BertLayer(hidden_size, num_heads, intermediate_size, eps=layer_norm_eps,
                         rngs=rngs) for _ in range(num_layers)])

  def __call__(self, ids: jax.Array, valid: jax.Array) -> jax.Array:
    """int[B, L], bool[B, L] -> float32[B, L, H] last hidden state."""
    x = self.embed_norm(self.embeddings(ids))
    mask = masks.text_mask(valid)
    for layer in self.layers:
      x = layer(x, mask)
    return x


def mean_pool(h: jax.Array, valid: jax.Array) -> jax.Array:
  """float[B, L, H], bool[B, L] -> float32[B, H]: mean over valid tokens."""
  m = valid.astype(jnp.float32)[..., None]
  return (h * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)


def load_encoder(model_dir: str | pathlib.Path | None = None) -> BertEncoder:
  """A ``BertEncoder`` with the weights of ``model_dir`` (default: all-MiniLM-L6-v2)."""
  d = pathlib.Path(model_dir) if model_dir is not None else resources.minilm_dir()
  cfg = bert_loading.read_bert_config(d)
  weights = bert_loading.read_safetensors(d)
  f = bert_loading.bert_config_fields(weights, str(d))
  model = BertEncoder(
      vocab_size=f["vocab_size"], hidden_size=f["hidden_size"], num_layers=f["num_layers"],
      num_heads=cfg["num_attention_heads"], intermediate_size=f["intermediate_size"],
      max_position_embeddings=f["max_position_embeddings"],
      layer_norm_eps=cfg.get("layer_norm_eps", 1e-12), rngs=nnx.Rngs(0))
  bert_loading.load_bert_encoder(model, weights, str(d))
  return model


@functools.lru_cache(maxsize=2)
def _sentence_model(model_dir: str | None):
  model = load_encoder(model_dir)
  graphdef, state = nnx.split(model)

  @jax.jit
  def embed(state, ids, valid):
    h = nnx.merge(graphdef, state)(ids, valid)
    pooled = mean_pool(h, valid)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)

  tok = load_tokenizer(model_dir)
  return tok, state, embed


def sentence_embed(texts: Sequence[str], *, model_dir: str | pathlib.Path | None = None,
                   batch_size: int = 64) -> np.ndarray:
  """float32[N, 384] L2-normalised all-MiniLM-L6-v2 sentence embeddings of ``texts``.

  Batches are padded to a multiple of 16 tokens to bound recompilation.
  """
  tok, state, embed = _sentence_model(None if model_dir is None else str(model_dir))
  out = []
  for start in range(0, len(texts), batch_size):
    chunk = list(texts[start:start + batch_size])
    ids, valid = encode_batch(tok, chunk)
    length = -(-ids.shape[1] // 16) * 16
    n = len(chunk)
    ids_p = np.zeros((batch_size, length), np.int32)
    valid_p = np.zeros((batch_size, length), bool)
    ids_p[:n, :ids.shape[1]] = ids
    valid_p[:n, :ids.shape[1]] = valid
    out.append(np.asarray(embed(state, ids_p, valid_p))[:n])
  if not out:
    return np.zeros((0, 384), np.float32)
  return np.concatenate(out, axis=0)
