"""What abuse resistance costs: token issue/verify, one rate-limit hit, one influence-cap
reservation, and HTTP ``/feedback`` with every check on versus all of them off.

* ``token_issue`` / ``token_verify``: :class:`RequestSigner` with its secret cached (pure CPU,
  HMAC-SHA256 twice per call: the MAC and the client tag);
* ``rate_limit_hit``: :meth:`RateLimiter.hit` (one pipelined INCR + EXPIRE round trip to Redis);
* ``influence_reserve``: :meth:`InfluenceCap.reserve` for two arms (one Lua script call);
* ``feedback_http_secured`` vs ``feedback_http_open``: ``POST /feedback`` through FastAPI's
  TestClient on a real orchestrator (live ES slice + Redis), each on its own freshly served
  request, with token + rate limit + influence cap, then with ``require_token=false``, no rate
  limit and no cap. The difference is the price of the checks on the feedback path.

Usage::

    python benchmarks/security.py [--n 2000] [--feedback 300] [--alias test-ltrr-catalog]
    python benchmarks/security.py --smoke    # CI: --n 200 --feedback 10, JSON to a temp dir

Prints a table and writes ``benchmarks/results/security.json``. Redis keys go to a fresh
``bench:<id>:`` prefix that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from orchestrator.api import create_app
from orchestrator.pipeline import Orchestrator
from orchestrator.redis_client import build_redis
from orchestrator.security import InfluenceCap, RateLimiter, RequestSigner
from orchestrator.settings import OrchestratorSettings

QUERIES = ["jazz", "chill jazz", "90s rock", "Dancing Queen", "Hey Jude", "metal", "happy pop",
           "Bohemian Rhapsody", "blues guitar", "country love songs"]


def stats_us(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1e6
    return {"p50_us": round(float(np.percentile(a, 50)), 1),
            "p95_us": round(float(np.percentile(a, 95)), 1),
            "mean_us": round(float(a.mean()), 1), "n": len(a)}


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def feedback_latencies(s: OrchestratorSettings, n: int) -> list[float]:
    orch = Orchestrator.from_settings(s, bandit={"refresh_interval_s": 0})
    client = TestClient(create_app(orch, settings=s))
    out: list[float] = []
    i = 0
    while len(out) < n:
        body = client.post("/search", json={"query": QUERIES[i % len(QUERIES)],
                                            "include_source": False}).json()
        i += 1
        if not body["results"]:
            continue
        fb = {"request_id": body["request_id"], "item_id": body["results"][0]["id"],
              "action": "click", "token": body["token"]}
        t = time.perf_counter()
        r = client.post("/feedback", json=fb)
        out.append(time.perf_counter() - t)
        assert r.status_code == 200, r.text
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="micro-benchmark iterations")
    ap.add_argument("--feedback", type=int, default=300, help="HTTP feedback calls per setting")
    ap.add_argument("--alias", default="test-ltrr-catalog")
    ap.add_argument("--out", type=Path, default=None,
                    help="default benchmarks/results/security.json (--smoke: a temp dir)")
    ap.add_argument("--smoke", action="store_true",
                    help="--n 200 --feedback 10 and the JSON to a temp dir (CI)")
    args = ap.parse_args()
    if args.smoke:
        args.n, args.feedback = min(args.n, 200), min(args.feedback, 10)
    if args.out is None:
        args.out = (Path(tempfile.mkdtemp(prefix="ltrr-smoke-security-")) / "security.json"
                    if args.smoke else Path(__file__).resolve().parent / "results" / "security.json")

    base = OrchestratorSettings()
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    s = base.model_copy(update={
        "redis": base.redis.model_copy(update={"key_prefix": prefix}),
        "es": base.es.model_copy(update={"catalog_alias": args.alias}),
        "templates": base.templates.model_copy(update={"mode": "local"}),
        "security": base.security.model_copy(update={
            "feedback_rate_limit": 10**9, "influence_cap": 10**9}),
    })
    r = build_redis(s.redis)
    try:
        signer = RequestSigner(r, prefix=prefix)
        rid = str(uuid.uuid4())
        tok = signer.issue(rid, client_id="10.0.0.1")
        limiter = RateLimiter(r, prefix=prefix)
        cap = InfluenceCap(r, prefix=prefix, cap=1e12, window_s=3600)
        results = {
            "token_issue": stats_us(timed(lambda: signer.issue(rid, client_id="10.0.0.1"), args.n)),
            "token_verify": stats_us(timed(lambda: signer.verify(tok, request_id=rid,
                                                                 client_id="10.0.0.1"), args.n)),
            "rate_limit_hit": stats_us(timed(lambda: limiter.hit("feedback", "10.0.0.1",
                                                                 limit=10**9, window_s=60), args.n)),
            "influence_reserve": stats_us(timed(lambda: cap.reserve(
                "10.0.0.1", {"lexical.v2": 1.0, "semantic.v1": 1.0}), args.n)),
        }
        secured = feedback_latencies(s, args.feedback)
        open_s = s.model_copy(update={"security": s.security.model_copy(update={
            "require_token": False, "feedback_rate_limit": 0, "influence_cap": 0.0})})
        opened = feedback_latencies(open_s, args.feedback)
        results["feedback_http_secured"] = stats_us(secured)
        results["feedback_http_open"] = stats_us(opened)
    finally:
        for key in r.scan_iter(match=prefix + "*", count=1000):
            r.delete(key)

    print(f"{'operation':<24}{'p50 us':>10}{'p95 us':>10}{'mean us':>10}{'n':>7}")
    for name, st in results.items():
        print(f"{name:<24}{st['p50_us']:>10}{st['p95_us']:>10}{st['mean_us']:>10}{st['n']:>7}")
    report = {"command": "python benchmarks/security.py " + " ".join(
                  f"--{k} {v}" for k, v in vars(args).items() if k not in ("out", "smoke"))
                  + (" --smoke" if args.smoke else ""),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
