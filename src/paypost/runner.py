"""Run a whole job on the embedded default: open the data dir, ingest sources through the
pipeline, drain the durable queues, export the posting file and summarise (FR11, NFR1).

`paypost demo` and `paypost run` are both this, with generated or user-supplied inputs.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from paypost.bus.sqlite import DB_FILENAME, SqliteBus
from paypost.config import UserError, ensure_data_dir
from paypost.iso.iso20022 import render_xml
from paypost.ledger import sqlite as ledger_sqlite
from paypost.pipeline import (
    ASSEMBLER,
    NOTIFICATIONS,
    STAGE_ORDER,
    Pipeline,
    PipelineSettings,
    RunTotals,
    read_counters,
)
from paypost.refdata.model import RefData
from paypost.refdata.store import HolderCipher, save_refdata
from paypost.security.tokens import VaultKeys, load_configured_key, load_or_create_demo_key
from paypost.stages import ingest as ingest_stage
from paypost.stages.rules import RuleBook

POSTING_FILE = Path("postings") / "postings.csv"
ISO_SAMPLES_DIR = Path("iso20022")


@dataclass(frozen=True)
class Source:
    """One input: an ingest source configuration and its file (None: the table feed)."""

    config: ingest_stage.SourceConfig
    path: Path | None


def vault_master_key(data_dir: Path, *, allow_demo_key: bool) -> tuple[bytes, str | None]:
    """The configured vault master key, or (demo only) a generated local one with a notice."""
    if allow_demo_key:
        return load_or_create_demo_key(data_dir)
    key = load_configured_key()
    if key is None:
        raise UserError(
            "no vault key is configured: set PAYPOST_VAULT_KEY (base64 of 32 random bytes) or "
            "PAYPOST_VAULT_KEY_FILE (a file holding it); e.g. "
            "`python -c 'import os,base64;print(base64.b64encode(os.urandom(32)).decode())'`."
        )
    return key, None


@dataclass
class JobSummary:
    """What a run did, cumulative over every run on this data dir (counters are committed
    with the effects they count), plus this run's speed."""

    authorizations: int
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
    trial_balance_zero: bool
    trial_balance: dict[str, dict[str, int]]
    flags: dict[str, int]
    this_run_authorizations: int
    seconds: float
    events_per_second: float
    latency_p50_ms: float
    latency_p99_ms: float
    stage_p50_us: dict[str, float]
    stage_p99_us: dict[str, float]
    peak_rss_mb: float
    data_dir: str
    database: str
    posting_file: str
    posting_records: int
    iso20022_samples: list[str]
    mode: str
    notices: list[str] = field(default_factory=list)

    @property
    def accounted(self) -> int:
        return self.posted + self.parked_duplicates + self.held + self.rejected + self.dead_lettered

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(self.__dict__)
        out["every_approved_in_one_terminal_state"] = self.accounted + self.in_flight == (
            self.approved
        )
        return out


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


class Job:
    """A pipeline over one data dir, with its reference data and rules installed."""

    def __init__(
        self,
        data_dir: Path,
        refdata: RefData,
        rulebook: RuleBook,
        settings: PipelineSettings,
        master_key: bytes,
    ) -> None:
        self.data_dir = ensure_data_dir(data_dir)
        self.keys = VaultKeys.from_master(master_key)
        self.bus = SqliteBus.open(self.data_dir)
        self.pipeline = Pipeline(
            self.bus,
            refdata,
            rulebook,
            settings,
            posting_file=self.data_dir / POSTING_FILE,
        )
        (self.data_dir / POSTING_FILE).parent.mkdir(parents=True, exist_ok=True)
        with self.bus.unit_of_work() as uow:
            save_refdata(uow.conn, refdata, HolderCipher.from_master(master_key))
        self.pipeline.install()

    def close(self) -> None:
        self.bus.close()

    def run(
        self,
        sources: Sequence[Source],
        on_batch: Callable[[ingest_stage.IngestBatch, Any, float], None] | None = None,
    ) -> tuple[RunTotals, float]:
        """Ingest every source to its end through the pipeline; returns totals and seconds."""
        totals = RunTotals()
        started = time.perf_counter()
        for source in sources:
            checkpoint = ingest_stage.SqliteIngestStore(self.bus.conn).load_checkpoint(
                source.config.name
            )
            reader = ingest_stage.open_reader(
                source.config,
                self.keys,
                path=source.path,
                conn=self.bus.conn if source.path is None else None,
                checkpoint=checkpoint,
            )
            part = self.pipeline.run_reader(reader, final=True, on_batch=on_batch)
            totals.batches += part.batches
            totals.records += part.records
            totals.approved += part.approved
            totals.declined += part.declined
            totals.timed_out += part.timed_out
            totals.quarantined += part.quarantined
            totals.handed_to_queue += part.handed_to_queue
            totals.batch_latency_s += part.batch_latency_s
            for k, v in part.counts.items():
                totals.counts[k] = totals.counts.get(k, 0) + v
        self.pipeline.drain()
        self.pipeline.export_postings()
        return totals, time.perf_counter() - started

    def write_iso20022_samples(self, limit: int = 3) -> list[str]:
        """Render the first few standardized transactions as pacs.008 XML files."""
        out_dir = self.data_dir / ISO_SAMPLES_DIR
        out_dir.mkdir(parents=True, exist_ok=True)
        paths: list[str] = []
        rows = self.bus.conn.execute(
            "SELECT body FROM bus_archive WHERE CAST(body AS TEXT) LIKE ? "
            "ORDER BY position LIMIT ?",
            ('%"detail-type":"TransactionStandardized"%', limit),
        ).fetchall()
        for i, (body,) in enumerate(rows, 1):
            event = msgspec.json.decode(body)
            path = out_dir / f"pacs008-sample-{i}.xml"
            path.write_bytes(render_xml(event["detail"]["pacs008"]))
            paths.append(str(path))
        return paths

    def summary(self, totals: RunTotals, seconds: float, mode: str) -> JobSummary:
        conn = self.bus.conn
        counters = read_counters(conn)
        ingest = {"records": 0, "approved": 0, "declined": 0, "timed_out": 0, "quarantined": 0}
        for (state,) in conn.execute("SELECT state FROM ingest_checkpoints"):
            cp = msgspec.json.decode(state)
            for k in ingest:
                ingest[k] += int(cp["counters"].get(k, 0))
        dlq_by_target: dict[str, int] = {}
        for t in self.bus.stats().targets:
            dlq_by_target[t.name] = t.dead_lettered
        # A dead-lettered assembler sequence is counted once (it may hold several legs).
        dead = counters.get("dead_lettered", 0) + sum(
            n for name, n in dlq_by_target.items() if name not in (ASSEMBLER, NOTIFICATIONS)
        )
        in_flight = sum(self.bus.pending(name) for name in STAGE_ORDER)
        tb: dict[str, dict[str, int]] = {}
        zero = True
        for tenant in sorted(self.pipeline.refdata.tenants):
            trial = ledger_sqlite.trial_balance_in(conn, tenant)
            tb[tenant] = {line.currency: line.net for line in trial.lines}
            zero = zero and trial.balanced
        metrics = self.pipeline.metrics
        this_run = totals.approved
        return JobSummary(
            authorizations=ingest["approved"] + ingest["declined"] + ingest["timed_out"],
            approved=ingest["approved"],
            declined=ingest["declined"],
            timed_out=ingest["timed_out"],
            quarantined=ingest["quarantined"],
            posted=counters.get("posted", 0),
            parked_duplicates=counters.get("parked_duplicates", 0),
            held=counters.get("held", 0),
            rejected=counters.get("rejected", 0),
            dead_lettered=dead,
            in_flight=in_flight,
            trial_balance_zero=zero,
            trial_balance=tb,
            flags={k[5:]: v for k, v in sorted(counters.items()) if k.startswith("flag:")},
            this_run_authorizations=this_run,
            seconds=round(seconds, 3),
            events_per_second=round(this_run / seconds, 1) if seconds > 0 else 0.0,
            latency_p50_ms=round(totals.latency_percentile_ms(0.50), 3),
            latency_p99_ms=round(totals.latency_percentile_ms(0.99), 3),
            stage_p50_us={n: round(m.p(0.50), 2) for n, m in metrics.items()},
            stage_p99_us={n: round(m.p(0.99), 2) for n, m in metrics.items()},
            peak_rss_mb=round(peak_rss_mb(), 1),
            data_dir=str(self.data_dir),
            database=str(self.data_dir / DB_FILENAME),
            posting_file=str(self.data_dir / POSTING_FILE),
            posting_records=counters.get("posted", 0),
            iso20022_samples=self.write_iso20022_samples(),
            mode=mode,
        )
