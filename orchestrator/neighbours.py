"""Neighbours of a clicked item: what else the users who clicked it for a query may want.

Consumes the catalog documents (:data:`~orchestrator.memory.ITEM_FIELDS` copies) of items
that just got their first click for a query key; produces, per item, the catalog entities
closest to it, which :class:`~orchestrator.memory.MemoryUpdater` writes as **neighbour
pairs** of the same query key (``source: "neighbour"``, no clicks, a small prior).

Why: the memory arm can only return what was clicked, and a user can only click what some
arm retrieved. For a head query such as a playlist title ("urban contemporary") the static
arms hold a few percent of what its users want, and the memory stays stuck on those. A click
is also weaker evidence about the clicked item's neighbourhood (its artist's other tracks,
items sharing its genres), so the memory proposes them for that query and lets the users
decide: a neighbour pair starts at ``prior * decay ** rank`` (below any pair with a click),
matches the memory arm like a predicted pair, gains a learned score when it is clicked, and
its exposures without a click push it below ``memory.min_score`` (inactive) within a few
impressions, so a wrong guess costs a handful of slots in the memory's budget.

Modes (``memory.neighbours_by``):

``artist``
    The same artist's other entities of the clicked item's type, most popular first.
``genre``
    ``more_like_this`` on the clicked item's ``artist_genres`` / ``genres`` (looked up by its
    id, so nothing but the id travels), popularity multiplied in.
``both``
    One query, the union: same-artist matches first (``artist_boost``), then genre neighbours.

All clicked items of an updater batch go in one ``_msearch``; the cost grows with the first
clicks of the batch, never with the history. An item's neighbours depend on the catalog
alone, and a popular item gets first clicks under many query keys, so the updater keeps
them in a :class:`NeighbourCache` (bounded, entries expire) and searches the misses only.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from elasticsearch import Elasticsearch

logger = logging.getLogger(__name__)

NeighbourMode = Literal["artist", "genre", "both"]
MODES: tuple[str, ...] = ("artist", "genre", "both")

#: Fields returned for a neighbour (its ``item`` copy in the pair document).
_SOURCE_EXCLUDES = ["embedding", "q2e", "audio", "playlists"]


@dataclass(frozen=True)
class Neighbour:
    item_id: str
    rank: int
    source: dict[str, Any]


def _artists(item: Mapping[str, Any]) -> list[str]:
    a = item.get("artist")
    if isinstance(a, str):
        return [a] if a else []
    return [x for x in (a or []) if isinstance(x, str) and x][:5]


def neighbour_query(item_id: str, item: Mapping[str, Any], *, size: int,
                    mode: NeighbourMode = "artist", artist_boost: float = 10.0,
                    min_shared_pct: int = 30) -> dict[str, Any] | None:
    """The ``_search`` body of ``item_id``'s neighbours (None: the item offers no handle,
    e.g. ``artist`` mode and no artist)."""
    if mode not in MODES:
        raise ValueError(f"neighbour mode must be one of {MODES}, got {mode!r}")
    etype = item.get("entity_type") or item_id.split(":", 1)[0]
    artists = _artists(item)
    should: list[dict[str, Any]] = []
    if mode in ("artist", "both") and artists:
        should.append({"terms": {"artist.raw": artists, "boost": artist_boost}})
    if mode in ("genre", "both") and (item.get("artist_genres") or item.get("genres")):
        should.append({"more_like_this": {
            "fields": ["artist_genres", "genres"], "like": [{"_id": item_id}],
            "min_term_freq": 1, "min_doc_freq": 2, "max_query_terms": 30,
            "minimum_should_match": f"{min_shared_pct}%", "include": False}})
    if not should:
        return None
    return {
        "size": size, "track_total_hits": False, "_source": {"excludes": _SOURCE_EXCLUDES},
        "query": {"function_score": {
            "query": {"bool": {"should": should, "minimum_should_match": 1,
                               "filter": [{"term": {"entity_type": etype}}],
                               "must_not": [{"ids": {"values": [item_id]}}]}},
            "functions": [{"field_value_factor": {"field": "popularity", "modifier": "log1p",
                                                  "missing": 0}},
                          {"weight": 1}],
            "score_mode": "sum", "boost_mode": "multiply"}},
    }


def find_neighbours(es: Elasticsearch, index: str, items: Mapping[str, Mapping[str, Any]], *,
                    size: int, mode: NeighbourMode = "artist",
                    timeout: str = "2s") -> dict[str, list[Neighbour]]:
    """``{item id: its neighbours, best first}`` for every item of ``items`` (id -> catalog
    fields), in one ``_msearch`` on ``index``. An item whose search fails gets none (logged):
    neighbours are a proposal, never a reason to fail the memory's batch."""
    ids: list[str] = []
    body: list[dict[str, Any]] = []
    for item_id, src in items.items():
        q = neighbour_query(item_id, src, size=size, mode=mode)
        if q is None:
            continue
        ids.append(item_id)
        body += [{"index": index}, {**q, "timeout": timeout}]
    if not body:
        return {}
    resp = es.msearch(searches=body)
    out: dict[str, list[Neighbour]] = {}
    for item_id, r in zip(ids, resp["responses"]):
        if "error" in r:
            logger.warning("neighbours of %s: %s", item_id, r["error"])
            continue
        out[item_id] = [Neighbour(h["_id"], rank, h.get("_source") or {})
                        for rank, h in enumerate(r["hits"]["hits"])]
    return out


def neighbour_priors(n: int, *, prior: float, decay: float) -> list[float]:
    """Priors of the ``n`` neighbours of one click, best first: ``prior * decay ** rank``.

    >>> [round(p, 3) for p in neighbour_priors(3, prior=0.2, decay=0.8)]
    [0.2, 0.16, 0.128]
    """
    return [prior * decay ** r for r in range(n)]


__all__ = ["MODES", "Neighbour", "NeighbourMode", "find_neighbours", "neighbour_priors",
           "neighbour_query"]


class NeighbourCache:
    """:func:`find_neighbours` behind a bounded LRU of ``item id -> neighbours`` whose entries
    expire after ``ttl_s`` (so items added to the catalog become neighbours within that
    time). Failed searches are not cached. One per updater (one ``size`` and ``mode``).

    >>> calls = []
    >>> def search(es, index, items, **kw):
    ...     calls.append(sorted(items)); return {i: [] for i in items}
    >>> cache = NeighbourCache(size=5, mode="artist", max_items=2, search=search)
    >>> _ = cache.get(None, "cat", {"a": {"x": 1}, "b": {"x": 1}})
    >>> _ = cache.get(None, "cat", {"a": None, "c": None}, load=lambda ids: {i: {"x": 1} for i in ids})
    >>> calls, cache.hits, cache.misses
    ([['a', 'b'], ['c']], 1, 3)
    """

    def __init__(self, *, size: int, mode: NeighbourMode = "artist", max_items: int = 50_000,
                 ttl_s: float = 3600.0, clock: Callable[[], float] = time.monotonic,
                 search: Callable[..., dict[str, list[Neighbour]]] | None = None) -> None:
        self.size, self.mode = size, mode
        self.max_items, self.ttl_s, self.clock = max_items, ttl_s, clock
        self._search = search or find_neighbours
        self._lru: OrderedDict[tuple[str, str], tuple[float, list[Neighbour]]] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, es: Elasticsearch, index: str, items: Mapping[str, Mapping[str, Any] | None],
            *, load: Callable[[list[str]], Mapping[str, Mapping[str, Any]]] | None = None,
            ) -> dict[str, list[Neighbour]]:
        """Neighbours of ``items`` (id -> catalog fields, or None: ``load`` reads the fields
        of the misses that lack them, so a cached item costs no read)."""
        now = self.clock()
        out: dict[str, list[Neighbour]] = {}
        todo: dict[str, Mapping[str, Any]] = {}
        lacking: list[str] = []
        for item_id, src in items.items():
            hit = self._lru.get((index, item_id))
            if hit is not None and now - hit[0] < self.ttl_s:
                self._lru.move_to_end((index, item_id))
                out[item_id] = hit[1]
            elif src:
                todo[item_id] = src
            else:
                lacking.append(item_id)
        if lacking and load is not None:
            todo.update(load(lacking))
        self.hits += len(out)
        self.misses += len(todo)
        if todo:
            found = self._search(es, index, todo, size=self.size, mode=self.mode)
            for item_id, nbs in found.items():
                self._lru[(index, item_id)] = (now, nbs)
                self._lru.move_to_end((index, item_id))
                out[item_id] = nbs
            while len(self._lru) > self.max_items:
                self._lru.popitem(last=False)
        return out
