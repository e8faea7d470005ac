"""`paypost bench` at CI size: the answer is checked, never the time (issue 7)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from paypost.bench import (
    BenchOptions,
    BenchResult,
    check_shard,
    generate_sources,
    record,
    run_bench,
    shard_sources,
)
from paypost.config import UserError
from paypost.demo import demo_refdata
from paypost.pipeline import STAGE_ORDER, PipelineSettings
from paypost.runner import Job
from paypost.security.tokens import contains_pan

KEY = bytes(range(32))


def test_bench_10k_sharded_is_correct(tmp_path: Path) -> None:
    result = run_bench(
        BenchOptions(
            events=10_000,
            shards=2,
            latency_rate=200.0,
            latency_seconds=1.0,
            data_dir=tmp_path / "bench",
        )
    )
    assert result.correct, result.problems
    assert result.shards == 2
    # ~4% declines, ~1% duplicates, a few held/rejected: most approved ones are posted.
    assert 9_000 < result.approved < 10_000
    assert 0.95 * result.approved < result.posted <= result.approved
    assert set(result.stage_p99_us) == {
        "dedup",
        "standardize",
        "enrich",
        "rules",
        "account-interface",
        "assembler",
    }
    assert result.latency_events > 0 and result.e2e_latency_p99_ms > 0
    assert result.limit_rows == 10_000 and result.limit_rows_per_second > 0
    assert result.archived_events > 5 * result.posted  # every lifecycle event archived
    # Each shard holds whole tenants in its own database.
    dbs = sorted(p.parent.name for p in (tmp_path / "bench").glob("shard-*/paypost.db"))
    assert dbs == ["shard-0", "shard-1"]


def test_wrong_answer_is_reported(tmp_path: Path) -> None:
    """A journal entry lost behind the pipeline's back: the check names it."""
    sources = generate_sources(1500, KEY, 5, "batch", tmp_path, in_process=True)
    refdata = demo_refdata(1500, KEY, 5).refdata
    from paypost.bench import bench_rulebook

    job = Job(tmp_path / "d", refdata, bench_rulebook(refdata), PipelineSettings("batch"), KEY)
    try:
        totals, seconds = job.run(sources)
        _, problems = check_shard(job, totals, seconds, "batch")
        assert problems == []
        with job.bus.unit_of_work() as uow:
            uow.conn.execute(
                "DELETE FROM ledger_legs WHERE entry_pk = (SELECT max(pk) FROM ledger_entries)"
            )
            uow.conn.execute(
                "DELETE FROM ledger_entries WHERE pk = (SELECT max(pk) FROM ledger_entries)"
            )
        _, problems = check_shard(job, totals, seconds, "batch")
        assert any("journal entries for" in p for p in problems), problems
    finally:
        job.close()


def test_shards_hold_whole_tenants(tmp_path: Path) -> None:
    sources = generate_sources(900, KEY, 1, "batch", tmp_path, in_process=True)
    groups = shard_sources(sources, 2)
    assert len(groups) == 2
    tenants = [{s.config.tenant for s in g} for g in groups]
    assert not tenants[0] & tenants[1]
    assert tenants[0] | tenants[1] == {s.config.tenant for s in sources}
    assert len(shard_sources(sources, 8)) == len(sources)  # never more shards than tenants


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(UserError, match="backend"):
        run_bench(BenchOptions(events=10, backend="kafka"))


def test_bench_distributed_is_correct(
    tmp_path: Path, nats_url: str, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same harness over NATS JetStream + PostgreSQL (two fused worker processes)."""
    monkeypatch.setenv("PAYPOST_BUS_URL", nats_url)
    monkeypatch.setenv("PAYPOST_DB_URL", postgres_url)
    result = run_bench(
        BenchOptions(
            events=1500,
            backend="distributed",
            shards=2,
            latency_rate=50.0,
            latency_seconds=1.0,
            data_dir=tmp_path / "b",
        )
    )
    assert result.correct, result.problems
    assert result.backend == "distributed" and result.shards == 2
    assert 0.95 * result.approved < result.posted <= result.approved
    # the figures of the issue, measured (not reported as 0) on this backend too
    assert set(result.stage_p99_us) == set(STAGE_ORDER)  # from the workers' stage times
    assert all(0 < result.stage_p50_us[n] <= result.stage_p99_us[n] for n in STAGE_ORDER)
    assert all(v > 0 for v in result.stage_cpu_p99_us.values())
    assert set(result.cpu_us_by_process) == {"workers", "publisher", "nats-server", "postgresql"}
    assert result.cpu_us_by_process["workers"] > 0 and result.cpu_us_by_process["publisher"] > 0
    assert result.cpu_us_per_authorization == pytest.approx(
        sum(result.cpu_us_by_process.values()), abs=0.5
    )
    assert result.archived_events > 5 * result.approved  # every lifecycle event archived
    assert result.archived_bytes_per_authorization > 1000
    assert result.limit_rows == 1500 and result.limit_rows_per_second > 0
    assert result.limit_ratio > 0
    # realtime latency: every posted authorization of the paced run matched its arrival
    # (a mismatch is a problem, so `correct` would be False)
    assert result.latency_events > 0 and result.latency_offered_per_second == 50.0
    assert 0 < result.e2e_latency_p50_ms <= result.e2e_latency_p99_ms
    # a worker leaves its stage times where it ran (one that got no batch leaves none)
    assert list((tmp_path / "b").glob("worker-*/stage-times.json"))
    # nothing the workers wrote (logs with their alerts, stage times) holds a clear PAN
    written = [p for p in (tmp_path / "b").rglob("*") if p.is_file()]
    assert any(p.name == "worker.log" for p in written)
    for path in written:
        assert not contains_pan(path.read_text(errors="replace")), path


def test_cli_json_and_record(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "paypost",
            "bench",
            "-n",
            "1200",
            "--shards",
            "1",
            "--latency-seconds",
            "0",
            "--json",
            "--record",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    for key in (
        "events",
        "seconds",
        "events_per_second",
        "stage_p50_us",
        "stage_p99_us",
        "e2e_latency_p99_ms",
        "peak_rss_mb",
        "limit_rows_per_second",
        "correct",
    ):
        assert key in doc
    assert doc["correct"] is True and doc["events"] == 1200
    text = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert text.count("| yes |") == 1
    # A second record appends a row to the same table.
    result = BenchResult(**{**doc, "commit": "abc1234"})
    record(result, tmp_path / "docs" / "benchmarks.md")
    text = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert text.count("| yes |") == 2 and "`abc1234`" in text
    assert text.count("### `paypost bench --record` results") == 1
