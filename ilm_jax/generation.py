"""Text generation with the frozen LLM: jitted prefill + KV-cache decode, static shapes.

* ``generate``: greedy (temperature 0) or temperature / top-k / top-p sampling.
* ``beam_search``: plain beam search.
* ``constrained_beam_search``: beam search restricted to a set of token sequences
  (``ItemTrie``, e.g. every catalogue item string) with a per-example allowed set
  (e.g. all items minus the user's history) -- the OpenP5 ranking protocol.

Every entry point takes the prompt as ``tokens: int[B, T]`` or ``input_embeds:
float[B, T, D]`` (soft tokens already spliced in) plus ``mask: bool[B, T]`` (left or
right padding both work: positions count real tokens only). The model is any NNX module
with the ``llm.Llm`` interface: ``model(input_embeds, tokens=, mask=, cache=,
compute_logits=)``, ``model.logits(hidden)`` and ``model.init_cache(batch, max_len)``.

Beam scores are sums of the model's full-vocabulary log-probabilities (the constraint
masks tokens after the log-softmax, as Hugging Face's prefix-constrained beam search
does). A finished beam keeps its slot with its final score, so with beam_size at least
the number of allowed sequences the search is exhaustive.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

NEG_INF = -jnp.inf


# ------------------------------------------------------------------ prompts


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, side: str = "left",
                multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Pads token-id prompts into a batch.

  Args:
    prompts: B lists of ids.
    pad_id: filler id (masked out anyway).
    side: 'left' (usual for generation) or 'right'.
    multiple: the length is rounded up to a multiple of this, to reuse compilations.

  Returns:
    (tokens int32[B, T], mask bool[B, T]).
  """
  if side not in ("left", "right"):
    raise ValueError(f"side={side!r}; expected 'left' or 'right'")
  t = max(len(p) for p in prompts)
  t = -(-t // multiple) * multiple
  tokens = np.full((len(prompts), t), pad_id, np.int32)
  mask = np.zeros((len(prompts), t), bool)
  for i, p in enumerate(prompts):
    sl = slice(t - len(p), t) if side == "left" else slice(0, len(p))
    tokens[i, sl] = p
    mask[i, sl] = True
  return tokens, mask


def _prefill(model, tokens, input_embeds, mask, max_len):
  """Runs the prompt; returns (float32[B, V] logits after the last real token, cache)."""
  x = tokens if input_embeds is None else input_embeds
  b, t = x.shape[:2]
  if mask is None:
    mask = jnp.ones((b, t), bool)
  cache = model.init_cache(b, max_len)
  _, hidden, cache = model(input_embeds, tokens=tokens, mask=mask, cache=cache,
                           compute_logits=False)
  last = jnp.max(jnp.where(mask, jnp.arange(t), -1), axis=1)
  return model.logits(hidden[jnp.arange(b), last]), cache


def _prompt_len(tokens, input_embeds) -> int:
  return (tokens if input_embeds is None else input_embeds).shape[1]


# ------------------------------------------------------------------ sampling


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float = 0.0,
                  top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """int32[B] next tokens from float32[B, V] logits.

  temperature 0 is greedy (argmax); otherwise logits / temperature, keeping the top_k
  tokens (0 = all) and the smallest set whose probability reaches top_p.
  """
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token while the mass *before* it is below top_p (the first always stays).
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = before < top_p
    cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, NEG_INF, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@flax.struct.dataclass
class GenerateOutput:
  """Result of ``generate``.

  Attributes:
    tokens: int32[B, N] generated ids; pad_id after a stop token.
    lengths: int32[B] generated tokens per row, the stop token included.
    logprobs: float32[B] sum of the model's log-probabilities of the generated tokens.
    stopped: bool[B] the row ended with a stop token.
  """
  tokens: jax.Array
  lengths: jax.Array
  logprobs: jax.Array
  stopped: jax.Array


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "max_new_tokens", "temperature", "top_k", "top_p", "stop_ids", "pad_id"))
def _generate(graphdef, state, tokens, input_embeds, mask, rng, *, max_new_tokens, temperature,
              top_k, top_p, stop_ids, pad_id):
  model = nnx.merge(graphdef, state)
  t = _prompt_len(tokens, input_embeds)
  logits, cache = _prefill(model, tokens, input_embeds, mask, t + max_new_tokens)
  b = logits.shape[0]
  stops = jnp.asarray(stop_ids, jnp.int32)

  def cond(carry):
    step, _, _, _, done, *_ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    step, cache, logits, out, done, lengths, lp_sum, rng = carry
    rng, sub = jax.random.split(rng)
    tok = sample_logits(logits, sub, temperature, top_k, top_p)
    tok = jnp.where(done, pad_id, tok)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits), tok[:, None], axis=1)[:, 0]
    lp_sum = lp_sum + jnp.where(done, 0.0, lp)
    lengths = lengths + (~done).astype(jnp.int32)
    out = out.at[:, step].set(tok)
    done = done | jnp.isin(tok, stops)
    logits, _, cache = model(tokens=tok[:, None], cache=cache)
    return step + 1, cache, logits[:, 0], out, done, lengths, lp_sum, rng

  init = (jnp.zeros((), jnp.int32), cache, logits, jnp.full((b, max_new_tokens), pad_id, jnp.int32),
          jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.float32), rng)
  _, _, _, out, done, lengths, lp_sum, _ = jax.lax.while_loop(cond, body, init)
  return GenerateOutput(tokens=out, lengths=lengths, logprobs=lp_sum, stopped=done)


def generate(model: nnx.Module, *, tokens=None, input_embeds=None, mask=None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, stop_ids: Sequence[int] | None = None, pad_id: int | None = None,
             rng: jax.Array | None = None) -> GenerateOutput:
  """Generates up to ``max_new_tokens`` per row; a row stops at its first stop token.

  Args:
    model: an ``llm.Llm`` (or anything with its interface).
    tokens: int[B, T] prompt ids, or
    input_embeds: float[B, T, D] prompt embeddings.
    mask: bool[B, T] real prompt tokens (default all).
    max_new_tokens: N.
    temperature, top_k, top_p: sampling controls (temperature 0 = greedy).
    stop_ids: ids that end a row (default ``model.config.eos_ids``).
    pad_id: filler after a stop (default ``model.config.pad_id``).
    rng: PRNG key for sampling (default key 0).

  Returns:
    GenerateOutput.
  """
  stop_ids, pad_id = _defaults(model, stop_ids, pad_id)
  graphdef, state = nnx.split(model)
  rng = jax.random.key(0) if rng is None else rng
  return _generate(graphdef, state, _arr(tokens), _arr(input_embeds), _arr(mask), rng,
                   max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                   top_k=int(top_k), top_p=float(top_p), stop_ids=stop_ids, pad_id=pad_id)


def _arr(x):
  return None if x is None else jnp.asarray(x)


def _defaults(model, stop_ids, pad_id):
  cfg = getattr(model, "config", None)
  if stop_ids is None:
    stop_ids = cfg.eos_ids
  if pad_id is None:
    pad_id = cfg.pad_id
  return tuple(int(i) for i in stop_ids), int(pad_id)


# ------------------------------------------------------------------ beam search


def _beam_loop(model, logits0, cache, *, beam_size, steps, prompt_len, expand, aux0, pad_id):
  """Shared beam search over ``steps`` tokens.

  Args:
    model: the decoder.
    logits0: float32[B, V] logits after the prompt.
    cache: KVCache with B rows (the prompt).
    beam_size: K.
    steps: maximum new tokens N.
    prompt_len: static slot count of the prompt (cache rows agree there, not reordered).
    expand: fn(logp float32[B, K, V], aux int[B, K]) -> (tokens int[B, K, C],
      logp float32[B, K, C] (-inf = not allowed), aux int[B, K, C], finishes bool[B, K, C])
      for live beams.
    aux0: int[B, K] initial per-beam state (e.g. trie node).
    pad_id: token written after a beam finished.

  Returns:
    (scores float32[B, K], tokens int32[B, K, N], lengths int32[B, K], finished bool[B, K],
    aux int[B, K]), beams unsorted.
  """
  b, v = logits0.shape
  k = beam_size
  cache = cache.repeat(k)
  logits = jnp.repeat(logits0, k, axis=0)
  scores = jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF)[None].repeat(b, 0).astype(jnp.float32)
  rows = jnp.arange(b)[:, None]

  def cond(carry):
    step, scores, _, _, finished, *_ = carry
    live = ~finished & (scores > NEG_INF)
    return (step < steps) & jnp.any(live)

  def body(carry):
    step, scores, tokens, lengths, finished, aux, cache, logits = carry
    logp = jax.nn.log_softmax(logits).reshape(b, k, v)
    c_tok, c_lp, c_aux, c_fin = expand(logp, aux)
    c = c_tok.shape[-1]
    f = finished[..., None]
    # A finished beam has one candidate: itself, unchanged score.
    c_tok = jnp.where(f, pad_id, c_tok)
    c_lp = jnp.where(f, jnp.where(jnp.arange(c) == 0, 0.0, NEG_INF), c_lp)
    c_aux = jnp.where(f, aux[..., None], c_aux)
    c_fin = jnp.where(f, True, c_fin)
    total = (scores[..., None] + c_lp).reshape(b, k * c)
    new_scores, idx = jax.lax.top_k(total, k)
    parent = idx // c
    pick = lambda a: jnp.take_along_axis(a.reshape(b, k * c), idx, axis=1)  # noqa: E731
    new_tok, new_aux, new_fin = pick(c_tok), pick(c_aux), pick(c_fin)
    was_finished = jnp.take_along_axis(finished, parent, axis=1)
    tokens = jnp.take_along_axis(tokens, parent[..., None], axis=1)
    tokens = tokens.at[:, :, step].set(new_tok.astype(jnp.int32))
    lengths = jnp.take_along_axis(lengths, parent, axis=1) + (~was_finished).astype(jnp.int32)
    cache = cache.gather((rows * k + parent).reshape(-1), start=prompt_len)
    logits, _, cache = model(tokens=new_tok.reshape(b * k, 1).astype(jnp.int32), cache=cache)
    return step + 1, new_scores, tokens, lengths, new_fin, new_aux, cache, logits[:, 0]

  init = (jnp.zeros((), jnp.int32), scores, jnp.full((b, k, steps), pad_id, jnp.int32),
          jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), bool), aux0, cache, logits)
  _, scores, tokens, lengths, finished, aux, _, _ = jax.lax.while_loop(cond, body, init)
  return scores, tokens, lengths, finished, aux


def _rank(scores, lengths, length_penalty, *arrays):
  """Sorts beams by score / length**length_penalty (descending)."""
  ranked = scores
  if length_penalty:
    ranked = scores / jnp.maximum(lengths, 1).astype(jnp.float32) ** length_penalty
  order = jnp.argsort(-ranked, axis=1, stable=True)
  take = lambda a: jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)), 1)  # noqa: E731
  return (take(ranked),) + tuple(take(a) for a in arrays)


@flax.struct.dataclass
class BeamOutput:
  """Result of ``beam_search``, best first.

  Attributes:
    tokens: int32[B, K, N] (pad_id after a stop token).
    lengths: int32[B, K] tokens per beam, the stop token included.
    scores: float32[B, K] sum log-prob / length**length_penalty.
    finished: bool[B, K] the beam ended with a stop token (else it hit N).
  """
  tokens: jax.Array
  lengths: jax.Array
  scores: jax.Array
  finished: jax.Array


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "beam_size", "max_new_tokens", "stop_ids", "pad_id", "length_penalty"))
def _beam_search(graphdef, state, tokens, input_embeds, mask, *, beam_size, max_new_tokens,
                 stop_ids, pad_id, length_penalty):
  model = nnx.merge(graphdef, state)
  t = _prompt_len(tokens, input_embeds)
  logits0, cache = _prefill(model, tokens, input_embeds, mask, t + max_new_tokens)
  stops = jnp.asarray(stop_ids, jnp.int32)

  def expand(logp, aux):
    lp, tok = jax.lax.top_k(logp, min(beam_size, logp.shape[-1]))
    return tok, lp, jnp.broadcast_to(aux[..., None], tok.shape), jnp.isin(tok, stops)

  b = logits0.shape[0]
  scores, toks, lengths, finished, _ = _beam_loop(
      model, logits0, cache, beam_size=beam_size, steps=max_new_tokens, prompt_len=t,
      expand=expand, aux0=jnp.zeros((b, beam_size), jnp.int32), pad_id=pad_id)
  scores, toks, lengths, finished = _rank(scores, lengths, length_penalty, toks, lengths, finished)
  return BeamOutput(tokens=toks, lengths=lengths, scores=scores, finished=finished)


def beam_search(model: nnx.Module, *, tokens=None, input_embeds=None, mask=None,
                beam_size: int = 4, max_new_tokens: int = 32,
                stop_ids: Sequence[int] | None = None, pad_id: int | None = None,
                length_penalty: float = 0.0) -> BeamOutput:
  """Beam search (see the module docstring for scores); arguments as ``generate``.

  Beams compete on raw summed log-probabilities; ``length_penalty`` only reorders the
  final K (score / length**length_penalty).
  """
  stop_ids, pad_id = _defaults(model, stop_ids, pad_id)
  graphdef, state = nnx.split(model)
  return _beam_search(graphdef, state, _arr(tokens), _arr(input_embeds), _arr(mask),
                      beam_size=int(beam_size), max_new_tokens=int(max_new_tokens),
                      stop_ids=stop_ids, pad_id=pad_id, length_penalty=float(length_penalty))


# ------------------------------------------------------------------ item trie


@flax.struct.dataclass
class ItemTrie:
  """A prefix trie over token sequences, as flat arrays usable inside jit.

  Sequences are sorted lexicographically, so the sequences below any node form a
  contiguous range ``[lo, hi)`` of the sorted order; a per-example allowed set then
  needs only a prefix sum (node allowed iff some allowed sequence lies in its range).
  Nodes are numbered breadth-first, so a node's children are consecutive ids.

  Attributes:
    first_child: int32[Nn] id of the first child.
    num_children: int32[Nn] (0 = leaf: a complete sequence).
    token: int32[Nn] token consumed to reach the node (root: -1).
    lo, hi: int32[Nn] range of sorted sequences below the node.
    order: int32[n] sorted position -> original sequence index.
    max_children: static maximum fan-out C.
    depth: static length of the longest sequence (with the end token).
  """
  first_child: jax.Array
  num_children: jax.Array
  token: jax.Array
  lo: jax.Array
  hi: jax.Array
  order: jax.Array
  max_children: int = flax.struct.field(pytree_node=False)
  depth: int = flax.struct.field(pytree_node=False)

  @property
  def num_items(self) -> int:
    return int(self.order.shape[0])

  @classmethod
  def build(cls, sequences: Sequence[Sequence[int]], end_id: int | None = None) -> ItemTrie:
    """Builds the trie (host-side numpy, vectorised per depth).

    Args:
      sequences: n token-id sequences (e.g. tokenised "ML1M item_1234"), all distinct.
      end_id: appended to every sequence so that one sequence may be a prefix of
        another (the model must then also predict it, e.g. the end-of-turn id). With
        None the set must be prefix-free.

    Raises:
      ValueError: empty/duplicate sequences, or a prefix without end_id.
    """
    seqs = [list(s) + ([end_id] if end_id is not None else []) for s in sequences]
    if not seqs or any(len(s) == 0 for s in seqs):
      raise ValueError("ItemTrie needs at least one sequence and no empty sequence")
    n = len(seqs)
    lens = np.array([len(s) for s in seqs])
    depth = int(lens.max())
    # Pad with -1 so that a proper prefix sorts before its extensions.
    mat = np.full((n, depth), -1, np.int64)
    for i, s in enumerate(seqs):
      mat[i, :len(s)] = s
    order = np.lexsort(mat.T[::-1])
    mat, lens = mat[order], lens[order]
    same_prev = np.all(mat[1:] == mat[:-1], axis=1) & (lens[1:] == lens[:-1])
    if np.any(same_prev):
      i = int(np.argmax(same_prev))
      raise ValueError(f"duplicate sequence in ItemTrie: index {order[i + 1]} equals {order[i]}")
    # Level d holds the nodes reached after d tokens; node_of[r] is row r's node there.
    first_child, num_children, token, lo, hi = [0], [0], [-1], [0], [n]
    node_of = np.zeros(n, np.int64)
    differs = np.zeros(n, bool)  # row r's prefix so far differs from row r - 1's
    differs[0] = True
    for d in range(depth):
      differs[1:] |= mat[1:, d] != mat[:-1, d]
      live = lens > d
      # Rows sharing a (d+1)-prefix are contiguous; a padded row sorts before them.
      start = live & differs
      seg = np.cumsum(start) - 1
      starts = np.nonzero(start)[0]
      ends = np.r_[starts[1:], n]
      ends = np.minimum(ends, starts + np.add.reduceat(live.astype(np.int64), starts))
      ids = len(token) + np.arange(len(starts))
      parents = node_of[starts]
      for p in np.unique(parents):
        first_child[p] = int(ids[np.searchsorted(parents, p)])
      num_children_new = np.bincount(parents, minlength=len(token))
      num_children = [max(a, int(b)) for a, b in zip(num_children, num_children_new, strict=True)]
      first_child += [0] * len(starts)
      num_children += [0] * len(starts)
      token += mat[starts, d].tolist()
      lo += starts.tolist()
      hi += ends.tolist()
      node_of = np.where(live, ids[np.maximum(seg, 0)], -1)
      ending = lens == d + 1
      if np.any(ending & (ends[np.maximum(seg, 0)] - starts[np.maximum(seg, 0)] > 1)):
        raise ValueError("a sequence is a prefix of another; pass end_id to ItemTrie.build")
    counts = np.asarray(num_children, np.int32)
    return cls(first_child=jnp.asarray(first_child, jnp.int32), num_children=jnp.asarray(counts),
               token=jnp.asarray(token, jnp.int32), lo=jnp.asarray(lo, jnp.int32),
               hi=jnp.asarray(hi, jnp.int32), order=jnp.asarray(order, jnp.int32),
               max_children=int(counts.max()), depth=depth)

  def allowed_counts(self, allowed: jax.Array) -> jax.Array:
    """int32[B, n + 1] prefix sums of bool[B, n] allowed (original item order)."""
    sorted_allowed = jnp.take(jnp.asarray(allowed, bool), self.order, axis=1)
    cnt = jnp.cumsum(sorted_allowed.astype(jnp.int32), axis=1)
    return jnp.pad(cnt, ((0, 0), (1, 0)))


@flax.struct.dataclass
class ConstrainedOutput:
  """Result of ``constrained_beam_search``, best first.

  Attributes:
    items: int32[B, K] index into the trie's sequences (-1: fewer than K allowed).
    scores: float32[B, K] summed log-prob (/ length**length_penalty); -inf for -1 items.
    tokens: int32[B, K, depth] the generated ids (the end id included).
    lengths: int32[B, K].
  """
  items: jax.Array
  scores: jax.Array
  tokens: jax.Array
  lengths: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "beam_size", "pad_id", "length_penalty"))
def _constrained(graphdef, state, trie, counts, tokens, input_embeds, mask, *, beam_size, pad_id,
                 length_penalty):
  model = nnx.merge(graphdef, state)
  t = _prompt_len(tokens, input_embeds)
  logits0, cache = _prefill(model, tokens, input_embeds, mask, t + trie.depth)
  b = logits0.shape[0]
  c = trie.max_children

  def expand(logp, node):
    j = jnp.arange(c)
    valid = j < trie.num_children[node][..., None]
    child = jnp.where(valid, trie.first_child[node][..., None] + j, 0)
    tok = trie.token[child]
    flat = child.reshape(b, -1)
    n_allowed = (jnp.take_along_axis(counts, trie.hi[flat], axis=1)
                 - jnp.take_along_axis(counts, trie.lo[flat], axis=1)).reshape(child.shape)
    ok = valid & (n_allowed > 0)
    lp = jnp.where(ok, jnp.take_along_axis(logp, jnp.maximum(tok, 0), axis=-1), NEG_INF)
    return tok, lp, child, trie.num_children[child] == 0

  scores, toks, lengths, finished, node = _beam_loop(
      model, logits0, cache, beam_size=beam_size, steps=trie.depth, prompt_len=t, expand=expand,
      aux0=jnp.zeros((b, beam_size), jnp.int32), pad_id=pad_id)
  found = finished & (scores > NEG_INF)
  items = jnp.where(found, trie.order[trie.lo[node]], -1)
  scores = jnp.where(found, scores, NEG_INF)
  scores, items, toks, lengths = _rank(scores, lengths, length_penalty, items, toks, lengths)
  return ConstrainedOutput(items=items, scores=scores, tokens=toks, lengths=lengths)


def constrained_beam_search(model: nnx.Module, trie: ItemTrie, *, tokens=None, input_embeds=None,
                            mask=None, allowed=None, beam_size: int = 10,
                            pad_id: int | None = None,
                            length_penalty: float = 0.0) -> ConstrainedOutput:
  """Beam search over the trie's sequences only; ranks up to K allowed items per row.

  Args:
    model: the decoder.
    trie: ``ItemTrie`` over the candidate sequences (n items).
    tokens / input_embeds / mask: the prompt, as in ``generate``; generation starts
      right after the last real prompt token.
    allowed: bool[B, n] per-example allowed items (default: all).
    beam_size: K.
    pad_id: filler token id (default ``model.config.pad_id``).
    length_penalty: final ranking by score / length**length_penalty (0 = raw sums).

  Returns:
    ConstrainedOutput, best first.
  """
  _, pad_id = _defaults(model, (), pad_id)
  x = tokens if input_embeds is None else input_embeds
  b = np.shape(x)[0]
  if allowed is None:
    allowed = jnp.ones((b, trie.num_items), bool)
  if np.shape(allowed) != (b, trie.num_items):
    raise ValueError(f"allowed has shape {np.shape(allowed)}; expected ({b}, {trie.num_items})")
  graphdef, state = nnx.split(model)
  return _constrained(graphdef, state, trie, trie.allowed_counts(allowed), _arr(tokens),
                      _arr(input_embeds), _arr(mask), beam_size=int(beam_size), pad_id=pad_id,
                      length_penalty=float(length_penalty))
