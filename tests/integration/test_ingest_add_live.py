"""Incremental ingestion against the live node: a slice built without the newest releases,
then those releases added with :func:`orchestrator.ingest.add_entities` (no rebuild):
present, searchable by title, their predicted memory pairs written."""

from __future__ import annotations

import pytest

from orchestrator.catalog import CatalogBuilder, doc_id, hold_out_newest
from orchestrator.ingest import CatalogIndexer, add_entities

pytestmark = pytest.mark.elasticsearch

GENRES = {"jazz"}


def _present(es, alias: str, ids: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(ids), 1000):
        res = es.mget(index=alias, ids=ids[start:start + 1000], source=False)
        found |= {d["_id"] for d in res["docs"] if d.get("found")}
    return found


def test_build_without_hold_out_then_add(es, settings, test_alias):
    from orchestrator.embeddings import get_encoder

    data = settings.ingest.data_dir
    held = hold_out_newest(data, 0.02)
    memory = f"{test_alias}-memory"
    enc = get_encoder(settings.embedding)
    summary = CatalogIndexer(
        es, alias=test_alias, mappings_dir=settings.ingest.mappings_dir, encoder=enc,
        keep_old_indices=0, chunk_size=500, memory_alias=memory,
        memory={"prior_strength": settings.memory.prior_strength,
                "min_score": settings.memory.min_score},
    ).run(CatalogBuilder(data, genres=GENRES, exclude=held.ids), progress=False)
    assert summary.indexed and not summary.failed
    before = es.count(index=test_alias)["count"]

    # What the add will write: the held-out tracks of the slice and their (complete) groups.
    to_add = list(CatalogBuilder(data, genres=GENRES, only=held.ids).build())
    add_ids = [doc_id(d) for d in to_add]
    new_tracks = [i for i in add_ids if i in held.track_ids]
    new_groups = [i for i in add_ids if i in held.album_ids or i in held.artist_ids]
    assert new_tracks and new_groups
    assert not _present(es, test_alias, [i for i in add_ids if i in held.ids])
    # New to this slice: the held-out ids, plus artists whose slice tracks are all held out
    # (they have older tracks outside the slice's genres).
    absent = set(add_ids) - _present(es, test_alias, add_ids)
    assert {i for i in add_ids if i in held.ids} <= absent

    res = add_entities(es, settings, to_add, alias=test_alias, memory_alias=memory)
    assert res["indexed"] == len(to_add) and not res["failed"]
    assert res["index"] == summary.index  # written in place: no new index, no alias swap
    assert list(es.indices.get_alias(name=test_alias).body) == [summary.index]
    assert _present(es, test_alias, add_ids) == set(add_ids)
    new_count = len(absent)
    assert es.count(index=test_alias)["count"] == before + new_count
    assert res["replaced"] == len(add_ids) - new_count

    # Embedded like a full build, and findable by title.
    track = next(d for d in to_add if doc_id(d) in held.track_ids)
    src = es.search(index=test_alias, size=1, query={"ids": {"values": [doc_id(track)]}},
                    source_includes=["embedding", "indexed_at"])["hits"]["hits"][0]["_source"]
    assert len(src["embedding"]) == settings.embedding.dim and src["indexed_at"]
    hits = es.search(index=test_alias, size=50, query={"bool": {
        "must": {"match": {"title": {"query": track["title"], "operator": "and"}}},
        "filter": {"term": {"entity_type": "track"}}}})["hits"]["hits"]
    assert doc_id(track) in [h["_id"] for h in hits]

    # Their predicted memory pairs exist (cold start) and are active.
    assert res["pairs"] > 0
    for eid in new_tracks[:20] + new_groups[:20]:
        n = es.count(index=memory, query={"bool": {"filter": [
            {"term": {"item_id": eid}}, {"term": {"source": "predicted"}}]}})["count"]
        assert n > 0, eid
    qk = track["q2e"][0]["query_key"]
    assert es.count(index=memory, query={"bool": {"filter": [
        {"term": {"item_id": doc_id(track)}}, {"term": {"query_key": qk}}]}})["count"] == 1

    # Adding again is idempotent: same docs replaced, memory pairs left as they are.
    again = add_entities(es, settings, to_add, alias=test_alias, memory_alias=memory)
    assert again["replaced"] == len(add_ids) and again["pairs"] == 0
    assert again["pairs_existing"] == res["pairs"] + res["pairs_existing"]
    assert es.count(index=test_alias)["count"] == before + new_count


def test_descriptive_arm_matches_genre_words(es, settings, test_alias):
    """The descriptive arm finds tracks by their genre words (genre_text, a copy_to field)."""
    import json

    from orchestrator.arms import build_requests
    from orchestrator.domain import ParsedQuery, Slot
    from orchestrator.templates import TemplateRegistry

    CatalogIndexer(es, alias=test_alias, mappings_dir=settings.ingest.mappings_dir, encoder=None,
                   keep_old_indices=0).run(CatalogBuilder(settings.ingest.data_dir, genres={"jazz"},
                                                          limit=300), progress=False)
    reg = TemplateRegistry.from_dir(settings.templates.dir)
    text = "smooth jazz"
    parsed = ParsedQuery(text=text, normalized=text, slots=(Slot("genre", "jazz", 0.9, 7, 11),))
    (req,) = build_requests(reg, parsed, text, budgets={"descriptive": 20}, vector=None, seed=1)
    body = json.loads(reg.get(req.template_id).render_text(req.params))
    hits = es.search(index=test_alias, body=body)["hits"]["hits"]
    assert len(hits) == 20
    assert all(h["_source"]["entity_type"] == "track" for h in hits)
    assert all(any("jazz" in g for g in h["_source"].get("genres", []) + h["_source"].get(
        "artist_genres", [])) for h in hits)
    # genre_text is filled from the keyword genres (copy_to): every jazz track matches it.
    tracks = es.count(index=test_alias, query={"term": {"entity_type": "track"}})["count"]
    by_genre_word = es.count(index=test_alias, query={"bool": {"filter": [
        {"term": {"entity_type": "track"}}, {"match": {"genre_text": "jazz"}}]}})["count"]
    assert by_genre_word == tracks > 0
    # Without a genre or mood slot the arm does not run (known-item queries).
    assert build_requests(reg, None, "so what", budgets={"descriptive": 20}, vector=None) == []
