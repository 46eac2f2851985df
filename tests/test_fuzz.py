"""Property-based fuzzing of every file parser and of config parsing (issue 7 part 5).

Each parser gets random and mutated inputs (see ``_fuzz_targets``) and must return a
valid result or raise its named error with the file/folder in the message: no other
exception type, no hang, no half-written output. CI runs a derandomised ~50 cases per
target; ``benchmarks/fuzz.py`` runs thousands. The second half pins every bug the fuzzer
found, each as a plain example.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import pathlib
import struct
import zipfile

import _fuzz_targets as F  # noqa: N812
import numpy as np
import pytest
from absl import flags
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ilm_jax import config_lib
from ilm_jax.data import download, movielens, store
from ilm_jax.data.types import DataError
from ilm_jax.llm_tokenizer import LlmTokenizer, TokenizerError
from ilm_jax.models import llm_loading
from ilm_jax.models.llm_loading import LoadError

TARGETS = ("movielens/movies.dat+tmdb", "movielens/ratings.dat", "movielens/sequences.gz",
           "movielens/pairs.gz", "openp5/folder", "amazon/.item", "gguf/config+tensors",
           "hf/config.json", "download/zip", "gguf/tokenizer", "hf/tokenizer.json",
           "store/prepared-dir")
CI = settings(max_examples=50, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much])


@functools.cache
def _targets() -> dict[str, F.Target]:
  return F.targets()


def test_target_list_is_complete():
  assert tuple(_targets()) == TARGETS


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # overflow dequantising random bytes
@pytest.mark.parametrize("name", TARGETS)
@CI
@given(data=st.data())
def test_parser_contract(name, data):
  target = _targets()[name]
  F.check_case(target, data.draw(F.case(target)))


def test_seeds_parse():
  """The unmutated seeds are valid inputs (else the fuzzer only ever tests error paths)."""
  for name, target in _targets().items():
    files = {k: gzip.compress(v, mtime=0) if k.endswith(".gz") else v
             for k, v in target.files.items()}
    expected = "error" if name == "hf/config.json" else "ok"  # no weights beside it
    assert F.check_case(target, files) == expected, name


@CI
@given(argv=F.config_argv(sorted(F.CONFIGS.glob("*.py"))))
def test_config_parsing_contract(argv):
  F.check_config_case(argv)


@CI
@given(data_config=F.generated_configs())
def test_generated_source_contract(data_config):
  F.check_generated_case(data_config)


def test_negative_seed_is_named():
  from ilm_jax.data import generated  # noqa: PLC0415

  with pytest.raises(ValueError, match=r"seed \(-1\) must be >= 0"):
    generated.generate(seed=-1, num_items=50, num_users=10, num_clusters=2)


@settings(CI, max_examples=15)
@given(ds=F.rec_datasets())
def test_store_writer_contract(ds):
  F.check_writer_case(ds)


def test_contract_checker_catches_violations():
  """The harness itself: wrong error type, unnamed path and hangs are all violations."""
  def boom(root):
    raise KeyError("x")

  def unnamed(root):
    raise DataError("bad")

  def hang(root):
    while True:
      pass

  for fn in (boom, unnamed):
    with pytest.raises(F.ContractViolation):
      F.check_case(F.Target("t", {"a": b""}, ("a",), fn, (DataError,)), {"a": b""})
  with F.deadline(0.2), pytest.raises(F.Hang):
    hang(None)


# ---------------------------------------------------------------------- regressions


def _ml_dir(tmp_path, movies: str, ratings: str, users: str | None = None) -> pathlib.Path:
  (tmp_path / "movies.dat").write_bytes(movies.encode("latin-1"))
  (tmp_path / "ratings.dat").write_text(ratings)
  if users is not None:
    (tmp_path / "users.dat").write_bytes(users.encode("latin-1"))
  return tmp_path


def test_huge_movie_id_loads(tmp_path):
  """A 12-digit MovieID used to allocate a MovieID-indexed table (7 TiB: MemoryError)."""
  d = _ml_dir(tmp_path, "1::A (1990)::Drama\n999999999999::B (1991)::Drama\n",
              "1::999999999999::5::1\n1::1::5::2\n")
  ds = movielens.load_movielens(d)
  assert list(ds.item_ids) == ["1", "999999999999"]
  assert [list(s) for s in ds.sequences] == [[1, 0]]  # B first (timestamp 1), then A


@pytest.mark.parametrize("movies,ratings,users,where", [
    # int64 overflow used to escape as OverflowError.
    ("1::A (1990)::Drama\n99999999999999999999::B::Drama\n", "1::1::5::2\n", None,
     "movies.dat:2"),
    ("1::A (1990)::Drama\n", "1::1::5::99999999999999999999\n", None, "ratings.dat:1"),
    # '²' (ISO-8859-1 0xB2) passes str.isdigit() but not int(): was a bare ValueError.
    ("1::A (1990)::Drama\n\xb2::B::Drama\n", "1::1::5::2\n", None, "movies.dat:2"),
    ("1::A (1990)::Drama\n", "1::1::5::2\n", "\xb2::F::1::1::1\n", "users.dat:1"),
])
def test_bad_ids_are_data_errors(tmp_path, movies, ratings, users, where):
  d = _ml_dir(tmp_path, movies, ratings, users)
  with pytest.raises(DataError, match=str(d / where).replace(".", r"\.")):
    movielens.load_movielens(d)


@pytest.mark.parametrize("name,content", [
    (movielens.SEQUENCES_FILE, "1 1 99999999999999999999\n"),
    (movielens.PAIRS_FILE, "1\t99999999999999999999\n"),
])
def test_derived_overflow_is_data_error(tmp_path, name, content):
  (tmp_path / "movies.dat").write_text("1::A (1990)::Drama\n")
  (tmp_path / "derived").mkdir()
  (tmp_path / "derived" / name).write_bytes(gzip.compress(content.encode()))
  with pytest.raises(DataError, match=name):
    movielens.load_movielens(tmp_path)


def test_zip_with_unknown_compression_is_data_error(tmp_path):
  """NotImplementedError (and zlib.error / OSError from damaged zips) used to escape."""
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("ml-1m/movies.dat", "1::A (1990)::Drama\n" * 20)
  data = bytearray(buf.getvalue())
  # Compression method: offset 8 in the local header, 10 in the central directory entry.
  struct.pack_into("<H", data, 8, 99)
  central = data.index(b"PK\x01\x02")
  struct.pack_into("<H", data, central + 10, 99)
  (tmp_path / "a.zip").write_bytes(bytes(data))
  dest = tmp_path / "out" / "ml-1m"
  with pytest.raises(DataError, match=str(tmp_path / "a.zip")):
    download.extract_zip(tmp_path / "a.zip", dest)
  assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("damage", ["empty", "magic", "truncate"])
def test_corrupt_gguf_is_load_error(tmp_path, damage):
  good = _targets()["gguf/config+tensors"].files["m.gguf"]
  data = {"empty": b"", "magic": b"XXXX" + good[4:], "truncate": good[:200]}[damage]
  path = tmp_path / "m.gguf"
  path.write_bytes(data)
  with pytest.raises(LoadError, match=str(path)):
    llm_loading.load_gguf_state_dict(path, use_cache=False)
  with pytest.raises((TokenizerError, LoadError), match=str(path)):
    LlmTokenizer.from_gguf(path)


def test_tiny_gguf_loads(tmp_path):
  path = tmp_path / "m.gguf"
  path.write_bytes(_targets()["gguf/config+tensors"].files["m.gguf"])
  config, sd = llm_loading.load_gguf_state_dict(path, use_cache=False)
  assert (config.layers, config.dim, config.heads, config.kv_heads) == (2, 32, 4, 2)
  assert sd["model.layers.0.self_attn.v_proj.weight"].shape == (16, 32)
  assert LlmTokenizer.from_gguf(path).eos_id == 4


@pytest.mark.parametrize("text,message", [
    ("{", "not valid UTF-8 JSON"),
    ("\ufeff{}", "not valid UTF-8 JSON"),
    ("[]", "expected a JSON object"),
    (json.dumps({**F._HF_CONFIG, "hidden_size": None}), "bad value"),  # noqa: SLF001
    (json.dumps({k: v for k, v in F._HF_CONFIG.items() if k != "vocab_size"}),  # noqa: SLF001
     "required key 'vocab_size' is missing"),
    (json.dumps({**F._HF_CONFIG, "num_attention_heads": 0}), "bad value"),  # noqa: SLF001
    (json.dumps({**F._HF_CONFIG, "num_key_value_heads": 3}), "not a multiple of kv_heads"),  # noqa: SLF001
    (json.dumps({**F._HF_CONFIG, "num_hidden_layers": -2}), "layers=-2 must be a positive"),  # noqa: SLF001
])
def test_bad_hf_config_is_load_error(tmp_path, text, message):
  (tmp_path / "config.json").write_text(text, encoding="utf-8")
  with pytest.raises(LoadError, match=message) as e:
    llm_loading.load_hf(tmp_path)
  assert str(tmp_path / "config.json") in str(e.value)


@pytest.mark.parametrize("tokenizer_json,config", [
    (b"\xff\xfe", None), (b"{}", None), (None, b'{"eos_token": 5}'), (None, b"[")])
def test_bad_hf_tokenizer_is_tokenizer_error(tmp_path, tokenizer_json, config):
  target = _targets()["hf/tokenizer.json"]
  (tmp_path / "tokenizer.json").write_bytes(tokenizer_json or target.files["tokenizer.json"])
  (tmp_path / "tokenizer_config.json").write_bytes(
      config or target.files["tokenizer_config.json"])
  with pytest.raises(TokenizerError, match=str(tmp_path)):
    LlmTokenizer.from_hf(tmp_path)


@pytest.mark.parametrize("damage", ["info-bytes", "info-list", "records", "extras"])
def test_damaged_prepared_dir_is_data_error(tmp_path, damage):
  files = dict(_targets()["store/prepared-dir"].files)
  record = next(k for k in files if k.startswith("rec_users/") and ".array_record" in k)
  if damage == "info-bytes":
    files["info.json"] = b"\xff" + files["info.json"]
  elif damage == "info-list":
    files["info.json"] = b"[]"
  elif damage == "records":
    files[record] = files[record][:100]
  else:
    files["extras.npz"] = b"PK\x03\x04garbage"
  F.write_files(tmp_path, files)
  with pytest.raises(DataError, match=str(tmp_path)):
    store.load(tmp_path)


def test_empty_dataset_write_is_clear_error(tmp_path):
  """0 items/users used to fail inside TFDS with a bare AssertionError."""
  from ilm_jax.data.types import RecDataset  # noqa: PLC0415

  ds = RecDataset(name="e", item_ids=np.array([], str), user_ids=np.array([], str),
                  sequences=[], item_text=[], item_titles=[])
  with pytest.raises(ValueError, match="0 items and 0 users"):
    store.write(ds, tmp_path / "out" / "e", progress=False)
  assert not (tmp_path / "out" / "e").exists()


@pytest.mark.parametrize("override", ["--config.nokey=1", "--config.data.nokey=1",
                                      "--config.data.dir.x=1", "--config.y..z=1"])
def test_bad_config_override_is_flags_error(override):
  with pytest.raises(flags.Error, match=override.split("=")[0].replace(".", r"\.")):
    F.parse_config(["--config=configs/prepare.py", override])


def test_negative_min_core_is_config_error():
  with pytest.raises(config_lib.ConfigError, match="min_core"):
    F.parse_config(["--config=configs/prepare.py", "--config.data.min_core=-1"])
  assert F.parse_config(["--config=configs/prepare.py:tiny"]).data.min_core == 5


def test_fuzz_seed_sequences_match_ratings():
  """The derived seeds are the ratings fixture re-written (so their parses agree)."""
  seqs, _ = F._ml_derived()  # noqa: SLF001
  first = seqs.decode().splitlines()[0].split()
  rows = [r.split("::") for r in F._fixture("ml1m_tiny", "ratings.dat").decode().split()]  # noqa: SLF001
  user1 = sorted(((int(t), m) for u, m, _, t in rows if u == first[0]), key=lambda x: x[0])
  assert first[1:] == [m for _, m in user1]
  assert np.all(np.diff([t for t, _ in user1]) >= 0)
