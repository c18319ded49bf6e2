"""Retraining query understanding from real click events against the live cluster.

Users searching nicknames the committed model gets wrong ("queen b" reads as the band Queen,
"slim shady" as the band SiM) consistently choose one artist's entity or tracks. The events
go into a throw-away ``test-events-*`` index; the catalog (``ltrr-catalog``, or the test slice
when it is absent) is only read. The model is retrained in a copy of ``qu_models/`` under
``tmp_path``: the committed model is never written. Takes ~40 s (the first retrain rebuilds
the generated examples from the catalog files when the copy has none).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid

import pytest
from elasticsearch import helpers

from orchestrator.event_log import event_document
from orchestrator.qu_retrain import retrain_from_events
from orchestrator.understanding import (
    DEFAULT_MODEL_DIR,
    METADATA_FILENAME,
    QueryUnderstander,
    ReloadingUnderstander,
    clear_understander_cache,
    get_understander,
)

pytestmark = pytest.mark.elasticsearch

DAY_MS = 86_400_000


@pytest.fixture()
def catalog_alias(es, request):
    if es.indices.exists_alias(name="ltrr-catalog"):
        return "ltrr-catalog"
    return request.getfixturevalue("catalog_slice")


@pytest.fixture()
def events_alias(es, settings):
    alias = f"test-events-{uuid.uuid4().hex[:8]}"
    body = json.loads((settings.ingest.mappings_dir / "events.v1.json").read_text())
    es.indices.create(index=alias, settings=body["settings"], mappings=body["mappings"])
    yield alias
    es.indices.delete(index=alias, ignore_unavailable=True)


@pytest.fixture()
def model_dir(tmp_path):
    path = tmp_path / "qu_models"
    shutil.copytree(DEFAULT_MODEL_DIR, path)
    yield path
    clear_understander_cache(path)


def _artist_and_tracks(es, alias, name, *, avoid="", n_tracks=4):
    """The artist entity id and the ids of its most popular tracks (none titled like
    ``avoid``: "The Real Slim Shady" would overlap the query "slim shady")."""
    artist = es.search(index=alias, size=1, query={"bool": {"filter": [
        {"term": {"entity_type": "artist"}}, {"term": {"title.raw": name.lower()}}]}},
        sort=[{"popularity": "desc"}], source=False)["hits"]["hits"]
    tracks = es.search(index=alias, size=n_tracks, query={"bool": {"filter": [
        {"term": {"entity_type": "track"}}, {"term": {"artist.raw": name.lower()}}],
        "must_not": [{"match": {"title": avoid}}] if avoid else []}},
        sort=[{"popularity": "desc"}], source=False)["hits"]["hits"]
    assert artist and len(tracks) == n_tracks, f"{name} is not in {alias}"
    return artist[0]["_id"], [t["_id"] for t in tracks]


def _track(es, alias, title, artist):
    hits = es.search(index=alias, size=1, query={"bool": {"filter": [
        {"term": {"entity_type": "track"}}, {"term": {"title.raw": title.lower()}},
        {"term": {"artist.raw": artist.lower()}}]}}, source=False)["hits"]["hits"]
    assert hits, f"{title} by {artist} is not in {alias}"
    return hits[0]["_id"]


def _write_events(es, alias, sessions, *, start_ms):
    """One impression + one feedback event per chosen item, a minute apart, stored exactly as
    the Celery mover stores stream entries (``event_log.event_document``)."""
    actions = []
    ts = start_ms
    for query, items in sessions:
        for i, item in enumerate(items):
            ts += 60_000
            rid = uuid.uuid4().hex
            imp = {"request_id": rid, "query": query, "ts": ts,
                   "shown": [{"id": item, "rank": 1 + i % 3}]}
            fb = {"request_id": rid, "item_id": item, "action": ("click", "play", "like")[i % 3],
                  "ts": ts + 4_000}
            for seq, (kind, data) in enumerate((("impression", imp), ("feedback", fb))):
                doc = event_document(f"{ts}-{seq}", {"type": kind, "data": json.dumps(data)})
                actions.append({"_index": alias, "_id": doc["event_id"], "_source": doc})
    helpers.bulk(es, actions, refresh=True)


def test_clicks_teach_nicknames_and_promotion_is_idempotent(es, settings, catalog_alias,
                                                            events_alias, model_dir):
    if not (model_dir / "train").is_dir() and not settings.ingest.data_dir.is_dir():
        pytest.skip(f"no generated examples and no catalog files at {settings.ingest.data_dir}")
    committed_version = json.loads((DEFAULT_MODEL_DIR / METADATA_FILENAME).read_text())["version"]

    # the premise: today's model gets these nicknames wrong
    current = get_understander(model_dir, check_every_s=0)
    proxy = ReloadingUnderstander(model_dir, check_every_s=0)
    for query, artist in (("queen b", "Beyoncé"), ("slim shady", "Eminem")):
        pq = current.parse(query)
        assert pq.values("artist")[:1] != [artist] or pq.intent != "artist", \
            f"the committed model already parses {query!r}; pick another nickname"

    # The leak-free slice (genres from the track sources only) holds 3 Beyoncé tracks.
    bey, bey_tracks = _artist_and_tracks(es, catalog_alias, "Beyoncé", n_tracks=3)
    bey_tracks = [*bey_tracks, bey_tracks[0]]
    em, em_tracks = _artist_and_tracks(es, catalog_alias, "Eminem", avoid="slim shady")
    pit, pit_tracks = _artist_and_tracks(es, catalog_alias, "Pitbull")
    love_story = _track(es, catalog_alias, "Love Story", "Taylor Swift")
    now_ms = int(time.time() * 1000)
    # 24 choices in the training window (older) ...
    _write_events(es, events_alias, [
        ("queen b", [bey, bey_tracks[0], bey, bey_tracks[1], bey_tracks[2], bey_tracks[3]]),
        ("Slim Shady", [em, em_tracks[0], em, em_tracks[2], em_tracks[3]]),
        ("mr worldwide", [pit, pit_tracks[0], pit_tracks[1], pit]),
        ("taylor swift love story", [love_story] * 3),
        ("eminem songs", [em, em_tracks[0], em]),
        ("queen b", [bey, bey_tracks[1], bey]),
    ], start_ms=now_ms - 10 * DAY_MS)
    # ... and 6 in the newest 20%: the held-out time slice
    _write_events(es, events_alias, [
        ("queen b", [bey, bey_tracks[0]]),
        ("slim shady", [em, em_tracks[1]]),
        ("taylor swift love story", [love_story] * 2),
    ], start_ms=now_ms - DAY_MS)

    res = retrain_from_events(es, events_alias=events_alias, catalog_alias=catalog_alias,
                              model_dir=model_dir, data_dir=settings.ingest.data_dir)
    assert res["promoted"] is True, res
    assert res["counts"]["heldout_queries"] == 3 and res["counts"]["aliases"] >= 2, res
    before, after = res["metrics"]["before"], res["metrics"]["after"]
    assert after["clicks"]["score"] > before["clicks"]["score"]
    assert after["clicks"]["score"] == 1.0, (before, after)
    assert after["generated"]["intent_accuracy"] >= before["generated"]["intent_accuracy"] - 0.005

    meta = json.loads((model_dir / METADATA_FILENAME).read_text())
    assert meta["version"] == res["version_after"] != res["version_before"]
    assert meta["parent_version"] == res["version_before"]
    assert meta["click_data_sha256"] == res["click_data_sha256"]

    # running holders pick the promoted model up without a restart
    reloaded = get_understander(model_dir, check_every_s=0)
    assert reloaded is not current and reloaded.metadata["version"] == meta["version"]
    for query, artist in (("queen b", "Beyoncé"), ("Slim Shady", "Eminem"),
                          ("queen b songs", "Beyoncé")):
        pq = proxy.parse(query)
        assert pq.values("artist")[:1] == [artist] and pq.intent == "artist", (query, pq)
    # what the model knew still holds
    assert proxy.parse("taylor swift love story").intent == "known_item"
    assert QueryUnderstander.load(model_dir).parse("beyonce").values("artist") == ["Beyoncé"]

    again = retrain_from_events(es, events_alias=events_alias, catalog_alias=catalog_alias,
                                model_dir=model_dir, data_dir=settings.ingest.data_dir)
    assert again["promoted"] is False and again["version_after"] == meta["version"], again
    assert json.loads((model_dir / METADATA_FILENAME).read_text())["version"] == meta["version"]
    # the committed model was only read
    assert json.loads((DEFAULT_MODEL_DIR / METADATA_FILENAME).read_text())["version"] == \
        committed_version
