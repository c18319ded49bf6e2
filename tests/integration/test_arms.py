"""Every arm against the live node on the real catalog slice, with queries a person would
type: misspelled well-known titles, artists, genre + mood, and real playlist titles.

Each assertion is one that a wrong template (a lost fuzziness, a filter on the wrong field, a
popularity factor that is ignored) would fail.
"""

from __future__ import annotations

import csv
from typing import Any

import pytest

from orchestrator.arms import build_requests
from orchestrator.domain import ArmResult, Hit, ParsedQuery, Slot
from orchestrator.execution import MultiSearch
from orchestrator.templates import TemplateRegistry
from orchestrator.text import fold, normalize_query

pytestmark = pytest.mark.elasticsearch


@pytest.fixture(scope="module")
def registry(settings) -> TemplateRegistry:
    return TemplateRegistry.from_dir(settings.templates.dir)


@pytest.fixture(scope="module")
def encoder(settings):
    from orchestrator.embeddings import get_encoder

    return get_encoder(settings.embedding)


@pytest.fixture(scope="module")
def search(es, catalog_slice, registry, encoder):
    """``search(arm, query, size=10, seed=1, **slots) -> list[Hit]``; fails on ArmFailure."""
    ms = MultiSearch(es, index=catalog_slice, registry=registry, arm_timeout="5s")

    def run(arm: str, query: str, *, size: int = 10, seed: int = 1,
            **slots: list[str]) -> list[Hit]:
        parsed = ParsedQuery(query, normalize_query(query), tuple(
            Slot(cat, v, 0.9, 0, len(query)) for cat, vs in slots.items() for v in vs))
        vector = encoder.encode([query])[0].tolist()
        reqs = build_requests(registry, parsed, query, budgets={arm: size}, vector=vector,
                              seed=seed)
        assert reqs, f"arm {arm} was not applicable"
        (result,) = ms.execute(reqs)
        assert isinstance(result, ArmResult), f"{arm} failed: {result}"
        return list(result.hits)

    return run


def _titles(hits: list[Hit]) -> list[str]:
    return [normalize_query(h.source.get("title", "")) for h in hits]


def _by(hit: Hit, artist: str) -> bool:
    return fold(artist) in [fold(a) for a in hit.source.get("artist", [])]


# -- every arm runs and returns the shape the orchestrator expects -------------------------

def test_all_arms_in_one_msearch(es, catalog_slice, registry, encoder) -> None:
    q = "miles davis"  # remembered (an artist key), so memory has hits too
    parsed = ParsedQuery(q, q, (Slot("genre", "jazz", 0.9, 0, 0), Slot("mood", "chill", 0.9, 0, 0),
                                Slot("artist", "Miles Davis", 0.9, 0, 11)))
    reqs = build_requests(registry, parsed, q, budgets={a: 5 for a in registry.by_arm},
                          vector=encoder.encode([q])[0].tolist(), seed=3)
    assert {r.arm for r in reqs} == set(registry.by_arm)
    results = MultiSearch(es, index=catalog_slice, registry=registry).execute(reqs)
    failed = [r for r in results if not r.ok]
    assert not failed, failed
    for r in results:
        assert 0 < len(r.hits) <= 5, r.arm
        assert all("embedding" not in h.source and "q2e" not in h.source for h in r.hits)


# -- known items with typos ----------------------------------------------------------------

@pytest.mark.parametrize("arm", ["lexical", "lexical_popular", "memory"])
@pytest.mark.parametrize("query,title,artist", [
    ("bohemian rapsody", "Bohemian Rhapsody", "Queen"),
    ("smells like teen sprit", "Smells Like Teen Spirit", "Nirvana"),
    ("shape of yuo", "Shape of You", "Ed Sheeran"),
])
def test_misspelled_known_item_in_top_3(search, arm: str, query: str, title: str,
                                        artist: str) -> None:
    hits = search(arm, query, size=3)
    assert any(normalize_query(h.source["title"]).startswith(normalize_query(title))
               and _by(h, artist) for h in hits), [(h.source["title"], h.source["artist"]) for h in hits]


def test_lexical_exact_title_beats_repeated_words(search) -> None:
    # BM25 alone prefers "Hello Hello" (term frequency); the exact-title bonus must not
    assert _titles(search("lexical", "hello", size=1)) == ["hello"]


def test_lexical_popular_orders_identical_titles_by_popularity(search) -> None:
    plain = [h for h in search("lexical", "Smells Like Teen Spirit", size=10)
             if _titles([h]) == ["smells like teen spirit"]]
    popular = [h for h in search("lexical_popular", "Smells Like Teen Spirit", size=10)
               if _titles([h]) == ["smells like teen spirit"]]
    # Two copies in the slice since playlist-only tracks carry no genre (they came into it
    # through their playlists' genres, an evaluation label).
    assert len(popular) >= 2
    pops = [h.source["popularity"] for h in popular]
    assert pops == sorted(pops, reverse=True), pops
    assert {h.id for h in plain} == {h.id for h in popular}


def test_lexical_popular_prefers_the_famous_hello(search) -> None:
    top = search("lexical_popular", "hello", size=1)[0]
    assert _by(top, "Adele"), top.source


def test_memory_is_exact_about_remembered_queries(search) -> None:
    hits = search("memory", "ed sheeran shape of you", size=5)
    assert hits[0].source["title"] == "Shape of You" and _by(hits[0], "Ed Sheeran")
    assert all(_by(h, "Ed Sheeran") for h in hits)
    # a query no entity is remembered under finds nothing (the arm abstains)
    assert search("memory", "songs to cry to in the rain on a tuesday", size=5) == []


# -- artists -------------------------------------------------------------------------------

def test_artist_query_lexical_and_memory_find_the_artist(search) -> None:
    for arm in ("lexical", "memory"):
        hits = search(arm, "taylor swift", size=3)
        assert any(h.source["entity_type"] == "artist" and h.source["title"] == "Taylor Swift"
                   for h in hits), arm


def test_structured_artist_slot_returns_only_that_artist_by_popularity(search) -> None:
    hits = search("structured", "taylor swift songs", size=20, artist=["Taylor Swift"],
                  entity_type=["songs"])
    assert len(hits) == 20
    assert all(_by(h, "Taylor Swift") and h.source["entity_type"] == "track" for h in hits)
    pops = [h.source["popularity"] for h in hits]
    assert pops == sorted(pops, reverse=True)
    assert pops[0] >= 80


def test_related_finds_the_neighbourhood_of_an_artist(search) -> None:
    hits = search("related", "artists like miles davis", size=20, artist=["Miles Davis"])
    others = [h for h in hits if not _by(h, "Miles Davis")]
    assert len(others) >= 10, "related must surface other artists, not only Miles Davis"
    jazzy = [h for h in others if any("jazz" in g or g in ("bebop", "hard bop", "fusion")
                                      for g in h.source.get("genres", []) +
                                      h.source.get("artist_genres", []))]
    assert len(jazzy) >= 0.8 * len(others), [h.source["title"] for h in others]
    assert any(h.source["entity_type"] == "artist" for h in others)


def test_related_with_an_unknown_artist_is_empty_not_an_error(search) -> None:
    assert search("related", "like zzqx", size=5, artist=["Zzqx Nonexistent"]) == []


# -- genre and mood ------------------------------------------------------------------------

def _has_genre(hit: Hit, genre: str) -> bool:
    return genre in hit.source.get("genres", []) + hit.source.get("artist_genres", [])


def test_structured_chill_jazz(search) -> None:
    hits = search("structured", "chill jazz", size=30, genre=["jazz"], mood=["chill"])
    assert len(hits) == 30
    assert all(_has_genre(h, "jazz") and "chill" in h.source.get("moods", []) for h in hits)
    assert sum(h.source["popularity"] for h in hits) / 30 >= 50  # the popular ones first


def test_structured_era_and_genre_are_anded(search) -> None:
    hits = search("structured", "90s rock", size=20, genre=["rock"], era=["90s"])
    assert hits and all(h.source.get("era") == "1990s" and _has_genre(h, "rock") for h in hits)


def test_semantic_chill_jazz_is_mostly_jazz(search) -> None:
    hits = search("semantic", "chill jazz", size=20)
    assert sum(_has_genre(h, "jazz") for h in hits) >= 14


def test_semantic_entity_type_filter(search) -> None:
    hits = search("semantic", "sad piano ballads", size=10, entity_type=["songs"])
    assert hits and all(h.source["entity_type"] == "track" for h in hits)


# -- exploration ---------------------------------------------------------------------------

def test_explore_shows_the_long_tail_reproducibly(search) -> None:
    a = search("explore", "summer love", size=20, seed=11)
    again = search("explore", "summer love", size=20, seed=11)
    other = search("explore", "summer love", size=20, seed=12)
    head = search("lexical_popular", "summer love", size=50)
    assert [h.id for h in a] == [h.id for h in again]
    assert [h.id for h in a] != [h.id for h in other]
    assert all(h.source["popularity"] <= 60 for h in a)
    # Mostly the long tail. random_score salts its draw with the index name and shard, so
    # the overlap for one seed varies from one index build to the next (1-5 of 20 seen):
    # bound the mean over several seeds, and each seed loosely.
    head_ids = {h.id for h in head}
    lists = [search("explore", "summer love", size=20, seed=sd) for sd in range(11, 21)]
    overlaps = [len({h.id for h in hits} & head_ids) for hits in lists]
    assert sum(overlaps) / len(overlaps) <= 4 and max(overlaps) <= 8, overlaps
    # Still loosely about the query: a good share of titles carry one of its words (the rest
    # match it in artist/album text or fuzzily). Pooled over the seeds, for the same reason.
    with_word = [sum(bool(set(t.split()) & {"summer", "love"}) for t in _titles(hits))
                 for hits in lists]
    assert sum(with_word) / (20 * len(lists)) >= 0.3, with_word


# -- playlist titles (topical queries) -----------------------------------------------------

def _playlist(settings, name: str) -> set[str]:
    with (settings.ingest.data_dir / "playlists_dev.csv").open(encoding="utf-8") as fh:
        return {f"track:{r['track_id']}" for r in csv.DictReader(fh) if r["playlist_name"] == name}


@pytest.mark.parametrize("name,arm,slots,minimum", [
    # recall@100 floors measured on the slice, with margin. The slice lost most playlist
    # tracks when catalog genres stopped coming from the playlists' own genre labels (the
    # answers): measured then 6 and 3 (structured), semantic 1 and 0 ("Gangster Rap
    # Workout", "Sad Trap": too few of their tracks are left in the slice to test it).
    ("Classic Rock", "structured", {"genre": ["classic rock"]}, 4),
    ("90s Dance Hits", "structured", {"genre": ["dance"], "era": ["90s"]}, 2),
])
def test_playlist_title_finds_playlist_tracks(settings, search, name: str, arm: str,
                                               slots: dict[str, Any], minimum: int) -> None:
    relevant = _playlist(settings, name)
    assert len(relevant) >= 50
    found = relevant & {h.id for h in search(arm, name, size=100, entity_type=["track"], **slots)}
    lexical = relevant & {h.id for h in search("lexical", name, size=100, entity_type=["track"])}
    assert len(found) >= minimum, (arm, len(found))
    assert len(found) > len(lexical), "the topical arm should beat BM25 on titles here"
