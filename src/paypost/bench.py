"""`paypost bench`: the performance budget measured (DESIGN §5, issue 7).

What one run does, in order:

1. Generates the authorizations up front (not timed): reference data and one ISO 8583 log per
   tenant (`paypost.demo`), written by a short-lived child process so the generator's memory
   never counts against the pipeline's peak RSS.
2. Throughput: times ingest → posted for every authorization. The embedded backend runs one
   shard per group of tenants (`--shards`): each shard is its own worker process with its own
   SQLite database (bus, ledger, stage state: WAL, synchronous=FULL) holding whole tenants,
   so every guarantee of a single process holds per shard — one unit of work per batch, the
   ledger of a tenant in one file. The clock starts when every shard is set up and ready,
   and stops when the last one has drained its queues and exported its posting file.
3. Checks the answer before reporting a figure (`check_shard`): every approved
   authorization in exactly one terminal state and none in flight, one journal entry per
   posted authorization, a posting file that verifies (framing, control totals, one record
   per entry) with one record per posted authorization, and a zero trial balance per tenant.
4. Latency: realtime mode (one authorization per transaction) at a fixed offered load: the
   input is paced to `--latency-rate` authorizations/s for `--latency-seconds`, and each
   authorization's latency runs from its scheduled arrival to its transaction's commit
   (open loop: if paypost falls behind, the queueing delay counts).
5. The storage limit, measured in the same run on the same disk: batched inserts of as many
   rows as authorizations, each row as large as the bytes archived per authorization, into a
   fresh SQLite file with the same pragmas and the same transaction size. `limit_ratio`
   (paypost authorizations/s ÷ limit rows/s) says how close paypost runs to its storage.

Nothing here weakens durability or skips a stage: the bench drives the same `Job` as
`paypost demo`. `--backend distributed` (`run_distributed`) publishes the same input into NATS
JetStream and times fused `paypost serve --backend distributed` workers over PostgreSQL to the
same checked answer (docs/bench.md).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import psutil  # type: ignore[import-untyped]

from paypost.bus import sqlite as bus_sqlite
from paypost.config import UserError
from paypost.pipeline import (
    STAGE_ORDER,
    Mode,
    PipelineSettings,
    RunTotals,
    StageMetrics,
    percentile,
)
from paypost.runner import POSTING_FILE, Job, Source
from paypost.stages import ingest as ingest_stage
from paypost.stages.posting_file import verify_file
from paypost.stages.rules import RuleBook, default_rules_text, parse_rules, variables_from_tenants

BACKENDS = ("embedded", "distributed")
DEFAULT_EVENTS = 1_000_000
BENCH_KEY_BYTES = 32
#: The budget (DESIGN §5): checked and reported, never asserted by a test.
BUDGET_SECONDS_PER_MILLION = 60.0
BUDGET_STAGE_P99_US = 100.0
BUDGET_PEAK_RSS_MB = 500.0


class BenchFailed(Exception):
    """The run gave a wrong answer (or could not run): the message says what is wrong."""


# --------------------------------------------------------------------------------------------
# Result


class BenchResult(msgspec.Struct, kw_only=True):
    """One bench run. `correct` is False (and `problems` says why) for a wrong answer."""

    backend: str
    mode: str
    events: int
    approved: int
    posted: int
    seconds: float
    events_per_second: float
    shards: int
    stage_p50_us: dict[str, float]
    stage_p99_us: dict[str, float]
    e2e_latency_p50_ms: float
    e2e_latency_p99_ms: float
    latency_offered_per_second: float
    latency_events: int
    latency_achieved_per_second: float
    peak_rss_mb: float
    peak_rss_mb_per_process: float
    limit_rows: int
    limit_row_bytes: int
    limit_rows_per_second: float
    limit_ratio: float
    archived_events: int
    archived_bytes_per_authorization: float
    database_bytes: int
    correct: bool
    problems: list[str] = msgspec.field(default_factory=list)
    #: CPU (user + system, all shards) and storage writes per approved authorization: less
    #: noisy than the wall clock on a shared machine
    cpu_us_per_authorization: float = 0.0
    #: the same by process kind (distributed: workers, publisher, nats-server, postgresql)
    cpu_us_by_process: dict[str, float] = msgspec.field(default_factory=dict)
    written_bytes_per_authorization: float = 0.0
    #: per-stage CPU time per event (thread CPU: not inflated by other processes)
    stage_cpu_p50_us: dict[str, float] = msgspec.field(default_factory=dict)
    stage_cpu_p99_us: dict[str, float] = msgspec.field(default_factory=dict)
    within_budget: dict[str, bool] = msgspec.field(default_factory=dict)
    commit: str = ""
    machine: str = ""
    cpus: int = 0
    date: str = ""
    data_dir: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(self)
        return out


# --------------------------------------------------------------------------------------------
# Inputs (not timed)


def bench_rulebook(refdata: Any) -> RuleBook:
    return parse_rules(
        default_rules_text(),
        source="<default rules>",
        tenant_variables=variables_from_tenants(refdata.tenants.values()),
    )


def _generate_logs(
    events: int, master: bytes, seed: int, mode: str, dest: str
) -> list[tuple[bytes, str]]:
    """Child process: write the demo logs into DEST; returns (encoded config, path) pairs."""
    from paypost.demo import demo_inputs

    out: list[tuple[bytes, str]] = []
    with demo_inputs(events, master, seed=seed, mode=mode) as inputs:
        for source in inputs.sources:
            assert source.path is not None
            target = Path(dest) / source.path.name
            shutil.move(str(source.path), target)
            out.append((msgspec.json.encode(source.config), str(target)))
    return out


def generate_sources(
    events: int, master: bytes, seed: int, mode: str, dest: Path, *, in_process: bool = False
) -> list[Source]:
    """The demo's ISO 8583 logs for EVENTS authorizations, one per tenant, written into DEST.

    Generated in a child process (the generator holds every authorization in memory)."""
    if in_process:
        pairs = _generate_logs(events, master, seed, mode, str(dest))
    else:
        ctx = mp.get_context("spawn")
        with ctx.Pool(1) as pool:
            pairs = pool.apply(_generate_logs, (events, master, seed, mode, str(dest)))
    decoder = msgspec.json.Decoder(ingest_stage.SourceConfig)
    return [Source(config=decoder.decode(cfg), path=Path(path)) for cfg, path in pairs]


def shard_sources(sources: Sequence[Source], shards: int) -> list[list[Source]]:
    """Whole tenants per shard (a tenant's ledger lives in one database), biggest first onto
    the least loaded shard (input size as the load)."""
    by_tenant: dict[str, list[Source]] = {}
    for s in sources:
        by_tenant.setdefault(s.config.tenant, []).append(s)

    def size(group: list[Source]) -> int:
        return sum(s.path.stat().st_size if s.path else 0 for s in group)

    n = max(1, min(shards, len(by_tenant)))
    out: list[list[Source]] = [[] for _ in range(n)]
    loads = [0] * n
    for group in sorted(by_tenant.values(), key=size, reverse=True):
        i = loads.index(min(loads))
        out[i] += group
        loads[i] += size(group)
    return [g for g in out if g]


# --------------------------------------------------------------------------------------------
# One shard (a worker process, or in-process for profiling)


@dataclass
class ShardReport:
    """What a shard sends back (plain data: it crosses a process boundary)."""

    shard: int
    seconds: float
    approved: int
    posted: int
    records: int
    #: per stage: `StageMetrics.to_dict` (each batch's events, wall and CPU µs per event)
    stage_times: dict[str, dict[str, Any]]
    latency: list[tuple[float, int]]
    peak_rss_mb: float
    archived_events: int
    archived_bytes: int
    database_bytes: int
    problems: list[str] = field(default_factory=list)
    #: CPU seconds (user + system) and bytes written to storage during the run
    cpu_seconds: float = 0.0
    written_bytes: int = 0


def check_shard(job: Job, totals: RunTotals, seconds: float, mode: str) -> tuple[Any, list[str]]:
    """The answer a fast run must get right (module docs, step 3). Returns (summary, problems)."""
    summary = job.summary(totals, seconds, mode)
    problems: list[str] = []
    conn = job.bus.conn
    if summary.in_flight:
        problems.append(f"{summary.in_flight} events still in flight after the drain")
    if summary.accounted != summary.approved:
        problems.append(
            f"{summary.approved} approved authorizations but {summary.accounted} in a terminal "
            f"state (posted {summary.posted}, parked {summary.parked_duplicates}, held "
            f"{summary.held}, rejected {summary.rejected}, dead-lettered {summary.dead_lettered})"
        )
    if summary.dead_lettered:
        problems.append(f"{summary.dead_lettered} events dead-lettered (see `paypost dlq list`)")
    (entries,) = conn.execute("SELECT count(*) FROM ledger_entries").fetchone()
    if entries != summary.posted:
        problems.append(f"{entries} journal entries for {summary.posted} posted authorizations")
    if not summary.trial_balance_zero:
        problems.append(f"trial balance is not zero: {summary.trial_balance}")
    path = job.data_dir / POSTING_FILE
    if summary.posted:
        check = verify_file(path)
        problems += [f"posting file: {p}" for p in check.problems[:5]]
        if check.records != summary.posted:
            problems.append(
                f"posting file holds {check.records} records for {summary.posted} posted "
                "authorizations"
            )
    return summary, problems


def _storage_stats(job: Job) -> tuple[int, int, int]:
    conn = job.bus.conn
    n, size = conn.execute(
        "SELECT count(*), coalesce(sum(length(body)), 0) FROM bus_archive"
    ).fetchone()
    db = job.data_dir / bus_sqlite.DB_FILENAME
    on_disk = sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())
    return int(n), int(size), on_disk


def run_shard(
    shard: int,
    data_dir: Path,
    sources: Sequence[Source],
    events: int,
    master: bytes,
    seed: int,
    settings: PipelineSettings,
    *,
    ready: Callable[[], None] = lambda: None,
    progress: Callable[[int], None] = lambda n: None,
    cache_mb: int | None = None,
) -> ShardReport:
    """Set up a Job on DATA_DIR, call READY (the clock starts when every shard is ready),
    run SOURCES through it, check the answer."""
    from paypost.demo import demo_refdata
    from paypost.runner import peak_rss_mb

    # whole tenants per shard: hold only their reference data
    tenants = {s.config.tenant for s in sources}
    refdata = demo_refdata(events, master, seed, tenants=tenants).refdata
    job = Job(data_dir, refdata, bench_rulebook(refdata), settings, master)
    if cache_mb is not None:
        job.bus.conn.execute(f"PRAGMA cache_size=-{int(cache_mb) * 1024}")
    try:
        ready()
        cpu0, written0 = _cpu_and_written()
        started = time.perf_counter()
        totals, _ = job.run(
            sources, on_batch=lambda b, o, s: progress(b.counts.approved + b.counts.declined)
        )
        seconds = time.perf_counter() - started
        cpu1, written1 = _cpu_and_written()
        peak = peak_rss_mb()  # the pipeline's peak: before the checks read the posting file
        summary, problems = check_shard(job, totals, seconds, settings.mode)
        archived, archived_bytes, on_disk = _storage_stats(job)
        return ShardReport(
            shard=shard,
            seconds=seconds,
            approved=totals.approved,
            posted=summary.posted,
            records=totals.records,
            stage_times={n: m.to_dict() for n, m in job.pipeline.metrics.items()},
            latency=totals.batch_latency_s,
            peak_rss_mb=peak,
            archived_events=archived,
            archived_bytes=archived_bytes,
            database_bytes=on_disk,
            problems=problems,
            cpu_seconds=cpu1 - cpu0,
            written_bytes=written1 - written0,
        )
    finally:
        job.close()


def _cpu_and_written() -> tuple[float, int]:
    """This process's CPU seconds (user + system, all threads) and bytes written so far."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    try:
        written = int(psutil.Process().io_counters().write_bytes)
    except (psutil.Error, AttributeError):
        written = 0
    return ru.ru_utime + ru.ru_stime, written


def _shard_process(
    shard: int,
    data_dir: str,
    sources: list[tuple[bytes, str]],
    events: int,
    master: bytes,
    seed: int,
    mode: str,
    batch_size: int | None,
    cache_mb: int | None,
    barrier: Any,
    counter: Any,
    results: Any,
) -> None:
    """Worker process entry point (spawned): one shard, its report put on RESULTS."""
    from paypost.logs import configure_logging

    log = Path(data_dir) / "logs"
    log.mkdir(parents=True, exist_ok=True)
    configure_logging("info", json=True, stream=(log / "paypost.jsonl").open("a"))
    decoder = msgspec.json.Decoder(ingest_stage.SourceConfig)
    srcs = [Source(config=decoder.decode(c), path=Path(p)) for c, p in sources]

    def progress(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    try:
        report = run_shard(
            shard,
            Path(data_dir),
            srcs,
            events,
            master,
            seed,
            PipelineSettings(mode=mode, batch_size=batch_size),  # type: ignore[arg-type]
            ready=lambda: barrier.wait(),
            progress=progress,
            cache_mb=cache_mb,
        )
        results.put(msgspec.json.encode(report))
    except BaseException as exc:  # reported to the parent, which fails with the reason
        barrier.abort()
        results.put(msgspec.json.encode({"shard": shard, "error": repr(exc)}))
        raise


def _rss_mb() -> float:
    rss: float = psutil.Process().memory_info().rss / (1024 * 1024)
    return rss


@dataclass
class ThroughputRun:
    seconds: float
    reports: list[ShardReport]
    #: sum over the shard processes of their peak RSS while running, plus this process's
    #: RSS: an upper bound of the peak of the sum
    peak_rss_total_mb: float
    peak_rss_single_mb: float


def run_throughput(
    data_dir: Path,
    sources: Sequence[Source],
    events: int,
    master: bytes,
    seed: int,
    settings: PipelineSettings,
    shards: int,
    *,
    progress: Callable[[int], None] = lambda n: None,
    in_process: bool = False,
    cache_mb: int | None = None,
) -> ThroughputRun:
    """Run SOURCES through SHARDS shard processes (module docs, step 2)."""
    groups = shard_sources(sources, shards)
    if in_process and len(groups) == 1:
        report = run_shard(
            0,
            data_dir / "shard-0",
            groups[0],
            events,
            master,
            seed,
            settings,
            progress=progress,
            cache_mb=cache_mb,
        )
        return ThroughputRun(report.seconds, [report], report.peak_rss_mb, report.peak_rss_mb)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(groups) + 1)
    counter = ctx.Value("q", 0)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_shard_process,
            name=f"paypost-bench-shard-{i}",
            args=(
                i,
                str(data_dir / f"shard-{i}"),
                [(msgspec.json.encode(s.config), str(s.path)) for s in group],
                events,
                master,
                seed,
                settings.mode,
                settings.batch_size,
                cache_mb,
                barrier,
                counter,
                results,
            ),
        )
        for i, group in enumerate(groups)
    ]
    for p in procs:
        p.start()
    reports: list[ShardReport] = []
    errors: list[str] = []
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait(timeout=600)
    seen = 0
    pending = len(procs)
    while pending:
        try:
            blob_out = results.get(timeout=0.2)
        except Exception:  # queue.Empty
            if not any(p.is_alive() for p in procs) and results.empty():
                errors.append("a shard process died without a report")
                break
            blob_out = None
        now_seen = counter.value
        if now_seen != seen:
            progress(now_seen - seen)
            seen = now_seen
        if blob_out is None:
            continue
        pending -= 1
        raw = msgspec.json.decode(blob_out)
        if "error" in raw:
            errors.append(f"shard {raw['shard']}: {raw['error']}")
            continue
        report = msgspec.convert(raw, ShardReport)
        reports.append(report)
    now_seen = counter.value
    if now_seen != seen:
        progress(now_seen - seen)
    for p in procs:
        p.join(timeout=60)
    if errors:
        raise BenchFailed("; ".join(errors))
    seconds = max(r.seconds for r in reports)
    return ThroughputRun(
        seconds,
        sorted(reports, key=lambda r: r.shard),
        sum(r.peak_rss_mb for r in reports) + _rss_mb(),
        max(r.peak_rss_mb for r in reports),
    )


# --------------------------------------------------------------------------------------------
# Latency at a fixed offered load (realtime mode)


class PacedReader:
    """Wraps an ingest reader: releases each batch at its scheduled arrival time (a fixed
    rate, shared by every source of the run) and remembers when it was due."""

    def __init__(
        self, inner: ingest_stage.IngestReader, schedule: _Schedule, stop_after: int
    ) -> None:
        self.inner = inner
        self.edge = inner.edge
        self.schedule = schedule
        self.stop_after = stop_after

    def batches(self, final: bool = False) -> Iterator[ingest_stage.IngestBatch]:
        for batch in self.inner.batches(final=final):
            if self.schedule.authorizations >= self.stop_after:
                return
            c = batch.counts  # authorizations (a record is a log line: request or response)
            due = self.schedule.next_due(c.approved + c.declined + c.timed_out + c.quarantined)
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            self.schedule.due.append(due)
            yield batch


@dataclass
class _Schedule:
    rate: float
    start: float
    authorizations: int = 0
    due: list[float] = field(default_factory=list)

    def next_due(self, n: int) -> float:
        """When a batch of N authorizations is due: after the ones before it."""
        at = self.start + self.authorizations / self.rate
        self.authorizations += n
        return at


@dataclass
class LatencyRun:
    offered: float
    events: int
    seconds: float
    latencies_ms: list[float]
    problems: list[str]

    def p(self, q: float) -> float:
        return percentile(self.latencies_ms, q)


def latency_shard(
    data_dir: Path,
    sources: Sequence[Source],
    refdata_events: int,
    master: bytes,
    seed: int,
    rate: float,
    wanted: int,
    *,
    ready: Callable[[], None] = lambda: None,
) -> tuple[list[float], float, list[str]]:
    """One shard of the latency run: SOURCES in realtime mode, paced to RATE authorizations/s
    until WANTED of them; returns (latencies in ms, seconds, problems)."""
    from paypost.demo import demo_refdata

    tenants = {s.config.tenant for s in sources}
    refdata = demo_refdata(refdata_events, master, seed, tenants=tenants).refdata
    job = Job(data_dir, refdata, bench_rulebook(refdata), PipelineSettings(mode="realtime"), master)
    latencies: list[float] = []
    try:
        ready()
        schedule = _Schedule(rate=rate, start=time.perf_counter() + 0.05)
        totals = RunTotals()

        def on_batch(batch: ingest_stage.IngestBatch, outcome: Any, secs: float) -> None:
            done = time.perf_counter()
            due = schedule.due[-1]
            for _ in range(len(batch.events)):
                latencies.append((done - due) * 1000)

        for source in sources:
            if schedule.authorizations >= wanted:
                break
            reader = ingest_stage.open_reader(source.config, job.keys, path=source.path)
            paced = PacedReader(reader, schedule, wanted)
            part = job.pipeline.run_reader(paced, final=True, on_batch=on_batch)  # type: ignore[arg-type]
            totals.approved += part.approved
            for k, v in part.counts.items():
                totals.counts[k] = totals.counts.get(k, 0) + v
        elapsed = time.perf_counter() - schedule.start
        job.pipeline.drain()
        job.pipeline.export_postings()
        _, problems = check_shard(job, totals, elapsed, "realtime")
    finally:
        job.close()
    return latencies, elapsed, problems


def _latency_process(
    data_dir: str,
    sources: list[tuple[bytes, str]],
    refdata_events: int,
    master: bytes,
    seed: int,
    rate: float,
    wanted: int,
    barrier: Any,
    results: Any,
) -> None:
    """Worker process entry point (spawned): one latency shard."""
    from paypost.logs import configure_logging

    log = Path(data_dir) / "logs"
    log.mkdir(parents=True, exist_ok=True)
    configure_logging("info", json=True, stream=(log / "paypost.jsonl").open("a"))
    decoder = msgspec.json.Decoder(ingest_stage.SourceConfig)
    srcs = [Source(config=decoder.decode(c), path=Path(p)) for c, p in sources]
    try:
        out = latency_shard(
            Path(data_dir),
            srcs,
            refdata_events,
            master,
            seed,
            rate,
            wanted,
            ready=lambda: barrier.wait(),
        )
        results.put(
            msgspec.json.encode({"latencies": out[0], "seconds": out[1], "problems": out[2]})
        )
    except BaseException as exc:
        barrier.abort()
        results.put(msgspec.json.encode({"error": repr(exc)}))
        raise


def run_latency(
    data_dir: Path,
    master: bytes,
    seed: int,
    rate: float,
    seconds: float,
    scratch: Path,
    shards: int = 0,
) -> LatencyRun:
    """Realtime mode at RATE authorizations/s in all for SECONDS (module docs, step 4),
    sharded like the throughput run (SHARDS 0: one per tenant), the load split evenly."""
    wanted = max(1, int(rate * seconds))
    # Generate enough for the busiest tenant to reach its share (tenants are near equal).
    refdata_events = int(wanted * 1.3) + 150
    sources = generate_sources(
        refdata_events, master, seed + 1, "realtime", scratch, in_process=True
    )
    groups = shard_sources(sources, shards or len({s.config.tenant for s in sources}))
    share_rate = rate / len(groups)
    share = max(1, wanted // len(groups))
    if len(groups) == 1:
        lat, secs, found = latency_shard(
            data_dir, groups[0], refdata_events, master, seed + 1, share_rate, share
        )
        return LatencyRun(rate, len(lat), secs, lat, found)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(groups))
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_latency_process,
            name=f"paypost-bench-latency-{i}",
            args=(
                str(data_dir / f"shard-{i}"),
                [(msgspec.json.encode(s.config), str(s.path)) for s in group],
                refdata_events,
                master,
                seed + 1,
                share_rate,
                share,
                barrier,
                results,
            ),
        )
        for i, group in enumerate(groups)
    ]
    for p in procs:
        p.start()
    latencies: list[float] = []
    problems: list[str] = []
    longest = 0.0
    deadline = time.monotonic() + 600 + seconds
    pending = len(procs)
    while pending:
        try:
            raw = msgspec.json.decode(results.get(timeout=0.2))
        except Exception:  # queue.Empty
            alive = any(p.is_alive() for p in procs)
            if (not alive and results.empty()) or time.monotonic() > deadline:
                problems.append("a latency shard process died without a report")
                break
            continue
        pending -= 1
        if "error" in raw:
            problems.append(f"latency shard: {raw['error']}")
            continue
        latencies += raw["latencies"]
        longest = max(longest, raw["seconds"])
        problems += raw["problems"]
    for p in procs:
        p.join(timeout=60)
    return LatencyRun(rate, len(latencies), longest, latencies, problems)


# --------------------------------------------------------------------------------------------
# The storage limit


def _limit_body(row_bytes: int) -> bytes:
    """A row body of ROW_BYTES (at least 1) random hex digits, which barely compress: the
    limit measured is the store's, not its compressor's."""
    n = max(1, row_bytes)
    return os.urandom(n // 2 + 1).hex().encode()[:n]


def storage_limit(path: Path, rows: int, row_bytes: int, batch: int) -> float:
    """Rows/s of batched inserts of ROWS rows of ROW_BYTES into a fresh SQLite file at PATH,
    with paypost's pragmas (WAL, synchronous=FULL) and BATCH rows per transaction."""
    conn = bus_sqlite.connect(path)
    try:
        conn.execute(
            "CREATE TABLE limit_rows (id INTEGER PRIMARY KEY, at REAL NOT NULL, body BLOB NOT NULL)"
        )
        body = _limit_body(row_bytes)
        started = time.perf_counter()
        done = 0
        while done < rows:
            n = min(batch, rows - done)
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO limit_rows VALUES (?, ?, ?)",
                [(done + i + 1, time.time(), body) for i in range(n)],
            )
            conn.execute("COMMIT")
            done += n
        return rows / (time.perf_counter() - started)
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# The distributed backend (NATS JetStream + PostgreSQL, DESIGN §4)


@dataclass
class DistributedRun:
    seconds: float
    approved: int
    posted: int
    workers: int
    peak_rss_total_mb: float
    peak_rss_single_mb: float
    problems: list[str]
    #: CPU seconds of the timed part: workers, publisher, nats-server, postgresql
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    #: per stage: every batch of the workers (events, wall and CPU µs per event)
    stage_times: dict[str, StageMetrics] = field(default_factory=dict)
    archived_events: int = 0
    archived_bytes: int = 0
    #: the PostgreSQL the run used (for the storage limit)
    db_url: str = ""


#: rows of the distributed storage limit (PostgreSQL COPY), at most: at 1,000,000 the full
#: count would write ~10 GB for a rate that 200,000 rows already measure
DISTRIBUTED_LIMIT_ROWS = 200_000


def service_cpu_s() -> dict[str, float]:
    """CPU seconds used so far by nats-server and PostgreSQL on this machine (the
    postmaster's reaped backends included): they share the cores with paypost, so they count
    in the budget. Other users of the same servers add to it."""
    out = {"nats-server": 0.0, "postgresql": 0.0}
    for proc in psutil.process_iter(["name", "ppid"]):
        try:
            name = proc.info["name"] or ""
            t = proc.cpu_times()
            if name.startswith("nats-server"):
                out["nats-server"] += t.user + t.system
            elif name == "postgres":
                out["postgresql"] += t.user + t.system
                if psutil.Process(proc.info["ppid"]).name() != "postgres":  # the postmaster
                    out["postgresql"] += t.children_user + t.children_system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def pg_storage_limit(db_url: str, rows: int, row_bytes: int, batch: int) -> float:
    """Rows/s of binary COPY of ROWS rows of ROW_BYTES into a fresh PostgreSQL table, BATCH
    rows per transaction (the raw limit of the distributed backend's store, measured like
    `storage_limit`); the table's schema is dropped afterwards."""
    import uuid

    import psycopg
    from psycopg import sql

    schema = sql.Identifier(f"bench_limit_{uuid.uuid4().hex[:8]}")
    body = _limit_body(row_bytes)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
        try:
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {}.limit_rows (id bigint PRIMARY KEY, "
                    "at double precision NOT NULL, body bytea NOT NULL)"
                ).format(schema)
            )
            # stored as paypost stores its bodies: not compressed by PostgreSQL
            conn.execute(
                sql.SQL("ALTER TABLE {}.limit_rows ALTER body SET STORAGE EXTERNAL").format(schema)
            )
            copy_sql = sql.SQL("COPY {}.limit_rows (id, at, body) FROM STDIN (FORMAT BINARY)")
            started = time.perf_counter()
            done = 0
            while done < rows:
                n = min(batch, rows - done)
                with (
                    conn.transaction(),
                    conn.cursor() as cur,
                    cur.copy(copy_sql.format(schema)) as copy,
                ):
                    copy.set_types(["int8", "float8", "bytea"])
                    now = time.time()
                    for i in range(n):
                        copy.write_row((done + i + 1, now, body))
                done += n
            return rows / (time.perf_counter() - started)
        finally:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(schema))


def _distributed_job(
    events: int, master: bytes, seed: int, settings: PipelineSettings
) -> tuple[Any, Any]:
    """A distributed job under a fresh prefix (its settings, the job): reference data of the
    generator's EVENTS and SEED, the bench's rules, SETTINGS published for the workers."""
    import uuid

    from paypost.demo import demo_refdata
    from paypost.distributed.runtime import DistributedJob, load_settings

    dsettings = load_settings(prefix=f"bench_{uuid.uuid4().hex[:8]}")
    refdata = demo_refdata(events, master, seed).refdata
    try:
        job = DistributedJob(
            settings=dsettings,
            refdata=refdata,
            rulebook=bench_rulebook(refdata),
            rules_text=default_rules_text(),
            rules_source="<default rules>",
            pipeline_settings=settings,
            master_key=master,
            in_process_workers=False,
        )
    except Exception as exc:
        raise UserError(
            f"--backend distributed: cannot reach NATS JetStream / PostgreSQL ({exc!r}); start "
            "them (docs/deployment.md) and set PAYPOST_BUS_URL / PAYPOST_DB_URL."
        ) from None
    return dsettings, job


@contextlib.contextmanager
def _distributed_workers(
    dsettings: Any, master: bytes, root: Path, workers: int
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """WORKERS `paypost serve --backend distributed --fused` processes for DSETTINGS' prefix,
    each with its data directory (log, stage times) under ROOT; stopped with SIGTERM (each
    finishes its batch and writes its stage times) when the block ends."""
    import base64
    import sys

    env = dict(os.environ)
    env.update(
        PAYPOST_BUS_URL=dsettings.bus_url,
        PAYPOST_DB_URL=dsettings.db_url,
        PAYPOST_PREFIX=dsettings.prefix,
        PAYPOST_VAULT_KEY=base64.b64encode(master).decode(),
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(workers):
            wdir = root / f"worker-{i}"
            wdir.mkdir(parents=True, exist_ok=True)
            procs.append(
                subprocess.Popen(
                    [
                        *(sys.executable, "-c", "from paypost.cli import main; main()"),
                        *("serve", "--backend", "distributed", "--fused"),
                        *("--data-dir", str(wdir)),
                    ],
                    env=env,
                    stdout=(wdir / "worker.log").open("wb"),
                    stderr=subprocess.STDOUT,
                )
            )
        time.sleep(3)  # the workers load the published configuration (not timed)
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def _check_workers(procs: Sequence[subprocess.Popen[bytes]], root: Path) -> None:
    for p in procs:
        if p.poll() is not None:
            raise BenchFailed(
                f"a distributed worker exited with status {p.returncode}; see "
                f"{root}/worker-*/worker.log"
            )


def _run_problems(rep: Any) -> list[str]:
    """What is wrong with a finished distributed run (empty: the answer is right)."""
    problems = []
    if not rep.complete:
        problems.append(
            f"not complete: {rep.terminal()} of {rep.approved} approved in a terminal "
            f"state, {rep.in_flight} in flight"
        )
    if rep.dead_lettered:
        problems.append(f"{rep.dead_lettered} dead-lettered")
    if rep.journal_entries != rep.posted:
        problems.append(f"{rep.journal_entries} journal entries for {rep.posted} posted")
    if not rep.trial_balance_zero:
        problems.append(f"trial balance is not zero: {rep.trial_balance}")
    return problems


def run_distributed(
    root: Path,
    sources: Sequence[Source],
    events: int,
    master: bytes,
    seed: int,
    settings: PipelineSettings,
    workers: int,
    *,
    progress: Callable[[int], None] = lambda n: None,
) -> DistributedRun:
    """Ingest SOURCES into the distributed backbone and time them to posted: WORKERS
    `paypost serve --backend distributed --fused` processes consume (each runs every stage of
    a batch in one PostgreSQL transaction), this process publishes. Uses PAYPOST_BUS_URL /
    PAYPOST_DB_URL (default: NATS and PostgreSQL on 127.0.0.1) under a fresh prefix that is
    destroyed afterwards."""
    from paypost.distributed.runtime import (
        STAGE_TIMES_FILE,
        RunReport,
        destroy,
        ingest_sources,
        read_stage_times,
        wait_for_completion,
    )

    dsettings, job = _distributed_job(events, master, seed, settings)
    peak_total = peak_single = 0.0
    try:
        with _distributed_workers(dsettings, master, root, workers) as procs:
            worker_cpu0 = {p.pid: _process_cpu_s(p.pid) for p in procs}
            worker_cpu = dict(worker_cpu0)
            services0 = service_cpu_s()
            own0 = time.process_time()
            started = time.perf_counter()
            ingest_sources(
                job.pipeline,
                [(s.config, s.path) for s in sources if s.path is not None],
                job.keys,
                on_batch=progress,
            )
            approved = job.pipeline.ingest_totals()["approved"]

            def on_poll(rep: RunReport) -> None:
                nonlocal peak_total, peak_single
                sizes = []
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        proc = psutil.Process(p.pid)
                        sizes.append(proc.memory_info().rss / 2**20)
                        t = proc.cpu_times()
                        worker_cpu[p.pid] = t.user + t.system
                peak_total = max(peak_total, sum(sizes) + _rss_mb())
                peak_single = max([peak_single, *sizes])
                _check_workers(procs, root)

            rep = wait_for_completion(
                job.pipeline, started, approved, timeout_s=3600, poll_s=0.5, on_poll=on_poll
            )
            seconds = time.perf_counter() - started
            services1 = service_cpu_s()
            cpu = {
                "workers": sum(worker_cpu[pid] - worker_cpu0[pid] for pid in worker_cpu),
                "publisher": time.process_time() - own0,
                **{k: services1[k] - services0[k] for k in services1},
            }
            archived_events = job.pipeline.bus.archive_count()
            archived_bytes = job.pipeline.bus.archive_bytes()
    finally:
        job.close()
        destroy(dsettings)
    return DistributedRun(
        seconds,
        rep.approved,
        rep.posted,
        workers,
        peak_total,
        peak_single,
        _run_problems(rep),
        cpu_seconds=cpu,
        # written by each worker as it stops (`paypost serve`)
        stage_times=read_stage_times(
            [root / f"worker-{i}" / STAGE_TIMES_FILE for i in range(workers)]
        ),
        archived_events=archived_events,
        archived_bytes=archived_bytes,
        db_url=dsettings.db_url,
    )


def run_distributed_latency(
    root: Path,
    master: bytes,
    seed: int,
    rate: float,
    seconds: float,
    scratch: Path,
    workers: int,
) -> LatencyRun:
    """Realtime mode on the distributed backbone at RATE authorizations/s for SECONDS: the
    publisher releases each authorization at its scheduled arrival (one ingest transaction
    each, `PacedReader`), WORKERS fused workers post it; its latency runs from the scheduled
    arrival to the `posted_at` its ledger entry was given in the posting transaction (open
    loop: a backlog counts). Only posted authorizations have a latency."""
    from psycopg import sql

    from paypost.distributed.runtime import destroy, wait_for_completion
    from paypost.events import derive_event_id
    from paypost.iso.iso20022 import transaction_ref_for
    from paypost.stages.dedup import STAGE as DEDUP_STAGE
    from paypost.stages.post import sequence_id_for

    wanted = max(1, int(rate * seconds))
    refdata_events = int(wanted * 1.3) + 150
    sources = generate_sources(
        refdata_events, master, seed + 1, "realtime", scratch, in_process=True
    )
    dsettings, job = _distributed_job(
        refdata_events, master, seed + 1, PipelineSettings(mode="realtime")
    )
    due_at: dict[str, float] = {}  # ledger entry id -> scheduled arrival (epoch seconds)
    problems: list[str] = []
    try:
        with _distributed_workers(dsettings, master, root, workers) as procs:
            # the schedule runs on perf_counter; ledger times are epoch microseconds
            epoch = time.time() - time.perf_counter()
            schedule = _Schedule(rate=rate, start=time.perf_counter() + 0.05)
            for source in sources:
                if source.path is None or schedule.authorizations >= wanted:
                    continue
                reader = ingest_stage.open_reader(source.config, job.keys, path=source.path)
                for batch in PacedReader(reader, schedule, wanted).batches(final=True):
                    job.pipeline.publish_batch(batch)
                    for ev in batch.events:
                        accepted = derive_event_id(ev.id, DEDUP_STAGE, 0)
                        entry = sequence_id_for(ev.tenant, transaction_ref_for(accepted))
                        due_at[entry] = epoch + schedule.due[-1]
                _check_workers(procs, root)
            elapsed = time.perf_counter() - schedule.start
            approved = job.pipeline.ingest_totals()["approved"]
            rep = wait_for_completion(
                job.pipeline,
                schedule.start,
                approved,
                timeout_s=600,
                poll_s=0.2,
                on_poll=lambda _: _check_workers(procs, root),
            )
        problems += _run_problems(rep)
        latencies: list[float] = []
        conn = job.pipeline.bus.db()
        for tenant in sorted(job.refdata.tenants):
            query = sql.SQL("SELECT id, posted_at FROM {}.ledger_entries").format(
                sql.Identifier(job.pipeline.ledger.schema(tenant))
            )
            for entry_id, posted_us in conn.execute(query):
                if entry_id in due_at:
                    latencies.append((posted_us / 1e6 - due_at[entry_id]) * 1000)
        if len(latencies) != rep.posted:
            problems.append(
                f"latency: {len(latencies)} of {rep.posted} posted entries matched an arrival"
            )
    finally:
        job.close()
        destroy(dsettings)
    return LatencyRun(rate, len(latencies), elapsed, latencies, problems)


#: the stage figures a bench reports: (quantile, CPU time?) for p50, p99, CPU p50, CPU p99
_QUANTILES = ((0.5, False), (0.99, False), (0.5, True), (0.99, True))


def _stage_quantiles(stages: dict[str, StageMetrics], q: float, cpu: bool) -> dict[str, float]:
    """Per stage (pipeline order), the Q-quantile over events of its time per event."""
    return {n: round(stages[n].p(q, cpu=cpu), 2) for n in STAGE_ORDER if n in stages}


def _process_cpu_s(pid: int) -> float:
    try:
        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return 0.0


# --------------------------------------------------------------------------------------------
# The whole bench


def machine() -> tuple[str, int]:
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return model, os.cpu_count() or 1


def git_commit(cwd: Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=cwd or Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


@dataclass
class BenchOptions:
    events: int = DEFAULT_EVENTS
    backend: str = "embedded"
    mode: Mode = "batch"
    batch_size: int | None = None
    shards: int = 0  # 0: one per tenant (whole tenants per shard, never more than tenants)
    seed: int = 7
    latency_rate: float = 500.0
    latency_seconds: float = 3.0
    limit: bool = True
    data_dir: Path | None = None
    in_process: bool = False
    #: SQLite page cache per shard connection, MB (None: paypost's default, 32 MB)
    cache_mb: int | None = None


def run_bench(
    options: BenchOptions,
    *,
    on_phase: Callable[[str, int | None], None] = lambda phase, total: None,
    on_progress: Callable[[int], None] = lambda n: None,
) -> BenchResult:
    """The whole bench (module docs). Raises BenchFailed only when it cannot run at all; a
    wrong answer comes back with `correct=False` and the problems."""
    if options.backend not in BACKENDS:
        raise UserError(f"--backend {options.backend!r}: use one of {', '.join(BACKENDS)}.")
    if options.events < 1:
        raise UserError("--events must be at least 1.")
    commit = git_commit()  # of the code that runs (taken before anything else happens)
    master = os.urandom(BENCH_KEY_BYTES)
    own_dir = options.data_dir is None
    root = (
        Path(tempfile.mkdtemp(prefix="paypost-bench-"))
        if options.data_dir is None
        else options.data_dir
    )
    root.mkdir(parents=True, exist_ok=True)
    if any(root.glob("shard-*")):
        raise UserError(
            f"--data-dir {str(root)!r} already holds a bench run (shard-* directories); "
            "give an empty directory, or leave --data-dir out for a fresh temporary one."
        )
    upstream = Path(tempfile.mkdtemp(prefix="paypost-bench-upstream-"))
    os.chmod(upstream, 0o700)
    settings = PipelineSettings(mode=options.mode, batch_size=options.batch_size)
    try:
        on_phase("generating authorizations (not timed)", None)
        sources = generate_sources(
            options.events,
            master,
            options.seed,
            options.mode,
            upstream,
            in_process=options.in_process,
        )
        # Default: one shard per tenant (whole tenants per shard; the OS spreads them).
        shards = options.shards or len({s.config.tenant for s in sources})
        on_phase("ingest → posted", options.events)
        # what both backends' throughput runs take first
        inputs = (root, sources, options.events, master, options.seed, settings)
        if options.backend == "distributed":
            drun = run_distributed(*inputs, options.shards or 2, progress=on_progress)
            dlatency = None
            if options.latency_seconds > 0 and options.latency_rate > 0:
                on_phase(f"realtime latency at {options.latency_rate:,.0f}/s", None)
                dlatency = run_distributed_latency(
                    root / "latency",
                    master,
                    options.seed,
                    options.latency_rate,
                    options.latency_seconds,
                    upstream,
                    options.shards or 2,
                )
            limit = (0, 0.0)
            if options.limit and drun.approved:
                on_phase("storage limit (raw PostgreSQL COPY)", None)
                rows = min(options.events, DISTRIBUTED_LIMIT_ROWS)
                row_bytes = round(drun.archived_bytes / drun.approved)
                rps = pg_storage_limit(drun.db_url, rows, row_bytes, settings.records_per_batch())
                limit = (rows, rps)
            return _distributed_result(options, drun, commit, own_dir, root, limit, dlatency)
        run = run_throughput(
            *inputs,
            shards,
            progress=on_progress,
            in_process=options.in_process,
            cache_mb=options.cache_mb,
        )
        for s in sources:
            if s.path is not None:
                s.path.unlink(missing_ok=True)
        reports = run.reports
        problems = [f"shard {r.shard}: {p}" for r in reports for p in r.problems]
        approved = sum(r.approved for r in reports)
        posted = sum(r.posted for r in reports)
        archived = sum(r.archived_events for r in reports)
        archived_bytes = sum(r.archived_bytes for r in reports)
        latency = None
        if options.latency_seconds > 0 and options.latency_rate > 0:
            on_phase(f"realtime latency at {options.latency_rate:,.0f}/s", None)
            latency = run_latency(
                root / "latency",
                master,
                options.seed,
                options.latency_rate,
                options.latency_seconds,
                upstream,
                options.shards,
            )
            problems += [f"latency run: {p}" for p in latency.problems]
        per_auth_bytes = archived_bytes / approved if approved else 0.0
        limit_rps = 0.0
        if options.limit:
            on_phase("storage limit (raw SQLite inserts)", None)
            limit_rps = storage_limit(
                root / "limit.db",
                options.events,
                round(per_auth_bytes),
                settings.records_per_batch(),
            )
        eps = approved / run.seconds if run.seconds > 0 else 0.0
        stages: dict[str, StageMetrics] = {n: StageMetrics() for n in STAGE_ORDER}
        for r in reports:
            for n, data in r.stage_times.items():
                stages.setdefault(n, StageMetrics()).merge(data)
        p50, p99, cpu50, cpu99 = (_stage_quantiles(stages, q, cpu) for q, cpu in _QUANTILES)
        peak = run.peak_rss_total_mb
        model, ncpu = machine()
        result = BenchResult(
            backend=options.backend,
            mode=options.mode,
            events=options.events,
            approved=approved,
            posted=posted,
            seconds=round(run.seconds, 3),
            events_per_second=round(eps, 1),
            shards=len(reports),
            stage_p50_us=p50,
            stage_p99_us=p99,
            **_latency_fields(latency),
            peak_rss_mb=round(peak, 1),
            peak_rss_mb_per_process=round(run.peak_rss_single_mb, 1),
            limit_rows=options.events if options.limit else 0,
            limit_row_bytes=round(per_auth_bytes),
            limit_rows_per_second=round(limit_rps, 1),
            limit_ratio=round(eps / limit_rps, 3) if limit_rps else 0.0,
            archived_events=archived,
            archived_bytes_per_authorization=round(per_auth_bytes, 1),
            database_bytes=sum(r.database_bytes for r in reports),
            correct=not problems,
            problems=problems,
            cpu_us_per_authorization=round(
                sum(r.cpu_seconds for r in reports) * 1e6 / max(approved, 1), 1
            ),
            written_bytes_per_authorization=round(
                sum(r.written_bytes for r in reports) / max(approved, 1), 1
            ),
            stage_cpu_p50_us=cpu50,
            stage_cpu_p99_us=cpu99,
            commit=commit,
            machine=model,
            cpus=ncpu,
            date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            data_dir="" if own_dir else str(root),
        )
        result.within_budget = {
            "seconds": run.seconds * 1_000_000 / max(options.events, 1)
            <= BUDGET_SECONDS_PER_MILLION,
            "stage_p99": all(v < BUDGET_STAGE_P99_US for v in p99.values()),
            "stage_p99_cpu": all(v < BUDGET_STAGE_P99_US for v in cpu99.values()),
            "peak_rss": peak < BUDGET_PEAK_RSS_MB,
        }
        return result
    finally:
        shutil.rmtree(upstream, ignore_errors=True)
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)


def _latency_fields(latency: LatencyRun | None) -> dict[str, Any]:
    """The latency run's fields of a `BenchResult` (all 0 without a latency run)."""
    if latency is None:
        return {
            "e2e_latency_p50_ms": 0.0,
            "e2e_latency_p99_ms": 0.0,
            "latency_offered_per_second": 0.0,
            "latency_events": 0,
            "latency_achieved_per_second": 0.0,
        }
    return {
        "e2e_latency_p50_ms": round(latency.p(0.5), 3),
        "e2e_latency_p99_ms": round(latency.p(0.99), 3),
        "latency_offered_per_second": latency.offered,
        "latency_events": latency.events,
        "latency_achieved_per_second": (
            round(latency.events / latency.seconds, 1) if latency.seconds else 0.0
        ),
    }


def _distributed_result(
    options: BenchOptions,
    run: DistributedRun,
    commit: str,
    own_dir: bool,
    root: Path,
    limit: tuple[int, float] = (0, 0.0),
    latency: LatencyRun | None = None,
) -> BenchResult:
    """The distributed run's figures. Per-stage times come from the workers (each writes
    its own when it stops), the CPU from every process that serves the run, the storage
    limit from PostgreSQL (`pg_storage_limit`), the latency from `run_distributed_latency`."""
    approved = max(run.approved, 1)
    eps = run.approved / run.seconds if run.seconds > 0 else 0.0
    model, ncpu = machine()
    p50, p99, cpu50, cpu99 = (_stage_quantiles(run.stage_times, q, cpu) for q, cpu in _QUANTILES)
    per_auth_bytes = run.archived_bytes / approved
    limit_rows, limit_rps = limit
    cpu_by = {k: round(v * 1e6 / approved, 1) for k, v in run.cpu_seconds.items()}
    problems = run.problems + [f"latency run: {p}" for p in (latency.problems if latency else ())]
    result = BenchResult(
        backend="distributed",
        mode=options.mode,
        events=options.events,
        approved=run.approved,
        posted=run.posted,
        seconds=round(run.seconds, 3),
        events_per_second=round(eps, 1),
        shards=run.workers,
        stage_p50_us=p50,
        stage_p99_us=p99,
        **_latency_fields(latency),
        peak_rss_mb=round(run.peak_rss_total_mb, 1),
        peak_rss_mb_per_process=round(run.peak_rss_single_mb, 1),
        limit_rows=limit_rows,
        limit_row_bytes=round(per_auth_bytes),
        limit_rows_per_second=round(limit_rps, 1),
        limit_ratio=round(eps / limit_rps, 3) if limit_rps else 0.0,
        archived_events=run.archived_events,
        archived_bytes_per_authorization=round(per_auth_bytes, 1),
        database_bytes=0,
        correct=not problems,
        problems=problems,
        cpu_us_per_authorization=round(sum(cpu_by.values()), 1),
        cpu_us_by_process=cpu_by,
        stage_cpu_p50_us=cpu50,
        stage_cpu_p99_us=cpu99,
        commit=commit,
        machine=model,
        cpus=ncpu,
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        data_dir="" if own_dir else str(root),
    )
    result.within_budget = {
        "seconds": run.seconds * 1_000_000 / max(options.events, 1) <= 300.0,
        "stage_p99": all(v < BUDGET_STAGE_P99_US for v in result.stage_p99_us.values()),
        "stage_p99_cpu": all(v < BUDGET_STAGE_P99_US for v in result.stage_cpu_p99_us.values()),
        "peak_rss": run.peak_rss_total_mb < BUDGET_PEAK_RSS_MB,
    }
    return result


# --------------------------------------------------------------------------------------------
# docs/benchmarks.md


def markdown_row(r: BenchResult) -> str:
    """One line of the results table in docs/benchmarks.md."""
    p99 = max(r.stage_p99_us.values()) if r.stage_p99_us else 0.0
    cpu = max(r.stage_cpu_p99_us.values()) if r.stage_cpu_p99_us else 0.0
    return (
        f"| {r.date} | `{r.commit}` | {r.cpus} × {r.machine} | {r.backend} | {r.mode} | "
        f"{r.shards} | {r.events:,} | {r.seconds:.1f} | {r.events_per_second:,.0f} | "
        f"{p99:.0f} / {cpu:.0f} | "
        f"{r.e2e_latency_p99_ms:.1f} @ {r.latency_offered_per_second:,.0f}/s | "
        f"{r.peak_rss_mb:.0f} | {r.limit_rows_per_second:,.0f} | {r.limit_ratio:.2f} | "
        f"{'yes' if r.correct else 'NO'} |"
    )


RESULTS_HEADING = "### `paypost bench --record` results"
RESULTS_HEADER = (
    "| date | commit | machine | backend | mode | shards | authorizations | s | auth/s | "
    "worst stage p99 µs (wall / CPU) | e2e p99 ms @ offered | peak RSS MB | storage limit rows/s | "
    "paypost ÷ limit | correct |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def record(result: BenchResult, path: Path) -> None:
    """Append RESULT to the results table of PATH (created under its heading if missing)."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    row = markdown_row(result)
    if RESULTS_HEADING in text:
        head, _, tail = text.partition(RESULTS_HEADING)
        # The table is the block of `|` lines right after the heading.
        lines = tail.split("\n")
        i = 1
        while i < len(lines) and not lines[i].startswith("|"):
            i += 1
        while i < len(lines) and lines[i].startswith("|"):
            i += 1
        lines.insert(i, row)
        text = head + RESULTS_HEADING + "\n".join(lines)
    else:
        text = text.rstrip("\n") + f"\n\n{RESULTS_HEADING}\n\n{RESULTS_HEADER}\n{row}\n"
    path.write_text(text, encoding="utf-8")
