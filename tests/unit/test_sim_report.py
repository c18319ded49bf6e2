"""The simulation report's stream / last-third / band / unseen / new-item sections on
synthetic round rows (no services)."""

from __future__ import annotations

import json

import pytest

from orchestrator.simulation.report import (
    REFERENCE_BM25_SUCCESS_AT_10,
    _write,
    key_bands,
    last_third_table,
    new_items_section,
    paired_tests,
    repeated_share,
    report_from_rows,
)

N = 30


def _row(t: int, policy: str, *, key: str, success: float, qtype: str = "playlist",
         phase: str = "stream", arms=("lexical.v2",), new_shown=(), new_clicked=()) -> dict:
    return {"t": t, "policy": policy, "qtype": qtype, "noise": "none", "query": key.upper(),
            "key": key, "user": "u1", "need": "n", "phase": phase, "ndcg": success,
            "success": success, "mrr": success, "cand_recall": success, "cand_hit": success,
            "clicked": success, "played": 0.0, "arms": list(arms), "eligible": ["lexical.v2", "semantic.v1"],
            "propensities": {"lexical.v2": 0.5, "semantic.v1": 0.5}, "subset_propensity": 0.5,
            "subset_propensity_indep": 0.25, "n_candidates": 20, "fetched": 20, "latency_ms": 5.0,
            "es_ms": 2.0, "failed": 0, "error": "", "rescorer_version": 0,
            "new_shown": list(new_shown), "new_clicked": list(new_clicked), "n_new_relevant": 0}


def _key(t: int) -> str:
    # "hot" every third round (head), "warm-<k>" twice (torso), else unique (tail)
    if t % 3 == 0:
        return "hot"
    if t % 3 == 1 and t < 20:
        return f"warm-{t // 6}"
    return f"once-{t}"


def _rows() -> list[dict]:
    rows = []
    for t in range(N):
        k = _key(t)
        rows.append(_row(t, "ours", key=k, success=1.0 if t >= 10 else 0.0,
                         new_shown=["n1"] if t == 12 else (), new_clicked=["n1"] if t == 15 else ()))
        rows.append(_row(t, "ours_no_memory", key=k, success=1.0 if t >= 25 else 0.0))
        if t >= 20:  # static policies only run the last third
            rows.append(_row(t, "arm:lexical.v2", key=k, success=0.5 if t % 2 else 0.0))
            rows.append(_row(t, "hybrid_rrf", key=k, success=0.0, arms=("lexical.v2", "semantic.v1")))
    for i in range(4):  # the unseen pass: must not touch any stream metric
        for p in ("ours", "ours_no_memory", "arm:lexical.v2", "hybrid_rrf"):
            rows.append(_row(N + i, p, key=f"unseen-{i}", success=1.0 if p == "ours" and i < 2 else 0.0,
                             phase="unseen"))
    return rows


def _report(rows=None) -> dict:
    return report_from_rows(rows or _rows(), config={"rounds": N, "display": 10,
                                                     "release_at_fraction": 0.33},
                            oracle_plans={}, calibration={}, arms=["lexical.v2", "semantic.v1"],
                            query_counts={}, source_sizes={}, seconds={})


def test_bands_and_repeated_share():
    ref = [r for r in _rows() if r["policy"] == "ours" and r["phase"] == "stream"]
    bands = key_bands(ref)
    assert bands["hot"] == "head"
    assert bands["warm-0"] == "torso" and bands["once-2"] == "tail"
    assert set(bands.values()) == {"head", "torso", "tail"}
    # repeats: hot 10x (9 repeats) + warm keys (t=1,7,13,19 -> warm-0, warm-1, warm-2, warm-3: no
    # repeat) -> computed directly
    seen, rep = set(), 0
    for r in ref:
        rep += r["key"] in seen
        seen.add(r["key"])
    assert repeated_share(ref) == pytest.approx(rep / len(ref), abs=1e-4)
    assert repeated_share([]) is None


def test_last_third_excludes_unseen_and_paired_tests():
    rep = _report()
    ours = rep["policies"]["ours"]
    assert ours["overall"]["n"] == N  # unseen rows excluded
    assert rep["last_third_from_round"] == 20
    assert ours["last_third"]["overall"]["n"] == 10
    assert ours["last_third"]["overall"]["success"] == 1.0
    assert rep["policies"]["arm:lexical.v2"]["last_third"]["overall"]["n"] == 10
    assert rep["best_static_last_third"] == "arm:lexical.v2"
    b = ours["bands"]
    assert sum(b[x]["all"]["n"] for x in ("head", "torso", "tail")) == N
    assert b["head"]["all"]["n"] == 10
    pairs = {(e["a"], e["b"]): e for e in rep["paired_last_third"]}
    assert set(pairs) == {("ours", "ours_no_memory"), ("ours", "arm:lexical.v2")}
    e = pairs[("ours", "ours_no_memory")]
    assert e["n"] == 10 and e["success"]["difference"] == pytest.approx(0.5)
    assert 0.0 <= e["success"]["p_value"] <= 1.0
    un = rep["unseen_playlists"]
    assert un["reference_bm25_success_at_10"] == REFERENCE_BM25_SUCCESS_AT_10
    assert un["policies"]["ours"] == {"n": 4, "success_at_10": 0.5, "ndcg_at_10": 0.5}
    assert un["policies"]["hybrid_rrf"]["success_at_10"] == 0.0
    assert 0 < rep["repeated_share"] < 1
    json.dumps(rep)


def test_new_items_and_paired_helper():
    per = {"ours": [r for r in _rows() if r["policy"] == "ours" and r["phase"] == "stream"]}
    sec = new_items_section(per, release_at=9)
    assert sec["ours"]["n_shown"] == 1 and sec["ours"]["n_clicked"] == 1
    assert sec["ours"]["rounds_to_first_show"]["median"] == 3.0
    assert sec["ours"]["rounds_to_first_click"]["p90"] == 6.0
    assert paired_tests(per, [("ours", "missing")], t_from=0) == []


def test_tables_and_plots(tmp_path):
    rows = _rows()
    rep = _report(rows)
    md = last_third_table(rep)
    assert "ours_no_memory" in md and "head" in md and "Unseen playlist" in md
    out = _write(rep, rows, tmp_path, plots=True)
    for f in ("learning_by_band.png", "ours_arm_share_by_type.png", "cumulative_reward.png",
              "table.md"):
        assert f in out["files"] and (tmp_path / f).stat().st_size > 0, f
