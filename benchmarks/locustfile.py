"""Locust users for the load test of ``POST /search`` + ``POST /feedback``.

Run by ``benchmarks/load.py`` (one headless locust process per concurrency step); it can also
be run by hand against a server you started::

    locust -f benchmarks/locustfile.py --headless -u 4 -r 4 --run-time 20s \\
        --stop-timeout 30 --host http://127.0.0.1:8000 --only-summary

One user loops without think time: it picks a query from real data (playlist titles, track
titles and artist names of ``playlists_dev.csv``) and a context, ``POST /search`` (size 10),
then with probability ``LTRR_LOAD_P_FEEDBACK`` sends ``POST /feedback`` on one of the shown
items (rank-biased choice, action click or play, with the response's ``"token"`` when the
server issues one). With probability ``LTRR_LOAD_P_RETRY`` it sends the same feedback again,
as a client retry would; the server must refuse it as a replay (409, or ``duplicate: true``)
and store nothing more.

Environment (all optional):

``LTRR_LOAD_OUT``
    JSON file this process writes when it quits: client-side counts (searches answered 200,
    feedback acknowledged = HTTP 200 with ``duplicate == false`` and not ``capped``, retries
    answered as duplicates (409, or 200 with ``duplicate == true``), 429s ...) and one sample per request ``[endpoint, start_unix_s, ms, status]``.
``LTRR_LOAD_API_KEY``
    Sent as ``X-API-Key`` on every request.
``LTRR_LOAD_DATA``
    The ``playlists_dev.csv`` to draw queries from (default: settings' ``ingest.data_dir``).
``LTRR_LOAD_SEED``, ``LTRR_LOAD_P_FEEDBACK`` (0.5), ``LTRR_LOAD_P_RETRY`` (0.05),
``LTRR_LOAD_SIZE`` (10).

Locust monkey-patches the standard library with gevent when imported: import this file
only in a locust process, never in pytest or the benchmark driver.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

from locust import FastHttpUser, constant, events, task

logger = logging.getLogger(__name__)

ACTIONS = ("click", "play")
DEVICES = ("mobile", "desktop", "tv", "speaker")
LOCALES = ("en-US", "en-GB", "de-DE", "es-ES", "fr-FR")


def _data_file() -> Path:
    if os.environ.get("LTRR_LOAD_DATA"):
        return Path(os.environ["LTRR_LOAD_DATA"])
    from orchestrator.settings import OrchestratorSettings

    return OrchestratorSettings().ingest.data_dir / "playlists_dev.csv"


def load_query_pools(path: Path) -> list[list[str]]:
    """Three pools of real queries: playlist titles, track titles, artist names (unique,
    sorted so a seed reproduces the same draws)."""
    pools: dict[str, set[str]] = {"playlist_name": set(), "track_name": set(), "track_artist": set()}
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            for col, pool in pools.items():
                value = (row.get(col) or "").strip()
                if value and len(value) <= 200:
                    pool.add(value)
    out = [sorted(p) for p in pools.values() if p]
    if not out:
        raise RuntimeError(f"no queries found in {path}")
    return out


POOLS = load_query_pools(_data_file())
SEED = int(os.environ.get("LTRR_LOAD_SEED", "0"))
P_FEEDBACK = float(os.environ.get("LTRR_LOAD_P_FEEDBACK", "0.5"))
P_RETRY = float(os.environ.get("LTRR_LOAD_P_RETRY", "0.05"))
SIZE = int(os.environ.get("LTRR_LOAD_SIZE", "10"))
HEADERS = {"X-API-Key": os.environ["LTRR_LOAD_API_KEY"]} if os.environ.get("LTRR_LOAD_API_KEY") else {}

#: Client-side counts of this locust process, written at exit.
COUNTS: dict[str, int] = {
    "searches_sent": 0, "searches_ok": 0, "searches_empty": 0,
    "feedback_sent": 0, "feedback_acked": 0, "feedback_acked_capped": 0,
    "feedback_acked_duplicate": 0,
    "retries_sent": 0, "retries_duplicate": 0, "retries_not_duplicate": 0,
    "rate_limited": 0, "errors": 0, "errors_5xx": 0, "errors_transport": 0,
}
#: One row per request: [endpoint, start (unix s), latency ms, HTTP status (0: no response)].
SAMPLES: list[list[Any]] = []
_USER_IDS = itertools.count()


def _note_error(status: int) -> None:
    if status == 429:
        COUNTS["rate_limited"] += 1
    COUNTS["errors"] += 1
    if status >= 500:
        COUNTS["errors_5xx"] += 1
    elif status == 0:
        COUNTS["errors_transport"] += 1


class SearchFeedbackUser(FastHttpUser):
    """Search, then maybe act on a result (and maybe retry that feedback)."""

    wait_time = constant(0)
    connection_timeout = 10.0
    network_timeout = 120.0

    def on_start(self) -> None:
        self.uid = next(_USER_IDS)
        self.rng = random.Random(SEED * 1_000_003 + self.uid)

    def _post(self, endpoint: str, body: dict[str, Any], *,
              expect: int = 200) -> tuple[int, dict[str, Any] | None]:
        """POST, record the sample, return (status, JSON body or None). ``expect`` is the
        status that counts as success besides 200 (409 for a retried feedback)."""
        t0 = time.time()
        status, payload = 0, None
        with self.client.post(endpoint, json=body, headers=HEADERS, name=endpoint,
                              catch_response=True) as resp:
            status = int(resp.status_code or 0)
            if status == expect != 200:
                resp.success()
            elif status == 200:
                try:
                    payload = resp.json()
                    resp.success()
                except ValueError:
                    resp.failure("200 with a body that is not JSON")
            else:
                resp.failure(f"HTTP {status}: {(resp.text or '')[:200]}")
        SAMPLES.append([endpoint, t0, (time.time() - t0) * 1000.0, status])
        return status, payload

    @task
    def search_then_feedback(self) -> None:
        rng = self.rng
        query = rng.choice(rng.choice(POOLS))
        context = {"hour": rng.randrange(24), "weekday": rng.randrange(7),
                   "device": rng.choice(DEVICES), "locale": rng.choice(LOCALES)}
        COUNTS["searches_sent"] += 1
        status, res = self._post("/search", {"query": query, "size": SIZE, "context": context})
        if status != 200 or res is None:
            _note_error(status)
            return
        COUNTS["searches_ok"] += 1
        results = res.get("results") or []
        if not results:
            COUNTS["searches_empty"] += 1
            return
        if rng.random() >= P_FEEDBACK:
            return
        # Position-biased choice: rank r is picked with weight 1/r.
        weights = [1.0 / (i + 1) for i in range(len(results))]
        item = rng.choices(results, weights=weights)[0]
        body: dict[str, Any] = {"request_id": res["request_id"], "item_id": item["id"],
                                "action": rng.choice(ACTIONS)}
        if res.get("token"):
            body["token"] = res["token"]
        COUNTS["feedback_sent"] += 1
        status, ack = self._post("/feedback", body)
        if status != 200 or ack is None:
            _note_error(status)
            return
        if ack.get("duplicate") is not False:
            COUNTS["feedback_acked_duplicate"] += 1
        elif ack.get("capped"):  # acknowledged, deliberately not applied (influence cap)
            COUNTS["feedback_acked_capped"] += 1
        else:
            COUNTS["feedback_acked"] += 1
        if rng.random() < P_RETRY:
            # A client retry of the same feedback: 409 (replay refused), or 200 with
            # duplicate == true from servers without the 409; never counted twice.
            COUNTS["retries_sent"] += 1
            status, again = self._post("/feedback", body, expect=409)
            if status == 409 or (status == 200 and again and again.get("duplicate") is True):
                COUNTS["retries_duplicate"] += 1
            elif status == 200:
                COUNTS["retries_not_duplicate"] += 1
            else:
                _note_error(status)


@events.quitting.add_listener
def _write_counts(environment: Any, **_kwargs: Any) -> None:
    out = os.environ.get("LTRR_LOAD_OUT")
    if not out:
        logger.info("counts: %s", COUNTS)
        return
    tmp = Path(out + ".tmp")
    tmp.write_text(json.dumps({"counts": COUNTS, "samples": SAMPLES}))
    tmp.replace(out)
