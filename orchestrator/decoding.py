"""Decoding the event log fast: JSON through orjson, the cyclic garbage collector paused.

Every learning job decodes impressions by the thousand (about 11 KB of JSON each, ten shown
items with their ranking features). Two things decide how fast, both measured here on the
benchmark's real impressions:

- **the collector**: decoding allocates millions of containers, none in a reference cycle,
  and each allocation burst triggers collections that traverse them; with it on, decoding
  5,000 impressions took 4-5x as long (0.56-0.67 s against 0.14 s), and the memory updater
  ran at 4,836 / 5,368 events/s against 7,452 / 8,900 with it off (40k events, alternating).
  :func:`paused_gc` pauses it for a block; what the block frees is freed by reference
  counting, cycles (if any) are collected after it.
- **the parser**: orjson reads what the standard library writes except NaN and infinities
  (which ``json.dumps`` emits by default); :func:`loads` falls back for those.

The serving path writes the log with :func:`dumps` (orjson as well: the impression and its
event, about 10 KB each, are encoded at every search).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
from collections.abc import Iterator
from typing import Any

import orjson


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector paused for the block (resumed only if it was on, so
    nested blocks nest). The pause is process-wide: another thread leaving its block first
    resumes it early, which costs speed, never correctness."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def loads(raw: str | bytes) -> Any:
    """JSON through orjson, through the standard library for what orjson refuses (NaN and
    infinities). An integer past 64 bits reads as the nearest float, as the Elasticsearch
    client's decoding (:mod:`orchestrator.es_client`) reads it. Raises
    :class:`json.JSONDecodeError` for what neither reads."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def dumps(obj: Any) -> bytes:
    """Compact JSON through orjson; NaN and infinities are written as ``null`` (what the
    event mover and Elasticsearch make of them anyway, and valid JSON, which the standard
    library's ``NaN`` is not). The standard library (same compact separators, NaN as
    ``null`` too, :func:`finite`) writes what orjson refuses: integers past 64 bits, keys
    that are not strings."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(finite(obj), separators=(",", ":")).encode()


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None`` (lists and tuples as lists, dicts
    rebuilt): Elasticsearch refuses them, and JSON has no token for them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


__all__ = ["dumps", "finite", "loads", "paused_gc"]
