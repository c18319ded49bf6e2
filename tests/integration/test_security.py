"""Abuse resistance over HTTP and the Python API, against the live ES slice and Redis: forged,
foreign, expired and replayed tokens, API keys, rate limits and the influence cap."""

from __future__ import annotations

import time

import pytest
import redis
from fastapi.testclient import TestClient
from redis.backoff import NoBackoff
from redis.retry import Retry
from test_pipeline import CTX, FakeUnderstander, make_settings, two_arm_registry

from orchestrator.api import create_app
from orchestrator.errors import ForgedTokenError, TokenMismatchError
from orchestrator.pipeline import Orchestrator
from orchestrator.security import hash_api_key

pytestmark = [pytest.mark.elasticsearch, pytest.mark.redis]

KEYS = {"key-frontend": "frontend", "key-other": "other"}
QUERIES = ("jazz", "Dancing Queen", "Hey Jude", "Bohemian Rhapsody", "Yesterday", "rock")


def _settings(settings, prefix, alias, **security):
    s = make_settings(settings, prefix=prefix, alias=alias)
    return s.model_copy(update={"security": s.security.model_copy(update=security)})


def _orch(es, redis_client, s):
    return Orchestrator.from_settings(s, es=es, redis=redis_client,
                                      understander=FakeUnderstander(set()),
                                      registry=two_arm_registry(),
                                      bandit={"refresh_interval_s": 0, "max_arms": 2, "seed": 1})


@pytest.fixture()
def setup(es, redis_client, redis_prefix, settings, catalog_slice):
    def make(**security):
        s = _settings(settings, redis_prefix, catalog_slice, **security)
        orch = _orch(es, redis_client, s)
        return orch, TestClient(create_app(orch, settings=s))
    return make


def _search(client, headers=None):
    for q in QUERIES:  # the bandit may pick only arms that find nothing: try another query
        r = client.post("/search", json={"query": q, "context": CTX, "size": 10,
                                         "include_source": False}, headers=headers or {})
        assert r.status_code == 200, r.text
        if r.json()["results"]:
            return r.json()
    raise AssertionError("no query found anything")


def _stats(orch):
    """Observation weight per arm component and the stream length: what feedback moves."""
    comps = [f"arm:{t.id}" for t in orch.registry]
    lin = orch.store.load_linear(comps)
    return {c: round(st.w, 9) for c, st in lin.items()}, orch.redis.xlen(orch.store.events_key)


def test_forged_foreign_expired_and_replayed_tokens_are_refused(setup):
    orch, client = setup()
    body = _search(client)
    rid, item, token = body["request_id"], body["results"][0]["id"], body["token"]
    other = _search(client)
    before = _stats(orch)

    def fb(tok, request_id=rid, action="play"):
        return client.post("/feedback", json={"request_id": request_id, "item_id": item,
                                              "action": action, "token": tok})

    cases = {
        "forged": (token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"),
                   "ForgedTokenError"),
        "made-up": ("v1.abc.def.9999999999.ghi", "ForgedTokenError"),
        "other request": (other["token"], "TokenMismatchError"),
        "other client": (orch.signer.issue(rid, client_id="203.0.113.9"), "TokenMismatchError"),
        "expired": (orch.signer.issue(rid, client_id="testclient", now=time.time() - 10**8),
                    "ExpiredTokenError"),
    }
    for name, (tok, error) in cases.items():
        r = fb(tok)
        assert r.status_code == 403, (name, r.text)
        assert r.json()["error"] == error and r.json()["detail"], name
    r = client.post("/feedback", json={"request_id": rid, "item_id": item, "action": "play"})
    assert r.status_code == 403 and r.json()["error"] == "MissingTokenError"
    assert _stats(orch) == before, "a refused token moved the bandit"

    assert fb(token).status_code == 200
    moved = _stats(orch)
    assert moved != before
    for _ in range(3):
        r = fb(token)
        assert r.status_code == 409 and r.json()["error"] == "ReplayedFeedbackError"
    assert _stats(orch) == moved, "a replay moved the bandit"
    # The same token still serves other (item, action) pairs of its own request.
    assert fb(token, action="like").status_code == 200

    m = client.get("/metrics").text
    assert 'ltrr_security_refusals_total{reason="token_forged"} 2.0' in m
    assert 'ltrr_security_refusals_total{reason="token_mismatch"} 2.0' in m
    assert 'ltrr_security_refusals_total{reason="token_expired"} 1.0' in m
    assert 'ltrr_security_refusals_total{reason="replay"} 3.0' in m


def test_python_api_verifies_a_given_token_and_trusts_in_process_callers(setup):
    orch, _ = setup()
    resp = next(r for r in (orch.search(q, context=CTX) for q in QUERIES) if r.results)
    item = resp.results[0].id
    assert resp.token and resp.token.startswith("v1.")
    with pytest.raises(ForgedTokenError):
        orch.feedback(resp.request_id, item, "click", token="v1.x.y.1.z")
    with pytest.raises(TokenMismatchError):  # bound to the in-process client, not "someone"
        orch.feedback(resp.request_id, item, "click", token=resp.token, client_id="someone")
    assert orch.feedback(resp.request_id, item, "click", token=resp.token).duplicate is False
    assert orch.feedback(resp.request_id, item, "play").duplicate is False  # trusted: no token
    assert orch.feedback(resp.request_id, item, "play").duplicate is True


def test_replicas_share_one_generated_secret_and_keep_it_through_a_redis_outage(
        setup, es, redis_client):
    orch_a, client_a = setup()
    orch_b, client_b = setup()
    assert orch_a.signer is not orch_b.signer
    body = _search(client_a)
    secret = redis_client.get(orch_a.signer.secret_key)
    assert secret is not None and len(secret) == 64
    assert orch_b.signer.secret() == secret
    orch_b.signer.verify(body["token"], request_id=body["request_id"], client_id="testclient")
    # Cached: verification no longer needs Redis.
    orch_b.signer.client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2,
                                       retry=Retry(NoBackoff(), 0))
    orch_b.signer.verify(body["token"], request_id=body["request_id"], client_id="testclient")
    r = client_b.post("/feedback", json={"request_id": body["request_id"], "action": "click",
                                         "item_id": body["results"][0]["id"],
                                         "token": body["token"]})
    assert r.status_code == 200, r.text


def test_api_keys_identify_clients(setup):
    orch, client = setup(api_keys={hash_api_key(k): v for k, v in KEYS.items()})
    for headers, status in (({}, 401), ({"X-API-Key": "nope"}, 401),
                            ({"X-API-Key": "key-frontend"}, 200)):
        r = client.post("/search", json={"query": "jazz", "context": CTX}, headers=headers)
        assert r.status_code == status, r.text
        if status == 401:
            assert r.json()["error"] == "AuthenticationError"
    assert client.get("/arms").status_code == 401
    assert client.get("/explain/x").status_code == 401
    assert client.get("/healthz").status_code == 200    # monitoring stays open
    assert client.get("/metrics").status_code == 200

    body = _search(client, {"X-API-Key": "key-frontend"})
    fb = {"request_id": body["request_id"], "item_id": body["results"][0]["id"],
          "action": "click", "token": body["token"]}
    # Another client's key cannot use frontend's token ...
    r = client.post("/feedback", json=fb, headers={"X-API-Key": "key-other"})
    assert r.status_code == 403 and "another client" in r.json()["detail"]
    # ... frontend can.
    r = client.post("/feedback", json=fb, headers={"X-API-Key": "key-frontend"})
    assert r.status_code == 200, r.text


def test_client_ip_header_behind_a_trusted_proxy(setup):
    orch, client = setup(client_ip_header="X-Forwarded-For")
    alice = {"X-Forwarded-For": "203.0.113.5, 10.0.0.1"}
    body = _search(client, alice)
    fb = {"request_id": body["request_id"], "item_id": body["results"][0]["id"],
          "action": "click", "token": body["token"]}
    r = client.post("/feedback", json=fb, headers={"X-Forwarded-For": "203.0.113.6"})
    assert r.status_code == 403 and "another client" in r.json()["detail"]
    assert client.post("/feedback", json=fb, headers=alice).status_code == 200


def test_feedback_rate_limit_is_429_with_retry_after(setup):
    orch, client = setup(feedback_rate_limit=3, rate_window_s=3600)
    body = _search(client)
    results = body["results"]
    statuses = []
    for i in range(5):
        r = client.post("/feedback", json={"request_id": body["request_id"], "action": "click",
                                           "item_id": results[i % len(results)]["id"],
                                           "token": body["token"]})
        statuses.append(r.status_code)
    assert statuses[3:] == [429, 429], statuses
    assert all(s in (200, 409) for s in statuses[:3]), statuses
    r = client.post("/feedback", json={"request_id": body["request_id"], "action": "click",
                                       "item_id": results[0]["id"], "token": body["token"]})
    assert r.status_code == 429 and r.json()["error"] == "RateLimitedError"
    assert 1 <= int(r.headers["retry-after"]) <= 3600
    # Search is not limited by default, and the limit is per client: another address is fine.
    assert client.post("/search", json={"query": "jazz"}).status_code == 200
    other = TestClient(client.app, client=("198.51.100.7", 5000))
    r = other.post("/feedback", json={"request_id": body["request_id"], "action": "click",
                                      "item_id": results[0]["id"], "token": "v1.a.b.1.c"})
    assert r.status_code == 403  # reached the token check: not rate limited


def test_influence_cap_bounds_how_far_one_client_moves_the_posterior(setup):
    """What a client adds is its searches' observations (weight 1 per arm that ran, written
    with the impression); feedback only raises an existing observation and adds no weight.
    Once a search would take an arm over the cap, that search observes nothing and feedback
    on it is acknowledged as capped, never applied or logged."""
    cap = 3.0
    orch, client = setup(influence_cap=cap, influence_window_s=3600, feedback_rate_limit=0)
    before, events_before = _stats(orch)
    applied = capped = searches = 0
    for _ in range(8):
        body = _search(client)
        searches += 1
        for it in body["results"][:4]:
            for action in ("click", "play", "like"):
                r = client.post("/feedback", json={"request_id": body["request_id"],
                                                   "item_id": it["id"], "action": action,
                                                   "token": body["token"]})
                assert r.status_code == 200, r.text
                if r.json()["capped"]:
                    capped += 1
                else:
                    applied += 1
    after, events_after = _stats(orch)
    assert capped > 0 and applied > 0
    for comp in after:  # observation weight added per arm: at most the cap
        assert after[comp] - before[comp] <= cap + 1e-6, (comp, before[comp], after[comp])
    assert max(after[c] - before[c] for c in after) > 0
    # Capped feedback is not written to the event log (an offline rebuild would re-apply it):
    # the stream grew by the impressions (capped ones too, flagged) and the applied events.
    new_events = orch.log.read_events()[events_before:]
    n_imps = sum(e["type"] == "impression" for e in new_events)
    assert n_imps >= searches and events_after - events_before == n_imps + applied
    assert any(e.get("capped") for e in new_events if e["type"] == "impression")
    used = orch.influence.used("testclient")
    assert used and all(v <= cap + 1e-6 for v in used.values())
    assert "ltrr_feedback_capped_total " + f"{float(capped)}" in client.get("/metrics").text
    # Another client has its own budget; in-process callers (no client id) are not capped.
    other = TestClient(client.app, client=("198.51.100.8", 5000))
    body = _search(other)
    r = other.post("/feedback", json={"request_id": body["request_id"], "action": "click",
                                      "item_id": body["results"][0]["id"], "token": body["token"]})
    assert r.status_code == 200 and r.json()["capped"] is False
    resp = next(r for r in (orch.search(q, context=CTX) for q in QUERIES) if r.results)
    assert orch.feedback(resp.request_id, resp.results[0].id, "like").capped is False
