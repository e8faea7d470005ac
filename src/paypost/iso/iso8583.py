"""paypost's ISO 8583 (1987) field specification for authorization logs, and helpers.

The specification (`SPEC`) is a pyiso8583 spec: ASCII MTI, ASCII hex primary/secondary bitmap,
ASCII data, ASCII length prefixes. Fields paypost reads are listed in `PAYPOST_FIELDS` and in
docs/iso8583.md; any other field present in a message decodes by the ISO 8583:1987 defaults and
is ignored.

The authorization log holds one message per line:

    <received-at> <HEX>

`received-at` is the time the logger received the message, RFC 3339 UTC
(`2026-11-21T10:15:02.123Z`); HEX is the raw message bytes in hexadecimal (upper or lower
case). Blank lines and lines starting with `#` are skipped.

Pairing (docs/ingest.md): a 0110 response answers the 0100 request with the same
STAN (11) + transmission date/time (7) + acquiring institution id (32).
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import iso8583
from iso8583.specs import default_ascii

from paypost.money import CURRENCY_EXPONENTS

# (field, description, format, max length, variable?) — the fields paypost reads or writes.
PAYPOST_FIELDS: Final[list[tuple[str, str, str, int, int]]] = [
    ("t", "Message type indicator (0100 request, 0110 response)", "n", 4, 0),
    ("p", "Primary bitmap (16 hex characters)", "an", 16, 0),
    ("1", "Secondary bitmap (16 hex characters, when fields 65-128 are present)", "an", 16, 0),
    ("2", "Primary account number (PAN)", "n", 19, 2),
    ("3", "Processing code", "n", 6, 0),
    ("4", "Amount, transaction (minor units of field 49)", "n", 12, 0),
    ("6", "Amount, cardholder billing (minor units of field 51)", "n", 12, 0),
    ("7", "Transmission date and time, MMDDhhmmss UTC", "n", 10, 0),
    ("11", "Systems trace audit number (STAN)", "n", 6, 0),
    ("12", "Time, local transaction, hhmmss", "n", 6, 0),
    ("13", "Date, local transaction, MMDD", "n", 4, 0),
    ("18", "Merchant category code (ISO 18245)", "n", 4, 0),
    ("20", "Issuer country code (ISO 3166 numeric; PAN extended country code)", "n", 3, 0),
    ("22", "Point of service entry mode", "n", 3, 0),
    ("32", "Acquiring institution identification code", "n", 11, 2),
    ("37", "Retrieval reference number", "an", 12, 0),
    ("38", "Approval code", "an", 6, 0),
    ("39", "Response code (00 = approved)", "an", 2, 0),
    ("41", "Card acceptor terminal id", "ans", 8, 0),
    ("42", "Card acceptor id code (merchant id)", "ans", 15, 0),
    ("43", "Card acceptor name (1-25) / city (26-38) / country alpha-2 (39-40)", "ans", 40, 0),
    ("49", "Currency code, transaction (ISO 4217 numeric)", "n", 3, 0),
    ("51", "Currency code, cardholder billing (ISO 4217 numeric)", "n", 3, 0),
]


def _build_spec() -> dict[str, dict[str, Any]]:
    spec: dict[str, dict[str, Any]] = copy.deepcopy(dict(default_ascii))
    for field, desc, _fmt, max_len, len_type in PAYPOST_FIELDS:
        spec[field] = {
            "data_enc": "ascii",
            "len_enc": "ascii",
            "len_type": len_type,
            "max_len": max_len,
            "desc": desc,
        }
    spec["h"] = {
        "data_enc": "ascii",
        "len_enc": "ascii",
        "len_type": 0,
        "max_len": 0,
        "desc": "Message header (none)",
    }
    return spec


SPEC: Final[dict[str, dict[str, Any]]] = _build_spec()

REQUEST_MTI = "0100"
RESPONSE_MTI = "0110"
APPROVED = "00"

# ISO 4217 numeric → alphabetic (a numeric map of our own; paypost.money holds exponents).
CURRENCY_ALPHA: Final[dict[str, str]] = {
    "978": "EUR", "840": "USD", "826": "GBP", "756": "CHF", "392": "JPY", "048": "BHD",
    "414": "KWD", "400": "JOD", "752": "SEK", "578": "NOK", "208": "DKK", "985": "PLN",
    "203": "CZK", "348": "HUF", "124": "CAD", "036": "AUD", "554": "NZD", "702": "SGD",
    "344": "HKD", "156": "CNY", "356": "INR", "986": "BRL", "484": "MXN", "710": "ZAR",
    "410": "KRW", "352": "ISK", "949": "TRY", "784": "AED", "682": "SAR", "376": "ILS",
    "764": "THB", "458": "MYR", "360": "IDR", "608": "PHP", "946": "RON", "975": "BGN",
    "152": "CLP", "704": "VND", "512": "OMR", "788": "TND", "368": "IQD", "434": "LYD",
    "950": "XAF", "952": "XOF", "990": "CLF", "927": "UYW", "600": "PYG", "800": "UGX",
    "646": "RWF", "174": "KMF", "262": "DJF", "324": "GNF", "548": "VUV", "953": "XPF",
    "108": "BIF",
}  # fmt: skip
CURRENCY_NUMERIC: Final[dict[str, str]] = {a: n for n, a in CURRENCY_ALPHA.items()}

# ISO 3166 numeric → alpha-2, for the issuer country (field 20).
COUNTRY_ALPHA2: Final[dict[str, str]] = {
    "826": "GB", "372": "IE", "250": "FR", "276": "DE", "528": "NL", "056": "BE", "442": "LU",
    "724": "ES", "620": "PT", "380": "IT", "040": "AT", "756": "CH", "752": "SE", "578": "NO",
    "208": "DK", "246": "FI", "352": "IS", "616": "PL", "203": "CZ", "348": "HU", "642": "RO",
    "100": "BG", "300": "GR", "792": "TR", "840": "US", "124": "CA", "484": "MX", "076": "BR",
    "032": "AR", "152": "CL", "392": "JP", "410": "KR", "156": "CN", "344": "HK", "702": "SG",
    "356": "IN", "036": "AU", "554": "NZ", "710": "ZA", "784": "AE", "682": "SA", "376": "IL",
    "764": "TH", "458": "MY", "360": "ID", "608": "PH", "704": "VN", "048": "BH", "414": "KW",
    "400": "JO", "512": "OM", "818": "EG", "504": "MA", "788": "TN",
}  # fmt: skip
COUNTRY_NUMERIC: Final[dict[str, str]] = {a: n for n, a in COUNTRY_ALPHA2.items()}


class Iso8583FormatError(ValueError):
    """A log line or message that does not follow paypost's ISO 8583 spec (reason in text)."""


def currency_alpha(numeric: str) -> str:
    """ISO 4217 alphabetic code of a numeric one ("978" → "EUR")."""
    alpha = CURRENCY_ALPHA.get(numeric)
    if alpha is None or alpha not in CURRENCY_EXPONENTS:
        raise Iso8583FormatError(f"unknown ISO 4217 numeric currency code {numeric!r}")
    return alpha


def currency_numeric(alpha: str) -> str:
    """ISO 4217 numeric code of an alphabetic one ("EUR" → "978")."""
    numeric = CURRENCY_NUMERIC.get(alpha)
    if numeric is None:
        raise Iso8583FormatError(f"no ISO 4217 numeric code known for {alpha!r}")
    return numeric


def country_alpha2(numeric: str) -> str:
    """ISO 3166 alpha-2 of a numeric code; the numeric code itself when not in the table."""
    return COUNTRY_ALPHA2.get(numeric, numeric)


def encode_message(fields: dict[str, str]) -> bytes:
    """Encode FIELDS (t = MTI, "2", "3", ...) with paypost's spec; bitmaps are computed.

    A compiled fast path handles well-formed messages (tests check it against pyiso8583);
    anything unusual is encoded by pyiso8583 itself, which also explains errors.
    """
    raw = _encode_fast(fields)
    if raw is not None:
        return raw
    return encode_message_reference(fields)


def encode_message_reference(fields: dict[str, str]) -> bytes:
    """Encode FIELDS with pyiso8583 itself (the reference encoder; slower)."""
    doc = {k: v for k, v in fields.items() if k not in ("p", "1")}
    try:
        raw, _ = iso8583.encode(doc, SPEC)
    except iso8583.EncodeError as exc:
        raise Iso8583FormatError(str(exc)) from None
    return bytes(raw)


def _encode_fast(fields: dict[str, str]) -> bytes | None:
    mti = fields.get("t")
    if mti is None or len(mti) != 4 or fields.get("h"):
        return None
    numbers = sorted(int(k) for k in fields if k.isdigit() and k != "1")
    if not numbers or numbers[0] < 2 or numbers[-1] > 128:
        return None
    secondary = numbers[-1] > 64
    bits = (1 << 127) if secondary else 0
    parts = [mti, ""]
    for n in numbers:
        bits |= 1 << (128 - n)
        entry = _FIELD_TABLE[n]
        assert entry is not None
        name, len_type, max_len = entry
        value = fields[name]
        if not value.isascii():
            return None
        if len_type == 0:
            if len(value) != max_len:
                return None
            parts.append(value)
        else:
            if len(value) > max_len:
                return None
            parts.append(f"{len(value):0{len_type}d}")
            parts.append(value)
    parts[1] = f"{bits:032X}" if secondary else f"{bits >> 64:016X}"
    return "".join(parts).encode("ascii")


# The spec compiled for the hot path: (field name, length-prefix digits, max length) per bit.
_FIELD_TABLE: Final[list[tuple[str, int, int] | None]] = [None] + [
    (str(i), int(SPEC[str(i)]["len_type"]), int(SPEC[str(i)]["max_len"])) for i in range(1, 129)
]
_HEX = frozenset("0123456789abcdefABCDEF")
_SECONDARY_FIRST = frozenset("89abcdefABCDEF")  # first hex digit with bit 1 set
# Bitmap (hex) → the fields it announces, in order: a log has a handful of distinct bitmaps.
_LAYOUTS: dict[str, tuple[tuple[str, int, int], ...]] = {}


def _layout(bitmap: str) -> tuple[tuple[str, int, int], ...]:
    bits = "".join(f"{int(bitmap[i : i + 16], 16):064b}" for i in range(0, len(bitmap), 16))
    fields = []
    for i in range(1, len(bits)):  # bit 1 is the secondary bitmap, handled by the caller
        if bits[i] == "1":
            entry = _FIELD_TABLE[i + 1]
            assert entry is not None
            fields.append(entry)
    layout = tuple(fields)
    if len(_LAYOUTS) < 4096:
        _LAYOUTS[bitmap] = layout
    return layout


def _decode_fast(raw: bytes) -> dict[str, str] | None:
    """Decode RAW by the compiled SPEC (all-ASCII spec); None when anything looks off.

    pyiso8583 stays the reference: on None the caller decodes with it (and gets its error
    message); tests check the two agree on generated messages.
    """
    try:
        s = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    if len(s) < 20 or not _HEX.issuperset(s[4:20]):
        return None
    doc = {"t": s[0:4], "p": s[4:20]}
    pos = 20
    bitmap = s[4:20]
    if s[4] in _SECONDARY_FIRST:
        if len(s) < 36 or not _HEX.issuperset(s[20:36]):
            return None
        doc["1"] = s[20:36]
        bitmap = s[4:36]
        pos = 36
    layout = _LAYOUTS.get(bitmap)
    if layout is None:
        layout = _layout(bitmap)
    n = len(s)
    for name, len_type, max_len in layout:
        if len_type == 0:
            end = pos + max_len
        else:
            prefix = s[pos : pos + len_type]
            if len(prefix) != len_type or not prefix.isdigit():
                return None
            length = int(prefix)
            if length > max_len:
                return None
            pos += len_type
            end = pos + length
        if end > n:
            return None
        doc[name] = s[pos:end]
        pos = end
    if pos != n:
        return None
    return doc


def decode_partial(raw: bytes) -> tuple[dict[str, str], bytes]:
    """As many leading fields of RAW as decode by the spec, and the bytes left over.

    For showing a malformed message field by field (quarantine); never raises.
    """
    s = raw.decode("latin-1")
    doc: dict[str, str] = {}
    if len(s) < 4:
        return doc, raw
    doc["t"] = s[0:4]
    if len(s) < 20 or not _HEX.issuperset(s[4:20]):
        return doc, raw[4:]
    doc["p"] = s[4:20]
    bitmap, pos = s[4:20], 20
    if s[4] in _SECONDARY_FIRST:
        if len(s) < 36 or not _HEX.issuperset(s[20:36]):
            return doc, raw[20:]
        doc["1"] = s[20:36]
        bitmap, pos = s[4:36], 36
    for name, len_type, max_len in _layout(bitmap):
        start = pos
        if len_type:
            prefix = s[pos : pos + len_type]
            if len(prefix) != len_type or not prefix.isdigit() or int(prefix) > max_len:
                return doc, raw[start:]
            pos += len_type
            end = pos + int(prefix)
        else:
            end = pos + max_len
        if end > len(s):
            return doc, raw[start:]
        doc[name] = s[pos:end]
        pos = end
    return doc, raw[pos:]


def decode_message(raw: bytes) -> dict[str, str]:
    """Decode RAW with paypost's spec into {field: value}; raises Iso8583FormatError."""
    doc = _decode_fast(raw)
    if doc is not None:
        return doc
    try:
        ref, _ = iso8583.decode(raw, SPEC)
    except iso8583.DecodeError as exc:
        raise Iso8583FormatError(str(exc)) from None
    return ref


def decode_message_reference(raw: bytes) -> dict[str, str]:
    """Decode RAW with pyiso8583 itself (the reference decoder; slower)."""
    try:
        ref, _ = iso8583.decode(raw, SPEC)
    except iso8583.DecodeError as exc:
        raise Iso8583FormatError(str(exc)) from None
    return ref


def format_log_line(received_at: str, raw: bytes) -> str:
    """One authorization-log line (without the newline)."""
    return f"{received_at} {raw.hex().upper()}"


def parse_log_line(line: str) -> tuple[str, bytes]:
    """(received_at, raw bytes) of one log line; raises Iso8583FormatError when malformed."""
    # Fast path for the usual line, one space between two tokens: split at the first space
    # instead of scanning the whole message for whitespace. The message held no whitespace
    # exactly when fromhex read two digits per byte; anything else takes the general path.
    received_at, _, hex_text = line.partition(" ")
    if hex_text and len(received_at.split()) == 1 and received_at == received_at.strip():
        try:
            raw = bytes.fromhex(hex_text)
        except ValueError:
            pass
        else:
            if 2 * len(raw) == len(hex_text):
                return received_at, raw
    parts = line.split()
    if len(parts) != 2:
        raise Iso8583FormatError(
            "expected '<received-at> <hex message>' (2 fields separated by a space), "
            f"got {len(parts)} fields"
        )
    received_at, hex_text = parts
    try:
        raw = bytes.fromhex(hex_text)
    except ValueError:
        raise Iso8583FormatError("the message is not valid hexadecimal") from None
    return received_at, raw


def parse_utc(text: str) -> datetime:
    """An RFC 3339 UTC timestamp ("...Z" or "+00:00"); raises Iso8583FormatError."""
    try:
        dt = datetime.fromisoformat(text)  # Python 3.11 reads "Z"
    except ValueError:
        raise Iso8583FormatError(f"{text!r} is not an RFC 3339 timestamp") from None
    offset = dt.utcoffset()
    if offset is None:
        raise Iso8583FormatError(f"{text!r} has no time zone (use UTC, e.g. ...Z)")
    return dt if not offset and dt.tzinfo is UTC else dt.astimezone(UTC)


def format_utc(dt: datetime) -> str:
    """RFC 3339 UTC, second precision unless DT has milliseconds (deterministic text)."""
    spec = "milliseconds" if dt.microsecond else "seconds"
    return dt.astimezone(UTC).isoformat(timespec=spec).replace("+00:00", "Z")


def transmission_datetime(mmddhhmmss: str, reference: datetime) -> datetime:
    """Field 7 (no year) as a UTC datetime: the year that puts it closest to REFERENCE.

    The logger's receive time is within minutes of the transmission time, so a message sent
    on Dec 31 and logged on Jan 1 gets the previous year.
    """
    if len(mmddhhmmss) != 10 or not mmddhhmmss.isdigit():
        raise Iso8583FormatError(f"field 7 {mmddhhmmss!r} is not MMDDhhmmss")
    month, day = int(mmddhhmmss[0:2]), int(mmddhhmmss[2:4])
    hh, mi, ss = int(mmddhhmmss[4:6]), int(mmddhhmmss[6:8]), int(mmddhhmmss[8:10])
    try:  # the common case: same year, close to the log time
        cand = datetime(reference.year, month, day, hh, mi, ss, tzinfo=UTC)
        if abs(cand - reference) <= timedelta(days=2):
            return cand
    except ValueError:
        pass
    best: datetime | None = None
    for year in (reference.year - 1, reference.year, reference.year + 1):
        try:
            cand = datetime(year, month, day, hh, mi, ss, tzinfo=UTC)
        except ValueError:
            continue
        if best is None or abs(cand - reference) < abs(best - reference):
            best = cand
    if best is None:
        raise Iso8583FormatError(f"field 7 {mmddhhmmss!r} is not a valid date and time")
    if abs(best - reference) > timedelta(days=2):
        raise Iso8583FormatError(
            f"field 7 {mmddhhmmss!r} is more than 2 days from the log time {format_utc(reference)}"
        )
    return best


def transmission_field(dt: datetime) -> str:
    """A UTC datetime as field 7 (MMDDhhmmss)."""
    return dt.astimezone(UTC).strftime("%m%d%H%M%S")


def field43(name: str, city: str, country: str) -> str:
    """Card acceptor name/location: name 25, city 13, country alpha-2 (40 characters)."""
    return f"{name[:25]:<25}{city[:13]:<13}{country[:2]:<2}"


def parse_field43(value: str) -> tuple[str, str | None, str | None]:
    """(name, city, country) of field 43; empty parts are None."""
    name = value[:25].strip()
    city = value[25:38].strip() or None
    country = value[38:40].strip() or None
    return name, city, country
