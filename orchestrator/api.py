"""HTTP interface: a FastAPI app over one :class:`~orchestrator.pipeline.Orchestrator`.

Consumes JSON requests (validated by pydantic at this edge only), produces JSON responses
and Prometheus metrics. Endpoints: ``POST /search``, ``POST /feedback``, ``GET /arms``,
``GET /explain/{request_id}``, ``GET /healthz``, ``GET /metrics``.

Every error body is ``{"error": <type>, "detail": <one-line message>}``. Status codes:

=====  =====================================================================================
400    ``QueryValidationError`` / ``TemplateParamsError`` / ``InvalidFeedbackError``
401    ``AuthenticationError``: API keys are configured and ``X-API-Key`` is missing or unknown
403    ``InvalidTokenError``: feedback without the search's ``token`` (``MissingTokenError``),
       or with one that is forged, expired, or for another request or client
404    unknown request id (never served, or its impression expired); unknown path
409    ``ReplayedFeedbackError``: this (request, item, action) was already counted
413    body larger than ``security.max_body_bytes``
422    malformed body (wrong types, unknown fields, out-of-range numbers, invalid Unicode)
429    ``RateLimitedError``, with ``Retry-After``
503    Elasticsearch or Redis down
500    only for a genuine bug (logged with its traceback)
=====  =====================================================================================

Security (see :mod:`orchestrator.security`): ``/search`` returns a signed ``token``; with
``security.require_token`` (default) ``/feedback`` needs it back. With ``security.api_keys``
set, every endpoint except ``/healthz`` and ``/metrics`` needs ``X-API-Key``; the key's
client name is the client id, otherwise the remote address is. Feedback (and, when
configured, search) is rate limited per client.

Observability: every response carries ``X-Request-ID`` (the search's request id for
``/search``, the one feedback refers to for ``/feedback``, else the caller's header or a new
one); one structured access-log record per request (logger ``orchestrator.api.access``);
Prometheus metrics at ``/metrics`` (names in :class:`_Metrics`).

Run: ``ltrr serve`` or ``uvicorn --factory orchestrator.api:create_app`` (settings from
``LTRR_*`` / ltrr.toml). Endpoints are plain ``def``: the Elasticsearch and Redis clients are
synchronous, so FastAPI runs them in its thread pool.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import (
    AuthenticationError,
    ExpiredTokenError,
    ForgedTokenError,
    InvalidFeedbackError,
    InvalidTokenError,
    MissingTokenError,
    OrchestratorError,
    QueryValidationError,
    RateLimitedError,
    ReplayedFeedbackError,
    ServiceUnavailableError,
    TemplateParamsError,
    TokenMismatchError,
    UnknownRequestError,
)
from .log import set_request_id
from .pipeline import Orchestrator, response_to_dict
from .security import ApiKeys, RateLimiter

logger = logging.getLogger(__name__)
access_logger = logging.getLogger(__name__ + ".access")


def _valid_unicode(value: str) -> str:
    # JSON may carry lone surrogates ("\ud800"); they are not text and cannot be encoded for
    # Elasticsearch or Redis, so they are refused here (422) rather than failing deep inside.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("string is not valid Unicode text (lone surrogate)") from exc
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]


class ContextBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hour: int | None = Field(None, ge=0, le=23)
    weekday: int | None = Field(None, ge=0, le=6, description="Monday = 0")
    device: Text | None = Field(None, max_length=32)
    locale: Text | None = Field(None, max_length=16)
    user_segment: Text | None = Field(None, max_length=64)
    user_id: Text | None = Field(None, max_length=128)
    session_id: Text | None = Field(None, max_length=128,
                                    description="Searches of one session form query chains")


class SearchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: Text = Field(..., max_length=4096)
    size: int = Field(10, ge=1, le=1000)
    context: ContextBody | None = None
    total_budget: int | None = Field(None, ge=1, le=1000)
    include_source: bool = True


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: Text = Field(..., min_length=1, max_length=64)
    item_id: Text = Field(..., min_length=1, max_length=512)
    action: Literal["click", "play", "like", "favorite", "skip"]
    #: The ``token`` of the search response (required when ``security.require_token``).
    token: str | None = Field(None, min_length=1, max_length=1024)


_ARM_LATENCY_BUCKETS = (.001, .002, .005, .01, .02, .03, .05, .075, .1, .15, .25, .5, 1, 2.5)
_CANDIDATE_BUCKETS = (0, 1, 5, 10, 20, 30, 50, 75, 100, 200, 500, 1000)


class _Metrics:
    """Prometheus metrics (one registry per app).

    ``ltrr_http_requests_total{endpoint,status}``, ``ltrr_http_request_seconds{endpoint}``,
    ``ltrr_search_latency_seconds``, ``ltrr_stage_latency_seconds{stage}``,
    ``ltrr_search_requests_total``, ``ltrr_arm_selected_total{arm}`` (selection share =
    selected / search requests), ``ltrr_arm_latency_seconds{arm}`` (ES ``took`` per arm),
    ``ltrr_arm_candidates{arm}`` (hits returned per arm), ``ltrr_arm_failures_total{arm}``,
    ``ltrr_feedback_total{action,duplicate}``, ``ltrr_arm_observations_total{arm}`` and
    ``ltrr_arm_reward_total{arm}`` (reward rate = reward / observations),
    ``ltrr_feedback_capped_total``, ``ltrr_security_refusals_total{reason}``.
    """

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("ltrr_http_requests", "HTTP requests", ["endpoint", "status"],
                                registry=r)
        self.http_latency = Histogram("ltrr_http_request_seconds", "HTTP request latency",
                                      ["endpoint"], registry=r,
                                      buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 10))
        self.latency = Histogram("ltrr_search_latency_seconds", "End-to-end /search latency",
                                 registry=r,
                                 buckets=(.005, .01, .02, .03, .05, .075, .1, .15, .25, .5, 1, 2.5))
        self.stage = Histogram("ltrr_stage_latency_seconds", "Per-stage latency of /search",
                               ["stage"], registry=r,
                               buckets=(.0001, .0005, .001, .002, .005, .01, .025, .05, .1, .25, 1))
        self.searches = Counter("ltrr_search_requests", "Searches served (denominator of the "
                                "selection share)", registry=r)
        self.arm_selected = Counter("ltrr_arm_selected", "Times an arm was chosen", ["arm"],
                                    registry=r)
        self.arm_latency = Histogram("ltrr_arm_latency_seconds",
                                     "Elasticsearch 'took' of each arm's search", ["arm"],
                                     registry=r, buckets=_ARM_LATENCY_BUCKETS)
        self.arm_candidates = Histogram("ltrr_arm_candidates", "Candidates returned per arm",
                                        ["arm"], registry=r, buckets=_CANDIDATE_BUCKETS)
        self.arm_failures = Counter("ltrr_arm_failures", "Arms that failed inside _msearch",
                                    ["arm"], registry=r)
        self.feedback = Counter("ltrr_feedback", "Feedback events", ["action", "duplicate"],
                                registry=r)
        self.observations = Counter("ltrr_arm_observations",
                                    "Reward observations applied per arm", ["arm"], registry=r)
        self.reward = Counter("ltrr_arm_reward", "Sum of rewards applied per arm", ["arm"],
                              registry=r)
        self.capped = Counter("ltrr_feedback_capped", "Feedback acknowledged but not applied "
                              "(client over its influence cap)", registry=r)
        self.refusals = Counter("ltrr_security_refusals", "Requests refused by security checks",
                                ["reason"], registry=r)


_ERRORS: tuple[tuple[type[Exception], int], ...] = (
    (UnknownRequestError, 404),
    (ServiceUnavailableError, 503),
    (QueryValidationError, 400),
    (TemplateParamsError, 400),
    (InvalidFeedbackError, 400),
    (AuthenticationError, 401),
    (InvalidTokenError, 403),
    (ReplayedFeedbackError, 409),
    (RateLimitedError, 429),
)
_REFUSAL_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (AuthenticationError, "api_key"),
    (MissingTokenError, "token_missing"),
    (ForgedTokenError, "token_forged"),
    (ExpiredTokenError, "token_expired"),
    (TokenMismatchError, "token_mismatch"),
    (ReplayedFeedbackError, "replay"),
    (RateLimitedError, "rate_limited"),
)
_KNOWN_PATHS = ("/search", "/feedback", "/arms", "/healthz", "/metrics")
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _endpoint(request: Request) -> str:
    """Bounded metric label: the route template, never the raw path."""
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return str(path)
    return request.url.path if request.url.path in _KNOWN_PATHS else "unmatched"


def _client_id(request: Request) -> str:
    return request.app.state.client_id(request)  # type: ignore[no-any-return]


#: The caller's client id (API key's client name or remote address); 401 on a bad key.
ClientId = Annotated[str, Depends(_client_id)]


def _bind_request_id(request: Request, request_id: Any) -> None:
    """Make ``request_id`` the id of this HTTP request (logs, ``X-Request-ID``) if it is a
    safe token; hostile ids (newlines, huge) are ignored, never echoed into headers."""
    if isinstance(request_id, str) and _REQUEST_ID_RE.fullmatch(request_id):
        request.state.request_id = request_id
        set_request_id(request_id)


def _error(exc: Exception, status: int, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": type(exc).__name__, "detail": str(exc), **extra},
                        status_code=status)


def create_app(orchestrator: Orchestrator | None = None, *, settings: Any = None) -> FastAPI:
    """The app. Without ``orchestrator`` one is built from ``settings`` (default:
    ``OrchestratorSettings()``) on first use, so the app starts even while a service is down
    (``/healthz`` then says which). ``settings.security`` configures tokens, API keys and
    limits (see the module docstring)."""
    from .settings import OrchestratorSettings, SecuritySettings

    if settings is None:
        settings = OrchestratorSettings()
    sec: SecuritySettings = getattr(settings, "security", None) or SecuritySettings()
    app = FastAPI(title="LTR&R orchestrator", version="0.1.0")
    metrics = _Metrics()
    keys = ApiKeys(sec.api_keys)
    state: dict[str, Any] = {"orch": orchestrator, "limiter": None}

    def orch() -> Orchestrator:
        if state["orch"] is None:
            state["orch"] = Orchestrator.from_settings(settings)
        return state["orch"]  # type: ignore[no-any-return]

    def limiter() -> RateLimiter:
        if state["limiter"] is None:
            o = orch()
            state["limiter"] = RateLimiter(o.redis, prefix=o.store.prefix)
        return state["limiter"]  # type: ignore[no-any-return]

    app.state.get_orchestrator = orch
    app.state.metrics = metrics
    app.state.security = sec

    def client_id(request: Request) -> str:
        """The caller: the API key's client name, else the remote address."""
        if keys.enabled:
            return keys.authenticate(request.headers.get("x-api-key"))
        if sec.client_ip_header:
            forwarded = request.headers.get(sec.client_ip_header, "")
            first = forwarded.split(",")[0].strip()
            if first:
                return first[:64]
        return request.client.host if request.client else "unknown"

    app.state.client_id = client_id

    # -- request id, access log, request metrics --------------------------------------------
    @app.middleware("http")
    async def _observe(request: Request, call_next: Any) -> Response:
        given = request.headers.get("x-request-id", "")
        rid = given if _REQUEST_ID_RE.fullmatch(given) else uuid.uuid4().hex
        set_request_id(rid)
        t0 = time.perf_counter()
        length = request.headers.get("content-length", "")
        if length and (not length.isdigit() or int(length) > sec.max_body_bytes):
            metrics.requests.labels(_endpoint(request), "413").inc()
            return JSONResponse({"error": "RequestTooLarge",
                                 "detail": f"request body over {sec.max_body_bytes} bytes"},
                                status_code=413, headers={"X-Request-ID": rid})
        try:
            response = await call_next(request)
        except Exception:  # a bug: count it; the 500 handler logs and answers
            metrics.requests.labels(_endpoint(request), "500").inc()
            raise
        status = response.status_code
        elapsed = time.perf_counter() - t0
        endpoint = _endpoint(request)
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.http_latency.labels(endpoint).observe(elapsed)
        final_rid = getattr(request.state, "request_id", None) or rid
        response.headers["X-Request-ID"] = final_rid
        set_request_id(final_rid)
        access_logger.info("%s %s %d %.1fms", request.method, endpoint, status, elapsed * 1000,
                           extra={"method": request.method, "endpoint": endpoint,
                                  "status": status, "duration_ms": round(elapsed * 1000, 3),
                                  "client": request.client.host if request.client else None})
        return response

    # -- errors --------------------------------------------------------------------------------
    @app.exception_handler(OrchestratorError)
    def _orchestrator_error(request: Request, exc: OrchestratorError) -> JSONResponse:
        _bind_request_id(request, getattr(request.state, "request_id", None))
        status = next((code for cls, code in _ERRORS if isinstance(exc, cls)), 500)
        reason = next((r for cls, r in _REFUSAL_REASONS if isinstance(exc, cls)), None)
        if reason is not None:
            metrics.refusals.labels(reason).inc()
            logger.warning("refused (%s): %s", reason, exc,
                           extra={"refused": reason, "endpoint": _endpoint(request)})
        if status == 500:
            logger.error("unhandled orchestrator error", exc_info=exc)
        if isinstance(exc, RateLimitedError):
            resp = _error(exc, status, retry_after_s=exc.retry_after_s)
            resp.headers["Retry-After"] = str(exc.retry_after_s)
            return resp
        if isinstance(exc, ReplayedFeedbackError):
            return _error(exc, status, duplicate=True)
        return _error(exc, status)

    @app.exception_handler(RequestValidationError)
    def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")),
                   "type": str(e.get("type", ""))} for e in exc.errors()]
        detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors[:5])
        return JSONResponse({"error": "RequestValidationError",
                             "detail": detail or "invalid request", "errors": errors[:20]},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": "HTTPException", "detail": str(exc.detail)},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    def _bug(request: Request, exc: Exception) -> JSONResponse:
        # Reached only by genuine bugs: every expected failure has a typed error above.
        logger.error("unhandled error on %s", _endpoint(request), exc_info=exc)
        return JSONResponse({"error": "InternalError",
                             "detail": "internal error; see the server log for this request id"},
                            status_code=500)

    # -- endpoints -------------------------------------------------------------------------------
    @app.post("/search")
    def search(body: SearchBody, client: ClientId, request: Request) -> JSONResponse:
        limiter().hit("search", client, limit=sec.search_rate_limit, window_s=sec.rate_window_s)
        t0 = time.perf_counter()
        ctx = body.context.model_dump(exclude_none=True) if body.context else None
        resp = orch().search(body.query, context=ctx, size=body.size,
                             total_budget=body.total_budget, client_id=client)
        metrics.latency.observe(time.perf_counter() - t0)
        for stage in ("qu", "select", "encode", "build", "es", "merge", "rescore", "log"):
            if stage in resp.timings_ms:
                metrics.stage.labels(stage).observe(resp.timings_ms[stage] / 1000)
        metrics.searches.inc()
        for c in resp.decision.choices:
            metrics.arm_selected.labels(c.template_id).inc()
        for tid, st in resp.arm_stats.items():
            metrics.arm_latency.labels(tid).observe(st["took_ms"] / 1000)
            metrics.arm_candidates.labels(tid).observe(st["candidates"])
        for f in resp.failures:
            metrics.arm_failures.labels(f.template_id).inc()
        out = response_to_dict(resp, include_source=body.include_source)
        out["token"] = resp.token
        _bind_request_id(request, resp.request_id)
        return JSONResponse(out)

    @app.post("/feedback")
    def feedback(body: FeedbackBody, client: ClientId, request: Request) -> JSONResponse:
        _bind_request_id(request, body.request_id)
        limiter().hit("feedback", client, limit=sec.feedback_rate_limit,
                      window_s=sec.rate_window_s)
        if sec.require_token and body.token is None:
            raise MissingTokenError("feedback needs the 'token' returned by /search "
                                    "for this request")
        r = orch().feedback(body.request_id, body.item_id, body.action, token=body.token,
                            client_id=client)
        metrics.feedback.labels(r.action, str(r.duplicate).lower()).inc()
        if r.duplicate:
            raise ReplayedFeedbackError(r.request_id, r.item_id, r.action)
        if r.capped:
            metrics.capped.inc()
        else:
            for tid, reward in r.rewards.items():
                metrics.observations.labels(tid).inc()
                # rewards can be negative now (latency cost): the counter sums the positive part
                metrics.reward.labels(tid).inc(max(reward, 0.0))
        return JSONResponse(
            {"request_id": r.request_id, "item_id": r.item_id, "action": r.action,
             "duplicate": r.duplicate, "capped": r.capped, "position": r.position,
             "weight": r.weight, "rewards": r.rewards})

    @app.get("/arms")
    def arms(client: ClientId) -> dict[str, Any]:
        return {"arms": orch().arms()}

    @app.get("/explain/{request_id}")
    def explain(request_id: Annotated[str, AfterValidator(_valid_unicode)],
                client: ClientId, request: Request) -> dict[str, Any]:
        _bind_request_id(request, request_id)
        if len(request_id) > 64:
            raise UnknownRequestError(request_id[:64] + "...")
        return orch().explain(request_id)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        built = state["orch"]
        try:
            status = orch().health()
        except ServiceUnavailableError:  # no orchestrator could be built
            status = _bare_health(settings)
        except Exception as exc:  # e.g. a node answering 401/404: report it, never 500
            logger.warning("health check failed: %s", exc)
            status = (_bare_health(settings, es=built.es, redis=built.redis)
                      if built is not None else _bare_health(settings))
        ok = all(v == "ok" for v in status.values())
        overall = "ok" if ok else "degraded" if "ok" in status.values() else "unavailable"
        return JSONResponse({"status": overall, **status},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _bare_health(settings: Any, *, es: Any = None, redis: Any = None) -> dict[str, str]:
    """Check Elasticsearch and Redis each on its own (one service down must not hide the state
    of the other), with the given clients or ones built from ``settings``. Any failure,
    including an unexpected answer, is reported as a one-line string."""
    from .es_client import build_client
    from .es_client import check_available as es_check
    from .redis_client import build_redis
    from .redis_client import check_available as redis_check

    out: dict[str, str] = {}
    checks = (
        ("elasticsearch", lambda: es_check(es if es is not None else build_client(settings.es),
                                           settings.es.url)),
        ("redis", lambda: redis_check(redis if redis is not None else build_redis(settings.redis),
                                      settings.redis.url)),
    )
    for name, fn in checks:
        try:
            fn()
            out[name] = "ok"
        except ServiceUnavailableError as exc:
            out[name] = str(exc)
        except Exception as exc:  # an answer that is not health: still one line, never a 500
            out[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    return out


def create_served_app() -> FastAPI:
    """Entry point of ``ltrr serve`` (uvicorn factory): configures JSON logging from
    ``settings.log`` in each server process, then builds the app."""
    from .log import configure_logging
    from .settings import OrchestratorSettings

    settings = OrchestratorSettings()
    configure_logging(settings.log.level, json_lines=settings.log.json_lines)
    return create_app(settings=settings)
