"""`paypost quarantine list|show`: records ingest set aside (malformed, card number in another
field, response without request, request timed out, PAN mismatch).

Reads the `ingest_quarantine` table, read-only: of the embedded database (DATA_DIR/paypost.db)
by default, or of the distributed pipeline's PostgreSQL state with `paypost quarantine
--backend distributed` (PAYPOST_DB_URL, PAYPOST_PREFIX; docs/deployment.md). Same output either
way. Every stored record has its card numbers masked (first 6, last 4).
"""

from __future__ import annotations

import sqlite3
from contextlib import AbstractContextManager
from functools import partial
from pathlib import Path
from typing import Annotated, Protocol

import msgspec
import typer
from rich.table import Table

from paypost.cli.common import DataDirOption, JsonOption, console, emit_json
from paypost.cli.readers import add_backend_options, backend_flag, open_reader
from paypost.config import DEFAULT_DATA_DIR, UserError
from paypost.stages.ingest import QuarantineEntry, get_quarantine, list_quarantine

KINDS = ("malformed", "pan-in-field", "orphan-response", "response-timeout", "pan-mismatch")

app = typer.Typer(
    help="Records ingest quarantined: where they were, why, and their content (PANs masked).",
    no_args_is_help=True,
)

add_backend_options(app)


def _open(data_dir: Path) -> sqlite3.Connection:
    from paypost.bus.sqlite import DB_FILENAME

    path = data_dir / DB_FILENAME
    if not path.is_file():
        raise UserError(
            f"no paypost database at {str(path)!r}: ingest something first (paypost demo), "
            "or pass --data-dir (or set PAYPOST_DATA_DIR) to the directory that holds it, "
            "or read the distributed pipeline's with `paypost quarantine --backend distributed`"
        )
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    found = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'ingest_quarantine'"
    ).fetchone()
    if found is None:
        conn.close()
        raise UserError(
            f"the database {str(path)!r} has no ingest tables yet: nothing was ingested there"
        )
    return conn


class QuarantineReader(Protocol):
    """What `list` and `show` read; `paypost.distributed.queries.StateReader` on PostgreSQL."""

    def list_quarantine(
        self, *, source: str | None, kind: str | None, limit: int
    ) -> list[QuarantineEntry]: ...

    def get_quarantine(self, entry_id: int) -> QuarantineEntry | None: ...


class _EmbeddedQuarantine:
    """The embedded queries (paypost.stages.ingest) behind the `StateReader` method names."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def list_quarantine(
        self, *, source: str | None, kind: str | None, limit: int
    ) -> list[QuarantineEntry]:
        return list_quarantine(self.conn, source=source, kind=kind, limit=limit)

    def get_quarantine(self, entry_id: int) -> QuarantineEntry | None:
        return get_quarantine(self.conn, entry_id)


def _reader(ctx: typer.Context, data_dir: Path) -> AbstractContextManager[QuarantineReader]:
    """The quarantined records of the chosen backend (read-only), closed on exit."""
    return open_reader(ctx, partial(_open, data_dir), _EmbeddedQuarantine)


@app.command("list")
def list_cmd(
    ctx: typer.Context,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    source: Annotated[
        str | None, typer.Option("--source", help="Only this source (its configured name).")
    ] = None,
    kind: Annotated[
        str | None, typer.Option("--kind", help=f"Only this kind: {', '.join(KINDS)}.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 100,
    json: JsonOption = False,
) -> None:
    """List quarantined records, oldest first."""
    if kind is not None and kind not in KINDS:
        raise UserError(f"--kind {kind!r} is not one of {', '.join(KINDS)}")
    with _reader(ctx, data_dir) as reader:
        entries = reader.list_quarantine(source=source, kind=kind, limit=limit)
    if json:
        emit_json([msgspec.structs.asdict(e) for e in entries])
        return
    if not entries:
        console.print("no quarantined records")
        return
    table = Table("id", "source", "tenant", "line/row", "kind", "reason")
    for e in entries:
        where = f"line {e.line}" if e.line is not None else f"row {e.position}"
        table.add_row(str(e.id), e.source, e.tenant, where, e.kind, e.reason)
    console.print(table)


@app.command("show")
def show_cmd(
    ctx: typer.Context,
    entry_id: Annotated[int, typer.Argument(help="The quarantine id (from `list`).")],
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    json: JsonOption = False,
) -> None:
    """Show one quarantined record in full (card numbers masked)."""
    with _reader(ctx, data_dir) as reader:
        entry = reader.get_quarantine(entry_id)
    if entry is None:
        raise UserError(
            f"no quarantined record with id {entry_id}: see "
            f"`paypost quarantine{backend_flag(ctx)} list` for ids"
        )
    if json:
        emit_json(msgspec.structs.asdict(entry))
        return
    where = f"line {entry.line} (byte {entry.position})" if entry.line else f"row {entry.position}"
    console.print(f"[bold]#{entry.id}[/] {entry.kind} — {entry.source} {where}", highlight=False)
    console.print(f"tenant:  {entry.tenant}", highlight=False)
    console.print(f"when:    {entry.quarantined_at}", highlight=False)
    console.print(f"reason:  {entry.reason}", highlight=False)
    console.print("record:", highlight=False)
    console.print(entry.record, highlight=False, markup=False, soft_wrap=True)
