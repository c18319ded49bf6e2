"""Structured logging for the executables: JSON lines carrying the request id.

Library code only ever does ``logger = logging.getLogger(__name__)`` with lazy ``%s``
arguments; nothing here runs on import. Entry points (``ltrr serve``, the Celery worker) call
:func:`configure_logging` once. The request id travels in a context variable: the HTTP
middleware sets it per request (``X-Request-ID`` header or a fresh id), the pipeline replaces
it with the search's request id (or the request id feedback refers to), and every record
logged meanwhile carries it, whatever logger emitted it.

A record looks like::

    {"ts": "2026-11-25T13:40:01.123Z", "level": "INFO", "logger": "orchestrator.pipeline",
     "message": "search ...", "request_id": "5b1e...", "arms": [...]}

Fields passed with ``extra={...}`` appear as top-level keys.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import json
import logging
import sys
from typing import Any

#: The request id of the work being done in this context (None outside requests).
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "ltrr_request_id", default=None
)

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "request_id", "taskName",
}


def set_request_id(request_id: str | None) -> contextvars.Token[str | None]:
    """Bind ``request_id`` to the current context (returns the token to reset it)."""
    return request_id_var.set(request_id)


def get_request_id() -> str | None:
    return request_id_var.get()


class RequestIdFilter(logging.Filter):
    """Puts the context's request id on every record (``record.request_id``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id") or record.request_id is None:  # type: ignore[attr-defined]
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ms), level, logger, message, request_id, extras,
    and ``exc_info`` as a string when present."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def configure_logging(level: str | int = "INFO", *, json_lines: bool = True,
                      stream: Any = None) -> logging.Handler:
    """Route the root logger to one handler on ``stream`` (default stderr): JSON lines, or
    plain text with the request id. Replaces every handler of the root logger (so calling
    it twice, or after ``basicConfig``, leaves exactly one). Call it from entry points only.

    Returns
    -------
    logging.Handler
        The installed handler.
    """
    root = logging.getLogger()
    for h in list(root.handlers):  # the entry point owns the root logger: one handler
        root.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(_TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    # Uvicorn's own loggers propagate to the root (one format for everything).
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    return handler


__all__ = ["JsonFormatter", "RequestIdFilter", "configure_logging", "get_request_id",
           "request_id_var", "set_request_id"]
