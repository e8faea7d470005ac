"""Damage done to a ledger on purpose, for the reconciliation tests (FR10): what a restore
from an older backup or a faulty writer leaves behind. Shared by tests/e2e and
tests/integration (tests/ is on sys.path: its conftest.py lives there)."""

from __future__ import annotations

import sqlite3


def delete_sqlite_entry(conn: sqlite3.Connection, tenant: str, entry_id: str) -> None:
    """A posting the SQLite ledger lost: the entry, its legs and their effect on the balances
    gone (in the caller's transaction); the assembler still remembers it as complete."""
    (pk,) = conn.execute(
        "SELECT pk FROM ledger_entries WHERE tenant = ? AND id = ?", (tenant, entry_id)
    ).fetchone()
    for account_pk, amount in conn.execute(
        "SELECT account_pk, amount FROM ledger_legs WHERE entry_pk = ?", (pk,)
    ).fetchall():
        conn.execute(
            "UPDATE ledger_balances SET balance = balance - ?, debits = debits - ?, "
            "credits = credits - ?, legs = legs - 1 WHERE account_pk = ?",
            (amount, -amount if amount < 0 else 0, amount if amount > 0 else 0, account_pk),
        )
    conn.execute("DELETE FROM ledger_legs WHERE entry_pk = ?", (pk,))
    conn.execute("DELETE FROM ledger_entries WHERE pk = ?", (pk,))
