"""Faults of the real services, each provoked from the test: a broken arm, a stopped
Elasticsearch node, a stopped Redis, and restarts of either in the middle of a load.

Stops and starts happen on a PRIVATE pair of services (``scripts/services`` with their own
state dir and ports, started by the ``private_services`` fixture and shut down after this
module), never on the shared ones other tests use. The private node holds a small real slice
of the catalog (jazz and blues, with embeddings). No timing assertions: the one bound below
(a search with Elasticsearch down answers within 10 s) is a liveness check, not a performance
claim.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from orchestrator.errors import ServiceUnavailableError, UnknownRequestError
from orchestrator.pipeline import Orchestrator
from orchestrator.selection import FixedPlanSelector
from orchestrator.settings import PROJECT_ROOT, EsSettings, RedisSettings
from orchestrator.templates import TemplateRegistry

pytestmark = [pytest.mark.elasticsearch, pytest.mark.redis]

REQUIRE = os.environ.get("CI") == "true" or os.environ.get("LTRR_REQUIRE_SERVICES") == "1"
SCRIPT = PROJECT_ROOT / "scripts" / "services"
PRIVATE_ENV = {"LTRR_STATE": "/tmp/ltrr-faults", "LTRR_ES_PORT": "9251",
               "LTRR_REDIS_PORT": "6391", "LTRR_ES_HEAP": "512m"}
ES_URL = "http://127.0.0.1:9251"
REDIS_URL = "redis://127.0.0.1:6391/0"
FAULT_ALIAS = "faults-catalog"
FAULT_GENRES = frozenset({"jazz", "blues"})
QUERIES = ["blue in green", "miles davis", "so what", "take five", "john coltrane",
           "ella fitzgerald", "bb king", "the thrill is gone", "summertime", "autumn leaves",
           "cool jazz", "chicago blues", "billie holiday", "stormy monday", "round midnight"]


def services(cmd: str) -> None:
    """``scripts/services <cmd>`` on the private pair."""
    subprocess.run(["bash", str(SCRIPT), cmd], env={**os.environ, **PRIVATE_ENV}, check=True,
                   timeout=300, capture_output=True)


@pytest.fixture(scope="module")
def private_services():
    try:
        services("up")
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        msg = f"private services did not start: {exc} {getattr(exc, 'stderr', b'')[-500:]!r}"
        if REQUIRE:
            pytest.fail(msg)
        pytest.skip(msg)
    yield PRIVATE_ENV
    services("down")


@pytest.fixture(scope="module")
def private_es(private_services, settings):
    from orchestrator.catalog import CatalogBuilder
    from orchestrator.embeddings import get_encoder
    from orchestrator.es_client import build_client
    from orchestrator.ingest import CatalogIndexer

    es = build_client(EsSettings(url=ES_URL, request_timeout_s=60))
    fingerprint = f"genres={sorted(FAULT_GENRES)};dims={settings.embedding.dim};v1"
    if es.indices.exists_alias(name=FAULT_ALIAS):
        meta = next(iter(es.indices.get_mapping(index=FAULT_ALIAS).body.values()))
        if meta["mappings"].get("_meta", {}).get("fingerprint") == fingerprint:
            return es
    indexer = CatalogIndexer(es, alias=FAULT_ALIAS, mappings_dir=settings.ingest.mappings_dir,
                             encoder=get_encoder(settings.embedding), keep_old_indices=0,
                             chunk_size=settings.ingest.chunk_size,
                             thread_count=settings.ingest.thread_count)
    summary = indexer.run(CatalogBuilder(settings.ingest.data_dir, genres=set(FAULT_GENRES)),
                          progress=False)
    es.indices.put_mapping(index=summary.index, meta={"schema": "catalog", "version": 1,
                                                      "fingerprint": fingerprint})
    return es


@pytest.fixture(scope="module")
def private_redis(private_services):
    from orchestrator.redis_client import build_redis

    return build_redis(RedisSettings(url=REDIS_URL))


@pytest.fixture()
def private_prefix(private_services, private_redis):
    services("start-redis")
    prefix = f"faults:{uuid.uuid4().hex[:8]}:"
    yield prefix
    services("start-redis")  # a failed test may have left it stopped
    wait_for(lambda: private_redis.ping())
    for key in private_redis.scan_iter(match=prefix + "*", count=1000):
        private_redis.delete(key)


@pytest.fixture()
def es_running(private_es):
    """The private node is up before and after the test (whatever the test did to it)."""
    services("start-es")
    yield private_es
    services("start-es")


def wait_for(fn, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            out = fn()
            if out:
                return out
        except Exception as exc:  # noqa: BLE001 - still coming back
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"condition not met within {timeout}s (last error: {last})")


def build(settings, *, es, redis_client, es_url, redis_url, alias, prefix, spool_dir,
          registry=None, selector=None, **resilience) -> Orchestrator:
    s = settings.model_copy(update={
        "es": settings.es.model_copy(update={"url": es_url, "catalog_alias": alias}),
        "redis": settings.redis.model_copy(update={"url": redis_url, "key_prefix": prefix}),
        "templates": settings.templates.model_copy(update={"mode": "local"}),
    })
    return Orchestrator.from_settings(
        s, es=es, redis=redis_client, understander=None, registry=registry, selector=selector,
        bandit={"refresh_interval_s": 0, "seed": 11},
        resilience={"spool_dir": str(spool_dir), "es_reset_timeout_s": 0.5, "redis_retry_s": 0.2,
                    **resilience})


def lexical_registry(extra: Path | None = None) -> TemplateRegistry:
    real = TemplateRegistry.from_dir(PROJECT_ROOT / "query_templates").by_id
    by_id = {"lexical.v1": real["lexical.v1"], "lexical_popular.v1": real["lexical_popular.v1"]}
    if extra is not None:
        by_id.update(TemplateRegistry.from_dir(extra).by_id)
    return TemplateRegistry(by_id)


def stored_feedback(redis_client, prefix: str) -> list[dict]:
    import json

    out = []
    for _, fields in redis_client.xrange(f"{prefix}events"):
        if fields[b"type"] == b"feedback":
            out.append(json.loads(fields[b"data"]))
    return out


def linear_n(orch: Orchestrator, component: str) -> float:
    return orch.store.load_linear([component])[component].n


# -- a broken arm ----------------------------------------------------------------------------
def test_failed_arm_is_dropped_and_charged_a_failure_observation(
        es, redis_client, redis_prefix, settings, catalog_slice, tmp_path):
    tdir = tmp_path / "templates"
    tdir.mkdir()
    # A real arm's sidecar shape, a query Elasticsearch refuses at run time: a term query on
    # the dense_vector field (query_shard_exception on every shard).
    (tdir / "broken.v1.json").write_text(
        '{"name": "broken", "version": 1, "description": "TEST ONLY: always fails",'
        ' "required_slots": [], "action_features": {"source": "broken"},'
        ' "params": {"query": {"type": "string", "required": true, "max_chars": 256},'
        ' "size": {"type": "integer", "default": 10, "minimum": 0, "maximum": 1000}}}')
    (tdir / "broken.v1.mustache").write_text(
        '{"size": {{size}}, "query": {"term": {"embedding": "{{query}}"}}}')
    orch = build(settings, es=es, redis_client=redis_client, es_url=settings.es.url,
                 redis_url=settings.redis.url, alias=catalog_slice, prefix=redis_prefix,
                 spool_dir=tmp_path / "spool", registry=lexical_registry(tdir),
                 selector=FixedPlanSelector({"lexical.v1": 20, "broken.v1": 20}))
    resp = orch.search("take five", size=10)
    assert [f.template_id for f in resp.failures] == ["broken.v1"]
    assert resp.failures[0].status == 400 and "dense_vector" in resp.failures[0].reason
    assert resp.results and all(p.template_id == "lexical.v1"
                                for it in resp.results for p in it.provenance)
    imp = orch.explain(resp.request_id)
    assert imp["executed"] == ["lexical.v1"] and imp["failures"][0]["template_id"] == "broken.v1"

    components = ["arm:broken.v1", "af:source=broken", "arm:lexical.v1"]
    # At search time both chosen arms got their one observation: the arm that ran reward 0
    # minus its latency, the failed one the failure reward (it is blamed, see rewards.py).
    before = {c: linear_n(orch, c) for c in components}
    assert before == {"arm:broken.v1": 1, "af:source=broken": 1, "arm:lexical.v1": 1}
    broken_b = orch.store.load_linear(["arm:broken.v1"])["arm:broken.v1"].b.copy()
    fb_play = orch.feedback(resp.request_id, resp.results[0].id, "play")
    fb_skip = orch.feedback(resp.request_id, resp.results[1].id, "skip")
    after = {c: linear_n(orch, c) for c in components}
    assert set(fb_play.rewards) == set(fb_skip.rewards) == {"lexical.v1", "broken.v1"}
    assert fb_play.rewards["broken.v1"] == 0.0  # failure_reward 0, an error costs no latency
    # Feedback adds no observation; it raised lexical's and left the failed arm's alone.
    assert after == before
    assert np.array_equal(orch.store.load_linear(["arm:broken.v1"])["arm:broken.v1"].b, broken_b)
    assert orch.store.impressions() == {"lexical.v1": 1}


# -- Elasticsearch down ----------------------------------------------------------------------
def test_elasticsearch_down_fails_fast_clearly_and_recovers(
        es_running, redis_client, redis_prefix, settings, tmp_path):
    orch = build(settings, es=es_running, redis_client=redis_client, es_url=ES_URL,
                 redis_url=settings.redis.url, alias=FAULT_ALIAS, prefix=redis_prefix,
                 spool_dir=tmp_path / "spool", registry=lexical_registry(),
                 es_failure_threshold=2, es_reset_timeout_s=1.0)
    ok = orch.search("miles davis", size=5)
    assert ok.results
    services("stop-es")
    try:
        errors = []
        for _ in range(4):
            t0 = time.monotonic()
            with pytest.raises(ServiceUnavailableError) as info:
                orch.search("miles davis", size=5)
            assert time.monotonic() - t0 < 10  # liveness: an answer, not a hang
            errors.append(str(info.value))
        assert all("\n" not in e and e.startswith("Elasticsearch is not reachable at") for e in errors)
        # After two connection failures the breaker is open: later searches fail without
        # trying, and the message says so.
        assert "circuit open" in errors[-1]
        assert orch.resilience_status()["elasticsearch_breaker"]["state"] in ("open", "half_open")
        assert orch.health()["elasticsearch"] != "ok" and orch.health()["redis"] == "ok"
        # Feedback on a response served before the outage does not need Elasticsearch.
        assert not orch.feedback(ok.request_id, ok.results[0].id, "click").duplicate
    finally:
        services("start-es")
    wait_for(lambda: orch.search("miles davis", size=5).results)
    assert orch.resilience_status()["elasticsearch_breaker"]["state"] == "closed"
    assert orch.health()["elasticsearch"] == "ok"


def test_fallback_cache_serves_degraded_results_without_learning(
        es_running, redis_client, redis_prefix, settings, tmp_path):
    orch = build(settings, es=es_running, redis_client=redis_client, es_url=ES_URL,
                 redis_url=settings.redis.url, alias=FAULT_ALIAS, prefix=redis_prefix,
                 spool_dir=tmp_path / "spool", registry=lexical_registry(),
                 fallback_cache_size=100)
    good = orch.search("Take Five", size=5)
    assert good.results and not good.failures
    services("stop-es")
    try:
        stale = orch.search("  take five ", size=5)  # same normalized query and size
        with pytest.raises(ServiceUnavailableError):
            orch.search("take five", size=6)  # never served at this size: nothing to fall back on
        with pytest.raises(ServiceUnavailableError):
            orch.search("summertime", size=5)
    finally:
        services("start-es")
    assert stale.request_id != good.request_id
    assert [r.id for r in stale.results] == [r.id for r in good.results]
    assert stale.timings_ms["degraded"] == 1.0 and stale.failures
    assert all(f.status == 503 and f.reason.startswith("fallback cache:") for f in stale.failures)
    imp = orch.explain(stale.request_id)
    assert imp["degraded"] == "fallback_cache" and imp["executed"] == []
    before = {c: linear_n(orch, c) for c in ("arm:lexical.v1", "arm:lexical_popular.v1")}
    fb = orch.feedback(stale.request_id, stale.results[0].id, "play")
    assert fb.rewards == {} and not fb.duplicate  # logged, but no arm ran for this request
    assert {c: linear_n(orch, c) for c in before} == before
    assert stored_feedback(redis_client, redis_prefix)[-1]["request_id"] == stale.request_id


# -- Redis down --------------------------------------------------------------------------------
def test_redis_down_searches_serve_and_feedback_is_spooled_then_replayed(
        private_redis, private_prefix, es, catalog_slice, settings, tmp_path):
    spool_dir = tmp_path / "spool"
    orch = build(settings, es=es, redis_client=private_redis, es_url=settings.es.url,
                 redis_url=REDIS_URL, alias=catalog_slice, prefix=private_prefix,
                 spool_dir=spool_dir, registry=lexical_registry())
    before = orch.search("take five", size=5)
    orch.feedback(before.request_id, before.results[0].id, "play")
    acked = {(before.request_id, before.results[0].id, "play")}

    services("stop-redis")
    try:
        # Searches still serve, from the posteriors held in memory.
        during = [orch.search(q, size=5) for q in ("so what", "summertime", "autumn leaves")]
        assert all(r.results for r in during)
        # Feedback is acknowledged once it is on disk: on a response from before the outage
        # (impression from memory) and on responses served during it (impression spooled).
        for r in [before, *during]:
            res = orch.feedback(r.request_id, r.results[-1].id, "click")
            assert not res.duplicate
            acked.add((r.request_id, r.results[-1].id, "click"))
        # The same feedback again is recognised while still spooled.
        assert orch.feedback(during[0].request_id, during[0].results[-1].id, "click").duplicate
        health = orch.health()
        assert health["redis"] != "ok" and "spooled" in health["spool"]
        status = orch.resilience_status()["spool"]
        assert status["spooled"] == 3 + 4  # 3 impressions + 4 feedbacks
        lines = Path(status["spool_file"]).read_text().splitlines()
        assert len(lines) == 7  # durable before acknowledged
        assert orch.replay_spool() == 0  # still down: nothing lost, nothing skipped
        with pytest.raises(ServiceUnavailableError):
            orch.explain(during[0].request_id)  # reads need Redis: a clear 503
    finally:
        services("start-redis")
    wait_for(lambda: private_redis.ping())
    # The background replayer drains the spool on its own.
    wait_for(lambda: orch.resilience_status()["spool"]["spooled"] == 0, timeout=30)
    assert orch.health()["spool"] == "ok"
    stored = {(e["request_id"], e["item_id"], e["action"])
              for e in stored_feedback(private_redis, private_prefix)}
    assert stored == acked
    for r in during:
        assert orch.explain(r.request_id)["request_id"] == r.request_id
    assert orch.feedback(during[1].request_id, during[1].results[-1].id, "click").duplicate
    # Replaying again changes nothing (idempotent).
    n_stream = private_redis.xlen(f"{private_prefix}events")
    imps = orch.store.impressions()
    assert orch.writer.replay() == 0
    assert private_redis.xlen(f"{private_prefix}events") == n_stream
    assert orch.store.impressions() == imps


class SocketTimeouts:
    """Counts the Redis replies that never came (socket time-outs), whatever command or
    pipeline waited for them: the cost a hung Redis puts on a call, counted, not timed."""

    def __init__(self, monkeypatch) -> None:
        import redis.connection

        self.n = 0
        real = redis.connection.AbstractConnection.read_response

        def read_response(conn, *args, **kwargs):
            try:
                return real(conn, *args, **kwargs)
            except redis.TimeoutError:
                self.n += 1
                raise

        monkeypatch.setattr(redis.connection.AbstractConnection, "read_response", read_response)

    def during(self, fn):
        before = self.n
        out = fn()
        return out, self.n - before


def test_hung_redis_costs_a_search_one_time_out_then_none(
        private_redis, private_prefix, es, catalog_slice, settings, tmp_path, monkeypatch):
    """Redis frozen (SIGSTOP: connections accepted, never answered). Each search reads the
    statistics, the budget statistics and the memory keys from Redis and writes its
    impression; without the shared breaker each read waited its own socket time-out."""
    import signal

    from orchestrator.redis_client import build_redis

    hung_client = build_redis(RedisSettings(url=REDIS_URL, socket_timeout_s=0.5))
    # A long retry interval: nothing probes Redis behind the test's back until it replays.
    orch = build(settings, es=es, redis_client=hung_client, es_url=settings.es.url,
                 redis_url=REDIS_URL, alias=catalog_slice, prefix=private_prefix,
                 spool_dir=tmp_path / "spool", registry=lexical_registry(), redis_retry_s=600)
    warm = orch.search("take five", size=5)
    assert warm.results and orch.writer.breaker.state == "closed"
    timeouts = SocketTimeouts(monkeypatch)
    pid = int(Path(PRIVATE_ENV["LTRR_STATE"], "redis", "redis.pid").read_text().strip())
    os.kill(pid, signal.SIGSTOP)
    try:
        first, n_first = timeouts.during(lambda: orch.search("so what", size=5))
        rest = [timeouts.during(lambda q=q: orch.search(q, size=5))
                for q in ("summertime", "autumn leaves")]
        fb, n_fb = timeouts.during(lambda: orch.feedback(first.request_id, first.results[0].id, "play"))
        assert n_first == 1, f"the first search waited on {n_first} Redis replies"
        assert [n for _, n in rest] == [0, 0]
        assert n_fb == 0 and not fb.duplicate
        assert first.results and all(r.results for r, _ in rest)
        assert orch.writer.breaker.state != "closed"
        assert orch.resilience_status()["spool"]["spooled"] == 3 + 1  # impressions + feedback
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: private_redis.ping())
    assert orch.replay_spool() == 4 and orch.writer.breaker.state == "closed"
    after, n_after = timeouts.during(lambda: orch.search("blue in green", size=5))
    assert n_after == 0 and after.results
    stored = {(e["request_id"], e["action"]) for e in stored_feedback(private_redis, private_prefix)}
    assert stored == {(first.request_id, "play")}
    orch.close()


@pytest.mark.parametrize("adopter", ["next_orchestrator", "replay_command"])
def test_spool_left_by_a_dead_process_is_adopted(private_redis, private_prefix, es,
                                                  catalog_slice, settings, tmp_path, adopter):
    spool_dir = tmp_path / "spool"
    kw = dict(es=es, redis_client=private_redis, es_url=settings.es.url, redis_url=REDIS_URL,
              alias=catalog_slice, prefix=private_prefix, spool_dir=spool_dir,
              registry=lexical_registry())
    first = build(settings, **kw)
    resp = first.search("blue in green", size=5)
    services("stop-redis")
    try:
        acked = []
        for it in resp.results[:3]:
            first.feedback(resp.request_id, it.id, "like")
            acked.append(it.id)
        orphan = Path(first.resilience_status()["spool"]["spool_file"])
        # The process goes away with Redis still down: the replay thread stops, the file stays.
        first.writer._stop.set()
        first.close()
        assert len(orphan.read_text().splitlines()) == 3
    finally:
        services("start-redis")
    wait_for(lambda: private_redis.ping())
    if adopter == "next_orchestrator":
        second = build(settings, **kw)  # a new process for the same Redis state adopts the file
        wait_for(lambda: not orphan.exists(), timeout=30)
        assert second.health()["spool"] == "ok"
    else:  # python -m orchestrator.resilience replay
        from orchestrator.resilience import replay_spools

        s = settings.model_copy(update={
            "redis": settings.redis.model_copy(update={"url": REDIS_URL, "key_prefix": private_prefix}),
            "resilience": settings.resilience.model_copy(update={"spool_dir": spool_dir})})
        assert replay_spools(s) == {"files": 1, "replayed": 3, "busy": 0}
        assert not orphan.exists()
    stored = stored_feedback(private_redis, private_prefix)
    assert sorted(e["item_id"] for e in stored) == sorted(acked)


# -- restarts mid-load -----------------------------------------------------------------------
def _load(orch: Orchestrator, stop: threading.Event, seed: int, out: dict) -> None:
    """Search + feedback in a loop; records what was acknowledged and what failed."""
    rng = random.Random(seed)
    while not stop.is_set():
        q = rng.choice(QUERIES)
        try:
            resp = orch.search(q, size=5)
            out["searches"] += 1
            # one bandit observation per chosen arm, written with the impression
            out["observations"] += len(resp.decision.choices)
        except ServiceUnavailableError:
            out["search_errors"] += 1
            time.sleep(0.05)
            continue
        if not resp.results:
            continue
        for it in rng.sample(resp.results, k=min(2, len(resp.results))):
            action = rng.choice(["click", "play", "skip"])
            try:
                res = orch.feedback(resp.request_id, it.id, action)
            except (ServiceUnavailableError, UnknownRequestError):
                out["feedback_errors"] += 1
                continue
            if not res.duplicate:
                out["acked"].add((resp.request_id, it.id, action))
        out["recent"].append(resp)


def _run_load(orch: Orchestrator, disrupt) -> dict:
    stop = threading.Event()
    outs = [{"searches": 0, "search_errors": 0, "feedback_errors": 0, "observations": 0,
             "acked": set(), "recent": []} for _ in range(3)]
    threads = [threading.Thread(target=_load, args=(orch, stop, i, outs[i]), daemon=True)
               for i in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(2.0)
        disrupt()
        time.sleep(2.0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    merged = {k: sum(o[k] for o in outs)
              for k in ("searches", "search_errors", "feedback_errors", "observations")}
    merged["acked"] = set().union(*(o["acked"] for o in outs))
    merged["recent"] = [r for o in outs for r in o["recent"]]
    return merged


def test_redis_restart_mid_load_loses_no_acknowledged_feedback(
        private_redis, private_prefix, es, catalog_slice, settings, tmp_path):
    orch = build(settings, es=es, redis_client=private_redis, es_url=settings.es.url,
                 redis_url=REDIS_URL, alias=catalog_slice, prefix=private_prefix,
                 spool_dir=tmp_path / "spool", registry=lexical_registry())

    def restart():
        services("stop-redis")
        time.sleep(2.0)  # load goes on with Redis down
        services("start-redis")

    out = _run_load(orch, restart)
    wait_for(lambda: private_redis.ping())
    wait_for(lambda: orch.replay_spool() >= 0 and orch.resilience_status()["spool"]["spooled"] == 0,
             timeout=60)
    assert out["search_errors"] == 0  # searches never needed Redis to answer
    assert out["acked"] and orch.writer.spooled > 0  # the outage really happened under load
    stored = [(e["request_id"], e["item_id"], e["action"])
              for e in stored_feedback(private_redis, private_prefix)
              if e["action"] != "empty"]
    assert len(stored) == len(set(stored))  # nothing counted twice by the replay
    assert set(stored) == out["acked"]       # nothing acknowledged was lost
    members = set()
    for rid in {a[0] for a in out["acked"]}:
        members |= {(rid, i, a) for i, a in orch.log.counted(rid)}
    assert out["acked"] <= members           # duplicate markers came through too
    # Bandit statistics: each search's observations (one per chosen arm, written with its
    # impression; feedback only raises them) were added exactly once, spooled or not.
    total_n = sum(linear_n(orch, f"arm:{t}") for t in ("lexical.v1", "lexical_popular.v1"))
    assert total_n == out["observations"]
    assert orch.search("take five", size=5).results  # and it keeps serving


def test_elasticsearch_restart_mid_load_loses_no_acknowledged_feedback(
        es_running, private_redis, private_prefix, settings, tmp_path):
    orch = build(settings, es=es_running, redis_client=private_redis, es_url=ES_URL,
                 redis_url=REDIS_URL, alias=FAULT_ALIAS, prefix=private_prefix,
                 spool_dir=tmp_path / "spool", registry=lexical_registry())

    def restart():
        services("restart-es")

    out = _run_load(orch, restart)
    assert out["searches"] and out["acked"]
    assert out["search_errors"] > 0  # the node really was down under load (fast 503s)
    stored = [(e["request_id"], e["item_id"], e["action"])
              for e in stored_feedback(private_redis, private_prefix) if e["action"] != "empty"]
    assert len(stored) == len(set(stored)) and set(stored) == out["acked"]
    assert orch.resilience_status()["spool"]["spooled"] == 0
    wait_for(lambda: orch.search("miles davis", size=5).results)  # searches recover



def test_http_with_redis_down_serves_acknowledges_and_reports_degraded(
        private_redis, private_prefix, es, catalog_slice, settings, tmp_path):
    from fastapi.testclient import TestClient

    from orchestrator.api import create_app

    orch = build(settings, es=es, redis_client=private_redis, es_url=settings.es.url,
                 redis_url=REDIS_URL, alias=catalog_slice, prefix=private_prefix,
                 spool_dir=tmp_path / "spool", registry=lexical_registry())
    client = TestClient(create_app(orch))
    warm = client.post("/search", json={"query": "take five", "size": 5})
    assert warm.status_code == 200, warm.text
    services("stop-redis")
    try:
        r = client.post("/search", json={"query": "so what", "size": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        f = client.post("/feedback", json={"request_id": body["request_id"], "action": "play",
                                           "item_id": body["results"][0]["id"],
                                           "token": body["token"]})
        assert f.status_code == 200, f.text
        h = client.get("/healthz")
        assert h.status_code == 503 and h.json()["status"] == "degraded"
        assert h.json()["redis"] != "ok" and "spooled" in h.json()["spool"]
    finally:
        services("start-redis")
    wait_for(lambda: private_redis.ping())
    wait_for(lambda: client.get("/healthz").status_code == 200, timeout=30)
    stored = stored_feedback(private_redis, private_prefix)
    assert [(e["request_id"], e["action"]) for e in stored] == [(body["request_id"], "play")]
