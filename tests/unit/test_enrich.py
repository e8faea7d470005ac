"""FR6: enrichment adds account, branch, holder, product, description, merchant and FX from
versioned reference data; an unknown account or a missing rate holds the transaction."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import msgspec
import pytest
from schwifty import IBAN

from paypost.events import (
    AuthorizationAccepted,
    AuthorizationRequest,
    AuthorizationResponse,
    Event,
    Merchant,
    TransactionEnriched,
    derive_event_id,
    detail_of,
    new_event,
)
from paypost.money import Money
from paypost.refdata.generate import GeneratedCard, generate_refdata
from paypost.refdata.model import RefData
from paypost.security.tokens import Tokenizer
from paypost.stages.enrich import enrich, enrich_one
from paypost.stages.standardize import standardize_one


@dataclass(frozen=True)
class _Token:
    token: str
    masked: str


class ShortTokenizer:
    """The real tokenizer, token cut to the 34 characters pacs.008 account ids allow."""

    def __init__(self) -> None:
        self._inner = Tokenizer(b"test-key-0123456789abcdef-0123456")

    def tokenize(self, pan: str, tenant: str) -> _Token:
        ct = self._inner.tokenize(pan, tenant)
        return _Token(ct.token, ct.masked)


@pytest.fixture(scope="module")
def generated() -> tuple[RefData, list[GeneratedCard]]:
    g = generate_refdata(60, seed=7, tokenizer=ShortTokenizer())
    return g.refdata, g.cards


def card_of(
    cards: list[GeneratedCard], refdata: RefData, tenant: str, currency: str
) -> GeneratedCard:
    for c in cards:
        if c.tenant == tenant and refdata.accounts[c.account_id].currency == currency:
            return c
    raise AssertionError(f"no {currency} card for {tenant}")


def standardized(
    card: GeneratedCard | None,
    *,
    tenant: str | None = None,
    amount: Money = Money(1250, "GBP"),
    merchant: Merchant | None = None,
    processing_code: str = "000000",
    token: str | None = None,
) -> Event:
    merchant = merchant or Merchant(
        id="M-GB-000101", name="Tesco Stores 3041", mcc="5411", city="London", country="826"
    )
    detail = AuthorizationAccepted(
        request=AuthorizationRequest(
            stan="004711",
            transmission_time="2026-11-21T10:15:00Z",
            acquirer_id="ACQ0001",
            card_token=token or (card.token if card else "tok_unknown"),
            pan_masked=card.masked if card else "475129******0000",
            processing_code=processing_code,
            amount=amount,
            merchant=merchant,
            issuing_country="GB",
        ),
        response=AuthorizationResponse(response_code="00", approval_code="AB12CD"),
        business_key="0011223344556677",
    )
    accepted = new_event(
        detail,
        source="paypost.dedup",
        tenant=tenant or (card.tenant if card else "uk-bank"),
        time="2026-11-21T10:15:01Z",
    )
    out = standardize_one(accepted)
    assert out.detail_type == "TransactionStandardized", out.detail
    return out


def test_fr6_gbp_card_payment_gets_account_branch_product_merchant(
    generated: tuple[RefData, list[GeneratedCard]],
) -> None:
    refdata, cards = generated
    card = card_of(cards, refdata, "uk-bank", "GBP")
    account = refdata.accounts[card.account_id]
    ev = standardized(card)
    out = enrich_one(ev, refdata)
    assert out.detail_type == "TransactionEnriched"
    assert out.id == derive_event_id(ev.id, "enrich", 0)
    assert (out.causation_id, out.correlation_id, out.time) == (ev.id, ev.correlation_id, ev.time)
    assert out.detail["refdata_version"] == refdata.version_id
    assert detail_of(out, TransactionEnriched).refdata_version == refdata.version_id
    assert out.schema.name == "TransactionEnriched"
    t = out.detail["transaction"]
    assert t["tenant"] == "uk-bank"
    assert t["account_id"] == account.id
    assert t["iban"] == account.iban and IBAN(t["iban"], validate_bban=True)
    assert t["sort_code"] == account.sort_code and len(t["sort_code"]) == 6
    assert t["branch_id"] == account.branch_id
    assert t["branch_name"] == refdata.branches[account.branch_id].name
    assert t["product_type"] == account.product_type
    assert t["holder_id"] == account.holder_id
    assert t["holder_name"] is None  # not on the bus unless the tenant allows it
    assert t["description"] == "CARD PAYMENT TO TESCO STORES 3041 LONDON 21 NOV 2026"
    assert t["merchant_id"] == "M-GB-000101"
    assert t["mcc"] == "5411"
    assert t["mcc_description"] == "Groceries and supermarkets"
    assert t["merchant_country"] == "GB"  # from ISO 3166 numeric 826
    assert t["foreign"] is False
    assert t["amount"] == {"minor": 1250, "currency": "GBP"}
    assert t["billing_amount"] == {"minor": 1250, "currency": "GBP"}
    assert t["currency_conversion"] is False and t["fx"] is None
    assert t["card_token"] == card.token and t["pan_masked"] == card.masked
    assert t["issuing_country"] == "GB"
    assert t["direction"] == "debit"
    assert t["high_value"] is False


def test_fr6_eur_card_abroad_is_foreign_without_conversion(
    generated: tuple[RefData, list[GeneratedCard]],
) -> None:
    refdata, cards = generated
    card = card_of(cards, refdata, "euro-bank", "EUR")
    rewe = Merchant(id="M-DE-000301", name="REWE", mcc="5411", city="Berlin", country="276")
    out = enrich_one(standardized(card, amount=Money(4599, "EUR"), merchant=rewe), refdata)
    t = out.detail["transaction"]
    assert t["merchant_name"] == "REWE MARKT"  # the merchants file's clean name wins
    assert t["merchant_country"] == "DE"
    assert t["foreign"] is True
    assert t["billing_amount"] == {"minor": 4599, "currency": "EUR"}
    assert t["fx"] is None
    assert t["sort_code"] == refdata.accounts[card.account_id].sort_code


def test_fr6_foreign_currency_is_converted_with_provenance(
    generated: tuple[RefData, list[GeneratedCard]],
) -> None:
    refdata, cards = generated
    card = card_of(cards, refdata, "uk-bank", "GBP")
    deli = Merchant(id="M-US-000401", name="KATZS DELI", mcc="5812", city="New York", country="840")
    out = enrich_one(standardized(card, amount=Money(2500, "USD"), merchant=deli), refdata)
    assert out.detail_type == "TransactionEnriched"
    t = out.detail["transaction"]
    assert t["currency_conversion"] is True
    fx = t["fx"]
    # Only GBP/USD 1.2920 is quoted: USD→GBP is its exact inverse, plus the tenant's 2.75 %.
    assert Fraction(fx["rate"]) == 1 / Fraction("1.2920")
    assert "BoE" in fx["source"] and "inverse" in fx["source"]
    assert fx["markup"] == "0.0275"
    assert fx["as_of"].startswith("2026-11-20T16:00")
    exact = Fraction(2500) / Fraction("1.2920") * Fraction("1.0275")
    assert Fraction(fx["exact"]) == exact
    assert t["billing_amount"] == {"minor": round(exact), "currency": "GBP"}
    assert Fraction(fx["residue"]) == exact - round(exact)
    assert fx["at_mid"] + fx["markup_amount"] + fx["rounding"] == t["billing_amount"]["minor"]
    assert t["amount"] == {"minor": 2500, "currency": "USD"}
    assert t["description"].endswith("21 NOV 2026 USD 25.00")
    assert t["mcc_description"] == "Eating places and restaurants"
    assert t["foreign"] is True


def test_fr6_refund_is_a_credit(generated: tuple[RefData, list[GeneratedCard]]) -> None:
    refdata, cards = generated
    card = card_of(cards, refdata, "uk-bank", "GBP")
    out = enrich_one(standardized(card, processing_code="200000"), refdata)
    t = out.detail["transaction"]
    assert t["direction"] == "credit"
    assert t["description"].startswith("CARD REFUND FROM TESCO STORES 3041")


def test_fr6_unknown_account_is_held_with_reason(
    generated: tuple[RefData, list[GeneratedCard]],
) -> None:
    refdata, _ = generated
    ev = standardized(None, token="tok_nobodyhasthiscard")
    out = enrich_one(ev, refdata)
    assert out.detail_type == "TransactionHeld"
    assert out.id == derive_event_id(ev.id, "enrich", 0)
    assert out.detail["stage"] == "enrich"
    assert out.detail["reason"].startswith("unknown_account:")
    assert "tok_nobodyhasthiscard" in out.detail["reason"]


def test_fr6_missing_rate_is_held(generated: tuple[RefData, list[GeneratedCard]]) -> None:
    refdata, cards = generated
    card = card_of(cards, refdata, "uk-bank", "GBP")
    out = enrich_one(standardized(card, amount=Money(50000, "THB")), refdata)
    assert out.detail_type == "TransactionHeld"
    assert out.detail["reason"].startswith("missing_rate: no FX rate THB/GBP")


def test_fr6_unknown_tenant_and_invalid_payload_are_held(
    generated: tuple[RefData, list[GeneratedCard]],
) -> None:
    refdata, cards = generated
    card = card_of(cards, refdata, "uk-bank", "GBP")
    ev = standardized(card, tenant="nobody-bank")
    assert enrich_one(ev, refdata).detail["reason"].startswith("unknown_tenant:")
    broken = Event.from_dict({**ev.to_dict(), "detail": {"message_id": "x", "pacs008": {}}})
    held = enrich_one(broken, refdata)
    assert held.detail_type == "TransactionHeld"
    assert held.detail["reason"].startswith("invalid_payload:")


def test_fr6_holder_name_only_when_tenant_allows(
    generated: tuple[RefData, list[GeneratedCard]],
) -> None:
    refdata, cards = generated
    card = card_of(cards, refdata, "uk-bank", "GBP")
    tenants = [
        msgspec.structs.replace(t, expose_holder_name=True) if t.id == "uk-bank" else t
        for t in refdata.tenants.values()
    ]
    allowed = RefData.build(
        "test",
        tenants=tenants,
        accounts=list(refdata.accounts.values()),
        branches=list(refdata.branches.values()),
        rates=list(refdata.rates.values()),
    )
    t = enrich_one(standardized(card), allowed).detail["transaction"]
    assert t["holder_name"] == refdata.accounts[card.account_id].holder_name
    assert "holder_address" not in t


def test_fr6_deterministic_and_one_output_per_input(
    generated: tuple[RefData, list[GeneratedCard]],
) -> None:
    refdata, cards = generated
    events = [standardized(c) for c in cards[:10]]
    first, second = enrich(events, refdata), enrich(events, refdata)
    assert len(first) == len(events)
    assert [msgspec.json.encode(e) for e in first] == [msgspec.json.encode(e) for e in second]


def test_fr6_enriched_event_carries_no_clear_pan(
    generated: tuple[RefData, list[GeneratedCard]],
) -> None:
    refdata, cards = generated
    text = msgspec.json.encode([enrich_one(standardized(c), refdata) for c in cards[:20]]).decode()
    assert not any(c.pan in text for c in cards)


def test_fr6_network_billing_amount_is_reported_and_unknown_currency_held(
    generated: tuple[RefData, list[GeneratedCard]],
) -> None:
    refdata, cards = generated
    card = card_of(cards, refdata, "uk-bank", "GBP")
    ev = standardized(card, amount=Money(2500, "USD"))
    doc = ev.detail["pacs008"]
    doc["CdtTrfTxInf"][0]["IntrBkSttlmAmt"] = {"@Ccy": "GBP", "#text": "19.95"}
    t = enrich_one(ev, refdata).detail["transaction"]
    assert t["network_billing_amount"] == {"minor": 1995, "currency": "GBP"}
    assert t["billing_amount"]["currency"] == "GBP"  # our own conversion is what is booked
    doc["CdtTrfTxInf"][0]["InstdAmt"] = {"@Ccy": "ZZZ", "#text": "25.00"}
    held = enrich_one(ev, refdata)
    assert held.detail_type == "TransactionHeld"
    assert held.detail["reason"].startswith("unknown_currency:")
