"""all-MiniLM-L6-v2: tokenizer ids, hidden states and sentence embeddings vs the reference,
and the Q-Former text tower initialised from it."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ilm_jax import resources
from ilm_jax.models import bert_loading, minilm, qformer


@pytest.fixture(scope="module")
def ref(reference_dir):
  d = reference_dir / "minilm"
  if not d.is_dir():
    pytest.skip(f"{d} not found")
  try:
    resources.minilm_dir()
  except resources.MissingResourceError as e:
    pytest.skip(str(e))
  meta = json.loads((d / "minilm.json").read_text())
  return meta, dict(np.load(d / "minilm.npz"))


@pytest.fixture(scope="module")
def encoder():
  return minilm.load_encoder()


def _tol(rtol, atol):
  return {"rtol": rtol, "atol": atol}


def test_tokenizer_ids(ref):
  meta, npz = ref
  tok = minilm.load_tokenizer()
  texts = [s["text"] for s in meta["sentences"]]
  for s in meta["sentences"]:
    assert tok.encode(s["text"]).ids == s["input_ids"], s["text"]
  ids, valid = minilm.encode_batch(tok, texts, pad_to=npz["input_ids"].shape[1])
  np.testing.assert_array_equal(ids, npz["input_ids"])
  np.testing.assert_array_equal(valid, npz["attention_mask"].astype(bool))


def test_dec_token_matches_the_qformer_tokenizer():
  """Our [DEC] id (the embedding row we add) is the one the data tokenizer assigns."""
  from ilm_jax.data import tokenization

  assert tokenization.dec_token_id() == qformer.QFormerConfig().dec_token_id
  assert tokenization.vocab_size() == qformer.QFormerConfig().vocab_size
  assert tokenization.DEC_TOKEN == qformer.DEC_TOKEN


def test_hidden_states_and_embeddings(ref, encoder):
  _, npz = ref
  ids = jnp.asarray(npz["input_ids"])
  valid = jnp.asarray(npz["attention_mask"]).astype(bool)
  h = np.asarray(encoder(ids, valid))
  m = npz["attention_mask"].astype(bool)
  np.testing.assert_allclose(h[m], npz["last_hidden_state"][m], **_tol(1e-4, 1e-4))
  np.testing.assert_allclose(minilm.mean_pool(h, valid), npz["mean_pooled"], **_tol(1e-4, 1e-4))


def test_sentence_embed(ref):
  meta, npz = ref
  texts = [s["text"] for s in meta["sentences"]]
  e = minilm.sentence_embed(texts, batch_size=4)  # 2 batches, the second one padded
  assert e.shape == npz["sentence_embedding"].shape
  np.testing.assert_allclose(e, npz["sentence_embedding"], **_tol(1e-4, 1e-5))
  np.testing.assert_allclose(e @ e.T, npz["cosine_similarity"], **_tol(1e-4, 1e-5))


def test_qformer_text_tower_from_minilm(ref, encoder):
  """The MiniLM-initialised Q-Former's text-only pass IS MiniLM (token type folded in)."""
  _, npz = ref
  model, info = bert_loading.qformer_from_bert_dir(
      resources.minilm_dir(), rngs=nnx.Rngs(0), num_query_tokens=2, cf_dim=8)
  assert info == {"layers_used": 6, "checkpoint_layers": 6, "lm_head": False}
  cfg = model.cfg
  assert cfg.vocab_size == qformer.BERT_VOCAB_SIZE + 1 and cfg.dec_token_id == 30522
  ids = jnp.asarray(npz["input_ids"])
  valid = jnp.asarray(npz["attention_mask"]).astype(bool)
  m = npz["attention_mask"].astype(bool)
  h = np.asarray(model.text_pass(ids, valid))
  np.testing.assert_allclose(h[m], npz["last_hidden_state"][m], **_tol(1e-4, 1e-4))
  word = np.asarray(model.embeddings.word.embedding[...])
  np.testing.assert_array_equal(word[cfg.dec_token_id], word[cfg.cls_token_id])
  for layer in model.layers:
    for a, b in ((layer.ffn_query.up.kernel, layer.ffn.up.kernel),
                 (layer.ffn_query.down.bias, layer.ffn.down.bias),
                 (layer.ffn_query.norm.scale, layer.ffn.norm.scale)):
      np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))
  assert [layer.cross_attention is not None for layer in model.layers] == [
      True, False, True, False, True, False]


def test_first_n_layers_of_a_checkpoint(tmp_path):
  """A bert-base-style folder ('bert.' prefix, MLM head) with more layers than wanted:
  the first N are taken, in order, and the MLM transform initialises our LM head."""
  try:
    src = resources.minilm_dir()
  except resources.MissingResourceError as e:
    pytest.skip(str(e))
  (tmp_path / "config.json").write_text((src / "config.json").read_text())
  w = bert_loading.read_safetensors(src)
  from safetensors.numpy import save_file
  rng = np.random.default_rng(0)
  h, v = w["embeddings.word_embeddings.weight"].shape[::-1]
  mlm = {"cls.predictions.transform.dense.weight": rng.normal(size=(h, h)),
         "cls.predictions.transform.dense.bias": rng.normal(size=(h,)),
         "cls.predictions.transform.LayerNorm.weight": rng.normal(size=(h,)),
         "cls.predictions.transform.LayerNorm.bias": rng.normal(size=(h,)),
         "cls.predictions.bias": rng.normal(size=(v,))}
  mlm = {k: x.astype(np.float32) for k, x in mlm.items()}
  save_file({**{"bert." + k: x for k, x in w.items()}, **mlm},
            str(tmp_path / "model.safetensors"))
  model, info = bert_loading.qformer_from_bert_dir(
      tmp_path, rngs=nnx.Rngs(0), num_layers=2, num_query_tokens=2, cf_dim=8)
  assert info == {"layers_used": 2, "checkpoint_layers": 6, "lm_head": True}
  assert len(model.layers) == 2
  np.testing.assert_array_equal(np.asarray(model.lm_head.transform.kernel[...]),
                                mlm["cls.predictions.transform.dense.weight"].T)
  np.testing.assert_array_equal(np.asarray(model.lm_head.norm.scale[...]),
                                mlm["cls.predictions.transform.LayerNorm.weight"])
  bias = np.asarray(model.lm_head.bias[...])
  np.testing.assert_array_equal(bias[:v], mlm["cls.predictions.bias"])
  assert bias[v:].tolist() == [0.0]  # the [DEC] logit bias
  np.testing.assert_array_equal(
      np.asarray(model.layers[1].self_attention.query.kernel[...]),
      w["encoder.layer.1.attention.self.query.weight"].T)
  with pytest.raises(bert_loading.WeightLoadError, match="7"):
    bert_loading.qformer_from_bert_dir(tmp_path, rngs=nnx.Rngs(0), num_layers=7, cf_dim=8)


def test_loaded_query_ffn_is_an_own_buffer_copy():
  """After loading, each query FFN equals its text FFN but owns its buffers: training
  donates the state, and a buffer donated twice is an XLA error on GPU/TPU (and on CPU
  from jax 0.11), which is how ILM-rand from a MiniLM init once failed."""
  try:
    src = resources.minilm_dir()
  except resources.MissingResourceError as e:
    pytest.skip(str(e))
  model, _ = bert_loading.qformer_from_bert_dir(src, rngs=nnx.Rngs(0), num_layers=2, cf_dim=8)
  for layer in model.layers:
    text, query = (jax.tree.leaves(nnx.state(f)) for f in (layer.ffn, layer.ffn_query))
    for a, b in zip(text, query, strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(nnx.state(model))]
  assert len(set(pointers)) == len(pointers)
