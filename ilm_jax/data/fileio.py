"""Strict text-file reading shared by the dataset parsers.

Every failure becomes one ``DataError`` naming the file, the line and what was expected:
missing or empty files, undecodable bytes (with the line they are on), truncated gzip.
"""

from __future__ import annotations

import dataclasses
import gzip
import pathlib
import zlib

from ilm_jax.data.types import DataError


@dataclasses.dataclass(frozen=True)
class ItemTable:
  """Item metadata read from a side file, keyed by raw item id.

  Attributes:
    index: raw item id -> row.
    text: per row, the item text the Q-Former reads.
    titles: per row, the short display name.
    attrs: named per-row string lists (genres, categories, ...).
  """

  index: dict[str, int]
  text: list[str]
  titles: list[str]
  attrs: dict[str, list[list[str]]]


def read_bytes(path: pathlib.Path | str, what: str) -> bytes:
  """Reads a whole (optionally .gz) file; empty or truncated files are errors.

  Args:
    path: the file.
    what: what the file should hold, for the error message.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"file not found; expected {what}", path=str(path))
  try:
    if path.suffix == ".gz":
      with gzip.open(path, "rb") as f:
        data = f.read()
    else:
      data = path.read_bytes()
  except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
    raise DataError(f"unreadable or truncated file ({e}); expected {what}",
                    path=str(path)) from e
  if not data.strip():
    raise DataError(f"file is empty; expected {what}", path=str(path))
  return data


def decode(data: bytes, path: pathlib.Path | str, encoding: str = "utf-8") -> str:
  """Strict decode; an invalid byte is reported with its 1-based line number."""
  try:
    return data.decode(encoding)
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise DataError(f"bytes {data[e.start:e.end]!r} are not valid {encoding} (the format is "
                    f"{encoding}-encoded text)", path=str(path), line=line) from e


def read_text(path: pathlib.Path | str, what: str, encoding: str = "utf-8") -> str:
  """``read_bytes`` + ``decode``; ``\\r\\n`` line ends are accepted."""
  text = decode(read_bytes(path, what), path, encoding)
  return text.replace("\r\n", "\n")


def read_lines(path: pathlib.Path | str, what: str, encoding: str = "utf-8") -> list[str]:
  """Lines without their newline; a trailing newline does not add an empty line."""
  text = read_text(path, what, encoding)
  lines = text.split("\n")
  if lines and lines[-1] == "":
    lines.pop()
  return lines
