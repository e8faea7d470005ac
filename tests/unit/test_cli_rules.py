"""`paypost rules test`: match / no match / invalid pattern, with exit codes 0 / 1 / 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import paypost.cli
from paypost.cli import app

paypost.cli._register()
runner = CliRunner()

PATTERN = {
    "source": ["paypost.ingest"],
    "detail": {"request": {"amount": {"minor": [{"numeric": [">=", 100_000]}]}}},
}
BIG = {"source": "paypost.ingest", "detail": {"request": {"amount": {"minor": 250_000}}}}
SMALL = {"source": "paypost.ingest", "detail": {"request": {"amount": {"minor": 99}}}}


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["rules", "test", *args])
    return result.exit_code, result.output


def test_inline_match_and_no_match() -> None:
    code, out = run("--pattern", json.dumps(PATTERN), "--event", json.dumps(BIG))
    assert (code, out.strip()) == (0, "match")
    code, out = run("--pattern", json.dumps(PATTERN), "--event", json.dumps(SMALL))
    assert (code, out.strip()) == (1, "no match")


def test_files_and_json_output(tmp_path: Path) -> None:
    pattern_file = tmp_path / "rule.json"
    event_file = tmp_path / "event.json"
    pattern_file.write_text(json.dumps(PATTERN))
    event_file.write_text(json.dumps(BIG))
    code, out = run("--pattern", str(pattern_file), "--event", str(event_file), "--json")
    assert code == 0
    assert json.loads(out) == {"result": "match", "match": True}


def test_invalid_pattern_says_why_and_where() -> None:
    bad = {"detail": {"c-count": [{"numeric": [">", 0, "<"]}]}}
    code, out = run("-p", json.dumps(bad), "-e", json.dumps(BIG))
    assert code == 2
    assert out.strip() == (
        'invalid pattern: Value of < must be numeric (at $.detail["c-count"][0].numeric[3])'
    )
    code, out = run("-p", json.dumps(bad), "-e", json.dumps(BIG), "--json")
    assert code == 2
    assert json.loads(out)["reason"] == "Value of < must be numeric"


@pytest.mark.parametrize("pattern", ['{"source": [', "missing-rule.json", "[1]"])
def test_unreadable_pattern_is_exit_2(pattern: str) -> None:
    code, out = run("-p", pattern, "-e", json.dumps(BIG))
    assert code == 2
    assert out.startswith("invalid pattern: ")


def test_bad_event_is_exit_2() -> None:
    code, _ = run("-p", json.dumps(PATTERN), "-e", "[1, 2]")
    assert code == 2
    code, _ = run("-p", json.dumps(PATTERN), "-e", "no-such-event.json")
    assert code == 2


def test_rules_is_a_group_with_help() -> None:
    result = runner.invoke(app, ["rules", "--help"])
    assert result.exit_code == 0
    assert "test" in result.output
