"""HTTP interface: a FastAPI app over one :class:`~orchestrator.pipeline.Orchestrator`.

Consumes JSON requests (validated by pydantic at this edge only), produces JSON responses
and Prometheus metrics. Endpoints: ``POST /search``, ``POST /feedback``, ``GET /arms``,
``GET /explain/{request_id}``, ``GET /healthz``, ``GET /metrics``.

Status codes: 422 malformed body (pydantic); 400 ``QueryValidationError`` /
``TemplateParamsError`` / ``InvalidFeedbackError`` (the message says what is wrong); 404
unknown request id; 503 Elasticsearch or Redis down. Every error body is
``{"error": <type>, "detail": <one-line message>}``.

Run: ``uvicorn --factory orchestrator.api:create_app`` (settings from ``LTRR_*`` / ltrr.toml).
Endpoints are plain ``def``: the Elasticsearch and Redis clients are synchronous, so FastAPI
runs them in its thread pool.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field

from .errors import (
    InvalidFeedbackError,
    OrchestratorError,
    QueryValidationError,
    ServiceUnavailableError,
    TemplateParamsError,
    UnknownRequestError,
)
from .pipeline import Orchestrator, response_to_dict

logger = logging.getLogger(__name__)


class ContextBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hour: int | None = Field(None, ge=0, le=23)
    weekday: int | None = Field(None, ge=0, le=6, description="Monday = 0")
    device: str | None = Field(None, max_length=32)
    locale: str | None = Field(None, max_length=16)
    user_segment: str | None = Field(None, max_length=64)
    user_id: str | None = Field(None, max_length=128)


class SearchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(..., max_length=4096)
    size: int = Field(10, ge=1, le=1000)
    context: ContextBody | None = None
    total_budget: int | None = Field(None, ge=1, le=1000)
    include_source: bool = True


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(..., min_length=1, max_length=64)
    item_id: str = Field(..., min_length=1, max_length=512)
    action: Literal["click", "play", "like", "favorite", "skip"]


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ltrr_http_requests", "HTTP requests", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("ltrr_search_latency_seconds", "End-to-end /search latency",
                                 registry=self.registry,
                                 buckets=(.005, .01, .02, .03, .05, .075, .1, .15, .25, .5, 1, 2.5))
        self.stage = Histogram("ltrr_stage_latency_seconds", "Per-stage latency of /search",
                               ["stage"], registry=self.registry,
                               buckets=(.0001, .0005, .001, .002, .005, .01, .025, .05, .1, .25, 1))
        self.arm_selected = Counter("ltrr_arm_selected", "Times an arm was chosen", ["arm"],
                                    registry=self.registry)
        self.arm_failures = Counter("ltrr_arm_failures", "Arms that failed inside _msearch",
                                    ["arm"], registry=self.registry)
        self.feedback = Counter("ltrr_feedback", "Feedback events", ["action", "duplicate"],
                                registry=self.registry)


_ERRORS: tuple[tuple[type[Exception], int], ...] = (
    (UnknownRequestError, 404),
    (ServiceUnavailableError, 503),
    (QueryValidationError, 400),
    (TemplateParamsError, 400),
    (InvalidFeedbackError, 400),
)


def create_app(orchestrator: Orchestrator | None = None, *, settings: Any = None) -> FastAPI:
    """The app. Without ``orchestrator`` one is built from ``settings`` (default:
    ``OrchestratorSettings()``) on first use, so the app starts even while a service is down
    (``/healthz`` then says which)."""
    app = FastAPI(title="LTR&R orchestrator", version="0.1.0")
    metrics = _Metrics()
    state: dict[str, Orchestrator | None] = {"orch": orchestrator}

    def orch() -> Orchestrator:
        if state["orch"] is None:
            from .settings import OrchestratorSettings

            state["orch"] = Orchestrator.from_settings(settings or OrchestratorSettings())
        return state["orch"]  # type: ignore[return-value]

    app.state.get_orchestrator = orch
    app.state.metrics = metrics

    @app.exception_handler(OrchestratorError)
    def _orchestrator_error(request: Request, exc: OrchestratorError) -> JSONResponse:
        status = next((code for cls, code in _ERRORS if isinstance(exc, cls)), 500)
        if status == 500:
            logger.exception("unhandled orchestrator error", exc_info=exc)
        metrics.requests.labels(request.url.path.split("/")[1] or "/", str(status)).inc()
        return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=status)

    @app.post("/search")
    def search(body: SearchBody) -> dict[str, Any]:
        t0 = time.perf_counter()
        ctx = body.context.model_dump(exclude_none=True) if body.context else None
        resp = orch().search(body.query, context=ctx, size=body.size, total_budget=body.total_budget)
        metrics.latency.observe(time.perf_counter() - t0)
        for stage in ("qu", "select", "encode", "build", "es", "merge", "rescore", "log"):
            if stage in resp.timings_ms:
                metrics.stage.labels(stage).observe(resp.timings_ms[stage] / 1000)
        for c in resp.decision.choices:
            metrics.arm_selected.labels(c.template_id).inc()
        for f in resp.failures:
            metrics.arm_failures.labels(f.template_id).inc()
        metrics.requests.labels("search", "200").inc()
        return response_to_dict(resp, include_source=body.include_source)

    @app.post("/feedback")
    def feedback(body: FeedbackBody) -> dict[str, Any]:
        r = orch().feedback(body.request_id, body.item_id, body.action)
        metrics.feedback.labels(r.action, str(r.duplicate).lower()).inc()
        metrics.requests.labels("feedback", "200").inc()
        return {"request_id": r.request_id, "item_id": r.item_id, "action": r.action,
                "duplicate": r.duplicate, "position": r.position, "weight": r.weight,
                "rewards": r.rewards}

    @app.get("/arms")
    def arms() -> dict[str, Any]:
        return {"arms": orch().arms()}

    @app.get("/explain/{request_id}")
    def explain(request_id: str) -> dict[str, Any]:
        return orch().explain(request_id)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        try:
            status = orch().health()
        except ServiceUnavailableError as exc:
            return JSONResponse({"status": "unavailable", "detail": str(exc)}, status_code=503)
        ok = all(v == "ok" for v in status.values())
        return JSONResponse({"status": "ok" if ok else "degraded", **status},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
