"""The policies compared by the simulator, as selectors for ``Orchestrator.from_settings``.

* ``arm:<id>`` -- one arm alone with the whole budget (:class:`FixedPlanSelector`);
* ``all_arms`` -- every eligible arm with the whole budget *each* (the recall and the cost
  ceiling: the only policy with a larger total budget);
* ``hybrid_rrf`` -- lexical + kNN, half the budget each, ordered by plain reciprocal-rank
  fusion (:func:`rrf_rescorer`), as Elasticsearch users run hybrid search today;
* ``random`` -- :class:`UniformRandomSelector` (1-3 arms, equal budgets);
* ``epsilon_greedy`` -- :class:`EpsilonGreedySelector` (this module);
* ``ours`` -- the default :class:`LinearThompsonSelector` + the default rescorer;
* ``oracle`` -- per query type, the fixed arm subset that was best on a separate
  calibration slice (:func:`best_plans`); used for regret.

Every policy except ``all_arms`` gets the same total candidate budget. Selectors that learn
keep their statistics under their own Redis key prefix (the runner's business).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..bandit_state import BanditStore, StatUpdate
from ..domain import ArmChoice, SelectionDecision
from ..errors import ConfigurationError
from ..rescoring import LinearRescorer
from ..selection import (
    ArmSpec,
    SelectionContext,
    allocate_budgets,
    beta_updates,
    random_subset,
    random_subset_propensities,
)

if TYPE_CHECKING:
    from ..rewards import ArmReward

#: Arms of the static hybrid (template ids).
HYBRID_ARMS: tuple[str, ...] = ("lexical.v2", "semantic.v1")


def rrf_rescorer() -> LinearRescorer:
    """Plain reciprocal-rank fusion (sum of ``1 / (60 + rank)``), no priors, no learning."""
    return LinearRescorer(feature_names=("rrf",), coef=[1.0], name="rrf",
                          metadata={"kind": "rrf"})


def equal_plan(arms: Sequence[str], total: int) -> dict[str, int]:
    """``total`` split evenly over ``arms`` (largest remainder: sums to ``total``)."""
    return dict(zip(arms, allocate_budgets([1.0] * len(arms), total=total, min_budget=0)))


class EpsilonGreedySelector:
    """Epsilon-greedy over arm subsets, per context bucket (``intent|daypart`` by default,
    the featurizer's bucket).

    With probability ``epsilon`` a uniformly random subset (size uniform in
    ``[min_arms, max_arms]``); otherwise the ``n_greedy`` arms with the highest estimated
    mean reward in the bucket. Means are ``(a + k p) / (a + f + k)``: the bucket's weighted
    successes ``a`` and failures ``f`` backed off to the arm's all-context rate ``p`` with
    ``k = backoff`` pseudo-counts (``p`` itself starts at ``prior``). Equal budgets. The
    statistics are Beta-style counts in the :class:`BanditStore` (Redis: shared by replicas),
    updated through ``updates_for`` from the same per-arm rewards every policy gets.

    Propensities (exact): per arm ``epsilon * E[size] / K + (1 - epsilon) * [arm is
    greedy]``; of the chosen subset ``epsilon / (hi - lo + 1) / C(K, |S|) + (1 - epsilon) *
    [S is the greedy set]``.
    """

    name = "epsilon_greedy"

    def __init__(self, store: BanditStore, *, epsilon: float = 0.1, n_greedy: int = 2,
                 min_arms: int = 1, max_arms: int = 3, backoff: float = 2.0, prior: float = 0.5,
                 refresh_interval_s: float = 0.0,
                 random_state: int | np.random.Generator | None = None) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise ConfigurationError(f"epsilon must be in [0, 1], got {epsilon}")
        if not 1 <= min_arms <= max_arms or n_greedy < 1:
            raise ConfigurationError("need 1 <= min_arms <= max_arms and n_greedy >= 1")
        self.store = store
        self.epsilon, self.n_greedy = epsilon, n_greedy
        self.min_arms, self.max_arms = min_arms, max_arms
        self.backoff, self.prior = backoff, prior
        self.refresh_interval_s = refresh_interval_s
        self.rng_ = (random_state if isinstance(random_state, np.random.Generator)
                     else np.random.default_rng(random_state))
        self.stats_: dict[str, Any] = {}
        self._loaded_at = -1e18
        self._lock = threading.Lock()

    def _means(self, bucket: str, arms: Sequence[ArmSpec]) -> np.ndarray:
        now = time.monotonic()
        if (now - self._loaded_at >= self.refresh_interval_s
                or any(a.template_id not in self.stats_ for a in arms)):
            self.stats_ = {**self.stats_, **self.store.load_beta([a.template_id for a in arms])}
            self._loaded_at = now
        out = np.empty(len(arms))
        for k, a in enumerate(arms):
            buckets = self.stats_[a.template_id].buckets
            ga, gf, _ = buckets.get("*", (0.0, 0.0, 0.0))
            p = (ga + self.backoff * self.prior) / (ga + gf + self.backoff)
            ba, bf, _ = buckets.get(bucket, (0.0, 0.0, 0.0))
            out[k] = (max(ba, 0.0) + self.backoff * p) / (max(ba, 0.0) + max(bf, 0.0) + self.backoff)
        return out

    def select(self, context: SelectionContext, arms: Sequence[ArmSpec], *,
               total_budget: int) -> SelectionDecision:
        k = len(arms)
        if k == 0:
            return SelectionDecision(self.name, (), total_budget)
        lo, hi = min(self.min_arms, k), min(self.max_arms, k)
        with self._lock:
            means = self._means(context.bucket, arms)
            # ties broken at random so equal (unseen) arms share the greedy slot
            order = np.lexsort((self.rng_.random(k), -means))
            greedy = sorted(order[: min(self.n_greedy, hi)].tolist())
            explore = bool(self.rng_.random() < self.epsilon)
            picked = random_subset(self.rng_, k, lo, hi) if explore else greedy
        budgets = allocate_budgets([1.0] * len(picked), total=total_budget, min_budget=0)
        p_rand, p_rand_subset = random_subset_propensities(k, lo, hi, len(picked))
        p_subset = self.epsilon * p_rand_subset + (1.0 - self.epsilon) * float(picked == greedy)
        prop = {a.template_id: self.epsilon * p_rand + (1 - self.epsilon) * float(i in greedy)
                for i, a in enumerate(arms)}
        return SelectionDecision(
            self.name,
            tuple(ArmChoice(arms[i].arm, arms[i].template_id, b, float(means[i]),
                            prop[arms[i].template_id]) for i, b in zip(picked, budgets)),
            total_budget,
            sampled={a.template_id: float(i in picked) for i, a in enumerate(arms)},
            expected={a.template_id: float(means[i]) for i, a in enumerate(arms)},
            propensities=prop, subset_propensity=p_subset,
        )

    def updates_for(self, context: SelectionContext,
                    rewards: Sequence[ArmReward]) -> list[StatUpdate]:
        return beta_updates(context, rewards)


@dataclass(frozen=True)
class PolicySpec:
    """How to build one compared policy.

    Attributes
    ----------
    name:
        Report name.
    kind:
        ``fixed`` | ``random`` | ``epsilon_greedy`` | ``ours`` | ``oracle``.
    plan:
        For ``fixed``: ``{template id: budget}``; for ``oracle``: one plan per query type.
    rescorer:
        ``default`` (RRF + priors, the orchestrator's default) or ``rrf`` (plain fusion).
    """

    name: str
    kind: str
    plan: Mapping[str, int] = field(default_factory=dict)
    plans: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    rescorer: str = "default"
    #: Learning parts of an ``ours`` policy (ablations switch one off).
    memory: bool = True
    neighbours: bool = True
    #: Query-chain credit in the memory (``memory.chain_window_s``; False: 0, off).
    chains: bool = True
    #: ``rescorer.intent_split`` of the policy (None: the settings' value).
    intent_split: bool | None = None
    retrain: bool = True
    ranker: bool = True
    budget_mode: str | None = None
    #: ``bandit.budget_cost_per_candidate`` of the policy (None: the settings' value).
    budget_cost: float | None = None
    #: Seeds (selector, request ids) of this policy (default: its own name); ablations
    #: share ``ours``'s.
    seed_as: str | None = None

    @property
    def learns(self) -> bool:
        """An ``ours`` variant: its own memory clone, event log, models and jobs."""
        return self.kind == "ours"

    def max_candidates(self, total_budget: int) -> int:
        """The most candidates one request of this policy can fetch (the union's bound)."""
        if self.kind == "fixed":
            return sum(self.plan.values())
        if self.kind == "oracle":
            return max((sum(p.values()) for p in self.plans.values()), default=total_budget)
        return total_budget


#: Ablations of ``ours`` (same seeds as ``ours``: they differ by the switched-off part only).
ABLATIONS: tuple[PolicySpec, ...] = (
    PolicySpec("ours_no_memory", "ours", memory=False, seed_as="ours"),
    PolicySpec("ours_equal_budgets", "ours", budget_mode="equal", seed_as="ours"),
    PolicySpec("ours_no_rescorer", "ours", ranker=False, seed_as="ours"),
    PolicySpec("ours_no_retrain", "ours", retrain=False, seed_as="ours"),
    PolicySpec("ours_no_neighbours", "ours", neighbours=False, seed_as="ours"),
    PolicySpec("ours_no_chains", "ours", chains=False, seed_as="ours"),
    PolicySpec("ours_no_intent_split", "ours", intent_split=False, seed_as="ours"),
    # Learned budget levels chosen on success alone (no charge per candidate).
    PolicySpec("ours_budget_cost0", "ours", budget_cost=0.0, seed_as="ours"),
)

#: Available by name, not in the default set.
NOT_DEFAULT = frozenset({"all_arms", "ours_no_retrain", "ours_no_neighbours",
                         "ours_no_intent_split", "ours_no_chains", "ours_budget_cost0"})


def is_static(spec: PolicySpec) -> bool:
    """Policies that do not learn (single arms, hybrid_rrf, all_arms, oracle, random)."""
    return spec.kind in ("fixed", "oracle", "random")


def standard_policies(arms: Sequence[str], *, total_budget: int,
                      include: Sequence[str] | None = None) -> list[PolicySpec]:
    """The compared policies (without the oracle) for the arm template ids ``arms``;
    ``include`` keeps only the named ones (``single`` selects every ``arm:*``)."""
    specs = [PolicySpec(f"arm:{a}", "fixed", plan={a: total_budget}) for a in arms]
    specs += [
        PolicySpec("all_arms", "fixed", plan={a: total_budget for a in arms}),
        PolicySpec("hybrid_rrf", "fixed", plan=equal_plan(HYBRID_ARMS, total_budget),
                   rescorer="rrf"),
        PolicySpec("random", "random"),
        PolicySpec("epsilon_greedy", "epsilon_greedy"),
        PolicySpec("ours", "ours"),
        *ABLATIONS,
    ]
    if not include:
        specs = [s for s in specs if s.name not in NOT_DEFAULT]
    if include:
        wanted = set(include)
        specs = [s for s in specs if s.name in wanted or (s.kind == "fixed" and s.name.startswith("arm:")
                                                          and "single" in wanted)]
        unknown = wanted - {s.name for s in specs} - {"single"}
        if unknown:
            raise ConfigurationError(f"unknown policies {sorted(unknown)}")
    return specs


def candidate_subsets(arms: Sequence[str], *, max_arms: int = 3) -> list[tuple[str, ...]]:
    """Every subset of ``arms`` with 1..``max_arms`` members (the oracle's action space)."""
    return [c for n in range(1, max_arms + 1) for c in itertools.combinations(sorted(arms), n)]


def best_plans(scores: Mapping[str, Mapping[tuple[str, ...], float]], *,
               total_budget: int) -> dict[str, dict[str, int]]:
    """Per query type, the subset with the highest mean calibration score (ties: fewer arms,
    then name), as an equal-budget plan."""
    out: dict[str, dict[str, int]] = {}
    for qtype, by_subset in scores.items():
        if not by_subset:
            continue
        best = min(by_subset, key=lambda s: (-by_subset[s], len(s), s))
        out[qtype] = equal_plan(best, total_budget)
    return out
