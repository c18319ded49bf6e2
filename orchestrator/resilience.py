"""What the orchestrator does when Elasticsearch or Redis fails.

Three mechanisms, each usable on its own, wired together by
:meth:`orchestrator.pipeline.Orchestrator.from_settings` from ``settings.resilience``:

:class:`CircuitBreaker`
    After ``failure_threshold`` consecutive connection failures of a service, calls fail at
    once (no connect attempt) for ``reset_timeout_s``; then one probe is let through
    (half-open): success closes the breaker, failure opens it again. Elasticsearch searches
    go through one (:class:`orchestrator.execution.MultiSearch`), so a dead node costs a
    search one fast :class:`~orchestrator.errors.ServiceUnavailableError` (HTTP 503), never a
    hang.

:class:`Spool` and :class:`DurableRedisWriter`
    Every Redis *write* of the serving path (impressions with their search-time bandit
    observations, feedback) goes through the writer. When Redis is unreachable (or earlier writes are
    still spooled, to keep their order) the write is appended to a local JSON-lines file and
    ``fsync`` ed before the call returns, so an acknowledged write survives a crash of this
    process. A background thread (started on the first spooled write) and every later write
    replay the spool into Redis in order once it answers again. Replay is idempotent: feedback
    carries its duplicate marker into the atomic Lua apply of
    :class:`~orchestrator.bandit_state.RedisBanditStore`, impressions are written with
    ``SET NX`` (:meth:`~orchestrator.feedback.FeedbackLog.replay_impression`), so a spool
    replayed twice (crash mid-replay) counts everything once. Spool files of a dead process
    (same Redis URL and key prefix) are adopted and replayed by the next writer that starts.

:class:`FallbackCache`
    Optional (``fallback_cache_size > 0``): the last good response per normalized query and
    size, served (marked degraded) while Elasticsearch is unavailable.

Spool record (one JSON object per line)::

    {"kind": "impression", "payload": {"impression": {...}, "event": {...}, "executed": [...],
                                       "updates": [...]}}
    {"kind": "apply", "payload": {"updates": [...], "dedupe": [key, member, ttl], "event": {...},
                                  "outcome": [key, ttl]}}

(``updates`` of an impression are its search-time bandit observations; ``outcome`` is the
request's ``P out:<request_id>`` hash of the one-observation max rule, which makes a replayed
observation or feedback a no-op, see :mod:`orchestrator.rewards`.)

Spool file names are ``spool-<key>-<pid>-<random>.jsonl`` where ``<key>`` hashes the Redis URL
and key prefix; the owning process holds an exclusive ``flock`` on its file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .bandit_state import update_from_dict
from .errors import ServiceUnavailableError

if TYPE_CHECKING:
    from .bandit_state import RedisBanditStore
    from .feedback import FeedbackLog

logger = logging.getLogger(__name__)


class CircuitBreaker:
    """Fail fast after repeated connection failures of one service.

    Parameters
    ----------
    name:
        Service name (messages, health).
    failure_threshold:
        Consecutive failures that open the breaker.
    reset_timeout_s:
        How long an open breaker refuses calls before letting one probe through.
    clock:
        Monotonic clock (tests inject a fake one).
    """

    def __init__(self, name: str, *, failure_threshold: int = 3, reset_timeout_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold < 1 or reset_timeout_s < 0:
            raise ValueError("need failure_threshold >= 1 and reset_timeout_s >= 0")
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        """``closed`` (calls go through), ``open`` (refused) or ``half_open`` (cool-down over:
        the next call is a probe)."""
        with self._lock:
            return self._state()

    def _state(self) -> str:
        if self._opened_at is None:
            return "closed"
        if self._clock() - self._opened_at >= self.reset_timeout_s:
            return "half_open"
        return "open"

    def retry_in_s(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when closed)."""
        with self._lock:
            if self._opened_at is None:
                return 0.0
            return max(0.0, self.reset_timeout_s - (self._clock() - self._opened_at))

    def allow(self) -> bool:
        """May a call go to the service now? In ``half_open`` only one caller (the probe) gets
        True until it reports back."""
        with self._lock:
            state = self._state()
            if state == "closed":
                return True
            if state == "half_open" and not self._probing:
                self._probing = True
                return True
            return False

    def record_success(self) -> None:
        with self._lock:
            if self._opened_at is not None:
                logger.info("%s answers again; circuit closed", self.name)
            self._failures = 0
            self._opened_at = None
            self._probing = False

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._probing or self._failures >= self.failure_threshold:
                if self._opened_at is None:
                    logger.warning("%s failed %d time(s) in a row; failing fast for %.1f s",
                                   self.name, self._failures, self.reset_timeout_s)
                self._opened_at = self._clock()
            self._probing = False

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"state": self._state(), "consecutive_failures": self._failures}


def spool_key(redis_url: str, prefix: str) -> str:
    """Short stable hash naming the Redis state a spool file belongs to."""
    return hashlib.sha1(f"{redis_url}\x1f{prefix}".encode()).hexdigest()[:12]


def _read_records(fh: Any) -> list[dict[str, Any]]:
    """Complete records of a spool file; a torn last line (crash mid-write, so never
    acknowledged) is skipped."""
    fh.seek(0)
    out = []
    for line in fh.read().splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("skipping a torn spool line (%d bytes)", len(line))
    return out


class Spool:
    """Append-only, fsync'ed JSON-lines file of writes waiting for Redis.

    The file is created on the first :meth:`append` (most orchestrators never need one) and
    truncated once everything in it was replayed.

    Parameters
    ----------
    directory:
        Where spool files live (created if missing).
    key:
        :func:`spool_key` of the Redis URL and key prefix; only files with the same key are
        adopted.
    fsync:
        ``os.fsync`` after each append (the durability guarantee; off only in unit tests).
    """

    def __init__(self, directory: Path, *, key: str, fsync: bool = True) -> None:
        self.directory = Path(directory)
        self.key = key
        self.fsync = fsync
        self.path = self.directory / f"spool-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._lock = threading.RLock()
        self._fh: Any = None
        self._records: list[dict[str, Any]] = []
        self._cursor = 0
        self._impressions: dict[str, dict[str, Any]] = {}
        self._markers: set[tuple[str, str]] = set()

    def _open(self) -> Any:
        if self._fh is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the lifetime
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            if self.fsync:
                dfd = os.open(self.directory, os.O_RDONLY)
                try:
                    os.fsync(dfd)  # the new file's directory entry is durable too
                finally:
                    os.close(dfd)
            self._fh = fh
        return self._fh

    def __len__(self) -> int:
        """Records not yet replayed."""
        with self._lock:
            return len(self._records) - self._cursor

    def append(self, kind: str, payload: Mapping[str, Any]) -> None:
        """Write one record and make it durable (``fsync``) before returning."""
        line = json.dumps({"kind": kind, "payload": payload}, separators=(",", ":"))
        with self._lock:
            fh = self._open()
            fh.write(line + "\n")
            fh.flush()
            if self.fsync:
                os.fsync(fh.fileno())
            rec = {"kind": kind, "payload": payload}
            self._records.append(rec)
            self._index(rec)

    def _index(self, rec: Mapping[str, Any]) -> None:
        p = rec["payload"]
        if rec["kind"] == "impression":
            self._impressions[p["impression"]["request_id"]] = p["impression"]
        elif rec["kind"] == "apply" and p.get("dedupe"):
            self._markers.add((p["dedupe"][0], p["dedupe"][1]))

    def impression(self, request_id: str) -> dict[str, Any] | None:
        """A spooled impression not yet in Redis."""
        with self._lock:
            return self._impressions.get(request_id)

    def has_marker(self, key: str, member: str) -> bool:
        """Is this duplicate marker in a spooled (not yet replayed) feedback?"""
        with self._lock:
            return (key, member) in self._markers

    def next(self) -> dict[str, Any] | None:
        with self._lock:
            return self._records[self._cursor] if self._cursor < len(self._records) else None

    def advance(self) -> None:
        """The record returned by :meth:`next` is in Redis; once all are, truncate the file."""
        with self._lock:
            self._cursor += 1
            if self._cursor == len(self._records) and self._fh is not None:
                self._fh.seek(0)
                self._fh.truncate(0)
                self._fh.flush()
                if self.fsync:
                    os.fsync(self._fh.fileno())
                self._records, self._cursor = [], 0
                self._impressions.clear()
                self._markers.clear()

    def orphans(self) -> list[Path]:
        """Other spool files of the same Redis state (their process may be dead)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob(f"spool-{self.key}-*.jsonl") if p != self.path)

    def adopt(self, path: Path, apply: Callable[[dict[str, Any]], Any]) -> int:
        """Replay and delete ``path`` if no live process holds it; returns records replayed
        (0 when it is locked, i.e. its owner is alive). Stops (raising) at the first record
        Redis refuses; the file is then kept for the next attempt."""
        try:
            fh = open(path, "r+", encoding="utf-8")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return 0
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0
            records = _read_records(fh)
            for rec in records:
                apply(rec)
            path.unlink()
            if records:
                logger.info("replayed %d spooled write(s) left by %s", len(records), path.name)
            return len(records)
        finally:
            fh.close()

    def close(self) -> None:
        """Release the file (records not yet replayed stay in it for adoption)."""
        with self._lock:
            if self._fh is not None:
                empty = len(self._records) == self._cursor
                self._fh.close()
                self._fh = None
                if empty:
                    self.path.unlink(missing_ok=True)


class DurableRedisWriter:
    """Redis writes that are never lost: straight to Redis when it answers, else to the spool
    (acknowledged once fsync'ed), replayed in order when Redis is back.

    Parameters
    ----------
    spool:
        Where writes wait.
    appliers:
        ``{kind: fn(payload)}``; each raises :class:`ServiceUnavailableError` when Redis is
        down and must be idempotent for replay (see the module docstring).
    breaker:
        After a Redis failure, writes go straight to the spool until the breaker half-opens
        (no connection attempt per request while Redis is down).
    replay_interval_s:
        Pause between replay attempts of the background thread.
    """

    def __init__(self, spool: Spool, appliers: Mapping[str, Callable[[Mapping[str, Any]], Any]],
                 *, breaker: CircuitBreaker | None = None, replay_interval_s: float = 1.0) -> None:
        self.spool = spool
        self.appliers = dict(appliers)
        self.breaker = breaker or CircuitBreaker("Redis", failure_threshold=1, reset_timeout_s=1.0)
        self.replay_interval_s = replay_interval_s
        self._drain_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._stop = threading.Event()
        self.replayed = 0
        self.spooled = 0
        if self.spool.orphans():
            self.start_replayer()  # a previous process left writes behind: adopt them

    # -- writes ------------------------------------------------------------------------------
    def write(self, kind: str, payload: Mapping[str, Any]) -> tuple[Any, bool]:
        """Apply one write; returns ``(result, spooled)``. ``result`` is the applier's return
        value, or None when spooled. Raises only if the spool itself cannot be written."""
        if len(self.spool) and self.breaker.state == "closed":
            # Earlier writes first, or this one queues behind them. Only while Redis is known
            # to answer: otherwise the replay thread probes it, so no request waits on a dead
            # or hung Redis.
            self.replay(blocking=False)
        if not len(self.spool) and self.breaker.allow():
            try:
                result = self.appliers[kind](payload)
            except ServiceUnavailableError as exc:
                self.breaker.record_failure()
                logger.warning("Redis write (%s) failed, spooling it: %s", kind, exc)
            except Exception:
                self.breaker.record_success()  # Redis answered (with an error): not an outage
                raise
            else:
                self.breaker.record_success()
                return result, False
        self.spool.append(kind, payload)
        self.spooled += 1
        self.start_replayer()
        return None, True

    def _apply_record(self, rec: Mapping[str, Any]) -> None:
        self.appliers[rec["kind"]](rec["payload"])

    def replay(self, *, blocking: bool = True) -> int:
        """Replay spooled writes (own and orphaned) into Redis, oldest first; returns how many
        went in. Stops quietly at the first failure (Redis still down); the rest stays
        spooled. ``blocking=False`` returns 0 at once when another thread is replaying."""
        if not self._drain_lock.acquire(blocking=blocking):
            return 0
        done = 0
        try:
            for path in self.spool.orphans():
                done += self.spool.adopt(path, self._apply_record)
            while (rec := self.spool.next()) is not None:
                self._apply_record(rec)
                self.spool.advance()
                done += 1
        except ServiceUnavailableError as exc:
            self.breaker.record_failure()
            logger.info("spool replay paused (%d left): %s", len(self.spool), exc)
        else:
            if done:
                self.breaker.record_success()
                logger.info("replayed %d spooled Redis write(s)", done)
        finally:
            self.replayed += done
            self._drain_lock.release()
        return done

    # -- background replay -----------------------------------------------------------------
    def start_replayer(self) -> None:
        """Start the replay thread unless it runs (it ends when the spool is empty)."""
        with self._thread_lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True, name="ltrr-spool-replay")
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.replay_interval_s):
            try:
                self.replay()
            except Exception:  # noqa: BLE001 - keep the thread alive; the next round retries
                logger.exception("spool replay failed")
            if not len(self.spool) and not self.spool.orphans():
                return

    def close(self) -> None:
        """Stop the replay thread and release the spool file (anything still spooled stays on
        disk and is adopted by the next writer for the same Redis state)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.spool.close()

    def status(self) -> dict[str, Any]:
        return {"spooled": len(self.spool), "orphan_files": len(self.spool.orphans()),
                "spooled_total": self.spooled, "replayed_total": self.replayed,
                "redis_breaker": self.breaker.snapshot()["state"], "spool_file": str(self.spool.path)}


def redis_appliers(store: RedisBanditStore,
                   log: FeedbackLog) -> dict[str, Callable[[Mapping[str, Any]], Any]]:
    """The idempotent Redis writes a spool record can hold, by ``kind``: ``impression``
    (:meth:`FeedbackLog.replay_impression`) and ``apply`` (:meth:`RedisBanditStore.apply` with
    its duplicate marker; returns False for a duplicate)."""

    def impression(p: Mapping[str, Any]) -> bool:
        return log.replay_impression(p["impression"], event=p["event"], executed=p["executed"],
                                     updates=[update_from_dict(u) for u in p.get("updates", ())])

    def apply(p: Mapping[str, Any]) -> bool:
        dedupe = p.get("dedupe")
        outcome = p.get("outcome")
        return store.apply([update_from_dict(u) for u in p["updates"]],
                           dedupe=(dedupe[0], dedupe[1], int(dedupe[2])) if dedupe else None,
                           event=p.get("event"),
                           outcome=(outcome[0], int(outcome[1])) if outcome else None)

    return {"impression": impression, "apply": apply}


class FallbackCache:
    """The last good response per ``(normalized query, size)``, for serving while
    Elasticsearch is unavailable. LRU, at most ``maxsize`` entries, each at most
    ``max_age_s`` old when served."""

    def __init__(self, maxsize: int, *, max_age_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.maxsize = maxsize
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._data: OrderedDict[tuple[str, int], tuple[float, Any]] = OrderedDict()

    def put(self, key: tuple[str, int], value: Any) -> None:
        if self.maxsize <= 0:
            return
        with self._lock:
            self._data[key] = (self._clock(), value)
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def get(self, key: tuple[str, int]) -> tuple[float, Any] | None:
        """``(age_s, value)`` or None (missing or too old)."""
        with self._lock:
            hit = self._data.get(key)
            if hit is None:
                return None
            age = self._clock() - hit[0]
            if age > self.max_age_s:
                del self._data[key]
                return None
            self._data.move_to_end(key)
            return age, hit[1]

    def __len__(self) -> int:
        return len(self._data)


class RecentImpressions:
    """Bounded LRU of the impressions this process served recently, so feedback can still be
    joined (and spooled) while Redis is unreachable."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._lock = threading.Lock()
        self._data: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def put(self, impression: dict[str, Any]) -> None:
        if self.maxsize <= 0:
            return
        with self._lock:
            self._data[impression["request_id"]] = impression
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def get(self, request_id: str) -> dict[str, Any] | None:
        with self._lock:
            return self._data.get(request_id)


def replay_spools(settings: Any, *, spool_dir: Path | None = None) -> dict[str, int]:
    """Replay every spool file of ``settings.redis`` (URL + key prefix) whose process is gone
    into Redis; files of live processes are left to them. For operators
    (``python -m orchestrator.resilience replay``) after a crash with Redis down.

    Returns
    -------
    dict
        ``files`` found, ``replayed`` records, ``busy`` files held by a live process.

    Raises
    ------
    ServiceUnavailableError
        Redis is still down (what was replayed so far stays replayed; the rest stays on disk).
    """
    from .bandit_state import RedisBanditStore
    from .feedback import FeedbackLog
    from .redis_client import build_redis

    directory = Path(spool_dir or settings.resilience.spool_dir)
    client = build_redis(settings.redis)
    from .selection import ContextFeaturizer

    featurizer = ContextFeaturizer(hash_dim=settings.bandit.hash_dim,
                                   bucket_keys=settings.bandit.bucket_keys)
    store = RedisBanditStore(client, prefix=settings.redis.key_prefix, dim=featurizer.dim,
                             url=settings.redis.url, featurizer_version=featurizer.version)
    store.check_schema()
    log = FeedbackLog(client, store=store, impression_ttl_s=settings.feedback.impression_ttl_s,
                      stream_maxlen=settings.feedback.stream_maxlen)
    appliers = redis_appliers(store, log)
    spool = Spool(directory, key=spool_key(settings.redis.url, settings.redis.key_prefix))
    files = spool.orphans()
    out = {"files": len(files), "replayed": 0, "busy": 0}
    for path in files:
        n = spool.adopt(path, lambda rec: appliers[rec["kind"]](rec["payload"]))
        if n == 0 and path.exists():
            out["busy"] += 1
        out["replayed"] += n
    return out


def _main(argv: list[str] | None = None) -> int:
    import argparse

    from .settings import OrchestratorSettings

    ap = argparse.ArgumentParser(prog="python -m orchestrator.resilience",
                                 description="Inspect or replay the Redis-write spool.")
    ap.add_argument("command", choices=["status", "replay"])
    ap.add_argument("--spool-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    settings = OrchestratorSettings()
    directory = Path(args.spool_dir or settings.resilience.spool_dir)
    key = spool_key(settings.redis.url, settings.redis.key_prefix)
    if args.command == "status":
        files = sorted(directory.glob(f"spool-{key}-*.jsonl")) if directory.is_dir() else []
        total = 0
        for f in files:
            n = sum(1 for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
            total += n
            print(f"{f}: {n} record(s)")
        print(f"{len(files)} spool file(s), {total} record(s) for {settings.redis.url} "
              f"prefix {settings.redis.key_prefix!r}")
        return 0
    try:
        out = replay_spools(settings, spool_dir=directory)
    except ServiceUnavailableError as exc:
        print(f"error: {exc}")
        return 1
    print(f"replayed {out['replayed']} record(s) from {out['files'] - out['busy']} file(s); "
          f"{out['busy']} file(s) held by a live process")
    return 0


__all__ = ["CircuitBreaker", "DurableRedisWriter", "FallbackCache", "RecentImpressions", "Spool",
           "redis_appliers", "replay_spools", "spool_key"]


if __name__ == "__main__":
    raise SystemExit(_main())
