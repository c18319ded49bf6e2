"""Train the query-understanding model in ``qu_models/`` (``ltrr qu-train``).

Consumes the music catalog (:class:`orchestrator.catalog.CatalogBuilder`) and the playlist
titles of ``playlists_dev.csv``; produces the artifacts :class:`orchestrator.understanding.
QueryUnderstander` loads: a spaCy pipeline (``span_ruler`` patterns + ``textcat``) saved with
``nlp.to_disk``, a lexicon (``lexicon.json``, ``artists.tsv``), the held-out examples
(``eval/heldout.jsonl``), the generated training examples (``train/generated.jsonl.gz``,
reused by :mod:`orchestrator.qu_retrain`) and ``metadata.json`` (version, training-data hash,
label counts, held-out metrics). Nothing is pickled and nothing is downloaded.

How the training labels are made
--------------------------------
There is no hand-labelled query log, so every example is *generated* and its label follows
from how it was generated (distant supervision). All sampling uses ``random.Random(seed)``.

``known_item``
    A popular track (popularity >= 40) or album (>= 50) from the catalog, written the way
    users look items up: ``"<title>"``, ``"<artist> <title>"``, ``"<title> <artist>"``,
    ``"<title> by <artist>"``, ``"<title> lyrics"``, ``"<album> album"`` ... Titles are cleaned
    (``"(feat. X)"``, ``" - Remix"`` dropped). Titles that are a genre/mood/era word, a
    generic word or a single frequent title word are skipped (they are not a known item).
``artist``
    An artist (the 2,500 most popular plus 1,500 random ones with popularity >= 20):
    ``"<artist>"``, ``"<artist> songs"``, ``"songs by <artist>"``, ``"best of <artist>"``,
    ``"this is <artist>"``, ``"<mood> <artist> songs"`` ...
``browse``
    Combinations of one to three of {mood adjective, era, genre (coarse genre or a fine
    artist-genre tag)} with an optional entity word and filler: ``"happy 80s pop"``,
    ``"best 90s rock songs"``, ``"jazz"``, ``"sad indie playlist"``.
``topical``
    Descriptive, playlist-title-like queries: templates over occasions/activities
    (``"songs for a rainy day"``, ``"jazz for studying"``, ``"hard rock workout"``) and
    the real playlist titles of ``playlists_dev.csv``. A playlist title is labelled by a
    rule over its resolved slots: ``artist`` when a strong artist slot plus filler words
    cover it (``"This Is Logic"``), ``browse`` when genre/mood-adjective/era/entity slots
    plus filler words cover it (``"90's Gangster Rap"``, ``"Neo Soul"``), else ``topical``
    (``"Hard Rock Workout"``, ``"Tropical Vibes"``). Activity words (workout, party,
    sleep, study ...) are mood slots of kind ``mood_activity`` and make a query topical.
``broad``
    One generic word (``"music"``, ``"love"``, ``"hits"``), including the most frequent
    content words of track titles that are not genre/mood/era terms, plus a few generic
    two-word queries (``"new music"``, ``"top hits"``).

Robustness: 35% of the artist names in ``artist`` examples, 20% of the titles and 20% of the
artist names in ``known_item`` examples, 30% of the browse/topical template queries and half of
the extra variants of each playlist title (each title appears as-is plus twice re-styled) get
one random typo (deletion, substitution by a keyboard neighbour, transposition, vowel swap or
doubling; never the first character). Case and trailing punctuation are randomised.

Occasions (``OCCASIONS``: "road trip", "new years eve" ...) are ruler patterns too, of the
internal category ``occasion`` that never becomes a slot: they stop weak name matches
("Eve", "Years") and give the classifier a ``slot_occasion`` marker. Because the topical
templates draw from the same list, held-out topical *template* queries are easier than real
ones; the playlist titles and ``benchmarks/qu_eval.py``'s hand-written queries are the
check on that.

Gold slots come from the same generation (the artist, title, genre, mood and era that were
inserted); playlist titles have no gold slots (intent only). The held-out split (15%) is by
*group* -- the artist, the title, the playlist title or the template text -- so a held-out
artist never appears in the intent training data. The ruler patterns are a lookup over the
whole catalog and so cover held-out names too (by design: the ruler is the catalog, not a
learned model); held-out numbers measure the resolution, fuzzy matching and intent model.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
import random
import re
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .domain import INTENTS, SLOT_CATEGORIES, ParsedQuery
from .text import normalize_query
from .understanding import (
    DEFAULT_MODEL_DIR,
    INTENT_TRAINED_META,
    METADATA_FILENAME,
    PIPELINE_DIRNAME,
    SCHEMA_VERSION,
    SPANS_KEY,
    Lexicon,
    QueryUnderstander,
    clean_title,
)

logger = logging.getLogger(__name__)

#: Version of the generated-label recipe and lexicon rules (bump when they change).
RECIPE_VERSION = "1.0.0"
HELDOUT_FRACTION = 0.15

# -- vocabularies (configuration of the lexicon; saved into lexicon.json) ------------------------
#: term -> canonical mood (the vocabulary of catalog.moods_of). Adjectives make "browse"
#: queries; activities/occasions ("workout") make "topical" ones.
MOOD_ADJECTIVES: dict[str, str] = {
    **dict.fromkeys(["happy", "cheerful", "joyful", "feel good", "feelgood", "good vibes",
                     "good mood", "uplifting", "positive", "sunny", "happy hits"], "happy"),
    **dict.fromkeys(["upbeat", "fun", "groovy", "bouncy", "catchy"], "upbeat"),
    **dict.fromkeys(["chill", "chilled", "chillout", "chill out", "laid back", "laidback",
                     "relaxing", "relax", "relaxed", "mellow", "easy listening", "smooth"],
                    "chill"),
    **dict.fromkeys(["calm", "peaceful", "soothing", "quiet", "soft", "gentle", "tranquil"],
                    "calm"),
    **dict.fromkeys(["sad", "sadness", "heartbreak", "heartbroken", "crying", "depressing",
                     "emotional", "lonely", "tearjerker"], "sad"),
    **dict.fromkeys(["melancholic", "melancholy", "moody", "dark", "gloomy", "somber"],
                    "melancholic"),
    **dict.fromkeys(["angry", "rage", "aggressive", "furious"], "angry"),
    **dict.fromkeys(["intense", "heavy", "epic", "hard hitting", "powerful"], "intense"),
    **dict.fromkeys(["energetic", "energy", "hype", "pump up", "pumped", "high energy"],
                    "energetic"),
    **dict.fromkeys(["danceable", "dancing", "dancefloor"], "dance"),
    **dict.fromkeys(["acoustic", "unplugged"], "acoustic"),
    **dict.fromkeys(["instrumental", "instrumentals", "no lyrics", "without lyrics"],
                    "instrumental"),
}
MOOD_ACTIVITIES: dict[str, str] = {
    **dict.fromkeys(["party", "partying", "parties", "pregame", "house party", "celebration"],
                    "party"),
    **dict.fromkeys(["workout", "work out", "gym", "running", "run", "training", "fitness",
                     "cardio", "exercise", "lifting", "crossfit", "warmup", "warm up"],
                    "energetic"),
    **dict.fromkeys(["sleep", "sleeping", "bedtime", "insomnia", "lullaby", "lullabies"],
                    "sleep"),
    **dict.fromkeys(["study", "studying", "focus", "concentration", "reading", "homework"],
                    "instrumental"),
    **dict.fromkeys(["meditation", "meditate", "yoga", "spa", "massage"], "calm"),
}
ENTITY_TERMS: dict[str, str] = {
    **dict.fromkeys(["playlist", "playlists", "mix", "mixtape", "mixes"], "playlist"),
    **dict.fromkeys(["album", "albums", "lp", "ep", "record", "records", "discography"],
                    "album"),
    **dict.fromkeys(["song", "songs", "track", "tracks", "single", "singles", "tune", "tunes"],
                    "track"),
    **dict.fromkeys(["artist", "artists", "band", "bands", "singer", "singers", "group",
                     "groups", "rapper", "rappers", "musician", "musicians"], "artist"),
}
GENRE_ALIASES: dict[str, str] = {
    "hiphop": "hip-hop", "hip hop": "hip-hop", "rnb": "r&b", "r n b": "r&b", "r b": "r&b",
    "randb": "r&b", "lofi": "lo-fi", "lo fi": "lo-fi", "dnb": "drum and bass",
    "drum n bass": "drum and bass", "kpop": "k-pop", "jpop": "j-pop", "edm": "edm",
    "electronic dance music": "edm", "rock n roll": "rock-n-roll", "rock and roll": "rock-n-roll",
    "synth pop": "synthpop", "raggae": "reggae", "reggeaton": "reggaeton", "raggaeton": "reggaeton",
    "heavy metal": "heavy-metal", "alt rock": "alt-rock", "alternative rock": "alt-rock",
    "country music": "country", "classic": "classical", "latino": "latin",
}
#: Last.fm/Spotify fine tags that describe listeners or quality, not a genre.
TAG_BLACKLIST = frozenset([
    "female vocalists", "male vocalists", "seen live", "favorites", "favourites", "favorite",
    "beautiful", "awesome", "love", "cool", "american", "female vocalist", "male vocalist",
    "spotify", "good", "best", "amazing", "sexy", "albums i own", "under 2000 listeners",
])
#: Words that do not change what a query asks for ("best 90s rock" == "90s rock").
FILLER_WORDS = frozenset(
    "best top greatest hits hit classics classic essentials essential favorites favourites "
    "ultimate collection music new old latest popular great good all time ever radio list "
    "this is the of by from a for and with some more only sound sounds".split()
)
#: Generic one-word (and a few two-word) queries -> intent "broad".
BROAD_QUERIES = (
    "music songs song love hits radio top new best popular trending favorites tunes charts "
    "latest sounds classics oldies lyrics playlist mix albums artists bands remix remixes "
    "covers live cover instrumental karaoke"
).split() + ["new music", "top hits", "popular songs", "best songs", "top songs", "new songs",
             "good music", "top 50", "hot hits", "top charts", "new releases", "music videos"]
OCCASIONS = (
    "rainy day|road trip|summer|summer nights|christmas|halloween|wedding|dinner party|cooking|"
    "coffee shop|morning coffee|sunday morning|late night|driving|beach|pool party|bbq|"
    "date night|gaming|reading|studying|sleep|workout|gym|running|yoga|meditation|focus|work|"
    "cleaning|sunset|spring|autumn|fall|winter|valentines day|new years eve|house party|"
    "karaoke|throwback|heartbreak|breakup|girls night|lazy sunday|long drive|night drive|"
    "commute|shower|kids|bedtime|birthday|graduation|festival|camping|pregame|after party|"
    "a rainy day|a road trip|the beach|the gym|a party|getting ready|late night drive|"
    "sunny day|cozy evening|fireplace|holiday|vacation|travel|hiking|cycling|dinner|romance|"
    "first dance|slow dance|tropical vibes|beach vibes|summer vibes|night out|weekend|friday night"
).split("|")
TOPICAL_TEMPLATES = (
    "{o}", "{o} music", "{o} songs", "{o} playlist", "songs for {o}", "music for {o}",
    "{g} for {o}", "{g} {o}", "{m} {o}", "{o} {g}", "{o} vibes", "{o} mix", "{m} songs for {o}",
    "{g} {o} playlist", "{o} {g} mix", "best {o} songs", "{o} with friends", "{o} anthems",
    "perfect {o} soundtrack", "{o} jams", "{g} to {o} to", "soundtrack for {o}",
)
BROWSE_TEMPLATES = (
    "{g}", "{m} {g}", "{e} {g}", "{m} {e} {g}", "{e} {m} {g}", "{g} {t}", "{m} {t}", "{e} {t}",
    "best {e} {g} {t}", "top {g} {t}", "{m} {g} {t}", "{g} {m}", "{e} {g} hits", "{g} from the {e}",
    "{g} {e}", "{e} {g} classics", "{m} {g} playlist", "{e} hits", "{m} music", "{g} music",
)
ARTIST_TEMPLATES = (
    "{a}", "{a}", "{a}", "{a} songs", "{a} music", "songs by {a}", "{a} greatest hits",
    "best of {a}", "{a} top songs", "{a} albums", "{a} playlist", "this is {a}", "{a} radio",
    "{a} discography", "{a} best songs", "{m} {a} songs", "{a} hits", "{a} essentials",
)
TRACK_TEMPLATES = (
    "{t}", "{t}", "{a} {t}", "{a} {t}", "{t} {a}", "{t} by {a}", "{a} - {t}", "{t} lyrics",
    "{t} song", "{t} {a} lyrics",
)
ALBUM_TEMPLATES = ("{b}", "{a} {b}", "{b} album", "{b} by {a}", "{a} {b} album", "{b} {a}")

_KEYBOARD = "qwertyuiop asdfghjkl zxcvbnm"
_NEIGHBOURS: dict[str, str] = {}
for _row in _KEYBOARD.split():
    for _i, _c in enumerate(_row):
        _NEIGHBOURS[_c] = _row[max(0, _i - 1):_i] + _row[_i + 1:_i + 2]
del _row, _i, _c


# -- catalog summary ----------------------------------------------------------------------------
@dataclass
class CatalogSummary:
    """What training needs from the catalog (names with popularity, genre vocabularies)."""

    artists: dict[str, tuple[str, float, int]] = field(default_factory=dict)  # key -> (name, pop, n)
    tracks: list[tuple[str, str, float]] = field(default_factory=list)  # (title, artist, pop)
    albums: list[tuple[str, str, float]] = field(default_factory=list)
    genres: Counter[str] = field(default_factory=Counter)  # raw coarse genre label -> tracks
    tags: Counter[str] = field(default_factory=Counter)  # fine artist tag -> artists
    title_words: Counter[str] = field(default_factory=Counter)  # word -> distinct titles


def summarize_catalog(data_dir: Path) -> CatalogSummary:
    """Read the catalog once and keep what the lexicon and the label generator need."""
    from .catalog import CatalogBuilder

    summary = CatalogSummary()
    for doc in CatalogBuilder(data_dir).build():
        kind, title = doc["entity_type"], " ".join((doc.get("title") or "").split())
        pop = float(doc.get("popularity") or 0.0) / 100.0
        artist = " ".join((doc.get("artist") or [""])[0].split())
        if kind == "artist":
            key = normalize_query(title)
            old = summary.artists.get(key)
            if key and (old is None or pop > old[1]):
                summary.artists[key] = (title, pop, int(doc.get("track_count") or 0))
            summary.tags.update(doc.get("artist_genres") or ())
        elif kind == "track":
            summary.tracks.append((clean_title(title), artist, pop))
            summary.genres.update(doc.get("genres") or ())
            summary.title_words.update(set(normalize_query(clean_title(title)).split()))
        elif kind == "album":
            summary.albums.append((clean_title(title), artist, pop))
    return summary


def read_playlist_titles(data_dir: Path) -> list[str]:
    """Distinct playlist titles of ``playlists_dev.csv`` (real, user-written queries)."""
    path = data_dir / "playlists_dev.csv"
    if not path.is_file():
        logger.warning("no %s: training without playlist titles", path)
        return []
    with path.open(encoding="utf-8", newline="") as fh:
        return sorted({(r.get("playlist_name") or "").strip() for r in csv.DictReader(fh)} - {""})


# -- lexicon and ruler patterns -----------------------------------------------------------------
_ERA_WORDS = {1920: ["twenties", "roaring twenties"], 1930: ["thirties"], 1940: ["forties"],
              1950: ["fifties"], 1960: ["sixties"], 1970: ["seventies"], 1980: ["eighties"],
              1990: ["nineties"], 2000: ["noughties", "aughts", "two thousands"],
              2010: ["twenty tens"]}
_ERA_REGEX = re.compile(r"^(?:19|20)?\d0 ?s$")


def era_terms() -> dict[str, str]:
    """Era spellings (normalised) -> canonical decade (``"80s"``, ``"1980 s"`` -> ``1980s``)."""
    out: dict[str, str] = {}
    for decade in range(1920, 2030, 10):
        canon = f"{decade}s"
        out[canon] = out[f"{decade} s"] = canon
        if decade != 1920:  # "20s" means the 2020s in a music search
            short = f"{decade % 100:02d}"
            out[f"{short}s"] = out[f"{short} s"] = canon
        for w in _ERA_WORDS.get(decade, []):
            out[w] = canon
    return out


@dataclass
class LexiconData:
    artists: list[tuple[str, str, float, str]]
    vocab: dict[str, tuple[str, str]]
    common_words: set[str]
    filler_words: set[str]
    title_popularity: dict[str, dict[str, float]]
    patterns: list[dict[str, str]]

    def counts(self) -> dict[str, int]:
        return dict(Counter(p["label"] for p in self.patterns))


def build_lexicon(summary: CatalogSummary, *, min_track_pop: float = 0.60,
                  min_album_pop: float = 0.65, min_common: int = 8) -> LexiconData:
    """Ruler patterns and lexicon tables from the catalog summary.

    Parameters
    ----------
    summary:
        From :func:`summarize_catalog`.
    min_track_pop, min_album_pop:
        Only titles at least this popular become ruler patterns (keeps the model small and
        avoids matching every common phrase that is also some obscure song's title).
    min_common:
        A word in at least this many distinct track titles is a "common word".
    """
    common = {w for w, n in summary.title_words.items() if n >= min_common}
    common |= set(FILLER_WORDS)
    vocab: dict[str, tuple[str, str]] = {}

    # genres: coarse labels (track genres) first, fine artist tags second
    by_key: dict[str, Counter[str]] = defaultdict(Counter)
    for g, n in summary.genres.items():
        by_key[normalize_query(g)][g] += n
    coarse = {k: c.most_common(1)[0][0] for k, c in by_key.items() if k}
    eras = era_terms()
    moods = {**{k: ("mood", v) for k, v in MOOD_ADJECTIVES.items()},
             **{k: ("mood_activity", v) for k, v in MOOD_ACTIVITIES.items()}}
    for key, value in coarse.items():
        vocab[key] = ("genre", value)
    for alias, target in GENRE_ALIASES.items():
        tkey = normalize_query(target)
        vocab[normalize_query(alias)] = ("genre", coarse.get(tkey, target))
    for tag, n in summary.tags.items():
        key = normalize_query(tag)
        if (n < 5 or not key or key in vocab or tag in TAG_BLACKLIST or ":" in tag
                or len(key) > 30 or _ERA_REGEX.match(key) or key in moods or key.isdigit()):
            continue
        vocab[key] = ("genre_tag", tag)
    for key, (label, value) in moods.items():
        vocab[normalize_query(key)] = (label, value)
    for key, value in eras.items():
        vocab[key] = ("era", value)
    for key, value in ENTITY_TERMS.items():
        vocab[key] = ("entity_type", value)
    for occasion in OCCASIONS:
        key = re.sub(r"^(?:a|the) ", "", normalize_query(occasion))
        if key not in vocab:
            vocab[key] = ("occasion", key)
    # "dance" is a coarse genre; "happy"/"sad"/"chill"/"party"/"sleep"/"study" are moods first
    # (the resolver's category bonus decides; both patterns stay).

    artists: list[tuple[str, str, float, str]] = []
    for key, (name, pop, _) in summary.artists.items():
        if len(key) >= 2:
            artists.append((key, name, round(pop, 2), "artist"))
    # partial names: the last word of a popular multi-word artist name ("sheeran", "gaga")
    alias_best: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for key, (name, pop, _) in summary.artists.items():
        words = key.split()
        if pop >= 0.6 and len(words) >= 2:
            last = words[-1]
            if len(last) >= 4 and last not in common and last not in vocab:
                alias_best[last].append((pop, name))
    for alias, cands in alias_best.items():
        cands.sort(reverse=True)
        if alias in summary.artists:  # an artist of that exact name exists
            continue
        if len(cands) == 1 or cands[0][0] - cands[1][0] >= 0.1:
            artists.append((alias, cands[0][1], round(cands[0][0], 2), "artist_alias"))

    generic = set(FILLER_WORDS) | set(ENTITY_TERMS) | {"of", "the", "a", "in", "vol", "1", "2"}
    title_pop: dict[str, dict[str, float]] = {"track": {}, "album": {}}
    title_keys: dict[str, dict[str, str]] = {"track": {}, "album": {}}
    for label, rows, floor in (("track", summary.tracks, min_track_pop),
                               ("album", summary.albums, min_album_pop)):
        for title, _, pop in sorted(rows, key=lambda r: -r[2]):
            if pop < floor:
                break
            key = normalize_query(title)
            if (len(key) < 2 or key in vocab or key in title_keys[label]
                    or (" " not in key and key in common)
                    or all(w in generic for w in key.split())):  # "Greatest Hits", "The Best Of"
                continue
            title_keys[label][key] = title
            title_pop[label][title] = round(pop, 2)

    patterns: list[dict[str, str]] = []
    for key, (label, value) in vocab.items():
        patterns.append({"label": label, "pattern": key, "id": value})
    for year in range(1950, 2030):
        patterns.append({"label": "era_year", "pattern": str(year), "id": f"{year // 10 * 10}s"})
    for key, name, _, label in artists:
        patterns.append({"label": label, "pattern": key, "id": name})
    for label, keys in title_keys.items():
        for key, title in keys.items():
            patterns.append({"label": label, "pattern": key, "id": title})
    return LexiconData(artists=artists, vocab=vocab, common_words=common,
                       filler_words=set(FILLER_WORDS), title_popularity=title_pop,
                       patterns=patterns)


def build_pipeline(lexicon: LexiconData, *, bow_length: int = 2**17) -> Any:
    """A ``spacy.blank("en")`` pipeline: ``span_ruler`` with the patterns + an untrained
    ``textcat`` (bag-of-words uni+bigrams, exclusive intents)."""
    import spacy
    from spacy.training import Example

    nlp = spacy.blank("en")
    nlp.add_pipe("span_ruler", config={"spans_key": SPANS_KEY, "phrase_matcher_attr": "LOWER",
                                       "validate": False, "overwrite": True})
    nlp.add_pipe("textcat", config={"model": {
        "@architectures": "spacy.TextCatBOW.v3", "exclusive_classes": True, "ngram_size": 2,
        "no_output_layer": False, "length": bow_length,
    }})
    # initialize() clears the ruler, so it runs before the patterns are added
    warm = [Example.from_dict(nlp.make_doc(i), {"cats": {j: float(i == j) for j in INTENTS}})
            for i in INTENTS]
    nlp.initialize(lambda: warm)
    nlp.get_pipe("span_ruler").add_patterns(lexicon.patterns)
    return nlp


# -- example generation -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class QUExample:
    """One generated query with its intent label and gold slots ``(category, value)``."""

    text: str
    intent: str
    slots: tuple[tuple[str, str], ...]
    group: str
    source: str
    slot_gold: bool = True

    def as_json(self) -> dict[str, Any]:
        return {"text": self.text, "intent": self.intent, "slots": [list(s) for s in self.slots],
                "group": self.group, "source": self.source, "slot_gold": self.slot_gold}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> QUExample:
        return cls(text=d["text"], intent=d["intent"], slots=tuple(tuple(s) for s in d["slots"]),
                   group=d["group"], source=d["source"], slot_gold=d.get("slot_gold", True))


def misspell(text: str, rng: random.Random) -> str:
    """One keyboard-style typo in one word of at least 4 letters (never its first letter)."""
    words = text.split(" ")
    idx = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not idx:
        return text
    i = rng.choice(idx)
    w = words[i]
    p = rng.randrange(1, len(w))
    op = rng.choice(("delete", "substitute", "transpose", "double", "vowel"))
    ch = w[p].lower()
    if op == "delete":
        w = w[:p] + w[p + 1:]
    elif op == "substitute" and _NEIGHBOURS.get(ch):
        w = w[:p] + rng.choice(_NEIGHBOURS[ch]) + w[p + 1:]
    elif op == "transpose" and p < len(w) - 1:
        w = w[:p] + w[p + 1] + w[p] + w[p + 2:]
    elif op == "vowel" and ch in "aeiou":
        w = w[:p] + rng.choice([v for v in "aeiou" if v != ch]) + w[p + 1:]
    else:
        w = w[:p] + w[p] + w[p:]
    words[i] = w
    return " ".join(words)


def _style(text: str, rng: random.Random) -> str:
    r = rng.random()
    if r < 0.55:
        return text.lower()
    if r < 0.75:
        return text
    if r < 0.9:
        return text.title()
    return text.upper() if rng.random() < 0.3 else text.lower() + rng.choice(["", "?", "!", " "])


class ExampleGenerator:
    """Generate labelled queries (see the module docstring for the recipe).

    Parameters
    ----------
    summary, lexicon:
        From :func:`summarize_catalog` and :func:`build_lexicon`.
    seed:
        Seeds the one ``random.Random`` all sampling uses.
    """

    def __init__(self, summary: CatalogSummary, lexicon: LexiconData, *, seed: int = 0) -> None:
        self.summary, self.lexicon = summary, lexicon
        self.rng = random.Random(seed)
        vocab = lexicon.vocab
        self._blocked = set(vocab) | {normalize_query(b) for b in BROAD_QUERIES}
        self.coarse = sorted({v for k, (lab, v) in vocab.items() if lab == "genre"
                              and k == normalize_query(v)})
        self.tags = sorted({v for lab, v in vocab.values() if lab == "genre_tag"})
        self.mood_adj = sorted(MOOD_ADJECTIVES)
        self.eras = sorted(era_terms().items())
        self.etypes = sorted(ENTITY_TERMS.items())

    def _ok_name(self, name: str) -> bool:
        key = normalize_query(name)
        if not key or key in self._blocked or len(key) < 2:
            return False
        return not (" " not in key and key in self.lexicon.common_words)

    def _maybe_typo(self, text: str, p: float) -> str:
        return misspell(text, self.rng) if self.rng.random() < p else text

    def artists(self, n_top: int = 2500, n_random: int = 1500) -> list[QUExample]:
        ranked = sorted(self.summary.artists.values(), key=lambda a: -a[1])
        ranked = [a for a in ranked if self._ok_name(a[0])]
        pool = ranked[:n_top]
        rest = [a for a in ranked[n_top:] if a[1] >= 0.2]
        pool += self.rng.sample(rest, min(n_random, len(rest)))
        out = []
        for name, _, _ in pool:
            tpl = self.rng.choice(ARTIST_TEMPLATES)
            mood = self.rng.choice(self.mood_adj)
            shown = self._maybe_typo(name, 0.35)
            text = _style(tpl.format(a=shown, m=mood), self.rng)
            gold = [("artist", name)] + ([("mood", MOOD_ADJECTIVES[mood])] if "{m}" in tpl else [])
            gold += _template_entity_types(tpl)
            out.append(QUExample(text, "artist", tuple(gold), f"artist:{normalize_query(name)}",
                                 "catalog-artist"))
        return out

    def known_items(self, n_tracks: int = 5000, n_albums: int = 1500) -> list[QUExample]:
        out = []
        for kind, rows, n, floor, tpls in (
            ("track", self.summary.tracks, n_tracks, 0.4, TRACK_TEMPLATES),
            ("album", self.summary.albums, n_albums, 0.5, ALBUM_TEMPLATES),
        ):
            seen: set[str] = set()
            pool = []
            for title, artist, pop in sorted(rows, key=lambda r: -r[2]):
                key = normalize_query(title)
                if pop < floor or key in seen or not artist or not self._ok_name(title):
                    continue
                seen.add(key)
                pool.append((title, artist))
            top = pool[: n // 2]
            top += self.rng.sample(pool[n // 2:], min(n - len(top), len(pool) - len(top)))
            for title, artist in top:
                tpl = self.rng.choice(tpls)
                t_shown = self._maybe_typo(title, 0.2)
                a_shown = self._maybe_typo(artist, 0.2)
                text = _style(tpl.format(t=t_shown, b=t_shown, a=a_shown), self.rng)
                gold = [(kind, title)] + ([("artist", artist)] if "{a}" in tpl else [])
                gold += _template_entity_types(tpl)
                out.append(QUExample(text, "known_item", tuple(gold),
                                     f"{kind}:{normalize_query(title)}", f"catalog-{kind}"))
        return out

    def _genre(self) -> str:
        if self.tags and self.rng.random() < 0.35:
            return self.rng.choice(self.tags)
        return self.rng.choice(self.coarse)

    def browse(self, n: int = 5000) -> list[QUExample]:
        out = []
        for _ in range(n):
            tpl = self.rng.choice(BROWSE_TEMPLATES)
            g = self._genre()
            m = self.rng.choice(self.mood_adj)
            e_text, e = self.rng.choice(self.eras)
            t_text, t = self.rng.choice(self.etypes)
            text = tpl.format(g=g, m=m, e=e_text, t=t_text)
            gold = []
            if "{g}" in tpl:
                gold.append(("genre", g))
            if "{m}" in tpl:
                gold.append(("mood", MOOD_ADJECTIVES[m]))
            if "{e}" in tpl:
                gold.append(("era", e))
            if "{t}" in tpl:
                gold.append(("entity_type", t))
            text = _style(self._maybe_typo(text, 0.3), self.rng)
            out.append(QUExample(text, "browse", tuple(gold), f"browse:{normalize_query(text)}",
                                 "template-browse"))
        return out

    def topical(self, n: int = 4000) -> list[QUExample]:
        out = []
        for _ in range(n):
            tpl = self.rng.choice(TOPICAL_TEMPLATES)
            o = self.rng.choice(OCCASIONS)
            g = self.rng.choice(self.coarse)
            m = self.rng.choice(self.mood_adj)
            text = _style(self._maybe_typo(tpl.format(o=o, g=g, m=m), 0.3), self.rng)
            out.append(QUExample(text, "topical", (), f"topical:{o}", "template-topical",
                                 slot_gold=False))
        return out

    def broad(self, n_title_words: int = 150, repeat: int = 4) -> list[QUExample]:
        vocab = self.lexicon.vocab
        artists = self.summary.artists
        words = [w for w, _ in self.summary.title_words.most_common(2000)
                 if len(w) >= 3 and w.isalpha() and w not in vocab and w not in FILLER_WORDS
                 and not (w in artists and artists[w][1] >= 0.5)
                 and w not in _EN_FUNCTION_WORDS][:n_title_words]
        out = []
        for q in list(BROAD_QUERIES) + words:
            for _ in range(repeat):
                out.append(QUExample(_style(q, self.rng), "broad", (), f"broad:{q}",
                                     "generic-word", slot_gold=False))
        return out

    def playlists(self, titles: Sequence[str], understander: QueryUnderstander,
                  variants: int = 3) -> list[QUExample]:
        out = []
        for title in titles:
            intent = playlist_intent(title, understander)
            for v in range(variants):
                text = title if v == 0 else _style(self._maybe_typo(title, 0.5), self.rng)
                out.append(QUExample(text, intent, (), f"playlist:{normalize_query(title)}",
                                     "playlists_dev", slot_gold=False))
        return out


def _template_entity_types(template: str) -> list[tuple[str, str]]:
    """Entity-type slots a template's own words carry ("{a} songs" -> track)."""
    words = re.sub(r"\{\w\}", " ", template).split()
    return sorted({("entity_type", ENTITY_TERMS[w]) for w in words if w in ENTITY_TERMS})


_EN_FUNCTION_WORDS = frozenset(
    "the you and that what with your this all for are was can not but don just got get when "
    "like know one out now let want how she her his him they them there here who why where "
    "have has had been will would could should yeah gonna wanna its it's into from more than "
    "then too only some our ours their about over back down still every never ever need make "
    "feel take give come says said tell think go going way say see look much many well".split()
)
_BROWSE_LABELS = frozenset({"genre", "genre_tag", "mood", "era", "era_year", "entity_type"})


def playlist_intent(title: str, understander: QueryUnderstander) -> str:
    """The rule that labels a real playlist title (see the module docstring)."""
    slotted = understander.slot_many([title])[0]
    tokens = slotted.tokens
    covered = [""] * len(tokens)
    for c in slotted.candidates:
        for i in range(c.start, c.end):
            covered[i] = c.label
    filler = understander.lexicon.filler_words

    def rest_is_filler(ok: frozenset[str]) -> bool:
        return all(lab in ok or t in filler or t.isdigit() for t, lab in zip(tokens, covered))

    if any(c.category == "artist" and c.confidence >= 0.7 for c in slotted.candidates) and \
            rest_is_filler(frozenset({"artist", "entity_type", "era_year"})):
        return "artist"
    if any(lab in {"genre", "genre_tag", "mood", "era", "era_year"} for lab in covered) and \
            rest_is_filler(_BROWSE_LABELS):
        return "browse"
    return "topical"


def _in_heldout(group: str, seed: int) -> bool:
    digest = hashlib.md5(f"{seed}:{group}".encode()).hexdigest()
    return int(digest[:8], 16) % 1000 < HELDOUT_FRACTION * 1000


# -- evaluation ---------------------------------------------------------------------------------
def _slot_key(category: str, value: str) -> tuple[str, str]:
    return category, normalize_query(value)


def evaluate(parsed: Sequence[ParsedQuery], examples: Sequence[QUExample]) -> dict[str, Any]:
    """Intent accuracy / per-class F1 and per-category slot precision and recall.

    Slots are compared as ``(category, normalize_query(value))`` sets, only on examples
    with gold slots (``slot_gold``).
    """
    assert len(parsed) == len(examples)
    correct = sum(p.intent == e.intent for p, e in zip(parsed, examples))
    per_class: dict[str, dict[str, float]] = {}
    for label in INTENTS:
        tp = sum(p.intent == label and e.intent == label for p, e in zip(parsed, examples))
        fp = sum(p.intent == label and e.intent != label for p, e in zip(parsed, examples))
        fn = sum(p.intent != label and e.intent == label for p, e in zip(parsed, examples))
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        per_class[label] = {"precision": round(prec, 4), "recall": round(rec, 4),
                            "f1": round(2 * prec * rec / (prec + rec), 4) if prec + rec else 0.0,
                            "support": tp + fn}
    confusion: dict[str, dict[str, int]] = {a: dict.fromkeys(INTENTS, 0) for a in INTENTS}
    for p, e in zip(parsed, examples):
        if e.intent in confusion and p.intent in confusion[e.intent]:
            confusion[e.intent][p.intent] += 1
    slot_counts = {c: Counter() for c in SLOT_CATEGORIES}
    n_slot_examples = 0
    for p, e in zip(parsed, examples):
        if not e.slot_gold:
            continue
        n_slot_examples += 1
        gold = {_slot_key(c, v) for c, v in e.slots}
        pred = {_slot_key(s.category, s.value) for s in p.slots}
        for c in SLOT_CATEGORIES:
            g = {x for x in gold if x[0] == c}
            q = {x for x in pred if x[0] == c}
            slot_counts[c]["tp"] += len(g & q)
            slot_counts[c]["fp"] += len(q - g)
            slot_counts[c]["fn"] += len(g - q)
    slots: dict[str, dict[str, float]] = {}
    tot = Counter()
    for c, k in slot_counts.items():
        tot.update(k)
        slots[c] = _prf(k)
    slots["micro"] = _prf(tot)
    # track and album titles are often the same string; "title" ignores which of the two
    title = Counter()
    for p, e in zip(parsed, examples):
        if e.slot_gold:
            g = {normalize_query(v) for c, v in e.slots if c in ("track", "album")}
            q = {normalize_query(s.value) for s in p.slots if s.category in ("track", "album")}
            title.update({"tp": len(g & q), "fp": len(q - g), "fn": len(g - q)})
    slots["title (track|album)"] = _prf(title)
    supported = [per_class[k]["f1"] for k in INTENTS if per_class[k]["support"]]
    return {
        "n": len(examples),
        "intent_accuracy": round(correct / len(examples), 4) if examples else 0.0,
        "intent_macro_f1": round(sum(supported) / len(supported), 4) if supported else 0.0,
        "intent_per_class": per_class,
        "intent_confusion": confusion,
        "n_slot_examples": n_slot_examples,
        "slots": slots,
    }


def _prf(k: Counter[str]) -> dict[str, float]:
    tp, fp, fn = k["tp"], k["fp"], k["fn"]
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4),
            "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0, "support": tp + fn}


# -- training -----------------------------------------------------------------------------------
#: Generated training examples saved next to a model (relative to the model folder).
TRAIN_EXAMPLES_FILE = "train/generated.jsonl.gz"


def generate_examples(summary: CatalogSummary, lexicon: LexiconData, titles: Sequence[str],
                      slotter: QueryUnderstander, *, seed: int = 0) -> list[QUExample]:
    """All generated examples (train and held-out) in the order :func:`train` makes them.

    Parameters
    ----------
    summary, lexicon:
        From :func:`summarize_catalog` and :func:`build_lexicon`.
    titles:
        Playlist titles (:func:`read_playlist_titles`).
    slotter:
        Labels the playlist titles (:func:`playlist_intent`); only its slots are used.
    seed:
        Seeds the generator.

    Returns
    -------
    list of QUExample
    """
    gen = ExampleGenerator(summary, lexicon, seed=seed)
    examples = (gen.known_items() + gen.artists() + gen.browse() + gen.topical() + gen.broad()
                + gen.playlists(titles, slotter))
    return [e for e in examples if normalize_query(e.text)]


def split_examples(examples: Sequence[QUExample], *,
                   seed: int = 0) -> tuple[list[QUExample], list[QUExample]]:
    """``(train, heldout)`` split by example group (see the module docstring)."""
    train_ex = [e for e in examples if not _in_heldout(e.group, seed)]
    held_ex = [e for e in examples if _in_heldout(e.group, seed)]
    return train_ex, held_ex


def regenerate_examples(data_dir: Path, slotter: QueryUnderstander, *,
                        seed: int = 0) -> list[QUExample]:
    """Re-read the catalog and generate the examples again (about 30 s on the full catalog).

    With the catalog, playlist titles and seed of a trained model this reproduces its examples
    (compare :func:`hash_examples` with its ``training_data_sha256``).
    """
    summary = summarize_catalog(Path(data_dir))
    lexicon = build_lexicon(summary)
    return generate_examples(summary, lexicon, read_playlist_titles(Path(data_dir)), slotter,
                             seed=seed)


def save_examples(path: Path, examples: Iterable[QUExample]) -> None:
    """Write examples as JSON lines, gzipped when ``path`` ends in ``.gz`` (with a zero
    timestamp, so the same examples give the same bytes); creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(e.as_json(), ensure_ascii=False) + "\n" for e in examples)
    if path.suffix == ".gz":
        with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            gz.write(lines.encode("utf-8"))
    else:
        path.write_text(lines, encoding="utf-8")


def load_examples(path: Path) -> list[QUExample]:
    """Read examples written by :func:`save_examples`."""
    path = Path(path)
    if path.suffix == ".gz":
        text = gzip.decompress(path.read_bytes()).decode("utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    return [QUExample.from_json(json.loads(line)) for line in text.splitlines() if line.strip()]


def fit_intent(nlp: Any, lexicon: Lexicon, examples: Sequence[QUExample], *,
               rng: random.Random, n_epochs: int = 6, batch_size: int = 64,
               slotter: QueryUnderstander | None = None,
               timing: dict[str, float] | None = None) -> dict[str, float]:
    """Train the ``textcat`` of ``nlp`` in place on ``examples`` and mark it trained.

    The classifier reads each query plus the markers of the slots the *runtime* slotter finds
    (:meth:`~orchestrator.understanding._Slotted.augmented`), so ``slotter`` must use the
    same ruler and lexicon the model will be loaded with (default: ``nlp`` and ``lexicon``).

    Parameters
    ----------
    nlp:
        Pipeline with a ``span_ruler`` and an initialised ``textcat``.
    lexicon:
        The lexicon the slotter uses.
    examples:
        Labelled training queries.
    rng:
        Shuffles the examples every epoch.
    n_epochs, batch_size:
        Training schedule.
    slotter:
        Finds the slots (default ``QueryUnderstander(nlp, lexicon)``).
    timing:
        When given, ``timing["slotting"]`` and ``timing["fit"]`` are set (seconds).

    Returns
    -------
    dict
        Losses of the last epoch.
    """
    from spacy.training import Example
    from spacy.util import minibatch

    t0 = time.perf_counter()
    slotter = slotter or QueryUnderstander(nlp, lexicon)
    slotted = slotter.slot_many([e.text for e in examples])
    t_slot = time.perf_counter() - t0
    textcat = nlp.get_pipe("textcat")
    train_docs = [
        Example.from_dict(nlp.make_doc(s.augmented(lexicon)),
                          {"cats": {k: float(k == e.intent) for k in INTENTS}})
        for e, s in zip(examples, slotted)
    ]
    del slotted
    optimizer = nlp.resume_training()
    losses: dict[str, float] = {}
    for epoch in range(n_epochs):
        rng.shuffle(train_docs)
        losses = {}
        for batch in minibatch(train_docs, size=batch_size):
            textcat.update(batch, sgd=optimizer, losses=losses)
        logger.info("epoch %d textcat loss %.3f", epoch, losses.get("textcat", 0.0))
    nlp.meta[INTENT_TRAINED_META] = True
    if timing is not None:
        timing["slotting"] = t_slot
        timing["fit"] = time.perf_counter() - t0 - t_slot
    return losses


def hash_examples(examples: Iterable[QUExample]) -> str:
    """SHA-256 of examples in order (the ``training_data_sha256`` of ``metadata.json``)."""
    return _hash_examples(examples)


def _hash_examples(examples: Iterable[QUExample]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps(e.as_json(), sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def train(data_dir: Path, out_dir: Path = DEFAULT_MODEL_DIR, *, seed: int = 0,
          n_epochs: int = 6, batch_size: int = 64) -> dict[str, Any]:
    """Build the lexicon, generate labelled queries, train the intent model, save.

    Parameters
    ----------
    data_dir:
        The ``music`` folder of the shared data (``OrchestratorSettings().ingest.data_dir``).
    out_dir:
        Where to write the model (default ``qu_models/``). Written to a sibling temporary
        folder first and swapped in at the end, so readers never see half a model.
    seed:
        Seeds example generation, the split and the training order.
    n_epochs, batch_size:
        Text-classifier training schedule.

    Returns
    -------
    dict
        The metadata written to ``metadata.json`` (includes the held-out metrics).
    """
    import spacy

    t0 = time.perf_counter()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    spacy.util.fix_random_seed(seed)
    rng = random.Random(seed)

    logger.info("reading catalog from %s", data_dir)
    summary = summarize_catalog(data_dir)
    titles = read_playlist_titles(data_dir)
    t_catalog = time.perf_counter() - t0
    lexicon = build_lexicon(summary)
    nlp = build_pipeline(lexicon)
    lex_obj = Lexicon(artists=lexicon.artists, vocab=lexicon.vocab,
                      common_words=lexicon.common_words, filler_words=lexicon.filler_words,
                      title_popularity=lexicon.title_popularity)
    slotter = QueryUnderstander(nlp, lex_obj)  # slots only: the classifier is not trained yet

    examples = generate_examples(summary, lexicon, titles, slotter, seed=seed)
    train_ex, held_ex = split_examples(examples, seed=seed)
    logger.info("generated %d examples (%d train, %d held-out)", len(examples), len(train_ex),
                len(held_ex))

    timing: dict[str, float] = {}
    fit_intent(nlp, lex_obj, train_ex, rng=rng, n_epochs=n_epochs, batch_size=batch_size,
               slotter=slotter, timing=timing)
    t_slot = t_catalog + timing["slotting"]
    understander = QueryUnderstander(nlp, lex_obj)
    held_parsed = understander.parse_many([e.text for e in held_ex])
    metrics_heldout = evaluate(held_parsed, held_ex)
    train_sample = train_ex[:: max(1, len(train_ex) // 3000)]
    metrics_train = evaluate(understander.parse_many([e.text for e in train_sample]), train_sample)

    # -- save (to a temporary sibling, then swap) ----------------------------------------------
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    nlp.meta.update({"name": "ltrr_qu", "version": RECIPE_VERSION,
                     "description": "LTRR query understanding: span_ruler slots + intent textcat"})
    nlp.to_disk(tmp / PIPELINE_DIRNAME)
    Lexicon.to_dir(tmp, artists=lexicon.artists, vocab=lexicon.vocab,
                   common_words=lexicon.common_words, filler_words=lexicon.filler_words,
                   title_popularity=lexicon.title_popularity)
    (tmp / "eval").mkdir()
    with (tmp / "eval" / "heldout.jsonl").open("w", encoding="utf-8") as fh:
        for e in held_ex:
            fh.write(json.dumps(e.as_json(), ensure_ascii=False) + "\n")
    # kept so that retraining (orchestrator.qu_retrain) need not re-read the catalog
    save_examples(tmp / TRAIN_EXAMPLES_FILE, train_ex)
    data_hash = _hash_examples(examples)
    metadata: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": "ltrr-qu-en",
        "version": f"{RECIPE_VERSION}+{data_hash[:8]}",
        "recipe_version": RECIPE_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "spacy_version": spacy.__version__,
        "seed": seed,
        "training_data_sha256": data_hash,
        "data_dir": str(data_dir),
        "label_counts": {
            "train": dict(Counter(e.intent for e in train_ex)),
            "heldout": dict(Counter(e.intent for e in held_ex)),
        },
        "source_counts": dict(Counter(e.source for e in examples)),
        "pattern_counts": lexicon.counts(),
        "n_artists": sum(1 for a in lexicon.artists if a[3] == "artist"),
        "textcat": {"architecture": "spacy.TextCatBOW.v3", "ngram_size": 2,
                    "epochs": n_epochs, "batch_size": batch_size},
        "metrics": {"heldout": metrics_heldout, "train_sample": metrics_train},
        "timing_s": {"catalog": round(t_catalog, 1), "slotting": round(t_slot - t_catalog, 1),
                     "total": round(time.perf_counter() - t0, 1)},
    }
    metadata["size_bytes"] = _dir_size(tmp)
    (tmp / METADATA_FILENAME).write_text(json.dumps(metadata, indent=2, ensure_ascii=False),
                                         encoding="utf-8")
    old = out_dir.with_name(out_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old.exists():
        shutil.rmtree(old)
    logger.info("saved query-understanding model to %s (%.1f MB) in %.0fs", out_dir,
                metadata["size_bytes"] / 1e6, time.perf_counter() - t0)
    return metadata


def load_heldout(model_dir: Path = DEFAULT_MODEL_DIR) -> list[QUExample]:
    """The held-out examples saved next to a trained model."""
    path = Path(model_dir) / "eval" / "heldout.jsonl"
    with path.open(encoding="utf-8") as fh:
        return [QUExample.from_json(json.loads(line)) for line in fh if line.strip()]
