"""Ingestion throughput on the full bundled catalog, with and without embeddings.

    python benchmarks/ingest_throughput.py [--limit N] [--json benchmarks/results/ingest.json]
    python benchmarks/ingest_throughput.py --smoke   # CI: 300 tracks, JSON to a temp dir

Indexes into throw-away aliases (``bench-ingest-*``, deleted afterwards), so the live
``ltrr-catalog`` is untouched. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

from orchestrator.catalog import CatalogBuilder, embedding_text
from orchestrator.embeddings import get_encoder
from orchestrator.es_client import build_client, check_available, node_capabilities
from orchestrator.ingest import CatalogIndexer
from orchestrator.settings import OrchestratorSettings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--limit", type=int, default=None, help="tracks to index (default: all)")
    ap.add_argument("--json", default=None,
                    help="default benchmarks/results/ingest.json (--smoke: a temp dir)")
    ap.add_argument("--smoke", action="store_true",
                    help="300 tracks (with their albums and artists) into bench-ingest-smoke-*, "
                         "JSON to a temp dir: checks the script works, measures nothing")
    args = ap.parse_args()
    if args.smoke:
        args.limit = min(args.limit or 300, 300)
    if args.json is None:
        args.json = (str(Path(tempfile.mkdtemp(prefix="ltrr-smoke-ingest-")) / "ingest.json")
                     if args.smoke else "benchmarks/results/ingest.json")
    logging.getLogger("elastic_transport").setLevel(logging.WARNING)
    s = OrchestratorSettings()
    es = build_client(s.es)
    check_available(es, s.es.url)

    t = time.perf_counter()
    docs = list(CatalogBuilder(s.ingest.data_dir, limit=args.limit).build())
    build_s = time.perf_counter() - t
    enc = get_encoder(s.embedding)
    texts = [embedding_text(d) for d in docs]
    t = time.perf_counter()
    for i in range(0, len(texts), s.embedding.batch_size):
        enc.encode(texts[i : i + s.embedding.batch_size])
    embed_s = time.perf_counter() - t

    rows = []
    for with_vectors in (False, True):
        alias = f"bench-ingest-{'smoke-' if args.smoke else ''}{'vec' if with_vectors else 'novec'}"
        indexer = CatalogIndexer(es, alias=alias, mappings_dir=s.ingest.mappings_dir,
                                 encoder=enc if with_vectors else None, keep_old_indices=0,
                                 chunk_size=s.ingest.chunk_size, thread_count=s.ingest.thread_count,
                                 embed_batch=s.embedding.batch_size)
        summary = indexer.run(CatalogBuilder(s.ingest.data_dir, limit=args.limit), progress=False)
        es.indices.delete(index=f"{alias}*", ignore_unavailable=True)
        rows.append({
            "embeddings": with_vectors, "docs": summary.indexed,
            "seconds": round(summary.seconds, 1), "docs_per_s": round(summary.docs_per_s, 1),
            "embed_seconds": round(summary.embed_seconds, 1),
        })

    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "es": node_capabilities(es).version},
        "smoke": args.smoke, "limit": args.limit, "catalog_build_s": round(build_s, 1), "entities": len(docs),
        "encoder": f"{s.embedding.backend} dim={s.embedding.dim}",
        "encode_texts_per_s": round(len(texts) / embed_s, 1),
        "runs": rows,
    }
    print(f"catalog build (read + merge, {len(docs)} entities): {build_s:.1f} s")
    print(f"encoder {result['encoder']}: {result['encode_texts_per_s']:.0f} texts/s")
    print(f"{'embeddings':>10} {'docs':>8} {'seconds':>8} {'docs/s':>8}")
    for r in rows:
        print(f"{str(r['embeddings']):>10} {r['docs']:>8} {r['seconds']:>8} {r['docs_per_s']:>8}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
