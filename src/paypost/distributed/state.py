"""Stage state on PostgreSQL (distributed mode, issue 6): any worker can process any event.

PostgreSQL ports of the state that is SQLite-only in the embedded default, with the SAME
stage logic (the pure stages in `paypost.stages` decide; these classes only store):

- `PostgresDedupIndex`: the `DedupIndex` port of the dedup stage (FR3);
- `PostgresIngestStore`: ingest checkpoints, quarantine and sealed vault rows (FR1, FR11);
- pipeline counters: append-only deltas summed on read (no hot row shared by workers);
- review outcomes: each held or rejected transaction with its reason (DESIGN §3.3), the
  embedded `reconcile_outcomes` record, read by `paypost review --backend distributed`;
- the reconciler's inbound record: one row per `AuthorizationAccepted` (the embedded
  `reconcile_inbound`), written with the dedup stage's effects, read by `paypost reconcile
  --backend distributed` (`paypost.distributed.reconcile`), and its breaks
  (`reconcile_breaks`, the embedded table's columns);
- the pipeline's configuration documents (reference data version, rules text) that a job
  publishes and workers load at start: one source of truth for every worker. Holder
  personal data stays sealed at rest (`HolderCipher`, as in the SQLite refdata store).

Every class works on the caller's connection inside the caller's transaction and never
commits (the unit of work of `NatsBus` commits effects, tracking record and outbox together).
All tables live in one schema, `<prefix>_state`.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import msgspec
import psycopg
from psycopg import sql

from paypost.bus.nats import ConcurrentDelivery
from paypost.config import UserError
from paypost.events import Event
from paypost.pgarray import Int8Array, TextArray
from paypost.refdata.model import (
    Account,
    Branch,
    MerchantInfo,
    RateQuote,
    RefData,
    RefDataVersion,
    TenantSettings,
)
from paypost.refdata.store import HolderCipher
from paypost.stages.dedup import DedupEffects, KeySighting, SeenEvent, _parked_row
from paypost.stages.ingest import Checkpoint, IngestBatch, assert_no_clear_pan
from paypost.stages.reconcile import NON_POSTING, InboundRow, inbound_row

Conn = psycopg.Connection[Any]

_NAME_RE = re.compile(r"[a-z_][a-z0-9_]{0,40}")


def state_schema(prefix: str) -> str:
    name = f"{prefix}_state"
    if not _NAME_RE.fullmatch(name):
        raise UserError(
            f"prefix {prefix!r} must be a lowercase identifier (letters, digits, _), so that "
            f"{name!r} is a valid PostgreSQL schema name."
        )
    return name


_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.dedup_keys (
    ts BIGINT NOT NULL, key BIGINT NOT NULL, tenant TEXT NOT NULL, event_id TEXT NOT NULL,
    PRIMARY KEY (ts, key));
CREATE TABLE IF NOT EXISTS {s}.dedup_events (
    id_key BIGINT PRIMARY KEY, id_check BIGINT NOT NULL, content_hash BIGINT NOT NULL,
    ts BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.dedup_watermarks (tenant TEXT NOT NULL, high_water BIGINT NOT NULL);
CREATE INDEX IF NOT EXISTS dedup_watermarks_max ON {s}.dedup_watermarks (tenant, high_water);
CREATE TABLE IF NOT EXISTS {s}.dedup_parked (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, event_id TEXT NOT NULL UNIQUE,
    input_event_id TEXT NOT NULL, tenant TEXT NOT NULL, reason TEXT NOT NULL,
    business_key TEXT NOT NULL, original_event_id TEXT, transmission_time TEXT NOT NULL,
    parked_at TEXT NOT NULL, event TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.ingest_checkpoints (
    source TEXT PRIMARY KEY, position BIGINT NOT NULL, line BIGINT, state BYTEA NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS {s}.ingest_quarantine (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, source TEXT NOT NULL,
    tenant TEXT NOT NULL, position BIGINT NOT NULL, line BIGINT, kind TEXT NOT NULL,
    reason TEXT NOT NULL, record TEXT NOT NULL,
    quarantined_at TIMESTAMPTZ NOT NULL DEFAULT now(), UNIQUE (source, position, kind));
CREATE TABLE IF NOT EXISTS {s}.vault_pans (
    token TEXT PRIMARY KEY, tenant TEXT NOT NULL, key_id TEXT NOT NULL, nonce BYTEA NOT NULL,
    ciphertext BYTEA NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.review_outcomes (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, event_id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL, auth_id TEXT NOT NULL, state TEXT NOT NULL, reason TEXT,
    event_time TEXT NOT NULL, recorded_at TIMESTAMPTZ NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS {s}.reconcile_inbound (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, accepted_id TEXT NOT NULL,
    tenant TEXT NOT NULL, auth_id TEXT NOT NULL,
    day TEXT NOT NULL, amount BIGINT NOT NULL, currency TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.reconcile_breaks (
    break_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL,
    action TEXT NOT NULL, entry_id TEXT, evidence TEXT NOT NULL, note TEXT,
    detected_at TEXT NOT NULL, patched_at TEXT);
CREATE TABLE IF NOT EXISTS {s}.pipeline_counters (name TEXT NOT NULL, value BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.pipeline_config (name TEXT PRIMARY KEY, doc BYTEA NOT NULL)
"""


def ensure_schema(conn: Conn, schema: str) -> None:
    """Create the state tables if missing (no commit)."""
    s = sql.Identifier(schema)
    for stmt in _SCHEMA.split(";"):
        if stmt.strip():
            conn.execute(sql.SQL(stmt.strip()).format(s=s))


# --------------------------------------------------------------------------------------------
# Dedup index (FR3)


class PostgresDedupIndex:
    """The `DedupIndex` port on PostgreSQL. A business key two workers record at once clashes
    on the primary key: the later transaction fails and its redelivery parks the duplicate."""

    def __init__(self, conn: Conn, schema: str, *, held: Collection[int] = ()) -> None:
        self.conn = conn
        self.schema = schema
        self.s = sql.Identifier(schema)
        #: business keys whose lock this transaction already holds (`try_lock_keys`)
        self.held = held

    def seen_events(self, id_keys: Collection[int]) -> dict[int, SeenEvent]:
        if not id_keys:
            return {}
        rows = self.conn.execute(
            sql.SQL(
                "SELECT id_key, id_check, content_hash FROM {}.dedup_events WHERE id_key = ANY(%s)"
            ).format(self.s),
            (Int8Array(id_keys),),
        )
        return {int(k): SeenEvent(int(c), int(h)) for k, c, h in rows}

    def seen_keys(self, keys: Collection[tuple[int, int]]) -> dict[int, KeySighting]:
        if not keys:
            return {}
        # Two workers holding both copies of a duplicate would both find the key unseen and
        # one would fail on the primary key (a whole-batch retry). A transaction-scoped
        # advisory lock per business key, taken in key order (no deadlock), makes the
        # second wait for the first's commit and then see its key: it parks the duplicate.
        wanted = sorted({k for _, k in keys if k not in self.held})
        if wanted:
            self.conn.execute(
                "SELECT count(pg_advisory_xact_lock(k)) FROM unnest(%s::bigint[]) AS u(k)",
                (Int8Array(wanted),),
            )
        rows = self.conn.execute(
            sql.SQL(
                "SELECT k.key, k.event_id, k.ts FROM unnest(%s::bigint[], %s::bigint[]) "
                "AS u(ts, key) JOIN {}.dedup_keys AS k ON k.ts = u.ts AND k.key = u.key"
            ).format(self.s),
            (Int8Array([t for t, _ in keys]), Int8Array([k for _, k in keys])),
        )
        return {int(key): KeySighting(str(eid), int(ts)) for key, eid, ts in rows}

    def high_water(self, tenants: Collection[str]) -> dict[str, int]:
        if not tenants:
            return {}
        rows = self.conn.execute(
            sql.SQL(
                "SELECT tenant, max(high_water) FROM {}.dedup_watermarks WHERE tenant = ANY(%s) "
                "GROUP BY tenant"
            ).format(self.s),
            (list(tenants),),
        )
        return {str(t): int(h) for t, h in rows}

    def apply(self, effects: DedupEffects) -> None:
        s = self.s
        with self.conn.cursor() as cur:
            # One statement per table over arrays (unnest), not one per row: a batch of
            # 5,000 was 10,000 statements, each a PostgreSQL round of parse-bind-execute.
            if effects.keys:
                # plain INSERT: a clash means another worker recorded the key meanwhile
                ts, key, tenant, event_id = zip(*effects.keys, strict=True)
                cur.execute(
                    sql.SQL(
                        "INSERT INTO {}.dedup_keys (ts, key, tenant, event_id) SELECT * FROM "
                        "unnest(%s::bigint[], %s::bigint[], %s::text[], %s::text[])"
                    ).format(s),
                    (Int8Array(ts), Int8Array(key), TextArray(tenant), TextArray(event_id)),
                )
            if effects.events:
                idk, check, digest, ets = zip(*effects.events, strict=True)
                cur.execute(
                    sql.SQL(
                        "INSERT INTO {}.dedup_events (id_key, id_check, content_hash, ts) "
                        "SELECT * FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], "
                        "%s::bigint[]) ON CONFLICT DO NOTHING"
                    ).format(s),
                    (Int8Array(idk), Int8Array(check), Int8Array(digest), Int8Array(ets)),
                )
                # The stage records only ids it found unseen (index and batch): one already
                # there now was recorded by another worker since, processing the same event
                # at the same time (a lease ran out). This index is the fused worker's
                # tracking record, so, as a tracking record does, the later one rolls back.
                if cur.rowcount != len(idk):
                    raise ConcurrentDelivery(
                        f"dedup: {len(idk) - cur.rowcount} of {len(idk)} events were "
                        "processed by another worker meanwhile (a lease ran out); this batch "
                        "rolls back and finds them processed on redelivery."
                    )
            if effects.high_water:
                # append-only marks, max() on read: an upserted row per tenant would be locked
                # from the dedup stage to the commit and serialize every worker of the tenant
                cur.executemany(
                    sql.SQL(
                        "INSERT INTO {}.dedup_watermarks (tenant, high_water) VALUES (%s, %s)"
                    ).format(s),
                    list(effects.high_water.items()),
                )
            if effects.parked:
                cur.executemany(
                    sql.SQL(
                        "INSERT INTO {}.dedup_parked (event_id, input_event_id, tenant, reason,"
                        " business_key, original_event_id, transmission_time, parked_at, event)"
                        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
                    ).format(s),
                    [_parked_row(ev) for ev in effects.parked],
                )


def try_lock_keys(conn: Conn, keys: Collection[int]) -> set[int]:
    """Take the transaction-scoped advisory lock of each business key in KEYS that no other
    transaction holds, without waiting; return the keys another worker holds (its batch has
    a copy of the same authorization and has not committed yet).

    `PostgresDedupIndex.seen_keys` waits for every key's lock: taken at the start of a fused
    batch, one contended key made the whole batch wait for the other worker's whole batch
    (~1 % of authorizations are re-logged duplicates, usually a few records after their
    original, so most pairs of batches in flight shared a key: at 300,000 the workers waited
    141 ms per batch on average). A fused worker instead postpones the events whose keys are
    contended to a second unit of work (`Consumer.defer`), which waits for them then."""
    if not keys:
        return set()
    rows = conn.execute(
        "SELECT k FROM unnest(%s::bigint[]) AS u(k) WHERE NOT pg_try_advisory_xact_lock(k)",
        (Int8Array(sorted(keys)),),
    ).fetchall()
    return {int(k) for (k,) in rows}


def prune_dedup(conn: Conn, schema: str, tenant: str, window_seconds: int) -> int:
    """Forget TENANT's business keys older than its high-water mark minus the window, and
    event ids older than every tenant's horizon; compact the tenant's watermark rows to one.
    Safe for the same reason as the SQLite prune: such authorizations are parked as "late"
    before any lookup. A maintenance step (workers run it periodically). Returns rows
    deleted (keys and ids)."""
    s = sql.Identifier(schema)
    row = conn.execute(
        sql.SQL("SELECT max(high_water) FROM {}.dedup_watermarks WHERE tenant = %s").format(s),
        (tenant,),
    ).fetchone()
    if row is None or row[0] is None:
        return 0
    high = int(row[0])
    n = conn.execute(
        sql.SQL("DELETE FROM {}.dedup_keys WHERE tenant = %s AND ts < %s").format(s),
        (tenant, high - window_seconds),
    ).rowcount
    low = conn.execute(
        sql.SQL(
            "SELECT min(h) FROM (SELECT max(high_water) AS h FROM {}.dedup_watermarks "
            "GROUP BY tenant) AS t"
        ).format(s)
    ).fetchone()
    if low is not None and low[0] is not None:
        n += conn.execute(
            sql.SQL("DELETE FROM {}.dedup_events WHERE ts < %s").format(s),
            (int(low[0]) - window_seconds,),
        ).rowcount
    conn.execute(
        sql.SQL("DELETE FROM {}.dedup_watermarks WHERE tenant = %s AND high_water < %s").format(s),
        (tenant, high),
    )
    return n


def count_parked(conn: Conn, schema: str) -> dict[str, int]:
    rows = conn.execute(
        sql.SQL("SELECT reason, count(*) FROM {}.dedup_parked GROUP BY reason").format(
            sql.Identifier(schema)
        )
    )
    return {str(r): int(n) for r, n in rows}


# --------------------------------------------------------------------------------------------
# Ingest store (checkpoints = the source's tracking record, quarantine, vault)

_CHECKPOINT = msgspec.json.Decoder(Checkpoint)


class PostgresIngestStore:
    """The `IngestStore` port on PostgreSQL (never commits)."""

    def __init__(self, conn: Conn, schema: str) -> None:
        self.conn = conn
        self.s = sql.Identifier(schema)

    def load_checkpoint(self, source: str) -> Checkpoint | None:
        row = self.conn.execute(
            sql.SQL("SELECT state FROM {}.ingest_checkpoints WHERE source = %s").format(self.s),
            (source,),
        ).fetchone()
        return None if row is None else _CHECKPOINT.decode(bytes(row[0]))

    def apply(self, batch: IngestBatch) -> None:
        if batch.checkpoint is None:
            raise ValueError("an IngestBatch without checkpoint cannot be applied")
        if batch.scrub_rows is not None:
            raise UserError(
                "the table feed (ingest_authorizations) is an embedded-mode source; in "
                "distributed mode ingest files (iso8583, jsonl, csv)."
            )
        assert_no_clear_pan(batch)
        s = self.s
        with self.conn.cursor() as cur:
            if batch.sealed_pans:
                pans = batch.sealed_pans
                cur.execute(
                    sql.SQL(
                        "INSERT INTO {}.vault_pans (token, tenant, key_id, nonce, ciphertext) "
                        "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::bytea[], "
                        "%s::bytea[]) ON CONFLICT DO NOTHING"
                    ).format(s),
                    (
                        [e.token for e in pans],
                        [e.tenant for e in pans],
                        [e.key_id for e in pans],
                        [e.nonce for e in pans],
                        [e.ciphertext for e in pans],
                    ),
                )
            if batch.quarantined:
                cur.executemany(
                    sql.SQL(
                        "INSERT INTO {}.ingest_quarantine (source, tenant, position, line, kind,"
                        " reason, record) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                        "ON CONFLICT DO NOTHING"
                    ).format(s),
                    [
                        (q.source, q.tenant, q.position, q.line, q.kind, q.reason, q.record)
                        for q in batch.quarantined
                    ],
                )
            cp = batch.checkpoint
            cur.execute(
                sql.SQL(
                    "INSERT INTO {}.ingest_checkpoints (source, position, line, state) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (source) DO UPDATE SET "
                    "position = excluded.position, line = excluded.line, "
                    "state = excluded.state, updated_at = now()"
                ).format(s),
                (cp.source, cp.position, cp.line, msgspec.json.encode(cp)),
            )

    def checkpoints(self) -> list[Checkpoint]:
        rows = self.conn.execute(sql.SQL("SELECT state FROM {}.ingest_checkpoints").format(self.s))
        return [_CHECKPOINT.decode(bytes(r[0])) for r in rows]


# --------------------------------------------------------------------------------------------
# Pipeline counters: append-only deltas (a hot counter row would serialize every worker)


def bump_counters(conn: Conn, schema: str, counts: Mapping[str, int]) -> None:
    rows = [(k, v) for k, v in counts.items() if v]
    if rows:
        with conn.cursor() as cur:
            cur.executemany(
                sql.SQL("INSERT INTO {}.pipeline_counters VALUES (%s, %s)").format(
                    sql.Identifier(schema)
                ),
                rows,
            )


def read_counters(conn: Conn, schema: str) -> dict[str, int]:
    rows = conn.execute(
        sql.SQL("SELECT name, sum(value) FROM {}.pipeline_counters GROUP BY name").format(
            sql.Identifier(schema)
        )
    )
    return {str(n): int(v) for n, v in rows}


# --------------------------------------------------------------------------------------------
# Review outcomes: held and rejected transactions with their reasons ("nothing is lost")

#: a `review_outcomes` row: event id, tenant, authorization (correlation) id, state, reason,
#: event time
OutcomeRow = tuple[str, str, str, str, str | None, str]


def outcome_rows(events: Iterable[Event], into: list[OutcomeRow] | None = None) -> list[OutcomeRow]:
    """The non-posting outcomes among EVENTS (a stage's outputs), appended to INTO: the same
    events, state and reason as the embedded record (`paypost.stages.reconcile.track`,
    `NON_POSTING`). One dict lookup per event; held/rejected are a few % of them."""
    rows: list[OutcomeRow] = [] if into is None else into
    non_posting = NON_POSTING
    for e in events:
        outcome = non_posting.get(e.detail_type)
        if outcome is not None:
            reason = e.detail.get("reason")
            rows.append(
                (
                    e.id,
                    e.tenant,
                    e.correlation_id,
                    outcome,
                    None if reason is None else str(reason),
                    e.time,
                )
            )
    return rows


def record_outcomes(conn: Conn, schema: str, rows: list[OutcomeRow]) -> None:
    """Store ROWS (`outcome_rows`) in the caller's transaction: one statement per batch; a
    redelivered or re-driven event (same derived id) adds no second row. Binary arrays
    (%b): psycopg quotes each element of a text-format array with a regex, ~2x the client
    CPU of the binary format for a batch's 30 rows (measured)."""
    if not rows:
        return
    ids, tenants, auths, states, reasons, times = zip(*rows, strict=True)
    conn.execute(
        sql.SQL(
            "INSERT INTO {}.review_outcomes (event_id, tenant, auth_id, state, reason, "
            "event_time) SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], "
            "%b::text[], %b::text[]) ON CONFLICT DO NOTHING"
        ).format(sql.Identifier(schema)),
        (list(ids), list(tenants), list(auths), list(states), list(reasons), list(times)),
    )


# --------------------------------------------------------------------------------------------
# The reconciler's inbound record: one row per accepted authorization (FR10)


def inbound_rows(events: Iterable[Event]) -> list[InboundRow]:
    """The inbound records of the `AuthorizationAccepted` events among EVENTS (the dedup
    stage's outputs): the same fields as the embedded record (`reconcile.inbound_row`)."""
    return [inbound_row(e) for e in events if e.detail_type == "AuthorizationAccepted"]


_US = "\x1f"  # between the fields of a packed inbound record
_RS = "\x1e"  # between packed inbound records


def record_inbound(conn: Conn, schema: str, rows: list[InboundRow]) -> None:
    """Store ROWS (`inbound_rows`) in the caller's transaction (the dedup stage's unit of
    work): ONE statement per batch, appended (`seq`), as the embedded record is. The dedup
    stage accepts an authorization once (its tracking record and event-id index drop a
    redelivery before it gets here); should a copy ever be written twice, the reconciler
    reads one authorization once (`paypost.distributed.reconcile`). Keyed by the accepted
    event id (a random text key, as before) the insert cost 16.7 µs of PostgreSQL time
    per authorization at 1,000,000, most of it reading and dirtying index pages; appended,
    it costs what a heap insert does. A deployment created before keeps its key (and the
    ON CONFLICT below still applies to it).

    Every accepted authorization passes here, so the client cost counts: the rows travel as
    one text parameter (fields joined by US, records by RS, split by the server) instead of
    six binary arrays, whose element-by-element dumping cost ~0.8 µs per field (measured:
    4.7 vs 9.4 µs of client CPU per authorization, and less server CPU too). A field that
    holds a separator (never seen: ids, days, currency codes) sends the batch as six binary
    arrays instead (`unnest`, as `record_outcomes`)."""
    if not rows:
        return
    s = sql.Identifier(schema)
    payload = _RS.join([_US.join((t, a, i, d, str(m), c)) for t, a, i, d, m, c in rows])
    if payload.count(_US) == 5 * len(rows) and payload.count(_RS) == len(rows) - 1:
        conn.execute(
            sql.SQL(
                "INSERT INTO {}.reconcile_inbound (tenant, auth_id, accepted_id, day, amount, "
                "currency) SELECT split_part(r, E'\\x1f', 1), split_part(r, E'\\x1f', 2), "
                "split_part(r, E'\\x1f', 3), split_part(r, E'\\x1f', 4), "
                "split_part(r, E'\\x1f', 5)::bigint, split_part(r, E'\\x1f', 6) "
                "FROM unnest(string_to_array(%b::text, E'\\x1e')) AS r ON CONFLICT DO NOTHING"
            ).format(s),
            (payload,),
        )
        return
    tenants, auths, ids, days, amounts, currencies = zip(*rows, strict=True)
    conn.execute(
        sql.SQL(
            "INSERT INTO {}.reconcile_inbound (tenant, auth_id, accepted_id, day, amount, "
            "currency) SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], "
            "%b::bigint[], %b::text[]) ON CONFLICT DO NOTHING"
        ).format(s),
        (list(tenants), list(auths), list(ids), list(days), list(amounts), list(currencies)),
    )


# --------------------------------------------------------------------------------------------
# Configuration documents: reference data and rules, published by a job, loaded by workers

_PERSONAL = {"holder_name", "holder_address"}


class _RefDataDoc(msgspec.Struct, kw_only=True):
    version: RefDataVersion
    tenants: list[TenantSettings]
    branches: list[Branch]
    rates: list[RateQuote]
    merchants: list[MerchantInfo]
    accounts: list[dict[str, Any]]  # public fields only
    holders: list[tuple[str, bytes, bytes]]  # account id, nonce, sealed personal data


def _put_doc(conn: Conn, schema: str, name: str, doc: bytes) -> None:
    conn.execute(
        sql.SQL(
            "INSERT INTO {}.pipeline_config VALUES (%s, %s) ON CONFLICT (name) "
            "DO UPDATE SET doc = excluded.doc"
        ).format(sql.Identifier(schema)),
        (name, doc),
    )


def _get_doc(conn: Conn, schema: str, name: str) -> bytes | None:
    row = conn.execute(
        sql.SQL("SELECT doc FROM {}.pipeline_config WHERE name = %s").format(
            sql.Identifier(schema)
        ),
        (name,),
    ).fetchone()
    return None if row is None else bytes(row[0])


def save_refdata(conn: Conn, schema: str, refdata: RefData, cipher: HolderCipher) -> None:
    """Publish REFDATA as the current reference data (holder data sealed)."""
    vid = refdata.version.id
    accounts, holders = [], []
    for a in refdata.accounts.values():
        accounts.append({k: v for k, v in msgspec.to_builtins(a).items() if k not in _PERSONAL})
        nonce, sealed = cipher.seal(vid, a)
        holders.append((a.id, nonce, sealed))
    doc = _RefDataDoc(
        version=refdata.version,
        tenants=list(refdata.tenants.values()),
        branches=list(refdata.branches.values()),
        rates=list(refdata.rates.values()),
        merchants=list(refdata.merchants.values()),
        accounts=accounts,
        holders=holders,
    )
    _put_doc(conn, schema, "refdata", msgspec.msgpack.encode(doc))


def load_refdata(conn: Conn, schema: str, cipher: HolderCipher) -> RefData | None:
    """The current reference data (holders decrypted in memory), None if none published."""
    raw = _get_doc(conn, schema, "refdata")
    if raw is None:
        return None
    doc = msgspec.msgpack.decode(raw, type=_RefDataDoc)
    vid = doc.version.id
    public = {str(a["id"]): a for a in doc.accounts}
    accounts = []
    for account_id, nonce, sealed in doc.holders:
        personal = cipher.open(vid, account_id, nonce, sealed)
        fields = dict(public[account_id])
        fields["holder_name"] = personal.holder_name
        fields["holder_address"] = personal.holder_address
        accounts.append(msgspec.convert(fields, Account))
    return RefData(
        version=doc.version,
        tenants=doc.tenants,
        accounts=accounts,
        branches=doc.branches,
        rates=doc.rates,
        merchants=doc.merchants,
    )


class PipelineDoc(msgspec.Struct, frozen=True, kw_only=True):
    """What every worker must agree on besides reference data."""

    rules_text: str
    rules_source: str
    mode: str = "near-realtime"
    batch_size: int | None = None
    posting_rate_limit_per_s: float | None = None


def save_pipeline_doc(conn: Conn, schema: str, doc: PipelineDoc) -> None:
    _put_doc(conn, schema, "pipeline", msgspec.json.encode(doc))


def load_pipeline_doc(conn: Conn, schema: str) -> PipelineDoc | None:
    raw = _get_doc(conn, schema, "pipeline")
    return None if raw is None else msgspec.json.decode(raw, type=PipelineDoc)
