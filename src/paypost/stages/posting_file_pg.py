"""The posting-file outbox on PostgreSQL (distributed mode).

Records are queued in `<schema>.assembly_posting_outbox` in the same transaction as the ledger
posting (`add_to_outbox`), by any worker. One exporter process moves them to the file
(`export_outbox`). Unlike SQLite, PostgreSQL identity values do not commit in order (a
transaction holding id 9 may commit after the one holding id 10), so the file cannot name its
position by id ranges. Instead each batch is *claimed* first:

1. claim: `UPDATE … SET batch_id = 'pg-<first id>-<last id>'` on up to N unclaimed rows
   (`FOR UPDATE SKIP LOCKED`), commit — the batch's content is now fixed;
2. write the batch to the file (`PostingFileWriter.write_batch`, idempotent by batch id, fsync);
3. delete the batch's rows, commit.

After a crash anywhere, `export_outbox` first finishes what was claimed: a claimed batch that
is not in the file is written (same id, same rows), one that is in the file is deleted. So every
record reaches the file exactly once. Run one exporter per file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import psycopg
from psycopg import sql

from paypost.stages.assembler_pg import DEFAULT_SCHEMA, schema_identifier
from paypost.stages.posting_file import EXPORT_BATCH_RECORDS, PostingFileWriter, PostingRecord

_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(PostingRecord)


def ensure_outbox_schema(conn: psycopg.Connection[Any], schema: str = DEFAULT_SCHEMA) -> None:
    """Create the outbox table (no commit)."""
    s = schema_identifier(schema)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(s))
    conn.execute(
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {}.assembly_posting_outbox (
                id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                record BYTEA NOT NULL,
                batch_id TEXT
            )"""
        ).format(s)
    )
    conn.execute(
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS assembly_posting_outbox_batch "
            "ON {}.assembly_posting_outbox (batch_id) WHERE batch_id IS NOT NULL"
        ).format(s)
    )


def add_to_outbox(
    conn: psycopg.Connection[Any], records: Sequence[PostingRecord], schema: str = DEFAULT_SCHEMA
) -> None:
    """Queue records for the posting file, in the caller's transaction (no commit)."""
    if not records:
        return
    # Binary COPY: a record travels as its bytes; the text format sent each byte as two hex
    # digits for the server to decode (3.4 -> 0.9 µs of client CPU per record, measured).
    with conn.cursor().copy(
        sql.SQL("COPY {}.assembly_posting_outbox (record) FROM STDIN (FORMAT BINARY)").format(
            schema_identifier(schema)
        )
    ) as copy:
        copy.set_types(["bytea"])
        encode = _ENCODER.encode
        for r in records:
            copy.write_row((encode(r),))


def export_outbox(
    conn: psycopg.Connection[Any],
    writer: PostingFileWriter,
    *,
    schema: str = DEFAULT_SCHEMA,
    batch_size: int = EXPORT_BATCH_RECORDS,
) -> int:
    """Move every committed record to the file (claim, write, delete); returns how many were
    written. Commits on CONN (it must not carry an open transaction of the caller)."""
    s = schema_identifier(schema)
    written = 0
    # 1. Finish batches claimed before a crash.
    claimed = [
        r[0]
        for r in conn.execute(
            sql.SQL(
                "SELECT DISTINCT batch_id FROM {}.assembly_posting_outbox "
                "WHERE batch_id IS NOT NULL ORDER BY batch_id"
            ).format(s)
        ).fetchall()
    ]
    conn.commit()
    for batch_id in claimed:
        written += _write_and_delete(conn, writer, s, batch_id)
    # 2. Claim, write, delete, until nothing is left.
    while True:
        ids = [
            r[0]
            for r in conn.execute(
                sql.SQL(
                    "SELECT id FROM {}.assembly_posting_outbox WHERE batch_id IS NULL "
                    "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
                ).format(s),
                (batch_size,),
            ).fetchall()
        ]
        if not ids:
            conn.commit()
            break
        batch_id = f"pg-{ids[0]:012d}-{ids[-1]:012d}"
        conn.execute(
            sql.SQL(
                "UPDATE {}.assembly_posting_outbox SET batch_id = %s WHERE id = ANY(%s)"
            ).format(s),
            (batch_id, ids),
        )
        conn.commit()
        written += _write_and_delete(conn, writer, s, batch_id)
    return written


def _write_and_delete(
    conn: psycopg.Connection[Any], writer: PostingFileWriter, s: sql.Identifier, batch_id: str
) -> int:
    rows = conn.execute(
        sql.SQL(
            "SELECT record FROM {}.assembly_posting_outbox WHERE batch_id = %s ORDER BY id"
        ).format(s),
        (batch_id,),
    ).fetchall()
    records = [_DECODER.decode(bytes(r[0])) for r in rows]
    wrote = writer.write_batch(batch_id, records)
    conn.execute(
        sql.SQL("DELETE FROM {}.assembly_posting_outbox WHERE batch_id = %s").format(s),
        (batch_id,),
    )
    conn.commit()
    return len(records) if wrote else 0
