"""A JSON-safe mustache renderer for Elasticsearch search templates.

Elasticsearch renders search templates with mustache and escapes every variable for JSON
(``"`` becomes ``\\"`` and so on), plus two extensions: ``{{#toJson}}name{{/toJson}}`` (write
a parameter as JSON) and ``{{#join}}name{{/join}}`` (comma-join a list). The server-only node
has no ``lang-mustache`` module, so the orchestrator renders templates itself with the same
guarantees and sends plain ``_msearch``; on full clusters both paths render the same JSON.

Supported: variables (``{{a}}``, dotted ``{{a.b}}``, ``{{.}}``), sections (lists iterate,
objects push a context, other values act as booleans), inverted sections, comments,
``toJson``, ``join``. Triple mustache / ``{{& }}`` (unescaped output) is refused: it is the one
way a parameter could become query syntax.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import TemplateSyntaxError

_TAG = re.compile(r"\{\{(\{)?\s*([#^/!&]?)\s*(.*?)\s*\}\}", re.S)
_MISSING = object()


@dataclass(slots=True)
class _Section:
    name: str
    inverted: bool
    children: list[Any] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Var:
    name: str


def parse(source: str) -> list[Any]:
    """Parse ``source`` into a tree of text, :class:`_Var` and :class:`_Section` nodes."""
    root: list[Any] = []
    stack: list[tuple[_Section | None, list[Any]]] = [(None, root)]
    pos = 0
    for m in _TAG.finditer(source):
        if m.start() > pos:
            stack[-1][1].append(source[pos : m.start()])
        pos = m.end()
        triple, sigil, name = m.group(1), m.group(2), m.group(3)
        if triple or sigil == "&":
            raise TemplateSyntaxError(
                f"unescaped output {m.group(0)!r} is not allowed (it would let a parameter "
                "inject query syntax); use {{#toJson}}name{{/toJson}} for JSON values"
            )
        if sigil == "!":
            continue
        if not name:
            raise TemplateSyntaxError(f"empty tag at offset {m.start()}")
        if sigil in ("#", "^"):
            sec = _Section(name, sigil == "^")
            stack[-1][1].append(sec)
            stack.append((sec, sec.children))
        elif sigil == "/":
            open_sec = stack[-1][0]
            if open_sec is None or open_sec.name != name:
                expected = open_sec.name if open_sec else None
                raise TemplateSyntaxError(
                    f"closing tag {{{{/{name}}}}} at offset {m.start()} does not match "
                    f"open section {expected!r}"
                )
            stack.pop()
        else:
            stack[-1][1].append(_Var(name))
    if len(stack) > 1:
        raise TemplateSyntaxError(f"section {stack[-1][0].name!r} is never closed")  # type: ignore[union-attr]
    if pos < len(source):
        root.append(source[pos:])
    return root


def _lookup(name: str, contexts: list[Any]) -> Any:
    if name == ".":
        return contexts[-1]
    head, *rest = name.split(".")
    for ctx in reversed(contexts):
        if isinstance(ctx, dict) and head in ctx:
            value = ctx[head]
            for part in rest:
                if isinstance(value, dict) and part in value:
                    value = value[part]
                elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                    value = value[int(part)]
                else:
                    return _MISSING
            return value
    return _MISSING


def _scalar(value: Any) -> str:
    """Text of a value as Elasticsearch's mustache prints it, JSON-escaped."""
    if value is _MISSING or value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, (dict, list)):
        # Java's toString of a map/list is not JSON; refuse instead of guessing.
        raise TemplateSyntaxError(
            "a list or object parameter was used as {{name}}; use {{#toJson}}name{{/toJson}}"
        )
    return json.dumps(str(value), ensure_ascii=False)[1:-1]


def _render(nodes: list[Any], contexts: list[Any], out: list[str]) -> None:
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Var):
            out.append(_scalar(_lookup(node.name, contexts)))
        elif node.name in ("toJson", "join") and not node.inverted:
            inner = "".join(c for c in node.children if isinstance(c, str)).strip()
            value = _lookup(inner, contexts)
            if value is _MISSING:
                value = None
            if node.name == "toJson":
                out.append(json.dumps(value, ensure_ascii=False))
            else:
                items = value if isinstance(value, list) else ([] if value is None else [value])
                out.append(",".join(_scalar(v) for v in items))
        else:
            value = _lookup(node.name, contexts)
            truthy = value is not _MISSING and value not in (None, False, "", [], {}, 0)
            if node.inverted:
                if not truthy:
                    _render(node.children, contexts, out)
            elif truthy:
                if isinstance(value, list):
                    for item in value:
                        _render(node.children, contexts + [item], out)
                elif isinstance(value, dict):
                    _render(node.children, contexts + [value], out)
                else:
                    _render(node.children, contexts, out)


def render(tree: list[Any], params: dict[str, Any]) -> str:
    """Render a parsed template with ``params``; every scalar is JSON-escaped."""
    out: list[str] = []
    _render(tree, [params], out)
    return "".join(out)


def skeleton(value: Any) -> Any:
    """The shape of a JSON value: keys and container types, with leaves reduced to types."""
    if isinstance(value, dict):
        return {k: skeleton(v) for k, v in value.items()}
    if isinstance(value, list):
        return [skeleton(v) for v in value]
    return type(value).__name__


def neutral(value: Any) -> Any:
    """A harmless stand-in of ``value`` that keeps its type, truthiness and list lengths.

    Rendering with neutral parameters gives the shape the template author meant; a real
    rendering whose skeleton differs means a parameter changed the query's structure.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return 1 if value else 0
    if isinstance(value, float):
        return 1.0 if value else 0.0
    if isinstance(value, str):
        return "x" if value else ""
    if isinstance(value, list):
        return [neutral(v) for v in value]
    if isinstance(value, dict):
        return {k: neutral(v) for k, v in value.items()}
    return value
