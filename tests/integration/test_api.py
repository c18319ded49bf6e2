"""The HTTP API: in-process (TestClient) and two uvicorn processes sharing one Redis."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from elasticsearch import Elasticsearch
from fastapi.testclient import TestClient
from test_pipeline import CTX, FakeUnderstander, make_settings, two_arm_registry

from orchestrator.api import create_app
from orchestrator.pipeline import Orchestrator

pytestmark = [pytest.mark.elasticsearch, pytest.mark.redis]


@pytest.fixture()
def orch(es, redis_client, redis_prefix, settings, catalog_slice):
    s = make_settings(settings, prefix=redis_prefix, alias=catalog_slice)
    return Orchestrator.from_settings(s, es=es, redis=redis_client, understander=FakeUnderstander(set()),
                                      registry=two_arm_registry(),
                                      bandit={"refresh_interval_s": 0, "max_arms": 2, "seed": 1})


@pytest.fixture()
def client(orch):
    return TestClient(create_app(orch))


def test_search_feedback_explain_arms_metrics(client):
    r = client.post("/search", json={"query": "jazz", "size": 5, "context": CTX})
    assert r.status_code == 200, r.text
    body = r.json()
    rid = body["request_id"]
    assert uuid.UUID(rid).version == 4
    assert body["results"] and body["results"][0]["provenance"]
    exp = body["explanation"]
    assert exp["chosen"] and set(exp["propensities"]) == {"lexical.v1", "genre_popular.v1"}
    item = body["results"][0]["id"]
    token = body["token"]
    assert token.startswith("v1.") and r.headers["x-request-id"] == rid

    fb = {"request_id": rid, "item_id": item, "action": "favorite", "token": token}
    f = client.post("/feedback", json=fb)
    assert f.status_code == 200 and f.json()["duplicate"] is False and f.json()["capped"] is False
    # A replay is refused (409) and says it was a duplicate.
    f2 = client.post("/feedback", json=fb)
    assert f2.status_code == 409 and f2.json()["duplicate"] is True
    assert f2.json()["error"] == "ReplayedFeedbackError"
    # Without the token, feedback is refused (security.require_token defaults to True).
    f3 = client.post("/feedback", json={k: v for k, v in fb.items() if k != "token"})
    assert f3.status_code == 403 and f3.json()["error"] == "MissingTokenError"

    e = client.get(f"/explain/{rid}")
    assert e.status_code == 200 and e.json()["feedback"] == [{"item_id": item, "action": "favorite"}]
    arms = {a["template_id"]: a for a in client.get("/arms").json()["arms"]}
    assert set(arms) == {"lexical.v1", "genre_popular.v1"}
    assert sum(a["impressions"] for a in arms.values()) >= 1
    assert any(a["observations"] >= 1 for a in arms.values())

    m = client.get("/metrics")
    assert m.status_code == 200 and "text/plain" in m.headers["content-type"]
    assert "ltrr_search_latency_seconds_count 1.0" in m.text
    assert 'ltrr_feedback_total{action="favorite",duplicate="true"} 1.0' in m.text
    h = client.get("/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok"


@pytest.mark.parametrize("body", [
    {}, {"query": "x", "size": 0}, {"query": "x", "colour": 1}, {"query": 5},
    {"query": "x", "context": {"hour": 25}},
])
def test_bad_search_bodies_are_422(client, body):
    assert client.post("/search", json=body).status_code == 422


def test_error_mapping(client, orch):
    r = client.post("/search", json={"query": "   "})
    assert r.status_code == 400 and r.json()["error"] == "QueryValidationError"
    # A genuine token for a request whose impression is gone (expired): 404.
    gone = orch.signer.issue("nope", client_id="testclient")
    r = client.post("/feedback", json={"request_id": "nope", "item_id": "x", "action": "click",
                                       "token": gone})
    assert r.status_code == 404 and "Unknown request id" in r.json()["detail"]
    assert client.get("/explain/nope").status_code == 404
    r = client.post("/feedback", json={"request_id": "nope", "item_id": "x", "action": "buy"})
    assert r.status_code == 422 and r.json()["error"] == "RequestValidationError"
    body = client.post("/search", json={"query": "jazz", "context": CTX}).json()
    r = client.post("/feedback", json={"request_id": body["request_id"], "item_id": "track:none",
                                       "action": "click", "token": body["token"]})
    assert r.status_code == 400 and "was not shown" in r.json()["detail"]


def test_redis_down_search_serves_feedback_503(orch):
    import redis

    client = TestClient(create_app(orch))
    token = orch.signer.issue("x", client_id="testclient")  # the secret is cached from now on
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, socket_timeout=0.2,
                       retry=Retry(NoBackoff(), 0))
    orch.redis = orch.store.client = orch.log.client = dead
    orch.store._script = dead.register_script("return 1")
    # Searches still serve while Redis is down (posteriors held in memory, the impression
    # spooled; see orchestrator.resilience), with a token: the secret is cached in memory.
    r = client.post("/search", json={"query": "jazz"})
    assert r.status_code == 200 and r.json()["token"].startswith("v1."), r.text
    # Feedback on a request that is neither in memory nor reachable in Redis: a clear 503.
    r = client.post("/feedback", json={"request_id": "x", "item_id": "y", "action": "click",
                                       "token": token})
    assert r.status_code == 503 and "\n" not in r.json()["detail"]
    assert client.get("/healthz").status_code == 503


def test_elasticsearch_down_is_503(orch):
    client = TestClient(create_app(orch))
    orch.multisearch.client = Elasticsearch("http://127.0.0.1:1", max_retries=0, request_timeout=0.5)
    r = client.post("/search", json={"query": "jazz"})
    assert r.status_code == 503 and "Elasticsearch is not reachable" in r.json()["detail"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            if httpx.get(url + "/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready")


def test_two_processes_share_posteriors(redis_prefix, catalog_slice):
    env = {**os.environ, "LTRR_REDIS__KEY_PREFIX": redis_prefix,
           "LTRR_ES__CATALOG_ALIAS": catalog_slice, "LTRR_TEMPLATES__MODE": "local"}
    procs, urls = [], []
    try:
        for _ in range(2):
            port = _free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "orchestrator.api:create_app",
                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            urls.append(f"http://127.0.0.1:{port}")
        for url, p in zip(urls, procs):
            _wait_ready(url, p)
        a, b = urls
        before = {x["template_id"]: x for x in httpx.get(b + "/arms", timeout=30).json()["arms"]}
        for q in ("Dancing Queen", "Bohemian Rhapsody", "Hey Jude", "Yesterday", "Imagine"):
            res = httpx.post(a + "/search", json={"query": q, "context": CTX,
                                                  "include_source": False}, timeout=60).json()
            if res["results"]:  # the bandit may pick only arms that find nothing: try again
                break
        item = res["results"][0]
        fb_body = {"request_id": res["request_id"], "item_id": item["id"], "action": "play",
                   "token": res["token"]}
        fb = httpx.post(a + "/feedback", json=fb_body, timeout=30)
        assert fb.status_code == 200
        # Process b sees a's impression and a's posterior update.
        assert httpx.get(f"{b}/explain/{res['request_id']}", timeout=30).status_code == 200
        after = {x["template_id"]: x for x in httpx.get(b + "/arms", timeout=30).json()["arms"]}
        # Arms that failed inside the _msearch are not counted (and get no reward).
        executed = set(httpx.get(f"{b}/explain/{res['request_id']}", timeout=30).json()["executed"])
        assert executed
        for tid in executed:
            assert after[tid]["observations"] >= before[tid]["observations"] + 1
            assert after[tid]["impressions"] >= before[tid]["impressions"] + 1
        # b verifies a's token (one secret shared through Redis) and refuses the replay.
        dup = httpx.post(b + "/feedback", json=fb_body, timeout=30)
        assert dup.status_code == 409 and dup.json()["duplicate"] is True
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def test_a_session_id_in_the_context_chains_the_sessions_searches(client, orch):
    ctx = {**CTX, "session_id": "browser-7f3a"}
    first = client.post("/search", json={"query": "songs nobody can find", "context": ctx}).json()
    second = client.post("/search", json={"query": "jazz", "size": 5, "context": ctx}).json()
    assert client.get(f"/explain/{first['request_id']}").json()["context"]["session_id"] == "browser-7f3a"
    r = client.post("/feedback", json={"request_id": second["request_id"], "action": "play",
                                       "item_id": second["results"][0]["id"],
                                       "token": second["token"]})
    assert r.status_code == 200, r.text
    events = [json.loads(f[b"data"]) for _, f in orch.redis.xrange(orch.store.events_key)
              if f[b"type"] == b"feedback"]
    fb = next(e for e in events if e["request_id"] == second["request_id"])
    assert [c["request_id"] for c in fb["chain"]] == [first["request_id"]]
    long = client.post("/search", json={"query": "jazz", "context": {**CTX, "session_id": "x" * 129}})
    assert long.status_code == 422
