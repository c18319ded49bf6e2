"""How fast the memory index learns: freshness (feedback -> retrievable through the memory
arm) with the updater running as in production, and the updater's and the repair rebuild's
throughput on a large event log.

    python benchmarks/learning_memory.py [--events 200000] [--feedbacks 30] \\
        [--updater celery|loop] [--out benchmarks/results/learning_memory.json]

Everything runs under its own Redis prefix (``bench:memory:<run>:``) and its own memory alias
(default ``<catalog>-memory-bench-<run>``, deleted afterwards unless ``--keep``); the catalog is
only read. :func:`measure` is what ``benchmarks/learning.py`` calls with its 1M-event log
(events in the stream's shape: ``{"type": "impression" | "feedback", **data}``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from orchestrator.examination import ExaminationModel  # noqa: E402
from orchestrator.feedback import compact_impression  # noqa: E402
from orchestrator.memory import MemoryUpdater, memory_settings_kwargs, rebuild_memory  # noqa: E402
from orchestrator.settings import OrchestratorSettings  # noqa: E402

PLAN = {"lexical": 20, "memory": 10}


# -- a generated event log (until benchmarks/learning.py provides the real-data one) ---------

def generate_events(es: Any, *, catalog_alias: str, n: int, seed: int = 0, n_queries: int = 5000,
                    n_items: int = 20000, shown: int = 10) -> list[dict[str, Any]]:
    """``n`` events in the stream's shape: impressions of 10 items for Zipf-distributed
    queries (catalog titles), clicks/plays with probability falling with the position, skips."""
    rng = random.Random(seed)
    hits = es.search(index=catalog_alias, size=min(n_items, 10000), source=["title"],
                     query={"function_score": {"random_score": {"seed": seed, "field": "_seq_no"}}}
                     )["hits"]["hits"]
    items = [h["_id"] for h in hits]
    titles = list(dict.fromkeys(str(h["_source"].get("title", "")).lower() for h in hits))
    queries = [titles[i % len(titles)] + ("" if i < len(titles) else f" {i}")
               for i in range(n_queries)]
    weights = [1.0 / (r + 1) for r in range(len(queries))]
    cands = {q: rng.sample(items, 30) for q in queries}
    theta = ExaminationModel.default()
    out: list[dict[str, Any]] = []
    i = 0
    while len(out) < n:
        q = rng.choices(queries, weights)[0]
        pool = cands[q]
        start = rng.randrange(0, 5)
        shown_ids = pool[start:start + shown]
        rid = f"gen-{seed}-{i}"
        i += 1
        out.append({"type": "impression", "request_id": rid, "query": q, "query_key": q,
                    "shown": [{"id": it, "rank": r} for r, it in enumerate(shown_ids, 1)]})
        for r, it in enumerate(shown_ids, 1):
            p = theta.propensity(r) * (0.35 if pool.index(it) < 8 else 0.05)
            if rng.random() < p:
                out.append({"type": "feedback", "request_id": rid, "item_id": it,
                            "action": rng.choice(("click", "play", "play", "like")), "rank": r,
                            "position": r, "query": q})
            elif r <= 3 and rng.random() < 0.03:
                out.append({"type": "feedback", "request_id": rid, "item_id": it,
                            "action": "skip", "rank": r, "position": r, "query": q})
    return out[:n]


def _xadd_all(redis: Any, stream: str, events: Iterable[Mapping[str, Any]], *,
              chunk: int = 5000) -> list[tuple[str, dict[str, str]]]:
    """Append events to the stream; return ``(stream id, fields)`` of each."""
    out: list[tuple[str, dict[str, str]]] = []
    fields: list[dict[str, str]] = []
    pipe = redis.pipeline(transaction=False)

    def flush() -> None:
        for eid, f in zip(pipe.execute(), fields):
            out.append((eid.decode() if isinstance(eid, bytes) else str(eid), f))
        fields.clear()

    for ev in events:
        data = {k: v for k, v in ev.items() if k not in ("type", "event_id")}
        f = {"type": ev["type"], "data": json.dumps(data, separators=(",", ":"))}
        if ev["type"] == "impression":  # as the product writes it (FeedbackLog)
            f["mem"] = compact_impression(data)
        pipe.xadd(stream, f)
        fields.append(f)
        if len(fields) >= chunk:
            flush()
    flush()
    return out


# -- throughput -----------------------------------------------------------------------------

def _read_only(redis: Any, stream: str, *, start: str, batch_size: int) -> float:
    """Seconds to read the stream from ``start`` to its end in ``batch_size`` XRANGE pages,
    parsing the entries and nothing more (the updater's read cost, without its work)."""
    t = time.perf_counter()
    low = start
    while True:
        page = redis.xrange(stream, min=low, count=batch_size)
        if not page:
            break
        last = page[-1][0]
        low = "(" + (last.decode() if isinstance(last, bytes) else str(last))
        if len(page) < batch_size:
            break
    return time.perf_counter() - t


def _throughput(es: Any, redis: Any, *, events: Sequence[Mapping[str, Any]], catalog_alias: str,
                memory_alias: str, prefix: str, chunk: int, batch_size: int,
                mappings_dir: Path, indexed_events: int | None,
                updater_kwargs: Mapping[str, Any], log: Any) -> dict[str, Any]:
    """Feed the log chunk by chunk and time only the updater; then time the repair rebuild
    over the first ``indexed_events`` events (written to a benchmark events index; the
    rebuild holds its whole input in memory)."""
    from elasticsearch import helpers

    from orchestrator.event_log import event_document
    from orchestrator.ingest import load_mapping

    stream = f"{prefix}events"
    events_alias = f"{memory_alias}-events"
    up = MemoryUpdater(redis, es, prefix=prefix, memory_alias=memory_alias,
                       catalog_alias=catalog_alias, **updater_kwargs)
    up.ensure()
    body = load_mapping(mappings_dir, "events.v1")
    es.indices.create(index=f"{events_alias}-v1", settings=body["settings"],
                      mappings=body["mappings"], aliases={events_alias: {}})
    limit = len(events) if indexed_events is None else min(indexed_events, len(events))
    upd_s = read_s = 0.0
    totals: dict[str, float] = {}
    per_chunk = []
    indexed = 0
    for start in range(0, len(events), chunk):
        part = events[start:start + chunk]
        added = _xadd_all(redis, stream, part)
        read_s += _read_only(redis, stream, start=added[0][0], batch_size=batch_size)
        t = time.perf_counter()
        res = up.run(batch_size=batch_size, max_batches=10**6)
        dt = time.perf_counter() - t
        upd_s += dt
        for k, v in res.as_dict().items():
            if isinstance(v, (int, float)) and k != "seconds":
                totals[k] = totals.get(k, 0) + v
        per_chunk.append({"events_before": start, "events": res.events,
                          "events_per_s": round(res.events / dt, 1) if dt else None})
        log(f"  update_memory: {start + len(part)} events, chunk {res.events / dt:.0f} events/s")
        # What the event mover would do (untimed): the events index, then trim what the
        # memory group acknowledged.
        todo = added[:max(0, limit - indexed)]
        if todo:
            helpers.bulk(es, ({"_index": events_alias, "_id": eid, "_source":
                               event_document(eid, f)} for eid, f in todo), chunk_size=2000)
            indexed += len(todo)
        ms, seq = added[-1][0].split("-")
        redis.xtrim(stream, minid=f"{ms}-{int(seq) + 1}", approximate=False)
    es.indices.refresh(index=events_alias)
    t = time.perf_counter()
    rebuilt = rebuild_memory(es, redis, events_alias=events_alias, prefix=prefix,
                             memory_alias=memory_alias, catalog_alias=catalog_alias,
                             half_life_days=30.0, **updater_kwargs)
    rebuild_s = time.perf_counter() - t
    log(f"  train_memory (repair): {rebuilt['events']} events in {rebuild_s:.1f} s")
    es.indices.refresh(index=memory_alias)
    pending_keys = list(redis.scan_iter(match=f"{prefix}memory:exp:*", count=1000))
    pending_bytes = sum(int(redis.memory_usage(k) or 0) for k in pending_keys)
    stats = es.indices.stats(index=memory_alias)["_all"]["primaries"]
    es.indices.delete(index=f"{events_alias}*", ignore_unavailable=True, allow_no_indices=True)
    return {
        "update_memory": {"events": int(totals.get("events", 0)), "seconds": round(upd_s, 2),
                          "events_per_s": round(totals.get("events", 0) / upd_s, 1),
                          "pairs_per_s": round(totals.get("pairs", 0) / upd_s, 1),
                          "batch_size": batch_size, "totals": totals, "per_chunk": per_chunk,
                          # The ceiling of any consumer of this stream in one Python process:
                          # reading the same entries, same batch size, and nothing else.
                          "stream_read_events_per_s": round(totals.get("events", 0) / read_s, 1)
                          if read_s else None},
        "train_memory": {**rebuilt, "events_per_s": round(rebuilt["events"] / rebuild_s, 1)},
        "storage": {"memory_docs": stats["docs"]["count"],
                    "memory_bytes": stats["store"]["size_in_bytes"],
                    "pending_keys": len(pending_keys), "pending_redis_bytes": pending_bytes,
                    "pending_items": sum(int(redis.hlen(k)) for k in pending_keys)},
    }


def _side_by_side(es: Any, redis: Any, *, events: Sequence[Mapping[str, Any]],
                  catalog_alias: str, memory_alias: str, prefix: str,
                  configs: Mapping[str, tuple[int, Mapping[str, Any]]], repeats: int = 2,
                  log: Any) -> dict[str, Any]:
    """The updater's events/s under each configuration (``name -> (batch size, updater
    keyword arguments)``), side by side on the same events: each run starts from an empty
    memory alias and stream of its own, runs alternate between the configurations
    (``repeats`` rounds), so the machine's drift falls on every one alike."""
    runs: dict[str, list[float]] = {name: [] for name in configs}
    for rep in range(repeats):
        for i, (name, (b, kwargs)) in enumerate(configs.items()):
            tag = f"c{i}-{rep}"
            pfx, alias = f"{prefix}{tag}:", f"{memory_alias}-{tag}"
            up = MemoryUpdater(redis, es, prefix=pfx, memory_alias=alias,
                               catalog_alias=catalog_alias, **kwargs)
            up.ensure()
            try:
                _xadd_all(redis, f"{pfx}events", events)
                t = time.perf_counter()
                res = up.run(batch_size=b, max_batches=10**6)
                runs[name].append(res.events / (time.perf_counter() - t))
            finally:
                es.indices.delete(index=f"{alias}*", ignore_unavailable=True,
                                  allow_no_indices=True)
                for key in redis.scan_iter(match=f"{pfx}*", count=1000):
                    redis.delete(key)
            log(f"  update_memory {name}: {runs[name][-1]:.0f} events/s")
    return {"events": len(events), "repeats": repeats,
            "events_per_s": {name: [round(v, 1) for v in vs] for name, vs in runs.items()}}


# -- freshness -------------------------------------------------------------------------------

def _env(settings: OrchestratorSettings, *, prefix: str, catalog_alias: str, memory_alias: str,
         every_s: float, queue: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "LTRR_REDIS__KEY_PREFIX": prefix,
            "LTRR_ES__CATALOG_ALIAS": catalog_alias, "LTRR_MEMORY__ALIAS": memory_alias,
            "LTRR_CELERY__UPDATE_MEMORY_EVERY_S": str(every_s), "LTRR_BENCH_QUEUE": queue,
            "LTRR_LOG__LEVEL": "WARNING"}


def __getattr__(name: str) -> Any:
    """``beat_app``: the production Celery app with only the ``update-memory`` beat entry,
    routed to the benchmark's queue (``celery -A benchmarks.learning_memory:beat_app beat``)."""
    if name != "beat_app":
        raise AttributeError(name)
    from orchestrator.celery_app import make_app

    app = make_app(OrchestratorSettings())
    entry = dict(app.conf.beat_schedule["update-memory"])
    entry["options"] = {**entry.get("options", {}), "queue": os.environ["LTRR_BENCH_QUEUE"]}
    app.conf.beat_schedule = {"update-memory": entry}
    return app


class _Updater:
    """The updater as production runs it: a Celery worker + beat (``celery``) or
    ``ltrr memory run``'s loop in a thread (``loop``)."""

    def __init__(self, mode: str, *, es: Any, redis: Any, settings: OrchestratorSettings,
                 prefix: str, catalog_alias: str, memory_alias: str, every_s: float) -> None:
        self.mode, self.procs, self.tmp = mode, [], tempfile.mkdtemp(prefix="ltrr-bench-")
        self.queue = f"bench-{uuid.uuid4().hex[:8]}"
        self.env = _env(settings, prefix=prefix, catalog_alias=catalog_alias,
                        memory_alias=memory_alias, every_s=every_s, queue=self.queue)
        self.stop = threading.Event()
        self.up = MemoryUpdater(redis, es, prefix=prefix, memory_alias=memory_alias,
                                catalog_alias=catalog_alias)

    def __enter__(self) -> _Updater:
        self.up.ensure()
        if self.mode == "loop":
            from orchestrator.memory import run_loop

            self.thread = threading.Thread(target=run_loop, args=(self.up,), daemon=True,
                                           kwargs={"interval_s": 0.2, "stop": self.stop.is_set})
            self.thread.start()
            return self
        celery = [sys.executable, "-m", "celery"]
        self.procs.append(subprocess.Popen(
            [*celery, "-A", "orchestrator.celery_app:app", "worker", "--pool=solo", "-Q",
             self.queue, "--loglevel=WARNING", "--without-heartbeat", "--without-gossip",
             "--without-mingle"], env=self.env, cwd=ROOT, stdout=subprocess.DEVNULL,
            stderr=open(Path(self.tmp) / "worker.log", "w")))
        self.procs.append(subprocess.Popen(
            [*celery, "-A", "benchmarks.learning_memory:beat_app", "beat", "--loglevel=WARNING",
             "-s", str(Path(self.tmp) / "schedule"), "--pidfile", str(Path(self.tmp) / "beat.pid")],
            env=self.env, cwd=ROOT, stdout=subprocess.DEVNULL,
            stderr=open(Path(self.tmp) / "beat.log", "w")))
        time.sleep(6.0)  # worker and beat up (the first ticks are then already flowing)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def _freshness(es: Any, redis: Any, *, settings: OrchestratorSettings, catalog_alias: str,
               memory_alias: str, prefix: str, n: int, updater: str, every_s: float,
               seed: int, timeout_s: float, log: Any) -> dict[str, Any]:
    from orchestrator import Orchestrator
    from orchestrator.arms import build_requests
    from orchestrator.execution import MultiSearch
    from orchestrator.selection import FixedPlanSelector
    from orchestrator.templates import TemplateRegistry

    s = settings.model_copy(update={
        "redis": settings.redis.model_copy(update={"key_prefix": prefix}),
        "es": settings.es.model_copy(update={"catalog_alias": catalog_alias}),
        "templates": settings.templates.model_copy(update={"mode": "local"}),
        "memory": settings.memory.model_copy(update={"alias": memory_alias}),
    })
    full = TemplateRegistry.from_dir(settings.templates.dir)
    registry = TemplateRegistry({t.id: t for t in full if t.arm in PLAN})
    orch = Orchestrator.from_settings(s, es=es, redis=redis, understander=None,
                                      registry=registry, selector=FixedPlanSelector(PLAN))
    ms = MultiSearch(es, index=catalog_alias, registry=registry,
                     indices={"memory": memory_alias}, arm_timeout="5s")

    def memory_hits(q: str) -> list[str]:
        (res,) = ms.execute(build_requests(registry, None, q, budgets={"memory": 20}, vector=None))
        return [h.id for h in res.hits] if res.ok else []

    rng = random.Random(seed)
    hits = es.search(index=catalog_alias, size=400, source=["title"], query={"bool": {
        "filter": [{"term": {"entity_type": "track"}}, {"range": {"popularity": {"gte": 40}}}],
        "must": [{"function_score": {"random_score": {"seed": seed, "field": "_seq_no"}}}]}}
    )["hits"]["hits"]
    titles = list(dict.fromkeys(h["_source"]["title"] for h in hits
                                if str(h["_source"].get("title", "")).isascii()))
    rng.shuffle(titles)
    latencies: list[float] = []
    misses = 0
    with _Updater(updater, es=es, redis=redis, settings=s, prefix=prefix,
                  catalog_alias=catalog_alias, memory_alias=memory_alias, every_s=every_s):
        for q in titles:
            if len(latencies) + misses >= n:
                break
            resp = orch.search(q, size=30, total_budget=30)
            known = set(memory_hits(q))
            fresh = [it.id for it in resp.results if it.id not in known]
            if not fresh:
                continue
            target = fresh[min(len(fresh) - 1, rng.randrange(0, 5))]
            orch.feedback(resp.request_id, target, "play", token=resp.token)
            t0 = time.perf_counter()
            while target not in memory_hits(q):
                if time.perf_counter() - t0 > timeout_s:
                    misses += 1
                    break
                time.sleep(0.05)
            else:
                latencies.append(time.perf_counter() - t0)
            # Spread the feedbacks over the beat period, as real users do.
            time.sleep(rng.uniform(0.0, every_s))
    latencies.sort()

    def pct(p: float) -> float | None:
        if not latencies:
            return None
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 3)

    log(f"  freshness ({updater}): n={len(latencies)} p50={pct(0.5)} s p95={pct(0.95)} s "
        f"misses={misses}")
    return {"p50": pct(0.5), "p95": pct(0.95), "max": latencies[-1] if latencies else None,
            "n": len(latencies), "misses": misses, "timeout_s": timeout_s, "updater": updater,
            "every_s": every_s}


# -- the entry point ---------------------------------------------------------------------------

def measure(es: Any, redis: Any, *, events: Sequence[Mapping[str, Any]], catalog_alias: str,
            memory_alias: str, prefix: str, feedbacks: int = 30, updater: str = "celery",
            every_s: float | None = None, chunk: int = 100_000, batch_size: int | None = None,
            indexed_events: int | None = 200_000, seed: int = 0, timeout_s: float = 30.0,
            settings: OrchestratorSettings | None = None, cleanup: bool = True,
            compare_batch_sizes: Sequence[int] = (), compare_events: int = 60_000,
            compare_neighbours: bool = False, log: Any = print) -> dict[str, Any]:
    """Freshness over ``feedbacks`` real feedbacks and throughput over ``events``; with
    ``compare_batch_sizes``, also the updater side by side at those batch sizes and the
    configured one, and with ``compare_neighbours`` with and without the first-click
    neighbours, on the first ``compare_events`` events. Every updater is built from
    ``settings.memory`` (:func:`~orchestrator.memory.memory_settings_kwargs`), as the task is.

    ``memory_alias`` must be a benchmark alias (never the production one: the run writes
    learned pairs into it); ``prefix`` a fresh Redis prefix. Returns
    ``{"memory_freshness_s": {"p50", "p95", "n", ...}, "memory_update_pairs_per_s",
    "retrain_events_per_s": {"update_memory", "train_memory"}, "details": {...}}``.
    """
    settings = settings or OrchestratorSettings()
    if memory_alias in (f"{catalog_alias}-memory", settings.memory.alias):
        raise ValueError(f"{memory_alias} is a production memory alias; pass a benchmark one")
    every_s = every_s if every_s is not None else settings.celery.update_memory_every_s
    batch_size = batch_size or settings.memory.batch_size  # what the task uses
    kwargs = memory_settings_kwargs(settings.memory)  # the updater as the task builds it
    t0 = time.perf_counter()
    try:
        fresh = _freshness(es, redis, settings=settings, catalog_alias=catalog_alias,
                           memory_alias=memory_alias, prefix=f"{prefix}fresh:", n=feedbacks,
                           updater=updater, every_s=every_s, seed=seed, timeout_s=timeout_s,
                           log=log)
        thr = _throughput(es, redis, events=events, catalog_alias=catalog_alias,
                          memory_alias=memory_alias, prefix=f"{prefix}thr:", chunk=chunk,
                          batch_size=batch_size, mappings_dir=settings.ingest.mappings_dir,
                          indexed_events=indexed_events, updater_kwargs=kwargs, log=log)
        if compare_batch_sizes:
            sizes = sorted({*compare_batch_sizes, batch_size})
            thr["batch_sizes"] = _side_by_side(
                es, redis, events=events[:compare_events], catalog_alias=catalog_alias,
                memory_alias=memory_alias, prefix=f"{prefix}cmp:",
                configs={str(b): (b, kwargs) for b in sizes}, log=log)
        if compare_neighbours and kwargs.get("neighbours_per_click"):
            # What the first-click neighbours (memory.neighbours_per_click) cost the updater.
            thr["neighbours"] = _side_by_side(
                es, redis, events=events[:compare_events], catalog_alias=catalog_alias,
                memory_alias=memory_alias, prefix=f"{prefix}nb:",
                configs={"configured": (batch_size, kwargs),
                         "no_neighbours": (batch_size, {**kwargs, "neighbours_per_click": 0})},
                log=log)
    finally:
        if cleanup:
            es.indices.delete(index=f"{memory_alias}*", ignore_unavailable=True,
                              allow_no_indices=True)
            for key in redis.scan_iter(match=f"{prefix}*", count=1000):
                redis.delete(key)
    return {
        "memory_freshness_s": fresh,
        "memory_update_pairs_per_s": thr["update_memory"]["pairs_per_s"],
        "retrain_events_per_s": {"update_memory": thr["update_memory"]["events_per_s"],
                                 "train_memory": thr["train_memory"]["events_per_s"]},
        "details": {**thr, "events": len(events), "seconds": round(time.perf_counter() - t0, 1)},
    }


def main(argv: list[str] | None = None) -> int:
    from orchestrator.es_client import build_client
    from orchestrator.redis_client import build_redis

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--feedbacks", type=int, default=30)
    ap.add_argument("--indexed-events", type=int, default=200_000,
                    help="events the repair rebuild runs on (it holds them in memory)")
    ap.add_argument("--updater", choices=("celery", "loop"), default="celery")
    ap.add_argument("--catalog", default=None, help="catalog alias (default: es.catalog_alias)")
    ap.add_argument("--memory-alias", default=None)
    ap.add_argument("--seed-memory", action="store_true",
                    help="seed the benchmark memory alias from the catalog's q2e first (timed)")
    ap.add_argument("--keep", action="store_true", help="keep the memory alias and Redis keys")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    s = OrchestratorSettings()
    es, r = build_client(s.es), build_redis(s.redis)
    catalog = args.catalog or s.es.catalog_alias
    run = uuid.uuid4().hex[:6]
    memory_alias = args.memory_alias or f"{catalog}-memory-bench-{run}"
    if memory_alias == f"{catalog}-memory" or memory_alias == s.memory.alias:
        raise SystemExit(f"{memory_alias} is a production memory alias; pick another")
    prefix = f"bench:memory:{run}:"
    out: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "catalog": catalog,
                           "memory_alias": memory_alias}
    try:
        if args.seed_memory:
            from orchestrator.memory import seed_memory

            t = time.perf_counter()
            out["seed"] = seed_memory(es, catalog=catalog, memory_alias=memory_alias,
                                      keep_old_indices=0)
            print(f"seeded {out['seed']['pairs']} pairs in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        events = generate_events(es, catalog_alias=catalog, n=args.events)
        print(f"generated {len(events)} events in {time.perf_counter() - t:.1f} s")
        out.update(measure(es, r, events=events, catalog_alias=catalog, memory_alias=memory_alias,
                           prefix=prefix, feedbacks=args.feedbacks, updater=args.updater,
                           indexed_events=args.indexed_events, settings=s, cleanup=not args.keep))
    finally:
        if not args.keep:
            es.indices.delete(index=f"{memory_alias}*", ignore_unavailable=True,
                              allow_no_indices=True)
            for key in r.scan_iter(match=f"{prefix}*", count=1000):
                r.delete(key)
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
