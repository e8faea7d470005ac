"""Benchmark of the back half: rules engine, account interface (FR7), assembler (FR8) with the
SQLite ledger in one transaction per batch, and the posting-file export.

Usage: .venv/bin/python bench/bench_posting.py [N]   (default 50,000 enriched transactions)

Inputs are enriched transactions shaped like `EnrichedTransaction` (three tenants, GBP / EUR /
USD / JPY, one in eight converted with a real `money.convert` provenance, 2% watched MCCs,
1% without issuing country, 1% high value). GC thresholds as a pipeline process sets them
(DESIGN §5): `gc.set_threshold(50_000, 50, 100)`.

Each part also prints its CPU time per item (`time.thread_time`): on a shared machine it is
much steadier than the wall clock, so compare before/after with those figures.
"""

from __future__ import annotations

import gc
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from paypost.events import Event, TransactionEnriched, new_event
from paypost.ledger import sqlite as ledger_sqlite
from paypost.ledger.model import Account
from paypost.money import FxRate, Money, convert
from paypost.stages import assembler as asm
from paypost.stages.post import create_legs, internal_accounts
from paypost.stages.posting_file import (
    PostingFileWriter,
    add_to_outbox,
    ensure_outbox_schema,
    export_outbox,
)
from paypost.stages.rules import apply_rules, default_rules_text, parse_rules

TENANTS = {"uk-bank": "GBP", "euro-bank": "EUR", "de-bank": "EUR"}
VARIABLES = {
    "uk-bank": {"home_currency": "GBP", "high_value_threshold_minor": 250000},
    "euro-bank": {"home_currency": "EUR", "high_value_threshold_minor": 300000},
    "de-bank": {"home_currency": "EUR", "high_value_threshold_minor": 500000},
}
RATE = FxRate(
    base="USD",
    quote="GBP",
    rate="0.7740",
    source="ECB euro reference rate (cross)",
    as_of=datetime(2026, 11, 20, 16, tzinfo=UTC),
    markup="0.0275",
)
ACCOUNTS = 2000


def transaction(i: int) -> tuple[str, dict[str, Any]]:
    tenant = list(TENANTS)[i % 3]
    home = TENANTS[tenant]
    amount = Money(500 + (i * 7919) % 20000, home)
    billing = amount
    fx = None
    if i % 8 == 0 and tenant == "uk-bank":
        amount = Money(500 + (i * 7919) % 20000, "USD")
        conv = convert(amount, RATE)
        billing, fx = conv.charged, conv.provenance()["fx"]
    if i % 100 == 1:
        amount = billing = Money(900_000, home)
    return tenant, {
        "tenant": tenant,
        "transaction_id": f"TX{i:010d}",
        "uetr": "8a562c67-ca16-48ba-b074-65581be6f001",
        "direction": "debit",
        "booking_date": "2026-11-21",
        "transmission_time": "2026-11-21T10:15:00Z",
        "account_id": f"{tenant.upper()}-{i % ACCOUNTS:08d}",
        "iban": "GB74TMBK87100256180564",
        "sort_code": "871002",
        "account_number": "56180564",
        "account_currency": home,
        "product_type": "current-account",
        "holder_id": "CUST-1",
        "home_country": "GB",
        "home_currency": home,
        "description": "CARD PAYMENT TO TESCO STORES 3041 LONDON 21 NOV 2026",
        "amount": {"minor": amount.minor, "currency": amount.currency},
        "billing_amount": {"minor": billing.minor, "currency": billing.currency},
        "currency_conversion": fx is not None,
        "fx": fx,
        "merchant_id": "M-GB-000101",
        "merchant_name": "Tesco Stores 3041",
        "mcc": "7995" if i % 50 == 3 else "5411",
        "pan_masked": "476173******0119",
        "card_token": f"tok_{i:032x}",
        "issuing_country": None if i % 100 == 7 else "GB",
    }


def enriched_events(n: int) -> list[Event]:
    out = []
    for i in range(n):
        tenant, txn = transaction(i)
        out.append(
            new_event(
                TransactionEnriched(transaction=txn, refdata_version="bench"),
                source="paypost.enrich",
                tenant=tenant,
                time="2026-11-21T10:15:01.000Z",
            )
        )
    return out


def per_event(fn: Any, events: list[Event]) -> tuple[float, float, float]:
    times = []
    for e in events:
        t = time.perf_counter_ns()
        fn([e])
        times.append((time.perf_counter_ns() - t) / 1000)
    q = statistics.quantiles(times, n=100)
    return statistics.fmean(times), q[49], q[98]


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 50_000
    gc.set_threshold(50_000, 50, 100)
    if "--gc-off" in sys.argv:
        gc.disable()
    book = parse_rules(default_rules_text(), tenant_variables=VARIABLES)
    events = enriched_events(n)
    print(f"back half, {n:,} enriched transactions, batches of 1,000")

    t = time.perf_counter()
    decided: list[Event] = []
    for k in range(0, n, 1000):
        decided += apply_rules(events[k : k + 1000], book)
    dt = time.perf_counter() - t
    approved = [e for e in decided if e.detail_type == "TransactionApproved"]
    print(f"rules engine: {n / dt:,.0f} events/s ({dt / n * 1e6:.1f} µs/event), ", end="")
    print(f"{len(approved):,} approved, {len(decided) - n:,} side events")
    mean, p50, p99 = per_event(partial(apply_rules, book=book), events[:5000])
    print(f"  each event alone: mean {mean:.1f} µs, p50 {p50:.1f} µs, p99 {p99:.1f} µs")

    t = time.perf_counter()
    cpu = time.thread_time()
    legs: list[Event] = []
    for k in range(0, len(approved), 1000):
        legs += create_legs(approved[k : k + 1000])
    dt = time.perf_counter() - t
    cpu = time.thread_time() - cpu
    m = len(approved)
    print(f"account interface: {m / dt:,.0f} transactions/s ({dt / m * 1e6:.1f} µs), ", end="")
    print(f"{len(legs):,} legs; {cpu / m * 1e6:.1f} µs CPU per transaction")
    mean, p50, p99 = per_event(create_legs, approved[:5000])
    print(f"  each event alone: mean {mean:.1f} µs, p50 {p50:.1f} µs, p99 {p99:.1f} µs")

    with tempfile.TemporaryDirectory() as tmp:
        conn = ledger_sqlite.connect(Path(tmp) / "paypost.db")
        ledger_sqlite.ensure_schema(conn)
        asm.ensure_schema(conn)
        ensure_outbox_schema(conn)
        conn.execute("BEGIN IMMEDIATE")
        accounts: list[Account] = []
        for tenant, home in TENANTS.items():
            accounts += internal_accounts(tenant, sorted({home, "USD", "GBP"}))
            accounts += [
                Account(
                    id=f"{tenant.upper()}-{i:08d}", tenant=tenant, kind="customer", currency=home
                )
                for i in range(ACCOUNTS)
            ]
        ledger_sqlite.create_accounts_in(conn, accounts)
        conn.execute("COMMIT")
        store = asm.SqliteLegStore(conn)
        t_asm = t_ledger = cpu_outbox = 0.0
        posted = 0
        t = time.perf_counter()
        batch = 2000  # legs per transaction (~1,000 entries)
        for k in range(0, len(legs), batch):
            conn.execute("BEGIN IMMEDIATE")
            t0 = time.perf_counter()
            result = asm.assemble(legs[k : k + batch], store, now_us=0)
            t1 = time.perf_counter()
            done = asm.finish(result, store, partial(ledger_sqlite.post_batch_in, conn))
            t2 = time.perf_counter()
            c0 = time.thread_time()
            add_to_outbox(conn, done.records)
            cpu_outbox += time.thread_time() - c0
            conn.execute("COMMIT")
            t_asm += t1 - t0
            t_ledger += t2 - t1
            posted += done.posted
        dt = time.perf_counter() - t
        print(
            f"assembler + ledger + outbox (SQLite WAL, FULL, one transaction per ~1,000 "
            f"entries): {posted / dt:,.0f} entries/s"
        )
        print(
            f"  assemble: {len(legs) / t_asm:,.0f} legs/s ({t_asm / posted * 1e6:.1f} µs/entry);"
            f" ledger post_batch_in: {posted / t_ledger:,.0f} entries/s"
        )
        print(f"  add_to_outbox: {cpu_outbox / posted * 1e6:.1f} µs CPU per record")
        t = time.perf_counter()
        cpu = time.thread_time()
        written = export_outbox(conn, PostingFileWriter(Path(tmp) / "postings.csv"))
        cpu = time.thread_time() - cpu
        dt = time.perf_counter() - t
        size = (Path(tmp) / "postings.csv").stat().st_size
        print(
            f"posting file export: {written / dt:,.0f} records/s "
            f"({size / written:.0f} bytes/record, batches of 10,000, fsync per batch); "
            f"{cpu / written * 1e6:.1f} µs CPU per record"
        )
        assert posted == len(approved) == written
        conn.close()


if __name__ == "__main__":
    main()
