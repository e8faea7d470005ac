"""`paypost ingest [FILE]`: read an authorization source into the embedded bus (FR1, FR11).

Each batch's events, vault rows, quarantined records and checkpoint commit in ONE transaction
on DATA_DIR/paypost.db, so the command can be interrupted and run again: it resumes at the
checkpoint of the source (named after the file unless --source is given) without emitting
anything twice. `--format table` reads the `ingest_authorizations` table of that database (no
FILE); `--follow` keeps tailing the source until Ctrl-C.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

from paypost.cli.common import DataDirOption, JsonOption, console, emit_json, err_console
from paypost.config import DEFAULT_DATA_DIR, UserError, ensure_data_dir
from paypost.security.tokens import VaultKeys, load_or_create_demo_key
from paypost.stages.ingest import (
    IngestBatch,
    IngestReport,
    SourceConfig,
    SqliteIngestStore,
    ensure_schema,
    follow_ingest,
    open_reader,
    run_ingest,
)

FORMATS = ("iso8583", "jsonl", "csv", "table")
MODES = ("batch", "near-realtime", "realtime")


def ingest(
    file: Annotated[
        Path | None,
        typer.Argument(help="The authorization log / JSONL / CSV file (none for --format table)."),
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="iso8583, jsonl, csv, or table (the change feed).")
    ] = "iso8583",
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant of the source.")] = "bank-a",
    source: Annotated[
        str | None,
        typer.Option("--source", help="Source name (checkpoint key, part of event ids)."),
    ] = None,
    mode: Annotated[
        str, typer.Option("--mode", help="batch, near-realtime or realtime (batch sizes).")
    ] = "batch",
    timeout: Annotated[
        float, typer.Option("--response-timeout", help="ISO 8583: seconds to wait for a 0110.")
    ] = 60.0,
    final: Annotated[
        bool,
        typer.Option(
            "--final/--more-to-come",
            help="The file is complete (report unanswered requests at its end), or it may grow.",
        ),
    ] = True,
    follow: Annotated[
        bool, typer.Option("--follow", help="Keep tailing the source for new records (Ctrl-C).")
    ] = False,
    poll: Annotated[
        float, typer.Option("--poll", min=0.01, help="--follow: seconds between looks.")
    ] = 0.5,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    json: JsonOption = False,
) -> None:
    """Ingest FILE: one AuthorizationApproved event per approved authorization."""
    from paypost.bus.sqlite import SqliteBus
    from paypost.logs import configure_from_env

    configure_from_env("warning")  # JSON lines on stderr; PAYPOST_LOG_LEVEL=info for batches
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if mode not in MODES:
        raise UserError(f"--mode {mode!r} is not one of {', '.join(MODES)}")
    if fmt == "table":
        if file is not None:
            raise UserError("--format table reads the database's table: pass no FILE")
    elif file is None or not file.is_file():
        raise UserError(
            f"{str(file) if file else 'FILE'!r} is not a file: pass the path of the file to "
            "ingest (or --format table for the ingest_authorizations table)"
        )
    ensure_data_dir(data_dir)
    master, message = load_or_create_demo_key(data_dir)
    if message:
        err_console.print(f"[yellow]note:[/] {message}", highlight=False)
    config = SourceConfig(
        name=source or (file.name if file is not None else "ingest_authorizations"),
        tenant=tenant,
        format=fmt,  # type: ignore[arg-type]
        mode=mode,  # type: ignore[arg-type]
        response_timeout_s=timeout,
    )
    bus = SqliteBus.open(data_dir)
    try:
        with bus.unit_of_work() as uow:
            ensure_schema(uow.conn)
            checkpoint = SqliteIngestStore(uow.conn).load_checkpoint(config.name)
        reader = open_reader(
            config,
            VaultKeys.from_master(master),
            path=file,
            conn=bus.conn,
            checkpoint=checkpoint,
        )
        size = file.stat().st_size if file is not None else None
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn() if size is not None else "{task.completed} rows",
            TimeRemainingColumn(),
            console=err_console,
            transient=True,
            disable=json,
        ) as progress:
            task = progress.add_task(f"ingesting {config.name}", total=size)
            progress.update(task, completed=checkpoint.position if checkpoint else 0)

            done = IngestReport(source=config.name, checkpoint=checkpoint)

            def advance(batch: IngestBatch) -> None:  # called after each batch committed
                done.batches += 1
                done.events += len(batch.events)
                done.counters.add(batch.counts)
                done.checkpoint = batch.checkpoint
                if batch.checkpoint is not None:
                    progress.update(task, completed=batch.checkpoint.position)

            if follow:
                # Ctrl-C ends it; a batch interrupted mid-commit rolled back whole, and the
                # stored checkpoint is where the next run starts.
                with contextlib.suppress(KeyboardInterrupt):
                    follow_ingest(
                        reader, bus.unit_of_work, should_stop=lambda: False, poll_s=poll,
                        on_batch=advance,
                    )  # fmt: skip
            else:
                run_ingest(reader, bus.unit_of_work, final=final, on_batch=advance)
            report = done
    finally:
        bus.close()
    cp = report.checkpoint or checkpoint
    totals = cp.counters if cp is not None else None
    out = {
        "source": config.name,
        "tenant": tenant,
        "events": report.events,
        "this_run": {
            "records": report.counters.records,
            "approved": report.counters.approved,
            "declined": report.counters.declined,
            "timed_out": report.counters.timed_out,
            "quarantined": report.counters.quarantined,
        },
        "position": cp.position if cp is not None else 0,
        "pending_requests": len(cp.pending) if cp is not None else 0,
        "totals": None
        if totals is None
        else {
            "records": totals.records,
            "approved": totals.approved,
            "declined": totals.declined,
            "timed_out": totals.timed_out,
            "quarantined": totals.quarantined,
        },
    }
    if json:
        emit_json(out)
        return
    c = report.counters
    console.print(
        f"{config.name}: {c.records} records → {report.events} AuthorizationApproved events, "
        f"{c.declined} declined, {c.timed_out} timed out, {c.quarantined} quarantined"
        + (" (see `paypost quarantine list`)" if c.quarantined else ""),
        highlight=False,
    )
