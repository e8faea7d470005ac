"""The composition root: every rule, target and stage of paypost in one place (DESIGN §1–2).

Read top to bottom: the targets (one per stage, plus the alert channel), the rules that route
each lifecycle event to its stage, the stage handlers (thin adapters over the pure stage
functions in `paypost.stages`), and the `Pipeline` that runs them.

How a batch runs on the embedded default (one process, one SQLite file):

    with bus.unit_of_work() as uow:                  # ONE transaction per ingest batch
        ingest store: vault rows, quarantine, checkpoint (the source's tracking record)
        publish AuthorizationApproved ──rules──► dedup ──► standardize ──► enrich ──► rules
            ──► [buffer] ──► account-interface ──► assembler ──► ledger + posting outbox

Every event is published to the bus (archived, routed by the rules above); events routed to
a stage this process runs are handed back by `publish(..., inline=...)` and processed in the
same unit of work instead of taking a queue round trip (fused in-process hops, DESIGN §5).
The ingest checkpoint is the tracking record: it commits with every effect of the batch, so a
crash anywhere leaves either the whole batch or none of it (effects once, DESIGN §3.1).

Anything that does not fit the fused path takes the durable path through the same rules and
the same handlers: an event whose stage raised is handed to that stage's durable queue (retry
with backoff, then dead-letter with the error), the alert channel is a durable queue, and
`paypost serve`/workers consume every target from its queue (`run_stage_consumer`).
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from paypost.bus.consumer import Consumer, ConsumerStats, TokenBucket
from paypost.bus.core import (
    Delivery,
    EncodedEvents,
    PublishResult,
    RetryPolicy,
    Rule,
    TargetConfig,
    UnitOfWork,
)
from paypost.bus.sqlite import SqliteBus
from paypost.events import FLAG_DETAIL_TYPES, Event
from paypost.ledger import sqlite as ledger_sqlite
from paypost.ledger.model import Account
from paypost.logs import get_logger
from paypost.refdata.model import RefData
from paypost.stages import assembler as asm
from paypost.stages import dedup as dedup_stage
from paypost.stages import ingest as ingest_stage
from paypost.stages import reconcile as reconcile_stage
from paypost.stages.enrich import enrich
from paypost.stages.post import PostingConfig, create_legs, internal_accounts
from paypost.stages.posting_file import (
    PostingFileWriter,
    add_to_outbox,
    ensure_outbox_schema,
    export_outbox,
)
from paypost.stages.rules import RuleBook, apply_rules
from paypost.stages.standardize import standardize

log = get_logger("paypost.pipeline")

Mode = Literal["realtime", "near-realtime", "batch"]
MODES: tuple[Mode, ...] = ("realtime", "near-realtime", "batch")

# --------------------------------------------------------------------------------------------
# Targets and rules: the whole routing of paypost (a new consumer is a new rule here).

DEDUP = "dedup"
STANDARDIZE = "standardize"
ENRICH = "enrich"
RULES = "rules"
ACCOUNT_INTERFACE = "account-interface"
ASSEMBLER = "assembler"
NOTIFICATIONS = "notifications"

#: The stages in flow order (the fused dispatcher runs them in this order).
STAGE_ORDER: tuple[str, ...] = (DEDUP, STANDARDIZE, ENRICH, RULES, ACCOUNT_INTERFACE, ASSEMBLER)

STAGE_RETRY = RetryPolicy(max_attempts=5, base_delay_s=0.5, max_delay_s=60.0)

#: Alerts that would page an SRE team (NFR7): a durable queue with its own consumer.
ALERT_TYPES: tuple[str, ...] = (
    "ValidationFailed",
    "PostingSequenceIncomplete",
    "PostingLegConflict",
    "ReconciliationBreakDetected",
)

RULES_TABLE: tuple[Rule, ...] = (
    Rule(
        name="authorizations-to-dedup",
        pattern={"detail-type": ["AuthorizationApproved"]},
        target=DEDUP,
    ),
    Rule(
        name="accepted-to-standardize",
        pattern={"detail-type": ["AuthorizationAccepted"]},
        target=STANDARDIZE,
    ),
    Rule(
        name="standardized-to-enrich",
        pattern={"detail-type": ["TransactionStandardized"]},
        target=ENRICH,
    ),
    Rule(
        name="enriched-to-rules",
        pattern={"detail-type": ["TransactionEnriched"]},
        target=RULES,
    ),
    Rule(
        name="approved-to-account-interface",
        pattern={"detail-type": ["TransactionApproved"]},
        target=ACCOUNT_INTERFACE,
    ),
    Rule(
        name="legs-to-assembler",
        pattern={"detail-type": ["PostingLegCreated"]},
        target=ASSEMBLER,
    ),
    Rule(
        name="alerts-to-notifications",
        pattern={"detail-type": list(ALERT_TYPES)},
        target=NOTIFICATIONS,
    ),
)

# Terminal states of an approved authorization (DESIGN §3.3) and the events that mark them.
TERMINAL_EVENTS: Mapping[str, str] = {
    "TransactionPosted": "posted",
    "DuplicateParked": "parked_duplicates",
    "TransactionHeld": "held",
    "TransactionRejected": "rejected",
    "StandardizationRejected": "rejected",
}


#: events per queue message on a transport that charges per message (`TargetConfig.bundle`):
#: an ingest batch of 5,000 records travels in ~10 messages instead of ~2,400; 250 divides
#: the fused worker's 1,000-event batches, so a batch takes whole bundles
BUNDLE_EVENTS = 250


@dataclass(frozen=True)
class PipelineSettings:
    """How the pipeline runs (FR11 modes, the posting buffer, the assembler's timeout)."""

    mode: Mode = "near-realtime"
    #: records per unit of work; None: the mode's default (1 / 250 / 5000)
    batch_size: int | None = None
    #: near-realtime: a durable target releases a partial batch after this long
    linger_ms: int = 200
    #: the buffer in front of posting (FR7): events/s; None = unlimited (still bounded by batch)
    posting_rate_limit_per_s: float | None = None
    dedup: dedup_stage.DedupConfig = field(default_factory=dedup_stage.DedupConfig)
    posting: PostingConfig = field(default_factory=PostingConfig)
    assembly_timeout_s: float = 300.0
    #: the fused stages run over a batch in chunks of this many records (one transaction
    #: still commits the whole batch): a chunk's events stay in the CPU caches from stage to
    #: stage and short-lived objects die young (DESIGN §5: "CPU work in sub-chunks of ~250")
    chunk_records: int = 250

    def records_per_batch(self) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return {"realtime": 1, "near-realtime": 250, "batch": 5000}[self.mode]

    def targets(self) -> list[TargetConfig]:
        """The bus targets, batch size and linger set by the mode (FR11). A stage queue
        bundles up to BUNDLE_EVENTS of a unit of work's events per message (NATS only)."""
        batch = self.records_per_batch()
        linger = 0 if self.mode == "realtime" else self.linger_ms
        bundle = min(max(batch, 1), BUNDLE_EVENTS)
        out = [
            TargetConfig(
                name=name,
                batch_size=max(batch, 1),
                linger_ms=linger,
                retry=STAGE_RETRY,
                bundle=bundle,
            )
            for name in STAGE_ORDER
            if name != ACCOUNT_INTERFACE
        ]
        out.append(
            TargetConfig(
                name=ACCOUNT_INTERFACE,
                batch_size=max(batch, 1),
                linger_ms=linger,
                retry=STAGE_RETRY,
                rate_limit_per_s=self.posting_rate_limit_per_s,
                bundle=bundle,
            )
        )
        out.append(TargetConfig(name=NOTIFICATIONS, batch_size=100, retry=STAGE_RETRY))
        return out


# --------------------------------------------------------------------------------------------
# Metrics: per-stage processing time per event, terminal-state counters.


#: batches a `StageMetrics` keeps samples of: past it, a uniform sample of them (a worker runs
#: for days; in realtime mode every authorization is a batch). ~2 MB per stage when full.
STAGE_SAMPLES_MAX = 20_000


@dataclass
class StageMetrics:
    events: int = 0
    seconds: float = 0.0
    #: batches seen (`sizes` and the per-event lists hold at most `max_samples` of them)
    batches: int = 0
    max_samples: int = STAGE_SAMPLES_MAX
    #: processing time per event of each batch (µs): batch time / batch size
    per_event_us: list[float] = field(default_factory=list)
    #: the same in CPU time of the thread (not inflated when other processes share the cores)
    cpu_per_event_us: list[float] = field(default_factory=list)
    #: the events of each batch: a percentile counts every event, not every batch
    #: (`weighted_percentile`), so a batch of one weighs one event, not one batch of 1,000
    sizes: list[int] = field(default_factory=list)

    def add(self, n: int, seconds: float, cpu_seconds: float = 0.0) -> None:
        if not n:
            return
        self.events += n
        self.seconds += seconds
        self.batches += 1
        sample = (seconds * 1e6 / n, cpu_seconds * 1e6 / n, n)
        if len(self.sizes) < self.max_samples:
            self.per_event_us.append(sample[0])
            self.cpu_per_event_us.append(sample[1])
            self.sizes.append(n)
            return
        # reservoir sampling: every batch so far is kept with the same chance
        slot = _SAMPLER.randrange(self.batches)
        if slot < self.max_samples:
            self.per_event_us[slot], self.cpu_per_event_us[slot], self.sizes[slot] = sample

    def p(self, q: float, *, cpu: bool = False) -> float:
        """The Q-quantile over events of the time per event (µs; CPU time with CPU)."""
        values = self.cpu_per_event_us if cpu else self.per_event_us
        return weighted_percentile(values, self.sizes, q)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (it crosses process boundaries and files); `merge` takes it back.

        Times are rounded to the nanosecond: a float's 16 or 17 digits can form a
        Luhn-valid run that every card-number scan of a file or log rightly flags."""
        return {
            "events": self.events,
            "seconds": round(self.seconds, 6),
            "batches": self.batches,
            "per_event_us": [round(x, 3) for x in self.per_event_us],
            "cpu_per_event_us": [round(x, 3) for x in self.cpu_per_event_us],
            "sizes": list(self.sizes),
        }

    def merge(self, data: Mapping[str, Any]) -> None:
        """Add another process's `to_dict` (the batches of several shards or workers)."""
        per_event, cpu, sizes = data["per_event_us"], data["cpu_per_event_us"], data["sizes"]
        if not len(per_event) == len(cpu) == len(sizes):
            raise ValueError("stage times: per_event_us, cpu_per_event_us, sizes differ in length")
        self.events += int(data["events"])
        self.seconds += float(data["seconds"])
        self.batches += int(data.get("batches", len(sizes)))
        self.per_event_us += [float(x) for x in per_event]
        self.cpu_per_event_us += [float(x) for x in cpu]
        self.sizes += [int(x) for x in sizes]


#: the reservoir's choices (seeded: a run's figures do not depend on a global random state)
_SAMPLER = random.Random(20_000)


def percentile(values: Sequence[float], q: float) -> float:
    """The Q-quantile (0..1) of VALUES by nearest rank (0.0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[rank]


def weighted_percentile(values: Sequence[float], weights: Sequence[int], q: float) -> float:
    """The Q-quantile (0..1) of VALUES where VALUES[i] counts WEIGHTS[i] times, by nearest
    rank (0.0 for none): per-batch times per event, weighted by each batch's events, give the
    quantile over events."""
    if len(values) != len(weights):
        raise ValueError(f"{len(values)} values for {len(weights)} weights")
    pairs = sorted((v, w) for v, w in zip(values, weights, strict=True) if w > 0)
    total = sum(w for _, w in pairs)
    if not total:
        return 0.0
    rank = min(total - 1, max(0, round(q * (total - 1))))
    seen = 0
    for value, weight in pairs:
        seen += weight
        if seen > rank:
            return value
    return pairs[-1][0]  # unreachable: seen reaches total > rank


# The fused path's tracking record: each unit of work that ran the stages in-process records
# the archive positions of everything it published. A delivery of one of those events to a
# stage's durable queue (a replay, a redrive) is then recognised as already processed.
FUSED_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS pipeline_fused (start INTEGER PRIMARY KEY, end INTEGER NOT NULL)"
)

COUNTERS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS pipeline_counters ("
    "name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID"
)


def _bump(conn: Any, counts: Mapping[str, int]) -> None:
    rows = [(k, v) for k, v in counts.items() if v]
    if rows:
        conn.executemany(
            "INSERT INTO pipeline_counters VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            rows,
        )


def read_counters(conn: Any) -> dict[str, int]:
    """Cumulative terminal-state and flag counters (committed with the effects they count)."""
    try:
        return dict(conn.execute("SELECT name, value FROM pipeline_counters").fetchall())
    except Exception:
        return {}


# --------------------------------------------------------------------------------------------
# The pipeline


#: A stage handler returns its outputs; an `EncodedEvents` carries each output's JSON body,
#: encoded by the stage as it appended it (hot in cache), so publish does not encode again.
StageHandler = Callable[[list[Event], UnitOfWork], Sequence[Event]]


def encoded(stage: Callable[..., object], events: list[Event], *args: Any) -> EncodedEvents:
    """Run a pure STAGE (standardize, enrich, apply_rules, create_legs) with an
    `EncodedEvents` as its sink: each output is encoded as the stage appends it, hot in the
    cache, and publish takes those bodies instead of encoding again. Both pipelines use it."""
    out = EncodedEvents()
    stage(events, *args, sink=out.append)
    return out


def wait_for_tokens(bucket: TokenBucket, n: int, sleep: Callable[[float], None]) -> None:
    """The posting buffer (FR7): wait until BUCKET gave N tokens. Back-pressure on the whole
    batch, never loss: the events wait in memory inside their uncommitted unit of work."""
    remaining = n
    while remaining > 0:
        remaining -= bucket.take(remaining)
        if remaining:
            sleep(max(bucket.wait_s(), 0.001))


def ledger_accounts(refdata: RefData) -> list[Account]:
    """Customer accounts from the reference data plus each tenant's internal accounts (one
    per currency of its accounts, home currency and FX rates)."""
    currencies: dict[str, set[str]] = {t: {s.home_currency} for t, s in refdata.tenants.items()}
    all_ccy = {c for pair in refdata.rates for c in pair}
    accounts: list[Account] = []
    for a in refdata.accounts.values():
        currencies.setdefault(a.tenant, set()).add(a.currency)
        accounts.append(Account(id=a.id, tenant=a.tenant, kind="customer", currency=a.currency))
    for tenant, ccys in sorted(currencies.items()):
        accounts += internal_accounts(tenant, sorted(ccys | all_ccy))
    return accounts


class StageFailure(Exception):
    """A stage raised on an event; carried to the durable queue with this message."""


@dataclass
class BatchOutcome:
    events_in: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    handed_to_queue: int = 0


class PureStageHandlers:
    """The handlers of the stages that touch no store (standardize, enrich, rules), shared by
    the embedded and the distributed pipeline: outputs collected into an EncodedEvents
    (`encoded`), so the bus publishes the bodies encoded as they were appended."""

    refdata: RefData
    rulebook: RuleBook

    def _standardize(self, events: list[Event], uow: UnitOfWork) -> Sequence[Event]:
        return encoded(standardize, events)

    def _enrich(self, events: list[Event], uow: UnitOfWork) -> Sequence[Event]:
        return encoded(enrich, events, self.refdata)

    def _rules(self, events: list[Event], uow: UnitOfWork) -> Sequence[Event]:
        return encoded(apply_rules, events, self.rulebook)


class Pipeline(PureStageHandlers):
    """paypost's stages wired to a bus over one SQLite database (the embedded default)."""

    def __init__(
        self,
        bus: SqliteBus,
        refdata: RefData,
        rulebook: RuleBook,
        settings: PipelineSettings | None = None,
        *,
        posting_file: Path | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.bus = bus
        self.conn = bus.conn
        self.refdata = refdata
        self.rulebook = rulebook
        self.settings = settings or PipelineSettings()
        self.posting_file = posting_file
        self.clock = clock
        self.sleep = sleep
        self.metrics: dict[str, StageMetrics] = {name: StageMetrics() for name in STAGE_ORDER}
        self.handlers: dict[str, StageHandler] = {
            DEDUP: self._dedup,
            STANDARDIZE: self._standardize,
            ENRICH: self._enrich,
            RULES: self._rules,
            ACCOUNT_INTERFACE: self._account_interface,
            ASSEMBLER: self._assembler,
        }
        self.inline = frozenset(self.handlers)
        rate = self.settings.posting_rate_limit_per_s
        self.buffer = TokenBucket(rate, clock) if rate else None
        self._installed = False
        self._writer: PostingFileWriter | None = None
        self._writer_size = -1
        # Inside a fused unit of work: actions that must come after its tracking range.
        self._deferred: list[Callable[[], object]] | None = None
        # Static account attributes kept between batches (checked against the ledger's
        # accounts version once per batch), so a chunk does not re-read its ~250 accounts.
        self._accounts = ledger_sqlite.AccountCache()

    # -- set-up ----------------------------------------------------------------------------
    def install(self) -> None:
        """Create every table, target, rule and ledger account the pipeline needs (idempotent)."""
        conn = self.conn
        with self.bus.unit_of_work():
            ingest_stage.ensure_schema(conn)
            dedup_stage.ensure_schema(conn)
            ledger_sqlite.ensure_schema(conn)
            asm.ensure_schema(conn)
            ensure_outbox_schema(conn)
            reconcile_stage.ensure_schema(conn)
            conn.execute(COUNTERS_SCHEMA)
            conn.execute(FUSED_SCHEMA)
            ledger_sqlite.create_accounts_in(conn, self.ledger_accounts())
        for target in self.settings.targets():
            self.bus.put_target(target)
        for rule in RULES_TABLE:
            self.bus.put_rule(rule)
        self._installed = True

    def ledger_accounts(self) -> list[Account]:
        """Customer accounts from the reference data plus each tenant's internal accounts."""
        return ledger_accounts(self.refdata)

    # -- stage handlers: thin adapters over the pure stages ---------------------------------
    def _dedup(self, events: list[Event], uow: UnitOfWork) -> Sequence[Event]:
        index = dedup_stage.SqliteDedupIndex(uow.conn, create=False)
        result = dedup_stage.check_duplicates(events, index, self.settings.dedup)
        index.apply(result.effects)
        return result.outputs

    def _account_interface(self, events: list[Event], uow: UnitOfWork) -> Sequence[Event]:
        if self.buffer is not None:
            wait_for_tokens(self.buffer, len(events), self.sleep)
        return encoded(create_legs, events, self.settings.posting)

    def _assembler(self, events: list[Event], uow: UnitOfWork) -> Sequence[Event]:
        store = asm.SqliteLegStore(uow.conn)
        result = asm.assemble(events, store, now_us=int(self.clock() * 1e6))
        done = asm.finish(
            result, store, partial(ledger_sqlite.post_batch_in, uow.conn, cache=self._accounts)
        )
        add_to_outbox(uow.conn, done.records)
        for letter in done.dead_letters:
            self._later(partial(uow.dead_letter, ASSEMBLER, letter.events, letter.reason))
        if done.dead_letters:
            _bump(uow.conn, {"dead_lettered": len(done.dead_letters)})
        return done.events

    # -- the fused dispatcher ---------------------------------------------------------------
    def _run_stage(
        self, uow: UnitOfWork, name: str, events: list[Event], outcome: BatchOutcome
    ) -> Sequence[Event]:
        """Run stage NAME on EVENTS inside a savepoint. If it raises, retry event by event;
        an event that fails alone goes to the stage's durable queue (retry policy, then DLQ)
        and its neighbours go on."""
        handler = self.handlers[name]
        metrics = self.metrics[name]
        conn = uow.conn
        started = time.perf_counter()
        cpu_started = time.thread_time()
        try:
            with _savepoint(conn, "stage"):
                outputs = handler(events, uow)
            metrics.add(
                len(events), time.perf_counter() - started, time.thread_time() - cpu_started
            )
            return outputs
        except Exception as exc:
            log.warning("stage.batch_failed", stage=name, events=len(events), error=repr(exc))
        outputs = EncodedEvents()
        for event in events:
            try:
                with _savepoint(conn, "event"):
                    outputs.extend(handler([event], uow))
            except Exception as exc:
                log.error(
                    "stage.event_failed",
                    stage=name,
                    event_id=event.id,
                    tenant=event.tenant,
                    **{"correlation-id": event.correlation_id},
                    error=repr(exc),
                )
                self._later(partial(uow.publish, [event], dedup=False, only={name}))
                outcome.handed_to_queue += 1
        metrics.add(len(events), time.perf_counter() - started, time.thread_time() - cpu_started)
        return outputs

    def dispatch(self, uow: UnitOfWork, published: PublishResult, outcome: BatchOutcome) -> None:
        """Run the fused stages on what PUBLISHED routed to them, until nothing is left."""
        pending = published.inline
        while pending:
            produced: dict[str, list[Event]] = {}
            for name in STAGE_ORDER:
                events = pending.pop(name, None)
                if not events:
                    continue
                outputs = self._run_stage(uow, name, events, outcome)
                if not outputs:
                    continue
                _count(outputs, outcome.counts)
                reconcile_stage.track(uow.conn, outputs)  # what came in, for FR10
                result = uow.publish(outputs, dedup=False, inline=self.inline)
                for target, evs in result.inline.items():
                    produced.setdefault(target, []).extend(evs)
            pending = produced

    def _later(self, action: Callable[[], object]) -> None:
        """Run ACTION after the fused unit of work's tracking range is recorded (so an event
        it hands to a durable queue or a DLQ is not mistaken for one already processed), or
        now on the durable path."""
        if self._deferred is None:
            action()
        else:
            self._deferred.append(action)

    @contextlib.contextmanager
    def _fused(self, uow: UnitOfWork) -> Iterator[None]:
        """Record the archive positions published inside the block as processed in-process."""
        start = uow.next_position()
        self._deferred = []
        try:
            yield
            end = uow.next_position() - 1
            if end >= start:
                uow.conn.execute("INSERT INTO pipeline_fused VALUES (?, ?)", (start, end))
            deferred = self._deferred
        finally:
            self._deferred = None
        for action in deferred:
            action()

    def process_batch(self, batch: ingest_stage.IngestBatch) -> BatchOutcome:
        """One ingest batch, end to end, in ONE unit of work (see the module docs)."""
        outcome = BatchOutcome(events_in=len(batch.events))
        with self.bus.unit_of_work() as uow:
            ingest_stage.SqliteIngestStore(uow.conn).apply(batch)
            with self._fused(uow):
                events, step = batch.events, max(self.settings.chunk_records, 1)
                for i in range(0, len(events), step):
                    published = uow.publish(events[i : i + step], dedup=True, inline=self.inline)
                    self.dispatch(uow, published, outcome)
            _bump(uow.conn, outcome.counts)
        return outcome

    def redrive(
        self, uow: UnitOfWork, events: list[Event], target: str = STANDARDIZE
    ) -> BatchOutcome:
        """Run archived EVENTS again through the fused stages from stage TARGET on, in the
        caller's unit of work (the reconciler's patch for an authorization that was accepted
        but never posted, FR10). The events are not archived again; their outputs are."""
        outcome = BatchOutcome(events_in=len(events))
        with self._fused(uow):
            self.dispatch(uow, PublishResult(inline={target: list(events)}), outcome)
        _bump(uow.conn, outcome.counts)
        return outcome

    # -- the durable path -------------------------------------------------------------------
    def stage_consumer(self, name: str) -> Consumer:
        """A durable consumer of stage NAME's queue with the same handler (workers, retries)."""
        handler = self.handlers[name]

        def handle(deliveries: Sequence[Delivery], uow: UnitOfWork) -> None:
            fresh = _not_fused(uow.conn, deliveries)
            if not fresh:
                return
            outputs = handler([d.event for d in fresh], uow)
            counts: dict[str, int] = {}
            _count(outputs, counts)
            _bump(uow.conn, counts)
            reconcile_stage.track(uow.conn, outputs)
            if outputs:
                # Downstream stages take the outputs from their queues (not inline here).
                uow.publish(outputs, dedup=False)

        return Consumer(self.bus, name, handle, sleep=self.sleep)

    def notifications_consumer(self) -> Consumer:
        """The alert channel (NFR7): every alert becomes an ERROR log line an SRE can page on."""

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

    def drain(self) -> dict[str, ConsumerStats]:
        """Consume every durable queue until it is empty (retries wait out their backoff;
        an event that keeps failing ends in its target's DLQ). Then expire posting sequences
        older than the assembler's timeout."""
        stats: dict[str, ConsumerStats] = {}
        for _ in range(3):  # a stage's outputs may land in an earlier stage's queue
            busy = False
            for name in STAGE_ORDER:
                if self.bus.pending(name):
                    busy = True
                    stats[name] = self.stage_consumer(name).run(until_idle=True)
            if not busy:
                break
        self.expire_sequences()
        if self.bus.pending(NOTIFICATIONS):
            stats[NOTIFICATIONS] = self.notifications_consumer().run(until_idle=True)
        return stats

    def expire_sequences(self) -> int:
        """Posting sequences incomplete after the timeout: alert and dead-letter (FR8)."""
        timeout_us = int(self.settings.assembly_timeout_s * 1e6)
        with self.bus.unit_of_work() as uow:
            store = asm.SqliteLegStore(uow.conn)
            result = asm.expire(store, now_us=int(self.clock() * 1e6), timeout_us=timeout_us)
            for letter in result.dead_letters:
                uow.dead_letter(ASSEMBLER, letter.events, letter.reason)
            if result.alerts:
                uow.publish(result.alerts, dedup=False)
            _bump(uow.conn, {"dead_lettered": len(result.dead_letters)})
        return len(result.dead_letters)

    # -- outputs ----------------------------------------------------------------------------
    def export_postings(self) -> int:
        """Append posted entries to the bank's posting file (batches, fsync, idempotent)."""
        if self.posting_file is None:
            return 0
        writer = self._posting_writer()
        try:
            written = export_outbox(self.conn, writer)
        except BaseException:
            self._writer = None  # reopen (and recover the file's tail) next time
            raise
        self._writer_size = _file_size(self.posting_file)
        return written

    def _posting_writer(self) -> PostingFileWriter:
        """The posting file's writer, kept between exports: opening one scans the whole file
        (its batch ids), which made periodic exports quadratic in the file's size (measured:
        0.4 s per open at 1M records; 200 opens in a 1M near-realtime run). Reopened whenever
        the file is not as this writer left it (another writer, e.g. `paypost reconcile`)."""
        assert self.posting_file is not None
        if self._writer is None or _file_size(self.posting_file) != self._writer_size:
            self._writer = PostingFileWriter(self.posting_file)
        return self._writer

    def counters(self) -> dict[str, int]:
        return read_counters(self.conn)

    # -- driving an ingest reader -------------------------------------------------------------
    def run_reader(
        self,
        reader: ingest_stage.IngestReader,
        *,
        final: bool = True,
        on_batch: Callable[[ingest_stage.IngestBatch, BatchOutcome, float], None] | None = None,
        export_every: int = 20,
    ) -> RunTotals:
        """Ingest READER to its end through the whole pipeline, batch by batch."""
        if not self._installed:
            self.install()
        totals = RunTotals()
        for n, batch in enumerate(_batches_with_gc(reader.batches(final=final)), 1):
            started = time.perf_counter()
            try:
                outcome = self.process_batch(batch)
            except BaseException:
                reader.edge.forget(e.token for e in batch.sealed_pans)
                raise
            seconds = time.perf_counter() - started
            totals.add(batch, outcome, seconds)
            if n % export_every == 0:
                self.export_postings()
            if on_batch is not None:
                on_batch(batch, outcome, seconds)
        self.export_postings()
        return totals


@dataclass
class RunTotals:
    batches: int = 0
    records: int = 0
    approved: int = 0
    declined: int = 0
    timed_out: int = 0
    quarantined: int = 0
    handed_to_queue: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    #: per authorization: seconds from its batch being read to its batch committed
    batch_latency_s: list[tuple[float, int]] = field(default_factory=list)

    def add(self, batch: ingest_stage.IngestBatch, outcome: BatchOutcome, seconds: float) -> None:
        self.batches += 1
        c = batch.counts
        self.records += c.records
        self.approved += c.approved
        self.declined += c.declined
        self.timed_out += c.timed_out
        self.quarantined += c.quarantined
        self.handed_to_queue += outcome.handed_to_queue
        for k, v in outcome.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        if batch.events:
            self.batch_latency_s.append((seconds, len(batch.events)))

    def latency_percentile_ms(self, q: float) -> float:
        """Q-quantile of per-authorization latency (read → committed), weighted by batch."""
        if not self.batch_latency_s:
            return 0.0
        ordered = sorted(self.batch_latency_s)
        total = sum(n for _, n in ordered)
        target = q * total
        seen = 0
        for seconds, n in ordered:
            seen += n
            if seen >= target:
                return seconds * 1000
        return ordered[-1][0] * 1000


def _not_fused(conn: Any, deliveries: Sequence[Delivery]) -> list[Delivery]:
    """DELIVERIES minus those whose archive position a fused unit of work already processed
    (a replay or redrive of an event the in-process stages handled: effects once)."""
    if not deliveries:
        return []
    low = min(d.position for d in deliveries)
    high = max(d.position for d in deliveries)
    ranges = conn.execute(
        "SELECT start, end FROM pipeline_fused WHERE start <= ? AND end >= ? ORDER BY start",
        (high, low),
    ).fetchall()
    if not ranges:
        return list(deliveries)
    starts = [r[0] for r in ranges]
    fresh = []
    for d in deliveries:
        i = bisect.bisect_right(starts, d.position) - 1
        if i < 0 or d.position > ranges[i][1]:
            fresh.append(d)
    return fresh


def _count(events: Iterable[Event], counts: dict[str, int]) -> None:
    flags = FLAG_DETAIL_TYPES
    for e in events:
        state = TERMINAL_EVENTS.get(e.detail_type)
        if state is not None:
            counts[state] = counts.get(state, 0) + 1
        elif e.detail_type in flags:
            key = f"flag:{e.detail_type}"
            counts[key] = counts.get(key, 0) + 1


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


@contextlib.contextmanager
def _savepoint(conn: Any, name: str) -> Iterator[None]:
    conn.execute(f"SAVEPOINT {name}")
    try:
        yield
    except BaseException:
        conn.execute(f"ROLLBACK TO {name}")
        conn.execute(f"RELEASE {name}")
        raise
    conn.execute(f"RELEASE {name}")


@contextlib.contextmanager
def tuned_gc() -> Iterator[None]:
    """Reference data and compiled rules are long-lived: freeze them out of the cyclic GC's
    scans and raise its threshold, so a big batch does not pay for rescanning them, nor for
    a young-generation collection every 700 of the objects its events are made of (DESIGN
    §5). For the process that runs the pipeline (embedded), a worker or the ingest."""
    gc.collect()
    gc.freeze()
    old = gc.get_threshold()
    gc.set_threshold(50_000, 50, 100)
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


def _batches_with_gc(
    batches: Iterator[ingest_stage.IngestBatch],
) -> Iterator[ingest_stage.IngestBatch]:
    with tuned_gc():
        yield from batches
