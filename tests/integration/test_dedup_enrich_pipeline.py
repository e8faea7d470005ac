"""FR2–FR6 together: approved authorizations → dedup (SQLite, one transaction per batch) →
standardize → enrich with reference data stored encrypted and loaded back; every
authorization ends in exactly one state, and no file holds a PAN or a holder's name."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from paypost.events import (
    AuthorizationApproved,
    AuthorizationRequest,
    AuthorizationResponse,
    Event,
    Merchant,
    new_event,
)
from paypost.money import Money
from paypost.refdata.generate import generate_refdata
from paypost.refdata.store import HolderCipher, load_refdata_from_db, save_refdata
from paypost.security.tokens import Tokenizer, VaultKeys
from paypost.stages.dedup import SqliteDedupIndex, check_duplicates
from paypost.stages.enrich import enrich
from paypost.stages.standardize import standardize

MASTER = bytes(range(1, 33))
MERCHANTS = (
    Merchant(id="M-GB-000101", name="Tesco", mcc="5411", city="London", country="826"),
    Merchant(id="M-US-000401", name="Katz", mcc="5812", city="New York", country="840"),
)


def _approved(i: int, tenant: str, token: str, masked: str, currency: str) -> Event:
    return new_event(
        AuthorizationApproved(
            request=AuthorizationRequest(
                stan=f"{i:06d}",
                transmission_time=f"2026-11-21T10:{i // 60 % 60:02d}:{i % 60:02d}Z",
                acquirer_id="ACQ0001",
                card_token=token,
                pan_masked=masked,
                amount=Money(500 + i, currency),
                merchant=MERCHANTS[i % 2],
            ),
            response=AuthorizationResponse(response_code="00", approval_code=f"A{i:05d}"),
            source_ref=f"log:{i}",
        ),
        source="paypost.ingest",
        tenant=tenant,
        time=f"2026-11-21T10:{i // 60 % 60:02d}:{i % 60:02d}Z",
    )


def test_fr2_to_fr6_front_half_with_real_tokens(tmp_path: Path) -> None:
    keys = VaultKeys.from_master(MASTER)
    generated = generate_refdata(60, seed=11, tokenizer=Tokenizer(keys.token_key))
    db = tmp_path / "paypost.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    cipher = HolderCipher.from_master(MASTER)
    conn.execute("BEGIN")
    save_refdata(conn, generated.refdata, cipher)
    conn.execute("COMMIT")
    refdata = load_refdata_from_db(conn, cipher)

    approved = [
        _approved(i, c.tenant, c.token, c.masked, "USD" if i % 4 == 0 else c.currency)
        for i, c in enumerate(generated.cards[:60])
    ]
    duplicates = [Event.from_dict({**e.to_dict(), "id": f"copy-{e.id}"}) for e in approved[::10]]
    index = SqliteDedupIndex(conn)
    outcomes: dict[str, int] = {}
    for batch in (approved[:30] + duplicates[:3], approved[30:] + duplicates[3:] + approved[:5]):
        conn.execute("BEGIN")
        result = check_duplicates(batch, index)
        index.apply(result.effects)
        conn.execute("COMMIT")
        accepted = [e for e in result.outputs if e.detail_type == "AuthorizationAccepted"]
        for e in result.outputs:
            if e.detail_type != "AuthorizationAccepted":
                outcomes[e.detail_type] = outcomes.get(e.detail_type, 0) + 1
        for out in enrich(standardize(accepted), refdata):
            outcomes[out.detail_type] = outcomes.get(out.detail_type, 0) + 1
    conn.close()

    assert outcomes.get("DuplicateParked") == len(duplicates)
    assert len(approved) == 60
    # Every original ends enriched (USD has a rate for every account currency) or held.
    assert outcomes.get("TransactionEnriched", 0) + outcomes.get("TransactionHeld", 0) == 60
    assert outcomes.get("TransactionEnriched", 0) == 60
    written = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    for card in generated.cards:
        assert card.pan.encode() not in written
    for account in generated.refdata.accounts.values():
        assert account.holder_name.encode() not in written
