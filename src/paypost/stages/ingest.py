"""Ingest: authorizations in, one `AuthorizationApproved` per approved authorization out (FR1).

Adapters (docs/ingest.md):

- `Iso8583LogReader`: an authorization log of ISO 8583 0100 requests and 0110 responses (spec
  and log format: `paypost.iso.iso8583`). A response pairs with the pending request of the same
  STAN (11) + transmission date/time (7) + acquiring institution id (32). Approved (39 = 00):
  one event; declined: counted, no event; a request still unanswered `response_timeout_s`
  after it was logged (log time, not wall time, so a re-read decides the same) is reported in
  the quarantine as `response-timeout`; a response with no pending request is quarantined.
- `JsonLinesReader` / `CsvReader`: one record = request + response fields (`AuthorizationRecord`).
- `TableFeedReader`: the `ingest_authorizations` table (rows inserted by another system) read
  as a change feed by row id.

Every adapter reads in batches (`IngestBatch`) and never commits: a batch carries its events,
the sealed PANs for the vault, its quarantined records and the checkpoint *after* it, and the
caller commits all of that in ONE transaction with the publish of the events (`run_ingest`).
Crash anywhere: the checkpoint and the events move together, so a restart resumes exactly
where the last committed batch ended. Event ids are derived from the source name and the
record's position (`derive_event_id("ingest:<source>@<position>", "ingest")`) and the event
content is a function of the record alone (envelope `time` = the authorization's transmission
time), so a re-read yields byte-identical events that the bus's publish dedup drops (FR9).

Tokenization at the edge (NFR6, DESIGN §3.4): the PAN is replaced by its per-tenant token and
masked form before anything else sees the record; the PAN itself leaves only sealed (AES-GCM)
for the vault. A record whose other fields hold a Luhn-valid 13–19 digit number is quarantined
with every such number masked. Modes (FR11): `realtime` = batches of 1, `near-realtime` =
small batches, `batch` = large batches (a file as one checkpointed job).
"""

from __future__ import annotations

import csv
import functools
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import msgspec

from paypost.config import UserError
from paypost.events import (
    AuthorizationApproved,
    AuthorizationRequest,
    Event,
    SchemaRef,
    derive_event_id,
    utc_now,
)
from paypost.iso import iso8583 as iso
from paypost.logs import get_logger, log_context
from paypost.money import CURRENCY_EXPONENTS
from paypost.security.tokens import (
    CardToken,
    InvalidPan,
    SealedPan,
    Tokenizer,
    VaultCipher,
    VaultKeys,
    find_pans,
    mask_pan,
    maybe_pan,
    redact,
)
from paypost.security.tokens import ensure_schema as ensure_vault_schema

STAGE = "ingest"
EVENT_SOURCE = "paypost.ingest"

IngestFormat = Literal["iso8583", "jsonl", "csv", "table"]
IngestMode = Literal["realtime", "near-realtime", "batch"]
QuarantineKind = Literal[
    "malformed", "pan-in-field", "orphan-response", "response-timeout", "pan-mismatch"
]

DEFAULT_BATCH = {"realtime": 1, "near-realtime": 250, "batch": 5000}

log = get_logger("paypost.ingest")

# --------------------------------------------------------------------------------------------
# Configuration, checkpoints, batches


class SourceConfig(msgspec.Struct, frozen=True, kw_only=True):
    """One ingest source (FR11: mode per source and tenant).

    `name` is part of every event id and the checkpoint key: keep it stable for a source
    (re-reading a source under another name yields other ids).
    """

    name: str
    tenant: str
    format: IngestFormat
    mode: IngestMode = "batch"
    batch_size: int | None = None  # records per batch; default by mode (1 / 250 / 5000)
    response_timeout_s: float = 60.0  # ISO 8583: a request unanswered this long is reported
    scrub_table_pans: bool = True  # table feed: overwrite the read PAN with its masked form

    def records_per_batch(self) -> int:
        n = self.batch_size or DEFAULT_BATCH[self.mode]
        if n < 1:
            raise UserError(f"source {self.name!r}: batch_size must be >= 1, got {n}")
        return n


class Counters(msgspec.Struct, kw_only=True):
    """Cumulative per-source counts (kept in the checkpoint)."""

    records: int = 0
    approved: int = 0
    declined: int = 0
    timed_out: int = 0
    quarantined: int = 0

    def add(self, other: Counters) -> None:
        self.records += other.records
        self.approved += other.approved
        self.declined += other.declined
        self.timed_out += other.timed_out
        self.quarantined += other.quarantined


class PendingRequest(msgspec.Struct, frozen=True, kw_only=True):
    """An ISO 8583 request waiting for its response (tokenized: no PAN)."""

    key: str
    line: int
    offset: int
    received_at: str
    received_ts: float
    request: AuthorizationRequest


class Checkpoint(msgspec.Struct, kw_only=True):
    """Where a source resumes: byte offset + line (files) or last row id (table)."""

    source: str
    position: int = 0
    line: int = 0
    pending: list[PendingRequest] = []
    counters: Counters = msgspec.field(default_factory=Counters)


class QuarantineRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A record ingestion set aside: where it was, why, and its content with PANs masked."""

    source: str
    tenant: str
    position: int  # byte offset (files) or row id (table)
    line: int | None  # line number (files)
    kind: QuarantineKind
    reason: str
    record: str


@dataclass
class IngestBatch:
    """What one batch produced; commit it all in the caller's unit of work."""

    source: str
    tenant: str
    events: list[Event] = field(default_factory=list)
    sealed_pans: list[SealedPan] = field(default_factory=list)
    quarantined: list[QuarantineRecord] = field(default_factory=list)
    checkpoint: Checkpoint | None = None
    counts: Counters = field(default_factory=Counters)
    scrub_rows: tuple[int, int] | None = None  # table feed: (after id, up to id) to scrub


class IngestSourceError(UserError):
    """A whole source cannot be read (missing file, bad header, checkpoint past the end)."""


# --------------------------------------------------------------------------------------------
# Edge: tokenization and masking


def mask_all(text: str) -> str:
    """TEXT for the quarantine: Luhn-valid numbers masked, and any other run of 13+ digits too.

    Stricter than `redact` on purpose: a malformed record may hold a mistyped PAN.
    """
    text = redact(text)
    return _DIGIT_RUN_13.sub(lambda m: mask_pan(m.group(0)), text)


_DIGIT_RUN_13 = re.compile(r"[0-9](?:[ -]?[0-9]){12,}")


def printable(raw: bytes) -> str:
    """Bytes as text: printable ASCII kept, anything else as \\xNN (digit runs stay intact)."""
    return raw.decode("latin-1").encode("ascii", "backslashreplace").decode("ascii")


class EdgeTokenizer:
    """Tokenizes PANs for a reader and seals each new card once for the vault."""

    def __init__(self, keys: VaultKeys) -> None:
        self.tokenizer = Tokenizer(keys.token_key)
        self.cipher = VaultCipher(keys.encryption_key)
        self._sealed: set[str] = set()

    def tokenize(self, pan: str, tenant: str, out: list[SealedPan]) -> CardToken:
        card = self.tokenizer.tokenize(pan, tenant)
        if card.token not in self._sealed:
            out.append(self.cipher.seal(card.token, tenant, pan))
            self._sealed.add(card.token)
        return card

    def forget(self, tokens: Iterable[str]) -> None:
        """After a failed commit: those tokens must be sealed again."""
        self._sealed.difference_update(tokens)


def _pan_fields(values: Iterable[tuple[str, str | None]]) -> list[str]:
    """Names of the fields whose value holds a Luhn-valid 13–19 digit number.

    One pre-filter search over all values joined by a non-separator character rejects almost
    every record at once; only a record with a 13-digit run gets the per-field check.
    """
    pairs = [(name, value) for name, value in values if value]
    if not maybe_pan("\x1f".join(v for _, v in pairs)):
        return []
    return [name for name, value in pairs if find_pans(value)]


_APPROVED_SCHEMA = SchemaRef(
    name=AuthorizationApproved.DETAIL_TYPE, version=AuthorizationApproved.VERSION
)


def _event_for(
    source: SourceConfig,
    tenant: str,
    position: int,
    request: dict[str, Any],
    response: dict[str, Any],
    source_ref: str,
) -> Event:
    """The AuthorizationApproved event, built from plain data (the hot path).

    REQUEST and RESPONSE are exactly the builtins form of `AuthorizationRequest` /
    `AuthorizationResponse` (every field, in declaration order); tests check that the detail
    decodes as `AuthorizationApproved` and re-encodes to the same bytes, so this stays equal
    to `new_event(AuthorizationApproved(...))` without paying for the structs.
    """
    event_id = derive_event_id(f"ingest:{source.name}@{position}", STAGE, 0)
    return Event(
        id=event_id,
        source=EVENT_SOURCE,
        detail_type=AuthorizationApproved.DETAIL_TYPE,
        time=request["transmission_time"],
        tenant=tenant,
        correlation_id=event_id,
        schema=_APPROVED_SCHEMA,
        detail={"request": request, "response": response, "source_ref": source_ref},
    )


def _request_dict(
    *,
    stan: str,
    transmission_time: str,
    acquirer_id: str,
    card: CardToken,
    processing_code: str,
    amount: tuple[int, str],
    billing: tuple[int, str] | None,
    merchant_id: str,
    merchant_name: str,
    mcc: str,
    city: str | None,
    country: str | None,
    terminal_id: str | None,
    rrn: str | None,
    issuing_country: str | None,
) -> dict[str, Any]:
    """`AuthorizationRequest` as plain data (field order of the struct)."""
    return {
        "mti": "0100",
        "stan": stan,
        "transmission_time": transmission_time,
        "acquirer_id": acquirer_id,
        "card_token": card.token,
        "pan_masked": card.masked,
        "processing_code": processing_code,
        "amount": {"minor": amount[0], "currency": amount[1]},
        "billing_amount": None if billing is None else {"minor": billing[0],
                                                          "currency": billing[1]},
        "merchant": {"id": merchant_id, "name": merchant_name, "mcc": mcc, "city": city,
                     "country": country},
        "terminal_id": terminal_id,
        "rrn": rrn,
        "issuing_country": issuing_country,
    }  # fmt: skip


def _response_dict(
    code: str, approval_code: str | None, responded_at: str | None
) -> dict[str, Any]:
    """`AuthorizationResponse` as plain data (field order of the struct)."""
    return {
        "mti": "0110",
        "response_code": code,
        "approval_code": approval_code,
        "responded_at": responded_at,
    }


# --------------------------------------------------------------------------------------------
# The flat record schema (JSON Lines, CSV, table)


class AuthorizationRecord(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One authorization (request + response) as a flat record. See docs/ingest.md."""

    pan: str
    stan: str
    transmission_time: str
    acquirer_id: str
    amount_minor: int
    currency: str
    merchant_id: str
    merchant_name: str
    mcc: str
    response_code: str
    tenant: str | None = None
    processing_code: str = "000000"
    billing_amount_minor: int | None = None
    billing_currency: str | None = None
    merchant_city: str | None = None
    merchant_country: str | None = None
    terminal_id: str | None = None
    rrn: str | None = None
    issuing_country: str | None = None
    approval_code: str | None = None
    responded_at: str | None = None


RECORD_FIELDS: tuple[str, ...] = AuthorizationRecord.__struct_fields__
assert RECORD_FIELDS[0] == "pan"
_NON_PAN_FIELDS = tuple(f for f in RECORD_FIELDS if f != "pan")


class RecordError(ValueError):
    """A record that breaks the schema; the message names the field (never a PAN)."""


def _currency(code: str, what: str) -> str:
    code = code.strip().upper()
    if code.isdigit():
        try:
            return iso.currency_alpha(code.zfill(3))
        except iso.Iso8583FormatError:
            raise RecordError(f"{what}: unknown ISO 4217 numeric code {code!r}") from None
    if code not in CURRENCY_EXPONENTS:
        raise RecordError(f"{what}: unknown ISO 4217 currency {code!r}")
    return code


def _digits(value: str, what: str, min_len: int, max_len: int) -> str:
    v = value.strip()
    if not (min_len <= len(v) <= max_len and v.isascii() and v.isdigit()):
        raise RecordError(f"{what} must be {min_len}–{max_len} digits")
    return v


_CANONICAL_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{3})?Z")


def _is_canonical_utc(text: str) -> bool:
    """= `_CANONICAL_UTC.fullmatch(text) is not None`, without the regex engine (twice per
    ISO 8583 authorization). `str.isdecimal` is the regex's \\d: Unicode category Nd."""
    n = len(text)
    if n == 20:
        digits = text[0:4] + text[5:7] + text[8:10] + text[11:13] + text[14:16] + text[17:19]
    elif n == 24 and text[19] == ".":
        digits = text[0:4] + text[5:7] + text[8:10] + text[11:13] + text[14:16] + text[17:19]
        digits += text[20:23]
    else:
        return False
    return (
        text[4] == "-"
        and text[7] == "-"
        and text[10] == "T"
        and text[13] == ":"
        and text[16] == ":"
        and text[-1] == "Z"
        and digits.isdecimal()
    )


def _utc(text: str, what: str) -> str:
    if _is_canonical_utc(text):
        # Already in the canonical form (the common case): validate, keep the text.
        try:
            datetime.fromisoformat(text[:-1])
        except ValueError:
            raise RecordError(f"{what} is not a valid date and time") from None
        return text if not text.endswith(".000Z") else text[:-5] + "Z"
    try:
        return iso.format_utc(iso.parse_utc(text))
    except iso.Iso8583FormatError:
        raise RecordError(f"{what} is not an RFC 3339 UTC timestamp") from None


def _record_to_parts(
    rec: AuthorizationRecord, tenant: str, edge: EdgeTokenizer, sealed: list[SealedPan]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Validate REC and build the tokenized request/response data (raises RecordError)."""
    pan = rec.pan.replace(" ", "").replace("-", "")
    try:
        card = edge.tokenize(pan, tenant, sealed)
    except InvalidPan as exc:
        raise RecordError(f"pan: {exc}") from None
    if rec.amount_minor < 0:
        raise RecordError("amount_minor must be >= 0 (minor units)")
    amount = (rec.amount_minor, _currency(rec.currency, "currency"))
    billing = None
    if rec.billing_amount_minor is not None:
        if rec.billing_currency is None:
            raise RecordError("billing_amount_minor given without billing_currency")
        if rec.billing_amount_minor < 0:
            raise RecordError("billing_amount_minor must be >= 0 (minor units)")
        billing = (rec.billing_amount_minor, _currency(rec.billing_currency, "billing"))
    issuing = rec.issuing_country
    if issuing and issuing.isdigit():
        issuing = iso.country_alpha2(issuing.zfill(3))
    name = rec.merchant_name.strip()
    merchant_id = rec.merchant_id.strip()
    if not name or not merchant_id:
        raise RecordError("merchant_id and merchant_name must not be blank")
    request = _request_dict(
        stan=_digits(rec.stan, "stan", 1, 6).zfill(6),
        transmission_time=_utc(rec.transmission_time, "transmission_time"),
        acquirer_id=_digits(rec.acquirer_id, "acquirer_id", 1, 11),
        card=card,
        processing_code=_digits(rec.processing_code, "processing_code", 6, 6),
        amount=amount,
        billing=billing,
        merchant_id=merchant_id,
        merchant_name=name,
        mcc=_digits(rec.mcc, "mcc", 4, 4),
        city=rec.merchant_city,
        country=rec.merchant_country,
        terminal_id=rec.terminal_id,
        rrn=rec.rrn,
        issuing_country=issuing,
    )
    code = rec.response_code.strip()
    if len(code) != 2:
        raise RecordError("response_code must be 2 characters (00 = approved)")
    response = _response_dict(
        code,
        rec.approval_code,
        _utc(rec.responded_at, "responded_at") if rec.responded_at else None,
    )
    return request, response


def _masked_record_text(data: Any) -> str:
    """A record (dict or text) as JSON text for the quarantine, every PAN masked."""
    if isinstance(data, dict):
        safe = dict(data)
        pan = safe.get("pan")
        if isinstance(pan, str):
            safe["pan"] = mask_pan(pan)
        text = msgspec.json.encode(safe).decode("utf-8", "replace")
    else:
        text = str(data)
    return mask_all(text)


# --------------------------------------------------------------------------------------------
# Readers


def _log_batch(config: SourceConfig, batch: IngestBatch, position: int, **where: int) -> None:
    """One structured line per batch. Its correlation-id names the batch by the checkpoint it
    commits (`source@position`), so every line about the batch can be found with it."""
    log.info(
        "ingest.batch",
        source=config.name,
        tenant=config.tenant,
        **{"correlation-id": f"{config.name}@{position}"},
        **where,
        events=len(batch.events),
        records=batch.counts.records,
        declined=batch.counts.declined,
        quarantined=batch.counts.quarantined,
        timed_out=batch.counts.timed_out,
    )


class _ReaderBase:
    """What every reader has: its source, the edge tokenizer, the checkpoint, quarantining."""

    config: SourceConfig
    edge: EdgeTokenizer
    checkpoint: Checkpoint

    def _quarantine(
        self,
        batch: IngestBatch,
        *,
        position: int,
        line: int | None,
        kind: QuarantineKind,
        reason: str,
        record: str,
        tenant: str | None = None,
    ) -> None:
        q = QuarantineRecord(
            source=self.config.name,
            tenant=tenant or self.config.tenant,
            position=position,
            line=line,
            kind=kind,
            reason=mask_all(reason),
            record=record,
        )
        batch.quarantined.append(q)
        batch.counts.quarantined += 1
        # correlation-id: the id this record's event would have had, to trace it in the logs.
        record_id = self._record_position(position, line)
        log.warning(
            "ingest.quarantined",
            source=self.config.name,
            tenant=q.tenant,
            position=position,
            line=line,
            kind=kind,
            reason=q.reason,
            **{"correlation-id": derive_event_id(f"ingest:{self.config.name}@{record_id}", STAGE)},
        )

    def _record_position(self, position: int, line: int | None) -> int:
        """The position in a record's event id (the byte offset or row id; ISO: the line)."""
        return position

    def batches(self, final: bool = False) -> Iterator[IngestBatch]:
        raise NotImplementedError


class _FileReader(_ReaderBase):
    """Common part of the line-oriented readers: open at the checkpoint, batch, checkpoint."""

    def __init__(
        self,
        path: Path,
        config: SourceConfig,
        keys: VaultKeys,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        self.path = path
        self.config = config
        self.edge = EdgeTokenizer(keys)
        self.checkpoint = checkpoint or Checkpoint(source=config.name)
        if not path.is_file():
            raise IngestSourceError(
                f"source {config.name!r}: {str(path)!r} is not a readable file. "
                "Check the path (or the source configuration)."
            )
        size = path.stat().st_size
        if self.checkpoint.position > size:
            raise IngestSourceError(
                f"source {config.name!r}: the checkpoint is at byte {self.checkpoint.position} "
                f"but {str(path)!r} has only {size} bytes: the file was replaced or truncated. "
                "Ingest the new file under a new source name (or delete the checkpoint)."
            )

    def _new_batch(self) -> IngestBatch:
        return IngestBatch(source=self.config.name, tenant=self.config.tenant)

    def _close(self, batch: IngestBatch, offset: int, line: int) -> IngestBatch:
        cp = self.checkpoint
        counters = Counters(**msgspec.structs.asdict(cp.counters))
        counters.add(batch.counts)
        self.checkpoint = Checkpoint(
            source=cp.source,
            position=offset,
            line=line,
            pending=self._pending_list(),
            counters=counters,
        )
        batch.checkpoint = self.checkpoint
        _log_batch(self.config, batch, offset, line=line)
        return batch

    def _pending_list(self) -> list[PendingRequest]:
        return []

    def batches(self, final: bool = False) -> Iterator[IngestBatch]:
        """Read to the end of the file in batches.

        FINAL: the file is complete (a last line without newline is read, and an ISO 8583
        log reports its still unanswered requests); otherwise a last line without newline
        is left for the next read (the writer may still be appending).
        """
        per_batch = self.config.records_per_batch()
        offset, line = self.checkpoint.position, self.checkpoint.line
        with self.path.open("rb") as fh:
            fh.seek(offset)
            batch = self._new_batch()
            for raw in fh:
                if not final and not raw.endswith(b"\n"):
                    break
                line += 1
                self._handle(batch, line, offset, raw)
                offset += len(raw)
                if batch.counts.records >= per_batch:
                    yield self._close(batch, offset, line)
                    batch = self._new_batch()
        self._at_end(batch, final)
        moved = (offset, line) != (self.checkpoint.position, self.checkpoint.line)
        if batch.counts.records or batch.quarantined or moved:
            yield self._close(batch, offset, line)

    def _handle(self, batch: IngestBatch, line: int, offset: int, raw: bytes) -> None:
        raise NotImplementedError

    def _at_end(self, batch: IngestBatch, final: bool) -> None:
        return None


class JsonLinesReader(_FileReader):
    """JSON Lines: one `AuthorizationRecord` object per line."""

    _decoder = msgspec.json.Decoder(AuthorizationRecord)

    def _handle(self, batch: IngestBatch, line: int, offset: int, raw: bytes) -> None:
        text = raw.strip()
        if not text:
            return
        batch.counts.records += 1
        try:
            rec = self._decoder.decode(text)
        except msgspec.DecodeError as exc:
            try:
                data: Any = msgspec.json.decode(text)
            except msgspec.DecodeError:
                data = printable(text)
            self._quarantine(
                batch,
                position=offset,
                line=line,
                kind="malformed",
                reason=f"not a valid authorization record: {exc}",
                record=_masked_record_text(data),
            )
            return
        _ingest_record(self, batch, rec, offset, line, lambda: msgspec.json.decode(text))


class CsvReader(_FileReader):
    """CSV with a header row naming `AuthorizationRecord` fields (any order, optional ones may
    be left out). Empty cells are absent values."""

    def __init__(
        self,
        path: Path,
        config: SourceConfig,
        keys: VaultKeys,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        super().__init__(path, config, keys, checkpoint)
        with path.open("rb") as fh:
            header_raw = fh.readline()
        header = next(csv.reader([header_raw.decode("utf-8-sig", "replace")]), [])
        self.header = [h.strip() for h in header]
        unknown = [h for h in self.header if h not in RECORD_FIELDS]
        missing = [
            f
            for f, info in zip(
                RECORD_FIELDS, msgspec.structs.fields(AuthorizationRecord), strict=True
            )
            if info.required and f not in self.header
        ]
        if unknown or missing:
            raise IngestSourceError(
                f"source {config.name!r}: the CSV header of {str(path)!r} does not match the "
                f"authorization record schema (unknown columns: {mask_all(', '.join(unknown))}"
                f"{'; ' if unknown else ''}missing columns: {', '.join(missing) or 'none'}). "
                "See docs/ingest.md for the columns."
            )
        if self.checkpoint.position == 0:
            self.checkpoint = Checkpoint(
                source=config.name, position=len(header_raw), line=1, pending=[]
            )

    def _handle(self, batch: IngestBatch, line: int, offset: int, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not text.strip():
            return
        batch.counts.records += 1
        try:
            row = next(csv.reader([text]))
        except csv.Error as exc:
            self._quarantine(
                batch,
                position=offset,
                line=line,
                kind="malformed",
                reason=f"not valid CSV: {exc}",
                record=mask_all(text),
            )
            return
        if len(row) != len(self.header) or "\ufffd" in text:
            why = "not UTF-8" if "\ufffd" in text else f"{len(row)} cells for {len(self.header)}"
            self._quarantine(
                batch,
                position=offset,
                line=line,
                kind="malformed",
                reason=f"not a valid authorization record: {why} columns",
                record=mask_all(text),
            )
            return
        data = {k: v for k, v in zip(self.header, row, strict=True) if v != ""}
        try:
            rec = msgspec.convert(data, AuthorizationRecord, strict=False)
        except msgspec.ValidationError as exc:
            self._quarantine(
                batch,
                position=offset,
                line=line,
                kind="malformed",
                reason=f"not a valid authorization record: {exc}",
                record=_masked_record_text(data),
            )
            return
        _ingest_record(self, batch, rec, offset, line, lambda: data)


def _ingest_record(
    reader: _ReaderBase,
    batch: IngestBatch,
    rec: AuthorizationRecord,
    position: int,
    line: int | None,
    original: Callable[[], Any],
) -> None:
    """Shared tail of the flat readers: PAN scan, validation, tokenization, event."""
    tenant = rec.tenant or reader.config.tenant
    values = msgspec.structs.astuple(rec)
    hits: list[str] = []
    if maybe_pan("\x1f".join(map(str, values[1:]))):  # values[0] is the pan
        hits = _pan_fields((f, v) for f in _NON_PAN_FIELDS if isinstance(v := getattr(rec, f), str))
    if hits:
        reader._quarantine(
            batch,
            position=position,
            line=line,
            kind="pan-in-field",
            reason=(
                f"field(s) {', '.join(hits)} hold a Luhn-valid 13–19 digit number (a card "
                "number outside the pan field): record set aside, number masked"
            ),
            record=_masked_record_text(original()),
            tenant=tenant,
        )
        return
    sealed_before = len(batch.sealed_pans)
    try:
        request, response = _record_to_parts(rec, tenant, reader.edge, batch.sealed_pans)
    except (RecordError, ValueError, TypeError) as exc:
        del batch.sealed_pans[sealed_before:]
        reader._quarantine(
            batch,
            position=position,
            line=line,
            kind="malformed",
            reason=f"not a valid authorization record: {exc}",
            record=_masked_record_text(original()),
            tenant=tenant,
        )
        return
    if response["response_code"] != iso.APPROVED:
        batch.counts.declined += 1
        return
    batch.counts.approved += 1
    ref = (
        f"{reader.config.name}#L{line}"
        if line is not None
        else f"{reader.config.name}#row{position}"
    )
    batch.events.append(_event_for(reader.config, tenant, position, request, response, ref))


# --------------------------------------------------------------------------------------------
# ISO 8583 authorization log

_REQUEST_REQUIRED = frozenset(("2", "4", "7", "11", "18", "32", "42", "43", "49"))
_RESPONSE_REQUIRED = frozenset(("7", "11", "32", "39"))
# Fields scanned for card numbers: every field but the PAN (2) that can hold 13 characters;
# a shorter field cannot hold a 13-digit number, even with separators.
_SCAN_FIELDS = frozenset(
    name
    for name, spec in iso.SPEC.items()
    if name.isdigit() and name not in ("1", "2") and int(spec["max_len"]) >= 13
)


class _Pending:
    """A request awaiting its response, in memory (request as plain data)."""

    __slots__ = ("key", "line", "offset", "received_at", "received_ts", "request")

    def __init__(
        self,
        key: str,
        line: int,
        offset: int,
        received_at: str,
        received_ts: float,
        request: dict[str, Any],
    ) -> None:
        self.key = key
        self.line = line
        self.offset = offset
        self.received_at = received_at
        self.received_ts = received_ts
        self.request = request

    @classmethod
    def from_checkpoint(cls, p: PendingRequest) -> _Pending:
        request: dict[str, Any] = msgspec.to_builtins(p.request)
        return cls(p.key, p.line, p.offset, p.received_at, p.received_ts, request)

    def to_checkpoint(self) -> PendingRequest:
        return PendingRequest(
            key=self.key,
            line=self.line,
            offset=self.offset,
            received_at=self.received_at,
            received_ts=self.received_ts,
            request=msgspec.convert(self.request, AuthorizationRequest),
        )


class Iso8583LogReader(_FileReader):
    """The ISO 8583 authorization log (see `paypost.iso.iso8583` for the line format)."""

    def __init__(
        self,
        path: Path,
        config: SourceConfig,
        keys: VaultKeys,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        super().__init__(path, config, keys, checkpoint)
        self._pending: dict[int, _Pending] = {}
        self._by_key: dict[str, list[int]] = {}
        for p in self.checkpoint.pending:
            self._add_pending(_Pending.from_checkpoint(p))
        # Keys of requests that were quarantined, so their response says why it is orphaned.
        self._set_aside: dict[str, int] = {}
        self._timed_out: dict[str, int] = {}

    def _remember(self, where: dict[str, int], key: str, line: int) -> None:
        if len(where) >= 100_000:  # bounded memory: only explains orphaned responses
            where.clear()
        where[key] = line

    def _add_pending(self, p: _Pending) -> None:
        self._pending[p.line] = p
        self._by_key.setdefault(p.key, []).append(p.line)

    def _pending_list(self) -> list[PendingRequest]:
        return [p.to_checkpoint() for p in self._pending.values()]

    def _record_position(self, position: int, line: int | None) -> int:
        return line if line is not None else position

    def _take_pending(self, key: str) -> _Pending | None:
        lines = self._by_key.get(key)
        if not lines:
            return None
        first = lines.pop(0)
        if not lines:
            del self._by_key[key]
        return self._pending.pop(first)

    def _expire(self, batch: IngestBatch, now_ts: float, everything: bool = False) -> None:
        limit = now_ts - self.config.response_timeout_s
        while self._pending:
            first_line = next(iter(self._pending))
            p = self._pending[first_line]
            if not everything and p.received_ts >= limit:
                return
            self._take_line(p)
            batch.counts.timed_out += 1
            self._remember(self._timed_out, p.key, p.line)
            why = (
                "no response before the end of the log"
                if everything
                else f"no 0110 response within {self.config.response_timeout_s:g} s"
            )
            self._quarantine(
                batch,
                position=p.offset,
                line=p.line,
                kind="response-timeout",
                reason=f"0100 request (STAN {p.request['stan']}) timed out: {why}",
                record=msgspec.json.encode(p.request).decode(),
            )

    def _take_line(self, p: _Pending) -> None:
        self._pending.pop(p.line, None)
        lines = self._by_key.get(p.key)
        if lines is not None:
            lines.remove(p.line)
            if not lines:
                del self._by_key[p.key]

    def _at_end(self, batch: IngestBatch, final: bool) -> None:
        if final:
            self._expire(batch, 0.0, everything=True)

    def _malformed_text(self, line_text: str) -> str:
        """A malformed log line for the quarantine: decoded field by field where possible
        (field 2 masked), anything else as printable text; every PAN-like run masked."""
        parts = []
        for token in line_text.split():
            hex_part = token[: len(token) - len(token) % 2]
            try:
                # Only what can be a message (20+ bytes); shorter tokens stay as written.
                raw = bytes.fromhex(hex_part) if len(hex_part) >= 40 else None
            except ValueError:
                raw = None
            if raw is None:
                parts.append(token)
                continue
            fields, rest = iso.decode_partial(raw)
            if "2" in fields:
                fields["2"] = mask_pan(fields["2"])
            rendered = [f"{k}={v!r}" for k, v in fields.items()]
            if rest:
                rendered.append(f"undecoded={printable(rest)!r}")
            parts.append(" ".join(rendered))
        return mask_all(" ".join(parts))

    def _handle(self, batch: IngestBatch, line: int, offset: int, raw: bytes) -> None:
        text = raw.decode("latin-1").strip()
        if not text or text.startswith("#"):
            return
        batch.counts.records += 1
        # Quarantines this line (built only when needed: most lines are fine).
        bad = _LineQuarantine(self, batch, line, offset, text)
        try:
            received_at, message = iso.parse_log_line(text)
            received = iso.parse_utc(received_at)
        except iso.Iso8583FormatError as exc:
            bad(f"not an authorization log line: {exc}")
            return
        received_ts = received.timestamp()
        self._expire(batch, received_ts)
        try:
            doc = iso.decode_message(message)
        except iso.Iso8583FormatError as exc:
            bad(f"ISO 8583 message does not follow paypost's spec: {exc}")
            return
        mti = doc.get("t", "")
        if mti not in (iso.REQUEST_MTI, iso.RESPONSE_MTI):
            bad(f"message type {mti!r} is not 0100 (request) or 0110 (response)")
            return
        required = _REQUEST_REQUIRED if mti == iso.REQUEST_MTI else _RESPONSE_REQUIRED
        if not required.issubset(doc):
            missing = sorted(required.difference(doc), key=int)
            bad(f"{mti} message lacks field(s) {', '.join(missing)}")
            return
        key = f"{doc['11']}|{doc['7']}|{doc['32']}"
        scan = _SCAN_FIELDS.intersection(doc)
        if (
            scan
            and maybe_pan("\x1f".join([doc[f] for f in scan]))
            and (hits := sorted(_pan_fields((f, doc[f]) for f in scan), key=int))
        ):
            if mti == iso.REQUEST_MTI:
                self._remember(self._set_aside, key, line)
            bad(
                f"field(s) {', '.join(hits)} hold a Luhn-valid 13–19 digit number (a card "
                "number outside field 2): message set aside, number masked",
                "pan-in-field",
            )
            return
        if mti == iso.REQUEST_MTI:
            self._request(batch, doc, key, line, offset, received_at, received, received_ts, bad)
        else:
            self._response(batch, doc, key, line, offset, received_at, received, bad)

    def _request(
        self,
        batch: IngestBatch,
        doc: dict[str, str],
        key: str,
        line: int,
        offset: int,
        received_at: str,
        received: datetime,
        received_ts: float,
        bad: _LineQuarantine,
    ) -> None:
        tenant = self.config.tenant
        sealed_before = len(batch.sealed_pans)
        try:
            try:
                card = self.edge.tokenize(doc["2"], tenant, batch.sealed_pans)
            except InvalidPan as exc:
                raise RecordError(f"field 2: {exc}") from None
            name, city, country = iso.parse_field43(doc["43"])
            merchant_id = doc["42"].strip()
            if not name or not merchant_id:
                raise RecordError("fields 42 (merchant id) and 43 (name) must not be blank")
            amount = (int(_digits(doc["4"], "field 4", 1, 12)), _iso_currency(doc["49"]))
            billing = None
            if doc.get("6"):
                billing = (
                    int(_digits(doc["6"], "field 6", 1, 12)),
                    _iso_currency(doc.get("51", "")),
                )
            request = _request_dict(
                stan=_digits(doc["11"], "field 11", 6, 6),
                transmission_time=_transmission_time(doc["7"], received_at, received),
                acquirer_id=_digits(doc["32"], "field 32", 1, 11),
                card=card,
                processing_code=doc.get("3", "000000"),
                amount=amount,
                billing=billing,
                merchant_id=merchant_id,
                merchant_name=name,
                mcc=_digits(doc["18"], "field 18", 4, 4),
                city=city,
                country=country,
                terminal_id=(doc.get("41") or "").strip() or None,
                rrn=(doc.get("37") or "").strip() or None,
                issuing_country=iso.country_alpha2(doc["20"]) if doc.get("20") else None,
            )
        except (RecordError, iso.Iso8583FormatError, ValueError) as exc:
            del batch.sealed_pans[sealed_before:]
            self._remember(self._set_aside, key, line)
            bad(f"0100 request: {exc}")
            return
        self._add_pending(_Pending(key, line, offset, received_at, received_ts, request))

    def _response(
        self,
        batch: IngestBatch,
        doc: dict[str, str],
        key: str,
        line: int,
        offset: int,
        received_at: str,
        received: datetime,
        bad: _LineQuarantine,
    ) -> None:
        pending = self._take_pending(key)
        if pending is None:
            if key in self._set_aside:
                why = f"its request (line {self._set_aside[key]}) was quarantined"
            elif key in self._timed_out:
                why = f"its request (line {self._timed_out[key]}) had already timed out"
            else:
                why = "no pending 0100 request has this STAN + transmission time + acquirer"
            bad(f"0110 response without a request: {why}", "orphan-response")
            return
        if doc.get("2"):
            card = self.edge.tokenizer.tokenize(doc["2"], self.config.tenant)
            if card.token != pending.request["card_token"]:
                self._add_pending(pending)  # the request may still get its real response
                bad(
                    f"0110 response PAN {card.masked} differs from its request's "
                    f"{pending.request['pan_masked']} (line {pending.line})",
                    "pan-mismatch",
                )
                return
        code = doc["39"].strip()
        if code != iso.APPROVED:
            batch.counts.declined += 1
            return
        response = _response_dict(
            code,
            (doc.get("38") or "").strip() or None,
            received_at if _is_canonical_utc(received_at) else iso.format_utc(received),
        )
        request = pending.request
        if request["rrn"] is None and doc.get("37"):
            request = {**request, "rrn": doc["37"].strip() or None}
        batch.counts.approved += 1
        ref = f"{self.config.name}#L{pending.line},L{line}"
        batch.events.append(
            _event_for(self.config, self.config.tenant, line, request, response, ref)
        )


class _LineQuarantine:
    """Sets one log line aside (`bad(reason, kind)`), its text rendered only when called."""

    __slots__ = ("batch", "line", "offset", "reader", "text")

    def __init__(
        self, reader: Iso8583LogReader, batch: IngestBatch, line: int, offset: int, text: str
    ) -> None:
        self.reader = reader
        self.batch = batch
        self.line = line
        self.offset = offset
        self.text = text

    def __call__(self, reason: str, kind: QuarantineKind = "malformed") -> None:
        reader = self.reader
        reader._quarantine(
            self.batch,
            position=self.offset,
            line=self.line,
            kind=kind,
            reason=reason,
            record=reader._malformed_text(self.text),
        )


def _transmission_time(field7: str, received_at: str, received: datetime) -> str:
    """Field 7 as RFC 3339 UTC text; the year comes from the log time (see
    `iso.transmission_datetime`). Fast path: same year and month as a canonical log time."""
    if (
        len(field7) == 10
        and field7.isdigit()
        and received_at[5:7] == field7[0:2]
        and _is_canonical_utc(received_at)
    ):
        day, hh, mi, ss = field7[2:4], field7[4:6], field7[6:8], field7[8:10]
        if "01" <= day <= "31" and hh <= "23" and mi <= "59" and ss <= "59":
            text = f"{received_at[0:8]}{day}T{hh}:{mi}:{ss}Z"
            try:
                sent = datetime.fromisoformat(text[:-1] + "+00:00")
            except ValueError:
                pass  # e.g. 31 of a 30-day month: the slow path explains
            else:
                if abs((sent - received).total_seconds()) <= 2 * 86400:
                    return text
    return iso.format_utc(iso.transmission_datetime(field7, received))


def _iso_currency(numeric: str) -> str:
    try:
        return iso.currency_alpha(numeric)
    except iso.Iso8583FormatError as exc:
        raise RecordError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# The authorizations table, read as a change feed

TABLE_SCHEMA = """
CREATE TABLE IF NOT EXISTS ingest_authorizations (
    id                   INTEGER PRIMARY KEY,
    tenant               TEXT,
    pan                  TEXT NOT NULL,
    stan                 TEXT NOT NULL,
    transmission_time    TEXT NOT NULL,
    acquirer_id          TEXT NOT NULL,
    processing_code      TEXT NOT NULL DEFAULT '000000',
    amount_minor         INTEGER NOT NULL,
    currency             TEXT NOT NULL,
    billing_amount_minor INTEGER,
    billing_currency     TEXT,
    merchant_id          TEXT NOT NULL,
    merchant_name        TEXT NOT NULL,
    mcc                  TEXT NOT NULL,
    merchant_city        TEXT,
    merchant_country     TEXT,
    terminal_id          TEXT,
    rrn                  TEXT,
    issuing_country      TEXT,
    response_code        TEXT NOT NULL,
    approval_code        TEXT,
    responded_at         TEXT
);
"""

_TABLE_COLUMNS = ("id", *RECORD_FIELDS)


class TableFeedReader(_ReaderBase):
    """`ingest_authorizations` as a change feed: rows with id > checkpoint, in id order.

    Rows must be inserted in id order by committed transactions (an INTEGER PRIMARY KEY that
    the inserting system lets SQLite assign). With `scrub_table_pans` (default) the unit of
    work that commits a batch overwrites each read PAN with its masked form (secure_delete on),
    so the clear PAN does not stay in the database past ingress.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        config: SourceConfig,
        keys: VaultKeys,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        self.conn = conn
        self.config = config
        self.edge = EdgeTokenizer(keys)
        self.checkpoint = checkpoint or Checkpoint(source=config.name)

    def batches(self, final: bool = False) -> Iterator[IngestBatch]:
        per_batch = self.config.records_per_batch()
        cols = ", ".join(_TABLE_COLUMNS)
        while True:
            rows = self.conn.execute(
                f"SELECT {cols} FROM ingest_authorizations WHERE id > ? ORDER BY id LIMIT ?",
                (self.checkpoint.position, per_batch),
            ).fetchall()
            if not rows:
                return
            batch = IngestBatch(source=self.config.name, tenant=self.config.tenant)
            for row in rows:
                data = {
                    k: v for k, v in zip(_TABLE_COLUMNS[1:], row[1:], strict=True) if v is not None
                }
                batch.counts.records += 1
                try:
                    rec = msgspec.convert(data, AuthorizationRecord, strict=False)
                except msgspec.ValidationError as exc:
                    self._quarantine(
                        batch,
                        position=row[0],
                        line=None,
                        kind="malformed",
                        reason=f"not a valid authorization record: {exc}",
                        record=_masked_record_text(data),
                    )
                    continue
                _ingest_record(self, batch, rec, int(row[0]), None, functools.partial(dict, data))
            last = int(rows[-1][0])
            if self.config.scrub_table_pans:
                batch.scrub_rows = (self.checkpoint.position, last)
            counters = Counters(**msgspec.structs.asdict(self.checkpoint.counters))
            counters.add(batch.counts)
            self.checkpoint = Checkpoint(
                source=self.config.name, position=last, line=0, counters=counters
            )
            batch.checkpoint = self.checkpoint
            _log_batch(self.config, batch, last, row=last)
            yield batch


IngestReader = Iso8583LogReader | JsonLinesReader | CsvReader | TableFeedReader


def open_reader(
    config: SourceConfig,
    keys: VaultKeys,
    *,
    path: Path | None = None,
    conn: sqlite3.Connection | None = None,
    checkpoint: Checkpoint | None = None,
) -> IngestReader:
    """The reader for CONFIG.format at CHECKPOINT (a file PATH, or CONN for the table feed)."""
    if config.format == "table":
        if conn is None:
            raise UserError("the table feed needs a database connection")
        return TableFeedReader(conn, config, keys, checkpoint)
    if path is None:
        raise UserError(f"source {config.name!r}: format {config.format} needs a file path")
    cls: type[_FileReader] = {
        "iso8583": Iso8583LogReader,
        "jsonl": JsonLinesReader,
        "csv": CsvReader,
    }[config.format]
    return cls(path, config, keys, checkpoint)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Storage port: checkpoints, quarantine, vault rows (SQLite + in-memory fake)

INGEST_SCHEMA = """
CREATE TABLE IF NOT EXISTS ingest_checkpoints (
    source     TEXT PRIMARY KEY,
    position   INTEGER NOT NULL,
    line       INTEGER NOT NULL,
    state      BLOB NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ingest_quarantine (
    id             INTEGER PRIMARY KEY,
    source         TEXT NOT NULL,
    tenant         TEXT NOT NULL,
    position       INTEGER NOT NULL,
    line           INTEGER,
    kind           TEXT NOT NULL,
    reason         TEXT NOT NULL,
    record         TEXT NOT NULL,
    quarantined_at TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS ingest_quarantine_where
    ON ingest_quarantine (source, position, kind);
"""


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the ingest tables (and the vault's) if missing."""
    # Statement by statement: executescript would COMMIT the caller's unit of work.
    for stmt in (INGEST_SCHEMA + TABLE_SCHEMA).split(";"):
        if stmt.strip():
            conn.execute(stmt)
    ensure_vault_schema(conn)


class IngestStore(Protocol):
    """Where a batch's side effects go (in the caller's unit of work)."""

    def load_checkpoint(self, source: str) -> Checkpoint | None: ...

    def apply(self, batch: IngestBatch) -> None: ...


_CHECKPOINT_DECODER = msgspec.json.Decoder(Checkpoint)


class SqliteIngestStore:
    """Checkpoints, quarantine and vault rows on a connection; never commits."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def load_checkpoint(self, source: str) -> Checkpoint | None:
        row = self.conn.execute(
            "SELECT state FROM ingest_checkpoints WHERE source = ?", (source,)
        ).fetchone()
        return None if row is None else _CHECKPOINT_DECODER.decode(row[0])

    def apply(self, batch: IngestBatch) -> None:
        if batch.checkpoint is None:
            raise ValueError("an IngestBatch without checkpoint cannot be applied")
        assert_no_clear_pan(batch)
        conn = self.conn
        if batch.sealed_pans:
            conn.executemany(
                "INSERT OR IGNORE INTO vault_pans (token, tenant, key_id, nonce, ciphertext) "
                "VALUES (?, ?, ?, ?, ?)",
                [(e.token, e.tenant, e.key_id, e.nonce, e.ciphertext) for e in batch.sealed_pans],
            )
        if batch.quarantined:
            now = utc_now()
            conn.executemany(
                "INSERT OR IGNORE INTO ingest_quarantine (source, tenant, position, line, kind, "
                "reason, record, quarantined_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (q.source, q.tenant, q.position, q.line, q.kind, q.reason, q.record, now)
                    for q in batch.quarantined
                ],
            )
        if batch.scrub_rows is not None:
            conn.execute("PRAGMA secure_delete=ON")
            after, upto = batch.scrub_rows
            rows = conn.execute(
                "SELECT id, pan FROM ingest_authorizations WHERE id > ? AND id <= ?", (after, upto)
            ).fetchall()
            conn.executemany(
                "UPDATE ingest_authorizations SET pan = ? WHERE id = ?",
                [(mask_pan(str(pan)), rid) for rid, pan in rows],
            )
        cp = batch.checkpoint
        conn.execute(
            "INSERT INTO ingest_checkpoints (source, position, line, state, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (source) DO UPDATE SET "
            "position = excluded.position, line = excluded.line, state = excluded.state, "
            "updated_at = excluded.updated_at",
            (cp.source, cp.position, cp.line, msgspec.json.encode(cp), utc_now()),
        )


class MemoryIngestStore:
    """In-memory fake of the ingest store (unit tests)."""

    def __init__(self) -> None:
        self.checkpoints: dict[str, Checkpoint] = {}
        self.quarantine: list[QuarantineRecord] = []
        self.vault: dict[str, SealedPan] = {}

    def load_checkpoint(self, source: str) -> Checkpoint | None:
        return self.checkpoints.get(source)

    def apply(self, batch: IngestBatch) -> None:
        assert batch.checkpoint is not None
        assert_no_clear_pan(batch)
        for e in batch.sealed_pans:
            self.vault.setdefault(e.token, e)
        seen = {(q.source, q.position, q.kind) for q in self.quarantine}
        self.quarantine.extend(
            q for q in batch.quarantined if (q.source, q.position, q.kind) not in seen
        )
        self.checkpoints[batch.source] = batch.checkpoint


def assert_no_clear_pan(batch: IngestBatch) -> None:
    """Invariant 4 (DESIGN §3.4), asserted in production: nothing leaving ingest holds a PAN.

    Checks the tokenized fields the adapters fill and the quarantined text (cheap: a regex
    pre-filter rejects almost every string at once).
    """
    for e in batch.events:
        req = e.detail["request"]
        merchant = req["merchant"]
        values = (
            req["card_token"],
            req["pan_masked"],
            merchant["name"],
            merchant["id"],
            merchant.get("city") or "",
            req.get("terminal_id") or "",
            req.get("rrn") or "",
        )
        if maybe_pan("\x1f".join(values)) and any(find_pans(v) for v in values):
            raise AssertionError(f"clear PAN in event {e.id} (invariant 4)")
    for q in batch.quarantined:
        if find_pans(q.record) or find_pans(q.reason):
            raise AssertionError(f"clear PAN in quarantine record {q.source}@{q.position}")


# --------------------------------------------------------------------------------------------
# Running a reader in units of work


class PublishingUnitOfWork(Protocol):
    """What ingest needs from the bus's unit of work: its connection and publish."""

    conn: Any

    def publish(self, events: Iterable[Event]) -> Any: ...


@dataclass
class IngestReport:
    source: str
    batches: int = 0
    events: int = 0
    counters: Counters = field(default_factory=Counters)
    checkpoint: Checkpoint | None = None


def run_ingest(
    reader: IngestReader,
    unit_of_work: Callable[[], AbstractContextManager[PublishingUnitOfWork]],
    *,
    final: bool = False,
    on_batch: Callable[[IngestBatch], None] | None = None,
) -> IngestReport:
    """Drive READER to the end: each batch's events + vault rows + quarantine + checkpoint in
    ONE unit of work (the bus's, so the publish commits with the checkpoint)."""
    report = IngestReport(source=reader.config.name)
    for batch in reader.batches(final=final):
        try:
            # Every line logged while the batch commits carries its tenant and source.
            with log_context(tenant=batch.tenant, source=batch.source), unit_of_work() as uow:
                uow.publish(batch.events)
                SqliteIngestStore(uow.conn).apply(batch)
        except BaseException:
            # The commit did not happen: the reader's in-memory state is ahead of the store.
            reader.edge.forget(e.token for e in batch.sealed_pans)
            raise
        report.batches += 1
        report.events += len(batch.events)
        report.counters.add(batch.counts)
        report.checkpoint = batch.checkpoint
        if on_batch is not None:
            on_batch(batch)
    if isinstance(reader, TableFeedReader) and report.batches and reader.config.scrub_table_pans:
        # The landing rows were written in clear by another system; the scrubbed pages are in
        # the database now, but older WAL frames still hold the clear rows until the WAL is
        # checkpointed and truncated (best effort: a reader still open keeps it busy).
        reader.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return report


def follow_ingest(
    reader: IngestReader,
    unit_of_work: Callable[[], AbstractContextManager[PublishingUnitOfWork]],
    *,
    should_stop: Callable[[], bool],
    poll_s: float = 0.5,
    on_batch: Callable[[IngestBatch], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> IngestReport:
    """Tail a live source (a log still being written, the table feed) until SHOULD_STOP().

    Ingests whatever is there (batches of the source's mode: FR11 realtime commits every
    record, near-realtime micro-batches), then waits POLL_S when nothing new came, and again.
    A last line without newline waits for its end; ISO 8583 requests wait for their response
    (reported after the timeout, by log time). Stop between batches: nothing half-done.
    """
    total = IngestReport(source=reader.config.name, checkpoint=reader.checkpoint)
    while not should_stop():
        report = run_ingest(reader, unit_of_work, final=False, on_batch=on_batch)
        total.batches += report.batches
        total.events += report.events
        total.counters.add(report.counters)
        if report.checkpoint is not None:
            total.checkpoint = report.checkpoint
        if report.batches == 0:
            sleep(poll_s)
    return total


# --------------------------------------------------------------------------------------------
# Quarantine queries (CLI)


class QuarantineEntry(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    source: str
    tenant: str
    position: int
    line: int | None
    kind: str
    reason: str
    record: str
    quarantined_at: str


def list_quarantine(
    conn: sqlite3.Connection,
    *,
    source: str | None = None,
    kind: str | None = None,
    limit: int = 100,
) -> list[QuarantineEntry]:
    sql = (
        "SELECT id, source, tenant, position, line, kind, reason, record, quarantined_at "
        "FROM ingest_quarantine WHERE (? IS NULL OR source = ?) AND (? IS NULL OR kind = ?) "
        "ORDER BY id LIMIT ?"
    )
    rows = conn.execute(sql, (source, source, kind, kind, limit)).fetchall()
    return [_entry(r) for r in rows]


def get_quarantine(conn: sqlite3.Connection, entry_id: int) -> QuarantineEntry | None:
    row = conn.execute(
        "SELECT id, source, tenant, position, line, kind, reason, record, quarantined_at "
        "FROM ingest_quarantine WHERE id = ?",
        (entry_id,),
    ).fetchone()
    return None if row is None else _entry(row)


def _entry(r: tuple[Any, ...]) -> QuarantineEntry:
    return QuarantineEntry(
        id=r[0],
        source=r[1],
        tenant=r[2],
        position=r[3],
        line=r[4],
        kind=r[5],
        reason=r[6],
        record=r[7],
        quarantined_at=r[8],
    )


__all__ = [
    "AuthorizationRecord",
    "Checkpoint",
    "Counters",
    "CsvReader",
    "IngestBatch",
    "IngestReport",
    "IngestSourceError",
    "IngestStore",
    "Iso8583LogReader",
    "JsonLinesReader",
    "MemoryIngestStore",
    "QuarantineRecord",
    "SourceConfig",
    "SqliteIngestStore",
    "TableFeedReader",
    "ensure_schema",
    "follow_ingest",
    "open_reader",
    "run_ingest",
]
