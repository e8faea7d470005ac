"""paypost's stages on the distributed backbone: NATS JetStream + PostgreSQL (issue 6).

The same rules (`paypost.pipeline.RULES_TABLE`), targets and pure stage functions as the
embedded pipeline; what differs is where state lives and how a batch moves:

- every stage consumes its own durable queue (`<p>.q.<stage>`) in its own unit of work —
  ONE PostgreSQL transaction with the stage's effects (dedup index, leg store, ledger,
  posting outbox, counters, held/rejected outcomes), its tracking record and the outbox of
  its output events; the bus relays the outputs to JetStream after commit (see
  `paypost.bus.nats`);
- no fused in-process hops: any worker of any stage can take any event, so workers scale
  out by running more of them (`paypost worker --stage STAGE`);
- an ingest batch commits its checkpoint, quarantine and sealed vault rows with the outbox
  of its AuthorizationApproved events (the source's tracking record), so a crashed ingest
  resumes after its last batch and publishes nothing twice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import psycopg
from psycopg import sql

from paypost.bus.consumer import Consumer, TokenBucket
from paypost.bus.core import Delivery, EncodedEvents, UnitOfWork
from paypost.bus.nats import BUS_URL_SETTING, NatsBus, NatsUnitOfWork, ServiceUnavailable
from paypost.events import Event
from paypost.ledger.model import Account
from paypost.ledger.postgres import PostgresLedger
from paypost.logs import get_logger
from paypost.pipeline import (
    ACCOUNT_INTERFACE,
    ASSEMBLER,
    DEDUP,
    ENRICH,
    NOTIFICATIONS,
    RULES,
    RULES_TABLE,
    STAGE_ORDER,
    STANDARDIZE,
    PipelineSettings,
    PureStageHandlers,
    StageHandler,
    StageMetrics,
    _count,
    encoded,
    ledger_accounts,
    wait_for_tokens,
)
from paypost.refdata.model import RefData
from paypost.stages import assembler as asm
from paypost.stages import assembler_pg, posting_file_pg
from paypost.stages import dedup as dedup_stage
from paypost.stages import ingest as ingest_stage
from paypost.stages.post import create_legs
from paypost.stages.posting_file import PostingFileWriter
from paypost.stages.rules import RuleBook

from . import state

log = get_logger("paypost.distributed")

#: the fused worker: consumes the dedup queue and runs every stage in one unit of work
FUSED = "pipeline"

#: what `paypost worker --stage` accepts: the stages, the alert channel, the fused worker
WORKER_STAGES: tuple[str, ...] = (*STAGE_ORDER, NOTIFICATIONS, FUSED)

#: the most events a fused worker takes in one unit of work. Every stage of the batch runs
#: in it, so a batch of the mode's 5,000 could take longer than the lease (30 s) on a busy
#: machine: the batch went to the second worker too, one of the two rolled back, retried
#: event by event and fell further behind (seen at 1,000,000 under load). 1,000 keeps a unit
#: of work to seconds; the per-batch cost (commit, relay) stays small per event.
FUSED_MAX_BATCH = 1000

#: how long an ingest batch is retried while NATS cannot take its archive segment
INGEST_NATS_WAIT_S = 300.0

#: the workers `paypost serve` runs: one per stage (`--fused`: FUSED replaces DEDUP's)
PER_STAGE: tuple[str, ...] = (*STAGE_ORDER, NOTIFICATIONS)


def serve_stages(fused: bool) -> tuple[str, ...]:
    """The workers of `paypost serve`: one per stage, or the fused worker on the dedup queue
    plus one per later stage (those take only what the fused worker hands off: retries)."""
    return (FUSED, *PER_STAGE[1:]) if fused else PER_STAGE


class DistributedPipeline(PureStageHandlers):
    """The stage handlers over PostgreSQL state, consuming from a `NatsBus`."""

    def __init__(
        self,
        bus: NatsBus,
        refdata: RefData,
        rulebook: RuleBook,
        settings: PipelineSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.bus = bus
        self.prefix = bus.prefix
        self.state_schema = state.state_schema(bus.prefix)
        self.assembly_schema = f"{bus.prefix}_assembly"
        self.postings_schema = f"{bus.prefix}_postings"
        self.refdata = refdata
        self.rulebook = rulebook
        self.settings = settings or PipelineSettings()
        self.clock = clock
        self.sleep = sleep
        self.ledger = PostgresLedger(bus.db_url, prefix=f"{bus.prefix}_ledger")
        self._ledger_lock = threading.Lock()
        self.handlers: dict[str, StageHandler] = {
            DEDUP: self._dedup,
            STANDARDIZE: self._standardize,
            ENRICH: self._enrich,
            RULES: self._rules,
            ACCOUNT_INTERFACE: self._account_interface,
            ASSEMBLER: self._assembler,
        }
        rate = self.settings.posting_rate_limit_per_s
        self.buffer = TokenBucket(rate, clock) if rate else None
        # per thread: (unit of work, its batch decoded, business keys it holds), set by the
        # fused worker's `defer` for the dedup stage of that unit of work
        self._fused_batch = threading.local()
        #: processing time per event of each batch, per stage (as the embedded pipeline's):
        #: `stage_times()`, written by `paypost serve` / `worker` when they stop
        self.metrics: dict[str, StageMetrics] = {name: StageMetrics() for name in STAGE_ORDER}
        self._metrics_lock = threading.Lock()

    def close(self) -> None:
        self.ledger.close()

    def _timed(self, name: str, n: int, run: Callable[[], Sequence[Event]]) -> Sequence[Event]:
        """RUN (stage NAME over N events), its wall and thread CPU time per event recorded
        when it returns (a batch that raised is rolled back and counted when it is retried)."""
        started, cpu_started = time.perf_counter(), time.thread_time()
        outputs = run()
        seconds = time.perf_counter() - started
        cpu = time.thread_time() - cpu_started
        with self._metrics_lock:
            self.metrics[name].add(n, seconds, cpu)
        return outputs

    def stage_times(self) -> dict[str, dict[str, Any]]:
        """Per stage that ran: `StageMetrics.to_dict` (each batch's events and wall and CPU
        time per event)."""
        with self._metrics_lock:
            return {name: m.to_dict() for name, m in self.metrics.items() if m.events}

    # -- set-up ----------------------------------------------------------------------------
    def install(self) -> None:
        """Tables, ledger accounts, targets and rules (idempotent; run by a job before its
        workers, and harmless when several run it)."""
        conn = self.bus.db()
        with conn.transaction():
            state.ensure_schema(conn, self.state_schema)
            assembler_pg.ensure_schema(conn, self.assembly_schema)
            posting_file_pg.ensure_outbox_schema(conn, self.postings_schema)
        self.ledger.create_accounts(self.ledger_accounts())
        for target in self.settings.targets():
            self.bus.put_target(target)
        for rule in RULES_TABLE:
            self.bus.put_rule(rule)

    def ledger_accounts(self) -> list[Account]:
        return ledger_accounts(self.refdata)

    # -- stage handlers (thin: the pure stages decide, PostgreSQL stores) ------------------
    # standardize, enrich, rules: PureStageHandlers (shared with the embedded pipeline).
    def _dedup(self, events: list[Event], uow: UnitOfWork) -> list[Event]:
        # a fused worker's unit of work: its batch decoded and its keys locked (`defer`)
        batch = getattr(self._fused_batch, "uow_batch", None)
        prepared, held = (batch[1], batch[2]) if batch and batch[0] is uow else (None, ())
        index = state.PostgresDedupIndex(uow.conn, self.state_schema, held=held)
        result = dedup_stage.check_duplicates(events, index, self.settings.dedup, prepared=prepared)
        index.apply(result.effects)
        # the reconciler's record of what came in, with the dedup effects (FR10)
        state.record_inbound(uow.conn, self.state_schema, state.inbound_rows(result.outputs))
        return result.outputs

    def _account_interface(self, events: list[Event], uow: UnitOfWork) -> Sequence[Event]:
        if self.buffer is not None:  # the posting buffer (FR7)
            wait_for_tokens(self.buffer, len(events), self.sleep)
        return encoded(create_legs, events, self.settings.posting)

    def _assembler(self, events: list[Event], uow: UnitOfWork) -> list[Event]:
        conn = uow.conn
        store = assembler_pg.PostgresLegStore(
            conn, self.assembly_schema, ledger_schema=partial(self.ledger.schema_in, conn)
        )
        result = asm.assemble(events, store, now_us=int(self.clock() * 1e6))
        done = asm.finish(result, store, partial(self.ledger.post_batch_in, uow.conn))
        posting_file_pg.add_to_outbox(uow.conn, done.records, self.postings_schema)
        for letter in done.dead_letters:
            uow.dead_letter(ASSEMBLER, letter.events, letter.reason)
        if done.dead_letters:
            state.bump_counters(
                uow.conn, self.state_schema, {"dead_lettered": len(done.dead_letters)}
            )
        return done.events

    # -- consumers -------------------------------------------------------------------------
    def stage_consumer(self, name: str, concurrency: int | None = None) -> Consumer:
        """A durable consumer of stage NAME (`paypost worker --stage NAME`)."""
        if name == FUSED:
            return self.fused_consumer(concurrency)
        if name == NOTIFICATIONS:
            consumer = self.notifications_consumer()
        else:
            handler = self.handlers[name]
            schema = self.state_schema

            def handle(deliveries: Sequence[Delivery], uow: UnitOfWork) -> None:
                events = [d.event for d in deliveries]
                outputs = self._timed(name, len(events), partial(handler, events, uow))
                counts: dict[str, int] = {}
                _count(outputs, counts)
                state.bump_counters(uow.conn, schema, counts)
                state.record_outcomes(uow.conn, schema, state.outcome_rows(outputs))
                if outputs:
                    uow.publish(outputs, dedup=False)

            consumer = Consumer(self.bus, name, handle, sleep=self.sleep)
        if concurrency is not None:
            consumer.config = msgspec.structs.replace(consumer.config, concurrency=concurrency)
        return consumer

    def fused_consumer(self, concurrency: int | None = None) -> Consumer:
        """A consumer of the dedup queue that runs EVERY stage on its batch in ONE unit of
        work (the embedded pipeline's fused dispatch, on PostgreSQL): downstream events are
        archived but skip the queue round trip. A stage that fails on an event hands that
        event to the stage's durable queue (retries, DLQ), where per-stage workers take it.
        An event is processed once whether a fused or a dedup worker takes it.

        Its tracking record is the dedup stage's own index of event ids (`dedup_events`,
        written in the same transaction): a redelivered or replayed event is found there
        and has no effect, and two workers that process one event at the same time clash on
        it (the later rolls back), so the bus's tracking rows (a second random-key index
        insert and lookup per authorization: ~18 µs of PostgreSQL time at 1,000,000) are not
        written. The business-key locks make the second of two copies in flight wait for
        the first (`defer`)."""
        inline = frozenset(self.handlers)
        schema = self.state_schema
        # past a third of the lease, a batch still in hand has its leases restarted
        extend_after_s = self.bus.target(DEDUP).lease_s / 3
        local = self._fused_batch

        def handle(deliveries: Sequence[Delivery], uow: UnitOfWork) -> None:
            assert isinstance(uow, NatsUnitOfWork)
            try:
                _handle(deliveries, uow)
            finally:
                local.uow_batch = None

        def _handle(deliveries: Sequence[Delivery], uow: NatsUnitOfWork) -> None:
            counts: dict[str, int] = {}
            outcomes: list[state.OutcomeRow] = []  # held/rejected, for `paypost review`
            pending: dict[str, list[Event]] = {DEDUP: [d.event for d in deliveries]}
            leased_at = time.monotonic()
            while pending:
                produced: dict[str, list[Event]] = {}
                for name in STAGE_ORDER:
                    events = pending.pop(name, None)
                    if not events:
                        continue
                    if time.monotonic() - leased_at > extend_after_s:
                        self.bus.extend_leases(deliveries)
                        leased_at = time.monotonic()
                    outputs = self._run_isolated(uow, name, events)
                    if not outputs:
                        continue
                    _count(outputs, counts)
                    state.outcome_rows(outputs, into=outcomes)
                    result = uow.publish(outputs, dedup=False, inline=inline)
                    for target, evs in result.inline.items():
                        produced.setdefault(target, []).extend(evs)
                pending = produced
            state.bump_counters(uow.conn, schema, counts)
            state.record_outcomes(uow.conn, schema, outcomes)

        def defer(uow: UnitOfWork, deliveries: Sequence[Delivery]) -> list[Delivery]:
            # Copies of an authorization whose business key another worker's uncommitted
            # batch holds wait in a unit of work of their own, not the whole batch with them.
            # The batch decoded once, and the keys this transaction now holds, for its dedup
            # stage (`_dedup`): it neither decodes nor locks them again.
            prepared = dedup_stage.Prepared([d.event for d in deliveries])
            keys = prepared.business_keys()
            wanted = {k for k in keys.values() if k is not None}
            contended = state.try_lock_keys(uow.conn, wanted)
            local.uow_batch = (uow, prepared, wanted - contended)
            if not contended:
                return []
            return [d for d in deliveries if keys[id(d.event)] in contended]

        consumer = Consumer(
            self.bus, DEDUP, handle, name=DEDUP, track=False, defer=defer, sleep=self.sleep
        )
        consumer.config = msgspec.structs.replace(
            consumer.config,
            batch_size=min(consumer.config.batch_size, FUSED_MAX_BATCH),
            concurrency=consumer.config.concurrency if concurrency is None else concurrency,
        )
        return consumer

    def _run_isolated(self, uow: NatsUnitOfWork, name: str, events: list[Event]) -> Sequence[Event]:
        return self._timed(name, len(events), partial(self._run_stage, uow, name, events))

    def _run_stage(self, uow: NatsUnitOfWork, name: str, events: list[Event]) -> Sequence[Event]:
        handler = self.handlers[name]
        if name == DEDUP:
            # The fused consumer IS the dedup queue's consumer: a hand-off to that queue would
            # come back already in its tracking record and be skipped (lost). So a dedup
            # failure fails the unit of work; the consumer retries event by event, then
            # nacks the one that still fails (backoff, DLQ).
            with uow.savepoint():
                return handler(events, uow)
        try:
            with uow.savepoint():
                return handler(events, uow)
        except Exception as exc:
            log.warning("stage.batch_failed", stage=name, events=len(events), error=repr(exc))
        outputs = EncodedEvents()
        for event in events:
            try:
                with uow.savepoint():
                    outputs.extend(handler([event], uow))
            except Exception as exc:
                log.error(
                    "stage.event_failed",
                    stage=name,
                    event_id=event.id,
                    tenant=event.tenant,
                    error=repr(exc),
                )
                uow.publish([event], dedup=False, only={name})  # its durable queue
        return outputs

    def notifications_consumer(self) -> Consumer:
        def handle(deliveries: Sequence[Delivery], uow: UnitOfWork) -> None:
            for d in deliveries:
                ev = d.event
                log.error(
                    "alert",
                    alert=ev.detail_type,
                    event_id=ev.id,
                    tenant=ev.tenant,
                    **{"correlation-id": ev.correlation_id},
                    detail=ev.detail,
                )

        return Consumer(self.bus, NOTIFICATIONS, handle, sleep=self.sleep)

    def expire_sequences(self) -> int:
        """Posting sequences incomplete after the timeout: alert and dead-letter (FR8)."""
        timeout_us = int(self.settings.assembly_timeout_s * 1e6)
        with self.bus.unit_of_work() as uow:
            store = assembler_pg.PostgresLegStore(uow.conn, self.assembly_schema)
            result = asm.expire(store, now_us=int(self.clock() * 1e6), timeout_us=timeout_us)
            for letter in result.dead_letters:
                uow.dead_letter(ASSEMBLER, letter.events, letter.reason)
            if result.alerts:
                uow.publish(result.alerts, dedup=False)
            state.bump_counters(
                uow.conn, self.state_schema, {"dead_lettered": len(result.dead_letters)}
            )
        return len(result.dead_letters)

    def prune_dedup(self) -> int:
        """Forget dedup keys and ids outside every tenant's window (maintenance)."""
        window = self.settings.dedup.window_seconds
        conn = self.bus.db()
        n = 0
        for tenant in sorted(self.refdata.tenants):
            with conn.transaction():
                n += state.prune_dedup(conn, self.state_schema, tenant, window)
        return n

    # -- ingest (the publisher) ------------------------------------------------------------
    def load_checkpoint(self, source: str) -> ingest_stage.Checkpoint | None:
        return state.PostgresIngestStore(self.bus.db(), self.state_schema).load_checkpoint(source)

    def publish_batch(self, batch: ingest_stage.IngestBatch) -> int:
        """One ingest batch: checkpoint + quarantine + vault rows + its events' outbox, in ONE
        transaction. Returns the events published (dedup drops re-read ones).

        The transaction publishes its archive segment before it commits, so it needs NATS:
        while NATS cannot be reached the batch is retried (it rolled back whole, so the
        retry starts clean), every second for up to INGEST_NATS_WAIT_S, with a log line
        `ingest.waiting_for_nats`; then the error names PAYPOST_BUS_URL."""
        deadline = time.monotonic() + INGEST_NATS_WAIT_S
        while True:
            try:
                with self.bus.unit_of_work() as uow:
                    state.PostgresIngestStore(uow.conn, self.state_schema).apply(batch)
                    result = uow.publish(batch.events, dedup=True)
                return result.published
            except (TimeoutError, nats.errors.Error) as exc:
                line = batch.checkpoint.line if batch.checkpoint is not None else None
                if time.monotonic() >= deadline:
                    raise ServiceUnavailable(
                        f"NATS did not take the ingest batch of source {batch.source!r} "
                        f"(up to line {line}) for {INGEST_NATS_WAIT_S:.0f} s "
                        f"({type(exc).__name__}: {exc}); nothing of it was committed. Check "
                        f"nats-server at {BUS_URL_SETTING}={self.bus.nats_url} and run the "
                        "ingest again: it resumes from its checkpoint."
                    ) from exc
                log.warning(
                    "ingest.waiting_for_nats", source=batch.source, line=line, error=repr(exc)
                )
                self.sleep(1.0)

    # -- outputs ---------------------------------------------------------------------------
    def export_postings(self, path: Path) -> int:
        """Move committed posting records from PostgreSQL to the bank's posting file PATH
        (claim, write + fsync, delete: idempotent by batch id). Run by one process (the
        job); returns how many records were written."""
        writer = PostingFileWriter(path)
        with psycopg.connect(self.bus.db_url) as conn:
            return posting_file_pg.export_outbox(conn, writer, schema=self.postings_schema)

    # -- observing a run -------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        return state.read_counters(self.bus.db(), self.state_schema)

    def ingest_totals(self) -> dict[str, int]:
        out = {"records": 0, "approved": 0, "declined": 0, "timed_out": 0, "quarantined": 0}
        for cp in state.PostgresIngestStore(self.bus.db(), self.state_schema).checkpoints():
            counters = msgspec.to_builtins(cp.counters)
            for k in out:
                out[k] += int(counters.get(k, 0))
        return out

    def in_flight(self) -> int:
        """Events still on their way: queued or leased in a stage queue, or in the outbox."""
        return sum(self.bus.pending(n) for n in STAGE_ORDER) + self.bus.outbox_size()

    def trial_balances(self) -> dict[str, dict[str, int]]:
        with self._ledger_lock:
            out: dict[str, dict[str, int]] = {}
            for tenant in sorted(self.refdata.tenants):
                trial = self.ledger.trial_balance(tenant)
                out[tenant] = {line.currency: line.net for line in trial.lines}
            return out

    def posted_entries(self) -> dict[str, int]:
        """Journal entries per tenant (each authorization posts one entry)."""
        conn = self.bus.db()
        out: dict[str, int] = {}
        for tenant in sorted(self.refdata.tenants):
            schema = self.ledger.schema(tenant)
            row = conn.execute(
                sql.SQL("SELECT count(*) FROM {}.ledger_entries").format(sql.Identifier(schema))
            ).fetchone()
            out[tenant] = int(row[0]) if row else 0
        return out
