"""Q2E memory learned by a real Celery worker: after users chose an item for a query that
never matches it lexically, the memory arm retrieves it for that query (the incremental
``update_memory`` task, then the ``train_memory`` repair rebuild)."""

from __future__ import annotations

import json
import shutil
import uuid

import pytest
from celery_helpers import WorkerHarness

from orchestrator.arms import build_requests
from orchestrator.catalog import CatalogBuilder
from orchestrator.examination import ExaminationModel
from orchestrator.execution import MultiSearch
from orchestrator.ingest import CatalogIndexer
from orchestrator.memory import pair_id
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
    memory_alias = f"{test_alias}-memory"  # what the worker derives from the catalog alias
    summary = CatalogIndexer(es, alias=test_alias, mappings_dir=settings.ingest.mappings_dir,
                             encoder=None, memory_alias=memory_alias).run(
        CatalogBuilder(settings.ingest.data_dir, limit=400), progress=False)
    assert summary.indexed > 400 and summary.memory["pairs"] > 400
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
        moved, memory, again = harness.run("move_events", "update_memory", "update_memory")
        assert moved["moved"] == 6
        # Incremental: six new events, one pair created by its first play (the "other"
        # items are not in the catalog: their exposures wait in Redis, never written).
        assert memory["events"] == 6 and memory["created"] == 1 and memory["pending"] == 3
        assert again["events"] == 0  # nothing new: nothing rewritten
        es.indices.refresh(index=memory_alias)
        assert _run(es, settings, test_alias, "memory")[:1] == [target]
        learned = es.get(index=memory_alias, id=pair_id(QUERY, target))["_source"]
        theta4 = ExaminationModel.default().propensity(4)
        assert learned["source"] == "learned" and learned["clicks"] == 4.5
        assert learned["examinations"] == pytest.approx(3 * theta4, abs=1e-4)
        assert learned["score"] == pytest.approx(4.5 / (3 * theta4 + 2), abs=1e-4)
        assert learned["item"]["title"] and "embedding" not in learned["item"]
        # The repair rebuild recomputes it from the events index, decayed (the events are
        # days old): fewer clicks, still the memory arm's top hit.
        repair, qu = harness.run("train_memory", "train_qu")
        assert repair["events"] == 6 and repair["written"] >= 1
        rebuilt = es.get(index=memory_alias, id=pair_id(QUERY, target))["_source"]
        assert 0 < rebuilt["clicks"] < 4.5
        assert _run(es, settings, test_alias, "memory")[:1] == [target]
        # The predicted (cold-start) pairs of the catalog are untouched.
        predicted = es.search(index=memory_alias, size=5, query={"bool": {"filter": [
            {"term": {"item_id": target}}, {"term": {"source": "predicted"}}]}})["hits"]["hits"]
        assert predicted and all(h["_source"]["clicks"] == 0 for h in predicted)
        # The QU task ran on the worker too: three clicks of one query are below what a
        # promotion needs, so the model folder is untouched and still loads.
        assert qu["promoted"] is False and "reason" in qu
        assert json.loads((qu_dir / "metadata.json").read_text())["version"] == json.loads(
            (settings.qu.model_dir / "metadata.json").read_text())["version"]
    finally:
        es.indices.delete(index=f"{events_alias}*", ignore_unavailable=True, allow_no_indices=True)
