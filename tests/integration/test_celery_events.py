"""The event mover under a real Celery worker: a worker killed between the Elasticsearch write
and the stream ack loses nothing and duplicates nothing."""

from __future__ import annotations

import json
import uuid

import pytest
from celery_helpers import WorkerHarness

pytestmark = [pytest.mark.celery_worker, pytest.mark.elasticsearch, pytest.mark.redis]


@pytest.fixture()
def harness(es, redis_client, redis_prefix):
    alias = f"test-events-{uuid.uuid4().hex[:8]}"
    h = WorkerHarness(LTRR_REDIS__KEY_PREFIX=redis_prefix, LTRR_ES__EVENTS_ALIAS=alias,
                      LTRR_CELERY__CLAIM_IDLE_MS="0", LTRR_CELERY__EVENT_BATCH_SIZE="100")
    h.alias = alias
    yield h
    es.indices.delete(index=f"{alias}*", ignore_unavailable=True, allow_no_indices=True)


def test_killed_worker_loses_and_duplicates_nothing(es, redis_client, redis_prefix, harness):
    alias = harness.alias
    stream = f"{redis_prefix}events"
    ids = []
    for i in range(250):
        kind = "impression" if i % 2 == 0 else "feedback"
        data = {"request_id": f"r{i // 2}", "query": "chill jazz", "item_id": f"track:{i}",
                "action": "click", "rank": 1 + i % 10}
        ids.append(redis_client.xadd(stream, {"type": kind, "data": json.dumps(data)}).decode())
    proc = harness.start()
    try:
        harness.send("move_events", crash_after_write=True)
        proc.wait(timeout=120)  # the worker dies inside the task
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 17, proc.stderr.read()[-2000:]
    es.indices.refresh(index=alias)
    # The first batch reached Elasticsearch but was never acknowledged.
    assert es.count(index=alias)["count"] == 100
    assert redis_client.xpending(stream, "ltrr-event-mover")["pending"] == 100

    (res,) = harness.run("move_events")
    assert res["reclaimed"] == 100 and res["moved"] == 150 and res["failed"] == 0
    es.indices.refresh(index=alias)
    assert es.count(index=alias)["count"] == 250
    stored = {h["_id"] for h in es.search(index=alias, size=500, source=False)["hits"]["hits"]}
    assert stored == set(ids)
    assert redis_client.xpending(stream, "ltrr-event-mover")["pending"] == 0
    # Moved entries stay until the memory updater's group has acknowledged them too ...
    assert redis_client.xlen(stream) == 250
    for eid, _ in redis_client.xreadgroup("memory", "test", {stream: ">"})[0][1]:
        redis_client.xack(stream, "memory", eid)
    # ... then the next move trims them.
    (res,) = harness.run("move_events")
    assert res["trimmed"] == 250 and redis_client.xlen(stream) == 0
    doc = es.get(index=alias, id=ids[1])["_source"]
    assert doc["type"] == "feedback" and doc["item_id"] == "track:1" and doc["rank"] == 2
