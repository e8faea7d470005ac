"""The embedded bus: SQLite, WAL, synchronous=FULL, durable across restarts (DESIGN §4–5).

One database file `<data-dir>/paypost.db` holds the bus, the ledger and every stage's state,
so a consumer's batch (tracking record + effects + outputs + archive + acks) is ONE
transaction. Tables are prefixed `bus_`:

- `bus_archive(position INTEGER PRIMARY KEY, archived_at, id_key, content_hash, body)`:
  every published event's JSON, stored once, append-only, no secondary index. `content_hash`
  is 0 for events published with `dedup=False` (`receive` derives it from the body).
- `bus_archive_runs(first_position, last_position, archived_at, events)`: the archive's time
  index, one row per publish (its events share one archive time and consecutive positions)
  instead of one index entry per event: reads by time, counts, replay and purge use it.
- `bus_dedup(id_key, content_hash, seen_at)`: the dedup window, the one random-key B-tree
  (8-byte integer keys), written only by publishes with `dedup=True`: a tracked consumer's
  outputs skip it (its tracking record already makes them once), since every random-key
  insert dirties a page that the WAL writes again (DESIGN §5).
- `bus_queue`: one small row per (event, target) referencing the archive by position — no
  payload copies. `visible_at` is both the retry time and the lease expiry (SQS-style
  visibility): a leased row is invisible until acked (deleted), nacked (rescheduled) or its
  lease expires (visible again: a crashed consumer's events are redelivered, not lost).
  `lease` is a random token per receive; ack/nack only act on rows still holding it, so a
  late ack from a consumer whose lease expired never acks an event twice.
- `bus_dlq`, `bus_tracking` (consumer, id_key, content_hash), `bus_targets`, `bus_rules`,
  `bus_consumers`, `bus_meta` (archive sequence, counters, config version).

Rules and targets live in the database, so the CLI acts on the same configuration the
pipeline runs; a running bus notices changes (config version) at its next transaction.
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import repeat
from pathlib import Path
from typing import Any

import msgspec

from paypost.bus.core import (
    ArchivedEvent,
    ArchiveQuery,
    Bus,
    BusConfig,
    BusStats,
    Clock,
    DeadLetter,
    DeadLetterNotFound,
    Delivery,
    DeliveryHandle,
    EncodedEvents,
    PreparedEvent,
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
    decode_event_dict,
    dedup_decide,
    encode_events,
    id_key,
    id_keys,
    prepare,
)
from paypost.config import SQLITE_CACHE_KIB, ensure_data_dir, sqlite_page_size
from paypost.events import Event

DB_FILENAME = "paypost.db"
_CHUNK = 500  # host parameters per IN (...) list
_REPLAY_CHUNK = 2000

SCHEMA = """
CREATE TABLE IF NOT EXISTS bus_meta (
    key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bus_targets (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, config BLOB NOT NULL,
    routed_total INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS bus_rules (
    name TEXT PRIMARY KEY, pattern BLOB NOT NULL, target TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bus_archive (
    position INTEGER PRIMARY KEY, archived_at REAL NOT NULL, id_key INTEGER NOT NULL,
    content_hash INTEGER NOT NULL, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS bus_archive_runs (
    first_position INTEGER PRIMARY KEY, last_position INTEGER NOT NULL,
    archived_at REAL NOT NULL, events INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS bus_archive_runs_time ON bus_archive_runs(archived_at);
CREATE TABLE IF NOT EXISTS bus_dedup (
    id_key INTEGER NOT NULL, content_hash INTEGER NOT NULL, seen_at REAL NOT NULL,
    PRIMARY KEY (id_key, content_hash)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bus_queue (
    id INTEGER PRIMARY KEY, target_id INTEGER NOT NULL, position INTEGER NOT NULL,
    visible_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, first_at REAL,
    last_at REAL, lease INTEGER NOT NULL DEFAULT 0, last_error TEXT);
CREATE INDEX IF NOT EXISTS bus_queue_target ON bus_queue(target_id, id);
CREATE TABLE IF NOT EXISTS bus_dlq (
    id INTEGER PRIMARY KEY, target_id INTEGER NOT NULL, position INTEGER NOT NULL,
    error TEXT NOT NULL, attempts INTEGER NOT NULL, first_at REAL NOT NULL,
    last_at REAL NOT NULL, dead_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS bus_consumers (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS bus_tracking (
    consumer_id INTEGER NOT NULL, id_key INTEGER NOT NULL, content_hash INTEGER NOT NULL,
    PRIMARY KEY (consumer_id, id_key, content_hash)) WITHOUT ROWID;
INSERT OR IGNORE INTO bus_meta VALUES ('archive_next', 1), ('duplicates_dropped', 0),
    ('id_conflicts', 0), ('config_version', 0);
"""


def connect(path: Path | str) -> sqlite3.Connection:
    """Open the paypost database: autocommit mode (explicit BEGIN/COMMIT), WAL, FULL sync.

    Shareable between threads; the bus serialises its use with a lock.
    """
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA page_size={sqlite_page_size()}")  # new files only (before WAL)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn


class WalCheckpointer:
    """Moves WAL checkpoints off the commit path (DESIGN §5).

    With `wal_autocheckpoint` on, the commit that crosses the threshold copies the WAL back
    into the database and fsyncs it, stalling the writer. Instead, a background thread with
    its own connection runs PASSIVE checkpoints (they never block the writer) every
    `interval_s`, copying frames while the writer works. But SQLite only starts the WAL over
    when a checkpoint has copied *every* frame and none is running when the next write
    begins — never true while a busy writer and a background checkpoint overlap, so the WAL
    would grow without bound. Hence `after_commit()`: once the WAL file exceeds
    `max_wal_bytes`, the writer (between two of its transactions) waits for the background
    checkpoint to finish and runs one PASSIVE checkpoint itself; little is left to copy, and
    its next write starts the WAL over (`journal_size_limit` then trims the file).
    """

    def __init__(
        self, path: Path | str, interval_s: float = 0.25, max_wal_bytes: int = 64 << 20
    ) -> None:
        self.path = str(path)
        self.wal = Path(f"{path}-wal")
        self.interval_s = interval_s
        self.max_wal_bytes = max_wal_bytes
        self._busy = threading.Lock()  # held while a checkpoint runs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wal-checkpointer", daemon=True)

    def start(self) -> WalCheckpointer:
        self._thread.start()
        return self

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=1000")
        try:
            while not self._stop.wait(self.interval_s):
                with self._busy, contextlib.suppress(sqlite3.OperationalError):
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        finally:
            conn.close()

    def after_commit(self, conn: sqlite3.Connection) -> None:
        """Called by the writer after each commit, outside any transaction."""
        try:
            if self.wal.stat().st_size <= self.max_wal_bytes:
                return
        except OSError:
            return
        with self._busy, contextlib.suppress(sqlite3.OperationalError):
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the bus tables if missing (idempotent; no commit beyond its own DDL), and
    move a database of the per-event time index onto archive runs."""
    conn.executescript(SCHEMA)
    if _has_index(conn, "bus_archive_time"):
        conn.execute("BEGIN IMMEDIATE")
        try:
            if _has_index(conn, "bus_archive_time"):  # not done meanwhile by another process
                _backfill_runs(conn)
                conn.execute("DROP INDEX bus_archive_time")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _has_index(conn: sqlite3.Connection, name: str) -> bool:
    return (
        conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='index' AND name=?", (name,)
        ).fetchone()
        is not None
    )


def _backfill_runs(conn: sqlite3.Connection) -> None:
    """Runs for an archive written with a time index per event (before bus_archive_runs):
    each stretch of positions with one archive time becomes a run (one pass, once)."""
    runs: list[list[Any]] = []
    for position, archived_at in conn.execute(
        "SELECT position, archived_at FROM bus_archive ORDER BY position"
    ):
        if runs and runs[-1][2] == archived_at:
            runs[-1][1] = position
            runs[-1][3] += 1
        else:
            runs.append([position, position, archived_at, 1])
    conn.execute("DELETE FROM bus_archive_runs")  # any left by a newer paypost: rebuilt whole
    conn.executemany("INSERT INTO bus_archive_runs VALUES (?, ?, ?, ?)", runs)


def _chunks(seq: Sequence[Any], n: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _marks(n: int) -> str:
    return ",".join("?" * n)


_target_decoder = msgspec.json.Decoder(TargetConfig)
_pattern_decoder = msgspec.json.Decoder(dict[str, Any])


class SqliteBus(Bus):
    """The bus over an sqlite3 connection (see module docs). `conn` is shared with the
    ledger and stage stores: they write through `uow.conn` inside a unit of work."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        config: BusConfig | None = None,
        *,
        clock: Clock = time.time,
        rand: Rand = random.random,
    ) -> None:
        if conn.in_transaction:
            raise RuntimeError("SqliteBus needs a connection that is not inside a transaction")
        conn.isolation_level = None  # we issue BEGIN IMMEDIATE / COMMIT ourselves
        self.conn = conn
        self.config = config or BusConfig()
        self.clock = clock
        self.rand = rand
        self._lock = threading.RLock()
        self._uow: _SqliteUnitOfWork | None = None
        self._version = -1
        self._targets: dict[str, tuple[int, TargetConfig]] = {}
        self._target_names: dict[int, str] = {}
        self._rules: dict[str, Rule] = {}
        self._router: Router | None = None
        self._consumers: dict[str, int] = {}
        self._checkpointer: WalCheckpointer | None = None
        with self._lock:
            ensure_schema(conn)

    @classmethod
    def open(
        cls,
        data_dir: Path,
        config: BusConfig | None = None,
        *,
        clock: Clock = time.time,
        rand: Rand = random.random,
        background_checkpoints: bool = False,
        max_wal_bytes: int = 64 << 20,
    ) -> SqliteBus:
        """Open (creating if needed) `<data_dir>/paypost.db`.

        `background_checkpoints=True` (long-running, write-heavy processes: the pipeline)
        moves WAL checkpoints off the commit path onto a `WalCheckpointer` thread.
        """
        ensure_data_dir(data_dir)
        path = data_dir / DB_FILENAME
        bus = cls(connect(path), config, clock=clock, rand=rand)
        if background_checkpoints:
            checkpointer = WalCheckpointer(path, max_wal_bytes=max_wal_bytes)
            bus.conn.execute("PRAGMA wal_autocheckpoint=0")
            bus.conn.execute(f"PRAGMA journal_size_limit={checkpointer.max_wal_bytes}")
            bus._checkpointer = checkpointer.start()
        return bus

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        with self._lock:
            self.conn.close()

    # -- cached configuration ----------------------------------------------------------
    def _refresh(self) -> None:
        (version,) = self.conn.execute(
            "SELECT value FROM bus_meta WHERE key='config_version'"
        ).fetchone()
        if version == self._version:
            return
        targets: dict[str, tuple[int, TargetConfig]] = {}
        for tid, body in self.conn.execute("SELECT id, config FROM bus_targets ORDER BY id"):
            cfg = _target_decoder.decode(body)
            targets[cfg.name] = (tid, cfg)
        rules = {
            name: Rule(name=name, pattern=_pattern_decoder.decode(pattern), target=target)
            for name, pattern, target in self.conn.execute(
                "SELECT name, pattern, target FROM bus_rules ORDER BY name"
            )
        }
        self._targets = targets
        self._target_names = {tid: name for name, (tid, _) in targets.items()}
        self._rules = rules
        self._router = None
        self._version = version

    def _bump_version(self) -> None:
        self.conn.execute("UPDATE bus_meta SET value = value + 1 WHERE key='config_version'")

    def router(self) -> Router:
        if self._router is None:
            self._router = Router(self._rules.values())
        return self._router

    def _target(self, name: str) -> tuple[int, TargetConfig]:
        found = self._targets.get(name)
        if found is None:
            self.target(name)  # raises UnknownTarget with the known names
            raise AssertionError("unreachable")
        return found

    # -- configuration -----------------------------------------------------------------
    def put_target(self, target: TargetConfig) -> None:
        body = msgspec.json.encode(target)
        with self.unit_of_work():
            self.conn.execute(
                "INSERT INTO bus_targets(name, config) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET config=excluded.config",
                (target.name, body),
            )
            self._bump_version()
        with self._lock:
            self._version = -1

    def put_rule(self, rule: Rule) -> None:
        compile_pattern(rule.pattern, f"rule {rule.name!r}")
        with self.unit_of_work():
            self._target(rule.target)
            self.conn.execute(
                "INSERT OR REPLACE INTO bus_rules VALUES (?, ?, ?)",
                (rule.name, msgspec.json.encode(rule.pattern), rule.target),
            )
            self._bump_version()
        with self._lock:
            self._version = -1

    def delete_rule(self, name: str) -> None:
        with self.unit_of_work():
            cur = self.conn.execute("DELETE FROM bus_rules WHERE name=?", (name,))
            if cur.rowcount == 0:
                raise UnknownRule(f"rule {name!r} does not exist.")
            self._bump_version()
        with self._lock:
            self._version = -1

    def targets(self) -> list[TargetConfig]:
        with self._lock:
            self._refresh()
            return [cfg for _, cfg in self._targets.values()]

    def rules(self) -> list[Rule]:
        with self._lock:
            self._refresh()
            return list(self._rules.values())

    # -- transactions ------------------------------------------------------------------
    @contextmanager
    def unit_of_work(self) -> Iterator[UnitOfWork]:
        with self._lock:
            if self._uow is not None:  # nested: join the outer transaction
                yield self._uow
                return
            self.conn.execute("BEGIN IMMEDIATE")
            uow = _SqliteUnitOfWork(self)
            self._uow = uow
            try:
                self._refresh()
                yield uow
                self.conn.execute("COMMIT")
                if self._checkpointer is not None:
                    self._checkpointer.after_commit(self.conn)
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                self._version = -1  # cached config may reflect rolled-back changes
                self._consumers.clear()  # ids inserted by the rolled-back transaction
                raise
            finally:
                self._uow = None
        for fn in uow.after_commit:
            fn()

    # -- consume -----------------------------------------------------------------------
    def receive(self, target: str, max_events: int | None = None) -> list[Delivery]:
        with self.unit_of_work() as uow:
            assert isinstance(uow, _SqliteUnitOfWork)
            return uow.receive(target, max_events)

    def pending(self, target: str) -> int:
        with self._lock:
            self._refresh()
            tid, _ = self._target(target)
            (n,) = self.conn.execute(
                "SELECT count(*) FROM bus_queue WHERE target_id=?", (tid,)
            ).fetchone()
            return int(n)

    def next_visible_in(self, target: str) -> float | None:
        with self._lock:
            self._refresh()
            tid, _ = self._target(target)
            (at,) = self.conn.execute(
                "SELECT min(visible_at) FROM bus_queue WHERE target_id=?", (tid,)
            ).fetchone()
        return None if at is None else max(0.0, at - self.clock())

    # -- dead letters ------------------------------------------------------------------
    def _dead_rows(
        self, where: str, params: Sequence[Any], limit: int | None = None
    ) -> Iterator[DeadLetter]:
        sql = (
            "SELECT d.id, d.target_id, d.error, d.attempts, d.first_at, d.last_at, d.dead_at, "
            f"a.body FROM bus_dlq d JOIN bus_archive a ON a.position = d.position {where} "
            "ORDER BY d.id"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        for did, tid, error, attempts, first_at, last_at, dead_at, body in self.conn.execute(
            sql, params
        ).fetchall():
            yield DeadLetter(
                id=did,
                target=self._target_names.get(tid, f"#{tid}"),
                event=decode_event(body),
                error=error,
                attempts=attempts,
                first_attempt_at=first_at,
                last_attempt_at=last_at,
                dead_lettered_at=dead_at,
            )

    def dlq_list(
        self,
        target: str | None = None,
        pattern: dict[str, Any] | None = None,
        limit: int | None = None,
    ) -> list[DeadLetter]:
        matcher = compile_pattern(pattern, "--pattern") if pattern is not None else None
        with self._lock:
            self._refresh()
            where, params = "", []
            if target is not None:
                where, params = "WHERE d.target_id = ?", [self._target(target)[0]]
            out: list[DeadLetter] = []
            rows = self._dead_rows(where, params, limit if matcher is None else None)
            for dead in rows:
                if matcher is not None and not matcher.matches(dead.event.to_dict()):
                    continue
                out.append(dead)
                if limit is not None and len(out) >= limit:
                    break
            return out

    def dlq_get(self, entry_id: int) -> DeadLetter:
        with self._lock:
            self._refresh()
            for dead in self._dead_rows("WHERE d.id = ?", [entry_id]):
                return dead
        raise DeadLetterNotFound(
            f"dead letter {entry_id} does not exist; `paypost dlq list` shows the ids."
        )

    def dlq_redrive(
        self,
        target: str | None = None,
        pattern: dict[str, Any] | None = None,
        ids: Sequence[int] | None = None,
    ) -> int:
        with self.unit_of_work():
            chosen = self.dlq_list(target, pattern)
            if ids is not None:
                wanted = set(ids)
                chosen = [d for d in chosen if d.id in wanted]
            now = self.clock()
            for part in _chunks([d.id for d in chosen]):
                self.conn.execute(
                    "INSERT INTO bus_queue(target_id, position, visible_at) "
                    f"SELECT target_id, position, ? FROM bus_dlq WHERE id IN ({_marks(len(part))}) "
                    "ORDER BY id",
                    (now, *part),
                )
                self.conn.execute(f"DELETE FROM bus_dlq WHERE id IN ({_marks(len(part))})", part)
            return len(chosen)

    # -- archive -----------------------------------------------------------------------
    def _archive_rows(self, start: float, end: float) -> Iterator[tuple[int, float, bytes]]:
        """(position, archived_at, body) in (archived_at, position) order, paged by keyset
        (no long reads): the runs archived in the time range, each run's rows by position."""
        last = (start, -1)
        while True:
            with self._lock:
                runs = self.conn.execute(
                    "SELECT first_position, last_position, archived_at FROM bus_archive_runs "
                    "WHERE (archived_at, first_position) > (?, ?) AND archived_at < ? "
                    "ORDER BY archived_at, first_position LIMIT ?",
                    (last[0], last[1], end, _REPLAY_CHUNK),
                ).fetchall()
            if not runs:
                return
            for first, last_position, _ in runs:
                position = first
                while position <= last_position:
                    with self._lock:
                        rows = self.conn.execute(
                            "SELECT position, archived_at, body FROM bus_archive "
                            "WHERE position >= ? AND position <= ? ORDER BY position LIMIT ?",
                            (position, last_position, _REPLAY_CHUNK),
                        ).fetchall()
                    yield from rows
                    if len(rows) < _REPLAY_CHUNK:
                        break
                    position = rows[-1][0] + 1
            last = (runs[-1][2], runs[-1][0])

    def archive(self, query: ArchiveQuery) -> Iterator[ArchivedEvent]:
        matcher = compile_pattern(query.pattern, "--pattern") if query.pattern is not None else None
        # (archived_at, position) > (start, -1) includes archived_at == start.
        for position, archived_at, body in self._archive_rows(query.start, query.end):
            if matcher is not None and not matcher.matches(decode_event_dict(body)):
                continue
            yield ArchivedEvent(
                position=position, archived_at=archived_at, event=decode_event(body)
            )

    def archive_count(self, start: float | None = None, end: float | None = None) -> int:
        with self._lock:
            if start is None and end is None:
                (n,) = self.conn.execute(
                    "SELECT coalesce(sum(events), 0) FROM bus_archive_runs"
                ).fetchone()
            else:
                (n,) = self.conn.execute(
                    "SELECT coalesce(sum(events), 0) FROM bus_archive_runs "
                    "WHERE archived_at >= ? AND archived_at < ?",
                    (
                        float("-inf") if start is None else start,
                        float("inf") if end is None else end,
                    ),
                ).fetchone()
            return int(n)

    def replay(
        self,
        query: ArchiveQuery,
        target: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> ReplayResult:
        with self._lock:
            self._refresh()
            if target is not None:
                self._target(target)
            router = self.router() if target is None else self.router().for_target(target)
        matcher = compile_pattern(query.pattern, "--pattern") if query.pattern is not None else None
        total = self.archive_count(query.start, query.end)
        result = ReplayResult()
        pending: list[tuple[int, int, float]] = []

        def flush() -> None:
            if pending:
                with self.unit_of_work():
                    self.conn.executemany(
                        "INSERT INTO bus_queue(target_id, position, visible_at) VALUES (?, ?, ?)",
                        pending,
                    )
                pending.clear()

        for position, _, body in self._archive_rows(query.start, query.end):
            result.scanned += 1
            if matcher is None or matcher.matches(decode_event_dict(body)):
                result.matched += 1
                event = decode_event(body)
                now = self.clock()
                for t in router.route(event):
                    pending.append((self._targets[t][0], position, now))
                    result.routed[t] = result.routed.get(t, 0) + 1
            if len(pending) >= _REPLAY_CHUNK:
                flush()
            if progress is not None:
                progress(result.scanned, total)
        flush()
        return result

    def purge_archive(self, now: float | None = None) -> int:
        at = self.clock() if now is None else now
        with self.unit_of_work():
            self.conn.execute(
                "DELETE FROM bus_dedup WHERE seen_at < ?",
                (at - self.config.effective_dedup_window_s,),
            )
            if self.config.archive_retention_s is None:
                return 0
            cutoff = at - self.config.archive_retention_s
            cur = self.conn.execute(
                "DELETE FROM bus_archive WHERE position IN ("
                "  SELECT a.position FROM bus_archive_runs r JOIN bus_archive a"
                "  ON a.position BETWEEN r.first_position AND r.last_position"
                "  WHERE r.archived_at < ?) "
                "AND position NOT IN (SELECT position FROM bus_queue) "
                "AND position NOT IN (SELECT position FROM bus_dlq)",
                (cutoff,),
            )
            purged = cur.rowcount
            # Runs count what is left of them (kept: still queued or dead-lettered).
            self.conn.execute(
                "UPDATE bus_archive_runs SET events = (SELECT count(*) FROM bus_archive "
                "WHERE position BETWEEN first_position AND last_position) WHERE archived_at < ?",
                (cutoff,),
            )
            self.conn.execute(
                "DELETE FROM bus_archive_runs WHERE archived_at < ? AND events = 0", (cutoff,)
            )
            return purged

    def stats(self) -> BusStats:
        now = self.clock()
        with self._lock:
            self._refresh()
            by_tid: dict[int, TargetStats] = {}
            for name, (tid, _) in self._targets.items():
                by_tid[tid] = TargetStats(name=name)
            for tid, routed in self.conn.execute("SELECT id, routed_total FROM bus_targets"):
                if tid in by_tid:
                    by_tid[tid].routed_total = routed
            for tid, queued, in_flight, delayed in self.conn.execute(
                "SELECT target_id, sum(visible_at <= ?), sum(visible_at > ? AND lease <> 0), "
                "sum(visible_at > ? AND lease = 0) FROM bus_queue GROUP BY target_id",
                (now, now, now),
            ):
                if tid in by_tid:
                    s = by_tid[tid]
                    s.queued, s.in_flight, s.delayed = queued, in_flight, delayed
            for tid, n in self.conn.execute(
                "SELECT target_id, count(*) FROM bus_dlq GROUP BY target_id"
            ):
                if tid in by_tid:
                    by_tid[tid].dead_lettered = n
            meta = dict(self.conn.execute("SELECT key, value FROM bus_meta").fetchall())
            return BusStats(
                targets=list(by_tid.values()),
                archived=self.archive_count(),
                duplicates_dropped=meta["duplicates_dropped"],
                id_conflicts=meta["id_conflicts"],
            )

    def consumer_id(self, name: str) -> int:
        cid = self._consumers.get(name)
        if cid is None:
            self.conn.execute("INSERT OR IGNORE INTO bus_consumers(name) VALUES (?)", (name,))
            (cid,) = self.conn.execute(
                "SELECT id FROM bus_consumers WHERE name=?", (name,)
            ).fetchone()
            self._consumers[name] = cid
        return cid


class _SqliteUnitOfWork(UnitOfWork):
    def __init__(self, bus: SqliteBus) -> None:
        self.bus = bus
        self.conn: sqlite3.Connection = bus.conn
        self.after_commit: list[Callable[[], None]] = []

    def publish(
        self,
        events: Iterable[Event],
        *,
        dedup: bool = True,
        inline: Collection[str] = (),
        only: Collection[str] | None = None,
    ) -> PublishResult:
        b, conn = self.bus, self.conn
        if not dedup:
            # No dedup, so no content hash: the archive row records 0 and `receive` derives
            # it from the body (the fused pipeline publishes every stage's outputs so). The
            # id key is kept: archived events are looked up by it (reconciliation).
            if isinstance(events, EncodedEvents):
                evs, bodies = events.events(), events.bodies
            else:
                evs = events if isinstance(events, list) else list(events)
                bodies = encode_events(evs)
            if not evs:
                return PublishResult()
            return self._archive_and_route(
                evs,
                bodies,
                None,
                b.clock(),
                PublishResult(published=len(evs)),
                inline,
                only,
            )
        batch = prepare(events)
        if not batch:
            return PublishResult()
        now = b.clock()
        seen: dict[int, set[int]] = {}
        keys = list({p.id_key for p in batch})
        window_start = now - b.config.effective_dedup_window_s
        for part in _chunks(keys):
            for key, chash in conn.execute(
                "SELECT id_key, content_hash FROM bus_dedup "
                f"WHERE id_key IN ({_marks(len(part))}) AND seen_at >= ?",
                (*part, window_start),
            ):
                seen.setdefault(key, set()).add(chash)
        keep, dups, conflicts = dedup_decide(batch, seen)
        result = PublishResult(published=len(keep), duplicates_dropped=dups, id_conflicts=conflicts)
        if keep:
            conn.executemany(
                "INSERT OR REPLACE INTO bus_dedup VALUES (?, ?, ?)",
                [(p.id_key, p.content_hash, now) for p in keep],
            )
        if dups or conflicts:
            conn.executemany(
                "UPDATE bus_meta SET value = value + ? WHERE key = ?",
                [(dups, "duplicates_dropped"), (conflicts, "id_conflicts")],
            )
        return self._archive_and_route(
            [p.event for p in keep], [p.body for p in keep], keep, now, result, inline, only
        )

    def _allocate_positions(self, n: int, now: float) -> int:
        """The first of N consecutive archive positions (gapless, in publish order; rolled
        back with the transaction), recorded as one archive run archived at NOW."""
        (end,) = self.conn.execute(
            "UPDATE bus_meta SET value = value + ? WHERE key='archive_next' RETURNING value",
            (n,),
        ).fetchall()[0]
        first = int(end) - n
        self.conn.execute(
            "INSERT INTO bus_archive_runs VALUES (?, ?, ?, ?)", (first, first + n - 1, now, n)
        )
        return first

    def _archive_and_route(
        self,
        events: list[Event],
        bodies: list[bytes],
        keyed: list[PreparedEvent] | None,
        now: float,
        result: PublishResult,
        inline: Collection[str] = (),
        only: Collection[str] | None = None,
    ) -> PublishResult:
        """Archive EVENTS (BODIES: their JSON; KEYED: their keys from `prepare`, or None to
        record the id keys and a content hash of 0) and route them: to RESULT.inline for
        INLINE targets, else to queue rows."""
        if not events:
            return result
        b, conn = self.bus, self.conn
        first = self._allocate_positions(len(events), now)
        if keyed is None:
            conn.executemany(
                "INSERT INTO bus_archive VALUES (?, ?, ?, 0, ?)",
                zip(
                    range(first, first + len(events)),
                    repeat(now, len(events)),
                    id_keys(events),
                    bodies,
                    strict=True,
                ),
            )
        else:
            conn.executemany(
                "INSERT INTO bus_archive VALUES (?, ?, ?, ?, ?)",
                [(first + i, now, p.id_key, p.content_hash, p.body) for i, p in enumerate(keyed)],
            )
        route = b.router().route
        targets = b._targets
        in_process = result.inline
        queue_rows: list[tuple[int, int, float]] = []
        # What to do with an event, per distinct route (a handful per publish): the inline
        # list to hand it back in, else the target id to enqueue it for.
        plans: dict[tuple[str, ...], list[tuple[list[Event] | None, int]]] = {}
        uses: dict[tuple[str, ...], int] = {}
        for pos, ev in enumerate(events, first):
            routes = route(ev)
            if not routes:
                continue
            plan = plans.get(routes)
            if plan is None:
                plan = plans[routes] = [
                    (in_process.setdefault(t, []) if t in inline else None, targets[t][0])
                    for t in routes
                    if only is None or t in only
                ]
            uses[routes] = uses.get(routes, 0) + 1
            for to_inline, tid in plan:
                if to_inline is not None:
                    to_inline.append(ev)
                else:
                    queue_rows.append((tid, pos, now))
        if queue_rows:
            conn.executemany(
                "INSERT INTO bus_queue(target_id, position, visible_at) VALUES (?, ?, ?)",
                queue_rows,
            )
        routed = result.routed
        for routes, n in uses.items():
            for t in routes:
                if only is None or t in only:
                    routed[t] = routed.get(t, 0) + n
        if routed:
            conn.executemany(
                "UPDATE bus_targets SET routed_total = routed_total + ? WHERE id = ?",
                [(n, targets[t][0]) for t, n in routed.items()],
            )
        return result

    def receive(self, target: str, max_events: int | None) -> list[Delivery]:
        b, conn = self.bus, self.conn
        tid, cfg = b._target(target)
        now = b.clock()
        want = cfg.batch_size if max_events is None else max_events
        if cfg.max_in_flight:
            (leased,) = conn.execute(
                "SELECT count(*) FROM bus_queue WHERE target_id=? AND lease<>0 AND visible_at>?",
                (tid, now),
            ).fetchone()
            want = min(want, cfg.max_in_flight - leased)
        if want <= 0:
            return []
        # One statement fetches the batch with its archived bodies (no payload copies in
        # the queue; the archive is read by its integer primary key).
        rows = conn.execute(
            "SELECT q.id, q.position, q.visible_at, q.attempts, q.first_at, q.last_at, "
            "q.last_error, a.id_key, a.content_hash, a.body "
            "FROM bus_queue q JOIN bus_archive a ON a.position = q.position "
            "WHERE q.target_id=? AND q.visible_at<=? ORDER BY q.id LIMIT ?",
            (tid, now, want),
        ).fetchall()
        if not rows:
            return []
        max_attempts = cfg.retry.max_attempts
        poison = [r for r in rows if r[3] >= max_attempts]
        if poison:
            conn.executemany(
                "INSERT INTO bus_dlq(target_id, position, error, attempts, first_at, last_at, "
                "dead_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        tid,
                        r[1],
                        _lease_expired_error(r[3], r[6], cfg),
                        r[3],
                        r[4] or now,
                        r[5] or now,
                        now,
                    )
                    for r in poison
                ],
            )
            conn.executemany("DELETE FROM bus_queue WHERE id=?", [(r[0],) for r in poison])
            rows = [r for r in rows if r[3] < max_attempts]
            if not rows:
                return []
        if len(rows) < want and cfg.linger_ms:
            oldest = min(r[2] for r in rows)
            if now < oldest + cfg.linger_ms / 1000.0:
                return []
        lease = random.getrandbits(62) + 1
        ids = [r[0] for r in rows]
        for part in _chunks(ids):
            conn.execute(
                "UPDATE bus_queue SET visible_at=?, attempts=attempts+1, "
                "first_at=coalesce(first_at, ?), last_at=?, lease=? "
                f"WHERE id IN ({_marks(len(part))})",
                (now + cfg.lease_s, now, now, lease, *part),
            )
        deliveries = []
        for qid, pos, _, attempts, first_at, _, _, key, chash, body in rows:
            event = decode_event(body)
            deliveries.append(
                Delivery(
                    event=event,
                    target=target,
                    attempt=attempts + 1,
                    first_attempt_at=now if first_at is None else first_at,
                    last_attempt_at=now,
                    handle=DeliveryHandle(qid, lease),
                    position=pos,
                    # 0: not recorded at publish (dedup=False): derived as publish would have
                    id_key=key or id_key(event.id),
                    content_hash=chash or content_hash(body),
                )
            )
        return deliveries

    def ack(self, deliveries: Iterable[Delivery]) -> int:
        by_lease: dict[int, list[int]] = {}
        for d in deliveries:
            by_lease.setdefault(d.handle.lease, []).append(d.handle.queue_id)
        before = self.conn.total_changes
        for lease, ids in by_lease.items():
            for part in _chunks(ids):
                self.conn.execute(
                    f"DELETE FROM bus_queue WHERE lease=? AND id IN ({_marks(len(part))})",
                    (lease, *part),
                )
        return self.conn.total_changes - before

    def nack(self, deliveries: Iterable[Delivery], error: str) -> int:
        error = clean_error(error)
        b, conn = self.bus, self.conn
        now = b.clock()
        dead = 0
        for d in deliveries:
            row = conn.execute(
                "SELECT target_id, position, attempts, first_at, last_at FROM bus_queue "
                "WHERE id=? AND lease=?",
                (d.handle.queue_id, d.handle.lease),
            ).fetchone()
            if row is None:
                continue
            tid, pos, attempts, first_at, last_at = row
            cfg = b._target(d.target)[1]
            if attempts >= cfg.retry.max_attempts:
                conn.execute(
                    "INSERT INTO bus_dlq(target_id, position, error, attempts, first_at, "
                    "last_at, dead_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (tid, pos, error, attempts, first_at or now, last_at or now, now),
                )
                conn.execute("DELETE FROM bus_queue WHERE id=?", (d.handle.queue_id,))
                dead += 1
            else:
                delay = cfg.retry.delay_s(attempts, b.rand)
                conn.execute(
                    "UPDATE bus_queue SET visible_at=?, lease=0, last_error=? WHERE id=?",
                    (now + delay, error, d.handle.queue_id),
                )
        return dead

    def next_position(self) -> int:
        (pos,) = self.conn.execute("SELECT value FROM bus_meta WHERE key='archive_next'").fetchone()
        return int(pos)

    def dead_letter(self, target: str, events: Iterable[Event], error: str) -> int:
        error = clean_error(error)
        b, conn = self.bus, self.conn
        tid = b._target(target)[0]
        evs = list(events)
        if not evs:
            return 0
        now = b.clock()
        first = self._allocate_positions(len(evs), now)
        positions = range(first, first + len(evs))
        conn.executemany(
            "INSERT INTO bus_archive VALUES (?, ?, ?, 0, ?)",
            zip(positions, repeat(now, len(evs)), id_keys(evs), encode_events(evs), strict=True),
        )
        conn.executemany(
            "INSERT INTO bus_dlq(target_id, position, error, attempts, first_at, last_at, dead_at) "
            "VALUES (?, ?, ?, 1, ?, ?, ?)",
            [(tid, pos, error, now, now, now) for pos in positions],
        )
        return len(evs)

    def processed(self, consumer: str, deliveries: Iterable[Delivery]) -> set[tuple[int, int]]:
        wanted = {d.tracking_key for d in deliveries}
        if not wanted:
            return set()
        cid = self.bus.consumer_id(consumer)
        found: set[tuple[int, int]] = set()
        keys = list({k for k, _ in wanted})
        for part in _chunks(keys):
            for key, chash in self.conn.execute(
                "SELECT id_key, content_hash FROM bus_tracking "
                f"WHERE consumer_id=? AND id_key IN ({_marks(len(part))})",
                (cid, *part),
            ):
                if (key, chash) in wanted:
                    found.add((key, chash))
        return found

    def track(self, consumer: str, deliveries: Iterable[Delivery]) -> None:
        cid = self.bus.consumer_id(consumer)
        self.conn.executemany(
            "INSERT OR IGNORE INTO bus_tracking VALUES (?, ?, ?)",
            [(cid, d.id_key, d.content_hash) for d in deliveries],
        )

    def on_commit(self, fn: Callable[[], None]) -> None:
        self.after_commit.append(fn)


def _lease_expired_error(attempts: int, last_error: str | None, cfg: TargetConfig) -> str:
    return (
        f"lease expired without ack after attempt {attempts} of "
        f"{cfg.retry.max_attempts} (the consumer crashed or ran past lease_s={cfg.lease_s}s)"
        + (f"; last error: {last_error}" if last_error else "")
    )
