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

:class:`UserPool` is the population the query stream draws its users from: seeded user ids
with a Zipf-like activity, and each user's own wants for a need (a deterministic subset of
the need's items, the same every time that user asks it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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


# -- the user population -----------------------------------------------------------------

def stable_seed(*parts: object) -> list[int]:
    """Seed words for ``np.random.default_rng`` from arbitrary parts (stable across runs and
    processes, unlike ``hash``)."""
    digest = hashlib.blake2b("\x1f".join(str(p) for p in parts).encode("utf-8"),
                             digest_size=16).digest()
    return [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]


@dataclass
class UserPool:
    """``n_users`` simulated users ``u00000`` ... with activity ``p(rank) ∝ 1 / rank **
    activity_zipf`` (rank = a seeded permutation of the users; 0: uniform).

    :meth:`wants` gives a user's own subset of a need's items: ``k`` drawn uniformly in
    ``[min_wants, max_wants]`` (at most the pool), sampled without replacement with
    probability proportional to ``weight + 1``, from a random stream seeded by ``(seed,
    user, need)``: the same user asking the same need wants the same items; different users
    want different but overlapping sets (popular items are shared)."""

    n_users: int = 2000
    seed: int = 0
    activity_zipf: float = 0.8
    min_wants: int = 3
    max_wants: int = 15
    _p: np.ndarray = field(init=False, repr=False)
    _cache: dict[tuple[str, str, tuple[str, ...]], tuple[str, ...]] = field(
        init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_users < 1:
            raise ConfigurationError("n_users must be >= 1")
        if not 1 <= self.min_wants <= self.max_wants:
            raise ConfigurationError("need 1 <= min_wants <= max_wants")
        rank = np.empty(self.n_users)
        rank[np.random.default_rng(stable_seed(self.seed, "users")).permutation(self.n_users)] = \
            np.arange(1, self.n_users + 1)
        w = 1.0 / rank ** max(self.activity_zipf, 0.0)
        self._p = w / w.sum()

    def user_id(self, i: int) -> str:
        return f"u{i:05d}"

    def draw(self, rng: np.random.Generator) -> str:
        return self.user_id(int(rng.choice(self.n_users, p=self._p)))

    def wants(self, user: str, need: str, items: Sequence[str],
              weights: Sequence[float] | None = None) -> tuple[str, ...]:
        """The user's wanted subset of ``items`` (sorted; deterministic, see the class)."""
        pool = tuple(sorted(set(items)))
        key = (user, need, pool)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if not pool:
            return ()
        rng = np.random.default_rng(stable_seed(self.seed, user, need))
        k = min(len(pool), int(rng.integers(self.min_wants, self.max_wants + 1)))
        if weights is None:
            w = np.ones(len(pool))
        else:
            by = dict(zip(items, weights))
            w = np.asarray([max(float(by.get(i, 0.0)), 0.0) + 1.0 for i in pool])
        idx = rng.choice(len(pool), size=k, replace=False, p=w / w.sum())
        out = tuple(sorted(pool[int(i)] for i in idx))
        if len(self._cache) > 200_000:
            self._cache.clear()
        self._cache[key] = out
        return out
