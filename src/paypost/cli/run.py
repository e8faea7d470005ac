"""`paypost demo` (the main job, on generated data) and `paypost run` (on your own inputs)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from paypost.cli.common import DataDirOption, JsonOption, console, emit_json, err_console
from paypost.cli.distributed import BackendOption, check_backend, run_distributed_job
from paypost.config import DEFAULT_DATA_DIR, UserError
from paypost.logs import configure_logging
from paypost.pipeline import MODES, STAGE_ORDER, Mode, PipelineSettings
from paypost.runner import Job, JobSummary, Source, vault_master_key
from paypost.stages.ingest import SourceConfig
from paypost.stages.rules import default_rules_text, load_rules, parse_rules, variables_from_tenants

ModeOption = Annotated[
    str,
    typer.Option(
        "--mode",
        help="realtime (one authorization per transaction), near-realtime (micro-batches of "
        "250) or batch (5,000 per checkpointed transaction). FR11.",
    ),
]
BatchOption = Annotated[
    int | None,
    typer.Option("--batch-size", min=1, help="Records per transaction (overrides the mode's)."),
]
RateOption = Annotated[
    float | None,
    typer.Option(
        "--posting-rate",
        min=0.001,
        help="Rate limit of the buffer in front of posting, events/s (default: unlimited).",
    ),
]


def _mode(mode: str) -> Mode:
    for m in MODES:
        if m == mode:
            return m
    raise UserError(f"--mode {mode!r} is not a mode; use one of: {', '.join(MODES)}.")


def _log_to_file(data_dir: Path, quiet: bool) -> Path:
    """Structured JSON logs (NFR7) go to DATA_DIR/logs/paypost.jsonl, not over the progress."""
    log_dir = data_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "paypost.jsonl"
    stream = path.open("a", encoding="utf-8")
    configure_logging("info", json=True, stream=stream)
    return path


class _StageProgress:
    """A live progress display: authorizations ingested, and events through each stage."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("{task.description:>18}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=err_console,
            disable=not enabled,
        )
        self.ingest = self.progress.add_task("authorizations", total=total, rate="")
        self.stages = {
            name: self.progress.add_task(name, total=None, rate="") for name in STAGE_ORDER
        }
        self.started = time.perf_counter()
        self.seen = 0

    def __enter__(self) -> _StageProgress:
        self.live = Live(self.progress, console=err_console, transient=False)
        if self.enabled:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.live.__exit__(None, None, None)

    def update(self, job: Job, records: int) -> None:
        self.seen += records
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.ingest, completed=self.seen, rate=f"{self.seen / elapsed:,.0f}/s")
        for name, task in self.stages.items():
            m = job.pipeline.metrics[name]
            self.progress.update(task, completed=m.events, total=max(m.events, 1))


def _render(summary: JobSummary, notices: list[str]) -> None:
    table = Table(title="paypost run summary", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    ok = "[green]yes[/]" if summary.trial_balance_zero else "[red]NO[/]"
    rows: list[tuple[str, str]] = [
        ("authorizations", f"{summary.authorizations:,}"),
        ("  approved", f"{summary.approved:,}"),
        ("  declined (no posting)", f"{summary.declined:,}"),
        ("  unanswered (reported)", f"{summary.timed_out:,}"),
        ("  quarantined records", f"{summary.quarantined:,}"),
        ("posted", f"{summary.posted:,}"),
        ("parked duplicates", f"{summary.parked_duplicates:,}"),
        ("held", f"{summary.held:,}"),
        ("rejected", f"{summary.rejected:,}"),
        ("dead-lettered", f"{summary.dead_lettered:,}"),
        (
            "every approved in one state",
            "[green]yes[/]"
            if summary.accounted + summary.in_flight == summary.approved
            else f"[red]NO[/] ({summary.accounted:,} of {summary.approved:,})",
        ),
        ("trial balance zero", ok),
        ("flags", ", ".join(f"{k} {v:,}" for k, v in summary.flags.items()) or "none"),
        ("this run", f"{summary.this_run_authorizations:,} approved in {summary.seconds:.1f} s"),
        ("throughput", f"{summary.events_per_second:,.0f} authorizations/s"),
        ("latency p50 / p99", f"{summary.latency_p50_ms:.1f} / {summary.latency_p99_ms:.1f} ms"),
        (
            "stage p99 per event",
            ", ".join(f"{k} {v:.0f} µs" for k, v in summary.stage_p99_us.items()),
        ),
        ("peak RSS", f"{summary.peak_rss_mb:.0f} MB"),
        ("data dir", summary.data_dir),
        ("posting file", summary.posting_file),
        ("ISO 20022 samples", ", ".join(summary.iso20022_samples) or "none"),
        ("held / rejected", "paypost review list"),
        ("parked / dead letters", "paypost parked list · paypost dlq list"),
        ("ledger", "paypost ledger trial-balance · paypost ledger balance ACCOUNT"),
    ]
    for what, value in rows:
        table.add_row(what, value)
    console.print(table)
    for notice in notices:
        err_console.print(f"[yellow]note:[/] {notice}", highlight=False)


def _finish(
    job: Job, mode: str, totals: Any, seconds: float, as_json: bool, notices: list[str]
) -> None:
    summary = job.summary(totals, seconds, mode)
    summary.notices = notices
    if as_json:
        emit_json(summary.to_dict())
    else:
        _render(summary, notices)
    if not summary.trial_balance_zero:
        raise typer.Exit(1)


def demo(
    events: Annotated[
        int, typer.Option("--events", "-n", min=1, help="Authorizations to generate.")
    ] = 100_000,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    mode: ModeOption = "near-realtime",
    batch_size: BatchOption = None,
    posting_rate: RateOption = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the generated data.")] = 7,
    as_json: JsonOption = False,
    backend: BackendOption = "embedded",
) -> None:
    """Generate realistic authorizations and post them through the whole pipeline.

    Tenants, accounts (valid IBANs, sort codes), cards, merchants with real category codes,
    several currencies, ~1% duplicates, declines, foreign and high-value transactions: every
    stage runs on the embedded default (SQLite in DATA_DIR), with a live display per stage and
    a summary at the end. Running it again on the same data dir posts nothing twice.
    """
    from paypost.demo import demo_inputs

    _mode(mode)
    notices: list[str] = []
    master, message = vault_master_key(data_dir, allow_demo_key=True)
    if message:
        notices.append(message)
    log_path = _log_to_file(data_dir, as_json)
    notices.append(f"structured logs: {log_path}")
    interactive = not as_json and err_console.is_terminal
    with err_console.status("generating reference data and authorization logs…"):
        inputs_cm = demo_inputs(events, master, seed=seed, mode=mode, batch_size=batch_size)
        inputs = inputs_cm.__enter__()
    try:
        refdata = inputs.generated.refdata
        book = parse_rules(
            default_rules_text(),
            source="<default rules>",
            tenant_variables=variables_from_tenants(refdata.tenants.values()),
        )
        settings = PipelineSettings(
            mode=_mode(mode), batch_size=batch_size, posting_rate_limit_per_s=posting_rate
        )
        if check_backend(backend) == "distributed":
            run_distributed_job(
                refdata,
                book,
                default_rules_text(),
                "<default rules>",
                settings,
                master,
                [(s.config, s.path) for s in inputs.sources if s.path is not None],
                total=events,
                as_json=as_json,
                notices=notices,
                data_dir=data_dir,
            )
            return
        job = Job(data_dir, refdata, book, settings, master)
        try:
            with _StageProgress(events, interactive or not as_json) as progress:
                totals, seconds = job.run(
                    inputs.sources,
                    on_batch=lambda b, o, s: progress.update(
                        job, b.counts.approved + b.counts.declined
                    ),
                )
            _finish(job, mode, totals, seconds, as_json, notices)
        finally:
            job.close()
    finally:
        inputs_cm.__exit__(None, None, None)


def run(
    auth_log: Annotated[
        list[Path],
        typer.Option("--auth-log", help="Authorization input file (repeat for several)."),
    ],
    accounts: Annotated[
        Path,
        typer.Option(
            "--accounts",
            help="Reference data directory: tenants, accounts, branches, FX rates "
            "(docs/refdata.md; examples/refdata ships one).",
        ),
    ],
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant the input belongs to.")],
    rules: Annotated[
        Path | None,
        typer.Option("--rules", help="Rules file (YAML, docs/rules.md); default: built-in rules."),
    ] = None,
    input_format: Annotated[
        str, typer.Option("--format", help="iso8583, jsonl or csv.")
    ] = "iso8583",
    source_name: Annotated[
        str | None,
        typer.Option("--source", help="Source name (checkpoint key; default: the file name)."),
    ] = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    mode: ModeOption = "batch",
    batch_size: BatchOption = None,
    posting_rate: RateOption = None,
    as_json: JsonOption = False,
    backend: BackendOption = "embedded",
) -> None:
    """Post your own authorizations through the whole pipeline (resumable, idempotent).

    The vault key comes from PAYPOST_VAULT_KEY or PAYPOST_VAULT_KEY_FILE (the tokens in the
    reference data must have been made with it), else DATA_DIR/vault.key.
    """
    from paypost.refdata.files import load_refdata_dir

    _mode(mode)
    if input_format not in ("iso8583", "jsonl", "csv"):
        raise UserError(f"--format {input_format!r}: use iso8583, jsonl or csv.")
    for path in auth_log:
        if not path.is_file():
            raise UserError(f"--auth-log {str(path)!r} is not a readable file.")
    if not accounts.is_dir():
        raise UserError(
            f"--accounts {str(accounts)!r} is not a directory of reference data "
            "(see docs/refdata.md, or examples/refdata)."
        )
    notices: list[str] = []
    master, message = vault_master_key(data_dir, allow_demo_key=True)
    if message:
        notices.append(message)
    log_path = _log_to_file(data_dir, as_json)
    notices.append(f"structured logs: {log_path}")
    refdata = load_refdata_dir(accounts)
    if tenant not in refdata.tenants:
        raise UserError(
            f"--tenant {tenant!r} is not in the reference data "
            f"(tenants: {', '.join(sorted(refdata.tenants))})."
        )
    variables = variables_from_tenants(refdata.tenants.values())
    book = (
        load_rules(rules, tenant_variables=variables)
        if rules is not None
        else parse_rules(default_rules_text(), "<default rules>", variables)
    )
    settings = PipelineSettings(
        mode=_mode(mode), batch_size=batch_size, posting_rate_limit_per_s=posting_rate
    )
    sources = [
        Source(
            config=SourceConfig(
                name=source_name or path.name if len(auth_log) == 1 else path.name,
                tenant=tenant,
                format=input_format,  # type: ignore[arg-type]
                mode=mode,  # type: ignore[arg-type]
                batch_size=batch_size,
            ),
            path=path,
        )
        for path in auth_log
    ]
    if check_backend(backend) == "distributed":
        run_distributed_job(
            refdata,
            book,
            rules.read_text(encoding="utf-8") if rules is not None else default_rules_text(),
            str(rules) if rules is not None else "<default rules>",
            settings,
            master,
            [(s.config, s.path) for s in sources if s.path is not None],
            total=0,
            as_json=as_json,
            notices=notices,
            data_dir=data_dir,
        )
        return
    job = Job(data_dir, refdata, book, settings, master)
    try:
        with _StageProgress(0, not as_json) as progress:
            totals, seconds = job.run(
                sources,
                on_batch=lambda b, o, s: progress.update(
                    job, b.counts.approved + b.counts.declined
                ),
            )
        _finish(job, mode, totals, seconds, as_json, notices)
    finally:
        job.close()
