"""SmolLM2 parity against the golden reference (``$ILM_REFERENCE_DIR/smollm2``).

Every id, prompt, length and tolerance is read from the fixture files, so any folder
with the same layout works. The model is loaded once per session (the converted-weight
cache makes later sessions faster).
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ilm_jax import generation, llm_tokenizer, resources
from ilm_jax.models import llm_loading


@pytest.fixture(scope="session")
def ref(reference_dir):
  d = reference_dir / "smollm2"
  if not d.is_dir():
    pytest.skip(f"{d} not found")
  return d


@pytest.fixture(scope="session")
def gguf_path():
  try:
    return resources.smollm2_gguf()
  except resources.MissingResourceError as e:
    pytest.skip(str(e))


@pytest.fixture(scope="session")
def tokenizer(gguf_path):
  return llm_tokenizer.LlmTokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="session")
def loaded(gguf_path):
  """(config, HF-style state dict, model)."""
  config, sd = llm_loading.load_gguf_state_dict(gguf_path)
  model = llm_loading.build_model(config, llm_loading.hf_to_params(sd, config), str(gguf_path))
  return config, sd, model


@pytest.fixture(scope="session")
def tolerance(reference_dir):
  tol = json.loads((reference_dir / "tolerance.json").read_text())["smollm2"]
  return {k.split(":", 1)[1]: v for k, v in tol.items() if isinstance(v, dict)}


def _tol(tolerance, key):
  return dict(rtol=tolerance[key]["rtol"], atol=tolerance[key]["atol"])


@pytest.fixture(scope="session")
def forward(loaded):
  graphdef, state = nnx.split(loaded[2])

  @jax.jit
  def fwd(state, tokens, mask):
    logits, hidden, _ = nnx.merge(graphdef, state)(tokens=tokens, mask=mask)
    return logits, hidden

  return lambda tokens, mask: fwd(state, jnp.asarray(tokens), jnp.asarray(mask))


# ------------------------------------------------------------------ tokenizer


def test_tokenizer_strings(ref, tokenizer):
  data = json.loads((ref / "tokens.json").read_text())
  assert data["strings"]
  for s in data["strings"]:
    ids = tokenizer.encode(s["text"])
    assert ids == s["input_ids"], s["text"]
    assert [tokenizer.id_to_token(i) for i in ids] == s["tokens"], s["text"]
    assert tokenizer.decode(ids) == s["decoded"], s["text"]


def test_tokenizer_specials(ref, tokenizer, loaded):
  data = json.loads((ref / "tokens.json").read_text())
  assert tokenizer.chat_template == data["chat_template"]
  for key, name in data["special_tokens"].items():
    if key.endswith("_id"):
      continue
    assert tokenizer.tokenizer.token_to_id(name) == data["special_tokens"][key + "_id"], key
  for i, name in data["added_tokens"].items():
    assert tokenizer.id_to_token(int(i)) == name
    assert tokenizer.encode(name) == [int(i)]  # matched literally, never split by BPE
  assert tokenizer.vocab_size == data["backend"]["vocab_size"]
  assert tokenizer.eos_id == data["special_tokens"]["eos_token_id"]
  assert data["special_tokens"]["eos_token_id"] in loaded[0].eos_ids


def test_chat_template(ref, tokenizer):
  data = json.loads((ref / "tokens.json").read_text())
  greedy = json.loads((ref / "greedy.json").read_text())["conversations"]
  chats = [(c["messages"], c.get("add_generation_prompt", True), c["rendered"], c["input_ids"])
           for c in data["chats"]]
  chats += [(c["messages"], True, c["rendered_prompt"], c["prompt_ids"]) for c in greedy]
  assert chats
  for messages, gen_prompt, rendered, ids in chats:
    assert tokenizer.apply_chat_template(messages, gen_prompt) == rendered
    assert tokenizer.encode_chat(messages, gen_prompt) == ids


# ------------------------------------------------------------------ weights


def test_config(ref, loaded):
  c = loaded[0]
  cfg = json.loads((ref / "config.json").read_text())
  assert (c.layers, c.dim, c.ffn, c.heads, c.kv_heads, c.head_dim, c.vocab) == (
      cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"],
      cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"])
  assert c.rope_theta == cfg["rope_parameters"]["rope_theta"]
  assert np.float32(c.norm_eps) == np.float32(cfg["rms_norm_eps"])
  assert c.tie == cfg["tie_word_embeddings"] and c.qkv_bias == cfg["attention_bias"]
  assert c.bos_id == cfg["bos_token_id"] and c.pad_id == cfg["pad_token_id"]


def test_weight_checksums(ref, loaded):
  _, sd, _ = loaded
  data = json.loads((ref / "weights_checksums.json").read_text())
  tied = data["lm_head_tied_to_embed_tokens"]
  assert len([t for t in data["tensors"] if t["gguf_name"]]) == data["gguf_tensor_count"]
  for t in data["tensors"]:
    name = t["hf_name"]
    if name == "lm_head.weight" and tied:
      name = "model.embed_tokens.weight"
    w = sd[name].astype(np.float64)
    assert list(w.shape) == t["shape"], name
    np.testing.assert_allclose(w.ravel()[:8], t["first8_flat"], rtol=0, atol=0, err_msg=name)
    for key, fn in (("sum", np.sum), ("abs_sum", lambda x: np.abs(x).sum()),
                    ("sq_sum", lambda x: (x * x).sum())):
      np.testing.assert_allclose(fn(w), t[key], rtol=1e-9, atol=1e-6, err_msg=f"{name} {key}")


def test_weight_probes(ref, loaded):
  """Probes against the model's own parameters (after the layout change)."""
  c, _, model = loaded
  p = np.load(ref / "weight_probes.npz")
  blk = model.blocks[int(p["probe_layer"])]
  d = c.dim
  to_hf = lambda kernel: np.asarray(kernel[...]).reshape(d, -1).T  # noqa: E731  [out, in]
  np.testing.assert_array_equal(np.asarray(model.embedding[...])[p["embed_tokens_rows"]],
                                p["embed_tokens_sel"])
  for key, kernel in (("q_proj", blk.attn.q_kernel), ("k_proj", blk.attn.k_kernel),
                      ("v_proj", blk.attn.v_kernel), ("gate_proj", blk.mlp.gate_kernel),
                      ("up_proj", blk.mlp.up_kernel)):
    (probe_key,) = [k for k in p.files if k.startswith(key + "_rows0_")]
    n = int(probe_key.rsplit("_", 1)[1])
    np.testing.assert_array_equal(to_hf(kernel)[:n], p[probe_key], err_msg=key)
  (o_key,) = [k for k in p.files if k.startswith("o_proj_rows0_")]
  o_hf = np.asarray(blk.attn.o_kernel[...]).reshape(-1, d).T
  np.testing.assert_array_equal(o_hf[:p[o_key].shape[0]], p[o_key])
  (dn_key,) = [k for k in p.files if k.startswith("down_proj_rows0_")]
  down_hf = np.asarray(blk.mlp.down_kernel[...]).T
  np.testing.assert_array_equal(down_hf[:p[dn_key].shape[0]], p[dn_key])
  np.testing.assert_array_equal(np.asarray(blk.attn_norm.weight[...]), p["input_layernorm"])
  np.testing.assert_array_equal(np.asarray(blk.mlp_norm.weight[...]),
                                p["post_attention_layernorm"])
  np.testing.assert_array_equal(np.asarray(model.final_norm.weight[...]), p["final_norm"])


# ------------------------------------------------------------------ forward


def _prompts(ref):
  z = np.load(ref / "logits.npz")
  idx = sorted(int(m.group(1)) for k in z.files if (m := re.fullmatch(r"p(\d+)_input_ids", k)))
  assert idx
  return z, idx


def _check_top10(logits, ref_ids, ref_values, tol):
  """argmax exact; other ranks exact unless neighbouring reference values are near-ties."""
  ours = np.argsort(-logits, axis=-1, kind="stable")[:, :ref_ids.shape[1]]
  np.testing.assert_array_equal(ours[:, 0], ref_ids[:, 0])
  gaps = np.abs(np.diff(ref_values, axis=1)) < 1e-3
  near = np.zeros_like(gaps[:, :1]).repeat(ref_ids.shape[1], 1)
  near[:, 1:] |= gaps
  near[:, :-1] |= gaps
  bad = (ours != ref_ids) & ~near
  assert not bad.any(), f"top-10 ids differ at (pos, rank) {np.argwhere(bad)[:5].tolist()}"
  np.testing.assert_allclose(np.take_along_axis(logits, ref_ids, axis=1), ref_values, **tol)


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_padded_batch(ref, forward, tolerance, side):
  """All prompts in one padded batch: logits, top-10 and final hidden match per prompt."""
  z, idx = _prompts(ref)
  prompts = [z[f"p{i}_input_ids"].tolist() for i in idx]
  tokens, mask = generation.pad_prompts(prompts, pad_id=0, side=side)
  logits, hidden = map(np.asarray, forward(tokens, mask))
  for row, i in enumerate(idx):
    sel = np.nonzero(mask[row])[0]
    lg, h = logits[row, sel], hidden[row, sel]
    np.testing.assert_allclose(h, z[f"p{i}_final_hidden"], **_tol(tolerance, "p*_final_hidden"))
    np.testing.assert_allclose(lg[z[f"p{i}_last4_positions"]], z[f"p{i}_logits_last4"],
                               **_tol(tolerance, "p*_logits_last4"))
    _check_top10(lg, z[f"p{i}_top10_ids"], z[f"p{i}_top10_values"],
                 _tol(tolerance, "p*_top10_values"))


def test_greedy_generation(ref, loaded, tokenizer):
  """Both conversations in one left-padded batch reproduce the reference token for token."""
  convs = json.loads((ref / "greedy.json").read_text())["conversations"]
  model = loaded[2]
  n = max(c["num_new_tokens_requested"] for c in convs)
  tokens, mask = generation.pad_prompts([c["prompt_ids"] for c in convs], tokenizer.pad_id)
  out = generation.generate(model, tokens=tokens, mask=mask, max_new_tokens=n,
                            stop_ids=(tokenizer.eos_id,))
  for row, c in enumerate(convs):
    length = int(out.lengths[row])
    got = np.asarray(out.tokens[row, :length]).tolist()
    want = c["generated_ids"][:c["num_new_tokens_requested"]]
    assert got[:len(want)] == want, c["name"]
    assert bool(out.stopped[row]) == c["stopped_on_eos"]
    assert tokenizer.decode(got, skip_special_tokens=True) == c["text"]
