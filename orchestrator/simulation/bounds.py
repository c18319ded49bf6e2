"""What one fixed list per query key could reach on a stream: the ceiling of a memory.

Consumes the stream's queries (their key, type and the user's own relevant set); produces,
for the rounds from ``score_from`` on, the success@k and nDCG@k of two lists per key, by
query type and by frequency band (the report's bands):

``learned``
    The greedy max-coverage ``k``-list of the rounds *before* ``score_from`` (the item that
    satisfies the most earlier users first, then the one that satisfies the most of the
    rest, ...): what a memory that knew every earlier user's wants for the key, and nothing
    else, would show. Keys never asked before ``score_from`` get an empty list, so on the
    tail and on new known items this is no ceiling (the lexical arms find those); on
    repeated keys it is the target the memory's learning aims at.
``hindsight``
    The same greedy list chosen on the scored rounds themselves: a policy that shows every
    user asking a key the same list (ours cannot tell the users apart: their context holds
    no user id) reaches at most the optimum of this coverage problem, and greedy is at least
    ``1 - 1/e`` of it (in practice close to it).

Why this exists: users each want 3-15 of a playlist's 25-100 tracks (or of a tag's artists),
so no list satisfies every user asking the same title, and a target such as "head-band
success@10 >= 0.9" has to be read against what one list per key can reach, whatever the
policy learns. Both lists ignore retrieval: they may hold items no arm finds.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from ..metrics import ndcg_at_k, success_at_k
from .queries import QUERY_TYPES, SimQuery
from .report import BANDS, key_bands, last_third_start


def greedy_cover(sets: Sequence[Mapping[str, int]], k: int) -> list[str]:
    """The greedy max-coverage list: at each step the item in the most still-uncovered
    sets (ties: the smaller id), until ``k`` items or nothing is left to cover."""
    alive = [set(s) for s in sets if s]
    chosen: list[str] = []
    while alive and len(chosen) < k:
        counts = Counter(i for s in alive for i in s)
        best = min(counts, key=lambda i: (-counts[i], i))
        chosen.append(best)
        alive = [s for s in alive if best not in s]
    return chosen


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def list_bounds(queries: Sequence[SimQuery], *, score_from: int, k: int = 10,
                bands: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Both lists (see the module docstring) scored on rounds ``t >= score_from`` of
    ``queries`` (round ``t`` = ``queries[t]``), overall, by type and by band (``bands``: key ->
    band, as the report computes them; default: no bands)."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for t, q in enumerate(queries):
        by_key[q.key].append(t)
    bands = dict(bands or {})
    # per scored round: (type, band, learned success, learned ndcg, hindsight success, ndcg)
    scored: list[tuple[str, str, float, float, float, float]] = []
    for key, ts in by_key.items():
        before = [queries[t].relevant for t in ts if t < score_from]
        after = [t for t in ts if t >= score_from]
        if not after:
            continue
        learned = greedy_cover(before, k)
        hind = greedy_cover([queries[t].relevant for t in after], k)
        band = bands.get(key, "")
        for t in after:
            q = queries[t]
            scored.append((q.qtype, band,
                           success_at_k(learned, q.relevant, k), ndcg_at_k(learned, q.relevant, k),
                           success_at_k(hind, q.relevant, k), ndcg_at_k(hind, q.relevant, k)))

    def part(rows: Sequence[tuple[str, str, float, float, float, float]]) -> dict[str, Any]:
        return {"n": len(rows),
                "learned": {"success": _mean([r[2] for r in rows]), "ndcg": _mean([r[3] for r in rows])},
                "hindsight": {"success": _mean([r[4] for r in rows]),
                              "ndcg": _mean([r[5] for r in rows])}}

    return {
        "k": k, "score_from": score_from,
        "overall": part(scored),
        "by_type": {t: part([r for r in scored if r[0] == t]) for t in QUERY_TYPES},
        "bands": {b: part([r for r in scored if r[1] == b]) for b in BANDS} if bands else {},
    }


def stream_bounds(queries: Sequence[SimQuery], *, rounds: int, display: int) -> dict[str, Any]:
    """:func:`list_bounds` on the last third of a run, with the report's key bands."""
    bands = key_bands([{"key": q.key} for q in queries])
    return list_bounds(queries, score_from=last_third_start(rounds), k=display, bands=bands)
