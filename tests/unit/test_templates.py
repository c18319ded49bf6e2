"""Template registry, typed parameters and the structural injection check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.errors import (
    TemplateNotFoundError,
    TemplateParamsError,
    TemplateSyntaxError,
)
from orchestrator.settings import PROJECT_ROOT
from orchestrator.templates import TemplateRegistry

INJECTIONS = [
    '"}},{"match_all":{}',
    '"}}]}},"size":10000,"x":{"y":"',
    "{{size}}",
    "{{#toJson}}entity_types{{/toJson}}",
    "\\",
    '\\"',
    "line\nbreak\u2028",
    "Beyoncé 東京 🎵",
]


def write(tmp_path: Path, name: str, source: str, meta: dict) -> TemplateRegistry:
    (tmp_path / f"{name}.mustache").write_text(source)
    (tmp_path / f"{name}.json").write_text(json.dumps(meta))
    return TemplateRegistry.from_dir(tmp_path)


@pytest.fixture()
def toy(tmp_path):
    return write(
        tmp_path, "toy.v2",
        '{"size": {{size}}, "query": {"match": {"title": "{{query}}"}}, '
        '"post_filter": {"terms": {"t": {{#toJson}}types{{/toJson}}}}}',
        {"name": "toy", "version": 2, "params": {
            "query": {"type": "string", "required": True, "max_chars": 50},
            "size": {"type": "integer", "default": 10, "minimum": 0, "maximum": 100},
            "types": {"type": "string_list", "default": ["track"], "max_items": 3},
        }},
    )


def test_lookup_by_id_and_arm(toy):
    assert toy.get("toy").id == "toy.v2"
    assert toy.get("toy.v2").version == 2
    with pytest.raises(TemplateNotFoundError, match="Known templates") as err:
        toy.get("nope")
    assert isinstance(err.value, KeyError)


def test_render_fills_defaults(toy):
    body = toy.get("toy").render({"query": "love story"})
    assert body["size"] == 10 and body["query"]["match"]["title"] == "love story"
    assert body["post_filter"]["terms"]["t"] == ["track"]


@pytest.mark.parametrize("bad", [
    {"query": "x", "size": "10, \"from\": 5"},
    {"query": "x", "size": 1001},
    {"query": "x", "size": True},
    {"query": "x", "size": 2.5},
    {"query": "x" * 51},
    {"query": "x", "types": ["a", "b", "c", "d"]},
    {"query": "x", "types": "track"},
    {"query": {"match_all": {}}},
    {"query": "x", "unknown": 1},
    {},
])
def test_bad_params_are_refused(toy, bad):
    with pytest.raises(TemplateParamsError):
        toy.get("toy").render(bad)


@pytest.mark.parametrize("text", INJECTIONS)
def test_injection_does_not_change_shape(toy, text):
    t = toy.get("toy")
    body = t.render({"query": text, "types": [text[:50]]})
    normal = t.render({"query": "normal", "types": ["x"]})
    assert body["query"]["match"]["title"] == text
    assert set(body) == set(normal)
    assert body["post_filter"]["terms"]["t"] == [text[:50]]


@pytest.mark.parametrize("value", ["5", "[1, 2]", '5, "from": 3'])
def test_unquoted_string_param_is_a_template_error(tmp_path, value):
    # A string in a bare JSON position could carry structure: the template is refused
    # whatever the value, so the author finds out on the first render.
    reg = write(tmp_path, "bare.v1", '{"size": {{n}}}', {"params": {"n": {"type": "string"}}})
    with pytest.raises(TemplateSyntaxError, match="outside quotes"):
        reg.get("bare").render({"n": value})


def test_oversized_params_are_refused(toy):
    with pytest.raises(TemplateParamsError, match="bytes"):
        toy.get("toy").render({"query": "x" * 50, "types": ["y" * 50] * 3}, max_bytes=100)


def test_bad_sidecar_type_is_a_syntax_error(tmp_path):
    with pytest.raises(TemplateSyntaxError, match="use one of"):
        write(tmp_path, "x.v1", "{}", {"params": {"a": {"type": "json"}}})


def test_every_shipped_template_loads_and_renders():
    reg = TemplateRegistry.from_dir(PROJECT_ROOT / "query_templates")
    assert "lexical" in reg.by_arm
    for t in reg.by_id.values():
        assert t.id.split(".v")[0] == t.arm, "file stem must be <arm>.v<N>"
        assert t.meta.get("description"), f"{t.id} needs a description"
