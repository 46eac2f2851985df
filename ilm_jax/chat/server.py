"""HTTP JSON API + a chat page, stdlib only (``ThreadingHTTPServer``).

  GET  /                      the chat page (static/index.html, app.js, style.css)
  GET  /api/health            {"ok": true, "items": N, "sessions": n}
  GET  /api/items?q=TEXT&k=5  text search over the catalogue
  GET  /api/items/<id>        one item's details
  POST /api/recommend         {"user": int} and/or {"history": [title | id, ...]}, "k": 1..50,
                              "ranker": cf|retrieval|blend -> {"items": [...]}
  POST /api/chat              {"session": str (optional), "message": str, "user": int
                              (optional, new sessions), "liked": [titles|ids] (optional)}
                              -> {"session": id, "reply": str, "items": [...],
                                  "tool_calls": [...], ...}

Every bad request -- unparsable JSON, a body over ``MAX_BODY`` bytes, wrong types, unknown
users/items/fields, a message over the length cap -- is a 4xx JSON ``{"error": msg}``;
an unexpected exception is a 500 JSON error; the process keeps serving. Sessions live in
an LRU of at most ``max_sessions`` entries, each dropped after ``ttl_s`` idle seconds, so
memory stays bounded. Model calls are serialised (``ServedModel.lock``).
"""

from __future__ import annotations

import collections
import json
import pathlib
import secrets
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ilm_jax.chat import session as session_lib
from ilm_jax.chat import tools as tools_lib

MAX_BODY = 64 * 1024
MAX_K = 50
MAX_HISTORY_ITEMS = 200
STATIC = pathlib.Path(__file__).parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}


class RequestError(Exception):
  """A client error: ``status`` (4xx) and a message for the JSON body."""

  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status


class Sessions:
  """LRU + TTL store of chat sessions (thread-safe)."""

  def __init__(self, factory, max_sessions: int = 256, ttl_s: float = 1800.0):
    self.factory, self.max, self.ttl = factory, int(max_sessions), float(ttl_s)
    self._d: collections.OrderedDict[str, session_lib.ChatSession] = collections.OrderedDict()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._d)

  def _expire(self, now: float) -> None:
    for sid in [s for s, v in self._d.items() if now - v.last_used > self.ttl]:
      del self._d[sid]

  def get_or_create(self, sid: str | None, **kw) -> tuple[str, session_lib.ChatSession]:
    with self._lock:
      now = time.monotonic()
      self._expire(now)
      if sid is not None and sid in self._d:
        self._d.move_to_end(sid)
        return sid, self._d[sid]
      sess = self.factory(**kw)
      sid = secrets.token_urlsafe(12)
      self._d[sid] = sess
      while len(self._d) > self.max:
        self._d.popitem(last=False)
      return sid, sess


class App:
  """The request logic (no sockets: tests call ``handle`` directly too)."""

  def __init__(self, served, config: session_lib.SessionConfig | None = None, *,
               max_sessions: int = 256, ttl_s: float = 1800.0):
    self.served = served
    self.config = config or session_lib.SessionConfig()
    self.tools = tools_lib.Toolbox(served, self.config.ranker)
    self.sessions = Sessions(self._new_session, max_sessions, ttl_s)

  def _new_session(self, user=None, liked=()):
    sess = session_lib.ChatSession(self.served, self.config, user=user)
    if liked:
      sess.like(liked)
    return sess

  # ------------------------------------------------------------------ validation

  def _user(self, body: dict) -> int | None:
    u = body.get("user")
    if u is None:
      return None
    if isinstance(u, bool) or not isinstance(u, int):
      raise RequestError(400, f'"user" must be an integer user index, got {u!r}')
    if not 0 <= u < len(self.served.histories):
      raise RequestError(404, f"unknown user {u} (valid: 0..{len(self.served.histories) - 1})")
    return u

  def _items(self, refs: Any, field: str) -> list[int]:
    if refs is None:
      return []
    if not isinstance(refs, list):
      raise RequestError(400, f'"{field}" must be a list of titles or item ids')
    if len(refs) > MAX_HISTORY_ITEMS:
      raise RequestError(413, f'"{field}" has {len(refs)} entries; the limit is '
                              f"{MAX_HISTORY_ITEMS}")
    out = []
    for r in refs:
      if not isinstance(r, (int, str)) or isinstance(r, bool) or (isinstance(r, str)
                                                                  and len(r) > 300):
        raise RequestError(400, f'"{field}" entries are item ids or titles, got {r!r:.80}')
      try:
        out.append(self.tools.item_ref(r))
      except ValueError as e:
        raise RequestError(404, str(e)) from None
    return out

  @staticmethod
  def _int(body: dict, key: str, default: int, lo: int, hi: int) -> int:
    v = body.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
      raise RequestError(400, f'"{key}" must be an integer in {lo}..{hi}, got {v!r:.40}')
    return v

  @staticmethod
  def _fields(body: Any, allowed: set[str]) -> dict:
    if not isinstance(body, dict):
      raise RequestError(400, "the body must be a JSON object")
    extra = sorted(set(body) - allowed)
    if extra:
      raise RequestError(400, f"unknown fields {extra}; allowed: {sorted(allowed)}")
    return body

  # ------------------------------------------------------------------ endpoints

  def recommend(self, body: Any) -> dict:
    body = self._fields(body, {"user", "history", "k", "ranker"})
    user = self._user(body)
    hist = self._items(body.get("history"), "history")
    k = self._int(body, "k", 10, 1, MAX_K)
    ranker = body.get("ranker", self.config.ranker)
    if ranker not in ("cf", "retrieval", "blend"):
      raise RequestError(400, f'"ranker" must be cf, retrieval or blend, got {ranker!r:.40}')
    if user is None and not hist:
      raise RequestError(400, 'give "user" or a non-empty "history"')
    recs = self.served.recommend(hist, k, user=user, ranker=ranker)
    cat = self.served.catalogue
    return {"items": [{**cat.details(i), "score": s} for i, s in recs]}

  def chat(self, body: Any) -> dict:
    body = self._fields(body, {"session", "message", "user", "liked"})
    msg = body.get("message")
    if not isinstance(msg, str) or not msg.strip():
      raise RequestError(400, '"message" must be a non-empty string')
    if len(msg) > session_lib.MAX_MESSAGE_CHARS:
      raise RequestError(413, f'"message" is {len(msg)} characters; the limit is '
                              f"{session_lib.MAX_MESSAGE_CHARS}")
    sid = body.get("session")
    if sid is not None and (not isinstance(sid, str) or len(sid) > 64):
      raise RequestError(400, '"session" must be a session id string')
    user = self._user(body)
    liked = self._items(body.get("liked"), "liked")
    sid, sess = self.sessions.get_or_create(sid, user=user, liked=liked)
    with sess.lock:
      rec = sess.send(msg)
    return {"session": sid, **rec}

  def items(self, query: dict[str, list[str]]) -> dict:
    q = (query.get("q") or [""])[0]
    if len(q) > 300:
      raise RequestError(413, '"q" is longer than 300 characters')
    try:
      k = int((query.get("k") or ["10"])[0])
    except ValueError:
      raise RequestError(400, '"k" must be an integer') from None
    if not 1 <= k <= MAX_K:
      raise RequestError(400, f'"k" must be in 1..{MAX_K}')
    cat = self.served.catalogue
    return {"items": [{**cat.details(i), "score": s} for i, s in cat.search(q, k)]}

  def handle(self, method: str, path: str, body: bytes | None) -> tuple[int, dict]:
    """(status, JSON object) for an API request."""
    url = urllib.parse.urlsplit(path)
    try:
      if method == "GET" and url.path == "/api/health":
        return 200, {"ok": True, "items": self.served.num_items, "sessions": len(self.sessions)}
      if method == "GET" and url.path == "/api/items":
        return 200, self.items(urllib.parse.parse_qs(url.query))
      if method == "GET" and url.path.startswith("/api/items/"):
        ref = urllib.parse.unquote(url.path[len("/api/items/"):])
        return 200, self.served.catalogue.details(self._items([ref], "id")[0])
      if method == "POST" and url.path in ("/api/recommend", "/api/chat"):
        try:
          data = json.loads(body or b"")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
          raise RequestError(400, f"the body is not valid JSON: {e}") from None
        fn = self.recommend if url.path == "/api/recommend" else self.chat
        return 200, fn(data)
      if url.path.startswith("/api/"):
        return (405 if url.path in ("/api/recommend", "/api/chat", "/api/items",
                                    "/api/health") else 404), {
            "error": f"no endpoint {method} {url.path}"}
      return 404, {"error": f"not found: {url.path}"}
    except RequestError as e:
      return e.status, {"error": str(e)}
    except (ValueError, KeyError) as e:   # validation inside the model / session
      return 400, {"error": str(e.args[0] if e.args else e)}


def make_handler(app: App):

  class Handler(BaseHTTPRequestHandler):
    server_version = "ilm-jax-chat/1"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet; the load test would flood stderr
      pass

    def _send(self, status: int, payload: bytes, ctype: str) -> None:
      self.send_response(status)
      self.send_header("Content-Type", ctype)
      self.send_header("Content-Length", str(len(payload)))
      self.send_header("Cache-Control", "no-store")
      self.end_headers()
      self.wfile.write(payload)

    def _json(self, status: int, obj: dict) -> None:
      self._send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json")

    def _dispatch(self, method: str) -> None:
      try:
        body = None
        if method == "POST":
          try:
            n = int(self.headers.get("Content-Length") or "0")
          except ValueError:
            n = -1
          if n < 0:
            self.close_connection = True
            return self._json(400, {"error": "bad Content-Length"})
          if n > MAX_BODY:
            self.close_connection = True   # the unread body must not be parsed as a request
            return self._json(413, {"error": f"the body is {n} bytes; the limit is {MAX_BODY}"})
          body = self.rfile.read(n)
        path = urllib.parse.urlsplit(self.path).path
        if method == "GET" and not path.startswith("/api/"):
          name = "index.html" if path in ("/", "/index.html") else path.lstrip("/")
          f = STATIC / name
          if "/" in name or f.suffix not in _TYPES or not f.is_file():
            return self._json(404, {"error": f"not found: {path}"})
          return self._send(200, f.read_bytes(), _TYPES[f.suffix])
        status, obj = app.handle(method, self.path, body)
        self._json(status, obj)
      except Exception as e:  # noqa: BLE001 -- the process must survive any request
        try:
          self._json(500, {"error": f"internal error: {type(e).__name__}: {e}"})
        except OSError:
          pass

    def do_GET(self):  # noqa: N802
      self._dispatch("GET")

    def do_POST(self):  # noqa: N802
      self._dispatch("POST")

  return Handler


def make_server(served, config: session_lib.SessionConfig | None = None, *,
                host: str = "127.0.0.1", port: int = 0, max_sessions: int = 256,
                ttl_s: float = 1800.0) -> ThreadingHTTPServer:
  """A server (not started); ``port=0`` picks a free port (``server.server_address``)."""
  app = App(served, config, max_sessions=max_sessions, ttl_s=ttl_s)
  httpd = ThreadingHTTPServer((host, port), make_handler(app))
  httpd.daemon_threads = True
  httpd.app = app
  return httpd


def serve(served, config: session_lib.SessionConfig | None = None, *, host: str = "127.0.0.1",
          port: int = 8765, max_sessions: int = 256, ttl_s: float = 1800.0) -> None:
  """Serves until interrupted."""
  httpd = make_server(served, config, host=host, port=port, max_sessions=max_sessions,
                      ttl_s=ttl_s)
  print(f"chat: serving on http://{host}:{httpd.server_address[1]}/", flush=True)
  try:
    httpd.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    httpd.server_close()
