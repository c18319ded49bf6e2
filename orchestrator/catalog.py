"""Build catalog entities (tracks, artists, albums) from the bundled music data.

Consumes ``shared/data/music`` (three Spotify-derived sources merged on ``track_id``, plus
Last.fm tags and listening counts); produces plain dict documents matching
``mappings/catalog.v1.json`` (no embeddings yet: :mod:`orchestrator.ingest` adds them) and
a :class:`BuildReport` of what was skipped and why. Bad rows are counted, never fatal.
"""

from __future__ import annotations

import ast
import csv
import functools
import hashlib
import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import IngestError
from .text import fold, normalize_query

logger = logging.getLogger(__name__)

AUDIO_FEATURES = (
    "danceability", "energy", "valence", "tempo", "acousticness",
    "instrumentalness", "speechiness", "liveness", "loudness",
)


@dataclass
class BuildReport:
    rows_read: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)
    entities: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {k: dict(getattr(self, k)) for k in ("rows_read", "skipped", "warnings", "entities")}


def _num(value: str | None, report: BuildReport, what: str) -> float | None:
    if value is None or value.strip() == "":
        return None
    try:
        v = float(value)
    except ValueError:
        report.warnings[f"unparsable {what}"] += 1
        return None
    if math.isnan(v) or math.isinf(v):
        report.warnings[f"non-finite {what}"] += 1
        return None
    return v


def _year(date: str | None) -> int | None:
    if date and len(date) >= 4 and date[:4].isdigit():
        y = int(date[:4])
        return y if 1900 <= y <= 2030 else None
    return None


def era_of(year: int | None) -> str | None:
    return f"{year // 10 * 10}s" if year else None


def moods_of(audio: dict[str, float]) -> list[str]:
    """Mood tags from audio features (Spotify's valence/energy plane plus a few extremes)."""
    v, e = audio.get("valence"), audio.get("energy")
    moods: list[str] = []
    if v is not None and e is not None:
        if v >= 0.6 and e >= 0.6:
            moods += ["happy", "upbeat"]
        elif v >= 0.6:
            moods += ["happy", "chill"]
        elif v < 0.35 and e >= 0.7:
            moods += ["intense", "angry"]
        elif v < 0.35 and e < 0.5:
            moods += ["sad", "melancholic"]
        elif e < 0.4:
            moods += ["chill", "calm"]
        if e >= 0.8:
            moods.append("energetic")
    if (audio.get("danceability") or 0) >= 0.75:
        moods += ["dance", "party"]
    if (audio.get("acousticness") or 0) >= 0.8:
        moods.append("acoustic")
    if (audio.get("instrumentalness") or 0) >= 0.6:
        moods.append("instrumental")
    if e is not None and e < 0.25 and (audio.get("tempo") or 200) < 100:
        moods.append("sleep")
    return sorted(set(moods))


def _bucket(value: float | None, cuts: tuple[float, float]) -> str | None:
    if value is None:
        return None
    return "low" if value < cuts[0] else ("medium" if value < cuts[1] else "high")


def _tempo_bucket(tempo: float | None) -> str | None:
    if not tempo:
        return None
    return "slow" if tempo < 90 else ("medium" if tempo < 125 else "fast")


def _parse_genre_list(text: str | None, report: BuildReport) -> list[str]:
    if not text or text.strip() in ("", "[]"):
        return []
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        report.warnings["unparsable artist_genres"] += 1
        return []
    return [str(g).strip().lower() for g in value if str(g).strip()] if isinstance(value, (list, tuple)) else []


def _stable_id(*parts: str) -> str:
    return hashlib.sha1("\x1f".join(parts).encode()).hexdigest()[:16]


class _Track:
    __slots__ = (
        "track_id", "title", "artists", "album", "popularity", "duration_ms", "explicit",
        "audio", "genres", "release_date", "artist_genres", "artist_popularity",
        "artist_followers",
    )

    def __init__(self, track_id: str) -> None:
        self.track_id = track_id
        self.title: str | None = None
        self.artists: list[str] = []
        self.album: str | None = None
        self.popularity: float | None = None
        self.duration_ms: float | None = None
        self.explicit: bool | None = None
        self.audio: dict[str, float] = {}
        self.genres: set[str] = set()
        self.release_date: str | None = None
        self.artist_genres: set[str] = set()
        self.artist_popularity: float | None = None
        self.artist_followers: float | None = None

    def merge(self, *, title: str | None, artists: list[str], album: str | None,
              popularity: float | None, duration_ms: float | None, explicit: bool | None,
              audio: dict[str, float], release_date: str | None) -> None:
        # First non-empty value wins for text; the highest popularity wins (sources differ in date).
        self.title = self.title or title
        self.artists = self.artists or artists
        self.album = self.album or album
        if popularity is not None:
            self.popularity = max(self.popularity or 0.0, popularity)
        self.duration_ms = self.duration_ms or duration_ms
        self.explicit = self.explicit if self.explicit is not None else explicit
        for k, v in audio.items():
            self.audio.setdefault(k, v)
        self.release_date = self.release_date or release_date


def _read_csv(path: Path) -> Iterator[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        yield from csv.DictReader(fh)


def _audio(row: dict[str, str], report: BuildReport) -> dict[str, float]:
    out = {}
    for k in AUDIO_FEATURES:
        v = _num(row.get(k), report, k)
        if v is not None:
            out[k] = v
    return out


def _bool(value: str | None) -> bool | None:
    if value is None:
        return None
    return {"true": True, "false": False}.get(value.strip().lower())


def lastfm_rows(folder: Path, name: str, encoding: str = "utf-8") -> Iterator[list[str]]:
    """Rows (tab-separated fields, header skipped) of one HetRec 2011 Last.fm ``.dat`` file;
    ``tags.dat`` is latin-1, the others UTF-8; undecodable bytes are replaced."""
    with (Path(folder) / name).open(encoding=encoding, errors="replace", newline="") as fh:
        next(fh, None)
        for line in fh:
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) >= 2:
                yield parts


def lastfm_catalog_user(user_id: str) -> bool:
    """True when this Last.fm user's tag assignments feed the catalog (``artist_genres``);
    the other half (odd ids) is reserved for evaluation (the simulator's tag relevance), so
    the catalog never sees the answers. Non-numeric ids go to the catalog."""
    uid = str(user_id).strip()
    return int(uid) % 2 == 0 if uid.isdigit() else True


class CatalogBuilder:
    """Merge the sources and yield entity documents.

    Parameters
    ----------
    data_dir:
        The ``music`` folder of the shared data.
    track_filter:
        Optional predicate on the merged track (used by tests to index a slice).
    """

    def __init__(self, data_dir: Path, *, genres: set[str] | None = None, limit: int | None = None,
                 exclude: frozenset[str] | None = None, only: frozenset[str] | None = None) -> None:
        if not (data_dir / "spotify-tracks-114k").is_dir():
            raise IngestError(f"no music data under {data_dir} (expected spotify-tracks-114k/ there)")
        self.data_dir = data_dir
        self.genres = genres
        self.limit = limit
        #: Catalog ids (``track:<id>``) of tracks left out (a hold-out): their albums and
        #: artists are built from the remaining tracks only (and vanish when none remain).
        self.exclude = frozenset(exclude) if exclude is not None else None
        #: Yield only these ids, computed from the full catalog: the track docs in ``only``
        #: plus the complete album/artist docs of every such track (and any album/artist id
        #: in ``only``), i.e. what an incremental add must (re)write.
        self.only = frozenset(only) if only is not None else None
        self.report = BuildReport()

    # -- reading ---------------------------------------------------------------------------
    def _tracks(self) -> dict[str, _Track]:
        rep, tracks = self.report, {}

        def get(tid: str) -> _Track:
            t = tracks.get(tid)
            if t is None:
                t = tracks[tid] = _Track(tid)
            return t

        def valid(row: dict[str, str], title_key: str, source: str) -> bool:
            rep.rows_read[source] += 1
            if not (row.get("track_id") or "").strip():
                rep.skipped[f"{source}: missing track_id"] += 1
                return False
            if not (row.get(title_key) or "").strip():
                rep.skipped[f"{source}: missing track name"] += 1
                return False
            return True

        for path in sorted((self.data_dir / "spotify-tracks-114k").glob("*.csv")):
            for row in _read_csv(path):
                if not valid(row, "track_name", "spotify-tracks-114k"):
                    continue
                t = get(row["track_id"])
                t.merge(
                    title=row["track_name"].strip(),
                    artists=[a.strip() for a in (row.get("artists") or "").split(";") if a.strip()],
                    album=(row.get("album_name") or "").strip() or None,
                    popularity=_num(row.get("popularity"), rep, "popularity"),
                    duration_ms=_num(row.get("duration_ms"), rep, "duration_ms"),
                    explicit=_bool(row.get("explicit")),
                    audio=_audio(row, rep),
                    release_date=None,
                )
                if row.get("track_genre"):
                    t.genres.add(row["track_genre"].strip().lower())

        for path in sorted((self.data_dir / "spotify-api-2024").glob("*.csv")):
            file_genre = path.stem.strip().lower()
            for row in _read_csv(path):
                if not valid(row, "track_name", "spotify-api-2024"):
                    continue
                t = get(row["track_id"])
                t.merge(
                    title=row["track_name"].strip(),
                    artists=[row["artist_name"].strip()] if (row.get("artist_name") or "").strip() else [],
                    album=(row.get("album_name") or "").strip() or None,
                    popularity=_num(row.get("popularity"), rep, "popularity"),
                    duration_ms=_num(row.get("duration_ms"), rep, "duration_ms"),
                    explicit=_bool(row.get("explicit")),
                    audio=_audio(row, rep),
                    release_date=(row.get("release_date") or "").strip() or None,
                )
                t.genres.add(file_genre)
                t.artist_genres.update(_parse_genre_list(row.get("artist_genres"), rep))
                ap = _num(row.get("artist_popularity"), rep, "artist_popularity")
                af = _num(row.get("artist_followers"), rep, "artist_followers")
                t.artist_popularity = ap if ap is not None else t.artist_popularity
                t.artist_followers = af if af is not None else t.artist_followers

        for name in ("playlists_dev.csv", "playlist_tracks_extra.csv"):
            path = self.data_dir / name
            if not path.exists():
                rep.warnings[f"missing file {name}"] += 1
                continue
            for row in _read_csv(path):
                if not valid(row, "track_name", name):
                    continue
                t = get(row["track_id"])
                t.merge(
                    title=row["track_name"].strip(),
                    artists=[row["track_artist"].strip()] if (row.get("track_artist") or "").strip() else [],
                    album=(row.get("track_album_name") or "").strip() or None,
                    popularity=_num(row.get("track_popularity"), rep, "popularity"),
                    duration_ms=_num(row.get("duration_ms"), rep, "duration_ms"),
                    explicit=None,
                    audio=_audio(row, rep),
                    release_date=(row.get("track_album_release_date") or "").strip() or None,
                )
                # The playlist columns (name, genre, subgenre) are evaluation answers (the
                # simulator's playlist queries and their relevance): never copied into the
                # catalog. Playlist rows only contribute the track's own metadata.
        return tracks

    def _lastfm(self) -> tuple[dict[str, list[str]], dict[str, int]]:
        """Artist (folded name) -> top Last.fm tags, and -> total listening count."""
        folder = self.data_dir / "lastfm-hetrec2011"
        if not folder.is_dir():
            self.report.warnings["lastfm data missing"] += 1
            return {}, {}

        def rows(name: str, encoding: str = "utf-8") -> Iterator[list[str]]:
            return lastfm_rows(folder, name, encoding)

        names = {p[0]: fold(p[1]).strip() for p in rows("artists.dat")}
        tag_names = {p[0]: p[1].strip().lower() for p in rows("tags.dat", "latin-1")}
        tag_counts: dict[str, Counter[str]] = defaultdict(Counter)
        for p in rows("user_taggedartists.dat"):
            # Only the catalog half of the users (see lastfm_catalog_user).
            if len(p) > 2 and lastfm_catalog_user(p[0]) and p[1] in names and p[2] in tag_names:
                tag_counts[names[p[1]]][tag_names[p[2]]] += 1
        listens: Counter[str] = Counter()
        for p in rows("user_artists.dat"):
            if p[1] in names and len(p) > 2 and p[2].isdigit():
                listens[names[p[1]]] += int(p[2])
        top = {a: [t for t, n in c.most_common(8) if n >= 2] for a, c in tag_counts.items()}
        return top, dict(listens)

    # -- building --------------------------------------------------------------------------
    def build(self) -> Iterator[dict[str, Any]]:
        """Yield tracks, then albums, then artists."""
        tracks = self._tracks()
        lastfm_tags, lastfm_listens = self._lastfm()
        # Fine artist tags are known per artist name in one source; spread them to all tracks.
        artist_fine: dict[str, set[str]] = defaultdict(set)
        artist_pop: dict[str, tuple[float | None, float | None]] = {}
        for t in tracks.values():
            if t.artists and t.artist_genres:
                artist_fine[fold(t.artists[0])].update(t.artist_genres)
            if t.artists and t.artist_popularity is not None:
                artist_pop[fold(t.artists[0])] = (t.artist_popularity, t.artist_followers)

        albums: dict[str, dict[str, Any]] = {}
        artists: dict[str, dict[str, Any]] = {}
        groups_wanted: set[str] = set(self.only or ())
        emitted = 0
        for t in tracks.values():
            if not t.artists:
                self.report.skipped["track without artist"] += 1
                continue
            if self.genres is not None and not (t.genres & self.genres):
                continue
            if self.exclude is not None and f"track:{t.track_id}" in self.exclude:
                self.report.skipped["held out"] += 1
                continue
            if self.limit is not None and emitted >= self.limit:
                break
            emitted += 1
            key = fold(t.artists[0])
            fine = set(t.artist_genres) | artist_fine.get(key, set()) | set(lastfm_tags.get(key, []))
            year = _year(t.release_date)
            doc = self._entity(
                "track", t.track_id, title=t.title or "", artists=t.artists, album=t.album,
                genres=sorted(t.genres), artist_genres=sorted(fine), audio=t.audio, year=year,
                popularity=t.popularity or 0.0, explicit=t.explicit, duration_ms=t.duration_ms,
                artist_popularity=artist_pop.get(key, (None, None))[0],
                artist_followers=artist_pop.get(key, (None, None))[1],
                listeners=lastfm_listens.get(key), track_count=None,
            )
            self._accumulate(albums, artists, t, doc)
            if self.only is None or doc_id(doc) in self.only:
                if self.only is not None:
                    album_id, artist_ids = track_group_ids(t.artists, t.album)
                    groups_wanted.update(f"artist:{i}" for i in artist_ids)
                    if album_id:
                        groups_wanted.add(f"album:{album_id}")
                self.report.entities["track"] += 1
                yield doc

        for kind, store in (("album", albums), ("artist", artists)):
            for gid, a in store.items():
                if self.only is not None and f"{kind}:{gid}" not in groups_wanted:
                    continue
                self.report.entities[kind] += 1
                yield self._finish_group(kind, a, lastfm_listens)

    def _accumulate(self, albums: dict[str, dict[str, Any]], artists: dict[str, dict[str, Any]],
                    t: _Track, doc: dict[str, Any]) -> None:
        primary = t.artists[0]
        album_id, artist_ids = track_group_ids(t.artists, t.album)
        groups: list[tuple[dict[str, dict[str, Any]], str, str, str | None]] = []
        if t.album and album_id:
            groups.append((albums, album_id, t.album, primary))
        for name, aid in zip(t.artists, artist_ids):
            groups.append((artists, aid, name, None))
        for store, gid, title, artist in groups:
            g = store.get(gid)
            if g is None:
                g = store[gid] = {
                    "id": gid, "title": title, "artist": artist, "n": 0, "pop": 0.0,
                    "genres": Counter(), "fine": set(), "years": [], "audio": defaultdict(list),
                    "explicit": False, "ap": doc.get("artist_popularity"),
                    "af": doc.get("artist_followers"),
                }
            g["n"] += 1
            g["pop"] = max(g["pop"], doc["popularity"])
            g["genres"].update(doc.get("genres", ()))
            if artist is not None or fold(title) == fold(primary):
                g["fine"].update(doc.get("artist_genres", ()))
            if doc.get("release_year"):
                g["years"].append(doc["release_year"])
            for k, v in t.audio.items():
                g["audio"][k].append(v)
            g["explicit"] = g["explicit"] or bool(t.explicit)

    def _finish_group(self, kind: str, g: dict[str, Any], listens: dict[str, int]) -> dict[str, Any]:
        audio = {k: sum(v) / len(v) for k, v in g["audio"].items() if v}
        year = min(g["years"]) if g["years"] else None
        name = g["title"]
        is_artist = kind == "artist"
        pop = g["ap"] if is_artist and g["ap"] is not None else g["pop"]
        return self._entity(
            kind, g["id"], title=name, artists=[name] if is_artist else [g["artist"]],
            album=name if kind == "album" else None,
            genres=[x for x, _ in g["genres"].most_common(10)], artist_genres=sorted(g["fine"]),
            audio=audio, year=year, popularity=float(pop), explicit=g["explicit"],
            duration_ms=None, artist_popularity=g["ap"], artist_followers=g["af"],
            listeners=listens.get(fold(name if is_artist else g["artist"])),
            track_count=g["n"],
        )

    def _entity(self, kind: str, eid: str, *, title: str, artists: list[str], album: str | None,
                genres: list[str], artist_genres: list[str], audio: dict[str, float],
                year: int | None, popularity: float, explicit: bool | None,
                duration_ms: float | None, artist_popularity: float | None,
                artist_followers: float | None, listeners: int | None,
                track_count: int | None) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "entity_type": kind,
            "entity_id": eid,
            "title": title,
            "artist": artists,
            "album": album,
            "folded": " ".join(fold(x) for x in [title, *artists, album or ""] if x),
            "genres": genres,
            "artist_genres": artist_genres[:40],
            "moods": moods_of(audio),
            "energy": _bucket(audio.get("energy"), (0.4, 0.7)),
            "danceability": _bucket(audio.get("danceability"), (0.45, 0.7)),
            "tempo": _tempo_bucket(audio.get("tempo")),
            "era": era_of(year),
            "release_year": year,
            "popularity": round(popularity, 2),
            "artist_popularity": artist_popularity,
            "artist_followers": int(artist_followers) if artist_followers is not None else None,
            "listeners": listeners,
            "explicit": explicit,
            "duration_ms": int(duration_ms) if duration_ms else None,
            "track_count": track_count,
            "audio": {k: round(v, 4) for k, v in audio.items()},
        }
        doc["q2e"] = predicted_queries(doc)
        return {k: v for k, v in doc.items() if v is not None and v != []}


def track_group_ids(artists: list[str], album: str | None) -> tuple[str | None, list[str]]:
    """The album entity id (primary artist + album; None without an album) and the artist
    entity ids (one per credited artist) a track belongs to, as :class:`CatalogBuilder`
    builds them (catalog ids are ``album:<id>`` / ``artist:<id>``)."""
    album_id = _stable_id(fold(artists[0]), fold(album)) if album and artists else None
    return album_id, [_stable_id(fold(name)) for name in artists]


@dataclass(frozen=True)
class HoldOut:
    """The newest releases, left out of a build and added later (:func:`hold_out_newest`).
    All ids are catalog ids (``track:<spotify id>``, ``album:<id>``, ``artist:<id>``)."""

    track_ids: frozenset[str]
    album_ids: frozenset[str]
    artist_ids: frozenset[str]
    cutoff: str
    fraction: float

    @property
    def ids(self) -> frozenset[str]:
        return self.track_ids | self.album_ids | self.artist_ids


def _date_key(date: str) -> str:
    # "2019" / "2019-06" / "2019-06-14" compared on one scale (partial dates sort first).
    parts = (date.strip().split("-") + ["00", "00"])[:3]
    return "-".join([parts[0].zfill(4), parts[1].zfill(2)[:2], parts[2].zfill(2)[:2]])


def hold_out_newest(data_dir: Path, fraction: float = 0.02) -> HoldOut:
    """The newest ``fraction`` of all merged tracks (by release date; undated tracks are
    never held out; ties broken by id), expanded to whole releases (every track of the same
    primary artist + album). ``album_ids``/``artist_ids``: the albums/artists all of whose
    tracks are held out (they are new entities). Deterministic; cached per folder."""
    return _hold_out_cached(str(Path(data_dir).resolve()), float(fraction))


@functools.lru_cache(maxsize=8)
def _hold_out_cached(data_dir: str, fraction: float) -> HoldOut:
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"hold-out fraction must be in [0, 1), got {fraction}")
    tracks = [t for t in CatalogBuilder(Path(data_dir))._tracks().values() if t.artists]
    dated = sorted((t for t in tracks if t.release_date and _year(t.release_date)),
                   key=lambda t: (_date_key(t.release_date or ""), t.track_id), reverse=True)
    n = min(len(dated), int(round(fraction * len(tracks))))
    seeds = dated[:n]
    cutoff = seeds[-1].release_date or "" if seeds else ""
    album_of = {t.track_id: track_group_ids(t.artists, t.album)[0] for t in tracks}
    seed_albums = {album_of[t.track_id] for t in seeds if album_of[t.track_id]}
    held = {t.track_id for t in seeds} | {
        t.track_id for t in tracks if album_of[t.track_id] in seed_albums}
    album_total: Counter[str] = Counter()
    album_held: Counter[str] = Counter()
    artist_total: Counter[str] = Counter()
    artist_held: Counter[str] = Counter()
    for t in tracks:
        h = t.track_id in held
        a = album_of[t.track_id]
        if a:
            album_total[a] += 1
            album_held[a] += h
        for aid in set(track_group_ids(t.artists, t.album)[1]):
            artist_total[aid] += 1
            artist_held[aid] += h
    return HoldOut(
        track_ids=frozenset(f"track:{i}" for i in held),
        album_ids=frozenset(f"album:{a}" for a, n_ in album_total.items() if album_held[a] == n_),
        artist_ids=frozenset(f"artist:{a}" for a, n_ in artist_total.items() if artist_held[a] == n_),
        cutoff=cutoff, fraction=fraction,
    )


def doc_id(doc: dict[str, Any]) -> str:
    return f"{doc['entity_type']}:{doc['entity_id']}"


def embedding_text(doc: dict[str, Any]) -> str:
    """What the encoder sees for an entity: names, type, genres and moods."""
    parts = [doc.get("title", ""), " ".join(doc.get("artist", [])), doc.get("album", "") or "",
             doc["entity_type"], " ".join(doc.get("genres", [])[:5]),
             " ".join(doc.get("artist_genres", [])[:5]), " ".join(doc.get("moods", []))]
    return " ".join(p for p in parts if p)


_VERSION_SUFFIX = re.compile(r"\s+-\s+.*$|\s*[(\[][^)\]]*[)\]]")


def base_title(title: str) -> str:
    """A title without version decorations: ``"Bohemian Rhapsody - Remastered 2011"`` and
    ``"Halo (feat. X) [Live]"`` become ``"Bohemian Rhapsody"`` and ``"Halo"``."""
    base = _VERSION_SUFFIX.sub("", title).strip()
    return base or title


def predicted_queries(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Cold-start Q2E pairs: the queries a user would likely type to find this entity, each
    with a predicted score in [0, 1] (popularity-weighted: of two equal titles, the more
    popular one is the likelier target). Click statistics replace these later."""
    pop = min(max(doc.get("popularity", 0.0), 0.0), 100.0) / 100.0
    title = normalize_query(doc.get("title", ""))
    artist = normalize_query(doc["artist"][0]) if doc.get("artist") else ""
    out: dict[str, float] = {}
    kind = doc["entity_type"]
    if kind == "track":
        base = normalize_query(base_title(doc.get("title", "")))
        # Users type the bare title; a decorated version (remaster, live, feat.) is a
        # slightly less likely target of the bare title than the original.
        for t, penalty in ((base, 0.05), (title, 0.0)) if base != title else ((title, 0.0),):
            if t and artist:
                out[f"{artist} {t}"] = 0.6 + 0.4 * pop - penalty
                out[f"{t} {artist}"] = 0.55 + 0.4 * pop - penalty
            if t:
                out[t] = 0.3 + 0.6 * pop - penalty
    elif kind == "artist":
        if title:
            out[title] = 0.7 + 0.3 * pop
            out[f"{title} songs"] = 0.6 + 0.3 * pop
    elif kind == "album":
        if title:
            out[title] = 0.35 + 0.5 * pop
            out[f"{title} album"] = 0.5 + 0.4 * pop
        if title and artist:
            out[f"{artist} {title}"] = 0.5 + 0.4 * pop
    return [
        {"query_key": k, "score": round(v, 4), "prior": round(v, 4), "source": "predicted"}
        for k, v in out.items() if k and len(k) <= 200
    ]
