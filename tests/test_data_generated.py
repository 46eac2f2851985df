"""The generated catalogue: determinism, shape, and the structure SPEC §1 asks for."""

import time

import numpy as np
import pytest

from ilm_jax import config_lib
from ilm_jax.data import filtering, generated, sources, types


@pytest.fixture(scope="module")
def ds():
  return generated.generate(seed=0)


def test_same_seed_identical_other_seed_different(ds):
  again = generated.generate(seed=0)
  assert all(np.array_equal(a, b) for a, b in zip(ds.sequences, again.sequences, strict=True))
  assert ds.item_text == again.item_text and ds.item_titles == again.item_titles
  assert np.array_equal(ds.extras["cluster"], again.extras["cluster"])
  other = generated.generate(seed=1)
  assert other.item_text != ds.item_text
  assert not all(np.array_equal(a, b) for a, b in zip(ds.sequences, other.sequences, strict=True))


def test_size_lengths_and_speed():
  t0 = time.perf_counter()
  ds = generated.generate(seed=3, num_items=1000, num_users=2000, min_len=5, max_len=30)
  elapsed = time.perf_counter() - t0
  assert elapsed < 10.0, f"generation took {elapsed:.1f}s; it should take well under 2s"
  assert ds.num_items == 1000 and ds.num_users == 2000
  lengths = np.array([len(s) for s in ds.sequences])
  assert lengths.min() >= 5 and lengths.max() <= 30 and lengths.min() < lengths.max()
  assert all(len(set(s.tolist())) == len(s) for s in ds.sequences)  # no repeats in a sequence
  assert len(set(ds.item_titles)) == ds.num_items  # titles identify items
  assert all(ds.item_titles[i] in ds.item_text[i] for i in range(ds.num_items))


def test_load_dataset_generated_config():
  cfg = config_lib.data_config()
  cfg.generated.num_items, cfg.generated.num_users = 300, 400
  ds = sources.load_dataset(cfg)
  assert ds.name == "generated" and ds.num_users == 400 and ds.num_items <= 300
  assert sorted(int(t) for t in ds.item_tokens) == list(range(1001, 1001 + ds.num_items))
  types.leave_one_out(ds)  # every user is splittable


def test_hidden_clusters_drive_co_consumption(ds):
  cluster = ds.extras["cluster"]
  genres = [set(g) for g in ds.item_attrs["genres"]]
  a = np.concatenate([s[:-1] for s in ds.sequences])
  b = np.concatenate([s[1:] for s in ds.sequences])
  same_cluster = cluster[a] == cluster[b]
  chance = np.sum(np.bincount(cluster) ** 2) / len(cluster) ** 2
  assert same_cluster.mean() > 10 * chance  # CF-visible structure
  # ...that the text does not reveal: sharing a genre barely changes the odds of sharing a
  # cluster, and clusters are spread over genres like a random assignment.
  share_genre = np.array([bool(genres[x] & genres[y]) for x, y in zip(a, b, strict=True)])
  assert abs(same_cluster[share_genre].mean() - same_cluster[~share_genre].mean()) < 0.1
  g1 = np.array([sorted(g)[0] for g in ds.item_attrs["genres"]])
  for c in range(cluster.max() + 1):
    _, counts = np.unique(g1[cluster == c], return_counts=True)
    assert counts.max() <= max(6, 0.5 * (cluster == c).sum())


def test_taste_is_visible_in_text_and_popularity_is_skewed(ds):
  genres = [set(g) for g in ds.item_attrs["genres"]]
  rng = np.random.default_rng(0)
  # Items of one user share genres more than random item pairs: text carries taste.
  within = np.mean([bool(genres[s[i]] & genres[s[j]]) for s in ds.sequences[:500]
                    for i, j in [rng.choice(len(s), 2, replace=False)]])
  rand = np.mean([bool(genres[x] & genres[y])
                  for x, y in rng.integers(ds.num_items, size=(5000, 2))])
  assert within > rand + 0.03
  counts = np.sort(np.bincount(np.concatenate(ds.sequences), minlength=ds.num_items))[::-1]
  assert counts[: ds.num_items // 10].sum() > 0.25 * counts.sum()  # top 10% > 25%
  assert counts[0] > 10 * np.median(counts)
  assert filtering.kcore(ds, 5).num_users == ds.num_users
