"""Celery tasks: thin wiring over the pure training/moving functions (logic lives elsewhere).

Every job is idempotent (it recomputes from the event log, or writes under stable ids with
optimistic concurrency / atomic swaps), so a retried delivery or two workers running one job
at once leave the same state as one run; no locks are needed, and a killed worker leaves none
behind. Each job is a plain ``run_*`` function (``ltrr retrain --now`` calls them in-process)
wrapped by a task (what beat and workers run).

Besides the chain, ``update_memory`` (beat, every ``celery.update_memory_every_s``) applies new
stream events to the Q2E memory index within seconds (:class:`orchestrator.memory.MemoryUpdater`).

The retraining chain, in order: ``move_events`` (Redis stream -> events index),
``train_memory`` (Q2E repair rebuild), ``estimate_examination`` (position bias from randomised swaps, into
Redis), ``rebuild_posteriors`` (bandit), ``train_ranker`` (rescorer, IPS-weighted by it),
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
from .rewards import RewardModel
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


def run_update_memory(s: OrchestratorSettings, es: Any, r: Any, *,
                      max_batches: int = 100) -> dict[str, Any]:
    """Apply the stream's new events to the memory index (its own consumer group; cost
    proportional to the new events). Returns at once when another memory job runs."""
    from .memory import updater_from_settings

    return updater_from_settings(s, es, r).run(batch_size=s.memory.batch_size,
                                               max_batches=max_batches).as_dict()


def run_train_memory(s: OrchestratorSettings, es: Any, r: Any) -> dict[str, Any]:
    """The repair job: rebuild every learned memory pair from the events index and the stream,
    with time decay; pairs decayed below ``memory.min_score`` are deleted."""
    from .memory import memory_alias, memory_settings_kwargs, rebuild_memory

    return rebuild_memory(
        es, r, events_alias=s.es.events_alias, prefix=s.redis.key_prefix,
        memory_alias=memory_alias(s.es.catalog_alias, s.memory.alias),
        catalog_alias=s.es.catalog_alias, half_life_days=s.memory.half_life_days,
        mappings_dir=s.ingest.mappings_dir, **memory_settings_kwargs(s.memory))


def run_estimate_examination(s: OrchestratorSettings, es: Any, r: Any) -> dict[str, Any]:
    """Estimate the examination model from the swap interventions of the events index and
    store it in Redis (:mod:`orchestrator.examination`); idempotent (the log decides)."""
    from .decoding import paused_gc
    from .examination import UNREAD_PAYLOAD, estimate_from_events
    from .training import load_events

    with paused_gc():
        events = load_events(es, events_alias=s.es.events_alias, exclude_payload=UNREAD_PAYLOAD)
        if not any(ev.get("type") == "impression" for ev in events):
            return {"skipped": "no impressions in the events index yet"}
        x = s.examination
        model = estimate_from_events(events, max_position=x.max_position,
                                     prior_strength=x.prior_strength)
    version = model.save(r, prefix=s.redis.key_prefix)
    meta = model.meta
    return {"version": version, "events": len(events), "impressions": meta["impressions"],
            "swapped": meta["swapped"], "control": meta["control"],
            "theta": [round(t, 4) for t in model.theta[: x.max_position]]}


def _reward_model(s: OrchestratorSettings, r: Any) -> Any:
    """The live reward rules with the examination model estimated into Redis (the prior
    until ``estimate_examination`` has run), so a rebuild rewards as serving does."""
    from .examination import ExaminationModel

    return RewardModel.from_settings(
        s, examination=ExaminationModel.load(r, prefix=s.redis.key_prefix, refresh_interval_s=0))


def run_rebuild_posteriors(s: OrchestratorSettings, es: Any, r: Any) -> dict[str, Any]:
    from .training import rebuild_and_swap

    if _needs_refeaturizing(s, r):
        # The log holds contexts of another featurizer / QU model: a plain replay would mix
        # them into (or, after a migration, undo) the current statistics.
        return run_migrate_posteriors(s, es, r, force=True)
    return rebuild_and_swap(
        es, r, events_alias=s.es.events_alias, prefix=s.redis.key_prefix,
        half_life_days=s.bandit.rebuild_half_life_days, policy=s.bandit.policy,
        hash_dim=s.bandit.hash_dim, position_bias=s.feedback.position_bias,
        reward_model=_reward_model(s, r))


def run_train_ranker(s: OrchestratorSettings, es: Any, r: Any) -> dict[str, Any]:
    from .examination import ExaminationModel
    from .training import retrain_ranker_from_es

    if s.rescorer.model_dir is None:
        return {"skipped": "rescorer.model_dir is not set"}
    return retrain_ranker_from_es(
        es, events_alias=s.es.events_alias, model_dir=s.rescorer.model_dir,
        holdout_fraction=s.rescorer.holdout_fraction, min_examples=s.rescorer.min_examples,
        min_holdout=s.rescorer.min_holdout, min_improvement=s.rescorer.min_improvement,
        examination=ExaminationModel.load(r, prefix=s.redis.key_prefix, refresh_interval_s=0),
        ips_cap=s.rescorer.ips_cap)


def run_train_qu(s: OrchestratorSettings, es: Any, r: Any) -> dict[str, Any]:
    from .qu_retrain import retrain_from_events

    if not es.indices.exists_alias(name=s.es.events_alias):
        return {"skipped": "no events index yet", "promoted": False}
    res = retrain_from_events(
        es, events_alias=s.es.events_alias, catalog_alias=s.es.catalog_alias,
        model_dir=s.qu.model_dir, data_dir=s.ingest.data_dir, seed=s.qu.seed,
        min_support=s.qu.min_support)
    # Right after a promotion the bandit's contexts come from another QU model: migrate.
    if res.get("promoted") or _state_behind_qu(s, r):
        res = {**res, "posteriors": run_migrate_posteriors(s, es, r)}
    return res


def _needs_refeaturizing(s: OrchestratorSettings, r: Any) -> bool:
    """The bandit state was built by another featurizer or dimension than the current one
    (its features mean something else), or was migrated once (its log may still hold contexts
    of the old versions). A QU version alone does not count: the serving processes' model may
    legitimately differ from ``qu.model_dir`` (a custom understander); run_train_qu migrates
    after its promotions."""
    from .bandit_state import RedisBanditStore
    from .featurizer import ContextFeaturizer

    fz = ContextFeaturizer(hash_dim=s.bandit.hash_dim, bucket_keys=s.bandit.bucket_keys)
    store = RedisBanditStore(r, prefix=s.redis.key_prefix, dim=fz.dim)
    recorded = store.state_versions()
    if recorded["dim"] is None:  # a state nothing has served from yet
        return False
    return (recorded["dim"] != fz.dim or recorded["featurizer_version"] != fz.version
            or bool(r.hexists(store.meta_key, "migrated")))


def _state_behind_qu(s: OrchestratorSettings, r: Any) -> bool:
    """The bandit state records the QU model that the promoted one replaced (a promotion whose
    migration did not complete: a retried task catches up)."""
    import json

    from .bandit_state import RedisBanditStore
    from .understanding import METADATA_FILENAME

    try:
        meta = json.loads((s.qu.model_dir / METADATA_FILENAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    parent = meta.get("parent_version")
    store = RedisBanditStore(r, prefix=s.redis.key_prefix, dim=0)
    return parent is not None and store.state_versions()["qu_version"] == parent


def run_migrate_posteriors(s: OrchestratorSettings, es: Any, r: Any, *,
                           force: bool = False) -> dict[str, Any]:
    """Re-featurize the log for the current featurizer and promoted QU model and rebuild the
    posteriors (:func:`orchestrator.training.migrate_posteriors`); a no-op when the state
    already records their versions (unless ``force``)."""
    from .featurizer import ContextFeaturizer
    from .training import migrate_posteriors
    from .understanding import get_understander, model_version

    qu_version = model_version(s.qu.model_dir)
    return migrate_posteriors(
        es, r, events_alias=s.es.events_alias, prefix=s.redis.key_prefix,
        featurizer=ContextFeaturizer(hash_dim=s.bandit.hash_dim, bucket_keys=s.bandit.bucket_keys),
        # loaded only when an impression needs re-parsing
        understander=(lambda: get_understander(s.qu.model_dir, check_every_s=0))
        if qu_version is not None else None,
        qu_version=qu_version, force=force, half_life_days=s.bandit.rebuild_half_life_days,
        policy=s.bandit.policy, position_bias=s.feedback.position_bias,
        reward_model=_reward_model(s, r))


#: The retraining chain, in order (name, job).
CHAIN: tuple[tuple[str, Callable[..., dict[str, Any]]], ...] = (
    ("move_events", run_move_events),
    ("train_memory", run_train_memory),
    ("estimate_examination", run_estimate_examination),
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
                     "Repair the memory index: rebuild the learned pairs from the log (decayed).")


@app.task(name="orchestrator.tasks.update_memory")
def update_memory(max_batches: int = 100) -> dict[str, Any]:
    """Apply new events to the memory index (beat: every ``celery.update_memory_every_s``).
    No autoretry: the next tick, seconds later, is the retry; entries stay pending until a
    run acknowledges them."""
    es, r = _clients()
    res = run_update_memory(_settings(), es, r, max_batches=max_batches)
    if res.get("events"):
        logger.info("update_memory: %s", res)
    return res


estimate_examination = _task("estimate_examination", run_estimate_examination,
                             "Estimate the examination (position-bias) model from the swap "
                             "interventions of the log and store it in Redis.")
rebuild_posteriors = _task("rebuild_posteriors", run_rebuild_posteriors,
                           "Rebuild the bandit statistics from the log (time-decayed) and swap "
                           "them in atomically.")
train_ranker = _task("train_ranker", run_train_ranker,
                     "Retrain the rescorer; promote only when it beats the current one on "
                     "held-out data.")
train_qu = _task("train_qu", run_train_qu,
                 "Retrain query understanding from click-derived labels; promote only when better "
                 "(then migrate the bandit posteriors to the new model).")
migrate_posteriors = _task("migrate_posteriors", run_migrate_posteriors,
                           "Re-featurize the logged impressions for the current featurizer and QU "
                           "model, rebuild the bandit posteriors and record the new versions.")

_BY_NAME = {"move_events": move_events, "train_memory": train_memory,
            "estimate_examination": estimate_examination,
            "rebuild_posteriors": rebuild_posteriors, "train_ranker": train_ranker,
            "train_qu": train_qu}


@app.task(name="orchestrator.tasks.retrain_all", ignore_result=True)
def retrain_all() -> str:
    """Queue the whole chain (each step starts when the previous one succeeded)."""
    result = chain(*(_BY_NAME[name].si() for name, _ in CHAIN)).apply_async()
    return str(result.id)
