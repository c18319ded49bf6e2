"""Ranking metrics of the simulator, against a graded relevant set (ids -> grade >= 1).

One definition for the whole project: these are :mod:`orchestrator.metrics` (nDCG@k with
trec_eval's linear gain and log2 discount; success@k; reciprocal rank, where the list shown is
the cut-off; candidate recall and hit over the merged union). Until Dec 2026 the simulator's
nDCG used the exponential gain ``2**grade - 1``; on the binary-graded known-item and playlist
queries both are the same, on tag queries (grades 1-4) the linear gain weighs an artist graded
4 four times a track graded 1 instead of fifteen times.
"""

from __future__ import annotations

from ..metrics import (
    candidate_hit,
    candidate_recall,
    dcg,
    ndcg_at_k,
    reciprocal_rank,
    success_at_k,
)

__all__ = ["candidate_hit", "candidate_recall", "dcg", "ndcg_at_k", "reciprocal_rank",
           "success_at_k"]
