"""Language evaluation: held-out conversations, semantic consistency, reference
log-likelihood, and preservation (text-only logits == the base LLM's), on tiny models."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from _eval_stub import StubILM, tiny_llm
from flax import nnx

from ilm_jax import config_lib
from ilm_jax.data import phase2, sources, types
from ilm_jax.data import prompts as P
from ilm_jax.evals import language, results
from ilm_jax.models import adaptors
from ilm_jax.models import ilm as ilm_lib
from ilm_jax.models import qformer as qformer_lib

K = 2


@pytest.fixture(scope="module")
def setup(smollm2_tok):
  c = config_lib.data_config("generated")
  c.generated.update(num_items=30, num_users=40, num_clusters=3, min_len=6, max_len=8)
  ds = sources.load_dataset(c)
  return ds, types.leave_one_out(ds), tiny_llm(smollm2_tok)


def _hash_embed(texts):
  """Bag-of-character-trigram embedding, L2-normalised (stands in for MiniLM)."""
  out = np.zeros((len(texts), 64), np.float32)
  for i, t in enumerate(texts):
    for j in range(max(0, len(t) - 2)):
      out[i, hash(t[j:j + 3]) % 64] += 1
  return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_heldout_samples_use_only_valid_and_test_items(setup):
  ds, split, _ = setup
  samples = language.heldout_samples(ds, split, count=6)
  assert {s.task for s in samples} == set(language.TASKS) and len(samples) == 6 * 5
  for s in samples:
    u = s.user
    allowed = {int(split.valid[u]), int(split.test[u])}
    slots = [p.index for t in s.turns for p in t.content if isinstance(p, P.Slot)]
    hists = [i for t in s.turns for p in t.content if isinstance(p, P.History) for i in p.items]
    assert set(slots + hists) <= allowed, (s.task, slots, hists, allowed)
    assert language.reference_text(s)
  assert language.heldout_samples(ds, split, count=0) == []


def test_reference_loglik_text_only_equals_base_llm_teacher_forcing(setup, smollm2_tok):
  ds, split, base = setup
  enc = phase2.PromptEncoder(smollm2_tok, ds, soft_tokens=0, max_len=192)
  model = StubILM(base, ds.num_items, ds.num_users, K)
  samples = language.heldout_samples(ds, split, count=2, tasks=("compare",))
  lp, n = language.reference_loglik(model, samples, enc, batch_size=3)
  ex, _ = phase2.encode_examples(samples, enc)
  for r in range(len(samples)):
    logits, _, _ = base(tokens=ex["input_ids"][r:r + 1], mask=ex["attn_mask"][r:r + 1])
    logp = np.asarray(jax.nn.log_softmax(logits[0]))
    ids, lm = ex["input_ids"][r], ex["loss_mask"][r]
    want = sum(logp[t - 1, ids[t]] for t in np.nonzero(lm)[0])
    assert n[r] == lm.sum() > 0
    assert lp[r] == pytest.approx(want, rel=1e-4, abs=1e-3)


def test_language_record(setup, smollm2_tok):
  ds, split, base = setup
  enc = phase2.PromptEncoder(smollm2_tok, ds, soft_tokens=K, max_len=192)
  model = StubILM(base, ds.num_items, ds.num_users, K, seed=4)
  rec, rows = language.evaluate(model, ds, split, enc, method="ilm-it-ii", count=2,
                                tasks=("describe", "taste"), max_new_tokens=6, batch_size=4,
                                embed_fn=_hash_embed, log=lambda s: None)
  results.validate_record(rec)
  assert rec["task"] == "language" and rec["users"] == len(rows) == 4
  cos = [float(np.dot(*_hash_embed([r["generated"], r["reference"]]))) for r in rows]
  np.testing.assert_allclose([r["cosine"] for r in rows], cos, atol=1e-5)
  assert rec["semantic_consistency"] == pytest.approx(np.mean(cos), abs=1e-6)
  tokens = sum(r["tokens"] for r in rows)
  assert rec["loglik_per_token"] == pytest.approx(sum(r["loglik"] for r in rows) / tokens)
  assert rec["loglik_per_token"] < 0
  assert {"semantic_consistency_describe", "loglik_per_token_taste"} <= set(rec)


def _real_ilm(base, ds, kind):
  rng = np.random.default_rng(0)
  items = rng.normal(size=(ds.num_items, 8)).astype(np.float32)
  users = rng.normal(size=(ds.num_users, 8)).astype(np.float32)
  d = base.config.dim
  if kind == "qformer":
    q = qformer_lib.QFormer(qformer_lib.QFormerConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_query_tokens=K, cf_dim=8, proj_dim=16,
        dec_token_id=63), rngs=nnx.Rngs(1))
    enc = adaptors.QFormerAdaptor(q, d, rngs=nnx.Rngs(2))
  else:
    enc = adaptors.MlpAdaptor(8, 16, K, d, rngs=nnx.Rngs(2))
  return ilm_lib.ILM(base, enc, items, users, retrieval_dim=16, rngs=nnx.Rngs(3))


@pytest.mark.parametrize("kind", ["qformer", "mlp"])
def test_preservation_real_ilm_is_exact(setup, smollm2_tok, kind):
  ds, _, base = setup
  out = language.preservation(_real_ilm(base, ds, kind), smollm2_tok)
  assert out["equal"] and out["max_abs_diff"] == 0.0 and out["tokens"] > 20
  assert out["backend"] == "cpu" and out["passed"]


def test_preservation_detects_a_changed_llm(setup, smollm2_tok):
  ds, _, base = setup

  class Leaky(StubILM):
    def prompt_embeds(self, input_ids, slot_ids, slot_kind, slot_pos):
      return super().prompt_embeds(input_ids, slot_ids, slot_kind, slot_pos) * 1.001

  out = language.preservation(Leaky(base, ds.num_items, ds.num_users, K), smollm2_tok)
  assert not out["equal"] and out["max_abs_diff"] > 0 and not out["passed"]


def test_preservation_verdict_per_backend():
  """CPU demands bit-identity; accelerators allow float reassociation noise only."""
  assert language.preservation_passed(True, 0.0, 30.0, "cpu")
  assert not language.preservation_passed(False, 1e-6, 30.0, "cpu")
  assert language.preservation_passed(False, 1e-3, 30.0, "gpu")
  # The H200's default-precision difference (0.111 at logits ~30) is far outside it.
  assert not language.preservation_passed(False, 0.111, 30.0, "gpu")
