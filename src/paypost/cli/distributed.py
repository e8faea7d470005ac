"""`paypost worker`, `paypost serve --backend distributed`, and the distributed path of
`paypost demo` / `paypost run` (issue 6; docs/deployment.md)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from paypost.cli.common import DataDirOption, JsonOption, console, emit_json, err_console
from paypost.config import DEFAULT_DATA_DIR, UserError
from paypost.pipeline import PipelineSettings
from paypost.refdata.model import RefData
from paypost.stages.ingest import SourceConfig
from paypost.stages.rules import RuleBook

BACKENDS = ("embedded", "distributed")

BackendOption = Annotated[
    str,
    typer.Option(
        "--backend",
        help="embedded (one process, SQLite in the data dir) or distributed (NATS JetStream "
        "+ PostgreSQL; PAYPOST_BUS_URL, PAYPOST_DB_URL; docs/deployment.md).",
    ),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="YAML file with bus_url, db_url, prefix, replicas (env PAYPOST_CONFIG); "
        "PAYPOST_BUS_URL / PAYPOST_DB_URL / PAYPOST_PREFIX override it.",
    ),
]
BusUrlOption = Annotated[
    str | None, typer.Option("--bus-url", help="NATS URL (default: PAYPOST_BUS_URL).")
]
DbUrlOption = Annotated[
    str | None, typer.Option("--db-url", help="PostgreSQL URL (default: PAYPOST_DB_URL).")
]
PrefixOption = Annotated[
    str | None,
    typer.Option(
        "--prefix", help="Name prefix of streams and schemas (default: paypost; PAYPOST_PREFIX)."
    ),
]


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}.")
    return backend


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _serve_stages(
    stages: Sequence[str],
    concurrency: int | None,
    config: Path | None,
    bus_url: str | None,
    db_url: str | None,
    prefix: str | None,
    data_dir: Path,
) -> None:
    from paypost.distributed.runtime import WorkerSet, load_pipeline, load_settings, open_bus
    from paypost.logs import configure_logging
    from paypost.runner import vault_master_key

    settings = load_settings(config, bus_url=bus_url, db_url=db_url, prefix=prefix)
    master, _ = vault_master_key(data_dir, allow_demo_key=True)
    configure_logging("info", json=True, stream=None)
    stop = _stop_on_signals()
    bus = open_bus(settings)
    try:
        pipeline = load_pipeline(bus, master)
        workers = WorkerSet(pipeline, stages, concurrency, stop=stop).start()
        err_console.print(
            f"paypost workers for {', '.join(stages)} on {settings.bus_url} "
            f"(prefix {settings.prefix!r}); SIGTERM or Ctrl-C stops after the batch in hand.",
            highlight=False,
        )
        while not stop.wait(1.0):
            pass
        workers.close()
        pipeline.close()
    finally:
        bus.close()


def worker(
    stage: Annotated[
        str,
        typer.Option(
            "--stage",
            help="dedup, standardize, enrich, rules, account-interface, assembler, "
            "notifications, or pipeline (all stages fused on the dedup queue).",
        ),
    ],
    concurrency: Annotated[
        int | None,
        typer.Option("--concurrency", min=1, help="Batches in flight at once (threads)."),
    ] = None,
    config: ConfigOption = None,
    bus_url: BusUrlOption = None,
    db_url: DbUrlOption = None,
    prefix: PrefixOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
) -> None:
    """Run one stage of the distributed pipeline (scale out: run more of them).

    Loads the reference data and rules a job published in PostgreSQL, consumes the stage's
    durable JetStream queue, and commits each batch (effects, tracking record, outbox of its
    output events) in one PostgreSQL transaction. Stateless: start or kill any number.
    """
    from paypost.distributed.runtime import check_stage

    _serve_stages([check_stage(stage)], concurrency, config, bus_url, db_url, prefix, data_dir)


def serve(
    backend: BackendOption = "distributed",
    fused: Annotated[
        bool,
        typer.Option(
            "--fused/--per-stage",
            help="--fused: one worker takes each authorization batch through every stage in "
            "one transaction (fewer broker hops, faster); --per-stage: one worker per stage.",
        ),
    ] = False,
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", min=1, help="Batches in flight per stage.")
    ] = None,
    config: ConfigOption = None,
    bus_url: BusUrlOption = None,
    db_url: DbUrlOption = None,
    prefix: PrefixOption = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
) -> None:
    """Run every stage's worker in this one process (distributed backend, for convenience)."""
    from paypost.distributed.pipeline import serve_stages

    if check_backend(backend) != "distributed":
        raise UserError(
            "`paypost serve --backend embedded` is `paypost run` / `paypost demo`: the embedded "
            "pipeline runs inside the job. Use --backend distributed for workers."
        )
    _serve_stages(serve_stages(fused), concurrency, config, bus_url, db_url, prefix, data_dir)


# --------------------------------------------------------------------------------------------
# `paypost cluster …`: looking into and operating the distributed bus

cluster_app = typer.Typer(
    help="The distributed bus (NATS JetStream + PostgreSQL): stats, dead letters, replay.",
    no_args_is_help=True,
)


def _open(config: Path | None, bus_url: str | None, db_url: str | None, prefix: str | None) -> Any:
    from paypost.distributed.runtime import load_settings, open_bus

    return open_bus(
        load_settings(config, bus_url=bus_url, db_url=db_url, prefix=prefix), sweep=False
    )


@cluster_app.command("stats")
def cluster_stats(
    config: ConfigOption = None,
    bus_url: BusUrlOption = None,
    db_url: DbUrlOption = None,
    prefix: PrefixOption = None,
    as_json: JsonOption = False,
) -> None:
    """Queue depth, in flight, delayed and dead letters per target; archive; outbox backlog."""
    import msgspec

    bus = _open(config, bus_url, db_url, prefix)
    try:
        stats = bus.stats()
        outbox = bus.outbox_size()
    finally:
        bus.close()
    if as_json:
        out = msgspec.to_builtins(stats)
        out["outbox"] = outbox
        emit_json(out)
        return
    table = Table(title=f"bus {bus.prefix!r} on {bus.nats_url}")
    for col in ("target", "queued", "in flight", "delayed", "dead letters", "routed"):
        table.add_column(col, justify="left" if col == "target" else "right")
    for t in stats.targets:
        table.add_row(
            t.name,
            f"{t.queued:,}",
            f"{t.in_flight:,}",
            f"{t.delayed:,}",
            f"{t.dead_lettered:,}",
            f"{t.routed_total:,}",
        )
    console.print(table)
    console.print(
        f"archived {stats.archived:,} · duplicates dropped {stats.duplicates_dropped:,} · "
        f"id conflicts {stats.id_conflicts:,} · outbox rows waiting {outbox:,}"
    )


@cluster_app.command("dlq-list")
def cluster_dlq_list(
    target: Annotated[str | None, typer.Option("--target", help="Only this target.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 50,
    config: ConfigOption = None,
    bus_url: BusUrlOption = None,
    db_url: DbUrlOption = None,
    prefix: PrefixOption = None,
    as_json: JsonOption = False,
) -> None:
    """Dead letters with their reason, attempts and times (oldest first)."""
    from paypost.bus.core import format_time

    bus = _open(config, bus_url, db_url, prefix)
    try:
        dead = bus.dlq_list(target=target, limit=limit)
    finally:
        bus.close()
    if as_json:
        emit_json(dead)
        return
    table = Table(title="dead letters")
    for col in ("id", "target", "event", "attempts", "dead-lettered", "error"):
        table.add_column(col)
    for d in dead:
        table.add_row(
            str(d.id),
            d.target,
            f"{d.event.detail_type} {d.event.id}",
            str(d.attempts),
            format_time(d.dead_lettered_at),
            d.error,
        )
    console.print(table)


@cluster_app.command("dlq-redrive")
def cluster_dlq_redrive(
    target: Annotated[str | None, typer.Option("--target", help="Only this target.")] = None,
    ids: Annotated[list[int] | None, typer.Option("--id", help="Only these dead letters.")] = None,
    config: ConfigOption = None,
    bus_url: BusUrlOption = None,
    db_url: DbUrlOption = None,
    prefix: PrefixOption = None,
    as_json: JsonOption = False,
) -> None:
    """Put dead letters back on their target's queue (fresh attempt count)."""
    bus = _open(config, bus_url, db_url, prefix)
    try:
        n = bus.dlq_redrive(target=target, ids=ids)
    finally:
        bus.close()
    if as_json:
        emit_json({"redriven": n})
    else:
        console.print(f"redriven: {n:,}")


@cluster_app.command("replay")
def cluster_replay(
    start: Annotated[str, typer.Option("--from", help="RFC 3339 start (inclusive).")],
    end: Annotated[str, typer.Option("--to", help="RFC 3339 end (exclusive).")],
    target: Annotated[
        str | None, typer.Option("--target", help="Only this target's rules (default: all).")
    ] = None,
    pattern: Annotated[
        str | None, typer.Option("--pattern", help="Event pattern (JSON or a JSON file).")
    ] = None,
    config: ConfigOption = None,
    bus_url: BusUrlOption = None,
    db_url: DbUrlOption = None,
    prefix: PrefixOption = None,
    as_json: JsonOption = False,
) -> None:
    """Re-route archived events (same ids) by time range × pattern; consumers' tracking
    records make events they already processed no-ops."""
    from paypost.bus.core import ArchiveQuery, parse_time
    from paypost.cli.common import load_json_arg

    query = ArchiveQuery(
        start=parse_time(start, "--from"),
        end=parse_time(end, "--to"),
        pattern=load_json_arg(pattern, "--pattern") if pattern is not None else None,
    )
    bus = _open(config, bus_url, db_url, prefix)
    try:
        result = bus.replay(query, target=target)
    finally:
        bus.close()
    if as_json:
        emit_json(result)
    else:
        console.print(
            f"scanned {result.scanned:,}, matched {result.matched:,}, routed "
            + (", ".join(f"{k} {v:,}" for k, v in result.routed.items()) or "nowhere")
        )


def register(app: typer.Typer) -> None:
    names = {c.name for c in app.registered_commands}
    app.command("worker")(worker)
    if "serve" not in names:
        app.command("serve")(serve)
    app.add_typer(cluster_app, name="cluster")


# --------------------------------------------------------------------------------------------
# The distributed path of `paypost demo` and `paypost run`


def run_distributed_job(
    refdata: RefData,
    rulebook: RuleBook,
    rules_text: str,
    rules_source: str,
    settings: PipelineSettings,
    master_key: bytes,
    sources: Sequence[tuple[SourceConfig, Path]],
    *,
    total: int,
    as_json: bool,
    notices: list[str],
    external_workers: bool = False,
    data_dir: Path | None = None,
) -> None:
    from paypost.distributed.runtime import DistributedJob, RunReport, load_settings

    dsettings = load_settings()
    job = DistributedJob(
        settings=dsettings,
        refdata=refdata,
        rulebook=rulebook,
        rules_text=rules_text,
        rules_source=rules_source,
        pipeline_settings=settings,
        master_key=master_key,
        in_process_workers=not external_workers,
    )
    progress = Progress(
        TextColumn("{task.description:>18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        disable=as_json,
    )
    try:
        with progress:
            ingest = progress.add_task("authorizations", total=total or None)
            posted = progress.add_task("terminal", total=None)

            def on_poll(rep: RunReport) -> None:
                progress.update(posted, completed=rep.terminal(), total=max(rep.approved, 1))

            rep = job.run(
                sources,
                on_batch=lambda n: progress.advance(ingest, n),
                on_poll=on_poll,
            )
        if data_dir is not None:  # the bank's posting file, as on the embedded backend
            path = data_dir / "postings" / "postings.csv"
            exported = job.pipeline.export_postings(path)
            notices.append(f"posting file: {path} ({exported:,} records appended)")
    finally:
        job.close()
    out: dict[str, Any] = rep.to_dict()
    out["backend"] = "distributed"
    out["bus_url"] = dsettings.bus_url
    out["prefix"] = dsettings.prefix
    out["notices"] = notices
    if as_json:
        emit_json(out)
    else:
        table = Table(title="paypost run summary (distributed)", show_header=False)
        table.add_column("what", style="bold")
        table.add_column("value")
        for key in (
            "approved",
            "declined",
            "quarantined",
            "posted",
            "journal_entries",
            "parked_duplicates",
            "held",
            "rejected",
            "dead_lettered",
            "in_flight",
            "every_approved_in_one_terminal_state",
            "trial_balance_zero",
            "seconds",
            "authorizations_per_second",
        ):
            table.add_row(key.replace("_", " "), f"{out[key]}")
        console.print(table)
        for notice in notices:
            err_console.print(f"[yellow]note:[/] {notice}", highlight=False)
    if not rep.trial_balance_zero or not rep.complete:
        raise typer.Exit(1)
