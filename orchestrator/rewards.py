"""Turn a served request and the user's actions on it into one observation per arm.

Consumes a stored impression (which arms ran, failed, how long each took, the shown items with
their provenance per arm) and the request's actions ``[(item_id, action), ...]``; produces
:class:`ArmReward` s (the arm selector's observations, turned into statistic updates by
:mod:`orchestrator.selection`) and :class:`LevelReward` s (the candidate-budget learner's, see
:mod:`orchestrator.budgets`). One pure function, :func:`outcome_rewards`, is used by live
serving (``Orchestrator.search`` with no actions, ``Orchestrator.feedback`` with one) and by
the offline replay (:func:`orchestrator.training.rebuild_posteriors`, with all of them), so
both accumulate exactly the same statistics.

What is observed
----------------
**One observation per search per arm, valued by the search's best outcome.** The bandit
estimates the *expected reward of running an arm for a search*, so every search is evidence,
clicked or not. At search time every chosen arm that ran gets a reward-0 observation (minus its
latency cost) and every chosen arm that failed a failure observation, in the same Redis write
as the impression. Feedback never adds observations: it *raises* the request's observation to
the best outcome so far. ``P out:<request_id>`` (a Redis hash, same TTL as the impression)
keeps, per statistic field group (linear component + template id; Beta template + bucket), the
reward already applied; the atomic Lua apply (:mod:`orchestrator.bandit_state`) adds a full
observation when the group is absent, only the difference ``r - old`` to the reward sums when
``r > old``, and nothing otherwise. So N clicks on one search are one observation (their max),
concurrent feedback is safe (the max is commutative), and a replayed spool is idempotent.
Before this rule, only clicked searches were observations: the bandit learned
``P(arm held the item | the user clicked)`` and a search with three clicks counted three times.

**Marginal credit (Shapley value).** The reward of arm ``a`` for a request is::

    r_a = max(0, max_{positive actions (item, act)} credit_a(item) * value(act, position))
          - latency_cost_per_ms * took_ms_a

``credit`` is the Shapley value of the union-coverage game: the coalition of executed arms
"covers" an item when at least one of them retrieved it; an item held by ``m`` executed arms
makes each of them pivotal in exactly the orderings where it comes first among the ``m``, so
each gets ``1/m`` (0 for arms that did not hold it). Redundant arms (``lexical`` and
``lexical_popular`` returning the same track) share the credit; an arm that alone found the
item gets all of it. ``credit="full"`` (every holder gets 1: the old rule) stays for ablation.
Skips are not bandit evidence (they stay evidence for the Q2E memory and the ranker).

**Position bias goes into the value, never into the weight.** Under the position-based model
``P(click at k) = theta_k * P(relevant)`` with ``theta_k`` the examination propensity of
display position ``k`` relative to position 1 (:class:`~orchestrator.examination.ExaminationModel`,
prior ``1 / log2(k + 1)``). The inverse-propensity value ``value = action_value / theta_k``
has expectation ``P(relevant) * action_value`` whatever the position (IPS: for a fixed item
``E[c_k / theta_k] = theta_k P(rel) / theta_k``), so the linear model, which fits the mean of
its target, is unbiased in expectation; the value is capped at ``max_reward`` (variance; a
small bias toward zero for deep clicks). Beta statistics need ``r`` in [0, 1] and clip it.
The observation *weight* is always 1 (times the time decay in a rebuild): an inverse
propensity used as a Bayesian observation count would make one deep click count as three
observations, and would multiply zero rewards too.

**Failures and latency are part of the objective.** An arm that ran pays
``latency_cost_per_ms * took_ms`` (Elasticsearch's ``took`` of its ``_msearch`` item, logged
per arm in the impression's ``arm_stats``); a chosen arm that failed gets
``failure_reward - latency_cost_per_ms * took_ms`` with ``took_ms`` the arm time-out for
time-outs (status 504) and 0 for errors (logged in the impression's ``failures``). A failing
arm is therefore blamed. A degraded response (served from the fallback cache, no arm ran)
observes nothing.

Budget levels (:mod:`orchestrator.budgets`): for every chosen arm that ran with a logged
``level`` and fetched ``budget`` candidates, and every level ``l`` of the decision's
``budget_levels`` with ``l <= budget`` (levels deeper than what was fetched are censored), the
reward is ``max`` over the positive actions on items that the arm ranked ``<= l`` of
``clip(value, 0, 1)``, else 0; the same one-observation max rule applies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import InvalidFeedbackError
from .examination import ExaminationModel

Action = Literal["click", "play", "like", "favorite", "skip"]
#: Value of each action for the item acted on (the selector's scale, before position correction).
DEFAULT_ACTION_VALUES: dict[str, float] = {
    "click": 0.6, "play": 0.8, "like": 1.0, "favorite": 1.0, "skip": 0.0,
}
NEGATIVE_ACTIONS = frozenset({"skip"})
ACTIONS: tuple[str, ...] = tuple(DEFAULT_ACTION_VALUES)
#: Pseudo-action of events logged by older versions when a response had no results (the
#: search-time observation replaces it; offline replay ignores such events).
EMPTY_ACTION = "empty"


@dataclass(frozen=True, slots=True)
class ArmReward:
    """One observation for one arm: its reward for the request (may be negative: latency and
    failure costs) and the observation weight (1 live; the time decay in a rebuild)."""

    arm: str
    template_id: str
    reward: float
    weight: float = 1.0
    action_features: tuple[tuple[str, str], ...] = field(default=(), hash=False, compare=False)


@dataclass(frozen=True, slots=True)
class LevelReward:
    """One observation of a candidate-budget level of one arm: reward in [0, 1]."""

    template_id: str
    level: int
    reward: float
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class RewardModel:
    """Action values, credit rule, position correction and costs (see the module docstring).

    Parameters
    ----------
    action_values:
        ``{action: value}``; the keys are the accepted actions.
    position_bias:
        ``examination`` (alias ``log2``, the prior's name): divide the value by the
        examination model's ``theta_k``; ``none``: no correction.
    examination:
        The examination model (default: the ``1 / log2(k + 1)`` prior).
    max_reward:
        Cap of the position-corrected value.
    credit:
        ``shapley`` (1/m to each of the m executed arms holding the item) or ``full``.
    latency_cost_per_ms:
        Reward charged per millisecond an arm took (or its time-out, when it timed out).
    failure_reward:
        Reward of a chosen arm that failed (before the latency cost).
    """

    action_values: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_ACTION_VALUES))
    position_bias: Literal["examination", "log2", "none"] = "examination"
    examination: ExaminationModel = field(default_factory=ExaminationModel.default)
    max_reward: float = 3.0
    credit: Literal["shapley", "full"] = "shapley"
    latency_cost_per_ms: float = 0.0002
    failure_reward: float = 0.0
    negative_actions: frozenset[str] = NEGATIVE_ACTIONS

    @classmethod
    def from_settings(cls, settings: Any, *,
                      examination: ExaminationModel | None = None) -> RewardModel:
        """From ``settings.feedback.position_bias`` and ``settings.reward`` (defaults where a
        section or key is missing)."""
        fb = getattr(settings, "feedback", None)
        rw = getattr(settings, "reward", None)
        kw: dict[str, Any] = {}
        if fb is not None and getattr(fb, "position_bias", None) is not None:
            kw["position_bias"] = fb.position_bias
        for name in ("max_reward", "credit", "latency_cost_per_ms", "failure_reward"):
            if rw is not None and getattr(rw, name, None) is not None:
                kw[name] = getattr(rw, name)
        if examination is not None:
            kw["examination"] = examination
        return cls(**kw)

    def params(self) -> list[Any]:
        """JSON-able parameters (fingerprints of rebuilds)."""
        return [self.position_bias, self.max_reward, self.credit, self.latency_cost_per_ms,
                self.failure_reward, sorted(self.action_values.items()),
                list(self.examination.theta[:50])]

    def check_action(self, action: str) -> str:
        if action not in self.action_values:
            raise InvalidFeedbackError(
                f"unknown action {action!r}; valid actions: {sorted(self.action_values)}"
            )
        return action

    def is_positive(self, action: str) -> bool:
        return action not in self.negative_actions and float(self.action_values[action]) > 0

    def value(self, action: str, position: int) -> float:
        """Position-corrected value of ``action`` at a 1-based display position:
        ``min(action_value / theta_k, max_reward)`` (the weight stays 1)."""
        v = float(self.action_values[action])
        if self.position_bias == "none" or v <= 0:
            return v
        return min(v / self.examination.propensity(position), self.max_reward)

    def latency_cost(self, took_ms: float) -> float:
        return self.latency_cost_per_ms * max(float(took_ms), 0.0)


def shapley_credit(held: Iterable[str], executed: Iterable[str], *,
                   rule: Literal["shapley", "full"] = "shapley") -> dict[str, float]:
    """``{template_id: credit}`` of the executed arms for one item (see the module docstring):
    the Shapley value of the union-coverage game, ``1/m`` to each of the ``m`` executed arms
    that held the item; ``full``: 1 to each."""
    ran = set(executed)
    holders = [t for t in dict.fromkeys(held) if t in ran]
    if not holders:
        return {}
    share = 1.0 if rule == "full" else 1.0 / len(holders)
    return dict.fromkeys(holders, share)


def executed_arms(imp: Mapping[str, Any]) -> list[tuple[str, str, tuple[tuple[str, str], ...]]]:
    """``(arm, template_id, action_features)`` of the chosen arms that ran, from a stored
    impression (its ``decision.chosen`` and ``executed``)."""
    ran = set(imp.get("executed") or ())
    return [(c["arm"], c["template_id"], tuple(tuple(x) for x in c.get("action_features", [])))  # type: ignore[misc]
            for c in imp["decision"]["chosen"] if c["template_id"] in ran]


def failed_arms(imp: Mapping[str, Any]) -> list[tuple[str, str, tuple[tuple[str, str], ...], float]]:
    """``(arm, template_id, action_features, took_ms)`` of the chosen arms that failed (none
    for a degraded response: there no arm was tried)."""
    if imp.get("degraded"):
        return []
    ran = set(imp.get("executed") or ())
    took = {f.get("template_id"): float(f.get("took_ms") or 0.0) for f in imp.get("failures") or ()}
    return [(c["arm"], c["template_id"], tuple(tuple(x) for x in c.get("action_features", [])),  # type: ignore[misc]
             took[c["template_id"]])
            for c in imp["decision"]["chosen"]
            if c["template_id"] not in ran and c["template_id"] in took]


def shown_item(imp: Mapping[str, Any], item_id: str | None) -> Mapping[str, Any]:
    """The shown item ``item_id`` of an impression.

    Raises
    ------
    InvalidFeedbackError
        The impression did not show it.
    """
    item = next((s for s in imp["shown"] if s["id"] == item_id), None)
    if item is None:
        shown = [s["id"] for s in imp["shown"]]
        raise InvalidFeedbackError(
            f"item {item_id!r} was not shown for request {imp.get('request_id')!r}; "
            f"shown: {shown[:10]}" + (" ..." if len(shown) > 10 else "")
        )
    return item


def _positive(imp: Mapping[str, Any], actions: Sequence[tuple[str | None, str]],
              model: RewardModel) -> list[tuple[Mapping[str, Any], float]]:
    """``(shown item, position-corrected value)`` of the positive actions (validated)."""
    out = []
    for item_id, action in actions:
        model.check_action(action)
        item = shown_item(imp, item_id)
        if model.is_positive(action):
            out.append((item, model.value(action, int(item["rank"]))))
    return out


def outcome_rewards(imp: Mapping[str, Any], actions: Sequence[tuple[str | None, str]] = (),
                    model: RewardModel | None = None, *, weight: float = 1.0) -> list[ArmReward]:
    """One observation per chosen arm of a request: executed arms first (decision order),
    then failed ones (see the module docstring for the rule).

    Parameters
    ----------
    imp:
        The stored impression (``decision.chosen``, ``executed``, ``failures``, ``arm_stats``,
        ``shown`` with each item's ``arms``).
    actions:
        ``[(item_id, action), ...]`` on the request so far (``()`` at search time).
    model:
        The reward model (default :class:`RewardModel`).
    weight:
        Observation weight (1 live; the time decay in a rebuild).

    Raises
    ------
    InvalidFeedbackError
        Unknown action, or an item the impression did not show.
    """
    model = model or RewardModel()
    executed = executed_arms(imp)
    ran = [tid for _, tid, _ in executed]
    best = dict.fromkeys(ran, 0.0)
    for item, value in _positive(imp, actions, model):
        for tid, share in shapley_credit(item.get("arms") or (), ran, rule=model.credit).items():
            best[tid] = max(best[tid], share * value)
    stats = imp.get("arm_stats") or {}
    out = [ArmReward(arm, tid, best[tid] - model.latency_cost(stats.get(tid, {}).get("took_ms", 0.0)),
                     weight, af) for arm, tid, af in executed]
    out += [ArmReward(arm, tid, model.failure_reward - model.latency_cost(took), weight, af)
            for arm, tid, af, took in failed_arms(imp)]
    return out


def level_rewards(imp: Mapping[str, Any], actions: Sequence[tuple[str | None, str]] = (),
                  model: RewardModel | None = None, *, weight: float = 1.0) -> list[LevelReward]:
    """Observations of the budget levels of the chosen arms that ran with a learned level
    (see the module docstring); ``[]`` for decisions without ``budget_levels``."""
    model = model or RewardModel()
    levels = [int(x) for x in (imp.get("decision") or {}).get("budget_levels") or ()]
    if not levels:
        return []
    positive = _positive(imp, actions, model)
    ran = set(imp.get("executed") or ())
    out = []
    for c in imp["decision"]["chosen"]:
        tid = c["template_id"]
        if tid not in ran or c.get("level") is None:
            continue
        fetched = int(c.get("budget") or 0)
        ranks = []
        for item, value in positive:
            r = next((int(p["rank"]) for p in item.get("provenance") or ()
                      if p.get("template_id") == tid), None)
            if r is not None:
                ranks.append((r, min(max(value, 0.0), 1.0)))
        for lvl in levels:
            if lvl > fetched:
                continue  # censored: the arm never fetched that deep
            r_l = max((v for r, v in ranks if r <= lvl), default=0.0)
            out.append(LevelReward(tid, lvl, r_l, weight))
    return out


__all__ = ["ACTIONS", "DEFAULT_ACTION_VALUES", "EMPTY_ACTION", "ArmReward", "LevelReward",
           "RewardModel", "executed_arms", "failed_arms", "level_rewards", "outcome_rewards",
           "shapley_credit", "shown_item"]
