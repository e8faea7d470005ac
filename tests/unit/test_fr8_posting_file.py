"""FR8: the bank's posting input — batches with header, one record per entry, per-currency
control totals and a trailer; idempotent by batch id, restart-safe, never a card number."""

from __future__ import annotations

import csv
import hashlib
import io
import re
import sqlite3
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paypost.events import TransactionApproved, new_event
from paypost.ledger.model import JournalEntry, Leg
from paypost.money import Money
from paypost.security.tokens import contains_pan
from paypost.stages import assembler as asm
from paypost.stages.assembler import MemoryLegStore, assemble
from paypost.stages.post import create_legs
from paypost.stages.posting_file import (
    PostingFileError,
    PostingFileWriter,
    PostingRecord,
    _lines_with_pan,
    add_to_outbox,
    batch_totals,
    ensure_outbox_schema,
    export_outbox,
    read_batches,
    record_for,
    render_batch,
    utc_millis,
)


def records(n: int, *, fx: bool = False, start: int = 0) -> list[PostingRecord]:
    events = []
    for i in range(start, start + n):
        txn: dict[str, Any] = {
            "transaction_id": f"TX-{i}",
            "account_id": "UK-BANK-00000001",
            "iban": "GB74TMBK87100256180564",
            "sort_code": "871002",
            "account_number": "56180564",
            "description": f"Card purchase, SHOP {i}, LONDON",
            "amount": {"minor": 1000 + i, "currency": "GBP"},
            "billing_amount": {"minor": 1000 + i, "currency": "GBP"},
            "pan_masked": "476173******0119",
            "merchant_name": 'SHOP "QUOTED", LTD',
            "booking_date": "2026-11-21",
        }
        if fx and i % 2:
            txn["amount"] = {"minor": 5000 + i, "currency": "JPY"}
            txn["billing_amount"] = {"minor": 2600 + i, "currency": "GBP"}
        events.append(
            new_event(
                TransactionApproved(transaction=txn),
                source="t",
                tenant="uk-bank",
                time="2026-11-21T10:00:00.000Z",
            )
        )
    out = assemble(create_legs(events), MemoryLegStore(), now_us=0)
    return [c.record for c in out.completed]


def test_fr8_batch_has_header_one_record_per_entry_controls_and_trailer(tmp_path: Path) -> None:
    path = tmp_path / "postings.csv"
    recs = records(5, fx=True)
    assert PostingFileWriter(path).write_batch("B-1", recs, created_at="2026-11-21T10:00:00Z")
    (batch,) = read_batches(path)
    assert batch["header"] == ["H", "PAYPOST-POSTINGS", "1", "B-1", "2026-11-21T10:00:00Z"]
    details = batch["details"]
    assert len(details) == 5 and [d["seq"] for d in details] == ["1", "2", "3", "4", "5"]
    first = details[0]
    assert first["account_id"] == "UK-BANK-00000001" and first["dr_cr"] == "D"
    assert first["amount_minor"] == "1000" and first["currency"] == "GBP"
    assert first["merchant_name"] == 'SHOP "QUOTED", LTD'  # CSV quoting round-trips
    assert first["value_date"] == "2026-11-21" and first["pan_masked"] == "476173******0119"
    # Control totals per currency: debits == credits (balanced entries), counts of legs.
    controls = {c[2]: c for c in batch["controls"]}
    assert set(controls) == {"GBP", "JPY"}
    gbp = controls["GBP"]
    assert gbp[4] == gbp[6]  # debit total == credit total
    expected_gbp = sum(r.amount_minor for r in recs)
    assert int(gbp[4]) == expected_gbp
    jpy = controls["JPY"]
    assert (
        int(jpy[4])
        == int(jpy[6])
        == sum(r.txn_amount_minor or 0 for r in recs if r.txn_currency == "JPY")
    )
    # Trailer: batch id, record count, sha256 of the detail lines.
    text = path.read_text()
    detail_lines = "".join(line for line in text.splitlines(keepends=True) if line.startswith("D,"))
    assert batch["trailer"] == [
        "T",
        "B-1",
        "5",
        hashlib.sha256(detail_lines.encode()).hexdigest(),
    ]


def test_fr9_same_batch_twice_is_written_once(tmp_path: Path) -> None:
    path = tmp_path / "postings.csv"
    recs = records(3)
    assert PostingFileWriter(path).write_batch("B-1", recs)
    # A restarted process (new writer) learns the batch ids from the file.
    again = PostingFileWriter(path)
    assert again.has_batch("B-1")
    assert again.write_batch("B-1", recs) is False
    assert [b["batch_id"] for b in read_batches(path)] == ["B-1"]


def test_torn_batch_from_a_crash_is_cut_on_restart(tmp_path: Path) -> None:
    path = tmp_path / "postings.csv"
    PostingFileWriter(path).write_batch("B-1", records(2))
    good = path.read_bytes()
    with path.open("ab") as f:  # a crash mid-batch: header and half a record, no trailer
        f.write(b"H,PAYPOST-POSTINGS,1,B-2,2026-11-21T10:00:00Z\nD,1,abc,uk-ba")
    writer = PostingFileWriter(path)
    assert writer.truncated_bytes > 0 and path.read_bytes() == good
    assert not writer.has_batch("B-2")
    assert writer.write_batch("B-2", records(1))
    assert [b["batch_id"] for b in read_batches(path)] == ["B-1", "B-2"]


def test_no_card_number_ever_reaches_the_file(tmp_path: Path) -> None:
    path = tmp_path / "postings.csv"
    (rec,) = records(1)
    leaky = PostingRecord(**{**_fields(rec), "description": "refund card 4111111111111111"})
    with pytest.raises(PostingFileError, match="Luhn-valid"):
        PostingFileWriter(path).write_batch("B-1", [leaky])
    assert not path.exists() or path.read_text() == ""


def _fields(rec: PostingRecord) -> dict[str, Any]:
    return {f: getattr(rec, f) for f in rec.__struct_fields__}


def test_outbox_export_is_exactly_once_across_restarts(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "db.sqlite", isolation_level=None)
    ensure_outbox_schema(conn)
    asm.ensure_schema(conn)
    path = tmp_path / "postings.csv"
    conn.execute("BEGIN")
    add_to_outbox(conn, records(4))
    conn.execute("COMMIT")
    assert export_outbox(conn, PostingFileWriter(path), batch_size=3) == 4
    # More records arrive; the export runs again after a "restart" (a new writer).
    conn.execute("BEGIN")
    add_to_outbox(conn, records(2, start=10))
    conn.execute("COMMIT")
    assert export_outbox(conn, PostingFileWriter(path), batch_size=3) == 2
    assert export_outbox(conn, PostingFileWriter(path)) == 0
    batches = read_batches(path)
    assert [b["batch_id"] for b in batches] == [
        "outbox-000000000001-000000000003",
        "outbox-000000000004-000000000004",
        "outbox-000000000005-000000000006",
    ]
    refs = [d["reference"] for b in batches for d in b["details"]]
    assert refs == ["TX-0", "TX-1", "TX-2", "TX-3", "TX-10", "TX-11"]
    conn.close()


def _iban_gb(bban: str) -> str:
    """A GB IBAN with correct ISO 13616 check digits for BBAN (4 letters + 14 digits)."""
    digits = "".join(str(int(c, 36)) for c in bban + "GB00")
    return f"GB{98 - int(digits) % 97:02d}{bban}"


def test_iban_digit_runs_are_not_card_numbers_but_a_pan_in_the_iban_field_is(
    tmp_path: Path,
) -> None:
    from paypost.security.tokens import luhn_valid

    number = next(
        f"{n:014d}" for n in range(87100256180564, 87100256180664) if luhn_valid(f"{n:014d}")
    )
    (rec,) = records(1)
    ok = PostingRecord(**{**_fields(rec), "iban": _iban_gb("TMBK" + number)})
    assert PostingFileWriter(tmp_path / "a.csv").write_batch("B-1", [ok])
    bad = PostingRecord(**{**_fields(rec), "iban": "4111111111111111"})
    with pytest.raises(PostingFileError, match="not an IBAN"):
        PostingFileWriter(tmp_path / "b.csv").write_batch("B-1", [bad])


def test_verify_accepts_what_the_writer_wrote_and_catches_tampering(tmp_path: Path) -> None:
    from paypost.stages.posting_file import verify_file

    path = tmp_path / "postings.csv"
    writer = PostingFileWriter(path)
    writer.write_batch("B-1", records(3, fx=True))
    writer.write_batch("B-2", records(2, start=10, fx=True))
    check = verify_file(path)
    assert check.ok, check.problems
    assert (check.batches, check.records) == (2, 5)
    assert check.totals["GBP"]["debit"] == check.totals["GBP"]["credit"] > 0
    assert check.totals["JPY"]["debit"] == check.totals["JPY"]["credit"] > 0

    good = path.read_text()
    # An amount changed in a leg: hash and control totals no longer agree.
    tampered = good.replace("UK-BANK-00000001:D:1000:GBP", "UK-BANK-00000001:D:1001:GBP", 1)
    assert tampered != good
    path.write_text(tampered)
    problems = " | ".join(verify_file(path).problems)
    assert "detail hash differs" in problems and "control totals" in problems
    assert "does not balance" in problems
    # The same batch appended again under another id: the entries would post twice.
    lines = good.splitlines(keepends=True)
    again = "".join(lines[: lines.index(next(x for x in lines if x.startswith("T,B-1"))) + 1])
    path.write_text(good + again.replace("B-1", "B-3"))
    assert any("already in batch B-1" in p for p in verify_file(path).problems)
    # A torn tail.
    path.write_text(good + "H,PAYPOST-POSTINGS,1,B-4,2026-11-21T10:00:00Z\nD,1,x")
    problems = " | ".join(verify_file(path).problems)
    assert "no trailer" in problems and "incomplete last line" in problems


def test_line_breaks_in_text_fields_never_split_a_record(tmp_path: Path) -> None:
    from paypost.stages.posting_file import verify_file

    (rec,) = records(1)
    odd = PostingRecord(**{**_fields(rec), "description": "line one\nT,B-9,1,forged\r\nend"})
    path = tmp_path / "postings.csv"
    PostingFileWriter(path).write_batch("B-1", [odd])
    assert verify_file(path).ok
    assert PostingFileWriter(path).batch_ids == ["B-1"]  # recovery is not fooled either
    (batch,) = read_batches(path)
    assert batch["details"][0]["description"] == "line one T,B-9,1,forged end"


def test_postings_verify_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from paypost.cli.postings import app

    path = tmp_path / "postings.csv"
    PostingFileWriter(path).write_batch("B-1", records(2))
    runner = CliRunner()
    ok = runner.invoke(app, ["verify", str(path), "--json"])
    assert ok.exit_code == 0, ok.output
    assert '"ok":true' in ok.stdout and '"records":2' in ok.stdout
    path.write_text(path.read_text().replace("T,B-1,2,", "T,B-1,3,"))
    bad = runner.invoke(app, ["verify", str(path)])
    assert bad.exit_code == 2 and "trailer says 3 records" in bad.output
    assert runner.invoke(app, ["verify", str(tmp_path / "none.csv")]).exit_code == 2


@pytest.mark.postgres
def test_postgres_outbox_exports_exactly_once_even_after_a_crash_between_claim_and_write(
    postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    import psycopg

    from paypost.stages import posting_file_pg as pgo
    from paypost.stages.posting_file import verify_file

    path = tmp_path / "postings.csv"
    with psycopg.connect(postgres_url) as conn:
        pgo.ensure_outbox_schema(conn, pg_schema)
        pgo.add_to_outbox(conn, records(5), pg_schema)
        conn.commit()
        # A crash right after a claim: the batch is claimed but not in the file.
        conn.execute(
            f'UPDATE "{pg_schema}".assembly_posting_outbox SET batch_id = %s '
            "WHERE id IN (SELECT id FROM "
            f'"{pg_schema}".assembly_posting_outbox ORDER BY id LIMIT 2)',
            ("pg-crashed",),
        )
        conn.commit()
        assert pgo.export_outbox(conn, PostingFileWriter(path), schema=pg_schema, batch_size=2) == 5
        pgo.add_to_outbox(conn, records(2, start=20), pg_schema)
        conn.commit()
        assert pgo.export_outbox(conn, PostingFileWriter(path), schema=pg_schema) == 2
        assert pgo.export_outbox(conn, PostingFileWriter(path), schema=pg_schema) == 0
        left = conn.execute(f'SELECT count(*) FROM "{pg_schema}".assembly_posting_outbox')
        assert left.fetchone() == (0,)
    check = verify_file(path)
    assert check.ok and check.records == 7
    refs = [d["reference"] for b in read_batches(path) for d in b["details"]]
    assert sorted(refs) == sorted([f"TX-{i}" for i in range(5)] + ["TX-20", "TX-21"])
    assert read_batches(path)[0]["batch_id"] == "pg-crashed"


# --------------------------------------------------------------------------------------------
# The fast paths taken for the budget (issue 7) give the very same bytes and answers as the
# straightforward code they replace (kept below as the reference, as it was at 3aa5cff).

_REF_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029\x85\x0b\x0c]+")


def _ref_cell(value: Any) -> str:
    return "" if value is None else _REF_LINE_BREAKS.sub(" ", str(value))


def _ref_row(seq: int, r: PostingRecord) -> list[str]:
    for account, *_ in r.legs:
        if "|" in account:
            raise ValueError(f"account id {account!r} contains '|'")
    cells = [_ref_cell(getattr(r, f)) for f in ("iban", "sort_code", "account_number")]
    rest = [
        _ref_cell(getattr(r, f))
        for f in (
            "txn_amount_minor",
            "txn_currency",
            "fx_rate",
            "fx_markup",
            "fx_source",
            "merchant_id",
            "merchant_name",
            "mcc",
            "pan_masked",
            "reference",
            "description",
        )
    ]
    legs = "|".join(f"{a}:{s}:{m}:{c}" for a, s, m, c in r.legs)
    head = ["D", str(seq), r.entry_id, r.tenant, r.booked_at, r.value_date, r.account_id]
    money = [r.side, str(r.amount_minor), r.currency, str(r.fee_minor)]
    return head + cells + money + rest + [legs]


def _ref_render(batch_id: str, recs: list[PostingRecord], created_at: str) -> str:
    rows = [_ref_row(i + 1, r) for i, r in enumerate(recs)]
    if contains_pan("\n".join(",".join(row[:7] + row[8:]) for row in rows)):
        raise PostingFileError("a Luhn-valid card number")

    def lines(rows: list[list[str]]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL).writerows(rows)
        return buf.getvalue()

    details = lines(rows)
    digest = hashlib.sha256(details.encode("utf-8")).hexdigest()
    controls = [
        [
            "C",
            batch_id,
            t.currency,
            str(t.debit_legs),
            str(t.debit_minor),
            str(t.credit_legs),
            str(t.credit_minor),
        ]
        for t in batch_totals(recs)
    ]
    return (
        lines([["H", "PAYPOST-POSTINGS", "1", batch_id, created_at]])
        + details
        + lines(controls)
        + lines([["T", batch_id, str(len(recs)), digest]])
    )


# Characters that make the csv module quote, that `_cell` replaces, non-ASCII ones, and the
# digits, spaces and dashes a card number is made of.
_TRICKY = st.text(
    alphabet=list('ab ,"\r\n\u2028\u2029\x85\x0b\x0c\t\xa0é€:|0123456789-'), max_size=24
)
_OPTIONAL = st.none() | _TRICKY | st.sampled_from(["4111 1111 1111 1111", "GB74TMBK87100256180564"])


@st.composite
def _posting_records(draw: st.DrawFn) -> PostingRecord:
    (rec,) = records(1, start=draw(st.integers(0, 50)))
    fields = _fields(rec)
    for name in (
        "sort_code",
        "account_number",
        "txn_currency",
        "fx_rate",
        "fx_markup",
        "fx_source",
        "merchant_id",
        "merchant_name",
        "mcc",
        "pan_masked",
        "reference",
        "description",
    ):
        fields[name] = draw(_OPTIONAL)
    fields["iban"] = draw(
        st.sampled_from([None, "GB74TMBK87100256180564", "DE89370400440532013000"])
    )
    fields["txn_amount_minor"] = draw(st.none() | st.integers(0, 10**12))
    fields["entry_id"] = draw(st.sampled_from([rec.entry_id, "id,with comma", 'q"uote', "a\nb"]))
    fields["account_id"] = draw(st.sampled_from([rec.account_id, "ACC:1", "x,y"]))
    return PostingRecord(**fields)


@settings(max_examples=300, deadline=None)
@given(st.lists(_posting_records(), min_size=1, max_size=4))
def test_fast_render_writes_the_same_bytes_and_refuses_the_same_batches(
    recs: list[PostingRecord],
) -> None:
    try:
        expected = _ref_render("B-1", recs, "2026-11-21T10:05:00Z")
    except PostingFileError:
        with pytest.raises(PostingFileError):
            render_batch("B-1", recs, "2026-11-21T10:05:00Z")
        return
    assert render_batch("B-1", recs, "2026-11-21T10:05:00Z") == expected


def test_fast_render_same_bytes_for_assembled_records() -> None:
    recs = records(40, fx=True)
    assert render_batch("B-1", recs, "t") == _ref_render("B-1", recs, "t")
    bad = PostingRecord(**{**_fields(recs[0]), "legs": (("A|B", "D", 1, "GBP"),)})
    with pytest.raises(ValueError, match=r"contains '\|'"):
        render_batch("B-1", [bad], "t")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=list("0123456789 -,\né€ab"), max_size=120), st.integers(0, 120))
def test_pan_line_scan_finds_exactly_what_contains_pan_finds(text: str, at: int) -> None:
    for pan in ("", "4111111111111111", "4111 1111 1111 1111", "3782 822463 10005"):
        t = text[:at] + pan + text[at:]
        assert _lines_with_pan(t) == contains_pan(t)


@settings(max_examples=300, deadline=None)
@given(
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from(
            [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
        ),
    )
)
def test_utc_millis_is_isoformat_in_utc(t: datetime) -> None:
    expected = t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert utc_millis(t) == expected


def _ref_record_for(entry: JournalEntry) -> PostingRecord:
    meta = entry.metadata
    roles: list[Any] = list(meta.get("roles") or [])
    customer_legs = [
        leg for i, leg in enumerate(entry.legs) if i < len(roles) and roles[i] == "customer"
    ]
    main = customer_legs[0] if customer_legs else entry.legs[0]
    fees = sum(
        leg.amount.minor
        for leg in customer_legs[1:]
        if leg.amount.currency == main.amount.currency and leg.side == main.side
    )
    assert entry.booked_at is not None
    booked = entry.booked_at
    fx = meta.get("fx") or {}
    amount = meta.get("amount") or {}
    return PostingRecord(
        entry_id=entry.id,
        tenant=entry.tenant,
        booked_at=booked.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        value_date=meta.get("value_date") or booked.astimezone(UTC).date().isoformat(),
        account_id=main.account,
        side="D" if main.side == "debit" else "C",
        amount_minor=main.amount.minor,
        currency=main.amount.currency,
        fee_minor=fees,
        iban=meta.get("iban"),
        sort_code=meta.get("sort_code"),
        account_number=meta.get("account_number"),
        txn_amount_minor=amount.get("minor"),
        txn_currency=amount.get("currency"),
        fx_rate=fx.get("rate"),
        fx_markup=fx.get("markup"),
        fx_source=fx.get("source"),
        merchant_id=meta.get("merchant_id"),
        merchant_name=meta.get("merchant_name"),
        mcc=meta.get("mcc"),
        pan_masked=meta.get("pan_masked"),
        reference=meta.get("transaction_ref"),
        description=entry.description,
        legs=tuple(
            (
                leg.account,
                "D" if leg.side == "debit" else "C",
                leg.amount.minor,
                leg.amount.currency,
            )
            for leg in entry.legs
        ),
    )


_ROLES = st.sampled_from(["customer", "settlement", "fees", None])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["debit", "credit"]),
            st.integers(1, 10**6),
            st.sampled_from(["GBP", "JPY"]),
            _ROLES,
        ),
        min_size=1,
        max_size=6,
    ),
    st.integers(0, 7),
    st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=-3))])),
    st.sampled_from([None, "2026-11-20"]),
)
def test_record_for_gives_the_same_record(
    legs: list[tuple[str, int, str, str | None]],
    n_roles: int,
    booked: datetime,
    value_date: str | None,
) -> None:
    metadata: dict[str, Any] = {
        "roles": [role for *_, role in legs][:n_roles],
        "value_date": value_date,
        "amount": {"minor": 5, "currency": "JPY"},
        "fx": {"rate": "0.0052", "markup": "0.01", "source": "ECB"},
        "iban": "GB74TMBK87100256180564",
        "merchant_name": "TESCO",
        "transaction_ref": "TX-1",
    }
    entry = JournalEntry(
        id="e-1",
        tenant="uk-bank",
        legs=tuple(
            Leg(account=f"A-{i}", side=side, amount=Money(minor, cur))  # type: ignore[arg-type]
            for i, (side, minor, cur, _) in enumerate(legs)
        ),
        booked_at=booked,
        description="Card purchase",
        metadata=metadata,
    )
    assert record_for(entry) == _ref_record_for(entry)


def test_outbox_rows_with_or_without_empty_fields_decode_to_the_same_record() -> None:
    decoder = msgspec.json.Decoder(PostingRecord)
    for rec in records(3, fx=True):
        full = msgspec.json.encode(msgspec.structs.asdict(rec))  # how rows were written before
        compact = msgspec.json.encode(rec)
        assert len(compact) < len(full) and b"null" not in compact
        assert decoder.decode(full) == decoder.decode(compact) == rec


def test_outbox_keeps_the_records_in_order_whatever_their_number() -> None:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    ensure_outbox_schema(conn)
    recs = records(237)
    decoder = msgspec.json.Decoder(PostingRecord)
    given: list[PostingRecord] = []
    for n in (0, 1, 9, 10, 11, 100, 106):  # 237 in all: every statement size and remainder
        add_to_outbox(conn, recs[len(given) : len(given) + n])
        given += recs[len(given) : len(given) + n]
    rows = conn.execute("SELECT id, record FROM assembly_posting_outbox ORDER BY id").fetchall()
    assert [i for i, _ in rows] == list(range(1, 238))
    assert [decoder.decode(blob) for _, blob in rows] == given == recs
