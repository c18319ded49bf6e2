"""The examination model against real Redis and Elasticsearch: persistence, per-process cache,
and the retraining job (events moved from the stream to the index, estimated, stored)."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from orchestrator.examination import ExaminationModel, clear_cache
from orchestrator.tasks import CHAIN, run_estimate_examination, run_move_events

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
from test_examination import simulate_pbm  # noqa: E402


@pytest.fixture()
def events_alias(es):
    alias = f"test-events-{uuid.uuid4().hex[:8]}"
    yield alias
    es.indices.delete(index=f"{alias}*", ignore_unavailable=True, allow_no_indices=True)


def test_save_load_round_trip_and_cache(redis_client, redis_prefix):
    clear_cache()
    assert ExaminationModel.load(redis_client, prefix=redis_prefix) == ExaminationModel.default()
    m1 = ExaminationModel((1.0, 0.6, 0.4, 0.3), {"kind": "swap_estimate", "impressions": 7})
    assert m1.save(redis_client, prefix=redis_prefix) == 1
    clear_cache()
    got = ExaminationModel.load(redis_client, prefix=redis_prefix)
    assert got == m1 and got.meta["version"] == 1 and got.meta["impressions"] == 7
    # Another process saves v2: this one sees it only after its refresh interval.
    m2 = ExaminationModel((1.0, 0.5, 0.2))
    key = f"{redis_prefix}examination"
    redis_client.hincrby(key, "version", 1)
    redis_client.hset(key, "model", json.dumps(m2.to_dict()))
    assert ExaminationModel.load(redis_client, prefix=redis_prefix, refresh_interval_s=3600) == m1
    fresh = ExaminationModel.load(redis_client, prefix=redis_prefix, refresh_interval_s=0)
    assert fresh == m2 and fresh.meta["version"] == 2
    # An unreadable schema falls back to the prior instead of failing a search.
    redis_client.hset(key, "model", json.dumps({**m2.to_dict(), "schema_version": 99}))
    assert ExaminationModel.load(redis_client, prefix=redis_prefix,
                                 refresh_interval_s=0) == ExaminationModel.default()


def test_job_estimates_from_the_events_index(es, redis_client, redis_prefix, settings,
                                             events_alias):
    clear_cache()
    s = settings.model_copy(update={
        "redis": settings.redis.model_copy(update={"key_prefix": redis_prefix}),
        "es": settings.es.model_copy(update={"events_alias": events_alias}),
        "examination": settings.examination.model_copy(update={"max_position": 6,
                                                               "prior_strength": 10}),
    })
    names = [n for n, _ in CHAIN]
    assert names.index("estimate_examination") < names.index("rebuild_posteriors")
    assert run_estimate_examination(s, es, redis_client).get("skipped")  # no index yet

    def truth(k):
        return 1.0 / k

    events = simulate_pbm(4000, rate=0.5, K=6, theta=truth, seed=11, lengths=(6, 10))
    pipe = redis_client.pipeline()
    for ev in events:
        data = {k: v for k, v in ev.items() if k != "type"}
        pipe.xadd(f"{redis_prefix}events", {"type": ev["type"], "data": json.dumps(data)})
    pipe.execute()
    assert run_move_events(s, es, redis_client)["moved"] == len(events)
    es.indices.refresh(index=events_alias)
    res = run_estimate_examination(s, es, redis_client)
    assert res["version"] == 1 and res["impressions"] == 4000
    assert res["swapped"] + res["control"] == 4000
    stored = ExaminationModel.load(redis_client, prefix=redis_prefix, refresh_interval_s=0)
    est = np.array(stored.theta[:6])
    assert np.max(np.abs(est - [truth(k) for k in range(1, 7)])) < 0.08, est
    assert stored.meta["version"] == 1 and stored.meta["kind"] == "swap_estimate"


@pytest.mark.celery_worker
def test_estimate_examination_task_on_a_real_worker(es, redis_client, redis_prefix, events_alias):
    from celery_helpers import WorkerHarness

    clear_cache()
    events = simulate_pbm(1500, rate=0.5, K=5, theta=lambda k: 1.0 / k, seed=12, lengths=(5, 8))
    pipe = redis_client.pipeline()
    for ev in events:
        data = {k: v for k, v in ev.items() if k != "type"}
        pipe.xadd(f"{redis_prefix}events", {"type": ev["type"], "data": json.dumps(data)})
    pipe.execute()
    harness = WorkerHarness(LTRR_REDIS__KEY_PREFIX=redis_prefix, LTRR_ES__EVENTS_ALIAS=events_alias,
                            LTRR_EXAMINATION__MAX_POSITION="5")
    moved, estimated = harness.run("move_events", "estimate_examination")
    assert moved["moved"] == len(events) and estimated["version"] == 1
    assert estimated["impressions"] == 1500 and len(estimated["theta"]) == 5
    stored = ExaminationModel.load(redis_client, prefix=redis_prefix, refresh_interval_s=0)
    assert [round(t, 4) for t in stored.theta[:5]] == estimated["theta"]
