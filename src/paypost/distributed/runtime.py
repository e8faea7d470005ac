"""Running paypost distributed: configuration, workers, and a job that waits for its run.

Configuration (highest wins): command-line flags, then the environment (`PAYPOST_BUS_URL`,
`PAYPOST_DB_URL`, `PAYPOST_PREFIX`, `PAYPOST_REPLICAS`), then a YAML file (`--config`, or
`PAYPOST_CONFIG`) with the keys `bus_url`, `db_url`, `prefix`, `replicas`, then defaults
(the services on 127.0.0.1). A service that cannot be reached is a `UserError` naming the
setting to fix.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import yaml
from psycopg import sql

from paypost.bus.consumer import Consumer
from paypost.bus.nats import NatsBus
from paypost.config import UserError
from paypost.logs import get_logger
from paypost.pipeline import (
    ASSEMBLER,
    DEDUP,
    STAGE_ORDER,
    Mode,
    PipelineSettings,
    StageMetrics,
    tuned_gc,
)
from paypost.refdata.model import RefData
from paypost.refdata.store import HolderCipher
from paypost.stages import ingest as ingest_stage
from paypost.stages.rules import (
    RuleBook,
    default_rules_text,
    parse_rules,
    variables_from_tenants,
)

from . import state
from .pipeline import FUSED, WORKER_STAGES, DistributedPipeline, serve_stages

log = get_logger("paypost.distributed")

DEFAULT_BUS_URL = "nats://127.0.0.1:4222"
DEFAULT_DB_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


class DistributedSettings(msgspec.Struct, frozen=True, kw_only=True):
    bus_url: str = DEFAULT_BUS_URL
    db_url: str = DEFAULT_DB_URL
    prefix: str = "paypost"
    replicas: int = 1


def load_settings(
    config_file: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> DistributedSettings:
    """Settings from OVERRIDES (flags; None = unset) > ENVIRON > CONFIG_FILE > defaults."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = config_file or (Path(env["PAYPOST_CONFIG"]) if env.get("PAYPOST_CONFIG") else None)
    if path is not None:
        if not path.is_file():
            raise UserError(
                f"config file {str(path)!r} does not exist (--config / PAYPOST_CONFIG)."
            )
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"config file {str(path)!r} must be a mapping of settings.")
        unknown = set(loaded) - set(DistributedSettings.__struct_fields__)
        if unknown:
            raise UserError(
                f"config file {str(path)!r}: unknown setting(s) {', '.join(sorted(unknown))}; "
                f"known: {', '.join(DistributedSettings.__struct_fields__)}."
            )
        values.update(loaded)
    for key, var in (
        ("bus_url", "PAYPOST_BUS_URL"),
        ("db_url", "PAYPOST_DB_URL"),
        ("prefix", "PAYPOST_PREFIX"),
        ("replicas", "PAYPOST_REPLICAS"),
    ):
        if env.get(var):
            values[key] = env[var]
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return msgspec.convert(values, DistributedSettings, strict=False)
    except msgspec.ValidationError as exc:
        raise UserError(f"distributed settings: {exc}") from None


def open_bus(settings: DistributedSettings, **kw: Any) -> NatsBus:
    return NatsBus(
        settings.bus_url,
        settings.db_url,
        prefix=settings.prefix,
        replicas=settings.replicas,
        **kw,
    )


def publish_config(
    pipeline: DistributedPipeline, master_key: bytes, rules_text: str, rules_source: str
) -> None:
    """Make this job's reference data and rules the ones every worker loads."""
    conn = pipeline.bus.db()
    s = pipeline.settings
    with conn.transaction():
        state.save_refdata(
            conn, pipeline.state_schema, pipeline.refdata, HolderCipher.from_master(master_key)
        )
        state.save_pipeline_doc(
            conn,
            pipeline.state_schema,
            state.PipelineDoc(
                rules_text=rules_text,
                rules_source=rules_source,
                mode=s.mode,
                batch_size=s.batch_size,
                posting_rate_limit_per_s=s.posting_rate_limit_per_s,
            ),
        )


def load_pipeline(bus: NatsBus, master_key: bytes, wait_s: float = 60.0) -> DistributedPipeline:
    """The pipeline a job published (reference data, rules, mode); waits up to WAIT_S for a
    job to publish it, so workers may start first."""
    schema = state.state_schema(bus.prefix)
    deadline = time.monotonic() + wait_s
    while True:
        conn = bus.db()
        with conn.transaction():
            state.ensure_schema(conn, schema)
        refdata = state.load_refdata(conn, schema, HolderCipher.from_master(master_key))
        doc = state.load_pipeline_doc(conn, schema)
        if refdata is not None and doc is not None:
            break
        if time.monotonic() > deadline:
            raise UserError(
                f"no pipeline configuration under prefix {bus.prefix!r} in the database: start "
                "a job first (`paypost run --backend distributed …` or `paypost demo --backend "
                "distributed`), or check PAYPOST_PREFIX."
            )
        time.sleep(0.5)
    book = parse_rules(
        doc.rules_text, doc.rules_source, variables_from_tenants(refdata.tenants.values())
    )
    mode: Mode = doc.mode  # type: ignore[assignment]
    settings = PipelineSettings(
        mode=mode,
        batch_size=doc.batch_size,
        posting_rate_limit_per_s=doc.posting_rate_limit_per_s,
    )
    return DistributedPipeline(bus, refdata, book, settings)


# --------------------------------------------------------------------------------------------
# Workers


def check_stage(stage: str) -> str:
    if stage not in WORKER_STAGES:
        raise UserError(
            f"--stage {stage!r} is not a stage; use one of: {', '.join(WORKER_STAGES)}."
        )
    return stage


@dataclass
class WorkerSet:
    """Stage consumers in threads of this process, each restarted after a failure (a service
    outage): the deliveries it held come back after their lease; nothing is lost."""

    pipeline: DistributedPipeline
    stages: Sequence[str]
    concurrency: int | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    consumers: dict[str, Consumer] = field(default_factory=dict)
    expire_every_s: float = 10.0
    prune_every_s: float = 3600.0
    handoff_idle_sleep_s: float = 0.5
    _ticks: list[threading.Event] = field(default_factory=list)
    _gc: contextlib.AbstractContextManager[None] | None = None

    def start(self) -> WorkerSet:
        # the reference data and rules are loaded: out of the cyclic GC's way (tuned_gc)
        self._gc = tuned_gc()
        self._gc.__enter__()
        for stage in self.stages:
            consumer = self.pipeline.stage_consumer(stage, self.concurrency)
            if FUSED in self.stages and stage != FUSED:
                # beside a fused worker these queues get only hand-offs (retries): polling
                # them every 50 ms cost each idle worker ~6% of its CPU in NATS requests
                consumer.max_idle_sleep_s = self.handoff_idle_sleep_s
            self.consumers[stage] = consumer
            tick = threading.Event()
            self._ticks.append(tick)
            t = threading.Thread(
                target=self._run, args=(stage, consumer, tick), name=f"worker-{stage}"
            )
            t.start()
            self.threads.append(t)
        ticker = threading.Thread(target=self._tick, name="worker-ticker", daemon=True)
        ticker.start()
        return self

    def _tick(self) -> None:
        """Every `expire_every_s` (and at stop), interrupt the consumers' loops so they can
        run their periodic maintenance even when their queue is idle."""
        while not self.stop.wait(self.expire_every_s):
            for tick in self._ticks:
                tick.set()
        for tick in self._ticks:
            tick.set()

    def _run(self, stage: str, consumer: Consumer, tick: threading.Event) -> None:
        last_prune = time.monotonic()
        while not self.stop.is_set():
            try:
                consumer.run(stop=tick)
                tick.clear()
                if self.stop.is_set():
                    break
                if stage == ASSEMBLER:  # posting sequences past their timeout (FR8)
                    self.pipeline.expire_sequences()
                elif stage in (DEDUP, FUSED) and time.monotonic() - last_prune > self.prune_every_s:
                    self.pipeline.prune_dedup()
                    last_prune = time.monotonic()
            except Exception as exc:
                log.warning("worker.restart", stage=stage, error=repr(exc))
                self.stop.wait(1.0)

    def processed(self) -> dict[str, int]:
        return {s: c.stats.processed for s, c in self.consumers.items()}

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        if self._gc is not None:
            self._gc.__exit__(None, None, None)
            self._gc = None


#: the stage times a worker process writes into its data directory when it stops
STAGE_TIMES_FILE = "stage-times.json"


def write_stage_times(pipeline: DistributedPipeline, data_dir: Path) -> Path | None:
    """At a worker's stop: DATA_DIR/STAGE_TIMES_FILE gets each stage's batches (events, wall
    and CPU time per event; `paypost bench --backend distributed` merges them over its
    workers), and one `worker.stage_times` log line the p50 / p99 over events. None when the
    process ran no batch."""
    times = pipeline.stage_times()
    if not times:
        return None
    summary = {}
    for name, data in times.items():
        m = StageMetrics()
        m.merge(data)
        summary[name] = {
            "events": m.events,
            "p50_us": round(m.p(0.50), 1),
            "p99_us": round(m.p(0.99), 1),
            "cpu_p99_us": round(m.p(0.99, cpu=True), 1),
        }
    log.info("worker.stage_times", stages=summary)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / STAGE_TIMES_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.encode(times))
    tmp.replace(path)
    return path


def read_stage_times(paths: Sequence[Path]) -> dict[str, StageMetrics]:
    """The stage times of several workers (`write_stage_times` files) merged per stage;
    missing files are skipped (a worker that ran no batch writes none)."""
    out: dict[str, StageMetrics] = {}
    for path in paths:
        if path.exists():
            for name, data in msgspec.json.decode(path.read_bytes()).items():
                out.setdefault(name, StageMetrics()).merge(data)
    return out


# --------------------------------------------------------------------------------------------
# A job: ingest sources and wait until every authorization reached a terminal state


@dataclass
class RunReport:
    approved: int
    declined: int
    timed_out: int
    quarantined: int
    posted: int
    parked_duplicates: int
    held: int
    rejected: int
    dead_lettered: int
    in_flight: int
    journal_entries: int
    trial_balance: dict[str, dict[str, int]]
    trial_balance_zero: bool
    seconds: float
    authorizations_per_second: float
    complete: bool

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["every_approved_in_one_terminal_state"] = self.terminal() == self.approved
        return out

    def terminal(self) -> int:
        return self.posted + self.parked_duplicates + self.held + self.rejected + self.dead_lettered


def ingest_sources(
    pipeline: DistributedPipeline,
    sources: Sequence[tuple[ingest_stage.SourceConfig, Path]],
    keys: Any,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Read every source from its checkpoint and publish it; returns events published."""
    published = 0
    with tuned_gc():
        for config, path in sources:
            checkpoint = pipeline.load_checkpoint(config.name)
            reader = ingest_stage.open_reader(config, keys, path=path, checkpoint=checkpoint)
            for batch in reader.batches(final=True):
                try:
                    published += pipeline.publish_batch(batch)
                except BaseException:
                    reader.edge.forget(e.token for e in batch.sealed_pans)
                    raise
                if on_batch is not None:
                    on_batch(batch.counts.approved + batch.counts.declined)
    return published


def report(
    pipeline: DistributedPipeline, started: float, this_run: int, *, full: bool = True
) -> RunReport:
    """Where the run stands. FULL=False skips the checks that read the whole ledger (journal
    entries counted, trial balances): a progress poll every second must not scan a table
    of a million entries each time; `journal_entries` and the trial balance are then empty."""
    counters = pipeline.counters()
    ingest = pipeline.ingest_totals()
    dead_targets = {
        t.name: t.dead_lettered for t in pipeline.bus.stats().targets if t.name != ASSEMBLER
    }
    tb = pipeline.trial_balances() if full else {}
    seconds = time.perf_counter() - started
    in_flight = pipeline.in_flight()
    rep = RunReport(
        approved=ingest["approved"],
        declined=ingest["declined"],
        timed_out=ingest["timed_out"],
        quarantined=ingest["quarantined"],
        posted=counters.get("posted", 0),
        parked_duplicates=counters.get("parked_duplicates", 0),
        held=counters.get("held", 0),
        rejected=counters.get("rejected", 0),
        dead_lettered=counters.get("dead_lettered", 0)
        + sum(n for name, n in dead_targets.items() if name in STAGE_ORDER),
        in_flight=in_flight,
        journal_entries=sum(pipeline.posted_entries().values()) if full else 0,
        trial_balance=tb,
        trial_balance_zero=full and all(v == 0 for lines in tb.values() for v in lines.values()),
        seconds=round(seconds, 3),
        authorizations_per_second=round(this_run / seconds, 1) if seconds > 0 else 0.0,
        complete=False,
    )
    rep.complete = rep.terminal() == rep.approved and in_flight == 0
    return rep


def wait_for_completion(
    pipeline: DistributedPipeline,
    started: float,
    this_run: int,
    *,
    timeout_s: float = 3600.0,
    poll_s: float = 0.5,
    on_poll: Callable[[RunReport], None] | None = None,
) -> RunReport:
    """Poll until every approved authorization is in one terminal state and nothing is in
    flight (queues, leases, outbox), or TIMEOUT_S passes (then `complete` is False). Polls
    are light (`report(full=False)`); the report returned is full."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            rep = report(pipeline, started, this_run, full=False)
            if rep.complete or time.monotonic() > deadline:
                rep = report(pipeline, started, this_run)
        except Exception as exc:  # a service outage while polling: try again
            log.warning("job.poll_failed", error=repr(exc))
            time.sleep(poll_s)
            continue
        if on_poll is not None:
            on_poll(rep)
        if rep.complete or time.monotonic() > deadline:
            return rep
        time.sleep(poll_s)


def new_pipeline(
    bus: NatsBus,
    refdata: RefData,
    rulebook: RuleBook,
    settings: PipelineSettings,
) -> DistributedPipeline:
    pipeline = DistributedPipeline(bus, refdata, rulebook, settings)
    pipeline.install()
    return pipeline


@dataclass
class DistributedJob:
    """A job on the distributed backbone: install, publish the configuration, optionally run
    the workers in this process, ingest, wait until every authorization is terminal."""

    settings: DistributedSettings
    refdata: RefData
    rulebook: RuleBook
    rules_text: str
    rules_source: str
    pipeline_settings: PipelineSettings
    master_key: bytes
    in_process_workers: bool = True
    fused: bool = False
    workers: WorkerSet | None = None

    @classmethod
    def with_default_rules(
        cls,
        settings: DistributedSettings,
        refdata: RefData,
        master_key: bytes,
        *,
        mode: Mode = "near-realtime",
        fused: bool = False,
        in_process_workers: bool = True,
    ) -> DistributedJob:
        """A job with paypost's default rules over REFDATA's tenants (tests, benchmarks)."""
        text = default_rules_text()
        book = parse_rules(text, "<default>", variables_from_tenants(refdata.tenants.values()))
        return cls(
            settings=settings,
            refdata=refdata,
            rulebook=book,
            rules_text=text,
            rules_source="<default>",
            pipeline_settings=PipelineSettings(mode=mode),
            master_key=master_key,
            in_process_workers=in_process_workers,
            fused=fused,
        )

    def __post_init__(self) -> None:
        from paypost.security.tokens import VaultKeys

        self.keys = VaultKeys.from_master(self.master_key)
        self.bus = open_bus(self.settings)
        try:
            self.pipeline = new_pipeline(
                self.bus, self.refdata, self.rulebook, self.pipeline_settings
            )
            publish_config(self.pipeline, self.master_key, self.rules_text, self.rules_source)
        except BaseException:
            self.bus.close()
            raise

    def run(
        self,
        sources: Sequence[tuple[ingest_stage.SourceConfig, Path]],
        *,
        on_batch: Callable[[int], None] | None = None,
        on_poll: Callable[[RunReport], None] | None = None,
        timeout_s: float = 3600.0,
    ) -> RunReport:
        started = time.perf_counter()
        if self.in_process_workers and self.workers is None:
            worker_bus = open_bus(self.settings)
            worker_pipeline = DistributedPipeline(
                worker_bus, self.refdata, self.rulebook, self.pipeline_settings
            )
            self.workers = WorkerSet(worker_pipeline, serve_stages(self.fused)).start()
        before = self.pipeline.ingest_totals()["approved"]
        ingest_sources(self.pipeline, sources, self.keys, on_batch)
        this_run = self.pipeline.ingest_totals()["approved"] - before
        return wait_for_completion(
            self.pipeline, started, this_run, timeout_s=timeout_s, on_poll=on_poll
        )

    def close(self) -> None:
        if self.workers is not None:
            self.workers.close()
            self.workers.pipeline.close()
            self.workers.pipeline.bus.close()
        self.pipeline.close()
        self.bus.close()


def destroy(settings: DistributedSettings) -> None:
    """Delete EVERYTHING under the settings' prefix: streams and every PostgreSQL schema named
    `<prefix>_…` (tests and benchmarks; never in production)."""
    bus = open_bus(settings, sweep=False)
    try:
        bus.destroy()
        conn = bus.db()
        rows = conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE %s",
            (settings.prefix.replace("_", "\\_") + "\\_%",),
        ).fetchall()
        for (name,) in rows:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
    finally:
        bus.close()
