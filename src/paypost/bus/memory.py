"""In-process bus with the same semantics as the SQLite one (tests, fakes, demos).

State lives in Python dicts behind one lock. A unit of work holds the lock for its whole
duration (like SQLite's BEGIN IMMEDIATE) and records an undo action for every change, so an
exception inside it rolls back everything it did: same atomicity as the durable backends.
"""

from __future__ import annotations

import functools
import random
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
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
    dedup_decide,
    prepare,
)
from paypost.events import Event


class _Archived(msgspec.Struct):
    position: int
    archived_at: float
    id_key: int
    content_hash: int
    event: Event


class _Queued(msgspec.Struct):
    position: int
    visible_at: float
    attempts: int = 0
    first_at: float | None = None
    last_at: float | None = None
    lease: int = 0
    last_error: str | None = None


class _Dead(msgspec.Struct):
    target: str
    position: int
    error: str
    attempts: int
    first_at: float
    last_at: float
    dead_at: float


class MemoryBus(Bus):
    def __init__(
        self,
        config: BusConfig | None = None,
        *,
        clock: Clock = time.time,
        rand: Rand = random.random,
    ) -> None:
        self.config = config or BusConfig()
        self.clock = clock
        self.rand = rand
        self._lock = threading.RLock()
        self._targets: dict[str, TargetConfig] = {}
        self._routed_total: dict[str, int] = {}
        self._rules: dict[str, Rule] = {}
        self._router: Router | None = None
        self._archive: dict[int, _Archived] = {}
        self._next_position = 1
        self._by_id: dict[int, dict[int, int]] = {}  # id_key -> content_hash -> position
        self._queues: dict[str, dict[int, _Queued]] = {}
        self._next_queue_id = 1
        self._dead: dict[int, _Dead] = {}
        self._next_dead_id = 1
        self._tracking: set[tuple[str, int, int]] = set()
        self._counters = {"duplicates_dropped": 0, "id_conflicts": 0}
        self._uow: _MemoryUnitOfWork | None = None

    # -- configuration -------------------------------------------------------------------
    def put_target(self, target: TargetConfig) -> None:
        with self._lock:
            self._targets[target.name] = target
            self._queues.setdefault(target.name, {})
            self._routed_total.setdefault(target.name, 0)

    def put_rule(self, rule: Rule) -> None:
        compile_pattern(rule.pattern, f"rule {rule.name!r}")
        with self._lock:
            self.target(rule.target)
            self._rules[rule.name] = rule
            self._router = None

    def delete_rule(self, name: str) -> None:
        with self._lock:
            if name not in self._rules:
                raise UnknownRule(f"rule {name!r} does not exist.")
            del self._rules[name]
            self._router = None

    def targets(self) -> list[TargetConfig]:
        with self._lock:
            return list(self._targets.values())

    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules.values())

    def router(self) -> Router:
        if self._router is None:
            self._router = Router(self._rules.values())
        return self._router

    # -- transactions --------------------------------------------------------------------
    @contextmanager
    def unit_of_work(self) -> Iterator[UnitOfWork]:
        with self._lock:
            if self._uow is not None:  # nested: join the outer unit of work
                yield self._uow
                return
            uow = _MemoryUnitOfWork(self)
            self._uow = uow
            try:
                yield uow
            except BaseException:
                for undo in reversed(uow.undo):
                    undo()
                raise
            finally:
                self._uow = None
        for fn in uow.after_commit:
            fn()

    # -- consume -------------------------------------------------------------------------
    def receive(self, target: str, max_events: int | None = None) -> list[Delivery]:
        with self.unit_of_work() as uow:
            assert isinstance(uow, _MemoryUnitOfWork)
            return uow.receive(target, max_events)

    def pending(self, target: str) -> int:
        with self._lock:
            self.target(target)
            return len(self._queues[target])

    def next_visible_in(self, target: str) -> float | None:
        with self._lock:
            self.target(target)
            rows = self._queues[target].values()
            if not rows:
                return None
            return max(0.0, min(r.visible_at for r in rows) - self.clock())

    # -- dead letters --------------------------------------------------------------------
    def _dead_letter(self, entry_id: int, d: _Dead) -> DeadLetter:
        return DeadLetter(
            id=entry_id,
            target=d.target,
            event=self._archive[d.position].event,
            error=d.error,
            attempts=d.attempts,
            first_attempt_at=d.first_at,
            last_attempt_at=d.last_at,
            dead_lettered_at=d.dead_at,
        )

    def dlq_list(
        self,
        target: str | None = None,
        pattern: dict[str, Any] | None = None,
        limit: int | None = None,
    ) -> list[DeadLetter]:
        matcher = compile_pattern(pattern, "--pattern") if pattern is not None else None
        out: list[DeadLetter] = []
        with self._lock:
            if target is not None:
                self.target(target)
            for entry_id, d in self._dead.items():
                if target is not None and d.target != target:
                    continue
                if matcher is not None and not matcher.matches(
                    self._archive[d.position].event.to_dict()
                ):
                    continue
                out.append(self._dead_letter(entry_id, d))
                if limit is not None and len(out) >= limit:
                    break
        return out

    def dlq_get(self, entry_id: int) -> DeadLetter:
        with self._lock:
            d = self._dead.get(entry_id)
            if d is None:
                raise DeadLetterNotFound(
                    f"dead letter {entry_id} does not exist; `paypost dlq list` shows the ids."
                )
            return self._dead_letter(entry_id, d)

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
        with self.unit_of_work() as uow:
            assert isinstance(uow, _MemoryUnitOfWork)
            for entry in chosen:
                d = self._dead[entry.id]
                uow.del_dead(entry.id)
                uow.enqueue(d.target, d.position, self.clock())
        return len(chosen)

    # -- archive -------------------------------------------------------------------------
    def archive(self, query: ArchiveQuery) -> Iterator[ArchivedEvent]:
        matcher = compile_pattern(query.pattern, "--pattern") if query.pattern is not None else None
        with self._lock:
            rows = [a for a in self._archive.values() if query.start <= a.archived_at < query.end]
        for a in rows:
            if matcher is None or matcher.matches(a.event.to_dict()):
                yield ArchivedEvent(position=a.position, archived_at=a.archived_at, event=a.event)

    def archive_count(self, start: float | None = None, end: float | None = None) -> int:
        lo = float("-inf") if start is None else start
        hi = float("inf") if end is None else end
        with self._lock:
            return sum(1 for a in self._archive.values() if lo <= a.archived_at < hi)

    def replay(
        self,
        query: ArchiveQuery,
        target: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> ReplayResult:
        with self.unit_of_work() as uow:
            assert isinstance(uow, _MemoryUnitOfWork)
            router = self.router() if target is None else self.router().for_target(target)
            if target is not None:
                self.target(target)
            total = self.archive_count(query.start, query.end)
            result = ReplayResult()
            matcher = (
                compile_pattern(query.pattern, "--pattern") if query.pattern is not None else None
            )
            now = self.clock()
            for a in list(self._archive.values()):
                if not query.start <= a.archived_at < query.end:
                    continue
                result.scanned += 1
                if matcher is None or matcher.matches(a.event.to_dict()):
                    result.matched += 1
                    for t in router.route(a.event):
                        uow.enqueue(t, a.position, now)
                        result.routed[t] = result.routed.get(t, 0) + 1
                if progress is not None:
                    progress(result.scanned, total)
            return result

    def purge_archive(self, now: float | None = None) -> int:
        if self.config.archive_retention_s is None:
            return 0
        cutoff = (self.clock() if now is None else now) - self.config.archive_retention_s
        with self._lock:
            referenced = {d.position for d in self._dead.values()}
            for q in self._queues.values():
                referenced.update(r.position for r in q.values())
            doomed = [
                p
                for p, a in self._archive.items()
                if a.archived_at < cutoff and p not in referenced
            ]
            for p in doomed:
                a = self._archive.pop(p)
                hashes = self._by_id.get(a.id_key)
                if hashes is not None and hashes.get(a.content_hash) == p:
                    del hashes[a.content_hash]
                    if not hashes:
                        del self._by_id[a.id_key]
            return len(doomed)

    def stats(self) -> BusStats:
        now = self.clock()
        with self._lock:
            out = []
            for name in self._targets:
                s = TargetStats(name=name, routed_total=self._routed_total.get(name, 0))
                for r in self._queues[name].values():
                    if r.visible_at <= now:
                        s.queued += 1
                    elif r.lease:
                        s.in_flight += 1
                    else:
                        s.delayed += 1
                s.dead_lettered = sum(1 for d in self._dead.values() if d.target == name)
                out.append(s)
            return BusStats(
                targets=out,
                archived=len(self._archive),
                duplicates_dropped=self._counters["duplicates_dropped"],
                id_conflicts=self._counters["id_conflicts"],
            )


class _MemoryUnitOfWork(UnitOfWork):
    def __init__(self, bus: MemoryBus) -> None:
        self.bus = bus
        self.conn = None
        self.undo: list[Callable[[], object]] = []
        self.after_commit: list[Callable[[], None]] = []

    # -- primitives with undo ------------------------------------------------------------
    def enqueue(self, target: str, position: int, now: float) -> None:
        b = self.bus
        qid = b._next_queue_id
        b._next_queue_id += 1
        queue = b._queues[target]
        queue[qid] = _Queued(position=position, visible_at=now)
        self.undo.append(lambda: queue.pop(qid, None))

    def set_row(self, target: str, qid: int, row: _Queued | None) -> None:
        queue = self.bus._queues[target]
        old = queue.get(qid)
        if row is None:
            queue.pop(qid, None)
        else:
            queue[qid] = row

        def undo() -> None:
            if old is None:
                queue.pop(qid, None)
            else:
                queue[qid] = old

        self.undo.append(undo)

    def add_dead(self, target: str, row: _Queued, error: str, now: float) -> None:
        b = self.bus
        did = b._next_dead_id
        b._next_dead_id += 1
        b._dead[did] = _Dead(
            target=target,
            position=row.position,
            error=error,
            attempts=row.attempts,
            first_at=row.first_at if row.first_at is not None else now,
            last_at=row.last_at if row.last_at is not None else now,
            dead_at=now,
        )
        self.undo.append(lambda: b._dead.pop(did, None))

    def del_dead(self, did: int) -> None:
        dead = self.bus._dead
        old = dead.pop(did)

        def undo() -> None:
            dead[did] = old

        self.undo.append(undo)

    def bump(self, counter: str, n: int, table: dict[str, int]) -> None:
        if not n:
            return
        table[counter] = table.get(counter, 0) + n

        def undo() -> None:
            table[counter] -= n

        self.undo.append(undo)

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
        batch = prepare(events)
        if not dedup:
            return self._archive_and_route(
                batch, now, PublishResult(published=len(batch)), False, inline, only
            )
        window_start = now - b.config.effective_dedup_window_s
        seen: dict[int, set[int]] = {}
        for p in batch:
            hashes = b._by_id.get(p.id_key)
            if hashes and p.id_key not in seen:
                seen[p.id_key] = {
                    h for h, pos in hashes.items() if b._archive[pos].archived_at >= window_start
                }
                if not seen[p.id_key]:
                    del seen[p.id_key]
        keep, dups, conflicts = dedup_decide(batch, seen)
        result = PublishResult(published=len(keep), duplicates_dropped=dups, id_conflicts=conflicts)
        self.bump("duplicates_dropped", dups, b._counters)
        self.bump("id_conflicts", conflicts, b._counters)
        return self._archive_and_route(keep, now, result, True, inline, only)

    def _route(
        self,
        event: Event,
        pos: int,
        now: float,
        result: PublishResult,
        inline: Collection[str],
        only: Collection[str] | None,
    ) -> None:
        for t in self.bus.router().route(event):
            if only is not None and t not in only:
                continue
            result.routed[t] = result.routed.get(t, 0) + 1
            if t in inline:
                result.inline.setdefault(t, []).append(event)
            else:
                self.enqueue(t, pos, now)

    def next_position(self) -> int:
        return self.bus._next_position

    def dead_letter(self, target: str, events: Iterable[Event], error: str) -> int:
        error = clean_error(error)
        b = self.bus
        b.target(target)
        now = b.clock()
        n = 0
        for p in prepare(events):
            pos = b._next_position
            b._next_position += 1
            b._archive[pos] = _Archived(pos, now, p.id_key, p.content_hash, p.event)
            self.undo.append(functools.partial(b._archive.pop, pos, None))
            row = _Queued(position=pos, visible_at=now, attempts=1, first_at=now, last_at=now)
            self.add_dead(target, row, error, now)
            n += 1
        return n

    def _archive_and_route(
        self,
        keep: list[PreparedEvent],
        now: float,
        result: PublishResult,
        dedup: bool,
        inline: Collection[str] = (),
        only: Collection[str] | None = None,
    ) -> PublishResult:
        b = self.bus
        for p in keep:
            pos = b._next_position
            b._next_position += 1
            b._archive[pos] = _Archived(pos, now, p.id_key, p.content_hash, p.event)
            if not dedup:
                self.undo.append(functools.partial(b._archive.pop, pos, None))
                self._route(p.event, pos, now, result, inline, only)
                continue
            hashes = b._by_id.setdefault(p.id_key, {})
            old = hashes.get(p.content_hash)
            hashes[p.content_hash] = pos

            def undo(
                pos: int = pos, key: int = p.id_key, h: int = p.content_hash, old: int | None = old
            ) -> None:
                b._archive.pop(pos, None)
                by_hash = b._by_id.get(key, {})
                if old is None:
                    by_hash.pop(h, None)
                    if not by_hash:
                        b._by_id.pop(key, None)
                else:
                    by_hash[h] = old

            self.undo.append(undo)
            self._route(p.event, pos, now, result, inline, only)
        for t, n in result.routed.items():
            self.bump(t, n, b._routed_total)
        return result

    def receive(self, target: str, max_events: int | None) -> list[Delivery]:
        b = self.bus
        cfg = b.target(target)
        now = b.clock()
        want = cfg.batch_size if max_events is None else max_events
        queue = b._queues[target]
        if cfg.max_in_flight:
            leased = sum(1 for r in queue.values() if r.lease and r.visible_at > now)
            want = min(want, cfg.max_in_flight - leased)
        if want <= 0:
            return []
        visible: list[tuple[int, _Queued]] = []
        for qid, row in list(queue.items()):
            if row.visible_at > now:
                continue
            if row.attempts >= cfg.retry.max_attempts:
                self.add_dead(target, row, _lease_expired_error(row, cfg), now)
                self.set_row(target, qid, None)
                continue
            visible.append((qid, row))
            if len(visible) >= want:
                break
        if not visible:
            return []
        if len(visible) < want and cfg.linger_ms:
            oldest = min(r.visible_at for _, r in visible)
            if now < oldest + cfg.linger_ms / 1000.0:
                return []
        lease = random.getrandbits(62) + 1
        out = []
        for qid, row in visible:
            new = _Queued(
                position=row.position,
                visible_at=now + cfg.lease_s,
                attempts=row.attempts + 1,
                first_at=row.first_at if row.first_at is not None else now,
                last_at=now,
                lease=lease,
                last_error=row.last_error,
            )
            self.set_row(target, qid, new)
            a = b._archive[row.position]
            out.append(
                Delivery(
                    event=a.event,
                    target=target,
                    attempt=new.attempts,
                    first_attempt_at=new.first_at if new.first_at is not None else now,
                    last_attempt_at=now,
                    handle=DeliveryHandle(qid, lease),
                    position=row.position,
                    id_key=a.id_key,
                    content_hash=a.content_hash,
                )
            )
        return out

    def _leased(self, d: Delivery) -> _Queued | None:
        queue = self.bus._queues.get(d.target)
        if queue is None:
            return None
        row = queue.get(d.handle.queue_id)
        if row is None or row.lease != d.handle.lease:
            return None
        return row

    def ack(self, deliveries: Iterable[Delivery]) -> int:
        n = 0
        for d in deliveries:
            if self._leased(d) is not None:
                self.set_row(d.target, d.handle.queue_id, None)
                n += 1
        return n

    def nack(self, deliveries: Iterable[Delivery], error: str) -> int:
        error = clean_error(error)
        b = self.bus
        now = b.clock()
        dead = 0
        for d in deliveries:
            row = self._leased(d)
            if row is None:
                continue
            cfg = b.target(d.target)
            if row.attempts >= cfg.retry.max_attempts:
                self.add_dead(d.target, row, error, now)
                self.set_row(d.target, d.handle.queue_id, None)
                dead += 1
            else:
                delay = cfg.retry.delay_s(row.attempts, b.rand)
                retry = msgspec.structs.replace(
                    row, visible_at=now + delay, lease=0, last_error=error
                )
                self.set_row(d.target, d.handle.queue_id, retry)
        return dead

    def processed(self, consumer: str, deliveries: Iterable[Delivery]) -> set[tuple[int, int]]:
        tracking = self.bus._tracking
        return {
            d.tracking_key for d in deliveries if (consumer, d.id_key, d.content_hash) in tracking
        }

    def track(self, consumer: str, deliveries: Iterable[Delivery]) -> None:
        tracking = self.bus._tracking
        for d in deliveries:
            key = (consumer, d.id_key, d.content_hash)
            if key in tracking:
                continue
            tracking.add(key)
            self.undo.append(functools.partial(tracking.discard, key))

    def on_commit(self, fn: Callable[[], None]) -> None:
        self.after_commit.append(fn)


def _lease_expired_error(row: _Queued, cfg: TargetConfig) -> str:
    return (
        f"lease expired without ack after attempt {row.attempts} of "
        f"{cfg.retry.max_attempts} (the consumer crashed or ran past lease_s={cfg.lease_s}s)"
        + (f"; last error: {row.last_error}" if row.last_error else "")
    )
