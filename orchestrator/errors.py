"""Errors raised by the orchestrator, one tree so callers can catch what they mean.

::

    OrchestratorError
     ├── ConfigurationError
     ├── ServiceUnavailableError        (Elasticsearch or Redis unreachable; says what to run)
     ├── TemplateError
     │    ├── TemplateNotFoundError     (also a KeyError)
     │    ├── TemplateSyntaxError
     │    └── TemplateParamsError       (also a ValueError: bad or oversized parameters)
     ├── QueryValidationError           (also a ValueError: empty / oversized / malformed query)
     ├── ArmExecutionError              (one arm failed inside an _msearch)
     ├── IngestError
     └── SecurityError                  (HTTP status in brackets; see orchestrator.security)
          ├── AuthenticationError       [401] missing or unknown API key
          ├── InvalidTokenError         [403] request token refused
          │    ├── MissingTokenError    feedback without the search's token
          │    ├── ForgedTokenError     malformed, or the signature does not verify
          │    ├── ExpiredTokenError    past its expiry
          │    └── TokenMismatchError   issued for another request or another client
          ├── ReplayedFeedbackError     [409] this (request, item, action) was already counted
          └── RateLimitedError          [429] too many requests from one client (retry_after_s)

Every error that carries data pickles (``__reduce__``) because Celery moves them between
processes.
"""

from __future__ import annotations

from typing import Any


class OrchestratorError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigurationError(OrchestratorError):
    pass


class ServiceUnavailableError(OrchestratorError):
    """A backing service is down. ``str(err)`` is a one-line message naming the fix."""

    def __init__(self, service: str, url: str, hint: str = "scripts/services up") -> None:
        self.service, self.url, self.hint = service, url, hint
        super().__init__(f"{service} is not reachable at {url}; start it with: {hint}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.service, self.url, self.hint))


class TemplateError(OrchestratorError):
    pass


class TemplateNotFoundError(KeyError, TemplateError):
    def __init__(self, name: str, known: list[str]) -> None:
        self.name, self.known = name, known
        super().__init__(f"Unknown template {name!r}. Known templates: {sorted(known)}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.known))


class TemplateSyntaxError(TemplateError):
    pass


class TemplateParamsError(ValueError, TemplateError):
    pass


class QueryValidationError(ValueError, OrchestratorError):
    pass


class ArmExecutionError(OrchestratorError):
    def __init__(self, arm: str, status: int | None, reason: str) -> None:
        self.arm, self.status, self.reason = arm, status, reason
        super().__init__(f"arm {arm!r} failed (status {status}): {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.arm, self.status, self.reason))


class IngestError(OrchestratorError):
    pass


class UnknownRequestError(KeyError, OrchestratorError):
    """Feedback or explain for a request id that was never served or whose impression expired
    (HTTP 404)."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        super().__init__(
            f"Unknown request id {request_id!r}: never served, or its impression expired"
        )

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.request_id,))


class InvalidFeedbackError(ValueError, OrchestratorError):
    """Feedback that cannot be counted: unknown action, or an item the request did not show
    (HTTP 400)."""


class NotFittedError(ValueError, AttributeError, OrchestratorError):
    """A learned component was used before it was fitted or loaded."""


class StateVersionError(ConfigurationError):
    """Persisted state (bandit snapshot, rescorer model) has a schema version this code does
    not read."""


class SecurityError(OrchestratorError):
    """Base of the refusals of :mod:`orchestrator.security` (each maps to one HTTP status)."""


class AuthenticationError(SecurityError):
    """No API key, or one that is not configured (HTTP 401)."""


class InvalidTokenError(SecurityError):
    """A request token was refused (HTTP 403)."""


class MissingTokenError(InvalidTokenError):
    pass


class ForgedTokenError(InvalidTokenError):
    pass


class ExpiredTokenError(InvalidTokenError):
    pass


class TokenMismatchError(InvalidTokenError):
    pass


class ReplayedFeedbackError(SecurityError):
    """The same (request, item, action) was already counted (HTTP 409): a replay changes
    nothing, and says so instead of pretending to succeed."""

    def __init__(self, request_id: str, item_id: str, action: str) -> None:
        self.request_id, self.item_id, self.action = request_id, item_id, action
        super().__init__(f"feedback {action!r} on {item_id!r} for request {request_id!r} was "
                         "already counted; a replay is not counted again")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.request_id, self.item_id, self.action))


class RateLimitedError(SecurityError):
    """More than ``limit`` requests to ``bucket`` in ``window_s`` seconds (HTTP 429 with
    ``Retry-After: retry_after_s``)."""

    def __init__(self, bucket: str, limit: int, window_s: int, retry_after_s: int) -> None:
        self.bucket, self.limit, self.window_s = bucket, limit, window_s
        self.retry_after_s = retry_after_s
        super().__init__(f"rate limit of {limit} {bucket} requests per {window_s}s exceeded; "
                         f"retry after {retry_after_s}s")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.bucket, self.limit, self.window_s, self.retry_after_s))
