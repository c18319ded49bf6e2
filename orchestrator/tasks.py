"""Celery tasks: thin wiring over the pure training/moving functions (logic lives elsewhere).

Every job is idempotent (it recomputes from the event log, or writes under stable ids with
optimistic concurrency / atomic swaps), so a retried delivery or two workers running one job
at once leave the same state as one run; no locks are needed, and a killed worker leaves none
behind. Each job is a plain ``run_*`` function (``ltrr retrain --now`` calls them in-process)
wrapped by a task (what beat and workers run).

The retraining chain, in order: ``move_events`` (Redis stream -> events index),
``train_memory`` (Q2E), ``rebuild_posteriors`` (bandit), ``train_ranker`` (rescorer),
``train_qu`` (intent / slot patterns from click-derived labels).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import elasticsearch
import redis
from celery import chain
from celery.utils.log import get_task_logger

from .celery_app import app
from .errors import ServiceUnavailableError
from .settings import OrchestratorSettings

logger = get_task_logger(__name__)

#: Transient failures worth a retry with backoff (a service restarting).
RETRY_ON = (ServiceUnavailableError, redis.ConnectionError, redis.TimeoutError,
            elasticsearch.ConnectionError, ConnectionError)


@functools.lru_cache(maxsize=1)
def _settings() -> OrchestratorSettings:
    return OrchestratorSettings()


@functools.lru_cache(maxsize=1)
def _clients() -> tuple[Any, Any]:
    from .es_client import build_client
    from .redis_client import build_redis

    s = _settings()
    return build_client(s.es), build_redis(s.redis)


# -- jobs ----------------------------------------------------------------------------------

def run_move_events(s: OrchestratorSettings, es: Any, r: Any, *,
                    crash_after_write: bool = False) -> dict[str, Any]:
    from .event_log import EventMover

    mover = EventMover(r, es, stream=f"{s.redis.key_prefix}events", alias=s.es.events_alias,
                       mappings_dir=s.ingest.mappings_dir, claim_idle_ms=s.celery.claim_idle_ms)
    res = mover.move(batch_size=s.celery.event_batch_size, _crash_after_write=crash_after_write)
    return {"moved": res.moved, "reclaimed": res.reclaimed, "failed": res.failed,
            "trimmed": res.trimmed}


def run_train_memory(s: OrchestratorSettings, es: Any, r: Any) -> dict[str, Any]:
    from .memory import aggregate, load_interactions, write_memory

    if not es.indices.exists_alias(name=s.es.events_alias):
        return {"interactions": 0, "items": 0, "pairs": 0, "new_pairs": 0, "missing_items": 0}
    interactions = load_interactions(es, s.es.events_alias)
    evidence = aggregate(interactions, half_life_days=s.memory.half_life_days)
    res = write_memory(es, s.es.catalog_alias, evidence, prior_strength=s.memory.prior_strength)
    return {"interactions": len(interactions), "items": res.items, "pairs": res.pairs,
            "new_pairs": res.new_pairs, "missing_items": res.missing_items}


def run_rebuild_posteriors(s: OrchestratorSettings, es: Any, r: Any) -> dict[str, Any]:
    from .training import rebuild_and_swap

    return rebuild_and_swap(
        es, r, events_alias=s.es.events_alias, prefix=s.redis.key_prefix,
        half_life_days=s.bandit.rebuild_half_life_days, policy=s.bandit.policy,
        hash_dim=s.bandit.hash_dim, position_bias=s.feedback.position_bias,
        max_weight=s.feedback.max_weight)


def run_train_ranker(s: OrchestratorSettings, es: Any, r: Any) -> dict[str, Any]:
    from .training import retrain_ranker_from_es

    if s.rescorer.model_dir is None:
        return {"skipped": "rescorer.model_dir is not set"}
    return retrain_ranker_from_es(
        es, events_alias=s.es.events_alias, model_dir=s.rescorer.model_dir,
        holdout_fraction=s.rescorer.holdout_fraction, min_examples=s.rescorer.min_examples,
        min_holdout=s.rescorer.min_holdout, min_improvement=s.rescorer.min_improvement)


def run_train_qu(s: OrchestratorSettings, es: Any, r: Any) -> dict[str, Any]:
    from .qu_retrain import retrain_from_events

    if not es.indices.exists_alias(name=s.es.events_alias):
        return {"skipped": "no events index yet", "promoted": False}
    return retrain_from_events(
        es, events_alias=s.es.events_alias, catalog_alias=s.es.catalog_alias,
        model_dir=s.qu.model_dir, data_dir=s.ingest.data_dir, seed=s.qu.seed,
        min_support=s.qu.min_support)


#: The retraining chain, in order (name, job).
CHAIN: tuple[tuple[str, Callable[..., dict[str, Any]]], ...] = (
    ("move_events", run_move_events),
    ("train_memory", run_train_memory),
    ("rebuild_posteriors", run_rebuild_posteriors),
    ("train_ranker", run_train_ranker),
    ("train_qu", run_train_qu),
)


# -- tasks ----------------------------------------------------------------------------------

_TASK = {"autoretry_for": RETRY_ON, "retry_backoff": True, "retry_jitter": True,
         "max_retries": 5}


def _task(name: str, job: Callable[..., dict[str, Any]], doc: str) -> Any:
    """Register ``job`` as the task ``orchestrator.tasks.<name>`` (clients built once per
    worker process, settings from the environment)."""

    def run(**kwargs: Any) -> dict[str, Any]:
        es, r = _clients()
        res = job(_settings(), es, r, **kwargs)
        logger.info("%s: %s", name, res)
        return res

    run.__name__, run.__doc__ = name, doc
    return app.task(name=f"orchestrator.tasks.{name}", **_TASK)(run)


move_events = _task("move_events", run_move_events,
                    "Move impression/feedback events from the Redis stream into the events "
                    "index. No lock: consumer-group delivery splits entries between concurrent "
                    "movers, and an entry written twice lands under the same id.")
train_memory = _task("train_memory", run_train_memory,
                     "Recompute the Q2E memory from the events index and write it into the catalog.")
rebuild_posteriors = _task("rebuild_posteriors", run_rebuild_posteriors,
                           "Rebuild the bandit statistics from the log (time-decayed) and swap "
                           "them in atomically.")
train_ranker = _task("train_ranker", run_train_ranker,
                     "Retrain the rescorer; promote only when it beats the current one on "
                     "held-out data.")
train_qu = _task("train_qu", run_train_qu,
                 "Retrain query understanding from click-derived labels; promote only when better.")

_BY_NAME = {"move_events": move_events, "train_memory": train_memory,
            "rebuild_posteriors": rebuild_posteriors, "train_ranker": train_ranker,
            "train_qu": train_qu}


@app.task(name="orchestrator.tasks.retrain_all", ignore_result=True)
def retrain_all() -> str:
    """Queue the whole chain (each step starts when the previous one succeeded)."""
    result = chain(*(_BY_NAME[name].si() for name, _ in CHAIN)).apply_async()
    return str(result.id)
