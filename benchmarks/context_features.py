"""How much information the bandit's context vector carries: the featurizer before and after.

Featurizes the real playlist titles of ``../shared/data/music/playlists_dev.csv`` (the distinct
``playlist_name`` values: what people name a set of songs is what they type to find one)
through the committed QU model (``qu_models/``), each with a request context, and reports per
featurizer:

* ``distinct_features``: feature names seen, ``reserved_features`` / ``hashed_features`` of them;
* ``slots_used``: distinct vector indices (bias excluded);
* ``colliding_pairs``: pairs of distinct feature names that share one slot (hash collisions),
  listed; ``requests_with_collision``: requests in which two of their own features collided;
* ``max_share``: per request the largest squared coordinate of the L2-normalised non-bias
  part (1.0: one feature is the whole vector), mean / p50 / max over requests, and
  ``max_abs_value`` (the largest coordinate), and ``dominant_feature``: the feature with the
  largest mean share.

"before" is the featurizer of ``orchestrator/selection.py`` at commit :data:`BEFORE_COMMIT`
(version 1, ``hash_dim`` 16, read with ``git show``), "after" the current
:class:`orchestrator.featurizer.ContextFeaturizer` (``hash_dim`` 64). The request contexts
are synthetic but deterministic (request ``i``: hour ``7 i mod 24``, weekday ``i mod 7``, and
device, locale, segment and memory count cycling through the lists below, some absent), so
both featurizers see the same requests. Writes ``benchmarks/results/context_features.json``.

Usage::

    python benchmarks/context_features.py [--out benchmarks/results/context_features.json]
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator.domain import ParsedQuery, RequestContext
from orchestrator.featurizer import FEATURIZER_VERSION, ContextFeaturizer
from orchestrator.understanding import DEFAULT_MODEL_DIR, QueryUnderstander

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "music" / "playlists_dev.csv"
#: The last commit with the unversioned featurizer inside ``orchestrator/selection.py``.
BEFORE_COMMIT = "af91eee9070e6b75457d406d634a738022aeec92"
DEVICES = ("mobile", "desktop", "tablet", "smart-tv", None)
LOCALES = ("en-US", "es-ES", "pt-BR", "de-DE", "fr-FR", "en-GB", None)
SEGMENTS = ("new", "returning", "premium", None)
MEMORY = (None, 0, 1, 3, 12)


def playlist_titles(path: Path = DATA) -> list[str]:
    """The distinct playlist titles, sorted."""
    with path.open(encoding="utf-8", newline="") as fh:
        return sorted({row["playlist_name"].strip() for row in csv.DictReader(fh)
                       if row["playlist_name"].strip()})


def request_context(i: int) -> tuple[RequestContext, int | None]:
    return (RequestContext(hour=(7 * i) % 24, weekday=i % 7, device=DEVICES[i % len(DEVICES)],
                           locale=LOCALES[i % len(LOCALES)],
                           user_segment=SEGMENTS[i % len(SEGMENTS)]),
            MEMORY[i % len(MEMORY)])


def legacy_featurizer_class(commit: str = BEFORE_COMMIT) -> Any:
    """``ContextFeaturizer`` as it was at ``commit`` (loaded as a sibling module of the
    package, so its relative imports resolve)."""
    source = subprocess.run(["git", "show", f"{commit}:orchestrator/selection.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    tmp = Path(tempfile.mkdtemp()) / "selection_before.py"
    tmp.write_text(source, encoding="utf-8")
    name = "orchestrator._selection_before"
    spec = importlib.util.spec_from_file_location(name, tmp)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod.ContextFeaturizer


def measure(featurizer: Any, requests: Sequence[tuple[ParsedQuery | None, RequestContext, str,
                                                     int | None]],
            *, memory: bool) -> dict[str, Any]:
    """The figures of the module docstring for one featurizer over ``requests``."""
    name_to_slot: dict[str, int] = {}
    shares: list[float] = []
    max_abs: list[float] = []
    share_sum: dict[str, float] = defaultdict(float)
    with_collision = 0
    for parsed, ctx, query, pairs in requests:
        kw = {"memory_pairs": pairs} if memory else {}
        sc = featurizer.transform(parsed, ctx, query, **kw)
        slot_of = featurizer.slot if hasattr(featurizer, "slot") else featurizer._slot
        own = defaultdict(list)
        for fname in sc.features:
            s = slot_of(fname)
            name_to_slot[fname] = s
            own[s].append(fname)
        if any(len(v) > 1 for v in own.values()):
            with_collision += 1
        vals = dict(zip(sc.indices[1:], sc.values[1:]))
        sq = {i: v * v for i, v in vals.items()}
        shares.append(max(sq.values(), default=0.0))
        max_abs.append(max((abs(v) for v in vals.values()), default=0.0))
        for s, names in own.items():
            for fname in names:  # a shared slot's share is split evenly between its names
                share_sum[fname] += sq.get(s, 0.0) / len(names)
    by_slot: dict[int, list[str]] = defaultdict(list)
    for fname, s in name_to_slot.items():
        by_slot[s].append(fname)
    n_reserved = 1 + len(sys.modules[type(featurizer).__module__].RESERVED_FEATURES)
    pairs_list = sorted((sorted(p), s) for s, names in by_slot.items()
                        for p in itertools.combinations(sorted(names), 2))
    n = len(requests)
    dominant = max(share_sum.items(), key=lambda kv: kv[1])
    return {
        "version": getattr(featurizer, "version", "1"), "hash_dim": featurizer.hash_dim,
        "dim": featurizer.dim, "requests": n,
        "distinct_features": len(name_to_slot),
        "reserved_features": sum(1 for s in name_to_slot.values() if s < n_reserved),
        "hashed_features": sum(1 for s in name_to_slot.values() if s >= n_reserved),
        "slots_used": len(by_slot),
        "colliding_pairs": len(pairs_list),
        "collisions": [{"features": p, "slot": s} for p, s in pairs_list],
        "requests_with_collision": with_collision,
        "max_share": {"mean": round(statistics.fmean(shares), 4),
                      "p50": round(statistics.median(shares), 4), "max": round(max(shares), 4)},
        "max_abs_value": {"mean": round(statistics.fmean(max_abs), 4),
                          "max": round(max(max_abs), 4)},
        "dominant_feature": {"name": dominant[0], "mean_share": round(dominant[1] / n, 4)},
    }


def run(*, model_dir: Path = DEFAULT_MODEL_DIR) -> dict[str, Any]:
    titles = playlist_titles()
    qu = QueryUnderstander.load(model_dir)
    parsed = qu.parse_many(titles)
    requests = []
    for i, (p, title) in enumerate(zip(parsed, titles)):
        ctx, pairs = request_context(i)
        requests.append((p, ctx, title, pairs))
    before = measure(legacy_featurizer_class()(hash_dim=16), requests, memory=False)
    after = measure(ContextFeaturizer(hash_dim=64), requests, memory=True)
    return {
        "data": str(DATA.relative_to(ROOT.parent)), "queries": len(titles),
        "qu_model_version": qu.version, "before_commit": BEFORE_COMMIT,
        "featurizer_version": FEATURIZER_VERSION,
        "contexts": {"hour": "7 i mod 24", "weekday": "i mod 7", "device": list(DEVICES),
                     "locale": list(LOCALES), "segment": list(SEGMENTS), "memory_pairs": list(MEMORY)},
        "before": before, "after": after,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "context_features.json")
    args = ap.parse_args(argv)
    res = run()
    args.out.write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for side in ("before", "after"):
        r = res[side]
        print(f"{side:>6}: v{r['version']} dim={r['dim']} features={r['distinct_features']} "
              f"(reserved {r['reserved_features']}, hashed {r['hashed_features']}) "
              f"slots={r['slots_used']} colliding_pairs={r['colliding_pairs']} "
              f"requests_with_collision={r['requests_with_collision']}/{r['requests']} "
              f"max_share mean={r['max_share']['mean']} max={r['max_share']['max']} "
              f"dominant={r['dominant_feature']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
