"""The distributed bus: NATS JetStream carries the events, PostgreSQL the transactions (issue 6).

Same `Bus` interface and conformance suite as the embedded backends. Layout, per `prefix`:

JetStream (all streams file-backed, `replicas` copies each):
- `<P>_ARCHIVE`, subject `<p>.archive`: every published event once (limits retention,
  `max_age` = the archive retention), in SEGMENTS: one message per unit of work (up to 256
  events / 512 KB each) listing (archive id, archived at by the bus clock, event). The
  archive id is the event's `Nats-Msg-Id`; queue and DLQ copies name it in
  `Paypost-Archive-Id`.
- `<P>_QUEUE`, subjects `<p>.q.<target>`: the per-target durable queues (work-queue
  retention: a message leaves when acked). One durable pull consumer per target,
  `ack_wait` = the target's lease, `max_ack_pending` = its max_in_flight. A message is one
  event (header `Paypost-Archive-Id` names its archive copy) or, for a target with
  `bundle` > 1, a BUNDLE of up to that many events one unit of work routed there (header
  `Paypost-Bundle`: the count; body: (archive id, event) pairs). Deliveries, acks, nacks and
  dead letters stay per event: a bundle is acked when its last member is settled (nacked
  with the longest delay a member asked for), and members settled while the bundle stays
  out are recorded in PostgreSQL (`settled`) with their ack, so a redelivery skips them.
  `Delivery.position` = queue sequence × 1,000,000 + index in the message.
- `<P>_DLQ`, subjects `<p>.dlq.<target>`: dead letters with the reason in headers; the
  dead letter's id is its stream sequence.

PostgreSQL (schema `<prefix>_bus`): targets and rules, the publish-dedup window (`seen`),
tracking records, counters (append-only deltas: no hot row shared by workers) and the
transactional OUTBOX.

Routing is publisher-side: the publisher runs the compiled rules (`Router`, the same code as
every backend) and writes one queue copy per matched target, plus the event in its unit of
work's archive segment. Per event that costs one routing evaluation in the publisher (an
index lookup by detail-type; a full pattern match only for content filters), k JetStream
messages for k matched targets, and its share of one archive segment message.

Exactly-once in effect across NATS + PostgreSQL. A unit of work is ONE PostgreSQL transaction
holding the stage's effects (`uow.conn`), its tracking record and the outbox rows of its
output events. After COMMIT, a relay publishes the outbox rows to JetStream and deletes them,
then the inputs are acked (or nacked). A crash after commit leaves outbox rows that the
relay sweeper of any worker publishes later; a re-publish is harmless because every message
carries a `Nats-Msg-Id` fixed in the outbox row (JetStream drops the copy inside its
duplicate window). Events published with dedup (ingress) use their event id as
`Nats-Msg-Id`; outputs of a tracked consumer (produced once by construction) and replays use
`<event id>#<row nonce>` so a deliberate second copy is still delivered. Inputs that were
processed but not acked are redelivered and skipped by the tracking record. Two workers that
process the same delivery at once (a lease ran out) collide on the tracking record's primary
key: the second transaction fails and rolls back, its effects with it.

The interface is synchronous; nats-py is asyncio: one event loop runs in a background
thread and every call crosses over with `run_coroutine_threadsafe`.

Time: leases, retry delays and windows run on the JetStream server's clock; `time_scale`
(tests only) multiplies every duration handed to the server. Linger, `Delivery` times, the
archive's time range and the dedup window use the bus clock.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import random
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Coroutine, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec
import nats
import nats.errors
import nats.js.errors
import psycopg
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from psycopg import sql

from paypost.bus.core import (
    ArchivedEvent,
    ArchiveQuery,
    Bus,
    BusConfig,
    BusError,
    BusStats,
    Clock,
    DeadLetter,
    DeadLetterNotFound,
    Delivery,
    DeliveryHandle,
    EncodedEvents,
    PublishResult,
    Rand,
    ReplayResult,
    Router,
    Rule,
    TargetConfig,
    TargetStats,
    UnitOfWork,
    UnknownRule,
    clean_error,
    compile_pattern,
    content_hash,
    decode_event,
    dedup_decide,
    encode_events,
    id_key,
    prepare,
)
from paypost.events import Event
from paypost.logs import get_logger
from paypost.pgarray import Int8Array

log = get_logger("paypost.bus.nats")

T = TypeVar("T")

BUS_URL_SETTING = "PAYPOST_BUS_URL"
DB_URL_SETTING = "PAYPOST_DB_URL"

H_ARCHIVED_AT = "Paypost-Archived-At"  # of a segment: its oldest event
H_EVENTS = "Paypost-Events"  # events in an archive segment
H_BUNDLE = "Paypost-Bundle"  # events in a queue bundle (a target with `bundle` > 1)
H_QUEUED_AT = "Paypost-Queued-At"
H_ARCHIVE_ID = "Paypost-Archive-Id"  # the archive copy's Nats-Msg-Id
H_ERROR = "Paypost-Error"
H_ATTEMPTS = "Paypost-Attempts"
H_FIRST_AT = "Paypost-First-At"
H_LAST_AT = "Paypost-Last-At"
H_DEAD_AT = "Paypost-Dead-At"
MSG_ID = "Nats-Msg-Id"
POSITION_STRIDE = 1_000_000  # archive position = segment seq × stride + index in segment
#: a delivery's queue id and position: queue seq × stride + its index in the message (0 for a
#: message of one event)
QUEUE_STRIDE = POSITION_STRIDE

#: relay re-publish protection when the dedup window is longer (server memory per id)
MAX_MSG_ID_WINDOW_S = 86400.0
#: settled messages whose delivery count a bus remembers, to drop late copies of them
SETTLED_RECENT_MAX = 100_000
#: outbox rows older than this are published by the sweeper (crashed relays)
SWEEP_AFTER_S = 3.0
#: how long opening the bus waits for JetStream to answer (a cluster electing leaders)
STREAM_SETUP_WAIT_S = 30.0
#: how often a worker looks for paypost tables to vacuum, and the dead rows that make one due
#: (`vacuum_churn`: the outbox alone writes and deletes ~10 KB per authorization)
VACUUM_EVERY_S = 10.0
VACUUM_DEAD_ROWS = 10_000
#: the session advisory lock (int4, int4) that elects one vacuuming worker: the negative first
#: half keeps it apart from the relay locks (`_relay_lock_key`, both halves non-negative)
_VACUUM_LOCK = (-1, 0x7661_6375)

_json = msgspec.json.Encoder()
_headers_decoder = msgspec.json.Decoder(dict[str, str])


class ServiceUnavailable(BusError):
    """NATS or PostgreSQL cannot be reached; the message names the setting to fix."""


# --------------------------------------------------------------------------------------------
# The asyncio bridge


class _Loop:
    """An asyncio event loop in a daemon thread; `run` calls a coroutine from any thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="nats-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
        if not self.loop.is_running():
            self.loop.close()


# --------------------------------------------------------------------------------------------
# PostgreSQL schema


def _schema_sql(s: sql.Identifier) -> list[sql.Composed]:
    stmts = [
        "CREATE SCHEMA IF NOT EXISTS {s}",
        "CREATE TABLE IF NOT EXISTS {s}.targets (name TEXT PRIMARY KEY, config BYTEA NOT NULL)",
        "CREATE TABLE IF NOT EXISTS {s}.rules (name TEXT PRIMARY KEY, rule BYTEA NOT NULL)",
        # publish dedup window: id_key -> content hashes seen (no unique index: JetStream's
        # Nats-Msg-Id drops a concurrent second publish of the same id)
        "CREATE TABLE IF NOT EXISTS {s}.seen (id_key BIGINT NOT NULL, "
        "content_hash BIGINT NOT NULL, at DOUBLE PRECISION NOT NULL)",
        "CREATE INDEX IF NOT EXISTS seen_id ON {s}.seen (id_key)",
        "CREATE TABLE IF NOT EXISTS {s}.tracking (consumer TEXT NOT NULL, id_key BIGINT NOT NULL,"
        " content_hash BIGINT NOT NULL, PRIMARY KEY (consumer, id_key, content_hash))",
        "CREATE TABLE IF NOT EXISTS {s}.counters (name TEXT NOT NULL, n BIGINT NOT NULL)",
        # units of work whose archive segments count: a segment is published BEFORE its
        # unit of work commits (see `_Segment`), so one whose unit of work rolled back or
        # died is in the stream but has no row here, and archive readers skip it
        "CREATE TABLE IF NOT EXISTS {s}.archive_uows (uow BIGINT PRIMARY KEY, "
        "at DOUBLE PRECISION NOT NULL)",
        # members of a queue bundle settled while the bundle stayed out (other members in
        # hand, or one nacked): its redelivery skips them; the rows go when it is settled whole
        "CREATE TABLE IF NOT EXISTS {s}.settled (target TEXT NOT NULL, seq BIGINT NOT NULL, "
        "idx INTEGER NOT NULL, PRIMARY KEY (target, seq, idx))",
        # the transactional outbox: one row per message to publish after commit
        "CREATE TABLE IF NOT EXISTS {s}.outbox (uow BIGINT NOT NULL, idx INTEGER NOT NULL, "
        "created TIMESTAMPTZ NOT NULL DEFAULT now(), subject TEXT NOT NULL, "
        "queues TEXT NOT NULL, msg_id TEXT NOT NULL, headers BYTEA NOT NULL, body BYTEA NOT NULL,"
        " PRIMARY KEY (uow, idx))",
    ]
    return [sql.SQL(x).format(s=s) for x in stmts]


def _store_outbox_uncompressed(conn: psycopg.Connection[Any], s: sql.Identifier) -> None:
    """Outbox bodies are written once and read once (archive segments up to 512 KB): storing
    them out of line WITHOUT compression saves PostgreSQL the pglz pass over every byte.
    Altered only when needed (ALTER TABLE locks the table; workers may be running)."""
    row = conn.execute(
        "SELECT attstorage FROM pg_attribute WHERE attrelid = %s::regclass AND attname = 'body'",
        (f"{s.as_string(conn)}.outbox",),
    ).fetchone()
    if row is not None and row[0] != "e":
        conn.execute(
            sql.SQL("ALTER TABLE {}.outbox ALTER COLUMN body SET STORAGE EXTERNAL").format(s)
        )


def _relay_lock_key(uow_id: int) -> tuple[int, int]:
    """The (int4, int4) advisory-lock key of a unit of work's relay: a keyspace apart from
    the single-bigint locks of the dedup stage."""
    return (uow_id >> 31) & 0x7FFFFFFF, uow_id & 0x7FFFFFFF


def connect_db(db_url: str) -> psycopg.Connection[Any]:
    """A PostgreSQL connection, or an error that names PAYPOST_DB_URL."""
    try:
        return psycopg.connect(db_url, connect_timeout=5)
    except psycopg.OperationalError as exc:
        raise ServiceUnavailable(
            f"PostgreSQL is not reachable at {DB_URL_SETTING}={_redact_url(db_url)}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}. Start it, or set "
            f"{DB_URL_SETTING} (or `db_url` in the config file) to a reachable database."
        ) from None


def _redact_url(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        user = cred.split(":", 1)[0]
        return f"{scheme}://{user}@{host}"
    return url


# --------------------------------------------------------------------------------------------
# Outbox rows


@dataclass
class _OutRow:
    """One message to publish after commit. `queues` non-empty and `subject` the archive
    subject: the archive copy, plus one copy per queue subject naming it."""

    subject: str
    queues: list[str]
    msg_id: str
    headers: dict[str, str]
    body: bytes


SEGMENT_MAX_EVENTS = 256
#: Nats-Msg-Id prefix of a segment published before its unit of work's commit: it counts
#: only if `archive_uows` holds the unit of work (older `seg.` segments went through the
#: outbox after the commit and always count)
SEGMENT_PREFIX = "segc."
SEGMENT_MAX_BYTES = 512 * 1024  # JetStream's default max message size is 1 MB
_segment_encoder = msgspec.msgpack.Encoder()
_segment_decoder = msgspec.msgpack.Decoder(list[tuple[str, float, bytes]])


@dataclass
class _Segment:
    """Archived events of one unit of work, published as ONE archive message (an archive
    copy per event would cost a JetStream message each: ~50 µs of nats-py apiece, the
    biggest cost of a fused batch). Entries: (archive id, archived at, encoded event)."""

    id: str
    entries: list[tuple[str, float, bytes]] = field(default_factory=list)
    size: int = 0

    def full(self, extra: int) -> bool:
        return bool(self.entries) and (
            len(self.entries) >= SEGMENT_MAX_EVENTS or self.size + extra > SEGMENT_MAX_BYTES
        )

    def add(self, entry_id: str, at: float, body: bytes) -> None:
        self.entries.append((entry_id, at, body))
        self.size += len(body) + len(entry_id) + 16

    def row(self, subject: str) -> _OutRow:
        oldest = min(at for _, at, _ in self.entries)
        return _OutRow(
            subject=subject,
            queues=[],
            msg_id=self.id,
            headers={H_ARCHIVED_AT: _f(oldest), H_EVENTS: str(len(self.entries))},
            body=_segment_encoder.encode(self.entries),
        )


BUNDLE_MAX_BYTES = 512 * 1024
_bundle_decoder = msgspec.msgpack.Decoder(list[tuple[str, bytes]])


def _bundle_rows(
    subject: str, entries: list[tuple[str, bytes]], at: str, size: int, uow_id: int
) -> Iterator[_OutRow]:
    """The queue messages of ENTRIES ((archive id, body), one unit of work's events for one
    target): one per event, or bundles of up to SIZE events / BUNDLE_MAX_BYTES when the
    target's `bundle` allows. A bundle's Nats-Msg-Id is fixed by the unit of work, so a
    relay and a sweeper that both publish it store it once."""
    if size <= 1 or len(entries) == 1:
        for entry_id, body in entries:
            yield _OutRow(
                subject=subject,
                queues=[],
                msg_id=f"{entry_id}>{subject}",
                headers={H_QUEUED_AT: at, H_ARCHIVE_ID: entry_id},
                body=body,
            )
        return
    chunk: list[tuple[str, bytes]] = []
    nbytes = 0
    k = 0
    for entry in entries:
        extra = len(entry[1]) + len(entry[0]) + 8
        if chunk and (len(chunk) >= size or nbytes + extra > BUNDLE_MAX_BYTES):
            yield _bundle_row(subject, chunk, at, f"bnd.{uow_id:x}.{subject}.{k}")
            chunk, nbytes, k = [], 0, k + 1
        chunk.append(entry)
        nbytes += extra
    yield _bundle_row(subject, chunk, at, f"bnd.{uow_id:x}.{subject}.{k}")


def _bundle_row(subject: str, chunk: list[tuple[str, bytes]], at: str, msg_id: str) -> _OutRow:
    return _OutRow(
        subject=subject,
        queues=[],
        msg_id=msg_id,
        headers={H_QUEUED_AT: at, H_BUNDLE: str(len(chunk))},
        body=_segment_encoder.encode(chunk),
    )


def _whole_messages(qids: list[int], want: int) -> list[int]:
    """The first WANT or fewer of QIDS (sorted queue ids), not splitting a bundle unless one
    alone holds more than WANT: a bundle settled in one unit of work needs no `settled`
    record."""
    taken: list[int] = []
    i = 0
    while i < len(qids) and len(taken) < want:
        msg = qids[i] // QUEUE_STRIDE
        j = i + 1
        while j < len(qids) and qids[j] // QUEUE_STRIDE == msg:
            j += 1
        if taken and len(taken) + (j - i) > want:
            break
        taken += qids[i : min(j, i + want - len(taken))]
        i = j
    return taken


def _segment_uow(msg_id: str) -> int | None:
    """The unit of work of a pre-commit archive segment (None: an outbox-era segment)."""
    if not msg_id.startswith(SEGMENT_PREFIX):
        return None
    return int(msg_id[len(SEGMENT_PREFIX) :].split(".", 1)[0], 16)


def _member(m: Msg, index: int) -> tuple[str, bytes]:
    """(archive id, body) of event INDEX of queue message M (a bundle or a single event)."""
    headers = m.headers or {}
    if H_BUNDLE in headers:
        return _bundle_decoder.decode(m.data)[index]
    return headers.get(H_ARCHIVE_ID, ""), m.data


@dataclass
class _Held:
    """A queue message this process received and has not settled yet: one event, or a
    bundle of `members` events settled one by one (the message is acked, or nacked with the
    longest delay its members asked for, when the last member is settled)."""

    msg: Msg
    delivered: int
    first_at: float
    members: int = 1
    done: set[int] = field(default_factory=set)  # members settled (acked, nacked, dead)
    nak_delay: float | None = None  # the server delay of a nacked member's retry
    nak_until: float = 0.0  # when that retry is due, by the bus clock
    recorded: bool = False  # `settled` rows may exist for this message


@dataclass
class _Buffered:
    msg: Msg
    delivered: int
    queued_at: float
    members: int
    presettled: frozenset[int]
    body: bytes


@dataclass
class _TargetState:
    lock: threading.Lock = field(default_factory=threading.Lock)
    buffer: dict[int, _Buffered] = field(default_factory=dict)
    sub: Any = None


def _stream_name(prefix: str, kind: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in prefix).upper() + "_" + kind


def _durable(target: str) -> str:
    return "t_" + "".join(c if c.isalnum() or c in "-_" else "_" for c in target)


def _f(value: float) -> str:
    return repr(float(value))


# --------------------------------------------------------------------------------------------
# The bus


class NatsBus(Bus):
    """JetStream + PostgreSQL bus (see the module docs). Thread-safe: one PostgreSQL
    connection per thread, one NATS connection per bus."""

    def __init__(
        self,
        nats_url: str,
        db_url: str,
        config: BusConfig | None = None,
        *,
        prefix: str = "paypost",
        clock: Clock = time.time,
        rand: Rand = random.random,
        replicas: int = 1,
        time_scale: float = 1.0,
        fetch_wait_s: float = 0.05,
        sweep: bool = True,
    ) -> None:
        self.nats_url = nats_url
        self.db_url = db_url
        self.config = config or BusConfig()
        self.prefix = prefix
        self.clock = clock
        self.rand = rand
        self.replicas = replicas
        self.time_scale = time_scale
        self.fetch_wait_s = fetch_wait_s
        self.schema = "".join(c if c.isalnum() else "_" for c in prefix).lower() + "_bus"
        self.s = sql.Identifier(self.schema)
        self.archive_stream = _stream_name(prefix, "ARCHIVE")
        self.queue_stream = _stream_name(prefix, "QUEUE")
        self.dlq_stream = _stream_name(prefix, "DLQ")
        self.archive_subject = f"{prefix}.archive"
        self._local = threading.local()
        self._conns: list[psycopg.Connection[Any]] = []
        self._conns_lock = threading.Lock()
        self._cache_lock = threading.Lock()
        self._cache_at = 0.0
        self._targets: dict[str, TargetConfig] = {}
        self._rules: dict[str, Rule] = {}
        self._router: Router | None = None
        self._state: dict[str, _TargetState] = {}
        self._held: dict[tuple[str, int], _Held] = {}
        # the delivery count of messages this bus settled lately: a late copy of one of them
        # (same count) is not a new delivery (see `receive`)
        self._settled_recent: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._delayed: dict[tuple[str, int], float] = {}
        self._held_lock = threading.Lock()
        self._closed = False
        self._loop = _Loop()
        try:
            self.nc: NatsClient = self._loop.run(self._connect(), timeout=30)
        except BaseException:
            self._loop.stop()
            raise
        self.js = self.nc.jetstream(publish_async_max_pending=20000)
        try:
            conn = self.db()
            with conn.transaction():
                for stmt in _schema_sql(self.s):
                    conn.execute(stmt)
                _store_outbox_uncompressed(conn, self.s)
            self._loop.run(self._ensure_streams())
            self._refresh(force=True)
        except BaseException:
            self.close()
            raise
        self._sweeper: threading.Thread | None = None
        self._stop = threading.Event()
        if sweep:
            self._sweeper = threading.Thread(
                target=self._sweep_loop, name="outbox-relay", daemon=True
            )
            self._sweeper.start()

    # -- connections -----------------------------------------------------------------------
    async def _connect(self) -> NatsClient:
        try:
            # nats-py retries a first connect forever when reconnects are unlimited: probe
            await _probe(self.nats_url)
            return await nats.connect(
                servers=[u.strip() for u in self.nats_url.split(",") if u.strip()],
                connect_timeout=3,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                allow_reconnect=True,
            )
        except Exception as exc:
            raise ServiceUnavailable(
                f"NATS is not reachable at {BUS_URL_SETTING}={self.nats_url}: "
                f"{type(exc).__name__}: {exc}. Start nats-server with JetStream (-js), or set "
                f"{BUS_URL_SETTING} (or `bus_url` in the config file) to a reachable server."
            ) from None

    def db(self) -> psycopg.Connection[Any]:
        """This thread's PostgreSQL connection (reconnected if it broke)."""
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed or conn.broken:
            conn = connect_db(self.db_url)
            conn.autocommit = True
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        sweeper = getattr(self, "_sweeper", None)
        if sweeper is not None:
            sweeper.join(5)
        nc = getattr(self, "nc", None)
        if nc is not None:
            with contextlib.suppress(Exception):
                self._loop.run(nc.close(), timeout=5)
        self._loop.stop()
        with self._conns_lock:
            for c in self._conns:
                with contextlib.suppress(Exception):
                    c.close()
            self._conns.clear()

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60.0) -> T:
        return self._loop.run(coro, timeout)

    # -- streams ---------------------------------------------------------------------------
    def _scaled(self, seconds: float) -> float:
        return max(seconds * self.time_scale, 0.001)

    def _dup_window(self) -> float:
        window = min(self.config.effective_dedup_window_s, MAX_MSG_ID_WINDOW_S)
        return self._scaled(window)

    async def _ensure_streams(self) -> None:
        retention = self.config.archive_retention_s
        dup = self._dup_window()
        max_age = None
        if retention is not None:
            # JetStream requires max_age >= duplicate_window
            max_age = max(self._scaled(retention), dup)
        wanted = [
            StreamConfig(
                name=self.archive_stream,
                subjects=[self.archive_subject],
                retention=RetentionPolicy.LIMITS,
                max_age=max_age,
                duplicate_window=dup,
                storage=StorageType.FILE,
                num_replicas=self.replicas,
            ),
            StreamConfig(
                name=self.queue_stream,
                subjects=[f"{self.prefix}.q.>"],
                retention=RetentionPolicy.WORK_QUEUE,
                duplicate_window=dup,
                storage=StorageType.FILE,
                num_replicas=self.replicas,
            ),
            StreamConfig(
                name=self.dlq_stream,
                subjects=[f"{self.prefix}.dlq.>"],
                retention=RetentionPolicy.LIMITS,
                duplicate_window=dup,
                storage=StorageType.FILE,
                num_replicas=self.replicas,
            ),
        ]
        # A JetStream cluster that just lost a node answers no API request until it has
        # elected new leaders (seconds): a worker starting meanwhile waits, it does not fail.
        deadline = time.monotonic() + STREAM_SETUP_WAIT_S
        for cfg in wanted:
            while True:
                try:
                    try:
                        await self.js.stream_info(cfg.name or "")
                        await self.js.update_stream(cfg)
                    except nats.js.errors.NotFoundError:
                        await self.js.add_stream(cfg)
                    break
                except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
                    if time.monotonic() >= deadline:
                        raise ServiceUnavailable(
                            f"JetStream at {BUS_URL_SETTING}={self.nats_url} did not answer for "
                            f"{STREAM_SETUP_WAIT_S:.0f} s while setting up stream {cfg.name} "
                            f"({type(exc).__name__}). A cluster that lost a majority of its "
                            "nodes cannot elect leaders: start the missing nodes (`nats server "
                            "report jetstream` shows which), then start this process again."
                        ) from exc
                    log.warning("jetstream.not_ready", stream=cfg.name, error=repr(exc))
                    await asyncio.sleep(0.5)

    def queue_subject(self, target: str) -> str:
        return f"{self.prefix}.q.{target}"

    def dlq_subject(self, target: str) -> str:
        return f"{self.prefix}.dlq.{target}"

    async def _ensure_consumer(self, target: TargetConfig) -> None:
        cfg = ConsumerConfig(
            durable_name=_durable(target.name),
            filter_subject=self.queue_subject(target.name),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self._scaled(target.lease_s),
            max_deliver=-1,  # paypost dead-letters itself, with the reason
            max_ack_pending=target.max_in_flight or 1_000_000,
            max_waiting=512,
            num_replicas=self.replicas,
        )
        try:
            await self.js.add_consumer(self.queue_stream, cfg)
        except nats.js.errors.BadRequestError:
            # a change the server cannot apply in place: recreate (the queue keeps its
            # messages; in-flight ones are redelivered to the new consumer)
            await self.js.delete_consumer(self.queue_stream, cfg.durable_name or "")
            await self.js.add_consumer(self.queue_stream, cfg)

    # -- configuration ---------------------------------------------------------------------
    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._cache_at < 1.0:
            return
        conn = self.db()
        targets = conn.execute(sql.SQL("SELECT config FROM {}.targets").format(self.s)).fetchall()
        rules = conn.execute(sql.SQL("SELECT rule FROM {}.rules").format(self.s)).fetchall()
        with self._cache_lock:
            self._targets = {
                t.name: t for t in (msgspec.json.decode(r[0], type=TargetConfig) for r in targets)
            }
            new_rules = {r.name: r for r in (msgspec.json.decode(x[0], type=Rule) for x in rules)}
            if new_rules != self._rules:
                self._rules = new_rules
                self._router = None
            self._cache_at = now

    def router(self) -> Router:
        self._refresh()
        with self._cache_lock:
            if self._router is None:
                self._router = Router(sorted(self._rules.values(), key=lambda r: r.name))
            return self._router

    def put_target(self, target: TargetConfig) -> None:
        self._run(self._ensure_consumer(target))
        self.db().execute(
            sql.SQL(
                "INSERT INTO {}.targets VALUES (%s, %s) ON CONFLICT (name) "
                "DO UPDATE SET config = excluded.config"
            ).format(self.s),
            (target.name, _json.encode(target)),
        )
        self._refresh(force=True)

    def put_rule(self, rule: Rule) -> None:
        compile_pattern(rule.pattern, f"rule {rule.name!r}")
        self._refresh(force=True)
        self.target(rule.target)
        self.db().execute(
            sql.SQL(
                "INSERT INTO {}.rules VALUES (%s, %s) ON CONFLICT (name) "
                "DO UPDATE SET rule = excluded.rule"
            ).format(self.s),
            (rule.name, _json.encode(rule)),
        )
        self._refresh(force=True)

    def delete_rule(self, name: str) -> None:
        cur = self.db().execute(
            sql.SQL("DELETE FROM {}.rules WHERE name = %s").format(self.s), (name,)
        )
        if cur.rowcount == 0:
            raise UnknownRule(f"rule {name!r} does not exist.")
        self._refresh(force=True)

    def targets(self) -> list[TargetConfig]:
        self._refresh()
        with self._cache_lock:
            return list(self._targets.values())

    def rules(self) -> list[Rule]:
        self._refresh()
        with self._cache_lock:
            return list(self._rules.values())

    def _target_state(self, target: str) -> _TargetState:
        with self._cache_lock:
            st = self._state.get(target)
            if st is None:
                st = self._state[target] = _TargetState()
            return st

    # -- transactions ----------------------------------------------------------------------
    @contextmanager
    def unit_of_work(self) -> Iterator[UnitOfWork]:
        current: NatsUnitOfWork | None = getattr(self._local, "uow", None)
        if current is not None:  # nested: join the outer unit of work
            yield current
            return
        conn = self.db()
        uow = NatsUnitOfWork(self, conn)
        self._local.uow = uow
        try:
            with conn.transaction():
                yield uow
                uow.flush()
        except BaseException:
            uow.release_relay_lock()
            raise
        finally:
            self._local.uow = None
        uow.after_commit()

    # -- relay -----------------------------------------------------------------------------
    async def _publish_rows(self, rows: Sequence[_OutRow]) -> list[bool]:
        """Publish outbox rows (one message each); returns per row whether JetStream dropped
        it as a duplicate of its Nats-Msg-Id."""
        js = self.js

        # Async publishes: one shared reply inbox, acks collected as they come.
        out: list[bool] = []
        for i in range(0, len(rows), 2000):
            futures: list[asyncio.Future[Any]] = []
            for row in rows[i : i + 2000]:
                headers = dict(row.headers)
                headers[MSG_ID] = row.msg_id
                futures.append(await js.publish_async(row.subject, row.body, headers=headers))
            acks = await asyncio.wait_for(asyncio.gather(*futures), 30)
            out += [bool(a.duplicate) for a in acks]
        return out

    def relay(self, uow_id: int, rows: Sequence[_OutRow]) -> None:
        """Publish a committed unit of work's outbox rows, then delete them (and release the
        unit of work's relay lock, see `sweep_outbox`, in the same statement)."""
        if not rows:
            return
        self._run(self._publish_rows(rows))
        self.db().execute(
            sql.SQL(
                # count(*) over the DELETE: the rows are deleted (and row-locked until
                # commit) before the lock is released, so no sweeper claims them in between
                "WITH gone AS (DELETE FROM {}.outbox WHERE uow = %s RETURNING 1) "
                "SELECT pg_advisory_unlock(%s, %s) FROM (SELECT count(*) FROM gone) AS g"
            ).format(self.s),
            (uow_id, *_relay_lock_key(uow_id)),
        )

    def sweep_outbox(self, older_than_s: float = SWEEP_AFTER_S, limit: int = 5000) -> int:
        """Publish outbox rows a crashed (or disconnected) relay left behind. Any worker may
        run it; rows are claimed with SKIP LOCKED. Rows whose relay is still at work are
        left alone: a unit of work holds a session advisory lock on its id from before its
        commit until its relay deleted the rows (a dead relay's session lost the lock), so a
        slow relay is not doubled by the sweepers of every worker. Returns how many rows were
        published."""
        conn = self.db()
        with conn.transaction():
            found = conn.execute(
                sql.SQL(
                    "SELECT uow, idx, subject, queues, msg_id, headers, body FROM {}.outbox "
                    "WHERE created < now() - make_interval(secs => %s) "
                    "AND pg_try_advisory_xact_lock(((uow >> 31) & 2147483647)::int, "
                    "(uow & 2147483647)::int) ORDER BY uow, idx "
                    "LIMIT %s FOR UPDATE SKIP LOCKED"
                ).format(self.s),
                (older_than_s, limit),
            ).fetchall()
            if not found:
                return 0
            rows = [
                _OutRow(
                    subject=r[2],
                    queues=[q for q in r[3].split(" ") if q],
                    msg_id=r[4],
                    headers=_headers_decoder.decode(r[5]),
                    body=bytes(r[6]),
                )
                for r in found
            ]
            self._run(self._publish_rows(rows))
            with conn.cursor() as cur:
                cur.executemany(
                    sql.SQL("DELETE FROM {}.outbox WHERE uow = %s AND idx = %s").format(self.s),
                    [(r[0], r[1]) for r in found],
                )
        log.info("outbox.swept", rows=len(rows))
        return len(rows)

    def vacuum_churn(self, min_dead_rows: int = VACUUM_DEAD_ROWS) -> list[tuple[str, int]]:
        """VACUUM the tables of this deployment (schemas `<prefix>_*`) holding at least
        MIN_DEAD_ROWS dead rows; returns (table, dead rows) of each one vacuumed.

        paypost deletes or updates rows at the rate of the traffic: the outbox (every event
        passes through it, ~10 KB per authorization), the posting-file outbox, assembly
        sequences, counters. PostgreSQL only reuses that space after a VACUUM; with
        autovacuum off (a common setting on CI and test servers) or slower than the traffic,
        the outbox grows by gigabytes per million authorizations and every scan of it (the
        sweeper's, `outbox_size`) reads the dead rows. One worker at a time (a session
        advisory lock, skipped when held); `SKIP_LOCKED` leaves a table that autovacuum is
        already working on."""
        conn = self.db()
        row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", _VACUUM_LOCK).fetchone()
        if row is None or not row[0]:
            return []
        done: list[tuple[str, int]] = []
        try:
            # dead rows of the table and of its TOAST table (archive segments live there)
            due = conn.execute(
                "SELECT n.nspname, c.relname, s.n_dead_tup + coalesce(t.n_dead_tup, 0) AS dead "
                "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "JOIN pg_stat_all_tables s ON s.relid = c.oid "
                "LEFT JOIN pg_stat_all_tables t ON t.relid = c.reltoastrelid "
                "WHERE c.relkind = 'r' AND (n.nspname = %s OR starts_with(n.nspname, %s)) "
                "AND s.n_dead_tup + coalesce(t.n_dead_tup, 0) >= %s ORDER BY dead DESC",
                (self.schema, f"{self.prefix}_", min_dead_rows),
            ).fetchall()
            for schema, table, dead in due:
                conn.execute(
                    sql.SQL("VACUUM (SKIP_LOCKED) {}.{}").format(
                        sql.Identifier(schema), sql.Identifier(table)
                    )
                )
                done.append((f"{schema}.{table}", int(dead)))
                log.info("db.vacuumed", table=f"{schema}.{table}", dead_rows=int(dead))
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", _VACUUM_LOCK)
        return done

    def _sweep_loop(self) -> None:
        vacuumed_at = time.monotonic()
        while not self._stop.wait(1.0):
            try:
                self.sweep_outbox()
            except Exception as exc:  # services down: try again on the next tick
                log.warning("outbox.sweep_failed", error=repr(exc))
            if time.monotonic() - vacuumed_at >= VACUUM_EVERY_S:
                vacuumed_at = time.monotonic()
                try:
                    self.vacuum_churn()
                except Exception as exc:  # the same: the next round tries again
                    log.warning("db.vacuum_failed", error=repr(exc))

    def outbox_size(self) -> int:
        row = self.db().execute(sql.SQL("SELECT count(*) FROM {}.outbox").format(self.s)).fetchone()
        return int(row[0]) if row else 0

    # -- consume ---------------------------------------------------------------------------
    async def _fetch(self, target: str, n: int, wait: float) -> list[Msg]:
        st = self._target_state(target)
        if st.sub is None:
            st.sub = await self.js.pull_subscribe_bind(_durable(target), self.queue_stream)
        try:
            msgs: list[Msg] = await st.sub.fetch(n, timeout=wait)
            return msgs
        except (TimeoutError, nats.errors.TimeoutError):
            return []

    def _fetch_events(self, cfg: TargetConfig, need: int) -> list[Msg]:
        """Messages holding about NEED events. A bundling target's messages hold 1 to
        `bundle` events: ask for NEED / bundle messages first, then for what is still
        missing at the size seen, while the server says more are pending (a few rounds at
        most; fetching NEED messages at once could lease NEED × bundle events)."""
        if cfg.bundle <= 1:
            return self._run(self._fetch(cfg.name, need, self.fetch_wait_s))
        out: list[Msg] = []
        n = -(-need // cfg.bundle)
        for _ in range(4):
            msgs = self._run(self._fetch(cfg.name, n, self.fetch_wait_s))
            out += msgs
            if len(msgs) < n or not msgs[-1].metadata.num_pending:
                break
            got = sum(int((m.headers or {}).get(H_BUNDLE, 1)) for m in msgs)
            need -= got
            if need <= 0:
                break
            n = -(-need * len(msgs) // got)
        return out

    def receive(self, target: str, max_events: int | None = None) -> list[Delivery]:
        cfg = self.target(target)
        want = cfg.batch_size if max_events is None else max_events
        if want <= 0:
            return []
        st = self._target_state(target)
        with st.lock:
            need = want - len(st.buffer)
            msgs = self._fetch_events(cfg, need) if need > 0 else []
            now = self.clock()
            expired: list[tuple[Msg, int]] = []
            spent: list[Msg] = []
            for m in msgs:
                md = m.metadata
                seq, delivered = md.sequence.stream, md.num_delivered
                with self._held_lock:
                    seen = self._held.get((target, seq))
                    last = (
                        seen.delivered
                        if seen is not None
                        else self._settled_recent.get((target, seq), 0)
                    )
                buffered = st.buffer.get(seq * QUEUE_STRIDE)
                if delivered <= last or (buffered is not None and buffered.delivered > delivered):
                    # A copy of a delivery this bus already handed out, settled or holds
                    # (a pull request that outlived its fetch's timeout can bring one late,
                    # even after the nack that asked for the next delivery): the server's
                    # next delivery of that message has a higher count. Not a new attempt.
                    continue
                if delivered > cfg.retry.max_attempts:
                    expired.append((m, delivered))
                    continue
                headers = m.headers or {}
                queued_at = float(headers.get(H_QUEUED_AT, now))
                base = seq * QUEUE_STRIDE
                if H_BUNDLE not in headers:
                    st.buffer[base] = _Buffered(m, delivered, queued_at, 1, frozenset(), m.data)
                    continue
                entries = _bundle_decoder.decode(m.data)
                done = self._settled_members(target, seq) if delivered > 1 else frozenset()
                if len(done) >= len(entries):  # all settled before a crash: nothing left
                    spent.append(m)
                    continue
                for i, (_, body) in enumerate(entries):
                    st.buffer.pop(base + i, None)  # an older copy's member
                    if i not in done:
                        st.buffer[base + i] = _Buffered(
                            m, delivered, queued_at, len(entries), done, body
                        )
            if spent:
                self._forget_settled(target, [m.metadata.sequence.stream for m in spent])
                self._run(_ack_all(spent))
            if expired:
                self._dead_letter_expired(cfg, expired, now)
            if not st.buffer:
                return []
            if len(st.buffer) < want and cfg.linger_ms:
                oldest = min(b.queued_at for b in st.buffer.values())
                if now < oldest + cfg.linger_ms / 1000.0:
                    return []
            taken = _whole_messages(sorted(st.buffer), want)
            out: list[Delivery] = []
            with self._held_lock:
                for qid in taken:
                    b = st.buffer.pop(qid)
                    key = (target, qid // QUEUE_STRIDE)
                    held = prev = self._held.get(key)
                    if prev is None or prev.msg is not b.msg:
                        self._delayed.pop(key, None)
                        if b.delivered == 1:
                            first = now
                        elif prev is not None:
                            first = prev.first_at
                        else:
                            first = b.queued_at
                        held = self._held[key] = _Held(
                            b.msg,
                            b.delivered,
                            first,
                            members=b.members,
                            done=set(b.presettled),
                            recorded=bool(b.presettled),
                        )
                    assert held is not None
                    body = b.body
                    event = decode_event(body)
                    out.append(
                        Delivery(
                            event=event,
                            target=target,
                            attempt=b.delivered,
                            first_attempt_at=held.first_at,
                            last_attempt_at=now,
                            handle=DeliveryHandle(qid, b.delivered),
                            position=qid,  # queue sequence × QUEUE_STRIDE + index in it
                            id_key=id_key(event.id),
                            content_hash=content_hash(body),
                        )
                    )
            return out

    def _remember_settled(self, key: tuple[str, int], delivered: int) -> None:
        """(Under `_held_lock`.) Remember KEY's last settled delivery, bounded."""
        recent = self._settled_recent
        recent[key] = delivered
        recent.move_to_end(key)
        while len(recent) > SETTLED_RECENT_MAX:
            recent.popitem(last=False)

    def _settled_members(self, target: str, seq: int) -> frozenset[int]:
        """Members of redelivered bundle SEQ settled before its nack (see `settled`)."""
        rows = self.db().execute(
            sql.SQL("SELECT idx FROM {}.settled WHERE target = %s AND seq = %s").format(self.s),
            (target, seq),
        )
        return frozenset(int(r[0]) for r in rows)

    def _forget_settled(self, target: str, seqs: list[int]) -> None:
        self.db().execute(
            sql.SQL("DELETE FROM {}.settled WHERE target = %s AND seq = ANY(%s)").format(self.s),
            (target, seqs),
        )

    def extend_leases(self, deliveries: Iterable[Delivery]) -> int:
        """Restart the lease of deliveries still in hand (JetStream "work in progress"), for
        a batch that runs long: without it a lease that runs out mid-batch sends the batch
        to another worker, both process it, one rolls back. Returns how many were
        extended."""
        msgs: dict[int, Msg] = {}  # a bundle's members share one message and one lease
        n = 0
        with self._held_lock:
            for d in deliveries:
                held = self._held.get((d.target, d.handle.queue_id // QUEUE_STRIDE))
                if held is not None and held.delivered == d.handle.lease:
                    msgs[id(held)] = held.msg
                    n += 1
        if msgs:
            self._run(_in_progress_all(msgs.values()))
        return n

    def _dead_letter_expired(
        self, cfg: TargetConfig, expired: list[tuple[Msg, int]], now: float
    ) -> None:
        """Deliveries past the last attempt (their consumers kept crashing): to the DLQ."""
        rows = []
        bundles = []
        for m, delivered in expired:
            error = (
                f"lease expired without ack after attempt {delivered - 1} of "
                f"{cfg.retry.max_attempts} (the consumer crashed or ran past "
                f"lease_s={cfg.lease_s}s)"
            )
            headers = m.headers or {}
            if H_BUNDLE not in headers:
                rows.append(self._dlq_row(cfg.name, m, delivered - 1, error, now))
                continue
            seq = m.metadata.sequence.stream
            done = self._settled_members(cfg.name, seq)
            for i, member in enumerate(_bundle_decoder.decode(m.data)):
                if i not in done:
                    rows.append(self._dlq_row(cfg.name, m, delivered - 1, error, now, i, member))
            bundles.append(seq)
        self._run(self._publish_rows(rows))
        if bundles:
            self._forget_settled(cfg.name, bundles)
        self._run(_ack_all([m for m, _ in expired]))

    def _dlq_row(
        self,
        target: str,
        m: Msg,
        attempts: int,
        error: str,
        now: float,
        index: int = 0,
        member: tuple[str, bytes] | None = None,
    ) -> _OutRow:
        """The dead letter of event INDEX of queue message M (MEMBER: its (archive id, body)
        when the caller decoded the bundle already)."""
        h = m.headers or {}
        seq = m.metadata.sequence.stream
        held = self._held.get((target, seq))
        first = held.first_at if held is not None else float(h.get(H_QUEUED_AT, now))
        archive_id, body = member if member is not None else _member(m, index)
        return _OutRow(
            subject=self.dlq_subject(target),
            queues=[],
            msg_id=f"dlq.{target}.{seq}" + (f".{index}" if H_BUNDLE in h else ""),
            headers={
                H_ERROR: clean_error(error),
                H_ATTEMPTS: str(attempts),
                H_FIRST_AT: _f(first),
                H_LAST_AT: _f(now),
                H_DEAD_AT: _f(now),
                H_ARCHIVE_ID: archive_id,
            },
            body=body,
        )

    async def _consumer_info(self, target: str) -> Any:
        return await self.js.consumer_info(self.queue_stream, _durable(target))

    def pending(self, target: str) -> int:
        self.target(target)
        info = self._run(self._consumer_info(target))
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    def next_visible_in(self, target: str) -> float | None:
        self.target(target)
        if self._target_state(target).buffer:
            return 0.0
        info = self._run(self._consumer_info(target))
        if info.num_pending:
            return 0.0
        if info.num_ack_pending:
            return 0.05
        return None

    # -- dead letters ----------------------------------------------------------------------
    def _to_dead_letter(
        self, seq: int, subject: str, headers: dict[str, str], body: bytes
    ) -> DeadLetter:
        return DeadLetter(
            id=seq,
            target=subject[len(self.prefix) + len(".dlq.") :],
            event=decode_event(body),
            error=headers.get(H_ERROR, ""),
            attempts=int(headers.get(H_ATTEMPTS, "1")),
            first_attempt_at=float(headers.get(H_FIRST_AT, "0")),
            last_attempt_at=float(headers.get(H_LAST_AT, "0")),
            dead_lettered_at=float(headers.get(H_DEAD_AT, "0")),
        )

    def dlq_list(
        self,
        target: str | None = None,
        pattern: dict[str, Any] | None = None,
        limit: int | None = None,
    ) -> list[DeadLetter]:
        matcher = compile_pattern(pattern, "--pattern") if pattern is not None else None
        if target is not None:
            self.target(target)
        subject = self.dlq_subject(target) if target is not None else f"{self.prefix}.dlq.>"
        out: list[DeadLetter] = []
        for seq, subj, headers, body, _ in self._scan(self.dlq_stream, subject):
            dl = self._to_dead_letter(seq, subj, headers, body)
            if matcher is not None and not matcher.matches(dl.event.to_dict()):
                continue
            out.append(dl)
            if limit is not None and len(out) >= limit:
                break
        return out

    def dlq_get(self, entry_id: int) -> DeadLetter:
        try:
            raw = self._run(self.js.get_msg(self.dlq_stream, entry_id))
        except nats.js.errors.NotFoundError:
            raw = None
        if (
            raw is None
            or raw.data is None
            or not (raw.subject or "").startswith(f"{self.prefix}.dlq.")
        ):
            raise DeadLetterNotFound(
                f"dead letter {entry_id} does not exist; `paypost dlq list` shows the ids."
            )
        return self._to_dead_letter(entry_id, raw.subject or "", dict(raw.headers or {}), raw.data)

    def dlq_redrive(
        self,
        target: str | None = None,
        pattern: dict[str, Any] | None = None,
        ids: Sequence[int] | None = None,
    ) -> int:
        chosen = self.dlq_list(target, pattern)
        if ids is not None:
            wanted = set(ids)
            chosen = [d for d in chosen if d.id in wanted]
        if not chosen:
            return 0
        now = self.clock()
        rows = []
        for d in chosen:
            raw = self._run(self.js.get_msg(self.dlq_stream, d.id))
            rows.append(
                _OutRow(
                    subject=self.queue_subject(d.target),
                    queues=[],
                    msg_id=f"{d.event.id}#redrive.{d.id}",
                    headers={
                        H_QUEUED_AT: _f(now),
                        H_ARCHIVE_ID: dict(raw.headers or {}).get(H_ARCHIVE_ID, ""),
                    },
                    body=raw.data or b"",
                )
            )
        with self.unit_of_work() as uow:
            assert isinstance(uow, NatsUnitOfWork)
            uow.rows.extend(rows)
        # only after the queue copies are published: drop the dead letters
        for d in chosen:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                self._run(self.js.delete_msg(self.dlq_stream, d.id))
        return len(chosen)

    # -- archive ---------------------------------------------------------------------------
    def _scan(
        self, stream: str, subject: str, start: float | None = None
    ) -> Iterator[tuple[int, str, dict[str, str], bytes, float]]:
        """(stream seq, subject, headers, body, server time) of STREAM's messages on
        SUBJECT, oldest first, through an ephemeral pull consumer (acks off)."""
        deliver = DeliverPolicy.ALL
        start_time = None
        # seek by server time only when the bus clock is the wall clock (tests use fakes)
        if start is not None and abs(self.clock() - time.time()) < 60:
            deliver = DeliverPolicy.BY_START_TIME
            start_time = datetime.fromtimestamp(max(start - 60, 0), UTC)
        cfg = ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=deliver,
            opt_start_time=start_time,
            filter_subject=subject,
            inactive_threshold=30.0,
            mem_storage=True,
            num_replicas=1,
        )
        sub = self._run(self.js.pull_subscribe(subject, stream=stream, config=cfg))
        try:
            waits = 0
            while True:
                try:
                    msgs = self._run(sub.fetch(1000, timeout=0.2))
                except (TimeoutError, nats.errors.TimeoutError):
                    # a busy server may miss 0.2 s: the end is when nothing is pending
                    waits += 1
                    info = self._run(sub.consumer_info())
                    if not info.num_pending or waits >= 25:
                        return
                    continue
                last_pending = 1
                for m in msgs:
                    md = m.metadata
                    yield (
                        md.sequence.stream,
                        m.subject,
                        dict(m.headers or {}),
                        m.data,
                        md.timestamp.timestamp() if md.timestamp else 0.0,
                    )
                    last_pending = md.num_pending
                if not msgs or last_pending == 0:
                    return
        finally:
            with contextlib.suppress(Exception):
                self._run(sub.unsubscribe(), timeout=5)

    def _archived(self, start: float, end: float) -> Iterator[tuple[int, float, bytes, str]]:
        """(position, archived at, body, archive id) in [START, END) by the bus clock; the
        position of the i-th event of archive segment `seq` is seq × 1,000,000 + i."""
        counts = self._committed_segments()
        for seq, _, headers, body, _ in self._scan(
            self.archive_stream, self.archive_subject, start
        ):
            if not counts(headers):
                continue
            for i, (entry_id, at, event) in enumerate(_segment_decoder.decode(body)):
                if start <= at < end:
                    yield seq * POSITION_STRIDE + i, at, event, entry_id

    def _committed_segments(self) -> Callable[[dict[str, str]], bool]:
        """A test of an archive segment's headers: does it count (its unit of work
        committed)? Looks each unit of work up once."""
        known: dict[int, bool] = {}

        def counts(headers: dict[str, str]) -> bool:
            uow = _segment_uow(headers.get(MSG_ID, ""))
            if uow is None:
                return True
            if uow not in known:
                row = (
                    self.db()
                    .execute(
                        sql.SQL("SELECT 1 FROM {}.archive_uows WHERE uow = %s").format(self.s),
                        (uow,),
                    )
                    .fetchone()
                )
                known[uow] = row is not None
            return known[uow]

        return counts

    def archive(self, query: ArchiveQuery) -> Iterator[ArchivedEvent]:
        matcher = compile_pattern(query.pattern, "--pattern") if query.pattern is not None else None
        for pos, at, body, _ in self._archived(query.start, query.end):
            event = decode_event(body)
            if matcher is None or matcher.matches(event.to_dict()):
                yield ArchivedEvent(position=pos, archived_at=at, event=event)

    def archive_bytes(self) -> int:
        """Bytes the archive stream holds (its segments as JetStream stores them)."""
        info = self._run(self.js.stream_info(self.archive_stream))
        return int(info.state.bytes or 0)

    def archive_count(self, start: float | None = None, end: float | None = None) -> int:
        if start is None and end is None:
            # counted in PostgreSQL with the outbox rows that carry them (and by purge)
            return self.counters().get("archived", 0)
        lo = float("-inf") if start is None else start
        hi = float("inf") if end is None else end
        return sum(1 for _ in self._archived(lo, hi))

    def replay(
        self,
        query: ArchiveQuery,
        target: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> ReplayResult:
        if target is not None:
            self.target(target)
        router = self.router() if target is None else self.router().for_target(target)
        matcher = compile_pattern(query.pattern, "--pattern") if query.pattern is not None else None
        total = self.archive_count(query.start, query.end) if progress is not None else 0
        result = ReplayResult()
        nonce = secrets.token_hex(6)
        rows: list[_OutRow] = []
        now = self.clock()

        def flush() -> None:
            if rows:
                with self.unit_of_work() as uow:
                    assert isinstance(uow, NatsUnitOfWork)
                    uow.rows.extend(rows)
                rows.clear()

        for _, _, body, archive_id in self._archived(query.start, query.end):
            result.scanned += 1
            event = decode_event(body)
            if matcher is None or matcher.matches(event.to_dict()):
                result.matched += 1
                for t in router.route(event):
                    rows.append(
                        _OutRow(
                            subject=self.queue_subject(t),
                            queues=[],
                            msg_id=f"{archive_id}#replay.{nonce}>{t}",
                            headers={H_QUEUED_AT: _f(now), H_ARCHIVE_ID: archive_id},
                            body=body,
                        )
                    )
                    result.routed[t] = result.routed.get(t, 0) + 1
            if len(rows) >= 1000:
                flush()
            if progress is not None:
                progress(result.scanned, total)
        flush()
        return result

    def purge_archive(self, now: float | None = None) -> int:
        """Drop archived events older than the retention by the bus clock, except those
        still queued or dead-lettered. (The archive stream's `max_age` does the same on the
        server's clock without that exception: queues and the DLQ hold their own copies.)"""
        if self.config.archive_retention_s is None:
            return 0
        cutoff = (self.clock() if now is None else now) - self.config.archive_retention_s
        referenced = {
            h.get(H_ARCHIVE_ID, "")
            for _, _, h, _, _ in self._scan(self.dlq_stream, f"{self.prefix}.dlq.>")
        }
        referenced |= self._queued_archive_ids()
        dropped = 0
        counts = self._committed_segments()
        live: set[int] = set()  # units of work with segments left in the archive
        for seq, _, headers, body, _ in self._scan(self.archive_stream, self.archive_subject):
            uow = _segment_uow(headers.get(MSG_ID, ""))
            if float(headers.get(H_ARCHIVED_AT, "0")) >= cutoff:
                if uow is not None:
                    live.add(uow)
                continue
            if not counts(headers):  # its unit of work never committed: not archived
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    self._run(self.js.delete_msg(self.archive_stream, seq))
                continue
            entries = _segment_decoder.decode(body)
            kept = [e for e in entries if e[1] >= cutoff or e[0] in referenced]
            if len(kept) == len(entries):
                continue
            if kept:  # rewrite the segment with what must stay (same archive ids)
                seg = _Segment(f"{headers.get(MSG_ID, seq)}~{secrets.token_hex(4)}")
                for e in kept:
                    seg.add(*e)
                self._run(self._publish_rows([seg.row(self.archive_subject)]))
                if uow is not None:
                    live.add(uow)
            with contextlib.suppress(nats.js.errors.NotFoundError):
                self._run(self.js.delete_msg(self.archive_stream, seq))
            dropped += len(entries) - len(kept)
        if dropped:
            self.db().execute(
                sql.SQL("INSERT INTO {}.counters VALUES ('archived', %s)").format(self.s),
                (-dropped,),
            )
        self.db().execute(
            sql.SQL("DELETE FROM {}.archive_uows WHERE at < %s AND NOT uow = ANY(%s)").format(
                self.s
            ),
            (cutoff, Int8Array(live)),
        )
        window_start = (self.clock() if now is None else now) - self.config.effective_dedup_window_s
        self.db().execute(
            sql.SQL("DELETE FROM {}.seen WHERE at < %s").format(self.s), (window_start,)
        )
        return dropped

    def _queued_archive_ids(self) -> set[str]:
        """Archive ids of every event still in a queue (direct gets: O(queued))."""
        info = self._run(self.js.stream_info(self.queue_stream))
        out: set[str] = set()
        if not info.state.messages:
            return out
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                raw = self._run(self.js.get_msg(self.queue_stream, seq))
            except nats.js.errors.NotFoundError:
                continue
            headers = dict(raw.headers or {})
            if H_BUNDLE in headers:  # its members not settled yet
                target = (raw.subject or "")[len(self.prefix) + len(".q.") :]
                done = self._settled_members(target, seq)
                entries = _bundle_decoder.decode(raw.data or b"")
                out.update(e[0] for i, e in enumerate(entries) if i not in done)
            else:
                out.add(headers.get(H_ARCHIVE_ID, ""))
        return out

    # -- stats -----------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        rows = (
            self.db()
            .execute(sql.SQL("SELECT name, sum(n) FROM {}.counters GROUP BY name").format(self.s))
            .fetchall()
        )
        return {str(r[0]): int(r[1]) for r in rows}

    def stats(self) -> BusStats:
        now = self.clock()
        counters = self.counters()
        out = []
        dead: dict[str, int] = {}
        for _, subj, _, _, _ in self._scan(self.dlq_stream, f"{self.prefix}.dlq.>"):
            name = subj[len(self.prefix) + len(".dlq.") :]
            dead[name] = dead.get(name, 0) + 1
        for t in self.targets():
            info = self._run(self._consumer_info(t.name))
            with self._held_lock:
                delayed = sum(
                    1 for (tn, _), at in self._delayed.items() if tn == t.name and at > now
                )
                # messages fetched but not handed out yet (a bundle partly handed out is
                # in flight)
                buffered = len(
                    {
                        q // QUEUE_STRIDE
                        for q in self._target_state(t.name).buffer
                        if (t.name, q // QUEUE_STRIDE) not in self._held
                    }
                )
            out.append(
                TargetStats(
                    name=t.name,
                    queued=int(info.num_pending or 0) + buffered,
                    delayed=delayed,
                    in_flight=max(0, int(info.num_ack_pending or 0) - delayed - buffered),
                    dead_lettered=dead.get(t.name, 0),
                    routed_total=counters.get(f"routed:{t.name}", 0),
                )
            )
        return BusStats(
            targets=out,
            archived=self.archive_count(),
            duplicates_dropped=counters.get("duplicates_dropped", 0),
            id_conflicts=counters.get("id_conflicts", 0),
        )

    # -- maintenance (tests, `paypost` tooling) --------------------------------------------
    def destroy(self) -> None:
        """Delete this bus's streams and PostgreSQL schema (tests and teardown only)."""
        for name in (self.archive_stream, self.queue_stream, self.dlq_stream):
            with contextlib.suppress(Exception):
                self._run(self.js.delete_stream(name))
        with contextlib.suppress(Exception):
            self.db().execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(self.s))


async def _probe(url: str) -> None:
    """Raise OSError unless some server of URL (comma-separated) accepts a TCP connection."""
    last: Exception = OSError(f"no server in {url!r}")
    for server in url.split(","):
        parsed = urlsplit(server.strip() if "://" in server else f"nats://{server.strip()}")
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(parsed.hostname or "127.0.0.1", parsed.port or 4222), 3
            )
            writer.close()
            return
        except (TimeoutError, OSError) as exc:
            last = exc
    raise last


async def _in_progress_all(msgs: Iterable[Msg]) -> None:
    for m in msgs:
        await m.in_progress()


async def _ack_all(msgs: Iterable[Msg]) -> None:
    for m in msgs:
        await m.ack()


class NatsUnitOfWork(UnitOfWork):
    def __init__(self, bus: NatsBus, conn: psycopg.Connection[Any]) -> None:
        self.bus = bus
        self.conn = conn
        self.id = secrets.randbits(62)
        self.rows: list[_OutRow] = []
        self.segments: list[_Segment] = []
        # queue copies by queue subject: (archive id, body), made into messages at flush
        self.queued: dict[str, list[tuple[str, bytes]]] = {}
        self.queued_at: dict[str, str] = {}
        self.publishes = 0
        self.counts: dict[str, int] = {}
        self.acks: dict[tuple[str, int], _Held] = {}
        self.naks: dict[tuple[str, int], tuple[_Held, float, float]] = {}
        self.tracked: set[tuple[str, int, int]] = set()
        self.callbacks: list[Callable[[], None]] = []
        self.relay_locked = False

    # -- write-behind: outbox rows and counters are inserted once, at the end ------------
    def flush(self) -> None:
        b = self.bus
        archiving: concurrent.futures.Future[list[bool]] | None = None
        if self.segments:
            # The archive goes to JetStream now, BEFORE the commit, not through the outbox
            # (~10 KB per authorization written to PostgreSQL and deleted again). It counts
            # once this transaction commits its `archive_uows` row; a rollback or a crash
            # leaves segments that archive readers skip. A failed publish fails the unit of
            # work. The publish runs on the NATS loop while the statements below go to
            # PostgreSQL; flush returns (and the commit follows) once JetStream stored it.
            archived = sum(len(seg.entries) for seg in self.segments)
            self._bump("archived", archived)
            self.conn.execute(
                sql.SQL("INSERT INTO {}.archive_uows VALUES (%s, %s)").format(b.s),
                (self.id, b.clock()),
            )
            segments = [seg.row(b.archive_subject) for seg in self.segments]
            archiving = asyncio.run_coroutine_threadsafe(b._publish_rows(segments), b._loop.loop)
        for subject, entries in self.queued.items():
            size = b.target(subject[len(b.prefix) + len(".q.") :]).bundle
            self.rows.extend(_bundle_rows(subject, entries, self.queued_at[subject], size, self.id))
        if self.rows:
            # held from before the commit until the relay deleted the rows (see sweep_outbox)
            self.conn.execute("SELECT pg_advisory_lock(%s, %s)", _relay_lock_key(self.id))
            self.relay_locked = True
            # binary COPY: bodies go as they are (text COPY would hex-encode, doubling them)
            with (
                self.conn.cursor() as cur,
                cur.copy(
                    sql.SQL(
                        "COPY {}.outbox (uow, idx, subject, queues, msg_id, headers, body) "
                        "FROM STDIN (FORMAT BINARY)"
                    ).format(b.s)
                ) as copy,
            ):
                copy.set_types(["int8", "int4", "text", "text", "text", "bytea", "bytea"])
                for i, r in enumerate(self.rows):
                    copy.write_row(
                        (
                            self.id,
                            i,
                            r.subject,
                            " ".join(r.queues),
                            r.msg_id,
                            _json.encode(r.headers),
                            r.body,
                        )
                    )
        self._record_settled()
        counts = [(k, v) for k, v in self.counts.items() if v]
        if counts:
            with self.conn.cursor() as cur:
                cur.executemany(
                    sql.SQL("INSERT INTO {}.counters VALUES (%s, %s)").format(b.s), counts
                )
        if archiving is not None:
            archiving.result(60)

    def release_relay_lock(self) -> None:
        """Give up this unit of work's relay lock (relay failed, or the transaction did): the
        sweepers may then publish whatever of its rows committed."""
        if not self.relay_locked:
            return
        self.relay_locked = False
        with contextlib.suppress(Exception):
            if not (self.conn.closed or self.conn.broken):
                self.conn.execute("SELECT pg_advisory_unlock(%s, %s)", _relay_lock_key(self.id))

    def after_commit(self) -> None:
        b = self.bus
        try:
            b.relay(self.id, self.rows)
            self.relay_locked = False  # released by the relay's DELETE
        except Exception as exc:
            # committed: the rows stay in the outbox and the sweeper publishes them
            log.warning("outbox.relay_failed", rows=len(self.rows), error=repr(exc))
            self.release_relay_lock()
        acks, naks = self._settled_messages()
        try:
            recorded = [h for h in acks if h.recorded]
            if recorded:  # records left by a concurrent unit of work that took part of it
                for held in recorded:
                    target = held.msg.subject[len(b.prefix) + len(".q.") :]
                    b._forget_settled(target, [held.msg.metadata.sequence.stream])
            b._run(_settle(acks, naks, b))
        except Exception as exc:  # redelivered later; the tracking record skips them
            log.warning("bus.ack_failed", error=repr(exc))
        for fn in self.callbacks:
            fn()

    def _record_settled(self) -> None:
        """In the transaction: make this unit of work's settled members of queue BUNDLES
        durable when their bundle stays unsettled after it (other members still in hand) or
        goes back to the queue (a member nacked), so that a redelivery — after a crash, a
        lease or the nack — skips them: acks stay per event. A bundle settled whole by an
        ack needs no record (and loses any it had)."""
        b = self.bus
        by_msg: dict[tuple[str, int], tuple[_Held, list[int], bool]] = {}
        settled = [(k, h, False) for k, h in self.acks.items()]
        settled += [(k, h, True) for k, (h, _, _) in self.naks.items()]
        for (target, qid), held, nacked in settled:
            if held.members == 1:
                continue
            key = (target, qid // QUEUE_STRIDE)
            _, kept, any_nack = by_msg.get(key, (held, [], False))
            if not nacked:
                kept.append(qid % QUEUE_STRIDE)
            by_msg[key] = (held, kept, any_nack or nacked)
        if not by_msg:
            return
        rows: list[tuple[str, int, int]] = []
        gone: list[tuple[str, int]] = []
        with b._held_lock:
            for key, (held, kept, any_nack) in by_msg.items():
                done = len(held.done | set(kept)) + sum(
                    1 for (t, q) in self.naks if t == key[0] and q // QUEUE_STRIDE == key[1]
                )
                whole = done >= held.members
                if whole and not any_nack and held.nak_delay is None:
                    if held.recorded:
                        gone.append(key)
                    continue
                rows += [(key[0], key[1], i) for i in kept]
                held.recorded = True
        with self.conn.cursor() as cur:
            if rows:
                cur.executemany(
                    sql.SQL(
                        "INSERT INTO {}.settled VALUES (%s, %s, %s) ON CONFLICT DO NOTHING"
                    ).format(b.s),
                    rows,
                )
            for target, seq in gone:
                cur.execute(
                    sql.SQL("DELETE FROM {}.settled WHERE target = %s AND seq = %s").format(b.s),
                    (target, seq),
                )

    def _settled_messages(self) -> tuple[list[_Held], list[tuple[_Held, float]]]:
        """After commit: mark this unit of work's acked and nacked events settled in their
        messages; return the messages now settled whole — to ack, and to nack (with the
        longest delay a member asked for)."""
        b = self.bus
        acks: list[_Held] = []
        naks: list[tuple[_Held, float]] = []
        settled: list[tuple[tuple[str, int], _Held, float | None, float]]
        settled = [(k, h, None, 0.0) for k, h in self.acks.items()]
        settled += [(k, h, delay, until) for k, (h, delay, until) in self.naks.items()]
        with b._held_lock:
            for (target, qid), held, delay, until in settled:
                key = (target, qid // QUEUE_STRIDE)
                index = qid % QUEUE_STRIDE
                if b._held.get(key) is not held or index in held.done:
                    continue  # a stale lease: the message went to another delivery
                held.done.add(index)
                if delay is not None and (held.nak_delay is None or delay > held.nak_delay):
                    held.nak_delay, held.nak_until = delay, until
                if len(held.done) < held.members:
                    continue
                del b._held[key]
                b._remember_settled(key, held.delivered)
                if held.nak_delay is None:
                    acks.append(held)
                else:
                    naks.append((held, held.nak_delay))
                    b._delayed[key] = held.nak_until
        return acks, naks

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested transaction: on an exception, the database changes AND the outbox rows
        and counters added inside it are undone (the fused pipeline isolates a failing
        stage with it)."""
        rows, counts, segments = len(self.rows), dict(self.counts), len(self.segments)
        last = (len(self.segments[-1].entries), self.segments[-1].size) if self.segments else None
        queued = {q: len(entries) for q, entries in self.queued.items()}
        try:
            with self.conn.transaction():
                yield
        except BaseException:
            del self.rows[rows:]
            for q in list(self.queued):
                if q in queued:
                    del self.queued[q][queued[q] :]
                else:
                    del self.queued[q], self.queued_at[q]
            del self.segments[segments:]
            if last is not None:
                del self.segments[-1].entries[last[0] :]
                self.segments[-1].size = last[1]
            self.counts = counts
            raise

    def _bump(self, name: str, n: int) -> None:
        if n:
            self.counts[name] = self.counts.get(name, 0) + n

    # -- UnitOfWork ----------------------------------------------------------------------
    def publish(
        self,
        events: Iterable[Event],
        *,
        dedup: bool = True,
        inline: Collection[str] = (),
        only: Collection[str] | None = None,
    ) -> PublishResult:
        b = self.bus
        now = b.clock()
        if not dedup:
            # no dedup keys needed: encode only (hashing every output cost the fused worker
            # two blake2b per event)
            # a stage's EncodedEvents already carries the bodies (encode_events reuses them)
            evs = events if isinstance(events, EncodedEvents) else list(events)
            result = PublishResult(published=len(evs))
            self.publishes += 1  # the nonce keeps two publishes of one event apart
            nonce = f"{self.id:x}.{self.publishes}"
            return self._route(
                evs,
                encode_events(evs),
                now,
                result,
                inline,
                only,
                lambda i: f"{evs[i].id}#{nonce}.{i}",
            )
        batch = prepare(events)
        window_start = now - b.config.effective_dedup_window_s
        seen: dict[int, set[int]] = {}
        keys = list({p.id_key for p in batch})
        if keys:
            for k, h in self.conn.execute(
                sql.SQL(
                    "SELECT id_key, content_hash FROM {}.seen WHERE id_key = ANY(%s) AND at >= %s"
                ).format(b.s),
                (Int8Array(keys), window_start),
            ):
                seen.setdefault(k, set()).add(h)
        first_versions = {k for k in keys if k not in seen}
        keep, dups, conflicts = dedup_decide(batch, seen)
        if keep:
            with (
                self.conn.cursor() as cur,
                cur.copy(
                    sql.SQL("COPY {}.seen (id_key, content_hash, at) FROM STDIN").format(b.s)
                ) as copy,
            ):
                for p in keep:
                    copy.write_row((p.id_key, p.content_hash, now))
        self._bump("duplicates_dropped", dups)
        self._bump("id_conflicts", conflicts)
        result = PublishResult(published=len(keep), duplicates_dropped=dups, id_conflicts=conflicts)
        used: set[int] = set()

        def msg_id(i: int) -> str:
            # the event id itself for its first version; a conflicting version by content
            p = keep[i]
            if p.id_key in first_versions and p.id_key not in used:
                used.add(p.id_key)
                return p.event.id
            return f"{p.event.id}#{p.content_hash & 0xFFFFFFFFFFFFFFFF:x}"

        return self._route(
            [p.event for p in keep], [p.body for p in keep], now, result, inline, only, msg_id
        )

    def _archive(self, entry_id: str, at: float, body: bytes) -> None:
        """Add one event to this unit of work's archive segments (see `_Segment`)."""
        seg = self.segments[-1] if self.segments else None
        if seg is None or seg.full(len(body)):
            seg = _Segment(f"{SEGMENT_PREFIX}{self.id:x}.{len(self.segments)}")
            self.segments.append(seg)
        seg.add(entry_id, at, body)

    def _route(
        self,
        events: Sequence[Event],
        bodies: Sequence[bytes],
        now: float,
        result: PublishResult,
        inline: Collection[str],
        only: Collection[str] | None,
        msg_id: Callable[[int], str],
    ) -> PublishResult:
        b = self.bus
        router = b.router()
        at = _f(now)
        queued = self.queued
        route = router.route
        for i, event in enumerate(events):
            entry_id = msg_id(i)
            body = bodies[i]
            self._archive(entry_id, now, body)
            for t in route(event):
                if only is not None and t not in only:
                    continue
                result.routed[t] = result.routed.get(t, 0) + 1
                if t in inline:
                    result.inline.setdefault(t, []).append(event)
                else:
                    # one queue stream for all targets: the msg id names the target too
                    q = b.queue_subject(t)
                    copies = queued.get(q)
                    if copies is None:
                        copies = queued[q] = []
                        self.queued_at[q] = at
                    copies.append((entry_id, body))
        for t, n in result.routed.items():
            self._bump(f"routed:{t}", n)
        return result

    def dead_letter(self, target: str, events: Iterable[Event], error: str) -> int:
        b = self.bus
        b.target(target)
        error = clean_error(error)
        clock = b.clock()
        now = _f(clock)
        n = 0
        for p in prepare(events):
            entry_id = f"{p.event.id}#dlq.{self.id:x}.{len(self.rows)}"
            self._archive(entry_id, clock, p.body)
            self.rows.append(
                _OutRow(
                    subject=b.dlq_subject(target),
                    queues=[],
                    msg_id=f"{entry_id}>dlq",
                    headers={
                        H_ARCHIVE_ID: entry_id,
                        H_ERROR: error,
                        H_ATTEMPTS: "1",
                        H_FIRST_AT: now,
                        H_LAST_AT: now,
                        H_DEAD_AT: now,
                    },
                    body=p.body,
                )
            )
            n += 1
        return n

    def _current(self, d: Delivery) -> _Held | None:
        qid = d.handle.queue_id
        key = (d.target, qid)
        if key in self.acks or key in self.naks:
            return None
        with self.bus._held_lock:
            held = self.bus._held.get((d.target, qid // QUEUE_STRIDE))
            if held is None or held.delivered != d.handle.lease or qid % QUEUE_STRIDE in held.done:
                return None
        return held

    def ack(self, deliveries: Iterable[Delivery]) -> int:
        n = 0
        for d in deliveries:
            held = self._current(d)
            if held is not None:
                self.acks[(d.target, d.handle.queue_id)] = held
                n += 1
        return n

    def nack(self, deliveries: Iterable[Delivery], error: str) -> int:
        b = self.bus
        error = clean_error(error)
        now = b.clock()
        dead = 0
        for d in deliveries:
            held = self._current(d)
            if held is None:
                continue
            cfg = b.target(d.target)
            key = (d.target, d.handle.queue_id)
            if held.delivered >= cfg.retry.max_attempts:
                index = d.handle.queue_id % QUEUE_STRIDE
                row = b._dlq_row(d.target, held.msg, held.delivered, error, now, index)
                row.headers[H_FIRST_AT] = _f(held.first_at)
                row.headers[H_LAST_AT] = _f(d.last_attempt_at)
                self.rows.append(row)
                self.acks[key] = held
                dead += 1
            else:
                delay = cfg.retry.delay_s(held.delivered, b.rand)
                self.naks[key] = (held, b._scaled(delay) if delay > 0 else 0.0, now + delay)
        return dead

    def processed(self, consumer: str, deliveries: Iterable[Delivery]) -> set[tuple[int, int]]:
        wanted = {d.tracking_key for d in deliveries}
        if not wanted:
            return set()
        rows = self.conn.execute(
            sql.SQL(
                "SELECT id_key, content_hash FROM {}.tracking WHERE consumer = %s "
                "AND id_key = ANY(%s)"
            ).format(self.bus.s),
            (consumer, Int8Array({k for k, _ in wanted})),
        ).fetchall()
        return {(int(k), int(h)) for k, h in rows} & wanted

    def track(self, consumer: str, deliveries: Iterable[Delivery]) -> None:
        fresh = []
        for d in deliveries:
            key = (consumer, d.id_key, d.content_hash)
            if key not in self.tracked:
                self.tracked.add(key)
                fresh.append(key)
        if not fresh:
            return
        # ON CONFLICT DO NOTHING + count: a concurrent worker that committed the same
        # tracking key first makes this unit of work fail (its effects roll back).
        with self.conn.cursor() as cur:
            cur.execute(
                sql.SQL(
                    "INSERT INTO {}.tracking SELECT %s, k, h FROM unnest(%s::bigint[], "
                    "%s::bigint[]) AS u(k, h) ON CONFLICT DO NOTHING"
                ).format(self.bus.s),
                (
                    consumer,
                    Int8Array([k for _, k, _ in fresh]),
                    Int8Array([h for _, _, h in fresh]),
                ),
            )
            if cur.rowcount != len(fresh):
                raise ConcurrentDelivery(
                    f"consumer {consumer!r}: {len(fresh) - cur.rowcount} of {len(fresh)} "
                    "events were processed by another worker meanwhile (a lease ran out); "
                    "this batch rolls back and is skipped on redelivery."
                )

    def on_commit(self, fn: Callable[[], None]) -> None:
        self.callbacks.append(fn)


class ConcurrentDelivery(BusError):
    """Two workers processed the same delivery; the later transaction rolls back."""


async def _settle(acks: list[_Held], naks: list[tuple[_Held, float]], bus: NatsBus) -> None:
    """Acks and naks; the last ack waits for the server's confirmation, so a caller sees its
    acks applied on return (the server handles one connection's acks in order)."""
    for held, delay in naks:
        await held.msg.nak(delay=delay if delay > 0 else None)
    for held in acks[:-1]:
        await held.msg.ack()
    if acks:
        await acks[-1].msg.ack_sync(timeout=10)
    else:
        await bus.nc.flush(timeout=10)
