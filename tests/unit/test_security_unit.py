"""Request tokens, API keys, the in-process rate-limit fallback, error pickling and JSON logs
(no services)."""

from __future__ import annotations

import io
import json
import logging
import pickle

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.backoff import NoBackoff
from redis.retry import Retry

from orchestrator.errors import (
    AuthenticationError,
    ExpiredTokenError,
    ForgedTokenError,
    InvalidTokenError,
    RateLimitedError,
    ReplayedFeedbackError,
    ServiceUnavailableError,
    TokenMismatchError,
)
from orchestrator.log import JsonFormatter, RequestIdFilter, configure_logging, set_request_id
from orchestrator.security import ApiKeys, RateLimiter, RequestSigner, hash_api_key

NOW = 1_800_000_000.0
RID = "3f2b8c1e-0000-4000-8000-000000000001"


def signer(secret: str = "s3cret", ttl: int = 3600) -> RequestSigner:
    return RequestSigner(None, prefix="t:", secret=secret, ttl_s=ttl, clock=lambda: NOW)


def dead_redis() -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.1, socket_timeout=0.1,
                       retry=Retry(NoBackoff(), 0))


def test_token_round_trip_and_url_safe():
    tok = signer().issue(RID, client_id="10.0.0.1")
    assert tok.startswith("v1.") and all(c.isalnum() or c in "-_." for c in tok)
    signer().verify(tok, request_id=RID, client_id="10.0.0.1")  # no exception
    # In-process callers (client_id None) get and verify tokens bound to the local client.
    local = signer().issue(RID)
    signer().verify(local, request_id=RID)
    with pytest.raises(TokenMismatchError, match="another client"):
        signer().verify(local, request_id=RID, client_id="10.0.0.1")


def test_token_refusals_each_say_why():
    s = signer()
    tok = s.issue(RID, client_id="a")
    with pytest.raises(TokenMismatchError, match="another request"):
        s.verify(tok, request_id=RID[:-1] + "2", client_id="a")
    with pytest.raises(TokenMismatchError, match="another client"):
        s.verify(tok, request_id=RID, client_id="b")
    with pytest.raises(ExpiredTokenError):
        s.verify(tok, request_id=RID, client_id="a", now=NOW + 3601)
    s.verify(tok, request_id=RID, client_id="a", now=NOW + 3599)
    # Another deployment's secret: its tokens do not verify here.
    with pytest.raises(ForgedTokenError, match="signature"):
        signer("other").verify(tok, request_id=RID, client_id="a")
    # Extending the expiry (or any field) breaks the MAC.
    v, r, c, exp, mac = tok.split(".")
    with pytest.raises(ForgedTokenError):
        s.verify(".".join((v, r, c, str(int(exp) + 10**6), mac)), request_id=RID, client_id="a")
    for bad in ("", "v1", "v2." + tok[3:], tok + ".x", "v1.a.b.notanumber.c", 42, None,
                "v1.\u00e9.b.1.c", "v1.!!!.b.1.c"):
        with pytest.raises(ForgedTokenError):
            s.verify(bad, request_id=RID, client_id="a")
    assert issubclass(ForgedTokenError, InvalidTokenError)


@settings(max_examples=200, deadline=None)
@given(token=st.one_of(st.text(max_size=300), st.binary(max_size=200).map(lambda b: b.hex())),
       rid=st.text(min_size=1, max_size=64), client=st.text(max_size=64))
def test_arbitrary_strings_never_verify_and_never_crash(token, rid, client):
    with pytest.raises(InvalidTokenError):
        signer().verify(token, request_id=rid, client_id=client)


@settings(max_examples=100, deadline=None)
@given(rid=st.text(min_size=1, max_size=64), client=st.text(max_size=64),
       flip=st.integers(min_value=0, max_value=10_000))
def test_any_single_character_change_is_refused(rid, client, flip):
    s = signer()
    tok = s.issue(rid.encode("utf-8", "replace").decode("utf-8"), client_id=client)
    i = flip % len(tok)
    swapped = tok[:i] + ("A" if tok[i] != "A" else "B") + tok[i + 1:]
    # Including the last character of the signature, whose low bits base64 leaves unused.
    last = tok[:-1] + ("A" if tok[-1] != "A" else "B")
    with pytest.raises(InvalidTokenError):
        s.verify(last, request_id=rid, client_id=client)
    with pytest.raises(InvalidTokenError):
        s.verify(swapped, request_id=rid, client_id=client)


def test_signer_without_secret_and_redis_is_a_clear_503():
    s = RequestSigner(dead_redis(), prefix="t:", url="redis://127.0.0.1:1")
    with pytest.raises(ServiceUnavailableError, match="Redis"):
        s.issue(RID)


def test_api_keys():
    keys = ApiKeys({hash_api_key("k-123"): "frontend", hash_api_key("k-456").upper(): "sim"})
    assert keys.enabled and not ApiKeys().enabled
    assert keys.authenticate("k-123") == "frontend" and keys.authenticate("k-456") == "sim"
    for bad in (None, "", "k-12", "k-1234", hash_api_key("k-123")):
        with pytest.raises(AuthenticationError):
            keys.authenticate(bad)


def test_rate_limiter_falls_back_to_process_counters_when_redis_is_down():
    now = [NOW]
    rl = RateLimiter(dead_redis(), prefix="t:", clock=lambda: now[0])
    for i in range(1, 4):
        assert rl.hit("feedback", "c1", limit=3, window_s=60) == i
    with pytest.raises(RateLimitedError) as info:
        rl.hit("feedback", "c1", limit=3, window_s=60)
    assert 1 <= info.value.retry_after_s <= 60 and rl.fallbacks == 4
    assert rl.hit("feedback", "c2", limit=3, window_s=60) == 1   # per client
    assert rl.hit("search", "c1", limit=3, window_s=60) == 1     # per bucket
    assert rl.hit("feedback", "c1", limit=0, window_s=60) == 0   # 0 = unlimited
    now[0] += 60                                                  # next window
    assert rl.hit("feedback", "c1", limit=3, window_s=60) == 1


def test_errors_pickle():
    for exc in (RateLimitedError("feedback", 5, 60, 12), ReplayedFeedbackError("r", "i", "play"),
                ForgedTokenError("bad"), AuthenticationError("no key")):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc)
    assert pickle.loads(pickle.dumps(RateLimitedError("f", 5, 60, 12))).retry_after_s == 12


def test_json_log_lines_carry_the_request_id_and_extras():
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    lg = logging.getLogger("test.security.json")
    lg.addHandler(handler)
    lg.setLevel(logging.INFO)
    lg.propagate = False
    try:
        token = set_request_id("rid-123")
        lg.info("hello %s", "w\u00f6rld", extra={"arm": "lexical.v1"})
        set_request_id(None)
        lg.warning("outside")
        token.var.reset(token)
    finally:
        lg.removeHandler(handler)
    first, second = (json.loads(line) for line in buf.getvalue().splitlines())
    assert first["request_id"] == "rid-123" and first["message"] == "hello w\u00f6rld"
    assert first["arm"] == "lexical.v1" and first["level"] == "INFO"
    assert first["logger"] == "test.security.json" and first["ts"].endswith("Z")
    assert second["request_id"] is None and second["level"] == "WARNING"


def test_configure_logging_leaves_one_root_handler():
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    try:
        buf = io.StringIO()
        configure_logging("INFO", stream=io.StringIO())
        configure_logging("INFO", stream=buf)
        assert len(root.handlers) == 1
        set_request_id("abc")
        logging.getLogger("x.y").info("one")
        set_request_id(None)
        assert json.loads(buf.getvalue())["request_id"] == "abc"
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


def test_influence_cap_counts_in_process_while_redis_is_down():
    from orchestrator.security import InfluenceCap

    now = [NOW]
    cap = InfluenceCap(dead_redis(), prefix="t:", cap=3.0, window_s=60, clock=lambda: now[0])
    first = cap.reserve("c1", {"a": 2.0, "b": 1.0})
    assert first is not None and first.local
    assert cap.reserve("c1", {"a": 1.5}) is None          # a would reach 3.5 > 3
    assert cap.reserve("c1", {"b": 2.0}) is not None      # b reaches exactly 3
    assert cap.reserve("c1", {"a": 0.5, "b": 0.5}) is None  # all or nothing: b is full
    assert cap.reserve("c2", {"a": 3.0}) is not None      # per client
    cap.release(first)                                    # a duplicate: refunded
    assert cap.reserve("c1", {"a": 3.0}) is not None
    now[0] += 60                                          # a new window starts empty
    assert cap.reserve("c1", {"a": 3.0, "b": 3.0}) is not None
    assert cap.reserve("c1", {}) is not None and cap.fallbacks >= 6
