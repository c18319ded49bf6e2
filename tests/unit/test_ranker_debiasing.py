"""The ranker without position bias: neutral missing features, memory features, IPS-weighted
training and the IPS-weighted held-out metric (seeded simulations)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from orchestrator.domain import Candidate, Provenance
from orchestrator.examination import ExaminationModel
from orchestrator.rescoring import (
    MEMORY_CTR_PRIOR,
    MISSING_RANK,
    MISSING_SCORE,
    FeatureExtractor,
    LinearRescorer,
    dataset_with_positions,
    ips_weights,
    load_latest,
    memory_features,
    neutral_value,
    train_rescorer,
)
from orchestrator.training import evaluate, ranking_groups, retrain_ranker

T0 = 1_700_000_000.0


def cand(i: str, arms: dict[str, int], **src) -> Candidate:
    prov = tuple(Provenance(a, f"{a}.v1", r, 10.0 / r, 1.0 / r) for a, r in arms.items())
    return Candidate(i, {"entity_type": "track", "title": i, **src}, prov)


# -- neutral missing features ---------------------------------------------------------------------
def rank_model() -> LinearRescorer:
    """Trained on the two arms' rank features: the memory arm's rank 1-3 items are the clicked
    ones, so ``rank:memory`` gets a negative weight."""
    rng = np.random.default_rng(0)
    n = 2000
    mem = rng.integers(1, 40, size=n).astype(float)
    mem[rng.random(n) < 0.5] = np.nan  # half not returned by the memory arm
    lex = rng.integers(1, 40, size=n).astype(float)
    y = ((mem <= 3) | (rng.random(n) < 0.05)).astype(int)
    X = np.column_stack([np.log1p(lex), np.where(np.isnan(mem), MISSING_RANK, np.log1p(mem)),
                         np.where(np.isnan(mem), MISSING_SCORE, 1.0 / np.nan_to_num(mem, nan=1))])
    model = train_rescorer(X, y, feature_names=("rank:lexical", "rank:memory", "nscore:memory"))
    assert model.coef_[1] < 0
    return model


def test_missing_rank_never_ranks_above_rank_1():
    model = rank_model()
    a = cand("a", {"lexical": 3, "memory": 1})  # the memory arm's top item
    b = cand("b", {"lexical": 3})  # not returned by the memory arm
    wide, narrow = FeatureExtractor(["lexical", "memory"]), FeatureExtractor(["lexical"])
    ranked = model.rank([b, a], query="q", parsed=None, extractor=wide)
    assert [c.id for c, _, _ in ranked] == ["a", "b"]
    s_wide = {c.id: s for c, s, _ in ranked}
    # The extractor lacks the memory arm (an arm removed from the registry): rank:memory and
    # nscore:memory take their neutral values, i.e. "not returned by that arm", never better.
    s_narrow = {c.id: s for c, s, _ in model.rank([a, b], query="q", parsed=None,
                                                    extractor=narrow)}
    assert s_narrow["b"] == pytest.approx(s_wide["b"])
    assert max(s_narrow.values()) < s_wide["a"]
    assert list(model.missing_) == [MISSING_RANK, MISSING_RANK, MISSING_SCORE]
    # What "missing counts as 0" did: log1p(rank) = 0 scored better than rank 1.
    zero = LinearRescorer(feature_names=model.feature_names, coef=model.coef_,
                          intercept=model.intercept_, mean=model.mean_, scale=model.scale_,
                          missing=[0.0, 0.0, 0.0])
    s_zero = {c.id: s for c, s, _ in zero.rank([a, b], query="q", parsed=None, extractor=narrow)}
    assert s_zero["b"] > s_wide["a"]


def test_other_missing_features_are_neutral_at_the_training_mean():
    rng = np.random.default_rng(1)
    X = rng.random((500, 2))
    y = (X[:, 0] > 0.5).astype(int)
    model = train_rescorer(X, y, feature_names=("title_overlap", "popularity"))
    assert model.missing_[1] == pytest.approx(X[:, 1].mean())
    # Scoring without popularity = scoring with popularity at its mean.
    full = model.score(np.column_stack([X[:, 0], np.full(500, X[:, 1].mean())]),
                       ("title_overlap", "popularity"))
    assert np.allclose(model.score(X[:, :1], ("title_overlap",)), full)
    assert neutral_value("rank:x") == MISSING_RANK and neutral_value("nscore:x") == MISSING_SCORE
    assert neutral_value("best_rank_log") == MISSING_RANK
    assert neutral_value("memory_ctr") == MEMORY_CTR_PRIOR
    assert neutral_value("memory_log_exposures", 3.0) == 0.0
    assert neutral_value("popularity", 0.4) == 0.4


def test_old_model_json_loads(tmp_path):
    """A schema_version 1 file (no ``missing``) loads; its missing features get the neutral
    values; scores of its present features are unchanged; saving writes version 2."""
    old = {"schema_version": 1, "kind": "linear", "name": "logistic",
           "feature_names": ["rrf", "popularity", "rank:memory"], "coef": [2.0, 0.5, -1.0],
           "intercept": 0.1, "mean": [0.02, 0.3, 5.0], "scale": [0.01, 0.2, 1.5],
           "metadata": {"kind": "logistic", "version": 1}}
    (tmp_path / "rescorer.v1.json").write_text(json.dumps(old), encoding="utf-8")
    model = load_latest(tmp_path)
    assert model.metadata["version"] == 1
    assert list(model.missing_) == [0.02, 0.3, MISSING_RANK]
    X = np.array([[0.03, 0.5, math.log1p(2)]])
    names = ("rrf", "popularity", "rank:memory")
    want = 0.1 + 2.0 * (0.03 - 0.02) / 0.01 + 0.5 * (0.5 - 0.3) / 0.2 - (math.log1p(2) - 5) / 1.5
    assert model.score(X, names)[0] == pytest.approx(want)
    # Without the memory column: as if the arm had not returned the item.
    without = model.score(X[:, :2], names[:2])[0]
    assert without == pytest.approx(want + (math.log1p(2) - MISSING_RANK) / 1.5)
    d = model.to_dict()
    assert d["schema_version"] == 2 and d["missing"][2] == MISSING_RANK
    assert LinearRescorer.from_dict(d).missing_.tolist() == model.missing_.tolist()


# -- memory features -------------------------------------------------------------------------------
def test_memory_features_are_neutral_when_absent():
    ex = FeatureExtractor(["lexical", "memory"])
    shown = cand("m", {"memory": 1}, _memory={"ctr": 0.5, "exposures": 20.0, "clicks": 10.0})
    never = cand("n", {"lexical": 1})
    zero = cand("z", {"memory": 2}, _memory={"ctr": 0.0, "exposures": 0.0, "clicks": 0.0})
    bad = cand("x", {"memory": 3}, _memory={"ctr": "oops", "exposures": None})
    X = ex.rows([shown, never, zero, bad], query="q", parsed=None)
    f = [dict(zip(ex.names, row)) for row in X]
    assert f[0]["memory_ctr"] == pytest.approx((0.5 * 20 + MEMORY_CTR_PRIOR * 2) / 22)
    assert f[0]["memory_log_exposures"] == pytest.approx(math.log1p(20))
    for row in f[1:]:
        assert (row["memory_ctr"], row["memory_log_exposures"]) == (MEMORY_CTR_PRIOR, 0.0)
    assert memory_features(None) == (MEMORY_CTR_PRIOR, 0.0)
    # Neutral also for a model that knows the features when the extractor lacks them.
    m = LinearRescorer(feature_names=("memory_ctr", "memory_log_exposures"), coef=[3.0, 1.0],
                       mean=[0.3, 1.0], scale=[0.2, 1.0])
    assert m.score(np.zeros((1, 1)), ("rrf",))[0] == pytest.approx(
        m.score(np.array([[MEMORY_CTR_PRIOR, 0.0]]), ("memory_ctr", "memory_log_exposures"))[0])


# -- IPS -------------------------------------------------------------------------------------------
NAMES = ("title_overlap", "popularity")


def biased_log(n: int, *, seed: int, eta: float = 1.0, n_items: int = 10) -> list[dict]:
    """A logging ranker that orders by ``popularity`` (irrelevant) and PBM users
    (``theta_k = 1 / k^eta``) whose relevance depends on ``title_overlap`` only:
    ``P(click) = theta_k * sigmoid(2 a - 1.5)``."""
    rng = np.random.default_rng(seed)
    events: list[dict] = []
    for i in range(n):
        a, b = rng.normal(size=n_items), rng.normal(size=n_items)
        r = 1.0 / (1.0 + np.exp(-(2 * a - 1.5)))
        order = np.argsort(-b)
        rid, ts = f"q{i}", T0 + 60 * i
        events.append({"type": "impression", "request_id": rid, "ts": ts,
                       "event_id": f"{int(ts * 1000)}-0", "feature_names": list(NAMES),
                       "shown": [{"id": f"{rid}-{j}", "rank": p, "features": [a[j], b[j]]}
                                 for p, j in enumerate(order, 1)]})
        for p, j in enumerate(order, 1):
            if rng.random() < p ** -eta * r[j]:
                events.append({"type": "feedback", "request_id": rid, "item_id": f"{rid}-{j}",
                               "action": "click", "ts": ts + 3,
                               "event_id": f"{int(ts * 1000) + 3000}-{p}"})
    return events


TRUE_THETA = ExaminationModel(tuple(1.0 / k for k in range(1, 51)))


def test_ips_weights():
    y = np.array([1, 0, 1, 1])
    w = ips_weights(y, np.array([1, 2, 4, 40]), TRUE_THETA, cap=10.0)
    assert w.tolist() == [1.0, 1.0, 4.0, 10.0]
    assert ips_weights(y, np.array([1, 2, 4, 40]), TRUE_THETA, cap=1.0).tolist() == [1.0] * 4
    X, yy, names, pos = dataset_with_positions(biased_log(3, seed=0))
    assert names == NAMES and len(pos) == len(yy) == len(X) and sorted(set(pos)) == list(range(1, 11))


def test_ips_recovers_the_relevance_order_that_the_unweighted_fit_misses(tmp_path):
    """Seeded: 3,000 logged requests. Unweighted, popularity gets ~0.6 of title_overlap's
    weight (clicks follow position, position follows popularity); IPS-weighted (true theta,
    cap 20) under 0.15 (measured: 0.59 vs 0.07)."""
    events = biased_log(3000, seed=0)
    fits = {}
    for cap in (1.0, 20.0):
        res = retrain_ranker(events, model_dir=tmp_path / str(cap), now=T0 + 1e6,
                             examination=TRUE_THETA, ips_cap=cap)
        assert res["promoted"], res
        m = load_latest(tmp_path / str(cap))
        assert m.metadata["ips"]["cap"] == cap and m.metadata["metric"] == "ips_ndcg@10"
        fits[cap] = m
    w = {cap: m.coef_ / m.scale_ for cap, m in fits.items()}
    assert w[1.0][1] / w[1.0][0] > 0.4
    assert abs(w[20.0][1] / w[20.0][0]) < 0.15
    # A clearly more relevant but unpopular item against a popular, less relevant one.
    pair = np.array([[0.5, -2.0], [0.0, 2.0]])
    assert fits[1.0].score(pair, NAMES)[0] < fits[1.0].score(pair, NAMES)[1]  # wrong order
    assert fits[20.0].score(pair, NAMES)[0] > fits[20.0].score(pair, NAMES)[1]  # true order
    # Fresh items: pairwise agreement with the true relevance order.
    rng = np.random.default_rng(99)
    F = rng.normal(size=(400, 2))
    i, j = np.triu_indices(400, 1)
    truth = np.sign(F[i, 0] - F[j, 0])

    def agree(m: LinearRescorer) -> float:
        s = m.score(F, NAMES)
        return float(np.mean(np.sign(s[i] - s[j]) == truth))

    assert agree(fits[20.0]) > 0.95 > 0.85 > agree(fits[1.0])


def test_ips_metric_prefers_the_truly_better_model():
    """On held-out groups logged by the popularity ranker, the naive nDCG of the clicks
    prefers popularity-biased models (and rates the logger above the relevance oracle); the
    IPS-weighted nDCG orders the models by how little popularity they use."""
    groups, names, _ = ranking_groups(biased_log(600, seed=5))
    models = {c: LinearRescorer(feature_names=NAMES, coef=[1.0, c]) for c in (0.0, 0.3, 0.6)}
    logger_model = LinearRescorer(feature_names=NAMES, coef=[0.0, 1.0])
    naive = {c: evaluate(m, groups, names) for c, m in models.items()}
    ips = {c: evaluate(m, groups, names, examination=TRUE_THETA, ips_cap=20.0)
           for c, m in models.items()}
    assert naive[0.6] > naive[0.3] > naive[0.0]
    assert evaluate(logger_model, groups, names) > naive[0.0]
    assert ips[0.0] > ips[0.3] > ips[0.6]
    assert evaluate(logger_model, groups, names, examination=TRUE_THETA, ips_cap=20.0) < ips[0.6]
    # Groups without positions (older callers) use the display order.
    assert groups[0].display_positions.tolist() == list(range(1, 11))
