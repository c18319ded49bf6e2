"""The simulation loop: one query stream replayed against one live orchestrator per policy.

Consumes :class:`SimConfig` plus Elasticsearch and Redis clients; produces
:class:`SimResult` (one :class:`RoundRecord` per round and policy, the oracle's plans and
calibration scores, timings). Every policy is its own ``Orchestrator.from_settings(...)``
with its own Redis key prefix ``sim:<run id>:<policy>:`` (learning policies never share
state); the keys are deleted at the end unless ``keep_state``.

Per round ``t`` every policy gets the same query and request context; the user's clicks
come from the click model with a random stream seeded by ``(seed, t)`` -- the same for
every policy (common random numbers, so differences between policies are not click noise).
Clicks and plays go through ``Orchestrator.feedback`` as an application would send them.

Candidate union: each search asks for as many results as the policy's budget can fetch
(``size`` = its maximum union), so the response holds the whole merged union, of which
the user sees the top ``display``. The oracle's plans come from a calibration slice of
the stream (other seed offset): one ``_msearch`` per calibration query runs every eligible
arm at the full budget, and every subset of up to ``oracle_max_arms`` arms is evaluated
offline by truncating each arm's list to its equal share, merging and rescoring exactly as
the pipeline does (the kNN arm's truncated list approximates a smaller ``k``).

Reproducibility: every policy's orchestrator gets a seeded request-id factory (the id seeds
the explore arm) and a seeded selector, posteriors and the examination model are re-read
synchronously (``refresh_interval_s=0``), the rescorer is only reloaded right after a
retraining and the memory index is refreshed right after each memory update, so with
``reward.latency_cost_per_ms = 0`` the same ``seed`` gives the same per-round results (up
to Elasticsearch time-outs). The latency cost is part of the production objective and is
on by default: it charges each arm its measured ``took``, which differs from run to run,
so two runs then agree in distribution, not round by round (the posteriors differ from the
first feedback on).

Learning (every ``ours*`` policy, each with its own state: Redis prefix, events alias,
rescorer folder and a clone of the catalog's memory index ``ltrr-sim-<run>-memory-<policy>``
behind ``<index>-alias``), through the production job functions of :mod:`orchestrator.tasks`:
``run_update_memory`` every ``memory_every`` rounds, ``run_move_events`` every ``move_every``
rounds and the chain (move_events, estimate_examination, rebuild_posteriors, train_ranker;
train_qu only with ``train_qu``, on a per-policy copy of the QU folder, never served: the
understander is shared) every ``retrain_every`` rounds. Ablations share ``ours``'s seeds:
``ours_no_memory`` (no memory updates; its clone still serves the seeded pairs),
``ours_equal_budgets`` (bandit ``budget_mode="equal"``), ``ours_budget_cost0`` (learned
levels with ``budget_cost_per_candidate=0``, not in the default set), ``ours_no_neighbours`` (the memory
proposes no neighbours of clicked items), ``ours_no_intent_split`` (the ranker's features
have no ``|browse`` copies, ``rescorer.intent_split`` off), ``ours_no_rescorer`` (no
train_ranker, default rescorer) and, by name only, ``ours_no_retrain``.

Cost: the policies of a round run concurrently (``workers`` threads; each orchestrator is
used by one thread at a time and the records are collected in policy order); static
policies only run from ``static_from_fraction * rounds`` on. After the stream, a final pass
over ``sources.playlists_unseen`` (``phase="unseen"``, no feedback) for every policy.

New items (``new_items_fraction > 0``): the newest releases
(:func:`orchestrator.catalog.hold_out_newest`) are deleted from a ``_clone`` of the catalog
that every policy searches, and from every memory clone (one per learning policy, one shared
by the static policies); before round ``release_at`` no relevant set holds them; at
``release_at`` they go in through :func:`orchestrator.ingest.add_entities` (embeddings,
catalog write, memory cold start), and from then on known-item queries ask for them too
(:mod:`orchestrator.simulation.releases`). Rounds record the new items shown and clicked.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..arms import applicable, build_requests
from ..catalog import CatalogBuilder, HoldOut, hold_out_newest
from ..domain import ArmResult
from ..errors import OrchestratorError
from ..memory import memory_alias
from ..merging import UnionMerger
from ..pipeline import Orchestrator
from ..rescoring import FeatureExtractor, LinearRescorer
from ..selection import FixedPlanSelector, UniformRandomSelector
from ..templates import TemplateRegistry
from .bounds import stream_bounds
from .metrics import candidate_hit, candidate_recall, ndcg_at_k, reciprocal_rank, success_at_k
from .ope import independent_subset_propensity
from .policies import (
    EpsilonGreedySelector,
    PolicySpec,
    best_plans,
    candidate_subsets,
    is_static,
    rrf_rescorer,
    standard_policies,
)
from .queries import (
    QUERY_TYPES,
    KnownItem,
    QuerySources,
    QueryStream,
    SimQuery,
    known_item_query,
    load_new_items,
)
from .releases import Release, clone_index, prepare_catalog, release
from .releases import cleanup as release_cleanup
from .users import ClickModel, make_click_model

logger = logging.getLogger(__name__)

_DEVICES = ("mobile", "desktop", "tv")

#: The memory clone the static policies share when the run holds new items out.
STATIC_MEMORY = "static"


@dataclass
class SimConfig:
    """Options of one simulation run (``ltrr simulate`` exposes them all)."""

    rounds: int = 1000
    seed: int = 0
    mix: dict[str, float] = field(default_factory=lambda: {"playlist": 0.4, "known_item": 0.4,
                                                           "tag": 0.2})
    drift_to: dict[str, float] | None = None
    click_model: str = "cascade"
    click_params: dict[str, Any] = field(default_factory=dict)
    total_budget: int = 60
    display: int = 10
    policies: list[str] | None = None
    oracle: bool = True
    calibration_per_type: int = 40
    oracle_max_arms: int = 3
    p_typo: float = 0.3
    p_partial: float = 0.2
    #: A user whose playlist or tag search showed nothing they wanted (no action on a wanted
    #: item) looks one of their wanted tracks up by name in the same session with this
    #: probability (a ``followup`` round: typed as a known-item query, with ``p_typo`` /
    #: ``p_partial``); the product can then credit the track to the abandoned query
    #: (:mod:`orchestrator.chains`). Follow-ups are logged, not scored. 0: never.
    p_reformulate: float = 0.3
    genres: list[str] | None = None
    keep_state: bool = False
    run_id: str = ""
    #: The command line that started the run (recorded in the report).
    command: str = ""
    #: Redis keys of the run live under ``<prefix_root><run id>:<policy>:``.
    prefix_root: str = "sim:"
    #: Run the retraining chain (estimate_examination, rebuild_posteriors, train_ranker;
    #: train_qu with ``train_qu``) for every ``ours*`` policy after every this many rounds
    #: (0: never).
    retrain_every: int = 1000
    #: With retraining, also run ``ours_no_retrain`` (same seeds, no retraining) even when
    #: not named in ``policies``.
    compare_no_retrain: bool = False
    #: Apply the click log to each learning policy's own memory clone every N rounds (0: never).
    memory_every: int = 5
    #: Move each learning policy's Redis stream into its events index every N rounds (0: never).
    move_every: int = 50
    #: Also run the QU retraining job on a per-policy copy of ``qu.model_dir`` (its
    #: promotions are not served: every policy shares one loaded understander).
    train_qu: bool = False
    #: Concurrent policies per round (each orchestrator is used by one thread at a time).
    workers: int = 4
    #: Static policies (single arms, hybrid_rrf, all_arms, oracle, random) only run the rounds
    #: ``t >= static_from_fraction * rounds`` (they do not learn: the last third compares exactly).
    static_from_fraction: float = 2.0 / 3.0
    #: Final evaluation pass (no feedback) over at most this many unseen playlist titles.
    unseen_eval_max: int = 200
    #: Query popularity (Zipf exponent) and simulated users, passed to the stream when it
    #: supports them (None: its default).
    zipf: float | None = None
    n_users: int | None = None
    #: Share of the ``ours*`` policies' searches whose arm subset is drawn uniformly
    #: (``bandit.uniform_share``: off-policy evaluation support; 0: Thompson sampling only).
    uniform_share: float = 0.0
    #: New-item ingestion (held-out newest items released during the run; 0: off).
    new_items_fraction: float = 0.0
    release_at_fraction: float = 0.33
    #: Folder for the per-run rescorer models of ``ours`` (default: a temporary folder,
    #: deleted at the end unless ``keep_state``).
    model_dir: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RoundRecord:
    """What one policy did in one round (also the OPE log line)."""

    t: int
    policy: str
    qtype: str
    noise: str
    query: str
    ndcg: float
    success: float
    mrr: float
    cand_recall: float
    cand_hit: float
    clicked: float
    played: float
    arms: list[str]
    eligible: list[str]
    propensities: dict[str, float]
    subset_propensity: float
    n_candidates: int
    fetched: int
    latency_ms: float
    es_ms: float
    failed: int = 0
    error: str = ""
    #: Subset propensity under the independence approximation (product of the per-arm
    #: inclusion propensities), kept to compare OPE with the logged joint propensity.
    subset_propensity_indep: float = 1.0
    #: Version of the rescorer that ranked this round (0: the default model).
    rescorer_version: int = 0
    #: The query's normalised key, simulated user and need (from the stream, "" if absent).
    key: str = ""
    user: str = ""
    need: str = ""
    #: ``stream`` (scored rounds, feedback sent) | ``unseen`` (final pass, no feedback).
    phase: str = "stream"
    #: Held-out (new) items among the shown top-``display`` / the clicked ones.
    new_shown: list[str] = field(default_factory=list)
    new_clicked: list[str] = field(default_factory=list)
    n_new_relevant: int = 0


@dataclass
class SimResult:
    config: SimConfig
    records: list[RoundRecord]
    oracle_plans: dict[str, dict[str, int]]
    calibration: dict[str, dict[str, float]]
    arms: list[str]
    query_counts: dict[str, int]
    source_sizes: dict[str, int]
    seconds: dict[str, float]
    queries: list[dict[str, Any]]
    retrains: list[dict[str, Any]] = field(default_factory=list)
    #: Per learning policy: totals of the memory / move jobs and the memory clone used.
    learning: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: The new-item release (hold-out sizes, what was removed, what was released), if any.
    new_items: dict[str, Any] | None = None
    #: What one fixed list per query key could reach on the last third (:mod:`.bounds`).
    bounds: dict[str, Any] | None = None


#: Per-arm Elasticsearch time-out in simulations (serving default: 500ms).
SIM_ARM_TIMEOUT = "5s"


def newest_arms_registry(folder: Path) -> TemplateRegistry:
    """The newest version of every arm only (what the serving pipeline's registry iterates),
    so the "each arm alone" policies compare the arms users actually get."""
    reg = TemplateRegistry.from_dir(folder)
    return TemplateRegistry({t.id: t for t in reg.by_arm.values()})


def sim_settings(settings: Any, *, prefix: str, alias: str | None, max_results: int,
                 events_alias: str | None = None, model_dir: Path | None = None,
                 display: int | None = None, memory_alias: str | None = None,
                 neighbours: bool = True, chains: bool = True) -> Any:
    """``settings`` for one policy: its Redis prefix, the catalog alias, and for a retrained
    policy its own events alias, rescorer folder and no time decay of the posteriors (the
    simulation has no calendar time: a run lasts minutes, so wall-clock decay would only
    make the rebuild depend on timing). ``neighbours=False`` switches the memory's
    neighbour pairs off (``memory.neighbours_per_click = 0``), ``chains=False`` its
    query-chain credit (``memory.chain_window_s = 0``)."""
    update: dict[str, Any] = {
        "redis": settings.redis.model_copy(update={"key_prefix": prefix}),
        "limits": settings.limits.model_copy(update={"max_results": max(max_results, settings.limits.max_results)}),
    }
    es_update: dict[str, Any] = {}
    if alias:
        es_update["catalog_alias"] = alias
    if events_alias:
        es_update["events_alias"] = events_alias
    if es_update:
        update["es"] = settings.es.model_copy(update=es_update)
    if model_dir is not None:
        update["rescorer"] = settings.rescorer.model_copy(update={"model_dir": model_dir})
        update["bandit"] = settings.bandit.model_copy(update={"rebuild_half_life_days": None})
    if memory_alias is not None and getattr(settings, "memory", None) is not None:
        update["memory"] = settings.memory.model_copy(update={"alias": memory_alias})
    if not neighbours and getattr(settings, "memory", None) is not None:
        update["memory"] = update.get("memory", settings.memory).model_copy(
            update={"neighbours_per_click": 0})
    if not chains and getattr(settings, "memory", None) is not None:
        update["memory"] = update.get("memory", settings.memory).model_copy(
            update={"chain_window_s": 0.0})
    if getattr(settings, "examination", None) is not None:
        # The model a retraining estimates is read at the next feedback (refresh 0), not up
        # to a minute of wall clock later; swap interventions only within what simulated
        # users are shown.
        ex: dict[str, Any] = {"refresh_interval_s": 0.0}
        if display is not None:
            ex["max_position"] = display
        update["examination"] = settings.examination.model_copy(update=ex)
    return settings.model_copy(update=update)


class SharedEncoder:
    """One query encoder for every policy, caching the vectors by text (every policy of a
    round encodes the same query: once instead of once per policy; same vectors)."""

    def __init__(self, factory: Callable[[], Any], *, max_size: int = 50000) -> None:
        import threading

        self._factory = factory
        self._encoder: Any = None
        self._cache: dict[str, Any] = {}
        self._max = max_size
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str]) -> list[Any]:
        out: list[Any] = []
        for text in texts:
            with self._lock:
                vec = self._cache.get(text)
                if vec is None:
                    if self._encoder is None:
                        self._encoder = self._factory()
                    vec = self._encoder.encode([text])[0]
                    if len(self._cache) >= self._max:
                        self._cache.clear()
                    self._cache[text] = vec
            out.append(vec)
        return out


def _supported(cls: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The non-None ``kwargs`` that ``cls``'s constructor accepts."""
    import inspect

    params = inspect.signature(cls).parameters
    return {k: v for k, v in kwargs.items() if v is not None and k in params}


def seeded_request_ids(seed: Sequence[int]) -> Callable[[], str]:
    """A request-id factory drawing UUID4-shaped ids from a seeded generator."""
    rng = np.random.default_rng(list(seed))

    def make() -> str:
        return str(uuid.UUID(bytes=rng.bytes(16), version=4))

    return make


def make_stream(config: SimConfig, data_dir: Path, sources: QuerySources
                ) -> tuple[QueryStream, HoldOut | None, list[dict[str, Any]] | None]:
    """The run's query stream from its config (the same config gives the same stream: the
    report rebuild regenerates it for the bounds), with the new-item hold-out when
    ``new_items_fraction > 0`` and, for a genre slice, the release documents of its genres."""
    extra: dict[str, Any] = {"zipf": config.zipf, "n_users": config.n_users}
    hold_out: HoldOut | None = None
    release_docs: list[dict[str, Any]] | None = None
    genres = set(config.genres) if config.genres else None
    if config.new_items_fraction > 0:
        hold_out = hold_out_newest(data_dir, config.new_items_fraction)
        new_ids = hold_out.track_ids
        if genres:  # a slice: only the releases of its genres are released (and asked for)
            release_docs = list(CatalogBuilder(data_dir, only=hold_out.ids, genres=genres).build())
            new_ids = new_ids & {f"{d['entity_type']}:{d['entity_id']}" for d in release_docs}
        extra.update(held_out=hold_out.ids,
                     release_at=int(config.release_at_fraction * config.rounds),
                     new_items=load_new_items(data_dir, new_ids))
    stream = QueryStream(sources, mix=config.mix, drift_to=config.drift_to, seed=config.seed,
                         p_typo=config.p_typo, p_partial=config.p_partial,
                         **_supported(QueryStream, extra))
    return stream, hold_out, release_docs


def regenerate_bounds(config: Mapping[str, Any], data_dir: Path,
                      rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The bounds of a finished run, from its recorded config: the stream is regenerated
    and checked against the round log (every logged stream round's key and user must be the
    regenerated query's), else :class:`OrchestratorError` (a changed generator or data)."""
    known = set(SimConfig.__dataclass_fields__)
    cfg = SimConfig(**{k: v for k, v in config.items() if k in known})
    genres = set(cfg.genres) if cfg.genres else None
    sources = QuerySources.load(data_dir, genres=genres)
    stream, _hold_out, _docs = make_stream(cfg, data_dir, sources)
    queries = stream.generate(cfg.rounds)
    bad = [r["t"] for r in rows if r.get("phase", "stream") == "stream" and r.get("key")
           and (r["t"] >= len(queries) or queries[r["t"]].key != r["key"]
                or queries[r["t"]].user != r.get("user", queries[r["t"]].user))]
    if bad:
        raise OrchestratorError(f"the regenerated stream differs from the round log at {len(bad)} "
                                f"rounds (first: t={bad[0]}); bounds not recomputed")
    return stream_bounds(queries, rounds=cfg.rounds, display=cfg.display)


def _contexts(n: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng([seed, 104729])
    return [{"hour": int(rng.integers(24)), "weekday": int(rng.integers(7)),
             "device": _DEVICES[int(rng.integers(len(_DEVICES)))]} for _ in range(n)]


def _feedback(orch: Orchestrator, resp: Any, item: str, action: str) -> None:
    token = getattr(resp, "token", None)
    if token is not None:
        orch.feedback(resp.request_id, item, action, token=token)  # type: ignore[call-arg]
    else:
        orch.feedback(resp.request_id, item, action)


class Simulation:
    """Builds the policies' orchestrators, calibrates the oracle and runs the rounds.

    Parameters
    ----------
    config:
        The run's options.
    settings:
        :class:`~orchestrator.settings.OrchestratorSettings`; ``alias`` overrides its
        catalog alias.
    es, redis:
        Clients.
    sources:
        Loaded query sources (default: loaded from ``settings.ingest.data_dir``).
    understander:
        Shared by every policy (default: the promoted QU model, as ``from_settings`` loads it).
    """

    def __init__(self, config: SimConfig, settings: Any, *, es: Any, redis: Any,
                 alias: str | None = None, sources: QuerySources | None = None,
                 understander: Any = "auto") -> None:
        self.config = config
        self.run_id = config.run_id or uuid.uuid4().hex[:8]
        config.run_id = self.run_id
        self.settings = settings
        self.alias = alias
        #: The catalog the run starts from (``alias`` becomes the run's clone with new items).
        self.source_alias = alias
        self.es, self.redis = es, redis
        genres = set(config.genres) if config.genres else None
        self.sources = sources or QuerySources.load(settings.ingest.data_dir, genres=genres)
        self.registry = newest_arms_registry(settings.templates.dir)
        self.arms = sorted(t.id for t in self.registry)
        self.click_model: ClickModel = make_click_model(config.click_model, **config.click_params)
        #: New items: the newest releases, held out of the run's catalog clone and ingested
        #: through the product's incremental path at round ``release_at``.
        self.release: Release | None = None
        self.stream, self.hold_out, self._release_docs = make_stream(
            config, settings.ingest.data_dir, self.sources)
        self.release_at: int | None = self.stream.release_at
        #: Names of the wanted tracks, for follow-up lookups (built by :meth:`run`).
        self.lookups: dict[str, KnownItem] = {}
        self._understander = understander

        def _factory() -> Any:
            from ..embeddings import get_encoder

            return get_encoder(settings.embedding)

        self.encoder = SharedEncoder(_factory)
        self.prefixes: list[str] = []
        self.model_dirs: list[Path] = []
        self.retrain_settings: dict[str, Any] = {}
        #: Learning policy -> its memory clone alias.
        self.memory_clones: dict[str, str] = {}
        self.notes: list[str] = []

    # -- construction --------------------------------------------------------------------
    def prefix(self, policy: str) -> str:
        safe = policy.replace(":", "_")
        return f"{self.config.prefix_root}{self.run_id}:{safe}:"

    def events_alias(self, policy: str) -> str:
        """The per-run events alias of a retrained policy (lower case, as ES requires)."""
        return f"ltrr-sim-events-{self.run_id}-{policy.replace(':', '_')}".lower()

    def memory_index(self, policy: str) -> str:
        """The physical index of a learning policy's memory clone."""
        return f"ltrr-sim-{self.run_id}-memory-{policy.replace(':', '_')}".lower()

    def clone_memories(self, policies: Sequence[str]) -> None:
        """Clone the catalog's memory index once per learning policy
        (:func:`~orchestrator.simulation.releases.clone_index`: ``_clone`` under a write
        block of the source, held with :meth:`clone_lock`); each clone gets the alias
        ``<index>-alias``. Without a source memory index the policies start
        from empty ones (created by the updater)."""
        if not policies:
            return
        catalog = self.source_alias or self.settings.es.catalog_alias
        src_alias = memory_alias(catalog, getattr(self.settings.memory, "alias", None))
        sources: list[str] = []
        if self.es.indices.exists_alias(name=src_alias):
            sources = sorted(self.es.indices.get_alias(name=src_alias))
        elif self.es.indices.exists(index=src_alias):
            sources = [src_alias]
        src = sources[0] if sources else None
        if len(sources) > 1:
            self.notes.append(f"memory alias {src_alias} points at {sources}: cloned {src}")
        for name in policies:
            self.memory_clones[name] = f"{self.memory_index(name)}-alias"
        if src is None:
            self.notes.append(f"no memory index behind {src_alias}: policies start empty")
            return
        for name in policies:
            clone_index(self.es, src, self.memory_index(name), alias=self.memory_clones[name],
                        lock=self.clone_lock)
        self.es.indices.refresh(index=",".join(self.memory_index(n) for n in policies))

    def clone_lock(self, index: str) -> Any:
        """A Redis lock around write-block -> ``_clone`` -> unblock of ``index``: two runs
        cloning the same source at once would otherwise unblock it under each other's clone
        ("must be read-only to resize index")."""
        return self.redis.lock(f"{self.config.prefix_root}clone-lock:{index}", timeout=600,
                               blocking_timeout=900)

    def memory_pairs(self, policy: str) -> int:
        """Documents in a policy's memory clone (0 when it does not exist)."""
        alias = self.memory_clones.get(policy)
        if not alias or not self.es.indices.exists_alias(name=alias):
            return 0
        self.es.indices.refresh(index=alias)
        return int(self.es.count(index=alias)["count"])

    def _build(self, spec: PolicySpec, *, index: int, plan: Mapping[str, int] | None = None,
               suffix: str = "", retrain: bool | None = None) -> Orchestrator:
        c = self.config
        prefix = self.prefix(spec.name + suffix)
        self.prefixes.append(prefix)
        learns = spec.learns if retrain is None else retrain
        model_dir: Path | None = None
        if learns:
            model_dir = self._model_dir(spec.name)
        s = sim_settings(self.settings, prefix=prefix, alias=self.alias,
                         max_results=max(spec.max_candidates(c.total_budget), c.total_budget),
                         events_alias=self.events_alias(spec.name) if learns else None,
                         model_dir=model_dir, display=c.display,
                         memory_alias=self.memory_clones.get(spec.name if learns else STATIC_MEMORY),
                         neighbours=spec.neighbours, chains=spec.chains)
        rescorer: LinearRescorer | None = (
            rrf_rescorer() if spec.rescorer == "rrf" else LinearRescorer.default())
        rescoring: dict[str, Any] | None = None
        if learns and spec.ranker and spec.retrain:
            # Promoted models are picked up right after each retraining (reload_rescorer(
            # force=True)), never on a wall-clock timer: reproducible.
            rescorer, rescoring = None, {"model_dir": str(model_dir), "reload_interval_s": 1e12}
        if spec.intent_split is not None:
            rescoring = {**(rescoring or {}), "intent_split": spec.intent_split}
        seed = c.seed * 1000 + index
        bandit: dict[str, Any] = {"total_budget": c.total_budget, "seed": seed,
                                  "refresh_interval_s": 0.0}
        if spec.budget_mode:
            bandit["budget_mode"] = spec.budget_mode
        if spec.budget_cost is not None:
            bandit["budget_cost_per_candidate"] = spec.budget_cost
        if spec.kind == "ours" and c.uniform_share > 0:
            bandit["uniform_share"] = c.uniform_share
        selector: Any = None
        if spec.kind in ("fixed", "oracle"):
            selector = FixedPlanSelector(plan if plan is not None else spec.plan)
        elif spec.kind == "random":
            selector = UniformRandomSelector(min_arms=1, max_arms=3, random_state=seed)
        elif spec.kind == "epsilon_greedy":
            from ..bandit_state import RedisBanditStore
            from ..selection import ContextFeaturizer

            dim = ContextFeaturizer(hash_dim=s.bandit.hash_dim).dim
            selector = EpsilonGreedySelector(RedisBanditStore(self.redis, prefix=prefix, dim=dim),
                                             random_state=seed)
        elif spec.kind != "ours":
            raise OrchestratorError(f"unknown policy kind {spec.kind!r}")
        orch = Orchestrator.from_settings(s, es=self.es, redis=self.redis,
                                          understander=self._understander, registry=self.registry,
                                          selector=selector, rescorer=rescorer, bandit=bandit,
                                          rescoring=rescoring,
                                          encoder_factory=lambda: self.encoder,
                                          # An arm cut short by the serving time-out would make
                                          # a round depend on machine load: give it time here.
                                          resilience={"arm_timeout": SIM_ARM_TIMEOUT},
                                          request_id_factory=seeded_request_ids((c.seed, index, 7)))
        if self._understander == "auto":
            self._understander = orch.understander
        if learns:
            self.retrain_settings[spec.name] = s
        return orch

    def _model_dir(self, policy: str) -> Path:
        root = self.config.model_dir
        if root:
            path = Path(root) / f"{self.run_id}-{policy.replace(':', '_')}"
        else:
            path = Path(tempfile.mkdtemp(prefix=f"ltrr-sim-{self.run_id}-"))
        path.mkdir(parents=True, exist_ok=True)
        self.model_dirs.append(path)
        return path

    # -- retraining ----------------------------------------------------------------------
    def retrain(self, name: str, orch: Orchestrator, *, t: int,
                spec: PolicySpec | None = None) -> dict[str, Any]:
        """Run the retraining chain for policy ``name`` on its own log (module docstring):
        move_events, estimate_examination, rebuild_posteriors, train_ranker (unless the
        policy's ``ranker`` is off), train_qu (``config.train_qu``, on a per-policy copy)."""
        from ..tasks import (
            run_estimate_examination,
            run_move_events,
            run_rebuild_posteriors,
            run_train_qu,
            run_train_ranker,
        )

        s = self.retrain_settings[name]
        ranker = spec.ranker if spec is not None else True
        out: dict[str, Any] = {"after_round": t + 1, "policy": name,
                               "rescorer_version_before": orch.rescorer_version}
        t0 = time.perf_counter()
        steps: list[tuple[str, Any]] = [("move_events", run_move_events),
                                        ("estimate_examination", run_estimate_examination),
                                        ("rebuild_posteriors", run_rebuild_posteriors)]
        if ranker:
            steps.append(("train_ranker", run_train_ranker))
        else:
            out["train_ranker"] = {"skipped": "ablation: no ranker training", "promoted": False}
        qu_s = self._qu_settings(name, s) if self.config.train_qu else None
        if qu_s is not None:
            steps.append(("train_qu", lambda _s, es, r: run_train_qu(qu_s, es, r)))
        else:
            out["train_qu"] = {"skipped": "off (config.train_qu): every policy shares one loaded "
                                          "understander, a per-policy promotion is not served"}
        for step, job in steps:
            t1 = time.perf_counter()
            try:
                res = job(s, self.es, self.redis)
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                logger.warning("retraining step %s of %s after round %d failed: %s", step, name,
                               t + 1, exc)
                res = {"error": str(exc)[:300]}
            res = {k: v for k, v in res.items() if k not in ("path",)}
            res["seconds"] = round(time.perf_counter() - t1, 2)
            out[step] = res
        out["train_memory"] = {"skipped": "the memory updater runs every memory_every rounds "
                                          "on the policy's own clone"}
        out["reloaded"] = orch.reload_rescorer(force=True) if ranker else False
        out["rescorer_version"] = orch.rescorer_version
        out["seconds"] = round(time.perf_counter() - t0, 2)
        logger.info("retrained %s after round %d: ranker %s, rescorer v%s", name, t + 1,
                    out["train_ranker"].get("reason"), out["rescorer_version"])
        return out

    def _qu_settings(self, name: str, s: Any) -> Any:
        """``s`` with a per-policy copy of the QU model folder (None if it cannot be copied)."""
        src = Path(self.settings.qu.model_dir)
        if not src.is_dir():
            return None
        dst = Path(tempfile.mkdtemp(prefix=f"ltrr-sim-{self.run_id}-qu-")) / "qu"
        shutil.copytree(src, dst)
        self.model_dirs.append(dst.parent)
        return s.model_copy(update={"qu": s.qu.model_copy(update={"model_dir": dst})})

    def learn(self, name: str, spec: PolicySpec, orch: Orchestrator, *, t: int,
              totals: dict[str, Any]) -> dict[str, Any] | None:
        """The learning jobs due after round ``t`` for one ``ours*`` policy (production job
        functions of :mod:`orchestrator.tasks`). Returns the retraining record, if any."""
        from ..tasks import run_move_events, run_update_memory

        c = self.config
        s = self.retrain_settings[name]
        n = t + 1

        def job(key: str, fn: Any) -> None:
            t1 = time.perf_counter()
            try:
                res = fn(s, self.es, self.redis)
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                logger.warning("%s of %s after round %d failed: %s", key, name, n, exc)
                res = {"error": str(exc)[:300]}
            agg = totals.setdefault(key, {"runs": 0, "errors": 0, "seconds": 0.0})
            agg["runs"] += 1
            agg["errors"] += int("error" in res)
            agg["seconds"] = round(agg["seconds"] + time.perf_counter() - t1, 3)
            for k, v in res.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "seconds":
                    agg[k] = agg.get(k, 0) + v
            if "error" in res:
                agg["last_error"] = res["error"]

        if spec.memory and c.memory_every > 0 and n % c.memory_every == 0:
            job("update_memory", run_update_memory)
            # The updater's writes become searchable at the index's next refresh (1 s in
            # production: "learns in seconds"); rounds here are milliseconds apart, so without
            # an explicit refresh which round first sees them would depend on timing.
            self.es.indices.refresh(index=memory_alias(s.es.catalog_alias, s.memory.alias))
        if spec.retrain and c.move_every > 0 and n % c.move_every == 0:
            job("move_events", run_move_events)
        if spec.retrain and c.retrain_every > 0 and n % c.retrain_every == 0 and n < c.rounds:
            return self.retrain(name, orch, t=t, spec=spec)
        return None

    # -- oracle calibration --------------------------------------------------------------
    def calibrate(self, queries: Sequence[SimQuery], probe: Orchestrator
                  ) -> tuple[dict[str, dict[str, int]], dict[str, dict[tuple[str, ...], float]]]:
        """Mean nDCG@display of every candidate subset per query type on ``queries``."""
        c = self.config
        subsets = candidate_subsets(self.arms, max_arms=c.oracle_max_arms)
        sums: dict[str, dict[tuple[str, ...], float]] = {t: {s: 0.0 for s in subsets} for t in QUERY_TYPES}
        counts = dict.fromkeys(QUERY_TYPES, 0)
        merger = UnionMerger()
        extractor = FeatureExtractor([t.arm for t in self.registry])
        rescorer = LinearRescorer.default()
        encoder = probe.encoder_factory() if probe.encoder_factory else None
        for i, q in enumerate(queries):
            parsed = probe.understander.parse(q.text) if probe.understander is not None else None
            eligible = [t.id for t in self.registry if applicable(t, parsed)]
            vec = [float(v) for v in encoder.encode([q.text])[0]] if encoder is not None else None
            try:
                reqs = build_requests(self.registry, parsed, q.text,
                                      budgets=dict.fromkeys(eligible, c.total_budget), vector=vec,
                                      seed=c.seed * 7919 + i)
                results = probe.multisearch.execute(reqs) if reqs else []
            except OrchestratorError as exc:
                logger.warning("calibration query %r failed: %s", q.text, exc)
                continue
            by_tid = {r.template_id: r for r in results if isinstance(r, ArmResult)}
            counts[q.qtype] += 1
            for subset in subsets:
                share = c.total_budget // len(subset)
                parts = [ArmResult(r.arm, r.template_id, tuple(h for h in r.hits if h.rank <= share), r.took_ms)
                         for tid in subset if (r := by_tid.get(tid)) is not None]
                cands = merger.merge(parts)
                ranked = rescorer.rank(cands, query=q.text, parsed=parsed, extractor=extractor)
                shown = [cand.id for cand, _, _ in ranked[: c.display]]
                sums[q.qtype][subset] += ndcg_at_k(shown, q.relevant, c.display)
        scores = {t: {s: v / counts[t] for s, v in by.items()} for t, by in sums.items() if counts[t]}
        return best_plans(scores, total_budget=c.total_budget), scores

    # -- the loop ------------------------------------------------------------------------
    def run(self, *, progress: bool = True,
            on_round: Callable[[int], None] | None = None) -> SimResult:
        c = self.config
        t_start = time.perf_counter()
        specs = standard_policies(self.arms, total_budget=c.total_budget, include=c.policies)
        queries = self.stream.generate(c.rounds)
        contexts = _contexts(c.rounds, c.seed)
        n_standard = len(specs)
        index_of = {s.name: i for i, s in enumerate(specs)}
        if c.retrain_every > 0 and c.compare_no_retrain and "ours" in index_of \
                and "ours_no_retrain" not in index_of:
            specs.append(PolicySpec("ours_no_retrain", "ours", retrain=False, seed_as="ours"))
        for spec in specs:  # ablations: the same seeds as ours
            if spec.seed_as and spec.seed_as in index_of:
                index_of[spec.name] = index_of[spec.seed_as]
        held_out = frozenset(getattr(self.stream, "held_out", None) or ())
        learners = [s.name for s in specs if s.learns]
        orchs: dict[str, Orchestrator] = {}
        try:
            if self.hold_out is not None:
                self.prepare_new_items(learners)
            else:
                self.clone_memories(learners)
            for spec in specs:
                orchs[spec.name] = self._build(spec, index=index_of[spec.name])
        except Exception:
            if not c.keep_state:
                self.cleanup()
            raise
        retrains: list[dict[str, Any]] = []
        learning: dict[str, Any] = {n: {"memory_alias": self.memory_clones.get(n),
                                        "memory_pairs_start": self.memory_pairs(n)}
                                    for n in learners}
        plans: dict[str, dict[str, int]] = {}
        scores: dict[str, dict[tuple[str, ...], float]] = {}
        t_cal = time.perf_counter()
        oracle_orchs: dict[str, Orchestrator] = {}
        oracle_spec: PolicySpec | None = None
        if c.oracle:
            per_type = max(c.calibration_per_type, 1)
            calib_stream = QueryStream(self.sources, mix={t: 1.0 for t in QUERY_TYPES
                                                          if self.sources.sizes()[t] > 0},
                                       seed=c.seed, p_typo=c.p_typo, p_partial=c.p_partial)
            calib = calib_stream.generate(per_type * len(QUERY_TYPES), offset=1)
            probe = next(iter(orchs.values())) if orchs else self._build(
                PolicySpec("probe", "fixed", plan={}), index=99)
            plans, scores = self.calibrate(calib, probe)
            oracle_spec = PolicySpec("oracle", "oracle", plans=plans)
            for qtype, plan in plans.items():
                oracle_orchs[qtype] = self._build(oracle_spec, index=n_standard, plan=plan,
                                                  suffix=f"_{qtype}")
        t_cal = time.perf_counter() - t_cal
        names = [s.name for s in specs] + (["oracle"] if oracle_spec else [])
        spec_by = {s.name: s for s in specs}
        if oracle_spec:
            spec_by["oracle"] = oracle_spec
        static_from = int(np.floor(c.rounds * min(max(c.static_from_fraction, 0.0), 1.0)))
        if c.p_reformulate > 0:
            self.lookups = self.lookup_items(queries)
        records: list[RoundRecord] = []
        t_loop = time.perf_counter()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=c.rounds, desc=f"simulate ({len(names)} policies)", unit="round")
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=max(int(c.workers), 1))

        def orch_of(name: str, qtype: str) -> Orchestrator | None:
            return oracle_orchs.get(qtype) if name == "oracle" else orchs[name]

        try:
            for t, (q, ctx) in enumerate(zip(queries, contexts)):
                if self.release is not None and t == self.release_at:
                    self.release_new_items(t)
                active = [n for n in names if (t >= static_from or not is_static(spec_by[n]))
                          and orch_of(n, q.qtype) is not None]
                # One thread per policy; results in policy order (deterministic records).
                # A session per round: the follow-up lookup of a user who found nothing joins it.
                ctx = {**ctx, "session_id": f"{q.user or 'anon'}:{t}"}
                futs = [pool.submit(self._rounds, t, n, spec_by[n], orch_of(n, q.qtype), q, ctx,
                                    held_out=held_out) for n in active]
                records.extend(r for f in futs for r in f.result())
                jobs = [pool.submit(self.learn, n, spec_by[n], orchs[n], t=t,
                                    totals=learning[n]) for n in learners]
                retrains.extend(r for f in jobs if (r := f.result()) is not None)
                if bar is not None:
                    bar.update(1)
                if on_round is not None:
                    on_round(t)
            # Final pass over unseen playlist titles: no feedback, after every scored round.
            unseen = list(getattr(self.sources, "playlists_unseen", None) or [])
            unseen = unseen[: max(c.unseen_eval_max, 0)]
            for i, q in enumerate(unseen):
                t = c.rounds + i
                ctx = _contexts(1, c.seed * 7 + t)[0]
                active = [n for n in names if orch_of(n, q.qtype) is not None]
                futs = [pool.submit(self._round, t, n, spec_by[n], orch_of(n, q.qtype), q, ctx,
                                    held_out=held_out, phase="unseen", feedback=False)
                        for n in active]
                records.extend(f.result() for f in futs)
            for n in learners:
                learning[n]["memory_pairs_end"] = self.memory_pairs(n)
        finally:
            pool.shutdown(wait=True)
            if bar is not None:
                bar.close()
            if not c.keep_state:
                self.cleanup()
        t_loop = time.perf_counter() - t_loop
        return SimResult(
            config=c, records=records, oracle_plans=plans,
            calibration={t: {"+".join(s): round(v, 4) for s, v in sorted(by.items(), key=lambda kv: -kv[1])[:10]}
                         for t, by in scores.items()},
            arms=self.arms, query_counts={t: sum(1 for q in queries if q.qtype == t) for t in QUERY_TYPES},
            source_sizes=self.sources.sizes(),
            seconds={"calibration": round(t_cal, 2), "loop": round(t_loop, 2),
                     "total": round(time.perf_counter() - t_start, 2)},
            queries=[{"t": t, "qtype": q.qtype, "text": q.text, "qid": q.qid, "noise": q.noise,
                      "n_relevant": len(q.relevant)} for t, q in enumerate(queries)],
            retrains=retrains, learning=learning, notes=list(self.notes),
            new_items=self.release.as_dict() if self.release is not None else None,
            bounds=stream_bounds(queries, rounds=c.rounds, display=c.display),
        )

    def lookup_items(self, queries: Sequence[SimQuery]) -> dict[str, KnownItem]:
        """Names of the tracks the stream's playlist and tag users want (what a follow-up
        lookup types), from the track sources (:func:`.queries.load_new_items`)."""
        ids = {i for q in queries if q.qtype in ("playlist", "tag")
               for i in q.relevant if i.startswith("track:")}
        data_dir = getattr(self.sources, "data_dir", None)
        if not ids or data_dir is None:
            return {}
        items = {k.entity_id: k for k in load_new_items(Path(data_dir), ids)
                 if k.entity_type == "track"}
        logger.info("follow-up lookups: names of %d of %d wanted tracks", len(items), len(ids))
        return items

    # -- new items -----------------------------------------------------------------------
    def prepare_new_items(self, learners: Sequence[str]) -> None:
        """Every policy searches one catalog clone without the held-out releases; every
        memory (one clone per learning policy, one shared by the static policies) is a clone
        of the full catalog's memory purged of their pairs
        (:func:`~orchestrator.simulation.releases.prepare_catalog`)."""
        assert self.hold_out is not None
        self.clone_memories([*learners, STATIC_MEMORY])
        genres = set(self.config.genres) if self.config.genres else None
        self.release = prepare_catalog(
            self.es, self.settings, run_id=self.run_id, hold_out=self.hold_out,
            source_alias=self.source_alias, memory_aliases=list(self.memory_clones.values()),
            genres=genres, prebuild=self._release_docs is None, lock=self.clone_lock)
        if self._release_docs is not None:
            self.release.docs = self._release_docs
        self.alias = self.release.catalog_alias
        self.notes.append(
            f"new items: {len(self.hold_out.ids)} held-out entities (newest "
            f"{self.config.new_items_fraction:.0%} of tracks, cutoff {self.hold_out.cutoff}) "
            f"released at round {self.release_at}")

    def release_new_items(self, t: int) -> None:
        """Ingest the held-out releases through ``add_entities`` (embeddings, catalog write,
        memory cold start in every memory clone) before round ``t``."""
        from ..embeddings import get_encoder

        assert self.release is not None
        res = release(self.es, self.settings, self.release,
                      encoder=get_encoder(self.settings.embedding))
        self.notes.append(f"new items released before round {t}: "
                          f"{res.get('indexed', res)} documents in {res.get('seconds')} s")
        logger.info(self.notes[-1])

    def _rounds(self, t: int, name: str, spec: PolicySpec, orch: Orchestrator, q: SimQuery,
                ctx: Mapping[str, Any], *, held_out: frozenset[str] = frozenset()) -> list[RoundRecord]:
        """A stream round and, when its user found nothing they wanted on a playlist or tag
        search, maybe their follow-up lookup of one wanted track in the same session
        (``p_reformulate``; decided by round and user, the same for every policy that
        failed them)."""
        rec, actions = self._play(t, name, spec, orch, q, ctx, held_out=held_out)
        c = self.config
        if (c.p_reformulate <= 0 or q.qtype not in ("playlist", "tag") or rec.failed
                or any(i in q.relevant for i, a in actions if a in ("click", "play"))):
            return [rec]
        rng = np.random.default_rng([c.seed, t, 4242])
        if rng.random() >= c.p_reformulate:
            return [rec]
        wanted = sorted(i for i in q.relevant if i.startswith("track:") and i in self.lookups)
        if not wanted:
            return [rec]
        target = wanted[int(rng.integers(len(wanted)))]
        look = known_item_query(self.lookups[target], rng, p_typo=c.p_typo, p_partial=c.p_partial)
        fq = SimQuery(look.qid, look.text, "known_item", {target: 1}, target=look.target,
                      noise=look.noise, user=q.user,
                      need=f"known:{target}")
        follow, _ = self._play(t, name, spec, orch, fq, ctx, held_out=held_out, phase="followup",
                               click_seed=31338)
        return [rec, follow]

    def _round(self, t: int, name: str, spec: PolicySpec, orch: Orchestrator, q: SimQuery,
               ctx: Mapping[str, Any], *, held_out: frozenset[str] = frozenset(),
               phase: str = "stream", feedback: bool = True) -> RoundRecord:
        return self._play(t, name, spec, orch, q, ctx, held_out=held_out, phase=phase,
                          feedback=feedback)[0]

    def _play(self, t: int, name: str, spec: PolicySpec, orch: Orchestrator, q: SimQuery,
              ctx: Mapping[str, Any], *, held_out: frozenset[str] = frozenset(),
              phase: str = "stream", feedback: bool = True,
              click_seed: int = 31337) -> tuple[RoundRecord, list[tuple[str, str]]]:
        """One search of ``q`` by ``orch``, the simulated user's actions (sent as feedback
        unless ``feedback=False``) and the round's record."""
        c = self.config
        extra = {"key": str(getattr(q, "key", "") or ""), "user": str(getattr(q, "user", "") or ""),
                 "need": str(getattr(q, "need", "") or ""), "phase": phase,
                 "n_new_relevant": sum(1 for i in q.relevant if i in held_out)}
        size = max(spec.max_candidates(c.total_budget), c.display)
        try:
            resp = orch.search(q.text, context=dict(ctx), size=size, total_budget=c.total_budget)
        except OrchestratorError as exc:
            logger.warning("round %d policy %s: search failed: %s", t, name, exc)
            return RoundRecord(t, name, q.qtype, q.noise, q.text, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                               [], [], {}, 1.0, 0, 0, 0.0, 0.0, failed=1, error=str(exc)[:200],
                               **extra), []
        ids = [it.id for it in resp.results]
        shown = ids[: c.display]
        union = set(ids)
        rng = np.random.default_rng([c.seed, t, click_seed])
        actions = list(self.click_model.interact(shown, q.relevant, rng))
        for item, action in actions if feedback else ():
            try:
                _feedback(orch, resp, item, action)
            except OrchestratorError as exc:
                logger.warning("feedback failed (%s %s): %s", item, action, exc)
        clicked_ids = [i for i, a in actions if a == "click"]
        failed_arms = {f.template_id for f in resp.failures}
        arms = [ch.template_id for ch in resp.decision.choices]
        eligible = sorted(resp.decision.propensities)
        # Every selector logs the probability of the subset it chose (exact for the uniform,
        # epsilon-greedy and fixed ones; Monte Carlo over the posterior draws for Thompson).
        p_subset = float(resp.decision.subset_propensity)
        return RoundRecord(
            t=t, policy=name, qtype=q.qtype, noise=q.noise, query=q.text,
            ndcg=ndcg_at_k(shown, q.relevant, c.display),
            success=success_at_k(shown, q.relevant, c.display),
            mrr=reciprocal_rank(shown, q.relevant, c.display),
            cand_recall=candidate_recall(union, q.relevant), cand_hit=candidate_hit(union, q.relevant),
            clicked=float(any(a == "click" for _, a in actions)),
            played=float(any(a == "play" for _, a in actions)),
            arms=arms, eligible=eligible,
            propensities={k: round(v, 4) for k, v in resp.decision.propensities.items()},
            subset_propensity=p_subset, n_candidates=len(ids),
            fetched=sum(len(it.provenance) for it in resp.results),
            latency_ms=float(resp.timings_ms.get("total", 0.0)),
            es_ms=float(resp.timings_ms.get("es", 0.0)),
            failed=len(failed_arms),
            subset_propensity_indep=independent_subset_propensity(resp.decision.propensities, arms),
            rescorer_version=orch.rescorer_version,
            new_shown=[i for i in shown if i in held_out],
            new_clicked=[i for i in clicked_ids if i in held_out], **extra,
        ), actions

    def cleanup(self) -> int:
        """Delete every Redis key, events index and temporary model folder of this run.
        Returns how many Redis keys."""
        n = 0
        for key in self.redis.scan_iter(match=f"{self.config.prefix_root}{self.run_id}:*", count=1000):
            n += int(self.redis.delete(key))
        if self.retrain_settings:
            pattern = f"{self.events_alias('')}*"
            self.es.indices.delete(index=pattern, ignore_unavailable=True, allow_no_indices=True)
        if self.memory_clones:
            self.es.indices.delete(index=f"ltrr-sim-{self.run_id}-memory-*".lower(),
                                   ignore_unavailable=True, allow_no_indices=True)
        if self.release is not None:
            release_cleanup(self.es, self.run_id)
        if not self.config.model_dir:
            for path in self.model_dirs:
                shutil.rmtree(path, ignore_errors=True)
        logger.info("deleted %d simulation keys of run %s", n, self.run_id)
        return n
