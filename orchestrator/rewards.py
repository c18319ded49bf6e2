"""Turn one user interaction into per-arm rewards for the selector.

Consumes a feedback action on an item of a stored impression (its display position and the
arms whose candidate sets held it); produces :class:`ArmReward` s, which
:mod:`orchestrator.selection` turns into statistic updates.

Attribution (one documented binarizer, MABWiser-style, made explicit):

* Positive actions (``click``, ``play``, ``like``, ``favorite``): every arm that *ran* for
  the request gets one observation. Its reward is the action's value if the item was in
  that arm's candidate set, else 0 (the arm was given budget and did not find the item).
* Negative actions (``skip``): only arms that retrieved the item get an observation, with
  reward 0 (a skip says nothing about arms that did not propose the item).
* Arms that failed in the ``_msearch`` or were not chosen get nothing.
* A response with no results at all cannot be interacted with, so the pipeline gives every
  arm that ran a reward-0 observation right away (event action ``empty``); otherwise arms
  that find nothing for a kind of query would never learn so.

Position bias: users examine lower display positions less, so a positive action at a low
position is stronger evidence. Under the position-based model with examination probability
``P(E | k) = 1 / log2(k + 1)`` (the DCG discount), the observation is weighted by the
inverse propensity ``min(log2(k + 1), max_weight)`` (capped, for variance). Skips are not
re-weighted: a skip means the item was examined. ``position_bias="none"`` disables it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from .errors import InvalidFeedbackError

Action = Literal["click", "play", "like", "favorite", "skip"]
#: Reward of each action for an arm that retrieved the item (in [0, 1]; the selector's scale).
DEFAULT_ACTION_VALUES: dict[str, float] = {
    "click": 0.6, "play": 0.8, "like": 1.0, "favorite": 1.0, "skip": 0.0,
}
NEGATIVE_ACTIONS = frozenset({"skip"})
ACTIONS: tuple[str, ...] = tuple(DEFAULT_ACTION_VALUES)


@dataclass(frozen=True, slots=True)
class ArmReward:
    """One observation for one arm: reward in [0, 1] and an observation weight."""

    arm: str
    template_id: str
    reward: float
    weight: float
    action_features: tuple[tuple[str, str], ...] = field(default=(), hash=False, compare=False)


@dataclass(frozen=True, slots=True)
class RewardModel:
    """Action values and position-bias correction (see the module docstring).

    Parameters
    ----------
    action_values:
        ``{action: reward}``; the keys are the accepted actions.
    position_bias:
        ``log2``: inverse examination propensity ``min(log2(k + 1), max_weight)``;
        ``none``: weight 1.
    max_weight:
        Cap on the inverse-propensity weight.
    """

    action_values: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_ACTION_VALUES))
    position_bias: Literal["log2", "none"] = "log2"
    max_weight: float = 3.0
    negative_actions: frozenset[str] = NEGATIVE_ACTIONS

    def check_action(self, action: str) -> str:
        if action not in self.action_values:
            raise InvalidFeedbackError(
                f"unknown action {action!r}; valid actions: {sorted(self.action_values)}"
            )
        return action

    def examination(self, position: int) -> float:
        """P(examined | display position), 1-based."""
        return 1.0 / math.log2(position + 1)

    def weight(self, position: int, action: str) -> float:
        if self.position_bias == "none" or action in self.negative_actions:
            return 1.0
        return min(1.0 / self.examination(position), self.max_weight)

    def arm_rewards(self, *, action: str, position: int, item_arms: Sequence[str],
                    executed: Sequence[tuple[str, str, tuple[tuple[str, str], ...]]]) -> list[ArmReward]:
        """Observations for one interaction.

        Parameters
        ----------
        action:
            One of ``action_values``.
        position:
            1-based display position of the item.
        item_arms:
            Template ids of the arms whose candidate sets held the item.
        executed:
            ``(arm, template_id, action_features)`` of every arm that ran successfully.
        """
        self.check_action(action)
        value = float(self.action_values[action])
        w = self.weight(position, action)
        held = set(item_arms)
        out = []
        for arm, tid, af in executed:
            if action in self.negative_actions:
                if tid in held:
                    out.append(ArmReward(arm, tid, 0.0, w, af))
            else:
                out.append(ArmReward(arm, tid, value if tid in held else 0.0, w, af))
        return out
