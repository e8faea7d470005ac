"""The ledger conformance suite on PostgreSQL, plus concurrent writers on one hot account."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from ledger_suite import (
    LedgerModelCheck,
    LedgerProperties,
    LedgerSuite,
    T,
    customer,
    internal,
    transfer,
)

from paypost.ledger.postgres import PostgresLedger, tenant_schema

pytestmark = pytest.mark.postgres


class TestPostgresLedger(LedgerSuite, LedgerProperties, LedgerModelCheck):
    @pytest.fixture
    def store(self, postgres_url: str, pg_schema: str) -> Iterator[PostgresLedger]:
        s = PostgresLedger(postgres_url, prefix=pg_schema)
        yield s
        s.close()


def test_each_tenant_gets_its_own_schema(postgres_url: str, pg_schema: str) -> None:
    store = PostgresLedger(postgres_url, prefix=pg_schema)
    store.create_accounts([customer("a"), customer("a", tenant="Other.Bank!")])
    assert tenant_schema(pg_schema, T) != tenant_schema(pg_schema, "Other.Bank!")
    assert tenant_schema(pg_schema, "Other.Bank!") != tenant_schema(pg_schema, "other_bank_")
    assert store.tenants() == sorted([T, "Other.Bank!"])
    store.close()


def test_concurrent_writers_on_a_hot_account_lose_nothing(
    postgres_url: str, pg_schema: str
) -> None:
    """Eight writers, separate connections, all debiting one hot account with an overdraft
    limit and crediting the same settlement account: every posted debit is counted once,
    the limit is never breached, and the final balance is exact."""
    setup = PostgresLedger(postgres_url, prefix=pg_schema)
    limit = 150_000
    setup.create_accounts(
        [
            customer("hot", overdraft_limit=limit),
            internal("settle", "settlement"),
            *[customer(f"c{w}") for w in range(8)],
        ]
    )
    setup.post_batch([transfer("fund", "settle", "hot", 100_000)])
    writers, batches, per_batch, amount = 8, 6, 25, 700
    outcomes: list[list[str]] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def writer(w: int) -> None:
        store = PostgresLedger(postgres_url, prefix=pg_schema)
        try:
            for b in range(batches):
                batch = []
                for i in range(per_batch):
                    eid = f"w{w}-b{b}-{i}"
                    # Alternate: spend from the hot account, or credit it from a customer.
                    if i % 5 == 4:
                        batch.append(transfer(eid, "settle", "hot", amount // 2))
                    else:
                        batch.append(transfer(eid, "hot", f"c{w}", amount))
                statuses = [r.status for r in store.post_batch(batch)]
                # A redelivery of what was posted: duplicates, never posted twice.
                again = [e for e, st in zip(batch, statuses, strict=True) if st == "posted"]
                replay = [r.status for r in store.post_batch(again)]
                assert set(replay) <= {"duplicate"}, replay
                with lock:
                    outcomes.append(statuses)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures
    posted_debits = posted_credits = refused = 0
    for statuses in outcomes:
        for i, st in enumerate(statuses):
            if st == "posted":
                if i % 5 == 4:
                    posted_credits += 1
                else:
                    posted_debits += 1
            else:
                assert st == "refused"
                refused += 1
    hot = setup.balance(T, "hot")
    expected = 100_000 - posted_debits * amount + posted_credits * (amount // 2)
    assert hot.balance.minor == expected
    assert hot.balance.minor >= -limit
    assert refused > 0  # the limit was actually reached under contention
    # The settlement account has no rule, so it is never locked up front: its in-place
    # increments from all writers must still add up exactly.
    settle = setup.balance(T, "settle")
    assert settle.balance.minor == -100_000 - posted_credits * (amount // 2)
    assert settle.entries == 1 + posted_credits
    total = sum(setup.balance(T, f"c{w}").balance.minor for w in range(writers))
    assert total == posted_debits * amount
    assert setup.trial_balance(T).balanced
    entries = setup.entries(T, "hot", limit=10_000)
    assert len(entries) == 1 + posted_debits + posted_credits
    setup.close()


def test_account_changes_by_another_connection_are_seen(postgres_url: str, pg_schema: str) -> None:
    a = PostgresLedger(postgres_url, prefix=pg_schema)
    b = PostgresLedger(postgres_url, prefix=pg_schema)
    a.create_accounts([customer("carol"), internal("settle", "settlement")])
    assert a.post_batch([transfer("e1", "settle", "carol", 5)])[0].status == "posted"
    b.set_account_status(T, "carol", "closed")
    [r] = a.post_batch([transfer("e2", "settle", "carol", 5)])
    assert r.status == "refused" and r.reason is not None and "closed" in r.reason
    b.create_accounts([customer("dave")])
    assert a.post_batch([transfer("e3", "settle", "dave", 5)])[0].status == "posted"
    a.close()
    b.close()
