"""The examination model: how likely a user is to look at each display position.

Consumes logged impressions and feedback (with their randomised swap interventions); produces
``theta_k = P(examined | position k) / P(examined | position 1)``, used to correct position bias
in the bandit's reward value (:mod:`orchestrator.rewards`), the memory's click-through rates
(:mod:`orchestrator.memory`) and the ranker's training weights (:mod:`orchestrator.training`).

Estimation: the swap intervention (Joachims, Swaminathan & Schnabel 2017, "Unbiased
learning-to-rank with biased feedback", section 5)
--------------------------------------------------------------------------------------------
At serving time, with probability ``swap_rate`` the rescorer's top item is swapped with the
item at a uniformly random display position ``k`` in ``2..min(max_position, n)``
(:func:`swap_intervention`). Which item is on top does not depend on the draw, so the top
items moved to ``k`` and the top items left at 1 are the same population; under the
position-based model ``P(click) = theta_k * relevance``, hence::

    theta_k / theta_1 = CTR(top item | shown at k, swapped) / CTR(top item | shown at 1, not swapped)

:func:`estimate_from_events` computes both rates from the log. "Click" is any positive action
(click, play, like, favorite) on the top item in that request, counted once per impression;
impressions without feedback count as non-clicks. For position ``k`` the control is every
non-swapped impression with at least ``k`` shown items, weighted ``1 / (min(K, n) - 1)``: that
is exactly the distribution over list lengths ``n`` of the impressions swapped to ``k``, so the
two rates are over the same population even when list length and top-item quality correlate.

Sparse positions: the raw ratio ``r_k = (c_k / n_k) / p_1`` of ``n_k`` swapped impressions is
shrunk toward the prior ``theta0_k`` (default ``1 / log2(k + 1)``) as a Beta posterior mean
with ``prior_strength`` pseudo-impressions centred on ``theta0_k * p_1``::

    theta_k = (n_k * r_k + s * theta0_k) / (n_k + s)

then made non-increasing in ``k`` (weighted isotonic regression, pool-adjacent-violators, with
weights ``n_k + s``), clipped to ``[MIN_THETA, 1]``, ``theta_1 = 1``. Positions beyond
``max_position`` keep the prior's shape from the last estimated one
(``theta_j = theta_K * theta0_j / theta0_K``). Without swaps (or without any control click)
the result is the prior.

Misspecification: the estimate is the examination of the *top item* at ``k`` averaged over the
log. Under a cascade user it is ``E[prod_{j<k} (1 - attractiveness_j)]`` for the swapped lists,
which depends on the items above, so one ``theta`` vector is an average, not a law.

Persistence: one Redis hash ``<prefix>examination`` = ``{"version": N, "model": JSON}``
(``schema_version``, ``kind``, ``theta``, ``meta``), written in one MULTI/EXEC
(:meth:`ExaminationModel.save`); :meth:`ExaminationModel.load` caches per process and re-reads
after ``refresh_interval_s``; absent key, unreadable schema or Redis down give the default (or
the last model this process read).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis as redis_lib

logger = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA_VERSION = 1
#: Floor of an estimated ``theta_k`` (a position nobody looks at would give infinite weights;
#: consumers cap their inverse-propensity weights anyway).
MIN_THETA = 1e-3
#: Actions that count as a click on the top item.
POSITIVE_ACTIONS = frozenset({"click", "play", "like", "favorite"})
REDIS_KEY = "examination"


@dataclass(frozen=True, slots=True)
class ExaminationModel:
    """``theta[k - 1]`` is the examination propensity of display position ``k`` relative to
    position 1 (``theta[0] == 1``); positions past the table use the last value.

    ``meta`` (not compared) records how an estimate was made: counts per position, parameters,
    and the Redis version it was loaded from.
    """

    theta: tuple[float, ...]
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def default(cls, max_position: int = 200) -> ExaminationModel:
        """The prior: the DCG discount ``1 / log2(k + 1)``."""
        return cls(tuple(1.0 / math.log2(k + 1) for k in range(1, max_position + 1)),
                   {"kind": "prior"})

    def propensity(self, position: int) -> float:
        """``theta_k`` of a 1-based display position (1.0 for position <= 1)."""
        if position <= 1:
            return 1.0
        return self.theta[min(position, len(self.theta)) - 1]

    def inverse_propensity(self, position: int, *, cap: float) -> float:
        """``min(1 / theta_k, cap)`` (at least 1): the IPS weight of a click at ``position``."""
        return max(1.0, min(1.0 / max(self.propensity(position), 1e-12), cap))

    # -- persistence (versioned JSON in Redis) ---------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "kind": "examination",
                "theta": [round(t, 8) for t in self.theta], "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExaminationModel:
        from .errors import StateVersionError

        if d.get("schema_version") != SCHEMA_VERSION or d.get("kind") != "examination":
            raise StateVersionError(
                f"examination model has schema_version={d.get('schema_version')!r} "
                f"kind={d.get('kind')!r}; this code reads schema_version={SCHEMA_VERSION} "
                "kind='examination'")
        theta = tuple(float(t) for t in d["theta"])
        if not theta or abs(theta[0] - 1.0) > 1e-9 or any(
                not 0.0 < t <= 1.0 for t in theta):
            raise StateVersionError(f"examination model has an invalid theta: {theta[:5]!r} ...")
        return cls(theta, dict(d.get("meta") or {}))

    def save(self, redis: redis_lib.Redis, *, prefix: str) -> int:
        """Store under ``<prefix>examination`` and return the new version (1, 2, ...). The
        version bump and the model are one transaction. Also refreshes this process's cache."""
        key = f"{prefix}{REDIS_KEY}"
        pipe = redis.pipeline(transaction=True)
        pipe.hincrby(key, "version", 1)
        pipe.hset(key, "model", json.dumps(self.to_dict(), separators=(",", ":")))
        version = int(pipe.execute()[0])
        model = ExaminationModel(self.theta, {**self.meta, "version": version})
        with _CACHE_LOCK:
            _CACHE[_cache_key(redis, prefix)] = (time.monotonic(), model)
        return version

    @classmethod
    def load(cls, redis: redis_lib.Redis | None, *, prefix: str,
             refresh_interval_s: float = 60.0,
             default: ExaminationModel | None = None) -> ExaminationModel:
        """The stored model of ``prefix``, cached per process for ``refresh_interval_s``
        (0: always read). ``default`` (the prior) when nothing is stored or the stored model
        has a schema this code does not read; while Redis is down, the last model read (or
        ``default``)."""
        from .errors import StateVersionError

        fallback = default or cls.default()
        if redis is None:
            return fallback
        ck = _cache_key(redis, prefix)
        now = time.monotonic()
        with _CACHE_LOCK:
            hit = _CACHE.get(ck)
        if hit is not None and now - hit[0] < refresh_interval_s:
            return hit[1]
        try:
            raw = redis.hmget(f"{prefix}{REDIS_KEY}", ["version", "model"])
        except (redis_lib.ConnectionError, redis_lib.TimeoutError) as exc:
            logger.warning("examination model not read (Redis: %s); using the %s", exc,
                           "last one read" if hit else "prior")
            return hit[1] if hit is not None else fallback
        version, doc = raw
        model = fallback
        if doc is not None:
            try:
                loaded = cls.from_dict(json.loads(doc))
                model = ExaminationModel(loaded.theta, {**loaded.meta,
                                                        "version": int(version or 0)})
            except (StateVersionError, ValueError, KeyError, TypeError) as exc:
                logger.warning("examination model under %r not used: %s", prefix, exc)
        with _CACHE_LOCK:
            _CACHE[ck] = (now, model)
        return model


_CACHE: dict[tuple[Any, ...], tuple[float, ExaminationModel]] = {}
_CACHE_LOCK = threading.Lock()


def _cache_key(redis: Any, prefix: str) -> tuple[Any, ...]:
    kw = getattr(getattr(redis, "connection_pool", None), "connection_kwargs", None) or {}
    where = (kw.get("host"), kw.get("port"), kw.get("db"), kw.get("path"))
    return (where if any(where) else id(redis), prefix)


def clear_cache() -> None:
    """Forget every model this process read (tests; a deployment never needs it)."""
    with _CACHE_LOCK:
        _CACHE.clear()


# -- serving: the intervention ----------------------------------------------------------------
def _uniforms(seed: int | str | bytes) -> tuple[float, int]:
    """Two independent draws from ``seed``: a uniform in [0, 1) and a 64-bit integer."""
    raw = seed if isinstance(seed, bytes) else str(seed).encode()
    d = hashlib.sha256(b"ltrr-swap-intervention\x00" + raw).digest()
    return int.from_bytes(d[:8], "big") / 2.0 ** 64, int.from_bytes(d[8:16], "big")


def swap_intervention(n_items: int, *, rate: float, seed: int | str | bytes,
                      max_position: int) -> int | None:
    """The display position ``k`` the top item is swapped to, or None (no intervention).

    Pure and deterministic: the same ``seed`` (the request id) gives the same answer in every
    process. With probability ``rate`` (when ``n_items >= 2`` and ``max_position >= 2``) it
    returns ``k`` uniform in ``2..min(max_position, n_items)``; otherwise None.

    What the caller does and logs, exactly:

    * ``n_items`` is the number of results *displayed* (``len(results)`` after truncation to
      ``size``, so ``len(impression["shown"]) == n_items``);
    * when ``k`` is returned, the rescored items at positions 1 and ``k`` trade places
      (:func:`apply_swap`) and the shown list is renumbered: ``shown[i]["rank"] == i + 1`` is
      the *display* position (so the rescorer's top item is ``shown[k - 1]``), which is also
      the ``rank``/``position`` feedback is logged and rewarded with;
    * the impression (and its stream event) carries ``"swap": k``, or ``"swap": None`` when no
      swap was drawn. An impression without the key is treated like ``None`` (control);
    * the estimator must be run with the serving ``max_position`` (``examination.max_position``).
    """
    if rate <= 0 or n_items < 2 or max_position < 2:
        return None
    u, j = _uniforms(seed)
    if u >= rate:
        return None
    m = min(max_position, n_items)
    return 2 + j % (m - 1)


def apply_swap(items: Sequence[T], k: int | None) -> list[T]:
    """``items`` with positions 1 and ``k`` exchanged (a copy; unchanged for None)."""
    out = list(items)
    if k is not None and 2 <= k <= len(out):
        out[0], out[k - 1] = out[k - 1], out[0]
    return out


# -- offline: the estimator --------------------------------------------------------------------
def _pav_non_increasing(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """Weighted least-squares fit of a non-increasing sequence (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, w in zip(values, weights):
        blocks.append([float(v), float(w), 1])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            m2, w2, c2 = blocks.pop()
            m1, w1, c1 = blocks.pop()
            wt = w1 + w2
            blocks.append([(m1 * w1 + m2 * w2) / wt if wt > 0 else (m1 + m2) / 2, wt, c1 + c2])
    out: list[float] = []
    for m, _, c in blocks:
        out.extend([m] * int(c))
    return out


#: Impression payload fields :func:`swap_counts` never reads (``load_events(...,
#: exclude_payload=...)``): it needs the shown ids, ``swap``, ``degraded`` and the feedback.
UNREAD_PAYLOAD = ("shown.features", "shown.provenance", "shown.arms", "feature_names",
                  "decision", "selection")


def swap_counts(events: Iterable[Mapping[str, Any]], *, max_position: int,
                positive_actions: Iterable[str] = POSITIVE_ACTIONS) -> dict[str, Any]:
    """The sufficient statistics of :func:`estimate_from_events` (pure): per position ``k``
    (index ``k - 1``) ``swapped``/``swapped_clicks`` (top item shown at ``k``) and the
    length-matched control ``control``/``control_clicks`` (weighted, see the module docstring)."""
    positive = frozenset(positive_actions)
    K = int(max_position)
    impressions: dict[str, Mapping[str, Any]] = {}
    clicked: dict[str, set[str]] = {}
    for ev in events:
        rid = ev.get("request_id")
        if not rid:
            continue
        if ev.get("type") == "impression":
            impressions.setdefault(str(rid), ev)
        elif ev.get("type") == "feedback" and ev.get("action") in positive and ev.get("item_id"):
            clicked.setdefault(str(rid), set()).add(str(ev["item_id"]))
    n_sw = [0.0] * K
    c_sw = [0.0] * K
    n_ctl = [0.0] * K
    c_ctl = [0.0] * K
    counts = {"impressions": 0, "swapped_impressions": 0, "control_impressions": 0, "skipped": 0}
    for rid, imp in impressions.items():
        shown = imp.get("shown") or []
        n = len(shown)
        if n < 2 or imp.get("degraded"):
            counts["skipped"] += 1
            continue
        counts["impressions"] += 1
        hits = clicked.get(rid, set())
        k = imp.get("swap")
        m = min(K, n)
        if k is None:
            if m < 2:
                continue
            counts["control_impressions"] += 1
            top = str(shown[0].get("id"))
            w = 1.0 / (m - 1)
            c = float(top in hits)
            for j in range(1, m):  # positions 2..m
                n_ctl[j] += w
                c_ctl[j] += w * c
            n_ctl[0] += 1.0
            c_ctl[0] += c
            continue
        try:
            k = int(k)
        except (TypeError, ValueError):
            counts["skipped"] += 1
            continue
        if not 2 <= k <= m:
            counts["skipped"] += 1  # logged under another max_position, or malformed
            continue
        counts["swapped_impressions"] += 1
        n_sw[k - 1] += 1.0
        c_sw[k - 1] += float(str(shown[k - 1].get("id")) in hits)
    return {"swapped": n_sw, "swapped_clicks": c_sw, "control": n_ctl,
            "control_clicks": c_ctl, **counts}


def estimate_from_events(events: Iterable[Mapping[str, Any]], *, max_position: int,
                         prior_strength: float,
                         prior: ExaminationModel | None = None,
                         positive_actions: Iterable[str] = POSITIVE_ACTIONS,
                         ) -> ExaminationModel:
    """``theta`` estimated from the swap interventions of the log (pure; module docstring).

    Parameters
    ----------
    events:
        Impression and feedback events in the stream shape (:func:`orchestrator.training.load_events`).
    max_position:
        ``K`` of the intervention (swaps to 2..K); estimated positions 1..K.
    prior_strength:
        Pseudo-impressions of the prior at each position (the shrinkage ``s``).
    prior:
        The prior curve (``ExaminationModel.default()``); also sets the returned length.
    """
    if max_position < 1:
        raise ValueError(f"max_position must be >= 1, got {max_position}")
    if prior_strength < 0:
        raise ValueError(f"prior_strength must be >= 0, got {prior_strength}")
    prior = prior or ExaminationModel.default()
    K = int(max_position)
    st = swap_counts(events, max_position=K, positive_actions=positive_actions)
    theta0 = [prior.propensity(k) for k in range(1, K + 1)]
    s = float(prior_strength)
    raw: list[float | None] = [1.0] + [None] * (K - 1)
    smoothed = [1.0]
    weights = [1e12]  # theta_1 = 1 is a constraint, not an estimate
    for j in range(1, K):
        n_k, c_k = st["swapped"][j], st["swapped_clicks"][j]
        n1, c1 = st["control"][j], st["control_clicks"][j]
        if n_k > 0 and n1 > 0 and c1 > 0:
            r_k = (c_k / n_k) / (c1 / n1)
            raw[j] = r_k
            est = (n_k * r_k + s * theta0[j]) / (n_k + s)
            weights.append(n_k + s)
        else:
            est = theta0[j]
            weights.append(s if s > 0 else 1e-9)
        smoothed.append(est)
    iso = _pav_non_increasing(smoothed, weights)
    theta = [1.0] + [min(1.0, max(MIN_THETA, t)) for t in iso[1:]]
    for j in range(1, K):  # clipping cannot break monotonicity, but keep it exact
        theta[j] = min(theta[j], theta[j - 1])
    L = max(K, len(prior.theta))
    ratio = theta[K - 1] / theta0[-1]  # exactly 1 when position K kept the prior
    for k in range(K + 1, L + 1):
        theta.append(max(MIN_THETA, min(theta[-1], prior.propensity(k) * ratio)))
    meta = {
        "kind": "swap_estimate", "max_position": K, "prior_strength": s,
        "impressions": st["impressions"], "swapped": st["swapped_impressions"],
        "control": st["control_impressions"], "skipped": st["skipped"],
        "swapped_by_position": [int(x) for x in st["swapped"]],
        "swapped_clicks_by_position": [int(x) for x in st["swapped_clicks"]],
        "control_ctr": (st["control_clicks"][0] / st["control"][0]) if st["control"][0] else None,
        "raw_ratio": [None if r is None else round(r, 6) for r in raw],
        "estimated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return ExaminationModel(tuple(theta), meta)


__all__ = ["MIN_THETA", "POSITIVE_ACTIONS", "ExaminationModel", "apply_swap", "clear_cache",
           "estimate_from_events", "swap_counts", "swap_intervention"]
