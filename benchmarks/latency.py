"""End-to-end latency of the orchestrator versus plain Elasticsearch searches.

For each query of a seeded mix (known-item titles and artists sampled from the catalog,
genre / mood browsing, free text) it measures, client side:

* ``orchestrator``: ``Orchestrator.search`` end to end (QU, selection, query embedding when
  the semantic arm is chosen, one ``_msearch``, merge, rescore, impression write to Redis);
* ``bm25``: one plain ``_search`` (multi_match over title/artist/album, size 10);
* ``slowest_arm``: each arm the orchestrator chose, run alone in its own ``_msearch`` with
  the same parameters; the slowest of them;
* ``overhead``: the orchestrator's own work = QU + selection + request build + merge +
  rescore (from the per-stage timers); ``log`` (Redis impression write) and ``encode``
  (query embedding) are reported separately; every other query carries a ``session_id``, so
  ``log_session`` (impression write + the query-chain record, :mod:`orchestrator.chains`)
  is measured side by side with ``log``;
* micro-benchmarks of ``selection`` alone and ``rescore`` of 60 candidates.

Usage::

    python benchmarks/latency.py                  # 300 queries on ltrr-catalog
    python benchmarks/latency.py --queries 100 --alias test-ltrr-catalog
    python benchmarks/latency.py --smoke          # CI: 20 queries on test-ltrr-catalog, JSON to a temp dir

Prints a table and writes ``benchmarks/results/latency.json``. Bandit state goes to a fresh
Redis prefix ``bench:<id>:`` that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from orchestrator.domain import ArmRequest
from orchestrator.merging import UnionMerger
from orchestrator.pipeline import Orchestrator, _coerce_context
from orchestrator.settings import OrchestratorSettings

GENRE_QUERIES = ["jazz", "chill jazz", "90s rock", "sad songs", "workout hip hop", "classical piano",
                 "happy pop", "country love songs", "metal", "relaxing acoustic", "party dance",
                 "latin reggaeton", "blues guitar", "indie folk", "edm festival", "soul classics"]
FREE_TEXT = ["songs about the ocean", "music for studying", "road trip anthems",
             "rainy day melancholy", "summer vibes", "late night drive", "love ballads"]


def pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=float)
    return {"p50": round(float(np.percentile(a, 50)), 3), "p95": round(float(np.percentile(a, 95)), 3),
            "p99": round(float(np.percentile(a, 99)), 3), "mean": round(float(a.mean()), 3),
            "n": len(a)}


def sample_queries(es, alias: str, n: int, rng: np.random.Generator) -> list[str]:
    resp = es.search(index=alias, size=400, source=["title", "entity_type"],
                     query={"function_score": {"query": {"terms": {"entity_type": ["track", "artist"]}},
                                               "random_score": {"seed": int(rng.integers(1 << 30)),
                                                                "field": "_seq_no"}}})
    titles = [h["_source"]["title"] for h in resp["hits"]["hits"] if h["_source"].get("title")]
    pool = titles + GENRE_QUERIES * 8 + FREE_TEXT * 6
    return [pool[int(i)] for i in rng.integers(len(pool), size=n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--alias", default=None, help="catalog alias (default: settings, ltrr-catalog)")
    ap.add_argument("--size", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None,
                    help="default benchmarks/results/latency.json (--smoke: a temp dir)")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds, not minutes: 20 queries (+3 warm-up) on test-ltrr-catalog, short "
                         "micro-benchmarks, JSON written to a temp dir (CI keeps the script working)")
    args = ap.parse_args()
    micro_select, micro_rescore = 2000, 500
    if args.smoke:
        args.queries, args.warmup = min(args.queries, 20), min(args.warmup, 3)
        args.alias = args.alias or "test-ltrr-catalog"
        micro_select, micro_rescore = 200, 50
    if args.out is None:
        args.out = (Path(tempfile.mkdtemp(prefix="ltrr-smoke-latency-")) / "latency.json" if args.smoke
                    else Path(__file__).resolve().parent / "results" / "latency.json")

    base = OrchestratorSettings()
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    s = base.model_copy(update={
        "redis": base.redis.model_copy(update={"key_prefix": prefix}),
        "es": base.es.model_copy(update={"catalog_alias": args.alias or base.es.catalog_alias}),
    })
    orch = Orchestrator.from_settings(s, bandit={"seed": args.seed})
    es = orch.es
    alias = s.es.catalog_alias
    rng = np.random.default_rng(args.seed)
    queries = sample_queries(es, alias, args.queries + args.warmup, rng)
    ctx = {"hour": 20, "weekday": 4, "device": "mobile"}

    rows: dict[str, list[float]] = {k: [] for k in ("orchestrator", "bm25", "slowest_arm", "overhead",
                                                    "qu", "select", "build", "merge", "rescore",
                                                    "encode", "log", "log_session", "msearch")}
    n_arms: list[int] = []
    try:
        for i, q in enumerate(queries):
            session = i % 2 == 1  # every other search records its query chain
            t = time.perf_counter()
            resp = orch.search(q, context={**ctx, "session_id": f"s{i % 40}"} if session else ctx,
                               size=args.size)
            total = (time.perf_counter() - t) * 1000

            t = time.perf_counter()
            es.search(index=alias, size=args.size, track_total_hits=False,
                      source_excludes=["embedding", "q2e", "audio", "playlists"],
                      query={"multi_match": {"query": q, "fields": ["title", "artist", "album"]}})
            bm25 = (time.perf_counter() - t) * 1000

            # Each chosen arm alone (same parameters, one request per _msearch).
            vector = orch._vector(q, [c.template_id for c in resp.decision.choices])
            parsed = orch.understander.parse(q) if orch.understander else None
            # The request id seeds the explore arm, so each arm alone runs exactly the query
            # the orchestrator ran.
            reqs: list[ArmRequest] = orch._requests(parsed, q, resp.decision.budgets, vector,
                                                    resp.request_id)
            single = []
            for r in reqs:
                t = time.perf_counter()
                orch.multisearch.execute([r])
                single.append((time.perf_counter() - t) * 1000)
            if i < args.warmup:
                continue
            tm = resp.timings_ms
            rows["orchestrator"].append(total)
            rows["bm25"].append(bm25)
            rows["slowest_arm"].append(max(single) if single else 0.0)
            for k in ("overhead", "qu", "select", "build", "merge", "rescore", "encode"):
                rows[k].append(tm[k])
            rows["log_session" if session else "log"].append(tm["log"])
            rows["msearch"].append(tm["es"])
            n_arms.append(len(resp.decision.choices))

        # Micro-benchmarks: selection and rescoring alone.
        sel_ctx = orch.featurizer.transform(orch.understander.parse("chill jazz") if orch.understander else None,
                                            _coerce_context(ctx), "chill jazz")
        arms = orch.eligible_arms(None)
        sel_us = []
        for _ in range(micro_select):
            t = time.perf_counter()
            orch.selector.select(sel_ctx, arms, total_budget=60)
            sel_us.append((time.perf_counter() - t) * 1e6)
        resp = orch.search("love", context=ctx, size=10, total_budget=60)
        results = orch.multisearch.execute(orch._requests(None, "love", {a.arm: 20 for a in arms[:3]},
                                                          None, resp.request_id))
        cands = UnionMerger().merge(results)[:60]
        res_us = []
        for _ in range(micro_rescore):
            t = time.perf_counter()
            orch.rescorer.rank(cands, query="love", parsed=None, extractor=orch.extractor)
            res_us.append((time.perf_counter() - t) * 1e6)
    finally:
        for key in orch.redis.scan_iter(match=prefix + "*", count=1000):
            orch.redis.delete(key)

    result = {
        "alias": alias, "smoke": args.smoke, "queries": args.queries, "warmup": args.warmup, "size": args.size,
        "cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
        "qu": type(orch.understander).__name__ if orch.understander else None,
        "policy": orch.selector.name, "mean_arms_chosen": round(float(np.mean(n_arms)), 2),
        "latency_ms": {k: pct(v) for k, v in rows.items()},
        "selection_us": pct(sel_us), "rescore_60_candidates_us": pct(res_us),
        "n_candidates_rescored": len(cands),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))

    print(f"{alias}: {args.queries} queries (+{args.warmup} warm-up), {os.cpu_count()} CPUs, "
          f"QU={result['qu']}, policy={result['policy']}, arms/query={result['mean_arms_chosen']}")
    print(f"{'ms':<34}{'p50':>9}{'p95':>9}{'p99':>9}{'mean':>9}")
    labels = {
        "orchestrator": "orchestrator end to end", "bm25": "plain BM25 _search",
        "slowest_arm": "slowest chosen arm alone", "msearch": "  one _msearch (all chosen arms)",
        "overhead": "orchestrator overhead", "qu": "  QU", "select": "  selection",
        "build": "  request build", "merge": "  merge", "rescore": "  rescore",
        "encode": "query embedding (semantic arm)", "log": "impression write (Redis)",
        "log_session": "  + query-chain record (session)",
    }
    for k, label in labels.items():
        p = result["latency_ms"][k]
        print(f"{label:<34}{p['p50']:>9.2f}{p['p95']:>9.2f}{p['p99']:>9.2f}{p['mean']:>9.2f}")
    for k, label in (("selection_us", "selection alone (us)"), ("rescore_60_candidates_us", "rescore 60 cands (us)")):
        p = result[k]
        print(f"{label:<34}{p['p50']:>9.1f}{p['p95']:>9.1f}{p['p99']:>9.1f}{p['mean']:>9.1f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
