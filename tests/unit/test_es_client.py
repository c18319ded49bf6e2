"""The client's orjson serializers read and write what the default ones do."""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid

import numpy as np
import pytest
from elasticsearch.serializer import JsonSerializer, NdjsonSerializer

from orchestrator.es_client import SERIALIZERS, OrjsonJsonSerializer, OrjsonNdjsonSerializer
from orchestrator.settings import EsSettings

BODIES = [
    {"query": {"match": {"title": "naïve ✓"}}, "size": 10, "from": 0},
    {"knn": {"field": "embedding", "query_vector": np.linspace(-1, 1, 8, dtype=np.float64),
             "k": 5}},
    {"ids": np.array([1, 2, 3], dtype=np.int64), "n": np.int32(7), "x": np.float64(0.25),
     "when": dt.datetime(2026, 12, 1, 10, 0, tzinfo=dt.timezone.utc), "u": uuid.UUID(int=5)},
    {1: "a non-str key", "nested": [{"a": None, "b": True}]},
    {"big": 2 ** 70},  # past orjson's integers: the standard library writes it
]


@pytest.mark.parametrize("body", BODIES)
def test_the_orjson_serializer_writes_what_the_default_one_writes(body: dict) -> None:
    ours, default = OrjsonJsonSerializer(), JsonSerializer()
    assert json.loads(ours.dumps(body)) == json.loads(default.dumps(body))
    nd_ours, nd_default = OrjsonNdjsonSerializer(), NdjsonSerializer()
    lines = [{"index": "x"}, body]
    assert nd_ours.loads(nd_ours.dumps(lines)) == nd_default.loads(nd_default.dumps(lines))


def test_responses_the_standard_library_reads_are_read() -> None:
    got = OrjsonJsonSerializer().loads(b'{"hits": {"max_score": NaN, "total": 3}}')
    assert math.isnan(got["hits"]["max_score"]) and got["hits"]["total"] == 3
    assert OrjsonJsonSerializer().loads(b"") is None


def test_every_built_client_uses_them_for_the_compatibility_mimetypes_too() -> None:
    from orchestrator.es_client import build_client

    client = build_client(EsSettings(url="http://127.0.0.1:1"))
    by_mime = client.transport.serializers.serializers
    assert by_mime["application/vnd.elasticsearch+json"] is SERIALIZERS["application/json"]
    assert by_mime["application/vnd.elasticsearch+x-ndjson"] is SERIALIZERS["application/x-ndjson"]
