"""The reconciler (FR10): authorizations in vs ledger entries vs the posting file, and the
automatic patches of every break (docs/reconciliation.md).

Three views per tenant / day / account:

- **in**: the accepted authorizations. The pipeline keeps a compact record of each one
  (`reconcile_inbound`: one append-only row per `AuthorizationAccepted`, written by `track` in
  the same unit of work as the dedup stage's effects) and of each authorization that ended in a
  non-posting terminal state (`reconcile_outcomes`: held or rejected, with the reason);
- **ledger**: every journal entry, with its settlement amount (the transaction-currency side of
  the entry), the customer account, the sequence id, the transaction reference, reversal links
  and the reconciliation patch it belongs to (one set-based SQL query, grouped by entry);
- **file**: the posting file's detail records (plus records still queued in the outbox).

`classify` is a pure function of those views and a `ReconcileConfig`: every accepted
authorization is matched, in a legitimate non-posting state (held, rejected, reversed, in
flight) or a **break**: missing (accepted, never posted), duplicate (posted more than once),
mismatch (amount or currency differs beyond the tolerance), orphan (posted with no accepted
authorization), and the file's breaks (an entry missing from the file, in it twice, different
there, or a record with no entry). Each break carries its evidence and its planned patch.

`apply_patches` carries the plan out, each patch in a unit of work with its events
(`ReconciliationBreakDetected`, `ReconciliationBreakPatched`, archived on the bus) and, where
money moves, a journal entry linked to its break (metadata `reconciliation.break_id`):

- missing → the archived `AuthorizationAccepted` is re-driven through the real stages
  (standardize → enrich → rules → account interface → assembler → ledger), never a hand-made
  posting;
- duplicate → a reversal entry of the extra entry (`reversal_of` links it);
- mismatch → an adjustment entry, or a hold awaiting approval above the configured limit;
- orphan → a hold for review (`approve` reverses it);
- file breaks → an entry missing from the file is queued again; the others are held (the file
  is append-only; the bank's core system deduplicates by entry id).

The flow is one for both backends: `run_patches` over a `BreakStore` (where breaks are kept,
entries read and posted, records queued); `SqliteBreakStore` here, `PostgresBreakStore` in
`paypost.distributed.reconcile`.

Idempotent: break ids derive from (tenant, kind, subject), patch entry ids and event ids from
the break id, and `reconcile_breaks` records each break's status, so patching twice changes
nothing. Money is conserved: every patch entry balances and the trial balance is checked after.
"""

from __future__ import annotations

import csv
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

import msgspec

from paypost.events import (
    Event,
    ReconciliationBreakDetected,
    ReconciliationBreakPatched,
    derive_event_id,
    new_event,
)
from paypost.iso.iso20022 import message_id_for
from paypost.ledger import sqlite as ledger_sqlite
from paypost.ledger.model import JournalEntry, Leg, PostedEntry, PostResult
from paypost.money import Money
from paypost.stages.post import sequence_id_for
from paypost.stages.posting_file import (
    DETAIL_FIELDS,
    PostingRecord,
    add_to_outbox,
    record_for,
)

STAGE = "reconcile"
SOURCE = "paypost.reconcile"

BreakKind = Literal[
    "missing",
    "duplicate",
    "mismatch",
    "orphan",
    "file_missing",
    "file_duplicate",
    "file_mismatch",
    "file_orphan",
]
BREAK_KINDS: tuple[str, ...] = (
    "missing",
    "duplicate",
    "mismatch",
    "orphan",
    "file_missing",
    "file_duplicate",
    "file_mismatch",
    "file_orphan",
)
Action = Literal["redrive", "reverse", "adjust", "hold", "requeue"]

# Terminal states that legitimately end without a posting (DESIGN §3.3).
NON_POSTING = {
    "TransactionHeld": "held",
    "TransactionRejected": "rejected",
    "StandardizationRejected": "rejected",
}

# The events an authorization travels as on its way to the ledger (DESIGN §1).
STAGE_INPUTS = frozenset(
    (
        "AuthorizationApproved",
        "AuthorizationAccepted",
        "TransactionStandardized",
        "TransactionEnriched",
        "TransactionApproved",
        "PostingLegCreated",
    )
)

# --------------------------------------------------------------------------------------------
# Configuration


class ReconcileConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Matching criteria, tolerances and patch limits (docs/reconciliation.md).

    - `match_on`: how a ledger entry is linked to an accepted authorization, tried in order:
      `sequence_id` (the entry's posting sequence id is the one the pipeline derives from the
      authorization) and/or `transaction_ref` (the entry's pacs.008 TxId);
    - `compare_currency`: a posting in another currency than authorized is a mismatch;
    - `amount_tolerance_minor` (per currency in `amount_tolerance_by_currency`): a difference
      up to this many minor units counts as matched;
    - `auto_adjust_limit_minor` (per currency in `auto_adjust_limit_by_currency`): a mismatch
      up to this is patched with an adjustment entry; above it, held awaiting approval;
    - `check_posting_file`: compare the ledger with the posting file too;
    - `redrive_batch`: authorizations re-driven per unit of work.
    """

    match_on: tuple[Literal["sequence_id", "transaction_ref"], ...] = (
        "sequence_id",
        "transaction_ref",
    )
    compare_currency: bool = True
    amount_tolerance_minor: int = 0
    amount_tolerance_by_currency: dict[str, int] = {}
    auto_adjust_limit_minor: int = 10_000
    auto_adjust_limit_by_currency: dict[str, int] = {}
    check_posting_file: bool = True
    redrive_batch: int = 500

    def __post_init__(self) -> None:
        if not self.match_on:
            raise ValueError(
                "reconcile match_on needs at least one of sequence_id, transaction_ref"
            )
        for name in self.match_on:
            if name not in ("sequence_id", "transaction_ref"):
                raise ValueError(
                    f"reconcile match_on {name!r}: use sequence_id and/or transaction_ref"
                )
        if self.amount_tolerance_minor < 0 or self.auto_adjust_limit_minor < 0:
            raise ValueError("reconcile tolerances and limits must be >= 0 minor units")
        if self.redrive_batch < 1:
            raise ValueError("reconcile redrive_batch must be >= 1")

    def tolerance(self, currency: str) -> int:
        return self.amount_tolerance_by_currency.get(currency, self.amount_tolerance_minor)

    def adjust_limit(self, currency: str) -> int:
        return self.auto_adjust_limit_by_currency.get(currency, self.auto_adjust_limit_minor)


class Scope(msgspec.Struct, frozen=True, kw_only=True):
    """What to reconcile: one tenant or all, and an inclusive range of days (UTC)."""

    tenant: str | None = None
    first_day: str | None = None  # YYYY-MM-DD, inclusive
    last_day: str | None = None  # YYYY-MM-DD, inclusive

    def has_day(self, day: str | None) -> bool:
        if day is None:
            return self.first_day is None and self.last_day is None
        if self.first_day is not None and day < self.first_day:
            return False
        return not (self.last_day is not None and day > self.last_day)

    def has_tenant(self, tenant: str) -> bool:
        return self.tenant is None or tenant == self.tenant


# --------------------------------------------------------------------------------------------
# Schema and the pipeline's per-batch record of what came in

SCHEMA = """
CREATE TABLE IF NOT EXISTS reconcile_inbound (
    seq INTEGER PRIMARY KEY,          -- append-only
    tenant TEXT NOT NULL,
    auth_id TEXT NOT NULL,            -- the authorization's correlation id
    accepted_id TEXT NOT NULL,        -- the AuthorizationAccepted event id (re-drive from it)
    day TEXT NOT NULL,                -- transmission date, UTC
    amount INTEGER NOT NULL,          -- minor units of the transaction currency
    currency TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reconcile_outcomes (
    seq INTEGER PRIMARY KEY,          -- append-only
    tenant TEXT NOT NULL,
    auth_id TEXT NOT NULL,
    state TEXT NOT NULL,              -- held | rejected
    event_id TEXT NOT NULL,
    reason TEXT
);
CREATE TABLE IF NOT EXISTS reconcile_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reconcile_breaks (
    break_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,             -- open | held | patched | failed
    action TEXT NOT NULL,
    entry_id TEXT,                    -- the patch entry (reversal, adjustment, re-driven entry)
    evidence TEXT NOT NULL,           -- JSON
    note TEXT,
    detected_at TEXT NOT NULL,
    patched_at TEXT
) WITHOUT ROWID;
"""


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the reconcile_* tables (no commit: DDL joins the caller's transaction)."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


def _utc_day(text: str) -> str:
    if text.endswith("Z") and len(text) >= 10:
        return text[:10]
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return text[:10]
    if moment.tzinfo is None:
        return moment.date().isoformat()
    return moment.astimezone(UTC).date().isoformat()


#: one `reconcile_inbound` record: tenant, authorization (correlation) id, accepted event id,
#: transmission day (UTC), amount (minor units), currency
InboundRow = tuple[str, str, str, str, int, str]


def inbound_row(e: Event) -> InboundRow:
    """The inbound record of an `AuthorizationAccepted` event (pure): what both backends
    store (`track` here, `paypost.distributed.state.record_inbound` on PostgreSQL)."""
    req = e.detail.get("request") or {}
    amount = req.get("amount") or {}
    return (
        e.tenant,
        e.correlation_id,
        e.id,
        _utc_day(str(req.get("transmission_time") or e.time)),
        int(amount.get("minor") or 0),
        str(amount.get("currency") or ""),
    )


def track(conn: sqlite3.Connection, events: Iterable[Event]) -> None:
    """The pipeline's per-batch record for reconciliation (in the caller's unit of work):
    each `AuthorizationAccepted` and each non-posting terminal event. One pass, two
    `executemany` with append-only keys: a few µs per authorization."""
    accepted: list[InboundRow] = []
    outcomes: list[tuple[str, str, str, str, str | None]] = []
    for e in events:
        dt = e.detail_type
        if dt == "AuthorizationAccepted":
            accepted.append(inbound_row(e))
        else:
            state = NON_POSTING.get(dt)
            if state is not None:
                reason = e.detail.get("reason")
                outcomes.append(
                    (
                        e.tenant,
                        e.correlation_id,
                        state,
                        e.id,
                        None if reason is None else str(reason),
                    )
                )
    if accepted:
        conn.executemany(
            "INSERT INTO reconcile_inbound (tenant, auth_id, accepted_id, day, amount, currency) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            accepted,
        )
    if outcomes:
        conn.executemany(
            "INSERT INTO reconcile_outcomes (tenant, auth_id, state, event_id, reason) "
            "VALUES (?, ?, ?, ?, ?)",
            outcomes,
        )


def backfill_from_archive(conn: sqlite3.Connection, progress: Progress | None = None) -> int:
    """One-time, for a database whose pipeline ran before `reconcile_inbound` existed: fill
    the inbound and outcome records from the archived events (one scan), in the caller's
    transaction. Does nothing if the records are already kept (or were backfilled). Returns
    the accepted authorizations recorded."""
    if conn.execute("SELECT 1 FROM reconcile_inbound LIMIT 1").fetchone() is not None:
        return 0
    if conn.execute("SELECT 1 FROM reconcile_meta WHERE key = 'backfilled'").fetchone():
        return 0
    if not _table_exists(conn, "bus_archive"):
        return 0
    from paypost.bus.core import decode_event

    wanted = ("AuthorizationAccepted", *NON_POSTING)
    clause = " OR ".join("CAST(body AS TEXT) LIKE ?" for _ in wanted)
    args = [f'%"detail-type":"{dt}"%' for dt in wanted]
    cur = conn.execute(f"SELECT body FROM bus_archive WHERE {clause} ORDER BY position", args)
    seen: set[str] = set()
    accepted = 0
    while True:
        rows = cur.fetchmany(5_000)
        if not rows:
            break
        events = []
        for (body,) in rows:
            ev = decode_event(body)
            if ev.id not in seen and ev.detail_type in wanted:
                seen.add(ev.id)
                events.append(ev)
                accepted += ev.detail_type == "AuthorizationAccepted"
        track(conn, events)
        if progress is not None:
            progress("backfilling from the archive", accepted, 0)
    # Remember that the archive was read (a database with no authorization at all).
    conn.execute(
        "INSERT OR REPLACE INTO reconcile_meta (key, value) VALUES ('backfilled', ?)",
        (f"{accepted} accepted authorizations read from the archive at {now_text()}",),
    )
    return accepted


# --------------------------------------------------------------------------------------------
# The views (plain data)


class InboundAuth(msgspec.Struct, frozen=True, kw_only=True):
    tenant: str
    auth_id: str
    accepted_id: str
    day: str
    amount: int
    currency: str


class EntryView(msgspec.Struct, frozen=True, kw_only=True):
    """One ledger entry as the reconciler sees it. `settled`: the signed sum of its settlement
    legs (credits positive: a purchase is positive, a refund negative), in `currency`."""

    pk: int
    tenant: str
    id: str
    day: str
    sequence_id: str | None
    transaction_ref: str | None
    reversal_of: str | None
    settled: int
    currency: str | None
    account: str | None
    account_currency: str | None = None  # the customer account's currency
    patch_break: str | None = None  # the reconciliation break this entry patches
    adjusts: str | None = None  # the entry an adjustment corrects


class FileRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One posting-file detail record: where it is, and what it says about the entry."""

    entry_id: str
    tenant: str
    batch_id: str
    seq: int
    day: str
    account: str
    settled: int
    currency: str | None
    after_snapshot: bool = False  # exported from outbox rows newer than the ledger snapshot


class Views(msgspec.Struct, kw_only=True):
    inbound: list[InboundAuth]
    outcomes: dict[tuple[str, str], tuple[str, str | None]]  # (tenant, auth) -> state, reason
    entries: list[EntryView]
    file_records: list[FileRecord] | None  # None: the file is not checked
    queued_entries: set[tuple[str, str]]  # in the outbox, not yet in the file
    in_flight: set[tuple[str, str]]  # (tenant, auth id) with an event in a stage queue
    dead_letters: dict[tuple[str, str], list[dict[str, Any]]]  # (tenant, auth) -> DLQ items
    breaks: dict[str, tuple[str, str | None, str | None]]  # break id -> status, entry, note
    outbox_high_water: int = 0  # the last outbox id in the snapshot


Progress = Callable[[str, int, int], None]


def no_progress(step: str, done: int, total: int) -> None:
    return None


_DAY_US = 86_400_000_000


def day_of_micros(us: int, cache: dict[int, str]) -> str:
    n = us // _DAY_US
    day = cache.get(n)
    if day is None:
        day = cache[n] = (date(1970, 1, 1) + timedelta(days=n)).isoformat()
    return day


def has_ledger(conn: sqlite3.Connection) -> bool:
    return ledger_sqlite.schema_exists(conn)


def load_views(
    conn: sqlite3.Connection,
    scope: Scope,
    *,
    posting_file: Path | None,
    progress: Progress = no_progress,
) -> Views:
    """Read the three views (set-based queries, one pass each). Read-only.

    The database views come from ONE read transaction (a consistent snapshot under WAL, which
    never blocks the pipeline's writer), so an authorization posted while the reconciler reads
    is either wholly in the views or wholly out. The posting file is read after the snapshot:
    a record exported meanwhile was still in the snapshot's outbox; one written from rows
    newer than the snapshot is marked `after_snapshot` (never an orphan)."""
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN")
    try:
        views = _load_db_views(conn, scope, progress, outbox=posting_file is not None)
    finally:
        if own:
            conn.execute("COMMIT")
    if posting_file is not None:
        views.file_records = (
            read_posting_file(
                posting_file, scope.tenant, progress, snapshot_outbox_id=views.outbox_high_water
            )
            if posting_file.exists()
            else []
        )
    return views


def _load_db_views(
    conn: sqlite3.Connection, scope: Scope, progress: Progress, *, outbox: bool
) -> Views:
    ensure_schema_readonly = _table_exists(conn, "reconcile_inbound")
    tenant = scope.tenant
    inbound: list[InboundAuth] = []
    outcomes: dict[tuple[str, str], tuple[str, str | None]] = {}
    if ensure_schema_readonly:
        progress("authorizations in", 0, 0)
        sql = "SELECT tenant, auth_id, accepted_id, day, amount, currency FROM reconcile_inbound"
        args: list[Any] = []
        where = []
        if tenant is not None:
            where.append("tenant = ?")
            args.append(tenant)
        if scope.first_day is not None:
            where.append("day >= ?")
            args.append(scope.first_day)
        if scope.last_day is not None:
            where.append("day <= ?")
            args.append(scope.last_day)
        if where:
            sql += " WHERE " + " AND ".join(where)
        seen: set[tuple[str, str]] = set()
        for t, auth, acc, day, amount, ccy in conn.execute(sql + " ORDER BY seq", args):
            if (t, auth) in seen:
                continue  # recorded twice (a replayed dedup output): one authorization
            seen.add((t, auth))
            inbound.append(
                InboundAuth(
                    tenant=t, auth_id=auth, accepted_id=acc, day=day, amount=amount, currency=ccy
                )
            )
        progress("authorizations in", len(inbound), len(inbound))
        for t, auth, state, reason in conn.execute(
            "SELECT tenant, auth_id, state, reason FROM reconcile_outcomes"
            + (" WHERE tenant = ?" if tenant is not None else "")
            + " ORDER BY seq",
            [tenant] if tenant is not None else [],
        ):
            outcomes.setdefault((t, auth), (state, reason))
    entries = _load_entries(conn, tenant, progress)
    queued: set[tuple[str, str]] = set()
    high_water = 0
    if outbox and _table_exists(conn, "assembly_posting_outbox"):
        dec = msgspec.json.Decoder(PostingRecord)
        for (blob,) in conn.execute("SELECT record FROM assembly_posting_outbox"):
            r = dec.decode(blob)
            queued.add((r.tenant, r.entry_id))
        row = conn.execute(
            "SELECT seq FROM sqlite_sequence WHERE name = 'assembly_posting_outbox'"
        ).fetchone()
        high_water = int(row[0]) if row is not None else 0
    in_flight, dead = _queued_work(conn, tenant)
    breaks: dict[str, tuple[str, str | None, str | None]] = {}
    if ensure_schema_readonly:
        for bid, status, entry_id, note in conn.execute(
            "SELECT break_id, status, entry_id, note FROM reconcile_breaks"
        ):
            breaks[bid] = (status, entry_id, note)
    return Views(
        inbound=inbound,
        outcomes=outcomes,
        entries=entries,
        file_records=None,
        queued_entries=queued,
        outbox_high_water=high_water,
        in_flight=in_flight,
        dead_letters=dead,
        breaks=breaks,
    )


def _table_exists(conn: sqlite3.Connection, name: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)
    ).fetchone()
    return row is not None


_ENTRY_SQL = """
SELECT e.pk, e.tenant, e.id, e.booked_at, e.sequence_id, e.reversal_of,
       e.metadata ->> '$.transaction_ref',
       e.metadata ->> '$.reconciliation.break_id',
       e.metadata ->> '$.reconciliation.adjusts',
       SUM(CASE WHEN a.role = 'settlement' THEN l.amount ELSE 0 END),
       MAX(CASE WHEN a.role = 'settlement' THEN a.currency END),
       MIN(CASE WHEN a.kind = 'customer' THEN a.id END),
       MIN(CASE WHEN a.kind = 'customer' THEN a.currency END)
FROM ledger_entries e
JOIN ledger_legs l ON l.entry_pk = e.pk
JOIN ledger_accounts a ON a.pk = l.account_pk
{where}
GROUP BY e.pk
ORDER BY e.pk
"""


def _load_entries(
    conn: sqlite3.Connection, tenant: str | None, progress: Progress
) -> list[EntryView]:
    if not ledger_sqlite.schema_exists(conn):
        return []
    (total,) = conn.execute(
        "SELECT count(*) FROM ledger_entries" + (" WHERE tenant = ?" if tenant else ""),
        [tenant] if tenant else [],
    ).fetchone()
    sql = _ENTRY_SQL.format(where="WHERE e.tenant = ?" if tenant is not None else "")
    out: list[EntryView] = []
    days: dict[int, str] = {}
    cur = conn.execute(sql, [tenant] if tenant is not None else [])
    while True:
        rows = cur.fetchmany(20_000)
        if not rows:
            break
        out += [entry_view(row[1], row[:1] + row[2:], days) for row in rows]
        progress("ledger entries", len(out), total)
    return out


def entry_view(tenant: str, row: Sequence[Any], days: dict[int, str]) -> EntryView:
    """The ledger view of one entry from its row (pk, id, booked_at µs, sequence id,
    reversal_of, transaction ref, patch break, adjusts, settled, currency, account, account
    currency), as both backends' entry queries select it; DAYS caches day_of_micros."""
    pk, eid, booked, seq, rev, ref, brk, adj, settled, ccy, account, acc_ccy = row
    return EntryView(
        pk=int(pk),
        tenant=tenant,
        id=eid,
        day=day_of_micros(int(booked), days),
        sequence_id=seq,
        transaction_ref=ref,
        reversal_of=rev,
        settled=int(settled or 0),
        currency=ccy,
        account=account,
        account_currency=acc_ccy,
        patch_break=brk,
        adjusts=adj,
    )


_DETAIL_INDEX = {name: i for i, name in enumerate(DETAIL_FIELDS)}


_OUTBOX_BATCH = re.compile(r"[a-z]+-(\d+)-(\d+)")


def read_posting_file(
    path: Path,
    tenant: str | None = None,
    progress: Progress = no_progress,
    *,
    snapshot_outbox_id: int | None = None,
) -> list[FileRecord]:
    """The detail records of the posting file (one pass; complete batches only). Records of
    batches holding outbox ids above SNAPSHOT_OUTBOX_ID are marked `after_snapshot`."""
    i_entry = _DETAIL_INDEX["entry_id"]
    i_tenant = _DETAIL_INDEX["tenant"]
    i_seq = _DETAIL_INDEX["seq"]
    i_booked = _DETAIL_INDEX["booked_at"]
    i_account = _DETAIL_INDEX["account_id"]
    i_legs = _DETAIL_INDEX["legs"]
    out: list[FileRecord] = []
    batch: list[FileRecord] = []
    batch_id = ""
    newer = False
    with path.open(encoding="utf-8", newline="") as fh:
        for row in csv.reader(fh):
            if not row:
                continue
            kind = row[0]
            if kind == "H":
                batch_id = row[3] if len(row) > 3 else ""
                batch = []
                m = _OUTBOX_BATCH.fullmatch(batch_id)
                newer = (
                    snapshot_outbox_id is not None
                    and m is not None
                    and int(m.group(2)) > snapshot_outbox_id
                )
            elif kind == "D" and len(row) > i_legs:
                if tenant is not None and row[i_tenant] != tenant:
                    continue
                settled = 0
                ccy: str | None = None
                for leg in row[i_legs].split("|"):
                    parts = leg.rsplit(":", 3)
                    if len(parts) == 4 and parts[0].startswith("settlement-"):
                        minor = int(parts[2])
                        settled += minor if parts[1] == "C" else -minor
                        ccy = parts[3]
                batch.append(
                    FileRecord(
                        entry_id=row[i_entry],
                        tenant=row[i_tenant],
                        batch_id=batch_id,
                        seq=int(row[i_seq]),
                        day=_utc_day(row[i_booked]),
                        account=row[i_account],
                        settled=settled,
                        currency=ccy,
                        after_snapshot=newer,
                    )
                )
            elif kind == "T":
                out.extend(batch)  # a batch counts once its trailer is written
                batch = []
                if len(out) % 50_000 < 10_000:
                    progress("posting file records", len(out), 0)
    progress("posting file records", len(out), len(out))
    return out


def _queued_work(
    conn: sqlite3.Connection, tenant: str | None
) -> tuple[set[tuple[str, str]], dict[tuple[str, str], list[dict[str, Any]]]]:
    """Authorizations with an event still in a stage queue (in flight) or dead-lettered."""
    in_flight: set[tuple[str, str]] = set()
    dead: dict[tuple[str, str], list[dict[str, Any]]] = {}
    if not _table_exists(conn, "bus_queue"):
        return in_flight, dead
    for t, corr, dt in conn.execute(
        "SELECT json_extract(CAST(a.body AS TEXT), '$.tenant'), "
        "json_extract(CAST(a.body AS TEXT), '$.\"correlation-id\"'), "
        "json_extract(CAST(a.body AS TEXT), '$.\"detail-type\"') "
        "FROM bus_queue q JOIN bus_archive a ON a.position = q.position"
    ):
        # Only an authorization's own way to its posting; an alert or a reconciliation event
        # waiting in a queue says nothing about it being processed.
        if dt in STAGE_INPUTS and (tenant is None or t == tenant):
            in_flight.add((t, corr))
    for t, corr, target, error, ev_id in conn.execute(
        "SELECT json_extract(CAST(a.body AS TEXT), '$.tenant'), "
        "json_extract(CAST(a.body AS TEXT), '$.\"correlation-id\"'), tg.name, d.error, "
        "json_extract(CAST(a.body AS TEXT), '$.id') "
        "FROM bus_dlq d JOIN bus_archive a ON a.position = d.position "
        "JOIN bus_targets tg ON tg.id = d.target_id"
    ):
        if tenant is None or t == tenant:
            dead.setdefault((t, corr), []).append(
                {"target": target, "event_id": ev_id, "error": error}
            )
    return in_flight, dead


# --------------------------------------------------------------------------------------------
# Classification (pure)


def expected_entry_id(tenant: str, accepted_event_id: str) -> str:
    """The journal entry id the pipeline gives an accepted authorization: the posting sequence
    id of its transaction, whose reference (pacs.008 TxId) is the accepted event's id
    compacted (`paypost.iso.iso20022`)."""
    return sequence_id_for(tenant, transaction_ref_for(accepted_event_id))


def transaction_ref_for(accepted_event_id: str) -> str:
    """The pacs.008 TxId the standardize stage gives an accepted authorization."""
    return message_id_for(accepted_event_id)


def break_id_for(tenant: str, kind: str, subject: str) -> str:
    """A break's id: derived, so the same break found again is the same break."""
    return derive_event_id(f"{tenant}/{kind}/{subject}", "reconcile-break", 0)


def patch_entry_id_for(break_id: str) -> str:
    """The id of the journal entry that patches BREAK_ID (posting it twice is a duplicate)."""
    return derive_event_id(break_id, "reconcile-patch", 0)


class Break(msgspec.Struct, kw_only=True):
    """One break, its evidence and its patch (planned, or done: see `status`)."""

    break_id: str
    kind: str
    tenant: str
    day: str | None
    account: str | None
    evidence: dict[str, Any]
    action: str  # redrive | reverse | adjust | hold | requeue
    reason: str  # why this patch
    patch_entry_id: str | None = None
    status: str = "new"  # new | open | held | patched | failed


class DaySummary(msgspec.Struct, kw_only=True):
    tenant: str
    day: str
    authorizations: int = 0
    matched: int = 0
    held: int = 0
    rejected: int = 0
    reversed: int = 0
    in_flight: int = 0
    breaks: dict[str, int] = msgspec.field(default_factory=dict)
    # Over the authorizations that have a live posting, per currency (minor units): what was
    # authorized and what the ledger's settlement side holds for them (adjustments included).
    authorized: dict[str, int] = msgspec.field(default_factory=dict)
    posted: dict[str, int] = msgspec.field(default_factory=dict)


class AccountSummary(msgspec.Struct, kw_only=True):
    tenant: str
    account: str
    breaks: dict[str, int] = msgspec.field(default_factory=dict)


class Report(msgspec.Struct, kw_only=True):
    scope: Scope
    authorizations: int
    entries: int
    file_records: int | None
    counts: dict[str, int]  # matched, held, rejected, reversed, in_flight + break kinds
    breaks: list[Break]
    days: list[DaySummary]
    accounts: list[AccountSummary]  # accounts with breaks
    open_breaks: int = 0  # breaks not yet patched (held ones included)
    seconds: float = 0.0


def classify(views: Views, config: ReconcileConfig, scope: Scope) -> Report:
    """Classify every authorization, entry and file record (FR10). Pure: no I/O."""
    by_key: dict[tuple[str, str], InboundAuth] = {}
    link: dict[tuple[str, str, str], tuple[str, str]] = {}  # (tenant, how, value) -> auth key
    expected: dict[tuple[str, str], str] = {}
    for auth in views.inbound:
        key = (auth.tenant, auth.auth_id)
        by_key[key] = auth
        ref = transaction_ref_for(auth.accepted_id)
        seq = sequence_id_for(auth.tenant, ref)
        expected[key] = seq
        link[(auth.tenant, "sequence_id", seq)] = key
        link[(auth.tenant, "transaction_ref", ref)] = key

    reversed_ids: dict[tuple[str, str], str] = {}
    adjustments: dict[tuple[str, str], int] = {}
    groups: dict[tuple[str, str], list[EntryView]] = {}
    orphans: list[EntryView] = []
    entries_by_id: dict[tuple[str, str], EntryView] = {}
    for e in views.entries:
        entries_by_id[(e.tenant, e.id)] = e
        if e.reversal_of is not None:
            reversed_ids[(e.tenant, e.reversal_of)] = e.id
            continue
        if e.patch_break is not None:
            if e.adjusts is not None:
                k = (e.tenant, e.adjusts)
                adjustments[k] = adjustments.get(k, 0) + e.settled
            continue
        owner: tuple[str, str] | None = None
        for how in config.match_on:
            value = e.sequence_id if how == "sequence_id" else e.transaction_ref
            if value is not None:
                owner = link.get((e.tenant, how, value))
                if owner is not None:
                    break
        if owner is None:
            orphans.append(e)
        else:
            groups.setdefault(owner, []).append(e)

    in_file: set[tuple[str, str]] | None = None
    if views.file_records is not None:
        in_file = {(r.tenant, r.entry_id) for r in views.file_records} | views.queued_entries
    redriven: set[tuple[str, str]] = set()  # expected entry ids of missing authorizations
    counts: dict[str, int] = dict.fromkeys(
        ("matched", "held", "rejected", "reversed", "in_flight", *BREAK_KINDS), 0
    )
    breaks: list[Break] = []
    days: dict[tuple[str, str], DaySummary] = {}

    def day_summary(tenant: str, day: str) -> DaySummary:
        s = days.get((tenant, day))
        if s is None:
            s = days[(tenant, day)] = DaySummary(tenant=tenant, day=day)
        return s

    def add_break(b: Break, summary: DaySummary | None) -> None:
        breaks.append(b)
        counts[b.kind] += 1
        if summary is not None:
            summary.breaks[b.kind] = summary.breaks.get(b.kind, 0) + 1

    for key, auth in by_key.items():
        tenant = auth.tenant
        s = day_summary(tenant, auth.day)
        s.authorizations += 1
        entries = groups.get(key, [])
        live = (
            [e for e in entries if (tenant, e.id) not in reversed_ids] if reversed_ids else entries
        )
        exp = expected[key]
        if not entries:
            outcome = views.outcomes.get(key)
            if outcome is not None:
                state = outcome[0]
                counts[state] += 1
                if state == "held":
                    s.held += 1
                else:
                    s.rejected += 1
                continue
            if key in views.in_flight:
                counts["in_flight"] += 1
                s.in_flight += 1
                continue
            evidence = _auth_evidence(auth, exp)
            redriven.add((tenant, exp))
            if in_file is not None:
                # A posting the ledger lost after its record reached the file: the re-driven
                # posting must not reach the file a second time.
                evidence["in_posting_file"] = (tenant, exp) in in_file
            dead = views.dead_letters.get(key)
            if dead:
                evidence["dead_letters"] = dead
            add_break(
                Break(
                    break_id=break_id_for(tenant, "missing", auth.auth_id),
                    kind="missing",
                    tenant=tenant,
                    day=auth.day,
                    account=None,
                    evidence=evidence,
                    action="redrive",
                    reason="accepted but never posted: re-drive the accepted authorization "
                    "from the archive through the pipeline",
                    patch_entry_id=exp,
                ),
                s,
            )
            continue
        if not live:
            counts["reversed"] += 1
            s.reversed += 1
            continue
        # Authorized vs posted, over the authorizations that have a live posting: equal per
        # currency when every one of them is matched.
        s.authorized[auth.currency] = s.authorized.get(auth.currency, 0) + auth.amount
        keeper = next((e for e in live if e.id == exp), None) or min(live, key=lambda e: e.pk)
        for extra in live:
            if extra is keeper:
                continue
            bid = break_id_for(tenant, "duplicate", extra.id)
            add_break(
                Break(
                    break_id=bid,
                    kind="duplicate",
                    tenant=tenant,
                    day=auth.day,
                    account=extra.account,
                    evidence={
                        **_auth_evidence(auth, exp),
                        "kept_entry_id": keeper.id,
                        "duplicate_entry_id": extra.id,
                        "duplicate_posted": {
                            "minor": abs(extra.settled),
                            "currency": extra.currency,
                        },
                        "entry_ids": sorted(e.id for e in live),
                    },
                    action="reverse",
                    reason=f"posted {len(live)} times: reverse the extra entry {extra.id}",
                    patch_entry_id=patch_entry_id_for(bid),
                ),
                s,
            )
        posted = keeper.settled + adjustments.get((tenant, keeper.id), 0)
        sign = -1 if keeper.settled < 0 else 1
        ccy = keeper.currency or ""
        s.posted[ccy] = s.posted.get(ccy, 0) + abs(posted)
        if config.compare_currency and keeper.currency != auth.currency:
            bid = break_id_for(tenant, "mismatch", f"{auth.auth_id}/currency/{keeper.currency}")
            add_break(
                Break(
                    break_id=bid,
                    kind="mismatch",
                    tenant=tenant,
                    day=auth.day,
                    account=keeper.account,
                    evidence={
                        **_auth_evidence(auth, exp),
                        "what": "currency",
                        "entry_id": keeper.id,
                        "posted": {"minor": abs(posted), "currency": keeper.currency},
                    },
                    action="hold",
                    reason="posted in another currency than authorized: held for review "
                    "(an adjustment cannot change a currency)",
                ),
                s,
            )
            continue
        diff = sign * auth.amount - posted
        if abs(diff) <= config.tolerance(auth.currency):
            counts["matched"] += 1
            s.matched += 1
            continue
        bid = break_id_for(tenant, "mismatch", f"{auth.auth_id}/amount/{posted}")
        limit = config.adjust_limit(auth.currency)
        adjustable = keeper.account is not None and _customer_in(keeper, auth.currency)
        if abs(diff) > limit:
            action, reason = (
                "hold",
                (
                    f"differs by {Money(abs(diff), auth.currency)}, above the auto-adjust limit "
                    f"{Money(limit, auth.currency)}: held awaiting approval"
                ),
            )
        elif not adjustable:
            action, reason = (
                "hold",
                (
                    "cross-currency entry: an adjustment in the transaction currency would not "
                    "reach the customer's account currency; held for review"
                ),
            )
        else:
            action, reason = (
                "adjust",
                (f"differs by {Money(abs(diff), auth.currency)}: post an adjustment entry"),
            )
        add_break(
            Break(
                break_id=bid,
                kind="mismatch",
                tenant=tenant,
                day=auth.day,
                account=keeper.account,
                evidence={
                    **_auth_evidence(auth, exp),
                    "what": "amount",
                    "entry_id": keeper.id,
                    "posted": {"minor": abs(posted), "currency": keeper.currency},
                    "difference": {"minor": diff * sign, "currency": auth.currency},
                    "adjustments": adjustments.get((tenant, keeper.id), 0) * sign,
                },
                action=action,
                reason=reason,
                patch_entry_id=patch_entry_id_for(bid),
            ),
            s,
        )

    for e in orphans:
        if not scope.has_day(e.day) or (e.tenant, e.id) in reversed_ids:
            continue
        bid = break_id_for(e.tenant, "orphan", e.id)
        add_break(
            Break(
                break_id=bid,
                kind="orphan",
                tenant=e.tenant,
                day=e.day,
                account=e.account,
                evidence={
                    "entry_id": e.id,
                    "sequence_id": e.sequence_id,
                    "transaction_ref": e.transaction_ref,
                    "posted": {"minor": abs(e.settled), "currency": e.currency},
                    "day": e.day,
                },
                action="hold",
                reason="posted with no accepted authorization: held for review "
                "(approving it reverses the entry)",
                patch_entry_id=patch_entry_id_for(bid),
            ),
            day_summary(e.tenant, e.day),
        )

    if views.file_records is not None:
        _classify_file(views, scope, entries_by_id, redriven, add_break, day_summary)

    accounts: dict[tuple[str, str], AccountSummary] = {}
    for b in breaks:
        known = views.breaks.get(b.break_id)
        if known is not None:
            b.status = known[0]
            if known[0] == "held":
                b.action = "hold"
        if b.account:
            a = accounts.get((b.tenant, b.account))
            if a is None:
                a = accounts[(b.tenant, b.account)] = AccountSummary(
                    tenant=b.tenant, account=b.account
                )
            a.breaks[b.kind] = a.breaks.get(b.kind, 0) + 1
    return Report(
        scope=scope,
        authorizations=len(by_key),
        entries=len(views.entries),
        file_records=None if views.file_records is None else len(views.file_records),
        counts=counts,
        breaks=breaks,
        days=[days[k] for k in sorted(days)],
        accounts=[accounts[k] for k in sorted(accounts)],
        open_breaks=sum(1 for b in breaks if b.status != "patched"),
    )


def _auth_evidence(auth: InboundAuth, expected_entry: str) -> dict[str, Any]:
    return {
        "authorization_id": auth.auth_id,
        "accepted_event_id": auth.accepted_id,
        "expected_entry_id": expected_entry,
        "authorized": {"minor": auth.amount, "currency": auth.currency},
        "day": auth.day,
    }


def _customer_in(entry: EntryView, currency: str) -> bool:
    """Is the entry a same-currency posting (customer account in the transaction currency)?
    Only then does an adjustment in the transaction currency reach the customer's account."""
    return entry.currency == currency and entry.account_currency == currency


def _classify_file(
    views: Views,
    scope: Scope,
    entries_by_id: Mapping[tuple[str, str], EntryView],
    redriven: set[tuple[str, str]],
    add_break: Callable[[Break, DaySummary | None], None],
    day_summary: Callable[[str, str], DaySummary],
) -> None:
    assert views.file_records is not None
    in_file: dict[tuple[str, str], list[FileRecord]] = {}
    for r in views.file_records:
        in_file.setdefault((r.tenant, r.entry_id), []).append(r)
    for key, e in entries_by_id.items():
        if not scope.has_day(e.day):
            continue
        recs = in_file.get(key)
        if not recs:
            if key in views.queued_entries:
                continue
            bid = break_id_for(e.tenant, "file_missing", e.id)
            add_break(
                Break(
                    break_id=bid,
                    kind="file_missing",
                    tenant=e.tenant,
                    day=e.day,
                    account=e.account,
                    evidence={
                        "entry_id": e.id,
                        "posted": {"minor": abs(e.settled), "currency": e.currency},
                    },
                    action="requeue",
                    reason="in the ledger but not in the posting file: queue its record again",
                ),
                day_summary(e.tenant, e.day),
            )
            continue
        if len(recs) > 1:
            bid = break_id_for(e.tenant, "file_duplicate", e.id)
            add_break(
                Break(
                    break_id=bid,
                    kind="file_duplicate",
                    tenant=e.tenant,
                    day=e.day,
                    account=e.account,
                    evidence={
                        "entry_id": e.id,
                        "file_records": [{"batch_id": r.batch_id, "seq": r.seq} for r in recs],
                    },
                    action="hold",
                    reason="the posting file holds this entry more than once: held for review "
                    "(the file is append-only; the core system must take the entry id once)",
                ),
                day_summary(e.tenant, e.day),
            )
        r = recs[0]
        if (
            r.settled != e.settled
            or r.currency != e.currency
            or r.account != (e.account or r.account)
        ):
            bid = break_id_for(e.tenant, "file_mismatch", f"{e.id}/{r.settled}/{r.currency}")
            add_break(
                Break(
                    break_id=bid,
                    kind="file_mismatch",
                    tenant=e.tenant,
                    day=e.day,
                    account=e.account,
                    evidence={
                        "entry_id": e.id,
                        "ledger": {
                            "minor": e.settled,
                            "currency": e.currency,
                            "account": e.account,
                        },
                        "file": {
                            "minor": r.settled,
                            "currency": r.currency,
                            "account": r.account,
                            "batch_id": r.batch_id,
                            "seq": r.seq,
                        },
                    },
                    action="hold",
                    reason="the posting file says otherwise than the ledger: held for review",
                ),
                day_summary(e.tenant, e.day),
            )
    for key, recs in in_file.items():
        if key in entries_by_id or key in redriven:
            # A record whose entry the ledger lost is the missing break's (re-driven, and then
            # in the ledger again under the same entry id), not a second break.
            continue
        r = recs[0]
        if not scope.has_day(r.day) or r.after_snapshot:
            continue
        bid = break_id_for(r.tenant, "file_orphan", r.entry_id)
        add_break(
            Break(
                break_id=bid,
                kind="file_orphan",
                tenant=r.tenant,
                day=r.day,
                account=r.account,
                evidence={
                    "entry_id": r.entry_id,
                    "file": {
                        "minor": r.settled,
                        "currency": r.currency,
                        "batch_id": r.batch_id,
                        "seq": r.seq,
                    },
                },
                action="hold",
                reason="the posting file holds a record with no ledger entry: held for review",
            ),
            day_summary(r.tenant, r.day),
        )


def reconcile(
    conn: sqlite3.Connection,
    scope: Scope | None = None,
    config: ReconcileConfig | None = None,
    *,
    posting_file: Path | None = None,
    progress: Progress = no_progress,
) -> Report:
    """Load the views and classify them (read-only): the dry run."""
    scope = scope or Scope()
    config = config or ReconcileConfig()
    started = time.perf_counter()
    views = load_views(
        conn,
        scope,
        posting_file=posting_file if config.check_posting_file else None,
        progress=progress,
    )
    progress("classifying", 0, 0)
    report = classify(views, config, scope)
    report.seconds = round(time.perf_counter() - started, 3)
    return report


# --------------------------------------------------------------------------------------------
# Applying the patches


class Redriver(Protocol):
    """Runs archived `AuthorizationAccepted` events through the real stages in the caller's
    unit of work (`paypost.pipeline.Pipeline.redrive`)."""

    def __call__(self, uow: Any, events: list[Event]) -> Any: ...


class BusLike(Protocol):
    conn: sqlite3.Connection

    def unit_of_work(self) -> Any: ...


@dataclass
class PatchOutcome:
    """What a real run did."""

    detected: int = 0  # breaks recorded for the first time (ReconciliationBreakDetected)
    patched: int = 0  # ReconciliationBreakPatched
    held: int = 0  # awaiting approval / review
    failed: int = 0  # a patch that could not be applied now (retried next run)
    unchanged: int = 0  # already patched or held before: nothing to do
    entries_posted: int = 0  # patch entries (reversals, adjustments, re-driven postings)
    exported: int = 0  # posting-file records written after the patches
    trial_balance_zero: bool = True
    details: list[dict[str, Any]] = field(default_factory=list)


def now_text() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def break_event(detail: Any, b: Break, stage: str, causation: str | None = None) -> Event:
    """The event of break B at STAGE (its id derives from the break id: published once)."""
    return new_event(
        detail,
        source=SOURCE,
        tenant=b.tenant,
        id=derive_event_id(b.break_id, stage, 0),
        correlation_id=str(b.evidence.get("authorization_id") or b.break_id),
        causation_id=causation,
    )


#: a re-driven authorization that did not end posted, held or rejected
NOT_POSTED = (
    "re-driven, but not posted yet (handed to a stage queue or dead-lettered); retried next run"
)


class BreakStore(Protocol):
    """The storage half of the patch flow (`run_patches`): where a backend keeps its breaks
    (`reconcile_breaks`), reads and posts ledger entries, queues posting-file records and
    finds what a re-drive needs. `SqliteBreakStore` (embedded) and
    `paypost.distributed.reconcile.PostgresBreakStore`; the flow itself is one."""

    def unit_of_work(self) -> Any: ...

    def ensure_schema(self, uow: Any) -> None: ...

    def record(self, uow: Any, breaks: Sequence[Break]) -> list[Break]:
        """Record the breaks not recorded before; those, in order."""
        ...

    def mark(
        self, uow: Any, b: Break, status: str, entry_id: str | None, note: str | None, action: str
    ) -> None:
        """Store B's status, entry, note and action (and the time, when patched)."""
        ...

    def get_entry(self, uow: Any, tenant: str, entry_id: str) -> PostedEntry | None: ...

    def post(self, uow: Any, entry: JournalEntry) -> PostResult: ...

    def queue(self, uow: Any, records: list[PostingRecord]) -> None:
        """Queue posting-file records (the outbox) in UOW."""
        ...

    def trial_balance_zero(self, tenant: str) -> bool: ...

    # Re-driving missing authorizations

    def archived(self, event_ids: Sequence[str]) -> dict[str, Event]:
        """The archived `AuthorizationAccepted` events with these ids."""
        ...

    def has_entry(self, uow: Any, tenant: str, entry_id: str) -> bool:
        """Whether the ledger holds the entry, as UOW sees it (its own postings included)."""
        ...

    def forget_complete(self, uow: Any, sequence_ids: list[str]) -> None:
        """Drop the assembler's memory of these sequences as complete."""
        ...

    def outbox_high_water(self, uow: Any) -> int | None:
        """The last posting-file outbox id queued (None: no outbox)."""
        ...

    def drop_queued(self, uow: Any, after: int, entry_ids: list[str]) -> None:
        """Delete the outbox records of ENTRY_IDS queued after outbox id AFTER."""
        ...

    def ended(self, uow: Any, tenant: str, auth_id: str) -> tuple[str, str | None] | None:
        """The last non-posting end (state, reason) of the authorization, if any."""
        ...


def record_breaks(store: BreakStore, uow: Any, breaks: Sequence[Break]) -> list[Break]:
    """Record breaks not seen before and publish their ReconciliationBreakDetected events."""
    if not breaks:
        return []
    fresh = store.record(uow, breaks)
    if fresh:
        uow.publish(
            [
                break_event(
                    ReconciliationBreakDetected(
                        break_id=b.break_id,
                        kind=b.kind,
                        evidence={**b.evidence, "planned_action": b.action, "reason": b.reason},
                    ),
                    b,
                    "reconcile-detected",
                )
                for b in fresh
            ],
            dedup=True,
        )
    return fresh


def mark(
    store: BreakStore,
    uow: Any,
    b: Break,
    status: str,
    entry_id: str | None,
    note: str | None,
    action: str,
) -> None:
    store.mark(uow, b, status, entry_id, note, action)
    b.status = status


def patched(
    store: BreakStore, uow: Any, b: Break, action: str, entry_id: str | None, note: str
) -> None:
    """Mark B patched and publish its ReconciliationBreakPatched event."""
    mark(store, uow, b, "patched", entry_id, note, action)
    uow.publish(
        [
            break_event(
                ReconciliationBreakPatched(break_id=b.break_id, action=action, entry_id=entry_id),
                b,
                "reconcile-patched",
                causation=derive_event_id(b.break_id, "reconcile-detected", 0),
            )
        ],
        dedup=True,
    )


def _link_meta(b: Break, action: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"break_id": b.break_id, "kind": b.kind, "action": action}
    if extra:
        meta.update(extra)
    return meta


def reversal_patch(b: Break, original: PostedEntry, entry_id: str) -> JournalEntry:
    """The reversal of ORIGINAL that patches B, linked to it (reversal_of) and to the break."""
    return JournalEntry(
        id=entry_id,
        tenant=original.tenant,
        legs=tuple(
            Leg(
                account=lg.account,
                side="credit" if lg.side == "debit" else "debit",
                amount=lg.amount,
            )
            for lg in original.legs
        ),
        sequence_id=original.sequence_id,
        source_event_id=original.source_event_id,
        reversal_of=original.id,
        booked_at=original.booked_at,
        description=f"reconciliation {b.kind} {b.break_id}: reversal of {original.id}",
        metadata={
            **{k: v for k, v in original.metadata.items() if k != "reconciliation"},
            "reconciliation": _link_meta(b, "reverse"),
        },
    )


def adjustment_patch(b: Break, entry: PostedEntry, entry_id: str, difference: int) -> JournalEntry:
    """The adjustment that moves DIFFERENCE (signed, settlement-side: positive credits the
    settlement account) between the entry's settlement account and its counterparty in the
    same currency (the customer account of a same-currency posting)."""
    settlement = [lg for lg in entry.legs if lg.account.startswith("settlement-")]
    if len(settlement) != 1:
        raise ValueError(f"entry {entry.id} has {len(settlement)} settlement legs; expected one")
    s = settlement[0]
    ccy = s.amount.currency
    counter = [
        lg for lg in entry.legs if lg is not s and lg.side != s.side and lg.amount.currency == ccy
    ]
    if not counter:
        raise ValueError(f"entry {entry.id} has no counterparty leg in {ccy} to adjust against")
    other = max(counter, key=lambda lg: lg.amount.minor).account
    amount = Money(abs(difference), ccy)
    up = difference > 0
    legs = (
        Leg(account=s.account, side="credit" if up else "debit", amount=amount),
        Leg(account=other, side="debit" if up else "credit", amount=amount),
    )
    return JournalEntry(
        id=entry_id,
        tenant=entry.tenant,
        legs=legs,
        booked_at=entry.booked_at,
        description=f"reconciliation mismatch {b.break_id}: adjustment of {entry.id} by "
        f"{'+' if up else '-'}{amount}",
        metadata={
            "transaction_ref": entry.metadata.get("transaction_ref"),
            "reconciliation": _link_meta(b, "adjust", {"adjusts": entry.id}),
        },
    )


_INTERNAL_PREFIXES = ("settlement", "fx", "fees")


def posting_record(entry: JournalEntry) -> PostingRecord:
    """ENTRY's posting-file record (leg roles inferred from the account names if missing)."""
    meta = dict(entry.metadata)
    roles = meta.get("roles")
    if not roles or len(roles) != len(entry.legs):
        meta["roles"] = [
            None if leg.account.split("-")[0] in _INTERNAL_PREFIXES else "customer"
            for leg in entry.legs
        ]
    return record_for(entry, meta)


@dataclass
class SqliteBreakStore:
    """`BreakStore` of the embedded backend: the bus's SQLite database."""

    bus: BusLike

    def unit_of_work(self) -> Any:
        return self.bus.unit_of_work()

    def ensure_schema(self, uow: Any) -> None:
        ensure_schema(uow.conn)

    def record(self, uow: Any, breaks: Sequence[Break]) -> list[Break]:
        fresh: list[Break] = []
        now = now_text()
        for b in breaks:
            cur = uow.conn.execute(
                "INSERT OR IGNORE INTO reconcile_breaks (break_id, tenant, kind, status, action, "
                "entry_id, evidence, note, detected_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    b.break_id,
                    b.tenant,
                    b.kind,
                    "held" if b.action == "hold" else "open",
                    b.action,
                    None,
                    msgspec.json.encode(b.evidence).decode(),
                    b.reason,
                    now,
                ),
            )
            if cur.rowcount:
                fresh.append(b)
        return fresh

    def mark(
        self, uow: Any, b: Break, status: str, entry_id: str | None, note: str | None, action: str
    ) -> None:
        uow.conn.execute(
            "UPDATE reconcile_breaks SET status = ?, entry_id = ?, note = ?, action = ?, "
            "patched_at = CASE WHEN ? = 'patched' THEN ? ELSE patched_at END WHERE break_id = ?",
            (status, entry_id, note, action, status, now_text(), b.break_id),
        )

    def get_entry(self, uow: Any, tenant: str, entry_id: str) -> PostedEntry | None:
        return ledger_sqlite.get_entry_in(uow.conn, tenant, entry_id)

    def post(self, uow: Any, entry: JournalEntry) -> PostResult:
        return ledger_sqlite.post_batch_in(uow.conn, [entry])[0]

    def queue(self, uow: Any, records: list[PostingRecord]) -> None:
        add_to_outbox(uow.conn, records)

    def trial_balance_zero(self, tenant: str) -> bool:
        return ledger_sqlite.trial_balance_in(self.bus.conn, tenant).balanced

    def archived(self, event_ids: Sequence[str]) -> dict[str, Event]:
        return _archived_events(self.bus.conn, event_ids)

    def has_entry(self, uow: Any, tenant: str, entry_id: str) -> bool:
        return ledger_sqlite.get_entry_in(uow.conn, tenant, entry_id) is not None

    def forget_complete(self, uow: Any, sequence_ids: list[str]) -> None:
        if _table_exists(uow.conn, "assembly_sequences"):
            uow.conn.execute(
                "DELETE FROM assembly_sequences WHERE state = 'complete' AND sequence_id IN "
                "(SELECT value FROM json_each(?))",
                (msgspec.json.encode(sequence_ids).decode(),),
            )

    def outbox_high_water(self, uow: Any) -> int | None:
        if not _table_exists(uow.conn, "assembly_posting_outbox"):
            return None
        (last,) = uow.conn.execute(
            "SELECT COALESCE(MAX(id), 0) FROM assembly_posting_outbox"
        ).fetchone()
        return int(last)

    def drop_queued(self, uow: Any, after: int, entry_ids: list[str]) -> None:
        uow.conn.execute(
            "DELETE FROM assembly_posting_outbox WHERE id > ? AND "
            "json_extract(CAST(record AS TEXT), '$.entry_id') IN "
            "(SELECT value FROM json_each(?))",
            (after, msgspec.json.encode(entry_ids).decode()),
        )

    def ended(self, uow: Any, tenant: str, auth_id: str) -> tuple[str, str | None] | None:
        row = uow.conn.execute(
            "SELECT state, reason FROM reconcile_outcomes WHERE tenant = ? AND "
            "auth_id = ? ORDER BY seq DESC LIMIT 1",
            (tenant, auth_id),
        ).fetchone()
        return None if row is None else (row[0], row[1])


def apply_patches(
    bus: BusLike,
    report: Report,
    *,
    config: ReconcileConfig | None = None,
    redrive: Callable[[], Redriver] | None = None,
    export: Callable[[], int] | None = None,
    progress: Progress = no_progress,
) -> PatchOutcome:
    """Carry out REPORT's patch plan (idempotent; see the module docs).

    REDRIVE builds the re-driver (the pipeline) on first need; without it, missing
    authorizations stay open (`failed`, with the reason). EXPORT writes the posting file after
    the patches (the outbox records they queued)."""
    return run_patches(
        SqliteBreakStore(bus),
        report,
        config=config,
        redrive=redrive,
        export=export,
        progress=progress,
    )


def run_patches(
    store: BreakStore,
    report: Report,
    *,
    config: ReconcileConfig | None = None,
    redrive: Callable[[], Redriver] | None = None,
    export: Callable[[], int] | None = None,
    progress: Progress = no_progress,
) -> PatchOutcome:
    """`apply_patches` on any backend's STORE: the one patch flow."""
    config = config or ReconcileConfig()
    out = PatchOutcome()
    with store.unit_of_work() as uow:
        store.ensure_schema(uow)
        fresh = record_breaks(store, uow, report.breaks)
    out.detected = len(fresh)
    todo = [b for b in report.breaks if b.status not in ("patched", "held")]
    out.unchanged = len(report.breaks) - len(todo)
    for b in report.breaks:
        if b.status == "held" or (b.action == "hold" and b.status != "patched"):
            b.status = "held"
    held = [b for b in todo if b.action == "hold"]
    out.held = sum(1 for b in report.breaks if b.status == "held")
    for b in held:
        out.details.append({"break_id": b.break_id, "kind": b.kind, "status": "held"})
    done = 0
    total = len(todo)
    # Money-moving patches of one kind share a unit of work (one transaction).
    ledger_work = [b for b in todo if b.action in ("reverse", "adjust", "requeue")]
    if ledger_work:
        with store.unit_of_work() as uow:
            for b in ledger_work:
                apply_ledger_patch(store, uow, b, out)
                done += 1
                progress("patching", done, total)
    missing = [b for b in todo if b.action == "redrive"]
    if missing:
        _apply_redrives(store, missing, config, redrive, out, progress, done, total)
    if export is not None:
        out.exported = export()
    tenants = sorted({b.tenant for b in report.breaks})
    for tenant in tenants:
        out.trial_balance_zero = out.trial_balance_zero and store.trial_balance_zero(tenant)
    return out


def apply_ledger_patch(store: BreakStore, uow: Any, b: Break, out: PatchOutcome) -> None:
    """B's requeue, reversal or adjustment, in UOW."""
    if b.action == "requeue":
        entry = store.get_entry(uow, b.tenant, str(b.evidence["entry_id"]))
        if entry is None:
            mark(store, uow, b, "failed", None, "the entry is no longer in the ledger", b.action)
            out.failed += 1
            return
        store.queue(uow, [posting_record(journal_of(entry))])
        patched(store, uow, b, "requeue", entry.id, "posting-file record queued again")
        out.patched += 1
        out.details.append({"break_id": b.break_id, "kind": b.kind, "status": "patched"})
        return
    target_id = str(
        b.evidence["duplicate_entry_id"] if b.action == "reverse" else b.evidence["entry_id"]
    )
    target = store.get_entry(uow, b.tenant, target_id)
    if target is None:
        mark(store, uow, b, "failed", None, f"entry {target_id} is not in the ledger", b.action)
        out.failed += 1
        return
    assert b.patch_entry_id is not None
    if b.action == "reverse":
        patch = reversal_patch(b, target, b.patch_entry_id)
    else:
        diff = int(b.evidence["difference"]["minor"])
        settled_sign = settlement_sign(target)
        try:
            patch = adjustment_patch(b, target, b.patch_entry_id, diff * settled_sign)
        except ValueError as exc:
            mark(store, uow, b, "held", None, f"cannot adjust automatically: {exc}", "hold")
            out.held += 1
            return
    result = store.post(uow, patch)
    if not result.applied:
        mark(store, uow, b, "failed", None, f"ledger {result.status}: {result.reason}", b.action)
        out.failed += 1
        out.details.append(
            {"break_id": b.break_id, "kind": b.kind, "status": "failed", "reason": result.reason}
        )
        return
    if result.status == "posted":
        out.entries_posted += 1
        store.queue(uow, [posting_record(patch)])
    patched(store, uow, b, b.action, patch.id, b.reason)
    out.patched += 1
    out.details.append(
        {"break_id": b.break_id, "kind": b.kind, "status": "patched", "entry_id": patch.id}
    )


def settlement_sign(entry: PostedEntry) -> int:
    for lg in entry.legs:
        if lg.account.startswith("settlement-"):
            return 1 if lg.side == "credit" else -1
    return 1


def journal_of(p: PostedEntry) -> JournalEntry:
    return JournalEntry(
        id=p.id,
        tenant=p.tenant,
        legs=tuple(Leg(account=lg.account, side=lg.side, amount=lg.amount) for lg in p.legs),
        sequence_id=p.sequence_id,
        source_event_id=p.source_event_id,
        reversal_of=p.reversal_of,
        booked_at=p.booked_at,
        description=p.description,
        metadata=p.metadata,
    )


def _archived_events(conn: sqlite3.Connection, event_ids: Sequence[str]) -> dict[str, Event]:
    """The archived events with these ids (one pass over the archive's integer key column)."""
    from paypost.bus.core import decode_event, id_key

    keys = {id_key(i): i for i in event_ids}
    found: dict[str, Event] = {}
    if not keys:
        return found
    for (body,) in conn.execute(
        "SELECT body FROM bus_archive WHERE id_key IN (SELECT value FROM json_each(?)) "
        "ORDER BY position",
        (msgspec.json.encode(list(keys)).decode(),),
    ):
        ev = decode_event(body)
        if ev.id in event_ids and ev.id not in found:
            found[ev.id] = ev
    return found


def _apply_redrives(
    store: BreakStore,
    breaks: Sequence[Break],
    config: ReconcileConfig,
    redrive: Callable[[], Redriver] | None,
    out: PatchOutcome,
    progress: Progress,
    done: int,
    total: int,
) -> None:
    if redrive is None:
        with store.unit_of_work() as uow:
            for b in breaks:
                mark(store, uow, b, "failed", None, "no pipeline to re-drive through", "redrive")
        out.failed += len(breaks)
        return
    driver = redrive()
    archived = store.archived([str(b.evidence["accepted_event_id"]) for b in breaks])
    step = config.redrive_batch
    for start in range(0, len(breaks), step):
        chunk = breaks[start : start + step]
        with store.unit_of_work() as uow:
            events: list[Event] = []
            ready: list[Break] = []
            for b in chunk:
                ev = archived.get(str(b.evidence["accepted_event_id"]))
                if ev is None:
                    mark(
                        store,
                        uow,
                        b,
                        "held",
                        None,
                        "the accepted authorization is not in the archive (purged?): "
                        "held for review",
                        "hold",
                    )
                    out.held += 1
                    continue
                events.append(ev)
                ready.append(b)
            # The assembler remembers a sequence as complete once posted; the ledger does not
            # hold it (that is the break), so that memory is wrong: forget it, and the
            # re-driven legs assemble and post once (the ledger's entry id still guards).
            seqs = [
                str(b.evidence["expected_entry_id"])
                for b in ready
                if not store.has_entry(uow, b.tenant, str(b.evidence["expected_entry_id"]))
            ]
            if seqs:
                store.forget_complete(uow, seqs)
            in_file = [
                str(b.evidence["expected_entry_id"])
                for b in ready
                if b.evidence.get("in_posting_file")
            ]
            last_queued = store.outbox_high_water(uow)
            if events:
                driver(uow, events)
            if in_file and last_queued is not None:
                # the bank's file already holds this entry (the ledger lost it after export)
                store.drop_queued(uow, last_queued, in_file)
            for b in ready:
                entry_id = str(b.evidence["expected_entry_id"])
                if store.has_entry(uow, b.tenant, entry_id):
                    patched(store, uow, b, "redrive", entry_id, "re-driven through the pipeline")
                    out.patched += 1
                    out.entries_posted += 1
                    out.details.append(
                        {
                            "break_id": b.break_id,
                            "kind": b.kind,
                            "status": "patched",
                            "entry_id": entry_id,
                        }
                    )
                    continue
                ended = store.ended(uow, b.tenant, str(b.evidence["authorization_id"]))
                if ended is not None:
                    # Re-driven to a legitimate end without a posting (held / rejected).
                    note = f"re-driven: {ended[0]} ({ended[1]})"
                    patched(store, uow, b, "redrive", None, note)
                    out.patched += 1
                    out.details.append(
                        {
                            "break_id": b.break_id,
                            "kind": b.kind,
                            "status": "patched",
                            "ended": ended[0],
                        }
                    )
                    continue
                mark(store, uow, b, "failed", None, NOT_POSTED, "redrive")
                out.failed += 1
                out.details.append(
                    {
                        "break_id": b.break_id,
                        "kind": b.kind,
                        "status": "failed",
                        "reason": NOT_POSTED,
                    }
                )
        done += len(chunk)
        progress("patching", done, total)


def approve(
    bus: BusLike,
    break_id: str,
    *,
    export: Callable[[], int] | None = None,
) -> PatchOutcome:
    """Approve a held break: a held amount mismatch gets its adjustment entry; a held orphan
    (ledger) is reversed. Idempotent (the patch entry id derives from the break id)."""
    from paypost.config import UserError

    conn = bus.conn
    if not _table_exists(conn, "reconcile_breaks"):
        raise UserError("no reconciliation has run on this data dir yet: run `paypost reconcile`.")
    row = conn.execute(
        "SELECT tenant, kind, status, evidence FROM reconcile_breaks WHERE break_id = ?",
        (break_id,),
    ).fetchone()
    if row is None:
        raise UserError(
            f"break {break_id!r} is not known: list breaks with `paypost reconcile --dry-run`."
        )
    tenant, kind, status, evidence_text = row
    evidence = msgspec.json.decode(evidence_text)
    out = PatchOutcome()
    if status == "patched":
        out.unchanged = 1
        return out
    b = Break(
        break_id=break_id,
        kind=kind,
        tenant=tenant,
        day=evidence.get("day"),
        account=None,
        evidence=evidence,
        action="hold",
        reason="approved",
        patch_entry_id=patch_entry_id_for(break_id),
        status=status,
    )
    if kind == "mismatch" and evidence.get("what") == "amount":
        b.action = "adjust"
    elif kind == "orphan":
        b.action = "reverse"
        b.evidence = {**evidence, "duplicate_entry_id": evidence["entry_id"]}
    else:
        raise UserError(
            f"break {break_id} ({kind}) has no automatic patch to approve; resolve it by hand "
            "(see docs/reconciliation.md)."
        )
    with bus.unit_of_work() as uow:
        apply_ledger_patch(SqliteBreakStore(bus), uow, b, out)
    if export is not None:
        out.exported = export()
    out.trial_balance_zero = ledger_sqlite.trial_balance_in(conn, tenant).balanced
    return out


# --------------------------------------------------------------------------------------------
# Continuous mode


def run_every(
    interval_s: float,
    once: Callable[[], Any],
    *,
    stop: threading.Event | None = None,
    max_runs: int | None = None,
    sleep: Callable[[float], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
) -> int:
    """Run ONCE every INTERVAL_S seconds until STOP is set (or MAX_RUNS runs): the loop behind
    `paypost reconcile --every` and `paypost serve`. An error in one run is reported to
    ON_ERROR and the loop goes on. Returns the number of runs."""
    if interval_s <= 0:
        raise ValueError("the reconcile interval must be > 0 seconds")
    stop = stop or threading.Event()
    runs = 0
    while not stop.is_set():
        started = time.monotonic()
        try:
            once()
        except Exception as exc:
            if on_error is None:
                raise
            on_error(exc)
        runs += 1
        if max_runs is not None and runs >= max_runs:
            break
        wait = max(0.0, interval_s - (time.monotonic() - started))
        if sleep is not None:
            sleep(wait)
        else:
            stop.wait(wait)
    return runs
