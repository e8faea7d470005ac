"""The ledger conformance suite on PostgreSQL (one schema per tenant under the test's prefix)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

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

from paypost.ledger.postgres import PostgresLedger, tenant_schema

pytestmark = pytest.mark.postgres


class TestPostgresLedger(LedgerSuite, LedgerProperties, LedgerModelCheck, LedgerConcurrency):
    @pytest.fixture
    def store(self, postgres_url: str, pg_schema: str) -> Iterator[PostgresLedger]:
        s = PostgresLedger(postgres_url, prefix=pg_schema)
        yield s
        s.close()

    @pytest.fixture
    def store_factory(self, postgres_url: str, pg_schema: str) -> Callable[[], PostgresLedger]:
        return lambda: PostgresLedger(postgres_url, prefix=pg_schema)


def test_each_tenant_gets_its_own_schema(postgres_url: str, pg_schema: str) -> None:
    store = PostgresLedger(postgres_url, prefix=pg_schema)
    store.create_accounts([customer("a"), customer("a", tenant="Other.Bank!")])
    assert tenant_schema(pg_schema, T) != tenant_schema(pg_schema, "Other.Bank!")
    assert tenant_schema(pg_schema, "Other.Bank!") != tenant_schema(pg_schema, "other_bank_")
    assert store.tenants() == sorted([T, "Other.Bank!"])
    store.close()


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
