"""The memory index learning live: feedback through the real Orchestrator reaches the memory
arm within seconds (the updater loop running as ``ltrr memory run`` does), skips never raise
an item, typo and case variants of a learned query find the learned pair, the event mover's
trimming waits for the memory group, and the repair rebuild equals the incremental result.

Each test has its own memory alias (``<test alias>-memory``, deleted afterwards) and Redis
prefix; the catalog slice is only read.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from orchestrator.event_log import EventMover
from orchestrator.memory import (
    ITEM_FIELDS,
    MemoryKeys,
    MemoryUpdater,
    pair_id,
    rebuild_memory,
    run_loop,
    seed_memory,
)

pytestmark = [pytest.mark.elasticsearch, pytest.mark.redis]

PLAN = {"lexical": 50, "memory": 10}


@pytest.fixture()
def env(es, redis_client, redis_prefix, catalog_slice, test_alias, fixed_plan_orchestrator):
    """A memory alias seeded with Taylor Swift's predicted pairs only, an updater and an
    orchestrator running the lexical and memory arms on the catalog slice."""
    memory_alias = f"{test_alias}-memory"
    hits = es.search(index=catalog_slice, size=300, source=["q2e", *ITEM_FIELDS],
                     query={"term": {"artist.raw": "taylor swift"}})["hits"]["hits"]
    seed_memory(es, catalog=catalog_slice, memory_alias=memory_alias, keep_old_indices=0,
                entities=[(h["_id"], h["_source"]) for h in hits])
    orch = fixed_plan_orchestrator(PLAN, catalog=catalog_slice, memory_alias=memory_alias)
    updater = MemoryUpdater(redis_client, es, prefix=redis_prefix, memory_alias=memory_alias,
                            catalog_alias=catalog_slice)
    updater.ensure()
    return orch, updater, memory_alias


def memory_ids(resp) -> list[str]:
    """Ids the memory arm contributed to a response, in the arm's rank order."""
    ranked = sorted((p.rank, it.id) for it in resp.results for p in it.provenance
                     if p.arm == "memory")
    return [i for _, i in ranked]


def memory_score_of(resp, item_id: str) -> float | None:
    for it in resp.results:
        for p in it.provenance:
            if p.arm == "memory" and it.id == item_id:
                return p.score
    return None


@pytest.fixture()
def loop(env):
    """The updater running in the background as ``ltrr memory run`` does."""
    _, updater, _ = env
    stop = threading.Event()
    t = threading.Thread(target=run_loop, args=(updater,),
                         kwargs={"interval_s": 0.2, "stop": stop.is_set}, daemon=True)
    t.start()
    yield updater
    stop.set()
    t.join(timeout=10)


def test_feedback_is_retrievable_through_the_memory_arm_within_seconds(env, loop):
    orch, _, _ = env
    latencies = []
    for word in ("baking", "harbour", "winter", "garden", "midnight"):
        q = f"songs my grandmother hums {word}"
        resp = orch.search(q, size=60, total_budget=60)
        assert memory_ids(resp) == []  # nothing remembered for this query yet
        target = resp.results[min(4, len(resp.results) - 1)].id
        orch.feedback(resp.request_id, target, "play", token=resp.token)
        t0 = time.perf_counter()
        while True:
            again = orch.search(q, size=60, total_budget=60)
            if target in memory_ids(again):
                latencies.append(time.perf_counter() - t0)
                break
            assert time.perf_counter() - t0 < 10, f"{target} not retrievable after 10 s"
            time.sleep(0.1)
        src = next(it.source for it in again.results if it.id == target)
        assert src["_memory"]["clicks"] == 1.5 and src["_memory"]["exposures"] > 0
        assert src.get("title")  # the catalog's (or the copy's) display fields
    assert max(latencies) < 10, latencies


def test_a_skip_never_raises_an_item_in_the_memory_arm(env, loop):
    orch, updater, _ = env
    q = "taylor swift"
    before = orch.search(q, size=60, total_budget=60)
    mem = memory_ids(before)
    assert len(mem) >= 2, mem
    top, second = mem[0], mem[1]
    s_top = memory_score_of(before, top)
    orch.feedback(before.request_id, top, "skip", token=before.token)
    # A skip of an item the memory never held for this query: it must not appear.
    outsider = next(it.id for it in before.results if it.id not in mem)
    orch.feedback(before.request_id, outsider, "skip", token=before.token)
    deadline = time.perf_counter() + 10
    while True:
        after = orch.search(q, size=60, total_budget=60)
        s = memory_score_of(after, top)
        if s is None or s < s_top:
            break
        assert time.perf_counter() < deadline, "the skip never reached the memory index"
        time.sleep(0.2)
    assert s is None or s < s_top
    ids = memory_ids(after)
    assert outsider not in ids
    if top in ids:
        assert ids.index(top) >= mem.index(top)
    assert second in ids


def test_typo_and_case_variants_reach_the_learned_pair(env, loop, redis_client, redis_prefix):
    orch, updater, memory_alias = env
    resp = orch.search("taylor swift love story", size=60, total_budget=60)
    learned = {i for i in memory_ids(resp)}
    target = next(it.id for it in resp.results if it.id not in learned)
    orch.feedback(resp.request_id, target, "favorite", token=resp.token)
    deadline = time.perf_counter() + 10
    while True:
        typo = orch.search("Tayler Swift Love Story", size=60, total_budget=60)
        if target in memory_ids(typo):
            break
        assert time.perf_counter() < deadline, "the typo variant never found the learned pair"
        time.sleep(0.2)
    src = next(it.source for it in typo.results if it.id == target)
    assert src["_memory"]["query_key"] == "taylor swift love story"
    assert target in memory_ids(orch.search("TAYLOR SWIFT LOVE STORY!", size=60, total_budget=60))
    doc = updater.es.get(index=memory_alias, id=pair_id("taylor swift love story", target))
    assert doc["_source"]["source"] == "learned" and doc["_source"]["clicks"] == 2.5
    keys = MemoryKeys(redis_client, prefix=redis_prefix)
    assert keys.known_pairs("taylor swift love story") == 1
    assert keys.known_pairs("never typed") == 0


def test_known_pairs_is_none_while_redis_is_down():
    import redis

    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    assert MemoryKeys(dead, prefix="x:").known_pairs("q") is None


# -- the stream: trimming and the repair rebuild -----------------------------------------------

def _events(redis_client, stream, items, *, n=30):
    """Impressions of ``items`` for three queries, with plays, clicks and skips."""
    for i in range(n):
        q = ("sad songs", "road trip", "rainy day")[i % 3]
        shown = items[i % 3:] + items[:i % 3]
        imp = {"request_id": f"r{i}", "query": q, "query_key": q,
               "shown": [{"id": it, "rank": r} for r, it in enumerate(shown, start=1)]}
        redis_client.xadd(stream, {"type": "impression", "data": json.dumps(imp)})
        if i % 2 == 0:
            fb = {"request_id": f"r{i}", "item_id": shown[1], "action": "play", "rank": 2,
                  "query": q}
            redis_client.xadd(stream, {"type": "feedback", "data": json.dumps(fb)})
        if i % 5 == 0:
            fb = {"request_id": f"r{i}", "item_id": shown[0], "action": "skip", "rank": 1,
                  "query": q}
            redis_client.xadd(stream, {"type": "feedback", "data": json.dumps(fb)})


def _items(es, catalog_slice, n=6):
    hits = es.search(index=catalog_slice, size=n, sort=[{"entity_id": "asc"}],
                     query={"term": {"entity_type": "track"}})["hits"]["hits"]
    return [h["_id"] for h in hits]


def test_mover_trimming_waits_for_the_memory_group(env, es, redis_client, redis_prefix,
                                                    settings, catalog_slice, test_alias):
    _, updater, _ = env
    stream = f"{redis_prefix}events"
    _events(redis_client, stream, _items(es, catalog_slice), n=10)
    total = redis_client.xlen(stream)
    mover = EventMover(redis_client, es, stream=stream, alias=f"{test_alias}-events",
                       mappings_dir=settings.ingest.mappings_dir)
    moved = mover.move()
    assert moved.moved == total and moved.trimmed == 0  # the memory group has read nothing
    assert redis_client.xlen(stream) == total
    res = updater.run()
    assert res.events == total
    assert mover.move().trimmed == total  # now both groups acknowledged everything
    assert redis_client.xlen(stream) == 0


def test_repair_rebuild_equals_the_incremental_result(env, es, redis_client, redis_prefix,
                                                      settings, catalog_slice, test_alias):
    _, updater, memory_alias = env
    stream = f"{redis_prefix}events"
    items = _items(es, catalog_slice)
    _events(redis_client, stream, items)
    # Incremental, in several small batches (as the beat task runs it).
    res = updater.run(batch_size=7)
    assert res.batches > 3 and res.created > 0 and res.pending > 0 and res.updated > 0
    es.indices.refresh(index=memory_alias)

    def snapshot():
        docs = es.search(index=memory_alias, size=1000, query={"terms": {"item_id": items}})
        out = {h["_id"]: {k: h["_source"][k] for k in ("clicks", "examinations", "score",
                                                        "active", "source", "query_key",
                                                        "item_id", "item")}
               for h in docs["hits"]["hits"]}
        pending = {}
        for key in redis_client.scan_iter(match=f"{redis_prefix}memory:exp:*"):
            pending[key] = {k: float(v) for k, v in redis_client.hgetall(key).items()}
        return out, pending, redis_client.hgetall(f"{redis_prefix}memory:keys")

    incremental = snapshot()
    assert incremental[0] and incremental[1] and incremental[2]
    # A replayed run finds nothing new and changes nothing.
    assert updater.run().events == 0
    events_alias = f"{test_alias}-events"
    EventMover(redis_client, es, stream=stream, alias=events_alias,
               mappings_dir=settings.ingest.mappings_dir).move()
    rebuilt = rebuild_memory(es, redis_client, events_alias=events_alias, prefix=redis_prefix,
                             memory_alias=memory_alias, catalog_alias=catalog_slice,
                             half_life_days=None)
    assert rebuilt["events"] > 0 and rebuilt["drained"] == 0
    again = snapshot()
    assert again[0].keys() == incremental[0].keys()
    for pid, doc in incremental[0].items():
        for k in ("clicks", "examinations", "score"):
            assert again[0][pid][k] == pytest.approx(doc[k], abs=1e-4), (pid, k)
        # Updated pairs were written partially: key, provenance and item copy kept whole.
        for k in ("active", "source", "query_key", "item_id", "item"):
            assert again[0][pid][k] == doc[k], (pid, k)
        assert doc["item"].get("title"), pid
    assert again[1].keys() == incremental[1].keys()
    for key, fields in incremental[1].items():
        assert again[1][key] == pytest.approx(fields, abs=1e-4)
    assert again[2] == incremental[2]
    # With decay the learned pairs fade and the weakest fall below min_score (deleted).
    decayed = rebuild_memory(es, redis_client, events_alias=events_alias, prefix=redis_prefix,
                             memory_alias=memory_alias, catalog_alias=catalog_slice,
                             half_life_days=1e-6, now=time.time() + 86400)
    assert decayed["deleted"] > 0


def _feedback_events(redis_client, prefix):
    return [json.loads(f[b"data"]) for _, f in redis_client.xrange(f"{prefix}events")
            if f[b"type"] == b"feedback"]


def test_a_query_chain_teaches_the_abandoned_query_the_item_found_next(
        env, es, redis_client, redis_prefix, catalog_slice, settings):
    """A session: a descriptive query the user gives up on, then a lookup whose result they
    play. The play's feedback event lists the abandoned query (``chain``), and the memory
    updater (chain credit as configured) makes the memory arm return the played track for
    that query, to every later user. Searches of other sessions, searches that got a click
    and a skip form no chain."""
    from orchestrator.memory import memory_settings_kwargs
    from orchestrator.text import normalize_query

    orch, _, memory_alias = env
    assert orch.chains is not None and settings.memory.chain_weight == 0.5
    up = MemoryUpdater(redis_client, es, prefix=redis_prefix, memory_alias=memory_alias,
                       catalog_alias=catalog_slice, **memory_settings_kwargs(settings.memory))
    vague = "songs for a rainy tuesday commute"
    first = orch.search(vague, context={"session_id": "s1"}, size=60, total_budget=60)
    orch.search("music for my cat", context={"session_id": "s2"}, size=60, total_budget=60)
    # s3: the first search got a click, so the user did not give up on it
    liked = orch.search("taylor swift", context={"session_id": "s3"}, size=60, total_budget=60)
    orch.feedback(liked.request_id, liked.results[0].id, "click", token=liked.token)
    lookup = orch.search("love story", context={"session_id": "s1"}, size=60, total_budget=60)
    lookup3 = orch.search("shake it off", context={"session_id": "s3"}, size=60, total_budget=60)
    target = lookup.results[0].id
    orch.feedback(lookup.request_id, lookup.results[1].id, "skip", token=lookup.token)
    orch.feedback(lookup.request_id, target, "play", token=lookup.token)
    orch.feedback(lookup3.request_id, lookup3.results[0].id, "play", token=lookup3.token)
    events = {(e["request_id"], e["action"]): e for e in _feedback_events(redis_client, redis_prefix)}
    chain = events[(lookup.request_id, "play")]["chain"]
    assert [(c["query_key"], c["request_id"]) for c in chain] == [
        (normalize_query(vague), first.request_id)]
    assert 0 <= chain[0]["age_s"] < 60
    assert "chain" not in events[(lookup.request_id, "skip")]   # not a positive action
    assert "chain" not in events[(lookup3.request_id, "play")]  # s3's first search was clicked
    assert target not in memory_ids(first)
    up.run(batch_size=1000)
    es.indices.refresh(index=memory_alias)
    again = orch.search(vague, context={"session_id": "s9"}, size=60, total_budget=60)
    assert target in memory_ids(again)
    doc = es.get(index=memory_alias, id=pair_id(normalize_query(vague), target))["_source"]
    assert doc["source"] == "learned" and doc["clicks"] == pytest.approx(0.5 * 1.5)
    assert MemoryKeys(redis_client, prefix=redis_prefix).known_pairs(normalize_query(vague)) == 1
    # the cat query of another session learned nothing
    assert not es.exists(index=memory_alias, id=pair_id("music for my cat", target))


def test_query_chains_window_order_and_bounds(redis_client, redis_prefix):
    from orchestrator.chains import QueryChains, session_of

    now = [1000.0]
    chains = QueryChains(redis_client, prefix=redis_prefix, window_s=60, max_searches=4,
                         clock=lambda: now[0])
    assert session_of({"session_id": "a", "user_id": "u"}) == "s:a"
    assert session_of({"user_id": "u"}) == "u:u" and session_of({}) is None
    for rid, key, t in [("r0", "too old", 900.0), ("r1", "jazz", 980.0), ("r2", "jazz", 985.0),
                        ("r3", "blues", 990.0), ("r4", "take five", 1000.0), ("r5", "later", 1010.0)]:
        now[0] = t
        assert chains.record("s:a", request_id=rid, query_key=key)
    assert redis_client.llen(chains.key("s:a")) == 4  # r2 .. r5: at most max_searches
    assert 0 < redis_client.ttl(chains.key("s:a")) <= 60
    none = lambda rids: {}  # noqa: E731 - nothing counted on any request
    got = chains.abandoned("s:a", "r4", counted=none, positive=lambda a: a == "play")
    # newest first, one per key, not r5 (after r4), not r0 (trimmed, and out of the window)
    assert [(c["query_key"], c["request_id"], c["age_s"]) for c in got] == [
        ("blues", "r3", 10.0), ("jazz", "r2", 15.0)]
    played = lambda rids: {"r3": [("track:x", "play")]}  # noqa: E731
    assert [c["request_id"] for c in chains.abandoned("s:a", "r4", counted=played,
                                                      positive=lambda a: a == "play")] == ["r2"]
    assert chains.abandoned("s:a", "nope", counted=none, positive=bool) == []
    assert chains.abandoned("s:other", "r4", counted=none, positive=bool) == []
