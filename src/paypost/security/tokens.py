"""Tokenization at the edge, PAN detection and the PAN vault (NFR6, DESIGN §3.4).

A card number (PAN) is replaced at ingress by a `CardToken`: a token that is keyed and
deterministic per tenant (one card → one token within a tenant, unrelated tokens across
tenants) plus the masked form (first 6, last 4). The PAN itself goes only into the vault,
encrypted with AES-256-GCM, tenant and token bound as associated data, so a ciphertext
cannot be opened under another tenant or moved to another token.

Detection (`find_pans`, `redact`) flags any Luhn-valid run of 13–19 digits, also when the
digits are grouped with single spaces or dashes as card numbers are commonly written
("4111 1111 1111 1111", "4111-1111-1111-1111"). The logging pipeline runs `redact` over every
line as a last line of defence; ingest quarantines a record whose non-PAN fields hold one.

Keys come from configuration: `PAYPOST_VAULT_KEY` (base64 of 32 bytes) or
`PAYPOST_VAULT_KEY_FILE` (a file holding that base64 text). The demo generates
`<data-dir>/vault.key` (mode 0600) and says so. One master key is split with HKDF into the
tokenization key and the encryption key, so the two uses never share key material.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from paypost.config import UserError

VAULT_KEY_ENV = "PAYPOST_VAULT_KEY"
VAULT_KEY_FILE_ENV = "PAYPOST_VAULT_KEY_FILE"
DEMO_KEY_FILENAME = "vault.key"
TOKEN_PREFIX = "tok_"

TOKEN_CACHE_SIZE = 100_000
PAN_MIN_DIGITS = 13
PAN_MAX_DIGITS = 19

# ------------------------------------------------------------------------------------------
# Luhn and PAN detection

# Luhn: digit value when doubled (2*d, minus 9 when above 9).
_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)
# A maximal run of digit groups joined by single spaces or dashes.
# ASCII digits only ([0-9]): card numbers are ASCII, and it is 3x faster than Unicode \d.
_RUN = re.compile(r"[0-9]+(?:[ -][0-9]+)*")
_GROUP = re.compile(r"[0-9]+")
# Cheap pre-filter: with spaces and dashes removed, a PAN is 13+ consecutive digits. A text
# with no such run after the removal holds no PAN.
_THIRTEEN_DIGITS = re.compile(r"[0-9]{13}")
_LONG_DIGIT_RUN = re.compile(r"[0-9]{13,}")
# The same searches without the regex engine (it retries at every digit of a run: ~20x
# slower on the short fields ingest scans). Every ASCII digit byte becomes "0", every other
# byte "x", so a run of 13 digits is a run of 13 zeros, found by a substring search. UTF-8
# keeps ASCII digits, spaces and dashes as they are and writes every other character with
# bytes >= 0x80 (surrogatepass: lone surrogates too), so runs are the same in the bytes.
_DIGIT_CLASSES = bytes(0x30 if 0x30 <= b <= 0x39 else 0x78 for b in range(256))
_ZEROS_13 = b"0" * 13


def luhn_valid(digits: str) -> bool:
    """True when DIGITS (only 0-9) passes the Luhn mod-10 check used by card numbers."""
    total = 0
    double = False
    for ch in reversed(digits):
        d = ord(ch) - 48
        if d < 0 or d > 9:
            return False
        total += _DOUBLED[d] if double else d
        double = not double
    return bool(digits) and total % 10 == 0


def mask_pan(pan: str) -> str:
    """First 6 and last 4 digits kept, the rest as `*` (PCI DSS display rule).

    Separators are dropped. A number too short to show 10 digits keeps only its last 4.
    """
    digits = pan if pan.isdigit() else "".join(ch for ch in pan if ch.isdigit())
    n = len(digits)
    if n >= 13:
        return digits[:6] + "*" * (n - 10) + digits[-4:]
    if n > 4:
        return "*" * (n - 4) + digits[-4:]
    return "*" * n


def _group_windows(text: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    """Spans inside one digit run that may be a PAN.

    - one group of 13–19 digits (letters may touch it: "ref4111111111111111" is caught);
      a group longer than 19 digits is searched digit by digit (a PAN buried in a number);
    - consecutive groups of 3–6 digits joined by single spaces or dashes, 13–19 digits in
      all, not glued to a letter or digit at either end: how card numbers are written
      ("4111 1111 1111 1111", "3782 822463 10005"). Groups of 1–2 digits (dates, times) and
      hex fragments of UUIDs ("cd13-4077-5820-8663") are not read as card numbers.
    """
    groups = [(m.start(), m.end()) for m in _GROUP.finditer(text, start, end)]
    n = len(text)
    for i, (g0, g1) in enumerate(groups):
        size = g1 - g0
        if PAN_MIN_DIGITS <= size <= PAN_MAX_DIGITS:
            yield g0, g1
        elif size > PAN_MAX_DIGITS:
            for s in range(g0, g1 - PAN_MIN_DIGITS + 1):
                for length in range(PAN_MIN_DIGITS, min(PAN_MAX_DIGITS, g1 - s) + 1):
                    yield s, s + length
        if not 3 <= size <= 6 or (g0 > 0 and text[g0 - 1].isalnum()):
            continue
        count = size
        for j in range(i + 1, len(groups)):
            h0, h1 = groups[j]
            if not 3 <= h1 - h0 <= 6:
                break
            count += h1 - h0
            if count > PAN_MAX_DIGITS:
                break
            if count >= PAN_MIN_DIGITS and not (h1 < n and text[h1].isalnum()):
                yield g0, h1


def find_pans(text: str) -> list[tuple[int, int]]:
    """Spans (start, end) of TEXT that hold a Luhn-valid 13–19 digit card number.

    Digits may be grouped by single spaces or dashes. Overlapping hits are merged, so the
    spans are disjoint and sorted; replacing each span removes every detected number.
    """
    if not maybe_pan(text):
        return []
    hits: list[tuple[int, int]] = []
    for run in _RUN.finditer(text):
        rs, re_ = run.span()
        if re_ - rs < PAN_MIN_DIGITS:
            continue
        for s, e in _group_windows(text, rs, re_):
            digits = text[s:e].replace(" ", "").replace("-", "")
            if luhn_valid(digits):
                hits.append((s, e))
    if not hits:
        return []
    hits.sort()
    merged = [hits[0]]
    for s, e in hits[1:]:
        ls, le = merged[-1]
        if s <= le:
            merged[-1] = (ls, max(le, e))
        else:
            merged.append((s, e))
    return merged


def maybe_pan(text: str) -> bool:
    """Cheap pre-filter: False means TEXT surely holds no PAN (13 digits, single separators).

    = `_THIRTEEN_DIGITS.search(text.replace(" ", "").replace("-", "")) is not None`, in bytes.
    """
    return _ZEROS_13 in text.encode("utf-8", "surrogatepass").translate(_DIGIT_CLASSES, b" -")


def contains_pan(text: str) -> bool:
    """True when TEXT holds a Luhn-valid 13–19 digit number (see `find_pans`)."""
    return bool(find_pans(text))


def redact(text: str) -> str:
    """TEXT with every Luhn-valid 13–19 digit run replaced by its masked form."""
    spans = find_pans(text)
    if not spans:
        return text
    out: list[str] = []
    pos = 0
    for s, e in spans:
        out.append(text[pos:s])
        out.append(mask_pan(text[s:e]))
        pos = e
    out.append(text[pos:])
    return "".join(out)


# ------------------------------------------------------------------------------------------
# Keys


def _hkdf(master: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(master)


@dataclass(frozen=True)
class VaultKeys:
    """The two keys derived from the configured master key (HKDF-SHA256, distinct labels)."""

    token_key: bytes
    encryption_key: bytes

    @classmethod
    def from_master(cls, master: bytes) -> VaultKeys:
        if len(master) != 32:
            raise ValueError(f"the vault master key must be 32 bytes, got {len(master)}")
        return cls(
            token_key=_hkdf(master, b"paypost/tokenization/v1"),
            encryption_key=_hkdf(master, b"paypost/vault-encryption/v1"),
        )


def _decode_key(text: str, where: str) -> bytes:
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise UserError(
            f"{where}: not a valid vault key (expected the base64 encoding of exactly 32 random "
            'bytes). Generate one with: python -c "import os,base64; '
            'print(base64.b64encode(os.urandom(32)).decode())"'
        )
    return key


def load_configured_key(environ: dict[str, str] | None = None) -> bytes | None:
    """The master key from $PAYPOST_VAULT_KEY or the file named by $PAYPOST_VAULT_KEY_FILE.

    None when neither is set. A malformed key raises `UserError` naming the variable or file.
    """
    env = os.environ if environ is None else environ
    value = env.get(VAULT_KEY_ENV)
    if value:
        return _decode_key(value, f"environment variable {VAULT_KEY_ENV}")
    path = env.get(VAULT_KEY_FILE_ENV)
    if path:
        try:
            text = Path(path).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(
                f"key file {path!r} (from {VAULT_KEY_FILE_ENV}) cannot be read: {exc}. "
                f"Point {VAULT_KEY_FILE_ENV} to a readable file holding the base64 key."
            ) from exc
        return _decode_key(text, f"key file {path!r} (from {VAULT_KEY_FILE_ENV})")
    return None


def load_or_create_demo_key(
    data_dir: Path, environ: dict[str, str] | None = None
) -> tuple[bytes, str | None]:
    """The master key: configured (env / key file), else `<data-dir>/vault.key`, else a new one.

    Returns (key, message); the message is not None when a local demo key was generated, and
    says where, so the caller can show it. The file is created with mode 0600.
    """
    configured = load_configured_key(environ)
    if configured is not None:
        return configured, None
    path = data_dir / DEMO_KEY_FILENAME
    if path.exists():
        try:
            text = path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(
                f"key file {str(path)!r} cannot be read: {exc}. Fix its permissions, or set "
                f"{VAULT_KEY_ENV} / {VAULT_KEY_FILE_ENV}."
            ) from exc
        return _decode_key(text, f"key file {str(path)!r}"), None
    data_dir.mkdir(parents=True, exist_ok=True)
    key = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(base64.b64encode(key).decode() + "\n")
    message = (
        f"generated a local demo vault key in {path} (mode 0600). For real use set "
        f"{VAULT_KEY_ENV} or {VAULT_KEY_FILE_ENV}; losing this key makes the vault unreadable."
    )
    return key, message


# ------------------------------------------------------------------------------------------
# Tokenization


@dataclass(frozen=True, slots=True)
class CardToken:
    """What replaces a PAN past ingress: the token and the masked PAN (first 6, last 4)."""

    token: str
    masked: str


class InvalidPan(ValueError):
    """A PAN field that is not 8–19 digits (ISO/IEC 7812)."""


def _has_digit_run(text: str) -> bool:
    """= `_LONG_DIGIT_RUN.search(text) is not None` (see `_DIGIT_CLASSES`)."""
    return _ZEROS_13 in text.encode("utf-8", "surrogatepass").translate(_DIGIT_CLASSES)


class Tokenizer:
    """Deterministic, keyed, per-tenant card tokens.

    token = "tok_" + base32(HMAC-SHA256(tenant_key, pan))[:32], lower case, where
    tenant_key = HMAC-SHA256(key, "paypost/tenant/" + tenant). 160 bits of the MAC: no
    collisions in practice, no way back to the PAN without the key. A token never holds a run
    of 13 or more digits (so it can never look like a PAN): should the base32 text ever hold
    one, a counter is appended to the MAC input and the token derived again (deterministic).
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the tokenization key must be at least 16 bytes")
        self._key = key
        self._tenant_keys: dict[str, bytes] = {}
        # Cards repeat: a bounded cache of recent (tenant, PAN) → token saves the MAC and the
        # base32. It lives in the ingress process's memory only and is cleared when full.
        self._cache: dict[tuple[str, str], CardToken] = {}

    def _tenant_key(self, tenant: str) -> bytes:
        tk = self._tenant_keys.get(tenant)
        if tk is None:
            tk = hmac.digest(self._key, b"paypost/tenant/" + tenant.encode(), "sha256")
            self._tenant_keys[tenant] = tk
        return tk

    def token_for(self, pan: str, tenant: str) -> str:
        """The token alone (no validation beyond `tokenize`'s)."""
        tk = self._tenant_key(tenant)
        msg = pan.encode("ascii")
        counter = 0
        while True:
            mac = hmac.digest(tk, msg if counter == 0 else msg + b"#%d" % counter, "sha256")
            token = TOKEN_PREFIX + base64.b32encode(mac[:20]).decode("ascii").lower()
            if not _has_digit_run(token):
                return token
            counter += 1

    def tokenize(self, pan: str, tenant: str) -> CardToken:
        """Token + masked form of PAN for TENANT. Raises `InvalidPan` for a malformed PAN."""
        card = self._cache.get((tenant, pan))
        if card is not None:
            return card
        if not (8 <= len(pan) <= PAN_MAX_DIGITS and pan.isascii() and pan.isdigit()):
            raise InvalidPan(f"PAN must be 8–19 digits, got {len(pan)} characters")
        card = CardToken(self.token_for(pan, tenant), mask_pan(pan))
        if len(self._cache) >= TOKEN_CACHE_SIZE:
            self._cache.clear()
        self._cache[(tenant, pan)] = card
        return card


# ------------------------------------------------------------------------------------------
# The vault


class VaultError(Exception):
    """Detokenization failed: unknown token, wrong tenant, or the wrong key."""


@dataclass(frozen=True, slots=True)
class SealedPan:
    """A PAN encrypted for the vault: what a unit of work writes (never the clear PAN)."""

    token: str
    tenant: str
    nonce: bytes
    ciphertext: bytes
    key_id: str


def _aad(token: str, tenant: str) -> bytes:
    return b"paypost/vault/v1|" + tenant.encode() + b"|" + token.encode()


class VaultCipher:
    """AES-256-GCM sealing of PANs; no I/O (the vault and ingest share it)."""

    def __init__(self, encryption_key: bytes) -> None:
        if len(encryption_key) != 32:
            raise ValueError("the vault encryption key must be 32 bytes")
        self._aead = AESGCM(encryption_key)
        # Identifies the key (not secret): tells "wrong key" apart from "tampered".
        self.key_id = hashlib.sha256(b"paypost/key-id|" + encryption_key).hexdigest()[:16]

    def seal(self, token: str, tenant: str, pan: str) -> SealedPan:
        nonce = os.urandom(12)
        ct = self._aead.encrypt(nonce, pan.encode("ascii"), _aad(token, tenant))
        return SealedPan(token, tenant, nonce, ct, self.key_id)

    def open(self, sealed: SealedPan, tenant: str) -> str:
        if sealed.key_id != self.key_id:
            raise VaultError(
                f"token {sealed.token} was sealed under vault key {sealed.key_id}, but the "
                f"configured key is {self.key_id}: configure the key the vault was written with"
            )
        try:
            pt = self._aead.decrypt(sealed.nonce, sealed.ciphertext, _aad(sealed.token, tenant))
        except InvalidTag:
            raise VaultError(
                f"token {sealed.token} cannot be opened for tenant {tenant!r} "
                "(wrong tenant, or the vault row was altered)"
            ) from None
        return pt.decode("ascii")


VAULT_SCHEMA = """
CREATE TABLE IF NOT EXISTS vault_pans (
    token      TEXT PRIMARY KEY,
    tenant     TEXT NOT NULL,
    key_id     TEXT NOT NULL,
    nonce      BLOB NOT NULL,
    ciphertext BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS vault_audit (
    id       INTEGER PRIMARY KEY,
    at       TEXT NOT NULL,
    token    TEXT NOT NULL,
    tenant   TEXT NOT NULL,
    purpose  TEXT NOT NULL,
    outcome  TEXT NOT NULL
);
"""


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the vault tables (vault_pans, vault_audit) if they are missing."""
    # Statement by statement: executescript would COMMIT the caller's unit of work.
    for stmt in VAULT_SCHEMA.split(";"):
        if stmt.strip():
            conn.execute(stmt)


class Vault:
    """The PAN vault on a SQLite connection: sealed PANs keyed by token, audited reads.

    Works inside the caller's unit of work: it never commits (use `Vault.standalone` for a
    connection of its own that commits). Tokens are per tenant, so a token names one tenant's
    card; the tenant is also bound into the ciphertext.
    """

    def __init__(self, conn: sqlite3.Connection, keys: VaultKeys) -> None:
        self.conn = conn
        self.tokenizer = Tokenizer(keys.token_key)
        self.cipher = VaultCipher(keys.encryption_key)

    @classmethod
    @contextmanager
    def standalone(cls, db_path: Path, keys: VaultKeys) -> Iterator[Vault]:
        """A vault on its own connection to DB_PATH, committed on a clean exit."""
        conn = sqlite3.connect(db_path)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA secure_delete=ON")
            ensure_schema(conn)
            vault = cls(conn, keys)
            with conn:
                yield vault
        finally:
            conn.close()

    def put(self, pan: str, tenant: str) -> CardToken:
        """Tokenize PAN for TENANT and store it sealed (idempotent). Returns the card token."""
        card = self.tokenizer.tokenize(pan, tenant)
        self.put_sealed([self.cipher.seal(card.token, tenant, pan)])
        return card

    def put_sealed(self, entries: Iterable[SealedPan]) -> None:
        """Store sealed PANs; a token already present keeps its first ciphertext."""
        self.conn.executemany(
            "INSERT OR IGNORE INTO vault_pans (token, tenant, key_id, nonce, ciphertext) "
            "VALUES (?, ?, ?, ?, ?)",
            [(e.token, e.tenant, e.key_id, e.nonce, e.ciphertext) for e in entries],
        )

    def detokenize(self, token: str, tenant: str, *, purpose: str) -> str:
        """The clear PAN of TOKEN for TENANT, for an authorized PURPOSE (audited, no PAN logged).

        Raises `VaultError` for an unknown token, another tenant's token or the wrong key.
        """
        from paypost.events import utc_now
        from paypost.logs import get_logger

        if not purpose.strip():
            raise VaultError("detokenize needs a purpose (recorded in the audit log)")
        log = get_logger("paypost.vault")
        row = self.conn.execute(
            "SELECT tenant, key_id, nonce, ciphertext FROM vault_pans WHERE token = ?", (token,)
        ).fetchone()
        outcome = "ok"
        try:
            if row is None:
                outcome = "unknown-token"
                raise VaultError(f"token {token} is not in the vault")
            sealed = SealedPan(token, str(row[0]), bytes(row[2]), bytes(row[3]), str(row[1]))
            try:
                pan = self.cipher.open(sealed, tenant)
            except VaultError:
                outcome = "denied"
                raise
            return pan
        finally:
            self.conn.execute(
                "INSERT INTO vault_audit (at, token, tenant, purpose, outcome) "
                "VALUES (?, ?, ?, ?, ?)",
                (utc_now(), token, tenant, purpose, outcome),
            )
            log.info(
                "vault.detokenize", token=token, tenant=tenant, purpose=purpose, outcome=outcome
            )
