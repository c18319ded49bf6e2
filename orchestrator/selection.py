"""Choose which arms run for a query and how many candidates each may return.

Consumes a :class:`SelectionContext` (query-understanding features + request context, built by
:class:`ContextFeaturizer`) and the eligible arms (:class:`ArmSpec`: template id + sidecar
``action_features``); produces a :class:`~orchestrator.domain.SelectionDecision` whose
budgets go to ``arms.build_requests``. Learned state lives in a
:class:`~orchestrator.bandit_state.BanditStore` (Redis in production), so every process
shares it.

Policies (all behind :class:`ArmSelector`)
------------------------------------------
``LinearThompsonSelector`` (default, "linear")
    Contextual Thompson sampling with one Bayesian linear regression per arm (LinTS,
    Agrawal & Goyal 2013) over a context vector ``x`` (bias, one slot per closed-vocabulary
    feature, CRC32 feature hashing for open-ended ones; non-bias part L2-normalised). With sufficient statistics ``A_a = sum w x x^T`` and
    ``b_a = sum w r x`` the posterior is ``theta_a ~ N(mu_a, v^2 (lam I + A_a)^-1)`` with
    ``mu_a = (lam I + A_a)^-1 (b_a + lam * prior_a)``.
    *Action features* give the prior: every sidecar ``action_features`` value
    (``source=lexical``, ``fuzzy=true`` ...) has its own pooled regression fitted on the
    rewards of every arm that has that value, and ``prior_a`` is the mean of those pooled
    posterior means (an empirical-Bayes / hierarchical prior). A new arm therefore starts
    from what similar arms learned in this context, and its own data takes over as it
    accumulates (no dilution of arm-specific evidence). Pooled models start at
    ``prior_mean`` on the bias. Sampling is ``N(x.mu_a, v^2 x^T A^-1 x)`` per arm: the
    marginal of the sampled linear score, so no ``d``-dimensional draw is needed.
``BetaThompsonSelector`` ("simple")
    Beta-Bernoulli per (arm, context bucket), bucket = e.g. ``intent|daypart|device``.
    Fractional rewards update ``alpha += w r``, ``beta += w (1 - r)``. Sparse buckets back off
    to the arm's global rate: ``Beta(1 + a_b + k p, 1 + f_b + k (1 - p))`` with ``p`` the
    arm's all-context mean and ``k = backoff`` pseudo-counts; Beta(1, 1) is the base prior
    because Beta is undefined at 0.
``UniformRandomSelector`` / ``FixedPlanSelector``
    Baselines: random subset with equal budgets (exact propensities), or a fixed plan
    (propensity 1).

Subset and budgets (Thompson policies): draw one value per eligible arm; rank the draws;
keep the top ``min_arms`` arms always and further arms up to ``max_arms`` whose draw is at
least ``threshold``. The kept arms' candidate budgets come from
:class:`~orchestrator.budgets.BudgetLearner` (``budget_mode``): learned levels per arm by
default (Thompson sampling over "the chosen item was in this arm's top ``l``"), or the
former split of ``total_budget`` proportional to the draws (``proportional``: floored at
``budget_floor``, after ``min_budget`` each, largest remainder), or an equal split.

The threshold (default :data:`DEFAULT_THRESHOLD`) is on the scale of the rewards of
:mod:`orchestrator.rewards`: every search is an observation, a found item's value is shared
among the arms that held it, and each arm pays its latency, so an arm's posterior mean is its
expected *marginal, net* reward per search (measured on the real catalog after 200 rounds:
0.2-0.55 for the arms that serve an intent, 0-0.1 for arms that rarely contribute). The former 0.3 was
tuned for rewards conditional on a click (means 0.5-0.9) and would keep only ``min_arms``
arms almost always under the new signal. See :data:`DEFAULT_THRESHOLD` for the value chosen
(0.2) and the measurement behind it.

Propensities: the same rule applied to ``n_resamples`` further posterior draws (seeded
``numpy.random.Generator``); an arm's inclusion propensity is the fraction of the
``n_resamples + 1`` draws (the decision's own draw included, so a chosen arm never gets 0)
that include it. The decision also records the propensity of the chosen *subset* (the
fraction of the same ``n_resamples + 1`` draws whose subset is exactly the chosen one): the
draws are ranked, so inclusions are correlated and the product of per-arm propensities is
not the subset's probability. Cost: one ``(n+1) x K`` normal draw and an argsort, ~50 us for
K=5, n=200.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from scipy.linalg import cho_solve, solve_triangular

from .bandit_state import (
    BanditStore,
    BetaStats,
    BetaUpdate,
    LinearStats,
    LinearUpdate,
    StatUpdate,
)
from .budgets import DEFAULT_LEVELS, BudgetLearner, BudgetMode
from .domain import ArmChoice, SelectionDecision
from .errors import ConfigurationError, ServiceUnavailableError

# The featurizer lives in its own module; these names stay importable from here.
from .featurizer import (  # noqa: F401
    RESERVED_FEATURES,
    ContextFeaturizer,
    SelectionContext,
    daypart,
)

if TYPE_CHECKING:
    from .rewards import ArmReward
    from .templates import SearchTemplate

logger = logging.getLogger(__name__)

#: Default ``threshold`` of the subset rule (see the module docstring): an arm beyond the top
#: ``min_arms`` is kept when its draw of the expected net marginal reward per search is at
#: least this. Measured (``ltrr simulate --rounds 200 --seed 1 --policies ours`` on the full
#: catalog, cascade users, then the posterior means per intent): the best arm of an intent
#: has a mean of 0.33-0.54, the second 0.25-0.36, the rest 0.0-0.26 (a failing arm ~0). With
#: 0.1 the run averaged 2.81 arms per request (2.63 in a 400-round run) of ``max_arms`` = 3:
#: the rule was barely active. The former 0.3 sits at the typical *best* arm's mean, so a
#: second arm would run only when its draw beats that. 0.2 keeps a further arm when its
#: sampled marginal contribution is at least ~40-60% of the best arm's and leaves out the
#: long tail (explore / related / memory at 0-0.1 outside the intents they serve). An
#: absolute value (not relative to the best draw) because the rewards are net of costs: an
#: arm whose sampled contribution is small is not worth its share of the budget whatever the
#: others do. This choice follows the measured means; arms per request and success at 0.2
#: were not measured separately.
DEFAULT_THRESHOLD = 0.2


@dataclass(frozen=True, slots=True)
class ArmSpec:
    """An eligible arm as the selector sees it: names plus the sidecar's action features."""

    arm: str
    template_id: str
    action_features: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_template(cls, template: SearchTemplate) -> ArmSpec:
        af = template.meta.get("action_features") or {}
        return cls(template.arm, template.id, _action_items(af))

    @property
    def pooled_components(self) -> tuple[str, ...]:
        return tuple(f"af:{k}={v}" for k, v in self.action_features)

    @property
    def component(self) -> str:
        return f"arm:{self.template_id}"


def _action_items(af: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    def text(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else str(v)

    return tuple(sorted((str(k), text(v)) for k, v in af.items()))


class ArmSelector(Protocol):
    """Extension point: anything that turns a context and eligible arms into a decision."""

    name: str

    def select(self, context: SelectionContext, arms: Sequence[ArmSpec], *,
               total_budget: int) -> SelectionDecision: ...

    def updates_for(self, context: SelectionContext,
                    rewards: Sequence[ArmReward]) -> list[StatUpdate]: ...


def inclusion_mask(samples: np.ndarray, *, min_arms: int, max_arms: int,
                   threshold: float) -> np.ndarray:
    """Rows of draws (R x K) -> which arms each row includes (the subset rule)."""
    r, k = samples.shape
    order = np.argsort(-samples, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(k), (r, k)), axis=1)
    return (ranks < min_arms) | ((ranks < max_arms) & (samples >= threshold))


def allocate_budgets(values: Sequence[float], *, total: int, min_budget: int,
                     floor: float = 0.05) -> list[int]:
    """Split ``total`` over arms: ``min_budget`` each, the rest proportional to ``values``
    (floored at ``floor``), largest-remainder rounding. Sums to ``total`` when
    ``total >= len(values) * min_budget``."""
    n = len(values)
    if n == 0:
        return []
    base = min(min_budget, total // n)
    rest = total - base * n
    w = np.maximum(np.asarray(values, dtype=float), floor)
    share = rest * w / w.sum()
    alloc = np.floor(share).astype(int)
    left = rest - int(alloc.sum())
    if left > 0:
        for i in np.argsort(-(share - alloc), kind="stable")[:left]:
            alloc[i] += 1
    return [base + int(a) for a in alloc]


class _ThompsonBase:
    """Shared subset/budget/propensity logic; subclasses provide the posterior draws."""

    name = "thompson"

    #: ``select`` takes the page ``size`` (learned budgets are scaled up to fill it).
    accepts_size = True

    def __init__(self, store: BanditStore, *, min_arms: int = 1, max_arms: int = 3,
                 threshold: float = DEFAULT_THRESHOLD, min_budget: int = 10,
                 budget_floor: float = 0.05, n_resamples: int = 200,
                 budget_mode: BudgetMode = "learned",
                 budget_levels: Sequence[int] = DEFAULT_LEVELS,
                 budget_cost_per_candidate: float = 0.002,
                 uniform_share: float = 0.0,
                 random_state: int | np.random.Generator | None = None) -> None:
        if not 1 <= min_arms <= max_arms:
            raise ConfigurationError(f"need 1 <= min_arms <= max_arms, got {min_arms}, {max_arms}")
        if not 0.0 <= uniform_share <= 1.0:
            raise ConfigurationError(f"uniform_share must be in [0, 1], got {uniform_share}")
        self.store = store
        #: Share of decisions whose arm subset is drawn uniformly (as UniformRandomSelector)
        #: instead of by Thompson sampling: support for off-policy evaluation of plans the
        #: posterior rarely picks. Logged propensities are the mixture's.
        self.uniform_share = float(uniform_share)
        self.min_arms = min_arms
        self.max_arms = max_arms
        self.threshold = threshold
        self.min_budget = min_budget
        self.budget_floor = budget_floor
        self.n_resamples = n_resamples
        self.budget_mode = budget_mode
        self.budget_levels = tuple(int(x) for x in budget_levels)
        self.budget_cost_per_candidate = budget_cost_per_candidate
        self.random_state = random_state
        self.rng_ = (random_state if isinstance(random_state, np.random.Generator)
                     else np.random.default_rng(random_state))
        self._lock = threading.Lock()
        self.budgets_ = BudgetLearner(store, mode=budget_mode, levels=self.budget_levels,
                                      cost_per_candidate=budget_cost_per_candidate,
                                      refresh_interval_s=1.0)

    def get_params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("min_arms", "max_arms", "threshold", "min_budget",
                                              "budget_floor", "n_resamples", "budget_mode",
                                              "budget_levels", "budget_cost_per_candidate",
                                              "uniform_share", "random_state")}

    def _draws(self, context: SelectionContext, arms: Sequence[ArmSpec],
               n_rows: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def expectations(self, context: SelectionContext, arms: Sequence[ArmSpec]) -> dict[str, float]:
        """Posterior mean reward of each arm in this context (``{template_id: mean}``)."""
        with self._lock:
            mean, _ = self._draws(context, arms, 0)
        return {a.template_id: float(m) for a, m in zip(arms, mean)}

    def select(self, context: SelectionContext, arms: Sequence[ArmSpec], *,
               total_budget: int, size: int | None = None) -> SelectionDecision:
        if not arms:
            return SelectionDecision(self.name, (), total_budget)
        with self._lock:
            mean, draws = self._draws(context, arms, self.n_resamples + 1)
        mask = inclusion_mask(draws, min_arms=self.min_arms, max_arms=self.max_arms,
                              threshold=self.threshold)
        prop = mask.mean(axis=0)
        target = mask[0]
        eps = self.uniform_share
        if eps > 0.0:
            k = len(arms)
            lo, hi = min(self.min_arms, k), min(self.max_arms, k)
            with self._lock:
                explore = bool(self.rng_.random() < eps)
                if explore:
                    target = np.zeros(k, dtype=bool)
                    target[random_subset(self.rng_, k, lo, hi)] = True
        # Joint propensity of the chosen subset (Monte Carlo over the same draws; with a
        # uniform share, the mixture of that and the uniform draw's exact probability).
        # Budgets are positive for every kept arm whenever total_budget >= number kept.
        p_subset = float((mask == target).all(axis=1).mean())
        if eps > 0.0:
            p_arm, p_uniform = random_subset_propensities(k, lo, hi, int(target.sum()))
            p_subset = (1.0 - eps) * p_subset + eps * p_uniform
            prop = (1.0 - eps) * prop + eps * p_arm
        first = draws[0]
        chosen = [i for i in np.argsort(-first, kind="stable") if target[i]]
        with self._lock:
            plan = self.budgets_.plan(
                context, [arms[i].template_id for i in chosen],
                values=[float(first[i]) for i in chosen], total_budget=total_budget, size=size,
                min_budget=self.min_budget, floor=self.budget_floor, rng=self.rng_,
                n_resamples=self.n_resamples)
        levels = plan.levels or (None,) * len(chosen)
        lprops = plan.level_propensities or (1.0,) * len(chosen)
        choices = tuple(
            ArmChoice(arms[i].arm, arms[i].template_id, b, float(first[i]), float(prop[i]),
                      lvl, lp)
            for i, b, lvl, lp in zip(chosen, plan.budgets, levels, lprops) if b > 0
        )
        return SelectionDecision(
            self.name, choices, total_budget,
            sampled={a.template_id: float(first[i]) for i, a in enumerate(arms)},
            expected={a.template_id: float(mean[i]) for i, a in enumerate(arms)},
            propensities={a.template_id: float(prop[i]) for i, a in enumerate(arms)},
            n_resamples=self.n_resamples, subset_propensity=p_subset,
            budget_levels=self.budget_levels if plan.levels is not None else (),
            budget_propensity=plan.propensity,
        )

    def partial_fit(self, context: SelectionContext, rewards: Sequence[ArmReward]) -> None:
        """Add observations (sklearn-style incremental fit; the state is the store's)."""
        self.store.apply(self.updates_for(context, rewards))

    def updates_for(self, context: SelectionContext,
                    rewards: Sequence[ArmReward]) -> list[StatUpdate]:  # pragma: no cover
        raise NotImplementedError


def _cholesky(m: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of the symmetric ``m = lam I + A``. ``A`` is a sum of
    ``w x x^T`` with ``w > 0`` and ``lam > 0``, so ``m`` is positive definite; should rounding
    in the store ever make it numerically indefinite, its eigenvalues are first raised to at
    least 1e-10 of the largest one (the nearest definite matrix, up to that floor) rather than
    failing the search."""
    try:
        return np.linalg.cholesky(m)
    except np.linalg.LinAlgError:
        vals, vecs = np.linalg.eigh((m + m.T) / 2)
        floor = max(float(np.max(np.abs(vals))) * 1e-10, 1e-300)
        return np.linalg.cholesky((vecs * np.maximum(vals, floor)) @ vecs.T)


@dataclass(slots=True)
class _Posterior:
    """``N(mu, scale M^-1)`` with ``M = lam I + A``, kept as the lower Cholesky factor ``L``
    of ``M`` (``M = L L^T``): a draw needs ``x^T M^-1 x = ||L^-1 x||^2`` for the request's
    sparse context only, one triangular solve, never the d x d inverse (factoring is about 8x
    cheaper than inverting at d = 119, and a refresh factors every changed component)."""

    mu: np.ndarray
    chol: np.ndarray  # L, lower triangular
    scale: float  # v^2
    n: float

    @property
    def cov(self) -> np.ndarray:
        """``v^2 (lam I + A)^-1`` in full (inspection and tests; draws never form it)."""
        return self.scale * cho_solve((self.chol, True), np.eye(len(self.mu)), check_finite=False)

    def variance(self, indices: np.ndarray, values: np.ndarray) -> float:
        """``x^T cov x`` for the sparse ``x`` with ``values`` at ``indices`` (repeats add up)."""
        z = np.zeros(len(self.mu))
        np.add.at(z, indices, values)
        v = solve_triangular(self.chol, z, lower=True, check_finite=False)
        return self.scale * float(v @ v)


class LinearThompsonSelector(_ThompsonBase):
    """Contextual Thompson sampling, Bayesian linear regression per arm with a pooled
    action-feature prior (see the module docstring).

    Parameters
    ----------
    store:
        Sufficient statistics (``RedisBanditStore`` / ``InMemoryBanditStore``); its ``dim``
        must equal the featurizer's ``hash_dim + 1``.
    exploration:
        ``v``: posterior scale (larger explores more).
    ridge:
        ``lam``: prior precision (pseudo-observations).
    prior_mean:
        Prior expected reward of the pooled models (bias coefficient), so unseen arms are
        tried while ``prior_mean >= threshold``.
    refresh_interval_s:
        Posteriors are cached per process and reloaded when the store's version changed, at
        most this often, in a background thread; ``0`` reloads synchronously on every select
        (tests, exact multi-process consistency).
    min_arms, max_arms, threshold, min_budget, budget_floor, n_resamples, random_state:
        See :class:`_ThompsonBase` / the module docstring.

    Attributes
    ----------
    posteriors_:
        ``{component: _Posterior}`` currently cached.
    state_version_:
        Store version the cache reflects.
    """

    name = "linear_thompson"

    def __init__(self, store: BanditStore, *, exploration: float = 0.5, ridge: float = 1.0,
                 prior_mean: float = 0.5, refresh_interval_s: float = 1.0, **kwargs: Any) -> None:
        super().__init__(store, **kwargs)
        self.exploration = exploration
        self.ridge = ridge
        self.prior_mean = prior_mean
        self.refresh_interval_s = refresh_interval_s
        self.budgets_.refresh_interval_s = float(refresh_interval_s)
        self.posteriors_: dict[str, _Posterior] = {}
        self.state_version_ = -1
        self._loaded_at = 0.0
        self._refreshing = False
        #: component -> (its revision, its statistics) as last loaded; valid while the
        #: store's generation is ``_gen`` (see :meth:`refresh`)
        self._stats_cache: dict[str, tuple[int, LinearStats]] = {}
        self._gen: str | None = None
        #: component -> (the bytes of the ``A`` it factors, the Cholesky factor of lam I + A)
        self._factor_cache: dict[str, tuple[bytes, np.ndarray]] = {}

    def get_params(self) -> dict[str, Any]:
        return {**super().get_params(), "exploration": self.exploration, "ridge": self.ridge,
                "prior_mean": self.prior_mean, "refresh_interval_s": self.refresh_interval_s}

    # -- posterior cache -------------------------------------------------------------------
    def _components(self, arms: Sequence[ArmSpec]) -> list[str]:
        comps: dict[str, None] = {}
        for a in arms:
            comps.update(dict.fromkeys(a.pooled_components))
            comps[a.component] = None
        return list(comps)

    def _compute(self, stats: Mapping[str, Any], arms: Sequence[ArmSpec]) -> dict[str, _Posterior]:
        d = self.store.dim
        out: dict[str, _Posterior] = {}
        pooled_prior = np.zeros(d)
        pooled_prior[0] = self.prior_mean
        # Pooled (action-feature) components first: their means are the arms' priors.
        for comp, st in stats.items():
            if comp.startswith("af:"):
                out[comp] = self._posterior(comp, st, pooled_prior)
        for a in arms:
            pooled = [out[c].mu for c in a.pooled_components if c in out]
            prior = np.mean(pooled, axis=0) if pooled else pooled_prior
            out[a.component] = self._posterior(a.component, stats[a.component], prior)
        return out

    def _posterior(self, comp: str, st: Any, prior: np.ndarray) -> _Posterior:
        """``N(mu, v^2 (lam I + A)^-1)`` with ``mu = (lam I + A)^-1 (b + lam prior)``. The
        Cholesky factor of ``lam I + A`` (the cost of a refresh) is cached per component while
        its ``A`` is unchanged: a refresh reloads every arm's statistics, but one search
        changes only the arms it ran (a pooled prior that moved only changes ``mu``, two
        triangular solves). Exactly the same numbers either way."""
        A = np.ascontiguousarray(st.A, dtype=float)
        key = A.tobytes()
        hit = self._factor_cache.get(comp)
        if hit is not None and hit[0] == key:
            chol = hit[1]
        else:
            chol = _cholesky(self.ridge * np.eye(self.store.dim) + A)
            self._factor_cache[comp] = (key, chol)
        mu = cho_solve((chol, True), st.b + self.ridge * prior, check_finite=False)
        return _Posterior(mu, chol, self.exploration ** 2, st.n)

    def refresh(self, arms: Sequence[ArmSpec]) -> None:
        """Reload statistics for ``arms`` from the store and recompute their posteriors.

        Only the components whose revision changed are read (one search changes the few arms
        it ran; a rebuild or migration changes the generation, and everything is read). The
        revisions are read before the statistics, so a write in between makes the cache
        older than its revision, never newer: the next refresh reads that component again."""
        version = self.store.version()
        comps = self._components(arms)
        gen, revs = self.store.revisions(comps)
        if gen != self._gen:
            self._stats_cache.clear()
            self._gen = gen
        changed = [(c, r) for c, r in zip(comps, revs)
                   if self._stats_cache.get(c, (None,))[0] != r]
        if changed:
            loaded = self.store.load_linear([c for c, _ in changed])
            self._stats_cache.update((c, (r, loaded[c])) for c, r in changed)
        stats = {c: self._stats_cache[c][1] for c in comps}
        posts = self._compute(stats, arms)
        self.posteriors_ = {**self.posteriors_, **posts}
        self.state_version_ = version
        self._loaded_at = time.monotonic()
        self._arms_cached = list(arms)

    def _background_refresh(self, arms: Sequence[ArmSpec]) -> None:
        try:
            if self.store.version() != self.state_version_:
                self.refresh(arms)
            else:
                self._loaded_at = time.monotonic()
        except ServiceUnavailableError as exc:  # Redis down or hung: expected, one line
            logger.warning("bandit posterior refresh failed, keeping the cached ones: %s", exc)
        except Exception:  # a failed refresh keeps the old posteriors; the next one retries
            logger.warning("bandit posterior refresh failed", exc_info=True)
        finally:
            self._refreshing = False

    def _ensure(self, arms: Sequence[ArmSpec]) -> None:
        missing = any(a.component not in self.posteriors_ for a in arms)
        if missing or self.refresh_interval_s <= 0:
            try:
                self.refresh(arms)
            except ServiceUnavailableError as exc:
                # The store is down: serve from the posteriors held in memory (priors for arms
                # never loaded); the version stays stale so the next select reloads.
                logger.warning("bandit state unavailable, selecting from cached posteriors: %s", exc)
                if missing:
                    empty = {c: LinearStats.empty(self.store.dim) for c in self._components(arms)}
                    fresh = self._compute(empty, arms)
                    self.posteriors_ = {**fresh, **self.posteriors_}
            return
        if time.monotonic() - self._loaded_at >= self.refresh_interval_s and not self._refreshing:
            self._refreshing = True
            threading.Thread(target=self._background_refresh, args=(list(arms),),
                             daemon=True, name="bandit-refresh").start()

    def _draws(self, context: SelectionContext, arms: Sequence[ArmSpec],
               n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        self._ensure(arms)
        idx = np.asarray(context.indices, dtype=np.intp)
        x = np.asarray(context.values)
        mean = np.empty(len(arms))
        sd = np.empty(len(arms))
        for k, a in enumerate(arms):
            p = self.posteriors_[a.component]
            mean[k] = p.mu[idx] @ x
            sd[k] = math.sqrt(max(p.variance(idx, x), 0.0))
        draws = mean + self.rng_.standard_normal((n_rows, len(arms))) * sd
        return mean, draws

    def updates_for(self, context: SelectionContext,
                    rewards: Sequence[ArmReward]) -> list[StatUpdate]:
        """Linear observations of ``rewards`` for the arm's own component and each pooled
        action-feature component, grouped per (component, template id) for the
        one-observation max rule (an ``af:`` model gets one observation per arm it pools)."""
        out: list[StatUpdate] = []
        for r in rewards:
            spec = ArmSpec(r.arm, r.template_id, tuple(tuple(x) for x in r.action_features))  # type: ignore[misc]
            for comp in (spec.component, *spec.pooled_components):
                out.append(LinearUpdate(comp, context.indices, context.values, r.reward, r.weight,
                                        group=f"lin|{comp}|{r.template_id}"))
        return out

    def summary(self, arms: Sequence[ArmSpec]) -> dict[str, dict[str, float]]:
        """Per arm: observations and the posterior mean of the bias (overall reward level)."""
        with self._lock:
            self._ensure(arms)
            return {a.template_id: {"observations": self.posteriors_[a.component].n,
                                    "mean_reward": float(self.posteriors_[a.component].mu[0])}
                    for a in arms}


def beta_updates(context: SelectionContext, rewards: Sequence[ArmReward]) -> list[StatUpdate]:
    """Beta-Bernoulli observations of ``rewards`` (clipped to [0, 1]): one for the context
    bucket, one for the arm's all-context row ``"*"`` (the back-off prior)."""
    out: list[StatUpdate] = []
    for r in rewards:
        rr = min(max(r.reward, 0.0), 1.0)
        out.append(BetaUpdate(r.template_id, context.bucket, rr, r.weight,
                              group=f"beta|{r.template_id}|{context.bucket}"))
        out.append(BetaUpdate(r.template_id, "*", rr, r.weight, group=f"beta|{r.template_id}|*"))
    return out


class BetaThompsonSelector(_ThompsonBase):
    """Beta-Bernoulli Thompson sampling per (arm, context bucket), backing off to the arm's
    global rate for sparse buckets (see the module docstring)."""

    name = "beta_thompson"

    def __init__(self, store: BanditStore, *, backoff: float = 2.0,
                 refresh_interval_s: float = 1.0, **kwargs: Any) -> None:
        super().__init__(store, **kwargs)
        self.backoff = backoff
        self.refresh_interval_s = refresh_interval_s
        self.budgets_.refresh_interval_s = float(refresh_interval_s)
        self.stats_: dict[str, Any] = {}
        self._loaded_at = 0.0

    def _ensure(self, arms: Sequence[ArmSpec]) -> None:
        stale = time.monotonic() - self._loaded_at >= self.refresh_interval_s
        if stale or any(a.template_id not in self.stats_ for a in arms):
            try:
                self.stats_ = {**self.stats_, **self.store.load_beta([a.template_id for a in arms])}
                self._loaded_at = time.monotonic()
            except ServiceUnavailableError as exc:  # keep what we have; priors for the rest
                logger.warning("bandit state unavailable, selecting from cached statistics: %s", exc)
                self.stats_ = {**{a.template_id: BetaStats() for a in arms}, **self.stats_}
                self._loaded_at = time.monotonic()  # retry after the interval, not every select

    def _params(self, context: SelectionContext, arms: Sequence[ArmSpec]) -> tuple[np.ndarray, np.ndarray]:
        self._ensure(arms)
        alpha = np.empty(len(arms))
        beta = np.empty(len(arms))
        for k, a in enumerate(arms):
            buckets = self.stats_[a.template_id].buckets
            ga, gf, _ = buckets.get("*", (0.0, 0.0, 0.0))
            p = (ga + 1.0) / (ga + gf + 2.0)
            ba, bf, _ = buckets.get(context.bucket, (0.0, 0.0, 0.0))
            alpha[k] = 1.0 + max(ba, 0.0) + self.backoff * p
            beta[k] = 1.0 + max(bf, 0.0) + self.backoff * (1.0 - p)
        return alpha, beta

    def _draws(self, context: SelectionContext, arms: Sequence[ArmSpec],
               n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        alpha, beta = self._params(context, arms)
        draws = self.rng_.beta(alpha, beta, size=(n_rows, len(arms)))
        return alpha / (alpha + beta), draws

    def updates_for(self, context: SelectionContext,
                    rewards: Sequence[ArmReward]) -> list[StatUpdate]:
        return beta_updates(context, rewards)


def random_subset(rng: np.random.Generator, k: int, lo: int, hi: int) -> list[int]:
    """A uniformly random size in ``[lo, hi]``, then a uniformly random subset of that size
    of ``range(k)``, sorted (the uniform baseline, and epsilon-greedy's exploration)."""
    size = int(rng.integers(lo, hi + 1))
    return sorted(rng.choice(k, size=size, replace=False).tolist())


def random_subset_propensities(k: int, lo: int, hi: int, size: int) -> tuple[float, float]:
    """Exact propensities of :func:`random_subset`: each arm's inclusion probability
    ``E[size] / k``, and the probability of one particular subset of ``size`` arms."""
    return ((lo + hi) / 2.0) / k, 1.0 / (hi - lo + 1) / math.comb(k, size)


class UniformRandomSelector:
    """Baseline: a uniformly random subset size in ``[min_arms, max_arms]``, then a uniformly
    random subset of that size, equal budgets. Propensities are exact: ``E[size] / K`` per
    arm, ``1 / (hi - lo + 1) / C(K, size)`` for the chosen subset."""

    name = "uniform_random"

    def __init__(self, *, min_arms: int = 1, max_arms: int = 3,
                 random_state: int | np.random.Generator | None = None) -> None:
        self.min_arms, self.max_arms, self.random_state = min_arms, max_arms, random_state
        self.rng_ = (random_state if isinstance(random_state, np.random.Generator)
                     else np.random.default_rng(random_state))
        self._lock = threading.Lock()

    def select(self, context: SelectionContext, arms: Sequence[ArmSpec], *,
               total_budget: int) -> SelectionDecision:
        k = len(arms)
        if k == 0:
            return SelectionDecision(self.name, (), total_budget)
        lo, hi = min(self.min_arms, k), min(self.max_arms, k)
        with self._lock:
            picked = random_subset(self.rng_, k, lo, hi)
        size = len(picked)
        budgets = allocate_budgets([1.0] * size, total=total_budget, min_budget=0)
        p, p_subset = random_subset_propensities(k, lo, hi, size)
        return SelectionDecision(
            self.name,
            tuple(ArmChoice(arms[i].arm, arms[i].template_id, b, 1.0, p) for i, b in zip(picked, budgets)),
            total_budget,
            sampled={a.template_id: float(i in picked) for i, a in enumerate(arms)},
            propensities={a.template_id: p for a in arms},
            subset_propensity=p_subset,
        )

    def updates_for(self, context: SelectionContext, rewards: Sequence[ArmReward]) -> list[StatUpdate]:
        return []


class FixedPlanSelector:
    """Baseline: always the same arms with fixed budgets (``{arm or template id: budget}``);
    arms of the plan that are not eligible for a query are dropped."""

    name = "fixed_plan"

    def __init__(self, plan: Mapping[str, int]) -> None:
        self.plan = dict(plan)

    def select(self, context: SelectionContext, arms: Sequence[ArmSpec], *,
               total_budget: int) -> SelectionDecision:
        choices = []
        for a in arms:
            b = self.plan.get(a.template_id, self.plan.get(a.arm))
            if b:
                choices.append(ArmChoice(a.arm, a.template_id, int(b), 1.0, 1.0))
        return SelectionDecision(
            self.name, tuple(choices), sum(c.budget for c in choices),
            sampled={a.template_id: 1.0 for a in arms},
            propensities={a.template_id: float(any(c.template_id == a.template_id for c in choices))
                          for a in arms},
        )

    def updates_for(self, context: SelectionContext, rewards: Sequence[ArmReward]) -> list[StatUpdate]:
        return []


def make_selector(policy: str, store: BanditStore, **params: Any) -> ArmSelector:
    """Build a selector by policy name: ``linear`` | ``simple`` (Beta) | ``uniform`` | ``fixed``
    (``plan=`` required). Unknown parameters for the chosen policy raise."""
    if policy == "linear":
        return LinearThompsonSelector(store, **params)
    if policy == "simple":
        return BetaThompsonSelector(store, **params)
    if policy == "uniform":
        return UniformRandomSelector(**params)
    if policy == "fixed":
        return FixedPlanSelector(**params)
    raise ConfigurationError(f"unknown selection policy {policy!r}; use one of "
                             f"['linear', 'simple', 'uniform', 'fixed']")
