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

    P bandit:meta                 hash  schema_version, dim, version (bumped per update),
                                        gen, rebuilt_upto, rebuild (last log rebuild swapped
                                        in, see :mod:`orchestrator.training`)
    P bandit:lin:<component>      hash  n, w, b:<i>, A:<i>:<j> (i <= j; upper triangle)
    P bandit:beta:<template_id>   hash  <bucket>:a, <bucket>:b, <bucket>:n
    P arms:impressions            hash  <template_id> -> times chosen and executed
    P imp:<request_id>            str   impression JSON (TTL)          -- feedback.py
    P fb:<request_id>             set   "<item>\\x1f<action>" counted (TTL) -- feedback.py
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import redis

from .errors import ServiceUnavailableError, StateVersionError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class LinearUpdate:
    """Add ``weight * x x^T`` to A and ``weight * reward * x`` to b of one component.

    ``indices`` must be strictly increasing (the upper triangle is stored)."""

    component: str
    indices: tuple[int, ...]
    values: tuple[float, ...]
    reward: float
    weight: float


@dataclass(frozen=True, slots=True)
class BetaUpdate:
    """Add ``weight * reward`` successes and ``weight * (1 - reward)`` failures to a bucket."""

    template_id: str
    bucket: str
    reward: float
    weight: float


StatUpdate = LinearUpdate | BetaUpdate


def update_to_dict(update: StatUpdate) -> dict[str, Any]:
    """JSON-able form of one update (the feedback spool of :mod:`orchestrator.resilience`)."""
    if isinstance(update, LinearUpdate):
        return {"t": "lin", "c": update.component, "i": list(update.indices),
                "v": list(update.values), "r": update.reward, "w": update.weight}
    return {"t": "beta", "c": update.template_id, "f": update.bucket, "r": update.reward,
            "w": update.weight}


def update_from_dict(data: dict[str, Any]) -> StatUpdate:
    """Inverse of :func:`update_to_dict`."""
    if data["t"] == "lin":
        return LinearUpdate(data["c"], tuple(int(i) for i in data["i"]),
                            tuple(float(v) for v in data["v"]), float(data["r"]), float(data["w"]))
    return BetaUpdate(data["c"], data["f"], float(data["r"]), float(data["w"]))


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
    duplicate marker and event) or none; returns False when ``dedupe`` says already counted."""

    dim: int

    def apply(self, updates: Sequence[StatUpdate], *, dedupe: tuple[str, str, int] | None = None,
              event: dict[str, Any] | None = None) -> bool: ...

    def version(self) -> int: ...

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
        self.events: list[dict[str, Any]] = []

    def apply(self, updates: Sequence[StatUpdate], *, dedupe: tuple[str, str, int] | None = None,
              event: dict[str, Any] | None = None) -> bool:
        with self._lock:
            if dedupe is not None:
                marker = (dedupe[0], dedupe[1])
                if marker in self._seen:
                    return False
                self._seen.add(marker)
            for u in updates:
                if isinstance(u, LinearUpdate):
                    st = self._lin.setdefault(u.component, LinearStats.empty(self.dim))
                    idx = np.asarray(u.indices, dtype=np.intp)
                    x = np.asarray(u.values)
                    st.n += 1
                    st.w += u.weight
                    st.A[np.ix_(idx, idx)] += u.weight * np.outer(x, x)
                    st.b[idx] += u.weight * u.reward * x
                else:
                    bs = self._beta.setdefault(u.template_id, BetaStats())
                    cell = bs.buckets.setdefault(u.bucket, [0.0, 0.0, 0.0])
                    cell[0] += u.weight * u.reward
                    cell[1] += u.weight * (1.0 - u.reward)
                    cell[2] += 1
            self._version += 1
            if event is not None:
                self.events.append(event)
            return True

    def version(self) -> int:
        return self._version

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


# KEYS: 1 dedupe set, 2 meta hash, 3 events stream, 4.. one stat key per update (in order).
# ARGV: 1 dedupe member ('' = none), 2 ttl s, 3 updates JSON, 4 event JSON ('' = none),
#       5 stream maxlen.
_APPLY_LUA = """
if ARGV[1] ~= '' then
  if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then return 0 end
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
end
local ups = cjson.decode(ARGV[3])
for n, u in ipairs(ups) do
  local key = KEYS[3 + n]
  local w = tonumber(u.w)
  local r = tonumber(u.r)
  if u.t == 'lin' then
    local idx = u.i
    local val = u.v
    redis.call('HINCRBYFLOAT', key, 'n', 1)
    redis.call('HINCRBYFLOAT', key, 'w', w)
    for a = 1, #idx do
      local xa = val[a]
      if r ~= 0 then
        redis.call('HINCRBYFLOAT', key, 'b:' .. idx[a], w * r * xa)
      end
      for c = a, #idx do
        redis.call('HINCRBYFLOAT', key, 'A:' .. idx[a] .. ':' .. idx[c], w * xa * val[c])
      end
    end
  else
    redis.call('HINCRBYFLOAT', key, u.f .. ':a', w * r)
    redis.call('HINCRBYFLOAT', key, u.f .. ':b', w * (1 - r))
    redis.call('HINCRBYFLOAT', key, u.f .. ':n', 1)
  end
end
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
    stream_maxlen:
        Approximate cap of the ``events`` stream.
    url:
        Shown in :class:`ServiceUnavailableError` messages.
    """

    def __init__(self, client: redis.Redis, *, prefix: str, dim: int,
                 stream_maxlen: int = 200_000, url: str = "redis") -> None:
        self.client = client
        self.prefix = prefix
        self.dim = dim
        self.stream_maxlen = stream_maxlen
        self.url = url
        self._script = client.register_script(_APPLY_LUA)
        self._checked = False

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

    def check_schema(self) -> None:
        """Record (first start) or verify the schema version and dimension of the state."""
        try:
            self.client.hsetnx(self.meta_key, "schema_version", SCHEMA_VERSION)
            self.client.hsetnx(self.meta_key, "dim", self.dim)
            meta = self.client.hmget(self.meta_key, ["schema_version", "dim"])
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        sv, dim = int(meta[0]), int(meta[1])
        if sv != SCHEMA_VERSION:
            raise StateVersionError(
                f"bandit state under {self.prefix!r} has schema_version {sv}; this code reads "
                f"{SCHEMA_VERSION}. Export it with an older version or use a new key_prefix."
            )
        if dim != self.dim:
            raise StateVersionError(
                f"bandit state under {self.prefix!r} was built with dim={dim}, the selector "
                f"uses dim={self.dim}; set the selector's hash_dim to match or use a new key_prefix"
            )
        self._checked = True

    # -- writes ----------------------------------------------------------------------------
    def apply(self, updates: Sequence[StatUpdate], *, dedupe: tuple[str, str, int] | None = None,
              event: dict[str, Any] | None = None) -> bool:
        keys = [dedupe[0] if dedupe else self.key("fb", "_none"), self.meta_key, self.events_key]
        payload: list[dict[str, Any]] = []
        for u in updates:
            if isinstance(u, LinearUpdate):
                keys.append(self.key("bandit", "lin", u.component))
                payload.append({"t": "lin", "i": list(u.indices), "v": list(u.values),
                                "r": u.reward, "w": u.weight})
            else:
                keys.append(self.key("bandit", "beta", u.template_id))
                payload.append({"t": "beta", "f": u.bucket, "r": u.reward, "w": u.weight})
        args = [dedupe[1] if dedupe else "", dedupe[2] if dedupe else 0, json.dumps(payload),
                json.dumps(event, separators=(",", ":")) if event is not None else "",
                self.stream_maxlen]
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
            v = self.client.hget(self.meta_key, "version")
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        return int(v or 0)

    def _hgetall_many(self, keys: Sequence[str]) -> list[dict[Any, Any]]:
        """``HGETALL`` of each key in one round trip (no transaction needed: reads only)."""
        try:
            pipe = self.client.pipeline(transaction=False)
            for k in keys:
                pipe.hgetall(k)
            return list(pipe.execute())
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise self._unavailable(exc) from exc

    def load_linear(self, components: Sequence[str]) -> dict[str, LinearStats]:
        raw = self._hgetall_many([self.key("bandit", "lin", c) for c in components])
        out: dict[str, LinearStats] = {}
        for c, h in zip(components, raw):
            st = LinearStats.empty(self.dim)
            for k, v in h.items():
                k = k.decode() if isinstance(k, bytes) else k
                val = float(v)
                if k[0] == "A":
                    _, i, j = k.split(":")
                    ii, jj = int(i), int(j)
                    st.A[ii, jj] = val
                    st.A[jj, ii] = val
                elif k[0] == "b":
                    st.b[int(k[2:])] = val
                elif k == "n":
                    st.n = val
                elif k == "w":
                    st.w = val
            out[c] = st
        return out

    def load_beta(self, template_ids: Sequence[str]) -> dict[str, BetaStats]:
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
