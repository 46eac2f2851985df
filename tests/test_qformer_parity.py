"""Our Q-Former against the transformers BLIP-2 reference (``reference/qformer``).

Every shape, id and size comes from the fixture files, so any folder with the same layout
works (ILM_REFERENCE_DIR).
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ilm_jax import losses
from ilm_jax.models import bert_loading, qformer


@pytest.fixture(scope="module")
def ref(reference_dir):
  d = reference_dir / "qformer"
  if not d.is_dir():
    pytest.skip(f"{d} not found")
  tol = _tolerance(reference_dir, "qformer", {"rtol": 1e-5, "atol": 5e-5})
  cfg = qformer.QFormerConfig.from_blip2_json(d / "config.json")
  model = qformer.QFormer(cfg, rngs=nnx.Rngs(0))
  bert_loading.load_blip2_qformer(
      model, bert_loading.read_safetensors(d / "weights.safetensors"), str(d))
  io = dict(np.load(d / "io.npz"))
  return model, io, tol


def _tolerance(reference_dir, model: str, default: dict) -> dict:
  """The (single) float tolerance tolerance.json gives for ``model``, else ``default``."""
  f = reference_dir / "tolerance.json"
  if not f.exists():
    return default
  entries = json.loads(f.read_text()).get(model, {})
  for v in entries.values():
    if isinstance(v, dict) and {"rtol", "atol"} <= v.keys():
      return {"rtol": float(v["rtol"]), "atol": float(v["atol"])}
  return default


def _check(actual, expected, tol, what):
  np.testing.assert_allclose(np.asarray(actual), expected, err_msg=what, **tol)


def _text(io):
  return jnp.asarray(io["input_ids"]), jnp.asarray(io["attention_mask"]).astype(bool)


def _mem_keys(io):
  return sorted(k[len("encoder_hidden_states_"):] for k in io
                if k.startswith("encoder_hidden_states_"))


def test_config_from_files(ref):
  model, io, _ = ref
  assert model.cfg.num_query_tokens == io["query_tokens"].shape[1]
  np.testing.assert_array_equal(np.asarray(model.query_tokens[...]), io["query_tokens"][0])


def test_text_pass(ref):
  model, io, tol = ref
  ids, valid = _text(io)
  np.testing.assert_array_equal(
      np.asarray(model.embeddings(ids)), io["text_embeddings_out"])  # a gather + add: exact
  h, states = model.text_pass(ids, valid, return_hidden_states=True)
  _check(h, io["text_last_hidden"], tol, "text_last_hidden")
  _check(h[:, 0], io["text_cls"], tol, "text_cls")
  _check(np.stack(states), io["text_layer_outputs"], tol, "text_layer_outputs")


@pytest.mark.parametrize("mem", ["m1", "m3"])
def test_query_joint_itc_itm(ref, mem):
  model, io, tol = ref
  if f"encoder_hidden_states_{mem}" not in io:
    pytest.skip(f"no {mem} arrays in this fixture set")
  ids, valid = _text(io)
  memory = jnp.asarray(io[f"encoder_hidden_states_{mem}"])
  mem_valid = jnp.asarray(io[f"encoder_attention_mask_{mem}"]).astype(bool)
  k = model.cfg.num_query_tokens

  q, qs = model.query_pass(memory, mem_valid, return_hidden_states=True)
  _check(q, io[f"{mem}_query_last_hidden"], tol, f"{mem}_query_last_hidden")
  _check(np.stack(qs), io[f"{mem}_query_layer_outputs"], tol, f"{mem}_query_layer_outputs")

  assert io["itm_attention_mask"].shape[1] == k + ids.shape[1]
  c, cs = model.joint_pass(memory, ids, valid, mem_valid, return_hidden_states=True)
  _check(c, io[f"{mem}_itm_last_hidden"], tol, f"{mem}_itm_last_hidden")
  _check(np.stack(cs), io[f"{mem}_itm_layer_outputs"], tol, f"{mem}_itm_layer_outputs")
  _check(model.itm_head(c[:, :k]), io[f"{mem}_itm_logits_per_query"], tol, "itm per query")
  _check(model.itm_logits_from_memory(memory, ids, valid, mem_valid), io[f"{mem}_itm_logits"],
         tol, f"{mem}_itm_logits")

  item = qformer.l2_normalize(model.item_proj(q))
  text = qformer.l2_normalize(model.text_proj(model.text_pass(ids, valid)[:, 0]))
  _check(item, io[f"{mem}_itc_image_embeds"], tol, f"{mem}_itc_image_embeds")
  _check(text, io["itc_text_embeds"], tol, "itc_text_embeds")
  _check(losses.itc_sim_per_query(item, text), io[f"{mem}_itc_sim_per_query"], tol, "sim/q")
  sim = losses.itc_logits(item, text, 1.0)  # the reference applies no temperature
  _check(sim, io[f"{mem}_itc_logits_per_image"], tol, "itc_logits_per_image")
  _check(sim.T, io[f"{mem}_itc_logits_per_text"], tol, "itc_logits_per_text")


def test_padded_memory(ref):
  model, io, tol = ref
  if "encoder_attention_mask_m3pad" not in io:
    pytest.skip("no padded-memory arrays in this fixture set")
  memory = jnp.asarray(io["encoder_hidden_states_m3"])
  mem_valid = jnp.asarray(io["encoder_attention_mask_m3pad"]).astype(bool)
  assert not mem_valid.all(), "the padded mask should pad something"
  _check(model.query_pass(memory, mem_valid), io["m3pad_query_last_hidden"], tol,
         "m3pad_query_last_hidden")


def test_loader_rejects_mismatched_config(ref, reference_dir):
  model, _, _ = ref
  cfg = model.cfg
  wrong = qformer.QFormerConfig(**{**cfg.__dict__, "intermediate_size": cfg.intermediate_size + 2})
  w = bert_loading.read_safetensors(reference_dir / "qformer" / "weights.safetensors")
  with pytest.raises(bert_loading.WeightLoadError, match="intermediate"):
    bert_loading.load_blip2_qformer(qformer.QFormer(wrong, rngs=nnx.Rngs(0)), w)
