"""FR10: the reconciler's classification is a pure function of three views (in, ledger, file)
and its configuration; patch entries balance and link to their break."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from paypost.config import UserError
from paypost.ledger.model import PostedEntry, PostedLeg
from paypost.money import Money
from paypost.stages import reconcile as rec

T = "uk-bank"
DAY = "2026-11-21"


def auth(n: int, amount: int = 1000, currency: str = "GBP", day: str = DAY) -> rec.InboundAuth:
    return rec.InboundAuth(
        tenant=T,
        auth_id=f"auth-{n}",
        accepted_id=f"accepted-{n}",
        day=day,
        amount=amount,
        currency=currency,
    )


def entry(
    a: rec.InboundAuth | None,
    pk: int,
    settled: int | None = None,
    *,
    entry_id: str | None = None,
    currency: str | None = None,
    account_currency: str | None = None,
    reversal_of: str | None = None,
    patch_break: str | None = None,
    adjusts: str | None = None,
    sequence_id: str | None = None,
    transaction_ref: str | None = None,
    day: str = DAY,
) -> rec.EntryView:
    seq = rec.expected_entry_id(T, a.accepted_id) if a is not None else None
    ccy = currency or (a.currency if a is not None else "GBP")
    return rec.EntryView(
        pk=pk,
        tenant=T,
        id=entry_id or seq or f"entry-{pk}",
        day=day,
        sequence_id=sequence_id if sequence_id is not None else seq,
        transaction_ref=transaction_ref
        if transaction_ref is not None
        else (rec.transaction_ref_for(a.accepted_id) if a is not None else None),
        reversal_of=reversal_of,
        settled=settled if settled is not None else (a.amount if a is not None else 500),
        currency=ccy,
        account="UK-BANK-00000001",
        account_currency=account_currency or ccy,
        patch_break=patch_break,
        adjusts=adjusts,
    )


def views(
    inbound: list[rec.InboundAuth],
    entries: list[rec.EntryView],
    file_records: list[rec.FileRecord] | None = None,
    **kw: Any,
) -> rec.Views:
    return rec.Views(
        inbound=inbound,
        outcomes=kw.get("outcomes", {}),
        entries=entries,
        file_records=file_records,
        queued_entries=kw.get("queued", set()),
        in_flight=kw.get("in_flight", set()),
        dead_letters=kw.get("dead_letters", {}),
        breaks=kw.get("breaks", {}),
    )


def classify(v: rec.Views, **config: Any) -> rec.Report:
    return rec.classify(v, rec.ReconcileConfig(**config), rec.Scope())


def kinds(report: rec.Report) -> list[str]:
    return sorted(b.kind for b in report.breaks)


def test_matched_and_per_day_totals() -> None:
    a, b = auth(1, 1250), auth(2, 990, "EUR")
    report = classify(views([a, b], [entry(a, 1), entry(b, 2)]))
    assert report.breaks == [] and report.counts["matched"] == 2
    [day] = report.days
    assert day.authorized == day.posted == {"GBP": 1250, "EUR": 990}


def test_missing_held_rejected_in_flight_and_dead_letter_evidence() -> None:
    a, b, c, d = auth(1), auth(2), auth(3), auth(4)
    report = classify(
        views(
            [a, b, c, d],
            [],
            outcomes={(T, "auth-2"): ("held", "high value"), (T, "auth-3"): ("rejected", "x")},
            in_flight={(T, "auth-4")},
            dead_letters={(T, "auth-1"): [{"target": "enrich", "error": "boom"}]},
        )
    )
    assert kinds(report) == ["missing"]
    c_ = report.counts
    assert (c_["held"], c_["rejected"], c_["in_flight"]) == (1, 1, 1)
    [missing] = report.breaks
    assert missing.action == "redrive"
    assert missing.evidence["authorization_id"] == "auth-1"
    assert missing.evidence["expected_entry_id"] == rec.expected_entry_id(T, "accepted-1")
    assert missing.evidence["dead_letters"][0]["target"] == "enrich"


def test_duplicate_keeps_the_expected_entry_and_a_reversed_extra_is_no_break() -> None:
    a = auth(1)
    copy = entry(a, 1, entry_id="copy")  # posted first, under another id
    original = entry(a, 2)
    report = classify(views([a], [copy, original]))
    [dup] = report.breaks
    assert dup.kind == "duplicate" and dup.action == "reverse"
    assert dup.evidence["kept_entry_id"] == original.id
    assert dup.evidence["duplicate_entry_id"] == "copy"
    reversal = entry(None, 3, -1000, entry_id="rev", reversal_of="copy", patch_break=dup.break_id)
    assert classify(views([a], [copy, original, reversal])).breaks == []


def test_amount_mismatch_tolerance_limit_and_adjustments() -> None:
    a = auth(1, 1000)
    assert classify(views([a], [entry(a, 1, 1001)]), amount_tolerance_minor=1).breaks == []
    [m] = classify(views([a], [entry(a, 1, 1037)])).breaks
    assert (m.kind, m.action, m.evidence["what"]) == ("mismatch", "adjust", "amount")
    assert m.evidence["difference"] == {"minor": -37, "currency": "GBP"}
    [held] = classify(views([a], [entry(a, 1, 1037)]), auto_adjust_limit_minor=10).breaks
    assert held.action == "hold" and "above the auto-adjust limit" in held.reason
    [per_ccy] = classify(
        views([a], [entry(a, 1, 1037)]), auto_adjust_limit_by_currency={"GBP": 5}
    ).breaks
    assert per_ccy.action == "hold"
    # An adjustment entry of -37 linked to the posting makes it match.
    adjustment = entry(
        None, 2, -37, patch_break=m.break_id, adjusts=rec.expected_entry_id(T, a.accepted_id)
    )
    assert classify(views([a], [entry(a, 1, 1037), adjustment])).breaks == []


def test_refund_signs() -> None:
    a = auth(1, 500)
    assert classify(views([a], [entry(a, 1, -500)])).breaks == []
    [m] = classify(views([a], [entry(a, 1, -450)])).breaks
    assert m.evidence["difference"]["minor"] == 50  # under-refunded by 50
    assert m.evidence["posted"]["minor"] == 450


def test_currency_mismatch_and_cross_currency_entries_are_held() -> None:
    a = auth(1, 1000, "EUR")
    [cur] = classify(views([a], [entry(a, 1, 1000, currency="USD")])).breaks
    assert (cur.evidence["what"], cur.action) == ("currency", "hold")
    assert classify(views([a], [entry(a, 1, 1000, currency="USD")]), compare_currency=False)
    [fx] = classify(views([a], [entry(a, 1, 990, account_currency="GBP")])).breaks
    assert fx.action == "hold" and "cross-currency" in fx.reason


def test_orphans_in_scope_only_and_not_once_reversed() -> None:
    o = entry(None, 1, 4242, sequence_id="nobody", transaction_ref="nothing")
    [orphan] = classify(views([], [o])).breaks
    assert (orphan.kind, orphan.action) == ("orphan", "hold")
    assert orphan.evidence["entry_id"] == o.id
    later = rec.Scope(first_day="2026-11-22")
    assert rec.classify(views([], [o]), rec.ReconcileConfig(), later).breaks == []
    rev = entry(None, 2, -4242, entry_id="r", reversal_of=o.id, patch_break=orphan.break_id)
    assert classify(views([], [o, rev])).breaks == []


def test_matching_criteria() -> None:
    a = auth(1)
    by_ref = entry(a, 1, sequence_id="another-sequence")
    assert classify(views([a], [by_ref])).breaks == []
    assert kinds(classify(views([a], [by_ref]), match_on=("sequence_id",))) == [
        "missing",
        "orphan",
    ]
    with pytest.raises(ValueError, match="match_on"):
        rec.ReconcileConfig(match_on=("amount",))  # type: ignore[arg-type]


def test_break_ids_are_stable_and_status_comes_from_the_breaks_table() -> None:
    a = auth(1)
    v = views([a], [])
    first, second = classify(v).breaks[0], classify(v).breaks[0]
    assert first.break_id == second.break_id == rec.break_id_for(T, "missing", "auth-1")
    assert first.patch_entry_id == rec.expected_entry_id(T, "accepted-1")
    o = entry(None, 1, sequence_id="x", transaction_ref="y")
    bid = rec.break_id_for(T, "orphan", o.id)
    report = classify(views([], [o], breaks={bid: ("held", None, "review")}))
    assert report.breaks[0].status == "held" and report.open_breaks == 1
    done = classify(views([], [o], breaks={bid: ("patched", "e", None)}))
    assert done.open_breaks == 0


def file_record(e: rec.EntryView, settled: int | None = None, batch: str = "b1") -> rec.FileRecord:
    return rec.FileRecord(
        entry_id=e.id,
        tenant=e.tenant,
        batch_id=batch,
        seq=1,
        day=e.day,
        account=e.account or "",
        settled=e.settled if settled is None else settled,
        currency=e.currency,
    )


def test_posting_file_breaks() -> None:
    a, b, c, d = auth(1), auth(2), auth(3), auth(4)
    ea, eb, ec, ed = entry(a, 1), entry(b, 2), entry(c, 3), entry(d, 4)
    stray = rec.FileRecord(
        entry_id="stray",
        tenant=T,
        batch_id="b2",
        seq=9,
        day=DAY,
        account="X",
        settled=1,
        currency="GBP",
    )
    records = [
        file_record(ea),
        file_record(eb),
        file_record(eb, batch="b2"),
        file_record(ec, 999),
        stray,
    ]
    report = classify(views([a, b, c, d], [ea, eb, ec, ed], records, queued=set()))
    assert kinds(report) == ["file_duplicate", "file_mismatch", "file_missing", "file_orphan"]
    by = {x.kind: x for x in report.breaks}
    assert (
        by["file_missing"].action == "requeue" and by["file_missing"].evidence["entry_id"] == ed.id
    )
    assert by["file_mismatch"].evidence["file"]["minor"] == 999
    # Queued in the outbox = on its way to the file.
    assert "file_missing" not in kinds(
        classify(views([a, b, c, d], [ea, eb, ec, ed], records, queued={(T, ed.id)}))
    )
    # A record whose entry the ledger lost belongs to the missing break (re-driven).
    only = classify(views([a], [], [file_record(ea)]))
    assert kinds(only) == ["missing"] and only.breaks[0].evidence["in_posting_file"] is True


def posted(entry_id: str, legs: list[tuple[str, str, int, str]], **kw: Any) -> PostedEntry:
    now = datetime(2026, 11, 21, 10, tzinfo=UTC)
    return PostedEntry(
        id=entry_id,
        tenant=T,
        position=1,
        booked_at=now,
        posted_at=now,
        legs=tuple(PostedLeg(account=a, side=s, amount=Money(m, c)) for a, s, m, c in legs),  # type: ignore[arg-type]
        **kw,
    )


def brk(kind: str = "mismatch") -> rec.Break:
    return rec.Break(
        break_id="b-1",
        kind=kind,
        tenant=T,
        day=DAY,
        account=None,
        evidence={},
        action="adjust",
        reason="",
    )


def test_adjustment_and_reversal_patches_balance_and_link_to_their_break() -> None:
    purchase = posted(
        "e1",
        [("UK-1", "debit", 1037, "GBP"), ("settlement-GBP", "credit", 1037, "GBP")],
        metadata={"transaction_ref": "tx"},
    )
    down = rec.adjustment_patch(brk(), purchase, "p1", -37)  # over-posted by 37
    assert down.problem() is None
    assert [(lg.account, lg.side, lg.amount.minor) for lg in down.legs] == [
        ("settlement-GBP", "debit", 37),
        ("UK-1", "credit", 37),
    ]
    assert down.metadata["reconciliation"] == {
        "break_id": "b-1",
        "kind": "mismatch",
        "action": "adjust",
        "adjusts": "e1",
    }
    rev = rec.reversal_patch(brk("duplicate"), purchase, "p2")
    assert rev.problem() is None and rev.reversal_of == "e1"
    assert rev.metadata["reconciliation"]["break_id"] == "b-1"
    no_settlement = posted("e2", [("UK-1", "debit", 5, "GBP"), ("fees-GBP", "credit", 5, "GBP")])
    with pytest.raises(ValueError, match="settlement"):
        rec.adjustment_patch(brk(), no_settlement, "p3", 1)


def test_run_every_goes_on_after_an_error_and_stops() -> None:
    calls: list[int] = []
    errors: list[BaseException] = []
    waits: list[float] = []

    def once() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("database locked")

    runs = rec.run_every(5.0, once, max_runs=3, sleep=waits.append, on_error=errors.append)
    assert runs == 3 and len(calls) == 3 and len(errors) == 1 and len(waits) == 2
    stop = threading.Event()
    stop.set()
    assert rec.run_every(1.0, once, stop=stop) == 0
    with pytest.raises(ValueError):
        rec.run_every(0, once)


def test_config_file(tmp_path: Path) -> None:
    from paypost.cli.reconcile import load_config

    good = tmp_path / "reconcile.yaml"
    good.write_text(
        "reconcile:\n  amount_tolerance_minor: 2\n  auto_adjust_limit_by_currency: {JPY: 500}\n"
    )
    cfg = load_config(good)
    assert cfg.tolerance("EUR") == 2 and cfg.adjust_limit("JPY") == 500
    bad = tmp_path / "bad.yaml"
    bad.write_text("amount_tolerance: 2\n")
    with pytest.raises(UserError, match=r"bad\.yaml.*amount_tolerance"):
        load_config(bad)
