"""Differential tests: our statistics against reference implementations on the same data.

* Beta-Bernoulli Thompson (``selection.beta_updates`` -> ``InMemoryBanditStore`` ->
  ``BetaThompsonSelector._params``) against MABWiser ``LearningPolicy.ThompsonSampling``;
* the linear Thompson posterior (``LinearThompsonSelector.updates_for`` -> store ->
  ``_compute``) against MABWiser ``LearningPolicy.LinTS``;
* IPS / SNIPS / DR of ``orchestrator.simulation.ope`` against Open Bandit Pipeline;
* ``orchestrator.metrics`` (nDCG@k, recall@k, reciprocal rank, success@k) against
  pytrec_eval (trec_eval).

Only the update *rules* are compared (sums of ``x x^T`` and ``r x``, success and failure
counts), through the public update functions, so a change to which feedback produces which
reward does not touch these tests. Every log is seeded. The references are dev dependencies
(``scripts/install``); a missing one is an error here, not a skip.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import sys
import types

import numpy as np
import pytest
import pytrec_eval
from mabwiser.mab import MAB, LearningPolicy

from orchestrator import metrics
from orchestrator.bandit_state import InMemoryBanditStore
from orchestrator.rewards import ArmReward
from orchestrator.selection import (
    ArmSpec,
    BetaThompsonSelector,
    LinearThompsonSelector,
    SelectionContext,
    beta_updates,
)
from orchestrator.simulation import ope

ARMS = ("a", "b", "c", "d")


@functools.cache
def _obp_estimators() -> types.ModuleType:
    """``obp.ope.estimators`` without obp's package ``__init__`` files.

    obp 0.5.7 imports its policy learners (torch) from ``obp/__init__.py`` and ``obp.utils``
    does ``import torch`` for one tensor check; the estimators used here never touch torch.
    scripts/install installs obp with ``--no-deps`` (it declares torch and Python < 3.11), so
    the two packages are registered as bare namespaces and an empty ``torch`` stands in when
    the real one is absent."""
    spec = importlib.util.find_spec("obp")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("obp is not installed: run scripts/install (pip install --no-deps obp==0.5.7)")
    root = list(spec.submodule_search_locations)[0]
    saved = {k: sys.modules.get(k) for k in ("obp", "obp.ope", "torch")}
    try:
        for name, path in (("obp", root), ("obp.ope", f"{root}/ope")):
            pkg = types.ModuleType(name)
            pkg.__path__ = [path]
            sys.modules[name] = pkg
        if importlib.util.find_spec("torch") is None:
            torch = types.ModuleType("torch")
            torch.Tensor = torch.tensor = type("Tensor", (), {})  # type: ignore[attr-defined]
            sys.modules["torch"] = torch
        import obp.ope.estimators as est

        return est
    finally:
        for k, v in saved.items():
            if k in ("obp", "obp.ope"):
                continue  # keep the package stubs: obp.ope.estimators stays importable
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


# -- (a) Beta-Bernoulli Thompson ----------------------------------------------------------------

def _binary_log(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    decisions = rng.choice(ARMS, size=n, p=[0.4, 0.3, 0.2, 0.1])
    rates = {"a": 0.1, "b": 0.5, "c": 0.8, "d": 0.3}
    rewards = (rng.random(n) < np.asarray([rates[d] for d in decisions])).astype(float)
    return decisions, rewards


def _ctx(bucket: str = "all", indices: tuple[int, ...] = (0,), values: tuple[float, ...] = (1.0,)
         ) -> SelectionContext:
    return SelectionContext({}, indices, values, bucket)


def _reward(arm: str, r: float) -> ArmReward:
    return ArmReward(arm=arm, template_id=f"{arm}.v1", reward=float(r), weight=1.0)


SPECS = [ArmSpec(a, f"{a}.v1") for a in ARMS]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_beta_posterior_matches_mabwiser_thompson(seed: int) -> None:
    decisions, rewards = _binary_log(seed, 600)
    store = InMemoryBanditStore(dim=1)
    ctx = _ctx()
    for d, r in zip(decisions, rewards):
        store.apply(beta_updates(ctx, [_reward(str(d), r)]))
    ours = BetaThompsonSelector(store, backoff=0.0, refresh_interval_s=0.0, random_state=seed)
    alpha, beta = ours._params(ctx, SPECS)

    mab = MAB(list(ARMS), LearningPolicy.ThompsonSampling(), seed=seed)
    mab.fit(decisions[:300], rewards[:300])
    mab.partial_fit(decisions[300:], rewards[300:])  # incremental == batch, as ours
    ref_alpha = np.asarray([mab._imp.arm_to_success_count[a] for a in ARMS], dtype=float)
    ref_beta = np.asarray([mab._imp.arm_to_fail_count[a] for a in ARMS], dtype=float)
    np.testing.assert_array_equal(alpha, ref_alpha)
    np.testing.assert_array_equal(beta, ref_beta)


def test_beta_backoff_is_mabwiser_plus_the_global_pseudo_counts() -> None:
    """Documented difference: ``backoff > 0`` adds ``backoff * p`` / ``backoff * (1 - p)``
    pseudo-counts from the arm's all-bucket rate ``p = (s + 1) / (s + f + 2)``; a bucket the
    arm was never observed in starts from that prior instead of Beta(1, 1)."""
    decisions, rewards = _binary_log(3, 400)
    store = InMemoryBanditStore(dim=1)
    for i, (d, r) in enumerate(zip(decisions, rewards)):
        store.apply(beta_updates(_ctx("x" if i % 2 else "y"), [_reward(str(d), r)]))
    backoff = 2.0
    ours = BetaThompsonSelector(store, backoff=backoff, refresh_interval_s=0.0)
    alpha, beta = ours._params(_ctx("x"), SPECS)
    mab = MAB(list(ARMS), LearningPolicy.ThompsonSampling(), seed=0)
    mab.fit(decisions[1::2], rewards[1::2])  # bucket "x" alone
    glob = MAB(list(ARMS), LearningPolicy.ThompsonSampling(), seed=0)
    glob.fit(decisions, rewards)  # the "*" row
    for k, a in enumerate(ARMS):
        s, f = glob._imp.arm_to_success_count[a], glob._imp.arm_to_fail_count[a]
        p = s / (s + f)  # MABWiser's counts already hold the +1s
        assert alpha[k] == pytest.approx(mab._imp.arm_to_success_count[a] + backoff * p, abs=1e-12)
        assert beta[k] == pytest.approx(mab._imp.arm_to_fail_count[a] + backoff * (1 - p), abs=1e-12)


# -- (b) linear Thompson ------------------------------------------------------------------------

def _contextual_log(seed: int, n: int, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    decisions = rng.choice(ARMS, size=n)
    X = np.zeros((n, dim))
    X[:, 0] = 1.0  # the bias, index 0 (SelectionContext's convention)
    for i in range(n):  # sparse hashed features, as the featurizer makes them
        cols = rng.choice(np.arange(1, dim), size=3, replace=False)
        X[i, cols] = rng.normal(size=3)
    theta = {a: rng.normal(size=dim) * 0.3 for a in ARMS}
    rewards = np.asarray([float(X[i] @ theta[d]) + rng.normal(scale=0.1)
                          for i, d in enumerate(decisions)])
    return decisions, X, rewards


@pytest.mark.parametrize(("seed", "ridge", "exploration"), [(0, 1.0, 0.5), (1, 0.3, 1.7), (2, 5.0, 0.1)])
def test_linear_posterior_matches_mabwiser_lints(seed: int, ridge: float, exploration: float) -> None:
    dim = 9
    decisions, X, rewards = _contextual_log(seed, 400, dim)
    store = InMemoryBanditStore(dim=dim)
    ours = LinearThompsonSelector(store, exploration=exploration, ridge=ridge, prior_mean=0.0,
                                  refresh_interval_s=0.0, random_state=seed)
    for d, x, r in zip(decisions, X, rewards):
        idx = tuple(int(i) for i in np.flatnonzero(x))
        ctx = _ctx(indices=idx, values=tuple(float(x[i]) for i in idx))
        store.apply(ours.updates_for(ctx, [_reward(str(d), r)]))
    post = ours._compute(store.load_linear([s.component for s in SPECS]), SPECS)

    mab = MAB(list(ARMS), LearningPolicy.LinTS(alpha=exploration, l2_lambda=ridge), seed=seed)
    mab.fit(decisions[:250], rewards[:250], X[:250])
    mab.partial_fit(decisions[250:], rewards[250:], X[250:])
    for s in SPECS:
        ref = mab._imp.arm_to_model[s.arm]
        np.testing.assert_allclose(post[s.component].mu, ref.beta, rtol=0, atol=1e-8)
        np.testing.assert_allclose(post[s.component].cov, exploration ** 2 * ref.A_inv,
                                   rtol=0, atol=1e-8)


# -- (c) off-policy estimators ------------------------------------------------------------------

def _logged_rounds(seed: int, n: int) -> list[ope.LoggedRound]:
    """Uniform-random subset logger over 3-4 eligible arms, exact propensities; reward depends
    on query type and subset."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        qtype = str(rng.choice(["tag", "known_item", "playlist"]))
        eligible = tuple(sorted(rng.choice(ARMS, size=int(rng.integers(3, 5)), replace=False)))
        size = int(rng.integers(1, 4))
        action = frozenset(rng.choice(eligible, size=size, replace=False).tolist())
        p = ope.uniform_subset_propensity(len(eligible), size, min_arms=1, max_arms=3)
        base = {"tag": 0.2, "known_item": 0.5, "playlist": 0.3}[qtype]
        mean = base + 0.15 * ("c" in action) - 0.1 * ("a" in action) + 0.05 * len(action)
        out.append(ope.LoggedRound(qtype, eligible, action, p, float(rng.random() < mean)))
    return out


def _obp_arrays(rounds, target, model):
    """The same rounds as obp's arrays: one action per distinct subset (logged or target)."""
    subsets = sorted({r.action for r in rounds} | {target(r.qtype, r.eligible) for r in rounds},
                     key=lambda s: (len(s), sorted(s)))
    index = {s: i for i, s in enumerate(subsets)}
    n, m = len(rounds), len(subsets)
    action = np.asarray([index[r.action] for r in rounds])
    reward = np.asarray([r.reward for r in rounds], dtype=float)
    pscore = np.asarray([r.propensity for r in rounds], dtype=float)
    action_dist = np.zeros((n, m, 1))
    q_hat = np.zeros((n, m, 1))
    for i, r in enumerate(rounds):
        action_dist[i, index[target(r.qtype, r.eligible)], 0] = 1.0
        for s, j in index.items():
            q_hat[i, j, 0] = model.predict(r.qtype, s)
    return dict(reward=reward, action=action, pscore=pscore, action_dist=action_dist), q_hat


@pytest.mark.parametrize(("seed", "plan"), [(0, ("b", "c")), (1, ("a", "c")), (2, ("a", "b", "d"))])
def test_ope_estimators_match_obp(seed: int, plan: tuple[str, ...]) -> None:
    est = _obp_estimators()
    rounds = _logged_rounds(seed, 3000)
    target = ope.fixed_target(plan)
    assert all(target(r.qtype, r.eligible) for r in rounds)  # no known-zero rounds here
    model = ope.RewardModel().fit(rounds)
    ours = ope.estimate(rounds, target, model=model)
    assert ours.n_matched > 50
    data, q_hat = _obp_arrays(rounds, target, model)
    ips = est.InverseProbabilityWeighting().estimate_policy_value(**data)
    snips = est.SelfNormalizedInverseProbabilityWeighting().estimate_policy_value(**data)
    dr = est.DoublyRobust().estimate_policy_value(**data, estimated_rewards_by_reg_model=q_hat)
    assert ours.ips == pytest.approx(ips, abs=1e-12)
    assert ours.snips == pytest.approx(snips, abs=1e-12)
    assert ours.dr == pytest.approx(dr, abs=1e-12)


def test_ope_known_zero_rounds_are_obp_rounds_logged_deterministically() -> None:
    """Documented difference: a round where the target runs no arm (none of its arms is
    eligible) is not estimated but known (reward 0, nothing shown). That is obp on the same
    rounds with each such round replaced by a deterministic one: the empty subset, logged with
    propensity 1 and reward 0 (predicted reward 0)."""
    est = _obp_estimators()
    rounds = _logged_rounds(5, 2000)
    target = ope.fixed_target(("d",))
    empty = [r for r in rounds if not target(r.qtype, r.eligible)]
    assert len(empty) > 100
    model = ope.RewardModel().fit(rounds)
    ours = ope.estimate(rounds, target, model=model)
    none = frozenset()
    swapped = [r if target(r.qtype, r.eligible) else ope.LoggedRound(r.qtype, r.eligible, none, 1.0, 0.0)
               for r in rounds]

    class Model:  # ours, with the empty subset predicted 0 (it is never in the fitted rows)
        def predict(self, qtype, subset):
            return model.predict(qtype, subset) if subset else 0.0

    data, q_hat = _obp_arrays(swapped, target, Model())
    assert ours.ips == pytest.approx(est.InverseProbabilityWeighting().estimate_policy_value(**data), abs=1e-12)
    assert ours.snips == pytest.approx(
        est.SelfNormalizedInverseProbabilityWeighting().estimate_policy_value(**data), abs=1e-12)
    assert ours.dr == pytest.approx(
        est.DoublyRobust().estimate_policy_value(**data, estimated_rewards_by_reg_model=q_hat), abs=1e-12)


# -- (d) nDCG and friends against trec_eval -----------------------------------------------------

def _trec_order(run: dict[str, float]) -> list[str]:
    """trec_eval's ranking of a run: score descending, ties by document id descending."""
    return [d for d, _ in sorted(run.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]


def _runs_and_qrels(seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    docs = [f"d{i:03d}" for i in range(60)]
    qrels, runs = {}, {}
    for q in range(25):
        qid = f"q{q}"
        judged = rng.choice(docs, size=int(rng.integers(1, 20)), replace=False)
        # graded 0..3 (0 = judged irrelevant), several equal grades
        qrels[qid] = {str(d): int(rng.integers(0, 4)) for d in judged}
        if q % 5 == 0:
            qrels[qid][str(judged[0])] = 2  # at least one relevant
        retrieved = rng.choice(docs, size=int(rng.integers(0, 40)), replace=False)
        scores = np.round(rng.normal(size=len(retrieved)), 1 if q % 3 == 0 else 6)  # ties
        runs[qid] = {str(d): float(s) for d, s in zip(retrieved, scores)}
    qrels["all_zero"] = {"d001": 0, "d002": 0}
    runs["all_zero"] = {"d001": 1.0, "d005": 0.5}
    qrels["empty_run"] = {"d001": 1}
    runs["empty_run"] = {}
    return runs, qrels


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 5, 10, 20])
def test_ndcg_recall_rr_success_match_trec_eval(seed: int, k: int) -> None:
    runs, qrels = _runs_and_qrels(seed)
    measures = {f"ndcg_cut.{k}", f"recall.{k}", "recip_rank", f"success.{k}"}
    ref = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(runs)
    for qid, judged in qrels.items():
        ranking = _trec_order(runs[qid])
        if qid not in ref:  # trec_eval leaves out queries with no retrieved document
            assert not ranking and metrics.ndcg_at_k(ranking, judged, k) == 0.0
            continue
        r = ref[qid]
        assert metrics.ndcg_at_k(ranking, judged, k) == pytest.approx(r[f"ndcg_cut_{k}"], abs=1e-12)
        assert metrics.recall_at_k(ranking, judged, k) == pytest.approx(r[f"recall_{k}"], abs=1e-12)
        assert metrics.reciprocal_rank(ranking, judged) == pytest.approx(r["recip_rank"], abs=1e-12)
        assert metrics.success_at_k(ranking, judged, k) == pytest.approx(r[f"success_{k}"], abs=1e-12)


def test_ndcg_of_scores_is_ndcg_of_the_stable_order() -> None:
    """The ranker's nDCG (scores + labels) is the same nDCG; on tied scores it keeps the
    display order where trec_eval breaks ties by document id (documented difference)."""
    rng = np.random.default_rng(4)
    for _ in range(200):
        n = int(rng.integers(1, 15))
        scores = np.round(rng.normal(size=n), 1)
        labels = rng.integers(0, 3, size=n).astype(float)
        ids = [f"i{j:02d}" for j in range(n)]
        order = sorted(range(n), key=lambda j: -scores[j])  # stable: display order on ties
        judged = dict(zip(ids, labels.tolist()))
        assert metrics.ndcg_of_scores(scores, labels, k=10) == pytest.approx(
            metrics.ndcg_at_k([ids[j] for j in order], judged, 10), abs=1e-12)
        # trec_eval agrees whenever display order and descending id agree on the ties
        run = {ids[j]: float(scores[j]) for j in range(n)}
        if judged and any(v > 0 for v in labels):
            ref = pytrec_eval.RelevanceEvaluator({"q": {d: int(g) for d, g in judged.items()}},
                                                 {"ndcg_cut.10"}).evaluate({"q": run})["q"]
            assert metrics.ndcg_at_k(_trec_order(run), judged, 10) == pytest.approx(
                ref["ndcg_cut_10"], abs=1e-12)


def test_exponential_gain_equals_linear_on_binary_grades() -> None:
    rng = np.random.default_rng(9)
    for _ in range(100):
        ids = [f"x{j}" for j in range(12)]
        judged = {d: int(rng.integers(0, 2)) for d in ids}
        ranking = list(rng.permutation(ids))
        assert metrics.ndcg_at_k(ranking, judged, 10, gain="exponential") == pytest.approx(
            metrics.ndcg_at_k(ranking, judged, 10))


def test_repeated_id_counts_once() -> None:
    assert metrics.ndcg_at_k(["a", "a", "b"], {"a": 1, "b": 1}, 10) == pytest.approx(1.0)
    assert list(itertools.islice(metrics._first_k(["a", "a", "b"], 2), 5)) == ["a", "b"]
