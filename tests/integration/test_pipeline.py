"""End-to-end: search -> feedback -> shared posteriors, against the live ES slice and Redis."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from orchestrator.domain import ParsedQuery, Slot
from orchestrator.errors import (
    InvalidFeedbackError,
    QueryValidationError,
    ServiceUnavailableError,
    UnknownRequestError,
)
from orchestrator.pipeline import Orchestrator, _coerce_context, response_to_dict
from orchestrator.settings import PROJECT_ROOT
from orchestrator.templates import TemplateRegistry

pytestmark = [pytest.mark.elasticsearch, pytest.mark.redis]

TEST_TEMPLATES = Path(__file__).resolve().parent.parent / "data" / "templates"
GENRES = ["jazz", "blues", "soul", "country", "metal", "rock", "classical", "indie", "latin",
          "dance", "edm", "rap", "pop", "hip-hop", "r&b"]
CTX = {"hour": 20, "weekday": 2, "device": "mobile"}


def two_arm_registry() -> TemplateRegistry:
    """The real ``lexical`` arm plus the test-only ``genre_popular`` arm."""
    real = TemplateRegistry.from_dir(PROJECT_ROOT / "query_templates").by_id
    test = TemplateRegistry.from_dir(TEST_TEMPLATES).by_id
    return TemplateRegistry({"lexical.v1": real["lexical.v1"], **test})


class FakeUnderstander:
    """Known-item for titles the test registered, browse + genre slot for genre words."""

    def __init__(self, titles: set[str]) -> None:
        self.titles = titles

    def parse(self, text: str) -> ParsedQuery:
        if text.lower() in GENRES:
            return ParsedQuery(text, text.lower(), (Slot("genre", text.lower(), 1.0, 0, len(text)),),
                               intent="browse", intent_probs={"browse": 1.0}, language="en")
        return ParsedQuery(text, text.lower(), (), intent="known_item",
                           intent_probs={"known_item": 1.0}, language="en")


def make_settings(settings, *, prefix: str, alias: str):
    return settings.model_copy(update={
        "redis": settings.redis.model_copy(update={"key_prefix": prefix}),
        "es": settings.es.model_copy(update={"catalog_alias": alias}),
        "templates": settings.templates.model_copy(update={"mode": "local"}),
    })


@pytest.fixture(scope="module")
def known_titles(es, catalog_slice) -> list[str]:
    resp = es.search(index=catalog_slice, size=200, source=["title"],
                     query={"bool": {"filter": [{"term": {"entity_type": "track"}},
                                                {"range": {"popularity": {"gte": 60}}}]}},
                     sort=[{"popularity": "desc"}])
    seen: dict[str, None] = {}
    for h in resp["hits"]["hits"]:
        t = h["_source"]["title"]
        if t.isascii() and 2 <= len(t.split()) <= 5 and t.lower() not in GENRES:
            seen.setdefault(t, None)
    return list(seen)[:60]


@pytest.fixture()
def make_orch(es, redis_client, redis_prefix, settings, catalog_slice, known_titles):
    def build(**bandit):
        s = make_settings(settings, prefix=redis_prefix, alias=catalog_slice)
        params = {"refresh_interval_s": 0, "max_arms": 2, "seed": 7, **bandit}
        return Orchestrator.from_settings(
            s, es=es, redis=redis_client, understander=FakeUnderstander(set(known_titles)),
            registry=two_arm_registry(), bandit=params)
    return build


def simulated_user(orch: Orchestrator, resp, query: str, known: bool) -> tuple[str, str] | None:
    """Known-item query: plays the track with that exact title, skips the top result if it is
    not shown. Genre query: plays the best-ranked popular track of that genre (popularity >=
    50), else skips the top result. Nothing shown: nothing to do (the pipeline already
    counted the empty response against the arms that ran)."""
    if not resp.results:
        return None
    for item in resp.results:
        src = item.source
        if known:
            if src.get("entity_type") == "track" and str(src.get("title", "")).lower() == query.lower():
                return item.id, "play"
        else:
            genres = {g.lower() for g in src.get("genres", []) + src.get("artist_genres", [])}
            if (src.get("entity_type") == "track" and query.lower() in genres
                    and float(src.get("popularity") or 0) >= 50):
                return item.id, "play"
    return resp.results[0].id, "skip"


def test_search_response_has_provenance_and_explanation(make_orch, redis_client, redis_prefix):
    orch = make_orch()
    resp = orch.search("dancing queen", context=CTX, size=5)
    assert uuid.UUID(resp.request_id).version == 4
    assert 1 <= len(resp.results) <= 5
    assert [r.rank for r in resp.results] == list(range(1, len(resp.results) + 1))
    assert all(r.provenance for r in resp.results)
    assert resp.decision.choices and all(0 < c.propensity <= 1 for c in resp.decision.choices)
    assert set(resp.decision.propensities) == {"lexical.v1", "genre_popular.v1"}
    d = response_to_dict(resp)
    assert d["explanation"]["chosen"][0]["budget"] > 0
    assert {"qu", "select", "es", "merge", "rescore", "overhead", "total"} <= set(d["explanation"]["timings_ms"])
    # The impression is stored with a TTL and appended to the event stream.
    ttl = redis_client.ttl(f"{redis_prefix}imp:{resp.request_id}")
    assert ttl > 0
    events = orch.log.read_events()
    assert events[-1]["type"] == "impression" and events[-1]["request_id"] == resp.request_id
    assert len(events[-1]["shown"][0]["features"]) == len(events[-1]["feature_names"])
    explained = orch.explain(resp.request_id)
    assert explained["shown"][0]["id"] == resp.results[0].id and explained["feedback"] == []


def test_learning_shifts_propensities_per_query_type(make_orch, known_titles):
    """Users of known-item queries are served by lexical, genre browsers by genre_popular:
    within 40 rounds of each the selector's inclusion propensities follow."""
    orch = make_orch()
    rng = np.random.default_rng(11)

    def propensities(query: str) -> dict[str, float]:
        parsed = orch.understander.parse(query)
        ctx = orch.featurizer.transform(parsed, orch_ctx, query)
        return orch.selector.select(ctx, orch.eligible_arms(parsed), total_budget=60).propensities

    orch_ctx = _coerce_context(CTX)
    before_known, before_genre = propensities("Blinding Lights"), propensities("jazz")
    assert 0.3 < before_known["genre_popular.v1"] < 0.95 and 0.3 < before_genre["lexical.v1"] < 0.95

    for _round in range(40):
        for known in (True, False):
            q = known_titles[int(rng.integers(len(known_titles)))] if known else GENRES[int(rng.integers(len(GENRES)))]
            resp = orch.search(q, context=CTX, size=10)
            acted = simulated_user(orch, resp, q, known)
            if acted is not None:
                orch.feedback(resp.request_id, *acted)

    after_known, after_genre = propensities("Blinding Lights"), propensities("jazz")
    # The helpful arm is (almost) always included, the other one less often than before. How
    # much less follows its learned net marginal value against selection.DEFAULT_THRESHOLD:
    # genre_popular is worth ~0 for titles (propensity ~0.2), lexical still ~0.2 for genre
    # words (it finds popular tracks with the genre in their title, and gets their share),
    # so the subset rule keeps it about half the time, as it is meant to. (This test used to
    # demand <= 0.35 for both: run alone it failed 10 times in 10 with 0.49-0.52, before and
    # after the change that found it, and passed in some full-suite orders.)
    assert after_known["lexical.v1"] >= 0.9, after_known
    assert after_known["genre_popular.v1"] <= 0.35, (before_known, after_known)
    assert after_genre["genre_popular.v1"] >= 0.9, after_genre
    assert after_genre["lexical.v1"] <= before_genre["lexical.v1"] - 0.15, (before_genre, after_genre)

    def means(query: str) -> dict[str, float]:
        return orch.selector.expectations(
            orch.featurizer.transform(orch.understander.parse(query), orch_ctx, query),
            orch.eligible_arms(None))

    means_known, means_genre = means("Blinding Lights"), means("jazz")
    assert means_known["lexical.v1"] > means_known["genre_popular.v1"] + 0.3, means_known
    assert means_genre["genre_popular.v1"] > means_genre["lexical.v1"] + 0.3, means_genre


def test_two_instances_share_posterior_updates(make_orch):
    a, b = make_orch(), make_orch()
    resp = a.search("jazz", context=CTX, size=10)
    parsed = b.understander.parse("jazz")
    ctx = b.featurizer.transform(parsed, _coerce_context(CTX), "jazz")
    arms = b.eligible_arms(parsed)
    before = b.selector.expectations(ctx, arms)
    # b can explain and take feedback for a's request: both read the same Redis.
    assert b.explain(resp.request_id)["request_id"] == resp.request_id
    played = resp.results[0]
    a.feedback(resp.request_id, played.id, "favorite")
    after = b.selector.expectations(ctx, arms)
    rewarded = {p.template_id for p in played.provenance}
    for tid in rewarded:
        assert after[tid] > before[tid]
    # And the other way round: b's feedback is visible to a.
    v = a.store.version()
    b.feedback(resp.request_id, played.id, "like")
    assert a.store.version() == v + 1


def test_feedback_edge_cases(make_orch):
    orch = make_orch()
    resp = orch.search("Blinding Lights", context=CTX, size=5)
    item = resp.results[0].id
    with pytest.raises(UnknownRequestError, match="Unknown request id"):
        orch.feedback(str(uuid.uuid4()), item, "click")
    with pytest.raises(InvalidFeedbackError, match="valid actions"):
        orch.feedback(resp.request_id, item, "purchase")
    with pytest.raises(InvalidFeedbackError, match="was not shown"):
        orch.feedback(resp.request_id, "track:nope", "click")
    first = orch.feedback(resp.request_id, item, "click")
    assert not first.duplicate and first.position == 1 and first.rewards
    v = orch.store.version()
    again = orch.feedback(resp.request_id, item, "click")
    assert again.duplicate and orch.store.version() == v  # counted once
    other = orch.feedback(resp.request_id, item, "play")  # another action on the same item counts
    assert not other.duplicate
    skip = orch.feedback(resp.request_id, item, "skip")
    # A skip is not bandit evidence: each arm's reward is its search-time one (0 minus latency).
    assert skip.rewards and all(r <= 0.0 for r in skip.rewards.values())
    assert {(f["item_id"], f["action"]) for f in orch.explain(resp.request_id)["feedback"]} == {
        (item, "click"), (item, "play"), (item, "skip")}
    fb_events = [e for e in orch.log.read_events() if e["type"] == "feedback"]
    assert len(fb_events) == 3


def test_query_validation(make_orch):
    orch = make_orch()
    with pytest.raises(QueryValidationError):
        orch.search("   ")
    with pytest.raises(QueryValidationError):
        orch.search("x" * 10_000)
    with pytest.raises(QueryValidationError):
        orch.search("ok", size=0)
    with pytest.raises(QueryValidationError, match="unknown context"):
        orch.search("ok", context={"colour": "red"})


def test_redis_down_is_one_line_service_error(es, settings, catalog_slice):
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, socket_timeout=0.2,
                       retry=Retry(NoBackoff(), 0))
    s = settings.model_copy(update={"redis": settings.redis.model_copy(update={"url": "redis://127.0.0.1:1/0"})})
    with pytest.raises(ServiceUnavailableError) as info:
        Orchestrator.from_settings(s, es=es, redis=dead, understander=None, registry=two_arm_registry())
    assert "\n" not in str(info.value) and "Redis" in str(info.value)


def test_rescorer_features_reach_the_event_log(make_orch):
    from orchestrator.rescoring import dataset_from_events, train_rescorer

    orch = make_orch()
    clicks = 0
    for q in ("jazz", "Blinding Lights", "blues", "soul", "rock"):
        resp = orch.search(q, context=CTX, size=10)
        if not resp.results:  # the bandit may have run only an arm that finds nothing for q
            continue
        orch.feedback(resp.request_id, resp.results[min(2, len(resp.results) - 1)].id, "click")
        clicks += 1
    X, y, names = dataset_from_events(orch.log.read_events())
    assert clicks >= 3 and X.shape == (len(y), len(names)) and y.sum() == clicks
    model = train_rescorer(X, y, feature_names=names)
    assert model.metadata["n_samples"] == len(y)
