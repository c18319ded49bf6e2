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

A realistic stream: every source has a Zipf popularity (``zipf``), so the head needs
repeat; every query comes from a simulated user (:class:`~.users.UserPool`) who wants
their own subset of a playlist's tracks or a tag's artists (sampled by track popularity,
deterministic per user and need); tag relevance comes only from the Last.fm users the
catalog does not see (:func:`orchestrator.catalog.lastfm_catalog_user`); playlist titles
are split into a stream part and an unseen part (final evaluation); held-out new items
(:func:`load_new_items`) appear only from a release round on.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..catalog import _stable_id, base_title, lastfm_catalog_user, lastfm_rows
from ..errors import ConfigurationError
from ..text import fold, normalize_query
from .users import UserPool

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
    key:
        ``normalize_query(text)``, what the product's memory keys by (filled in when empty).
    user:
        The simulated user's id (empty outside a stream).
    need:
        The need id: ``playlist:<title>`` | ``known:<entity id>`` | ``tag:<tag id>``.
    """

    qid: str
    text: str
    qtype: str
    relevant: Mapping[str, int] = field(hash=False)
    target: str = ""
    noise: str = "none"
    key: str = ""
    user: str = ""
    need: str = ""

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", normalize_query(self.text))


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
    out = [SimQuery(ids[t], t, "playlist", {i: 1 for i in sorted(ts)}, target=f"playlist {t!r}",
                    need=f"playlist:{t}")
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
    """Last.fm tags as queries (see :func:`load_tag_sources`)."""
    return load_tag_sources(data_dir, artist_tracks=artist_tracks, min_artists=min_artists,
                            min_users=min_users, max_tags=max_tags, track_grade=track_grade)[0]


def load_tag_sources(data_dir: Path, *, artist_tracks: Mapping[str, set[str]] | None = None,
                     min_artists: int = 5, min_users: int = 2, max_tags: int = 300,
                     track_grade: bool = True
                     ) -> tuple[list[SimQuery], dict[str, dict[str, tuple[str, ...]]]]:
    """Last.fm tags as queries, and per tag query id ``{artist id: its track ids}`` (what a
    user's wants are sampled from). Only the tag assignments of the users the catalog does
    NOT see count (``not lastfm_catalog_user(user)``: the catalog's genres come from the
    other half), so the answers are not in the index. The wanted items are the artists at least ``min_users``
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
        if len(p) >= 3 and p[1] in names and p[2] in tags and not lastfm_catalog_user(p[0]):
            counts[p[2]][names[p[1]]] += 1
    out: list[tuple[int, SimQuery]] = []
    groups: dict[str, dict[str, tuple[str, ...]]] = {}
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
        groups[f"tag:{tag_id}"] = {
            artist_id(a): tuple(sorted(artist_tracks[fold(a)])) if track_grade else ()
            for a in artists}
        out.append((sum(c.values()), SimQuery(f"tag:{tag_id}", tag, "tag", dict(sorted(rel.items())),
                                              target=f"tag {tag!r} ({len(artists)} artists)",
                                              need=f"tag:{tag_id}")))
    out.sort(key=lambda x: (-x[0], x[1].qid))
    logger.info("tag queries: %d (of %d tags)", min(len(out), max_tags), len(out))
    kept = [q for _, q in out[:max_tags]]
    return kept, {q.qid: groups[q.qid] for q in kept}


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


def _pop(value: str | None) -> float:
    try:
        return float(value or 0.0)
    except ValueError:
        return 0.0


def load_track_popularity(data_dir: Path) -> dict[str, float]:
    """Catalog track id -> Spotify popularity (0-100): the highest over spotify-tracks-114k
    and spotify-api-2024, and for tracks only in the playlist files their
    ``track_popularity``."""
    out: dict[str, float] = {}
    for folder in ("spotify-tracks-114k", "spotify-api-2024"):
        for path in sorted((Path(data_dir) / folder).glob("*.csv")):
            for row in _read_csv(path):
                tid = (row.get("track_id") or "").strip()
                if tid:
                    key = f"track:{tid}"
                    out[key] = max(out.get(key, 0.0), _pop(row.get("popularity")))
    for name in ("playlists_dev.csv", "playlist_tracks_extra.csv"):
        path = Path(data_dir) / name
        if path.is_file():
            for row in _read_csv(path):
                tid = (row.get("track_id") or "").strip()
                if tid and f"track:{tid}" not in out:
                    out[f"track:{tid}"] = _pop(row.get("track_popularity"))
    return out


def load_new_items(data_dir: Path, ids: frozenset[str] | set[str]) -> list[KnownItem]:
    """Known items for held-out catalog ids (``track:``/``album:``/``artist:``, e.g. from
    :func:`orchestrator.catalog.hold_out_newest`), named from spotify-tracks-114k,
    spotify-api-2024 and the playlist files (first source with a name wins, popularity is
    the highest seen). A track's relevant set: every track of the same primary artist and
    base title in those sources (same song). Ids not found in the data are left out."""
    ids = frozenset(ids)
    # track id -> (title, artists, album, popularity)
    rows: dict[str, tuple[str, list[str], str, float]] = {}

    def add(tid: str, title: str, artists: list[str], album: str, pop: float) -> None:
        tid, title = tid.strip(), title.strip()
        artists = [a.strip() for a in artists if a.strip()]
        if not tid or not title or not artists:
            return
        old = rows.get(tid)
        if old is None:
            rows[tid] = (title, artists, album.strip(), pop)
        else:
            rows[tid] = (old[0], old[1], old[2] or album.strip(), max(old[3], pop))

    for path in sorted((Path(data_dir) / "spotify-tracks-114k").glob("*.csv")):
        for r in _read_csv(path):
            add(r.get("track_id") or "", r.get("track_name") or "",
                (r.get("artists") or "").split(";"), r.get("album_name") or "", _pop(r.get("popularity")))
    for path in sorted((Path(data_dir) / "spotify-api-2024").glob("*.csv")):
        for r in _read_csv(path):
            add(r.get("track_id") or "", r.get("track_name") or "", [r.get("artist_name") or ""],
                r.get("album_name") or "", _pop(r.get("popularity")))
    for name in ("playlists_dev.csv", "playlist_tracks_extra.csv"):
        path = Path(data_dir) / name
        if path.is_file():
            for r in _read_csv(path):
                add(r.get("track_id") or "", r.get("track_name") or "", [r.get("track_artist") or ""],
                    r.get("track_album_name") or "", _pop(r.get("track_popularity")))
    same_song: dict[tuple[str, str], set[str]] = defaultdict(set)
    want_tracks = {i for i in ids if i.startswith("track:")}
    for tid, (title, artists, _, _) in rows.items():
        same_song[(fold(artists[0]), normalize_query(base_title(title)))].add(f"track:{tid}")
    items: dict[str, KnownItem] = {}
    albums: dict[str, tuple[str, str, float]] = {}
    artists_pop: dict[str, tuple[str, float]] = {}
    for tid, (title, artists, album, pop) in rows.items():
        cid = f"track:{tid}"
        if cid in want_tracks:
            rel = same_song[(fold(artists[0]), normalize_query(base_title(title)))]
            items[cid] = KnownItem(cid, "track", base_title(title), artists[0], pop,
                                   tuple(sorted(rel)))
        if album:
            bid = album_id(artists[0], album)
            if bid in ids:
                old = albums.get(bid)
                albums[bid] = (album, artists[0], max(pop, old[2] if old else 0.0))
        for a in artists:
            aid = artist_id(a)
            if aid in ids:
                old_a = artists_pop.get(aid)
                artists_pop[aid] = (old_a[0] if old_a else a, max(pop, old_a[1] if old_a else 0.0))
    for bid, (album, artist, pop) in albums.items():
        items[bid] = KnownItem(bid, "album", album, artist, pop, (bid,))
    for aid, (name, pop) in artists_pop.items():
        items[aid] = KnownItem(aid, "artist", name, name, pop, (aid,))
    missing = len(ids) - len(items)
    if missing:
        logger.info("new items: %d of %d held-out ids not found in the data", missing, len(ids))
    return [items[k] for k in sorted(items)]


def unseen_title(title: str, *, fraction: float = 0.5, split_seed: int = 0) -> bool:
    """Whether a playlist title belongs to the unseen part: a stable hash of the normalized
    title (so a title and its case / punctuation variants always land on the same side)."""
    h = hashlib.blake2b(f"{split_seed}\x1f{normalize_query(title)}".encode(),
                        digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64 < fraction


def repeated_share(queries: Sequence[SimQuery]) -> float:
    """Share of ``queries`` whose ``key`` already occurred earlier in the list."""
    seen: set[str] = set()
    repeats = 0
    for q in queries:
        k = q.key or normalize_query(q.text)
        repeats += k in seen
        seen.add(k)
    return repeats / len(queries) if queries else 0.0


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
    """The loaded sources (built once, reused by every stream).

    ``playlists`` is the stream part of the playlist titles, ``playlists_unseen`` the titles
    the learning never sees (full relevant sets, for a final evaluation pass);
    ``tag_groups``: per tag query id ``{artist id: its track ids}``; ``track_popularity``:
    catalog track id -> popularity (loaded lazily from ``data_dir`` by :meth:`popularity`
    when not given)."""

    playlists: list[SimQuery]
    known_items: list[KnownItem]
    tags: list[SimQuery]
    playlists_unseen: list[SimQuery] = field(default_factory=list)
    tag_groups: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)
    track_popularity: dict[str, float] | None = None
    data_dir: Path | None = None

    @classmethod
    def load(cls, data_dir: Path, genres: set[str] | None = None, *,
             unseen_fraction: float = 0.5, split_seed: int = 0) -> QuerySources:
        if not 0.0 <= unseen_fraction < 1.0:
            raise ConfigurationError(f"unseen_fraction must be in [0, 1), got {unseen_fraction}")
        playlists = load_playlist_queries(data_dir)
        seen = [q for q in playlists
                if not unseen_title(q.text, fraction=unseen_fraction, split_seed=split_seed)]
        unseen = [q for q in playlists
                  if unseen_title(q.text, fraction=unseen_fraction, split_seed=split_seed)]
        tags, groups = load_tag_sources(data_dir)
        return cls(seen, load_known_items(data_dir, genres=genres), tags,
                   playlists_unseen=unseen, tag_groups=groups,
                   track_popularity=load_track_popularity(data_dir), data_dir=Path(data_dir))

    def popularity(self) -> dict[str, float]:
        """Track popularity (cached; empty without data)."""
        if self.track_popularity is None:
            self.track_popularity = (load_track_popularity(self.data_dir)
                                     if self.data_dir is not None else {})
        return self.track_popularity

    def sizes(self) -> dict[str, int]:
        return {"playlist": len(self.playlists), "known_item": len(self.known_items),
                "tag": len(self.tags), "playlist_unseen": len(self.playlists_unseen)}


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
                    noise="+".join(noise) or "none", need=f"known:{item.entity_id}")


def zipf_weights(n: int, zipf: float) -> np.ndarray:
    """``p(rank) ∝ 1 / rank ** zipf`` for ranks ``1 .. n`` (normalised)."""
    w = 1.0 / np.arange(1, n + 1, dtype=float) ** zipf
    return w / w.sum() if n else w


def _by_rank(order: Sequence[int], zipf: float) -> np.ndarray:
    """Probabilities per index when ``order`` lists the indices from rank 1 down."""
    p = np.empty(len(order))
    p[np.asarray(order, dtype=int)] = zipf_weights(len(order), zipf)
    return p


def _cdf(p: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(p)
    return cdf / cdf[-1] if len(cdf) and cdf[-1] > 0 else cdf


def _pick(rng: np.random.Generator, cdf: np.ndarray) -> int:
    """``rng.choice(len(p), p=p)`` with a precomputed CDF (the same draw and the same
    random-number consumption as numpy's ``choice``, without its O(n) checks per call)."""
    return min(int(cdf.searchsorted(rng.random(), side="right")), len(cdf) - 1)


class QueryStream:
    """A seeded stream of :class:`SimQuery`: at round ``t`` of ``n`` the query type is drawn
    from ``mix`` (or, with ``drift_to``, from the linear interpolation ``(1 - t/n) mix +
    t/n drift_to``), then a need of that type with Zipf popularity ``p(rank) ∝ 1 / rank **
    zipf``: playlists ranked by a seeded permutation, tags by their number of artists,
    known items by catalog popularity (``zipf=0``: the old stream -- playlists uniform, tags
    by the square root of their number of artists, known items by popularity). Each query
    gets a user from a :class:`~.users.UserPool` (drawn from a separate random stream, so
    the texts do not depend on the users); a playlist's or tag's relevant set is that user's
    own wants (see :meth:`~.users.UserPool.wants`); known items keep their one answer plus
    same-song duplicates.

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
    zipf:
        Popularity exponent of the needs (0: the old near-uniform sampling).
    n_users, user_zipf:
        The user pool and its activity exponent.
    personal:
        False: relevant sets are the full playlist / tag sets (no per-user wants).
    held_out, release_at, new_items, p_new:
        New items: before round ``release_at`` every relevant set drops the ``held_out``
        ids (a need left with nothing relevant is drawn again) and held-out known items
        are never drawn; from ``release_at`` on a known-item query targets one of
        ``new_items`` (Zipf over their popularity) with probability ``p_new``, and relevant
        sets keep held-out ids. ``release_at=None``: never released.
    """

    def __init__(self, sources: QuerySources, *, mix: Mapping[str, float],
                 drift_to: Mapping[str, float] | None = None, seed: int = 0,
                 p_typo: float = 0.3, p_partial: float = 0.2, zipf: float = 1.0,
                 n_users: int = 2000, user_zipf: float = 0.8, personal: bool = True,
                 held_out: frozenset[str] = frozenset(), release_at: int | None = None,
                 new_items: Sequence[KnownItem] = (), p_new: float = 0.15) -> None:
        self.sources = sources
        self.mix = dict(mix)
        self.drift_to = dict(drift_to) if drift_to else None
        self.seed = seed
        self.p_typo, self.p_partial = p_typo, p_partial
        if zipf < 0:
            raise ConfigurationError(f"zipf must be >= 0, got {zipf}")
        if not 0.0 <= p_new <= 1.0:
            raise ConfigurationError(f"p_new must be in [0, 1], got {p_new}")
        self.zipf = float(zipf)
        self.personal = personal
        self.users = UserPool(n_users=n_users, seed=seed, activity_zipf=user_zipf)
        self.held_out = frozenset(held_out)
        self.release_at = release_at
        self.new_items = list(new_items)
        self.p_new = p_new
        kis = sources.known_items
        tg = np.asarray([sum(1 for g in q.relevant.values() if g >= 2) or len(q.relevant)
                         for q in sources.tags], dtype=float)
        if self.zipf == 0.0:
            ki = np.asarray([max(k.popularity, 1.0) for k in kis])
            self._ki_p = ki / ki.sum() if len(ki) else ki
            # tags weighted by sqrt(#artists carrying them): popular tags are typed more often
            self._tag_p = np.sqrt(tg) / np.sqrt(tg).sum() if len(tg) else tg
            self._pl_p = None
            nw = np.asarray([max(k.popularity, 1.0) for k in self.new_items])
            self._new_p = nw / nw.sum() if len(nw) else nw
        else:
            self._ki_p = _by_rank(sorted(range(len(kis)), key=lambda i: (-kis[i].popularity,
                                                                         kis[i].entity_id)), self.zipf)
            tags = sources.tags
            self._tag_p = _by_rank(sorted(range(len(tags)), key=lambda i: (-tg[i], tags[i].qid)),
                                   self.zipf)
            perm = np.random.default_rng([seed, 31337]).permutation(len(sources.playlists))
            self._pl_p = _by_rank([int(i) for i in perm], self.zipf)
            ni = self.new_items
            self._new_p = _by_rank(sorted(range(len(ni)), key=lambda i: (-ni[i].popularity,
                                                                         ni[i].entity_id)), self.zipf)
        # before the release: held-out known items are never drawn
        self._ki_p_pre = self._ki_p
        if self.held_out and len(kis):
            mask = np.asarray([k.entity_id not in self.held_out for k in kis], dtype=float)
            pre = self._ki_p * mask
            self._ki_p_pre = pre / pre.sum() if pre.sum() > 0 else pre
        self._ki_cdf, self._ki_cdf_pre = _cdf(self._ki_p), _cdf(self._ki_p_pre)
        self._tag_cdf, self._new_cdf = _cdf(self._tag_p), _cdf(self._new_p)
        self._pl_cdf = _cdf(self._pl_p) if self._pl_p is not None else None
        self._artist_w: dict[str, dict[str, float]] = {}
        available = {t for t, n in sources.sizes().items() if n > 0}
        for name, m in (("mix", self.mix), ("drift", self.drift_to or {})):
            bad = [t for t, w in m.items() if w > 0 and t not in available]
            if bad:
                raise ConfigurationError(f"{name} asks for query types without data: {bad}")

    repeated_share = staticmethod(repeated_share)

    def mix_at(self, t: int, n: int) -> dict[str, float]:
        if self.drift_to is None or n <= 1:
            return dict(self.mix)
        f = t / (n - 1)
        return {k: (1 - f) * self.mix.get(k, 0.0) + f * self.drift_to.get(k, 0.0) for k in QUERY_TYPES}

    def released(self, t: int) -> bool:
        return self.release_at is not None and t >= self.release_at

    def generate(self, n: int, *, offset: int = 0) -> list[SimQuery]:
        """``n`` queries; ``offset`` shifts the seed stream (a disjoint calibration slice).
        Round numbers (for ``release_at``) are ``0 .. n-1``."""
        rng = np.random.default_rng([self.seed, 7919, offset])
        user_rng = np.random.default_rng([self.seed, 104729, offset])
        out: list[SimQuery] = []
        for t in range(n):
            m = self.mix_at(t, n)
            probs = np.asarray([m.get(k, 0.0) for k in QUERY_TYPES])
            qtype = QUERY_TYPES[int(rng.choice(len(QUERY_TYPES), p=probs / probs.sum()))]
            user = self.users.draw(user_rng)
            for _attempt in range(100):
                q = self._draw(qtype, rng, user=user, released=self.released(t))
                if q is not None:
                    break
            else:
                raise ConfigurationError(f"no {qtype} need with a relevant item before the release")
            out.append(q)
        return out

    def _draw(self, qtype: str, rng: np.random.Generator, *, user: str = "",
              released: bool = True) -> SimQuery | None:
        s = self.sources
        drop = self.held_out if not released else frozenset()
        if qtype == "playlist":
            if self._pl_cdf is None:
                base = s.playlists[int(rng.integers(len(s.playlists)))]
            else:
                base = s.playlists[_pick(rng, self._pl_cdf)]
            return self._personal(base, user, drop, self._playlist_pool)
        if qtype == "tag":
            base = s.tags[_pick(rng, self._tag_cdf)]
            return self._personal(base, user, drop, self._tag_wants)
        if released and self.new_items and self.p_new > 0 and rng.random() < self.p_new:
            item = self.new_items[_pick(rng, self._new_cdf)]
        else:
            item = s.known_items[_pick(rng, self._ki_cdf if released else self._ki_cdf_pre)]
        q = known_item_query(item, rng, p_typo=self.p_typo, p_partial=self.p_partial)
        rel = {i: g for i, g in q.relevant.items() if i not in drop}
        if not rel:
            return None
        return SimQuery(q.qid, q.text, q.qtype, rel, target=q.target, noise=q.noise, user=user,
                        need=q.need)

    def _personal(self, base: SimQuery, user: str, drop: frozenset[str],
                  wants_of: Callable[[SimQuery, str, str, frozenset[str]], dict[str, int]]
                  ) -> SimQuery | None:
        need = base.need or f"{base.qtype}:{base.text if base.qtype == 'playlist' else base.qid}"
        if self.personal:
            rel = wants_of(base, user, need, drop)
        else:
            rel = {i: g for i, g in base.relevant.items() if i not in drop}
        if not rel:
            return None
        return SimQuery(base.qid, base.text, base.qtype, rel, target=base.target, noise=base.noise,
                        key=base.key, user=user, need=need)

    def _playlist_pool(self, base: SimQuery, user: str, need: str,
                       drop: frozenset[str]) -> dict[str, int]:
        pool = [i for i in base.relevant if i not in drop]
        pop = self.sources.popularity()
        wanted = self.users.wants(user, need, pool, [pop.get(i, 0.0) for i in pool])
        return {i: int(base.relevant[i]) for i in wanted}

    def _tag_wants(self, base: SimQuery, user: str, need: str,
                   drop: frozenset[str]) -> dict[str, int]:
        groups = self.sources.tag_groups.get(base.qid)
        if not groups:  # hand-built sources: sample the relevant items themselves
            return self._playlist_pool(base, user, need, drop)
        aw = self._artist_w.get(base.qid)
        if aw is None:
            pop = self.sources.popularity()
            aw = {a: max((pop.get(t, 0.0) for t in ts), default=0.0) for a, ts in groups.items()}
            self._artist_w[base.qid] = aw
        artists = [a for a in groups if a not in drop and a in base.relevant]
        weights = [aw[a] for a in artists]
        wanted = self.users.wants(user, need, artists, weights)
        rel: dict[str, int] = {}
        for a in wanted:
            rel.update({t: 1 for t in groups[a] if t not in drop and t in base.relevant})
        rel.update({a: int(base.relevant[a]) for a in wanted})
        return dict(sorted(rel.items()))


def type_counts(queries: Sequence[SimQuery]) -> dict[str, int]:
    c = Counter(q.qtype for q in queries)
    return {t: c.get(t, 0) for t in QUERY_TYPES}
