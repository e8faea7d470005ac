"""`paypost reconcile --backend distributed` (FR10 on NATS JetStream + PostgreSQL).

The distributed pipeline keeps the reconciler's inbound record (`<p>_state.reconcile_inbound`,
one row per AuthorizationAccepted, written with the dedup stage's effects) next to the
held/rejected outcomes; the reconciler reads them, the tenants' PostgreSQL ledgers and the
posting file in one snapshot and classifies them exactly as the embedded one does."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from paypost.events import Event, SchemaRef

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
    nats_url: str, postgres_url: str, prefix: str, data_dir: Path, *, events: int, fused: bool
) -> Iterator[Run]:
    """A complete demo run on the distributed backend, its posting file exported to
    DATA_DIR/postings/postings.csv (as `paypost run --backend distributed` does)."""
    from paypost.demo import demo_inputs
    from paypost.distributed.runtime import DistributedJob, DistributedSettings, destroy
    from paypost.pipeline import PipelineSettings
    from paypost.stages.rules import default_rules_text, parse_rules, variables_from_tenants

    settings = DistributedSettings(bus_url=nats_url, db_url=postgres_url, prefix=prefix)
    env = {"PAYPOST_DB_URL": postgres_url, "PAYPOST_PREFIX": prefix, "PAYPOST_BUS_URL": nats_url}
    with demo_inputs(events, KEY, seed=3, mode="near-realtime") as inputs:
        refdata = inputs.generated.refdata
        text = default_rules_text()
        book = parse_rules(text, "<default>", variables_from_tenants(refdata.tenants.values()))
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
    authorization, a transmission time with an offset counted in its UTC day); a redelivered
    batch adds nothing on PostgreSQL; a field with a control character is stored as is."""
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
    with psycopg.connect(postgres_url) as pg:  # redelivered: same event ids
        state.record_inbound(pg, schema, state.inbound_rows(events[:4]))
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
