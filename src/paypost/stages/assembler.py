"""The posting assembler (FR8, FR9): legs in any order, with any duplicates → one journal entry.

Input: `PostingLegCreated` events. A `LegStore` collects them by posting sequence id; when all
n legs of a sequence are present, the assembler builds the balanced `JournalEntry` (entry id =
sequence id, so the ledger posts it once whatever is retried), a `TransactionPosted` event and
one posting-file record. The caller posts the entries to the ledger in the same transaction as
the store's writes, then calls `settle` with the ledger's results (a refused entry is
dead-lettered with the ledger's reason instead of being announced as posted).

Order-insensitive (DESIGN §3.5): the outputs of a sequence depend only on its legs, never on
the order they came in — the entry is built from the legs sorted by index, its entry-level
data from leg 0, and the ids of the events it emits are derived from the sequence id.

Duplicates (FR9): a leg seen again with identical content (same detail) is ignored, before or
after its sequence completed. A leg seen again with DIFFERENT content, or legs of one sequence
that disagree on the leg count, is a conflict: a `PostingLegConflict` alert is emitted and the
legs are handed to the DLQ; a sequence in conflict is never posted (if it was already posted,
only the conflicting copy is dead-lettered).

Timeout: `expire` finds sequences still incomplete `timeout` after their first leg arrived
(wall clock of arrival, not event time, so a replay of old events does not expire at once),
emits `PostingSequenceIncomplete` naming the missing leg indexes and returns the sequence as a
dead letter. If the missing legs arrive later (e.g. a DLQ redrive), the sequence still
completes and is posted once.

Sequence states: pending → complete | dead (timed out) | conflict; dead → complete; refused
(the ledger refused the entry) → reassembled from scratch when its legs are redriven.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import msgspec

from paypost.events import (
    Event,
    PostingLegConflict,
    PostingLegCreated,
    PostingSequenceIncomplete,
    SchemaRef,
    TransactionPosted,
    derive_event_id,
    new_event,
)
from paypost.ledger import sqlite as ledger_sqlite
from paypost.ledger.model import JournalEntry, Leg, PostResult
from paypost.money import CURRENCY_EXPONENTS, Money
from paypost.stages.posting_file import PostingRecord, record_for

STAGE = "assembler"
SOURCE = "paypost.assembler"

State = Literal["pending", "complete", "dead", "conflict", "refused"]
OPEN_STATES = ("pending", "dead", "refused")

_ENCODER = msgspec.json.Encoder(order="sorted")
_EVENT_ENCODER = msgspec.json.Encoder()
_EVENT_DECODER = msgspec.json.Decoder(Event)


def leg_digest(detail: dict[str, Any]) -> bytes:
    """16-byte digest of a leg's content (its detail): equal digests = identical duplicates."""
    return hashlib.blake2b(_ENCODER.encode(detail), digest_size=16).digest()


@dataclass(slots=True)
class StoredLeg:
    """A leg the store holds while its sequence is incomplete (the whole event, to redrive)."""

    leg_index: int
    digest: bytes
    event: Event


@dataclass(slots=True)
class SequenceRecord:
    """What the store knows of one posting sequence."""

    sequence_id: str
    tenant: str
    leg_count: int
    state: State
    first_seen_us: int
    legs: dict[int, StoredLeg] = field(default_factory=dict)  # open states only
    digests: list[bytes] = field(default_factory=list)  # complete: per leg index


class LegStore(Protocol):
    """The assembler's state: sequences and the legs of the incomplete ones.

    Batch-oriented (one read and one write per batch). The SQLite implementation works on a
    connection it is given and never commits: the caller's unit of work does.
    """

    def load(
        self, sequence_ids: Iterable[str], whole: Collection[str] = ()
    ) -> dict[str, SequenceRecord]:
        """The records of SEQUENCE_IDS that exist (open ones with their legs). `assemble`
        passes a mapping sequence id → tenant of its legs (iterating it gives the ids), and
        as WHOLE the sequences the batch holds every leg of (a store may record those only
        once the ledger posted them: `posted`)."""
        ...

    def save(
        self,
        records: Sequence[SequenceRecord],
        new_legs: Sequence[tuple[str, StoredLeg]],
        closed: Sequence[str],
    ) -> None:
        """Upsert RECORDS (state, count, digests), add NEW_LEGS, drop the legs of CLOSED."""
        ...

    def pending_before(self, cutoff_us: int, limit: int) -> list[SequenceRecord]:
        """Pending sequences whose first leg arrived before CUTOFF_US, with their legs."""
        ...

    def posted(self, positions: Sequence[tuple[str, int]]) -> None:
        """The ledger holds these entries (entry id = sequence id, ledger position): `settle`
        reports them, in the transaction of `assemble`."""
        ...


# --------------------------------------------------------------------------------------------
# Results


class CompletedSequence(msgspec.Struct, frozen=True, kw_only=True):
    """A sequence whose legs are all here: the entry to post, its event, its file record."""

    entry: JournalEntry
    posted_event: Event
    record: PostingRecord
    legs: tuple[Event, ...] = ()  # the leg events, to dead-letter them if the ledger refuses


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """Legs the wiring must dead-letter, with the reason (and the missing leg indexes)."""

    sequence_id: str
    tenant: str
    reason: str
    events: list[Event]
    missing_legs: list[int] = []


@dataclass(slots=True)
class AssemblyResult:
    completed: list[CompletedSequence] = field(default_factory=list)
    alerts: list[Event] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    duplicates: int = 0
    pending: int = 0


# --------------------------------------------------------------------------------------------
# The stage


def assemble(events: Sequence[Event], store: LegStore, *, now_us: int) -> AssemblyResult:
    """Consume a batch of PostingLegCreated events (FR8): complete sequences come out once.

    NOW_US (wall clock, µs since the epoch) stamps the arrival of a sequence's first leg, for
    `expire`. Everything else is a deterministic function of the legs.
    """
    result = AssemblyResult()
    by_seq: dict[str, list[tuple[Event, dict[str, Any]]]] = {}
    for event in events:
        if event.detail_type != PostingLegCreated.DETAIL_TYPE:
            raise ValueError(
                f"event {event.id}: the assembler consumes PostingLegCreated events, "
                f"not {event.detail_type!r}; check the bus rule that targets it"
            )
        d = event.detail
        problem = _leg_problem(d)
        if problem is not None:
            result.dead_letters.append(
                DeadLetter(
                    sequence_id=str(d.get("sequence_id")),
                    tenant=event.tenant,
                    reason=f"malformed posting leg: {problem}",
                    events=[event],
                )
            )
            continue
        by_seq.setdefault(d["sequence_id"], []).append((event, d))
    # The tenant of each sequence (its first leg's): a store may find completed sequences
    # through the ledger's entries, which are keyed by (tenant, entry id = sequence id).
    known = store.load(
        {seq_id: items[0][0].tenant for seq_id, items in by_seq.items()},
        [seq_id for seq_id, items in by_seq.items() if _whole(items)],
    )
    to_save: list[SequenceRecord] = []
    new_legs: list[tuple[str, StoredLeg]] = []
    closed: list[str] = []
    for seq_id, items in by_seq.items():
        rec = known.get(seq_id)
        if rec is not None and rec.state == "complete":
            _after_completion(rec, items, result)
            continue
        if rec is not None and rec.state == "conflict":
            result.dead_letters.append(
                DeadLetter(
                    sequence_id=seq_id,
                    tenant=items[0][0].tenant,
                    reason="posting sequence is in conflict (see its PostingLegConflict alert)",
                    events=[e for e, _ in items],
                )
            )
            continue
        if rec is None or rec.state == "refused" or rec.leg_count == 0:
            # New (or a store's placeholder row, leg_count 0), or refused: start afresh.
            first = items[0]
            stored_before = rec is not None and rec.state == "refused"
            rec = SequenceRecord(
                sequence_id=seq_id,
                tenant=first[0].tenant,
                leg_count=_int(first[1].get("leg_count")),
                state="pending",
                first_seen_us=now_us,
            )
            if stored_before:
                closed.append(seq_id)  # a refused sequence is reassembled from scratch
        conflict: str | None = None
        conflict_index = -1
        batch_new: list[StoredLeg] = []
        for event, d in items:
            index, count = d["leg_index"], d["leg_count"]
            if count != rec.leg_count:
                conflict = (
                    f"leg {index} says the sequence has {count} legs, an earlier leg said "
                    f"{rec.leg_count}"
                )
                conflict_index = index
                break
            digest = leg_digest(d)
            existing = rec.legs.get(index)
            if existing is not None:
                if existing.digest == digest:
                    result.duplicates += 1
                    continue
                conflict = (
                    f"leg {index} arrived twice with different content (events "
                    f"{existing.event.id} and {event.id})"
                )
                conflict_index = index
                break
            leg = StoredLeg(leg_index=index, digest=digest, event=event)
            rec.legs[index] = leg
            batch_new.append(leg)
        if conflict is not None:
            held = [lg.event for _, lg in sorted(rec.legs.items())]
            ids = {e.id for e in held}
            held += [e for e, _ in items if e.id not in ids]
            result.alerts.append(_conflict_alert(rec, conflict_index, conflict, held))
            result.dead_letters.append(
                DeadLetter(
                    sequence_id=seq_id,
                    tenant=rec.tenant,
                    reason=f"posting sequence conflict: {conflict}",
                    events=held,
                )
            )
            rec.state = "conflict"
            rec.legs = {}
            to_save.append(rec)
            closed.append(seq_id)
            continue
        if len(rec.legs) == rec.leg_count:
            legs = [rec.legs[i] for i in range(rec.leg_count)]
            try:
                completed = build_completed(seq_id, [lg.event for lg in legs])
            except (ValueError, AssertionError) as exc:
                # Legs that cannot form a balanced entry are a conflict, never a posting.
                result.alerts.append(_conflict_alert(rec, -1, str(exc), [lg.event for lg in legs]))
                result.dead_letters.append(
                    DeadLetter(
                        sequence_id=seq_id,
                        tenant=rec.tenant,
                        reason=f"posting sequence cannot be assembled: {exc}",
                        events=[lg.event for lg in legs],
                    )
                )
                rec.state = "conflict"
            else:
                result.completed.append(completed)
                rec.state = "complete"
                rec.digests = [lg.digest for lg in legs]
            rec.legs = {}
            to_save.append(rec)
            if seq_id in known:
                closed.append(seq_id)
            continue
        # Still incomplete: keep the new legs (a dead sequence stays dead until complete).
        result.pending += 1
        to_save.append(rec)
        new_legs.extend((seq_id, lg) for lg in batch_new)
    store.save(to_save, new_legs, closed)
    return result


def _whole(items: list[tuple[Event, dict[str, Any]]]) -> bool:
    """True when ITEMS (one sequence's legs in a batch) hold leg 0 … n-1 of one count n."""
    count = items[0][1]["leg_count"]
    if len(items) < count:
        return False
    seen = {d["leg_index"] for _, d in items if d["leg_count"] == count}
    return len(seen) == count and all(type(i) is int and 0 <= i < count for i in seen)


def _after_completion(
    rec: SequenceRecord, items: list[tuple[Event, dict[str, Any]]], result: AssemblyResult
) -> None:
    """Legs of a sequence already complete: identical copies are ignored, others alerted."""
    for event, d in items:
        index = _int(d.get("leg_index"))
        if 0 <= index < len(rec.digests) and rec.digests[index] == leg_digest(d):
            result.duplicates += 1
            continue
        reason = f"leg {d.get('leg_index')!r} differs from the leg already posted"
        result.alerts.append(_conflict_alert(rec, index, reason, [event]))
        result.dead_letters.append(
            DeadLetter(
                sequence_id=rec.sequence_id,
                tenant=event.tenant,
                reason=f"posting leg conflict after posting: {reason}",
                events=[event],
            )
        )


def _leg_problem(d: dict[str, Any]) -> str | None:
    """Why a leg's detail cannot be assembled (None if it is well formed)."""
    if _well_typed(d):
        amount = d["amount"]
        return _leg_value_problem(
            d["sequence_id"], d["leg_index"], d["leg_count"], d["side"], amount["minor"],
            amount["currency"],
        )  # fmt: skip
    # Not the exact shape: let msgspec validate it, and say what is wrong.
    try:
        leg = msgspec.convert(d, PostingLegCreated)
    except (msgspec.ValidationError, ValueError, TypeError) as exc:
        return str(exc)
    return _leg_value_problem(
        leg.sequence_id, leg.leg_index, leg.leg_count, leg.side, leg.amount.minor,
        leg.amount.currency,
    )  # fmt: skip


def _leg_value_problem(
    sequence_id: str, index: int, count: int, side: str, minor: int, currency: str
) -> str | None:
    if count < 1 or not 0 <= index < count:
        return f"leg index {index} is not within a count of {count}"
    if side not in ("debit", "credit"):
        return f"side {side!r} must be 'debit' or 'credit'"
    if minor <= 0:
        return f"amount {Money(minor, currency)} must be positive"
    if not sequence_id:
        return "the sequence id is empty"
    return None


def _well_typed(d: dict[str, Any]) -> bool:
    """True when D converts to a PostingLegCreated as it is (every field of the exact type,
    a known currency): the fast check before `msgspec.convert`, which accepts exactly these
    and more (a subclass, a missing default), so it decides only when this says False."""
    amount = d.get("amount")
    if not (
        type(d.get("sequence_id")) is str
        and type(d.get("leg_index")) is int
        and type(d.get("leg_count")) is int
        and type(d.get("account_id")) is str
        and type(d.get("side")) is str
        and type(amount) is dict
        and type(amount.get("minor")) is int
        and type(amount.get("currency")) is str
        and amount["currency"] in CURRENCY_EXPONENTS
    ):
        return False
    metadata = d.get("metadata", _NO_METADATA)
    return type(metadata) is dict and all(type(k) is str for k in metadata)


_NO_METADATA: dict[str, Any] = {}


def _int(value: Any) -> int:
    return value if type(value) is int else -1


def _conflict_alert(rec: SequenceRecord, index: int, reason: str, events: list[Event]) -> Event:
    base = events[0] if events else None
    return new_event(
        PostingLegConflict(
            sequence_id=rec.sequence_id,
            leg_index=index,
            reason=reason,
            event_ids=[e.id for e in events],
        ),
        source=SOURCE,
        tenant=rec.tenant,
        # One alert per sequence and conflicting leg copy: derived from the copy's id.
        id=derive_event_id(
            f"{rec.sequence_id}/{events[-1].id if events else ''}", "assembler-conflict", index
        ),
        correlation_id=base.correlation_id if base else rec.sequence_id,
        causation_id=events[-1].id if events else None,
        time=base.time if base else None,
    )


def build_completed(sequence_id: str, legs: Sequence[Event]) -> CompletedSequence:
    """The journal entry, TransactionPosted event and file record of a complete sequence.

    LEGS are the leg events sorted by index. Raises ValueError/AssertionError if they do not
    form a balanced entry.
    """
    first = legs[0]
    details = [e.detail for e in legs]
    entry_meta = details[0].get("metadata", {}).get("entry") or {}
    ledger_legs = tuple(
        Leg(
            account=d["account_id"],
            side=d["side"],
            amount=Money(d["amount"]["minor"], d["amount"]["currency"]),
        )
        for d in details
    )
    booked = entry_meta.get("booked_at") or first.time
    # The ledger keeps what a statement and an audit need (FX provenance, DESIGN §3.2); the
    # account identifiers and the rest of the transaction go to the posting-file record.
    metadata = {k: entry_meta[k] for k in LEDGER_METADATA if entry_meta.get(k) is not None}
    metadata["roles"] = [d.get("metadata", {}).get("role") for d in details]
    entry = JournalEntry(
        id=sequence_id,
        tenant=first.tenant,
        legs=ledger_legs,
        sequence_id=sequence_id,
        source_event_id=entry_meta.get("source_event_id"),
        booked_at=_parse_time(booked),
        description=entry_meta.get("description"),
        metadata=metadata,
    )
    # Money is conserved (DESIGN §3.2): an entry that does not balance per currency (or is
    # otherwise malformed) never leaves the assembler.
    problem = entry.problem()
    if problem is not None:
        raise ValueError(problem)
    posted = Event(
        id=derive_event_id(sequence_id, STAGE, 0),
        source=SOURCE,
        detail_type=TransactionPosted.DETAIL_TYPE,
        time=first.time,
        tenant=first.tenant,
        correlation_id=first.correlation_id,
        schema=_POSTED_SCHEMA,
        detail={"sequence_id": sequence_id, "entry_id": entry.id, "legs": len(legs)},
        causation_id=first.id,
        traceparent=first.traceparent,
    )
    return CompletedSequence(
        entry=entry,
        posted_event=posted,
        record=record_for(entry, {**entry_meta, **metadata}),
        legs=tuple(legs),
    )


LEDGER_METADATA = (
    "transaction_ref",
    "value_date",
    "direction",
    "merchant_id",
    "merchant_name",
    "mcc",
    "pan_masked",
    "flags",
    "fx",
)
_POSTED_SCHEMA = SchemaRef(name=TransactionPosted.DETAIL_TYPE, version=TransactionPosted.VERSION)


def _parse_time(text: str) -> datetime:
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def settle(
    result: AssemblyResult, post_results: Sequence[PostResult], store: LegStore
) -> tuple[list[Event], list[PostingRecord], list[DeadLetter]]:
    """After the ledger posted `result.completed` (in order), what to publish, write and
    dead-letter: applied entries (posted now, or a duplicate of an earlier posting) get their
    TransactionPosted event and file record; refused or conflicting ones are dead-lettered
    with the ledger's reason and their sequence marked refused (reassembled on redrive)."""
    if len(post_results) != len(result.completed):
        raise ValueError(
            f"settle: {len(post_results)} ledger results for {len(result.completed)} entries"
        )
    events: list[Event] = []
    records: list[PostingRecord] = []
    dead: list[DeadLetter] = []
    refused: list[SequenceRecord] = []
    for done, res in zip(result.completed, post_results, strict=True):
        assert res.entry_id == done.entry.id, (res.entry_id, done.entry.id)
        if res.status == "posted":
            events.append(done.posted_event)
            records.append(done.record)
        elif res.status == "duplicate":
            # Posted before (a replay): announce again with the same derived id (the bus drops
            # the copy); the file record was written with the original posting.
            events.append(done.posted_event)
        else:
            dead.append(
                DeadLetter(
                    sequence_id=done.entry.id,
                    tenant=done.entry.tenant,
                    reason=f"ledger {res.status}: {res.reason}",
                    events=list(done.legs),
                )
            )
            refused.append(
                SequenceRecord(
                    sequence_id=done.entry.id,
                    tenant=done.entry.tenant,
                    leg_count=len(done.entry.legs),
                    state="refused",
                    first_seen_us=0,
                )
            )
    if refused:
        store.save(refused, [], [])
    store.posted(
        [
            (done.entry.id, res.position)
            for done, res in zip(result.completed, post_results, strict=True)
            if res.applied and res.position is not None
        ]
    )
    return events, records, dead


@dataclass(slots=True)
class FinishedBatch:
    """Everything the wiring does with one assembled batch, after the ledger posting."""

    events: list[Event]  # TransactionPosted + alerts: publish
    records: list[PostingRecord]  # posting-file records: add_to_outbox in the same transaction
    dead_letters: list[DeadLetter]  # dead-letter, with the reason
    posted: int = 0
    ledger_duplicates: int = 0


def finish(
    result: AssemblyResult,
    store: LegStore,
    post_batch: Callable[[Sequence[JournalEntry]], list[PostResult]],
) -> FinishedBatch:
    """Post `result.completed` with POST_BATCH (e.g. `functools.partial(ledger.sqlite.
    post_batch_in, conn)`, inside the caller's transaction) and settle: the one call the
    wiring makes after `assemble`."""
    results = post_batch([c.entry for c in result.completed]) if result.completed else []
    events, records, dead = settle(result, results, store)
    return FinishedBatch(
        events=events + result.alerts,
        records=records,
        dead_letters=result.dead_letters + dead,
        posted=sum(1 for r in results if r.status == "posted"),
        ledger_duplicates=sum(1 for r in results if r.status == "duplicate"),
    )


def expire(store: LegStore, *, now_us: int, timeout_us: int, limit: int = 1000) -> AssemblyResult:
    """Sequences incomplete `timeout_us` after their first leg: alert and dead-letter them."""
    result = AssemblyResult()
    stale = store.pending_before(now_us - timeout_us, limit)
    now_text = (
        datetime.fromtimestamp(now_us / 1_000_000, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )
    for rec in stale:
        missing = [i for i in range(rec.leg_count) if i not in rec.legs]
        legs = [lg.event for _, lg in sorted(rec.legs.items())]
        base = legs[0] if legs else None
        result.alerts.append(
            new_event(
                PostingSequenceIncomplete(sequence_id=rec.sequence_id, missing_legs=missing),
                source=SOURCE,
                tenant=rec.tenant,
                id=derive_event_id(rec.sequence_id, "assembler-timeout", 0),
                correlation_id=base.correlation_id if base else rec.sequence_id,
                causation_id=base.id if base else None,
                time=now_text,
            )
        )
        result.dead_letters.append(
            DeadLetter(
                sequence_id=rec.sequence_id,
                tenant=rec.tenant,
                reason=(
                    f"posting sequence incomplete after {timeout_us / 1_000_000:g}s: "
                    f"{len(rec.legs)} of {rec.leg_count} legs, missing leg(s) "
                    + ", ".join(str(i) for i in missing)
                ),
                events=legs,
                missing_legs=missing,
            )
        )
        rec.state = "dead"
    # Dead sequences keep their legs: late legs can still complete them.
    store.save(stale, [], [])
    return result


# --------------------------------------------------------------------------------------------
# Stores


class MemoryLegStore:
    """The in-memory LegStore (unit tests, and the reference for the SQLite one)."""

    def __init__(self) -> None:
        self.records: dict[str, SequenceRecord] = {}

    def load(
        self, sequence_ids: Iterable[str], whole: Collection[str] = ()
    ) -> dict[str, SequenceRecord]:
        out: dict[str, SequenceRecord] = {}
        for s in sequence_ids:
            rec = self.records.get(s)
            if rec is not None:
                out[s] = SequenceRecord(
                    sequence_id=rec.sequence_id,
                    tenant=rec.tenant,
                    leg_count=rec.leg_count,
                    state=rec.state,
                    first_seen_us=rec.first_seen_us,
                    legs=dict(rec.legs),
                    digests=list(rec.digests),
                )
        return out

    def save(
        self,
        records: Sequence[SequenceRecord],
        new_legs: Sequence[tuple[str, StoredLeg]],
        closed: Sequence[str],
    ) -> None:
        for s in closed:
            if s in self.records:
                self.records[s].legs = {}
        for rec in records:
            prior = self.records.get(rec.sequence_id)
            legs = prior.legs if prior is not None and rec.sequence_id not in closed else {}
            self.records[rec.sequence_id] = SequenceRecord(
                sequence_id=rec.sequence_id,
                tenant=rec.tenant,
                leg_count=rec.leg_count,
                state=rec.state,
                first_seen_us=rec.first_seen_us,
                legs=dict(legs),
                digests=list(rec.digests),
            )
        for s, leg in new_legs:
            self.records[s].legs[leg.leg_index] = leg

    def pending_before(self, cutoff_us: int, limit: int) -> list[SequenceRecord]:
        stale = [
            r for r in self.records.values() if r.state == "pending" and r.first_seen_us < cutoff_us
        ]
        stale.sort(key=lambda r: (r.first_seen_us, r.sequence_id))
        return list(self.load([r.sequence_id for r in stale[:limit]]).values())

    def posted(self, positions: Sequence[tuple[str, int]]) -> None:
        """Nothing to do: this store keeps every record itself."""


SCHEMA = """
CREATE TABLE IF NOT EXISTS assembly_sequences (
    sequence_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    leg_count INTEGER NOT NULL,
    state TEXT NOT NULL,
    first_seen_us INTEGER NOT NULL,
    digests BLOB
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS assembly_sequences_pending
    ON assembly_sequences (first_seen_us) WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS assembly_legs (
    id INTEGER PRIMARY KEY,
    sequence_id TEXT NOT NULL,
    leg_index INTEGER NOT NULL,
    digest BLOB NOT NULL,
    event BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS assembly_legs_sequence ON assembly_legs (sequence_id);
CREATE TABLE IF NOT EXISTS assembly_posted (
    entry_pk INTEGER PRIMARY KEY,
    sequence_id TEXT NOT NULL,
    digests BLOB NOT NULL
);
"""

_CHUNK = 500


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the assembler's tables (prefix `assembly_`) if they do not exist."""
    conn.executescript(SCHEMA) if not conn.in_transaction else _create_in_tx(conn)


def _create_in_tx(conn: sqlite3.Connection) -> None:
    for stmt in SCHEMA.split(";"):
        if stmt.strip():
            conn.execute(stmt)


class SqliteLegStore:
    """LegStore on a SQLite connection it is given; never commits (the caller's unit of work).

    Only incomplete sequences keep legs (`assembly_legs`, append-only integer keys). Where
    they are kept:
    - a sequence seen in more than one batch, in conflict, refused or timed out: one row in
      `assembly_sequences` (state, and the digests of its legs once complete);
    - the common case, a sequence completed by the batch that brought its first leg, with
      the ledger on the same connection: nothing until `settle` reports the ledger's
      position of its entry, then one row in `assembly_posted` (entry position, digests).
      Positions only grow, so that table is append-only; the sequence is found again
      through the ledger's own index of entry ids (entry id = sequence id), so completing a
      sequence adds no random-key index insert of its own (at a million sequences such an
      insert costs ~15 µs, nearly all of it writing the index pages it dirties). A sequence
      is thus remembered as posted exactly while the ledger holds its entry.
    `settle` (or `finish`) must run in the same transaction as `assemble` (the wiring does):
    without it such a sequence is not recorded, as its entry was not posted either.
    Without the ledger tables (the assembler alone) every record goes to `assembly_sequences`.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._ledger: bool | None = None  # are the ledger tables on this connection?
        self._stored: set[str] = set()  # loaded from assembly_sequences
        # Completed, waiting for settle. Never read back as state: if the transaction rolls
        # back before settle, nothing was posted and the legs must assemble again.
        self._unposted: dict[str, bytes] = {}  # sequence id → the digests of its legs

    def _has_ledger(self) -> bool:
        if self._ledger is None:
            self._ledger = ledger_sqlite.schema_exists(self.conn)
        return self._ledger

    def load(
        self, sequence_ids: Iterable[str], whole: Collection[str] = ()
    ) -> dict[str, SequenceRecord]:
        ids = list(sequence_ids)
        out: dict[str, SequenceRecord] = {}
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for sid, tenant, count, state, first, digests in self.conn.execute(
                "SELECT sequence_id, tenant, leg_count, state, first_seen_us, digests "
                f"FROM assembly_sequences WHERE sequence_id IN ({marks})",
                chunk,
            ):
                out[sid] = SequenceRecord(
                    sequence_id=sid,
                    tenant=tenant,
                    leg_count=count,
                    state=state,
                    first_seen_us=first,
                    digests=_split(digests),
                )
        self._stored.update(out)
        if isinstance(sequence_ids, Mapping) and self._has_ledger():
            rest = {s: t for s, t in sequence_ids.items() if s not in out}
            if rest:
                out.update(self._load_posted(rest))
        open_ids = [s for s, r in out.items() if r.state in OPEN_STATES]
        for start in range(0, len(open_ids), _CHUNK):
            chunk = open_ids[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for sid, index, digest, blob in self.conn.execute(
                "SELECT sequence_id, leg_index, digest, event FROM assembly_legs "
                f"WHERE sequence_id IN ({marks})",
                chunk,
            ):
                out[sid].legs[index] = StoredLeg(
                    leg_index=index, digest=bytes(digest), event=_EVENT_DECODER.decode(blob)
                )
        return out

    def _load_posted(self, tenants: Mapping[str, str]) -> dict[str, SequenceRecord]:
        """Sequences among TENANTS (id → tenant) whose entry the ledger holds, posted by
        the assembler: found through the ledger's index of entry ids."""
        wanted: dict[int, list[str]] = {}
        for sid, tenant in tenants.items():
            wanted.setdefault(ledger_sqlite.entry_key(tenant, sid), []).append(sid)
        out: dict[str, SequenceRecord] = {}
        keys = list(wanted)
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for key, tenant, sid, digests in self.conn.execute(
                "SELECT e.id_key, e.tenant, e.id, p.digests FROM ledger_entries e "
                "JOIN assembly_posted p ON p.entry_pk = e.pk AND p.sequence_id = e.id "
                f"WHERE e.id_key IN ({marks})",
                chunk,
            ):
                if sid in wanted[key] and tenants[sid] == tenant:
                    out[sid] = posted_record(sid, tenant, digests)
        # Entries whose key collided with another id's are kept apart by the ledger (in
        # ledger_entry_ids, almost always empty): look there for the ids not found.
        if self.conn.execute("SELECT 1 FROM ledger_entry_ids LIMIT 1").fetchone() is not None:
            for sid, tenant in tenants.items():
                if sid in out:
                    continue
                row = self.conn.execute(
                    "SELECT p.digests FROM ledger_entry_ids x JOIN assembly_posted p "
                    "ON p.entry_pk = x.entry_pk AND p.sequence_id = x.id "
                    "WHERE x.tenant = ? AND x.id = ?",
                    (tenant, sid),
                ).fetchone()
                if row is not None:
                    out[sid] = posted_record(sid, tenant, row[0])
        return out

    def save(
        self,
        records: Sequence[SequenceRecord],
        new_legs: Sequence[tuple[str, StoredLeg]],
        closed: Sequence[str],
    ) -> None:
        for start in range(0, len(closed), _CHUNK):
            chunk = list(closed[start : start + _CHUNK])
            marks = ",".join("?" * len(chunk))
            self.conn.execute(f"DELETE FROM assembly_legs WHERE sequence_id IN ({marks})", chunk)
        rows = []
        for r in records:
            sid = r.sequence_id
            if r.state == "complete" and sid not in self._stored and self._has_ledger():
                # Completed in this batch: recorded when settle reports the entry's position.
                assert len(r.digests) == r.leg_count, r
                self._unposted[sid] = b"".join(r.digests)
                continue
            self._unposted.pop(sid, None)
            rows.append(
                (
                    sid,
                    r.tenant,
                    r.leg_count,
                    r.state,
                    r.first_seen_us,
                    b"".join(r.digests) if r.digests else None,
                )
            )
        if rows:
            # A record carries its first_seen_us (loaded, or now for a new/reopened sequence).
            self.conn.executemany(
                "INSERT INTO assembly_sequences "
                "(sequence_id, tenant, leg_count, state, first_seen_us, digests) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (sequence_id) DO UPDATE SET "
                "state = excluded.state, leg_count = excluded.leg_count, "
                "digests = excluded.digests, first_seen_us = excluded.first_seen_us",
                rows,
            )
            self._stored.update(r[0] for r in rows)
        if new_legs:
            self.conn.executemany(
                "INSERT INTO assembly_legs (sequence_id, leg_index, digest, event) "
                "VALUES (?, ?, ?, ?)",
                [
                    (s, leg.leg_index, leg.digest, _EVENT_ENCODER.encode(leg.event))
                    for s, leg in new_legs
                ],
            )

    def posted(self, positions: Sequence[tuple[str, int]]) -> None:
        """The ledger holds these entries (entry id = sequence id, ledger position): record
        the sequences completed in this batch as posted (`settle` calls this)."""
        unposted = self._unposted
        rows = [
            (position, sid, unposted.pop(sid)) for sid, position in positions if sid in unposted
        ]
        if rows:
            # OR REPLACE: a position whose entry was deleted (a reconciliation break) and
            # then taken again by a new entry.
            self.conn.executemany(
                "INSERT OR REPLACE INTO assembly_posted (entry_pk, sequence_id, digests) "
                "VALUES (?, ?, ?)",
                rows,
            )

    def pending_before(self, cutoff_us: int, limit: int) -> list[SequenceRecord]:
        ids = [
            row[0]
            for row in self.conn.execute(
                "SELECT sequence_id FROM assembly_sequences WHERE state = 'pending' "
                "AND first_seen_us < ? ORDER BY first_seen_us, sequence_id LIMIT ?",
                (cutoff_us, limit),
            )
        ]
        loaded = self.load(ids)
        return [loaded[s] for s in ids if s in loaded]


def _split(digests: bytes | None) -> list[bytes]:
    raw = bytes(digests or b"")
    return [raw[i : i + 16] for i in range(0, len(raw), 16)]


def posted_record(sequence_id: str, tenant: str, digests: bytes) -> SequenceRecord:
    """The record of a sequence found posted through the ledger (`assembly_posted`)."""
    found = _split(digests)
    return SequenceRecord(
        sequence_id=sequence_id,
        tenant=tenant,
        leg_count=len(found),
        state="complete",
        first_seen_us=0,
        digests=found,
    )
