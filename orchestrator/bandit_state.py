"""Learned bandit state: additive sufficient statistics, shared by every orchestrator process.

Consumes stat updates from :mod:`orchestrator.selection` (built from per-arm rewards of
:mod:`orchestrator.rewards`), produces the statistics the selectors turn into posteriors.

Why sufficient statistics: the Bayesian linear model's posterior is a function of
``A = sum w x x^T`` and ``b = sum w r x``, and the Beta-Bernoulli posterior of ``sum w r`` and
``sum w (1 - r)``. Those are *sums*, so an update is a handful of ``HINCRBYFLOAT`` s: commutative,
atomic per field, and safe when several processes update the same arm at once (no
read-modify-write, no lost updates). One Lua script applies a feedback event as a unit:
the duplicate check, every statistic, the version counter and the event-log entry, so a
retried or concurrent duplicate is counted exactly once. Redis runs with AOF, so a restart
loses nothing.

Redis key layout (``P`` is ``settings.redis.key_prefix``, e.g. ``ltrr:``)::

    P bandit:meta                 hash  schema_version, dim, featurizer_version, qu_version
                                        (what built the contexts, see check_schema),
                                        version (bumped per update),
                                        gen, rebuilt_upto, rebuild (last log rebuild swapped
                                        in, see :mod:`orchestrator.training`), migrated,
                                        rev:<stat key> (bumped when an update changes that
                                        hash: readers reload only what changed, see
                                        RedisBanditStore.revisions)
    P bandit:lin:<component>      hash  n, w, b:<i>, A:<i>:<j> (i <= j; upper triangle)
    P bandit:beta:<template_id>   hash  <bucket>:a, <bucket>:b, <bucket>:n
    P bandit:beta:budget:<tid>    hash  the same per budget level: l<level>|intent=<x> and
                                        l<level>|* buckets (orchestrator.budgets)
    P arms:impressions            hash  <template_id> -> times chosen and executed
    P imp:<request_id>            str   impression JSON (TTL)          -- feedback.py
    P fb:<request_id>             set   "<item>\\x1f<action>" counted (TTL) -- feedback.py
    P out:<request_id>            hash  <field group> -> reward applied for the request (TTL;
                                        the one-observation max rule, see STATS_LUA)
    P events                      stream impression / feedback events  -- feedback.py

A component is ``arm:<template_id>`` (the arm's own model) or ``af:<key>=<value>`` (a model
shared by all arms with that action feature), see :mod:`orchestrator.selection`.

Snapshots (:func:`export_state` / :func:`import_state`) are versioned JSON, never pickle.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, Protocol

import numpy as np
import orjson
import redis

from .errors import ServiceUnavailableError, StateVersionError
from .redis_client import Breaker, guarded_read

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
Compat = Literal["current", "stale", "incompatible"]


@dataclass(frozen=True, slots=True)
class LinearUpdate:
    """Add ``weight * x x^T`` to A and ``weight * reward * x`` to b of one component.

    ``indices`` must be strictly increasing (the upper triangle is stored)."""

    component: str
    indices: tuple[int, ...]
    values: tuple[float, ...]
    reward: float
    weight: float
    #: Field group of the one-observation-per-request rule (see :meth:`RedisBanditStore.apply`
    #: with ``outcome``); ignored without an outcome key (plain additive update).
    group: str = ""


@dataclass(frozen=True, slots=True)
class BetaUpdate:
    """Add ``weight * reward`` successes and ``weight * (1 - reward)`` failures to a bucket."""

    template_id: str
    bucket: str
    reward: float
    weight: float
    group: str = ""


StatUpdate = LinearUpdate | BetaUpdate


def update_to_dict(update: StatUpdate) -> dict[str, Any]:
    """JSON-able form of one update (the feedback spool of :mod:`orchestrator.resilience`)."""
    if isinstance(update, LinearUpdate):
        out = {"t": "lin", "c": update.component, "i": list(update.indices),
               "v": list(update.values), "r": update.reward, "w": update.weight}
    else:
        out = {"t": "beta", "c": update.template_id, "f": update.bucket, "r": update.reward,
               "w": update.weight}
    if update.group:
        out["g"] = update.group
    return out


def update_from_dict(data: dict[str, Any]) -> StatUpdate:
    """Inverse of :func:`update_to_dict`."""
    if data["t"] == "lin":
        return LinearUpdate(data["c"], tuple(int(i) for i in data["i"]),
                            tuple(float(v) for v in data["v"]), float(data["r"]), float(data["w"]),
                            str(data.get("g", "")))
    return BetaUpdate(data["c"], data["f"], float(data["r"]), float(data["w"]),
                      str(data.get("g", "")))


@dataclass(slots=True)
class LinearStats:
    """Sufficient statistics of one component (dense; ``dim`` x ``dim``)."""

    n: float
    w: float
    A: np.ndarray
    b: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> LinearStats:
        return cls(0.0, 0.0, np.zeros((dim, dim)), np.zeros(dim))


@dataclass(slots=True)
class BetaStats:
    """``{bucket: [successes, failures, n]}`` of one arm."""

    buckets: dict[str, list[float]] = field(default_factory=dict)


class BanditStore(Protocol):
    """Where sufficient statistics live. ``apply`` is atomic: all updates (plus the optional
    duplicate marker and event) or none; returns False when ``dedupe`` says already counted.
    With ``outcome=(key, ttl)`` updates that carry a ``group`` follow the one-observation max
    rule of :mod:`orchestrator.rewards` against the outcome hash ``key``."""

    dim: int

    def apply(self, updates: Sequence[StatUpdate], *, dedupe: tuple[str, str, int] | None = None,
              event: dict[str, Any] | None = None,
              outcome: tuple[str, int] | None = None) -> bool: ...

    def version(self) -> int: ...

    def revisions(self, components: Sequence[str]) -> tuple[str, list[int]]:
        """``(generation, revision of each component's linear statistics)``: a component
        whose revision and generation are unchanged has unchanged statistics."""
        ...

    def load_linear(self, components: Sequence[str]) -> dict[str, LinearStats]: ...

    def load_beta(self, template_ids: Sequence[str]) -> dict[str, BetaStats]: ...


def _dedupe_indices(indices: Sequence[int], values: Sequence[float]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    acc: dict[int, float] = defaultdict(float)
    for i, v in zip(indices, values):
        acc[int(i)] += float(v)
    items = sorted(acc.items())
    return tuple(i for i, _ in items), tuple(v for _, v in items)


class InMemoryBanditStore:
    """Process-local store with the same semantics (unit tests, offline replays)."""

    def __init__(self, *, dim: int) -> None:
        self.dim = dim
        self._lock = threading.Lock()
        self._lin: dict[str, LinearStats] = {}
        self._beta: dict[str, BetaStats] = {}
        self._seen: set[tuple[str, str]] = set()
        self._version = 0
        self._revs: dict[str, int] = defaultdict(int)
        self.events: list[dict[str, Any]] = []
        #: ``{outcome key: {group: reward applied}}`` (the ``P out:<request_id>`` hashes).
        self.outcomes: dict[str, dict[str, float]] = {}

    def apply(self, updates: Sequence[StatUpdate], *, dedupe: tuple[str, str, int] | None = None,
              event: dict[str, Any] | None = None,
              outcome: tuple[str, int] | None = None) -> bool:
        with self._lock:
            if dedupe is not None:
                marker = (dedupe[0], dedupe[1])
                if marker in self._seen:
                    return False
                self._seen.add(marker)
            applied = self.outcomes.setdefault(outcome[0], {}) if outcome is not None else None
            for u in updates:
                delta = None  # None: a full observation; else only the reward difference
                if applied is not None and u.group:
                    old = applied.get(u.group)
                    if old is not None:
                        if not u.reward > old:
                            continue
                        delta = u.reward - old
                    applied[u.group] = u.reward
                if isinstance(u, LinearUpdate):
                    self._revs[u.component] += 1
                    st = self._lin.setdefault(u.component, LinearStats.empty(self.dim))
                    idx = np.asarray(u.indices, dtype=np.intp)
                    x = np.asarray(u.values)
                    if delta is None:
                        st.n += 1
                        st.w += u.weight
                        st.A[np.ix_(idx, idx)] += u.weight * np.outer(x, x)
                        st.b[idx] += u.weight * u.reward * x
                    else:
                        st.b[idx] += u.weight * delta * x
                else:
                    bs = self._beta.setdefault(u.template_id, BetaStats())
                    cell = bs.buckets.setdefault(u.bucket, [0.0, 0.0, 0.0])
                    if delta is None:
                        cell[0] += u.weight * u.reward
                        cell[1] += u.weight * (1.0 - u.reward)
                        cell[2] += 1
                    else:
                        cell[0] += u.weight * delta
                        cell[1] -= u.weight * delta
            self._version += 1
            if event is not None:
                self.events.append(event)
            return True

    def version(self) -> int:
        return self._version

    def revisions(self, components: Sequence[str]) -> tuple[str, list[int]]:
        with self._lock:
            return "0", [self._revs.get(c, 0) for c in components]

    def load_linear(self, components: Sequence[str]) -> dict[str, LinearStats]:
        with self._lock:
            out = {}
            for c in components:
                st = self._lin.get(c)
                out[c] = (LinearStats(st.n, st.w, st.A.copy(), st.b.copy()) if st is not None
                          else LinearStats.empty(self.dim))
            return out

    def load_beta(self, template_ids: Sequence[str]) -> dict[str, BetaStats]:
        with self._lock:
            return {t: BetaStats({k: list(v) for k, v in self._beta.get(t, BetaStats()).buckets.items()})
                    for t in template_ids}


#: Lua function shared by every script that writes statistics (the feedback apply below and
#: the impression write of :mod:`orchestrator.feedback`). ``apply_stats(ups, first, out_key,
#: out_ttl, meta_key)`` adds the decoded updates ``ups`` to the stat hashes ``KEYS[first]...``
#: (one per update, in order) and bumps ``rev:<stat key>`` in ``meta_key`` for each it
#: changes. With an ``out_key`` (the request's ``P out:<request_id>`` hash) an update carrying
#: a group ``g`` follows the one-observation max rule of :mod:`orchestrator.rewards`:
#: group absent -> full observation and ``g`` -> r stored; ``r > stored`` -> only the reward
#: sums move by ``w (r - stored)`` (Beta: ``a += w d``, ``b -= w d``) and r is stored; else
#: nothing. Rewards are stored with ``%.17g`` so a replayed r compares equal to itself
#: (idempotent). Returns how many updates changed something.
STATS_LUA = """
local function apply_stats(ups, first, out_key, out_ttl, meta_key)
  local changed = 0
  local touched = false
  for n, u in ipairs(ups) do
    local key = KEYS[first + n - 1]
    local w = tonumber(u.w)
    local r = tonumber(u.r)
    local full = true
    local go = true
    local d = r
    if out_key and u.g then
      local old = redis.call('HGET', out_key, u.g)
      if old then
        old = tonumber(old)
        if r > old then
          full = false
          d = r - old
        else
          go = false
        end
      end
      if go then
        redis.call('HSET', out_key, u.g, string.format('%.17g', r))
        touched = true
      end
    end
    if go then
      changed = changed + 1
      redis.call('HINCRBY', meta_key, 'rev:' .. key, 1)
      if u.t == 'lin' then
        local idx = u.i
        local val = u.v
        if full then
          redis.call('HINCRBYFLOAT', key, 'n', 1)
          redis.call('HINCRBYFLOAT', key, 'w', w)
        end
        for a = 1, #idx do
          local xa = val[a]
          if d ~= 0 then
            redis.call('HINCRBYFLOAT', key, 'b:' .. idx[a], w * d * xa)
          end
          if full then
            for c = a, #idx do
              redis.call('HINCRBYFLOAT', key, 'A:' .. idx[a] .. ':' .. idx[c], w * xa * val[c])
            end
          end
        end
      elseif full then
        redis.call('HINCRBYFLOAT', key, u.f .. ':a', w * r)
        redis.call('HINCRBYFLOAT', key, u.f .. ':b', w * (1 - r))
        redis.call('HINCRBYFLOAT', key, u.f .. ':n', 1)
      else
        redis.call('HINCRBYFLOAT', key, u.f .. ':a', w * d)
        redis.call('HINCRBYFLOAT', key, u.f .. ':b', -w * d)
      end
    end
  end
  if touched then redis.call('EXPIRE', out_key, out_ttl) end
  return changed
end
"""

# KEYS: 1 dedupe set, 2 meta hash, 3 events stream, 4 outcome hash, 5.. one stat key per
# update (in order). ARGV: 1 dedupe member ('' = none), 2 ttl s, 3 updates JSON, 4 event JSON
# ('' = none), 5 stream maxlen, 6 outcome ttl s ('' = no outcome rule: additive updates).
_APPLY_LUA = STATS_LUA + """
if ARGV[1] ~= '' then
  if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
end
local out_key = nil
if ARGV[6] ~= '' then out_key = KEYS[4] end
apply_stats(cjson.decode(ARGV[3]), 5, out_key, tonumber(ARGV[6]), KEYS[2])
redis.call('HINCRBY', KEYS[2], 'version', 1)
if ARGV[4] ~= '' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'type', 'feedback', 'data', ARGV[4])
end
return 1
"""


class RedisBanditStore:
    """Sufficient statistics in Redis (see the module docstring for the key layout).

    Parameters
    ----------
    client:
        Redis client (``redis_client.build_redis``).
    prefix:
        Key prefix (``settings.redis.key_prefix``).
    dim:
        Context vector dimension; recorded in ``bandit:meta`` and checked on start, because
        statistics of another dimension cannot be read.
    featurizer_version, qu_version:
        What produces this process's contexts (``ContextFeaturizer.version`` and the QU model
        version, or a callable returning it: the QU model is hot-reloaded). Recorded with
        ``dim`` when the state is created, compared on start and whenever the statistics are
        read (see :meth:`check_schema`); ``featurizer_version=None`` compares ``dim`` only.
    stream_maxlen:
        Approximate cap of the ``events`` stream.
    url:
        Shown in :class:`ServiceUnavailableError` messages.
    breaker:
        The serving process's Redis breaker (the durable writer's): while it is open the
        reads of the statistics fail at once (the selectors then serve cached posteriors)
        instead of each waiting for the socket time-out of a hung Redis
        (:func:`orchestrator.redis_client.guarded_read`). None: plain reads.
    """

    def __init__(self, client: redis.Redis, *, prefix: str, dim: int,
                 stream_maxlen: int = 200_000, url: str = "redis",
                 featurizer_version: str | None = None,
                 qu_version: str | Callable[[], str | None] | None = None,
                 breaker: Breaker | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.dim = dim
        self.stream_maxlen = stream_maxlen
        self.url = url
        self.featurizer_version = featurizer_version
        self.qu_version = qu_version
        self.breaker = breaker
        self._script = client.register_script(_APPLY_LUA)
        self._checked = False
        #: ``current`` | ``stale`` (same dim, other versions: the old statistics serve) |
        #: ``incompatible`` (other dim: priors serve, observations are logged, not counted).
        self.compat: Compat = "current"
        self._warned: tuple[Any, ...] | None = None

    # -- keys ------------------------------------------------------------------------------
    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @property
    def meta_key(self) -> str:
        return self.key("bandit", "meta")

    @property
    def events_key(self) -> str:
        return self.prefix + "events"

    def _unavailable(self, exc: Exception) -> ServiceUnavailableError:
        return ServiceUnavailableError("Redis", self.url)

    def expected_qu_version(self) -> str | None:
        """The QU model version of this process right now."""
        v = self.qu_version() if callable(self.qu_version) else self.qu_version
        return str(v) if v else None

    def state_versions(self) -> dict[str, Any]:
        """``dim``, ``featurizer_version`` and ``qu_version`` recorded in ``bandit:meta``
        (``None`` when absent; a state created before versioning reads as featurizer
        ``"1"``)."""
        try:
            raw = guarded_read(self.breaker, lambda: self.client.hmget(
                self.meta_key, ["dim", "featurizer_version", "qu_version"]))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        return _meta_versions(raw)

    def check_schema(self) -> Compat:
        """Record (first start) or verify the schema version, dimension and versions.

        On first start (no ``dim`` in the meta) the schema version, ``dim``,
        ``featurizer_version`` and ``qu_version`` are recorded atomically. Then:

        - another ``schema_version``: :class:`StateVersionError`;
        - another ``dim``: ``"incompatible"`` -- the statistics cannot be read: selectors get
          priors (empty statistics) and observations are logged (events, duplicate markers) but
          not counted, with a warning, until ``ltrr migrate-posteriors``
          (:func:`orchestrator.training.migrate_posteriors`) rebuilds the state;
        - same ``dim``, another featurizer or QU version: ``"stale"`` -- the old statistics
          keep serving, with a warning, until the migration;
        - else ``"current"``.

        Returns
        -------
        str
            The compatibility, also kept in :attr:`compat` (re-assessed on every read of the
            statistics, so a migration or a QU promotion is noticed without a restart).
        """
        try:
            raw = self.client.register_script(_INIT_META_LUA)(
                keys=[self.meta_key],
                args=[SCHEMA_VERSION, self.dim, self.featurizer_version or "",
                      self.expected_qu_version() or ""])
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        sv = int(raw[0])
        if sv != SCHEMA_VERSION:
            raise StateVersionError(
                f"bandit state under {self.prefix!r} has schema_version {sv}; this code reads "
                f"{SCHEMA_VERSION}. Export it with an older version or use a new key_prefix."
            )
        self._checked = True
        return self._assess(_meta_versions(raw[1:]))

    def _assess(self, meta: dict[str, Any]) -> Compat:
        if meta["dim"] is None:  # never checked: nothing recorded to differ from
            self.compat = "current"
            return self.compat
        mine = {"dim": self.dim, "featurizer_version": self.featurizer_version,
                "qu_version": self.expected_qu_version()}
        if meta["dim"] != self.dim:
            self.compat = "incompatible"
        elif self.featurizer_version is not None and (
                meta["featurizer_version"] != mine["featurizer_version"]
                or meta["qu_version"] != mine["qu_version"]):
            self.compat = "stale"
        else:
            self.compat = "current"
        seen = (self.compat, tuple(sorted(meta.items())), tuple(sorted(mine.items())))
        if self.compat != "current" and seen != self._warned:
            logger.warning(
                "bandit state under %r was built with %s, this process uses %s: %s until "
                "`ltrr migrate-posteriors` runs", self.prefix, meta, mine,
                "serving from the old statistics" if self.compat == "stale"
                else "serving from priors and not counting observations (the old statistics "
                     "have another dimension)")
        self._warned = seen if self.compat != "current" else None
        return self.compat

    def refresh_compat(self) -> Compat:
        """Re-assess :attr:`compat` against the meta (one ``HMGET``)."""
        return self._assess(self.state_versions())

    # -- writes ----------------------------------------------------------------------------
    def outcome_key(self, request_id: str) -> str:
        """``P out:<request_id>``: rewards already applied for a request (the max rule)."""
        return f"{self.prefix}out:{request_id}"

    def stat_payload(self, updates: Sequence[StatUpdate]) -> tuple[list[str], str]:
        """The stat keys (one per update, in order) and the updates JSON that
        :data:`STATS_LUA`'s ``apply_stats`` reads."""
        if self.compat == "incompatible":  # another dim: log and mark, count nothing
            updates = ()
        keys: list[str] = []
        payload: list[dict[str, Any]] = []
        for u in updates:
            if isinstance(u, LinearUpdate):
                keys.append(self.key("bandit", "lin", u.component))
                row: dict[str, Any] = {"t": "lin", "i": list(u.indices), "v": list(u.values),
                                       "r": u.reward, "w": u.weight}
            else:
                keys.append(self.key("bandit", "beta", u.template_id))
                row = {"t": "beta", "f": u.bucket, "r": u.reward, "w": u.weight}
            if u.group:
                row["g"] = u.group
            payload.append(row)
        return keys, json.dumps(payload)

    def apply(self, updates: Sequence[StatUpdate], *, dedupe: tuple[str, str, int] | None = None,
              event: dict[str, Any] | None = None,
              outcome: tuple[str, int] | None = None) -> bool:
        """Apply ``updates`` atomically with the optional duplicate marker and event (one Lua
        script); with ``outcome=(key, ttl)`` grouped updates follow the max rule (see
        :data:`STATS_LUA`). False: the duplicate marker was already there."""
        stat_keys, payload = self.stat_payload(updates)
        keys = [dedupe[0] if dedupe else self.key("fb", "_none"), self.meta_key, self.events_key,
                outcome[0] if outcome else self.key("out", "_none"), *stat_keys]
        args = [dedupe[1] if dedupe else "", dedupe[2] if dedupe else 0, payload,
                json.dumps(event, separators=(",", ":")) if event is not None else "",
                self.stream_maxlen, int(outcome[1]) if outcome else ""]
        try:
            return bool(self._script(keys=keys, args=args))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc) from exc

    def incr_impressions(self, template_ids: Iterable[str], pipe: Any) -> None:
        for t in template_ids:
            pipe.hincrby(self.key("arms", "impressions"), t, 1)

    # -- reads -----------------------------------------------------------------------------
    def version(self) -> int:
        try:
            v = guarded_read(self.breaker, lambda: self.client.hget(self.meta_key, "version"))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        return int(v or 0)

    def revisions(self, components: Sequence[str]) -> tuple[str, list[int]]:
        """The meta's ``gen`` (a log rebuild or a migration bumps it) and ``rev:<stat key>``
        of each component's linear statistics (every update that changes the hash bumps it,
        in the same script), in one ``HMGET``: a selector reloads only the components whose
        revision, or the generation, changed."""
        fields = ["gen", *(f"rev:{self.key('bandit', 'lin', c)}" for c in components)]
        try:
            raw = guarded_read(self.breaker, lambda: self.client.hmget(self.meta_key, fields))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        gen = raw[0].decode() if isinstance(raw[0], bytes) else str(raw[0] or "0")
        return gen, [int(x or 0) for x in raw[1:]]

    def _hgetall_many(self, keys: Sequence[str]) -> list[dict[Any, Any]]:
        """``HGETALL`` of each key in one round trip (no transaction needed: reads only)."""
        def read() -> list[dict[Any, Any]]:
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.hgetall(k)
            return list(pipe.execute())

        try:
            return guarded_read(self.breaker, read)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc) from exc

    def load_linear(self, components: Sequence[str]) -> dict[str, LinearStats]:
        if self._checked and self.refresh_compat() == "incompatible":
            return {c: LinearStats.empty(self.dim) for c in components}  # priors
        raw = self._hgetall_many([self.key("bandit", "lin", c) for c in components])
        return {c: _parse_linear(h, self.dim) for c, h in zip(components, raw)}

    def load_beta(self, template_ids: Sequence[str]) -> dict[str, BetaStats]:
        if self._checked and self.refresh_compat() == "incompatible":
            return {t: BetaStats() for t in template_ids}  # priors
        raw = self._hgetall_many([self.key("bandit", "beta", t) for t in template_ids])
        out: dict[str, BetaStats] = {}
        for t, h in zip(template_ids, raw):
            bs = BetaStats()
            for k, v in h.items():
                k = k.decode() if isinstance(k, bytes) else k
                bucket, _, what = k.rpartition(":")
                cell = bs.buckets.setdefault(bucket, [0.0, 0.0, 0.0])
                cell["abn".index(what)] = float(v)
            out[t] = bs
        return out

    def impressions(self) -> dict[str, int]:
        try:
            raw = self.client.hgetall(self.key("arms", "impressions"))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}

    def components(self) -> list[str]:
        """Every component that has statistics (for snapshots)."""
        base = self.key("bandit", "lin", "")
        try:
            return sorted(k.decode()[len(base):] if isinstance(k, bytes) else k[len(base):]
                          for k in self.client.scan_iter(match=base + "*", count=500))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc) from exc


@lru_cache(maxsize=8)
def _linear_layout(dim: int) -> dict[Any, int]:
    """Field name (bytes and str) -> flat index of a linear stat hash of ``dim``: ``A:i:j``
    (i <= j) at ``i * dim + j``, ``b:i`` at ``dim * dim + i``, then ``n`` and ``w``."""
    names: dict[str, int] = {}
    for i in range(dim):
        for j in range(i, dim):
            names[f"A:{i}:{j}"] = i * dim + j
        names[f"b:{i}"] = dim * dim + i
    names["n"], names["w"] = dim * dim + dim, dim * dim + dim + 1
    return {**names, **{k.encode(): v for k, v in names.items()}}


@lru_cache(maxsize=256)
def _field_index(names: bytes | str, dim: int) -> np.ndarray:
    """:func:`_field_indices` of a stat hash's field names joined by ``"\\x00"``, cached: a
    component's hash keeps its field order while it gains no new field, so a refresh looks
    its thousands of names up once. The cache holds 256 field orders; a full one at ``dim``
    119 is about 120 KB (the joined names and the index array), so up to about 30 MB."""
    idx = _field_indices(names.split(b"\x00" if isinstance(names, bytes) else "\x00"), dim)
    idx.setflags(write=False)
    return idx


def _field_indices(names: Sequence[Any], dim: int) -> np.ndarray:
    """Flat indices of field ``names`` in :func:`_linear_layout` (``-1`` outside it)."""
    layout = _linear_layout(dim)
    return np.fromiter((layout.get(k, -1) for k in names), np.intp, len(names))


def _floats(values: list[Any]) -> np.ndarray:
    """The hash's values (decimal strings, as ``HINCRBYFLOAT`` and ``HSET`` store them) as
    floats: one orjson parse of them as a JSON array (5x faster than ``float`` per value),
    ``float`` per value for what JSON does not read (``inf``, ``nan``)."""
    try:
        if isinstance(values[0], bytes):
            return np.asarray(orjson.loads(b"[" + b",".join(values) + b"]"), dtype=float)
        return np.asarray(orjson.loads("[" + ",".join(values) + "]"), dtype=float)
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return np.fromiter(map(float, values), float, len(values))


def _parse_linear(h: dict[Any, Any], dim: int) -> LinearStats:
    """A ``bandit:lin:<component>`` hash as statistics, vectorised: a refresh reads
    ``dim (dim + 1) / 2 + dim + 2`` fields per component (7,261 at ``dim`` = 119), and
    parsing them one by one was most of a refresh's cost. Fields outside the layout are
    ignored."""
    flat = np.zeros(dim * dim + dim + 2)
    if h:
        keys = list(h)
        sep = b"\x00" if isinstance(keys[0], bytes) else "\x00"
        try:
            idx = _field_index(sep.join(keys), dim)
        except TypeError:  # names of mixed types
            idx = None
        if idx is None or len(idx) != len(keys):  # ... or a name holding the separator
            idx = _field_indices(keys, dim)
        vals = _floats(list(h.values()))
        keep = idx >= 0
        if not keep.all():
            idx, vals = idx[keep], vals[keep]
        flat[idx] = vals
    upper = flat[:dim * dim].reshape(dim, dim)
    A = upper + upper.T
    A[np.diag_indices(dim)] = np.diag(upper)
    return LinearStats(n=float(flat[-2]), w=float(flat[-1]), A=A,
                       b=flat[dim * dim:dim * dim + dim].copy())


#: See :meth:`RedisBanditStore.check_schema`. KEYS: 1 meta hash. ARGV: schema version, dim,
#: featurizer version, QU version ('' = none). Returns HMGET schema_version, dim,
#: featurizer_version, qu_version.
_INIT_META_LUA = """
redis.call('HSETNX', KEYS[1], 'schema_version', ARGV[1])
if redis.call('HEXISTS', KEYS[1], 'dim') == 0 then
  redis.call('HSET', KEYS[1], 'dim', ARGV[2])
  if ARGV[3] ~= '' then
    redis.call('HSET', KEYS[1], 'featurizer_version', ARGV[3], 'qu_version', ARGV[4])
  end
end
return redis.call('HMGET', KEYS[1], 'schema_version', 'dim', 'featurizer_version', 'qu_version')
"""

#: What a state created before versioning was built with.
LEGACY_FEATURIZER_VERSION = "1"


def _meta_versions(raw: Sequence[Any]) -> dict[str, Any]:
    """``[dim, featurizer_version, qu_version]`` as read from the meta hash."""
    dim, fv, qv = (None if x is None else (x.decode() if isinstance(x, bytes) else str(x))
                   for x in raw)
    return {"dim": int(dim) if dim else None,
            "featurizer_version": (fv or LEGACY_FEATURIZER_VERSION) if dim else fv or None,
            "qu_version": qv or None}


def export_state(store: BanditStore, *, components: Sequence[str], template_ids: Sequence[str],
                 library_version: str = "0.1.0") -> dict[str, Any]:
    """A versioned JSON-able snapshot of the statistics (backups, moving between clusters)."""
    lin = store.load_linear(components)
    beta = store.load_beta(template_ids)
    return {
        "schema_version": SCHEMA_VERSION,
        "library_version": library_version,
        "dim": store.dim,
        "linear": {c: {"n": s.n, "w": s.w, "A": s.A.tolist(), "b": s.b.tolist()}
                   for c, s in lin.items()},
        "beta": {t: b.buckets for t, b in beta.items()},
    }


def import_state(store: BanditStore, snapshot: dict[str, Any]) -> None:
    """Add a snapshot's statistics to ``store`` (statistics are sums, so importing twice
    counts twice: import into an empty prefix)."""
    if snapshot.get("schema_version") != SCHEMA_VERSION:
        raise StateVersionError(
            f"snapshot schema_version {snapshot.get('schema_version')!r}; this code reads {SCHEMA_VERSION}"
        )
    if int(snapshot["dim"]) != store.dim:
        raise StateVersionError(f"snapshot dim {snapshot['dim']} != store dim {store.dim}")
    # A = sum w x x^T is rebuilt from its eigen-decomposition: A = sum_k lam_k v_k v_k^T, i.e.
    # pseudo-observations x = v_k * sqrt(lam_k) with weight 1 and reward 0; b is added by
    # _b_updates. Exact, and reuses the one atomic update path.
    updates: list[StatUpdate] = []
    for comp, s in snapshot.get("linear", {}).items():
        A = np.asarray(s["A"], dtype=float)
        lam, vecs = np.linalg.eigh(A)
        for k in range(len(lam)):
            if lam[k] > 1e-12:
                x = vecs[:, k] * np.sqrt(lam[k])
                idx = np.nonzero(np.abs(x) > 0)[0]
                updates.append(LinearUpdate(comp, tuple(int(i) for i in idx),
                                            tuple(float(x[i]) for i in idx), 0.0, 1.0))
        b = np.asarray(s["b"], dtype=float)
        if np.any(b):
            updates.extend(_b_updates(comp, b))
    for t, buckets in snapshot.get("beta", {}).items():
        for bucket, (a, f, _n) in buckets.items():
            total = a + f
            if total > 0:
                updates.append(BetaUpdate(t, bucket, a / total, total))
    store.apply(updates)


def _b_updates(comp: str, b: np.ndarray) -> list[LinearUpdate]:
    """Updates that add ``b`` to the b-vector and nothing to A: per coordinate, one observation
    (x=e_i, r=b_i, w=+1) adds (e_i e_i^T, b_i e_i) and one (x=e_i, r=0, w=-1) takes the
    e_i e_i^T back out. (The ``n`` counters grow by these pseudo-observations; they are
    informative only.)"""
    out = []
    for i in np.nonzero(b)[0]:
        out.append(LinearUpdate(comp, (int(i),), (1.0,), float(b[i]), 1.0))
        out.append(LinearUpdate(comp, (int(i),), (1.0,), 0.0, -1.0))
    return out
