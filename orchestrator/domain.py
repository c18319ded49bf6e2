"""Frozen value objects that cross stage boundaries (arms -> execution -> merge -> response)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class ArmRequest:
    """One arm to run: which template, with which (already validated) parameters."""

    arm: str
    template_id: str
    params: dict[str, Any] = field(hash=False)


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    score: float
    rank: int
    source: dict[str, Any] = field(hash=False, compare=False)


@dataclass(frozen=True, slots=True)
class ArmResult:
    arm: str
    template_id: str
    hits: tuple[Hit, ...]
    took_ms: int

    ok = True


@dataclass(frozen=True, slots=True)
class ArmFailure:
    """An arm that failed inside the shared ``_msearch``: the search goes on without it."""

    arm: str
    template_id: str
    status: int | None
    reason: str

    ok = False


#: Slot categories that query understanding fills and arms consume.
SLOT_CATEGORIES = ("artist", "album", "track", "genre", "mood", "era", "entity_type")
#: Intent labels of the query-understanding text classifier.
INTENTS = ("known_item", "artist", "browse", "topical", "broad")


@dataclass(frozen=True, slots=True)
class Slot:
    """One recognised value in the query: ``category`` (see SLOT_CATEGORIES), the catalog's
    canonical ``value`` (``"Beyoncé"`` for ``"beyonse"``), a confidence in [0, 1], the
    character span in the query and where it came from (``ruler``, ``fuzzy``, ``model``)."""

    category: str
    value: str
    confidence: float
    start: int
    end: int
    source: str = "ruler"


@dataclass(frozen=True, slots=True)
class ParsedQuery:
    """The output of query understanding, consumed by arms (slots) and the bandit (features)."""

    text: str
    normalized: str
    slots: tuple[Slot, ...] = ()
    intent: str = "broad"
    intent_probs: dict[str, float] = field(default_factory=dict, hash=False, compare=False)
    language: str | None = None
    features: dict[str, float] = field(default_factory=dict, hash=False, compare=False)
    #: ``version`` of the QU model that produced this parse (``None``: not from a model).
    model_version: str | None = field(default=None, compare=False)

    def values(self, category: str, *, min_confidence: float = 0.0) -> list[str]:
        """Canonical values of one slot category, best first, deduplicated."""
        seen: dict[str, float] = {}
        for s in self.slots:
            if s.category == category and s.confidence >= min_confidence:
                seen[s.value] = max(seen.get(s.value, 0.0), s.confidence)
        return [v for v, _ in sorted(seen.items(), key=lambda kv: -kv[1])]


# --- Selection, merging, response and feedback (selection.py, merging.py, pipeline.py) ---


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Request-side context for the arm selector. Every field is optional; the pipeline fills
    ``hour`` / ``weekday`` from the clock (UTC) when the caller leaves them out."""

    hour: int | None = None
    weekday: int | None = None
    device: str | None = None
    locale: str | None = None
    user_segment: str | None = None
    user_id: str | None = None
    #: The application's session (e.g. a browser session id): searches of one session form
    #: the query chains the memory learns from (:mod:`orchestrator.chains`); without it the
    #: ``user_id`` stands for the session. Neither is a selection feature.
    session_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__ if getattr(self, k) is not None}  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class ArmChoice:
    """One arm the selector chose: ``template_id`` (the bandit key, e.g. ``lexical.v1``), its
    candidate ``budget``, the Thompson ``sampled`` value and the arm's inclusion propensity."""

    arm: str
    template_id: str
    budget: int
    sampled: float
    propensity: float
    #: Learned budget level (``bandit.budget_mode = "learned"``; None otherwise) and its
    #: probability given that the arm was chosen (see :mod:`orchestrator.budgets`).
    level: int | None = None
    level_propensity: float = 1.0


@dataclass(frozen=True, slots=True)
class SelectionDecision:
    """What the selector decided, with everything off-policy evaluation needs: for every
    eligible arm (keyed by template id) the sampled value, the posterior mean and the
    probability that the policy includes the arm in this context (``propensities``), and the
    probability that it picks exactly the chosen set of arms (``subset_propensity``: exact
    for the uniform and fixed baselines, the fraction of the ``n_resamples + 1`` posterior
    draws that give this subset for Thompson sampling)."""

    policy: str
    choices: tuple[ArmChoice, ...]
    total_budget: int
    sampled: dict[str, float] = field(default_factory=dict, hash=False, compare=False)
    expected: dict[str, float] = field(default_factory=dict, hash=False, compare=False)
    propensities: dict[str, float] = field(default_factory=dict, hash=False, compare=False)
    n_resamples: int = 0
    subset_propensity: float = 1.0
    #: Levels the budget learner chose from (empty: budgets not learned) and the probability
    #: of the chosen levels given the subset (product over the chosen arms).
    budget_levels: tuple[int, ...] = ()
    budget_propensity: float = 1.0

    @property
    def action_propensity(self) -> float:
        """Probability of the whole logged action (subset and budget levels):
        ``subset_propensity * budget_propensity`` (see :mod:`orchestrator.budgets`)."""
        return self.subset_propensity * self.budget_propensity

    @property
    def budgets(self) -> dict[str, int]:
        """``{template id: budget}`` as ``arms.build_requests`` takes it. Keyed by template id,
        not arm name: a name resolves to the newest version, so a plan naming ``lexical.v1``
        would otherwise run ``lexical.v2`` (and v1 would never be rewarded)."""
        return {c.template_id: c.budget for c in self.choices}


@dataclass(frozen=True, slots=True)
class Provenance:
    """Where a merged candidate came from: one arm, its rank and (normalised) score there."""

    arm: str
    template_id: str
    rank: int
    score: float
    norm_score: float


@dataclass(frozen=True, slots=True)
class Candidate:
    """One merged candidate (deduplicated by ``_id``) with its provenance in every arm."""

    id: str
    source: dict[str, Any] = field(hash=False, compare=False)
    provenance: tuple[Provenance, ...] = ()

    @property
    def arms(self) -> tuple[str, ...]:
        return tuple(p.arm for p in self.provenance)


@dataclass(frozen=True, slots=True)
class RankedItem:
    """One result as shown: 1-based display ``rank``, the rescorer's score and provenance."""

    id: str
    rank: int
    score: float
    source: dict[str, Any] = field(hash=False, compare=False)
    provenance: tuple[Provenance, ...] = ()
    features: dict[str, float] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True, slots=True)
class SearchResponse:
    request_id: str
    query: str
    results: tuple[RankedItem, ...]
    decision: SelectionDecision
    failures: tuple[ArmFailure, ...] = ()
    parsed: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    context: RequestContext = RequestContext()
    rescorer: str = "default"
    timings_ms: dict[str, float] = field(default_factory=dict, hash=False, compare=False)
    #: ``{template_id: {"took_ms": ES took, "candidates": hits returned}}`` of the arms that ran.
    arm_stats: dict[str, dict[str, float]] = field(default_factory=dict, hash=False, compare=False)
    #: Signed request token (see :mod:`orchestrator.security`); the HTTP API requires it back
    #: with feedback. None when the orchestrator has no signer.
    token: str | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class FeedbackResult:
    """Outcome of one feedback call. ``duplicate`` is true when the same
    (request, item, action) was already counted; ``rewards`` is ``{template_id: reward}``."""

    request_id: str
    item_id: str
    action: str
    duplicate: bool
    position: int
    weight: float
    rewards: dict[str, float] = field(default_factory=dict, hash=False, compare=False)
    #: The client reached its influence cap: acknowledged and logged, not applied.
    capped: bool = False
