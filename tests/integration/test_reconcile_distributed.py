"""`paypost reconcile --backend distributed` (FR10 on NATS JetStream + PostgreSQL).

The distributed pipeline keeps the reconciler's inbound record (`<p>_state.reconcile_inbound`,
one row per AuthorizationAccepted, written with the dedup stage's effects) next to the
held/rejected outcomes; the reconciler reads them, the tenants' PostgreSQL ledgers and the
posting file in one snapshot and classifies them exactly as the embedded one does."""

from __future__ import annotations

import base64
import json
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from typer.testing import CliRunner

import paypost.cli
from ledger_surgery import delete_sqlite_entry
from paypost.cli import app
from paypost.events import Event, SchemaRef, derive_event_id
from paypost.ledger.model import JournalEntry, Leg
from paypost.security.tokens import find_pans
from paypost.stages import reconcile as rec

paypost.cli._register()
runner = CliRunner()

KEY = bytes(range(32))


@dataclass
class Run:
    report: Any  # RunReport
    settings: Any  # DistributedSettings
    env: dict[str, str]
    data_dir: Path
    job: Any

    @property
    def accepted(self) -> int:
        """Approved authorizations that are not duplicates: each one AuthorizationAccepted."""
        return int(self.report.approved - self.report.parked_duplicates)


@contextmanager
def distributed_run(
    nats_url: str,
    postgres_url: str,
    prefix: str,
    data_dir: Path,
    *,
    events: int,
    fused: bool,
    embedded_dir: Path | None = None,
) -> Iterator[Run]:
    """A complete demo run on the distributed backend, its posting file exported to
    DATA_DIR/postings/postings.csv (as `paypost run --backend distributed` does); with
    EMBEDDED_DIR, the same inputs also run through the embedded pipeline there first."""
    from paypost.demo import demo_inputs
    from paypost.distributed.runtime import DistributedJob, DistributedSettings, destroy
    from paypost.pipeline import PipelineSettings
    from paypost.runner import Job
    from paypost.stages.rules import default_rules_text, parse_rules, variables_from_tenants

    settings = DistributedSettings(bus_url=nats_url, db_url=postgres_url, prefix=prefix)
    env = {
        "PAYPOST_DB_URL": postgres_url,
        "PAYPOST_PREFIX": prefix,
        "PAYPOST_BUS_URL": nats_url,
        **VAULT,
    }
    with demo_inputs(events, KEY, seed=3, mode="near-realtime") as inputs:
        refdata = inputs.generated.refdata
        text = default_rules_text()
        book = parse_rules(text, "<default>", variables_from_tenants(refdata.tenants.values()))
        if embedded_dir is not None:
            embedded = Job(embedded_dir, refdata, book, PipelineSettings(), KEY)
            try:
                embedded.run(inputs.sources)
            finally:
                embedded.close()
        job = DistributedJob(
            settings=settings,
            refdata=refdata,
            rulebook=book,
            rules_text=text,
            rules_source="<default>",
            pipeline_settings=PipelineSettings(mode="near-realtime"),
            master_key=KEY,
            fused=fused,
        )
        try:
            rep = job.run([(s.config, s.path) for s in inputs.sources], timeout_s=240)
            assert rep.complete, rep
            job.pipeline.export_postings(data_dir / "postings" / "postings.csv")
            yield Run(report=rep, settings=settings, env=env, data_dir=data_dir, job=job)
        finally:
            job.close()
            destroy(settings)


def _accepted(n: int, *, correlation_id: str | None = None, when: str | None = None) -> Event:
    tenant = ("uk-bank", "eu-bank")[n % 2]
    return Event(
        id=str(uuid.UUID(int=n + 1)),
        source="paypost.dedup",
        detail_type="AuthorizationAccepted",
        time="2026-11-21T23:59:59.000Z",
        tenant=tenant,
        correlation_id=correlation_id or f"auth-{n:04d}",
        schema=SchemaRef("AuthorizationAccepted", 1),
        detail={
            "request": {
                "amount": {"minor": 1000 + n, "currency": ("GBP", "EUR")[n % 2]},
                "transmission_time": when or f"2026-11-2{n % 3}T10:00:00.000Z",
            },
            "business_key": f"k{n}",
        },
    )


def _inbound_pg(url: str, schema: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            f'SELECT tenant, auth_id, accepted_id, day, amount, currency FROM "{schema}"'
            ".reconcile_inbound ORDER BY accepted_id"
        ).fetchall()


def test_the_inbound_record_holds_what_the_embedded_one_holds(
    postgres_url: str, pg_schema: str
) -> None:
    """The same dedup outputs give the same inbound rows on both backends (one per accepted
    authorization, a transmission time with an offset counted in its UTC day); a field with
    a control character is stored as is. (A batch written twice appends twice on both
    backends, as in the embedded record; the reconciler reads an authorization once:
    `test_reconcile_distributed_finds_and_patches_what_the_embedded_one_does`.)"""
    from paypost.distributed import state
    from paypost.stages import reconcile

    events = [_accepted(n) for n in range(7)]
    events.append(_accepted(7, when="2026-11-21T23:30:00-02:00"))  # 2026-11-22 in UTC
    parked = msgspec_replace(_accepted(8), detail_type="DuplicateParked")
    odd = [_accepted(9, correlation_id="auth\x1fodd")]  # the packed form's separator
    lite = sqlite3.connect(":memory:")
    reconcile.ensure_schema(lite)
    reconcile.track(lite, [*events, parked, *odd])
    embedded = sorted(
        lite.execute(
            "SELECT tenant, auth_id, accepted_id, day, amount, currency FROM reconcile_inbound"
        ).fetchall(),
        key=lambda r: r[2],
    )
    schema = state.state_schema(pg_schema)
    with psycopg.connect(postgres_url) as pg:
        state.ensure_schema(pg, schema)
        state.record_inbound(pg, schema, state.inbound_rows([*events, parked]))
        state.record_inbound(pg, schema, state.inbound_rows(odd))
    rows = _inbound_pg(postgres_url, schema)
    assert rows == embedded
    assert len(rows) == 9
    assert rows[7] == ("eu-bank", "auth-0007", events[7].id, "2026-11-22", 1007, "EUR")
    assert rows[8][1] == "auth\x1fodd"


def msgspec_replace(e: Event, **changes: Any) -> Event:
    import msgspec

    return msgspec.structs.replace(e, **changes)


def test_a_per_stage_run_records_every_accepted_authorization_once(
    nats_url: str, postgres_url: str, pg_schema: str, data_dir: Path
) -> None:
    """The dedup workers write one inbound row per accepted authorization in their unit of
    work: as many rows as authorizations accepted, amounts and days as authorized."""
    with distributed_run(
        nats_url, postgres_url, pg_schema, data_dir, events=400, fused=False
    ) as run:
        rows = _inbound_pg(postgres_url, f"{pg_schema}_state")
        assert len(rows) == run.accepted > 0
        assert len({(r[0], r[1]) for r in rows}) == len(rows)
        assert all(r[4] > 0 and len(r[5]) == 3 and len(r[3]) == 10 for r in rows)


VAULT = {"PAYPOST_VAULT_KEY": base64.b64encode(KEY).decode()}


def _reconcile(env: dict[str, str], data_dir: Path, *args: str, code: int = 0) -> Any:
    """`paypost reconcile --json` (distributed when ENV names a database) -> its document."""
    backend = ["--backend", "distributed"] if "PAYPOST_DB_URL" in env else []
    result = runner.invoke(
        app, ["reconcile", *backend, "--data-dir", str(data_dir), "--json", *args], env=env
    )
    assert not find_pans(result.output)
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    return json.loads(result.stdout)


def _comparable(doc: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in doc.items() if k not in ("seconds", "outcome")}
    out["breaks"] = sorted(out["breaks"], key=lambda b: b["break_id"])
    return out


def _delete_pg(conn: psycopg.Connection[Any], schema: str, entry_id: str) -> None:
    """A posting the ledger lost: its entry, legs and their effect on the balances."""
    s = f'"{schema}"'
    (pk,) = conn.execute(f"SELECT pk FROM {s}.ledger_entries WHERE id = %s", (entry_id,)).fetchone()
    for account_pk, amount in conn.execute(
        f"SELECT account_pk, amount FROM {s}.ledger_legs WHERE entry_pk = %s", (pk,)
    ).fetchall():
        conn.execute(
            f"UPDATE {s}.ledger_balances SET balance = balance - %s, debits = debits - %s, "
            "credits = credits - %s, legs = legs - 1 WHERE account_pk = %s",
            (amount, -amount if amount < 0 else 0, amount if amount > 0 else 0, account_pk),
        )
    conn.execute(f"DELETE FROM {s}.ledger_legs WHERE entry_pk = %s", (pk,))
    conn.execute(f"DELETE FROM {s}.ledger_entries WHERE pk = %s", (pk,))


def _alter_amount(conn: psycopg.Connection[Any], schema: str, delta: int) -> str:
    """Make one two-leg same-currency posting DELTA minor units larger on both legs (a
    posting for the wrong amount, still balanced); returns its entry id."""
    s = f'"{schema}"'
    (entry_pk, entry_id) = conn.execute(
        f"SELECT e.pk, e.id FROM {s}.ledger_entries e JOIN {s}.ledger_legs l "
        f"ON l.entry_pk = e.pk JOIN {s}.ledger_accounts a ON a.pk = l.account_pk "
        "WHERE e.reversal_of IS NULL AND e.metadata -> 'reconciliation' IS NULL AND e.id "
        f"NOT IN (SELECT reversal_of FROM {s}.ledger_entries WHERE reversal_of IS NOT NULL) "
        "GROUP BY e.pk, e.id HAVING count(*) = 2 AND count(DISTINCT a.currency) = 1 "
        "AND bool_or(a.kind = 'customer') AND bool_or(a.role = 'settlement') "
        "ORDER BY e.pk DESC LIMIT 1"
    ).fetchone()
    for account_pk, amount, idx in conn.execute(
        f"SELECT account_pk, amount, idx FROM {s}.ledger_legs WHERE entry_pk = %s", (entry_pk,)
    ).fetchall():
        change = delta if amount > 0 else -delta
        conn.execute(
            f"UPDATE {s}.ledger_legs SET amount = amount + %s WHERE entry_pk = %s AND idx = %s",
            (change, entry_pk, idx),
        )
        conn.execute(
            f"UPDATE {s}.ledger_balances SET balance = balance + %s, debits = debits + %s, "
            "credits = credits + %s WHERE account_pk = %s",
            (change, delta if amount < 0 else 0, delta if amount > 0 else 0, account_pk),
        )
    return str(entry_id)


def _copy_of(original: Any) -> JournalEntry:
    """A second posting of ORIGINAL (a faulty writer): same legs, sequence and reference."""
    return JournalEntry(
        id=derive_event_id(original.id, "test-duplicate"),
        tenant=original.tenant,
        legs=tuple(Leg(account=lg.account, side=lg.side, amount=lg.amount) for lg in original.legs),
        sequence_id=original.sequence_id,
        source_event_id=original.source_event_id,
        booked_at=original.booked_at,
        description=original.description,
        metadata=original.metadata,
    )


def test_reconcile_distributed_finds_and_patches_what_the_embedded_one_does(
    nats_url: str, postgres_url: str, pg_schema: str, data_dir: Path, tmp_path: Path
) -> None:
    """A clean fused run reconciles with no break, every accepted authorization in one class,
    and the same report as the embedded reconciler over the same inputs. A posting deleted
    from a tenant's PostgreSQL ledger and a second posting of another are reported as
    missing / duplicate (as embedded reports the same faults); a real run reverses the
    duplicate (entry id derived from the break) and re-drives the missing one through the
    pipeline's stages, once: the second run is clean and the third changes nothing; an
    altered amount gets an adjustment entry."""
    from paypost.bus.sqlite import SqliteBus
    from paypost.distributed.reconcile import ledger_schemas
    from paypost.ledger import sqlite as ledger_sqlite
    from paypost.ledger.postgres import PostgresLedger
    from paypost.stages import posting_file_pg
    from paypost.stages.posting_file import add_to_outbox, record_for

    embedded_dir = tmp_path / "embedded"
    embedded_dir.mkdir()
    with distributed_run(
        nats_url, postgres_url, pg_schema, data_dir, events=1000, fused=True,
        embedded_dir=embedded_dir,
    ) as run:  # fmt: skip
        env = run.env
        # -- clean: zero breaks, the classes add up to the accepted authorizations ----------
        doc = _reconcile(env, data_dir, "--dry-run")
        assert doc["breaks_total"] == 0 and doc["open_breaks"] == 0, doc["breaks"][:3]
        c = doc["counts"]
        assert doc["authorizations"] == run.accepted
        assert c["matched"] + c["held"] + c["rejected"] + c["reversed"] == run.accepted
        # an acceptance recorded twice (the record is append-only) is one authorization
        from paypost.distributed import state

        with psycopg.connect(postgres_url) as pg:
            twice = _inbound_pg(postgres_url, f"{pg_schema}_state")[:5]
            state.record_inbound(pg, f"{pg_schema}_state", [tuple(r) for r in twice])
        again = _reconcile(env, data_dir, "--dry-run")
        assert again["authorizations"] == run.accepted and again["breaks_total"] == 0
        assert (c["held"], c["rejected"], c["in_flight"]) == (
            run.report.held,
            run.report.rejected,
            0,
        )
        assert c["matched"] == run.report.posted == doc["entries"] == doc["file_records"]
        # the same report as the embedded reconciler over the same inputs
        emb = _reconcile({}, embedded_dir, "--dry-run")
        assert _comparable(emb) == _comparable(doc)
        # a real run on a clean ledger changes nothing
        real = _reconcile(env, data_dir)
        assert real["outcome"]["patched"] == real["outcome"]["entries_posted"] == 0

        # -- break the ledger in PostgreSQL (and the embedded one the same way) -------------
        ledger_prefix = f"{pg_schema}_ledger"
        tenant, schema = sorted(
            ledger_schemas(psycopg.connect(postgres_url), ledger_prefix).items()
        )[0]
        with psycopg.connect(postgres_url) as pg:
            lost, doubled = [
                str(r[0])
                for r in pg.execute(
                    f'SELECT id FROM "{schema}".ledger_entries ORDER BY pk LIMIT 2'
                ).fetchall()
            ]
            _delete_pg(pg, schema, lost)
        ledger = PostgresLedger(postgres_url, prefix=ledger_prefix)
        try:
            original = ledger.get_entry(tenant, doubled)
            assert original is not None
            copy = _copy_of(original)
            assert [r.status for r in ledger.post_batch([copy])] == ["posted"]
            with psycopg.connect(postgres_url) as pg:  # and it reached the bank's file
                posting_file_pg.add_to_outbox(pg, [record_for(copy)], f"{pg_schema}_postings")
            run.job.pipeline.export_postings(data_dir / "postings" / "postings.csv")
            entries_before = sum(run.job.pipeline.posted_entries().values())

            bus = SqliteBus.open(embedded_dir)
            try:
                with bus.unit_of_work() as uow:
                    delete_sqlite_entry(uow.conn, tenant, lost)
                    ledger_sqlite.post_batch_in(uow.conn, [copy])
                    add_to_outbox(uow.conn, [record_for(copy)])
                from paypost.cli.reconcile import exporter

                exporter(bus, embedded_dir)()
            finally:
                bus.close()

            broken = _reconcile(env, data_dir, "--dry-run", code=1)
            kinds = sorted(b["kind"] for b in broken["breaks"])
            assert kinds == ["duplicate", "missing"], broken["breaks"]
            by_kind = {b["kind"]: b for b in broken["breaks"]}
            assert by_kind["missing"]["evidence"]["expected_entry_id"] == lost
            assert by_kind["missing"]["evidence"]["in_posting_file"] is True
            assert by_kind["duplicate"]["evidence"]["duplicate_entry_id"] == copy.id
            assert by_kind["duplicate"]["evidence"]["kept_entry_id"] == doubled
            assert broken["counts"]["matched"] == c["matched"] - 1  # (the kept one matches)
            emb_broken = _reconcile({}, embedded_dir, "--dry-run", code=1)
            assert _comparable(emb_broken) == _comparable(broken)

            # -- patch: the duplicate is reversed, the missing one re-driven, once ----------
            first = _reconcile(env, data_dir)
            out = first["outcome"]
            assert (out["detected"], out["patched"], out["failed"], out["held"]) == (2, 2, 0, 0)
            assert out["entries_posted"] == 2 and out["trial_balance_zero"] is True
            assert out["exported"] == 1  # the reversal's record; the re-driven one is in the file
            dup_break = by_kind["duplicate"]["break_id"]
            reversal = ledger.get_entry(tenant, rec.patch_entry_id_for(dup_break))
            assert reversal is not None and reversal.reversal_of == copy.id
            assert reversal.metadata["reconciliation"]["break_id"] == dup_break
            reposted = ledger.get_entry(tenant, lost)
            assert reposted is not None and reposted.sequence_id == lost  # the pipeline's own
            assert sum(run.job.pipeline.posted_entries().values()) == entries_before + 2

            second = _reconcile(env, data_dir)
            assert second["breaks_total"] == 0 and second["counts"]["matched"] == c["matched"]
            assert second["outcome"]["detected"] == second["outcome"]["entries_posted"] == 0
            third = _reconcile(env, data_dir)
            assert _comparable(third) == _comparable(second)
            assert third["outcome"]["entries_posted"] == third["outcome"]["exported"] == 0
            assert sum(run.job.pipeline.posted_entries().values()) == entries_before + 2
            with psycopg.connect(postgres_url) as pg:
                statuses = dict(
                    pg.execute(
                        f'SELECT kind, status FROM "{pg_schema}_state".reconcile_breaks'
                    ).fetchall()
                )
            assert statuses == {"duplicate": "patched", "missing": "patched"}
            # the embedded reconciler patches its copy of the faults to the same ledger
            assert _reconcile(VAULT, embedded_dir)["outcome"]["patched"] == 2
            assert _comparable(_reconcile({}, embedded_dir, "--dry-run")) == _comparable(
                {**second, "dry_run": True}
            )

            # -- a posting for the wrong amount gets an adjustment entry, once --------------
            with psycopg.connect(postgres_url) as pg:
                wrong = _alter_amount(pg, schema, delta=37)
            altered = _reconcile(env, data_dir, "--dry-run", code=1)
            kinds = sorted(b["kind"] for b in altered["breaks"])
            assert kinds == ["file_mismatch", "mismatch"], altered["breaks"]
            mismatch = next(b for b in altered["breaks"] if b["kind"] == "mismatch")
            assert mismatch["evidence"]["entry_id"] == wrong and mismatch["action"] == "adjust"
            assert mismatch["evidence"]["difference"]["minor"] in (37, -37)
            fixed = _reconcile(env, data_dir, code=1)
            assert fixed["outcome"]["patched"] == fixed["outcome"]["entries_posted"] == 1
            assert fixed["outcome"]["trial_balance_zero"] is True
            adjustment = ledger.get_entry(tenant, rec.patch_entry_id_for(mismatch["break_id"]))
            assert adjustment is not None
            assert adjustment.metadata["reconciliation"]["adjusts"] == wrong
            after = _reconcile(env, data_dir, code=1)
            assert [b["kind"] for b in after["breaks"]] == ["file_mismatch"]  # held: append-only
            assert after["outcome"]["entries_posted"] == 0
            assert after["counts"]["matched"] == c["matched"]
            assert sum(run.job.pipeline.posted_entries().values()) == entries_before + 3
        finally:
            ledger.close()


def test_reconcile_distributed_names_the_setting_to_fix(postgres_url: str, pg_schema: str) -> None:
    """An unreachable database names PAYPOST_DB_URL, a prefix with no pipeline names
    PAYPOST_PREFIX; what the distributed backend does not do is refused, saying so."""
    from paypost.config import UserError

    def fails(env: dict[str, str], *args: str) -> str:
        result = runner.invoke(app, ["reconcile", "--backend", "distributed", *args], env=env)
        assert isinstance(result.exception, UserError), result.output
        return str(result.exception)

    down = fails({"PAYPOST_DB_URL": "postgresql://postgres@127.0.0.1:1/none"}, "--dry-run")
    assert "PAYPOST_DB_URL" in down
    unknown = fails({"PAYPOST_DB_URL": postgres_url, "PAYPOST_PREFIX": pg_schema}, "--dry-run")
    assert "PAYPOST_PREFIX" in unknown and pg_schema in unknown
    env = {"PAYPOST_DB_URL": postgres_url, "PAYPOST_PREFIX": pg_schema}
    assert "not supported with --backend distributed" in fails(env, "--approve", "b-1")
    assert "rules the job published" in fails(env, "--rules", "rules.yaml")
    embedded = runner.invoke(app, ["reconcile", "--db-url", postgres_url, "--dry-run"])
    assert isinstance(embedded.exception, UserError)
    assert "add --backend distributed" in str(embedded.exception)
