"""Retraining throughput per task per worker (events/s) on a realistic event log.

The log is made of the product's own events. Template impressions come from real searches:
``Orchestrator.search`` runs once per distinct query key (real playlist titles of
``playlists_dev.csv`` and catalog titles of tracks, artists and albums), with a private Redis
prefix, and each impression is read back from the private stream exactly as the product wrote
it. Template feedback comes from ``Orchestrator.feedback`` on those impressions, one call per
(query, rank, action) the log needs, also read back from the stream. The log then repeats the
query keys with a Zipf(``--zipf``) distribution; each repeat is a template impression under a
fresh request id and timestamp (over the last ``--days`` days), and a share of the impressions
(``--p-feedback``) gets 1-3 actions on shown items, ranks drawn with a ``1 / rank``
examination decay. So the shapes (``pipeline._record`` / ``feedback``, read back by
``training.load_events``) and the rewards are the product's, whatever its current rules.

Measured, one process (= one worker), on the first ``--indexed-events`` events of the log:

``move_events``
    ``tasks.run_move_events``: Redis stream -> Elasticsearch events index (private alias
    ``bench-learning-<run>-events``), the stream filled in chunks of ``--chunk`` entries;
    only the moves are timed.
``rebuild_posteriors``, ``train_ranker``, every other job of ``tasks.CHAIN``
    the ``tasks.run_*`` job on that events alias (rescorer and QU model folders are temporary
    copies; ``train_memory`` is left out: it writes into the catalog, and the memory paths are
    measured by ``benchmarks/learning_memory.py``).
memory paths
    ``benchmarks/learning_memory.py``'s ``measure(...)`` (imported lazily; reported as missing
    when that module is absent): ``memory_freshness_s``, ``memory_update_pairs_per_s``,
    ``retrain_events_per_s.{update_memory, train_memory}``, on the first ``--memory-events``
    events of the log (default 200k).

The whole log (``--events``, default 1M) is generated and described (distinct keys, repeat
distribution, feedback share); the batch jobs load the whole events index into memory (about
9 KB of JSON per impression), so they run on a stated prefix of it (``--indexed-events``).

Usage::

    python benchmarks/learning.py                       # 1M-event log, 100k indexed, ltrr-catalog
    python benchmarks/learning.py --indexed-events 200000 --templates 2000
    python benchmarks/learning.py --smoke               # CI: 2k events on test-ltrr-catalog

Prints a table and writes ``benchmarks/results/learning.json`` (``--smoke``: a temp dir).
Redis keys ``bench-learning-<run>:*`` and indices ``bench-learning-<run>-*`` are deleted
afterwards.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import importlib
import inspect
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # learning_memory.py, when run from elsewhere

from orchestrator.feedback import compact_impression  # noqa: E402
from orchestrator.pipeline import Orchestrator  # noqa: E402
from orchestrator.settings import OrchestratorSettings  # noqa: E402

logger = logging.getLogger("benchmarks.learning")

#: Actions and their shares among feedback (those the product's reward model does not accept
#: are dropped); skips are rarer than clicks and plays.
ACTION_SHARES = {"click": 0.5, "play": 0.28, "like": 0.08, "favorite": 0.04, "skip": 0.10}
CONTEXTS = [{"device": d, "hour": h, "weekday": w}
            for d in ("mobile", "desktop", "tv") for h in (8, 13, 19, 23) for w in (1, 5, 6)]


# -- query keys ---------------------------------------------------------------------------------

def query_pool(es: Any, *, alias: str, data_dir: Path, n: int, rng: np.random.Generator) -> list[str]:
    """``n`` distinct queries, most popular first: real playlist titles (by how many playlist
    rows carry the title) interleaved with catalog titles (tracks, artists, albums, by
    popularity, from the catalog alias)."""
    counts: Counter[str] = Counter()
    with open(Path(data_dir) / "playlists_dev.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            name = (row.get("playlist_name") or "").strip()
            if 1 < len(name) <= 80:
                counts[name] += 1
    playlists = [t for t, _ in counts.most_common()]
    resp = es.search(index=alias, size=min(10_000, max(n, 50)), source=["title", "entity_type"],
                     query={"function_score": {
                         "query": {"terms": {"entity_type": ["track", "artist", "album"]}},
                         "functions": [{"field_value_factor": {"field": "popularity", "missing": 1,
                                                               "modifier": "log1p"}},
                                       {"random_score": {"seed": int(rng.integers(1 << 30)),
                                                         "field": "_seq_no"}}],
                         "boost_mode": "replace", "score_mode": "multiply"}})
    titles = [h["_source"]["title"] for h in resp["hits"]["hits"]
              if 1 < len(h["_source"].get("title") or "") <= 80]
    out: list[str] = []
    seen: set[str] = set()
    for pair in zip(playlists, titles):  # interleaved: both kinds in the head and the tail
        for q in pair:
            if q.lower() not in seen:
                seen.add(q.lower())
                out.append(q)
    for q in playlists[len(titles):] + titles[len(playlists):]:
        if q.lower() not in seen:
            seen.add(q.lower())
            out.append(q)
    return out[:n]


# -- templates: the product's own events ---------------------------------------------------------

def _last_entry(r: Any, stream: str, type_: str) -> dict[str, Any] | None:
    for _, fields in r.xrevrange(stream, count=5):
        f = {k.decode(): v.decode() for k, v in fields.items()}
        if f.get("type") == type_:
            return json.loads(f["data"])
    return None


class Templates:
    """Template impressions (one real search per query key) and lazily made template
    feedback (one real ``feedback`` call per (template, rank, action))."""

    def __init__(self, orch: Orchestrator, stream: str) -> None:
        self.orch = orch
        self.stream = stream
        self.impressions: list[dict[str, Any]] = []
        self._feedback: dict[tuple[int, int, str], dict[str, Any] | None] = {}
        self.search_s = 0.0
        self.feedback_s = 0.0

    def build(self, queries: list[str], rng: np.random.Generator) -> None:
        t0 = time.perf_counter()
        for q in queries:
            ctx = CONTEXTS[int(rng.integers(len(CONTEXTS)))]
            try:
                resp = self.orch.search(q, context=ctx, size=10)
            except Exception as exc:  # a query the product refuses is not a template
                logger.warning("template search %r failed: %s", q, exc)
                continue
            if not resp.results:
                continue
            ev = _last_entry(self.orch.redis, self.stream, "impression")
            if ev and ev.get("request_id") == resp.request_id:
                self.impressions.append(ev)
        self.search_s = time.perf_counter() - t0

    def feedback(self, t: int, rank: int, action: str) -> dict[str, Any] | None:
        key = (t, rank, action)
        if key not in self._feedback:
            imp = self.impressions[t]
            item = next((s for s in imp["shown"] if int(s["rank"]) == rank), None)
            ev = None
            if item is not None:
                t0 = time.perf_counter()
                try:
                    self.orch.feedback(imp["request_id"], item["id"], action)
                    ev = _last_entry(self.orch.redis, self.stream, "feedback")
                    if ev and (ev.get("request_id"), ev.get("item_id"), ev.get("action")) != (
                            imp["request_id"], item["id"], action):
                        ev = None
                except Exception as exc:
                    logger.warning("template feedback failed: %s", exc)
                self.feedback_s += time.perf_counter() - t0
            self._feedback[key] = ev
        return self._feedback[key]

    @property
    def n_feedback_templates(self) -> int:
        return sum(1 for v in self._feedback.values() if v is not None)


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds")


def generate(templates: Templates, *, n_events: int, zipf: float, p_feedback: float, days: float,
             actions: dict[str, float], rng: np.random.Generator) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(type, event)`` in time order: Zipf-repeated template impressions under new request
    ids, some followed by feedback (1-3 actions, ranks with a 1/rank examination decay)."""
    k = len(templates.impressions)
    weights = 1.0 / np.arange(1, k + 1) ** zipf
    weights /= weights.sum()
    names = list(actions)
    probs = np.asarray([actions[a] for a in names])
    probs /= probs.sum()
    t_end = time.time()
    t = t_end - days * 86400.0
    step = days * 86400.0 / max(n_events, 1)
    emitted = 0
    while emitted < n_events:
        i = int(rng.choice(k, p=weights))
        imp = templates.impressions[i]
        rid = str(uuid.uuid4())
        t += step * (0.5 + rng.random())
        yield "impression", {**imp, "request_id": rid, "ts": _iso(t)}
        emitted += 1
        if emitted >= n_events or rng.random() >= p_feedback:
            continue
        n_shown = len(imp["shown"])
        exam = 1.0 / np.arange(1, n_shown + 1)
        exam /= exam.sum()
        done: set[tuple[int, str]] = set()
        for _ in range(1 + int(rng.random() < 0.35) + int(rng.random() < 0.1)):
            rank = int(rng.choice(n_shown, p=exam)) + 1
            action = names[int(rng.choice(len(names), p=probs))]
            if (rank, action) in done:
                continue
            done.add((rank, action))
            fb = templates.feedback(i, rank, action)
            if fb is None:
                continue
            t += rng.random() * 30.0 * step
            yield "feedback", {**fb, "request_id": rid, "ts": _iso(t)}
            emitted += 1
            if emitted >= n_events:
                break


# -- the measurements ---------------------------------------------------------------------------

def _fill_stream(r: Any, stream: str, events: list[tuple[str, dict[str, Any]]]) -> None:
    pipe = r.pipeline(transaction=False)
    for n, (typ, ev) in enumerate(events, start=1):
        fields = {"type": typ, "data": json.dumps(ev, separators=(",", ":"))}
        if typ == "impression":  # as the product writes it (FeedbackLog)
            fields["mem"] = compact_impression(ev)
        pipe.xadd(stream, fields)
        if n % 2000 == 0:
            pipe.execute()
    pipe.execute()


def measure_move(s: OrchestratorSettings, es: Any, r: Any, log: Iterator[tuple[str, dict[str, Any]]],
                 *, n: int, chunk: int) -> dict[str, Any]:
    from orchestrator import tasks

    stream = f"{s.redis.key_prefix}events"
    moved = failed = 0
    move_s = fill_s = 0.0
    left = n
    while left > 0:
        batch = [e for _, e in zip(range(min(chunk, left)), log)]
        if not batch:
            break
        left -= len(batch)
        t0 = time.perf_counter()
        _fill_stream(r, stream, batch)
        fill_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        while True:
            res = tasks.run_move_events(s, es, r)
            moved += res["moved"] + res.get("reclaimed", 0)
            failed += res.get("failed", 0)
            if res["moved"] == 0:
                break
        move_s += time.perf_counter() - t0
    return {"events": moved, "failed": failed, "seconds": round(move_s, 2),
            "events_per_s": round(moved / move_s, 1) if move_s else None,
            "stream_write_events_per_s": round(moved / fill_s, 1) if fill_s else None}


def measure_job(name: str, job: Any, s: OrchestratorSettings, es: Any, r: Any, *,
                n_events: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        res = job(s, es, r)
        error = None
    except Exception as exc:  # report it, measure the rest
        logger.exception("%s failed", name)
        res, error = {}, f"{type(exc).__name__}: {exc}"
    sec = time.perf_counter() - t0
    out: dict[str, Any] = {"events": n_events, "seconds": round(sec, 2),
                           "events_per_s": round(n_events / sec, 1) if sec and not error else None}
    if error:
        out["error"] = error
    summary = {k: v for k, v in res.items() if isinstance(v, (int, float, str, bool)) or v is None}
    if summary:
        out["result"] = summary
    return out


def measure_memory(**candidates: Any) -> dict[str, Any]:
    """``learning_memory.measure(...)``, called with the arguments its signature names."""
    try:
        mod = importlib.import_module("learning_memory")
    except ModuleNotFoundError as exc:
        if exc.name != "learning_memory":
            raise
        return {"missing": "benchmarks/learning_memory.py is not there yet (hook: measure(...))"}
    fn = getattr(mod, "measure", None)
    if fn is None:
        return {"missing": "benchmarks/learning_memory.py has no measure()"}
    params = inspect.signature(fn).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in candidates.items() if takes_all or k in params}
    try:
        return dict(fn(**kwargs))
    except Exception as exc:
        logger.exception("learning_memory.measure failed")
        return {"error": f"{type(exc).__name__}: {exc}"}


def _git_version() -> dict[str, Any]:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    changed = [ln[3:] for ln in git("status", "--porcelain").splitlines()
               if ln[3:].startswith(("orchestrator/", "benchmarks/"))]
    return {"commit": git("rev-parse", "HEAD"), "uncommitted_files": sorted(changed)}


def _repeat_stats(keys: Counter[str]) -> dict[str, Any]:
    c = np.asarray(sorted(keys.values(), reverse=True), dtype=float)
    total = float(c.sum()) or 1.0
    return {"distinct_query_keys": int(len(c)),
            "top1_share": round(float(c[:1].sum()) / total, 4),
            "top10_share": round(float(c[:10].sum()) / total, 4),
            "top100_share": round(float(c[:100].sum()) / total, 4),
            "median_repeats": float(np.median(c)) if len(c) else 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1_000_000, help="events in the generated log")
    ap.add_argument("--indexed-events", type=int, default=100_000,
                    help="first events of the log moved to Elasticsearch and retrained on")
    ap.add_argument("--templates", type=int, default=1500, help="distinct query keys (real searches)")
    ap.add_argument("--zipf", type=float, default=1.0, help="exponent of the query-key repeats")
    ap.add_argument("--p-feedback", type=float, default=0.4, help="share of impressions with feedback")
    ap.add_argument("--days", type=float, default=14.0, help="time span of the log")
    ap.add_argument("--chunk", type=int, default=20_000, help="stream entries per move round")
    ap.add_argument("--memory-events", type=int, default=200_000,
                    help="first events of the log given to learning_memory.measure (its update "
                         "and repair paths run at ~2k events/s here: the whole 1M takes ~20 min)")
    ap.add_argument("--alias", default=None, help="catalog alias, read only (default: settings)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", default="train_memory",  # --smoke: also train_qu
                    help="comma-separated tasks.CHAIN jobs not to run (default: train_memory, "
                         "which writes into the catalog; memory is learning_memory's)")
    ap.add_argument("--out", type=Path, default=None,
                    help="default benchmarks/results/learning.json (--smoke: a temp dir)")
    ap.add_argument("--smoke", action="store_true",
                    help="CI: 2k events from 20 template searches on test-ltrr-catalog, "
                         "train_qu skipped (its fixed cost is ~50 s), JSON to a temp dir")
    args = ap.parse_args(argv)
    if args.smoke:
        args.events = min(args.events, 2000)
        args.templates = min(args.templates, 20)
        args.chunk = min(args.chunk, 1000)
        if args.skip == "train_memory":
            args.skip = "train_memory,train_qu"
        args.alias = args.alias or "test-ltrr-catalog"
    args.indexed_events = min(args.indexed_events, args.events)
    if args.out is None:
        args.out = (Path(tempfile.mkdtemp(prefix="ltrr-smoke-learning-")) / "learning.json"
                    if args.smoke else HERE / "results" / "learning.json")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("elastic_transport", "orchestrator"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    run = uuid.uuid4().hex[:8]
    prefix = f"bench-learning-{run}:"
    events_alias = f"bench-learning-{run}-events"
    work = Path(tempfile.mkdtemp(prefix="ltrr-bench-learning-"))
    base = OrchestratorSettings()
    qu_dir = work / "qu_models"
    shutil.copytree(base.qu.model_dir, qu_dir)
    s = base.model_copy(update={
        "redis": base.redis.model_copy(update={"key_prefix": prefix}),
        "es": base.es.model_copy(update={"catalog_alias": args.alias or base.es.catalog_alias,
                                         "events_alias": events_alias}),
        "rescorer": base.rescorer.model_copy(update={"model_dir": work / "rescorer"}),
        "qu": base.qu.model_copy(update={"model_dir": qu_dir}),
    })
    rng = np.random.default_rng(args.seed)
    # Template searches and feedback run under a prefix of their own: the measured stream
    # holds the generated log only.
    s_tpl = s.model_copy(update={"redis": s.redis.model_copy(update={"key_prefix": f"bench-learning-{run}-tpl:"})})
    orch = Orchestrator.from_settings(s_tpl, bandit={"seed": args.seed})
    es, r = orch.es, orch.redis
    t_start = time.time()
    load_before = os.getloadavg()
    result: dict[str, Any] = {}
    try:
        queries = query_pool(es, alias=s.es.catalog_alias, data_dir=s.ingest.data_dir,
                             n=args.templates, rng=rng)
        templates = Templates(orch, f"{s_tpl.redis.key_prefix}events")
        templates.build(queries, rng)
        if not templates.impressions:
            raise SystemExit("no template search returned results")
        actions = {a: p for a, p in ACTION_SHARES.items()
                   if a in getattr(orch.reward_model, "action_values", ACTION_SHARES)}
        log = generate(templates, n_events=args.events, zipf=args.zipf, p_feedback=args.p_feedback,
                       days=args.days, actions=actions, rng=rng)
        keys: Counter[str] = Counter()
        types: Counter[str] = Counter()
        positions: Counter[int] = Counter()

        def counted(it: Iterator[tuple[str, dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
            for typ, ev in it:
                types[typ] += 1
                if typ == "impression":
                    keys[ev.get("query_key") or ev.get("query")] += 1
                else:
                    positions[int(ev.get("position") or ev.get("rank") or 0)] += 1
                yield typ, ev

        # The whole log, in memory: each event is a shallow copy of its template (the nested
        # parts are shared), about 1.5 KB per event in Python.
        t1 = time.perf_counter()
        events = list(counted(log))
        gen_s = time.perf_counter() - t1
        t0 = time.perf_counter()
        tasks_out: dict[str, Any] = {"move_events": measure_move(
            s, es, r, iter(events[: args.indexed_events]), n=args.indexed_events, chunk=args.chunk)}
        indexed = int(es.count(index=events_alias)["count"])
        from orchestrator import tasks

        skip = {x.strip() for x in args.skip.split(",") if x.strip()}
        for name, job in tasks.CHAIN:
            if name == "move_events":
                continue
            if name in skip:
                why = ("writes into the catalog; see the memory paths" if name == "train_memory"
                       else "skipped (--skip / --smoke)")
                tasks_out[name] = {"events": 0, "seconds": 0.0, "events_per_s": None, "skipped": why}
                continue
            tasks_out[name] = measure_job(name, job, s, es, r, n_events=indexed)
        # The memory paths run on the whole log (the stream's shape: {"type", **data}).
        memory = measure_memory(
            es=es, redis=r, events=[{"type": typ, **ev} for typ, ev in events[: args.memory_events]],
            catalog_alias=s.es.catalog_alias, memory_alias=f"bench-learning-{run}-memory",
            prefix=f"bench-learning-{run}-mem:", settings=s, seed=args.seed,
            feedbacks=3 if args.smoke else 30,
            compare_batch_sizes=(1000,), compare_events=2000 if args.smoke else 60_000,
            compare_neighbours=True, log=lambda *a, **k: print(*a, file=sys.stderr, flush=True))
        total_s = time.perf_counter() - t0
        retrain = {k: v.get("events_per_s") for k, v in tasks_out.items() if not v.get("skipped")}
        retrain.update({k: v for k, v in (memory.get("retrain_events_per_s") or {}).items()})
        n_log = sum(types.values())
        result = {
            "command": "python benchmarks/learning.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "smoke": args.smoke,
            "started_at": _iso(t_start),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform(),
                        "es": es.cluster.health().get("cluster_name"),
                        "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
                        "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
                        "note": "one process = one worker; Elasticsearch, Redis and whatever else "
                                "runs (loadavg) share the machine"},
            "code_version": _git_version(),
            "catalog_alias": s.es.catalog_alias,
            "log": {"events": n_log, "impressions": types["impression"], "feedback": types["feedback"],
                    "templates": len(templates.impressions),
                    "feedback_templates": templates.n_feedback_templates,
                    "template_search_s": round(templates.search_s, 1),
                    "template_feedback_s": round(templates.feedback_s, 1),
                    "zipf": args.zipf, "p_feedback": args.p_feedback, "days": args.days,
                    "actions": actions, **_repeat_stats(keys),
                    "feedback_by_position": {str(k): v for k, v in sorted(positions.items())},
                    "generate_events_per_s": round(n_log / gen_s, 1) if gen_s else None},
            "indexed_events": indexed,
            "retrain_events_per_s": retrain,
            "tasks": tasks_out,
            "memory_freshness_s": memory.get("memory_freshness_s"),
            "memory_update_pairs_per_s": memory.get("memory_update_pairs_per_s"),
            "memory": memory,
            "memory_events": min(args.memory_events, n_log),
            "target_events_per_s_incremental": 50_000,
            "total_s": round(total_s, 1),
        }
    finally:
        orch.close()
        for key in r.scan_iter(match=f"bench-learning-{run}*", count=1000):
            r.delete(key)
        es.indices.delete(index=f"bench-learning-{run}-*", ignore_unavailable=True,
                          allow_no_indices=True)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(Path(f"{qu_dir}.candidate"), ignore_errors=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lg = result["log"]
    print(f"log: {lg['events']} events ({lg['impressions']} impressions, {lg['feedback']} feedback), "
          f"{lg['distinct_query_keys']} query keys (top-10 share {lg['top10_share']}), "
          f"{lg['templates']} template searches; {indexed} events indexed; "
          f"{os.cpu_count()} CPUs")
    print(f"{'task (one worker)':<26}{'events':>10}{'seconds':>10}{'events/s':>12}  note")
    for name, t in result["tasks"].items():
        eps = t.get("events_per_s")
        note = t.get("error") or t.get("skipped") or ""
        print(f"{name:<26}{t['events']:>10}{t['seconds']:>10.2f}"
              f"{(f'{eps:,.0f}' if eps else '-'):>12}  {note}")
    mem = result["memory"]
    n_mem = (mem.get("details") or {}).get("events", "")
    if "missing" in mem or "error" in mem:
        print(f"{'memory paths':<26}{'':>10}{'':>10}{'-':>12}  {mem.get('missing') or mem.get('error')}")
    else:
        for k, v in (mem.get("retrain_events_per_s") or {}).items():
            print(f"{'memory: ' + k:<26}{n_mem:>10}{'':>10}{(f'{v:,.0f}' if v else '-'):>12}  "
                  "learning_memory.measure")
        details = mem.get("details") or {}
        read = (details.get("update_memory") or {}).get("stream_read_events_per_s")
        if read:
            print(f"{'memory: stream read only':<26}{n_mem:>10}{'':>10}{read:>12,.0f}  "
                  "XRANGE of the same entries, no work: any consumer's ceiling")
        for label, name in (("batch ", "batch_sizes"), ("", "neighbours")):
            cmp = (details.get(name) or {})
            for b, runs in (cmp.get("events_per_s") or {}).items():
                print(f"{'memory: ' + label + b:<26}{cmp['events']:>10}{'':>10}"
                      f"{sum(runs) / len(runs):>12,.0f}  update_memory, side by side "
                      f"({', '.join(f'{x:,.0f}' for x in runs)})")
        fr = mem.get("memory_freshness_s") or {}
        print(f"memory freshness s: p50 {fr.get('p50')} p95 {fr.get('p95')} (n={fr.get('n')}); "
              f"memory update pairs/s: {mem.get('memory_update_pairs_per_s')}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
