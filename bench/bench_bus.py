"""Bus benchmark (script, not a test): the SQLite backend's publish and consume rates.

    .venv/bin/python bench/bench_bus.py [--events 200000] [--batch 1000] [--data-dir DIR]

Measures, on one fresh `paypost.db` (WAL, synchronous=FULL):
1. publish: encode + dedup lookup + route (8 rules, by detail-type) + archive + enqueue,
   one transaction per batch; then the same with dedup=False (what a tracked consumer's
   outputs use) and a batch of already-seen events (all dropped);
2. consume: receive + ack, each its own transaction (two commits per batch);
3. consume exactly-once: receive, then ONE unit of work with the tracking check, a tracking
   record, an effect row per event and the ack (what a pipeline stage does);
4. the pipeline shape: per batch ONE unit of work that acks N inputs, tracks them and
   publishes N outputs (the stage's output events, archived and routed).
Prints a table and a markdown block for docs/benchmarks.md.

    .venv/bin/python bench/bench_bus.py --hot-path [--events-from DIR/shard-0/paypost.db]

instead measures the publish hot path of the fused embedded pipeline, in CPU µs per event
(`time.thread_time`, so other processes on the machine do not count): `prepare()` alone,
then per batch ONE unit of work that publishes the authorizations with dedup and every
stage's outputs with `dedup=False, inline=<the stages>` (the pipeline's rules and targets),
and its COMMIT. `--events-from` takes real events from the archive of a
`paypost bench --data-dir DIR` run (else synthetic events of the same detail-types).
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from paypost.bus import Rule, TargetConfig
from paypost.bus.core import decode_event, prepare
from paypost.bus.sqlite import SqliteBus
from paypost.events import Event, SchemaRef

# The fused pipeline's stages in flow order and the detail-type each one consumes.
STAGE_INPUTS = (
    ("dedup", "AuthorizationApproved"),
    ("standardize", "AuthorizationAccepted"),
    ("enrich", "TransactionStandardized"),
    ("rules", "TransactionEnriched"),
    ("account-interface", "TransactionApproved"),
    ("assembler", "PostingLegCreated"),
)

TYPES = [
    "AuthorizationApproved",
    "AuthorizationAccepted",
    "TransactionStandardized",
    "TransactionEnriched",
    "TransactionApproved",
    "PostingLegCreated",
]


def make_event(i: int, dtype: str) -> Event:
    return Event(
        id=f"{i:08d}-0000-4000-8000-{hash((i, dtype)) & 0xFFFFFFFFFFFF:012x}",
        source="paypost.bench",
        detail_type=dtype,
        time="2026-11-21T22:00:00.000Z",
        tenant="bank-a",
        correlation_id=f"corr-{i}",
        schema=SchemaRef(name=dtype, version=1),
        detail={
            "amount": {"minor": 1000 + i % 50000, "currency": "EUR"},
            "card_token": f"tok_{i:016x}",
            "pan_masked": "411111******1111",
            "merchant": {"id": f"m{i % 1000}", "name": "Coffee Corner", "mcc": "5814"},
            "account_id": f"acc-{i % 100000:06d}",
            "stan": f"{i % 1000000:06d}",
            "rrn": f"{i:012d}",
        },
    )


def setup(bus: SqliteBus) -> None:
    for dtype in TYPES:
        bus.put_target(TargetConfig(name=dtype.lower(), batch_size=1000))
        bus.put_rule(Rule(name=dtype, pattern={"detail-type": [dtype]}, target=dtype.lower()))
    bus.put_target(TargetConfig(name="high-value", batch_size=1000))
    bus.put_rule(
        Rule(
            name="high-value",
            pattern={
                "detail-type": ["TransactionApproved"],
                "detail": {"amount": {"minor": [{"numeric": [">=", 50000]}]}},
            },
            target="high-value",
        )
    )
    bus.put_target(TargetConfig(name="sink", batch_size=1000))
    bus.put_rule(Rule(name="sink", pattern={"source": ["paypost.sink"]}, target="sink"))


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.0f}/s"


def hot_path_events(source: Path | None, n: int) -> list[Event]:
    """Events in archive order: from a paypost database's archive, or synthetic ones shaped
    like an authorization's lifecycle (roughly 8 events per authorization)."""
    if source is not None:
        conn = sqlite3.connect(source)
        rows = conn.execute("SELECT body FROM bus_archive ORDER BY position LIMIT ?", (n,))
        events = [decode_event(body) for (body,) in rows]
        conn.close()
        return events
    events = []
    for i in range(n // 8):
        for dtype in ("AuthorizationApproved", "AuthorizationAccepted", *TYPES[2:]):
            events.append(make_event(i, dtype))
        for leg in range(2):
            events.append(make_event(i * 2 + leg + n, "PostingLegCreated"))
        events.append(make_event(i, "TransactionPosted"))
    return events


def thread_bytes_written() -> int:
    """Bytes this thread has written (Linux; 0 elsewhere): a commit's WAL frames."""
    try:
        with open("/proc/thread-self/io") as io:
            for line in io:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def hot_path(root: Path, events: list[Event], batch_auths: int, rounds: int) -> None:
    """CPU µs per event of prepare() and of the fused pipeline's publishes (see module docs)."""
    from paypost.pipeline import RULES_TABLE, STAGE_ORDER, PipelineSettings

    inline = frozenset(STAGE_ORDER)
    first = STAGE_INPUTS[0][1]
    # Batches of BATCH_AUTHS authorizations: the events from one AuthorizationApproved to the
    # next BATCH_AUTHS later, grouped by the stage that emits them (publish order of dispatch).
    starts = [i for i, e in enumerate(events) if e.detail_type == first]
    cuts = [*starts[::batch_auths], len(events)]
    batches = [events[a:b] for a, b in itertools.pairwise(cuts) if b > a]
    consumed_by = dict((dt, stage) for stage, dt in STAGE_INPUTS)
    order = {stage: i for i, (stage, _) in enumerate(STAGE_INPUTS)}

    def groups(batch: list[Event]) -> list[list[Event]]:
        by_stage: dict[int, list[Event]] = {}
        for e in batch:
            # an event goes out in the publish after the stage before its consumer ran
            stage = consumed_by.get(e.detail_type)
            at = order[stage] if stage is not None else len(order)
            by_stage.setdefault(at, []).append(e)
        return [by_stage[k] for k in sorted(by_stage)]

    grouped = [groups(b) for b in batches]
    n = sum(len(b) for b in batches)
    best_prepare = best_publish = best_commit = float("inf")
    written = 0
    for _ in range(rounds):
        t = time.thread_time()
        for b in batches:
            prepare(b)
        best_prepare = min(best_prepare, time.thread_time() - t)
    for r in range(rounds):
        bus = SqliteBus.open(root / f"round-{r}", background_checkpoints=True)
        for target in PipelineSettings(mode="batch").targets():
            bus.put_target(target)
        for rule in RULES_TABLE:
            bus.put_rule(rule)
        publish_cpu = commit_cpu = 0.0
        wal_bytes = 0
        for parts in grouped:
            cm = bus.unit_of_work()
            uow = cm.__enter__()
            t = time.thread_time()
            uow.publish(parts[0], dedup=True, inline=inline)
            for part in parts[1:]:
                uow.publish(part, dedup=False, inline=inline)
            c = time.thread_time()
            before = thread_bytes_written()
            cm.__exit__(None, None, None)
            publish_cpu += c - t
            commit_cpu += time.thread_time() - c
            wal_bytes += thread_bytes_written() - before
        assert bus.archive_count() == n
        bus.close()
        shutil.rmtree(root / f"round-{r}", ignore_errors=True)
        best_publish, best_commit = min(best_publish, publish_cpu), min(best_commit, commit_cpu)
        written = wal_bytes
    print(f"{n:,} events in {len(batches)} batches of {batch_auths} authorizations")
    print(f"prepare (encode + keys)          {best_prepare / n * 1e6:6.2f} µs CPU per event")
    print(f"publish (dedup, route, archive)  {best_publish / n * 1e6:6.2f} µs CPU per event")
    print(f"COMMIT                           {best_commit / n * 1e6:6.2f} µs CPU per event")
    print(f"written by COMMIT (WAL)          {written / n:6.0f} B per event")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--hot-path", action="store_true", help="measure the fused publish path")
    ap.add_argument("--events-from", type=Path, default=None, help="paypost.db to take events from")
    ap.add_argument("--rounds", type=int, default=3, help="--hot-path: best of this many runs")
    ap.add_argument(
        "--inline-checkpoints",
        action="store_true",
        help="leave WAL checkpoints on the commit path (SQLite's default) for comparison",
    )
    args = ap.parse_args()
    root = args.data_dir or Path(tempfile.mkdtemp(prefix="bench-bus-"))
    if args.hot_path:
        events = hot_path_events(args.events_from, args.events)
        hot_path(root, events, args.batch, args.rounds)
        if args.data_dir is None:
            shutil.rmtree(root, ignore_errors=True)
        return
    shutil.rmtree(root / "paypost.db", ignore_errors=True)
    for suffix in ("", "-wal", "-shm"):
        (root / f"paypost.db{suffix}").unlink(missing_ok=True)
    bus = SqliteBus.open(root, background_checkpoints=not args.inline_checkpoints)
    setup(bus)
    n, b = args.events, args.batch
    events = [make_event(i, TYPES[i % len(TYPES)]) for i in range(n)]
    results: list[tuple[str, int, float, float]] = []

    t, c = time.perf_counter(), time.process_time()
    for i in range(0, n, b):
        bus.publish(events[i : i + b])
    results.append(
        (
            "publish (dedup + route + archive + enqueue)",
            n,
            time.perf_counter() - t,
            time.process_time() - c,
        )
    )

    more = [make_event(n + i, TYPES[i % len(TYPES)]) for i in range(n // 2)]
    t, c = time.perf_counter(), time.process_time()
    for i in range(0, len(more), b):
        bus.publish(more[i : i + b], dedup=False)
    results.append(
        (
            "publish with dedup=False (route + archive + enqueue)",
            len(more),
            time.perf_counter() - t,
            time.process_time() - c,
        )
    )

    t, c = time.perf_counter(), time.process_time()
    dups = bus.publish(events[:b])
    results.append(
        (
            "publish of already-seen events (dedup drop)",
            b,
            time.perf_counter() - t,
            time.process_time() - c,
        )
    )
    assert dups.duplicates_dropped == b

    # 2. receive + ack in separate transactions, on two of the six targets
    t, c = time.perf_counter(), time.process_time()
    done = 0
    for target in ("authorizationapproved", "authorizationaccepted"):
        while batch := bus.receive(target, b):
            bus.ack(batch)
            done += len(batch)
    results.append(
        (
            "receive + ack (2 commits per batch)",
            done,
            time.perf_counter() - t,
            time.process_time() - c,
        )
    )

    # 3. exactly-once consume: receive, then tracking + effect + ack in one unit of work
    bus.conn.execute("CREATE TABLE IF NOT EXISTS bench_effects (event_id TEXT NOT NULL)")
    t, c = time.perf_counter(), time.process_time()
    done = 0
    for target in ("transactionstandardized", "transactionenriched"):
        while batch := bus.receive(target, b):
            with bus.unit_of_work() as uow:
                seen = uow.processed(target, batch)
                fresh = [d for d in batch if d.tracking_key not in seen]
                uow.conn.executemany(
                    "INSERT INTO bench_effects VALUES (?)", [(d.event.id,) for d in fresh]
                )
                uow.track(target, fresh)
                uow.ack(batch)
            done += len(batch)
    results.append(
        (
            "receive + (tracking + effect + ack) in one unit of work",
            done,
            time.perf_counter() - t,
            time.process_time() - c,
        )
    )

    # 4. pipeline stage shape: consume N, publish N outputs, one unit of work per batch
    t, c = time.perf_counter(), time.process_time()
    done = 0
    target = "transactionapproved"
    while batch := bus.receive(target, b):
        with bus.unit_of_work() as uow:
            seen = uow.processed(target, batch)
            fresh = [d for d in batch if d.tracking_key not in seen]
            outputs = [
                Event(
                    id=f"out-{d.event.id}",
                    source="paypost.sink",
                    detail_type="TransactionPosted",
                    time=d.event.time,
                    tenant=d.event.tenant,
                    correlation_id=d.event.correlation_id,
                    schema=SchemaRef(name="TransactionPosted", version=1),
                    detail={"sequence_id": d.event.id, "entry_id": d.event.id, "legs": 2},
                )
                for d in fresh
            ]
            uow.track(target, fresh)
            uow.publish(outputs, dedup=False)  # tracked: outputs are once already
            uow.ack(batch)
        done += len(batch)
    results.append(
        (
            "stage shape: receive + (track + publish N outputs + ack)",
            done,
            time.perf_counter() - t,
            time.process_time() - c,
        )
    )

    size = sum(p.stat().st_size for p in root.glob("paypost.db*"))
    print(f"{'operation':60} {'events':>9} {'seconds':>8} {'rate':>12} {'CPU-bound rate':>15}")
    for name, count, secs, cpu in results:
        print(f"{name:60} {count:>9,} {secs:>8.2f} {rate(count, secs):>12} {rate(count, cpu):>15}")
    print(f"database size: {size / 1e6:.1f} MB for {n:,} archived events (+ outputs)")
    print(
        "\n| operation | events | seconds | events/s | events per CPU-second |"
        "\n|---|---:|---:|---:|---:|"
    )
    for name, count, secs, cpu in results:
        print(f"| {name} | {count:,} | {secs:.2f} | {count / secs:,.0f} | {count / cpu:,.0f} |")
    bus.close()
    if args.data_dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
