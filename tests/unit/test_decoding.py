"""orchestrator.decoding: the log's JSON through orjson, the collector paused."""

from __future__ import annotations

import gc
import json

import pytest

from orchestrator.decoding import dumps, loads, paused_gc


def test_paused_gc_pauses_the_collector_and_restores_its_state():
    was = gc.isenabled()
    try:
        gc.enable()
        with paused_gc():
            assert not gc.isenabled()
            with paused_gc():  # nested: the inner block does not resume it early
                pass
            assert not gc.isenabled()
        assert gc.isenabled()
        with pytest.raises(RuntimeError), paused_gc():
            raise RuntimeError("a failing job")
        assert gc.isenabled()  # resumed on the way out of a failure too
        gc.disable()
        with paused_gc():
            pass
        assert not gc.isenabled()  # a collector that was off stays off
    finally:
        (gc.enable if was else gc.disable)()


def test_stream_entries_decode_as_the_standard_library_reads_them():
    """decoding.loads (FeedbackLog.read_events, the memory updater) decodes with orjson and falls back to the standard library
    for what orjson refuses (NaN, infinities): the same values either way. An integer past
    64 bits reads as the nearest float, as the Elasticsearch client's decoding reads it."""
    assert loads('{"n": 1180591620717411303424}') == {"n": float(2 ** 70)}
    texts = ['{"a": 1, "b": [0.1, 2.5e-7, -3], "c": {"d": "é"}, "e": null}',
             '{"value": NaN, "x": Infinity}', "[1, 2]"]
    for text in texts:
        for raw in (text, text.encode()):
            got, want = loads(raw), json.loads(text)
            assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)
    with pytest.raises(json.JSONDecodeError):
        loads("{broken")


def test_log_records_encode_to_what_the_standard_library_writes():
    """decoding.dumps (FeedbackLog: impressions, events, compact records): the same JSON
    values as ``json.dumps``, compact, except NaN and infinities, written as null (valid JSON,
    what the event mover makes of them); the standard library writes what orjson refuses."""
    obj = {"request_id": "r1", "query": "café au lait", "shown": [{"id": "t:1", "rank": 1,
           "score": 0.123457, "features": [1e-05, -0.0, 3, 2.5e-7]}], "e": None, "t": True}
    raw = dumps(obj)
    assert isinstance(raw, bytes) and b" " not in raw.replace(b"caf\xc3\xa9 au lait", b"")
    assert json.loads(raw) == json.loads(json.dumps(obj))
    assert json.loads(dumps({"v": float("nan"), "w": [float("inf"), float("-inf"), 1.5]})) == \
        {"v": None, "w": [None, None, 1.5]}
    # orjson refuses these: integers past 64 bits, keys that are not strings
    big = {"n": 2 ** 70, "x": [float("nan")]}
    assert json.loads(dumps(big)) == {"n": 2 ** 70, "x": [None]}
    assert json.loads(dumps({1: "a", "b": (1, 2)})) == {"1": "a", "b": [1, 2]}
    assert b": " not in dumps(big) and b", " not in dumps(big)
