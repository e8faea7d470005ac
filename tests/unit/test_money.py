"""Money: ISO 4217 exponents, exact decimal parsing/formatting, currency-safe arithmetic, FX."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paypost.money import (
    CURRENCY_EXPONENTS,
    CurrencyMismatch,
    FxRate,
    InvalidAmount,
    Money,
    UnknownCurrency,
    convert,
    exponent,
)

AS_OF = datetime(2026, 11, 21, 16, 0, tzinfo=UTC)


def test_exponents_cover_the_iso_table() -> None:
    assert (exponent("EUR"), exponent("JPY"), exponent("BHD"), exponent("CLF")) == (2, 0, 3, 4)
    assert exponent("IQD") == 3 and exponent("KRW") == 0 and exponent("UYW") == 4
    assert len(CURRENCY_EXPONENTS) >= 150
    iso_codes = Path("/usr/share/iso-codes/json/iso_4217.json")  # Debian iso-codes, if present
    if iso_codes.exists():
        listed = {c["alpha_3"] for c in json.loads(iso_codes.read_text())["4217"]}
        # Every code we accept is a real ISO 4217 code (or one newer than iso-codes 4.15).
        assert set(CURRENCY_EXPONENTS) - listed <= {"XCG", "ZWG"}


def test_unknown_and_withdrawn_currencies_are_refused_clearly() -> None:
    with pytest.raises(UnknownCurrency, match="unknown currency 'EUX'"):
        Money(1, "EUX")
    with pytest.raises(UnknownCurrency, match=r"withdrawn.*'EUR'"):
        Money(1, "HRK")
    with pytest.raises(UnknownCurrency):
        Money(1, "XAU")  # no minor unit: not postable


def test_floats_never_get_in() -> None:
    with pytest.raises(TypeError):
        Money(10.5, "EUR")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Money(True, "EUR")
    with pytest.raises(InvalidAmount, match="floats"):
        Money.parse(10.5, "EUR")  # type: ignore[arg-type]
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"minor": 10.5, "currency": "EUR"}', type=Money)


def test_parse_and_format() -> None:
    assert Money.parse("10.50", "EUR") == Money(1050, "EUR")
    assert Money.parse("-0.05", "EUR") == Money(-5, "EUR")
    assert Money.parse("1000", "JPY") == Money(1000, "JPY")
    assert Money.parse("1.5", "BHD") == Money(1500, "BHD")
    assert Money.parse("1.000", "EUR") == Money(100, "EUR")
    with pytest.raises(InvalidAmount, match="more decimals than EUR allows"):
        Money.parse("1.005", "EUR")
    with pytest.raises(InvalidAmount, match="more decimals than JPY"):
        Money.parse("1.5", "JPY")
    for bad in ("", "1,50", "1e3", "--1", "abc", "1.2.3"):
        with pytest.raises(InvalidAmount):
            Money.parse(bad, "EUR")
    assert Money(1050, "EUR").format() == "10.50"
    assert Money(-5, "EUR").format() == "-0.05"
    assert Money(7, "BHD").format() == "0.007"
    assert Money(1234, "JPY").format() == "1234"
    assert str(Money(1234, "CLF")) == "0.1234 CLF"


@settings(max_examples=200)
@given(
    st.integers(min_value=-(10**15), max_value=10**15), st.sampled_from(sorted(CURRENCY_EXPONENTS))
)
def test_format_parse_round_trip(minor: int, currency: str) -> None:
    m = Money(minor, currency)
    assert Money.parse(m.format(), currency) == m


def test_arithmetic_refuses_to_mix_currencies() -> None:
    a, b = Money(100, "EUR"), Money(50, "EUR")
    assert a + b == Money(150, "EUR") and a - b == Money(50, "EUR") and -a == Money(-100, "EUR")
    assert b < a and a >= b and abs(Money(-3, "EUR")) == Money(3, "EUR")
    with pytest.raises(CurrencyMismatch, match="different currencies"):
        _ = a + Money(1, "USD")
    with pytest.raises(CurrencyMismatch):
        _ = a < Money(1, "USD")
    with pytest.raises(TypeError):
        _ = a + 1  # type: ignore[operator]


def rate(r: str, markup: str = "0", base: str = "USD", quote: str = "EUR") -> FxRate:
    return FxRate(base=base, quote=quote, rate=r, source="ECB", as_of=AS_OF, markup=markup)


def test_fx_rate_refuses_floats_and_nonsense() -> None:
    with pytest.raises(InvalidAmount, match="floats"):
        rate(0.92)  # type: ignore[arg-type]
    with pytest.raises(InvalidAmount, match="positive"):
        rate("0")
    with pytest.raises(ValueError, match="two different currencies"):
        rate("1", base="EUR")
    assert convert(Money(200, "USD"), rate("217/200")).charged == Money(217, "EUR")


def test_conversion_rounds_half_even_and_accounts_for_every_unit() -> None:
    # 1.25 USD at 1.0 -> exact; 0.25 at 0.5 -> 12.5 cents -> 12 (half to even).
    assert convert(Money(25, "USD"), rate("0.5")).charged == Money(12, "EUR")
    assert convert(Money(27, "USD"), rate("0.5")).charged == Money(14, "EUR")  # 13.5 -> 14
    c = convert(Money(10_000, "USD"), rate("0.92345", markup="0.015"))
    assert c.at_mid == Money(9234, "EUR")  # 9234.5 -> 9234: half to even, not half up
    assert c.charged.minor == c.at_mid.minor + c.markup.minor + c.rounding.minor
    assert Fraction(c.exact) - c.charged.minor == Fraction(c.residue)
    prov = c.provenance()["fx"]
    assert prov["rate"] == "0.92345" and prov["source"] == "ECB" and prov["markup"] == "0.015"
    assert prov["rounding_rule"] == "half-even" and prov["as_of"] == AS_OF.isoformat()
    with pytest.raises(CurrencyMismatch):
        convert(Money(1, "GBP"), rate("1.1"))


def test_conversion_between_exponents() -> None:
    jpy = convert(Money(1000, "USD"), rate("151.237", quote="JPY"))  # USD 10.00
    assert jpy.charged == Money(1512, "JPY")  # 1512.37 -> 1512
    bhd = convert(Money(1000, "USD"), rate("0.376", quote="BHD"))
    assert bhd.charged == Money(3760, "BHD")


@settings(max_examples=150)
@given(
    st.integers(min_value=1, max_value=10**12),
    st.integers(min_value=1, max_value=10**7),
    st.integers(min_value=0, max_value=500),
    st.sampled_from(["EUR", "JPY", "BHD", "CLF"]),
)
def test_conversion_never_loses_a_unit(
    minor: int, rate_e5: int, markup_bp: int, quote: str
) -> None:
    r = FxRate(
        base="USD",
        quote=quote,
        rate=f"{rate_e5}/100000",
        source="test",
        as_of=AS_OF,
        markup=f"{markup_bp}/10000",
    )
    c = convert(Money(minor, "USD"), r)
    assert c.charged.minor == c.at_mid.minor + c.markup.minor + c.rounding.minor
    assert abs(c.rounding.minor) <= 1
    assert abs(Fraction(c.residue)) <= Fraction(1, 2)
    assert Fraction(c.exact) == c.charged.minor + Fraction(c.residue)


@given(
    minor=st.integers(min_value=-(10**12), max_value=10**12),
    rate=st.sampled_from(["1.0855", "161.2345", "217/577", "0.000123", "3.7"]),
    markup=st.sampled_from(["0", "0.015", "1/3"]),
    pair=st.sampled_from([("EUR", "JPY"), ("USD", "BHD"), ("GBP", "EUR"), ("JPY", "KWD")]),
)
def test_convert_with_cached_rate_factors_equals_the_exact_formula(
    minor: int, rate: str, markup: str, pair: tuple[str, str]
) -> None:
    """convert() caches the parsed rate per quote; the result must be the exact formula's."""
    base, quote = pair
    fx = FxRate(base=base, quote=quote, rate=rate, markup=markup, source="test", as_of=AS_OF)
    got = convert(Money(minor, base), fx)
    scale = Fraction(10 ** exponent(quote), 10 ** exponent(base))
    exact_mid = minor * Fraction(rate) * scale
    exact = exact_mid + exact_mid * Fraction(markup)
    assert got.charged == Money(round(exact), quote)
    assert got.at_mid == Money(round(exact_mid), quote)
    assert got.exact == str(exact)
    assert got.charged.minor == got.at_mid.minor + got.markup.minor + got.rounding.minor
