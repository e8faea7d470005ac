"""Reference data: tenants, accounts master, branches, FX rates, merchants (FR6).

`RefData` is one immutable, versioned snapshot held in dicts, loaded once (from files with
`paypost.refdata.files`, or from the embedded database with `paypost.refdata.store`) and read
by the enrichment stage through the `RefDataPort` protocol: every lookup is a dict access, so
per-event work stays in microseconds (DESIGN §5).

The version id is "<declared version>+<first 12 hex of the content hash>": the declared
version says what the bank called the release, the hash proves which bytes were used. It is
recorded on every enriched event (`TransactionEnriched.refdata_version`).
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Protocol

import msgspec

from paypost.money import FxRate, Money, parse_decimal


class TenantSettings(msgspec.Struct, frozen=True, kw_only=True):
    """One tenant (a bank, a geography): its settings, isolated from the others."""

    id: str
    name: str
    country: str  # ISO 3166 alpha-2 of the tenant's home market
    home_currency: str  # ISO 4217
    high_value_threshold: Money  # in the home currency
    fx_markup: str = "0"  # decimal fraction added to the mid rate, e.g. "0.0275" = 2.75 %
    listed_mccs: tuple[str, ...] = ()  # merchant categories the tenant watches (e.g. 7995)
    expose_holder_name: bool = False  # put the holder's name on the bus (default: id only)


class Branch(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    tenant: str
    sort_code: str  # national bank/branch code: 6 digits for GB/IE, BLZ for DE
    name: str
    address: str


class Account(msgspec.Struct, frozen=True, kw_only=True):
    """An account of the accounts master. holder_name/holder_address are personal data:
    encrypted at rest in the database, clear only in memory (`paypost.refdata.store`)."""

    id: str
    tenant: str
    iban: str  # electronic form, validated with schwifty
    sort_code: str
    account_number: str
    holder_id: str  # the bank's pseudonymous customer number: safe to carry on the bus
    holder_name: str
    product_type: str  # e.g. current-account, credit-card, savings
    currency: str  # ISO 4217: the billing currency of the account
    branch_id: str
    card_tokens: tuple[str, ...] = ()
    holder_address: str | None = None


class RateQuote(msgspec.Struct, frozen=True, kw_only=True):
    """A mid rate: units of QUOTE per one unit of BASE, a decimal string (never a float)."""

    base: str
    quote: str
    rate: str
    source: str
    as_of: datetime


class MerchantInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What the bank knows about a merchant (optional file): a clean name, city, country."""

    id: str
    name: str
    mcc: str | None = None
    city: str | None = None
    country: str | None = None  # ISO 3166 alpha-2


class RefDataVersion(msgspec.Struct, frozen=True, kw_only=True):
    declared: str
    content_hash: str  # sha256 hex over the files, in a fixed order

    @property
    def id(self) -> str:
        return f"{self.declared}+{self.content_hash[:12]}"


def content_hash(
    tenants: list[TenantSettings],
    accounts: list[Account],
    branches: list[Branch],
    rates: list[RateQuote],
    merchants: list[MerchantInfo],
) -> str:
    """sha256 over the canonical JSON of the records, each table sorted by id.

    Hashing the parsed records (not the file bytes) gives the same version for the same data
    whatever the file format, and for generated data written to files and read back.
    """
    digest = hashlib.sha256()
    enc = msgspec.json.Encoder(order="deterministic").encode
    for name, records, key in (
        ("tenants", tenants, lambda r: r.id),
        ("accounts", accounts, lambda r: r.id),
        ("branches", branches, lambda r: r.id),
        ("fx_rates", rates, lambda r: (r.base, r.quote)),
        ("merchants", merchants, lambda r: r.id),
    ):
        digest.update(name.encode() + b"\0")
        for record in sorted(records, key=key):
            digest.update(enc(record) + b"\n")
    return digest.hexdigest()


class RefDataPort(Protocol):
    """What enrichment reads. Implemented by `RefData` (loaded once from files or SQLite)."""

    @property
    def version_id(self) -> str: ...

    def tenant(self, tenant_id: str) -> TenantSettings | None: ...

    def account_for_card(self, tenant_id: str, card_token: str) -> Account | None: ...

    def branch(self, branch_id: str) -> Branch | None: ...

    def fx_rate(self, tenant_id: str, base: str, quote: str) -> FxRate | None: ...

    def merchant(self, merchant_id: str) -> MerchantInfo | None: ...


class RefData:
    """One versioned snapshot of the reference data, indexed for O(1) lookups."""

    def __init__(
        self,
        *,
        version: RefDataVersion,
        tenants: list[TenantSettings],
        accounts: list[Account],
        branches: list[Branch],
        rates: list[RateQuote],
        merchants: list[MerchantInfo] | None = None,
    ) -> None:
        self.version = version
        self._version_id = version.id  # read once per enriched event: formatted once
        self.tenants = {t.id: t for t in tenants}
        self.accounts = {a.id: a for a in accounts}
        self.branches = {b.id: b for b in branches}
        self.rates = {(r.base, r.quote): r for r in rates}
        self.merchants = {m.id: m for m in merchants or []}
        self.cards: dict[tuple[str, str], Account] = {}
        for a in accounts:
            for token in a.card_tokens:
                self.cards[(a.tenant, token)] = a
        self._fx_cache: dict[tuple[str, str, str], FxRate | None] = {}

    # -- RefDataPort -------------------------------------------------------------------------

    @property
    def version_id(self) -> str:
        return self._version_id

    def tenant(self, tenant_id: str) -> TenantSettings | None:
        return self.tenants.get(tenant_id)

    def account_for_card(self, tenant_id: str, card_token: str) -> Account | None:
        return self.cards.get((tenant_id, card_token))

    def branch(self, branch_id: str) -> Branch | None:
        return self.branches.get(branch_id)

    def merchant(self, merchant_id: str) -> MerchantInfo | None:
        return self.merchants.get(merchant_id)

    def fx_rate(self, tenant_id: str, base: str, quote: str) -> FxRate | None:
        """The rate to convert BASE into QUOTE for TENANT, with the tenant's markup.

        A direct quote is used as given; otherwise the inverse quote, inverted exactly (a
        ratio, no rounding) and labelled as such in its source. None when neither exists.
        """
        cache_key = (tenant_id, base, quote)
        if cache_key in self._fx_cache:
            return self._fx_cache[cache_key]
        settings = self.tenants.get(tenant_id)
        markup = settings.fx_markup if settings else "0"
        rate: FxRate | None = None
        direct = self.rates.get((base, quote))
        if direct is not None:
            rate = FxRate(
                base=base,
                quote=quote,
                rate=direct.rate,
                source=direct.source,
                as_of=direct.as_of,
                markup=markup,
            )
        else:
            inverse = self.rates.get((quote, base))
            if inverse is not None:
                value = 1 / parse_decimal(inverse.rate, "FX rate")
                rate = FxRate(
                    base=base,
                    quote=quote,
                    rate=f"{value.numerator}/{value.denominator}",
                    source=f"{inverse.source} (inverse of {quote}/{base} {inverse.rate})",
                    as_of=inverse.as_of,
                    markup=markup,
                )
        self._fx_cache[cache_key] = rate
        return rate

    @classmethod
    def build(
        cls,
        declared: str,
        *,
        tenants: list[TenantSettings],
        accounts: list[Account],
        branches: list[Branch],
        rates: list[RateQuote],
        merchants: list[MerchantInfo] | None = None,
    ) -> RefData:
        """A snapshot whose version is DECLARED + the hash of these records."""
        merchants = merchants or []
        version = RefDataVersion(
            declared=declared,
            content_hash=content_hash(tenants, accounts, branches, rates, merchants),
        )
        return cls(
            version=version,
            tenants=tenants,
            accounts=accounts,
            branches=branches,
            rates=rates,
            merchants=merchants,
        )

    def counts(self) -> dict[str, int]:
        return {
            "tenants": len(self.tenants),
            "accounts": len(self.accounts),
            "cards": len(self.cards),
            "branches": len(self.branches),
            "fx_rates": len(self.rates),
            "merchants": len(self.merchants),
        }
