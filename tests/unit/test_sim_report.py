"""The simulation report's stream / last-third / band / unseen / new-item sections on
synthetic round rows (no services)."""

from __future__ import annotations

import json

import pytest

from orchestrator.simulation.report import (
    REFERENCE_BM25_SUCCESS_AT_10,
    _write,
    focus_policies,
    key_bands,
    last_third_table,
    new_items_section,
    paired_tests,
    repeated_share,
    report_from_rows,
    targets_section,
    targets_table,
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


def test_last_third_table_band_n_and_empty_bands():
    md = last_third_table(_report())
    header = next(line for line in md.splitlines() if line.startswith("| policy (last third)"))
    assert "head (n=3)" in header and "torso (n=0)" in header and "tail (n=7)" in header
    ours = next(line for line in md.splitlines() if line.startswith("| ours |")).split(" | ")
    cols = header.split(" | ")
    torso = next(i for i, c in enumerate(cols) if c.startswith("torso"))
    assert ours[torso] == "–"  # no rows: a dash, not 0.000
    assert ours[cols.index("known_item (n=0)")] == "–"


def test_targets_section_met_missed_and_missing(tmp_path):
    rows = _rows()
    for t in range(N):
        k = _key(t)
        rows.append(_row(t, "oracle", key=k, success=0.8 if t >= 20 else 0.0))
        # same as ours: no contribution
        rows.append(_row(t, "ours_no_rescorer", key=k, success=1.0 if t >= 10 else 0.0))
    rep = _report(rows)
    tg = {e["target"]: e for e in rep["targets"]}
    for e in rep["targets"]:
        assert set(e) >= {"target", "value", "reference", "met", "shortfall"}
        assert (e["met"] is None) == ("note" in e) or e["kind"] == "ablation"
    o = tg["ours > oracle, success@10"]
    assert o["met"] is True and o["value"] == 1.0 and o["reference"] == 0.8 and o["shortfall"] is None
    a = tg["ours >= best arm on playlist, ndcg@10"]
    assert a["met"] is True and a["reference_policy"] == "arm:lexical.v2" and a["reference"] == 0.25
    k = tg["ours >= best arm on known_item, success@10"]
    assert k["met"] is None and k["note"]
    h = tg["ours head-band success@10 >= 0.9"]
    assert h["met"] is True and h["n"] == 3
    m = tg["ours better than ours_no_memory (ndcg@10), p < 0.05"]
    assert m["met"] is False and m["difference"] == pytest.approx(0.5)
    assert m["shortfall"] == pytest.approx(m["value"] - 0.05, abs=1e-4)
    r = tg["ours better than ours_no_rescorer (ndcg@10), p < 0.05"]
    assert r["met"] is False and r["note"].startswith("ours not better")
    assert tg["ours better than ours_equal_budgets (ndcg@10), p < 0.05"]["met"] is None
    ope = [e for e in rep["targets"] if e["kind"] == "ope"]
    assert {e["policy"] for e in ope} == {"arm:lexical.v2", "hybrid_rrf"}
    lex = next(e for e in ope if e["policy"] == "arm:lexical.v2")
    assert lex["value"] == pytest.approx(abs(lex["dr"] - lex["actual"]) / lex["actual"], abs=1e-3)
    assert lex["met"] is (lex["value"] <= 0.1)
    assert next(e for e in ope if e["policy"] == "hybrid_rrf")["met"] is None  # realized mean 0
    json.dumps(rep)
    _write(rep, rows, tmp_path, plots=False)
    md = (tmp_path / "table.md").read_text(encoding="utf-8")
    assert "Targets (last third" in md and "| ours > oracle, success@10 | 1.000 | 0.800 (oracle) | yes |" in md


def test_targets_shortfall_and_missing_data():
    def part(n, ndcg, success):
        return {"n": n, "ndcg": ndcg, "success": success} if n else {"n": 0}

    rep = {"policies": {
        "ours": {"last_third": {"overall": part(5, 0.3, 0.5), "by_type": {"tag": part(5, 0.3, 0.5)}},
                 "bands": {"head": {"last_third": {"n": 0}}}},
        "oracle": {"last_third": {"overall": part(5, 0.4, 0.5), "by_type": {}}},
        "arm:a": {"last_third": {"overall": part(5, 0.2, 0.4), "by_type": {"tag": part(5, 0.35, 0.4)}}}}}
    tg = {e["target"]: e for e in targets_section(rep)}
    nd = tg["ours > oracle, ndcg@10"]
    assert nd["met"] is False and nd["shortfall"] == pytest.approx(0.1)
    eq = tg["ours > oracle, success@10"]  # equal is not above
    assert eq["met"] is False and eq["shortfall"] == 0.0
    tag = tg["ours >= best arm on tag, ndcg@10"]
    assert tag["met"] is False and tag["shortfall"] == pytest.approx(0.05) and tag["reference_policy"] == "arm:a"
    assert tg["ours >= best arm on tag, success@10"]["met"] is True
    head = tg["ours head-band success@10 >= 0.9"]
    assert head["met"] is None and "no head-band rows" in head["note"]
    assert all(e["met"] is None for e in targets_section(rep) if e["kind"] in ("ablation", "ope"))
    md = targets_table(rep)
    assert "| ours > oracle, ndcg@10 | 0.300 | 0.400 (oracle) | **no** | 0.100 |" in md


def test_focus_policies():
    def pol(ndcg):
        return {"last_third": {"overall": {"n": 3, "ndcg": ndcg}, "by_type": {}}}

    names = {"random": 0.1, "arm:a": 0.2, "arm:b": 0.3, "hybrid_rrf": 0.35, "ours_no_memory": 0.2,
             "ours": 0.4, "oracle": 0.5, "epsilon_greedy": 0.3, "all_arms": 0.3, "ours_equal_budgets": 0.1}
    rep = {"policies": {n: pol(v) for n, v in names.items()}, "best_static_last_third": "hybrid_rrf"}
    assert focus_policies(rep) == ["ours", "ours_equal_budgets", "ours_no_memory", "oracle", "hybrid_rrf",
                                   "arm:b", "epsilon_greedy"]
    rep["best_static_last_third"] = "arm:b"
    assert focus_policies(rep) == ["ours", "ours_equal_budgets", "ours_no_memory", "oracle", "arm:b",
                                   "epsilon_greedy", "hybrid_rrf"]
    rep = {"policies": {"arm:a": pol(0.1), "random": pol(0.2)}, "best_static_last_third": "missing"}
    assert focus_policies(rep) == ["arm:a"]
    assert focus_policies({"policies": {}}) == []


def test_new_items_section_last_third_and_table():
    from orchestrator.simulation.report import new_items_section, new_items_table

    def row(t, success, new_shown=(), new_clicked=(), n_new=0):
        return {"t": t, "success": success, "new_shown": list(new_shown),
                "new_clicked": list(new_clicked), "n_new_relevant": n_new}

    per = {"ours": [row(0, 0.0), row(5, 1.0, ["track:n1"], ["track:n1"], 1), row(9, 0.0, n_new=1)],
           "arm:x": [row(9, 1.0, ["track:n1"], n_new=1)]}
    sec = new_items_section(per, release_at=4, t_from=6)
    assert sec["ours"]["rounds_to_first_show"]["median"] == 1.0     # shown at 5, released at 4
    assert sec["ours"]["last_third"] == {"n": 1, "success": 0.0, "new_shown": 0.0,
                                         "new_clicked": 0.0}
    assert sec["arm:x"]["ran_from"] == 9 and sec["arm:x"]["last_third"]["success"] == 1.0
    report = {"new_items": sec, "config": {"rounds": 12, "release_at_fraction": 1 / 3},
              "new_items_release": {"held_out": 3, "cutoff": "2024-06-21",
                                    "released": {"catalog": {"entities": {"track": 3}}}}}
    text = new_items_table(report)
    assert "released at round 4" in text and "| arm:x | 9 | 1 | 0 |" in text
    assert new_items_table({"new_items": sec, "config": {}}) == ""


def test_followup_rounds_are_reported_apart_and_never_scored():
    from orchestrator.simulation.report import followups_table

    rows = _rows()
    base = _report(rows)
    follow = [_row(t, "ours", key=f"lookup-{t}", success=1.0 if t % 2 else 0.0, qtype="known_item",
                   phase="followup") for t in range(0, 10)]
    rep = report_from_rows(rows + follow, config={"rounds": N, "display": 10, "p_reformulate": 0.3},
                           oracle_plans={}, calibration={}, arms=["lexical.v2", "semantic.v1"],
                           query_counts={}, source_sizes={}, seconds={})
    # every stream metric is the one of the run without the follow-ups
    assert rep["policies"]["ours"] == base["policies"]["ours"]
    assert rep["unseen_playlists"] == base["unseen_playlists"]
    assert rep["followups"] == {"ours": {"rounds": 10, "success": 0.5, "played": 0.0}}
    assert base["followups"] == {}
    table = followups_table(rep)
    assert "probability 0.3" in table and "| ours | 10 | 0.500 | 0.000 |" in table
    assert followups_table(base) == ""
