"""The reconciler (FR10) on the distributed backend: `paypost reconcile --backend distributed`.

The SAME classification as the embedded reconciler (`paypost.stages.reconcile.classify`, a
pure function of `Views`), over views read from the distributed pipeline's state:

- **in**: `<p>_state.reconcile_inbound` (one row per `AuthorizationAccepted`, written with the
  dedup stage's effects, `state.record_inbound`) and `<p>_state.review_outcomes` (held and
  rejected, `state.record_outcomes`);
- **ledger**: every tenant's PostgreSQL ledger (`<p>_ledger_<tenant>`: entries ⋈ legs ⋈
  accounts, grouped by entry, as the embedded query);
- **file**: the posting file the distributed job exports (DATA_DIR/postings/postings.csv) and
  `<p>_postings.assembly_posting_outbox` (records not exported yet: "queued").

The PostgreSQL views come from ONE `REPEATABLE READ` read-only transaction (one snapshot: a
worker commits acceptance, posting and outbox record together, so an authorization is wholly
in the views or wholly out). The posting file is read after it.

**In flight.** A queued JetStream message does not say cheaply which authorization it carries
(reading every queued message is O(queue)), so the reconciler asks the bus how much work is
pending (stage queues: queued + leased; the bus outbox) right after the snapshot: when any,
every accepted authorization without entry or outcome that is not dead-lettered counts as in
flight, not missing. A missing break is thus reported by a run on an idle pipeline (as at the
end of a job); dead-lettered authorizations are missing breaks with their dead letters as
evidence.

**Patches** (`apply_patches`), each in a unit of work of the `NatsBus` (ONE PostgreSQL
transaction with its `ReconciliationBreakDetected` / `...Patched` events in the bus outbox):
missing → the archived `AuthorizationAccepted` is re-driven through the real stage handlers
of the published pipeline (`runtime.load_pipeline`: the job's reference data and rules), from
standardize on, in one unit of work as the fused worker runs them (`redrive`), after the
assembler's memory of the sequence as complete is dropped; duplicate → reversal entry,
mismatch → adjustment entry (or held above the limit), both posted to the tenant's
PostgreSQL ledger with the deterministic patch entry id and queued for the posting file;
file_missing → the entry's record queued again. Breaks are recorded in
`<p>_state.reconcile_breaks`. Not built here: `--approve` of held breaks (refused by the CLI).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import psycopg
from psycopg import sql

from paypost.bus.core import ArchiveQuery
from paypost.bus.nats import NatsBus, NatsUnitOfWork, connect_db
from paypost.config import UserError
from paypost.events import Event
from paypost.ledger.model import JournalEntry, PostedEntry, PostResult
from paypost.ledger.postgres import PostgresLedger, tenant_schema
from paypost.pipeline import STAGE_ORDER, STANDARDIZE, _count
from paypost.stages import posting_file_pg
from paypost.stages import reconcile as rec
from paypost.stages.posting_file import PostingFileWriter, PostingRecord

from .pipeline import DistributedPipeline
from .runtime import DistributedSettings, load_settings, open_bus
from .state import (
    OutcomeRow,
    bump_counters,
    ensure_schema,
    outcome_rows,
    record_outcomes,
    state_schema,
)

_BREAKS_SQL = "SELECT break_id, status, entry_id, note FROM {}.reconcile_breaks"


@dataclass
class Target:
    """Where a distributed pipeline keeps its state: database, prefix, data dir."""

    settings: DistributedSettings
    data_dir: Path

    @property
    def prefix(self) -> str:
        return self.settings.prefix

    @property
    def state(self) -> str:
        return state_schema(self.prefix)

    @property
    def ledger_prefix(self) -> str:
        return f"{self.prefix}_ledger"

    @property
    def postings(self) -> str:
        return f"{self.prefix}_postings"

    @property
    def posting_file(self) -> Path:
        return self.data_dir / "postings" / "postings.csv"


def check_state(conn: psycopg.Connection[Any], target: Target) -> None:
    """A `UserError` naming the setting to fix when no distributed pipeline (of this version)
    ran under the prefix in this database."""
    schema = target.state
    row = conn.execute(
        "SELECT to_regclass(%s), to_regclass(%s)",
        (f'"{schema}".review_outcomes', f'"{schema}".reconcile_inbound'),
    ).fetchone()
    conn.rollback()
    where = f"{conn.info.host}:{conn.info.port}/{conn.info.dbname}"
    if row is None or row[0] is None:
        raise UserError(
            f"no distributed paypost state for prefix {target.prefix!r} in PostgreSQL {where} "
            f"(schema {schema!r}): nothing to reconcile. Run the pipeline there first (paypost "
            "run --backend distributed), or set PAYPOST_PREFIX (or --prefix, or `prefix` in "
            "the config file) to the prefix it ran with, or PAYPOST_DB_URL to its database."
        )
    if row[1] is None:
        raise UserError(
            f"the distributed state {schema!r} in PostgreSQL {where} has no record of accepted "
            "authorizations (reconcile_inbound): it was created by an older paypost. Run the "
            "pipeline with this version (paypost run --backend distributed), which records "
            "them from then on."
        )


# --------------------------------------------------------------------------------------------
# The views


def ledger_schemas(conn: psycopg.Connection[Any], ledger_prefix: str) -> dict[str, str]:
    """tenant -> its ledger schema, for every tenant with a ledger under LEDGER_PREFIX."""
    out: dict[str, str] = {}
    for (name,) in conn.execute(
        "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relname = 'ledger_tenant' AND n.nspname LIKE %s ORDER BY 1",
        (ledger_prefix.replace("_", "\\_") + "\\_%",),
    ).fetchall():
        for (tenant,) in conn.execute(
            sql.SQL("SELECT tenant FROM {}.ledger_tenant").format(sql.Identifier(name))
        ).fetchall():
            if tenant_schema(ledger_prefix, tenant) == name:
                out[str(tenant)] = str(name)
    return out


_ENTRY_SQL = """
SELECT e.pk, e.id, e.booked_at, e.sequence_id, e.reversal_of,
       e.metadata ->> 'transaction_ref',
       e.metadata #>> '{{reconciliation,break_id}}',
       e.metadata #>> '{{reconciliation,adjusts}}',
       SUM(CASE WHEN a.role = 'settlement' THEN l.amount ELSE 0 END),
       MAX(CASE WHEN a.role = 'settlement' THEN a.currency END),
       MIN(CASE WHEN a.kind = 'customer' THEN a.id END),
       MIN(CASE WHEN a.kind = 'customer' THEN a.currency END)
FROM {s}.ledger_entries e
JOIN {s}.ledger_legs l ON l.entry_pk = e.pk
JOIN {s}.ledger_accounts a ON a.pk = l.account_pk
GROUP BY e.pk
ORDER BY e.pk
"""


def _entries(
    conn: psycopg.Connection[Any], tenant: str, schema: str, days: dict[int, str]
) -> list[rec.EntryView]:
    out: list[rec.EntryView] = []
    query = sql.SQL(_ENTRY_SQL).format(s=sql.Identifier(schema))
    with conn.cursor() as cur:
        cur.execute(query)
        out += [rec.entry_view(tenant, row, days) for row in cur]
    return out


def load_views(
    conn: psycopg.Connection[Any],
    target: Target,
    scope: rec.Scope,
    *,
    check_file: bool = True,
    pending: Callable[[], int] | None = None,
    dead_letters: dict[tuple[str, str], list[dict[str, Any]]] | None = None,
    progress: rec.Progress = rec.no_progress,
) -> rec.Views:
    """The reconciler's views of a distributed pipeline (read-only; see the module docs).
    PENDING (the bus's count of work in flight) is asked right after the snapshot;
    DEAD_LETTERS: (tenant, authorization) -> the dead letters of its events."""
    dead = dead_letters or {}
    tenant = scope.tenant
    s = sql.Identifier(target.state)
    conn.rollback()
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    try:
        with conn.transaction():
            progress("authorizations in", 0, 0)
            where = sql.SQL(
                " WHERE (%(t)s::text IS NULL OR tenant = %(t)s)"
                " AND (%(f)s::text IS NULL OR day >= %(f)s)"
                " AND (%(l)s::text IS NULL OR day <= %(l)s)"
            )
            args = {"t": tenant, "f": scope.first_day, "l": scope.last_day}
            inbound: list[rec.InboundAuth] = []
            seen: set[tuple[str, str]] = set()
            for t, auth, acc, day, amount, ccy in conn.execute(
                sql.SQL(
                    "SELECT tenant, auth_id, accepted_id, day, amount, currency "
                    "FROM {}.reconcile_inbound"
                ).format(s)
                + where
                + sql.SQL(" ORDER BY tenant, day, auth_id, accepted_id"),
                args,
            ):
                if (t, auth) in seen:
                    continue  # two acceptances of one authorization: one authorization
                seen.add((t, auth))
                inbound.append(
                    rec.InboundAuth(
                        tenant=t,
                        auth_id=auth,
                        accepted_id=acc,
                        day=day,
                        amount=int(amount),
                        currency=ccy,
                    )
                )
            progress("authorizations in", len(inbound), len(inbound))
            outcomes: dict[tuple[str, str], tuple[str, str | None]] = {}
            for t, auth, st, reason in conn.execute(
                sql.SQL("SELECT tenant, auth_id, state, reason FROM {}.review_outcomes").format(s)
                + sql.SQL(" WHERE (%(t)s::text IS NULL OR tenant = %(t)s) ORDER BY seq"),
                {"t": tenant},
            ):
                outcomes.setdefault((t, auth), (st, reason))
            entries: list[rec.EntryView] = []
            days: dict[int, str] = {}
            for t, schema in ledger_schemas(conn, target.ledger_prefix).items():
                if tenant is None or t == tenant:
                    entries += _entries(conn, t, schema, days)
                    progress("ledger entries", len(entries), 0)
            queued: set[tuple[str, str]] = set()
            high_water = 0
            postings = sql.Identifier(target.postings)
            if check_file and _exists(conn, f'"{target.postings}".assembly_posting_outbox'):
                dec = msgspec.json.Decoder(PostingRecord)
                for (blob,) in conn.execute(
                    sql.SQL("SELECT record FROM {}.assembly_posting_outbox").format(postings)
                ):
                    r = dec.decode(bytes(blob))
                    queued.add((r.tenant, r.entry_id))
                # The last outbox id handed out (exported rows are deleted, so not max(id)).
                row = conn.execute(
                    "SELECT last_value FROM pg_sequences WHERE schemaname = %s "
                    "AND sequencename = %s",
                    (target.postings, "assembly_posting_outbox_id_seq"),
                ).fetchone()
                high_water = int(row[0]) if row is not None and row[0] is not None else 0
            breaks: dict[str, tuple[str, str | None, str | None]] = {}
            if _exists(conn, f'"{target.state}".reconcile_breaks'):
                for bid, status, entry_id, note in conn.execute(sql.SQL(_BREAKS_SQL).format(s)):
                    breaks[bid] = (status, entry_id, note)
    finally:
        conn.read_only = False
        conn.isolation_level = None
    busy = pending() if pending is not None else 0
    in_flight: set[tuple[str, str]] = set()
    if busy:
        in_flight = {(a.tenant, a.auth_id) for a in inbound} - set(dead)
    views = rec.Views(
        inbound=inbound,
        outcomes=outcomes,
        entries=entries,
        file_records=None,
        queued_entries=queued,
        outbox_high_water=high_water,
        in_flight=in_flight,
        dead_letters={k: v for k, v in dead.items() if tenant is None or k[0] == tenant},
        breaks=breaks,
    )
    if check_file:
        path = target.posting_file
        views.file_records = (
            rec.read_posting_file(path, tenant, progress, snapshot_outbox_id=high_water)
            if path.exists()
            else []
        )
    return views


def _exists(conn: psycopg.Connection[Any], qualified: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s)", (qualified,)).fetchone()
    return row is not None and row[0] is not None


def bus_pending(bus: NatsBus) -> int:
    """Events on their way: queued or leased in a stage queue, or in the bus outbox."""
    return sum(bus.pending(name) for name in STAGE_ORDER) + bus.outbox_size()


def dead_letters_of(bus: NatsBus) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(tenant, authorization) -> its dead letters (one scan of the DLQ stream)."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for dl in bus.dlq_list():
        ev = dl.event
        out.setdefault((ev.tenant, ev.correlation_id), []).append(
            {"target": dl.target, "event_id": ev.id, "error": dl.error}
        )
    return out


# --------------------------------------------------------------------------------------------
# One reconciliation


@dataclass
class Reconciler:
    """The connections a distributed reconciliation uses: a read connection (the snapshot),
    the bus (pending work, dead letters, units of work for patches) and the ledger."""

    target: Target
    conn: psycopg.Connection[Any]
    bus: NatsBus
    ledger: PostgresLedger

    def close(self) -> None:
        self.ledger.close()
        self.bus.close()
        self.conn.close()

    def tenants(self) -> list[str]:
        try:
            return sorted(ledger_schemas(self.conn, self.target.ledger_prefix))
        finally:
            self.conn.rollback()

    def report(
        self,
        scope: rec.Scope,
        config: rec.ReconcileConfig,
        progress: rec.Progress = rec.no_progress,
    ) -> rec.Report:
        """Load the views and classify them (read-only): the dry run."""
        import time

        started = time.perf_counter()
        views = load_views(
            self.conn,
            self.target,
            scope,
            check_file=config.check_posting_file,
            pending=lambda: bus_pending(self.bus),
            dead_letters=dead_letters_of(self.bus),
            progress=progress,
        )
        progress("classifying", 0, 0)
        report = rec.classify(views, config, scope)
        report.seconds = round(time.perf_counter() - started, 3)
        return report

    def export(self) -> int:
        """Write committed posting records to the data dir's posting file (as the job)."""
        path = self.target.posting_file
        path.parent.mkdir(parents=True, exist_ok=True)
        with psycopg.connect(self.target.settings.db_url) as conn:
            return posting_file_pg.export_outbox(
                conn, PostingFileWriter(path), schema=self.target.postings
            )


@contextmanager
def open_reconciler(
    data_dir: Path,
    config: Path | None = None,
    *,
    bus_url: str | None = None,
    db_url: str | None = None,
    prefix: str | None = None,
) -> Iterator[Reconciler]:
    """A `Reconciler` on the database and prefix the distributed settings name; a
    `UserError` naming PAYPOST_DB_URL (unreachable), PAYPOST_PREFIX (no state under that
    prefix) or PAYPOST_BUS_URL (NATS unreachable)."""
    settings = load_settings(config, bus_url=bus_url, db_url=db_url, prefix=prefix)
    target = Target(settings=settings, data_dir=data_dir)
    conn = connect_db(settings.db_url)
    try:
        check_state(conn, target)
        bus = open_bus(settings, sweep=False)
    except BaseException:
        conn.close()
        raise
    try:
        ledger = PostgresLedger(settings.db_url, prefix=target.ledger_prefix)
    except BaseException:
        bus.close()
        conn.close()
        raise
    reconciler = Reconciler(target=target, conn=conn, bus=bus, ledger=ledger)
    try:
        yield reconciler
    finally:
        reconciler.close()


# --------------------------------------------------------------------------------------------
# Patches


@dataclass
class PostgresBreakStore:
    """`rec.BreakStore` of the distributed backend: breaks in `<p>_state.reconcile_breaks`,
    units of work of the `NatsBus`, the tenants' PostgreSQL ledgers, the postings outbox."""

    r: Reconciler
    #: the re-driving pipeline's assembler schema (set when the pipeline is built)
    assembly_schema: str | None = None

    @property
    def schema(self) -> str:
        return self.r.target.state

    def unit_of_work(self) -> Any:
        return self.r.bus.unit_of_work()

    def ensure_schema(self, uow: Any) -> None:
        ensure_schema(uow.conn, self.schema)  # reconcile_breaks, on a state from before it

    def record(self, uow: Any, breaks: Sequence[rec.Break]) -> list[rec.Break]:
        rows = uow.conn.execute(
            sql.SQL(
                "INSERT INTO {}.reconcile_breaks (break_id, tenant, kind, status, action, "
                "evidence, note, detected_at) SELECT u.*, %s FROM unnest(%s::text[], "
                "%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[]) AS u "
                "ON CONFLICT DO NOTHING RETURNING break_id"
            ).format(sql.Identifier(self.schema)),
            (
                rec.now_text(),
                [b.break_id for b in breaks],
                [b.tenant for b in breaks],
                [b.kind for b in breaks],
                ["held" if b.action == "hold" else "open" for b in breaks],
                [b.action for b in breaks],
                [msgspec.json.encode(b.evidence).decode() for b in breaks],
                [b.reason for b in breaks],
            ),
        ).fetchall()
        new = {r[0] for r in rows}
        return [b for b in breaks if b.break_id in new]

    def mark(
        self,
        uow: Any,
        b: rec.Break,
        status: str,
        entry_id: str | None,
        note: str | None,
        action: str,
    ) -> None:
        uow.conn.execute(
            sql.SQL(
                "UPDATE {}.reconcile_breaks SET status = %s, entry_id = %s, note = %s, "
                "action = %s, patched_at = CASE WHEN %s = 'patched' THEN %s ELSE patched_at "
                "END WHERE break_id = %s"
            ).format(sql.Identifier(self.schema)),
            (status, entry_id, note, action, status, rec.now_text(), b.break_id),
        )

    def get_entry(self, uow: Any, tenant: str, entry_id: str) -> PostedEntry | None:
        return self.r.ledger.get_entry(tenant, entry_id)

    def post(self, uow: Any, entry: JournalEntry) -> PostResult:
        return self.r.ledger.post_batch_in(uow.conn, [entry])[0]

    def queue(self, uow: Any, records: list[PostingRecord]) -> None:
        posting_file_pg.add_to_outbox(uow.conn, records, self.r.target.postings)

    def trial_balance_zero(self, tenant: str) -> bool:
        return trial_balance_zero(self.r, tenant)

    def archived(self, event_ids: Sequence[str]) -> dict[str, Event]:
        return archived_events(self.r.bus, event_ids)

    def has_entry(self, uow: Any, tenant: str, entry_id: str) -> bool:
        return _entry_exists(uow.conn, self.r, tenant, entry_id)

    def forget_complete(self, uow: Any, sequence_ids: list[str]) -> None:
        assert self.assembly_schema is not None
        uow.conn.execute(
            sql.SQL(
                "DELETE FROM {}.assembly_sequences WHERE state = 'complete' AND "
                "sequence_id = ANY(%s)"
            ).format(sql.Identifier(self.assembly_schema)),
            (sequence_ids,),
        )

    def outbox_high_water(self, uow: Any) -> int | None:
        row = uow.conn.execute(
            sql.SQL("SELECT COALESCE(MAX(id), 0) FROM {}.assembly_posting_outbox").format(
                sql.Identifier(self.r.target.postings)
            )
        ).fetchone()
        return int(row[0]) if row is not None else 0

    def drop_queued(self, uow: Any, after: int, entry_ids: list[str]) -> None:
        uow.conn.execute(
            sql.SQL(
                "DELETE FROM {}.assembly_posting_outbox WHERE id > %s AND "
                "convert_from(record, 'UTF8')::jsonb ->> 'entry_id' = ANY(%s)"
            ).format(sql.Identifier(self.r.target.postings)),
            (after, entry_ids),
        )

    def ended(self, uow: Any, tenant: str, auth_id: str) -> tuple[str, str | None] | None:
        row = uow.conn.execute(
            sql.SQL(
                "SELECT state, reason FROM {}.review_outcomes WHERE tenant = %s AND "
                "auth_id = %s ORDER BY seq DESC LIMIT 1"
            ).format(sql.Identifier(self.schema)),
            (tenant, auth_id),
        ).fetchone()
        return None if row is None else (row[0], row[1])


def apply_patches(
    r: Reconciler,
    report: rec.Report,
    *,
    config: rec.ReconcileConfig | None = None,
    redriver: Callable[[], DistributedPipeline] | None = None,
    export: bool = True,
    progress: rec.Progress = rec.no_progress,
) -> rec.PatchOutcome:
    """Carry out REPORT's patch plan where the distributed backend can (see the module docs):
    the embedded reconciler's flow (`rec.run_patches`) on a `PostgresBreakStore`; idempotent:
    break ids, patch entry ids and event ids are derived, and the ledger posts an entry id
    once."""

    store = PostgresBreakStore(r)

    def build() -> rec.Redriver:
        assert redriver is not None
        pipeline = redriver()
        store.assembly_schema = pipeline.assembly_schema

        def drive(uow: Any, events: list[Event]) -> None:
            assert isinstance(uow, NatsUnitOfWork)
            redrive(pipeline, uow, events)

        return drive

    return rec.run_patches(
        store,
        report,
        config=config,
        redrive=None if redriver is None else build,
        export=r.export if export else None,
        progress=progress,
    )


def trial_balance_zero(r: Reconciler, tenant: str) -> bool:
    try:
        return r.ledger.trial_balance(tenant).balanced
    except AssertionError:  # the ledger asserts a zero trial balance on read
        return False


# --------------------------------------------------------------------------------------------
# Re-driving missing authorizations


def redrive(pipeline: DistributedPipeline, uow: NatsUnitOfWork, events: list[Event]) -> None:
    """Run archived `AuthorizationAccepted` EVENTS through the real stage handlers from
    standardize on, in the caller's unit of work, as the fused worker runs a batch (a stage
    that fails on an event hands it to that stage's durable queue); counters and held /
    rejected outcomes are recorded as the workers record them."""
    inline = frozenset(pipeline.handlers)
    counts: dict[str, int] = {}
    outcomes: list[OutcomeRow] = []
    pending: dict[str, list[Event]] = {STANDARDIZE: list(events)}
    while pending:
        produced: dict[str, list[Event]] = {}
        for name in STAGE_ORDER:
            batch = pending.pop(name, None)
            if not batch:
                continue
            outputs = pipeline._run_isolated(uow, name, batch)
            if not outputs:
                continue
            _count(outputs, counts)
            outcome_rows(outputs, into=outcomes)
            result = uow.publish(outputs, dedup=False, inline=inline)
            for target, evs in result.inline.items():
                produced.setdefault(target, []).extend(evs)
        pending = produced
    bump_counters(uow.conn, pipeline.state_schema, counts)
    record_outcomes(uow.conn, pipeline.state_schema, outcomes)


def archived_events(bus: NatsBus, event_ids: Sequence[str]) -> dict[str, Event]:
    """The archived `AuthorizationAccepted` events with these ids (one archive scan)."""
    import time

    wanted = set(event_ids)
    found: dict[str, Event] = {}
    if not wanted:
        return found
    query = ArchiveQuery(
        start=0.0,
        end=time.time() + 3600,
        pattern={"detail-type": ["AuthorizationAccepted"], "id": sorted(wanted)},
    )
    for archived in bus.archive(query):
        ev = archived.event
        if ev.id in wanted and ev.id not in found:
            found[ev.id] = ev
    return found


def _entry_exists(conn: psycopg.Connection[Any], r: Reconciler, tenant: str, entry_id: str) -> bool:
    schema = r.ledger.schema(tenant)
    if not _exists(conn, f'"{schema}".ledger_entries'):
        return False
    row = conn.execute(
        sql.SQL("SELECT 1 FROM {}.ledger_entries WHERE id = %s").format(sql.Identifier(schema)),
        (entry_id,),
    ).fetchone()
    return row is not None
