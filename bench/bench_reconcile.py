"""Reconciler benchmark (not a test): the dry run (three views + classification) on a data dir,
the per-batch cost of the pipeline's inbound record, and a patch run with injected breaks.

    .venv/bin/python bench/bench_reconcile.py --data-dir /tmp/big      # an existing demo dir
    .venv/bin/python bench/bench_reconcile.py --events 100000          # runs `paypost demo` first

The patch run works on a copy of the database (the data dir is left as it was).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from paypost.events import Event, SchemaRef, derive_event_id
from paypost.stages import reconcile as rec

POSTING_FILE = Path("postings") / "postings.csv"


def best_of(n: int, fn: Any) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(n):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def bench_track(n: int) -> float:
    """µs per authorization of `reconcile.track` over a realistic mix of stage outputs
    (per authorization: accepted, standardized, enriched, approved, 2 legs, posted)."""
    conn = sqlite3.connect(":memory:")
    rec.ensure_schema(conn)
    events: list[Event] = []
    for i in range(n):
        base = derive_event_id(f"bench-{i}", "ingest")
        req = {
            "transmission_time": "2026-11-21T10:00:00Z",
            "amount": {"minor": 1000 + i % 977, "currency": "EUR"},
        }
        events.append(
            Event(
                id=derive_event_id(base, "dedup"),
                source="paypost.dedup",
                detail_type="AuthorizationAccepted",
                time="2026-11-21T10:00:00Z",
                tenant="t",
                correlation_id=base,
                schema=SchemaRef(name="AuthorizationAccepted", version=1),
                detail={"request": req},
            )
        )
        for dt in (
            "TransactionStandardized",
            "TransactionEnriched",
            "TransactionApproved",
            "PostingLegCreated",
            "PostingLegCreated",
            "TransactionPosted",
        ):
            events.append(
                Event(
                    id=derive_event_id(base, dt),
                    source="x",
                    detail_type=dt,
                    time="2026-11-21T10:00:00Z",
                    tenant="t",
                    correlation_id=base,
                    schema=SchemaRef(name=dt, version=1),
                    detail={},
                )
            )
    conn.execute("BEGIN")
    t = time.perf_counter()
    for start in range(0, len(events), 7 * 250):
        rec.track(conn, events[start : start + 7 * 250])
    seconds = time.perf_counter() - t
    conn.execute("COMMIT")
    return seconds * 1e6 / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    data_dir: Path = args.data_dir or Path(tempfile.mkdtemp(prefix="bench-reconcile-"))
    if not (data_dir / "paypost.db").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "paypost",
                "demo",
                "--events",
                str(args.events),
                "--data-dir",
                str(data_dir),
                "--json",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    conn = sqlite3.connect(data_dir / "paypost.db")
    dry_s, report = best_of(
        args.repeat, lambda: rec.reconcile(conn, posting_file=data_dir / POSTING_FILE)
    )
    t0 = time.perf_counter()
    views = rec.load_views(conn, rec.Scope(), posting_file=data_dir / POSTING_FILE)
    load_s = time.perf_counter() - t0
    classify_s, _ = best_of(
        args.repeat, lambda: rec.classify(views, rec.ReconcileConfig(), rec.Scope())
    )
    conn.close()

    # A patch run on a copy: 100 postings deleted (re-driven), 100 duplicated (reversed).
    work = Path(tempfile.mkdtemp(prefix="bench-reconcile-patch-"))
    shutil.copytree(data_dir, work / "d")
    patch = _patch_run(work / "d")
    shutil.rmtree(work, ignore_errors=True)

    out = {
        "authorizations": report.authorizations,
        "entries": report.entries,
        "file_records": report.file_records,
        "breaks": len(report.breaks),
        "dry_run_s": round(dry_s, 3),
        "load_views_s": round(load_s, 3),
        "classify_s": round(classify_s, 3),
        "authorizations_per_s": round(report.authorizations / dry_s),
        "track_us_per_authorization": round(bench_track(50_000), 2),
        **patch,
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>28}: {v}")


def _patch_run(data_dir: Path) -> dict[str, Any]:
    from paypost.cli.reconcile import exporter, open_bus, pipeline_redriver
    from paypost.ledger import sqlite as ledger_sqlite
    from paypost.ledger.model import JournalEntry, Leg

    bus = open_bus(data_dir)
    conn = bus.conn
    ids = [
        (t, i)
        for t, i in conn.execute(
            "SELECT tenant, id FROM ledger_entries WHERE sequence_id IS NOT NULL ORDER BY pk "
            "LIMIT 200"
        )
    ]
    with bus.unit_of_work() as uow:
        for t, i in ids[:100]:  # lost postings
            (pk,) = uow.conn.execute(
                "SELECT pk FROM ledger_entries WHERE tenant = ? AND id = ?", (t, i)
            ).fetchone()
            for apk, amount in uow.conn.execute(
                "SELECT account_pk, amount FROM ledger_legs WHERE entry_pk = ?", (pk,)
            ).fetchall():
                uow.conn.execute(
                    "UPDATE ledger_balances SET balance = balance - ?, legs = legs - 1, "
                    "debits = debits - ?, credits = credits - ? WHERE account_pk = ?",
                    (amount, -amount if amount < 0 else 0, amount if amount > 0 else 0, apk),
                )
            uow.conn.execute("DELETE FROM ledger_legs WHERE entry_pk = ?", (pk,))
            uow.conn.execute("DELETE FROM ledger_entries WHERE pk = ?", (pk,))
        copies = []
        for t, i in ids[100:200]:  # double postings
            e = ledger_sqlite.get_entry_in(uow.conn, t, i)
            assert e is not None
            copies.append(
                JournalEntry(
                    id=derive_event_id(i, "bench-copy"),
                    tenant=t,
                    legs=tuple(
                        Leg(account=lg.account, side=lg.side, amount=lg.amount) for lg in e.legs
                    ),
                    sequence_id=e.sequence_id,
                    source_event_id=e.source_event_id,
                    booked_at=e.booked_at,
                    metadata=e.metadata,
                )
            )
        ledger_sqlite.post_batch_in(uow.conn, copies)
    t = time.perf_counter()
    report = rec.reconcile(conn, posting_file=data_dir / POSTING_FILE)
    outcome = rec.apply_patches(
        bus,
        report,
        redrive=pipeline_redriver(bus, data_dir, None),
        export=exporter(bus, data_dir),
    )
    seconds = time.perf_counter() - t
    after = rec.reconcile(conn, posting_file=data_dir / POSTING_FILE)
    bus.close()
    return {
        "patch_run_breaks": len(report.breaks),
        "patch_run_patched": outcome.patched,
        "patch_run_s": round(seconds, 3),
        "patch_run_breaks_after": len(after.breaks),
        "patch_run_trial_balance_zero": outcome.trial_balance_zero,
    }


if __name__ == "__main__":
    main()
