"""The generated catalogue: the embedded default dataset (no files, deterministic from a seed).

Structure that makes every claim testable (SPEC §1):

* Items have visible attributes (1-2 genres, era, tone, setting, theme) from which the
  title and description are written; ``item_attrs`` holds them.
* Every item also belongs to a hidden **co-consumption cluster** drawn independently of its
  attributes (``extras['cluster']``). The text says nothing about it.
* Users have a latent taste over genres and tones (text-visible signal) and affinities to a
  few clusters (CF-only signal). A sequence moves within its current cluster with
  probability ``stay``, else jumps to a cluster drawn from the user's affinities, so
  consecutive items share a cluster far more often than their attributes explain: an
  item-item loss on train sequences has something to learn that text cannot give.
* Item popularity is Zipf-like (weight ~ 1/(rank + 5)), so a few items dominate.

Sampling runs step-synchronously over blocks of users, per cluster, so 2,000 users x 1,000
items take a fraction of a second.
"""

from __future__ import annotations

import numpy as np

from ilm_jax.data.types import RecDataset

GENRES = ("Drama", "Comedy", "Thriller", "Romance", "Science Fiction", "Fantasy", "Horror",
          "Mystery", "Adventure", "Documentary", "Animation", "Western", "Musical", "Crime")
ERAS = ("1950s", "1960s", "1970s", "1980s", "1990s", "2000s", "2010s")
TONES = ("dark", "lighthearted", "bittersweet", "tense", "whimsical", "melancholic",
         "uplifting", "satirical")
SETTINGS = ("a coastal village", "a sprawling city", "a distant planet", "a snowbound cabin",
            "a royal court", "a desert outpost", "a boarding school", "a river town",
            "an island prison", "a jazz club", "a mountain monastery", "a frontier railroad")
THEMES = ("a family secret", "an unlikely friendship", "revenge", "a lost inheritance",
          "first love", "a stolen invention", "survival", "a rigged election",
          "a forgotten song", "a second chance", "a disappearance", "ambition")
ADJECTIVES = ("Silent", "Crimson", "Last", "Hidden", "Golden", "Broken", "Midnight", "Wild",
              "Hollow", "Electric", "Quiet", "Burning", "Paper", "Glass", "Northern", "Velvet",
              "Iron", "Distant", "Secret", "Little", "Falling", "Endless", "Lucky", "Frozen")
NOUNS = ("Harbor", "Orchard", "Signal", "Garden", "Mirror", "Kingdom", "River", "Letter",
         "Engine", "Lantern", "Horizon", "Crown", "Season", "Stranger", "Bridge", "Compass",
         "Echo", "Island", "Promise", "Circus", "Tower", "Voyage", "Witness", "Melody")
_TEMPLATES = ("The {adj} {noun}", "{adj} {noun}", "A {noun} in {month}", "{noun} of the {adj}",
              "The {noun}'s {noun2}")
_MONTHS = ("Winter", "Spring", "June", "October", "December", "Autumn")


def _titles(rng: np.random.Generator, n: int) -> list[str]:
  titles, seen = [], {}
  for _ in range(n):
    t = _TEMPLATES[rng.integers(len(_TEMPLATES))].format(
        adj=ADJECTIVES[rng.integers(len(ADJECTIVES))], noun=NOUNS[rng.integers(len(NOUNS))],
        noun2=NOUNS[rng.integers(len(NOUNS))], month=_MONTHS[rng.integers(len(_MONTHS))])
    # Titles must be unique: they are how a user or the chat refers to an item.
    k = seen.get(t, 0)
    seen[t] = k + 1
    titles.append(t if k == 0 else f"{t} {_roman(k + 1)}")
  return titles


def _sample(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
  """One categorical draw per row of float[B, K] non-negative weights (a row sum > 0)."""
  cum = np.cumsum(weights, axis=1, dtype=np.float64)
  r = rng.random(len(weights)) * cum[:, -1]
  return np.minimum((cum <= r[:, None]).sum(1), weights.shape[1] - 1)


def _roman(n: int) -> str:
  out = ""
  for v, s in ((10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")):
    while n >= v:
      out, n = out + s, n - v
  return out


def generate(seed: int = 0, num_items: int = 1000, num_users: int = 2000,
             num_clusters: int = 40, min_len: int = 8, max_len: int = 40, *,
             stay: float = 0.7, explore: float = 0.15, taste_weight: float = 3.0,
             name: str = "generated") -> RecDataset:
  """Generates the catalogue.

  Args:
    seed: everything is a deterministic function of the arguments.
    num_items: N items.
    num_users: U users.
    num_clusters: C hidden co-consumption clusters.
    min_len: shortest sequence (>= 5 so that 5-core filtering keeps every user).
    max_len: longest sequence (< num_items).
    stay: probability that the next item comes from the current item's cluster.
    explore: probability that a jump ignores the user's cluster affinities (taste and
      popularity only), so users also reach clusters outside their favourites.
    taste_weight: strength of the visible (genre/tone) taste in every choice.
    name: dataset name for results.

  Returns:
    A RecDataset with text, titles, ``item_attrs`` (genres, era, tone, setting, theme) and
    ``extras['cluster']`` int32[N]; items are indexed in catalogue order, ids 'i0'...
  """
  if not 5 <= min_len <= max_len < num_items:
    raise ValueError(f"need 5 <= min_len ({min_len}) <= max_len ({max_len}) < num_items "
                     f"({num_items})")
  if num_clusters < 1 or num_users < 1:
    raise ValueError("num_clusters and num_users must be >= 1")
  if seed < 0:  # numpy's message ("expected non-negative integer") names no argument
    raise ValueError(f"seed ({seed}) must be >= 0")
  rng = np.random.default_rng(seed)
  n, g, t = num_items, len(GENRES), len(TONES)

  # ---------------------------------------------------------------- items
  genre1 = rng.integers(g, size=n)
  genre2 = np.where(rng.random(n) < 0.5, (genre1 + rng.integers(1, g, size=n)) % g, -1)
  era = rng.integers(len(ERAS), size=n)
  tone = rng.integers(t, size=n)
  setting = rng.integers(len(SETTINGS), size=n)
  theme = rng.integers(len(THEMES), size=n)
  cluster = rng.integers(num_clusters, size=n).astype(np.int32)
  # Zipf-like popularity over a random ranking, unrelated to attributes and clusters.
  log_pop = -np.log(rng.permutation(n) + 5.0)
  titles = _titles(rng, n)

  item_genres = [[GENRES[a]] + ([GENRES[b]] if b >= 0 else [])
                 for a, b in zip(genre1, genre2, strict=True)]
  text, full_titles = [], []
  for i in range(n):
    title = f"{titles[i]} ({ERAS[era[i]]})"
    kinds = " and ".join(s.lower() for s in item_genres[i])
    full_titles.append(title)
    text.append(f"{title}. Genres: {', '.join(item_genres[i])}. A {TONES[tone[i]]} {kinds} "
                f"story set in {SETTINGS[setting[i]]} in the {ERAS[era[i]]}, about "
                f"{THEMES[theme[i]]}.")
  genre_onehot = np.zeros((n, g), np.float32)
  genre_onehot[np.arange(n), genre1] = 1.0
  has2 = genre2 >= 0
  genre_onehot[np.flatnonzero(has2), genre2[has2]] = 1.0
  tone_onehot = np.eye(t, dtype=np.float32)[tone]

  # ---------------------------------------------------------------- users
  u = num_users
  genre_taste = rng.dirichlet(np.full(g, 0.3), size=u).astype(np.float32)
  tone_taste = rng.dirichlet(np.full(t, 0.5), size=u).astype(np.float32)
  # A few clusters per user carry almost all of its affinity.
  cluster_aff = rng.dirichlet(np.full(num_clusters, 0.1), size=u)
  lengths = rng.integers(min_len, max_len + 1, size=u)

  # ---------------------------------------------------------------- sequences
  # Each step picks a cluster (stay in the current one, jump by affinity, or explore by
  # taste/popularity alone), then an unconsumed item inside it by popularity x taste.
  # Working per cluster keeps every step at [users, cluster size] instead of [users, N].
  order = np.argsort(cluster, kind="stable")
  sizes = np.bincount(cluster, minlength=num_clusters)
  members = np.full((num_clusters, max(1, sizes.max())), n, np.int64)  # n = padding
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  members[cluster[order], np.arange(n) - starts[cluster[order]]] = order
  in_cluster = np.zeros((n, num_clusters), np.float32)
  in_cluster[np.arange(n), cluster] = 1.0
  seqs = np.zeros((u, max_len), np.int32)
  block = max(1, min(u, (1 << 21) // n))  # bound the [block, N] working set
  for lo in range(0, u, block):
    hi = min(u, lo + block)
    b = hi - lo
    rows = np.arange(b)
    # Visible taste in [0, g/2] for genres plus [0, t/2] for tone.
    taste = (genre_taste[lo:hi] @ genre_onehot.T) / genre_onehot.sum(1)[None] * (g / 2)
    taste += (tone_taste[lo:hi] @ tone_onehot.T) * (t / 2)
    weight = np.exp(log_pop[None] + taste_weight * np.log1p(taste)).astype(np.float32)
    weight = np.concatenate([weight, np.zeros((b, 1), np.float32)], 1)  # padding column
    mass = weight[:, :n] @ in_cluster  # float32[b, C] unconsumed weight per cluster
    aff = cluster_aff[lo:hi] + 1e-6  # Dirichlet draws can underflow to 0
    current = np.zeros(b, np.int64)
    for step in range(max_len):
      r = rng.random(b)
      jump_w = np.where(r[:, None] < explore, mass, aff * mass)
      jump_c = _sample(rng, jump_w)
      stays = (rng.random(b) < stay) & (mass[rows, current] > 0) & (step > 0)
      c = np.where(stays, current, jump_c)
      cand = members[c]  # [b, M]
      chosen = cand[rows, _sample(rng, weight[rows[:, None], cand])]
      seqs[lo + rows, step] = chosen
      weight[rows, chosen] = 0.0
      # Recomputed, not decremented: round-off must not leave an exhausted cluster > 0.
      mass[rows, c] = weight[rows[:, None], cand].sum(1)
      current = c

  return RecDataset(
      name=name,
      item_ids=np.array([f"i{i}" for i in range(n)]),
      user_ids=np.array([f"u{j}" for j in range(u)]),
      sequences=[seqs[j, :lengths[j]].copy() for j in range(u)],
      item_text=text,
      item_titles=full_titles,
      item_attrs={
          "genres": item_genres,
          "era": [[ERAS[e]] for e in era],
          "tone": [[TONES[x]] for x in tone],
          "setting": [[SETTINGS[x]] for x in setting],
          "theme": [[THEMES[x]] for x in theme],
      },
      extras={"cluster": cluster},
  )
