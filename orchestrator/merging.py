"""Merge the arms' hit lists into one candidate set, deduplicated by ``_id``.

Consumes the :class:`ArmResult` s of one ``_msearch`` (failures are skipped), produces
:class:`Candidate` s that keep their provenance in every arm (arm, rank, raw score and the
score normalised by that arm's top score). Order of the output: reciprocal-rank fusion, so
the list is meaningful even before rescoring; the rescorer decides the final order.

Memory-index hits (the ``memory`` arm) arrive with the item id as their id and a denormalised
copy of the item plus ``_memory`` (``ctr``, ``exposures``, ``clicks``) as their source (see
:meth:`orchestrator.execution.MultiSearch._hit`). When a catalog arm also found the item, the
catalog's source wins field by field and keeps the ``_memory`` annotation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .domain import ArmFailure, ArmResult, Candidate, Provenance

#: The usual RRF constant (Cormack et al. 2009).
RRF_K = 60
#: Source key of a memory-index hit's annotation (its source is a copy of the item).
MEMORY_KEY = "_memory"


class Merger(Protocol):
    def merge(self, results: Sequence[ArmResult | ArmFailure]) -> list[Candidate]: ...


def rrf(provenance: Sequence[Provenance], *, k: int = RRF_K) -> float:
    return sum(1.0 / (k + p.rank) for p in provenance)


class UnionMerger:
    """Union of every arm's hits; a document found by several arms becomes one candidate
    with several provenance entries. ``_source`` is the union of what the arms returned
    (arms may exclude different fields); a catalog arm's source beats a memory copy."""

    def __init__(self, *, rrf_k: int = RRF_K) -> None:
        self.rrf_k = rrf_k

    def merge(self, results: Sequence[ArmResult | ArmFailure]) -> list[Candidate]:
        sources: dict[str, dict] = {}
        prov: dict[str, list[Provenance]] = {}
        for r in results:
            if not r.ok:
                continue
            assert isinstance(r, ArmResult)
            top = max((h.score for h in r.hits), default=0.0)
            for h in r.hits:
                norm = h.score / top if top > 0 else 0.0
                p = Provenance(r.arm, r.template_id, h.rank, h.score, norm)
                if h.id in prov:
                    if any(q.template_id == r.template_id for q in prov[h.id]):
                        continue  # an arm returning a document twice (shouldn't) counts once
                    prov[h.id].append(p)
                    src = sources[h.id]
                    if MEMORY_KEY in src and MEMORY_KEY not in h.source:
                        # A catalog hit after a memory copy: the catalog's fields win.
                        sources[h.id] = {**src, **h.source}
                        continue
                    for key, value in h.source.items():
                        src.setdefault(key, value)
                else:
                    prov[h.id] = [p]
                    sources[h.id] = dict(h.source)
        cands = [Candidate(i, sources[i], tuple(ps)) for i, ps in prov.items()]
        cands.sort(key=lambda c: -rrf(c.provenance, k=self.rrf_k))
        return cands
