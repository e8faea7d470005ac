"""Money: an integer of minor units plus an ISO 4217 code. Never a float (DESIGN §3.2).

The struct's shape is a contract: events carry `{"minor": int, "currency": str}`.

What is here:
- `CURRENCY_EXPONENTS`: every active ISO 4217 currency with its minor-unit exponent;
- `Money`: refuses floats and unknown codes; arithmetic refuses to mix currencies;
  `Money.parse("10.50", "EUR")` and `Money.format()` work on decimal strings, never floats;
- `FxRate` + `convert()`: currency conversion that records its provenance (rate, source, as-of
  time, markup) and states its rounding rule (half-even to the target minor unit); the result
  says where every minor unit went (mid amount + markup + rounding == charged amount).
"""

from __future__ import annotations

import functools
import re
from datetime import datetime
from fractions import Fraction
from typing import Any

import msgspec

# ISO 4217 minor-unit exponents ("minor unit" column) of every ACTIVE code of List One
# (current currency & funds), as published by the ISO 4217 maintenance agency (SIX Financial
# Information, https://www.six-group.com/en/products-services/financial-information/
# data-standards.html, list_one.xml, 2025 edition; ISO 4217:2015 + amendments through the
# introduction of XCG and ZWG). The set of codes was cross-checked against Debian iso-codes 4.15
# (/usr/share/iso-codes/json/iso_4217.json), which carries no exponents.
# Codes whose minor unit is "N.A." in List One (precious metals XAU/XAG/XPT/XPD, bond-market
# units XBA–XBD, XDR, XSU, XUA, the testing code XTS and "no currency" XXX) have no minor unit,
# so no integer amount of them can be posted: they are deliberately absent.
CURRENCY_EXPONENTS: dict[str, int] = {
    "AED": 2, "AFN": 2, "ALL": 2, "AMD": 2, "AOA": 2, "ARS": 2, "AUD": 2, "AWG": 2,
    "AZN": 2, "BAM": 2, "BBD": 2, "BDT": 2, "BGN": 2, "BHD": 3, "BIF": 0, "BMD": 2,
    "BND": 2, "BOB": 2, "BOV": 2, "BRL": 2, "BSD": 2, "BTN": 2, "BWP": 2, "BYN": 2,
    "BZD": 2, "CAD": 2, "CDF": 2, "CHE": 2, "CHF": 2, "CHW": 2, "CLF": 4, "CLP": 0,
    "CNY": 2, "COP": 2, "COU": 2, "CRC": 2, "CUP": 2, "CVE": 2, "CZK": 2, "DJF": 0,
    "DKK": 2, "DOP": 2, "DZD": 2, "EGP": 2, "ERN": 2, "ETB": 2, "EUR": 2, "FJD": 2,
    "FKP": 2, "GBP": 2, "GEL": 2, "GHS": 2, "GIP": 2, "GMD": 2, "GNF": 0, "GTQ": 2,
    "GYD": 2, "HKD": 2, "HNL": 2, "HTG": 2, "HUF": 2, "IDR": 2, "ILS": 2, "INR": 2,
    "IQD": 3, "IRR": 2, "ISK": 0, "JMD": 2, "JOD": 3, "JPY": 0, "KES": 2, "KGS": 2,
    "KHR": 2, "KMF": 0, "KPW": 2, "KRW": 0, "KWD": 3, "KYD": 2, "KZT": 2, "LAK": 2,
    "LBP": 2, "LKR": 2, "LRD": 2, "LSL": 2, "LYD": 3, "MAD": 2, "MDL": 2, "MGA": 2,
    "MKD": 2, "MMK": 2, "MNT": 2, "MOP": 2, "MRU": 2, "MUR": 2, "MVR": 2, "MWK": 2,
    "MXN": 2, "MXV": 2, "MYR": 2, "MZN": 2, "NAD": 2, "NGN": 2, "NIO": 2, "NOK": 2,
    "NPR": 2, "NZD": 2, "OMR": 3, "PAB": 2, "PEN": 2, "PGK": 2, "PHP": 2, "PKR": 2,
    "PLN": 2, "PYG": 0, "QAR": 2, "RON": 2, "RSD": 2, "RUB": 2, "RWF": 0, "SAR": 2,
    "SBD": 2, "SCR": 2, "SDG": 2, "SEK": 2, "SGD": 2, "SHP": 2, "SLE": 2, "SOS": 2,
    "SRD": 2, "SSP": 2, "STN": 2, "SVC": 2, "SYP": 2, "SZL": 2, "THB": 2, "TJS": 2,
    "TMT": 2, "TND": 3, "TOP": 2, "TRY": 2, "TTD": 2, "TWD": 2, "TZS": 2, "UAH": 2,
    "UGX": 0, "USD": 2, "USN": 2, "UYI": 0, "UYU": 2, "UYW": 4, "UZS": 2, "VED": 2,
    "VES": 2, "VND": 0, "VUV": 0, "WST": 2, "XAF": 0, "XCD": 2, "XCG": 2, "XOF": 0,
    "XPF": 0, "YER": 2, "ZAR": 2, "ZMW": 2, "ZWG": 2,
}  # fmt: skip

# Recently withdrawn codes and their successors, so the error says what to use instead.
WITHDRAWN_CURRENCIES: dict[str, str] = {
    "HRK": "EUR",  # Croatia joined the euro on 2023-01-01
    "SLL": "SLE",  # Sierra Leone redenominated (1000 SLL = 1 SLE)
    "ZWL": "ZWG",  # Zimbabwe Gold replaced the Zimbabwe dollar in 2024
    "ANG": "XCG",  # Caribbean guilder replaced the Netherlands Antillean guilder in 2025
    "CUC": "CUP",  # Cuba ended the convertible peso
    "VEF": "VES",
    "MRO": "MRU",
    "STD": "STN",
}


class UnknownCurrency(ValueError):
    """A currency code that is not in the ISO 4217 table."""


class CurrencyMismatch(ValueError):
    """Arithmetic or a comparison between amounts of two different currencies."""


class InvalidAmount(ValueError):
    """A decimal amount string that cannot be an exact amount of the currency."""


def exponent(currency: str) -> int:
    """The ISO 4217 minor-unit exponent of CURRENCY (EUR 2, JPY 0, BHD 3)."""
    try:
        return CURRENCY_EXPONENTS[currency]
    except (KeyError, TypeError):
        pass
    if isinstance(currency, str) and currency in WITHDRAWN_CURRENCIES:
        raise UnknownCurrency(
            f"currency {currency!r} has been withdrawn from ISO 4217: "
            f"use {WITHDRAWN_CURRENCIES[currency]!r} instead"
        )
    raise UnknownCurrency(
        f"unknown currency {currency!r}: expected an active ISO 4217 alphabetic code with a "
        "minor unit, such as 'EUR', 'USD' or 'JPY'"
    )


_DECIMAL_RE = re.compile(r"([+-]?)(\d+)(?:\.(\d*))?")


def parse_decimal(text: str, what: str = "decimal") -> Fraction:
    """An exact Fraction from a decimal string ("1.0855") or an integer ratio ("10855/10000").

    Floats are refused: a float has already lost the exact value.
    """
    if not isinstance(text, str):
        raise InvalidAmount(
            f"{what} must be a decimal string such as '1.0855' or a ratio such as '217/200', "
            f"not {type(text).__name__} {text!r} (floats are never exact)"
        )
    return _parse_decimal_text(text, what)


@functools.lru_cache(maxsize=4096)
def _parse_decimal_text(text: str, what: str) -> Fraction:
    # Pure and the result immutable, so cached: the same few rate and markup strings are
    # parsed for every FX conversion on the hot path (errors are raised, never cached).
    s = text.strip()
    if "/" in s:
        num, _, den = s.partition("/")
        if re.fullmatch(r"[+-]?\d+", num.strip()) and re.fullmatch(r"\d+", den.strip()):
            if int(den) == 0:
                raise InvalidAmount(f"{what} {text!r} has a zero denominator")
            return Fraction(int(num), int(den))
    elif _DECIMAL_RE.fullmatch(s):
        return Fraction(s)
    raise InvalidAmount(
        f"{what} {text!r} is not a decimal string such as '1.0855' or a ratio such as '217/200'"
    )


class Money(msgspec.Struct, frozen=True, array_like=False):
    """An amount in minor units of an ISO 4217 currency: Money(1050, "EUR") is EUR 10.50."""

    minor: int
    currency: str

    def __post_init__(self) -> None:
        if type(self.minor) is not int:
            raise TypeError(f"Money.minor must be an int of minor units, got {self.minor!r}")
        exponent(self.currency)

    # -- construction and rendering (decimal strings, never floats) --------------------------

    @classmethod
    def parse(cls, text: str, currency: str) -> Money:
        """Money from a decimal string in major units: parse("10.50", "EUR") == Money(1050, "EUR").

        More decimals than the currency has are refused unless they are zeros (no silent
        rounding): parse("1.005", "EUR") is an error, parse("1.000", "EUR") is EUR 1.00.
        """
        exp = exponent(currency)
        if not isinstance(text, str):
            raise InvalidAmount(
                f"amount {text!r} must be a decimal string such as '10.50', "
                f"not {type(text).__name__} (floats are never exact)"
            )
        m = _DECIMAL_RE.fullmatch(text.strip())
        if m is None:
            raise InvalidAmount(
                f"amount {text!r} is not a decimal number such as '10.50' or '-3' "
                "(digits, an optional sign and one optional decimal point)"
            )
        sign, whole, frac = m.group(1), m.group(2), m.group(3) or ""
        if len(frac) > exp:
            if frac[exp:].strip("0"):
                raise InvalidAmount(
                    f"amount {text!r} has more decimals than {currency} allows ({exp}); "
                    f"round it to {exp} decimal place(s) first"
                )
            frac = frac[:exp]
        minor = int(whole) * 10**exp + (int(frac.ljust(exp, "0")) if exp else 0)
        return cls(-minor if sign == "-" else minor, currency)

    @classmethod
    def zero(cls, currency: str) -> Money:
        return cls(0, currency)

    def format(self) -> str:
        """The amount in major units as a decimal string: Money(-1050, "EUR") -> "-10.50"."""
        exp = exponent(self.currency)
        sign = "-" if self.minor < 0 else ""
        digits = str(abs(self.minor))
        if exp == 0:
            return sign + digits
        digits = digits.rjust(exp + 1, "0")
        return f"{sign}{digits[:-exp]}.{digits[-exp:]}"

    def __str__(self) -> str:
        return f"{self.format()} {self.currency}"

    # -- arithmetic that refuses to mix currencies -------------------------------------------

    def _same(self, other: Any, op: str) -> Money:
        if not isinstance(other, Money):
            raise TypeError(f"cannot {op} Money and {type(other).__name__}")
        if other.currency != self.currency:
            raise CurrencyMismatch(
                f"cannot {op} {self} and {other}: different currencies; convert one first"
            )
        return other

    def __add__(self, other: Money) -> Money:
        return Money(self.minor + self._same(other, "add").minor, self.currency)

    def __sub__(self, other: Money) -> Money:
        return Money(self.minor - self._same(other, "subtract").minor, self.currency)

    def __neg__(self) -> Money:
        return Money(-self.minor, self.currency)

    def __abs__(self) -> Money:
        return Money(abs(self.minor), self.currency)

    def __lt__(self, other: Money) -> bool:
        return self.minor < self._same(other, "compare").minor

    def __le__(self, other: Money) -> bool:
        return self.minor <= self._same(other, "compare").minor

    def __gt__(self, other: Money) -> bool:
        return self.minor > self._same(other, "compare").minor

    def __ge__(self, other: Money) -> bool:
        return self.minor >= self._same(other, "compare").minor

    def is_zero(self) -> bool:
        return self.minor == 0


def total(amounts: list[Money] | tuple[Money, ...], currency: str) -> Money:
    """The sum of AMOUNTS, all in CURRENCY (an empty list sums to zero)."""
    result = Money(0, currency)
    for a in amounts:
        result = result + a
    return result


# -- FX conversion ----------------------------------------------------------------------------

ROUNDING_RULE = "half-even"


class FxRate(msgspec.Struct, frozen=True, kw_only=True):
    """A quoted rate and where it came from (its provenance travels with every conversion).

    `rate` is the mid rate: units of QUOTE per one unit of BASE, in major units, as a decimal
    string ("1.0855") or an integer ratio ("217/200") — never a float. `markup` is the fraction
    added on top of the mid rate and charged to the customer ("0.015" = 1.5 %), the spread.
    """

    base: str
    quote: str
    rate: str
    source: str
    as_of: datetime
    markup: str = "0"

    def __post_init__(self) -> None:
        exponent(self.base)
        exponent(self.quote)
        if self.base == self.quote:
            raise ValueError(f"an FX rate needs two different currencies, got {self.base} twice")
        if parse_decimal(self.rate, "FX rate") <= 0:
            raise InvalidAmount(f"FX rate {self.rate!r} must be positive")
        if parse_decimal(self.markup, "FX markup") < 0:
            raise InvalidAmount(f"FX markup {self.markup!r} must not be negative")
        if not self.source:
            raise ValueError("an FX rate needs a source (e.g. 'ECB' or a reference-data version)")


class Conversion(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of `convert`: every minor unit of `charged` is accounted for.

    charged == at_mid + markup + rounding, where
      at_mid   = half-even(source × mid rate)                     (goes to the FX position)
      markup   = half-even(source × mid rate × markup)            (fee income)
      charged  = half-even(source × mid rate × (1 + markup))      (what the customer pays)
      rounding = charged − at_mid − markup, −1..+1 minor unit     (the FX rounding account)
    `exact` is the unrounded charged amount in target minor units as an exact ratio, and
    `residue` = exact − charged (|residue| ≤ ½ minor unit), both kept as provenance.
    """

    source: Money
    charged: Money
    at_mid: Money
    markup: Money
    rounding: Money
    exact: str
    residue: str
    rate: FxRate
    rounding_rule: str = ROUNDING_RULE

    def provenance(self) -> dict[str, Any]:
        """A JSON-ready record of the conversion, for a journal entry's metadata."""
        return {
            "fx": {
                "base": self.rate.base,
                "quote": self.rate.quote,
                "rate": self.rate.rate,
                "markup": self.rate.markup,
                "source": self.rate.source,
                "as_of": self.rate.as_of.isoformat(),
                "rounding_rule": self.rounding_rule,
                "source_amount": {"minor": self.source.minor, "currency": self.source.currency},
                "charged": {"minor": self.charged.minor, "currency": self.charged.currency},
                "at_mid": self.at_mid.minor,
                "markup_amount": self.markup.minor,
                "rounding": self.rounding.minor,
                "exact": self.exact,
                "residue": self.residue,
            }
        }


def _half_even(value: Fraction) -> int:
    # Fraction.__round__ without ndigits rounds half to even (banker's rounding), exactly.
    return round(value)


@functools.lru_cache(maxsize=4096)
def _rate_factors(rate: str, markup: str, base: str, quote: str) -> tuple[Fraction, Fraction]:
    """(mid rate × minor-unit scale, markup) as exact Fractions, computed once per quote."""
    scale = Fraction(10 ** exponent(quote), 10 ** exponent(base))
    return parse_decimal(rate, "FX rate") * scale, parse_decimal(markup, "FX markup")


def convert(amount: Money, rate: FxRate) -> Conversion:
    """Convert AMOUNT (in rate.base) into rate.quote, rounding half-even to the minor unit.

    No float is involved: amounts are ints, rates exact Fractions. The function is pure and
    deterministic, so a redelivered event converts to exactly the same legs.
    """
    if amount.currency != rate.base:
        raise CurrencyMismatch(
            f"cannot convert {amount} with a {rate.base}->{rate.quote} rate: "
            f"the amount must be in {rate.base}"
        )
    mid_scaled, mk = _rate_factors(rate.rate, rate.markup, rate.base, rate.quote)
    exact_mid = amount.minor * mid_scaled
    exact_markup = exact_mid * mk
    exact = exact_mid + exact_markup
    charged = _half_even(exact)
    at_mid = _half_even(exact_mid)
    markup = _half_even(exact_markup)
    rounding = charged - at_mid - markup
    # Each of the three rounds moves at most ½ unit, so the difference is at most 1 unit.
    assert abs(rounding) <= 1, (amount, rate, rounding)
    q = rate.quote
    return Conversion(
        source=amount,
        charged=Money(charged, q),
        at_mid=Money(at_mid, q),
        markup=Money(markup, q),
        rounding=Money(rounding, q),
        exact=str(exact),
        residue=str(exact - charged),
        rate=rate,
    )
