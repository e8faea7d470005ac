"""Realistic, deterministic reference data for demos, benchmarks and tests.

`generate_refdata(n_accounts, tenants, seed, tokenizer)` builds tenants, branches, accounts
with valid IBANs (checked with schwifty, national check digits included), sort codes, holders,
product types and currencies, FX rates, merchants, and the cards linked to the accounts. The
cards' PANs (Luhn-valid, on the tenant's BINs) are returned SEPARATELY, for the ingest sample
generator to put in authorization logs; the reference data holds only their tokens.

The same seed gives the same data (and, with the same tokenizer key, the same tokens).
Bank codes and BINs are fictitious; sort codes and account numbers are random.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import msgspec
from schwifty import IBAN

from paypost.money import Money
from paypost.refdata.model import (
    Account,
    Branch,
    MerchantInfo,
    RateQuote,
    RefData,
    TenantSettings,
)
from paypost.security.tokens import Tokenizer, VaultKeys


class CardTokenLike(Protocol):
    @property
    def token(self) -> str: ...

    @property
    def masked(self) -> str: ...


class TokenizerLike(Protocol):
    """What the generator needs of `paypost.security.tokens.Tokenizer`."""

    def tokenize(self, pan: str, tenant: str) -> CardTokenLike: ...


@dataclass(frozen=True, slots=True)
class GeneratedCard:
    """A card of a generated account. `pan` is CLEAR: hand it to ingest only, never store it."""

    tenant: str
    account_id: str
    pan: str
    token: str
    masked: str
    currency: str  # the account's (billing) currency


@dataclass(frozen=True, slots=True)
class GeneratedRefData:
    refdata: RefData
    cards: list[GeneratedCard]


@dataclass(frozen=True, slots=True)
class _Profile:
    bank_code: str
    bins: tuple[str, ...]
    cities: tuple[tuple[str, str], ...]  # (city, street)
    first_names: tuple[str, ...]
    last_names: tuple[str, ...]
    other_currencies: tuple[str, ...]
    streets: tuple[str, ...]


_PROFILES: dict[str, _Profile] = {
    "GB": _Profile(
        bank_code="TMBK",
        bins=("475129", "535522"),
        cities=(
            ("London", "14 Cheapside, London EC2V 6DN"),
            ("Manchester", "55 King Street, Manchester M2 4LQ"),
            ("Birmingham", "3 Colmore Row, Birmingham B3 2BJ"),
            ("Leeds", "27 Park Row, Leeds LS1 5QB"),
            ("Bristol", "8 Corn Street, Bristol BS1 1HQ"),
        ),
        first_names=("Oliver", "Amelia", "Harry", "Isla", "George", "Ava", "Noah", "Priya"),
        last_names=("Smith", "Jones", "Taylor", "Brown", "Williams", "Patel", "Khan", "Evans"),
        other_currencies=("EUR", "USD"),
        streets=("High Street", "Station Road", "Church Lane", "Victoria Road", "Mill Lane"),
    ),
    "IE": _Profile(
        bank_code="LFFY",
        bins=("476173", "542418"),
        cities=(
            ("Dublin", "21 College Green, Dublin 2, D02 X285"),
            ("Cork", "66 South Mall, Cork, T12 RX27"),
            ("Galway", "9 Eyre Square, Galway, H91 F8Y2"),
        ),
        first_names=("Jack", "Emily", "Conor", "Aoife", "Sean", "Grace", "Cian", "Niamh"),
        last_names=("Murphy", "Kelly", "O'Sullivan", "Walsh", "Byrne", "Ryan", "O'Brien"),
        other_currencies=("GBP", "USD"),
        streets=("Main Street", "Church Road", "Strand Road", "Bridge Street"),
    ),
    "DE": _Profile(
        bank_code="29990000",
        bins=("492910", "557845"),
        cities=(
            ("Berlin", "Friedrichstraße 68, 10117 Berlin"),
            ("Hamburg", "Jungfernstieg 22, 20354 Hamburg"),
            ("München", "Maximilianstraße 13, 80539 München"),
        ),
        first_names=("Lukas", "Marie", "Jonas", "Sophie", "Felix", "Emma", "Paul", "Hannah"),
        last_names=("Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Meyer", "Wagner"),
        other_currencies=("USD", "CHF"),
        streets=("Hauptstraße", "Schulstraße", "Bahnhofstraße", "Gartenstraße"),
    ),
}

EXAMPLE_TENANTS: tuple[TenantSettings, ...] = (
    TenantSettings(
        id="uk-bank",
        name="Thames & Mercia Bank plc",
        country="GB",
        home_currency="GBP",
        high_value_threshold=Money(250_000, "GBP"),
        fx_markup="0.0275",
        listed_mccs=("7995", "6051", "4829"),
    ),
    TenantSettings(
        id="euro-bank",
        name="Liffey Savings Bank DAC",
        country="IE",
        home_currency="EUR",
        high_value_threshold=Money(300_000, "EUR"),
        fx_markup="0.0250",
        listed_mccs=("7995", "6051"),
    ),
    TenantSettings(
        id="de-bank",
        name="Rheinland Direktbank AG",
        country="DE",
        home_currency="EUR",
        high_value_threshold=Money(500_000, "EUR"),
        fx_markup="0.0175",
        listed_mccs=("7995",),
        expose_holder_name=False,
    ),
)

_AS_OF = datetime(2026, 11, 20, 16, 0, tzinfo=UTC)
# Mid rates (illustrative, late 2026), as decimal strings: units of quote per 1 base.
EXAMPLE_RATES: tuple[RateQuote, ...] = tuple(
    RateQuote(base=b, quote=q, rate=r, source=s, as_of=_AS_OF)
    for b, q, r, s in (
        ("EUR", "USD", "1.0855", "ECB euro reference rate"),
        ("EUR", "GBP", "0.8402", "ECB euro reference rate"),
        ("EUR", "JPY", "162.35", "ECB euro reference rate"),
        ("EUR", "CHF", "0.9412", "ECB euro reference rate"),
        ("EUR", "SEK", "11.4820", "ECB euro reference rate"),
        ("EUR", "PLN", "4.3120", "ECB euro reference rate"),
        ("EUR", "CAD", "1.5034", "ECB euro reference rate"),
        ("EUR", "AUD", "1.6630", "ECB euro reference rate"),
        ("EUR", "DKK", "7.4589", "ECB euro reference rate"),
        ("GBP", "USD", "1.2920", "BoE spot rate 16:00"),
        ("GBP", "JPY", "193.22", "BoE spot rate 16:00"),
        ("GBP", "CHF", "1.1201", "BoE spot rate 16:00"),
        ("GBP", "SEK", "13.6650", "BoE spot rate 16:00"),
        ("GBP", "CAD", "1.7893", "BoE spot rate 16:00"),
        ("GBP", "AUD", "1.9794", "BoE spot rate 16:00"),
        ("GBP", "KWD", "0.3971", "BoE spot rate 16:00"),
    )
)


def _m(id_: str, name: str, mcc: str, city: str, country: str) -> MerchantInfo:
    return MerchantInfo(id=id_, name=name, mcc=mcc, city=city, country=country)


EXAMPLE_MERCHANTS: tuple[MerchantInfo, ...] = (
    _m("M-GB-000101", "TESCO STORES 3041", "5411", "London", "GB"),
    _m("M-GB-000102", "PRET A MANGER", "5814", "Manchester", "GB"),
    _m("M-GB-000103", "SHELL KINGS CROSS", "5541", "London", "GB"),
    _m("M-GB-000104", "TRAINLINE", "4112", "London", "GB"),
    _m("M-IE-000201", "RYANAIR", "4511", "Dublin", "IE"),
    _m("M-IE-000202", "DUNNES STORES", "5411", "Cork", "IE"),
    _m("M-DE-000301", "REWE MARKT", "5411", "Berlin", "DE"),
    _m("M-DE-000302", "DEUTSCHE BAHN", "4112", "Hamburg", "DE"),
    _m("M-US-000401", "KATZ'S DELICATESSEN", "5812", "New York", "US"),
    _m("M-JP-000501", "HOTEL GRACERY SHINJUKU", "7011", "Tokyo", "JP"),
    _m("M-MT-000601", "CASINO MALTA", "7995", "St Julian's", "MT"),
    _m("M-CH-000701", "SBB CFF FFS", "4112", "Zürich", "CH"),
)

_PRODUCTS = (
    ("current-account", 60),
    ("credit-card", 25),
    ("business-current-account", 7),
    ("currency-account", 8),
)


def luhn_check_digit(partial: str) -> str:
    """The Luhn check digit to append to PARTIAL."""
    total = 0
    for i, ch in enumerate(reversed(partial)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def _pan(rng: random.Random, bin_: str) -> str:
    body = bin_ + "".join(str(rng.randrange(10)) for _ in range(15 - len(bin_)))
    return body + luhn_check_digit(body)


def iban_check_digits(country: str, bban: str) -> str:
    """ISO 13616 check digits: 98 − (BBAN + country + "00", letters as 10..35) mod 97."""
    numeric = "".join(str(int(ch, 36)) for ch in bban + country + "00")
    return f"{98 - int(numeric) % 97:02d}"


def _national(
    rng: random.Random, country: str, profile: _Profile, sort_code: str
) -> tuple[str, str]:
    """(IBAN, account number): a valid IBAN for a random account number.

    GB and IE BBANs (bank code, sort code, 8-digit account) have no national check digit
    beyond the IBAN's own, computed here directly (fast); a DE account number has one, so
    schwifty validates it and we draw again when it fails.
    """
    while True:
        if country == "DE":
            number = str(rng.randrange(10**9, 10**10))
            bban = profile.bank_code + number
        else:
            number = str(rng.randrange(10**7, 10**8))
            bban = profile.bank_code + sort_code + number
        iban = country + iban_check_digits(country, bban) + bban
        if country != "DE":
            return iban, number
        try:
            IBAN(iban, validate_bban=True)
        except ValueError:
            continue  # national check digits failed for this number: draw another
        return iban, number


def _address(rng: random.Random, country: str, profile: _Profile, city: str) -> str:
    street, number = rng.choice(profile.streets), rng.randrange(1, 200)
    return f"{street} {number}, {city}" if country == "DE" else f"{number} {street}, {city}"


def generate_refdata(
    n_accounts: int,
    tenants: Sequence[TenantSettings] | None = None,
    seed: int = 0,
    tokenizer: TokenizerLike | None = None,
    *,
    declared: str | None = None,
    on_progress: Callable[[int], None] | None = None,
    only_tenants: Collection[str] | None = None,
) -> GeneratedRefData:
    """N_ACCOUNTS accounts spread over TENANTS (default: `EXAMPLE_TENANTS`), 1–2 cards each.

    ONLY_TENANTS, if given, keeps just those tenants' records (a shard that holds whole tenants
    loads no one else's accounts): every kept account and card is the same as in the full
    data set of the same seed, because the others are still drawn, only not kept.

    TOKENIZER turns each card's PAN into its token (it must use the key the pipeline
    tokenizes with, or enrichment will not find the accounts). Tenants must be in GB, IE or DE
    (the countries with a national account-number profile here). ON_PROGRESS, if given, is
    called with the number of accounts made so far (every 1,000 and at the end).
    """
    if n_accounts < 0:
        raise ValueError("n_accounts must not be negative")
    if tokenizer is None:
        raise ValueError("generate_refdata needs the pipeline's Tokenizer to link cards")
    tenant_list = list(tenants or EXAMPLE_TENANTS)
    for t in tenant_list:
        if t.country not in _PROFILES:
            raise ValueError(
                f"tenant {t.id}: no generator profile for country {t.country}; "
                f"use one of {sorted(_PROFILES)}"
            )
    if only_tenants is not None:
        unknown = sorted(set(only_tenants) - {t.id for t in tenant_list})
        if unknown:
            raise ValueError(f"only_tenants: no such tenant {', '.join(unknown)}")

    def kept(tenant_id: str) -> bool:
        return only_tenants is None or tenant_id in only_tenants

    rng = random.Random(seed)
    branches: list[Branch] = []
    by_tenant: dict[str, list[Branch]] = {}
    for t in tenant_list:
        profile = _PROFILES[t.country]
        for k, (city, street) in enumerate(profile.cities):
            if t.country == "DE":
                sort_code = profile.bank_code
            else:
                sort_code = f"{rng.randrange(10, 99)}{rng.randrange(0, 100):02d}{k:02d}"
            b = Branch(
                id=f"{t.id}-BR{k + 1:03d}",
                tenant=t.id,
                sort_code=sort_code,
                name=f"{city}",
                address=street,
            )
            branches.append(b)
            by_tenant.setdefault(t.id, []).append(b)

    accounts: list[Account] = []
    cards: list[GeneratedCard] = []
    seen_pans: set[str] = set()
    products = [p for p, _ in _PRODUCTS]
    weights = [w for _, w in _PRODUCTS]
    for i in range(n_accounts):
        t = tenant_list[i % len(tenant_list)]
        profile = _PROFILES[t.country]
        branch = rng.choice(by_tenant[t.id])
        product = rng.choices(products, weights)[0]
        currency = (
            rng.choice(profile.other_currencies)
            if product == "currency-account"
            else t.home_currency
        )
        iban, number = _national(rng, t.country, profile, branch.sort_code)
        first, last = rng.choice(profile.first_names), rng.choice(profile.last_names)
        city = profile.cities[rng.randrange(len(profile.cities))][0]
        account_id = f"{t.id.upper()}-{i + 1:08d}"
        keep = kept(t.id)
        tokens: list[str] = []
        for _ in range(1 if rng.random() < 0.7 else 2):
            pan = _pan(rng, rng.choice(profile.bins))
            while pan in seen_pans:
                pan = _pan(rng, rng.choice(profile.bins))
            seen_pans.add(pan)
            if not keep:
                continue
            ct = tokenizer.tokenize(pan, t.id)
            tokens.append(ct.token)
            cards.append(GeneratedCard(t.id, account_id, pan, ct.token, ct.masked, currency))
        holder_id = f"CUST-{t.country}-{rng.randrange(10**7, 10**8)}"
        address = _address(rng, t.country, profile, city)
        if keep:
            accounts.append(
                Account(
                    id=account_id,
                    tenant=t.id,
                    iban=iban,
                    sort_code=branch.sort_code,
                    account_number=number,
                    holder_id=holder_id,
                    holder_name=f"{first} {last}",
                    holder_address=address,
                    product_type=product,
                    currency=currency,
                    branch_id=branch.id,
                    card_tokens=tuple(tokens),
                )
            )
        if on_progress is not None and (i + 1) % 1000 == 0:
            on_progress(i + 1)
    if on_progress is not None:
        on_progress(n_accounts)
    refdata = RefData.build(
        declared or f"generated-seed{seed}-n{n_accounts}",
        tenants=[t for t in tenant_list if kept(t.id)],
        accounts=accounts,
        branches=[b for b in branches if kept(b.tenant)],
        rates=list(EXAMPLE_RATES),
        merchants=list(EXAMPLE_MERCHANTS),
    )
    return GeneratedRefData(refdata=refdata, cards=cards)


# The key the shipped examples/refdata was tokenized with. EXAMPLE ONLY: it is public, so
# tokens made with it protect nothing; real deployments configure their own vault key.
EXAMPLE_MASTER_KEY = hashlib.sha256(b"paypost examples/refdata - public demo key").digest()
EXAMPLE_SEED = 20261121
EXAMPLE_ACCOUNTS = 24
EXAMPLE_VERSION = "2026.11.21-1"


# The well-known test card numbers of the sample authorization files in examples/ (the
# payment networks' published test PANs): linked to uk-bank accounts in the example reference
# data, so `paypost run` on the samples posts them.
EXAMPLE_SAMPLE_TENANT = "uk-bank"
EXAMPLE_SAMPLE_PANS = (
    "4111111111111111",
    "5555555555554444",
    "4012888888881881",
    "5105105105105100",
    "378282246310005",
)


def example_refdata() -> GeneratedRefData:
    """The data shipped in examples/refdata (regenerate it with `write_refdata_dir`)."""
    tokenizer = Tokenizer(VaultKeys.from_master(EXAMPLE_MASTER_KEY).token_key)
    generated = generate_refdata(
        EXAMPLE_ACCOUNTS, seed=EXAMPLE_SEED, tokenizer=tokenizer, declared=EXAMPLE_VERSION
    )
    refdata = generated.refdata
    accounts = list(refdata.accounts.values())
    home = [i for i, a in enumerate(accounts) if a.tenant == EXAMPLE_SAMPLE_TENANT]
    cards = list(generated.cards)
    for n, pan in enumerate(EXAMPLE_SAMPLE_PANS):
        i = home[n % len(home)]
        account = accounts[i]
        ct = tokenizer.tokenize(pan, EXAMPLE_SAMPLE_TENANT)
        accounts[i] = msgspec.structs.replace(account, card_tokens=(*account.card_tokens, ct.token))
        cards.append(
            GeneratedCard(
                EXAMPLE_SAMPLE_TENANT, account.id, pan, ct.token, ct.masked, account.currency
            )
        )
    rebuilt = RefData.build(
        EXAMPLE_VERSION,
        tenants=list(refdata.tenants.values()),
        accounts=accounts,
        branches=list(refdata.branches.values()),
        rates=list(refdata.rates.values()),
        merchants=list(refdata.merchants.values()),
    )
    return GeneratedRefData(refdata=rebuilt, cards=cards)
