"""Build the Elasticsearch client (the only place one is built) and ask the node what it has.

The Maven integ-test zip is the server only: no ``lang-mustache`` (stored search templates),
``lang-painless``, ``mapper-extras`` or ``analysis-common``, and not even the root ``GET /``
endpoint (it lives in a module in 9.x). So nothing here calls ``client.info()``; health and
capabilities come from ``_cluster/health`` and ``_nodes/plugins``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from elasticsearch import Elasticsearch, TransportError
from elasticsearch.serializer import JsonSerializer, NdjsonSerializer

from .errors import ServiceUnavailableError
from .settings import EsSettings

_ORJSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


class _OrjsonCoding:
    """orjson for request and response bodies (the client's own ``OrjsonSerializer`` covers
    ``application/json`` only; searches and bulks are NDJSON). Anything orjson refuses
    (integers past 64 bits, NaN in a response) falls back to the standard library, so a body
    the default serializer accepts is never refused."""

    def json_dumps(self, data: Any) -> bytes:
        try:
            return orjson.dumps(data, default=self.default, option=_ORJSON_OPTIONS)  # type: ignore[attr-defined]
        except TypeError:
            return super().json_dumps(data)  # type: ignore[misc]

    def json_loads(self, data: bytes) -> Any:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            return super().json_loads(data)  # type: ignore[misc]


class OrjsonJsonSerializer(_OrjsonCoding, JsonSerializer):
    pass


class OrjsonNdjsonSerializer(_OrjsonCoding, NdjsonSerializer):
    pass


#: Passed to every client: the client copies them to the compatibility-mode mimetypes the
#: 9.x client sends and receives.
SERIALIZERS = {JsonSerializer.mimetype: OrjsonJsonSerializer(),
               NdjsonSerializer.mimetype: OrjsonNdjsonSerializer()}


def build_client(settings: EsSettings) -> Elasticsearch:
    """Return a client for ``settings.url``; auth is taken from the settings when given."""
    kwargs: dict[str, object] = {
        "request_timeout": settings.request_timeout_s,
        "verify_certs": settings.verify_certs,
        "max_retries": 2,
        "retry_on_timeout": True,
        "serializers": SERIALIZERS,
    }
    if settings.api_key:
        kwargs["api_key"] = settings.api_key
    elif settings.username:
        kwargs["basic_auth"] = (settings.username, settings.password or "")
    return Elasticsearch(settings.url, **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class NodeCapabilities:
    """What the cluster can do, read from ``GET _nodes/plugins``."""

    version: str
    modules: frozenset[str]
    plugins: frozenset[str]

    @property
    def stored_templates(self) -> bool:
        return "lang-mustache" in self.modules

    @property
    def painless(self) -> bool:
        return "lang-painless" in self.modules

    @property
    def rank_features(self) -> bool:
        return "mapper-extras" in self.modules

    @property
    def analysis_common(self) -> bool:
        return "analysis-common" in self.modules


def check_available(client: Elasticsearch, url: str) -> None:
    """Raise :class:`ServiceUnavailableError` (one line, names the fix) if the node is down."""
    try:
        client.options(request_timeout=5, max_retries=0).cluster.health()
    except (TransportError, ConnectionError) as exc:
        raise ServiceUnavailableError("Elasticsearch", url) from exc


def node_capabilities(client: Elasticsearch) -> NodeCapabilities:
    """Intersect the modules and plugins of every node: a feature counts only if all have it."""
    try:
        resp = client.nodes.info(metric="plugins")
    except (TransportError, ConnectionError) as exc:
        raise ServiceUnavailableError("Elasticsearch", "the configured URL") from exc
    nodes = list(resp["nodes"].values())
    modules: set[str] | None = None
    plugins: set[str] | None = None
    for node in nodes:
        m = {x["name"] for x in node.get("modules", [])}
        p = {x["name"] for x in node.get("plugins", [])}
        modules = m if modules is None else modules & m
        plugins = p if plugins is None else plugins & p
    version = nodes[0].get("version", "unknown") if nodes else "unknown"
    return NodeCapabilities(version, frozenset(modules or ()), frozenset(plugins or ()))
