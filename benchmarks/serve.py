r"""Bounded load test of the chat HTTP service on 127.0.0.1.

  python benchmarks/serve.py [--adapter=DIR | --workdir=DIR | (tiny stand-in)] \
      [--requests=200] [--clients=4] [--mix=recommend,items,chat] [--out=FILE]

Starts the server in this process (port 0), warms every endpoint up once (compiles),
then sends ``--requests`` requests from ``--clients`` threads, each on a keep-alive-free
connection, cycling through the mix (recommend for a user / a history, item search,
chat turns within a few sessions). Prints p50/p95/p99 latency per endpoint and overall,
requests/s, errors (non-2xx or exceptions; must be 0) and RSS before/after (a leak shows
as growth that scales with --requests). ``--out`` writes the numbers as JSON.
Without --adapter/--workdir it serves the tests' tiny stand-in ILM (random 2-layer LLM).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import sys
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def load(args):
  if args.adapter or args.workdir:
    from ilm_jax.jobs import chat  # noqa: PLC0415
    return chat.served_from(args.adapter, args.workdir, args.config_arg)
  from tests import _chat_tiny  # noqa: PLC0415
  return _chat_tiny.served()


def request(port, method, path, body=None):
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
  try:
    data = json.dumps(body).encode() if body is not None else None
    t = time.perf_counter()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    payload = r.read()
    dt = time.perf_counter() - t
    return r.status, dt, payload
  finally:
    conn.close()


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--adapter", default="")
  p.add_argument("--workdir", default="")
  p.add_argument("--config_arg", default="tiny")
  p.add_argument("--requests", type=int, default=200)
  p.add_argument("--clients", type=int, default=4)
  p.add_argument("--rounds", type=int, default=2,
                 help="repeat the request set; RSS after each round shows growth")
  p.add_argument("--mix", default="recommend,items,recommend_history,chat")
  p.add_argument("--max_new_tokens", type=int, default=8)
  p.add_argument("--out", default="")
  args = p.parse_args(argv)

  from ilm_jax.chat import server, session  # noqa: PLC0415
  served = load(args)
  httpd = server.make_server(served, session.SessionConfig(max_new_tokens=args.max_new_tokens),
                             max_sessions=64)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  port = httpd.server_address[1]
  n_users, titles = len(served.histories), served.catalogue.titles
  rng = np.random.default_rng(0)
  kinds = args.mix.split(",")

  def make(i: int):
    kind = kinds[i % len(kinds)]
    if kind == "recommend":
      return kind, "POST", "/api/recommend", {"user": int(rng.integers(n_users)), "k": 10}
    if kind == "recommend_history":
      hist = [titles[j] for j in rng.choice(len(titles), 3, replace=False)]
      return kind, "POST", "/api/recommend", {"history": hist, "k": 10}
    if kind == "items":
      return kind, "GET", "/api/items?q=" + titles[int(rng.integers(len(titles)))].split()[-1] \
          .strip("()") + "&k=5", None
    msg = rng.choice(["recommend 5 more", f"I loved {titles[int(rng.integers(len(titles)))]}",
                      "find something tense"])
    return kind, "POST", "/api/chat", {"message": str(msg)}

  # Warm-up: one of each (compilations are not load).
  for i in range(len(kinds)):
    k, m, path, body = make(i)
    st, _, payload = request(port, m, path, body)
    if st != 200:
      raise SystemExit(f"warm-up {k} failed: {st} {payload[:300]!r}")
  reqs = [make(i) for i in range(args.requests)]
  rss0 = rss_mb()
  lat: dict[str, list[float]] = {k: [] for k in kinds}
  errors: list[str] = []
  lock = threading.Lock()
  it = iter(())

  def client():
    while True:
      with lock:
        i = next(it, None)  # noqa: B023 -- one shared iterator per round
      if i is None:
        return
      kind, m, path, body = reqs[i]
      try:
        st, dt, payload = request(port, m, path, body)
        with lock:
          if st == 200:
            lat[kind].append(dt)
          else:
            errors.append(f"{kind}: {st} {payload[:200]!r}")
      except Exception as e:  # noqa: BLE001
        with lock:
          errors.append(f"{kind}: {type(e).__name__}: {e}")

  rss_rounds, walls = [], []
  for _ in range(args.rounds):
    it = iter(range(len(reqs)))
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    walls.append(time.perf_counter() - t0)
    rss_rounds.append(round(rss_mb(), 1))
  wall = walls[-1]
  rss1 = rss_rounds[-1]
  httpd.shutdown()
  httpd.server_close()

  def pct(xs):
    if not xs:
      return {}
    a = np.asarray(xs) * 1000
    return {"n": len(xs), "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p95_ms": round(float(np.percentile(a, 95)), 1),
            "p99_ms": round(float(np.percentile(a, 99)), 1)}

  # Latencies of the last round (earlier rounds still compile new prompt lengths).
  lat = {k: v[-sum(1 for r in reqs if r[0] == k):] for k, v in lat.items()}
  allx = [x for v in lat.values() for x in v]
  out = {"requests": args.requests, "clients": args.clients, "rounds": args.rounds,
         "wall_s": round(wall, 2), "requests_per_s": round(args.requests / wall, 2),
         "requests_per_s_per_round": [round(args.requests / w, 2) for w in walls],
         "rss_mb_per_round": rss_rounds, "errors": len(errors),
         "error_samples": errors[:5], "overall": pct(allx),
         "per_endpoint": {k: pct(v) for k, v in lat.items()},
         "rss_mb_before": round(rss0, 1), "rss_mb_after": round(rss1, 1),
         "sessions_at_end": len(httpd.app.sessions), "items": served.num_items,
         "llm_layers": served.llm.config.layers}
  print(f"serve load test: {args.requests} requests, {args.clients} clients, "
        f"{out['requests_per_s']} req/s, errors {len(errors)}")
  print(f"  overall   {out['overall']}")
  for k, v in out["per_endpoint"].items():
    print(f"  {k:<18}{v}")
  print(f"  RSS {out['rss_mb_before']} MB -> per round {rss_rounds} MB; req/s per round "
        f"{out['requests_per_s_per_round']} (latencies: last round)")
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(out, indent=1))
  return out


if __name__ == "__main__":
  res = main()
  sys.exit(1 if res["errors"] else 0)
