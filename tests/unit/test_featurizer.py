"""The context featurizer (orchestrator/featurizer.py): buckets, reserved vs hashed slots, no
duplicated or dominating features, versions in the logged context, re-featurizing a log."""

from __future__ import annotations

import math

import numpy as np

from orchestrator.domain import ParsedQuery, RequestContext, Slot
from orchestrator.featurizer import (
    DEVICES,
    FEATURIZER_VERSION,
    LANGUAGES,
    LEGACY_FEATURIZER_VERSION,
    QU_DUPLICATES,
    RESERVED_FEATURES,
    ContextFeaturizer,
    SelectionContext,
    char_bucket,
    memory_bucket,
    token_bucket,
)
from orchestrator.training import refeaturize_events

FEAT = ContextFeaturizer()
#: What QueryUnderstander._features emits for "chill 80s jazz for a rainy day" (every key).
QU_OUT = {
    "n_tokens": 6.0, "n_chars": 30.0, "is_single_token": 0.0, "has_digits": 1.0, "n_slots": 3.0,
    "slot_coverage": 0.5, "max_slot_confidence": 0.92, "has_fuzzy_slot": 0.0,
    "has_occasion": 1.0, "intent_confidence": 0.81, "is_english": 1.0, "truncated": 0.0,
    "has_artist": 0.0, "has_album": 0.0, "has_track": 0.0, "has_genre": 1.0, "has_mood": 1.0,
    "has_era": 1.0, "has_entity_type": 0.0, "intent=known_item": 0.0, "intent=artist": 0.0,
    "intent=browse": 1.0, "intent=topical": 0.0, "intent=broad": 0.0,
}
PARSED = ParsedQuery(
    "chill 80s jazz for a rainy day", "chill 80s jazz for a rainy day",
    (Slot("mood", "chill", 0.9, 0, 5), Slot("era", "1980s", 0.92, 6, 9),
     Slot("genre", "jazz", 0.9, 10, 14)),
    intent="browse", intent_probs={"browse": 0.81, "topical": 0.15, "broad": 0.04},
    language="en", features=QU_OUT, model_version="1.0.0+abc",
)
CTX = RequestContext(hour=21, weekday=6, device="mobile", locale="en-US", user_segment="premium")


def shares(sc: SelectionContext) -> np.ndarray:
    v = np.asarray(sc.values[1:])
    return v * v / float(v @ v)


def test_buckets_are_log_scaled_and_closed():
    assert [token_bucket(n) for n in (0, 1, 2, 3, 4, 5, 8, 9, 40)] == \
        ["1", "1", "2", "3-4", "3-4", "5-8", "5-8", "9+", "9+"]
    assert [char_bucket(n) for n in (1, 3, 4, 7, 8, 15, 16, 31, 32, 63, 64, 999)] == \
        ["1-3", "1-3", "4-7", "4-7", "8-15", "8-15", "16-31", "16-31", "32-63", "32-63",
         "64+", "64+"]
    assert [memory_bucket(n) for n in (0, 1, 2, 3, 9, 10, 500)] == \
        ["0", "1-2", "1-2", "3-9", "3-9", "10+", "10+"]
    f = FEAT.transform(PARSED, CTX, PARSED.text).features
    assert f["qlen=5-8"] == 1.0 and f["qchars=16-31"] == 1.0
    assert not any(k.startswith(("qu:n_chars", "qu:n_tokens")) for k in f)


def test_no_single_feature_dominates_whatever_the_length():
    short = FEAT.transform(ParsedQuery("abba", "abba", intent="artist", language="en",
                                       features={"n_chars": 4.0, "n_tokens": 1.0}),
                           CTX, "abba")
    long_q = "the very best of eighties synth pop for a long night drive along the coast"
    long_ = FEAT.transform(ParsedQuery(long_q, long_q, intent="topical", language="en",
                                       features={"n_chars": float(len(long_q)), "n_tokens": 15.0}),
                           CTX, long_q)
    full = FEAT.transform(PARSED, CTX, PARSED.text, memory_pairs=4)
    for sc in (short, long_, full):
        assert np.isclose(np.linalg.norm(sc.values[1:]), 1.0)
        assert shares(sc).max() <= 0.2, sc.features  # version 1: ~0.8 of n_chars everywhere
        assert all(v <= 1.0 for v in sc.features.values())


def test_qu_features_that_repeat_intent_or_slots_are_dropped():
    f = FEAT.transform(PARSED, CTX, PARSED.text).features
    qu = {k for k in f if k.startswith("qu:")}
    assert qu == {"qu:has_digits=1", "qu:n_slots=2+", "qu:slot_coverage=partial",
                  "qu:max_slot_confidence=high", "qu:has_occasion=1"}
    for dup in QU_DUPLICATES:
        assert not any(k == f"qu:{dup}" or k.startswith(f"qu:{dup}=") for k in f)
    assert {"slot=mood", "slot=era", "slot=genre", "intent=browse", "lang=en"} <= set(f)
    # a QU feature this version does not know is kept, hashed and bounded
    other = FEAT.transform(ParsedQuery("x", "x", features={"new_score": 7.5}), None, "x").features
    assert other["qu:new_score"] == 1.0 and not FEAT.is_reserved("qu:new_score")


def test_closed_vocabularies_are_reserved_and_open_ones_hashed():
    reserved = set(RESERVED_FEATURES)
    assert len(reserved) == len(RESERVED_FEATURES)
    slots = [FEAT.slot(n) for n in RESERVED_FEATURES]
    assert slots == list(range(1, 1 + len(RESERVED_FEATURES)))  # one slot each, no collision
    for name in ("intent=unknown", "slot=entity_type", "daypart=night", "weekend=1",
                 "memory=10+", "qu:has_digits=1", "qchars=64+", "qlen=9+",
                 *(f"device={d}" for d in DEVICES), *(f"lang={x}" for x in LANGUAGES)):
        assert FEAT.is_reserved(name), name
    f = FEAT.transform(PARSED, RequestContext(device="Smart-TV", locale="pt-BR",
                                              user_segment="new"), "x").features
    assert f["device=other"] == 1.0 and "device=smart-tv" not in f
    for name in ("locale=pt-br", "segment=new"):
        assert name in f and not FEAT.is_reserved(name)
        assert 1 + len(RESERVED_FEATURES) <= FEAT.slot(name) < FEAT.dim
    assert FEAT.dim == 1 + len(RESERVED_FEATURES) + 64


def test_languages_cover_what_understanding_guesses():
    from orchestrator.understanding import _STOPWORDS

    assert set(_STOPWORDS) | {"other"} <= set(LANGUAGES)


def test_memory_bucket_feature_only_when_known():
    base = FEAT.transform(PARSED, CTX, PARSED.text)
    assert not any(k.startswith("memory=") for k in base.features) and base.memory_pairs is None
    for pairs, name in ((0, "memory=0"), (2, "memory=1-2"), (3, "memory=3-9"), (10, "memory=10+")):
        sc = FEAT.transform(PARSED, CTX, PARSED.text, memory_pairs=pairs)
        assert [k for k in sc.features if k.startswith("memory=")] == [name]
        assert sc.memory_pairs == pairs
    assert "memory=0" in FEAT.features(None, None, "x", memory_pairs=0)[0]
    fz = ContextFeaturizer(bucket_keys=("intent", "memory"))
    assert fz.transform(PARSED, CTX, "x", memory_pairs=5).bucket == "intent=browse|memory=3-9"
    assert fz.transform(PARSED, CTX, "x").bucket == "intent=browse|memory=-"


def test_versions_are_logged_and_round_trip():
    sc = FEAT.transform(PARSED, CTX, PARSED.text, memory_pairs=3)
    assert (sc.featurizer_version, sc.dim, sc.qu_version) == (FEATURIZER_VERSION, FEAT.dim,
                                                              "1.0.0+abc")
    d = sc.to_dict()
    assert {"featurizer_version", "dim", "qu_version", "memory_pairs"} <= set(d)
    back = SelectionContext.from_dict(d)
    assert back == sc and back.features == sc.features
    assert (back.featurizer_version, back.dim, back.qu_version, back.memory_pairs) == \
        (FEATURIZER_VERSION, FEAT.dim, "1.0.0+abc", 3)
    assert FEAT.transform(PARSED, CTX, "x", qu_version="other").qu_version == "other"
    assert FEAT.transform(None, CTX, "x").qu_version is None
    assert ContextFeaturizer(use_qu_features=False).version == f"{FEATURIZER_VERSION}-noqu"


def test_contexts_logged_before_versioning_still_load():
    old = {"features": {"intent=browse": 1.0, "qu:n_chars": 5.0}, "indices": [0, 3, 30],
           "values": [1.0, 0.2, 0.98], "bucket": "intent=browse|daypart=evening"}
    sc = SelectionContext.from_dict(old)
    assert sc.indices == (0, 3, 30) and sc.bucket == "intent=browse|daypart=evening"
    assert (sc.featurizer_version, sc.dim, sc.qu_version, sc.memory_pairs) == \
        (LEGACY_FEATURIZER_VERSION, None, None, None)
    assert SelectionContext({"bias": 1.0}, (0,), (1.0,), "b").featurizer_version is None


def test_selection_module_still_exports_the_featurizer():
    from orchestrator import selection

    assert selection.ContextFeaturizer is ContextFeaturizer
    assert selection.SelectionContext is SelectionContext
    assert selection.RESERVED_FEATURES is RESERVED_FEATURES
    assert selection.daypart(23) == "evening"


class FakeQU:
    """parse_many + version, like QueryUnderstander; counts what it parsed."""

    def __init__(self, version: str) -> None:
        self.version = version
        self.parsed: list[str] = []

    def parse_many(self, texts, *, batch_size=256):
        self.parsed.extend(texts)
        return [ParsedQuery(t, t, intent="artist", intent_probs={"artist": 1.0},
                            language="en", model_version=self.version) for t in texts]


def test_refeaturize_events_rebuilds_stale_contexts_only():
    old_sel = {"features": {"qu:n_chars": 5.0}, "indices": [0, 30], "values": [1.0, 1.0],
               "bucket": "intent=browse|daypart=evening", "memory_pairs": 4}
    qu = FakeQU("2.0.0+new")
    current = FEAT.transform(FakeQU("2.0.0+new").parse_many(["b"])[0], None, "b").to_dict()
    events = [
        {"type": "impression", "request_id": "a", "query": "queen b",
         "context": {"hour": 8, "weekday": 5, "device": "tablet"}, "selection": old_sel},
        {"type": "impression", "request_id": "b", "query": "b", "selection": current},
        {"type": "impression", "request_id": "c", "selection": old_sel},  # nothing to parse
        {"type": "feedback", "request_id": "a", "item_id": "x", "action": "click"},
    ]
    out, counts = refeaturize_events(events, featurizer=FEAT, understander=qu)
    assert counts == {"refeaturized": 1, "kept_current": 1, "kept_no_query": 1,
                      "queries_parsed": 1}
    assert qu.parsed == ["queen b"]
    sel = SelectionContext.from_dict(out[0]["selection"])
    assert (sel.featurizer_version, sel.dim, sel.qu_version, sel.memory_pairs) == \
        (FEATURIZER_VERSION, FEAT.dim, "2.0.0+new", 4)
    assert {"intent=artist", "daypart=morning", "weekend=1", "device=tablet", "memory=3-9",
            "qlen=2", "qchars=4-7"} <= set(sel.features)
    assert out[1]["selection"] == current and out[2]["selection"] == old_sel
    assert out[3] == events[3] and events[0]["selection"] is old_sel  # input untouched
    # a factory is only called when something needs parsing
    calls = []
    refeaturize_events(events[1:2], featurizer=FEAT, understander=lambda: calls.append(1) or qu,
                       qu_version="2.0.0+new")
    assert calls == []
    again, counts = refeaturize_events(events, featurizer=FEAT, understander=qu,
                                       keep_current=False)
    assert counts["refeaturized"] == 2
    assert again[1]["selection"] == current  # deterministic: same inputs, same context


def test_unit_vector_values_are_finite_for_odd_inputs():
    sc = FEAT.transform(ParsedQuery("", "", features={"n_slots": math.nan, "x": math.inf}),
                        RequestContext(), "   ")
    assert all(math.isfinite(v) for v in sc.values) and sc.features["qlen=1"] == 1.0


def test_feedback_on_a_search_served_before_a_migration_is_refeaturized():
    from orchestrator.featurizer import logged_context

    class OneQU:
        def parse(self, text):
            return FakeQU("qu-9").parse_many([text])[0]

    current = FEAT.transform(PARSED, CTX, PARSED.text, memory_pairs=1)
    imp = {"query": PARSED.text, "context": {"hour": 21, "weekday": 6}, "selection": current.to_dict()}
    assert logged_context(FEAT, imp, understander=OneQU()) == current  # logged one, as is
    legacy = {"query": "queen b", "context": {"hour": 3, "device": "desktop"},
              "selection": {"features": {}, "indices": [0, 30], "values": [1.0, 1.0],
                            "bucket": "b", "memory_pairs": None}}
    ctx = logged_context(FEAT, legacy, understander=OneQU())
    assert (ctx.featurizer_version, ctx.dim, ctx.qu_version) == (FEATURIZER_VERSION, FEAT.dim, "qu-9")
    assert {"intent=artist", "daypart=night", "device=desktop", "qlen=2"} <= set(ctx.features)
    other_dim = ContextFeaturizer(hash_dim=8)
    assert logged_context(other_dim, imp).dim == other_dim.dim  # same version, other layout
