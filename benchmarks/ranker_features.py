"""Does the ranker learn more with the ``|browse`` feature copies (``rescorer.intent_split``)?

One simulated ``ours`` run logs its impressions with every feature and its copies (the
retraining chain off, so every list is ranked by the default model and the log is the same
for both layouts); the ranker is then trained on that one log twice, on the plain features
(the first half of each row) and on plain + copies, with the project's own training path
(:func:`orchestrator.training.ranking_groups`, IPS weights from the run's examination prior,
:func:`orchestrator.rescoring.train_rescorer`) and scored by the same held-out IPS-nDCG@10
the promotion gate uses (:func:`orchestrator.training.evaluate`), on rolling-origin folds:
train on the first ``k / (folds + 1)`` of the groups by time, test on the next slice.
A paired sign-flip test over every test group (per-group nDCG, plain vs split) says whether
the difference is noise; browse groups (a browse / topical / broad intent) and lookups are
reported apart. ``gated``: the plain model used only for the query kinds where it beat the
default on the newest 20% of its own training slice (a per-kind promotion gate), the
default elsewhere.

    python benchmarks/ranker_features.py [--rounds 2000] [--folds 5] \\
        [--out benchmarks/results/ranker_features.json]
    python benchmarks/ranker_features.py --smoke      # CI: test-ltrr-catalog, 60 rounds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from orchestrator.examination import ExaminationModel  # noqa: E402
from orchestrator.rescoring import LinearRescorer, ips_weights, train_rescorer  # noqa: E402
from orchestrator.settings import OrchestratorSettings  # noqa: E402
from orchestrator.simulation.report import paired_p_value  # noqa: E402
from orchestrator.training import RankingGroup, evaluate, load_events, ranking_groups  # noqa: E402

SPLIT = "|browse"


def is_browse(g: RankingGroup, names: tuple[str, ...]) -> bool:
    """A browse group: its ``rrf|browse`` copy equals ``rrf`` (lookups log the constant 0;
    every candidate has an RRF contribution > 0)."""
    i, j = names.index("rrf"), names.index(f"rrf{SPLIT}")
    return bool(np.all(g.X[:, j] == g.X[:, i]) and np.all(g.X[:, i] > 0))


def _fit(groups: list[RankingGroup], names: tuple[str, ...], cols: np.ndarray,
         examination: ExaminationModel, ips_cap: float, C: float) -> LinearRescorer:
    """The candidate as :func:`~orchestrator.training.retrain_ranker` fits it, on ``cols``."""
    X = np.vstack([g.X[:, cols] for g in groups])
    y = np.concatenate([g.y for g in groups])
    w = np.concatenate([ips_weights(g.y, g.display_positions, examination, cap=ips_cap)
                        for g in groups])
    return train_rescorer(X, y, feature_names=[names[c] for c in cols], C=C, sample_weight=w)


def _per_group(model: LinearRescorer, g: RankingGroup, names: tuple[str, ...],
               cols: np.ndarray, examination: ExaminationModel, ips_cap: float) -> float:
    """The held-out metric of one (informative) group: :func:`evaluate` of it alone."""
    return evaluate(model, [_cols(g, cols)], [names[c] for c in cols], k=10,
                    examination=examination, ips_cap=ips_cap)


def compare(groups: list[RankingGroup], names: tuple[str, ...], *, folds: int,
            examination: ExaminationModel, ips_cap: float = 10.0, C: float = 1.0
            ) -> dict[str, Any]:
    """Rolling-origin comparison of the plain and the split layout on ``groups`` (by time)."""
    if f"rrf{SPLIT}" not in names:
        raise SystemExit("the log has no |browse copies (was rescorer.intent_split off?)")
    n_plain = names.index(f"{names[0]}{SPLIT}")
    plain, split = np.arange(n_plain), np.arange(len(names))
    ordered = sorted(groups, key=lambda g: (g.ts, g.request_id))
    size = len(ordered) // (folds + 1)
    if size < 2:
        raise SystemExit(f"{len(ordered)} ranking groups are too few for {folds} folds")
    rows: list[dict[str, Any]] = []
    per: dict[str, list[tuple[float, ...]]] = {"browse": [], "lookup": []}
    for k in range(1, folds + 1):
        train, test = ordered[: k * size], ordered[k * size: (k + 1) * size]
        test = [g for g in test if g.informative]
        fold: dict[str, Any] = {"fold": k, "train_groups": len(train), "test_groups": len(test)}
        models = {"default": (LinearRescorer.default(), split)}
        try:
            models["plain"] = (_fit(train, names, plain, examination, ips_cap, C), plain)
            models["split"] = (_fit(train, names, split, examination, ips_cap, C), split)
            gate = _gate(train, names, plain, examination, ips_cap, C)
        except Exception as exc:  # noqa: BLE001 - a fold without both classes
            fold["error"] = str(exc)
            rows.append(fold)
            continue
        for name, (m, cols) in models.items():
            sub = [names[c] for c in cols]
            fold[name] = round(evaluate(m, [_cols(g, cols) for g in test], sub, k=10,
                                        examination=examination, ips_cap=ips_cap), 4)
        fold["gate"] = gate
        for g in test:
            kind = "browse" if is_browse(g, names) else "lookup"
            vals = tuple(_per_group(models[x][0], g, names, models[x][1], examination, ips_cap)
                         for x in ("default", "plain", "split"))
            per[kind].append((*vals, vals[1] if gate[kind] else vals[0]))
        rows.append(fold)
    out: dict[str, Any] = {"groups": len(ordered), "features_plain": int(n_plain),
                           "features_split": len(names), "folds": rows, "paired": {}}
    for kind in ("browse", "lookup", "all"):
        vals = np.array(per["browse"] + per["lookup"] if kind == "all" else per[kind]).reshape(-1, 4)
        if not len(vals):
            continue
        d = vals[:, 2] - vals[:, 1]
        out["paired"][kind] = {
            "n": int(len(vals)), "default": round(float(vals[:, 0].mean()), 4),
            "plain": round(float(vals[:, 1].mean()), 4), "split": round(float(vals[:, 2].mean()), 4),
            "split_minus_plain": round(float(d.mean()), 4), "p": paired_p_value(d),
            "gated": round(float(vals[:, 3].mean()), 4),
            "gated_minus_default": round(float((vals[:, 3] - vals[:, 0]).mean()), 4),
            "p_gated_vs_default": paired_p_value(vals[:, 3] - vals[:, 0]),
            "gated_minus_plain": round(float((vals[:, 3] - vals[:, 1]).mean()), 4),
            "p_gated_vs_plain": paired_p_value(vals[:, 3] - vals[:, 1])}
    return out


def _gate(train: list[RankingGroup], names: tuple[str, ...], cols: np.ndarray,
          examination: ExaminationModel, ips_cap: float, C: float) -> dict[str, bool]:
    """Per query kind, does a plain model beat the default? Decided as the promotion gate
    would, inside the training slice only: fit on its oldest 80%, compare on its newest 20%
    (the kinds' own groups). The gated ranker uses the trained model where it won."""
    h = max(1, math.ceil(0.2 * len(train)))
    fit, check = train[:-h], train[-h:]
    out = {"browse": False, "lookup": False}
    try:
        model = _fit(fit, names, cols, examination, ips_cap, C)
    except Exception:  # noqa: BLE001 - too little to fit: keep the default
        return out
    sub = [names[c] for c in cols]
    for kind in out:
        gs = [_cols(g, cols) for g in check if g.informative and (is_browse(g, names) == (kind == "browse"))]
        if gs:
            out[kind] = bool(evaluate(model, gs, sub, k=10, examination=examination, ips_cap=ips_cap)
                             > evaluate(LinearRescorer.default(), gs, sub, k=10,
                                        examination=examination, ips_cap=ips_cap))
    return out


def _cols(g: RankingGroup, cols: np.ndarray) -> RankingGroup:
    """``g`` seen through a subset of its columns (for :func:`evaluate`)."""
    return RankingGroup(g.request_id, g.ts, g.X[:, cols], g.y, g.positions)


def run_simulation(s: OrchestratorSettings, *, rounds: int, seed: int, alias: str | None,
                   genres: list[str] | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One ``ours`` run, retraining off, memory learning on; its events (index and stream)."""
    from orchestrator.es_client import build_client
    from orchestrator.redis_client import build_redis
    from orchestrator.simulation.runner import SimConfig, Simulation

    es, r = build_client(s.es), build_redis(s.redis)
    cfg = SimConfig(rounds=rounds, seed=seed, policies=["ours"], oracle=False,
                    retrain_every=rounds + 1, move_every=50, keep_state=True, genres=genres,
                    static_from_fraction=0.0, unseen_eval_max=0, new_items_fraction=0.0)
    sim = Simulation(cfg, s, es=es, redis=r, alias=alias)
    try:
        t = time.perf_counter()
        res = sim.run(progress=False)
        from orchestrator.tasks import run_move_events

        ps = sim.retrain_settings["ours"]
        run_move_events(ps, es, r)
        events = load_events(es, events_alias=ps.es.events_alias)
        info = {"rounds": rounds, "seed": seed, "catalog": sim.alias or s.es.catalog_alias, "events": len(events),
                "sim_seconds": round(time.perf_counter() - t, 1),
                "success_at_10": round(float(np.mean([x.success for x in res.records])), 4)}
    finally:
        sim.cleanup()
    return events, info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--alias", default=None, help="catalog alias (default: es.catalog_alias)")
    ap.add_argument("--out", default=None,
                    help="default benchmarks/results/ranker_features.json (--smoke: a temp dir)")
    ap.add_argument("--smoke", action="store_true",
                    help="test-ltrr-catalog (its genres), 60 rounds, 2 folds, JSON to a temp dir")
    args = ap.parse_args(argv)
    genres = None
    if args.smoke:
        from tests.conftest import SLICE_GENRES

        args.rounds, args.folds = 60, 2
        args.alias, genres = args.alias or "test-ltrr-catalog", sorted(SLICE_GENRES)
        args.out = args.out or str(Path(tempfile.mkdtemp(prefix="ltrr-bench-")) / "ranker_features.json")
    out_path = Path(args.out or ROOT / "benchmarks" / "results" / "ranker_features.json")
    s = OrchestratorSettings()
    s = s.model_copy(update={"rescorer": s.rescorer.model_copy(update={"intent_split": True})})
    events, info = run_simulation(s, rounds=args.rounds, seed=args.seed, alias=args.alias,
                                  genres=genres)
    groups, names, counts = ranking_groups(events)
    result = {"command": " ".join(["python", *sys.argv]), "smoke": args.smoke, "run": info,
              "counts": counts,
              **compare(groups, names, folds=args.folds, examination=ExaminationModel.default(),
                        ips_cap=s.rescorer.ips_cap)}
    print(f"\n{info['rounds']} rounds, {result['groups']} ranking groups, features "
          f"{result['features_plain']} plain / {result['features_split']} split")
    print(f"{'fold':>4} {'train':>6} {'test':>5} {'default':>8} {'plain':>7} {'split':>7}")
    for f in result["folds"]:
        print(f"{f['fold']:>4} {f['train_groups']:>6} {f['test_groups']:>5} "
              f"{f.get('default', float('nan')):>8.4f} {f.get('plain', float('nan')):>7.4f} "
              f"{f.get('split', float('nan')):>7.4f}")
    print(f"\n{'paired (IPS-nDCG@10)':<22} {'n':>5} {'default':>8} {'plain':>7} {'split':>7} "
          f"{'split-plain':>11} {'p':>6} {'gated':>7} {'gated-default':>13} {'p':>6}")
    for kind, v in result["paired"].items():
        print(f"{kind:<22} {v['n']:>5} {v['default']:>8.4f} {v['plain']:>7.4f} {v['split']:>7.4f} "
              f"{v['split_minus_plain']:>+11.4f} {v['p']:>6.3f} {v['gated']:>7.4f} "
              f"{v['gated_minus_default']:>+13.4f} {v['p_gated_vs_default']:>6.3f}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
