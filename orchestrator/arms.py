"""Turn a query into the parameters of each arm's template.

Consumes the user's query (and, from the query-understanding stage, its slots), produces
:class:`ArmRequest` s whose parameters match what each template's sidecar declares. Only the
parameters a template declares are passed, so templates stay free to use a subset.
"""

from __future__ import annotations

from typing import Any

from .domain import ArmRequest
from .errors import QueryValidationError
from .templates import SearchTemplate
from .text import fold, normalize_query


def validate_query(query: Any, *, max_chars: int) -> str:
    """Return the stripped query or raise :class:`QueryValidationError` with the reason."""
    if not isinstance(query, str):
        raise QueryValidationError(f"query must be a string, got {type(query).__name__}")
    q = query.strip()
    if not q:
        raise QueryValidationError("query is empty")
    if len(q) > max_chars:
        raise QueryValidationError(f"query is {len(q)} characters; the limit is {max_chars}")
    if any(ord(c) < 32 and c not in "\t\n\r" for c in q):
        raise QueryValidationError("query contains control characters")
    return q


def base_params(query: str, *, size: int) -> dict[str, Any]:
    """Parameters every arm may use, derived from the raw query alone."""
    return {
        "query": query,
        "folded_query": fold(query),
        "query_key": normalize_query(query),
        "size": size,
    }


def build_request(template: SearchTemplate, available: dict[str, Any]) -> ArmRequest:
    """Pick the declared parameters out of ``available`` for ``template``."""
    declared = {p.name for p in template.params}
    params = {k: v for k, v in available.items() if k in declared and v is not None}
    return ArmRequest(template.arm, template.id, params)
