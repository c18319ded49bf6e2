"""Pure retraining functions: decayed posterior replay, time split, NDCG, promotion rule."""

from __future__ import annotations

import datetime as dt
import json
import math

import numpy as np
import pytest

from orchestrator.bandit_state import InMemoryBanditStore, LinearStats
from orchestrator.budgets import level_updates
from orchestrator.rescoring import (
    LinearRescorer,
    current_version,
    load_latest,
    read_pointer,
    write_pointer,
)
from orchestrator.rewards import EMPTY_ACTION, RewardModel, level_rewards, outcome_rewards
from orchestrator.selection import LinearThompsonSelector, SelectionContext
from orchestrator.training import (
    RankingGroup,
    decay_weight,
    event_time,
    merge_events,
    ndcg_at_k,
    ranking_groups,
    rebuild_posteriors,
    retrain_ranker,
    should_promote,
    state_fields,
    stream_id_key,
    time_split,
)

DIM = 8
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc).timestamp()
ARMS = (("lexical", "lexical.v1", (("source", "lexical"),)),
        ("genre", "genre.v1", (("source", "genre"),)))
NAMES = ("rrf", "popularity", "title_exact")


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="milliseconds")


def impression(rid: str, ts: float, *, seq: int, rng: np.random.Generator, n_items: int = 5,
               executed: tuple[str, ...] = ("lexical.v1", "genre.v1")) -> dict:
    idx = sorted(rng.choice(np.arange(1, DIM), size=2, replace=False).tolist())
    vals = rng.random(2)
    vals = vals / np.linalg.norm(vals)
    shown = []
    for r in range(1, n_items + 1):
        arms = [t for _, t, _ in ARMS if rng.random() < 0.6] or ["lexical.v1"]
        shown.append({"id": f"{rid}:item{r}", "rank": r, "arms": arms,
                      "features": [round(float(v), 6) for v in rng.random(len(NAMES))]})
    return {
        "type": "impression", "event_id": f"{int(ts * 1000)}-{seq}", "request_id": rid,
        "ts": iso(ts), "query": "q", "executed": list(executed),
        "arm_stats": {t: {"took_ms": float(5 + seq + len(rid))} for t in executed},
        "selection": {"features": {}, "indices": [0, *idx], "values": [1.0, *vals.tolist()],
                      "bucket": f"intent=x|daypart={'night' if seq % 2 else 'day'}"},
        "decision": {"chosen": [{"arm": a, "template_id": t,
                                 "action_features": [list(x) for x in af]} for a, t, af in ARMS]},
        "feature_names": list(NAMES), "shown": shown,
    }


def feedback(imp: dict, ts: float, *, seq: int, rank: int, action: str) -> dict:
    item = None if action == EMPTY_ACTION else imp["shown"][rank - 1]["id"]  # older versions' event
    return {"type": "feedback", "event_id": f"{int(ts * 1000)}-{seq}",
            "request_id": imp["request_id"], "item_id": item, "action": action, "ts": iso(ts)}


def make_log(n: int = 30, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    events = []
    for i in range(n):
        ts = T0 + 3600 * i
        imp = impression(f"r{i}", ts, seq=0, rng=rng)
        events.append(imp)
        action = ["click", "play", "like", "skip", "click"][i % 5]
        events.append(feedback(imp, ts + 5, seq=1, rank=1 + i % 5, action=action))
        if i % 3 == 0:  # a second action on another item
            events.append(feedback(imp, ts + 9, seq=2, rank=1 + (i + 2) % 5, action="favorite"))
        if i % 4 == 1:  # a third on the first item: still one observation
            events.append(feedback(imp, ts + 11, seq=3, rank=1 + i % 5, action="favorite"))
        if i % 10 == 4:  # an older version's zero observation: ignored now
            events.append(feedback(imp, ts + 1, seq=4, rank=1, action=EMPTY_ACTION))
    return events


def live_accumulate(events: list[dict], reward_model: RewardModel,
                    learner_cls=LinearThompsonSelector) -> InMemoryBanditStore:
    """What Orchestrator.search and .feedback do, against an in-memory store (same calls, same
    order): each impression's search-time observation, then each feedback raising it (the
    request's outcome hash keeps the max)."""
    store = InMemoryBanditStore(dim=DIM)
    learner = learner_cls(store)
    imps = {e["request_id"]: e for e in events if e["type"] == "impression"}
    for e in events:
        imp = imps.get(e["request_id"])
        if imp is None or e.get("action") == EMPTY_ACTION:
            continue
        acts = [] if e["type"] == "impression" else [(e["item_id"], e["action"])]
        ctx = SelectionContext.from_dict(imp["selection"])
        updates = [*learner.updates_for(ctx, outcome_rewards(imp, acts, reward_model)),
                   *level_updates(ctx, level_rewards(imp, acts, reward_model))]
        dedupe = None if e["type"] == "impression" else (
            e["request_id"], f"{e['item_id']}\x1f{e['action']}", 0)
        store.apply(updates, dedupe=dedupe, outcome=(f"out:{e['request_id']}", 0))
    return store


def test_decay_weight():
    day = 86400.0
    assert decay_weight(0, half_life_days=7) == 1.0
    assert decay_weight(7 * day, half_life_days=7) == pytest.approx(0.5)
    assert decay_weight(21 * day, half_life_days=7) == pytest.approx(0.125)
    assert decay_weight(-5 * day, half_life_days=7) == 1.0  # clock skew: never more than 1
    assert decay_weight(1e9, half_life_days=None) == 1.0
    with pytest.raises(ValueError):
        decay_weight(1.0, half_life_days=0)


def test_event_time_and_stream_ids():
    assert event_time({"ts": "2026-01-01T00:00:00+00:00"}) == T0
    assert event_time({"ts": int(T0 * 1000)}) == T0
    assert event_time({"event_id": f"{int(T0 * 1000)}-3"}) == T0
    assert stream_id_key("10-2") < stream_id_key("10-10") < stream_id_key("11-0")
    a = [{"event_id": "2-0", "v": "es"}, {"event_id": "1-0"}]
    merged = merge_events([{"event_id": "2-0", "v": "stream"}], a)
    assert [e["event_id"] for e in merged] == ["1-0", "2-0"] and merged[1]["v"] == "stream"


def test_rebuild_without_decay_equals_live_accumulation():
    events = make_log()
    events.append(dict(events[1]))  # a re-delivered duplicate: counted once, as live
    events.append({"type": "feedback", "request_id": "gone", "item_id": "x", "action": "click",
                   "event_id": "1-0", "ts": iso(T0)})  # impression never logged
    rm = RewardModel()
    state = rebuild_posteriors(events, now=T0 + 1e7, half_life_days=None, dim=DIM, reward_model=rm)
    live = live_accumulate(events[:-2], rm)
    comps = sorted(state["linear"])
    assert comps == ["af:source=genre", "af:source=lexical", "arm:genre.v1", "arm:lexical.v1"]
    for comp, st in live.load_linear(comps).items():
        got = state["linear"][comp]
        assert got["n"] == st.n and got["w"] == pytest.approx(st.w)
        np.testing.assert_allclose(got["A"], st.A, atol=1e-12)
        np.testing.assert_allclose(got["b"], st.b, atol=1e-12)
    meta = state["meta"]
    assert meta["duplicates"] == 1 and meta["skipped_no_impression"] == 1
    assert meta["legacy_empty"] == 3 and meta["applied"] == 30 + 10 + 8
    assert meta["observed"] == 30  # one observation per impression (and per arm)
    assert state["linear"]["arm:lexical.v1"]["n"] == 30


def test_rebuild_equals_live_for_beta_and_budget_level_statistics():
    from orchestrator.selection import BetaThompsonSelector

    events = make_log(n=20, seed=3)
    for e in events:  # learned budget levels: lexical ran 20 deep, genre 40
        if e["type"] == "impression":
            e["decision"]["budget_levels"] = [10, 20, 40]
            for c, (lvl, budget) in zip(e["decision"]["chosen"], ((20, 20), (40, 30))):
                c["level"], c["budget"] = lvl, budget
            for s_ in e["shown"]:
                s_["provenance"] = [{"template_id": t, "rank": 3 * s_["rank"] + 4}
                                    for t in s_["arms"]]
    rm = RewardModel()
    state = rebuild_posteriors(events, now=T0, half_life_days=None, dim=DIM, policy="simple",
                               reward_model=rm)
    live = live_accumulate(events, rm, BetaThompsonSelector)
    tids = sorted(state["beta"])
    assert tids == ["budget:genre.v1", "budget:lexical.v1", "genre.v1", "lexical.v1"]
    for tid, bs in live.load_beta(tids).items():
        got = state["beta"][tid]
        assert set(got) == set(bs.buckets)
        for bucket, cell in bs.buckets.items():
            assert got[bucket] == pytest.approx(cell, abs=1e-12), (tid, bucket)
    # genre fetched 30: level 40 is censored, never observed
    assert not any(b.startswith("l40") for b in state["beta"]["budget:genre.v1"])
    assert state["beta"]["budget:lexical.v1"]["l20|*"][2] == 20  # one observation per search


def test_decay_halves_old_evidence_exactly():
    events = make_log(n=2)
    one = [e for e in events if e["request_id"] == "r0"]
    fb_ts = max(event_time(e) for e in one)
    half_life = 3.0
    fresh = rebuild_posteriors(one, now=fb_ts, half_life_days=half_life, dim=DIM)
    old = rebuild_posteriors(one, now=fb_ts + 2 * half_life * 86400, half_life_days=half_life,
                             dim=DIM)
    for comp in fresh["linear"]:
        np.testing.assert_allclose(np.asarray(old["linear"][comp]["A"]),
                                   0.25 * np.asarray(fresh["linear"][comp]["A"]), atol=1e-12)
        np.testing.assert_allclose(np.asarray(old["linear"][comp]["b"]),
                                   0.25 * np.asarray(fresh["linear"][comp]["b"]), atol=1e-12)
        assert old["linear"][comp]["n"] == fresh["linear"][comp]["n"]  # n counts observations


def test_rebuild_is_idempotent_and_order_independent():
    events = make_log()
    kw = {"now": T0 + 40 * 3600, "half_life_days": 1.0, "dim": DIM}
    a = rebuild_posteriors(events, **kw)
    b = rebuild_posteriors(list(reversed(events)), **kw)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    c = rebuild_posteriors(events, **{**kw, "half_life_days": 2.0})
    assert c["meta"]["fingerprint"] != a["meta"]["fingerprint"]


def test_upto_cuts_the_log():
    events = make_log(n=10)
    cut = events[10]["event_id"]  # an impression in the middle
    full = rebuild_posteriors(events, now=T0, half_life_days=None, dim=DIM)
    part = rebuild_posteriors(events, now=T0, half_life_days=None, dim=DIM, upto=cut)
    kept = [e for e in events if stream_id_key(e["event_id"]) <= stream_id_key(cut)]
    n_kept = sum(e["type"] == "feedback" for e in kept)
    assert part["meta"]["applied"] == n_kept < full["meta"]["applied"]


def test_simple_policy_rebuilds_beta_statistics():
    state = rebuild_posteriors(make_log(n=10), now=T0, half_life_days=None, dim=DIM,
                               policy="simple")
    assert not state["linear"] and set(state["beta"]) == {"lexical.v1", "genre.v1"}
    cells = state["beta"]["lexical.v1"]
    assert "*" in cells and cells["*"][2] == sum(c[2] for k, c in cells.items() if k != "*")


def test_dimension_mismatch_is_skipped_not_mixed():
    events = make_log(n=3)
    state = rebuild_posteriors(events, now=T0, half_life_days=None, dim=3)
    assert state["meta"]["skipped_dim"] > 0


def test_state_fields_use_the_redis_layout():
    state = rebuild_posteriors(make_log(n=5), now=T0, half_life_days=None, dim=DIM)
    fields = state_fields(state)
    lin = fields["lin:arm:lexical.v1"]
    assert {"n", "w"} <= set(lin) and all(k.count(":") == 2 for k in lin if k.startswith("A:"))
    assert all(int(k.split(":")[1]) <= int(k.split(":")[2]) for k in lin if k.startswith("A:"))
    # Reading the fields back the way RedisBanditStore.load_linear does gives the state.
    st = LinearStats.empty(DIM)
    for k, v in lin.items():
        if k[0] == "A":
            _, i, j = k.split(":")
            st.A[int(i), int(j)] = st.A[int(j), int(i)] = v
        elif k[0] == "b":
            st.b[int(k[2:])] = v
    np.testing.assert_allclose(st.A, state["linear"]["arm:lexical.v1"]["A"])
    np.testing.assert_allclose(st.b, state["linear"]["arm:lexical.v1"]["b"])


# -- ranker ---------------------------------------------------------------------------------------
def group(rid: str, ts: float, y: list[int]) -> RankingGroup:
    return RankingGroup(rid, ts, np.zeros((len(y), 2)), np.asarray(y))


def test_time_split_holds_out_the_newest():
    groups = [group(f"r{i}", T0 + i, [1, 0]) for i in (5, 1, 9, 3, 7, 0, 2, 4, 6, 8)]
    train, test = time_split(groups, holdout_fraction=0.2)
    assert [g.ts - T0 for g in test] == [8, 9] and len(train) == 8
    assert max(g.ts for g in train) < min(g.ts for g in test)
    assert time_split(groups[:2], holdout_fraction=0.01)[1][0].ts == T0 + 5
    with pytest.raises(ValueError):
        time_split(groups, holdout_fraction=1.0)


def test_ndcg():
    assert ndcg_at_k([3, 2, 1], [1, 0, 0]) == 1.0
    assert ndcg_at_k([1, 2, 3], [1, 0, 0]) == pytest.approx(0.5)
    assert ndcg_at_k([0, 0, 0], [0, 0, 1]) == pytest.approx(0.5)  # ties keep display order
    assert ndcg_at_k([1, 2], [0, 0]) == 0.0
    assert ndcg_at_k(list(range(20)), [1] + [0] * 19, k=10) == 0.0  # below the cut-off


def test_promotion_rule():
    assert should_promote(0.5, 0.6, n_holdout=10, min_holdout=5, min_improvement=0.0)
    assert not should_promote(0.6, 0.6, n_holdout=10, min_holdout=5, min_improvement=0.0)
    assert not should_promote(0.5, 0.52, n_holdout=10, min_holdout=5, min_improvement=0.05)
    assert not should_promote(0.1, 0.9, n_holdout=4, min_holdout=5, min_improvement=0.0)
    assert should_promote(math.nan, 0.5, n_holdout=5, min_holdout=5, min_improvement=0.0)
    assert not should_promote(0.5, math.nan, n_holdout=5, min_holdout=5, min_improvement=0.0)


def ranker_log(n: int, seed: int = 3, *, t0: float = T0) -> list[dict]:
    """Users click the shown item with the LOWEST popularity (feature 1): learnable, and the
    opposite of the default model's popularity prior."""
    rng = np.random.default_rng(seed)
    events = []
    for i in range(n):
        ts = t0 + 60 * i
        imp = impression(f"q{i}", ts, seq=0, rng=rng, n_items=8)
        events.append(imp)
        pick = int(np.argmin([s["features"][1] for s in imp["shown"]]))
        events.append(feedback(imp, ts + 3, seq=1, rank=pick + 1, action="click"))
    return events


def test_ranking_groups_join_and_layout():
    events = ranker_log(6)
    other = dict(events[0], request_id="odd", feature_names=["x"], event_id="1-0")
    other["shown"] = [{"id": "a", "rank": 1, "arms": [], "features": [0.0]}]
    events += [other, {"type": "feedback", "request_id": "odd", "item_id": "a", "action": "click"}]
    groups, names, counts = ranking_groups(events)
    assert names == NAMES and len(groups) == 6 and counts["skipped_layout"] == 1
    assert all(g.y.sum() == 1 and g.X.shape == (8, 3) for g in groups)
    assert [g.ts for g in groups] == sorted(g.ts for g in groups)
    # A window in time.
    assert len(ranking_groups(events, now=T0 + 60 * 2 + 1)[0]) == 3


def test_retrain_promotes_a_better_model_once(tmp_path):
    events = ranker_log(150)
    now = T0 + 86400
    first = retrain_ranker(events, model_dir=tmp_path, now=now)
    assert first["promoted"], first
    assert first["current_version"] == 0 and first["version"] == 1
    assert first["metrics"]["candidate"] > first["metrics"]["current"] + 0.2
    assert first["holdout_groups"] == 30 and first["train_groups"] == 120
    assert read_pointer(tmp_path)["version"] == 1 == current_version(tmp_path)
    model = load_latest(tmp_path)
    meta = model.metadata
    assert meta["parent_version"] == 0 and meta["data_hash"] == first["data_hash"]
    assert meta["metrics"] == first["metrics"] and meta["holdout"]["from"] > meta["train"]["to"]
    assert model.coef_[list(model.feature_names).index("popularity")] < 0
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    # Same data: nothing new (the promoted model equals the candidate, and the hash is known).
    again = retrain_ranker(events, model_dir=tmp_path, now=now + 3600)
    assert not again["promoted"] and again["version"] == 1
    assert again["data_hash"] == first["data_hash"]
    assert sorted(p.name for p in tmp_path.glob("rescorer.v*.json")) == ["rescorer.v1.json"]


def test_retrain_keeps_a_model_that_cannot_be_beaten(tmp_path):
    events = ranker_log(100, seed=5)
    perfect = LinearRescorer(feature_names=NAMES, coef=[0.0, -1.0, 0.0], name="oracle")
    path = perfect.save(tmp_path)
    write_pointer(tmp_path, 1, path=path.name)
    res = retrain_ranker(events, model_dir=tmp_path, now=T0 + 86400)
    assert res["metrics"]["current"] == 1.0 and not res["promoted"]
    assert "does not beat" in res["reason"] and current_version(tmp_path) == 1


def test_retrain_needs_enough_data(tmp_path):
    res = retrain_ranker(ranker_log(10), model_dir=tmp_path, now=T0 + 86400, min_examples=20)
    assert not res["promoted"] and res["reason"].startswith("not enough data")
    assert not tmp_path.exists() or not list(tmp_path.iterdir())
    assert retrain_ranker([], model_dir=tmp_path, now=T0)["promoted"] is False


def test_pointer_rollback_and_legacy_folders(tmp_path):
    m = LinearRescorer(feature_names=NAMES, coef=[1.0, 0.0, 0.0])
    m.save(tmp_path)
    m.save(tmp_path)
    assert current_version(tmp_path) == 2  # no pointer yet: the newest file
    write_pointer(tmp_path, 1)
    assert current_version(tmp_path) == 1 and load_latest(tmp_path).metadata["version"] == 1
    with pytest.raises(FileNotFoundError):
        write_pointer(tmp_path, 7)
    write_pointer(tmp_path, 0)  # back to the default model
    assert load_latest(tmp_path).name == "default-rrf"


def test_interrupted_promotion_is_completed_not_duplicated(tmp_path):
    old, new = ranker_log(100, seed=7), ranker_log(150, seed=8, t0=T0 + 86400)
    assert retrain_ranker(old[:60], model_dir=tmp_path, now=T0 + 86400, min_examples=10)["promoted"]
    # A weak v2 is current; a run promotes v3 but "dies" before moving the pointer.
    weak = LinearRescorer(feature_names=NAMES, coef=[1.0, 0.5, 0.0])  # favours popular items
    weak.save(tmp_path)
    write_pointer(tmp_path, 2)
    res = retrain_ranker(old + new, model_dir=tmp_path, now=T0 + 3 * 86400)
    assert res["promoted"] and res["version"] == 3
    write_pointer(tmp_path, 2)  # the crash: file v3 written, pointer still at v2
    again = retrain_ranker(old + new, model_dir=tmp_path, now=T0 + 3 * 86400)
    assert again["promoted"] and again["version"] == 3 and "interrupted" in again["reason"]
    assert current_version(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.glob("rescorer.v*.json")) == [
        "rescorer.v1.json", "rescorer.v2.json", "rescorer.v3.json"]

