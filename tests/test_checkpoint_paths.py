"""Relative paths (a relative --workdir) reach orbax as absolute ones."""

import numpy as np

from ilm_jax import checkpoint


def test_relative_directory_saves_and_restores(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  ckpt = checkpoint.Checkpointer("runs/rel/checkpoints")
  ckpt.save(3, state, {})
  ckpt.close()
  again = checkpoint.Checkpointer("runs/rel/checkpoints")
  step, restored = again.restore(checkpoint.abstract_like(state), {})
  again.close()
  assert step == 3
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert (tmp_path / "runs" / "rel" / "checkpoints").is_dir()


def test_relative_pytree_round_trip(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  tree = {"a": np.ones((2, 2), np.float32)}
  checkpoint.save_pytree("out/params", tree)
  got = checkpoint.restore_pytree("out/params", {"a": np.zeros((2, 2), np.float32)})
  np.testing.assert_array_equal(got["a"], tree["a"])
