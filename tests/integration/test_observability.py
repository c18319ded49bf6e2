"""Observability against the live slice and Redis: Prometheus metrics move with traffic, log
records carry the request id, /healthz reports each service."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest
import redis
from elasticsearch import Elasticsearch
from fastapi.testclient import TestClient
from redis.backoff import NoBackoff
from redis.retry import Retry
from test_pipeline import CTX, make_settings

from orchestrator.api import create_app
from orchestrator.log import JsonFormatter, RequestIdFilter
from orchestrator.pipeline import Orchestrator
from orchestrator.selection import FixedPlanSelector

pytestmark = [pytest.mark.elasticsearch, pytest.mark.redis]


class WrongDimEncoder:
    """Makes the semantic arm fail inside the _msearch (3-d vector, 256-d field)."""

    def encode(self, texts):
        return [[0.1, 0.2, 0.3] for _ in texts]


@pytest.fixture()
def app_parts(es, redis_client, redis_prefix, settings, catalog_slice):
    s = make_settings(settings, prefix=redis_prefix, alias=catalog_slice)
    orch = Orchestrator.from_settings(
        s, es=es, redis=redis_client, understander=None,
        selector=FixedPlanSelector({"lexical.v2": 10, "lexical_popular.v1": 10, "semantic.v1": 10}),
        encoder_factory=WrongDimEncoder, bandit={"refresh_interval_s": 0})
    return orch, TestClient(create_app(orch, settings=s)), s


def metric(text: str, name: str, **labels: str) -> float:
    """Value of one sample of the Prometheus exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.fullmatch(r"([a-zA-Z_:]+)(?:\{(.*)\})? (\S+)", line)
        if m and m.group(1) == name:
            got = ",".join(sorted((m.group(2) or "").split(","))) if m.group(2) else ""
            if got == want:
                return float(m.group(3))
    return 0.0


def test_metrics_move_with_traffic(app_parts):
    orch, client, _ = app_parts
    empty = client.get("/metrics").text
    assert metric(empty, "ltrr_search_requests_total") == 0
    bodies = [client.post("/search", json={"query": q, "context": CTX, "include_source": False}).json()
              for q in ("jazz", "Dancing Queen", "Hey Jude")]
    body = bodies[0]
    item = body["results"][0]
    fb = client.post("/feedback", json={"request_id": body["request_id"], "item_id": item["id"],
                                        "action": "like", "token": body["token"]})
    assert fb.status_code == 200, fb.text
    client.post("/feedback", json={"request_id": body["request_id"], "item_id": item["id"],
                                   "action": "like", "token": body["token"]})   # replay: 409
    client.post("/search", json={"query": ""})                                   # 400
    m = client.get("/metrics").text

    assert metric(m, "ltrr_search_requests_total") == 3
    assert metric(m, "ltrr_search_latency_seconds_count") == 3
    for tid in ("lexical.v2", "lexical_popular.v1", "semantic.v1"):
        # Selection share = selected / searches: all three arms are in the fixed plan.
        assert metric(m, "ltrr_arm_selected_total", arm=tid) == 3
    for tid in ("lexical.v2", "lexical_popular.v1"):
        assert metric(m, "ltrr_arm_latency_seconds_count", arm=tid) == 3
        assert metric(m, "ltrr_arm_candidates_count", arm=tid) == 3
        assert metric(m, "ltrr_arm_candidates_sum", arm=tid) > 0
    # The semantic arm failed every time: counted as an error, with no latency/candidates.
    assert metric(m, "ltrr_arm_failures_total", arm="semantic.v1") == 3
    assert metric(m, "ltrr_arm_latency_seconds_count", arm="semantic.v1") == 0
    # Reward rate = reward / observations. Every chosen arm has a reward for the request: the
    # failed one its failure observation (0), the others their 1/m credit minus latency.
    rewards = fb.json()["rewards"]
    assert set(rewards) == {"lexical.v2", "lexical_popular.v1", "semantic.v1"}
    assert rewards["semantic.v1"] == 0.0
    for tid, reward in rewards.items():
        assert metric(m, "ltrr_arm_observations_total", arm=tid) == 1
        assert metric(m, "ltrr_arm_reward_total", arm=tid) == pytest.approx(max(reward, 0.0))
    holders = [p["template_id"] for p in item["provenance"]]
    # "like" at position 1, shared by the m arms that retrieved the item
    assert max(rewards.values()) == pytest.approx(1.0 / len(holders), abs=0.05)
    assert metric(m, "ltrr_feedback_total", action="like", duplicate="false") == 1
    assert metric(m, "ltrr_feedback_total", action="like", duplicate="true") == 1
    assert metric(m, "ltrr_security_refusals_total", reason="replay") == 1
    assert metric(m, "ltrr_http_requests_total", endpoint="/search", status="200") == 3
    assert metric(m, "ltrr_http_requests_total", endpoint="/search", status="400") == 1
    assert metric(m, "ltrr_http_requests_total", endpoint="/feedback", status="409") == 1
    assert metric(m, "ltrr_stage_latency_seconds_count", stage="es") == 3
    # Unknown paths share one label (no unbounded label values from hostile URLs).
    client.get("/no/such/path/123")
    client.get("/explain/abc")
    m = client.get("/metrics").text
    assert metric(m, "ltrr_http_requests_total", endpoint="unmatched", status="404") == 1
    assert metric(m, "ltrr_http_requests_total", endpoint="/explain/{request_id}", status="404") == 1
    assert "/no/such/path" not in m


@pytest.fixture()
def json_records():
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    lg = logging.getLogger("orchestrator")
    old_level = lg.level
    lg.addHandler(handler)
    lg.setLevel(logging.INFO)
    try:
        yield lambda: [json.loads(line) for line in buf.getvalue().splitlines()]
    finally:
        lg.removeHandler(handler)
        lg.setLevel(old_level)


def test_log_records_carry_the_request_id(app_parts, json_records):
    orch, client, _ = app_parts
    r = client.post("/search", json={"query": "jazz", "context": CTX})
    rid = r.json()["request_id"]
    assert r.headers["x-request-id"] == rid
    body = r.json()
    client.post("/feedback", json={"request_id": rid, "item_id": body["results"][0]["id"],
                                   "action": "click", "token": "v1.forged.x.1.y"})
    client.get("/arms", headers={"X-Request-ID": "trace-abc.123"})
    r = client.get("/arms", headers={"X-Request-ID": "bad id\nwith newline"})
    generated = r.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)

    records = json_records()
    for rec in records:
        assert {"ts", "level", "logger", "message", "request_id"} <= set(rec)
    search_logs = [x for x in records if x["logger"] == "orchestrator.pipeline"
                   and x["message"].startswith("search ")]
    assert search_logs and all(x["request_id"] == rid for x in search_logs)
    # The semantic arm's failure is logged with the request it failed in.
    failures = [x for x in records if "semantic" in x["message"] and x["level"] == "WARNING"]
    assert failures and all(x["request_id"] == rid for x in failures)
    access = [x for x in records if x["logger"] == "orchestrator.api.access"]
    assert [(x["endpoint"], x["status"]) for x in access] == [
        ("/search", 200), ("/feedback", 403), ("/arms", 200), ("/arms", 200)]
    assert [x["request_id"] for x in access] == [rid, rid, "trace-abc.123", generated]
    assert all(isinstance(x["duration_ms"], float) for x in access)
    refused = [x for x in records if x.get("refused") == "token_forged"]
    assert len(refused) == 1 and refused[0]["request_id"] == rid


def test_healthz_reports_each_service(app_parts, settings, redis_prefix, catalog_slice):
    orch, client, s = app_parts
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json()["status"] == "ok" and r.json()["elasticsearch"] == r.json()["redis"] == "ok"

    real_es, real_redis = orch.es, orch.redis
    orch.es = Elasticsearch("http://127.0.0.1:1", max_retries=0, request_timeout=0.5)
    r = client.get("/healthz")
    assert r.status_code == 503
    assert r.json()["status"] == "degraded" and r.json()["redis"] == "ok"
    assert "Elasticsearch is not reachable" in r.json()["elasticsearch"]

    orch.es = real_es
    orch.redis = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2,
                             socket_timeout=0.2, retry=Retry(NoBackoff(), 0))
    r = client.get("/healthz")
    assert r.status_code == 503 and r.json()["elasticsearch"] == "ok"
    assert "Redis is not reachable" in r.json()["redis"]
    orch.redis = real_redis

    # No orchestrator can be built (Elasticsearch down at start-up): each service still reported.
    dead = s.model_copy(update={"es": s.es.model_copy(update={"url": "http://127.0.0.1:1"})})
    r = TestClient(create_app(settings=dead)).get("/healthz")
    assert r.status_code == 503 and r.json()["redis"] == "ok"
    assert r.json()["status"] == "degraded" and r.json()["elasticsearch"] != "ok"


def test_ltrr_serve_logs_json_lines_with_request_ids(redis_prefix, catalog_slice, tmp_path):
    """The entry point configures logging: every stderr line of ``ltrr serve`` is a JSON
    record, and those of a search carry its request id."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "LTRR_REDIS__KEY_PREFIX": redis_prefix,
           "LTRR_ES__CATALOG_ALIAS": catalog_slice, "LTRR_TEMPLATES__MODE": "local",
           "LTRR_LOG__LEVEL": "INFO"}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "serve", "--port",
                                 str(port)], env=env, stdout=subprocess.DEVNULL, stderr=log_file)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                assert proc.poll() is None, log_path.read_text()[-2000:]
                try:
                    if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.3)
            r = httpx.post(url + "/search", json={"query": "jazz", "context": CTX}, timeout=60)
            assert r.status_code == 200, r.text
            rid = r.json()["request_id"]
            time.sleep(0.5)
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines]   # every line is JSON (uvicorn's included)
    mine = [x for x in records if x["request_id"] == rid]
    assert any(x["logger"] == "orchestrator.pipeline" and x["message"].startswith("search ")
               for x in mine), records[-10:]
    assert any(x["logger"] == "orchestrator.api.access" and x["status"] == 200 for x in mine)
    assert any(x["logger"].startswith("uvicorn") for x in records)


def test_healthz_reports_a_node_answering_errors_instead_of_failing(app_parts):
    """A proxy or a secured node answering 401/404 to the health call: a 503 that says so."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Deny(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            body = b'{"error": "denied"}'
            self.send_response(401)
            self.send_header("content-type", "application/json")
            self.send_header("x-elastic-product", "Elasticsearch")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Deny)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    orch, client, _ = app_parts
    real_es = orch.es
    try:
        orch.es = Elasticsearch(f"http://127.0.0.1:{server.server_port}", max_retries=0)
        r = client.get("/healthz")
        assert r.status_code == 503, r.text
        assert r.json()["redis"] == "ok" and r.json()["elasticsearch"] != "ok"
        assert "\n" not in r.json()["elasticsearch"]
    finally:
        orch.es = real_es
        server.shutdown()
