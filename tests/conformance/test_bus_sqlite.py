"""The bus conformance suite on the embedded SQLite backend (one file, reopened on restart)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from bus_suite import BusConformance, FakeClock, held

from paypost.bus import Bus, BusConfig, Rule, TargetConfig, UnitOfWork
from paypost.bus.sqlite import DB_FILENAME, SqliteBus
from paypost.events import Event


class TestSqliteBus(BusConformance):
    @pytest.fixture(autouse=True)
    def _dir(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "data"
        self.opened: list[SqliteBus] = []

    def make_bus(self, clock: FakeClock, config: BusConfig | None = None) -> Bus:
        bus = SqliteBus.open(self.dir, config, clock=clock)
        bus.conn.execute("CREATE TABLE IF NOT EXISTS test_effects (event_id TEXT NOT NULL)")
        self.opened.append(bus)
        return bus

    def reopen(self, bus: Bus) -> Bus:
        assert isinstance(bus, SqliteBus)
        bus.close()  # the old process is gone; a new one opens the same file
        return self.make_bus(bus.clock, bus.config)  # type: ignore[arg-type]

    def apply_effect(self, uow: UnitOfWork, event: Event) -> None:
        uow.conn.execute("INSERT INTO test_effects VALUES (?)", (event.id,))

    def effect_counts(self, bus: Bus) -> Counter[str]:
        assert isinstance(bus, SqliteBus)
        rows = bus.conn.execute("SELECT event_id FROM test_effects").fetchall()
        return Counter(r[0] for r in rows)


def test_rules_targets_and_queues_survive_a_restart(tmp_path: Path) -> None:

    bus = SqliteBus.open(tmp_path)
    bus.put_target(TargetConfig(name="holds", batch_size=7))
    bus.put_rule(Rule(name="r", pattern={"detail-type": ["TransactionHeld"]}, target="holds"))
    bus.publish([held(1)])
    bus.close()
    assert (tmp_path / DB_FILENAME).exists()
    again = SqliteBus.open(tmp_path)
    assert again.target("holds").batch_size == 7
    assert [r.name for r in again.rules()] == ["r"]
    assert [d.event.id for d in again.receive("holds")] == ["held-1"]
    mode = again.conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_a_second_connection_sees_rule_changes(tmp_path: Path) -> None:

    pipeline = SqliteBus.open(tmp_path)
    pipeline.put_target(TargetConfig(name="holds"))
    cli = SqliteBus.open(tmp_path)  # e.g. a CLI command while the pipeline runs
    cli.put_rule(Rule(name="r", pattern={"detail-type": ["TransactionHeld"]}, target="holds"))
    assert pipeline.publish([held(1)]).routed == {"holds": 1}


def test_background_checkpoints_keep_the_wal_bounded(tmp_path: Path) -> None:

    limit = 256 * 1024
    bus = SqliteBus.open(tmp_path, background_checkpoints=True, max_wal_bytes=limit)
    bus.put_target(TargetConfig(name="holds"))
    bus.put_rule(Rule(name="r", pattern={"detail-type": ["TransactionHeld"]}, target="holds"))
    wal = tmp_path / "paypost.db-wal"
    sizes = []
    for b in range(40):
        bus.publish([held(b * 100 + i, reason="x" * 200) for i in range(100)])
        sizes.append(wal.stat().st_size)
    assert bus.archive_count() == 4000
    # ~40 batches × ~60 KB would be > 2 MB without checkpoints that let the WAL restart
    assert max(sizes[-10:]) < 4 * limit
    bus.close()
    again = SqliteBus.open(tmp_path)
    assert again.pending("holds") == 4000
