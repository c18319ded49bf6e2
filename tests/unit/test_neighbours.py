"""The neighbour query of a clicked item (no engine: the shapes; the live test runs them)."""

from __future__ import annotations

import pytest

from orchestrator.neighbours import neighbour_priors, neighbour_query

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
