"""The ledger conformance suite: every LedgerStore passes these same cases.

A backend's test module subclasses `LedgerSuite` and provides the `store` fixture (a fresh,
empty, isolated ledger). Written from what a user of the ledger notices: balances, results,
refusal messages, what a query returns.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paypost.ledger.model import (
    Account,
    AccountError,
    JournalEntry,
    LedgerStore,
    Leg,
    UnknownAccount,
    UnknownEntry,
    fx_legs,
)
from paypost.money import FxRate, Money, convert

T = "bank-a"
T2 = "bank-b"


def customer(aid: str, currency: str = "EUR", tenant: str = T, **kw: object) -> Account:
    return Account(id=aid, tenant=tenant, kind="customer", currency=currency, **kw)  # type: ignore[arg-type]


def internal(aid: str, role: str, currency: str = "EUR", tenant: str = T) -> Account:
    return Account(id=aid, tenant=tenant, kind="internal", role=role, currency=currency)


def transfer(
    eid: str,
    debit: str,
    credit: str,
    minor: int,
    currency: str = "EUR",
    tenant: str = T,
    booked_at: datetime | None = None,
    **kw: object,
) -> JournalEntry:
    m = Money(minor, currency)
    return JournalEntry(
        id=eid,
        tenant=tenant,
        legs=(
            Leg(account=debit, side="debit", amount=m),
            Leg(account=credit, side="credit", amount=m),
        ),
        booked_at=booked_at,
        **kw,  # type: ignore[arg-type]
    )


def bal(store: LedgerStore, account: str, tenant: str = T) -> int:
    return store.balance(tenant, account).balance.minor


class LedgerSuite:
    """Subclass and provide a `store` fixture yielding an empty LedgerStore."""

    @pytest.fixture
    def ledger(self, store: LedgerStore) -> LedgerStore:
        store.create_accounts(
            [
                customer("alice", overdraft_limit=0),
                customer("bob", overdraft_limit=5000),
                customer("carol"),
                internal("settle-eur", "settlement"),
                internal("suspense-eur", "suspense"),
            ]
        )
        return store

    # -- accounts -------------------------------------------------------------------------

    def test_accounts_are_created_once_and_read_back(self, ledger: LedgerStore) -> None:
        acc = ledger.get_account(T, "alice")
        assert acc == customer("alice", overdraft_limit=0)
        ledger.create_accounts([customer("alice", overdraft_limit=0)])  # identical: no-op
        with pytest.raises(AccountError, match="different definition"):
            ledger.create_accounts([customer("alice", currency="GBP")])
        assert ledger.get_account(T, "nobody") is None

    def test_account_definitions_are_validated(self, store: LedgerStore) -> None:
        with pytest.raises(AccountError, match="IBAN"):
            store.create_accounts([customer("x", iban="GB00WEST12345698765432")])
        with pytest.raises(AccountError, match="role"):
            store.create_accounts([internal("y", "piggy-bank")])
        with pytest.raises(AccountError, match="unknown currency"):
            store.create_accounts([customer("z", currency="EUX")])
        store.create_accounts(
            [
                customer(
                    "uk",
                    currency="GBP",
                    iban="GB82WEST12345698765432",
                    sort_code="123456",
                    account_number="98765432",
                    product_type="current",
                )
            ]
        )
        got = store.get_account(T, "uk")
        assert got is not None and got.sort_code == "123456" and got.product_type == "current"

    # -- posting --------------------------------------------------------------------------

    def test_posting_moves_money_and_the_trial_balance_stays_zero(
        self, ledger: LedgerStore
    ) -> None:
        [r] = ledger.post_batch([transfer("e1", "settle-eur", "alice", 10_000)])
        assert r.status == "posted" and r.position is not None and r.posted_at is not None
        assert bal(ledger, "alice") == 10_000
        assert bal(ledger, "settle-eur") == -10_000
        b = ledger.balance(T, "alice")
        assert b.balance == Money(10_000, "EUR") and b.credits == 10_000 and b.debits == 0
        tb = ledger.trial_balance(T)
        assert tb.balanced
        [line] = tb.lines
        assert (line.currency, line.debits, line.credits, line.net) == ("EUR", 10_000, 10_000, 0)

    def test_unbalanced_entry_is_refused_saying_by_how_much(self, ledger: LedgerStore) -> None:
        entry = JournalEntry(
            id="bad",
            tenant=T,
            legs=(
                Leg(account="settle-eur", side="debit", amount=Money(1000, "EUR")),
                Leg(account="carol", side="credit", amount=Money(900, "EUR")),
            ),
        )
        [r] = ledger.post_batch([entry])
        assert r.status == "refused"
        assert r.reason is not None and "1.00 EUR" in r.reason and "debits exceed" in r.reason
        assert bal(ledger, "carol") == 0
        assert ledger.get_entry(T, "bad") is None

    def test_one_bad_entry_does_not_sink_the_batch(self, ledger: LedgerStore) -> None:
        results = ledger.post_batch(
            [
                transfer("a", "settle-eur", "carol", 100),
                transfer("b", "settle-eur", "ghost", 100),
                transfer("c", "settle-eur", "carol", 5, currency="USD"),
                transfer("d", "settle-eur", "carol", 200),
            ]
        )
        assert [r.status for r in results] == ["posted", "refused", "refused", "posted"]
        assert results[1].reason is not None and "unknown account 'ghost'" in results[1].reason
        assert results[2].reason is not None and "is in EUR" in results[2].reason
        assert bal(ledger, "carol") == 300
        assert ledger.trial_balance(T).balanced

    def test_same_id_same_content_is_a_duplicate_with_the_original_result(
        self, ledger: LedgerStore
    ) -> None:
        e = transfer("e1", "settle-eur", "carol", 700)
        [first] = ledger.post_batch([e])
        [again] = ledger.post_batch([e])
        assert again.status == "duplicate"
        assert again.position == first.position and again.posted_at == first.posted_at
        assert bal(ledger, "carol") == 700

    def test_same_id_other_content_is_a_conflict_and_posts_nothing(
        self, ledger: LedgerStore
    ) -> None:
        ledger.post_batch([transfer("e1", "settle-eur", "carol", 700)])
        [r] = ledger.post_batch([transfer("e1", "settle-eur", "carol", 701)])
        assert r.status == "conflict" and r.reason is not None and "e1" in r.reason
        assert bal(ledger, "carol") == 700

    def test_duplicates_inside_one_batch(self, ledger: LedgerStore) -> None:
        e = transfer("e1", "settle-eur", "carol", 10)
        results = ledger.post_batch([e, e, transfer("e1", "settle-eur", "carol", 11)])
        assert [r.status for r in results] == ["posted", "duplicate", "conflict"]
        assert bal(ledger, "carol") == 10

    def test_replaying_a_batch_changes_nothing(self, ledger: LedgerStore) -> None:
        batch = [transfer(f"e{i}", "settle-eur", "carol", 100 + i) for i in range(50)]
        first = ledger.post_batch(batch)
        before = (bal(ledger, "carol"), ledger.trial_balance(T))
        second = ledger.post_batch(batch)
        assert all(r.status == "duplicate" for r in second)
        assert [r.position for r in second] == [r.position for r in first]
        assert (bal(ledger, "carol"), ledger.trial_balance(T)) == before

    def test_replay_of_an_entry_now_beyond_the_overdraft_is_still_a_duplicate(
        self, ledger: LedgerStore
    ) -> None:
        ledger.post_batch([transfer("fund", "settle-eur", "alice", 1000)])
        spend = transfer("spend", "alice", "settle-eur", 1000)
        assert ledger.post_batch([spend])[0].status == "posted"
        # alice is at 0 with overdraft forbidden: re-posting must not say "refused".
        [r] = ledger.post_batch([spend])
        assert r.status == "duplicate"
        [c] = ledger.post_batch([transfer("spend", "alice", "settle-eur", 999)])
        assert c.status == "conflict"

    # -- rules ----------------------------------------------------------------------------

    def test_overdraft_forbidden_and_limited(self, ledger: LedgerStore) -> None:
        [r] = ledger.post_batch([transfer("x1", "alice", "settle-eur", 1)])
        assert r.status == "refused" and r.reason is not None
        assert "alice" in r.reason and "-0.01 EUR" in r.reason and "forbidden" in r.reason
        ok, over = ledger.post_batch(
            [
                transfer("b1", "bob", "settle-eur", 5000),  # exactly the limit
                transfer("b2", "bob", "settle-eur", 1),
            ]
        )
        assert ok.status == "posted" and over.status == "refused"
        assert over.reason is not None and "50.00 EUR" in over.reason
        assert bal(ledger, "bob") == -5000
        # Earlier entries of the same batch count: fund then spend in one batch.
        a, b = ledger.post_batch(
            [
                transfer("f", "settle-eur", "alice", 300),
                transfer("s", "alice", "settle-eur", 300),
            ]
        )
        assert (a.status, b.status) == ("posted", "posted")
        assert bal(ledger, "alice") == 0

    def test_overdraft_counts_the_net_effect_of_an_entry(self, ledger: LedgerStore) -> None:
        e = JournalEntry(
            id="net",
            tenant=T,
            legs=(
                Leg(account="alice", side="credit", amount=Money(500, "EUR")),
                Leg(account="alice", side="debit", amount=Money(400, "EUR")),
                Leg(account="settle-eur", side="debit", amount=Money(100, "EUR")),
            ),
        )
        assert ledger.post_batch([e])[0].status == "posted"
        assert bal(ledger, "alice") == 100

    def test_closed_and_blocked_accounts(self, ledger: LedgerStore) -> None:
        ledger.post_batch([transfer("f", "settle-eur", "carol", 1000)])
        ledger.set_account_status(T, "carol", "blocked")
        debit, credit = ledger.post_batch(
            [
                transfer("d", "carol", "settle-eur", 10),
                transfer("c", "settle-eur", "carol", 10),
            ]
        )
        assert debit.status == "refused" and debit.reason is not None
        assert "blocked" in debit.reason
        assert credit.status == "posted"
        ledger.set_account_status(T, "carol", "closed")
        [r] = ledger.post_batch([transfer("c2", "settle-eur", "carol", 10)])
        assert r.status == "refused" and r.reason is not None and "closed" in r.reason
        assert bal(ledger, "carol") == 1010
        with pytest.raises(UnknownAccount):
            ledger.set_account_status(T, "ghost", "closed")

    # -- reversal -------------------------------------------------------------------------

    def test_reversal_restores_balances_and_links_the_original(self, ledger: LedgerStore) -> None:
        ledger.post_batch([transfer("e1", "settle-eur", "carol", 1234)])
        r = ledger.reverse(T, "e1")
        assert r.status == "posted"
        assert bal(ledger, "carol") == 0 and bal(ledger, "settle-eur") == 0
        rev = ledger.get_entry(T, r.entry_id)
        assert rev is not None and rev.reversal_of == "e1"
        assert [(lg.account, lg.side) for lg in rev.legs] == [
            ("settle-eur", "credit"),
            ("carol", "debit"),
        ]
        again = ledger.reverse(T, "e1")
        assert again.status == "duplicate" and again.position == r.position
        other = ledger.reverse(T, "e1", reversal_entry_id="manual-2")
        assert other.status == "refused" and other.reason is not None
        assert "already reversed" in other.reason
        assert bal(ledger, "carol") == 0
        with pytest.raises(UnknownEntry):
            ledger.reverse(T, "nope")
        [rr] = ledger.post_batch([rev_entry(ledger, r.entry_id)])
        assert rr.status == "refused" and rr.reason is not None
        assert "itself a reversal" in rr.reason

    def test_reversal_must_mirror_and_may_share_the_batch(self, ledger: LedgerStore) -> None:
        orig = transfer("o", "settle-eur", "carol", 50)
        wrong = JournalEntry(
            id="w",
            tenant=T,
            reversal_of="o",
            legs=transfer("x", "carol", "settle-eur", 49).legs,
        )
        results = ledger.post_batch([orig, wrong, orig.reversal()])
        assert [r.status for r in results] == ["posted", "refused", "posted"]
        assert results[1].reason is not None and "mirror" in results[1].reason
        assert bal(ledger, "carol") == 0
        [missing] = ledger.post_batch([transfer("q", "carol", "settle-eur", 1).reversal()])
        assert missing.status == "refused"

    def test_reversal_respects_the_overdraft_rule(self, ledger: LedgerStore) -> None:
        ledger.post_batch(
            [
                transfer("fund", "settle-eur", "alice", 100),
                transfer("spend", "alice", "settle-eur", 100),
            ]
        )
        r = ledger.reverse(T, "fund")
        assert r.status == "refused" and r.reason is not None and "forbidden" in r.reason
        assert bal(ledger, "alice") == 0

    # -- queries --------------------------------------------------------------------------

    def test_entries_for_an_account_by_time_range_and_page(self, ledger: LedgerStore) -> None:
        t0 = datetime(2026, 1, 1, tzinfo=UTC)
        batch = [
            transfer(f"e{i}", "settle-eur", "carol", 10 + i, booked_at=t0 + timedelta(hours=i))
            for i in range(10)
        ]
        batch.append(transfer("other", "settle-eur", "suspense-eur", 1, booked_at=t0))
        ledger.post_batch(batch)
        everything = ledger.entries(T, "carol")
        assert [e.id for e in everything] == [f"e{i}" for i in range(10)]
        assert everything[3].booked_at == t0 + timedelta(hours=3)
        assert everything[3].legs[1].amount == Money(13, "EUR")
        window = ledger.entries(
            T, "carol", start=t0 + timedelta(hours=2), end=t0 + timedelta(hours=5)
        )
        assert [e.id for e in window] == ["e2", "e3", "e4"]
        page = ledger.entries(T, "carol", limit=3, offset=6)
        assert [e.id for e in page] == ["e6", "e7", "e8"]
        with pytest.raises(UnknownAccount):
            ledger.entries(T, "ghost")

    def test_entry_references_and_metadata_are_kept(self, ledger: LedgerStore) -> None:
        e = transfer(
            "e1",
            "settle-eur",
            "carol",
            5,
            sequence_id="seq-1",
            source_event_id="evt-9",
            description="card purchase",
            metadata={"merchant": "ACME", "mcc": "5411"},
        )
        ledger.post_batch([e])
        got = ledger.get_entry(T, "e1")
        assert got is not None
        assert (got.sequence_id, got.source_event_id, got.description) == (
            "seq-1",
            "evt-9",
            "card purchase",
        )
        assert got.metadata == {"merchant": "ACME", "mcc": "5411"}

    # -- tenants --------------------------------------------------------------------------

    def test_tenants_are_isolated(self, ledger: LedgerStore) -> None:
        ledger.create_accounts(
            [customer("carol", tenant=T2), internal("s", "settlement", tenant=T2)]
        )
        ledger.post_batch([transfer("e1", "settle-eur", "carol", 100)])
        # Same entry id in another tenant is another entry; another tenant's account is unknown.
        a, b = ledger.post_batch(
            [
                transfer("e1", "s", "carol", 7, tenant=T2),
                transfer("e2", "s", "alice", 7, tenant=T2),
            ]
        )
        assert a.status == "posted" and b.status == "refused"
        assert b.reason is not None and "unknown account 'alice'" in b.reason
        assert bal(ledger, "carol") == 100 and bal(ledger, "carol", T2) == 7
        with pytest.raises(UnknownAccount):
            ledger.balance(T2, "alice")
        assert ledger.get_entry(T2, "e1") is not None
        assert ledger.get_account(T2, "alice") is None
        assert [e.id for e in ledger.entries(T2, "carol")] == ["e1"]
        assert ledger.entries(T2, "carol")[0].legs[0].amount == Money(7, "EUR")
        [line] = ledger.trial_balance(T2).lines
        assert line.credits == 7
        with pytest.raises(UnknownEntry):
            ledger.reverse(T2, "e1-not-there")
        assert ledger.tenants() == [T, T2]

    # -- currencies and FX ----------------------------------------------------------------

    def test_exponents_and_fx_through_position_accounts(self, store: LedgerStore) -> None:
        store.create_accounts(
            [
                customer("jp", currency="JPY", overdraft_limit=0),
                customer("bh", currency="BHD"),
                internal("pos-jpy", "fx_position", "JPY"),
                internal("pos-bhd", "fx_position", "BHD"),
                internal("fees-bhd", "fees", "BHD"),
                internal("round-bhd", "fx_rounding", "BHD"),
                internal("settle-jpy", "settlement", "JPY"),
            ]
        )
        store.post_batch([transfer("fund", "settle-jpy", "jp", 100_000, currency="JPY")])
        rate = FxRate(
            base="JPY",
            quote="BHD",
            rate="0.0025013",
            source="ECB",
            as_of=datetime(2026, 11, 21, 16, tzinfo=UTC),
            markup="0.0175",
        )
        conv = convert(Money(12_345, "JPY"), rate)
        legs = fx_legs(
            conv,
            payer="bh",
            payee="jp",
            position_source="pos-jpy",
            position_target="pos-bhd",
            fees="fees-bhd",
            fx_rounding="round-bhd",
        )
        entry = JournalEntry(id="fx1", tenant=T, legs=legs, metadata=conv.provenance())
        [r] = store.post_batch([entry])
        assert r.status == "posted", r.reason
        assert bal(store, "bh") == -conv.charged.minor
        assert bal(store, "jp") == 100_000 + 12_345
        assert bal(store, "fees-bhd") == conv.markup.minor > 0
        tb = store.trial_balance(T)
        assert tb.balanced and {line.currency for line in tb.lines} == {"JPY", "BHD"}
        got = store.get_entry(T, "fx1")
        assert got is not None and got.metadata["fx"]["rate"] == "0.0025013"
        assert got.metadata["fx"]["source"] == "ECB"


def rev_entry(store: LedgerStore, entry_id: str) -> JournalEntry:
    """The reversal of an already-stored entry (used to try reversing a reversal)."""
    p = store.get_entry(T, entry_id)
    assert p is not None
    return JournalEntry(
        id=p.id,
        tenant=p.tenant,
        legs=tuple(Leg(account=lg.account, side=lg.side, amount=lg.amount) for lg in p.legs),
        reversal_of=p.reversal_of,
        description=p.description,
    ).reversal(entry_id="rev-of-rev")


# -- property: random postings, conversions and reversals -------------------------------------

_PROP_ACCOUNTS = [
    ("eur-1", "EUR", "customer"),
    ("eur-2", "EUR", "customer"),
    ("eur-set", "EUR", "settlement"),
    ("jpy-1", "JPY", "customer"),
    ("jpy-set", "JPY", "settlement"),
    ("bhd-1", "BHD", "customer"),
]
_FX = {
    c: {
        "pos": f"pos-{c.lower()}",
        "fees": f"fees-{c.lower()}",
        "round": f"round-{c.lower()}",
    }
    for c in ("EUR", "JPY", "BHD")
}
_BY_CUR: dict[str, list[str]] = {}
for _aid, _cur, _ in _PROP_ACCOUNTS:
    _BY_CUR.setdefault(_cur, []).append(_aid)

_transfer_op = st.tuples(
    st.just("transfer"),
    st.sampled_from(sorted(_BY_CUR)),
    st.integers(0, 5),
    st.integers(0, 5),
    st.integers(1, 10**9),
)
_fx_op = st.tuples(
    st.just("fx"),
    st.sampled_from([("EUR", "JPY"), ("JPY", "BHD"), ("BHD", "EUR"), ("EUR", "BHD")]),
    st.integers(1, 10**7),  # rate numerator over 10**5
    st.integers(0, 300),  # markup in basis points
    st.integers(1, 10**8),
)
_reverse_op = st.tuples(st.just("reverse"), st.integers(0, 1000))
_ops = st.lists(st.one_of(_transfer_op, _transfer_op, _fx_op, _reverse_op), min_size=1, max_size=25)


def _prop_accounts(tenant: str) -> list[Account]:
    accs = [
        customer(a, c, tenant=tenant) if k == "customer" else internal(a, k, c, tenant=tenant)
        for a, c, k in _PROP_ACCOUNTS
    ]
    for cur, names in _FX.items():
        accs += [
            internal(names["pos"], "fx_position", cur, tenant=tenant),
            internal(names["fees"], "fees", cur, tenant=tenant),
            internal(names["round"], "fx_rounding", cur, tenant=tenant),
        ]
    return accs


def _build(tenant: str, ops: list[tuple[Any, ...]]) -> list[JournalEntry]:
    entries: list[JournalEntry] = []
    originals: list[JournalEntry] = []
    for n, op in enumerate(ops):
        if op[0] == "transfer":
            _, cur, i, j, minor = op
            names = _BY_CUR[cur]
            d, c = names[i % len(names)], names[j % len(names)]
            e = transfer(f"t{n}", d, c, minor, currency=cur, tenant=tenant)
        elif op[0] == "fx":
            _, (src, dst), num, bp, minor = op
            conv = convert(
                Money(minor, src),
                FxRate(
                    base=src,
                    quote=dst,
                    rate=f"{num}/100000",
                    source="prop",
                    as_of=datetime(2026, 1, 1, tzinfo=UTC),
                    markup=f"{bp}/10000",
                ),
            )
            legs = fx_legs(
                conv,
                payer=_BY_CUR[dst][0],
                payee=_BY_CUR[src][-1],
                position_source=_FX[src]["pos"],
                position_target=_FX[dst]["pos"],
                fees=_FX[dst]["fees"],
                fx_rounding=_FX[dst]["round"],
            )
            if len(legs) < 2 or conv.charged.minor == 0:
                continue
            e = JournalEntry(id=f"fx{n}", tenant=tenant, legs=legs, metadata=conv.provenance())
        else:
            if not originals:
                continue
            e = originals[op[1] % len(originals)].reversal()
        entries.append(e)
        if e.reversal_of is None:
            originals.append(e)
    return entries


class LedgerProperties:
    """Hypothesis over a store: mix into a backend's test class next to LedgerSuite."""

    @given(ops=_ops, cut=st.integers(0, 25))
    @settings(
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.differing_executors,
        ],
        deadline=None,
        max_examples=20,
    )
    def test_random_postings_conserve_money_and_replay_changes_nothing(
        self, store: LedgerStore, ops: list[tuple[Any, ...]], cut: int
    ) -> None:
        tenant = f"p{uuid.uuid4().hex[:10]}"
        store.create_accounts(_prop_accounts(tenant))
        entries = _build(tenant, ops)
        batches = [entries[:cut], entries[cut:]]
        first = [r for b in batches for r in store.post_batch(b)]
        # Nothing here breaks a rule except reversing twice (the derived id: a duplicate).
        assert {r.status for r in first} <= {"posted", "duplicate"}, first
        tb = store.trial_balance(tenant)
        assert tb.balanced
        names = [a.id for a in _prop_accounts(tenant)]
        balances = {a: store.balance(tenant, a).balance for a in names}
        for a in names:
            legs_sum = 0
            for e in store.entries(tenant, a, limit=10_000):
                legs_sum += sum(
                    lg.amount.minor if lg.side == "credit" else -lg.amount.minor
                    for lg in e.legs
                    if lg.account == a
                )
            assert balances[a].minor == legs_sum, a
        # Re-applying the same batches: every entry is a duplicate, nothing moves.
        again = [r for b in batches for r in store.post_batch(b)]
        assert all(r.status == "duplicate" for r in again)
        assert [r.position for r in again] == [r.position for r in first]
        assert {a: store.balance(tenant, a).balance for a in names} == balances
        assert store.trial_balance(tenant) == tb


# -- property: the store agrees with a small reference model ----------------------------------

_MODEL_ACCOUNTS = {"a": 0, "b": 500, "c": None, "s": None}  # id -> overdraft limit
_model_op = st.one_of(
    st.tuples(
        st.just("post"),
        st.integers(0, 7),  # entry id from a small pool: duplicates and conflicts happen
        st.sampled_from(sorted(_MODEL_ACCOUNTS)),
        st.sampled_from(sorted(_MODEL_ACCOUNTS)),
        st.integers(1, 800),
    ),
    st.tuples(st.just("reverse"), st.integers(0, 7)),
    st.tuples(st.just("cut")),
)


class ReferenceLedger:
    """What the ledger must do, written independently of the stores' planner: dicts only."""

    def __init__(self) -> None:
        self.posted: dict[str, JournalEntry] = {}
        self.reversed_by: dict[str, str] = {}
        self.balance = dict.fromkeys(_MODEL_ACCOUNTS, 0)

    def post(self, e: JournalEntry) -> str:
        if e.id in self.posted:
            return "duplicate" if self.posted[e.id] == e else "conflict"
        if e.reversal_of is not None:
            orig = self.posted.get(e.reversal_of)
            if orig is None or orig.reversal_of is not None or e.reversal_of in self.reversed_by:
                return "refused"
            flip = {"debit": "credit", "credit": "debit"}
            mirrored = sorted((lg.account, flip[lg.side], lg.amount.minor) for lg in e.legs)
            if mirrored != sorted((lg.account, lg.side, lg.amount.minor) for lg in orig.legs):
                return "refused"  # the reversal of another version of the entry
        effect = dict.fromkeys(_MODEL_ACCOUNTS, 0)
        for leg in e.legs:
            effect[leg.account] += leg.amount.minor * (1 if leg.side == "credit" else -1)
        for acc, delta in effect.items():
            limit = _MODEL_ACCOUNTS[acc]
            if limit is not None and delta < 0 and self.balance[acc] + delta < -limit:
                return "refused"
        for acc, delta in effect.items():
            self.balance[acc] += delta
        self.posted[e.id] = e
        if e.reversal_of is not None:
            self.reversed_by[e.reversal_of] = e.id
        return "posted"


class LedgerModelCheck:
    """Random batches of transfers (reused ids), reversals and batch cuts: the store's result
    for every entry and every balance equal the reference model's."""

    @given(ops=st.lists(_model_op, min_size=1, max_size=40))
    @settings(
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.differing_executors,
        ],
        deadline=None,
        max_examples=25,
    )
    def test_store_agrees_with_a_reference_model(
        self, store: LedgerStore, ops: list[tuple[Any, ...]]
    ) -> None:
        tenant = f"m{uuid.uuid4().hex[:10]}"
        store.create_accounts(
            [customer(a, tenant=tenant, overdraft_limit=lim) for a, lim in _MODEL_ACCOUNTS.items()]
        )
        model = ReferenceLedger()
        # Entries known by id: the latest built for that id (to reverse it later).
        built: dict[int, JournalEntry] = {}
        batches: list[list[JournalEntry]] = [[]]
        for op in ops:
            if op[0] == "cut":
                batches.append([])
            elif op[0] == "post":
                _, n, d, c, minor = op
                e = transfer(f"e{n}", d, c, minor, tenant=tenant)
                built[n] = e
                batches[-1].append(e)
            elif op[1] in built:
                batches[-1].append(built[op[1]].reversal())
        for batch in batches:
            got = [r.status for r in store.post_batch(batch)]
            expected = [model.post(e) for e in batch]
            assert got == expected, (batch, got, expected)
        for acc in _MODEL_ACCOUNTS:
            assert store.balance(tenant, acc).balance.minor == model.balance[acc], acc
        assert store.trial_balance(tenant).balanced


class LedgerConcurrency:
    """Several writers, each on its own connection (a `store_factory` fixture opens one)."""

    def test_concurrent_writers_on_a_hot_account_lose_nothing(
        self, store_factory: Callable[[], LedgerStore]
    ) -> None:
        """Eight writers, separate connections (threads), all debiting one hot account with an
        overdraft limit, or crediting it from one settlement account: every posted entry is
        counted once, the limit is never breached, and the final balances are exact."""
        setup = store_factory()
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
            store = store_factory()
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
            for i, status in enumerate(statuses):
                if status == "posted":
                    if i % 5 == 4:
                        posted_credits += 1
                    else:
                        posted_debits += 1
                else:
                    assert status == "refused"
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
