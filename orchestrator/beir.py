"""BEIR SciFact as a standard benchmark for the orchestrator's arms (``ltrr evaluate beir``).

Consumes the BEIR layout (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``), indexes
the corpus with ``mappings/scifact.v1.json``, runs the SciFact arms of
``query_templates/scifact/`` through the orchestrator's own machinery
(:class:`~orchestrator.templates.TemplateRegistry` + :class:`~orchestrator.execution.MultiSearch`,
every arm of a batch of queries in one ``_msearch``), fuses and rescores them, and produces
per-pipeline metrics (nDCG@10, recall@100, MRR@10) next to the published figures.

Pipelines
---------
``lexical``
    BM25 over ``title`` and ``text`` with the ``standard`` analyzer (no stemming),
    ``multi_match`` best_fields with tie_breaker 0.5 (the BEIR paper's Elasticsearch query).
``lexical_stemmed``
    BM25 over title + text pre-stemmed on the client (:class:`Analyzer`) and indexed with the
    ``whitespace`` analyzer (the server-only node has no ``english`` analyzer); the query goes
    through the same :class:`Analyzer`. Anserini's flat BEIR setting: Porter, Lucene's English
    stopwords, k1=0.9, b=0.4.
``semantic``
    exact kNN (cosine) on the ingestion encoder's title + text embedding.
``hybrid``
    reciprocal-rank fusion (k=60, :class:`~orchestrator.merging.UnionMerger`) of
    ``lexical_stemmed`` and ``semantic``.
``rescored``
    a logistic regression (:func:`~orchestrator.rescoring.train_rescorer`) over per-candidate
    features of the three base arms (rank, normalised and raw score, presence, RRF), trained on
    the *train* qrels and evaluated on the test queries (never trained on test).

Metrics (``evaluate``) follow BEIR / pytrec_eval: nDCG@k with linear gain ``rel`` and a
``log2(rank + 1)`` discount, normalised by the ideal DCG of the query's qrels; recall@k is the
share of the query's relevant (rel > 0) documents found in the top k; MRR@k is ``1 / rank`` of
the first relevant document in the top k (0 when none). Each is averaged over the queries of
the qrels split; like BEIR, a document whose id equals the query id is dropped from the run.
Each pipeline's nDCG@10 is compared with ``lexical_stemmed`` by a paired randomization test
over the same queries (``p_vs_lexical_stemmed``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import snowballstemmer
from elasticsearch import Elasticsearch, helpers

from . import metrics
from .domain import ArmFailure, ArmRequest, ArmResult, Provenance
from .embeddings import Encoder
from .errors import ConfigurationError, IngestError
from .execution import MultiSearch
from .ingest import load_mapping
from .merging import RRF_K, UnionMerger, rrf
from .rescoring import MISSING_RANK, MISSING_SCORE, LinearRescorer, train_rescorer
from .templates import TemplateRegistry

logger = logging.getLogger(__name__)

#: Published nDCG@10 on the SciFact test split (the data README and the papers).
PUBLISHED_NDCG10: dict[str, float] = {
    "BM25, BEIR paper (Elasticsearch, multi_match title/text, english analyzer)": 0.665,
    "BM25, Anserini flat (title+text, Porter, k1=0.9 b=0.4)": 0.679,
    "SPLADE++": 0.704,
    "BGE-base": 0.741,
}

#: Lucene's ``EnglishAnalyzer.ENGLISH_STOP_WORDS_SET`` (the stop set Anserini's default English
#: analyzer uses; 33 words).
LUCENE_ENGLISH_STOPWORDS: frozenset[str] = frozenset(
    "a an and are as at be but by for if in into is it no not of on or such that the their "
    "then there these they this to was will with".split()
)

#: Approximates Lucene's StandardTokenizer (UAX#29 word boundaries): runs of letters and
#: digits, kept together across an apostrophe, period or colon between two letters ("don't",
#: "e.g", "doi:http"), a period or comma between two digits ("1.5", "1,000") and underscores;
#: every other character separates tokens. On the first 500 SciFact documents it yields the
#: same lowercased tokens as Elasticsearch's ``standard`` analyzer for all but a few symbols
#: (tests/integration/test_beir_live.py measures the agreement).
_TOKEN = re.compile(
    r"[^\W_]+(?:(?:(?<=[^\W\d_])['\u2019.:](?=[^\W\d_])|(?<=\d)[.,](?=\d)|_+)[^\W_]+)*",
    re.UNICODE)

StemmerName = Literal["porter", "english"]
#: Named analyzer set (:func:`default_analyzers`): Porter, Snowball English, Porter without
#: stopwords (each with Lucene's English stop set unless named otherwise).
AnalyzerName = Literal["porter", "english", "porter_nostop"]
Split = Literal["train", "test"]

#: The SciFact arms run for every evaluation, keyed by run name: (template id, extra params,
#: analyzer of the query). ``lexical_stemmed_es_bm25`` (Elasticsearch's k1=1.2, b=0.75),
#: ``lexical_stemmed_snowball`` (Snowball English instead of Porter),
#: ``lexical_stemmed_nostop`` (Porter without stopwords, k1=1.2, b=0.75) and
#: ``lexical_stemmed_2field`` (title and text as two fields, the BEIR paper's setting) are
#: ablations that explain the differences between the published figures.
LEXICAL_RUNS: dict[str, tuple[str, dict[str, Any], AnalyzerName | None]] = {
    "lexical": ("lexical.v1", {}, None),
    "lexical_stemmed": ("lexical_stemmed.v1", {"fields": ["stemmed.anserini"]}, "porter"),
    "lexical_stemmed_es_bm25": ("lexical_stemmed.v1", {"fields": ["stemmed"]}, "porter"),
    "lexical_stemmed_snowball": ("lexical_stemmed.v1", {"fields": ["stemmed_snowball"]}, "english"),
    "lexical_stemmed_nostop": ("lexical_stemmed.v1", {"fields": ["stemmed_nostop"]},
                               "porter_nostop"),
    "lexical_stemmed_2field": ("lexical_stemmed.v1", {"fields": ["title_stemmed", "text_stemmed"]},
                               "porter"),
}
#: The base arms the rescorer sees (the ablations are left out: they repeat lexical_stemmed).
RESCORER_ARMS: tuple[str, ...] = ("lexical", "lexical_stemmed", "semantic")
HYBRID_ARMS: tuple[str, ...] = ("lexical_stemmed", "semantic")


# --- data ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BeirDataset:
    """A BEIR dataset split: ``corpus`` (id -> (title, text)), ``queries`` (id -> text, only
    the queries judged in ``qrels``) and graded ``qrels`` (query id -> {doc id: relevance})."""

    corpus: dict[str, tuple[str, str]] = field(hash=False)
    queries: dict[str, str] = field(hash=False)
    qrels: dict[str, dict[str, int]] = field(hash=False)
    split: str = "test"


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    """Read a BEIR qrels TSV (``query-id  corpus-id  score`` with a header line)."""
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader, None)
        if header is None or header[:2] != ["query-id", "corpus-id"]:
            raise IngestError(f"{path}: expected a 'query-id<TAB>corpus-id<TAB>score' header, got {header}")
        for row in reader:
            if not row:
                continue
            qid, did, score = row[0], row[1], int(row[2])
            qrels.setdefault(qid, {})[did] = score
    return qrels


def load_beir(data_dir: Path, *, split: str = "test") -> BeirDataset:
    """Load a BEIR dataset folder (corpus, queries and the ``split`` qrels).

    Parameters
    ----------
    data_dir:
        Folder with ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``.
    split:
        Which qrels to read; only the queries judged there are kept.

    Raises
    ------
    ConfigurationError
        When a file is missing.
    IngestError
        When a judged query has no text.
    """
    data_dir = Path(data_dir)
    paths = [data_dir / "corpus.jsonl", data_dir / "queries.jsonl", data_dir / "qrels" / f"{split}.tsv"]
    for p in paths:
        if not p.is_file():
            raise ConfigurationError(f"BEIR file {p} does not exist (is --data-dir right?)")
    corpus: dict[str, tuple[str, str]] = {}
    with open(paths[0], encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                d = json.loads(line)
                corpus[str(d["_id"])] = (d.get("title") or "", d.get("text") or "")
    all_queries: dict[str, str] = {}
    with open(paths[1], encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                d = json.loads(line)
                all_queries[str(d["_id"])] = d["text"]
    qrels = load_qrels(paths[2])
    missing = sorted(set(qrels) - set(all_queries))
    if missing:
        raise IngestError(f"{len(missing)} judged queries have no text in queries.jsonl: {missing[:5]}")
    queries = {qid: all_queries[qid] for qid in qrels}
    return BeirDataset(corpus=corpus, queries=queries, qrels=qrels, split=split)


# --- client-side analysis ------------------------------------------------------------------


class Analyzer:
    """Client-side English analysis for a field indexed with the ``whitespace`` analyzer.

    Mirrors Lucene's ``EnglishAnalyzer`` (what Anserini uses): StandardTokenizer-like tokens,
    possessive ``'s`` stripped, lowercase, stopwords removed, then stemmed. The same instance
    analyses documents and queries, so both sides always match.

    Parameters
    ----------
    stemmer:
        ``porter`` (the original Porter algorithm, Lucene's PorterStemFilter, Anserini's
        default) or ``english`` (Snowball English, "Porter2").
    stopwords:
        Words dropped after lowercasing (Lucene's English stop set by default).
    """

    def __init__(self, *, stemmer: StemmerName = "porter",
                 stopwords: Iterable[str] = LUCENE_ENGLISH_STOPWORDS) -> None:
        self.stemmer_name = stemmer
        self.stopwords = frozenset(stopwords)
        self._stemmer = snowballstemmer.stemmer(stemmer)

    def tokens(self, text: str) -> list[str]:
        """The analysed tokens of ``text``, in order."""
        out: list[str] = []
        for m in _TOKEN.finditer(text):
            tok = m.group(0).lower()
            if tok.endswith(("'s", "\u2019s")):
                tok = tok[:-2]
            tok = tok.replace("\u2019", "'")
            if tok and tok not in self.stopwords:
                out.append(tok)
        if self.stemmer_name == "porter":
            # Lucene's PorterStemmer, like Porter's reference C code, leaves words of one or
            # two letters alone ("us", "ms"); snowballstemmer's porter would stem "s" to "".
            return [t if len(t) <= 2 else self._stemmer.stemWord(t) for t in out]
        return self._stemmer.stemWords(out) if out else []

    def __call__(self, text: str) -> str:
        """``text`` analysed into one whitespace-separated string (what the field stores)."""
        return " ".join(self.tokens(text))


# --- metrics -------------------------------------------------------------------------------


# nDCG@k (trec_eval's ndcg_cut: linear gain, log2 discount), recall@k and MRR@k are the
# project's one definition, orchestrator.metrics; re-exported here for existing callers.
ndcg_at_k = metrics.ndcg_at_k
recall_at_k = metrics.recall_at_k
mrr_at_k = metrics.mrr_at_k


def evaluate(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]], *,
             ignore_identical_ids: bool = True) -> dict[str, float]:
    """Mean nDCG@10, recall@100 and MRR@10 of ``run`` (query id -> ranked doc ids) over every
    query of ``qrels`` (a query missing from the run scores 0).

    Parameters
    ----------
    ignore_identical_ids:
        Drop a retrieved document whose id equals the query id (BEIR's default).
    """
    if not qrels:
        raise ValueError("no judged queries to evaluate")
    totals = {"ndcg@10": 0.0, "recall@100": 0.0, "mrr@10": 0.0}
    for qid, judged in qrels.items():
        ranking = list(run.get(qid, ()))
        if ignore_identical_ids:
            ranking = [d for d in ranking if d != qid]
        totals["ndcg@10"] += ndcg_at_k(ranking, judged, 10)
        totals["recall@100"] += recall_at_k(ranking, judged, 100)
        totals["mrr@10"] += mrr_at_k(ranking, judged, 10)
    n = len(qrels)
    out = {name: round(v / n, 4) for name, v in totals.items()}
    out["n_queries"] = n
    return out


def per_query_ndcg(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]], *,
                   k: int = 10, ignore_identical_ids: bool = True) -> np.ndarray:
    """nDCG@k of every query of ``qrels`` (in qrels order), for paired comparisons."""
    out = []
    for qid, judged in qrels.items():
        ranking = [d for d in run.get(qid, ()) if not (ignore_identical_ids and d == qid)]
        out.append(ndcg_at_k(ranking, judged, k))
    return np.asarray(out)


def paired_randomization_test(a: Sequence[float], b: Sequence[float], *, n_resamples: int = 10_000,
                              seed: int = 0) -> float:
    """Two-sided p-value of the mean paired difference ``a - b`` under random sign flips
    (Fisher's randomization test, as used for IR significance; Smucker et al. 2007). Seeded,
    so a report is reproducible; 1.0 when the two are identical."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    observed = abs(d.mean())
    if observed == 0.0:
        return 1.0
    rng = np.random.default_rng(seed)
    signs = rng.choice((-1.0, 1.0), size=(n_resamples, len(d)))
    at_least = np.count_nonzero(np.abs((signs * d).mean(axis=1)) >= observed - 1e-12)
    return float((at_least + 1) / (n_resamples + 1))


# --- indexing ------------------------------------------------------------------------------


def default_analyzers() -> dict[AnalyzerName, Analyzer]:
    """The named :class:`Analyzer` s, shared by indexing and querying."""
    return {"porter": Analyzer(stemmer="porter"), "english": Analyzer(stemmer="english"),
            "porter_nostop": Analyzer(stemmer="porter", stopwords=())}


def doc_source(title: str, text: str, *, analyzers: Mapping[AnalyzerName, Analyzer],
               vector: Sequence[float] | None = None) -> dict[str, Any]:
    """The ``_source`` of one SciFact document (see ``mappings/scifact.v1.json``): the raw
    fields, title + text stemmed with each stemmer, title and text stemmed apart, the vector."""
    flat = f"{title} {text}"
    porter = analyzers["porter"]
    src: dict[str, Any] = {
        "title": title, "text": text, "stemmed": porter(flat),
        "stemmed_snowball": analyzers["english"](flat),
        "stemmed_nostop": analyzers["porter_nostop"](flat),
        "title_stemmed": porter(title), "text_stemmed": porter(text)}
    if vector is not None:
        src["embedding"] = [float(v) for v in vector]
    return src


def index_fingerprint(*, n_docs: int, encoder_name: str, dim: int) -> str:
    """What an index was built from; an index with another fingerprint is rebuilt."""
    return f"scifact.v1;docs={n_docs};analyzer=porter+snowball+nostop.lucene-stop.v4;enc={encoder_name}:{dim}"


def index_corpus(client: Elasticsearch, *, index: str, corpus: Mapping[str, tuple[str, str]],
                 encoder: Encoder, mappings_dir: Path, reindex: bool = False,
                 encoder_name: str = "wordllama", chunk_size: int = 500) -> dict[str, Any]:
    """Create ``index`` from ``mappings/scifact.v1.json`` and bulk-index ``corpus`` into it
    (title/text, the Porter- and Snowball-stemmed fields, the embedding of title + text).

    An existing index with the same fingerprint (``_meta``) and document count is kept unless
    ``reindex``; one with another fingerprint is replaced.

    Returns
    -------
    dict
        ``index``, ``docs``, ``reused`` and the ``seconds`` / ``embed_seconds`` spent.
    """
    fingerprint = index_fingerprint(n_docs=len(corpus), encoder_name=encoder_name, dim=encoder.dim)
    if client.indices.exists(index=index):
        meta = next(iter(client.indices.get_mapping(index=index).body.values()))["mappings"].get("_meta", {})
        count = client.count(index=index)["count"]
        if not reindex and meta.get("fingerprint") == fingerprint and count == len(corpus):
            logger.info("index %s is up to date (%d docs); reusing it", index, count)
            return {"index": index, "docs": count, "reused": True, "seconds": 0.0, "embed_seconds": 0.0}
        logger.info("replacing index %s", index)
        client.indices.delete(index=index)
    body = load_mapping(mappings_dir, "scifact.v1", dims=encoder.dim)
    body["mappings"]["_meta"]["fingerprint"] = fingerprint
    t0 = time.perf_counter()
    client.indices.create(index=index, settings={**body["settings"], "refresh_interval": "-1"},
                          mappings=body["mappings"])
    ids = list(corpus)
    te = time.perf_counter()
    vectors = encoder.encode([f"{corpus[i][0]} {corpus[i][1]}".strip() for i in ids])
    embed_seconds = time.perf_counter() - te
    analyzers = default_analyzers()

    def actions() -> Iterator[dict[str, Any]]:
        for i, vec in zip(ids, vectors):
            title, text = corpus[i]
            yield {"_op_type": "index", "_index": index, "_id": i,
                   "_source": doc_source(title, text, analyzers=analyzers, vector=vec)}

    ok, errors = helpers.bulk(client.options(request_timeout=120), actions(),
                              chunk_size=chunk_size, raise_on_error=False)
    if errors:
        raise IngestError(f"{len(errors)} SciFact documents failed to index; first: {errors[0]}")
    client.indices.put_settings(index=index, settings={"index.refresh_interval": "1s"})
    client.indices.refresh(index=index)
    seconds = time.perf_counter() - t0
    logger.info("indexed %d SciFact docs into %s in %.1fs", ok, index, seconds)
    return {"index": index, "docs": ok, "reused": False, "seconds": round(seconds, 2),
            "embed_seconds": round(embed_seconds, 2)}


# --- arms, fusion and rescoring ------------------------------------------------------------


def build_requests(query: str, *, vector: Sequence[float] | None,
                   analyzers: Mapping[AnalyzerName, Analyzer], size: int = 100) -> list[ArmRequest]:
    """The SciFact arm requests of one query: every run of :data:`LEXICAL_RUNS` plus the
    semantic arm when ``vector`` is given."""
    reqs = []
    for name, (template_id, extra, analyzer) in LEXICAL_RUNS.items():
        if analyzer is None:
            params: dict[str, Any] = {"query": query, "size": size}
        else:
            params = {"stemmed_query": analyzers[analyzer](query), "size": size, **extra}
        reqs.append(ArmRequest(name, template_id, params))
    if vector is not None:
        reqs.append(ArmRequest("semantic", "semantic.v1", {
            "query_vector": list(vector), "size": size, "k": size,
            "num_candidates": max(2 * size, 100)}))
    return reqs


def run_arms(client: Elasticsearch, *, index: str, registry: TemplateRegistry,
             queries: Mapping[str, str], encoder: Encoder | None, size: int = 100,
             batch_queries: int = 50) -> dict[str, dict[str, ArmResult]]:
    """Run every SciFact arm for every query; ``{run name: {query id: ArmResult}}``.

    All arms of ``batch_queries`` queries go in one ``_msearch`` (MultiSearch, local
    rendering). A failed arm raises: a benchmark with a silently missing arm would lie.
    """
    analyzers = default_analyzers()
    ms = MultiSearch(client, index=index, registry=registry, mode="local", arm_timeout="60s",
                     request_timeout_s=300.0)
    qids = list(queries)
    vectors = encoder.encode([queries[q] for q in qids]) if encoder is not None else None
    out: dict[str, dict[str, ArmResult]] = {}
    for start in range(0, len(qids), batch_queries):
        chunk = qids[start:start + batch_queries]
        requests: list[ArmRequest] = []
        owners: list[str] = []
        for j, qid in enumerate(chunk):
            vec = vectors[start + j] if vectors is not None else None
            reqs = build_requests(queries[qid], vector=vec, analyzers=analyzers, size=size)
            requests += reqs
            owners += [qid] * len(reqs)
        for qid, res in zip(owners, ms.execute(requests, opaque_id=f"beir-{start}")):
            if isinstance(res, ArmFailure):
                raise IngestError(f"SciFact arm {res.arm} failed for query {qid}: {res.reason}")
            out.setdefault(res.arm, {})[qid] = res
    return out


def ranking_of(result: ArmResult) -> list[str]:
    return [h.id for h in result.hits]


def fuse(results: Sequence[ArmResult], *, k: int = RRF_K) -> list[str]:
    """Reciprocal-rank fusion of arm results (sum of ``1 / (k + rank)``), best first."""
    return [c.id for c in UnionMerger(rrf_k=k).merge(results)]


def rescore_features(results: Sequence[ArmResult], *, arms: Sequence[str] = RESCORER_ARMS,
                     ) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
    """Candidates (union of ``results``) and their feature matrix: per arm ``rank:<arm>``
    (log1p(rank), log1p(1000) when absent), ``nscore:<arm>`` (score / the arm's top score,
    -1 when absent), ``score:<arm>`` (raw score, 0 when absent), ``in:<arm>`` (0/1); plus
    ``rrf`` (k=60 over all arms) and ``n_arms``."""
    names = tuple(f"{kind}:{a}" for a in arms for kind in ("rank", "nscore", "score", "in")) + ("rrf", "n_arms")
    cands = UnionMerger().merge(results)
    pos = {a: 4 * i for i, a in enumerate(arms)}
    X = np.zeros((len(cands), len(names)))
    for j in pos.values():
        X[:, j] = MISSING_RANK
        X[:, j + 1] = MISSING_SCORE
    for r, c in enumerate(cands):
        p: Provenance
        for p in c.provenance:
            j = pos.get(p.arm)
            if j is None:
                continue
            X[r, j:j + 4] = (math.log1p(p.rank), p.norm_score, p.score, 1.0)
        X[r, -2] = rrf(c.provenance)
        X[r, -1] = len(c.provenance)
    return [c.id for c in cands], X, names


def train_beir_rescorer(arm_results: Mapping[str, Mapping[str, ArmResult]],
                        qrels: Mapping[str, Mapping[str, int]], *,
                        arms: Sequence[str] = RESCORER_ARMS, C: float = 1.0) -> LinearRescorer:
    """Fit the linear rescorer on the candidates of the queries in ``qrels`` (the train
    split): a candidate is positive when judged relevant."""
    rows, ys = [], []
    names: tuple[str, ...] = ()
    for qid, judged in qrels.items():
        ids, X, names = rescore_features([arm_results[a][qid] for a in arms], arms=arms)
        rows.append(X)
        ys.append(np.array([int(judged.get(d, 0) > 0) for d in ids]))
    model = train_rescorer(np.vstack(rows), np.concatenate(ys), feature_names=names, C=C)
    model.name = "beir-scifact-logistic"
    model.metadata["train_queries"] = len(qrels)
    return model


def rescored_ranking(model: LinearRescorer, results: Sequence[ArmResult], *,
                     arms: Sequence[str] = RESCORER_ARMS) -> list[str]:
    """The union of ``results`` ordered by the rescorer's score (ties keep the RRF order)."""
    ids, X, names = rescore_features(results, arms=arms)
    if not ids:
        return []
    s = model.score(X, names)
    return [ids[i] for i in np.argsort(-s, kind="stable")]


# --- the whole benchmark -------------------------------------------------------------------


@dataclass
class BeirReport:
    """Metrics per pipeline plus how they were produced (written as JSON by the CLI)."""

    dataset: str
    split: str
    index: str
    pipelines: dict[str, dict[str, float]]
    config: dict[str, Any]
    indexing: dict[str, Any]
    rescorer: dict[str, Any] | None
    timings: dict[str, float]
    published_ndcg10: dict[str, float] = field(default_factory=lambda: dict(PUBLISHED_NDCG10))
    #: The rankings themselves (pipeline -> query id -> doc ids); not written to the JSON.
    runs: dict[str, dict[str, list[str]]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "split": self.split, "index": self.index,
                "pipelines": self.pipelines, "published_ndcg10": self.published_ndcg10,
                "config": self.config, "indexing": self.indexing, "rescorer": self.rescorer,
                "timings_s": self.timings}


def run_benchmark(client: Elasticsearch, *, data_dir: Path, index: str, encoder: Encoder,
                  encoder_name: str, templates_dir: Path, mappings_dir: Path,
                  split: str = "test", train_split: str | None = "train", reindex: bool = False,
                  size: int = 100, progress: Callable[[str], None] | None = None) -> BeirReport:
    """Index SciFact (if needed), run every pipeline on ``split`` and evaluate it.

    The rescorer is trained on ``train_split`` (skipped when None); the train and evaluation
    query sets must be disjoint.
    """
    say = progress or (lambda msg: logger.info("%s", msg))
    test = load_beir(data_dir, split=split)
    train = load_beir(data_dir, split=train_split) if train_split else None
    if train is not None and set(train.qrels) & set(test.qrels):
        raise ConfigurationError(f"{train_split!r} and {split!r} share queries; refusing to train on test")
    say(f"loaded {len(test.corpus)} docs, {len(test.queries)} {split} queries"
        + (f", {len(train.queries)} {train_split} queries" if train else ""))
    indexing = index_corpus(client, index=index, corpus=test.corpus, encoder=encoder,
                            mappings_dir=mappings_dir, reindex=reindex, encoder_name=encoder_name)
    say(f"index {index}: {indexing['docs']} docs ({'reused' if indexing['reused'] else 'built'})")
    registry = TemplateRegistry.from_dir(templates_dir)
    t0 = time.perf_counter()
    arms = run_arms(client, index=index, registry=registry, queries=test.queries, encoder=encoder, size=size)
    search_s = time.perf_counter() - t0
    runs: dict[str, dict[str, list[str]]] = {
        name: {qid: ranking_of(r) for qid, r in by_q.items()} for name, by_q in arms.items()}
    runs["hybrid"] = {qid: fuse([arms[a][qid] for a in HYBRID_ARMS]) for qid in test.queries}
    rescorer_info: dict[str, Any] | None = None
    train_s = 0.0
    if train is not None:
        t1 = time.perf_counter()
        train_arms = run_arms(client, index=index, registry=registry, queries=train.queries,
                              encoder=encoder, size=size)
        model = train_beir_rescorer(train_arms, train.qrels)
        train_s = time.perf_counter() - t1
        runs["rescored"] = {qid: rescored_ranking(model, [arms[a][qid] for a in RESCORER_ARMS])
                            for qid in test.queries}
        rescorer_info = {**model.to_dict(), "train_split": train_split,
                         "train_metrics": evaluate(
                             {q: rescored_ranking(model, [train_arms[a][q] for a in RESCORER_ARMS])
                              for q in train.queries}, train.qrels)}
    pipelines = {name: evaluate(run, test.qrels) for name, run in runs.items()}
    # Is a pipeline's nDCG@10 really different from the stemmed BM25 baseline? (paired over
    # the same queries; per-query differences are noisy with 300 queries)
    base = per_query_ndcg(runs["lexical_stemmed"], test.qrels)
    for name, run in runs.items():
        if name != "lexical_stemmed":
            pipelines[name]["p_vs_lexical_stemmed"] = round(
                paired_randomization_test(per_query_ndcg(run, test.qrels), base), 4)
    config = {
        "size_per_arm": size, "rrf_k": RRF_K, "hybrid_arms": list(HYBRID_ARMS),
        "rescorer_arms": list(RESCORER_ARMS), "encoder": f"{encoder_name}:{encoder.dim}",
        "runs": {n: {"template": t, **{k: v for k, v in extra.items()}, "query_analyzer": s}
                 for n, (t, extra, s) in LEXICAL_RUNS.items()},
        "analyzer": "UAX#29-like regex tokens, possessive strip, lowercase, Lucene English "
                    "stopwords (33), snowballstemmer porter / english",
        "metrics": "BEIR/pytrec_eval: nDCG@10 linear gain, log2(rank+1) discount; recall@100; "
                   "MRR@10; identical query/doc ids dropped",
    }
    return BeirReport(dataset=str(data_dir), split=split, index=index, pipelines=pipelines,
                      config=config, indexing=indexing, rescorer=rescorer_info,
                      timings={"search_s": round(search_s, 2), "train_s": round(train_s, 2),
                               "index_s": indexing["seconds"]}, runs=runs)


def format_table(report: BeirReport) -> str:
    """A plain-text table of the pipelines' metrics followed by the published nDCG@10."""
    lines = [f"{'pipeline':28} {'nDCG@10':>8} {'R@100':>8} {'MRR@10':>8} {'p vs stemmed':>13}"]
    for name, m in report.pipelines.items():
        p = m.get("p_vs_lexical_stemmed")
        ptxt = f"{p:13.4f}" if p is not None else f"{'-':>13}"
        lines.append(f"{name:28} {m['ndcg@10']:8.4f} {m['recall@100']:8.4f} {m['mrr@10']:8.4f} {ptxt}")
    lines.append("")
    lines.append("published nDCG@10 (SciFact test):")
    for name, v in report.published_ndcg10.items():
        lines.append(f"  {v:.3f}  {name}")
    return "\n".join(lines)
