"""Turn one request (QU output, request context, memory hit count) into the bandit's context.

Consumes a :class:`~orchestrator.domain.ParsedQuery` (:mod:`orchestrator.understanding`), the
:class:`~orchestrator.domain.RequestContext` and the number of learned query-to-entity pairs
the memory holds for the query; produces a :class:`SelectionContext` -- named features (logged
with every impression), their sparse vector for the linear model and the Beta-mode bucket --
consumed by the selectors of :mod:`orchestrator.selection` and replayed by
:mod:`orchestrator.training`.

Feature set, version :data:`FEATURIZER_VERSION`
-----------------------------------------------
Every feature is a one-hot (or, for the intent, a probability): no raw magnitude, so no single
feature can dominate the L2-normalised vector (version 1 fed ``qu:n_chars`` clipped at 5 and it
was ~0.8 of the vector for nearly every query). Each fact is encoded once: the QU features that
repeat the intent or slot presence (``intent=*``, ``has_<slot>``, ``is_english``,
``n_tokens``, ``n_chars``, ``is_single_token``, ``intent_confidence``) are left out.

Reserved slots (one dimension each, :data:`RESERVED_FEATURES`): ``intent=<label|unknown>``,
``slot=<category>``, ``qlen=<token bucket>``, ``qchars=<character bucket>`` (log2 buckets),
``lang=<code>``, ``daypart=``, ``weekend=``, ``device=<mobile|desktop|tablet|other>``,
``memory=<0|1-2|3-9|10+>`` and the bucketed QU features :data:`QU_BUCKETS` keeps. Hashed
(CRC32 into ``hash_dim`` slots; stable across processes, unsigned so colliding features add
up): the open vocabularies ``locale=``, ``segment=``, a language outside :data:`LANGUAGES`, and
numeric QU features this version does not know (value clipped to +-``max_abs``). Collisions are
measured on real playlist titles by ``benchmarks/context_features.py``.

Versioning: :data:`FEATURIZER_VERSION` changes whenever a feature's definition changes. Every
:class:`SelectionContext` records the featurizer version and the QU model version that
produced it, and :class:`~orchestrator.bandit_state.RedisBanditStore` records both next to
``dim``; :func:`orchestrator.training.migrate_posteriors` re-featurizes the log when they change.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .domain import INTENTS, SLOT_CATEGORIES, ParsedQuery, RequestContext
from .errors import ConfigurationError

#: Bump when any feature's definition changes (the bandit state records it; see the module
#: docstring). "1" is the featurizer of ``orchestrator.selection`` before versioning.
FEATURIZER_VERSION = "2"
#: What a :class:`SelectionContext` logged before versioning was produced by.
LEGACY_FEATURIZER_VERSION = "1"

_DAYPARTS = ((0, 6, "night"), (6, 12, "morning"), (12, 18, "afternoon"), (18, 24, "evening"))
#: Upper bounds (inclusive) of the log2 length buckets; the last bucket is open.
_TOKEN_BOUNDS = ((1, "1"), (2, "2"), (4, "3-4"), (8, "5-8"))
_TOKEN_TOP = "9+"
_CHAR_BOUNDS = ((3, "1-3"), (7, "4-7"), (15, "8-15"), (31, "16-31"), (63, "32-63"))
_CHAR_TOP = "64+"
_MEMORY_BOUNDS = ((0, "0"), (2, "1-2"), (9, "3-9"))
_MEMORY_TOP = "10+"
DEVICES = ("mobile", "desktop", "tablet", "other")
#: What :func:`orchestrator.understanding.guess_language` returns (a code outside it is hashed).
LANGUAGES = ("en", "es", "pt", "fr", "de", "other")
#: QU features kept, each as reserved one-hot buckets: ``name -> ((upper bound, label), ...)``
#: (a value <= bound gets the label; a value above every bound, or a label of ``None``, emits
#: nothing, so a zero feature costs nothing).
QU_BUCKETS: dict[str, tuple[tuple[float, str | None], ...]] = {
    "has_digits": ((0.0, None), (math.inf, "1")),
    "has_fuzzy_slot": ((0.0, None), (math.inf, "1")),
    "has_occasion": ((0.0, None), (math.inf, "1")),
    "truncated": ((0.0, None), (math.inf, "1")),
    "n_slots": ((1.0, None), (math.inf, "2+")),  # 0 / 1 follow from the slot= features
    "slot_coverage": ((0.0, None), (0.999, "partial"), (math.inf, "full")),
    "max_slot_confidence": ((0.0, None), (0.6, "low"), (0.85, "mid"), (math.inf, "high")),
}
#: QU features that repeat what another feature already says (left out).
QU_DUPLICATES = frozenset(
    {"n_tokens", "n_chars", "is_single_token", "intent_confidence", "is_english"}
    | {f"has_{c}" for c in SLOT_CATEGORIES}
    | {f"intent={i}" for i in INTENTS}
)
_BUCKET_KEYS = ("intent", "daypart", "weekend", "device", "locale", "segment", "qlen",
                "qchars", "memory")


def _labels(bounds: Sequence[tuple[Any, str | None]], top: str | None = None) -> tuple[str, ...]:
    out = [label for _, label in bounds if label is not None]
    return tuple(out) + ((top,) if top is not None else ())


#: Features of closed vocabularies get their own dimension (no hash collisions among them);
#: the rest are hashed.
RESERVED_FEATURES: tuple[str, ...] = (
    tuple(f"intent={i}" for i in (*INTENTS, "unknown"))
    + tuple(f"slot={c}" for c in SLOT_CATEGORIES)
    + tuple(f"qlen={q}" for q in _labels(_TOKEN_BOUNDS, _TOKEN_TOP))
    + tuple(f"qchars={q}" for q in _labels(_CHAR_BOUNDS, _CHAR_TOP))
    + tuple(f"lang={x}" for x in LANGUAGES)
    + tuple(f"daypart={d}" for _, _, d in _DAYPARTS)
    + ("weekend=0", "weekend=1")
    + tuple(f"device={d}" for d in DEVICES)
    + tuple(f"memory={m}" for m in _labels(_MEMORY_BOUNDS, _MEMORY_TOP))
    + tuple(f"qu:{name}={label}" for name, bounds in QU_BUCKETS.items()
            for label in _labels(bounds))
)


def _bucket(value: float, bounds: Sequence[tuple[float, str | None]],
            top: str | None = None) -> str | None:
    for bound, label in bounds:
        if value <= bound:
            return label
    return top


def token_bucket(n_tokens: int) -> str:
    """``1``, ``2``, ``3-4``, ``5-8`` or ``9+`` (an empty query counts as one token)."""
    return _bucket(max(n_tokens, 1), _TOKEN_BOUNDS, _TOKEN_TOP)  # type: ignore[return-value]


def char_bucket(n_chars: int) -> str:
    """``1-3``, ``4-7``, ``8-15``, ``16-31``, ``32-63`` or ``64+``."""
    return _bucket(max(n_chars, 1), _CHAR_BOUNDS, _CHAR_TOP)  # type: ignore[return-value]


def memory_bucket(pairs: int) -> str:
    """``0``, ``1-2``, ``3-9`` or ``10+`` learned pairs."""
    return _bucket(max(pairs, 0), _MEMORY_BOUNDS, _MEMORY_TOP)  # type: ignore[return-value]


def daypart(hour: int) -> str:
    for lo, hi, name in _DAYPARTS:
        if lo <= hour < hi:
            return name
    raise ValueError(f"hour must be in [0, 24), got {hour}")


@dataclass(frozen=True, slots=True)
class SelectionContext:
    """The selector's view of one request: named features (logged), their sparse vector
    (``indices`` strictly increasing, index 0 = bias), the Beta-mode bucket, and what produced
    them: ``featurizer_version``, the vector's ``dim``, ``qu_version`` (``None``: no QU model)
    and the raw ``memory_pairs`` input (``None``: unknown), so the log can be re-featurized."""

    features: dict[str, float] = field(hash=False, compare=False)
    indices: tuple[int, ...]
    values: tuple[float, ...]
    bucket: str
    featurizer_version: str | None = None
    dim: int | None = None
    qu_version: str | None = None
    memory_pairs: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"features": self.features, "indices": list(self.indices),
                "values": list(self.values), "bucket": self.bucket,
                "featurizer_version": self.featurizer_version, "dim": self.dim,
                "qu_version": self.qu_version, "memory_pairs": self.memory_pairs}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SelectionContext:
        """Inverse of :meth:`to_dict`; a dict logged before versioning reads as featurizer
        :data:`LEGACY_FEATURIZER_VERSION`, unknown dim, no QU version and unknown memory."""
        pairs, dim = d.get("memory_pairs"), d.get("dim")
        return cls(dict(d.get("features", {})), tuple(int(i) for i in d["indices"]),
                   tuple(float(v) for v in d["values"]), str(d["bucket"]),
                   featurizer_version=str(d.get("featurizer_version") or LEGACY_FEATURIZER_VERSION),
                   dim=int(dim) if dim is not None else None,
                   qu_version=d.get("qu_version") or None,
                   memory_pairs=int(pairs) if pairs is not None else None)


class ContextFeaturizer:
    """Build the context vector from QU output, request context and the memory's hit count.

    See the module docstring for the features. Slot 0 is the bias, then one slot per
    :data:`RESERVED_FEATURES` entry, then ``hash_dim`` hashed slots; the non-bias part is
    L2-normalised.

    Parameters
    ----------
    hash_dim:
        Hashed slots (the vector has ``1 + len(RESERVED_FEATURES) + hash_dim`` dimensions).
    bucket_keys:
        Which of ``intent``, ``daypart``, ``weekend``, ``device``, ``locale``, ``segment``,
        ``qlen``, ``qchars``, ``memory`` form the Beta-mode bucket.
    use_qu_features:
        Include the bucketed ``ParsedQuery.features`` (``qu:*``); part of :attr:`version`.
    max_abs:
        Clip of numeric QU features this version does not know (hashed, not bucketed).
    """

    def __init__(self, *, hash_dim: int = 64, bucket_keys: Sequence[str] = ("intent", "daypart"),
                 use_qu_features: bool = True, max_abs: float = 1.0) -> None:
        bad = sorted(set(bucket_keys) - set(_BUCKET_KEYS))
        if bad:
            raise ConfigurationError(f"unknown bucket key(s) {bad}; use {list(_BUCKET_KEYS)}")
        if hash_dim < 1:
            raise ConfigurationError("hash_dim must be >= 1")
        self.hash_dim = hash_dim
        self.bucket_keys = tuple(bucket_keys)
        self.use_qu_features = use_qu_features
        self.max_abs = max_abs
        self._slot_cache: dict[str, int] = {n: 1 + i for i, n in enumerate(RESERVED_FEATURES)}

    @property
    def version(self) -> str:
        """What the bandit state records: :data:`FEATURIZER_VERSION` (plus ``-noqu`` without
        QU features, which is another feature set)."""
        return FEATURIZER_VERSION if self.use_qu_features else f"{FEATURIZER_VERSION}-noqu"

    @property
    def dim(self) -> int:
        return 1 + len(RESERVED_FEATURES) + self.hash_dim

    def is_reserved(self, name: str) -> bool:
        return 1 <= self.slot(name) <= len(RESERVED_FEATURES)

    def slot(self, name: str) -> int:
        """The vector index of feature ``name``."""
        hit = self._slot_cache.get(name)
        if hit is None:
            hit = 1 + len(RESERVED_FEATURES) + zlib.crc32(name.encode("utf-8")) % self.hash_dim
            if len(self._slot_cache) < 100_000:
                self._slot_cache[name] = hit
        return hit

    def features(self, parsed: ParsedQuery | None, context: RequestContext | None, query: str,
                 *, memory_pairs: int | None = None) -> tuple[dict[str, float], dict[str, str]]:
        """Named features and the categorical values used for the bucket."""
        f: dict[str, float] = {}
        cat: dict[str, str] = {}
        if parsed is not None:
            if parsed.intent_probs:
                for k, p in parsed.intent_probs.items():
                    if p > 0.01:
                        f[f"intent={k}"] = float(p)
            else:
                f[f"intent={parsed.intent}"] = 1.0
            cat["intent"] = parsed.intent
            for s in parsed.slots:
                f[f"slot={s.category}"] = 1.0
            if parsed.language:
                f[f"lang={parsed.language}"] = 1.0
            if self.use_qu_features:
                f.update(self._qu_features(parsed.features))
        else:
            f["intent=unknown"] = 1.0
            cat["intent"] = "unknown"
        text = query.strip()
        cat["qlen"] = token_bucket(len(text.split()))
        cat["qchars"] = char_bucket(len(text))
        f[f"qlen={cat['qlen']}"] = 1.0
        f[f"qchars={cat['qchars']}"] = 1.0
        if memory_pairs is not None:
            cat["memory"] = memory_bucket(int(memory_pairs))
            f[f"memory={cat['memory']}"] = 1.0
        if context is not None:
            if context.hour is not None:
                cat["daypart"] = daypart(context.hour)
                f[f"daypart={cat['daypart']}"] = 1.0
            if context.weekday is not None:
                cat["weekend"] = "1" if context.weekday >= 5 else "0"
                f[f"weekend={cat['weekend']}"] = 1.0
            if context.device:
                device = str(context.device).lower()
                cat["device"] = device if device in DEVICES else "other"
                f[f"device={cat['device']}"] = 1.0
            for key, value in (("locale", context.locale), ("segment", context.user_segment)):
                if value:
                    cat[key] = str(value).lower()
                    f[f"{key}={cat[key]}"] = 1.0
        return f, cat

    def _qu_features(self, raw: Mapping[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, v in raw.items():
            if (name in QU_DUPLICATES or isinstance(v, bool) or not isinstance(v, (int, float))
                    or not math.isfinite(v)):
                continue
            bounds = QU_BUCKETS.get(name)
            if bounds is not None:
                label = _bucket(float(v), bounds)
                if label is not None:
                    out[f"qu:{name}={label}"] = 1.0
            elif v != 0:  # a feature this version does not know: hashed, bounded
                out[f"qu:{name}"] = max(-self.max_abs, min(self.max_abs, float(v)))
        return out

    def transform(self, parsed: ParsedQuery | None, context: RequestContext | None, query: str,
                  *, memory_pairs: int | None = None,
                  qu_version: str | None = None) -> SelectionContext:
        """The :class:`SelectionContext` of one request.

        Parameters
        ----------
        parsed, context, query:
            QU output (``None`` without QU), request context and the query text.
        memory_pairs:
            Learned query-to-entity pairs the memory holds for this query (``None``: unknown,
            no ``memory=`` feature).
        qu_version:
            The QU model that produced ``parsed``; default ``parsed.model_version``.
        """
        f, cat = self.features(parsed, context, query, memory_pairs=memory_pairs)
        acc: dict[int, float] = {}
        for name, v in f.items():
            i = self.slot(name)
            acc[i] = acc.get(i, 0.0) + v
        norm = math.sqrt(sum(v * v for v in acc.values())) or 1.0
        items = sorted((i, v / norm) for i, v in acc.items() if v != 0.0)
        indices = (0,) + tuple(i for i, _ in items)
        values = (1.0,) + tuple(v for _, v in items)
        bucket = "|".join(f"{k}={cat.get(k, '-')}" for k in self.bucket_keys)
        if qu_version is None and parsed is not None:
            qu_version = getattr(parsed, "model_version", None)
        return SelectionContext(f, indices, values, bucket, featurizer_version=self.version,
                                dim=self.dim, qu_version=qu_version,
                                memory_pairs=int(memory_pairs) if memory_pairs is not None else None)


def request_context(logged: Any) -> RequestContext | None:
    """A :class:`RequestContext` from its logged dict (``RequestContext.to_dict``)."""
    if not isinstance(logged, Mapping):
        return None
    known = RequestContext.__slots__  # type: ignore[attr-defined]
    return RequestContext(**{k: logged[k] for k in known if logged.get(k) is not None})


def logged_context(featurizer: ContextFeaturizer, impression: Mapping[str, Any], *,
                   understander: Any = None) -> SelectionContext:
    """The context to learn from for a logged impression (feedback joins it).

    Its logged ``selection`` when this featurizer version and dimension produced it; else --
    feedback on a search served before a migration -- the impression re-featurized now (query
    re-parsed with ``understander``, logged request context and memory count), so old-layout
    vectors never land in statistics of the new layout. A QU version alone does not matter
    here: the features mean the same.
    """
    ctx = SelectionContext.from_dict(impression["selection"])
    if ctx.featurizer_version == featurizer.version and ctx.dim == featurizer.dim:
        return ctx
    query = str(impression.get("query") or "")
    parsed = understander.parse(query) if understander is not None and query.strip() else None
    return featurizer.transform(parsed, request_context(impression.get("context")), query,
                                memory_pairs=ctx.memory_pairs)
