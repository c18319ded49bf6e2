"""Load test of the HTTP API: ``POST /search`` + ``POST /feedback`` at increasing concurrency.

For each server configuration (``ltrr serve`` with 1 and 2 uvicorn workers by default:
replicas sharing Redis) it starts the API as a subprocess on 127.0.0.1 (a free port, its own Redis key prefix
``load:<run>:w<N>:`` so the run's state is isolated and countable), warms every worker up,
then runs one headless locust process per concurrency step (``benchmarks/locustfile.py``:
closed loop, no think time, real queries; each step bounded by ``--step-seconds``) and
reports per step: requests/s, searches/s, p50/p95/p99 of ``/search`` and ``/feedback`` and
errors. It stops at saturation: the first step whose throughput gains less than
``--saturation-gain`` over the previous one, or that has errors, or whose ``/search`` p95
is more than ``--p95-blowup`` times that of the first step.

"Nothing lost": after the steps it compares what the clients were told with what Redis
holds under the prefix:

* feedback acknowledged (HTTP 200, ``duplicate == false``, not ``capped``) == ``type=feedback``
  entries of the ``<prefix>events`` stream == members of the ``<prefix>fb:*`` dedupe sets,
  after the server's durable spool (Redis writes made while Redis was slow) has drained;
* retried feedback (same request, item, action) refused as a replay (409), never stored;
* searches answered 200 (+ the warm-up searches) == ``type=impression`` stream entries.

Usage::

    python benchmarks/load.py                              # ltrr-catalog, 1 and 2 workers
    python benchmarks/load.py --workers 1 --users 1,2,4 --step-seconds 10
    python benchmarks/load.py --alias test-ltrr-catalog --workers 1 --users 1,3 \\
        --step-seconds 5 --no-stop --keep-keys --prefix test:abc: --out /tmp/smoke.json
    python benchmarks/load.py --smoke    # CI: test-ltrr-catalog, 1 worker, 1 and 2 users, 3 s steps

Prints a table and writes ``benchmarks/results/load.json``; exits 1 when anything was lost
or a 5xx was served. The server's per-client feedback rate limit and influence cap are
raised out of reach unless ``--server-limits`` (one locust process is one client).
Loopback only; Redis keys of the run are deleted afterwards unless ``--keep-keys``. An API key for the server is sent as ``X-API-Key`` (``--api-key`` or env
``LTRR_LOAD_API_KEY``); the server itself reads its settings from the ``LTRR_*`` environment
as usual. Locust runs in child processes because it monkey-patches the standard library with
gevent on import.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
import psutil

from orchestrator.es_client import build_client
from orchestrator.pipeline import EMPTY_ACTION
from orchestrator.redis_client import build_redis
from orchestrator.settings import OrchestratorSettings

HERE = Path(__file__).resolve().parent
LOCUSTFILE = HERE / "locustfile.py"
WARMUP_QUERIES = ["Hey Jude", "chill jazz", "Taylor Swift", "Hard Rock Workout", "Despacito",
                  "sad songs", "Bohemian Rhapsody", "Tropical Vibes"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"),
                "mean": float("nan"), "n": 0}
    a = np.asarray(xs, dtype=float)
    return {"p50": round(float(np.percentile(a, 50)), 1), "p95": round(float(np.percentile(a, 95)), 1),
            "p99": round(float(np.percentile(a, 99)), 1), "mean": round(float(a.mean()), 1),
            "n": int(a.size)}


class Server:
    """The product's server, ``ltrr serve --workers N``, on 127.0.0.1 in its own session
    (``LTRR_LOG__LEVEL=WARNING``: one JSON access record per request would be the log's bulk)."""

    def __init__(self, *, workers: int, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.cmd = [sys.executable, "-c", "from orchestrator.cli import main; main()", "serve",
                    "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers)]
        self.label = f"ltrr serve --workers {workers}"
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(self.cmd, env={"LTRR_LOG__LEVEL": "WARNING", **env},
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}): "
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=5.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout:.0f}s: {self.url}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # uvicorn's supervisor stops its workers
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the session this script started
                self.proc.wait(timeout=10)
        self._log.close()

    def log_errors(self) -> int:
        text = self.log_path.read_text(errors="replace")
        return text.count("Traceback (most recent call last)")


def warm_up(url: str, workers: int, headers: dict[str, str]) -> int:
    """Searches until every worker has built its orchestrator (models loaded); returns how
    many were answered 200 (each stored an impression)."""
    body = [{"query": WARMUP_QUERIES[i % len(WARMUP_QUERIES)], "size": 10}
            for i in range(8 * workers)]

    def one(b: dict[str, Any]) -> int:
        return httpx.post(url + "/search", json=b, headers=headers, timeout=120.0).status_code

    with ThreadPoolExecutor(max_workers=2 * workers) as pool:
        codes = list(pool.map(one, body))
    return sum(1 for c in codes if c == 200)


def listening_pid(port: int) -> int | None:
    """The process listening on ``port`` (Elasticsearch), for CPU accounting; None if unknown."""
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                return int(c.pid)
    except psutil.Error:
        pass
    return None


def _tree_cpu_s(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        root = psutil.Process(pid)
        total = 0.0
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                continue
        return total
    except psutil.Error:
        return None


class CpuMeter:
    """Cores used during a step (CPU seconds / wall seconds): the whole machine, the API server's
    process tree, Elasticsearch, Redis, and this script's finished children (the locust
    process); ``other`` is the rest: the kernel and whatever else runs on the machine meanwhile
    (other people's tests on a shared machine)."""

    def __init__(self, *, server_pid: int, es_pid: int | None, redis_pid: int | None) -> None:
        self.server_pid, self.es_pid, self.redis_pid = server_pid, es_pid, redis_pid

    def _snap(self) -> dict[str, float | None]:
        ct = psutil.cpu_times()
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {"wall": time.monotonic(),
                "machine": sum(ct) - ct.idle - getattr(ct, "iowait", 0.0),
                "server": _tree_cpu_s(self.server_pid), "es": _tree_cpu_s(self.es_pid),
                "redis": _tree_cpu_s(self.redis_pid), "locust": kids.ru_utime + kids.ru_stime}

    def start(self) -> None:
        self._t0 = self._snap()

    def stop(self) -> dict[str, float | None]:
        t1, t0 = self._snap(), self._t0
        wall = t1["wall"] - t0["wall"]  # type: ignore[operator]
        out: dict[str, float | None] = {}
        for k in ("machine", "server", "es", "redis", "locust"):
            a, b = t0[k], t1[k]
            out[k] = None if a is None or b is None else round((b - a) / wall, 2)
        known = [out[k] for k in ("server", "es", "redis", "locust")]
        out["other"] = (round(out["machine"] - sum(known), 2)  # type: ignore[operator, arg-type]
                        if None not in known and out["machine"] is not None else None)
        return out


def wait_spool_drained(url: str, headers: dict[str, str], timeout: float = 30.0) -> str:
    """``/healthz``'s spool status once no Redis write waits in the durable spool (or after
    ``timeout``): acknowledged writes spooled while Redis was slow must reach Redis too."""
    deadline = time.monotonic() + timeout
    status = "unknown"
    while True:
        try:
            status = str(httpx.get(url + "/healthz", headers=headers, timeout=10.0)
                         .json().get("spool", "n/a"))
        except (httpx.HTTPError, ValueError) as exc:
            status = f"healthz failed: {exc}"
        if status in ("ok", "n/a") or time.monotonic() > deadline:
            return status
        time.sleep(1.0)


def run_step(*, users: int, url: str, seconds: int, stop_timeout: int, workdir: Path, tag: str,
             env: dict[str, str]) -> dict[str, Any]:
    """One headless locust process with ``users`` users for ``seconds``; returns its counts and
    samples (written by the locustfile when it quits)."""
    out = workdir / f"{tag}.json"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
           "-u", str(users), "-r", str(users), "--run-time", f"{seconds}s",
           "--stop-timeout", str(stop_timeout), "--host", url, "--only-summary",
           "--exit-code-on-error", "0"]
    with (workdir / f"{tag}.log").open("wb") as log:
        proc = subprocess.run(cmd, env={**env, "LTRR_LOAD_OUT": str(out)}, stdout=log,
                              stderr=subprocess.STDOUT, timeout=seconds + stop_timeout + 120)
    if proc.returncode != 0 or not out.exists():
        tail = (workdir / f"{tag}.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"locust step {tag} failed (rc={proc.returncode}): {tail}")
    return json.loads(out.read_text())


def step_stats(raw: dict[str, Any], *, users: int, seconds: int, warmup_s: float) -> dict[str, Any]:
    """Throughput and latency percentiles over the measured window: requests started between
    ``warmup_s`` after the first request and the end of the step's run time."""
    samples = raw["samples"]
    t0 = min(s[1] for s in samples) if samples else 0.0
    lo, hi = t0 + warmup_s, t0 + seconds
    window = [s for s in samples if lo <= s[1] < hi]
    dur = max(hi - lo, 1e-9)
    lat: dict[str, list[float]] = {"/search": [], "/feedback": []}
    for ep, _, ms, status in window:
        if status == 200:
            lat[ep].append(ms)
    statuses: dict[str, int] = {}
    for s in samples:
        statuses[str(s[3])] = statuses.get(str(s[3]), 0) + 1
    c = raw["counts"]
    return {
        "users": users, "window_s": round(dur, 2), "requests_total": len(samples),
        "requests_in_window": len(window),
        "rps": round(len(window) / dur, 2),
        "search_rps": round(sum(1 for s in window if s[0] == "/search") / dur, 2),
        "feedback_rps": round(sum(1 for s in window if s[0] == "/feedback") / dur, 2),
        "search_ms": pct(lat["/search"]), "feedback_ms": pct(lat["/feedback"]),
        "statuses": statuses, "errors": c["errors"], "errors_5xx": c["errors_5xx"],
        "counts": c,
    }


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def count_stored(redis_client: Any, prefix: str) -> dict[str, int]:
    """What Redis holds under ``prefix``: stream entries by type (user feedback apart from
    the ``empty`` observations the server logs itself for searches without results) and the
    members of the dedupe sets (same split)."""
    counts = {"stream_feedback": 0, "stream_empty": 0, "stream_impression": 0,
              "dedupe_members": 0, "dedupe_empty": 0}
    start = "-"
    key = prefix + "events"
    while True:
        batch = redis_client.xrange(key, min=start, count=5000)
        for _, raw in batch:
            fields = {_text(k): _text(v) for k, v in raw.items()}
            if fields.get("type") == "impression":
                counts["stream_impression"] += 1
            elif fields.get("type") == "feedback":
                action = json.loads(fields.get("data", "{}")).get("action")
                counts["stream_empty" if action == EMPTY_ACTION else "stream_feedback"] += 1
        if len(batch) < 5000:
            break
        start = "(" + _text(batch[-1][0])
    for k in redis_client.scan_iter(match=prefix + "fb:*", count=1000):
        for m in redis_client.smembers(k):
            empty = _text(m).endswith("\x1f" + EMPTY_ACTION)
            counts["dedupe_empty" if empty else "dedupe_members"] += 1
    counts["stream_len"] = int(redis_client.xlen(key))
    return counts


def saturated(steps: list[dict[str, Any]], gain: float, blowup: float) -> str | None:
    """Why the last step is at saturation (None: keep going)."""
    last = steps[-1]
    if last["errors"]:
        return f"{last['errors']} errors"
    if len(steps) >= 2:
        prev = steps[-2]
        if last["rps"] < prev["rps"] * (1 + gain):
            return (f"throughput {(last['rps'] / max(prev['rps'], 1e-9) - 1) * 100:+.1f}% "
                    f"< +{gain * 100:.0f}%")
        first_p95 = steps[0]["search_ms"]["p95"]
        if last["search_ms"]["p95"] > blowup * first_p95:
            return f"search p95 {last['search_ms']['p95']:.0f} ms > {blowup:g}x {first_p95:.0f} ms"
    return None


def fmt_row(label: str, s: dict[str, Any]) -> str:
    sm, fm = s["search_ms"], s["feedback_ms"]
    return (f"{label:>7} {s['users']:>5} {s['rps']:>8.1f} {s['search_rps']:>8.1f} "
            f"{sm['p50']:>7.0f} {sm['p95']:>7.0f} {sm['p99']:>7.0f} "
            f"{fm['p50']:>7.0f} {fm['p95']:>7.0f} {fm['p99']:>7.0f} "
            f"{s['errors']:>6} {_cores(s, 'machine')} {_cores(s, 'server')} {_cores(s, 'es')} "
            f"{_cores(s, 'redis')} {_cores(s, 'other')}  {s.get('saturation') or ''}")


def _cores(s: dict[str, Any], key: str) -> str:
    v = s.get("cpu_cores", {}).get(key)
    return f"{v:>5.2f}" if v is not None else f"{'?':>5}"


HEADER = (f"{'workers':>7} {'users':>5} {'req/s':>8} {'search/s':>8} "
          f"{'s p50':>7} {'s p95':>7} {'s p99':>7} {'fb p50':>7} {'fb p95':>7} {'fb p99':>7} "
          f"{'errors':>6} {'cpu':>5} {'api':>5} {'es':>5} {'redis':>5} {'other':>5}  saturation")


def run_config(*, workers: int, args: argparse.Namespace,
               base_env: dict[str, str], prefix: str, redis_client: Any, workdir: Path,
               headers: dict[str, str], es_pid: int | None,
               redis_pid: int | None) -> dict[str, Any]:
    label = f"{workers}"
    spool_dir = workdir / f"spool-w{label}"
    env = {**base_env, "LTRR_REDIS__KEY_PREFIX": prefix, "LTRR_ES__CATALOG_ALIAS": args.alias,
           "LTRR_RESILIENCE__SPOOL_DIR": str(spool_dir)}
    if not args.server_limits:
        # One locust process is one client (one address) sending far beyond what the per-client
        # abuse limits allow a real user: raise them out of reach, so the test measures
        # capacity while the limiter and influence-cap code still runs on every request.
        env |= {"LTRR_SECURITY__FEEDBACK_RATE_LIMIT": str(10**9),
                "LTRR_SECURITY__INFLUENCE_CAP": str(10**12)}
    server = Server(workers=workers, env=env, log_path=workdir / f"server-w{label}.log")
    steps: list[dict[str, Any]] = []
    reason = None
    try:
        t = time.monotonic()
        server.wait_ready()
        warm = warm_up(server.url, workers, headers)
        startup_s = time.monotonic() - t
        locust_env = {**base_env, "LTRR_LOAD_SEED": str(args.seed),
                      "LTRR_LOAD_P_FEEDBACK": str(args.p_feedback),
                      "LTRR_LOAD_P_RETRY": str(args.p_retry), "LTRR_LOAD_SIZE": str(args.size)}
        if args.api_key:
            locust_env["LTRR_LOAD_API_KEY"] = args.api_key
        meter = CpuMeter(server_pid=server.proc.pid, es_pid=es_pid, redis_pid=redis_pid)
        for users in args.users:
            load1 = os.getloadavg()[0]
            meter.start()
            raw = run_step(users=users, url=server.url, seconds=args.step_seconds,
                           stop_timeout=args.stop_timeout, workdir=workdir,
                           tag=f"w{label}-u{users}", env=locust_env)
            cpu = meter.stop()
            st = step_stats(raw, users=users, seconds=args.step_seconds,
                            warmup_s=args.warmup_seconds)
            st["loadavg_1m"] = round(load1, 2)
            st["cpu_cores"] = cpu
            steps.append(st)
            reason = saturated(steps, args.saturation_gain, args.p95_blowup)
            st["saturation"] = reason
            print(fmt_row(label, st), flush=True)
            if reason and not args.no_stop:
                break
        spool = wait_spool_drained(server.url, headers)
    finally:
        server.stop()
    spool_left = sum(len(f.read_text().splitlines()) for f in spool_dir.glob("*.jsonl")) \
        if spool_dir.exists() else 0
    sums: dict[str, int] = {}
    for st in steps:
        for k, v in st["counts"].items():
            sums[k] = sums.get(k, 0) + int(v)
    stored = count_stored(redis_client, prefix)
    lost = {
        "feedback_acked_client": sums.get("feedback_acked", 0),
        "feedback_stored_stream": stored["stream_feedback"],
        "feedback_stored_dedupe_sets": stored["dedupe_members"],
        "feedback_sent": sums.get("feedback_sent", 0),
        "feedback_acked_capped": sums.get("feedback_acked_capped", 0),
        "rate_limited_429": sums.get("rate_limited", 0),
        "spool_at_end": spool, "spool_records_left": spool_left,
        "retries_sent": sums.get("retries_sent", 0),
        "retries_answered_duplicate": sums.get("retries_duplicate", 0),
        "retries_answered_not_duplicate": sums.get("retries_not_duplicate", 0),
        "searches_ok_client": sums.get("searches_ok", 0), "warmup_searches_ok": warm,
        "searches_empty_client": sums.get("searches_empty", 0),
        "empty_observations_stored": stored["stream_empty"],
        "impressions_stored_stream": stored["stream_impression"],
        "stream_len": stored["stream_len"],
    }
    lost["nothing_lost"] = (
        lost["feedback_acked_client"] == lost["feedback_stored_stream"]
        == lost["feedback_stored_dedupe_sets"]
        and lost["retries_answered_not_duplicate"] == 0
        and lost["searches_ok_client"] + warm == lost["impressions_stored_stream"]
    )
    best = max(steps, key=lambda s: s["rps"]) if steps else None
    return {
        "workers": workers, "label": label, "prefix": prefix,
        "server": server.label,
        "startup_and_warmup_s": round(startup_s, 1), "steps": [
            {k: v for k, v in s.items() if k != "counts"} | {"client_counts": s["counts"]}
            for s in steps],
        "saturation": {"users": steps[-1]["users"] if reason else None, "reason": reason,
                       "peak_rps": best["rps"] if best else None,
                       "peak_users": best["users"] if best else None},
        "consistency": lost, "server_log_tracebacks": server.log_errors(),
        "errors_5xx": sums.get("errors_5xx", 0),
    }


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alias", default=None, help="catalog alias (default: settings, ltrr-catalog)")
    ap.add_argument("--workers", type=int_list, default=[1, 2],
                    help="uvicorn worker counts to test, comma-separated (default 1,2)")
    ap.add_argument("--users", type=int_list, default=[1, 2, 4, 8, 16, 32],
                    help="concurrency steps, comma-separated (default 1,2,4,8,16,32)")
    ap.add_argument("--step-seconds", type=int, default=15, help="run time of each step")
    ap.add_argument("--warmup-seconds", type=float, default=3.0,
                    help="first seconds of each step left out of the statistics")
    ap.add_argument("--stop-timeout", type=int, default=30,
                    help="seconds a user may take to finish its iteration after the run time")
    ap.add_argument("--p-feedback", type=float, default=0.5)
    ap.add_argument("--p-retry", type=float, default=0.05)
    ap.add_argument("--size", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--saturation-gain", type=float, default=0.05)
    ap.add_argument("--p95-blowup", type=float, default=10.0)
    ap.add_argument("--no-stop", action="store_true", help="run every step, even past saturation")
    ap.add_argument("--api-key", default=os.environ.get("LTRR_LOAD_API_KEY"),
                    help="sent as X-API-Key (default: env LTRR_LOAD_API_KEY)")
    ap.add_argument("--server-limits", action="store_true",
                    help="keep the server's per-client feedback rate limit and influence cap "
                         "(default: raised out of reach, one locust process being one client)")
    ap.add_argument("--prefix", default=None,
                    help="Redis key prefix base (default load:<run id>:); each worker count "
                         "gets <prefix>w<N>:")
    ap.add_argument("--keep-keys", action="store_true", help="leave the run's Redis keys")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="folder for server/locust logs (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=None,
                    help="default benchmarks/results/load.json (--smoke: a temp dir)")
    ap.add_argument("--smoke", action="store_true",
                    help="test-ltrr-catalog, 1 worker, users 1,2, 3 s steps (1 s warm-up), every "
                         "step run, JSON and logs in a temp dir (CI); its own free port as always")
    args = ap.parse_args()
    if args.smoke:
        args.alias = args.alias or "test-ltrr-catalog"
        args.workers, args.users, args.no_stop = [1], [1, 2], True
        args.step_seconds, args.warmup_seconds = min(args.step_seconds, 3), min(args.warmup_seconds, 1.0)
    if args.out is None:
        args.out = (Path(tempfile.mkdtemp(prefix="ltrr-smoke-load-")) / "load.json" if args.smoke
                    else HERE / "results" / "load.json")

    settings = OrchestratorSettings()
    args.alias = args.alias or settings.es.catalog_alias
    base_prefix = args.prefix or f"load:{uuid.uuid4().hex[:8]}:"
    headers = {"X-API-Key": args.api_key} if args.api_key else {}
    es = build_client(settings.es)
    catalog_docs = int(es.count(index=args.alias)["count"])
    redis_client = build_redis(settings.redis)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ltrr-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    base_env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(HERE.parent)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}

    es_pid = listening_pid(urlparse(settings.es.url).port or 9200)
    redis_pid = listening_pid(urlparse(settings.redis.url).port or 6379)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print(f"catalog {args.alias}: {catalog_docs} docs; {os.cpu_count()} CPUs shared by "
          f"Elasticsearch, Redis, the API and locust; logs in {workdir}", flush=True)
    print("latencies in ms (s = /search, fb = /feedback); cpu/api/es/redis/other: cores used "
          "during the step by the whole machine, the API server, Elasticsearch, Redis, and "
          "everything else except locust (other work on the machine)", flush=True)
    print(HEADER, flush=True)
    configs = []
    t_all = time.monotonic()
    try:
        for workers in args.workers:
            prefix = f"{base_prefix}w{workers}:"
            configs.append(run_config(workers=workers, args=args, base_env=base_env,
                                      prefix=prefix, redis_client=redis_client, workdir=workdir,
                                      headers=headers, es_pid=es_pid, redis_pid=redis_pid))
    finally:
        if not args.keep_keys:
            for key in redis_client.scan_iter(match=base_prefix + "*", count=1000):
                redis_client.delete(key)

    ok = True
    print()
    for c in configs:
        cons = c["consistency"]
        sat = c["saturation"]
        print(f"workers={c['label']}: peak {sat['peak_rps']} req/s at {sat['peak_users']} users"
              f"; saturation: {sat['reason'] or 'not reached'}")
        print(f"  feedback acked (client) {cons['feedback_acked_client']} | stored: stream "
              f"{cons['feedback_stored_stream']}, dedupe sets {cons['feedback_stored_dedupe_sets']}"
              f" (+{cons['feedback_acked_capped']} capped, not stored by design)"
              f" | retries {cons['retries_sent']} -> duplicate {cons['retries_answered_duplicate']}"
              f" | searches ok {cons['searches_ok_client']} + warm-up {cons['warmup_searches_ok']}"
              f" vs impressions stored {cons['impressions_stored_stream']}"
              f" | 5xx {c['errors_5xx']} | nothing lost: {cons['nothing_lost']}")
        ok = ok and cons["nothing_lost"] and c["errors_5xx"] == 0
    result = {
        "started_at": started, "command": "python " + shlex.join(sys.argv),
        "alias": args.alias, "catalog_docs": catalog_docs, "cpus": os.cpu_count(),
        "python": sys.version.split()[0], "platform": platform.platform(),
        "locust": _locust_version(), "step_seconds": args.step_seconds,
        "warmup_seconds": args.warmup_seconds, "users": args.users, "p_feedback": args.p_feedback,
        "p_retry": args.p_retry, "size": args.size, "seed": args.seed,
        "total_s": round(time.monotonic() - t_all, 1),
        "note": ("closed loop, no think time, loopback; the machine's cores are shared by "
                 "Elasticsearch, Redis, the API workers and locust, and possibly other work: "
                 "steps[].cpu_cores.other is the CPU taken by everything else meanwhile"),
        "configs": configs, "ok": ok,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['total_s']} s)")
    return 0 if ok else 1


def _locust_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("locust")
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
