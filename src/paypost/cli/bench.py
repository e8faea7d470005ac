"""`paypost bench`: the performance budget measured end to end (DESIGN §5, issue 7)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from paypost.cli.common import JsonOption, console, emit_json, err_console
from paypost.config import UserError
from paypost.pipeline import MODES, Mode

RESULTS_FILE = Path("docs") / "benchmarks.md"


def _mode(mode: str) -> Mode:
    for m in MODES:
        if m == mode:
            return m
    raise UserError(f"--mode {mode!r} is not a mode; use one of: {', '.join(MODES)}.")


def bench(
    events: Annotated[
        int, typer.Option("--events", "-n", min=1, help="Authorizations to generate and post.")
    ] = 1_000_000,
    backend: Annotated[
        str, typer.Option("--backend", help="embedded (SQLite) or distributed (NATS + PostgreSQL).")
    ] = "embedded",
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            help="Mode of the throughput run: batch (5,000 per transaction), near-realtime "
            "(250) or realtime (1). The latency run is always realtime.",
        ),
    ] = "batch",
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", min=1, help="Records per transaction (overrides the mode's)."),
    ] = None,
    shards: Annotated[
        int,
        typer.Option(
            "--shards",
            min=0,
            help="Embedded: shard processes, each with its own SQLite database holding whole "
            "tenants (0: one per tenant). Distributed: fused worker processes (0: 2).",
        ),
    ] = 0,
    latency_rate: Annotated[
        float,
        typer.Option(
            "--latency-rate",
            min=0,
            help="Offered load of the latency run, authorizations/s in all (split over the "
            "shards).",
        ),
    ] = 500.0,
    latency_seconds: Annotated[
        float,
        typer.Option("--latency-seconds", min=0, help="Length of the latency run (0: skip it)."),
    ] = 3.0,
    limit: Annotated[
        bool,
        typer.Option(
            "--limit/--no-limit", help="Measure the raw SQLite insert limit on the same disk."
        ),
    ] = True,
    record_to: Annotated[
        bool,
        typer.Option(
            "--record",
            help=f"Append the result (commit, machine, date) to {RESULTS_FILE} in the current "
            "directory.",
        ),
    ] = False,
    cache_mb: Annotated[
        int | None,
        typer.Option(
            "--cache-mb",
            min=1,
            help="SQLite page cache per shard, MB (default: paypost's 32 MB).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the generated data.")] = 7,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Keep the run's databases here (an empty directory; default: a fresh "
            "temporary one, deleted after the run).",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Measure paypost against its budget: N authorizations ingested → posted, checked.

    Generates the authorizations first (not timed), then times them through every stage into
    the ledger (every lifecycle event archived, WAL with synchronous=FULL), checks the answer
    (every approved authorization posted exactly once, posting file records unique, trial
    balance zero), measures realtime latency at a fixed offered load and the raw insert limit
    of the same storage. A wrong answer exits with status 1 and the reason.
    """
    from paypost.bench import BACKENDS, BenchOptions, record, run_bench
    from paypost.logs import configure_logging

    if backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}.")
    if record_to and not RESULTS_FILE.parent.is_dir():
        raise UserError(
            f"--record appends to {RESULTS_FILE}, but there is no {RESULTS_FILE.parent}/ "
            "directory here; run it from the paypost repository's root."
        )
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
    # The generated data holds expected alerts (e.g. ValidationFailed): shard workers log to
    # their own data dirs; here only a crash would be worth a line over the progress bars.
    configure_logging("critical", json=True, stream=sys.stderr)
    options = BenchOptions(
        events=events,
        backend=backend,
        mode=_mode(mode),
        batch_size=batch_size,
        shards=shards,
        seed=seed,
        latency_rate=latency_rate,
        latency_seconds=latency_seconds,
        limit=limit,
        data_dir=data_dir,
        cache_mb=cache_mb,
    )
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        disable=as_json and not err_console.is_terminal,
        transient=False,
    )
    current: list[TaskID] = []

    def finish_phase() -> None:
        if current:
            task = current[-1]
            t = progress.tasks[task]
            progress.update(task, total=t.total or 1, completed=t.total or 1)

    def on_phase(phase: str, total: int | None) -> None:
        finish_phase()
        current.append(progress.add_task(phase, total=total))

    def on_progress(n: int) -> None:
        if current:
            progress.advance(current[-1], n)

    with progress:
        result = run_bench(options, on_phase=on_phase, on_progress=on_progress)
        finish_phase()
    if record_to:
        record(result, RESULTS_FILE)
    if as_json:
        emit_json(result.to_dict())
    else:
        table = Table(title="paypost bench", show_header=False, title_justify="left")
        table.add_column("what", style="bold")
        table.add_column("value")
        ok = "[green]yes[/]" if result.correct else "[red]NO[/]"
        rows = [
            ("correct", ok),
            ("backend / mode / shards", f"{result.backend} / {result.mode} / {result.shards}"),
            (
                "throughput",
                f"{result.approved:,} approved of {result.events:,} in {result.seconds:.1f} s "
                f"= {result.events_per_second:,.0f} authorizations/s",
            ),
            (
                "per authorization",
                f"{result.cpu_us_per_authorization:,.0f} µs CPU"
                + (
                    " = " + " + ".join(f"{k} {v:,.0f}" for k, v in result.cpu_us_by_process.items())
                    if result.cpu_us_by_process
                    else f", {result.written_bytes_per_authorization:,.0f} B written"
                ),
            ),
            ("stage p50 per event", _us(result.stage_p50_us)),
            ("stage p99 per event", _us(result.stage_p99_us)),
            ("stage p99 CPU per event", _us(result.stage_cpu_p99_us)),
            (
                "realtime latency p50 / p99",
                f"{result.e2e_latency_p50_ms:.2f} / {result.e2e_latency_p99_ms:.2f} ms at "
                f"{result.latency_offered_per_second:,.0f}/s offered "
                f"({result.latency_achieved_per_second:,.0f}/s achieved)",
            ),
            (
                "peak RSS",
                f"{result.peak_rss_mb:.0f} MB all processes, "
                f"{result.peak_rss_mb_per_process:.0f} MB largest",
            ),
            (
                "storage limit",
                f"{result.limit_rows_per_second:,.0f} rows/s of {result.limit_row_bytes:,} B "
                f"{'(PostgreSQL COPY) ' if result.backend == 'distributed' else ''}"
                f"(paypost ÷ limit = {result.limit_ratio:.2f})",
            ),
            (
                "archive",
                f"{result.archived_events:,} events, "
                f"{result.archived_bytes_per_authorization:,.0f} B per authorization",
            ),
            (
                "within budget",
                ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in result.within_budget.items()),
            ),
            (
                "commit / machine",
                f"{result.commit} · {result.cpus} × {result.machine} · {result.date}",
            ),
        ]
        for what, value in rows:
            table.add_row(what, value)
        console.print(table)
    if not result.correct:
        for p in result.problems:
            err_console.print(f"[bold red]wrong answer:[/] {p}", highlight=False)
        raise typer.Exit(1)


def _us(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f} µs" for k, v in values.items())
