"""The assembler's LegStore on PostgreSQL (distributed mode): same semantics as SQLite, safe
when several workers assemble legs of the same sequence at the same time.

Concurrency: `load` first makes sure a row exists for every sequence of the batch
(`INSERT … ON CONFLICT DO NOTHING`, a placeholder with leg_count 0 that the same transaction
overwrites in `save`), then locks those rows (`SELECT … FOR UPDATE`, in sequence-id order, so two
workers never deadlock). A second worker holding another leg of the same sequence waits for the
first to commit and then sees its legs: a sequence whose legs were spread over workers still
completes exactly once. The timeout sweep takes only unlocked rows (`FOR UPDATE SKIP LOCKED`).

Like the SQLite store it works on the caller's connection, inside the caller's transaction,
and never commits. Tables live in one schema (default `paypost_assembly`); sequence ids are
derived from tenant + transaction, so tenants cannot collide.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec
import psycopg
from psycopg import sql

from paypost.events import Event
from paypost.pgarray import Int8Array, TextArray
from paypost.stages.assembler import OPEN_STATES, SequenceRecord, StoredLeg

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


def schema_identifier(schema: str) -> sql.Identifier:
    """SCHEMA as a quoted identifier, refusing anything but a plain lowercase name."""
    if not _SCHEMA_RE.fullmatch(schema):
        raise ValueError(
            f"assembler schema {schema!r} must be a lowercase identifier (letters, digits, _)"
        )
    return sql.Identifier(schema)


class PostgresLegStore:
    """LegStore on a psycopg connection (the caller's transaction; never commits)."""

    def __init__(self, conn: psycopg.Connection[Any], schema: str = DEFAULT_SCHEMA) -> None:
        self.conn = conn
        self.s = schema_identifier(schema)

    def load(self, sequence_ids: Iterable[str]) -> dict[str, SequenceRecord]:
        ids = sorted(set(sequence_ids))
        if not ids:
            return {}
        self.conn.execute(
            sql.SQL(
                "INSERT INTO {}.assembly_sequences "
                "(sequence_id, tenant, leg_count, state, first_seen_us) "
                "SELECT id, '', 0, 'pending', 0 FROM unnest(%s::text[]) AS id "
                "ORDER BY id ON CONFLICT (sequence_id) DO NOTHING"
            ).format(self.s),
            (TextArray(ids),),
        )
        rows = self.conn.execute(
            sql.SQL(
                "SELECT sequence_id, tenant, leg_count, state, first_seen_us, digests "
                "FROM {}.assembly_sequences WHERE sequence_id = ANY(%s) "
                "ORDER BY sequence_id FOR UPDATE"
            ).format(self.s),
            (TextArray(ids),),
        ).fetchall()
        return self._with_legs(rows)

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
        if records:
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
