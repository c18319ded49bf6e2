"""Off-policy evaluation of arm-subset selectors from logged decisions.

Consumes logged rounds (:class:`LoggedRound`: query type, eligible arms, the subset the
logging policy ran, the propensity of that subset and the observed reward) and a
deterministic target policy ``target(qtype, eligible) -> subset``; produces IPS,
self-normalised IPS and doubly-robust estimates of the target's mean reward.

The action is the *subset* of arms (budgets follow from it: equal split for the uniform
logger and for the fixed plans, so the two action spaces coincide). Subset propensity:

* uniform-random logger: exact, ``1 / (hi - lo + 1) / C(K, |S|)`` (size uniform in
  ``[lo, hi]``, then a uniform subset of that size among the ``K`` eligible arms);
* epsilon-greedy logger: exact (:func:`epsilon_greedy_subset_propensity`);
* Thompson sampling: the decision's logged ``subset_propensity``, the fraction of its
  ``n_resamples + 1`` posterior draws whose subset rule gives exactly the chosen subset
  (Monte Carlo, resolution ``1 / (n_resamples + 1)``; the own draw counts, so it is never 0).
  :func:`independent_subset_propensity` (``prod_{a in S} p_a * prod_{a not in S} (1 - p_a)``
  from the per-arm propensities, clipped to ``[clip, 1 - clip]``) is the older
  approximation; it ignores that the ranked draws make inclusions correlated, and the
  report shows both.

Estimators (``w_i = [a_i = pi(x_i)] / p_i``):
``IPS = mean(w r)``; ``SNIPS = sum(w r) / sum(w)``;
``DR = mean(rhat(x, pi(x)) + w (r - rhat(x, a)))`` with ``rhat`` a ridge regression of the
reward on (query type) x (bias + one indicator per arm in the subset), fitted on the logs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Subset = frozenset[str]
TargetPolicy = Callable[[str, Sequence[str]], Subset]


@dataclass(frozen=True)
class LoggedRound:
    """One logged decision and its outcome."""

    qtype: str
    eligible: tuple[str, ...]
    action: Subset
    propensity: float
    reward: float


def uniform_subset_propensity(n_eligible: int, size: int, *, min_arms: int = 1,
                              max_arms: int = 3) -> float:
    """Exact probability that :class:`~orchestrator.selection.UniformRandomSelector` picks
    one given subset of ``size`` arms out of ``n_eligible``."""
    if n_eligible <= 0:
        return 1.0 if size == 0 else 0.0
    lo, hi = min(min_arms, n_eligible), min(max_arms, n_eligible)
    if not lo <= size <= hi:
        return 0.0
    return 1.0 / (hi - lo + 1) / math.comb(n_eligible, size)


def independent_subset_propensity(propensities: Mapping[str, float], action: Iterable[str], *,
                                  clip: float = 1e-3) -> float:
    """Subset probability from per-arm inclusion propensities, arms taken as independent."""
    chosen = set(action)
    p = 1.0
    for arm, q in propensities.items():
        q = min(max(float(q), clip), 1.0 - clip)
        p *= q if arm in chosen else 1.0 - q
    return p


def epsilon_greedy_subset_propensity(propensities: Mapping[str, float], action: Iterable[str], *,
                                     epsilon: float, min_arms: int = 1, max_arms: int = 3) -> float:
    """Exact subset probability of :class:`~orchestrator.simulation.policies.
    EpsilonGreedySelector` from its logged per-arm propensities: the greedy set is the arms
    whose propensity exceeds the exploration share ``epsilon * E[size] / K``."""
    k = len(propensities)
    chosen = frozenset(action)
    if k == 0:
        return 1.0
    lo, hi = min(min_arms, k), min(max_arms, k)
    p_rand = epsilon * ((lo + hi) / 2.0) / k
    greedy = frozenset(a for a, q in propensities.items() if q > p_rand + 1e-9)
    p = epsilon * uniform_subset_propensity(k, len(chosen), min_arms=min_arms, max_arms=max_arms)
    return p + (1.0 - epsilon) * float(chosen == greedy)


def fixed_target(plan_arms: Iterable[str]) -> TargetPolicy:
    """A fixed plan as a target: its arms that are eligible for the query."""
    arms = frozenset(plan_arms)
    return lambda qtype, eligible: frozenset(a for a in eligible if a in arms)


def per_type_target(plans: Mapping[str, Iterable[str]]) -> TargetPolicy:
    """One fixed plan per query type (the oracle)."""
    sets = {k: frozenset(v) for k, v in plans.items()}
    return lambda qtype, eligible: frozenset(a for a in eligible if a in sets.get(qtype, frozenset()))


class RewardModel:
    """Ridge regression of the reward on (query type) x (bias + arm indicators)."""

    def __init__(self, *, ridge: float = 1.0) -> None:
        self.ridge = ridge
        self.types_: list[str] = []
        self.arms_: list[str] = []
        self.coef_: np.ndarray = np.zeros(0)

    def _row(self, qtype: str, subset: Iterable[str]) -> np.ndarray:
        k = 1 + len(self.arms_)
        x = np.zeros(len(self.types_) * k)
        if qtype in self.types_:
            j = self.types_.index(qtype) * k
            x[j] = 1.0
            s = set(subset)
            for i, a in enumerate(self.arms_):
                if a in s:
                    x[j + 1 + i] = 1.0
        return x

    def fit(self, rounds: Sequence[LoggedRound]) -> RewardModel:
        self.types_ = sorted({r.qtype for r in rounds})
        self.arms_ = sorted({a for r in rounds for a in r.eligible} | {a for r in rounds for a in r.action})
        X = np.asarray([self._row(r.qtype, r.action) for r in rounds])
        y = np.asarray([r.reward for r in rounds])
        d = X.shape[1]
        self.coef_ = np.linalg.solve(X.T @ X + self.ridge * np.eye(d), X.T @ y)
        return self

    def predict(self, qtype: str, subset: Iterable[str]) -> float:
        return float(np.clip(self._row(qtype, subset) @ self.coef_, 0.0, 1.0))


@dataclass(frozen=True)
class Estimate:
    ips: float
    snips: float
    dr: float
    ips_se: float
    dr_se: float
    n: int
    n_matched: int
    ess: float

    def as_dict(self) -> dict[str, float]:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def estimate(rounds: Sequence[LoggedRound], target: TargetPolicy, *,
             model: RewardModel | None = None) -> Estimate:
    """IPS, SNIPS and DR estimates of ``target``'s mean reward from ``rounds``.

    A round where the target runs no arm at all (none of its arms is eligible) has a known
    reward of 0 (nothing is shown): it adds 0 to every estimator and counts with weight 1 in
    the SNIPS normaliser, instead of being estimated."""
    if not rounds:
        raise ValueError("no logged rounds")
    model = model or RewardModel().fit(rounds)
    n = len(rounds)
    w = np.zeros(n)       # importance weights of matched rounds
    norm = np.zeros(n)    # SNIPS normaliser terms (w, or 1 for a known-zero round)
    r = np.asarray([x.reward for x in rounds], dtype=float)
    dr_terms = np.zeros(n)
    for i, x in enumerate(rounds):
        a = target(x.qtype, x.eligible)
        if not a:
            norm[i] = 1.0
            continue
        dr_terms[i] = model.predict(x.qtype, a)
        if a == x.action and x.propensity > 0:
            w[i] = norm[i] = 1.0 / x.propensity
            dr_terms[i] += w[i] * (x.reward - model.predict(x.qtype, x.action))
    ips_terms = w * r
    sw = float(norm.sum())
    wm = w[w > 0]
    return Estimate(
        ips=float(ips_terms.mean()),
        snips=float(ips_terms.sum() / sw) if sw > 0 else float("nan"),
        dr=float(dr_terms.mean()),
        ips_se=float(ips_terms.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        dr_se=float(dr_terms.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        n=n, n_matched=int(len(wm)),
        ess=float(wm.sum() ** 2 / float((wm ** 2).sum())) if len(wm) else 0.0,
    )
