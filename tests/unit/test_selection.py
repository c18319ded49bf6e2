"""Selectors, context features, budgets, propensities and the in-memory state (no services)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from orchestrator.bandit_state import (
    BetaUpdate,
    InMemoryBanditStore,
    LinearUpdate,
    export_state,
    import_state,
)
from orchestrator.domain import ParsedQuery, RequestContext, Slot
from orchestrator.errors import ConfigurationError, StateVersionError
from orchestrator.rewards import ArmReward
from orchestrator.selection import (
    ArmSpec,
    BetaThompsonSelector,
    ContextFeaturizer,
    FixedPlanSelector,
    LinearThompsonSelector,
    UniformRandomSelector,
    allocate_budgets,
    inclusion_mask,
    make_selector,
)

LEX = ArmSpec("lexical", "lexical.v1", (("fuzzy", "true"), ("source", "lexical")))
GEN = ArmSpec("genre", "genre.v1", (("fuzzy", "false"), ("source", "genre")))
SEM = ArmSpec("semantic", "semantic.v1", (("fuzzy", "false"), ("source", "semantic")))
ARMS = [LEX, GEN, SEM]
FEAT = ContextFeaturizer()
KNOWN = FEAT.transform(ParsedQuery("t", "t", intent="known_item"), RequestContext(hour=9, weekday=1), "bohemian rhapsody")
BROWSE = FEAT.transform(ParsedQuery("jazz", "jazz", (Slot("genre", "jazz", 1.0, 0, 4),), intent="browse"),
                        RequestContext(hour=22, weekday=6, device="mobile"), "jazz")


#: These tests reward the chosen arms 1 (the good one) or 0: the scale the former default
#: threshold was tuned for, kept here so they test the subset mechanics, not the default.
OLD_SCALE = {"threshold": 0.3}


def rewards_for(decision, good: str) -> list[ArmReward]:
    spec = {a.template_id: a for a in ARMS}
    return [ArmReward(c.arm, c.template_id, 1.0 if c.template_id == good else 0.0, 1.0,
                      spec[c.template_id].action_features) for c in decision.choices]


def train(sel, rounds: int = 60) -> None:
    for _ in range(rounds):
        for ctx, good in ((KNOWN, "lexical.v1"), (BROWSE, "genre.v1")):
            sel.partial_fit(ctx, rewards_for(sel.select(ctx, ARMS, total_budget=60), good))


def test_featurizer_is_stable_and_normalised():
    again = ContextFeaturizer().transform(ParsedQuery("t", "t", intent="known_item"),
                                          RequestContext(hour=9, weekday=1), "bohemian rhapsody")
    assert again == KNOWN  # CRC32, not the salted hash(): identical in every process
    assert KNOWN.indices[0] == 0 and KNOWN.values[0] == 1.0
    assert list(KNOWN.indices) == sorted(set(KNOWN.indices))
    assert np.isclose(np.linalg.norm(KNOWN.values[1:]), 1.0)
    assert "slot=genre" in BROWSE.features and "device=mobile" in BROWSE.features
    assert BROWSE.bucket == "intent=browse|daypart=evening"
    assert max(BROWSE.indices) < FEAT.dim
    no_qu = FEAT.transform(None, None, "x")
    assert "intent=unknown" in no_qu.features


def test_featurizer_rejects_unknown_bucket_key():
    with pytest.raises(ConfigurationError, match="unknown bucket key"):
        ContextFeaturizer(bucket_keys=("colour",))


def test_budgets_sum_to_total_and_respect_minimum():
    b = allocate_budgets([0.9, 0.3, 0.01], total=60, min_budget=10)
    assert sum(b) == 60 and min(b) >= 10 and b[0] > b[1] >= b[2]
    assert allocate_budgets([], total=60, min_budget=10) == []
    assert sum(allocate_budgets([1.0, 1.0, 1.0], total=7, min_budget=10)) == 7


def test_inclusion_rule():
    draws = np.array([[0.9, 0.5, 0.1], [0.1, 0.2, 0.25]])
    m = inclusion_mask(draws, min_arms=1, max_arms=2, threshold=0.3)
    assert m.tolist() == [[True, True, False], [False, False, True]]


def test_selection_is_seeded_and_logs_propensities():
    a = LinearThompsonSelector(InMemoryBanditStore(dim=FEAT.dim), random_state=3, refresh_interval_s=0)
    b = LinearThompsonSelector(InMemoryBanditStore(dim=FEAT.dim), random_state=3, refresh_interval_s=0)
    da, db = a.select(KNOWN, ARMS, total_budget=60), b.select(KNOWN, ARMS, total_budget=60)
    assert da == db and da.sampled == db.sampled and da.propensities == db.propensities
    assert set(da.propensities) == {a.template_id for a in ARMS}
    assert all(0 < c.propensity <= 1 for c in da.choices)
    # Learned budget levels (the default) spend at most the total; the former proportional
    # split spends all of it.
    assert sum(c.budget for c in da.choices) <= 60
    assert all(c.level in (10, 20, 40) and 0 < c.level_propensity <= 1 for c in da.choices)
    assert 1 <= len(da.choices) <= 3
    prop = LinearThompsonSelector(InMemoryBanditStore(dim=FEAT.dim), random_state=3,
                                  refresh_interval_s=0, budget_mode="proportional")
    dp = prop.select(KNOWN, ARMS, total_budget=60)
    assert sum(c.budget for c in dp.choices) == 60 and all(c.level is None for c in dp.choices)
    assert dp.budget_propensity == 1.0 and dp.action_propensity == dp.subset_propensity


def test_linear_thompson_learns_context_dependent_arms():
    sel = LinearThompsonSelector(InMemoryBanditStore(dim=FEAT.dim), random_state=0,
                                 refresh_interval_s=0, **OLD_SCALE)
    p0 = sel.select(KNOWN, ARMS, total_budget=60).propensities
    train(sel)
    pk = sel.select(KNOWN, ARMS, total_budget=60).propensities
    pb = sel.select(BROWSE, ARMS, total_budget=60).propensities
    assert pk["lexical.v1"] >= 0.95 and pk["genre.v1"] <= 0.2 < p0["genre.v1"]
    assert pb["genre.v1"] >= 0.95 and pb["lexical.v1"] <= 0.2
    mk = sel.expectations(KNOWN, ARMS)
    assert mk["lexical.v1"] > 0.8 and mk["genre.v1"] < 0.2


def test_action_features_transfer_to_a_new_arm():
    """A new arm sharing ``source=lexical`` starts from what lexical learned."""
    store = InMemoryBanditStore(dim=FEAT.dim)
    sel = LinearThompsonSelector(store, random_state=0, refresh_interval_s=0)
    train(sel)
    twin = ArmSpec("lexical_popular", "lexical_popular.v1", LEX.action_features)
    stranger = ArmSpec("other", "other.v1", (("source", "other"),))
    m = sel.expectations(KNOWN, [twin, stranger])
    assert m["lexical_popular.v1"] > m["other.v1"] + 0.2


def test_beta_simple_mode_learns_per_bucket():
    sel = BetaThompsonSelector(InMemoryBanditStore(dim=FEAT.dim), random_state=0,
                               refresh_interval_s=0, **OLD_SCALE)
    train(sel, rounds=40)
    pk = sel.select(KNOWN, ARMS, total_budget=60).propensities
    pb = sel.select(BROWSE, ARMS, total_budget=60).propensities
    assert pk["lexical.v1"] > 0.9 and pk["genre.v1"] < 0.3
    assert pb["genre.v1"] > 0.9 and pb["lexical.v1"] < 0.3


def test_baselines():
    u = UniformRandomSelector(min_arms=1, max_arms=3, random_state=0)
    d = u.select(KNOWN, ARMS, total_budget=60)
    assert d.propensities == {a.template_id: pytest.approx(2 / 3) for a in ARMS}
    assert sum(c.budget for c in d.choices) == 60
    sizes = [len(u.select(KNOWN, ARMS, total_budget=60).choices) for _ in range(600)]
    assert abs(np.mean(sizes) / 3 - 2 / 3) < 0.05  # empirical inclusion rate == logged propensity
    f = FixedPlanSelector({"lexical": 40, "semantic.v1": 20})
    d = f.select(KNOWN, ARMS, total_budget=60)
    assert d.budgets == {"lexical.v1": 40, "semantic.v1": 20}
    assert d.propensities == {"lexical.v1": 1.0, "genre.v1": 0.0, "semantic.v1": 1.0}
    assert u.updates_for(KNOWN, []) == [] and f.updates_for(KNOWN, []) == []
    with pytest.raises(ConfigurationError, match="unknown selection policy"):
        make_selector("greedy", InMemoryBanditStore(dim=4))


def test_store_dedupe_and_snapshot_roundtrip():
    store = InMemoryBanditStore(dim=FEAT.dim)
    sel = LinearThompsonSelector(store, random_state=0, refresh_interval_s=0)
    ups = sel.updates_for(KNOWN, [ArmReward("lexical", "lexical.v1", 1.0, 2.0, LEX.action_features)])
    assert {u.component for u in ups} == {"arm:lexical.v1", "af:fuzzy=true", "af:source=lexical"}
    assert store.apply(ups, dedupe=("k", "m", 10))
    assert not store.apply(ups, dedupe=("k", "m", 10))  # counted once
    store.apply([BetaUpdate("lexical.v1", "b", 0.5, 2.0)])
    snap = json.loads(json.dumps(export_state(store, components=["arm:lexical.v1"], template_ids=["lexical.v1"])))
    other = InMemoryBanditStore(dim=FEAT.dim)
    import_state(other, snap)
    a, b = store.load_linear(["arm:lexical.v1"])["arm:lexical.v1"], other.load_linear(["arm:lexical.v1"])["arm:lexical.v1"]
    assert np.allclose(a.A, b.A) and np.allclose(a.b, b.b)
    assert other.load_beta(["lexical.v1"])["lexical.v1"].buckets["b"][:2] == pytest.approx([1.0, 1.0])
    with pytest.raises(StateVersionError):
        import_state(other, {**snap, "schema_version": 99})


def test_linear_update_matches_closed_form():
    store = InMemoryBanditStore(dim=FEAT.dim)
    store.apply([LinearUpdate("arm:x", KNOWN.indices, KNOWN.values, 1.0, 1.5)])
    st = store.load_linear(["arm:x"])["arm:x"]
    x = np.zeros(FEAT.dim)
    x[list(KNOWN.indices)] = KNOWN.values
    assert np.allclose(st.A, 1.5 * np.outer(x, x)) and np.allclose(st.b, 1.5 * x)


def test_logged_subset_propensity_matches_empirical_subset_frequency():
    """The decision's joint subset propensity (fraction of the n+1 posterior draws giving
    exactly the chosen subset) is the probability of picking that subset: over many
    selections from a fixed posterior, each subset's frequency matches its mean logged
    propensity. The independence approximation (product of per-arm inclusions) does not."""
    sel = LinearThompsonSelector(InMemoryBanditStore(dim=FEAT.dim), random_state=5,
                                 refresh_interval_s=0, n_resamples=400, **OLD_SCALE,
                                 budget_mode="proportional")  # the rng stream of the subsets alone
    train(sel, rounds=3)  # some evidence, still uncertain: several subsets are likely
    n = 3000
    seen: dict[frozenset, list[float]] = {}
    indep: dict[frozenset, float] = {}
    for _ in range(n):
        d = sel.select(KNOWN, ARMS, total_budget=60)
        s = frozenset(c.template_id for c in d.choices)
        assert 0 < d.subset_propensity <= 1
        seen.setdefault(s, []).append(d.subset_propensity)
        p_ind = 1.0
        for tid, q in d.propensities.items():
            p_ind *= q if tid in s else 1.0 - q
        indep[s] = p_ind
    assert len(seen) >= 3
    for s, logged in seen.items():
        assert abs(len(logged) / n - float(np.mean(logged))) < 0.03, (sorted(s), len(logged) / n)
    # the subsets the rule can produce carry all the probability mass
    assert sum(float(np.mean(v)) for v in seen.values()) == pytest.approx(1.0, abs=0.03)
    assert max(abs(len(seen[s]) / n - indep[s]) for s in seen) > 0.05


def test_baseline_subset_propensities_are_exact():
    u = UniformRandomSelector(min_arms=1, max_arms=3, random_state=0)
    d = u.select(KNOWN, ARMS, total_budget=60)
    assert d.subset_propensity == pytest.approx(1 / 3 / math.comb(3, len(d.choices)))
    counts: dict[frozenset, int] = {}
    for _ in range(2100):
        s = frozenset(c.template_id for c in u.select(KNOWN, ARMS, total_budget=60).choices)
        counts[s] = counts.get(s, 0) + 1
    assert len(counts) == 7 and all(abs(c / 2100 - 1 / 3 / math.comb(3, len(s))) < 0.04
                                    for s, c in counts.items())
    assert FixedPlanSelector({"lexical": 60}).select(KNOWN, ARMS, total_budget=60).subset_propensity == 1.0


def test_posterior_cache_recomputes_only_changed_components(monkeypatch):
    """A refresh reloads every arm; only components whose ``A`` changed pay the d x d
    factorization again (a moved pooled prior only changes the mean), and the cached
    posteriors equal freshly computed ones."""
    store = InMemoryBanditStore(dim=FEAT.dim)
    sel = LinearThompsonSelector(store, refresh_interval_s=0, random_state=0)
    train(sel, rounds=5)
    sel.refresh(ARMS)                       # the last partial_fit changed some arms
    calls = []
    real = np.linalg.cholesky
    monkeypatch.setattr(np.linalg, "cholesky", lambda m: calls.append(1) or real(m))
    sel.refresh(ARMS)
    assert calls == []                      # nothing changed since the last select
    sel.partial_fit(KNOWN, [ArmReward("lexical", "lexical.v1", 1.0, 1.0, LEX.action_features)])
    sel.refresh(ARMS)
    n_comps = len(sel._components(ARMS))
    assert 0 < len(calls) < n_comps         # the updated arm and its pooled components
    monkeypatch.setattr(np.linalg, "cholesky", real)
    fresh = LinearThompsonSelector(store, refresh_interval_s=0, random_state=0)
    fresh.refresh(ARMS)
    for comp, post in fresh.posteriors_.items():
        np.testing.assert_array_equal(sel.posteriors_[comp].mu, post.mu)
        np.testing.assert_array_equal(sel.posteriors_[comp].chol, post.chol)


def test_posterior_from_the_factor_equals_the_dense_inverse():
    """The Cholesky route (mean by two triangular solves, a draw's variance by one solve on
    the sparse context) gives the numbers of the textbook dense form: ``M = lam I + A``,
    ``mu = M^-1 (b + lam prior)``, ``var = v^2 x^T M^-1 x``, and the selector's draws."""
    store = InMemoryBanditStore(dim=FEAT.dim)
    sel = LinearThompsonSelector(store, refresh_interval_s=0, random_state=0, ridge=0.7,
                                 exploration=0.4)
    train(sel, rounds=30)
    sel.refresh(ARMS)
    stats = store.load_linear(sel._components(ARMS))
    ctx = KNOWN
    idx, x = np.asarray(ctx.indices), np.asarray(ctx.values)
    dense = np.zeros(FEAT.dim)
    dense[idx] = x
    for a in ARMS:
        post, st = sel.posteriors_[a.component], stats[a.component]
        inv = np.linalg.inv(0.7 * np.eye(FEAT.dim) + st.A)
        pooled = [sel.posteriors_[c].mu for c in a.pooled_components]
        prior = np.mean(pooled, axis=0)
        np.testing.assert_allclose(post.mu, inv @ (st.b + 0.7 * prior), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(post.cov, 0.16 * inv, rtol=1e-9, atol=1e-12)
        assert post.variance(idx, x) == pytest.approx(0.16 * dense @ inv @ dense, rel=1e-9)
    assert stats[ARMS[0].component].n > 0    # trained: A is not the prior's zero
    # Repeated indices add up, as a dense vector would.
    p0 = sel.posteriors_[ARMS[0].component]
    twice = p0.variance(np.array([1, 1]), np.array([0.5, 0.25]))
    assert twice == pytest.approx(p0.variance(np.array([1]), np.array([0.75])))
    mean, draws = sel._draws(ctx, ARMS, 4000)
    ref = [float(sel.posteriors_[a.component].mu @ dense) for a in ARMS]
    np.testing.assert_allclose(mean, ref, rtol=1e-12, atol=1e-12)
    sds = [np.sqrt(sel.posteriors_[a.component].variance(idx, x)) for a in ARMS]
    np.testing.assert_allclose(draws.std(axis=0), sds, rtol=0.06)


def test_indefinite_statistics_fall_back_to_the_nearest_definite_factor():
    from orchestrator.selection import _cholesky
    m = np.array([[1.0, 2.0], [2.0, 1.0]])   # eigenvalues 3 and -1: no Cholesky factor
    L = _cholesky(m)
    assert np.all(np.isfinite(L)) and np.allclose(np.triu(L, 1), 0)
    w = np.linalg.eigvalsh(L @ L.T)
    assert w.min() > 0 and w.max() == pytest.approx(3.0)


def test_uniform_share_mixes_subsets_and_logs_the_mixture_propensity():
    """With ``uniform_share``, a share of decisions draws the subset uniformly: every subset
    the uniform rule can produce now appears, and each subset's empirical frequency matches
    its mean logged (mixture) propensity; per-arm propensities match inclusion frequencies."""
    def make(share):
        sel = LinearThompsonSelector(InMemoryBanditStore(dim=FEAT.dim), random_state=5,
                                     refresh_interval_s=0, n_resamples=400, **OLD_SCALE,
                                     budget_mode="proportional", uniform_share=share)
        for _ in range(40):  # a confident posterior: Thompson alone picks few subsets
            for ctx, good in ((KNOWN, "lexical.v1"), (BROWSE, "genre.v1")):
                sel.partial_fit(ctx, rewards_for(sel.select(ctx, ARMS, total_budget=60), good))
        return sel

    n = 3000
    counts = {}
    for share in (0.0, 0.3):
        sel = make(share)
        seen: dict[frozenset, list[float]] = {}
        incl = {a.template_id: 0 for a in ARMS}
        prop = {a.template_id: [] for a in ARMS}
        for _ in range(n):
            d = sel.select(KNOWN, ARMS, total_budget=60)
            s = frozenset(c.template_id for c in d.choices)
            seen.setdefault(s, []).append(d.subset_propensity)
            for tid in s:
                incl[tid] += 1
            for tid, q in d.propensities.items():
                prop[tid].append(q)
        counts[share] = seen
        if share:
            for s, logged in seen.items():
                assert abs(len(logged) / n - float(np.mean(logged))) < 0.03, (sorted(s), len(logged) / n)
            for tid in incl:
                assert abs(incl[tid] / n - float(np.mean(prop[tid]))) < 0.03, tid
            assert min(float(np.mean(v)) for v in seen.values()) >= 0.3 / 3 / 3 - 1e-9
    assert len(counts[0.3]) == 7 > len(counts[0.0])   # all 1-3-arm subsets of 3 arms
    with pytest.raises(ConfigurationError):
        LinearThompsonSelector(InMemoryBanditStore(dim=FEAT.dim), uniform_share=1.5)
