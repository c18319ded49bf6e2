"""The orchestrator: query -> understanding -> arm selection -> one _msearch -> merge ->
rescore -> response (+ impression), and feedback -> rewards -> shared posteriors.

Consumes a query string and optional request context; produces a :class:`SearchResponse`
(request id, ranked results with provenance, explanation) and logs the impression to Redis.
``feedback`` joins an action to that impression and updates the bandit atomically.

Entry points for applications and the CLI::

    orch = Orchestrator.from_settings(OrchestratorSettings(), es=my_client)  # es/redis optional
    resp = orch.search("bohemian rhapsody", context={"device": "mobile"}, size=10)
    orch.feedback(resp.request_id, resp.results[0].id, "play")
    orch.explain(resp.request_id)
    response_to_dict(resp)          # JSON-able (HTTP / ``ltrr search --json``)
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import numbers
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import redis as redis_lib
from elasticsearch import Elasticsearch

from .arms import applicable, build_requests, validate_query
from .bandit_state import RedisBanditStore, StatUpdate, update_to_dict
from .budgets import level_updates
from .chains import QueryChains, session_of
from .domain import (
    ArmFailure,
    ArmRequest,
    ArmResult,
    FeedbackResult,
    ParsedQuery,
    RankedItem,
    RequestContext,
    SearchResponse,
    SelectionDecision,
)
from .errors import (
    InvalidFeedbackError,
    OrchestratorError,
    QueryValidationError,
    ServiceUnavailableError,
    UnknownRequestError,
)
from .examination import ExaminationModel, apply_swap, swap_intervention
from .execution import MultiSearch
from .featurizer import logged_context
from .feedback import FeedbackLog
from .log import set_request_id
from .memory import MemoryKeys
from .merging import Merger, UnionMerger
from .rescoring import (
    FeatureExtractor,
    LinearRescorer,
    Rescorer,
    current_version,
    load_latest,
    load_version,
)
from .resilience import (
    CircuitBreaker,
    DurableRedisWriter,
    FallbackCache,
    RecentImpressions,
    Spool,
    redis_appliers,
    spool_key,
)
from .rewards import (
    EMPTY_ACTION,
    ArmReward,
    RewardModel,
    executed_arms,
    level_rewards,
    outcome_rewards,
    shown_item,
)
from .security import InfluenceCap, RequestSigner
from .selection import (
    DEFAULT_THRESHOLD,
    ArmSelector,
    ArmSpec,
    ContextFeaturizer,
    LinearThompsonSelector,
    SelectionContext,
    make_selector,
)
from .templates import TemplateRegistry
from .text import normalize_query

logger = logging.getLogger(__name__)

#: Defaults of the settings this module reads (``settings.bandit`` / ``settings.feedback`` /
#: ``settings.rescorer`` when the settings object has them; keyword overrides otherwise).
BANDIT_DEFAULTS: dict[str, Any] = {
    "policy": "linear", "total_budget": 60, "min_arms": 1, "max_arms": 3, "threshold": DEFAULT_THRESHOLD,
    "min_budget": 10, "n_resamples": 200, "hash_dim": 64, "exploration": 0.5, "ridge": 1.0,
    "prior_mean": 0.5, "refresh_interval_s": 1.0, "seed": None,
    "bucket_keys": ("intent", "daypart"), "budget_mode": "learned", "budget_levels": (10, 20, 40),
    "budget_cost_per_candidate": 0.002, "uniform_share": 0.0,
}
FEEDBACK_DEFAULTS: dict[str, Any] = {
    "impression_ttl_s": 7 * 24 * 3600, "stream_maxlen": 200_000, "position_bias": "log2",
    "max_weight": 3.0,
}
#: ``settings.reward`` (see :class:`orchestrator.settings.RewardSettings`, :mod:`orchestrator.rewards`).
REWARD_DEFAULTS: dict[str, Any] = {
    "latency_cost_per_ms": 0.0002, "failure_reward": 0.0, "max_reward": 3.0, "credit": "shapley",
}
#: ``reload_interval_s``: how often (at most) a running orchestrator checks ``model_dir`` for a
#: newly promoted model (one small file read; see :func:`orchestrator.rescoring.current_version`).
RESCORER_DEFAULTS: dict[str, Any] = {"model_dir": None, "reload_interval_s": 30.0,
                                      "intent_split": True}
#: ``settings.resilience`` (see :class:`orchestrator.settings.ResilienceSettings` and
#: :mod:`orchestrator.resilience`).
RESILIENCE_DEFAULTS: dict[str, Any] = {
    "es_search_timeout_s": 5.0, "es_search_retries": 1, "arm_timeout": "500ms",
    "es_failure_threshold": 3, "es_reset_timeout_s": 5.0, "fallback_cache_size": 0,
    "fallback_max_age_s": 600.0, "spool_dir": None, "redis_retry_s": 1.0,
    "impression_cache_size": 5000,
}
#: Largest candidate budget a caller may ask for (the settings' ``bandit.total_budget`` bound).
MAX_TOTAL_BUDGET = 1000


class Understander(Protocol):
    def parse(self, text: str) -> ParsedQuery: ...


def _slice(settings: Any, name: str, defaults: Mapping[str, Any],
           overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    out = dict(defaults)
    part = getattr(settings, name, None)
    if part is not None:
        data = part.model_dump() if hasattr(part, "model_dump") else dict(part)
        out.update({k: v for k, v in data.items() if k in defaults})
    if overrides:
        unknown = sorted(set(overrides) - set(defaults))
        if unknown:
            raise OrchestratorError(f"unknown {name} option(s) {unknown}; known: {sorted(defaults)}")
        out.update(overrides)
    return out


def _default_understander(model_dir: Any = None) -> Understander | None:
    try:
        from .understanding import ReloadingUnderstander, get_understander

        get_understander(model_dir)  # load now: a missing model is reported at start-up
        # Always the newest promoted model: a retrained QU is picked up without a restart.
        return ReloadingUnderstander(model_dir)
    except (ImportError, OrchestratorError, OSError) as exc:
        logger.warning("query understanding unavailable (%s); searching without QU", exc)
        return None


def _duration_ms(value: str | float | int) -> float:
    """An Elasticsearch time value (``"500ms"``, ``"2s"``, ``"1m"``; a number is ms) in ms."""
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip().lower()
    for unit, factor in (("ms", 1.0), ("micros", 1e-3), ("nanos", 1e-6), ("s", 1000.0),
                         ("m", 60_000.0), ("h", 3_600_000.0), ("d", 86_400_000.0)):
        if text.endswith(unit):
            try:
                return float(text[: -len(unit)]) * factor
            except ValueError:
                break
    try:
        return float(text)
    except ValueError:
        raise OrchestratorError(f"cannot read the time value {value!r} (e.g. '500ms', '2s')") from None


def _rescorer_label(rescorer: Any) -> str:
    """Name (plus ``.v<N>`` for a promoted model) logged with every response, so an impression
    records exactly which model ranked it."""
    name = getattr(rescorer, "name", type(rescorer).__name__)
    version = getattr(rescorer, "metadata", {}).get("version")
    return f"{name}.v{version}" if version else name


#: Context fields: integer ones and text ones (with their length limits).
_CONTEXT_INTS = ("hour", "weekday")
_CONTEXT_TEXT = {"device": 32, "locale": 16, "user_segment": 64, "user_id": 128,
                 "session_id": 128}


def check_text(value: Any, name: str, *, max_chars: int | None = None,
               error: type[Exception] = QueryValidationError) -> str:
    """``value`` as text, or ``error`` saying why not: not a string, too long, or not valid
    Unicode (a lone surrogate cannot be sent to Elasticsearch or Redis)."""
    if not isinstance(value, str):
        raise error(f"{name} must be a string, got {type(value).__name__}")
    if max_chars is not None and len(value) > max_chars:
        raise error(f"{name} is {len(value)} characters; the limit is {max_chars}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{name} is not valid Unicode text (lone surrogate)") from None
    return value


def _coerce_context(context: RequestContext | Mapping[str, Any] | None,
                    now: _dt.datetime | None = None) -> RequestContext:
    if isinstance(context, RequestContext):
        ctx = context
    else:
        if context is not None and not isinstance(context, Mapping):
            raise QueryValidationError(
                f"context must be a mapping of fields, got {type(context).__name__}")
        data = dict(context or {})
        known = {"hour", "weekday", "device", "locale", "user_segment", "user_id", "session_id"}
        unknown = sorted(set(data) - known, key=repr)
        if unknown:
            raise QueryValidationError(f"unknown context field(s) {unknown}; known: {sorted(known)}")
        ctx = RequestContext(**data)
    for name in _CONTEXT_INTS:
        v = getattr(ctx, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
            raise QueryValidationError(f"context.{name} must be an integer, got {type(v).__name__}")
    for name, limit in _CONTEXT_TEXT.items():
        if getattr(ctx, name) is not None:
            check_text(getattr(ctx, name), f"context.{name}", max_chars=limit)
    if ctx.hour is not None and not 0 <= ctx.hour < 24:
        raise QueryValidationError(f"context.hour must be in [0, 23], got {ctx.hour}")
    if ctx.weekday is not None and not 0 <= ctx.weekday < 7:
        raise QueryValidationError(f"context.weekday must be in [0, 6] (Monday=0), got {ctx.weekday}")
    if ctx.hour is None or ctx.weekday is None:
        now = now or _dt.datetime.now(_dt.timezone.utc)
        ctx = dataclasses.replace(ctx, hour=ctx.hour if ctx.hour is not None else now.hour,
                                  weekday=ctx.weekday if ctx.weekday is not None else now.weekday())
    return ctx


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


def parsed_summary(parsed: ParsedQuery | None) -> dict[str, Any]:
    if parsed is None:
        return {}
    return {"intent": parsed.intent, "language": parsed.language, "normalized": parsed.normalized,
            "slots": [{"category": s.category, "value": s.value, "confidence": round(s.confidence, 3)}
                      for s in parsed.slots]}


def _provenance(item: RankedItem) -> list[dict[str, Any]]:
    return [{"arm": p.arm, "template_id": p.template_id, "rank": p.rank,
             "score": round(p.score, 5), "norm_score": round(p.norm_score, 4)} for p in item.provenance]


def _uuid4_str() -> str:
    return str(uuid.uuid4())


def decision_to_dict(decision: SelectionDecision) -> dict[str, Any]:
    return {
        "policy": decision.policy, "total_budget": decision.total_budget,
        "n_resamples": decision.n_resamples,
        "chosen": [{"arm": c.arm, "template_id": c.template_id, "budget": c.budget,
                    "sampled": round(c.sampled, 5), "propensity": round(c.propensity, 5),
                    "level": c.level, "level_propensity": round(c.level_propensity, 5)}
                   for c in decision.choices],
        "sampled": {k: round(v, 5) for k, v in decision.sampled.items()},
        "expected": {k: round(v, 5) for k, v in decision.expected.items()},
        "propensities": {k: round(v, 5) for k, v in decision.propensities.items()},
        "subset_propensity": round(decision.subset_propensity, 5),
        "budget_levels": list(decision.budget_levels),
        "budget_propensity": round(decision.budget_propensity, 5),
        "action_propensity": round(decision.action_propensity, 5),
    }


def response_to_dict(resp: SearchResponse, *, include_source: bool = True) -> dict[str, Any]:
    """JSON-able form of a response (HTTP body, ``ltrr search --json``)."""
    results = []
    for it in resp.results:
        src = it.source
        row: dict[str, Any] = {
            "id": it.id, "rank": it.rank, "score": round(it.score, 6),
            "entity_type": src.get("entity_type"), "title": src.get("title"),
            "artist": src.get("artist"), "provenance": _provenance(it),
        }
        if include_source:
            row["source"] = src
        results.append(row)
    return {
        "request_id": resp.request_id,
        "query": resp.query,
        "results": results,
        "explanation": {
            **decision_to_dict(resp.decision),
            "failures": [{"arm": f.arm, "template_id": f.template_id, "status": f.status,
                          "reason": f.reason} for f in resp.failures],
            "parsed": resp.parsed,
            "context": resp.context.to_dict(),
            "rescorer": resp.rescorer,
            "timings_ms": resp.timings_ms,
        },
    }


class Orchestrator:
    """Wires the stages. Build it with :meth:`from_settings`; every collaborator can also be
    injected (tests pass fakes for the understander, an in-memory store ...).

    Parameters
    ----------
    es, redis:
        Clients (the application's own Elasticsearch client is fine).
    registry:
        Arm templates.
    multisearch:
        Executes the chosen arms in one ``_msearch``.
    featurizer, selector:
        Context features and the arm-selection policy.
    store, log:
        Bandit statistics and the impression/event log (Redis).
    rescorer:
        Final ordering (default: RRF plus priors).
    understander:
        ``parse(text) -> ParsedQuery``, or None (no QU; arms requiring slots are skipped).
    learner:
        Which model feedback updates (default: the selector; set a Thompson selector here
        when serving with a baseline, to learn off-policy from its logs).
    encoder_factory:
        Returns an object with ``encode(list[str])``; called on first use of an arm that
        needs ``query_vector``.
    total_budget, max_results, max_query_chars:
        Candidate budget over all arms; limits.
    rescorer_dir, rescorer_reload_s:
        When set, the folder of promoted rescorer models: at most every ``rescorer_reload_s``
        seconds a search checks its ``current`` pointer and switches to a newly promoted
        version (no restart). ``from_settings`` sets it when the rescorer came from
        ``rescorer.model_dir``; an injected rescorer is never replaced.
    writer:
        Routes Redis writes (impressions, feedback) to Redis, or to a durable local spool
        while Redis is unreachable, replayed later (None: straight to Redis, errors raise).
    fallback:
        Last good responses, served marked degraded while Elasticsearch is unavailable.
    recent:
        Impressions served recently, so feedback can be joined while Redis is unreachable.
    request_id_factory:
        Returns the id of each new request (default: a random UUID4). The id also seeds the
        explore arm, so a seeded factory makes runs reproducible (the simulator passes one).
    arm_timeout_ms:
        The per-arm time-out (``resilience.arm_timeout``): the latency charged to an arm that
        timed out (see :mod:`orchestrator.rewards`).
    """

    def __init__(self, *, es: Elasticsearch, redis: redis_lib.Redis, registry: TemplateRegistry,
                 multisearch: MultiSearch, featurizer: ContextFeaturizer, selector: ArmSelector,
                 store: RedisBanditStore, log: FeedbackLog, rescorer: Rescorer | None = None,
                 merger: Merger | None = None, understander: Understander | None = None,
                 learner: ArmSelector | None = None, reward_model: RewardModel | None = None,
                 encoder_factory: Callable[[], Any] | None = None, total_budget: int = 60,
                 max_results: int = 200, max_query_chars: int = 256, es_url: str = "",
                 redis_url: str = "", rescorer_dir: Path | None = None,
                 rescorer_reload_s: float = 30.0, signer: RequestSigner | None = None,
                 influence: InfluenceCap | None = None, writer: DurableRedisWriter | None = None,
                 fallback: FallbackCache | None = None,
                 recent: RecentImpressions | None = None,
                 request_id_factory: Callable[[], str] | None = None,
                 arm_timeout_ms: float = 500.0,
                 memory_keys: MemoryKeys | None = None, swap_rate: float = 0.0,
                 swap_max_position: int = 20,
                 examination_refresh_s: float | None = None,
                 intent_split: bool = True, chains: QueryChains | None = None) -> None:
        self.es = es
        self.redis = redis
        self.registry = registry
        self.multisearch = multisearch
        self.featurizer = featurizer
        self.selector = selector
        self.learner = learner or selector
        self.store = store
        self.log = log
        self.rescorer = rescorer or LinearRescorer.default()
        self.rescorer_dir = Path(rescorer_dir) if rescorer_dir is not None else None
        self.rescorer_reload_s = rescorer_reload_s
        # Request tokens (see orchestrator.security); the default signer shares its secret
        # with every replica through Redis.
        self.signer = signer if signer is not None else RequestSigner(
            redis, prefix=store.prefix, url=redis_url)
        self.influence = influence
        self._rescorer_checked = time.monotonic()
        self.merger = merger or UnionMerger()
        self.understander = understander
        self.reward_model = reward_model or RewardModel()
        self.encoder_factory = encoder_factory
        self._encoder: Any = None
        self.total_budget = total_budget
        self.max_results = max_results
        self.max_query_chars = max_query_chars
        self.es_url = es_url
        self.redis_url = redis_url
        self.extractor = FeatureExtractor([t.arm for t in registry], intent_split=intent_split)
        self._specs = {t.id: ArmSpec.from_template(t) for t in registry}
        self.writer = writer
        self.fallback = fallback
        self.recent = recent
        self.request_id_factory = request_id_factory or _uuid4_str
        # Request-time "does the memory know this query" feature (None: not consulted).
        self.memory_keys = memory_keys
        # Per-session recent searches: feedback credits abandoned earlier queries (None: off).
        self.chains = chains
        # Randomised swap interventions that the examination model is estimated from
        # (orchestrator.examination): rate and the deepest display position swapped to.
        self.swap_rate = swap_rate
        self.swap_max_position = swap_max_position
        # None: the reward model's examination model as given; else the one estimated into
        # Redis (ExaminationModel.load, cached per process for this many seconds).
        self.examination_refresh_s = examination_refresh_s
        self.arm_timeout_ms = float(arm_timeout_ms)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: Any, *, es: Elasticsearch | None = None,
                      redis: redis_lib.Redis | None = None,
                      understander: Understander | None | str = "auto",
                      registry: TemplateRegistry | None = None, selector: ArmSelector | None = None,
                      rescorer: Rescorer | None = None, encoder_factory: Callable[[], Any] | None = None,
                      bandit: Mapping[str, Any] | None = None,
                      feedback: Mapping[str, Any] | None = None,
                      rescoring: Mapping[str, Any] | None = None,
                      resilience: Mapping[str, Any] | None = None,
                      reward: Mapping[str, Any] | None = None,
                      check_services: bool = True,
                      request_id_factory: Callable[[], str] | None = None) -> Orchestrator:
        """Build from :class:`OrchestratorSettings` (``es``, ``redis``, ``templates``, ``limits``
        slices; ``bandit`` / ``feedback`` / ``rescorer`` slices when present, else the
        ``*_DEFAULTS`` of this module, each overridable by the keyword dicts).

        Raises
        ------
        ServiceUnavailableError
            Elasticsearch or Redis is down (``check_services``).
        """
        from .es_client import build_client, node_capabilities
        from .es_client import check_available as es_check
        from .redis_client import build_redis
        from .redis_client import check_available as redis_check

        b = _slice(settings, "bandit", BANDIT_DEFAULTS, bandit)
        f = _slice(settings, "feedback", FEEDBACK_DEFAULTS, feedback)
        r = _slice(settings, "rescorer", RESCORER_DEFAULTS, rescoring)
        res = _slice(settings, "resilience", RESILIENCE_DEFAULTS, resilience)
        ex = getattr(settings, "examination", None)
        rw = _slice(settings, "reward", REWARD_DEFAULTS, reward)
        es = es if es is not None else build_client(settings.es)
        redis = redis if redis is not None else build_redis(settings.redis)
        if check_services:
            es_check(es, settings.es.url)
            redis_check(redis, settings.redis.url)
        registry = registry or TemplateRegistry.from_dir(settings.templates.dir)
        mode = settings.templates.mode
        if mode == "auto":
            mode = "stored" if node_capabilities(es).stored_templates else "local"
        from .memory import memory_alias

        mem = getattr(settings, "memory", None)
        ms = MultiSearch(es, index=settings.es.catalog_alias, registry=registry, mode=mode,
                         indices={"memory": memory_alias(settings.es.catalog_alias,
                                                         getattr(mem, "alias", None))},
                         max_param_bytes=settings.limits.max_param_bytes,
                         arm_timeout=res["arm_timeout"], request_timeout_s=res["es_search_timeout_s"],
                         max_retries=res["es_search_retries"],
                         breaker=CircuitBreaker("Elasticsearch",
                                                failure_threshold=res["es_failure_threshold"],
                                                reset_timeout_s=res["es_reset_timeout_s"]))
        featurizer = ContextFeaturizer(hash_dim=b["hash_dim"], bucket_keys=b["bucket_keys"])
        # One Redis breaker per process: the durable writer's, which the request path's reads
        # (statistics, memory keys) also consult, so a hung Redis costs a search one time-out.
        redis_breaker = CircuitBreaker("Redis", failure_threshold=1,
                                       reset_timeout_s=res["redis_retry_s"])
        # The QU model is hot-reloaded: the store asks for its version when it compares.
        store = RedisBanditStore(redis, prefix=settings.redis.key_prefix, dim=featurizer.dim,
                                 stream_maxlen=f["stream_maxlen"], url=settings.redis.url,
                                 featurizer_version=featurizer.version,
                                 qu_version=lambda: getattr(understander, "version", None),
                                 breaker=redis_breaker)
        learner = None
        if selector is None:
            common = {k: b[k] for k in ("min_arms", "max_arms", "threshold", "min_budget",
                                        "n_resamples", "budget_mode", "budget_levels",
                                        "budget_cost_per_candidate", "uniform_share")}
            if b["policy"] == "linear":
                selector = LinearThompsonSelector(
                    store, exploration=b["exploration"], ridge=b["ridge"], prior_mean=b["prior_mean"],
                    refresh_interval_s=b["refresh_interval_s"], random_state=b["seed"], **common)
            elif b["policy"] == "simple":
                selector = make_selector("simple", store, refresh_interval_s=b["refresh_interval_s"],
                                         random_state=b["seed"], **common)
            else:
                selector = make_selector(b["policy"], store, **(
                    {"min_arms": b["min_arms"], "max_arms": b["max_arms"], "random_state": b["seed"]}
                    if b["policy"] == "uniform" else {}))
        if not isinstance(selector, (LinearThompsonSelector,)) and not hasattr(selector, "store"):
            learner = LinearThompsonSelector(store, exploration=b["exploration"], ridge=b["ridge"],
                                             prior_mean=b["prior_mean"],
                                             refresh_interval_s=b["refresh_interval_s"])
        rescorer_dir = None
        if rescorer is None:
            model_dir = r["model_dir"]
            rescorer_dir = Path(model_dir) if model_dir else None
            rescorer = load_latest(rescorer_dir)
        if understander == "auto":
            qu = getattr(settings, "qu", None)
            understander = _default_understander(getattr(qu, "model_dir", None))
        store.check_schema()  # after the understander: it records / compares the QU version
        if encoder_factory is None:
            def encoder_factory() -> Any:
                from .embeddings import get_encoder

                return get_encoder(settings.embedding)
        log = FeedbackLog(redis, store=store, impression_ttl_s=f["impression_ttl_s"],
                          stream_maxlen=f["stream_maxlen"])
        spool_dir = res["spool_dir"]
        if spool_dir is None:
            from .settings import ResilienceSettings

            spool_dir = ResilienceSettings().spool_dir
        writer = DurableRedisWriter(
            Spool(Path(spool_dir), key=spool_key(settings.redis.url, settings.redis.key_prefix)),
            redis_appliers(store, log),
            breaker=redis_breaker,
            replay_interval_s=res["redis_retry_s"])
        return cls(
            es=es, redis=redis, registry=registry, multisearch=ms, featurizer=featurizer,
            selector=selector, store=store, log=log,
            rescorer=rescorer, understander=understander,  # type: ignore[arg-type]
            learner=learner,
            reward_model=RewardModel(position_bias=f["position_bias"], **rw),
            arm_timeout_ms=_duration_ms(res["arm_timeout"]),
            encoder_factory=encoder_factory, total_budget=b["total_budget"],
            max_results=settings.limits.max_results, max_query_chars=settings.limits.max_query_chars,
            es_url=settings.es.url, redis_url=settings.redis.url,
            rescorer_dir=rescorer_dir, rescorer_reload_s=r["reload_interval_s"],
            signer=RequestSigner.from_settings(getattr(settings, "security", None), redis,
                                               prefix=settings.redis.key_prefix, url=settings.redis.url),
            influence=InfluenceCap.from_settings(getattr(settings, "security", None), redis,
                                                 prefix=settings.redis.key_prefix, url=settings.redis.url),
            writer=writer, recent=RecentImpressions(res["impression_cache_size"]),
            fallback=(FallbackCache(res["fallback_cache_size"], max_age_s=res["fallback_max_age_s"])
                      if res["fallback_cache_size"] > 0 else None),
            request_id_factory=request_id_factory,
            memory_keys=MemoryKeys(redis, prefix=settings.redis.key_prefix, breaker=redis_breaker),
            chains=(QueryChains(redis, prefix=settings.redis.key_prefix,
                                window_s=mem.chain_window_s, max_searches=mem.chain_max_searches,
                                breaker=redis_breaker)
                    if getattr(mem, "chain_window_s", 0) > 0 else None),
            swap_rate=ex.swap_rate if ex is not None else 0.0,
            swap_max_position=ex.max_position if ex is not None else 20,
            examination_refresh_s=ex.refresh_interval_s if ex is not None else None,
            intent_split=bool(r["intent_split"]),
        )

    # -- rescorer hot reload -----------------------------------------------------------------
    @property
    def rescorer_version(self) -> int:
        """Version of the rescorer in use (0: the default model)."""
        return int(getattr(self.rescorer, "metadata", {}).get("version", 0) or 0)

    def reload_rescorer(self, *, force: bool = False) -> bool:
        """Switch to the promoted model of ``rescorer_dir`` if it changed; checked at most every
        ``rescorer_reload_s`` seconds unless ``force``. A model that fails to load is logged
        and the current one kept. Returns True when the model was replaced."""
        if self.rescorer_dir is None:
            return False
        now = time.monotonic()
        if not force and now - self._rescorer_checked < self.rescorer_reload_s:
            return False
        self._rescorer_checked = now
        try:
            version = current_version(self.rescorer_dir)
            if version == self.rescorer_version:
                return False
            model = load_version(self.rescorer_dir, version)
        except (OSError, ValueError, KeyError, OrchestratorError) as exc:
            logger.warning("rescorer reload from %s failed, keeping v%s: %s", self.rescorer_dir,
                           self.rescorer_version, exc)
            return False
        logger.info("rescorer v%s -> v%s (%s)", self.rescorer_version, version, model.name)
        self.rescorer = model
        return True

    def _rewards(self) -> RewardModel:
        """The reward model, with the examination model estimated into Redis when
        ``examination_refresh_s`` is set (cached per process; the prior until one exists)."""
        if self.examination_refresh_s is None:
            return self.reward_model
        model = ExaminationModel.load(self.redis, prefix=self.store.prefix,
                                      refresh_interval_s=self.examination_refresh_s,
                                      default=self.reward_model.examination)
        if model is self.reward_model.examination:
            return self.reward_model
        return dataclasses.replace(self.reward_model, examination=model)

    # -- search --------------------------------------------------------------------------------
    def eligible_arms(self, parsed: ParsedQuery | None) -> list[ArmSpec]:
        return [self._specs[t.id] for t in self.registry if applicable(t, parsed)]

    def _requests(self, parsed: ParsedQuery | None, query: str, budgets: dict[str, int],
                  vector: list[float] | None, request_id: str) -> list[ArmRequest]:
        # The explore arm's random draw is seeded from the request id, so the list a user
        # saw can be replayed from the impression alone.
        seed = zlib.crc32(request_id.encode()) & 0x7FFFFFFF
        return build_requests(self.registry, parsed, query, budgets=budgets, vector=vector,
                              seed=seed, max_query_chars=self.max_query_chars)

    def _vector(self, query: str, arms: Sequence[str]) -> list[float] | None:
        needs = any(any(p.name == "query_vector" for p in self.registry.get(a).params) for a in arms)
        if not needs or self.encoder_factory is None:
            return None
        if self._encoder is None:
            self._encoder = self.encoder_factory()
        return [float(v) for v in self._encoder.encode([query])[0]]

    def search(self, query: str, *, context: RequestContext | Mapping[str, Any] | None = None,
               size: int = 10, total_budget: int | None = None,
               client_id: str | None = None) -> SearchResponse:
        """Run the whole pipeline for ``query``. The response carries a signed ``token``
        bound to its request id and ``client_id`` (None: an in-process caller), which the
        HTTP API requires back with feedback (see :mod:`orchestrator.security`).

        Raises
        ------
        QueryValidationError
            Empty, oversized or malformed query, bad ``size`` or context.
        ServiceUnavailableError
            Elasticsearch or Redis is down.
        """
        t0 = time.perf_counter()
        q = check_text(validate_query(query, max_chars=self.max_query_chars), "query")
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= self.max_results:
            raise QueryValidationError(f"size must be in [1, {self.max_results}], got {size!r}")
        if total_budget is not None and (
                isinstance(total_budget, bool) or not isinstance(total_budget, numbers.Integral)
                or not 1 <= total_budget <= MAX_TOTAL_BUDGET):
            raise QueryValidationError(
                f"total_budget must be an integer in [1, {MAX_TOTAL_BUDGET}], got {total_budget!r}")
        budget = max(total_budget or self.total_budget, size)
        ctx = _coerce_context(context)
        rid = str(self.request_id_factory())
        set_request_id(rid)  # every log record of this search carries it
        timings: dict[str, float] = {}

        t = time.perf_counter()
        parsed = self.understander.parse(q) if self.understander is not None else None
        timings["qu"] = time.perf_counter() - t

        t = time.perf_counter()
        memory_pairs = (self.memory_keys.known_pairs(normalize_query(q))
                        if self.memory_keys is not None else None)
        sel_ctx = self.featurizer.transform(parsed, ctx, q, memory_pairs=memory_pairs)
        eligible = self.eligible_arms(parsed)
        decision = self.selector.select(
            sel_ctx, eligible, total_budget=budget,
            **({"size": size} if getattr(self.selector, "accepts_size", False) else {}))
        timings["select"] = time.perf_counter() - t

        t = time.perf_counter()
        vector = self._vector(q, [c.template_id for c in decision.choices])
        timings["encode"] = time.perf_counter() - t

        t = time.perf_counter()
        requests = self._requests(parsed, q, decision.budgets, vector, rid)
        timings["build"] = time.perf_counter() - t

        t = time.perf_counter()
        try:
            results = self.multisearch.execute(requests, opaque_id=rid) if requests else []
        except ServiceUnavailableError as exc:
            stale = self._serve_fallback(q, size, rid, ctx, sel_ctx, exc, client_id)
            if stale is None:
                raise
            return stale
        timings["es"] = time.perf_counter() - t

        t = time.perf_counter()
        candidates = self.merger.merge(results)
        timings["merge"] = time.perf_counter() - t

        t = time.perf_counter()
        self.reload_rescorer()
        rescorer = self.rescorer
        ranked = rescorer.rank(candidates, query=q, parsed=parsed, extractor=self.extractor)[:size]  # type: ignore[call-arg]
        # The swap intervention (orchestrator.examination): positions 1 and k trade places,
        # and the impression logs ``swap``; ranks below are display positions.
        swap = swap_intervention(len(ranked), rate=self.swap_rate, seed=rid,
                                 max_position=self.swap_max_position)
        ranked = apply_swap(ranked, swap)
        items = tuple(RankedItem(c.id, pos, s, c.source, c.provenance,
                                 dict(zip(self.extractor.names, x.tolist())))
                      for pos, (c, s, x) in enumerate(ranked, start=1))
        timings["rescore"] = time.perf_counter() - t

        failures = tuple(r for r in results if isinstance(r, ArmFailure))
        executed = [r.template_id for r in results if isinstance(r, ArmResult)]
        timings_ms = {k: round(v * 1000, 3) for k, v in timings.items()}
        timings_ms["es_took_max"] = float(max((r.took_ms for r in results if isinstance(r, ArmResult)), default=0))
        arm_stats = {r.template_id: {"took_ms": float(r.took_ms), "candidates": float(len(r.hits))}
                     for r in results if isinstance(r, ArmResult)}
        token = self.signer.issue(rid, client_id=client_id) if self.signer is not None else None
        resp = SearchResponse(rid, q, items, decision, failures, parsed_summary(parsed), ctx,
                              _rescorer_label(rescorer), timings_ms, arm_stats=arm_stats,
                              token=token)

        if self.fallback is not None and items and not failures:
            self.fallback.put((normalize_query(q), size), resp)

        t = time.perf_counter()
        self._record(resp, sel_ctx, executed, client_id=client_id, swap=swap)
        timings_ms["log"] = round((time.perf_counter() - t) * 1000, 3)
        timings_ms["overhead"] = round(sum(timings_ms[k] for k in ("qu", "select", "build", "merge", "rescore")), 3)
        timings_ms["total"] = round((time.perf_counter() - t0) * 1000, 3)
        logger.info("search %s arms=%s failures=%d total_ms=%.1f es_ms=%.1f", rid,
                    [c.template_id for c in decision.choices], len(failures),
                    timings_ms["total"], timings_ms["es"])
        return resp

    def _serve_fallback(self, q: str, size: int, rid: str, ctx: RequestContext,
                        sel_ctx: SelectionContext, exc: ServiceUnavailableError,
                        client_id: str | None) -> SearchResponse | None:
        """Elasticsearch is unavailable: the cached results of the last good response to the
        same normalized query and size, marked degraded (every arm listed as failed with status
        503; ``timings_ms`` has ``degraded`` and ``fallback_age_s``), or None. The impression
        is logged with ``degraded: "fallback_cache"`` and no executed arm, so feedback on it
        is recorded but rewards or blames no arm."""
        hit = self.fallback.get((normalize_query(q), size)) if self.fallback is not None else None
        if hit is None:
            return None
        age, old = hit
        reason = f"fallback cache: {exc}; served the results of {age:.0f} s ago"
        failures = tuple(ArmFailure(c.arm, c.template_id, 503, reason)
                         for c in old.decision.choices) or (ArmFailure("*", "*", 503, reason),)
        token = self.signer.issue(rid, client_id=client_id) if self.signer is not None else None
        resp = SearchResponse(rid, q, old.results, old.decision, failures, old.parsed, ctx,
                              old.rescorer, {"degraded": 1.0, "fallback_age_s": round(age, 3)},
                              token=token)
        logger.warning("search %s served from the fallback cache (%.0f s old): %s", rid, age, exc)
        self._record(resp, sel_ctx, [], degraded="fallback_cache")
        return resp

    def _write(self, kind: str, payload: dict[str, Any]) -> tuple[Any, bool]:
        """One Redis write through the durable writer: ``(result, spooled)``."""
        if self.writer is not None:
            return self.writer.write(kind, payload)
        return redis_appliers(self.store, self.log)[kind](payload), False

    def _apply_updates(self, updates: Sequence[StatUpdate], dedupe: tuple[str, str, int],
                       event: dict[str, Any], request_id: str) -> bool:
        """Atomic bandit update (raising the request's observation, the max rule of
        :mod:`orchestrator.rewards`) + duplicate marker + event (spooled while Redis is down,
        and then acknowledged as applied once durable). False: a duplicate."""
        if self.writer is not None and self.writer.spool.has_marker(dedupe[0], dedupe[1]):
            return False  # the same feedback is already waiting in the spool
        result, spooled = self._write("apply", {
            "updates": [update_to_dict(u) for u in updates], "dedupe": list(dedupe),
            "event": event,
            "outcome": [self.store.outcome_key(request_id), self.log.impression_ttl_s]})
        return True if spooled else bool(result)

    def _observations(self, impression: Mapping[str, Any], sel_ctx: SelectionContext,
                      actions: Sequence[tuple[str, str]] = ()) -> tuple[list[ArmReward], list[StatUpdate]]:
        """The request's per-arm rewards given ``actions`` so far, and their statistic updates
        (the learner's arm statistics plus the budget levels'), grouped for the max rule."""
        rewards = outcome_rewards(impression, actions, self._rewards())
        updates = list(self.learner.updates_for(sel_ctx, rewards))
        if hasattr(self.learner, "store"):  # learning selectors also learn budget levels
            updates += level_updates(sel_ctx, level_rewards(impression, actions, self._rewards()))
        return rewards, updates

    def _impression(self, request_id: str) -> dict[str, Any]:
        """The stored impression: Redis, else (Redis down, or not replayed yet) the spool or
        the impressions this process served recently."""
        def local() -> dict[str, Any] | None:
            hit = self.writer.spool.impression(request_id) if self.writer is not None else None
            return hit if hit is not None or self.recent is None else self.recent.get(request_id)

        if self.writer is not None and self.writer.breaker.state != "closed":
            imp = local()  # Redis failed a moment ago: do not wait for it again
            if imp is not None:
                return dict(imp)
        try:
            return self.log.get_impression(request_id)
        except ServiceUnavailableError:
            imp = local()
            if imp is None:
                raise
            return dict(imp)
        except UnknownRequestError:
            hit = self.writer.spool.impression(request_id) if self.writer is not None else None
            if hit is None:
                raise
            return dict(hit)

    def _record(self, resp: SearchResponse, sel_ctx: SelectionContext,
                executed: list[str], *, degraded: str | None = None,
                client_id: str | None = None, swap: int | None = None) -> dict[str, Any]:
        """Log the impression and, in the same Redis write, the request's search-time bandit
        observations: reward 0 minus the latency cost for every chosen arm that ran, the
        failure reward for every chosen arm that failed (see :mod:`orchestrator.rewards`).
        A client over its influence cap gets its impression logged with ``capped: true`` and
        no observation (feedback on it is then acknowledged as capped, never applied)."""
        decision = decision_to_dict(resp.decision)
        for c in decision["chosen"]:
            c["action_features"] = [list(x) for x in self._specs[c["template_id"]].action_features] \
                if c["template_id"] in self._specs else []
        shown = [{"id": it.id, "rank": it.rank, "score": round(it.score, 6),
                  "arms": [p.template_id for p in it.provenance], "provenance": _provenance(it)}
                 for it in resp.results]
        impression = {
            "request_id": resp.request_id, "ts": _now_iso(), "query": resp.query,
            "query_key": normalize_query(resp.query),
            "intent": resp.parsed.get("intent"),
            "chosen_arms": [c.template_id for c in resp.decision.choices],
            "parsed": resp.parsed, "context": resp.context.to_dict(), "selection": sel_ctx.to_dict(),
            "decision": decision, "executed": executed,
            "failures": [{"arm": f.arm, "template_id": f.template_id, "status": f.status,
                          "reason": f.reason,
                          "took_ms": self.arm_timeout_ms if f.status == 504 and not degraded else 0.0}
                         for f in resp.failures],
            "arm_stats": resp.arm_stats,
            "shown": shown, "rescorer": resp.rescorer, "timings_ms": resp.timings_ms,
            "swap": swap,
        }
        if degraded:
            impression["degraded"] = degraded
        rewards, updates = self._observations(impression, sel_ctx)
        if updates and self.influence is not None and client_id is not None:
            # One observation (weight 1) per arm per search is what a client can add.
            weights = {r.template_id: r.weight for r in rewards}
            if self.influence.reserve(client_id, weights) is None:
                logger.warning("search observations capped: client over its influence cap",
                               extra={"capped": True, "client": client_id})
                impression["capped"] = True
                updates = []
        event = {**impression, "feature_names": list(self.extractor.names),
                 "shown": [{**s, "features": [round(v, 6) for v in it.features.values()]}
                           for s, it in zip(shown, resp.results)]}
        if self.recent is not None:
            self.recent.put(impression)
        self._write("impression", {"impression": impression, "event": event, "executed": executed,
                                   "updates": [update_to_dict(u) for u in updates]})
        session = session_of(impression["context"])
        if self.chains is not None and session is not None:
            self.chains.record(session, request_id=resp.request_id, query_key=impression["query_key"])
        return impression

    # -- feedback ------------------------------------------------------------------------------
    def feedback(self, request_id: str, item_id: str, action: str, *, token: str | None = None,
                 client_id: str | None = None) -> FeedbackResult:
        """Count one user action on a shown item; idempotent per (request, item, action).

        In-process callers are trusted: ``token`` (the search response's) is verified when
        given, and the per-client influence cap applies only when ``client_id`` is given. The
        HTTP API always passes both (see :mod:`orchestrator.security`). A capped client's
        feedback is acknowledged with ``capped=True`` and not applied.

        Raises
        ------
        InvalidTokenError
            ``token`` is forged, expired, or for another request or client.
        UnknownRequestError
            The request id was never served or its impression expired.
        InvalidFeedbackError
            Unknown action, or an item the request did not show.
        ServiceUnavailableError
            Redis is down.
        """
        check_text(request_id, "request_id", max_chars=256, error=InvalidFeedbackError)
        check_text(item_id, "item_id", max_chars=1024, error=InvalidFeedbackError)
        check_text(action, "action", max_chars=64, error=InvalidFeedbackError)
        set_request_id(request_id)
        if token is not None and self.signer is not None:
            self.signer.verify(token, request_id=request_id, client_id=client_id)
        reward_model = self._rewards()
        reward_model.check_action(action)
        imp = self._impression(request_id)
        item = shown_item(imp, item_id)
        rank = int(item["rank"])
        # re-featurized when served before a featurizer migration (another vector layout)
        sel_ctx = logged_context(self.featurizer, imp, understander=self.understander)
        # This action's rewards; the Lua apply raises the request's observation to them where
        # they beat what is already applied (one observation per search: the best outcome).
        rewards, updates = self._observations(imp, sel_ctx, [(item_id, action)])
        reward_map = {r.template_id: round(r.reward, 6) for r in rewards}
        if imp.get("capped"):
            # The search's observations were capped (the client was over its influence cap):
            # its feedback is acknowledged, logged as capped, and never applied or written to
            # the event log (an offline rebuild could not re-apply it either).
            try:
                counted = (item_id, action) in self.log.counted(request_id)
            except ServiceUnavailableError:
                counted = False
            logger.warning("feedback capped: its search was over the client's influence cap",
                           extra={"capped": True, "client": client_id, "item_id": item_id,
                                  "action": action})
            return FeedbackResult(request_id, item_id, action, counted, rank, 1.0, reward_map,
                                  capped=not counted)
        held = set(item.get("arms") or ())
        event = {"request_id": request_id, "item_id": item_id, "action": action,
                 "position": rank, "rank": rank, "weight": 1.0,
                 "value": round(reward_model.value(action, rank), 6),
                 "rewards": reward_map,
                 "rewarded_arms": [t for t in reward_map if t in held
                                   and reward_model.is_positive(action)],
                 "query": imp.get("query"), "intent": imp.get("intent"), "ts": _now_iso()}
        chain = self._chain(imp, request_id, reward_model, action)
        if chain:
            event["chain"] = chain
        applied = self._apply_updates(
            updates,
            (self.log.dedupe_key(request_id), self.log.dedupe_member(item_id, action),
             self.log.impression_ttl_s),
            event, request_id,
        )
        return FeedbackResult(request_id, item_id, action, not applied, rank, 1.0, reward_map)

    def _chain(self, imp: Mapping[str, Any], request_id: str, reward_model: RewardModel,
               action: str) -> list[dict[str, Any]]:
        """The session's abandoned earlier searches a positive ``action`` on ``request_id``
        credits (:mod:`orchestrator.chains`); [] for other actions, without a session, or
        with chains off."""
        session = session_of(imp.get("context"))
        if self.chains is None or session is None or not reward_model.is_positive(action):
            return []
        breaker = self.writer.breaker if self.writer is not None else None
        return self.chains.abandoned(
            session, request_id, positive=reward_model.is_positive,
            counted=lambda rids: self.log.counted_many(rids, breaker=breaker))

    # -- introspection -------------------------------------------------------------------------
    def explain(self, request_id: str) -> dict[str, Any]:
        """The stored impression (decision, propensities, failures, shown items with
        provenance) plus the feedback counted so far."""
        imp = self.log.get_impression(request_id)
        imp["feedback"] = [{"item_id": i, "action": a} for i, a in self.log.counted(request_id)]
        return imp

    def arms(self) -> list[dict[str, Any]]:
        """Every arm with its sidecar metadata, times executed and posterior summary."""
        specs = [self._specs[t.id] for t in self.registry]
        impressions = self.store.impressions()
        summary: dict[str, dict[str, float]] = {}
        learner = self.learner
        if isinstance(learner, LinearThompsonSelector):
            learner.refresh(specs)  # fresh, whatever the refresh interval: /arms is for humans
            summary = learner.summary(specs)
        out = []
        for t in self.registry:
            out.append({
                "arm": t.arm, "template_id": t.id, "version": t.version,
                "description": t.meta.get("description", ""),
                "required_slots": t.meta.get("required_slots", []),
                "action_features": t.meta.get("action_features", {}),
                "params": [p.name for p in t.params],
                "impressions": impressions.get(t.id, 0),
                **summary.get(t.id, {}),
            })
        return out

    def health(self) -> dict[str, str]:
        """``{"elasticsearch": "ok" | error, "redis": "ok" | error, "spool": "ok" | what is
        waiting}``: the spool is not ok while Redis writes wait in it for replay."""
        from .es_client import check_available as es_check
        from .redis_client import check_available as redis_check

        out = {}
        for name, fn in (("elasticsearch", lambda: es_check(self.es, self.es_url)),
                         ("redis", lambda: redis_check(self.redis, self.redis_url))):
            try:
                fn()
                out[name] = "ok"
            except ServiceUnavailableError as exc:
                out[name] = str(exc)
        if self.writer is not None:
            st = self.writer.status()
            waiting = st["spooled"] + st["orphan_files"]
            out["spool"] = "ok" if not waiting else (
                f"{st['spooled']} Redis write(s) spooled in {st['spool_file']}"
                + (f" and {st['orphan_files']} orphaned spool file(s)" if st["orphan_files"] else "")
                + "; replayed when Redis answers")
        return out

    def resilience_status(self) -> dict[str, Any]:
        """Numbers behind :meth:`health`: breaker states, spooled and replayed writes,
        fallback cache size."""
        breaker = getattr(self.multisearch, "breaker", None)
        return {
            "elasticsearch_breaker": breaker.snapshot() if breaker is not None else None,
            "spool": self.writer.status() if self.writer is not None else None,
            "fallback_cache": len(self.fallback) if self.fallback is not None else None,
        }

    def replay_spool(self) -> int:
        """Replay spooled Redis writes now (also done in the background and before the next
        write); returns how many went in. Stops quietly while Redis is still down."""
        return self.writer.replay() if self.writer is not None else 0

    def close(self) -> None:
        """Stop the spool's replay thread and release its file (still-spooled writes stay on
        disk and are adopted by the next orchestrator for the same Redis state)."""
        if self.writer is not None:
            self.writer.close()


__all__ = ["EMPTY_ACTION", "Orchestrator", "decision_to_dict", "executed_arms",
           "parsed_summary", "response_to_dict"]
