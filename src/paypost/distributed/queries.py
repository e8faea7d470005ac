"""Read queries over the distributed pipeline's PostgreSQL state, for the CLI readers.

`paypost parked|quarantine|review --backend distributed` read the same records as on the
embedded backend (`dedup_parked`, `ingest_quarantine`, `reconcile_outcomes`), from the tables
`state.py` writes in the schema `<prefix>_state`, and return the SAME structs
(`ParkedRecord`, `QuarantineEntry`) or rows (review: event id, tenant, state, reason,
authorization id, as the embedded query selects them) so that both backends print the same
table and JSON.

Read-only: the connection runs READ ONLY transactions and never commits. The tables hold
masked PANs and card tokens only (asserted on write, and again here before anything leaves).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from paypost.bus.nats import connect_db
from paypost.config import UserError
from paypost.security.tokens import contains_pan
from paypost.stages.dedup import ParkedRecord
from paypost.stages.dedup import _record as _parked_record
from paypost.stages.ingest import QuarantineEntry
from paypost.stages.ingest import _entry as _quarantine_entry

from .runtime import load_settings
from .state import count_parked, state_schema

_PARKED_COLUMNS = sql.SQL(
    "SELECT event_id, input_event_id, tenant, reason, business_key, original_event_id, "
    "transmission_time, parked_at, event FROM {}.dedup_parked"
)
# quarantined_at is a TIMESTAMPTZ here, TEXT written by `utc_now()` (RFC 3339, ms, Z) embedded:
# formatted the same way so both backends show the same text.
_QUARANTINE_COLUMNS = sql.SQL(
    "SELECT id, source, tenant, position, line, kind, reason, record, "
    "to_char(quarantined_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') "
    "FROM {}.ingest_quarantine"
)

_REVIEW_COLUMNS = sql.SQL("SELECT event_id, tenant, state, reason, auth_id FROM {}.review_outcomes")


class StateReader:
    """Queries over `<prefix>_state` on the caller's read-only connection."""

    def __init__(self, conn: psycopg.Connection[Any], schema: str) -> None:
        self.conn = conn
        self.schema = schema
        self.s = sql.Identifier(schema)

    # -- parked authorizations (FR3) -------------------------------------------------------
    def list_parked(
        self,
        *,
        tenant: str | None = None,
        reason: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[ParkedRecord]:
        """Parked authorizations, oldest first, filtered by tenant and/or reason."""
        rows = self.conn.execute(
            _PARKED_COLUMNS.format(self.s)
            + sql.SQL(
                " WHERE (%(t)s::text IS NULL OR tenant = %(t)s) "
                "AND (%(r)s::text IS NULL OR reason = %(r)s) ORDER BY seq LIMIT %(n)s OFFSET %(o)s"
            ),
            {"t": tenant, "r": reason, "n": limit, "o": offset},
        ).fetchall()
        return [_parked(row) for row in rows]

    def get_parked(self, event_id: str) -> ParkedRecord | None:
        """One parked authorization by the parked event's id or by the input event's id."""
        row = self.conn.execute(
            _PARKED_COLUMNS.format(self.s)
            + sql.SQL(" WHERE event_id = %(id)s OR input_event_id = %(id)s ORDER BY seq LIMIT 1"),
            {"id": event_id},
        ).fetchone()
        return None if row is None else _parked(row)

    def find_parked_by_prefix(self, prefix: str) -> ParkedRecord | None:
        """The parked record whose event id (or input event id) starts with PREFIX, if unique.
        ILIKE, with % and _ dropped: the embedded lookup's SQLite LIKE ignores ASCII case."""
        pattern = prefix.replace("%", "").replace("_", "").replace("\\", "") + "%"
        rows = self.conn.execute(
            _PARKED_COLUMNS.format(self.s)
            + sql.SQL(
                " WHERE event_id ILIKE %(p)s OR input_event_id ILIKE %(p)s ORDER BY seq LIMIT 2"
            ),
            {"p": pattern},
        ).fetchall()
        return _parked(rows[0]) if len(rows) == 1 else None

    def count_parked(self) -> dict[str, int]:
        """Parked count per reason."""
        return count_parked(self.conn, self.schema)

    # -- ingest quarantine (FR1) -----------------------------------------------------------
    def list_quarantine(
        self, *, source: str | None = None, kind: str | None = None, limit: int = 100
    ) -> list[QuarantineEntry]:
        """Quarantined records, oldest first, filtered by source and/or kind."""
        rows = self.conn.execute(
            _QUARANTINE_COLUMNS.format(self.s)
            + sql.SQL(
                " WHERE (%(s)s::text IS NULL OR source = %(s)s) "
                "AND (%(k)s::text IS NULL OR kind = %(k)s) ORDER BY id LIMIT %(n)s"
            ),
            {"s": source, "k": kind, "n": limit},
        ).fetchall()
        return [_quarantined(row) for row in rows]

    def get_quarantine(self, entry_id: int) -> QuarantineEntry | None:
        row = self.conn.execute(
            _QUARANTINE_COLUMNS.format(self.s) + sql.SQL(" WHERE id = %s"), (entry_id,)
        ).fetchone()
        return None if row is None else _quarantined(row)

    # -- held and rejected transactions (DESIGN §3.3) ----------------------------------------
    # Rows in the embedded `paypost review` query's column order: event_id, tenant, state,
    # reason, auth_id; oldest first (seq), one per event (the event id is unique here).
    def list_review(
        self,
        *,
        state: str | None = None,
        tenant: str | None = None,
        reason: str | None = None,
        limit: int = 50,
    ) -> list[tuple[Any, ...]]:
        """Held/rejected outcomes filtered by state, tenant and reason text (a substring,
        case-sensitive as the embedded instr())."""
        self._require_review()
        return self.conn.execute(
            _REVIEW_COLUMNS.format(self.s)
            + sql.SQL(
                " WHERE (%(st)s::text IS NULL OR state = %(st)s) "
                "AND (%(t)s::text IS NULL OR tenant = %(t)s) "
                "AND (%(r)s::text IS NULL OR strpos(reason, %(r)s) > 0) ORDER BY seq LIMIT %(n)s"
            ),
            {"st": state, "t": tenant, "r": reason, "n": limit},
        ).fetchall()

    def find_review(self, prefix: str) -> list[tuple[Any, ...]]:
        """At most two outcomes whose event id starts with PREFIX (ILIKE, as the embedded
        SQLite LIKE ignores ASCII case)."""
        self._require_review()
        pattern = prefix.replace("%", "").replace("_", "").replace("\\", "") + "%"
        return self.conn.execute(
            _REVIEW_COLUMNS.format(self.s)
            + sql.SQL(" WHERE event_id ILIKE %s ORDER BY seq LIMIT 2"),
            (pattern,),
        ).fetchall()

    def count_review(self) -> dict[str, int]:
        """Outcomes per state (held, rejected)."""
        self._require_review()
        rows = self.conn.execute(
            sql.SQL("SELECT state, count(*) FROM {}.review_outcomes GROUP BY state").format(self.s)
        )
        return {str(st): int(n) for st, n in rows}

    def _require_review(self) -> None:
        row = self.conn.execute(
            "SELECT to_regclass(%s)", (f'"{self.schema}".review_outcomes',)
        ).fetchone()
        if row is None or row[0] is None:
            raise UserError(
                f"the distributed state {self.schema!r} has no review outcomes table: it was "
                "created by an older paypost; run the pipeline with this version (paypost run "
                "--backend distributed) to record held and rejected transactions."
            )


def _parked(row: tuple[Any, ...]) -> ParkedRecord:
    # DESIGN §3.4: asserted where the row was written; asserted again before it is shown.
    assert not contains_pan(row[8]), f"a card number in the parked table ({row[0]})"
    return _parked_record(row)


def _quarantined(row: tuple[Any, ...]) -> QuarantineEntry:
    assert not (contains_pan(row[7]) or contains_pan(row[6])), (
        f"a card number in the quarantine table (#{row[0]})"
    )
    return _quarantine_entry(row)


@contextmanager
def open_state_reader(db_url: str, prefix: str) -> Iterator[StateReader]:
    """A `StateReader` on the state schema of PREFIX, or a `UserError` that names the setting
    to fix: PAYPOST_DB_URL when PostgreSQL cannot be reached, PAYPOST_PREFIX when no
    distributed pipeline ever ran under that prefix in that database."""
    schema = state_schema(prefix)
    conn = connect_db(db_url)  # ServiceUnavailable (a UserError) names PAYPOST_DB_URL
    try:
        conn.read_only = True
        found = conn.execute(
            "SELECT to_regclass(%s), to_regclass(%s)",
            (f'"{schema}".dedup_parked', f'"{schema}".ingest_quarantine'),
        ).fetchone()
        if found is None or None in found:
            where = f"{conn.info.host}:{conn.info.port}/{conn.info.dbname}"
            raise UserError(
                f"no distributed paypost state for prefix {prefix!r} in PostgreSQL {where} "
                f"(schema {schema!r}): run the pipeline there first (paypost run --backend "
                "distributed), or set PAYPOST_PREFIX (or --prefix, or `prefix` in the config "
                "file) to the prefix it ran with, or PAYPOST_DB_URL to its database."
            )
        yield StateReader(conn, schema)
    finally:
        conn.close()


@contextmanager
def open_configured_reader(
    config: Path | None = None, *, db_url: str | None = None, prefix: str | None = None
) -> Iterator[StateReader]:
    """`open_state_reader` on the database and prefix the distributed settings name (flags,
    then PAYPOST_DB_URL / PAYPOST_PREFIX, then the config file; `runtime.load_settings`)."""
    settings = load_settings(config, db_url=db_url, prefix=prefix)
    with open_state_reader(settings.db_url, settings.prefix) as reader:
        yield reader
