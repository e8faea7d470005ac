"""`paypost parked list|show`: the authorizations the duplicate check parked (FR3).

Reads the `dedup_parked` table, read-only: of the embedded database (DATA_DIR/paypost.db) by
default, or of the distributed pipeline's PostgreSQL state with `paypost parked --backend
distributed` (PAYPOST_DB_URL, PAYPOST_PREFIX; docs/deployment.md). Same output either way.
Parked records carry the masked PAN and the card token only, never a card number.
"""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Protocol

import msgspec
import typer
from rich.table import Table

from paypost.cli.common import DataDirOption, JsonOption, console, emit_json
from paypost.cli.readers import add_backend_options, backend_flag, open_reader
from paypost.config import DEFAULT_DATA_DIR, UserError
from paypost.money import Money
from paypost.stages.dedup import (
    PARK_REASONS,
    ParkedRecord,
    count_parked,
    find_parked_by_prefix,
    get_parked,
    list_parked,
)

app = typer.Typer(
    help="Authorizations parked by the duplicate check (duplicates, id conflicts, late).",
    no_args_is_help=True,
)

TenantOption = Annotated[
    str | None, typer.Option("--tenant", help="Only this tenant's parked authorizations.")
]
ReasonOption = Annotated[
    str | None,
    typer.Option("--reason", help=f"Only this reason: {', '.join(PARK_REASONS)}."),
]

add_backend_options(app)


def _open(data_dir: Path) -> sqlite3.Connection:
    from paypost.bus.sqlite import DB_FILENAME

    path = data_dir / DB_FILENAME
    if not path.is_file():
        raise UserError(
            f"no paypost database at {str(path)!r}: run the pipeline first (paypost demo), "
            "or pass --data-dir (or set PAYPOST_DATA_DIR) to the directory that holds it, "
            "or read the distributed pipeline's with `paypost parked --backend distributed`"
        )
    try:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise UserError(f"cannot open the paypost database {str(path)!r}: {exc}") from exc


class ParkedReader(Protocol):
    """What `list` and `show` read; `paypost.distributed.queries.StateReader` on PostgreSQL."""

    def list_parked(
        self, *, tenant: str | None, reason: str | None, limit: int, offset: int
    ) -> list[ParkedRecord]: ...

    def get_parked(self, event_id: str) -> ParkedRecord | None: ...

    def find_parked_by_prefix(self, prefix: str) -> ParkedRecord | None: ...

    def count_parked(self) -> dict[str, int]: ...


class _EmbeddedParked:
    """The embedded queries (paypost.stages.dedup) behind the `StateReader` method names."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def list_parked(
        self, *, tenant: str | None, reason: str | None, limit: int, offset: int
    ) -> list[ParkedRecord]:
        return list_parked(self.conn, tenant=tenant, reason=reason, limit=limit, offset=offset)

    def get_parked(self, event_id: str) -> ParkedRecord | None:
        return get_parked(self.conn, event_id)

    def find_parked_by_prefix(self, prefix: str) -> ParkedRecord | None:
        return find_parked_by_prefix(self.conn, prefix)

    def count_parked(self) -> dict[str, int]:
        return count_parked(self.conn)


def _reader(ctx: typer.Context, data_dir: Path) -> AbstractContextManager[ParkedReader]:
    """The parked records of the chosen backend (read-only), closed on exit."""
    return open_reader(ctx, partial(_open, data_dir), _EmbeddedParked)


def _amount(record: ParkedRecord) -> str:
    try:
        raw = record.event["detail"]["request"]["amount"]
        return str(Money(raw["minor"], raw["currency"]))
    except (KeyError, TypeError, ValueError):
        return "?"


def _summary(record: ParkedRecord) -> dict[str, Any]:
    req = record.event.get("detail", {}).get("request", {})
    return {
        "event_id": record.event_id,
        "input_event_id": record.input_event_id,
        "tenant": record.tenant,
        "reason": record.reason,
        "business_key": record.business_key,
        "original_event_id": record.original_event_id,
        "transmission_time": record.transmission_time,
        "parked_at": record.parked_at,
        "pan_masked": req.get("pan_masked"),
        "amount": req.get("amount"),
        "merchant": (req.get("merchant") or {}).get("name"),
    }


@app.command("list")
def list_command(
    ctx: typer.Context,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    tenant: TenantOption = None,
    reason: ReasonOption = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 100,
    offset: Annotated[int, typer.Option("--offset", min=0, help="Skip this many first.")] = 0,
    as_json: JsonOption = False,
) -> None:
    """List parked authorizations, oldest first (filter by --tenant and --reason)."""
    if reason is not None and reason not in PARK_REASONS:
        raise UserError(
            f"--reason {reason!r} is not a parking reason; use one of {', '.join(PARK_REASONS)}"
        )
    with _reader(ctx, data_dir) as reader:
        records = reader.list_parked(tenant=tenant, reason=reason, limit=limit, offset=offset)
        totals = reader.count_parked()
    if as_json:
        emit_json({"parked": [_summary(r) for r in records], "totals": totals})
        return
    if not records:
        console.print("no parked authorizations" + (" matching the filters" if totals else ""))
        return
    shown = ", ".join(f"{k} {v}" for k, v in sorted(totals.items()))
    table = Table(title=f"parked authorizations: {len(records)} shown (in all: {shown})")
    for column in ("id", "tenant", "reason", "amount", "card", "merchant", "transmitted"):
        table.add_column(column, no_wrap=column in ("id", "amount", "card"))
    for r in records:
        s = _summary(r)
        table.add_row(
            r.event_id[:8],
            r.tenant,
            r.reason,
            _amount(r),
            str(s["pan_masked"]),
            str(s["merchant"]),
            r.transmission_time,
        )
    console.print(table)
    console.print(
        f"details: paypost parked{backend_flag(ctx)} show ID (an id prefix of 8+ characters "
        "is enough)",
        highlight=False,
    )


@app.command("show")
def show_command(
    ctx: typer.Context,
    event_id: Annotated[
        str, typer.Argument(help="The parked event's id, or the id of the event that was parked.")
    ],
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Show one parked authorization in full (the DuplicateParked event)."""
    with _reader(ctx, data_dir) as reader:
        record = reader.get_parked(event_id)
        if record is None and len(event_id) >= 8:
            record = reader.find_parked_by_prefix(event_id)
    if record is None:
        raise UserError(
            f"no parked authorization with id {event_id!r}; list them with "
            f"`paypost parked{backend_flag(ctx)} list`"
        )
    if as_json:
        emit_json(record)
        return
    console.print(f"[bold]{record.reason}[/] parked at {record.parked_at} (tenant {record.tenant})")
    console.print(f"  parked event id   {record.event_id}")
    console.print(f"  input event id    {record.input_event_id}")
    console.print(f"  original event id {record.original_event_id or '-'}")
    console.print(f"  business key      {record.business_key}")
    console.print(f"  transmission time {record.transmission_time}")
    console.print(f"  amount            {_amount(record)}")
    console.print_json(msgspec.json.encode(record.event["detail"]).decode())
