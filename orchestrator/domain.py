"""Frozen value objects that cross stage boundaries (arms -> execution -> merge -> response)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class ArmRequest:
    """One arm to run: which template, with which (already validated) parameters."""

    arm: str
    template_id: str
    params: dict[str, Any] = field(hash=False)


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    score: float
    rank: int
    source: dict[str, Any] = field(hash=False, compare=False)


@dataclass(frozen=True, slots=True)
class ArmResult:
    arm: str
    template_id: str
    hits: tuple[Hit, ...]
    took_ms: int

    ok = True


@dataclass(frozen=True, slots=True)
class ArmFailure:
    """An arm that failed inside the shared ``_msearch``: the search goes on without it."""

    arm: str
    template_id: str
    status: int | None
    reason: str

    ok = False
