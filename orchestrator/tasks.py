"""Celery tasks: thin wiring over the pure training/moving functions (logic lives elsewhere).

Every task is idempotent (it recomputes from the event log or writes under stable ids) and
guarded by a Redis lock, so two workers or a retried delivery never run one job twice at once.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
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


@contextlib.contextmanager
def _lock(name: str, timeout_s: int = 3600) -> Iterator[bool]:
    _, r = _clients()
    lock = r.lock(f"{_settings().redis.key_prefix}lock:{name}", timeout=timeout_s, blocking=False)
    got = lock.acquire()
    try:
        yield got
    finally:
        if got:
            with contextlib.suppress(Exception):
                lock.release()


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
