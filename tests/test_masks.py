"""Truth tables for every mask builder in ilm_jax.masks (hand-written expected values)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ilm_jax import masks

T, F = True, False


def _eq(actual, expected):
  actual = np.asarray(actual)
  assert actual.dtype == bool
  np.testing.assert_array_equal(actual, np.array(expected, bool))


def test_padding_and_key_masks():
  _eq(masks.padding_mask(jnp.array([1, 3, 0]), 3), [[T, F, F], [T, T, T], [F, F, F]])
  _eq(masks.key_mask(jnp.array([[1, 1, 0]])), [[[T, T, F]]])
  _eq(masks.text_mask(jnp.array([[T, F]])), [[[T, F]]])
  _eq(masks.query_mask(2, 3), [[[T, T, T]], [[T, T, T]]])
  _eq(masks.memory_mask(None, 1, 2), [[[T, T]]])
  _eq(masks.memory_mask(jnp.array([[T, F]]), 1, 2), [[[T, F]]])


def test_joint_mask():
  # K=2 queries, L=3 text tokens, last one padded: everyone sees q q t0 t1.
  _eq(masks.joint_mask(2, jnp.array([[T, T, F]])), [[[T, T, T, T, F]]])


def test_causal_mask():
  _eq(masks.causal_mask(3), [[T, F, F], [T, T, F], [T, T, T]])


def test_unilm_mask_matches_module_docstring_picture():
  got = masks.unilm_mask(2, jnp.array([[T, T, F], [T, T, T]]))
  assert got.shape == (2, 5, 5)
  _eq(got[0], [
      # q  q  t0 t1 t2
      [T, T, F, F, F],  # q
      [T, T, F, F, F],  # q
      [T, T, T, F, F],  # t0
      [T, T, T, T, F],  # t1
      [T, T, T, T, F],  # t2 (padding row: still defined, sees the valid prefix)
  ])
  _eq(got[1, 4], [T, T, T, T, T])


def test_unilm_mask_without_queries_is_causal():
  _eq(masks.unilm_mask(0, jnp.ones((1, 3), bool))[0], masks.causal_mask(3))


def test_false_negative_mask_same_user_or_same_item():
  # rows = users (7, 7, 8), cols = items (1, 2, 1).
  got = masks.false_negative_mask(jnp.array([7, 7, 8]), jnp.array([1, 2, 1]))
  _eq(got, [
      [F, T, T],  # (7,1): col 1 same user, col 2 same item
      [T, F, F],  # (7,2): col 0 same user
      [T, F, F],  # (8,1): col 0 same item
  ])


def test_false_negative_mask_shared_id_space_and_transpose():
  # item-item pairs (a, b): (1, 2), (2, 3), (4, 5)
  a, b = jnp.array([1, 2, 4]), jnp.array([2, 3, 5])
  _eq(masks.false_negative_mask(a, b), np.zeros((3, 3), bool))
  got = masks.false_negative_mask(a, b, shared_id_space=True)
  # row 1 (anchor a=2) vs col 0 (b=2): the anchor itself -> masked.
  _eq(got, [[F, F, F], [T, F, F], [F, F, F]])
  # reverse direction b->a uses the transpose: row 0 (b=2) vs col 1 (a=2) masked.
  _eq(got.T[0], [F, T, F])


def test_false_negative_mask_diagonal_never_set():
  got = masks.false_negative_mask(jnp.array([3, 3]), jnp.array([3, 3]), shared_id_space=True)
  _eq(got, [[F, T], [T, F]])
