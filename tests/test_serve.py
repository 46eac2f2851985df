"""HTTP service: endpoints, validation (4xx JSON, never a crash), bounded sessions."""

from __future__ import annotations

import http.client
import json
import threading

import pytest

from ilm_jax.chat import server, session
from tests import _chat_tiny as T


@pytest.fixture(scope="module")
def srv():
  served = T.shared_served()
  httpd = server.make_server(served, session.SessionConfig(max_new_tokens=4), max_sessions=3)
  t = threading.Thread(target=httpd.serve_forever, daemon=True)
  t.start()
  yield httpd
  httpd.shutdown()
  httpd.server_close()


def _req(srv, method, path, body=None, raw=None, headers=None):
  conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=120)
  data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
  conn.request(method, path, body=data, headers=headers or {})
  r = conn.getresponse()
  payload = r.read()
  conn.close()
  ctype = r.getheader("Content-Type", "")
  return r.status, (json.loads(payload) if "json" in ctype else payload.decode())


def test_recommend_for_user_and_history(srv):
  served = srv.app.served
  st, out = _req(srv, "POST", "/api/recommend", {"user": 4, "k": 5})
  assert st == 200 and [it["id"] for it in out["items"]] == \
      [i for i, _ in served.recommend(k=5, user=4)]
  title = served.catalogue.titles[3]
  st, out = _req(srv, "POST", "/api/recommend", {"history": [title, 10], "k": 3})
  assert st == 200 and [it["id"] for it in out["items"]] == \
      [i for i, _ in served.recommend([3, 10], 3)]
  assert all(it["title"] for it in out["items"])


def test_chat_turns_keep_the_session_and_name_items(srv):
  title = srv.app.served.catalogue.titles[3]
  st, a = _req(srv, "POST", "/api/chat", {"message": f"I loved {title}"})
  assert st == 200 and a["mentioned"][0]["id"] == 3
  st, b = _req(srv, "POST", "/api/chat", {"session": a["session"], "message": "recommend 3"})
  assert st == 200 and b["session"] == a["session"]
  assert b["tool_calls"][0]["call"]["arguments"]["history"] == [3]
  assert len(b["items"]) == 3 and all(it["title"] in b["reply"] for it in b["items"])


def test_items_search_and_details(srv):
  cat = srv.app.served.catalogue
  st, out = _req(srv, "GET", "/api/items?q=" + cat.titles[7].replace(" ", "+") + "&k=3")
  assert st == 200 and out["items"][0]["id"] == 7
  st, out = _req(srv, "GET", "/api/items/7")
  assert st == 200 and out["title"] == cat.titles[7]


@pytest.mark.parametrize("method,path,body,status,msg", [
    ("POST", "/api/chat", b"{not json", 400, "not valid JSON"),
    ("POST", "/api/chat", b"\xff\xfe", 400, "not valid JSON"),
    ("POST", "/api/chat", b"[1, 2]", 400, "JSON object"),
    ("POST", "/api/chat", b'{"message": 5}', 400, "non-empty string"),
    ("POST", "/api/chat", b'{"message": ""}', 400, "non-empty string"),
    ("POST", "/api/chat", json.dumps({"message": "x" * 3000}).encode(), 413, "limit"),
    ("POST", "/api/chat", b'{"message": "hi", "evil": 1}', 400, "unknown fields"),
    ("POST", "/api/chat", b'{"message": "hi", "user": 999999}', 404, "unknown user"),
    ("POST", "/api/chat", b'{"message": "hi", "user": "3"}', 400, "integer"),
    ("POST", "/api/chat", b'{"message": "hi", "session": 7}', 400, "session id"),
    ("POST", "/api/recommend", b'{"user": 1, "k": 0}', 400, "1..50"),
    ("POST", "/api/recommend", b'{"user": 1, "k": true}', 400, "1..50"),
    ("POST", "/api/recommend", b'{"history": [123456]}', 404, "no item with id"),
    ("POST", "/api/recommend", b'{"history": ["zzqqxx yyy"]}', 404, "no catalogue item"),
    ("POST", "/api/recommend", b'{"history": "abc"}', 400, "list"),
    ("POST", "/api/recommend", b'{"history": [[1]]}', 400, "item ids or titles"),
    ("POST", "/api/recommend", b'{}', 400, "give"),
    ("POST", "/api/recommend", b'{"user": 1, "ranker": "magic"}', 400, "ranker"),
    ("GET", "/api/items?k=abc", None, 400, "integer"),
    ("GET", "/api/items/99999", None, 404, "no item"),
    ("GET", "/api/nothing", None, 404, "no endpoint"),
    ("GET", "/api/chat", None, 405, "no endpoint"),
    ("GET", "/../../etc/passwd", None, 404, "not found"),
])
def test_bad_requests_get_4xx_json(srv, method, path, body, status, msg):
  st, out = _req(srv, method, path, raw=body)
  assert st == status and msg in out["error"], out
  assert _req(srv, "GET", "/api/health")[0] == 200   # still serving


def test_oversized_body_is_refused_unread(srv):
  st, out = _req(srv, "POST", "/api/chat", raw=b"x" * (server.MAX_BODY + 1))
  assert st == 413 and "limit" in out["error"]
  assert _req(srv, "GET", "/api/health")[0] == 200


def test_internal_errors_are_500_json_and_the_server_survives(srv, monkeypatch):
  def boom(*a, **kw):
    raise RuntimeError("kaput")
  monkeypatch.setattr(srv.app, "recommend", boom)
  st, out = _req(srv, "POST", "/api/recommend", {"user": 1})
  assert st == 500 and "kaput" in out["error"]
  monkeypatch.undo()
  assert _req(srv, "POST", "/api/recommend", {"user": 1})[0] == 200


def test_page_is_served(srv):
  st, html = _req(srv, "GET", "/")
  assert st == 200 and 'id="message"' in html and "app.js" in html
  st, js = _req(srv, "GET", "/app.js")
  assert st == 200 and "/api/chat" in js


def test_sessions_are_bounded_lru_with_ttl():
  made = []
  store = server.Sessions(lambda **kw: made.append(1) or _Stub(), max_sessions=2, ttl_s=60)
  a, _ = store.get_or_create(None)
  b, _ = store.get_or_create(None)
  store.get_or_create(a)          # a is now the most recent
  c, _ = store.get_or_create(None)
  assert len(store) == 2 and set(store._d) == {a, c}   # b (least recent) evicted
  store._d[a].last_used -= 120     # a idles past the TTL
  store.get_or_create(c)
  assert set(store._d) == {c}
  d, _ = store.get_or_create("unknown-id")   # unknown ids start a new session
  assert d != "unknown-id" and len(made) == 4


class _Stub:
  def __init__(self):
    import time
    self.last_used = time.monotonic()
