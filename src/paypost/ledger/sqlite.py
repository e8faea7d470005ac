"""The SQLite ledger store (embedded default): WAL, synchronous=FULL, tables prefixed `ledger_`.

Two ways to use it:
- inside a caller's unit of work: `ensure_schema(conn)` once, then `post_batch_in(conn,
  entries)` on a connection that already has a write transaction open (BEGIN IMMEDIATE). It
  never commits, so the embedded pipeline can post, archive its events and record its tracking
  position in ONE transaction (DESIGN §3.1, §5);
- standalone: `SqliteLedger.open(path)` opens its own connection and commits each call.

Layout (performance, DESIGN §5): append-only integer keys everywhere; the one random-key unique
index is (tenant, entry id), which idempotency needs; legs are clustered by entry (WITHOUT
ROWID, append-only) with one index by (account, booked_at) for statements; balances are one
small row per account updated incrementally (upsert) once per account per batch.
Tenant isolation: every query is scoped by tenant; an account or entry of another tenant is
invisible (unknown), never an error that reveals it exists.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from paypost.config import SQLITE_CACHE_KIB, sqlite_page_size
from paypost.ledger.model import (
    Account,
    AccountError,
    AccountStatus,
    Balance,
    JournalEntry,
    LedgerMissing,
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
    EntryRow,
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

SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger_accounts (
    pk INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    kind TEXT NOT NULL,
    role TEXT,
    currency TEXT NOT NULL,
    product_type TEXT,
    name TEXT,
    iban TEXT,
    sort_code TEXT,
    account_number TEXT,
    status TEXT NOT NULL,
    overdraft_limit INTEGER,
    created_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS ledger_accounts_id ON ledger_accounts (tenant, id);
CREATE TABLE IF NOT EXISTS ledger_balances (
    account_pk INTEGER PRIMARY KEY,
    balance INTEGER NOT NULL,
    debits INTEGER NOT NULL,
    credits INTEGER NOT NULL,
    legs INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS ledger_entries (
    pk INTEGER PRIMARY KEY,
    id_key INTEGER,
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    content_hash BLOB NOT NULL,
    booked_at INTEGER NOT NULL,
    posted_at INTEGER NOT NULL,
    sequence_id TEXT,
    source_event_id TEXT,
    reversal_of TEXT,
    description TEXT,
    metadata TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS ledger_entries_key ON ledger_entries (id_key);
CREATE TABLE IF NOT EXISTS ledger_entry_ids (
    tenant TEXT NOT NULL,
    id TEXT NOT NULL,
    entry_pk INTEGER NOT NULL,
    PRIMARY KEY (tenant, id)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS ledger_entries_reversal
    ON ledger_entries (tenant, reversal_of) WHERE reversal_of IS NOT NULL;
CREATE TABLE IF NOT EXISTS ledger_legs (
    entry_pk INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    account_pk INTEGER NOT NULL,
    amount INTEGER NOT NULL,
    booked_at INTEGER NOT NULL,
    PRIMARY KEY (entry_pk, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ledger_legs_account ON ledger_legs (account_pk, booked_at, entry_pk);
CREATE TABLE IF NOT EXISTS ledger_meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    accounts_version INTEGER NOT NULL
);
INSERT OR IGNORE INTO ledger_meta (id, accounts_version) VALUES (1, 0);
"""

_CHUNK = 500
_META_DEC = msgspec.json.Decoder(dict[str, Any])

_ACCOUNT_COLS = (
    "id, tenant, kind, currency, role, product_type, name, iban, sort_code, account_number, "
    "status, overdraft_limit"
)


@functools.lru_cache(maxsize=8192)
def entry_key(tenant: str, entry_id: str) -> int:
    """The 64-bit key that the unique index on entries holds for (TENANT, ENTRY_ID).

    An integer index is much smaller than one on (tenant, id) text, so fewer pages are dirtied
    per batch. Distinct ids whose keys collide (about 1 in 10^10 at 10^9 entries) are still
    kept apart: the later one is stored with no key and recorded in `ledger_entry_ids`.
    Cached: the assembler looks an entry up by its key just before the ledger posts it.
    """
    digest = hashlib.blake2b(tenant.encode() + b"\x00" + entry_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection configured for the ledger: WAL, synchronous=FULL (durable commits),
    autocommit mode (transactions are explicit: BEGIN IMMEDIATE ... COMMIT)."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA page_size={sqlite_page_size()}")  # new files only (before WAL)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")  # see paypost.config
    return conn


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the ledger tables if missing (idempotent; does not commit a caller's work)."""
    for stmt in SCHEMA.split(";"):
        if stmt.strip():
            conn.execute(stmt)


def schema_exists(conn: sqlite3.Connection) -> bool:
    row = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='ledger_entries'"
    ).fetchone()
    return row is not None


def _chunks(items: Sequence[str], size: int = _CHUNK) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _by_tenant(keys: Iterable[Key]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for tenant, ident in keys:
        out.setdefault(tenant, []).append(ident)
    return out


# -- accounts -------------------------------------------------------------------------------


def create_accounts_in(conn: sqlite3.Connection, accounts: Sequence[Account]) -> None:
    """Create ACCOUNTS in the caller's transaction. Re-creating an identical account is a
    no-op (idempotent set-up); a different definition under an existing id is an error."""
    now = now_micros()
    _bump_accounts_version(conn)
    for acc in accounts:
        acc.validate()
        existing = get_account_in(conn, acc.tenant, acc.id)
        if existing is not None:
            if existing != acc:
                raise AccountError(
                    f"account {acc.id!r} already exists in tenant {acc.tenant!r} with a "
                    "different definition; use another id or change it with set_account_status"
                )
            continue
        cur = conn.execute(
            f"INSERT INTO ledger_accounts ({_ACCOUNT_COLS}, created_at) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                acc.id,
                acc.tenant,
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
        )
        conn.execute(
            "INSERT INTO ledger_balances (account_pk, balance, debits, credits, legs) "
            "VALUES (?, 0, 0, 0, 0)",
            (cur.lastrowid,),
        )


def _bump_accounts_version(conn: sqlite3.Connection) -> None:
    # Every change to accounts bumps this counter in the same transaction, so an AccountCache
    # (static account attributes kept between batches) knows when to forget what it holds.
    # A random token, not a counter: a rolled-back change followed by another change can never
    # bring back a version that a cache has seen (no ABA).
    conn.execute("UPDATE ledger_meta SET accounts_version = random() WHERE id = 1")


class AccountCache:
    """Static account attributes (pk, currency, status, overdraft rule) kept between batches
    of one connection, so a batch reads only the balances it must check. Valid while the
    ledger's accounts_version is unchanged (checked once per batch). Not thread-safe: one per
    connection."""

    def __init__(self) -> None:
        self.version = -1
        self.rows: dict[Key, tuple[int, str, str, int | None]] = {}

    def load(self, conn: sqlite3.Connection, keys: Iterable[Key]) -> None:
        version = conn.execute("SELECT accounts_version FROM ledger_meta WHERE id = 1").fetchone()
        if version is None or version[0] != self.version:
            self.rows.clear()
            self.version = -1 if version is None else version[0]
        rows = self.rows
        missing = [k for k in keys if k not in rows]
        for tenant, ids in _by_tenant(missing).items():
            for chunk in _chunks(ids):
                q = ",".join("?" * len(chunk))
                for ident, pk, cur, status, limit in conn.execute(
                    "SELECT id, pk, currency, status, overdraft_limit FROM ledger_accounts "
                    f"WHERE tenant = ? AND id IN ({q})",
                    (tenant, *chunk),
                ):
                    rows[(tenant, ident)] = (pk, cur, status, limit)


def _account_from_row(row: Sequence[Any]) -> Account:
    return Account(
        id=row[0],
        tenant=row[1],
        kind=row[2],
        currency=row[3],
        role=row[4],
        product_type=row[5],
        name=row[6],
        iban=row[7],
        sort_code=row[8],
        account_number=row[9],
        status=row[10],
        overdraft_limit=row[11],
    )


def get_account_in(conn: sqlite3.Connection, tenant: str, account_id: str) -> Account | None:
    row = conn.execute(
        f"SELECT {_ACCOUNT_COLS} FROM ledger_accounts WHERE tenant = ? AND id = ?",
        (tenant, account_id),
    ).fetchone()
    return None if row is None else _account_from_row(row)


def set_account_status_in(
    conn: sqlite3.Connection, tenant: str, account_id: str, status: AccountStatus
) -> None:
    if status not in ("open", "blocked", "closed"):
        raise AccountError(f"status {status!r} must be open, blocked or closed")
    _bump_accounts_version(conn)
    cur = conn.execute(
        "UPDATE ledger_accounts SET status = ? WHERE tenant = ? AND id = ?",
        (status, tenant, account_id),
    )
    if cur.rowcount == 0:
        raise UnknownAccount(f"no account {account_id!r} in tenant {tenant!r}")


# -- posting --------------------------------------------------------------------------------


def post_batch_in(
    conn: sqlite3.Connection,
    entries: Sequence[JournalEntry],
    *,
    now: int | None = None,
    cache: AccountCache | None = None,
) -> list[PostResult]:
    """Post ENTRIES inside the caller's open write transaction; one result per entry, in order.

    Does not commit or roll back: the caller's unit of work decides. A refused entry writes
    nothing and does not affect the others. NOW (UTC microseconds) stamps posted_at.
    Pass the same CACHE (an AccountCache) on every call of one connection to skip re-reading
    account attributes (a large share of the cost); without it each call reads them afresh.
    """
    if not conn.in_transaction:
        raise RuntimeError(
            "post_batch_in needs a write transaction opened by the caller (BEGIN IMMEDIATE); "
            "use SqliteLedger.post_batch for a self-committing call"
        )
    if not entries:
        return []
    now = now_micros() if now is None else now
    cache = AccountCache() if cache is None else cache
    n = needs(entries)
    # Optimistic path: most batches hold no entry posted before, so let the unique index on
    # the entry key detect duplicates while inserting instead of looking every id up first.
    # If it fires, roll back to the savepoint and plan again with the existing entries read.
    conn.execute("SAVEPOINT ledger_post")
    try:
        first = entries[0]
        if _find_entry_pk(conn, first.tenant, first.id) is not None:
            # A redelivered batch: its first entry exists, so read them all before planning.
            existing, taken = _read_existing(conn, n.entry_keys)
            plan = _plan(conn, entries, n, now, cache, existing)
            _insert_entries(conn, plan, taken)
            _insert_legs_and_balances(conn, plan)
            conn.execute("RELEASE ledger_post")
            return plan.results
        plan = _plan(conn, entries, n, now, cache, {})
        # A refused entry would not reach the unique index: check those ids (few) first, so
        # a replayed entry is reported as duplicate/conflict, never as refused.
        if plan.refused and _read_existing(conn, plan.refused)[0]:
            existing, taken = _read_existing(conn, n.entry_keys)
            plan = _plan(conn, entries, n, now, cache, existing)
            _insert_entries(conn, plan, taken)
        else:
            try:
                _insert_entries(conn, plan, None)
            except sqlite3.IntegrityError:
                conn.execute("ROLLBACK TO ledger_post")
                existing, taken = _read_existing(conn, n.entry_keys)
                plan = _plan(conn, entries, n, now, cache, existing)
                _insert_entries(conn, plan, taken)
        _insert_legs_and_balances(conn, plan)
    except BaseException:
        conn.execute("ROLLBACK TO ledger_post")
        conn.execute("RELEASE ledger_post")
        raise
    conn.execute("RELEASE ledger_post")
    return plan.results


def _read_existing(
    conn: sqlite3.Connection, keys: Iterable[Key]
) -> tuple[dict[Key, ExistingEntry], set[int]]:
    """The entries among KEYS already in the ledger, and the id keys taken by other ids."""
    existing: dict[Key, ExistingEntry] = {}
    taken: set[int] = set()
    wanted: dict[int, list[Key]] = {}
    for key in keys:
        wanted.setdefault(entry_key(*key), []).append(key)
    collided: list[Key] = []
    key_list = list(wanted)
    for i in range(0, len(key_list), _CHUNK):
        chunk = key_list[i : i + _CHUNK]
        q = ",".join("?" * len(chunk))
        for k, tenant, ident, pk, digest, posted in conn.execute(
            "SELECT id_key, tenant, id, pk, content_hash, posted_at FROM ledger_entries "
            f"WHERE id_key IN ({q})",
            chunk,
        ):
            taken.add(k)  # held: any other id with this key goes to the overflow table
            for candidate in wanted[k]:
                if candidate == (tenant, ident):
                    existing[candidate] = ExistingEntry(pk, digest, posted)
                else:
                    collided.append(candidate)
    for tenant, ident in collided:
        row = conn.execute(
            "SELECT e.pk, e.content_hash, e.posted_at FROM ledger_entry_ids x "
            "JOIN ledger_entries e ON e.pk = x.entry_pk WHERE x.tenant = ? AND x.id = ?",
            (tenant, ident),
        ).fetchone()
        if row is not None:
            existing[(tenant, ident)] = ExistingEntry(row[0], row[1], row[2])
    return existing, taken


def _find_entry_pk(conn: sqlite3.Connection, tenant: str, entry_id: str) -> int | None:
    row = conn.execute(
        "SELECT pk FROM ledger_entries WHERE id_key = ? AND tenant = ? AND id = ?",
        (entry_key(tenant, entry_id), tenant, entry_id),
    ).fetchone()
    if row is None:
        row = conn.execute(
            "SELECT entry_pk FROM ledger_entry_ids WHERE tenant = ? AND id = ?",
            (tenant, entry_id),
        ).fetchone()
    return None if row is None else int(row[0])


def _plan(
    conn: sqlite3.Connection,
    entries: Sequence[JournalEntry],
    n: Needs,
    now: int,
    cache: AccountCache,
    existing: dict[Key, ExistingEntry],
) -> Plan:
    cache.load(conn, n.account_keys)
    accounts: dict[Key, AccountState] = {}
    limited: dict[int, AccountState] = {}
    rows = cache.rows
    for key in n.account_keys:
        row = rows.get(key)
        if row is not None:
            st = accounts[key] = AccountState(row[0], row[1], row[2], row[3], 0)
            if row[3] is not None:
                limited[row[0]] = st
    # Balances matter only where an overdraft rule must be checked.
    pks = list(limited)
    for i in range(0, len(pks), _CHUNK):
        chunk = pks[i : i + _CHUNK]
        q = ",".join("?" * len(chunk))
        for apk, bal in conn.execute(
            f"SELECT account_pk, balance FROM ledger_balances WHERE account_pk IN ({q})",
            chunk,
        ):
            limited[apk].balance = bal
    originals: dict[Key, OriginalEntry] = {}
    for tenant, entry_id in n.reversal_targets:
        orig = _original(conn, tenant, entry_id)
        if orig is not None:
            originals[(tenant, entry_id)] = orig
    row = conn.execute("SELECT COALESCE(MAX(pk), 0) FROM ledger_entries").fetchone()
    plan = plan_batch(
        entries,
        existing=existing,
        accounts=accounts,
        originals=originals,
        positions=itertools.count(row[0] + 1),
        now=now,
        id_key=entry_key,
    )
    check_plan(plan)
    return plan


def _insert_entries(conn: sqlite3.Connection, plan: Plan, taken: set[int] | None) -> None:
    """Insert the plan's entries. TAKEN: id keys held by other ids (None on the optimistic
    path, where the unique index reports any clash); an entry whose key is taken, or used by
    an earlier entry of the batch, is stored without a key and listed in ledger_entry_ids."""
    rows = plan.entry_rows
    if not rows:
        return
    overflow: list[tuple[str, str, int]] = []
    if taken is not None:
        used: set[int | None] = set(taken)
        kept: list[EntryRow] = []
        for r in rows:
            if r[11] in used:
                kept.append((*r[:11], None))
                overflow.append((r[1], r[2], r[0]))
            else:
                used.add(r[11])
                kept.append(r)
        rows = kept
    conn.executemany(
        "INSERT INTO ledger_entries (pk, tenant, id, content_hash, booked_at, posted_at, "
        "sequence_id, source_event_id, reversal_of, description, metadata, id_key) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        rows,
    )
    if overflow:
        conn.executemany(
            "INSERT INTO ledger_entry_ids (tenant, id, entry_pk) VALUES (?,?,?)", overflow
        )


def _insert_legs_and_balances(conn: sqlite3.Connection, plan: Plan) -> None:
    if not plan.entry_rows:
        return
    conn.executemany(
        "INSERT INTO ledger_legs (entry_pk, idx, account_pk, amount, booked_at) VALUES (?,?,?,?,?)",
        plan.leg_rows,
    )
    conn.executemany(
        "INSERT INTO ledger_balances (account_pk, balance, debits, credits, legs) "
        "VALUES (?,?,?,?,?) ON CONFLICT (account_pk) DO UPDATE SET "
        "balance = balance + excluded.balance, debits = debits + excluded.debits, "
        "credits = credits + excluded.credits, legs = legs + excluded.legs",
        [(apk, d[0], d[1], d[2], d[3]) for apk, d in plan.deltas.items()],
    )


def _original(conn: sqlite3.Connection, tenant: str, entry_id: str) -> OriginalEntry | None:
    found = _find_entry_pk(conn, tenant, entry_id)
    if found is None:
        return None
    pk = found
    row = conn.execute("SELECT reversal_of FROM ledger_entries WHERE pk = ?", (pk,)).fetchone()
    reversal_of = row[0]
    rev = conn.execute(
        "SELECT id FROM ledger_entries WHERE tenant = ? AND reversal_of = ?", (tenant, entry_id)
    ).fetchone()
    legs = [
        (acc_id, "credit" if amt > 0 else "debit", cur, abs(amt))
        for acc_id, cur, amt in conn.execute(
            "SELECT a.id, a.currency, l.amount FROM ledger_legs l "
            "JOIN ledger_accounts a ON a.pk = l.account_pk WHERE l.entry_pk = ? ORDER BY l.idx",
            (pk,),
        )
    ]
    return OriginalEntry(
        legs=legs, is_reversal=reversal_of is not None, reversed_by=rev[0] if rev else None
    )


def reverse_in(
    conn: sqlite3.Connection,
    tenant: str,
    entry_id: str,
    *,
    reversal_entry_id: str | None = None,
    now: int | None = None,
) -> PostResult:
    """Post the compensating entry of ENTRY_ID in the caller's transaction.

    Reversing twice with the derived id returns `duplicate` (the first reversal's result);
    with another id it is refused (already reversed)."""
    original = get_entry_in(conn, tenant, entry_id)
    if original is None:
        raise UnknownEntry(f"no entry {entry_id!r} in tenant {tenant!r}; nothing to reverse")
    return post_batch_in(
        conn, [_as_journal(original).reversal(entry_id=reversal_entry_id)], now=now
    )[0]


def _as_journal(p: PostedEntry) -> JournalEntry:
    return JournalEntry(
        id=p.id,
        tenant=p.tenant,
        legs=tuple(Leg(account=lg.account, side=lg.side, amount=lg.amount) for lg in p.legs),
        sequence_id=p.sequence_id,
        source_event_id=p.source_event_id,
        reversal_of=p.reversal_of,
        description=p.description,
        metadata=p.metadata,
    )


# -- queries --------------------------------------------------------------------------------

_ENTRY_COLS = (
    "e.pk, e.id, e.tenant, e.booked_at, e.posted_at, e.sequence_id, e.source_event_id, "
    "e.reversal_of, e.description, e.metadata"
)


def _entries_from_rows(conn: sqlite3.Connection, rows: list[Sequence[Any]]) -> list[PostedEntry]:
    if not rows:
        return []
    pks = [r[0] for r in rows]
    legs: dict[int, list[PostedLeg]] = {pk: [] for pk in pks}
    for chunk in _chunks(pks):
        q = ",".join("?" * len(chunk))
        for epk, acc_id, cur, amt in conn.execute(
            "SELECT l.entry_pk, a.id, a.currency, l.amount FROM ledger_legs l "
            f"JOIN ledger_accounts a ON a.pk = l.account_pk WHERE l.entry_pk IN ({q}) "
            "ORDER BY l.entry_pk, l.idx",
            tuple(chunk),
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
            tenant=r[2],
            booked_at=from_micros(r[3]),
            posted_at=from_micros(r[4]),
            sequence_id=r[5],
            source_event_id=r[6],
            reversal_of=r[7],
            description=r[8],
            metadata=_META_DEC.decode(r[9]) if r[9] else {},
            legs=tuple(legs[r[0]]),
        )
        for r in rows
    ]


def get_entry_in(conn: sqlite3.Connection, tenant: str, entry_id: str) -> PostedEntry | None:
    pk = _find_entry_pk(conn, tenant, entry_id)
    if pk is None:
        return None
    rows = conn.execute(
        f"SELECT {_ENTRY_COLS} FROM ledger_entries e WHERE e.pk = ?", (pk,)
    ).fetchall()
    found = _entries_from_rows(conn, rows)
    return found[0] if found else None


def _account_pk(conn: sqlite3.Connection, tenant: str, account_id: str) -> tuple[int, str]:
    row = conn.execute(
        "SELECT pk, currency FROM ledger_accounts WHERE tenant = ? AND id = ?",
        (tenant, account_id),
    ).fetchone()
    if row is None:
        raise UnknownAccount(
            f"no account {account_id!r} in tenant {tenant!r}; check the id and the --tenant"
        )
    return int(row[0]), str(row[1])


def balance_in(conn: sqlite3.Connection, tenant: str, account_id: str) -> Balance:
    pk, cur = _account_pk(conn, tenant, account_id)
    row = conn.execute(
        "SELECT balance, debits, credits, legs FROM ledger_balances WHERE account_pk = ?", (pk,)
    ).fetchone()
    bal, debits, credits, legs = row if row is not None else (0, 0, 0, 0)
    return Balance(
        account=account_id,
        tenant=tenant,
        balance=Money(bal, cur),
        debits=debits,
        credits=credits,
        entries=legs,
    )


def entries_in(
    conn: sqlite3.Connection,
    tenant: str,
    account_id: str,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[PostedEntry]:
    """Entries touching ACCOUNT_ID with start <= booked_at < end, oldest first, paginated."""
    if limit < 0 or offset < 0:
        raise ValueError("limit and offset must not be negative")
    pk, _ = _account_pk(conn, tenant, account_id)
    lo = to_micros(start) if start is not None else -(2**62)
    hi = to_micros(end) if end is not None else 2**62
    rows = conn.execute(
        f"SELECT {_ENTRY_COLS} FROM ledger_entries e WHERE e.pk IN ("
        "  SELECT DISTINCT entry_pk FROM ledger_legs"
        "  WHERE account_pk = ? AND booked_at >= ? AND booked_at < ?"
        ") ORDER BY e.booked_at, e.pk LIMIT ? OFFSET ?",
        (pk, lo, hi, limit, offset),
    ).fetchall()
    return _entries_from_rows(conn, rows)


def trial_balance_in(conn: sqlite3.Connection, tenant: str) -> TrialBalance:
    """Per currency, the sum over the tenant's accounts; asserts it nets to zero."""
    rows = conn.execute(
        "SELECT a.currency, SUM(b.debits), SUM(b.credits), SUM(b.balance), COUNT(*) "
        "FROM ledger_accounts a JOIN ledger_balances b ON b.account_pk = a.pk "
        "WHERE a.tenant = ? GROUP BY a.currency ORDER BY a.currency",
        (tenant,),
    ).fetchall()
    lines = tuple(
        TrialBalanceLine(currency=c, debits=d, credits=cr, net=net, accounts=n)
        for c, d, cr, net, n in rows
    )
    check_trial_balance(lines, tenant)
    return TrialBalance(tenant=tenant, lines=lines)


# -- standalone store -----------------------------------------------------------------------


class SqliteLedger:
    """A LedgerStore on its own connection: every call is one committed transaction.

    For use inside a larger unit of work, call the `*_in(conn, ...)` functions instead.
    """

    def __init__(self, conn: sqlite3.Connection, *, owns: bool = False) -> None:
        self.conn = conn
        self._owns = owns
        self._cache = AccountCache()

    @classmethod
    def open(cls, path: str | Path, *, create: bool = True) -> SqliteLedger:
        """Open (and by default create) the ledger in the SQLite file PATH."""
        if not create and not Path(path).exists():
            raise LedgerMissing(
                f"no ledger database at {str(path)!r}; post something first or pass the "
                "right --data-dir"
            )
        store = cls(connect(path), owns=True)
        if create:
            store.ensure_schema()
        elif not schema_exists(store.conn):
            store.close()
            raise LedgerMissing(
                f"{str(path)!r} has no ledger tables yet; nothing has been posted there"
            )
        return store

    def _write(self) -> _Tx:
        return _Tx(self.conn)

    def ensure_schema(self) -> None:
        with self._write():
            ensure_schema(self.conn)

    def create_accounts(self, accounts: Sequence[Account]) -> None:
        with self._write():
            create_accounts_in(self.conn, accounts)

    def get_account(self, tenant: str, account_id: str) -> Account | None:
        return get_account_in(self.conn, tenant, account_id)

    def set_account_status(self, tenant: str, account_id: str, status: AccountStatus) -> None:
        with self._write():
            set_account_status_in(self.conn, tenant, account_id, status)

    def post_batch(self, entries: Sequence[JournalEntry]) -> list[PostResult]:
        with self._write():
            return post_batch_in(self.conn, entries, cache=self._cache)

    def reverse(
        self, tenant: str, entry_id: str, *, reversal_entry_id: str | None = None
    ) -> PostResult:
        with self._write():
            return reverse_in(self.conn, tenant, entry_id, reversal_entry_id=reversal_entry_id)

    def get_entry(self, tenant: str, entry_id: str) -> PostedEntry | None:
        return get_entry_in(self.conn, tenant, entry_id)

    def balance(self, tenant: str, account_id: str) -> Balance:
        return balance_in(self.conn, tenant, account_id)

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
        return entries_in(
            self.conn, tenant, account_id, start=start, end=end, limit=limit, offset=offset
        )

    def trial_balance(self, tenant: str) -> TrialBalance:
        return trial_balance_in(self.conn, tenant)

    def tenants(self) -> list[str]:
        """The tenant ids that have accounts, sorted."""
        return [
            r[0]
            for r in self.conn.execute("SELECT DISTINCT tenant FROM ledger_accounts ORDER BY 1")
        ]

    def close(self) -> None:
        if self._owns:
            self.conn.close()


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error (the standalone unit of work)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")
