"""Q2E memory learning: position bias, decay, priors giving way to evidence."""

from __future__ import annotations

import pytest

from orchestrator.memory import (
    Interaction,
    PairEvidence,
    aggregate,
    blend,
    merge_entries,
    position_weight,
)

NOW = 1_800_000_000.0


def clicks(n, *, key="sad songs", item="track:a", rank=1, action="click", age_days=0.0):
    return [Interaction(key, item, action, rank, NOW - age_days * 86400) for _ in range(n)]


def test_deeper_clicks_weigh_more_but_capped():
    assert position_weight(1) == 1.0
    assert position_weight(3) == pytest.approx(2.0)
    assert position_weight(100) == 3.0
    shallow = aggregate(clicks(1, rank=1), now=NOW)["track:a"]["sad songs"].pos
    deep = aggregate(clicks(1, rank=7), now=NOW)["track:a"]["sad songs"].pos
    assert deep == pytest.approx(3.0) and shallow == pytest.approx(1.0)


def test_old_evidence_decays():
    fresh = aggregate(clicks(1), now=NOW, half_life_days=10)["track:a"]["sad songs"].pos
    old = aggregate(clicks(1, age_days=10), now=NOW, half_life_days=10)["track:a"]["sad songs"].pos
    assert old == pytest.approx(fresh / 2)


def test_skips_are_negative_evidence_and_unknown_actions_ignored():
    ev = aggregate(clicks(2, action="skip") + clicks(1, action="hover"), now=NOW)
    assert ev["track:a"]["sad songs"].neg == pytest.approx(1.0)
    assert ev["track:a"]["sad songs"].count == 2


def test_prior_gives_way_to_evidence():
    assert blend(0.8, None) == 0.8
    assert blend(0.3, PairEvidence(pos=20, neg=0, count=20)) > 0.9
    assert blend(0.8, PairEvidence(pos=0, neg=10, count=10)) < 0.2


def test_merge_keeps_priors_and_adds_new_pairs():
    current = [{"query_key": "halo", "score": 0.7, "prior": 0.7, "source": "predicted"}]
    ev = {"sad songs": PairEvidence(5, 0, 5), "halo": PairEvidence(3, 0, 3)}
    merged = {e["query_key"]: e for e in merge_entries(current, ev)}
    assert merged["sad songs"]["source"] == "observed" and merged["sad songs"]["prior"] == 0.0
    assert merged["sad songs"]["score"] == pytest.approx(5 / 7, abs=1e-3)
    assert merged["halo"]["prior"] == 0.7 and merged["halo"]["score"] > 0.7
    # Idempotent: merging the same evidence into the result gives the same result.
    again = {e["query_key"]: e for e in merge_entries(list(merged.values()), ev)}
    assert again == merged


def test_interactions_join_feedback_with_impressions():
    from orchestrator.memory import interactions_from_events

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
