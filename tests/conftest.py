"""The one conftest: settings, live-service fixtures and a real catalog slice.

Live fixtures connect to the services started by ``scripts/services up``. Outside CI they
skip when a service is down; with ``CI=true`` or ``LTRR_REQUIRE_SERVICES=1`` they fail, so a
CI run can never pass by skipping its integration tests.
"""

from __future__ import annotations

import os
import uuid

import pytest

from orchestrator.settings import OrchestratorSettings

REQUIRE = os.environ.get("CI") == "true" or os.environ.get("LTRR_REQUIRE_SERVICES") == "1"

#: Genres of the real catalog slice indexed for integration tests (~83k entities with albums
#: and artists: pop, rock, hip-hop, jazz ...; since catalog genres come from the track sources only, playlist-only tracks carry no genre and are not in it).
SLICE_GENRES = frozenset({
    "pop", "country", "jazz", "rock", "hip-hop", "dance", "latin", "r&b", "rap", "edm",
    "classical", "metal", "soul", "blues", "indie",
})
SLICE_ALIAS = "test-ltrr-catalog"


def _unavailable(what: str, exc: Exception) -> None:
    msg = f"{what} is not reachable ({exc}); run: scripts/services up"
    if REQUIRE:
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def settings() -> OrchestratorSettings:
    return OrchestratorSettings()


@pytest.fixture(scope="session")
def es(settings):
    from orchestrator.errors import ServiceUnavailableError
    from orchestrator.es_client import build_client, check_available

    client = build_client(settings.es)
    try:
        check_available(client, settings.es.url)
    except ServiceUnavailableError as exc:
        _unavailable("Elasticsearch", exc)
    return client


@pytest.fixture(scope="session")
def redis_client(settings):
    from orchestrator.errors import ServiceUnavailableError
    from orchestrator.redis_client import build_redis, check_available

    client = build_redis(settings.redis)
    try:
        check_available(client, settings.redis.url)
    except ServiceUnavailableError as exc:
        _unavailable("Redis", exc)
    return client


@pytest.fixture()
def redis_prefix(redis_client):
    """A unique key prefix; every key under it is deleted after the test."""
    prefix = f"test:{uuid.uuid4().hex[:8]}:"
    yield prefix
    for key in redis_client.scan_iter(match=prefix + "*", count=1000):
        redis_client.delete(key)


@pytest.fixture(scope="session")
def catalog_slice(es, settings):
    """A real slice of the catalog (tracks of SLICE_GENRES, their albums and artists, with
    embeddings) behind the alias ``test-ltrr-catalog``. Indexed once and reused across runs
    while its build parameters are unchanged (the index records them in its _meta)."""
    import fcntl

    fingerprint = f"genres={sorted(SLICE_GENRES)};dims={settings.embedding.dim};v4"
    # Several pytest processes may want the slice at once: build it once, under a file lock.
    with open("/tmp/ltrr-test-slice.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        alias = _ensure_slice(es, settings, fingerprint)
        _ensure_slice_memory(es, settings, fingerprint)
        return alias


#: The memory index of the slice (``<catalog alias>-memory``, what the memory arm searches):
#: its predicted pairs, read-only for tests (a test that learns uses its own memory alias).
SLICE_MEMORY_ALIAS = f"{SLICE_ALIAS}-memory"


def _ensure_slice_memory(es, settings, fingerprint: str) -> str:
    """Seed the slice's memory index from its q2e pairs, once per slice build (the memory
    index records the physical slice index it was seeded from)."""
    from orchestrator.memory import seed_memory

    catalog = sorted(es.indices.get_alias(name=SLICE_ALIAS).body)[0]
    wanted = f"{fingerprint};memory=v1;catalog={catalog}"
    if es.indices.exists_alias(name=SLICE_MEMORY_ALIAS):
        meta = next(iter(es.indices.get_mapping(index=SLICE_MEMORY_ALIAS).body.values()))
        if meta["mappings"].get("_meta", {}).get("fingerprint") == wanted:
            return SLICE_MEMORY_ALIAS
    res = seed_memory(es, catalog=catalog, memory_alias=SLICE_MEMORY_ALIAS, keep_old_indices=0,
                      prior_strength=settings.memory.prior_strength,
                      min_score=settings.memory.min_score,
                      mappings_dir=settings.ingest.mappings_dir)
    es.indices.put_mapping(index=res["index"], meta={"schema": "memory", "version": 1,
                                                     "fingerprint": wanted})
    return SLICE_MEMORY_ALIAS


def _ensure_slice(es, settings, fingerprint: str) -> str:
    from orchestrator.catalog import CatalogBuilder
    from orchestrator.embeddings import get_encoder
    from orchestrator.ingest import CatalogIndexer

    if es.indices.exists_alias(name=SLICE_ALIAS):
        meta = next(iter(es.indices.get_mapping(index=SLICE_ALIAS).body.values()))
        if meta["mappings"].get("_meta", {}).get("fingerprint") == fingerprint and os.environ.get(
            "LTRR_REINDEX_SLICE"
        ) != "1":
            return SLICE_ALIAS
    indexer = CatalogIndexer(
        es, alias=SLICE_ALIAS, mappings_dir=settings.ingest.mappings_dir,
        encoder=get_encoder(settings.embedding), keep_old_indices=0,
        chunk_size=settings.ingest.chunk_size, thread_count=settings.ingest.thread_count,
    )
    summary = indexer.run(CatalogBuilder(settings.ingest.data_dir, genres=set(SLICE_GENRES)),
                          progress=False)
    es.indices.put_mapping(index=summary.index, meta={"schema": "catalog", "version": 1,
                                                      "fingerprint": fingerprint})
    return SLICE_ALIAS


@pytest.fixture()
def test_alias(es):
    """A unique ``test-*`` alias name; its indices are deleted after the test."""
    alias = f"test-{uuid.uuid4().hex[:8]}"
    yield alias
    es.indices.delete(index=f"{alias}*", ignore_unavailable=True, allow_no_indices=True)


@pytest.fixture()
def fixed_plan_orchestrator(es, redis_client, redis_prefix, settings):
    """``make(plan, catalog=..., memory_alias=...)``: a live orchestrator that runs exactly the
    arms of ``plan`` (arm -> budget; local templates, no QU) under the test's Redis prefix."""
    from orchestrator import Orchestrator
    from orchestrator.selection import FixedPlanSelector
    from orchestrator.templates import TemplateRegistry

    def make(plan: dict[str, int], *, catalog: str, memory_alias: str) -> Orchestrator:
        s = settings.model_copy(update={
            "redis": settings.redis.model_copy(update={"key_prefix": redis_prefix}),
            "es": settings.es.model_copy(update={"catalog_alias": catalog}),
            "templates": settings.templates.model_copy(update={"mode": "local"}),
            "memory": settings.memory.model_copy(update={"alias": memory_alias}),
        })
        full = TemplateRegistry.from_dir(settings.templates.dir)
        registry = TemplateRegistry({t.id: t for t in full if t.arm in plan})
        return Orchestrator.from_settings(s, es=es, redis=redis_client, understander=None,
                                          registry=registry, selector=FixedPlanSelector(plan))

    return make
