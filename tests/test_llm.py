"""Decoder and loader contracts on tiny models (no reference files needed).

* HF folder written here (2 safetensors shards + index + tokenizer.json) loads, and its
  forward equals an independent numpy Llama; missing / extra tensors fail loudly.
* A tiny GGUF written here (F32/F16/Q8_0, llama.cpp q/k permutation) loads to the same
  weights; the converted-weight cache is used; bad inputs name the tensor.
* Padding, KV cache, soft-token splicing and packed segments agree with plain forwards.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ilm_jax import llm_tokenizer
from ilm_jax.models import llm, llm_loading

ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def _hf_config(tie=False, bias=True, arch="LlamaForCausalLM"):
  return {"architectures": [arch], "model_type": "llama", "vocab_size": 64, "hidden_size": 32,
          "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 8, "rope_theta": 500.0,
          "rope_scaling": ROPE_SCALING, "rms_norm_eps": 1e-5, "tie_word_embeddings": tie,
          "attention_bias": bias, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
          "max_position_embeddings": 128}


def _hf_tensors(cfg, seed=0):
  rng = np.random.default_rng(seed)
  d, f, h, kv, hd = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                     cfg["num_key_value_heads"], cfg["head_dim"])
  w = lambda *s: (rng.standard_normal(s) / math.sqrt(s[-1])).astype(np.float32)  # noqa: E731
  sd = {"model.embed_tokens.weight": w(cfg["vocab_size"], d),
        "model.norm.weight": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)}
  if not cfg["tie_word_embeddings"]:
    sd["lm_head.weight"] = w(cfg["vocab_size"], d)
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    sd.update({
        p + "input_layernorm.weight": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32),
        p + "post_attention_layernorm.weight": (1 + 0.1 * rng.standard_normal(d)).astype(
            np.float32),
        p + "self_attn.q_proj.weight": w(h * hd, d), p + "self_attn.k_proj.weight": w(kv * hd, d),
        p + "self_attn.v_proj.weight": w(kv * hd, d), p + "self_attn.o_proj.weight": w(d, h * hd),
        p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
        p + "mlp.down_proj.weight": w(d, f)})
    if cfg["attention_bias"]:
      sd[p + "self_attn.q_proj.bias"] = w(h * hd, 1)[:, 0]
      sd[p + "self_attn.k_proj.bias"] = w(kv * hd, 1)[:, 0]
      sd[p + "self_attn.v_proj.bias"] = w(kv * hd, 1)[:, 0]
  return sd


def _write_tokenizer(folder):
  from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415

  words = ["<unk>", "<s>", "</s>", "hello", "world", "item", "_", "1", "2"]
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps({
      "bos_token": "<s>", "eos_token": "</s>",
      "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                       "{% if add_generation_prompt %}assistant:{% endif %}"}))


def _write_hf(folder, cfg, sd):
  from safetensors.numpy import save_file  # noqa: PLC0415

  folder.mkdir(parents=True, exist_ok=True)
  (folder / "config.json").write_text(json.dumps(cfg))
  names = sorted(sd)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  weight_map = {}
  for shard, keys in shards.items():
    save_file({k: sd[k] for k in keys}, str(folder / shard))
    weight_map.update({k: shard for k in keys})
  (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  _write_tokenizer(folder)


# ------------------------------------------------------------------ numpy reference


def _np_inv_freq(cfg):
  """transformers' default + llama3 rope frequencies, written out independently."""
  hd = cfg["head_dim"]
  inv = 1.0 / cfg["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
  s = cfg.get("rope_scaling")
  if not s:
    return inv
  out = []
  for f in inv:
    wavelen = 2 * math.pi / f
    low_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
    if wavelen < high_wl:
      out.append(f)
    elif wavelen > low_wl:
      out.append(f / s["factor"])
    else:
      smooth = ((s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"])
                / (s["high_freq_factor"] - s["low_freq_factor"]))
      out.append((1 - smooth) * f / s["factor"] + smooth * f)
  return np.array(out)


def _np_llama(sd, cfg, ids):
  """float64 logits [T, V] of one unpadded sequence (no cache, plain loops)."""
  h, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
  g = {k: v.astype(np.float64) for k, v in sd.items()}
  eps = cfg["rms_norm_eps"]
  rms = lambda x, w: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w  # noqa: E731
  t = len(ids)
  ang = np.arange(t)[:, None] * _np_inv_freq(cfg)[None]
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

  def rope(x):  # [T, N, hd]
    rot = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
    return x * cos[:, None] + rot * sin[:, None]

  x = g["model.embed_tokens.weight"][ids]
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    n = rms(x, g[p + "input_layernorm.weight"])
    proj = lambda name, n=n, p=p: n @ g[p + f"self_attn.{name}.weight"].T + g.get(  # noqa: E731
        p + f"self_attn.{name}.bias", 0.0)
    q = rope(proj("q_proj").reshape(t, h, hd))
    k = rope(proj("k_proj").reshape(t, kv, hd))
    v = proj("v_proj").reshape(t, kv, hd)
    out = np.zeros((t, h, hd))
    for head in range(h):
      kh = head // (h // kv)
      s = q[:, head] @ k[:, kh].T / math.sqrt(hd)
      s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
      a = np.exp(s - s.max(-1, keepdims=True))
      out[:, head] = (a / a.sum(-1, keepdims=True)) @ v[:, kh]
    x = x + out.reshape(t, h * hd) @ g[p + "self_attn.o_proj.weight"].T
    n2 = rms(x, g[p + "post_attention_layernorm.weight"])
    gate = n2 @ g[p + "mlp.gate_proj.weight"].T
    x = x + ((gate / (1 + np.exp(-gate))) * (n2 @ g[p + "mlp.up_proj.weight"].T)) @ g[
        p + "mlp.down_proj.weight"].T
    del n
  final = rms(x, g["model.norm.weight"])
  head = g.get("lm_head.weight", g["model.embed_tokens.weight"])
  return final @ head.T


# ------------------------------------------------------------------ HF loader


@pytest.mark.parametrize("tie,bias", [(False, True), (True, False)])
def test_hf_folder_loads_every_tensor(tmp_path, tie, bias):
  cfg = _hf_config(tie=tie, bias=bias)
  sd = _hf_tensors(cfg)
  _write_hf(tmp_path / "m", cfg, sd)
  model, tok = llm_loading.load(tmp_path / "m")
  assert model.config.rope_scaling is not None and model.config.qkv_bias == bias
  # Every written tensor is the model's parameter (in the model's layout).
  params = llm_loading.hf_to_params(sd, model.config)
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert set(flat) == set(params)
  for path, value in params.items():
    np.testing.assert_array_equal(np.asarray(flat[path][...]), value, err_msg=str(path))
  ids = [3, 5, 6, 7, 8, 4, 60, 1, 2, 33]
  logits, _, _ = _fwd(model, tokens=jnp.asarray([ids]))
  np.testing.assert_allclose(np.asarray(logits[0]), _np_llama(sd, cfg, ids), rtol=1e-4, atol=1e-4)
  assert tok.encode("hello world item _ 1") == [3, 4, 5, 6, 7]
  assert tok.eos_id == 2 and tok.bos_id == 1
  assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "user: hi\nassistant:"


def test_hf_folder_errors(tmp_path):
  cfg = _hf_config()
  sd = _hf_tensors(cfg)
  missing = dict(sd)
  del missing["model.layers.1.mlp.up_proj.weight"]
  _write_hf(tmp_path / "missing", cfg, missing)
  with pytest.raises(llm_loading.LoadError, match=r"missing tensors \(1\).*layers\.1\.mlp\.up_proj"):
    llm_loading.load_hf(tmp_path / "missing")
  extra = dict(sd, **{"model.layers.0.self_attn.extra.weight": np.zeros(3, np.float32)})
  _write_hf(tmp_path / "extra", cfg, extra)
  with pytest.raises(llm_loading.LoadError, match=r"unexpected tensors \(1\).*self_attn\.extra"):
    llm_loading.load_hf(tmp_path / "extra")
  (tmp_path / "extra" / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(llm_loading.LoadError, match="model-00002-of-00002.safetensors"):
    llm_loading.load_hf(tmp_path / "extra")
  _write_hf(tmp_path / "gpt2", _hf_config(arch="GPT2LMHeadModel"), sd)
  with pytest.raises(llm_loading.LoadError, match="GPT2LMHeadModel"):
    llm_loading.load_hf(tmp_path / "gpt2")
  with pytest.raises(llm_loading.LoadError, match="config.json"):
    llm_loading.load_hf(tmp_path / "nowhere")
  bad = dict(sd)
  bad["model.norm.weight"] = np.ones(7, np.float32)
  with pytest.raises(llm_loading.LoadError, match="final_norm.weight has shape"):
    llm_loading.build_model(llm_loading.config_from_hf(cfg), llm_loading.hf_to_params(
        bad, llm_loading.config_from_hf(cfg)))


# ------------------------------------------------------------------ GGUF loader


def _permute(w, n_head):
  """llama.cpp's convert_hf_to_gguf permutation (the inverse of unpermute_qk)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def _write_gguf(path, cfg, sd, emb_type, extra_tensor=None, arch="llama"):
  import gguf  # noqa: PLC0415
  from gguf import quants  # noqa: PLC0415
  from tokenizers import pre_tokenizers  # noqa: PLC0415

  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg["num_hidden_layers"])
  w.add_context_length(128)
  w.add_embedding_length(cfg["hidden_size"])
  w.add_feed_forward_length(cfg["intermediate_size"])
  w.add_head_count(cfg["num_attention_heads"])
  w.add_head_count_kv(cfg["num_key_value_heads"])
  w.add_rope_freq_base(cfg["rope_theta"])
  w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
  specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  tokens = specials + alphabet + ["Ġt", "he"]
  tokens += [f"<unused{i}>" for i in range(cfg["vocab_size"] - len(tokens))]
  w.add_tokenizer_model("gpt2")
  w.add_token_list(tokens)
  w.add_token_types([3] * 3 + [1] * (len(tokens) - 3))
  w.add_token_merges(["Ġ t", "h e"])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>"
                      "{% endfor %}")
  names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}
  inv = {v: k for k, v in llm_loading._GGUF_BLOCK.items()}
  for name, value in sd.items():
    if name.startswith("model.layers."):
      _, _, i, rest = name.split(".", 3)
      gname = f"blk.{i}.{inv[rest]}"
      if ".attn_q." in gname:
        value = _permute(value, cfg["num_attention_heads"])
      elif ".attn_k." in gname:
        value = _permute(value, cfg["num_key_value_heads"])
    else:
      gname = names[name]
    if gname == "token_embd.weight" and emb_type != "F32":
      qtype = gguf.GGMLQuantizationType[emb_type]
      w.add_tensor(gname, quants.quantize(value, qtype), raw_dtype=qtype)
    elif value.ndim == 2 and gname.endswith("ffn_up.weight"):
      w.add_tensor(gname, value.astype(np.float16))
    else:
      w.add_tensor(gname, value)
  if extra_tensor is not None:
    w.add_tensor(*extra_tensor)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def _expected_gguf_weights(sd, emb_type):
  import gguf  # noqa: PLC0415
  from gguf import quants  # noqa: PLC0415

  out = dict(sd)
  if emb_type != "F32":
    qtype = gguf.GGMLQuantizationType[emb_type]
    e = sd["model.embed_tokens.weight"]
    out["model.embed_tokens.weight"] = quants.dequantize(quants.quantize(e, qtype), qtype)
  for k in out:
    if k.endswith("up_proj.weight"):
      out[k] = out[k].astype(np.float16).astype(np.float32)
  return out


@pytest.mark.parametrize("emb_type", ["Q8_0", "Q4_1"])
def test_gguf_roundtrip_and_cache(tmp_path, monkeypatch, emb_type):
  monkeypatch.setenv("ILM_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.setattr(llm_tokenizer, "_CACHE_MIN_BYTES", 0)
  cfg = _hf_config(tie=False, bias=False)
  cfg["rope_scaling"], cfg["vocab_size"] = None, 264  # 256 bytes + specials + merges
  sd = _hf_tensors(cfg)
  path = tmp_path / "tiny.gguf"
  _write_gguf(path, cfg, sd, emb_type)
  config, got = llm_loading.load_gguf_state_dict(path)
  assert (config.layers, config.heads, config.kv_heads, config.head_dim, config.tie) == (2, 4, 2,
                                                                                       8, False)
  assert config.rope_theta == cfg["rope_theta"] and config.eos_ids == (2,)
  want = _expected_gguf_weights(sd, emb_type)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
  # Second load comes from the cache: dequantising again would fail.
  monkeypatch.setattr(llm_loading, "gguf_state_dict", lambda *a, **k: 1 / 0)
  model = llm_loading.load_gguf(path)
  ids = [3, 9, 1, 2, 40]
  logits, _, _ = _fwd(model, tokens=jnp.asarray([ids]))
  np.testing.assert_allclose(np.asarray(logits[0]), _np_llama(want, cfg, ids), rtol=1e-4,
                             atol=1e-4)
  tok = llm_tokenizer.LlmTokenizer.from_gguf(path)
  assert tok.encode("<|im_start|>the") == [1, tok.tokenizer.token_to_id("t"),
                                           tok.tokenizer.token_to_id("he")]
  assert tok.encode_chat([{"role": "user", "content": "t"}], False)[0] == 1
  assert tok.decode(tok.encode(" the cat")) == " the cat"
  # The tokenizer was cached as JSON; the cached copy behaves the same.
  assert len(list((tmp_path / "cache").glob("*.tokenizer.*.json"))) == 1
  again = llm_tokenizer.LlmTokenizer.from_gguf(path)
  text = "<|im_start|>the t<|im_end|>"
  assert again.encode(text) == tok.encode(text) and again.stop_ids == tok.stop_ids
  assert again.chat_template == tok.chat_template


def test_gguf_errors(tmp_path, monkeypatch):
  monkeypatch.setenv("ILM_CACHE_DIR", str(tmp_path / "cache"))
  cfg = _hf_config(tie=True, bias=False)
  cfg["rope_scaling"], cfg["vocab_size"] = None, 264
  sd = _hf_tensors(cfg)
  _write_gguf(tmp_path / "i8.gguf", cfg, sd, "F32",
              extra_tensor=("blk.0.attn_v.bias", np.zeros(16, np.int8)))
  with pytest.raises(llm_loading.LoadError, match=r"blk\.0\.attn_v\.bias.*I8"):
    llm_loading.load_gguf(tmp_path / "i8.gguf")
  _write_gguf(tmp_path / "extra.gguf", cfg, sd, "F32",
              extra_tensor=("blk.0.mystery.weight", np.zeros(4, np.float32)))
  with pytest.raises(llm_loading.LoadError, match=r"blk\.0\.mystery\.weight"):
    llm_loading.load_gguf(tmp_path / "extra.gguf")
  _write_gguf(tmp_path / "arch.gguf", cfg, sd, "F32", arch="gpt2")
  with pytest.raises(llm_loading.LoadError, match="'gpt2' is not supported"):
    llm_loading.load_gguf(tmp_path / "arch.gguf")
  with pytest.raises(llm_loading.LoadError, match="does not exist"):
    llm_loading.load_gguf(tmp_path / "absent.gguf")


def test_unpermute_inverts_llama_cpp_permutation():
  w = np.arange(8 * 2 * 3).reshape(16, 3)
  p = _permute(w, 2)
  assert not np.array_equal(p, w)
  np.testing.assert_array_equal(llm_loading.unpermute_qk(p, 2), w)


# ------------------------------------------------------------------ decoder contracts


@pytest.fixture(scope="module")
def tiny():
  config = llm.LlmConfig.tiny(rope_scaling=ROPE_SCALING)
  return llm.Llm(config, rngs=nnx.Rngs(0))


@nnx.jit
def _fwd(model, **kw):
  # One compilation per shape instead of op-by-op dispatch (much faster on CPU).
  return model(**kw)


def test_rope_llama3_scaling_matches_numpy():
  cfg = {"head_dim": 16, "rope_theta": 500.0, "rope_scaling": ROPE_SCALING}
  c = llm.LlmConfig.tiny(head_dim=16, rope_theta=500.0, rope_scaling=ROPE_SCALING)
  np.testing.assert_allclose(np.asarray(llm.rope_inv_freq(c)), _np_inv_freq(cfg), rtol=1e-6)
  assert hash(c) == hash(llm.LlmConfig.tiny(head_dim=16, rope_theta=500.0,
                                            rope_scaling=dict(ROPE_SCALING)))


def test_padding_left_and_right_match_unpadded(tiny):
  seqs = [[5, 6, 7, 8, 9], [10, 11, 12]]
  ref = [np.asarray(_fwd(tiny, tokens=jnp.asarray([s]))[0][0]) for s in seqs]
  for side in ("left", "right"):
    t = 7
    tokens = np.zeros((2, t), np.int32)
    mask = np.zeros((2, t), bool)
    for i, s in enumerate(seqs):
      sl = slice(t - len(s), t) if side == "left" else slice(0, len(s))
      tokens[i, sl], mask[i, sl] = s, True
    logits, hidden, _ = _fwd(tiny, tokens=jnp.asarray(tokens), mask=jnp.asarray(mask))
    assert np.all(np.isfinite(np.asarray(hidden)))
    for i in range(2):
      np.testing.assert_allclose(np.asarray(logits[i])[mask[i]], ref[i], rtol=1e-5, atol=1e-5)


def test_kv_cache_decode_matches_full_forward(tiny):
  ids = jnp.asarray([[3, 4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18]])
  full, _, _ = _fwd(tiny, tokens=ids)
  cache = tiny.init_cache(2, 12)
  out, _, cache = _fwd(tiny, tokens=ids[:, :5], cache=cache)
  steps = [out]
  for t in range(5, 8):
    o, _, cache = _fwd(tiny, tokens=ids[:, t:t + 1], cache=cache)
    steps.append(o)
  np.testing.assert_allclose(np.concatenate(steps, 1), np.asarray(full), rtol=1e-5, atol=1e-5)
  assert int(cache.index) == 8 and np.asarray(cache.valid).sum() == 16


def test_splice_embeddings_and_input_embeds(tiny):
  tokens = jnp.asarray([[3, 4, 5, 6], [7, 8, 9, 10]])
  soft = jax.random.normal(jax.random.key(1), (2, 2, tiny.config.dim))
  pos = jnp.asarray([[1, 3], [0, -1]])
  spliced = llm.splice_embeddings(tiny.embed(tokens), soft, pos)
  manual = np.asarray(tiny.embed(tokens)).copy()
  manual[0, 1], manual[0, 3], manual[1, 0] = soft[0, 0], soft[0, 1], soft[1, 0]
  np.testing.assert_array_equal(np.asarray(spliced), manual)
  a, ha, _ = _fwd(tiny, input_embeds=spliced)
  b, hb, _ = _fwd(tiny, input_embeds=jnp.asarray(manual))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Without soft tokens, input_embeds=embed(tokens) is the token path.
  c, _, _ = _fwd(tiny, tokens=tokens)
  d, _, _ = _fwd(tiny, input_embeds=tiny.embed(tokens))
  np.testing.assert_allclose(np.asarray(c), np.asarray(d), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(tiny.logits(ha)), np.asarray(a), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="exactly one"):
    tiny(tokens=tokens, input_embeds=spliced)


def test_packed_segments_match_separate(tiny):
  a, b = [3, 4, 5], [6, 7, 8, 9]
  packed = jnp.asarray([a + b])
  seg = jnp.asarray([[0] * 3 + [1] * 4])
  pos = jnp.asarray([[0, 1, 2, 0, 1, 2, 3]])
  out, _, _ = _fwd(tiny, tokens=packed, segment_ids=seg, positions=pos)
  ra, _, _ = _fwd(tiny, tokens=jnp.asarray([a]))
  rb, _, _ = _fwd(tiny, tokens=jnp.asarray([b]))
  np.testing.assert_allclose(np.asarray(out[0]), np.concatenate([ra[0], rb[0]]), rtol=1e-5,
                             atol=1e-5)


def test_bfloat16_compute_close_to_float32(tiny):
  graphdef, state = nnx.split(tiny)
  bf = nnx.merge(graphdef, state)
  bf16 = llm.Llm(tiny.config.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
  nnx.update(bf16, nnx.state(bf))
  ids = jnp.asarray([[3, 4, 5, 6, 7]])
  lo32, h32, _ = _fwd(tiny, tokens=ids)
  lo16, h16, _ = _fwd(bf16, tokens=ids)
  assert lo16.dtype == jnp.float32 and h16.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(lo16 - lo32))) < 0.1 * float(jnp.max(jnp.abs(lo32)))


def test_params_carry_logical_axes(tiny):
  flat = nnx.to_flat_state(nnx.state(tiny, nnx.Param))
  for path, var in flat:
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None and len(axes) == var[...].ndim, path
    assert set(axes) <= {"vocab", "embed", "heads", "kv", "mlp"}, (path, axes)


def test_remat_gives_same_soft_token_gradients(tiny):
  """Phase 2 differentiates through the frozen LLM w.r.t. input embeddings."""
  remat = llm.Llm(tiny.config.replace(remat=True), rngs=nnx.Rngs(0))
  nnx.update(remat, nnx.state(tiny))
  embeds = tiny.embed(jnp.asarray([[3, 4, 5, 6]]))

  def grad(model):
    graphdef, state = nnx.split(model)

    def loss(state, e):
      logits, _, _ = nnx.merge(graphdef, state)(input_embeds=e)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 7])

    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=1))(state, embeds))
    return jax.jit(jax.grad(loss, argnums=1))(state, embeds), "remat" in jaxpr

  (g0, remat0), (g1, remat1) = grad(tiny), grad(remat)
  assert not remat0 and remat1
  assert float(jnp.max(jnp.abs(g0))) > 0
  np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=1e-5, atol=1e-7)
