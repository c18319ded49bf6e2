"""LTR&R orchestrator for Elasticsearch: learn which retrieval arms to run, and how much."""

from .errors import (
    ArmExecutionError,
    AuthenticationError,
    ConfigurationError,
    ExpiredTokenError,
    ForgedTokenError,
    IngestError,
    InvalidFeedbackError,
    InvalidTokenError,
    MissingTokenError,
    OrchestratorError,
    QueryValidationError,
    RateLimitedError,
    ReplayedFeedbackError,
    SecurityError,
    ServiceUnavailableError,
    TemplateError,
    TemplateNotFoundError,
    TemplateParamsError,
    TemplateSyntaxError,
    TokenMismatchError,
    UnknownRequestError,
)
from .settings import OrchestratorSettings

__version__ = "0.1.0"


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    # The pipeline pulls in numpy, the Elasticsearch and Redis clients: import it on first use
    # so `import orchestrator` stays cheap for the CLI and Celery.
    if name in ("Orchestrator", "create_app"):
        from . import api, pipeline

        return pipeline.Orchestrator if name == "Orchestrator" else api.create_app
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")


__all__ = [
    "ArmExecutionError",
    "AuthenticationError",
    "ConfigurationError",
    "ExpiredTokenError",
    "ForgedTokenError",
    "IngestError",
    "InvalidFeedbackError",
    "InvalidTokenError",
    "MissingTokenError",
    "Orchestrator",
    "OrchestratorError",
    "OrchestratorSettings",
    "QueryValidationError",
    "RateLimitedError",
    "ReplayedFeedbackError",
    "SecurityError",
    "ServiceUnavailableError",
    "TemplateError",
    "TemplateNotFoundError",
    "TemplateParamsError",
    "TemplateSyntaxError",
    "TokenMismatchError",
    "UnknownRequestError",
    "create_app",
    "__version__",
]
