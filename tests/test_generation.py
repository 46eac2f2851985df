"""Generation contracts: decoding equals teacher forcing; beam searches equal brute force.

A stub bigram "LM" (next-token logits = table[previous token]) gives known
probabilities, so every allowed string's log-probability can be enumerated; the tiny
random Llama checks the same through the real KV cache and beam reordering.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ilm_jax import generation as gen
from ilm_jax.models import llm

END = 2


class Bigram(nnx.Module):
  """logits[t] = one_hot(token[t]) @ table; embeddings are one-hot rows (so soft prompts work)."""

  def __init__(self, table: np.ndarray, eos: int = END, pad: int = 0):
    v = table.shape[0]
    self.table = nnx.Param(jnp.asarray(table, jnp.float32))
    self.config = llm.LlmConfig.tiny(vocab=v, eos_ids=(eos,), pad_id=pad)

  def init_cache(self, batch, max_len):
    return llm.KVCache(k=(), v=(), valid=jnp.zeros((batch, max_len), bool),
                       index=jnp.zeros((), jnp.int32))

  def embed(self, tokens):
    return jax.nn.one_hot(tokens, self.config.vocab)

  def logits(self, hidden):
    return hidden @ self.table[...]

  def __call__(self, input_embeds=None, *, tokens=None, mask=None, cache=None,
               compute_logits=True, positions=None):
    del positions
    h = self.embed(tokens) if input_embeds is None else input_embeds
    if cache is not None:
      m = jnp.ones(h.shape[:2], bool) if mask is None else mask
      cache = cache.replace(
          valid=jax.lax.dynamic_update_slice_in_dim(cache.valid, m, cache.index, axis=1),
          index=cache.index + h.shape[1])
    return (self.logits(h) if compute_logits else None), h, cache


def _bigram_logprob(table, first_logits, seq):
  lp = jax.nn.log_softmax(jnp.asarray(first_logits))[seq[0]]
  for prev, nxt in itertools.pairwise(seq):
    lp += jax.nn.log_softmax(jnp.asarray(table[prev]))[nxt]
  return float(lp)


def _items(rng, n, vocab, max_len, lo=3):
  seen, out = set(), []
  while len(out) < n:
    s = tuple(rng.integers(lo, vocab, rng.integers(1, max_len + 1)).tolist())
    if s not in seen:
      seen.add(s)
      out.append(list(s))
  return out


def _check_ranking(out_items, out_scores, brute, allowed, exhaustive):
  """out_*: [K]; brute: score per item; allowed: bool[n]."""
  items, scores = np.asarray(out_items), np.asarray(out_scores)
  found = items >= 0
  assert np.all(allowed[items[found]]), "a disallowed item was returned"
  assert len(set(items[found].tolist())) == found.sum()
  assert np.all(np.diff(scores[found]) <= 1e-6), "not ranked by score"
  np.testing.assert_allclose(scores[found], brute[items[found]], rtol=1e-5, atol=1e-5)
  if exhaustive:
    want = np.nonzero(allowed)[0]
    assert set(items[found].tolist()) == set(want.tolist())
    order = want[np.argsort(-brute[want], kind="stable")]
    # Same order wherever the brute-force scores are not near-ties.
    gaps = np.diff(brute[order]) < -1e-4
    for r in np.nonzero(gaps)[0]:
      assert items[r] == order[r] or abs(brute[items[r]] - brute[order[r]]) < 1e-4
    assert np.all(~found[len(want):])


# ------------------------------------------------------------------ trie


def test_trie_walk_matches_sequences():
  rng = np.random.default_rng(0)
  seqs = _items(rng, 200, 9, 5)
  trie = gen.ItemTrie.build(seqs, end_id=END)
  first, count, token, lo = (np.asarray(a) for a in (trie.first_child, trie.num_children,
                                                     trie.token, trie.lo))
  for idx, s in enumerate(seqs):
    node = 0
    for t in s + [END]:
      kids = range(first[node], first[node] + count[node])
      (node,) = [k for k in kids if token[k] == t]
    assert count[node] == 0
    assert int(trie.order[lo[node]]) == idx
  assert trie.depth == max(map(len, seqs)) + 1
  assert trie.max_children == max(count)


def test_trie_rejects_prefixes_and_duplicates():
  with pytest.raises(ValueError, match="prefix"):
    gen.ItemTrie.build([[5, 6], [5, 6, 7]])
  with pytest.raises(ValueError, match="duplicate"):
    gen.ItemTrie.build([[5, 6], [4], [5, 6]], end_id=END)
  trie = gen.ItemTrie.build([[5, 6], [5, 6, 7]], end_id=END)
  assert trie.num_items == 2 and trie.depth == 4


# ------------------------------------------------------------------ constrained beam search


@pytest.fixture(scope="module")
def bigram():
  rng = np.random.default_rng(1)
  table = 2.0 * rng.standard_normal((12, 12)).astype(np.float32)
  return Bigram(table), table


@pytest.mark.parametrize("beam", [64, 4])
def test_constrained_beam_search_matches_brute_force(bigram, beam):
  model, table = bigram
  rng = np.random.default_rng(2)
  seqs = _items(rng, 40, 12, 4)
  trie = gen.ItemTrie.build(seqs, end_id=END)
  prompts = [[3, 4, 5], [7], [9, 10, 11, 6]]
  allowed = rng.random((3, len(seqs))) < 0.6
  allowed[0] = True
  tokens, mask = gen.pad_prompts(prompts, pad_id=0)
  out = gen.constrained_beam_search(model, trie, tokens=tokens, mask=mask, allowed=allowed,
                                    beam_size=beam)
  assert out.items.shape == (3, beam)
  for b, p in enumerate(prompts):
    brute = np.array([_bigram_logprob(table, table[p[-1]], s + [END]) for s in seqs])
    _check_ranking(out.items[b], out.scores[b], brute, allowed[b], exhaustive=beam >= len(seqs))
    for k in range(beam):
      i = int(out.items[b, k])
      if i >= 0:
        length = int(out.lengths[b, k])
        assert np.asarray(out.tokens[b, k, :length]).tolist() == seqs[i] + [END]


def test_constrained_beam_search_soft_prompt_and_length_penalty(bigram):
  model, table = bigram
  seqs = [[3], [3, 4, 5], [6, 7], [8, 9, 10, 11]]
  trie = gen.ItemTrie.build(seqs, end_id=END)
  soft = np.zeros((1, 2, 12), np.float32)
  soft[0, 0, 3] = 1.0
  soft[0, 1] = np.linspace(-1, 1, 12)  # a "soft token": a mixture row, not a vocab item
  first = soft[0, 1] @ table
  for alpha in (0.0, 1.0):
    out = gen.constrained_beam_search(model, trie, input_embeds=soft, beam_size=4,
                                      length_penalty=alpha)
    raw = np.array([_bigram_logprob(table, first, s + [END]) for s in seqs])
    brute = raw / np.array([len(s) + 1 for s in seqs]) ** alpha
    _check_ranking(out.items[0], out.scores[0], brute, np.ones(4, bool), exhaustive=True)


@pytest.fixture(scope="module")
def tiny_llm():
  return llm.Llm(llm.LlmConfig.tiny(vocab=48), rngs=nnx.Rngs(3))


def test_constrained_beam_search_real_decoder_matches_teacher_forcing(tiny_llm):
  """Tiny random Llama: KV cache + beam reordering versus full forwards per item."""
  model = tiny_llm
  rng = np.random.default_rng(4)
  seqs = _items(rng, 12, 48, 3)
  trie = gen.ItemTrie.build(seqs, end_id=END)
  prompts = [[5, 6, 7, 8, 9], [10, 11]]
  allowed = np.ones((2, len(seqs)), bool)
  allowed[1, ::3] = False
  tokens, mask = gen.pad_prompts(prompts, pad_id=0)
  embeds = model.embed(jnp.asarray(tokens))
  out = gen.constrained_beam_search(model, trie, input_embeds=embeds, mask=mask,
                                    allowed=allowed, beam_size=len(seqs))
  fwd = nnx.jit(lambda m, t: m(tokens=t)[0])
  for b, p in enumerate(prompts):
    # One right-padded batch of prompt + item + END (causal: padding cannot leak back).
    full, _ = gen.pad_prompts([p + s + [END] for s in seqs], pad_id=0, side="right")
    lp = np.asarray(jax.nn.log_softmax(fwd(model, jnp.asarray(full))))
    brute = [sum(lp[i, len(p) - 1 + j, t] for j, t in enumerate(s + [END]))
             for i, s in enumerate(seqs)]
    _check_ranking(out.items[b], out.scores[b], np.array(brute), allowed[b], exhaustive=True)


# ------------------------------------------------------------------ generate / beam search


def test_greedy_matches_teacher_forced_argmax(tiny_llm):
  model = tiny_llm
  prompts = [[5, 6, 7, 8], [9, 10]]
  tokens, mask = gen.pad_prompts(prompts, pad_id=0, side="right")
  n = 6
  out = gen.generate(model, tokens=tokens, mask=mask, max_new_tokens=n, stop_ids=(47,))
  out_e = gen.generate(model, input_embeds=model.embed(jnp.asarray(tokens)), mask=mask,
                       max_new_tokens=n, stop_ids=(47,))
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(out_e.tokens))
  fwd = nnx.jit(lambda m, t: m(tokens=t)[0])
  for b, p in enumerate(prompts):
    seq, lp_sum = list(p), 0.0
    for _ in range(n):
      padded = np.zeros((1, len(p) + n), np.int32)  # fixed shape: one compilation
      padded[0, :len(seq)] = seq
      logits = fwd(model, jnp.asarray(padded))[0, len(seq) - 1]
      seq.append(int(jnp.argmax(logits)))
      lp_sum += float(jax.nn.log_softmax(logits)[seq[-1]])
      if seq[-1] == 47:
        break
    got = np.asarray(out.tokens[b, :int(out.lengths[b])]).tolist()
    assert got == seq[len(p):]
    np.testing.assert_allclose(float(out.logprobs[b]), lp_sum, rtol=1e-5, atol=1e-5)


def test_generate_stops_at_eos_and_pads():
  table = np.full((6, 6), -5.0, np.float32)
  table[3, 4] = table[4, 5] = table[5, END] = 5.0  # 3 -> 4 -> 5 -> END
  table[END, 3] = 5.0
  model = Bigram(table, pad=0)
  out = gen.generate(model, tokens=np.array([[3], [4]]), max_new_tokens=6)
  np.testing.assert_array_equal(np.asarray(out.tokens), [[4, 5, END, 0, 0, 0],
                                                         [5, END, 0, 0, 0, 0]])
  np.testing.assert_array_equal(np.asarray(out.lengths), [3, 2])
  assert np.all(np.asarray(out.stopped))


def test_sample_logits_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.key(0)
  greedy = gen.sample_logits(logits, keys, temperature=0.0)
  assert np.all(np.asarray(greedy) == 0)
  assert np.all(np.asarray(gen.sample_logits(logits, keys, temperature=1.0, top_k=1)) == 0)
  s = np.asarray(gen.sample_logits(logits, keys, temperature=1.0, top_p=0.6))
  assert set(s.tolist()) == {0, 1}  # 0.5 < 0.6 needs the second token, never the third
  assert abs((s == 0).mean() - 0.5 / 0.8) < 0.03
  s = np.asarray(gen.sample_logits(logits, keys, temperature=1.0))
  np.testing.assert_allclose(np.bincount(s, minlength=4) / len(s), [0.5, 0.3, 0.15, 0.05],
                             atol=0.03)


def test_beam_search_matches_brute_force(bigram):
  rng = np.random.default_rng(6)
  v, stop, n = 4, 3, 3
  table = 1.5 * rng.standard_normal((v, v)).astype(np.float32)
  model = Bigram(table, eos=stop, pad=0)
  # Every continuation: stop ends it early; otherwise it has n tokens.
  hyps = []
  for length in range(1, n + 1):
    for seq in itertools.product(range(v), repeat=length):
      if stop not in seq[:-1] and (seq[-1] == stop or length == n):
        hyps.append(list(seq))
  prompt = [1]
  brute = sorted(((_bigram_logprob(table, table[prompt[-1]], h), h) for h in hyps),
                 key=lambda x: -x[0])
  k = 8
  out = gen.beam_search(model, tokens=np.array([prompt]), beam_size=len(hyps), max_new_tokens=n)
  got = [(float(out.scores[0, i]), np.asarray(out.tokens[0, i, :int(out.lengths[0, i])]).tolist())
         for i in range(len(hyps))]
  np.testing.assert_allclose([g[0] for g in got], [b[0] for b in brute], rtol=1e-5, atol=1e-5)
  assert [g[1] for g in got[:k]] == [b[1] for b in brute[:k]]
  small = gen.beam_search(model, tokens=np.array([prompt]), beam_size=2, max_new_tokens=n)
  for i in range(2):
    seq = np.asarray(small.tokens[0, i, :int(small.lengths[0, i])]).tolist()
    assert seq in hyps
    np.testing.assert_allclose(float(small.scores[0, i]),
                               _bigram_logprob(table, table[prompt[-1]], seq), rtol=1e-5)
