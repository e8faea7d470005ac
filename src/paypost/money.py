"""Money: an integer of minor units plus an ISO 4217 code. Never a float (DESIGN §3.2).

The ledger issue completes this module (full ISO 4217 exponent table, FX conversion with
provenance). The struct's shape is a contract: events carry `{"minor": int, "currency": str}`.
"""

from __future__ import annotations

import msgspec

# ISO 4217 minor-unit exponents. Source: ISO 4217 list one (SIX Financial Information).
CURRENCY_EXPONENTS: dict[str, int] = {
    "EUR": 2,
    "USD": 2,
    "GBP": 2,
    "CHF": 2,
    "JPY": 0,
    "BHD": 3,
    "IQD": 3,
    "KWD": 3,
    "JOD": 3,
    "LYD": 3,
    "OMR": 3,
    "TND": 3,
    "CLF": 4,
    "UYW": 4,
    "SEK": 2,
    "NOK": 2,
    "DKK": 2,
    "PLN": 2,
    "CZK": 2,
    "HUF": 2,
    "CAD": 2,
    "AUD": 2,
    "NZD": 2,
    "SGD": 2,
    "HKD": 2,
    "CNY": 2,
    "INR": 2,
    "BRL": 2,
    "MXN": 2,
    "ZAR": 2,
    "KRW": 0,
    "ISK": 0,
    "VND": 0,
    "XAF": 0,
    "XOF": 0,
    "CLP": 0,
    "PYG": 0,
    "UGX": 0,
    "RWF": 0,
    "KMF": 0,
    "DJF": 0,
    "GNF": 0,
    "VUV": 0,
    "XPF": 0,
    "BIF": 0,
    "TRY": 2,
    "AED": 2,
    "SAR": 2,
    "ILS": 2,
    "THB": 2,
    "MYR": 2,
    "IDR": 2,
    "PHP": 2,
    "RON": 2,
    "BGN": 2,
}


class UnknownCurrency(ValueError):
    """A currency code that is not in the ISO 4217 table."""


def exponent(currency: str) -> int:
    """The ISO 4217 minor-unit exponent of CURRENCY (EUR 2, JPY 0, BHD 3)."""
    try:
        return CURRENCY_EXPONENTS[currency]
    except KeyError:
        raise UnknownCurrency(
            f"unknown currency {currency!r}: expected an ISO 4217 alphabetic code such as "
            "'EUR', 'USD' or 'JPY'"
        ) from None


class Money(msgspec.Struct, frozen=True, array_like=False):
    """An amount in minor units of an ISO 4217 currency: Money(1050, "EUR") is EUR 10.50."""

    minor: int
    currency: str

    def __post_init__(self) -> None:
        if type(self.minor) is not int:
            raise TypeError(f"Money.minor must be an int of minor units, got {self.minor!r}")
        exponent(self.currency)
