"""The double-entry ledger model: accounts, journal entries of balanced legs, posting results.

Pure domain code, no I/O (the stores are in `sqlite.py` and `postgres.py`).

Sign convention: every account's balance is credits − debits, in minor units of the
account's single currency. A card purchase DEBITS the customer's account (its balance goes
down) and CREDITS a settlement account; the sum of all balances of a tenant, per currency, is
zero (the trial balance), because every entry balances per currency (DESIGN §3.2).
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Literal, Protocol

import msgspec

from paypost.money import Conversion, Money, UnknownCurrency, exponent

Side = Literal["debit", "credit"]
AccountKind = Literal["customer", "internal"]
AccountStatus = Literal["open", "blocked", "closed"]
PostStatus = Literal["posted", "duplicate", "conflict", "refused"]

# Internal account roles a bank's ledger needs (DESIGN §2, issue 3).
INTERNAL_ROLES: frozenset[str] = frozenset(
    {"suspense", "settlement", "clearing", "fx_position", "fx_rounding", "fees", "head_office"}
)
ACCOUNT_STATUSES: frozenset[str] = frozenset({"open", "blocked", "closed"})

# Namespace of derived reversal ids: reversal_id(entry) = uuid5(NS, tenant + "/" + entry id).
REVERSAL_NAMESPACE = uuid.UUID("6f4a4b53-8a43-5d7e-9a55-2f1c2b7d1e01")

_ID_RE = re.compile(r"[^\s\x00]{1,200}")
_SORT_CODE_RE = re.compile(r"\d{6}")
_ACCOUNT_NUMBER_RE = re.compile(r"\d{8}")


class LedgerError(Exception):
    """Base class of ledger errors a caller can meet (messages say what to do)."""


class AccountError(LedgerError, ValueError):
    """An account definition that cannot be created (bad field, or a clash with an existing one)."""


class UnknownAccount(LedgerError, LookupError):
    """A query for an account that does not exist in the tenant."""


class UnknownEntry(LedgerError, LookupError):
    """A reversal or query for an entry that does not exist in the tenant."""


class LedgerMissing(LedgerError):
    """The ledger's tables do not exist yet at the given location."""


class Account(msgspec.Struct, frozen=True, kw_only=True):
    """An account of one tenant, in one currency.

    `overdraft_limit`: None = no rule (internal accounts: suspense, settlement, ... may go
    either way); 0 = overdraft forbidden (the balance may not go below zero); N > 0 = the
    balance may not go below −N minor units. Enforced atomically with the posting.
    Status: open (everything), blocked (credits only), closed (nothing).
    """

    id: str
    tenant: str
    kind: AccountKind
    currency: str
    role: str | None = None
    product_type: str | None = None
    name: str | None = None
    iban: str | None = None
    sort_code: str | None = None
    account_number: str | None = None
    status: AccountStatus = "open"
    overdraft_limit: int | None = None

    def validate(self) -> None:
        """Raise AccountError naming the field if this account cannot exist."""
        if not isinstance(self.id, str) or not _ID_RE.fullmatch(self.id):
            raise AccountError(f"account id {self.id!r} must be 1-200 non-blank characters")
        if not isinstance(self.tenant, str) or not _ID_RE.fullmatch(self.tenant):
            raise AccountError(
                f"account {self.id!r}: tenant {self.tenant!r} must be 1-200 non-blank characters"
            )
        try:
            exponent(self.currency)
        except UnknownCurrency as exc:
            raise AccountError(f"account {self.id!r}: {exc}") from None
        if self.kind == "internal":
            if self.role not in INTERNAL_ROLES:
                raise AccountError(
                    f"internal account {self.id!r}: role {self.role!r} is not one of "
                    f"{', '.join(sorted(INTERNAL_ROLES))}"
                )
        elif self.kind == "customer":
            if self.role is not None:
                raise AccountError(f"customer account {self.id!r} cannot have role {self.role!r}")
        else:
            raise AccountError(
                f"account {self.id!r}: kind {self.kind!r} must be 'customer' or 'internal'"
            )
        if self.status not in ACCOUNT_STATUSES:
            raise AccountError(
                f"account {self.id!r}: status {self.status!r} must be open, blocked or closed"
            )
        if self.overdraft_limit is not None and (
            type(self.overdraft_limit) is not int or self.overdraft_limit < 0
        ):
            raise AccountError(
                f"account {self.id!r}: overdraft_limit {self.overdraft_limit!r} must be None "
                "(no rule), 0 (forbidden) or a positive number of minor units"
            )
        if self.iban is not None:
            _check_iban(self.id, self.iban)
        if (self.sort_code is None) != (self.account_number is None):
            raise AccountError(
                f"account {self.id!r}: give both sort_code and account_number, or neither"
            )
        if self.sort_code is not None and not _SORT_CODE_RE.fullmatch(self.sort_code):
            raise AccountError(
                f"account {self.id!r}: sort code {self.sort_code!r} must be 6 digits (no dashes)"
            )
        if self.account_number is not None and not _ACCOUNT_NUMBER_RE.fullmatch(
            self.account_number
        ):
            raise AccountError(
                f"account {self.id!r}: account number {self.account_number!r} must be 8 digits"
            )


def _check_iban(account_id: str, iban: str) -> None:
    # ISO 13616 mod-97 check; schwifty knows country lengths too, but is slow to import.
    compact = iban.replace(" ", "").upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}", compact):
        raise AccountError(f"account {account_id!r}: IBAN {iban!r} is not well formed")
    digits = "".join(str(int(c, 36)) for c in compact[4:] + compact[:4])
    if int(digits) % 97 != 1:
        raise AccountError(f"account {account_id!r}: IBAN {iban!r} fails its check digits")


class Leg(msgspec.Struct, frozen=True, kw_only=True):
    """One side of a journal entry: DEBIT or CREDIT an account by a positive amount."""

    account: str
    side: Side
    amount: Money

    @property
    def signed(self) -> int:
        """The leg's effect on the account balance (credits − debits convention)."""
        return self.amount.minor if self.side == "credit" else -self.amount.minor


class JournalEntry(msgspec.Struct, frozen=True, kw_only=True):
    """A balanced set of legs posted atomically; `id` makes posting idempotent.

    References: `sequence_id` (the posting sequence the legs came from, FR7) and
    `source_event_id` (the event that caused it). `reversal_of` links a compensating entry
    to the entry it reverses. `booked_at` is the business time (the entries query filters on
    it); the store stamps the current time when it is None.
    """

    id: str
    tenant: str
    legs: tuple[Leg, ...]
    sequence_id: str | None = None
    source_event_id: str | None = None
    reversal_of: str | None = None
    booked_at: datetime | None = None
    description: str | None = None
    metadata: dict[str, Any] = {}

    def imbalance(self) -> dict[str, int]:
        """Per currency, debits − credits over the legs (an empty dict means balanced)."""
        sums: dict[str, int] = {}
        for leg in self.legs:
            cur = leg.amount.currency
            sums[cur] = sums.get(cur, 0) - leg.signed
        return {c: v for c, v in sums.items() if v}

    def problem(self) -> str | None:
        """Why this entry can never be posted (None if its shape is valid). Pure check."""
        if not isinstance(self.id, str) or not _ID_RE.fullmatch(self.id):
            return f"entry id {self.id!r} must be 1-200 non-blank characters"
        if not isinstance(self.tenant, str) or not _ID_RE.fullmatch(self.tenant):
            return f"tenant {self.tenant!r} must be 1-200 non-blank characters"
        legs = self.legs
        if len(legs) < 2:
            return f"entry has {len(legs)} leg(s); a double-entry posting needs at least 2"
        sums: dict[str, int] = {}
        for i, leg in enumerate(legs):
            amount = leg.amount
            minor = amount.minor
            side = leg.side
            if side == "credit":
                signed = minor
            elif side == "debit":
                signed = -minor
            else:
                return f"leg {i}: side {side!r} must be 'debit' or 'credit'"
            if minor <= 0:
                return (
                    f"leg {i} ({side} {leg.account}): amount {amount} must be positive; "
                    "use the other side instead of a negative amount"
                )
            cur = amount.currency
            sums[cur] = sums.get(cur, 0) + signed
        for net in sums.values():
            if net:
                break
        else:
            return None
        parts = []
        for cur, diff in sorted(self.imbalance().items()):
            more = "debits exceed credits" if diff > 0 else "credits exceed debits"
            parts.append(f"{Money(abs(diff), cur)} ({more})")
        return "entry does not balance: " + "; ".join(parts)

    def content_hash(self) -> bytes:
        """16-byte digest of everything that defines the entry (idempotency: same id + same
        content is a duplicate, same id + other content a conflict). `booked_at` is part of it
        only when the caller set it."""
        return hashlib.blake2b(_HASH_ENCODER.encode(self), digest_size=16).digest()

    def reversal(
        self,
        *,
        entry_id: str | None = None,
        booked_at: datetime | None = None,
        description: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> JournalEntry:
        """The compensating entry: every leg on the other side, linked by `reversal_of`.

        Its id is derived from this entry's (so asking twice gives the same entry, and the
        second posting is a duplicate, never a second reversal).
        """
        flipped = tuple(
            Leg(
                account=leg.account,
                side="credit" if leg.side == "debit" else "debit",
                amount=leg.amount,
            )
            for leg in self.legs
        )
        return JournalEntry(
            id=entry_id or reversal_id(self.tenant, self.id),
            tenant=self.tenant,
            legs=flipped,
            sequence_id=self.sequence_id,
            source_event_id=self.source_event_id,
            reversal_of=self.id,
            booked_at=booked_at,
            description=description or f"reversal of {self.id}",
            metadata=metadata or {},
        )


_HASH_ENCODER = msgspec.json.Encoder(order="sorted")


def reversal_id(tenant: str, entry_id: str) -> str:
    """The derived id of the reversal of ENTRY_ID (uuid5, like every derived id)."""
    return str(uuid.uuid5(REVERSAL_NAMESPACE, f"{tenant}/{entry_id}"))


class PostResult(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of one entry of a batch.

    posted: applied now. duplicate: the same entry (same id, same content) was already
    posted; `position` and `posted_at` are the original's. conflict: an entry with this id but
    different content exists (nothing was posted). refused: not posted; `reason` says why.
    """

    entry_id: str
    status: PostStatus
    reason: str | None = None
    position: int | None = None
    posted_at: datetime | None = None

    @property
    def applied(self) -> bool:
        """True when the entry is in the ledger (posted now or before)."""
        return self.status in ("posted", "duplicate")


class Balance(msgspec.Struct, frozen=True, kw_only=True):
    account: str
    tenant: str
    balance: Money
    debits: int
    credits: int
    entries: int


class PostedLeg(msgspec.Struct, frozen=True, kw_only=True):
    account: str
    side: Side
    amount: Money


class PostedEntry(msgspec.Struct, frozen=True, kw_only=True):
    """An entry as stored, with its ledger position (monotonic per store) and times."""

    id: str
    tenant: str
    position: int
    booked_at: datetime
    posted_at: datetime
    legs: tuple[PostedLeg, ...]
    sequence_id: str | None = None
    source_event_id: str | None = None
    reversal_of: str | None = None
    description: str | None = None
    metadata: dict[str, Any] = {}


class TrialBalanceLine(msgspec.Struct, frozen=True, kw_only=True):
    currency: str
    debits: int
    credits: int
    net: int
    accounts: int


class TrialBalance(msgspec.Struct, frozen=True, kw_only=True):
    """Per currency, total debits and credits over every account of a tenant; `net` is 0."""

    tenant: str
    lines: tuple[TrialBalanceLine, ...]

    @property
    def balanced(self) -> bool:
        return all(line.net == 0 for line in self.lines)


class LedgerStore(Protocol):
    """What every ledger store offers, with the same semantics (tests/conformance)."""

    def ensure_schema(self) -> None: ...

    def create_accounts(self, accounts: Sequence[Account]) -> None: ...

    def get_account(self, tenant: str, account_id: str) -> Account | None: ...

    def set_account_status(self, tenant: str, account_id: str, status: AccountStatus) -> None: ...

    def post_batch(self, entries: Sequence[JournalEntry]) -> list[PostResult]: ...

    def reverse(
        self, tenant: str, entry_id: str, *, reversal_entry_id: str | None = None
    ) -> PostResult: ...

    def get_entry(self, tenant: str, entry_id: str) -> PostedEntry | None: ...

    def balance(self, tenant: str, account_id: str) -> Balance: ...

    def entries(
        self,
        tenant: str,
        account_id: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[PostedEntry]: ...

    def trial_balance(self, tenant: str) -> TrialBalance: ...

    def tenants(self) -> list[str]: ...

    def close(self) -> None: ...


def fx_legs(
    conversion: Conversion,
    *,
    payer: str,
    payee: str,
    position_source: str,
    position_target: str,
    fees: str,
    fx_rounding: str,
) -> tuple[Leg, ...]:
    """The legs of a customer payment in a foreign currency, through FX position accounts.

    The payer (billed in the target currency) pays `charged`; the payee receives the source
    amount. Target currency: Dr payer charged = Cr position at_mid + Cr fees markup ± rounding.
    Source currency: Dr position source = Cr payee source. Balances per currency by
    construction; every minor unit of `charged` lands in a named account.
    """
    c = conversion
    legs = [
        Leg(account=payer, side="debit", amount=c.charged),
        Leg(account=position_target, side="credit", amount=c.at_mid),
        Leg(account=position_source, side="debit", amount=c.source),
        Leg(account=payee, side="credit", amount=c.source),
    ]
    legs = [leg for leg in legs if leg.amount.minor]  # a tiny amount can round to zero
    if c.markup.minor:
        legs.append(Leg(account=fees, side="credit", amount=c.markup))
    if c.rounding.minor > 0:
        legs.append(Leg(account=fx_rounding, side="credit", amount=c.rounding))
    elif c.rounding.minor < 0:
        legs.append(Leg(account=fx_rounding, side="debit", amount=-c.rounding))
    return tuple(legs)


def check_trial_balance(lines: Iterable[TrialBalanceLine], tenant: str) -> None:
    """Money is conserved (DESIGN §3.2): assert the trial balance nets to zero per currency."""
    for line in lines:
        if line.net != 0:
            raise AssertionError(
                f"ledger invariant broken for tenant {tenant!r}: {line.currency} balances sum "
                f"to {line.net}, not 0"
            )
