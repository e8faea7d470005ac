"""The assembler's LegStore on PostgreSQL (distributed mode): same semantics as SQLite, safe
when several workers assemble legs of the same sequence at the same time.

Concurrency: `load` first makes sure a row exists for every sequence of the batch that the
batch does not hold whole (`INSERT … ON CONFLICT DO NOTHING`, a placeholder with leg_count 0
that the same transaction overwrites in `save`), then locks the batch's rows (`SELECT … FOR
UPDATE`, in sequence-id order, so two workers never deadlock). A second worker holding
another leg of the same sequence waits for the first to commit and then sees its legs: a
sequence whose legs were spread over workers still completes exactly once. The timeout sweep
takes only unlocked rows (`FOR UPDATE SKIP LOCKED`).

A sequence the batch holds whole (every leg, the common case: the account interface emits a
transaction's legs together, and a fused worker assembles them in the same unit of work)
gets no row when it completes. Given the ledger (`ledger_schema`), it is recorded as the
SQLite store records it: once `settle` reports its entry's position, one row in
`assembly_posted` (tenant, entry position, digests), appended in position order, and found
again through the ledger's own index of entry ids (entry id = sequence id). So it is
remembered as posted exactly while the ledger holds its entry. No lock is needed for it: a
second transaction holding the same leg events is the same delivery or a copy of it, which
the consumers' tracking records (and, in a fused worker, the dedup stage's event ids and
business-key locks) let only one of the two commit; a copy arriving after the commit finds
the entry. At 1,000,000 authorizations the row's placeholder insert, lock and upsert (and
vacuuming the dead versions they leave) took ~40 µs of PostgreSQL time per authorization.

Like the SQLite store it works on the caller's connection, inside the caller's transaction,
and never commits. Tables live in one schema (default `paypost_assembly`); sequence ids are
derived from tenant + transaction, so tenants cannot collide.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import msgspec
import psycopg
from psycopg import sql

from paypost.events import Event
from paypost.pgarray import Int8Array, TextArray
from paypost.stages.assembler import OPEN_STATES, SequenceRecord, StoredLeg, posted_record

_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(Event)

DEFAULT_SCHEMA = "paypost_assembly"


def ensure_schema(conn: psycopg.Connection[Any], schema: str = DEFAULT_SCHEMA) -> None:
    """Create the schema and the assembler's tables if they do not exist (no commit)."""
    s = schema_identifier(schema)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(s))
    conn.execute(
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {}.assembly_sequences (
                sequence_id TEXT PRIMARY KEY,
                tenant TEXT NOT NULL,
                leg_count INTEGER NOT NULL,
                state TEXT NOT NULL,
                first_seen_us BIGINT NOT NULL,
                digests BYTEA
            )"""
        ).format(s)
    )
    conn.execute(
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS assembly_sequences_pending ON {}.assembly_sequences "
            "(first_seen_us) WHERE state = 'pending'"
        ).format(s)
    )
    conn.execute(
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {}.assembly_legs (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                sequence_id TEXT NOT NULL,
                leg_index INTEGER NOT NULL,
                digest BYTEA NOT NULL,
                event BYTEA NOT NULL
            )"""
        ).format(s)
    )
    conn.execute(
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS assembly_legs_sequence ON {}.assembly_legs (sequence_id)"
        ).format(s)
    )
    conn.execute(
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {}.assembly_posted (
                tenant TEXT NOT NULL,
                entry_pk BIGINT NOT NULL,
                sequence_id TEXT NOT NULL,
                digests BYTEA NOT NULL,
                PRIMARY KEY (tenant, entry_pk)
            )"""
        ).format(s)
    )


def schema_identifier(schema: str) -> sql.Identifier:
    """SCHEMA as a quoted identifier, refusing anything but a plain lowercase name."""
    if not _SCHEMA_RE.fullmatch(schema):
        raise ValueError(
            f"assembler schema {schema!r} must be a lowercase identifier (letters, digits, _)"
        )
    return sql.Identifier(schema)


class PostgresLegStore:
    """LegStore on a psycopg connection (the caller's transaction; never commits).

    LEDGER_SCHEMA (tenant → its ledger's schema on this connection, None while it has none)
    lets sequences completed by the batch that holds them whole go without a row (see the
    module docs); without it every sequence has a row, as the assembler alone needs."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        schema: str = DEFAULT_SCHEMA,
        *,
        ledger_schema: Callable[[str], str | None] | None = None,
    ) -> None:
        self.conn = conn
        self.s = schema_identifier(schema)
        self.ledger_schema = ledger_schema
        self._rows: set[str] = set()  # sequences with a row (placeholders included)
        self._tenants: dict[str, str] = {}
        # Completed without a row, waiting for settle. Never read back as state: if the
        # transaction rolls back before settle, nothing was posted.
        self._unposted: dict[str, bytes] = {}

    def load(
        self, sequence_ids: Iterable[str], whole: Collection[str] = ()
    ) -> dict[str, SequenceRecord]:
        ids = sorted(set(sequence_ids))
        if not ids:
            return {}
        tenants: Mapping[str, str] = sequence_ids if isinstance(sequence_ids, Mapping) else {}
        self._tenants.update(tenants)
        rowless = {s for s in whole if s in tenants} if self.ledger_schema is not None else set()
        partial = [s for s in ids if s not in rowless]
        if partial:
            self.conn.execute(
                sql.SQL(
                    "INSERT INTO {}.assembly_sequences "
                    "(sequence_id, tenant, leg_count, state, first_seen_us) "
                    "SELECT id, '', 0, 'pending', 0 FROM unnest(%s::text[]) AS id "
                    "ORDER BY id ON CONFLICT (sequence_id) DO NOTHING"
                ).format(self.s),
                (TextArray(partial),),
            )
        rows = self.conn.execute(
            sql.SQL(
                "SELECT sequence_id, tenant, leg_count, state, first_seen_us, digests "
                "FROM {}.assembly_sequences WHERE sequence_id = ANY(%s) "
                "ORDER BY sequence_id FOR UPDATE"
            ).format(self.s),
            (TextArray(ids),),
        ).fetchall()
        out = self._with_legs(rows)
        self._rows.update(out)
        if self.ledger_schema is not None:
            # no row, or only the placeholder just made: posted whole, earlier?
            missing = [s for s in ids if s in tenants and (s not in out or out[s].leg_count == 0)]
            if missing:
                out.update(self._load_posted(missing, tenants))
        return out

    def _load_posted(
        self, sequence_ids: list[str], tenants: Mapping[str, str]
    ) -> dict[str, SequenceRecord]:
        """Sequences among SEQUENCE_IDS whose entry the ledger holds, posted by a store of
        this kind: found through the ledger's index of entry ids."""
        assert self.ledger_schema is not None
        by_tenant: dict[str, list[str]] = {}
        for sid in sequence_ids:
            by_tenant.setdefault(tenants[sid], []).append(sid)
        out: dict[str, SequenceRecord] = {}
        for tenant, sids in sorted(by_tenant.items()):
            ledger = self.ledger_schema(tenant)
            if ledger is None:
                continue
            for sid, digests in self.conn.execute(
                sql.SQL(
                    "SELECT e.id, p.digests FROM {}.ledger_entries e JOIN {}.assembly_posted p "
                    "ON p.tenant = %s AND p.entry_pk = e.pk AND p.sequence_id = e.id "
                    "WHERE e.id = ANY(%s)"
                ).format(sql.Identifier(ledger), self.s),
                (tenant, TextArray(sids)),
            ):
                out[sid] = posted_record(sid, tenant, bytes(digests))
        return out

    def _with_legs(self, rows: Sequence[Any]) -> dict[str, SequenceRecord]:
        out: dict[str, SequenceRecord] = {}
        for sid, tenant, count, state, first, digests in rows:
            raw = bytes(digests or b"")
            out[sid] = SequenceRecord(
                sequence_id=sid,
                tenant=tenant,
                leg_count=count,
                state=state,
                first_seen_us=first,
                digests=[raw[i : i + 16] for i in range(0, len(raw), 16)],
            )
        open_ids = [s for s, r in out.items() if r.state in OPEN_STATES and r.leg_count > 0]
        if open_ids:
            for sid, index, digest, blob in self.conn.execute(
                sql.SQL(
                    "SELECT sequence_id, leg_index, digest, event FROM {}.assembly_legs "
                    "WHERE sequence_id = ANY(%s)"
                ).format(self.s),
                (TextArray(open_ids),),
            ):
                out[sid].legs[index] = StoredLeg(
                    leg_index=index, digest=bytes(digest), event=_DECODER.decode(bytes(blob))
                )
        return out

    def save(
        self,
        records: Sequence[SequenceRecord],
        new_legs: Sequence[tuple[str, StoredLeg]],
        closed: Sequence[str],
    ) -> None:
        if closed:
            self.conn.execute(
                sql.SQL("DELETE FROM {}.assembly_legs WHERE sequence_id = ANY(%s)").format(self.s),
                (TextArray(closed),),
            )
        if self.ledger_schema is not None:
            kept = []
            for r in records:
                if r.state == "complete" and r.sequence_id not in self._rows:
                    # completed by the batch that held it whole: recorded by `posted`
                    assert len(r.digests) == r.leg_count, r
                    self._unposted[r.sequence_id] = b"".join(r.digests)
                    continue
                self._unposted.pop(r.sequence_id, None)
                kept.append(r)
            records = kept
        if records:
            self._rows.update(r.sequence_id for r in records)
            ordered = sorted(records, key=lambda r: r.sequence_id)
            self.conn.execute(
                sql.SQL(
                    "INSERT INTO {}.assembly_sequences AS t "
                    "(sequence_id, tenant, leg_count, state, first_seen_us, digests) "
                    "SELECT * FROM unnest(%s::text[], %s::text[], %s::int[], %s::text[], "
                    "%s::bigint[], %s::bytea[]) "
                    "ON CONFLICT (sequence_id) DO UPDATE SET tenant = excluded.tenant, "
                    "leg_count = excluded.leg_count, state = excluded.state, "
                    "first_seen_us = excluded.first_seen_us, digests = excluded.digests"
                ).format(self.s),
                (
                    TextArray([r.sequence_id for r in ordered]),
                    TextArray([r.tenant for r in ordered]),
                    Int8Array([r.leg_count for r in ordered]),
                    TextArray([r.state for r in ordered]),
                    Int8Array([r.first_seen_us for r in ordered]),
                    [b"".join(r.digests) if r.digests else None for r in ordered],
                ),
            )
        if new_legs:
            with self.conn.cursor().copy(
                sql.SQL(
                    "COPY {}.assembly_legs (sequence_id, leg_index, digest, event) FROM STDIN"
                ).format(self.s)
            ) as copy:
                for sid, leg in new_legs:
                    copy.write_row((sid, leg.leg_index, leg.digest, _ENCODER.encode(leg.event)))

    def posted(self, positions: Sequence[tuple[str, int]]) -> None:
        """The ledger holds these entries (entry id = sequence id, ledger position): record
        the sequences completed without a row as posted (`settle` calls this)."""
        unposted = self._unposted
        rows = [
            (self._tenants[sid], position, sid, unposted.pop(sid))
            for sid, position in positions
            if sid in unposted
        ]
        if not rows:
            return
        rows.sort(key=lambda r: (r[0], r[1]))
        tenants, pks, sids, digests = zip(*rows, strict=True)
        # ON CONFLICT: a position whose entry was deleted (a reconciliation break) and then
        # taken again by a new entry.
        self.conn.execute(
            sql.SQL(
                "INSERT INTO {}.assembly_posted (tenant, entry_pk, sequence_id, digests) "
                "SELECT * FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::bytea[]) "
                "ON CONFLICT (tenant, entry_pk) DO UPDATE SET sequence_id = "
                "excluded.sequence_id, digests = excluded.digests"
            ).format(self.s),
            (TextArray(tenants), Int8Array(pks), TextArray(sids), list(digests)),
        )

    def pending_before(self, cutoff_us: int, limit: int) -> list[SequenceRecord]:
        rows = self.conn.execute(
            sql.SQL(
                "SELECT sequence_id, tenant, leg_count, state, first_seen_us, digests "
                "FROM {}.assembly_sequences WHERE state = 'pending' AND leg_count > 0 "
                "AND first_seen_us < %s ORDER BY first_seen_us, sequence_id LIMIT %s "
                "FOR UPDATE SKIP LOCKED"
            ).format(self.s),
            (cutoff_us, limit),
        ).fetchall()
        loaded = self._with_legs(rows)
        return [loaded[r[0]] for r in rows]
