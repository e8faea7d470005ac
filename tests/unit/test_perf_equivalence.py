"""Performance shortcuts taken for the budget (issue 7) give the very same answers as the
straightforward code they replace."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from paypost.bench import bench_rulebook, generate_sources
from paypost.demo import demo_refdata
from paypost.events import (
    EVENT_ID_NAMESPACE,
    AuthorizationAccepted,
    AuthorizationRequest,
    AuthorizationResponse,
    Event,
    Merchant,
    TransactionEnriched,
    TransactionFlagged,
    new_event,
)
from paypost.iso import iso20022
from paypost.money import Money
from paypost.pipeline import PipelineSettings
from paypost.runner import POSTING_FILE, Job
from paypost.security.tokens import contains_pan
from paypost.stages import rules
from paypost.stages.enrich import EnrichedTransaction, enrich
from paypost.stages.posting_file import (
    PostingFileWriter,
    PostingRecord,
    _lines_with_pan,
    add_to_outbox,
    verify_file,
)

PANS = ["4111111111111111", "4111 1111 1111 1111", "5500-0000-0000-0004", "3782 822463 10005"]


@settings(max_examples=400, deadline=None)
@given(
    st.text(alphabet="0123456789 -,\nab", max_size=160),
    st.sampled_from(["", *PANS]),
    st.integers(min_value=0, max_value=160),
)
def test_line_prefilter_finds_exactly_what_contains_pan_finds(text: str, pan: str, at: int) -> None:
    k = min(at, len(text))
    text = text[:k] + pan + text[k:]
    assert _lines_with_pan(text) == contains_pan(text)


def test_line_prefilter_on_posting_lines() -> None:
    clean = "D,1,8dc26c59-81ac-5813-9c80-040518949679,de-bank,2026-11-21,DE-BANK-1:D:2710:USD"
    assert not _lines_with_pan(clean + "\n" + clean)
    assert _lines_with_pan(clean + "\n" + clean.replace("de-bank", "4111 1111 1111 1111"))


def _record(entry_id: str) -> PostingRecord:
    return PostingRecord(
        entry_id=entry_id,
        tenant="uk-bank",
        booked_at="2026-11-21T10:00:00.000Z",
        value_date="2026-11-21",
        account_id="UK-BANK-00000001",
        side="D",
        amount_minor=100,
        currency="GBP",
        legs=(("UK-BANK-00000001", "D", 100, "GBP"), ("settlement-GBP", "C", 100, "GBP")),
    )


def test_kept_posting_writer_reopens_after_another_writer(tmp_path: Path) -> None:
    """The pipeline keeps its posting-file writer between exports (no rescan of the whole
    file each time); when someone else appended to the file, it reopens: nothing is lost or
    written twice."""
    key = bytes(range(32))
    sources = generate_sources(600, key, 2, "batch", tmp_path, in_process=True)
    refdata = demo_refdata(600, key, 2).refdata
    job = Job(tmp_path / "d", refdata, bench_rulebook(refdata), PipelineSettings("batch"), key)
    try:
        job.run(sources)
        path = job.data_dir / POSTING_FILE
        before = verify_file(path).records
        assert before > 0
        PostingFileWriter(path).write_batch("manual-1", [_record("manual-entry-1")])
        with job.bus.unit_of_work() as uow:
            add_to_outbox(uow.conn, [_record("outbox-entry-2")])
        assert job.pipeline.export_postings() == 1
        assert job.pipeline.export_postings() == 0
        check = verify_file(path)
        assert check.problems == []
        assert check.records == before + 2
        assert job.pipeline._posting_writer().has_batch("manual-1")
    finally:
        job.close()


# --- standardize (FR5): the checks and cleaning of free text, with and without fast paths ----

# Printable ASCII (the fast paths), control characters, DEL, spaces, Unicode (incl. digits of
# other scripts and a lone surrogate): everything the reference code treats differently.
TEXT_ALPHABET = st.sampled_from(
    [
        *"aZ09 -_*X.,/",
        *("\t", "\n", "\r", "\x00", "\x1f", "\x7f", "\x85", "\xa0", "\u2028"),
        *("é", "٣", "\ud800", "\ufffe", "\U0001f600"),
    ]
)
any_text = st.text(alphabet=TEXT_ALPHABET, max_size=60) | st.text(max_size=60)


def reference_clean_text(text: str, limit: int) -> str:
    return iso20022._CONTROL_RE.sub(" ", text).strip()[:limit].strip()


def reference_check_id(value: str | None, path: str, limit: int) -> list[iso20022.Problem]:
    problems: list[iso20022.Problem] = []
    if value is None:
        return problems
    if not value.strip():
        problems.append(iso20022.Problem(path, "empty"))
    elif len(value) > limit:
        problems.append(iso20022.Problem(path, f"longer than {limit} characters"))
    elif iso20022._CONTROL_RE.search(value):
        problems.append(iso20022.Problem(path, "contains control characters"))
    return problems


@settings(max_examples=500, deadline=None)
@given(any_text, st.sampled_from([1, 5, 35, 100, 140]))
def test_clean_text_fast_path_equals_the_regex(text: str, limit: int) -> None:
    assert iso20022._clean_text(text, limit) == reference_clean_text(text, limit)
    assert iso20022._clean_base(text)[:limit].strip() == reference_clean_text(text, limit)


@settings(max_examples=500, deadline=None)
@given(st.none() | any_text, st.sampled_from([3, 35, 38]))
def test_check_id_fast_path_equals_the_full_checks(value: str | None, limit: int) -> None:
    problems: list[iso20022.Problem] = []
    iso20022._check_id(value, "request.stan", limit, problems)
    assert problems == reference_check_id(value, "request.stan", limit)


@settings(max_examples=500, deadline=None)
@given(
    st.text(alphabet=st.sampled_from([*"0123456789", "0", "1", " ", "\x1f", "٣", "a"])) | any_text
)
def test_digit_run_scan_equals_the_regex(text: str) -> None:
    assert iso20022._has_digit_run(text) == bool(iso20022._DIGIT_RUN_RE.search(text))


@settings(max_examples=300, deadline=None)
@given(
    st.from_regex(
        r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})\Z"
    )
    | any_text
)
def test_cached_datetime_check_equals_regex_and_parse(value: str) -> None:
    expected = bool(iso20022._DATETIME_RE.fullmatch(value))
    if expected:
        try:
            datetime.fromisoformat(value)
        except ValueError:
            expected = False
    for _ in range(2):  # the second answer comes from the cache
        problems: list[iso20022.Problem] = []
        iso20022._check_time(value, "time", problems)
        assert (not problems) == expected


def reference_compact_id(input_id: str) -> str:
    try:
        hexid = uuid.UUID(input_id).hex
    except ValueError:
        hexid = uuid.uuid5(EVENT_ID_NAMESPACE, input_id).hex
    return f"{hexid[:8]}-{hexid[8:16]}-{hexid[16:24]}-{hexid[24:]}"


def uuid_variants(u: uuid.UUID) -> st.SearchStrategy[str]:
    """A UUID as uuid.UUID reads it (upper case, braces, urn:, dashes anywhere) or almost."""
    text = str(u)
    return st.sampled_from(
        [
            text,
            text.upper(),
            u.hex,
            "{" + text + "}",
            "urn:uuid:" + text,
            text.replace("-", "") + "--",
            "-" + u.hex[:7] + "-" + u.hex[7:],
            text[:8] + " " + text[9:],  # a space where a dash was: 35 characters
            u.hex[:30] + " " + u.hex[30:],  # 32 hex digits and a space
            "+" + u.hex[1:],
            u.hex[:31] + "g",
            u.hex[:10] + "_" + u.hex[11:],
        ]
    )


@settings(max_examples=300, deadline=None)
@given(st.uuids().flatmap(uuid_variants) | st.text(max_size=60))
def test_compact_id_and_uetr_equal_their_uuid_definitions(input_id: str) -> None:
    assert iso20022._compact_id(input_id) == reference_compact_id(input_id)
    u = uuid.UUID(bytes=uuid.uuid5(EVENT_ID_NAMESPACE, f"{input_id}/standardize/uetr").bytes)
    stamped = uuid.UUID(int=(u.int & ~(0xF << 76)) | (4 << 76))  # version nibble 4
    assert iso20022.derive_uetr(input_id) == str(stamped)
    assert hashlib.sha1(iso20022._NS_BYTES).digest() == iso20022._NS_SHA1.digest()


def reference_merchant_and_remittance(req: AuthorizationRequest) -> tuple[dict[str, Any], str]:
    """What the builder wrote before the merchant's name and city were cleaned only once."""
    mer = req.merchant
    party: dict[str, Any] = {"Nm": reference_clean_text(mer.name, 140)}
    address: dict[str, str] = {}
    if mer.city:
        town = reference_clean_text(mer.city, 35)
        if town:
            address["TwnNm"] = town
    if mer.country and iso20022._ALPHA2_RE.fullmatch(mer.country):
        address["Ctry"] = mer.country
    if address:
        party["PstlAdr"] = address
    party["Id"] = {"OrgId": {"Othr": [{"Id": mer.id, "SchmeNm": {"Prtry": "MERCHANT_ID"}}]}}
    parts = (reference_clean_text(mer.city or "", 35), mer.country or "")
    where = " ".join(p for p in parts if p)
    text = f"CARD {req.pan_masked[-4:]} {reference_clean_text(mer.name, 100)}"
    if where:
        text = f"{text}, {where}"
    return party, text[:140]


@settings(max_examples=300, deadline=None)
@given(
    name=any_text.filter(lambda t: bool(reference_clean_text(t, 140))),
    city=st.none() | any_text,
    country=st.sampled_from([None, "", "FR", "fr", "826"]),
    when=st.sampled_from(
        [
            "2026-11-21T09:15:30Z",
            "2026-11-21T23:59:59.999Z",
            "2026-11-21T23:30:00-02:00",
            "2026-11-22T00:30:00+02:00",
            "2026-11-21T10:00:00+00:00",
        ]
    ),
)
def test_builder_merchant_remittance_and_date_equal_the_reference(
    name: str, city: str | None, country: str | None, when: str
) -> None:
    req = AuthorizationRequest(
        stan="004711",
        transmission_time=when,
        acquirer_id="445566",
        card_token="tok_9f2c1d7e5b",
        pan_masked="411111******1111",
        amount=Money(1050, "EUR"),
        merchant=Merchant(id="MERCH0001", name=name, mcc="5462", city=city, country=country),
        issuing_country="FR",
    )
    auth = AuthorizationAccepted(
        request=req,
        response=AuthorizationResponse(response_code="00", approval_code="A1"),
        business_key="bk-1",
    )
    doc = iso20022.build_pacs008(
        auth, input_id=str(uuid.uuid4()), event_time=when, message_id="m-1"
    )
    tx = iso20022.transaction_of(doc)
    party, remittance = reference_merchant_and_remittance(req)
    assert tx["Cdtr"] == party
    assert tx["RmtInf"] == {"Ustrd": [remittance]}
    booked = datetime.fromisoformat(when).astimezone(UTC).date().isoformat()
    assert tx["IntrBkSttlmDt"] == booked


# --- enrich (FR6) and rules: plain data built directly, in the catalog's shape ---------------


def test_enriched_transaction_dict_is_the_struct_as_plain_data(tmp_path: Path) -> None:
    """Every enriched transaction of a demo run (domestic, foreign currency, refunds, ...) is
    exactly `msgspec.to_builtins(EnrichedTransaction(...))`: same keys, same order, same JSON."""
    key = bytes(range(32))
    refdata = demo_refdata(400, key, 3).refdata
    job = Job(tmp_path / "d", refdata, bench_rulebook(refdata), PipelineSettings("batch"), key)
    seen: list[Event] = []
    handler = job.pipeline.handlers["enrich"]

    def keep(events: list[Event], uow: Any) -> list[Event]:
        seen.extend(events)
        return handler(events, uow)

    job.pipeline.handlers["enrich"] = keep
    try:
        job.run(generate_sources(400, key, 3, "batch", tmp_path, in_process=True))
    finally:
        job.close()
    outputs = enrich(seen, refdata)
    fields = [f.encode_name for f in msgspec.structs.fields(EnrichedTransaction)]
    kinds = set()
    for out in outputs:
        if out.detail_type != "TransactionEnriched":
            continue
        txn = out.detail["transaction"]
        kinds.add((txn["direction"], txn["currency_conversion"]))
        assert list(txn) == fields
        as_struct = msgspec.convert(txn, EnrichedTransaction)
        assert msgspec.to_builtins(as_struct) == txn
        assert msgspec.json.encode(as_struct) == msgspec.json.encode(txn)
    assert ("debit", False) in kinds and ("debit", True) in kinds


def _enriched_event(correlation_id: str) -> Event:
    txn = {"transaction_id": "txn-1", "mcc": "7995", "amount": {"minor": 1, "currency": "USD"}}
    event = new_event(
        TransactionEnriched(transaction=txn, refdata_version="v1"),
        source="paypost.enrich",
        tenant="bank-uk",
        time="2026-11-21T10:00:00.000Z",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    return msgspec.structs.replace(event, correlation_id=correlation_id)


def test_flag_notifications_equal_new_event_of_the_struct() -> None:
    for correlation_id in ("corr-1", ""):
        event = _enriched_event(correlation_id)
        decision = rules.Decision(
            action="hold",
            rule="r1",
            reason="why",
            flags=(("UnusualMerchantTypeDetected", "r2"), ("ForeignTransactionDetected", "r3")),
        )
        outputs = rules.decision_events(event, decision)
        for i, (flag, rule) in enumerate(decision.flags, start=1):
            reference = new_event(
                TransactionFlagged(flag=flag, rule=rule, transaction_id="txn-1"),
                source=rules.SOURCE,
                tenant=event.tenant,
                id=outputs[i].id,
                correlation_id=event.correlation_id,
                causation_id=event.id,
                traceparent=event.traceparent,
                time=event.time,
                detail_type=flag,
            )
            assert msgspec.json.encode(outputs[i]) == msgspec.json.encode(reference)


def test_plain_approval_is_the_default_decision() -> None:
    book = rules.parse_rules("rules: []")
    decision = book.decide(_enriched_event("corr-1"))
    assert decision == rules.Decision(action="approve", rule=None, reason=None, flags=())


def test_stage_sinks_get_exactly_the_outputs_for_hot_encoding(tmp_path: Path) -> None:
    """With `sink=EncodedEvents().append` each stage returns what it returns without, and the
    encoded bodies are `encode_event` of those outputs, in order (what `publish` archives)."""
    from paypost.bus.core import EncodedEvents, encode_event
    from paypost.stages.rules import apply_rules
    from paypost.stages.standardize import standardize

    key = bytes(range(32))
    refdata = demo_refdata(300, key, 5).refdata
    book = bench_rulebook(refdata)
    job = Job(tmp_path / "d", refdata, book, PipelineSettings("batch"), key)
    seen: dict[str, list[Event]] = {"standardize": [], "enrich": [], "rules": []}
    for name, kept in seen.items():
        handler = job.pipeline.handlers[name]

        def keep(events: list[Event], uow: Any, handler: Any = handler, kept: Any = kept) -> Any:
            kept.extend(events)
            return handler(events, uow)

        job.pipeline.handlers[name] = keep
    try:
        job.run(generate_sources(300, key, 5, "batch", tmp_path, in_process=True))
    finally:
        job.close()
    runs = {
        "standardize": lambda events, **kw: standardize(events, **kw),
        "enrich": lambda events, **kw: enrich(events, refdata, **kw),
        "rules": lambda events, **kw: apply_rules(events, book, **kw),
    }
    for name, run in runs.items():
        assert seen[name], name
        plain = run(seen[name])
        encoded = EncodedEvents()
        assert run(seen[name], sink=encoded.append) == plain
        assert encoded.events() == plain
        assert encoded.bodies == [encode_event(e) for e in plain]
