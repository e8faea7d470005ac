"""Reference data files: load (validated, versioned) and write. Formats in docs/refdata.md.

A reference data directory holds a manifest `refdata.yaml`:

    version: "2026.11.21-1"        # the declared version (what the bank calls this release)
    tenants: tenants.yaml          # file names; these are the defaults
    accounts: accounts.csv
    branches: branches.csv
    fx_rates: fx_rates.csv
    merchants: merchants.csv       # optional

Each table file may be CSV (a header row), JSON (an array of objects), JSON Lines, or YAML (a
list, or a mapping with the table's name as its key), chosen by its extension. Every problem
found is reported at once, naming the file, the line or row, what is wrong and what to do.
Nothing is ever a float: amounts and rates are decimal strings.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import pycountry
import yaml
from schwifty import IBAN
from schwifty.exceptions import SchwiftyException

from paypost.config import UserError
from paypost.money import Money, UnknownCurrency, exponent, parse_decimal
from paypost.refdata.model import (
    Account,
    Branch,
    MerchantInfo,
    RateQuote,
    RefData,
    TenantSettings,
)

MANIFEST = "refdata.yaml"
TABLES = ("tenants", "accounts", "branches", "fx_rates", "merchants")
DEFAULT_FILES = {
    "tenants": "tenants.yaml",
    "accounts": "accounts.csv",
    "branches": "branches.csv",
    "fx_rates": "fx_rates.csv",
    "merchants": "merchants.csv",
}
OPTIONAL = {"merchants"}
MAX_PROBLEMS = 50

ACCOUNT_COLUMNS = (
    "account_id",
    "tenant",
    "iban",
    "sort_code",
    "account_number",
    "holder_id",
    "holder_name",
    "holder_address",
    "product_type",
    "currency",
    "branch_id",
    "card_tokens",
)
BRANCH_COLUMNS = ("branch_id", "tenant", "sort_code", "name", "address")
RATE_COLUMNS = ("base", "quote", "rate", "source", "as_of")
MERCHANT_COLUMNS = ("merchant_id", "name", "mcc", "city", "country")

_MCC_RE = re.compile(r"\d{4}")
_DIGITS_RE = re.compile(r"\d+")


class Problems:
    """Collects every problem of a load, then raises one `UserError` listing them."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")

    def raise_if_any(self, directory: Path) -> None:
        if not self.items:
            return
        shown = self.items[:MAX_PROBLEMS]
        more = len(self.items) - len(shown)
        lines = "\n  ".join(shown)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        raise UserError(
            f"reference data in {str(directory)!r} has {len(self.items)} problem(s):\n  "
            f"{lines}{tail}\nFix the files (formats: docs/refdata.md) and load again."
        )


# -- reading rows -----------------------------------------------------------------------------


def _read_rows(path: Path, table: str) -> list[tuple[str, dict[str, Any]]]:
    """(location, row) pairs of a table file, whatever its format."""
    text = path.read_text(encoding="utf-8-sig")
    name = path.name
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        return [(f"{name}:{reader.line_num}", dict(row)) for row in reader]
    if suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                out.append((f"{name}:{n}", json.loads(line)))
        return out
    if suffix == ".json":
        data: Any = json.loads(text)
    elif suffix in (".yaml", ".yml"):
        data = yaml.safe_load(text)
    else:
        raise UserError(
            f"{path}: unknown file type {suffix!r}; use .csv, .json, .jsonl, .yaml or .yml"
        )
    if isinstance(data, dict):
        data = data.get(table)
    if not isinstance(data, list):
        raise UserError(
            f"{path}: expected a list of {table} (or a mapping with a {table!r} key holding one)"
        )
    return [(f"{name}[{i}]", row) for i, row in enumerate(data)]


def _text(row: dict[str, Any], column: str, where: str, problems: Problems) -> str:
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        problems.add(where, f"{column} is missing")
        return ""
    if isinstance(value, float):
        problems.add(
            where,
            f"{column} is the number {value!r}; write it as a quoted decimal string "
            "(floats are never exact)",
        )
        return ""
    return str(value).strip()


def _optional(row: dict[str, Any], column: str) -> str | None:
    value = row.get(column)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _currency(code: str, where: str, problems: Problems) -> str:
    try:
        exponent(code)
    except UnknownCurrency as exc:
        problems.add(where, str(exc))
    return code


def _country(code: str, where: str, problems: Problems) -> str:
    if pycountry.countries.get(alpha_2=code) is None:
        problems.add(where, f"country {code!r} is not an ISO 3166 alpha-2 code such as 'GB'")
    return code


def _timestamp(text: str, where: str, problems: Problems) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            raise ValueError("no UTC offset")
        return moment
    except ValueError:
        problems.add(where, f"as_of {text!r} is not an RFC 3339 time such as 2026-11-21T16:00:00Z")
        return datetime.fromisoformat("1970-01-01T00:00:00+00:00")


# -- tables -----------------------------------------------------------------------------------


def _tenants(
    rows: Iterable[tuple[str, dict[str, Any]]], problems: Problems
) -> list[TenantSettings]:
    out = []
    for where, row in rows:
        tid = _text(row, "id", where, problems)
        currency = _currency(_text(row, "home_currency", where, problems), where, problems)
        country = _country(_text(row, "country", where, problems), where, problems)
        threshold = Money(0, "EUR")
        raw_threshold = _text(row, "high_value_threshold", where, problems)
        markup = str(row.get("fx_markup", "0"))
        if isinstance(row.get("fx_markup"), float):
            problems.add(where, "fx_markup must be a quoted decimal string such as '0.0275'")
        try:
            if raw_threshold and currency:
                threshold = Money.parse(raw_threshold, currency)
            if parse_decimal(markup, "fx_markup") < 0:
                problems.add(where, f"fx_markup {markup!r} must not be negative")
        except (ValueError, TypeError) as exc:
            problems.add(where, str(exc))
        mccs = row.get("listed_mccs") or []
        if not isinstance(mccs, list) or not all(_MCC_RE.fullmatch(str(m)) for m in mccs):
            problems.add(where, "listed_mccs must be a list of 4-digit merchant category codes")
            mccs = []
        expose = row.get("expose_holder_name", False)
        if not isinstance(expose, bool):
            problems.add(where, "expose_holder_name must be true or false")
            expose = False
        out.append(
            TenantSettings(
                id=tid,
                name=_text(row, "name", where, problems),
                country=country,
                home_currency=currency,
                high_value_threshold=threshold,
                fx_markup=markup,
                listed_mccs=tuple(str(m) for m in mccs),
                expose_holder_name=expose,
            )
        )
    return out


def _branches(
    rows: Iterable[tuple[str, dict[str, Any]]], tenants: set[str], problems: Problems
) -> list[Branch]:
    out = []
    for where, row in rows:
        values = {c: _text(row, c, where, problems) for c in BRANCH_COLUMNS}
        if values["tenant"] and values["tenant"] not in tenants:
            problems.add(where, f"tenant {values['tenant']!r} is not in the tenants file")
        sort_code = values["sort_code"].replace("-", "")
        if sort_code and not _DIGITS_RE.fullmatch(sort_code):
            problems.add(where, f"sort_code {values['sort_code']!r} must be digits (e.g. 40-12-76)")
        out.append(
            Branch(
                id=values["branch_id"],
                tenant=values["tenant"],
                sort_code=sort_code,
                name=values["name"],
                address=values["address"],
            )
        )
    return out


def _accounts(
    rows: Iterable[tuple[str, dict[str, Any]]],
    tenants: set[str],
    branches: dict[str, Branch],
    problems: Problems,
) -> list[Account]:
    out = []
    cards: dict[tuple[str, str], str] = {}
    seen_ids: set[str] = set()
    for where, row in rows:
        v = {
            c: _text(row, c, where, problems)
            for c in ACCOUNT_COLUMNS
            if c not in ("card_tokens", "holder_address")
        }
        aid = v["account_id"]
        if aid in seen_ids:
            problems.add(where, f"account_id {aid!r} appears twice")
        seen_ids.add(aid)
        if v["tenant"] and v["tenant"] not in tenants:
            problems.add(where, f"tenant {v['tenant']!r} is not in the tenants file")
        _currency(v["currency"], where, problems)
        iban = v["iban"].replace(" ", "").upper()
        try:
            IBAN(iban, validate_bban=True)
        except SchwiftyException as exc:
            problems.add(where, f"IBAN {v['iban']!r} is not valid ({exc}); check it digit by digit")
        sort_code = v["sort_code"].replace("-", "")
        branch = branches.get(v["branch_id"])
        if v["branch_id"] and branch is None:
            problems.add(where, f"branch_id {v['branch_id']!r} is not in the branches file")
        elif branch is not None and branch.sort_code != sort_code:
            problems.add(
                where,
                f"sort_code {v['sort_code']!r} differs from branch {branch.id}'s "
                f"{branch.sort_code!r}",
            )
        raw_tokens = row.get("card_tokens") or []
        if isinstance(raw_tokens, str):
            raw_tokens = [t for t in raw_tokens.split(";") if t.strip()]
        tokens = tuple(str(t).strip() for t in raw_tokens)
        for token in tokens:
            if _DIGITS_RE.fullmatch(token):
                problems.add(
                    where,
                    "card_tokens holds an all-digit value: card numbers must never be in "
                    "reference data; tokenize them (paypost.security.tokens) first",
                )
                continue
            other = cards.get((v["tenant"], token))
            if other is not None and other != aid:
                problems.add(where, f"card token {token} is also linked to account {other}")
            cards[(v["tenant"], token)] = aid
        out.append(
            Account(
                id=aid,
                tenant=v["tenant"],
                iban=iban,
                sort_code=sort_code,
                account_number=v["account_number"],
                holder_id=v["holder_id"],
                holder_name=v["holder_name"],
                holder_address=_optional(row, "holder_address"),
                product_type=v["product_type"],
                currency=v["currency"],
                branch_id=v["branch_id"],
                card_tokens=tokens,
            )
        )
    return out


def _rates(rows: Iterable[tuple[str, dict[str, Any]]], problems: Problems) -> list[RateQuote]:
    out = []
    seen: set[tuple[str, str]] = set()
    for where, row in rows:
        v = {c: _text(row, c, where, problems) for c in RATE_COLUMNS}
        base = _currency(v["base"], where, problems)
        quote = _currency(v["quote"], where, problems)
        if base == quote and base:
            problems.add(where, f"a rate needs two different currencies, got {base} twice")
        if (base, quote) in seen:
            problems.add(where, f"rate {base}/{quote} appears twice; keep one per pair")
        seen.add((base, quote))
        try:
            if v["rate"] and parse_decimal(v["rate"], "rate") <= 0:
                problems.add(where, f"rate {v['rate']!r} must be positive")
        except ValueError as exc:
            problems.add(where, str(exc))
        as_of = _timestamp(v["as_of"], where, problems) if v["as_of"] else None
        if as_of is not None:
            out.append(
                RateQuote(base=base, quote=quote, rate=v["rate"], source=v["source"], as_of=as_of)
            )
    return out


def _merchants(
    rows: Iterable[tuple[str, dict[str, Any]]], problems: Problems
) -> list[MerchantInfo]:
    out = []
    for where, row in rows:
        mid = _text(row, "merchant_id", where, problems)
        mcc = _optional(row, "mcc")
        if mcc is not None and not _MCC_RE.fullmatch(mcc):
            problems.add(where, f"mcc {mcc!r} must be a 4-digit merchant category code")
        country = _optional(row, "country")
        if country is not None:
            _country(country, where, problems)
        out.append(
            MerchantInfo(
                id=mid,
                name=_text(row, "name", where, problems),
                mcc=mcc,
                city=_optional(row, "city"),
                country=country,
            )
        )
    return out


# -- the directory ----------------------------------------------------------------------------


def _manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{str(directory)!r} holds no {MANIFEST}: point to a reference data directory "
            "(see examples/refdata and docs/refdata.md)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("version"), str | int):
        raise UserError(f'{path}: needs a `version:` (a string such as "2026.11.21-1")')
    return data


def load_refdata_dir(directory: Path) -> RefData:
    """Load, validate and version the reference data in DIRECTORY (raises `UserError`)."""
    manifest = _manifest(directory)
    files: dict[str, Path] = {}
    for table in TABLES:
        path = directory / str(manifest.get(table, DEFAULT_FILES[table]))
        if not path.is_file():
            if table in OPTIONAL:
                continue
            raise UserError(
                f"reference data file {str(path)!r} ({table}) is missing: add it, or name the "
                f"right file under `{table}:` in {directory / MANIFEST}"
            )
        files[table] = path
    problems = Problems()
    try:
        rows = {table: _read_rows(path, table) for table, path in files.items()}
    except (json.JSONDecodeError, yaml.YAMLError, csv.Error) as exc:
        raise UserError(f"reference data in {str(directory)!r}: cannot parse ({exc})") from exc
    tenants = _tenants(rows["tenants"], problems)
    tenant_ids = {t.id for t in tenants}
    branches = _branches(rows["branches"], tenant_ids, problems)
    accounts = _accounts(rows["accounts"], tenant_ids, {b.id: b for b in branches}, problems)
    rates = _rates(rows["fx_rates"], problems)
    merchants = _merchants(rows.get("merchants", []), problems)
    problems.raise_if_any(directory)
    return RefData.build(
        str(manifest["version"]),
        tenants=tenants,
        accounts=accounts,
        branches=branches,
        rates=rates,
        merchants=merchants,
    )


def write_refdata_dir(refdata: RefData, directory: Path, *, declared: str | None = None) -> Path:
    """Write REFDATA as a reference data directory in the default formats (YAML + CSV)."""
    directory.mkdir(parents=True, exist_ok=True)
    tenants = [
        {
            "id": t.id,
            "name": t.name,
            "country": t.country,
            "home_currency": t.home_currency,
            "high_value_threshold": t.high_value_threshold.format(),
            "fx_markup": t.fx_markup,
            "listed_mccs": list(t.listed_mccs),
            "expose_holder_name": t.expose_holder_name,
        }
        for t in refdata.tenants.values()
    ]
    (directory / DEFAULT_FILES["tenants"]).write_text(
        yaml.safe_dump({"tenants": tenants}, sort_keys=False, allow_unicode=True),
        encoding="utf-8",
    )
    _write_csv(
        directory / DEFAULT_FILES["branches"],
        BRANCH_COLUMNS,
        ([b.id, b.tenant, b.sort_code, b.name, b.address] for b in refdata.branches.values()),
    )
    _write_csv(
        directory / DEFAULT_FILES["accounts"],
        ACCOUNT_COLUMNS,
        (
            [
                a.id,
                a.tenant,
                a.iban,
                a.sort_code,
                a.account_number,
                a.holder_id,
                a.holder_name,
                a.holder_address or "",
                a.product_type,
                a.currency,
                a.branch_id,
                ";".join(a.card_tokens),
            ]
            for a in refdata.accounts.values()
        ),
    )
    _write_csv(
        directory / DEFAULT_FILES["fx_rates"],
        RATE_COLUMNS,
        (
            [r.base, r.quote, r.rate, r.source, r.as_of.isoformat().replace("+00:00", "Z")]
            for r in refdata.rates.values()
        ),
    )
    if refdata.merchants:
        _write_csv(
            directory / DEFAULT_FILES["merchants"],
            MERCHANT_COLUMNS,
            (
                [m.id, m.name, m.mcc or "", m.city or "", m.country or ""]
                for m in refdata.merchants.values()
            ),
        )
    manifest = {"version": declared or refdata.version.declared, **DEFAULT_FILES}
    if not refdata.merchants:
        del manifest["merchants"]
    (directory / MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    return directory


def _write_csv(path: Path, header: tuple[str, ...], rows: Iterable[list[str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
