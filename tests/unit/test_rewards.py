"""The bandit's learning signal: one observation per search per arm, marginal (Shapley)
credit, position correction in the value, failures and latency, learned budget levels."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.bandit_state import InMemoryBanditStore
from orchestrator.budgets import BudgetLearner, budget_key, level_updates, rescale
from orchestrator.errors import InvalidFeedbackError
from orchestrator.examination import ExaminationModel
from orchestrator.rewards import (
    ACTIONS,
    RewardModel,
    level_rewards,
    outcome_rewards,
    shapley_credit,
)
from orchestrator.selection import LinearThompsonSelector, SelectionContext

AF = {"lexical.v1": [["source", "lexical"]], "lexical_popular.v1": [["source", "lexical"]],
      "semantic.v1": [["source", "semantic"]], "broken.v1": [["source", "broken"]]}
CTX = SelectionContext({"intent=known_item": 1.0}, (0, 1), (1.0, 1.0),
                       "intent=known_item|daypart=evening")


def imp(*, executed=("lexical.v1", "lexical_popular.v1", "semantic.v1"), failures=(),
        took=None, levels=(), budgets=None, chosen_levels=None) -> dict:
    """An impression: item a held by lexical + lexical_popular (ranks 1, 2), item b by
    semantic only (rank 30 there), item c by lexical alone (rank 15)."""
    chosen_ids = list(executed) + [f["template_id"] for f in failures]
    budgets = budgets or {}
    chosen_levels = chosen_levels or {}
    took = took or {}
    return {
        "request_id": "r1", "executed": list(executed),
        "decision": {"chosen": [{"arm": t.split(".")[0], "template_id": t,
                                 "action_features": AF[t], "budget": budgets.get(t, 40),
                                 "level": chosen_levels.get(t)} for t in chosen_ids],
                     "budget_levels": list(levels)},
        "failures": list(failures),
        "arm_stats": {t: {"took_ms": float(took.get(t, 0.0))} for t in executed},
        "shown": [
            {"id": "a", "rank": 1, "arms": ["lexical.v1", "lexical_popular.v1"],
             "provenance": [{"template_id": "lexical.v1", "rank": 1},
                            {"template_id": "lexical_popular.v1", "rank": 2}]},
            {"id": "b", "rank": 2, "arms": ["semantic.v1"],
             "provenance": [{"template_id": "semantic.v1", "rank": 30}]},
            {"id": "c", "rank": 7, "arms": ["lexical.v1"],
             "provenance": [{"template_id": "lexical.v1", "rank": 15}]},
        ],
    }


def by_tid(rewards):
    return {r.template_id: r for r in rewards}


NO_COST = RewardModel(latency_cost_per_ms=0.0)


def test_search_time_observation_is_zero_for_every_arm_that_ran():
    out = outcome_rewards(imp(), (), NO_COST)
    assert [(r.template_id, r.reward, r.weight) for r in out] == [
        ("lexical.v1", 0.0, 1.0), ("lexical_popular.v1", 0.0, 1.0), ("semantic.v1", 0.0, 1.0)]
    assert out[0].action_features == (("source", "lexical"),)


def test_redundant_arms_share_credit_a_unique_arm_gets_all_of_it():
    assert shapley_credit(["lexical.v1", "lexical_popular.v1"], ["lexical.v1", "lexical_popular.v1",
                                                                  "semantic.v1"]) == {
        "lexical.v1": 0.5, "lexical_popular.v1": 0.5}
    assert shapley_credit(["x"], ["lexical.v1"]) == {}
    shared = by_tid(outcome_rewards(imp(), [("a", "like")], NO_COST))
    assert shared["lexical.v1"].reward == shared["lexical_popular.v1"].reward == pytest.approx(0.5)
    assert shared["semantic.v1"].reward == 0.0
    unique = by_tid(outcome_rewards(imp(), [("b", "like")], NO_COST))
    # b is at display position 2: value 1 / theta_2 = log2(3), all of it to semantic
    assert unique["semantic.v1"].reward == pytest.approx(math.log2(3))
    assert unique["semantic.v1"].reward > shared["lexical.v1"].reward
    full = by_tid(outcome_rewards(imp(), [("a", "like")], RewardModel(latency_cost_per_ms=0.0,
                                                                        credit="full")))
    assert full["lexical.v1"].reward == full["lexical_popular.v1"].reward == 1.0


def test_many_actions_are_one_observation_valued_by_the_best():
    acts = [("a", "click"), ("a", "play"), ("c", "click"), ("b", "skip")]
    out = by_tid(outcome_rewards(imp(), acts, NO_COST))
    assert len(out) == 3 and all(r.weight == 1.0 for r in out.values())
    c_value = 0.6 * math.log2(8)  # display position 7, held by lexical alone
    assert out["lexical.v1"].reward == pytest.approx(max(0.5 * 0.8, c_value))
    assert out["lexical_popular.v1"].reward == pytest.approx(0.4)
    assert out["semantic.v1"].reward == 0.0  # a skip is not bandit evidence


def test_position_correction_raises_the_value_never_the_weight():
    rm = RewardModel(latency_cost_per_ms=0.0)
    assert rm.value("click", 1) == 0.6
    assert rm.value("click", 3) == pytest.approx(0.6 * math.log2(4))
    assert rm.value("like", 100) == rm.max_reward == 3.0
    values = [rm.value("click", k) for k in range(1, 8)]
    assert values == sorted(values)
    assert RewardModel(position_bias="none").value("click", 9) == 0.6
    deep = outcome_rewards(imp(), [("c", "click")], rm)
    assert all(r.weight == 1.0 for r in deep)
    assert by_tid(deep)["lexical.v1"].reward == pytest.approx(0.6 * math.log2(8))
    # Another examination model (e.g. estimated from swaps) changes the value only.
    flat = RewardModel(latency_cost_per_ms=0.0, examination=ExaminationModel(tuple([1.0] * 10)))
    assert by_tid(outcome_rewards(imp(), [("c", "click")], flat))["lexical.v1"].reward == 0.6


def test_failed_arm_is_charged_and_latency_lowers_a_slow_arms_reward():
    failures = [{"arm": "broken", "template_id": "broken.v1", "status": 504, "reason": "timed out",
                 "took_ms": 500.0}]
    rm = RewardModel(latency_cost_per_ms=0.001, failure_reward=-0.1)
    out = by_tid(outcome_rewards(imp(failures=failures, took={"semantic.v1": 80.0,
                                                              "lexical.v1": 5.0}), [], rm))
    assert out["broken.v1"].reward == pytest.approx(-0.1 - 0.5)
    assert out["semantic.v1"].reward == pytest.approx(-0.08)
    assert out["semantic.v1"].reward < out["lexical.v1"].reward == pytest.approx(-0.005)
    assert out["broken.v1"].action_features == (("source", "broken"),)
    # Feedback does not change a failed arm's observation.
    again = by_tid(outcome_rewards(imp(failures=failures), [("a", "like")], rm))
    assert again["broken.v1"].reward == pytest.approx(-0.6)
    # A degraded response (fallback cache: no arm was tried) blames nobody.
    degraded = {**imp(executed=(), failures=failures), "degraded": "fallback_cache"}
    assert outcome_rewards(degraded, [], rm) == []


def test_unknown_action_or_item_is_refused():
    with pytest.raises(InvalidFeedbackError, match="valid actions"):
        RewardModel().check_action("buy")
    assert set(ACTIONS) == {"click", "play", "like", "favorite", "skip"}
    with pytest.raises(InvalidFeedbackError, match="was not shown"):
        outcome_rewards(imp(), [("zzz", "click")])


def test_no_click_lowers_and_three_clicks_are_one_observation_in_the_store():
    store = InMemoryBanditStore(dim=2)
    sel = LinearThompsonSelector(store, refresh_interval_s=0)
    rm = RewardModel(latency_cost_per_ms=0.001)
    i = imp(took={"lexical.v1": 10.0, "lexical_popular.v1": 10.0, "semantic.v1": 10.0})
    out = ("out:r1", 60)
    store.apply(sel.updates_for(CTX, outcome_rewards(i, [], rm)), outcome=out)  # the search
    st = store.load_linear(["arm:semantic.v1"])["arm:semantic.v1"]
    assert st.n == 1 and st.b[0] == pytest.approx(-0.01)  # reward 0 minus latency
    for act in ("click", "play", "like"):  # three actions on one search
        assert store.apply(sel.updates_for(CTX, outcome_rewards(i, [("b", act)], rm)),
                           dedupe=("fb:r1", f"b\x1f{act}", 60), outcome=out)
    st = store.load_linear(["arm:semantic.v1"])["arm:semantic.v1"]
    assert st.n == 1 and st.w == 1.0  # still one observation
    assert st.b[0] == pytest.approx(math.log2(3) - 0.01)  # valued by the best (the like)
    assert st.A[0, 0] == 1.0
    # the pooled af:source=lexical model got one observation from each lexical arm
    assert store.load_linear(["af:source=lexical"])["af:source=lexical"].n == 2
    # a replay of the same writes changes nothing (idempotent)
    before = store.load_linear(["arm:semantic.v1"])["arm:semantic.v1"].b.copy()
    store.apply(sel.updates_for(CTX, outcome_rewards(i, [], rm)), outcome=out)
    store.apply(sel.updates_for(CTX, outcome_rewards(i, [("b", "like")], rm)), outcome=out)
    np.testing.assert_array_equal(store.load_linear(["arm:semantic.v1"])["arm:semantic.v1"].b, before)


def test_no_click_search_lowers_the_posterior_mean():
    store = InMemoryBanditStore(dim=2)
    sel = LinearThompsonSelector(store, refresh_interval_s=0, budget_mode="proportional")
    arms = sel_arms()
    m0 = sel.expectations(CTX, arms)
    store.apply(sel.updates_for(CTX, outcome_rewards(imp(), [], RewardModel())),
                outcome=("out:r1", 60))
    m1 = sel.expectations(CTX, arms)
    assert all(m1[t] < m0[t] for t in m0)


def sel_arms():
    from orchestrator.selection import ArmSpec

    return [ArmSpec(t.split(".")[0], t, tuple(tuple(x) for x in AF[t]))
            for t in ("lexical.v1", "lexical_popular.v1", "semantic.v1")]


def test_budget_level_rewards_are_counterfactual_and_censored():
    i = imp(levels=(10, 20, 40), budgets={"lexical.v1": 20, "lexical_popular.v1": 40,
                                          "semantic.v1": 40},
            chosen_levels={"lexical.v1": 20, "lexical_popular.v1": 40, "semantic.v1": 40})
    rm = RewardModel(latency_cost_per_ms=0.0)
    at_search = level_rewards(i, [], rm)
    assert {(r.template_id, r.level, r.reward) for r in at_search} == {
        ("lexical.v1", 10, 0.0), ("lexical.v1", 20, 0.0),  # 40 is censored (budget 20)
        ("lexical_popular.v1", 10, 0.0), ("lexical_popular.v1", 20, 0.0),
        ("lexical_popular.v1", 40, 0.0),
        ("semantic.v1", 10, 0.0), ("semantic.v1", 20, 0.0), ("semantic.v1", 40, 0.0)}
    # item c: lexical's rank 15 -> success at level 20, not 10; value clipped to 1
    deep = {(r.template_id, r.level): r.reward for r in level_rewards(i, [("c", "click")], rm)}
    assert deep[("lexical.v1", 10)] == 0.0 and deep[("lexical.v1", 20)] == 1.0
    assert ("lexical.v1", 40) not in deep
    # item b: semantic's rank 30 -> only level 40
    b = {(r.template_id, r.level): r.reward for r in level_rewards(i, [("b", "play")], rm)}
    assert b[("semantic.v1", 20)] == 0.0 and b[("semantic.v1", 40)] == 1.0
    ups = level_updates(CTX, level_rewards(i, [("c", "click")], rm))
    assert {u.template_id for u in ups} == {budget_key(t) for t in AF if t != "broken.v1"}
    assert {u.bucket for u in ups} >= {"l20|intent=known_item", "l20|*"}
    assert all(u.group for u in ups)
    # no budget_levels in the decision (baselines, other budget modes): nothing
    assert level_rewards(imp(), [("c", "click")], rm) == []


def test_budget_levels_learn_and_their_propensities_sum_to_one():
    store = InMemoryBanditStore(dim=2)
    learner = BudgetLearner(store, refresh_interval_s=0, cost_per_candidate=0.002)
    rng = np.random.default_rng(0)
    props = learner.level_propensities(CTX, ["lexical.v1"], rng=rng)["lexical.v1"]
    assert sum(props.values()) == pytest.approx(1.0)
    # lexical finds the chosen item in its top 10 every time: 10 wins (deeper costs more)
    from orchestrator.rewards import LevelReward

    for _ in range(60):
        store.apply(level_updates(CTX, [LevelReward("lexical.v1", lvl, 1.0) for lvl in (10, 20, 40)]))
    props = learner.level_propensities(CTX, ["lexical.v1"], rng=rng)["lexical.v1"]
    assert sum(props.values()) == pytest.approx(1.0) and props[10] > 0.6
    # ... semantic only at depth 40
    for _ in range(60):
        store.apply(level_updates(CTX, [LevelReward("semantic.v1", 10, 0.0),
                                        LevelReward("semantic.v1", 20, 0.0),
                                        LevelReward("semantic.v1", 40, 0.8)]))
    props = learner.level_propensities(CTX, ["semantic.v1"], rng=rng)["semantic.v1"]
    assert props[40] > 0.9


def test_decision_logs_levels_and_budget_propensity():
    store = InMemoryBanditStore(dim=2)
    sel = LinearThompsonSelector(store, refresh_interval_s=0, random_state=1, max_arms=3,
                                 threshold=-10.0)
    d = sel.select(CTX, sel_arms(), total_budget=60, size=10)
    assert d.budget_levels == (10, 20, 40)
    assert all(c.level in d.budget_levels and 0 < c.level_propensity <= 1 for c in d.choices)
    assert d.budget_propensity == pytest.approx(float(np.prod([c.level_propensity
                                                               for c in d.choices])))
    assert d.action_propensity == pytest.approx(d.subset_propensity * d.budget_propensity)
    assert 10 <= sum(c.budget for c in d.choices) <= 60
    from orchestrator.pipeline import decision_to_dict

    dd = decision_to_dict(d)
    assert dd["budget_levels"] == [10, 20, 40] and "action_propensity" in dd
    assert all("level" in c and "level_propensity" in c for c in dd["chosen"])
    eq = LinearThompsonSelector(store, refresh_interval_s=0, random_state=1, threshold=-10.0,
                                budget_mode="equal").select(CTX, sel_arms(), total_budget=60)
    assert [c.budget for c in eq.choices] == [20, 20, 20] and eq.budget_levels == ()


def test_rescale():
    assert rescale([40, 40, 40], 60) == [20, 20, 20]
    assert sum(rescale([10, 40], 60)) == 50 or sum(rescale([10, 40], 60)) == 60
    assert rescale([4, 4], 10) == [5, 5]
    assert min(rescale([1, 1000], 10)) >= 1
