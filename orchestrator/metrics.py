"""Ranking metrics: the one nDCG (and recall, MRR, success) every evaluation in the project uses.

Upstream: a ranking (ids, best first) and graded judgements (``{id: grade}``, grade > 0 is
relevant); or, for the ranker's holdout, scores and labels of the shown items. Downstream:
the ranker's promotion rule (:mod:`orchestrator.training`), the simulator's rewards and
tables (:mod:`orchestrator.simulation`) and the BEIR report (:mod:`orchestrator.beir`).

nDCG@k is trec_eval's ``ndcg_cut.k`` (what pytrec_eval computes, and what BEIR reports):
**linear gain** ``grade`` with the **log2 discount** ``1 / log2(rank + 1)`` (rank from 1) over
the top ``k``, divided by the same sum over the ``k`` best grades of the judgements; grades
<= 0 gain nothing; 0.0 when nothing is relevant. ``gain="exponential"`` (``2**grade - 1``,
Burges et al.) exists for comparison only; it equals the linear gain when every grade is 0
or 1. A ranking is a list, so ties are already broken: trec_eval itself sorts tied scores by
document id, descending (tests/unit/test_differential.py checks the relation).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Literal

import numpy as np

Gain = Literal["linear", "exponential"]


def _gain(grade: float, gain: Gain) -> float:
    if grade <= 0:
        return 0.0
    return float(grade) if gain == "linear" else 2.0 ** grade - 1.0


def dcg(grades: Sequence[float], *, gain: Gain = "linear") -> float:
    """``sum_r gain(grade_r) / log2(r + 1)`` over ``grades`` in rank order (r from 1)."""
    return sum(_gain(g, gain) / math.log2(r + 1) for r, g in enumerate(grades, start=1))


def _first_k(ranking: Sequence[str], k: int | None) -> list[str]:
    """The first ``k`` distinct ids (a repeated id counts once, at its first rank)."""
    seen: set[str] = set()
    out: list[str] = []
    for d in ranking:
        if d not in seen:
            seen.add(d)
            out.append(d)
            if k is not None and len(out) >= k:
                break
    return out


def ndcg_at_k(ranking: Sequence[str], judged: Mapping[str, float], k: int = 10, *,
              gain: Gain = "linear") -> float:
    """nDCG@k of one ranking against graded judgements (trec_eval ``ndcg_cut.k``).

    Parameters
    ----------
    ranking:
        Ids, best first. A repeated id counts once, at its first rank.
    judged:
        ``{id: grade}``; ids not in it, and grades <= 0, are not relevant.
    k:
        The cut-off.
    gain:
        ``"linear"`` (trec_eval, BEIR) or ``"exponential"`` (``2**grade - 1``).

    Returns
    -------
    float in [0, 1]; 0.0 when nothing is relevant.

    >>> ndcg_at_k(["a", "b"], {"b": 1}) == 1 / math.log2(3)
    True
    """
    ideal = dcg(sorted((g for g in judged.values() if g > 0), reverse=True)[:k], gain=gain)
    if ideal <= 0:
        return 0.0
    return dcg([judged.get(d, 0) for d in _first_k(ranking, k)], gain=gain) / ideal


def ndcg_of_scores(scores: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray, *,
                   k: int = 10, gain: Gain = "linear") -> float:
    """nDCG@k of ranking items by ``scores`` (descending; ties keep the given order, i.e. the
    display order), with ``labels`` as the grades. The same definition as :func:`ndcg_at_k`.
    """
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels, dtype=float)
    order = np.argsort(-s, kind="stable")[:k]
    ideal = dcg(sorted((g for g in y.tolist() if g > 0), reverse=True)[:k], gain=gain)
    return dcg(y[order].tolist(), gain=gain) / ideal if ideal > 0 else 0.0


def recall_at_k(ranking: Sequence[str], judged: Mapping[str, float], k: int = 100) -> float:
    """Share of the relevant (grade > 0) ids of ``judged`` in the top ``k`` (0.0 when none)."""
    relevant = {d for d, g in judged.items() if g > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(_first_k(ranking, k))) / len(relevant)


def reciprocal_rank(ranking: Sequence[str], judged: Mapping[str, float],
                    k: int | None = None) -> float:
    """``1 / rank`` of the first relevant id in the top ``k`` (all when None), else 0.0; the
    mean over queries is MRR@k."""
    for r, d in enumerate(ranking[:k] if k else ranking, start=1):
        if judged.get(d, 0) > 0:
            return 1.0 / r
    return 0.0


def mrr_at_k(ranking: Sequence[str], judged: Mapping[str, float], k: int = 10) -> float:
    """:func:`reciprocal_rank` with a cut-off (one query's term of MRR@k)."""
    return reciprocal_rank(ranking, judged, k)


def success_at_k(ranking: Sequence[str], judged: Mapping[str, float], k: int = 10) -> float:
    """1.0 when any relevant id is in the top ``k``, else 0.0."""
    return float(any(judged.get(d, 0) > 0 for d in ranking[:k]))


def candidate_recall(candidates: Collection[str], judged: Mapping[str, float]) -> float:
    """Share of the relevant ids present anywhere in ``candidates``, capped by the number of
    candidates (a union of 60 can reach 1.0 against 80 relevant ids)."""
    rel = [d for d, g in judged.items() if g > 0]
    if not rel or not candidates:
        return 0.0
    return sum(1 for d in rel if d in candidates) / min(len(rel), len(candidates))


def candidate_hit(candidates: Collection[str], judged: Mapping[str, float]) -> float:
    """Any relevant id anywhere in the candidate union (the "wanted item was retrieved")."""
    return float(any(judged.get(d, 0) > 0 for d in candidates))


__all__ = ["Gain", "candidate_hit", "candidate_recall", "dcg", "mrr_at_k", "ndcg_at_k",
           "ndcg_of_scores", "recall_at_k", "reciprocal_rank", "success_at_k"]
