"""Every benchmark's ``--smoke`` mode runs, exits 0 and prints its table (benchmarks cannot rot).

Each benchmark runs as a subprocess, as a user would run it, on the catalog slice or tiny
data, with its JSON written to a temp dir: ``benchmarks/results/`` must be left untouched.
The faults benchmark starts a private Elasticsearch + Redis pair on ports of its own (9261 /
6401, not the fault tests' 9251 / 6391) and stops it afterwards; it is started first, in the
background, and collected last, so its service start-up overlaps the other benchmarks.
No figures are checked: a smoke run measures nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.elasticsearch, pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"

#: benchmark -> lines its table must print
TABLES: dict[str, tuple[str, ...]] = {
    "ingest_throughput": ("embeddings", "docs/s"),
    "arms_recall": ("recall@20", "(all arms)"),
    "qu_eval": ("intent accuracy", "parse latency"),
    "latency": ("orchestrator end to end", "plain BM25 _search"),
    "load": ("req/s", "nothing lost: True"),
    "security": ("operation", "feedback_http_secured"),
    "learning": ("task (one worker)", "move_events", "rebuild_posteriors"),
    "ranker_features": ("paired (IPS-nDCG@10)", "split-plain"),
    "faults": ("scenario", "es_stopped", "redis_stopped:"),
}


def _results_snapshot() -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in RESULTS.rglob("*") if p.is_file()}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}


def _check(name: str, rc: int, out: str, err: str) -> None:
    assert rc == 0, f"{name} --smoke exited {rc}\n{out[-3000:]}\n{err[-3000:]}"
    for marker in TABLES[name]:
        assert marker in out, f"{name} --smoke did not print {marker!r}\n{out[-3000:]}"


@pytest.fixture(scope="module")
def faults_run():
    """The faults smoke run, started before the others and collected by its test."""
    proc = subprocess.Popen([sys.executable, str(BENCH / "faults.py"), "--smoke"], cwd=ROOT,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:  # its test was not selected or failed: stop it cleanly (SIGTERM
        proc.terminate()     # unwinds it: a stopped service is resumed, the pair stopped)
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def untouched_results():
    before = _results_snapshot()
    yield
    assert _results_snapshot() == before, "a --smoke run wrote into benchmarks/results/"


@pytest.mark.parametrize("name", [n for n in TABLES if n != "faults"])
def test_smoke(name, faults_run, untouched_results, catalog_slice):
    proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), "--smoke"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=240)
    _check(name, proc.returncode, proc.stdout, proc.stderr)


def test_smoke_faults(faults_run, untouched_results):
    out, err = faults_run.communicate(timeout=600)
    _check("faults", faults_run.returncode, out, err)


def test_arms_recall_on_a_simulations_head_playlists(untouched_results, catalog_slice, tmp_path):
    """``--playlists-from``: the playlist set is a simulation's most asked playlist needs
    (ours' stream rounds), each with the tracks of every playlist of that exact title."""
    import gzip
    import json

    log = tmp_path / "rounds.jsonl.gz"
    rows = ([{"policy": "ours", "qtype": "playlist", "phase": "stream", "need": "playlist:Gospel"}] * 3
            + [{"policy": "ours", "qtype": "playlist", "phase": "stream",
                "need": "playlist:Classic Rock"}] * 2
            + [{"policy": "random", "qtype": "playlist", "phase": "stream",
                "need": "playlist:Neo Soul"}] * 9  # another policy's rounds do not count
            + [{"policy": "ours", "qtype": "playlist", "phase": "unseen",
                "need": "playlist:Neo Soul"}] * 9)  # nor the final unseen pass
    with gzip.open(log, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    out_json = tmp_path / "head.json"
    proc = subprocess.run([sys.executable, str(BENCH / "arms_recall.py"), "--smoke", "--known-items", "0",
                           "--playlists-from", str(log), "--top-needs", "5", "--k", "50",
                           "--out", str(out_json)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    assert set(report["sets"]) == {"sim_head_playlist"}
    per = {q["query"]: q for q in report["per_query"]}
    assert set(per) == {"Gospel", "Classic Rock"}
    assert per["Gospel"]["asked"] == 3 and per["Classic Rock"]["asked"] == 2
    assert per["Gospel"]["pool"] >= 25  # every "Gospel" playlist's tracks
    assert all(0 <= q["union_found"] <= q["pool"] for q in per.values())
    assert "asked    3" in proc.stdout
