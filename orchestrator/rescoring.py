"""Order the merged candidates with a (learned) linear ranker.

Consumes :class:`Candidate` s (with provenance) plus the query and its :class:`ParsedQuery`;
produces ``(candidate, score, features)`` triples, best first. Features (named, see
:data:`GENERIC_FEATURES`; per arm ``rank:<arm>`` = log1p(rank) with sentinel log1p(1000)
when the arm did not return the candidate, ``nscore:<arm>`` = score / arm's top score, -1
when missing):

* fusion: ``rrf`` (sum 1/(60 + rank)), ``n_arms`` agreeing, ``best_rank_log``, ``max_norm_score``
* priors: ``popularity``, ``artist_popularity`` (0..1), ``log_listeners``
* QU slot matches: ``artist_match``, ``title_match``, ``album_match``, ``genre_match``,
  ``mood_match``, ``era_match``; query/title ``title_exact`` and ``title_overlap`` (Jaccard)
* ``memory_score`` (the memory arm's normalised score), ``type_intent_match`` (entity type
  vs intent / entity_type slot), ``is_track`` / ``is_artist`` / ``is_album``
* the learned memory's evidence for the (query, item) pair, from the candidate's
  ``source["_memory"] = {"ctr", "exposures", "clicks"}`` (set when the memory arm returned the
  item): ``memory_ctr`` = its CTR shrunk toward :data:`MEMORY_CTR_PRIOR` with
  :data:`MEMORY_CTR_PRIOR_EXPOSURES` pseudo-exposures, ``memory_log_exposures`` =
  ``log1p(exposures)``. Absent, they take their no-evidence values (``MEMORY_CTR_PRIOR`` and
  0): the state of a pair the memory has never shown, neither a reward nor a penalty. (The
  memory's ``ctr`` is already a posterior mean, :func:`orchestrator.memory.memory_score`; the
  extra shrinkage is what makes "absent" and "no exposures yet" the same value.)
* with ``rescorer.intent_split`` (the default), a copy ``<feature>|browse`` of every feature
  above: the feature on queries whose intent is browse / topical / broad, a constant on
  lookups (:class:`FeatureExtractor`), so one linear model can weigh the arms differently
  for descriptive queries and for lookups

Missing features are neutral, not 0. A feature a model knows but the extractor does not
produce (an arm removed from the registry, a model from a wider layout) takes the model's
stored neutral value (``missing`` in the JSON): :data:`MISSING_RANK` for ``rank:<arm>`` and
``best_rank_log`` (as if the arm had not returned the item; 0 = log1p(0) would score better
than rank 1), :data:`MISSING_SCORE` for ``nscore:<arm>``, the no-evidence values of the memory
features, and the training mean otherwise (no contribution). Models saved before
``schema_version`` 2 get these values when loaded.

The default model, before any training, is reciprocal-rank fusion plus small priors
(:data:`DEFAULT_WEIGHTS`: a top-ranked RRF contribution is 1/61 = 0.016; popularity adds at
most 0.002; a candidate matching the query's title and artist slots gains 0.016-0.024, about
one top rank: what QU recognised outranks arm agreement on loosely related items, while
fusion still orders everything else).

Training without position bias (:func:`train_rescorer` with :func:`ips_weights`): an IPS-weighted
pointwise logistic loss. Under the position-based model a shown item at display position ``k``
is clicked with probability ``theta_k * r`` (``theta`` from :mod:`orchestrator.examination`), so
weighting each clicked row by ``1 / theta_k`` makes the expected positive mass of an item ``r``
wherever it was shown (Joachims, Swaminathan & Schnabel 2017, "Unbiased learning-to-rank with
biased feedback"; Wang et al. 2016, "Learning to rank with selection bias in personal search").
Unclicked rows keep weight 1: their expected mass ``1 - theta_k r`` is close to ``1 - r`` when
click rates are small (the exact unbiased loss, Saito et al. 2020, needs negative weights
``1 - 1 / theta_k`` on clicked rows, which a convex solver cannot take). Weights are capped
(``rescorer.ips_cap``) so a lucky deep click cannot dominate: bias traded for variance.

Trained models are scikit-learn logistic regressions on standardised features, stored as
versioned JSON (coefficients + metadata), never pickle: ``rescorer.v<N>.json`` files in a
model folder whose ``current`` pointer (JSON ``{"version": N, ...}``, replaced atomically)
names the promoted one (:func:`orchestrator.training.retrain_ranker` writes both; running
orchestrators poll the pointer and switch without a restart).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .domain import Candidate, ParsedQuery
from .errors import NotFittedError, StateVersionError
from .merging import RRF_K
from .text import fold, normalize_query

SCHEMA_VERSION = 2
#: Model files this code reads (1: before per-feature neutral values were stored).
READABLE_SCHEMA_VERSIONS = (1, 2)
MISSING_RANK = math.log1p(1000)
MISSING_SCORE = -1.0
#: ``memory_ctr`` of a pair without evidence, and the pseudo-exposures it is shrunk with.
MEMORY_CTR_PRIOR = 0.1
MEMORY_CTR_PRIOR_EXPOSURES = 2.0

GENERIC_FEATURES: tuple[str, ...] = (
    "rrf", "n_arms", "best_rank_log", "max_norm_score",
    "popularity", "artist_popularity", "log_listeners",
    "artist_match", "title_match", "album_match", "genre_match", "mood_match", "era_match",
    "title_exact", "title_overlap", "memory_score", "type_intent_match",
    "is_track", "is_artist", "is_album", "memory_ctr", "memory_log_exposures",
)

#: Intents whose queries get the ``|browse`` feature copies (``FeatureExtractor(intent_split=
#: True)``): descriptive queries with many right answers; the others (``known_item``,
#: ``artist``) are lookups.
BROWSE_INTENTS: frozenset[str] = frozenset({"browse", "topical", "broad"})
SPLIT_SUFFIX = "|browse"

#: Neutral values of features whose 0 means something (see the module docstring); other
#: features are neutral at their training mean.
_NEUTRAL_FIXED: dict[str, float] = {"best_rank_log": MISSING_RANK,
                                    "memory_ctr": MEMORY_CTR_PRIOR, "memory_log_exposures": 0.0}


def neutral_value(name: str, mean: float = 0.0) -> float:
    """The value a model gives feature ``name`` when the extractor does not produce it."""
    if name.startswith("rank:"):
        return MISSING_RANK
    if name.startswith("nscore:"):
        return MISSING_SCORE
    return _NEUTRAL_FIXED.get(name, float(mean))


def memory_features(memory: Any) -> tuple[float, float]:
    """``(memory_ctr, memory_log_exposures)`` of a candidate's ``source["_memory"]`` (module
    docstring); the no-evidence values when it is absent or malformed."""
    if not isinstance(memory, Mapping):
        return MEMORY_CTR_PRIOR, 0.0
    try:
        ctr = float(memory.get("ctr") or 0.0)
        exposures = float(memory.get("exposures") or 0.0)
    except (TypeError, ValueError):
        return MEMORY_CTR_PRIOR, 0.0
    if not (math.isfinite(ctr) and math.isfinite(exposures)) or exposures <= 0:
        return MEMORY_CTR_PRIOR, 0.0
    ctr = max(ctr, 0.0)  # action-weighted click sums can exceed the examinations: no upper clip
    s0 = MEMORY_CTR_PRIOR_EXPOSURES
    return (ctr * exposures + MEMORY_CTR_PRIOR * s0) / (exposures + s0), math.log1p(exposures)

DEFAULT_WEIGHTS: dict[str, float] = {
    "rrf": 1.0, "popularity": 0.002, "artist_match": 0.008, "title_match": 0.008,
    "album_match": 0.004, "genre_match": 0.002, "mood_match": 0.001, "era_match": 0.001,
    "title_exact": 0.008, "type_intent_match": 0.003,
}

#: Entity types an intent asks for (``type_intent_match``); other intents have no preference.
_INTENT_TYPES = {"artist": ("artist",), "known_item": ("track", "album"),
                 "browse": ("track",), "topical": ("track",)}
_TOKEN = re.compile(r"\w+", re.UNICODE)


def _as_list(v: Any) -> list[str]:
    if v is None:
        return []
    return [str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)]


def _split_fill(name: str) -> float:
    """The constant a ``<feature>|browse`` column takes on a lookup query."""
    if name.startswith("rank:") or name == "best_rank_log":
        return MISSING_RANK
    if name.startswith("nscore:"):
        return MISSING_SCORE
    return 0.0


class FeatureExtractor:
    """Compute the named features of candidates for one query (see the module docstring).

    ``intent_split=True`` adds a copy of every feature, ``<feature>|browse``, that equals it
    on queries whose intent is in :data:`BROWSE_INTENTS` and is a constant on the others
    (lookups): a linear model over both is two models sharing one part, so the ranker can
    learn that a deep ``explore`` or ``structured`` rank means something for "chill jazz"
    that it does not for "shape of you". A constant within a query never changes an order.
    """

    def __init__(self, arms: Sequence[str] = (), *, intent_split: bool = False) -> None:
        self.arms = tuple(arms)
        self.intent_split = bool(intent_split)
        base = GENERIC_FEATURES + tuple(
            f"{kind}:{a}" for a in self.arms for kind in ("rank", "nscore"))
        self._n_base = len(base)
        self._split_fill = np.array([_split_fill(n) for n in base])
        self.names: tuple[str, ...] = base + (
            tuple(f"{n}{SPLIT_SUFFIX}" for n in base) if self.intent_split else ())

    def _query_info(self, query: str, parsed: ParsedQuery | None) -> dict[str, Any]:
        nq = normalize_query(query)
        info: dict[str, Any] = {"nq": nq, "tokens": set(nq.split())}
        slots: dict[str, set[str]] = {}
        if parsed is not None:
            for s in parsed.slots:
                slots.setdefault(s.category, set()).add(fold(s.value).strip())
            info["intent"] = parsed.intent
        info["slots"] = slots
        info["title_slots"] = {normalize_query(v) for v in slots.get("track", set()) | slots.get("album", set())}
        info["album_slots"] = {normalize_query(v) for v in slots.get("album", set())}
        return info

    def rows(self, candidates: Sequence[Candidate], *, query: str,
             parsed: ParsedQuery | None) -> np.ndarray:
        qi = self._query_info(query, parsed)
        slots: dict[str, set[str]] = qi["slots"]
        intent = qi.get("intent")
        want_types: set[str] = slots.get("entity_type") or set(_INTENT_TYPES.get(intent or "", ()))
        arm_pos = {a: i for i, a in enumerate(self.arms)}
        n_generic = len(GENERIC_FEATURES)
        X = np.zeros((len(candidates), len(self.names)))
        if self.arms:
            X[:, n_generic:self._n_base:2] = MISSING_RANK
            X[:, n_generic + 1:self._n_base:2] = MISSING_SCORE
        qtok = qi["tokens"]
        for r, c in enumerate(candidates):
            src = c.source
            prov = c.provenance
            row = X[r]
            row[0] = sum(1.0 / (RRF_K + p.rank) for p in prov)
            row[1] = len(prov)
            row[2] = math.log1p(min(p.rank for p in prov)) if prov else MISSING_RANK
            row[3] = max((p.norm_score for p in prov), default=0.0)
            row[4] = float(src.get("popularity") or 0.0) / 100.0
            row[5] = float(src.get("artist_popularity") or 0.0) / 100.0
            row[6] = math.log1p(float(src.get("listeners") or 0.0)) / 15.0
            title = normalize_query(str(src.get("title") or ""))
            etype = src.get("entity_type")
            if slots:
                artists = {fold(a).strip() for a in _as_list(src.get("artist"))}
                if etype == "artist":
                    artists.add(fold(str(src.get("title") or "")).strip())
                row[7] = float(bool(artists & slots.get("artist", set())))
                row[8] = float(title in qi["title_slots"])
                row[9] = float(normalize_query(str(src.get("album") or "")) in qi["album_slots"])
                if "genre" in slots:
                    g = {x.lower() for x in _as_list(src.get("genres")) + _as_list(src.get("artist_genres"))}
                    row[10] = float(bool(g & slots["genre"]))
                if "mood" in slots:
                    row[11] = float(bool({x.lower() for x in _as_list(src.get("moods"))} & slots["mood"]))
                if "era" in slots:
                    row[12] = float(str(src.get("era") or "").lower() in slots["era"])
            row[13] = float(bool(title) and title == qi["nq"])
            if title and qtok:
                ttok = set(title.split())
                row[14] = len(ttok & qtok) / len(ttok | qtok)
            for p in prov:
                if p.arm == "memory":
                    row[15] = max(row[15], p.norm_score)
                j = arm_pos.get(p.arm)
                if j is not None:
                    row[n_generic + 2 * j] = math.log1p(p.rank)
                    row[n_generic + 2 * j + 1] = p.norm_score
            row[16] = float(etype in want_types) if want_types else 0.0
            row[17] = float(etype == "track")
            row[18] = float(etype == "artist")
            row[19] = float(etype == "album")
            row[20], row[21] = memory_features(src.get("_memory"))
        if self.intent_split:
            nb = self._n_base
            if intent in BROWSE_INTENTS:
                X[:, nb:] = X[:, :nb]
            else:
                X[:, nb:] = self._split_fill
        return X


class Rescorer(Protocol):
    name: str

    def rank(self, candidates: Sequence[Candidate], *, query: str, parsed: ParsedQuery | None,
             ) -> list[tuple[Candidate, float, np.ndarray]]: ...


class LinearRescorer:
    """``score = intercept + coef . (x - mean) / scale`` over named features.

    The default (:meth:`default`) is RRF plus small priors; :func:`train_rescorer` fits one
    from logged feedback. Features the model does not know are ignored; features it knows
    but the extractor lacks take their neutral value ``missing_`` (default
    :func:`neutral_value` of the feature and its mean, see the module docstring).

    Attributes
    ----------
    feature_names, coef_, intercept_, mean_, scale_, missing_, metadata
    """

    def __init__(self, *, feature_names: Sequence[str], coef: Sequence[float],
                 intercept: float = 0.0, mean: Sequence[float] | None = None,
                 scale: Sequence[float] | None = None, name: str = "linear",
                 metadata: Mapping[str, Any] | None = None,
                 missing: Sequence[float] | None = None) -> None:
        self.feature_names = tuple(feature_names)
        self.coef_ = np.asarray(coef, dtype=float)
        if len(self.coef_) != len(self.feature_names):
            raise ValueError("coef and feature_names differ in length")
        self.intercept_ = float(intercept)
        self.mean_ = np.zeros(len(self.coef_)) if mean is None else np.asarray(mean, dtype=float)
        self.scale_ = np.ones(len(self.coef_)) if scale is None else np.asarray(scale, dtype=float)
        self.missing_ = (np.array([neutral_value(n, m) for n, m in zip(self.feature_names, self.mean_)])
                         if missing is None else np.asarray(missing, dtype=float))
        if not len(self.mean_) == len(self.scale_) == len(self.missing_) == len(self.coef_):
            raise ValueError("mean, scale and missing must have one value per feature")
        self.name = name
        self.metadata = dict(metadata or {})
        self._proj: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray, float]] = {}

    @classmethod
    def default(cls) -> LinearRescorer:
        names = tuple(DEFAULT_WEIGHTS)
        return cls(feature_names=names, coef=[DEFAULT_WEIGHTS[n] for n in names],
                   name="default-rrf", metadata={"kind": "default", "schema_version": SCHEMA_VERSION})

    def _projection(self, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, float]:
        """Weights over the extractor's columns (cached per column layout)."""
        hit = self._proj.get(names)
        if hit is None:
            pos = {n: i for i, n in enumerate(names)}
            w = np.zeros(len(names))
            offset = self.intercept_
            for n, c, m, s, v in zip(self.feature_names, self.coef_, self.mean_, self.scale_,
                                     self.missing_):
                s = s if s > 0 else 1.0
                if n in pos:
                    w[pos[n]] += c / s
                    offset -= c * m / s
                else:
                    offset += c * (v - m) / s  # the extractor lacks it: its neutral value
            cols = np.nonzero(w)[0]
            hit = (cols, w[cols], offset)
            self._proj[names] = hit
        return hit

    def score(self, X: np.ndarray, names: Sequence[str]) -> np.ndarray:
        cols, w, offset = self._projection(tuple(names))
        return X[:, cols] @ w + offset

    def rank(self, candidates: Sequence[Candidate], *, query: str, parsed: ParsedQuery | None,
             extractor: FeatureExtractor | None = None) -> list[tuple[Candidate, float, np.ndarray]]:
        if not candidates:
            return []
        ex = extractor or FeatureExtractor()
        X = ex.rows(candidates, query=query, parsed=parsed)
        s = self.score(X, ex.names)
        order = np.argsort(-s, kind="stable")
        return [(candidates[i], float(s[i]), X[i]) for i in order]

    # -- persistence (versioned JSON) ------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "linear",
            "name": self.name,
            "feature_names": list(self.feature_names),
            "coef": self.coef_.tolist(),
            "intercept": self.intercept_,
            "mean": self.mean_.tolist(),
            "scale": self.scale_.tolist(),
            "missing": self.missing_.tolist(),
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LinearRescorer:
        """Read a model dict; version 1 files (no ``missing``) get the default neutral values."""
        if d.get("schema_version") not in READABLE_SCHEMA_VERSIONS or d.get("kind") != "linear":
            raise StateVersionError(
                f"rescorer model has schema_version={d.get('schema_version')!r} "
                f"kind={d.get('kind')!r}; this code reads schema_version in "
                f"{READABLE_SCHEMA_VERSIONS} kind='linear'"
            )
        missing = d.get("missing") if d["schema_version"] >= 2 else None
        return cls(feature_names=d["feature_names"], coef=d["coef"], intercept=d["intercept"],
                   mean=d["mean"], scale=d["scale"], name=d.get("name", "linear"),
                   metadata=d.get("metadata"), missing=missing)

    def save(self, folder: Path) -> Path:
        """Write ``rescorer.v<N>.json`` (N = next free version, recorded in ``metadata``) and
        return its path. Safe against concurrent writers: the file is written under a unique
        temporary name and published with a hard link, which fails instead of overwriting
        when another process took version N first (then N + 1 is tried)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        version = 1 + max((_version_of(p) for p in folder.glob("rescorer.v*.json")), default=0)
        tmp = folder / f".rescorer.{uuid.uuid4().hex}.tmp"
        try:
            while True:
                self.metadata["version"] = version
                tmp.write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")
                path = folder / f"rescorer.v{version}.json"
                try:
                    os.link(tmp, path)
                    return path
                except FileExistsError:
                    version += 1
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path: Path) -> LinearRescorer:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _version_of(path: Path) -> int:
    m = re.search(r"\.v(\d+)\.json$", path.name)
    return int(m.group(1)) if m else 0


#: Pointer file of a model folder: ``{"version": N, ...}``, the promoted model. Replaced
#: atomically (``os.replace``), so readers see the old or the new pointer, never half of one.
CURRENT_POINTER = "current"


def read_pointer(folder: Path | None) -> dict[str, Any] | None:
    """The ``current`` pointer of ``folder`` (None when there is none)."""
    if folder is None:
        return None
    try:
        data = json.loads((Path(folder) / CURRENT_POINTER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("version"), int):
        raise StateVersionError(f"malformed rescorer pointer {Path(folder) / CURRENT_POINTER}: {data!r}")
    return data


def write_pointer(folder: Path, version: int, **info: Any) -> Path:
    """Atomically point ``folder``'s ``current`` at ``rescorer.v<version>.json`` (which must
    exist); ``info`` (JSON-able) is stored alongside."""
    folder = Path(folder)
    if version and not (folder / f"rescorer.v{version}.json").is_file():
        raise FileNotFoundError(folder / f"rescorer.v{version}.json")
    path = folder / CURRENT_POINTER
    tmp = folder / f".{CURRENT_POINTER}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps({"version": int(version), **info}, indent=2), encoding="utf-8")
    os.replace(tmp, path)
    return path


def current_version(folder: Path | None) -> int:
    """The version in use for ``folder``: its ``current`` pointer, else (folders written
    before pointers existed) the newest ``rescorer.v<N>.json``, else 0 (the default model).
    Cheap (one small file read), so running orchestrators poll it."""
    if folder is None or not Path(folder).is_dir():
        return 0
    pointer = read_pointer(folder)
    if pointer is not None:
        return int(pointer["version"])
    return max((_version_of(p) for p in Path(folder).glob("rescorer.v*.json")), default=0)


def load_version(folder: Path | None, version: int) -> LinearRescorer:
    """``rescorer.v<version>.json`` of ``folder``; version 0 is the default model."""
    if version == 0 or folder is None:
        return LinearRescorer.default()
    model = LinearRescorer.load(Path(folder) / f"rescorer.v{version}.json")
    model.metadata["version"] = version
    return model


def load_latest(folder: Path | None) -> LinearRescorer:
    """The promoted model of ``folder`` (see :func:`current_version`), or the default model."""
    return load_version(folder, current_version(folder))


def train_rescorer(X: np.ndarray, y: np.ndarray, *, feature_names: Sequence[str],
                   sample_weight: np.ndarray | None = None, C: float = 1.0,
                   random_state: int = 0) -> LinearRescorer:
    """Fit a logistic regression (standardised features, balanced classes) and return it as
    a :class:`LinearRescorer` whose scores are the logits."""
    from sklearn import __version__ as sk_version
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=int)
    if len(np.unique(y)) < 2:
        raise NotFittedError("training data needs both positive and negative examples")
    mean = X.mean(axis=0)
    scale = X.std(axis=0)
    scale[scale == 0] = 1.0
    Z = (X - mean) / scale
    if sample_weight is not None:
        sample_weight = np.asarray(sample_weight, dtype=float)
        if sample_weight.shape != y.shape or not np.all(np.isfinite(sample_weight)) \
                or np.any(sample_weight < 0):
            raise ValueError("sample_weight must be one finite, non-negative weight per row")
    model = LogisticRegression(C=C, class_weight="balanced", max_iter=1000, random_state=random_state)
    model.fit(Z, y, sample_weight=sample_weight)
    auc = float(roc_auc_score(y, model.decision_function(Z)))
    return LinearRescorer(
        feature_names=feature_names, coef=model.coef_[0], intercept=float(model.intercept_[0]),
        mean=mean, scale=scale, name="logistic",
        metadata={"kind": "logistic", "sklearn_version": sk_version, "n_samples": len(y),
                  "n_positive": int(y.sum()), "train_auc": auc, "C": C,
                  "weighted": sample_weight is not None,
                  "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    )


def ips_weights(y: np.ndarray, positions: np.ndarray, examination: Any, *,
                cap: float) -> np.ndarray:
    """Training weights of the IPS-weighted loss (module docstring): ``min(1 / theta_k, cap)``
    for a clicked row shown at display position ``k``, 1 for the others. ``examination`` is an
    :class:`orchestrator.examination.ExaminationModel` (anything with ``propensity(k)``)."""
    y = np.asarray(y)
    positions = np.asarray(positions, dtype=int)
    w = np.ones(len(y), dtype=float)
    for i in np.nonzero(y > 0)[0]:
        theta = max(float(examination.propensity(int(positions[i]))), 1e-12)
        w[i] = max(1.0, min(1.0 / theta, float(cap)))
    return w


def dataset_from_events(events: Iterable[Mapping[str, Any]], *,
                        positive_actions: Iterable[str] = ("click", "play", "like", "favorite"),
                        ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Join impression events (shown items with their features) and feedback events into a
    training set. Only impressions with at least one feedback are used; an item is positive
    if any positive action hit it, negative otherwise (shown, not chosen, or skipped).
    :func:`dataset_with_positions` also gives each row's display position."""
    X, y, names, _ = dataset_with_positions(events, positive_actions=positive_actions)
    return X, y, names


def dataset_with_positions(events: Iterable[Mapping[str, Any]], *,
                           positive_actions: Iterable[str] = ("click", "play", "like", "favorite"),
                           ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], np.ndarray]:
    """:func:`dataset_from_events` plus the display position of every row (the shown item's
    logged ``rank``, which is the position the user saw, swaps included; its index + 1 when
    the log has none), for inverse-propensity weights."""
    positive = set(positive_actions)
    impressions: dict[str, Mapping[str, Any]] = {}
    labels: dict[str, dict[str, int]] = {}
    for ev in events:
        if ev.get("type") == "impression":
            impressions[ev["request_id"]] = ev
        elif ev.get("type") == "feedback":
            lab = labels.setdefault(ev["request_id"], {})
            lab[ev["item_id"]] = max(lab.get(ev["item_id"], 0), int(ev["action"] in positive))
    names: tuple[str, ...] | None = None
    rows, ys, pos = [], [], []
    for rid, lab in labels.items():
        imp = impressions.get(rid)
        if imp is None:
            continue
        fnames = tuple(imp["feature_names"])
        if names is None:
            names = fnames
        if fnames != names:
            continue  # a different arm layout; train per layout
        for j, item in enumerate(imp["shown"], start=1):
            rows.append(item["features"])
            ys.append(lab.get(item["id"], 0))
            try:
                pos.append(max(1, int(item.get("rank") or j)))
            except (TypeError, ValueError):
                pos.append(j)
    if names is None:
        return np.zeros((0, 0)), np.zeros(0), (), np.zeros(0, dtype=int)
    return (np.asarray(rows, dtype=float), np.asarray(ys, dtype=int), names,
            np.asarray(pos, dtype=int))
