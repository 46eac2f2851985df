"""The chat page in headless Chromium (playwright-core) against the server on 127.0.0.1.

Needs /usr/bin/chromium (Debian ``chromium``), node and ``npm ci`` in tests/browser
(scripts/setup.sh does both when ILM_BROWSER_TESTS=1). Skips cleanly when they are absent
unless ILM_BROWSER_TESTS=1, where their absence is a failure (CI must run this test).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import threading

import pytest

from ilm_jax.chat import server, session
from tests import _chat_tiny as T

HERE = pathlib.Path(__file__).parent / "browser"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def _missing() -> str:
  if not pathlib.Path(CHROMIUM).exists():
    return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
  if shutil.which("node") is None:
    return "no node"
  if not (HERE / "node_modules" / "playwright-core").is_dir():
    return f"playwright-core not installed (cd {HERE} && npm ci)"
  return ""


@pytest.fixture(scope="module")
def url():
  why = _missing()
  if why:
    if os.environ.get("ILM_BROWSER_TESTS") == "1":
      pytest.fail(f"ILM_BROWSER_TESTS=1 but {why}")
    pytest.skip(why)
  httpd = server.make_server(T.shared_served(), session.SessionConfig(max_new_tokens=4))
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  yield f"http://127.0.0.1:{httpd.server_address[1]}/"
  httpd.shutdown()
  httpd.server_close()


def test_type_a_message_and_see_recommendations_with_titles(url):
  ds = T.dataset()
  liked = ds.item_titles[3]
  msgs = [f"I loved {liked}", "Please recommend 3 more"]
  p = subprocess.run(["node", str(HERE / "chat_page.js"), url, *msgs], capture_output=True,
                     text=True, timeout=300, cwd=HERE, check=False)
  assert p.returncode == 0, p.stderr[-3000:]
  turns = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
  assert [t["message"] for t in turns] == msgs
  assert liked in turns[0]["titles"]              # the mention was resolved and shown
  recs = turns[1]["titles"]
  want = [ds.item_titles[i] for i, _ in T.shared_served().recommend([3], 3)]
  assert recs == want, (recs, want)               # the page shows the recommended titles
  assert all(t in turns[1]["reply"] for t in recs)
