"""The mover's bulk body: ``event_source`` is ``event_document`` serialised, with the entry's
own JSON spliced in as the payload when it can be."""

from __future__ import annotations

import json

import orjson
import pytest

from orchestrator.event_log import event_document, event_source

IMPRESSION = {"request_id": "r1", "query": "Chill Vibes", "query_key": "chill vibes",
              "parsed": {"intent": "playlist", "slots": [{"cat": "mood", "conf": 0.8}]},
              "arms": [{"template_id": "lexical.v2", "budget": 20}, {"arm": "memory"}],
              "shown": [{"id": "t1", "rank": 1}, {"id": "t2", "rank": 2}], "text": "naïve ✓"}
CASES = [
    ("impression", json.dumps(IMPRESSION)),
    ("impression", json.dumps(IMPRESSION, indent=2)),  # whitespace around the object
    ("feedback", json.dumps({"request_id": "r1", "item_id": "t2", "action": "click",
                             "position": 2, "ts": "2026-12-01T10:00:00+00:00"})),
    ("feedback", json.dumps({"rewarded_arms": {"lexical.v2": 1.0}, "value": float("nan")})),
    ("feedback", json.dumps({"big": 2 ** 70})),  # outside orjson's integers
    ("other", json.dumps([1, 2, 3])),             # not an object
    ("other", "{not json"),
    ("other", ""),
]


@pytest.mark.parametrize(("type_", "data"), CASES)
@pytest.mark.parametrize("as_bytes", [False, True])
def test_event_source_is_the_document_serialised(type_: str, data: str, as_bytes: bool) -> None:
    expected = event_document("1796319964141-7", {"type": type_, "data": data})
    fields = {"type": type_.encode() if as_bytes else type_,
              "data": data.encode() if as_bytes else data}
    body = event_source("1796319964141-7", fields)
    # What Elasticsearch stores (the standard library reads NaN, orjson does not): the lifted
    # fields of the document, and the payload exactly as the standard library reads the entry.
    got = json.loads(body)
    payload = got.pop("payload")
    expected.pop("payload")
    assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)
    try:
        reference = json.loads(data)
    except json.JSONDecodeError:
        reference = {"raw": data} if data else {}
    if not isinstance(reference, dict):
        reference = {"value": reference}
    if "NaN" in data:  # Elasticsearch refuses NaN: it is stored as null
        assert payload["value"] is None and "NaN" not in body.decode()
        reference["value"] = None
    assert json.dumps(payload, sort_keys=True) == json.dumps(reference, sort_keys=True)
    assert got["event_id"] == "1796319964141-7" and got["type"] == type_


def test_the_payload_is_spliced_unchanged_and_the_lifted_fields_are_there() -> None:
    data = json.dumps(IMPRESSION)
    body = event_source("1-0", {"type": "impression", "data": data})
    assert body.endswith(b',"payload":' + data.encode() + b"}")
    doc = orjson.loads(body)
    assert doc["intent"] == "playlist" and doc["arms"] == ["lexical.v2", "memory"]
    assert doc["query_key"] == "chill vibes" and doc["ts"].startswith("1970-01-01T00:00:00.001")

