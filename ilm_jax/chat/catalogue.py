"""The item catalogue a conversation talks about: title resolution and text search.

``Catalogue.resolve(text)`` maps what a person typed ("the matrix", "Matrix, The (1999)",
"silent harbour") to catalogue items: titles are normalised (case, punctuation, a leading
or trailing article, a trailing year or decade), an exact normalised match wins, else a fuzzy
token-set / sequence ratio picks candidates; several close candidates are an ambiguity the
conversation asks back ("Did you mean: A (1995) or B (2003)?").

``Catalogue.search(query, k)`` is TF-IDF (numpy) over titles + text + attributes.
``Catalogue.add`` appends a new item (its index is the next one); searches see it at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import threading
from collections import Counter
from collections.abc import Sequence

import numpy as np

_YEAR = re.compile(r"\s*\((1[89]\d\d|20\d\d)s?\)\s*$")  # (1995) or a decade (1980s)
_TRAILING_ARTICLE = re.compile(r",\s*(the|a|an|la|le|les|el|il|der|die|das)$")
_LEADING_ARTICLE = re.compile(r"^(the|a|an)\s+")
_NON_WORD = re.compile(r"[^\w\s]+")
_WORD = re.compile(r"[a-z0-9]+")
STOP_WORDS = frozenset(
    "a an the of and or in on to for with by is it me i my you your like something some "
    "movie movies film films item items please can could would what which about show find "
    "search recommend tell more details any good".split())


def normalize_title(title: str) -> str:
  """Lower-case, no year, no punctuation, no leading/trailing article, single spaces.

  'Matrix, The (1999)' and 'the matrix' both give 'matrix'.
  """
  t = title.strip().lower()
  t = _YEAR.sub("", t)
  t = _TRAILING_ARTICLE.sub("", t.strip())
  t = _NON_WORD.sub(" ", t)
  t = " ".join(t.split())
  return _LEADING_ARTICLE.sub("", t)


def _tokens(text: str) -> list[str]:
  return _WORD.findall(text.lower())


def _ratio(a: str, b: str) -> float:
  """Max of the sequence ratio and the token-set ratio (word order / extra words)."""
  seq = difflib.SequenceMatcher(None, a, b).ratio()
  ta, tb = set(a.split()), set(b.split())
  if not ta or not tb:
    return seq
  inter = " ".join(sorted(ta & tb))
  ra = " ".join(sorted(ta - tb))
  rb = " ".join(sorted(tb - ta))
  s1, s2 = (inter + " " + ra).strip(), (inter + " " + rb).strip()
  tset = max(difflib.SequenceMatcher(None, inter, s1).ratio() if inter else 0.0,
             difflib.SequenceMatcher(None, inter, s2).ratio() if inter else 0.0,
             difflib.SequenceMatcher(None, s1, s2).ratio())
  # A token-set hit on a strict subset ('harbor' in 'the silent harbor') is weaker.
  cover = len(ta & tb) / max(len(ta | tb), 1)
  return max(seq, 0.5 * tset + 0.5 * cover)


@dataclasses.dataclass(frozen=True)
class Resolution:
  """What a mention resolved to.

  Attributes:
    query: the text looked up.
    items: the best candidates, best first (one when unambiguous; empty when nothing fits).
    ambiguous: several candidates are about equally good: ask back.
  """

  query: str
  items: tuple[int, ...]
  ambiguous: bool

  @property
  def item(self) -> int | None:
    return self.items[0] if self.items and not self.ambiguous else None


class Catalogue:
  """Titles, texts and tokens of every item, with title resolution and text search.

  Attributes:
    titles: display titles, index = item.
    texts: descriptions ('' where none).
    tokens: OpenP5 item tokens ('1001', ...).
  """

  def __init__(self, titles: Sequence[str], texts: Sequence[str] | None = None,
               tokens: Sequence[str] | None = None,
               attrs: dict[str, list[list[str]]] | Sequence[Sequence[str]] | None = None):
    n = len(titles)
    self.titles = [str(t) for t in titles]
    self.texts = [str(t) for t in texts] if texts is not None else [""] * n
    self.tokens = [str(t) for t in tokens] if tokens is not None else [str(i) for i in range(n)]
    self.attrs = [[] for _ in range(n)]
    if attrs is not None and not isinstance(attrs, dict):  # per-item lists
      self.attrs = [list(a) for a in attrs]
      attrs = None
    for values in (attrs or {}).values():
      for i, v in enumerate(values[:n]):
        self.attrs[i].extend(v)
    self._lock = threading.Lock()
    self._rebuild()

  @classmethod
  def from_dataset(cls, ds) -> Catalogue:
    """From a ``types.RecDataset`` (tokens must be assigned)."""
    return cls(ds.item_titles, ds.item_text, ds.item_tokens, ds.item_attrs)

  def __len__(self) -> int:
    return len(self.titles)

  def display(self, i: int) -> str:
    """The title a person sees ('item_<tok>' when the item has none)."""
    return self.titles[i] or f"item_{self.tokens[i]}"

  def details(self, i: int) -> dict:
    """JSON-able facts of item ``i``."""
    return {"id": int(i), "token": self.tokens[i], "title": self.display(i),
            "text": self.texts[i], "attributes": list(self.attrs[i])}

  def add(self, title: str, text: str = "", token: str | None = None,
          attributes: Sequence[str] = ()) -> int:
    """Appends an item; returns its index."""
    with self._lock:
      i = len(self.titles)
      self.titles.append(title)
      self.texts.append(text)
      self.tokens.append(token or f"new{i}")
      self.attrs.append(list(attributes))
      self._rebuild()
      return i

  # ------------------------------------------------------------------ resolution

  def _rebuild(self) -> None:
    self._norm = [normalize_title(t) for t in self.titles]
    self._exact: dict[str, list[int]] = {}
    for i, t in enumerate(self._norm):
      if t:
        self._exact.setdefault(t, []).append(i)
    # TF-IDF over title (twice: titles matter most) + text + attributes.
    docs = [_tokens(f"{t} {t} {x} {' '.join(a)}")
            for t, x, a in zip(self.titles, self.texts, self.attrs, strict=True)]
    df = Counter(w for d in docs for w in set(d))
    self._vocab = {w: j for j, w in enumerate(sorted(df))}
    n = max(len(docs), 1)
    self._idf = np.array([math.log((1 + n) / (1 + df[w])) + 1.0 for w in sorted(df)],
                         np.float32)
    rows, cols, vals = [], [], []
    for i, d in enumerate(docs):
      for w, c in Counter(d).items():
        rows.append(i)
        cols.append(self._vocab[w])
        vals.append((1.0 + math.log(c)) * self._idf[self._vocab[w]])
    mat = np.zeros((len(docs), len(self._vocab)), np.float32)
    if rows:
      mat[rows, cols] = vals
    norms = np.linalg.norm(mat, axis=1, keepdims=True)
    self._tfidf = mat / np.maximum(norms, 1e-9)

  def resolve(self, text: str, *, threshold: float = 0.72, margin: float = 0.05,
              max_candidates: int = 3) -> Resolution:
    """The item(s) ``text`` names.

    Args:
      text: a title as typed.
      threshold: the least fuzzy score that counts as a match.
      margin: candidates within this of the best make the mention ambiguous.
      max_candidates: at most this many candidates are returned.

    Returns:
      A Resolution (``items`` empty when nothing matches).
    """
    raw = text.strip().lower()
    verbatim = [i for i, t in enumerate(self.titles) if t.lower() == raw] if raw else []
    if len(verbatim) == 1:   # the exact display title wins over normalised look-alikes
      return Resolution(text, (verbatim[0],), False)
    q = normalize_title(text)
    if not q:
      return Resolution(text, (), False)
    year = _YEAR.search(text.strip())
    exact = self._exact.get(q, [])
    if year and len(exact) > 1:
      exact = [i for i in exact if year.group(1) in self.titles[i]] or exact
    if exact:
      return Resolution(text, tuple(exact[:max_candidates]), len(exact) > 1)
    scores = np.array([_ratio(q, t) if t else 0.0 for t in self._norm])
    order = np.argsort(-scores, kind="stable")[:max_candidates]
    best = float(scores[order[0]]) if len(order) else 0.0
    if best < threshold:
      return Resolution(text, (), False)
    close = tuple(int(i) for i in order if scores[i] >= best - margin and scores[i] >= threshold)
    return Resolution(text, close, len(close) > 1)

  def find_mentions(self, message: str, *, min_words: int = 1) -> list[int]:
    """Items whose normalised title occurs verbatim (on word boundaries) in ``message``.

    Longer titles first, overlaps dropped: 'The Silent Harbor II' is not also 'Silent
    Harbor'. Titles of fewer than ``min_words`` words or only stop words are ignored.
    """
    text = " " + normalize_title(message) + " "
    hits: list[tuple[int, int, int]] = []
    for t, items in self._exact.items():
      words = t.split()
      if len(words) < min_words or all(w in STOP_WORDS for w in words):
        continue
      pos = text.find(" " + t + " ")
      if pos >= 0:
        hits.append((pos, pos + len(t) + 1, items[0]))
    hits.sort(key=lambda h: (-(h[1] - h[0]), h[0]))
    taken: list[tuple[int, int]] = []
    out = []
    for s, e, i in hits:
      if all(e <= a or s >= b for a, b in taken):
        taken.append((s, e))
        out.append((s, i))
    return [i for _, i in sorted(out)]

  # ------------------------------------------------------------------ search

  def search(self, query: str, k: int = 5) -> list[tuple[int, float]]:
    """[(item, score)] best first: TF-IDF cosine over titles, text and attributes."""
    words = [w for w in _tokens(query) if w in self._vocab]
    if not words or k <= 0:
      return []
    q = np.zeros(len(self._vocab), np.float32)
    for w, c in Counter(words).items():
      q[self._vocab[w]] = (1.0 + math.log(c)) * self._idf[self._vocab[w]]
    q /= max(float(np.linalg.norm(q)), 1e-9)
    scores = self._tfidf @ q
    order = np.argsort(-scores, kind="stable")[:k]
    return [(int(i), float(scores[i])) for i in order if scores[i] > 0]


def ask_back(cat: Catalogue, res: Resolution) -> str:
  """'Did you mean: A or B?' for an ambiguous resolution."""
  names = [cat.display(i) for i in res.items]
  if len(names) == 1:
    return f"Did you mean {names[0]}?"
  return "Did you mean: " + ", ".join(names[:-1]) + " or " + names[-1] + "?"
