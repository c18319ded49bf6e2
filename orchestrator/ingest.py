"""Bulk-load the catalog into a fresh versioned index and swap the alias to it.

Consumes entity documents from :class:`orchestrator.catalog.CatalogBuilder`, adds
embeddings, writes them with ``elasticsearch.helpers.parallel_bulk`` into
``<alias>-v<schema>-<timestamp>``, then moves the alias atomically (zero downtime: readers see
the old index until the new one is complete). Re-running is safe; a failed run leaves the
alias where it was.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from elasticsearch import Elasticsearch, NotFoundError, helpers

from .catalog import CatalogBuilder, doc_id, embedding_text
from .embeddings import Encoder
from .errors import IngestError

logger = logging.getLogger(__name__)


def load_mapping(mappings_dir: Path, name: str, *, dims: int | None = None) -> dict[str, Any]:
    """Read ``mappings/<name>.json`` without its ``_comment`` keys; set the vector dims."""
    body = json.loads((mappings_dir / f"{name}.json").read_text(encoding="utf-8"))
    body.pop("_comment", None)
    if dims is not None and "embedding" in body["mappings"]["properties"]:
        body["mappings"]["properties"]["embedding"]["dims"] = dims
    return body


@dataclass
class IngestSummary:
    index: str
    alias: str
    indexed: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    build_report: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    embed_seconds: float = 0.0
    swapped_from: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)

    @property
    def docs_per_s(self) -> float:
        return self.indexed / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "alias": self.alias, "indexed": self.indexed,
            "failed": dict(self.failed), "build_report": self.build_report,
            "seconds": round(self.seconds, 2), "embed_seconds": round(self.embed_seconds, 2),
            "docs_per_s": round(self.docs_per_s, 1), "swapped_from": self.swapped_from,
            "deleted": self.deleted, "memory": self.memory,
        }


class CatalogIndexer:
    """Index a catalog behind ``alias``.

    Parameters
    ----------
    client:
        The Elasticsearch client (built by :func:`orchestrator.es_client.build_client`).
    alias:
        The alias readers use (``ltrr-catalog``).
    encoder:
        The text encoder, or ``None`` to index without vectors (the kNN arm then finds nothing).
    """

    def __init__(self, client: Elasticsearch, *, alias: str, mappings_dir: Path,
                 encoder: Encoder | None, chunk_size: int = 500, thread_count: int = 2,
                 embed_batch: int = 2048, keep_old_indices: int = 1,
                 max_failure_ratio: float = 0.01, memory_alias: str | None = None,
                 memory: dict[str, Any] | None = None) -> None:
        self.client = client
        self.alias = alias
        self.mappings_dir = mappings_dir
        self.encoder = encoder
        self.chunk_size = chunk_size
        self.thread_count = thread_count
        self.embed_batch = embed_batch
        self.keep_old_indices = keep_old_indices
        self.max_failure_ratio = max_failure_ratio
        #: Also seed this memory index alias with the predicted Q2E pairs (None: do not);
        #: ``memory`` = keyword arguments of :func:`orchestrator.memory.seed_memory`.
        self.memory_alias = memory_alias
        self.memory = dict(memory or {})

    def _actions(self, docs: Iterable[dict[str, Any]], index: str, summary: IngestSummary,
                 progress: Any) -> Iterator[dict[str, Any]]:
        now = datetime.now(timezone.utc).isoformat()
        batch: list[dict[str, Any]] = []

        def flush() -> Iterator[dict[str, Any]]:
            if self.encoder is not None:
                t = time.perf_counter()
                vecs = self.encoder.encode([embedding_text(d) for d in batch])
                summary.embed_seconds += time.perf_counter() - t
                for d, v in zip(batch, vecs):
                    d["embedding"] = v.tolist()
            for d in batch:
                d["indexed_at"] = now
                d["exposure"] = 0
                yield {"_op_type": "index", "_index": index, "_id": doc_id(d), "_source": d,
                       "require_alias": True}
            if progress is not None:
                progress.update(len(batch))
            batch.clear()

        for d in docs:
            batch.append(d)
            if len(batch) >= self.embed_batch:
                yield from flush()
        if batch:
            yield from flush()

    def run(self, builder: CatalogBuilder, *, progress: bool = True) -> IngestSummary:
        schema = load_mapping(self.mappings_dir, "catalog.v1",
                              dims=self.encoder.dim if self.encoder else None)
        if self.encoder is None:
            schema["mappings"]["properties"].pop("embedding", None)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S%f")
        index = f"{self.alias}-v{schema['mappings']['_meta']['version']}-{stamp}"
        summary = IngestSummary(index=index, alias=self.alias)
        t0 = time.perf_counter()
        # Writes go through a per-run alias with require_alias: if the index disappears while
        # loading (a concurrent run pruned it), the bulk fails instead of auto-creating an
        # index with dynamic mappings.
        loading = f"{index}-loading"
        self.client.indices.create(index=index, settings=schema["settings"],
                                   mappings=schema["mappings"], aliases={loading: {}})
        # No refreshes while loading: one at the end is much cheaper.
        self.client.indices.put_settings(index=index, settings={"index.refresh_interval": "-1"})
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(desc=f"indexing {index}", unit="doc", mininterval=1.0)
        try:
            for ok, info in helpers.parallel_bulk(
                self.client.options(request_timeout=120), self._actions(builder.build(), loading, summary, bar),
                thread_count=self.thread_count, chunk_size=self.chunk_size,
                raise_on_error=False, raise_on_exception=False,
            ):
                if ok:
                    summary.indexed += 1
                else:
                    item = next(iter(info.values()))
                    err = item.get("error", {})
                    reason = err.get("type", "error") if isinstance(err, dict) else str(err)
                    summary.failed[reason] += 1
                    if sum(summary.failed.values()) <= 5:
                        logger.warning("document %s rejected: %s", item.get("_id"), err)
        except BaseException:
            self._drop(index)
            raise
        finally:
            if bar is not None:
                bar.close()
        summary.build_report = builder.report.as_dict()
        if not self.client.indices.exists(index=index):
            raise IngestError(f"{index} was deleted while loading (a concurrent `ltrr index`?); "
                              f"the alias {self.alias!r} was left unchanged")
        self.client.indices.delete_alias(index=index, name=loading)
        self.client.indices.put_settings(index=index, settings={"index.refresh_interval": "1s"})
        self.client.indices.refresh(index=index)
        total = summary.indexed + sum(summary.failed.values())
        if total == 0 or sum(summary.failed.values()) > self.max_failure_ratio * total:
            self._drop(index)
            raise IngestError(
                f"{sum(summary.failed.values())} of {total} documents were rejected "
                f"({dict(summary.failed)}); the alias {self.alias!r} was left unchanged"
            )
        summary.swapped_from, summary.deleted = self.swap_alias(index)
        if self.memory_alias:
            from .memory import seed_memory

            # The predicted pairs of the new catalog (learned pairs carried over), swapped in.
            summary.memory = seed_memory(self.client, catalog=index,
                                         memory_alias=self.memory_alias,
                                         mappings_dir=self.mappings_dir,
                                         keep_old_indices=self.keep_old_indices, **self.memory)
        summary.seconds = time.perf_counter() - t0
        return summary

    def _drop(self, index: str) -> None:
        try:
            self.client.indices.delete(index=index)
        except NotFoundError:
            pass

    def swap_alias(self, index: str) -> tuple[list[str], list[str]]:
        """Point the alias at ``index`` in one atomic call; prune old physical indices."""
        try:
            old = sorted(self.client.indices.get_alias(name=self.alias).body)
        except NotFoundError:
            old = []
        actions: list[dict[str, Any]] = [{"remove": {"index": i, "alias": self.alias}} for i in old]
        if self.client.indices.exists(index=self.alias) and not old:
            raise IngestError(f"{self.alias!r} is a concrete index, not an alias; rename or delete it")
        actions.append({"add": {"index": index, "alias": self.alias, "is_write_index": True}})
        self.client.indices.update_aliases(actions=actions)
        # Keep the newest `keep_old_indices` previous versions for rollback.
        prefix = f"{self.alias}-v"
        # Only versions older than this one: a newer index may still be loading.
        existing = sorted(
            i for i in self.client.indices.get(index=f"{prefix}*", expand_wildcards="open").body
            if i < index
        )
        to_delete = existing[: max(0, len(existing) - self.keep_old_indices)]
        for i in to_delete:
            self._drop(i)
        return old, to_delete


# -- incremental ingestion ---------------------------------------------------------------------

def _write_index(client: Elasticsearch, alias: str) -> str:
    """The physical index writes to ``alias`` land in (its write index, or its only index)."""
    try:
        body = client.indices.get_alias(name=alias).body
    except NotFoundError as exc:
        raise IngestError(f"alias {alias!r} does not exist; run `ltrr index` first") from exc
    writers = [i for i, a in body.items() if a.get("aliases", {}).get(alias, {}).get("is_write_index")]
    if len(writers) == 1:
        return writers[0]
    if len(body) == 1:
        return next(iter(body))
    raise IngestError(f"alias {alias!r} points at {sorted(body)} and has no write index")


def cold_start_memory(es: Elasticsearch, settings: Any, docs: Iterable[dict[str, Any]],
                      memory_alias: str, *, skip_ids: Iterable[str] = (),
                      thread_count: int | None = None) -> dict[str, Any]:
    """Create the predicted Q2E pairs of entity ``docs`` in ``memory_alias``
    (:func:`orchestrator.memory.predicted_pair_documents`; create-only: existing pairs,
    possibly with learned clicks, are left untouched), then refresh. Documents whose id is
    in ``skip_ids`` (e.g. rejected by the catalog) get none. Returns counts and seconds."""
    from .memory import ensure_memory_index, predicted_pair_documents

    t0 = time.perf_counter()
    skip = set(skip_ids)
    ensure_memory_index(es, memory_alias, mappings_dir=settings.ingest.mappings_dir)
    prior_strength, min_score = settings.memory.prior_strength, settings.memory.min_score

    def actions() -> Iterator[dict[str, Any]]:
        for d in docs:
            eid = doc_id(d)
            if eid in skip:
                continue
            for pid, pdoc in predicted_pair_documents(d, entity_id=eid,
                                                      prior_strength=prior_strength,
                                                      min_score=min_score):
                yield {"_op_type": "create", "_index": memory_alias, "_id": pid, "_source": pdoc}

    pairs = existing = failed = 0
    for ok, info in helpers.parallel_bulk(
        es.options(request_timeout=120), actions(),
        thread_count=thread_count or settings.ingest.thread_count,
        chunk_size=2000, raise_on_error=False, raise_on_exception=False,
    ):
        if ok:
            pairs += 1
            continue
        item = next(iter(info.values()))
        if item.get("status") == 409:
            existing += 1
        else:
            failed += 1
            if failed <= 5:
                logger.warning("memory pair %s rejected: %s", item.get("_id"), item.get("error"))
    es.indices.refresh(index=memory_alias)
    return {"memory_alias": memory_alias, "pairs": pairs, "pairs_existing": existing,
            "pairs_failed": failed, "seconds": round(time.perf_counter() - t0, 2)}


def add_entities(es: Elasticsearch, settings: Any,
                 builder_or_docs: CatalogBuilder | Iterable[dict[str, Any]], *,
                 alias: str | None = None, memory_alias: str | None = None,
                 embeddings: bool = True, encoder: Encoder | None = None,
                 progress: bool = False, cold_start: bool = True) -> dict[str, Any]:
    """Add (or re-emit) entity documents to the live catalog without a rebuild.

    The documents (a :class:`CatalogBuilder`, typically with ``only=HoldOut.ids``, or plain
    builder documents) get their embeddings and bulk actions exactly as in a full build
    (:meth:`CatalogIndexer._actions`), are written through the catalog alias into its write
    index (existing documents are replaced; their ``exposure`` is kept), then the index is
    refreshed and the Q2E memory is cold-started for them: their predicted pairs
    (:func:`orchestrator.memory.predicted_pair_documents`) are created in the memory alias;
    pairs that already exist (possibly with learned clicks) are left untouched.

    ``memory_alias`` defaults to the memory of the catalog alias (``<alias>-memory``, or the
    configured ``memory.alias`` for the configured catalog alias).

    ``cold_start=False`` leaves every memory alone (the caller cold-starts its own, e.g. with
    :func:`cold_start_memory`; ``failed_ids`` in the result are the documents ES rejected).

    Returns counts and seconds.
    """
    from .embeddings import get_encoder
    from .memory import memory_alias as _memory_alias

    t0 = time.perf_counter()
    cat_alias = alias or settings.es.catalog_alias
    if memory_alias is None:
        memory_alias = (_memory_alias(cat_alias, settings.memory.alias)
                        if cat_alias == settings.es.catalog_alias else _memory_alias(cat_alias))
    index = _write_index(es, cat_alias)
    builder = builder_or_docs if isinstance(builder_or_docs, CatalogBuilder) else None
    docs = list(builder.build() if builder is not None else builder_or_docs)
    build_s = time.perf_counter() - t0

    if encoder is None and embeddings:
        mapping = es.indices.get_mapping(index=index).body[index]["mappings"]
        if "embedding" in mapping.get("properties", {}):
            encoder = get_encoder(settings.embedding)
    indexer = CatalogIndexer(es, alias=cat_alias, mappings_dir=settings.ingest.mappings_dir,
                             encoder=encoder, chunk_size=settings.ingest.chunk_size,
                             thread_count=settings.ingest.thread_count,
                             embed_batch=settings.embedding.batch_size)
    summary = IngestSummary(index=index, alias=cat_alias)

    # Keep the exposure counters of documents being replaced.
    ids = [doc_id(d) for d in docs]
    exposure: dict[str, int] = {}
    for start in range(0, len(ids), 1000):
        res = es.mget(index=cat_alias, ids=ids[start:start + 1000], source=["exposure"])
        for d in res.body["docs"]:
            if d.get("found"):
                exposure[d["_id"]] = int((d.get("_source") or {}).get("exposure") or 0)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"adding to {index}", unit="doc", mininterval=1.0)

    def actions() -> Iterator[dict[str, Any]]:
        for a in indexer._actions(docs, cat_alias, summary, bar):
            if a["_id"] in exposure:
                a["_source"]["exposure"] = exposure[a["_id"]]
            yield a

    t1 = time.perf_counter()
    failed_ids: set[str] = set()  # documents ES rejected get no memory pairs
    try:
        for ok, info in helpers.parallel_bulk(
            es.options(request_timeout=120), actions(), thread_count=indexer.thread_count,
            chunk_size=indexer.chunk_size, raise_on_error=False, raise_on_exception=False,
        ):
            if ok:
                summary.indexed += 1
            else:
                item = next(iter(info.values()))
                failed_ids.add(str(item.get("_id")))
                err = item.get("error", {})
                summary.failed[err.get("type", "error") if isinstance(err, dict) else str(err)] += 1
                if sum(summary.failed.values()) <= 5:
                    logger.warning("document %s rejected: %s", item.get("_id"), err)
    finally:
        if bar is not None:
            bar.close()
    es.indices.refresh(index=index)
    index_s = time.perf_counter() - t1

    # Cold start of the memory: the predicted pairs of the added entities.
    mem = (cold_start_memory(es, settings, docs, memory_alias, skip_ids=failed_ids,
                             thread_count=indexer.thread_count) if cold_start else
           {"pairs": 0, "pairs_existing": 0, "pairs_failed": 0, "seconds": 0.0})

    kinds = Counter(d["entity_type"] for d in docs)
    return {
        "alias": cat_alias, "index": index, "docs": len(docs), "entities": dict(kinds),
        "indexed": summary.indexed, "replaced": len(exposure), "failed": dict(summary.failed),
        "failed_ids": sorted(failed_ids),
        "memory_alias": memory_alias if cold_start else None, "pairs": mem["pairs"],
        "pairs_existing": mem["pairs_existing"], "pairs_failed": mem["pairs_failed"],
        "build_report": builder.report.as_dict() if builder is not None else {},
        "build_seconds": round(build_s, 2), "embed_seconds": round(summary.embed_seconds, 2),
        "index_seconds": round(index_s, 2), "memory_seconds": mem["seconds"],
        "seconds": round(time.perf_counter() - t0, 2),
    }
