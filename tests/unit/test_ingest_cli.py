"""FR1, NFR6 from the command line: generate, ingest, quarantine list|show."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import paypost.cli
from paypost.cli import app
from paypost.config import UserError

if not any(g.name == "quarantine" for g in app.registered_groups):
    paypost.cli._register()
runner = CliRunner()


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    if isinstance(result.exception, UserError):
        return 2, str(result.exception)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout


def test_generate_ingest_resume_and_quarantine(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PAYPOST_VAULT_KEY", raising=False)
    monkeypatch.delenv("PAYPOST_VAULT_KEY_FILE", raising=False)
    log = tmp_path / "auth.log"
    code, out = run(
        "generate",
        "auth-log",
        "--count",
        "300",
        "--out",
        str(log),
        "--seed",
        "9",
        "--unanswered-rate",
        "0.02",
        "--json",
    )
    assert code == 0, out
    gen = json.loads(out)
    assert gen["authorizations"] == 300 and log.is_file()
    with log.open("a") as fh:
        fh.write("not a message 4111-1111-1111-1111\n")

    code, out = run("ingest", str(log), "--data-dir", str(data_dir), "--json")
    assert code == 0, out
    first = json.loads(out.splitlines()[-1])
    assert first["events"] > 250 and first["this_run"]["quarantined"] >= 1
    assert first["this_run"]["timed_out"] >= 1
    assert (data_dir / "vault.key").is_file()

    # Running it again resumes at the checkpoint: nothing new, nothing emitted twice.
    code, out = run("ingest", str(log), "--data-dir", str(data_dir), "--json")
    again = json.loads(out.splitlines()[-1])
    assert again["events"] == 0 and again["totals"] == first["totals"]

    code, out = run("quarantine", "list", "--data-dir", str(data_dir), "--json")
    entries = json.loads(out)
    kinds = {e["kind"] for e in entries}
    assert {"malformed", "response-timeout"} <= kinds
    junk = next(e for e in entries if e["kind"] == "malformed")
    assert "4111-1111-1111-1111" not in out and "411111******1111" in junk["record"]

    code, out = run("quarantine", "show", str(junk["id"]), "--data-dir", str(data_dir))
    assert code == 0 and "malformed" in out and "4111-1111" not in out
    code, out = run("quarantine", "show", "999", "--data-dir", str(data_dir))
    assert code == 2 and "quarantine list" in out
    code, out = run("quarantine", "list", "--kind", "weird", "--data-dir", str(data_dir))
    assert code == 2 and "pan-in-field" in out


def test_cli_errors_name_the_input(tmp_path: Path, data_dir: Path) -> None:
    code, out = run("ingest", str(tmp_path / "missing.log"), "--data-dir", str(data_dir))
    assert code == 2 and "missing.log" in out
    code, out = run("quarantine", "list", "--data-dir", str(tmp_path / "nowhere"))
    assert code == 2 and "no paypost database" in out
    bad = tmp_path / "a.csv"
    bad.write_text("pan,colour\n4111111111111111,red\n")
    code, out = run("ingest", str(bad), "--format", "csv", "--data-dir", str(data_dir))
    assert code == 2 and "colour" in out and "4111111111111111" not in out


def test_FR1_table_feed_from_the_cli_scrubs_the_landing_rows(data_dir: Path) -> None:
    import sqlite3

    from paypost.iso.generate import card_numbers, generate_authorizations, record_of

    code, out = run("ingest", "--format", "table", "--data-dir", str(data_dir), "--json")
    assert code == 0 and json.loads(out.splitlines()[-1])["events"] == 0  # empty table
    recs = [record_of(a) for a in generate_authorizations({"bank-a": card_numbers(3)}, 20)]
    conn = sqlite3.connect(data_dir / "paypost.db")
    cols = list(recs[0])
    conn.executemany(
        f"INSERT INTO ingest_authorizations ({', '.join(cols)}) "
        f"VALUES ({', '.join('?' for _ in cols)})",
        [[r.get(c) for c in cols] for r in recs],
    )
    conn.commit()
    code, out = run("ingest", "--format", "table", "--data-dir", str(data_dir), "--json")
    report = json.loads(out.splitlines()[-1])
    assert report["this_run"]["records"] == 20 and report["position"] == 20
    pans = [r[0] for r in conn.execute("SELECT pan FROM ingest_authorizations")]
    assert all("******" in p for p in pans)
    conn.close()
    code, out = run("ingest", "some.log", "--format", "table", "--data-dir", str(data_dir))
    assert code == 2 and "no FILE" in out
