"""Benchmark of the duplicate check (FR2–FR4) and enrichment (FR6) stages.

Usage: .venv/bin/python bench/bench_dedup_enrich.py [N]   (default 100,000 events)

dedup: batches of 1,000 against the SQLite index in a file (WAL, synchronous=FULL), one
transaction per batch (lookups + apply), 5 % duplicates; reports events/s and the per-event
CPU cost of `check_duplicates` alone (memory index, batch of 1,000 / 1,000).
enrich: per-event latency of `enrich_one` (each event timed alone) over a mix of domestic,
foreign-currency and held events, against 100,000 generated accounts.
"""

from __future__ import annotations

import gc
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgspec

from paypost.events import (
    AuthorizationAccepted,
    AuthorizationApproved,
    AuthorizationRequest,
    AuthorizationResponse,
    Event,
    Merchant,
    new_event,
)
from paypost.money import Money
from paypost.refdata.generate import generate_refdata
from paypost.security.tokens import Tokenizer
from paypost.stages.dedup import MemoryDedupIndex, SqliteDedupIndex, check_duplicates
from paypost.stages.enrich import enrich_one
from paypost.stages.standardize import standardize_one

BATCH = 1000


def approved(i: int, *, tenant: str = "uk-bank") -> Event:
    detail = AuthorizationApproved(
        request=AuthorizationRequest(
            stan=f"{i % 1_000_000:06d}",
            transmission_time=f"2026-11-21T{(i // 3600) % 24:02d}:{(i // 60) % 60:02d}:"
            f"{i % 60:02d}Z",
            acquirer_id="445566",
            card_token=f"tok_{i % 50_000:012x}",
            pan_masked="475129******1111",
            amount=Money(100 + i % 10_000, "GBP"),
            merchant=Merchant(id=f"M{i % 5000:08d}", name="Corner Shop", mcc="5411"),
        ),
        response=AuthorizationResponse(response_code="00", approval_code=f"{i % 999_999:06d}"),
        source_ref=f"bench:{i}",
    )
    return new_event(detail, source="bench", tenant=tenant, id=str(uuid.uuid4()))


def bench_dedup(n: int) -> None:
    events = [approved(i) for i in range(n)]
    # 5 % duplicates: copies (new event ids) of earlier authorizations.
    for k in range(0, n, 20):
        src = events[k // 2]
        copy = msgspec.structs.replace(
            msgspec.convert(src.detail, AuthorizationApproved), source_ref="dup"
        )
        events[k] = new_event(copy, source="bench", tenant=src.tenant)
    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(Path(tmp) / "paypost.db", isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        index = SqliteDedupIndex(conn)
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)  # what a pipeline process does (DESIGN §5)
        t0, c0 = time.perf_counter(), time.thread_time()
        stage_cpu = 0.0  # check_duplicates + apply, without the COMMIT (the stage's share)
        counts = {"accepted": 0, "duplicate": 0}
        for start in range(0, n, BATCH):
            conn.execute("BEGIN")
            s0 = time.thread_time()
            result = check_duplicates(events[start : start + BATCH], index)
            index.apply(result.effects)
            stage_cpu += time.thread_time() - s0
            conn.execute("COMMIT")
            counts["accepted"] += result.counts.accepted
            counts["duplicate"] += result.counts.duplicate
        elapsed, cpu = time.perf_counter() - t0, time.thread_time() - c0
    print(
        f"dedup sqlite: {n} events in {elapsed:.2f} s = {n / elapsed:,.0f}/s "
        f"({elapsed / n * 1e6:.1f} µs/event incl. commit; CPU {cpu / n * 1e6:.1f} µs/event, "
        f"stage without commit {stage_cpu / n * 1e6:.1f}) {counts}"
    )
    mem = MemoryDedupIndex()
    samples = []
    for start in range(0, n, BATCH):
        batch = events[start : start + BATCH]
        t = time.thread_time()  # CPU: the machine is shared, wall time is noisy
        result = check_duplicates(batch, mem)
        samples.append((time.thread_time() - t) / len(batch))
        mem.apply(result.effects)
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    print(
        f"dedup CPU (memory index): mean {statistics.mean(samples) * 1e6:.1f} µs/event, "
        f"worst batch {max(samples) * 1e6:.1f} µs/event"
    )


def bench_enrich(n: int) -> None:
    tokenizer = Tokenizer(b"bench-key-0123456789abcdef012345")
    t = time.perf_counter()
    g = generate_refdata(100_000, seed=1, tokenizer=tokenizer)
    print(f"generate_refdata(100,000 accounts): {time.perf_counter() - t:.1f} s")
    refdata, cards = g.refdata, g.cards
    merchants = [
        Merchant(id="M-GB-000101", name="Tesco", mcc="5411", city="London", country="826"),
        Merchant(id="M-US-000401", name="Katz", mcc="5812", city="New York", country="840"),
        Merchant(id="X1", name="Somewhere", mcc="5999", city="Lyon", country="FR"),
    ]
    inputs = []
    for i in range(min(n, 20_000)):
        card = cards[i % len(cards)]
        amount = Money(1000 + i, "USD" if i % 5 == 0 else "GBP")
        if i % 50 == 0:
            amount = Money(1000 + i, "THB")  # missing rate: held
        accepted = new_event(
            AuthorizationAccepted(
                request=AuthorizationRequest(
                    stan=f"{i:06d}",
                    transmission_time="2026-11-21T10:15:00Z",
                    acquirer_id="ACQ1",
                    card_token=card.token[:34],
                    pan_masked=card.masked,
                    amount=amount,
                    merchant=merchants[i % 3],
                ),
                response=AuthorizationResponse(response_code="00", approval_code="A1"),
                business_key="00",
            ),
            source="bench",
            tenant=card.tenant,
        )
        inputs.append(standardize_one(accepted))
    # Tokens cut to 34 characters by the bench (pacs.008 Max34Text): relink them.
    for card in cards:
        refdata.cards[(card.tenant, card.token[:34])] = refdata.accounts[card.account_id]
    gc.collect()
    gc.freeze()
    samples = []
    kinds: dict[str, int] = {}
    for ev in inputs:
        t = time.perf_counter()
        out = enrich_one(ev, refdata)
        samples.append(time.perf_counter() - t)
        kinds[out.detail_type] = kinds.get(out.detail_type, 0) + 1
    gc.unfreeze()
    samples.sort()
    q = statistics.quantiles(samples, n=100)
    print(
        f"enrich_one: {len(samples)} events {kinds}: mean {statistics.mean(samples) * 1e6:.1f} µs, "
        f"p50 {q[49] * 1e6:.1f} µs, p99 {q[98] * 1e6:.1f} µs, max {samples[-1] * 1e6:.1f} µs"
    )


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    bench_dedup(count)
    bench_enrich(count)
