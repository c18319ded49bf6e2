"""Evaluate the query-understanding model in ``qu_models/``.

Reports, as a table and as JSON:

* intent accuracy / macro-F1 and per-category slot precision and recall on the held-out split
  saved by ``ltrr qu-train`` (``qu_models/eval/heldout.jsonl``; see
  :mod:`orchestrator.qu_training` for how its labels were generated);
* the same on a small set of hand-written, realistic queries (with misspellings) whose
  expected slots and intents are listed below;
* parse latency (single-query ``parse``, warm, one thread): p50 / p95 / p99 in ms.

Usage::

    python benchmarks/qu_eval.py [--model qu_models] [--json out.json] [--repeat 5]
    python benchmarks/qu_eval.py --smoke      # CI: 300 held-out queries, --repeat 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from orchestrator.qu_training import QUExample, evaluate, load_heldout
from orchestrator.text import normalize_query
from orchestrator.understanding import DEFAULT_MODEL_DIR, QueryUnderstander

#: (query, intent, expected slots). Written by hand; names checked against the catalog.
HANDWRITTEN: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("tayler swift love story", "known_item", (("artist", "Taylor Swift"), ("track", "Love Story"))),
    ("beyonse", "artist", (("artist", "Beyoncé"),)),
    ("eminen", "artist", (("artist", "Eminem"),)),
    ("ed sheran", "artist", (("artist", "Ed Sheeran"),)),
    ("ed sheeran shape of you", "known_item", (("artist", "Ed Sheeran"), ("track", "Shape of You"))),
    ("arianna grande songs", "artist", (("artist", "Ariana Grande"), ("entity_type", "track"))),
    ("the beatels", "artist", (("artist", "The Beatles"),)),
    ("metalica master of puppets", "known_item",
     (("artist", "Metallica"), ("track", "Master Of Puppets"))),
    ("billie elish bad guy", "known_item", (("artist", "Billie Eilish"), ("track", "bad guy"))),
    ("blinding lights the weeknd", "known_item",
     (("artist", "The Weeknd"), ("track", "Blinding Lights"))),
    ("bohemian rhapsody", "known_item", (("track", "Bohemian Rhapsody"),)),
    ("imagine dragon believer", "known_item", (("artist", "Imagine Dragons"), ("track", "Believer"))),
    ("kendrik lamar", "artist", (("artist", "Kendrick Lamar"),)),
    ("post malone", "artist", (("artist", "Post Malone"),)),
    ("bad bunny", "artist", (("artist", "Bad Bunny"),)),
    ("dua lipa albums", "artist", (("artist", "Dua Lipa"), ("entity_type", "album"))),
    ("lady gaga", "artist", (("artist", "Lady Gaga"),)),
    ("coldplay", "artist", (("artist", "Coldplay"),)),
    ("drake", "artist", (("artist", "Drake"),)),
    ("sheeran", "artist", (("artist", "Ed Sheeran"),)),
    ("happy 80s pop", "browse", (("mood", "happy"), ("era", "1980s"), ("genre", "pop"))),
    ("90s rock", "browse", (("era", "1990s"), ("genre", "rock"))),
    ("sad songs", "browse", (("mood", "sad"), ("entity_type", "track"))),
    ("eighties synthpop", "browse", (("era", "1980s"), ("genre", "synthpop"))),
    ("chill jazz", "browse", (("mood", "chill"), ("genre", "jazz"))),
    ("relaxing piano music", "browse", (("mood", "chill"), ("genre", "piano"))),
    ("clasical music", "browse", (("genre", "classical"),)),
    ("best rock songs of the 70s", "browse",
     (("genre", "rock"), ("entity_type", "track"), ("era", "1970s"))),
    ("upbeat latin pop", "browse", (("mood", "upbeat"), ("genre", "latin pop"))),
    ("indie rock bands", "browse", (("genre", "indie rock"), ("entity_type", "artist"))),
    ("Hard Rock Workout", "topical", (("genre", "hard rock"), ("mood", "energetic"))),
    ("songs for a rainy day", "topical", (("entity_type", "track"),)),
    ("chill lofi beats to study to", "topical",
     (("mood", "chill"), ("genre", "lo-fi"), ("mood", "instrumental"))),
    ("road trip playlist", "topical", (("entity_type", "playlist"),)),
    ("music for cooking dinner", "topical", ()),
    ("Tropical Vibes", "topical", ()),
    ("hiphop workout", "topical", (("genre", "hip-hop"), ("mood", "energetic"))),
    ("summer party hits", "topical", (("mood", "party"),)),
    # "christmas" and "kids" are genres of the Spotify 114k set, so they are genre slots
    ("christmas songs for kids", "topical",
     (("genre", "christmas"), ("entity_type", "track"), ("genre", "kids"))),
    ("music", "broad", ()),
    ("love", "broad", ()),
    ("hits", "broad", ()),
    ("new music", "broad", ()),
)


def handwritten_examples() -> list[QUExample]:
    return [QUExample(text=q, intent=i, slots=s, group=f"hand:{q}", source="handwritten")
            for q, i, s in HANDWRITTEN]


def latency_ms(understander: QueryUnderstander, queries: list[str], *, repeat: int) -> dict[str, float]:
    for q in queries:  # warm-up
        understander.parse(q)
    samples = []
    for _ in range(repeat):
        for q in queries:
            t0 = time.perf_counter()
            understander.parse(q)
            samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()

    def pct(p: float) -> float:
        return round(samples[min(len(samples) - 1, int(p * len(samples)))], 3)

    return {"n": len(samples), "p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99),
            "mean": round(statistics.fmean(samples), 3)}


def _table(name: str, metrics: dict) -> str:
    head = (f"== {name}: n={metrics['n']}  intent accuracy={metrics['intent_accuracy']:.3f}  "
            f"macro-F1={metrics['intent_macro_f1']:.3f}")
    lines = [head,
             f"{'intent':<12}{'P':>7}{'R':>7}{'F1':>7}{'n':>6}"]
    for k, v in metrics["intent_per_class"].items():
        lines.append(f"{k:<12}{v['precision']:>7.3f}{v['recall']:>7.3f}{v['f1']:>7.3f}{v['support']:>6}")
    lines.append(f"{'slot':<22}{'P':>7}{'R':>7}{'F1':>7}{'n':>6}   "
                 f"(on {metrics['n_slot_examples']} queries with gold slots)")
    for k, v in metrics["slots"].items():
        lines.append(f"{k:<22}{v['precision']:>7.3f}{v['recall']:>7.3f}{v['f1']:>7.3f}{v['support']:>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    ap.add_argument("--repeat", type=int, default=5, help="latency repetitions per query")
    ap.add_argument("--show-errors", action="store_true", help="list hand-written misses")
    ap.add_argument("--smoke", action="store_true",
                    help="the first 300 held-out queries and --repeat 1 (CI; writes nothing "
                         "unless --json)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.repeat = 1

    t0 = time.perf_counter()
    understander = QueryUnderstander.load(args.model)
    load_s = time.perf_counter() - t0
    heldout = load_heldout(args.model)
    if args.smoke:
        heldout = heldout[:300]
    hand = handwritten_examples()
    t0 = time.perf_counter()
    held_parsed = understander.parse_many([e.text for e in heldout])
    batch_ms = (time.perf_counter() - t0) * 1000 / max(1, len(heldout))
    hand_parsed = understander.parse_many([e.text for e in hand])
    report = {
        "model": str(args.model),
        "model_version": understander.metadata.get("version"), "smoke": args.smoke,
        "load_s": round(load_s, 2),
        "heldout": evaluate(held_parsed, heldout),
        "handwritten": evaluate(hand_parsed, hand),
        "latency_ms_parse": latency_ms(understander, [e.text for e in hand] + [e.text for e in heldout[:300]],
                                       repeat=args.repeat),
        "latency_ms_parse_many_per_query": round(batch_ms, 3),
    }
    print(_table("held-out (generated)", report["heldout"]))
    print()
    print(_table("hand-written", report["handwritten"]))
    if args.show_errors:
        for e, p in zip(hand, hand_parsed):
            got = sorted((s.category, s.value) for s in p.slots)
            if p.intent != e.intent or {(c, normalize_query(v)) for c, v in got} != {
                    (c, normalize_query(v)) for c, v in e.slots}:
                print(f"  MISS {e.text!r}: want {e.intent} {sorted(e.slots)} got {p.intent} {got}")
    lat = report["latency_ms_parse"]
    print(f"\nparse latency (ms, n={lat['n']}): p50={lat['p50']} p95={lat['p95']} "
          f"p99={lat['p99']} mean={lat['mean']}; parse_many: "
          f"{report['latency_ms_parse_many_per_query']} ms/query; model load {report['load_s']} s")
    print(json.dumps(report, ensure_ascii=False))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
