"""Amazon item metadata in RecBole's atomic ``.item`` format (e.g. ``Amazon_Beauty.item``).

TAB-separated with CSV-style quoting (a title may hold a quoted newline), one header row
of ``name:type`` columns. We need ``item_id:token`` and ``title:token``; ``brand:token`` and
``categories:token_seq`` are used when present. ``categories`` looks like
``'Beauty', 'Makeup', "Women's"`` (quoted strings joined by commas).

Item text = "<title>. Brand: <brand>. Categories: <c1>, <c2>, ...", skipping empty parts.
"""

from __future__ import annotations

import csv
import io
import pathlib
import re

from ilm_jax.data import fileio
from ilm_jax.data.types import DataError

REQUIRED = ("item_id", "title")
_QUOTED = re.compile(r"""'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)\"""")


def parse_token_seq(value: str) -> list[str]:
  """``'A', "B's", 'C'`` -> ['A', "B's", 'C']; an unquoted value splits on commas."""
  value = value.strip()
  if not value:
    return []
  found = [a or b for a, b in _QUOTED.findall(value)]
  if found:
    return [s.strip() for s in found if s.strip()]
  return [s.strip() for s in value.split(",") if s.strip()]


def _clean(s: str) -> str:
  return " ".join(s.split())


def load_amazon_items(path: pathlib.Path | str) -> fileio.ItemTable:
  """Reads a RecBole ``.item`` TSV.

  Args:
    path: the ``.item`` file (UTF-8).

  Returns:
    An ItemTable: text as above, titles = the cleaned title, attrs 'categories' (and
    'brand' as a one-element list where known).

  Raises:
    DataError: missing file or columns, wrong field count, duplicate item id, bad bytes.
  """
  path = pathlib.Path(path)
  what = "a RecBole .item TSV with header columns item_id:token, title:token, ..."
  text = fileio.read_text(path, what)
  reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t")
  try:
    header = next(reader)
  except (StopIteration, csv.Error) as e:
    raise DataError(f"cannot read the header row; expected {what}", path=str(path), line=1) from e
  names = [h.split(":", 1)[0].strip() for h in header]
  col = {n: i for i, n in enumerate(names)}
  missing = [n for n in REQUIRED if n not in col]
  if missing:
    raise DataError(f"header lacks column(s) {', '.join(m + ':token' for m in missing)}; found "
                    f"{header}", path=str(path), line=1)
  c_id, c_title = col["item_id"], col["title"]
  c_brand, c_cats = col.get("brand"), col.get("categories")
  index: dict[str, int] = {}
  line_of: dict[str, int] = {}
  texts, titles, cats_all, brands = [], [], [], []
  while True:
    line = reader.line_num + 1  # the physical line this record starts on
    try:
      row = next(reader)
    except StopIteration:
      break
    except csv.Error as e:
      raise DataError(f"malformed record ({e})", path=str(path), line=line) from e
    if not row:
      continue
    if len(row) != len(header):
      raise DataError(f"expected {len(header)} TAB-separated fields ({', '.join(header)}), "
                      f"got {len(row)}", path=str(path), line=line)
    item_id = row[c_id].strip()
    if not item_id:
      raise DataError("empty item_id", path=str(path), line=line)
    if item_id in index:
      raise DataError(f"item_id {item_id!r} appears twice (first on line {line_of[item_id]})",
                      path=str(path), line=line)
    title = _clean(row[c_title])
    brand = _clean(row[c_brand]) if c_brand is not None else ""
    cats = parse_token_seq(row[c_cats]) if c_cats is not None else []
    parts = [title] if title else []
    if brand:
      parts.append(f"Brand: {brand}")
    if cats:
      parts.append(f"Categories: {', '.join(cats)}")
    index[item_id] = len(texts)
    line_of[item_id] = line
    texts.append(". ".join(parts) + ("." if parts else ""))
    titles.append(title)
    cats_all.append(cats)
    brands.append([brand] if brand else [])
  if not index:
    raise DataError(f"no item records after the header; expected {what}", path=str(path))
  attrs = {"categories": cats_all}
  if c_brand is not None:
    attrs["brand"] = brands
  return fileio.ItemTable(index=index, text=texts, titles=titles, attrs=attrs)
