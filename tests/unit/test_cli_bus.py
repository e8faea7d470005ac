"""`paypost dlq|replay|bus` on a real SQLite bus in a temporary data directory."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import paypost.cli
from paypost.bus import RetryPolicy, Rule, TargetConfig
from paypost.bus.sqlite import SqliteBus
from paypost.cli import app
from paypost.events import TransactionHeld, TransactionRejected, new_event

paypost.cli._register()
runner = CliRunner()


def run(data_dir: Path, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, [*args, "--data-dir", str(data_dir)])
    return result.exit_code, result.output


@pytest.fixture
def bus_dir(data_dir: Path) -> Path:
    """Two targets; `holds` has dead-lettered held-1 (fraud) and held-2 (review)."""
    bus = SqliteBus.open(data_dir)
    bus.put_target(TargetConfig(name="holds", retry=RetryPolicy(max_attempts=1)))
    bus.put_target(TargetConfig(name="audit"))
    bus.put_rule(Rule(name="holds", pattern={"detail-type": ["TransactionHeld"]}, target="holds"))
    bus.put_rule(Rule(name="audit", pattern={"source": ["paypost.test"]}, target="audit"))
    bus.publish(
        [
            new_event(
                TransactionHeld(reason="fraud", stage="rules"),
                source="paypost.test",
                tenant="t1",
                id="held-1",
            ),
            new_event(
                TransactionHeld(reason="review", stage="rules"),
                source="paypost.test",
                tenant="t1",
                id="held-2",
            ),
            new_event(
                TransactionRejected(reason="limit"), source="paypost.test", tenant="t1", id="rej-3"
            ),
        ]
    )
    bus.nack(bus.receive("holds"), "LookupError: account 42 unknown")
    bus.close()
    return data_dir


def test_dlq_list_show_and_redrive(bus_dir: Path) -> None:
    code, out = run(bus_dir, "dlq", "list", "--json")
    assert code == 0
    dead = json.loads(out)
    assert [d["event"]["id"] for d in dead] == ["held-1", "held-2"]
    assert dead[0]["error"] == "LookupError: account 42 unknown"
    assert dead[0]["attempts"] == 1 and dead[0]["target"] == "holds"
    assert dead[0]["dead_lettered_at"].endswith("Z")

    code, out = run(bus_dir, "dlq", "list")
    assert code == 0 and "held-1" in out and "LookupError" in out

    code, out = run(bus_dir, "dlq", "show", str(dead[1]["id"]), "--json")
    assert code == 0 and json.loads(out)["event"]["detail"]["reason"] == "review"
    code, out = run(bus_dir, "dlq", "show", str(dead[1]["id"]))
    assert code == 0 and "review" in out

    code, out = run(
        bus_dir,
        "dlq",
        "redrive",
        "--target",
        "holds",
        "--pattern",
        '{"detail": {"reason": ["fraud"]}}',
        "--json",
    )
    assert code == 0 and json.loads(out) == {"redriven": 1}
    bus = SqliteBus.open(bus_dir)
    assert [d.event.id for d in bus.receive("holds")] == ["held-1"]
    assert [d.event.id for d in bus.dlq_list()] == ["held-2"]
    bus.close()


def test_dlq_errors_name_the_bad_input(bus_dir: Path, tmp_path: Path) -> None:
    code, out = run(bus_dir, "dlq", "show", "999")
    assert code == 2 and "dead letter 999 does not exist" in out
    code, out = run(bus_dir, "dlq", "list", "--target", "nope")
    assert code == 2 and "target 'nope' does not exist" in out and "holds" in out
    code, out = run(bus_dir, "dlq", "list", "--pattern", '{"source": "x"}')
    assert code == 2 and "--pattern" in out
    code, out = run(tmp_path / "empty", "dlq", "list")
    assert code == 2 and "no paypost database" in out


def test_replay_by_time_range_pattern_and_target(bus_dir: Path) -> None:
    now = time.time()
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 3600))
    end = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 3600))
    code, out = run(
        bus_dir,
        "replay",
        "--from",
        start,
        "--to",
        end,
        "--pattern",
        '{"detail-type": ["TransactionRejected"]}',
        "--json",
    )
    assert code == 0, out
    doc = json.loads(out)
    assert (doc["scanned"], doc["matched"], doc["routed"]) == (3, 1, {"audit": 1})

    code, out = run(bus_dir, "replay", "--from", start, "--to", end, "--target", "holds", "--json")
    assert code == 0 and json.loads(out)["routed"] == {"holds": 2}

    code, out = run(bus_dir, "replay", "--from", start, "--to", end)
    assert code == 0 and "scanned 3" in out

    # a range in the past matches nothing
    code, out = run(bus_dir, "replay", "--from", "2020-01-01", "--to", "2020-01-02", "--json")
    assert code == 0 and json.loads(out)["scanned"] == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from", "yesterday", "--to", "2026-01-01T00:00:00Z"], "--from: 'yesterday' is not"),
        (["--from", "2026-01-01T00:00:00", "--to", "2026-01-02T00:00:00Z"], "no time zone"),
        (["--from", "2026-01-02T00:00:00Z", "--to", "2026-01-01T00:00:00Z"], "reversed"),
        (["--from", "2026-01-01", "--to", "2026-01-02", "--target", "ghost"], "'ghost'"),
        (
            ["--from", "2026-01-01", "--to", "2026-01-02", "--pattern", "missing.json"],
            "missing.json",
        ),
    ],
)
def test_replay_errors_name_the_bad_input(bus_dir: Path, args: list[str], message: str) -> None:
    code, out = run(bus_dir, "replay", *args)
    assert code == 2
    assert message in out


def test_bus_stats_and_purge(bus_dir: Path) -> None:
    code, out = run(bus_dir, "bus", "stats", "--json")
    assert code == 0
    stats = json.loads(out)
    by_name = {t["name"]: t for t in stats["targets"]}
    assert by_name["holds"]["dead_lettered"] == 2
    assert by_name["audit"]["queued"] == 3
    assert stats["archived"] == 3 and stats["duplicates_dropped"] == 0
    code, out = run(bus_dir, "bus", "stats")
    assert code == 0 and "audit" in out and "archived: 3" in out
    code, out = run(bus_dir, "bus", "purge", "--retention-days", "0", "--json")
    assert code == 0 and json.loads(out) == {"purged": 0}  # all still queued or dead


def test_bus_config_shows_targets_and_rules(bus_dir: Path) -> None:
    code, out = run(bus_dir, "bus", "config", "--json")
    assert code == 0
    doc = json.loads(out)
    assert {t["name"] for t in doc["targets"]} == {"holds", "audit"}
    holds = next(t for t in doc["targets"] if t["name"] == "holds")
    assert holds["retry"]["max_attempts"] == 1
    assert {r["name"]: r["pattern"] for r in doc["rules"]}["holds"] == {
        "detail-type": ["TransactionHeld"]
    }
    code, out = run(bus_dir, "bus", "config")
    assert code == 0 and "TransactionHeld" in out and "audit" in out


def test_help_lists_the_bus_commands() -> None:
    result = runner.invoke(app, ["--help"])
    for command in ("dlq", "replay", "bus"):
        assert command in result.output
    result = runner.invoke(app, ["replay", "--help"])
    assert "--from" in result.output and "RFC 3339" in result.output
