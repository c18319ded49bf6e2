"""The catalog never contains evaluation answers, and the hold-out of new releases.

* Playlist columns (name, genre, subgenre) of playlists_dev.csv / playlist_tracks_extra.csv
  are the simulator's playlist queries and relevance: no ``playlists`` field, no genre taken
  from them.
* Last.fm tag assignments are split by user: only the catalog half feeds ``artist_genres``.
* :func:`hold_out_newest` and ``CatalogBuilder(exclude=..., only=...)``.
"""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from orchestrator.catalog import (
    CatalogBuilder,
    HoldOut,
    doc_id,
    hold_out_newest,
    lastfm_catalog_user,
    lastfm_rows,
    track_group_ids,
)
from orchestrator.settings import OrchestratorSettings
from orchestrator.text import fold

DATA = OrchestratorSettings().ingest.data_dir
MAPPINGS = OrchestratorSettings().ingest.mappings_dir
GENRES = {"jazz"}

pytestmark = pytest.mark.skipif(not (DATA / "spotify-tracks-114k").is_dir(), reason="no music data")


def _ids(path: Path, key: str = "track_id") -> set[str]:
    with path.open(encoding="utf-8", newline="") as fh:
        return {r[key] for r in csv.DictReader(fh) if r.get(key)}


@pytest.fixture(scope="module")
def tracks():
    return CatalogBuilder(DATA)._tracks()


@pytest.fixture(scope="module")
def jazz_docs():
    return list(CatalogBuilder(DATA, genres=GENRES).build())


def test_lastfm_catalog_user_split():
    assert lastfm_catalog_user("2") and lastfm_catalog_user("0") and lastfm_catalog_user("1000")
    assert not lastfm_catalog_user("3") and not lastfm_catalog_user("2101")
    assert lastfm_catalog_user("alice") and lastfm_catalog_user("")


def test_mapping_has_no_playlists_field():
    body = json.loads((MAPPINGS / "catalog.v1.json").read_text(encoding="utf-8"))
    assert "playlists" not in body["mappings"]["properties"]


def test_no_doc_has_playlists(jazz_docs):
    assert jazz_docs
    assert not [d for d in jazz_docs if "playlists" in d]


def test_genres_never_come_from_playlist_files(tracks):
    track_sources = set()
    for sub in ("spotify-tracks-114k", "spotify-api-2024"):
        for p in (DATA / sub).glob("*.csv"):
            track_sources |= _ids(p)
    playlist_only = (_ids(DATA / "playlists_dev.csv")
                     | _ids(DATA / "playlist_tracks_extra.csv")) - track_sources
    assert playlist_only, "expected some tracks present only in the playlist files"
    for tid in playlist_only:
        if tid in tracks:
            assert tracks[tid].genres == set(), tid
    # And the playlist genre labels never reach the tracks of the other sources either.
    with (DATA / "playlists_dev.csv").open(encoding="utf-8", newline="") as fh:
        sub = {r["playlist_subgenre"].strip().lower() for r in csv.DictReader(fh)}
    own = set()
    for p in (DATA / "spotify-api-2024").glob("*.csv"):
        own.add(p.stem.strip().lower())
    for p in (DATA / "spotify-tracks-114k").glob("*.csv"):
        with p.open(encoding="utf-8", newline="") as fh:
            own |= {r["track_genre"].strip().lower() for r in csv.DictReader(fh) if r.get("track_genre")}
    leaked = sub - own
    all_genres = set().union(*(t.genres for t in tracks.values()))
    assert not (leaked & all_genres), leaked & all_genres


def test_lastfm_tags_only_from_catalog_users():
    folder = DATA / "lastfm-hetrec2011"
    if not folder.is_dir():
        pytest.skip("no Last.fm data")
    names = {p[0]: fold(p[1]).strip() for p in lastfm_rows(folder, "artists.dat")}
    tag_names = {p[0]: p[1].strip().lower() for p in lastfm_rows(folder, "tags.dat", "latin-1")}
    even: dict[str, Counter[str]] = defaultdict(Counter)
    odd: dict[str, Counter[str]] = defaultdict(Counter)
    for p in lastfm_rows(folder, "user_taggedartists.dat"):
        if len(p) > 2 and p[1] in names and p[2] in tag_names:
            (even if lastfm_catalog_user(p[0]) else odd)[names[p[1]]][tag_names[p[2]]] += 1
    top, _ = CatalogBuilder(DATA)._lastfm()
    assert top
    checked = 0
    for artist, tags in top.items():
        for tag in tags:
            # Counted (>= 2 assignments) from the even users alone.
            assert even[artist][tag] >= 2, (artist, tag)
        expected = [t for t, n in even[artist].most_common(8) if n >= 2]
        assert tags == expected
        checked += 1
    # Some tags are only ever assigned by odd users: they must not show up.
    odd_only = [(a, t) for a, c in odd.items() for t in c if even[a][t] == 0 and c[t] >= 2]
    assert odd_only
    assert all(t not in top.get(a, []) for a, t in odd_only)
    assert checked > 100


# -- hold-out ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hold() -> HoldOut:
    return hold_out_newest(DATA, 0.02)


def test_hold_out_newest_is_deterministic_and_whole_releases(hold, tracks):
    assert hold_out_newest(DATA, 0.02) == hold
    named = [t for t in tracks.values() if t.artists]
    assert len(hold.track_ids) >= round(0.02 * len(named))
    assert hold.ids == hold.track_ids | hold.album_ids | hold.artist_ids
    assert all(i.startswith("track:") for i in hold.track_ids)
    assert all(i.startswith("album:") for i in hold.album_ids)
    assert all(i.startswith("artist:") for i in hold.artist_ids)
    held = {i.split(":", 1)[1] for i in hold.track_ids}
    # Undated tracks are never seeds; every seed is at least as new as the cutoff; an album
    # is held out whole.
    album_members: dict[str, set[str]] = defaultdict(set)
    for t in named:
        a = track_group_ids(t.artists, t.album)[0]
        if a:
            album_members[a].add(t.track_id)
    for t in named:
        if t.track_id in held:
            a = track_group_ids(t.artists, t.album)[0]
            if a:
                assert album_members[a] <= held
                assert f"album:{a}" in hold.album_ids
    newer = [t for t in named if t.release_date and t.release_date[:10] > hold.cutoff[:10]
             and len(t.release_date) >= 10 and len(hold.cutoff) >= 10]
    assert all(t.track_id in held for t in newer)
    # An artist is new only when all their tracks are held out.
    artist_tracks: dict[str, set[str]] = defaultdict(set)
    for t in named:
        for aid in track_group_ids(t.artists, t.album)[1]:
            artist_tracks[aid].add(t.track_id)
    for aid in hold.artist_ids:
        assert artist_tracks[aid.split(":", 1)[1]] <= held
    assert hold.artist_ids
    assert hold.cutoff[:4].isdigit()


def test_exclude_and_only(hold, jazz_docs):
    excluded = list(CatalogBuilder(DATA, genres=GENRES, exclude=hold.ids).build())
    full_ids = {doc_id(d) for d in jazz_docs}
    ex_ids = {doc_id(d) for d in excluded}
    held_here = full_ids & hold.track_ids
    assert held_here, "the jazz slice should contain some held-out tracks"
    assert not (ex_ids & hold.ids)
    assert ex_ids <= full_ids
    assert {i for i in full_ids if i.startswith("track:")} - ex_ids == held_here

    only = list(CatalogBuilder(DATA, genres=GENRES, only=hold.ids).build())
    only_ids = {doc_id(d) for d in only}
    assert {i for i in only_ids if i.startswith("track:")} == held_here
    # The groups of every added track are re-emitted, complete (as in the full build).
    full_by_id = {doc_id(d): d for d in jazz_docs}
    for d in only:
        assert d == full_by_id[doc_id(d)]
    assert (full_ids & (hold.album_ids | hold.artist_ids)) <= only_ids
    for d in only:
        if d["entity_type"] == "track":
            a, artists = track_group_ids(d["artist"], d.get("album"))
            assert {f"artist:{x}" for x in artists} <= only_ids
            if a:
                assert f"album:{a}" in only_ids
    # exclude + only = full (the docs the add rewrites replace their partial versions).
    merged = {doc_id(d): d for d in excluded}
    merged.update({doc_id(d): d for d in only})
    assert merged.keys() == full_ids
    assert all(merged[i] == full_by_id[i] for i in full_ids)
