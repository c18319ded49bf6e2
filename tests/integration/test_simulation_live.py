"""A small simulation against the live catalog slice and Redis: the report's structure and
ranges, the files it writes, the per-policy Redis prefixes (cleaned afterwards) and
reproducibility: the same seed gives the same query stream and identical per-round results,
for a learning policy (Thompson sampling with its posteriors, seeded request ids and the
retraining jobs on its own click log) as well as for a single arm."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from orchestrator.errors import OrchestratorError
from orchestrator.simulation.report import read_rounds, write_all
from orchestrator.simulation.runner import SimConfig, Simulation, regenerate_bounds

pytestmark = [pytest.mark.elasticsearch, pytest.mark.redis]

SLICE_GENRES = ["pop", "country", "jazz", "rock", "hip-hop", "dance", "latin", "r&b", "rap", "edm",
                "classical", "metal", "soul", "blues", "indie"]
POLICIES = ["arm:lexical.v2", "hybrid_rrf", "random", "ours"]


def _config(prefix: str, **kw) -> SimConfig:
    base = dict(rounds=45, seed=3, policies=POLICIES, oracle=True, calibration_per_type=3,
                genres=SLICE_GENRES, prefix_root=prefix, static_from_fraction=0.0,
                unseen_eval_max=8)
    base.update(kw)
    return SimConfig(**base)


@pytest.fixture(scope="module")
def sources(settings):
    from orchestrator.simulation.queries import QuerySources

    return QuerySources.load(settings.ingest.data_dir, genres=set(SLICE_GENRES))


def test_small_simulation_report_files_and_reproducibility(es, redis_client, redis_prefix, settings,
                                                            catalog_slice, sources, tmp_path: Path):
    sim = Simulation(_config(redis_prefix), settings, es=es, redis=redis_client,
                     alias=catalog_slice, sources=sources)
    seen_keys: list[int] = []

    def count_keys(t: int) -> None:
        if t == 10:
            seen_keys.append(sum(1 for _ in redis_client.scan_iter(match=f"{redis_prefix}*", count=1000)))

    result = sim.run(progress=False, on_round=count_keys)
    report = write_all(result, tmp_path)

    # -- structure and ranges
    names = set(report["policies"])
    assert names == {*POLICIES, "oracle"}
    assert set(report["oracle_plans"]) <= {"playlist", "known_item", "tag"} and report["oracle_plans"]
    for name, entry in report["policies"].items():
        o = entry["overall"]
        assert o["n"] == 45, name
        for m in ("ndcg", "success", "mrr", "cand_recall", "cand_hit", "clicked"):
            assert 0.0 <= o[m] <= 1.0, (name, m, o[m])
        assert o["success"] <= o["cand_hit"] + 1e-9  # shown items are candidates
        assert o["candidates_unique"] <= 60 and o["failed_searches"] == 0
        assert len(entry["over_time"]) == 10
        assert sum(entry["by_type"][t].get("n", 0) for t in ("playlist", "known_item", "tag")) == 45
    assert report["policies"]["oracle"]["cumulative_regret"] == 0.0
    assert report["policies"]["arm:lexical.v2"]["overall"]["arms_per_request"] == 1.0
    rows = [r for r in result.records if r.policy == "hybrid_rrf"]
    assert all(set(r.arms) == {"lexical.v2", "semantic.v1"} for r in rows)
    assert all(r.subset_propensity == 1.0 for r in rows)
    random_rows = [r for r in result.records if r.policy == "random"]
    assert {len(r.arms) for r in random_rows} <= {1, 2, 3}
    assert all(0 < r.subset_propensity < 1 for r in random_rows)
    # the known-item lookups (real titles, some misspelt) are found by the lexical arm
    lex_known = report["policies"]["arm:lexical.v2"]["by_type"]["known_item"]
    if lex_known.get("n", 0) >= 5:
        assert lex_known["cand_hit"] > 0.3
    # users clicked and the learning policy received the feedback through the public API
    assert report["policies"]["ours"]["overall"]["clicked"] > 0
    assert report["ope"]["random"]["clicked"]["targets"]["hybrid_rrf"]["actual"] is not None
    verdicts = {v["qtype"]: v for v in report["ours_vs_best_static"]}
    assert "all" in verdicts and set(verdicts) <= {"playlist", "known_item", "tag", "all"}
    assert verdicts["all"]["best_static"] in ("arm:lexical.v2", "hybrid_rrf")

    # -- files
    for f in ("report.json", "rounds.jsonl.gz", "table.md", "cumulative_reward.png",
              "cumulative_regret.png", "arm_share.png", "success_by_type.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["config"]["seed"] == 3 and saved["config"]["rounds"] == 45
    # -- bounds: one list per key on the last third; the report rebuild regenerates the
    #    stream from the recorded config, checks it against the round log, and agrees
    b = saved["bounds"]
    assert b["score_from"] == 30 and b["overall"]["n"] == 15
    assert 0.0 <= b["overall"]["learned"]["success"] <= b["overall"]["hindsight"]["success"] <= 1.0
    logged = read_rounds(tmp_path / "rounds.jsonl.gz")
    assert regenerate_bounds(saved["config"], settings.ingest.data_dir, logged) == b
    tampered = [dict(r, key="not the key") if r["t"] == 7 else r for r in logged]
    with pytest.raises(OrchestratorError, match="differs from the round log"):
        regenerate_bounds(saved["config"], settings.ingest.data_dir, tampered)

    # -- state: one prefix per policy while running, nothing left afterwards
    assert seen_keys and seen_keys[0] > 0
    assert not list(redis_client.scan_iter(match=f"{redis_prefix}{sim.run_id}:*", count=1000))

    # -- reproducibility: same seed, same stream, identical rounds, also for the learning
    #    policy with retraining jobs after rounds 10 and 20 (move its events to its own
    #    index, rebuild its posteriors, train the ranker)
    # Bit for bit needs a reward that does not depend on measured time: the latency cost
    # (reward.latency_cost_per_ms x the arm's ES took) is switched off for these runs.
    timeless = settings.model_copy(update={
        "reward": settings.reward.model_copy(update={"latency_cost_per_ms": 0.0})})

    def rerun():
        sim_ = Simulation(_config(redis_prefix, rounds=24,
                                  policies=["arm:lexical.v2", "ours", "ours_no_retrain"],
                                  oracle=False, retrain_every=10, move_every=0),
                          timeless, es=es, redis=redis_client, alias=catalog_slice, sources=sources)
        return sim_, sim_.run(progress=False)

    def rounds_of(res, policy=None):
        return [{k: v for k, v in asdict(r).items() if k not in ("latency_ms", "es_ms")}
                for r in res.records if policy is None or r.policy == policy]

    again, res2 = rerun()
    assert [q["text"] for q in res2.queries] == [q["text"] for q in result.queries[:24]]
    first = [(r.query, r.ndcg, r.success, r.n_candidates, r.clicked)
             for r in result.records if r.policy == "arm:lexical.v2" and r.phase == "stream"][:24]
    second = [(r.query, r.ndcg, r.success, r.n_candidates, r.clicked)
              for r in res2.records if r.policy == "arm:lexical.v2" and r.phase == "stream"]
    assert first == second
    assert [rt["after_round"] for rt in res2.retrains] == [10, 20]
    for rt in res2.retrains:
        assert rt["move_events"]["moved"] > 0 and rt["rebuild_posteriors"]["swapped"], rt
        assert "promoted" in rt["train_ranker"] and "skipped" in rt["train_memory"]
    assert res2.retrains[1]["rebuild_posteriors"]["applied"] > res2.retrains[0]["rebuild_posteriors"]["applied"]
    # the final pass over playlist titles the stream never used: no feedback, phase "unseen"
    assert sum(r["phase"] == "unseen" for r in rounds_of(res2, "ours")) == 8
    ours2 = [r for r in rounds_of(res2, "ours") if r["phase"] == "stream"]
    assert len(ours2) == 24 and len({tuple(r["arms"]) for r in ours2}) > 1  # it explores
    assert all(0 < r["subset_propensity"] <= 1 for r in ours2)
    # the logged joint propensity is not the product of the per-arm ones
    assert any(abs(r["subset_propensity"] - r["subset_propensity_indep"]) > 0.01 for r in ours2)
    third_sim, res3 = rerun()
    assert third_sim.run_id != again.run_id
    assert rounds_of(res3) == rounds_of(res2)  # every policy, every round, bit for bit
    for x, y in zip(res3.retrains, res2.retrains):  # (event ids and times differ: wall clock)
        assert [x[k].get(c) for k, c in (("move_events", "moved"), ("rebuild_posteriors", "applied"),
                                         ("train_ranker", "train_positives"),
                                         ("train_ranker", "promoted"))] == \
            [y[k].get(c) for k, c in (("move_events", "moved"), ("rebuild_posteriors", "applied"),
                                      ("train_ranker", "train_positives"), ("train_ranker", "promoted"))]
    # retraining state is per run and removed afterwards
    for sim_ in (again, third_sim):
        assert not es.indices.exists_alias(name=sim_.events_alias("ours"))
        assert not any(p.exists() for p in sim_.model_dirs)
    # Without a ranker promotion, a rebuild (no decay) reproduces the live posteriors, so
    # ours and ours_no_retrain (same seeds) make the same decisions.
    if all(not rt["train_ranker"]["promoted"] for rt in res2.retrains):
        assert [r["arms"] for r in ours2] == [r["arms"] for r in rounds_of(res2, "ours_no_retrain")
                                                 if r["phase"] == "stream"]
    other = Simulation(_config(redis_prefix, rounds=24, seed=4, policies=["arm:lexical.v2"],
                               oracle=False), settings, es=es, redis=redis_client,
                       alias=catalog_slice, sources=sources)
    assert [q.text for q in other.stream.generate(24)] != [q["text"] for q in res2.queries]


def test_memory_learning_per_policy_clone(es, redis_client, redis_prefix, settings, catalog_slice,
                                          sources):
    """With memory_every=1, ours' own memory clone gains pairs from its clicks while
    ours_no_memory's clone (seeded from the same index) stays as it was; cleanup deletes both
    clones; the source memory index is writable again afterwards."""
    cfg = _config(redis_prefix, rounds=12, policies=["ours", "ours_no_memory"], oracle=False,
                  mix={"playlist": 0.0, "known_item": 1.0, "tag": 0.0}, memory_every=1, move_every=0, retrain_every=0,
                  keep_state=True, unseen_eval_max=2)
    sim = Simulation(cfg, settings, es=es, redis=redis_client, alias=catalog_slice, sources=sources)
    try:
        result = sim.run(progress=False)
        assert set(sim.memory_clones) == {"ours", "ours_no_memory"}
        for name in ("ours", "ours_no_memory"):
            assert es.indices.exists_alias(name=sim.memory_clones[name])
        ours, other = result.learning["ours"], result.learning["ours_no_memory"]
        assert sum(r.clicked for r in result.records if r.policy == "ours" and r.phase == "stream") > 0
        assert ours["update_memory"]["runs"] == 12 and ours["update_memory"]["events"] > 0
        assert ours["memory_pairs_end"] > ours["memory_pairs_start"], ours
        assert "update_memory" not in other
        assert other["memory_pairs_end"] == other["memory_pairs_start"], other
        assert all(r.phase == "unseen" for r in result.records if r.t >= 12)
    finally:
        sim.cleanup()
    for name in ("ours", "ours_no_memory"):
        assert not es.indices.exists(index=sim.memory_index(name))
        assert not es.indices.exists_alias(name=sim.memory_clones[name])
    from orchestrator.memory import memory_alias

    src = memory_alias(catalog_slice, settings.memory.alias)
    if es.indices.exists_alias(name=src):
        for index in es.indices.get_alias(name=src):
            blocks = es.indices.get_settings(index=index, name="index.blocks.write")
            assert not blocks.body.get(index, {}).get("settings"), blocks


def test_new_items_are_held_out_then_released_mid_run(es, redis_client, redis_prefix, settings,
                                                     catalog_slice, sources):
    """With new_items_fraction, every policy searches a catalog clone without the newest
    releases (and memories purged of them); no round before the release shows one; the
    release goes through add_entities, after it known-item queries for new tracks find them;
    cleanup deletes the clone and leaves the slice as it was."""
    n_slice = es.count(index=catalog_slice)["count"]
    cfg = _config(redis_prefix, rounds=24, policies=["arm:lexical.v2", "ours"], oracle=False,
                  mix={"playlist": 0.0, "known_item": 1.0, "tag": 0.0}, memory_every=1,
                  move_every=0, retrain_every=0, unseen_eval_max=0, new_items_fraction=0.02,
                  release_at_fraction=0.5)
    sim = Simulation(cfg, settings, es=es, redis=redis_client, alias=catalog_slice, sources=sources)
    assert sim.hold_out is not None and sim.release_at == 12
    result = sim.run(progress=False)
    rel = result.new_items
    assert rel["released"] and rel["released"]["indexed"] > 0, rel
    assert rel["removed"]["catalog_docs"] > 0 and set(rel["memory_aliases"]) == {
        sim.memory_clones["ours"], sim.memory_clones["static"]}
    early = [r for r in result.records if r.t < 12]
    assert early and not any(r.new_shown or r.n_new_relevant for r in early)
    late = [r for r in result.records if r.t >= 12 and r.n_new_relevant]
    assert late, "no query for a new item after the release"
    lexical = [r for r in late if r.policy == "arm:lexical.v2"]
    assert any(r.new_shown for r in lexical), [(r.query, r.new_shown) for r in lexical]
    assert not es.indices.exists(index=rel["catalog_index"])
    assert es.count(index=catalog_slice)["count"] == n_slice


def test_two_runs_clone_the_same_memory_at_once(es, redis_client, redis_prefix, settings,
                                                catalog_slice, sources):
    """Cloning a memory runs block -> clone -> unblock of the source under a Redis lock: a run
    waits while another holds it (else one run unblocks the source under the other's clone:
    "must be read-only to resize index"); two runs started together both get their clones and
    the source is writable afterwards."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from orchestrator.memory import memory_alias

    src = memory_alias(catalog_slice, settings.memory.alias)
    src_index = sorted(es.indices.get_alias(name=src))[0]
    sims = [Simulation(_config(redis_prefix, rounds=2, policies=["ours"], oracle=False),
                       settings, es=es, redis=redis_client, alias=catalog_slice, sources=sources)
            for _ in range(2)]
    try:
        held = sims[1].clone_lock(src_index)
        assert held.acquire(blocking=False)
        waiter = threading.Thread(target=sims[0].clone_memories, args=(["ours"],))
        waiter.start()
        time.sleep(1.5)
        assert not es.indices.exists(index=sims[0].memory_index("ours"))  # waits for the lock
        held.release()
        waiter.join(timeout=120)
        assert es.indices.exists(index=sims[0].memory_index("ours"))
        with ThreadPoolExecutor(max_workers=2) as pool:
            for f in [pool.submit(s.clone_memories, ["ours_no_memory", "ours_no_rescorer"])
                      for s in sims]:
                f.result()
        for s in sims:
            for name in ("ours_no_memory", "ours_no_rescorer"):
                assert es.indices.exists(index=s.memory_index(name))
    finally:
        for s in sims:
            s.cleanup()
    blocks = es.indices.get_settings(index=src_index, name="index.blocks.write")
    assert not blocks.body.get(src_index, {}).get("settings"), blocks


def test_followup_lookups_feed_the_query_chains_of_ours_only(es, redis_client, redis_prefix,
                                                             settings, catalog_slice, sources,
                                                             tmp_path: Path):
    """Playlist needs, every user who found nothing looks a wanted track up (p_reformulate=1,
    no noise clicks): the follow-ups are logged (phase ``followup``, not scored), after the
    rounds without a click only, at the same rounds for both policies where both failed;
    ours' feedback carries the abandoned playlist query as its chain and its memory learns
    playlist-title pairs from it, ours_no_chains' does neither."""
    cfg = _config(redis_prefix, rounds=16, policies=["ours", "ours_no_chains"], oracle=False,
                  mix={"playlist": 1.0, "known_item": 0.0, "tag": 0.0}, memory_every=1,
                  move_every=0, retrain_every=0, keep_state=True, unseen_eval_max=0,
                  p_reformulate=1.0, click_params={"noise": 0.0})
    sim = Simulation(cfg, settings, es=es, redis=redis_client, alias=catalog_slice, sources=sources)
    names = ("ours", "ours_no_chains")
    every = sim.lookup_items

    def in_the_slice(queries):
        # the slice holds a few genres: users here only look up tracks it has
        items = every(queries)
        found = {d["_id"] for d in es.mget(index=catalog_slice, ids=sorted(items),
                                            source=False)["docs"] if d.get("found")}
        return {k: v for k, v in items.items() if k in found}

    sim.lookup_items = in_the_slice
    try:
        result = sim.run(progress=False)
        by = {(r.policy, r.phase, r.t): r for r in result.records}
        silent = {n: {t for t in range(16) if not by[(n, "stream", t)].clicked} for n in names}
        follow = {n: {t for (p, ph, t) in by if p == n and ph == "followup"} for n in names}
        assert follow["ours"] and all(follow[n] <= silent[n] for n in names)
        both = silent["ours"] & silent["ours_no_chains"]
        assert follow["ours"] & both == follow["ours_no_chains"] & both
        assert all(by[(n, "followup", t)].qtype == "known_item" for n in names for t in follow[n])
        report = write_all(result, tmp_path)
        assert report["policies"]["ours"]["overall"]["n"] == 16  # follow-ups are not scored
        assert report["followups"]["ours"]["rounds"] == len(follow["ours"])

        def chains(name):
            out = []
            for _, f in redis_client.xrange(sim.prefix(name) + "events"):
                if f[b"type"] == b"feedback":
                    out += json.loads(f[b"data"]).get("chain") or []
            return out

        playlist_keys = {r.key for r in result.records if r.phase == "stream"}
        ours_chain = chains("ours")
        assert ours_chain and {c["query_key"] for c in ours_chain} <= playlist_keys
        assert chains("ours_no_chains") == []

        def learned_title_pairs(name):
            alias = sim.memory_clones[name]
            es.indices.refresh(index=alias)
            return es.count(index=alias, query={"bool": {"filter": [
                {"terms": {"query_key": sorted(playlist_keys)}},
                {"term": {"source": "learned"}}]}})["count"]

        assert learned_title_pairs("ours") > learned_title_pairs("ours_no_chains")
    finally:
        sim.cleanup()


def test_budget_ablations_reach_the_policy_selectors(es, redis_client, redis_prefix, settings,
                                                     catalog_slice, sources):
    """ours_budget_cost0 and ours_equal_budgets differ from ours by their budget rule only:
    the built orchestrators' budget learners carry it."""
    from orchestrator.simulation.policies import standard_policies

    cfg = _config(redis_prefix, rounds=1, policies=["ours"], oracle=False)
    sim = Simulation(cfg, settings, es=es, redis=redis_client, alias=catalog_slice, sources=sources)
    specs = {s.name: s for s in standard_policies(
        ["lexical.v2"], total_budget=60, include=["ours", "ours_budget_cost0", "ours_equal_budgets"])}
    try:
        learners = {name: sim._build(spec, index=i).selector.budgets_
                    for i, (name, spec) in enumerate(specs.items())}
    finally:
        sim.cleanup()
    assert learners["ours"].cost_per_candidate == settings.bandit.budget_cost_per_candidate > 0
    assert learners["ours"].mode == "learned"
    assert learners["ours_budget_cost0"].cost_per_candidate == 0.0
    assert learners["ours_budget_cost0"].mode == "learned"
    assert learners["ours_equal_budgets"].mode == "equal"
