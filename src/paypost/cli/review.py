"""`paypost review list|show`: transactions held for review or rejected, with their reasons.

Reads the pipeline's record of non-posting outcomes (`reconcile_outcomes`, written in the same
transaction as the outcome; see docs/reconciliation.md) in DATA_DIR/paypost.db, read-only.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer
from rich.table import Table

from paypost.cli.common import DataDirOption, JsonOption, console, emit_json
from paypost.config import DEFAULT_DATA_DIR, UserError

app = typer.Typer(
    help="Transactions held for review or rejected, with the reason.",
    no_args_is_help=True,
)

STATES = ("held", "rejected")


def _open(data_dir: Path) -> sqlite3.Connection:
    from paypost.bus.sqlite import DB_FILENAME

    path = data_dir / DB_FILENAME
    if not path.is_file():
        raise UserError(
            f"no paypost database at {str(path)!r}: run the pipeline first (paypost demo), "
            "or pass --data-dir (or set PAYPOST_DATA_DIR) to the directory that holds it"
        )
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    has = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='reconcile_outcomes'"
    ).fetchone()
    if not has:
        conn.close()
        raise UserError(
            f"the database {str(path)!r} has no pipeline results yet: run paypost demo or "
            "paypost run on it first"
        )
    return conn


_SELECT = (
    "SELECT event_id, tenant, state, reason, auth_id FROM reconcile_outcomes "
    "WHERE seq IN (SELECT min(seq) FROM reconcile_outcomes GROUP BY event_id) "
)


def _row(r: tuple[Any, ...]) -> dict[str, Any]:
    return {
        "event_id": r[0],
        "tenant": r[1],
        "state": r[2],
        "reason": r[3] or "",
        "correlation_id": r[4],
    }


@app.command("list")
def list_(
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    state: Annotated[
        str | None, typer.Option("--state", help="Only held or only rejected.")
    ] = None,
    tenant: Annotated[str | None, typer.Option("--tenant", help="Only this tenant.")] = None,
    reason: Annotated[
        str | None, typer.Option("--reason", help="Only reasons containing this text.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many rows.")] = 50,
    as_json: JsonOption = False,
) -> None:
    """List held and rejected transactions, newest last, with their reasons."""
    if state is not None and state not in STATES:
        raise UserError(f"--state {state!r}: use one of {', '.join(STATES)}.")
    conn = _open(data_dir)
    try:
        rows = conn.execute(
            _SELECT + "AND (? IS NULL OR state = ?) AND (? IS NULL OR tenant = ?) "
            "AND (? IS NULL OR instr(reason, ?) > 0) ORDER BY seq LIMIT ?",
            (state, state, tenant, tenant, reason, reason, limit),
        ).fetchall()
        counts = dict(
            conn.execute(
                "SELECT state, count(DISTINCT event_id) FROM reconcile_outcomes GROUP BY state"
            ).fetchall()
        )
    finally:
        conn.close()
    items = [_row(r) for r in rows]
    if as_json:
        emit_json({"totals": counts, "items": items})
        return
    table = Table(title=f"held {counts.get('held', 0):,} · rejected {counts.get('rejected', 0):,}")
    for col in ("event id", "tenant", "state", "reason"):
        table.add_column(col)
    for i in items:
        table.add_row(i["event_id"], i["tenant"], i["state"], i["reason"])
    console.print(table)


@app.command("show")
def show(
    event_id: Annotated[str, typer.Argument(help="The held/rejected event's id (or a prefix).")],
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Show one held or rejected transaction: its reason and the authorization it belongs to."""
    conn = _open(data_dir)
    try:
        rows = conn.execute(
            _SELECT + "AND event_id LIKE ? ORDER BY seq LIMIT 2",
            (event_id.replace("%", "") + "%",),
        ).fetchall()
    finally:
        conn.close()
    if not rows:
        raise UserError(f"no held or rejected transaction with id {event_id!r} (see review list).")
    if len(rows) > 1:
        raise UserError(f"{event_id!r} matches several transactions: give more of the id.")
    item = _row(rows[0])
    if as_json:
        emit_json(item)
        return
    console.print_json(msgspec.json.encode(item).decode())
