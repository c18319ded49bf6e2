"""Query chains: the searches of one session, so that what a user finally picks after
searches that showed nothing they wanted is credited to those searches' queries too.

A user who types a playlist title ("urban contemporary"), finds nothing, then looks a song up
by name and plays it, has said which item the first query wanted; no arm could have learned
it from the first search, whose results the user never clicked (Radlinski & Joachims, "Query
chains: learning to rank from implicit feedback", KDD 2005). This module is the serving side:

- :meth:`QueryChains.record` keeps, per session, its last ``max_searches`` searches in Redis
  (``P chain:<session hash>``: a list of compact JSON records, newest first, expiring
  ``window_s`` after the last search); one round trip per search that has a session;
- :meth:`QueryChains.abandoned` lists, for a positive action on a search, the session's
  earlier searches within ``window_s`` of it, with another query key, on which no positive
  action was counted.

The pipeline writes that list into the feedback event (``chain``), and the memory
(:mod:`orchestrator.memory`) credits the item to each listed query key with
``memory.chain_weight``: the decision is in the logged event, so the incremental updater and
the repair rebuild read the same thing. The session is the request context's ``session_id``,
else its ``user_id``; a request without either forms no chain. Everything here is best
effort: with Redis failing, a search records nothing and feedback carries no chain (the
feedback itself is unaffected).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import redis

from .redis_client import REDIS_ERRORS, Breaker, guarded_read

logger = logging.getLogger(__name__)


def session_of(context: Mapping[str, Any] | None) -> str | None:
    """The session a request belongs to: ``session_id``, else ``user_id``, else None."""
    if not context:
        return None
    for name in ("session_id", "user_id"):
        v = context.get(name)
        if isinstance(v, str) and v:
            return f"{name[0]}:{v}"
    return None


class QueryChains:
    """Per-session recent searches in Redis (see the module docstring).

    Parameters
    ----------
    client:
        Redis client.
    prefix:
        The orchestrator's key prefix.
    window_s:
        How far back (seconds before the search acted on) an earlier search still chains.
    max_searches:
        Searches kept per session (the chain can be at most this long, minus one).
    breaker:
        The process's Redis breaker (:func:`orchestrator.redis_client.guarded_read`).
    clock:
        Wall clock (tests inject one).
    """

    def __init__(self, client: redis.Redis, *, prefix: str, window_s: float = 300.0,
                 max_searches: int = 4, breaker: Breaker | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if window_s <= 0 or max_searches < 2:
            raise ValueError("need window_s > 0 and max_searches >= 2")
        self.client = client
        self.prefix = prefix
        self.window_s = float(window_s)
        self.max_searches = int(max_searches)
        self.breaker = breaker
        self.clock = clock

    def key(self, session: str) -> str:
        digest = hashlib.blake2b(session.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()
        return f"{self.prefix}chain:{digest}"

    def record(self, session: str, *, request_id: str, query_key: str) -> bool:
        """Add a search to its session's list; False when Redis did not take it."""
        rec = json.dumps({"r": request_id, "k": query_key, "t": round(self.clock(), 3)},
                         separators=(",", ":"))
        key = self.key(session)

        def write() -> Any:
            pipe = self.client.pipeline(transaction=True)
            pipe.lpush(key, rec)
            pipe.ltrim(key, 0, self.max_searches - 1)
            pipe.expire(key, math.ceil(self.window_s))
            return pipe.execute()

        try:
            guarded_read(self.breaker, write)
        except REDIS_ERRORS as exc:
            logger.debug("query chain not recorded (Redis): %s", exc)
            return False
        return True

    def abandoned(self, session: str, request_id: str, *,
                  counted: Callable[[list[str]], Mapping[str, list[tuple[str, str]]]],
                  positive: Callable[[str], bool]) -> list[dict[str, Any]]:
        """The session's searches before ``request_id`` (within ``window_s`` of it, another
        query key, no positive action counted on them), newest first, one per query key:
        ``[{"query_key", "request_id", "age_s"}]``. ``counted(request_ids)`` gives the
        (item, action) pairs counted per request; ``positive(action)`` says which count.
        [] when ``request_id`` is not in the session's list (expired, another session) or
        Redis fails."""
        try:
            raw = guarded_read(self.breaker, lambda: self.client.lrange(self.key(session), 0, -1))
        except REDIS_ERRORS as exc:
            logger.debug("query chain not read (Redis): %s", exc)
            return []
        entries = []
        for r in raw or ():
            try:
                e = json.loads(r)
                entries.append((str(e["r"]), str(e["k"]), float(e["t"])))
            except (ValueError, KeyError, TypeError):
                continue  # a record of another version: ignore it
        this = next((e for e in entries if e[0] == request_id), None)
        if this is None:
            return []
        _, key, t = this
        seen = {key}
        candidates = []
        for rid, k, ts in entries:  # newest first
            if rid == request_id or not k or k in seen or not 0 <= t - ts <= self.window_s:
                continue
            seen.add(k)
            candidates.append({"query_key": k, "request_id": rid, "age_s": round(t - ts, 3)})
        if not candidates:
            return []
        try:
            acted = counted([c["request_id"] for c in candidates])
        except REDIS_ERRORS as exc:
            logger.debug("query chain not checked (Redis): %s", exc)
            return []
        return [c for c in candidates
                if not any(positive(a) for _, a in acted.get(c["request_id"], ()))]


__all__ = ["QueryChains", "session_of"]
