"""The account interface (FR7): an approved transaction becomes the legs of one posting sequence.

Input: `TransactionApproved`. Output: `PostingLegCreated` ×n, each carrying the posting
sequence id (the connecting indicator FR7 asks for), its leg index k and the leg count n; the
assembler (`paypost.stages.assembler`) puts them back together in any order.

Legs (the ledger's sign convention: a card purchase debits the customer):

- same currency: Dr customer account, Cr the merchant settlement account of the tenant and
  currency (`settlement-EUR`);
- transaction currency ≠ account currency: the ledger's `fx_legs` through the FX position
  accounts, one per currency (`fx-position-EUR`, `fx-position-GBP`), using `money.convert`
  with the rate the enrichment stage attached (provenance on the entry); the markup goes to
  the fee income account (`fees-GBP`) and the rounding difference (−1..+1 minor unit) to the
  FX rounding account (`fx-rounding-GBP`), so every minor unit lands in a named account;
- fee legs when the tenant's posting configuration has fees: Dr customer, Cr `fees-<CCY>`;
- a refund (`direction: credit`) mirrors the purchase's legs (Cr customer, Dr settlement),
  without fees.

The posting sequence id is derived from the transaction (tenant + transaction id), so a
redelivered or replayed approval yields the same sequence, the same legs and the same event
ids (`derive_event_id(input.id, "account-interface", k)`); the ledger then posts the entry
once (entry id = sequence id). Every sequence balances per currency; this is asserted here,
before any leg leaves the stage (DESIGN §3.2).

A transaction that cannot be turned into legs (no account id, unknown currency, a rate that
does not convert into the billed amount) is held (`TransactionHeld`, stage
"account-interface"), never dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import msgspec

from paypost.events import (
    Event,
    PostingLegCreated,
    SchemaRef,
    TransactionApproved,
    TransactionHeld,
    derive_event_id,
    new_event,
)
from paypost.ledger.model import Account, Leg, fx_legs
from paypost.money import (
    Conversion,
    CurrencyMismatch,
    FxRate,
    InvalidAmount,
    Money,
    UnknownCurrency,
    convert,
)

STAGE = "account-interface"
SOURCE = "paypost.account-interface"

# Internal account roles used by the legs (paypost.ledger.model.INTERNAL_ROLES).
SETTLEMENT = "settlement"
FX_POSITION = "fx_position"
FX_ROUNDING = "fx_rounding"
FEES = "fees"
_ROLE_PREFIX = {
    SETTLEMENT: "settlement",
    FX_POSITION: "fx-position",
    FX_ROUNDING: "fx-rounding",
    FEES: "fees",
}


def internal_account_id(role: str, currency: str) -> str:
    """The id (within a tenant) of the internal account of ROLE in CURRENCY: `settlement-EUR`."""
    return f"{_ROLE_PREFIX[role]}-{currency}"


def internal_accounts(tenant: str, currencies: Sequence[str]) -> list[Account]:
    """Every internal account the legs of TENANT can name, for CURRENCIES (create them once)."""
    out: list[Account] = []
    for cur in sorted(set(currencies)):
        for role, prefix in _ROLE_PREFIX.items():
            out.append(
                Account(
                    id=internal_account_id(role, cur),
                    tenant=tenant,
                    kind="internal",
                    role=role,
                    currency=cur,
                    name=f"{prefix} {cur}",
                )
            )
    return out


# --------------------------------------------------------------------------------------------
# What the account interface reads from the enriched transaction (TransactionApproved.detail
# .transaction, a flat dict produced by the enrichment stage). Unknown keys are ignored.


class TransactionFx(msgspec.Struct, frozen=True, kw_only=True):
    """The conversion the enrichment stage attached (`Conversion.provenance()["fx"]`): the
    rate and its provenance. The account interface re-runs `convert` with it (pure), so the
    legs and the enrichment's billing amount come from the same arithmetic."""

    base: str  # the transaction currency
    quote: str  # the account (billing) currency
    rate: str  # decimal string, mid rate, QUOTE per 1 BASE
    source: str
    as_of: datetime
    markup: str = "0"


class PostingTransaction(msgspec.Struct, frozen=True, kw_only=True):
    """The fields of an enriched transaction (`paypost.stages.enrich.EnrichedTransaction`)
    that posting needs (docs/posting.md). Unknown keys are ignored."""

    account_id: str
    amount: Money  # in the transaction (merchant) currency
    billing_amount: Money | None = None  # in the account currency
    account_currency: str | None = None
    direction: Literal["debit", "credit"] = "debit"  # for the cardholder: credit = refund
    transaction_id: str | None = None
    booking_date: str | None = None  # value date (pacs.008 IntrBkSttlmDt)
    description: str | None = None
    merchant_id: str | None = None
    merchant_name: str | None = None
    mcc: str | None = None
    pan_masked: str | None = None
    iban: str | None = None
    sort_code: str | None = None
    account_number: str | None = None
    fx: TransactionFx | None = None


# --------------------------------------------------------------------------------------------
# Per-tenant posting configuration (fees)


class FeeRule(msgspec.Struct, frozen=True, kw_only=True):
    """A fee charged to the customer on top of the transaction, in the account currency.

    `applies_to`: "all" transactions or only "foreign" ones (transaction currency ≠ account
    currency). Amount = fixed_minor + half-up(billed × bps / 10000), integer arithmetic.
    """

    name: str
    applies_to: Literal["all", "foreign"] = "foreign"
    bps: int = 0
    fixed_minor: int = 0

    def amount(self, billed: Money, foreign: bool) -> Money:
        if self.applies_to == "foreign" and not foreign:
            return Money(0, billed.currency)
        variable = (abs(billed.minor) * self.bps + 5_000) // 10_000
        return Money(self.fixed_minor + variable, billed.currency)


class TenantPosting(msgspec.Struct, frozen=True, kw_only=True):
    fees: tuple[FeeRule, ...] = ()


class PostingConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Posting settings per tenant; tenants not listed use `default` (no fees)."""

    tenants: dict[str, TenantPosting] = {}
    default: TenantPosting = TenantPosting()

    def for_tenant(self, tenant: str) -> TenantPosting:
        return self.tenants.get(tenant, self.default)


class PostingError(ValueError):
    """A transaction that cannot be turned into balanced legs (it is held with this reason)."""


# --------------------------------------------------------------------------------------------
# The stage


def sequence_id_for(tenant: str, transaction_ref: str) -> str:
    """The posting sequence id of a transaction: derived, so a replay gets the same one."""
    return derive_event_id(f"{tenant}/{transaction_ref}", "posting-sequence", 0)


class PlannedLeg(msgspec.Struct, frozen=True, kw_only=True):
    leg: Leg
    role: str  # customer | settlement | fx_position | fx_rounding | fees


def plan_legs(
    tenant: str, txn: PostingTransaction, config: TenantPosting
) -> tuple[list[PlannedLeg], Conversion | None]:
    """The balanced legs of one transaction (pure). Raises PostingError if it cannot post."""
    amount = txn.amount
    if amount.minor <= 0:
        raise PostingError(f"amount {amount} must be positive to post a card purchase")
    account_currency = (
        txn.billing_amount.currency
        if txn.billing_amount is not None
        else (txn.account_currency or amount.currency)
    )
    if txn.account_currency is not None and txn.account_currency != account_currency:
        raise PostingError(
            f"billing amount is in {account_currency} but the account is in {txn.account_currency}"
        )
    customer = txn.account_id
    legs: list[PlannedLeg] = []
    conversion: Conversion | None = None
    foreign = amount.currency != account_currency
    if not foreign:
        if txn.billing_amount is not None and txn.billing_amount != amount:
            raise PostingError(
                f"billing amount {txn.billing_amount} differs from the amount {amount} in "
                "the same currency"
            )
        legs.append(
            PlannedLeg(leg=Leg(account=customer, side="debit", amount=amount), role="customer")
        )
        legs.append(
            PlannedLeg(
                leg=Leg(
                    account=internal_account_id(SETTLEMENT, amount.currency),
                    side="credit",
                    amount=amount,
                ),
                role=SETTLEMENT,
            )
        )
        billed = amount
    elif txn.fx is not None:
        fx = txn.fx
        if fx.base != amount.currency or fx.quote != account_currency:
            raise PostingError(
                f"the attached FX rate converts {fx.base}->{fx.quote}, but the transaction "
                f"needs {amount.currency}->{account_currency}"
            )
        conversion = convert(amount, _fx_rate(fx))
        if txn.billing_amount is not None and txn.billing_amount != conversion.charged:
            raise PostingError(
                f"billing amount {txn.billing_amount} differs from {conversion.charged}, the "
                f"conversion of {amount} at {fx.rate} (+{fx.markup} markup, {fx.source})"
            )
        roles = {
            customer: "customer",
            internal_account_id(SETTLEMENT, amount.currency): SETTLEMENT,
            internal_account_id(FX_POSITION, amount.currency): FX_POSITION,
            internal_account_id(FX_POSITION, account_currency): FX_POSITION,
            internal_account_id(FEES, account_currency): FEES,
            internal_account_id(FX_ROUNDING, account_currency): FX_ROUNDING,
        }
        for leg in fx_legs(
            conversion,
            payer=customer,
            payee=internal_account_id(SETTLEMENT, amount.currency),
            position_source=internal_account_id(FX_POSITION, amount.currency),
            position_target=internal_account_id(FX_POSITION, account_currency),
            fees=internal_account_id(FEES, account_currency),
            fx_rounding=internal_account_id(FX_ROUNDING, account_currency),
        ):
            legs.append(PlannedLeg(leg=leg, role=roles[leg.account]))
        billed = conversion.charged
    elif txn.billing_amount is not None:
        # Billed by the card scheme at its own rate: the two amounts meet in the FX positions.
        billed = txn.billing_amount
        if billed.minor <= 0:
            raise PostingError(f"billing amount {billed} must be positive")
        legs += [
            PlannedLeg(leg=Leg(account=customer, side="debit", amount=billed), role="customer"),
            PlannedLeg(
                leg=Leg(
                    account=internal_account_id(FX_POSITION, billed.currency),
                    side="credit",
                    amount=billed,
                ),
                role=FX_POSITION,
            ),
            PlannedLeg(
                leg=Leg(
                    account=internal_account_id(FX_POSITION, amount.currency),
                    side="debit",
                    amount=amount,
                ),
                role=FX_POSITION,
            ),
            PlannedLeg(
                leg=Leg(
                    account=internal_account_id(SETTLEMENT, amount.currency),
                    side="credit",
                    amount=amount,
                ),
                role=SETTLEMENT,
            ),
        ]
    else:
        raise PostingError(
            f"the transaction is in {amount.currency} but the account is in "
            f"{account_currency}, and neither an FX rate nor a billing amount is attached"
        )
    if txn.direction == "credit":
        # A refund: the purchase's legs mirrored (credit the customer, debit settlement).
        legs = [
            PlannedLeg(
                leg=Leg(
                    account=p.leg.account,
                    side="credit" if p.leg.side == "debit" else "debit",
                    amount=p.leg.amount,
                ),
                role=p.role,
            )
            for p in legs
        ]
    for fee in config.fees if txn.direction == "debit" else ():
        charge = fee.amount(billed, foreign)
        if charge.minor > 0:
            legs.append(
                PlannedLeg(leg=Leg(account=customer, side="debit", amount=charge), role="customer")
            )
            legs.append(
                PlannedLeg(
                    leg=Leg(
                        account=internal_account_id(FEES, charge.currency),
                        side="credit",
                        amount=charge,
                    ),
                    role=FEES,
                )
            )
    problem = _balance_problem([p.leg for p in legs])
    assert problem is None, f"{problem} (tenant {tenant} account {customer})"
    return legs, conversion


def _fx_rate(fx: TransactionFx) -> FxRate:
    """The `FxRate` of an attached conversion. Validating a rate parses its decimals (a third
    of an FX transaction's cost) and a day has a few rates per currency pair, so validated
    rates are kept (by every field, the time's text too: it travels in the provenance)."""
    key = (fx, fx.as_of.isoformat())
    rate = _FX_RATES.get(key)
    if rate is None:
        rate = FxRate(
            base=fx.base,
            quote=fx.quote,
            rate=fx.rate,
            source=fx.source,
            as_of=fx.as_of,
            markup=fx.markup,
        )
        if len(_FX_RATES) >= 1_000:
            _FX_RATES.clear()
        _FX_RATES[key] = rate
    return rate


_FX_RATES: dict[tuple[TransactionFx, str], FxRate] = {}


def assert_balanced(legs: Sequence[Leg], context: str = "") -> None:
    """Money is conserved (DESIGN §3.2): debits equal credits in every currency."""
    problem = _balance_problem(legs)
    assert problem is None, f"{problem} ({context})"


def _balance_problem(legs: Sequence[Leg]) -> str | None:
    """Why LEGS do not conserve money (a non-positive leg, or an imbalance per currency)."""
    sums: dict[str, int] = {}
    for leg in legs:
        amount = leg.amount
        minor = amount.minor
        if minor <= 0:
            return f"non-positive leg {leg}"
        sums[amount.currency] = sums.get(amount.currency, 0) + (
            minor if leg.side == "credit" else -minor
        )
    bad = {c: v for c, v in sums.items() if v}
    return f"posting legs do not balance per currency: {bad}" if bad else None


def create_legs(
    events: Sequence[Event],
    config: PostingConfig | None = None,
    *,
    sink: Callable[[Event], object] | None = None,
) -> list[Event]:
    """The account interface stage (FR7): each TransactionApproved → its PostingLegCreated
    events (or one TransactionHeld when it cannot be posted). Pure and deterministic.

    With SINK, each output is handed to it as soon as it is built (the pipeline encodes it
    there while it is hot in the cache) and the returned list is empty."""
    cfg = config or PostingConfig()
    out: list[Event] = []
    for event in events:
        legs = legs_for(event, cfg.for_tenant(event.tenant))
        if sink is None:
            out.extend(legs)
        else:
            for leg in legs:
                sink(leg)
    return out


def legs_for(event: Event, config: TenantPosting) -> list[Event]:
    if event.detail_type != TransactionApproved.DETAIL_TYPE:
        raise ValueError(
            f"event {event.id}: the account interface consumes TransactionApproved events, "
            f"not {event.detail_type!r}; check the bus rule that targets it"
        )
    raw = event.detail.get("transaction")
    try:
        if not isinstance(raw, dict):
            raise PostingError("the approved event carries no transaction")
        txn = msgspec.convert(raw, PostingTransaction)
        planned, conversion = plan_legs(event.tenant, txn, config)
    except (PostingError, UnknownCurrency, InvalidAmount, CurrencyMismatch, ValueError) as exc:
        # msgspec.ValidationError is a ValueError: a malformed transaction is held, with why.
        return [
            new_event(
                TransactionHeld(
                    reason=f"cannot create posting legs: {exc}", stage=STAGE, rule=None
                ),
                source=SOURCE,
                tenant=event.tenant,
                id=derive_event_id(event.id, STAGE, 0),
                correlation_id=event.correlation_id,
                causation_id=event.id,
                traceparent=event.traceparent,
                time=event.time,
            )
        ]
    ref = txn.transaction_id or event.correlation_id
    sequence_id = sequence_id_for(event.tenant, ref)
    amount = txn.amount
    entry_meta: dict[str, Any] = {
        "tenant": event.tenant,
        "transaction_ref": ref,
        "source_event_id": event.id,
        "booked_at": event.time,
        "value_date": txn.booking_date,
        "direction": txn.direction,
        "description": txn.description,
        "merchant_id": txn.merchant_id,
        "merchant_name": txn.merchant_name,
        "mcc": txn.mcc,
        "pan_masked": txn.pan_masked,
        "iban": txn.iban,
        "sort_code": txn.sort_code,
        "account_number": txn.account_number,
        "amount": {"minor": amount.minor, "currency": amount.currency},
        "flags": list(event.detail.get("flags") or []),
    }
    if conversion is not None:
        entry_meta.update(conversion.provenance())
    n = len(planned)
    out: list[Event] = []
    for k, p in enumerate(planned):
        leg = p.leg
        leg_amount = leg.amount
        # Built directly, positionally (the shape of new_event(PostingLegCreated(...)),
        # checked by the tests): no struct → builtins round trip on the hot path.
        out.append(
            Event(
                derive_event_id(event.id, STAGE, k),  # id
                SOURCE,  # source
                _LEG_DETAIL_TYPE,  # detail_type
                event.time,  # time
                event.tenant,  # tenant
                event.correlation_id,  # correlation_id
                _LEG_SCHEMA,  # schema
                {
                    "sequence_id": sequence_id,
                    "leg_index": k,
                    "leg_count": n,
                    "account_id": leg.account,
                    "side": leg.side,
                    "amount": {"minor": leg_amount.minor, "currency": leg_amount.currency},
                    # entry-level data travels once, on leg 0
                    "metadata": {"role": p.role, "entry": entry_meta}
                    if k == 0
                    else {"role": p.role},
                },
                event.id,  # causation_id
                event.traceparent,  # traceparent
            )
        )
    return out


_LEG_DETAIL_TYPE = PostingLegCreated.DETAIL_TYPE
_LEG_SCHEMA = SchemaRef(name=PostingLegCreated.DETAIL_TYPE, version=PostingLegCreated.VERSION)


def leg_events_balance(events: Sequence[Event]) -> dict[str, dict[str, int]]:
    """Per sequence id, the per-currency imbalance of the given leg events (for checks)."""
    sums: dict[str, dict[str, int]] = {}
    for e in events:
        if e.detail_type != PostingLegCreated.DETAIL_TYPE:
            continue
        d: Mapping[str, Any] = e.detail
        amt = d["amount"]
        sign = 1 if d["side"] == "credit" else -1
        per = sums.setdefault(d["sequence_id"], {})
        per[amt["currency"]] = per.get(amt["currency"], 0) + sign * amt["minor"]
    return sums
