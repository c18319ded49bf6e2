"""Retrain query understanding from what users chose (click-derived labels), promote if better.

Consumes the feedback events of the events index joined with their impressions
(:func:`orchestrator.memory.load_interactions`) and the catalog documents of the chosen items;
produces a candidate ``qu_models/`` (intent classifier retrained on generated + click-derived
examples, plus *learned artist aliases* for the span ruler) that replaces the promoted model
only when it is better. Running processes pick the new version up without a restart
(:func:`orchestrator.understanding.get_understander` / ``ReloadingUnderstander``).

Click-derived labels
--------------------
What a user chose for a query says which kind of query it was. Every positive action (click,
play, like, favorite) on a catalog item is compared with the item's document
(:func:`derive_click_label`); the query's *core* is its normalised words minus filler and
entity words ("best", "songs", "lyrics" ...). Scores are rapidfuzz ratios in [0, 100];
a *match* is >= 85 and *no overlap* is < 60 (:data:`MATCH`, :data:`NO_OVERLAP`).

======================================  ==================  ==================================
the chosen item and the query           derivation (kind)    intent vote
======================================  ==================  ==================================
any item, query matches an artist name  ``artist_name``      ``artist`` (that artist)
artist entity, query not descriptive    ``artist_entity``    ``artist`` (that artist)
track/album, query matches its title,   ``title``            ``known_item``
or artist + title in any order
query words are all genres/moods/era    ``descriptor``       ``browse``
of the item (and no names)
... plus an occasion/activity word      ``occasion``         ``topical``
no overlap with names or descriptors    ``unmatched``        decided per query (below)
anything else (partial overlap, a       --                   not counted
self-titled item matching both ways)
======================================  ==================  ==================================

Per query (:func:`aggregate_labels`), only derivable clicks count and the label must be
*confident*: at least ``min_support`` votes for the winning intent, which must hold at least
``min_share`` (60%) of the query's derivable clicks. ``unmatched`` clicks are the interesting
ones: when one artist is behind at least ``alias_share`` (80%, and ``min_support``) of a
query's clicks (as the chosen artist, or as one of the artists of a chosen track, featured
ones included), they vote ``artist`` -- users repeatedly resolve the query to that artist
although it names no one we know ("queen b" -> Beyoncé). When they are spread over several
artists and the query has two or more core words they vote ``topical``; otherwise they are
dropped (a single unknown word is too ambiguous; ``broad`` is never derived from clicks).

A query labelled ``artist`` whose text is not that artist's exact name becomes a **learned
alias**: a span-ruler pattern (label ``artist_learned``) and a fuzzy-index entry with the
canonical artist, unless a popular artist (popularity >= 0.5) has exactly that name (users
choosing Beyoncé for "queen" must not hide the band). Aliases are recomputed from the whole
log on every run, so one that users stop confirming disappears with the next promotion.

Time split, evaluation and promotion
------------------------------------
Labelled clicks are split by time: the newest ``heldout_fraction`` (20%) of them form the
held-out slice, the rest the training window; labels are aggregated per window, so a query
users keep typing is in both (the slice asks "does the model serve what users searched
next?"). The candidate keeps the current ruler and lexicon, swaps its learned aliases for the
ones of the training window and retrains the text classifier from scratch on the generated
examples (``train/generated.jsonl.gz``, re-generated from the catalog when absent) plus the
click-derived ones. Current and candidate are evaluated on (a) the generated held-out set
(``eval/heldout.jsonl``) and (b) the click held-out slice (intent accuracy and artist-slot
accuracy pooled into one ``score``). The candidate is **promoted** only when

1. on (a) its intent accuracy and slot micro-F1 are each at most ``tolerance`` (0.005) below
   the current model's, and
2. on (b) its score is strictly higher, or equal while it learned from more click-derived
   queries than the current model did.

Promotion writes the candidate into ``<model_dir>.candidate`` and swaps it in by renaming
(readers never see half a model; the reloader keeps the old one during the swap). Nothing is
pickled: ``metadata.json`` records version, parent version, data hashes and the metrics of
both models. Re-running on the same events computes the same click-data hash and skips
(the hash of the promoted model, or of the last rejected candidate of that model, matches).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import random
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from elasticsearch import Elasticsearch

from .domain import INTENTS
from .memory import ACTION_WEIGHTS, Interaction, load_interactions
from .qu_training import (
    ENTITY_TERMS,
    FILLER_WORDS,
    GENRE_ALIASES,
    MOOD_ACTIVITIES,
    MOOD_ADJECTIVES,
    OCCASIONS,
    RECIPE_VERSION,
    TRAIN_EXAMPLES_FILE,
    QUExample,
    era_terms,
    evaluate,
    fit_intent,
    hash_examples,
    load_examples,
    load_heldout,
    regenerate_examples,
    save_examples,
    split_examples,
)
from .text import normalize_query
from .understanding import (
    ARTISTS_FILENAME,
    DEFAULT_MODEL_DIR,
    LEXICON_FILENAME,
    METADATA_FILENAME,
    PIPELINE_DIRNAME,
    Lexicon,
    QueryUnderstander,
    clean_title,
)

logger = logging.getLogger(__name__)

#: Version of the click-labelling and retraining rules (part of the click-data hash).
RETRAIN_RECIPE_VERSION = "1.0.0"
#: Ruler/lexicon label of aliases learned from clicks.
LEARNED_LABEL = "artist_learned"
#: rapidfuzz ratio at or above which a query *matches* a name or title.
MATCH = 85.0
#: rapidfuzz ratio below which a query has *no overlap* with a name or title.
NO_OVERLAP = 60.0
#: Actions that say the user wanted the item (positive weight in the Q2E memory).
POSITIVE_ACTIONS = frozenset(a for a, w in ACTION_WEIGHTS.items() if w > 0)
#: Catalog fields the labelling reads.
CATALOG_FIELDS = ("entity_type", "title", "artist", "album", "genres", "artist_genres",
                  "moods", "era")
CLICKS_FILE = "train/clicks.jsonl"

ClickKind = Literal["artist_name", "artist_entity", "title", "descriptor", "occasion",
                    "unmatched"]

#: Words that never decide what a query is about ("best", "songs", "lyrics", "the" ...).
_NOISE = (frozenset(FILLER_WORDS) | frozenset(ENTITY_TERMS)
          | frozenset({"lyrics", "lyric", "official", "video", "audio", "feat", "ft",
                       "featuring", "full", "version", "remastered", "remaster", "to"}))
#: Occasion/activity phrases ("road trip", "workout"): they make a descriptive query topical.
_OCCASION_PHRASES = tuple(sorted(
    {" ".join(w for w in normalize_query(p).split() if w not in _NOISE)
     for p in (*OCCASIONS, *MOOD_ACTIVITIES)} - {""}, key=lambda p: -len(p)))
_ERA_TERMS = era_terms()
_MOOD_WORDS: dict[str, frozenset[str]] = {}
for _term, _mood in MOOD_ADJECTIVES.items():
    _MOOD_WORDS[_mood] = _MOOD_WORDS.get(_mood, frozenset()) | frozenset(
        normalize_query(_term).split())
_MOOD_WORDS = {m: ws | {m} for m, ws in _MOOD_WORDS.items()}
_GENRE_ALIAS_WORDS: dict[str, frozenset[str]] = defaultdict(frozenset)
for _alias, _target in GENRE_ALIASES.items():
    _GENRE_ALIAS_WORDS[normalize_query(_target)] |= frozenset(normalize_query(_alias).split())
del _term, _mood, _alias, _target


# -- labelling (pure) ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ClickLabel:
    """What one positive action on one item says about its query.

    ``intent`` is ``None`` for ``unmatched`` clicks (decided per query by
    :func:`aggregate_labels`); ``artists`` are the artists the click points at (the entity's
    name, the matched name, or every artist of an ``unmatched`` item, so a featured artist
    counts too); ``name_score`` is the best ratio of the query core against the item's artist
    names (100 = the query *is* the name).
    """

    kind: ClickKind
    intent: str | None
    artists: tuple[str, ...] = ()
    title: str | None = None
    name_score: float = 0.0

    @property
    def artist(self) -> str | None:
        """The first artist the click points at."""
        return self.artists[0] if self.artists else None


@dataclass(frozen=True, slots=True)
class LabelledClick:
    """A positive interaction with its derivation (``label`` ``None``: not confident)."""

    query_key: str
    item_id: str
    ts: float
    label: ClickLabel | None


@dataclass(frozen=True, slots=True)
class QueryLabel:
    """The confident, aggregated label of one query in one time window.

    ``artist`` is the canonical artist for ``artist`` queries (``None`` when users chose
    several); ``alias`` is true when the query is not that artist's exact name (a nickname or
    misspelling to learn as a pattern); ``support`` counts the winning votes out of
    ``n_clicks`` derivable clicks.
    """

    query_key: str
    intent: str
    artist: str | None
    alias: bool
    support: int
    n_clicks: int
    share: float
    last_ts: float


def query_core(query: str) -> str:
    """The words of a query that can name or describe something (filler/entity words out).

    >>> query_core("The best Beyoncé songs!")
    'beyonce'
    """
    return " ".join(w for w in normalize_query(query).split() if w not in _NOISE)


def _forms(text: str) -> set[str]:
    """A name or title as typed: normalised, and without filler words ("the beatles")."""
    norm = normalize_query(text)
    return {f for f in (norm, query_core(text)) if f}


def _occasion_words(core: str) -> set[str]:
    """Words of ``core`` that belong to an occasion/activity phrase it contains."""
    padded = f" {core} "
    return {w for p in _OCCASION_PHRASES if f" {p} " in padded for w in p.split()}


def _descriptor_words(item: Mapping[str, Any], names: Iterable[str],
                      vocabulary: Collection[str] | None) -> frozenset[str]:
    """Words that describe an item: its genres (+ spellings), mood synonyms and era terms.

    Last.fm tags also name artists ("eminem", "slim shady"): a tag equal to one of ``names``
    never counts, and with a ``vocabulary`` only genres and tags in it count.
    """
    words: set[str] = set()
    names = {normalize_query(n) for n in names}
    for g in [*(item.get("genres") or ()), *(item.get("artist_genres") or ())]:
        key = normalize_query(str(g))
        if key in names or (vocabulary is not None and key not in vocabulary):
            continue
        words.update(key.split())
        words.update(_GENRE_ALIAS_WORDS.get(key, ()))
    for m in item.get("moods") or ():
        words.update(_MOOD_WORDS.get(str(m), {str(m)}))
    era = item.get("era")
    if era:
        for term, canon in _ERA_TERMS.items():
            if canon == era:
                words.update(term.split())
    return frozenset(words - _NOISE)


def derive_click_label(query: str, item: Mapping[str, Any], *,
                       vocabulary: Collection[str] | None = None) -> ClickLabel | None:
    """Derive what a positive action on ``item`` says about ``query`` (see the module docstring).

    Parameters
    ----------
    query:
        The query (raw or normalised).
    item:
        The chosen item's catalog document (``entity_type``, ``title``, ``artist``, ``genres``,
        ``artist_genres``, ``moods``, ``era``).
    vocabulary:
        Normalised genre terms the query-understanding lexicon knows; when given, other
        genres/tags of the item (free-form Last.fm tags such as ``"slim shady"``) are not
        descriptors. Moods and eras always come from the fixed vocabularies.

    Returns
    -------
    ClickLabel or None
        ``None`` when the derivation is not confident: a generic query (no core words), a
        partial overlap with a name or title (ratio between :data:`NO_OVERLAP` and
        :data:`MATCH`), or a self-titled item that the query matches as title and as name.

    Examples
    --------
    >>> derive_click_label("beyonse songs", {"entity_type": "artist", "title": "Beyoncé",
    ...                                      "artist": ["Beyoncé"]}).intent
    'artist'
    >>> derive_click_label("halo beyonce", {"entity_type": "track", "title": "Halo",
    ...                                     "artist": ["Beyoncé"]}).intent
    'known_item'
    """
    from rapidfuzz import fuzz

    core = query_core(query)
    if not core:
        return None
    kind = item.get("entity_type")
    artists = [str(a) for a in (item.get("artist") or ()) if a]
    if kind == "artist" and item.get("title"):
        artists = [str(item["title"]), *[a for a in artists if a != item["title"]]]
    name_score, best_artist = 0.0, ""
    for a in artists:
        score = max((fuzz.ratio(core, f) for f in _forms(a)), default=0.0)
        if score > name_score:
            name_score, best_artist = score, a
    words = core.split()
    desc = _descriptor_words(item, artists, vocabulary)
    occasion_words = _occasion_words(core)
    descriptive = all(w in desc or w in occasion_words for w in words)
    occasion = any(w not in desc for w in occasion_words)

    def describe() -> ClickLabel:
        if occasion:
            return ClickLabel("occasion", "topical", name_score=name_score)
        return ClickLabel("descriptor", "browse", name_score=name_score)

    if kind == "artist":
        if name_score >= MATCH:
            return ClickLabel("artist_name", "artist", (best_artist,), name_score=name_score)
        if descriptive and name_score < NO_OVERLAP:
            return describe()
        return ClickLabel("artist_entity", "artist", tuple(artists[:1]), name_score=name_score)

    title = clean_title(str(item.get("title") or ""))
    titles = _forms(title) | _forms(str(item.get("title") or ""))
    title_score = max((fuzz.ratio(core, t) for t in titles), default=0.0)
    combo_score, combo_artist = 0.0, None
    for a in artists:
        for af in _forms(a):
            for t in titles:
                if len(words) > len(t.split()):  # the query holds more than the title
                    score = fuzz.token_sort_ratio(core, f"{af} {t}")
                    if score > combo_score:
                        combo_score, combo_artist = score, a
    if max(title_score, combo_score) >= MATCH:
        if title_score >= MATCH and name_score >= MATCH:  # self-titled: title or artist?
            return None
        by = (combo_artist,) if combo_artist and combo_score > title_score else ()
        return ClickLabel("title", "known_item", by, title or None, name_score=name_score)
    if name_score >= MATCH:
        return ClickLabel("artist_name", "artist", (best_artist,), name_score=name_score)
    if max(name_score, title_score, combo_score) >= NO_OVERLAP:
        return None  # partial overlap: not confident either way
    named = {w for f in titles | {f for a in artists for f in _forms(a)} for w in f.split()
             if len(w) >= 2 and w not in _NOISE}
    if named & set(words):  # "halo live at wembley": shares a word with the title
        return None
    if descriptive:
        return describe()
    return ClickLabel("unmatched", None, tuple(artists), name_score=name_score)


def label_interactions(interactions: Iterable[Interaction],
                       items: Mapping[str, Mapping[str, Any]], *,
                       vocabulary: Collection[str] | None = None) -> list[LabelledClick]:
    """Derive a label for every positive interaction whose item is in ``items``.

    Parameters
    ----------
    interactions:
        From :func:`orchestrator.memory.load_interactions`; non-positive actions (skip) and
        items missing from ``items`` are left out.
    items:
        ``item_id -> catalog document``.
    vocabulary:
        See :func:`derive_click_label`.

    Returns
    -------
    list of LabelledClick
    """
    out = []
    for it in interactions:
        if it.action not in POSITIVE_ACTIONS or it.item_id not in items:
            continue
        out.append(LabelledClick(it.query_key, it.item_id, it.ts,
                                 derive_click_label(it.query_key, items[it.item_id],
                                                    vocabulary=vocabulary)))
    return out


def aggregate_labels(clicks: Iterable[LabelledClick], *, min_support: int = 2,
                     min_share: float = 0.6, alias_share: float = 0.8) -> dict[str, QueryLabel]:
    """One confident label per query from its clicks (see the module docstring).

    Parameters
    ----------
    clicks:
        Labelled clicks of one time window.
    min_support:
        Minimum number of votes for the winning intent (and of clicks on one artist for the
        ``unmatched`` -> ``artist`` rule).
    min_share:
        Minimum share of the query's derivable clicks the winning intent must hold.
    alias_share:
        Share of the clicks one artist must take for ``unmatched`` clicks to vote ``artist``
        and for an ``artist`` label to name a canonical artist.

    Returns
    -------
    dict
        ``query_key -> QueryLabel`` for the queries with a confident label.
    """
    by_query: dict[str, list[LabelledClick]] = defaultdict(list)
    for c in clicks:
        if c.label is not None and c.query_key:
            by_query[c.query_key].append(c)
    out: dict[str, QueryLabel] = {}
    for q, cs in sorted(by_query.items()):
        labels = [c.label for c in cs if c.label is not None]
        pointed: Counter[str] = Counter()
        for lab in labels:
            if lab.kind in ("artist_name", "artist_entity", "unmatched"):
                pointed.update(set(lab.artists))
        # ties broken by name, so the result does not depend on the order of the events
        top_artist, n_top = min(pointed.items(), key=lambda kv: (-kv[1], kv[0]),
                                default=(None, 0))
        one_artist = n_top >= min_support and n_top / len(labels) >= alias_share
        unmatched_artists = {lab.artist for lab in labels if lab.kind == "unmatched"}
        spread = len(unmatched_artists) >= 2 and len(query_core(q).split()) >= 2
        votes: Counter[str] = Counter()
        for lab in labels:
            if lab.intent is not None:
                votes[lab.intent] += 1
            elif one_artist and top_artist in lab.artists:
                votes["artist"] += 1
            elif spread and not one_artist:
                votes["topical"] += 1
        if not votes:
            continue
        intent, n = votes.most_common(1)[0]
        share = n / len(labels)
        if n < min_support or share < min_share:
            continue
        artist: str | None = None
        alias = False
        if intent == "artist" and one_artist:
            artist = top_artist
            alias = max(lab.name_score for lab in labels if artist in lab.artists) < 100.0
        out[q] = QueryLabel(q, intent, artist, alias, n, len(labels), round(share, 4),
                            max(c.ts for c in cs))
    return out


def split_by_time(clicks: Sequence[LabelledClick], *, heldout_fraction: float = 0.2,
                  ) -> tuple[list[LabelledClick], list[LabelledClick], float | None]:
    """``(train, heldout, cutoff)``: the newest ``heldout_fraction`` of the labelled clicks
    (``ts >= cutoff``) are held out. Unlabelled clicks are dropped; ``cutoff`` is ``None``
    (nothing held out) with fewer than two labelled clicks."""
    labelled = sorted((c for c in clicks if c.label is not None), key=lambda c: c.ts)
    if len(labelled) < 2 or heldout_fraction <= 0:
        return labelled, [], None
    k = min(len(labelled) - 1, int(len(labelled) * (1.0 - heldout_fraction)))
    cutoff = labelled[k].ts
    return ([c for c in labelled if c.ts < cutoff], [c for c in labelled if c.ts >= cutoff],
            cutoff)


@dataclass(frozen=True)
class ClickDataset:
    """Click-derived labels of the training window and of the held-out time slice."""

    train: dict[str, QueryLabel]
    heldout: dict[str, QueryLabel]
    cutoff_ts: float | None
    n_interactions: int
    n_positive: int
    n_missing_items: int
    n_labelled: int
    params: dict[str, Any]

    @property
    def sha256(self) -> str:
        """Hash of the labels (query, intent, artist, alias, support) and of the rules and
        parameters that made them; click times and unlabelled clicks do not enter it."""
        payload = {
            "recipe": RETRAIN_RECIPE_VERSION, "params": self.params,
            "train": [_label_key(lab) for _, lab in sorted(self.train.items())],
            "heldout": [_label_key(lab) for _, lab in sorted(self.heldout.items())],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False)
                              .encode()).hexdigest()

    def aliases(self) -> dict[str, str]:
        """Learned aliases of the training window: ``query_key -> canonical artist``."""
        return {q: lab.artist for q, lab in sorted(self.train.items())
                if lab.alias and lab.artist}


def _label_key(lab: QueryLabel) -> list[Any]:
    return [lab.query_key, lab.intent, lab.artist, lab.alias, lab.support]


def build_click_dataset(interactions: Sequence[Interaction],
                        items: Mapping[str, Mapping[str, Any]], *, min_support: int = 2,
                        min_share: float = 0.6, alias_share: float = 0.8,
                        heldout_fraction: float = 0.2,
                        vocabulary: Collection[str] | None = None) -> ClickDataset:
    """Label, split by time and aggregate (pure: no I/O).

    Parameters
    ----------
    interactions:
        Joined feedback events.
    items:
        ``item_id -> catalog document`` of the interacted items.
    min_support, min_share, alias_share:
        See :func:`aggregate_labels`.
    heldout_fraction:
        See :func:`split_by_time`.
    vocabulary:
        See :func:`derive_click_label`.

    Returns
    -------
    ClickDataset
    """
    labelled = label_interactions(interactions, items, vocabulary=vocabulary)
    train_clicks, held_clicks, cutoff = split_by_time(labelled, heldout_fraction=heldout_fraction)
    kw = {"min_support": min_support, "min_share": min_share, "alias_share": alias_share}
    positive = [it for it in interactions if it.action in POSITIVE_ACTIONS]
    return ClickDataset(
        train=aggregate_labels(train_clicks, **kw),
        heldout=aggregate_labels(held_clicks, **kw),
        cutoff_ts=cutoff, n_interactions=len(interactions), n_positive=len(positive),
        n_missing_items=len({it.item_id for it in positive if it.item_id not in items}),
        n_labelled=len(train_clicks) + len(held_clicks),
        params={**kw, "heldout_fraction": heldout_fraction},
    )


def click_examples(labels: Mapping[str, QueryLabel], *, max_copies: int = 4) -> list[QUExample]:
    """Training examples for the intent classifier: each labelled query, repeated by its
    support (at most ``max_copies`` times) so that a well-attested query outweighs a
    generated near-duplicate."""
    out = []
    for q, lab in sorted(labels.items()):
        slots = (("artist", lab.artist),) if lab.artist else ()
        ex = QUExample(q, lab.intent, slots, f"click:{q}", "clicks", slot_gold=bool(slots))
        out += [ex] * max(1, min(max_copies, lab.support))
    return out


def evaluate_click_slice(understander: Any, labels: Mapping[str, QueryLabel]) -> dict[str, Any]:
    """How a model does on click-derived labels: intent accuracy, artist-slot accuracy (on
    ``artist`` labels naming a canonical artist: the top artist slot must be it) and
    ``score``, both pooled (correct decisions / decisions)."""
    queries = sorted(labels)
    parsed = understander.parse_many(queries) if queries else []
    intent_ok = artist_ok = n_artist = 0
    errors = []
    for q, p in zip(queries, parsed):
        lab = labels[q]
        ok_i = p.intent == lab.intent
        intent_ok += ok_i
        ok_a = True
        if lab.artist:
            n_artist += 1
            got = p.values("artist")[:1]
            ok_a = bool(got) and normalize_query(got[0]) == normalize_query(lab.artist)
            artist_ok += ok_a
        if not (ok_i and ok_a):
            errors.append({"query": q, "intent": lab.intent, "got_intent": p.intent,
                           "artist": lab.artist, "got_artist": p.values("artist")[:1]})
    n = len(queries)
    return {
        "n": n,
        "intent_accuracy": round(intent_ok / n, 4) if n else 0.0,
        "n_artist": n_artist,
        "artist_accuracy": round(artist_ok / n_artist, 4) if n_artist else 0.0,
        "score": round((intent_ok + artist_ok) / (n + n_artist), 4) if n else 0.0,
        "errors": errors[:20],
    }


def should_promote(before: Mapping[str, Any], after: Mapping[str, Any], *,
                   tolerance: float = 0.005, more_data: bool = False) -> tuple[bool, str]:
    """The promotion rule (see the module docstring).

    Parameters
    ----------
    before, after:
        ``{"generated": evaluate(...), "clicks": evaluate_click_slice(...)}`` of the current
        model and of the candidate.
    tolerance:
        How much lower the candidate may score on the generated held-out set.
    more_data:
        The candidate learned from more click-derived queries than the current model.

    Returns
    -------
    tuple
        ``(promote, reason)``.
    """
    for name, get in (("intent accuracy", lambda m: m["intent_accuracy"]),
                      ("slot micro-F1", lambda m: m["slots"]["micro"]["f1"])):
        b, a = get(before["generated"]), get(after["generated"])
        if a < b - tolerance:
            return False, f"generated held-out {name} fell {b:.4f} -> {a:.4f}"
    b, a = before["clicks"]["score"], after["clicks"]["score"]
    if a > b + 1e-9:
        return True, f"click held-out score {b:.4f} -> {a:.4f}"
    if abs(a - b) <= 1e-9 and more_data:
        return True, f"click held-out score equal ({a:.4f}) with more click-derived data"
    return False, f"click held-out score not better ({b:.4f} -> {a:.4f})"


# -- I/O ----------------------------------------------------------------------------------------
def fetch_items(es: Elasticsearch, catalog_alias: str, item_ids: Iterable[str], *,
                batch: int = 1000) -> dict[str, dict[str, Any]]:
    """Catalog documents (only :data:`CATALOG_FIELDS`) of ``item_ids``; missing ones left out."""
    ids = sorted(set(item_ids))
    out: dict[str, dict[str, Any]] = {}
    for start in range(0, len(ids), batch):
        resp = es.mget(index=catalog_alias, ids=ids[start:start + batch],
                       source_includes=list(CATALOG_FIELDS))
        for d in resp["docs"]:
            if d.get("found"):
                out[d["_id"]] = d["_source"]
    return out


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[bool]:
    """A non-blocking inter-process lock (released by the OS if the holder dies)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    gen, clk = metrics["generated"], metrics["clicks"]
    return {
        "generated": {"n": gen["n"], "intent_accuracy": gen["intent_accuracy"],
                      "intent_macro_f1": gen["intent_macro_f1"],
                      "slot_micro_f1": gen["slots"]["micro"]["f1"]},
        "clicks": {**{k: clk[k] for k in ("n", "intent_accuracy", "n_artist",
                                          "artist_accuracy", "score")},
                   "errors": clk["errors"][:5]},
    }


def _read_artist_rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8") as fh:
        next(fh, None)
        return [row for row in (line.rstrip("\n").split("\t") for line in fh) if len(row) == 4]


def _usable_aliases(aliases: Mapping[str, str], rows: Sequence[Sequence[str]],
                    ) -> dict[str, str]:
    """Drop aliases that would shadow a popular artist of exactly that name ("queen")."""
    real = {r[0]: float(r[2]) for r in rows if r[3] == "artist"}
    out = {}
    for key, artist in aliases.items():
        if real.get(key, 0.0) >= 0.5 and normalize_query(artist) != key:
            logger.info("not learning alias %r -> %r: a popular artist has that name", key, artist)
            continue
        out[key] = artist
    return out


def _fresh_textcat(nlp: Any, *, seed: int) -> None:
    """Replace the trained ``textcat`` by an untrained one of the same architecture."""
    import spacy
    from spacy.training import Example

    model_cfg = nlp.config["components"]["textcat"]["model"]
    nlp.remove_pipe("textcat")
    spacy.util.fix_random_seed(seed)
    textcat = nlp.add_pipe("textcat", config={"model": dict(model_cfg)})
    warm = [Example.from_dict(nlp.make_doc(i), {"cats": {j: float(i == j) for j in INTENTS}})
            for i in INTENTS]
    textcat.initialize(lambda: warm, nlp=nlp)


def _swap_in(candidate: Path, model_dir: Path) -> None:
    """Replace ``model_dir`` by ``candidate`` with two renames (the folder is absent for a
    moment; :func:`~orchestrator.understanding.get_understander` keeps the old model then)."""
    previous = model_dir.with_name(model_dir.name + ".previous")
    if previous.exists():
        shutil.rmtree(previous)
    model_dir.rename(previous)
    try:
        candidate.rename(model_dir)
    except OSError:
        previous.rename(model_dir)  # never leave the service without a model
        raise
    shutil.rmtree(previous)


def retrain_from_events(es: Elasticsearch, *, events_alias: str, catalog_alias: str,
                        model_dir: str | Path = DEFAULT_MODEL_DIR, data_dir: str | Path,
                        seed: int = 0, min_support: int = 2, now: float | None = None,
                        heldout_fraction: float = 0.2, tolerance: float = 0.005,
                        n_epochs: int = 6, max_copies: int = 4) -> dict[str, Any]:
    """Retrain query understanding from click-derived labels; promote when better.

    Idempotent: the same events give the same click-data hash, and a hash the current model
    was trained on (or its last rejected candidate was) is skipped without training. Runs
    are serialised with a lock file next to ``model_dir`` (a concurrent run returns at once).

    Parameters
    ----------
    es:
        Client of the cluster holding both aliases.
    events_alias:
        The events index (impressions + feedback).
    catalog_alias:
        The catalog, read only (``mget`` of the chosen items).
    model_dir:
        The promoted model folder (``qu_models/``); the candidate is built in
        ``<model_dir>.candidate`` next to it.
    data_dir:
        The music data folder, needed only when ``model_dir`` lacks the generated examples
        (the generated examples are then rebuilt from the catalog, ~30 s).
    seed:
        Seeds the classifier's initialisation and training order.
    min_support:
        See :func:`aggregate_labels`.
    now:
        Events after this epoch time are ignored (default: the current time).
    heldout_fraction, tolerance:
        See :func:`split_by_time` and :func:`should_promote`.
    n_epochs, max_copies:
        Classifier epochs; copies of a click-derived example.

    Returns
    -------
    dict
        ``promoted`` (bool), ``reason``, ``version_before`` / ``version_after``,
        ``candidate_version``, ``click_data_sha256``, ``counts`` and headline ``metrics``
        ``{"before": ..., "after": ...}`` (each with ``generated`` and ``clicks``).

    Raises
    ------
    ModelNotFoundError
        When ``model_dir`` holds no usable model.
    """
    model_dir = Path(model_dir)
    lock = model_dir.with_name(f".{model_dir.name}.retrain.lock")
    with _exclusive(lock) as acquired:
        if not acquired:
            return {"promoted": False, "reason": "another retrain of this model is running"}
        return _retrain(es, events_alias=events_alias, catalog_alias=catalog_alias,
                        model_dir=model_dir, data_dir=Path(data_dir), seed=seed,
                        min_support=min_support, now=time.time() if now is None else now,
                        heldout_fraction=heldout_fraction, tolerance=tolerance,
                        n_epochs=n_epochs, max_copies=max_copies)


def _retrain(es: Elasticsearch, *, events_alias: str, catalog_alias: str, model_dir: Path,
             data_dir: Path, seed: int, min_support: int, now: float, heldout_fraction: float,
             tolerance: float, n_epochs: int, max_copies: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    current = QueryUnderstander.load(model_dir)
    meta_cur = current.metadata
    version_before = meta_cur.get("version")
    result: dict[str, Any] = {"promoted": False, "version_before": version_before,
                              "version_after": version_before}
    if not es.indices.exists(index=events_alias):
        return {**result, "reason": f"no events index {events_alias!r}"}

    interactions = [it for it in load_interactions(es, events_alias) if it.ts <= now]
    items = fetch_items(es, catalog_alias,
                        (it.item_id for it in interactions if it.action in POSITIVE_ACTIONS))
    vocabulary = {k for k, (label, _) in current.lexicon.vocab.items()
                  if label in ("genre", "genre_tag")}
    data = build_click_dataset(interactions, items, min_support=min_support,
                               heldout_fraction=heldout_fraction, vocabulary=vocabulary)
    counts = {"interactions": data.n_interactions, "positive": data.n_positive,
              "missing_items": data.n_missing_items, "labelled_clicks": data.n_labelled,
              "train_queries": len(data.train), "heldout_queries": len(data.heldout),
              "aliases": len(data.aliases())}
    data_hash = data.sha256
    result.update(counts=counts, click_data_sha256=data_hash, cutoff=_iso(data.cutoff_ts))
    logger.info("click-derived QU data: %s", counts)
    if not data.train or not data.heldout:
        return {**result, "reason": "not enough click-derived labels (need a training window "
                                    "and a held-out slice)"}
    if data_hash == meta_cur.get("click_data_sha256"):
        return {**result, "reason": "current model was trained on these click labels"}
    state_file = model_dir.with_name(f".{model_dir.name}.retrain.json")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        state = {}
    if state.get("parent_version") == version_before and state.get("click_data_sha256") == data_hash:
        return {**result, "reason": "a candidate from these click labels was already rejected",
                "metrics": state.get("metrics")}

    cand_dir = model_dir.with_name(model_dir.name + ".candidate")
    try:
        return _candidate(current, data, result, model_dir=model_dir, cand_dir=cand_dir,
                          state_file=state_file, data_dir=data_dir, seed=seed, now=now,
                          tolerance=tolerance, n_epochs=n_epochs, max_copies=max_copies, t0=t0)
    finally:  # promoted: renamed away; rejected or failed: removed
        shutil.rmtree(cand_dir, ignore_errors=True)


def _candidate(current: QueryUnderstander, data: ClickDataset, result: dict[str, Any], *,
               model_dir: Path, cand_dir: Path, state_file: Path, data_dir: Path, seed: int,
               now: float, tolerance: float, n_epochs: int, max_copies: int,
               t0: float) -> dict[str, Any]:
    """Build, evaluate and (maybe) promote the candidate in ``cand_dir``."""
    import spacy

    meta_cur = current.metadata
    version_before = meta_cur.get("version")
    data_hash = data.sha256
    counts = result["counts"]
    # -- candidate: current ruler + lexicon with this window's learned aliases ------------------
    if cand_dir.exists():
        shutil.rmtree(cand_dir)
    (cand_dir / "eval").mkdir(parents=True)
    shutil.copy2(model_dir / LEXICON_FILENAME, cand_dir / LEXICON_FILENAME)
    shutil.copy2(model_dir / "eval" / "heldout.jsonl", cand_dir / "eval" / "heldout.jsonl")
    rows = [r for r in _read_artist_rows(model_dir / ARTISTS_FILENAME) if r[3] != LEARNED_LABEL]
    aliases = _usable_aliases(data.aliases(), rows)
    counts["aliases_used"] = len(aliases)
    popularity = {r[1]: float(r[2]) for r in rows if r[3] == "artist"}
    with (cand_dir / ARTISTS_FILENAME).open("w", encoding="utf-8") as fh:
        fh.write("key\tname\tpopularity\tlabel\n")
        for r in rows:
            fh.write("\t".join(r) + "\n")
        for key, artist in aliases.items():
            name = " ".join(artist.split())
            fh.write(f"{key}\t{name}\t{popularity.get(name, 0.5):.2f}\t{LEARNED_LABEL}\n")
    lexicon = Lexicon.from_dir(cand_dir)
    nlp = spacy.load(model_dir / PIPELINE_DIRNAME)
    ruler = nlp.get_pipe("span_ruler")
    if LEARNED_LABEL in ruler.labels:
        ruler.remove(LEARNED_LABEL)
    ruler.add_patterns([{"label": LEARNED_LABEL, "pattern": k, "id": a}
                        for k, a in aliases.items()])

    # -- training examples: generated (reused) + click-derived ----------------------------------
    gen_seed = int(meta_cur.get("generation_seed", meta_cur.get("seed", 0)))
    gen_file = model_dir / TRAIN_EXAMPLES_FILE
    t_gen = time.perf_counter()
    if gen_file.is_file():
        generated_train = load_examples(gen_file)
    else:
        logger.info("no %s: generating the examples again from %s", gen_file, data_dir)
        examples = regenerate_examples(data_dir, current, seed=gen_seed)
        expected = meta_cur.get("generated_data_sha256", meta_cur.get("training_data_sha256"))
        if hash_examples(examples) != expected:
            logger.warning("regenerated examples differ from the ones %s was trained on "
                           "(catalog or playlist titles changed?)", version_before)
        generated_train, _ = split_examples(examples, seed=gen_seed)
    t_gen = time.perf_counter() - t_gen
    save_examples(cand_dir / TRAIN_EXAMPLES_FILE, generated_train)
    clicks = click_examples(data.train, max_copies=max_copies)
    save_examples(cand_dir / CLICKS_FILE, clicks)
    # users' choices overrule a generated label of the same text
    generated_kept = [e for e in generated_train if normalize_query(e.text) not in data.train]
    train_ex = generated_kept + clicks

    _fresh_textcat(nlp, seed=seed)
    timing: dict[str, float] = {}
    candidate = QueryUnderstander(nlp, lexicon)
    fit_intent(nlp, lexicon, train_ex, rng=random.Random(seed), n_epochs=n_epochs,
               slotter=candidate, timing=timing)
    candidate = QueryUnderstander(nlp, lexicon)

    # -- evaluate both on (a) generated held-out and (b) the click time slice -------------------
    heldout = load_heldout(model_dir)
    before = {"generated": evaluate(current.parse_many([e.text for e in heldout]), heldout),
              "clicks": evaluate_click_slice(current, data.heldout)}
    after = {"generated": evaluate(candidate.parse_many([e.text for e in heldout]), heldout),
             "clicks": evaluate_click_slice(candidate, data.heldout)}
    more_data = len(data.train) > int(meta_cur.get("click_training_queries", 0))
    promote, reason = should_promote(before, after, tolerance=tolerance, more_data=more_data)
    metrics = {"before": _headline(before), "after": _headline(after)}

    training_hash = hashlib.sha256(
        (hash_examples(train_ex) + json.dumps(aliases, sort_keys=True, ensure_ascii=False))
        .encode()).hexdigest()
    cand_version = f"{RECIPE_VERSION}+{training_hash[:8]}"
    result.update(candidate_version=cand_version, reason=reason, metrics=metrics,
                  timing_s={"examples": round(t_gen, 1),
                            "slotting": round(timing["slotting"], 1),
                            "fit": round(timing["fit"], 1),
                            "total": round(time.perf_counter() - t0, 1)})
    if not promote:
        state_file.write_text(json.dumps({
            "parent_version": version_before, "click_data_sha256": data_hash,
            "candidate_version": cand_version, "reason": reason, "metrics": metrics,
            "at": _iso(now)}, indent=2), encoding="utf-8")
        logger.info("QU candidate %s not promoted: %s", cand_version, reason)
        return result

    # -- save the candidate and swap it in -------------------------------------------------------
    nlp.to_disk(cand_dir / PIPELINE_DIRNAME)
    label_counts = Counter(e.intent for e in train_ex)
    metadata = {
        **{k: v for k, v in meta_cur.items() if k not in ("retrain", "timing_s")},
        "version": cand_version,
        "parent_version": version_before,
        "lineage": [*meta_cur.get("lineage", []), version_before],
        "created": _iso(now),
        "spacy_version": spacy.__version__,
        "seed": seed,
        "generation_seed": gen_seed,
        "training_data_sha256": training_hash,
        "generated_data_sha256": meta_cur.get("generated_data_sha256",
                                              meta_cur.get("training_data_sha256")),
        "click_data_sha256": data_hash,
        "click_training_queries": len(data.train),
        "click_heldout_queries": len(data.heldout),
        "learned_aliases": len(aliases),
        "label_counts": {**meta_cur.get("label_counts", {}), "train": dict(label_counts)},
        "source_counts": {**meta_cur.get("source_counts", {}), "clicks": len(clicks)},
        "pattern_counts": {**meta_cur.get("pattern_counts", {}), LEARNED_LABEL: len(aliases)},
        "textcat": {**meta_cur.get("textcat", {}), "epochs": n_epochs},
        "metrics": {"heldout": after["generated"], "clicks_heldout": after["clicks"]},
        "retrain": {
            "recipe_version": RETRAIN_RECIPE_VERSION, "params": data.params,
            "cutoff": _iso(data.cutoff_ts), "counts": counts, "reason": reason,
            "tolerance": tolerance, "before": before, "after": after,
        },
        "timing_s": result["timing_s"],
    }
    metadata["size_bytes"] = sum(f.stat().st_size for f in cand_dir.rglob("*") if f.is_file())
    # metadata.json last: a folder with it is complete
    (cand_dir / METADATA_FILENAME).write_text(json.dumps(metadata, indent=2, ensure_ascii=False),
                                              encoding="utf-8")
    _swap_in(cand_dir, model_dir)
    state_file.unlink(missing_ok=True)
    logger.info("QU model %s promoted over %s: %s", cand_version, version_before, reason)
    return {**result, "promoted": True, "version_after": cand_version}
