"""Logical axis rules, shard_model and the trainable filter (8 CPU devices from conftest)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ilm_jax import partition


class TinyMLP(nnx.Module):
  """A 2-layer MLP with a 'frozen' embedding table (stands in for the CF tables / LLM)."""

  def __init__(self, rngs: nnx.Rngs, din: int = 8, dh: int = 16, dout: int = 4):
    init = nnx.initializers.lecun_normal()
    self.table = nnx.Embed(32, din, rngs=rngs,
                           embedding_init=partition.with_logical(init, ("vocab", "embed")))
    self.l1 = nnx.Linear(din, dh, rngs=rngs, kernel_init=partition.with_logical(init, ("embed", "mlp")))
    self.norm = nnx.LayerNorm(dh, rngs=rngs)
    self.l2 = nnx.Linear(dh, dout, rngs=rngs, kernel_init=partition.with_logical(init, ("mlp", "embed")))

  def __call__(self, ids):
    return self.l2(jax.nn.gelu(self.norm(self.l1(self.table(ids)))))


def mesh(data=2, fsdp=4):
  return jax.make_mesh((data, fsdp), ("data", "fsdp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def test_logical_to_spec_drops_missing_and_indivisible_axes():
  m = mesh()
  rules = partition.DEFAULT_RULES
  assert partition.logical_to_spec(("embed", "mlp"), m, rules, (16, 8)) == P("fsdp", None)
  # 6 is not divisible by fsdp=4 -> replicated rather than an unplaceable spec.
  assert partition.logical_to_spec(("embed", "mlp"), m, rules, (6, 8)) == P(None, None)
  assert partition.logical_to_spec(("batch", None), m, rules, (8, 3)) == P(("data", "fsdp"), None)
  # A mesh axis shards at most one dim.
  assert partition.logical_to_spec(("embed", "embed"), m, rules) == P("fsdp", None)
  assert partition.logical_to_spec(None, m, rules) == P()
  with pytest.raises(ValueError, match="'hidden' has no rule"):
    partition.logical_to_spec(("hidden",), m, rules)


def test_shard_model_places_params_by_rules():
  m = mesh()
  model = partition.shard_model(lambda: TinyMLP(nnx.Rngs(0)), m)
  assert model.l1.kernel.get_value().sharding.spec == P("fsdp", None)
  assert model.l2.kernel.get_value().sharding.spec == P(None, "fsdp")
  assert model.table.embedding.get_value().sharding.spec == P(None, "fsdp")
  assert model.l1.bias.get_value().sharding.spec == P()
  # Same values as an unsharded build from the same seed.
  ref = TinyMLP(nnx.Rngs(0))
  np.testing.assert_array_equal(np.asarray(model.l1.kernel.get_value()),
                                np.asarray(ref.l1.kernel.get_value()))
  placed = partition.place_state(TinyMLP(nnx.Rngs(0)), m, partition.REPLICATED_RULES)
  assert placed.l1.kernel.get_value().sharding.spec == P(None, None)


def test_trainable_filter_split_and_counts():
  model = TinyMLP(nnx.Rngs(0))
  _, trainable, frozen = partition.split_trainable(model, frozen=("^table/",))
  t_paths = {partition.path_str(p) for p, _ in nnx.to_flat_state(trainable)}
  f_paths = {partition.path_str(p) for p, _ in nnx.to_flat_state(frozen)}
  assert "table/embedding" in f_paths and not any(p.startswith("table") for p in t_paths)
  assert {"l1/kernel", "l1/bias", "norm/scale", "l2/kernel"} <= t_paths
  counts = partition.param_counts(trainable, frozen)
  assert counts == {"trainable": 8 * 16 + 16 + 2 * 16 + 16 * 4 + 4, "frozen": 32 * 8}
  with pytest.raises(partition.TrainableFilterError, match="matches no parameter"):
    partition.split_trainable(model, frozen=("^tabel/",))
  with pytest.raises(partition.TrainableFilterError, match="no trainable"):
    partition.split_trainable(model, frozen=(".*",))
