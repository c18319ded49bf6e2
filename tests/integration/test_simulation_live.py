"""A small simulation against the live catalog slice and Redis: the report's structure and
ranges, the files it writes, the per-policy Redis prefixes (cleaned afterwards) and
reproducibility (same seed -> same query stream and same single-arm results)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.simulation.report import write_all
from orchestrator.simulation.runner import SimConfig, Simulation

pytestmark = [pytest.mark.elasticsearch, pytest.mark.redis]

SLICE_GENRES = ["pop", "country", "jazz", "rock", "hip-hop", "dance", "latin", "r&b", "rap", "edm",
                "classical", "metal", "soul", "blues", "indie"]
POLICIES = ["arm:lexical.v2", "hybrid_rrf", "random", "ours"]


def _config(prefix: str, **kw) -> SimConfig:
    base = dict(rounds=45, seed=3, policies=POLICIES, oracle=True, calibration_per_type=3,
                genres=SLICE_GENRES, prefix_root=prefix)
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

    # -- state: one prefix per policy while running, nothing left afterwards
    assert seen_keys and seen_keys[0] > 0
    assert not list(redis_client.scan_iter(match=f"{redis_prefix}{sim.run_id}:*", count=1000))

    # -- reproducibility: same seed, same stream, same single-arm results
    again = Simulation(_config(redis_prefix, rounds=20, policies=["arm:lexical.v2"], oracle=False),
                       settings, es=es, redis=redis_client, alias=catalog_slice, sources=sources)
    res2 = again.run(progress=False)
    assert [q["text"] for q in res2.queries] == [q["text"] for q in result.queries[:20]]
    first = [(r.query, r.ndcg, r.success, r.n_candidates, r.clicked)
             for r in result.records if r.policy == "arm:lexical.v2"][:20]
    second = [(r.query, r.ndcg, r.success, r.n_candidates, r.clicked) for r in res2.records]
    assert first == second
    other = Simulation(_config(redis_prefix, rounds=20, seed=4, policies=["arm:lexical.v2"],
                               oracle=False), settings, es=es, redis=redis_client,
                       alias=catalog_slice, sources=sources)
    assert [q.text for q in other.stream.generate(20)] != [q["text"] for q in res2.queries]
