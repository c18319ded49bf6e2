"""The Q2E memory's arithmetic (no services): the debiased CTR with a predicted prior, skips,
negative-only pairs, the per-batch aggregation, and the merge of memory-index hits."""

from __future__ import annotations

import pytest

from orchestrator.domain import ArmResult, Hit
from orchestrator.examination import ExaminationModel
from orchestrator.memory import (
    Interaction,
    aggregate,
    interactions_from_events,
    memory_score,
    pair_document,
    pair_id,
)
from orchestrator.merging import UnionMerger

THETA = ExaminationModel.default()


def imp(rid, key, items, eid):
    return {"type": "impression", "request_id": rid, "query_key": key, "event_id": eid,
            "shown": [{"id": it, "rank": r} for r, it in enumerate(items, start=1)]}


def fb(rid, key, item, action, eid):
    return {"type": "feedback", "request_id": rid, "query": key, "item_id": item,
            "action": action, "event_id": eid}


def test_score_is_a_ctr_with_the_predicted_prior():
    assert memory_score(0, 0, prior=0.8) == 0.8  # no evidence: the prediction
    assert memory_score(10, 10, prior=0.2) == pytest.approx((10 + 2 * 0.2) / (10 + 2))
    # evidence takes over: 90 clicks in 100 examinations -> ~0.89 whatever the prior
    assert memory_score(90, 100, prior=0.1) == pytest.approx(90.2 / 102)
    # a popular item does not saturate: many exposures, few clicks, a low score
    assert memory_score(5, 500, prior=0.9) < 0.02


def test_examinations_are_the_position_propensities():
    agg = aggregate([imp("r", "q", ["a", "b", "c"], "1-0")], examination=THETA)
    assert agg[("q", "a")].examinations == pytest.approx(1.0)
    assert agg[("q", "c")].examinations == pytest.approx(THETA.propensity(3))
    assert agg[("q", "c")].clicks == 0


def test_a_skip_never_raises_a_score():
    for prior, clicks, exams in [(0.9, 0, 0), (0.0, 0, 0), (0.3, 4, 2.5), (0.0, 1, 0.4)]:
        base = aggregate([fb("r", "q", "a", "click", "1-0")] * clicks, examination=THETA)
        c = base[("q", "a")].clicks if clicks else 0.0
        skipped = aggregate([fb("r", "q", "a", "skip", "2-0")], examination=THETA)[("q", "a")]
        assert skipped.clicks == 0 and skipped.examinations == 1.0
        before = memory_score(c, exams, prior=prior)
        after = memory_score(c + skipped.clicks, exams + skipped.examinations, prior=prior)
        assert after <= before


def test_negative_only_pairs_fall_below_min_score():
    events = [imp(f"r{i}", "sad songs", ["x", "a"], f"{i}-0") for i in range(5)]
    events += [fb("r0", "sad songs", "a", "skip", "9-0")]
    d = aggregate(events, examination=THETA)[("sad songs", "a")]
    doc = pair_document("sad songs", "track:a", item={"entity_type": "track"}, prior=0.0,
                        clicks=d.clicks, examinations=d.examinations, source="learned",
                        prior_strength=2.0, min_score=0.05)
    assert doc["score"] == 0 and doc["active"] is False
    # a predicted pair shown often and never chosen also stops matching
    doc = pair_document("sad songs", "track:b", item={}, prior=0.6, clicks=0,
                        examinations=40, source="predicted", prior_strength=2.0, min_score=0.05)
    assert doc["active"] is False and doc["entity_type"] == "track"


def test_action_weights_and_unknown_actions():
    agg = aggregate([fb("r", "q", "a", "play", "1-0"), fb("r", "q", "a", "hover", "1-1"),
                     {"type": "feedback", "request_id": "r", "item_id": None, "action": "empty",
                      "query": "q"}], examination=THETA)
    assert agg == {("q", "a"): agg[("q", "a")]} and agg[("q", "a")].clicks == 1.5


def test_replayed_events_are_skipped_by_last_event():
    agg = aggregate([imp("r", "q", ["a"], "5-0"), fb("r", "q", "a", "click", "7-0")],
                    examination=THETA, keep_parts=True)
    d = agg[("q", "a")]
    assert d.last_event == "7-0"
    assert d.since(None) == (1.0, 1.0)
    assert d.since("5-0") == (1.0, 0.0)  # the impression is already in the document
    assert d.since("7-0") == (0.0, 0.0)


def test_decay_halves_old_evidence():
    now = 1_800_000_000.0
    old = dict(fb("r", "q", "a", "click", "1-0"), ts=now - 10 * 86400)
    new = dict(fb("r", "q", "b", "click", "1-1"), ts=now)
    agg = aggregate([old, new], examination=THETA, now=now, half_life_days=10)
    assert agg[("q", "a")].clicks == pytest.approx(0.5) and agg[("q", "b")].clicks == 1.0


def test_aggregation_cost_is_independent_of_history():
    """The updater aggregates a batch alone (history lives in the pair documents, read by id):
    the same batch does the same work, and gives the same deltas, after 100 or 100,000 earlier
    events. Work is counted (events read, propensity look-ups: one per display position), not
    timed: timings belong in ``benchmarks/learning.py``."""

    class Counting(ExaminationModel):
        calls = 0

        def propensity(self, position: int) -> float:
            Counting.calls += 1
            return super().propensity(position)

    theta = Counting(THETA.theta)
    batch = [imp(f"n{i}", f"q{i % 50}", [f"i{j}" for j in range(10)], f"{10**9 + i}-0")
             for i in range(500)]

    read = 0

    def counted(events):
        nonlocal read
        for ev in events:
            read += 1
            yield ev

    def run() -> tuple[int, dict]:
        nonlocal read
        Counting.calls = read = 0
        out = aggregate(counted(batch), examination=theta, keep_parts=True)
        return (Counting.calls, read), out

    calls_small, first = run()
    history = [imp(f"h{i}", f"q{i % 50}", [f"i{j}" for j in range(10)], f"{i}-0")
               for i in range(100_000)]
    aggregate(history, examination=THETA)  # the history happened (and was applied)
    calls_large, again = run()
    assert calls_small == calls_large == (10, 500)
    assert {k: (d.clicks, d.examinations) for k, d in first.items()} == \
        {k: (d.clicks, d.examinations) for k, d in again.items()}


def test_the_inlined_aggregation_equals_the_sum_of_contributions():
    """``aggregate`` inlines :func:`contributions` for speed; on every event shape the stream
    carries (dict, ``[id, rank]`` tuple and bare-id shown lists, feedback with and without a
    query key, skips, unknown and zero-weight actions, events without a key, query chains) with
    and without decay and chain credit, its per-pair sums, newest event and parts are the
    generator's."""
    import random

    from orchestrator.memory import contributions
    from orchestrator.training import decay_weight, event_time, stream_id_key

    rng = random.Random(7)
    weights = {"click": 1.0, "play": 1.5, "skip": -0.5, "hover": 0.0}
    events = []
    for n in range(400):
        key = f"q{rng.randrange(6)}"
        eid = f"{1000 + n}-{rng.randrange(3)}"
        ts = 1_700_000_000 + n * 3600
        items = [f"i{rng.randrange(15)}" for _ in range(rng.randrange(1, 8))]
        shape = rng.randrange(6)
        if shape == 5:  # feedback whose query chain credits abandoned earlier queries
            ev = fb(f"r{n}", key, items[0], rng.choice(["click", "play", "skip"]), eid)
            ev["chain"] = [{"query_key": f"q{rng.randrange(6)}", "request_id": "r0"},
                           {"query_key": "q9", "request_id": "r1"}, "q8", {"request_id": "x"}]
        elif shape == 0:
            ev = imp(f"r{n}", key, items, eid)
        elif shape == 1:
            ev = {"type": "impression", "query_key": key, "event_id": eid,
                  "shown": [(it, r) for r, it in enumerate(items, start=1)]}
        elif shape == 2:
            ev = {"type": "impression", "query": key.upper() + "!", "event_id": eid,
                  "items": items}
        elif shape == 3:
            ev = fb(f"r{n}", key, items[0], rng.choice(list(weights) + ["bogus"]), eid)
        else:
            ev = {"type": "feedback", "query_key": "", "query": "", "item_id": "x",
                  "action": "click", "event_id": eid}
        events.append({**ev, "ts": ts})
    now = 1_700_000_000 + 500 * 3600
    for half_life, chain_weight in ((None, 0.0), (3.0, 0.0), (None, 0.4), (3.0, 0.4)):
        got = aggregate(events, examination=THETA, action_weights=weights, skip_weight=0.7,
                        now=now, half_life_days=half_life, keep_parts=True,
                        chain_weight=chain_weight)
        want: dict = {}
        for ev in events:
            w = decay_weight(now - event_time(ev), half_life_days=half_life)
            for qk, it, dc, de in contributions(ev, examination=THETA, action_weights=weights,
                                                skip_weight=0.7, chain_weight=chain_weight):
                c, e, last, parts = want.get((qk, it), (0.0, 0.0, None, []))
                if last is None or stream_id_key(ev["event_id"]) > stream_id_key(last):
                    last = ev["event_id"]
                want[(qk, it)] = (c + dc * w, e + de * w, last,
                                  parts + [(stream_id_key(ev["event_id"]), dc * w, de * w)])
        assert set(got) == set(want) and len(got) > 30
        assert any(k in ("q8", "q9") for k, _ in got) == (chain_weight > 0)
        for pair, (c, e, last, parts) in want.items():
            d = got[pair]
            assert (d.clicks, d.examinations) == pytest.approx((c, e))
            assert d.last_event == last
            assert [k for k, _c, _e in d.parts] == [k for k, _c, _e in parts]
            assert [v for _k, *vs in d.parts for v in vs] == \
                pytest.approx([v for _k, *vs in parts for v in vs])


def test_pair_id_is_stable_and_distinct():
    assert pair_id("q", "track:a") == pair_id("q", "track:a")
    assert pair_id("q", "track:a") != pair_id("q ", "track:a") != pair_id("q", "track:b")
    assert len(pair_id("q", "a")) == 32


def test_memory_hits_merge_under_their_item_id_catalog_source_wins():
    mem = ArmResult("memory", "memory.v2", (
        Hit("track:a", 0.9, 1, {"title": "copy", "popularity": 1.0,
                                "_memory": {"ctr": 0.9, "exposures": 3.0, "clicks": 2.0}}),
        Hit("track:m", 0.5, 2, {"title": "only memory", "_memory": {"ctr": 0.5}}),), 1)
    lex = ArmResult("lexical", "lexical.v2", (
        Hit("track:a", 12.0, 1, {"title": "catalog", "popularity": 50.0, "folded": "x"}),), 1)
    for results in ([mem, lex], [lex, mem]):
        cands = {c.id: c for c in UnionMerger().merge(results)}
        a = cands["track:a"]
        assert a.source["title"] == "catalog" and a.source["popularity"] == 50.0
        assert a.source["_memory"] == {"ctr": 0.9, "exposures": 3.0, "clicks": 2.0}
        assert {p.arm for p in a.provenance} == {"memory", "lexical"}
        assert cands["track:m"].source["title"] == "only memory"


def test_interactions_join_feedback_with_impressions():
    events = [
        {"type": "impression", "request_id": "r1", "query": "Sad  Songs!",
         "shown": [{"id": "track:x", "rank": 1}, {"id": "track:a", "rank": 2}]},
        {"type": "feedback", "request_id": "r1", "item_id": "track:a", "action": "play",
         "ts": "2026-11-25T10:00:00+00:00"},
        {"type": "feedback", "request_id": "unknown", "item_id": "track:b", "action": "click"},
        {"type": "feedback", "request_id": "r1", "item_id": "track:x", "action": "click",
         "rank": 1, "query": "explicit query"},
    ]
    got = interactions_from_events(events)
    assert got[0] == Interaction("sad songs", "track:a", "play", 2, 1795600800.0)
    assert [(i.query_key, i.rank) for i in got[1:]] == [("explicit query", 1)]


def test_the_memory_arm_searches_its_own_index_in_the_same_msearch():
    from orchestrator.arms import build_requests
    from orchestrator.execution import MultiSearch
    from orchestrator.settings import OrchestratorSettings
    from orchestrator.templates import TemplateRegistry

    registry = TemplateRegistry.from_dir(OrchestratorSettings().templates.dir)
    sent = []

    class FakeES:
        def options(self, **_):
            return self

        def msearch(self, *, searches):
            sent.append(searches)
            hit = {"_id": "pairhash", "_score": 0.7, "_source": {
                "item_id": "track:a", "query_key": "halo", "score": 0.7, "clicks": 3.0,
                "examinations": 4.0, "item": {"title": "Halo", "entity_type": "track"}}}
            return {"responses": [{"took": 1, "hits": {"hits": []}},
                                  {"took": 1, "hits": {"hits": [hit]}}]}

    ms = MultiSearch(FakeES(), index="cat", registry=registry,
                     indices={"memory": "cat-mem"})
    reqs = build_requests(registry, None, "Halo", budgets={"lexical": 5, "memory": 5},
                          vector=None)
    lexical, memory = ms.execute(reqs)
    assert [line["index"] for line in sent[0][::2]] == ["cat", "cat-mem"]
    (h,) = memory.hits
    assert h.id == "track:a" and h.source["title"] == "Halo"
    assert h.source["_memory"] == {"ctr": 0.7, "exposures": 4.0, "clicks": 3.0,
                                   "query_key": "halo"}
    # without a mapping, a role searches <catalog>-<role>
    assert MultiSearch(FakeES(), index="cat", registry=registry).index_for("memory.v2") == \
        "cat-memory"


def test_compact_impression_record_gives_the_updater_what_the_full_event_does():
    import json

    from orchestrator.examination import ExaminationModel
    from orchestrator.feedback import compact_impression
    from orchestrator.memory import _decode_entry, aggregate

    imp = {"request_id": "r1", "query_key": "take five", "ts": "2026-12-01T10:00:00+00:00",
           "shown": [{"id": f"track:{i}", "rank": i, "features": [0.1] * 40,
                      "provenance": [{"arm": "lexical"}]} for i in range(1, 11)]}
    full = {"type": "impression", "data": json.dumps(imp)}
    compact = {**full, "mem": compact_impression(imp)}
    assert len(compact["mem"]) < len(full["data"]) / 3
    a = _decode_entry("1-0", full)
    b = _decode_entry("1-0", compact)
    ex = ExaminationModel.default()
    agg_a = aggregate([a], examination=ex, now=0)
    agg_b = aggregate([b], examination=ex, now=0)
    assert {k: (v.clicks, v.examinations) for k, v in agg_a.items()} == \
        {k: (v.clicks, v.examinations) for k, v in agg_b.items()}
    assert len(agg_b) == 10


def test_a_query_chain_credits_the_abandoned_queries_with_a_share_of_the_click():
    from orchestrator.memory import chain_keys, contributions

    ev = {**fb("r2", "despacito", "track:d", "play", "5-0"),
          "chain": [{"query_key": "de fiesta", "request_id": "r1", "age_s": 12.0},
                    {"query_key": "despacito", "request_id": "r0"},  # its own key: no credit
                    {"query_key": "de fiesta", "request_id": "r-1"}]}  # once per key
    assert chain_keys(ev) == ["de fiesta"]
    weights = {"click": 1.0, "play": 1.5, "skip": -0.5}
    assert list(contributions(ev, examination=THETA, action_weights=weights, chain_weight=0.5)) == [
        ("despacito", "track:d", 1.5, 0.0), ("de fiesta", "track:d", 0.75, 0.5)]
    # off by default, and a skip credits nothing along the chain
    assert [k for k, *_ in contributions(ev, examination=THETA, action_weights=weights)] == ["despacito"]
    skip = {**ev, "action": "skip"}
    assert [k for k, *_ in contributions(skip, examination=THETA, action_weights=weights,
                                         chain_weight=0.5)] == ["despacito"]
    got = aggregate([ev], examination=THETA, action_weights=weights, chain_weight=0.5)
    assert (got[("de fiesta", "track:d")].clicks, got[("de fiesta", "track:d")].examinations) == (0.75, 0.5)
    assert got[("de fiesta", "track:d")].last_event == "5-0"
