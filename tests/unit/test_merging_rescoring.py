"""Merging (dedupe + provenance) and rescoring (features, default model, JSON models)."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.domain import ArmFailure, ArmResult, Hit, ParsedQuery, Slot
from orchestrator.errors import NotFittedError, StateVersionError
from orchestrator.merging import UnionMerger
from orchestrator.rescoring import (
    GENERIC_FEATURES,
    MISSING_RANK,
    MISSING_SCORE,
    FeatureExtractor,
    LinearRescorer,
    dataset_from_events,
    load_latest,
    train_rescorer,
)


def hit(i: str, score: float, rank: int, **src) -> Hit:
    return Hit(i, score, rank, {"entity_type": "track", **src})


RESULTS = [
    ArmResult("lexical", "lexical.v1", (
        hit("a", 10.0, 1, title="Dancing Queen", artist=["ABBA"], popularity=80),
        hit("b", 5.0, 2, title="Queen of Hearts", artist=["Someone"], popularity=20),
    ), 3),
    ArmResult("memory", "memory.v1", (
        hit("b", 2.0, 1, title="Queen of Hearts", album="X"),
        hit("c", 1.0, 2, title="Other", artist=["ABBA"], genres=["pop"]),
    ), 2),
    ArmFailure("semantic", "semantic.v1", 500, "boom"),
]


def test_union_merge_dedupes_and_keeps_provenance():
    cands = UnionMerger().merge(RESULTS)
    assert [c.id for c in cands] == ["b", "a", "c"]  # b is found by two arms: best RRF
    b = cands[0]
    assert b.arms == ("lexical", "memory")
    assert [(p.rank, p.score, p.norm_score) for p in b.provenance] == [(2, 5.0, 0.5), (1, 2.0, 1.0)]
    assert b.source["album"] == "X" and b.source["artist"] == ["Someone"]  # union of _source
    assert UnionMerger().merge([]) == []


def test_features_and_sentinels():
    cands = UnionMerger().merge(RESULTS)
    ex = FeatureExtractor(["lexical", "memory", "semantic"])
    parsed = ParsedQuery("dancing queen abba", "dancing queen abba",
                         (Slot("artist", "ABBA", 0.9, 14, 18), Slot("track", "Dancing Queen", 0.9, 0, 13)),
                         intent="known_item")
    X = ex.rows(cands, query="Dancing Queen", parsed=parsed)
    f = {c.id: dict(zip(ex.names, X[i])) for i, c in enumerate(cands)}
    assert f["a"]["artist_match"] == 1 and f["a"]["title_match"] == 1 and f["a"]["title_exact"] == 1
    assert f["a"]["popularity"] == pytest.approx(0.8)
    assert f["b"]["n_arms"] == 2 and f["a"]["n_arms"] == 1
    assert f["a"]["rank:memory"] == MISSING_RANK and f["a"]["nscore:memory"] == MISSING_SCORE
    assert f["b"]["memory_score"] == 1.0
    assert f["c"]["rank:semantic"] == MISSING_RANK  # failed arm: missing everywhere
    assert f["a"]["type_intent_match"] == 1
    assert ex.names[: len(GENERIC_FEATURES)] == GENERIC_FEATURES


def test_default_rescorer_is_rrf_with_priors():
    cands = UnionMerger().merge(RESULTS)
    ranked = LinearRescorer.default().rank(cands, query="dancing queen", parsed=None,
                                           extractor=FeatureExtractor(["lexical", "memory"]))
    # b (two arms) stays first by RRF; a's exact title + popularity beat c.
    assert [c.id for c, _, _ in ranked] == ["b", "a", "c"]
    assert LinearRescorer.default().rank([], query="x", parsed=None) == []


def test_train_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    names = ("rrf", "popularity", "title_exact")
    X = rng.random((400, 3))
    y = (X[:, 2] + 0.1 * rng.standard_normal(400) > 0.5).astype(int)
    model = train_rescorer(X, y, feature_names=names)
    assert model.metadata["train_auc"] > 0.9 and model.coef_[2] > 0
    p1 = model.save(tmp_path)
    p2 = model.save(tmp_path)
    assert (p1.name, p2.name) == ("rescorer.v1.json", "rescorer.v2.json")
    loaded = load_latest(tmp_path)
    assert np.allclose(loaded.score(X, names), model.score(X, names))
    # Scoring through a wider extractor layout gives the same scores (missing columns = 0).
    wide = ("n_arms",) + names
    Xw = np.hstack([np.ones((400, 1)), X])
    assert np.allclose(loaded.score(Xw, wide), model.score(X, names))
    assert load_latest(tmp_path / "nothing").name == "default-rrf"
    bad = model.to_dict() | {"schema_version": 42}
    with pytest.raises(StateVersionError):
        LinearRescorer.from_dict(bad)
    with pytest.raises(NotFittedError):
        train_rescorer(X, np.zeros(400), feature_names=names)


def test_dataset_from_events_joins_feedback():
    events = [
        {"type": "impression", "request_id": "r1", "feature_names": ["f"],
         "shown": [{"id": "a", "features": [1.0]}, {"id": "b", "features": [0.0]}]},
        {"type": "impression", "request_id": "r2", "feature_names": ["f"],
         "shown": [{"id": "c", "features": [0.5]}]},  # no feedback: not used
        {"type": "feedback", "request_id": "r1", "item_id": "a", "action": "play"},
        {"type": "feedback", "request_id": "r1", "item_id": "b", "action": "skip"},
    ]
    X, y, names = dataset_from_events(events)
    assert names == ("f",) and X.tolist() == [[1.0], [0.0]] and y.tolist() == [1, 0]


def _two_arm_query(q: int) -> list:
    """Five candidates from each of two arms that never agree, for query ``q``."""
    return UnionMerger().merge([
        ArmResult("lex", "lex.v1", tuple(hit(f"l{q}-{r}", 10.0 - r, r, popularity=50)
                                         for r in range(1, 6)), 3),
        ArmResult("exp", "exp.v1", tuple(hit(f"e{q}-{r}", 5.0 - r / 2, r, popularity=50)
                                         for r in range(1, 6)), 3)])


def test_intent_split_copies_features_on_browse_queries_only():
    cands = UnionMerger().merge(RESULTS)
    plain = FeatureExtractor(["lexical", "memory", "semantic"])
    split = FeatureExtractor(["lexical", "memory", "semantic"], intent_split=True)
    n = len(plain.names)
    assert split.names[:n] == plain.names and len(split.names) == 2 * n
    assert split.names[n:] == tuple(f"{x}|browse" for x in plain.names)
    browse = ParsedQuery("chill jazz", "chill jazz", intent="browse")
    lookup = ParsedQuery("dancing queen", "dancing queen", intent="known_item")
    Xb = split.rows(cands, query="chill jazz", parsed=browse)
    assert np.array_equal(Xb[:, :n], plain.rows(cands, query="chill jazz", parsed=browse))
    assert np.array_equal(Xb[:, n:], Xb[:, :n])
    Xl = split.rows(cands, query="dancing queen", parsed=lookup)
    assert np.array_equal(Xl[:, :n], plain.rows(cands, query="dancing queen", parsed=lookup))
    assert (Xl[:, n:] == Xl[0, n:]).all()  # one constant per column: no order changes
    fl = dict(zip(split.names, Xl[0]))
    assert fl["rank:lexical|browse"] == MISSING_RANK and fl["nscore:memory|browse"] == MISSING_SCORE
    assert fl["best_rank_log|browse"] == MISSING_RANK and fl["rrf|browse"] == 0.0
    # a model that does not know the copies ranks exactly as before
    d = LinearRescorer.default()
    for q, p in (("chill jazz", browse), ("dancing queen", lookup)):
        assert [c.id for c, _, _ in d.rank(cands, query=q, parsed=p, extractor=split)] == \
            [c.id for c, _, _ in d.rank(cands, query=q, parsed=p, extractor=plain)]


def test_intent_split_lets_the_ranker_prefer_other_arms_for_browse_queries():
    """Lookups (70%) click the first ``lex`` item, browse queries the first ``exp`` item. One
    set of weights must pick one arm for both; with the ``|browse`` copies it learns both."""
    queries = [(q, "browse" if q % 10 < 3 else "known_item") for q in range(200)]

    def accuracy(ex: FeatureExtractor) -> dict[str, float]:
        rows, labels = [], []
        for q, intent in queries:
            cands = _two_arm_query(q)
            rows.append(ex.rows(cands, query=f"q{q}", parsed=ParsedQuery(f"q{q}", f"q{q}", intent=intent)))
            want = f"e{q}-1" if intent == "browse" else f"l{q}-1"
            labels += [int(c.id == want) for c in cands]
        model = train_rescorer(np.vstack(rows), np.array(labels), feature_names=ex.names)
        hits: dict[str, list[bool]] = {"browse": [], "known_item": []}
        for q, intent in queries:
            ranked = model.rank(_two_arm_query(q), query=f"q{q}",
                                parsed=ParsedQuery(f"q{q}", f"q{q}", intent=intent), extractor=ex)
            hits[intent].append(ranked[0][0].id == (f"e{q}-1" if intent == "browse" else f"l{q}-1"))
        return {k: float(np.mean(v)) for k, v in hits.items()}

    plain = accuracy(FeatureExtractor(["lex", "exp"]))
    split = accuracy(FeatureExtractor(["lex", "exp"], intent_split=True))
    assert split == {"browse": 1.0, "known_item": 1.0}
    assert plain["browse"] == 0.0 and plain["known_item"] == 1.0
