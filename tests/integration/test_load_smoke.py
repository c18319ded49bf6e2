"""Smoke variant of the load test (``benchmarks/load.py``): two short steps on the catalog slice.

Runs the benchmark driver as a subprocess (it starts uvicorn and one headless locust process per
step; locust's gevent patching stays out of this process) with the Redis prefix of the test, then
checks what a load test must never break, independently of the driver's own verdict:
no 5xx, every step served requests, every acknowledged feedback is stored exactly once (events
stream and dedupe sets, counted here), retried feedback is refused as a replay (409), and every
search answered 200 stored its impression. No timing assertions: timings are the benchmark's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.pipeline import EMPTY_ACTION

pytestmark = [pytest.mark.elasticsearch, pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[2]


def _stream_counts(redis_client, key: str) -> dict[str, int]:
    """Stream entries by type; user feedback apart from the server's own ``empty``
    observations (searches without results)."""
    counts: dict[str, int] = {}
    for _, fields in redis_client.xrange(key):
        t = fields[b"type"].decode()
        if t == "feedback" and json.loads(fields[b"data"])["action"] == EMPTY_ACTION:
            t = "empty"
        counts[t] = counts.get(t, 0) + 1
    return counts


def test_load_smoke_nothing_lost(tmp_path, redis_client, redis_prefix, catalog_slice):
    out = tmp_path / "load.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "load.py"), "--alias", catalog_slice,
           "--workers", "1", "--users", "1,3", "--step-seconds", "5", "--warmup-seconds", "1",
           "--p-feedback", "0.6", "--p-retry", "1.0", "--no-stop", "--keep-keys",
           "--prefix", redis_prefix, "--workdir", str(tmp_path / "logs"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.exists(), f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    (config,) = result["configs"]
    prefix = config["prefix"]
    assert prefix.startswith(redis_prefix)  # so the fixture deletes the run's keys

    assert [s["users"] for s in config["steps"]] == [1, 3]
    for step in config["steps"]:
        assert step["requests_in_window"] > 0, step
        assert step["client_counts"]["searches_ok"] > 0, step
        assert not any(code.startswith("5") for code in step["statuses"]), step["statuses"]
    assert config["errors_5xx"] == 0
    assert config["server_log_tracebacks"] == 0, (tmp_path / "logs" / "server-w1.log").read_text()

    cons = config["consistency"]
    acked = sum(s["client_counts"]["feedback_acked"] for s in config["steps"])
    searches_ok = sum(s["client_counts"]["searches_ok"] for s in config["steps"])
    assert acked == cons["feedback_acked_client"] and acked > 0

    # Counted here, from Redis, not taken from the driver's report.
    stream = _stream_counts(redis_client, prefix + "events")
    dedupe = sum(1 for k in redis_client.scan_iter(match=prefix + "fb:*")
                 for m in redis_client.smembers(k) if not m.decode().endswith("\x1f" + EMPTY_ACTION))
    assert stream.get("feedback", 0) == acked
    assert dedupe == acked
    assert stream.get("impression", 0) == searches_ok + cons["warmup_searches_ok"]
    assert cons["retries_sent"] > 0
    assert cons["retries_answered_duplicate"] == cons["retries_sent"]  # 409: replay refused
    assert cons["feedback_acked_capped"] == 0 and cons["rate_limited_429"] == 0
    assert cons["spool_records_left"] == 0
    assert cons["nothing_lost"] is True and result["ok"] is True
    assert proc.returncode == 0, proc.stdout[-3000:]
