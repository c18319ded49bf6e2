"""Q2E memory learned by a real Celery worker: after users chose an item for a query that
never matches it lexically, the memory arm retrieves it for that query."""

from __future__ import annotations

import json
import shutil
import uuid

import pytest
from celery_helpers import WorkerHarness

from orchestrator.arms import build_requests
from orchestrator.catalog import CatalogBuilder
from orchestrator.execution import MultiSearch
from orchestrator.ingest import CatalogIndexer
from orchestrator.templates import TemplateRegistry

pytestmark = [pytest.mark.celery_worker, pytest.mark.elasticsearch, pytest.mark.redis]

QUERY = "songs my grandmother hums while baking"


def _run(es, settings, alias, arm):
    reg = TemplateRegistry.from_dir(settings.templates.dir)
    reqs = build_requests(reg, None, QUERY, budgets={arm: 20}, vector=None)
    (res,) = MultiSearch(es, index=alias, registry=reg).execute(reqs)
    assert res.ok, res
    return [h.id for h in res.hits]


def test_memory_arm_learns_from_clicks(es, settings, redis_client, redis_prefix, test_alias,
                                       tmp_path):
    summary = CatalogIndexer(es, alias=test_alias, mappings_dir=settings.ingest.mappings_dir,
                             encoder=None).run(CatalogBuilder(settings.ingest.data_dir, limit=400),
                                               progress=False)
    assert summary.indexed > 400
    target = es.search(index=test_alias, size=1, sort=[{"entity_id": "asc"}],
                       query={"term": {"entity_type": "track"}})["hits"]["hits"][0]["_id"]
    assert target not in _run(es, settings, test_alias, "memory")
    assert target not in _run(es, settings, test_alias, "lexical")

    events_alias = f"test-events-{uuid.uuid4().hex[:8]}"
    stream = f"{redis_prefix}events"
    for i in range(3):
        rid = f"req-{i}"
        imp = {"request_id": rid, "query": QUERY, "ts": "2026-11-25T10:00:00+00:00",
               "items": [{"id": f"track:other{i}", "rank": 1}, {"id": target, "rank": 4}]}
        fb = {"request_id": rid, "item_id": target, "action": "play", "rank": 4, "query": QUERY,
              "ts": "2026-11-25T10:00:05+00:00"}
        redis_client.xadd(stream, {"type": "impression", "data": json.dumps(imp)})
        redis_client.xadd(stream, {"type": "feedback", "data": json.dumps(fb)})
    qu_dir = tmp_path / "qu_models"
    shutil.copytree(settings.qu.model_dir, qu_dir)
    harness = WorkerHarness(LTRR_REDIS__KEY_PREFIX=redis_prefix, LTRR_ES__EVENTS_ALIAS=events_alias,
                            LTRR_ES__CATALOG_ALIAS=test_alias, LTRR_QU__MODEL_DIR=str(qu_dir))
    try:
        moved, memory, again, qu = harness.run("move_events", "train_memory", "train_memory",
                                               "train_qu")
        assert moved["moved"] == 6
        assert memory["interactions"] == 3 and memory["items"] == 1 and memory["new_pairs"] == 1
        # Idempotent: a second run writes the same entry, adds nothing new.
        assert again["new_pairs"] == 0 and again["items"] == 1
        hits = _run(es, settings, test_alias, "memory")
        assert hits[:1] == [target]
        q2e = {e["query_key"]: e for e in es.get(index=test_alias, id=target)["_source"]["q2e"]}
        learned = q2e["songs my grandmother hums while baking"]
        assert learned["source"] == "observed" and learned["count"] == 3.0
        assert 0.5 < learned["score"] <= 1.0
        # The predicted (cold-start) entries are kept with their priors.
        assert any(e["source"] == "predicted" for e in q2e.values())
        # The QU task ran on the worker too: three clicks of one query are below what a
        # promotion needs, so the model folder is untouched and still loads.
        assert qu["promoted"] is False and "reason" in qu
        assert json.loads((qu_dir / "metadata.json").read_text())["version"] == json.loads(
            (settings.qu.model_dir / "metadata.json").read_text())["version"]
    finally:
        es.indices.delete(index=f"{events_alias}*", ignore_unavailable=True, allow_no_indices=True)
