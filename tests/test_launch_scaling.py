"""docs/SCALING.md's arithmetic (benchmarks/scaling_arithmetic.py) against independent counts."""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from ilm_jax.models import llm, qformer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
import scaling_arithmetic as S  # noqa: E402, N812

# Parameter counts Hugging Face lists for these checkpoints (1.24B / 3.21B / 8.03B).
PUBLISHED = {"Llama-3.2-1B": 1_235_814_400, "Llama-3.2-3B": 3_212_749_824,
             "Llama-3.1-8B": 8_030_261_248}


def _count(module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("m", S.MODELS, ids=lambda m: m.name)
def test_param_formula_matches_published_and_our_model(m):
  if m.name in PUBLISHED:
    assert m.params() == PUBLISHED[m.name]
  c = llm.LlmConfig(vocab=m.vocab, dim=m.d, layers=m.layers, heads=m.h, kv_heads=m.kv,
                    head_dim=m.hd, ffn=m.ffn, tie=m.tie)
  assert _count(nnx.eval_shape(lambda: llm.Llm(c, rngs=nnx.Rngs(0)))) == m.params()


def test_qformer_count_is_current():
  model = nnx.eval_shape(lambda: qformer.QFormer(qformer.QFormerConfig(), rngs=nnx.Rngs(0)))
  assert _count(model) == S.QFORMER_PARAMS


def test_eight_b_needs_sharding_on_v5e():
  m = S.MODELS[-1]
  fixed_1 = S.weights_per_chip(m, 1) + S.trainable_state(m)
  assert fixed_1 > S.USABLE * 16 * S.GB  # does not fit one chip
  r = S.rows(256, 8, 10, 8)
  cell = next(x for x in r["train"] if x["model"] == m.name and x["hw"] == "TPU v5e"
              and x["chips"] == 8)
  # 16.06 GB / 8 + 1.92 GB gather + 0.53 GB AdamW, by hand.
  assert cell["fixed_gb"] == pytest.approx(2.0075 + 1.9231 + 0.5342, abs=0.01)
