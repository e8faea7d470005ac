"""NFR6 leak test and FR1 crash-resume through the real embedded bus (SQLite unit of work).

Ingest inputs full of real-looking (Luhn-valid) card numbers — including numbers smuggled into
merchant names, merchant ids and terminal ids, and malformed lines holding them — with logging
on at debug level, then scan every byte paypost wrote (the SQLite file, its WAL and SHM, the
key file, the log file) and every log line for each card number of the input: zero hits.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import msgspec
import pytest

from paypost.bus.core import Rule, TargetConfig
from paypost.bus.sqlite import SqliteBus
from paypost.events import AuthorizationApproved, detail_of
from paypost.iso.generate import (
    GeneratedAuthorization,
    card_numbers,
    csv_lines,
    generate_authorizations,
    iso8583_log_lines,
    iso8583_request,
    jsonl_lines,
    record_of,
)
from paypost.logs import configure_logging
from paypost.security.tokens import Vault, VaultKeys, find_pans, load_or_create_demo_key
from paypost.stages.ingest import (
    SourceConfig,
    SqliteIngestStore,
    TableFeedReader,
    ensure_schema,
    list_quarantine,
    open_reader,
    run_ingest,
)

SMUGGLED = ["378282246310005", "6011111111111117", "5105105105105100"]


def _bus(data_dir: Path) -> SqliteBus:
    bus = SqliteBus.open(data_dir)
    bus.put_target(TargetConfig(name="dedup"))
    bus.put_rule(
        Rule(name="all-auths", pattern={"detail-type": ["AuthorizationApproved"]}, target="dedup")
    )
    with bus.unit_of_work() as uow:
        ensure_schema(uow.conn)
    return bus


def _inputs(tmp: Path, cards: list[str]) -> dict[str, Path]:
    auths = list(generate_authorizations({"bank-a": cards}, 400, seed=11, unanswered_rate=0.01))
    # Smuggle card numbers into other fields of a few authorizations.
    bad: list[GeneratedAuthorization] = [
        dataclasses.replace(auths[0], merchant_name=f"SHOP {SMUGGLED[0]}", stan="999001"),
        dataclasses.replace(auths[1], merchant_id=SMUGGLED[0], stan="999002"),
        dataclasses.replace(auths[2], merchant_name="6011-1111-1111-1117", stan="999003"),
    ]
    iso_lines = list(iso8583_log_lines(auths + bad))
    iso_lines.insert(5, f"garbage {cards[0]} and {cards[1][:8]}-{cards[1][8:]}")
    iso_lines.insert(9, "2026-11-21T09:00:01Z " + iso8583_request(auths[3]).hex()[:-30])
    jl = list(jsonl_lines(auths[:150]))
    jl.append(json.dumps({**record_of(auths[4]), "terminal_id": f"T{SMUGGLED[2]}"}))
    jl.append(json.dumps({**record_of(auths[5]), "amount_minor": "12.00"}))
    jl.append('{"pan": "' + cards[2] + '", broken')
    cv = list(csv_lines(auths[150:300]))
    cv.append(
        list(csv_lines([dataclasses.replace(auths[160], merchant_name=f"X {SMUGGLED[1]}")]))[1]
    )
    cv.append(cv[2].replace(",00,", ",XX,,").replace(",05,", ",XX,,"))
    out = {}
    for name, lines in (("auth.log", iso_lines), ("auths.jsonl", jl), ("auths.csv", cv)):
        p = tmp / name
        p.write_text("\n".join(lines) + "\n")
        out[name] = p
    return out


def test_NFR6_leak_no_card_number_in_any_file_or_log_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    log_buf = io.StringIO()
    configure_logging("debug", json=True, stream=log_buf)
    master, msg = load_or_create_demo_key(data_dir, {})
    assert msg is not None
    keys = VaultKeys.from_master(master)
    cards = card_numbers(40, seed=5)
    inputs = _inputs(tmp_path, cards)
    secrets = set(cards) | set(SMUGGLED)

    bus = _bus(data_dir)
    events = []
    for name, fmt in (("auth.log", "iso8583"), ("auths.jsonl", "jsonl"), ("auths.csv", "csv")):
        source = SourceConfig(name=name, tenant="bank-a", format=fmt, batch_size=64)  # type: ignore[arg-type]
        reader = open_reader(source, keys, path=inputs[name])
        report = run_ingest(
            reader, bus.unit_of_work, final=True, on_batch=lambda b: events.extend(b.events)
        )
        assert report.events > 0
    # The table feed too: rows inserted in clear by "another system", scrubbed once read.
    with bus.unit_of_work() as uow:
        recs = [record_of(a) for a in generate_authorizations({"bank-a": cards}, 50, seed=12)]
        cols = list(recs[0])
        uow.conn.executemany(
            f"INSERT INTO ingest_authorizations ({', '.join(cols)}) VALUES "
            f"({', '.join('?' for _ in cols)})",
            [[r.get(c) for c in cols] for r in recs],
        )
    table = SourceConfig(name="auth-table", tenant="bank-a", format="table", batch_size=20)
    run_ingest(
        TableFeedReader(bus.conn, table, keys),
        bus.unit_of_work,
        on_batch=lambda b: events.extend(b.events),
    )

    quarantine = list_quarantine(bus.conn, limit=10_000)
    kinds = {q.kind for q in quarantine}
    assert {"pan-in-field", "malformed", "response-timeout"} <= kinds
    assert sum(q.kind == "pan-in-field" for q in quarantine) == 5
    # The vault can still give the PAN back, for an authorized purpose.
    token = detail_of(events[0], AuthorizationApproved).request.card_token
    vault = Vault(bus.conn, keys)
    assert vault.detokenize(token, "bank-a", purpose="leak-test round trip") in cards
    (data_dir / "paypost.log").write_text(log_buf.getvalue())

    def scan() -> tuple[set[str], list[tuple[str, str]]]:
        hits = []
        files = [p for p in data_dir.rglob("*") if p.is_file()]
        for p in files:
            blob = p.read_bytes()
            for s in secrets:
                for form in (
                    s.encode(),
                    s.encode().hex().encode(),
                    s.encode().hex().upper().encode(),
                ):
                    if form in blob:
                        hits.append((p.name, s[:6]))
        return {p.name for p in files}, hits

    names, hits = scan()  # while open: the WAL holds the recent pages
    assert {"paypost.db", "paypost.db-wal", "vault.key", "paypost.log"} <= names
    assert (data_dir / "paypost.db-wal").stat().st_size > 0
    assert hits == []
    bus.close()
    names, hits = scan()  # after the final checkpoint
    assert hits == []
    lines = log_buf.getvalue().splitlines()
    assert len(lines) > 20
    for line in lines:
        rec = json.loads(line)
        assert not find_pans(line), line
        assert "tenant" in rec or rec.get("event") == "vault.detokenize"
        if rec["event"] == "ingest.quarantined":
            assert rec["correlation-id"] and rec["tenant"] == "bank-a"
    for e in events:
        text = msgspec.json.encode(e).decode()
        assert not find_pans(msgspec.json.encode(e.detail).decode())
        assert not any(secret in text for secret in secrets)


def test_FR1_crash_mid_file_resumes_without_re_emitting(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    keys = VaultKeys.from_master(b"\x07" * 32)
    auths = list(generate_authorizations({"bank-a": card_numbers(10)}, 500, seed=4))
    log = tmp_path / "auth.log"
    log.write_text("\n".join(iso8583_log_lines(auths)) + "\n")
    source = SourceConfig(name="switch", tenant="bank-a", format="iso8583", batch_size=50)

    bus = _bus(data_dir)
    committed = 0

    class Boom(Exception):
        pass

    reader = open_reader(source, keys, path=log)
    for n, batch in enumerate(reader.batches(final=True)):
        if n == 3:
            with pytest.raises(Boom), bus.unit_of_work() as uow:
                uow.publish(batch.events)
                SqliteIngestStore(uow.conn).apply(batch)
                raise Boom  # the crash: nothing of batch 4 commits
            break
        with bus.unit_of_work() as uow:
            uow.publish(batch.events)
            SqliteIngestStore(uow.conn).apply(batch)
        committed += len(batch.events)
    bus.close()

    bus = _bus(data_dir)
    store = SqliteIngestStore(bus.conn)
    reader = open_reader(source, keys, path=log, checkpoint=store.load_checkpoint("switch"))
    report = run_ingest(reader, bus.unit_of_work, final=True)
    archived = bus.conn.execute("SELECT count(*) FROM bus_archive").fetchone()[0]
    approved = sum(a.response_code == "00" for a in auths)
    assert committed > 0 and report.events == approved - committed  # nothing re-emitted
    assert archived == approved  # every approved authorization published exactly once
    cp = store.load_checkpoint("switch")
    assert cp is not None and cp.counters.approved == approved and cp.pending == []
    bus.close()


def test_FR11_follow_a_log_while_it_is_written_realtime(tmp_path: Path) -> None:
    from paypost.stages.ingest import follow_ingest

    keys = VaultKeys.from_master(b"\x09" * 32)
    auths = list(generate_authorizations({"bank-a": card_numbers(5)}, 40, seed=6))
    lines = [line + "\n" for line in iso8583_log_lines(auths)]
    log = tmp_path / "live.log"
    log.write_text("".join(lines[:30]) + lines[30][:25])  # the writer is mid-line
    bus = _bus(tmp_path / "data")
    source = SourceConfig(name="live", tenant="bank-a", format="iso8583", mode="realtime")
    reader = open_reader(source, keys, path=log)
    polls = 0

    def stop() -> bool:
        nonlocal polls
        polls += 1
        if polls == 3:  # the writer finishes its line and writes the rest
            with log.open("a") as fh:
                fh.write(lines[30][25:] + "".join(lines[31:]))
        return polls > 5

    report = follow_ingest(
        reader, bus.unit_of_work, should_stop=stop, poll_s=0, sleep=lambda _: None
    )
    approved = sum(a.response_code == "00" for a in auths)
    assert report.events == approved
    assert report.batches == len(lines)  # realtime: one record per transaction
    assert bus.conn.execute("SELECT count(*) FROM bus_archive").fetchone()[0] == approved
    cp = SqliteIngestStore(bus.conn).load_checkpoint("live")
    assert cp is not None and cp.line == len(lines) and cp.pending == []
    bus.close()
