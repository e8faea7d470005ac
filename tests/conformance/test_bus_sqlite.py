"""The bus conformance suite on the embedded SQLite backend (one file, reopened on restart)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from bus_suite import BusConformance, FakeClock, held

from paypost.bus import ArchiveQuery, Bus, BusConfig, Rule, TargetConfig, UnitOfWork
from paypost.bus import sqlite as bus_sqlite
from paypost.bus.core import decode_event, id_key
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


def test_a_new_database_has_16_kib_pages_and_an_old_one_keeps_its_own(tmp_path: Path) -> None:
    import sqlite3

    from paypost.config import SQLITE_PAGE_SIZE

    bus = SqliteBus.open(tmp_path / "new")
    assert bus.conn.execute("PRAGMA page_size").fetchone()[0] == SQLITE_PAGE_SIZE == 16384
    bus.close()
    # A database made before the change (4 KiB pages, WAL) is opened as it is and works.
    (tmp_path / "old").mkdir()
    old = sqlite3.connect(tmp_path / "old" / DB_FILENAME)
    old.execute("PRAGMA page_size=4096")
    old.execute("PRAGMA journal_mode=WAL")
    old.execute("CREATE TABLE before_the_change (x)")
    old.close()
    again = SqliteBus.open(tmp_path / "old")
    assert again.conn.execute("PRAGMA page_size").fetchone()[0] == 4096
    again.put_target(TargetConfig(name="holds"))
    again.put_rule(Rule(name="r", pattern={"detail-type": ["TransactionHeld"]}, target="holds"))
    again.publish([held(1)])
    assert [d.event.id for d in again.receive("holds")] == ["held-1"]


def test_page_size_of_new_databases_is_set_by_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PAYPOST_SQLITE_PAGE_SIZE picks the page size of a new database (realtime deployments
    write a third of the bytes with 4 KiB pages); a bad value is refused, naming the setting."""
    from paypost.config import UserError
    from paypost.ledger import sqlite as ledger_sqlite

    monkeypatch.setenv("PAYPOST_SQLITE_PAGE_SIZE", "4096")
    bus = SqliteBus.open(tmp_path / "rt")
    assert bus.conn.execute("PRAGMA page_size").fetchone()[0] == 4096
    bus.close()
    ledger = ledger_sqlite.connect(tmp_path / "ledger.db")
    assert ledger.execute("PRAGMA page_size").fetchone()[0] == 4096
    ledger.close()
    monkeypatch.setenv("PAYPOST_SQLITE_PAGE_SIZE", "16384")
    again = SqliteBus.open(tmp_path / "rt")  # an existing database keeps its own
    assert again.conn.execute("PRAGMA page_size").fetchone()[0] == 4096
    again.close()
    for bad in ("5000", "16k", "131072"):
        monkeypatch.setenv("PAYPOST_SQLITE_PAGE_SIZE", bad)
        with pytest.raises(UserError, match=f"PAYPOST_SQLITE_PAGE_SIZE='{bad}' is not a SQLite"):
            SqliteBus.open(tmp_path / f"bad-{bad}")


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


def _archive_by_time(bus: SqliteBus, start: float, end: float) -> list[tuple[int, float]]:
    """What the per-event time index answered: (position, archived_at) in time order."""
    return bus.conn.execute(
        "SELECT position, archived_at FROM bus_archive WHERE archived_at >= ? AND archived_at < ? "
        "ORDER BY archived_at, position",
        (start, end),
    ).fetchall()


def test_archive_runs_answer_time_queries_like_a_per_event_time_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Publishes of several sizes at times that also go backwards (a clock step), pages
    # smaller than a run, a purge that keeps queued events: reads by time, counts and
    # replays are those of an index on archived_at.
    monkeypatch.setattr(bus_sqlite, "_REPLAY_CHUNK", 3)
    clock = FakeClock()
    bus = SqliteBus.open(tmp_path, BusConfig(archive_retention_s=100), clock=clock)
    bus.put_target(TargetConfig(name="holds"))
    bus.put_rule(Rule(name="r", pattern={"detail-type": ["TransactionHeld"]}, target="holds"))
    n = 0
    for step, size in [(0, 4), (5, 1), (-3, 7), (0, 2), (10, 5), (-20, 3), (200, 2), (0, 6)]:
        clock.advance(step)
        bus.publish([held(n + i) for i in range(size)], dedup=False)
        n += size
        if step == 10:
            with bus.unit_of_work() as uow:  # ack some, so the purge drops only those
                uow.ack(bus.receive("holds", 5))
    t0 = clock.now - 240

    def check() -> None:
        for start, end in [(t0, t0 + 1000), (t0 + 20, t0 + 30), (t0 + 17, t0 + 22), (0, 1)]:
            expected = _archive_by_time(bus, start, end)
            got = [
                (a.position, a.archived_at) for a in bus.archive(ArchiveQuery(start=start, end=end))
            ]
            assert got == expected
            assert bus.archive_count(start, end) == len(expected)
        assert bus.archive_count() == bus.stats().archived
        assert (
            bus.archive_count()
            == bus.conn.execute("SELECT count(*) FROM bus_archive").fetchone()[0]
        )

    check()
    assert bus.purge_archive() > 0
    check()
    replayed = bus.replay(ArchiveQuery(start=t0, end=t0 + 1000))
    assert replayed.scanned == replayed.matched == bus.archive_count()


def test_a_database_with_the_per_event_time_index_moves_to_runs(tmp_path: Path) -> None:
    clock = FakeClock()
    bus = SqliteBus.open(tmp_path, clock=clock)
    bus.put_target(TargetConfig(name="holds"))
    bus.put_rule(Rule(name="r", pattern={"detail-type": ["TransactionHeld"]}, target="holds"))
    for b in range(5):
        clock.advance({2: 0, 3: -7}.get(b, 1))  # publishes 1 and 2 at one time
        bus.publish([held(b * 10 + i) for i in range(b + 1)])
    # Turn the file into what an earlier paypost wrote: an index per event (the runs left
    # stand for a newer paypost having written the file before: rebuilt, never doubled).
    bus.conn.execute("CREATE INDEX bus_archive_time ON bus_archive(archived_at)")
    expected = _archive_by_time(bus, 0, 1e12)
    bus.close()
    again = SqliteBus.open(tmp_path, clock=clock)
    index = again.conn.execute("SELECT 1 FROM sqlite_master WHERE name='bus_archive_time'")
    assert index.fetchone() is None
    got = [(a.position, a.archived_at) for a in again.archive(ArchiveQuery(start=0, end=1e12))]
    assert got == expected
    assert again.archive_count() == len(expected) == 15
    again.publish([held(99)])
    assert again.archive_count() == 16


def test_every_archived_event_has_its_id_key(tmp_path: Path) -> None:
    # Archived events are looked up by id key (reconciliation), however they were published.
    bus = SqliteBus.open(tmp_path)
    bus.put_target(TargetConfig(name="holds"))
    bus.publish([held(1)])
    bus.publish([held(2)], dedup=False)
    with bus.unit_of_work() as uow:
        uow.publish([held(3)], dedup=False, inline={"holds"})
        uow.dead_letter("holds", [held(4)], "gave up")
    rows = bus.conn.execute("SELECT id_key, body FROM bus_archive ORDER BY position").fetchall()
    assert [decode_event(body).id for _, body in rows] == [f"held-{n}" for n in range(1, 5)]
    assert all(key == id_key(decode_event(body).id) for key, body in rows)
