"""kill -9 a consumer of the SQLite bus mid-batch, restart it: every event is processed
exactly once in effect (DESIGN §3.1), nothing lost, nothing dead-lettered."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from paypost.bus import Rule, TargetConfig
from paypost.bus.sqlite import DB_FILENAME, SqliteBus
from paypost.events import TransactionHeld, new_event

SCRIPT = Path(__file__).with_name("crash_consumer.py")
EVENTS = 600


def _start(data_dir: Path, mode: str, crash_after: int, sig: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(data_dir), mode, str(crash_after), str(sig)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["inside", "after-commit"])
def test_kill_9_mid_batch_then_restart_processes_every_event_once(
    data_dir: Path, mode: str
) -> None:
    bus = SqliteBus.open(data_dir)
    bus.put_target(TargetConfig(name="posting", batch_size=50, lease_s=0.5))
    bus.put_rule(
        Rule(name="posting", pattern={"detail-type": ["TransactionHeld"]}, target="posting")
    )
    events = [
        new_event(TransactionHeld(reason="r", stage="s"), source="t", tenant="t1", id=f"ev-{i}")
        for i in range(EVENTS)
    ]
    bus.publish(events)
    bus.close()

    sig = data_dir / "crash.signal"
    proc = _start(data_dir, mode, crash_after=4, sig=sig)
    deadline = time.monotonic() + 60
    while not sig.exists():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "the consumer never reached its crash point"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # mid-batch: batch 4 is in flight
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    db = sqlite3.connect(data_dir / DB_FILENAME)
    before = db.execute("SELECT count(*) FROM crash_effects").fetchone()[0]
    committed_batches = 3 if mode == "inside" else 4
    assert before == committed_batches * 50  # the killed batch's effects: all or nothing
    db.close()

    sig.unlink()
    restart = _start(data_dir, mode, crash_after=-1, sig=sig)
    _out, err = restart.communicate(timeout=90)
    assert restart.returncode == 0, err.decode()

    db = sqlite3.connect(data_dir / DB_FILENAME)
    counts = dict(
        db.execute("SELECT event_id, count(*) FROM crash_effects GROUP BY event_id").fetchall()
    )
    assert set(counts) == {e.id for e in events}  # nothing lost
    assert set(counts.values()) == {1}  # nothing applied twice
    assert db.execute("SELECT count(*) FROM bus_queue").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM bus_dlq").fetchone()[0] == 0
    db.close()
