"""Query understanding: free text -> :class:`~orchestrator.domain.ParsedQuery`.

Consumes the raw query string of a search request; produces a frozen ``ParsedQuery`` with
slots (artist, album, track, genre, mood, era, entity_type), an intent (one of
:data:`~orchestrator.domain.INTENTS`), a cheap language guess and a flat ``features`` dict
that the bandit (``selection.py``) uses as context. Arms read the slots.

How a query is understood (all artifacts come from ``qu_models/``, built by
:func:`orchestrator.qu_training.train` / ``ltrr qu-train``):

1. **Normalise** with the same rules as :func:`orchestrator.text.normalize_query` (accent
   folding, lower case, punctuation dropped) while keeping a map from every normalised
   character back to the original string, so slot spans point into the user's text.
2. **Span ruler** (spaCy ``span_ruler`` in a ``spacy.blank("en")`` pipeline): phrase patterns
   generated from the catalog -- artist names, partial names of popular artists
   (``"sheeran"``), popular album and track titles, coarse genres and fine artist genre tags,
   the mood vocabulary of :func:`orchestrator.catalog.moods_of` plus synonyms, eras
   (``"80s"``, ``"eighties"``, ``"1985"`` -> ``"1980s"``) and entity-type words.
3. **Fuzzy slotting** for tokens no strong pattern covers: rapidfuzz ``fuzz.ratio`` of every
   1-4-gram against the artist vocabulary (bucketed by first character and sorted by length,
   so one gram scores a few hundred names, not 43k) and against the small genre/mood/era
   vocabulary. Among close names, popularity breaks ties (``"beyonse"`` -> ``Beyoncé``, not
   an obscure near-duplicate); confidence is the match ratio scaled by popularity.
4. **Resolution**: a tiny dynamic programme picks the non-overlapping set of candidate spans
   with the largest summed ``confidence * n_tokens`` (so ``"tayler swift"`` (fuzzy, 2 tokens)
   beats a weak exact match of an obscure artist called ``"Swift"``).
5. **Intent**: a spaCy ``textcat`` (bag-of-words, exclusive classes) reads the normalised
   query followed by *marker tokens* that describe the resolved slots (``slot_artist``,
   ``slot_mood_activity``, ``free_2``, ``len_3`` ...). The markers are what makes the
   classifier robust to misspellings: ``"beyonse"`` is an unknown word, but after fuzzy
   slotting it reads ``"beyonse slot_artist slot_fuzzy free_0 len_1"``. How the training
   labels are made is documented in :mod:`orchestrator.qu_training`.

Because the text classifier reads an augmented text, use the pipeline through
:class:`QueryUnderstander`; ``nlp(text)`` alone would run the classifier without markers.

Hot reload: :func:`get_understander` re-checks ``metadata.json`` of its folder at most every
:data:`RELOAD_CHECK_S` seconds (one ``stat``) and loads the new model when its ``version``
changed, e.g. after :func:`orchestrator.qu_retrain.retrain_from_events` promoted one. Long-lived
holders (the search pipeline) keep a :class:`ReloadingUnderstander`, which asks
:func:`get_understander` on every call, instead of a fixed :class:`QueryUnderstander`.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
import threading
import time
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .domain import INTENTS, SLOT_CATEGORIES, ParsedQuery, Slot
from .errors import ConfigurationError
from .settings import PROJECT_ROOT
from .text import normalize_query

logger = logging.getLogger(__name__)

#: Folder that ``ltrr qu-train`` writes and :meth:`QueryUnderstander.load` reads.
DEFAULT_MODEL_DIR = PROJECT_ROOT / "qu_models"
#: Version of the artifact layout inside ``qu_models/``; loading refuses other versions.
SCHEMA_VERSION = 1
PIPELINE_DIRNAME = "pipeline"
LEXICON_FILENAME = "lexicon.json"
ARTISTS_FILENAME = "artists.tsv"
METADATA_FILENAME = "metadata.json"
SPANS_KEY = "qu"
#: :func:`get_understander` looks for a newly promoted model at most this often (seconds).
RELOAD_CHECK_S = 30.0
#: Key in the pipeline's ``meta.json`` set once the intent classifier has been trained.
INTENT_TRAINED_META = "ltrr_intent_trained"

#: Span-ruler label -> slot category. Several labels share a category; the label keeps the
#: kind of pattern, which sets the confidence and the markers the intent model sees.
LABEL_TO_CATEGORY = {
    "artist": "artist",
    "artist_alias": "artist",
    # a query users repeatedly resolved to one artist ("queen b" -> Beyonce), learned from
    # clicks by orchestrator.qu_retrain; older code ignores the label (no category)
    "artist_learned": "artist",
    "album": "album",
    "track": "track",
    "genre": "genre",
    "genre_tag": "genre",
    "mood": "mood",
    "mood_activity": "mood",
    "era": "era",
    "era_year": "era",
    "entity_type": "entity_type",
    # occasions ("road trip", "new years eve") are no slot category: they only stop weak name
    # matches ("Eve", "Years") and tell the intent model that the query is topical
    "occasion": "occasion",
}
#: Fixed confidence of vocabulary patterns (artist, album and track ones depend on popularity).
_VOCAB_CONFIDENCE = {
    "genre": 0.95, "genre_tag": 0.85, "mood": 0.95, "mood_activity": 0.9, "era": 0.95,
    "era_year": 0.8, "entity_type": 0.95, "occasion": 0.85,
}
#: Tie-breaker when two categories claim the same span ("chill" is a genre and a mood).
_CATEGORY_BONUS = {
    "era": 0.05, "entity_type": 0.045, "mood": 0.04, "genre": 0.035, "occasion": 0.03,
    "artist": 0.0,
    "album": -0.01, "track": -0.01,
}
#: Ruler candidates at or above this confidence are not re-examined by fuzzy matching.
_STRONG = 0.7
#: Grams longer than this many tokens are not fuzzy-matched (artist names are short).
_MAX_GRAM = 4
#: Only the first tokens of a very long query are slotted.
_MAX_TOKENS = 48

_STOPWORDS = {
    "en": frozenset(
        "a an the of for and or to in on at by with from my me i you your we our is are be "
        "it this that some any all best top new songs song music like similar".split()
    ),
    "es": frozenset("de la el los las para con canciones cancion musica mi y en del que por".split()),
    "pt": frozenset("de do da dos das para com musicas musica o e em meu minha que".split()),
    "fr": frozenset("le la les des du pour avec chansons chanson musique et en de ma mon".split()),
    "de": frozenset("der die das den dem fur mit lieder musik und ein eine von zum zur".split()),
}
#: Words that never start or end an n-gram sent to fuzzy matching ("for a" is no artist).
_GRAM_STOP = frozenset(
    "a an the of for and or to in on at by with from my me i you your is are be it this that "
    "some any all songs song music like similar".split()
)
_WORD = re.compile(r"\w", re.UNICODE)


class ModelNotFoundError(FileNotFoundError, ConfigurationError):
    """The ``qu_models`` folder (or a file in it) is missing or from another schema version.

    Parameters
    ----------
    path:
        The folder that was looked at.
    reason:
        What is wrong with it.
    """

    def __init__(self, path: str | Path, reason: str = "missing") -> None:
        self.path, self.reason = str(path), reason
        super().__init__(
            f"query-understanding model at {self.path} is unusable ({reason}); run: ltrr qu-train"
        )

    def __str__(self) -> str:  # OSError would format (errno, strerror)
        return str(self.args[0])

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.reason))


# -- normalisation with offsets -----------------------------------------------------------------
def normalize_with_offsets(text: str) -> tuple[str, list[int]]:
    """Normalise like :func:`~orchestrator.text.normalize_query` and keep offsets.

    Parameters
    ----------
    text:
        The raw query.

    Returns
    -------
    tuple
        ``(normalized, offsets)`` where ``offsets[i]`` is the index in ``text`` of the
        character that produced ``normalized[i]``.

    Examples
    --------
    >>> normalize_with_offsets("Beyoncé!")[0]
    'beyonce'
    """
    out: list[str] = []
    offsets: list[int] = []
    gap = False
    for i, ch in enumerate(text):
        decomposed = unicodedata.normalize("NFKD", ch)
        for c in decomposed:
            if unicodedata.combining(c):
                continue
            for lc in c.lower():
                if lc != "_" and _WORD.match(lc):
                    if gap and out:
                        out.append(" ")
                        offsets.append(i)
                    out.append(lc)
                    offsets.append(i)
                    gap = False
                else:
                    gap = True
    return "".join(out), offsets


def clean_title(title: str) -> str:
    """The part of a track or album title a user types: no ``(feat. ...)``, ``- Remix``."""
    return re.split(r" - |\(|\[| feat\. ", title, maxsplit=1)[0].strip() or title.strip()


# -- lexicon ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Candidate:
    start: int  # token indices in the normalised doc, end exclusive
    end: int
    category: str
    label: str
    value: str
    confidence: float
    source: str

    @property
    def weight(self) -> float:
        n = self.end - self.start
        return self.confidence * (n + 0.25 * (n - 1)) + _CATEGORY_BONUS.get(self.category, 0.0)


class _FuzzyIndex:
    """Names bucketed by first character and sorted by length, for cheap rapidfuzz scans."""

    def __init__(self, entries: Iterable[tuple[str, str, float, str]]) -> None:
        # entries: (key, display value, popularity in [0, 1], label)
        buckets: dict[str, list[tuple[int, str, str, float, str]]] = {}
        for key, value, pop, label in entries:
            if key:
                buckets.setdefault(key[0], []).append((len(key), key, value, pop, label))
        self._lengths: dict[str, list[int]] = {}
        self._keys: dict[str, list[str]] = {}
        self._meta: dict[str, list[tuple[str, float, str]]] = {}
        for c, rows in buckets.items():
            rows.sort()
            self._lengths[c] = [r[0] for r in rows]
            self._keys[c] = [r[1] for r in rows]
            self._meta[c] = [(r[2], r[3], r[4]) for r in rows]

    def search(self, gram: str, *, cutoff: float, limit: int = 5) -> list[tuple[str, float, float, str]]:
        """Best matches ``(value, ratio, popularity, label)`` of ``gram`` with ratio >= cutoff."""
        from rapidfuzz import fuzz, process

        c = gram[:1]
        lengths = self._lengths.get(c)
        if not lengths:
            return []
        slack = 2 if len(gram) <= 8 else 3
        lo = bisect.bisect_left(lengths, len(gram) - slack)
        hi = bisect.bisect_right(lengths, len(gram) + slack)
        if lo >= hi:
            return []
        keys = self._keys[c][lo:hi]
        meta = self._meta[c]
        found = process.extract(gram, keys, scorer=fuzz.ratio, score_cutoff=cutoff, limit=limit)
        return [(meta[lo + i][0], float(score), meta[lo + i][1], meta[lo + i][2]) for _, score, i in found]


class Lexicon:
    """Everything besides the spaCy pipeline that parsing needs, loaded from ``qu_models/``.

    Parameters
    ----------
    artists:
        Rows ``(key, display name, popularity in [0, 1], label)``; ``label`` is ``artist``
        or ``artist_alias`` (a partial name such as ``"sheeran"``).
    vocab:
        Normalised term -> ``(label, canonical value)`` for genres, moods, eras and entity
        types (fuzzy-matched against misspellings such as ``"clasical"``).
    common_words:
        Words frequent in catalog titles: a single such word is weak evidence of a name
        and is never fuzzy-matched.
    filler_words:
        Words that do not make a query topical ("best", "hits", "music").
    title_popularity:
        ``{"track": {title: popularity}, "album": {...}}`` for the ruler's title patterns.
    """

    def __init__(self, *, artists: Sequence[tuple[str, str, float, str]],
                 vocab: dict[str, tuple[str, str]], common_words: Iterable[str],
                 filler_words: Iterable[str],
                 title_popularity: dict[str, dict[str, float]]) -> None:
        self.artist_popularity: dict[str, float] = {}
        for _, value, pop, label in artists:
            if label == "artist":
                self.artist_popularity[value] = max(pop, self.artist_popularity.get(value, 0.0))
        self.vocab = vocab
        self.common_words = frozenset(common_words)
        self.filler_words = frozenset(filler_words)
        self.title_popularity = title_popularity
        self.artist_index = _FuzzyIndex(artists)
        self.vocab_index = _FuzzyIndex((k, v, 1.0, lab) for k, (lab, v) in vocab.items())

    @classmethod
    def from_dir(cls, path: Path) -> Lexicon:
        """Read ``lexicon.json`` and ``artists.tsv`` written by :meth:`to_dir`."""
        lex_file, art_file = path / LEXICON_FILENAME, path / ARTISTS_FILENAME
        for f in (lex_file, art_file):
            if not f.is_file():
                raise ModelNotFoundError(path, f"{f.name} missing")
        data = json.loads(lex_file.read_text(encoding="utf-8"))
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ModelNotFoundError(
                path, f"lexicon schema {data.get('schema_version')!r}, expected {SCHEMA_VERSION}"
            )
        artists: list[tuple[str, str, float, str]] = []
        with art_file.open(encoding="utf-8") as fh:
            next(fh, None)  # header
            for line in fh:
                row = line.rstrip("\n").split("\t")
                if len(row) == 4:
                    artists.append((row[0], row[1], float(row[2]), row[3]))
        return cls(
            artists=artists,
            vocab={k: (v[0], v[1]) for k, v in data["vocab"].items()},
            common_words=data["common_words"], filler_words=data["filler_words"],
            title_popularity=data["title_popularity"],
        )

    @staticmethod
    def to_dir(path: Path, *, artists: Sequence[tuple[str, str, float, str]],
               vocab: dict[str, tuple[str, str]], common_words: Iterable[str],
               filler_words: Iterable[str], title_popularity: dict[str, dict[str, float]]) -> None:
        """Write the lexicon as plain JSON + TSV (no pickle)."""
        path.mkdir(parents=True, exist_ok=True)
        with (path / ARTISTS_FILENAME).open("w", encoding="utf-8") as fh:
            fh.write("key\tname\tpopularity\tlabel\n")
            for key, value, pop, label in artists:
                value = " ".join(value.split())  # no tabs or newlines inside a field
                fh.write(f"{key}\t{value}\t{pop:.2f}\t{label}\n")
        payload = {
            "schema_version": SCHEMA_VERSION,
            "vocab": {k: list(v) for k, v in sorted(vocab.items())},
            "common_words": sorted(set(common_words)),
            "filler_words": sorted(set(filler_words)),
            "title_popularity": title_popularity,
        }
        (path / LEXICON_FILENAME).write_text(
            json.dumps(payload, ensure_ascii=False, separators=(",", ":")), encoding="utf-8"
        )


# -- language -----------------------------------------------------------------------------------
def guess_language(text: str, tokens: Sequence[str]) -> str | None:
    """A cheap language guess: ``None`` without letters, ``"other"`` for non-Latin scripts,
    else the language whose stopwords occur most (``"en"`` when none does: a bare name)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return None
    latin = sum(1 for c in letters if "LATIN" in unicodedata.name(c, ""))
    if latin < 0.5 * len(letters):
        return "other"
    counts = {lang: sum(1 for t in tokens if t in words) for lang, words in _STOPWORDS.items()}
    best = max(counts, key=lambda k: (counts[k], k == "en"))
    return best if counts[best] > counts["en"] else "en"


# -- the understander ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Slotted:
    """Internal result of slotting, before intent classification."""

    text: str
    normalized: str
    tokens: tuple[str, ...]
    candidates: tuple[_Candidate, ...]
    offsets: tuple[int, ...]
    token_spans: tuple[tuple[int, int], ...]
    truncated: bool

    def augmented(self, lexicon: Lexicon) -> str:
        """The text the intent classifier reads (see :func:`augment_text`)."""
        return augment_text(" ".join(self.tokens), self.candidates, self.tokens, lexicon)


def augment_text(base: str, chosen: Sequence[_Candidate], tokens: Sequence[str],
                 lexicon: Lexicon) -> str:
    """The text the intent classifier reads: the query plus slot marker tokens."""
    markers: list[str] = []
    covered = [False] * len(tokens)
    for c in sorted(chosen, key=lambda c: c.start):
        markers.append("slot_" + ("mood_activity" if c.label == "mood_activity" else c.category))
        if c.source == "fuzzy":
            markers.append("slot_fuzzy")
        for i in range(c.start, c.end):
            covered[i] = True
    free = sum(1 for t, cov in zip(tokens, covered)
               if not cov and t not in _GRAM_STOP and t not in lexicon.filler_words)
    markers.append(f"free_{min(free, 3)}")
    markers.append(f"len_{min(len(tokens), 5)}")
    if len(tokens) == 1 and tokens[0] in lexicon.common_words:
        markers.append("single_common")
    if chosen and all(covered[i] or tokens[i] in _GRAM_STOP or tokens[i] in lexicon.filler_words
                      for i in range(len(tokens))):
        markers.append("covered_all")
    return (base + " " + " ".join(markers)).strip()


class QueryUnderstander:
    """Parse queries into :class:`~orchestrator.domain.ParsedQuery` objects.

    Build one with :meth:`load` (or the per-process cached :func:`get_understander`); it is
    read-only after construction and safe to share between threads.

    Parameters
    ----------
    nlp:
        A spaCy ``Language`` with a ``span_ruler`` (spans key ``"qu"``) and, once trained,
        a ``textcat`` whose labels are :data:`~orchestrator.domain.INTENTS`.
    lexicon:
        Artist vocabulary, vocabulary terms and word lists (see :class:`Lexicon`).
    metadata:
        The content of ``qu_models/metadata.json`` (informational).
    max_chars:
        Longer queries are truncated before parsing (``features["truncated"] == 1``).
    min_confidence:
        Slots below this confidence are dropped from the output.
    """

    def __init__(self, nlp: Any, lexicon: Lexicon, *, metadata: dict[str, Any] | None = None,
                 max_chars: int = 256, min_confidence: float = 0.35) -> None:
        self.nlp = nlp
        self.lexicon = lexicon
        self.metadata = metadata or {}
        self.max_chars = max_chars
        self.min_confidence = min_confidence
        self._ruler = nlp.get_pipe("span_ruler")
        self._textcat = nlp.get_pipe("textcat") if "textcat" in nlp.pipe_names else None
        # build_pipeline() adds the labels before training; only a trained classifier is used
        self._has_intent = bool(self._textcat is not None and self._textcat.labels
                                and nlp.meta.get(INTENT_TRAINED_META))

    @property
    def version(self) -> str | None:
        """The model's ``metadata.json`` ``version`` (``<recipe>+<data hash>``, new with every
        promotion, see :mod:`orchestrator.qu_retrain`); every parse carries it as
        ``ParsedQuery.model_version`` and the bandit state records it."""
        v = self.metadata.get("version")
        return str(v) if v is not None else None

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path = DEFAULT_MODEL_DIR, *, max_chars: int = 256,
             min_confidence: float = 0.35) -> QueryUnderstander:
        """Load a trained model folder written by :func:`orchestrator.qu_training.train`.

        Parameters
        ----------
        path:
            The ``qu_models`` folder (holding ``metadata.json``, ``pipeline/``,
            ``lexicon.json`` and ``artists.tsv``).
        max_chars, min_confidence:
            See :class:`QueryUnderstander`.

        Returns
        -------
        QueryUnderstander

        Raises
        ------
        ModelNotFoundError
            When the folder or one of its files is missing or of another schema version
            (the message says to run ``ltrr qu-train``).
        """
        import spacy

        path = Path(path)
        meta_file = path / METADATA_FILENAME
        if not meta_file.is_file() or not (path / PIPELINE_DIRNAME).is_dir():
            raise ModelNotFoundError(path, "no metadata.json or pipeline/ folder")
        metadata = json.loads(meta_file.read_text(encoding="utf-8"))
        if metadata.get("schema_version") != SCHEMA_VERSION:
            raise ModelNotFoundError(
                path, f"schema {metadata.get('schema_version')!r}, expected {SCHEMA_VERSION}"
            )
        lexicon = Lexicon.from_dir(path)
        nlp = spacy.load(path / PIPELINE_DIRNAME)
        logger.info("loaded query-understanding model %s (version %s)", path,
                    metadata.get("version"))
        return cls(nlp, lexicon, metadata=metadata, max_chars=max_chars,
                   min_confidence=min_confidence)

    # -- public API -----------------------------------------------------------------------------
    def parse(self, text: str) -> ParsedQuery:
        """Understand one query.

        Parameters
        ----------
        text:
            The raw query. Empty or whitespace-only text gives an empty parse (intent
            ``broad``, no slots); text longer than ``max_chars`` is truncated.

        Returns
        -------
        ParsedQuery
        """
        slotted = self._slot(text, self._ruler(self._make_doc(text)))
        cats = self._classify([slotted])[0]
        return self._finish(slotted, cats)

    def parse_many(self, texts: Iterable[str], *, batch_size: int = 256) -> list[ParsedQuery]:
        """Understand many queries with ``nlp.pipe``-style batching.

        Parameters
        ----------
        texts:
            Raw queries.
        batch_size:
            Batch size for the spaCy components.

        Returns
        -------
        list of ParsedQuery
            In input order.
        """
        slotted = self.slot_many(texts, batch_size=batch_size)
        cats = self._classify(slotted, batch_size=batch_size)
        return [self._finish(s, c) for s, c in zip(slotted, cats)]

    def slot_many(self, texts: Iterable[str], *, batch_size: int = 256) -> list[_Slotted]:
        """Slots only (no intent): used by training to build the classifier's input."""
        texts = list(texts)
        docs = self._ruler.pipe((self._make_doc(t) for t in texts), batch_size=batch_size)
        return [self._slot(t, d) for t, d in zip(texts, docs)]

    # -- internals ------------------------------------------------------------------------------
    def _prepare(self, text: str) -> tuple[str, str, list[int], bool]:
        text = text if isinstance(text, str) else str(text)
        truncated = len(text) > self.max_chars
        if truncated:
            logger.debug("query truncated from %d to %d characters", len(text), self.max_chars)
            text = text[: self.max_chars]
        norm, offsets = normalize_with_offsets(text)
        return text, norm, offsets, truncated

    def _make_doc(self, text: str) -> Any:
        _, norm, _, _ = self._prepare(text)
        return self.nlp.make_doc(norm)

    def _slot(self, raw: str, doc: Any) -> _Slotted:
        text, norm, offsets, truncated = self._prepare(raw)
        tokens = tuple(t.text for t in doc)[:_MAX_TOKENS]
        token_spans = tuple((t.idx, t.idx + len(t.text)) for t in doc)[:_MAX_TOKENS]
        cands = self._ruler_candidates(doc, len(tokens))
        cands += self._fuzzy_candidates(tokens, cands)
        chosen = _resolve(cands, len(tokens))
        chosen = tuple(c for c in chosen if c.confidence >= self.min_confidence)
        return _Slotted(text=text, normalized=norm, tokens=tokens, candidates=chosen,
                        offsets=tuple(offsets), token_spans=token_spans, truncated=truncated)

    def _ruler_candidates(self, doc: Any, n_tokens: int) -> list[_Candidate]:
        lex = self.lexicon
        out: list[_Candidate] = []
        for span in doc.spans[SPANS_KEY]:
            if span.end > n_tokens:
                continue
            label, value = span.label_, span.id_
            category = LABEL_TO_CATEGORY.get(label)
            if category is None or not value:
                continue
            single_common = len(span) == 1 and span.text in lex.common_words
            all_common = all(t.text in lex.common_words for t in span)
            weak_word = single_common and (span.text in _GRAM_STOP or len(span.text) <= 3)
            if label in _VOCAB_CONFIDENCE:
                conf = _VOCAB_CONFIDENCE[label]
                if label == "genre_tag" and len(span) > 1:  # "indie rock" over "indie" + "rock"
                    conf = 0.92
            elif label == "artist":
                pop = lex.artist_popularity.get(value, 0.0)
                conf = 0.55 + 0.4 * pop
                if weak_word or len(span.text) <= 2:  # "you", "all", "can"
                    conf *= 0.3
                elif single_common:
                    conf *= 0.5
                elif all_common:  # "Rainy Day" the band vs "songs for a rainy day"
                    conf *= 0.6 + 0.4 * pop
            elif label == "artist_alias":
                conf = 0.45 + 0.3 * lex.artist_popularity.get(value, 0.0)
            elif label == "artist_learned":
                # users confirmed it by choosing that artist: no common-word discount
                conf = 0.8 + 0.15 * lex.artist_popularity.get(value, 0.0)
            else:  # track / album titles
                pop = lex.title_popularity.get(label, {}).get(value, 0.0)
                conf = (0.45 if label == "track" else 0.4) + 0.4 * pop
                if weak_word or len(span.text) <= 2:
                    conf *= 0.3
                elif single_common:
                    conf *= 0.5
                elif all_common:
                    conf *= 0.6 + 0.4 * pop
            out.append(_Candidate(span.start, span.end, category, label, value,
                                  round(min(conf, 0.99), 3), "ruler"))
        return out

    def _fuzzy_candidates(self, tokens: Sequence[str], ruler: Sequence[_Candidate]) -> list[_Candidate]:
        strong = [False] * len(tokens)
        exact: dict[tuple[int, int], set[str]] = {}
        for c in ruler:
            exact.setdefault((c.start, c.end), set()).add(c.value)
            if c.confidence >= _STRONG and c.label != "artist_alias":  # "kendrik lamar"
                for i in range(c.start, c.end):
                    strong[i] = True
        out: list[_Candidate] = []
        i = 0
        while i < len(tokens):
            if strong[i]:
                i += 1
                continue
            j = i
            while j < len(tokens) and not strong[j]:
                j += 1
            # tokens[i:j] is a run no strong pattern covers
            for s in range(i, j):
                for e in range(s + 1, min(j, s + _MAX_GRAM) + 1):
                    out += self._fuzzy_gram(tokens, s, e, exact)
            i = j
        return out

    def _fuzzy_gram(self, tokens: Sequence[str], s: int, e: int,
                    exact: dict[tuple[int, int], set[str]]) -> list[_Candidate]:
        lex = self.lexicon
        gram_tokens = tokens[s:e]
        if (e - s > 1 and (gram_tokens[-1] in _GRAM_STOP or
                           (gram_tokens[0] in _GRAM_STOP and gram_tokens[0] != "the"))):
            return []
        gram = " ".join(gram_tokens)
        if len(gram) < 4 or gram.isdigit():
            return []
        already = exact.get((s, e), set())  # a weak exact match is not re-scored as fuzzy
        uncommon = [t for t in gram_tokens if t not in lex.common_words and t not in _GRAM_STOP
                    and not t.isdigit()]
        out: list[_Candidate] = []
        if e - s == 1:
            if not uncommon:
                return []
            cutoff = 85.0 if len(gram) <= 4 else (83.0 if len(gram) <= 6 else 80.0)
        else:
            # a misspelling makes at least one unknown word; without one, demand more
            cutoff = 82.0 if uncommon else 92.0
        best: tuple[float, str, float, float, str] | None = None
        # a one-word typo of an obscure name is more often a typo of some other word
        min_pop = 0.45 if e - s == 1 else 0.2
        for value, ratio, pop, label in lex.artist_index.search(gram, cutoff=cutoff):
            if pop < min_pop or value in already:
                continue
            rank = ratio + 8.0 * pop
            if best is None or rank > best[0]:
                best = (rank, value, ratio, pop, label)
        if best is not None:
            _, value, ratio, pop, label = best
            conf = ratio / 100.0 * (0.75 + 0.25 * pop)
            if label == "artist_alias":
                conf *= 0.8
            if e - s == 1:
                conf *= 0.95
            out.append(_Candidate(s, e, "artist", label, value, round(min(conf, 0.97), 3), "fuzzy"))
        if e - s <= 2 and len(gram) >= 5 and uncommon:
            hits = lex.vocab_index.search(gram, cutoff=85.0, limit=1)
            if hits:
                value, ratio, _, label = hits[0]
                conf = ratio / 100.0 * _VOCAB_CONFIDENCE.get(label, 0.9)
                out.append(_Candidate(s, e, LABEL_TO_CATEGORY[label], label, value,
                                      round(conf, 3), "fuzzy"))
        return out

    def _classify(self, slotted: Sequence[_Slotted], *, batch_size: int = 256) -> list[dict[str, float]]:
        if not self._has_intent:
            return [{} for _ in slotted]
        aug = [self.nlp.make_doc(s.augmented(self.lexicon)) for s in slotted]
        if len(aug) == 1:
            docs = [self._textcat(aug[0])]
        else:
            docs = list(self._textcat.pipe(aug, batch_size=batch_size))
        return [{k: float(v) for k, v in d.cats.items()} for d in docs]

    def _finish(self, s: _Slotted, cats: dict[str, float]) -> ParsedQuery:
        slots: list[Slot] = []
        for c in sorted(s.candidates, key=lambda c: c.start):
            if c.category not in SLOT_CATEGORIES:
                continue
            a, b = s.token_spans[c.start][0], s.token_spans[c.end - 1][1]
            start, end = s.offsets[a], s.offsets[b - 1] + 1
            slots.append(Slot(category=c.category, value=c.value, confidence=c.confidence,
                              start=start, end=end, source=c.source))
        if not s.tokens:
            cats = {k: (1.0 if k == "broad" else 0.0) for k in INTENTS}
        intent = max(cats, key=cats.get) if cats else "broad"  # type: ignore[arg-type]
        language = guess_language(s.text, s.tokens)
        return ParsedQuery(
            text=s.text, normalized=normalize_query(s.text), slots=tuple(slots), intent=intent,
            intent_probs={k: round(v, 4) for k, v in cats.items()}, language=language,
            features=_features(s, slots, intent, cats, language), model_version=self.version,
        )


def _resolve(cands: Sequence[_Candidate], n: int) -> tuple[_Candidate, ...]:
    """The non-overlapping candidates with the largest total weight (weighted interval DP)."""
    if not cands:
        return ()
    by_start: dict[int, list[_Candidate]] = {}
    for c in cands:
        by_start.setdefault(c.start, []).append(c)
    best = [0.0] * (n + 1)
    choice: list[_Candidate | None] = [None] * (n + 1)
    for i in range(n - 1, -1, -1):
        best[i], choice[i] = best[i + 1], None
        for c in by_start.get(i, ()):
            w = c.weight + best[c.end]
            if w > best[i] + 1e-9:
                best[i], choice[i] = w, c
    out: list[_Candidate] = []
    i = 0
    while i < n:
        c = choice[i]
        if c is None:
            i += 1
        else:
            out.append(c)
            i = c.end
    return tuple(out)


def _features(s: _Slotted, slots: Sequence[Slot], intent: str, cats: dict[str, float],
              language: str | None) -> dict[str, float]:
    covered = sum(c.end - c.start for c in s.candidates if c.category in SLOT_CATEGORIES)
    n_tokens = len(s.tokens)
    feats: dict[str, float] = {
        "n_tokens": float(n_tokens),
        "n_chars": float(len(s.text)),
        "is_single_token": float(n_tokens == 1),
        "has_digits": float(any(ch.isdigit() for ch in s.normalized)),
        "n_slots": float(len(slots)),
        "slot_coverage": covered / n_tokens if n_tokens else 0.0,
        "max_slot_confidence": max((x.confidence for x in slots), default=0.0),
        "has_fuzzy_slot": float(any(x.source == "fuzzy" for x in slots)),
        "has_occasion": float(any(c.category == "occasion" for c in s.candidates)),
        "intent_confidence": max(cats.values(), default=0.0),
        "is_english": float(language == "en"),
        "truncated": float(s.truncated),
    }
    for cat in SLOT_CATEGORIES:
        feats[f"has_{cat}"] = float(any(x.category == cat for x in slots))
    for name in INTENTS:
        feats[f"intent={name}"] = float(intent == name)
    return feats


@dataclass(slots=True)
class _Loaded:
    understander: QueryUnderstander
    stamp: tuple[int, int, int] | None  # metadata.json (inode, mtime_ns, size) at load time
    checked_at: float = field(default_factory=time.monotonic)


_loaded: dict[str, _Loaded] = {}
_loaded_lock = threading.Lock()


def _metadata_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = (path / METADATA_FILENAME).stat()
    except OSError:  # absent for a moment while a new model is swapped in
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _read_version(path: Path) -> str | None:
    try:
        return json.loads((path / METADATA_FILENAME).read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError):
        return None


def model_version(path: str | Path | None = None) -> str | None:
    """The ``version`` of the model promoted in ``path`` (default ``qu_models/``) without
    loading it (one small file read); ``None`` when there is no readable model."""
    return _read_version(Path(path) if path else DEFAULT_MODEL_DIR)


def get_understander(path: str | Path | None = None, *,
                     check_every_s: float | None = None) -> QueryUnderstander:
    """The process-wide :class:`QueryUnderstander` for ``path`` (default ``qu_models/``).

    Loaded on first use and cached per folder. At most every ``check_every_s`` seconds (default
    :data:`RELOAD_CHECK_S`) a call stats the folder's ``metadata.json``; when the file changed
    and its ``version`` differs from the loaded one, the new model is loaded and returned from
    then on (hot reload, no restart). While a reload fails -- for instance the folder is
    half-way through a swap -- the previous model keeps serving and the check is retried.

    Parameters
    ----------
    path:
        The model folder.
    check_every_s:
        Seconds between checks for a new version; ``0`` checks on every call.

    Returns
    -------
    QueryUnderstander
        The same object as long as the version is unchanged.

    Raises
    ------
    ModelNotFoundError
        When there is no usable model on first use.
    """
    folder = Path(path) if path else DEFAULT_MODEL_DIR
    key = str(folder)
    interval = RELOAD_CHECK_S if check_every_s is None else check_every_s
    entry = _loaded.get(key)
    if entry is not None and time.monotonic() - entry.checked_at < interval:
        return entry.understander
    with _loaded_lock:
        entry = _loaded.get(key)
        if entry is None:
            stamp = _metadata_stamp(folder)
            entry = _loaded[key] = _Loaded(QueryUnderstander.load(folder), stamp)
            return entry.understander
        if time.monotonic() - entry.checked_at < interval:  # another thread just checked
            return entry.understander
        entry.checked_at = time.monotonic()
        stamp = _metadata_stamp(folder)
        if stamp is None or stamp == entry.stamp:
            return entry.understander
        current = entry.understander.metadata.get("version")
        if _read_version(folder) == current:
            entry.stamp = stamp  # rewritten, same version: nothing to load
            return entry.understander
        try:
            fresh = QueryUnderstander.load(folder)
        except (OSError, ValueError, ConfigurationError) as exc:
            logger.warning("new query-understanding model at %s not loaded (%s); keeping %s",
                           folder, exc, current)
            return entry.understander
        if _metadata_stamp(folder) != stamp:  # swapped again while loading: retry next time
            logger.info("query-understanding model at %s changed while loading; retrying", folder)
            return entry.understander
        logger.info("query-understanding model at %s reloaded: version %s -> %s", folder,
                    current, fresh.metadata.get("version"))
        entry.understander, entry.stamp = fresh, stamp
        return fresh


def clear_understander_cache(path: str | Path | None = None) -> None:
    """Forget the loaded model of ``path``, or every loaded model when ``path`` is ``None``
    (tests; the next :func:`get_understander` call loads again)."""
    with _loaded_lock:
        if path is None:
            _loaded.clear()
        else:
            _loaded.pop(str(Path(path)), None)


#: Compatibility with the former ``functools.lru_cache`` wrapper.
get_understander.cache_clear = lambda: clear_understander_cache()  # type: ignore[attr-defined]


class ReloadingUnderstander:
    """A stand-in for :class:`QueryUnderstander` that always uses the newest promoted model.

    Every call goes through :func:`get_understander` (one ``time.monotonic()`` comparison per
    call, a ``stat`` every ``check_every_s`` seconds), so an object that holds this one --
    the search pipeline -- picks up a retrained model without a restart.

    Parameters
    ----------
    path:
        The model folder (default ``qu_models/``).
    check_every_s:
        See :func:`get_understander`.
    """

    def __init__(self, path: str | Path | None = None, *,
                 check_every_s: float | None = None) -> None:
        self.path = Path(path) if path else DEFAULT_MODEL_DIR
        self.check_every_s = check_every_s
        self.current()  # fail early (ModelNotFoundError) when there is no model at all

    def current(self) -> QueryUnderstander:
        """The model in use right now."""
        return get_understander(self.path, check_every_s=self.check_every_s)

    @property
    def metadata(self) -> dict[str, Any]:
        return self.current().metadata

    @property
    def version(self) -> str | None:
        """The version of the model in use right now (changes after a promotion)."""
        return self.current().version

    def parse(self, text: str) -> ParsedQuery:
        """See :meth:`QueryUnderstander.parse`."""
        return self.current().parse(text)

    def parse_many(self, texts: Iterable[str], *, batch_size: int = 256) -> list[ParsedQuery]:
        """See :meth:`QueryUnderstander.parse_many`."""
        return self.current().parse_many(texts, batch_size=batch_size)


def format_parsed(pq: ParsedQuery) -> str:
    """A human-readable, multi-line rendering of a parse (for ``ltrr qu``)."""
    lines = [
        f"query      : {pq.text!r}",
        f"normalized : {pq.normalized!r}",
        f"language   : {pq.language}",
        f"intent     : {pq.intent}  ("
        + ", ".join(f"{k}={v:.2f}" for k, v in sorted(pq.intent_probs.items(),
                                                      key=lambda kv: -kv[1])) + ")",
        "slots      :" + ("" if pq.slots else " (none)"),
    ]
    for s in pq.slots:
        lines.append(f"  {s.category:<11} {s.value!r:<32} conf={s.confidence:.2f} "
                     f"span=[{s.start},{s.end}) {pq.text[s.start:s.end]!r} via {s.source}")
    nonzero = {k: v for k, v in pq.features.items() if v}
    lines.append("features   : " + ", ".join(f"{k}={v:g}" for k, v in nonzero.items()))
    return "\n".join(lines)
