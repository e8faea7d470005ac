"""FR1, FR11, NFR6: ingest adapters, pairing, checkpoints, quarantine, tokenization at the edge."""

from __future__ import annotations

import dataclasses
import json
import random
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paypost.events import AuthorizationApproved, Event, derive_event_id, detail_of
from paypost.iso import iso8583 as iso
from paypost.iso.generate import (
    GeneratedAuthorization,
    card_numbers,
    csv_lines,
    generate_authorizations,
    iso8583_request,
    iso8583_response,
    jsonl_lines,
    record_of,
)
from paypost.iso.generate import _response_fields as iso8583_response_fields
from paypost.security.tokens import Tokenizer, VaultKeys, find_pans
from paypost.stages import ingest as ingest_stage
from paypost.stages.ingest import (
    IngestBatch,
    IngestSourceError,
    MemoryIngestStore,
    SourceConfig,
    SqliteIngestStore,
    TableFeedReader,
    ensure_schema,
    open_reader,
)

KEYS = VaultKeys.from_master(bytes(range(32)))
VISA = "4111111111111111"
MC = "5555555555554444"
T0 = datetime(2026, 11, 21, 10, 0, 0, tzinfo=UTC)


def auth(i: int = 1, **over: object) -> GeneratedAuthorization:
    base = GeneratedAuthorization(
        tenant="bank-a",
        pan=VISA,
        stan=f"{i:06d}",
        transmitted=T0 + timedelta(seconds=i),
        acquirer_id="10000001",
        amount_minor=1050,
        currency="GBP",
        billing_amount_minor=None,
        billing_currency=None,
        merchant_id="MRC000000000042",
        merchant_name="TESCO STORES 3021",
        mcc="5411",
        merchant_city="LONDON",
        merchant_country="GB",
        terminal_id="T0000001",
        rrn="263250000001",
        issuing_country="826",
        response_code="00",
        approval_code="A1B2C3",
        responded=T0 + timedelta(seconds=i, milliseconds=300),
    )
    return dataclasses.replace(base, **over)  # type: ignore[arg-type]


def req_line(a: GeneratedAuthorization, at: datetime | None = None) -> str:
    return iso.format_log_line(iso.format_utc(at or a.transmitted), iso8583_request(a))


def resp_line(a: GeneratedAuthorization, at: datetime | None = None) -> str:
    return iso.format_log_line(iso.format_utc(at or a.responded), iso8583_response(a))


def write(tmp_path: Path, lines: list[str], name: str = "auth.log") -> Path:
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines))
    return p


def cfg(fmt: str = "iso8583", **over: object) -> SourceConfig:
    return SourceConfig(name="switch-a", tenant="bank-a", format=fmt, **over)  # type: ignore[arg-type]


def run(
    path: Path, config: SourceConfig, store: MemoryIngestStore | None = None, final: bool = True
) -> tuple[list[Event], MemoryIngestStore, list[IngestBatch]]:
    store = store or MemoryIngestStore()
    reader = open_reader(config, KEYS, path=path, checkpoint=store.load_checkpoint(config.name))
    events: list[Event] = []
    batches = []
    for batch in reader.batches(final=final):
        store.apply(batch)
        events.extend(batch.events)
        batches.append(batch)
    return events, store, batches


# ------------------------------------------------------------------------------------------
# ISO 8583 log


def test_FR1_approved_pair_yields_exactly_one_event_with_request_and_response(
    tmp_path: Path,
) -> None:
    a = auth(1, billing_amount_minor=1207, billing_currency="EUR", currency="GBP")
    events, store, _ = run(write(tmp_path, [req_line(a), resp_line(a)]), cfg())
    assert len(events) == 1
    ev = events[0]
    d = detail_of(ev, AuthorizationApproved)
    tok = Tokenizer(KEYS.token_key).tokenize(VISA, "bank-a")
    assert d.request.card_token == tok.token and d.request.pan_masked == "411111******1111"
    assert d.request.amount.minor == 1050 and d.request.amount.currency == "GBP"
    assert d.request.billing_amount is not None and d.request.billing_amount.currency == "EUR"
    assert d.request.stan == "000001" and d.request.acquirer_id == "10000001"
    assert d.request.merchant.name == "TESCO STORES 3021" and d.request.merchant.mcc == "5411"
    assert d.request.merchant.country == "GB" and d.request.issuing_country == "GB"
    assert d.response.response_code == "00" and d.response.approval_code == "A1B2C3"
    assert d.request.transmission_time == "2026-11-21T10:00:01Z"
    assert ev.time == d.request.transmission_time  # the authorization's time, not now()
    assert ev.tenant == "bank-a" and ev.detail_type == "AuthorizationApproved"
    assert ev.id == derive_event_id("ingest:switch-a@2", "ingest", 0)
    assert VISA not in msgspec.json.encode(ev).decode()
    # The vault got the card once, sealed.
    assert list(store.vault) == [tok.token]
    assert store.checkpoints["switch-a"].counters.approved == 1


def test_FR1_declined_pair_yields_no_event_but_is_counted(tmp_path: Path) -> None:
    ok, declined = auth(1), auth(2, response_code="51", approval_code=None)
    lines = [req_line(ok), req_line(declined), resp_line(declined), resp_line(ok)]
    events, store, _ = run(write(tmp_path, lines), cfg())
    assert [detail_of(e, AuthorizationApproved).request.stan for e in events] == ["000001"]
    c = store.checkpoints["switch-a"].counters
    assert (c.records, c.approved, c.declined, c.quarantined) == (4, 1, 1, 0)


def test_FR1_pairs_on_stan_transmission_time_and_acquirer(tmp_path: Path) -> None:
    # Same STAN at another acquirer, and same STAN + acquirer at another time: three auths.
    a = auth(1, amount_minor=100)
    b = auth(1, acquirer_id="20000007", amount_minor=200)
    c = dataclasses.replace(
        auth(1, amount_minor=300),
        transmitted=a.transmitted + timedelta(seconds=5),
        responded=a.responded + timedelta(seconds=5),
    )
    lines = [
        req_line(a),
        req_line(b),
        req_line(c, a.transmitted + timedelta(seconds=1)),
        resp_line(c),
        resp_line(b),
        resp_line(a),
    ]
    events, _, _ = run(write(tmp_path, lines), cfg())
    amounts = [detail_of(e, AuthorizationApproved).request.amount.minor for e in events]
    assert amounts == [300, 200, 100]


def test_FR1_request_without_response_is_reported_after_the_timeout(tmp_path: Path) -> None:
    lost = auth(1)
    later = auth(2, transmitted=T0 + timedelta(seconds=200), responded=T0 + timedelta(seconds=201))
    lines = [req_line(lost), req_line(later), resp_line(later)]
    events, store, _ = run(write(tmp_path, lines), cfg(response_timeout_s=60), final=False)
    assert len(events) == 1
    [q] = store.quarantine
    assert q.kind == "response-timeout" and q.line == 1 and "60 s" in q.reason
    assert store.checkpoints["switch-a"].counters.timed_out == 1
    assert VISA not in q.record and "411111******1111" in q.record


def test_FR1_unanswered_request_stays_pending_until_final(tmp_path: Path) -> None:
    a = auth(1)
    path = write(tmp_path, [req_line(a)])
    _, store, _ = run(path, cfg(), final=False)
    cp = store.checkpoints["switch-a"]
    assert len(cp.pending) == 1 and not store.quarantine
    assert VISA not in msgspec.json.encode(cp).decode()  # pending state is tokenized
    _, store, _ = run(path, cfg(), store=store, final=True)
    assert [q.kind for q in store.quarantine] == ["response-timeout"]
    assert "end of the log" in store.quarantine[0].reason
    assert store.checkpoints["switch-a"].pending == []


def test_response_without_request_is_quarantined(tmp_path: Path) -> None:
    a = auth(1)
    events, store, _ = run(write(tmp_path, [resp_line(a)]), cfg())
    assert events == []
    [q] = store.quarantine
    assert q.kind == "orphan-response" and q.line == 1


def test_duplicate_logged_twice_yields_two_events_with_distinct_ids(tmp_path: Path) -> None:
    a = auth(1)
    later = a.responded + timedelta(seconds=5)
    lines = [req_line(a), resp_line(a), req_line(a, later), resp_line(a, later)]
    events, _, _ = run(write(tmp_path, lines), cfg())
    assert len(events) == 2 and events[0].id != events[1].id
    d0, d1 = (detail_of(e, AuthorizationApproved) for e in events)
    assert d0.request == d1.request  # same business data: the dedup stage parks the copy


def test_malformed_lines_are_quarantined_with_pans_masked_and_ingestion_goes_on(
    tmp_path: Path,
) -> None:
    a = auth(1)
    truncated = req_line(auth(2))[:-40]
    lines = [
        "this is not a log line at all 4111 1111 1111 1111",
        truncated,
        "2026-11-21T10:00:00Z " + b"0800 4111111111111111".hex(),
        req_line(a),
        resp_line(a),
    ]
    events, store, _ = run(write(tmp_path, lines), cfg())
    assert len(events) == 1
    assert [q.line for q in store.quarantine] == [1, 2, 3]
    assert {q.kind for q in store.quarantine} == {"malformed"}
    for q in store.quarantine:
        assert find_pans(q.record) == [] and VISA not in q.record.replace(" ", "")
        assert q.reason
    assert "2='411111******1111'" in store.quarantine[1].record  # decoded, masked
    assert "undecoded=" in store.quarantine[1].record


def test_NFR6_pan_in_another_iso_field_quarantines_the_message(tmp_path: Path) -> None:
    smuggled = auth(1, merchant_name=f"SHOP {MC}")
    amex_id = auth(2, merchant_id="378282246310005")
    ok = auth(3)
    lines = [
        req_line(smuggled),
        resp_line(smuggled),
        req_line(amex_id),
        resp_line(amex_id),
        req_line(ok),
        resp_line(ok),
    ]
    events, store, _ = run(write(tmp_path, lines), cfg())
    assert len(events) == 1
    kinds = [(q.line, q.kind) for q in store.quarantine]
    assert kinds == [
        (1, "pan-in-field"),
        (2, "orphan-response"),
        (3, "pan-in-field"),
        (4, "orphan-response"),
    ]
    assert "43" in store.quarantine[0].reason and "42" in store.quarantine[2].reason
    assert "was quarantined" in store.quarantine[1].reason
    for q in store.quarantine:
        assert MC not in q.record and "378282246310005" not in q.record


def test_FR1_resume_from_checkpoint_without_re_emitting(tmp_path: Path) -> None:
    cards = {"bank-a": card_numbers(20)}
    auths = list(generate_authorizations(cards, 300, seed=3, unanswered_rate=0.02))
    from paypost.iso.generate import iso8583_log_lines

    path = write(tmp_path, list(iso8583_log_lines(auths)))
    config = cfg(batch_size=37)
    full, full_store, _ = run(path, config)

    # Crash after 3 committed batches: the 4th batch's effects never reached the store.
    store = MemoryIngestStore()
    reader = open_reader(config, KEYS, path=path)
    first: list[Event] = []
    for n, batch in enumerate(reader.batches(final=True)):
        if n == 3:
            break
        store.apply(batch)
        first.extend(batch.events)
    assert store.checkpoints["switch-a"].pending  # a request awaits its response across batches
    rest, store, _ = run(path, config, store=store)
    ids = [e.id for e in first + rest]
    assert len(ids) == len(set(ids))
    assert msgspec.json.encode(first + rest) == msgspec.json.encode(full)
    assert store.checkpoints["switch-a"].counters == full_store.checkpoints["switch-a"].counters
    assert [q.line for q in store.quarantine] == [q.line for q in full_store.quarantine]


def test_FR1_re_reading_yields_byte_identical_events(tmp_path: Path) -> None:
    from paypost.iso.generate import iso8583_log_lines

    auths = list(generate_authorizations({"bank-a": card_numbers(5)}, 100, seed=1))
    path = write(tmp_path, list(iso8583_log_lines(auths)))
    one, _, _ = run(path, cfg())
    two, _, _ = run(path, cfg())
    assert len(one) > 80
    assert msgspec.json.encode(one) == msgspec.json.encode(two)


def test_FR11_realtime_mode_checkpoints_every_record(tmp_path: Path) -> None:
    lines = [line for i in range(1, 4) for line in (req_line(auth(i)), resp_line(auth(i)))]
    _, _, batches = run(write(tmp_path, lines), cfg(mode="realtime"))
    assert [b.counts.records for b in batches] == [1] * 6
    assert [len(b.events) for b in batches] == [0, 1] * 3
    assert [b.checkpoint.line for b in batches if b.checkpoint] == [1, 2, 3, 4, 5, 6]
    _, _, batches = run(write(tmp_path, lines), cfg(mode="batch"))
    assert [b.counts.records for b in batches] == [6]


def test_partial_last_line_is_left_for_the_next_read(tmp_path: Path) -> None:
    a = auth(1)
    path = tmp_path / "auth.log"
    path.write_text(req_line(a) + "\n" + resp_line(a)[:30])
    events, store, _ = run(path, cfg(), final=False)
    assert events == [] and store.checkpoints["switch-a"].line == 1
    path.write_text(req_line(a) + "\n" + resp_line(a) + "\n")
    events, store, _ = run(path, cfg(), store=store, final=False)
    assert len(events) == 1 and not store.quarantine


def test_checkpoint_past_the_end_of_a_replaced_file_is_a_clear_error(tmp_path: Path) -> None:
    a = auth(1)
    path = write(tmp_path, [req_line(a), resp_line(a)])
    _, store, _ = run(path, cfg())
    path.write_text("")
    with pytest.raises(IngestSourceError, match="replaced or truncated"):
        run(path, cfg(), store=store)


def test_fast_decoder_agrees_with_pyiso8583() -> None:
    rng = random.Random(7)
    auths = list(generate_authorizations({"bank-a": card_numbers(10)}, 200, seed=2))
    raws = [m for a in auths for m in (iso8583_request(a), iso8583_response(a))]
    raws.append(iso.encode_message({"t": "0100", "2": VISA, "70": "301", "100": "12345"}))
    for raw in list(raws):  # mutations: truncations and flipped bytes
        cut = rng.randrange(len(raw))
        raws.append(raw[:cut])
        flip = bytearray(raw)
        flip[rng.randrange(len(raw))] = rng.randrange(256)
        raws.append(bytes(flip))
    for raw in raws:
        try:
            ref: dict[str, str] | None = iso.decode_message_reference(raw)
        except iso.Iso8583FormatError:
            ref = None
        fast = iso._decode_fast(raw)
        if fast is not None:
            assert fast == ref, raw


# ------------------------------------------------------------------------------------------
# JSON Lines and CSV


def test_FR1_jsonl_records_with_tenant_per_record(tmp_path: Path) -> None:
    a, b = auth(1), auth(2, tenant="bank-b", response_code="05", approval_code=None)
    c = auth(3, tenant="bank-b")
    path = write(tmp_path, list(jsonl_lines([a, b, c])), "auths.jsonl")
    events, store, _ = run(path, cfg("jsonl"))
    assert [e.tenant for e in events] == ["bank-a", "bank-b"]
    da, dc = (detail_of(e, AuthorizationApproved) for e in events)
    assert da.request.card_token != dc.request.card_token  # same card, other tenant
    assert store.checkpoints["switch-a"].counters.declined == 1
    assert events[0].id == derive_event_id("ingest:switch-a@0", "ingest", 0)


def test_jsonl_bad_records_are_quarantined_with_reason_and_line(tmp_path: Path) -> None:
    good = record_of(auth(1))
    bad_amount = {**good, "amount_minor": "10.50"}
    unknown = {**good, "note": "call me"}
    smuggled = {**good, "terminal_id": f"T {VISA}"}
    bad_pan = {**good, "pan": "41111111111111x1"}
    lines = [
        json.dumps(good),
        "{not json 4111111111111111",
        json.dumps(bad_amount),
        json.dumps(unknown),
        json.dumps(smuggled),
        json.dumps(bad_pan),
        "",
    ]
    events, store, _ = run(write(tmp_path, lines, "a.jsonl"), cfg("jsonl"))
    assert len(events) == 1
    got = [(q.line, q.kind) for q in store.quarantine]
    assert got == [
        (2, "malformed"),
        (3, "malformed"),
        (4, "malformed"),
        (5, "pan-in-field"),
        (6, "malformed"),
    ]
    assert "amount_minor" in store.quarantine[1].reason
    assert "terminal_id" in store.quarantine[3].reason
    for q in store.quarantine:
        assert VISA not in q.record and not find_pans(q.record)
        assert "411111" in q.record  # masked, still recognisable
    assert store.checkpoints["switch-a"].counters.records == 6


def test_FR1_csv_records(tmp_path: Path) -> None:
    auths = [auth(1), auth(2, response_code="05", approval_code=None), auth(3)]
    lines = list(csv_lines(auths))
    lines.append(lines[1].replace("1050", "ten"))
    events, store, _ = run(write(tmp_path, lines, "a.csv"), cfg("csv"))
    assert len(events) == 2
    assert [(q.line, q.kind) for q in store.quarantine] == [(5, "malformed")]
    assert VISA not in store.quarantine[0].record
    assert events[0].id == derive_event_id(f"ingest:switch-a@{len(lines[0]) + 1}", "ingest", 0)


def test_csv_with_unknown_columns_is_a_clear_error(tmp_path: Path) -> None:
    path = write(tmp_path, ["pan,stan,colour", f"{VISA},1,red"], "a.csv")
    with pytest.raises(IngestSourceError, match="colour") as err:
        run(path, cfg("csv"))
    assert "missing columns" in str(err.value)


# ------------------------------------------------------------------------------------------
# Table feed


def _insert(conn: sqlite3.Connection, auths: list[GeneratedAuthorization]) -> None:
    rows = [record_of(a) for a in auths]
    cols = list(rows[0])
    conn.executemany(
        f"INSERT INTO ingest_authorizations ({', '.join(cols)}) "
        f"VALUES ({', '.join('?' for _ in cols)})",
        [[r.get(c) for c in cols] for r in rows],
    )
    conn.commit()


def test_FR1_table_change_feed_resumes_by_row_id_and_scrubs_pans(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "p.db")
    ensure_schema(conn)
    _insert(conn, [auth(1), auth(2, pan=MC), auth(3, response_code="05", approval_code=None)])
    config = cfg("table", batch_size=2)
    store = SqliteIngestStore(conn)

    def drain() -> list[Event]:
        reader = TableFeedReader(conn, config, KEYS, store.load_checkpoint(config.name))
        out: list[Event] = []
        for batch in reader.batches():
            store.apply(batch)
            conn.commit()
            out.extend(batch.events)
        return out

    first = drain()
    assert len(first) == 2 and first[0].id == derive_event_id("ingest:switch-a@1", "ingest", 0)
    assert drain() == []  # nothing new: nothing re-emitted
    _insert(conn, [auth(4)])
    [ev] = drain()
    assert detail_of(ev, AuthorizationApproved).source_ref == "switch-a#row4"
    pans = [r[0] for r in conn.execute("SELECT pan FROM ingest_authorizations")]
    assert pans == ["411111******1111", "555555******4444", "411111******1111", "411111******1111"]
    assert store.load_checkpoint("switch-a").counters.declined == 1  # type: ignore[union-attr]
    conn.close()


def test_FR1_shipped_samples_ingest_as_documented() -> None:
    examples = Path(__file__).resolve().parents[2] / "examples"
    events, store, _ = run(examples / "auth-log.sample.iso8583", cfg())
    c = store.checkpoints["switch-a"].counters
    assert (c.approved, c.declined, c.timed_out, c.quarantined) == (4, 1, 1, 2)
    assert len(events) == 4
    assert sorted(q.kind for q in store.quarantine) == ["malformed", "response-timeout"]
    currencies = {detail_of(e, AuthorizationApproved).request.amount.currency for e in events}
    assert currencies == {"GBP", "EUR"}
    for fmt, name in (
        ("jsonl", "authorizations.sample.jsonl"),
        ("csv", "authorizations.sample.csv"),
    ):
        events, store, _ = run(examples / name, cfg(fmt))
        assert len(events) == 4 and store.checkpoints["switch-a"].counters.declined == 1


def test_events_built_from_plain_data_equal_the_catalog_structs(tmp_path: Path) -> None:
    """The hot path builds details as dicts: they must be exactly what the structs give."""
    from paypost.events import new_event
    from paypost.iso.generate import iso8583_log_lines

    auths = list(
        generate_authorizations({"bank-a": card_numbers(5)}, 200, seed=8, foreign_rate=0.5)
    )
    path = write(tmp_path, list(iso8583_log_lines(auths)))
    jl = write(tmp_path, list(jsonl_lines(auths)), "a.jsonl")
    events = run(path, cfg())[0] + run(jl, cfg("jsonl"))[0]
    assert any(e.detail["request"]["billing_amount"] for e in events)
    for e in events:
        detail = detail_of(e, AuthorizationApproved)
        assert msgspec.to_builtins(detail) == e.detail
        rebuilt = new_event(detail, source=e.source, tenant=e.tenant, id=e.id, time=e.time)
        assert msgspec.json.encode(rebuilt) == msgspec.json.encode(e)


def test_fast_encoder_agrees_with_pyiso8583() -> None:
    from paypost.iso.generate import _request_fields, _response_fields

    auths = list(
        generate_authorizations({"bank-a": card_numbers(10)}, 300, seed=5, foreign_rate=0.3)
    )
    docs = [f(a) for a in auths for f in (_request_fields, _response_fields)]
    docs.append({"t": "0100", "2": VISA, "70": "301", "100": "12345"})
    for doc in docs:
        assert iso._encode_fast(doc) is not None
        assert iso.encode_message(doc) == iso.encode_message_reference(doc)
    # Unusual input goes to pyiso8583, which explains what is wrong.
    with pytest.raises(iso.Iso8583FormatError):
        iso.encode_message({"t": "0100", "4": "12"})  # fixed field of the wrong length


def test_response_with_another_card_is_quarantined_and_the_request_waits(tmp_path: Path) -> None:
    a = auth(1)
    wrong = dataclasses.replace(a, pan=MC)
    fields = {**iso8583_response_fields(wrong), "2": MC}
    bad_resp = iso.format_log_line(iso.format_utc(a.responded), iso.encode_message(fields))
    events, store, _ = run(write(tmp_path, [req_line(a), bad_resp, resp_line(a)]), cfg())
    assert len(events) == 1  # the real response still pairs
    [q] = store.quarantine
    assert q.kind == "pan-mismatch" and "555555******4444" in q.reason and MC not in q.record


def test_csv_header_with_byte_order_mark(tmp_path: Path) -> None:
    lines = list(csv_lines([auth(1)]))
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    events, _, _ = run(path, cfg("csv"))
    assert len(events) == 1


def _split_log_line(line: str) -> tuple[str, bytes] | str:
    """The log-line parser before its fast path (issue 7): split on whitespace, then fromhex."""
    parts = line.split()
    if len(parts) != 2:
        return f"fields:{len(parts)}"
    try:
        return parts[0], bytes.fromhex(parts[1])
    except ValueError:
        return "hex"


@settings(max_examples=800, deadline=None)
@given(
    st.lists(
        st.sampled_from(["2026-11-21T10:00:00Z", "0a", "F", "3031", " ", "  ", "\t", "\x1c", "\x85",
                         "\xa0", "g", "Z"]),
        max_size=8,
    )
)  # fmt: skip
def test_log_line_fast_path_parses_exactly_as_the_split(parts: list[str]) -> None:
    line = "".join(parts)
    try:
        got: tuple[str, bytes] | str = iso.parse_log_line(line)
    except iso.Iso8583FormatError as exc:
        got = "hex" if "hexadecimal" in str(exc) else f"fields:{str(exc).split()[-2]}"
    assert got == _split_log_line(line)


_EDIT_CHARS = "0123456789-T:.Zx \n\u0660\u00b2"


@settings(max_examples=800, deadline=None)
@given(
    st.sampled_from(["2026-11-21T10:15:02Z", "2026-11-21T10:15:02.123Z"]),
    st.lists(
        st.tuples(st.integers(0, 30), st.sampled_from(_EDIT_CHARS), st.booleans()), max_size=3
    ),
)
def test_canonical_utc_check_agrees_with_the_regex(
    base: str, edits: list[tuple[int, str, bool]]
) -> None:
    text = list(base)
    for at, ch, insert in edits:
        if insert:
            text.insert(min(at, len(text)), ch)
        elif text:
            text[min(at, len(text) - 1)] = ch
    s = "".join(text)
    regex = ingest_stage._CANONICAL_UTC.fullmatch(s) is not None
    assert ingest_stage._is_canonical_utc(s) == regex
