"""New releases in a simulation against the live node: a clone of the catalog slice without
some of the newest releases (source untouched, writable), memory clones purged of their pairs,
then the releases ingested mid-run (:func:`orchestrator.simulation.releases.release`):
present, searchable by title, their predicted pairs in every memory clone; cleanup removes
the clone."""

from __future__ import annotations

import uuid

import pytest

from orchestrator.catalog import HoldOut, hold_out_newest, track_group_ids
from orchestrator.simulation.releases import (
    catalog_index_name,
    cleanup,
    clone_index,
    prepare_catalog,
    purge_memory,
    release,
)
from tests.conftest import SLICE_ALIAS, SLICE_GENRES, SLICE_MEMORY_ALIAS

pytestmark = pytest.mark.elasticsearch

N_TRACKS = 30


def _present(es, index: str, ids) -> set[str]:
    ids = sorted(ids)
    found: set[str] = set()
    for start in range(0, len(ids), 1000):
        res = es.mget(index=index, ids=ids[start:start + 1000], source=False)
        found |= {d["_id"] for d in res["docs"] if d.get("found")}
    return found


def _pairs(es, index: str, ids) -> int:
    es.indices.refresh(index=index)
    return es.count(index=index, query={"terms": {"item_id": sorted(ids)}})["count"]


def _blocked(es, index: str) -> bool:
    body = es.indices.get_settings(index=index, name="index.blocks.write", flat_settings=True).body
    return str(body.get(index, {}).get("settings", {}).get("index.blocks.write", "")).lower() == "true"


@pytest.fixture()
def slice_hold_out(es, settings, catalog_slice) -> HoldOut:
    """A small hold-out inside the slice: some of the newest held-out tracks present in it,
    plus their albums and artists that are new entities (all their tracks held out)."""
    held = hold_out_newest(settings.ingest.data_dir, 0.02)
    in_slice = sorted(_present(es, catalog_slice, held.track_ids))
    assert len(in_slice) >= N_TRACKS, "the slice should hold some of the newest releases"
    docs = es.mget(index=catalog_slice, ids=in_slice[:N_TRACKS],
                   source=["artist", "album"])["docs"]
    albums: set[str] = set()
    artists: set[str] = set()
    for d in docs:
        album_id, artist_ids = track_group_ids(d["_source"]["artist"], d["_source"].get("album"))
        if album_id and f"album:{album_id}" in held.album_ids:
            albums.add(f"album:{album_id}")
        artists |= {f"artist:{a}" for a in artist_ids if f"artist:{a}" in held.artist_ids}
    sub = HoldOut(track_ids=frozenset(in_slice[:N_TRACKS]), album_ids=frozenset(albums),
                  artist_ids=frozenset(artists), cutoff=held.cutoff, fraction=held.fraction)
    assert _present(es, catalog_slice, sub.ids) == sub.ids and sub.album_ids
    return sub


@pytest.fixture()
def run_id(es):
    rid = f"test{uuid.uuid4().hex[:8]}"
    yield rid
    cleanup(es, rid)


@pytest.fixture()
def memory_clones(es, catalog_slice):
    """Two clones of the slice's memory (what a run's learning policies get), deleted after."""
    base = f"test-{uuid.uuid4().hex[:8]}-memory"
    names = [f"{base}-{i}" for i in range(2)]
    try:
        for n in names:
            clone_index(es, SLICE_MEMORY_ALIAS, n, alias=f"{n}-alias")
        yield [f"{n}-alias" for n in names]
    finally:
        for n in names:
            es.indices.delete(index=n, ignore_unavailable=True)


def test_prepare_purge_release_cleanup(es, settings, catalog_slice, slice_hold_out, run_id,
                                       memory_clones):
    from orchestrator.embeddings import get_encoder

    sub = slice_hold_out
    ids = sorted(sub.ids)
    source_count = es.count(index=catalog_slice)["count"]
    source_pairs = _pairs(es, SLICE_MEMORY_ALIAS, ids)
    assert source_pairs > 0
    first, second = memory_clones

    # -- prepare: the clone lacks the hold-out; the source is untouched and writable.
    rel = prepare_catalog(es, settings, run_id=run_id, hold_out=sub, source_alias=SLICE_ALIAS,
                          memory_aliases=[first], genres=SLICE_GENRES)
    index = catalog_index_name(run_id)
    assert rel.catalog_index == index and rel.catalog_alias == f"{index}-alias"
    assert es.indices.get_alias(name=rel.catalog_alias).body[index]["aliases"][
        rel.catalog_alias]["is_write_index"] is True
    assert rel.removed["catalog_docs"] == len(ids) and rel.removed["catalog_missing"] == 0
    assert not _present(es, rel.catalog_alias, ids)
    assert es.count(index=rel.catalog_alias)["count"] == source_count - len(ids)
    assert _present(es, catalog_slice, ids) == set(ids)
    assert es.count(index=catalog_slice)["count"] == source_count
    src_index = rel.removed["source_index"]
    assert not _blocked(es, src_index) and not _blocked(es, index)
    # A write to the source succeeds (a no-op partial update: refused while write-blocked,
    # changes nothing otherwise).
    doc = es.search(index=catalog_slice, size=1, query={"match_all": {}},
                    source=["entity_type"])["hits"]["hits"][0]
    assert es.update(index=src_index, id=doc["_id"], doc=doc["_source"])["result"] == "noop"
    assert rel.docs and {d["entity_type"] for d in rel.docs} >= {"track", "album"}

    # -- purge: the memory clones know nothing of the hold-out; the source memory still does.
    assert rel.removed["memory_pairs"][first] == source_pairs
    assert _pairs(es, first, ids) == 0
    assert purge_memory(es, second, ids) == source_pairs
    assert _pairs(es, second, ids) == 0
    assert purge_memory(es, second, ids) == 0
    assert _pairs(es, SLICE_MEMORY_ALIAS, ids) == source_pairs
    rel.memory_aliases.append(second)

    # -- release: present, embedded, searchable; their pairs in every memory clone.
    res = release(es, settings, rel, encoder=get_encoder(settings.embedding))
    assert rel.released is res
    assert res["indexed"] == res["docs"] == len(rel.docs) and not res["failed"]
    assert _present(es, rel.catalog_alias, ids) == set(ids)
    hits = es.search(index=rel.catalog_alias, size=len(ids), query={"ids": {"values": ids}},
                     source_includes=["embedding", "indexed_at"])["hits"]["hits"]
    assert {h["_id"] for h in hits} == set(ids)
    assert all(len(h["_source"]["embedding"]) == settings.embedding.dim for h in hits)
    # The docs written that were not held out (groups of the new tracks) replaced their own.
    assert es.count(index=rel.catalog_alias)["count"] == source_count
    track_id = sorted(sub.track_ids)[0]
    title = es.get(index=rel.catalog_alias, id=track_id, source=["title"])["_source"]["title"]
    found = es.search(index=rel.catalog_alias, size=50, query={"bool": {
        "must": {"match": {"title": {"query": title, "operator": "and"}}},
        "filter": {"term": {"entity_type": "track"}}}})["hits"]["hits"]
    assert track_id in [h["_id"] for h in found]
    for m in (first, second):
        assert res["memory"][m]["pairs"] > 0 and not res["memory"][m]["pairs_failed"]
        for eid in ids:
            n = es.count(index=m, query={"bool": {"filter": [
                {"term": {"item_id": eid}}, {"term": {"source": "predicted"}}]}})["count"]
            assert n > 0, (m, eid)
        assert _pairs(es, m, ids) == source_pairs
    assert res["memory"][first]["pairs"] == res["memory"][second]["pairs"]
    # The source catalog and memory never saw the release.
    assert es.count(index=catalog_slice)["count"] == source_count
    assert _pairs(es, SLICE_MEMORY_ALIAS, ids) == source_pairs

    # -- cleanup removes the clone and its alias.
    cleanup(es, run_id)
    assert not es.indices.exists(index=index)
    assert not es.indices.exists_alias(name=rel.catalog_alias)


def test_release_without_memory_clones_leaves_no_index(es, settings, catalog_slice,
                                                      slice_hold_out, run_id):
    ids = sorted(slice_hold_out.track_ids)[:3]
    sub = HoldOut(track_ids=frozenset(ids), album_ids=frozenset(), artist_ids=frozenset(),
                  cutoff=slice_hold_out.cutoff, fraction=slice_hold_out.fraction)
    rel = prepare_catalog(es, settings, run_id=run_id, hold_out=sub, source_alias=SLICE_ALIAS,
                          genres=SLICE_GENRES, prebuild=False)
    assert rel.docs is None and not _present(es, rel.catalog_alias, ids)
    res = release(es, settings, rel)
    assert res["build_seconds"] > 0 and res["memory"] == {}
    assert _present(es, rel.catalog_alias, ids) == set(ids)
    assert not es.indices.get(index=f"{rel.catalog_index}-scratch-memory*",
                              allow_no_indices=True, ignore_unavailable=True).body
