"""The query-to-entity (Q2E) memory: learn ``query_key -> item`` scores from user actions.

Consumes interactions (normalised query, item, action, rank, time) joined from the events
index, produces per-item Q2E entries written into the catalog's nested ``q2e`` field, which
the ``memory`` arm scores with ``function_score``/``field_value_factor``.

Scoring, per (query_key, item):

- each action has a weight (play/like/favorite > click > 0; skip is negative evidence);
- position-bias correction: a click at rank r says more than one at rank 1, because rank 1
  is examined almost always. Under the cascade-ish examination model
  ``P(examined | r) = 1 / log2(r + 1)``, the evidence is inverse-propensity weighted by
  ``log2(r + 1)``, capped at ``max_ipw`` so a lucky deep click cannot dominate;
- time decay with a half-life, for non-stationary tastes;
- the score is a Beta-style posterior mean that starts at the predicted (cold-start) prior and
  gives way to observations as evidence grows::

      score = (pos + prior_strength * prior) / (pos + neg + prior_strength)

  so a predicted 0.8 with no evidence stays 0.8, and 10 weighted clicks push it towards 1.
- pairs never predicted (a query users typed and then chose this item from another arm's
  hits) are added with prior 0: the memory learns queries it never matched lexically.

Recomputed from the whole (decayed) log each run, so a rerun writes the same result:
idempotent. Writes use optimistic concurrency (``if_seq_no``) and retry on conflict.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from elasticsearch import ConflictError, Elasticsearch, helpers

from .text import normalize_query

logger = logging.getLogger(__name__)

#: Reward of each action; negative values are evidence against the pair.
ACTION_WEIGHTS: Mapping[str, float] = {
    "click": 1.0, "play": 1.5, "like": 2.0, "favorite": 2.5, "add_to_favorites": 2.5,
    "skip": -0.5,
}


@dataclass(frozen=True, slots=True)
class Interaction:
    query_key: str
    item_id: str
    action: str
    rank: int | None
    ts: float


@dataclass(frozen=True, slots=True)
class PairEvidence:
    pos: float
    neg: float
    count: int


def position_weight(rank: int | None, *, max_ipw: float = 3.0) -> float:
    """Inverse examination propensity ``log2(rank + 1)``, in [1, max_ipw]."""
    if not rank or rank < 1:
        return 1.0
    return min(max(math.log2(rank + 1), 1.0), max_ipw)


def aggregate(interactions: Iterable[Interaction], *, now: float | None = None,
              half_life_days: float = 30.0, max_ipw: float = 3.0,
              action_weights: Mapping[str, float] = ACTION_WEIGHTS,
              ) -> dict[str, dict[str, PairEvidence]]:
    """``item_id -> query_key -> evidence`` from interactions (pure function)."""
    now = time.time() if now is None else now
    lam = math.log(2) / (half_life_days * 86400.0)
    pos: dict[tuple[str, str], float] = defaultdict(float)
    neg: dict[tuple[str, str], float] = defaultdict(float)
    cnt: dict[tuple[str, str], int] = defaultdict(int)
    for it in interactions:
        w = action_weights.get(it.action)
        if w is None or not it.query_key:
            continue
        decay = math.exp(-lam * max(0.0, now - it.ts))
        key = (it.item_id, it.query_key)
        if w >= 0:
            pos[key] += w * position_weight(it.rank, max_ipw=max_ipw) * decay
        else:
            neg[key] += -w * decay
        cnt[key] += 1
    out: dict[str, dict[str, PairEvidence]] = defaultdict(dict)
    for key in cnt:
        out[key[0]][key[1]] = PairEvidence(pos[key], neg[key], cnt[key])
    return dict(out)


def blend(prior: float, ev: PairEvidence | None, *, prior_strength: float = 2.0) -> float:
    """Posterior mean starting at ``prior`` (see the module docstring)."""
    if ev is None:
        return prior
    return (ev.pos + prior_strength * prior) / (ev.pos + ev.neg + prior_strength)


def merge_entries(current: list[dict[str, Any]], evidence: Mapping[str, PairEvidence], *,
                  prior_strength: float = 2.0, max_entries: int = 64) -> list[dict[str, Any]]:
    """New ``q2e`` list of one item: priors kept, observed pairs blended, new pairs added."""
    by_key: dict[str, dict[str, Any]] = {}
    for e in current:
        prior = float(e.get("prior", e.get("score", 0.0)))
        by_key[e["query_key"]] = {"query_key": e["query_key"], "prior": prior,
                                  "score": prior, "source": "predicted", "count": 0.0}
    for key, ev in evidence.items():
        entry = by_key.setdefault(key, {"query_key": key, "prior": 0.0, "score": 0.0,
                                        "source": "observed", "count": 0.0})
        entry["score"] = round(blend(entry["prior"], ev, prior_strength=prior_strength), 4)
        entry["count"] = float(ev.count)
        entry["source"] = "observed" if entry["prior"] == 0.0 else "blended"
    entries = sorted(by_key.values(), key=lambda e: (-e["count"], -e["score"]))
    return entries[:max_entries]


def interactions_from_events(events: Iterable[Mapping[str, Any]]) -> list[Interaction]:
    """Join feedback events with their impressions (query, rank) -- pure function over events
    in the stream's shape (``{"type": ..., **data}``, as :func:`training.load_events` returns)."""
    impressions: dict[str, Mapping[str, Any]] = {}
    feedback: list[Mapping[str, Any]] = []
    for ev in events:
        if ev.get("type") == "impression" and ev.get("request_id"):
            impressions[ev["request_id"]] = ev
        elif ev.get("type") == "feedback":
            feedback.append(ev)
    out = []
    for fb in feedback:
        imp = impressions.get(fb.get("request_id", ""), {})
        query = fb.get("query") or imp.get("query")
        key = fb.get("query_key") or imp.get("query_key") or (normalize_query(query) if query else "")
        rank = fb.get("rank")
        if rank is None:
            rank = _rank_in_impression(imp, fb.get("item_id"))
        if key and fb.get("item_id") and fb.get("action"):
            out.append(Interaction(key, fb["item_id"], fb["action"], rank, _epoch_seconds(fb.get("ts"))))
    return out


def load_interactions(es: Elasticsearch, events_alias: str) -> list[Interaction]:
    """Interactions of the Elasticsearch events alias (see :func:`interactions_from_events`)."""
    from .training import load_events

    return interactions_from_events(load_events(es, events_alias=events_alias))


def _epoch_seconds(ts: Any) -> float:
    """Event time as epoch seconds (events carry ISO strings, stream-id millis or seconds)."""
    if isinstance(ts, (int, float)):
        return ts / 1000.0 if ts > 1e11 else float(ts)
    if isinstance(ts, str) and ts:
        try:
            return _dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return 0.0
    return 0.0


def _rank_in_impression(impression: Mapping[str, Any], item_id: str | None) -> int | None:
    for field in ("shown", "items", "results"):
        for i, item in enumerate(impression.get(field) or [], start=1):
            iid = item.get("id") or item.get("item_id") if isinstance(item, dict) else item
            if iid == item_id:
                return int(item.get("rank", i)) if isinstance(item, dict) else i
    return None


@dataclass
class MemoryUpdate:
    items: int = 0
    pairs: int = 0
    new_pairs: int = 0
    missing_items: int = 0
    conflicts_retried: int = 0


def write_memory(es: Elasticsearch, catalog_alias: str,
                 evidence: Mapping[str, Mapping[str, PairEvidence]], *,
                 prior_strength: float = 2.0, batch: int = 200, max_retries: int = 5) -> MemoryUpdate:
    """Write blended Q2E entries into the catalog documents (partial updates, optimistic
    concurrency: a document changed meanwhile is re-read and merged again)."""
    result = MemoryUpdate()
    ids = list(evidence)
    for start in range(0, len(ids), batch):
        pending = ids[start : start + batch]
        for _attempt in range(max_retries):
            if not pending:
                break
            docs = es.mget(index=catalog_alias, ids=pending, source_includes=["q2e"])["docs"]
            actions = []
            for d in docs:
                if not d.get("found"):
                    result.missing_items += 1
                    continue
                current = d["_source"].get("q2e", [])
                known = {e["query_key"] for e in current}
                ev = evidence[d["_id"]]
                result.new_pairs += sum(1 for k in ev if k not in known)
                result.pairs += len(ev)
                actions.append({
                    "_op_type": "update", "_index": d["_index"], "_id": d["_id"],
                    "if_seq_no": d["_seq_no"], "if_primary_term": d["_primary_term"],
                    "doc": {"q2e": merge_entries(current, ev, prior_strength=prior_strength)},
                })
            retry: list[str] = []
            for ok, info in helpers.streaming_bulk(es, actions, raise_on_error=False,
                                                   refresh=False):
                item = info["update"]
                if ok:
                    result.items += 1
                elif item.get("status") == 409:
                    retry.append(item["_id"])
                else:
                    logger.warning("q2e update of %s failed: %s", item["_id"], item.get("error"))
            result.conflicts_retried += len(retry)
            pending = retry
        else:
            if pending:
                raise ConflictError(f"q2e update kept conflicting for {len(pending)} documents",
                                    meta=None, body=None)  # type: ignore[arg-type]
    es.indices.refresh(index=catalog_alias)
    return result
