"""Build the Redis client (the only place one is built)."""

from __future__ import annotations

import redis

from .errors import ServiceUnavailableError
from .settings import RedisSettings


def build_redis(settings: RedisSettings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.url,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        health_check_interval=30,
        retry_on_timeout=True,
    )


def check_available(client: redis.Redis, url: str) -> None:
    """Raise :class:`ServiceUnavailableError` (one line, names the fix) if Redis is down."""
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise ServiceUnavailableError("Redis", url) from exc
