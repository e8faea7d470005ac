"""The ledger conformance suite on the SQLite store, plus what only SQLite offers: posting
inside a caller-owned transaction (the embedded pipeline's one-transaction-per-batch)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ledger_suite import (
    LedgerConcurrency,
    LedgerModelCheck,
    LedgerProperties,
    LedgerSuite,
    T,
    customer,
    internal,
    transfer,
)

from paypost.ledger import sqlite as ledger_sqlite
from paypost.ledger.model import LedgerMissing
from paypost.ledger.sqlite import SqliteLedger


class TestSqliteLedger(LedgerSuite, LedgerProperties, LedgerModelCheck, LedgerConcurrency):
    @pytest.fixture
    def store(self, tmp_path: Path) -> Iterator[SqliteLedger]:
        s = SqliteLedger.open(tmp_path / "paypost.db")
        yield s
        s.close()

    @pytest.fixture
    def store_factory(self, tmp_path: Path) -> Callable[[], SqliteLedger]:
        return lambda: SqliteLedger.open(tmp_path / "paypost.db")


class TestSqliteLedgerWithColliding64BitKeys(LedgerSuite, LedgerProperties, LedgerModelCheck):
    """The same suite with an entry-key function that collides all the time (three values), so
    that every id clash goes through the overflow table: no entry may be lost, merged with
    another, or reported as a duplicate of a different entry."""

    @pytest.fixture
    def store(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SqliteLedger]:
        monkeypatch.setattr(ledger_sqlite, "entry_key", lambda tenant, eid: len(eid) % 3)
        s = SqliteLedger.open(tmp_path / "paypost.db")
        yield s
        s.close()


def _setup(path: Path) -> sqlite3.Connection:
    conn = ledger_sqlite.connect(path)
    conn.execute("BEGIN IMMEDIATE")
    ledger_sqlite.ensure_schema(conn)
    ledger_sqlite.create_accounts_in(
        conn, [customer("carol"), internal("settle-eur", "settlement")]
    )
    conn.execute("COMMIT")
    return conn


def test_durability_pragmas(tmp_path: Path) -> None:
    conn = _setup(tmp_path / "paypost.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA page_size").fetchone()[0] == 16384  # a new file


def test_posting_joins_the_callers_transaction(tmp_path: Path) -> None:
    path = tmp_path / "paypost.db"
    conn = _setup(path)
    # The caller's unit of work: its own table plus the ledger, one transaction.
    conn.execute("CREATE TABLE tracking (position INTEGER)")
    conn.execute("BEGIN IMMEDIATE")
    [r] = ledger_sqlite.post_batch_in(conn, [transfer("e1", "settle-eur", "carol", 100)])
    conn.execute("INSERT INTO tracking VALUES (1)")
    assert r.status == "posted"
    other = SqliteLedger(ledger_sqlite.connect(path))
    assert other.balance(T, "carol").balance.minor == 0  # not committed: invisible
    conn.execute("ROLLBACK")  # the caller's batch failed: the posting is gone too
    assert ledger_sqlite.balance_in(conn, T, "carol").balance.minor == 0
    assert ledger_sqlite.get_entry_in(conn, T, "e1") is None

    conn.execute("BEGIN IMMEDIATE")
    cache = ledger_sqlite.AccountCache()
    [r] = ledger_sqlite.post_batch_in(
        conn, [transfer("e1", "settle-eur", "carol", 100)], cache=cache
    )
    conn.execute("INSERT INTO tracking VALUES (1)")
    conn.execute("COMMIT")
    assert r.status == "posted"
    assert other.balance(T, "carol").balance.minor == 100
    assert other.conn.execute("SELECT position FROM tracking").fetchall() == [(1,)]
    other.close()


def test_post_batch_in_refuses_to_run_outside_a_transaction(tmp_path: Path) -> None:
    conn = _setup(tmp_path / "paypost.db")
    with pytest.raises(RuntimeError, match="BEGIN IMMEDIATE"):
        ledger_sqlite.post_batch_in(conn, [transfer("e1", "settle-eur", "carol", 1)])


def test_account_cache_sees_changes_from_another_connection(tmp_path: Path) -> None:
    path = tmp_path / "paypost.db"
    conn = _setup(path)
    cache = ledger_sqlite.AccountCache()
    conn.execute("BEGIN IMMEDIATE")
    ledger_sqlite.post_batch_in(conn, [transfer("e1", "settle-eur", "carol", 5)], cache=cache)
    conn.execute("COMMIT")
    other = SqliteLedger.open(path)
    other.set_account_status(T, "carol", "closed")
    other.close()
    conn.execute("BEGIN IMMEDIATE")
    [r] = ledger_sqlite.post_batch_in(conn, [transfer("e2", "settle-eur", "carol", 5)], cache=cache)
    conn.execute("COMMIT")
    assert r.status == "refused" and r.reason is not None and "closed" in r.reason


def test_opening_a_missing_ledger_says_so(tmp_path: Path) -> None:
    with pytest.raises(LedgerMissing, match="no ledger database"):
        SqliteLedger.open(tmp_path / "absent.db", create=False)
    sqlite3.connect(tmp_path / "empty.db").close()
    with pytest.raises(LedgerMissing, match="no ledger tables"):
        SqliteLedger.open(tmp_path / "empty.db", create=False)
