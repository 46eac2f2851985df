"""Fuzz targets for every file parser and for config parsing (used by tests/test_fuzz.py and
benchmarks/fuzz.py).

A target is a set of valid seed files (the tiny fixtures, or files written here) plus the
parser call. Each case writes the seeds into a fresh folder with one file replaced by
random bytes or by a mutated copy of its seed (truncation, deleted/duplicated columns,
wrong separators, non-UTF-8 bytes, huge/negative/unicode numbers, empty lines, BOMs, ...),
then calls the parser. The contract (``check_case``):

* it returns a valid result (checked per target), or raises the target's named error
  (``DataError``/``LoadError``/``TokenizerError``/``ConfigError``/absl flag errors) whose
  message names the file or folder it read;
* never another exception type, never a hang (``DEADLINE_S`` per case, SIGALRM);
* writers leave their target folder absent or complete (no temp leftovers beside it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import json
import pathlib
import signal
import tempfile
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import strategies as st

from ilm_jax.data.types import DataError

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
DEADLINE_S = 10.0


class Hang(Exception):
  """A case ran past DEADLINE_S."""


class ContractViolation(AssertionError):
  """The parser broke the contract (wrong exception type, no path, invalid result...)."""


@dataclasses.dataclass
class Target:
  """One parser under fuzzing.

  Attributes:
    name: short name for tables.
    files: relative path -> valid seed bytes (uncompressed for '.gz' paths).
    fuzz: the files that get mutated (one per case).
    call: root folder -> result; raises one of ``errors`` on bad input.
    errors: the named error classes.
    check: validates a returned result (raise AssertionError when invalid).
    seps: per fuzzed file, its field separator (for column mutations).
    named: root -> the path the error message must contain (default: the root).
  """

  name: str
  files: dict[str, bytes]
  fuzz: tuple[str, ...]
  call: Callable[[pathlib.Path], Any]
  errors: tuple[type[BaseException], ...]
  check: Callable[[Any], None] | None = None
  seps: dict[str, bytes] = dataclasses.field(default_factory=dict)
  named: Callable[[pathlib.Path], str] | None = None


# ---------------------------------------------------------------------- mutations

_OPS = ("truncate", "delete_column", "duplicate_column", "swap_separator", "non_utf8",
        "odd_number", "empty_lines", "bom", "insert_bytes", "duplicate_line", "delete_line",
        "crlf", "nul", "swap_lines", "flip_byte")
_ODD_NUMBERS = (b"9" * 25, b"9" * 400, b"-1", b"-0", b"0", b"+3", b"1e5", b"1.5", b"nan",
                b"\xb2", "\u0663".encode(), "\uff11".encode(), b" ", b"", b"0x10",
                b"18446744073709551616", b"999999999999", b"-9223372036854775809")


def _lines(data: bytes) -> list[bytes]:
  return data.split(b"\n")


@st.composite
def _mutate_once(draw, data: bytes, sep: bytes) -> bytes:
  op = draw(st.sampled_from(_OPS))
  n = len(data)
  pos = draw(st.integers(0, n))
  if op == "truncate":
    return data[:pos]
  if op in ("delete_column", "duplicate_column") and sep:
    lines = _lines(data)
    k = draw(st.integers(0, 6))
    every = draw(st.booleans())
    which = None if every else draw(st.integers(0, max(len(lines) - 1, 0)))
    out = []
    for i, line in enumerate(lines):
      fields = line.split(sep)
      if (which is None or i == which) and k < len(fields):
        fields = fields[:k] + fields[k + 1:] if op == "delete_column" else (
            fields[:k + 1] + fields[k:])
      out.append(sep.join(fields))
    return b"\n".join(out)
  if op == "swap_separator":
    new = draw(st.sampled_from([b"\t", b" ", b",", b"::", b":", b";", b"|", b"\t\t", b""]))
    return data.replace(sep, new) if sep else data
  if op in ("delete_column", "duplicate_column"):
    return data
  if op == "non_utf8":
    bad = draw(st.sampled_from([b"\xff", b"\xe9", b"\xc3", b"\xed\xa0\x80", b"\x80\x80",
                                b"\xb2", b"\xf0\x9f"]))
    return data[:pos] + bad + data[pos:]
  if op == "odd_number":
    digits = [i for i in range(n) if data[i:i + 1].isdigit() and (i == 0 or
                                                                   not data[i - 1:i].isdigit())]
    if not digits:
      return data
    start = draw(st.sampled_from(digits))
    end = start
    while end < n and data[end:end + 1].isdigit():
      end += 1
    return data[:start] + draw(st.sampled_from(_ODD_NUMBERS)) + data[end:]
  if op == "empty_lines":
    blank = draw(st.sampled_from([b"\n", b"\n\n", b" \n", b"\t\n", b"\r\n"]))
    return data[:pos] + blank + data[pos:]
  if op == "bom":
    return draw(st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"])) + data
  if op == "insert_bytes":
    return data[:pos] + draw(st.binary(min_size=1, max_size=40)) + data[pos:]
  if op in ("duplicate_line", "delete_line", "swap_lines"):
    lines = _lines(data)
    i = draw(st.integers(0, max(len(lines) - 1, 0)))
    j = draw(st.integers(0, max(len(lines) - 1, 0)))
    if op == "duplicate_line":
      lines.insert(j, lines[i])
    elif op == "delete_line":
      del lines[i]
    else:
      lines[i], lines[j] = lines[j], lines[i]
    return b"\n".join(lines)
  if op == "crlf":
    return data.replace(b"\n", draw(st.sampled_from([b"\r\n", b"\r", b"\n\r"])))
  if op == "nul":
    return data[:pos] + b"\0" + data[pos:]
  # flip_byte
  if n == 0:
    return data
  i = min(pos, n - 1)
  return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1:]


@st.composite
def mutated(draw, data: bytes, sep: bytes = b"") -> bytes:
  """``data`` with 1-3 random mutations applied."""
  for _ in range(draw(st.integers(1, 3))):
    data = draw(_mutate_once(data, sep))
  return data


@st.composite
def case(draw, target: Target) -> dict[str, bytes]:
  """The files of one case: the seeds with one of ``target.fuzz`` fuzzed."""
  files = dict(target.files)
  name = draw(st.sampled_from(target.fuzz))
  kind = draw(st.sampled_from(["mutate", "mutate", "mutate", "random", "empty"]))
  if kind == "random":
    files[name] = draw(st.binary(max_size=600))
  elif kind == "empty":
    files[name] = draw(st.sampled_from([b"", b"\n", b" \n\n", b"\xef\xbb\xbf"]))
  else:
    files[name] = draw(mutated(files[name], target.seps.get(name, b"")))
  compressed = {}
  for path, data in files.items():
    if path.endswith(".gz"):
      data = gzip.compress(data, mtime=0)
      if path == name and draw(st.booleans()):  # damage the gzip stream itself
        data = draw(mutated(data))
    compressed[path] = data
  return compressed


# ---------------------------------------------------------------------- the contract


@contextlib.contextmanager
def deadline(seconds: float = DEADLINE_S):
  """Raises Hang in the main thread when the block runs longer than ``seconds``."""
  def on_alarm(signum, frame):
    del signum, frame
    raise Hang(f"no result after {seconds}s")
  old = signal.signal(signal.SIGALRM, on_alarm)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


def write_files(root: pathlib.Path, files: dict[str, bytes]) -> None:
  for rel, data in files.items():
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)


def check_case(target: Target, files: dict[str, bytes]) -> str:
  """Runs one case; returns 'ok' or 'error' (a clean named error), raises ContractViolation."""
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp) / "in"
    root.mkdir()
    write_files(root, files)
    try:
      with deadline():
        result = target.call(root)
    except target.errors as e:
      where = target.named(root) if target.named else str(root)
      if where not in str(e):
        raise ContractViolation(f"{target.name}: {type(e).__name__} does not name {where}: "
                                f"{e}") from e
      return "error"
    except Hang as e:
      raise ContractViolation(f"{target.name}: hang: {e}") from e
    except Exception as e:  # noqa: BLE001  (any other type breaks the contract)
      raise ContractViolation(f"{target.name}: {type(e).__name__} instead of "
                              f"{'/'.join(c.__name__ for c in target.errors)}: {e}") from e
    if target.check is not None:
      try:
        target.check(result)
      except AssertionError as e:
        raise ContractViolation(f"{target.name}: invalid result: {e}") from e
    return "ok"


# ---------------------------------------------------------------------- result checks


def _check_rec_dataset(ds) -> None:
  u, n = ds.num_users, ds.num_items
  assert len(ds.sequences) == u and len(ds.item_text) == n and len(ds.item_titles) == n
  assert len(set(map(str, ds.item_ids))) == n, "duplicate item ids"
  assert len(set(map(str, ds.user_ids))) == u, "duplicate user ids"
  for s in ds.sequences:
    assert s.dtype == np.int32 and (len(s) == 0 or (0 <= s.min() and s.max() < n)), s
  for k, v in ds.item_attrs.items():
    assert len(v) == n, k
  if ds.item_tokens is not None:
    assert len(ds.item_tokens) == n
  if ds.user_tokens is not None:
    assert len(ds.user_tokens) == u


def _check_item_table(t) -> None:
  n = len(t.index)
  assert sorted(t.index.values()) == list(range(n))
  assert len(t.text) == n and len(t.titles) == n
  for k, v in t.attrs.items():
    assert len(v) == n, k


# ---------------------------------------------------------------------- targets


def _fixture(*parts: str) -> bytes:
  return FIXTURES.joinpath(*parts).read_bytes()


def _ml_files() -> dict[str, bytes]:
  return {"movies.dat": _fixture("ml1m_tiny", "movies.dat"),
          "ratings.dat": _fixture("ml1m_tiny", "ratings.dat"),
          "users.dat": _fixture("ml1m_tiny", "users.dat"),
          "extra/movies_tmdb_overview.tsv": _fixture("ml1m_tiny", "extra",
                                                     "movies_tmdb_overview.tsv")}


def _ml_derived() -> tuple[bytes, bytes]:
  """The ratings fixture as the chronological sequence file and the file-order pairs file."""
  rows = [line.split("::") for line in _fixture("ml1m_tiny", "ratings.dat").decode().split()]
  pairs = "".join(f"{u}\t{m}\n" for u, m, _, _ in rows)
  seqs: dict[str, list[tuple[int, str]]] = {}
  for u, m, _, t in rows:
    seqs.setdefault(u, []).append((int(t), m))
  lines = "".join(f"{u} {' '.join(m for _, m in sorted(v, key=lambda x: x[0]))}\n"
                  for u, v in seqs.items())
  return lines.encode(), pairs.encode()


def _openp5_files() -> dict[str, bytes]:
  names = ("user_sequence.txt", "user_indexing.txt", "item_random_indexing.txt",
           "user_sequence_random_indexing.txt")
  return {n: _fixture("openp5_tiny", n) for n in names}


def _tiny_gguf() -> bytes:
  """A 2-layer, 8-wide llama GGUF with a 6-token byte-level BPE vocab (F32 + Q8_0)."""
  import gguf  # noqa: PLC0415

  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    dim, ffn, heads, kv, vocab = 32, 64, 4, 2, 6
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab", "<s>", "</s>", "Ġ"])
    w.add_token_types([1, 1, 1, 3, 3, 1])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(3)
    w.add_eos_token_id(4)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    rng = np.random.default_rng(0)
    hd = dim // heads
    shapes = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,)}
    for i in range(2):
      shapes |= {f"blk.{i}.attn_norm.weight": (dim,), f"blk.{i}.ffn_norm.weight": (dim,),
                 f"blk.{i}.attn_q.weight": (heads * hd, dim),
                 f"blk.{i}.attn_k.weight": (kv * hd, dim),
                 f"blk.{i}.attn_v.weight": (kv * hd, dim),
                 f"blk.{i}.attn_output.weight": (dim, heads * hd),
                 f"blk.{i}.ffn_gate.weight": (ffn, dim), f"blk.{i}.ffn_up.weight": (ffn, dim),
                 f"blk.{i}.ffn_down.weight": (dim, ffn)}
    for name, shape in shapes.items():
      a = rng.standard_normal(shape).astype(np.float32)
      if len(shape) == 2 and shape[-1] % 32 == 0 and "attn_v" in name:
        q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
      else:
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _load_gguf(root: pathlib.Path):
  from ilm_jax.models import llm_loading  # noqa: PLC0415

  return llm_loading.load_gguf_state_dict(root / "m.gguf", use_cache=False)


def _check_gguf(result) -> None:
  config, sd = result
  assert config.layers >= 0 and config.dim > 0 and config.heads > 0
  for name, a in sd.items():
    assert a.dtype == np.float32, name


def _gguf_tokenizer(root: pathlib.Path):
  from ilm_jax import llm_tokenizer  # noqa: PLC0415

  tok = llm_tokenizer.LlmTokenizer.from_gguf(root / "m.gguf")
  tok.decode(tok.encode("ab a b"))
  return tok


_HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 32, "intermediate_size": 64,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
    "vocab_size": 6, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
    "tie_word_embeddings": True, "bos_token_id": 3, "eos_token_id": [4],
    "max_position_embeddings": 64, "rope_scaling": None,
}


def _hf_config(root: pathlib.Path):
  from ilm_jax.models import llm_loading  # noqa: PLC0415

  # load_hf's config step; without weights the loader stops with LoadError after it.
  return llm_loading.load_hf(root)


def _tokenizer_json() -> bytes:
  from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415

  tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2, "<s>": 3, "</s>": 4}, merges=[
      ("a", "b")]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  return tok.to_str().encode()


def _hf_tokenizer(root: pathlib.Path):
  from ilm_jax import llm_tokenizer  # noqa: PLC0415

  tok = llm_tokenizer.LlmTokenizer.from_hf(root)
  tok.decode(tok.encode("ab"))
  return tok


def _zip_bytes() -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
    for name, data in _ml_files().items():
      z.writestr(f"ml-1m/{name}", data)
  return buf.getvalue()


def _extract(root: pathlib.Path):
  from ilm_jax.data import download  # noqa: PLC0415

  dest = root / "out" / "ml-1m"
  try:
    return download.extract_zip(root / "ml-1m.zip", dest)
  finally:
    _check_absent_or_complete(dest, download._COMPLETE)  # noqa: SLF001


def _check_absent_or_complete(dest: pathlib.Path, marker: str) -> None:
  """A writer's destination is absent or holds its completion marker; no temp leftovers."""
  if dest.exists() and not (dest / marker).exists():
    raise ContractViolation(f"{dest} exists without its {marker} marker (half-written)")
  leftovers = [p.name for p in dest.parent.iterdir() if p.name != dest.name] \
      if dest.parent.exists() else []
  if leftovers:
    raise ContractViolation(f"temp leftovers beside {dest}: {leftovers}")


def _check_extracted(root) -> None:
  assert (pathlib.Path(root) / "movies.dat").exists()


def targets() -> dict[str, Target]:
  """Every fuzz target by name (built lazily: the GGUF/store seeds take a moment)."""
  from ilm_jax.data import amazon, movielens, openp5  # noqa: PLC0415
  from ilm_jax.models import llm_loading  # noqa: PLC0415

  seqs, pairs = _ml_derived()
  ml = _ml_files()
  out = [
      Target("movielens/movies.dat+tmdb", ml, ("movies.dat", "extra/movies_tmdb_overview.tsv"),
             lambda r: movielens.load_movie_meta(r / "movies.dat",
                                                 r / "extra" / "movies_tmdb_overview.tsv"),
             (DataError,), _check_item_table,
             {"movies.dat": b"::", "extra/movies_tmdb_overview.tsv": b"\t"}),
      Target("movielens/ratings.dat", ml, ("ratings.dat", "users.dat", "movies.dat"),
             movielens.load_movielens, (DataError,), _check_rec_dataset,
             {"ratings.dat": b"::", "users.dat": b"::", "movies.dat": b"::"}),
      Target("movielens/sequences.gz",
             {"movies.dat": ml["movies.dat"], f"derived/{movielens.SEQUENCES_FILE}": seqs},
             (f"derived/{movielens.SEQUENCES_FILE}",), movielens.load_movielens, (DataError,),
             _check_rec_dataset, {f"derived/{movielens.SEQUENCES_FILE}": b" "}),
      Target("movielens/pairs.gz",
             {"movies.dat": ml["movies.dat"], f"derived/{movielens.PAIRS_FILE}": pairs},
             (f"derived/{movielens.PAIRS_FILE}",), movielens.load_movielens, (DataError,),
             _check_rec_dataset, {f"derived/{movielens.PAIRS_FILE}": b"\t"}),
      Target("openp5/folder", _openp5_files(), tuple(_openp5_files()), openp5.load_openp5,
             (DataError,), _check_rec_dataset, dict.fromkeys(_openp5_files(), b" ")),
      Target("amazon/.item", {"x.item": _fixture("openp5_tiny", "tiny.item")}, ("x.item",),
             lambda r: amazon.load_amazon_items(r / "x.item"), (DataError,), _check_item_table,
             {"x.item": b"\t"}),
      Target("gguf/config+tensors", {"m.gguf": _tiny_gguf()}, ("m.gguf",), _load_gguf,
             (llm_loading.LoadError,), _check_gguf),
      Target("hf/config.json", {"config.json": json.dumps(_HF_CONFIG, indent=1).encode()},
             ("config.json",), _hf_config, (llm_loading.LoadError,), None,
             {"config.json": b","}),
      Target("download/zip", {"ml-1m.zip": _zip_bytes()}, ("ml-1m.zip",), _extract,
             (DataError,), _check_extracted),
  ]
  from ilm_jax import llm_tokenizer  # noqa: PLC0415
  out += [
      Target("gguf/tokenizer", {"m.gguf": _tiny_gguf()}, ("m.gguf",), _gguf_tokenizer,
             (llm_tokenizer.TokenizerError, llm_loading.LoadError)),
      Target("hf/tokenizer.json",
             {"tokenizer.json": _tokenizer_json(),
              "tokenizer_config.json": json.dumps({"eos_token": "</s>",
                                                   "bos_token": "<s>"}).encode()},
             ("tokenizer.json", "tokenizer_config.json"), _hf_tokenizer,
             (llm_tokenizer.TokenizerError,), None,
             {"tokenizer.json": b",", "tokenizer_config.json": b","}),
  ]
  out.append(store_target())
  return {t.name: t for t in out}


def _prepared_files() -> dict[str, bytes]:
  """A prepared data dir (store.write of a 4-item, 3-user dataset), as relative path -> bytes."""
  from ilm_jax.data import store  # noqa: PLC0415
  from ilm_jax.data.types import RecDataset  # noqa: PLC0415

  ds = RecDataset(
      name="toy", item_ids=np.array(["B1", "0042", "ä", "x y"]),
      user_ids=np.array(["A1", "A2", "A3"]),
      sequences=[np.array([0, 1, 2], np.int32), np.array([3, 1, 0], np.int32),
                 np.array([2], np.int32)],
      item_text=["Toy (1995)", "", "Amélie", "two\nlines"], item_titles=["Toy", "", "A", "X"],
      item_attrs={"genres": [["A", "B"], [], ["C"], ["D"]]},
      item_tokens=["1003", "1001", "1004", "1002"], user_tokens=["1", "2", "3"],
      extras={"cluster": np.array([2, 0, 1, 2], np.int64)})
  with tempfile.TemporaryDirectory() as tmp:
    d = pathlib.Path(tmp) / "toy"
    store.write(ds, d, progress=False)
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _store_load(root: pathlib.Path):
  from ilm_jax.data import store  # noqa: PLC0415

  return store.load(root)


def store_target() -> Target:
  files = _prepared_files()
  return Target("store/prepared-dir", files, tuple(files), _store_load, (DataError,),
                _check_rec_dataset, {k: b"," for k in files if k.endswith(".json")})


# ---------------------------------------------------------------------- config parsing

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
_ODD_VALUES = ("", "None", "none", "[1,", "(1,", "{", "true", "maybe", "-1", "0", "1e400", "nan",
               "inf", "99999999999999999999999", "0x10", "'x'", "\\", "=", " ", "--config",
               "ml1m", "openp5", "generated", "movielens", "/nonexistent/dir", "gs://b/x")
_ODD_ARGS = ("", "tiny", "ml1m", "beauty", "clothing", "movielens", "generated", "download",
             "ml1m,tiny", "tiny,tiny", ",", "ML1M", " tiny ", "bogus", "phase1", "it-ii",
             "\x00", "a:b", "1", "generated,download")


def _leaves(c, prefix: str = "") -> list[str]:
  out = []
  for k, v in c.items():
    if hasattr(v, "items"):
      out += [f"{prefix}{k}"] + _leaves(v, f"{prefix}{k}.")
    else:
      out.append(f"{prefix}{k}")
  return out


def config_keys(config_file: pathlib.Path) -> list[str]:
  """Every key path of the file's default config (sub-dicts included)."""
  import importlib.util  # noqa: PLC0415

  spec = importlib.util.spec_from_file_location(f"_fuzz_cfg_{config_file.stem}", config_file)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return _leaves(mod.get_config(""))


@st.composite
def config_argv(draw, config_files: list[pathlib.Path]) -> list[str]:
  """``--config=FILE[:ARG] --config.key=value ...`` with odd args, keys and values."""
  f = draw(st.sampled_from(config_files))
  arg = draw(st.one_of(st.sampled_from(_ODD_ARGS), st.text(max_size=12)))
  argv = [f"--config={f}" + (f":{arg}" if arg or draw(st.booleans()) else "")]
  keys = config_keys(f)
  for _ in range(draw(st.integers(0, 3))):
    key = draw(st.one_of(st.sampled_from(keys), st.sampled_from(keys).map(lambda k: k + ".x"),
                         st.text("abcxyz_.", min_size=1, max_size=8)))
    value = draw(st.one_of(st.sampled_from(_ODD_VALUES), st.text(max_size=12),
                           st.integers().map(str), st.floats().map(str)))
    argv.append(f"--config.{key}={value}" if draw(st.integers(0, 9)) else f"--config.{key}")
  return argv


def parse_config(argv: list[str]):
  """main's flag parsing (fresh FlagValues) + ``config_lib.validate``."""
  from absl import flags  # noqa: PLC0415
  from ml_collections import config_flags  # noqa: PLC0415

  from ilm_jax import config_lib, main  # noqa: PLC0415

  argv = ["ilm_jax.main", *argv, "--workdir=/tmp/unused"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  main.parse_flags(argv, fv)
  config = fv.config
  config_lib.validate(config)
  return config


def check_config_case(argv: list[str]) -> str:
  """Contract for config parsing: a config, or flags.Error/ConfigError naming the flag/key."""
  from absl import flags  # noqa: PLC0415

  from ilm_jax import config_lib  # noqa: PLC0415

  try:
    with deadline():
      config = parse_config(argv)
  except (flags.Error, config_lib.ConfigError) as e:
    if "config" not in str(e):
      raise ContractViolation(f"config: {type(e).__name__} names no flag/key: {e}") from e
    return "error"
  except Hang as e:
    raise ContractViolation(f"config: hang on {argv}") from e
  except Exception as e:  # noqa: BLE001
    raise ContractViolation(f"config: {type(e).__name__} instead of flags.Error/ConfigError "
                            f"for {argv}: {e}") from e
  if "job" not in config:
    raise ContractViolation(f"config: parsed config has no job: {argv}")
  return "ok"


# ---------------------------------------------------------------------- the store writer

_ANY_CHAR = st.characters(exclude_categories=())  # surrogates and controls included


@st.composite
def rec_datasets(draw):
  """Small RecDatasets with arbitrary text (lone surrogates, NULs, newlines) and attrs."""
  from ilm_jax.data.types import RecDataset  # noqa: PLC0415

  n, u = draw(st.integers(0, 4)), draw(st.integers(0, 3))
  text = st.text(_ANY_CHAR, max_size=8)
  ids = st.lists(text, min_size=n, max_size=n, unique=True)
  attr_names = draw(st.lists(st.text(_ANY_CHAR, max_size=4), max_size=2, unique=True))
  return RecDataset(
      name="fz", item_ids=np.array(draw(ids), dtype=str),
      user_ids=np.array(draw(st.lists(text, min_size=u, max_size=u, unique=True)), dtype=str),
      sequences=[np.array(draw(st.lists(st.integers(0, max(n - 1, 0)), max_size=5 if n else 0)),
                          np.int32) for _ in range(u)],
      item_text=draw(st.lists(text, min_size=n, max_size=n)),
      item_titles=draw(st.lists(text, min_size=n, max_size=n)),
      item_attrs={a: draw(st.lists(st.lists(text, max_size=2), min_size=n, max_size=n))
                  for a in attr_names},
      item_tokens=draw(st.none() | st.lists(text, min_size=n, max_size=n)),
      user_tokens=draw(st.none() | st.lists(text, min_size=u, max_size=u)),
      extras=draw(st.sampled_from([{}, {"c": np.arange(n, dtype=np.int64)}])))


def check_writer_case(ds) -> str:
  """store.write: a complete dir that loads back equal, or an error and no dir/leftovers.

  Returns 'ok' or 'error'; raises ContractViolation.
  """
  from ilm_jax.data import store  # noqa: PLC0415

  with tempfile.TemporaryDirectory() as tmp:
    dest = pathlib.Path(tmp) / "out" / "fz"
    try:
      with deadline(60):
        store.write(ds, dest, progress=False)
    except Hang as e:
      raise ContractViolation(f"store.write: hang: {e}") from e
    except Exception as e:  # noqa: BLE001
      # Any error type is acceptable here (the parsers never produce text TFDS cannot
      # encode, e.g. lone surrogates: TFDS raises RuntimeError for those); a half-written
      # folder is not.
      leftovers = sorted(p.name for p in dest.parent.iterdir()) if dest.parent.exists() else []
      if leftovers:
        raise ContractViolation(f"store.write failed ({type(e).__name__}: {e}) and left "
                                f"{leftovers}") from e
      return "error"
    back = store.load(dest)
    same = (list(back.item_ids) == list(ds.item_ids) and list(back.user_ids) == list(ds.user_ids)
            and [list(s) for s in back.sequences] == [list(s) for s in ds.sequences]
            and list(back.item_text) == list(ds.item_text)
            and list(back.item_titles) == list(ds.item_titles)
            and back.item_attrs == ds.item_attrs
            and (back.item_tokens is None) == (ds.item_tokens is None)
            and (back.user_tokens is None) == (ds.user_tokens is None)
            and list(back.item_tokens or []) == list(ds.item_tokens or [])
            and list(back.user_tokens or []) == list(ds.user_tokens or []))
    if not same:
      raise ContractViolation(f"store.write/load round trip changed the dataset: {ds} -> {back}")
    return "ok"


# ---------------------------------------------------------------------- generated catalogue

_GEN_KEYS = ("seed", "num_items", "num_users", "num_clusters", "min_len", "max_len")


@st.composite
def generated_configs(draw) -> dict:
  """``config.data`` for source='generated' with small, zero, negative or huge values."""
  small = st.integers(-3, 120)
  g = {"seed": draw(st.one_of(st.integers(-5, 5), st.integers(0, 2**70))),
       "num_items": draw(st.integers(-3, 300)), "num_users": draw(small),
       "num_clusters": draw(st.integers(-3, 30)), "min_len": draw(st.integers(-3, 30)),
       "max_len": draw(st.integers(-3, 60))}
  return {"source": "generated", "dir": "", "name": "", "item_meta": "",
          "min_core": draw(st.integers(0, 40)), "generated": g}


def check_generated_case(data_config: dict) -> str:
  """sources.load_dataset: a valid RecDataset or a ValueError naming the offending key."""
  from ilm_jax.data import sources  # noqa: PLC0415

  try:
    with deadline():
      ds = sources.load_dataset(data_config)
  except ValueError as e:  # DataError and ConfigError are ValueErrors
    if not any(k in str(e) for k in (*_GEN_KEYS, "min_core")):
      raise ContractViolation(f"generated: error names no config key: {e}") from e
    return "error"
  except Hang as e:
    raise ContractViolation(f"generated: hang on {data_config['generated']}") from e
  except Exception as e:  # noqa: BLE001
    raise ContractViolation(f"generated: {type(e).__name__} for {data_config}: {e}") from e
  try:
    _check_rec_dataset(ds)
    lengths = [len(s) for s in ds.sequences]
    assert not lengths or min(lengths) >= data_config["min_core"], "k-core violated"
  except AssertionError as e:
    raise ContractViolation(f"generated: invalid result for {data_config}: {e}") from e
  return "ok"
