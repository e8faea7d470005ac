"""The posting decision, shared by every store: pure, in memory, no I/O.

A store reads the state a batch needs (existing entries with the batch's ids, the accounts the
legs name with their current balances, the entries being reversed), calls `plan_batch`, and
writes what the plan says in the same transaction. Both stores therefore decide exactly the
same way (posted / duplicate / conflict / refused), and the decision runs once per batch in
memory with no per-entry round trip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec

from paypost.ledger.model import JournalEntry, PostResult
from paypost.money import Money

_META = msgspec.json.Encoder(order="sorted")

Key = tuple[str, str]  # (tenant, id)
# A stored leg as (account id, side, currency, minor) — enough to check a reversal mirrors it.
LegTuple = tuple[str, str, str, int]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_micros(t: datetime) -> int:
    """UTC microseconds since the epoch (how both stores keep time: one integer column)."""
    delta = t - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(us: int) -> datetime:
    return datetime.fromtimestamp(us // 1_000_000, UTC).replace(microsecond=us % 1_000_000)


def now_micros() -> int:
    return to_micros(datetime.now(UTC))


@dataclass(slots=True)
class ExistingEntry:
    pk: int
    content_hash: bytes
    posted_at: int


@dataclass(slots=True)
class AccountState:
    pk: int
    currency: str
    status: str
    overdraft_limit: int | None
    balance: int


@dataclass(slots=True)
class OriginalEntry:
    """An entry that a reversal in the batch targets."""

    legs: list[LegTuple]
    is_reversal: bool
    reversed_by: str | None


# The rows a plan writes, in the column order of the stores' tables:
# entry: (pk, tenant, id, content_hash, booked_at, posted_at, sequence_id, source_event_id,
#         reversal_of, description, metadata JSON or None, id key or None)
EntryRow = tuple[
    int,
    str,
    str,
    bytes,
    int,
    int,
    str | None,
    str | None,
    str | None,
    str | None,
    str | None,
    int | None,
]
# leg: (entry pk, index in entry, account pk, signed amount (credit > 0), booked_at)
LegRow = tuple[int, int, int, int, int]


@dataclass(slots=True)
class Plan:
    results: list[PostResult] = field(default_factory=list)
    entry_rows: list[EntryRow] = field(default_factory=list)
    leg_rows: list[LegRow] = field(default_factory=list)
    # account pk -> [net delta, debits, credits, legs]
    deltas: dict[int, list[int]] = field(default_factory=dict)
    # account pk -> currency (for the conservation check)
    currencies: dict[int, str] = field(default_factory=dict)
    # (tenant, id) of the refused entries
    refused: list[Key] = field(default_factory=list)


@dataclass(slots=True)
class Needs:
    entry_keys: set[Key]
    account_keys: set[Key]
    reversal_targets: set[Key]


def needs(entries: Iterable[JournalEntry]) -> Needs:
    """What a store must read before planning this batch."""
    n = Needs(set(), set(), set())
    for e in entries:
        n.entry_keys.add((e.tenant, e.id))
        for leg in e.legs:
            n.account_keys.add((e.tenant, leg.account))
        if e.reversal_of is not None:
            n.reversal_targets.add((e.tenant, e.reversal_of))
    return n


def _fmt(minor: int, currency: str) -> str:
    return str(Money(minor, currency))


def plan_batch(
    entries: Sequence[JournalEntry],
    *,
    existing: dict[Key, ExistingEntry],
    accounts: dict[Key, AccountState],
    originals: dict[Key, OriginalEntry],
    positions: Iterator[int],
    now: int,
    id_key: Callable[[str, str], int] | None = None,
) -> Plan:
    """Decide every entry of the batch, in order. ACCOUNTS' balances are updated in place
    (running balances, so overdraft rules see earlier entries of the same batch). POSITIONS
    yields the ledger position (entry pk) of each posted entry, increasing. ID_KEY, if given,
    computes the store's integer key of an entry id (the last column of its row)."""
    plan = Plan()
    results = plan.results
    deltas = plan.deltas
    posted_at_dt: datetime | None = None
    times: dict[int, datetime] = {}
    in_batch: dict[Key, ExistingEntry] = {}
    batch_posted: dict[Key, JournalEntry] = {}
    entry_rows = plan.entry_rows
    leg_rows = plan.leg_rows
    currencies = plan.currencies
    encode = _META.encode
    for e in entries:
        tenant = e.tenant
        eid = e.id
        key = (tenant, eid)
        digest = e.content_hash()
        prior = existing.get(key) or in_batch.get(key)
        if prior is not None:
            if prior.content_hash == digest:
                posted_at = times.get(prior.posted_at)
                if posted_at is None:  # a replayed batch: its entries share one time
                    posted_at = times[prior.posted_at] = from_micros(prior.posted_at)
                results.append(
                    PostResult(
                        entry_id=eid, status="duplicate", position=prior.pk, posted_at=posted_at
                    )
                )
            else:
                results.append(
                    PostResult(
                        entry_id=eid,
                        status="conflict",
                        position=prior.pk,
                        reason=(
                            f"entry {eid!r} was already posted (position {prior.pk}) with "
                            "different content; nothing was posted. Use a new entry id for a "
                            "different posting, or post a reversal to undo the original"
                        ),
                    )
                )
            continue
        reason = e.problem()
        booked_at = e.booked_at
        reversal_of = e.reversal_of
        if reason is None and booked_at is not None and booked_at.utcoffset() is None:
            reason = f"booked_at {booked_at.isoformat()} must carry a time zone (UTC)"
        if reason is None and reversal_of is not None:
            target = (tenant, reversal_of)
            orig = originals.get(target)
            if orig is None and target in batch_posted:
                orig = originals[target] = _original_of(batch_posted[target])
            reason = _reversal_problem(e, orig)
        # Resolve the legs' accounts once: (state, signed amount) per leg.
        resolved: list[tuple[AccountState, int]] = []
        limited = False
        if reason is None:
            for i, leg in enumerate(e.legs):
                acc = accounts.get((tenant, leg.account))
                amount = leg.amount
                if acc is None:
                    reason = (
                        f"leg {i}: unknown account {leg.account!r} in tenant {tenant!r}; "
                        "create the account first"
                    )
                    break
                if acc.currency != amount.currency:
                    reason = (
                        f"leg {i}: account {leg.account!r} is in {acc.currency}, "
                        f"the leg amount is {amount}"
                    )
                    break
                debit = leg.side == "debit"
                if acc.status != "open" and (acc.status == "closed" or debit):
                    reason = f"leg {i}: account {leg.account!r} is {acc.status}" + (
                        "" if acc.status == "closed" else " (credits only)"
                    )
                    break
                resolved.append((acc, -amount.minor if debit else amount.minor))
                if acc.overdraft_limit is not None:
                    limited = True
        if limited and reason is None:
            reason = _overdraft_problem(e, resolved)
        if reason is not None:
            results.append(PostResult(entry_id=eid, status="refused", reason=reason))
            plan.refused.append(key)
            continue
        # Posted: assign the next position, apply running balances, emit rows.
        pk = next(positions)
        booked = now if booked_at is None else to_micros(booked_at)
        meta = e.metadata
        entry_rows.append(
            (
                pk,
                tenant,
                eid,
                digest,
                booked,
                now,
                e.sequence_id,
                e.source_event_id,
                reversal_of,
                e.description,
                encode(meta).decode() if meta else None,
                None if id_key is None else id_key(tenant, eid),
            )
        )
        for idx, (acc, signed) in enumerate(resolved):
            acc.balance += signed
            apk = acc.pk
            leg_rows.append((pk, idx, apk, signed, booked))
            d = deltas.get(apk)
            if d is None:
                d = deltas[apk] = [0, 0, 0, 0]
                currencies[apk] = acc.currency
            d[0] += signed
            if signed < 0:
                d[1] -= signed
            else:
                d[2] += signed
            d[3] += 1
        in_batch[key] = ExistingEntry(pk, digest, now)
        batch_posted[key] = e
        if reversal_of is not None:
            target = (tenant, reversal_of)
            orig = originals.get(target)
            if orig is None:  # reverses an entry posted earlier in this batch
                orig = originals[target] = _original_of(batch_posted[target])
            orig.reversed_by = eid
        if posted_at_dt is None:
            posted_at_dt = from_micros(now)
        results.append(
            PostResult(entry_id=eid, status="posted", position=pk, posted_at=posted_at_dt)
        )
    return plan


def _original_of(e: JournalEntry) -> OriginalEntry:
    return OriginalEntry(
        legs=[(lg.account, lg.side, lg.amount.currency, lg.amount.minor) for lg in e.legs],
        is_reversal=e.reversal_of is not None,
        reversed_by=None,
    )


def _overdraft_problem(e: JournalEntry, resolved: list[tuple[AccountState, int]]) -> str | None:
    """Would this entry take an account with an overdraft rule below its limit?"""
    effect: dict[int, int] = {}
    states: dict[int, AccountState] = {}
    for acc, signed in resolved:
        if acc.overdraft_limit is not None:
            effect[acc.pk] = effect.get(acc.pk, 0) + signed
            states[acc.pk] = acc
    for apk, delta in effect.items():
        acc = states[apk]
        limit = acc.overdraft_limit
        if limit is not None and delta < 0 and acc.balance + delta < -limit:
            acc_id = next(
                leg.account for leg, (a, _) in zip(e.legs, resolved, strict=False) if a is acc
            )
            rule = (
                "overdraft is forbidden"
                if limit == 0
                else f"its overdraft limit is {_fmt(limit, acc.currency)}"
            )
            return (
                f"account {acc_id!r} would go to {_fmt(acc.balance + delta, acc.currency)}"
                f" (balance {_fmt(acc.balance, acc.currency)}) but {rule}"
            )
    return None


def _reversal_problem(e: JournalEntry, original: OriginalEntry | None) -> str | None:
    if original is None:
        return (
            f"entry {e.id!r} reverses {e.reversal_of!r}, which does not exist in tenant "
            f"{e.tenant!r}"
        )
    if original.is_reversal:
        return (
            f"entry {e.reversal_of!r} is itself a reversal; post a new entry instead of "
            "reversing a reversal"
        )
    if original.reversed_by is not None:
        return f"entry {e.reversal_of!r} was already reversed by {original.reversed_by!r}"
    flip = {"debit": "credit", "credit": "debit"}
    mine = sorted((lg.account, flip[lg.side], lg.amount.currency, lg.amount.minor) for lg in e.legs)
    if mine != sorted(original.legs):
        return (
            f"entry {e.id!r} does not mirror the legs of {e.reversal_of!r}: a reversal must "
            "post every leg of the original on the other side (use JournalEntry.reversal())"
        )
    return None


def check_plan(plan: Plan) -> None:
    """Money is conserved (DESIGN §3.2), asserted in production: the balance changes a batch
    is about to write sum to zero per currency (each entry was checked to balance before)."""
    net: dict[str, int] = {}
    currencies = plan.currencies
    for apk, d in plan.deltas.items():
        cur = currencies[apk]
        net[cur] = net.get(cur, 0) + d[0]
    for cur, total in net.items():
        if total:
            raise AssertionError(
                f"ledger invariant broken: a batch would change {cur} balances by {total}"
            )
