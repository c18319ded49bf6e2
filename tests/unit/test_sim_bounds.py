"""The one-list-per-key bounds of a stream (simulation/bounds.py), on hand-built streams
whose answers are worked out by hand, and their place in the report (no services)."""

from __future__ import annotations

from itertools import combinations

import pytest

from orchestrator.simulation.bounds import greedy_cover, list_bounds
from orchestrator.simulation.queries import SimQuery
from orchestrator.simulation.report import bounds_table, report_from_rows, targets_section


def _q(key: str, rel: dict[str, int], qtype: str = "playlist") -> SimQuery:
    return SimQuery(qid=key, text=key, qtype=qtype, relevant=rel, key=key)


def test_greedy_cover_takes_the_item_most_sets_share_then_the_rest():
    sets = [{"a": 1, "b": 1}, {"a": 1, "c": 1}, {"d": 1}, {"c": 1, "d": 1}]
    # a covers 2, then of {d}, {c, d}: d covers both
    assert greedy_cover(sets, 2) == ["a", "d"]
    assert greedy_cover(sets, 1) == ["a"]
    assert greedy_cover([], 3) == []
    # stops when everything is covered, even before k
    assert greedy_cover([{"x": 1}, {"x": 1}], 5) == ["x"]


def test_greedy_cover_is_close_to_the_exhaustive_optimum():
    # a small instance where greedy is not optimal: the bound must stay a lower bound of it
    sets = [{"a": 1, "b": 1}, {"a": 1, "c": 1}, {"b": 1, "d": 1}, {"c": 1, "e": 1},
            {"d": 1}, {"e": 1}]
    items = sorted({i for s in sets for i in s})

    def hits(lst):
        return sum(1 for s in sets if set(lst) & set(s))

    best = max(hits(c) for c in combinations(items, 2))
    g = hits(greedy_cover(sets, 2))
    assert g <= best
    assert g >= (1 - 1 / 2.718281828) * best


def test_list_bounds_learned_list_comes_from_earlier_rounds_only():
    # key "hot": the early users want a; the late ones want a or b; "new" is first asked late
    qs = [_q("hot", {"a": 1}), _q("hot", {"a": 1, "x": 1}), _q("hot", {"a": 1}),
          _q("hot", {"b": 1}), _q("hot", {"a": 1}), _q("new", {"z": 1}, "known_item")]
    b = list_bounds(qs, score_from=3, k=1, bands={"hot": "head", "new": "tail"})
    # scored rounds 3, 4, 5: learned lists hot -> [a], new -> [] ; hindsight hot -> [a] or [b]
    assert b["overall"]["n"] == 3
    assert b["bands"]["head"]["learned"]["success"] == pytest.approx(0.5)   # round 4 only
    assert b["bands"]["head"]["hindsight"]["success"] == pytest.approx(0.5)  # one of a, b
    assert b["bands"]["tail"]["learned"]["success"] == 0.0    # never asked before: no list
    assert b["bands"]["tail"]["hindsight"]["success"] == 1.0
    assert b["by_type"]["known_item"]["n"] == 1
    assert b["by_type"]["tag"]["n"] == 0 and b["by_type"]["tag"]["learned"]["success"] is None
    # k=2: both wants of the hot key fit in hindsight, the learned list still lacks b
    b2 = list_bounds(qs, score_from=3, k=2, bands={"hot": "head", "new": "tail"})
    assert b2["bands"]["head"]["hindsight"]["success"] == 1.0
    assert b2["bands"]["head"]["learned"]["success"] == pytest.approx(0.5)


def test_bounds_reach_the_report_table_and_the_head_band_target():
    rows = []
    for t in range(6):
        rows.append({"t": t, "policy": "ours", "qtype": "playlist", "noise": "none", "query": "hot",
                     "key": "hot", "user": "u", "need": "n", "phase": "stream", "ndcg": 0.0,
                     "success": 0.0, "mrr": 0.0, "cand_recall": 0.0, "cand_hit": 0.0,
                     "clicked": 0.0, "played": 0.0, "arms": ["lexical.v2"],
                     "eligible": ["lexical.v2"], "propensities": {"lexical.v2": 1.0},
                     "subset_propensity": 1.0, "subset_propensity_indep": 1.0, "n_candidates": 5,
                     "fetched": 5, "latency_ms": 1.0, "es_ms": 1.0, "failed": 0, "error": "",
                     "rescorer_version": 0, "new_shown": [], "new_clicked": [], "n_new_relevant": 0})
    qs = [_q("hot", {"a": 1})] * 6
    bounds = list_bounds(qs, score_from=4, k=10, bands={"hot": "head"})
    report = report_from_rows(rows, config={"rounds": 6, "display": 10}, oracle_plans={},
                              calibration={}, arms=["lexical.v2"], query_counts={},
                              source_sizes={}, seconds={}, bounds=bounds)
    assert report["bounds"]["bands"]["head"]["learned"]["success"] == 1.0
    head = next(e for e in targets_section(report) if e["kind"] == "head_band")
    assert head["bound"] == 1.0 and "1.000" in head["note"]
    table = bounds_table(report)
    assert "| head | 2 | 0.000 | 1.000 | 1.000 |" in table
    # a report without bounds (an older run) has no table and no bound
    report.pop("bounds")
    assert bounds_table(report) == ""
    assert next(e for e in targets_section(report) if e["kind"] == "head_band").get("bound") is None


def test_chained_bound_reveals_one_want_per_reformulating_round():
    from orchestrator.simulation.bounds import revealed_by_chains

    # every early user of "hot" wants a and b; the late ones want b only
    qs = [SimQuery(qid="hot", text="hot", qtype="playlist", relevant={"a": 1, "b": 1}, key="hot",
                   user=f"u{t}") for t in range(40)]
    qs += [SimQuery(qid="hot", text="hot", qtype="playlist", relevant={"b": 1}, key="hot",
                    user=f"v{t}") for t in range(10)]
    early = list(range(40))
    assert revealed_by_chains(qs, early, 0.0) == []
    every = revealed_by_chains(qs, early, 1.0)
    assert len(every) == 40 and all(len(r) == 1 and set(r) <= {"a", "b"} for r in every)
    assert {i for r in every for i in r} == {"a", "b"}  # uniform over the user's wants
    assert revealed_by_chains(qs, early, 1.0) == every  # seeded: the same run, the same chains
    some = revealed_by_chains(qs, early, 0.3)
    assert 3 <= len(some) <= 25
    b = list_bounds(qs, score_from=40, k=1, bands={"hot": "head"}, chain_rates=(0.0, 1.0))
    head = b["bands"]["head"]
    assert b["chain_rates"] == [0.0, 1.0]
    assert head["chained_0"]["success"] == 0.0  # nobody reformulates: nothing to learn
    # k=1: the most revealed item; b wins only if chains revealed it more often than a
    n_b = sum("b" in r for r in every)
    assert head["chained_1"]["success"] == (1.0 if n_b > 40 - n_b else 0.0)  # tie: "a" first
    # the early wants tie, so the learned list is [a] (the smaller id); hindsight is [b]
    assert head["learned"]["success"] == 0.0 and head["hindsight"]["success"] == 1.0
    # k=2 holds both: every scored user is satisfied
    assert list_bounds(qs, score_from=40, k=2, bands={"hot": "head"},
                       chain_rates=(1.0,))["bands"]["head"]["chained_1"]["success"] == 1.0
