"""Q-Former contracts beyond the reference fixtures: mask semantics of each pass, the
Phase 1 API end to end, logical axes, and shapes at paper size (without allocating)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ilm_jax import losses, masks, partition
from ilm_jax.models import qformer

TINY = qformer.QFormerConfig(
    vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
    max_position_embeddings=16, num_query_tokens=3, cf_dim=6, proj_dim=8, dec_token_id=49,
    cls_token_id=1, initializer_range=0.2)

# Paper size: 8 layers from BERT-base, 768 wide, 32 queries.
PAPER = qformer.QFormerConfig(hidden_size=768, num_layers=8, num_heads=12,
                              intermediate_size=3072, num_query_tokens=32, cf_dim=64)


@pytest.fixture(scope="module")
def tiny():
  return qformer.QFormer(TINY, rngs=nnx.Rngs(0))


def _batch(b=2, length=6, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 40, size=(b, length)).astype(np.int32)
  ids[:, 0] = TINY.cls_token_id
  valid = masks.padding_mask(jnp.array([length, length - 2] + [length] * (b - 2)), length)
  ids = np.where(np.asarray(valid), ids, TINY.pad_token_id)
  cf = rng.normal(size=(b, TINY.cf_dim)).astype(np.float32)
  return jnp.asarray(cf), jnp.asarray(ids), valid


def test_query_ffn_starts_as_a_copy_of_the_text_ffn(tiny):
  fresh = qformer.QFormer(TINY, rngs=nnx.Rngs(3))
  for layer in fresh.layers:
    np.testing.assert_array_equal(np.asarray(layer.ffn_query.up.kernel[...]),
                                  np.asarray(layer.ffn.up.kernel[...]))
    assert layer.ffn_query.up.kernel is not layer.ffn.up.kernel  # separate params
  assert not np.array_equal(np.asarray(fresh.layers[0].ffn.up.kernel[...]),
                            np.asarray(fresh.layers[1].ffn.up.kernel[...]))


def test_shapes(tiny):
  cf, ids, valid = _batch()
  k, h, p = TINY.num_query_tokens, TINY.hidden_size, TINY.proj_dim
  assert tiny.encode_items(cf).shape == (2, k, h)
  item = tiny.item_feats(cf)
  assert item.shape == (2, k, p)
  np.testing.assert_allclose(np.linalg.norm(item, axis=-1), 1.0, rtol=1e-5)
  assert tiny.text_feats(ids, valid).shape == (2, p)
  assert tiny.itm_logits(cf, ids, valid).shape == (2, 2)
  assert tiny.itg_logits(cf, ids, valid).shape == (2, ids.shape[1], TINY.vocab_size)
  assert tiny.memory(cf).shape == (2, 1, TINY.mem_dim)


def test_itg_pass_is_causal_and_its_queries_equal_the_query_pass(tiny):
  cf, ids, valid = _batch()
  mem = tiny.memory(cf)
  dec = tiny.to_decoder_ids(ids)
  assert (np.asarray(dec[:, 0]) == TINY.dec_token_id).all()
  h = tiny.itg_pass(mem, dec, valid)
  k = TINY.num_query_tokens
  np.testing.assert_allclose(h[:, :k], tiny.query_pass(mem), rtol=1e-5, atol=1e-5)
  # Changing token 3 onwards must not change outputs at positions 0..2.
  ids2 = ids.at[:, 3:].set(7)
  h2 = tiny.itg_pass(mem, tiny.to_decoder_ids(ids2), valid)
  np.testing.assert_allclose(h2[:, :k + 3], h[:, :k + 3], rtol=1e-5, atol=1e-5)
  assert not np.allclose(h2[:, k + 3:], h[:, k + 3:])


def test_text_reaches_the_memory_only_through_queries(tiny):
  """ITG text outputs depend on the CF vector (via queries); text-only outputs do not."""
  cf, ids, valid = _batch()
  a = tiny.itg_logits(cf, ids, valid)
  b = tiny.itg_logits(cf + 1.0, ids, valid)
  assert not np.allclose(a, b)
  # With the queries' view of the memory fixed, the text outputs cannot change.
  mem = tiny.memory(cf)
  base = tiny.itg_pass(mem, tiny.to_decoder_ids(ids), valid)
  model2 = nnx.clone(tiny)
  for layer in model2.layers:
    if layer.cross_attention is not None:
      # Value weights to zero: cross-attention output no longer depends on memory values.
      layer.cross_attention.value.kernel[...] = jnp.zeros_like(layer.cross_attention.value.kernel)
  x1 = model2.itg_pass(mem, tiny.to_decoder_ids(ids), valid)
  x2 = model2.itg_pass(mem * 3.0 + 1.0, tiny.to_decoder_ids(ids), valid)
  np.testing.assert_allclose(x1, x2, rtol=1e-5, atol=1e-5)
  assert not np.allclose(x1, base)


def test_padding_does_not_leak(tiny):
  cf, ids, valid = _batch()
  ids2 = jnp.where(valid, ids, 33)  # change only the padded token ids
  np.testing.assert_allclose(tiny.itm_logits(cf, ids2, valid), tiny.itm_logits(cf, ids, valid),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tiny.text_feats(ids2, valid), tiny.text_feats(ids, valid),
                             rtol=1e-5, atol=1e-6)


def test_multi_token_memory_and_padding():
  cfg = qformer.QFormerConfig(**{**TINY.__dict__, "num_memory_tokens": 3, "memory_dim": 16})
  m = qformer.QFormer(cfg, rngs=nnx.Rngs(1))
  cf, _, _ = _batch()
  mem = m.memory(cf)
  assert mem.shape == (2, 3, 16)
  full = m.query_pass(mem)
  only0 = m.query_pass(mem, jnp.array([[True, False, False]] * 2))
  np.testing.assert_allclose(only0, m.query_pass(mem[:, :1]), rtol=1e-5, atol=1e-5)
  assert not np.allclose(only0, full)


def test_phase1_losses_jit_and_grad(tiny):
  """The functional pattern Phase 1 uses: split/merge around jit, grads for every loss."""
  cf, ids, valid = _batch(b=4)
  graphdef, state = nnx.split(tiny)

  @jax.jit
  def step(state, rng):
    def loss_fn(state):
      m = nnx.merge(graphdef, state)
      sim = losses.itc_logits(m.item_feats(cf), m.text_feats(ids, valid), m.temperature())
      l_itc, _ = losses.itc_loss(sim)
      pairs = losses.sample_itm_negatives(rng, sim)
      logit = m.itm_logits(cf[pairs.item_idx], ids[pairs.text_idx], valid[pairs.text_idx])
      l_itm, _ = losses.itm_loss(logit, pairs.labels, pairs.weights)
      l_itg, _ = losses.itg_loss(m.itg_logits(cf, ids, valid), ids, valid)
      return l_itc + l_itm + l_itg
    return jax.value_and_grad(loss_fn)(state)

  loss, grads = step(state, jax.random.key(0))
  assert np.isfinite(loss)
  g = nnx.to_flat_state(grads)
  assert all(np.isfinite(np.asarray(v[...])).all() for _, v in g)
  gnorm = {"/".join(map(str, k)): float(jnp.abs(v[...]).sum()) for k, v in g}
  for name in ("query_tokens", "temp", "memory/proj/kernel", "itm_head/kernel",
               "lm_head/transform/kernel", "layers/0/cross_attention/value/kernel",
               "layers/0/ffn_query/up/kernel", "layers/1/ffn/up/kernel"):
    assert gnorm[name] > 0, name


def test_remat_gives_the_same_gradients(tiny):
  cf, _, _ = _batch()
  remat = qformer.QFormer(qformer.QFormerConfig(**{**TINY.__dict__, "remat": True}),
                          rngs=nnx.Rngs(0))

  def grads(model):
    graphdef, state = nnx.split(model)
    def f(state):
      m = nnx.merge(graphdef, state)
      return (m.item_feats(cf) ** 3).sum()
    return jax.jit(jax.grad(f))(state)

  for (p, a), (_, b) in zip(nnx.to_flat_state(grads(tiny)), nnx.to_flat_state(grads(remat)),
                            strict=True):
    np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), rtol=1e-4, atol=1e-6,
                               err_msg=str(p))


def test_every_param_has_logical_axes(tiny):
  for path, var in nnx.to_flat_state(nnx.state(tiny, nnx.Param)):
    names = var.get_metadata().get("out_sharding")
    if var.ndim == 0:
      continue
    assert names is not None and len(names) == var.ndim, (path, names)
  specs = nnx.get_partition_spec(nnx.state(tiny, nnx.Param))
  assert tuple(specs["embeddings"]["word"]["embedding"].get_value()) == ("vocab", "embed")
  assert tuple(specs["layers"][0]["ffn"]["up"]["kernel"].get_value()) == ("embed", "mlp")
  assert tuple(specs["query_tokens"].get_value()) == ("queries", "embed")
  # Every logical name has a rule: FSDP-shard the paper-size model abstractly on 8 devices.
  mesh = partition.make_mesh(data=2, fsdp=4)
  paper = nnx.eval_shape(lambda: qformer.QFormer(PAPER, rngs=nnx.Rngs(0)))
  sh = partition.state_shardings(nnx.state(paper), mesh, partition.DEFAULT_RULES)
  word = sh["embeddings"]["word"]["embedding"].get_value()
  assert word.spec == jax.sharding.PartitionSpec(None, "fsdp")


def _expected_param_count(c: qformer.QFormerConfig) -> int:
  h, i, v = c.hidden_size, c.intermediate_size, c.vocab_size
  attn = lambda kv: h * h + h + 2 * (kv * h + h) + h * h + h + 2 * h  # noqa: E731
  ffn = h * i + i + i * h + h + 2 * h
  n_cross = sum(c.has_cross_attention(j) for j in range(c.num_layers))
  total = c.num_layers * (attn(h) + 2 * ffn) + n_cross * attn(c.mem_dim)
  total += c.num_query_tokens * h + v * h + c.max_position_embeddings * h + 2 * h
  total += c.cf_dim * c.num_memory_tokens * c.mem_dim + c.num_memory_tokens * c.mem_dim
  total += 2 * c.mem_dim
  total += 2 * (h * c.proj_dim + c.proj_dim) + h * 2 + 2
  total += h * h + h + 2 * h + v  # LM head transform + LN + bias
  return total + 2  # temperatures


@pytest.mark.parametrize("cfg", [TINY, PAPER], ids=["tiny", "paper"])
def test_eval_shape_param_count(cfg):
  abstract = nnx.eval_shape(lambda: qformer.QFormer(cfg, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert qformer.param_count(abstract) == _expected_param_count(cfg)
  assert abstract.query_tokens.shape == (cfg.num_query_tokens, cfg.hidden_size)
  assert sum(layer.cross_attention is not None for layer in abstract.layers) == (
      (cfg.num_layers + 1) // 2)


def test_bfloat16_compute_runs():
  cfg = qformer.QFormerConfig(**{**TINY.__dict__, "dtype": "bfloat16"})
  m = qformer.QFormer(cfg, rngs=nnx.Rngs(0))
  cf, ids, valid = _batch()
  assert m.query_tokens[...].dtype == jnp.float32
  out = m.itm_logits(cf, ids, valid)
  assert out.dtype == jnp.float32 and np.isfinite(out).all()
  np.testing.assert_allclose(out, qformer.QFormer(TINY, rngs=nnx.Rngs(0)).itm_logits(
      cf, ids, valid), atol=0.1)


def test_cross_attention_init_std():
  """Only the cross-attention layers take ``cross_attention_init_std``; None keeps BLIP-2's."""
  def stds(cfg):
    m = qformer.QFormer(cfg, rngs=nnx.Rngs(0))
    layer = m.layers[0]
    return (float(np.std(np.asarray(layer.cross_attention.value.kernel[...]))),
            float(np.std(np.asarray(layer.self_attention.value.kernel[...]))))
  base = dict(TINY.__dict__, hidden_size=64, initializer_range=0.02)
  cross, self_ = stds(qformer.QFormerConfig(**{**base, "cross_attention_init_std": 0.125}))
  assert abs(cross - 0.125) < 0.01 and abs(self_ - 0.02) < 0.002
  cross, self_ = stds(qformer.QFormerConfig(**base))
  assert abs(cross - 0.02) < 0.002 and abs(self_ - 0.02) < 0.002
