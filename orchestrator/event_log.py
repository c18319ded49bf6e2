"""Move impression/feedback events from the Redis stream into the Elasticsearch events index.

Consumes the stream ``<prefix>events`` (entries ``{type, data}`` with ``data`` a JSON object,
written by :mod:`orchestrator.feedback`), produces documents in the ``events`` alias
(``mappings/events.v1.json``). Exactly once *in effect*:

- entries are read through a consumer group, so an entry stays *pending* until acknowledged;
- the Elasticsearch ``_id`` is the stream entry id, so writing an entry twice overwrites it;
- an entry is acknowledged only after Elasticsearch accepted it.

A worker killed between the bulk write and the ack leaves its entries pending; the next run
claims them (``XAUTOCLAIM``) and writes them again under the same ids: nothing lost, nothing
duplicated. Entries every consumer group (this mover's and the memory updater's) has
acknowledged, older than every pending one, are trimmed from the stream.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import redis
from elasticsearch import Elasticsearch, helpers

from .decoding import finite
from .ingest import load_mapping

logger = logging.getLogger(__name__)

_LIFTED = ("request_id", "item_id", "action", "rank", "query", "query_key", "intent")


def _parse(raw: str | bytes | None) -> tuple[dict[str, Any], bool]:
    """The stream entry's ``data`` as a dict, and whether it is ``raw`` itself (a JSON object
    orjson reads, so the raw bytes can be the stored payload unchanged)."""
    if raw is None or raw == "" or raw == b"":
        return {}, False
    try:
        data = orjson.loads(raw)
        exact = isinstance(data, dict)
    except orjson.JSONDecodeError:  # e.g. NaN, which the standard library writes and reads
        exact = False
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {"raw": raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw}, False
    if not isinstance(data, dict):
        return {"value": data}, False
    return data, exact


def _lifted(entry_id: str, type_: str, data: dict[str, Any]) -> dict[str, Any]:
    """The indexed top-level fields of one event (all but ``payload``)."""
    doc: dict[str, Any] = {"event_id": entry_id, "type": type_}
    # Stream ids start with the Redis server's millisecond clock; store ISO so the date
    # field never has to guess seconds from milliseconds.
    doc["ts"] = data.get("ts") or _dt.datetime.fromtimestamp(
        int(entry_id.split("-")[0]) / 1000.0, tz=_dt.timezone.utc).isoformat()
    for key in _LIFTED:
        if data.get(key) is not None:
            doc[key] = data[key]
    if doc.get("rank") is None and data.get("position") is not None:
        doc["rank"] = data["position"]
    if doc.get("intent") is None and isinstance(data.get("parsed"), dict):
        doc["intent"] = data["parsed"].get("intent")
    arms = data.get("arms") or data.get("rewarded_arms") or data.get("chosen_arms")
    if isinstance(arms, dict):
        arms = list(arms)
    if isinstance(arms, list):
        doc["arms"] = [a if isinstance(a, str) else str(a.get("template_id") or a.get("arm")) for a in arms]
    return doc


def event_document(entry_id: str, fields: Mapping[str, str]) -> dict[str, Any]:
    """The events-index document of one stream entry (training fields lifted to the top,
    the whole event under ``payload``)."""
    data, exact = _parse(fields.get("data"))
    doc = _lifted(entry_id, fields.get("type", "unknown"), data)
    doc["payload"] = data
    return doc if exact else finite(doc)


def event_source(entry_id: str, fields: Mapping[str, str | bytes]) -> bytes:
    """:func:`event_document` serialised, for the bulk body. The payload (most of an
    impression's bytes) is the entry's own JSON spliced in unchanged when it is an object
    orjson reads, so it is parsed once (for the lifted fields) and never re-encoded."""
    raw = fields.get("data")
    data, exact = _parse(raw)
    type_ = fields.get("type", "unknown")
    doc = _lifted(entry_id, type_.decode() if isinstance(type_, bytes) else type_, data)
    if not exact:  # not what orjson reads (NaN, integers past 64 bits, not an object)
        doc["payload"] = data
        return json.dumps(finite(doc), default=str, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode("utf-8", "surrogatepass")
    head = orjson.dumps(doc, default=str)
    body = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    return b"".join((head[:-1], b',"payload":', body.strip(), b"}"))


@dataclass
class MoveResult:
    moved: int = 0
    reclaimed: int = 0
    failed: int = 0
    trimmed: int = 0


class EventMover:
    """Move events from ``stream`` into ``alias`` in batches.

    Parameters
    ----------
    redis_client, es:
        Clients of the two stores.
    stream:
        The Redis stream key (``<prefix>events``).
    alias:
        The events alias in Elasticsearch (created with ``mappings/events.v1.json`` if absent).
    claim_idle_ms:
        Pending entries idle this long are taken over from a consumer presumed dead.
    """

    group = "ltrr-event-mover"
    #: Other readers of the stream whose groups the mover creates (from the stream's start)
    #: and whose unacknowledged entries it never trims: the memory updater
    #: (:mod:`orchestrator.memory`). Without a running updater the stream is still capped by
    #: ``feedback.stream_maxlen``.
    reader_groups: tuple[str, ...] = ("memory",)

    def __init__(self, redis_client: redis.Redis, es: Elasticsearch, *, stream: str, alias: str,
                 mappings_dir: Path, consumer: str | None = None, claim_idle_ms: int = 60_000) -> None:
        self.redis = redis_client
        self.es = es
        self.stream = stream
        self.alias = alias
        self.mappings_dir = mappings_dir
        self.consumer = consumer or f"mover-{os.getpid()}"
        self.claim_idle_ms = claim_idle_ms

    def ensure(self) -> None:
        """Create the events index/alias and the consumer group if they do not exist."""
        if not self.es.indices.exists_alias(name=self.alias):
            body = load_mapping(self.mappings_dir, "events.v1")
            index = f"{self.alias}-v1"
            if not self.es.indices.exists(index=index):
                self.es.indices.create(index=index, settings=body["settings"],
                                       mappings=body["mappings"],
                                       aliases={self.alias: {"is_write_index": True}})
        for group in (self.group, *self.reader_groups):
            try:
                self.redis.xgroup_create(self.stream, group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _write(self, entries: list[tuple[bytes | str, dict[Any, Any]]]) -> tuple[list[str], int]:
        def s(x: Any) -> str:
            return x.decode() if isinstance(x, bytes) else str(x)

        actions = []
        for eid, fields in entries:
            entry_id = s(eid)
            source = event_source(entry_id, {s(k): v for k, v in fields.items()})
            actions.append({"_op_type": "index", "_index": self.alias, "_id": entry_id,
                            "_source": source})
        ok_ids: list[str] = []
        failed = 0
        for ok, info in helpers.streaming_bulk(self.es, actions, raise_on_error=False,
                                               max_retries=3, retry_on_status=(429,)):
            item = next(iter(info.values()))
            if ok:
                ok_ids.append(item["_id"])
            else:
                failed += 1
                logger.warning("event %s not written: %s", item.get("_id"), item.get("error"))
        return ok_ids, failed

    def move(self, *, batch_size: int = 1000, max_batches: int = 100,
             _crash_after_write: bool = False) -> MoveResult:
        """Move up to ``batch_size * max_batches`` events; return what happened."""
        self.ensure()
        result = MoveResult()
        # 1. Entries a dead consumer left pending (it wrote them, or not, but never acked).
        start = "0-0"
        while True:
            start, claimed, *_ = self.redis.xautoclaim(self.stream, self.group, self.consumer,
                                                       min_idle_time=self.claim_idle_ms,
                                                       start_id=start, count=batch_size)
            claimed = [c for c in claimed if c and c[1] is not None]
            if claimed:
                ids, failed = self._write(claimed)
                if ids:
                    self.redis.xack(self.stream, self.group, *ids)
                result.reclaimed += len(ids)
                result.failed += failed
            if start in (b"0-0", "0-0"):
                break
        # 2. New entries.
        for _ in range(max_batches):
            resp = self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                         count=batch_size)
            if not resp:
                break
            entries = resp[0][1]
            ids, failed = self._write(entries)
            if _crash_after_write:
                # Test hook: die like a killed worker, after the write and before the ack.
                os._exit(17)
            if ids:
                self.redis.xack(self.stream, self.group, *ids)
            result.moved += len(ids)
            result.failed += failed
        self.es.indices.refresh(index=self.alias)
        result.trimmed = self._trim()
        return result

    def _trim(self) -> int:
        """Drop entries every consumer group of the stream has acknowledged: older than the
        oldest entry pending or undelivered in ANY group (the memory updater's ``memory``
        group reads the same stream at its own pace, see :mod:`orchestrator.memory`)."""
        floors = []
        for g in self.redis.xinfo_groups(self.stream):
            name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
            info = self.redis.xpending(self.stream, name)
            if info["pending"]:
                low = info["min"]
                floors.append(low.decode() if isinstance(low, bytes) else low)
                continue
            last = g["last-delivered-id"]
            last = last.decode() if isinstance(last, bytes) else last
            ms, seq = last.split("-")
            floors.append(f"{ms}-{int(seq) + 1}")
        if not floors:
            return 0
        floor = min(floors, key=lambda i: tuple(int(x) for x in i.split("-")))
        return int(self.redis.xtrim(self.stream, minid=floor))
