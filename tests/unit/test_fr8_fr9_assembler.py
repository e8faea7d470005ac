"""FR8 and FR9: the assembler builds one balanced entry per posting sequence from legs in any
order with any duplicates (order-insensitive, DESIGN §3.5); incomplete sequences time out with
their missing legs named; conflicting duplicates are alerted and never posted."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paypost.events import Event, TransactionApproved, new_event
from paypost.ledger import sqlite as ledger_sqlite
from paypost.ledger.model import Account, PostResult
from paypost.stages import assembler as asm
from paypost.stages.assembler import (
    AssemblyResult,
    LegStore,
    MemoryLegStore,
    SqliteLegStore,
    assemble,
    expire,
    settle,
)
from paypost.stages.assembler_pg import PostgresLegStore
from paypost.stages.post import create_legs, internal_accounts

NOW = 1_800_000_000_000_000  # µs
SECOND = 1_000_000


def approved(n: int, *, fx: bool = False) -> Event:
    txn: dict[str, Any] = {
        "transaction_id": f"TX-{n:04d}",
        "account_id": "UK-BANK-00000001",
        "account_currency": "GBP",
        "description": f"purchase {n}",
        "amount": {"minor": 1000 + n, "currency": "GBP"},
        "billing_amount": {"minor": 1000 + n, "currency": "GBP"},
        "pan_masked": "476173******0119",
        "merchant_name": "SHOP",
        "booking_date": "2026-11-21",
    }
    if fx:
        txn["amount"] = {"minor": 5000 + n, "currency": "JPY"}
        txn["billing_amount"] = {"minor": 2600 + n, "currency": "GBP"}
    return new_event(
        TransactionApproved(transaction=txn, flags=[]),
        source="paypost.rules",
        tenant="uk-bank",
        time="2026-11-21T10:00:00.000Z",
        correlation_id=f"corr-{n}",
    )


def legs_for(n: int, *, fx: bool = False) -> list[Event]:
    return create_legs([approved(n, fx=fx)])


def memory() -> Iterator[LegStore]:
    yield MemoryLegStore()


def sqlite_store() -> Iterator[LegStore]:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    asm.ensure_schema(conn)
    conn.execute("BEGIN")
    yield SqliteLegStore(conn)
    conn.execute("COMMIT")
    conn.close()


def sqlite_with_ledger() -> Iterator[LegStore]:
    """The embedded wiring: the store on the ledger's connection, batches posted by finish."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    ledger_sqlite.ensure_schema(conn)
    asm.ensure_schema(conn)
    conn.execute("BEGIN")
    ledger_sqlite.create_accounts_in(conn, LEDGER_ACCOUNTS)
    yield SqliteLegStore(conn)
    conn.execute("COMMIT")
    conn.close()


LEDGER_ACCOUNTS = [
    Account(id="UK-BANK-00000001", tenant="uk-bank", kind="customer", currency="GBP"),
    *internal_accounts("uk-bank", ["GBP", "JPY"]),
]

STORES: dict[str, Callable[[], Iterator[LegStore]]] = {
    "memory": memory,
    "sqlite": sqlite_store,
    "sqlite-ledger": sqlite_with_ledger,
}


def step(legs: list[Event], store: LegStore, *, now_us: int = NOW) -> AssemblyResult:
    """`assemble`, then (on a store that shares the ledger's connection) post and settle in
    the same transaction, as the wiring does."""
    result = assemble(legs, store, now_us=now_us)
    if isinstance(store, SqliteLegStore) and ledger_sqlite.schema_exists(store.conn):
        done = asm.finish(result, store, partial(ledger_sqlite.post_batch_in, store.conn))
        assert done.posted + done.ledger_duplicates == len(result.completed)
    ledger = getattr(store, "ledger", None)
    if ledger is not None:  # the PostgreSQL store beside the PostgreSQL ledger
        done = asm.finish(result, store, partial(ledger.post_batch_in, store.conn))  # type: ignore[attr-defined]
        assert done.posted + done.ledger_duplicates == len(result.completed)
    return result


@pytest.fixture(params=[*STORES, "postgres", "postgres-ledger"])
def store(request: pytest.FixtureRequest) -> Iterator[LegStore]:
    if request.param.startswith("postgres"):
        pg_schema = request.getfixturevalue("pg_schema")
        url = request.getfixturevalue("postgres_url")
        if request.param == "postgres-ledger":
            yield from postgres_with_ledger(url, pg_schema)
        else:
            yield from postgres_store(url, pg_schema)
        return
    yield from STORES[request.param]()


def postgres_with_ledger(url: str, schema: str) -> Iterator[LegStore]:
    """The distributed wiring: the store and the ledger on one connection, batches posted
    by finish; sequences a batch holds whole get no assembly_sequences row."""
    import psycopg

    from paypost.ledger.postgres import PostgresLedger
    from paypost.stages import assembler_pg

    ledger = PostgresLedger(url, prefix=f"{schema}_l")
    ledger.create_accounts(LEDGER_ACCOUNTS)
    try:
        with psycopg.connect(url) as conn:
            assembler_pg.ensure_schema(conn, schema)
            conn.commit()
            store = assembler_pg.PostgresLegStore(
                conn, schema, ledger_schema=partial(ledger.schema_in, conn)
            )
            store.ledger = ledger  # type: ignore[attr-defined]
            yield store
            conn.commit()
    finally:
        ledger.close()


def postgres_store(url: str, schema: str) -> Iterator[LegStore]:
    import psycopg

    from paypost.stages import assembler_pg

    with psycopg.connect(url) as conn:
        assembler_pg.ensure_schema(conn, schema)
        conn.commit()
        yield assembler_pg.PostgresLegStore(conn, schema)
        conn.commit()


def test_fr8_complete_sequence_in_one_batch_becomes_one_entry(store: LegStore) -> None:
    legs = legs_for(1)
    result = step(legs, store, now_us=NOW)
    (done,) = result.completed
    seq = legs[0].detail["sequence_id"]
    assert done.entry.id == seq and done.entry.sequence_id == seq
    assert done.entry.problem() is None  # balanced, valid
    assert [(lg.account, lg.side, lg.amount.minor) for lg in done.entry.legs] == [
        ("UK-BANK-00000001", "debit", 1001),
        ("settlement-GBP", "credit", 1001),
    ]
    assert done.entry.description == "purchase 1"
    assert done.posted_event.detail == {"sequence_id": seq, "entry_id": seq, "legs": 2}
    assert done.posted_event.correlation_id == "corr-1"
    assert done.record.account_id == "UK-BANK-00000001" and done.record.amount_minor == 1001
    assert result.alerts == [] and result.dead_letters == []


def test_fr8_legs_across_batches_in_reverse_order(store: LegStore) -> None:
    legs = legs_for(2, fx=True)
    assert len(legs) == 4
    outputs: list[AssemblyResult] = []
    for leg in reversed(legs):
        outputs.append(step([leg], store, now_us=NOW))
    assert [len(o.completed) for o in outputs] == [0, 0, 0, 1]
    assert outputs[-1].completed[0].entry.problem() is None
    assert {lg.amount.currency for lg in outputs[-1].completed[0].entry.legs} == {"GBP", "JPY"}


def test_fr9_duplicates_after_completion_are_ignored(store: LegStore) -> None:
    legs = legs_for(3)
    assert len(step(legs, store, now_us=NOW).completed) == 1
    again = step(legs + legs, store, now_us=NOW + SECOND)
    assert again.completed == [] and again.alerts == [] and again.dead_letters == []
    assert again.duplicates == 4


def test_fr9_conflicting_duplicate_is_alerted_and_not_posted(store: LegStore) -> None:
    legs = legs_for(4)
    step([legs[0]], store, now_us=NOW)
    forged = Event.from_dict(
        {**legs[0].to_dict(), "id": "forged", "detail": {**legs[0].detail, "account_id": "X"}}
    )
    result = step([forged, legs[1]], store, now_us=NOW)
    assert result.completed == []
    (alert,) = result.alerts
    assert alert.detail_type == "PostingLegConflict"
    assert alert.detail["leg_index"] == 0 and "different content" in alert.detail["reason"]
    (dead,) = result.dead_letters
    assert {e.id for e in dead.events} == {legs[0].id, "forged", legs[1].id}
    # The sequence stays out of the ledger whatever arrives later.
    later = step(legs, store, now_us=NOW)
    assert later.completed == [] and len(later.dead_letters) == 1


def test_fr9_conflict_after_posting_dead_letters_only_the_copy(store: LegStore) -> None:
    legs = legs_for(5)
    step(legs, store, now_us=NOW)
    forged = Event.from_dict(
        {**legs[1].to_dict(), "id": "forged", "detail": {**legs[1].detail, "side": "debit"}}
    )
    result = step([forged], store, now_us=NOW)
    assert [a.detail_type for a in result.alerts] == ["PostingLegConflict"]
    assert [[e.id for e in d.events] for d in result.dead_letters] == [["forged"]]


def test_timeout_alert_names_the_missing_legs(store: LegStore) -> None:
    legs = legs_for(6, fx=True)  # 4 legs
    step([legs[0], legs[2]], store, now_us=NOW)
    assert expire(store, now_us=NOW + 29 * SECOND, timeout_us=30 * SECOND).alerts == []
    result = expire(store, now_us=NOW + 31 * SECOND, timeout_us=30 * SECOND)
    (alert,) = result.alerts
    assert alert.detail_type == "PostingSequenceIncomplete"
    assert alert.detail["missing_legs"] == [1, 3]
    (dead,) = result.dead_letters
    assert dead.missing_legs == [1, 3] and "missing leg(s) 1, 3" in dead.reason
    assert [e.id for e in dead.events] == [legs[0].id, legs[2].id]
    # Alerted once: a second sweep finds nothing.
    assert expire(store, now_us=NOW + 60 * SECOND, timeout_us=30 * SECOND).alerts == []
    # The missing legs arrive late (e.g. a redrive): the sequence completes and posts once.
    late = step([legs[3], legs[1], legs[0]], store, now_us=NOW + 61 * SECOND)
    assert len(late.completed) == 1 and late.duplicates == 1


def test_refused_entry_is_dead_lettered_and_reassembled_on_redrive(store: LegStore) -> None:
    legs = legs_for(7)
    result = assemble(legs, store, now_us=NOW)
    refused = PostResult(entry_id=legs[0].detail["sequence_id"], status="refused", reason="closed")
    events, records, dead = settle(result, [refused], store)
    assert events == [] and records == []
    assert dead[0].reason == "ledger refused: closed"
    assert [e.id for e in dead[0].events] == [e.id for e in legs]  # redriveable
    again = step(legs, store, now_us=NOW + SECOND)
    assert len(again.completed) == 1


# -- property: any order, any duplicates → exactly one identical entry per sequence ----------

SEQUENCES = [legs_for(n, fx=n % 2 == 0) for n in range(10, 14)]
ALL_LEGS = [leg for seq in SEQUENCES for leg in seq]
REFERENCE = {c.entry.id: c for c in assemble(ALL_LEGS, MemoryLegStore(), now_us=NOW).completed}


@settings(max_examples=60, deadline=None)
@given(
    order=st.permutations(range(len(ALL_LEGS))),
    dups=st.lists(st.integers(0, len(ALL_LEGS) - 1), max_size=12),
    cuts=st.lists(st.integers(1, len(ALL_LEGS) + 12), max_size=6),
    backend=st.sampled_from(list(STORES)),
)
def test_fr9_any_order_any_duplicates_any_batching_posts_each_sequence_once(
    order: list[int], dups: list[int], cuts: list[int], backend: str
) -> None:
    stream = [ALL_LEGS[i] for i in order] + [ALL_LEGS[i] for i in dups]
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    completed = []
    for store in STORES[backend]():
        for a, b in itertools.pairwise(bounds):
            out = step(stream[a:b], store, now_us=NOW)
            assert out.alerts == [] and out.dead_letters == []
            completed += out.completed
    assert sorted(c.entry.id for c in completed) == sorted(REFERENCE)
    for c in completed:
        ref = REFERENCE[c.entry.id]
        assert c.entry == ref.entry  # identical, whatever the order
        assert c.posted_event.to_dict() == ref.posted_event.to_dict()
        assert c.record == ref.record


# -- with the real ledger, in one SQLite transaction --------------------------------------------


def test_fr8_posts_to_the_ledger_in_the_callers_transaction(tmp_path: Any) -> None:
    conn = ledger_sqlite.connect(tmp_path / "paypost.db")
    ledger_sqlite.ensure_schema(conn)
    asm.ensure_schema(conn)
    conn.execute("BEGIN IMMEDIATE")
    ledger_sqlite.create_accounts_in(
        conn,
        [
            Account(id="UK-BANK-00000001", tenant="uk-bank", kind="customer", currency="GBP"),
            *internal_accounts("uk-bank", ["GBP", "JPY"]),
        ],
    )
    conn.execute("COMMIT")
    store = SqliteLegStore(conn)
    legs = [leg for n in range(20, 26) for leg in legs_for(n, fx=n % 2 == 0)]
    posted_total = 0
    for attempt in range(2):  # the second pass is a full redelivery: nothing new
        conn.execute("BEGIN IMMEDIATE")
        result = assemble(list(reversed(legs)), store, now_us=NOW)
        done = asm.finish(result, store, partial(ledger_sqlite.post_batch_in, conn))
        conn.execute("COMMIT")
        assert done.dead_letters == []
        assert len(done.events) == done.posted == len(done.records)
        posted_total += len(done.records)
        if attempt == 1:
            assert result.completed == [] and result.duplicates == len(legs)
    assert posted_total == 6
    balance = ledger_sqlite.balance_in(conn, "uk-bank", "UK-BANK-00000001")
    expected = sum(1000 + n for n in range(20, 26) if n % 2) + sum(
        2600 + n for n in range(20, 26) if n % 2 == 0
    )
    assert balance.balance.minor == -expected
    assert ledger_sqlite.trial_balance_in(conn, "uk-bank").balanced
    conn.close()


@pytest.mark.postgres
def test_fr9_concurrent_workers_on_postgres_complete_each_sequence_once(
    postgres_url: str, pg_schema: str
) -> None:
    """Two workers, each with half the legs of the same sequences, at the same time."""
    import threading

    import psycopg

    from paypost.stages import assembler_pg

    with psycopg.connect(postgres_url) as conn:
        assembler_pg.ensure_schema(conn, pg_schema)
    sequences = [legs_for(n, fx=n % 2 == 0) for n in range(100, 140)]
    halves: list[list[Event]] = [[], []]
    for seq in sequences:
        for k, leg in enumerate(seq):
            halves[k % 2].append(leg)
    completed: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(legs: list[Event]) -> None:
        try:
            with psycopg.connect(postgres_url) as conn:
                store = assembler_pg.PostgresLegStore(conn, pg_schema)
                for k in range(0, len(legs), 7):
                    result = assemble(legs[k : k + 7], store, now_us=NOW)
                    conn.commit()
                    assert result.alerts == [] and result.dead_letters == []
                    with lock:
                        completed.extend(c.entry.id for c in result.completed)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(h,)) for h in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(completed) == sorted(seq[0].detail["sequence_id"] for seq in sequences)


@settings(max_examples=25, deadline=None)
@given(
    order=st.permutations(range(len(ALL_LEGS))),
    crashes=st.lists(st.booleans(), min_size=8, max_size=8),
    size=st.integers(1, 6),
)
def test_invariant_effects_once_when_batches_crash_before_commit(
    order: list[int], crashes: list[bool], size: int
) -> None:
    """DESIGN §3.1: a batch whose transaction never commits (a crash) is redelivered; the
    store, the ledger and the outputs roll back together, so each sequence posts once."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        conn = ledger_sqlite.connect(Path(tmp) / "p.db")
        ledger_sqlite.ensure_schema(conn)
        asm.ensure_schema(conn)
        conn.execute("BEGIN IMMEDIATE")
        ledger_sqlite.create_accounts_in(
            conn,
            [
                Account(id="UK-BANK-00000001", tenant="uk-bank", kind="customer", currency="GBP"),
                *internal_accounts("uk-bank", ["GBP", "JPY"]),
            ],
        )
        conn.execute("COMMIT")
        store = SqliteLegStore(conn)
        queue = [[ALL_LEGS[i] for i in order[k : k + size]] for k in range(0, len(order), size)]
        published: list[str] = []
        attempt = 0
        while queue:
            batch = queue.pop(0)
            conn.execute("BEGIN IMMEDIATE")
            done = asm.finish(
                assemble(batch, store, now_us=NOW),
                store,
                partial(ledger_sqlite.post_batch_in, conn),
            )
            crash = attempt < len(crashes) and crashes[attempt]
            attempt += 1
            if crash:
                conn.execute("ROLLBACK")
                queue.append(batch)  # redelivered after its lease
                continue
            conn.execute("COMMIT")
            published += [e.id for e in done.events]
        posted = conn.execute("SELECT count(*) FROM ledger_entries").fetchone()[0]
        assert posted == len(REFERENCE)
        assert sorted(published) == sorted(c.posted_event.id for c in REFERENCE.values())
        assert ledger_sqlite.trial_balance_in(conn, "uk-bank").balanced
        conn.close()


# -- where the SQLite store keeps a sequence completed in one batch -----------------------------


def ledger_conn() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    ledger_sqlite.ensure_schema(conn)
    asm.ensure_schema(conn)
    conn.execute("BEGIN")
    ledger_sqlite.create_accounts_in(conn, LEDGER_ACCOUNTS)
    conn.execute("COMMIT")
    return conn


def count(conn: sqlite3.Connection, table: str) -> int:
    return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def test_sequence_completed_in_one_batch_is_found_again_through_the_ledger() -> None:
    conn = ledger_conn()
    legs = legs_for(40)
    conn.execute("BEGIN")
    step(legs, SqliteLegStore(conn))
    conn.execute("COMMIT")
    # No row of its own in assembly_sequences: one append-only row keyed by the entry's
    # ledger position, found through the ledger's index of entry ids.
    assert count(conn, "assembly_sequences") == 0 and count(conn, "assembly_legs") == 0
    pk = conn.execute("SELECT pk FROM ledger_entries").fetchone()[0]
    seq = legs[0].detail["sequence_id"]
    assert conn.execute("SELECT entry_pk, sequence_id FROM assembly_posted").fetchall() == [
        (pk, seq)
    ]
    conn.execute("BEGIN")
    again = step(legs + legs, SqliteLegStore(conn))  # a new batch, a new store
    forged = Event.from_dict(
        {**legs[1].to_dict(), "id": "forged", "detail": {**legs[1].detail, "side": "debit"}}
    )
    conflict = step([forged], SqliteLegStore(conn))
    conn.execute("COMMIT")
    assert again.completed == [] and again.duplicates == 4 and again.alerts == []
    assert [[e.id for e in d.events] for d in conflict.dead_letters] == [["forged"]]
    assert count(conn, "ledger_entries") == 1


def test_complete_sequences_of_the_earlier_layout_are_still_recognised() -> None:
    """A database written before assembly_posted: complete rows in assembly_sequences."""
    conn = ledger_conn()
    legs = legs_for(41)
    seq = legs[0].detail["sequence_id"]
    digests = b"".join(asm.leg_digest(leg.detail) for leg in legs)
    conn.execute(
        "INSERT INTO assembly_sequences VALUES (?, 'uk-bank', 2, 'complete', 0, ?)",
        (seq, digests),
    )
    conn.execute("BEGIN")
    again = step(list(reversed(legs)), SqliteLegStore(conn))
    conn.execute("COMMIT")
    assert again.completed == [] and again.duplicates == 2
    assert count(conn, "ledger_entries") == 0


def test_a_sequence_is_remembered_as_posted_only_while_the_ledger_holds_its_entry() -> None:
    """A reconciliation break (the entry is gone): the redriven legs assemble and post again."""
    conn = ledger_conn()
    legs = legs_for(42)
    conn.execute("BEGIN")
    step(legs, SqliteLegStore(conn))
    conn.execute("DELETE FROM ledger_legs")
    conn.execute("DELETE FROM ledger_entries")
    again = step(legs, SqliteLegStore(conn))
    conn.execute("COMMIT")
    assert len(again.completed) == 1
    assert count(conn, "ledger_entries") == 1 and count(conn, "assembly_posted") == 1


def test_a_batch_rolled_back_before_settle_assembles_again() -> None:
    """Nothing was posted, so nothing is remembered: the same store, the legs again."""
    conn = ledger_conn()
    store = SqliteLegStore(conn)
    legs = legs_for(43)
    conn.execute("BEGIN")
    assert len(assemble(legs, store, now_us=NOW).completed) == 1
    conn.execute("ROLLBACK")
    conn.execute("BEGIN")
    assert len(step(legs, store).completed) == 1
    conn.execute("COMMIT")
    assert count(conn, "ledger_entries") == 1 and count(conn, "assembly_posted") == 1


@pytest.mark.postgres
def test_on_postgres_a_sequence_held_whole_gets_no_row_and_is_found_through_the_ledger(
    postgres_url: str, pg_schema: str
) -> None:
    """The distributed wiring: a sequence completed by the batch that held all its legs is
    recorded by its ledger entry and one appended `assembly_posted` row (no row to insert,
    lock and update in assembly_sequences); copies of its legs later are duplicates, a
    conflicting copy is dead-lettered alone; a sequence spread over batches still has its
    row; once the ledger lost the entry (a reconciliation break) the legs post again."""
    for store in postgres_with_ledger(postgres_url, pg_schema):
        assert isinstance(store, PostgresLegStore)
        conn, s = store.conn, f'"{pg_schema}"'
        whole, spread = legs_for(50), legs_for(51)
        step(whole, store)
        step([spread[1]], store)
        step([spread[0]], store)
        conn.commit()
        rows = conn.execute(f"SELECT sequence_id, state FROM {s}.assembly_sequences").fetchall()
        assert rows == [(spread[0].detail["sequence_id"], "complete")]
        posted = conn.execute(f"SELECT tenant, sequence_id FROM {s}.assembly_posted").fetchall()
        assert posted == [("uk-bank", whole[0].detail["sequence_id"])]
        again = step(whole + list(reversed(whole)), store)  # the same store, a new batch
        fresh = PostgresLegStore(conn, pg_schema, ledger_schema=store.ledger_schema)
        fresh.ledger = store.ledger  # type: ignore[attr-defined]
        copies = step(whole, fresh)  # another worker, after the commit
        forged = Event.from_dict(
            {**whole[1].to_dict(), "id": "forged", "detail": {**whole[1].detail, "side": "debit"}}
        )
        conflict = step([whole[0], forged], fresh)
        assert again.completed == [] and again.duplicates == 4 and again.alerts == []
        assert copies.completed == [] and copies.duplicates == 2
        assert [[e.id for e in d.events] for d in conflict.dead_letters] == [["forged"]]
        ledger = store.ledger  # type: ignore[attr-defined]
        ls = f'"{ledger.schema("uk-bank")}"'
        assert conn.execute(f"SELECT count(*) FROM {ls}.ledger_entries").fetchone() == (2,)
        conn.commit()
        # the ledger loses the entry: the legs assemble and post again, once
        conn.execute(
            f"DELETE FROM {ls}.ledger_legs WHERE entry_pk IN (SELECT pk FROM {ls}.ledger_entries"
            " WHERE id = %s)",
            (whole[0].detail["sequence_id"],),
        )
        conn.execute(
            f"DELETE FROM {ls}.ledger_entries WHERE id = %s", (whole[0].detail["sequence_id"],)
        )
        conn.commit()
        redriven = assemble(whole, fresh, now_us=NOW)
        assert len(redriven.completed) == 1
        # rolled back before settle: nothing remembered, the legs assemble again
        conn.rollback()
        assert len(step(whole, fresh).completed) == 1
        conn.commit()
        assert conn.execute(f"SELECT count(*) FROM {ls}.ledger_entries").fetchone() == (2,)
        assert conn.execute(f"SELECT count(*) FROM {s}.assembly_sequences").fetchone() == (1,)


# -- the well-formedness check: the fast path says exactly what msgspec says --------------------


def reference_leg_problem(d: dict[str, Any]) -> str | None:
    """The check as it was before the fast path (msgspec.convert of every leg)."""
    import msgspec

    from paypost.events import PostingLegCreated

    try:
        leg = msgspec.convert(d, PostingLegCreated)
    except (msgspec.ValidationError, ValueError, TypeError) as exc:
        return str(exc)
    if leg.leg_count < 1 or not 0 <= leg.leg_index < leg.leg_count:
        return f"leg index {leg.leg_index} is not within a count of {leg.leg_count}"
    if leg.side not in ("debit", "credit"):
        return f"side {leg.side!r} must be 'debit' or 'credit'"
    if leg.amount.minor <= 0:
        return f"amount {leg.amount} must be positive"
    if not leg.sequence_id:
        return "the sequence id is empty"
    return None


_ANY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=False),
    st.sampled_from(["", "s", "debit", "credit", "GBP", "XXX", "ZWD"]),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(
    base=st.sampled_from([leg.detail for leg in ALL_LEGS]),
    changes=st.dictionaries(
        st.sampled_from(
            ["sequence_id", "leg_index", "leg_count", "account_id", "side", "metadata", "x"]
        ),
        _ANY,
        max_size=3,
    ),
    amount=st.one_of(
        st.none(),
        st.fixed_dictionaries(
            {"minor": st.one_of(st.integers(-5, 5), _ANY), "currency": _ANY | st.just("JPY")}
        ),
        _ANY,
    ),
    drop=st.lists(st.sampled_from(["metadata", "amount", "side", "leg_index"]), max_size=2),
    metadata_key=st.one_of(st.none(), st.integers(0, 1), st.just("k")),
)
def test_leg_check_fast_path_matches_msgspec(
    base: dict[str, Any],
    changes: dict[str, Any],
    amount: Any,
    drop: list[str],
    metadata_key: Any,
) -> None:
    d = {**base, **changes}
    if amount is not None:
        d["amount"] = amount
    if metadata_key is not None:
        d["metadata"] = {metadata_key: 1}
    for key in drop:
        d.pop(key, None)
    assert asm._leg_problem(d) == reference_leg_problem(d)
    assert asm._leg_problem(base) is None
