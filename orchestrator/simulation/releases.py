"""New releases in a simulation: the newest items held out of the run's catalog at the start
and ingested mid-run through the product's own incremental path.

Consumes a :class:`orchestrator.catalog.HoldOut` (from :func:`hold_out_newest`), the live
catalog alias and the run's memory clones; produces a per-run catalog clone
``ltrr-sim-<run>-catalog`` (alias ``<index>-alias``, what every policy of the run searches)
without the held-out entities, and, at release time, the held-out entities written into it
with :func:`orchestrator.ingest.add_entities` (embeddings, exposure kept, refresh) plus the
cold start of their predicted Q2E pairs in every memory clone.

Cost: ``_clone`` hard-links the source's segments (the source is write-blocked only for the
clone call itself, restored in a ``finally``); the hold-out is removed with one bulk delete
by ``_id`` (catalog ``_id`` = ``<entity_type>:<entity_id>``, the memory's ``item_id``;
the node has no ``_delete_by_query``). The
documents to release are built once (by default at prepare time, so the mid-run release only
embeds and writes them) and embedded once, whatever the number of memory clones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from elasticsearch import Elasticsearch, NotFoundError, helpers

from ..catalog import CatalogBuilder, HoldOut
from ..errors import IngestError
from ..ingest import cold_start_memory

logger = logging.getLogger(__name__)

_CHUNK = 1000
_TERMS_CHUNK = 10000


@dataclass
class Release:
    """The run's catalog clone and what is released into it."""

    hold_out: HoldOut
    #: The run's catalog clone alias (what every policy searches).
    catalog_alias: str
    catalog_index: str
    #: Memory clones that receive the cold start at release time.
    memory_aliases: list[str] = field(default_factory=list)
    #: Counts (and seconds) removed at prepare time: catalog docs, memory pairs per alias.
    removed: dict[str, Any] = field(default_factory=dict)
    #: The release's result once released (see :func:`release`).
    released: dict[str, Any] | None = None
    #: Genres filter of the builder (a catalog slice; None: the whole catalog).
    genres: frozenset[str] | None = None
    #: The entity documents to release, built at prepare time (None: built at release).
    docs: list[dict[str, Any]] | None = field(default=None, repr=False)
    build_report: dict[str, Any] = field(default_factory=dict, repr=False)
    build_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"catalog_alias": self.catalog_alias, "catalog_index": self.catalog_index,
                "memory_aliases": list(self.memory_aliases), "removed": self.removed,
                "released": self.released, "held_out": len(self.hold_out.ids),
                "cutoff": self.hold_out.cutoff}


def catalog_index_name(run_id: str) -> str:
    """The physical index of a run's catalog clone (lower case, as ES requires)."""
    return f"ltrr-sim-{run_id}-catalog".lower()


def _physical(es: Elasticsearch, alias_or_index: str) -> str:
    """The index behind ``alias_or_index``: its write index (or only index), or itself."""
    try:
        body = es.indices.get_alias(name=alias_or_index).body
    except NotFoundError:
        if es.indices.exists(index=alias_or_index):
            return alias_or_index
        raise IngestError(f"no index or alias {alias_or_index!r}") from None
    writers = [i for i, a in body.items()
               if a.get("aliases", {}).get(alias_or_index, {}).get("is_write_index")]
    if len(writers) == 1:
        return writers[0]
    if len(body) == 1:
        return next(iter(body))
    raise IngestError(f"alias {alias_or_index!r} points at {sorted(body)} and has no write index")


def clone_index(es: Elasticsearch, source: str, target: str, *, alias: str | None = None,
                lock: Callable[[str], AbstractContextManager[Any]] | None = None
                ) -> dict[str, Any]:
    """``_clone`` the index behind ``source`` (alias or index) into ``target`` (replicas 0,
    ``alias`` as its write alias), writable. The source is write-blocked for the clone call
    only (its previous block state is restored in a ``finally``: a block set by someone
    else's concurrent clone is left to them). ``lock(source index)``, when given, is held
    around block -> clone -> unblock, so that concurrent clones of one source (several
    processes) never unblock it under each other. Returns the source index and seconds."""
    src = _physical(es, source)
    if es.indices.exists(index=target):
        raise IngestError(f"{target} already exists (a previous run not cleaned up?)")
    with lock(src) if lock is not None else nullcontext():
        return _clone_blocked(es, src, target, alias)


def _clone_blocked(es: Elasticsearch, src: str, target: str, alias: str | None) -> dict[str, Any]:
    cur = es.indices.get_settings(index=src, name="index.blocks.write", flat_settings=True).body
    was_blocked = str(cur.get(src, {}).get("settings", {}).get("index.blocks.write", "")).lower() \
        == "true"
    t0 = time.perf_counter()
    if not was_blocked:
        es.indices.put_settings(index=src, settings={"index.blocks.write": True})
    try:
        es.options(request_timeout=300).indices.clone(
            index=src, target=target, settings={"index.number_of_replicas": 0},
            aliases={alias: {"is_write_index": True}} if alias else None,
            wait_for_active_shards="1")
    finally:
        if not was_blocked:
            es.indices.put_settings(index=src, settings={"index.blocks.write": None})
    blocked_s = time.perf_counter() - t0
    # The clone copies the source's settings, the block included.
    es.indices.put_settings(index=target, settings={"index.blocks.write": None})
    return {"source": src, "target": target, "alias": alias,
            "blocked_seconds": round(blocked_s, 3),
            "seconds": round(time.perf_counter() - t0, 3)}


def _delete_ids(es: Elasticsearch, index: str, ids: Sequence[str]) -> tuple[int, int]:
    """Bulk-delete documents by ``_id``: ``(deleted, not found)``."""
    def actions() -> Iterator[dict[str, Any]]:
        for i in ids:
            yield {"_op_type": "delete", "_index": index, "_id": i}

    deleted = missing = 0
    for ok, info in helpers.streaming_bulk(es.options(request_timeout=120), actions(),
                                           chunk_size=_CHUNK, raise_on_error=False,
                                           raise_on_exception=False):
        item = next(iter(info.values()))
        if ok and item.get("result") == "deleted":
            deleted += 1
        elif item.get("status") == 404:
            missing += 1
        else:
            raise IngestError(f"could not delete {item.get('_id')} from {index}: {item}")
    return deleted, missing


def purge_memory(es: Elasticsearch, memory_alias_or_index: str, ids: Iterable[str]) -> int:
    """Delete every memory pair whose item (``item_id``, a catalog id) is one of ``ids``
    (a memory clone made from the full catalog's memory then knows nothing of the held-out
    items), refresh; return the number deleted. (The node has no ``_delete_by_query``: the
    pairs are found with a scroll on ``item_id`` and deleted in bulk by ``_id``.)"""
    ids = sorted(set(ids))
    es.indices.refresh(index=memory_alias_or_index)
    by_index: dict[str, list[str]] = {}
    for start in range(0, len(ids), _TERMS_CHUNK):
        for hit in helpers.scan(es.options(request_timeout=120), index=memory_alias_or_index,
                                size=5000, _source=False,
                                query={"query": {"terms": {"item_id": ids[start:start + _TERMS_CHUNK]}}}):
            by_index.setdefault(hit["_index"], []).append(hit["_id"])
    deleted = 0
    for index, pids in by_index.items():
        deleted += _delete_ids(es, index, pids)[0]
    es.indices.refresh(index=memory_alias_or_index)
    return deleted


def _builder(settings: Any, hold_out: HoldOut, genres: frozenset[str] | None) -> CatalogBuilder:
    # ``only``: the held-out tracks plus the complete album/artist docs of each of them,
    # computed from the full data (existing artists with a new release are rewritten too).
    return CatalogBuilder(settings.ingest.data_dir, only=hold_out.ids,
                          genres=set(genres) if genres is not None else None)


def build_release_docs(settings: Any, rel: Release) -> list[dict[str, Any]]:
    """Build (once) and keep the entity documents ``release`` writes."""
    if rel.docs is None:
        t0 = time.perf_counter()
        builder = _builder(settings, rel.hold_out, rel.genres)
        rel.docs = list(builder.build())
        rel.build_report = builder.report.as_dict()
        rel.build_seconds = round(time.perf_counter() - t0, 2)
    return rel.docs


def prepare_catalog(es: Elasticsearch, settings: Any, *, run_id: str, hold_out: HoldOut,
                    source_alias: str | None = None, memory_aliases: Sequence[str] = (),
                    genres: Iterable[str] | None = None, prebuild: bool = True,
                    lock: Callable[[str], AbstractContextManager[Any]] | None = None) -> Release:
    """Clone the index behind the catalog alias (``source_alias``, default the configured
    one) into ``ltrr-sim-<run>-catalog`` with the write alias ``<index>-alias``, delete the
    held-out documents from the clone (the source is untouched), refresh. ``memory_aliases``
    (memory clones made from the full catalog's memory) are purged of the held-out items'
    pairs and receive their cold start at release. ``prebuild`` builds the documents to
    release now (so the mid-run release only embeds and writes them); ``genres``: the
    builder's genre filter when the source is a slice; ``lock``: as :func:`clone_index`."""
    t0 = time.perf_counter()
    source_alias = source_alias or settings.es.catalog_alias
    index = catalog_index_name(run_id)
    alias = f"{index}-alias"
    cloned = clone_index(es, source_alias, index, alias=alias, lock=lock)
    try:
        t1 = time.perf_counter()
        deleted, missing = _delete_ids(es, index, sorted(hold_out.ids))
        es.indices.refresh(index=index)
        delete_s = time.perf_counter() - t1
    except BaseException:
        es.indices.delete(index=index, ignore_unavailable=True)
        raise
    removed: dict[str, Any] = {
        "source_index": cloned["source"], "catalog_docs": deleted, "catalog_missing": missing,
        "clone_seconds": cloned["seconds"], "blocked_seconds": cloned["blocked_seconds"],
        "delete_seconds": round(delete_s, 2), "memory_pairs": {}, "purge_seconds": 0.0,
    }
    t2 = time.perf_counter()
    for m in memory_aliases:
        removed["memory_pairs"][m] = purge_memory(es, m, hold_out.ids)
    removed["purge_seconds"] = round(time.perf_counter() - t2, 2)
    rel = Release(hold_out=hold_out, catalog_alias=alias, catalog_index=index,
                  memory_aliases=list(memory_aliases), removed=removed,
                  genres=frozenset(genres) if genres is not None else None)
    if prebuild:
        build_release_docs(settings, rel)
        removed["build_seconds"] = rel.build_seconds
    removed["seconds"] = round(time.perf_counter() - t0, 2)
    logger.info("release prepared: %s", removed)
    return rel


def release(es: Elasticsearch, settings: Any, rel: Release, *, encoder: Any = None) -> dict[str, Any]:
    """Ingest the held-out entities into ``rel.catalog_alias`` with
    :func:`orchestrator.ingest.add_entities` (the held-out tracks plus the complete docs of
    their albums and artists, embedded once with ``encoder``, default the configured one)
    and cold-start their predicted pairs in every memory alias of ``rel.memory_aliases``
    (the first through ``add_entities``, the others directly, from the same documents).
    Sets and returns ``rel.released``: counts and seconds."""
    from ..ingest import add_entities

    t0 = time.perf_counter()
    prebuilt = rel.docs is not None
    docs = build_release_docs(settings, rel)
    build_s = 0.0 if prebuilt else rel.build_seconds
    if encoder is None:
        from ..embeddings import get_encoder

        mapping = es.indices.get_mapping(index=rel.catalog_index).body[rel.catalog_index]
        if "embedding" in mapping["mappings"].get("properties", {}):
            encoder = get_encoder(settings.embedding)
    aliases = list(rel.memory_aliases)
    res = add_entities(es, settings, docs, alias=rel.catalog_alias,
                       memory_alias=aliases[0] if aliases else None, cold_start=bool(aliases),
                       encoder=encoder, embeddings=encoder is not None)
    res["build_report"] = rel.build_report
    memory: dict[str, Any] = {}
    if aliases:
        memory[aliases[0]] = {k: res[k] for k in ("pairs", "pairs_existing", "pairs_failed")}
        memory[aliases[0]]["seconds"] = res["memory_seconds"]
    skip = set(res["failed_ids"])  # rejected by the catalog: no pairs in any memory
    for m in aliases[1:]:
        memory[m] = cold_start_memory(es, settings, docs, m, skip_ids=skip)
    for d in docs:  # the vectors are in the index now; do not keep ~1 KB per doc around
        d.pop("embedding", None)
    out = {
        "catalog": res, "memory": memory, "docs": len(docs), "indexed": res["indexed"],
        "failed": res["failed"], "entities": res["entities"],
        "pairs": sum(v["pairs"] for v in memory.values()),
        "build_seconds": round(build_s, 2), "embed_seconds": res["embed_seconds"],
        "index_seconds": res["index_seconds"],
        "memory_seconds": round(sum(float(v["seconds"]) for v in memory.values()), 2),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    rel.released = out
    logger.info("released %d docs into %s in %.1fs", len(docs), rel.catalog_alias, out["seconds"])
    return out


def cleanup(es: Elasticsearch, run_id: str) -> None:
    """Delete the run's catalog clone (and its alias with it)."""
    es.indices.delete(index=catalog_index_name(run_id), ignore_unavailable=True)
