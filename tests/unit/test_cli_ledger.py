"""`paypost ledger balance|entries|trial-balance` on the embedded SQLite ledger (and PostgreSQL)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

import paypost.cli
from paypost.cli import app
from paypost.config import UserError
from paypost.ledger.model import Account, JournalEntry, LedgerStore, Leg
from paypost.ledger.sqlite import SqliteLedger
from paypost.money import Money

paypost.cli._register()
runner = CliRunner()


def _entry(eid: str, debit: str, credit: str, minor: int, tenant: str = "default") -> JournalEntry:
    m = Money(minor, "EUR")
    return JournalEntry(
        id=eid,
        tenant=tenant,
        legs=(
            Leg(account=debit, side="debit", amount=m),
            Leg(account=credit, side="credit", amount=m),
        ),
        booked_at=datetime(2026, 11, 21, 10, int(eid[-1]), tzinfo=UTC),
        description=f"payment {eid}",
    )


def _seed(store: LedgerStore, tenant: str = "default") -> None:
    store.create_accounts(
        [
            Account(id="alice", tenant=tenant, kind="customer", currency="EUR"),
            Account(id="settle", tenant=tenant, kind="internal", role="settlement", currency="EUR"),
        ]
    )
    store.post_batch([_entry(f"e{i}", "settle", "alice", 1000 + i, tenant) for i in range(1, 6)])


@pytest.fixture
def seeded(data_dir: Path) -> Path:
    store = SqliteLedger.open(data_dir / "paypost.db")
    _seed(store)
    store.close()
    return data_dir


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["ledger", *args])
    if isinstance(result.exception, UserError):
        return 2, str(result.exception)
    return result.exit_code, result.output


def test_balance_text_and_json(seeded: Path) -> None:
    code, out = run("balance", "alice", "--data-dir", str(seeded))
    assert code == 0 and "50.15 EUR" in out
    code, out = run("balance", "--account", "alice", "--data-dir", str(seeded), "--json")
    doc = json.loads(out)
    assert doc["balance"] == {"minor": 5015, "currency": "EUR", "formatted": "50.15"}
    assert (doc["credits"], doc["debits"], doc["legs"]) == (5015, 0, 5)


def test_entries_range_and_pages(seeded: Path) -> None:
    code, out = run(
        "entries", "--account", "alice", "--data-dir", str(seeded), "--json",
        "--from", "2026-11-21T10:02:00", "--to", "2026-11-21T10:05:00Z",
    )  # fmt: skip
    assert code == 0
    assert [e["id"] for e in json.loads(out)["entries"]] == ["e2", "e3", "e4"]
    code, out = run("entries", "--account", "alice", "--data-dir", str(seeded), "--json",
                    "--limit", "2", "--offset", "3")  # fmt: skip
    assert [e["id"] for e in json.loads(out)["entries"]] == ["e4", "e5"]
    code, out = run("entries", "--account", "alice", "--data-dir", str(seeded))
    assert code == 0 and "payment e1" in out and "10.01 EUR" in out
    code, msg = run("entries", "--account", "alice", "--data-dir", str(seeded), "--from", "soon")
    assert code == 2 and "ISO 8601" in msg


def test_trial_balance(seeded: Path) -> None:
    code, out = run("trial-balance", "--data-dir", str(seeded), "--json")
    assert code == 0
    [tb] = json.loads(out)["tenants"]
    assert tb["tenant"] == "default" and tb["balanced"] is True
    assert tb["currencies"] == [
        {"currency": "EUR", "debits": 5015, "credits": 5015, "net": 0, "accounts": 2}
    ]
    code, out = run("trial-balance", "--data-dir", str(seeded))
    assert code == 0 and "balanced" in out


def test_unknown_account_and_missing_ledger(seeded: Path, tmp_path: Path) -> None:
    code, msg = run("balance", "bob", "--data-dir", str(seeded))
    assert code == 2 and "no account 'bob'" in msg and "--tenant" in msg
    code, msg = run("balance", "alice", "--data-dir", str(seeded), "--tenant", "other")
    assert code == 2 and "tenant 'other'" in msg
    code, msg = run("trial-balance", "--data-dir", str(tmp_path / "nowhere"))
    assert code == 2 and "no ledger database" in msg and "--data-dir" in msg


def test_the_real_command_prints_errors_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "from paypost.cli import main; main()",
         "ledger", "balance", "x", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "no ledger database" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.postgres
def test_postgres_ledger_through_db_url(postgres_url: str, pg_schema: str) -> None:
    from paypost.ledger.postgres import PostgresLedger

    store = PostgresLedger(postgres_url, prefix=pg_schema)
    _seed(store, tenant="bank-b")
    store.close()
    common = ["--db-url", postgres_url, "--pg-prefix", pg_schema, "--tenant", "bank-b", "--json"]
    code, out = run("balance", "alice", *common)
    assert code == 0 and json.loads(out)["balance"]["minor"] == 5015
    code, out = run("entries", "--account", "alice", *common, "--limit", "1")
    assert [e["id"] for e in json.loads(out)["entries"]] == ["e1"]
    code, out = run("trial-balance", *common)
    assert json.loads(out)["tenants"][0]["balanced"] is True
    code, msg = run("balance", "alice", "--db-url", "mysql://x", "--json")
    assert code == 2 and "not a PostgreSQL URL" in msg
