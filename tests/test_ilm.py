"""ILM model contracts: soft-token splice, preservation, frozen LLM, gradients, retrieval.

A tiny random Llama, a tiny random Q-Former and random CF tables; no files needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ilm_jax import losses, partition, phase2, steps
from ilm_jax.data import phase2 as data_phase2
from ilm_jax.models import adaptors, llm
from ilm_jax.models import ilm as ilm_lib
from ilm_jax.models import qformer as qformer_lib

N_ITEMS, N_USERS, D_CF, K = 30, 20, 8, 3
B, T, S = 4, 24, 3
FROZEN = ("^llm/", ilm_lib.QFORMER_UNUSED)


def _qformer():
  cfg = qformer_lib.QFormerConfig(
      vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
      max_position_embeddings=32, num_query_tokens=K, cf_dim=D_CF, proj_dim=16,
      dec_token_id=63)
  return qformer_lib.QFormer(cfg, rngs=nnx.Rngs(1))


def _model(kind: str = "qformer") -> ilm_lib.ILM:
  base = llm.Llm(llm.LlmConfig.tiny(vocab=128), rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  items = rng.normal(size=(N_ITEMS, D_CF)).astype(np.float32)
  users = rng.normal(size=(N_USERS, D_CF)).astype(np.float32)
  d = base.config.dim
  if kind == "qformer":
    enc = adaptors.QFormerAdaptor(_qformer(), d, rngs=nnx.Rngs(2))
  elif kind == "mlp":
    enc = adaptors.MlpAdaptor(D_CF, 16, K, d, rngs=nnx.Rngs(2))
  else:
    enc = None
  return ilm_lib.ILM(base, enc, items, users, retrieval_dim=16, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def models():
  return {kind: _model(kind) for kind in ("qformer", "mlp", None)}


def _batch(seed: int = 0) -> dict[str, jnp.ndarray]:
  """Rows with slots (item, user, empty) at known places, answers at the end."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 128, size=(B, T)).astype(np.int32)
  attn = np.ones((B, T), bool)
  attn[1, -3:] = False  # right padding
  slot_ids = np.array([[5, 2, 0], [7, 0, 0], [0, 0, 0], [29, 19, 11]], np.int32)
  slot_kind = np.array([[0, 1, -1], [0, -1, -1], [-1, -1, -1], [0, 1, 0]], np.int32)
  slot_pos = np.array([[2, 8, -1], [4, -1, -1], [-1, -1, -1], [1, 5, 10]], np.int32)
  loss_mask = np.zeros((B, T), bool)
  loss_mask[:, 16:20] = True
  loss_mask[1, 19] = False
  return {"input_ids": jnp.asarray(ids), "attn_mask": jnp.asarray(attn),
          "loss_mask": jnp.asarray(loss_mask), "slot_ids": jnp.asarray(slot_ids),
          "slot_kind": jnp.asarray(slot_kind), "slot_pos": jnp.asarray(slot_pos),
          "target_item": jnp.asarray([3, 4, 3, 9], jnp.int32),
          "task": jnp.asarray([0, 1, 2, 0], jnp.int32)}


def _fwd(model, b, **kw):
  return model(b["input_ids"], b["attn_mask"], b["slot_ids"], b["slot_kind"], b["slot_pos"],
               **kw)


_jfwd = nnx.jit(_fwd, static_argnames="compute_logits")


def test_slot_constants_match_the_data():
  assert (ilm_lib.SLOT_ITEM, ilm_lib.SLOT_USER, ilm_lib.SLOT_EMPTY) == (
      data_phase2.SLOT_ITEM, data_phase2.SLOT_USER, data_phase2.SLOT_EMPTY)


@nnx.jit
def _soft_and_embeds(model, b):
  items, users = model.cf_items[...], model.cf_users[...]
  refs = model.encoder(jnp.stack([items[5], users[2], users[19]]))
  return (model.soft_tokens(b["slot_ids"], b["slot_kind"]), refs,
          model.prompt_embeds(b["input_ids"], b["slot_ids"], b["slot_kind"], b["slot_pos"]))


@pytest.mark.parametrize("kind", ["qformer", "mlp"])
def test_soft_tokens_land_at_slot_pos(models, kind):
  model = models[kind]
  b = _batch()
  soft, refs, got = map(np.asarray, _soft_and_embeds(model, b))
  assert soft.shape == (B, S, K, model.llm.config.dim)
  # Each slot's tokens are the encoder applied to that entity's CF vector.
  np.testing.assert_allclose(soft[0, 0], refs[0], atol=1e-5)
  np.testing.assert_allclose(soft[0, 1], refs[1], atol=1e-5)
  np.testing.assert_allclose(soft[3, 1], refs[2], atol=1e-5)
  # Manual numpy splice of the word embeddings.
  table = np.asarray(model.llm.embedding[...])
  want = table[np.asarray(b["input_ids"])].copy()
  kinds, pos = np.asarray(b["slot_kind"]), np.asarray(b["slot_pos"])
  for r in range(B):
    for s in range(S):
      if kinds[r, s] >= 0:
        want[r, pos[r, s]:pos[r, s] + K] = soft[r, s]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  untouched = np.ones((B, T), bool)
  for r, s in zip(*np.nonzero(kinds >= 0), strict=True):
    untouched[r, pos[r, s]:pos[r, s] + K] = False
  np.testing.assert_array_equal(got[untouched], want[untouched])  # word embeddings exact
  assert not np.allclose(got[0, 2], table[b["input_ids"][0, 2]])


@nnx.jit
def _base_llm(model, b):
  return model.llm(tokens=b["input_ids"], mask=b["attn_mask"])[:2]


@pytest.mark.parametrize("kind", ["qformer", "mlp", None])
def test_text_only_prompt_gives_exactly_the_base_llm_logits(models, kind):
  model = models[kind]
  b = _batch()
  empty = {**b, "slot_kind": jnp.full((B, S), -1, jnp.int32),
           "slot_pos": jnp.full((B, S), -1, jnp.int32)}
  logits, hidden = _jfwd(model, empty)
  base_logits, base_hidden = _base_llm(model, empty)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(base_logits))
  np.testing.assert_array_equal(np.asarray(hidden), np.asarray(base_hidden))
  # ...and slots do change them (the check above is not vacuous).
  if kind is not None:
    assert not np.allclose(np.asarray(_jfwd(model, b)[0]), np.asarray(base_logits))


def test_frozen_llm_gets_no_grad_no_opt_state_and_stays_bit_identical(models):
  model = models["qformer"]
  gd, trainable, frozen = partition.split_trainable(model, FROZEN)
  paths = [partition.path_str(p) for p, _ in nnx.to_flat_state(trainable)]
  assert paths and not any(p.startswith("llm/") or "cf_" in p for p in paths)
  assert any(p.startswith("encoder/qformer/layers") for p in paths)
  assert not any("text_proj" in p or "embeddings" in p for p in paths)
  assert any(p.startswith("retrieval/") for p in paths)
  llm_before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model.llm)))

  tx = optax.adamw(1e-2)
  loss_fn = lambda m, b, r: phase2.phase2_loss(m, b, r, max_answer_tokens=8)  # noqa: E731
  step = jax.jit(steps.make_train_step(gd, loss_fn, tx))
  opt_state = tx.init(trainable)
  n_train = sum(x.size for x in jax.tree.leaves(trainable))
  n_opt = sum(np.size(x) for x in jax.tree.leaves(opt_state))
  assert n_opt <= 2 * n_train + 4  # Adam moments for trainable params only
  t0 = jax.tree.map(np.array, trainable)
  for i in range(2):
    trainable, opt_state, metrics = step(trainable, frozen, opt_state, _batch(i),
                                         jax.random.key(i))
  assert np.isfinite(float(metrics["loss"]))
  after = nnx.merge(gd, trainable, frozen)
  llm_after = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(after.llm)))
  jax.tree.map(np.testing.assert_array_equal, llm_after, llm_before)
  np.testing.assert_array_equal(np.asarray(after.cf_items[...]), np.asarray(model.cf_items[...]))
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), t0, trainable)
  assert sum(jax.tree.leaves(moved)) > len(jax.tree.leaves(moved)) // 2


def test_gradients_reach_the_qformer_through_the_frozen_llm(models):
  model = models["qformer"]
  gd, trainable, frozen = partition.split_trainable(model, FROZEN)
  b = _batch()

  def lm_only(trainable):
    m = nnx.merge(gd, trainable, frozen, copy=True)
    return phase2.phase2_loss(m, b, None, retrieval_weight=0.0)[0]

  grads = jax.jit(jax.grad(lm_only))(trainable)
  flat = {partition.path_str(p): np.asarray(v) for p, v in nnx.to_flat_state(grads)}
  # Only the LM loss: the Q-Former's gradient exists only via the LLM's input embeddings.
  for name in ("encoder/qformer/query_tokens", "encoder/llm_proj/kernel",
               "encoder/qformer/layers/1/self_attention/"):
    hit = [k for k in flat if k.startswith(name)]
    assert hit, (name, sorted(flat)[:10])
    assert np.abs(flat[hit[0]]).max() > 0, name
  assert not any(k.startswith("llm/") for k in flat)


@pytest.mark.parametrize("candidates", ["full", "batch"])
def test_detached_retrieval_loss_trains_only_the_head(models, candidates):
  """retrieval_detach: the item encoder's gradient is the LM loss's alone (as at weight
  0), the head's is the retrieval loss's; without it the retrieval loss moves the encoder."""
  model = models["qformer"]
  gd, trainable, frozen = partition.split_trainable(model, FROZEN)
  b = _batch()

  def grads(**kw):
    def loss(t):
      m = nnx.merge(gd, t, frozen, copy=True)
      return phase2.phase2_loss(m, b, None, candidates=candidates, max_answer_tokens=8,
                                **kw)[0]
    g = jax.jit(jax.grad(loss))(trainable)
    return {partition.path_str(p): np.asarray(v) for p, v in nnx.to_flat_state(g)}

  lm, joint, detached = grads(retrieval_weight=0.0), grads(), grads(retrieval_detach=True)
  encoder = [k for k in lm if k.startswith("encoder/")]
  head = [k for k in lm if k.startswith("retrieval/")]
  assert encoder and head
  for k in encoder:
    np.testing.assert_allclose(detached[k], lm[k], rtol=1e-5, atol=1e-7, err_msg=k)
  assert any(not np.allclose(joint[k], lm[k], rtol=1e-3, atol=1e-6) for k in encoder)
  for k in head:
    assert not lm[k].any(), k
    np.testing.assert_allclose(detached[k], joint[k], rtol=1e-5, atol=1e-7, err_msg=k)
  assert all(np.abs(detached[k]).max() > 0 for k in head)


_jloss = nnx.jit(phase2.phase2_loss,
                 static_argnames=("retrieval_weight", "candidates", "num_negatives",
                                  "max_answer_tokens"))


def test_phase2_lm_loss_matches_full_logits_reference(models):
  model = models["qformer"]
  b = _batch()
  loss, m = _jloss(model, b, None, retrieval_weight=0.0, max_answer_tokens=8)
  logits, _ = _jfwd(model, b)
  ref, ref_m = losses.masked_lm_loss(logits[:, :-1], b["input_ids"][:, 1:], b["loss_mask"][:, 1:])
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
  assert float(m["tokens"]) == float(ref_m["tokens"]) == 15
  assert float(m["answer_tokens_cut"]) == 0
  _, m2 = _jloss(model, b, None, retrieval_weight=0.0, max_answer_tokens=2)
  assert float(m2["answer_tokens_cut"]) == 15 - 2 * B + 0


def test_cutting_right_padding_changes_neither_loss_nor_gradients(models):
  """What ``pipeline.length_grouped_batches`` relies on: a batch cut to its longest row
  trains as the same batch padded to T (causal attention never looks right, so this checks
  that nothing in the loss depends on T itself)."""
  model = models["qformer"]
  cut = _batch()
  extra = 16
  padded = dict(cut)
  for key, fill in (("input_ids", 0), ("attn_mask", False), ("loss_mask", False)):
    padded[key] = jnp.pad(cut[key], ((0, 0), (0, extra)), constant_values=fill)
  graphdef, trainable, rest = partition.split_trainable(model, FROZEN)

  def loss_of(t, b):
    m = nnx.merge(graphdef, t, rest)
    return phase2.phase2_loss(m, b, None, candidates="full", max_answer_tokens=8)[0]

  grad_fn = jax.jit(jax.value_and_grad(loss_of))
  (l_cut, g_cut), (l_pad, g_pad) = grad_fn(trainable, cut), grad_fn(trainable, padded)
  assert padded["input_ids"].shape == (B, T + extra)
  np.testing.assert_allclose(float(l_pad), float(l_cut), rtol=1e-6)
  # Equal up to float reassociation (the matmuls run over other shapes): 1e-5 of the
  # largest gradient entry (some parameters' gradients are 0 up to round-off).
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(g_cut))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale),
               g_pad, g_cut)


def test_answer_and_last_prompt_positions():
  mask = jnp.asarray([[False, True, False, True], [False, False, False, True]])
  idx, valid = phase2.answer_positions(mask, 3)
  np.testing.assert_array_equal(np.asarray(idx), [[1, 3, 0], [3, 0, 0]])
  np.testing.assert_array_equal(np.asarray(valid), [[True, True, False], [True, False, False]])
  np.testing.assert_array_equal(np.asarray(phase2.last_prompt_positions(mask)), [0, 2])


@pytest.mark.parametrize("kind", ["qformer", None])
def test_retrieval_scores_full_and_in_batch(models, kind):
  model = models[kind]
  b = _batch()
  _, hidden = _jfwd(model, b, compute_logits=False)
  h_last = ilm_lib.last_prompt_hidden(hidden, phase2.last_prompt_positions(b["loss_mask"]))
  np.testing.assert_array_equal(np.asarray(h_last), np.asarray(hidden[:, 15]))
  scores = np.asarray(model.retrieval_scores(h_last))
  assert scores.shape == (B, N_ITEMS) and np.isfinite(scores).all()
  # Reference: cosine of projected query and mean item token, over the temperature.
  head = model.retrieval
  if kind is None:
    reps = np.asarray(head.item_table[...])
  else:
    reps = np.asarray(nnx.jit(lambda m: m.item_token_table())(model)).mean(axis=1)
  keys = np.array(head.item_proj(jnp.asarray(reps)))
  keys /= np.linalg.norm(keys, axis=-1, keepdims=True)
  q = np.array(head.query_proj(h_last))
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  np.testing.assert_allclose(scores, q @ keys.T / float(head.temperature()), rtol=1e-4,
                             atol=1e-4)
  sub = np.asarray(model.retrieval_item_keys(items=b["target_item"]))
  np.testing.assert_allclose(sub, keys[np.asarray(b["target_item"])], atol=1e-5)
  # Full softmax: CE of the target over all items, mean over recommendation rows.
  rec = np.asarray([True, True, False, True])
  tgt = np.asarray(b["target_item"])

  def ce(s, labels):
    s = s - s.max(axis=1, keepdims=True)
    logp = s - np.log(np.exp(s).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(labels)), labels][rec].mean()

  _, m = _jloss(model, b, None, candidates="full")
  np.testing.assert_allclose(float(m["loss_retrieval"]), ce(scores, tgt), rtol=1e-4)
  # In-batch: candidates are the targets; the non-recommendation row's column and other
  # columns holding my own target (rows 0 and 2 share item 3) are not negatives.
  ib = scores[:, tgt].copy()
  ib[:, ~rec] = -1e30
  ib[0, 2] = ib[2, 0] = -1e30
  _, m = _jloss(model, b, None, candidates="batch")
  np.testing.assert_allclose(float(m["loss_retrieval"]), ce(ib, np.arange(B)), rtol=1e-4)
  _, m = _jloss(model, b, jax.random.key(0), candidates="batch", num_negatives=7)
  assert np.isfinite(float(m["loss_retrieval"])) and float(m["retrieval_rows"]) == 3


def test_an_item_without_cf_interactions_trains_the_mlp_with_finite_gradients():
  """An item never seen in training has an all-zero CF row (OpenP5 Beauty has 33); the MLP
  adaptor maps it to all-zero soft tokens and an all-zero retrieval key. The full softmax
  normalises that key: its gradient must be 0, not NaN (it was NaN at step 1 on Beauty)."""
  model = _model("mlp")
  items = np.array(model.cf_items[...])
  items[7] = 0.0
  model.cf_items[...] = jnp.asarray(items)
  assert np.abs(np.asarray(nnx.jit(lambda m: m.item_token_table())(model))[7]).max() == 0
  gd, trainable, frozen = partition.split_trainable(model, ("^llm/",))

  def loss(t):
    return phase2.phase2_loss(nnx.merge(gd, t, frozen, copy=True), _batch(), None,
                              candidates="full", max_answer_tokens=8)[0]

  value, grads = jax.jit(jax.value_and_grad(loss))(trainable)
  assert np.isfinite(float(value))
  for path, g in nnx.to_flat_state(grads):
    assert np.isfinite(np.asarray(g)).all(), partition.path_str(path)
