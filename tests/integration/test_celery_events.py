"""The event mover under a real Celery worker: a worker killed between the Elasticsearch write
and the stream ack loses nothing and duplicates nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import pytest

from orchestrator.celery_app import make_app
from orchestrator.settings import OrchestratorSettings

pytestmark = [pytest.mark.celery_worker, pytest.mark.elasticsearch, pytest.mark.redis]


@pytest.fixture()
def worker_env(es, redis_client, redis_prefix):
    alias = f"test-events-{uuid.uuid4().hex[:8]}"
    queue = f"test-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, LTRR_REDIS__KEY_PREFIX=redis_prefix, LTRR_ES__EVENTS_ALIAS=alias,
               LTRR_CELERY__CLAIM_IDLE_MS="0", LTRR_CELERY__EVENT_BATCH_SIZE="100")
    yield env, alias, queue
    es.indices.delete(index=f"{alias}*", ignore_unavailable=True, allow_no_indices=True)


def start_worker(env: dict[str, str], queue: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "orchestrator.celery_app:app", "worker",
         "--pool=solo", "-Q", queue, "--loglevel=WARNING", "--without-heartbeat",
         "--without-gossip", "--without-mingle"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def client_app(env: dict[str, str]):
    keys = {k: v for k, v in env.items() if k.startswith("LTRR_")}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        return make_app(OrchestratorSettings())
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_killed_worker_loses_and_duplicates_nothing(es, redis_client, redis_prefix, worker_env):
    env, alias, queue = worker_env
    stream = f"{redis_prefix}events"
    ids = []
    for i in range(250):
        kind = "impression" if i % 2 == 0 else "feedback"
        data = {"request_id": f"r{i // 2}", "query": "chill jazz", "item_id": f"track:{i}",
                "action": "click", "rank": 1 + i % 10}
        ids.append(redis_client.xadd(stream, {"type": kind, "data": json.dumps(data)}).decode())
    app = client_app(env)

    proc = start_worker(env, queue)
    try:
        app.send_task("orchestrator.tasks.move_events", kwargs={"crash_after_write": True},
                      queue=queue)
        proc.wait(timeout=120)  # the worker dies inside the task
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 17, proc.stderr.read()[-2000:]
    es.indices.refresh(index=alias)
    # The first batch reached Elasticsearch but was never acknowledged.
    assert es.count(index=alias)["count"] == 100
    assert redis_client.xpending(stream, "ltrr-event-mover")["pending"] == 100

    proc = start_worker(env, queue)
    try:
        res = app.send_task("orchestrator.tasks.move_events", queue=queue).get(timeout=120)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert res["reclaimed"] == 100 and res["moved"] == 150 and res["failed"] == 0
    es.indices.refresh(index=alias)
    assert es.count(index=alias)["count"] == 250
    stored = {h["_id"] for h in es.search(index=alias, size=500, source=False)["hits"]["hits"]}
    assert stored == set(ids)
    assert redis_client.xpending(stream, "ltrr-event-mover")["pending"] == 0
    # Moved entries are trimmed from the stream.
    assert redis_client.xlen(stream) == 0
    doc = es.get(index=alias, id=ids[1])["_source"]
    assert doc["type"] == "feedback" and doc["item_id"] == "track:1" and doc["rank"] == 2
