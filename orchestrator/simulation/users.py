"""Simulated users: standard click models over a ranked list with known relevance.

Consumes the shown item ids (top first) and the query's graded relevant set; produces the
actions a user takes, as ``(item_id, action)`` pairs in order, which the runner sends to
``Orchestrator.feedback`` exactly as an application would.

``CascadeUser`` (Craswell et al. 2008)
    The user examines results top-down; at rank ``k`` clicks with probability
    ``attractiveness(grade)`` and stops after a click (satisfied) or after ``max_rank``.
``PositionBasedUser`` (PBM, Richardson et al. 2007)
    Each rank ``k`` is examined independently with ``P(E_k) = 1 / k ** eta`` and clicked
    when examined with probability ``attractiveness(grade)``; several clicks are possible.

Attractiveness: ``noise`` for an irrelevant item, ``attract[grade]`` for a relevant one
(grades above the table's last entry use its last value). After a click on a relevant item
the user plays it with probability ``p_play``; after a click on an irrelevant one, skips it
with probability ``p_skip``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import ConfigurationError


class ClickModel(Protocol):
    name: str

    def interact(self, shown: Sequence[str], relevant: Mapping[str, int],
                 rng: np.random.Generator) -> list[tuple[str, str]]: ...


@dataclass(frozen=True)
class _Base:
    attract: tuple[float, ...] = (0.7, 0.85, 0.95)
    noise: float = 0.02
    p_play: float = 0.6
    p_skip: float = 0.5
    max_rank: int = 10

    def __post_init__(self) -> None:
        probs = (*self.attract, self.noise, self.p_play, self.p_skip)
        if not self.attract or any(not 0.0 <= p <= 1.0 for p in probs):
            raise ConfigurationError(f"click model probabilities must be in [0, 1]: {probs}")
        if self.max_rank < 1:
            raise ConfigurationError("max_rank must be >= 1")

    def attractiveness(self, grade: int) -> float:
        if grade <= 0:
            return self.noise
        return self.attract[min(grade, len(self.attract)) - 1]

    def _after_click(self, item: str, grade: int, rng: np.random.Generator) -> list[tuple[str, str]]:
        out = [(item, "click")]
        if grade > 0 and rng.random() < self.p_play:
            out.append((item, "play"))
        elif grade <= 0 and rng.random() < self.p_skip:
            out.append((item, "skip"))
        return out


@dataclass(frozen=True)
class CascadeUser(_Base):
    """Cascade model (see the module docstring)."""

    name: str = "cascade"

    def interact(self, shown: Sequence[str], relevant: Mapping[str, int],
                 rng: np.random.Generator) -> list[tuple[str, str]]:
        for item in shown[: self.max_rank]:
            grade = int(relevant.get(item, 0))
            if rng.random() < self.attractiveness(grade):
                return self._after_click(item, grade, rng)
        return []


@dataclass(frozen=True)
class PositionBasedUser(_Base):
    """Position-based model with examination ``1 / k ** eta`` (see the module docstring)."""

    eta: float = 1.0
    name: str = "pbm"

    def examination(self, rank: int) -> float:
        return 1.0 / rank ** self.eta

    def interact(self, shown: Sequence[str], relevant: Mapping[str, int],
                 rng: np.random.Generator) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for k, item in enumerate(shown[: self.max_rank], start=1):
            grade = int(relevant.get(item, 0))
            examined = rng.random() < self.examination(k)
            clicked = rng.random() < self.attractiveness(grade)
            if examined and clicked:
                out.extend(self._after_click(item, grade, rng))
        return out


def make_click_model(name: str, **params: float) -> ClickModel:
    """``cascade`` | ``pbm`` with keyword parameters (``attract`` as a tuple, ``noise``,
    ``p_play``, ``p_skip``, ``max_rank``; ``eta`` for pbm)."""
    if name == "cascade":
        params.pop("eta", None)
        return CascadeUser(**params)  # type: ignore[arg-type]
    if name == "pbm":
        return PositionBasedUser(**params)  # type: ignore[arg-type]
    raise ConfigurationError(f"unknown click model {name!r}; use 'cascade' or 'pbm'")
