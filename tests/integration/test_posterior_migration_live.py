"""Versioned bandit state against live Redis (and Elasticsearch for the QU trigger): what serves
while the featurizer or QU versions differ, and the migration that re-featurizes the log.

Everything lives under a unique Redis prefix (``redis_prefix``) and throw-away ``test-events-*``
indices; the committed QU model is copied to ``tmp_path`` before its version is changed.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid

import numpy as np
import pytest

from orchestrator.bandit_state import RedisBanditStore
from orchestrator.domain import ParsedQuery, RequestContext
from orchestrator.featurizer import FEATURIZER_VERSION, ContextFeaturizer, SelectionContext
from orchestrator.feedback import FeedbackLog
from orchestrator.rewards import ArmReward
from orchestrator.selection import ArmSpec, LinearThompsonSelector
from orchestrator.training import (
    _stream_events,
    migrate_posteriors,
    rebuild_posteriors,
    refeaturize_events,
    state_fields,
)

pytestmark = pytest.mark.elasticsearch

FZ = ContextFeaturizer()
LEGACY_DIM = 40  # the unversioned featurizer of hash_dim 16 (1 + 23 reserved + 16)
ARMS = (("lexical", "lexical.v1", (("source", "lexical"),)),
        ("genre", "genre.v1", (("source", "genre"),)))
SPECS = [ArmSpec(a, t, af) for a, t, af in ARMS]
QUERIES = ("queen b", "chill jazz", "tayler swift love story", "80s rock", "sad songs")
T0 = 1_790_000_000.0


class FakeQU:
    def __init__(self, version: str) -> None:
        self.version = version

    def parse_many(self, texts, *, batch_size=256):
        return [ParsedQuery(t, t, intent="browse" if " " in t else "artist",
                            intent_probs={"browse": 0.7, "artist": 0.3}, language="en",
                            model_version=self.version) for t in texts]


def _meta(redis_client, store):
    return {k.decode(): v.decode() for k, v in redis_client.hgetall(store.meta_key).items()}


def _stats(redis_client, prefix):
    out = {}
    base = f"{prefix}bandit:"
    for kind in ("lin", "beta"):
        for k in redis_client.scan_iter(match=f"{base}{kind}:*", count=1000):
            key = k.decode()[len(base):]
            out[key] = {f.decode(): float(v) for f, v in redis_client.hgetall(k).items()}
    return out


def _legacy_log(redis_client, prefix, n=20):
    """Impressions logged by the unversioned featurizer (dim 40, no versions in `selection`)
    plus feedback, in the events stream; returns the stream's last id."""
    rng = np.random.default_rng(0)
    last = None
    for i in range(n):
        rid = f"r{i}"
        idx = sorted(rng.choice(np.arange(1, LEGACY_DIM), size=3, replace=False).tolist())
        vals = rng.random(3)
        vals = (vals / np.linalg.norm(vals)).tolist()
        shown = [{"id": f"{rid}:item{r}", "rank": r,
                  "arms": [t for _, t, _ in ARMS] if r % 2 else ["lexical.v1"]}
                 for r in range(1, 6)]
        imp = {"request_id": rid, "ts": T0 + 60 * i, "query": QUERIES[i % len(QUERIES)],
               "context": {"hour": (5 * i) % 24, "weekday": i % 7,
                           "device": ("mobile", "desktop", None)[i % 3]},
               "executed": [t for _, t, _ in ARMS],
               "selection": {"features": {"qu:n_chars": 5.0}, "indices": [0, *idx],
                             "values": [1.0, *vals], "bucket": "intent=browse|daypart=night"},
               "decision": {"chosen": [{"arm": a, "template_id": t,
                                        "action_features": [list(x) for x in af]}
                                       for a, t, af in ARMS]},
               "shown": shown}
        fb = {"request_id": rid, "item_id": shown[i % 5]["id"], "action": ("click", "play")[i % 2],
              "ts": T0 + 60 * i + 5}
        redis_client.xadd(f"{prefix}events", {"type": "impression", "data": json.dumps(imp)})
        last = redis_client.xadd(f"{prefix}events", {"type": "feedback", "data": json.dumps(fb)})
    return last.decode()


def test_versions_decide_what_serves(redis_client, redis_prefix, caplog):
    store = RedisBanditStore(redis_client, prefix=redis_prefix, dim=FZ.dim,
                             featurizer_version=FZ.version, qu_version="qu-A")
    assert store.check_schema() == "current"
    meta = _meta(redis_client, store)
    assert (meta["dim"], meta["featurizer_version"], meta["qu_version"]) == \
        (str(FZ.dim), FEATURIZER_VERSION, "qu-A")
    ctx = FZ.transform(ParsedQuery("jazz", "jazz", intent="browse"), RequestContext(hour=9), "jazz")
    learner = LinearThompsonSelector(store, refresh_interval_s=0)
    store.apply(learner.updates_for(ctx, [ArmReward("lexical", "lexical.v1", 1.0, 1.0,
                                                    SPECS[0].action_features)]))
    learned = store.load_linear(["arm:lexical.v1"])["arm:lexical.v1"]
    assert learned.n == 1 and learned.A.any()

    # A QU promotion (same dim): the old statistics keep serving, with a warning.
    version = {"v": "qu-A"}
    stale = RedisBanditStore(redis_client, prefix=redis_prefix, dim=FZ.dim,
                             featurizer_version=FZ.version, qu_version=lambda: version["v"])
    assert stale.check_schema() == "current"
    version["v"] = "qu-B"  # hot reload in the running process: noticed on the next read
    with caplog.at_level(logging.WARNING, logger="orchestrator.bandit_state"):
        st = stale.load_linear(["arm:lexical.v1"])["arm:lexical.v1"]
    assert stale.compat == "stale" and np.allclose(st.A, learned.A)
    assert any("serving from the old statistics" in r.getMessage() for r in caplog.records)

    # Another dimension: priors serve; observations are logged (event, duplicate marker) but
    # not counted, so the old statistics stay intact for the migration to replace.
    other = ContextFeaturizer(hash_dim=8)
    inc = RedisBanditStore(redis_client, prefix=redis_prefix, dim=other.dim,
                           featurizer_version=other.version, qu_version="qu-A")
    with caplog.at_level(logging.WARNING, logger="orchestrator.bandit_state"):
        assert inc.check_schema() == "incompatible"
    assert any("serving from priors" in r.getMessage() for r in caplog.records)
    empty = inc.load_linear(["arm:lexical.v1", "af:source=lexical"])
    assert all(s.n == 0 and not s.A.any() and s.A.shape == (other.dim, other.dim)
               for s in empty.values())
    sel = LinearThompsonSelector(inc, refresh_interval_s=0, random_state=0)
    octx = other.transform(None, RequestContext(hour=9), "jazz")
    d = sel.select(octx, SPECS, total_budget=40)
    assert len(set(d.expected.values())) == 1  # every arm at the same prior
    n_events = redis_client.xlen(f"{redis_prefix}events")
    ups = sel.updates_for(octx, [ArmReward("lexical", "lexical.v1", 1.0, 1.0,
                                           SPECS[0].action_features)])
    assert inc.apply(ups, dedupe=(f"{redis_prefix}fb:x", "item\x1fclick", 60),
                     event={"request_id": "x"})
    assert not inc.apply(ups, dedupe=(f"{redis_prefix}fb:x", "item\x1fclick", 60))
    assert redis_client.xlen(f"{redis_prefix}events") == n_events + 1
    again = store.load_linear(["arm:lexical.v1"])["arm:lexical.v1"]
    assert again.n == 1 and np.allclose(again.A, learned.A)


def test_legacy_state_reads_as_featurizer_1(redis_client, redis_prefix):
    legacy = RedisBanditStore(redis_client, prefix=redis_prefix, dim=LEGACY_DIM)
    assert legacy.check_schema() == "current"  # no versions to compare
    assert legacy.state_versions() == {"dim": LEGACY_DIM, "featurizer_version": "1",
                                       "qu_version": None}
    same_dim = RedisBanditStore(redis_client, prefix=redis_prefix, dim=LEGACY_DIM,
                                featurizer_version=FZ.version)
    assert same_dim.check_schema() == "stale"
    assert "featurizer_version" not in _meta(redis_client, legacy)  # never back-filled


def test_migration_equals_a_rebuild_from_refeaturized_events(redis_client, redis_prefix, es):
    legacy = RedisBanditStore(redis_client, prefix=redis_prefix, dim=LEGACY_DIM)
    legacy.check_schema()
    upto = _legacy_log(redis_client, redis_prefix)
    # what the old live path accumulated (dim 40): keys the migration must replace
    legacy.apply(LinearThompsonSelector(legacy).updates_for(
        SelectionContext({}, (0, 39), (1.0, 1.0), "b"),
        [ArmReward("lexical", "lexical.v1", 1.0, 1.0, SPECS[0].action_features)]))
    serving = RedisBanditStore(redis_client, prefix=redis_prefix, dim=FZ.dim,
                               featurizer_version=FZ.version, qu_version="qu-2")
    assert serving.check_schema() == "incompatible"

    qu = FakeQU("qu-2")
    events_alias = f"test-events-{uuid.uuid4().hex[:8]}"  # absent: the stream is the log
    res = migrate_posteriors(es, redis_client, events_alias=events_alias, prefix=redis_prefix,
                             featurizer=FZ, understander=qu, half_life_days=None, now=T0 + 7200)
    assert res["migrated"] and res["mode"] == "replace" and res["upto"] == upto, res
    assert res["before"] == {"dim": LEGACY_DIM, "featurizer_version": "1", "qu_version": None}
    assert res["after"] == {"dim": FZ.dim, "featurizer_version": FEATURIZER_VERSION,
                            "qu_version": "qu-2"}
    assert res["refeaturized"] == 20 and res["applied"] > 0, res
    meta = _meta(redis_client, serving)
    assert (meta["dim"], meta["featurizer_version"], meta["qu_version"]) == \
        (str(FZ.dim), FEATURIZER_VERSION, "qu-2")
    assert json.loads(meta["migrated"])["mode"] == "replace"

    # the same thing by hand: re-featurize the log, rebuild, compare every field
    log = _stream_events(FeedbackLog(redis_client, store=serving), upto=upto)
    refeat, counts = refeaturize_events(log, featurizer=FZ, understander=FakeQU("qu-2"))
    assert counts["refeaturized"] == 20
    state = rebuild_posteriors(refeat, now=T0 + 7200, half_life_days=None, dim=FZ.dim,
                               policy="linear", upto=upto)
    expected = state_fields(state)
    got = _stats(redis_client, redis_prefix)
    assert set(got) == set(expected)
    for key, fields in expected.items():
        assert set(got[key]) == set(fields), key
        for f, v in fields.items():
            assert got[key][f] == pytest.approx(v, rel=1e-9, abs=1e-12), (key, f)
    assert all(int(f.split(":")[1]) < FZ.dim for k in got for f in got[k] if f[:2] in ("A:", "b:"))

    # serving processes notice on their next read; a second run has nothing to do
    st = serving.load_linear(["arm:lexical.v1"])["arm:lexical.v1"]
    assert serving.compat == "current" and st.n > 0
    again = migrate_posteriors(es, redis_client, events_alias=events_alias, prefix=redis_prefix,
                               featurizer=FZ, understander=qu, half_life_days=None)
    assert again["migrated"] is False
    # a QU-only change keeps the dimension: the difference is added (live updates kept)
    delta = migrate_posteriors(es, redis_client, events_alias=events_alias, prefix=redis_prefix,
                               featurizer=FZ, understander=FakeQU("qu-3"), half_life_days=None,
                               now=T0 + 7200)
    assert delta["mode"] == "delta" and delta["after"]["qu_version"] == "qu-3"
    assert _meta(redis_client, serving)["qu_version"] == "qu-3"


def test_qu_promotion_triggers_the_migration(es, redis_client, redis_prefix, settings, tmp_path,
                                             monkeypatch):
    from orchestrator import qu_retrain, tasks
    from orchestrator.understanding import METADATA_FILENAME, clear_understander_cache

    model_dir = tmp_path / "qu_models"
    shutil.copytree(settings.qu.model_dir, model_dir)
    old_version = json.loads((model_dir / METADATA_FILENAME).read_text())["version"]
    store = RedisBanditStore(redis_client, prefix=redis_prefix, dim=FZ.dim,
                             featurizer_version=FZ.version, qu_version=old_version)
    assert store.check_schema() == "current"
    _legacy_log(redis_client, redis_prefix, n=6)

    def promote(es_, **kwargs):  # stands in for a real retrain that wins (test_qu_retrain_live)
        meta_file = kwargs["model_dir"] / METADATA_FILENAME
        meta = json.loads(meta_file.read_text())
        meta.update(version=f"{old_version}.promoted", parent_version=old_version)
        meta_file.write_text(json.dumps(meta))
        return {"promoted": True, "version_before": old_version,
                "version_after": meta["version"]}

    monkeypatch.setattr(qu_retrain, "retrain_from_events", promote)
    index = f"test-events-{uuid.uuid4().hex[:8]}"
    body = json.loads((settings.ingest.mappings_dir / "events.v1.json").read_text())
    es.indices.create(index=f"{index}-000001", settings=body["settings"],
                      mappings=body["mappings"], aliases={index: {}})
    s = settings.model_copy(update={
        "redis": settings.redis.model_copy(update={"key_prefix": redis_prefix}),
        "es": settings.es.model_copy(update={"events_alias": index}),
        "qu": settings.qu.model_copy(update={"model_dir": model_dir}),
    })
    try:
        res = tasks.run_train_qu(s, es, redis_client)
    finally:
        es.indices.delete(index=f"{index}-000001", ignore_unavailable=True)
        clear_understander_cache(model_dir)
    assert res["promoted"] is True
    post = res["posteriors"]
    assert post["migrated"] and post["mode"] == "delta", post
    assert post["before"]["qu_version"] == old_version
    assert post["after"]["qu_version"] == f"{old_version}.promoted"
    assert post["refeaturized"] == 6 and post["queries_parsed"] == 5, post  # the real model
    meta = _meta(redis_client, store)
    assert meta["qu_version"] == f"{old_version}.promoted"
    assert meta["featurizer_version"] == FEATURIZER_VERSION and meta["dim"] == str(FZ.dim)
    # the store of a process still on the old model now warns (same dim: old statistics serve)
    assert store.refresh_compat() == "stale"


def test_scheduled_rebuild_migrates_and_never_reverts(es, redis_client, redis_prefix, settings):
    from orchestrator import tasks

    legacy = RedisBanditStore(redis_client, prefix=redis_prefix, dim=LEGACY_DIM)
    legacy.check_schema()
    _legacy_log(redis_client, redis_prefix)
    s = settings.model_copy(update={
        "redis": settings.redis.model_copy(update={"key_prefix": redis_prefix}),
        "es": settings.es.model_copy(update={"events_alias": f"test-events-{uuid.uuid4().hex[:8]}"}),
    })
    # dim 40 -> 119: a plain replay would raise StateVersionError; the job migrates instead
    first = tasks.run_rebuild_posteriors(s, es, redis_client)
    assert first["migrated"] and first["mode"] == "replace" and first["refeaturized"] == 20, first
    assert first["after"]["dim"] == FZ.dim and first["applied"] > 0
    migrated = _stats(redis_client, redis_prefix)
    # the log still holds the old contexts: the next scheduled rebuild re-featurizes them
    # again (same state) instead of replaying them into the new dimension
    second = tasks.run_rebuild_posteriors(s, es, redis_client)
    assert second["mode"] == "delta" and second["refeaturized"] == 20, second
    again = _stats(redis_client, redis_prefix)
    assert set(again) == set(migrated)
    for key, fields in migrated.items():
        for f, v in fields.items():
            assert again[key].get(f, 0.0) == pytest.approx(v, rel=1e-9, abs=1e-9), (key, f)
