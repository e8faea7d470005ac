"""Enrichment stage (FR6): a standardized transaction gains account, branch, holder, product,
description, merchant and currency-conversion details, from versioned reference data.

Input: `TransactionStandardized` events (detail: `message_id`, `pacs008`, read with the
`paypost.iso.iso20022` accessors). Output, exactly one event per input:

- `TransactionEnriched` (detail: `transaction`, the flat `EnrichedTransaction` dict below, and
  `refdata_version`, the reference data version used), or
- `TransactionHeld` (stage "enrich") with a reason that starts with a code —
  `unknown_tenant`, `unknown_account`, `missing_rate`, `unknown_currency`, `invalid_payload` —
  then says what was missing and what to do. Never dropped, never a traceback.

Pure and deterministic (DESIGN §3.1): the output is a function of the input event and the
reference data version; the output id is `derive_event_id(input.id, "enrich", 0)`, the
envelope time is the input's time, correlation id and traceparent are carried, causation id
is the input id. Per-event work is dict lookups plus, for foreign currency, one exact
conversion (`paypost.money.convert`); reference data is loaded once, outside the stage.

What goes on the bus (PCI DSS / GDPR): the card token and masked PAN only (never a PAN); the
holder's pseudonymous id, and the holder's NAME only when the tenant sets
`expose_holder_name: true` (data minimisation: downstream stages post to accounts, they do not
need names; the bus archive keeps events for replay). The holder's address never leaves the
reference data store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Final

import iso18245
import msgspec
import pycountry

from paypost.events import (
    Event,
    SchemaRef,
    TransactionEnriched,
    TransactionHeld,
    TransactionStandardized,
    derive_event_id,
    new_event,
)
from paypost.iso import iso20022
from paypost.money import FxRate, Money, UnknownCurrency, convert
from paypost.refdata.model import RefDataPort

STAGE: Final = "enrich"
SOURCE: Final = "paypost.enrich"
INPUT_DETAIL_TYPE: Final = TransactionStandardized.DETAIL_TYPE

HELD_UNKNOWN_TENANT: Final = "unknown_tenant"
HELD_UNKNOWN_ACCOUNT: Final = "unknown_account"
HELD_MISSING_RATE: Final = "missing_rate"
HELD_UNKNOWN_CURRENCY: Final = "unknown_currency"
HELD_INVALID_PAYLOAD: Final = "invalid_payload"

_ENRICHED_SCHEMA: Final = SchemaRef(
    name=TransactionEnriched.DETAIL_TYPE, version=TransactionEnriched.VERSION
)
_MONTHS: Final = (
    "JAN",
    "FEB",
    "MAR",
    "APR",
    "MAY",
    "JUN",
    "JUL",
    "AUG",
    "SEP",
    "OCT",
    "NOV",
    "DEC",
)


class EnrichedTransaction(msgspec.Struct, frozen=True, kw_only=True):
    """The flat transaction the rules engine and the account interface consume (FR6, FR7).

    Amounts are `{"minor": int, "currency": str}`. `amount` is what the merchant charged, in
    the transaction currency; `billing_amount` is what the account is booked, in the account's
    currency (after conversion when the currencies differ, `fx` then says how).
    """

    tenant: str
    transaction_id: str  # pacs.008 TxId
    uetr: str
    message_id: str
    direction: str  # "debit" (purchase, cash) | "credit" (refund) — for the cardholder
    purpose: str | None  # ISO 20022 purpose code: GDSV goods/services, CDCD cash, REFU refund
    transmission_time: str
    booking_date: str  # IntrBkSttlmDt
    stan: str
    approval_code: str | None
    rrn: str | None
    # account (from the card token, via the accounts master)
    account_id: str
    iban: str
    sort_code: str
    account_number: str
    account_currency: str
    product_type: str
    branch_id: str
    branch_name: str | None
    holder_id: str
    holder_name: str | None  # only when the tenant allows it (expose_holder_name)
    # tenant
    home_country: str
    home_currency: str
    # what happened
    description: str
    amount: Money
    billing_amount: Money
    network_billing_amount: Money | None  # the scheme's billing amount, when it differs
    currency_conversion: bool
    fx: dict[str, Any] | None  # paypost.money.Conversion.provenance()["fx"]
    foreign: bool | None  # merchant country differs from the tenant's (None: unknown)
    high_value: bool | None  # above the tenant threshold (None: not in the home currency)
    # merchant
    merchant_id: str
    merchant_name: str
    merchant_city: str | None
    merchant_country: str | None  # ISO 3166 alpha-2
    mcc: str
    mcc_description: str | None  # ISO 18245
    mcc_listed: bool  # in the tenant's listed (watched) merchant categories
    # card
    card_token: str
    pan_masked: str
    issuing_country: str | None


class HeldError(Exception):
    """Enrichment cannot complete: the transaction is held with CODE and a message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@lru_cache(maxsize=4096)
def mcc_description(mcc: str) -> str | None:
    """ISO 18245 description of a merchant category code (None when unknown)."""
    try:
        found = iso18245.get_mcc(mcc)
    except (iso18245.MCCNotFound, ValueError):
        return None
    description = found.iso_description or found.visa_description or found.range.description
    return str(description) if description else None


@lru_cache(maxsize=1024)
def country_alpha2(code: str | None) -> str | None:
    """ISO 3166 alpha-2 from an alpha-2 or numeric code ('826' → 'GB'); None when unknown."""
    if not code:
        return None
    code = code.strip().upper()
    if code.isdigit():
        found = pycountry.countries.get(numeric=code.zfill(3))
    elif len(code) == 2:
        found = pycountry.countries.get(alpha_2=code)
    elif len(code) == 3:
        found = pycountry.countries.get(alpha_3=code)
    else:
        found = None
    return str(found.alpha_2) if found is not None else None


@lru_cache(maxsize=4096)
def _statement_date(transmission_time: str) -> str:
    # Cached: authorizations come in time order, many to the second (a parse saved per hit).
    moment = datetime.fromisoformat(transmission_time).astimezone(UTC)
    return f"{moment.day:02d} {_MONTHS[moment.month - 1]} {moment.year}"


def describe(
    *,
    direction: str,
    purpose: str | None,
    merchant: str,
    city: str | None,
    transmission_time: str,
    foreign_amount: Money | None,
) -> str:
    """The statement line: "CARD PAYMENT TO <merchant> <city> <date>" (and variants)."""
    if direction == "credit":
        head = "CARD REFUND FROM"
    elif purpose == "CDCD":
        head = "CASH WITHDRAWAL AT"
    else:
        head = "CARD PAYMENT TO"
    parts = [head, merchant.upper()]
    if city:
        parts.append(city.upper())
    parts.append(_statement_date(transmission_time))
    if foreign_amount is not None:
        parts.append(f"{foreign_amount.currency} {foreign_amount.format()}")
    return " ".join(parts)


def _party(tx: Mapping[str, Any], credit: bool) -> Mapping[str, Any]:
    party: Mapping[str, Any] = tx["Dbtr"] if credit else tx["Cdtr"]
    return party


def enrich_transaction(event: Event, refdata: RefDataPort) -> dict[str, Any]:
    """FR6 for one standardized event: the `EnrichedTransaction` as plain data; raises
    `HeldError` when it must be held.

    Built directly as the dict `msgspec.to_builtins(EnrichedTransaction(...))` would give (same
    keys in the struct's field order, amounts as `{"minor", "currency"}`): the hot path skips
    the struct and its conversion (tests/unit/test_enrich.py checks the shape against it).
    """
    try:
        detail = event.detail
        message_id = str(detail["message_id"])
        doc = detail["pacs008"]
        tx = iso20022.transaction_of(doc)
        card = iso20022.card_data(doc)
        credit = iso20022.is_credit_to_cardholder(doc)
        party = _party(tx, credit)
        merchant_id = str(party["Id"]["OrgId"]["Othr"][0]["Id"])
        card_token = str(card["CardTkn"])
        transmission_time = str(card["TrnsmssnDtTm"])
    except (KeyError, IndexError, TypeError) as exc:
        raise HeldError(
            HELD_INVALID_PAYLOAD,
            f"the pacs.008 payload lacks {exc}; re-standardize the authorization",
        ) from None
    try:
        instructed = tx["InstdAmt"]
        amount = iso20022.money_of(instructed)
        settled = tx["IntrBkSttlmAmt"]
        # Usually the same amount element: read it once (equal elements, equal amounts).
        settlement = amount if settled == instructed else iso20022.money_of(settled)
    except UnknownCurrency as exc:
        raise HeldError(HELD_UNKNOWN_CURRENCY, str(exc)) from None
    except (KeyError, ValueError, TypeError) as exc:
        raise HeldError(HELD_INVALID_PAYLOAD, f"unreadable amount: {exc}") from None

    tenant = refdata.tenant(event.tenant)
    if tenant is None:
        raise HeldError(
            HELD_UNKNOWN_TENANT,
            f"tenant {event.tenant!r} is not in reference data {refdata.version_id}; "
            "add it to the tenants file and load the reference data again",
        )
    account = refdata.account_for_card(event.tenant, card_token)
    if account is None:
        raise HeldError(
            HELD_UNKNOWN_ACCOUNT,
            f"no account of tenant {event.tenant} is linked to card {card['MskdPAN']} "
            f"(token {card_token}) in reference data {refdata.version_id}; link the card "
            "in the accounts master and release the hold",
        )

    fx: dict[str, Any] | None = None
    if amount.currency == account.currency:
        billing = amount
    else:
        rate: FxRate | None = refdata.fx_rate(event.tenant, amount.currency, account.currency)
        if rate is None:
            raise HeldError(
                HELD_MISSING_RATE,
                f"no FX rate {amount.currency}/{account.currency} (nor its inverse) in "
                f"reference data {refdata.version_id}; add one to the FX rates file",
            )
        conversion = convert(amount, rate)
        billing = conversion.charged
        fx = conversion.provenance()["fx"]

    branch = refdata.branch(account.branch_id)
    known = refdata.merchant(merchant_id)
    address = party.get("PstlAdr") or {}
    merchant_name = known.name if known else str(party.get("Nm", merchant_id))
    merchant_city = (known.city if known else None) or address.get("TwnNm")
    merchant_country = (
        (known.country if known else None)
        or country_alpha2(card.get("MrchntCtry"))
        or country_alpha2(address.get("Ctry"))
    )
    mcc = str(card.get("MrchntCtgyCd") or (known.mcc if known else "") or "")
    purpose_block = tx.get("Purp")
    purpose = str(purpose_block["Cd"]) if purpose_block else None
    high_value: bool | None = None
    if billing.currency == tenant.home_currency:
        high_value = billing.minor > tenant.high_value_threshold.minor
    elif amount.currency == tenant.home_currency:
        high_value = amount.minor > tenant.high_value_threshold.minor

    direction = "credit" if credit else "debit"
    # EnrichedTransaction's fields, in its order (values evaluated in the same order as the
    # struct's keyword arguments were, so a malformed payload fails the same way).
    return {
        "tenant": event.tenant,
        "transaction_id": str(tx["PmtId"]["TxId"]),
        "uetr": str(tx["PmtId"]["UETR"]),
        "message_id": message_id,
        "direction": direction,
        "purpose": purpose,
        "transmission_time": transmission_time,
        "booking_date": str(tx.get("IntrBkSttlmDt", transmission_time[:10])),
        "stan": str(card.get("STAN", "")),
        "approval_code": card.get("ApprvlCd"),
        "rrn": card.get("RtrvlRefNb"),
        "account_id": account.id,
        "iban": account.iban,
        "sort_code": account.sort_code,
        "account_number": account.account_number,
        "account_currency": account.currency,
        "product_type": account.product_type,
        "branch_id": account.branch_id,
        "branch_name": branch.name if branch else None,
        "holder_id": account.holder_id,
        "holder_name": account.holder_name if tenant.expose_holder_name else None,
        "home_country": tenant.country,
        "home_currency": tenant.home_currency,
        "description": describe(
            direction=direction,
            purpose=purpose,
            merchant=merchant_name,
            city=merchant_city,
            transmission_time=transmission_time,
            foreign_amount=amount if fx is not None else None,
        ),
        "amount": {"minor": amount.minor, "currency": amount.currency},
        "billing_amount": {"minor": billing.minor, "currency": billing.currency},
        "network_billing_amount": (
            {"minor": settlement.minor, "currency": settlement.currency}
            if settlement != amount
            else None
        ),
        "currency_conversion": fx is not None,
        "fx": fx,
        "foreign": (merchant_country != tenant.country) if merchant_country else None,
        "high_value": high_value,
        "merchant_id": merchant_id,
        "merchant_name": merchant_name,
        "merchant_city": merchant_city,
        "merchant_country": merchant_country,
        "mcc": mcc,
        "mcc_description": mcc_description(mcc) if mcc else None,
        "mcc_listed": mcc in tenant.listed_mccs,
        "card_token": card_token,
        "pan_masked": str(card["MskdPAN"]),
        "issuing_country": country_alpha2(card.get("IssrCtry")),
    }


def _envelope(event: Event, detail: TransactionEnriched | TransactionHeld) -> Event:
    return new_event(
        detail,
        source=SOURCE,
        tenant=event.tenant,
        id=derive_event_id(event.id, STAGE, 0),
        correlation_id=event.correlation_id,
        causation_id=event.id,
        traceparent=event.traceparent,
        time=event.time,
    )


def enrich_one(event: Event, refdata: RefDataPort) -> Event:
    """FR6 for one event: `TransactionEnriched`, or `TransactionHeld` with the reason."""
    try:
        if event.detail_type != INPUT_DETAIL_TYPE:
            raise HeldError(
                HELD_INVALID_PAYLOAD,
                f"enrichment takes {INPUT_DETAIL_TYPE} events, got {event.detail_type}",
            )
        txn = enrich_transaction(event, refdata)
    except HeldError as held:
        return _envelope(event, TransactionHeld(reason=str(held), stage=STAGE))
    # Built directly (not via new_event): the transaction is plain data already; the shape
    # is TransactionEnriched's (a test decodes it with detail_of).
    return Event(
        id=derive_event_id(event.id, STAGE, 0),
        source=SOURCE,
        detail_type=TransactionEnriched.DETAIL_TYPE,
        time=event.time,
        tenant=event.tenant,
        correlation_id=event.correlation_id,
        schema=_ENRICHED_SCHEMA,
        detail={"transaction": txn, "refdata_version": refdata.version_id},
        causation_id=event.id,
        traceparent=event.traceparent,
    )


def enrich(
    events: Iterable[Event],
    refdata: RefDataPort,
    *,
    sink: Callable[[Event], object] | None = None,
) -> list[Event]:
    """FR6 over a batch: one output per input, in input order. No effects, no I/O.

    SINK, when given, gets each output right after it is built (e.g. `EncodedEvents.append`:
    encoded while still in the CPU cache).
    """
    if sink is None:
        return [enrich_one(event, refdata) for event in events]
    outputs = []
    for event in events:
        out = enrich_one(event, refdata)
        outputs.append(out)
        sink(out)
    return outputs
