"""Losses against straightforward numpy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ilm_jax import losses, masks

RTOL, ATOL = 1e-5, 1e-6


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _np_infonce_rows(logits, fn, eps):
  """Loop-per-row reference: drop false-negative columns, CE to the diagonal."""
  out = []
  for i in range(logits.shape[0]):
    keep = [j for j in range(logits.shape[1]) if j == i or not fn[i, j]]
    lp = _np_log_softmax(logits[i, keep])
    pos = keep.index(i)
    target = np.full(len(keep), eps / len(keep))
    target[pos] += 1 - eps
    out.append(-(target * lp).sum())
  return np.mean(out)


def _np_symmetric(logits, fn, eps=0.0):
  return (_np_infonce_rows(logits, fn, eps) + _np_infonce_rows(logits.T, fn.T, eps)) / 2


@pytest.fixture
def feats():
  rng = np.random.default_rng(0)
  b, k, d = 5, 3, 8
  item = _unit(rng.normal(size=(b, k, d))).astype(np.float32)
  text = _unit(rng.normal(size=(b, d))).astype(np.float32)
  return item, text


def test_itc_logits_is_max_over_queries(feats):
  item, text = feats
  temp = 0.07
  expected = np.zeros((item.shape[0], text.shape[0]), np.float32)
  for i in range(item.shape[0]):
    for j in range(text.shape[0]):
      expected[i, j] = max(item[i, q] @ text[j] for q in range(item.shape[1])) / temp
  np.testing.assert_allclose(losses.itc_logits(item, text, temp), expected, rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize("num_axes", [1, 2])
def test_max_over_sends_the_whole_gradient_to_the_first_argmax(num_axes):
  """As ``torch.max(dim)`` (LAVIS ``sim_q2t.max(-1)``), ties included: ``jnp.max`` would
  split a tie's gradient, and divides by the number of elements equal to the max (0 -> NaN
  when a GPU fusion's copy of the input differs from the one the max came from)."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(3, 4, 2, 3)).astype(np.float32)
  x[0, 0] = 5.0  # a tie over every reduced element
  x[1, 2, 1, :2] = 7.0  # a tie of two
  ct = rng.normal(size=(3, 4) if num_axes == 2 else (3, 4, 2)).astype(np.float32)
  y, pullback = jax.vjp(lambda v: losses.max_over(v, num_axes), jnp.asarray(x))
  flat = x.reshape(*ct.shape, -1)
  np.testing.assert_array_equal(y, flat.max(-1))
  expected = np.zeros_like(flat)
  np.put_along_axis(expected, flat.argmax(-1)[..., None], ct[..., None], axis=-1)
  np.testing.assert_array_equal(pullback(jnp.asarray(ct))[0], expected.reshape(x.shape))


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("with_fn", [False, True])
def test_itc_loss(feats, eps, with_fn):
  item, text = feats
  sim = np.asarray(losses.itc_logits(item, text, 0.1))
  ids = np.array([0, 1, 0, 2, 3])  # rows 0 and 2 are the same item
  fn = np.asarray(masks.false_negative_mask(ids, np.arange(5))) if with_fn else np.zeros((5, 5),
                                                                                            bool)
  loss, metrics = losses.itc_loss(jnp.asarray(sim), jnp.asarray(fn) if with_fn else None, eps)
  np.testing.assert_allclose(loss, _np_symmetric(sim, fn, eps), rtol=RTOL, atol=ATOL)
  assert fn.any() == with_fn
  masked = np.where(fn, -np.inf, sim)
  np.testing.assert_allclose(metrics["itc_acc_i2t"], np.mean(masked.argmax(1) == np.arange(5)))
  np.testing.assert_allclose(metrics["itc_acc_t2i"], np.mean(masked.T.argmax(1) == np.arange(5)))


def test_false_negatives_change_the_loss_and_keep_grads_finite(feats):
  item, text = feats
  fn = masks.false_negative_mask(jnp.array([0, 1, 0, 2, 3]), jnp.arange(5))
  f = lambda it: losses.itc_loss(losses.itc_logits(it, text, 0.1), fn)[0]  # noqa: E731
  g = jax.grad(f)(jnp.asarray(item))
  assert np.isfinite(np.asarray(g)).all()
  sim = losses.itc_logits(item, text, 0.1)
  assert not np.isclose(losses.itc_loss(sim, fn)[0], losses.itc_loss(sim)[0])


def test_pair_loss_max_over_query_pairs():
  rng = np.random.default_rng(1)
  a = _unit(rng.normal(size=(4, 2, 6))).astype(np.float32)
  b = _unit(rng.normal(size=(4, 3, 6))).astype(np.float32)
  expected = np.array([[max(a[i, k] @ b[j, m] for k in range(2) for m in range(3))
                        for j in range(4)] for i in range(4)]) / 0.05
  sim = losses.pair_logits(a, b, 0.05)
  np.testing.assert_allclose(sim, expected, rtol=RTOL, atol=1e-4)
  fn = np.asarray(masks.false_negative_mask(np.array([5, 6, 7, 8]), np.array([6, 9, 9, 1]),
                                            shared_id_space=True))
  assert fn.any()
  loss, m = losses.pair_loss(sim, jnp.asarray(fn), name="ii")
  np.testing.assert_allclose(loss, _np_symmetric(np.asarray(sim), fn), rtol=RTOL, atol=ATOL)
  assert set(m) == {"ii_acc_a2b", "ii_acc_b2a"}


def test_pair_loss_logq_correction():
  """Each direction's candidates lose their own log q: row i -> columns j use
  logits[i, j] - log_q_cols[j]; column j -> rows i use logits[i, j] - log_q_rows[i]."""
  rng = np.random.default_rng(2)
  sim = rng.normal(size=(5, 5)).astype(np.float32) * 3
  fn = np.zeros((5, 5), bool)
  fn[0, 3] = fn[3, 0] = True
  lq_rows = np.log(rng.dirichlet(np.ones(5))).astype(np.float32)
  lq_cols = np.log(rng.dirichlet(np.ones(5))).astype(np.float32)
  loss, _ = losses.pair_loss(jnp.asarray(sim), jnp.asarray(fn),
                             log_q=(jnp.asarray(lq_rows), jnp.asarray(lq_cols)))
  expected = (_np_infonce_rows(sim - lq_cols[None, :], fn, 0.0)
              + _np_infonce_rows(sim.T - lq_rows[None, :], fn.T, 0.0)) / 2
  np.testing.assert_allclose(loss, expected, rtol=RTOL, atol=ATOL)
  # A constant log q (every entity equally likely) changes nothing.
  same, _ = losses.pair_loss(jnp.asarray(sim), jnp.asarray(fn),
                             log_q=(jnp.full(5, -2.0), jnp.full(5, -7.0)))
  np.testing.assert_allclose(same, losses.pair_loss(jnp.asarray(sim), jnp.asarray(fn))[0],
                             rtol=1e-6)


def test_itm_negatives_never_positive_or_false_negative():
  b = 6
  rng = np.random.default_rng(2)
  # Heavy diagonal (the positive would be drawn almost always if it were allowed) and a
  # heavy false negative at (0, 1) / (1, 0).
  sim = rng.normal(size=(b, b)).astype(np.float32) + 50 * np.eye(b, dtype=np.float32)
  sim[0, 1] = sim[1, 0] = 50.0
  fn = np.zeros((b, b), bool)
  fn[0, 1] = fn[1, 0] = True
  keys = jax.random.split(jax.random.key(0), 500)
  pairs = jax.vmap(lambda k: losses.sample_itm_negatives(k, sim, jnp.asarray(fn)))(keys)
  item_idx = np.asarray(pairs.item_idx)
  text_idx = np.asarray(pairs.text_idx)
  ar = np.arange(b)
  np.testing.assert_array_equal(item_idx[:, :b], np.broadcast_to(ar, (500, b)))
  np.testing.assert_array_equal(text_idx[:, :2 * b], np.broadcast_to(np.tile(ar, 2), (500, 2 * b)))
  np.testing.assert_array_equal(item_idx[:, 2 * b:], np.broadcast_to(ar, (500, b)))
  np.testing.assert_array_equal(pairs.labels[0], [1] * b + [0] * 2 * b)
  np.testing.assert_array_equal(pairs.weights[0], np.ones(3 * b))
  neg_item = item_idx[:, b:2 * b]  # negative item for text t
  neg_text = text_idx[:, 2 * b:]  # negative text for item i
  assert not (neg_item == ar).any() and not (neg_text == ar).any()
  assert not (neg_item[:, 0] == 1).any() and not (neg_item[:, 1] == 0).any()
  assert not (neg_text[:, 0] == 1).any() and not (neg_text[:, 1] == 0).any()


def test_itm_negatives_follow_the_itc_softmax():
  sim = np.array([[0.0, 2.0, 0.0, -1.0],
                  [0.0, 0.0, 0.0, 0.0],
                  [1.0, 0.0, 0.0, 0.0],
                  [0.0, 0.0, 0.0, 0.0]], np.float32)
  n = 20000
  keys = jax.random.split(jax.random.key(1), n)
  pairs = jax.vmap(lambda k: losses.sample_itm_negatives(k, sim))(keys)
  neg_text_for_item0 = np.asarray(pairs.text_idx)[:, 8]
  w = np.exp(sim[0]) / np.exp(sim[0]).sum() + 1e-4
  w[0] = 0.0
  w /= w.sum()
  freq = np.bincount(neg_text_for_item0, minlength=4) / n
  np.testing.assert_allclose(freq, w, atol=0.015)
  neg_item_for_text0 = np.asarray(pairs.item_idx)[:, 4]  # column 0 of sim (texts' view)
  w = np.exp(sim[:, 0]) / np.exp(sim[:, 0]).sum() + 1e-4
  w[0] = 0.0
  w /= w.sum()
  np.testing.assert_allclose(np.bincount(neg_item_for_text0, minlength=4) / n, w, atol=0.015)


def test_itm_no_usable_negative_gets_zero_weight():
  fn = masks.false_negative_mask(jnp.array([4, 4]), jnp.array([0, 1]))  # same item twice
  pairs = losses.sample_itm_negatives(jax.random.key(0), jnp.zeros((2, 2)), fn)
  np.testing.assert_array_equal(pairs.weights, [1, 1, 0, 0, 0, 0])


def test_itm_loss():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(6, 2)).astype(np.float32)
  labels = np.array([1, 1, 0, 0, 0, 0])
  w = np.array([1, 1, 1, 0, 1, 1], np.float32)
  nll = -_np_log_softmax(logits)[np.arange(6), labels]
  loss, m = losses.itm_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(w))
  np.testing.assert_allclose(loss, (nll * w).sum() / w.sum(), rtol=RTOL)
  np.testing.assert_allclose(m["itm_acc"], ((logits.argmax(1) == labels) * w).sum() / w.sum())
  loss1, _ = losses.itm_loss(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(loss1, nll.mean(), rtol=RTOL)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_masked_lm_loss(eps):
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, size=(2, 5))
  mask = np.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], bool)  # e.g. answer tokens only
  lp = _np_log_softmax(logits)
  per = []
  for b in range(2):
    for t in range(5):
      if mask[b, t]:
        q = np.full(7, eps / 7)
        q[targets[b, t]] += 1 - eps
        per.append(-(q * lp[b, t]).sum())
  loss, m = losses.masked_lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask),
                                  eps)
  np.testing.assert_allclose(loss, np.mean(per), rtol=RTOL)
  assert m["tokens"] == mask.sum()
  np.testing.assert_allclose(m["acc"], (logits.argmax(-1) == targets)[mask].mean())


def test_itg_loss_shifts_and_ignores_padding():
  ids = np.array([[30522, 5, 6, 102, 0, 0], [30522, 7, 102, 0, 0, 0]])
  valid = ids != 0
  v = 30523
  # Perfect next-token logits at real positions, garbage at padded ones.
  logits = np.full((2, 6, v), -5.0, np.float32)
  for b in range(2):
    for t in range(5):
      logits[b, t, ids[b, t + 1]] = 5.0
  logits[:, :, 0] = np.where(valid, -5.0, 100.0)  # padding targets would look "right"
  loss, m = losses.itg_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(valid))
  assert m["itg_tokens"] == 3 + 2  # targets 5 6 102 and 7 102
  assert m["itg_acc"] == 1.0
  lp = _np_log_softmax(logits)
  expected = np.mean([-lp[0, 0, 5], -lp[0, 1, 6], -lp[0, 2, 102], -lp[1, 0, 7], -lp[1, 1, 102]])
  np.testing.assert_allclose(loss, expected, rtol=RTOL)
