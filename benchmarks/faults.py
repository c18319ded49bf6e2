"""How long failures take to surface, on a PRIVATE Elasticsearch + Redis pair.

Starts (or reuses) the pair with ``scripts/services`` on other ports and another state dir
(default: ports 9251 / 6391, state ``/tmp/ltrr-faults``, as ``tests/integration/test_faults.py``),
indexes nothing itself: it needs the ``faults-catalog`` alias that test module builds (run it
once first). Then, with the default ``settings.resilience``:

``es_stopped``
    the node process is stopped (connection refused): wall time of successive searches until
    the circuit breaker fails them without a connection attempt.
``es_hung``
    the node is frozen with SIGSTOP (connections accepted, never answered): wall time of
    successive searches; the first ones wait ``es_search_timeout_s`` x (retries + 1), then the
    breaker opens.
``redis_stopped``
    Redis is stopped: search latency (impression spooled), feedback acknowledgement latency
    (spool append + fsync), then the time to replay everything once Redis is back.
``redis_hung``
    Redis frozen with SIGSTOP: wall time of successive searches (the probe that finds Redis
    hung waits for the socket time-out; the others spool at once).

Prints a table and writes ``benchmarks/results/faults.json``. The private services are left
running and restored (SIGCONT, start) whatever happens.

Usage::

    python benchmarks/faults.py [--rounds 6]
    python benchmarks/faults.py --smoke

``--smoke`` (CI) uses a pair of its own (ports 9261 / 6401, state ``/tmp/ltrr-faults-smoke``,
so it never meets the fault tests' pair), indexes the jazz and blues tracks into its
``faults-catalog`` itself (no embeddings: the two lexical arms need none), runs 1 call per
scenario (5 for the healthy and Redis-stopped series), writes the JSON to a temp dir and stops
its pair afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from orchestrator.errors import ServiceUnavailableError
from orchestrator.es_client import build_client
from orchestrator.pipeline import Orchestrator
from orchestrator.redis_client import build_redis
from orchestrator.settings import PROJECT_ROOT, EsSettings, OrchestratorSettings, RedisSettings
from orchestrator.templates import TemplateRegistry

STATE = os.environ.get("LTRR_FAULTS_STATE", "/tmp/ltrr-faults")
ES_PORT = os.environ.get("LTRR_FAULTS_ES_PORT", "9251")
REDIS_PORT = os.environ.get("LTRR_FAULTS_REDIS_PORT", "6391")
ENV = {"LTRR_STATE": STATE, "LTRR_ES_PORT": ES_PORT, "LTRR_REDIS_PORT": REDIS_PORT,
       "LTRR_ES_HEAP": "512m"}
ALIAS = "faults-catalog"
QUERIES = ["miles davis", "take five", "so what", "summertime", "bb king", "autumn leaves"]


def services(cmd: str) -> None:
    subprocess.run(["bash", str(PROJECT_ROOT / "scripts" / "services"), cmd],
                   env={**os.environ, **ENV}, check=True, timeout=300, capture_output=True)


def es_pid() -> int:
    return int(Path(STATE, "es.pid").read_text().strip())


def redis_pid() -> int:
    return int(Path(STATE, "redis", "redis.pid").read_text().strip())


def resume_leftovers() -> None:
    """SIGCONT this pair's processes, if any are up: a run killed while it had one stopped
    (the hung scenarios) leaves it stopped, and ``services up`` / ``down`` then wait on it
    until they time out (what a killed smoke run did to the next one)."""
    for pid_of in (es_pid, redis_pid):
        try:
            os.kill(pid_of(), signal.SIGCONT)
        except (OSError, ValueError):
            pass  # no pid file, or no such process: nothing is stopped


def timed(fn) -> tuple[float, str]:
    t0 = time.perf_counter()
    try:
        fn()
        outcome = "ok"
    except ServiceUnavailableError as exc:
        outcome = "503 circuit open" if "circuit open" in str(exc) else "503"
    return (time.perf_counter() - t0) * 1000, outcome


def wait_until_searching(orch: Orchestrator, timeout_s: float = 60.0) -> None:
    """After a fault: retry a search until it succeeds (the breaker half-opens), or time out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and timed(lambda: orch.search("so what", size=5))[1] != "ok":
        time.sleep(0.5)


def build(spool_dir: str) -> Orchestrator:
    s = OrchestratorSettings()
    s = s.model_copy(update={
        "es": s.es.model_copy(update={"url": f"http://127.0.0.1:{ES_PORT}", "catalog_alias": ALIAS}),
        "redis": s.redis.model_copy(update={"url": f"redis://127.0.0.1:{REDIS_PORT}/0",
                                            "key_prefix": f"bench-faults:{uuid.uuid4().hex[:6]}:"}),
        "templates": s.templates.model_copy(update={"mode": "local"}),
    })
    real = TemplateRegistry.from_dir(PROJECT_ROOT / "query_templates").by_id
    registry = TemplateRegistry({k: real[k] for k in ("lexical.v1", "lexical_popular.v1")})
    return Orchestrator.from_settings(
        s, es=build_client(EsSettings(url=s.es.url)), redis=build_redis(RedisSettings(url=s.redis.url)),
        understander=None, registry=registry, resilience={"spool_dir": spool_dir})


def use_smoke_pair() -> None:
    """Point this module at the smoke pair (its own ports and state dir)."""
    global STATE, ES_PORT, REDIS_PORT
    STATE = os.environ.get("LTRR_FAULTS_SMOKE_STATE", "/tmp/ltrr-faults-smoke")
    ES_PORT = os.environ.get("LTRR_FAULTS_SMOKE_ES_PORT", "9261")
    REDIS_PORT = os.environ.get("LTRR_FAULTS_SMOKE_REDIS_PORT", "6401")
    ENV.update({"LTRR_STATE": STATE, "LTRR_ES_PORT": ES_PORT, "LTRR_REDIS_PORT": REDIS_PORT})


def index_smoke_catalog() -> None:
    """The jazz and blues tracks (and their albums and artists; the fault tests' slice, without
    embeddings) behind ``faults-catalog``, once."""
    from orchestrator.catalog import CatalogBuilder
    from orchestrator.ingest import CatalogIndexer

    es = build_client(EsSettings(url=f"http://127.0.0.1:{ES_PORT}", request_timeout_s=60))
    if es.indices.exists_alias(name=ALIAS) and es.count(index=ALIAS)["count"] > 1000:
        return
    es.indices.delete(index=f"{ALIAS}*", ignore_unavailable=True, allow_no_indices=True)
    s = OrchestratorSettings()
    CatalogIndexer(es, alias=ALIAS, mappings_dir=s.ingest.mappings_dir, encoder=None,
                   keep_old_indices=0, chunk_size=s.ingest.chunk_size,
                   thread_count=s.ingest.thread_count).run(
        CatalogBuilder(s.ingest.data_dir, genres={"jazz", "blues"}), progress=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", type=Path, default=None,
                    help="default benchmarks/results/faults.json (--smoke: a temp dir)")
    ap.add_argument("--smoke", action="store_true", help="see the module docstring (CI)")
    args = ap.parse_args()
    n_calls = 40
    if args.smoke:
        use_smoke_pair()
        args.rounds, n_calls = 1, 5
    if args.out is None:
        args.out = (Path(tempfile.mkdtemp(prefix="ltrr-smoke-faults-")) / "faults.json" if args.smoke
                    else PROJECT_ROOT / "benchmarks" / "results" / "faults.json")
    # Terminated (the smoke test's teardown): unwind, so the finally blocks resume a stopped
    # process and stop the smoke pair.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return run(args, n_calls)
    finally:
        resume_leftovers()
        if args.smoke:
            services("down")


def run(args: argparse.Namespace, n_calls: int) -> int:
    resume_leftovers()
    services("up")
    if args.smoke:
        index_smoke_catalog()
    spool_dir = tempfile.mkdtemp(prefix="ltrr-bench-spool-")
    orch = build(spool_dir)
    res = orch.resilience_status()
    out: dict[str, Any] = {"smoke": args.smoke, "es_port": ES_PORT, "redis_port": REDIS_PORT,
                           "settings": OrchestratorSettings().resilience.model_dump(mode="json"),
                           "breaker": res["elasticsearch_breaker"]}
    for q in QUERIES:  # warm up (encoder, connections, posteriors)
        orch.search(q, size=5)
    healthy_search, healthy_fb = [], []
    for i in range(n_calls):  # the same calls with both services up, for comparison
        holder: list[Any] = []
        ms, _ = timed(lambda i=i, h=holder: h.append(orch.search(QUERIES[i % len(QUERIES)], size=5)))
        healthy_search.append(ms)
        ms, _ = timed(lambda r=holder[0]: orch.feedback(r.request_id, r.results[0].id, "click"))
        healthy_fb.append(ms)
    out["healthy"] = {"search_ms_median": statistics.median(healthy_search),
                      "feedback_ms_median": statistics.median(healthy_fb)}

    # Elasticsearch stopped
    services("stop-es")
    try:
        out["es_stopped"] = [timed(lambda: orch.search("miles davis", size=5)) for _ in range(args.rounds)]
    finally:
        services("start-es")
    wait_until_searching(orch)

    # Elasticsearch hung
    os.kill(es_pid(), signal.SIGSTOP)
    try:
        out["es_hung"] = [timed(lambda: orch.search("take five", size=5)) for _ in range(args.rounds)]
    finally:
        os.kill(es_pid(), signal.SIGCONT)
    wait_until_searching(orch)

    # Redis stopped
    resp = [orch.search(q, size=5) for q in QUERIES]
    # Keep the background replayer out of the way, so the replay below is what gets timed.
    orch.writer.replay_interval_s = 3600
    services("stop-redis")
    try:
        search_ms, fb_ms = [], []
        for i in range(n_calls):
            ms, _ = timed(lambda i=i: resp.append(orch.search(QUERIES[i % len(QUERIES)], size=5)))
            search_ms.append(ms)
            r = resp[-1]
            ms, _ = timed(lambda r=r: orch.feedback(r.request_id, r.results[0].id, "click"))
            fb_ms.append(ms)
        spooled = orch.resilience_status()["spool"]["spooled"]
    finally:
        services("start-redis")
    t0 = time.perf_counter()
    replayed = orch.replay_spool()
    replay_ms = (time.perf_counter() - t0) * 1000
    assert replayed == spooled and orch.resilience_status()["spool"]["spooled"] == 0
    orch.writer.close()
    orch.writer.replay_interval_s = 1.0
    out["redis_stopped"] = {"search_ms_median": statistics.median(search_ms),
                            "search_ms_max": max(search_ms),
                            "feedback_ack_ms_median": statistics.median(fb_ms),
                            "feedback_ack_ms_max": max(fb_ms), "spooled": spooled,
                            "replay_all_ms": replay_ms}

    # Redis hung
    os.kill(redis_pid(), signal.SIGSTOP)
    try:
        out["redis_hung"] = [timed(lambda: orch.search("summertime", size=5)) for _ in range(args.rounds)]
    finally:
        os.kill(redis_pid(), signal.SIGCONT)
    deadline = time.monotonic() + 60
    while orch.resilience_status()["spool"]["spooled"] and time.monotonic() < deadline:
        orch.replay_spool()
        time.sleep(0.1)
    orch.close()
    for key in orch.redis.scan_iter(match=orch.store.prefix + "*", count=1000):
        orch.redis.delete(key)

    print(f"{'scenario':<14} {'call':>4} {'ms':>10}  outcome")
    for name in ("es_stopped", "es_hung", "redis_hung"):
        for i, (ms, outcome) in enumerate(out[name], start=1):
            print(f"{name:<14} {i:>4} {ms:>10.1f}  {outcome}")
    rs = out["redis_stopped"]
    print(f"healthy:       search median {out['healthy']['search_ms_median']:.1f} ms, "
          f"feedback median {out['healthy']['feedback_ms_median']:.1f} ms")
    print(f"redis_stopped: search median {rs['search_ms_median']:.1f} ms (max {rs['search_ms_max']:.1f}), "
          f"feedback ack median {rs['feedback_ack_ms_median']:.1f} ms (max {rs['feedback_ack_ms_max']:.1f}), "
          f"{rs['spooled']} writes spooled, replayed in {rs['replay_all_ms']:.0f} ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
