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

from paypost.cli.common import DataDirOption, console, emit_json, err_console
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
    from paypost.distributed.runtime import (
        WorkerSet,
        load_pipeline,
        load_settings,
        open_bus,
        write_stage_times,
    )
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
        write_stage_times(pipeline, data_dir)
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


def register(app: typer.Typer) -> None:
    names = {c.name for c in app.registered_commands}
    app.command("worker")(worker)
    if "serve" not in names:
        app.command("serve")(serve)


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
