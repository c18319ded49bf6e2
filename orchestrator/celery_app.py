"""The Celery application: Redis broker and result backend, JSON only, beat schedule.

Run a worker with ``ltrr worker`` and the scheduler with ``ltrr beat`` (thin wrappers over the
``celery`` command). Exactly ONE beat may run per deployment, or scheduled jobs run twice
(they are idempotent, so that wastes work but corrupts nothing).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import setup_logging, task_prerun

from .settings import OrchestratorSettings


@setup_logging.connect
def _configure_worker_logging(loglevel: Any = None, **_: Any) -> None:
    """Workers (and beat) log JSON lines like the API (``settings.log``); connecting this
    signal also stops Celery from installing its own handlers."""
    from .log import configure_logging

    s = OrchestratorSettings()
    configure_logging(loglevel or s.log.level, json_lines=s.log.json_lines)


@task_prerun.connect
def _bind_task_id(task_id: str | None = None, **_: Any) -> None:
    """Records logged by a task carry its task id as ``request_id``."""
    from .log import set_request_id

    set_request_id(task_id)


def make_app(settings: OrchestratorSettings | None = None) -> Celery:
    settings = settings or OrchestratorSettings()
    broker, backend = settings.celery_urls()
    app = Celery("ltrr", broker=broker, backend=backend, include=["orchestrator.tasks"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # Tasks are idempotent, so redelivery after a lost worker is safe: ack late.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        result_expires=24 * 3600,
        broker_transport_options={"visibility_timeout": 3600},
        beat_schedule={
            "move-events": {
                "task": "orchestrator.tasks.move_events",
                "schedule": settings.celery.move_events_every_s,
            },
            "retrain-all": {
                "task": "orchestrator.tasks.retrain_all",
                "schedule": settings.celery.retrain_every_s,
            },
            # Feedback retrievable through the memory arm within seconds. A tick a worker did
            # not pick up in time expires (the next one does the same work); no results kept.
            "update-memory": {
                "task": "orchestrator.tasks.update_memory",
                "schedule": settings.celery.update_memory_every_s,
                "options": {"expires": max(10.0, 5 * settings.celery.update_memory_every_s),
                            "ignore_result": True},
            },
        },
    )
    return app


app = make_app()
