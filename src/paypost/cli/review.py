"""`paypost review list|show`: transactions held for review or rejected, with their reasons.

Reads the pipeline's record of non-posting outcomes, written in the same transaction as the
outcome (DESIGN §3.3, "nothing is lost"), read-only: `reconcile_outcomes` in the embedded
database (DATA_DIR/paypost.db; docs/reconciliation.md) by default, or `<p>_state.
review_outcomes` of the distributed pipeline's PostgreSQL state with `paypost review --backend
distributed` (PAYPOST_DB_URL, PAYPOST_PREFIX; docs/deployment.md). Same output either way.
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

app = typer.Typer(
    help="Transactions held for review or rejected, with the reason.",
    no_args_is_help=True,
)

STATES = ("held", "rejected")

add_backend_options(app)


def _open(data_dir: Path) -> sqlite3.Connection:
    from paypost.bus.sqlite import DB_FILENAME

    path = data_dir / DB_FILENAME
    if not path.is_file():
        raise UserError(
            f"no paypost database at {str(path)!r}: run the pipeline first (paypost demo), "
            "or pass --data-dir (or set PAYPOST_DATA_DIR) to the directory that holds it, "
            "or read the distributed pipeline's with `paypost review --backend distributed`"
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


class ReviewReader(Protocol):
    """What `list` and `show` read; `paypost.distributed.queries.StateReader` on PostgreSQL.
    Rows are (event_id, tenant, state, reason, auth_id), oldest first, one per event."""

    def list_review(
        self, *, state: str | None, tenant: str | None, reason: str | None, limit: int
    ) -> list[tuple[Any, ...]]: ...

    def find_review(self, prefix: str) -> list[tuple[Any, ...]]: ...

    def count_review(self) -> dict[str, int]: ...


class _EmbeddedReview:
    """`reconcile_outcomes` (append-only: a redelivered event's second row is not shown)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def list_review(
        self, *, state: str | None, tenant: str | None, reason: str | None, limit: int
    ) -> list[tuple[Any, ...]]:
        return self.conn.execute(
            _SELECT + "AND (? IS NULL OR state = ?) AND (? IS NULL OR tenant = ?) "
            "AND (? IS NULL OR instr(reason, ?) > 0) ORDER BY seq LIMIT ?",
            (state, state, tenant, tenant, reason, reason, limit),
        ).fetchall()

    def find_review(self, prefix: str) -> list[tuple[Any, ...]]:
        return self.conn.execute(
            _SELECT + "AND event_id LIKE ? ORDER BY seq LIMIT 2",
            (prefix.replace("%", "") + "%",),
        ).fetchall()

    def count_review(self) -> dict[str, int]:
        return dict(
            self.conn.execute(
                "SELECT state, count(DISTINCT event_id) FROM reconcile_outcomes GROUP BY state"
            ).fetchall()
        )


def _reader(ctx: typer.Context, data_dir: Path) -> AbstractContextManager[ReviewReader]:
    """The held/rejected records of the chosen backend (read-only), closed on exit."""
    return open_reader(ctx, partial(_open, data_dir), _EmbeddedReview)


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
    ctx: typer.Context,
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
    with _reader(ctx, data_dir) as reader:
        rows = reader.list_review(state=state, tenant=tenant, reason=reason, limit=limit)
        counts = reader.count_review()
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
    ctx: typer.Context,
    event_id: Annotated[str, typer.Argument(help="The held/rejected event's id (or a prefix).")],
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    as_json: JsonOption = False,
) -> None:
    """Show one held or rejected transaction: its reason and the authorization it belongs to."""
    with _reader(ctx, data_dir) as reader:
        rows = reader.find_review(event_id)
    if not rows:
        raise UserError(
            f"no held or rejected transaction with id {event_id!r} "
            f"(see paypost review{backend_flag(ctx)} list)."
        )
    if len(rows) > 1:
        raise UserError(f"{event_id!r} matches several transactions: give more of the id.")
    item = _row(rows[0])
    if as_json:
        emit_json(item)
        return
    console.print_json(msgspec.json.encode(item).decode())
