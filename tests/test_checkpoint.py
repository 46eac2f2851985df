"""Checkpointer: round trip with iterator state, corrupt-latest fallback, disk full."""

from __future__ import annotations

import errno

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ilm_jax import checkpoint


def _iter():
  ds = grain.MapDataset.range(50).shuffle(seed=3).map(lambda i: {"x": np.full((2,), i)})
  return iter(ds.to_iter_dataset())


def _state(v: float):
  return {"params": {"w": jnp.full((4, 3), v), "b": jnp.arange(3.0) + v},
          "step": jnp.int32(int(v))}


def _save_steps(ckpt, steps, it):
  for s in steps:
    next(it)
    assert ckpt.save(s, _state(float(s)), {"train": it})


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_restores_arrays_and_iterator_position(tmp_path, async_save):
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", async_save=async_save)
  it = _iter()
  _save_steps(ckpt, [1, 2], it)
  expected_next = next(it)
  assert not ckpt.save(2, _state(9.0), {"train": it})  # existing step: nothing written
  ckpt.close()
  assert checkpoint.verify_manifest(tmp_path / "ckpt" / "2") is None
  assert (tmp_path / "ckpt" / "2" / checkpoint.MANIFEST).exists()

  fresh = _iter()
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
  step, state = ckpt.restore(checkpoint.abstract_like(_state(0.0)), {"train": fresh})
  assert step == 2
  np.testing.assert_array_equal(state["params"]["w"], np.full((4, 3), 2.0))
  np.testing.assert_array_equal(next(fresh)["x"], expected_next["x"])
  assert checkpoint.Checkpointer(tmp_path / "empty").restore(_state(0.0)) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, damage, caplog):
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
  it = _iter()
  _save_steps(ckpt, [1, 2], it)
  ckpt.close()
  # Damage the biggest array file of step 2.
  files = [p for p in (tmp_path / "ckpt" / "2" / "state").rglob("*") if p.is_file()
           and p.parent.name == "d"]
  victim = max(files, key=lambda p: p.stat().st_size)
  data = victim.read_bytes()
  if damage == "truncate":
    victim.write_bytes(data[: len(data) // 2])
  elif damage == "flip":
    victim.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
  else:
    victim.unlink()

  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
  fresh = _iter()
  with caplog.at_level("WARNING"):
    step, state = ckpt.restore(checkpoint.abstract_like(_state(0.0)), {"train": fresh})
  assert step == 1
  np.testing.assert_array_equal(state["params"]["b"], np.arange(3.0) + 1)
  assert "step 2" in caplog.text and "unusable" in caplog.text
  # The bad step is set aside, so the run can save step 2 again.
  assert (tmp_path / "ckpt" / "corrupt" / "2").is_dir()
  assert ckpt.all_steps() == [1]
  assert ckpt.save(2, _state(2.0), {"train": fresh})


def test_every_step_corrupt_is_an_error(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
  _save_steps(ckpt, [1], _iter())
  ckpt.close()
  for p in (tmp_path / "ckpt" / "1").rglob("*"):
    if p.is_file() and p.name != checkpoint.MANIFEST:
      p.write_bytes(b"")
  with pytest.raises(checkpoint.CheckpointError, match="no usable checkpoint.*step 1"):
    checkpoint.Checkpointer(tmp_path / "ckpt").restore(checkpoint.abstract_like(_state(0.0)),
                                                      {"train": _iter()})


def test_disk_full_names_the_cause_and_keeps_previous(tmp_path, monkeypatch):
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
  it = _iter()
  _save_steps(ckpt, [1], it)

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", full)
  next(it)
  with pytest.raises(checkpoint.CheckpointError, match=r"step 2 .*disk full.*step 1 is intact"):
    ckpt.save(2, _state(2.0), {"train": it})
  monkeypatch.undo()
  ckpt.close()

  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
  assert ckpt.all_steps() == [1]
  step, state = ckpt.restore(checkpoint.abstract_like(_state(0.0)), {"train": _iter()})
  assert step == 1 and float(state["step"]) == 1.0


def test_restore_applies_target_sharding(tmp_path):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sh = jax.sharding.NamedSharding(mesh, jax.P("data"))
  x = jax.device_put(jnp.arange(16.0), sh)
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
  ckpt.save(5, {"x": x})
  _, out = ckpt.restore({"x": jax.ShapeDtypeStruct((16,), jnp.float32, sharding=sh)})
  assert out["x"].sharding == sh
  np.testing.assert_array_equal(out["x"], np.arange(16.0))
