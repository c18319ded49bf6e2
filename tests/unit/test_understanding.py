"""Query understanding: the trained model in ``qu_models/`` and the pieces it is built from.

Two tiers in one file: tests on a tiny in-memory lexicon (no artifacts needed) and tests on
the committed model (``qu_models/``, built by ``ltrr qu-train`` from the real catalog).
Latency is not asserted here; see ``benchmarks/qu_eval.py``.
"""

from __future__ import annotations

import pickle
import random
from collections import Counter

import pytest

from orchestrator.domain import INTENTS, SLOT_CATEGORIES, ParsedQuery, Slot
from orchestrator.errors import ConfigurationError
from orchestrator.qu_training import (
    CatalogSummary,
    QUExample,
    build_lexicon,
    build_pipeline,
    era_terms,
    evaluate,
    misspell,
)
from orchestrator.text import normalize_query
from orchestrator.understanding import (
    DEFAULT_MODEL_DIR,
    Lexicon,
    ModelNotFoundError,
    QueryUnderstander,
    clean_title,
    format_parsed,
    get_understander,
    guess_language,
    normalize_with_offsets,
)


# -- pure helpers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "Beyoncé", "  AC/DC -- Back in Black!! ", "80's hip_hop", "Sigur Rós ágætis", "r&b",
    '"}},{"match_all":{}', "", "ﬁre", "Mötley Crüe", "日本語 pop",
])
def test_normalize_with_offsets_matches_normalize_query(text):
    norm, offsets = normalize_with_offsets(text)
    assert norm == normalize_query(text)
    assert len(offsets) == len(norm)
    for ch, i in zip(norm, offsets):
        if ch != " ":
            assert 0 <= i < len(text)


def test_offsets_point_into_the_original_text():
    text = "Beyoncé — Halo"
    norm, offsets = normalize_with_offsets(text)
    start = norm.index("halo")
    assert text[offsets[start]: offsets[start + 3] + 1] == "Halo"


def test_clean_title_drops_featuring_and_remix_suffixes():
    assert clean_title("I Don't Care (with Justin Bieber) - Loud Luxury Remix") == "I Don't Care"
    assert clean_title("Halo") == "Halo"


def test_era_terms_map_spellings_to_decades():
    eras = era_terms()
    assert eras["80s"] == eras["80 s"] == eras["eighties"] == eras["1980s"] == "1980s"
    assert eras["00s"] == "2000s"
    assert eras["20s"] == "2020s"


def test_misspell_is_seeded_and_keeps_the_first_letter():
    a = [misspell("taylor swift", random.Random(3)) for _ in range(3)]
    b = [misspell("taylor swift", random.Random(3)) for _ in range(3)]
    assert a == b
    rng = random.Random(0)
    for _ in range(50):
        typo = misspell("beyonce", rng)
        assert typo[0] == "b" and typo != "" and abs(len(typo) - 7) <= 1


def test_guess_language():
    assert guess_language("", []) is None
    assert guess_language("Остров", ["остров"]) == "other"
    assert guess_language("musica para bailar", ["musica", "para", "bailar"]) == "es"
    assert guess_language("beyonce", ["beyonce"]) == "en"


def test_model_not_found_error_is_catchable_and_pickles(tmp_path):
    err = ModelNotFoundError(tmp_path / "nope", "missing")
    assert isinstance(err, FileNotFoundError) and isinstance(err, ConfigurationError)
    assert "run: ltrr qu-train" in str(err)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.path == err.path


def test_load_missing_folder_says_what_to_run(tmp_path):
    with pytest.raises(ModelNotFoundError, match="ltrr qu-train"):
        QueryUnderstander.load(tmp_path / "qu_models")


def test_evaluate_counts_slots_by_normalized_value():
    ex = [QUExample("hiphop", "browse", (("genre", "hip-hop"),), "g", "t")]
    pq = ParsedQuery(text="hiphop", normalized="hiphop", intent="browse",
                     slots=(Slot("genre", "hip hop", 0.9, 0, 6),))
    m = evaluate([pq], ex)
    assert m["intent_accuracy"] == 1.0
    assert m["slots"]["genre"]["precision"] == 1.0 and m["slots"]["genre"]["recall"] == 1.0


# -- a tiny in-memory lexicon (no artifacts) ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny() -> QueryUnderstander:
    summary = CatalogSummary(
        artists={
            "beyonce": ("Beyoncé", 0.87, 21), "beyond": ("Beyond", 0.60, 14),
            "beyonse": ("Beyonse Band", 0.05, 1),  # an obscure near-duplicate
            "taylor swift": ("Taylor Swift", 0.73, 83), "swift": ("Swift", 0.10, 1),
            "eminem": ("Eminem", 0.84, 77), "ed sheeran": ("Ed Sheeran", 0.91, 100),
            "queen": ("Queen", 0.80, 50),
        },
        tracks=[("Love Story", "Taylor Swift", 0.80), ("Halo", "Beyoncé", 0.75)],
        albums=[("Divide", "Ed Sheeran", 0.80)],
        genres=Counter({"pop": 100, "rock": 80, "hard-rock": 20, "hard rock": 10, "classical": 5}),
        tags=Counter({"dance pop": 9, "indie rock": 7}),
        title_words=Counter({"love": 100, "story": 20, "halo": 2}),
    )
    lex = build_lexicon(summary)
    nlp = build_pipeline(lex, bow_length=2**10)
    lexicon = Lexicon(artists=lex.artists, vocab=lex.vocab, common_words=lex.common_words,
                      filler_words=lex.filler_words, title_popularity=lex.title_popularity)
    return QueryUnderstander(nlp, lexicon)


def test_tiny_ruler_and_fuzzy_slots(tiny):
    pq = tiny.parse("tayler swift love story")
    assert pq.values("artist") == ["Taylor Swift"]
    assert pq.values("track") == ["Love Story"]
    artist = next(s for s in pq.slots if s.category == "artist")
    assert artist.source == "fuzzy" and (artist.start, artist.end) == (0, 12)


def test_tiny_popularity_beats_an_obscure_exact_near_duplicate(tiny):
    # "beyonse" is exactly the name of an obscure artist (popularity 0.05): that ruler match
    # is weak, so fuzzy matching runs and the popular Beyoncé wins the resolution
    pq = tiny.parse("beyonse")
    assert pq.values("artist") == ["Beyoncé"]
    assert pq.slots[0].source == "fuzzy"
    assert tiny.parse("beyonce").values("artist") == ["Beyoncé"]


def test_tiny_untrained_intent_defaults_to_broad(tiny):
    pq = tiny.parse("happy 80s pop")
    assert pq.intent == "broad" and pq.intent_probs == {}
    assert set(pq.values("mood")) == {"happy"}
    assert pq.values("era") == ["1980s"]


# -- the committed model --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qu() -> QueryUnderstander:
    try:
        return get_understander()
    except ModelNotFoundError as exc:  # the artifacts are committed: missing ones are a bug
        pytest.fail(str(exc))


def test_get_understander_is_cached(qu):
    assert get_understander() is qu
    assert qu.metadata["schema_version"] == 1
    assert set(qu.metadata["label_counts"]["train"]) == set(INTENTS)


def test_misspelled_artist_and_track(qu):
    pq = qu.parse("tayler swift love story")
    artist = [s for s in pq.slots if s.category == "artist"]
    assert [s.value for s in artist] == ["Taylor Swift"]
    assert artist[0].source == "fuzzy" and artist[0].confidence >= 0.7
    assert pq.text[artist[0].start:artist[0].end] == "tayler swift"
    assert pq.values("track") == ["Love Story"]
    assert pq.intent == "known_item"


@pytest.mark.parametrize("query,artist", [
    ("beyonse", "Beyoncé"), ("eminen", "Eminem"), ("ed sheran", "Ed Sheeran"),
    ("Beyoncé", "Beyoncé"), ("BEYONCE", "Beyoncé"), ("arianna grande", "Ariana Grande"),
    ("the beatels", "The Beatles"), ("sheeran", "Ed Sheeran"),
])
def test_artist_misspellings_and_partial_names(qu, query, artist):
    pq = qu.parse(query)
    assert pq.values("artist")[:1] == [artist]
    assert pq.intent == "artist"
    assert pq.features["has_artist"] == 1.0


def test_browse_query(qu):
    pq = qu.parse("happy 80s pop")
    assert pq.values("mood") == ["happy"]
    assert pq.values("era") == ["1980s"]
    assert pq.values("genre") == ["pop"]
    assert pq.intent == "browse"
    assert pq.features["intent=browse"] == 1.0 and pq.features["has_era"] == 1.0
    assert pq.features["slot_coverage"] == 1.0


def test_topical_playlist_title(qu):
    pq = qu.parse("Hard Rock Workout")
    assert pq.values("genre") == ["hard rock"]
    assert pq.values("mood") == ["energetic"]
    assert pq.intent == "topical"
    pq = qu.parse("songs for a rainy day")
    assert pq.intent == "topical" and not pq.values("artist")


@pytest.mark.parametrize("query", ["music", "love", "hits"])
def test_broad_single_words(qu, query):
    assert qu.parse(query).intent == "broad"


def test_misspelled_genre(qu):
    assert qu.parse("clasical music").values("genre") == ["classical"]


def test_intent_probs_and_features_are_complete(qu):
    pq = qu.parse("90s rock")
    assert set(pq.intent_probs) == set(INTENTS)
    assert abs(sum(pq.intent_probs.values()) - 1.0) < 1e-3
    for cat in SLOT_CATEGORIES:
        assert f"has_{cat}" in pq.features
    for name in INTENTS:
        assert f"intent={name}" in pq.features
    assert all(isinstance(v, float) for v in pq.features.values())
    assert pq.features["n_tokens"] == 2.0 and pq.features["has_digits"] == 1.0


def test_injection_looking_text_is_just_text(qu):
    text = '"}},{"match_all":{}'
    pq = qu.parse(text)
    assert pq.text == text
    assert pq.normalized == "match all"
    assert pq.intent in INTENTS
    for s in pq.slots:
        assert 0 <= s.start < s.end <= len(text)


def test_empty_and_whitespace_input(qu):
    for text in ("", "   ", "!!!"):
        pq = qu.parse(text)
        assert pq.slots == () and pq.intent == "broad"
        assert pq.features["n_tokens"] == 0.0


def test_very_long_input_is_truncated(qu):
    text = "taylor swift " * 500
    pq = qu.parse(text)
    assert len(pq.text) == qu.max_chars
    assert pq.features["truncated"] == 1.0
    assert pq.values("artist") == ["Taylor Swift"]


def test_non_latin_and_spanish_queries_get_a_language(qu):
    assert qu.parse("Остров").language == "other"
    assert qu.parse("música para bailar").language == "es"
    assert qu.parse("taylor swift").language == "en"


def test_parse_many_matches_parse(qu):
    queries = ["beyonse", "happy 80s pop", "", "Hard Rock Workout", "ed sheran"]
    batch = qu.parse_many(queries)
    assert [p.intent for p in batch] == [qu.parse(q).intent for q in queries]
    assert [p.slots for p in batch] == [qu.parse(q).slots for q in queries]


def test_format_parsed_mentions_slots_and_intent(qu):
    out = format_parsed(qu.parse("tayler swift love story"))
    assert "Taylor Swift" in out and "known_item" in out and "fuzzy" in out


def test_model_folder_is_small():
    size = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.rglob("*") if f.is_file())
    assert size < 30_000_000
