"""Synthetic authorization traffic: ISO 8583 logs, JSON Lines and CSV (tests, demo, bench).

`generate_authorizations(cards, count, ...)` yields `GeneratedAuthorization`s: realistic
merchants with real ISO 18245 MCCs, home- and foreign-currency purchases (foreign ones carry
the cardholder billing amount), some declines, ~1 % duplicates (the same authorization logged
twice: same card, amount, currency, merchant, STAN, approval code, transmission time) and,
for logs, a few requests that never get a response. Deterministic for a given seed.

Renderers: `iso8583_log_lines` (requests and responses interleaved in receive-time order, as
a switch logs them), `jsonl_lines`, `csv_lines`. `card_numbers` makes Luhn-valid card numbers.
"""

from __future__ import annotations

import csv
import dataclasses
import heapq
import io
import json
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from paypost.iso import iso8583 as iso
from paypost.security.tokens import luhn_valid

# Well-known test card numbers (issuers' documented test PANs).
TEST_PANS: tuple[str, ...] = (
    "4111111111111111",
    "4012888888881881",
    "5555555555554444",
    "5105105105105100",
    "2223003122003222",
    "378282246310005",
    "6011111111111117",
    "4000056655665556",
)

# (name, MCC, city, country alpha-2)
MERCHANTS: tuple[tuple[str, str, str, str], ...] = (
    ("TESCO STORES 3021", "5411", "LONDON", "GB"),
    ("SAINSBURYS 0455", "5411", "MANCHESTER", "GB"),
    ("PRET A MANGER", "5814", "LONDON", "GB"),
    ("SHELL HAMMERSMITH", "5541", "LONDON", "GB"),
    ("BOOTS 1102", "5912", "LEEDS", "GB"),
    ("TFL TRAVEL CH", "4111", "LONDON", "GB"),
    ("JOHN LEWIS", "5311", "BRISTOL", "GB"),
    ("WATERSTONES", "5942", "OXFORD", "GB"),
    ("CURRYS PC WORLD", "5732", "BIRMINGHAM", "GB"),
    ("DISHOOM KINGS CROSS", "5812", "LONDON", "GB"),
    ("PREMIER INN", "7011", "EDINBURGH", "GB"),
    ("ODEON CINEMAS", "7832", "GLASGOW", "GB"),
    ("B&Q 1204", "5200", "CARDIFF", "GB"),
    ("UBER TRIP", "4121", "LONDON", "GB"),
    ("BET365", "7995", "STOKE", "GB"),
    ("CARREFOUR CITY", "5411", "PARIS", "FR"),
    ("SNCF", "4112", "LYON", "FR"),
    ("REWE MARKT", "5411", "BERLIN", "DE"),
    ("LUFTHANSA", "3008", "FRANKFURT", "DE"),
    ("EL CORTE INGLES", "5311", "MADRID", "ES"),
    ("WHOLE FOODS", "5411", "NEW YORK", "US"),
    ("APPLE STORE", "5732", "SAN FRANCISCO", "US"),
    ("LAWSON", "5499", "TOKYO", "JP"),
    ("MIGROS", "5411", "ZURICH", "CH"),
)

COUNTRY_CURRENCY = {"GB": "GBP", "FR": "EUR", "DE": "EUR", "ES": "EUR", "US": "USD",
                    "JP": "JPY", "CH": "CHF", "IE": "EUR", "NL": "EUR"}  # fmt: skip
# Cardholder billing rates, in millionths of billing currency minor units per transaction
# minor unit (integer arithmetic; the generator's only "FX").
_RATES_TO = {
    ("EUR", "GBP"): 870_000,
    ("USD", "GBP"): 790_000,
    ("JPY", "GBP"): 52_000,  # 1 JPY (exp 0) = 0.0052 GBP = 0.52 pence → per minor unit
    ("CHF", "GBP"): 900_000,
    ("GBP", "EUR"): 1_150_000,
    ("USD", "EUR"): 920_000,
    ("JPY", "EUR"): 60_000,
    ("CHF", "EUR"): 1_040_000,
}
_DECLINE_CODES = ("05", "51", "54", "61")
_APPROVAL_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"


@dataclass(frozen=True, slots=True)
class GeneratedAuthorization:
    """One authorization: the request's business data and the response (clear PAN)."""

    tenant: str
    pan: str
    stan: str
    transmitted: datetime
    acquirer_id: str
    amount_minor: int
    currency: str
    billing_amount_minor: int | None
    billing_currency: str | None
    merchant_id: str
    merchant_name: str
    mcc: str
    merchant_city: str
    merchant_country: str
    terminal_id: str
    rrn: str
    issuing_country: str
    response_code: str
    approval_code: str | None
    responded: datetime
    logged: datetime | None = None  # when the request reached the log (ms precision)
    answered: bool = True  # False: the log never gets a response for it
    duplicate_of: int | None = None  # index of the original this re-logs


def card_numbers(count: int, seed: int = 0) -> list[str]:
    """COUNT distinct Luhn-valid 16-digit card numbers on test-like BINs (deterministic)."""
    rng = random.Random(f"cards/{seed}")
    bins = ("400000", "411111", "424242", "555555", "222300", "510510")
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < count:
        body = rng.choice(bins) + "".join(rng.choice("0123456789") for _ in range(9))
        pan = next(body + d for d in "0123456789" if luhn_valid(body + d))
        if pan not in seen:
            seen.add(pan)
            out.append(pan)
    return out


def _billing(amount: int, currency: str, home: str) -> int:
    rate = _RATES_TO.get((currency, home), 1_000_000)
    return (amount * rate + 500_000) // 1_000_000


def generate_authorizations(
    cards: Mapping[str, Sequence[str]],
    count: int,
    *,
    seed: int = 0,
    start: datetime | None = None,
    per_second: float = 200.0,
    home_currency: Mapping[str, str] | None = None,
    decline_rate: float = 0.05,
    duplicate_rate: float = 0.01,
    foreign_rate: float = 0.1,
    unanswered_rate: float = 0.0,
    high_value_rate: float = 0.0,
    missing_issuer_rate: float = 0.0,
) -> Iterator[GeneratedAuthorization]:
    """COUNT authorizations over CARDS ({tenant: [pan, ...]}), in transmission-time order.

    Duplicates are extra: each original is re-logged with probability DUPLICATE_RATE a few
    seconds later (so COUNT counts log entries, duplicates included).
    """
    if not cards or not any(cards.values()):
        raise ValueError("generate_authorizations needs at least one card for one tenant")
    rng = random.Random(f"auths/{seed}")
    t = start or datetime(2026, 11, 21, 9, 0, 0, tzinfo=UTC)
    homes = dict(home_currency or {})
    tenants = sorted(t_ for t_, pans in cards.items() if pans)
    acquirers = ("10000001", "10000002", "20000007")
    stans = dict.fromkeys(acquirers, rng.randrange(1, 900_000))
    home_merchants = [m for m in MERCHANTS if m[3] == "GB"]
    foreign_merchants = [m for m in MERCHANTS if m[3] != "GB"]
    merchant_ids = {m[0]: f"MRC{abs(hash_str(m[0])) % 10**12:012d}" for m in MERCHANTS}
    delayed: list[tuple[datetime, int, GeneratedAuthorization]] = []
    emitted = 0
    index = 0
    mean_gap = 1.0 / per_second
    while emitted < count:
        if delayed and delayed[0][0] <= t:
            _, _, dup = heapq.heappop(delayed)
            yield dup
            emitted += 1
            continue
        tenant = tenants[index % len(tenants)] if len(tenants) > 1 else tenants[0]
        home = homes.get(tenant, "GBP")
        pan = rng.choice(cards[tenant])
        foreign = rng.random() < foreign_rate
        name, mcc, city, country = rng.choice(foreign_merchants if foreign else home_merchants)
        currency = COUNTRY_CURRENCY.get(country, home) if foreign else home
        exp_scale = 1 if currency == "JPY" else 100
        amount = max(1, int(rng.lognormvariate(3.0, 1.0) * exp_scale))
        if high_value_rate and rng.random() < high_value_rate:
            amount *= 500  # a few thousand: over a typical high-value threshold
        billing = _billing(amount, currency, home) if currency != home else None
        acquirer = acquirers[rng.randrange(len(acquirers))]
        stans[acquirer] = stans[acquirer] % 999_999 + 1
        declined = rng.random() < decline_rate
        responded = t + timedelta(milliseconds=rng.randrange(40, 900))
        responded = responded.replace(microsecond=responded.microsecond // 1000 * 1000)
        auth = GeneratedAuthorization(
            tenant=tenant,
            pan=pan,
            stan=f"{stans[acquirer]:06d}",
            transmitted=t.replace(microsecond=0),
            acquirer_id=acquirer,
            amount_minor=amount,
            currency=currency,
            billing_amount_minor=billing,
            billing_currency=home if billing is not None else None,
            merchant_id=merchant_ids[name],
            merchant_name=name,
            mcc=mcc,
            merchant_city=city,
            merchant_country=country,
            terminal_id=f"T{rng.randrange(10**7):07d}",
            rrn=f"{t.strftime('%y%j')}{index % 10**7:07d}",
            issuing_country=""
            if missing_issuer_rate and rng.random() < missing_issuer_rate
            else "826",
            response_code=rng.choice(_DECLINE_CODES) if declined else "00",
            approval_code=None
            if declined
            else "".join(rng.choice(_APPROVAL_ALPHABET) for _ in range(6)),
            responded=responded,
            logged=t.replace(microsecond=t.microsecond // 1000 * 1000),
            answered=rng.random() >= unanswered_rate,
        )
        yield auth
        emitted += 1
        if auth.answered and rng.random() < duplicate_rate:
            later = t + timedelta(seconds=rng.uniform(2.0, 30.0))
            dup = dataclasses.replace(
                auth,
                logged=later.replace(microsecond=later.microsecond // 1000 * 1000),
                responded=later + (auth.responded - t),
                duplicate_of=index,
            )
            heapq.heappush(delayed, (later, index, dup))
        index += 1
        t = t + timedelta(seconds=rng.expovariate(1.0 / mean_gap))


def hash_str(text: str) -> int:
    """A stable (process-independent) small hash of TEXT."""
    h = 1469598103934665603
    for ch in text.encode():
        h = ((h ^ ch) * 1099511628211) % 2**64
    return h


def _request_fields(a: GeneratedAuthorization) -> dict[str, str]:
    fields = {
        "t": iso.REQUEST_MTI,
        "2": a.pan,
        "3": "000000",
        "4": f"{a.amount_minor:012d}",
        "7": iso.transmission_field(a.transmitted),
        "11": a.stan,
        "12": a.transmitted.strftime("%H%M%S"),
        "13": a.transmitted.strftime("%m%d"),
        "18": a.mcc,
        "22": "051",
        "32": a.acquirer_id,
        "37": a.rrn,
        "41": a.terminal_id,
        "42": a.merchant_id,
        "43": iso.field43(a.merchant_name, a.merchant_city, a.merchant_country),
        "49": iso.currency_numeric(a.currency),
    }
    if a.issuing_country:
        fields["20"] = a.issuing_country
    if a.billing_amount_minor is not None and a.billing_currency is not None:
        fields["6"] = f"{a.billing_amount_minor:012d}"
        fields["51"] = iso.currency_numeric(a.billing_currency)
    return fields


def _response_fields(a: GeneratedAuthorization) -> dict[str, str]:
    fields = {
        "t": iso.RESPONSE_MTI,
        "3": "000000",
        "4": f"{a.amount_minor:012d}",
        "7": iso.transmission_field(a.transmitted),
        "11": a.stan,
        "32": a.acquirer_id,
        "37": a.rrn,
        "39": a.response_code,
        "41": a.terminal_id,
        "49": iso.currency_numeric(a.currency),
    }
    if a.approval_code:
        fields["38"] = a.approval_code
    return fields


def iso8583_request(a: GeneratedAuthorization) -> bytes:
    return iso.encode_message(_request_fields(a))


def iso8583_response(a: GeneratedAuthorization) -> bytes:
    return iso.encode_message(_response_fields(a))


def iso8583_log_lines(auths: Iterable[GeneratedAuthorization]) -> Iterator[str]:
    """Log lines (no newline) in receive-time order: requests and responses interleave."""
    heap: list[tuple[datetime, int, str]] = []
    seq = 0
    for a in auths:
        received = a.logged or a.transmitted
        while heap and heap[0][0] <= received:
            yield heapq.heappop(heap)[2]
        yield iso.format_log_line(iso.format_utc(received), iso8583_request(a))
        if a.answered:
            seq += 1
            heapq.heappush(
                heap,
                (
                    a.responded,
                    seq,
                    iso.format_log_line(iso.format_utc(a.responded), iso8583_response(a)),
                ),
            )
    while heap:
        yield heapq.heappop(heap)[2]


def record_of(a: GeneratedAuthorization) -> dict[str, object]:
    """The flat authorization record (docs/ingest.md) of A."""
    rec: dict[str, object] = {
        "tenant": a.tenant,
        "pan": a.pan,
        "stan": a.stan,
        "transmission_time": iso.format_utc(a.transmitted),
        "acquirer_id": a.acquirer_id,
        "processing_code": "000000",
        "amount_minor": a.amount_minor,
        "currency": a.currency,
        "merchant_id": a.merchant_id,
        "merchant_name": a.merchant_name,
        "mcc": a.mcc,
        "merchant_city": a.merchant_city,
        "merchant_country": a.merchant_country,
        "terminal_id": a.terminal_id,
        "rrn": a.rrn,
        "issuing_country": a.issuing_country or None,
        "response_code": a.response_code,
        "approval_code": a.approval_code,
        "responded_at": iso.format_utc(a.responded),
    }
    if a.billing_amount_minor is not None:
        rec["billing_amount_minor"] = a.billing_amount_minor
        rec["billing_currency"] = a.billing_currency
    return rec


def jsonl_lines(auths: Iterable[GeneratedAuthorization]) -> Iterator[str]:
    for a in auths:
        rec = {k: v for k, v in record_of(a).items() if v is not None}
        yield json.dumps(rec, separators=(",", ":"))


CSV_COLUMNS: tuple[str, ...] = (
    "tenant", "pan", "stan", "transmission_time", "acquirer_id", "processing_code",
    "amount_minor", "currency", "billing_amount_minor", "billing_currency", "merchant_id",
    "merchant_name", "mcc", "merchant_city", "merchant_country", "terminal_id", "rrn",
    "issuing_country", "response_code", "approval_code", "responded_at",
)  # fmt: skip


def csv_lines(auths: Iterable[GeneratedAuthorization]) -> Iterator[str]:
    """The header, then one CSV line per authorization (no newline)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="")
    writer.writerow(CSV_COLUMNS)
    yield buf.getvalue()
    for a in auths:
        rec = record_of(a)
        buf.seek(0)
        buf.truncate()
        writer.writerow(["" if rec.get(c) is None else rec.get(c) for c in CSV_COLUMNS])
        yield buf.getvalue()


def render_lines(fmt: str, auths: Iterable[GeneratedAuthorization]) -> Iterator[str]:
    """Lines of format FMT (iso8583, jsonl, csv) for AUTHS."""
    if fmt == "iso8583":
        return iso8583_log_lines(auths)
    if fmt == "jsonl":
        return jsonl_lines(auths)
    if fmt == "csv":
        return csv_lines(auths)
    raise ValueError(f"unknown format {fmt!r}: use iso8583, jsonl or csv")
