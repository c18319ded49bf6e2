"""Reward attribution and position-bias weights."""

from __future__ import annotations

import math

import pytest

from orchestrator.errors import InvalidFeedbackError
from orchestrator.rewards import ACTIONS, RewardModel

EXECUTED = [("lexical", "lexical.v1", (("source", "lexical"),)),
            ("semantic", "semantic.v1", (("source", "semantic"),))]


def test_positive_action_rewards_arms_that_held_the_item():
    rm = RewardModel()
    out = {r.template_id: r for r in rm.arm_rewards(action="play", position=1,
                                                     item_arms=["lexical.v1"], executed=EXECUTED)}
    assert out["lexical.v1"].reward == 0.8 and out["semantic.v1"].reward == 0.0
    assert out["lexical.v1"].weight == 1.0  # position 1 is always examined
    assert out["lexical.v1"].action_features == (("source", "lexical"),)


def test_skip_only_touches_arms_that_held_the_item():
    out = RewardModel().arm_rewards(action="skip", position=4, item_arms=["semantic.v1"],
                                    executed=EXECUTED)
    assert [(r.template_id, r.reward, r.weight) for r in out] == [("semantic.v1", 0.0, 1.0)]


def test_position_bias_inverse_propensity_is_capped():
    rm = RewardModel(max_weight=3.0)
    assert rm.examination(1) == 1.0
    assert rm.weight(3, "click") == pytest.approx(math.log2(4))
    assert rm.weight(100, "click") == 3.0
    assert [rm.weight(k, "click") for k in range(1, 8)] == sorted(rm.weight(k, "click") for k in range(1, 8))
    assert RewardModel(position_bias="none").weight(9, "click") == 1.0


def test_unknown_action_lists_valid_ones():
    with pytest.raises(InvalidFeedbackError, match="valid actions"):
        RewardModel().check_action("buy")
    assert set(ACTIONS) == {"click", "play", "like", "favorite", "skip"}


def test_failed_or_unchosen_arms_get_nothing():
    out = RewardModel().arm_rewards(action="click", position=2, item_arms=["memory.v1"],
                                    executed=EXECUTED[:1])
    assert [r.template_id for r in out] == ["lexical.v1"] and out[0].reward == 0.0
