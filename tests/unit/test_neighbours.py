"""The neighbour query of a clicked item (no engine: the shapes; the live test runs them)."""

from __future__ import annotations

import pytest

from orchestrator.neighbours import Neighbour, NeighbourCache, neighbour_priors, neighbour_query

TRACK = {"entity_type": "track", "artist": ["Aretha Franklin"], "genres": ["soul"],
         "artist_genres": ["classic soul", "soul"]}


def test_artist_mode_asks_for_the_artists_other_entities_of_the_same_type():
    body = neighbour_query("track:1", TRACK, size=4)
    b = body["query"]["function_score"]["query"]["bool"]
    assert body["size"] == 4
    assert b["should"] == [{"terms": {"artist.raw": ["Aretha Franklin"], "boost": 10.0}}]
    assert {"term": {"entity_type": "track"}} in b["filter"]
    assert b["must_not"] == [{"ids": {"values": ["track:1"]}}]
    assert "embedding" in body["_source"]["excludes"]


def test_genre_mode_looks_the_item_up_by_id_and_both_unions_the_two():
    g = neighbour_query("track:1", TRACK, size=4, mode="genre")
    (mlt,) = g["query"]["function_score"]["query"]["bool"]["should"]
    assert mlt["more_like_this"]["like"] == [{"_id": "track:1"}]
    both = neighbour_query("track:1", TRACK, size=4, mode="both")
    kinds = [next(iter(q)) for q in both["query"]["function_score"]["query"]["bool"]["should"]]
    assert kinds == ["terms", "more_like_this"]


def test_an_item_without_a_handle_has_no_query_and_a_bad_mode_is_refused():
    assert neighbour_query("artist:x", {"entity_type": "artist"}, size=3) is None
    assert neighbour_query("track:2", {"artist": "Solo Name"}, size=3) is not None  # a str artist
    assert neighbour_query("track:3", {"artist": []}, size=3, mode="genre") is None
    with pytest.raises(ValueError, match="neighbour mode"):
        neighbour_query("track:1", TRACK, size=3, mode="cooccur")  # type: ignore[arg-type]


def test_priors_decay_geometrically_from_the_best_neighbour():
    assert neighbour_priors(0, prior=0.2, decay=0.5) == []
    assert neighbour_priors(3, prior=0.2, decay=0.5) == pytest.approx([0.2, 0.1, 0.05])


def test_the_cache_searches_misses_only_expires_entries_and_never_caches_a_failed_search():
    calls: list[list[str]] = []
    loaded: list[list[str]] = []
    now = [0.0]

    def search(es, index, items, *, size, mode):
        calls.append(sorted(items))
        # "bad" fails (find_neighbours leaves a failed item out of its answer)
        return {i: [Neighbour(f"{i}-nb", 0, {})] for i in items if i != "bad"}

    cache = NeighbourCache(size=3, mode="artist", max_items=2, ttl_s=10.0,
                           clock=lambda: now[0], search=search)

    def load(ids):
        loaded.append(sorted(ids))
        return {i: {"artist": "x"} for i in ids}

    got = cache.get(None, "cat", {"a": {"artist": "x"}, "bad": {"artist": "y"}})
    assert [n.item_id for n in got["a"]] == ["a-nb"] and "bad" not in got
    # a cached item costs neither a search nor a read of its fields; a failed one is retried
    got = cache.get(None, "cat", {"a": None, "bad": None}, load=load)
    assert calls == [["a", "bad"], ["bad"]] and loaded == [["bad"]]
    assert (cache.hits, cache.misses) == (1, 3)
    # another catalog alias is another entry
    cache.get(None, "other", {"a": {"artist": "x"}})
    assert calls[-1] == ["a"]
    # bounded: "a" of "cat" was the least recently used of three entries
    cache.get(None, "cat", {"c": {"artist": "x"}})
    cache.get(None, "cat", {"a": {"artist": "x"}})
    assert calls[-1] == ["a"]
    # entries expire after ttl_s (items added to the catalog become neighbours)
    now[0] = 11.0
    cache.get(None, "cat", {"c": {"artist": "x"}})
    assert calls[-1] == ["c"]
