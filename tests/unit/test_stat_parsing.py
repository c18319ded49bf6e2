"""Parsing a Redis linear stat hash (``orchestrator.bandit_state._parse_linear``) against the
field-by-field reading it replaces, on every shape a hash can take."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.bandit_state import _field_index, _parse_linear


def reference(h, dim):
    """The plain reading: each field ``A:i:j`` (i <= j), ``b:i``, ``n``, ``w`` by itself."""
    A, b, n, w = np.zeros((dim, dim)), np.zeros(dim), 0.0, 0.0
    for k, v in h.items():
        k = k.decode() if isinstance(k, bytes) else k
        v = float(v)
        parts = k.split(":")
        if parts[0] == "A" and len(parts) == 3:
            i, j = int(parts[1]), int(parts[2])
            if i <= j < dim:
                A[i, j] = A[j, i] = v
        elif parts[0] == "b" and len(parts) == 2 and int(parts[1]) < dim:
            b[int(parts[1])] = v
        elif k == "n":
            n = v
        elif k == "w":
            w = v
    return A, b, n, w


def random_hash(rng, dim, *, as_bytes=True, extra=(), fmt=repr):
    names = [f"A:{i}:{j}" for i in range(dim) for j in range(i, dim)] + \
            [f"b:{i}" for i in range(dim)] + ["n", "w"]
    chosen = [names[k] for k in rng.choice(len(names), size=len(names) // 2, replace=False)]
    h = {k: fmt(float(rng.normal() * 10.0 ** int(rng.integers(-8, 6)))) for k in [*chosen, *extra]}
    if as_bytes:
        h = {k.encode(): v.encode() for k, v in h.items()}
    return h


@pytest.mark.parametrize("as_bytes", [True, False])
@pytest.mark.parametrize("extra", [(), ("rev", "A:1", "b:x:y")])
def test_parse_equals_the_field_by_field_reading(as_bytes, extra):
    rng = np.random.default_rng(7)
    for dim in (1, 5, 23):
        h = random_hash(rng, dim, as_bytes=as_bytes, extra=extra)
        st = _parse_linear(h, dim)
        A, b, n, w = reference({k: v for k, v in h.items()
                                if (k.decode() if isinstance(k, bytes) else k) not in extra}, dim)
        np.testing.assert_array_equal(st.A, A)
        np.testing.assert_array_equal(st.b, b)
        assert (st.n, st.w) == (n, w)


def test_values_json_does_not_read_and_mixed_names_still_parse():
    h = {b"A:0:0": b"inf", b"b:0": b"nan", "n": "3", b"w": b"1e-300", b"A:0:1": b"-0.0"}
    st = _parse_linear(h, 2)
    assert st.A[0, 0] == np.inf and np.isnan(st.b[0]) and st.n == 3.0 and st.w == 1e-300
    assert st.A[0, 1] == 0.0 and st.A[1, 0] == 0.0
    # Redis's own float formatting (HINCRBYFLOAT: %.17g, integers without a point).
    h2 = {b"A:0:0": b"2", b"A:1:1": b"0.10000000000000001", b"b:1": b"1.0000000000000001e-05"}
    st2 = _parse_linear(h2, 2)
    assert st2.A[0, 0] == 2.0 and st2.A[1, 1] == 0.1 and st2.b[1] == 1e-05


def test_empty_hash_is_the_prior_and_a_name_with_the_separator_is_ignored():
    st = _parse_linear({}, 3)
    assert not st.A.any() and not st.b.any() and st.n == 0.0
    st2 = _parse_linear({b"A:0:0": b"1.5", b"odd\x00name": b"9"}, 2)
    assert st2.A[0, 0] == 1.5 and st2.A.sum() == 1.5 and not st2.b.any()


def test_field_order_is_cached_and_read_only():
    _field_index.cache_clear()
    h = random_hash(np.random.default_rng(1), 9)
    a, b = _parse_linear(h, 9), _parse_linear(dict(h), 9)
    assert _field_index.cache_info().hits == 1
    np.testing.assert_array_equal(a.A, b.A)
    idx = _field_index(b"\x00".join(h), 9)
    with pytest.raises(ValueError):
        idx[0] = 0
    reordered = dict(reversed(list(h.items())))  # another order: another entry, same numbers
    np.testing.assert_array_equal(_parse_linear(reordered, 9).A, a.A)
