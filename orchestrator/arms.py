"""Turn a query (and its understood slots) into the parameters of each arm's template.

Consumes the user's query and, from the query-understanding stage, a :class:`ParsedQuery`
whose slots (artist, genre, mood, era, entity_type ...) this module maps onto template
parameters; produces :class:`ArmRequest` s for the arms the selector chose, skipping arms
whose sidecar declares slots the query lacks (``required_slots`` / ``required_slots_any``).
Only the parameters a template declares are passed, so templates stay free to use a subset;
every parameter is data, checked against the sidecar's types before anything is rendered.

The arms (one ``query_templates/<arm>.v<N>.mustache`` each):

=================  ===========  ===========================================================
arm                source       wins on
=================  ===========  ===========================================================
lexical            lexical      known items, typos (fuzzy BM25 + phrase boost)
lexical_popular    lexical      ambiguous titles (BM25 x popularity)
structured         structured   slot-only browsing ("chill jazz", "90s rock"); needs a slot
semantic           semantic     descriptive / topical wording (kNN on the embedding)
memory             memory       remembered queries (Q2E: predicted at ingestion, then clicks)
explore            explore      nothing by design: the long tail, randomised, for feedback
related            related      "like <artist>": the artist and genre-sharing neighbours
=================  ===========  ===========================================================
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import logging
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .domain import SLOT_CATEGORIES, ArmRequest, ParsedQuery
from .errors import QueryValidationError, TemplateParamsError
from .templates import SearchTemplate, TemplateRegistry
from .text import fold, normalize_query

logger = logging.getLogger(__name__)

__all__ = [
    "ArmSpec", "applicable", "arm_spec", "arm_specs", "artist_doc_id", "base_params",
    "build_request", "build_requests", "normalize_era", "query_terms", "slot_params",
    "validate_query",
]

#: Catalog entity types, and the words a query (or an entity_type slot) may use for them.
ENTITY_TYPES = ("track", "artist", "album")
_ENTITY_WORDS = {
    "track": "track", "tracks": "track", "song": "track", "songs": "track", "single": "track",
    "singles": "track", "tune": "track", "tunes": "track",
    "album": "album", "albums": "album", "record": "album", "records": "album", "lp": "album",
    "ep": "album",
    "artist": "artist", "artists": "artist", "band": "artist", "bands": "artist",
    "singer": "artist", "singers": "artist", "musician": "artist", "musicians": "artist",
}
#: Mood words users type -> the catalog's mood tags (``catalog.moods_of``). Tags map to
#: themselves; anything else is dropped rather than sent as a filter that matches nothing.
MOOD_WORDS = {
    "happy": ["happy"], "upbeat": ["upbeat"], "chill": ["chill"], "calm": ["calm"],
    "intense": ["intense"], "angry": ["angry"], "sad": ["sad"], "melancholic": ["melancholic"],
    "energetic": ["energetic"], "dance": ["dance"], "party": ["party"], "acoustic": ["acoustic"],
    "instrumental": ["instrumental"], "sleep": ["sleep"],
    "chilled": ["chill"], "chillout": ["chill"], "relax": ["chill", "calm"],
    "relaxing": ["chill", "calm"], "relaxed": ["chill", "calm"], "mellow": ["chill", "calm"],
    "peaceful": ["calm"], "soothing": ["calm"], "sleepy": ["sleep"], "sleeping": ["sleep"],
    "melancholy": ["melancholic", "sad"], "depressing": ["sad"], "heartbreak": ["sad"],
    "energy": ["energetic"], "workout": ["energetic"], "gym": ["energetic"], "hype": ["energetic"],
    "pump": ["energetic"], "dancing": ["dance"], "danceable": ["dance"], "aggressive": ["angry"],
    "joyful": ["happy"], "cheerful": ["happy"], "feel good": ["happy"], "feelgood": ["happy"],
}
ERA_WORDS = {
    "twenties": 1920, "thirties": 1930, "forties": 1940, "fifties": 1950, "sixties": 1960,
    "seventies": 1970, "eighties": 1980, "nineties": 1990, "noughties": 2000,
    "aughts": 2000, "two thousands": 2000, "2000s": 2000, "tens": 2010, "twenty tens": 2010,
}
_ERA_RE = re.compile(r"^'?(?P<c>1[89]|20)?(?P<d>\d)0'?s$|^(?P<y>(?:1[89]|20)\d\d)$")
#: Slot values are names, not text: longer values are dropped (they would fail the sidecar).
_MAX_SLOT_CHARS = 64
#: Values kept per slot category, best first (the sidecars allow 8; genres 24 with spellings).
_MAX_SLOT_VALUES = 8


# -- the query itself ----------------------------------------------------------------------

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


def query_terms(query: str, *, max_terms: int = 48) -> list[str]:
    """Words and adjacent word pairs of the normalized query (``"hip hop"``, ``"hard rock"``),
    for arms that look query words up in keyword fields (genres, moods) without slots."""
    words = normalize_query(query).split()
    pairs = [f"{a} {b}" for a, b in itertools.pairwise(words)]
    out = list(dict.fromkeys(words + pairs + ["-".join(p.split()) for p in pairs]))
    return [t for t in out if len(t) <= _MAX_SLOT_CHARS][:max_terms]


# -- slots -> parameters -------------------------------------------------------------------

def normalize_era(value: str) -> str | None:
    """``"90s"``, ``"'90s"``, ``"1990s"``, ``"nineties"``, ``"1994"`` -> ``"1990s"`` (the
    catalog's ``era`` values); ``None`` when the value names no decade."""
    v = fold(value).strip().replace("’", "'").replace("'s", "s")
    if v in ERA_WORDS:
        return f"{ERA_WORDS[v]}s"
    m = _ERA_RE.match(v)
    if not m:
        return None
    if m.group("y"):
        return f"{int(m.group('y')) // 10 * 10}s"
    century, decade = m.group("c"), int(m.group("d"))
    if century is None:  # "90s" -> 1990s, "20s" -> 2020s (music search: recent beats 1920s)
        century = "20" if decade <= 2 else "19"
    return f"{century}{decade}0s"


def artist_doc_id(name: str) -> str:
    """The catalog id of the artist entity named ``name`` (``artist:<sha1(fold(name))[:16]>``),
    computed exactly as :mod:`orchestrator.catalog` does, so arms can refer to it without a
    lookup round trip."""
    return "artist:" + hashlib.sha1(fold(name).encode()).hexdigest()[:16]


def _spellings(genre: str) -> list[str]:
    g = " ".join(genre.split())
    return [g, g.replace("-", " "), g.replace(" ", "-")]


def _clean(values: Iterable[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        v = " ".join(str(v).split())
        if v and len(v) <= _MAX_SLOT_CHARS and v not in out:
            out.append(v)
    return out


def slot_params(parsed: ParsedQuery | None, *, min_confidence: float = 0.0) -> dict[str, Any]:
    """Map the slots of ``parsed`` to template parameters.

    Returns only keys that have values: ``genres`` (each in its space and hyphen
    spellings), ``moods``, ``eras``, ``artists`` (lists, best first), ``artist`` /
    ``artist_id`` (the best artist and its catalog entity id) and
    ``entity_types``. Values are normalized to the catalog's vocabulary (lower-case genres,
    mood tags, ``1990s`` eras, ``track``/``album``/``artist``); values that map to nothing
    are dropped, so a slot can never turn into a filter that matches nothing by spelling.
    """
    if parsed is None:
        return {}
    out: dict[str, Any] = {}
    # The catalog spells one genre several ways ("hard rock" / "hard-rock", "hip hop" /
    # "hip-hop"): its sources disagree, so a slot matches every spelling.
    genres = _clean(g for v in parsed.values("genre", min_confidence=min_confidence)
                    for g in _spellings(v.lower()))
    if genres:
        out["genres"] = genres[:_MAX_SLOT_VALUES * 3]
    moods = _clean(m for v in parsed.values("mood", min_confidence=min_confidence)
                   for m in MOOD_WORDS.get(fold(v).strip(), []))
    if moods:
        out["moods"] = moods[:_MAX_SLOT_VALUES]
    eras = _clean(e for v in parsed.values("era", min_confidence=min_confidence)
                  if (e := normalize_era(v)) is not None)
    if eras:
        out["eras"] = eras[:_MAX_SLOT_VALUES]
    artists = _clean(parsed.values("artist", min_confidence=min_confidence))
    if artists:
        artists = artists[:_MAX_SLOT_VALUES]
        out["artists"] = artists
        out["artist"] = artists[0]
        out["artist_id"] = artist_doc_id(artists[0])
    kinds = _clean(k for v in parsed.values("entity_type", min_confidence=min_confidence)
                   if (k := _ENTITY_WORDS.get(fold(v).strip())) is not None)
    if kinds:
        out["entity_types"] = kinds
    return out


# -- arm metadata --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ArmSpec:
    """What the sidecar says about an arm, typed: for the selector (``action_features``) and
    for :func:`applicable` (slot requirements)."""

    name: str
    template_id: str
    version: int
    description: str
    #: Slot categories that must all be present.
    required_slots: tuple[str, ...] = ()
    #: Slot categories of which at least one must be present (empty: no such requirement).
    required_slots_any: tuple[str, ...] = ()
    action_features: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    #: The arm needs the query embedding (``query_vector``).
    needs_vector: bool = False


def arm_spec(template: SearchTemplate) -> ArmSpec:
    """Read a template's sidecar into an :class:`ArmSpec`; unknown slot names are an error.

    Raises
    ------
    TemplateParamsError
        The sidecar names a slot category that query understanding never produces.
    """
    meta = template.meta
    req = tuple(meta.get("required_slots", ()))
    req_any = tuple(meta.get("required_slots_any", ()))
    unknown = sorted(set(req + req_any) - set(SLOT_CATEGORIES))
    if unknown:
        raise TemplateParamsError(
            f"{template.id}: required slots {unknown} are not slot categories; "
            f"use {list(SLOT_CATEGORIES)}"
        )
    return ArmSpec(
        name=template.arm, template_id=template.id, version=template.version,
        description=str(meta.get("description", "")), required_slots=req,
        required_slots_any=req_any, action_features=dict(meta.get("action_features", {})),
        needs_vector=any(p.name == "query_vector" for p in template.params),
    )


def arm_specs(registry: TemplateRegistry) -> dict[str, ArmSpec]:
    """``{arm name: ArmSpec}`` for the newest version of every arm in ``registry``."""
    return {t.arm: arm_spec(t) for t in registry}


def applicable(template: SearchTemplate, parsed: ParsedQuery | None) -> bool:
    """Whether the arm can run for ``parsed``: every ``required_slots`` category is filled
    (after normalization: a mood no tag matches does not count) and, when the sidecar has
    ``required_slots_any``, at least one of those is. Without a parse only slot-free arms run."""
    spec = arm_spec(template)
    if not spec.required_slots and not spec.required_slots_any:
        return True
    filled = _filled_categories(slot_params(parsed))
    if not all(c in filled for c in spec.required_slots):
        return False
    return not spec.required_slots_any or any(c in filled for c in spec.required_slots_any)


_PARAM_TO_CATEGORY = {"genres": "genre", "moods": "mood", "eras": "era", "artists": "artist",
                      "entity_types": "entity_type"}


def _filled_categories(params: Mapping[str, Any]) -> set[str]:
    return {_PARAM_TO_CATEGORY[k] for k in params if k in _PARAM_TO_CATEGORY}


# -- requests ------------------------------------------------------------------------------

def build_request(template: SearchTemplate, available: dict[str, Any]) -> ArmRequest:
    """Pick the declared parameters out of ``available`` for ``template``."""
    declared = {p.name for p in template.params}
    params = {k: v for k, v in available.items() if k in declared and v is not None}
    return ArmRequest(template.arm, template.id, params)


def knn_candidates(size: int, *, factor: int = 5, floor: int = 100, cap: int = 10_000) -> int:
    """HNSW candidate pool for ``k = size``: recall needs several times k (and not fewer
    than ``floor`` for small k); Elasticsearch refuses more than 10,000."""
    return max(1, min(cap, max(size * factor, floor)))


def build_requests(
    registry: TemplateRegistry,
    parsed: ParsedQuery | None,
    query: str,
    *,
    budgets: Mapping[str, int],
    vector: Sequence[float] | None,
    seed: int | None = None,
    max_query_chars: int = 256,
    today: _dt.date | None = None,
) -> list[ArmRequest]:
    """The requests for the arms in ``budgets`` (arm name or template id -> hits wanted), in
    that order, skipping arms that cannot run for this query.

    An arm is skipped (logged at DEBUG) when its budget is 0, when :func:`applicable` says its
    slots are missing, when it needs the query vector and ``vector`` is None, or when a
    required parameter has no value (e.g. ``memory`` for a query of punctuation only).

    Parameters
    ----------
    registry:
        The arm templates.
    parsed:
        Query understanding output, or None (then only slot-free arms run).
    query:
        The user's query; validated here.
    budgets:
        Hits per arm, chosen by the selector.
    vector:
        The query embedding (``get_encoder(settings.embedding).encode([query])[0]``), or None.
    seed:
        Seed of the ``explore`` arm's random order; log it with the impression to replay it.
        Default: a fresh random seed.
    max_query_chars:
        Longer queries are refused.
    today:
        Reference date for recency (``explore``); default: today.

    Returns
    -------
    list[ArmRequest]
        One per runnable arm, with parameters already validated against the sidecar.

    Raises
    ------
    QueryValidationError
        The query is empty, too long or has control characters.
    TemplateNotFoundError
        A budget names an arm that has no template.
    TemplateParamsError
        A parameter derived from the query breaks a template's limits (e.g. a query whose
        accent folding expands it past ``max_chars``).
    """
    q = validate_query(query, max_chars=max_query_chars)
    slots = slot_params(parsed)
    shared: dict[str, Any] = {
        **base_params(q, size=0), **slots,
        "terms": _clean(query_terms(q) + slots.get("genres", []) + slots.get("moods", []))[:48],
        "seed": seed if seed is not None else random.SystemRandom().randrange(2**31 - 1),
        "origin_year": (today or _dt.date.today()).year,
        "query_vector": list(vector) if vector is not None else None,
    }
    requests: list[ArmRequest] = []
    for name, size in budgets.items():
        template = registry.get(name)
        if size <= 0:
            logger.debug("arm %s skipped: budget %s", template.arm, size)
            continue
        if not applicable(template, parsed):
            logger.debug("arm %s skipped: needs slots the query lacks", template.arm)
            continue
        available = {**shared, "size": size, "k": size, "num_candidates": knn_candidates(size)}
        req = build_request(template, available)
        missing = [p.name for p in template.params
                   if p.required and req.params.get(p.name) in (None, "")]
        if missing:
            logger.debug("arm %s skipped: no value for %s", template.arm, missing)
            continue
        requests.append(ArmRequest(req.arm, req.template_id, template.validate_params(req.params)))
    return requests
