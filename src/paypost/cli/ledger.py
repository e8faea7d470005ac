"""`paypost ledger balance|entries|trial-balance`: read the double-entry ledger.

Embedded: the ledger tables of DATA_DIR/paypost.db (SQLite). Distributed: `--db-url
postgresql://...` (or PAYPOST_DB_URL) reads the PostgreSQL ledger, one schema per tenant
under `--pg-prefix`. Read-only: these commands never post.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from paypost.cli.common import DataDirOption, JsonOption, console, emit_json
from paypost.config import DEFAULT_DATA_DIR, UserError
from paypost.ledger.model import LedgerError, LedgerStore, PostedEntry
from paypost.money import Money

app = typer.Typer(
    help="The double-entry ledger: balances, account statements, trial balance.",
    no_args_is_help=True,
)

DEFAULT_TENANT = "default"
DB_FILENAME = "paypost.db"  # the one embedded database file (bus, ledger, stage state)

TenantOption = Annotated[
    str,
    typer.Option(
        "--tenant", envvar="PAYPOST_TENANT", help="Tenant whose ledger to read.", show_default=True
    ),
]
DbUrlOption = Annotated[
    str | None,
    typer.Option(
        "--db-url",
        envvar="PAYPOST_DB_URL",
        help="PostgreSQL URL (postgresql://...) of a distributed ledger; default: the embedded "
        "SQLite ledger in DATA_DIR/paypost.db.",
    ),
]
PrefixOption = Annotated[
    str,
    typer.Option(
        "--pg-prefix",
        envvar="PAYPOST_PG_PREFIX",
        help="Schema prefix of the PostgreSQL ledger (schemas are <prefix>_<tenant>).",
        show_default=True,
    ),
]


@contextmanager
def _store(data_dir: Path, db_url: str | None, prefix: str) -> Iterator[LedgerStore]:
    store: LedgerStore
    if db_url:
        if not db_url.startswith(("postgresql://", "postgres://")):
            raise UserError(
                f"--db-url {db_url!r} is not a PostgreSQL URL; expected postgresql://user@host/db "
                "(leave it out to read the embedded SQLite ledger)"
            )
        import psycopg

        from paypost.ledger.postgres import PostgresLedger

        try:
            store = PostgresLedger(db_url, prefix=prefix)
        except psycopg.OperationalError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "no reason given"
            raise UserError(
                f"cannot connect to PostgreSQL at {db_url!r}: {first}. "
                "Check the URL and that the server is running."
            ) from None
        except ValueError as exc:
            raise UserError(f"--pg-prefix: {exc}") from None
    else:
        from paypost.ledger.sqlite import SqliteLedger

        path = data_dir / DB_FILENAME
        try:
            store = SqliteLedger.open(path, create=False)
        except LedgerError as exc:
            raise UserError(
                f"{exc}. Run the pipeline first (paypost demo), or pass --data-dir (or set "
                "PAYPOST_DATA_DIR) to the directory that holds paypost.db, or --db-url for "
                "PostgreSQL."
            ) from None
    try:
        yield store
    except LedgerError as exc:
        raise UserError(str(exc)) from None
    finally:
        store.close()


def _parse_time(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise UserError(
            f"{option} {value!r} is not an ISO 8601 date or time; use e.g. 2026-11-21 or "
            "2026-11-21T16:00:00Z"
        ) from None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def _money_json(m: Money) -> dict[str, Any]:
    return {"minor": m.minor, "currency": m.currency, "formatted": m.format()}


@app.command()
def balance(
    account_arg: Annotated[
        str | None, typer.Argument(metavar="ACCOUNT", help="Account id.", show_default=False)
    ] = None,
    account: Annotated[
        str | None, typer.Option("--account", help="Account id (instead of the argument).")
    ] = None,
    tenant: TenantOption = DEFAULT_TENANT,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    db_url: DbUrlOption = None,
    pg_prefix: PrefixOption = "paypost",
    as_json: JsonOption = False,
) -> None:
    """The balance of one account (credits − debits, in its currency)."""
    account_id = account or account_arg
    if not account_id:
        raise UserError("give the account: paypost ledger balance ACCOUNT (or --account ACCOUNT)")
    with _store(data_dir, db_url, pg_prefix) as store:
        b = store.balance(tenant, account_id)
    if as_json:
        emit_json(
            {
                "tenant": b.tenant,
                "account": b.account,
                "balance": _money_json(b.balance),
                "debits": b.debits,
                "credits": b.credits,
                "legs": b.entries,
            }
        )
        return
    console.print(
        f"[bold]{b.account}[/] (tenant {b.tenant}): [bold]{b.balance}[/]  "
        f"debits {Money(b.debits, b.balance.currency).format()}, "
        f"credits {Money(b.credits, b.balance.currency).format()}, {b.entries} leg(s)",
        highlight=False,
    )


def _entry_json(e: PostedEntry) -> dict[str, Any]:
    return {
        "id": e.id,
        "position": e.position,
        "booked_at": e.booked_at.isoformat(),
        "posted_at": e.posted_at.isoformat(),
        "sequence_id": e.sequence_id,
        "source_event_id": e.source_event_id,
        "reversal_of": e.reversal_of,
        "description": e.description,
        "metadata": e.metadata,
        "legs": [
            {"account": lg.account, "side": lg.side, "amount": _money_json(lg.amount)}
            for lg in e.legs
        ],
    }


@app.command()
def entries(
    account: Annotated[str, typer.Option("--account", help="Account id.", show_default=False)],
    from_: Annotated[
        str | None,
        typer.Option("--from", help="Booked at or after (ISO 8601; UTC if no zone)."),
    ] = None,
    to: Annotated[
        str | None, typer.Option("--to", help="Booked before (ISO 8601; UTC if no zone).")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=0, help="Page size.")] = 50,
    offset: Annotated[int, typer.Option("--offset", min=0, help="Entries to skip.")] = 0,
    tenant: TenantOption = DEFAULT_TENANT,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    db_url: DbUrlOption = None,
    pg_prefix: PrefixOption = "paypost",
    as_json: JsonOption = False,
) -> None:
    """The journal entries touching an account, oldest first (a paginated statement)."""
    start, end = _parse_time(from_, "--from"), _parse_time(to, "--to")
    with _store(data_dir, db_url, pg_prefix) as store:
        found = store.entries(tenant, account, start=start, end=end, limit=limit, offset=offset)
    if as_json:
        emit_json(
            {
                "tenant": tenant,
                "account": account,
                "offset": offset,
                "limit": limit,
                "entries": [_entry_json(e) for e in found],
            }
        )
        return
    table = Table(title=f"entries of {account} (tenant {tenant}), from #{offset + 1}")
    for col in ("position", "booked at (UTC)", "entry", "this account", "other legs", "note"):
        table.add_column(col, justify="right" if col in ("position", "this account") else "left")
    for e in found:
        mine = sum(
            lg.amount.minor if lg.side == "credit" else -lg.amount.minor
            for lg in e.legs
            if lg.account == account
        )
        cur = next(lg.amount.currency for lg in e.legs if lg.account == account)
        others = ", ".join(
            f"{'Dr' if lg.side == 'debit' else 'Cr'} {lg.account} {lg.amount}"
            for lg in e.legs
            if lg.account != account
        )
        note = e.description or ""
        if e.reversal_of:
            note = (note + " " if note else "") + f"(reverses {e.reversal_of})"
        table.add_row(
            str(e.position),
            e.booked_at.strftime("%Y-%m-%d %H:%M:%S"),
            e.id,
            str(Money(mine, cur)),
            others,
            note,
        )
    console.print(table)
    if not found:
        console.print("no entries in this range/page", style="dim")


@app.command("trial-balance")
def trial_balance(
    tenant: Annotated[
        str | None,
        typer.Option(
            "--tenant", envvar="PAYPOST_TENANT", help="Only this tenant (default: every tenant)."
        ),
    ] = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    db_url: DbUrlOption = None,
    pg_prefix: PrefixOption = "paypost",
    as_json: JsonOption = False,
) -> None:
    """Per tenant and currency: debits, credits and net (must be zero); exit 1 if not."""
    with _store(data_dir, db_url, pg_prefix) as store:
        tenants = [tenant] if tenant else store.tenants()
        try:
            results = [store.trial_balance(t) for t in tenants]
        except AssertionError as exc:  # the invariant check itself: report, exit non-zero
            console.print(f"[bold red]LEDGER OUT OF BALANCE:[/] {exc}", highlight=False)
            raise typer.Exit(1) from None
    if as_json:
        emit_json(
            {
                "tenants": [
                    {
                        "tenant": tb.tenant,
                        "balanced": tb.balanced,
                        "currencies": [
                            {
                                "currency": line.currency,
                                "debits": line.debits,
                                "credits": line.credits,
                                "net": line.net,
                                "accounts": line.accounts,
                            }
                            for line in tb.lines
                        ],
                    }
                    for tb in results
                ]
            }
        )
        return
    if not results:
        console.print("no tenants have a ledger yet", style="dim")
    for tb in results:
        table = Table(title=f"trial balance, tenant {tb.tenant}")
        for col in ("currency", "accounts", "debits", "credits", "net"):
            table.add_column(col, justify="left" if col == "currency" else "right")
        for line in tb.lines:
            table.add_row(
                line.currency,
                str(line.accounts),
                Money(line.debits, line.currency).format(),
                Money(line.credits, line.currency).format(),
                Money(line.net, line.currency).format(),
            )
        console.print(table)
        console.print(
            "[green]balanced[/]: every currency nets to zero"
            if tb.balanced
            else "[bold red]NOT balanced[/]"
        )
