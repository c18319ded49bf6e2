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
:func:`rebuild_posteriors` replays every logged impression as one observation per chosen arm
(that ran or failed), valued by the request's best outcome over its feedback events, with the
live path's own code: the impression's logged :class:`SelectionContext` (the featurizer's
output at serving time, read back with ``SelectionContext.from_dict`` exactly as
``Orchestrator.feedback`` does), :func:`orchestrator.rewards.outcome_rewards` and
:func:`~orchestrator.rewards.level_rewards` (the reward rules) and the learner's
``updates_for``, accumulated by :class:`InMemoryBanditStore`. The only difference is the weight:
each observation is multiplied by ``0.5 ** (age / half_life)`` (age of the impression at
``now``), so old behaviour fades (non-stationarity). Without decay the result equals what the
live path accumulated from the same events (search-time observation raised by each feedback:
the max is the same). Caveat: after a decayed rebuild, later feedback on an impression from
before the cut-off raises its observation with weight 1 (the live delta), not the decayed
weight; the next rebuild corrects it.

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
rows and display positions by :func:`orchestrator.rescoring.dataset_with_positions`), orders
them by impression time and holds out the newest ``holdout_fraction``. A candidate is trained
on the rest with the IPS-weighted pointwise logistic loss (each click weighs
``min(1 / theta_k, ips_cap)`` of its display position ``k``, ``theta`` the examination model
estimated from swap interventions, :mod:`orchestrator.examination`; see
:mod:`orchestrator.rescoring`), and both it and the current model rank every held-out group.

The metric is debiased too: the IPS-weighted nDCG@k (:func:`evaluate`), over the groups with
at least one positive and one negative item. A click at logged position ``k`` gains
``w = min(1 / theta_k, ips_cap)``; under the position-based model ``E[click / theta_k]`` is
the item's relevance, so ``sum_g DCG@k_g(w)`` estimates the summed DCG@k of the *relevant*
items, not of the items the current model happened to put where users look (Joachims et al.
2017; Agarwal et al. 2019, "Estimating position bias without intrusive interventions"). It is
reported as ``sum_g DCG@k_g / sum_g IDCG@k_g``, whose denominator does not depend on the model.
Without it (the plain nDCG of the clicks), the held-out clicks carry the current model's
position bias and favour it, and any candidate that copies its ordering. Bias left: weights
are capped (a position examined less than ``1 / ips_cap`` as often as the top counts as if it
were examined at that rate), and unexamined positions of the log are never evaluated.

The candidate is promoted (new ``rescorer.v<N>.json`` with metrics, parent version and data
hash in its metadata, then an atomic ``current`` pointer update) only when it beats the current
model by ``min_improvement`` on at least ``min_holdout`` groups. A data hash (of the data, the
configuration and the examination model) already recorded by a promoted version is not
promoted again.
"""

from __future__ import annotations

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
from .budgets import level_updates
from .decoding import paused_gc
from .errors import InvalidFeedbackError, NotFittedError, OrchestratorError, StateVersionError
from .examination import ExaminationModel
from .feedback import FeedbackLog
from .rescoring import (
    LinearRescorer,
    current_version,
    dataset_with_positions,
    ips_weights,
    load_version,
    train_rescorer,
    write_pointer,
)
from .rewards import EMPTY_ACTION, RewardModel, level_rewards, outcome_rewards, shown_item
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


#: Payload fields of an impression that the bandit rebuild and the examination estimate never
#: read: each shown item's ranking features and their names, about 70% of an impression's
#: bytes (~11 KB with 10 shown items). Leaving them in Elasticsearch (``_source`` excludes)
#: is what lets those jobs decode the log fast; the ranker's training reads them.
RANKING_FEATURES = ("shown.features", "feature_names")


def load_events(es: Elasticsearch, *, events_alias: str,
                types: Sequence[str] = ("impression", "feedback"),
                batch_size: int = 1000,
                exclude_payload: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Events of the Elasticsearch events alias, in the stream's shape (``{"type",
    "event_id", **payload}``), oldest first. A missing alias gives ``[]``.

    ``exclude_payload``: payload fields (dotted, relative to the payload, e.g.
    :data:`RANKING_FEATURES`) Elasticsearch leaves out of the returned events. A job lists
    what it does *not* read, so a field added later still reaches it."""
    if not es.indices.exists_alias(name=events_alias) and not es.indices.exists(index=events_alias):
        return []
    out = []
    source: Any = ["type", "event_id", "ts", "payload"]
    if exclude_payload:
        source = {"includes": source, "excludes": [f"payload.{f}" for f in exclude_payload]}
    body = {"query": {"terms": {"type": list(types)}}, "_source": source}
    with paused_gc():
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
    with paused_gc():
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

    One observation per logged impression per chosen arm that ran or failed, valued by the
    request's best outcome over its feedback events (:func:`orchestrator.rewards.outcome_rewards`
    with all of them; budget levels by :func:`~orchestrator.rewards.level_rewards`), weighted by
    ``0.5 ** (age of the impression / half_life)``: exactly what the live path accumulates
    (search-time observation raised by each feedback, see :mod:`orchestrator.rewards`), up to
    the decay. Impressions logged ``capped`` (the client was over its influence cap) or
    ``degraded`` observe nothing, as live. ``empty`` events of older versions are ignored (the
    impression itself is the observation now). Feedback whose item the impression did not
    show, or with an unknown action, is skipped (live refuses it).

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
        The live reward rules (``settings.feedback`` / ``settings.reward``).
    upto:
        Only events with stream ids <= ``upto`` (the swap's cut-off).

    Returns
    -------
    dict
        :func:`orchestrator.bandit_state.export_state` format (``schema_version``, ``dim``,
        ``linear``, ``beta``) plus ``meta``: counts (``observed`` impressions, ``applied``
        feedback events, ``empty`` observed impressions that showed nothing ...), cut-off,
        parameters and ``fingerprint`` (hash of the replayed log and the parameters).
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
    actions: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for fb in feedback:
        rid, item, action = str(fb["request_id"]), fb.get("item_id"), str(fb.get("action") or "")
        if action == EMPTY_ACTION:
            counts["legacy_empty"] += 1  # an older version's zero observation: now the impression's
            continue
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
            reward_model.check_action(action)
            shown_item(imp, item)
        except (InvalidFeedbackError, KeyError, TypeError):
            counts["skipped_invalid"] += 1
            continue
        actions[rid].append((str(item), action))
        counts["applied"] += 1
        digest.update(json.dumps([fb.get("event_id"), rid, item, action, event_time(fb)]).encode())
    for rid, imp in sorted(impressions.items(), key=lambda kv: _order(kv[1])):
        if imp.get("capped") or imp.get("degraded"):
            counts["not_observed"] += 1
            continue
        try:
            ctx = SelectionContext.from_dict(imp["selection"])
            w = decay_weight(t_now - event_time(imp), half_life_days=half_life_days)
            acts = actions.get(rid, [])
            rewards = outcome_rewards(imp, acts, reward_model, weight=w)
            updates = [*learner.updates_for(ctx, rewards),
                       *level_updates(ctx, level_rewards(imp, acts, reward_model, weight=w))]
        except (InvalidFeedbackError, KeyError, TypeError, ValueError):
            counts["skipped_invalid_impression"] += 1
            continue
        if not updates:
            continue
        if ctx.indices and max(ctx.indices) >= dim:
            counts["skipped_dim"] += 1  # logged under another hash_dim
            continue
        for u in updates:
            if isinstance(u, LinearUpdate):
                components.add(u.component)
            elif isinstance(u, BetaUpdate):
                template_ids.add(u.template_id)
        store.apply(updates)
        counts["observed"] += 1
        if not imp.get("shown"):
            counts["empty"] += 1
        digest.update(json.dumps([imp.get("event_id"), rid, event_time(imp)]).encode())
    digest.update(json.dumps([t_now, half_life_days, dim, policy,
                              reward_model.params()]).encode())
    state = export_state(store, components=sorted(components), template_ids=sorted(template_ids))
    state["meta"] = {
        "impressions": len(impressions), "feedback_events": len(feedback),
        "observed": counts["observed"], "not_observed": counts["not_observed"],
        "applied": counts["applied"], "empty": counts["empty"],
        "legacy_empty": counts["legacy_empty"], "duplicates": counts["duplicates"],
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
                     position_bias: Literal["log2", "examination", "none"] = "log2",
                     max_weight: float = 3.0, max_attempts: int = 5,
                     reward_model: RewardModel | None = None) -> dict[str, Any]:
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
    policy, hash_dim, position_bias:
        ``settings.bandit`` / ``settings.feedback`` values of the serving orchestrators.
    max_weight:
        Ignored (rewards carry their position correction in the value, capped by
        ``reward.max_reward``); kept for callers of the former signature.
    reward_model:
        The serving orchestrators' reward rules (:meth:`RewardModel.from_settings`); default:
        :class:`RewardModel` with ``position_bias``.

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
    reward_model = reward_model or RewardModel(position_bias=position_bias)
    keys = _stat_keys(store)
    for attempt in range(1, max_attempts + 1):
        base = snapshot_posteriors(store, keys=keys)
        if base.dim is not None and base.dim != dim:
            raise StateVersionError(f"bandit state under {prefix!r} has dim={base.dim}; "
                                    f"hash_dim={hash_dim} gives dim={dim}")
        with paused_gc():  # the whole log is live while it is replayed: orchestrator.decoding
            # Stream first, then Elasticsearch: see the module docstring.
            live = _stream_events(log, upto=base.upto) if base.upto else []
            events = merge_events(live, load_events(es, events_alias=events_alias,
                                                    exclude_payload=RANKING_FEATURES))
            t_now = now if now is not None else (
                stream_id_key(base.upto)[0] / 1000.0 if base.upto else time.time())
            state = rebuild_posteriors(events, now=t_now, half_life_days=half_life_days,
                                       dim=dim, policy=policy, reward_model=reward_model,
                                       upto=base.upto)
            n_events, n_live = len(events), len(live)
            del live, events  # freed by reference counting, before the collector resumes
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
                    "events": n_events, "stream_events": n_live,
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
    #: Display position of each row (1-based, swaps included); None: ``1..len(y)``.
    positions: np.ndarray | None = None

    @property
    def display_positions(self) -> np.ndarray:
        return (np.arange(1, len(self.y) + 1) if self.positions is None
                else np.asarray(self.positions, dtype=int))

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
        X, y, names, positions = dataset_with_positions([imp, *fbs])
        if not len(y):
            continue
        by_layout[names].append(RankingGroup(rid, ts, X, y, positions))
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
    """NDCG@k of ranking by ``scores`` (ties keep the given order, i.e. the display order):
    :func:`orchestrator.metrics.ndcg_of_scores`, the project's one nDCG (linear gain).

    >>> ndcg_at_k([0.9, 0.1], [1, 0]), ndcg_at_k([0.1, 0.9], [1, 0]) < 1
    (1.0, True)
    """
    from .metrics import ndcg_of_scores

    return ndcg_of_scores(scores, labels, k=k)


def evaluate(model: LinearRescorer, groups: Sequence[RankingGroup], names: Sequence[str], *,
             k: int = 10, examination: ExaminationModel | None = None,
             ips_cap: float = 1.0) -> float:
    """Held-out metric of ``model`` over the informative groups (NaN when there is none).

    Without ``examination``: the mean NDCG@k of the clicked items. With it: the IPS-weighted
    nDCG@k (module docstring): each click's gain is ``min(1 / theta_k, ips_cap)`` of the
    display position ``k`` it was logged at, and the metric is
    ``sum_g DCG@k_g / sum_g IDCG@k_g`` over the groups, a ratio whose numerator is the IPS
    estimate of the summed DCG@k of the relevant items (Joachims et al. 2017; Agarwal et al.
    2019) and whose denominator does not depend on the model."""
    if examination is None:
        vals = [ndcg_at_k(model.score(g.X, names), g.y, k=k) for g in groups if g.informative]
        return float(np.mean(vals)) if vals else float("nan")
    num = den = 0.0
    for g in groups:
        if not g.informative:
            continue
        gains = g.y * ips_weights(g.y, g.display_positions, examination, cap=ips_cap)
        ideal = np.sort(gains)[::-1][:k]
        idcg = float((ideal / np.log2(np.arange(2, len(ideal) + 2))).sum())
        num += ndcg_at_k(model.score(g.X, names), gains, k=k) * idcg
        den += idcg
    return num / den if den > 0 else float("nan")


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
                   C: float = 1.0, random_state: int = 0,
                   examination: ExaminationModel | None = None,
                   ips_cap: float = 10.0) -> dict[str, Any]:
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
    examination, ips_cap:
        Position-bias correction of the training weights and the held-out metric
        (:func:`orchestrator.rescoring.ips_weights`, :func:`evaluate`): each click weighs
        ``min(1 / theta_k, ips_cap)``; ``examination`` defaults to the prior
        ``1 / log2(k + 1)``; ``ips_cap=1`` turns the correction off.

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
    examination = examination or ExaminationModel.default()
    config = {"holdout_fraction": holdout_fraction, "k": k, "C": C, "random_state": random_state,
              "max_age_days": max_age_days, "ips_cap": ips_cap,
              "examination": [round(t, 6) for t in examination.theta[:50]]}
    h = data_hash(groups, names, config)
    n_pos = int(sum(g.y.sum() for g in train))
    out: dict[str, Any] = {
        "promoted": False, "current_version": parent, "version": parent,
        "metric": f"ips_ndcg@{k}",
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
    w = np.concatenate([ips_weights(g.y, g.display_positions, examination, cap=ips_cap)
                        for g in train])
    try:
        candidate = train_rescorer(X, y, feature_names=names, C=C, random_state=random_state,
                                   sample_weight=w)
    except NotFittedError as exc:
        return {**out, "reason": f"cannot train: {exc}"}
    ev = {"k": k, "examination": examination, "ips_cap": ips_cap}
    m_cur, m_cand = evaluate(current, test, names, **ev), evaluate(candidate, test, names, **ev)
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
            "parent_version": parent, "data_hash": h, "metric": f"ips_ndcg@{k}",
            "ips": {"cap": ips_cap, "examination_version": examination.meta.get("version"),
                    "examination_kind": examination.meta.get("kind"),
                    "mean_positive_weight": round(float(w[y > 0].mean()), 4)},
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
    logger.info("rescorer v%s promoted over v%s: ips_ndcg@%d %.4f -> %.4f", version, parent, k,
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
    with paused_gc():  # orchestrator.decoding; the fit allocates arrays, not containers
        events = load_events(es, events_alias=events_alias)
        res = retrain_ranker(events, model_dir=model_dir,
                             now=time.time() if now is None else now, **kwargs)
    return {**res, "events": len(events)}


__all__ = [
    "RankingGroup", "Snapshot", "data_hash", "decay_weight", "evaluate", "event_time",
    "learner_for", "load_events", "merge_events", "ndcg_at_k", "ranking_groups",
    "rebuild_and_swap", "rebuild_posteriors", "retrain_ranker", "retrain_ranker_from_es",
    "should_promote", "snapshot_posteriors", "state_fields", "stream_id_key", "swap_posteriors",
    "time_split",
]


# -- migration: re-featurize the log when the featurizer or the QU model changes -------------------
# KEYS: 1 meta hash, 2.. stat hashes. ARGV: 1 expected gen, 2 JSON list (one per stat key, in
# order) of {field: "value"} (mode 'replace': the key's new content, {} drops it) or
# {field: "delta"} (mode 'delta', as _SWAP_LUA), 3 cut-off stream id, 4 JSON summary, 5 dim,
# 6 featurizer version, 7 QU version ('' = none), 8 mode. The statistics and the versions
# that describe them change in one step: a reader never sees one without the other.
_MIGRATE_LUA = """
local gen = redis.call('HGET', KEYS[1], 'gen') or '0'
if gen ~= ARGV[1] then return {0, gen} end
local data = cjson.decode(ARGV[2])
for n, fields in ipairs(data) do
  local key = KEYS[1 + n]
  if ARGV[8] == 'replace' then
    redis.call('DEL', key)
    for f, v in pairs(fields) do redis.call('HSET', key, f, v) end
  else
    for f, d in pairs(fields) do redis.call('HINCRBYFLOAT', key, f, d) end
  end
end
local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
local g = redis.call('HINCRBY', KEYS[1], 'gen', 1)
redis.call('HSETNX', KEYS[1], 'schema_version', ARGV[9])
redis.call('HSET', KEYS[1], 'rebuilt_upto', ARGV[3], 'rebuild', ARGV[4], 'migrated', ARGV[4],
           'dim', ARGV[5], 'featurizer_version', ARGV[6], 'qu_version', ARGV[7])
return {1, g, v}
"""


def refeaturize_events(events: Iterable[Mapping[str, Any]], *, featurizer: Any,
                       understander: Any = None, qu_version: str | None = None,
                       keep_current: bool = True, batch_size: int = 256,
                       ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The events with every impression's ``selection`` rebuilt by ``featurizer``.

    Pure apart from parsing. An impression's context is recomputed from what it logged: the
    query (re-parsed with ``understander``, the current QU model: the log keeps a summary of
    the parse, not the intent probabilities and QU features the featurizer reads), the request
    context (``context``) and the memory hit count its old ``selection`` recorded. Feedback
    events are passed through unchanged.

    Parameters
    ----------
    events:
        Stream-shaped events (:func:`load_events`).
    featurizer:
        The current :class:`~orchestrator.featurizer.ContextFeaturizer`.
    understander:
        Anything with ``parse_many`` (a :class:`~orchestrator.understanding.QueryUnderstander`),
        or a zero-argument callable returning one (only called when an impression needs it),
        or ``None`` (contexts without QU).
    qu_version:
        Recorded in the new contexts; default: the understander's ``version``.
    keep_current:
        Keep the logged selection of impressions whose featurizer version, dim and QU version
        already are the current ones (it is what re-featurizing would give, and it keeps the
        exact request-time inputs).

    Returns
    -------
    (events, counts)
        ``counts``: ``refeaturized``, ``kept_current``, ``kept_no_query``, ``queries_parsed``.
    """
    from .featurizer import request_context

    events = [dict(ev) for ev in events]
    qu = understander
    if qu is not None and not hasattr(qu, "parse_many") and qu_version is None:
        qu = qu()  # a factory, but its version is needed to tell current contexts apart
    if qu_version is None and qu is not None and hasattr(qu, "parse_many"):
        qu_version = getattr(qu, "version", None)
    counts: Counter[str] = Counter()
    todo: list[dict[str, Any]] = []
    for ev in events:
        if ev.get("type") != "impression":
            continue
        query = ev.get("query")
        if not isinstance(query, str) or not query.strip():
            counts["kept_no_query"] += 1
            continue
        sel = ev.get("selection")
        if keep_current and isinstance(sel, Mapping) and (
                sel.get("featurizer_version") == featurizer.version
                and sel.get("dim") == featurizer.dim
                and (sel.get("qu_version") or None) == (qu_version or None)):
            counts["kept_current"] += 1
            continue
        todo.append(ev)
    if todo:
        if qu is not None and not hasattr(qu, "parse_many"):
            qu = qu()  # loaded only now that some impression needs it
        queries = sorted({str(ev["query"]) for ev in todo})
        parsed: dict[str, Any] = {}
        if qu is not None:
            parsed = dict(zip(queries, qu.parse_many(queries, batch_size=batch_size)))
            counts["queries_parsed"] = len(queries)
        for ev in todo:
            old = ev.get("selection") if isinstance(ev.get("selection"), Mapping) else {}
            pairs = old.get("memory_pairs")
            ctx = featurizer.transform(parsed.get(str(ev["query"])),
                                       request_context(ev.get("context")), str(ev["query"]),
                                       memory_pairs=int(pairs) if pairs is not None else None,
                                       qu_version=qu_version)
            ev["selection"] = ctx.to_dict()
            counts["refeaturized"] += 1
    return events, {k: counts[k] for k in ("refeaturized", "kept_current", "kept_no_query",
                                           "queries_parsed")}


def migrate_posteriors(es: Elasticsearch, redis: redis_lib.Redis, *, events_alias: str,
                       prefix: str, featurizer: Any, understander: Any = None,
                       qu_version: str | None = None, force: bool = False,
                       half_life_days: float | None = 14.0, now: float | _dt.datetime | None = None,
                       policy: Policy = "linear", position_bias: Literal["log2", "none"] = "log2",
                       max_weight: float = 3.0, max_attempts: int = 5,
                       reward_model: RewardModel | None = None) -> dict[str, Any]:
    """Rebuild the posteriors of ``prefix`` for the current featurizer and QU model, and
    record their versions in the meta (``dim``, ``featurizer_version``, ``qu_version``).

    Every logged impression whose context another featurizer, dimension or QU model produced
    is re-featurized (:func:`refeaturize_events`: its query re-parsed with the current QU
    model, its logged request context and memory count passed again), then the log is replayed
    with :func:`rebuild_posteriors` exactly as :func:`rebuild_and_swap` does (same cut-off
    snapshot, same ``gen`` check). The swap writes the statistics and the versions in one Lua
    script. When the dimension or the featurizer changed, the old statistics mean something
    else: every statistics key is *replaced* (observations counted between the snapshot and
    the swap are dropped; they are in the log and the next rebuild counts them). When only
    the QU model changed, the difference is *added* as in :func:`swap_posteriors`, so nothing
    is lost. Serving processes notice the new meta on their next read
    (:meth:`~orchestrator.bandit_state.RedisBanditStore.check_schema`).

    Parameters
    ----------
    featurizer:
        The serving processes' :class:`~orchestrator.featurizer.ContextFeaturizer` (same
        ``hash_dim`` and ``bucket_keys``).
    understander:
        The current QU model (``parse_many`` and ``version``), a zero-argument factory for it
        (loaded only when some impression needs re-parsing), or ``None``.
    qu_version:
        Overrides the understander's ``version``.
    force:
        Rebuild even when the meta already records the current versions.
    half_life_days, now, policy, position_bias, max_weight, max_attempts, reward_model:
        As :func:`rebuild_and_swap`.

    Returns
    -------
    dict
        JSON-able: ``migrated`` (False: nothing to do, or ``swapped`` False), ``mode``
        (``replace`` / ``delta``), ``before`` / ``after`` versions, re-featurization counts and
        the rebuild counts.
    """
    dim = featurizer.dim
    store = RedisBanditStore(redis, prefix=prefix, dim=dim)
    before = store.state_versions()
    if qu_version is None and understander is not None:
        if not hasattr(understander, "parse_many"):
            understander = understander()  # its version decides whether anything changed
        qu_version = getattr(understander, "version", None)
    after = {"dim": dim, "featurizer_version": featurizer.version, "qu_version": qu_version}
    if before == after and not force:
        return {"migrated": False, "reason": "the state already records these versions",
                "before": before, "after": after}
    mode = ("replace" if before["dim"] != dim or before["featurizer_version"] != featurizer.version
            else "delta")
    log = FeedbackLog(redis, store=store)
    reward_model = reward_model or RewardModel(position_bias=position_bias)
    keys = _stat_keys(store)
    for attempt in range(1, max_attempts + 1):
        base = snapshot_posteriors(store, keys=keys)
        live = _stream_events(log, upto=base.upto) if base.upto else []
        events = merge_events(live, load_events(es, events_alias=events_alias))
        events, refeat = refeaturize_events(events, featurizer=featurizer,
                                            understander=understander, qu_version=qu_version)
        t_now = now if now is not None else (
            stream_id_key(base.upto)[0] / 1000.0 if base.upto else time.time())
        state = rebuild_posteriors(events, now=t_now, half_life_days=half_life_days, dim=dim,
                                   policy=policy, reward_model=reward_model, upto=base.upto)
        target = state_fields(state)
        missing = sorted(set(target) - set(base.fields))
        if missing:
            keys = sorted(set(keys) | set(missing))
            continue
        all_keys = sorted(set(target) | set(base.fields))
        payload: list[dict[str, str]] = []
        for k in all_keys:
            new = target.get(k, {})
            if mode == "replace":
                payload.append({f: repr(v) for f, v in sorted(new.items())})
            else:
                old = base.fields.get(k, {})
                delta = {f: new.get(f, 0.0) - old.get(f, 0.0) for f in set(new) | set(old)}
                payload.append({f: repr(d) for f, d in sorted(delta.items()) if d != 0.0})
        meta = state["meta"]
        summary = json.dumps({**{k: v for k, v in meta.items()
                                 if k in ("upto", "now", "half_life_days", "policy", "applied",
                                          "fingerprint")},
                              "mode": mode, "from": before, "swapped_at": _iso(time.time())},
                             separators=(",", ":"))
        script = redis.register_script(_MIGRATE_LUA)
        try:
            res = script(keys=[store.meta_key, *(store.key("bandit", k) for k in all_keys)],
                         args=[base.gen, json.dumps(payload, separators=(",", ":")),
                               base.upto or "", summary, dim, featurizer.version,
                               qu_version or "", mode, SCHEMA_VERSION])
        except (redis_lib.ConnectionError, redis_lib.TimeoutError) as exc:
            raise store._unavailable(exc) from exc
        if int(res[0]) != 1:
            keys = _stat_keys(store)
            continue
        logger.info("bandit posteriors of %r migrated (%s) from %s to %s: %d impressions "
                    "re-featurized, %d feedback replayed (v%s)", prefix, mode, before, after,
                    refeat["refeaturized"], meta["applied"], int(res[2]))
        return {"migrated": True, "swapped": True, "mode": mode, "before": before,
                "after": after, "attempts": attempt, "upto": base.upto,
                "version": int(res[2]), "gen": _s(res[1]), "keys": len(all_keys),
                "events": len(events), "stream_events": len(live), **refeat,
                **{k: meta[k] for k in ("impressions", "applied", "empty", "duplicates",
                                        "skipped_no_impression", "skipped_invalid",
                                        "skipped_dim", "now", "half_life_days", "fingerprint")}}
    raise OrchestratorError(f"bandit migration of {prefix!r} lost the swap race {max_attempts} times")


__all__ += ["migrate_posteriors", "refeaturize_events"]
