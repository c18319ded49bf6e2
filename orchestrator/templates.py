"""Arm templates: ``query_templates/<arm>.v<N>.mustache`` plus a ``.json`` sidecar.

Consumes template files, produces rendered search bodies (local mode) or stored search
templates (``ltrr templates push`` where the node has ``lang-mustache``). The file stem
(``lexical.v1``) is the template id, the stored-script id and the versioned arm id; the
sidecar declares the parameters with their types, so anything a caller passes is checked
before rendering, and the rendered query is checked to have the shape the author wrote.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from elasticsearch import Elasticsearch, NotFoundError

from . import mustache
from .errors import (
    ConfigurationError,
    TemplateNotFoundError,
    TemplateParamsError,
    TemplateSyntaxError,
)

logger = logging.getLogger(__name__)

ParamType = Literal["string", "integer", "number", "boolean", "string_list", "vector", "object"]
_PARAM_TYPES: tuple[str, ...] = ParamType.__args__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class ParamSpec:
    name: str
    type: ParamType
    required: bool = False
    default: Any = None
    max_items: int = 64
    max_chars: int = 512
    minimum: float | None = None
    maximum: float | None = None

    def coerce(self, value: Any) -> Any:
        """Return ``value`` converted to the declared type, or raise TemplateParamsError."""
        t = self.type
        try:
            if t == "string":
                if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                    raise TypeError
                value = str(value)
                if len(value) > self.max_chars:
                    raise TemplateParamsError(
                        f"parameter {self.name!r} is {len(value)} characters; the limit is {self.max_chars}"
                    )
                return value
            if t == "integer":
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise TypeError
                return self._bounded(int(value))
            if t == "number":
                if isinstance(value, bool):
                    raise TypeError
                return self._bounded(float(value))
            if t == "boolean":
                if not isinstance(value, bool):
                    raise TypeError
                return value
            if t in ("string_list", "vector"):
                if not isinstance(value, (list, tuple)):
                    raise TypeError
                if t == "string_list" and len(value) > self.max_items:
                    raise TemplateParamsError(
                        f"parameter {self.name!r} has {len(value)} items; the limit is {self.max_items}"
                    )
                if t == "vector":
                    return [float(v) for v in value]
                return [ParamSpec(self.name, "string", max_chars=self.max_chars).coerce(v) for v in value]
            if t == "object":
                if not isinstance(value, dict):
                    raise TypeError
                return value
        except (TypeError, ValueError) as exc:
            if isinstance(exc, TemplateParamsError):
                raise
            raise TemplateParamsError(
                f"parameter {self.name!r} must be of type {t}, got {type(value).__name__}: {value!r:.80}"
            ) from None
        raise ConfigurationError(f"unknown parameter type {t!r}")  # pragma: no cover

    def _bounded(self, v: float) -> Any:
        if (self.minimum is not None and v < self.minimum) or (
            self.maximum is not None and v > self.maximum
        ):
            raise TemplateParamsError(
                f"parameter {self.name!r}={v} is outside [{self.minimum}, {self.maximum}]"
            )
        return v


@dataclass(frozen=True, slots=True)
class SearchTemplate:
    """One arm's template: its id, metadata, parameter specs and parsed source."""

    id: str
    source: str
    meta: dict[str, Any]
    params: tuple[ParamSpec, ...]
    tree: tuple[Any, ...]

    @property
    def arm(self) -> str:
        return str(self.meta.get("name", self.id.split(".v")[0]))

    @property
    def version(self) -> int:
        return int(self.meta.get("version", 1))

    def validate_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Check ``params`` against the declared specs; fill defaults; refuse unknown names."""
        specs = {p.name: p for p in self.params}
        unknown = sorted(set(params) - set(specs))
        if unknown:
            raise TemplateParamsError(
                f"template {self.id!r} has no parameter(s) {unknown}; it declares {sorted(specs)}"
            )
        out: dict[str, Any] = {}
        for spec in self.params:
            if spec.name in params and params[spec.name] is not None:
                out[spec.name] = spec.coerce(params[spec.name])
            elif spec.required:
                raise TemplateParamsError(f"template {self.id!r} needs parameter {spec.name!r}")
            elif spec.default is not None:
                out[spec.name] = spec.coerce(spec.default)
        return out

    def render(self, params: dict[str, Any], *, max_bytes: int | None = None) -> dict[str, Any]:
        """Render to a search body (dict). Parameters are data: a rendering whose JSON shape
        differs from the rendering with neutral stand-ins is refused."""
        clean = self.validate_params(params)
        if max_bytes is not None:
            size = len(json.dumps(clean))
            if size > max_bytes:
                raise TemplateParamsError(
                    f"parameters of {self.id!r} are {size} bytes; the limit is {max_bytes}"
                )
        text = mustache.render(list(self.tree), clean)
        reference_text = mustache.render(list(self.tree), mustache.neutral(clean))
        try:
            reference = json.loads(reference_text)
        except json.JSONDecodeError as exc:
            raise TemplateSyntaxError(
                f"template {self.id!r} does not render to JSON with neutral parameters "
                f"(is a string parameter outside quotes?): {exc}"
            ) from None
        try:
            body = json.loads(text)
        except json.JSONDecodeError:
            raise TemplateParamsError(
                f"parameters of {self.id!r} break the query JSON; parameters are data, not query text"
            ) from None
        if mustache.skeleton(body) != mustache.skeleton(reference):
            raise TemplateParamsError(
                f"parameters of {self.id!r} change the query's structure; parameters are data"
            )
        return body

    def render_text(self, params: dict[str, Any]) -> str:
        """The raw rendered text (what Elasticsearch's ``_render/template`` would output)."""
        return mustache.render(list(self.tree), self.validate_params(params))


def _load_one(path: Path) -> SearchTemplate:
    source = path.read_text(encoding="utf-8")
    meta_path = path.with_suffix(".json")
    meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.exists() else {}
    specs = []
    for name, spec in meta.get("params", {}).items():
        if spec.get("type") not in _PARAM_TYPES:
            raise TemplateSyntaxError(
                f"{meta_path.name}: parameter {name!r} has type {spec.get('type')!r}; "
                f"use one of {list(_PARAM_TYPES)}"
            )
        specs.append(ParamSpec(name=name, **spec))
    try:
        tree = mustache.parse(source)
    except TemplateSyntaxError as exc:
        raise TemplateSyntaxError(f"{path.name}: {exc}") from None
    return SearchTemplate(path.name.removesuffix(".mustache"), source, meta, tuple(specs), tuple(tree))


class TemplateRegistry:
    """All templates of a folder, keyed by id (``lexical.v1``) and by arm (newest version)."""

    def __init__(self, templates: dict[str, SearchTemplate]) -> None:
        self.by_id = dict(sorted(templates.items()))
        self.by_arm: dict[str, SearchTemplate] = {}
        for t in self.by_id.values():
            cur = self.by_arm.get(t.arm)
            if cur is None or t.version > cur.version:
                self.by_arm[t.arm] = t

    @classmethod
    def from_dir(cls, folder: Path) -> TemplateRegistry:
        if not folder.is_dir():
            raise ConfigurationError(f"template folder {folder} does not exist")
        return cls({t.id: t for t in map(_load_one, sorted(folder.glob("*.mustache")))})

    def get(self, name: str) -> SearchTemplate:
        """Look up by template id (``lexical.v1``) or arm name (``lexical``, newest version)."""
        if name in self.by_id:
            return self.by_id[name]
        if name in self.by_arm:
            return self.by_arm[name]
        raise TemplateNotFoundError(name, list(self.by_arm) + list(self.by_id))

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.by_arm.values())

    def __len__(self) -> int:
        return len(self.by_arm)


def push_templates(client: Elasticsearch, registry: TemplateRegistry) -> dict[str, str]:
    """Store every template as a mustache stored script (id = file stem). Idempotent:
    returns ``{id: "created" | "updated" | "unchanged"}``. Needs ``lang-mustache``."""
    from .es_client import node_capabilities

    caps = node_capabilities(client)
    if not caps.stored_templates:
        raise ConfigurationError(
            "this cluster has no lang-mustache module, so it cannot store search templates; "
            "the orchestrator renders them locally instead (templates.mode=local)"
        )
    result: dict[str, str] = {}
    for t in registry.by_id.values():
        try:
            current = client.get_script(id=t.id)["script"]["source"]
            status = "unchanged" if current == t.source else "updated"
        except NotFoundError:
            status = "created"
        if status != "unchanged":
            client.put_script(id=t.id, script={"lang": "mustache", "source": t.source})
        result[t.id] = status
        logger.info("template %s: %s", t.id, status)
    return result
