"""The realistic query stream: Zipf repeats, users' own wants, the Last.fm relevance split,
the unseen playlist titles and held-out new items (real data in shared/data/music)."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest

from orchestrator.catalog import lastfm_catalog_user, lastfm_rows
from orchestrator.settings import OrchestratorSettings
from orchestrator.simulation.queries import (
    QuerySources,
    QueryStream,
    SimQuery,
    album_id,
    artist_id,
    load_new_items,
    load_playlist_queries,
    repeated_share,
    unseen_title,
)
from orchestrator.simulation.users import UserPool
from orchestrator.text import normalize_query

DATA = OrchestratorSettings().ingest.data_dir
MIX = {"playlist": 0.4, "known_item": 0.4, "tag": 0.2}


@pytest.fixture(scope="module")
def sources() -> QuerySources:
    return QuerySources.load(DATA)


# spotify-api-2024/acoustic.csv: "Bloom - Bonus Track" by The Paper Kites, album Woodland
PICKED = ("track:1HMQmOWrkieKYWlFsjUP3D", artist_id("The Paper Kites"),
          album_id("The Paper Kites", "Woodland"))


def _top(sources: QuerySources):
    return sorted(sources.known_items, key=lambda k: (-k.popularity, k.entity_id))[:40]


@pytest.fixture(scope="module")
def new_items(sources):
    """One read of the files for every test: the picked ids, the 40 most popular known
    items and an id that is not in the data."""
    ids = frozenset(PICKED) | {k.entity_id for k in _top(sources)} | {"track:nope"}
    return {k.entity_id: k for k in load_new_items(DATA, ids)}


@pytest.fixture(scope="module")
def stream_z1(sources) -> list[SimQuery]:
    return QueryStream(sources, mix=MIX, seed=3, zipf=1.0).generate(3000)


def test_simquery_key_user_need_defaults():
    q = SimQuery("x", "  Hard-Rock   WORKOUT! ", "playlist", {"track:a": 1})
    assert q.key == normalize_query(q.text) == "hard rock workout"
    assert q.user == "" and q.need == ""
    assert SimQuery("x", "abc", "tag", {}, key="given").key == "given"


def test_zipf_makes_the_head_repeat(sources, stream_z1):
    flat = QueryStream(sources, mix=MIX, seed=3, zipf=0.0).generate(3000)
    assert repeated_share(stream_z1) > repeated_share(flat) + 0.05
    ki = [q for q in stream_z1 if q.qtype == "known_item"]
    ki0 = [q for q in flat if q.qtype == "known_item"]
    assert repeated_share(ki) > 0.15 > repeated_share(ki0)
    assert QueryStream.repeated_share(stream_z1) == repeated_share(stream_z1)
    assert repeated_share([]) == 0.0
    # every query carries its key, user and need
    assert all(q.key == normalize_query(q.text) and q.user.startswith("u") and q.need
               for q in stream_z1)


def test_same_seed_same_stream(sources, stream_z1):
    again = QueryStream(sources, mix=MIX, seed=3, zipf=1.0).generate(3000)
    assert [(q.text, q.user, dict(q.relevant)) for q in again] == \
        [(q.text, q.user, dict(q.relevant)) for q in stream_z1]
    other = QueryStream(sources, mix=MIX, seed=4, zipf=1.0).generate(300)
    assert [q.text for q in other] != [q.text for q in stream_z1[:300]]


def test_zipf_zero_keeps_the_old_distributions(sources):
    s = QueryStream(sources, mix=MIX, seed=0, zipf=0.0)
    assert s._pl_p is None  # playlists uniform, as before
    pops = [max(k.popularity, 1.0) for k in sources.known_items]
    assert s._ki_p[0] == pytest.approx(pops[0] / sum(pops))


def test_playlist_wants_are_personal_subsets(sources, stream_z1):
    full = {q.text: q.relevant for q in sources.playlists}
    pl = [q for q in stream_z1 if q.qtype == "playlist"]
    assert pl
    for q in pl:
        assert q.need == f"playlist:{q.text}"
        assert set(q.relevant) <= set(full[q.text])
        assert min(3, len(full[q.text])) <= len(q.relevant) <= 15
    by: dict[tuple[str, str], set[frozenset]] = defaultdict(set)
    for q in pl:
        by[(q.user, q.need)].add(frozenset(q.relevant))
    assert all(len(v) == 1 for v in by.values()), "same user, same need: same wants"
    # different users asking the same need want different (overlapping) sets
    per_need: dict[str, dict[str, frozenset]] = defaultdict(dict)
    for (u, n), sets in by.items():
        per_need[n][u] = next(iter(sets))
    need, users = max(per_need.items(), key=lambda kv: len(kv[1]))
    assert len(users) >= 5
    assert len(set(users.values())) >= 3
    sets = list(users.values())
    assert any(a & b for i, a in enumerate(sets) for b in sets[i + 1:])


def test_user_pool_wants_are_deterministic_and_popularity_weighted():
    pool = UserPool(n_users=50, seed=1)
    items = [f"track:{i}" for i in range(40)]
    weights = [100.0 if i < 5 else 0.0 for i in range(40)]
    a = pool.wants("u00001", "playlist:x", items, weights)
    assert a == UserPool(n_users=50, seed=1).wants("u00001", "playlist:x", items, weights)
    assert 3 <= len(a) <= 15 and set(a) <= set(items)
    hits = Counter(i for u in range(50) for i in pool.wants(pool.user_id(u), "playlist:x",
                                                           items, weights))
    assert min(hits[f"track:{i}"] for i in range(5)) > max(hits[f"track:{i}"] for i in range(5, 40))


def test_tag_wants_keep_artist_grades_and_their_tracks(sources, stream_z1):
    full = {q.qid: q.relevant for q in sources.tags}
    tags = [q for q in stream_z1 if q.qtype == "tag"]
    assert tags
    for q in tags[:100]:
        artists = {i for i, g in q.relevant.items() if g >= 2}
        assert 1 <= len(artists) <= 15
        assert all(full[q.qid][i] == g for i, g in q.relevant.items())
        groups = sources.tag_groups[q.qid]
        assert {i for i in q.relevant if i.startswith("track:")} <= \
            {t for a in artists for t in groups[a]}


def test_tag_relevance_comes_from_the_non_catalog_users(sources):
    folder = DATA / "lastfm-hetrec2011"
    names = {p[0]: p[1].strip() for p in lastfm_rows(folder, "artists.dat")}
    eval_n: dict[str, Counter] = defaultdict(Counter)
    cat_n: dict[str, Counter] = defaultdict(Counter)
    for p in lastfm_rows(folder, "user_taggedartists.dat"):
        if len(p) >= 3 and p[1] in names:
            (cat_n if lastfm_catalog_user(p[0]) else eval_n)[p[2]][names[p[1]]] += 1
    only_catalog = 0
    for q in sources.tags:
        tag_id = q.qid.split(":", 1)[1]
        grades = {a: g for a, g in q.relevant.items() if a.startswith("artist:")}
        counts = {artist_id(a): n for a, n in eval_n[tag_id].items()}
        for aid, g in grades.items():
            n = counts[aid]
            assert n >= 2 and g == 2 + int(n >= 5) + int(n >= 20)
        for a, n in cat_n[tag_id].items():
            if n >= 2 and eval_n[tag_id][a] == 0:
                only_catalog += 1
                assert artist_id(a) not in q.relevant
    assert only_catalog > 0, "some artists are tagged by catalog-half users only"


def test_playlist_split_is_disjoint_stable_and_complete(sources):
    seen = {q.key for q in sources.playlists}
    unseen = {q.key for q in sources.playlists_unseen}
    assert seen and unseen and not seen & unseen
    assert len(sources.playlists) + len(sources.playlists_unseen) == len(load_playlist_queries(DATA))
    assert sources.sizes()["playlist_unseen"] == len(sources.playlists_unseen)
    # stable: a pure function of the normalized title
    assert all(unseen_title(q.text) for q in sources.playlists_unseen)
    assert unseen_title("Hard Rock Workout") == unseen_title("hard rock  workout!")
    other = [q for q in sources.playlists if unseen_title(q.text, split_seed=1)]
    assert 0 < len(other) < len(sources.playlists)
    # unseen titles keep their full relevant sets and never appear in the stream
    stream_titles = {q.text for q in QueryStream(sources, mix={"playlist": 1.0}, seed=2).generate(500)}
    assert not stream_titles & {q.text for q in sources.playlists_unseen}
    assert all(len(q.relevant) >= 5 for q in sources.playlists_unseen)


def test_load_new_items_for_hand_picked_ids(sources, new_items):
    tid, aid, bid = PICKED
    items = new_items
    assert set(PICKED) <= set(items) and "track:nope" not in items
    assert items[tid].entity_type == "track" and items[tid].title == "Bloom"
    assert items[tid].artist == "The Paper Kites" and tid in items[tid].relevant
    assert items[aid].entity_type == "artist" and items[bid].entity_type == "album"
    assert items[bid].title == "Woodland" and items[tid].popularity >= 76


def test_held_out_ids_appear_only_after_the_release(sources, new_items):
    top = _top(sources)
    pl = sorted(sources.playlists, key=lambda q: q.qid)[:20]
    held = frozenset({k.entity_id for k in top} | {i for k in top for i in k.relevant}
                     | {i for q in pl for i in list(q.relevant)[::2]})
    new = [new_items[k.entity_id] for k in top]
    s = QueryStream(sources, mix=MIX, seed=5, zipf=1.0, held_out=held, release_at=1000,
                    new_items=new, p_new=0.3)
    qs = s.generate(2000)
    before, after = qs[:1000], qs[1000:]
    assert all(not (set(q.relevant) & held) for q in before)
    assert all(q.qid not in held for q in before if q.qtype == "known_item")
    assert all(q.relevant for q in qs)
    new_ids = {k.entity_id for k in new}
    n_new = sum(q.qtype == "known_item" and q.qid in new_ids for q in after)
    n_ki = sum(q.qtype == "known_item" for q in after)
    assert n_new >= 0.2 * n_ki
    assert any(set(q.relevant) & held for q in after if q.qtype == "playlist")
    # never released
    never = QueryStream(sources, mix=MIX, seed=5, held_out=held, new_items=new).generate(500)
    assert all(not (set(q.relevant) & held) for q in never)
