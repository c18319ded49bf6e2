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

The default model, before any training, is reciprocal-rank fusion plus small priors
(:data:`DEFAULT_WEIGHTS`: a top-ranked RRF contribution is 1/61 = 0.016; popularity adds at
most 0.002; a candidate matching the query's title and artist slots gains 0.016-0.024, about
one top rank: what QU recognised outranks arm agreement on loosely related items, while
fusion still orders everything else).
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

SCHEMA_VERSION = 1
MISSING_RANK = math.log1p(1000)
MISSING_SCORE = -1.0

GENERIC_FEATURES: tuple[str, ...] = (
    "rrf", "n_arms", "best_rank_log", "max_norm_score",
    "popularity", "artist_popularity", "log_listeners",
    "artist_match", "title_match", "album_match", "genre_match", "mood_match", "era_match",
    "title_exact", "title_overlap", "memory_score", "type_intent_match",
    "is_track", "is_artist", "is_album",
)

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


class FeatureExtractor:
    """Compute the named features of candidates for one query (see the module docstring)."""

    def __init__(self, arms: Sequence[str] = ()) -> None:
        self.arms = tuple(arms)
        self.names: tuple[str, ...] = GENERIC_FEATURES + tuple(
            f"{kind}:{a}" for a in self.arms for kind in ("rank", "nscore"))

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
            X[:, n_generic::2] = MISSING_RANK
            X[:, n_generic + 1::2] = MISSING_SCORE
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
        return X


class Rescorer(Protocol):
    name: str

    def rank(self, candidates: Sequence[Candidate], *, query: str, parsed: ParsedQuery | None,
             ) -> list[tuple[Candidate, float, np.ndarray]]: ...


class LinearRescorer:
    """``score = intercept + coef . (x - mean) / scale`` over named features.

    The default (:meth:`default`) is RRF plus small priors; :func:`train_rescorer` fits one
    from logged feedback. Features the model does not know are ignored; features it knows
    but the extractor lacks are 0.

    Attributes
    ----------
    feature_names, coef_, intercept_, mean_, scale_, metadata
    """

    def __init__(self, *, feature_names: Sequence[str], coef: Sequence[float],
                 intercept: float = 0.0, mean: Sequence[float] | None = None,
                 scale: Sequence[float] | None = None, name: str = "linear",
                 metadata: Mapping[str, Any] | None = None) -> None:
        self.feature_names = tuple(feature_names)
        self.coef_ = np.asarray(coef, dtype=float)
        if len(self.coef_) != len(self.feature_names):
            raise ValueError("coef and feature_names differ in length")
        self.intercept_ = float(intercept)
        self.mean_ = np.zeros(len(self.coef_)) if mean is None else np.asarray(mean, dtype=float)
        self.scale_ = np.ones(len(self.coef_)) if scale is None else np.asarray(scale, dtype=float)
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
            for n, c, m, s in zip(self.feature_names, self.coef_, self.mean_, self.scale_):
                s = s if s > 0 else 1.0
                if n in pos:
                    w[pos[n]] += c / s
                offset -= c * m / s  # a missing feature counts as 0
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
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LinearRescorer:
        if d.get("schema_version") != SCHEMA_VERSION or d.get("kind") != "linear":
            raise StateVersionError(
                f"rescorer model has schema_version={d.get('schema_version')!r} "
                f"kind={d.get('kind')!r}; this code reads schema_version={SCHEMA_VERSION} kind='linear'"
            )
        return cls(feature_names=d["feature_names"], coef=d["coef"], intercept=d["intercept"],
                   mean=d["mean"], scale=d["scale"], name=d.get("name", "linear"),
                   metadata=d.get("metadata"))

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
    model = LogisticRegression(C=C, class_weight="balanced", max_iter=1000, random_state=random_state)
    model.fit(Z, y, sample_weight=sample_weight)
    auc = float(roc_auc_score(y, model.decision_function(Z)))
    return LinearRescorer(
        feature_names=feature_names, coef=model.coef_[0], intercept=float(model.intercept_[0]),
        mean=mean, scale=scale, name="logistic",
        metadata={"kind": "logistic", "sklearn_version": sk_version, "n_samples": len(y),
                  "n_positive": int(y.sum()), "train_auc": auc, "C": C,
                  "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    )


def dataset_from_events(events: Iterable[Mapping[str, Any]], *,
                        positive_actions: Iterable[str] = ("click", "play", "like", "favorite"),
                        ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Join impression events (shown items with their features) and feedback events into a
    training set. Only impressions with at least one feedback are used; an item is positive
    if any positive action hit it, negative otherwise (shown, not chosen, or skipped)."""
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
    rows, ys = [], []
    for rid, lab in labels.items():
        imp = impressions.get(rid)
        if imp is None:
            continue
        fnames = tuple(imp["feature_names"])
        if names is None:
            names = fnames
        if fnames != names:
            continue  # a different arm layout; train per layout
        for item in imp["shown"]:
            rows.append(item["features"])
            ys.append(lab.get(item["id"], 0))
    if names is None:
        return np.zeros((0, 0)), np.zeros(0), ()
    return np.asarray(rows, dtype=float), np.asarray(ys, dtype=int), names
