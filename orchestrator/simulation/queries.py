"""Query sources built from the real data in ``shared/data/music``.

Consumes ``playlists_dev.csv`` (playlist title -> its tracks), the Spotify track CSVs
(known items: tracks, artists, albums) and the Last.fm HetRec files (tag -> artists users
tagged with it); produces :class:`SimQuery` objects: the text a user types, its query type
and the graded relevant set as catalog ids (``track:<spotify id>``, ``artist:<id>``,
``album:<id>``, built exactly as :mod:`orchestrator.catalog` builds them).

Known-item queries get realistic noise (:func:`misspell`, :func:`partial`): keyboard-
neighbour substitutions, dropped / doubled / transposed letters, title prefixes and dropped
words. :class:`QueryStream` mixes the sources with a configurable mix that can drift
linearly to a second mix over the run (non-stationarity). Everything is seeded.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..catalog import _stable_id, base_title, lastfm_rows
from ..errors import ConfigurationError
from ..text import fold, normalize_query

logger = logging.getLogger(__name__)

QUERY_TYPES: tuple[str, ...] = ("playlist", "known_item", "tag")

#: QWERTY neighbours (lower case letters) for substitution typos.
_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
KEYBOARD_NEIGHBOURS: dict[str, str] = {}
for _r, _row in enumerate(_ROWS):
    for _c, _ch in enumerate(_row):
        near = [_row[j] for j in (_c - 1, _c + 1) if 0 <= j < len(_row)]
        for _dr in (-1, 1):
            if 0 <= _r + _dr < len(_ROWS):
                other = _ROWS[_r + _dr]
                near += [other[j] for j in (_c - 1, _c, _c + 1) if 0 <= j < len(other)]
        KEYBOARD_NEIGHBOURS[_ch] = "".join(sorted(set(near)))


@dataclass(frozen=True)
class SimQuery:
    """One simulated information need.

    Attributes
    ----------
    qid:
        Stable id within its source (playlist id, track id, tag id ...).
    text:
        What the user types.
    qtype:
        ``playlist`` | ``known_item`` | ``tag``.
    relevant:
        ``{catalog id: grade}`` with grade >= 1 (non-listed items are irrelevant).
    target:
        Human-readable description of the need (title, entity type ...).
    noise:
        For known items: ``none`` | ``typo`` | ``partial`` | ``typo+partial``.
    """

    qid: str
    text: str
    qtype: str
    relevant: Mapping[str, int] = field(hash=False)
    target: str = ""
    noise: str = "none"


# -- noise -------------------------------------------------------------------------------------

def misspell(text: str, rng: np.random.Generator, *, n_edits: int = 1) -> str:
    """``n_edits`` realistic typos: keyboard-neighbour substitution, dropped, doubled or
    transposed letter, each at a random letter position after the first letter (people
    rarely get that wrong, and prefix-anchored fuzzy matching assumes it). An edit that
    would leave the text unchanged (swapping two equal letters) is drawn again. Text
    without an editable letter is returned unchanged."""
    chars = list(text)
    for _ in range(n_edits):
        for _attempt in range(8):
            edited = _one_edit(chars, rng)
            if edited is None:
                return "".join(chars).strip() or text
            if edited != chars:
                chars = edited
                break
    out = "".join(chars).strip()
    return out or text


def _one_edit(chars: list[str], rng: np.random.Generator) -> list[str] | None:
    first = next((i for i, c in enumerate(chars) if c.isalpha()), len(chars))
    pos = [i for i, c in enumerate(chars) if i > first and c.isalpha()]
    if not pos:
        return None
    out = list(chars)
    i = int(rng.choice(pos))
    kind = int(rng.integers(4))
    c = out[i]
    if kind == 0:
        near = KEYBOARD_NEIGHBOURS.get(c.lower())
        if near:
            sub = near[int(rng.integers(len(near)))]
            out[i] = sub.upper() if c.isupper() else sub
        else:
            del out[i]
    elif kind == 1:
        del out[i]
    elif kind == 2:
        out.insert(i, c)
    else:
        j = i + 1 if i + 1 < len(out) and out[i + 1].isalpha() else i - 1
        if j <= first:
            del out[i]
        else:
            out[i], out[j] = out[j], out[i]
    return out


def partial(text: str, rng: np.random.Generator) -> str:
    """A partial name: the first words only, a word dropped from a longer title, or the last
    word cut to a prefix (typing stopped early). Never shorter than 3 characters."""
    words = text.split()
    if len(words) >= 3 and rng.random() < 0.5:
        k = int(rng.integers(2, len(words)))
        out = " ".join(words[:k])
    elif len(words) >= 3:
        drop = int(rng.integers(1, len(words)))
        out = " ".join(w for j, w in enumerate(words) if j != drop)
    elif len(words) == 2 and rng.random() < 0.4:
        out = words[0] if len(words[0]) >= 3 else text
    else:
        last = words[-1] if words else text
        if len(last) >= 6:
            cut = int(rng.integers(max(3, len(last) // 2), len(last)))
            out = " ".join([*words[:-1], last[:cut]])
        else:
            out = text
    return out if len(out) >= 3 else text


# -- sources ---------------------------------------------------------------------------------

def _read_csv(path: Path) -> Iterator[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        yield from csv.DictReader(fh)


def artist_id(name: str) -> str:
    """Catalog id of an artist entity (as :mod:`orchestrator.catalog` builds it)."""
    return f"artist:{_stable_id(fold(name))}"


def album_id(primary_artist: str, album: str) -> str:
    """Catalog id of an album entity (primary artist + album title)."""
    return f"album:{_stable_id(fold(primary_artist), fold(album))}"


def load_playlist_queries(data_dir: Path, *, min_tracks: int = 5) -> list[SimQuery]:
    """One query per real playlist of ``playlists_dev.csv``: its title; relevant = its
    tracks (grade 1). Playlists that share a title are merged (same need)."""
    path = Path(data_dir) / "playlists_dev.csv"
    if not path.is_file():
        raise ConfigurationError(f"no playlist data at {path}")
    tracks: dict[str, set[str]] = defaultdict(set)
    ids: dict[str, str] = {}
    for row in _read_csv(path):
        title = (row.get("playlist_name") or "").strip()
        tid = (row.get("track_id") or "").strip()
        if not title or not tid or not (row.get("track_name") or "").strip():
            continue
        tracks[title].add(f"track:{tid}")
        ids.setdefault(title, (row.get("playlist_id") or title).strip())
    out = [SimQuery(ids[t], t, "playlist", {i: 1 for i in sorted(ts)}, target=f"playlist {t!r}")
           for t, ts in sorted(tracks.items()) if len(ts) >= min_tracks]
    logger.info("playlist queries: %d", len(out))
    return out


@dataclass(frozen=True)
class KnownItem:
    """A real entity a user may look up by name."""

    entity_id: str
    entity_type: str
    title: str
    artist: str
    popularity: float
    relevant: tuple[str, ...]


def load_known_items(data_dir: Path, *, genres: set[str] | None = None,
                     min_popularity: float = 20.0) -> list[KnownItem]:
    """Tracks, artists and albums of the Spotify 114k set (the first source the catalog
    reads, so names and ids agree with it). Relevant to a track lookup: every track with the
    same primary artist and base title (re-releases, compilations), since a user looking
    for a song accepts any of them. ``genres`` restricts to those genre files (test slices).
    """
    folder = Path(data_dir) / "spotify-tracks-114k"
    if not folder.is_dir():
        raise ConfigurationError(f"no Spotify track data under {folder}")
    seen: set[str] = set()
    rows: list[tuple[str, str, list[str], str, float]] = []
    for path in sorted(folder.glob("*.csv")):
        if genres is not None and path.stem.strip().lower() not in genres:
            continue
        for row in _read_csv(path):
            tid = (row.get("track_id") or "").strip()
            title = (row.get("track_name") or "").strip()
            artists = [a.strip() for a in (row.get("artists") or "").split(";") if a.strip()]
            if not tid or not title or not artists or tid in seen:
                continue
            seen.add(tid)
            try:
                pop = float(row.get("popularity") or 0.0)
            except ValueError:
                pop = 0.0
            rows.append((tid, title, artists, (row.get("album_name") or "").strip(), pop))
    same_song: dict[tuple[str, str], list[str]] = defaultdict(list)
    for tid, title, artists, _, _ in rows:
        same_song[(fold(artists[0]), normalize_query(base_title(title)))].append(f"track:{tid}")
    items: list[KnownItem] = []
    artist_pop: dict[str, float] = defaultdict(float)
    album_pop: dict[tuple[str, str], float] = defaultdict(float)
    for tid, title, artists, album, pop in rows:
        for a in artists:
            artist_pop[a] = max(artist_pop[a], pop)
        if album:
            album_pop[(artists[0], album)] = max(album_pop[(artists[0], album)], pop)
        if pop < min_popularity:
            continue
        rel = same_song[(fold(artists[0]), normalize_query(base_title(title)))]
        items.append(KnownItem(f"track:{tid}", "track", base_title(title), artists[0], pop,
                               tuple(sorted(set(rel)))))
    for a, pop in artist_pop.items():
        if pop >= min_popularity:
            aid = artist_id(a)
            items.append(KnownItem(aid, "artist", a, a, pop, (aid,)))
    for (a, album), pop in album_pop.items():
        if pop >= min_popularity:
            bid = album_id(a, album)
            items.append(KnownItem(bid, "album", album, a, pop, (bid,)))
    items.sort(key=lambda k: k.entity_id)
    logger.info("known items: %d", len(items))
    return items


def load_tag_queries(data_dir: Path, *, artist_tracks: Mapping[str, set[str]] | None = None,
                     min_artists: int = 5, min_users: int = 2, max_tags: int = 300,
                     track_grade: bool = True) -> list[SimQuery]:
    """Last.fm tags as queries. The wanted items are the artists at least ``min_users``
    users tagged with it, graded ``2 + [>= 5 users] + [>= 20 users]``; with ``track_grade``
    the tracks of those artists are relevant too, at grade 1 (someone typing "doom metal"
    is also served by a doom metal track). Only artists the catalog has count
    (``artist_tracks``: folded artist name -> its track ids; default: from the Spotify
    sources, as the catalog builds them)."""
    folder = Path(data_dir) / "lastfm-hetrec2011"
    if not folder.is_dir():
        raise ConfigurationError(f"no Last.fm data under {folder}")

    def rows(name: str, encoding: str = "utf-8") -> Iterator[list[str]]:
        return lastfm_rows(folder, name, encoding)

    if artist_tracks is None:
        artist_tracks = spotify_artist_tracks(data_dir)
    names = {p[0]: p[1].strip() for p in rows("artists.dat")}
    tags = {p[0]: p[1].strip().lower() for p in rows("tags.dat", "latin-1")}
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for p in rows("user_taggedartists.dat"):
        if len(p) >= 3 and p[1] in names and p[2] in tags:
            counts[p[2]][names[p[1]]] += 1
    out: list[tuple[int, SimQuery]] = []
    for tag_id, c in counts.items():
        artists = {a: n for a, n in c.items() if n >= min_users and fold(a) in artist_tracks}
        tag = tags[tag_id]
        if len(artists) < min_artists or len(tag) < 2:
            continue
        rel: dict[str, int] = {}
        if track_grade:
            for a in artists:
                rel.update(dict.fromkeys(artist_tracks[fold(a)], 1))
        rel.update({artist_id(a): 2 + int(n >= 5) + int(n >= 20) for a, n in artists.items()})
        out.append((sum(c.values()), SimQuery(f"tag:{tag_id}", tag, "tag", dict(sorted(rel.items())),
                                              target=f"tag {tag!r} ({len(artists)} artists)")))
    out.sort(key=lambda x: (-x[0], x[1].qid))
    logger.info("tag queries: %d (of %d tags)", min(len(out), max_tags), len(out))
    return [q for _, q in out[:max_tags]]


def spotify_artist_tracks(data_dir: Path) -> dict[str, set[str]]:
    """Folded artist name -> catalog ids of its tracks, for every artist of the Spotify
    sources and the playlist files (the catalog's artists; every credited artist counts)."""
    out: dict[str, set[str]] = defaultdict(set)

    def add(name: str, tid: str) -> None:
        if name.strip() and tid.strip():
            out[fold(name.strip())].add(f"track:{tid.strip()}")

    for path in sorted((Path(data_dir) / "spotify-tracks-114k").glob("*.csv")):
        for row in _read_csv(path):
            for a in (row.get("artists") or "").split(";"):
                add(a, row.get("track_id") or "")
    for path in sorted((Path(data_dir) / "spotify-api-2024").glob("*.csv")):
        for row in _read_csv(path):
            add(row.get("artist_name") or "", row.get("track_id") or "")
    for name in ("playlists_dev.csv", "playlist_tracks_extra.csv"):
        p = Path(data_dir) / name
        if p.is_file():
            for row in _read_csv(p):
                add(row.get("track_artist") or "", row.get("track_id") or "")
    return dict(out)


# -- the mixed stream ------------------------------------------------------------------------

def parse_mix(text: str) -> dict[str, float]:
    """``"playlist=0.4,known_item=0.4,tag=0.2"`` -> normalised weights."""
    mix: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, _, val = part.partition("=")
        key = key.strip()
        if key not in QUERY_TYPES:
            raise ConfigurationError(f"unknown query type {key!r} in mix; use {list(QUERY_TYPES)}")
        try:
            mix[key] = float(val)
        except ValueError as exc:
            raise ConfigurationError(f"bad weight in mix part {part!r}") from exc
    total = sum(mix.values())
    if total <= 0 or any(v < 0 for v in mix.values()):
        raise ConfigurationError(f"mix weights must be >= 0 and sum > 0, got {text!r}")
    return {k: mix.get(k, 0.0) / total for k in QUERY_TYPES}


@dataclass
class QuerySources:
    """The loaded sources (built once, reused by every stream)."""

    playlists: list[SimQuery]
    known_items: list[KnownItem]
    tags: list[SimQuery]

    @classmethod
    def load(cls, data_dir: Path, *, genres: set[str] | None = None) -> QuerySources:
        return cls(load_playlist_queries(data_dir), load_known_items(data_dir, genres=genres),
                   load_tag_queries(data_dir))

    def sizes(self) -> dict[str, int]:
        return {"playlist": len(self.playlists), "known_item": len(self.known_items),
                "tag": len(self.tags)}


def known_item_query(item: KnownItem, rng: np.random.Generator, *, p_typo: float = 0.3,
                     p_partial: float = 0.2, p_with_artist: float = 0.25) -> SimQuery:
    """What a user types to find ``item``: its title (tracks sometimes with the artist),
    with a typo with probability ``p_typo`` and cut short with probability ``p_partial``."""
    text = item.title
    if item.entity_type == "track" and rng.random() < p_with_artist:
        text = f"{item.artist} {text}" if rng.random() < 0.5 else f"{text} {item.artist}"
    noise = []
    if rng.random() < p_partial:
        cut = partial(text, rng)
        if cut != text:
            text, noise = cut, ["partial"]
    if rng.random() < p_typo:
        typo = misspell(text, rng, n_edits=1 + int(len(text) > 18 and rng.random() < 0.3))
        if typo != text:
            text = typo
            noise.append("typo")
    return SimQuery(item.entity_id, text, "known_item", {i: 1 for i in item.relevant},
                    target=f"{item.entity_type} {item.title!r} by {item.artist!r}",
                    noise="+".join(noise) or "none")


class QueryStream:
    """A seeded stream of :class:`SimQuery`: at round ``t`` of ``n`` the query type is drawn
    from ``mix`` (or, with ``drift_to``, from the linear interpolation ``(1 - t/n) mix +
    t/n drift_to``), then a query of that type: playlists uniformly, known items weighted by
    popularity (people look up popular things more), tags by the square root of
    how many artists carry them.

    Parameters
    ----------
    sources:
        Loaded :class:`QuerySources`.
    mix, drift_to:
        Query-type weights (see :func:`parse_mix`).
    seed:
        The same seed gives the same stream.
    p_typo, p_partial:
        Known-item noise rates.
    """

    def __init__(self, sources: QuerySources, *, mix: Mapping[str, float],
                 drift_to: Mapping[str, float] | None = None, seed: int = 0,
                 p_typo: float = 0.3, p_partial: float = 0.2) -> None:
        self.sources = sources
        self.mix = dict(mix)
        self.drift_to = dict(drift_to) if drift_to else None
        self.seed = seed
        self.p_typo, self.p_partial = p_typo, p_partial
        ki = np.asarray([max(k.popularity, 1.0) for k in sources.known_items])
        self._ki_p = ki / ki.sum() if len(ki) else ki
        # tags weighted by sqrt(#artists carrying them): popular tags are typed more often
        tg = np.asarray([sum(1 for g in q.relevant.values() if g >= 2) or len(q.relevant)
                         for q in sources.tags], dtype=float)
        self._tag_p = np.sqrt(tg) / np.sqrt(tg).sum() if len(tg) else tg
        available = {t for t, n in sources.sizes().items() if n > 0}
        for name, m in (("mix", self.mix), ("drift", self.drift_to or {})):
            bad = [t for t, w in m.items() if w > 0 and t not in available]
            if bad:
                raise ConfigurationError(f"{name} asks for query types without data: {bad}")

    def mix_at(self, t: int, n: int) -> dict[str, float]:
        if self.drift_to is None or n <= 1:
            return dict(self.mix)
        f = t / (n - 1)
        return {k: (1 - f) * self.mix.get(k, 0.0) + f * self.drift_to.get(k, 0.0) for k in QUERY_TYPES}

    def generate(self, n: int, *, offset: int = 0) -> list[SimQuery]:
        """``n`` queries; ``offset`` shifts the seed stream (a disjoint calibration slice)."""
        rng = np.random.default_rng([self.seed, 7919, offset])
        out: list[SimQuery] = []
        for t in range(n):
            m = self.mix_at(t, n)
            probs = np.asarray([m[k] for k in QUERY_TYPES])
            qtype = QUERY_TYPES[int(rng.choice(len(QUERY_TYPES), p=probs / probs.sum()))]
            out.append(self._draw(qtype, rng))
        return out

    def _draw(self, qtype: str, rng: np.random.Generator) -> SimQuery:
        s = self.sources
        if qtype == "playlist":
            return s.playlists[int(rng.integers(len(s.playlists)))]
        if qtype == "tag":
            return s.tags[int(rng.choice(len(s.tags), p=self._tag_p))]
        item = s.known_items[int(rng.choice(len(s.known_items), p=self._ki_p))]
        return known_item_query(item, rng, p_typo=self.p_typo, p_partial=self.p_partial)


def type_counts(queries: Sequence[SimQuery]) -> dict[str, int]:
    c = Counter(q.qtype for q in queries)
    return {t: c.get(t, 0) for t in QUERY_TYPES}
