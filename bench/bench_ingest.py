"""Ingest benchmark (script, not a test): authorizations in → AuthorizationApproved on the bus.

    .venv/bin/python bench/bench_ingest.py [--count 200000] [--format iso8583] [--batch 5000]

1. parse only: the reader over a generated file, batches applied to the in-memory store
   (decode, pair, tokenize, seal new cards, PAN scan of every other field, build events);
2. end to end: the same through `run_ingest` into a fresh embedded bus (`paypost.db`, WAL,
   synchronous=FULL, background WAL checkpoints) with one rule routing AuthorizationApproved
   to a target: per batch ONE transaction with publish (archive + dedup + queue rows), vault
   rows, quarantine and checkpoint.
Prints authorizations/s (wall and CPU) and peak RSS, and a markdown block for
docs/benchmarks.md. File generation is not timed.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
import time
from pathlib import Path

import psutil

from paypost.bus import Rule, TargetConfig
from paypost.bus.sqlite import SqliteBus
from paypost.iso.generate import card_numbers, generate_authorizations, render_lines
from paypost.logs import configure_logging
from paypost.security.tokens import VaultKeys
from paypost.stages.ingest import (
    MemoryIngestStore,
    SourceConfig,
    ensure_schema,
    open_reader,
    run_ingest,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=200_000)
    ap.add_argument("--format", default="iso8583", choices=["iso8583", "jsonl", "csv"])
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--cards", type=int, default=20_000)
    args = ap.parse_args()
    configure_logging("warning")
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        src = tmp / f"auths.{args.format}"
        auths = generate_authorizations({"bank-a": card_numbers(args.cards)}, args.count, seed=1)
        with src.open("w") as fh:
            for line in render_lines(args.format, auths):
                fh.write(line + "\n")
        keys = VaultKeys.from_master(b"\x01" * 32)
        config = SourceConfig(
            name="bench", tenant="bank-a", format=args.format, batch_size=args.batch
        )  # type: ignore[arg-type]
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)  # what a pipeline process does (DESIGN §5)

        store = MemoryIngestStore()
        reader = open_reader(config, keys, path=src)
        w0, c0 = time.perf_counter(), time.process_time()
        events = 0
        for batch in reader.batches(final=True):
            store.apply(batch)
            events += len(batch.events)
        w1, c1 = time.perf_counter(), time.process_time()
        parse = (args.count / (w1 - w0), args.count / (c1 - c0))

        bus = SqliteBus.open(tmp / "data", background_checkpoints=True)
        bus.put_target(TargetConfig(name="dedup"))
        bus.put_rule(
            Rule(name="auths", pattern={"detail-type": ["AuthorizationApproved"]}, target="dedup")
        )
        with bus.unit_of_work() as uow:
            ensure_schema(uow.conn)
        reader = open_reader(config, keys, path=src)
        w0, c0 = time.perf_counter(), time.process_time()
        report = run_ingest(reader, bus.unit_of_work, final=True)
        w1, c1 = time.perf_counter(), time.process_time()
        bus.close()
        e2e = (args.count / (w1 - w0), args.count / (c1 - c0))
        rss = psutil.Process().memory_info().rss / 2**20
        print(
            f"{args.count} authorizations ({args.format}), {report.events} events, "
            f"batch {args.batch}"
        )
        print(f"parse only:  {parse[0]:>9,.0f} auths/s wall  {parse[1]:>9,.0f} auths/s CPU")
        print(
            f"end to end:  {e2e[0]:>9,.0f} auths/s wall  {e2e[1]:>9,.0f} auths/s CPU  "
            f"({w1 - w0:.1f} s)"
        )
        print(f"peak RSS ~{rss:.0f} MB")
        print()
        print(
            f"| {args.format} | {args.count:,} | {parse[0]:,.0f} | {e2e[0]:,.0f} | "
            f"{e2e[1]:,.0f} | {rss:.0f} MB |"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
