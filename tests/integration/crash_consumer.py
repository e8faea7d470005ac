"""A consumer process for tests/integration/test_bus_crash.py (run as a script).

It consumes target `posting` from the SQLite bus in DATA_DIR and applies one effect row per
event (table crash_effects, deliberately WITHOUT a unique constraint, so a repeated effect
would show as a second row). After CRASH_AFTER batches it writes the SIGNAL file and hangs
at the crash point, waiting for the parent's `kill -9`:

- mode `inside`: inside the unit of work, after writing the batch's effects (uncommitted);
- mode `after-commit`: after committing effects + tracking record, before the ack (the
  broker-style split where the ack is a separate step).
With CRASH_AFTER < 0 it consumes until the queue is empty and exits 0.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

from paypost.bus import Consumer, Delivery, UnitOfWork
from paypost.bus.sqlite import SqliteBus

CONSUMER = "poster"


def main(data_dir: Path, mode: str, crash_after: int, signal: Path) -> None:
    bus = SqliteBus.open(data_dir)
    bus.conn.execute("CREATE TABLE IF NOT EXISTS crash_effects (event_id TEXT NOT NULL)")
    batches = 0

    def apply(uow: UnitOfWork, deliveries: Sequence[Delivery]) -> None:
        uow.conn.executemany(
            "INSERT INTO crash_effects VALUES (?)", [(d.event.id,) for d in deliveries]
        )

    def hang() -> None:
        signal.write_text("crash point reached")
        while True:
            time.sleep(1)

    if mode == "inside":

        def handler(deliveries: Sequence[Delivery], uow: UnitOfWork) -> None:
            nonlocal batches
            apply(uow, deliveries)
            batches += 1
            if batches == crash_after:
                hang()

        Consumer(bus, "posting", handler, name=CONSUMER).run(until_idle=True)
        return

    # after-commit: effects + tracking record commit, then the ack is a separate step.
    while bus.pending("posting"):
        batch = bus.receive("posting")
        if not batch:
            time.sleep(0.05)
            continue
        with bus.unit_of_work() as uow:
            done = uow.processed(CONSUMER, batch)
            fresh = [d for d in batch if d.tracking_key not in done]
            apply(uow, fresh)
            uow.track(CONSUMER, fresh)
        batches += 1
        if batches == crash_after:
            hang()
        bus.ack(batch)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
