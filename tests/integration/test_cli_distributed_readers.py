"""`paypost parked|quarantine --backend distributed list|show`: the records a distributed run
parked or quarantined, read from PostgreSQL, shown as the embedded backend shows them
(`paypost review --backend distributed`: test_review_distributed.py)."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
from typer.testing import CliRunner

import paypost.cli
from paypost.cli import app
from paypost.config import UserError
from paypost.security.tokens import VaultKeys, find_pans

paypost.cli._register()
runner = CliRunner()

KEY = bytes(range(32))
SMUGGLED = "378282246310005"  # a Luhn-valid card number in a field that must not hold one
MASKED = re.compile(r"^\d{6}\*+\d{4}$")
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _cli(env: dict[str, str], *args: str) -> Any:
    result = runner.invoke(app, list(args), env=env)
    assert not find_pans(result.output), result.output  # never a card number on screen
    return result


def _odd_source(path: Path, pan: str, tenant: str) -> Path:
    """A JSON Lines log of two records ingest quarantines: a malformed line holding a card
    number, and an authorization with a card number in its terminal id."""
    good = {
        "tenant": tenant,
        "pan": pan,
        "stan": "990001",
        "transmission_time": "2026-11-21T10:00:00Z",
        "acquirer_id": "ACQ1",
        "processing_code": "000000",
        "amount_minor": 1250,
        "currency": "GBP",
        "merchant_id": "M-1",
        "merchant_name": "Corner Shop",
        "mcc": "5411",
        "merchant_country": "826",
        "terminal_id": f"T{SMUGGLED}",
        "response_code": "00",
        "approval_code": "A1B2C3",
    }
    path.write_text('{"pan": "' + pan + '", broken\n' + json.dumps(good) + "\n")
    return path


def test_parked_and_quarantined_records_of_a_distributed_run(
    nats_url: str, postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    from paypost.demo import demo_inputs
    from paypost.distributed.runtime import DistributedJob, DistributedSettings, destroy
    from paypost.stages.ingest import SourceConfig

    settings = DistributedSettings(bus_url=nats_url, db_url=postgres_url, prefix=pg_schema)
    env = {"PAYPOST_DB_URL": postgres_url, "PAYPOST_PREFIX": pg_schema}
    with demo_inputs(600, KEY, seed=3, mode="near-realtime") as inputs:
        job = DistributedJob.with_default_rules(settings, inputs.generated.refdata, KEY, fused=True)
        card = inputs.generated.cards[0]
        odd = _odd_source(tmp_path / "odd.jsonl", card.pan, card.tenant)
        sources = [(s.config, s.path) for s in inputs.sources]
        sources.append((SourceConfig(name="odd.jsonl", tenant=card.tenant, format="jsonl"), odd))
        try:
            rep = job.run(sources, timeout_s=120)
            assert rep.complete, rep
            assert rep.parked_duplicates > 0 and rep.quarantined == 2
            cards = {c.pan for c in inputs.generated.cards} | {SMUGGLED}

            # -- parked: list (JSON and table), show by id prefix, unknown id -----------------
            listed = _cli(env, "parked", "--backend", "distributed", "list", "--json")
            assert listed.exit_code == 0, listed.output
            doc = json.loads(listed.stdout)
            assert doc["totals"] == {"duplicate": rep.parked_duplicates}
            assert len(doc["parked"]) == rep.parked_duplicates
            first = doc["parked"][0]
            assert first["reason"] == "duplicate" and first["original_event_id"]
            assert all(MASKED.match(p["pan_masked"]) for p in doc["parked"])
            table = _cli(env, "parked", "--backend", "distributed", "list")
            assert table.exit_code == 0, table.output
            assert first["event_id"][:8] in table.stdout and first["pan_masked"] in table.stdout
            assert f"duplicate {rep.parked_duplicates}" in table.stdout

            shown = _cli(env, "parked", "--backend", "distributed", "show", first["event_id"][:10])
            assert shown.exit_code == 0, shown.output
            assert first["event_id"] in shown.stdout and first["business_key"] in shown.stdout
            full = json.loads(
                _cli(
                    env, "parked", "--backend", "distributed", "show", first["input_event_id"],
                    "--json",
                ).stdout
            )  # fmt: skip
            assert full["event_id"] == first["event_id"]
            assert full["event"]["detail"]["request"]["pan_masked"] == first["pan_masked"]

            missing = _cli(env, "parked", "--backend", "distributed", "show", "no-such-id")
            assert isinstance(missing.exception, UserError)
            assert "paypost parked --backend distributed list" in str(missing.exception)

            # -- quarantine: list, show, unknown id --------------------------------------------
            q = _cli(env, "quarantine", "--backend", "distributed", "list", "--json")
            assert q.exit_code == 0, q.output
            entries = json.loads(q.stdout)
            assert [(e["source"], e["line"], e["kind"]) for e in entries] == [
                ("odd.jsonl", 1, "malformed"),
                ("odd.jsonl", 2, "pan-in-field"),
            ]
            malformed, smuggled = entries
            assert malformed["position"] == 0 and "JSON is malformed" in malformed["reason"]
            assert malformed["record"].startswith('{"pan": "') and card.pan not in q.stdout
            assert smuggled["position"] == odd.read_text().index("\n") + 1  # its byte offset
            assert "terminal_id" in smuggled["reason"] and RFC3339_MS.match(
                smuggled["quarantined_at"]
            )
            one = _cli(env, "quarantine", "--backend", "distributed", "show", str(smuggled["id"]))
            assert one.exit_code == 0, one.output
            assert f"line 2 (byte {smuggled['position']})" in one.stdout
            assert "reason:  field(s) terminal_id hold" in one.stdout
            assert '"terminal_id":"T378282*****0005"' in one.stdout  # masked, where it was
            rows = _cli(env, "quarantine", "--backend", "distributed", "list")
            assert "pan-in-field" in rows.stdout and "malformed" in rows.stdout
            for out in (listed, table, shown, q, one, rows):
                assert not any(pan in out.output for pan in cards)

            gone = _cli(env, "quarantine", "--backend", "distributed", "show", "999999")
            assert isinstance(gone.exception, UserError)
            assert "paypost quarantine --backend distributed list" in str(gone.exception)
        finally:
            job.close()
            destroy(settings)


def test_both_backends_print_the_same_records(
    postgres_url: str, pg_schema: str, tmp_path: Path
) -> None:
    """The same ingest batch and dedup effects stored embedded (SQLite) and distributed
    (PostgreSQL): `list` and `show` print the same JSON (quarantined_at: the time of the
    write, in the same format)."""
    from paypost.distributed import state
    from paypost.iso.generate import card_numbers, generate_authorizations, jsonl_lines
    from paypost.stages import ingest
    from paypost.stages.dedup import SqliteDedupIndex, check_duplicates

    pan = card_numbers(1, seed=8)[0]
    auths = list(generate_authorizations({"uk-bank": [pan]}, 6, seed=8, duplicate_rate=0.0))
    lines = list(jsonl_lines(auths))
    log = tmp_path / "auths.jsonl"
    log.write_text("\n".join([*lines, lines[1], lines[3]]) + "\n")  # two re-logged copies
    bad = _odd_source(tmp_path / "odd.jsonl", pan, "uk-bank")
    keys = VaultKeys.from_master(KEY)
    batches = []
    for name, path in (("auths.jsonl", log), ("odd.jsonl", bad)):
        config = ingest.SourceConfig(name=name, tenant="uk-bank", format="jsonl")
        batches += list(ingest.open_reader(config, keys, path=path).batches(final=True))
    events = [e for b in batches for e in b.events]

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    lite = sqlite3.connect(data_dir / "paypost.db")
    with lite:
        ingest.ensure_schema(lite)
        for b in batches:
            ingest.SqliteIngestStore(lite).apply(b)
        index = SqliteDedupIndex(lite)
        index.apply(check_duplicates(events, index).effects)
    lite.close()
    schema = state.state_schema(pg_schema)
    with psycopg.connect(postgres_url) as pg:
        state.ensure_schema(pg, schema)
        for b in batches:
            state.PostgresIngestStore(pg, schema).apply(b)
        pg_index = state.PostgresDedupIndex(pg, schema)
        pg_index.apply(check_duplicates(events, pg_index).effects)

    env = {"PAYPOST_DB_URL": postgres_url, "PAYPOST_PREFIX": pg_schema}

    def both(group: str, *args: str) -> tuple[Any, Any]:
        embedded = _cli({}, group, *args, "--json", "--data-dir", str(data_dir))
        distributed = _cli(env, group, "--backend", "distributed", *args, "--json")
        assert embedded.exit_code == 0, embedded.output
        assert distributed.exit_code == 0, distributed.output
        return json.loads(embedded.stdout), json.loads(distributed.stdout)

    embedded, distributed = both("parked", "list")
    assert embedded == distributed and embedded["totals"] == {"duplicate": 2}
    parked_id = embedded["parked"][1]["event_id"]
    embedded, distributed = both("parked", "show", parked_id[:12])
    assert embedded == distributed and embedded["event_id"] == parked_id

    embedded, distributed = both("quarantine", "list")
    assert len(embedded) == 2
    for e, d in zip(embedded, distributed, strict=True):
        assert RFC3339_MS.match(e.pop("quarantined_at")) and RFC3339_MS.match(
            d.pop("quarantined_at")
        )
        assert e == d
    embedded, distributed = both("quarantine", "show", str(embedded[1]["id"]))
    embedded.pop("quarantined_at")
    distributed.pop("quarantined_at")
    assert embedded == distributed and embedded["kind"] == "pan-in-field"


def test_an_unknown_prefix_names_the_setting_to_fix(postgres_url: str, pg_schema: str) -> None:
    env = {"PAYPOST_DB_URL": postgres_url, "PAYPOST_PREFIX": pg_schema}
    for group in ("parked", "quarantine", "review"):
        result = _cli(env, group, "--backend", "distributed", "list")
        assert isinstance(result.exception, UserError)
        message = str(result.exception)
        assert repr(pg_schema) in message and "PAYPOST_PREFIX" in message
