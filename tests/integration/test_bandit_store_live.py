"""The Redis bandit store against the in-memory one (the reference semantics) on the same
random updates: the statistics it loads (its vectorised parse of the stat hashes) and the
revisions a selector's cache relies on."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.bandit_state import InMemoryBanditStore, LinearUpdate, RedisBanditStore

pytestmark = pytest.mark.redis

DIM = 12
COMPS = ["arm:a.v1", "arm:b.v1", "af:source=x", "arm:never"]


def test_redis_store_loads_what_the_in_memory_store_holds_and_bumps_revisions(
        redis_client, redis_prefix):
    rng = np.random.default_rng(5)
    redis_store = RedisBanditStore(redis_client, prefix=redis_prefix, dim=DIM)
    redis_store.check_schema()
    memory = InMemoryBanditStore(dim=DIM)
    for store in (redis_store, memory):
        assert store.revisions(COMPS)[1] == [0, 0, 0, 0]
    for step in range(40):
        comp = COMPS[int(rng.integers(3))]
        k = int(rng.integers(1, 6))
        idx = tuple(sorted(int(i) for i in rng.choice(DIM, size=k, replace=False)))
        vals = tuple(float(v) for v in rng.normal(size=k))
        u = LinearUpdate(comp, idx, vals, float(rng.random()), float(rng.uniform(0.5, 2)))
        before = {s: s.revisions(COMPS) for s in (redis_store, memory)}
        for store in (redis_store, memory):
            store.apply([u])
        for store in (redis_store, memory):
            gen, revs = store.revisions(COMPS)
            assert gen == before[store][0]
            bumped = [c for c, r0, r1 in zip(COMPS, before[store][1], revs) if r1 != r0]
            assert bumped == [comp], (step, bumped)
    got, want = redis_store.load_linear(COMPS), memory.load_linear(COMPS)
    for c in COMPS:
        np.testing.assert_allclose(got[c].A, want[c].A, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got[c].b, want[c].b, rtol=1e-12, atol=1e-12)
        assert (got[c].n, got[c].w) == pytest.approx((want[c].n, want[c].w))
        np.testing.assert_array_equal(got[c].A, got[c].A.T)
    assert got["arm:never"].n == 0 and not got["arm:never"].A.any()
    assert got["arm:a.v1"].A.any() and got["arm:b.v1"].A.any()
