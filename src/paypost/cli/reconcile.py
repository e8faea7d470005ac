"""`paypost reconcile`: authorizations in vs ledger vs posting file, and automatic patches (FR10).

Thin: parse the options, open the data dir (or, with `--backend distributed`, the distributed
pipeline's PostgreSQL state: `paypost.distributed.reconcile`), call `paypost.stages.reconcile`,
render. See docs/reconciliation.md.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import typer
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from paypost.bus.sqlite import DB_FILENAME, SqliteBus
from paypost.cli.common import DataDirOption, JsonOption, console, emit_json, err_console
from paypost.cli.distributed import (
    BackendOption,
    BusUrlOption,
    DbUrlOption,
    PrefixOption,
    check_backend,
)
from paypost.config import DEFAULT_DATA_DIR, UserError
from paypost.stages import reconcile as rec

if TYPE_CHECKING:
    from paypost.distributed.pipeline import DistributedPipeline

POSTING_FILE = Path("postings") / "postings.csv"


def _day(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value).isoformat()
    except ValueError:
        raise UserError(
            f"{what} {value!r} is not a date: use YYYY-MM-DD (e.g. 2026-11-21); the range is "
            "inclusive and counts days in UTC."
        ) from None


def load_config(path: Path | None) -> rec.ReconcileConfig:
    """A ReconcileConfig from a YAML or JSON file (docs/reconciliation.md), or the defaults."""
    if path is None:
        return rec.ReconcileConfig()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"--config {str(path)!r} cannot be read: {exc.strerror}.") from exc
    try:
        raw = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise UserError(f"--config {str(path)!r} is not valid YAML/JSON: {exc}") from exc
    if raw is None:
        raw = {}
    if isinstance(raw, dict) and "reconcile" in raw:
        raw = raw["reconcile"]
    try:
        return msgspec.convert(raw, rec.ReconcileConfig)
    except (msgspec.ValidationError, ValueError) as exc:
        raise UserError(
            f"--config {str(path)!r}: {exc} (see docs/reconciliation.md for the keys)"
        ) from exc


def open_bus(data_dir: Path) -> SqliteBus:
    """The data dir's database; a clear error when there is nothing to reconcile yet."""
    db = data_dir / DB_FILENAME
    if not db.is_file():
        raise UserError(
            f"no paypost database in {str(data_dir)!r} (looked for {db.name}): nothing to "
            "reconcile yet. Run `paypost demo` or `paypost run` first, or pass --data-dir."
        )
    bus = SqliteBus.open(data_dir)
    if not rec.has_ledger(bus.conn):
        bus.close()
        raise UserError(
            f"the database in {str(data_dir)!r} has no ledger yet: run `paypost demo` or "
            "`paypost run` first."
        )
    with bus.unit_of_work() as uow:
        rec.ensure_schema(uow.conn)
        backfilled = rec.backfill_from_archive(uow.conn)
    if backfilled:
        err_console.print(
            f"note: this database predates the reconciler's record of accepted authorizations; "
            f"{backfilled:,} were read from the event archive (once).",
            highlight=False,
        )
    return bus


def pipeline_redriver(
    bus: SqliteBus, data_dir: Path, rules: Path | None
) -> Callable[[], rec.Redriver]:
    """Build the pipeline (reference data from the database, rules) only when a missing
    authorization has to be re-driven."""

    def build() -> rec.Redriver:
        from paypost.pipeline import Pipeline, PipelineSettings
        from paypost.refdata.store import HolderCipher, load_refdata_from_db
        from paypost.stages.rules import (
            default_rules_text,
            load_rules,
            parse_rules,
            variables_from_tenants,
        )

        key = _vault_key(data_dir)
        refdata = load_refdata_from_db(bus.conn, HolderCipher.from_master(key))
        variables = variables_from_tenants(refdata.tenants.values())
        book = (
            load_rules(rules, tenant_variables=variables)
            if rules is not None
            else parse_rules(default_rules_text(), "<default rules>", variables)
        )
        pipeline = Pipeline(
            bus, refdata, book, PipelineSettings(), posting_file=data_dir / POSTING_FILE
        )
        pipeline.install()
        return pipeline.redrive

    return build


def exporter(bus: SqliteBus, data_dir: Path) -> Callable[[], int]:
    def export() -> int:
        from paypost.stages.posting_file import PostingFileWriter, export_outbox

        path = data_dir / POSTING_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with bus.unit_of_work() as uow:
            return export_outbox(uow.conn, PostingFileWriter(path))

    return export


@contextmanager
def _progress(enabled: bool) -> Iterator[rec.Progress]:
    progress = Progress(
        TextColumn("{task.description:>22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        disable=not enabled,
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def update(step: str, done: int, total: int) -> None:
        task = tasks.get(step)
        if task is None:
            task = tasks[step] = progress.add_task(step, total=total or None)
        progress.update(task, completed=done, total=total or None)

    with progress:
        yield update


def run_once(
    conn_bus: SqliteBus,
    data_dir: Path,
    scope: rec.Scope,
    config: rec.ReconcileConfig,
    *,
    dry_run: bool,
    rules: Path | None = None,
    progress: rec.Progress | None = None,
) -> tuple[rec.Report, rec.PatchOutcome | None]:
    """One reconciliation of DATA_DIR: the report and (unless DRY_RUN) the patch outcome.
    The function `paypost serve` calls on its interval."""
    report = rec.reconcile(
        conn_bus.conn,
        scope,
        config,
        posting_file=data_dir / POSTING_FILE,
        progress=progress or rec.no_progress,
    )
    if dry_run:
        return report, None
    outcome = rec.apply_patches(
        conn_bus,
        report,
        config=config,
        redrive=pipeline_redriver(conn_bus, data_dir, rules),
        export=exporter(conn_bus, data_dir),
        progress=progress or rec.no_progress,
    )
    return report, outcome


def _evidence_line(b: rec.Break) -> str:
    ev = b.evidence
    parts: list[str] = []
    auth = ev.get("authorized")
    posted = ev.get("posted")
    if auth:
        parts.append(f"authorized {auth['minor']} {auth['currency']}")
    if posted:
        parts.append(f"posted {posted['minor']} {posted['currency']}")
    diff = ev.get("difference")
    if diff:
        parts.append(f"difference {diff['minor']:+} {diff['currency']}")
    for key in ("duplicate_entry_id", "entry_id", "authorization_id"):
        if ev.get(key):
            parts.append(f"{key.replace('_', ' ')} {ev[key]}")
            break
    if ev.get("dead_letters"):
        parts.append(f"dead-lettered at {ev['dead_letters'][0]['target']}")
    return "; ".join(parts)


def _render(report: rec.Report, outcome: rec.PatchOutcome | None, limit: int) -> None:
    c = report.counts
    table = Table(title="reconciliation", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    rows = [
        ("authorizations accepted", f"{report.authorizations:,}"),
        ("ledger entries", f"{report.entries:,}"),
        (
            "posting file records",
            "not checked" if report.file_records is None else f"{report.file_records:,}",
        ),
        ("matched", f"{c['matched']:,}"),
        ("held / rejected (no posting)", f"{c['held']:,} / {c['rejected']:,}"),
        ("reversed on purpose", f"{c['reversed']:,}"),
        ("in flight", f"{c['in_flight']:,}"),
    ]
    for kind in rec.BREAK_KINDS:
        if c.get(kind):
            rows.append((f"break: {kind}", f"[red]{c[kind]:,}[/]"))
    rows.append(
        (
            "open breaks",
            "[green]0[/]" if report.open_breaks == 0 else f"[red]{report.open_breaks:,}[/]",
        )
    )
    rows.append(("took", f"{report.seconds:.2f} s"))
    for what, value in rows:
        table.add_row(what, value)
    console.print(table)
    if report.breaks:
        bt = Table(title=f"breaks (first {min(limit, len(report.breaks))})", title_justify="left")
        for col in ("break", "kind", "tenant", "day", "account", "evidence", "patch", "status"):
            bt.add_column(col, overflow="fold")
        for b in report.breaks[:limit]:
            bt.add_row(
                b.break_id,
                b.kind,
                b.tenant,
                b.day or "",
                b.account or "",
                _evidence_line(b),
                b.action,
                b.status,
            )
        console.print(bt)
    if outcome is not None:
        console.print(
            f"patched {outcome.patched}, held {outcome.held}, failed {outcome.failed}, "
            f"unchanged {outcome.unchanged}; {outcome.entries_posted} entries posted, "
            f"{outcome.exported} posting-file records written; trial balance zero: "
            + ("[green]yes[/]" if outcome.trial_balance_zero else "[red]NO[/]"),
            highlight=False,
        )


def _as_json(report: rec.Report, outcome: rec.PatchOutcome | None, dry_run: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"dry_run": dry_run, **msgspec.to_builtins(report)}
    out["breaks_total"] = len(report.breaks)
    if outcome is not None:
        out["outcome"] = msgspec.to_builtins(outcome.__dict__)
    return out


def reconcile(
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="Reconcile this tenant only (default: all).")
    ] = None,
    first: Annotated[
        str | None,
        typer.Option("--from", help="First day (YYYY-MM-DD, UTC, inclusive) of authorizations."),
    ] = None,
    last: Annotated[
        str | None,
        typer.Option("--to", help="Last day (YYYY-MM-DD, UTC, inclusive) of authorizations."),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Report the breaks and the patch plan; change nothing."),
    ] = False,
    as_json: JsonOption = False,
    every: Annotated[
        float | None,
        typer.Option("--every", min=0.1, help="Run continuously, every SECONDS (Ctrl-C stops)."),
    ] = None,
    config_path: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Matching criteria, tolerances and limits (YAML or JSON; docs/reconciliation.md).",
        ),
    ] = None,
    rules: Annotated[
        Path | None,
        typer.Option(
            "--rules",
            help="Rules file the pipeline ran with (re-driven authorizations go through it; "
            "default: the built-in rules).",
        ),
    ] = None,
    approve: Annotated[
        str | None,
        typer.Option(
            "--approve",
            help="Approve a held break by id: a held amount mismatch gets its adjustment, "
            "a held orphan is reversed.",
        ),
    ] = None,
    max_runs: Annotated[
        int | None,
        typer.Option("--max-runs", min=1, help="With --every: stop after this many runs."),
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", min=0, help="Breaks listed in the text output.")
    ] = 50,
    backend: BackendOption = "embedded",
    distributed_config: Annotated[
        Path | None,
        typer.Option(
            "--distributed-config",
            help="With --backend distributed: YAML file with bus_url, db_url, prefix (env "
            "PAYPOST_CONFIG); PAYPOST_BUS_URL / PAYPOST_DB_URL / PAYPOST_PREFIX override it.",
        ),
    ] = None,
    bus_url: BusUrlOption = None,
    db_url: DbUrlOption = None,
    prefix: PrefixOption = None,
) -> None:
    """Reconcile authorizations in, the ledger and the posting file, and patch every break.

    Classifies every accepted authorization (matched, held, rejected, in flight) and every
    break: missing, duplicate, mismatch, orphan, and the posting file's. A real run patches:
    missing → re-driven through the pipeline, duplicate → reversal entry, mismatch →
    adjustment entry (or held above the limit), orphan → held for review. Patching twice
    changes nothing. Exit status: 0 no open break, 1 breaks remain open, 2 usage error.
    """
    scope = rec.Scope(tenant=tenant, first_day=_day(first, "--from"), last_day=_day(last, "--to"))
    if scope.first_day and scope.last_day and scope.first_day > scope.last_day:
        raise UserError(f"--from {scope.first_day} is after --to {scope.last_day}: swap them.")
    config = load_config(config_path)
    if check_backend(backend) == "distributed":
        _distributed(
            data_dir, scope, config, dry_run=dry_run, as_json=as_json, limit=limit,
            every=every, max_runs=max_runs, approve=approve, rules=rules,
            settings=(distributed_config, bus_url, db_url, prefix),
        )  # fmt: skip
        return
    if any(v is not None for v in (distributed_config, bus_url, db_url, prefix)):
        raise UserError(
            "--distributed-config, --bus-url, --db-url and --prefix name a distributed "
            "pipeline: add --backend distributed (the embedded backend reads --data-dir)."
        )
    bus = open_bus(data_dir)
    try:
        if tenant is not None:
            known = [t for (t,) in bus.conn.execute("SELECT DISTINCT tenant FROM ledger_accounts")]
            if tenant not in known:
                raise UserError(
                    f"--tenant {tenant!r} has no accounts in this ledger "
                    f"(tenants: {', '.join(sorted(known)) or 'none'})."
                )
        if approve is not None:
            approved = rec.approve(bus, approve, export=exporter(bus, data_dir))
            if as_json:
                emit_json({"approved": approve, "outcome": msgspec.to_builtins(approved.__dict__)})
            else:
                console.print(
                    f"break {approve}: "
                    + (
                        "already patched" if approved.unchanged else f"patched ({approved.details})"
                    ),
                    highlight=False,
                )
            return

        def once(progress: rec.Progress | None) -> Outcome:
            return run_once(
                bus, data_dir, scope, config, dry_run=dry_run, rules=rules, progress=progress
            )

        _drive(once, dry_run=dry_run, as_json=as_json, limit=limit, every=every, max_runs=max_runs)
    finally:
        bus.close()


Outcome = tuple[rec.Report, rec.PatchOutcome | None]


def _drive(
    once: Callable[[rec.Progress | None], Outcome],
    *,
    dry_run: bool,
    as_json: bool,
    limit: int,
    every: float | None,
    max_runs: int | None,
) -> None:
    """One run (rendered; exit status 1 while breaks stay open) or, with EVERY, a loop."""
    if every is not None:
        _continuous(once, dry_run, every, as_json, max_runs)
        return
    interactive = not as_json and err_console.is_terminal
    with _progress(interactive) as progress:
        report, outcome = once(progress)
    if as_json:
        emit_json(_as_json(report, outcome, dry_run))
    else:
        _render(report, outcome, limit)
    still_open = report.open_breaks if outcome is None else outcome.held + outcome.failed
    if still_open:
        raise typer.Exit(1)


def _distributed(
    data_dir: Path,
    scope: rec.Scope,
    config: rec.ReconcileConfig,
    *,
    dry_run: bool,
    as_json: bool,
    limit: int,
    every: float | None,
    max_runs: int | None,
    approve: str | None,
    rules: Path | None,
    settings: tuple[Path | None, str | None, str | None, str | None],
) -> None:
    """`paypost reconcile --backend distributed`: the same report from the distributed
    pipeline's state (`paypost.distributed.reconcile`); patches where that backend can."""
    if approve is not None:
        raise UserError(
            "--approve is not supported with --backend distributed: held breaks are listed "
            "(status held) but approving them is embedded-only for now; post the correction "
            "with `paypost ledger` by hand, or reconcile an embedded run."
        )
    if rules is not None:
        raise UserError(
            "--rules is not supported with --backend distributed: missing authorizations are "
            "re-driven with the rules the job published for its workers (`paypost run "
            "--backend distributed --rules FILE` publishes them); drop --rules."
        )
    from paypost.distributed import reconcile as drec

    path, bus_url, db_url, prefix = settings
    with drec.open_reconciler(
        data_dir, path, bus_url=bus_url, db_url=db_url, prefix=prefix
    ) as reconciler:
        if scope.tenant is not None:
            known = reconciler.tenants()
            if scope.tenant not in known:
                raise UserError(
                    f"--tenant {scope.tenant!r} has no accounts in this ledger "
                    f"(tenants: {', '.join(known) or 'none'})."
                )

        built: list[DistributedPipeline] = []

        def redriver() -> DistributedPipeline:
            """The pipeline the job published (reference data, rules), on first need."""
            if not built:
                from paypost.distributed.runtime import load_pipeline

                built.append(load_pipeline(reconciler.bus, _vault_key(data_dir), wait_s=0))
            return built[0]

        def once(progress: rec.Progress | None) -> Outcome:
            report = reconciler.report(scope, config, progress or rec.no_progress)
            if dry_run:
                return report, None
            return report, drec.apply_patches(
                reconciler,
                report,
                config=config,
                redriver=redriver,
                progress=progress or rec.no_progress,
            )

        try:
            _drive(
                once, dry_run=dry_run, as_json=as_json, limit=limit, every=every, max_runs=max_runs
            )
        finally:
            for pipeline in built:
                pipeline.close()


def _vault_key(data_dir: Path) -> bytes:
    """The vault key the reference data was stored with (re-driving needs the holders)."""
    from paypost.security.tokens import (
        DEMO_KEY_FILENAME,
        load_configured_key,
        load_or_create_demo_key,
    )

    key = load_configured_key()
    if key is not None:
        return key
    if not (data_dir / DEMO_KEY_FILENAME).is_file():
        raise UserError(
            "re-driving needs the vault key the reference data was stored with: set "
            "PAYPOST_VAULT_KEY or PAYPOST_VAULT_KEY_FILE (or keep the demo's "
            f"{DEMO_KEY_FILENAME} in the data dir)."
        )
    key, _ = load_or_create_demo_key(data_dir)
    return key


def _continuous(
    run: Callable[[rec.Progress | None], Outcome],
    dry_run: bool,
    every: float,
    as_json: bool,
    max_runs: int | None,
) -> None:
    stop = threading.Event()

    def once() -> None:
        report, outcome = run(None)
        if as_json:
            emit_json(_as_json(report, outcome, dry_run))
        else:
            patched = "" if outcome is None else f", patched {outcome.patched}"
            console.print(
                f"{rec.now_text()} reconciled {report.authorizations:,} authorizations, "
                f"{report.entries:,} entries: {len(report.breaks)} breaks "
                f"({report.open_breaks} open){patched}",
                highlight=False,
            )

    def on_error(exc: BaseException) -> None:
        err_console.print(f"[bold red]reconcile run failed:[/] {exc}", highlight=False)

    try:
        rec.run_every(every, once, stop=stop, on_error=on_error, max_runs=max_runs)
    except KeyboardInterrupt:
        stop.set()
        err_console.print("stopped.")
