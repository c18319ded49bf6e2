"""How many candidates each chosen arm may return: learned budget levels and their propensities.

Consumes the arms the Thompson selectors of :mod:`orchestrator.selection` chose for a request,
its :class:`~orchestrator.selection.SelectionContext` and the request's total budget; produces
per arm a candidate budget, its budget *level* and the level's propensity, which the decision
logs (``level``, ``level_propensity`` per choice; ``budget_propensity`` and
``action_propensity`` for the request). Learns from :class:`~orchestrator.rewards.LevelReward` s
(:func:`level_updates`), stored as Beta statistics in the bandit store under the pseudo
template id ``budget:<template_id>`` (``P bandit:beta:budget:<template_id>``, buckets
``l<level>|intent=<label>`` plus the back-off row ``l<level>|*``).

Modes (``bandit.budget_mode``)
------------------------------
``learned`` (default)
    Each chosen arm picks a level from ``budget_levels`` (default 10, 20, 40) by Thompson
    sampling. For each level ``l`` the statistic is "the chosen item was in this arm's top
    ``l``", valued by the position-corrected action value clipped to [0, 1] (one observation
    per search, the search's best outcome, as for the arms: see :mod:`orchestrator.rewards`).
    A draw ``p_l ~ Beta`` per level (context bucket = intent, backed off to the arm's
    all-intent rate with ``backoff`` pseudo-counts) is made monotone in the level (cumulative
    max: a deeper list holds everything a shallower one does, so its success rate cannot be
    lower), and the arm takes ``argmax_l p_l - budget_cost_per_candidate * l``.
``proportional``
    The former rule: the total split over the kept arms proportionally to their sampled arm
    values, after ``min_budget`` each.
``equal``
    The total split equally (an ablation).

Learned levels are scaled down proportionally when they sum above the request's total budget
and up when they sum below the page ``size``; the decision logs each arm's level *and* the
budget it actually ran with.

Counterfactual updates. An arm that ran with budget ``b`` (its level, or the rescaled budget)
returns its top ``b`` hits, so for every level ``l <= b`` it is known whether the chosen item
would have been in its top ``l``: the shown item's provenance gives the arm's rank ``r`` of
it, and level ``l`` succeeds iff ``r <= l``. Levels above ``b`` are censored (no update). So
one search updates several levels, and shallow levels learn from every deep run.

Propensity derivation. Given the chosen subset ``S``, the levels are drawn from the budget
posteriors independently of the arm draws that chose ``S`` (and of each other), so the
probability of the logged action (subset, levels) factorizes exactly::

    P(S, l_1..l_|S|) = P(S) * prod_{a in S} P(l_a | a)

``P(S)`` is the decision's ``subset_propensity``; ``P(l_a | a)`` is estimated with the same
resampling as the inclusion propensities: the level rule is applied to ``n_resamples``
further posterior draws and ``P(l_a | a)`` is the fraction of the ``n_resamples + 1`` draws
(the decision's own included, so it is never 0) that pick the logged level.
``budget_propensity = prod_a P(l_a | a)`` and ``action_propensity = subset_propensity *
budget_propensity``. Rescaling is a deterministic function of the levels and the request, so
it does not change the propensity. The ``proportional`` and ``equal`` modes are deterministic
given the subset (``budget_propensity = 1``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .bandit_state import BanditStore, BetaStats, BetaUpdate
from .errors import ConfigurationError, ServiceUnavailableError

if TYPE_CHECKING:
    from .rewards import LevelReward
    from .selection import SelectionContext

logger = logging.getLogger(__name__)

BudgetMode = Literal["learned", "proportional", "equal"]
BUDGET_MODES: tuple[str, ...] = ("learned", "proportional", "equal")
DEFAULT_LEVELS: tuple[int, ...] = (10, 20, 40)
#: Pseudo template id prefix of the budget statistics in the bandit store.
BUDGET_PREFIX = "budget:"


def budget_key(template_id: str) -> str:
    """The bandit-store id of an arm's budget statistics."""
    return BUDGET_PREFIX + template_id


def budget_bucket(context: SelectionContext) -> str:
    """The budget statistics' context bucket: ``intent=<label>`` (the most probable intent of
    the context features), ``intent=-`` without one."""
    best, p = "-", 0.0
    for name, v in context.features.items():
        if name.startswith("intent=") and float(v) > p:
            best, p = name[len("intent="):], float(v)
    if best == "-":
        for part in context.bucket.split("|"):
            if part.startswith("intent="):
                best = part[len("intent="):]
    return f"intent={best}"


def level_updates(context: SelectionContext, rewards: Sequence[LevelReward]) -> list[BetaUpdate]:
    """Beta observations of budget-level rewards (clipped to [0, 1]): one for the intent
    bucket, one for the all-intent row, each grouped for the one-observation max rule."""
    bucket = budget_bucket(context)
    out: list[BetaUpdate] = []
    for r in rewards:
        rr = min(max(float(r.reward), 0.0), 1.0)
        key = budget_key(r.template_id)
        for b in (f"l{r.level}|{bucket}", f"l{r.level}|*"):
            out.append(BetaUpdate(key, b, rr, r.weight, group=f"beta|{key}|{b}"))
    return out


def rescale(values: Sequence[int], target: int) -> list[int]:
    """``values`` scaled proportionally so they sum to ``target`` (largest remainder; every
    entry stays >= 1 when ``target >= len(values)``)."""
    n = len(values)
    if n == 0:
        return []
    v = np.maximum(np.asarray(values, dtype=float), 1e-9)
    share = target * v / v.sum()
    out = np.floor(share).astype(int)
    left = target - int(out.sum())
    for i in np.argsort(-(share - out), kind="stable")[:max(left, 0)]:
        out[i] += 1
    if target >= n:  # no arm is left with nothing
        for i in range(n):
            if out[i] < 1:
                j = int(np.argmax(out))
                out[j] -= 1
                out[i] += 1
    return [int(x) for x in out]


@dataclass(frozen=True, slots=True)
class BudgetPlan:
    """Budgets of the chosen arms (in their order), with the learned levels and propensities
    (``levels`` is None outside ``learned`` mode)."""

    budgets: tuple[int, ...]
    levels: tuple[int, ...] | None
    level_propensities: tuple[float, ...]

    @property
    def propensity(self) -> float:
        return float(np.prod(self.level_propensities)) if self.level_propensities else 1.0


class BudgetLearner:
    """Per-arm candidate budgets for the Thompson selectors (see the module docstring).

    Parameters
    ----------
    store:
        The bandit store (budget statistics live beside the arms').
    mode:
        ``learned`` | ``proportional`` | ``equal``.
    levels:
        Candidate levels an arm may pick (increasing).
    cost_per_candidate:
        Penalty per candidate in the level rule (``p_l - cost * l``).
    backoff:
        Pseudo-counts of the all-intent rate in the intent bucket's Beta prior.
    refresh_interval_s:
        Statistics are cached per process and reloaded at most this often (0: every select).
    """

    def __init__(self, store: BanditStore, *, mode: BudgetMode = "learned",
                 levels: Sequence[int] = DEFAULT_LEVELS, cost_per_candidate: float = 0.002,
                 backoff: float = 2.0, refresh_interval_s: float = 1.0) -> None:
        if mode not in BUDGET_MODES:
            raise ConfigurationError(f"unknown budget_mode {mode!r}; use one of {list(BUDGET_MODES)}")
        lv = tuple(int(x) for x in levels)
        if not lv or any(x < 1 for x in lv) or list(lv) != sorted(set(lv)):
            raise ConfigurationError(f"budget_levels must be increasing positive integers, got {levels!r}")
        self.store = store
        self.mode = mode
        self.levels = lv
        self.cost_per_candidate = float(cost_per_candidate)
        self.backoff = float(backoff)
        self.refresh_interval_s = float(refresh_interval_s)
        self.stats_: dict[str, BetaStats] = {}
        self._loaded_at = -1e18

    def get_params(self) -> dict[str, Any]:
        return {"budget_mode": self.mode, "budget_levels": self.levels,
                "budget_cost_per_candidate": self.cost_per_candidate}

    def _ensure(self, template_ids: Sequence[str]) -> None:
        keys = [budget_key(t) for t in template_ids]
        stale = time.monotonic() - self._loaded_at >= self.refresh_interval_s
        if stale or any(k not in self.stats_ for k in keys):
            try:
                self.stats_ = {**self.stats_, **self.store.load_beta(keys)}
            except ServiceUnavailableError as exc:  # keep what we have; priors for the rest
                logger.warning("budget statistics unavailable, using cached ones: %s", exc)
                self.stats_ = {**{k: BetaStats() for k in keys}, **self.stats_}
            self._loaded_at = time.monotonic()

    def params(self, context: SelectionContext,
               template_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Beta parameters ``(alpha, beta)``, shape ``(arms, levels)``."""
        self._ensure(template_ids)
        bucket = budget_bucket(context)
        alpha = np.empty((len(template_ids), len(self.levels)))
        beta = np.empty_like(alpha)
        for i, t in enumerate(template_ids):
            cells = self.stats_.get(budget_key(t), BetaStats()).buckets
            for j, lvl in enumerate(self.levels):
                ga, gf, _ = cells.get(f"l{lvl}|*", (0.0, 0.0, 0.0))
                p = (max(ga, 0.0) + 1.0) / (max(ga, 0.0) + max(gf, 0.0) + 2.0)
                ba, bf, _ = cells.get(f"l{lvl}|{bucket}", (0.0, 0.0, 0.0))
                alpha[i, j] = 1.0 + max(ba, 0.0) + self.backoff * p
                beta[i, j] = 1.0 + max(bf, 0.0) + self.backoff * (1.0 - p)
        return alpha, beta

    def choose_levels(self, rng: np.random.Generator, alpha: np.ndarray, beta: np.ndarray,
                      n_rows: int) -> np.ndarray:
        """Level index per row and arm, shape ``(n_rows, arms)``: row 0 is the decision, the
        others the propensity resamples."""
        p = rng.beta(alpha, beta, size=(n_rows, *alpha.shape))
        p = np.maximum.accumulate(p, axis=2)  # monotone in the level
        score = p - self.cost_per_candidate * np.asarray(self.levels, dtype=float)
        return np.argmax(score, axis=2)

    def plan(self, context: SelectionContext, template_ids: Sequence[str], *,
             values: Sequence[float], total_budget: int, size: int | None,
             min_budget: int, floor: float, rng: np.random.Generator,
             n_resamples: int) -> BudgetPlan:
        """Budgets of the chosen arms ``template_ids`` (their sampled arm ``values`` are used
        by the ``proportional`` mode)."""
        from .selection import allocate_budgets

        n = len(template_ids)
        if n == 0:
            return BudgetPlan((), None, ())
        if self.mode == "proportional":
            return BudgetPlan(tuple(allocate_budgets(values, total=total_budget,
                                                     min_budget=min_budget, floor=floor)), None, ())
        if self.mode == "equal":
            return BudgetPlan(tuple(allocate_budgets([1.0] * n, total=total_budget,
                                                     min_budget=0)), None, ())
        alpha, beta = self.params(context, template_ids)
        idx = self.choose_levels(rng, alpha, beta, n_resamples + 1)
        chosen = idx[0]
        props = tuple(float((idx[:, i] == chosen[i]).mean()) for i in range(n))
        levels = [self.levels[int(j)] for j in chosen]
        budgets = list(levels)
        if sum(budgets) > total_budget:
            budgets = rescale(budgets, total_budget)
        floor_total = min(size or 0, total_budget)
        if sum(budgets) < floor_total:
            budgets = rescale(budgets, floor_total)
        return BudgetPlan(tuple(budgets), tuple(levels), props)

    def level_propensities(self, context: SelectionContext, template_ids: Sequence[str], *,
                           rng: np.random.Generator, n_draws: int = 2000) -> dict[str, dict[int, float]]:
        """``{template_id: {level: P(level)}}`` by Monte Carlo (inspection and tests)."""
        alpha, beta = self.params(context, template_ids)
        idx = self.choose_levels(rng, alpha, beta, n_draws)
        return {t: {lvl: float((idx[:, i] == j).mean()) for j, lvl in enumerate(self.levels)}
                for i, t in enumerate(template_ids)}

    def summary(self, template_ids: Sequence[str]) -> dict[str, Mapping[str, float]]:
        """Per arm the all-intent success rate of each level (for ``/arms``-style views)."""
        self._ensure(template_ids)
        out: dict[str, Mapping[str, float]] = {}
        for t in template_ids:
            cells = self.stats_.get(budget_key(t), BetaStats()).buckets
            out[t] = {f"l{lvl}": (cells.get(f"l{lvl}|*", [0.0, 0.0, 0.0])[0] + 1.0)
                      / (sum(cells.get(f"l{lvl}|*", [0.0, 0.0, 0.0])[:2]) + 2.0)
                      for lvl in self.levels}
        return out


__all__ = ["BUDGET_MODES", "DEFAULT_LEVELS", "BudgetLearner", "BudgetPlan", "budget_bucket",
           "budget_key", "level_updates", "rescale"]
