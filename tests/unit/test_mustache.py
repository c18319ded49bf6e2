"""The local mustache renderer: Elasticsearch's semantics, JSON-safe by construction."""

from __future__ import annotations

import json

import pytest

from orchestrator import mustache
from orchestrator.errors import TemplateSyntaxError


def render(src: str, **params):
    return mustache.render(mustache.parse(src), params)


def test_variables_are_json_escaped():
    out = render('{"q": "{{q}}"}', q='a "quoted" \\ back\nslash\t\u0001')
    assert json.loads(out) == {"q": 'a "quoted" \\ back\nslash\t\u0001'}


def test_unicode_is_kept_verbatim():
    assert render('"{{q}}"', q="Beyoncé 東京") == '"Beyoncé 東京"'


def test_numbers_and_booleans_render_like_elasticsearch():
    assert render("{{a}} {{b}} {{c}} {{d}}", a=10, b=0.5, c=True, d=False) == "10 0.5 true false"


def test_missing_and_none_render_empty():
    assert render("[{{missing}}{{none}}]", none=None) == "[]"


def test_sections_iterate_lists_and_push_objects():
    src = "{{#items}}{{name}}={{v}};{{/items}}"
    assert render(src, items=[{"name": "a", "v": 1}, {"name": "b", "v": 2}]) == "a=1;b=2;"
    assert render("{{#obj}}{{x}}{{/obj}}", obj={"x": "y"}) == "y"
    assert render("{{#flag}}on{{/flag}}{{^flag}}off{{/flag}}", flag=False) == "off"
    assert render("{{#flag}}on{{/flag}}", flag=True) == "on"
    assert render("{{#l}}x{{/l}}{{^l}}empty{{/l}}", l=[]) == "empty"


def test_dot_and_dotted_names():
    assert render("{{#l}}{{.}},{{/l}}", l=["a", "b"]) == "a,b,"
    assert render("{{a.b.c}}", a={"b": {"c": "deep"}}) == "deep"
    assert render("{{l.1}}", l=["x", "y"]) == "y"


def test_tojson_and_join_extensions():
    assert json.loads(render("{{#toJson}}v{{/toJson}}", v=["a", 'b"c', 1])) == ["a", 'b"c', 1]
    assert render("{{#toJson}}missing{{/toJson}}") == "null"
    assert render('"{{#join}}v{{/join}}"', v=["a", 'b"']) == '"a,b\\""'


def test_comments_are_dropped():
    assert render("a{{! note }}b") == "ab"


@pytest.mark.parametrize("src", ["{{{raw}}}", "{{& raw}}"])
def test_unescaped_output_is_refused(src):
    with pytest.raises(TemplateSyntaxError, match="not allowed"):
        mustache.parse(src)


@pytest.mark.parametrize("src", ["{{#a}}x", "{{#a}}x{{/b}}", "x{{/a}}", "{{}}"])
def test_malformed_templates_are_refused(src):
    with pytest.raises(TemplateSyntaxError):
        mustache.parse(src)


def test_object_in_plain_variable_is_refused():
    with pytest.raises(TemplateSyntaxError, match="toJson"):
        render("{{o}}", o={"a": 1})


def test_parameters_cannot_inject_tags():
    # Mustache braces inside a parameter are data, not template syntax.
    assert json.loads(render('"{{q}}"', q="{{#toJson}}x{{/toJson}}")) == "{{#toJson}}x{{/toJson}}"


def test_neutral_keeps_shape():
    value = {"q": "text", "n": 5, "z": 0, "l": ["a", ""], "b": False}
    assert mustache.neutral(value) == {"q": "x", "n": 1, "z": 0, "l": ["x", ""], "b": False}
    assert mustache.skeleton({"a": [1, "x"]}) == {"a": ["int", "str"]}
