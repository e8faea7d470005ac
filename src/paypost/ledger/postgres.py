"""The PostgreSQL ledger store (psycopg 3): one schema per tenant, same semantics as SQLite.

Isolation: each tenant's tables live in their own schema `<prefix>_<tenant>` (see
docs/ledger.md for why not row-level security: superusers and table owners bypass RLS, while
a schema boundary holds for every role, and per-tenant schemas can be granted, dumped, moved
or dropped one by one). Every statement names the tenant's schema explicitly; a tenant that
has no schema simply has no accounts.

Concurrency: a batch locks (SELECT ... FOR UPDATE, in account order) the balance rows of the
accounts that carry an overdraft rule before deciding, so the rule sees the latest committed
balance; every balance change is an in-place `balance = balance + delta` update, applied in
account order, so concurrent writers never lose an update and cannot deadlock each other.
Two writers racing on the same entry id meet at the unique index; the loser retries the whole
batch and then sees a duplicate (or a conflict).

Writes: entries and legs go in with COPY, balances with one UPDATE ... FROM unnest(...).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
from psycopg import errors, sql

from paypost.ledger.model import (
    Account,
    AccountError,
    AccountStatus,
    Balance,
    JournalEntry,
    Leg,
    PostedEntry,
    PostedLeg,
    PostResult,
    TrialBalance,
    TrialBalanceLine,
    UnknownAccount,
    UnknownEntry,
    check_trial_balance,
)
from paypost.ledger.posting import (
    AccountState,
    ExistingEntry,
    Key,
    Needs,
    OriginalEntry,
    Plan,
    check_plan,
    from_micros,
    needs,
    now_micros,
    plan_batch,
    to_micros,
)
from paypost.money import Money
from paypost.pgarray import Int8Array

_PREFIX_RE = re.compile(r"[a-z_][a-z0-9_]{0,29}")
_RETRIES = 8

_TABLES = """
CREATE TABLE IF NOT EXISTS {s}.ledger_accounts (
    pk BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    role TEXT,
    currency TEXT NOT NULL,
    product_type TEXT,
    name TEXT,
    iban TEXT,
    sort_code TEXT,
    account_number TEXT,
    status TEXT NOT NULL,
    overdraft_limit BIGINT,
    created_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS {s}.ledger_balances (
    account_pk BIGINT PRIMARY KEY,
    balance BIGINT NOT NULL,
    debits BIGINT NOT NULL,
    credits BIGINT NOT NULL,
    legs BIGINT NOT NULL
);
CREATE SEQUENCE IF NOT EXISTS {s}.ledger_entries_pk;
CREATE TABLE IF NOT EXISTS {s}.ledger_entries (
    pk BIGINT PRIMARY KEY,
    id TEXT NOT NULL,
    content_hash BYTEA NOT NULL,
    booked_at BIGINT NOT NULL,
    posted_at BIGINT NOT NULL,
    sequence_id TEXT,
    source_event_id TEXT,
    reversal_of TEXT,
    description TEXT,
    metadata JSONB
);
CREATE UNIQUE INDEX IF NOT EXISTS ledger_entries_id ON {s}.ledger_entries (id);
CREATE UNIQUE INDEX IF NOT EXISTS ledger_entries_reversal
    ON {s}.ledger_entries (reversal_of) WHERE reversal_of IS NOT NULL;
CREATE TABLE IF NOT EXISTS {s}.ledger_legs (
    entry_pk BIGINT NOT NULL,
    idx INTEGER NOT NULL,
    account_pk BIGINT NOT NULL,
    amount BIGINT NOT NULL,
    booked_at BIGINT NOT NULL,
    PRIMARY KEY (entry_pk, idx)
);
CREATE INDEX IF NOT EXISTS ledger_legs_account
    ON {s}.ledger_legs (account_pk, booked_at, entry_pk);
CREATE TABLE IF NOT EXISTS {s}.ledger_tenant (
    tenant TEXT PRIMARY KEY,
    accounts_version BIGINT NOT NULL DEFAULT 0
)
"""

_ACCOUNT_COLS = (
    "id, kind, currency, role, product_type, name, iban, sort_code, account_number, "
    "status, overdraft_limit"
)


def tenant_schema(prefix: str, tenant: str) -> str:
    """The schema of TENANT: `<prefix>_<tenant>` when the tenant id is a plain lowercase
    identifier, else a readable slug plus a hash (distinct tenants never share a schema)."""
    slug = re.sub(r"[^a-z0-9_]", "_", tenant.lower())[:24]
    if slug != tenant or not slug:
        slug = f"{slug}_{hashlib.blake2b(tenant.encode(), digest_size=5).hexdigest()}"
    return f"{prefix}_{slug}"


class PostgresLedger:
    """A LedgerStore on PostgreSQL. `post_batch` commits (and retries races);
    `post_batch_in(conn, ...)` joins a transaction the caller owns."""

    def __init__(self, conninfo: str, *, prefix: str = "paypost") -> None:
        if not _PREFIX_RE.fullmatch(prefix):
            raise ValueError(
                f"schema prefix {prefix!r} must be a lowercase identifier of at most 30 "
                "characters (letters, digits, underscore)"
            )
        self.prefix = prefix
        self.conninfo = conninfo
        self._conn = psycopg.connect(conninfo)
        self._known: set[str] = set()
        self._accounts: dict[str, tuple[int, dict[str, tuple[int, str, str, int | None]]]] = {}

    @property
    def conn(self) -> psycopg.Connection[Any]:
        """The ledger's own connection, opened again if the server dropped it (a PostgreSQL
        restart): a long-running reader such as a job's progress poll then recovers."""
        if self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self.conninfo)
        return self._conn

    # -- schema ---------------------------------------------------------------------------

    def schema(self, tenant: str) -> str:
        return tenant_schema(self.prefix, tenant)

    def ensure_schema(self) -> None:
        """Nothing to create up front: each tenant's schema is created with its first account."""

    def _ensure_tenant(self, conn: psycopg.Connection[Any], tenant: str) -> sql.Identifier:
        name = self.schema(tenant)
        ident = sql.Identifier(name)
        if name not in self._known:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
            for stmt in _TABLES.split(";"):
                if stmt.strip():
                    conn.execute(sql.SQL(stmt).format(s=ident))
            conn.execute(
                sql.SQL("INSERT INTO {}.ledger_tenant VALUES (%s) ON CONFLICT DO NOTHING").format(
                    ident
                ),
                (tenant,),
            )
            self._known.add(name)
        return ident

    def schema_in(self, conn: psycopg.Connection[Any], tenant: str) -> str | None:
        """TENANT's ledger schema, or None while the tenant has no ledger yet (on CONN)."""
        return self.schema(tenant) if self._tenant_exists(conn, tenant) else None

    def _tenant_exists(self, conn: psycopg.Connection[Any], tenant: str) -> bool:
        name = self.schema(tenant)
        if name in self._known:
            return True
        row = conn.execute(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relname = 'ledger_entries'",
            (name,),
        ).fetchone()
        if row is not None:
            self._known.add(name)
        return row is not None

    def tenants(self) -> list[str]:
        """The tenant ids that have a ledger under this prefix, sorted."""
        with self._read() as conn:
            schemas = [
                r[0]
                for r in conn.execute(
                    "SELECT n.nspname FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE c.relname = 'ledger_tenant' AND n.nspname LIKE %s",
                    (self.prefix.replace("_", "\\_") + "\\_%",),
                )
            ]
            out: list[str] = []
            for name in schemas:
                out += [
                    r[0]
                    for r in conn.execute(
                        sql.SQL("SELECT tenant FROM {}.ledger_tenant").format(sql.Identifier(name))
                    )
                    if self.schema(r[0]) == name
                ]
            return sorted(out)

    # -- transactions ---------------------------------------------------------------------

    def _commit(self) -> None:
        self.conn.commit()

    def close(self) -> None:
        self._conn.close()

    # -- accounts -------------------------------------------------------------------------

    def create_accounts(self, accounts: Sequence[Account]) -> None:
        try:
            self.create_accounts_in(self.conn, accounts)
            self._commit()
        except BaseException:
            self.conn.rollback()
            raise

    def create_accounts_in(
        self, conn: psycopg.Connection[Any], accounts: Sequence[Account]
    ) -> None:
        now = now_micros()
        for acc in accounts:
            acc.validate()
            s = self._ensure_tenant(conn, acc.tenant)
            existing = self._get_account(conn, acc.tenant, acc.id)
            if existing is None:
                self._bump_accounts_version(conn, acc.tenant)
            if existing is not None:
                if existing != acc:
                    raise AccountError(
                        f"account {acc.id!r} already exists in tenant {acc.tenant!r} with a "
                        "different definition; use another id or change it with "
                        "set_account_status"
                    )
                continue
            row = conn.execute(
                sql.SQL(
                    "INSERT INTO {}.ledger_accounts ("
                    + _ACCOUNT_COLS
                    + ", created_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) RETURNING pk"
                ).format(s),
                (
                    acc.id,
                    acc.kind,
                    acc.currency,
                    acc.role,
                    acc.product_type,
                    acc.name,
                    acc.iban,
                    acc.sort_code,
                    acc.account_number,
                    acc.status,
                    acc.overdraft_limit,
                    now,
                ),
            ).fetchone()
            assert row is not None
            conn.execute(
                sql.SQL(
                    "INSERT INTO {}.ledger_balances VALUES (%s, 0, 0, 0, 0) ON CONFLICT DO NOTHING"
                ).format(s),
                (row[0],),
            )

    def _get_account(
        self, conn: psycopg.Connection[Any], tenant: str, account_id: str
    ) -> Account | None:
        if not self._tenant_exists(conn, tenant):
            return None
        row = conn.execute(
            sql.SQL("SELECT " + _ACCOUNT_COLS + " FROM {}.ledger_accounts WHERE id = %s").format(
                sql.Identifier(self.schema(tenant))
            ),
            (account_id,),
        ).fetchone()
        if row is None:
            return None
        return Account(
            id=row[0],
            tenant=tenant,
            kind=row[1],
            currency=row[2],
            role=row[3],
            product_type=row[4],
            name=row[5],
            iban=row[6],
            sort_code=row[7],
            account_number=row[8],
            status=row[9],
            overdraft_limit=row[10],
        )

    def get_account(self, tenant: str, account_id: str) -> Account | None:
        try:
            return self._get_account(self.conn, tenant, account_id)
        finally:
            self.conn.rollback()

    def set_account_status(self, tenant: str, account_id: str, status: AccountStatus) -> None:
        if status not in ("open", "blocked", "closed"):
            raise AccountError(f"status {status!r} must be open, blocked or closed")
        try:
            if not self._tenant_exists(self.conn, tenant):
                raise UnknownAccount(f"no account {account_id!r} in tenant {tenant!r}")
            cur = self.conn.execute(
                sql.SQL("UPDATE {}.ledger_accounts SET status = %s WHERE id = %s").format(
                    sql.Identifier(self.schema(tenant))
                ),
                (status, account_id),
            )
            if cur.rowcount == 0:
                raise UnknownAccount(f"no account {account_id!r} in tenant {tenant!r}")
            self._bump_accounts_version(self.conn, tenant)
            self._commit()
        except BaseException:
            self.conn.rollback()
            raise

    # -- posting --------------------------------------------------------------------------

    def post_batch(self, entries: Sequence[JournalEntry]) -> list[PostResult]:
        """Post ENTRIES in one committed transaction; retried whole on a race (a concurrent
        writer of the same entry id, a serialization failure or deadlock)."""
        for attempt in range(_RETRIES):
            try:
                results = self.post_batch_in(self.conn, entries)
                self._commit()
                return results
            except (
                errors.UniqueViolation,
                errors.SerializationFailure,
                errors.DeadlockDetected,
            ):
                self.conn.rollback()
                if attempt == _RETRIES - 1:
                    raise
            except BaseException:
                self.conn.rollback()
                raise
        raise AssertionError("unreachable")

    def post_batch_in(
        self, conn: psycopg.Connection[Any], entries: Sequence[JournalEntry]
    ) -> list[PostResult]:
        """Post ENTRIES inside the caller's transaction on CONN (no commit). One result per
        entry, in order. A race with another writer of the same entry id raises
        psycopg.errors.UniqueViolation: roll back and retry the batch."""
        results: list[PostResult | None] = [None] * len(entries)
        groups: dict[str, list[int]] = {}
        for i, e in enumerate(entries):
            groups.setdefault(e.tenant, []).append(i)
        now = now_micros()
        # Tenants in a fixed order, so concurrent multi-tenant batches lock in the same order.
        for tenant in sorted(groups):
            idx = groups[tenant]
            sub = [entries[i] for i in idx]
            for i, r in zip(idx, self._post_tenant(conn, tenant, sub, now), strict=True):
                results[i] = r
        return [r for r in results if r is not None]

    def _post_tenant(
        self,
        conn: psycopg.Connection[Any],
        tenant: str,
        entries: list[JournalEntry],
        now: int,
    ) -> list[PostResult]:
        if not self._tenant_exists(conn, tenant):
            # No schema: no accounts, so nothing can post; plan says why for each entry.
            plan = plan_batch(
                entries, existing={}, accounts={}, originals={}, positions=iter(()), now=now
            )
            return plan.results
        s = sql.Identifier(self.schema(tenant))
        n = needs(entries)
        rows = self._cached_accounts(conn, s, tenant, [k[1] for k in n.account_keys])
        accounts: dict[Key, AccountState] = {}
        for key in n.account_keys:
            row = rows.get(key[1])
            if row is not None:
                accounts[key] = AccountState(row[0], row[1], row[2], row[3], 0)
        limited = sorted(a.pk for a in accounts.values() if a.overdraft_limit is not None)
        if limited:
            # Lock the rule-bearing balances in account order and read them as committed now.
            locked = dict(
                conn.execute(
                    sql.SQL(
                        "SELECT account_pk, balance FROM {}.ledger_balances "
                        "WHERE account_pk = ANY(%s) ORDER BY account_pk FOR UPDATE"
                    ).format(s),
                    (limited,),
                ).fetchall()
            )
            for a in accounts.values():
                if a.pk in locked:
                    a.balance = locked[a.pk]
        balances = {k: a.balance for k, a in accounts.items()}
        # Positions for every entry that might post (refused ones leave gaps).
        pks = [
            r[0]
            for r in conn.execute(
                "SELECT nextval(%s::regclass) FROM generate_series(1, %s) ORDER BY 1",
                (f"{s.as_string(conn)}.ledger_entries_pk", len(entries)),
            )
        ]
        conn.execute("SAVEPOINT ledger_post")
        first = self._existing(conn, s, tenant, [entries[0].id])
        # A redelivered batch (its first entry exists): read them all before planning.
        plan = self._plan(
            conn, s, tenant, entries, n, accounts, pks, now, read_existing=bool(first)
        )
        refused = plan.refused
        if refused and not first and self._existing(conn, s, tenant, [k[1] for k in refused]):
            for k, v in balances.items():
                accounts[k].balance = v
            plan = self._plan(conn, s, tenant, entries, n, accounts, pks, now, read_existing=True)
        else:
            try:
                self._write_entries(conn, s, plan, now)
                conn.execute("RELEASE SAVEPOINT ledger_post")
                self._write_legs(conn, s, plan)
                return plan.results
            except errors.UniqueViolation:
                conn.execute("ROLLBACK TO SAVEPOINT ledger_post")
                for k, v in balances.items():
                    accounts[k].balance = v
                plan = self._plan(
                    conn, s, tenant, entries, n, accounts, pks, now, read_existing=True
                )
        self._write_entries(conn, s, plan, now)
        conn.execute("RELEASE SAVEPOINT ledger_post")
        self._write_legs(conn, s, plan)
        return plan.results

    def _cached_accounts(
        self, conn: psycopg.Connection[Any], s: sql.Identifier, tenant: str, ids: list[str]
    ) -> dict[str, tuple[int, str, str, int | None]]:
        """Static account attributes (pk, currency, status, overdraft rule), kept between
        batches while the tenant's accounts_version is unchanged (every account change bumps
        it in its own transaction)."""
        row = conn.execute(sql.SQL("SELECT accounts_version FROM {}.ledger_tenant").format(s))
        version = row.fetchone()
        cached = self._accounts.get(tenant)
        if cached is None or version is None or cached[0] != version[0]:
            cached = self._accounts[tenant] = (version[0] if version else -1, {})
        known = cached[1]
        missing = [i for i in ids if i not in known]
        if missing:
            for ident, pk, cur, status, limit in conn.execute(
                sql.SQL(
                    "SELECT id, pk, currency, status, overdraft_limit FROM {}.ledger_accounts "
                    "WHERE id = ANY(%s)"
                ).format(s),
                (missing,),
            ):
                known[ident] = (pk, cur, status, limit)
        return known

    def _bump_accounts_version(self, conn: psycopg.Connection[Any], tenant: str) -> None:
        conn.execute(
            sql.SQL(
                # A random token, not a counter: a rolled-back change followed by another
                # change can never bring back a version a cache has seen (no ABA).
                "UPDATE {}.ledger_tenant SET accounts_version = (random() * 9.2e18)::bigint"
            ).format(sql.Identifier(self.schema(tenant)))
        )

    def _existing(
        self, conn: psycopg.Connection[Any], s: sql.Identifier, tenant: str, ids: list[str]
    ) -> dict[Key, ExistingEntry]:
        return {
            (tenant, ident): ExistingEntry(pk, bytes(digest), posted)
            for ident, pk, digest, posted in conn.execute(
                sql.SQL(
                    "SELECT id, pk, content_hash, posted_at FROM {}.ledger_entries "
                    "WHERE id = ANY(%s)"
                ).format(s),
                (ids,),
            )
        }

    def _plan(
        self,
        conn: psycopg.Connection[Any],
        s: sql.Identifier,
        tenant: str,
        entries: list[JournalEntry],
        n: Needs,
        accounts: dict[Key, AccountState],
        pks: list[int],
        now: int,
        *,
        read_existing: bool,
    ) -> Plan:
        existing = (
            self._existing(conn, s, tenant, [k[1] for k in n.entry_keys]) if read_existing else {}
        )
        originals: dict[Key, OriginalEntry] = {}
        for _, entry_id in n.reversal_targets:
            orig = self._original(conn, s, entry_id)
            if orig is not None:
                originals[(tenant, entry_id)] = orig
        plan = plan_batch(
            entries,
            existing=existing,
            accounts=accounts,
            originals=originals,
            positions=iter(pks),
            now=now,
        )
        check_plan(plan)
        return plan

    def _original(
        self, conn: psycopg.Connection[Any], s: sql.Identifier, entry_id: str
    ) -> OriginalEntry | None:
        row = conn.execute(
            sql.SQL("SELECT pk, reversal_of FROM {}.ledger_entries WHERE id = %s").format(s),
            (entry_id,),
        ).fetchone()
        if row is None:
            return None
        rev = conn.execute(
            sql.SQL("SELECT id FROM {}.ledger_entries WHERE reversal_of = %s").format(s),
            (entry_id,),
        ).fetchone()
        legs = [
            (acc_id, "credit" if amt > 0 else "debit", cur, abs(amt))
            for acc_id, cur, amt in conn.execute(
                sql.SQL(
                    "SELECT a.id, a.currency, l.amount FROM {s}.ledger_legs l "
                    "JOIN {s}.ledger_accounts a ON a.pk = l.account_pk "
                    "WHERE l.entry_pk = %s ORDER BY l.idx"
                ).format(s=s),
                (row[0],),
            )
        ]
        return OriginalEntry(
            legs=legs, is_reversal=row[1] is not None, reversed_by=rev[0] if rev else None
        )

    def _write_entries(
        self, conn: psycopg.Connection[Any], s: sql.Identifier, plan: Plan, now: int
    ) -> None:
        if not plan.entry_rows:
            return
        with (
            conn.cursor() as cur,
            cur.copy(
                sql.SQL(
                    "COPY {}.ledger_entries (pk, id, content_hash, booked_at, posted_at, "
                    "sequence_id, source_event_id, reversal_of, description, metadata) "
                    "FROM STDIN"
                ).format(s)
            ) as copy,
        ):
            write = copy.write_row
            for row in plan.entry_rows:
                write(row[:1] + row[2:11])  # the schema is the tenant: no tenant column

    def _write_legs(self, conn: psycopg.Connection[Any], s: sql.Identifier, plan: Plan) -> None:
        if not plan.entry_rows:
            return
        with conn.cursor() as cur:
            with cur.copy(
                sql.SQL(
                    "COPY {}.ledger_legs (entry_pk, idx, account_pk, amount, booked_at) FROM STDIN"
                ).format(s)
            ) as copy:
                write = copy.write_row
                for leg in plan.leg_rows:
                    write(leg)
            # In account order, so concurrent writers take row locks in the same order.
            order = sorted(plan.deltas)
            d = plan.deltas
            cur.execute(
                sql.SQL(
                    "UPDATE {}.ledger_balances b SET balance = b.balance + u.delta, "
                    "debits = b.debits + u.deb, credits = b.credits + u.cred, "
                    "legs = b.legs + u.n FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], "
                    "%s::bigint[], %s::bigint[]) AS u(pk, delta, deb, cred, n) "
                    "WHERE b.account_pk = u.pk"
                ).format(s),
                (
                    Int8Array(order),
                    Int8Array([d[k][0] for k in order]),
                    Int8Array([d[k][1] for k in order]),
                    Int8Array([d[k][2] for k in order]),
                    Int8Array([d[k][3] for k in order]),
                ),
            )
            if cur.rowcount != len(order):
                raise AssertionError("a balance row is missing for a posted account")

    def reverse(
        self, tenant: str, entry_id: str, *, reversal_entry_id: str | None = None
    ) -> PostResult:
        original = self.get_entry(tenant, entry_id)
        if original is None:
            raise UnknownEntry(f"no entry {entry_id!r} in tenant {tenant!r}; nothing to reverse")
        journal = JournalEntry(
            id=original.id,
            tenant=tenant,
            legs=tuple(
                Leg(account=lg.account, side=lg.side, amount=lg.amount) for lg in original.legs
            ),
            sequence_id=original.sequence_id,
            source_event_id=original.source_event_id,
            reversal_of=original.reversal_of,
        )
        return self.post_batch([journal.reversal(entry_id=reversal_entry_id)])[0]

    # -- queries --------------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[psycopg.Connection[Any]]:
        """A read-only use of the connection, ending its transaction afterwards."""
        try:
            yield self.conn
        finally:
            self.conn.rollback()

    def _entries(
        self, conn: psycopg.Connection[Any], s: sql.Identifier, tenant: str, rows: list[Any]
    ) -> list[PostedEntry]:
        if not rows:
            return []
        pks = [r[0] for r in rows]
        legs: dict[int, list[PostedLeg]] = {pk: [] for pk in pks}
        for epk, acc_id, cur, amt in conn.execute(
            sql.SQL(
                "SELECT l.entry_pk, a.id, a.currency, l.amount FROM {s}.ledger_legs l "
                "JOIN {s}.ledger_accounts a ON a.pk = l.account_pk "
                "WHERE l.entry_pk = ANY(%s) ORDER BY l.entry_pk, l.idx"
            ).format(s=s),
            (pks,),
        ):
            legs[epk].append(
                PostedLeg(
                    account=acc_id,
                    side="credit" if amt > 0 else "debit",
                    amount=Money(abs(amt), cur),
                )
            )
        return [
            PostedEntry(
                position=r[0],
                id=r[1],
                tenant=tenant,
                booked_at=from_micros(r[2]),
                posted_at=from_micros(r[3]),
                sequence_id=r[4],
                source_event_id=r[5],
                reversal_of=r[6],
                description=r[7],
                metadata=r[8] or {},
                legs=tuple(legs[r[0]]),
            )
            for r in rows
        ]

    _ENTRY_COLS = (
        "e.pk, e.id, e.booked_at, e.posted_at, e.sequence_id, e.source_event_id, "
        "e.reversal_of, e.description, e.metadata"
    )

    def get_entry(self, tenant: str, entry_id: str) -> PostedEntry | None:
        with self._read() as conn:
            if not self._tenant_exists(conn, tenant):
                return None
            s = sql.Identifier(self.schema(tenant))
            rows = conn.execute(
                sql.SQL(
                    "SELECT " + self._ENTRY_COLS + " FROM {}.ledger_entries e WHERE e.id = %s"
                ).format(s),
                (entry_id,),
            ).fetchall()
            found = self._entries(conn, s, tenant, rows)
            return found[0] if found else None

    def _account_pk(
        self, conn: psycopg.Connection[Any], tenant: str, account_id: str
    ) -> tuple[sql.Identifier, int, str]:
        if self._tenant_exists(conn, tenant):
            s = sql.Identifier(self.schema(tenant))
            row = conn.execute(
                sql.SQL("SELECT pk, currency FROM {}.ledger_accounts WHERE id = %s").format(s),
                (account_id,),
            ).fetchone()
            if row is not None:
                return s, int(row[0]), str(row[1])
        raise UnknownAccount(
            f"no account {account_id!r} in tenant {tenant!r}; check the id and the --tenant"
        )

    def balance(self, tenant: str, account_id: str) -> Balance:
        with self._read() as conn:
            s, pk, cur = self._account_pk(conn, tenant, account_id)
            row = conn.execute(
                sql.SQL(
                    "SELECT balance, debits, credits, legs FROM {}.ledger_balances "
                    "WHERE account_pk = %s"
                ).format(s),
                (pk,),
            ).fetchone()
            bal, debits, credits, legs = row if row is not None else (0, 0, 0, 0)
            return Balance(
                account=account_id,
                tenant=tenant,
                balance=Money(int(bal), cur),
                debits=int(debits),
                credits=int(credits),
                entries=int(legs),
            )

    def entries(
        self,
        tenant: str,
        account_id: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[PostedEntry]:
        if limit < 0 or offset < 0:
            raise ValueError("limit and offset must not be negative")
        with self._read() as conn:
            s, pk, _ = self._account_pk(conn, tenant, account_id)
            lo = to_micros(start) if start is not None else -(2**62)
            hi = to_micros(end) if end is not None else 2**62
            rows = conn.execute(
                sql.SQL(
                    "SELECT " + self._ENTRY_COLS + " FROM {s}.ledger_entries e WHERE e.pk IN ("
                    "  SELECT entry_pk FROM {s}.ledger_legs"
                    "  WHERE account_pk = %s AND booked_at >= %s AND booked_at < %s"
                    ") ORDER BY e.booked_at, e.pk LIMIT %s OFFSET %s"
                ).format(s=s),
                (pk, lo, hi, limit, offset),
            ).fetchall()
            return self._entries(conn, s, tenant, rows)

    def trial_balance(self, tenant: str) -> TrialBalance:
        with self._read() as conn:
            if not self._tenant_exists(conn, tenant):
                return TrialBalance(tenant=tenant, lines=())
            rows = conn.execute(
                sql.SQL(
                    "SELECT a.currency, SUM(b.debits), SUM(b.credits), SUM(b.balance), COUNT(*) "
                    "FROM {s}.ledger_accounts a JOIN {s}.ledger_balances b "
                    "ON b.account_pk = a.pk GROUP BY a.currency ORDER BY a.currency"
                ).format(s=sql.Identifier(self.schema(tenant)))
            ).fetchall()
            lines = tuple(
                TrialBalanceLine(
                    currency=c, debits=int(d), credits=int(cr), net=int(net), accounts=int(n)
                )
                for c, d, cr, net, n in rows
            )
            check_trial_balance(lines, tenant)
            return TrialBalance(tenant=tenant, lines=lines)
        raise AssertionError("unreachable")
