"""`paypost dlq …`, `paypost replay`, `paypost bus …`: operate the bus (docs/bus.md).

Thin entrypoints over the `Bus` interface: the embedded `SqliteBus` on `<data-dir>/paypost.db`
by default, or the distributed `NatsBus` with `--backend distributed` (docs/deployment.md):
parse, call, render (a rich table, or JSON with --json).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import msgspec
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from paypost.bus.core import ArchiveQuery, Bus, BusConfig, DeadLetter, format_time, parse_time
from paypost.bus.sqlite import DB_FILENAME, SqliteBus
from paypost.cli.common import (
    DEFAULT_DATA_DIR_VALUE,
    DataDirOption,
    JsonOption,
    console,
    emit_json,
    err_console,
    fail,
    load_json_arg,
)
from paypost.cli.distributed import (
    BackendOption,
    BusUrlOption,
    ConfigOption,
    DbUrlOption,
    PrefixOption,
    check_backend,
)
from paypost.config import UserError

P = ParamSpec("P")
R = TypeVar("R")

dlq_app = typer.Typer(
    help="Dead-letter queues: events a target gave up on, with the reason.",
    no_args_is_help=True,
)
bus_app = typer.Typer(
    help="The event bus: statistics and archive maintenance.", no_args_is_help=True
)

TargetOption = Annotated[
    str | None, typer.Option("--target", "-t", help="Only this target (see `paypost bus stats`).")
]
PatternOption = Annotated[
    str | None,
    typer.Option(
        "--pattern",
        "-p",
        help='Only events matching this EventBridge pattern: inline JSON (\'{"source": '
        '["paypost.ingest"]}\') or a .json file.',
    ),
]


def register(app: typer.Typer) -> None:
    """Attach `dlq`, `replay` and `bus` to the paypost app."""
    app.add_typer(dlq_app, name="dlq")
    app.command("replay")(replay)
    app.add_typer(bus_app, name="bus")


@dataclass(frozen=True)
class BusChoice:
    """Which bus a command operates: embedded (the data dir) or distributed (NATS + PG)."""

    backend: str = "embedded"
    config: Path | None = None
    bus_url: str | None = None
    db_url: str | None = None
    prefix: str | None = None


def _choose(
    ctx: typer.Context,
    backend: BackendOption = "embedded",
    config: ConfigOption = None,
    bus_url: BusUrlOption = None,
    db_url: DbUrlOption = None,
    prefix: PrefixOption = None,
) -> None:
    """Options of the group (before the subcommand): which bus to operate."""
    ctx.obj = BusChoice(check_backend(backend), config, bus_url, db_url, prefix)


dlq_app.callback()(_choose)
bus_app.callback()(_choose)


def _choice(ctx: typer.Context) -> BusChoice:
    return ctx.obj if isinstance(ctx.obj, BusChoice) else BusChoice()


def user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Print a UserError (bad time, pattern, target, ...) without a traceback, exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            fail(str(exc))

    return wrapper


@contextmanager
def open_bus(
    data_dir: Path, config: BusConfig | None = None, choice: BusChoice | None = None
) -> Iterator[Bus]:
    bus: Bus
    if choice is not None and choice.backend == "distributed":
        from paypost.distributed.runtime import load_settings
        from paypost.distributed.runtime import open_bus as open_distributed

        settings = load_settings(
            choice.config, bus_url=choice.bus_url, db_url=choice.db_url, prefix=choice.prefix
        )
        bus = open_distributed(settings, sweep=False, **({"config": config} if config else {}))
    else:
        path = data_dir / DB_FILENAME
        if not path.exists():
            raise UserError(
                f"no paypost database at {str(path)!r}. Pass --data-dir (or set "
                "PAYPOST_DATA_DIR) to the directory the pipeline runs in, or --backend "
                "distributed for the NATS + PostgreSQL bus."
            )
        bus = SqliteBus.open(data_dir, config)
    try:
        yield bus
    finally:
        bus.close()


def _pattern(value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    pattern = load_json_arg(value, "--pattern")
    if not isinstance(pattern, dict):
        raise UserError('--pattern: an event pattern is a JSON object, e.g. \'{"source": ["x"]}\'.')
    return pattern


def _dead_json(d: DeadLetter) -> dict[str, Any]:
    return {
        "id": d.id,
        "target": d.target,
        "error": d.error,
        "attempts": d.attempts,
        "first_attempt_at": format_time(d.first_attempt_at),
        "last_attempt_at": format_time(d.last_attempt_at),
        "dead_lettered_at": format_time(d.dead_lettered_at),
        "event": d.event.to_dict(),
    }


# -- paypost dlq ---------------------------------------------------------------------------


@dlq_app.command("list")
@user_errors
def dlq_list(
    ctx: typer.Context,
    target: TargetOption = None,
    pattern: PatternOption = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="Show at most this many.")] = 100,
    json: JsonOption = False,
    data_dir: DataDirOption = DEFAULT_DATA_DIR_VALUE,
) -> None:
    """List dead letters (oldest first): id, target, event, attempts, error."""
    with open_bus(data_dir, choice=_choice(ctx)) as bus:
        dead = bus.dlq_list(target=target, pattern=_pattern(pattern), limit=limit)
    if json:
        emit_json([_dead_json(d) for d in dead])
        return
    if not dead:
        console.print("no dead letters" + (f" for target {target!r}" if target else ""))
        return
    if console.width < 150:  # too narrow for a table: two lines per dead letter
        for d in dead:
            console.print(
                f"[bold]#{d.id}[/] {format_time(d.dead_lettered_at)}  {d.target}  "
                f"attempts={d.attempts}  {d.event.detail_type}",
                highlight=False,
            )
            console.print(f"    event {d.event.id}", highlight=False)
            console.print(
                "    " + d.error, highlight=False, markup=False, overflow="ellipsis", no_wrap=True
            )
        return
    table = Table()
    table.add_column("id", no_wrap=True, justify="right")
    table.add_column("target", no_wrap=True)
    table.add_column("event id", no_wrap=True)
    table.add_column("detail-type", no_wrap=True)
    table.add_column("att.", no_wrap=True, justify="right")
    table.add_column("dead-lettered", no_wrap=True)
    table.add_column("error", overflow="ellipsis", no_wrap=True, ratio=1)
    for d in dead:
        error = d.error if len(d.error) <= 80 else d.error[:79] + "…"
        table.add_row(
            str(d.id),
            d.target,
            d.event.id,
            d.event.detail_type,
            str(d.attempts),
            format_time(d.dead_lettered_at),
            error,
        )
    console.print(table)


@dlq_app.command("show")
@user_errors
def dlq_show(
    ctx: typer.Context,
    entry_id: Annotated[int, typer.Argument(help="Dead-letter id (from `paypost dlq list`).")],
    json: JsonOption = False,
    data_dir: DataDirOption = DEFAULT_DATA_DIR_VALUE,
) -> None:
    """Show one dead letter: the full event, the error and the attempt history."""
    with open_bus(data_dir, choice=_choice(ctx)) as bus:
        dead = bus.dlq_get(entry_id)
    doc = _dead_json(dead)
    if json:
        emit_json(doc)
        return
    for key in ("id", "target", "attempts", "first_attempt_at", "last_attempt_at"):
        console.print(f"[bold]{key}[/]: {doc[key]}", highlight=False)
    console.print(f"[bold]dead_lettered_at[/]: {doc['dead_lettered_at']}", highlight=False)
    console.print("[bold]error[/]: ", end="")
    console.print(dead.error, highlight=False, markup=False)
    console.print("[bold]event[/]:")
    console.print_json(data=doc["event"])


@dlq_app.command("redrive")
@user_errors
def dlq_redrive(
    ctx: typer.Context,
    target: TargetOption = None,
    pattern: PatternOption = None,
    ids: Annotated[
        list[int] | None, typer.Option("--id", help="Only these dead-letter ids (repeatable).")
    ] = None,
    json: JsonOption = False,
    data_dir: DataDirOption = DEFAULT_DATA_DIR_VALUE,
) -> None:
    """Put dead letters back on their target's queue with a fresh attempt count.

    Redrive once the cause is fixed (e.g. the account exists now). The consumer's tracking
    record makes a redriven event that was in fact processed a no-op.
    """
    with open_bus(data_dir, choice=_choice(ctx)) as bus:
        n = bus.dlq_redrive(target=target, pattern=_pattern(pattern), ids=ids)
    if json:
        emit_json({"redriven": n})
    else:
        console.print(f"redriven: {n}")


# -- paypost replay ------------------------------------------------------------------------


@user_errors
def replay(
    start: Annotated[
        str,
        typer.Option(
            "--from",
            help="Start of the archive time range, RFC 3339 (inclusive).",
            show_default=False,
        ),
    ],
    end: Annotated[
        str,
        typer.Option("--to", help="End of the range, RFC 3339 (exclusive).", show_default=False),
    ],
    pattern: PatternOption = None,
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            "-t",
            help="Re-deliver only to this target (through its rules); default: the whole bus.",
        ),
    ] = None,
    json: JsonOption = False,
    data_dir: DataDirOption = DEFAULT_DATA_DIR_VALUE,
    backend: BackendOption = "embedded",
    config: ConfigOption = None,
    bus_url: BusUrlOption = None,
    db_url: DbUrlOption = None,
    prefix: PrefixOption = None,
) -> None:
    """Re-deliver archived events (same ids) by time range and pattern.

    Events are routed again through the rules (all, or only TARGET's). Consumers' tracking
    records make events they already processed no-ops, so a replay is safe to repeat.
    """
    query = ArchiveQuery(
        start=parse_time(start, "--from"), end=parse_time(end, "--to"), pattern=_pattern(pattern)
    )
    choice = BusChoice(check_backend(backend), config, bus_url, db_url, prefix)
    with open_bus(data_dir, choice=choice) as bus:
        if target is not None:
            bus.target(target)
        with Progress(
            TextColumn("replay"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
            disable=json,
        ) as progress:
            task = progress.add_task("replay", total=None)

            def tick(done: int, total: int) -> None:
                if done % 500 == 0 or done == total:
                    progress.update(task, completed=done, total=total)

            result = bus.replay(query, target=target, progress=tick)
    if json:
        emit_json(
            {
                "from": format_time(query.start),
                "to": format_time(query.end),
                "scanned": result.scanned,
                "matched": result.matched,
                "routed": result.routed,
            }
        )
        return
    routed = ", ".join(f"{t}={n}" for t, n in sorted(result.routed.items()))
    console.print(
        f"scanned {result.scanned} archived events, {result.matched} matched; "
        f"re-delivered: {routed or 'none (no rule matched)'}",
        highlight=False,
    )


# -- paypost bus ---------------------------------------------------------------------------


@bus_app.command("stats")
@user_errors
def bus_stats(
    ctx: typer.Context,
    json: JsonOption = False,
    data_dir: DataDirOption = DEFAULT_DATA_DIR_VALUE,
) -> None:
    """Per target: queued, delayed (retry backoff), in flight, dead-lettered, routed; and the
    archive size, duplicates dropped and id conflicts."""
    with open_bus(data_dir, choice=_choice(ctx)) as bus:
        stats = bus.stats()
        outbox = bus.outbox_size() if hasattr(bus, "outbox_size") else None
        # distributed: a bundling target's queue counts messages (up to `bundle` events each)
        bundled = (
            {t.name: t.bundle for t in bus.targets() if t.bundle > 1} if outbox is not None else {}
        )
    if json:
        doc = msgspec.to_builtins(stats)
        if outbox is not None:
            doc["outbox"] = outbox  # distributed: output events committed, not yet published
            doc["bundled_targets"] = bundled  # their queued/delayed/in_flight count messages
        emit_json(doc)
        return
    table = Table("target", "queued", "delayed", "in flight", "dead-lettered", "routed total")
    for t in stats.targets:
        table.add_row(
            f"{t.name} *" if t.name in bundled else t.name,
            str(t.queued),
            str(t.delayed),
            str(t.in_flight),
            str(t.dead_lettered),
            str(t.routed_total),
        )
    console.print(table)
    console.print(
        f"archived: {stats.archived}   duplicates dropped: {stats.duplicates_dropped}   "
        f"id conflicts: {stats.id_conflicts}"
        + ("" if outbox is None else f"   outbox rows waiting: {outbox}"),
        highlight=False,
    )
    if bundled:
        console.print(
            "* queued, delayed and in flight count queue messages there: a message bundles up "
            f"to {max(bundled.values())} events of one unit of work (dead-lettered and routed "
            "count events).",
            highlight=False,
        )


@bus_app.command("config")
@user_errors
def bus_config(
    ctx: typer.Context,
    json: JsonOption = False,
    data_dir: DataDirOption = DEFAULT_DATA_DIR_VALUE,
) -> None:
    """The targets (batch size, linger, concurrency, rate limit, retry, lease) and the rules
    (name, pattern, target) stored in the database — what the pipeline runs."""
    with open_bus(data_dir, choice=_choice(ctx)) as bus:
        targets, rules = bus.targets(), bus.rules()
    if json:
        emit_json({"targets": targets, "rules": rules})
        return
    table = Table("target", "batch", "linger ms", "concurrency", "rate/s")
    table.add_column("retry: attempts, backoff", no_wrap=True)
    table.add_column("lease s")
    for t in targets:
        r = t.retry
        table.add_row(
            t.name,
            str(t.batch_size),
            str(t.linger_ms),
            str(t.concurrency),
            "-" if t.rate_limit_per_s is None else f"{t.rate_limit_per_s:g}",
            f"{r.max_attempts}, {r.base_delay_s:g}–{r.max_delay_s:g} s"
            + (" jittered" if r.jitter else ""),
            f"{t.lease_s:g}",
        )
    console.print(table)
    rule_table = Table("rule", "target", "pattern")
    for rule in rules:
        rule_table.add_row(rule.name, rule.target, msgspec.json.encode(rule.pattern).decode())
    console.print(rule_table)


@bus_app.command("purge")
@user_errors
def bus_purge(
    ctx: typer.Context,
    retention_days: Annotated[
        float,
        typer.Option(
            "--retention-days", min=0, help="Drop archived events older than this many days."
        ),
    ] = 30.0,
    json: JsonOption = False,
    data_dir: DataDirOption = DEFAULT_DATA_DIR_VALUE,
) -> None:
    """Apply archive retention. Events still queued or dead-lettered are always kept."""
    retention_s = retention_days * 86400.0
    config = BusConfig(archive_retention_s=retention_s, dedup_window_s=min(86400.0, retention_s))
    with open_bus(data_dir, config, _choice(ctx)) as bus:
        n = bus.purge_archive()
    if json:
        emit_json({"purged": n})
    else:
        console.print(f"purged {n} archived events older than {retention_days:g} days")
