"""Impressions and interactions: the durable event log that rewards are joined from.

Consumes served responses (``record_impression``) and user actions (the pipeline calls
``RedisBanditStore.apply`` with this log's duplicate marker and event, so the duplicate check,
the posterior update and the event append are one atomic Lua script); produces the stored
impression that feedback and ``explain`` read, and the ``<prefix>events`` stream that offline
training (:func:`orchestrator.rescoring.dataset_from_events`) replays.

Keys (``P`` = key prefix; full layout in :mod:`orchestrator.bandit_state`)::

    P imp:<request_id>   impression JSON, TTL impression_ttl_s
    P fb:<request_id>    set of "<item_id>\\x1f<action>" already counted, same TTL
    P events             stream: {type: impression|feedback, data: JSON}, MAXLEN ~ stream_maxlen
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import redis

from .bandit_state import STATS_LUA, RedisBanditStore, StatUpdate
from .decoding import dumps, loads
from .errors import ServiceUnavailableError, UnknownRequestError
from .redis_client import Breaker, guarded_read

logger = logging.getLogger(__name__)


_SEP = "\x1f"

# Idempotent impression write, for replaying the spool (:mod:`orchestrator.resilience`) and
# live writes alike: the impression key is set only if absent, and the stream entry, the
# per-arm counters and the request's search-time bandit observations (one per chosen arm, see
# :mod:`orchestrator.rewards`) are added only when it was, all in one script.
# KEYS: 1 impression, 2 events stream, 3 arms:impressions hash, 4 bandit meta hash, 5 outcome
# hash (P out:<request_id>), 6.. one stat key per update. ARGV: 1 impression JSON, 2 ttl s,
# 3 event JSON, 4 stream maxlen, 5 updates JSON, 6 number of executed template ids, 7.. them,
# then the compact record (:func:`compact_impression`) as the last argument.
_REPLAY_IMPRESSION_LUA = STATS_LUA + """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', tonumber(ARGV[2])) then return 0 end
local n_exec = tonumber(ARGV[6])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'type', 'impression', 'data', ARGV[3],
           'mem', ARGV[7 + n_exec])
for n = 7, 6 + n_exec do
  redis.call('HINCRBY', KEYS[3], ARGV[n], 1)
end
local ups = cjson.decode(ARGV[5])
if #ups > 0 then
  apply_stats(ups, 6, KEYS[5], tonumber(ARGV[2]), KEYS[4])
  redis.call('HINCRBY', KEYS[4], 'version', 1)
end
return 1
"""


def compact_impression(impression: Mapping[str, Any]) -> bytes:
    """The impression's stream entry also carries this small JSON (field ``mem``): query key,
    time, request id and the shown ids with their display positions, so incremental consumers
    (the memory updater) need not parse the full event, whose shown list carries every item's
    features and provenance (~9 KB for 10 items; its ``json.loads`` alone capped them at a few
    thousand events/s)."""
    return dumps({"request_id": impression.get("request_id"),
                  "query_key": impression.get("query_key"), "ts": impression.get("ts"),
                  "shown": [[s["id"], s["rank"]] for s in impression.get("shown") or ()],
                  **({"degraded": impression["degraded"]} if impression.get("degraded") else {})})


class FeedbackLog:
    """Redis-backed impression store and event log.

    Parameters
    ----------
    client:
        Redis client.
    store:
        The bandit store (shares the prefix; counts impressions per arm).
    impression_ttl_s:
        How long feedback can still be given for a request (and ``explain`` works).
    stream_maxlen:
        Approximate cap of the events stream.
    """

    def __init__(self, client: redis.Redis, *, store: RedisBanditStore,
                 impression_ttl_s: int = 7 * 24 * 3600, stream_maxlen: int = 200_000) -> None:
        self.client = client
        self.store = store
        self.prefix = store.prefix
        self.impression_ttl_s = impression_ttl_s
        self.stream_maxlen = stream_maxlen
        self._replay_script = client.register_script(_REPLAY_IMPRESSION_LUA)

    def _unavailable(self) -> ServiceUnavailableError:
        return ServiceUnavailableError("Redis", self.store.url)

    def impression_key(self, request_id: str) -> str:
        return f"{self.prefix}imp:{request_id}"

    def dedupe_key(self, request_id: str) -> str:
        return f"{self.prefix}fb:{request_id}"

    @staticmethod
    def dedupe_member(item_id: str, action: str) -> str:
        return f"{item_id}{_SEP}{action}"

    def record_impression(self, impression: dict[str, Any], *, event: dict[str, Any],
                          executed: Iterable[str]) -> None:
        """Store the impression (TTL) and append its event, in one MULTI/EXEC."""
        rid = impression["request_id"]
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self.impression_key(rid), dumps(impression),
                     ex=self.impression_ttl_s)
            pipe.xadd(self.store.events_key,
                      {"type": "impression", "data": dumps(event),
                       "mem": compact_impression(impression)},
                      maxlen=self.stream_maxlen, approximate=True)
            self.store.incr_impressions(executed, pipe)
            pipe.execute()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable() from exc

    def replay_impression(self, impression: dict[str, Any], *, event: dict[str, Any],
                          executed: Iterable[str], updates: Sequence[StatUpdate] = ()) -> bool:
        """Like :meth:`record_impression` but idempotent (one Lua script): nothing happens when
        the impression is already stored, so a spool replayed twice counts it once. With
        ``updates`` (the search-time observations, grouped) they are applied in the same
        script against the request's outcome hash (see :mod:`orchestrator.rewards`). Returns
        True when it was written now."""
        rid = impression["request_id"]
        stat_keys, payload = self.store.stat_payload(updates)
        executed = list(executed)
        keys = [self.impression_key(rid), self.store.events_key,
                self.store.key("arms", "impressions"), self.store.meta_key,
                self.store.outcome_key(rid), *stat_keys]
        args = [dumps(impression), self.impression_ttl_s, dumps(event), self.stream_maxlen, payload,
                len(executed), *executed, compact_impression(impression)]
        try:
            return bool(self._replay_script(keys=keys, args=args))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable() from exc

    def get_impression(self, request_id: str) -> dict[str, Any]:
        try:
            raw = self.client.get(self.impression_key(request_id))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable() from exc
        if raw is None:
            raise UnknownRequestError(request_id)
        return json.loads(raw)

    def counted(self, request_id: str) -> list[tuple[str, str]]:
        """(item_id, action) pairs already counted for a request."""
        try:
            return self.counted_many([request_id])[request_id]
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable() from exc

    def counted_many(self, request_ids: Sequence[str], *,
                     breaker: Breaker | None = None) -> dict[str, list[tuple[str, str]]]:
        """:meth:`counted` of several requests in one round trip. Raises the Redis error
        (``redis.ConnectionError`` at once while ``breaker`` is open, see
        :func:`orchestrator.redis_client.guarded_read`)."""
        def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for rid in request_ids:
                pipe.smembers(self.dedupe_key(rid))
            return list(pipe.execute())

        out: dict[str, list[tuple[str, str]]] = {}
        for rid, members in zip(request_ids, guarded_read(breaker, read)):
            pairs = []
            for m in members:
                m = m.decode() if isinstance(m, bytes) else m
                item, _, action = m.rpartition(_SEP)
                pairs.append((item, action))
            out[rid] = sorted(pairs)
        return out

    def read_events(self, *, count: int = 10_000, start: str = "-") -> list[dict[str, Any]]:
        """Events from the stream, oldest first, decoded (``{"type": ..., **data}``)."""
        try:
            raw = self.client.xrange(self.store.events_key, min=start, count=count)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable() from exc
        out = []
        for entry_id, fields in raw:
            f = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                 for k, v in fields.items()}
            data = loads(f.get("data", "{}"))
            data["type"] = f.get("type")
            data["event_id"] = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            out.append(data)
        return out
