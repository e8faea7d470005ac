"""The consumer runner: receive batches from a target, run a handler, commit exactly once.

`run_consumer(bus, target, handler)` applies the target's batch size, linger, concurrency,
rate limit and retry policy. For each batch it opens ONE unit of work and, inside it:

1. asks the tracking record which deliveries this consumer already processed (a redelivery
   after a crash, a replay) and drops those;
2. calls `handler(fresh_deliveries, uow)`: the stage writes its effects through `uow.conn`
   and publishes its outputs through `uow.publish` (derived ids);
3. records the fresh deliveries in the tracking record and acks the whole batch.

All of it commits together, so a crash anywhere leaves either nothing (the batch is
redelivered after its lease and processed then) or everything (the redelivery is a no-op):
exactly-once in effect (DESIGN §3.1).

A handler exception rolls the unit of work back. A batch of one is then nacked (retry with
backoff, dead-letter after the last attempt). A larger batch is retried event by event, each
in its own unit of work, so only the poison event is nacked and its good neighbours commit.

A consumer may also be given `defer(uow, deliveries)`: called in the unit of work before the
handler, it names deliveries that must wait for another transaction (e.g. their business key
is locked by another worker's uncommitted batch). They are left out of this unit of work (not
handled, tracked or acked) and handled in a second unit of work right after it commits, in
which `defer` is not asked again, so they wait there instead of holding up the whole batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import msgspec

from paypost.bus.core import Bus, Clock, Delivery, UnitOfWork

Handler = Callable[[Sequence[Delivery], UnitOfWork], None]
#: which of a batch's fresh deliveries to postpone to a unit of work of their own (see above)
Defer = Callable[[UnitOfWork, Sequence[Delivery]], Sequence[Delivery]]
Sleep = Callable[[float], None]


class TokenBucket:
    """Events/s limiter: `take(n)` grants up to n whole tokens; refills at `rate_per_s`.

    Capacity (burst) defaults to one second of rate, at least 1. Callers wait (back-pressure)
    when nothing is granted; events stay queued meanwhile — never dropped.
    """

    def __init__(self, rate_per_s: float, clock: Clock, burst: float | None = None) -> None:
        self.rate = rate_per_s
        self.capacity = max(1.0, burst if burst is not None else rate_per_s)
        self.clock = clock
        self.tokens = self.capacity
        self.updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, n: int) -> int:
        self._refill()
        granted = min(n, int(self.tokens))
        self.tokens -= granted
        return granted

    def give_back(self, n: int) -> None:
        self.tokens = min(self.capacity, self.tokens + n)

    def wait_s(self) -> float:
        """Seconds until at least one token is available."""
        self._refill()
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate


class ConsumerStats(msgspec.Struct, kw_only=True):
    batches: int = 0
    processed: int = 0  # deliveries handed to the handler and committed
    skipped: int = 0  # already in the tracking record (redelivery / replay): no effect
    nacked: int = 0
    dead_lettered: int = 0


def describe_error(exc: BaseException) -> str:
    """`Type: message` of a handler exception (the bus masks card numbers on nack)."""
    return f"{type(exc).__name__}: {exc}"


class Consumer:
    """Consumes one target with one handler. `name` keys its tracking record (default: the
    target's name); two consumers with the same name share one tracking record."""

    def __init__(
        self,
        bus: Bus,
        target: str,
        handler: Handler,
        *,
        name: str | None = None,
        track: bool = True,
        defer: Defer | None = None,
        sleep: Sleep = time.sleep,
        idle_sleep_s: float = 0.002,
        max_idle_sleep_s: float = 0.05,
    ) -> None:
        self.bus = bus
        self.defer = defer
        self.config = bus.target(target)
        self.target = target
        self.handler = handler
        self.name = name or target
        self.track = track
        self.sleep = sleep
        self.idle_sleep_s = idle_sleep_s
        self.max_idle_sleep_s = max_idle_sleep_s
        rate = self.config.rate_limit_per_s
        self.bucket = TokenBucket(rate, bus.clock) if rate else None
        self.stats = ConsumerStats()
        self._stats_lock = threading.Lock()

    # -- one batch -------------------------------------------------------------------------
    def _apply(
        self, uow: UnitOfWork, deliveries: Sequence[Delivery], *, may_defer: bool = False
    ) -> tuple[int, int, list[Delivery]]:
        """Handle DELIVERIES in UOW: (processed, skipped, postponed by `defer`)."""
        fresh: Sequence[Delivery] = deliveries
        if self.track:
            # Skip what the tracking record has, and repeats of one key inside the batch
            # (the same event delivered twice, e.g. published with dedup=False or replayed
            # while still queued).
            done = uow.processed(self.name, deliveries)
            if done or len({d.tracking_key for d in deliveries}) < len(deliveries):
                fresh = []
                for d in deliveries:
                    if d.tracking_key not in done:
                        done.add(d.tracking_key)
                        fresh.append(d)
        later: list[Delivery] = []
        if fresh and may_defer and self.defer is not None:
            later = list(self.defer(uow, fresh))
            if later:
                postponed = {id(d) for d in later}
                fresh = [d for d in fresh if id(d) not in postponed]
                deliveries = [d for d in deliveries if id(d) not in postponed]
        if fresh:
            self.handler(fresh, uow)
            if self.track:
                uow.track(self.name, fresh)
        uow.ack(deliveries)
        return len(fresh), len(deliveries) - len(fresh), later

    def handle_batch(self, deliveries: Sequence[Delivery]) -> None:
        """Process one received batch (see the module docs for failure isolation)."""
        counts = [0, 0, 0, 0]  # processed, skipped, nacked, dead-lettered
        later = self._handle(deliveries, counts, may_defer=True)
        if later:
            # postponed by `defer`: their own unit of work, after the first one committed
            self._handle(later, counts, may_defer=False)
        processed, skipped, nacked, dead = counts
        with self._stats_lock:
            self.stats.batches += 1
            self.stats.processed += processed
            self.stats.skipped += skipped
            self.stats.nacked += nacked
            self.stats.dead_lettered += dead

    def _handle(
        self, deliveries: Sequence[Delivery], counts: list[int], *, may_defer: bool
    ) -> list[Delivery]:
        """DELIVERIES in one unit of work, or event by event if it fails (COUNTS updated);
        returns what `defer` postponed."""
        try:
            with self.bus.unit_of_work() as uow:
                processed, skipped, later = self._apply(uow, deliveries, may_defer=may_defer)
            counts[0] += processed
            counts[1] += skipped
            return later
        except Exception as exc:
            if len(deliveries) == 1:
                counts[2] += 1
                counts[3] += self.bus.nack(deliveries, describe_error(exc))
                return []
        for d in deliveries:
            try:
                with self.bus.unit_of_work() as uow:
                    p, s, _ = self._apply(uow, [d])
                counts[0] += p
                counts[1] += s
            except Exception as exc1:
                counts[2] += 1
                counts[3] += self.bus.nack([d], describe_error(exc1))
        return []

    # -- receiving -------------------------------------------------------------------------
    def _receive(self) -> tuple[list[Delivery], float]:
        """A batch (possibly empty) and, when empty, how long to sleep before polling."""
        want = self.config.batch_size
        if self.bucket is not None:
            want = self.bucket.take(want)
            if want == 0:
                return [], self.bucket.wait_s()
        batch = self.bus.receive(self.target, want)
        if self.bucket is not None and len(batch) < want:
            self.bucket.give_back(want - len(batch))
        return batch, 0.0

    def run_once(self) -> int:
        """Receive and handle at most one batch in this thread; returns its size."""
        batch, _ = self._receive()
        if batch:
            self.handle_batch(batch)
        return len(batch)

    def run(
        self,
        *,
        stop: threading.Event | None = None,
        until_idle: bool = False,
        max_batches: int | None = None,
    ) -> ConsumerStats:
        """Consume until STOP is set, or (until_idle) the target's queue is empty, or
        MAX_BATCHES batches were handled. Up to `concurrency` batches are in flight."""
        workers = self.config.concurrency
        pool = ThreadPoolExecutor(workers, thread_name_prefix=f"consumer-{self.target}")
        in_flight: set[Future[None]] = set()
        idle = self.idle_sleep_s
        started = 0
        try:
            while not (stop is not None and stop.is_set()):
                if max_batches is not None and started >= max_batches:
                    break
                if len(in_flight) < workers:
                    batch, pause = self._receive()
                    if batch:
                        idle = self.idle_sleep_s
                        started += 1
                        if workers == 1:
                            self.handle_batch(batch)
                        else:
                            in_flight.add(pool.submit(self.handle_batch, batch))
                        continue
                else:
                    pause = 0.0
                if in_flight:
                    done, in_flight = _wait_any(in_flight, self.idle_sleep_s)
                    for f in done:
                        f.result()
                    continue
                if until_idle and self.bus.pending(self.target) == 0:
                    break
                nxt = self.bus.next_visible_in(self.target)
                delay = max(pause, idle)
                if nxt is not None and nxt > 0:
                    delay = max(delay, min(nxt, self.max_idle_sleep_s))
                self.sleep(delay)
                idle = min(idle * 2, self.max_idle_sleep_s)
        finally:
            for f in in_flight:
                f.result()
            pool.shutdown(wait=True)
        return self.stats


def _wait_any(
    futures: set[Future[None]], timeout: float
) -> tuple[set[Future[None]], set[Future[None]]]:
    done, pending = wait(futures, timeout=timeout, return_when=FIRST_COMPLETED)
    return set(done), set(pending)


def run_consumer(
    bus: Bus,
    target: str,
    handler: Handler,
    *,
    name: str | None = None,
    stop: threading.Event | None = None,
    until_idle: bool = False,
    max_batches: int | None = None,
    sleep: Sleep = time.sleep,
) -> ConsumerStats:
    """Build a `Consumer` and run it (see `Consumer.run`)."""
    consumer = Consumer(bus, target, handler, name=name, sleep=sleep)
    return consumer.run(stop=stop, until_idle=until_idle, max_batches=max_batches)
