"""Summaries, the JSON report and the PNG plots of a simulation run.

Consumes :class:`~orchestrator.simulation.runner.SimResult` (or its saved round log);
produces the report dict (per policy, overall and per query type: success@10, MRR,
nDCG@10, candidate recall, cost, cumulative reward and regret vs the oracle; arm shares
over time; the honest comparison of ``ours`` with the best static policy per query type;
OPE estimates), ``report.json``, ``rounds.jsonl.gz`` (the log ``ltrr evaluate ope`` reads)
and four PNGs (matplotlib, Agg backend).
"""

from __future__ import annotations

import gzip
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .ope import LoggedRound, RewardModel, estimate, fixed_target, per_type_target
from .queries import QUERY_TYPES

logger = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("ndcg", "success", "mrr", "cand_recall", "cand_hit", "clicked")
#: Policies that learn or randomise (their arm shares over time are plotted).
ADAPTIVE = ("ours", "ours_no_retrain", "epsilon_greedy", "random")
#: Measured outside the project (bm25s over tracks' title + artists + album + own genres, on
#: the dev playlist titles): the reference for the unseen-playlist pass.
REFERENCE_BM25_SUCCESS_AT_10 = 0.159
BANDS: tuple[str, ...] = ("head", "torso", "tail")
#: Reward per round (regret is computed on it).
REWARD = "ndcg"


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def _r(x: float, n: int = 4) -> float | None:
    return None if x != x else round(float(x), n)


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Metric means and costs of one policy's rows."""
    if not rows:
        return {"n": 0}
    lat = np.asarray([r["latency_ms"] for r in rows])
    out: dict[str, Any] = {"n": len(rows)}
    for m in METRICS:
        out[m] = _r(_mean([r[m] for r in rows]))
    out["arms_per_request"] = _r(_mean([len(r["arms"]) for r in rows]), 3)
    out["candidates_fetched"] = _r(_mean([r["fetched"] for r in rows]), 1)
    out["candidates_unique"] = _r(_mean([r["n_candidates"] for r in rows]), 1)
    out["latency_ms_p50"] = _r(float(np.percentile(lat, 50)), 1)
    out["latency_ms_p95"] = _r(float(np.percentile(lat, 95)), 1)
    out["es_ms_mean"] = _r(_mean([r["es_ms"] for r in rows]), 1)
    out["failed_searches"] = int(sum(1 for r in rows if r.get("error")))
    return out


def by_policy(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        out[r["policy"]].append(r)
    for v in out.values():
        v.sort(key=lambda r: r["t"])
    return dict(out)


def static_policies(names: Iterable[str]) -> list[str]:
    """Equal-budget static policies (single arms and the hybrid; not ``all_arms``)."""
    return [n for n in names if n.startswith("arm:") or n == "hybrid_rrf"]


def ope_section(per: Mapping[str, Sequence[Mapping[str, Any]]], plans: Mapping[str, Mapping[str, int]],
                *, metrics: Sequence[str] = ("clicked", "ndcg")) -> dict[str, Any]:
    """Estimate every deterministic equal-budget policy (single arms, hybrid, oracle) from
    the logs of ``random`` and ``epsilon_greedy`` (exact subset propensities) and ``ours``
    (the logged joint subset propensity of Thompson sampling; ``ours (indep.)`` the same
    logs under the independence approximation, for comparison), from the logged rounds the
    targets also ran, and compare with the target's actual mean over those rounds."""
    from .policies import HYBRID_ARMS

    targets: dict[str, Any] = {}
    for name in per:
        if name.startswith("arm:"):
            targets[name] = fixed_target([name[4:]])
    if "hybrid_rrf" in per:
        targets["hybrid_rrf"] = fixed_target(HYBRID_ARMS)
    if "oracle" in per and plans:
        targets["oracle"] = per_type_target({k: list(v) for k, v in plans.items()})
    out: dict[str, Any] = {}
    # The logs of the rounds the targets ran (static policies may run only the last third):
    # estimate and actual then average over the same queries.
    t_from = max((min(r["t"] for r in per[t]) for t in targets if per.get(t)), default=0)
    loggers = [("random", "random", "subset_propensity"), ("ours", "ours", "subset_propensity")]
    if any("subset_propensity_indep" in r for r in per.get("ours", [])):
        loggers.append(("ours (indep.)", "ours", "subset_propensity_indep"))
    loggers.append(("epsilon_greedy", "epsilon_greedy", "subset_propensity"))
    for label, logger_name, pcol in loggers:
        logs = per.get(logger_name)
        if not logs:
            continue
        out[label] = {}
        for metric in metrics:
            rounds = [LoggedRound(r["qtype"], tuple(r["eligible"]), frozenset(r["arms"]),
                                  float(r[pcol]), float(r[metric])) for r in logs
                      if not r.get("error") and r["t"] >= t_from]
            if not rounds:
                continue
            model = RewardModel().fit(rounds)
            res: dict[str, Any] = {}
            for tname, target in targets.items():
                est = estimate(rounds, target, model=model)
                actual = _mean([r[metric] for r in per[tname]])
                d = est.as_dict()
                d["actual"] = _r(actual, 5)
                for k in ("ips", "snips", "dr"):
                    v = getattr(est, k)
                    d[f"{k}_error"] = _r(v - actual, 5) if v == v else None
                res[tname] = d
            errs = {k: _r(_mean([abs(v[f"{k}_error"]) for v in res.values() if v[f"{k}_error"] is not None]), 5)
                    for k in ("ips", "snips", "dr")}
            out[label][metric] = {"targets": res, "mean_abs_error": errs}
    return out


def is_stream(r: Mapping[str, Any]) -> bool:
    """A scored stream round (not the final unseen-playlist pass, not a follow-up lookup)."""
    return r.get("phase", "stream") == "stream"


def followups_section(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per policy: the follow-up lookups its users made after a playlist or tag search that
    showed them nothing they wanted (``phase="followup"``, not scored), and how often the
    lookup found the track."""
    out: dict[str, Any] = {}
    for name, rs in sorted(by_policy(rows).items()):
        out[name] = {"rounds": len(rs), "success": _r(float(np.mean([r["success"] for r in rs]))),
                     "played": _r(float(np.mean([r["played"] for r in rs])))}
    return out


def row_key(r: Mapping[str, Any]) -> str:
    """The query's normalised key (the stream's ``key``; else the lower-cased text)."""
    return r.get("key") or " ".join(str(r.get("query", "")).lower().split())


def last_third_start(n_rounds: int) -> int:
    return int(np.ceil(2 * n_rounds / 3))


def reference_rows(per: Mapping[str, Sequence[Mapping[str, Any]]]) -> Sequence[Mapping[str, Any]]:
    """One policy's stream rows covering the whole stream (``ours`` if present, else the
    policy with the most rows): the key frequencies are computed on it."""
    if not per:
        return []
    if "ours" in per:
        return per["ours"]
    return max(per.values(), key=len)


def key_bands(rows: Sequence[Mapping[str, Any]], *, head_fraction: float = 0.01) -> dict[str, str]:
    """``{key: band}``: head = the top ``head_fraction`` of distinct keys by count (at least
    one, only keys seen more than once), tail = keys seen once, torso = the rest."""
    counts: dict[str, int] = defaultdict(int)
    for r in rows:
        counts[row_key(r)] += 1
    order = sorted(counts, key=lambda k: (-counts[k], k))
    n_head = max(int(np.ceil(head_fraction * len(order))), 1) if order else 0
    head = {k for k in order[:n_head] if counts[k] > 1}
    return {k: "head" if k in head else "tail" if c == 1 else "torso" for k, c in counts.items()}


def repeated_share(rows: Sequence[Mapping[str, Any]]) -> float | None:
    """Share of rounds whose key appeared in an earlier round."""
    seen: set[str] = set()
    rep = 0
    for r in sorted(rows, key=lambda r: r["t"]):
        k = row_key(r)
        rep += k in seen
        seen.add(k)
    return _r(rep / len(rows)) if rows else None


def new_items_section(per: Mapping[str, Sequence[Mapping[str, Any]]], *, release_at: int,
                      t_from: int | None = None) -> dict[str, Any]:
    """Per policy: distinct new (held-out) items shown / clicked, the rounds from their
    release to the first show and the first click (median, p90; only comparable between
    policies that ran from the release on), and on the rounds ``t >= t_from`` (the last
    third, which every policy ran) the success@10 of the queries whose relevant set holds new
    items (``last_third``)."""
    out: dict[str, Any] = {}
    for name, rows in per.items():
        first_show: dict[str, int] = {}
        first_click: dict[str, int] = {}
        for r in rows:
            for i in r.get("new_shown") or ():
                first_show.setdefault(i, r["t"])
            for i in r.get("new_clicked") or ():
                first_click.setdefault(i, r["t"])

        def delays(first: Mapping[str, int]) -> dict[str, Any]:
            d = [max(t - release_at, 0) for t in first.values()]
            return {"median": _r(float(np.median(d)), 1) if d else None,
                    "p90": _r(float(np.percentile(d, 90)), 1) if d else None}

        out[name] = {"n_shown": len(first_show), "n_clicked": len(first_click),
                     "rounds_to_first_show": delays(first_show),
                     "rounds_to_first_click": delays(first_click),
                     "rounds_with_new_relevant": sum(1 for r in rows if r.get("n_new_relevant")),
                     "ran_from": min((r["t"] for r in rows), default=None)}
        if t_from is not None:
            late = [r for r in rows if r["t"] >= t_from and r.get("n_new_relevant")]
            out[name]["last_third"] = {
                "n": len(late), "success": _r(_mean([r["success"] for r in late])),
                "new_shown": _r(_mean([float(bool(r.get("new_shown"))) for r in late])),
                "new_clicked": _r(_mean([float(bool(r.get("new_clicked"))) for r in late]))}
    return out


def paired_tests(per: Mapping[str, Sequence[Mapping[str, Any]]], pairs: Sequence[tuple[str, str]], *,
                 t_from: int, metrics: Sequence[str] = ("success", "ndcg")) -> list[dict[str, Any]]:
    """``a`` minus ``b`` on their common rounds ``t >= t_from`` with the paired sign-flip test."""
    out = []
    for a, b in pairs:
        if a not in per or b not in per:
            continue
        other = {r["t"]: r for r in per[b] if r["t"] >= t_from}
        common = [(r, other[r["t"]]) for r in per[a] if r["t"] in other]
        entry: dict[str, Any] = {"a": a, "b": b, "n": len(common), "from_round": t_from}
        for m in metrics:
            d = [x[m] - y[m] for x, y in common]
            entry[m] = {"a": _r(_mean([x[m] for x, _ in common])),
                        "b": _r(_mean([y[m] for _, y in common])),
                        "difference": _r(_mean(d)), "p_value": paired_p_value(d)}
        out.append(entry)
    return out


def best_static(policies: Mapping[str, Any], *, part: str = "last_third",
                metric: str = REWARD) -> str | None:
    """The static policy (single arm or hybrid) with the best ``metric`` on ``part``."""
    cand = [((policies[n][part]["overall"] if part == "last_third" else policies[n]["overall"]
              ).get(metric), n) for n in static_policies(policies)]
    cand = [(v, n) for v, n in cand if v is not None]
    return max(cand)[1] if cand else None


def build_report(result: Any) -> dict[str, Any]:
    """The whole report of a :class:`SimResult` (JSON-able)."""
    rows = [asdict(r) for r in result.records]
    return report_from_rows(rows, config=result.config.as_dict(), oracle_plans=result.oracle_plans,
                            calibration=result.calibration, arms=result.arms,
                            query_counts=result.query_counts, source_sizes=result.source_sizes,
                            seconds=result.seconds, retrains=result.retrains,
                            learning=getattr(result, "learning", None),
                            notes=getattr(result, "notes", None),
                            release=getattr(result, "new_items", None),
                            bounds=getattr(result, "bounds", None))


def report_from_rows(rows: Sequence[Mapping[str, Any]], *, config: Mapping[str, Any],
                     oracle_plans: Mapping[str, Mapping[str, int]], calibration: Mapping[str, Any],
                     arms: Sequence[str], query_counts: Mapping[str, int],
                     source_sizes: Mapping[str, int], seconds: Mapping[str, float],
                     n_windows: int = 10,
                     retrains: Sequence[Mapping[str, Any]] = (),
                     learning: Mapping[str, Any] | None = None,
                     notes: Sequence[str] | None = None,
                     release: Mapping[str, Any] | None = None,
                     bounds: Mapping[str, Any] | None = None) -> dict[str, Any]:
    unseen_rows = [r for r in rows if r.get("phase") == "unseen"]
    followups = followups_section([r for r in rows if r.get("phase") == "followup"])
    rows = [r for r in rows if is_stream(r)]  # every stream metric below: phase "stream" only
    per = by_policy(rows)
    n_rounds = int(config.get("rounds") or (max(r["t"] for r in rows) + 1 if rows else 0))
    t3 = last_third_start(n_rounds)
    bands = key_bands(reference_rows(per))
    oracle = {r["t"]: r[REWARD] for r in per.get("oracle", [])}
    policies: dict[str, Any] = {}
    edges = np.linspace(0, n_rounds, n_windows + 1).astype(int)
    for name, prow in per.items():
        overall = summarize(prow)
        types = {t: summarize([r for r in prow if r["qtype"] == t]) for t in QUERY_TYPES}
        cum = float(sum(r[REWARD] for r in prow))
        entry: dict[str, Any] = {"overall": overall, "by_type": types,
                                 "cumulative_reward": _r(cum, 3)}
        if oracle:
            # only the rounds the oracle ran (it may start late, with the static policies)
            entry["cumulative_regret"] = _r(sum(oracle[r["t"]] - r[REWARD] for r in prow
                                                if r["t"] in oracle), 3)
        windows = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            w = [r for r in prow if lo <= r["t"] < hi]
            share = {a: _r(_mean([float(a in r["arms"]) for r in w]), 3) for a in arms}
            windows.append({"rounds": [int(lo), int(hi)], REWARD: _r(_mean([r[REWARD] for r in w])),
                            "success": _r(_mean([r["success"] for r in w])),
                            "mix": {t: _r(_mean([float(r["qtype"] == t) for r in w]), 3) for t in QUERY_TYPES},
                            "arm_share": share})
        entry["over_time"] = windows
        late = [r for r in prow if r["t"] >= t3]
        entry["last_third"] = {"overall": summarize(late),
                               "by_type": {t: summarize([r for r in late if r["qtype"] == t])
                                           for t in QUERY_TYPES}}
        entry["bands"] = {b: {"all": summarize([r for r in prow if bands.get(row_key(r)) == b]),
                              "last_third": summarize([r for r in late if bands.get(row_key(r)) == b])}
                          for b in BANDS}
        policies[name] = entry
    verdicts = []
    statics = static_policies(per)
    if "ours" in per and statics:
        def part(name: str, t: str) -> Mapping[str, Any]:
            # the last third: the rounds the static policies ran (same rounds for every one)
            lt = policies[name]["last_third"]
            return lt["overall"] if t == "all" else lt["by_type"][t]

        for t in (*QUERY_TYPES, "all"):
            cand = [(part(s, t).get(REWARD), s) for s in statics if part(s, t).get("n")]
            if not cand or not part("ours", t).get("n"):
                continue
            best_v, best = max(cand)
            ours_v = part("ours", t)[REWARD]
            verdicts.append({"qtype": t, "metric": REWARD, "ours": ours_v, "best_static": best,
                             "best_static_value": best_v, "difference": _r(ours_v - best_v),
                             "ours_wins": bool(ours_v > best_v)})
    best = best_static(policies)
    ablations = sorted(n for n in per if n.startswith("ours_"))
    pairs = [("ours", a) for a in ablations] + ([("ours", best)] if best else [])
    unseen_per = by_policy(unseen_rows)
    release_at = int(float(config.get("release_at_fraction") or 0.0) * n_rounds)
    ref = reference_rows(per)
    band_counts = defaultdict(int)
    for r in ref:
        band_counts[bands.get(row_key(r), "tail")] += 1
    report: dict[str, Any] = {
        "config": dict(config), "arms": list(arms), "source_sizes": dict(source_sizes),
        "last_third_from_round": t3,
        "best_static_last_third": best,
        "repeated_share": repeated_share(ref),
        "band_rounds": {b: band_counts.get(b, 0) for b in BANDS},
        "band_keys": {b: sum(1 for v in bands.values() if v == b) for b in BANDS},
        "paired_last_third": paired_tests(per, pairs, t_from=t3),
        "unseen_playlists": {
            "reference_bm25_success_at_10": REFERENCE_BM25_SUCCESS_AT_10,
            "policies": {n: {"n": len(v), "success_at_10": _r(_mean([r["success"] for r in v])),
                             "ndcg_at_10": _r(_mean([r["ndcg"] for r in v]))}
                         for n, v in unseen_per.items()}},
        "new_items": new_items_section(per, release_at=release_at, t_from=t3),
        "new_items_release": dict(release) if release else None,
        "learning": dict(learning or {}),
        "notes": list(notes or []),
        "query_counts": dict(query_counts), "seconds": dict(seconds),
        "reward": f"{REWARD}@{config.get('display', 10)} (regret = oracle reward - policy reward, per round)",
        "oracle_plans": {k: dict(v) for k, v in oracle_plans.items()},
        "oracle_calibration_top10": dict(calibration),
        "policies": policies,
        "ours_vs_best_static": verdicts,
        "retraining": retraining_section(policies, retrains, per),
        "ope": ope_section(per, oracle_plans),
        "bounds": dict(bounds) if bounds else None,
        "followups": followups,
    }
    report["targets"] = targets_section(report)
    return report


def paired_p_value(diffs: Sequence[float], *, n_perm: int = 20000, seed: int = 0) -> float | None:
    """Two-sided paired sign-flip randomization test of mean(diffs) == 0 (seeded)."""
    d = np.asarray(diffs, dtype=float)
    if not len(d) or not np.any(d):
        return None if not len(d) else 1.0
    flips = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_perm, len(d)))
    return _r(float((np.abs((flips * d).mean(axis=1)) >= abs(d.mean()) - 1e-12).mean()), 4)


#: Targets of the issue ("Prove it on a realistic stream"), on the last third of the run.
HEAD_SUCCESS_TARGET = 0.9
ABLATION_P_TARGET = 0.05
OPE_RELATIVE_ERROR_TARGET = 0.10
#: The ablations whose contribution must show (each one learning part switched off).
TARGET_ABLATIONS: tuple[str, ...] = ("ours_no_memory", "ours_equal_budgets", "ours_no_rescorer")


def _target(text: str, value: float | None, reference: float | None, *, higher: bool = True,
            strict: bool = False, note: str | None = None, **extra: Any) -> dict[str, Any]:
    """One target entry: ``met`` is None (with a ``note``) when either side is missing;
    ``shortfall`` is how far ``value`` is from meeting ``reference`` (positive), None when met."""
    e: dict[str, Any] = {"target": text, "value": value, "reference": reference, "met": None,
                         "shortfall": None}
    if value is None or reference is None or value != value or reference != reference:
        e["note"] = note or "no data"
    else:
        if higher:
            e["met"] = bool(value > reference if strict else value >= reference)
        else:
            e["met"] = bool(value < reference if strict else value <= reference)
        if not e["met"]:
            e["shortfall"] = _r(reference - value if higher else value - reference)
        if note:
            e["note"] = note
    e.update(extra)
    return e


def best_arm(policies: Mapping[str, Any], *, metric: str = REWARD, qtype: str | None = None) -> str | None:
    """The single static arm (``arm:<id>``) with the best last-third ``metric`` (overall, or
    on query type ``qtype``); arms with no rows there are skipped."""
    cand = []
    for n, p in policies.items():
        if not n.startswith("arm:"):
            continue
        lt = p.get("last_third") or {}
        d = lt.get("overall", {}) if qtype is None else (lt.get("by_type") or {}).get(qtype, {})
        if d.get("n") and d.get(metric) is not None:
            cand.append((d[metric], n))
    return max(cand)[1] if cand else None


def targets_section(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets on the last third of the stream, each with its value, reference,
    whether it is met and by how much it is missed (see :func:`_target`)."""
    pol = report.get("policies") or {}
    out: list[dict[str, Any]] = []

    def lt(name: str, qtype: str | None = None) -> Mapping[str, Any]:
        d = (pol.get(name) or {}).get("last_third") or {}
        return d.get("overall", {}) if qtype is None else (d.get("by_type") or {}).get(qtype, {})

    def val(d: Mapping[str, Any], metric: str) -> float | None:
        return d.get(metric) if d.get("n") else None

    ours = lt("ours")
    # (1) ours above the static-plan oracle
    for m in ("ndcg", "success"):
        note = None if "oracle" in pol else "no oracle in this run"
        note = note if "ours" in pol else "no ours in this run"
        out.append(_target(f"ours > oracle, {m}@10", val(ours, m), val(lt("oracle"), m), strict=True,
                           note=note, kind="oracle", metric=m, reference_policy="oracle"))
    # (2) ours at or above the best single static arm, per query type
    for t in QUERY_TYPES:
        for m in ("success", "ndcg"):
            arm = best_arm(pol, metric=m, qtype=t)
            ref = val(lt(arm, t), m) if arm else None
            note = None
            if arm is None:
                note = "no single-arm policy with rows of this type"
            elif val(lt("ours", t), m) is None:
                note = "ours has no rows of this type"
            out.append(_target(f"ours >= best arm on {t}, {m}@10", val(lt("ours", t), m), ref, note=note,
                               kind="best_arm", metric=m, qtype=t, reference_policy=arm))
    # (3) the head band
    head = (((pol.get("ours") or {}).get("bands") or {}).get("head") or {}).get("last_third") or {}
    hb = ((report.get("bounds") or {}).get("bands") or {}).get("head") or {}
    note = None if head.get("n") else "no head-band rows in the last third"
    if note is None and hb.get("n"):
        chained = "".join(
            f", from query chains at a {float(c.split('_', 1)[1]):.0%} reformulation rate "
            f"{hb[c]['success']:.3f}" for c in hb if c.startswith("chained_") and hb[c]["success"] is not None)
        note = (f"one list per key of all earlier users' wants reaches "
                f"{hb['learned']['success']:.3f} here, chosen in hindsight "
                f"{hb['hindsight']['success']:.3f}{chained} (see bounds)")
    out.append(_target("ours head-band success@10 >= 0.9", val(head, "success"), HEAD_SUCCESS_TARGET,
                       note=note, kind="head_band", metric="success", n=head.get("n", 0),
                       bound=(hb.get("learned") or {}).get("success")))
    # (4) each learning part's contribution: ours better than the ablation, paired p < 0.05
    tests = {e["b"]: e for e in report.get("paired_last_third") or [] if e.get("a") == "ours"}
    abls = list(TARGET_ABLATIONS) + sorted(b for b in tests if b.startswith("ours_") and b not in TARGET_ABLATIONS)
    for b in abls:
        e = tests.get(b)
        text = f"ours better than {b} ({REWARD}@10), p < {ABLATION_P_TARGET}"
        if not e or not e.get("n"):
            out.append(_target(text, None, ABLATION_P_TARGET, higher=False,
                               note=f"{b} not run" if not e else "no common rounds",
                               kind="ablation", metric=REWARD, ablation=b))
            continue
        d, p = e[REWARD]["difference"], e[REWARD]["p_value"]
        entry = _target(text, p, ABLATION_P_TARGET, higher=False, strict=True,
                        note=None if p is not None else "no p-value", kind="ablation", metric=REWARD,
                        ablation=b, difference=d, n=e["n"],
                        success_difference=e["success"]["difference"], success_p_value=e["success"]["p_value"])
        if entry["met"] is not None and (d is None or d <= 0):
            entry["met"] = False
            entry["shortfall"] = _r(max(p - ABLATION_P_TARGET, 0.0))
            entry["note"] = f"ours not better: difference {d if d is not None else float('nan'):+.4f}"
        out.append(entry)
    # (5) OPE: the DR estimate of each evaluated policy within 10% (relative) of its realized mean
    ope = report.get("ope") or {}
    lg = "ours" if "ours" in ope else next(iter(ope), None)
    sec = ((ope.get(lg) or {}).get(REWARD) or {}) if lg else {}
    if not sec.get("targets"):
        out.append(_target(f"DR within {OPE_RELATIVE_ERROR_TARGET:.0%} of realized {REWARD}", None,
                           OPE_RELATIVE_ERROR_TARGET, higher=False, note="no OPE estimates", kind="ope"))
    for tname, d in sorted((sec.get("targets") or {}).items()):
        dr, actual = d.get("dr"), d.get("actual")
        rel, note = None, None
        if dr is None or dr != dr or actual is None:
            note = "no DR estimate"
        elif actual == 0:
            note = f"realized mean is 0 (DR {dr:.4f}): relative error undefined"
        else:
            rel = _r(abs(dr - actual) / abs(actual))
        out.append(_target(f"DR({tname}) within {OPE_RELATIVE_ERROR_TARGET:.0%} of realized {REWARD}",
                           rel, OPE_RELATIVE_ERROR_TARGET, higher=False, note=note, kind="ope",
                           logger=lg, metric=REWARD, policy=tname, dr=dr, actual=actual))
    return out


def targets_table(report: Mapping[str, Any]) -> str:
    """Markdown: the ``targets`` section (see :func:`targets_section`)."""
    targets = report.get("targets")
    if targets is None:
        targets = targets_section(report)
    if not targets:
        return ""

    def f(x: Any) -> str:
        if x is None:
            return "–"
        if isinstance(x, float) and 0 < abs(x) < 0.001:
            return f"{x:.1e}"
        return f"{x:.3f}" if isinstance(x, (int, float)) else str(x)

    n_met = sum(1 for e in targets if e["met"])
    n_known = sum(1 for e in targets if e["met"] is not None)
    lines = [f"Targets (last third, rounds >= {report.get('last_third_from_round', '?')}): "
             f"{n_met}/{n_known} met ({len(targets) - n_known} without data)", "",
             "| target | value | reference | met | shortfall | note |", "|---|---|---|---|---|---|"]
    for e in targets:
        met = "n/a" if e["met"] is None else "yes" if e["met"] else "**no**"
        ref = f(e["reference"])
        if e.get("reference_policy") and e["reference"] is not None:
            ref += f" ({e['reference_policy']})"
        lines.append(f"| {e['target']} | {f(e['value'])} | {ref} | {met} | {f(e['shortfall'])} | "
                     f"{e.get('note', '')} |")
    return "\n".join(lines)


def retraining_section(policies: Mapping[str, Any], retrains: Sequence[Mapping[str, Any]],
                       per: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> dict[str, Any]:
    """The retraining runs of ``ours`` and its difference to ``ours_no_retrain`` (same
    seeds, no retraining) overall and per query type, with the paired (same rounds)
    randomization test's p-value."""
    out: dict[str, Any] = {"runs": [dict(r) for r in retrains]}
    paired = {}
    if per and "ours" in per and "ours_no_retrain" in per:
        other = {r["t"]: r for r in per["ours_no_retrain"]}
        paired = {r["t"]: (r, other[r["t"]]) for r in per["ours"] if r["t"] in other}
    if retrains:
        out["promotions"] = sum(1 for r in retrains if r.get("train_ranker", {}).get("promoted"))
        out["final_rescorer_version"] = retrains[-1].get("rescorer_version", 0)
    if "ours" in policies and "ours_no_retrain" in policies:
        diff: dict[str, Any] = {}
        for t in (*QUERY_TYPES, "all"):
            a = policies["ours"]["overall" if t == "all" else "by_type"]
            b = policies["ours_no_retrain"]["overall" if t == "all" else "by_type"]
            a, b = (a, b) if t == "all" else (a[t], b[t])
            if not a.get("n"):
                continue
            pairs = [v for v in paired.values() if t == "all" or v[0]["qtype"] == t]
            diff[t] = {m: {"ours": a.get(m), "ours_no_retrain": b.get(m),
                           "difference": _r((a.get(m) or 0) - (b.get(m) or 0)),
                           "rounds_differing": sum(1 for x, y in pairs if x[m] != y[m]),
                           "p_value": paired_p_value([x[m] - y[m] for x, y in pairs])}
                       for m in ("ndcg", "success", "mrr")}
        out["ours_minus_no_retrain"] = diff
    return out


def table(report: Mapping[str, Any], *, metric_cols: Sequence[str] = ("success", "mrr", "ndcg",
                                                                        "cand_recall")) -> str:
    """Markdown tables: overall by policy (with cost and regret), then nDCG@10 and
    success@10 per query type."""
    pol = report["policies"]
    names = sorted(pol, key=lambda n: (n == "oracle", -(pol[n]["overall"].get("ndcg") or 0)))
    head = ["policy", "success@10", "MRR", "nDCG@10", "cand. recall", "cand. hit", "arms/req",
            "cands fetched/req", "p50 ms", "cum. regret"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        o = pol[n]["overall"]
        lines.append("| " + " | ".join([
            n, *(f"{o.get(m, 0):.3f}" for m in metric_cols), f"{o.get('cand_hit', 0):.3f}",
            f"{o['arms_per_request']:.2f}", f"{o['candidates_fetched']:.0f}", f"{o['latency_ms_p50']:.0f}",
            f"{pol[n].get('cumulative_regret', float('nan')):.1f}"]) + " |")
    lines.append("")
    head2 = ["policy"] + [f"{t} nDCG@10" for t in QUERY_TYPES] + [f"{t} success@10" for t in QUERY_TYPES]
    lines += ["| " + " | ".join(head2) + " |", "|" + "---|" * len(head2)]
    for n in names:
        bt = pol[n]["by_type"]
        cells = [f"{bt[t].get('ndcg', float('nan')) or 0:.3f}" if bt[t].get("n") else "-" for t in QUERY_TYPES]
        cells += [f"{bt[t].get('success', float('nan')) or 0:.3f}" if bt[t].get("n") else "-" for t in QUERY_TYPES]
        lines.append("| " + " | ".join([n, *cells]) + " |")
    return "\n".join(lines)


def last_third_table(report: Mapping[str, Any], *, metric: str = "success") -> str:
    """Markdown: ``metric``@10 on the last third of the stream, by query type and band."""
    pol = report["policies"]
    if not any("last_third" in v for v in pol.values()):
        return ""
    names = sorted(pol, key=lambda n: (n == "oracle",
                                       -((pol[n].get("last_third") or {}).get("overall", {}).get(metric) or 0)))
    # n per type / band in the header (of ``ours``, else the policy with the most last-third
    # rows); a policy whose n differs shows its own n in the cell; no rows: "–"
    ref_name = "ours" if "ours" in pol else max(
        pol, key=lambda n: ((pol[n].get("last_third") or {}).get("overall") or {}).get("n") or 0)
    ref_lt = pol[ref_name].get("last_third") or {}
    ref_bands = pol[ref_name].get("bands") or {}

    def n_of(d: Mapping[str, Any] | None) -> int:
        return int((d or {}).get("n") or 0)

    ref_n = {**{t: n_of((ref_lt.get("by_type") or {}).get(t)) for t in QUERY_TYPES},
             **{b: n_of((ref_bands.get(b) or {}).get("last_third")) for b in BANDS}}
    head = ["policy (last third)", "n", "all", *(f"{c} (n={ref_n[c]})" for c in (*QUERY_TYPES, *BANDS))]
    lines = [f"{metric}@10 on rounds >= {report.get('last_third_from_round', '?')} "
             f"(bands: key frequency over the stream; n of {ref_name} in the header, "
             "a different n in the cell; – = no rows)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(d: Mapping[str, Any], col: str | None = None) -> str:
        if not d.get("n") or d.get(metric) is None:
            return "–"
        v = f"{d[metric]:.3f}"
        return v if col is None or d["n"] == ref_n[col] else f"{v} (n={d['n']})"

    for n in names:
        lt = pol[n].get("last_third") or {"overall": {}, "by_type": {}}
        bands = pol[n].get("bands") or {}
        lines.append("| " + " | ".join([
            n, str(lt["overall"].get("n", 0)), cell(lt["overall"]),
            *(cell(lt["by_type"].get(t, {}), t) for t in QUERY_TYPES),
            *(cell((bands.get(b) or {}).get("last_third", {}), b) for b in BANDS)]) + " |")
    tests = report.get("paired_last_third") or []
    if tests:
        lines += ["", "| a - b (last third) | n | success diff (p) | nDCG diff (p) |", "|---|---|---|---|"]
        for e in tests:
            def pv(x: Any) -> str:
                return "-" if x is None else f"{x:.3f}"
            lines.append(f"| {e['a']} - {e['b']} | {e['n']} | "
                         f"{(e['success']['difference'] or 0):+.3f} ({pv(e['success']['p_value'])}) | "
                         f"{(e['ndcg']['difference'] or 0):+.3f} ({pv(e['ndcg']['p_value'])}) |")
    un = (report.get("unseen_playlists") or {}).get("policies") or {}
    if un:
        lines += ["", f"Unseen playlist titles (no feedback; reference BM25 success@10 = "
                      f"{REFERENCE_BM25_SUCCESS_AT_10}):", "",
                  "| policy | n | success@10 | nDCG@10 |", "|---|---|---|---|"]
        for n, d in sorted(un.items(), key=lambda kv: -(kv[1]["success_at_10"] or 0)):
            lines.append(f"| {n} | {d['n']} | {d['success_at_10']} | {d['ndcg_at_10']} |")
    return "\n".join(lines)


def retrain_table(report: Mapping[str, Any]) -> str:
    """Markdown: one row per retraining of ``ours``, then ours minus ``ours_no_retrain``."""
    sec = report.get("retraining") or {}
    runs = sec.get("runs") or []
    if not runs:
        return ""
    lines = ["| after round | events moved | feedback in posteriors | ranker groups (train/holdout) "
             "| holdout nDCG current -> candidate | promoted | rescorer in use | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        tr = r.get("train_ranker", {})
        m = tr.get("metrics") or {}

        def f(x: Any) -> str:
            return "-" if x is None else f"{x:.3f}"

        lines.append(f"| {r['after_round']} | {r.get('move_events', {}).get('moved', '-')} | "
                     f"{r.get('rebuild_posteriors', {}).get('applied', '-')} | "
                     f"{tr.get('train_groups', '-')}/{tr.get('holdout_groups', '-')} | "
                     f"{f(m.get('current'))} -> {f(m.get('candidate'))} | "
                     f"{'yes' if tr.get('promoted') else 'no'} | v{r.get('rescorer_version', 0)} | "
                     f"{r.get('seconds', 0):.1f} |")
    diff = sec.get("ours_minus_no_retrain") or {}
    if diff:
        lines += ["", "| query type | ours nDCG@10 | ours_no_retrain nDCG@10 | diff (p) | ours success@10 "
                      "| ours_no_retrain success@10 | diff (p) |", "|---|---|---|---|---|---|---|"]

        def pv(x: Any) -> str:
            return "-" if x is None else f"{x:.3f}"

        for t, d in diff.items():
            n, sc = d["ndcg"], d["success"]
            lines.append(f"| {t} | {n['ours']:.3f} | {n['ours_no_retrain']:.3f} | "
                         f"{n['difference']:+.3f} ({pv(n.get('p_value'))}) | {sc['ours']:.3f} | "
                         f"{sc['ours_no_retrain']:.3f} | {sc['difference']:+.3f} ({pv(sc.get('p_value'))}) |")
        lines.append("")
        lines.append("p: paired sign-flip randomization test over the same rounds (same queries, "
                     "same click randomness; identical until the first promoted ranker).")
    return "\n".join(lines)


def ope_table(report: Mapping[str, Any]) -> str:
    lines = ["| logging policy | reward | target | actual | IPS | SNIPS | DR | matched | ESS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for lg, by_metric in report.get("ope", {}).items():
        for metric, sec in by_metric.items():
            for tname, d in sec["targets"].items():
                lines.append(f"| {lg} | {metric} | {tname} | {d['actual']:.3f} | {d['ips']:.3f} | "
                             f"{d['snips']:.3f} | {d['dr']:.3f} | {d['n_matched']} | {d['ess']:.0f} |")
            e = sec["mean_abs_error"]
            lines.append(f"| {lg} | {metric} | *mean abs. error* | | {e['ips']} | {e['snips']} | {e['dr']} | | |")
    return "\n".join(lines)


# -- files -------------------------------------------------------------------------------------

def write_rounds(rows: Iterable[Mapping[str, Any]], path: Path) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_rounds(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        return [json.loads(line) for line in fh if line.strip()]


def write_all(result: Any, out_dir: Path, *, plots: bool = True) -> dict[str, Any]:
    """``report.json``, ``rounds.jsonl.gz``, ``table.md`` and the PNGs into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in result.records]
    write_rounds(rows, out_dir / "rounds.jsonl.gz")
    return _write(build_report(result), rows, out_dir, plots=plots)


def rebuild(out_dir: Path, *, plots: bool = True,
            bounds_from: Callable[[Mapping[str, Any], Sequence[Mapping[str, Any]]], Mapping[str, Any]]
            | None = None) -> dict[str, Any]:
    """Recompute ``report.json``, ``table.md`` and the PNGs of ``out_dir`` from its round log
    (``rounds.jsonl.gz``) and the run facts of its ``report.json`` (no searches);
    ``bounds_from(config, rows)`` recomputes the bounds (from the regenerated stream, see
    ``runner.regenerate_bounds``), else the report's are kept."""
    out_dir = Path(out_dir)
    rows = read_rounds(out_dir / "rounds.jsonl.gz")
    old = json.loads((out_dir / "report.json").read_text(encoding="utf-8"))
    report = report_from_rows(
        rows, config=old["config"], oracle_plans=old["oracle_plans"],
        calibration=old.get("oracle_calibration_top10", {}), arms=old["arms"],
        query_counts=old["query_counts"], source_sizes=old["source_sizes"], seconds=old["seconds"],
        retrains=old.get("retraining", {}).get("runs", []), learning=old.get("learning"),
        notes=old.get("notes"), release=old.get("new_items_release"),
        bounds=bounds_from(old["config"], rows) if bounds_from else old.get("bounds"))
    return _write(report, rows, out_dir, plots=plots)


def _write(report: dict[str, Any], rows: Sequence[Mapping[str, Any]], out_dir: Path, *,
           plots: bool) -> dict[str, Any]:
    files = ["report.json", "rounds.jsonl.gz", "table.md"]
    if plots:
        files += plot_all(report, rows, out_dir)
    report["files"] = files
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    # table.md starts with the overall table (readers and tests expect "| policy |" first)
    parts = [table(report), targets_table(report), last_third_table(report),
             bounds_table(report), followups_table(report), new_items_table(report),
             retrain_table(report), ope_table(report)]
    (out_dir / "table.md").write_text("\n\n".join(p for p in parts if p) + "\n", encoding="utf-8")
    return report


def bounds_table(report: Mapping[str, Any]) -> str:
    """Markdown: the ``bounds`` section next to ours' success@10 (last third)."""
    b = report.get("bounds")
    if not b:
        return ""
    ours = (report.get("policies") or {}).get("ours") or {}
    lt = ours.get("last_third") or {}

    def ours_of(group: str) -> Any:
        if group == "all":
            return (lt.get("overall") or {}).get("success")
        if group in QUERY_TYPES:
            return ((lt.get("by_type") or {}).get(group) or {}).get("success")
        return (((ours.get("bands") or {}).get(group) or {}).get("last_third") or {}).get("success")

    def f(x: Any) -> str:
        return "–" if x is None else f"{x:.3f}"

    chains = [f"chained_{p:g}" for p in b.get("chain_rates") or ()]
    lines = [f"What one fixed list per query key could reach (success@{b.get('k', 10)}, rounds >= "
             f"{b.get('score_from')}): `learned` = the greedy list of every earlier user's wants "
             f"for the key (the memory's target; none for keys first seen in the last third), "
             f"`hindsight` = the same greedy list chosen on the scored rounds (ours cannot tell "
             f"users apart, so one list per key is all it can show)"
             + (", `chained_p` = the items that query chains would reveal if every earlier "
                "search of the key were abandoned and a share p of them reformulated into a "
                "lookup of one wanted item (credited to the abandoned query; "
                "`simulation/bounds.py`)" if chains else ""),
             "", "| group | n | ours | learned | hindsight |" + "".join(f" {c} |" for c in chains),
             "|---|---|---|---|---|" + "---|" * len(chains)]
    groups = [("all", b.get("overall") or {})]
    groups += [(t, v) for t, v in (b.get("by_type") or {}).items()]
    groups += [(n, v) for n, v in (b.get("bands") or {}).items()]
    for name, v in groups:
        if not v.get("n"):
            continue
        lines.append(f"| {name} | {v['n']} | {f(ours_of(name))} | {f(v['learned']['success'])} | "
                     f"{f(v['hindsight']['success'])} |"
                     + "".join(f" {f((v.get(c) or {}).get('success'))} |" for c in chains))
    return "\n".join(lines)


def followups_table(report: Mapping[str, Any]) -> str:
    """Markdown: the follow-up lookups per policy ("" when there were none)."""
    f = report.get("followups") or {}
    if not f:
        return ""
    p = (report.get("config") or {}).get("p_reformulate")
    lines = [f"Follow-up lookups (not scored): a user whose playlist or tag search showed nothing "
             f"they wanted looked one wanted track up by name in the same session with "
             f"probability {p}; the query chain can credit that track to the abandoned query",
             "", "| policy | follow-ups | lookup success@10 | played |", "|---|---|---|---|"]
    for name, v in f.items():
        lines.append(f"| {name} | {v['rounds']} | {v['success']:.3f} | {v['played']:.3f} |")
    return "\n".join(lines)


def new_items_table(report: Mapping[str, Any]) -> str:
    """New items: per policy, the rounds from the release to the first show / click and, on
    the last third, how queries for new items fare ("" without a release)."""
    rel = report.get("new_items_release") or {}
    items = report.get("new_items") or {}
    if not rel or not items:
        return ""
    released = (rel.get("released") or {}).get("catalog", {}).get("entities", {})
    lines = [f"New items: {rel.get('held_out')} held-out entities (cutoff {rel.get('cutoff')}; "
             f"released {released}), released at round "
             f"{int(float(report['config'].get('release_at_fraction') or 0) * int(report['config'].get('rounds') or 0))}; "
             "rounds from the release (only comparable between policies that ran from it)",
             "",
             "| policy | ran from | new items shown | clicked | rounds to first show (median / p90) "
             "| to first click (median / p90) | last third: n | success@10 | a new item shown | clicked |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def mp(d: Mapping[str, Any]) -> str:
        return f"{d.get('median')} / {d.get('p90')}" if d.get("median") is not None else "–"

    def fmt(x: float | None) -> str:
        return "–" if x is None else f"{x:.3f}"

    for name, v in items.items():
        lt = v.get("last_third") or {}
        lines.append(f"| {name} | {v.get('ran_from')} | {v['n_shown']} | {v['n_clicked']} | "
                     f"{mp(v['rounds_to_first_show'])} | {mp(v['rounds_to_first_click'])} | "
                     f"{lt.get('n', '–')} | {fmt(lt.get('success'))} | {fmt(lt.get('new_shown'))} | "
                     f"{fmt(lt.get('new_clicked'))} |")
    return "\n".join(lines)


def focus_policies(report: Mapping[str, Any]) -> list[str]:
    """The policies the plots show: ``ours``, its ``ours_*`` ablations, the ``oracle``, the best
    static policy of the last third, the best single arm if different, ``epsilon_greedy`` and
    ``hybrid_rrf`` -- in that order, only those in ``report["policies"]``."""
    pol = report.get("policies") or {}
    best = report.get("best_static_last_third")
    order = ["ours", *sorted(n for n in pol if n.startswith("ours_")), "oracle", best,
             best_arm(pol), "epsilon_greedy", "hybrid_rrf"]
    return [n for n in dict.fromkeys(order) if n and n in pol]


def _panel_grid(plt: Any, out_dir: Path, file: str,
                panels: Sequence[tuple[str, Sequence[tuple[str, Sequence[float], Sequence[float],
                                                           Mapping[str, Any]]]]], *,
                ylabel: str, ylim: tuple[float, float], xlabel: str = "round",
                panel_width: float = 6.0) -> str:
    """A 1xN grid of line panels (``panels``: ``(title, [(label, x, y, plot kwargs)])``), the
    legend on the last panel; saved as ``out_dir / file``; returns ``file``."""
    fig, axes = plt.subplots(1, len(panels), figsize=(panel_width * len(panels), 4.5), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels):
        for label, x, y, kw in lines:
            ax.plot(x, y, label=label, **{**({"marker": "o"} if len(x) == 1 else {}), **kw})
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / file, dpi=110)
    plt.close(fig)
    return file


def _policy_colors(plt: Any, focus: Sequence[str], all_names: Sequence[str]) -> dict[str, Any]:
    """Distinct colours for the focus policies (ours red, the oracle black), the rest after."""
    tab10 = [plt.get_cmap("tab10")(i) for i in range(10) if i != 3]  # 3 is red: ours'
    colors: dict[str, Any] = {"ours": "tab:red", "oracle": "black"}
    rest = [n for n in dict.fromkeys([*focus, *all_names]) if n not in colors]
    tab20 = plt.get_cmap("tab20")
    for i, n in enumerate(rest):
        colors[n] = tab10[i] if i < len(tab10) else tab20(i % 20)
    return colors


def _line_style(n: str, colors: Mapping[str, Any]) -> dict[str, Any]:
    """ours bold; the oracle dotted; single arms dashed; the rest thin."""
    return {"color": colors.get(n), "linewidth": 2.8 if n == "ours" else 1.8 if n == "oracle" else 1.2,
            "linestyle": ":" if n == "oracle" else "--" if n.startswith("arm:") else "-",
            "zorder": 3 if n == "ours" else 2}


def plot_all(report: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = by_policy([r for r in rows if is_stream(r)])
    oracle = {r["t"]: r[REWARD] for r in per.get("oracle", [])}
    all_names = sorted(per)
    # fewer lines: ours, its ablations, the oracle, the best static policy / arm, the baselines
    names = [n for n in focus_policies(report) if per.get(n)] or all_names
    start = max((per[n][0]["t"] for n in names if per[n]), default=0)
    colors = _policy_colors(plt, names, all_names)
    files = []

    def cumulative(file: str, value: Any, policies: list[str], *, ylabel: str, title: str,
                   zero_line: bool = False) -> None:
        """One line per policy: the running sum of ``value(round record)``."""
        fig, ax = plt.subplots(figsize=(10, 6))
        for n in policies:
            pr = [r for r in per[n] if r["t"] >= start]  # the rounds every plotted policy ran
            ax.plot([r["t"] + 1 for r in pr], np.cumsum([value(r) for r in pr]),
                    label=n, **_line_style(n, colors))
        if zero_line:
            ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlabel("round" if not start else f"round (from {start}: the rounds every shown policy ran)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / file, dpi=110)
        plt.close(fig)
        files.append(file)

    cumulative("cumulative_reward.png", lambda r: r[REWARD], names,
               ylabel=f"cumulative reward ({REWARD}@10)", title="Cumulative reward")
    if oracle:
        cumulative("cumulative_regret.png", lambda r: oracle.get(r["t"], 0.0) - r[REWARD],
                   [n for n in names if n != "oracle"],
                   ylabel=f"cumulative regret vs oracle ({REWARD}@10)",
                   title="Cumulative regret (oracle = best fixed subset per query type, calibrated)",
                   zero_line=True)

    adaptive = [n for n in ADAPTIVE if n in report["policies"]]
    if adaptive:
        arms = report["arms"]
        panels = []
        for n in adaptive:
            wins = report["policies"][n]["over_time"]
            x = [(w["rounds"][0] + w["rounds"][1]) / 2 for w in wins]
            panels.append((f"{n}: share of requests running each arm",
                           [(a, x, [np.nan if w["arm_share"].get(a) is None else w["arm_share"][a]
                                    for w in wins], {"marker": "o"})  # no rows: a gap, not 0
                            for a in arms]))
        files.append(_panel_grid(plt, out_dir, "arm_share.png", panels, ylabel="selection share",
                                 ylim=(0, 1.05), panel_width=5.5))

    files += _extra_plots(plt, report, per, out_dir, names=names, colors=colors)
    pol = report["policies"]
    # the last third: every policy ran it (the static ones may start late), the targets' part
    lt = {n: (pol[n].get("last_third") or {}).get("by_type") or pol[n]["by_type"] for n in names}
    types = [t for t in QUERY_TYPES if any(lt[n][t].get("n") for n in names)]
    fig, axes = plt.subplots(1, 2, figsize=(16, 5.5))
    width = 0.8 / max(len(names), 1)
    for ax, metric in zip(axes, ("success", "ndcg")):
        for i, n in enumerate(names):
            vals = [lt[n][t].get(metric) or 0 for t in types]
            ax.bar(np.arange(len(types)) + i * width, vals, width, label=n, color=colors[n],
                   edgecolor="black", linewidth=1.6 if n == "ours" else 0.3,
                   hatch="//" if n.startswith("arm:") else None)
        ax.set_xticks(np.arange(len(types)) + 0.4 - width / 2)
        ax.set_xticklabels([f"{t} (n={max(lt[n][t].get('n') or 0 for n in names)})" for t in types])
        ax.set_title(f"{metric}@10 by query type (last third, rounds >= "
                     f"{report.get('last_third_from_round', '?')})")
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(out_dir / "success_by_type.png", dpi=110)
    plt.close(fig)
    files.append("success_by_type.png")
    return files


def _windowed(rows: Sequence[Mapping[str, Any]], metric: str, *, window: int) -> tuple[list[float], list[float]]:
    """Trailing means of ``metric`` over ``window`` rows (x: round of the window's end)."""
    if not rows:
        return [], []
    v = np.asarray([r[metric] for r in rows], dtype=float)
    w = max(min(window, len(v)), 1)
    c = np.cumsum(np.insert(v, 0, 0.0))
    means = (c[w:] - c[:-w]) / w
    return [float(rows[i + w - 1]["t"] + 1) for i in range(len(means))], means.tolist()


def _window_size(n: int) -> int:
    """Trailing-window length for ``n`` rows: ``n // 15``, at least 20 -- but at most a quarter
    of the rows (a curve, not one point, on short series)."""
    return max(n // 15, min(20, max(n // 4, 1)))


def _extra_plots(plt: Any, report: Mapping[str, Any], per: Mapping[str, Sequence[Mapping[str, Any]]],
                 out_dir: Path, *, names: Sequence[str], colors: Mapping[str, Any]) -> list[str]:
    """A learning curve per key band (windowed success@10) and ours' arm shares over time
    per query type."""
    files: list[str] = []
    bands = key_bands(reference_rows(per))
    panels = []
    for b in BANDS:
        lines = []
        for n in names:
            rows = [r for r in per[n] if bands.get(row_key(r)) == b]
            x, y = _windowed(rows, "success", window=_window_size(len(rows)))
            lines.append((n, x, y, _line_style(n, colors)))
        n_ref = sum(1 for r in reference_rows(per) if bands.get(row_key(r)) == b)
        panels.append((f"{b} (n={n_ref}): success@10 (trailing window)", lines))
    files.append(_panel_grid(plt, out_dir, "learning_by_band.png", panels, ylabel="success@10",
                             ylim=(0, 1.02)))
    ours = per.get("ours") or []
    if ours:
        arms = list(report["arms"])
        panels = []
        for t in QUERY_TYPES:
            rows = [r for r in ours if r["qtype"] == t]
            lines = []
            for a in arms:
                marked = [{"t": r["t"], "x": float(a in r["arms"])} for r in rows]
                x, y = _windowed(marked, "x", window=_window_size(len(rows)))
                lines.append((a, x, y, {}))
            panels.append((f"ours, {t}: share of requests running each arm", lines))
        files.append(_panel_grid(plt, out_dir, "ours_arm_share_by_type.png", panels,
                                 ylabel="selection share (trailing window)", ylim=(0, 1.05)))
    return files
