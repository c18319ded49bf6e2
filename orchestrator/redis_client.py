"""Build the Redis client (the only place one is built)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .errors import ServiceUnavailableError
from .settings import RedisSettings

T = TypeVar("T")

#: What a Redis call raises when Redis is down (refused, reset) or hung (socket time-out).
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)


class Breaker(Protocol):
    """The part of :class:`orchestrator.resilience.CircuitBreaker` a guarded read uses."""

    @property
    def state(self) -> str: ...

    def record_failure(self) -> None: ...


def build_redis(settings: RedisSettings) -> redis.Redis:
    # Two quick retries ride out a dropped connection (e.g. a Redis restart already over);
    # anything longer should fail fast as a 503 rather than hold the request for seconds.
    # A read time-out is not retried: a hung Redis would hold the call 3 x socket_timeout_s.
    return redis.Redis.from_url(
        settings.url,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=min(1.0, settings.socket_timeout_s),
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2,
                    supported_errors=(redis.ConnectionError,)),
        retry_on_error=[redis.ConnectionError],
    )


def check_available(client: redis.Redis, url: str) -> None:
    """Raise :class:`ServiceUnavailableError` (one line, names the fix) if Redis is down."""
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise ServiceUnavailableError("Redis", url) from exc


def guarded_read(breaker: Breaker | None, call: Callable[[], T]) -> T:
    """One Redis read on the request path, given the process's Redis breaker (the durable
    writer's, :class:`orchestrator.resilience.DurableRedisWriter`).

    While the breaker is not closed (Redis failed or timed out a moment ago) the read raises
    ``redis.ConnectionError`` at once instead of waiting ``socket_timeout_s`` again: a search
    against a hung Redis pays one time-out, not one per read. A failing read opens the breaker
    for the other reads. Reads never close it: the writer's next write or spool replay is the
    probe that finds Redis back. ``breaker=None`` (offline jobs): a plain call.
    """
    if breaker is not None and breaker.state != "closed":
        raise redis.ConnectionError("Redis failed a moment ago (circuit open): not waiting on it")
    try:
        return call()
    except REDIS_ERRORS:
        if breaker is not None:
            breaker.record_failure()
        raise
