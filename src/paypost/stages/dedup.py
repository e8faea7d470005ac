"""Duplicate check (FR2 search, FR3 park, FR4 forward, FR9 idempotent).

A pure stage over a batch of `AuthorizationApproved` events and a `DedupIndex` port:

    result = check_duplicates(events, index, config)   # reads the index, writes nothing
    index.apply(result.effects)                         # inside the caller's transaction
    publish(result.outputs)

Per input event, exactly one of (docs/dedup.md has the full story):

- an **original** (business key not seen in the window) → `AuthorizationAccepted` (FR4);
- a **duplicate** (business key already seen) → `DuplicateParked`, reason "duplicate",
  pointing at the original event id; goes no further (FR3);
- a **conflict** (an event id already seen, with different content) → `DuplicateParked`,
  reason "conflict"; never processed;
- a **late** authorization (transmission time older than the window allows us to check)
  → `DuplicateParked`, reason "late": it may be a duplicate of an original the index has
  already forgotten, so it is parked for review rather than risk posting it twice;
- a **redelivery** (an event id already seen, same content) → nothing at all (FR9);
- an unreadable payload → `TransactionHeld` (stage "dedup"), never a traceback.

The business key is blake2b-64 over (tenant, card token, amount minor, currency, merchant id,
STAN, approval code, transmission time in UTC seconds): it names ONE authorization message, so
"same key" is an equivalence and the set of accepted keys does not depend on arrival order or
batching. The window (measured on transmission time, never wall clock) bounds how long the index
remembers a key; see `DedupConfig`.
"""

from __future__ import annotations

import hashlib
import sqlite3
import struct
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import msgspec

from paypost.events import (
    AuthorizationAccepted,
    AuthorizationApproved,
    DuplicateParked,
    Event,
    SchemaRef,
    TransactionHeld,
    derive_event_id,
    new_event,
    utc_now,
)
from paypost.security.tokens import contains_pan

STAGE = "dedup"
SOURCE = "paypost.dedup"

REASON_DUPLICATE = "duplicate"
REASON_CONFLICT = "conflict"
REASON_LATE = "late"
PARK_REASONS = (REASON_DUPLICATE, REASON_CONFLICT, REASON_LATE)

DEFAULT_WINDOW_SECONDS = 7 * 24 * 3600  # a week: retransmissions and re-sent files come in hours


class DedupConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How the duplicate check behaves.

    window_seconds: how far behind a tenant's newest transmission time (its high-water mark)
    an authorization may be and still be checked. An authorization at exactly
    `high_water - window_seconds` is inside the window (checked normally); one second earlier is
    "late" and parked, because the index may have pruned the key of its original.
    """

    window_seconds: int = DEFAULT_WINDOW_SECONDS

    def __post_init__(self) -> None:
        if self.window_seconds <= 0:
            raise ValueError(
                f"dedup window_seconds must be a positive number of seconds, "
                f"got {self.window_seconds}"
            )


# -- keys -------------------------------------------------------------------------------------


# Fresh blake2b states with the digest size set, copied per hash: cheaper than building one
# (the hot path hashes three times per event). Digests read as big-endian signed integers.
_BLAKE2B_64 = hashlib.blake2b(digest_size=8)
_BLAKE2B_128 = hashlib.blake2b(digest_size=16)
_INT64 = struct.Struct(">q")
_TWO_INT64 = struct.Struct(">qq")


def _hash64(data: bytes) -> int:
    """A signed 64-bit integer (SQLite's INTEGER) from blake2b-64 of DATA."""
    h = _BLAKE2B_64.copy()
    h.update(data)
    value: int = _INT64.unpack(h.digest())[0]
    return value


def key_hex(key: int) -> str:
    """The business key as carried on events: 16 hex digits in groups of 4, "8bca:26e9:ccde:c904".

    Grouped with colons so it can never read as a card number: 16 bare hex digits are all
    decimal (and Luhn-valid) about once in 2,000 keys, which a PAN scanner rightly flags.
    """
    return (key & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "big").hex(":", 2)


def key_from_hex(text: str) -> int:
    value = int(text.replace(":", ""), 16)
    return value - (1 << 64) if value >= 1 << 63 else value


def transmission_seconds(text: str) -> int:
    """RFC 3339 transmission time → UTC epoch seconds (sub-seconds dropped; ISO 8583 DE7 has
    second precision, and two renderings of the same instant must give the same key)."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ValueError(f"transmission time {text!r} has no UTC offset (expected RFC 3339)")
    return int(moment.timestamp())


def business_key(tenant: str, auth: AuthorizationApproved) -> tuple[int, int]:
    """(64-bit business key, transmission time in UTC seconds) of an authorization."""
    ts = transmission_seconds(auth.request.transmission_time)
    return _business_key(tenant, auth, ts), ts


def _business_key(tenant: str, auth: AuthorizationApproved, ts: int) -> int:
    req = auth.request
    material = "\x1f".join(
        (
            tenant,
            req.card_token,
            str(req.amount.minor),
            req.amount.currency,
            req.merchant.id,
            req.stan,
            auth.response.approval_code or "",
            str(ts),
        )
    )
    return _hash64(material.encode())


_encoder = msgspec.json.Encoder(order="sorted")
_struct_encoder = msgspec.json.Encoder()
_json = msgspec.json.Encoder()


def content_hash(event: Event) -> int:
    """Hash of what an event says (tenant, detail-type, detail), not of its delivery metadata.

    Used for payloads that do not decode; decodable ones hash their decoded struct."""
    return _hash64(_encoder.encode((event.tenant, event.detail_type, event.detail)))


def event_id_keys(event_id: str) -> tuple[int, int]:
    """(index key, check) of an event id: the two halves of its blake2b-128 digest.

    The index key is what the table is keyed by (8 bytes); the check tells a 64-bit index key
    collision between two different ids apart from a real repeat, without storing the id.
    """
    h = _BLAKE2B_128.copy()
    h.update(event_id.encode())
    key, check = _TWO_INT64.unpack(h.digest())
    return key, check


# -- the port ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SeenEvent:
    """An event id the stage has already processed, and the hash of its content then."""

    id_check: int
    content_hash: int


@dataclass(frozen=True, slots=True)
class KeySighting:
    """The original authorization that holds a business key."""

    event_id: str
    transmission_ts: int


@dataclass(slots=True)
class DedupEffects:
    """What the stage wants recorded, applied by `DedupIndex.apply` in the caller's transaction."""

    keys: list[tuple[int, int, str, str]] = field(default_factory=list)  # ts, key, tenant, id
    events: list[tuple[int, int, int, int]] = field(default_factory=list)  # idk, check, hash, ts
    high_water: dict[str, int] = field(default_factory=dict)  # tenant -> newest ts
    parked: list[Event] = field(default_factory=list)


class DedupIndex(Protocol):
    """What the duplicate check needs to remember (batch lookups, one write per batch)."""

    def seen_events(self, id_keys: Collection[int]) -> dict[int, SeenEvent]: ...

    def seen_keys(self, keys: Collection[tuple[int, int]]) -> dict[int, KeySighting]:
        """Sightings of the given (transmission ts, business key) pairs, by business key."""
        ...

    def high_water(self, tenants: Collection[str]) -> dict[str, int]: ...

    def apply(self, effects: DedupEffects) -> None: ...


@dataclass(slots=True)
class DedupCounts:
    accepted: int = 0
    duplicate: int = 0
    conflict: int = 0
    late: int = 0
    redelivered: int = 0
    held: int = 0


@dataclass(slots=True)
class DedupResult:
    outputs: list[Event]
    effects: DedupEffects
    counts: DedupCounts


# -- the stage --------------------------------------------------------------------------------


@dataclass(slots=True)
class _Prepared:
    event: Event
    idk: int
    idc: int
    chash: int
    auth: AuthorizationApproved | None
    key: int
    ts: int
    error: str | None


def _prepare(event: Event, seconds: dict[str, int]) -> _Prepared:
    """Decode EVENT and compute its keys. SECONDS caches `transmission_seconds` per text for
    one batch (authorizations of the same second share it)."""
    idk, idc = event_id_keys(event.id)
    try:
        if event.detail_type != AuthorizationApproved.DETAIL_TYPE:
            raise ValueError(f"expected AuthorizationApproved, got {event.detail_type}")
        auth = msgspec.convert(event.detail, AuthorizationApproved)
        text = auth.request.transmission_time
        ts = seconds.get(text)
        if ts is None:
            ts = seconds[text] = transmission_seconds(text)
        key = _business_key(event.tenant, auth, ts)
    except (msgspec.ValidationError, ValueError, TypeError) as exc:
        return _Prepared(
            event, idk, idc, content_hash(event), None, 0, 0, f"invalid payload: {exc}"
        )
    # The decoded struct's encoding: fixed field order, defaults filled in, so the same
    # content hashes the same whatever the key order of the JSON it came from.
    chash = _hash64(_struct_encoder.encode((event.tenant, auth)))
    return _Prepared(event, idk, idc, chash, auth, key, ts, None)


def _emit(event: Event, detail: Any, *, index: int = 0, stage: str = STAGE) -> Event:
    return new_event(
        detail,
        source=SOURCE,
        tenant=event.tenant,
        id=derive_event_id(event.id, stage, index),
        correlation_id=event.correlation_id,
        causation_id=event.id,
        traceparent=event.traceparent,
        time=event.time,  # deterministic: the output's time is the input's time
    )


_ACCEPTED_SCHEMA = SchemaRef(
    name=AuthorizationAccepted.DETAIL_TYPE, version=AuthorizationAccepted.VERSION
)


def _accepted(p: _Prepared) -> Event:
    """`_emit(p.event, AuthorizationAccepted(...))` built directly (the hot path): the same
    envelope and the same detail (`to_builtins` of the struct), without the detour through
    the detail struct and `new_event`."""
    assert p.auth is not None
    ev = p.event
    event_id = derive_event_id(ev.id, STAGE, 0)
    request, response = msgspec.to_builtins((p.auth.request, p.auth.response))
    return Event(
        id=event_id,
        source=SOURCE,
        detail_type=AuthorizationAccepted.DETAIL_TYPE,
        time=ev.time or utc_now(),
        tenant=ev.tenant,
        correlation_id=ev.correlation_id or event_id,
        causation_id=ev.id,
        traceparent=ev.traceparent,
        schema=_ACCEPTED_SCHEMA,
        detail={"request": request, "response": response, "business_key": key_hex(p.key)},
    )


def _parked(p: _Prepared, reason: str, original: str | None) -> Event:
    assert p.auth is not None
    detail = DuplicateParked(
        reason=reason,
        business_key=key_hex(p.key),
        original_event_id=original,
        request=p.auth.request,
        response=p.auth.response,
    )
    if reason == REASON_CONFLICT:
        # Not index 0: that id belongs to the output of the original content, and the bus
        # would drop this as its copy. One id per distinct conflicting content.
        return _emit(p.event, detail, index=p.chash & 0xFFFFFFFFFFFFFFFF, stage=f"{STAGE}-conflict")
    return _emit(p.event, detail)


class Prepared:
    """The decoded form and keys of a batch's events, computed once and handed to
    `check_duplicates`: a worker that locks the batch's business keys before the check
    reads them from here instead of decoding every event twice."""

    __slots__ = ("_by_event",)

    def __init__(self, events: Sequence[Event]) -> None:
        seconds: dict[str, int] = {}
        self._by_event = {id(e): _prepare(e, seconds) for e in events}

    def business_keys(self) -> dict[int, int | None]:
        """id(event) → its business key (None where its payload does not decode)."""
        return {k: (p.key if p.error is None else None) for k, p in self._by_event.items()}

    def get(self, event: Event) -> _Prepared | None:
        p = self._by_event.get(id(event))
        return p if p is not None and p.event is event else None


def check_duplicates(
    events: Sequence[Event],
    index: DedupIndex,
    config: DedupConfig | None = None,
    *,
    prepared: Prepared | None = None,
) -> DedupResult:
    """FR2–FR4, FR9: sort a batch into originals, parked duplicates/conflicts and redeliveries.

    Reads INDEX with three batch lookups and writes nothing; the caller applies
    `result.effects` in the same transaction that publishes `result.outputs`. Events are
    decided in the order given, with in-batch memory, so a batch gives the same outcome as
    the same events delivered one by one.
    """
    cfg = config or DedupConfig()
    seconds: dict[str, int] = {}
    done = prepared.get if prepared is not None else lambda e: None
    batch = [done(e) or _prepare(e, seconds) for e in events]
    # In-batch memory as plain tuples and strings (the index's records are only built for
    # what it returns): (id check, content hash) by id key, original event id by key.
    seen_ids = {
        k: (s.id_check, s.content_hash)
        for k, s in index.seen_events({p.idk for p in batch}).items()
    }
    seen_keys = {
        k: s.event_id
        for k, s in index.seen_keys({(p.ts, p.key) for p in batch if p.error is None}).items()
    }
    high_water = dict(index.high_water({p.event.tenant for p in batch}))

    outputs: list[Event] = []
    effects = DedupEffects()
    counts = DedupCounts()
    window = cfg.window_seconds

    for p in batch:
        ev = p.event
        seen = seen_ids.get(p.idk)
        if seen is not None and seen[0] != p.idc:
            seen = None  # a 64-bit collision between two different ids: treat as unseen
            remember_id = False
        else:
            remember_id = True
        if seen is not None:
            if seen[1] == p.chash:
                counts.redelivered += 1  # FR9: already processed, nothing to do
                continue
            if p.auth is None:
                counts.held += 1
                outputs.append(
                    _emit(
                        ev,
                        TransactionHeld(
                            reason=f"conflict: event id reused with different content; {p.error}",
                            stage=STAGE,
                        ),
                        index=p.chash & 0xFFFFFFFFFFFFFFFF,
                        stage=f"{STAGE}-conflict",
                    )
                )
                continue
            counts.conflict += 1
            out = _parked(p, REASON_CONFLICT, ev.id)
            outputs.append(out)
            effects.parked.append(out)
            continue

        if remember_id:
            seen_ids[p.idk] = (p.idc, p.chash)
            effects.events.append((p.idk, p.idc, p.chash, p.ts))

        if p.auth is None:
            counts.held += 1
            outputs.append(_emit(ev, TransactionHeld(reason=p.error or "invalid", stage=STAGE)))
            continue

        tenant = ev.tenant
        hw = high_water.get(tenant)
        if hw is not None and p.ts < hw - window:
            counts.late += 1
            out = _parked(p, REASON_LATE, None)
            outputs.append(out)
            effects.parked.append(out)
            continue

        original = seen_keys.get(p.key)
        if original is not None:
            counts.duplicate += 1
            out = _parked(p, REASON_DUPLICATE, original)
            outputs.append(out)
            effects.parked.append(out)
            continue

        counts.accepted += 1
        seen_keys[p.key] = ev.id
        effects.keys.append((p.ts, p.key, tenant, ev.id))
        if hw is None or p.ts > hw:
            high_water[tenant] = p.ts
            effects.high_water[tenant] = p.ts
        outputs.append(_accepted(p))

    assert (
        counts.accepted
        + counts.duplicate
        + counts.conflict
        + counts.late
        + counts.held
        + counts.redelivered
        == len(events)
    ), "every input event has exactly one outcome (nothing lost)"
    return DedupResult(outputs, effects, counts)


# -- in-memory fake ---------------------------------------------------------------------------


class MemoryDedupIndex:
    """The `DedupIndex` port in dicts (unit tests, and a reference for the SQLite one)."""

    def __init__(self) -> None:
        self.events: dict[int, SeenEvent] = {}
        self.keys: dict[int, KeySighting] = {}
        self.watermarks: dict[str, int] = {}
        self.parked: dict[str, Event] = {}

    def seen_events(self, id_keys: Collection[int]) -> dict[int, SeenEvent]:
        return {k: self.events[k] for k in id_keys if k in self.events}

    def seen_keys(self, keys: Collection[tuple[int, int]]) -> dict[int, KeySighting]:
        return {k: self.keys[k] for _, k in keys if k in self.keys}

    def high_water(self, tenants: Collection[str]) -> dict[str, int]:
        return {t: self.watermarks[t] for t in tenants if t in self.watermarks}

    def apply(self, effects: DedupEffects) -> None:
        for ts, key, _tenant, event_id in effects.keys:
            assert key not in self.keys, "a business key is recorded once"
            self.keys[key] = KeySighting(event_id, ts)
        for idk, check, chash, _ts in effects.events:
            self.events.setdefault(idk, SeenEvent(check, chash))
        for tenant, ts in effects.high_water.items():
            self.watermarks[tenant] = max(ts, self.watermarks.get(tenant, ts))
        for ev in effects.parked:
            self.parked.setdefault(ev.id, ev)


# -- SQLite -----------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS dedup_keys (
    ts INTEGER NOT NULL,                -- transmission time, UTC epoch seconds
    key INTEGER NOT NULL,               -- blake2b-64 business key
    tenant TEXT NOT NULL,
    event_id TEXT NOT NULL,             -- the original authorization's event id
    PRIMARY KEY (ts, key)               -- clustered by time: inserts land near the end
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dedup_events (
    id_key INTEGER PRIMARY KEY,         -- first 8 bytes of blake2b-128 of the event id
    id_check INTEGER NOT NULL,          -- last 8 bytes: tells a key collision from a repeat
    content_hash INTEGER NOT NULL,
    ts INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dedup_watermarks (
    tenant TEXT PRIMARY KEY,
    high_water INTEGER NOT NULL         -- newest transmission time accepted, UTC seconds
);
CREATE TABLE IF NOT EXISTS dedup_parked (
    seq INTEGER PRIMARY KEY,            -- append-only
    event_id TEXT NOT NULL UNIQUE,      -- the DuplicateParked event's id (redelivery-safe)
    input_event_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    reason TEXT NOT NULL,
    business_key TEXT NOT NULL,
    original_event_id TEXT,
    transmission_time TEXT NOT NULL,
    parked_at TEXT NOT NULL,            -- the envelope time (= the input's time)
    event TEXT NOT NULL                 -- the DuplicateParked event, JSON (masked PAN only)
);
CREATE INDEX IF NOT EXISTS dedup_parked_tenant_reason ON dedup_parked (tenant, reason);
"""


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the dedup_* tables if absent (no commit: DDL joins the caller's transaction)."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


class SqliteDedupIndex:
    """The `DedupIndex` port on a given SQLite connection. Never commits: `apply` joins the
    caller's unit of work (one transaction per batch, DESIGN §5).

    Each lookup is ONE statement per batch: the batch's keys travel as a single JSON array
    parameter, joined with the table through `json_each` (SQLite plans it as one primary-key
    probe per key; a row-value `IN (VALUES ...)` would scan the table).
    """

    def __init__(self, conn: sqlite3.Connection, *, create: bool = True) -> None:
        self.conn = conn
        if create:
            ensure_schema(conn)

    def seen_events(self, id_keys: Collection[int]) -> dict[int, SeenEvent]:
        if not id_keys:
            return {}
        rows = self.conn.execute(
            "SELECT e.id_key, e.id_check, e.content_hash FROM json_each(?) AS j "
            "JOIN dedup_events AS e ON e.id_key = j.value",
            (_json.encode(list(id_keys)),),
        )
        return {idk: SeenEvent(check, chash) for idk, check, chash in rows}

    def seen_keys(self, keys: Collection[tuple[int, int]]) -> dict[int, KeySighting]:
        if not keys:
            return {}
        rows = self.conn.execute(
            "SELECT k.key, k.event_id, k.ts FROM json_each(?) AS j "
            "JOIN dedup_keys AS k ON k.ts = j.value ->> 0 AND k.key = j.value ->> 1",
            (_json.encode(list(keys)),),
        )
        return {key: KeySighting(event_id, ts) for key, event_id, ts in rows}

    def high_water(self, tenants: Collection[str]) -> dict[str, int]:
        if not tenants:
            return {}
        rows = self.conn.execute(
            "SELECT w.tenant, w.high_water FROM json_each(?) AS j "
            "JOIN dedup_watermarks AS w ON w.tenant = j.value",
            (_json.encode(list(tenants)),),
        )
        return dict(rows)

    def apply(self, effects: DedupEffects) -> None:
        c = self.conn
        if effects.keys:
            # Plain INSERT: a clash means another writer recorded the key meanwhile; the
            # caller's transaction rolls back and the retry sees the event as a duplicate.
            c.executemany(
                "INSERT INTO dedup_keys (ts, key, tenant, event_id) VALUES (?, ?, ?, ?)",
                effects.keys,
            )
        if effects.events:
            c.executemany(
                "INSERT OR IGNORE INTO dedup_events (id_key, id_check, content_hash, ts) "
                "VALUES (?, ?, ?, ?)",
                effects.events,
            )
        if effects.high_water:
            c.executemany(
                "INSERT INTO dedup_watermarks (tenant, high_water) VALUES (?, ?) "
                "ON CONFLICT (tenant) DO UPDATE SET high_water = "
                "max(high_water, excluded.high_water)",
                list(effects.high_water.items()),
            )
        if effects.parked:
            c.executemany(
                "INSERT OR IGNORE INTO dedup_parked (event_id, input_event_id, tenant, reason, "
                "business_key, original_event_id, transmission_time, parked_at, event) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [_parked_row(ev) for ev in effects.parked],
            )

    def prune(self, tenant: str, window_seconds: int) -> int:
        """Forget keys and ids of TENANT older than its high-water mark minus the window.

        Safe: such authorizations are parked as "late" before any lookup. A maintenance
        operation, run periodically, not per batch (keys: a range of the time-clustered primary
        key; ids: a scan). Returns the rows deleted.
        """
        row = self.conn.execute(
            "SELECT high_water FROM dedup_watermarks WHERE tenant = ?", (tenant,)
        ).fetchone()
        if row is None:
            return 0
        horizon = int(row[0]) - window_seconds
        n = self.conn.execute(
            "DELETE FROM dedup_keys WHERE tenant = ? AND ts < ?", (tenant, horizon)
        ).rowcount
        # dedup_events has no tenant column; ids older than every tenant's horizon go.
        low = self.conn.execute("SELECT min(high_water) FROM dedup_watermarks").fetchone()[0]
        n += self.conn.execute(
            "DELETE FROM dedup_events WHERE ts < ?", (int(low) - window_seconds,)
        ).rowcount
        return n


def _parked_row(ev: Event) -> tuple[Any, ...]:
    d = ev.detail
    document = msgspec.json.encode(ev).decode()
    # DESIGN §3.4, asserted where paypost writes a record: ingest tokenized or quarantined
    # every card number, so a parked record can never hold one.
    assert not contains_pan(document), f"a card number reached the parked table ({ev.id})"
    return (
        ev.id,
        ev.causation_id,
        ev.tenant,
        d["reason"],
        d["business_key"],
        d.get("original_event_id"),
        d["request"]["transmission_time"],
        ev.time,
        document,
    )


# -- parked queries (the `paypost parked` CLI) ------------------------------------------------


class ParkedRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One parked authorization as the CLI shows it (masked PAN only)."""

    event_id: str
    input_event_id: str
    tenant: str
    reason: str
    business_key: str
    original_event_id: str | None
    transmission_time: str
    parked_at: str
    event: dict[str, Any]


def _has_parked_table(conn: sqlite3.Connection) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'dedup_parked'"
    ).fetchone()
    return row is not None


def list_parked(
    conn: sqlite3.Connection,
    *,
    tenant: str | None = None,
    reason: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[ParkedRecord]:
    """Parked authorizations, oldest first, filtered by tenant and/or reason."""
    if not _has_parked_table(conn):
        return []
    where, args = [], []
    if tenant is not None:
        where.append("tenant = ?")
        args.append(tenant)
    if reason is not None:
        where.append("reason = ?")
        args.append(reason)
    sql = (
        "SELECT event_id, input_event_id, tenant, reason, business_key, original_event_id, "
        "transmission_time, parked_at, event FROM dedup_parked"
        + (" WHERE " + " AND ".join(where) if where else "")
        + " ORDER BY seq LIMIT ? OFFSET ?"
    )
    return [_record(row) for row in conn.execute(sql, [*args, limit, offset])]


def get_parked(conn: sqlite3.Connection, event_id: str) -> ParkedRecord | None:
    """One parked authorization by the parked event's id or by the input event's id."""
    if not _has_parked_table(conn):
        return None
    row = conn.execute(
        "SELECT event_id, input_event_id, tenant, reason, business_key, original_event_id, "
        "transmission_time, parked_at, event FROM dedup_parked "
        "WHERE event_id = ? OR input_event_id = ? ORDER BY seq LIMIT 1",
        (event_id, event_id),
    ).fetchone()
    return _record(row) if row is not None else None


def find_parked_by_prefix(conn: sqlite3.Connection, prefix: str) -> ParkedRecord | None:
    """The parked record whose event id (or input event id) starts with PREFIX, if unique."""
    if not _has_parked_table(conn):
        return None
    pattern = prefix.replace("%", "").replace("_", "") + "%"
    rows = conn.execute(
        "SELECT event_id, input_event_id, tenant, reason, business_key, original_event_id, "
        "transmission_time, parked_at, event FROM dedup_parked "
        "WHERE event_id LIKE ? OR input_event_id LIKE ? ORDER BY seq LIMIT 2",
        (pattern, pattern),
    ).fetchall()
    return _record(rows[0]) if len(rows) == 1 else None


def count_parked(conn: sqlite3.Connection) -> dict[str, int]:
    """Parked count per reason."""
    if not _has_parked_table(conn):
        return {}
    return dict(conn.execute("SELECT reason, count(*) FROM dedup_parked GROUP BY reason"))


def _record(row: tuple[Any, ...]) -> ParkedRecord:
    return ParkedRecord(
        event_id=row[0],
        input_event_id=row[1],
        tenant=row[2],
        reason=row[3],
        business_key=row[4],
        original_event_id=row[5],
        transmission_time=row[6],
        parked_at=row[7],
        event=msgspec.json.decode(row[8]),
    )
