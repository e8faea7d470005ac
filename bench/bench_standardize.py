"""Benchmark of the standardize stage (FR5): per-event cost of building the pacs.008 dict.

Usage: .venv/bin/python bench/bench_standardize.py [N]   (default 50,000 events)

Reports the batch throughput (batches of 1,000, as the embedded pipeline runs) and the
per-event latency distribution of `standardize_one` (each event timed alone), for the
standardized path and the rejection path. XML rendering is off the hot path and timed apart.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
import uuid
from typing import Any

import msgspec

from paypost.events import (
    AuthorizationAccepted,
    AuthorizationRequest,
    AuthorizationResponse,
    Event,
    Merchant,
    SchemaRef,
)
from paypost.iso.iso20022 import render_xml
from paypost.money import Money
from paypost.stages.standardize import standardize, standardize_one

CURRENCIES = [("EUR", 1050), ("JPY", 1500), ("BHD", 12345), ("USD", 2599), ("GBP", 899)]


def make_events(n: int, *, bad_every: int = 0) -> list[Event]:
    events = []
    for i in range(n):
        ccy, base = CURRENCIES[i % len(CURRENCIES)]
        billing = Money(base * 3 + i % 97, "EUR") if i % 10 == 0 and ccy != "EUR" else None
        detail: dict[str, Any] = msgspec.to_builtins(
            AuthorizationAccepted(
                request=AuthorizationRequest(
                    stan=f"{i % 1_000_000:06d}",
                    transmission_time="2026-11-21T09:15:30Z",
                    acquirer_id="445566",
                    card_token=f"tok_{i:012x}",
                    pan_masked="411111******1111",
                    amount=Money(base + i % 1000, ccy),
                    billing_amount=billing,
                    merchant=Merchant(
                        id=f"M{i % 5000:08d}",
                        name="Boulangerie Dupont",
                        mcc="5462",
                        city="Lyon",
                        country="FR",
                    ),
                    terminal_id="TERM0042",
                    rrn=f"{632509000000 + i}",
                    issuing_country="FR",
                ),
                response=AuthorizationResponse(
                    response_code="00", approval_code="A1B2C3", responded_at="2026-11-21T09:15:31Z"
                ),
                business_key=f"bk-{i}",
            )
        )
        if bad_every and i % bad_every == 0:
            del detail["request"]["stan"]
        events.append(
            Event(
                id=str(uuid.uuid4()),
                source="paypost.dedup",
                detail_type="AuthorizationAccepted",
                time="2026-11-21T09:15:32.000Z",
                tenant="bank-fr",
                correlation_id=str(uuid.uuid4()),
                schema=SchemaRef(name="AuthorizationAccepted", version=1),
                detail=detail,
            )
        )
    return events


def run_batches(events: list[Event]) -> float:
    """Seconds to standardize EVENTS in batches of 1,000, keeping each batch's outputs alive
    until the next batch (as the bus does until its transaction commits)."""
    t0 = time.perf_counter()
    for start in range(0, len(events), 1000):
        outputs = standardize(events[start : start + 1000])
    del outputs
    return time.perf_counter() - t0


def per_event_latencies(events: list[Event]) -> list[float]:
    out = []
    clock = time.perf_counter_ns
    for event in events:
        t0 = clock()
        standardize_one(event)
        out.append((clock() - t0) / 1000)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    events = make_events(n)
    gc.freeze()
    standardize(events[:1000])  # warm up

    batch_s = run_batches(events)
    gc.set_threshold(50_000, 50, 100)  # what a pipeline process does for big batches (DESIGN §5)
    batch_tuned_s = run_batches(events)
    gc.set_threshold(700, 10, 10)

    lat = per_event_latencies(events)
    bad = make_events(min(n, 10_000), bad_every=1)
    lat_bad = per_event_latencies(bad)

    sample = standardize(events[:2000])
    t0 = time.perf_counter()
    for out in sample:
        render_xml(out.detail["pacs008"])
    render_us = (time.perf_counter() - t0) / len(sample) * 1e6

    print(f"events: {n}")
    print(f"batch throughput: {n / batch_s:,.0f} events/s ({batch_s / n * 1e6:.1f} us/event)")
    print(
        f"batch throughput, gc threshold 50k: {n / batch_tuned_s:,.0f} events/s "
        f"({batch_tuned_s / n * 1e6:.1f} us/event)"
    )
    print(
        "standardized, per event: "
        f"mean {statistics.fmean(lat):.1f} us, p50 {pct(lat, 0.5):.1f}, "
        f"p99 {pct(lat, 0.99):.1f}, max {max(lat):.1f}"
    )
    print(
        "rejected (missing stan), per event: "
        f"mean {statistics.fmean(lat_bad):.1f} us, p50 {pct(lat_bad, 0.5):.1f}, "
        f"p99 {pct(lat_bad, 0.99):.1f}"
    )
    print(f"render_xml (off the hot path): {render_us:.1f} us/event")


if __name__ == "__main__":
    main()
