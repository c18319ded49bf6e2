"""The one typed settings object: the only way configuration enters the orchestrator.

Sources, highest priority first: constructor arguments, environment variables with the
``LTRR_`` prefix (nested with ``__``, e.g. ``LTRR_ES__URL``), the TOML file named by
``LTRR_CONFIG`` (or ``./ltrr.toml`` when present), then the defaults below. Components get
only their own slice (``settings.es``, ``settings.redis`` ...), never the whole object.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

#: Root of the project checkout (the folder holding ``query_templates/``, ``mappings/``...).
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class EsSettings(BaseModel):
    url: str = "http://127.0.0.1:9200"
    api_key: str | None = None
    username: str | None = None
    password: str | None = None
    verify_certs: bool = True
    request_timeout_s: float = 30.0
    #: Aliases the application reads; the physical indices behind them are versioned.
    catalog_alias: str = "ltrr-catalog"
    events_alias: str = "ltrr-events"


class RedisSettings(BaseModel):
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "ltrr:"
    socket_timeout_s: float = 5.0


class EmbeddingSettings(BaseModel):
    #: ``wordllama`` ships its weights inside the wheel; ``minilm`` needs the ``minilm`` extra.
    backend: Literal["wordllama", "minilm"] = "wordllama"
    dim: int = Field(256, ge=64, le=1024)
    batch_size: int = Field(2048, ge=1)


class TemplateSettings(BaseModel):
    dir: Path = PROJECT_ROOT / "query_templates"
    #: ``local``: render mustache here and send ``_msearch``; ``stored``: ``_msearch/template``
    #: with templates pushed by ``ltrr templates push``; ``auto``: stored when the node has
    #: ``lang-mustache``, local otherwise.
    mode: Literal["auto", "local", "stored"] = "auto"


class IngestSettings(BaseModel):
    data_dir: Path = PROJECT_ROOT.parent / "shared" / "data" / "music"
    mappings_dir: Path = PROJECT_ROOT / "mappings"
    chunk_size: int = Field(500, ge=1)
    thread_count: int = Field(2, ge=1)
    #: Keep this many older catalog indices after an alias swap (rollback), delete the rest.
    keep_old_indices: int = Field(1, ge=0)


class LimitsSettings(BaseModel):
    max_query_chars: int = Field(256, ge=1)
    max_results: int = Field(200, ge=1)
    max_param_bytes: int = Field(16_384, ge=256)


class BanditSettings(BaseModel):
    """The arm selector (see :mod:`orchestrator.selection`)."""

    #: linear: Bayesian linear Thompson sampling over context features (default);
    #: simple: Beta-Bernoulli per arm and context bucket; uniform / fixed: baselines.
    policy: Literal["linear", "simple", "uniform", "fixed"] = "linear"
    total_budget: int = Field(60, ge=1, le=1000)
    min_arms: int = Field(1, ge=1)
    max_arms: int = Field(3, ge=1)
    #: Subset rule: an arm beyond the top ``min_arms`` runs when its sampled expected net
    #: marginal reward per search is at least this (see ``orchestrator.selection``).
    threshold: float = 0.2
    min_budget: int = Field(10, ge=1)
    n_resamples: int = Field(200, ge=1)
    #: learned: each arm picks a candidate level by Thompson sampling (orchestrator.budgets);
    #: proportional: total split by the sampled arm values; equal: split equally (ablation).
    budget_mode: Literal["learned", "proportional", "equal"] = "learned"
    budget_levels: tuple[int, ...] = (10, 20, 40)
    #: Level rule ``argmax_l p_l - budget_cost_per_candidate * l``.
    budget_cost_per_candidate: float = Field(0.002, ge=0)
    #: Share of searches whose arm subset is drawn uniformly at random instead of by Thompson
    #: sampling (logged propensities are the mixture's): gives off-policy evaluation support
    #: for plans the posterior rarely picks, at the cost of those searches' quality.
    uniform_share: float = Field(0.0, ge=0, le=1)
    #: Hashed context slots for the open vocabularies (``orchestrator.featurizer``); a change
    #: changes the state's dimension: run ``ltrr migrate-posteriors``.
    hash_dim: int = Field(64, ge=1)
    exploration: float = Field(0.5, gt=0)
    ridge: float = Field(1.0, gt=0)
    prior_mean: float = 0.5
    refresh_interval_s: float = Field(1.0, ge=0)
    seed: int | None = None
    bucket_keys: tuple[str, ...] = ("intent", "daypart")
    #: Half-life of the time decay when posteriors are rebuilt from the log (None: no decay).
    rebuild_half_life_days: float | None = Field(14.0, gt=0)


class FeedbackSettings(BaseModel):
    impression_ttl_s: int = Field(7 * 24 * 3600, ge=60)
    stream_maxlen: int = Field(200_000, ge=1000)
    #: Position-bias correction of the reward *value* (never the weight): ``log2`` /
    #: ``examination`` divide by the examination model's theta_k (prior 1 / log2(k + 1));
    #: ``none``: no correction.
    position_bias: Literal["log2", "examination", "none"] = "log2"
    #: Unused since rewards carry position correction in their value (see ``reward.max_reward``);
    #: kept so existing configuration files still load.
    max_weight: float = Field(3.0, ge=1.0)


class RewardSettings(BaseModel):
    """The bandit's learning signal (see :mod:`orchestrator.rewards`)."""

    #: Reward charged per millisecond of an arm's Elasticsearch ``took`` (its time-out when it
    #: timed out): latency is part of the objective.
    latency_cost_per_ms: float = Field(0.0002, ge=0)
    #: Reward of a chosen arm that failed or timed out (before its latency cost).
    failure_reward: float = 0.0
    #: Cap of the position-corrected value ``action_value / theta_k``.
    max_reward: float = Field(3.0, ge=1.0)
    #: shapley: an item held by m executed arms gives each 1/m; full: each gets 1 (ablation).
    credit: Literal["shapley", "full"] = "shapley"


class RescorerSettings(BaseModel):
    #: Folder of versioned ``rescorer.v<N>.json`` models (shared by API and workers).
    model_dir: Path | None = PROJECT_ROOT / "models" / "rescorer"
    #: How often (at most) a running orchestrator looks for a newly promoted model.
    reload_interval_s: float = Field(30.0, ge=0)
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    min_examples: int = Field(20, ge=1)
    min_holdout: int = Field(5, ge=1)
    min_improvement: float = Field(0.0, ge=0)
    #: Cap of the inverse-propensity weight ``1 / theta_k`` of a click in training and in the
    #: held-out metric (1: no position-bias correction). See :mod:`orchestrator.rescoring`.
    ips_cap: float = Field(10.0, ge=1.0)
    #: Log a ``<feature>|browse`` copy of every ranking feature, live on browse / topical /
    #: broad queries only, so a trained ranker can weigh the arms differently for them than
    #: for lookups (:class:`orchestrator.rescoring.FeatureExtractor`). Measured +0.019
    #: held-out IPS-nDCG@10 over the plain features (p = 0.004; an earlier log +0.014,
    #: p = 0.06), mostly on lookups (``benchmarks/ranker_features.py``).
    intent_split: bool = True


class ExaminationSettings(BaseModel):
    """The examination (position-bias) model, estimated from randomised swaps
    (see :mod:`orchestrator.examination`)."""

    #: Probability that a search swaps its top result with a uniformly random position in
    #: 2..max_position (0: no intervention, the estimate stays the prior).
    swap_rate: float = Field(0.05, ge=0, le=1)
    #: Deepest position a swap reaches, and the number of estimated positions.
    max_position: int = Field(20, ge=2, le=200)
    #: Pseudo-impressions of the prior (1 / log2(k + 1)) per position: sparse positions stay
    #: near it.
    prior_strength: float = Field(50.0, ge=0)
    #: How often (at most) a running process re-reads the stored model from Redis.
    refresh_interval_s: float = Field(60.0, ge=0)


class QuSettings(BaseModel):
    """Query understanding: where the promoted model lives, how it is retrained from clicks."""

    model_dir: Path = PROJECT_ROOT / "qu_models"
    min_support: int = Field(2, ge=1)
    seed: int = 0


class MemorySettings(BaseModel):
    """Learning the Q2E memory from user actions (see :mod:`orchestrator.memory`)."""

    #: Alias of the memory index (one document per (query_key, item) pair); None:
    #: ``<es.catalog_alias>-memory``, so a test slice or a simulation catalog has its own.
    alias: str | None = None
    #: Time decay of the repair rebuild (task ``train_memory``); the incremental updater adds.
    half_life_days: float = Field(30.0, gt=0)
    #: Stream entries per updater batch (task ``update_memory``, ``ltrr memory run``). A batch
    #: costs one ``mget`` and one bulk of the distinct pairs it touches, so bigger batches
    #: coalesce repeated pairs: ``benchmarks/learning.py`` measured 2.8k events/s at 1,000 and
    #: 5.4k at 10,000 side by side on 60k real-template events. A batch is held in memory while
    #: it is decoded (an impression entry carries its full event, about 10 KB for 10 shown items).
    batch_size: int = Field(10_000, ge=1, le=100_000)
    #: ``s`` in score = (clicks + s * prior) / (examinations + s).
    prior_strength: float = Field(2.0, gt=0)
    #: Prior of pairs never predicted (first created by a click).
    default_prior: float = Field(0.0, ge=0, le=1)
    #: Pairs scoring below this do not match (``active: false``); the rebuild deletes learned
    #: ones. A change applies to pairs as they are next written (run ``ltrr memory repair``).
    min_score: float = Field(0.05, ge=0)
    #: Examinations a skip adds (the user certainly looked at the item).
    skip_weight: float = Field(1.0, ge=0)
    #: Exposures of pairs not in the index wait in a Redis hash per query key, this long
    #: (refreshed on write) and at most this many items per key, for the pair's first click.
    exposure_ttl_s: int = Field(7 * 24 * 3600, ge=60)
    max_pending_items: int = Field(500, ge=1)
    #: At a pair's first click, this many neighbours of the clicked item (its artist's other
    #: entities, or genre neighbours: :mod:`orchestrator.neighbours`) become pairs of the same
    #: query key (``source: neighbour``), so the memory can propose what no static arm finds;
    #: 0: none.
    neighbours_per_click: int = Field(5, ge=0, le=100)
    neighbours_by: Literal["artist", "genre", "both"] = "artist"
    #: Prior of the best neighbour; the n-th gets ``neighbour_prior * neighbour_decay ** n``.
    #: Keep it under what one click gives a pair, so neighbours never outrank clicked items.
    neighbour_prior: float = Field(0.2, ge=0, le=1)
    neighbour_decay: float = Field(0.85, gt=0, le=1)
    #: Only query keys with at least this many learned pairs get neighbours (users clicked
    #: different items: a broad query); a known-item lookup, where everyone clicks the same
    #: item, gets none.
    neighbours_min_pairs: int = Field(2, ge=1)
    #: Query chains (:mod:`orchestrator.chains`): a positive action on a search also credits
    #: its item, with ``chain_weight`` of a click (and as many examinations), to the same
    #: session's earlier searches of other queries within ``chain_window_s`` that had no
    #: positive action. The session is the context's ``session_id``, else its ``user_id``.
    #: ``chain_window_s = 0``: off (nothing recorded per search).
    chain_window_s: float = Field(300.0, ge=0, le=24 * 3600)
    chain_weight: float = Field(0.5, ge=0, le=1)
    chain_max_searches: int = Field(4, ge=2, le=20)


class SecuritySettings(BaseModel):
    """Abuse resistance of the HTTP API (see :mod:`orchestrator.security`)."""

    #: HMAC key of request tokens. Unset: one random secret is generated and shared by every
    #: replica through Redis (``<prefix>token_secret``, SET NX), cached in memory after first read.
    token_secret: SecretStr | None = None
    #: How long a search's token can be used for feedback (capped by the impression TTL in effect).
    token_ttl_s: int = Field(7 * 24 * 3600, ge=1)
    #: HTTP ``/feedback`` refuses bodies without the ``token`` of the search (403).
    require_token: bool = True
    #: ``{sha256 hex of an API key: client name}``; header ``X-API-Key``. Empty: the API is open
    #: and the client id is the remote address. Hash a key with
    #: ``python -m orchestrator.security hash-key KEY`` (the key itself is never stored).
    api_keys: dict[str, str] = Field(default_factory=dict)
    #: Without API keys, take the client address from this header (first hop) instead of the
    #: socket peer, e.g. ``X-Forwarded-For`` behind a trusted reverse proxy. Never set it when
    #: clients reach the API directly: they could then pick their own client id.
    client_ip_header: str | None = None
    #: Requests per client per ``rate_window_s`` (0: unlimited). 429 with Retry-After beyond.
    feedback_rate_limit: int = Field(600, ge=0)
    search_rate_limit: int = Field(0, ge=0)
    rate_window_s: int = Field(60, ge=1)
    #: Cumulative observation weight one client may add to one arm per ``influence_window_s``
    #: (0: no cap). Beyond it feedback is acknowledged with ``capped: true`` and not applied.
    influence_cap: float = Field(200.0, ge=0)
    influence_window_s: int = Field(3600, ge=1)
    #: Request bodies larger than this are refused (413) before they are read.
    max_body_bytes: int = Field(1_000_000, ge=1024)


class LogSettings(BaseModel):
    """Logging of the entry points (``ltrr serve``, the Celery worker); see :mod:`orchestrator.log`."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: JSON lines (timestamp, level, logger, message, request_id, extras); False: plain text.
    json_lines: bool = True


class ResilienceSettings(BaseModel):
    """What happens when Elasticsearch or Redis fails (see :mod:`orchestrator.resilience`)."""

    #: Wall-clock bound of one search's ``_msearch`` (a time-out is not retried, so a hung node
    #: fails a search after this long) and extra attempts after a connection error.
    es_search_timeout_s: float = Field(5.0, gt=0)
    es_search_retries: int = Field(1, ge=0)
    #: Elasticsearch ``timeout`` put in every arm's body. An arm that reports ``timed_out`` or
    #: a shard failure is dropped from the request (no merge, no reward, no blame).
    arm_timeout: str = "500ms"
    #: Circuit breaker of searches: after this many consecutive connection failures, searches
    #: fail at once (503) for ``es_reset_timeout_s``, then one probe is let through.
    es_failure_threshold: int = Field(3, ge=1)
    es_reset_timeout_s: float = Field(5.0, ge=0)
    #: > 0: keep the last good response of this many (normalized query, size) pairs and serve
    #: it, marked degraded, while Elasticsearch is unavailable (0: fail with 503).
    fallback_cache_size: int = Field(0, ge=0)
    fallback_max_age_s: float = Field(600.0, gt=0)
    #: Durable spool of Redis writes (impressions, feedback) made while Redis is down.
    spool_dir: Path = Path.home() / ".local" / "state" / "ltrr" / "spool"
    #: After a Redis failure, writes go straight to the spool this long before Redis is tried
    #: again; the replay thread retries at this interval too.
    redis_retry_s: float = Field(1.0, gt=0)
    #: Impressions kept in memory so feedback can be joined while Redis is unreachable.
    impression_cache_size: int = Field(5000, ge=0)


class CelerySettings(BaseModel):
    #: Broker and result backend; default to the Redis of ``redis.url`` (db 1 and 2).
    broker_url: str | None = None
    result_backend: str | None = None
    #: Beat schedule, seconds between runs of each job.
    move_events_every_s: float = Field(60.0, gt=0)
    retrain_every_s: float = Field(3600.0, gt=0)
    #: The memory updater (task ``update_memory``): new events retrievable within seconds.
    update_memory_every_s: float = Field(2.0, gt=0)
    #: Pending stream entries idle this long are taken over from a worker presumed dead.
    claim_idle_ms: int = Field(60_000, ge=0)
    event_batch_size: int = Field(1000, ge=1)


class OrchestratorSettings(BaseSettings):
    """All configuration. See ``ltrr.example.toml`` for a commented reference."""

    model_config = SettingsConfigDict(
        env_prefix="LTRR_", env_nested_delimiter="__", extra="ignore", frozen=True
    )

    es: EsSettings = EsSettings()
    redis: RedisSettings = RedisSettings()
    embedding: EmbeddingSettings = EmbeddingSettings()
    templates: TemplateSettings = TemplateSettings()
    ingest: IngestSettings = IngestSettings()
    limits: LimitsSettings = LimitsSettings()
    celery: CelerySettings = CelerySettings()
    bandit: BanditSettings = BanditSettings()
    feedback: FeedbackSettings = FeedbackSettings()
    reward: RewardSettings = RewardSettings()
    rescorer: RescorerSettings = RescorerSettings()
    examination: ExaminationSettings = ExaminationSettings()
    memory: MemorySettings = MemorySettings()
    qu: QuSettings = QuSettings()
    security: SecuritySettings = SecuritySettings()
    resilience: ResilienceSettings = ResilienceSettings()
    log: LogSettings = LogSettings()

    def celery_urls(self) -> tuple[str, str]:
        """Broker and result-backend URLs (Redis db 1 and 2 of ``redis.url`` by default)."""
        base = self.redis.url.rsplit("/", 1)[0] if self.redis.url.count("/") > 2 else self.redis.url
        return (self.celery.broker_url or f"{base}/1", self.celery.result_backend or f"{base}/2")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = os.environ.get("LTRR_CONFIG") or "ltrr.toml"
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if Path(toml_file).is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        elif os.environ.get("LTRR_CONFIG"):
            from .errors import ConfigurationError

            raise ConfigurationError(f"LTRR_CONFIG points at {toml_file!r}, which does not exist")
        return tuple(sources)
