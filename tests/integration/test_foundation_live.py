"""Foundation against the live node and Redis: capabilities, ingestion, alias swap, search,
clear errors when a service is down, and the compose file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from orchestrator.arms import base_params, build_request
from orchestrator.catalog import CatalogBuilder
from orchestrator.errors import IngestError, ServiceUnavailableError
from orchestrator.es_client import build_client, check_available, node_capabilities
from orchestrator.execution import MultiSearch
from orchestrator.ingest import CatalogIndexer
from orchestrator.settings import PROJECT_ROOT, EsSettings, RedisSettings
from orchestrator.templates import TemplateRegistry

pytestmark = pytest.mark.elasticsearch


def _indexer(es, settings, alias, *, keep_old=1, encoder=None):
    return CatalogIndexer(es, alias=alias, mappings_dir=settings.ingest.mappings_dir,
                          encoder=encoder, keep_old_indices=keep_old, chunk_size=200)


def test_node_capabilities_come_from_the_node(es):
    caps = node_capabilities(es)
    assert caps.version.startswith("9.")
    assert "x-pack-core" in caps.modules or caps.modules, "modules list is read from _nodes/plugins"
    assert caps.stored_templates == ("lang-mustache" in caps.modules)


def test_ingest_slice_alias_swap_and_rerun(es, settings, test_alias):
    from orchestrator.embeddings import get_encoder

    enc = get_encoder(settings.embedding)
    first = _indexer(es, settings, test_alias, keep_old=0, encoder=enc).run(
        CatalogBuilder(settings.ingest.data_dir, limit=300), progress=False)
    assert first.indexed == sum(first.build_report["entities"].values()) > 300
    assert not first.failed
    assert list(es.indices.get_alias(name=test_alias).body) == [first.index]
    assert es.count(index=test_alias)["count"] == first.indexed
    doc = es.search(index=test_alias, size=1, query={"term": {"entity_type": "track"}},
                    source_includes=["embedding", "q2e"])["hits"]["hits"][0]["_source"]
    assert len(doc["embedding"]) == settings.embedding.dim and doc["q2e"]

    # Re-running is safe: a new index, the alias moves atomically, the old one is pruned.
    second = _indexer(es, settings, test_alias, keep_old=0, encoder=enc).run(
        CatalogBuilder(settings.ingest.data_dir, limit=300), progress=False)
    assert second.index != first.index and second.swapped_from == [first.index]
    assert second.deleted == [first.index]
    assert list(es.indices.get_alias(name=test_alias).body) == [second.index]
    assert es.count(index=test_alias)["count"] == first.indexed


class _BadBuilder(CatalogBuilder):
    """Yields documents the strict mapping rejects (an unknown field)."""

    def build(self):
        for i in range(20):
            yield {"entity_type": "track", "entity_id": f"bad{i}", "title": "x", "no_such_field": 1}


def test_failed_ingest_leaves_alias_unchanged(es, settings, test_alias):
    good = _indexer(es, settings, test_alias).run(
        CatalogBuilder(settings.ingest.data_dir, limit=50), progress=False)
    with pytest.raises(IngestError, match="left unchanged"):
        _indexer(es, settings, test_alias).run(_BadBuilder(settings.ingest.data_dir), progress=False)
    assert list(es.indices.get_alias(name=test_alias).body) == [good.index]
    assert not [i for i in es.indices.get(index=f"{test_alias}*").body if i != good.index]


def test_known_title_finds_that_track_first(es, settings, catalog_slice):
    reg = TemplateRegistry.from_dir(settings.templates.dir)
    ms = MultiSearch(es, index=catalog_slice, registry=reg)
    queries = {
        "shape of you ed sheeran": ("Shape of You", "Ed Sheeran"),
        "bohemian rhapsody queen": ("Bohemian Rhapsody", "Queen"),
        # Accent folding: "beyonce" finds Beyoncé (her "Halo" is not in the slice since genres
        # come from the track sources only, not from the playlists that hold it).
        "beyonce cuff it": ("CUFF IT", "Beyoncé"),
    }
    reqs = [build_request(reg.get("lexical"), base_params(q, size=5)) for q in queries]
    results = ms.execute(reqs)
    for (q, (title, artist)), res in zip(queries.items(), results):
        assert res.ok, res
        top = res.hits[0].source
        assert top["title"].lower().startswith(title.lower()), (q, top["title"])
        assert artist in top["artist"], (q, top["artist"])


def test_failing_arm_is_an_arm_failure_not_a_failed_search(es, settings, catalog_slice, tmp_path):
    (tmp_path / "broken.v1.mustache").write_text(
        '{"size": {{size}}, "query": {"range": {"title": {"gte": "{{query}}", "format": "nope"}}}}')
    (tmp_path / "broken.v1.json").write_text(
        '{"description": "x", "params": {"query": {"type": "string"}, "size": {"type": "integer"}}}')
    for f in settings.templates.dir.glob("lexical.v1.*"):
        shutil.copy(f, tmp_path)
    reg = TemplateRegistry.from_dir(tmp_path)
    ms = MultiSearch(es, index=catalog_slice, registry=reg)
    p = base_params("halo", size=3)
    res = ms.execute([build_request(reg.get("broken"), p), build_request(reg.get("lexical"), p)])
    assert not res[0].ok and res[0].status == 400 and res[0].reason
    assert res[1].ok and res[1].hits


def test_stored_templates_render_like_local(es, settings):
    caps = node_capabilities(es)
    if not caps.stored_templates:
        pytest.skip(f"node has no lang-mustache module (modules: {sorted(caps.modules)}); "
                    "the stored-template path runs on full clusters only")
    from orchestrator.templates import push_templates

    reg = TemplateRegistry.from_dir(settings.templates.dir)
    push_templates(es, reg)
    assert set(push_templates(es, reg).values()) == {"unchanged"}
    for t in reg.by_id.values():
        params = t.validate_params(build_request(t, base_params('halo "}}', size=5)).params)
        remote = es.render_search_template(id=t.id, params=params)["template_output"]
        assert remote == t.render(params)


def test_es_down_is_a_clear_error():
    client = build_client(EsSettings(url="http://127.0.0.1:1"))
    with pytest.raises(ServiceUnavailableError, match="scripts/services up"):
        check_available(client, "http://127.0.0.1:1")


@pytest.mark.redis
def test_redis_has_aof_on(redis_client):
    assert redis_client.config_get("appendonly")["appendonly"] == "yes"


def test_redis_down_is_a_clear_error():
    from orchestrator.redis_client import build_redis
    from orchestrator.redis_client import check_available as redis_check

    with pytest.raises(ServiceUnavailableError, match="Redis is not reachable"):
        redis_check(build_redis(RedisSettings(url="redis://127.0.0.1:1/0", socket_timeout_s=1)),
                    "redis://127.0.0.1:1/0")


@pytest.mark.parametrize("var", ["LTRR_ES__URL", "LTRR_REDIS__URL"])
def test_cli_service_down_is_one_line_not_a_traceback(var):
    env = dict(os.environ, **{var: "http://127.0.0.1:1" if "ES" in var else "redis://127.0.0.1:1/0"})
    cmd = [sys.executable, "-m", "orchestrator.cli", "search", "halo"]
    if "REDIS" in var:
        cmd = [sys.executable, "-m", "orchestrator.cli", "check"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "scripts/services up" in lines[0], proc.stderr


def test_compose_file_is_valid():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode:
        pytest.skip("the docker compose CLI plugin is not installed (scripts/install builds it)")
    proc = subprocess.run(
        [docker, "compose", "-f", str(PROJECT_ROOT / "docker" / "compose.yaml"), "config", "--quiet"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = subprocess.run(
        [docker, "compose", "-f", str(PROJECT_ROOT / "docker" / "compose.yaml"), "config", "--services"],
        capture_output=True, text=True, timeout=60).stdout.split()
    assert {"elasticsearch", "redis", "api", "worker", "beat"} <= set(out)
