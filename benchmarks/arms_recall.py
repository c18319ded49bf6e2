"""Per-arm recall@K and latency on realistic query sets, against a live catalog alias.

Query sets (relevant documents are track ids, ``track:<track_id>``):

``playlist``
    Real playlist titles of ``playlists_dev.csv`` ("Jazz Vibes", "Hard Rock Workout");
    relevant = that playlist's tracks. Topical / browse queries.
``title``
    Known-item lookups: the exact title of a track sampled from the catalog (popularity >=
    ``--min-popularity``, since people look up songs they know); relevant = that track.
``title_typo``
    The same titles with generated misspellings (deletion, transposition, neighbouring-key
    substitution, doubled letter; one edit per query, two when it has 3+ words).
``artist_title``
    ``"<artist> <title>"`` with the same misspellings as ``title_typo`` applied to the title.

Each query runs every applicable arm in one ``_msearch`` (as the orchestrator does), with
``size = K`` per arm and results restricted to tracks (an ``entity_type=track`` slot).
Slots come from a small gazetteer built from the catalog itself (genre and artist keywords,
mood words, decades), so ``structured`` and ``related`` run where a real QU would fill
slots; pass ``--qu spacy`` to use :mod:`orchestrator.understanding` instead when it exists.

Reported per query set and arm: recall@K (mean over queries of |relevant in top K| /
|relevant|, capped by K for playlists), hit rate (any relevant in top K), MRR@10, how many
queries the arm ran on (skipped arms count as zero recall: the arm had nothing to offer) and
Elasticsearch ``took`` p50 / p95 in ms; plus the wall time of the whole ``_msearch``.

Usage::

    python benchmarks/arms_recall.py                       # ltrr-catalog, else test-ltrr-catalog
    python benchmarks/arms_recall.py --index test-ltrr-catalog --known-items 200 --k 100
    python benchmarks/arms_recall.py --smoke     # CI: test-ltrr-catalog, 8 queries per set, k=20
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.arms import ERA_WORDS, MOOD_WORDS, build_requests, normalize_era
from orchestrator.domain import ArmResult, ParsedQuery, Slot
from orchestrator.embeddings import get_encoder
from orchestrator.es_client import build_client
from orchestrator.execution import MultiSearch
from orchestrator.settings import OrchestratorSettings
from orchestrator.templates import TemplateRegistry
from orchestrator.text import normalize_query

_KEYBOARD = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]


# -- query sets ----------------------------------------------------------------------------

@dataclass
class Query:
    set: str
    text: str
    relevant: frozenset[str]
    parsed: ParsedQuery | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def playlist_queries(data_dir: Path) -> list[Query]:
    by_id: dict[str, tuple[str, set[str]]] = {}
    with (data_dir / "playlists_dev.csv").open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            name, pid = (row.get("playlist_name") or "").strip(), row.get("playlist_id")
            if name and pid and row.get("track_id"):
                by_id.setdefault(pid, (name, set()))[1].add(f"track:{row['track_id']}")
    return [Query("playlist", name, frozenset(ids)) for name, ids in by_id.values()]


def simulation_head_playlists(data_dir: Path, rounds_path: Path, *, top: int) -> list[Query]:
    """The ``top`` playlist needs a simulation asked most (``ours``' stream rounds of its
    ``rounds.jsonl.gz``), each with the simulator's own relevant pool for that need
    (:func:`~orchestrator.simulation.queries.load_playlist_queries`: every playlist of that
    exact title): can any arm reach them at all?"""
    import gzip
    from collections import Counter

    from orchestrator.simulation.queries import load_playlist_queries

    counts: Counter[str] = Counter()
    with gzip.open(rounds_path, "rt", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if r.get("policy") == "ours" and r.get("qtype") == "playlist" \
                    and r.get("phase", "stream") == "stream" and r.get("need", "").startswith("playlist:"):
                counts[r["need"][len("playlist:"):]] += 1
    pools = {q.text: frozenset(q.relevant) for q in load_playlist_queries(data_dir)}
    return [Query("sim_head_playlist", t, pools[t], meta={"asked": n})
            for t, n in counts.most_common(top) if pools.get(t)]


def _neighbour(c: str, rng: random.Random) -> str:
    for row in _KEYBOARD:
        i = row.find(c)
        if i >= 0:
            return rng.choice([row[j] for j in (i - 1, i + 1) if 0 <= j < len(row)])
    return c


def misspell(text: str, rng: random.Random) -> str:
    """One realistic typo per query (two for 3+ words), never on a word's first letter."""
    words = text.split()
    candidates = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()] or \
                 [i for i, w in enumerate(words) if len(w) >= 3]
    if not candidates:
        return text
    for i in rng.sample(candidates, min(len(candidates), 2 if len(words) >= 3 else 1)):
        w = words[i]
        p = rng.randrange(1, len(w))
        kind = rng.choice(["delete", "transpose", "substitute", "double"])
        if kind == "delete":
            w = w[:p] + w[p + 1:]
        elif kind == "transpose" and p < len(w) - 1:
            w = w[:p] + w[p + 1] + w[p] + w[p + 2:]
        elif kind == "double":
            w = w[:p] + w[p] + w[p:]
        else:
            w = w[:p] + _neighbour(w[p].lower(), rng) + w[p + 1:]
        words[i] = w
    return " ".join(words)


_TITLE_NOISE = re.compile(r"\s*[-(\[].*$")


def known_item_queries(es: Any, index: str, *, n: int, min_popularity: float,
                       seed: int) -> list[Query]:
    """Sample tracks; build exact-title, misspelled-title and artist + misspelled-title
    queries. Version suffixes (" - Remastered 2011", " (feat. X)") are cut from the title,
    as people do not type them."""
    resp = es.search(index=index, size=n, source=["title", "artist", "popularity"], query={
        "function_score": {
            "query": {"bool": {"filter": [{"term": {"entity_type": "track"}},
                                           {"range": {"popularity": {"gte": min_popularity}}}]}},
            "functions": [{"random_score": {"seed": seed, "field": "entity_id"}}],
            "boost_mode": "replace"}})
    rng = random.Random(seed)
    out: list[Query] = []
    for h in resp["hits"]["hits"]:
        title = _TITLE_NOISE.sub("", h["_source"].get("title", "")).strip()
        artist = (h["_source"].get("artist") or [""])[0]
        if len(normalize_query(title)) < 3:
            continue
        rel = frozenset([h["_id"]])
        typo = misspell(title, rng)
        out += [Query("title", title, rel), Query("title_typo", typo, rel),
                Query("artist_title", f"{artist} {misspell(title, rng)}".strip(), rel)]
    return out


# -- slots ---------------------------------------------------------------------------------

class Gazetteer:
    """Longest-match lookup of catalog genre / artist names, mood words and decades: a
    stand-in for query understanding that only needs the catalog."""

    def __init__(self, es: Any, index: str, *, max_artists: int = 60_000) -> None:
        aggs = es.search(index=index, size=0, aggs={
            "genres": {"terms": {"field": "genres", "size": 2000}},
            "artists": {"terms": {"field": "artist.raw", "size": max_artists,
                                  "min_doc_count": 3}},
        })["aggregations"]
        # "hard rock" and "hard-rock" normalize alike; slot_params expands spellings anyway
        self.genres = {normalize_query(b["key"]): b["key"] for b in aggs["genres"]["buckets"]}
        stop = {"the", "a", "you", "me", "love", "music", "songs", "hits", "mix", "playlist"}
        self.artists = {normalize_query(b["key"]): b["key"] for b in aggs["artists"]["buckets"]
                        if len(normalize_query(b["key"])) >= 4
                        and normalize_query(b["key"]) not in stop
                        and normalize_query(b["key"]) not in self.genres}

    def parse(self, text: str, *, entity_type: str | None = "track") -> ParsedQuery:
        norm = normalize_query(text)
        words = norm.split()
        slots: list[Slot] = []
        used = [False] * len(words)
        for n in range(min(5, len(words)), 0, -1):
            for i in range(len(words) - n + 1):
                if any(used[i:i + n]):
                    continue
                phrase = " ".join(words[i:i + n])
                for cat, value in self._lookup(phrase):
                    slots.append(Slot(cat, value, 0.9, i, i + n, "gazetteer"))
                    used[i:i + n] = [True] * n
        if entity_type:
            slots.append(Slot("entity_type", entity_type, 1.0, 0, 0, "benchmark"))
        return ParsedQuery(text=text, normalized=norm, slots=tuple(slots))

    def _lookup(self, phrase: str) -> list[tuple[str, str]]:
        hits: list[tuple[str, str]] = []
        if phrase in self.genres:
            hits.append(("genre", self.genres[phrase]))
        if phrase in MOOD_WORDS:
            hits.append(("mood", phrase))
        if phrase in ERA_WORDS or normalize_era(phrase):
            hits.append(("era", phrase))
        if not hits and phrase in self.artists:
            hits.append(("artist", self.artists[phrase]))
        return hits


# -- running -------------------------------------------------------------------------------

def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = OrchestratorSettings()
    es = build_client(settings.es)
    index = args.index
    if index is None:
        index = settings.es.catalog_alias if es.indices.exists_alias(
            name=settings.es.catalog_alias) else "test-ltrr-catalog"
    registry = TemplateRegistry.from_dir(settings.templates.dir)
    arms = args.arms.split(",") if args.arms else list(registry.by_arm)
    ms = MultiSearch(es, index=index, registry=registry, arm_timeout="2s",
                     request_timeout_s=60)
    encoder = get_encoder(settings.embedding)
    gaz = Gazetteer(es, index)
    understander = None
    if args.qu == "spacy":
        from orchestrator.understanding import QueryUnderstander  # type: ignore[attr-defined]
        understander = QueryUnderstander.from_settings(settings)  # pragma: no cover

    if args.playlists_from:
        queries = simulation_head_playlists(settings.ingest.data_dir, args.playlists_from,
                                            top=args.top_needs)
    else:
        queries = playlist_queries(settings.ingest.data_dir)
    if args.known_items > 0:
        queries += known_item_queries(es, index, n=args.known_items,
                                  min_popularity=args.min_popularity, seed=args.seed)
    if args.limit:
        by_set: dict[str, list[Query]] = defaultdict(list)
        for q in queries:
            by_set[q.set].append(q)
        queries = [q for qs in by_set.values() for q in qs[: args.limit]]
    vectors = encoder.encode([q.text for q in queries])

    # set -> arm -> list of per-query metrics
    recall: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    hit: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    mrr: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    took: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    ran: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    union: dict[str, list[float]] = defaultdict(list)
    wall: dict[str, list[float]] = defaultdict(list)
    failures: dict[str, int] = defaultdict(int)
    per_query: list[dict[str, Any]] = []
    started = time.perf_counter()
    for qi, (q, vec) in enumerate(zip(queries, vectors)):
        parsed = understander.parse(q.text) if understander else gaz.parse(q.text)
        q.parsed = parsed
        reqs = build_requests(registry, parsed, q.text, budgets={a: args.k for a in arms},
                              vector=vec.tolist(), seed=args.seed + qi)
        t0 = time.perf_counter()
        results = ms.execute(reqs)
        wall[q.set].append((time.perf_counter() - t0) * 1000)
        denom = min(len(q.relevant), args.k)
        seen_union: set[str] = set()
        by_arm = {r.arm: r for r in results}
        for arm in arms:
            r = by_arm.get(arm)
            if r is None or not isinstance(r, ArmResult):
                if r is not None:
                    failures[arm] += 1
                recall[q.set][arm].append(0.0)
                hit[q.set][arm].append(0.0)
                mrr[q.set][arm].append(0.0)
                continue
            ids = [h.id for h in r.hits]
            found = q.relevant.intersection(ids)
            seen_union |= found
            recall[q.set][arm].append(len(found) / denom)
            hit[q.set][arm].append(1.0 if found else 0.0)
            rr = next((1.0 / (i + 1) for i, d in enumerate(ids[:10]) if d in q.relevant), 0.0)
            mrr[q.set][arm].append(rr)
            took[q.set][arm].append(float(r.took_ms))
            ran[q.set][arm] += 1
        union[q.set].append(len(seen_union) / denom)
        if "asked" in q.meta:  # simulation head needs: what each arm holds, query by query
            per_query.append({"query": q.text, "asked": q.meta["asked"], "pool": len(q.relevant),
                              "union_found": len(seen_union),
                              "found": {a: len(q.relevant.intersection(h.id for h in by_arm[a].hits))
                                        for a in arms if isinstance(by_arm.get(a), ArmResult)}})
        if args.progress and qi % 100 == 0:
            print(f"  {qi}/{len(queries)} queries", file=sys.stderr)

    report: dict[str, Any] = {
        "index": index, "k": args.k, "arms": arms, "seed": args.seed,
        "known_items": args.known_items, "min_popularity": args.min_popularity,
        "seconds": round(time.perf_counter() - started, 1), "failures": dict(failures),
        "sets": {},
    }
    if per_query:
        report["per_query"] = per_query
    for s in recall:
        n = len(union[s])
        report["sets"][s] = {
            "queries": n,
            "union_recall": round(statistics.fmean(union[s]), 4),
            "msearch_wall_ms_p50": round(_pct(wall[s], 50), 1),
            "msearch_wall_ms_p95": round(_pct(wall[s], 95), 1),
            "arms": {a: {
                "recall": round(statistics.fmean(recall[s][a]), 4),
                "hit_rate": round(statistics.fmean(hit[s][a]), 4),
                "mrr10": round(statistics.fmean(mrr[s][a]), 4),
                "ran": ran[s][a],
                "took_ms_p50": round(_pct(took[s][a], 50), 1),
                "took_ms_p95": round(_pct(took[s][a], 95), 1),
            } for a in arms},
        }
    return report


def format_table(report: dict[str, Any]) -> str:
    k = report["k"]
    title = (f"index={report['index']}  k={k}  seed={report['seed']}  "
             f"({report['seconds']} s; failures: {report['failures'] or 'none'})")
    lines = [title, ""]
    header = (f"{'set':<13}{'arm':<16}{'ran':>6}{f'recall@{k}':>11}{f'hit@{k}':>8}"
              f"{'MRR@10':>8}{'p50 ms':>8}{'p95 ms':>8}")
    lines += [header, "-" * len(header)]
    for s, data in report["sets"].items():
        best = max(data["arms"].values(), key=lambda m: m["recall"])["recall"]
        for a, m in data["arms"].items():
            star = " *" if m["recall"] == best and best > 0 else ""
            lines.append(f"{s:<13}{a:<16}{m['ran']:>6}{m['recall']:>11.3f}{m['hit_rate']:>8.3f}"
                         f"{m['mrr10']:>8.3f}{m['took_ms_p50']:>8.0f}{m['took_ms_p95']:>8.0f}{star}")
        lines.append(f"{s:<13}{'(all arms)':<16}{data['queries']:>6}{data['union_recall']:>11.3f}"
                     f"{'':>8}{'':>8}{data['msearch_wall_ms_p50']:>8.0f}"
                     f"{data['msearch_wall_ms_p95']:>8.0f}   <- union; _msearch wall time")
        lines.append("")
    for pq in report.get("per_query", []):
        lines.append(f"{pq['query'][:40]:<42}asked {pq['asked']:>4}  pool {pq['pool']:>4}  "
                     f"union {pq['union_found']:>3}  "
                     + " ".join(f"{a.split('.')[0]}={n}" for a, n in pq["found"].items() if n))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index", help=("catalog alias (default: ltrr-catalog if it exists, "
                                     "else test-ltrr-catalog)"))
    p.add_argument("--k", type=int, default=100, help="hits per arm (recall@k)")
    p.add_argument("--known-items", type=int, default=300,
                   help="tracks sampled for the known-item sets")
    p.add_argument("--min-popularity", type=float, default=40)
    p.add_argument("--arms", help="comma-separated arms (default: all)")
    p.add_argument("--limit", type=int, default=0, help="at most this many queries per set")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--qu", choices=["gazetteer", "spacy"], default="gazetteer")
    p.add_argument("--out", type=Path, default=None,
                   help="default benchmarks/results/arms_recall.json (--smoke: a temp dir)")
    p.add_argument("--playlists-from", type=Path, default=None,
                   help="a simulation's rounds.jsonl.gz: the playlist set becomes its "
                        "--top-needs most asked playlist needs (pair with --known-items 0)")
    p.add_argument("--top-needs", type=int, default=12)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="test-ltrr-catalog, 40 known items, 8 queries per set, k=20, JSON to a "
                        "temp dir (CI)")
    args = p.parse_args(argv)
    if args.smoke:
        args.index = args.index or "test-ltrr-catalog"
        args.known_items, args.limit, args.k = min(args.known_items, 40), args.limit or 8, min(args.k, 20)
    if args.out is None:
        args.out = (Path(tempfile.mkdtemp(prefix="ltrr-smoke-arms-")) / "arms_recall.json" if args.smoke
                    else Path(__file__).parent / "results" / "arms_recall.json")
    logging.getLogger("elastic_transport").setLevel(logging.WARNING)  # one line per _msearch
    report = run(args)
    print(format_table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
