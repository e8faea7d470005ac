"""FR2–FR4, FR9: the duplicate check parks duplicates and conflicts, forwards originals and
ignores redeliveries, in and across batches, whatever the order."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paypost.events import (
    AuthorizationApproved,
    AuthorizationRequest,
    AuthorizationResponse,
    Event,
    Merchant,
    derive_event_id,
    new_event,
)
from paypost.money import Money
from paypost.security.tokens import contains_pan
from paypost.stages.dedup import (
    DedupConfig,
    DedupIndex,
    MemoryDedupIndex,
    SqliteDedupIndex,
    business_key,
    check_duplicates,
    count_parked,
    get_parked,
    key_from_hex,
    key_hex,
    list_parked,
)

T0 = "2026-11-21T10:00:00Z"


def auth_event(
    *,
    stan: str = "000123",
    minor: int = 1250,
    currency: str = "GBP",
    token: str = "tok_abc123",
    merchant: str = "M-0001",
    approval: str = "A1B2C3",
    at: str = T0,
    tenant: str = "uk-bank",
    event_id: str | None = None,
    source_ref: str = "log:1",
) -> Event:
    detail = AuthorizationApproved(
        request=AuthorizationRequest(
            stan=stan,
            transmission_time=at,
            acquirer_id="ACQ1",
            card_token=token,
            pan_masked="400000******1234",
            amount=Money(minor, currency),
            merchant=Merchant(id=merchant, name="Corner Shop", mcc="5411", country="826"),
        ),
        response=AuthorizationResponse(response_code="00", approval_code=approval),
        source_ref=source_ref,
    )
    return new_event(detail, source="paypost.ingest", tenant=tenant, id=event_id, time=at)


Factory = Callable[[], DedupIndex]


def _sqlite_index() -> DedupIndex:
    return SqliteDedupIndex(sqlite3.connect(":memory:"))


INDEXES: list[Any] = [
    pytest.param(MemoryDedupIndex, id="memory"),
    pytest.param(_sqlite_index, id="sqlite"),
]


def run(index: DedupIndex, events: Sequence[Event], cfg: DedupConfig | None = None) -> list[Event]:
    result = check_duplicates(events, index, cfg)
    index.apply(result.effects)
    return result.outputs


def of_type(events: list[Event], detail_type: str) -> list[Event]:
    return [e for e in events if e.detail_type == detail_type]


@pytest.mark.parametrize("make", INDEXES)
def test_fr4_original_is_accepted_with_request_response_and_business_key(make: Factory) -> None:
    ev = auth_event()
    out = run(make(), [ev])
    assert len(out) == 1
    acc = out[0]
    assert acc.detail_type == "AuthorizationAccepted"
    assert acc.id == derive_event_id(ev.id, "dedup", 0)
    assert acc.causation_id == ev.id
    assert acc.correlation_id == ev.correlation_id
    assert acc.time == ev.time
    assert acc.detail["request"] == ev.detail["request"]
    assert acc.detail["response"] == ev.detail["response"]
    assert len(acc.detail["business_key"]) == 19  # "8bca:26e9:ccde:c904"
    assert (
        key_from_hex(acc.detail["business_key"])
        == business_key(ev.tenant, msgspec.convert(ev.detail, AuthorizationApproved))[0]
    )


@pytest.mark.parametrize("make", INDEXES)
def test_fr3_duplicate_in_same_batch_is_parked(make: Factory) -> None:
    first, copy = auth_event(source_ref="log:1"), auth_event(source_ref="log:9")
    out = run(make(), [first, copy])
    assert [e.detail_type for e in out] == ["AuthorizationAccepted", "DuplicateParked"]
    parked = out[1]
    assert parked.detail["reason"] == "duplicate"
    assert parked.detail["original_event_id"] == first.id
    assert parked.detail["business_key"] == out[0].detail["business_key"]
    assert parked.id == derive_event_id(copy.id, "dedup", 0)


@pytest.mark.parametrize("make", INDEXES)
def test_fr3_duplicate_across_batches_is_parked(make: Factory) -> None:
    index = make()
    run(index, [auth_event()])
    out = run(index, [auth_event(source_ref="other-file:3")])
    assert [e.detail_type for e in out] == ["DuplicateParked"]
    assert out[0].detail["reason"] == "duplicate"


@pytest.mark.parametrize("make", INDEXES)
def test_fr2_each_key_field_distinguishes_authorizations(make: Factory) -> None:
    variants = [
        auth_event(),
        auth_event(stan="000124"),
        auth_event(minor=1251),
        auth_event(currency="EUR"),
        auth_event(token="tok_other"),
        auth_event(merchant="M-0002"),
        auth_event(approval="ZZZZZZ"),
        auth_event(at="2026-11-21T10:00:01Z"),
        auth_event(tenant="euro-bank"),
    ]
    out = run(make(), variants)
    assert len(of_type(out, "AuthorizationAccepted")) == len(variants)


@pytest.mark.parametrize("make", INDEXES)
def test_fr2_same_instant_written_differently_is_the_same_key(make: Factory) -> None:
    out = run(
        make(),
        [auth_event(at="2026-11-21T10:00:00Z"), auth_event(at="2026-11-21T11:00:00.000+01:00")],
    )
    assert [e.detail_type for e in out] == ["AuthorizationAccepted", "DuplicateParked"]


@pytest.mark.parametrize("make", INDEXES)
def test_fr9_redelivery_produces_nothing(make: Factory) -> None:
    index = make()
    ev = auth_event()
    assert len(run(index, [ev])) == 1
    assert run(index, [ev]) == []  # a later batch
    assert run(index, [ev, ev]) == []
    fresh = make()
    assert len(run(fresh, [ev, ev])) == 1  # in the same batch


@pytest.mark.parametrize("make", INDEXES)
def test_fr9_redelivered_duplicate_produces_nothing_either(make: Factory) -> None:
    index = make()
    original, dup = auth_event(), auth_event(source_ref="log:2")
    run(index, [original, dup])
    assert run(index, [dup, original]) == []


@pytest.mark.parametrize("make", INDEXES)
def test_fr3_same_id_with_different_content_is_a_conflict_never_processed(
    make: Factory,
) -> None:
    index = make()
    ev = auth_event()
    run(index, [ev])
    tampered = auth_event(minor=999_999, event_id=ev.id)
    out = run(index, [tampered])
    assert len(out) == 1
    parked = out[0]
    assert parked.detail_type == "DuplicateParked"
    assert parked.detail["reason"] == "conflict"
    assert parked.detail["original_event_id"] == ev.id
    # Its id differs from the accepted output's, so the bus does not drop it as a copy.
    assert parked.id != derive_event_id(ev.id, "dedup", 0)
    # The same conflicting content again is a redelivery of the conflict: same id again.
    again = run(index, [tampered])
    assert [e.id for e in again] == [parked.id]


@pytest.mark.parametrize("make", INDEXES)
def test_fr3_conflict_in_the_same_batch(make: Factory) -> None:
    ev = auth_event()
    tampered = auth_event(minor=1, event_id=ev.id)
    out = run(make(), [ev, tampered])
    assert [e.detail_type for e in out] == ["AuthorizationAccepted", "DuplicateParked"]
    assert out[1].detail["reason"] == "conflict"


@pytest.mark.parametrize("make", INDEXES)
def test_fr2_window_edge_inclusive_then_late(make: Factory) -> None:
    cfg = DedupConfig(window_seconds=3600)
    index = make()
    run(index, [auth_event(stan="1", at="2026-11-21T10:00:00Z")], cfg)
    run(index, [auth_event(stan="2", at="2026-11-21T11:00:00Z")], cfg)  # high-water 11:00
    # Exactly high-water − window: inside; its duplicate is still recognised.
    edge = run(index, [auth_event(stan="1", at="2026-11-21T10:00:00Z", source_ref="x")], cfg)
    assert edge[0].detail["reason"] == "duplicate"
    inside = run(index, [auth_event(stan="3", at="2026-11-21T10:00:00Z")], cfg)
    assert inside[0].detail_type == "AuthorizationAccepted"
    # One second earlier: the index may have forgotten its original → parked "late".
    late = run(index, [auth_event(stan="4", at="2026-11-21T09:59:59Z")], cfg)
    assert late[0].detail_type == "DuplicateParked"
    assert late[0].detail["reason"] == "late"
    assert late[0].detail["original_event_id"] is None


def test_fr2_window_is_per_tenant() -> None:
    cfg = DedupConfig(window_seconds=60)
    index = MemoryDedupIndex()
    run(index, [auth_event(tenant="a", at="2026-11-22T10:00:00Z")], cfg)
    out = run(index, [auth_event(tenant="b", at="2026-11-20T10:00:00Z")], cfg)
    assert out[0].detail_type == "AuthorizationAccepted"


@pytest.mark.parametrize("make", INDEXES)
def test_invalid_payload_is_held_not_a_traceback(make: Factory) -> None:
    good = auth_event()
    bad = Event.from_dict({**good.to_dict(), "id": "bad-1", "detail": {"request": {}}})
    naive = auth_event(at="2026-11-21T10:00:00")
    out = run(make(), [bad, naive])
    assert [e.detail_type for e in out] == ["TransactionHeld", "TransactionHeld"]
    assert out[0].detail["stage"] == "dedup"
    assert "invalid payload" in out[0].detail["reason"]
    assert "UTC offset" in out[1].detail["reason"]


def _population(seed: int) -> list[Event]:
    rng = random.Random(seed)
    originals = [
        auth_event(stan=f"{i:06d}", minor=rng.randint(1, 50_000), at=f"2026-11-21T10:{i:02d}:00Z")
        for i in range(12)
    ]
    copies = [
        auth_event(
            stan=o.detail["request"]["stan"],
            minor=o.detail["request"]["amount"]["minor"],
            at=o.detail["request"]["transmission_time"],
            source_ref=f"replay:{k}",
        )
        for k, o in enumerate(rng.sample(originals, 6))
    ]
    redeliveries = rng.sample(originals + copies, 4)
    return originals + copies + redeliveries


def _accepted_keys(index: DedupIndex, events: list[Event], cuts: list[int]) -> set[str]:
    keys: set[str] = set()
    start = 0
    for end in [*sorted(cuts), len(events)]:
        for out in run(index, events[start:end]):
            if out.detail_type == "AuthorizationAccepted":
                assert out.detail["business_key"] not in keys, "a key accepted twice"
                keys.add(out.detail["business_key"])
        start = end
    return keys


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    shuffle_seed=st.integers(0, 2**16),
    cuts=st.lists(st.integers(0, 22), max_size=4),
)
def test_fr2_order_and_batching_do_not_change_accepted_keys(
    seed: int, shuffle_seed: int, cuts: list[int]
) -> None:
    events = _population(seed)
    reference = _accepted_keys(MemoryDedupIndex(), events, [])
    shuffled = events[:]
    random.Random(shuffle_seed).shuffle(shuffled)
    assert _accepted_keys(MemoryDedupIndex(), shuffled, cuts) == reference
    assert len(reference) == 12


def test_fr3_parked_are_stored_and_queryable(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "paypost.db")
    index = SqliteDedupIndex(conn)
    a, dup = auth_event(), auth_event(source_ref="log:2")
    b = auth_event(tenant="euro-bank", currency="EUR")
    b_dup = auth_event(tenant="euro-bank", currency="EUR", source_ref="log:3")
    conflict = auth_event(minor=7, event_id=a.id)
    with conn:
        run(index, [a, dup, b, b_dup, conflict])
    with conn:
        run(index, [dup, conflict])  # redelivered: stored once
    assert count_parked(conn) == {"duplicate": 2, "conflict": 1}
    uk = list_parked(conn, tenant="uk-bank")
    assert [r.reason for r in uk] == ["duplicate", "conflict"]
    assert [r.reason for r in list_parked(conn, reason="conflict")] == ["conflict"]
    rec = get_parked(conn, dup.id)
    assert rec is not None and rec.original_event_id == a.id
    assert rec.event["detail"]["request"]["pan_masked"] == "400000******1234"
    assert get_parked(conn, "no-such-id") is None


def test_fr9_sqlite_index_state_survives_reconnect(tmp_path: Path) -> None:
    path = tmp_path / "paypost.db"
    ev = auth_event()
    conn = sqlite3.connect(path)
    with conn:
        run(SqliteDedupIndex(conn), [ev])
    conn.close()
    conn = sqlite3.connect(path)
    index = SqliteDedupIndex(conn)
    assert run(index, [ev]) == []
    assert run(index, [auth_event(source_ref="again")])[0].detail["reason"] == "duplicate"


def test_sqlite_index_does_not_commit_by_itself(tmp_path: Path) -> None:
    path = tmp_path / "paypost.db"
    conn = sqlite3.connect(path)
    index = SqliteDedupIndex(conn)
    conn.commit()
    run(index, [auth_event()])
    conn.rollback()  # the caller's unit of work failed: nothing was recorded
    assert len(run(index, [auth_event()])) == 1
    assert index.seen_keys([(0, 0)]) == {}


def test_prune_forgets_old_keys_and_late_ones_stay_safe() -> None:
    conn = sqlite3.connect(":memory:")
    index = SqliteDedupIndex(conn)
    cfg = DedupConfig(window_seconds=60)
    run(index, [auth_event(stan="1", at="2026-11-21T10:00:00Z")], cfg)
    run(index, [auth_event(stan="2", at="2026-11-21T10:05:00Z")], cfg)
    assert index.prune("uk-bank", 60) == 2  # key + id of stan 1
    out = run(index, [auth_event(stan="1", at="2026-11-21T10:00:00Z", source_ref="b")], cfg)
    assert out[0].detail["reason"] == "late"  # never accepted twice


def test_fr9_sqlite_index_joins_an_explicit_unit_of_work(tmp_path: Path) -> None:
    # The bus opens connections in autocommit mode and brackets a batch with BEGIN/COMMIT.
    conn = sqlite3.connect(tmp_path / "paypost.db", isolation_level=None)
    index = SqliteDedupIndex(conn)
    ev = auth_event()
    conn.execute("BEGIN")
    run(index, [ev])
    conn.execute("ROLLBACK")  # crash before commit: as if never processed
    conn.execute("BEGIN")
    assert [e.detail_type for e in run(index, [ev])] == ["AuthorizationAccepted"]
    conn.execute("COMMIT")
    assert run(index, [ev]) == []


@pytest.mark.parametrize("make", INDEXES)
def test_fr9_redelivery_with_reordered_json_keys_is_still_a_redelivery(make: Factory) -> None:
    index = make()
    ev = auth_event()
    run(index, [ev])
    reordered = Event.from_dict({**ev.to_dict(), "detail": dict(reversed(list(ev.detail.items())))})
    assert run(index, [reordered]) == []


def test_nfr6_parked_table_refuses_a_clear_pan() -> None:
    index = SqliteDedupIndex(sqlite3.connect(":memory:"))
    leaky = auth_event(merchant="M-4751295000806363", source_ref="a")
    copy = auth_event(merchant="M-4751295000806363", source_ref="b")
    with pytest.raises(AssertionError, match="card number"):
        run(index, [leaky, copy])


@settings(max_examples=30, deadline=None)
@given(
    choices=st.lists(
        st.tuples(st.integers(0, 7), st.sampled_from(["new", "copy", "redeliver", "tamper"])),
        min_size=1,
        max_size=30,
    ),
    cuts=st.lists(st.integers(0, 30), max_size=3),
)
def test_fr9_sqlite_index_behaves_exactly_like_the_memory_fake(
    choices: list[tuple[int, str]], cuts: list[int]
) -> None:
    """The two DedupIndex implementations give byte-identical outputs on any sequence."""
    events: list[Event] = []
    for n, (k, kind) in enumerate(choices):
        base = auth_event(stan=f"{k:06d}", at=f"2026-11-21T10:00:{k:02d}Z", event_id=f"ev-{k}")
        if kind == "copy":
            events.append(auth_event(stan=f"{k:06d}", at=base.time, source_ref=f"c{n}"))
        elif kind == "tamper":
            events.append(auth_event(stan=f"{k:06d}", at=base.time, minor=n, event_id=base.id))
        else:
            events.append(base)
    outputs = []
    for index in (MemoryDedupIndex(), _sqlite_index()):
        produced: list[bytes] = []
        start = 0
        for end in [*sorted(cuts), len(events)]:
            produced += [msgspec.json.encode(e) for e in run(index, events[start:end])]
            start = max(start, end)
        outputs.append(produced)
    assert outputs[0] == outputs[1]


def test_nfr6_business_keys_never_look_like_card_numbers() -> None:
    # In plain hex these would be 16 decimal digits, and 4111111111111111 is Luhn-valid.
    for key in (0x4111111111111111, 0x1234567890123456, -1, 0):
        assert not contains_pan(key_hex(key))
        assert key_from_hex(key_hex(key)) == (key if key < 1 << 63 else key - (1 << 64))


def _reference_prepared(event: Event) -> tuple[int, int, int, int, int]:
    """(id key, id check, content hash, business key, ts) as computed before the fast paths
    (issue 7): blake2b built per hash, `business_key` per event."""
    import hashlib

    def h64(data: bytes) -> int:
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big", signed=True)

    digest = hashlib.blake2b(event.id.encode(), digest_size=16).digest()
    auth = msgspec.convert(event.detail, AuthorizationApproved)
    key, ts = business_key(event.tenant, auth)
    chash = h64(msgspec.json.encode((event.tenant, auth)))
    idk = int.from_bytes(digest[:8], "big", signed=True)
    return idk, int.from_bytes(digest[8:], "big", signed=True), chash, key, ts


@settings(max_examples=150, deadline=None)
@given(
    stan=st.integers(0, 999_999),
    minor=st.integers(0, 10**12),
    at=st.sampled_from([T0, "2026-11-21T10:00:00.250Z", "2026-11-21T11:00:00+01:00"]),
    tenant=st.sampled_from(["uk-bank", "de-bank", "ünï"]),
    approval=st.sampled_from(["A1B2C3", ""]),
    event_id=st.one_of(st.none(), st.text(min_size=1, max_size=40)),
    traceparent=st.sampled_from([None, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]),
    correlation=st.sampled_from([None, "", "corr-1"]),
)
def test_fast_paths_give_the_same_keys_and_accepted_events_as_before(
    stan: int,
    minor: int,
    at: str,
    tenant: str,
    approval: str,
    event_id: str | None,
    traceparent: str | None,
    correlation: str | None,
) -> None:
    from paypost.events import AuthorizationAccepted
    from paypost.stages import dedup

    ev = auth_event(
        stan=f"{stan:06d}", minor=minor, at=at, tenant=tenant, approval=approval, event_id=event_id
    )
    ev = msgspec.structs.replace(ev, traceparent=traceparent)
    if correlation is not None:
        ev = msgspec.structs.replace(ev, correlation_id=correlation)
    p = dedup._prepare(ev, {})
    assert (p.idk, p.idc, p.chash, p.key, p.ts) == _reference_prepared(ev)
    assert p.auth is not None
    before = dedup._emit(
        ev,
        AuthorizationAccepted(
            request=p.auth.request, response=p.auth.response, business_key=key_hex(p.key)
        ),
    )
    after = dedup._accepted(p)
    assert msgspec.json.encode(after) == msgspec.json.encode(before)
    assert after == before
    h = f"{p.key & 0xFFFFFFFFFFFFFFFF:016x}"
    assert key_hex(p.key) == f"{h[0:4]}:{h[4:8]}:{h[8:12]}:{h[12:16]}"


def test_a_batch_prepared_once_decides_exactly_as_one_prepared_by_the_check() -> None:
    """`Prepared` (the keys a worker locks before the check) hands the check the same
    decoded events: the same outputs and effects, with an undecodable event, a duplicate and
    a redelivery among them; events it was not made from are prepared by the check itself."""
    from paypost.stages.dedup import Prepared

    events = _population(7)
    events.append(Event.from_dict({**events[0].to_dict(), "id": "bad-1", "detail": {}}))
    prepared = Prepared(events[:-3])  # the last three are not in it
    keys = Prepared(events).business_keys()
    assert keys[id(events[-1])] is None and all(keys[id(e)] is not None for e in events[:-1])
    assert (
        keys[id(events[0])]
        == business_key("uk-bank", msgspec.convert(events[0].detail, AuthorizationApproved))[0]
    )
    assert {id(e): keys[id(e)] for e in events[:-3]} == prepared.business_keys()
    twice = [msgspec.structs.replace(e) for e in events[:2]]  # equal, not the same objects
    assert prepared.get(twice[0]) is None and prepared.get(events[0]) is not None
    a = check_duplicates(events, MemoryDedupIndex())
    b = check_duplicates(events, MemoryDedupIndex(), prepared=prepared)
    assert [e.to_dict() for e in a.outputs] == [e.to_dict() for e in b.outputs]
    assert a.effects == b.effects and a.counts == b.counts
    assert a.counts.duplicate > 0 and a.counts.redelivered > 0 and a.counts.held == 1
