"""The whole pipeline on NATS JetStream + PostgreSQL (issue 6), in-process workers."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from paypost.demo import demo_inputs
from paypost.distributed.runtime import (
    DistributedJob,
    DistributedSettings,
    destroy,
    load_settings,
)

KEY = bytes(range(32))


@pytest.fixture
def settings(nats_url: str, postgres_url: str, pg_schema: str) -> Iterator[DistributedSettings]:
    s = DistributedSettings(bus_url=nats_url, db_url=postgres_url, prefix=pg_schema)
    yield s
    from paypost.bus.nats import NatsBus

    bus = NatsBus(nats_url, postgres_url, prefix=pg_schema, sweep=False)
    bus.destroy()
    bus.close()


def make_job(
    settings: DistributedSettings, events: int, seed: int = 3, fused: bool = False
) -> tuple[Any, Any]:
    cm = demo_inputs(events, KEY, seed=seed, mode="near-realtime")
    inputs = cm.__enter__()
    job = DistributedJob.with_default_rules(settings, inputs.generated.refdata, KEY, fused=fused)
    return job, (cm, inputs)


def test_every_authorization_posted_once_with_a_zero_trial_balance(
    settings: DistributedSettings,
) -> None:
    job, (cm, inputs) = make_job(settings, 1500)
    try:
        sources = [(s.config, s.path) for s in inputs.sources]
        rep = job.run(sources, timeout_s=120)
        assert rep.complete, rep
        assert rep.approved > 1300
        assert rep.terminal() == rep.approved
        assert rep.posted == rep.journal_entries  # each posted authorization: one entry
        assert rep.parked_duplicates > 0  # the generator re-logs ~1%
        assert rep.trial_balance_zero
        # a second run of the same inputs resumes from the checkpoints: nothing twice
        again = job.run(sources, timeout_s=60)
        assert again.posted == rep.posted and again.journal_entries == rep.journal_entries
    finally:
        job.close()
        cm.__exit__(None, None, None)


def test_fused_workers_post_the_same_as_per_stage_workers(
    settings: DistributedSettings, nats_url: str, postgres_url: str
) -> None:
    """`serve --fused`: every stage of a batch in one transaction; same outcome."""
    outcomes = []
    for fused, prefix in ((False, settings.prefix), (True, settings.prefix + "_f")):
        s = DistributedSettings(bus_url=nats_url, db_url=postgres_url, prefix=prefix)
        job, (cm, inputs) = make_job(s, 800, seed=9, fused=fused)
        try:
            rep = job.run([(x.config, x.path) for x in inputs.sources], timeout_s=120)
            assert rep.complete and rep.trial_balance_zero
            assert rep.posted == rep.journal_entries and rep.terminal() == rep.approved
            outcomes.append((rep.approved, rep.posted, rep.held, rep.rejected))
        finally:
            job.close()
            cm.__exit__(None, None, None)
            if fused:
                destroy(s)
    assert outcomes[0] == outcomes[1]


def test_fused_dedup_failure_is_retried_not_lost(settings: DistributedSettings) -> None:
    """A dedup failure inside the fused worker (e.g. two workers racing on one business key)
    must not hand the event back to the queue the fused worker itself tracks: it is retried
    and processed, not skipped as already done."""
    from paypost.distributed.pipeline import DEDUP, DistributedPipeline, serve_stages
    from paypost.distributed.runtime import (
        WorkerSet,
        ingest_sources,
        open_bus,
        wait_for_completion,
    )

    job, (cm, inputs) = make_job(settings, 300, seed=4, fused=True)
    job.in_process_workers = False
    bus = open_bus(settings)
    pipeline = DistributedPipeline(bus, job.refdata, job.rulebook, job.pipeline_settings)
    real = pipeline.handlers[DEDUP]
    failed: list[str] = []

    def flaky(events: list[Any], uow: Any) -> list[Any]:
        if len(failed) < 3:  # the first batch fails, then each of its first two events once
            failed.append(events[0].id)
            raise RuntimeError("duplicate key value violates unique constraint (simulated)")
        return real(events, uow)

    pipeline.handlers[DEDUP] = flaky
    workers = WorkerSet(pipeline, serve_stages(True)).start()
    try:
        ingest_sources(job.pipeline, [(x.config, x.path) for x in inputs.sources], job.keys)
        approved = job.pipeline.ingest_totals()["approved"]
        rep = wait_for_completion(job.pipeline, 0.0, approved, timeout_s=90)
        assert failed and rep.complete, rep
        assert rep.terminal() == rep.approved and rep.posted == rep.journal_entries
    finally:
        workers.close()
        pipeline.close()
        bus.close()
        job.close()
        cm.__exit__(None, None, None)


def test_fused_batch_does_not_wait_for_another_workers_copy_of_one_authorization(
    settings: DistributedSettings, postgres_url: str
) -> None:
    """A fused batch holding a copy of an authorization whose business key another
    worker's uncommitted batch holds commits its other events at once; only that copy waits
    (in a unit of work of its own) for the other worker's decision, then is handled once."""
    import threading

    import psycopg

    from paypost.distributed.pipeline import DistributedPipeline
    from paypost.distributed.runtime import ingest_sources, open_bus
    from paypost.stages.dedup import Prepared

    job, (cm, inputs) = make_job(settings, 200, seed=5, fused=True)
    job.in_process_workers = False
    bus = open_bus(settings)
    pipeline = DistributedPipeline(bus, job.refdata, job.rulebook, job.pipeline_settings)
    other = psycopg.connect(postgres_url)
    try:
        ingest_sources(job.pipeline, [(x.config, x.path) for x in inputs.sources], job.keys)
        consumer = pipeline.fused_consumer()
        batch = []
        deadline = time.monotonic() + 30
        while len(batch) < 100 and time.monotonic() < deadline:  # relayed, past its linger
            batch += bus.receive(consumer.target, consumer.config.batch_size)
        assert len(batch) >= 100
        blocked = batch[5]
        key = Prepared([blocked.event]).business_keys()[id(blocked.event)]
        assert key is not None
        # another worker's transaction holds that authorization's business key
        other.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
        worker = threading.Thread(target=consumer.handle_batch, args=(batch,))
        worker.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and terminal(pipeline) < len(batch) - 1:
            time.sleep(0.1)
        # every other event of the batch committed while the key was held ...
        assert terminal(pipeline) == len(batch) - 1
        assert worker.is_alive()  # ... and the copy waits for the other worker's commit
        other.commit()  # the other worker commits (here: without recording that key)
        worker.join(60)
        assert not worker.is_alive()
        assert terminal(pipeline) == len(batch)
        assert consumer.stats.processed == len(batch) and consumer.stats.nacked == 0
        assert blocked.event.id in dedup_ids(postgres_url, settings.prefix)
    finally:
        other.close()
        pipeline.close()
        bus.close()
        job.close()
        cm.__exit__(None, None, None)


def terminal(pipeline: Any) -> int:
    """Authorizations in a terminal state (counters committed with the effects)."""
    c = pipeline.counters()
    return sum(c.get(k, 0) for k in ("posted", "parked_duplicates", "held", "rejected"))


def dedup_ids(url: str, prefix: str) -> set[str]:
    """Event ids the dedup index holds (it keys them by a hash): via the parked and the
    accepted records, the authorizations it has decided."""
    import psycopg

    with psycopg.connect(url) as conn:
        rows = conn.execute(
            f'SELECT auth_id FROM "{prefix}_state".reconcile_inbound UNION '
            f'SELECT input_event_id FROM "{prefix}_state".dedup_parked'
        ).fetchall()
    return {r[0] for r in rows}


def test_the_same_batch_in_two_fused_workers_at_once_posts_each_authorization_once(
    settings: DistributedSettings,
) -> None:
    """A lease ran out: two workers hold the same deliveries at the same time. The dedup
    stage's event index (the fused worker's tracking record) and the business-key locks
    let one of them decide each authorization; nothing is posted or counted twice."""
    import threading

    from paypost.distributed.pipeline import DistributedPipeline
    from paypost.distributed.runtime import ingest_sources, open_bus, wait_for_completion

    job, (cm, inputs) = make_job(settings, 300, seed=6, fused=True)
    job.in_process_workers = False
    buses = [open_bus(settings), open_bus(settings)]
    pipelines = [
        DistributedPipeline(b, job.refdata, job.rulebook, job.pipeline_settings) for b in buses
    ]
    try:
        ingest_sources(job.pipeline, [(x.config, x.path) for x in inputs.sources], job.keys)
        consumers = [p.fused_consumer() for p in pipelines]
        batch: list[Any] = []
        deadline = time.monotonic() + 30
        while len(batch) < 100 and time.monotonic() < deadline:
            batch += buses[0].receive(consumers[0].target, consumers[0].config.batch_size)
        assert len(batch) >= 100
        threads = [threading.Thread(target=c.handle_batch, args=(batch,)) for c in consumers]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert terminal(pipelines[0]) == len(batch)
        # the rest of the queue (and the copies the losing worker could not ack)
        rest = threading.Thread(target=consumers[1].run, kwargs={"until_idle": True})
        rest.start()
        rest.join(120)
        approved = job.pipeline.ingest_totals()["approved"]
        rep = wait_for_completion(job.pipeline, 0.0, approved, timeout_s=90)
        assert rep.complete and rep.terminal() == rep.approved, rep
        assert rep.posted == rep.journal_entries and rep.trial_balance_zero
    finally:
        for p in pipelines:
            p.close()
        for b in buses:
            b.close()
        job.close()
        cm.__exit__(None, None, None)


def test_settings_precedence_and_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "paypost.yaml"
    cfg.write_text("bus_url: nats://file:4222\ndb_url: postgresql://file/db\nprefix: fromfile\n")
    s = load_settings(cfg, environ={"PAYPOST_DB_URL": "postgresql://env/db"}, prefix="flag")
    assert (s.bus_url, s.db_url, s.prefix) == ("nats://file:4222", "postgresql://env/db", "flag")
    cfg.write_text("bus: x\n")
    from paypost.config import UserError

    with pytest.raises(UserError, match="unknown setting"):
        load_settings(cfg, environ={})
    assert os.environ is not None


def test_ingest_waits_for_nats_then_names_the_setting(
    settings: DistributedSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ingest batch publishes its archive segment before it commits: while NATS refuses
    it, the batch is retried whole (nothing committed in between, nothing twice); past the
    wait the error names PAYPOST_BUS_URL and nothing of the batch is committed."""
    import nats.errors

    from paypost.bus.nats import NatsBus, ServiceUnavailable
    from paypost.distributed import pipeline as dp
    from paypost.distributed.runtime import ingest_sources

    job, (cm, inputs) = make_job(settings, 200, seed=5)
    job.in_process_workers = False
    pipe = job.pipeline
    slept: list[float] = []
    pipe.sleep = slept.append
    real = NatsBus._publish_rows
    refusals = {"left": 2}

    async def flaky(self: NatsBus, rows: Any) -> list[bool]:
        if refusals["left"] > 0 and any(r.subject == self.archive_subject for r in rows):
            refusals["left"] -= 1
            raise nats.errors.OutboundBufferLimitError()
        return await real(self, rows)

    monkeypatch.setattr(NatsBus, "_publish_rows", flaky)
    try:
        first = inputs.sources[0]
        ingest_sources(pipe, [(first.config, first.path)], job.keys)
        assert refusals["left"] == 0 and slept == [1.0, 1.0]  # retried twice, then taken
        approved = pipe.ingest_totals()["approved"]
        assert approved > 0
        assert pipe.bus.archive_count() == approved  # each approved event archived once
        # NATS gone for good: the batch gives up with the setting named, nothing committed
        refusals["left"] = 10**6
        monkeypatch.setattr(dp, "INGEST_NATS_WAIT_S", 0.0)
        second = inputs.sources[1]
        with pytest.raises(ServiceUnavailable, match="PAYPOST_BUS_URL"):
            ingest_sources(pipe, [(second.config, second.path)], job.keys)
        assert pipe.load_checkpoint(second.config.name) is None
        assert pipe.ingest_totals()["approved"] == approved
    finally:
        job.close()
        cm.__exit__(None, None, None)
