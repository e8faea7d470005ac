"""`paypost quarantine list|show`: records ingest set aside (malformed, card number in another
field, response without request, request timed out, PAN mismatch).

Reads the `ingest_quarantine` table of the embedded database (DATA_DIR/paypost.db),
read-only. Every stored record has its card numbers masked (first 6, last 4).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Annotated

import msgspec
import typer
from rich.table import Table

from paypost.cli.common import DataDirOption, JsonOption, console, emit_json
from paypost.config import DEFAULT_DATA_DIR, UserError
from paypost.stages.ingest import QuarantineEntry, get_quarantine, list_quarantine

KINDS = ("malformed", "pan-in-field", "orphan-response", "response-timeout", "pan-mismatch")

app = typer.Typer(
    help="Records ingest quarantined: where they were, why, and their content (PANs masked).",
    no_args_is_help=True,
)


def _open(data_dir: Path) -> sqlite3.Connection:
    from paypost.bus.sqlite import DB_FILENAME

    path = data_dir / DB_FILENAME
    if not path.is_file():
        raise UserError(
            f"no paypost database at {str(path)!r}: ingest something first (paypost demo), "
            "or pass --data-dir (or set PAYPOST_DATA_DIR) to the directory that holds it"
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


@app.command("list")
def list_cmd(
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
    conn = _open(data_dir)
    try:
        entries = list_quarantine(conn, source=source, kind=kind, limit=limit)
    finally:
        conn.close()
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
    entry_id: Annotated[int, typer.Argument(help="The quarantine id (from `list`).")],
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    json: JsonOption = False,
) -> None:
    """Show one quarantined record in full (card numbers masked)."""
    conn = _open(data_dir)
    try:
        entry: QuarantineEntry | None = get_quarantine(conn, entry_id)
    finally:
        conn.close()
    if entry is None:
        raise UserError(
            f"no quarantined record with id {entry_id}: see `paypost quarantine list` for ids"
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
