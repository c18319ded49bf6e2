"""BEIR SciFact helpers without services: metrics against hand-computed values, the
client-side analyzer, the loader on the real files, templates, fusion and rescoring features."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from orchestrator import beir
from orchestrator.domain import ArmResult, Hit
from orchestrator.errors import ConfigurationError
from orchestrator.settings import PROJECT_ROOT
from orchestrator.templates import TemplateRegistry

DATA = PROJECT_ROOT.parent / "shared" / "data" / "beir-scifact"
needs_data = pytest.mark.skipif(not (DATA / "corpus.jsonl").is_file(), reason=f"no {DATA}")


# --- metrics -------------------------------------------------------------------------------


def test_ndcg_hand_computed_graded() -> None:
    # DCG = 1/log2(2) + 2/log2(4) = 2; ideal order (2, 1): 2/log2(2) + 1/log2(3)
    judged = {"a": 1, "b": 2, "z": 0}
    got = beir.ndcg_at_k(["a", "x", "b", "z"], judged, 10)
    assert got == pytest.approx(2.0 / (2.0 + 1.0 / math.log2(3)))
    assert got == pytest.approx(0.7602, abs=1e-4)


def test_ndcg_cutoff_perfect_and_empty() -> None:
    judged = {"a": 1, "b": 1}
    assert beir.ndcg_at_k(["a", "b"], judged, 10) == pytest.approx(1.0)
    # b sits at rank 11: outside the cut-off; IDCG still counts both relevant documents
    ranking = ["a"] + [f"n{i}" for i in range(9)] + ["b"]
    assert beir.ndcg_at_k(ranking, judged, 10) == pytest.approx(1.0 / (1.0 + 1.0 / math.log2(3)))
    assert beir.ndcg_at_k(["x"], {"a": 0}, 10) == 0.0
    assert beir.ndcg_at_k([], judged, 10) == 0.0


def test_recall_and_mrr_hand_computed() -> None:
    judged = {"a": 1, "b": 1, "c": 2, "d": 0}
    assert beir.recall_at_k(["a", "d", "x", "c"], judged, 100) == pytest.approx(2 / 3)
    assert beir.recall_at_k(["x", "a"], judged, 1) == 0.0
    assert beir.mrr_at_k(["d", "x", "c", "a"], judged, 10) == pytest.approx(1 / 3)
    assert beir.mrr_at_k(["d", "x", "c"], judged, 2) == 0.0


def test_evaluate_means_identical_ids_and_missing_queries() -> None:
    qrels = {"1": {"a": 1}, "2": {"b": 1}, "3": {"c": 1}}
    # query 1: its own id "1" is dropped (BEIR's ignore_identical_ids) so "a" is rank 1;
    # query 2: b at rank 2; query 3 is missing from the run and scores 0
    run = {"1": ["1", "a"], "2": ["x", "b"]}
    m = beir.evaluate(run, qrels)
    assert m["n_queries"] == 3
    assert m["ndcg@10"] == pytest.approx(round((1.0 + 1.0 / math.log2(3)) / 3, 4))
    assert m["mrr@10"] == pytest.approx(round((1.0 + 0.5) / 3, 4))
    assert m["recall@100"] == pytest.approx(round(2 / 3, 4))
    kept = beir.evaluate(run, qrels, ignore_identical_ids=False)
    assert kept["mrr@10"] == pytest.approx(round((0.5 + 0.5) / 3, 4))
    with pytest.raises(ValueError):
        beir.evaluate(run, {})


# --- analysis ------------------------------------------------------------------------------


def test_analyzer_tokenises_like_lucene_english() -> None:
    a = beir.Analyzer(stemmer="porter")
    toks = a.tokens("The mice's running of 1.5 mg/kg, don't GENERALIZATIONS in 1,000 cells")
    # stopwords (the, of, in) dropped, possessive stripped, lowercased, Porter-stemmed,
    # decimals / thousands / inner apostrophes kept in one token
    assert toks == ["mice", "run", "1.5", "mg", "kg", "don't", "gener", "1,000", "cell"]
    assert a("The of and") == ""
    # UAX#29 joins letter:letter and letter.letter, not letter.digit (a reference mark);
    # Porter leaves one- and two-letter words alone, as Lucene's PorterStemmer does
    assert beir.Analyzer(stemmer="porter", stopwords=()).tokens(
        "background:chronic aging.1 e.g. the_end cd33's us") == [
        "background:chron", "ag", "1", "e.g", "the_end", "cd33", "s", "us"]


def test_porter_and_snowball_differ_where_expected() -> None:
    porter, snow = beir.Analyzer(stemmer="porter"), beir.Analyzer(stemmer="english")
    assert porter("generously dying") == "gener dy"
    assert snow("generously dying") == "generous die"


@needs_data
def test_query_and_document_are_stemmed_identically() -> None:
    ds = beir.load_beir(DATA, split="test")
    analyzers = beir.default_analyzers()
    did, (title, text) = next(iter(ds.corpus.items()))
    src = beir.doc_source(title, text, analyzers=analyzers)
    reqs = {r.arm: r for r in beir.build_requests(title, vector=None, analyzers=analyzers)}
    # the query path and the indexing path run the same analyzer: the title as a query
    # yields exactly the title's stemmed tokens, all of which are in the document's field
    assert reqs["lexical_stemmed"].params["stemmed_query"] == src["title_stemmed"]
    assert set(src["title_stemmed"].split()) <= set(src["stemmed"].split())
    assert reqs["lexical_stemmed_snowball"].params["stemmed_query"] == analyzers["english"](title)
    assert src["stemmed"] == analyzers["porter"](f"{title} {text}")
    assert reqs["lexical"].params["query"] == title  # the unstemmed arm gets the raw text
    assert "semantic" not in reqs


# --- loader on the real files --------------------------------------------------------------


@needs_data
def test_loader_on_real_scifact() -> None:
    test = beir.load_beir(DATA, split="test")
    train = beir.load_beir(DATA, split="train")
    assert len(test.corpus) == 5183
    assert len(test.queries) == len(test.qrels) == 300
    assert len(train.queries) == 809
    assert not set(test.qrels) & set(train.qrels)
    assert sum(len(v) for v in test.qrels.values()) == 339
    every_judged = {d for v in test.qrels.values() for d in v}
    assert every_judged <= set(test.corpus)
    assert all(isinstance(r, int) and r > 0 for v in test.qrels.values() for r in v.values())
    assert all(title and text for title, text in list(test.corpus.values())[:50])


def test_loader_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        beir.load_beir(tmp_path, split="test")


# --- templates -----------------------------------------------------------------------------


def test_scifact_templates_do_not_leak_into_catalog_arms() -> None:
    catalog = TemplateRegistry.from_dir(PROJECT_ROOT / "query_templates")
    scifact = TemplateRegistry.from_dir(PROJECT_ROOT / "query_templates" / "scifact")
    assert set(scifact.by_id) == {"lexical.v1", "lexical_stemmed.v1", "semantic.v1"}
    # same arm names, different templates: the catalog keeps its own
    assert catalog.get("lexical.v1").source != scifact.get("lexical.v1").source
    assert "lexical_stemmed" not in catalog.by_arm
    assert "embedding" in catalog.get("semantic.v1").source  # the catalog's kNN, not ours
    assert "entity_type" not in scifact.get("semantic.v1").source


def test_scifact_templates_render_and_refuse_injection() -> None:
    reg = TemplateRegistry.from_dir(PROJECT_ROOT / "query_templates" / "scifact")
    body = reg.get("lexical_stemmed.v1").render({"stemmed_query": 'cell "}]', "size": 7})
    assert body["size"] == 7
    assert body["query"]["multi_match"]["query"] == 'cell "}]'
    assert body["query"]["multi_match"]["fields"] == ["stemmed.anserini"]
    knn = reg.get("semantic.v1").render({"query_vector": [0.5, 0.25]})["knn"]
    assert knn["query_vector"] == [0.5, 0.25] and knn["k"] == 100
    from orchestrator.errors import TemplateParamsError

    with pytest.raises(TemplateParamsError):
        reg.get("lexical.v1").render({"query": "x", "fields": ["title"]})


# --- fusion and rescoring features -------------------------------------------------------


def _result(arm: str, ids_scores: list[tuple[str, float]]) -> ArmResult:
    hits = tuple(Hit(i, s, r, {}) for r, (i, s) in enumerate(ids_scores, start=1))
    return ArmResult(arm, f"{arm}.v1", hits, 1)


def test_fuse_is_rrf_k60() -> None:
    lex = _result("lexical_stemmed", [("a", 9.0), ("b", 8.0), ("c", 7.0)])
    sem = _result("semantic", [("c", 0.9), ("d", 0.8)])
    # c: 1/63 + 1/61 beats a: 1/61; b and d tie at 1/62 and keep the arms' order (b first)
    assert beir.fuse([lex, sem]) == ["c", "a", "b", "d"]


def test_rescore_features_and_ranking() -> None:
    lex = _result("lexical", [("a", 10.0), ("b", 5.0)])
    stem = _result("lexical_stemmed", [("b", 8.0)])
    sem = _result("semantic", [("c", 0.9)])
    ids, X, names = beir.rescore_features([lex, stem, sem])
    assert set(ids) == {"a", "b", "c"}
    row = dict(zip(names, X[ids.index("b")]))
    assert row["rank:lexical"] == pytest.approx(math.log1p(2))
    assert row["nscore:lexical"] == pytest.approx(0.5)
    assert row["score:lexical_stemmed"] == pytest.approx(8.0)
    assert row["in:semantic"] == 0.0 and row["nscore:semantic"] == -1.0
    assert row["n_arms"] == 2 and row["rrf"] == pytest.approx(1 / 62 + 1 / 61)
    # a model that only likes the semantic arm puts c first
    from orchestrator.rescoring import LinearRescorer

    model = LinearRescorer(feature_names=["in:semantic"], coef=[1.0])
    assert beir.rescored_ranking(model, [lex, stem, sem])[0] == "c"
    assert np.isfinite(X).all()


def test_paired_randomization_test() -> None:
    a = np.array([0.5, 0.7, 0.2, 0.9] * 25)
    assert beir.paired_randomization_test(a, a) == 1.0
    # a consistent gain of 0.1 on 100 queries is far from chance; a +-0.1 zigzag is chance
    assert beir.paired_randomization_test(a + 0.1, a) < 0.001
    zigzag = a + np.tile([0.1, -0.1], 50)
    assert beir.paired_randomization_test(zigzag, a) > 0.5
    assert beir.paired_randomization_test(a + 0.1, a, seed=1) == beir.paired_randomization_test(
        a + 0.1, a, seed=1)


def test_per_query_ndcg_matches_evaluate() -> None:
    qrels = {"1": {"a": 1}, "2": {"b": 1, "c": 1}}
    run = {"1": ["x", "a"], "2": ["c"]}
    per_q = beir.per_query_ndcg(run, qrels)
    assert per_q.tolist() == pytest.approx([1 / math.log2(3), 1 / (1 + 1 / math.log2(3))])
    assert round(per_q.mean(), 4) == beir.evaluate(run, qrels)["ndcg@10"]
