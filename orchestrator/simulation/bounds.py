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

``chained`` (one per reformulation rate ``p`` in ``chain_rates``)
    What a memory could learn from *query chains* alone (Radlinski & Joachims, "Query
    chains: learning to rank from implicit feedback", KDD 2005): every earlier search of the
    key is taken as abandoned (no arm shows these users a wanted item: the head playlists'
    tracks are not in any arm's top 1,000, ``benchmarks/arms_recall.py --playlists-from``),
    and with probability ``p`` its user reformulates into a lookup of one of their wanted
    items (drawn uniformly from their wants, seeded by round and user), finds it and plays
    it; the play is credited to the abandoned query. The list is the items revealed most
    often. It is the ceiling of crediting reformulations to the query before them, under
    the assumption that the lookup always succeeds (the lexical arms find a known item in
    about 0.9 of searches) -- a go / no-go for building that credit, not a measured policy.

Why this exists: users each want 3-15 of a playlist's 25-100 tracks (or of a tag's artists),
so no list satisfies every user asking the same title, and a target such as "head-band
success@10 >= 0.9" has to be read against what one list per key can reach, whatever the
policy learns. Both lists ignore retrieval: they may hold items no arm finds.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..metrics import ndcg_at_k, success_at_k
from .queries import QUERY_TYPES, SimQuery
from .report import BANDS, key_bands, last_third_start
from .users import stable_seed

#: Reformulation rates of the ``chained`` bound in the report.
CHAIN_RATES = (0.1, 0.3)


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


def revealed_by_chains(queries: Sequence[SimQuery], ts: Sequence[int], p: float, *,
                       seed: int = 0) -> list[dict[str, int]]:
    """The items query chains reveal on rounds ``ts`` (see ``chained`` in the module
    docstring): per round, with probability ``p``, one of its user's wanted items (uniform,
    seeded by ``seed``, the rate, the round and the user), as a one-item set."""
    out: list[dict[str, int]] = []
    for t in ts:
        q = queries[t]
        rng = np.random.default_rng(stable_seed(seed, "chain", f"{p:.6g}", t, q.user))
        if q.relevant and rng.random() < p:
            wants = sorted(q.relevant)
            out.append({wants[int(rng.integers(len(wants)))]: 1})
    return out


def list_bounds(queries: Sequence[SimQuery], *, score_from: int, k: int = 10,
                bands: Mapping[str, str] | None = None,
                chain_rates: Sequence[float] = ()) -> dict[str, Any]:
    """The lists of the module docstring scored on rounds ``t >= score_from`` of ``queries``
    (round ``t`` = ``queries[t]``), overall, by type and by band (``bands``: key -> band, as
    the report computes them; default: no bands); ``chained`` per rate in ``chain_rates``."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for t, q in enumerate(queries):
        by_key[q.key].append(t)
    bands = dict(bands or {})
    lists = ("learned", "hindsight", *(f"chained_{p:g}" for p in chain_rates))
    # per scored round: type, band, then (success, ndcg) of each list, in the order of ``lists``
    scored: list[tuple[str, str, list[tuple[float, float]]]] = []
    for key, ts in by_key.items():
        early = [t for t in ts if t < score_from]
        after = [t for t in ts if t >= score_from]
        if not after:
            continue
        shown = [greedy_cover([queries[t].relevant for t in early], k),
                 greedy_cover([queries[t].relevant for t in after], k)]
        shown += [greedy_cover(revealed_by_chains(queries, early, p), k) for p in chain_rates]
        band = bands.get(key, "")
        for t in after:
            q = queries[t]
            scored.append((q.qtype, band, [(success_at_k(lst, q.relevant, k),
                                            ndcg_at_k(lst, q.relevant, k)) for lst in shown]))

    def part(rows: Sequence[tuple[str, str, list[tuple[float, float]]]]) -> dict[str, Any]:
        out: dict[str, Any] = {"n": len(rows)}
        for i, name in enumerate(lists):
            out[name] = {"success": _mean([r[2][i][0] for r in rows]),
                         "ndcg": _mean([r[2][i][1] for r in rows])}
        return out

    return {
        "k": k, "score_from": score_from, "chain_rates": list(chain_rates),
        "overall": part(scored),
        "by_type": {t: part([r for r in scored if r[0] == t]) for t in QUERY_TYPES},
        "bands": {b: part([r for r in scored if r[1] == b]) for b in BANDS} if bands else {},
    }


def stream_bounds(queries: Sequence[SimQuery], *, rounds: int, display: int) -> dict[str, Any]:
    """:func:`list_bounds` on the last third of a run, with the report's key bands."""
    bands = key_bands([{"key": q.key} for q in queries])
    return list_bounds(queries, score_from=last_third_start(rounds), k=display, bands=bands,
                       chain_rates=CHAIN_RATES)
