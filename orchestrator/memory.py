"""The query-to-entity (Q2E) memory: a position-debiased click-through rate per (query, item).

Consumes impressions and feedback (the Redis events stream, incrementally; the events index,
for the repair rebuild), produces the **memory index** (``mappings/memory.v1.json``): one small
document per ``(query_key, item_id)`` pair, searched by the ``memory`` arm in the same
``_msearch`` as the catalog arms (``query_templates/memory.v2.*``). The catalog is never
written: an existing application's catalog mapping does not change.

Per pair::

    clicks        sum of the action weights of positive actions (click 1, play 1.5 ...)
    examinations  sum of theta_k over the impressions that showed the item at position k for
                  that query (theta from :class:`orchestrator.examination.ExaminationModel`),
                  plus ``skip_weight`` (1: the user certainly looked at it) per skip
    score         (clicks + s * prior) / (examinations + s)

a Beta posterior mean whose prior is the predicted (cold-start) score with strength ``s``
(``memory.prior_strength``): no evidence leaves the prediction, evidence replaces it. A skip
or an exposure only adds to the denominator, so negative evidence can never raise a score;
a pair whose score falls below ``memory.min_score`` is stored ``active: false`` and does not
match at all (no provenance, no candidate).

Where the work goes (:class:`MemoryUpdater`, run every ``celery.update_memory_every_s`` or by
``ltrr memory run``): the updater reads the stream through its own consumer group
(``memory``), aggregates a batch in Python, reads the touched pair documents (``mget``), adds,
recomputes and bulk-writes only those documents: the cost of a batch grows with the batch,
never with the history.

Exposures of pairs not in the index (most exposures: the lexical arm shows many items nobody
clicks for that query) are needed for an honest CTR once such a pair gets its first click,
but one document per shown pair would bloat the index by the whole exposure log. They wait in
a bounded Redis hash per query key (``<prefix>memory:exp:<query_key>``, item -> examinations,
at most ``memory.max_pending_items`` items, TTL ``memory.exposure_ttl_s`` refreshed on write);
the first click creates the document with those examinations and deletes them from the hash.
Skips of a pair not in the index only count as examinations there: a negative-only pair is
never written.

Neighbour pairs (``neighbours_per_click > 0``; :mod:`orchestrator.neighbours`): at a pair's
first click the batch also proposes the clicked item's neighbours (its artist's other
entities, or genre neighbours) for the same query key, created only where no document
exists (``source: "neighbour"``, no clicks, a decreasing prior below any clicked pair) with
the exposures waiting for them in the pending hash and in the batch, so the memory arm can
show what no static arm retrieves for that query and the users' skips or silence switch
wrong guesses off. They never count in ``memory:keys`` (no positive evidence).

Query chains (``chain_weight > 0``; :mod:`orchestrator.chains`): a positive action whose
feedback event lists abandoned earlier searches of the session (``chain``) also adds
``chain_weight`` of its clicks, and as many examinations, to each listed query's pair with
the item: a user who found nothing for a playlist title and then looked a song up by name
teaches the title that song. Later exposures under the title without clicks lower it again.

Exactly once in effect: a batch's Redis side (pending exposures, ``memory:keys``, XACK) is one
Lua script, run after the Elasticsearch writes; each pair document records the newest stream
id applied to it (``last_event``), so a batch replayed after a crash between the two skips
what a document already holds. One updater runs at a time (a Redis lock).

The repair job (:func:`rebuild_memory`, task ``train_memory``) recomputes every learned pair
from the events index plus the stream, with time decay (``memory.half_life_days``), resets
counts that have no evidence left, deletes learned pairs decayed below ``min_score``, and
rebuilds ``memory:keys`` and the pending exposures. Without decay it equals the incremental
result.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import redis as redis_lib
from elasticsearch import Elasticsearch, NotFoundError, helpers

from .decoding import loads, paused_gc
from .examination import ExaminationModel
from .redis_client import Breaker, guarded_read
from .text import normalize_query
from .training import decay_weight, event_time, stream_id_key

logger = logging.getLogger(__name__)

#: Reward of each action; negative values are evidence against the pair.
ACTION_WEIGHTS: Mapping[str, float] = {
    "click": 1.0, "play": 1.5, "like": 2.0, "favorite": 2.5, "add_to_favorites": 2.5,
    "skip": -0.5,
}

#: Catalog fields copied into a pair document's ``item`` (display and rescoring; small).
ITEM_FIELDS: tuple[str, ...] = (
    "entity_type", "entity_id", "title", "artist", "album", "popularity", "artist_popularity",
    "artist_followers", "listeners", "genres", "artist_genres", "moods", "era", "release_year",
    "energy", "danceability", "tempo", "explicit", "duration_ms", "track_count",
)

#: Consumer group of the updater on ``<prefix>events`` (independent of the event mover's).
GROUP = "memory"
_CONSUMER = "memory-updater"
_MAPPING = "memory.v1"
_DEFAULT_MAPPINGS = Path(__file__).resolve().parent.parent / "mappings"


# -- the formula -------------------------------------------------------------------------------

def memory_score(clicks: float, examinations: float, *, prior: float,
                 prior_strength: float = 2.0) -> float:
    """``(clicks + s * prior) / (examinations + s)``: the CTR with a Beta prior of mean
    ``prior`` and strength ``s``. Monotone: more examinations never raise it.

    >>> memory_score(0, 0, prior=0.8)
    0.8
    >>> round(memory_score(0, 3, prior=0.8), 2)
    0.32
    """
    return (clicks + prior_strength * prior) / (examinations + prior_strength)


def pair_id(query_key: str, item_id: str) -> str:
    """Document id of a pair: a hash of both (stable, fixed length)."""
    return hashlib.blake2b(f"{query_key}\x1f{item_id}".encode(), digest_size=16).hexdigest()


def memory_alias(catalog_alias: str, configured: str | None = None) -> str:
    """The memory index alias of a catalog alias (``<catalog_alias>-memory`` unless set)."""
    return configured or f"{catalog_alias}-memory"


def item_copy(source: Mapping[str, Any]) -> dict[str, Any]:
    """The denormalised ``item`` of a pair document (never the embedding)."""
    return {k: source[k] for k in ITEM_FIELDS if source.get(k) not in (None, [])}


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def pair_document(query_key: str, item_id: str, *, item: Mapping[str, Any], prior: float,
                  clicks: float, examinations: float, source: str, prior_strength: float,
                  min_score: float, last_event: str | None = None) -> dict[str, Any]:
    """The memory-index document of one pair (score and ``active`` recomputed)."""
    return {"query_key": query_key, "item_id": item_id,
            "entity_type": item.get("entity_type") or item_id.split(":", 1)[0],
            "prior": round(prior, 6), "source": source, "item": dict(item),
            **pair_evidence(prior=prior, clicks=clicks, examinations=examinations,
                            prior_strength=prior_strength, min_score=min_score,
                            last_event=last_event)}


def pair_evidence(*, prior: float, clicks: float, examinations: float, prior_strength: float,
                  min_score: float, last_event: str | None = None) -> dict[str, Any]:
    """The fields of a pair document that its evidence changes (what a partial update
    writes: the document's key, ``item`` copy and provenance stay as they are)."""
    score = memory_score(clicks, examinations, prior=prior, prior_strength=prior_strength)
    doc: dict[str, Any] = {"clicks": round(clicks, 6), "examinations": round(examinations, 6),
                           "score": round(score, 6), "active": score >= min_score,
                           "updated": _now_iso()}
    if last_event:
        doc["last_event"] = last_event
    return doc


# -- events -> per-pair evidence (pure) ----------------------------------------------------------

def _key(event_id: Any) -> tuple[int, int]:
    """``"<ms>-<seq>"`` as a sortable pair (:func:`orchestrator.training.stream_id_key`)."""
    return stream_id_key(event_id)


def _shown(event: Mapping[str, Any]) -> Iterator[tuple[str, int]]:
    """``(item id, display position)`` of an impression's shown items: dicts (``id`` or
    ``item_id``, ``rank``), ``[id, rank]`` pairs (the compact stream record) or bare ids."""
    for name in ("shown", "items", "results"):
        items = event.get(name)
        if items:
            for i, it in enumerate(items, start=1):
                if isinstance(it, dict):
                    iid = it.get("id") or it.get("item_id")
                    if iid:
                        yield str(iid), int(it.get("rank") or i)
                elif isinstance(it, (list, tuple)):
                    if it and it[0]:
                        yield str(it[0]), int(it[1] if len(it) > 1 and it[1] else i)
                elif it:
                    yield str(it), i
            return


def event_key(event: Mapping[str, Any]) -> str:
    """The query key of an event (its ``query_key``, else the normalised ``query``)."""
    key = event.get("query_key")
    if key:
        return str(key)
    q = event.get("query")
    return _normalized(q) if isinstance(q, str) and q else ""


@lru_cache(maxsize=65536)
def _normalized(query: str) -> str:
    return normalize_query(query)


def chain_keys(event: Mapping[str, Any]) -> list[str]:
    """The query keys a feedback event's query chain credits (``chain``, written by the
    pipeline: :mod:`orchestrator.chains`), without the event's own key."""
    chain = event.get("chain")
    if not chain or not isinstance(chain, list):
        return []
    own = event_key(event)
    out = []
    for c in chain:
        k = c.get("query_key") if isinstance(c, Mapping) else c
        if isinstance(k, str) and k and k != own and k not in out:
            out.append(k)
    return out


def contributions(event: Mapping[str, Any], *, examination: ExaminationModel,
                  action_weights: Mapping[str, float] = ACTION_WEIGHTS,
                  skip_weight: float = 1.0,
                  chain_weight: float = 0.0) -> Iterator[tuple[str, str, float, float]]:
    """``(query_key, item_id, clicks, examinations)`` of one event (stream shape): each shown
    item at position k examines theta_k, a positive action adds its weight to clicks, a
    negative one (skip) adds ``skip_weight`` to examinations and nothing to clicks. A
    positive action also adds ``chain_weight`` times its weight to the clicks, and
    ``chain_weight`` to the examinations, of each query its chain credits (the abandoned
    searches before it in the session: as if they had shown the item and it was taken)."""
    key = event_key(event)
    if not key:
        return
    if event.get("type") == "impression":
        for item_id, rank in _shown(event):
            yield key, item_id, 0.0, examination.propensity(rank)
    elif event.get("type") == "feedback":
        item_id, w = event.get("item_id"), action_weights.get(str(event.get("action")))
        if not item_id or w is None:
            return
        if w > 0:
            yield key, str(item_id), float(w), 0.0
            if chain_weight > 0:
                for k in chain_keys(event):
                    yield k, str(item_id), chain_weight * float(w), float(chain_weight)
        elif w < 0:
            yield key, str(item_id), 0.0, float(skip_weight)


@dataclass(slots=True)
class PairDelta:
    """Evidence of one pair in a batch (or the whole log): sums, plus each event's part so a
    replayed batch can skip the events a document already holds."""

    clicks: float = 0.0
    examinations: float = 0.0
    last_event: str | None = None
    last_ts: float = 0.0
    parts: list[tuple[tuple[int, int], float, float]] = field(default_factory=list)
    last_key: tuple[int, int] = (-1, -1)

    def since(self, applied: str | None) -> tuple[float, float]:
        """Clicks and examinations of the events newer than ``applied``."""
        if not applied:
            return self.clicks, self.examinations
        floor = _key(applied)
        c = e = 0.0
        for k, dc, de in self.parts:
            if k > floor:
                c += dc
                e += de
        return c, e


def aggregate(events: Iterable[Mapping[str, Any]], *, examination: ExaminationModel | None = None,
              action_weights: Mapping[str, float] = ACTION_WEIGHTS, skip_weight: float = 1.0,
              now: float | None = None, half_life_days: float | None = None,
              keep_parts: bool = False,
              chain_weight: float = 0.0) -> dict[tuple[str, str], PairDelta]:
    """``(query_key, item_id) -> PairDelta`` over ``events`` (pure; linear in the events).

    With ``half_life_days`` each event weighs ``0.5 ** (age / half_life)`` relative to ``now``
    (the repair rebuild); the incremental updater passes no half-life.

    This is :func:`contributions` summed per pair, inlined: the updater's throughput is this
    loop's (each shown item of each impression passes through it), so it looks theta up once
    per position and parses each stream id once (``tests/unit/test_memory.py`` checks it
    against the generator on the same events).
    """
    examination = examination or ExaminationModel.default()
    t_now = time.time() if now is None else now
    theta: dict[int, float] = {}
    out: dict[tuple[str, str], PairDelta] = {}
    get = out.get
    for ev in events:
        typ = ev.get("type")
        if typ == "impression":
            shown = None
            for name in ("shown", "items", "results"):
                shown = ev.get(name)
                if shown:
                    break
            if not shown:
                continue
            rows: Iterable[tuple[str, int]] = (
                shown if isinstance(shown[0], tuple) else _shown({"shown": shown}))
        elif typ == "feedback":
            item_id, aw = ev.get("item_id"), action_weights.get(str(ev.get("action")))
            if not item_id or not aw:
                continue
            rows = ()
        else:
            continue
        qk = event_key(ev)
        if not qk:
            continue
        eid = ev.get("event_id")
        k = stream_id_key(eid)
        ts = event_time(ev)
        w = decay_weight(t_now - ts, half_life_days=half_life_days) if half_life_days else 1.0
        eid_s = str(eid) if eid else None
        rows_cd: list[tuple[str, str, float, float]]
        if typ == "feedback":
            if aw > 0:
                rows_cd = [(qk, str(item_id), float(aw), 0.0)]
                if chain_weight > 0 and ev.get("chain"):
                    rows_cd += [(ck, str(item_id), chain_weight * float(aw), float(chain_weight))
                                for ck in chain_keys(ev)]
            else:
                rows_cd = [(qk, str(item_id), 0.0, float(skip_weight))]
        else:
            rows_cd = []
            for item, rank in rows:
                p = theta.get(rank)
                if p is None:
                    p = theta[rank] = examination.propensity(rank)
                rows_cd.append((qk, item, 0.0, p))
        for pk, item, dc, de in rows_cd:
            d = get((pk, item))
            if d is None:
                d = out[(pk, item)] = PairDelta()
            dc *= w
            de *= w
            d.clicks += dc
            d.examinations += de
            if eid_s and k > d.last_key:
                d.last_key = k
                d.last_event = eid_s
            if ts > d.last_ts:
                d.last_ts = ts
            if keep_parts:
                d.parts.append((k, dc, de))
    return out


# -- the old interaction view (query understanding retraining reads it) -----------------------

@dataclass(frozen=True, slots=True)
class Interaction:
    query_key: str
    item_id: str
    action: str
    rank: int | None
    ts: float


def interactions_from_events(events: Iterable[Mapping[str, Any]]) -> list[Interaction]:
    """Join feedback events with their impressions (query, rank) -- pure function over events
    in the stream's shape (``{"type": ..., **data}``, as :func:`training.load_events` returns)."""
    from .training import event_time

    impressions: dict[str, Mapping[str, Any]] = {}
    feedback: list[Mapping[str, Any]] = []
    for ev in events:
        if ev.get("type") == "impression" and ev.get("request_id"):
            impressions[ev["request_id"]] = ev
        elif ev.get("type") == "feedback":
            feedback.append(ev)
    out = []
    for fb in feedback:
        imp = impressions.get(fb.get("request_id", ""), {})
        query = fb.get("query") or imp.get("query")
        key = fb.get("query_key") or imp.get("query_key") or (normalize_query(query) if query else "")
        rank = fb.get("rank")
        if rank is None:
            rank = next((r for i, r in _shown(imp) if i == fb.get("item_id")), None)
        if key and fb.get("item_id") and fb.get("action"):
            ts = event_time({"ts": fb.get("ts")}) if fb.get("ts") else 0.0
            out.append(Interaction(key, fb["item_id"], fb["action"], rank, ts))
    return out


def load_interactions(es: Elasticsearch, events_alias: str) -> list[Interaction]:
    """Interactions of the Elasticsearch events alias (see :func:`interactions_from_events`)."""
    from .training import RANKING_FEATURES, load_events

    with paused_gc():
        return interactions_from_events(load_events(es, events_alias=events_alias,
                                                    exclude_payload=RANKING_FEATURES))


# -- the index -------------------------------------------------------------------------------

def ensure_memory_index(es: Elasticsearch, alias: str, *,
                        mappings_dir: Path = _DEFAULT_MAPPINGS) -> str:
    """Create an empty memory index behind ``alias`` unless the alias exists; return it."""
    if es.indices.exists_alias(name=alias):
        return alias
    from .ingest import load_mapping

    body = load_mapping(mappings_dir, _MAPPING)
    index = f"{alias}-v{body['mappings']['_meta']['version']}-{_stamp()}"
    try:
        es.indices.create(index=index, settings=body["settings"], mappings=body["mappings"],
                          aliases={alias: {"is_write_index": True}})
    except Exception:  # noqa: BLE001 - a concurrent creator won; the alias is what matters
        if not es.indices.exists_alias(name=alias):
            raise
        return alias
    logger.warning("memory index %s did not exist: created it empty (learned pairs only); "
                   "`ltrr memory seed` adds the predicted pairs and keeps the learned ones", alias)
    return alias


def _stamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d%H%M%S%f")


def _mget(es: Elasticsearch, index: str, ids: Sequence[str], *, source: Sequence[str] | bool,
          chunk: int = 2000) -> dict[str, dict[str, Any]]:
    """Found documents by id: ``{"_source", "_seq_no", "_primary_term", "_index"}``."""
    out: dict[str, dict[str, Any]] = {}
    for i in range(0, len(ids), chunk):
        part = list(ids[i:i + chunk])
        if not part:
            continue
        kwargs: dict[str, Any] = {"index": index, "ids": part}
        if isinstance(source, bool):
            kwargs["source"] = source
        else:
            kwargs["source_includes"] = list(source)
        for d in es.mget(**kwargs)["docs"]:
            if d.get("found"):
                out[d["_id"]] = d
    return out


class MemoryKeys:
    """``<prefix>memory:keys``: query_key -> number of pairs with positive evidence learned
    for it (the context featurizer's "does the memory know this query" feature)."""

    def __init__(self, client: redis_lib.Redis, *, prefix: str,
                 breaker: Breaker | None = None) -> None:
        self.client = client
        self.key = f"{prefix}memory:keys"
        self.breaker = breaker  # the serving process's Redis breaker (see guarded_read)

    def known_pairs(self, query_key: str) -> int | None:
        """Learned pairs of ``query_key`` (0 when none); None when Redis is unreachable, hung,
        or failed a moment ago (the breaker is open: no wait)."""
        try:
            v = guarded_read(self.breaker, lambda: self.client.hget(self.key, query_key))
        except (redis_lib.ConnectionError, redis_lib.TimeoutError):
            return None
        return int(float(v)) if v is not None else 0


# Batch finalisation, atomic: pending exposures (capped per query key, TTL refreshed), the
# pending fields of pairs now in the index deleted, memory:keys increments, XACK.
# KEYS: 1 stream, 2 memory:keys, 3.. exposure hashes. ARGV: group, ttl, cap, then counted
# lists: increments (key index, field, value), deletions (key index, field), known-key deltas
# (query key, delta), stream ids to acknowledge.
_FINALISE_LUA = """
local i = 1
local group = ARGV[i]; local ttl = tonumber(ARGV[i + 1]); local cap = tonumber(ARGV[i + 2])
i = i + 3
local dropped = 0
local touched = {}
local n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  local k = KEYS[2 + tonumber(ARGV[i])]
  if redis.call('HLEN', k) < cap or redis.call('HEXISTS', k, ARGV[i + 1]) == 1 then
    redis.call('HINCRBYFLOAT', k, ARGV[i + 1], ARGV[i + 2])
    touched[k] = true
  else
    dropped = dropped + 1
  end
  i = i + 3
end
for k, _ in pairs(touched) do redis.call('EXPIRE', k, ttl) end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  redis.call('HDEL', KEYS[2 + tonumber(ARGV[i])], ARGV[i + 1]); i = i + 2
end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  redis.call('HINCRBY', KEYS[2], ARGV[i], tonumber(ARGV[i + 1])); i = i + 2
end
n = tonumber(ARGV[i]); i = i + 1
local acked = 0
local j = 0
while j < n do
  local m = math.min(500, n - j)
  acked = acked + redis.call('XACK', KEYS[1], group, unpack(ARGV, i + j, i + j + m - 1))
  j = j + m
end
return {acked, dropped}
"""

_UNLOCK_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class UpdateResult:
    events: int = 0
    batches: int = 0
    pairs: int = 0
    updated: int = 0
    created: int = 0
    pending: int = 0
    pending_dropped: int = 0
    replayed: int = 0
    missing_items: int = 0
    conflicts: int = 0
    neighbours: int = 0
    seconds: float = 0.0
    skipped: str | None = None

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 3)
        if d["skipped"] is None:
            d.pop("skipped")
        return d


class MemoryBusyError(RuntimeError):
    """Another updater (or a rebuild/seed) holds the memory lock."""


class MemoryUpdater:
    """Apply the new events of ``<prefix>events`` to the memory index, batch by batch.

    Parameters
    ----------
    redis_client, es:
        Clients.
    prefix:
        Redis key prefix (``settings.redis.key_prefix``); the stream is ``<prefix>events``.
    memory_alias, catalog_alias:
        The memory index alias, and the catalog the denormalised ``item`` of a new pair is
        read from.
    examination:
        Examination propensities (default: :meth:`ExaminationModel.default`).
    prior_strength, default_prior, min_score, skip_weight:
        ``settings.memory``: the formula's ``s``, the prior of pairs never predicted, the
        threshold below which a pair does not match, a skip's examination weight.
    chain_weight:
        The share of a click a query chain gives each abandoned earlier query of the session
        (``memory.chain_weight``; 0: chains ignored). See :mod:`orchestrator.chains`.
    exposure_ttl_s, max_pending_items:
        Bounds of the pending exposures of pairs not in the index (per query key).
    neighbours_per_click, neighbours_by, neighbour_prior, neighbour_decay, neighbours_min_pairs:
        At a pair's first click, up to ``neighbours_per_click`` neighbours of the item
        (:mod:`orchestrator.neighbours`, mode ``neighbours_by``) become pairs of the same query
        key with prior ``neighbour_prior * neighbour_decay ** rank`` (0: none), once the key
        has ``neighbours_min_pairs`` learned pairs.
    """

    def __init__(self, redis_client: redis_lib.Redis, es: Elasticsearch, *, prefix: str,
                 memory_alias: str, catalog_alias: str,
                 examination: ExaminationModel | None = None, prior_strength: float = 2.0,
                 default_prior: float = 0.0, min_score: float = 0.05, skip_weight: float = 1.0,
                 chain_weight: float = 0.0,
                 action_weights: Mapping[str, float] = ACTION_WEIGHTS,
                 exposure_ttl_s: int = 7 * 24 * 3600, max_pending_items: int = 500,
                 neighbours_per_click: int = 0, neighbours_by: str = "artist",
                 neighbour_prior: float = 0.2, neighbour_decay: float = 0.85,
                 neighbours_min_pairs: int = 1,
                 mappings_dir: Path = _DEFAULT_MAPPINGS, lock_ttl_s: int = 60) -> None:
        self.redis = redis_client
        self.es = es
        self.prefix = prefix
        self.stream = f"{prefix}events"
        self.memory_alias = memory_alias
        self.catalog_alias = catalog_alias
        self.examination = examination or ExaminationModel.default()
        self.prior_strength = prior_strength
        self.default_prior = default_prior
        self.min_score = min_score
        self.skip_weight = skip_weight
        self.chain_weight = chain_weight
        self.action_weights = action_weights
        self.exposure_ttl_s = exposure_ttl_s
        self.max_pending_items = max_pending_items
        self.neighbours_per_click = neighbours_per_click
        self.neighbours_by = neighbours_by
        self.neighbour_prior = neighbour_prior
        self.neighbour_decay = neighbour_decay
        self.neighbours_min_pairs = neighbours_min_pairs
        self.mappings_dir = mappings_dir
        self.lock_ttl_s = lock_ttl_s
        self.keys_key = f"{prefix}memory:keys"
        self.lock_key = f"{prefix}memory:lock"
        self._neighbours: Any = None  # a NeighbourCache, made at the first neighbours' search
        self._finalise = redis_client.register_script(_FINALISE_LUA)
        self._unlock = redis_client.register_script(_UNLOCK_LUA)

    def exposure_key(self, query_key: str) -> str:
        return f"{self.prefix}memory:exp:{query_key}"

    # -- set-up and locking --------------------------------------------------------------
    def ensure(self) -> None:
        """The consumer group (from the stream's start) and the memory index exist."""
        try:
            self.redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis_lib.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        ensure_memory_index(self.es, self.memory_alias, mappings_dir=self.mappings_dir)

    @contextmanager
    def lock(self, *, wait_s: float = 0.0) -> Iterator[str]:
        """Hold the memory lock (one updater, rebuild or seed at a time)."""
        token = uuid.uuid4().hex
        deadline = time.monotonic() + wait_s
        while not self.redis.set(self.lock_key, token, nx=True, ex=self.lock_ttl_s):
            if time.monotonic() >= deadline:
                raise MemoryBusyError(f"{self.lock_key} is held by another memory job")
            time.sleep(0.05)
        try:
            yield token
        finally:
            self._unlock(keys=[self.lock_key], args=[token])

    def _renew(self, token: str) -> None:
        if self.redis.get(self.lock_key) in (token, token.encode()):
            self.redis.expire(self.lock_key, self.lock_ttl_s)

    # -- running -----------------------------------------------------------------------------
    def run(self, *, batch_size: int = 1000, max_batches: int = 100, block_ms: int | None = None,
            wait_s: float = 0.0) -> UpdateResult:
        """Apply up to ``batch_size * max_batches`` new events. Returns at once with
        ``skipped`` set when another memory job holds the lock."""
        t0 = time.perf_counter()
        self.ensure()
        try:
            with self.lock(wait_s=wait_s) as token:
                res = self.run_locked(token, batch_size=batch_size, max_batches=max_batches,
                                      block_ms=block_ms)
        except MemoryBusyError:
            return UpdateResult(skipped="busy: another memory job holds the lock",
                                seconds=time.perf_counter() - t0)
        res.seconds = time.perf_counter() - t0
        return res

    def run_locked(self, token: str, *, batch_size: int = 1000, max_batches: int = 100,
                   block_ms: int | None = None) -> UpdateResult:
        res = UpdateResult()
        # Own pending entries first (a run that died before acknowledging them), then new ones.
        pending = True
        for _ in range(max_batches):
            start = "0" if pending else ">"
            resp = self.redis.xreadgroup(GROUP, _CONSUMER, {self.stream: start}, count=batch_size,
                                         block=None if pending else block_ms)
            entries = resp[0][1] if resp else []
            gone = [eid for eid, f in entries if not f]
            if gone:  # pending entries trimmed from the stream (MAXLEN): nothing to apply
                self.redis.xack(self.stream, GROUP, *gone)
            entries = [(eid, f) for eid, f in entries if f]
            if not entries:
                if pending:
                    pending = False
                    continue
                break
            with paused_gc():  # a batch is thousands of decoded entries: orchestrator.decoding
                self.apply(entries, res)
                del resp, entries  # freed by reference counting, before the collector resumes
            res.batches += 1
            self._renew(token)
        return res

    def apply(self, entries: Sequence[tuple[Any, Mapping[Any, Any]]], res: UpdateResult) -> None:
        """One batch: aggregate, read the touched pairs, write them, finalise in Redis."""
        events = [_decode_entry(eid, fields) for eid, fields in entries]
        ids = [e["event_id"] for e in events]
        res.events += len(events)
        agg = aggregate(events, examination=self.examination, action_weights=self.action_weights,
                        skip_weight=self.skip_weight, keep_parts=True,
                        chain_weight=self.chain_weight)
        res.pairs += len(agg)
        by_id = {pair_id(qk, item): (qk, item) for qk, item in agg}
        increments: list[tuple[str, str, float]] = []
        deletions: list[tuple[str, str]] = []
        known: dict[str, int] = defaultdict(int)
        waiting: dict[str, float] = {}
        todo = list(by_id)
        first_clicks: list[tuple[str, str, Mapping[str, Any] | None]] = []
        for attempt in range(5):
            if not todo:
                break
            # Never the ``item`` copy (most of a document's bytes): an update is partial.
            found = _mget(self.es, self.memory_alias, todo,
                          source=["prior", "clicks", "examinations", "last_event"])
            actions: list[dict[str, Any]] = []
            first_click: dict[str, str] = {}  # pid -> query key whose known-pair count grows
            clicked_items: dict[str, Mapping[str, Any]] = {}  # item id -> its item copy
            new_clicked: list[str] = []
            for pid in todo:
                qk, item_id = by_id[pid]
                d = agg[(qk, item_id)]
                hit = found.get(pid)
                if hit is None:
                    if d.clicks > 0:
                        new_clicked.append(pid)
                    elif attempt == 0:
                        increments.append((qk, item_id, d.examinations))
                        res.pending += 1
                    continue
                src = hit["_source"]
                dc, de = d.since(src.get("last_event"))
                if dc == 0 and de == 0:
                    res.replayed += 1  # a replayed batch this document already holds
                    deletions.append((qk, item_id))
                    continue
                de += waiting.pop(pid, 0.0)  # a create that lost a race: keep its exposures
                old_clicks = float(src.get("clicks") or 0.0)
                doc = pair_evidence(
                    prior=float(src.get("prior") or 0.0), clicks=old_clicks + dc,
                    examinations=float(src.get("examinations") or 0.0) + de,
                    prior_strength=self.prior_strength, min_score=self.min_score,
                    last_event=d.last_event)
                if old_clicks <= 0 < doc["clicks"]:
                    first_click[pid] = qk  # its item copy is read if neighbours need it
                actions.append({"_op_type": "update", "_index": hit["_index"], "_id": pid,
                                "if_seq_no": hit["_seq_no"], "if_primary_term": hit["_primary_term"],
                                "doc": doc})
            if new_clicked:
                actions += self._create_actions(new_clicked, by_id, agg, res, waiting, first_click,
                                                clicked_items)
            todo = self._write(actions, res)
            res.conflicts += len(todo)
            for pid, qk in first_click.items():
                if pid not in todo:
                    known[qk] += 1
                    first_clicks.append((qk, by_id[pid][1], clicked_items.get(by_id[pid][1])))
                    if pid in waiting:  # created: its pending exposures are in the document
                        deletions.append(by_id[pid])
                        waiting.pop(pid)
        if todo:
            raise RuntimeError(f"memory: {len(todo)} pair documents kept conflicting")
        if first_clicks and self.neighbours_per_click > 0:
            increments = self._add_neighbours(first_clicks, agg, increments, deletions, known, res)
        self._finalise_batch(ids, increments, deletions, known, res)

    def _add_neighbours(self, first_clicks: Sequence[tuple[str, str, Mapping[str, Any] | None]],
                        agg: Mapping[tuple[str, str], PairDelta],
                        increments: list[tuple[str, str, float]],
                        deletions: list[tuple[str, str]], known: Mapping[str, int],
                        res: UpdateResult) -> list[tuple[str, str, float]]:
        """Create the neighbour pairs of the batch's first clicks (create only: a pair that
        exists keeps its evidence). A new pair takes the exposures waiting for it (the pending
        hash and this batch's), so its score is as honest as a clicked pair's. Only query
        keys with at least ``neighbours_min_pairs`` learned pairs (this batch's included)
        get neighbours: a key whose users click different items has several right answers;
        a known-item lookup, where everyone clicks the same one, gets none. Returns the
        increments still to add to the pending hashes."""
        from .neighbours import NeighbourCache, neighbour_priors

        if self.neighbours_min_pairs > 1:
            keys = sorted({qk for qk, _it, _src in first_clicks})
            have = {qk: int(float(v or 0)) + known.get(qk, 0)
                    for qk, v in zip(keys, self.redis.hmget(self.keys_key, keys))}
            first_clicks = [fc for fc in first_clicks
                            if have[fc[0]] >= self.neighbours_min_pairs]
            if not first_clicks:
                return increments
        items: dict[str, Mapping[str, Any] | None] = {}
        for _qk, it, src in first_clicks:
            items[it] = items.get(it) or src  # None: an updated pair, its copy not read

        def load(ids: list[str]) -> dict[str, Mapping[str, Any]]:
            return {d["_id"]: d["_source"] for d in _mget(
                self.es, self.catalog_alias, sorted(ids), source=list(ITEM_FIELDS)).values()}

        try:
            if self._neighbours is None:
                self._neighbours = NeighbourCache(size=self.neighbours_per_click,
                                                  mode=self.neighbours_by)  # type: ignore[arg-type]
            found = self._neighbours.get(self.es, self.catalog_alias, items, load=load)
        except Exception as exc:  # noqa: BLE001 - a proposal: never fail the batch for it
            logger.warning("memory neighbours skipped: %s", exc)
            return increments
        this_batch = {(qk, it): v for qk, it, v in increments}
        pairs: dict[str, tuple[str, str, float, dict[str, Any]]] = {}
        for qk, it, _src in first_clicks:
            nbs = found.get(it) or []
            for nb, prior in zip(nbs, neighbour_priors(len(nbs), prior=self.neighbour_prior,
                                                      decay=self.neighbour_decay)):
                pid = pair_id(qk, nb.item_id)
                if (qk, nb.item_id) in agg and agg[(qk, nb.item_id)].clicks > 0:
                    continue  # clicked in this batch: a learned pair already
                if pid not in pairs or pairs[pid][2] < prior:
                    pairs[pid] = (qk, nb.item_id, prior, item_copy(nb.source))
        if not pairs:
            return increments
        pipe = self.redis.pipeline(transaction=False)
        for qk, it, _p, _i in pairs.values():
            pipe.hget(self.exposure_key(qk), it)
        waiting = pipe.execute()
        actions = []
        for (pid, (qk, it, prior, item)), w in zip(pairs.items(), waiting):
            d = agg.get((qk, it))
            doc = pair_document(qk, it, item=item, prior=prior, clicks=0.0,
                                examinations=float(w or 0.0) + this_batch.get((qk, it), 0.0),
                                source="neighbour", prior_strength=self.prior_strength,
                                min_score=self.min_score, last_event=d.last_event if d else None)
            actions.append({"_op_type": "create", "_index": self.memory_alias, "_id": pid,
                            "_source": doc})
        created: set[tuple[str, str]] = set()
        for ok, info in helpers.streaming_bulk(self.es, actions, raise_on_error=False,
                                               max_retries=3, retry_on_status=(429,),
                                               chunk_size=1000):
            item = next(iter(info.values()))
            if ok:
                qk, it, _p, _i = pairs[item["_id"]]
                created.add((qk, it))
            elif item.get("status") != 409:  # 409: the pair exists and keeps its evidence
                logger.warning("memory neighbour pair not written: %s", item.get("error"))
        res.neighbours += len(created)
        deletions.extend(sorted(created))  # their pending exposures now live in the document
        return [(qk, it, v) for qk, it, v in increments if (qk, it) not in created]

    def _create_actions(self, pids: list[str], by_id: Mapping[str, tuple[str, str]],
                        agg: Mapping[tuple[str, str], PairDelta], res: UpdateResult,
                        waiting: dict[str, float], first_click: dict[str, str],
                        clicked_items: dict[str, Mapping[str, Any]],
                        ) -> list[dict[str, Any]]:
        """Create the documents of pairs clicked for the first time, with the examinations
        waiting for them in the pending hash and the item copied from the catalog."""
        pipe = self.redis.pipeline(transaction=False)
        for pid in pids:
            qk, item_id = by_id[pid]
            pipe.hget(self.exposure_key(qk), item_id)
        pending = pipe.execute()
        items = {d["_id"]: d["_source"] for d in _mget(
            self.es, self.catalog_alias, sorted({by_id[p][1] for p in pids}),
            source=list(ITEM_FIELDS)).values()}
        actions = []
        for pid, w in zip(pids, pending):
            qk, item_id = by_id[pid]
            src = items.get(item_id)
            if src is None:
                res.missing_items += 1
                continue
            d = agg[(qk, item_id)]
            waiting[pid] = float(w or 0.0)
            doc = pair_document(qk, item_id, item=item_copy(src), prior=self.default_prior,
                                clicks=d.clicks, examinations=d.examinations + waiting[pid],
                                source="learned", prior_strength=self.prior_strength,
                                min_score=self.min_score, last_event=d.last_event)
            first_click[pid] = qk
            clicked_items[item_id] = doc["item"]
            res.created += 1
            actions.append({"_op_type": "create", "_index": self.memory_alias, "_id": pid,
                            "_source": doc})
        return actions

    def _write(self, actions: list[dict[str, Any]], res: UpdateResult) -> list[str]:
        """Bulk-write; return the ids that conflicted (409). Any other failure raises, so the
        batch stays pending and is replayed (documents already written skip it)."""
        conflicts: list[str] = []
        failed: list[Any] = []
        for ok, info in helpers.streaming_bulk(self.es, actions, raise_on_error=False,
                                               max_retries=3, retry_on_status=(429,),
                                               chunk_size=1000):
            op, item = next(iter(info.items()))
            if ok:
                res.updated += op == "update"
            elif item.get("status") == 409:
                conflicts.append(item["_id"])
            else:
                failed.append(item.get("error"))
        if failed:
            raise RuntimeError(f"memory: {len(failed)} pair documents not written: {failed[:3]}")
        return conflicts

    def _finalise_batch(self, ids: Sequence[str], increments: Sequence[tuple[str, str, float]],
                        deletions: Sequence[tuple[str, str]], known: Mapping[str, int],
                        res: UpdateResult) -> None:
        hashes: dict[str, int] = {}

        def ki(qk: str) -> int:
            return hashes.setdefault(self.exposure_key(qk), len(hashes) + 1)

        args: list[Any] = [GROUP, self.exposure_ttl_s, self.max_pending_items, len(increments)]
        for qk, item, v in increments:
            args += [ki(qk), item, repr(float(v))]
        args.append(len(deletions))
        for qk, item in deletions:
            args += [ki(qk), item]
        deltas = [(k, v) for k, v in known.items() if v]
        args.append(len(deltas))
        for k, v in deltas:
            args += [k, v]
        args.append(len(ids))
        args += list(ids)
        keys = [self.stream, self.keys_key, *hashes]
        _acked, dropped = self._finalise(keys=keys, args=args)
        res.pending_dropped += int(dropped)


def _field(fields: Mapping[Any, Any], name: str) -> str | None:
    v = fields.get(name.encode())
    if v is None:
        v = fields.get(name)  # a client with decode_responses=True
    if v is None:
        return None
    return v.decode() if isinstance(v, bytes) else str(v)


def _decode_entry(entry_id: Any, fields: Mapping[Any, Any]) -> dict[str, Any]:
    """A stream entry as an event dict. Impressions are read from their compact record
    (``mem``: query key, time, ``[id, rank]`` pairs, kept as tuples); the full ``data`` (about
    10 KB for 10 shown items) is decoded only when that record is missing or broken."""
    eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    typ = _field(fields, "type")
    if typ == "impression":
        mem = _field(fields, "mem")
        if mem:
            # The compact record (orchestrator.feedback.compact_impression): all the updater needs.
            try:
                data = loads(mem)
                data["shown"] = [(str(i), int(r)) for i, r in data.get("shown") or ()]
                data["type"], data["event_id"] = "impression", eid
                return data
            except (json.JSONDecodeError, TypeError, ValueError, AttributeError):
                pass  # fall back to the full event
    try:
        data = loads(_field(fields, "data") or "{}")
    except json.JSONDecodeError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    data["type"] = typ
    data["event_id"] = eid
    return data


def run_loop(updater: MemoryUpdater, *, interval_s: float = 0.5, batch_size: int = 1000,
             stop: Any = None) -> None:
    """``ltrr memory run``: apply new events as they arrive (blocking read of up to
    ``interval_s``), until ``stop()`` returns true or the process is interrupted."""
    while stop is None or not stop():
        res = updater.run(batch_size=batch_size, block_ms=int(interval_s * 1000))
        if res.skipped:
            time.sleep(interval_s)
        elif res.events:
            logger.info("memory update: %s", res.as_dict())


# -- seeding from the predicted pairs ----------------------------------------------------------

def predicted_pair_documents(entity: Mapping[str, Any], *, entity_id: str, prior_strength: float,
                             min_score: float) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(pair id, document)`` of an entity's predicted Q2E pairs (its ``q2e`` entries with
    a prior: learned entries of the old nested memory are left to the repair rebuild)."""
    item = item_copy(entity)
    for e in entity.get("q2e") or ():
        qk = e.get("query_key")
        prior = float(e.get("prior", e.get("score", 0.0)) or 0.0)
        if not qk or prior <= 0:
            continue
        yield pair_id(qk, entity_id), pair_document(
            qk, entity_id, item=item, prior=prior, clicks=0.0, examinations=0.0,
            source="predicted", prior_strength=prior_strength, min_score=min_score)


def seed_memory(es: Elasticsearch, *, catalog: str, memory_alias: str,
                redis_client: redis_lib.Redis | None = None, prefix: str = "ltrr:",
                prior_strength: float = 2.0, min_score: float = 0.05,
                mappings_dir: Path = _DEFAULT_MAPPINGS, keep_old_indices: int = 1,
                chunk_size: int = 2000, thread_count: int = 2,
                entities: Iterable[tuple[str, Mapping[str, Any]]] | None = None) -> dict[str, Any]:
    """Build a fresh memory index from the predicted pairs of ``catalog`` (an alias or index:
    its documents' ``q2e`` field, read with ``scan``; or ``entities`` = ``(id, doc)`` pairs),
    carry the learned state of the current ``memory_alias`` over (counts kept, priors from the
    new predictions) and swap the alias. The carry-over and swap hold the memory lock (when a
    Redis client is given), so no update is lost in between.

    Returns counts and timings (``pairs``, ``carried``, ``seconds`` ...).
    """
    from .ingest import load_mapping

    t0 = time.perf_counter()
    body = load_mapping(mappings_dir, _MAPPING)
    index = f"{memory_alias}-v{body['mappings']['_meta']['version']}-{_stamp()}"
    settings = {**body["settings"], "refresh_interval": "-1"}
    es.indices.create(index=index, settings=settings, mappings=body["mappings"])
    if entities is None:
        entities = ((h["_id"], h["_source"]) for h in helpers.scan(
            es, index=catalog, size=1000, query={"query": {"match_all": {}},
                                                  "_source": ["q2e", *ITEM_FIELDS]}))

    def actions() -> Iterator[dict[str, Any]]:
        for eid, src in entities:
            for pid, doc in predicted_pair_documents(src, entity_id=eid,
                                                     prior_strength=prior_strength,
                                                     min_score=min_score):
                yield {"_op_type": "index", "_index": index, "_id": pid, "_source": doc}

    pairs = failed = 0
    try:
        for ok, info in helpers.parallel_bulk(es.options(request_timeout=120), actions(),
                                              chunk_size=chunk_size, thread_count=thread_count,
                                              raise_on_error=False, raise_on_exception=False):
            if ok:
                pairs += 1
            else:
                failed += 1
                if failed <= 5:
                    logger.warning("memory seed: %s", info)
    except BaseException:
        es.indices.delete(index=index, ignore_unavailable=True)
        raise
    seeded_s = time.perf_counter() - t0
    es.indices.put_settings(index=index, settings={"index.refresh_interval": "1s"})
    es.indices.refresh(index=index)

    def finish() -> dict[str, Any]:
        carried = _carry_over(es, memory_alias, index, prior_strength=prior_strength,
                              min_score=min_score)
        es.indices.refresh(index=index)
        old, deleted = _swap(es, memory_alias, index, keep_old_indices=keep_old_indices)
        return {"carried": carried, "swapped_from": old, "deleted": deleted}

    if redis_client is not None:
        updater = MemoryUpdater(redis_client, es, prefix=prefix, memory_alias=memory_alias,
                                catalog_alias=catalog)
        with updater.lock(wait_s=120.0):
            done = finish()
    else:
        done = finish()
    return {"index": index, "alias": memory_alias, "pairs": pairs, "failed": failed,
            "seed_seconds": round(seeded_s, 2), "seconds": round(time.perf_counter() - t0, 2),
            **done}


_LEARNED_STATE = {"bool": {"should": [{"range": {"clicks": {"gt": 0}}},
                                      {"range": {"examinations": {"gt": 0}}}],
                           "minimum_should_match": 1}}


def _carry_over(es: Elasticsearch, alias: str, index: str, *, prior_strength: float,
                min_score: float) -> int:
    """Copy the counts of the pairs with evidence, and the neighbour pairs (proposals of
    earlier clicks, evidence or not), from the current alias into ``index``."""
    if not es.indices.exists_alias(name=alias):
        return 0
    carried = {"bool": {"should": [_LEARNED_STATE, {"term": {"source": "neighbour"}}],
                        "minimum_should_match": 1}}
    olds = [(h["_id"], h["_source"]) for h in helpers.scan(
        es, index=alias, size=1000, query={"query": carried})]
    if not olds:
        return 0
    fresh = _mget(es, index, [i for i, _ in olds], source=["prior", "item", "source"])
    def actions() -> Iterator[dict[str, Any]]:
        for pid, src in olds:
            new = fresh.get(pid, {}).get("_source")
            base = new or src
            yield {"_op_type": "index", "_index": index, "_id": pid, "_source": pair_document(
                src["query_key"], src["item_id"], item=base.get("item") or {},
                prior=float(base.get("prior") or 0.0), clicks=float(src.get("clicks") or 0.0),
                examinations=float(src.get("examinations") or 0.0),
                source=base.get("source") or "learned", prior_strength=prior_strength,
                min_score=min_score, last_event=src.get("last_event"))}

    n = 0
    for ok, _info in helpers.streaming_bulk(es, actions(), raise_on_error=False, chunk_size=1000):
        n += bool(ok)
    return n


def _swap(es: Elasticsearch, alias: str, index: str, *, keep_old_indices: int) -> tuple[list[str], list[str]]:
    try:
        old = sorted(es.indices.get_alias(name=alias).body)
    except NotFoundError:
        old = []
    acts: list[dict[str, Any]] = [{"remove": {"index": i, "alias": alias}} for i in old]
    acts.append({"add": {"index": index, "alias": alias, "is_write_index": True}})
    es.indices.update_aliases(actions=acts)
    existing = sorted(i for i in es.indices.get(index=f"{alias}-v*", expand_wildcards="open").body
                      if i < index)
    to_delete = existing[: max(0, len(existing) - keep_old_indices)]
    for i in to_delete:
        es.indices.delete(index=i, ignore_unavailable=True)
    return old, to_delete


# -- the repair rebuild ------------------------------------------------------------------------

def rebuild_memory(es: Elasticsearch, redis_client: redis_lib.Redis, *, events_alias: str,
                   prefix: str, memory_alias: str, catalog_alias: str,
                   half_life_days: float | None = 30.0, now: float | None = None,
                   **updater_kwargs: Any) -> dict[str, Any]:
    """Recompute every learned pair from the log (events index + stream up to what the
    updater has applied), with decay; see the module docstring. Holds the memory lock."""
    from .training import RANKING_FEATURES, load_events, merge_events

    t0 = time.perf_counter()
    up = MemoryUpdater(redis_client, es, prefix=prefix, memory_alias=memory_alias,
                       catalog_alias=catalog_alias, **updater_kwargs)
    up.ensure()
    with up.lock(wait_s=60.0) as token:
        drained = up.run_locked(token, max_batches=10_000)
        upto = _last_delivered(redis_client, up.stream)
        limit = _key(upto) if upto else (-1, -1)
        with paused_gc():  # the whole log is live while it is aggregated: orchestrator.decoding
            live = [_decode_entry(eid, f) for eid, f in redis_client.xrange(up.stream, max=upto)
                    if f] if upto else []
            events = [e for e in merge_events(live, load_events(
                es, events_alias=events_alias, exclude_payload=RANKING_FEATURES))
                      if _key(e.get("event_id")) <= limit]
            t_now = now if now is not None else (limit[0] / 1000.0 if upto else time.time())
            agg = aggregate(events, examination=up.examination, action_weights=up.action_weights,
                            skip_weight=up.skip_weight, now=t_now, half_life_days=half_life_days,
                            chain_weight=up.chain_weight)
            n_events = len(events)
            del live, events  # freed by reference counting, before the collector resumes
        res = _rewrite(es, redis_client, up, agg, upto=upto, now=t_now)
        up._renew(token)
    es.indices.refresh(index=memory_alias)
    return {"events": n_events, "pairs": len(agg), "upto": upto, "drained": drained.events,
            **res, "seconds": round(time.perf_counter() - t0, 2)}


def _last_delivered(r: redis_lib.Redis, stream: str) -> str | None:
    for g in r.xinfo_groups(stream):
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == GROUP:
            last = g["last-delivered-id"]
            last = last.decode() if isinstance(last, bytes) else str(last)
            return None if last == "0-0" else last
    return None


def _rewrite(es: Elasticsearch, r: redis_lib.Redis, up: MemoryUpdater,
             agg: Mapping[tuple[str, str], PairDelta], *, upto: str | None,
             now: float) -> dict[str, Any]:
    by_id = {pair_id(qk, it): (qk, it) for qk, it in agg}
    current = {h["_id"]: h["_source"] for h in helpers.scan(
        es, index=up.memory_alias, size=1000, query={"query": _LEARNED_STATE},
        _source=["query_key", "item_id", "prior", "source", "item"])}
    found = {pid: d["_source"] for pid, d in _mget(
        es, up.memory_alias, [p for p in by_id if p not in current],
        source=["query_key", "item_id", "prior", "source", "item"]).items()}
    found.update(current)
    clicked_new = sorted({it for pid, (qk, it) in by_id.items()
                          if pid not in found and agg[(qk, it)].clicks > 0})
    items = {d["_id"]: d["_source"] for d in _mget(es, up.catalog_alias, clicked_new,
                                                   source=list(ITEM_FIELDS)).values()}
    known: dict[str, int] = defaultdict(int)
    pending: dict[str, dict[str, float]] = defaultdict(dict)
    counts = {"written": 0, "deleted": 0, "reset": 0, "pending": 0, "missing_items": 0}

    def actions() -> Iterator[dict[str, Any]]:
        for pid, (qk, it) in by_id.items():
            d = agg[(qk, it)]
            src = found.get(pid)
            if src is None:
                if d.clicks <= 0:
                    if now - d.last_ts < up.exposure_ttl_s and d.examinations > 0:
                        pending[qk][it] = d.examinations
                    continue
                if it not in items:
                    counts["missing_items"] += 1
                    continue
                src = {"prior": up.default_prior, "source": "learned",
                       "item": item_copy(items[it])}
            doc = pair_document(qk, it, item=src.get("item") or {},
                                prior=float(src.get("prior") or 0.0), clicks=d.clicks,
                                examinations=d.examinations, source=src.get("source") or "learned",
                                prior_strength=up.prior_strength, min_score=up.min_score,
                                last_event=upto)
            if doc["source"] == "learned" and not doc["active"]:
                if pid in found:
                    counts["deleted"] += 1
                    yield {"_op_type": "delete", "_index": up.memory_alias, "_id": pid}
                continue
            if doc["clicks"] > 0:
                known[qk] += 1
            counts["written"] += 1
            yield {"_op_type": "index", "_index": up.memory_alias, "_id": pid, "_source": doc}
        # Pairs with counts but no evidence left (events trimmed from both stores).
        for pid, src in current.items():
            if pid in by_id:
                continue
            if src.get("source") == "learned":
                counts["deleted"] += 1
                yield {"_op_type": "delete", "_index": up.memory_alias, "_id": pid}
            else:
                counts["reset"] += 1
                yield {"_op_type": "index", "_index": up.memory_alias, "_id": pid,
                       "_source": pair_document(
                           src["query_key"], src["item_id"], item=src.get("item") or {},
                           prior=float(src.get("prior") or 0.0), clicks=0.0, examinations=0.0,
                           source=src.get("source") or "predicted",
                           prior_strength=up.prior_strength, min_score=up.min_score,
                           last_event=upto)}

    for ok, info in helpers.streaming_bulk(es, actions(), raise_on_error=False, chunk_size=1000):
        if not ok and next(iter(info.values())).get("status") != 404:
            logger.warning("memory rebuild: %s", info)
    # Redis: memory:keys and the pending exposures, replaced.
    pipe = r.pipeline(transaction=True)
    pipe.delete(up.keys_key)
    if known:
        pipe.hset(up.keys_key, mapping={k: v for k, v in known.items()})
    for key in r.scan_iter(match=f"{up.prefix}memory:exp:*", count=1000):
        pipe.delete(key)
    for qk, fields in pending.items():
        top = dict(sorted(fields.items(), key=lambda kv: -kv[1])[:up.max_pending_items])
        pipe.hset(up.exposure_key(qk), mapping={k: repr(v) for k, v in top.items()})
        pipe.expire(up.exposure_key(qk), up.exposure_ttl_s)
        counts["pending"] += len(top)
    pipe.execute()
    counts["known_keys"] = len(known)
    return counts


def memory_settings_kwargs(memory: Any) -> dict[str, Any]:
    """:class:`MemoryUpdater` keyword arguments from ``settings.memory``."""
    return {"prior_strength": memory.prior_strength, "default_prior": memory.default_prior,
            "min_score": memory.min_score, "skip_weight": memory.skip_weight,
            "chain_weight": memory.chain_weight if memory.chain_window_s > 0 else 0.0,
            "exposure_ttl_s": memory.exposure_ttl_s,
            "max_pending_items": memory.max_pending_items,
            "neighbours_per_click": memory.neighbours_per_click,
            "neighbours_by": memory.neighbours_by, "neighbour_prior": memory.neighbour_prior,
            "neighbour_decay": memory.neighbour_decay,
            "neighbours_min_pairs": memory.neighbours_min_pairs}


def updater_from_settings(s: Any, es: Elasticsearch, r: redis_lib.Redis, *,
                          examination: ExaminationModel | None = None) -> MemoryUpdater:
    """The updater the task, the loop and the benchmark run (settings slices only)."""
    if examination is None:
        examination = _load_examination(r, s.redis.key_prefix)
    return MemoryUpdater(r, es, prefix=s.redis.key_prefix,
                         memory_alias=memory_alias(s.es.catalog_alias, s.memory.alias),
                         catalog_alias=s.es.catalog_alias, examination=examination,
                         mappings_dir=s.ingest.mappings_dir, **memory_settings_kwargs(s.memory))


def _load_examination(r: redis_lib.Redis, prefix: str) -> ExaminationModel:
    """The estimated examination model when one is stored, else the prior."""
    load = getattr(ExaminationModel, "load", None)
    if load is not None:
        try:
            model = load(r, prefix=prefix)
            if model is not None:
                return model
        except Exception as exc:  # noqa: BLE001 - the prior is a safe fallback
            logger.warning("examination model not loaded (%s); using the prior", exc)
    return ExaminationModel.default()


__all__ = [
    "ACTION_WEIGHTS", "GROUP", "ITEM_FIELDS", "Interaction", "MemoryBusyError", "MemoryKeys",
    "MemoryUpdater", "PairDelta", "UpdateResult", "aggregate", "contributions",
    "ensure_memory_index", "event_key", "interactions_from_events", "item_copy",
    "load_interactions", "memory_alias", "memory_score", "pair_document", "pair_id",
    "rebuild_memory", "run_loop", "seed_memory", "updater_from_settings",
]
