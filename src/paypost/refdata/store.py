"""Reference data in the embedded database, holder personal data encrypted at rest.

Tables (prefix `refdata_`), one snapshot per version so a replay can enrich with the exact
version an event names (DESIGN §3.1):

    refdata_versions  (seq, version_id UNIQUE, declared, content_hash, loaded_at, counts)
    refdata_rows      (seq, version_id, kind, row_id, doc)           -- non-personal fields, JSON
    refdata_holders   (seq, version_id, account_id, nonce, sealed)   -- AES-256-GCM

The holder's name and address are sealed with AES-256-GCM under a key derived (HKDF-SHA256,
label "paypost/refdata-holder/v1") from the vault master key (`paypost.security.tokens`:
$PAYPOST_VAULT_KEY, $PAYPOST_VAULT_KEY_FILE or the demo key file), with the version id and
account id as associated data, so a sealed row cannot be moved to another account. They are
opened only in memory, when a snapshot is loaded. `secure_delete` is turned on so replaced
pages are zeroed.

Like every paypost store, `save_refdata` works on the connection it is given and does not
commit (the caller's unit of work does); `load_refdata_into_db` is the standalone convenience.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from paypost.config import UserError
from paypost.events import utc_now
from paypost.refdata.model import (
    Account,
    Branch,
    MerchantInfo,
    RateQuote,
    RefData,
    RefDataVersion,
    TenantSettings,
)

HOLDER_KEY_LABEL = b"paypost/refdata-holder/v1"

SCHEMA = """
CREATE TABLE IF NOT EXISTS refdata_versions (
    seq INTEGER PRIMARY KEY,
    version_id TEXT NOT NULL UNIQUE,
    declared TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    loaded_at TEXT NOT NULL,
    counts TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS refdata_rows (
    seq INTEGER PRIMARY KEY,
    version_id TEXT NOT NULL,
    kind TEXT NOT NULL,              -- tenant | account | branch | fx_rate | merchant
    row_id TEXT NOT NULL,
    doc BLOB NOT NULL                -- JSON, personal fields removed
);
CREATE INDEX IF NOT EXISTS refdata_rows_version ON refdata_rows (version_id, kind);
CREATE TABLE IF NOT EXISTS refdata_holders (
    seq INTEGER PRIMARY KEY,
    version_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    nonce BLOB NOT NULL,
    sealed BLOB NOT NULL             -- AES-256-GCM of {"holder_name", "holder_address"}
);
CREATE INDEX IF NOT EXISTS refdata_holders_version ON refdata_holders (version_id);
"""


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the refdata_* tables if absent (no commit)."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)


class HolderPersonalData(msgspec.Struct, frozen=True):
    holder_name: str
    holder_address: str | None = None


class HolderCipher:
    """AES-256-GCM for account holders' personal data, keyed from the vault master key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("the holder data key must be 32 bytes")
        self._aead = AESGCM(key)

    @classmethod
    def from_master(cls, master: bytes) -> HolderCipher:
        """Derive the holder key from the vault master key (a separate HKDF label)."""
        if len(master) != 32:
            raise ValueError(f"the vault master key must be 32 bytes, got {len(master)}")
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HOLDER_KEY_LABEL)
        return cls(key.derive(master))

    @staticmethod
    def _aad(version_id: str, account_id: str) -> bytes:
        return b"paypost/refdata-holder/v1|" + version_id.encode() + b"|" + account_id.encode()

    def seal(self, version_id: str, account: Account) -> tuple[bytes, bytes]:
        nonce = os.urandom(12)
        clear = msgspec.json.encode(HolderPersonalData(account.holder_name, account.holder_address))
        return nonce, self._aead.encrypt(nonce, clear, self._aad(version_id, account.id))

    def open(
        self, version_id: str, account_id: str, nonce: bytes, sealed: bytes
    ) -> HolderPersonalData:
        try:
            clear = self._aead.decrypt(nonce, sealed, self._aad(version_id, account_id))
        except InvalidTag:
            raise UserError(
                f"the holder data of account {account_id} (reference data {version_id}) cannot "
                "be decrypted: the configured vault key is not the one it was stored with "
                "(set PAYPOST_VAULT_KEY / PAYPOST_VAULT_KEY_FILE to that key), or the row was "
                "altered"
            ) from None
        return msgspec.json.decode(clear, type=HolderPersonalData)


_PERSONAL = {"holder_name", "holder_address"}


def save_refdata(conn: sqlite3.Connection, refdata: RefData, cipher: HolderCipher) -> bool:
    """Store REFDATA as a version snapshot. False when that version is already stored.

    Does not commit: run it inside the caller's transaction.
    """
    ensure_schema(conn)
    vid = refdata.version.id
    if conn.execute("SELECT 1 FROM refdata_versions WHERE version_id = ?", (vid,)).fetchone():
        return False
    enc = msgspec.json.encode
    rows: list[tuple[str, str, str, bytes]] = []
    rows += [(vid, "tenant", t.id, enc(t)) for t in refdata.tenants.values()]
    rows += [(vid, "branch", b.id, enc(b)) for b in refdata.branches.values()]
    rows += [(vid, "fx_rate", f"{r.base}/{r.quote}", enc(r)) for r in refdata.rates.values()]
    rows += [(vid, "merchant", m.id, enc(m)) for m in refdata.merchants.values()]
    holders: list[tuple[str, str, bytes, bytes]] = []
    for a in refdata.accounts.values():
        public = {k: v for k, v in msgspec.to_builtins(a).items() if k not in _PERSONAL}
        rows.append((vid, "account", a.id, enc(public)))
        nonce, sealed = cipher.seal(vid, a)
        holders.append((vid, a.id, nonce, sealed))
    conn.executemany(
        "INSERT INTO refdata_rows (version_id, kind, row_id, doc) VALUES (?, ?, ?, ?)", rows
    )
    conn.executemany(
        "INSERT INTO refdata_holders (version_id, account_id, nonce, sealed) VALUES (?, ?, ?, ?)",
        holders,
    )
    conn.execute(
        "INSERT INTO refdata_versions (version_id, declared, content_hash, loaded_at, counts) "
        "VALUES (?, ?, ?, ?, ?)",
        (
            vid,
            refdata.version.declared,
            refdata.version.content_hash,
            utc_now(),
            enc(refdata.counts()).decode(),
        ),
    )
    return True


def stored_versions(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every stored version, oldest first."""
    ensure_schema(conn)
    return [
        {
            "version_id": v,
            "declared": d,
            "content_hash": h,
            "loaded_at": at,
            "counts": msgspec.json.decode(c),
        }
        for v, d, h, at, c in conn.execute(
            "SELECT version_id, declared, content_hash, loaded_at, counts "
            "FROM refdata_versions ORDER BY seq"
        )
    ]


def load_refdata_from_db(
    conn: sqlite3.Connection, cipher: HolderCipher, version_id: str | None = None
) -> RefData:
    """The snapshot VERSION_ID (default: the latest stored), holders decrypted in memory."""
    ensure_schema(conn)
    if version_id is None:
        row = conn.execute(
            "SELECT version_id, declared, content_hash FROM refdata_versions "
            "ORDER BY seq DESC LIMIT 1"
        ).fetchone()
    else:
        row = conn.execute(
            "SELECT version_id, declared, content_hash FROM refdata_versions WHERE version_id = ?",
            (version_id,),
        ).fetchone()
    if row is None:
        what = f"reference data version {version_id!r}" if version_id else "reference data"
        raise UserError(
            f"the database holds no {what}: load a reference data directory first "
            "(paypost refdata load examples/refdata)"
        )
    vid = row[0]
    version = RefDataVersion(declared=row[1], content_hash=row[2])
    dec = msgspec.json.decode
    tenants: list[TenantSettings] = []
    branches: list[Branch] = []
    rates: list[RateQuote] = []
    merchants: list[MerchantInfo] = []
    public_accounts: dict[str, dict[str, object]] = {}
    for kind, doc in conn.execute(
        "SELECT kind, doc FROM refdata_rows WHERE version_id = ? ORDER BY seq", (vid,)
    ):
        if kind == "tenant":
            tenants.append(dec(doc, type=TenantSettings))
        elif kind == "branch":
            branches.append(dec(doc, type=Branch))
        elif kind == "fx_rate":
            rates.append(dec(doc, type=RateQuote))
        elif kind == "merchant":
            merchants.append(dec(doc, type=MerchantInfo))
        elif kind == "account":
            public = dec(doc)
            public_accounts[str(public["id"])] = public
    accounts: list[Account] = []
    for account_id, nonce, sealed in conn.execute(
        "SELECT account_id, nonce, sealed FROM refdata_holders WHERE version_id = ? ORDER BY seq",
        (vid,),
    ):
        personal = cipher.open(vid, account_id, nonce, sealed)
        doc = public_accounts.pop(account_id)
        doc["holder_name"] = personal.holder_name
        doc["holder_address"] = personal.holder_address
        accounts.append(msgspec.convert(doc, Account))
    assert not public_accounts, "every stored account has its sealed holder row"
    return RefData(
        version=version,
        tenants=tenants,
        accounts=accounts,
        branches=branches,
        rates=rates,
        merchants=merchants,
    )


def connect(db_path: Path) -> sqlite3.Connection:
    """A connection with paypost's embedded settings (WAL, synchronous=FULL, secure_delete)."""
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA secure_delete=ON")
    return conn


def load_refdata_into_db(db_path: Path, refdata: RefData, cipher: HolderCipher) -> bool:
    """Standalone: store REFDATA in the database file DB_PATH and commit."""
    conn = connect(db_path)
    try:
        with conn:
            return save_refdata(conn, refdata, cipher)
    finally:
        conn.close()
