"""Circuit breaker, durable spool, writer replay order, fallback cache, posterior cache on a
failed refresh, and what counts as a failed arm (no services needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator.bandit_state import (
    BetaUpdate,
    InMemoryBanditStore,
    LinearUpdate,
    update_from_dict,
    update_to_dict,
)
from orchestrator.errors import ServiceUnavailableError
from orchestrator.execution import _partial_failure
from orchestrator.resilience import (
    CircuitBreaker,
    DurableRedisWriter,
    FallbackCache,
    RecentImpressions,
    Spool,
    spool_key,
)
from orchestrator.selection import (
    ArmSpec,
    BetaThompsonSelector,
    LinearThompsonSelector,
    SelectionContext,
)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_breaker_opens_after_threshold_and_half_opens_one_probe():
    clock = Clock()
    b = CircuitBreaker("es", failure_threshold=3, reset_timeout_s=5.0, clock=clock)
    assert b.allow() and b.state == "closed"
    b.record_failure()
    b.record_failure()
    assert b.state == "closed" and b.allow()
    b.record_failure()
    assert b.state == "open" and not b.allow()
    assert b.retry_in_s() == pytest.approx(5.0)
    clock.t += 5.0
    assert b.state == "half_open"
    assert b.allow()          # the probe
    assert not b.allow()      # nobody else while it is out
    b.record_failure()        # probe failed: open again, for a full cool-down
    assert b.state == "open" and not b.allow()
    clock.t += 5.0
    assert b.allow()
    b.record_success()
    assert b.state == "closed" and b.allow() and b.snapshot()["consecutive_failures"] == 0


def test_update_dict_round_trip():
    ups = [LinearUpdate("arm:x", (0, 3, 7), (1.0, 0.5, -2.0), 0.8, 1.5), BetaUpdate("x.v1", "*", 1.0, 2.0)]
    back = [update_from_dict(json.loads(json.dumps(update_to_dict(u)))) for u in ups]
    assert back == ups


def _spool(tmp_path, key="k") -> Spool:
    return Spool(tmp_path, key=key)


def test_spool_is_lazy_durable_and_truncated_after_replay(tmp_path):
    sp = _spool(tmp_path)
    assert not sp.path.exists() and len(sp) == 0
    sp.append("impression", {"impression": {"request_id": "r1"}, "event": {}, "executed": []})
    sp.append("apply", {"updates": [], "dedupe": ["fb:r1", "i\x1fplay", 60], "event": {}})
    lines = sp.path.read_text().splitlines()
    assert [json.loads(x)["kind"] for x in lines] == ["impression", "apply"]
    assert sp.impression("r1") == {"request_id": "r1"} and sp.has_marker("fb:r1", "i\x1fplay")
    assert sp.next()["kind"] == "impression"
    sp.advance()
    assert len(sp) == 1 and sp.path.read_text()  # nothing truncated before everything is in
    sp.advance()
    assert len(sp) == 0 and sp.path.read_text() == "" and sp.impression("r1") is None
    sp.close()
    assert not sp.path.exists()


def test_orphan_spool_is_adopted_in_order_and_torn_line_skipped(tmp_path):
    dead = _spool(tmp_path, key="same")
    for i in range(3):
        dead.append("apply", {"n": i})
    with open(dead.path, "a") as fh:
        fh.write('{"kind": "apply", "payl')  # crash mid-write: never acknowledged
    alive_owner = _spool(tmp_path, key="same")
    seen: list[int] = []
    # While its owner holds the lock, the file is not adopted.
    assert alive_owner.adopt(dead.path, lambda r: seen.append(r["payload"]["n"])) == 0
    dead._fh.close()
    dead._fh = None  # the process "died": lock released, records left on disk
    assert dead.path in alive_owner.orphans()
    assert alive_owner.adopt(dead.path, lambda r: seen.append(r["payload"]["n"])) == 3
    assert seen == [0, 1, 2] and not dead.path.exists()
    other = _spool(tmp_path, key="other-prefix")
    assert other.orphans() == []


class FlakyRedis:
    """Appliers that fail while ``down``; records what went in, in order."""

    def __init__(self) -> None:
        self.down = False
        self.applied: list[int] = []

    def apply(self, payload):
        if self.down:
            raise ServiceUnavailableError("Redis", "redis://test")
        self.applied.append(payload["n"])
        return True


def test_writer_spools_while_down_and_replays_in_order(tmp_path):
    redis = FlakyRedis()
    w = DurableRedisWriter(_spool(tmp_path), {"apply": redis.apply},
                           breaker=CircuitBreaker("Redis", failure_threshold=1, reset_timeout_s=0.0),
                           replay_interval_s=3600)
    assert w.write("apply", {"n": 0}) == (True, False)
    redis.down = True
    assert w.write("apply", {"n": 1}) == (None, True)
    assert w.write("apply", {"n": 2}) == (None, True)
    assert len(w.spool) == 2 and w.status()["spooled"] == 2
    assert w.replay() == 0 and len(w.spool) == 2  # still down: nothing lost, nothing skipped
    redis.down = False
    # Until Redis is seen answering again, a new write queues behind the spooled ones (no
    # request waits on a Redis that may be hung; the replay thread probes it).
    assert w.write("apply", {"n": 3}) == (None, True)
    assert w.replay() == 3 and w.breaker.state == "closed"
    assert w.write("apply", {"n": 4}) == (True, False)
    # With Redis answering, a write first drains whatever is spooled, so it lands after it.
    w.spool.append("apply", {"n": 5})
    assert w.write("apply", {"n": 6}) == (True, False)
    assert redis.applied == [0, 1, 2, 3, 4, 5, 6] and len(w.spool) == 0
    w.close()


def test_writer_background_replay(tmp_path):
    import time

    redis = FlakyRedis()
    redis.down = True
    w = DurableRedisWriter(_spool(tmp_path), {"apply": redis.apply}, replay_interval_s=0.05)
    w.write("apply", {"n": 1})
    redis.down = False
    deadline = time.monotonic() + 10
    while redis.applied != [1] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert redis.applied == [1] and len(w.spool) == 0
    w.close()


def test_fallback_cache_lru_and_age():
    clock = Clock()
    c = FallbackCache(2, max_age_s=10, clock=clock)
    c.put(("a", 10), "A")
    c.put(("b", 10), "B")
    assert c.get(("a", 10)) == (0.0, "A")
    c.put(("c", 10), "C")  # evicts b (a was used more recently)
    assert c.get(("b", 10)) is None and c.get(("a", 5)) is None
    clock.t += 11
    assert c.get(("a", 10)) is None
    assert FallbackCache(0).get(("a", 10)) is None


def test_recent_impressions_bounded():
    r = RecentImpressions(2)
    for i in range(3):
        r.put({"request_id": f"r{i}"})
    assert r.get("r0") is None and r.get("r2") == {"request_id": "r2"}


def test_spool_key_separates_prefixes():
    assert spool_key("redis://x/0", "a:") != spool_key("redis://x/0", "b:")


class DownStore(InMemoryBanditStore):
    down = False

    def _check(self):
        if self.down:
            raise ServiceUnavailableError("Redis", "redis://test")

    def version(self):
        self._check()
        return super().version()

    def revisions(self, components):
        self._check()
        return super().revisions(components)

    def load_linear(self, components):
        self._check()
        return super().load_linear(components)

    def load_beta(self, template_ids):
        self._check()
        return super().load_beta(template_ids)


ARMS = [ArmSpec("a", "a.v1", (("source", "x"),)), ArmSpec("b", "b.v1", (("source", "y"),))]
CTX = SelectionContext({"bias": 1.0, "f": 1.0}, (0, 1), (1.0, 1.0), "b")


def test_linear_selector_keeps_posteriors_when_the_store_is_down():
    store = DownStore(dim=4)
    sel = LinearThompsonSelector(store, refresh_interval_s=0, random_state=0)
    sel.select(CTX, ARMS, total_budget=20)
    from orchestrator.rewards import ArmReward

    store.apply(sel.updates_for(CTX, [ArmReward("a", "a.v1", 1.0, 1.0, (("source", "x"),))] * 5))
    sel.select(CTX, ARMS, total_budget=20)
    mu_before = sel.posteriors_["arm:a.v1"].mu.copy()
    store.down = True
    decision = sel.select(CTX, ARMS, total_budget=20)  # no raise
    assert decision.choices and np.array_equal(sel.posteriors_["arm:a.v1"].mu, mu_before)
    # An arm never loaded gets its prior instead of an error.
    new = ArmSpec("c", "c.v1", (("source", "z"),))
    assert sel.select(CTX, [*ARMS, new], total_budget=20).propensities["c.v1"] >= 0


def test_beta_selector_keeps_statistics_when_the_store_is_down():
    store = DownStore(dim=4)
    sel = BetaThompsonSelector(store, refresh_interval_s=0, random_state=0)
    sel.select(CTX, ARMS, total_budget=20)
    store.down = True
    assert sel.select(CTX, ARMS, total_budget=20).choices


def test_partial_failures_are_arm_failures():
    ok = {"timed_out": False, "_shards": {"total": 1, "successful": 1, "failed": 0},
          "hits": {"hits": []}}
    assert _partial_failure(ok) is None
    status, reason = _partial_failure({**ok, "timed_out": True, "hits": {"hits": [{}, {}]}})
    assert status == 504 and "2 partial hit(s)" in reason
    shard = {**ok, "_shards": {"total": 2, "successful": 1, "failed": 1, "failures": [
        {"status": 503, "reason": {"type": "node_disconnected", "reason": "gone"}}]}}
    assert _partial_failure(shard) == (503, "1/2 shard(s) failed: node_disconnected: gone")


def test_guarded_read_fails_fast_while_the_breaker_is_open():
    import redis

    from orchestrator.redis_client import guarded_read

    clock = Clock()
    breaker = CircuitBreaker("Redis", failure_threshold=1, reset_timeout_s=1.0, clock=clock)
    calls: list[str] = []

    def hung() -> str:
        calls.append("hung")
        raise redis.TimeoutError("Timeout reading from socket")

    def ok() -> str:
        calls.append("ok")
        return "v"

    assert guarded_read(None, ok) == "v"  # no breaker (offline jobs): a plain call
    assert guarded_read(breaker, ok) == "v" and breaker.state == "closed"
    with pytest.raises(redis.TimeoutError):
        guarded_read(breaker, hung)  # the one read that pays the time-out opens it
    assert breaker.state == "open"
    calls.clear()
    for _ in range(3):  # the next reads do not touch Redis
        with pytest.raises(redis.ConnectionError, match="circuit open"):
            guarded_read(breaker, ok)
    clock.t += 5.0
    assert breaker.state == "half_open"
    with pytest.raises(redis.ConnectionError):  # reads never probe: the writer does
        guarded_read(breaker, ok)
    assert calls == []
    breaker.record_success()  # the writer's write or replay found Redis back
    assert guarded_read(breaker, ok) == "v" and calls == ["ok"]


def test_store_and_memory_keys_reads_consult_the_breaker():
    import redis

    from orchestrator.bandit_state import RedisBanditStore
    from orchestrator.memory import MemoryKeys

    class HungRedis:
        """Every command times out, as a SIGSTOPped Redis does."""

        def __init__(self) -> None:
            self.calls = 0

        def register_script(self, _src):
            return lambda **_: None

        def __getattr__(self, name):
            def call(*_a, **_k):
                self.calls += 1
                raise redis.TimeoutError("Timeout reading from socket")
            return call

    client = HungRedis()
    breaker = CircuitBreaker("Redis", failure_threshold=1, reset_timeout_s=60.0, clock=Clock())
    store = RedisBanditStore(client, prefix="t:", dim=4, breaker=breaker)  # type: ignore[arg-type]
    keys = MemoryKeys(client, prefix="t:", breaker=breaker)  # type: ignore[arg-type]
    assert keys.known_pairs("so what") is None and client.calls == 1
    with pytest.raises(ServiceUnavailableError):
        store.version()
    with pytest.raises(ServiceUnavailableError):
        store.state_versions()
    assert keys.known_pairs("summertime") is None
    assert client.calls == 1  # one time-out in all
