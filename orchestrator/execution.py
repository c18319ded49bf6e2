"""Run several arms in one ``_msearch`` round trip; map each response back to its arm.

Consumes :class:`ArmRequest` s, produces one :class:`ArmResult` or :class:`ArmFailure` per
request, in order. Local mode renders templates here (JSON-safe) and sends ``_msearch``;
stored mode sends ``_msearch/template`` with template ids (clusters with ``lang-mustache``).
A failing arm is an :class:`ArmFailure`, never a failed search; only a dead cluster raises.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

from elasticsearch import ApiError, Elasticsearch, TransportError

from .domain import ArmFailure, ArmRequest, ArmResult, Hit
from .errors import ServiceUnavailableError, TemplateError
from .templates import TemplateRegistry

logger = logging.getLogger(__name__)


def _root_cause(error: Any) -> str:
    if isinstance(error, dict):
        causes = error.get("root_cause") or []
        if causes and isinstance(causes[0], dict):
            return f"{causes[0].get('type')}: {causes[0].get('reason')}"
        return f"{error.get('type')}: {error.get('reason')}"
    return str(error)


class MultiSearch:
    """Execute arm requests against ``index`` in one round trip.

    Parameters
    ----------
    client:
        Elasticsearch client.
    index:
        Index or alias to search (the catalog alias).
    registry:
        The arm templates.
    mode:
        ``local`` renders here and sends ``_msearch``; ``stored`` uses ``_msearch/template``.
    arm_timeout:
        Per-arm search timeout (Elasticsearch ``timeout`` in each body: partial results
        rather than a slow arm holding the whole request).
    """

    def __init__(self, client: Elasticsearch, *, index: str, registry: TemplateRegistry,
                 mode: Literal["local", "stored"] = "local", arm_timeout: str = "500ms",
                 request_timeout_s: float = 10.0, max_param_bytes: int | None = None) -> None:
        self.client = client
        self.index = index
        self.registry = registry
        self.mode = mode
        self.arm_timeout = arm_timeout
        self.request_timeout_s = request_timeout_s
        self.max_param_bytes = max_param_bytes

    def render(self, request: ArmRequest) -> dict[str, Any]:
        body = self.registry.get(request.template_id).render(request.params, max_bytes=self.max_param_bytes)
        body.setdefault("timeout", self.arm_timeout)
        return body

    def execute(self, requests: Sequence[ArmRequest], *, opaque_id: str | None = None,
                raise_on_error: bool = False) -> list[ArmResult | ArmFailure]:
        out: list[ArmResult | ArmFailure | None] = [None] * len(requests)
        lines: list[dict[str, Any]] = []
        sent: list[int] = []
        for i, req in enumerate(requests):
            try:
                if self.mode == "local":
                    lines += [{"index": self.index}, self.render(req)]
                else:
                    params = self.registry.get(req.template_id).validate_params(req.params)
                    lines += [{"index": self.index}, {"id": req.template_id, "params": params}]
                sent.append(i)
            except TemplateError as exc:
                if raise_on_error:
                    raise
                out[i] = ArmFailure(req.arm, req.template_id, None, f"template: {exc}")
        if sent:
            es = self.client.options(opaque_id=opaque_id, request_timeout=self.request_timeout_s)
            try:
                if self.mode == "local":
                    resp = es.msearch(searches=lines)
                else:
                    resp = es.msearch_template(search_templates=lines)
            except ApiError as exc:
                if raise_on_error:
                    raise
                if exc.meta.status == 400 and len(sent) > 1:
                    # Elasticsearch parses every body of an _msearch up front, so one arm with a
                    # malformed query fails them all. Isolate it: run each arm on its own
                    # (only on this failure path) so the healthy arms still answer.
                    logger.warning("_msearch refused (%s); retrying arms one by one", exc)
                    for i in sent:
                        out[i] = self.execute([requests[i]], opaque_id=opaque_id)[0]
                    return out  # type: ignore[return-value]
                # The whole _msearch was refused (e.g. the alias is missing): every arm failed.
                body = exc.body.get("error") if isinstance(exc.body, dict) else exc.body
                for i in sent:
                    out[i] = ArmFailure(requests[i].arm, requests[i].template_id,
                                        exc.meta.status, _root_cause(body))
                return out  # type: ignore[return-value]
            except (TransportError, ConnectionError) as exc:
                raise ServiceUnavailableError("Elasticsearch", str(self.client.transport.node_pool.get().base_url)) from exc
            for i, r in zip(sent, resp["responses"]):
                req = requests[i]
                if "error" in r:
                    reason = _root_cause(r["error"])
                    logger.warning("arm %s failed: %s", req.arm, reason)
                    out[i] = ArmFailure(req.arm, req.template_id, r.get("status"), reason)
                    continue
                hits = tuple(
                    Hit(h["_id"], float(h.get("_score") or 0.0), rank, h.get("_source", {}))
                    for rank, h in enumerate(r["hits"]["hits"], start=1)
                )
                out[i] = ArmResult(req.arm, req.template_id, hits, int(r.get("took", 0)))
        return out  # type: ignore[return-value]
