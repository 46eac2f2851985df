"""Catalogue: title normalisation, fuzzy resolution with ambiguity, TF-IDF search."""

from __future__ import annotations

from ilm_jax.chat import catalogue as C

TITLES = ["Matrix, The (1999)", "Toy Story (1995)", "Toy Story 2 (1999)", "Heat (1995)",
          "Heat (2003)", "Silent Harbor", "The Silent Harbor II"]
TEXTS = ["hackers in a simulated reality", "toys come alive", "toys again", "a heist in LA",
         "a remake", "a coastal village and a family secret", "revenge at sea"]


def _cat():
  return C.Catalogue(TITLES, TEXTS)


def test_normalize_title():
  assert C.normalize_title("Matrix, The (1999)") == "matrix"
  assert C.normalize_title("  the MATRIX!! ") == "matrix"
  assert C.normalize_title("A Bug's Life (1998)") == "bug s life"


def test_resolve_exact_fuzzy_missing_and_ambiguous():
  cat = _cat()
  assert cat.resolve("the matrix").item == 0
  assert cat.resolve("Matrx").item == 0          # typo
  assert cat.resolve("toy story 2").item == 2
  assert cat.resolve("Heat (2003)").item == 4   # the year disambiguates
  res = cat.resolve("heat")
  assert res.ambiguous and set(res.items) == {3, 4}
  assert C.ask_back(cat, res) == "Did you mean: Heat (1995) or Heat (2003)?"
  assert cat.resolve("completely unrelated words").items == ()
  cat2 = C.Catalogue(["Endless Orchard", "The Endless Orchard"])
  assert cat2.resolve("The Endless Orchard").item == 1   # verbatim title beats look-alike
  assert cat2.resolve("endless orchard!").ambiguous


def test_find_mentions_prefers_longer_titles():
  cat = _cat()
  assert cat.find_mentions("I loved The Silent Harbor II and toy story") == [6, 1]
  assert cat.find_mentions("nothing here") == []


def test_search_ranks_text_and_titles_and_sees_new_items():
  cat = _cat()
  hits = cat.search("toys", k=3)
  assert {i for i, _ in hits[:2]} == {1, 2}
  assert cat.search("family secret village")[0][0] == 5
  assert cat.search("zzzz") == []
  j = cat.add("Quantum Lighthouse", "a keeper finds a quantum signal")
  assert cat.search("quantum lighthouse")[0][0] == j
  assert cat.resolve("quantum lighthouse").item == j
