"""Abuse resistance: signed request tokens, API keys, per-client rate limits and a cap on how
much one client can move the bandit.

Consumes the request id of a served search and the caller's client id; produces a token the
HTTP API requires back with feedback, and the refusals of :mod:`orchestrator.errors`
(``SecurityError`` subtree). The pipeline issues and verifies tokens
(:meth:`Orchestrator.search` / :meth:`Orchestrator.feedback`) and checks the influence cap
right before a feedback update is applied; the HTTP layer (:mod:`orchestrator.api`)
authenticates API keys and applies rate limits.

Threat model: feedback is the bandit's training signal, so forged feedback poisons it.

* **Tokens** bind feedback to a search that was really served, to the client it was served to,
  and to a lifetime: ``v1.<request id>.<client tag>.<expiry>.<HMAC-SHA256>`` (url-safe
  base64 fields). The client tag is an HMAC of the client id (no address leaks); the MAC
  covers every field. Comparison is constant-time. A token for another request or client,
  an expired one, or a forged one is refused (HTTP 403).
* **Replays** of an already counted (request, item, action) are refused over HTTP (409); the
  atomic duplicate check of :mod:`orchestrator.bandit_state` decides.
* **API keys** (header ``X-API-Key``): settings hold only SHA-256 hashes, mapped to a client
  name (the client id). Without configured keys the API is open and the client id is the
  remote address.
* **Rate limits**: fixed-window counters per client in Redis (shared by replicas); while Redis
  is down, a per-process counter takes over so limiting never becomes the outage.
* **Influence cap**: one client may add at most ``influence_cap`` observation weight per arm
  per window. Beyond it feedback is *acknowledged* (HTTP 200, ``capped: true``), logged at
  WARNING and neither applied nor written to the event log (so an offline rebuild does not
  re-apply it). Acknowledging instead of refusing keeps well-behaved clients simple (nothing
  to retry) and tells an abuser nothing it can tune a retry loop on except that it is capped.

Redis keys (``P`` = key prefix)::

    P token_secret                 str   generated HMAC key (SET NX; only when not configured)
    P rl:<bucket>:<client>:<win>   str   request count of one window (TTL window)
    P cap:<client>:<win>           hash  template_id -> observation weight added (TTL 2 windows)

In-process callers of the Python API are trusted: :meth:`Orchestrator.feedback` verifies a
token when one is given, and applies the influence cap only when a ``client_id`` is given.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import math
import secrets
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from .errors import (
    AuthenticationError,
    ExpiredTokenError,
    ForgedTokenError,
    RateLimitedError,
    ServiceUnavailableError,
    TokenMismatchError,
)

logger = logging.getLogger(__name__)

TOKEN_VERSION = "v1"
#: Client id of in-process callers that pass none (tokens still bind to it).
LOCAL_CLIENT = ""
_REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hash_api_key(key: str) -> str:
    """SHA-256 hex of an API key: what ``security.api_keys`` holds."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def client_key(client_id: str) -> str:
    """A fixed-size, Redis-safe stand-in for a client id in key names."""
    return hashlib.sha256(client_id.encode("utf-8", "surrogatepass")).hexdigest()[:24]


class RequestSigner:
    """Issues and verifies request tokens.

    Parameters
    ----------
    client:
        Redis (reads or creates the shared secret when ``secret`` is None).
    prefix:
        Redis key prefix.
    secret:
        The HMAC key; None: ``P token_secret`` in Redis, created once (SET NX) by whichever
        replica comes first, then cached in memory, so a later Redis outage does not break
        verification.
    ttl_s:
        Token lifetime.
    url:
        Redis URL for error messages.
    clock:
        Seconds since the epoch (tests inject one).
    """

    def __init__(self, client: redis.Redis | None, *, prefix: str, secret: str | bytes | None = None,
                 ttl_s: int = 7 * 24 * 3600, url: str = "", clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.url = url
        self.clock = clock
        self._secret = secret.encode() if isinstance(secret, str) else secret
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, security: Any, client: redis.Redis, *, prefix: str,
                      url: str = "") -> RequestSigner:
        """From ``settings.security`` (None: the defaults)."""
        secret = getattr(security, "token_secret", None)
        if secret is not None and hasattr(secret, "get_secret_value"):
            secret = secret.get_secret_value()
        return cls(client, prefix=prefix, secret=secret or None,
                   ttl_s=int(getattr(security, "token_ttl_s", 7 * 24 * 3600)), url=url)

    @property
    def secret_key(self) -> str:
        return f"{self.prefix}token_secret"

    def secret(self) -> bytes:
        """The HMAC key (see the class docstring).

        Raises
        ------
        ServiceUnavailableError
            No secret configured or cached yet and Redis is down.
        """
        if self._secret is not None:
            return self._secret
        with self._lock:
            if self._secret is None:
                if self.client is None:
                    raise ServiceUnavailableError("Redis", self.url or "(no client)")
                try:
                    self.client.set(self.secret_key, secrets.token_hex(32), nx=True)
                    raw = self.client.get(self.secret_key)
                except _REDIS_ERRORS as exc:
                    raise ServiceUnavailableError("Redis", self.url) from exc
                if raw is None:  # deleted between SET NX and GET: try once more
                    self.client.set(self.secret_key, secrets.token_hex(32), nx=True)
                    raw = self.client.get(self.secret_key)
                self._secret = raw if isinstance(raw, bytes) else str(raw).encode()
            return self._secret

    def _mac(self, message: str) -> bytes:
        return hmac.new(self.secret(), message.encode("ascii"), hashlib.sha256).digest()

    def _client_tag(self, client_id: str) -> str:
        raw = hmac.new(self.secret(), b"client\x1f" + client_id.encode("utf-8", "surrogatepass"),
                       hashlib.sha256).digest()
        return _b64(raw[:16])

    def issue(self, request_id: str, *, client_id: str | None = None, now: float | None = None) -> str:
        """A token for feedback on ``request_id`` by ``client_id`` (None: in-process caller)."""
        expires = int((self.clock() if now is None else now) + self.ttl_s)
        body = ".".join((TOKEN_VERSION, _b64(request_id.encode("utf-8")),
                         self._client_tag(client_id or LOCAL_CLIENT), str(expires)))
        return f"{body}.{_b64(self._mac(body))}"

    def verify(self, token: Any, *, request_id: str, client_id: str | None = None,
               now: float | None = None) -> None:
        """Check that ``token`` was issued by a replica sharing the secret, for ``request_id``,
        to ``client_id``, and has not expired.

        Raises
        ------
        ForgedTokenError
            Not a token, or its signature does not verify.
        TokenMismatchError
            A genuine token for another request or another client.
        ExpiredTokenError
            A genuine token past its expiry.
        """
        if not isinstance(token, str) or len(token) > 1024 or not token.isascii():
            raise ForgedTokenError("request token is malformed")
        parts = token.split(".")
        if len(parts) != 5 or parts[0] != TOKEN_VERSION or not parts[3].isdigit():
            raise ForgedTokenError("request token is malformed")
        body, sig = token.rsplit(".", 1)
        # Constant-time, and on the canonical encoding: base64 has spare bits, so comparing
        # decoded bytes would accept several spellings of one signature.
        if not hmac.compare_digest(sig, _b64(self._mac(body))):
            raise ForgedTokenError("request token signature does not verify")
        try:
            token_rid = _unb64(parts[1]).decode("utf-8")
        except (binascii.Error, ValueError) as exc:  # signed by us, so never in practice
            raise ForgedTokenError("request token is malformed") from exc
        if not hmac.compare_digest(token_rid.encode("utf-8"),
                                   request_id.encode("utf-8", "surrogatepass")):
            raise TokenMismatchError("request token was issued for another request")
        if not hmac.compare_digest(parts[2], self._client_tag(client_id or LOCAL_CLIENT)):
            raise TokenMismatchError("request token was issued to another client")
        if int(parts[3]) < (self.clock() if now is None else now):
            raise ExpiredTokenError("request token has expired; search again for a fresh one")


class ApiKeys:
    """API-key authentication: ``{sha256 hex: client name}``; empty means open."""

    def __init__(self, hashes_to_clients: Mapping[str, str] | None = None) -> None:
        self._keys = {h.strip().lower(): name for h, name in (hashes_to_clients or {}).items()}

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def authenticate(self, presented: str | None) -> str:
        """The client name of ``presented``.

        Raises
        ------
        AuthenticationError
            No key, or a key that is not configured.
        """
        if not presented:
            raise AuthenticationError("missing API key: send it in the X-API-Key header")
        digest = hash_api_key(presented)
        found = None
        for known, name in self._keys.items():  # every entry, so timing says nothing
            if hmac.compare_digest(known, digest):
                found = name
        if found is None:
            raise AuthenticationError("unknown API key")
        return found


class RateLimiter:
    """Fixed-window request counters per (bucket, client), in Redis so every replica counts
    together; a per-process counter takes over while Redis is down.

    Parameters
    ----------
    client:
        Redis.
    prefix:
        Key prefix.
    clock:
        Seconds since the epoch.
    """

    def __init__(self, client: redis.Redis, *, prefix: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.prefix = prefix
        self.clock = clock
        self._local: dict[tuple[str, str, int], int] = {}
        self._lock = threading.Lock()
        self.fallbacks = 0

    def hit(self, bucket: str, client_id: str, *, limit: int, window_s: int) -> int:
        """Count one request; return the count in the current window.

        Raises
        ------
        RateLimitedError
            More than ``limit`` requests in the window (``limit <= 0``: unlimited).
        """
        if limit <= 0:
            return 0
        now = self.clock()
        window = int(now // window_s)
        ckey = client_key(client_id)
        key = f"{self.prefix}rl:{bucket}:{ckey}:{window}"
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.incr(key)
            pipe.expire(key, window_s + 1)
            count = int(pipe.execute()[0])
        except _REDIS_ERRORS as exc:
            count = self._local_hit(bucket, ckey, window)
            self.fallbacks += 1
            logger.warning("rate limiter: Redis unavailable (%s); counting in this process", exc)
        if count > limit:
            retry = max(1, math.ceil((window + 1) * window_s - now))
            raise RateLimitedError(bucket, limit, window_s, retry)
        return count

    def _local_hit(self, bucket: str, ckey: str, window: int) -> int:
        with self._lock:
            for k in [k for k in self._local if k[2] < window]:
                del self._local[k]
            n = self._local.get((bucket, ckey, window), 0) + 1
            self._local[(bucket, ckey, window)] = n
            return n


# KEYS[1] the client's hash for this window. ARGV: 1 cap, 2 ttl s, then (field, weight) pairs.
# All arms fit or none is charged, so a capped event never half-counts.
_CAP_LUA = """
local cap = tonumber(ARGV[1])
for i = 3, #ARGV, 2 do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if cur + tonumber(ARGV[i + 1]) > cap + 1e-9 then return 0 end
end
for i = 3, #ARGV, 2 do
  redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""


@dataclass(frozen=True, slots=True)
class Reservation:
    """Influence charged to one client for one feedback (refunded if it was a duplicate)."""

    key: str
    weights: dict[str, float]
    local: bool = False


class InfluenceCap:
    """How much observation weight one client may add to each arm per window.

    Parameters
    ----------
    client:
        Redis.
    prefix:
        Key prefix.
    cap:
        Maximum summed observation weight per (client, arm, window); 0 disables the cap.
    window_s:
        Window length.
    url:
        Redis URL for error messages.
    """

    def __init__(self, client: redis.Redis, *, prefix: str, cap: float, window_s: int,
                 url: str = "", clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.prefix = prefix
        self.cap = float(cap)
        self.window_s = int(window_s)
        self.url = url
        self.clock = clock
        self._script = client.register_script(_CAP_LUA)
        # While Redis is down: the same accounting per process (feedback may still be spooled
        # by the pipeline; the cap must not become an outage, nor switch off).
        self._local: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()
        self.fallbacks = 0

    @classmethod
    def from_settings(cls, security: Any, client: redis.Redis, *, prefix: str,
                      url: str = "") -> InfluenceCap | None:
        cap = float(getattr(security, "influence_cap", 200.0))
        if cap <= 0:
            return None
        return cls(client, prefix=prefix, cap=cap,
                   window_s=int(getattr(security, "influence_window_s", 3600)), url=url)

    def key(self, client_id: str, now: float | None = None) -> str:
        window = int((self.clock() if now is None else now) // self.window_s)
        return f"{self.prefix}cap:{client_key(client_id)}:{window}"

    def reserve(self, client_id: str, weights: Mapping[str, float]) -> Reservation | None:
        """Charge ``weights`` (``{template_id: observation weight}``) to ``client_id``; None
        when any arm would exceed the cap (nothing charged).

        While Redis is down the charge is kept in this process (same cap, same window).
        """
        w = {t: float(v) for t, v in weights.items() if v > 0}
        key = self.key(client_id)
        if not w:
            return Reservation(key, {})
        args: list[Any] = [self.cap, 2 * self.window_s]
        for t, v in sorted(w.items()):
            args += [t, repr(v)]
        try:
            ok = int(self._script(keys=[key], args=args))
        except _REDIS_ERRORS as exc:
            self.fallbacks += 1
            logger.warning("influence cap: Redis unavailable (%s); counting in this process", exc)
            return Reservation(key, w, local=True) if self._local_reserve(key, w) else None
        return Reservation(key, w) if ok == 1 else None

    def _local_reserve(self, key: str, w: Mapping[str, float]) -> int:
        with self._lock:
            window = key.rsplit(":", 1)[1]
            for k in [k for k in self._local if k.rsplit(":", 1)[1] != window]:
                del self._local[k]
            used = self._local.setdefault(key, {})
            if any(used.get(t, 0.0) + v > self.cap + 1e-9 for t, v in w.items()):
                return 0
            for t, v in w.items():
                used[t] = used.get(t, 0.0) + v
            return 1

    def release(self, reservation: Reservation) -> None:
        """Refund a reservation whose feedback was not applied (a duplicate)."""
        if not reservation.weights:
            return
        if reservation.local:
            with self._lock:
                used = self._local.get(reservation.key, {})
                for t, v in reservation.weights.items():
                    used[t] = used.get(t, 0.0) - v
            return
        try:
            pipe = self.client.pipeline(transaction=True)
            for t, v in reservation.weights.items():
                pipe.hincrbyfloat(reservation.key, t, -v)
            pipe.execute()
        except _REDIS_ERRORS as exc:  # the charge stays: errs on the safe side
            logger.warning("influence cap: refund failed (%s)", exc)

    def used(self, client_id: str) -> dict[str, float]:
        """``{template_id: weight}`` charged to ``client_id`` in the current window."""
        raw = self.client.hgetall(self.key(client_id))
        return {(k.decode() if isinstance(k, bytes) else k): float(v) for k, v in raw.items()}


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "hash-key":
        print(hash_api_key(argv[1]))
        return 0
    if len(argv) == 1 and argv[0] == "new-key":
        key = secrets.token_urlsafe(32)
        print(f"key:    {key}\nsha256: {hash_api_key(key)}")
        return 0
    print("usage: python -m orchestrator.security hash-key KEY | new-key", file=sys.stderr)
    return 2


__all__ = ["ApiKeys", "InfluenceCap", "RateLimiter", "RequestSigner", "Reservation",
           "client_key", "hash_api_key"]

if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
