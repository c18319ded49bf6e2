"""Ranking metrics against a graded relevant set (ids -> grade >= 1).

``success_at_k``: any relevant item in the top ``k``. ``reciprocal_rank``: 1 / rank of the
first relevant item (0 when none is shown; the list shown is the cut-off). ``ndcg_at_k``:
exponential gain ``2**grade - 1`` with the ``log2(rank + 1)`` discount, normalised by the
ideal list of the ``k`` best grades. ``candidate_recall``: fraction of the relevant items
present anywhere in the merged candidate union (capped at the union's size, so a playlist
with 80 tracks and a union of 60 can still reach 1.0).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence


def success_at_k(shown: Sequence[str], relevant: Mapping[str, int], k: int = 10) -> float:
    return float(any(relevant.get(i, 0) > 0 for i in shown[:k]))


def reciprocal_rank(shown: Sequence[str], relevant: Mapping[str, int], k: int | None = None) -> float:
    for r, i in enumerate(shown[:k] if k else shown, start=1):
        if relevant.get(i, 0) > 0:
            return 1.0 / r
    return 0.0


def dcg(grades: Sequence[float]) -> float:
    return sum((2.0 ** g - 1.0) / math.log2(r + 1) for r, g in enumerate(grades, start=1))


def ndcg_at_k(shown: Sequence[str], relevant: Mapping[str, int], k: int = 10) -> float:
    ideal = dcg(sorted((g for g in relevant.values() if g > 0), reverse=True)[:k])
    if ideal <= 0:
        return 0.0
    return dcg([relevant.get(i, 0) for i in shown[:k]]) / ideal


def candidate_recall(candidates: Collection[str], relevant: Mapping[str, int]) -> float:
    rel = [i for i, g in relevant.items() if g > 0]
    if not rel or not candidates:
        return 0.0
    found = sum(1 for i in rel if i in candidates)
    return found / min(len(rel), len(candidates))


def candidate_hit(candidates: Collection[str], relevant: Mapping[str, int]) -> float:
    """Any relevant item anywhere in the candidate union (the "wanted item was retrieved")."""
    return float(any(relevant.get(i, 0) > 0 for i in candidates))
