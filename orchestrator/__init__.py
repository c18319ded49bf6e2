"""LTR&R orchestrator for Elasticsearch: learn which retrieval arms to run, and how much."""

from .errors import (
    ArmExecutionError,
    ConfigurationError,
    IngestError,
    OrchestratorError,
    QueryValidationError,
    ServiceUnavailableError,
    TemplateError,
    TemplateNotFoundError,
    TemplateParamsError,
    TemplateSyntaxError,
)
from .settings import OrchestratorSettings

__version__ = "0.1.0"

__all__ = [
    "ArmExecutionError",
    "ConfigurationError",
    "IngestError",
    "OrchestratorError",
    "OrchestratorSettings",
    "QueryValidationError",
    "ServiceUnavailableError",
    "TemplateError",
    "TemplateNotFoundError",
    "TemplateParamsError",
    "TemplateSyntaxError",
    "__version__",
]
