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
the explore arm) and a seeded selector, posteriors are reloaded synchronously
(``refresh_interval_s=0``) and the rescorer is only reloaded right after a retraining, so
the same ``seed`` gives the same per-round results (up to Elasticsearch time-outs).

Retraining (``retrain_every=N``): after every ``N`` rounds the production retraining jobs
run for ``ours`` on its own click log (:mod:`orchestrator.tasks` ``run_*``): its Redis
stream is moved into a per-run events index, its bandit posteriors are rebuilt from the log
and swapped in, and the ranker is trained and promoted (production rule: only when it beats
the model in use on the newest held-out slice) into a per-run model folder that ``ours``
then reloads. The Q2E memory job is never run (it writes into the shared catalog index) and
neither is the QU job (it writes the shared QU model folder). ``ours_no_retrain`` is the
same policy with the same seeds and no retraining, so the difference between the two is the
effect of the retraining.
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
from ..domain import ArmResult
from ..errors import OrchestratorError
from ..merging import UnionMerger
from ..pipeline import Orchestrator
from ..rescoring import FeatureExtractor, LinearRescorer
from ..selection import FixedPlanSelector, UniformRandomSelector
from ..templates import TemplateRegistry
from .metrics import candidate_hit, candidate_recall, ndcg_at_k, reciprocal_rank, success_at_k
from .ope import independent_subset_propensity
from .policies import (
    EpsilonGreedySelector,
    PolicySpec,
    best_plans,
    candidate_subsets,
    rrf_rescorer,
    standard_policies,
)
from .queries import QUERY_TYPES, QuerySources, QueryStream, SimQuery
from .users import ClickModel, make_click_model

logger = logging.getLogger(__name__)

_DEVICES = ("mobile", "desktop", "tv")


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
    genres: list[str] | None = None
    keep_state: bool = False
    run_id: str = ""
    #: The command line that started the run (recorded in the report).
    command: str = ""
    #: Redis keys of the run live under ``<prefix_root><run id>:<policy>:``.
    prefix_root: str = "sim:"
    #: Run the retraining jobs for ``ours`` after every this many rounds (0: never).
    retrain_every: int = 0
    #: With retraining, also run ``ours_no_retrain`` (same seeds, no retraining).
    compare_no_retrain: bool = True
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


#: Per-arm Elasticsearch time-out in simulations (serving default: 500ms).
SIM_ARM_TIMEOUT = "5s"


def newest_arms_registry(folder: Path) -> TemplateRegistry:
    """The newest version of every arm only (what the serving pipeline's registry iterates),
    so the "each arm alone" policies compare the arms users actually get."""
    reg = TemplateRegistry.from_dir(folder)
    return TemplateRegistry({t.id: t for t in reg.by_arm.values()})


def sim_settings(settings: Any, *, prefix: str, alias: str | None, max_results: int,
                 events_alias: str | None = None, model_dir: Path | None = None,
                 display: int | None = None) -> Any:
    """``settings`` for one policy: its Redis prefix, the catalog alias, and for a retrained
    policy its own events alias, rescorer folder and no time decay of the posteriors (the
    simulation has no calendar time: a run lasts minutes, so wall-clock decay would only
    make the rebuild depend on timing)."""
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
    if display is not None and getattr(settings, "examination", None) is not None:
        # Swap interventions only within what simulated users are shown.
        update["examination"] = settings.examination.model_copy(update={"max_position": display})
    return settings.model_copy(update=update)


def seeded_request_ids(seed: Sequence[int]) -> Callable[[], str]:
    """A request-id factory drawing UUID4-shaped ids from a seeded generator."""
    rng = np.random.default_rng(list(seed))

    def make() -> str:
        return str(uuid.UUID(bytes=rng.bytes(16), version=4))

    return make


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
        self.es, self.redis = es, redis
        genres = set(config.genres) if config.genres else None
        self.sources = sources or QuerySources.load(settings.ingest.data_dir, genres=genres)
        self.registry = newest_arms_registry(settings.templates.dir)
        self.arms = sorted(t.id for t in self.registry)
        self.click_model: ClickModel = make_click_model(config.click_model, **config.click_params)
        self.stream = QueryStream(self.sources, mix=config.mix, drift_to=config.drift_to,
                                  seed=config.seed, p_typo=config.p_typo, p_partial=config.p_partial)
        self._understander = understander
        self.prefixes: list[str] = []
        self.model_dirs: list[Path] = []
        self.retrain_settings: dict[str, Any] = {}

    # -- construction --------------------------------------------------------------------
    def prefix(self, policy: str) -> str:
        safe = policy.replace(":", "_")
        return f"{self.config.prefix_root}{self.run_id}:{safe}:"

    def events_alias(self, policy: str) -> str:
        """The per-run events alias of a retrained policy (lower case, as ES requires)."""
        return f"ltrr-sim-events-{self.run_id}-{policy.replace(':', '_')}".lower()

    def _build(self, spec: PolicySpec, *, index: int, plan: Mapping[str, int] | None = None,
               suffix: str = "", retrain: bool = False) -> Orchestrator:
        c = self.config
        prefix = self.prefix(spec.name + suffix)
        self.prefixes.append(prefix)
        model_dir: Path | None = None
        if retrain:
            model_dir = self._model_dir(spec.name)
        s = sim_settings(self.settings, prefix=prefix, alias=self.alias,
                         max_results=max(spec.max_candidates(c.total_budget), c.total_budget),
                         events_alias=self.events_alias(spec.name) if retrain else None,
                         model_dir=model_dir, display=c.display)
        rescorer: LinearRescorer | None = (
            rrf_rescorer() if spec.rescorer == "rrf" else LinearRescorer.default())
        rescoring: dict[str, Any] | None = None
        if retrain:
            # Promoted models are picked up right after each retraining (reload_rescorer(
            # force=True)), never on a wall-clock timer: reproducible.
            rescorer, rescoring = None, {"model_dir": str(model_dir), "reload_interval_s": 1e12}
        seed = c.seed * 1000 + index
        bandit = {"total_budget": c.total_budget, "seed": seed, "refresh_interval_s": 0.0}
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
                                          # An arm cut short by the serving time-out would make
                                          # a round depend on machine load: give it time here.
                                          resilience={"arm_timeout": SIM_ARM_TIMEOUT},
                                          request_id_factory=seeded_request_ids((c.seed, index, 7)))
        if self._understander == "auto":
            self._understander = orch.understander
        if retrain:
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
    def retrain(self, name: str, orch: Orchestrator, *, t: int) -> dict[str, Any]:
        """Run the retraining jobs for policy ``name`` on its own log (module docstring)."""
        from ..tasks import run_move_events, run_rebuild_posteriors, run_train_ranker

        s = self.retrain_settings[name]
        out: dict[str, Any] = {"after_round": t + 1, "policy": name,
                               "rescorer_version_before": orch.rescorer_version}
        t0 = time.perf_counter()
        steps = (("move_events", run_move_events), ("rebuild_posteriors", run_rebuild_posteriors),
                 ("train_ranker", run_train_ranker))
        for step, job in steps:
            t1 = time.perf_counter()
            try:
                res = job(s, self.es, self.redis)
            except OrchestratorError as exc:
                logger.warning("retraining step %s after round %d failed: %s", step, t + 1, exc)
                res = {"error": str(exc)[:300]}
            res = {k: v for k, v in res.items() if k not in ("path",)}
            res["seconds"] = round(time.perf_counter() - t1, 2)
            out[step] = res
        out["train_memory"] = {"skipped": "the Q2E job writes into the catalog index, "
                                          "which the simulation shares"}
        out["train_qu"] = {"skipped": "the QU job writes the shared QU model folder"}
        out["reloaded"] = orch.reload_rescorer(force=True)
        out["rescorer_version"] = orch.rescorer_version
        out["seconds"] = round(time.perf_counter() - t0, 2)
        logger.info("retrained %s after round %d: ranker %s, rescorer v%s", name, t + 1,
                    out["train_ranker"].get("reason"), out["rescorer_version"])
        return out

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
        retraining = c.retrain_every > 0 and any(s.name == "ours" for s in specs)
        index_of = {s.name: i for i, s in enumerate(specs)}
        if retraining and c.compare_no_retrain:
            # Same seeds as ours (selector draws, request ids): the two differ by retraining only.
            specs.append(PolicySpec("ours_no_retrain", "ours"))
            index_of["ours_no_retrain"] = index_of["ours"]
        orchs: dict[str, Orchestrator] = {}
        for spec in specs:
            orchs[spec.name] = self._build(spec, index=index_of[spec.name],
                                           retrain=retraining and spec.name == "ours")
        retrains: list[dict[str, Any]] = []
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
        records: list[RoundRecord] = []
        t_loop = time.perf_counter()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=c.rounds, desc=f"simulate ({len(names)} policies)", unit="round")
        try:
            for t, (q, ctx) in enumerate(zip(queries, contexts)):
                for name in names:
                    orch = oracle_orchs.get(q.qtype) if name == "oracle" else orchs[name]
                    if orch is None:
                        continue
                    records.append(self._round(t, name, spec_by[name], orch, q, ctx))
                if retraining and (t + 1) % c.retrain_every == 0 and t + 1 < c.rounds:
                    retrains.append(self.retrain("ours", orchs["ours"], t=t))
                if bar is not None:
                    bar.update(1)
                if on_round is not None:
                    on_round(t)
        finally:
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
            retrains=retrains,
        )

    def _round(self, t: int, name: str, spec: PolicySpec, orch: Orchestrator, q: SimQuery,
               ctx: Mapping[str, Any]) -> RoundRecord:
        c = self.config
        size = max(spec.max_candidates(c.total_budget), c.display)
        try:
            resp = orch.search(q.text, context=dict(ctx), size=size, total_budget=c.total_budget)
        except OrchestratorError as exc:
            logger.warning("round %d policy %s: search failed: %s", t, name, exc)
            return RoundRecord(t, name, q.qtype, q.noise, q.text, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                               [], [], {}, 1.0, 0, 0, 0.0, 0.0, failed=1, error=str(exc)[:200])
        ids = [it.id for it in resp.results]
        shown = ids[: c.display]
        union = set(ids)
        rng = np.random.default_rng([c.seed, t, 31337])
        actions = self.click_model.interact(shown, q.relevant, rng)
        for item, action in actions:
            try:
                _feedback(orch, resp, item, action)
            except OrchestratorError as exc:
                logger.warning("feedback failed (%s %s): %s", item, action, exc)
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
        )

    def cleanup(self) -> int:
        """Delete every Redis key, events index and temporary model folder of this run.
        Returns how many Redis keys."""
        n = 0
        for key in self.redis.scan_iter(match=f"{self.config.prefix_root}{self.run_id}:*", count=1000):
            n += int(self.redis.delete(key))
        if self.retrain_settings:
            pattern = f"{self.events_alias('')}*"
            self.es.indices.delete(index=pattern, ignore_unavailable=True, allow_no_indices=True)
        if not self.config.model_dir:
            for path in self.model_dirs:
                shutil.rmtree(path, ignore_errors=True)
        logger.info("deleted %d simulation keys of run %s", n, self.run_id)
        return n
