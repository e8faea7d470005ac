"""FR5: accepted authorizations become ISO 20022 pacs.008.001.08 messages (or a clear rejection)."""

from __future__ import annotations

import copy
import json
import re
import uuid
from typing import Any
from xml.etree import ElementTree

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from paypost.events import (
    AuthorizationAccepted,
    AuthorizationRequest,
    AuthorizationResponse,
    Event,
    Merchant,
    SchemaRef,
    StandardizationRejected,
    TransactionStandardized,
    derive_event_id,
    detail_of,
)
from paypost.iso.iso20022 import (
    XsdInvalid,
    card_data,
    decimal_amount,
    instructed_amount,
    is_credit_to_cardholder,
    minor_from_decimal,
    render_xml,
    settlement_amount,
    transaction_of,
    validate_xml,
)
from paypost.money import CURRENCY_EXPONENTS, Money
from paypost.stages.standardize import standardize

CLEAR_PAN = "4111111111111111"  # Luhn-valid test PAN: must never appear in any output
UUID_V4 = re.compile(r"[a-f0-9]{8}-[a-f0-9]{4}-4[a-f0-9]{3}-[89ab][a-f0-9]{3}-[a-f0-9]{12}")


def accepted_detail(**request_overrides: Any) -> dict[str, Any]:
    request = AuthorizationRequest(
        stan="004711",
        transmission_time="2026-11-21T09:15:30Z",
        acquirer_id="445566",
        card_token="tok_9f2c1d7e5b",
        pan_masked="411111******1111",
        amount=Money(1050, "EUR"),
        merchant=Merchant(
            id="MERCH0001", name="Boulangerie Dupont", mcc="5462", city="Lyon", country="FR"
        ),
        terminal_id="TERM0042",
        rrn="632509004711",
        issuing_country="FR",
    )
    detail = msgspec.to_builtins(
        AuthorizationAccepted(
            request=request,
            response=AuthorizationResponse(
                response_code="00", approval_code="A1B2C3", responded_at="2026-11-21T09:15:31.250Z"
            ),
            business_key="bk-1",
        )
    )
    detail["request"].update(request_overrides)
    assert isinstance(detail, dict)
    return detail


def accepted_event(detail: dict[str, Any] | None = None) -> Event:
    """An AuthorizationAccepted envelope (fresh id) around DETAIL, which may be malformed."""
    return Event(
        id=str(uuid.uuid4()),
        source="paypost.dedup",
        detail_type="AuthorizationAccepted",
        time="2026-11-21T09:15:32.000Z",
        tenant="bank-fr",
        correlation_id="corr-123",
        schema=SchemaRef(name="AuthorizationAccepted", version=1),
        detail=detail if detail is not None else accepted_detail(),
        causation_id="approved-event-id",
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )


def only(events: list[Event]) -> Event:
    assert len(events) == 1
    return events[0]


def standardized_doc(event: Event) -> dict[str, Any]:
    assert event.detail_type == "TransactionStandardized", event.detail
    doc: dict[str, Any] = detail_of(event, TransactionStandardized).pacs008
    return doc


# --- XSD validity -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "expected_text"),
    [
        (Money(1050, "EUR"), "10.50"),
        (Money(5, "EUR"), "0.05"),
        (Money(1500, "JPY"), "1500"),
        (Money(12345, "BHD"), "12.345"),
        (Money(7, "BHD"), "0.007"),
        (Money(999_999_999_999, "USD"), "9999999999.99"),
    ],
)
def test_fr5_rendered_xml_validates_against_xsd_in_several_currencies(
    amount: Money, expected_text: str
) -> None:
    out = only(standardize([accepted_event(accepted_detail(amount=msgspec.to_builtins(amount)))]))
    doc = standardized_doc(out)
    tx = transaction_of(doc)
    assert tx["IntrBkSttlmAmt"] == {"@Ccy": amount.currency, "#text": expected_text}
    assert tx["InstdAmt"] == {"@Ccy": amount.currency, "#text": expected_text}
    assert "XchgRate" not in tx
    xml = render_xml(doc)
    validate_xml(xml)
    assert f'<IntrBkSttlmAmt Ccy="{amount.currency}">{expected_text}</IntrBkSttlmAmt>' in (
        xml.decode()
    )
    assert settlement_amount(doc) == amount


def test_fr5_foreign_currency_settles_billing_amount_with_exchange_rate() -> None:
    # A JPY purchase billed to a EUR card: the cardholder is booked EUR 92.34.
    detail = accepted_detail(
        amount={"minor": 15000, "currency": "JPY"},
        billing_amount={"minor": 9234, "currency": "EUR"},
    )
    doc = standardized_doc(only(standardize([accepted_event(detail)])))
    tx = transaction_of(doc)
    assert tx["IntrBkSttlmAmt"] == {"@Ccy": "EUR", "#text": "92.34"}
    assert tx["InstdAmt"] == {"@Ccy": "JPY", "#text": "15000"}
    assert tx["XchgRate"] == "0.006156"  # 92.34 / 15000, exact decimal arithmetic
    assert settlement_amount(doc) == Money(9234, "EUR")
    assert instructed_amount(doc) == Money(15000, "JPY")
    validate_xml(render_xml(doc))


def test_fr5_foreign_currency_into_three_decimal_currency() -> None:
    detail = accepted_detail(
        amount={"minor": 2599, "currency": "USD"},
        billing_amount={"minor": 9801, "currency": "BHD"},
    )
    doc = standardized_doc(only(standardize([accepted_event(detail)])))
    tx = transaction_of(doc)
    assert tx["IntrBkSttlmAmt"] == {"@Ccy": "BHD", "#text": "9.801"}
    assert tx["XchgRate"] == "0.3771065795"  # 9.801 / 25.99 to 10 decimals, half-even
    validate_xml(render_xml(doc))


def test_fr5_same_currency_billing_amount_has_no_exchange_rate() -> None:
    detail = accepted_detail(billing_amount={"minor": 1080, "currency": "EUR"})
    tx = transaction_of(standardized_doc(only(standardize([accepted_event(detail)]))))
    assert tx["IntrBkSttlmAmt"] == {"@Ccy": "EUR", "#text": "10.80"}
    assert tx["InstdAmt"] == {"@Ccy": "EUR", "#text": "10.50"}
    assert "XchgRate" not in tx  # ISO rule InstructedAmountAndExchangeRate2


def test_fr5_refund_credits_the_cardholder_and_validates() -> None:
    doc = standardized_doc(
        only(standardize([accepted_event(accepted_detail(processing_code="200000"))]))
    )
    tx = transaction_of(doc)
    assert is_credit_to_cardholder(doc)
    assert tx["CdtrAcct"]["Id"]["Othr"]["Id"] == "9f2c1d7e5b"  # Max34Text: prefix dropped
    assert tx["Dbtr"]["Nm"] == "Boulangerie Dupont"
    assert tx["Purp"] == {"Cd": "REFU"}
    validate_xml(render_xml(doc))


def test_fr5_mapping_of_parties_ids_and_card_data() -> None:
    event = accepted_event()
    out = only(standardize([event]))
    detail = detail_of(out, TransactionStandardized)
    doc = detail.pacs008
    tx = transaction_of(doc)

    def grouped(event_id: str) -> str:  # 32 hex digits in groups of 8: no 13-digit run
        h = event_id.replace("-", "")
        return f"{h[:8]}-{h[8:16]}-{h[16:24]}-{h[24:]}"

    assert doc["GrpHdr"]["MsgId"] == detail.message_id == grouped(out.id)
    assert doc["GrpHdr"]["CreDtTm"] == event.time
    assert doc["GrpHdr"]["NbOfTxs"] == "1"
    assert tx["PmtId"]["EndToEndId"] == "632509004711"  # the RRN
    assert tx["PmtId"]["TxId"] == grouped(event.id)
    assert UUID_V4.fullmatch(tx["PmtId"]["UETR"])
    assert tx["IntrBkSttlmDt"] == "2026-11-21"
    assert tx["AccptncDtTm"] == "2026-11-21T09:15:31.250Z"
    assert tx["DbtrAcct"]["Id"]["Othr"] == {
        "Id": "9f2c1d7e5b",  # Max34Text: the token without its prefix
        "SchmeNm": {"Prtry": "CARD_TOKEN"},
    }
    assert tx["DbtrAgt"]["FinInstnId"]["Othr"]["Id"] == "411111"
    assert tx["CdtrAgt"]["FinInstnId"]["Othr"]["Id"] == "445566"
    assert tx["Cdtr"]["PstlAdr"] == {"TwnNm": "Lyon", "Ctry": "FR"}
    assert tx["Purp"] == {"Cd": "GDSV"}
    card = card_data(doc)
    assert card["MrchntCtgyCd"] == "5462"
    assert card["STAN"] == "004711"
    assert card["ApprvlCd"] == "A1B2C3"
    assert not is_credit_to_cardholder(doc)


@pytest.mark.parametrize("masked", ["411111XXXXXX1111", "41111111****1111", "541333*******4242"])
def test_fr5_masked_pan_forms_are_accepted_and_issuer_is_the_iin(masked: str) -> None:
    doc = standardized_doc(only(standardize([accepted_event(accepted_detail(pan_masked=masked))])))
    assert transaction_of(doc)["DbtrAgt"]["FinInstnId"]["Othr"]["Id"] == masked[:6]
    assert card_data(doc)["MskdPAN"] == masked


def test_fr5_hostile_merchant_text_is_escaped_and_still_validates() -> None:
    detail = accepted_detail()
    detail["request"]["merchant"]["name"] = 'A&B <Shop>\r\n\t"quoted" \x00\x07 ' + "x" * 200
    detail["request"]["merchant"]["city"] = "Saint-Rémy-de-Provence-sur-les-Alpilles-et-au-delà"
    doc = standardized_doc(only(standardize([accepted_event(detail)])))
    tx = transaction_of(doc)
    assert len(tx["Cdtr"]["Nm"]) == 140
    assert "\x00" not in tx["Cdtr"]["Nm"]
    assert len(tx["Cdtr"]["PstlAdr"]["TwnNm"]) <= 35
    xml = render_xml(doc)
    validate_xml(xml)
    # What a reader of the XML gets back is exactly what travels on the bus.
    ns = {"p": "urn:iso:std:iso:20022:tech:xsd:pacs.008.001.08"}
    root = ElementTree.fromstring(xml)
    assert (
        root.findtext("p:FIToFICstmrCdtTrf/p:CdtTrfTxInf/p:Cdtr/p:Nm", namespaces=ns)
        == (tx["Cdtr"]["Nm"])
    )


def test_fr5_xsd_validation_is_not_vacuous() -> None:
    doc = standardized_doc(only(standardize([accepted_event()])))
    broken = copy.deepcopy(doc)
    broken["CdtTrfTxInf"][0]["PmtId"]["UETR"] = "not-a-uuid"
    with pytest.raises(XsdInvalid, match="UETR"):
        validate_xml(render_xml(broken))
    broken = copy.deepcopy(doc)
    del broken["CdtTrfTxInf"][0]["ChrgBr"]
    with pytest.raises(XsdInvalid):
        validate_xml(render_xml(broken))


# --- determinism ----------------------------------------------------------------------------


def test_fr5_reprocessing_yields_identical_output() -> None:
    event = accepted_event()
    first = standardize([event])
    second = standardize([Event.from_dict(json.loads(json.dumps(event.to_dict())))])
    assert msgspec.json.encode(first) == msgspec.json.encode(second)
    doc = standardized_doc(first[0])
    assert render_xml(doc) == render_xml(standardized_doc(second[0]))
    out = first[0]
    assert out.id == derive_event_id(event.id, "standardize", 0)
    assert out.time == event.time
    assert out.tenant == "bank-fr"
    assert out.correlation_id == "corr-123"
    assert out.causation_id == event.id
    assert out.traceparent == event.traceparent
    assert out.source == "paypost.standardize"


def test_fr5_distinct_authorizations_get_distinct_message_ids_and_uetrs() -> None:
    outs = standardize([accepted_event() for _ in range(50)])
    docs = [standardized_doc(o) for o in outs]
    assert len({d["GrpHdr"]["MsgId"] for d in docs}) == 50
    assert len({transaction_of(d)["PmtId"]["UETR"] for d in docs}) == 50


# --- rejections -----------------------------------------------------------------------------


def rejection_of(event: Event) -> StandardizationRejected:
    out = only(standardize([event]))
    assert out.detail_type == "StandardizationRejected"
    assert out.id == derive_event_id(event.id, "standardize", 0)
    assert out.causation_id == event.id
    return detail_of(out, StandardizationRejected)


def test_fr5_missing_mandatory_fields_are_all_named() -> None:
    detail = accepted_detail()
    del detail["request"]["stan"]
    del detail["request"]["merchant"]["name"]
    del detail["request"]["card_token"]
    rejected = rejection_of(accepted_event(detail))
    assert rejected.missing == ["request.card_token", "request.merchant.name", "request.stan"]
    assert "request.stan: missing" in rejected.reason


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (
            lambda d: d["request"].update(amount={"minor": 0, "currency": "EUR"}),
            "request.amount.minor",
        ),
        (
            lambda d: d["request"].update(amount={"minor": 100, "currency": "XXQ"}),
            "request.amount.currency",
        ),
        (
            lambda d: d["request"].update(amount={"minor": "1.50", "currency": "EUR"}),
            "request.amount.minor",
        ),
        (lambda d: d["request"].update(transmission_time="yesterday"), "request.transmission_time"),
        (lambda d: d["request"].update(stan=""), "request.stan"),
        (lambda d: d["request"].update(card_token="t" * 40), "request.card_token"),
        (lambda d: d["request"].update(processing_code="310000"), "request.processing_code"),
        (lambda d: d["request"]["merchant"].update(mcc="food"), "request.merchant.mcc"),
        (lambda d: d["request"]["merchant"].update(mcc="５４６２"), "request.merchant.mcc"),
        (lambda d: d["request"].update(pan_masked="411111*"), "request.pan_masked"),
        (lambda d: d["request"].update(pan_masked="************1111"), "request.pan_masked"),
        (lambda d: d["request"]["merchant"].update(name="  \x01 "), "request.merchant.name"),
        (lambda d: d["response"].update(response_code="05"), "response.response_code"),
        (lambda d: d.pop("response"), "response"),
    ],
)
def test_fr5_invalid_data_is_rejected_naming_the_field(mutate: Any, field: str) -> None:
    detail = accepted_detail()
    mutate(detail)
    rejected = rejection_of(accepted_event(detail))
    assert field in rejected.missing
    assert field in rejected.reason


def test_fr5_wrong_event_type_is_rejected_not_crashed() -> None:
    event = msgspec.structs.replace(accepted_event(), detail_type="TransactionEnriched")
    assert rejection_of(event).missing == ["detail-type"]
    assert rejection_of(msgspec.structs.replace(accepted_event(), detail={})).missing == [
        "business_key",
        "request",
        "response",
    ]


def test_fr5_batch_with_one_bad_event_still_standardizes_the_others() -> None:
    bad = accepted_detail()
    del bad["request"]["amount"]
    events = [accepted_event(), accepted_event(bad), accepted_event()]
    outs = standardize(events)
    assert [o.detail_type for o in outs] == [
        "TransactionStandardized",
        "StandardizationRejected",
        "TransactionStandardized",
    ]
    assert [o.causation_id for o in outs] == [e.id for e in events]
    assert detail_of(outs[1], StandardizationRejected).missing == ["request.amount"]
    for out in (outs[0], outs[2]):
        validate_xml(render_xml(standardized_doc(out)))


# --- no clear PAN (NFR6, DESIGN §3.4) -------------------------------------------------------


def luhn_hits(text: str) -> list[str]:
    def luhn(digits: str) -> bool:
        total = 0
        for i, ch in enumerate(reversed(digits)):
            d = int(ch) * (2 if i % 2 else 1)
            total += d - 9 if d > 9 else d
        return total % 10 == 0

    hits = []
    for m in re.finditer(r"\d{13,19}", text):
        run = m.group()
        hits += [
            run[i:j]
            for i in range(len(run))
            for j in range(i + 13, min(len(run), i + 19) + 1)
            if luhn(run[i:j])
        ]
    return hits


def test_fr5_no_clear_pan_in_standardized_output_or_xml() -> None:
    outs = standardize(
        [accepted_event(), accepted_event(accepted_detail(processing_code="200000"))]
    )
    for out in outs:
        text = msgspec.json.encode(out).decode() + render_xml(standardized_doc(out)).decode()
        assert luhn_hits(text) == []
        assert "411111******1111" in text  # only the masked form and the token travel
        assert "tok_9f2c1d7e5b" in text


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("request", "pan_masked"), CLEAR_PAN),
        (("request", "card_token"), CLEAR_PAN),
        (("request", "merchant", "name"), f"SHOP {CLEAR_PAN} PARIS"),
        (("request", "terminal_id"), CLEAR_PAN),
        (("response", "approval_code"), CLEAR_PAN),
    ],
)
def test_fr5_clear_pan_smuggled_in_any_field_is_rejected_without_echoing_it(
    path: tuple[str, ...], value: str
) -> None:
    detail = accepted_detail()
    target = detail
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    out = only(standardize([accepted_event(detail)]))
    assert out.detail_type == "StandardizationRejected"
    assert ".".join(path) in detail_of(out, StandardizationRejected).missing
    assert CLEAR_PAN not in msgspec.json.encode(out).decode()


# --- properties -----------------------------------------------------------------------------


@given(
    minor=st.integers(min_value=0, max_value=10**18 - 1),
    currency=st.sampled_from(sorted(CURRENCY_EXPONENTS)),
)
def test_fr5_decimal_amount_round_trips_exactly(minor: int, currency: str) -> None:
    text = decimal_amount(minor, currency)
    assert minor_from_decimal(text, currency) == minor
    exp = CURRENCY_EXPONENTS[currency]
    assert ("." in text) == (exp > 0)
    if exp:
        assert len(text.split(".")[1]) == exp


def test_fr5_decimal_amount_refuses_negative_and_excess_decimals() -> None:
    with pytest.raises(ValueError):
        decimal_amount(-1, "EUR")
    with pytest.raises(ValueError):
        minor_from_decimal("1.5", "JPY")


any_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=60)
# Mostly printable text (so most examples standardize), sometimes anything at all.
printable = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1, max_size=200
)
text_st = printable | any_text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=text_st,
    city=st.none() | text_st,
    token=st.text(alphabet="abcdef0123456789_", min_size=1, max_size=34) | any_text,
    stan=st.from_regex(r"\A[0-9]{6}\Z") | any_text,
    minor=st.integers(min_value=1, max_value=10**12) | st.integers(min_value=-5, max_value=10**19),
    currency=st.sampled_from(["EUR", "JPY", "BHD", "USD"]),
    billing=st.none()
    | st.tuples(st.integers(min_value=1, max_value=10**12), st.sampled_from(["EUR", "JPY", "BHD"])),
    processing_code=st.sampled_from(["000000", "010000", "090000", "200000", "260000", "31000"]),
)
def test_fr5_any_input_yields_valid_xml_or_a_named_rejection(
    name: str,
    city: str | None,
    token: str,
    stan: str,
    minor: int,
    currency: str,
    billing: tuple[int, str] | None,
    processing_code: str,
) -> None:
    detail = accepted_detail(
        card_token=token,
        stan=stan,
        processing_code=processing_code,
        amount={"minor": minor, "currency": currency},
        billing_amount=None if billing is None else {"minor": billing[0], "currency": billing[1]},
    )
    detail["request"]["merchant"].update(name=name, city=city)
    out = only(standardize([accepted_event(detail)]))
    if out.detail_type == "TransactionStandardized":
        validate_xml(render_xml(standardized_doc(out)))
    else:
        rejected = detail_of(out, StandardizationRejected)
        assert rejected.missing, rejected.reason


# --- CLI ------------------------------------------------------------------------------------


def test_fr5_cli_renders_valid_xml_of_a_standardized_event(tmp_path: Any) -> None:
    from paypost.cli import _register, app

    _register()
    out_event = only(standardize([accepted_event()]))
    event_file = tmp_path / "event.json"
    event_file.write_text(json.dumps(out_event.to_dict()))
    xml_file = tmp_path / "msg.xml"
    runner = CliRunner()
    result = runner.invoke(
        app, ["iso20022", "render", str(event_file), "--out", str(xml_file), "--validate"]
    )
    assert result.exit_code == 0, result.output
    validate_xml(xml_file.read_bytes())
    assert xml_file.read_bytes() == render_xml(standardized_doc(out_event))

    # An accepted authorization is standardized on the fly; a rejection is a clear error.
    result = runner.invoke(app, ["iso20022", "render", json.dumps(accepted_event().to_dict())])
    assert result.exit_code == 0, result.output
    assert "<FIToFICstmrCdtTrf>" in result.output
    bad = accepted_detail()
    del bad["request"]["stan"]
    result = runner.invoke(app, ["iso20022", "render", json.dumps(accepted_event(bad).to_dict())])
    assert result.exit_code != 0
    assert "request.stan" in str(result.exception) + result.output
