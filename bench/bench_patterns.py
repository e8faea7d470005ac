"""Benchmark: EventBridge pattern matching, in (event x rule) matches per second.

A realistic rule set of the pipeline (routing by source/detail-type, amount ranges, MCC lists,
currency anything-but, tenant prefix, issuing_country exists, an $or, a wildcard) is compiled
once and run against events built with paypost.events.new_event(...).to_dict().

    .venv/bin/python bench/bench_patterns.py [--events 20000] [--repeat 5] [--json]

Prints the best of REPEAT runs, testing every rule on every event, and the events/s through
a PatternIndex of the same rules (same answers, checked). Not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from typing import Any

from paypost import patterns
from paypost.events import (
    AuthorizationApproved,
    AuthorizationRequest,
    AuthorizationResponse,
    Merchant,
    PostingLegCreated,
    TransactionEnriched,
    new_event,
)
from paypost.money import Money

RULES: dict[str, dict[str, Any]] = {
    "dedup": {"source": ["paypost.ingest"], "detail-type": ["AuthorizationApproved"]},
    "standardize": {"detail-type": ["AuthorizationAccepted"]},
    "enrich": {"detail-type": ["TransactionStandardized"]},
    "rules-engine": {"detail-type": ["TransactionEnriched"]},
    "assembler": {"detail-type": ["PostingLegCreated"], "detail": {"side": ["debit", "credit"]}},
    "high-value": {
        "detail-type": ["AuthorizationApproved"],
        "detail": {"request": {"amount": {"minor": [{"numeric": [">=", 1_000_000]}]}}},
    },
    "mid-value-eu": {
        "detail": {
            "request": {
                "amount": {
                    "minor": [{"numeric": [">", 10_000, "<=", 500_000]}],
                    "currency": ["EUR"],
                }
            }
        },
    },
    "unusual-mcc": {
        "detail-type": ["AuthorizationApproved"],
        "detail": {"request": {"merchant": {"mcc": ["7995", "5933", "6051", "4829", "5993"]}}},
    },
    "foreign-currency": {
        "detail": {"request": {"amount": {"currency": [{"anything-but": ["EUR", "GBP"]}]}}}
    },
    "tenant-acme": {"tenant": [{"prefix": "acme-"}], "detail-type": ["AuthorizationApproved"]},
    "issuing-country-known": {"detail": {"request": {"issuing_country": [{"exists": True}]}}},
    "foreign-card-or-currency": {
        "source": ["paypost.ingest"],
        "$or": [
            {"detail": {"request": {"issuing_country": [{"anything-but": ["FR", "DE", "NL"]}]}}},
            {"detail": {"request": {"amount": {"currency": [{"anything-but": "EUR"}]}}}},
        ],
    },
    "log-replay": {"detail": {"source_ref": [{"wildcard": "file:*.log:*"}]}},
    "archive-all": {"source": [{"prefix": "paypost."}]},
}

CURRENCIES = ["EUR"] * 6 + ["USD", "GBP", "JPY", "CHF"]
MCCS = ["5411", "5812", "5999", "4111", "7995", "5933", "6051", "5732"]
TENANTS = ["acme-eu", "acme-us", "globex", "initech"]
COUNTRIES = ["FR", "DE", "NL", "US", "GB", None]


def make_events(count: int, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    events: list[dict[str, Any]] = []
    for i in range(count):
        kind = rng.random()
        tenant = rng.choice(TENANTS)
        if kind < 0.6:
            request = AuthorizationRequest(
                stan=f"{i % 1_000_000:06d}",
                transmission_time="2026-11-21T10:00:00Z",
                acquirer_id="ACQ" + str(rng.randrange(10)),
                card_token=f"tok_{rng.randrange(10**9):09d}",
                pan_masked="411111******1111",
                amount=Money(
                    minor=int(rng.lognormvariate(8, 2)) + 1, currency=rng.choice(CURRENCIES)
                ),
                merchant=Merchant(
                    id=f"M{rng.randrange(5000)}", name="Shop", mcc=rng.choice(MCCS), country="FR"
                ),
                issuing_country=rng.choice(COUNTRIES),
                rrn=f"{rng.randrange(10**12):012d}",
            )
            det: Any = AuthorizationApproved(
                request=request,
                response=AuthorizationResponse(response_code="00", approval_code="A1B2C3"),
                source_ref=f"file:auth-{i // 1000}.log:{i % 1000}",
            )
            source = "paypost.ingest"
        elif kind < 0.8:
            det = TransactionEnriched(
                transaction={"account": {"id": f"ACC{rng.randrange(10**6)}", "branch": "001"}},
                refdata_version="2026-11-21",
            )
            source = "paypost.enrich"
        else:
            det = PostingLegCreated(
                sequence_id=f"seq-{i}",
                leg_index=i % 2,
                leg_count=2,
                account_id=f"ACC{rng.randrange(10**6)}",
                side=rng.choice(["debit", "credit"]),
                amount=Money(minor=rng.randrange(1, 10**6), currency="EUR"),
            )
            source = "paypost.post"
        events.append(new_event(det, source=source, tenant=tenant).to_dict())
    return events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    t0 = time.perf_counter()
    compiled = [patterns.compile(rule) for rule in RULES.values()]
    compile_us = (time.perf_counter() - t0) / len(compiled) * 1e6
    matchers = [p.matches for p in compiled]
    events = make_events(args.events)

    best = float("inf")
    hits = 0
    for _ in range(args.repeat):
        hits = 0
        start = time.perf_counter()
        for event in events:
            for match in matchers:
                if match(event):
                    hits += 1
        best = min(best, time.perf_counter() - start)

    index: patterns.PatternIndex[str] = patterns.PatternIndex()
    for name, rule in RULES.items():
        index.add(name, rule)
    best_indexed = float("inf")
    routed = 0
    for _ in range(args.repeat):
        routed = 0
        start = time.perf_counter()
        for event in events:
            routed += len(index.matching(event))
        best_indexed = min(best_indexed, time.perf_counter() - start)
    assert routed == hits, "PatternIndex must give the same answers as every pattern"

    pairs = len(events) * len(matchers)
    result = {
        "rules": len(matchers),
        "events": len(events),
        "pairs": pairs,
        "matches": hits,
        "match_fraction": round(hits / pairs, 3),
        "pairs_per_second": round(pairs / best),
        "events_routed_per_second": round(len(events) / best),
        "ns_per_pair": round(best / pairs * 1e9, 1),
        "compile_us_per_rule": round(compile_us, 1),
        "indexed_events_routed_per_second": round(len(events) / best_indexed),
        "python": platform.python_version(),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{result['pairs_per_second']:,} (event x rule) matches/s "
        f"({result['ns_per_pair']} ns each); {result['events_routed_per_second']:,} events/s "
        f"through {len(matchers)} rules; {hits:,} of {pairs:,} pairs matched; "
        f"compile {result['compile_us_per_rule']} us/rule; with PatternIndex "
        f"{result['indexed_events_routed_per_second']:,} events/s"
    )


if __name__ == "__main__":
    main()
