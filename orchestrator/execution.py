"""Run several arms in one ``_msearch`` round trip; map each response back to its arm.

Consumes :class:`ArmRequest` s, produces one :class:`ArmResult` or :class:`ArmFailure` per
request, in order. Local mode renders templates here (JSON-safe) and sends ``_msearch``;
stored mode sends ``_msearch/template`` with template ids (clusters with ``lang-mustache``).
A failing arm is an :class:`ArmFailure`, never a failed search; only a dead cluster raises.

What counts as a failed arm (dropped from merging, and given the failure observation of
:mod:`orchestrator.rewards` instead of being learned from its hits): an error response of
its ``_msearch`` item, ``timed_out: true`` (status 504; its hits are whatever a partial search
found, and learning from a truncated list would judge the arm's ranking by its time-out), and
any shard failure (status of the failure, a partial view of the catalog for the same reason). A dead node raises :class:`ServiceUnavailableError` at once (connection refused,
retried ``max_retries`` times), a hung one after ``request_timeout_s`` (time-outs are not
retried); with a :class:`~orchestrator.resilience.CircuitBreaker` repeated failures make later
searches fail at once until the node answers a probe.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from elasticsearch import ApiError, Elasticsearch, TransportError

from .domain import ArmFailure, ArmRequest, ArmResult, Hit
from .errors import ServiceUnavailableError, TemplateError
from .resilience import CircuitBreaker
from .templates import TemplateRegistry

logger = logging.getLogger(__name__)


def _root_cause(error: Any) -> str:
    if isinstance(error, dict):
        causes = error.get("root_cause") or []
        if causes and isinstance(causes[0], dict):
            return f"{causes[0].get('type')}: {causes[0].get('reason')}"
        return f"{error.get('type')}: {error.get('reason')}"
    return str(error)


def _partial_failure(r: dict[str, Any]) -> tuple[int, str] | None:
    """``(status, reason)`` when an answered item timed out or lost shards, else None."""
    if r.get("timed_out"):
        return 504, f"timed out (arm timeout); {len(r.get('hits', {}).get('hits', []))} partial hit(s) dropped"
    shards = r.get("_shards") or {}
    if shards.get("failed"):
        failures = shards.get("failures") or [{}]
        f = failures[0]
        return (int(f.get("status") or 500),
                f"{shards['failed']}/{shards.get('total', '?')} shard(s) failed: "
                f"{_root_cause(f.get('reason', {}))}")
    return None


class MultiSearch:
    """Execute arm requests against ``index`` in one round trip.

    Parameters
    ----------
    client:
        Elasticsearch client.
    index:
        Index or alias to search (the catalog alias).
    indices:
        Index roles to aliases (``{"memory": "ltrr-catalog-memory"}``): a template whose
        sidecar names an ``index`` role searches that alias in the same ``_msearch`` (each
        header names its index); a role missing here searches ``<index>-<role>``. Such a
        sidecar may also say how its hits map to catalog items: ``hit_id_field`` (the hit's
        candidate id), ``hit_source_field`` (its source) and ``hit_fields`` (``{name: {key:
        field}}``: extra objects built from hit fields, e.g. ``_memory``).
    registry:
        The arm templates.
    mode:
        ``local`` renders here and sends ``_msearch``; ``stored`` uses ``_msearch/template``.
    arm_timeout:
        Per-arm search timeout (Elasticsearch ``timeout`` in each body: a slow arm times out
        and is dropped rather than holding the whole request).
    request_timeout_s, max_retries:
        Client-side bound of the whole ``_msearch`` per attempt, and extra attempts after a
        connection error or time-out (None: the client's own setting).
    breaker:
        Fail fast while the node is known to be down (None: always try).
    """

    def __init__(self, client: Elasticsearch, *, index: str, registry: TemplateRegistry,
                 indices: Mapping[str, str] | None = None,
                 mode: Literal["local", "stored"] = "local", arm_timeout: str = "500ms",
                 request_timeout_s: float = 10.0, max_param_bytes: int | None = None,
                 max_retries: int | None = None, breaker: CircuitBreaker | None = None) -> None:
        self.client = client
        self.index = index
        self.indices = dict(indices or {})
        self.registry = registry
        self.mode = mode
        self.arm_timeout = arm_timeout
        self.request_timeout_s = request_timeout_s
        self.max_param_bytes = max_param_bytes
        self.max_retries = max_retries
        self.breaker = breaker

    def _url(self) -> str:
        try:
            return str(self.client.transport.node_pool.get().base_url)
        except Exception:  # noqa: BLE001 - only for the message
            return "the configured URL"

    def index_for(self, template_id: str) -> str:
        """The alias a template searches (its sidecar's ``index`` role, else the catalog)."""
        role = self.registry.get(template_id).meta.get("index")
        if not role:
            return self.index
        return self.indices.get(role) or f"{self.index}-{role}"

    def _hit(self, template_id: str, rank: int, h: dict[str, Any]) -> Hit:
        meta = self.registry.get(template_id).meta
        src = h.get("_source", {})
        if not meta.get("hit_id_field"):
            return Hit(h["_id"], float(h.get("_score") or 0.0), rank, src)
        source = dict(src.get(meta.get("hit_source_field") or "", {}) or {}) \
            if meta.get("hit_source_field") else dict(src)
        for name, fields in (meta.get("hit_fields") or {}).items():
            source[name] = {k: src.get(f) for k, f in fields.items()}
        return Hit(str(src.get(meta["hit_id_field"]) or h["_id"]), float(h.get("_score") or 0.0),
                   rank, source)

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
                    lines += [{"index": self.index_for(req.template_id)}, self.render(req)]
                else:
                    params = self.registry.get(req.template_id).validate_params(req.params)
                    lines += [{"index": self.index_for(req.template_id)},
                              {"id": req.template_id, "params": params}]
                sent.append(i)
            except TemplateError as exc:
                if raise_on_error:
                    raise
                out[i] = ArmFailure(req.arm, req.template_id, None, f"template: {exc}")
        if sent:
            breaker = self.breaker
            if breaker is not None and not breaker.allow():
                raise ServiceUnavailableError(
                    "Elasticsearch", self._url(),
                    f"scripts/services up (circuit open after repeated failures; next probe in "
                    f"{breaker.retry_in_s():.1f} s)")
            # A time-out is not retried (a hung node would only hold the search longer);
            # connection errors are, up to max_retries.
            opts: dict[str, Any] = {"opaque_id": opaque_id, "request_timeout": self.request_timeout_s,
                                    "retry_on_timeout": False}
            if self.max_retries is not None:
                opts["max_retries"] = self.max_retries
            es = self.client.options(**opts)
            try:
                if self.mode == "local":
                    resp = es.msearch(searches=lines)
                else:
                    resp = es.msearch_template(search_templates=lines)
            except ApiError as exc:
                if breaker is not None:
                    breaker.record_success()  # the node answered
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
                if breaker is not None:
                    breaker.record_failure()
                raise ServiceUnavailableError("Elasticsearch", self._url()) from exc
            if breaker is not None:
                breaker.record_success()
            for i, r in zip(sent, resp["responses"]):
                req = requests[i]
                if "error" in r:
                    reason = _root_cause(r["error"])
                    logger.warning("arm %s failed: %s", req.arm, reason)
                    out[i] = ArmFailure(req.arm, req.template_id, r.get("status"), reason)
                    continue
                partial = _partial_failure(r)
                if partial is not None:
                    logger.warning("arm %s dropped: %s", req.arm, partial[1])
                    out[i] = ArmFailure(req.arm, req.template_id, partial[0], partial[1])
                    continue
                hits = tuple(self._hit(req.template_id, rank, h)
                             for rank, h in enumerate(r["hits"]["hits"], start=1))
                out[i] = ArmResult(req.arm, req.template_id, hits, int(r.get("took", 0)))
        return out  # type: ignore[return-value]
