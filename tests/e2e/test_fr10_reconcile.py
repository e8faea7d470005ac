"""FR10 and NFR3 proof.

FR10: after a demo-like run, each kind of break injected into the database is detected with its
evidence, patched through the real pipeline and the ledger (never a hand-made
posting), and the ledger ends equal to the authorizations, with a zero trial balance and every
account's balance equal to a run without faults. Patching twice changes nothing.

NFR3 / FR9: replaying the whole archive to the whole bus (twice) and redriving dead-letter
queues, through the real stage consumers, never posts an authorization twice: ledger entries,
balances and the posting file stay as they were, the trial balance stays zero and the
reconciler finds no break."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ledger_surgery import delete_sqlite_entry
from paypost.bus.core import ArchiveQuery, UnitOfWork, decode_event
from paypost.demo import demo_inputs
from paypost.events import Event, derive_event_id
from paypost.ledger import sqlite as ledger_sqlite
from paypost.ledger.model import JournalEntry, Leg
from paypost.money import Money
from paypost.pipeline import (
    ACCOUNT_INTERFACE,
    ASSEMBLER,
    DEDUP,
    STAGE_ORDER,
    STANDARDIZE,
    PipelineSettings,
)
from paypost.runner import POSTING_FILE, Job
from paypost.stages import reconcile as rec
from paypost.stages.posting_file import add_to_outbox, record_for, verify_file
from paypost.stages.rules import default_rules_text, parse_rules, variables_from_tenants

KEY = bytes(range(32))
EVENTS = 1500
SEED = 5
TENANTS = ("de-bank", "euro-bank", "uk-bank")

Handler = Callable[[list[Event], UnitOfWork], list[Event]]


@contextmanager
def demo_job(
    data_dir: Path, wrap: Callable[[Handler], Handler] | None = None, events: int = EVENTS
) -> Iterator[Job]:
    """A Job after a demo run of EVENTS authorizations (the account interface optionally
    wrapped by a fault injector during the run only); closed on exit."""
    with demo_inputs(events, KEY, seed=SEED) as inputs:
        refdata = inputs.generated.refdata
        book = parse_rules(
            default_rules_text(), tenant_variables=variables_from_tenants(refdata.tenants.values())
        )
        job = Job(data_dir, refdata, book, PipelineSettings(), KEY)
        try:
            original = job.pipeline.handlers[ACCOUNT_INTERFACE]
            if wrap is not None:
                job.pipeline.handlers[ACCOUNT_INTERFACE] = wrap(original)
            job.run(inputs.sources)
            job.pipeline.handlers[ACCOUNT_INTERFACE] = original
            yield job
        finally:
            job.close()


class Faults:
    """Fault injection in the account interface's outputs (same-currency, two-leg postings):
    the legs of one transaction are dropped before posting (its processing lost after the
    authorization was accepted), and one transaction's legs carry a wrong amount."""

    def __init__(self, *, skip: int = 40, delta: int = 37) -> None:
        self.skip = skip
        self.delta = delta
        self.seen = 0
        self.dropped: list[str] = []  # correlation ids
        self.altered: list[str] = []

    def wrap(self, inner: Handler) -> Handler:
        def handler(events: list[Event], uow: UnitOfWork) -> list[Event]:
            out: list[Event] = []
            for event in inner(events, uow):
                d = event.detail
                if event.detail_type != "PostingLegCreated" or d["leg_count"] != 2:
                    out.append(event)
                    continue
                if d["leg_index"] == 0:
                    self.seen += 1
                target = self.seen - self.skip
                if target == 0 and (event.correlation_id not in self.altered):
                    if event.correlation_id not in self.dropped:
                        self.dropped.append(event.correlation_id)
                    continue  # dropped: never reaches the assembler
                if target == 1:
                    if event.correlation_id not in self.altered:
                        self.altered.append(event.correlation_id)
                    amount = dict(d["amount"], minor=d["amount"]["minor"] + self.delta)
                    event = msgspec.structs.replace(event, detail={**d, "amount": amount})
                out.append(event)
            return out

        return handler


def balances(conn: Any) -> dict[tuple[str, str], int]:
    rows = conn.execute(
        "SELECT a.tenant, a.id, b.balance FROM ledger_balances b "
        "JOIN ledger_accounts a ON a.pk = b.account_pk"
    ).fetchall()
    return {(t, a): bal for t, a, bal in rows if bal}


def entry_count(conn: Any) -> int:
    return int(conn.execute("SELECT count(*) FROM ledger_entries").fetchone()[0])


def trial_balance_zero(conn: Any) -> bool:
    return all(ledger_sqlite.trial_balance_in(conn, t).balanced for t in TENANTS)


def archived(conn: Any, detail_type: str) -> int:
    (n,) = conn.execute(
        "SELECT count(*) FROM bus_archive WHERE CAST(body AS TEXT) LIKE ?",
        (f'%"detail-type":"{detail_type}"%',),
    ).fetchone()
    return int(n)


def entry_of(conn: Any, correlation_id: str) -> tuple[str, str]:
    """(tenant, expected entry id) of the authorization with this correlation id."""
    tenant, accepted = conn.execute(
        "SELECT tenant, accepted_id FROM reconcile_inbound WHERE auth_id = ?", (correlation_id,)
    ).fetchone()
    return tenant, rec.expected_entry_id(tenant, accepted)


def delete_posting(job: Job, tenant: str, entry_id: str) -> None:
    """A posting the ledger lost (e.g. restored from an older backup): entry, legs and their
    effect on the balances gone; the assembler still remembers the sequence as complete."""
    with job.bus.unit_of_work() as uow:
        delete_sqlite_entry(uow.conn, tenant, entry_id)


def post_copy(job: Job, entry: JournalEntry) -> None:
    """Post ENTRY in the ledger and send it to the bank's posting file (a faulty writer)."""
    with job.bus.unit_of_work() as uow:
        [result] = ledger_sqlite.post_batch_in(uow.conn, [entry])
        assert result.status == "posted"
        add_to_outbox(uow.conn, [record_for(entry)])
    job.pipeline.export_postings()


def duplicate_posting(job: Job, tenant: str, entry_id: str) -> str:
    original = ledger_sqlite.get_entry_in(job.bus.conn, tenant, entry_id)
    assert original is not None
    copy_id = derive_event_id(entry_id, "test-duplicate")
    post_copy(
        job,
        JournalEntry(
            id=copy_id,
            tenant=tenant,
            legs=tuple(
                Leg(account=lg.account, side=lg.side, amount=lg.amount) for lg in original.legs
            ),
            sequence_id=original.sequence_id,
            source_event_id=original.source_event_id,
            booked_at=original.booked_at,
            description=original.description,
            metadata=original.metadata,
        ),
    )
    return copy_id


def orphan_posting(job: Job, tenant: str, account: str, currency: str) -> str:
    orphan_id = derive_event_id("an orphan", "test-orphan")
    post_copy(
        job,
        JournalEntry(
            id=orphan_id,
            tenant=tenant,
            legs=(
                Leg(account=account, side="debit", amount=Money(4242, currency)),
                Leg(account=f"settlement-{currency}", side="credit", amount=Money(4242, currency)),
            ),
            sequence_id=derive_event_id("no such transaction", "posting-sequence"),
            description="posted by hand, no authorization",
            metadata={"roles": ["customer", "settlement"]},
        ),
    )
    return orphan_id


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], int]:
    """Every account's balance after the same run without any fault."""
    with demo_job(tmp_path_factory.mktemp("reference")) as job:
        report = rec.reconcile(job.bus.conn, posting_file=job.data_dir / POSTING_FILE)
        assert report.breaks == [] and report.counts["matched"] > 0
        return balances(job.bus.conn)


def _reconcile(job: Job) -> rec.Report:
    return rec.reconcile(job.bus.conn, posting_file=job.data_dir / POSTING_FILE)


def _patch(job: Job, report: rec.Report) -> rec.PatchOutcome:
    return rec.apply_patches(
        job.bus,
        report,
        redrive=lambda: job.pipeline.redrive,
        export=job.pipeline.export_postings,
    )


def test_fr10_demo_reconciles_with_zero_breaks(tmp_path: Path) -> None:
    with demo_job(tmp_path) as job:
        report = _reconcile(job)
        c = report.counts
        assert report.breaks == [] and report.open_breaks == 0
        assert c["matched"] == report.entries == report.file_records
        assert c["matched"] + c["held"] + c["rejected"] == report.authorizations
        assert c["held"] > 0 and c["rejected"] > 0  # the demo's high-value holds, rejections
        for day in report.days:  # per tenant and day: authorized == posted, per currency
            assert day.authorized == day.posted and day.breaks == {}
        # A database from before the reconciler's record: filled once from the archive.
        with job.bus.unit_of_work() as uow:
            uow.conn.execute("DELETE FROM reconcile_inbound")
            uow.conn.execute("DELETE FROM reconcile_outcomes")
            assert rec.backfill_from_archive(uow.conn) == report.authorizations
            assert rec.backfill_from_archive(uow.conn) == 0
        again = _reconcile(job)
        assert again.breaks == [] and again.counts == report.counts


def test_fr10_every_break_detected_patched_and_ledger_equals_authorizations(
    tmp_path: Path, reference: dict[tuple[str, str], int]
) -> None:
    faults = Faults()
    with demo_job(tmp_path, faults.wrap) as job:
        conn = job.bus.conn
        assert len(faults.dropped) == 1 and len(faults.altered) == 1
        # Inject the ledger-side breaks on three other postings.
        posted = [
            row[0]
            for row in conn.execute("SELECT auth_id FROM reconcile_inbound ORDER BY seq").fetchall()
            if ledger_sqlite.get_entry_in(conn, *entry_of(conn, row[0])) is not None
            and row[0] not in faults.altered
        ]
        lost_auth, dup_auth = posted[100], posted[200]
        lost_tenant, lost_entry = entry_of(conn, lost_auth)
        delete_posting(job, lost_tenant, lost_entry)
        dup_tenant, dup_entry = entry_of(conn, dup_auth)
        copy_id = duplicate_posting(job, dup_tenant, dup_entry)
        customer = conn.execute(
            "SELECT id, currency FROM ledger_accounts WHERE tenant = 'uk-bank' "
            "AND kind = 'customer' ORDER BY pk LIMIT 1"
        ).fetchone()
        orphan_id = orphan_posting(job, "uk-bank", customer[0], customer[1])
        assert trial_balance_zero(conn)  # every injected break is itself balanced
        entries_before = entry_count(conn)

        # Dry run: every break found, with its evidence; nothing changes.
        report = _reconcile(job)
        by_kind: dict[str, list[rec.Break]] = {}
        for b in report.breaks:
            by_kind.setdefault(b.kind, []).append(b)
        assert sorted(by_kind) == ["duplicate", "mismatch", "missing", "orphan"]
        missing = {b.evidence["authorization_id"]: b for b in by_kind["missing"]}
        assert set(missing) == {faults.dropped[0], lost_auth}
        assert missing[lost_auth].evidence["expected_entry_id"] == lost_entry
        assert missing[lost_auth].evidence["in_posting_file"] is True
        assert missing[faults.dropped[0]].evidence["in_posting_file"] is False
        [dup] = by_kind["duplicate"]
        assert dup.evidence["kept_entry_id"] == dup_entry
        assert dup.evidence["duplicate_entry_id"] == copy_id and dup.action == "reverse"
        [mismatch] = by_kind["mismatch"]
        assert mismatch.evidence["authorization_id"] == faults.altered[0]
        assert mismatch.evidence["difference"]["minor"] == -faults.delta  # over-posted
        assert mismatch.action == "adjust"
        [orphan] = by_kind["orphan"]
        assert orphan.evidence["entry_id"] == orphan_id and orphan.action == "hold"
        assert entry_count(conn) == entries_before

        # Real run: patched through the pipeline and the ledger.
        outcome = _patch(job, report)
        assert (outcome.patched, outcome.held, outcome.failed) == (4, 1, 0)
        assert outcome.detected == 5 and outcome.trial_balance_zero
        assert archived(conn, "ReconciliationBreakDetected") == 5
        assert archived(conn, "ReconciliationBreakPatched") == 4
        # Two re-driven postings, one reversal, one adjustment.
        assert entry_count(conn) == entries_before + 4
        for tenant, entry_id in ((lost_tenant, lost_entry), entry_of(conn, faults.dropped[0])):
            entry = ledger_sqlite.get_entry_in(conn, tenant, entry_id)
            assert entry is not None and entry.sequence_id == entry_id  # by the assembler
        reversal = ledger_sqlite.get_entry_in(conn, dup_tenant, dup.patch_entry_id or "")
        assert reversal is not None and reversal.reversal_of == copy_id
        assert reversal.metadata["reconciliation"]["break_id"] == dup.break_id

        after = _reconcile(job)
        assert [b.kind for b in after.breaks] == ["orphan"]
        assert after.breaks[0].status == "held"

        # Patching twice changes nothing.
        state = (entry_count(conn), balances(conn))
        again = _patch(job, after)
        assert (again.patched, again.detected, again.entries_posted) == (0, 0, 0)
        assert (entry_count(conn), balances(conn)) == state
        assert archived(conn, "ReconciliationBreakDetected") == 5

        # The orphan awaits review; approving it reverses it.
        approved = rec.approve(job.bus, orphan.break_id, export=job.pipeline.export_postings)
        assert approved.patched == 1
        assert rec.approve(job.bus, orphan.break_id).unchanged == 1
        final = _reconcile(job)
        assert final.breaks == [] and final.open_breaks == 0
        # The ledger equals the authorizations: every balance as in a run without faults.
        assert balances(conn) == reference
        assert trial_balance_zero(conn)
        for day in final.days:
            assert day.authorized == day.posted
        # The bank's file holds every entry once (patches included) and is sound.
        check = verify_file(job.data_dir / POSTING_FILE)
        assert check.ok, check.problems
        assert final.file_records == entry_count(conn)


def test_fr10_missing_posting_of_a_dead_letter_is_redriven_once(tmp_path: Path) -> None:
    """An authorization whose posting failed until the DLQ is reported with the dead letter as
    evidence; re-driving it posts it once, and running the reconciler again posts nothing."""
    victim: list[Event] = []

    def wrap(inner: Handler) -> Handler:
        def handler(events: list[Event], uow: UnitOfWork) -> list[Event]:
            if not victim and len(events) > 1:
                victim.append(events[7])
                uow.dead_letter(ACCOUNT_INTERFACE, [events[7]], "RuntimeError: core offline")
                events = events[:7] + events[8:]
            return inner(events, uow)

        return handler

    with demo_job(tmp_path, wrap, events=600) as job:
        conn = job.bus.conn
        report = _reconcile(job)
        [b] = report.breaks
        assert b.kind == "missing" and b.evidence["authorization_id"] == victim[0].correlation_id
        assert b.evidence["dead_letters"][0]["target"] == ACCOUNT_INTERFACE
        assert "core offline" in b.evidence["dead_letters"][0]["error"]
        entries = entry_count(conn)
        outcome = _patch(job, report)
        assert outcome.patched == 1 and entry_count(conn) == entries + 1
        # Redriving the DLQ afterwards (an operator) posts nothing again.
        assert job.bus.dlq_redrive() == 1
        job.pipeline.drain()
        assert entry_count(conn) == entries + 1
        assert _reconcile(job).breaks == [] and trial_balance_zero(conn)


def test_fr10_cli_after_demo_reports_zero_breaks(tmp_path: Path) -> None:
    data = tmp_path / "d"
    cli = [sys.executable, "-m", "paypost"]
    demo = subprocess.run(
        [*cli, "demo", "--events", "400", "--data-dir", str(data), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert demo.returncode == 0, demo.stderr
    dry = subprocess.run(
        [*cli, "reconcile", "--data-dir", str(data), "--json", "--dry-run"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert dry.returncode == 0, dry.stderr
    doc = json.loads(dry.stdout)
    assert doc["dry_run"] is True and doc["breaks_total"] == 0 and doc["breaks"] == []
    assert doc["counts"]["matched"] == doc["entries"] > 0
    real = subprocess.run(
        [*cli, "reconcile", "--data-dir", str(data), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert real.returncode == 0, real.stderr
    assert json.loads(real.stdout)["outcome"]["trial_balance_zero"] is True
    loop = subprocess.run(
        [*cli, "reconcile", "--data-dir", str(data), "--json", "--every", "0.1", "--max-runs", "2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert loop.returncode == 0, loop.stderr
    runs = [json.loads(line) for line in loop.stdout.splitlines()]
    assert len(runs) == 2 and all(r["breaks_total"] == 0 for r in runs)
    for bad in (["--approve", "no-such-break"], ["--tenant", "nobody"], ["--from", "yesterday"]):
        refused = subprocess.run(
            [*cli, "reconcile", "--data-dir", str(data), *bad],
            capture_output=True,
            text=True,
            check=False,
        )
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert bad[1] in refused.stderr
    nothing = subprocess.run(
        [*cli, "reconcile", "--data-dir", str(tmp_path / "nothing-here")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert nothing.returncode == 2
    assert "paypost demo" in nothing.stderr and "Traceback" not in nothing.stderr


# --------------------------------------------------------------------------------------------
# Replay and redrive safety (NFR3, FR9)

REPLAY_EVENTS = 700


def snapshot(job: Job) -> tuple[int, dict[tuple[str, str], int], bytes]:
    job.pipeline.export_postings()
    return (
        entry_count(job.bus.conn),
        balances(job.bus.conn),
        (job.data_dir / POSTING_FILE).read_bytes(),
    )


def assert_clean(job: Job) -> None:
    assert trial_balance_zero(job.bus.conn)
    assert all(job.bus.pending(name) == 0 for name in STAGE_ORDER)
    report = rec.reconcile(job.bus.conn, posting_file=job.data_dir / POSTING_FILE)
    assert report.breaks == [], [b.kind for b in report.breaks]


def test_nfr3_replaying_the_whole_archive_twice_posts_nothing_twice(tmp_path: Path) -> None:
    with demo_job(tmp_path, events=REPLAY_EVENTS) as job:
        before = snapshot(job)
        assert before[0] > 0.9 * 0.9 * REPLAY_EVENTS
        for _ in range(2):
            result = job.bus.replay(ArchiveQuery(start=0.0, end=float("inf")))
            # Every stage gets its events again: authorizations, accepted, ..., legs.
            for target in (DEDUP, STANDARDIZE, ACCOUNT_INTERFACE, ASSEMBLER):
                assert result.routed.get(target, 0) > 0
            stats = job.pipeline.drain()
            for target in (DEDUP, STANDARDIZE, ACCOUNT_INTERFACE, ASSEMBLER):
                assert stats[target].processed + stats[target].skipped > 0  # really consumed
            assert snapshot(job) == before
            assert_clean(job)


def test_nfr3_redriving_dead_letters_of_posted_events_posts_nothing(tmp_path: Path) -> None:
    """Events already processed, dead-lettered at each stage (e.g. by an operator's mistake,
    or a consumer that failed after the fused path had processed them), then redriven twice."""
    with demo_job(tmp_path, events=REPLAY_EVENTS) as job:
        before = snapshot(job)
        conn = job.bus.conn
        by_type: dict[str, list[str]] = {}
        for detail_type, target in (
            ("AuthorizationApproved", DEDUP),
            ("AuthorizationAccepted", STANDARDIZE),
            ("TransactionApproved", ACCOUNT_INTERFACE),
            ("PostingLegCreated", ASSEMBLER),
        ):
            rows = conn.execute(
                "SELECT body FROM bus_archive WHERE CAST(body AS TEXT) LIKE ? "
                "ORDER BY position LIMIT 60",
                (f'%"detail-type":"{detail_type}"%',),
            ).fetchall()
            by_type[target] = [b for (b,) in rows]
        for _ in range(2):
            with job.bus.unit_of_work() as uow:
                for target, bodies in by_type.items():
                    uow.dead_letter(target, [decode_event(b) for b in bodies], "test: poison")
            assert job.bus.dlq_redrive() == sum(len(v) for v in by_type.values())
            job.pipeline.drain()
            assert snapshot(job) == before
            assert_clean(job)
            assert job.bus.dlq_list() == []


def test_fr10_a_crash_during_a_redrive_leaves_nothing_half_done(tmp_path: Path) -> None:
    """The re-drive of a chunk is one transaction: a crash inside it (after the stages ran,
    before the commit) leaves the ledger as it was; the next run patches it once."""
    with demo_job(tmp_path, events=500) as job:
        conn = job.bus.conn
        (auth_id,) = conn.execute(
            "SELECT auth_id FROM reconcile_inbound LIMIT 1 OFFSET 9"
        ).fetchone()
        tenant, entry_id = entry_of(conn, auth_id)
        delete_posting(job, tenant, entry_id)
        entries = entry_count(conn)

        def crashing() -> rec.Redriver:
            def drive(uow: Any, events: list[Event]) -> Any:
                job.pipeline.redrive(uow, events)
                assert ledger_sqlite.get_entry_in(uow.conn, tenant, entry_id) is not None
                raise RuntimeError("power cut")

            return drive

        report = _reconcile(job)
        with pytest.raises(RuntimeError, match="power cut"):
            rec.apply_patches(job.bus, report, redrive=crashing)
        assert entry_count(conn) == entries
        assert ledger_sqlite.get_entry_in(conn, tenant, entry_id) is None
        outcome = _patch(job, _reconcile(job))
        assert outcome.patched == 1 and outcome.detected == 0  # recorded by the first run
        assert entry_count(conn) == entries + 1
        assert _reconcile(job).breaks == [] and trial_balance_zero(conn)
