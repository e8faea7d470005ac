"""FR6 → FR9 on real stage outputs: standardized authorizations are enriched with the
generated reference data, decided by the default rules (per-tenant values from the reference
data), turned into legs, assembled in shuffled order with duplicates, and posted to the
SQLite ledger in one transaction per batch; the trial balance is zero and a full redelivery
posts nothing new."""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from paypost.events import (
    AuthorizationAccepted,
    AuthorizationRequest,
    AuthorizationResponse,
    Event,
    Merchant,
    new_event,
)
from paypost.ledger import sqlite as ledger_sqlite
from paypost.ledger.model import Account
from paypost.money import Money
from paypost.refdata.generate import generate_refdata
from paypost.security.tokens import Tokenizer
from paypost.stages import assembler as asm
from paypost.stages.enrich import enrich
from paypost.stages.post import create_legs, internal_accounts
from paypost.stages.posting_file import (
    PostingFileWriter,
    add_to_outbox,
    ensure_outbox_schema,
    export_outbox,
    read_batches,
)
from paypost.stages.rules import (
    apply_rules,
    default_rules_text,
    parse_rules,
    variables_from_tenants,
)
from paypost.stages.standardize import standardize_one


@dataclass(frozen=True)
class _Token:
    token: str
    masked: str


class ShortTokenizer:
    """The real tokenizer, token cut to the 34 characters pacs.008 account ids allow."""

    def __init__(self) -> None:
        self._inner = Tokenizer(b"test-key-0123456789abcdef-0123456")

    def tokenize(self, pan: str, tenant: str) -> _Token:
        ct = self._inner.tokenize(pan, tenant)
        return _Token(ct.token, ct.masked)


MERCHANTS = [
    Merchant(id="M-GB-1", name="Tesco Stores 3041", mcc="5411", city="London", country="826"),
    Merchant(id="M-FR-2", name="Carrefour Paris", mcc="5411", city="Paris", country="250"),
    Merchant(id="M-MT-3", name="Lucky Casino", mcc="7995", city="Valletta", country="470"),
    Merchant(id="M-US-4", name="Coin Exchange", mcc="6051", city="Austin", country="840"),
]
AMOUNTS = [Money(1250, "GBP"), Money(4999, "EUR"), Money(2500, "USD"), Money(900000, "GBP")]


def standardized(i: int, card: object, rng: random.Random) -> Event:
    token, masked, tenant = card.token, card.masked, card.tenant  # type: ignore[attr-defined]
    detail = AuthorizationAccepted(
        request=AuthorizationRequest(
            stan=f"{i:06d}",
            transmission_time="2026-11-21T10:15:00Z",
            acquirer_id="ACQ0001",
            card_token=token,
            pan_masked=masked,
            amount=rng.choice(AMOUNTS),
            merchant=rng.choice(MERCHANTS),
            issuing_country=None if i % 17 == 0 else "GB",
        ),
        response=AuthorizationResponse(response_code="00", approval_code="AB12CD"),
        business_key=f"bk-{i}",
    )
    accepted = new_event(
        detail, source="paypost.dedup", tenant=tenant, time=f"2026-11-21T10:15:{i % 60:02d}Z"
    )
    out = standardize_one(accepted)
    assert out.detail_type == "TransactionStandardized", out.detail
    return out


def test_fr7_fr8_fr9_back_half_on_real_enriched_transactions(tmp_path: Path) -> None:
    rng = random.Random(5)
    generated = generate_refdata(40, seed=11, tokenizer=ShortTokenizer())
    refdata = generated.refdata
    std = [standardized(i, rng.choice(generated.cards), rng) for i in range(200)]
    enriched = [e for e in enrich(std, refdata) if e.detail_type == "TransactionEnriched"]
    assert len(enriched) > 150
    book = parse_rules(
        default_rules_text(), tenant_variables=variables_from_tenants(refdata.tenants.values())
    )
    decided = apply_rules(enriched, book)
    kinds = [e.detail_type for e in decided]
    approved = [e for e in decided if e.detail_type == "TransactionApproved"]
    assert kinds.count("TransactionRejected") >= 1  # missing issuing country
    assert kinds.count("TransactionHeld") >= 1  # GBP 9,000.00 over uk-bank's threshold
    assert {"ForeignTransactionDetected", "UnusualMerchantTypeDetected"} <= set(kinds)
    assert "CurrencyConversionDetected" in kinds

    legs = create_legs(approved)
    assert all(e.detail_type == "PostingLegCreated" for e in legs), [
        e.detail for e in legs if e.detail_type != "PostingLegCreated"
    ][:1]

    conn = ledger_sqlite.connect(tmp_path / "paypost.db")
    ledger_sqlite.ensure_schema(conn)
    asm.ensure_schema(conn)
    ensure_outbox_schema(conn)
    conn.execute("BEGIN IMMEDIATE")
    currencies = sorted({c for e in legs for c in [e.detail["amount"]["currency"]]})
    accounts: list[Account] = []
    for tenant in refdata.tenants:
        accounts += internal_accounts(tenant, currencies)
    for a in refdata.accounts.values():
        accounts.append(Account(id=a.id, tenant=a.tenant, kind="customer", currency=a.currency))
    ledger_sqlite.create_accounts_in(conn, accounts)
    conn.execute("COMMIT")

    store = asm.SqliteLegStore(conn)
    stream = legs + rng.sample(legs, 40)  # duplicates
    rng.shuffle(stream)
    posted = 0
    for attempt in range(2):  # the second pass redelivers everything
        for k in range(0, len(stream), 97):
            conn.execute("BEGIN IMMEDIATE")
            result = asm.assemble(stream[k : k + 97], store, now_us=0)
            done = asm.finish(result, store, partial(ledger_sqlite.post_batch_in, conn))
            add_to_outbox(conn, done.records)
            conn.execute("COMMIT")
            assert done.dead_letters == [] and not [
                e for e in done.events if e.detail_type != "TransactionPosted"
            ]
            posted += done.posted
        if attempt == 0:
            assert posted == len(approved)
    assert posted == len(approved)  # nothing twice
    for tenant in refdata.tenants:
        assert ledger_sqlite.trial_balance_in(conn, tenant).balanced

    path = tmp_path / "postings.csv"
    assert export_outbox(conn, PostingFileWriter(path)) == len(approved)
    details = [d for b in read_batches(path) for d in b["details"]]
    assert len(details) == len({d["entry_id"] for d in details}) == len(approved)
    text = path.read_text()
    for card in generated.cards:
        assert card.token not in text  # masked PAN only, no token either
    conn.close()


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__])
