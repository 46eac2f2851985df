"""Weighted ALS against a dense numpy reference; determinism; embeddings round-trip."""

from __future__ import annotations

import numpy as np
import pytest

from ilm_jax.cf import mf
from ilm_jax.data import types


def _toy_train(num_users=9, num_items=13, seed=0):
  rng = np.random.default_rng(seed)
  train = [rng.integers(0, num_items, rng.integers(0, 12)).astype(np.int32)
           for _ in range(num_users)]  # repeats give counts > 1; some users empty
  train[0] = np.zeros(0, np.int32)
  return train


def _dense_counts(train, num_items):
  r = np.zeros((len(train), num_items))
  for u, items in enumerate(train):
    np.add.at(r[u], items, 1)
  return r


def _numpy_half_step(fixed, r, alpha, reg):
  """x_u = (Y^T C_u Y + reg I)^-1 Y^T C_u p_u, straight from the definition."""
  d = fixed.shape[1]
  out = np.zeros((len(r), d))
  for u in range(len(r)):
    c = 1 + alpha * r[u]
    p = (r[u] > 0).astype(float)
    a = fixed.T @ (c[:, None] * fixed) + reg * np.eye(d)
    out[u] = np.linalg.solve(a, fixed.T @ (c * p))
  return out


def _objective(x, y, r, alpha, reg):
  c = 1 + alpha * r
  return np.sum(c * ((r > 0) - x @ y.T) ** 2) + reg * (np.sum(x * x) + np.sum(y * y))


@pytest.mark.parametrize("chunk_floats", [1 << 20, 64])  # 64: one row per chunk
def test_half_step_matches_numpy_solve(chunk_floats):
  train = _toy_train()
  r = _dense_counts(train, 13)
  y = np.random.default_rng(1).normal(size=(13, 4)).astype(np.float32)
  inter = mf.Interactions.from_sequences(train, 13)
  got = mf.als_half_step(y, inter, alpha=3.0, reg=0.5, chunk_floats=chunk_floats)
  np.testing.assert_allclose(got, _numpy_half_step(y.astype(float), r, 3.0, 0.5),
                             rtol=1e-4, atol=1e-5)
  # The item half-step is the same solve on the transpose.
  x = np.random.default_rng(2).normal(size=(9, 4)).astype(np.float32)
  got_items = mf.als_half_step(x, inter.transpose(), alpha=3.0, reg=0.5,
                               chunk_floats=chunk_floats)
  np.testing.assert_allclose(got_items, _numpy_half_step(x.astype(float), r.T, 3.0, 0.5),
                             rtol=1e-4, atol=1e-5)
  assert np.all(got[0] == 0)  # a user without interactions has nothing to fit


def test_loss_is_the_objective_and_never_increases():
  train = _toy_train(num_users=30, num_items=20, seed=3)
  r = _dense_counts(train, 20)
  cfg = mf.ALSConfig(dim=5, reg=0.3, alpha=2.0, iters=6, init_scale=0.5)
  res = mf.train_als(train, 20, cfg, progress=lambda _: None)
  losses = [e["loss"] for e in res.log]
  want = _objective(res.user_emb.astype(float), res.item_emb.astype(float), r, 2.0, 0.3)
  assert losses[-1] == pytest.approx(want, rel=1e-4)
  assert all(b <= a * (1 + 1e-5) for a, b in zip(losses, losses[1:], strict=False)), losses


def test_deterministic_and_seed_dependent():
  train = _toy_train(num_users=20, num_items=15, seed=4)
  cfg = mf.ALSConfig(dim=4, iters=3, init_scale=0.3)
  a = mf.train_als(train, 15, cfg, progress=lambda _: None)
  b = mf.train_als(train, 15, cfg, progress=lambda _: None)
  c = mf.train_als(train, 15, mf.ALSConfig(dim=4, iters=3, init_scale=0.3, seed=1),
                   progress=lambda _: None)
  np.testing.assert_array_equal(a.user_emb, b.user_emb)
  np.testing.assert_array_equal(a.item_emb, b.item_emb)
  assert not np.allclose(a.item_emb, c.item_emb)


def test_early_stopping_keeps_best_validation():
  train = _toy_train(num_users=20, num_items=15, seed=5)
  scores = iter([0.1, 0.3, 0.2, 0.25, 0.9])
  snapshots = []

  def valid_fn(x, y):
    snapshots.append(np.array(y))
    return {"hr@10": 0.0, "ndcg@10": next(scores)}

  cfg = mf.ALSConfig(dim=4, iters=5, patience=2, init_scale=0.3)
  res = mf.train_als(train, 15, cfg, valid_fn=valid_fn, progress=lambda _: None)
  assert res.best_iter == 2 and len(res.log) == 4  # stopped before the 0.9
  np.testing.assert_array_equal(res.item_emb, snapshots[1])
  assert res.log[1]["valid_ndcg@10"] == 0.3


def test_fold_in_is_a_user_half_step():
  train = _toy_train()
  y = np.random.default_rng(6).normal(size=(13, 4)).astype(np.float32)
  cfg = mf.ALSConfig(dim=4, alpha=3.0, reg=0.5)
  np.testing.assert_allclose(mf.fold_in(y, train, cfg),
                             _numpy_half_step(y.astype(float), _dense_counts(train, 13), 3.0, 0.5),
                             rtol=1e-4, atol=1e-5)


def test_embeddings_round_trip(tmp_path):
  rng = np.random.default_rng(7)
  u, i = rng.normal(size=(3, 4)), rng.normal(size=(5, 4))
  path = mf.save_embeddings(tmp_path / "cf" / "embeddings.npz", u, i, ["u1", "u2", "u3"],
                            list("abcde"), {"dataset": "toy", "reg": 0.5})
  assert [p.name for p in path.parent.iterdir()] == ["embeddings.npz"]  # no temp left over
  emb = mf.load_embeddings(path)
  np.testing.assert_array_equal(emb.user_emb, u.astype(np.float32))
  np.testing.assert_array_equal(emb.item_emb, i.astype(np.float32))
  assert emb.user_emb.dtype == np.float32
  assert emb.item_ids.tolist() == list("abcde") and emb.user_ids.tolist() == ["u1", "u2", "u3"]
  assert emb.config == {"dataset": "toy", "reg": 0.5}
  ds = types.RecDataset(name="toy", item_ids=np.array(list("abcde")),
                        user_ids=np.array(["u1", "u2", "u3"]), sequences=[], item_text=[],
                        item_titles=[])
  emb.check_matches(ds)
  with pytest.raises(ValueError, match="item"):
    emb.check_matches(types.RecDataset(name="toy", item_ids=np.array(list("abcdf")),
                                       user_ids=ds.user_ids, sequences=[], item_text=[],
                                       item_titles=[]))
  with pytest.raises(ValueError, match="do not match"):
    mf.save_embeddings(tmp_path / "bad.npz", u, i, ["u1"], list("abcde"), {})


def test_unknown_setting_rejected():
  with pytest.raises(ValueError, match="valid"):
    mf.ALSConfig.from_mapping({"dim": 8, "lr": 0.1})
