"""Every arm template: contract (loads, valid sidecar, renders JSON), parameter safety
(parameters are data: hostile queries and slot values never change the query's structure and
only raise TemplateParamsError / QueryValidationError) and the slot -> parameter mapping."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import pytest

from orchestrator import catalog, mustache
from orchestrator.arms import (
    ArmSpec,
    applicable,
    arm_spec,
    arm_specs,
    artist_doc_id,
    base_params,
    build_request,
    build_requests,
    knn_candidates,
    normalize_era,
    query_terms,
    slot_params,
    validate_query,
)
from orchestrator.domain import SLOT_CATEGORIES, ArmRequest, ParsedQuery, Slot
from orchestrator.errors import QueryValidationError, TemplateParamsError
from orchestrator.settings import PROJECT_ROOT
from orchestrator.templates import _PARAM_TYPES, TemplateRegistry
from orchestrator.text import normalize_query

TEMPLATE_DIR = PROJECT_ROOT / "query_templates"
REGISTRY = TemplateRegistry.from_dir(TEMPLATE_DIR)
ARMS = sorted(REGISTRY.by_arm)
SOURCES = {"lexical", "structured", "semantic", "memory", "explore", "related"}
VECTOR = [((i * 37) % 11 - 5) / 10 for i in range(256)]
ALLOWED = (TemplateParamsError, QueryValidationError)


def _parsed(text: str, **values: list[str]) -> ParsedQuery:
    slots = tuple(Slot(cat, v, 0.9, 0, len(text)) for cat, vs in values.items() for v in vs)
    return ParsedQuery(text=text, normalized=normalize_query(text), slots=slots)


#: A query that fills every slot, so every arm (structured, related ...) is applicable.
FULL = _parsed("chill jazz by miles davis 90s", genre=["jazz"], mood=["chill"],
               artist=["Miles Davis"], era=["90s"])


def _request(arm: str, query: str, parsed: ParsedQuery | None = FULL, **kw: Any) -> ArmRequest:
    reqs = build_requests(REGISTRY, parsed, query, budgets={arm: 10}, vector=VECTOR, seed=7, **kw)
    assert [r.arm for r in reqs] == [arm], f"{arm} was skipped for {query!r}"
    return reqs[0]


def _render(arm: str, query: str, parsed: ParsedQuery | None = FULL) -> dict[str, Any]:
    req = _request(arm, query, parsed)
    return REGISTRY.get(req.template_id).render(req.params, max_bytes=16_384)


def shape(value: Any) -> Any:
    """Structure of a JSON value: keys and nesting; a list of scalars (terms, a vector) is
    one leaf, since its length is data (how many words, how many genres)."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        if all(not isinstance(v, (dict, list)) for v in value):
            return "scalar-list"
        return [shape(v) for v in value]
    return "bool" if isinstance(value, bool) else ("number" if isinstance(value, (int, float))
                                                   else type(value).__name__)


def _names(nodes: list[Any]) -> set[str]:
    """Parameter names a parsed template reads (variables, sections, toJson/join bodies)."""
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, mustache._Var):
            out.add(node.name)
        elif isinstance(node, mustache._Section):
            if node.name in ("toJson", "join"):
                out.add("".join(c for c in node.children if isinstance(c, str)).strip())
            else:
                out.add(node.name)
                out |= _names(node.children)
    return out


def _keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


def strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return [value] if isinstance(value, str) else []


# -- contract ------------------------------------------------------------------------------

def test_every_expected_arm_is_registered() -> None:
    assert {"lexical", "lexical_popular", "structured", "semantic", "memory", "explore",
            "related"} <= set(ARMS)


@pytest.mark.parametrize("path", sorted(TEMPLATE_DIR.glob("*.mustache")), ids=lambda p: p.stem)
def test_template_has_valid_sidecar(path: Path) -> None:
    sidecar = path.with_suffix(".json")
    assert sidecar.exists(), f"{path.name} has no sidecar"
    meta = json.loads(sidecar.read_text(encoding="utf-8"))
    stem = path.name.removesuffix(".mustache")
    name, _, version = stem.rpartition(".v")
    assert meta["name"] == name and meta["version"] == int(version)
    assert len(meta["description"]) > 40
    assert meta["action_features"]["source"] in SOURCES
    for key in ("required_slots", "required_slots_any"):
        assert set(meta.get(key, [])) <= set(SLOT_CATEGORIES), key
    assert meta["params"], "a template without parameters cannot depend on the query"
    for pname, spec in meta["params"].items():
        assert spec["type"] in _PARAM_TYPES, pname
    assert "size" in meta["params"]
    source = path.read_text(encoding="utf-8")
    assert "{{{" not in source and "{{&" not in source
    # every declared parameter is used, every used variable is declared
    used = {name.split(".")[0] for name in _names(mustache.parse(source))}
    assert used == set(meta["params"]), (used ^ set(meta["params"]))


@pytest.mark.parametrize("arm", ARMS)
def test_template_renders_typical_params_to_json(arm: str) -> None:
    body = _render(arm, "chill jazz by miles davis 90s")
    assert body["size"] == 10
    assert "query" in body or "knn" in body
    if REGISTRY.get(arm).meta.get("index"):
        # another index (the memory index): an explicit list of small fields, no vectors
        assert isinstance(body["_source"], list) and "embedding" not in body["_source"]
    else:
        assert "embedding" in body["_source"]["excludes"]
    spec = arm_spec(REGISTRY.get(arm))
    assert isinstance(spec, ArmSpec) and spec.name == arm
    # the raw text (what _render/template would print) is the same JSON
    req = _request(arm, "chill jazz by miles davis 90s")
    assert json.loads(REGISTRY.get(arm).render_text(req.params)) == body


def test_arm_specs_cover_the_registry() -> None:
    specs = arm_specs(REGISTRY)
    assert set(specs) == set(ARMS)
    assert specs["semantic"].needs_vector and not specs["lexical"].needs_vector
    assert specs["structured"].required_slots_any and specs["related"].required_slots == ("artist",)


# -- safety --------------------------------------------------------------------------------

HOSTILE = [
    '"}},{"match_all":{}}',
    '"}}]}},"size":10000,"x":{"y":"',
    "{{size}}",
    "{{#toJson}}entity_types{{/toJson}}",
    "{{{query}}}",
    "{{/query}}{{#x}}",
    "back\\slash \\\" \\u0022 \\n",
    "naïve Beyoncé — 東京 🎷 مرحبا",
    "line\nbreak\r\ttab",
    "'; DROP TABLE tracks; --",
    '<script>alert("x")</script>',
    "\u202e\u200b\ufeffzero width",
    "ﷺ ﬀ",  # NFKD-expanding characters
    "a" * 256,
]


@pytest.mark.parametrize("arm", ARMS)
@pytest.mark.parametrize("query", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_query_is_data(arm: str, query: str) -> None:
    reference = _render(arm, "chill jazz by miles davis 90s")
    try:
        body = _render(arm, query)
    except ALLOWED:
        return
    except AssertionError:
        # skipped arm (e.g. memory for a query with no word characters): nothing rendered
        assert normalize_query(query) == "" and arm == "memory"
        return
    assert shape(body) == shape(reference)
    leaves = strings(body)
    if any(p.name == "query" for p in REGISTRY.get(arm).params):
        assert query.strip() in leaves, "the query must arrive as one intact string value"


@pytest.mark.parametrize("arm", ARMS)
@pytest.mark.parametrize("value", HOSTILE[:8], ids=range(8))
def test_hostile_slot_values_are_data(arm: str, value: str) -> None:
    reference = _render(arm, "miles davis")
    parsed = _parsed(value, genre=[value], mood=["chill"], artist=[value], era=["90s"],
                     entity_type=["songs"])
    try:
        req = build_requests(REGISTRY, parsed, "miles davis", budgets={arm: 10}, vector=VECTOR,
                             seed=7)
        bodies = [REGISTRY.get(r.template_id).render(r.params) for r in req]
    except ALLOWED:
        return
    for body in bodies:
        assert shape(body) == shape(reference)
        assert "match_all" not in _keys(body)
        if arm in ("structured", "related", "explore"):  # arms that read slot values
            leaves = strings(body)
            assert value in leaves or value.lower() in leaves


@pytest.mark.parametrize("arm", ARMS)
def test_random_garbage_only_raises_documented_errors(arm: str) -> None:
    rng = random.Random(20240611)
    alphabet = '{}[]":,\\/#^&!{{}}abc é東🎷\n\t\x00\x1f\u2028' + "x" * 10
    reference = shape(_render(arm, "chill jazz by miles davis 90s"))
    for _ in range(150):
        q = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 300)))
        try:
            reqs = build_requests(REGISTRY, FULL, q, budgets={arm: 10}, vector=VECTOR, seed=1)
            for r in reqs:
                assert shape(REGISTRY.get(r.template_id).render(r.params)) == reference
        except ALLOWED:
            pass


@pytest.mark.parametrize("query,reason", [
    ("", "empty"), ("   ", "empty"), ("x" * 257, "limit is 256"), ("a\x00b", "control"),
    (None, "must be a string"), (42, "must be a string"),
])
def test_bad_queries_are_refused_with_a_reason(query: Any, reason: str) -> None:
    with pytest.raises(QueryValidationError, match=reason):
        build_requests(REGISTRY, None, query, budgets={"lexical": 10}, vector=None)


def test_oversized_params_are_refused() -> None:
    with pytest.raises(TemplateParamsError, match="outside"):
        build_requests(REGISTRY, None, "hello", budgets={"lexical": 5000}, vector=None)
    t = REGISTRY.get("lexical")
    params = build_request(t, base_params("hello", size=10)).params
    with pytest.raises(TemplateParamsError, match="bytes; the limit"):
        t.render({**params, "query": "x" * 250, "folded_query": "x" * 250}, max_bytes=300)
    with pytest.raises(TemplateParamsError, match="characters; the limit"):
        t.render({**params, "query": "x" * 300})
    with pytest.raises(TemplateParamsError, match="type vector"):
        REGISTRY.get("semantic").render({"query_vector": "not a vector"})


def test_expanding_fold_is_refused_not_crashed() -> None:
    with pytest.raises(TemplateParamsError, match="folded_query"):
        build_requests(REGISTRY, None, "ﷺ" * 100, budgets={"lexical": 10}, vector=None)


# -- slots and applicability ---------------------------------------------------------------

@pytest.mark.parametrize("value,era", [
    ("90s", "1990s"), ("'90s", "1990s"), ("90's", "1990s"), ("1990s", "1990s"),
    ("nineties", "1990s"), ("1994", "1990s"), ("2000s", "2000s"), ("10s", "2010s"),
    ("20s", "2020s"), ("1920s", "1920s"), ("sixties", "1960s"), ("jazz", None), ("9", None),
])
def test_normalize_era(value: str, era: str | None) -> None:
    assert normalize_era(value) == era


def test_slot_params_maps_to_catalog_vocabulary() -> None:
    parsed = _parsed("x", genre=["Hip Hop", "jazz", "jazz"], mood=["relaxing", "unknown-mood"],
                     era=["80s", "later"], artist=["Beyoncé", "Jay-Z"],
                     entity_type=["songs", "playlist"])
    p = slot_params(parsed)
    assert p["genres"] == ["hip hop", "hip-hop", "jazz"]
    assert p["moods"] == ["chill", "calm"]
    assert p["eras"] == ["1980s"]
    assert p["artists"] == ["Beyoncé", "Jay-Z"] and p["artist"] == "Beyoncé"
    assert p["artist_id"] == artist_doc_id("Beyoncé")
    assert p["entity_types"] == ["track"]
    assert slot_params(None) == {}
    assert slot_params(_parsed("x", mood=["unknown"])) == {}


def test_artist_doc_id_matches_ingestion() -> None:
    # catalog.py builds artist ids as _stable_id(fold(name)); the related arm relies on it
    for name in ("Miles Davis", "Beyoncé", "AC/DC", "Sigur Rós"):
        assert artist_doc_id(name) == "artist:" + catalog._stable_id(catalog.fold(name))
    assert artist_doc_id("x").startswith("artist:") and len(artist_doc_id("x")) == 23
    assert hashlib.sha1(b"x").hexdigest()[:16] in artist_doc_id("X")


def test_applicability() -> None:
    structured, related = REGISTRY.get("structured"), REGISTRY.get("related")
    assert not applicable(structured, None)
    assert not applicable(structured, _parsed("songs", entity_type=["songs"]))
    assert not applicable(structured, _parsed("x", mood=["not a mood"]))
    for cat, value in [("genre", "jazz"), ("mood", "chill"), ("era", "90s"), ("artist", "Adele")]:
        assert applicable(structured, _parsed("x", **{cat: [value]})), cat
    assert not applicable(related, _parsed("x", genre=["jazz"]))
    assert applicable(related, _parsed("x", artist=["Adele"]))
    for arm in ("lexical", "lexical_popular", "semantic", "memory", "explore"):
        assert applicable(REGISTRY.get(arm), None)


def test_build_requests_skips_what_cannot_run() -> None:
    budgets = {a: 10 for a in ARMS}
    names = [r.arm for r in build_requests(REGISTRY, None, "hello", budgets=budgets, vector=None)]
    assert set(names) == {"lexical", "lexical_popular", "memory", "explore"}  # no vector, no slots
    names = [r.arm for r in build_requests(REGISTRY, FULL, "hello", budgets=budgets, vector=VECTOR)]
    assert names == ARMS  # budgets order, everything applicable
    assert [r.arm for r in build_requests(REGISTRY, None, "?!", budgets={"memory": 10, "lexical": 3},
                                          vector=None)] == ["lexical"]
    assert build_requests(REGISTRY, None, "hello", budgets={"lexical": 0}, vector=None) == []


def test_build_requests_params() -> None:
    req = {r.arm: r for r in build_requests(
        REGISTRY, FULL, "  Chill Jazz  ", budgets={"semantic": 40, "explore": 5, "structured": 7,
                                                  "lexical.v1": 3}, vector=VECTOR, seed=99)}
    assert req["semantic"].params["k"] == 40 and req["semantic"].params["num_candidates"] == 200
    assert len(req["semantic"].params["query_vector"]) == 256
    assert req["explore"].params["seed"] == 99 and req["explore"].params["size"] == 5
    assert {"chill", "jazz", "chill jazz", "chill-jazz"} <= set(req["explore"].params["terms"])
    assert req["structured"].params["genres"] == ["jazz"]
    assert req["structured"].params["eras"] == ["1990s"]
    assert req["lexical"].params["query"] == "Chill Jazz" and req["lexical"].template_id == "lexical.v1"
    a = build_requests(REGISTRY, None, "x y", budgets={"explore": 5}, vector=None)[0]
    b = build_requests(REGISTRY, None, "x y", budgets={"explore": 5}, vector=None)[0]
    assert a.params["seed"] != b.params["seed"]  # fresh seed unless one is given


def test_knn_candidates_bounds() -> None:
    assert knn_candidates(10) == 100 and knn_candidates(100) == 500
    assert knn_candidates(5000) == 10_000


def test_query_terms() -> None:
    assert query_terms("Hard Rock Workout!") == [
        "hard", "rock", "workout", "hard rock", "rock workout", "hard-rock", "rock-workout"]
    assert query_terms("") == []


def test_legacy_helpers_still_work() -> None:
    assert validate_query("  hi ", max_chars=10) == "hi"
    p = base_params("Beyoncé!", size=3)
    assert p == {"query": "Beyoncé!", "folded_query": "beyonce!", "query_key": "beyonce",
                 "size": 3}
    req = build_request(REGISTRY.get("lexical"), {**p, "unrelated": 1})
    assert set(req.params) == {"query", "folded_query", "size"}


def test_many_slot_values_are_capped_not_refused() -> None:
    parsed = _parsed("x", genre=[f"genre {i}" for i in range(30)], mood=["chill"] * 3 + ["sad"],
                     artist=[f"artist {i}" for i in range(30)], era=[f"{y}s" for y in range(1900, 2030, 10)])
    reqs = build_requests(REGISTRY, parsed, " ".join(f"w{i}" for i in range(60)),
                          budgets={a: 10 for a in ARMS}, vector=VECTOR, seed=1)
    assert [r.arm for r in reqs] == ARMS
    for r in reqs:
        REGISTRY.get(r.template_id).render(r.params)


def test_a_plan_naming_an_older_version_runs_that_version() -> None:
    """Decisions carry template ids; a plan choosing ``lexical.v1`` while ``lexical.v2`` exists
    must run v1 (it used to resolve the arm name to its newest version)."""
    from orchestrator.selection import ArmSpec, FixedPlanSelector, SelectionContext

    assert {"lexical.v1", "lexical.v2"} <= set(REGISTRY.by_id)
    specs = [ArmSpec.from_template(REGISTRY.get(t)) for t in ("lexical.v1", "lexical.v2")]
    decision = FixedPlanSelector({"lexical.v1": 7}).select(
        SelectionContext({"bias": 1.0}, (0,), (1.0,), "b"), specs, total_budget=7)
    reqs = build_requests(REGISTRY, None, "love story", budgets=decision.budgets, vector=None)
    assert [(r.template_id, r.params["size"]) for r in reqs] == [("lexical.v1", 7)]
