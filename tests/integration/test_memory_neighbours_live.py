"""Neighbour pairs live: a first click for a query makes the memory propose the clicked
item's neighbours (its artist's other tracks) for that query, with decreasing priors below
any clicked pair, the exposures they already had, no effect on pairs that exist, and
exposures without clicks switch them off; the memory arm serves them after the clicked item.

Own memory alias and Redis prefix per test; the catalog slice is only read.
"""

from __future__ import annotations

import json

import pytest

from orchestrator.memory import ITEM_FIELDS, MemoryKeys, MemoryUpdater, pair_id, seed_memory
from orchestrator.neighbours import find_neighbours, neighbour_query

pytestmark = [pytest.mark.elasticsearch, pytest.mark.redis]

KEY = "road trip"


@pytest.fixture()
def env(es, redis_client, redis_prefix, settings, catalog_slice, test_alias):
    memory_alias = f"{test_alias}-memory"
    seed_memory(es, catalog=catalog_slice, memory_alias=memory_alias, keep_old_indices=0,
                entities=[])
    updater = MemoryUpdater(redis_client, es, prefix=redis_prefix, memory_alias=memory_alias,
                            catalog_alias=catalog_slice, neighbours_per_click=3,
                            neighbour_prior=0.2, neighbour_decay=0.5)
    updater.ensure()
    yield updater, memory_alias
    es.indices.delete(index=f"{memory_alias}-v*", ignore_unavailable=True)


def _artist_tracks(es, index: str, n: int = 6) -> list[dict]:
    """Tracks of one artist with at least ``n`` tracks in the slice, most popular first."""
    agg = es.search(index=index, size=0, query={"term": {"entity_type": "track"}},
                    aggs={"a": {"terms": {"field": "artist.raw", "size": 50,
                                          "min_doc_count": n}}})["aggregations"]["a"]["buckets"]
    assert agg, "the slice has no artist with enough tracks"
    hits = es.search(index=index, size=100, source=list(ITEM_FIELDS),
                     sort=[{"popularity": "desc"}, {"entity_id": "asc"}],
                     query={"bool": {"filter": [{"term": {"entity_type": "track"}},
                                                {"term": {"artist.raw": agg[0]["key"]}}]}})
    return [{"_id": h["_id"], **h["_source"]} for h in hits["hits"]["hits"]]


def _impression(r, stream, rid, shown):
    r.xadd(stream, {"type": "impression", "data": json.dumps(
        {"request_id": rid, "query": KEY, "query_key": KEY,
         "shown": [{"id": it, "rank": k} for k, it in enumerate(shown, start=1)]})})


def _play(r, stream, rid, item, rank):
    r.xadd(stream, {"type": "feedback", "data": json.dumps(
        {"request_id": rid, "item_id": item, "action": "play", "rank": rank, "query": KEY})})


def test_neighbour_query_is_valid_for_the_engine(es, catalog_slice):
    tracks = _artist_tracks(es, catalog_slice)
    t = tracks[0]
    for mode in ("artist", "genre", "both"):
        body = neighbour_query(t["_id"], t, size=5, mode=mode)
        if body is None:
            continue
        hits = es.search(index=catalog_slice, **body)["hits"]["hits"]
        assert t["_id"] not in {h["_id"] for h in hits}
        assert all(h["_source"]["entity_type"] == "track" for h in hits)
        if mode == "artist":
            assert hits and all(set(h["_source"]["artist"]) & set(t["artist"]) for h in hits)


def test_a_first_click_proposes_the_items_neighbours_for_its_query(env, es, redis_client,
                                                                   redis_prefix, catalog_slice):
    updater, memory_alias = env
    stream = f"{redis_prefix}events"
    tracks = _artist_tracks(es, catalog_slice)
    clicked = tracks[0]["_id"]
    expected = [n.item_id for n in find_neighbours(
        es, catalog_slice, {clicked: tracks[0]}, size=3)[clicked]]
    assert len(expected) == 3 and clicked not in expected
    # The second neighbour was shown before (no click): its exposure waits in the pending hash.
    _impression(redis_client, stream, "r0", [expected[1]])
    assert updater.run().created == 0
    waiting = float(redis_client.hget(updater.exposure_key(KEY), expected[1]))
    assert waiting > 0
    _impression(redis_client, stream, "r1", [clicked])
    _play(redis_client, stream, "r1", clicked, 1)
    res = updater.run()
    assert res.created == 1 and res.neighbours == 3
    es.indices.refresh(index=memory_alias)
    docs = {d["_id"]: d["_source"] for d in es.mget(
        index=memory_alias, ids=[pair_id(KEY, i) for i in [clicked, *expected]])["docs"]
        if d.get("found")}
    learned = docs[pair_id(KEY, clicked)]
    assert learned["source"] == "learned" and learned["clicks"] == 1.5
    nbs = [docs[pair_id(KEY, i)] for i in expected]
    assert [n["source"] for n in nbs] == ["neighbour"] * 3
    assert [n["prior"] for n in nbs] == pytest.approx([0.2, 0.1, 0.05])
    assert all(n["clicks"] == 0 for n in nbs)
    assert nbs[1]["examinations"] == pytest.approx(waiting)  # took its pending exposure
    assert redis_client.hget(updater.exposure_key(KEY), expected[1]) is None
    assert nbs[0]["active"] and nbs[0]["score"] < learned["score"]
    assert all(n["item"]["title"] for n in nbs)  # display copy for the arm's hits
    # Neighbours are proposals, not evidence: the query still knows one learned pair.
    assert MemoryKeys(redis_client, prefix=redis_prefix).known_pairs(KEY) == 1

    # A first click on a neighbour makes it a learned pair; its own neighbours never
    # overwrite a pair that exists (the clicked item keeps its clicks).
    _impression(redis_client, stream, "r2", [expected[0], clicked])
    _play(redis_client, stream, "r2", expected[0], 1)
    res = updater.run()
    assert res.neighbours <= 3
    es.indices.refresh(index=memory_alias)
    again = es.get(index=memory_alias, id=pair_id(KEY, clicked))["_source"]
    assert again["clicks"] == 1.5 and again["source"] == "learned"
    first = es.get(index=memory_alias, id=pair_id(KEY, expected[0]))["_source"]
    assert first["clicks"] == 1.5 and first["source"] == "neighbour"  # evidence added in place

    # Shown on top three times, never clicked: the last neighbour drops below min_score.
    for i in range(3):
        _impression(redis_client, stream, f"s{i}", [expected[2]])
    updater.run()
    es.indices.refresh(index=memory_alias)
    last = es.get(index=memory_alias, id=pair_id(KEY, expected[2]))["_source"]
    assert last["examinations"] >= 2 and not last["active"]


def test_the_memory_arm_serves_neighbours_after_the_clicked_item(env, es, redis_client,
                                                                 redis_prefix, catalog_slice,
                                                                 fixed_plan_orchestrator):
    updater, memory_alias = env
    stream = f"{redis_prefix}events"
    tracks = _artist_tracks(es, catalog_slice)
    clicked = tracks[0]["_id"]
    _impression(redis_client, stream, "r1", [clicked])
    _play(redis_client, stream, "r1", clicked, 1)
    assert updater.run().neighbours == 3
    es.indices.refresh(index=memory_alias)
    orch = fixed_plan_orchestrator({"memory": 10}, catalog=catalog_slice, memory_alias=memory_alias)
    resp = orch.search("Road Trip", size=10, total_budget=10)
    ranked = [i for _, i in sorted((p.rank, it.id) for it in resp.results
                                   for p in it.provenance if p.arm == "memory")]
    assert ranked[0] == clicked and len(ranked) == 4
    assert set(ranked[1:]) <= {t["_id"] for t in tracks[1:]}
    assert all(set(next(it for it in resp.results if it.id == i).source["artist"])
               & set(tracks[0]["artist"]) for i in ranked)


def test_updater_from_settings_proposes_neighbours_by_default(settings, es, redis_client):
    from orchestrator.memory import updater_from_settings

    up = updater_from_settings(settings, es, redis_client)
    assert up.neighbours_per_click == settings.memory.neighbours_per_click > 0
    off = settings.model_copy(update={"memory": settings.memory.model_copy(
        update={"neighbours_per_click": 0})})
    assert updater_from_settings(off, es, redis_client).neighbours_per_click == 0


def test_a_reseed_keeps_the_neighbour_pairs(env, es, redis_client, redis_prefix, catalog_slice):
    updater, memory_alias = env
    stream = f"{redis_prefix}events"
    clicked = _artist_tracks(es, catalog_slice)[0]["_id"]
    _impression(redis_client, stream, "r1", [clicked])
    _play(redis_client, stream, "r1", clicked, 1)
    assert updater.run().neighbours == 3
    es.indices.refresh(index=memory_alias)
    query = {"term": {"source": "neighbour"}}
    before = {h["_id"] for h in es.search(index=memory_alias, query=query)["hits"]["hits"]}
    assert len(before) == 3
    out = seed_memory(es, catalog=catalog_slice, memory_alias=memory_alias, keep_old_indices=0,
                      entities=[])
    assert out["carried"] == 4  # the learned pair and its three neighbours
    after = {h["_id"] for h in es.search(index=memory_alias, query=query)["hits"]["hits"]}
    assert after == before


def test_neighbours_wait_for_a_second_clicked_item_when_asked(env, es, redis_client,
                                                             redis_prefix, catalog_slice):
    """``neighbours_min_pairs=2`` (the production default): a key whose users all click the
    same item (a known-item lookup) gets no neighbours; a second distinct click does."""
    updater, memory_alias = env
    updater.neighbours_min_pairs = 2
    stream = f"{redis_prefix}events"
    tracks = _artist_tracks(es, catalog_slice)
    a, b = tracks[0]["_id"], tracks[-1]["_id"]
    for i in range(3):  # the same item, three times: still one learned pair
        _impression(redis_client, stream, f"a{i}", [a])
        _play(redis_client, stream, f"a{i}", a, 1)
        assert updater.run().neighbours == 0
    _impression(redis_client, stream, "b0", [b])
    _play(redis_client, stream, "b0", b, 1)
    res = updater.run()
    proposed = {n.item_id for n in find_neighbours(es, catalog_slice, {b: tracks[-1]},
                                                   size=3)[b]}
    new = proposed - {a}  # a is a learned pair already: it keeps its document
    assert res.created == 1 and res.neighbours == len(new) >= 2
    es.indices.refresh(index=memory_alias)
    hits = es.search(index=memory_alias, query={"term": {"source": "neighbour"}})["hits"]["hits"]
    assert {h["_source"]["item_id"] for h in hits} == new
