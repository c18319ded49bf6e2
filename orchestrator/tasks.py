"""Celery tasks: thin wiring over the pure training/moving functions (logic lives elsewhere).

Every task is idempotent (it recomputes from the event log, or writes under stable ids with
optimistic concurrency), so a retried delivery or two workers running one job at once leave
the same state as one run; no locks are needed, and a killed worker leaves none behind.
"""

from __future__ import annotations

import functools
from typing import Any

from celery.utils.log import get_task_logger

from .celery_app import app
from .settings import OrchestratorSettings

logger = get_task_logger(__name__)


@functools.lru_cache(maxsize=1)
def _settings() -> OrchestratorSettings:
    return OrchestratorSettings()


@functools.lru_cache(maxsize=1)
def _clients() -> tuple[Any, Any]:
    from .es_client import build_client
    from .redis_client import build_redis

    s = _settings()
    return build_client(s.es), build_redis(s.redis)


@app.task(name="orchestrator.tasks.move_events", autoretry_for=(ConnectionError,),
          retry_backoff=True, max_retries=5)
def move_events(crash_after_write: bool = False) -> dict[str, int]:
    """Move impression/feedback events from the Redis stream into the events index."""
    from .event_log import EventMover

    s = _settings()
    es, r = _clients()
    # No lock: consumer-group delivery splits entries between concurrent movers, and an entry
    # written twice lands under the same id, so concurrent runs are safe by construction.
    mover = EventMover(r, es, stream=f"{s.redis.key_prefix}events", alias=s.es.events_alias,
                       mappings_dir=s.ingest.mappings_dir, claim_idle_ms=s.celery.claim_idle_ms)
    res = mover.move(batch_size=s.celery.event_batch_size, _crash_after_write=crash_after_write)
    logger.info("moved %s events (%s reclaimed, %s failed)", res.moved, res.reclaimed, res.failed)
    return {"moved": res.moved, "reclaimed": res.reclaimed, "failed": res.failed,
            "trimmed": res.trimmed}


@app.task(name="orchestrator.tasks.train_memory", autoretry_for=(ConnectionError,),
          retry_backoff=True, max_retries=5)
def train_memory(half_life_days: float = 30.0, prior_strength: float = 2.0) -> dict[str, Any]:
    """Recompute the Q2E memory from the events index and write it into the catalog."""
    from .memory import aggregate, load_interactions, write_memory

    s = _settings()
    es, _ = _clients()
    # No lock: the result is recomputed from the whole log and written with optimistic
    # concurrency, so concurrent or repeated runs converge on the same documents.
    if not es.indices.exists_alias(name=s.es.events_alias):
        return {"interactions": 0, "items": 0}
    interactions = load_interactions(es, s.es.events_alias)
    evidence = aggregate(interactions, half_life_days=half_life_days)
    res = write_memory(es, s.es.catalog_alias, evidence, prior_strength=prior_strength)
    logger.info("q2e memory: %s interactions -> %s items (%s new pairs)", len(interactions),
                res.items, res.new_pairs)
    return {"interactions": len(interactions), "items": res.items, "pairs": res.pairs,
            "new_pairs": res.new_pairs, "missing_items": res.missing_items}
