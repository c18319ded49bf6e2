"""Settings, errors, text normalisation and catalog derivations (no services needed)."""

from __future__ import annotations

import pickle

import pytest

from orchestrator import errors
from orchestrator.arms import validate_query
from orchestrator.catalog import era_of, moods_of, predicted_queries
from orchestrator.settings import OrchestratorSettings
from orchestrator.text import fold, normalize_query


def test_env_overrides_and_nested_delimiter(monkeypatch):
    monkeypatch.setenv("LTRR_ES__URL", "http://example:9201")
    monkeypatch.setenv("LTRR_LIMITS__MAX_QUERY_CHARS", "99")
    s = OrchestratorSettings()
    assert s.es.url == "http://example:9201"
    assert s.limits.max_query_chars == 99


def test_toml_file_is_read_and_env_wins(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[es]\nurl = "http://from-toml:9200"\ncatalog_alias = "cat"\n')
    monkeypatch.setenv("LTRR_CONFIG", str(cfg))
    assert OrchestratorSettings().es.catalog_alias == "cat"
    monkeypatch.setenv("LTRR_ES__URL", "http://from-env:9200")
    s = OrchestratorSettings()
    assert s.es.url == "http://from-env:9200" and s.es.catalog_alias == "cat"


def test_missing_config_file_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LTRR_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(errors.ConfigurationError, match="does not exist"):
        OrchestratorSettings()


@pytest.mark.parametrize("exc", [
    errors.ServiceUnavailableError("Redis", "redis://x"),
    errors.TemplateNotFoundError("x", ["a"]),
    errors.ArmExecutionError("lexical", 400, "bad"),
    errors.TemplateParamsError("bad"),
    errors.QueryValidationError("bad"),
])
def test_errors_pickle(exc):
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and str(back) == str(exc)


def test_service_error_names_the_fix():
    msg = str(errors.ServiceUnavailableError("Elasticsearch", "http://127.0.0.1:9200"))
    assert "scripts/services up" in msg and "\n" not in msg


def test_fold_and_normalize():
    assert fold("Beyoncé") == "beyonce"
    assert normalize_query("  Beyoncé -- Halo!! ") == "beyonce halo"
    assert normalize_query("AC/DC") == "ac dc"


@pytest.mark.parametrize("bad", ["", "   ", None, 5, "x" * 300, "a\x00b"])
def test_bad_queries_are_refused(bad):
    with pytest.raises(errors.QueryValidationError):
        validate_query(bad, max_chars=256)


def test_moods_and_eras():
    assert "happy" in moods_of({"valence": 0.9, "energy": 0.8})
    assert "sad" in moods_of({"valence": 0.1, "energy": 0.2})
    assert "party" in moods_of({"danceability": 0.9})
    assert era_of(1987) == "1980s" and era_of(None) is None


def test_predicted_queries_prefer_popular_entities():
    a = predicted_queries({"entity_type": "track", "title": "Halo", "artist": ["Beyoncé"], "popularity": 90})
    b = predicted_queries({"entity_type": "track", "title": "Halo", "artist": ["Nobody"], "popularity": 5})
    score = {d["query_key"]: d["score"] for d in a}
    assert score["beyonce halo"] > score["halo"]
    assert {d["query_key"]: d["score"] for d in b}["halo"] < score["halo"]
