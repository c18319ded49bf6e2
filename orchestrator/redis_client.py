"""Build the Redis client (the only place one is built)."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .errors import ServiceUnavailableError
from .settings import RedisSettings


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
