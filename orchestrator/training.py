"""Retraining from the click log: bandit posteriors rebuilt with time decay, and the rescorer
retrained, judged on a held-out time slice and promoted only when it wins.

Consumes impression/feedback events: the Redis stream ``P events`` (:mod:`orchestrator.feedback`)
that :mod:`orchestrator.event_log` moves into the Elasticsearch events alias; :func:`load_events`
reads them back in the stream's shape (``{"type", "event_id", **data}``). Produces bandit
sufficient statistics swapped into Redis (:func:`swap_posteriors`) and versioned rescorer
models (``rescorer.v<N>.json`` plus the ``current`` pointer, :mod:`orchestrator.rescoring`).
The pure functions (:func:`rebuild_posteriors`, :func:`ranking_groups`, :func:`time_split`,
:func:`ndcg_at_k`, :func:`should_promote`) do the learning; the ``*_from_es`` /
:func:`rebuild_and_swap` helpers do the I/O, so a Celery task is one call.

Bandit posteriors
-----------------
:func:`rebuild_posteriors` replays every feedback event against its impression with the live
path's own code: the impression's logged :class:`SelectionContext` (the featurizer's output at
serving time, read back with ``SelectionContext.from_dict`` exactly as ``Orchestrator.feedback``
does), :func:`orchestrator.pipeline.impression_rewards` (the reward rules) and the learner's
``updates_for``, accumulated by :class:`InMemoryBanditStore`. The only difference is the weight:
each observation is multiplied by ``0.5 ** (age / half_life)`` (age of the feedback at ``now``),
so old behaviour fades (non-stationarity). Without decay the result equals what the live path
accumulated from the same events.

Swap without losing feedback (:func:`rebuild_and_swap`). Every live update is one Lua script
that increments the statistics *and* appends its event to the stream, so the stream id orders
updates exactly. The rebuild works against a cut-off ``C``:

1. one Lua script snapshots, atomically, the statistics ``S_C`` of every bandit key, the meta
   ``gen`` and the stream's last id ``C``: ``S_C`` is precisely the effect of the updates with
   ids <= C (plus whatever an earlier rebuild left);
2. the events with ids <= C are read from the stream first, then from Elasticsearch (an entry
   missing from the stream was trimmed, which the mover does only after writing it to
   Elasticsearch and refreshing, so the later scan sees it), and replayed into ``R_C``;
3. a second Lua script checks ``gen`` is unchanged (no other rebuild swapped meanwhile, else
   start again) and adds ``R_C - S_C`` to every field, bumps ``version`` (running selectors
   reload) and ``gen``, and records ``rebuilt_upto = C``.

The store then holds ``R_C + (live updates after C)``: feedback that arrived during the rebuild
is kept because it was never part of ``S_C`` and is never touched. No key is renamed, so the
live Lua script never writes into a key about to be replaced. Rebuilding twice from the same
log gives the same state (``R`` is a function of the events, ``now`` and the parameters; by
default ``now`` is the time of ``C``, so it is a function of the log alone). Updates that never
reached the stream (``import_state``, direct ``partial_fit``) are replaced by the log's view,
which is the point of a rebuild.

Ranker
------
:func:`retrain_ranker` groups logged impressions with their feedback (one group per request,
rows built by :func:`orchestrator.rescoring.dataset_from_events`), orders them by impression
time and holds out the newest ``holdout_fraction``. A candidate is trained on the rest and both
it and the current model rank every held-out group; the metric is NDCG@k of the clicked items
over the groups with at least one positive and one negative item. The candidate is promoted
(new ``rescorer.v<N>.json`` with metrics, parent version and data hash in its metadata, then an
atomic ``current`` pointer update) only when it beats the current model by ``min_improvement``
on at least ``min_holdout`` groups. A data hash already recorded by a promoted version is not
promoted again. Caveat: held-out impressions were ranked by the current model, so the logged
clicks carry its position bias; the comparison favours the current model, which errs on the
side of not promoting.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import redis as redis_lib
from elasticsearch import Elasticsearch, helpers

from .bandit_state import (
    SCHEMA_VERSION,
    BetaUpdate,
    InMemoryBanditStore,
    LinearUpdate,
    RedisBanditStore,
    export_state,
)
from .errors import InvalidFeedbackError, NotFittedError, OrchestratorError, StateVersionError
from .feedback import FeedbackLog
from .pipeline import EMPTY_ACTION, impression_rewards
from .rescoring import (
    LinearRescorer,
    current_version,
    dataset_from_events,
    load_version,
    train_rescorer,
    write_pointer,
)
from .rewards import RewardModel
from .selection import (
    RESERVED_FEATURES,
    BetaThompsonSelector,
    LinearThompsonSelector,
    SelectionContext,
)

logger = logging.getLogger(__name__)

Policy = Literal["linear", "simple", "uniform", "fixed"]


# -- events -------------------------------------------------------------------------------------
def stream_id_key(event_id: str | None) -> tuple[int, int]:
    """``"<ms>-<seq>"`` as a sortable pair; ``(-1, -1)`` for events without a stream id."""
    if not event_id:
        return (-1, -1)
    ms, _, seq = str(event_id).partition("-")
    try:
        return (int(ms), int(seq or 0))
    except ValueError:
        return (-1, -1)


def event_time(event: Mapping[str, Any]) -> float:
    """Event time in epoch seconds: its ``ts`` (ISO string, epoch millis or seconds), else the
    millisecond clock of its stream id, else 0."""
    ts = event.get("ts")
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        return ts / 1000.0 if ts > 1e11 else float(ts)
    if isinstance(ts, str) and ts:
        try:
            return _dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    ms, _ = stream_id_key(event.get("event_id"))
    return ms / 1000.0 if ms >= 0 else 0.0


def _epoch(now: float | _dt.datetime) -> float:
    return now.timestamp() if isinstance(now, _dt.datetime) else float(now)


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="milliseconds")


def _order(ev: Mapping[str, Any]) -> tuple[Any, ...]:
    return (stream_id_key(ev.get("event_id")), event_time(ev), str(ev.get("request_id", "")),
            str(ev.get("item_id") or ""), str(ev.get("action") or ""))


def load_events(es: Elasticsearch, *, events_alias: str,
                types: Sequence[str] = ("impression", "feedback"),
                batch_size: int = 1000) -> list[dict[str, Any]]:
    """Events of the Elasticsearch events alias, in the stream's shape (``{"type",
    "event_id", **payload}``), oldest first. A missing alias gives ``[]``."""
    if not es.indices.exists_alias(name=events_alias) and not es.indices.exists(index=events_alias):
        return []
    out = []
    body = {"query": {"terms": {"type": list(types)}},
            "_source": ["type", "event_id", "ts", "payload"]}
    for hit in helpers.scan(es, index=events_alias, query=body, size=batch_size):
        src = hit["_source"]
        payload = src.get("payload")
        ev = dict(payload) if isinstance(payload, dict) else {}
        ev["type"] = src.get("type")
        ev["event_id"] = src.get("event_id") or hit["_id"]
        ev.setdefault("ts", src.get("ts"))
        out.append(ev)
    out.sort(key=_order)
    return out


def _stream_events(log: FeedbackLog, *, upto: str, batch_size: int = 1000) -> list[dict[str, Any]]:
    """Stream entries with ids <= ``upto`` (decoded by :meth:`FeedbackLog.read_events`)."""
    out: list[dict[str, Any]] = []
    start = "-"
    limit = stream_id_key(upto)
    while True:
        batch = log.read_events(count=batch_size, start=start)
        for ev in batch:
            if stream_id_key(ev["event_id"]) > limit:
                return out
            out.append(ev)
        if len(batch) < batch_size:
            return out
        start = "(" + batch[-1]["event_id"]


def merge_events(*sources: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Union of event lists by ``event_id`` (first occurrence wins), oldest first."""
    seen: dict[str, dict[str, Any]] = {}
    anonymous = []
    for src in sources:
        for ev in src:
            eid = ev.get("event_id")
            if eid is None:
                anonymous.append(dict(ev))
            elif eid not in seen:
                seen[str(eid)] = dict(ev)
    return sorted([*seen.values(), *anonymous], key=_order)


# -- bandit posteriors (pure) ----------------------------------------------------------------------
def decay_weight(age_s: float, *, half_life_days: float | None) -> float:
    """``0.5 ** (age / half_life)``; 1 without a half-life or for events from the future."""
    if half_life_days is None or not math.isfinite(half_life_days):
        return 1.0
    if half_life_days <= 0:
        raise ValueError(f"half_life_days must be > 0 or None, got {half_life_days}")
    return 0.5 ** (max(age_s, 0.0) / (half_life_days * 86400.0))


def learner_for(policy: Policy,
                store: InMemoryBanditStore) -> LinearThompsonSelector | BetaThompsonSelector:
    """The learner whose statistics the live path accumulates under ``bandit.policy``
    (``Orchestrator.from_settings``: ``simple`` learns Beta statistics, every other policy,
    baselines included, feeds the linear model)."""
    if policy == "simple":
        return BetaThompsonSelector(store)
    return LinearThompsonSelector(store)


def rebuild_posteriors(events: Iterable[Mapping[str, Any]], *, now: float | _dt.datetime,
                       half_life_days: float | None, dim: int, policy: Policy = "linear",
                       reward_model: RewardModel | None = None,
                       upto: str | None = None) -> dict[str, Any]:
    """Replay the log into bandit sufficient statistics, with exponential time decay.

    Pure: the same events and arguments give the same state, whatever their input order
    (events are replayed in stream-id order).

    Parameters
    ----------
    events:
        Impression and feedback events (stream shape, see :func:`load_events`).
    now:
        Reference time of the decay (epoch seconds or aware datetime).
    half_life_days:
        An observation ``half_life_days`` old weighs half; ``None``: no decay (then the state
        equals the live path's accumulation over the same events).
    dim:
        Context dimension of the store (``1 + len(RESERVED_FEATURES) + hash_dim``).
    policy:
        ``bandit.policy``; decides which statistics the live path keeps (:func:`learner_for`).
    reward_model:
        The live reward rules (``settings.feedback``: position bias, weight cap).
    upto:
        Only events with stream ids <= ``upto`` (the swap's cut-off).

    Returns
    -------
    dict
        :func:`orchestrator.bandit_state.export_state` format (``schema_version``, ``dim``,
        ``linear``, ``beta``) plus ``meta``: counts, cut-off, parameters and ``fingerprint``
        (hash of the replayed feedback and the parameters).
    """
    t_now = _epoch(now)
    reward_model = reward_model or RewardModel()
    store = InMemoryBanditStore(dim=dim)
    learner = learner_for(policy, store)
    limit = stream_id_key(upto) if upto is not None else None
    impressions: dict[str, Mapping[str, Any]] = {}
    feedback: list[Mapping[str, Any]] = []
    for ev in events:
        eid = ev.get("event_id")
        if limit is not None and eid is not None and stream_id_key(eid) > limit:
            continue
        if ev.get("type") == "impression" and ev.get("request_id"):
            impressions.setdefault(str(ev["request_id"]), ev)
        elif ev.get("type") == "feedback" and ev.get("request_id"):
            feedback.append(ev)
    feedback.sort(key=_order)
    counts: Counter[str] = Counter()
    components: set[str] = set()
    template_ids: set[str] = set()
    digest = hashlib.sha256()
    seen: set[tuple[str, str, str]] = set()
    for fb in feedback:
        rid, item, action = str(fb["request_id"]), fb.get("item_id"), str(fb.get("action") or "")
        # The live path counts a (request, item, action) once (FeedbackLog's duplicate set).
        marker = (rid, str(item or ""), action)
        if marker in seen:
            counts["duplicates"] += 1
            continue
        seen.add(marker)
        imp = impressions.get(rid)
        if imp is None:
            counts["skipped_no_impression"] += 1
            continue
        try:
            _, rewards = impression_rewards(imp, item_id=item, action=action,
                                            reward_model=reward_model)
            ctx = SelectionContext.from_dict(imp["selection"])
        except (InvalidFeedbackError, KeyError, TypeError, ValueError):
            counts["skipped_invalid"] += 1
            continue
        if ctx.indices and max(ctx.indices) >= dim:
            counts["skipped_dim"] += 1  # logged under another hash_dim
            continue
        w = decay_weight(t_now - event_time(fb), half_life_days=half_life_days)
        updates = [dataclasses.replace(u, weight=u.weight * w)
                   for u in learner.updates_for(ctx, rewards)]
        for u in updates:
            if isinstance(u, LinearUpdate):
                components.add(u.component)
            elif isinstance(u, BetaUpdate):
                template_ids.add(u.template_id)
        store.apply(updates)
        counts["applied"] += 1
        counts["empty" if action == EMPTY_ACTION else "feedback"] += 1
        digest.update(json.dumps([fb.get("event_id"), rid, item, action, event_time(fb)]).encode())
    digest.update(json.dumps([t_now, half_life_days, dim, policy, reward_model.position_bias,
                              reward_model.max_weight,
                              sorted(reward_model.action_values.items())]).encode())
    state = export_state(store, components=sorted(components), template_ids=sorted(template_ids))
    state["meta"] = {
        "impressions": len(impressions), "feedback_events": len(feedback),
        "applied": counts["applied"], "empty": counts["empty"],
        "duplicates": counts["duplicates"],
        "skipped_no_impression": counts["skipped_no_impression"],
        "skipped_invalid": counts["skipped_invalid"], "skipped_dim": counts["skipped_dim"],
        "upto": upto, "now": t_now, "half_life_days": half_life_days, "policy": policy,
        "fingerprint": digest.hexdigest(),
    }
    return state


def state_fields(state: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """The state as Redis hashes: ``{"lin:<component>" | "beta:<template_id>": {field: value}}``
    in :class:`RedisBanditStore`'s field layout (A upper triangle, zeros left out)."""
    out: dict[str, dict[str, float]] = {}
    for comp, s in state.get("linear", {}).items():
        A = np.asarray(s["A"], dtype=float)
        b = np.asarray(s["b"], dtype=float)
        fields: dict[str, float] = {"n": float(s["n"]), "w": float(s["w"])}
        for i in np.nonzero(b)[0]:
            fields[f"b:{i}"] = float(b[i])
        iu, ju = np.nonzero(np.triu(A))
        for i, j in zip(iu, ju):
            fields[f"A:{i}:{j}"] = float(A[i, j])
        out[f"lin:{comp}"] = fields
    for tid, buckets in state.get("beta", {}).items():
        fields = {}
        for bucket, (a, f, n) in buckets.items():
            fields.update({f"{bucket}:a": float(a), f"{bucket}:b": float(f),
                           f"{bucket}:n": float(n)})
        out[f"beta:{tid}"] = fields
    return out


# -- bandit posteriors (Redis) ---------------------------------------------------------------------
# KEYS: 1 meta hash, 2 events stream, 3.. stat hashes. Returns gen, version, dim, last stream
# id ('' when there is no stream), then HGETALL of every stat hash. Atomic with the live
# update script, so the statistics are exactly those of the stream entries up to that id.
_SNAPSHOT_LUA = """
local meta = redis.call('HMGET', KEYS[1], 'gen', 'version', 'dim')
local last = ''
if redis.call('EXISTS', KEYS[2]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[2])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
  end
end
local out = {meta[1] or '0', meta[2] or '0', meta[3] or '', last}
for n = 3, #KEYS do out[#out + 1] = redis.call('HGETALL', KEYS[n]) end
return out
"""

# KEYS: 1 meta hash, 2.. stat hashes. ARGV: 1 expected gen, 2 JSON list of {field: "delta"}
# (one per stat key, in order), 3 cut-off stream id, 4 JSON summary. Refuses (returns
# {0, gen}) when another rebuild swapped since the snapshot.
_SWAP_LUA = """
local gen = redis.call('HGET', KEYS[1], 'gen') or '0'
if gen ~= ARGV[1] then return {0, gen} end
local adj = cjson.decode(ARGV[2])
for n, fields in ipairs(adj) do
  local key = KEYS[1 + n]
  for f, d in pairs(fields) do redis.call('HINCRBYFLOAT', key, f, d) end
end
local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
local g = redis.call('HINCRBY', KEYS[1], 'gen', 1)
redis.call('HSET', KEYS[1], 'rebuilt_upto', ARGV[3], 'rebuild', ARGV[4])
return {1, g, v}
"""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Live statistics at the stream cut-off ``upto`` (see the module docstring)."""

    gen: str
    version: int
    dim: int | None
    upto: str | None
    fields: dict[str, dict[str, float]]


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _stat_keys(store: RedisBanditStore) -> list[str]:
    """Suffixes (``lin:<c>`` / ``beta:<t>``) of every bandit statistics hash under the prefix."""
    base = store.key("bandit", "")
    out = set()
    try:
        for kind in ("lin", "beta"):
            for k in store.client.scan_iter(match=f"{base}{kind}:*", count=1000):
                out.add(_s(k)[len(base):])
    except (redis_lib.ConnectionError, redis_lib.TimeoutError) as exc:
        raise store._unavailable(exc) from exc
    return sorted(out)


def snapshot_posteriors(store: RedisBanditStore, *, keys: Sequence[str]) -> Snapshot:
    """Atomically read the hashes ``keys`` (suffixes ``lin:<c>`` / ``beta:<t>``), the meta
    generation/version and the events stream's last id."""
    script = store.client.register_script(_SNAPSHOT_LUA)
    try:
        raw = script(keys=[store.meta_key, store.events_key,
                           *(store.key("bandit", k) for k in keys)])
    except (redis_lib.ConnectionError, redis_lib.TimeoutError) as exc:
        raise store._unavailable(exc) from exc
    fields: dict[str, dict[str, float]] = {}
    for k, flat in zip(keys, raw[4:]):
        fields[k] = {_s(flat[i]): float(flat[i + 1]) for i in range(0, len(flat), 2)}
    dim = _s(raw[2])
    return Snapshot(_s(raw[0]), int(_s(raw[1])), int(dim) if dim else None, _s(raw[3]) or None,
                    fields)


def swap_posteriors(redis: redis_lib.Redis, prefix: str, state: Mapping[str, Any], *,
                    base: Snapshot, dim: int | None = None) -> dict[str, Any]:
    """Replace the live statistics' part up to ``base.upto`` by ``state``, atomically.

    Adds ``state - base`` to every field of every key of either (one Lua script), so updates
    that landed after the snapshot are kept, then bumps ``version`` (running orchestrators
    reload) and ``gen``.

    Returns
    -------
    dict
        ``swapped`` (False when another rebuild swapped since ``base``: take a new snapshot and
        rebuild again), ``version``, ``gen``, ``keys``, ``fields`` changed.

    Raises
    ------
    StateVersionError
        ``state`` has another schema version or dimension than the store.
    """
    if state.get("schema_version") != SCHEMA_VERSION:
        raise StateVersionError(f"state schema_version {state.get('schema_version')!r}; "
                                f"this code writes {SCHEMA_VERSION}")
    want_dim = dim if dim is not None else base.dim
    if want_dim is not None and int(state["dim"]) != want_dim:
        raise StateVersionError(f"state dim {state['dim']} != store dim {want_dim}")
    store = RedisBanditStore(redis, prefix=prefix, dim=int(state["dim"]))
    target = state_fields(state)
    keys = sorted(set(target) | set(base.fields))
    adjust: list[dict[str, str]] = []
    n_fields = 0
    for k in keys:
        new, old = target.get(k, {}), base.fields.get(k, {})
        delta = {f: new.get(f, 0.0) - old.get(f, 0.0) for f in set(new) | set(old)}
        adjust.append({f: repr(d) for f, d in sorted(delta.items()) if d != 0.0})
        n_fields += len(adjust[-1])
    summary = json.dumps({**{k: v for k, v in state.get("meta", {}).items()
                             if k in ("upto", "now", "half_life_days", "policy", "applied",
                                      "fingerprint")},
                          "swapped_at": _iso(time.time())}, separators=(",", ":"))
    script = redis.register_script(_SWAP_LUA)
    try:
        res = script(keys=[store.meta_key, *(store.key("bandit", k) for k in keys)],
                     args=[base.gen, json.dumps(adjust, separators=(",", ":")),
                           base.upto or "", summary])
    except (redis_lib.ConnectionError, redis_lib.TimeoutError) as exc:
        raise store._unavailable(exc) from exc
    if int(res[0]) != 1:
        return {"swapped": False, "gen": _s(res[1]), "version": base.version, "keys": len(keys),
                "fields": 0}
    return {"swapped": True, "gen": _s(res[1]), "version": int(res[2]), "keys": len(keys),
            "fields": n_fields}


def rebuild_and_swap(es: Elasticsearch, redis: redis_lib.Redis, *, events_alias: str, prefix: str,
                     half_life_days: float | None = 14.0, now: float | _dt.datetime | None = None,
                     policy: Policy = "linear", hash_dim: int = 16,
                     position_bias: Literal["log2", "none"] = "log2", max_weight: float = 3.0,
                     max_attempts: int = 5) -> dict[str, Any]:
    """Rebuild the posteriors of ``prefix`` from the log and swap them in (see the module
    docstring for why no feedback is lost). Idempotent; safe to run concurrently (a loser of
    the ``gen`` check starts again).

    Parameters
    ----------
    es, redis:
        Clients.
    events_alias:
        The Elasticsearch events alias the mover fills from ``<prefix>events``.
    prefix:
        Redis key prefix (``settings.redis.key_prefix``).
    half_life_days:
        Decay half-life (``None``: no decay).
    now:
        Decay reference; default: the time of the cut-off (so the result depends on the log
        only).
    policy, hash_dim, position_bias, max_weight:
        ``settings.bandit`` / ``settings.feedback`` values of the serving orchestrators.

    Returns
    -------
    dict
        JSON-able: ``swapped``, ``version``, ``upto``, ``attempts`` and the rebuild counts.

    Raises
    ------
    StateVersionError
        The store was built with another dimension.
    OrchestratorError
        ``max_attempts`` concurrent swaps in a row won the race.
    """
    dim = 1 + len(RESERVED_FEATURES) + hash_dim
    store = RedisBanditStore(redis, prefix=prefix, dim=dim)
    log = FeedbackLog(redis, store=store)
    reward_model = RewardModel(position_bias=position_bias, max_weight=max_weight)
    keys = _stat_keys(store)
    for attempt in range(1, max_attempts + 1):
        base = snapshot_posteriors(store, keys=keys)
        if base.dim is not None and base.dim != dim:
            raise StateVersionError(f"bandit state under {prefix!r} has dim={base.dim}; "
                                    f"hash_dim={hash_dim} gives dim={dim}")
        # Stream first, then Elasticsearch: see the module docstring.
        live = _stream_events(log, upto=base.upto) if base.upto else []
        events = merge_events(live, load_events(es, events_alias=events_alias))
        t_now = now if now is not None else (
            stream_id_key(base.upto)[0] / 1000.0 if base.upto else time.time())
        state = rebuild_posteriors(events, now=t_now, half_life_days=half_life_days, dim=dim,
                                   policy=policy, reward_model=reward_model, upto=base.upto)
        missing = sorted(set(state_fields(state)) - set(base.fields))
        if missing:
            # Keys created between listing and snapshot: their snapshot is needed too.
            keys = sorted(set(keys) | set(missing))
            continue
        res = swap_posteriors(redis, prefix, state, base=base, dim=dim)
        if res["swapped"]:
            meta = state["meta"]
            logger.info("bandit posteriors of %r rebuilt from %d feedback up to %s (v%s)",
                        prefix, meta["applied"], base.upto, res["version"])
            return {**res, "attempts": attempt, "upto": base.upto, "previous_version": base.version,
                    "events": len(events), "stream_events": len(live),
                    **{k: meta[k] for k in ("impressions", "applied", "empty", "duplicates",
                                            "skipped_no_impression", "skipped_invalid",
                                            "skipped_dim", "now", "half_life_days", "fingerprint")}}
        keys = _stat_keys(store)
    raise OrchestratorError(f"bandit rebuild of {prefix!r} lost the swap race {max_attempts} times")


# -- ranker (pure) ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RankingGroup:
    """The shown items of one request, in display order, with feedback labels."""

    request_id: str
    ts: float
    X: np.ndarray
    y: np.ndarray

    @property
    def informative(self) -> bool:
        """At least one positive and one negative: a ranking can be right or wrong."""
        return 0 < int(self.y.sum()) < len(self.y)


def ranking_groups(events: Iterable[Mapping[str, Any]], *, now: float | _dt.datetime | None = None,
                   max_age_days: float | None = None,
                   ) -> tuple[list[RankingGroup], tuple[str, ...], dict[str, int]]:
    """One :class:`RankingGroup` per impression with feedback, oldest first (rows and labels
    from :func:`orchestrator.rescoring.dataset_from_events`). Groups of the most common
    feature layout are kept (a model scores one layout).

    Returns
    -------
    (groups, feature_names, counts)
    """
    t_now = _epoch(now) if now is not None else None
    impressions: dict[str, Mapping[str, Any]] = {}
    feedback: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for ev in events:
        rid = ev.get("request_id")
        if not rid:
            continue
        if ev.get("type") == "impression":
            impressions.setdefault(str(rid), ev)
        elif ev.get("type") == "feedback" and ev.get("item_id"):
            feedback[str(rid)].append(ev)
    counts: Counter[str] = Counter()
    by_layout: dict[tuple[str, ...], list[RankingGroup]] = defaultdict(list)
    for rid, fbs in feedback.items():
        imp = impressions.get(rid)
        if imp is None or not imp.get("feature_names") or not imp.get("shown"):
            counts["skipped_no_impression"] += 1
            continue
        ts = event_time(imp)
        if t_now is not None and (ts > t_now or (max_age_days is not None
                                                 and t_now - ts > max_age_days * 86400.0)):
            counts["skipped_window"] += 1
            continue
        X, y, names = dataset_from_events([imp, *fbs])
        if not len(y):
            continue
        by_layout[names].append(RankingGroup(rid, ts, X, y))
    if not by_layout:
        return [], (), dict(counts)
    names = max(by_layout, key=lambda n: (len(by_layout[n]), n))
    counts["skipped_layout"] = sum(len(g) for n, g in by_layout.items() if n != names)
    groups = sorted(by_layout[names], key=lambda g: (g.ts, g.request_id))
    return groups, names, dict(counts)


def time_split(groups: Sequence[RankingGroup], *, holdout_fraction: float,
               ) -> tuple[list[RankingGroup], list[RankingGroup]]:
    """Oldest ``1 - holdout_fraction`` of the groups for training, the newest for testing
    (at least one group each when there are two or more)."""
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    ordered = sorted(groups, key=lambda g: (g.ts, g.request_id))
    if len(ordered) < 2:
        return list(ordered), []
    n_test = min(max(1, math.ceil(len(ordered) * holdout_fraction)), len(ordered) - 1)
    return ordered[:-n_test], ordered[-n_test:]


def ndcg_at_k(scores: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray, *,
              k: int = 10) -> float:
    """NDCG@k of ranking by ``scores`` (ties keep the given order, i.e. the display order).

    >>> ndcg_at_k([0.9, 0.1], [1, 0]), ndcg_at_k([0.1, 0.9], [1, 0]) < 1
    (1.0, True)
    """
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=float)
    order = np.argsort(-s, kind="stable")[:k]
    disc = 1.0 / np.log2(np.arange(2, len(order) + 2))
    dcg = float((y[order] * disc).sum())
    ideal = np.sort(y)[::-1][:k]
    idcg = float((ideal * disc[: len(ideal)]).sum())
    return dcg / idcg if idcg > 0 else 0.0


def evaluate(model: LinearRescorer, groups: Sequence[RankingGroup], names: Sequence[str], *,
             k: int = 10) -> float:
    """Mean NDCG@k of ``model`` over the informative groups (NaN when there is none)."""
    vals = [ndcg_at_k(model.score(g.X, names), g.y, k=k) for g in groups if g.informative]
    return float(np.mean(vals)) if vals else float("nan")


def should_promote(current: float, candidate: float, *, n_holdout: int, min_holdout: int,
                   min_improvement: float) -> bool:
    """Promote only on enough held-out groups and a strict win by ``min_improvement``."""
    if n_holdout < min_holdout or not math.isfinite(candidate):
        return False
    if not math.isfinite(current):
        return True
    return candidate > current + min_improvement


def data_hash(groups: Sequence[RankingGroup], names: Sequence[str],
              config: Mapping[str, Any]) -> str:
    """Hash of the dataset (rows, labels, request ids, times) and the training configuration."""
    h = hashlib.sha256()
    h.update(json.dumps({"names": list(names), "config": dict(config)}, sort_keys=True).encode())
    for g in groups:
        h.update(json.dumps([g.request_id, round(g.ts, 3), np.round(g.X, 6).tolist(),
                             g.y.astype(int).tolist()]).encode())
    return h.hexdigest()


def _version_metadata(model_dir: Path) -> dict[int, dict[str, Any]]:
    """``{version: metadata}`` of the model files of ``model_dir``."""
    out = {}
    for p in model_dir.glob("rescorer.v*.json"):
        try:
            meta = json.loads(p.read_text(encoding="utf-8")).get("metadata", {})
            out[int(p.name.split(".v")[1].split(".")[0])] = meta
        except (OSError, ValueError, IndexError):
            continue
    return out


def retrain_ranker(events: Iterable[Mapping[str, Any]], *, model_dir: Path | str,
                   now: float | _dt.datetime, holdout_fraction: float = 0.2,
                   min_examples: int = 20, min_holdout: int = 5, k: int = 10,
                   min_improvement: float = 0.0, max_age_days: float | None = None,
                   C: float = 1.0, random_state: int = 0) -> dict[str, Any]:
    """Train a candidate rescorer on the older events, judge it against the current model on
    the newest ``holdout_fraction`` and promote it only when it wins (module docstring).

    Parameters
    ----------
    events:
        Impression and feedback events (stream shape).
    model_dir:
        Folder of ``rescorer.v<N>.json`` and the ``current`` pointer (shared with the
        orchestrators, ``settings.rescorer.model_dir``).
    now:
        Recorded as the training time; events after it (or older than ``max_age_days``) are
        left out.
    min_examples:
        Positive (clicked) training rows needed to train at all.
    min_holdout, min_improvement, k:
        Promotion rule (:func:`should_promote`) on NDCG@k.
    C, random_state:
        Logistic regression (:func:`orchestrator.rescoring.train_rescorer`).

    Returns
    -------
    dict
        JSON-able: ``promoted``, ``reason``, ``current_version``, ``version`` (in use after the
        call), ``metric``, ``metrics`` (``current``/``candidate``), sizes and ``data_hash``.
    """
    model_dir = Path(model_dir)
    t_now = _epoch(now)
    groups, names, counts = ranking_groups(events, now=t_now, max_age_days=max_age_days)
    train, test = time_split(groups, holdout_fraction=holdout_fraction) if groups else ([], [])
    parent = current_version(model_dir)
    config = {"holdout_fraction": holdout_fraction, "k": k, "C": C, "random_state": random_state,
              "max_age_days": max_age_days}
    h = data_hash(groups, names, config)
    n_pos = int(sum(g.y.sum() for g in train))
    out: dict[str, Any] = {
        "promoted": False, "current_version": parent, "version": parent, "metric": f"ndcg@{k}",
        "metrics": {"current": None, "candidate": None}, "groups": len(groups),
        "train_groups": len(train), "holdout_groups": len(test),
        "holdout_informative": sum(g.informative for g in test), "train_positives": n_pos,
        "data_hash": h, **{k_: v for k_, v in counts.items() if v},
    }
    if n_pos < min_examples or not test:
        return {**out, "reason": f"not enough data: {n_pos} positive training rows "
                                 f"(need {min_examples}), {len(test)} held-out groups"}
    current = load_version(model_dir, parent)
    X = np.vstack([g.X for g in train])
    y = np.concatenate([g.y for g in train])
    try:
        candidate = train_rescorer(X, y, feature_names=names, C=C, random_state=random_state)
    except NotFittedError as exc:
        return {**out, "reason": f"cannot train: {exc}"}
    m_cur, m_cand = evaluate(current, test, names, k=k), evaluate(candidate, test, names, k=k)
    out["metrics"] = {"current": _num(m_cur), "candidate": _num(m_cand)}
    n_informative = out["holdout_informative"]
    if not should_promote(m_cur, m_cand, n_holdout=n_informative, min_holdout=min_holdout,
                          min_improvement=min_improvement):
        reason = ("candidate does not beat the current model on the held-out slice"
                  if n_informative >= min_holdout else
                  f"only {n_informative} informative held-out groups (need {min_holdout})")
        return {**out, "reason": reason}
    model_dir.mkdir(parents=True, exist_ok=True)
    # One promotion at a time per folder (two workers on the same data would otherwise both
    # write a version); the parent check then catches a promotion that happened meanwhile.
    with open(model_dir / ".promote.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if current_version(model_dir) != parent:
            return {**out, "version": current_version(model_dir),
                    "reason": "another model was promoted meanwhile; rerun to compare with it"}
        metas = _version_metadata(model_dir)
        if metas.get(parent, {}).get("data_hash") == h:
            return {**out, "reason": f"v{parent} was trained on the same data (same data hash)"}
        # A run that died between writing its file and moving the pointer left this version:
        # finish that promotion instead of writing a duplicate.
        orphan = max((v for v, m in metas.items() if v > parent and m.get("data_hash") == h
                      and m.get("parent_version") == parent), default=None)
        if orphan is not None:
            write_pointer(model_dir, orphan, path=f"rescorer.v{orphan}.json", parent_version=parent,
                          data_hash=h, metrics=out["metrics"], promoted_at=_iso(time.time()))
            return {**out, "promoted": True, "version": orphan,
                    "path": str(model_dir / f"rescorer.v{orphan}.json"),
                    "reason": f"completed the interrupted promotion of v{orphan}"}
        candidate.metadata.update({
            "parent_version": parent, "data_hash": h, "metric": f"ndcg@{k}",
            "metrics": out["metrics"], "config": config, "feature_layout": list(names),
            "train": {"groups": len(train), "rows": len(y), "positives": n_pos,
                      "from": _iso(train[0].ts), "to": _iso(train[-1].ts)},
            "holdout": {"groups": len(test), "informative": out["holdout_informative"],
                        "from": _iso(test[0].ts), "to": _iso(test[-1].ts)},
            "trained_at": _iso(t_now),
        })
        path = candidate.save(model_dir)
        version = int(candidate.metadata["version"])
        write_pointer(model_dir, version, path=path.name, parent_version=parent, data_hash=h,
                      metrics=out["metrics"], promoted_at=_iso(time.time()))
    logger.info("rescorer v%s promoted over v%s: ndcg@%d %.4f -> %.4f", version, parent, k,
                m_cur, m_cand)
    return {**out, "promoted": True, "version": version, "path": str(path),
            "reason": "candidate beats the current model on the held-out slice"}


def _num(x: float) -> float | None:
    return round(float(x), 6) if math.isfinite(x) else None


def retrain_ranker_from_es(es: Elasticsearch, *, events_alias: str, model_dir: Path | str,
                           now: float | _dt.datetime | None = None,
                           **kwargs: Any) -> dict[str, Any]:
    """:func:`retrain_ranker` over the events of ``events_alias`` (``now`` defaults to the
    current time; ``kwargs`` as :func:`retrain_ranker`). JSON-able result."""
    events = load_events(es, events_alias=events_alias)
    res = retrain_ranker(events, model_dir=model_dir, now=time.time() if now is None else now,
                         **kwargs)
    return {**res, "events": len(events)}


__all__ = [
    "RankingGroup", "Snapshot", "data_hash", "decay_weight", "evaluate", "event_time",
    "learner_for", "load_events", "merge_events", "ndcg_at_k", "ranking_groups",
    "rebuild_and_swap", "rebuild_posteriors", "retrain_ranker", "retrain_ranker_from_es",
    "should_promote", "snapshot_posteriors", "state_fields", "stream_id_key", "swap_posteriors",
    "time_split",
]
