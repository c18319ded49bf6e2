"""Failures of the real services: a Redis restart loses nothing; a dead Elasticsearch node
or Redis gives a clear error, not a crash or a hang."""

from __future__ import annotations

import subprocess
import time

import pytest

from orchestrator.errors import ServiceUnavailableError
from orchestrator.pipeline import Orchestrator
from orchestrator.settings import PROJECT_ROOT, EsSettings

pytestmark = [pytest.mark.elasticsearch, pytest.mark.redis]


def _orch(settings, es, redis_client, prefix, alias):
    s = settings.model_copy(update={
        "redis": settings.redis.model_copy(update={"key_prefix": prefix}),
        "es": settings.es.model_copy(update={"catalog_alias": alias}),
    })
    return Orchestrator.from_settings(s, es=es, redis=redis_client,
                                      bandit={"refresh_interval_s": 0, "seed": 3})


def _wait_redis(client, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.ping():
                return
        except Exception:  # noqa: BLE001 - still restarting
            time.sleep(0.2)
    raise AssertionError("redis did not come back")


def test_redis_restart_loses_nothing(es, redis_client, redis_prefix, settings, catalog_slice):
    orch = _orch(settings, es, redis_client, redis_prefix, catalog_slice)
    resp = orch.search("shape of you ed sheeran", size=5)
    top = resp.results[0].id
    orch.feedback(resp.request_id, top, "play")
    before = {a["template_id"]: a["impressions"] for a in orch.arms()}
    stream_len = redis_client.xlen(f"{redis_prefix}events")
    assert stream_len >= 2 and sum(before.values()) >= 1

    # A real restart of the Redis server (AOF on): flushes and reloads from disk.
    subprocess.run(["bash", str(PROJECT_ROOT / "scripts" / "services"), "restart-redis"],
                   check=True, timeout=120)
    _wait_redis(redis_client)

    assert redis_client.xlen(f"{redis_prefix}events") == stream_len
    assert {a["template_id"]: a["impressions"] for a in orch.arms()} == before
    assert orch.explain(resp.request_id)["request_id"] == resp.request_id
    # The duplicate marker survived too: the same play is not counted twice.
    assert orch.feedback(resp.request_id, top, "play").duplicate
    # And the orchestrator keeps working on the reconnected client.
    assert orch.search("bohemian rhapsody", size=3).results


def test_dead_elasticsearch_is_a_clear_error(settings, redis_client, redis_prefix):
    from orchestrator.es_client import build_client

    dead = build_client(EsSettings(url="http://127.0.0.1:1", request_timeout_s=2))
    with pytest.raises(ServiceUnavailableError, match="Elasticsearch is not reachable"):
        _orch(settings, dead, redis_client, redis_prefix, "ltrr-catalog")
