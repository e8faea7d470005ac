"""The bus interface and its value types (DESIGN §2, issue 2 "The bus").

Model, EventBridge + SQS shaped:

- a **rule** (name, event pattern, target) routes every published event that matches its
  pattern to a **target**; a target owns one durable queue (two rules that both match an
  event and name the same target deliver it once);
- a **target** is read in batches (`batch_size`, `linger_ms`) under **leases**: a received
  event is invisible to other receivers until it is acked, nacked, or its lease expires
  (a consumer that crashed never acks; its events become visible again — nothing lost);
- **nack** schedules a retry after the target's `RetryPolicy` backoff; after the last attempt
  the event moves to the target's **dead-letter queue** with the error, attempts and times;
- every published event is **archived** once; **replay** re-routes archived events by time
  range × pattern to one target or the whole bus (same ids);
- **publish dedup**: an event whose id AND content were already published inside the dedup
  window is dropped and counted; the same id with different content is an *id conflict*: it
  is counted and still delivered, so the consuming stage sees it and can park it as a
  conflict (FR3) rather than the bus silently choosing one of the two versions;
- a **unit of work** commits a consumer's effects, its **tracking record** (which deliveries
  it has processed), its acks and its output events in ONE transaction: exactly-once in
  effect (DESIGN §3.1). See docs/bus.md.

Times are seconds since the Unix epoch (float) from an injectable clock.
"""

from __future__ import annotations

import abc
import hashlib
import random
import struct
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any, Protocol, overload

import msgspec

from paypost import patterns
from paypost.config import UserError
from paypost.events import Event

Clock = Callable[[], float]
Rand = Callable[[], float]

# --------------------------------------------------------------------------------------------
# Errors


class BusError(UserError):
    """A bus operation a user asked for cannot be done; the message says why and what to do."""


class UnknownTarget(BusError):
    pass


class UnknownRule(BusError):
    pass


class DeadLetterNotFound(BusError):
    pass


# --------------------------------------------------------------------------------------------
# Configuration value types


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """THE retry policy of paypost: capped exponential backoff with full jitter.

    Attempt k (1-based) that failed is retried after `min(max_delay_s, base_delay_s * 2**(k-1))`
    seconds, multiplied by a uniform random factor in [0, 1) when `jitter` is on ("full
    jitter": retries of many events spread out instead of hammering a recovering downstream
    in lockstep). After `max_attempts` attempts the event is dead-lettered.
    """

    max_attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 60.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise BusError(f"retry.max_attempts is {self.max_attempts}; it must be at least 1.")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise BusError("retry delays must be >= 0 seconds.")

    def delay_s(self, attempt: int, rand: Rand = random.random) -> float:
        """Seconds to wait before retrying after failed attempt ATTEMPT (1-based)."""
        exponent = min(max(attempt - 1, 0), 62)  # 2**62 * base already exceeds any cap
        cap = min(self.max_delay_s, self.base_delay_s * float(2**exponent))
        return rand() * cap if self.jitter else cap


#: the most events in one queue message (`TargetConfig.bundle`)
MAX_BUNDLE = 1000


class TargetConfig(msgspec.Struct, frozen=True, kw_only=True):
    """A target: one durable queue and how it is consumed.

    - `batch_size`: the most events one receive returns;
    - `linger_ms`: a partial batch is released only once its oldest event has waited this
      long (0: release at once — realtime mode; DESIGN §4 near-realtime uses N events or T ms);
    - `concurrency`: batches a consumer runner keeps in flight at once (each under a lease);
    - `rate_limit_per_s`: token bucket in the consumer runner (events/s); excess events wait
      in the queue (back-pressure, never loss) — the buffer that protects a downstream system;
    - `lease_s`: how long a received batch stays invisible to others before it is redelivered
      (a crashed consumer's events come back after this);
    - `max_in_flight`: cap on leased events of this target across all receivers (0: no cap).
    - `bundle`: events a unit of work may pack into ONE queue message for this target, on a
      transport that charges per message (NATS JetStream; the embedded backends ignore it).
      1 (the default): one message per event. Above 1, deliveries, acks, nacks, backoff and
      dead letters stay per event, but the server sees bundles: `max_in_flight`, a lease
      and the queue's stats count messages (see `paypost.bus.nats`).
    """

    name: str
    batch_size: int = 500
    linger_ms: int = 0
    concurrency: int = 1
    rate_limit_per_s: float | None = None
    retry: RetryPolicy = RetryPolicy()
    lease_s: float = 30.0
    max_in_flight: int = 0
    bundle: int = 1

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").replace(".", ""):
            raise BusError(f"target name {self.name!r} is empty or has no letters or digits.")
        if self.batch_size < 1:
            raise BusError(f"target {self.name!r}: batch_size must be >= 1 (is {self.batch_size}).")
        if self.linger_ms < 0:
            raise BusError(f"target {self.name!r}: linger_ms must be >= 0 (is {self.linger_ms}).")
        if self.concurrency < 1:
            raise BusError(
                f"target {self.name!r}: concurrency must be >= 1 (is {self.concurrency})."
            )
        if self.rate_limit_per_s is not None and self.rate_limit_per_s <= 0:
            raise BusError(
                f"target {self.name!r}: rate_limit_per_s must be > 0 or unset "
                f"(is {self.rate_limit_per_s})."
            )
        if self.lease_s <= 0:
            raise BusError(f"target {self.name!r}: lease_s must be > 0 (is {self.lease_s}).")
        if self.max_in_flight < 0:
            raise BusError(f"target {self.name!r}: max_in_flight must be >= 0.")
        if not 1 <= self.bundle <= MAX_BUNDLE:
            raise BusError(
                f"target {self.name!r}: bundle must be between 1 and {MAX_BUNDLE} "
                f"(is {self.bundle})."
            )


class Rule(msgspec.Struct, frozen=True, kw_only=True):
    """Route events matching `pattern` (EventBridge event pattern) to target `target`."""

    name: str
    pattern: dict[str, Any]
    target: str


class BusConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Bus-wide settings: how long the archive keeps events and the publish dedup window.

    `archive_retention_s=None` keeps everything. The dedup window cannot usefully exceed the
    retention (dedup looks ids up in the archive), so it is capped by it.
    """

    archive_retention_s: float | None = 30 * 86400.0
    dedup_window_s: float = 86400.0

    @property
    def effective_dedup_window_s(self) -> float:
        if self.archive_retention_s is None:
            return self.dedup_window_s
        return min(self.dedup_window_s, self.archive_retention_s)


# --------------------------------------------------------------------------------------------
# Delivery-side value types


class DeliveryHandle(msgspec.Struct, frozen=True):
    """Opaque to consumers: the queue entry and the lease it was received under."""

    queue_id: int
    lease: int


class Delivery(msgspec.Struct, frozen=True, kw_only=True):
    """One event received from a target's queue.

    `attempt` counts deliveries of this event to this target, this one included.
    `position` is the event's archive position (monotonic per publish).
    `tracking_key` identifies (event id, content) for tracking records.
    """

    event: Event
    target: str
    attempt: int
    first_attempt_at: float
    last_attempt_at: float
    handle: DeliveryHandle
    position: int
    id_key: int
    content_hash: int

    @property
    def tracking_key(self) -> tuple[int, int]:
        return (self.id_key, self.content_hash)


class PublishResult(msgspec.Struct, kw_only=True):
    """What one publish did: archived events, dropped duplicates, id conflicts, routing."""

    published: int = 0
    duplicates_dropped: int = 0
    id_conflicts: int = 0
    routed: dict[str, int] = msgspec.field(default_factory=dict)
    # Events routed to the publish's `inline` targets, in publish order: handed back to the
    # caller to process in-process, in the same unit of work, instead of being enqueued.
    inline: dict[str, list[Event]] = msgspec.field(default_factory=dict)

    def merge(self, other: PublishResult) -> None:
        self.published += other.published
        self.duplicates_dropped += other.duplicates_dropped
        self.id_conflicts += other.id_conflicts
        for k, v in other.routed.items():
            self.routed[k] = self.routed.get(k, 0) + v
        for k, evs in other.inline.items():
            self.inline.setdefault(k, []).extend(evs)


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """An event a target gave up on: the error of the last attempt, attempts and times."""

    id: int
    target: str
    event: Event
    error: str
    attempts: int
    first_attempt_at: float
    last_attempt_at: float
    dead_lettered_at: float


class ArchivedEvent(msgspec.Struct, frozen=True, kw_only=True):
    position: int
    archived_at: float
    event: Event


class ArchiveQuery(msgspec.Struct, frozen=True, kw_only=True):
    """Archived events with `start <= archived_at < end`, optionally matching `pattern`."""

    start: float
    end: float
    pattern: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise BusError(
                f"time range is reversed: --from {format_time(self.start)} is after "
                f"--to {format_time(self.end)}. Swap them."
            )


class ReplayResult(msgspec.Struct, kw_only=True):
    scanned: int = 0
    matched: int = 0
    routed: dict[str, int] = msgspec.field(default_factory=dict)


class TargetStats(msgspec.Struct, kw_only=True):
    name: str
    queued: int = 0  # visible now, waiting for a receiver
    delayed: int = 0  # waiting for a retry backoff to pass
    in_flight: int = 0  # leased to a receiver, not yet acked
    dead_lettered: int = 0
    routed_total: int = 0


class BusStats(msgspec.Struct, kw_only=True):
    targets: list[TargetStats]
    archived: int
    duplicates_dropped: int
    id_conflicts: int


MAX_ERROR_CHARS = 2000


def clean_error(text: str) -> str:
    """An error text fit for the DLQ: card numbers masked (DESIGN §3.4), length capped."""
    from paypost.security.tokens import redact

    text = redact(text)
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


# --------------------------------------------------------------------------------------------
# Hashing: 8-byte integer keys (cheap B-tree entries; DESIGN §5)


_I64 = struct.Struct(">q")


def id_key(event_id: str) -> int:
    """64-bit key of an event id (the dedup index key)."""
    key: int = _I64.unpack(hashlib.blake2b(event_id.encode(), digest_size=8).digest())[0]
    return key


def content_hash(body: bytes) -> int:
    """64-bit hash of an event's encoded JSON (which includes its id).

    (id_key, content_hash) is a 128-bit identity of "this id with this content": what dedup
    drops and what tracking records remember.
    """
    digest: int = _I64.unpack(hashlib.blake2b(body, digest_size=8).digest())[0]
    return digest


_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(Event)
_dict_decoder = msgspec.json.Decoder(dict[str, Any])


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


class EncodedEvents(Sequence[Event]):
    """Events with their JSON bodies, each encoded when it is appended.

    A stage that appends each output right after building it has it encoded while its dicts
    and strings are still in the CPU cache: about half the cost of encoding it at publish,
    after the rest of the batch has pushed it out (a TransactionStandardized in the
    pipeline: ~3.8 instead of ~7.7 µs). `publish` and `prepare` take the bodies from here
    instead of encoding again; the bodies are exactly `encode_event`'s. Events are immutable
    once built (a detail dict changed after `append` would not be in its body).
    """

    __slots__ = ("_events", "bodies")

    def __init__(self, events: Iterable[Event] = ()) -> None:
        self._events: list[Event] = []
        self.bodies: list[bytes] = []
        self.extend(events)

    def append(self, event: Event) -> Event:
        self._events.append(event)
        self.bodies.append(_encoder.encode(event))
        return event

    def extend(self, events: Iterable[Event]) -> None:
        if isinstance(events, EncodedEvents):
            self._events += events._events
            self.bodies += events.bodies
        else:
            for event in events:
                self.append(event)

    def events(self) -> list[Event]:
        return self._events

    def __len__(self) -> int:
        return len(self._events)

    def __iter__(self) -> Iterator[Event]:
        return iter(self._events)

    @overload
    def __getitem__(self, index: int) -> Event: ...

    @overload
    def __getitem__(self, index: slice) -> EncodedEvents: ...

    def __getitem__(self, index: int | slice) -> Event | EncodedEvents:
        if isinstance(index, slice):
            part = EncodedEvents()
            part._events, part.bodies = self._events[index], self.bodies[index]
            return part
        return self._events[index]


def encode_events(events: Iterable[Event]) -> list[bytes]:
    """Each event's JSON body, in order (no content hash: for publishes that need none);
    the bodies an `EncodedEvents` already holds."""
    if isinstance(events, EncodedEvents):
        return events.bodies
    return list(map(_encoder.encode, events))


def id_keys(events: Iterable[Event]) -> list[int]:
    """`id_key` of each event's id, in order (inlined: every published event needs one)."""
    blake2b, unpack = hashlib.blake2b, _I64.unpack
    return [unpack(blake2b(ev.id.encode(), digest_size=8).digest())[0] for ev in events]


def decode_event(body: bytes) -> Event:
    return _event_decoder.decode(body)


def decode_event_dict(body: bytes) -> dict[str, Any]:
    return _dict_decoder.decode(body)


# --------------------------------------------------------------------------------------------
# Patterns and routing


class Matcher(Protocol):
    def matches(self, event: dict[str, Any]) -> bool: ...


def compile_pattern(pattern: dict[str, Any], what: str = "pattern") -> Matcher:
    """Compile an EventBridge pattern with paypost.patterns; errors name WHAT."""
    try:
        return patterns.compile(pattern)
    except patterns.InvalidPattern as exc:
        raise BusError(f"{what} is not a valid event pattern: {exc}") from exc


def _pinned(pattern: dict[str, Any], field: str) -> list[str] | None:
    """The values a pattern pins top-level FIELD to (a list of plain strings), else None."""
    value = pattern.get(field)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    return None


_Candidates = list[tuple[str, "Matcher | None"]]
_MAX_STATIC_ROUTES = 4096


class Router:
    """Rules compiled once; routes an event to the targets whose rules match.

    A rule that pins `detail-type` (else `source`) to exact strings is filed under those
    strings, so an event is tested only against the rules filed under its own detail-type and
    source plus the rules that pin neither. A rule whose pattern is ONLY such a pin matches by
    the index alone; `Event.to_dict()` is computed (once per event, lazily) only when some
    candidate rule needs its full pattern.

    When every candidate rule for a (detail-type, source) pair matches by the index alone
    (the pipeline's rules all do), the targets depend on that pair only: they are computed
    once per pair and served from `_static` (every publish of every event routes).
    """

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = list(rules)
        self._by_type: dict[str, _Candidates] = {}
        self._by_source: dict[str, _Candidates] = {}
        self._unindexed: _Candidates = []
        # (detail-type, source) -> targets, or None when some candidate needs its full pattern
        self._static: dict[tuple[str, str], tuple[str, ...] | None] = {}
        for rule in self.rules:
            matcher = compile_pattern(rule.pattern, f"rule {rule.name!r}")
            only_pin = len(rule.pattern) == 1
            for field, index in (("detail-type", self._by_type), ("source", self._by_source)):
                pinned = _pinned(rule.pattern, field)
                if pinned is not None:
                    for value in pinned:
                        index.setdefault(value, []).append(
                            (rule.target, None if only_pin else matcher)
                        )
                    break
            else:
                self._unindexed.append((rule.target, matcher))

    def _candidates(self, detail_type: str, source: str) -> Iterator[tuple[str, Matcher | None]]:
        yield from self._by_type.get(detail_type, ())
        yield from self._by_source.get(source, ())
        yield from self._unindexed

    def route(self, event: Event) -> tuple[str, ...]:
        """The targets EVENT goes to, each once, in rule-index order."""
        key = (event.detail_type, event.source)
        try:
            static = self._static[key]
        except KeyError:
            candidates = list(self._candidates(*key))
            static = (
                None
                if any(m is not None for _, m in candidates)
                else tuple(dict.fromkeys(t for t, _ in candidates))
            )
            if len(self._static) < _MAX_STATIC_ROUTES:  # bounded: pairs come from publishers
                self._static[key] = static
        if static is not None:
            return static
        targets: list[str] = []
        as_dict: dict[str, Any] | None = None
        for target, matcher in self._candidates(*key):
            if target in targets:
                continue
            if matcher is not None:
                if as_dict is None:
                    as_dict = event.to_dict()
                if not matcher.matches(as_dict):
                    continue
            targets.append(target)
        return tuple(targets)

    def for_target(self, target: str) -> Router:
        return Router(r for r in self.rules if r.target == target)


# --------------------------------------------------------------------------------------------
# Publish dedup decision (shared by every backend)


class PreparedEvent(msgspec.Struct):
    event: Event
    body: bytes
    id_key: int
    content_hash: int


def prepare(events: Iterable[Event]) -> list[PreparedEvent]:
    """Encode each event once (an `EncodedEvents` is already) and compute its two keys
    (inlined: this is the hot loop)."""
    blake2b, unpack = hashlib.blake2b, _I64.unpack
    if isinstance(events, EncodedEvents):
        pairs: Iterable[tuple[Event, bytes]] = zip(events, events.bodies, strict=True)
    else:
        pairs = ((ev, _encoder.encode(ev)) for ev in events)
    out = []
    for ev, body in pairs:
        out.append(
            PreparedEvent(
                ev,
                body,
                unpack(blake2b(ev.id.encode(), digest_size=8).digest())[0],
                unpack(blake2b(body, digest_size=8).digest())[0],
            )
        )
    return out


def dedup_decide(
    batch: Sequence[PreparedEvent], seen: dict[int, set[int]]
) -> tuple[list[PreparedEvent], int, int]:
    """Split BATCH into events to publish, given SEEN (id_key -> content hashes in window).

    Returns (to_publish, duplicates_dropped, id_conflicts). SEEN is updated in place so
    repeats inside the batch are handled too.
    """
    keep: list[PreparedEvent] = []
    dups = conflicts = 0
    for p in batch:
        hashes = seen.get(p.id_key)
        if hashes is None:
            seen[p.id_key] = {p.content_hash}
            keep.append(p)
        elif p.content_hash in hashes:
            dups += 1
        else:
            hashes.add(p.content_hash)
            conflicts += 1
            keep.append(p)
    return keep, dups, conflicts


# --------------------------------------------------------------------------------------------
# Time helpers (CLI and API)


def parse_time(value: str, what: str = "time") -> float:
    """RFC 3339 (e.g. 2026-11-21T22:00:00Z) to epoch seconds; the error names WHAT."""
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise BusError(
            f"{what}: {value!r} is not an RFC 3339 time. Use e.g. 2026-11-21T22:00:00Z "
            "(a date alone, 2026-11-21, means midnight UTC)."
        ) from None
    if parsed.tzinfo is None:
        if "T" in text or " " in text:
            raise BusError(
                f"{what}: {value!r} has no time zone. Add Z (UTC) or an offset like +01:00."
            )
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def format_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --------------------------------------------------------------------------------------------
# The interface


class UnitOfWork(abc.ABC):
    """One atomic transaction over the bus (and, for SQLite, the stage's own tables).

    Everything done through it commits together when the `with` block exits normally, and
    nothing of it when the block raises. Use it to make a consumer exactly-once in effect:

        with bus.unit_of_work() as uow:
            done = uow.processed("poster", deliveries)
            fresh = [d for d in deliveries if d.tracking_key not in done]
            apply_effects(uow.conn, fresh)              # the stage's own tables
            uow.track("poster", fresh)                  # tracking record
            uow.publish(outputs)                        # output events (derived ids)
            uow.ack(deliveries)                         # consumed
    """

    conn: Any

    @abc.abstractmethod
    def publish(
        self,
        events: Iterable[Event],
        *,
        dedup: bool = True,
        inline: Collection[str] = (),
        only: Collection[str] | None = None,
    ) -> PublishResult:
        """Archive and route EVENTS. With `dedup=False` the events are neither checked
        against nor recorded in the dedup window: for outputs of a consumer that commits a
        tracking record in this same unit of work (its outputs are produced once already),
        which saves one random-key index insert per event (DESIGN §5).

        `inline`: targets the caller processes in-process inside this same unit of work (the
        embedded pipeline's fused stages): events routed to them are returned in
        `PublishResult.inline` instead of being enqueued — same rules, same archive, no queue
        row. `only`: route to these targets alone (e.g. hand one event that failed in-process
        to its target's durable queue, where the retry policy and the DLQ take over)."""

    @abc.abstractmethod
    def dead_letter(self, target: str, events: Iterable[Event], error: str) -> int:
        """Put EVENTS straight into TARGET's dead-letter queue with ERROR (attempts 1): for
        a stage that gives up on events it already consumed (an incomplete posting sequence
        after its timeout). They are archived again with the DLQ entry, so `dlq show` and
        `dlq redrive` work as for any dead letter. Returns how many were dead-lettered."""

    @abc.abstractmethod
    def ack(self, deliveries: Iterable[Delivery]) -> int:
        """Remove delivered events from their queue; returns how many were still leased by
        these deliveries (a delivery whose lease expired and was re-received is not acked)."""

    @abc.abstractmethod
    def nack(self, deliveries: Iterable[Delivery], error: str) -> int:
        """Schedule retries (or dead-letter after the last attempt); returns dead-lettered."""

    @abc.abstractmethod
    def processed(self, consumer: str, deliveries: Iterable[Delivery]) -> set[tuple[int, int]]:
        """Tracking keys among DELIVERIES that CONSUMER has already recorded as processed."""

    @abc.abstractmethod
    def track(self, consumer: str, deliveries: Iterable[Delivery]) -> None:
        """Record that CONSUMER processed DELIVERIES (idempotent)."""

    def next_position(self) -> int:
        """The archive position the next event published in this unit of work will get.

        Positions are allocated in order inside a unit of work, so the events a caller
        publishes between two calls occupy exactly that range: a fused in-process consumer
        records such a range as its tracking record (DESIGN §3.1: where the source has a
        monotonic position, record the position)."""
        raise NotImplementedError(f"{type(self).__name__} has no archive positions")

    @abc.abstractmethod
    def on_commit(self, fn: Callable[[], None]) -> None:
        """Run FN after a successful commit (in-memory effects; notifications)."""


class Bus(abc.ABC):
    """The one bus interface; `MemoryBus` (tests) and `SqliteBus` (embedded) implement it."""

    config: BusConfig
    clock: Clock

    # -- configuration ---------------------------------------------------------------------
    @abc.abstractmethod
    def put_target(self, target: TargetConfig) -> None:
        """Create or update a target (its queue keeps its events)."""

    @abc.abstractmethod
    def put_rule(self, rule: Rule) -> None:
        """Create or replace a rule; its pattern must compile and its target exist."""

    @abc.abstractmethod
    def delete_rule(self, name: str) -> None: ...

    @abc.abstractmethod
    def targets(self) -> list[TargetConfig]: ...

    @abc.abstractmethod
    def rules(self) -> list[Rule]: ...

    def target(self, name: str) -> TargetConfig:
        for t in self.targets():
            if t.name == name:
                return t
        known = ", ".join(sorted(t.name for t in self.targets())) or "none"
        raise UnknownTarget(f"target {name!r} does not exist (known targets: {known}).")

    # -- transactions ----------------------------------------------------------------------
    @abc.abstractmethod
    def unit_of_work(self) -> AbstractContextManager[UnitOfWork]: ...

    # -- publish / consume (each its own transaction; use a unit of work to combine) -------
    def publish(
        self, events: Iterable[Event], *, dedup: bool = True, only: Collection[str] | None = None
    ) -> PublishResult:
        """Archive and route EVENTS (dedup by id inside the window; see module docs)."""
        with self.unit_of_work() as uow:
            return uow.publish(events, dedup=dedup, only=only)

    @abc.abstractmethod
    def receive(self, target: str, max_events: int | None = None) -> list[Delivery]:
        """Lease up to `max_events` (default: the target's batch_size) visible events.

        Returns [] while a partial batch is still lingering (see TargetConfig.linger_ms) or
        the target's max_in_flight is reached. Events whose lease expired after their last
        allowed attempt go to the DLQ here instead of being delivered again.
        """

    def ack(self, deliveries: Iterable[Delivery]) -> int:
        with self.unit_of_work() as uow:
            return uow.ack(deliveries)

    def nack(self, deliveries: Iterable[Delivery], error: str) -> int:
        with self.unit_of_work() as uow:
            return uow.nack(deliveries, error)

    @abc.abstractmethod
    def pending(self, target: str) -> int:
        """Events in the target's queue: visible, delayed for retry, or in flight."""

    @abc.abstractmethod
    def next_visible_in(self, target: str) -> float | None:
        """Seconds until the next queued event of TARGET becomes receivable (None: empty)."""

    # -- dead letters ----------------------------------------------------------------------
    @abc.abstractmethod
    def dlq_list(
        self,
        target: str | None = None,
        pattern: dict[str, Any] | None = None,
        limit: int | None = None,
    ) -> list[DeadLetter]: ...

    @abc.abstractmethod
    def dlq_get(self, entry_id: int) -> DeadLetter: ...

    @abc.abstractmethod
    def dlq_redrive(
        self,
        target: str | None = None,
        pattern: dict[str, Any] | None = None,
        ids: Sequence[int] | None = None,
    ) -> int:
        """Put dead letters back on their target's queue with a fresh attempt count."""

    # -- archive ---------------------------------------------------------------------------
    @abc.abstractmethod
    def archive(self, query: ArchiveQuery) -> Iterator[ArchivedEvent]: ...

    @abc.abstractmethod
    def archive_count(self, start: float | None = None, end: float | None = None) -> int: ...

    @abc.abstractmethod
    def replay(
        self,
        query: ArchiveQuery,
        target: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> ReplayResult:
        """Re-route archived events (same ids) through the rules: all of them, or only the
        rules of TARGET. No dedup (consumers' tracking records make repeats no-ops)."""

    @abc.abstractmethod
    def purge_archive(self, now: float | None = None) -> int:
        """Drop archived events older than the retention, except those still queued or
        dead-lettered (nothing lost), and dedup entries older than the dedup window.
        Returns how many archived events were dropped."""

    @abc.abstractmethod
    def stats(self) -> BusStats: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass
