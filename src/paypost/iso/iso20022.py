"""ISO 20022 pacs.008.001.08 (FI-to-FI customer credit transfer) from card authorizations (FR5).

An accepted authorization (`AuthorizationAccepted`) becomes one pacs.008 message with one
`CdtTrfTxInf`, held as plain data that mirrors the XML: a dict per element, keys are the XML
element names in schema order, a list for a repeatable element, ``"@Ccy"`` for the currency
attribute and ``"#text"`` for an amount's value, ``"@xmlns"`` where a subtree is in another
namespace (paypost's card data in `SplmtryData`). `render_xml` turns that dict into XML that
validates against the official pacs.008.001.08 XSD shipped in `paypost/iso/xsd/`.

The mapping is documented in docs/iso20022.md. It is deterministic: identifiers are derived
from the input event id, timestamps come from the authorization and its envelope, never from
the clock, so re-processing an event yields byte-identical output (DESIGN §3.1).

Amounts are written from integer minor units with the ISO 4217 exponent; no float anywhere.
"""

from __future__ import annotations

import functools
import hashlib
import re
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any, Final
from xml.sax.saxutils import escape, quoteattr

import msgspec

from paypost.events import (
    EVENT_ID_NAMESPACE,
    AuthorizationAccepted,
    AuthorizationRequest,
    AuthorizationResponse,
    Merchant,
)
from paypost.money import Money, UnknownCurrency, exponent
from paypost.security.tokens import TOKEN_PREFIX

PACS008_NS: Final = "urn:iso:std:iso:20022:tech:xsd:pacs.008.001.08"
CARD_NS: Final = "urn:paypost:card:1"
XSD_PATH: Final = Path(__file__).parent / "xsd" / "pacs.008.001.08.xsd"

# ISO 8583 processing code (DE3), first two digits = transaction type. 00–19 move money from
# the cardholder to the merchant (debit); 20–29 move it back to the cardholder (credit).
# Purpose codes from the ISO 20022 ExternalPurpose1Code list (card-related ones).
_PURPOSE_BY_TXN_TYPE: Final = {
    "00": "GDSV",  # purchase of goods and services
    "01": "CDCD",  # cash disbursement (ATM / cash advance)
    "09": "CDCB",  # purchase with cash back
    "11": "CDQC",  # quasi-cash
    "20": "REFU",  # merchandise return / refund
    "26": "CDOC",  # original credit
}
# Approval response codes (ISO 8583 DE39): approved, honour with identification, approved VIP.
APPROVED_RESPONSE_CODES: Final = frozenset({"00", "08", "11"})

# RFC 3339 / xs:dateTime with an explicit zone (Z or ±hh:mm).
# All digit patterns are ASCII-only (re.ASCII): a Unicode digit is not a card-number digit.
_DATETIME_RE: Final = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]\d{2}:\d{2})", re.ASCII
)
_PROCESSING_CODE_RE: Final = re.compile(r"\d{6}", re.ASCII)
_MCC_RE: Final = re.compile(r"\d{4}", re.ASCII)
# A masked PAN, 13-19 characters: the first 6 (or 8) digits, a mask of '*' or 'X', the last 4.
_MASKED_PAN_RE: Final = re.compile(r"(?=.{13,19}\Z)\d{6,8}[*X]+\d{4}", re.ASCII)
_ALPHA2_RE: Final = re.compile(r"[A-Z]{2}")
# Control characters (XML 1.0 cannot carry most of them; tab and line breaks would not survive
# XML whitespace normalization): free text is cleaned of them, identifiers must not have them.
_CONTROL_RE: Final = re.compile("[^\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]+")
_DIGIT_RUN_RE: Final = re.compile(r"\d{13,19}", re.ASCII)

MAX_MINOR: Final = 10**18 - 1  # the XSD's totalDigits 18


class Problem(msgspec.Struct, frozen=True):
    """One missing or invalid input field: its dotted path and what is wrong with it."""

    field: str
    issue: str

    def __str__(self) -> str:
        return f"{self.field}: {self.issue}"


class StandardizationError(ValueError):
    """The authorization lacks mandatory data or carries invalid data; names every field."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))

    @property
    def fields(self) -> list[str]:
        return [p.field for p in self.problems]


# --------------------------------------------------------------------------------------------
# Amounts: integer minor units <-> XML decimal strings, by the ISO 4217 exponent.


def decimal_amount(minor: int, currency: str) -> str:
    """The xs:decimal text of MINOR units of CURRENCY: (1050, EUR) → '10.50', (5, BHD) → '0.005'.

    Raises ValueError for a negative amount (the XSD has minInclusive 0) and UnknownCurrency.
    """
    if minor < 0:
        raise ValueError(f"amount must not be negative, got {minor} minor units")
    exp = exponent(currency)
    digits = str(minor)
    if exp == 0:
        return digits
    digits = digits.rjust(exp + 1, "0")
    return f"{digits[:-exp]}.{digits[-exp:]}"


def minor_from_decimal(text: str, currency: str) -> int:
    """The integer minor units of the decimal string TEXT in CURRENCY ('10.50', EUR → 1050).

    Exact string arithmetic; raises ValueError if TEXT has more decimals than the currency.
    """
    exp = exponent(currency)
    whole, _, frac = text.strip().partition(".")
    frac = frac.rstrip("0")
    if len(frac) > exp:
        raise ValueError(f"{text!r} has more than {exp} decimals for {currency}")
    if not (whole.isascii() and whole.isdigit()) or (
        frac and not (frac.isascii() and frac.isdigit())
    ):
        raise ValueError(f"{text!r} is not a non-negative decimal amount")
    return int(whole + frac.ljust(exp, "0"))


def _amount(money: Money) -> dict[str, str]:
    return {"@Ccy": money.currency, "#text": decimal_amount(money.minor, money.currency)}


def exchange_rate(instructed: Money, settlement: Money) -> str | None:
    """The implied rate SETTLEMENT / INSTRUCTED in major units, as a BaseOneRate string.

    At most 11 significant digits and 10 decimals (the XSD's totalDigits/fractionDigits),
    rounded half-even; None when it cannot be expressed (zero amount or > 11 integer digits).
    Computed with Decimal from integers, never a float.
    """
    if instructed.minor <= 0 or settlement.minor <= 0:
        return None
    num = Decimal(settlement.minor).scaleb(-exponent(settlement.currency))
    den = Decimal(instructed.minor).scaleb(-exponent(instructed.currency))
    rate = num / den  # default context: 28 significant digits, plenty
    int_digits = len(str(int(rate))) if rate >= 1 else 0
    if int_digits > 11:
        return None
    places = min(10, 11 - int_digits)
    quantized = rate.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN)
    text = format(quantized, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


# --------------------------------------------------------------------------------------------
# Identifiers: deterministic, derived from the input event id.


_NS_BYTES: Final = EVENT_ID_NAMESPACE.bytes
_NS_SHA1: Final = hashlib.sha1(_NS_BYTES)  # the namespace absorbed once; copied per use


def _compact_id(input_id: str) -> str:
    """The input event id as 35 characters (Max35Text): its 32 hex digits in four dash-separated
    groups of 8 if a UUID, else those of a uuid5 hash.

    Why not the bare 32 hex digits: about 1 in 400 of those contains a Luhn-valid run of 13–19
    digits, which every card-number scan downstream would rightly flag (DESIGN §3.4); groups of
    8 can never hold such a run.
    """
    hexid = input_id.replace("-", "")
    if len(hexid) == 32:
        # 32 hex digits once the dashes are gone (fromhex skips no whitespace when 16 bytes
        # come out of 32 characters): exactly the UUIDs uuid.UUID reads as these bytes.
        try:
            raw = bytes.fromhex(hexid)
        except ValueError:
            raw = b""
        if len(raw) == 16:
            return raw.hex("-", 4)  # four groups of 8 hex digits
    try:
        raw = uuid.UUID(input_id).bytes
    except ValueError:
        raw = uuid.uuid5(EVENT_ID_NAMESPACE, input_id).bytes
    return raw.hex("-", 4)


def derive_uetr(input_id: str) -> str:
    """A UETR for INPUT_ID: uuid5-derived, then stamped as version 4 (the XSD's UUIDv4 pattern).

    Deterministic, so a re-processed authorization keeps its UETR end to end. Equal to
    uuid5(EVENT_ID_NAMESPACE, f"{input_id}/standardize/uetr") with the version nibble set to 4
    and the RFC 4122 variant bits; computed on the hex digest directly (hot path).
    """
    hasher = _NS_SHA1.copy()  # cheaper than a new sha1 object (OpenSSL 3 fetch)
    hasher.update(f"{input_id}/standardize/uetr".encode())
    h = hasher.hexdigest()
    variant = "89ab"[int(h[16], 16) & 0x3]
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:32]}"


def message_id_for(output_event_id: str) -> str:
    """GrpHdr/MsgId: the output event id's hex digits (Max35Text), so each names the other."""
    return _compact_id(output_event_id)


def transaction_ref_for(accepted_event_id: str) -> str:
    """CdtTrfTxInf/PmtId/TxId of the pacs.008 built from an accepted authorization: the
    accepted event id's hex digits (the transaction's reference through posting)."""
    return _compact_id(accepted_event_id)


# --------------------------------------------------------------------------------------------
# Validation of the authorization (everything the message needs), collecting every problem.


def decode_problems(detail: Any) -> list[Problem]:
    """Every missing or ill-typed field of an `AuthorizationAccepted` detail (slow path).

    Used when decoding fails, so that the rejection names all fields at once instead of the
    first one msgspec met.
    """
    if not isinstance(detail, Mapping):
        return [Problem("detail", "must be an object")]
    return list(_walk(AuthorizationAccepted, detail, ""))


@functools.cache
def _fields(cls: type[msgspec.Struct]) -> tuple[msgspec.structs.FieldInfo, ...]:
    return msgspec.structs.fields(cls)  # resolves type hints: slow, so once per class


def _walk(cls: type[msgspec.Struct], data: Mapping[str, Any], prefix: str) -> Iterator[Problem]:
    for field in _fields(cls):
        path = f"{prefix}{field.encode_name}"
        if field.encode_name not in data or data[field.encode_name] is None:
            if field.required:
                yield Problem(path, "missing")
            continue
        value = data[field.encode_name]
        ftype = field.type
        if isinstance(ftype, type) and issubclass(ftype, msgspec.Struct) and ftype is not Money:
            if isinstance(value, Mapping):
                yield from _walk(ftype, value, f"{path}.")
            else:
                yield Problem(path, "must be an object")
            continue
        if ftype is Money or (isinstance(value, Mapping) and path.endswith("amount")):
            yield from _money_problems(value, path)
            continue
        try:
            msgspec.convert(value, ftype)
        except msgspec.ValidationError:
            yield Problem(path, f"invalid type (expected {_type_name(ftype)})")


def _money_problems(value: Any, path: str) -> Iterator[Problem]:
    if not isinstance(value, Mapping):
        yield Problem(path, 'must be {"minor": int, "currency": str}')
        return
    minor, currency = value.get("minor"), value.get("currency")
    if minor is None:
        yield Problem(f"{path}.minor", "missing")
    elif type(minor) is not int:
        yield Problem(f"{path}.minor", "must be an integer of minor units")
    if currency is None:
        yield Problem(f"{path}.currency", "missing")
    elif not isinstance(currency, str):
        yield Problem(f"{path}.currency", "must be an ISO 4217 code")
    else:
        try:
            exponent(currency)
        except UnknownCurrency:
            yield Problem(f"{path}.currency", "unknown ISO 4217 currency code")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# Every ASCII digit byte becomes "0", every other byte "x": a run of 13 digits becomes a run of
# 13 zeros, found by a substring search (the regex retries at every digit of a run: ~5x slower).
_DIGITS_ONLY: Final = bytes(0x30 if 0x30 <= b <= 0x39 else 0x78 for b in range(256))
_THIRTEEN_DIGITS: Final = b"0" * 13


def _has_digit_run(text: str) -> bool:
    """Whether TEXT holds 13 or more consecutive ASCII digits (as `_DIGIT_RUN_RE.search`).

    UTF-8 keeps ASCII digits as they are and writes every other character with bytes that are
    not ASCII digits (surrogatepass: lone surrogates too), so runs are the same in the bytes.
    """
    return _THIRTEEN_DIGITS in text.encode("utf-8", "surrogatepass").translate(_DIGITS_ONLY)


def _looks_like_pan(text: str) -> bool:
    return any(_luhn_ok(m.group()) for m in _DIGIT_RUN_RE.finditer(text))


def _clean_base(text: str) -> str:
    """Free text with every control character replaced by a space, trimmed (not truncated)."""
    if text.isascii() and text.isprintable():
        # Printable ASCII holds no control character: skip the regex (the common case).
        return text.strip()
    return _CONTROL_RE.sub(" ", text).strip()


def _clean_text(text: str, limit: int) -> str:
    """Free text for a MaxNText element: control characters become a space, trimmed, truncated."""
    return _clean_base(text)[:limit].strip()


def _check_id(value: str | None, path: str, limit: int, problems: list[Problem]) -> None:
    if value is None:
        return
    if len(value) <= limit and value.isascii() and value.isprintable() and value.strip():
        return  # printable ASCII within the limit, not blank: nothing can be wrong
    if not value.strip():
        problems.append(Problem(path, "empty"))
    elif len(value) > limit:
        problems.append(Problem(path, f"longer than {limit} characters"))
    elif _CONTROL_RE.search(value):
        problems.append(Problem(path, "contains control characters"))


@functools.lru_cache(maxsize=4096)
def _is_datetime(value: str) -> bool:
    """An RFC 3339 date-time with a zone that exists in the calendar. Cached: authorizations
    come in time order, many within the same second (one regex and parse saved per hit)."""
    if _DATETIME_RE.fullmatch(value):
        try:
            datetime.fromisoformat(value)
        except ValueError:
            return False
        return True
    return False


def _check_time(value: str | None, path: str, problems: list[Problem]) -> None:
    if value is not None and not _is_datetime(value):
        problems.append(
            Problem(path, "must be an RFC 3339 date-time with a zone, e.g. ...T10:00:00Z")
        )


def _check_amount(money: Money | None, path: str, problems: list[Problem]) -> None:
    if money is None:
        return
    if money.minor <= 0:
        problems.append(Problem(f"{path}.minor", "must be a positive number of minor units"))
    elif money.minor > MAX_MINOR:
        problems.append(Problem(f"{path}.minor", "exceeds 18 digits"))


def semantic_problems(auth: AuthorizationAccepted, event_time: str) -> list[Problem]:
    """Every value the pacs.008 needs that is present but unusable (empty, too long, ...)."""
    problems: list[Problem] = []
    req, resp, mer = auth.request, auth.response, auth.request.merchant
    _check_time(event_time, "time", problems)
    _check_time(req.transmission_time, "request.transmission_time", problems)
    _check_time(resp.responded_at, "response.responded_at", problems)
    _check_amount(req.amount, "request.amount", problems)
    _check_amount(req.billing_amount, "request.billing_amount", problems)
    _check_id(req.stan, "request.stan", 35, problems)
    _check_id(req.acquirer_id, "request.acquirer_id", 35, problems)
    _check_id(req.card_token, "request.card_token", 38, problems)
    _check_id(req.rrn, "request.rrn", 35, problems)
    _check_id(req.terminal_id, "request.terminal_id", 35, problems)
    _check_id(resp.approval_code, "response.approval_code", 35, problems)
    if not _PROCESSING_CODE_RE.fullmatch(req.processing_code):
        problems.append(Problem("request.processing_code", "must be 6 digits (ISO 8583 DE3)"))
    elif req.processing_code[0] not in "012":
        problems.append(
            Problem(
                "request.processing_code",
                "transaction type is neither a debit (00-19) nor a credit (20-29)",
            )
        )
    if not _MASKED_PAN_RE.fullmatch(req.pan_masked):
        problems.append(
            Problem("request.pan_masked", "must be masked: first 6 digits, '*' or 'X', last 4")
        )
    if resp.response_code not in APPROVED_RESPONSE_CODES:
        problems.append(Problem("response.response_code", "not an approval (00, 08 or 11)"))
    if not _clean_text(mer.name, 140):
        problems.append(Problem("request.merchant.name", "empty"))
    _check_id(mer.id, "request.merchant.id", 35, problems)
    if not _MCC_RE.fullmatch(mer.mcc):
        problems.append(Problem("request.merchant.mcc", "must be 4 digits (ISO 18245)"))
    # NFR6 / DESIGN §3.4: never carry a clear card number onwards, whatever field it hides in.
    # One scan over all copied text; per-field only when some long digit run exists.
    scanned = (
        req.card_token,
        mer.name,
        mer.city,
        mer.id,
        req.terminal_id,
        req.rrn,
        req.acquirer_id,
        resp.approval_code,
    )  # the values of _copied_text, in its order
    if _has_digit_run("\x1f".join(filter(None, scanned))):
        for path, value in _copied_text(req, resp):
            if value and _looks_like_pan(value):
                problems.append(Problem(path, "contains what looks like a clear card number"))
    return problems


def _copied_text(
    req: AuthorizationRequest, resp: AuthorizationResponse
) -> tuple[tuple[str, str | None], ...]:
    mer = req.merchant
    return (
        ("request.card_token", req.card_token),
        ("request.merchant.name", mer.name),
        ("request.merchant.city", mer.city),
        ("request.merchant.id", mer.id),
        ("request.terminal_id", req.terminal_id),
        ("request.rrn", req.rrn),
        ("request.acquirer_id", req.acquirer_id),
        ("response.approval_code", resp.approval_code),
    )


# --------------------------------------------------------------------------------------------
# The builder (hot path: plain dict construction, no XML).


def _fin_inst(identifier: str, scheme: str) -> dict[str, Any]:
    return {"FinInstnId": {"Othr": {"Id": identifier, "SchmeNm": {"Prtry": scheme}}}}


def _cardholder(req: AuthorizationRequest) -> dict[str, Any]:
    party: dict[str, Any] = {
        "Id": {"PrvtId": {"Othr": [{"Id": req.pan_masked, "SchmeNm": {"Prtry": "MASKED_PAN"}}]}}
    }
    if req.issuing_country and _ALPHA2_RE.fullmatch(req.issuing_country):
        party["CtryOfRes"] = req.issuing_country
    return party


def _merchant(mer: Merchant, name: str, city: str) -> dict[str, Any]:
    """The merchant party; NAME and CITY are `_clean_base` of the merchant's (see build)."""
    party: dict[str, Any] = {"Nm": name[:140].strip()}
    address: dict[str, str] = {}
    town = city[:35].strip()
    if town:
        address["TwnNm"] = town
    if mer.country and _ALPHA2_RE.fullmatch(mer.country):
        address["Ctry"] = mer.country
    if address:
        party["PstlAdr"] = address
    party["Id"] = {"OrgId": {"Othr": [{"Id": mer.id, "SchmeNm": {"Prtry": "MERCHANT_ID"}}]}}
    return party


def _remittance(req: AuthorizationRequest, name: str, city: str) -> str:
    """RmtInf/Ustrd; NAME and CITY are `_clean_base` of the merchant's (see build)."""
    mer = req.merchant
    town, country = city[:35].strip(), mer.country or ""
    where = f"{town} {country}" if town and country else town or country
    text = f"CARD {req.pan_masked[-4:]} {name[:100].strip()}"
    if where:
        text = f"{text}, {where}"
    return text[:140]


def _card_data(auth: AuthorizationAccepted) -> dict[str, Any]:
    req, resp = auth.request, auth.response
    card: dict[str, Any] = {
        "@xmlns": CARD_NS,
        "CardTkn": req.card_token,
        "MskdPAN": req.pan_masked,
        "MTI": req.mti,
        "PrcgCd": req.processing_code,
        "STAN": req.stan,
        "TrnsmssnDtTm": req.transmission_time,
        "AcqrrId": req.acquirer_id,
    }
    if req.rrn:
        card["RtrvlRefNb"] = req.rrn
    if req.terminal_id:
        card["TrmnlId"] = req.terminal_id
    card["MrchntCtgyCd"] = req.merchant.mcc
    if req.merchant.country:
        card["MrchntCtry"] = req.merchant.country
    if req.issuing_country:
        card["IssrCtry"] = req.issuing_country
    card["RspnCd"] = resp.response_code
    if resp.approval_code:
        card["ApprvlCd"] = resp.approval_code
    return card


def build_pacs008(
    auth: AuthorizationAccepted, *, input_id: str, event_time: str, message_id: str
) -> dict[str, Any]:
    """The pacs.008.001.08 `FIToFICstmrCdtTrf` content for AUTH, as plain data.

    INPUT_ID is the accepted event's id (source of TxId and UETR), EVENT_TIME its envelope
    time (CreDtTm), MESSAGE_ID the MsgId. Raises StandardizationError naming every missing
    or invalid field; never returns a document the XSD would refuse.
    """
    problems = semantic_problems(auth, event_time)
    if problems:
        raise StandardizationError(problems)
    req, resp = auth.request, auth.response
    txn_type = req.processing_code[:2]
    credit = txn_type[0] == "2"  # refund / original credit: money flows to the cardholder

    instructed = req.amount
    settlement = req.billing_amount or req.amount
    if req.transmission_time.endswith("Z"):
        # Already checked to be an RFC 3339 date-time: in UTC, its date is its first 10 chars.
        booking_date = req.transmission_time[:10]
    else:
        booking_date = (
            datetime.fromisoformat(req.transmission_time).astimezone(UTC).date().isoformat()
        )
    mer = req.merchant
    # Cleaned once: the name and city go both into the merchant party and the remittance.
    name = _clean_base(mer.name)
    city = _clean_base(mer.city) if mer.city else ""

    tx: dict[str, Any] = {
        "PmtId": {
            "EndToEndId": req.rrn or "NOTPROVIDED",
            "TxId": transaction_ref_for(input_id),
            "UETR": derive_uetr(input_id),
        },
        "PmtTpInf": {"LclInstrm": {"Prtry": "CARD"}},
        "IntrBkSttlmAmt": _amount(settlement),
        "IntrBkSttlmDt": booking_date,
        "AccptncDtTm": resp.responded_at or req.transmission_time,
        "InstdAmt": _amount(instructed),
    }
    if settlement.currency != instructed.currency:
        # ISO 20022 rule InstructedAmountAndExchangeRate1: differing currencies need XchgRate.
        rate = exchange_rate(instructed, settlement)
        if rate is not None:
            tx["XchgRate"] = rate
    tx["ChrgBr"] = "SLEV"  # charges follow the card scheme's service level

    cardholder = _cardholder(req)
    # Othr/Id is Max34Text: the token without its "tok_" prefix (the scheme name says what it is).
    card_account = {
        "Id": {
            "Othr": {
                "Id": req.card_token.removeprefix(TOKEN_PREFIX)[:34],
                "SchmeNm": {"Prtry": "CARD_TOKEN"},
            }
        }
    }
    issuer = _fin_inst(req.pan_masked[:6], "IIN")
    acquirer = _fin_inst(req.acquirer_id, "ACQUIRER_ID")
    merchant = _merchant(mer, name, city)
    if credit:
        tx["Dbtr"] = merchant
        tx["DbtrAgt"] = acquirer
        tx["CdtrAgt"] = issuer
        tx["Cdtr"] = cardholder
        tx["CdtrAcct"] = card_account
    else:
        tx["Dbtr"] = cardholder
        tx["DbtrAcct"] = card_account
        tx["DbtrAgt"] = issuer
        tx["CdtrAgt"] = acquirer
        tx["Cdtr"] = merchant
    purpose = _PURPOSE_BY_TXN_TYPE.get(txn_type)
    if purpose is not None:
        tx["Purp"] = {"Cd": purpose}
    tx["RmtInf"] = {"Ustrd": [_remittance(req, name, city)]}
    tx["SplmtryData"] = [
        {
            "PlcAndNm": "/Document/FIToFICstmrCdtTrf/CdtTrfTxInf",
            "Envlp": {"Card": _card_data(auth)},
        }
    ]
    return {
        "GrpHdr": {
            "MsgId": message_id,
            "CreDtTm": event_time,
            "NbOfTxs": "1",
            "SttlmInf": {"SttlmMtd": "CLRG"},
        },
        "CdtTrfTxInf": [tx],
    }


# --------------------------------------------------------------------------------------------
# Reading a standardized document (for the stages downstream: enrichment, rules, posting).


def transaction_of(doc: Mapping[str, Any]) -> Mapping[str, Any]:
    """The (single) CdtTrfTxInf of a pacs.008 document built by `build_pacs008`."""
    txs = doc["CdtTrfTxInf"]
    tx: Mapping[str, Any] = txs[0]
    return tx


def money_of(amount: Mapping[str, str]) -> Money:
    """An amount element (`{"@Ccy": "EUR", "#text": "10.50"}`) as Money."""
    ccy = amount["@Ccy"]
    return Money(minor_from_decimal(amount["#text"], ccy), ccy)


def settlement_amount(doc: Mapping[str, Any]) -> Money:
    """IntrBkSttlmAmt as Money: what the cardholder's account is booked (billing amount)."""
    return money_of(transaction_of(doc)["IntrBkSttlmAmt"])


def instructed_amount(doc: Mapping[str, Any]) -> Money:
    """InstdAmt as Money: the amount in the transaction (merchant's) currency."""
    return money_of(transaction_of(doc)["InstdAmt"])


def card_data(doc: Mapping[str, Any]) -> Mapping[str, str]:
    """paypost's card supplement (token, masked PAN, STAN, MCC, ...) of the transaction."""
    card: Mapping[str, str] = transaction_of(doc)["SplmtryData"][0]["Envlp"]["Card"]
    return card


def is_credit_to_cardholder(doc: Mapping[str, Any]) -> bool:
    """True for refunds / original credits (the cardholder is the creditor)."""
    return "CdtrAcct" in transaction_of(doc)


# --------------------------------------------------------------------------------------------
# XML rendering (off the hot path) and XSD validation.


def render_xml(doc: Mapping[str, Any], *, pretty: bool = True) -> bytes:
    """The pacs.008.001.08 XML document of DOC (a `build_pacs008` dict), UTF-8 encoded.

    A small deterministic serializer: element order is the dict's order (built in schema
    order), text is escaped, so the same dict always renders to the same bytes.
    """
    out: list[str] = ['<?xml version="1.0" encoding="UTF-8"?>\n']
    out.append(f'<Document xmlns="{PACS008_NS}">')
    nl = "\n" if pretty else ""
    out.append(nl)
    _render_element("FIToFICstmrCdtTrf", doc, 1, out, pretty)
    out.append("</Document>\n")
    return "".join(out).encode("utf-8")


def _render_element(name: str, value: Any, depth: int, out: list[str], pretty: bool) -> None:
    indent = "  " * depth if pretty else ""
    nl = "\n" if pretty else ""
    if isinstance(value, list):
        for item in value:
            _render_element(name, item, depth, out, pretty)
        return
    if isinstance(value, Mapping):
        attrs = "".join(
            f" {k[1:]}={quoteattr(str(v))}" for k, v in value.items() if k.startswith("@")
        )
        if "#text" in value:
            out.append(f"{indent}<{name}{attrs}>{escape(str(value['#text']))}</{name}>{nl}")
            return
        children = [(k, v) for k, v in value.items() if not k.startswith("@")]
        if not children:
            out.append(f"{indent}<{name}{attrs}/>{nl}")
            return
        out.append(f"{indent}<{name}{attrs}>{nl}")
        for key, child in children:
            _render_element(key, child, depth + 1, out, pretty)
        out.append(f"{indent}</{name}>{nl}")
        return
    out.append(f"{indent}<{name}>{escape(str(value))}</{name}>{nl}")


class XsdInvalid(ValueError):
    """The rendered XML does not validate against the pacs.008.001.08 XSD."""


_SCHEMA: Any = None


def validate_xml(xml: bytes | str) -> None:
    """Validate XML against the shipped pacs.008.001.08 XSD; raise XsdInvalid with the reasons.

    Needs the `xmlschema` package (in paypost's `test` extra).
    """
    global _SCHEMA
    try:
        import xmlschema
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise XsdInvalid(
            "XSD validation needs the 'xmlschema' package: pip install 'paypost[test]'"
        ) from exc
    if _SCHEMA is None:
        _SCHEMA = xmlschema.XMLSchema(str(XSD_PATH))
    text = xml.decode("utf-8") if isinstance(xml, bytes) else xml
    errors = [f"{e.path}: {e.reason}" for e in _SCHEMA.iter_errors(text)]
    if errors:
        raise XsdInvalid("; ".join(errors))
